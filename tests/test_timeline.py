"""Tests of chlib.retrieval.timeline: the Viterbi decoder, segments, window x work scores and
the timeline of a set of tunes (issue 12, part A)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from chlib.core.config import FeatureSettings
from chlib.core.errors import ConfigError
from chlib.retrieval import timeline as tl
from chlib.retrieval.embed import window_settings
from chlib.retrieval.index import index_from_windows

DIM, N_WORKS, PER_WORK, REF_WINDOWS = 32, 30, 2, 6
HOP_S, WIN_S = 5.0, 20.0


def make_refs(seed: int = 0, rule: str = "mean", keep_windows: bool = True,
              n_works: int = N_WORKS):
    """An index of N_WORKS works x PER_WORK recordings of REF_WINDOWS windows each, clustered
    by work, and the raw reference window sets (so queries can copy them)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_works, DIM))
    records, sets = [], []
    for w in range(n_works):
        for v in range(PER_WORK):
            rec = centres[w] + 0.5 * rng.normal(size=DIM)
            sets.append(rec + 0.3 * rng.normal(size=(REF_WINDOWS, DIM)))
            records.append({"perf": f"w{w:02d}_v{v}", "work": f"W{w:02d}", "work_id": w})
    idx = index_from_windows(records, sets, model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(),
                             window_settings=window_settings(30, 3), rule=rule,
                             keep_windows=keep_windows, n_pairs=2000)
    return idx, sets


def set_query(sets, works, n_per_tune, noise=0.35, seed=1):
    """Windows [T, D] of a set: tune k = ``n_per_tune[k]`` noisy copies of reference windows
    of work ``works[k]``; and the start times (hop HOP_S s)."""
    rng = np.random.default_rng(seed)
    rows = []
    for w, n in zip(works, n_per_tune, strict=True):
        for _ in range(n):
            rec = sets[w * PER_WORK + int(rng.integers(PER_WORK))]
            rows.append(rec[int(rng.integers(REF_WINDOWS))] + noise * rng.normal(size=DIM))
    q = np.stack(rows)
    return q, HOP_S * np.arange(len(q))


def duration_of(starts):
    return float(starts[-1] + WIN_S) if len(starts) else 0.0


# ---------------------------------------------------------------- viterbi

def blocks_with_flicker(seed=0):
    """3 blocks (states 2, 0, 3 of 4), every 4th window a spike on a wrong state: the
    per-window argmax flickers, the blocks are what a tune-length prior must return."""
    rng = np.random.default_rng(seed)
    truth = np.repeat([2, 0, 3], [15, 12, 18])
    e = 0.1 * rng.normal(size=(truth.size, 4))
    e[np.arange(truth.size), truth] += 1.0
    for t in range(1, truth.size, 4):
        e[t, (truth[t] + 1) % 4] += 2.0  # a wrong state wins this window by ~1
    return e, truth


def test_viterbi_recovers_blocks_where_argmax_flickers():
    e, truth = blocks_with_flicker()
    assert (e.argmax(axis=1) != truth).sum() >= 10  # the argmax flickers
    np.testing.assert_array_equal(tl.viterbi(e, 3.0), truth)


def test_viterbi_penalty_zero_is_argmax_and_huge_penalty_one_state(rng):
    e = rng.normal(size=(40, 5))
    np.testing.assert_array_equal(tl.viterbi(e, 0.0), e.argmax(axis=1))
    one = tl.viterbi(e, 1e9)
    np.testing.assert_array_equal(one, np.full(40, e.sum(axis=0).argmax()))


def _path_score(e, labels, pen):
    return e[np.arange(len(labels)), labels].sum() - pen * np.count_nonzero(np.diff(labels))


@pytest.mark.parametrize("seed", range(20))
def test_viterbi_is_the_exact_optimum_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_t, n_s = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    e, pen = rng.normal(size=(n_t, n_s)), float(rng.uniform(0, 2))
    best = max(itertools.product(range(n_s), repeat=n_t),
               key=lambda p: _path_score(e, np.array(p), pen))
    got = tl.viterbi(e, pen)
    assert _path_score(e, got, pen) == pytest.approx(_path_score(e, np.array(best), pen))
    np.testing.assert_array_equal(got, best)  # random floats: the optimum is unique


def test_viterbi_ties_go_to_the_lowest_state_and_bad_inputs_fail():
    np.testing.assert_array_equal(tl.viterbi(np.zeros((4, 3)), 1.0), [0, 0, 0, 0])
    assert tl.viterbi(np.zeros((0, 2)), 1.0).shape == (0,)
    with pytest.raises(ConfigError, match="switch_penalty"):
        tl.viterbi(np.zeros((3, 2)), -1.0)
    with pytest.raises(ConfigError, match="emissions"):
        tl.viterbi(np.zeros(3), 1.0)


# ---------------------------------------------------------------- segments

def test_segments_boundaries_at_midpoints_of_window_centres_and_merging():
    labels = ["a", "a", "b", "b", "b", "a"]
    starts = [0, 5, 10, 15, 20, 25]  # window 10 s: centres 5, 10, 15, 20, 25, 30
    segs = tl.segments_from_labels(labels, starts, 10.0, 40.0)
    assert [(s["start_s"], s["end_s"], s["work"]) for s in segs] == [
        (0.0, 12.5, "a"), (12.5, 27.5, "b"), (27.5, 40.0, "a")]
    assert [(s["first_window"], s["last_window"]) for s in segs] == [(0, 1), (2, 4), (5, 5)]
    one = tl.segments_from_labels(["x"] * 3, [0, 5, 10], 10.0, 20.0)
    assert [(s["start_s"], s["end_s"], s["work"]) for s in one] == [(0.0, 20.0, "x")]
    with pytest.raises(ConfigError, match="labels"):
        tl.segments_from_labels(["a"], [0, 5], 10.0, 20.0)


# ---------------------------------------------------------------- scores

def _unblocked(idx, q):
    """Reference answer: the full [T, R] matrix at once, max per work, argmax record."""
    qu = q / np.linalg.norm(q, axis=1, keepdims=True)
    works = sorted(set(idx.works))
    sims = qu @ idx.windows.T
    rec_work = np.array([works.index(w) for w in idx.works])[idx.window_owner]
    scores = np.stack([sims[:, rec_work == k].max(axis=1) for k in range(len(works))], axis=1)
    best = np.stack([idx.window_owner[rec_work == k][sims[:, rec_work == k].argmax(axis=1)]
                     for k in range(len(works))], axis=1)
    return scores, works, best


def test_window_work_scores_are_max_over_the_works_windows():
    idx, sets = make_refs()
    q, _ = set_query(sets, [3, 17], [4, 4])
    scores, works, best = tl.window_work_scores(idx, q * 7.0, with_best=True)  # raw rows
    ref_s, ref_w, ref_b = _unblocked(idx, q)
    assert works == ref_w and scores.dtype == np.float32 and scores.shape == (8, N_WORKS)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    np.testing.assert_array_equal(best, ref_b)
    assert [idx.works[i] for i in best[:4, 3]] == ["W03"] * 4


def test_window_work_scores_blocks_bound_memory(monkeypatch):
    """Issue 12: no [T, all reference windows] matrix beyond the block limit."""
    idx, sets = make_refs()
    q, _ = set_query(sets, [3, 17, 8], [10, 10, 10])
    full, works, full_best = tl.window_work_scores(idx, q, with_best=True)
    seen = []
    spy = tl._similarities

    def record(a, b):
        out = spy(a, b)
        seen.append(out.nbytes)
        return out

    monkeypatch.setattr(tl, "_similarities", record)
    limit = 4 * len(idx.windows) * 7  # room for 7 query windows per block
    got, works2, best = tl.window_work_scores(idx, q, block_bytes=limit, with_best=True)
    assert len(seen) == math.ceil(30 / 7) and max(seen) <= limit
    np.testing.assert_allclose(got, full, atol=1e-6)  # BLAS may sum blocks in another order
    np.testing.assert_array_equal(best, full_best)
    assert works2 == works
    seen.clear()
    monkeypatch.setattr(tl, "BLOCK_BYTES", 4 * len(idx.windows) * 3)  # the module default
    np.testing.assert_allclose(tl.window_work_scores(idx, q)[0], full, atol=1e-6)
    assert len(seen) == 10


def test_track_vectors_when_the_index_keeps_no_windows():
    idx, sets = make_refs(keep_windows=False)
    q, _ = set_query(sets, [5], [3])
    scores, works = tl.window_work_scores(idx, q)
    qu = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = (qu @ idx.embeddings.T).reshape(3, N_WORKS, PER_WORK).max(axis=2)  # works sorted
    np.testing.assert_allclose(scores, want, atol=1e-5)


def test_normalise_scores_is_a_per_window_robust_z():
    s = np.array([[0.0, 1.0, 2.0, 3.0, 10.0]])  # median 2, MAD 1
    np.testing.assert_allclose(tl.normalise_scores(s, eps=0.0),
                               [[-2 / 1.4826, -1 / 1.4826, 0.0, 1 / 1.4826, 8 / 1.4826]],
                               rtol=1e-6)
    np.testing.assert_array_equal(tl.normalise_scores(np.ones((2, 3))), np.zeros((2, 3)))


# ---------------------------------------------------------------- the timeline

@pytest.mark.parametrize("rule", ["mean", "min"])
def test_timeline_recovers_the_works_and_boundaries_of_a_set(rule):
    idx, sets = make_refs(rule=rule)
    q, starts = set_query(sets, [3, 17, 8], [12, 10, 14])
    dur = duration_of(starts)
    res = tl.timeline(idx, q, starts, WIN_S, dur)
    got = [(s["work"], s["start_s"], s["end_s"]) for s in res.segments]
    # boundaries midway between the centres of windows 11|12 and 21|22: 67.5 s and 117.5 s
    assert got == [("W03", 0.0, 67.5), ("W17", 67.5, 117.5), ("W08", 117.5, dur)]
    assert all(s["p_value"] < 0.05 and s["perf"].startswith("w" + s["work"][1:])
               for s in res.segments)
    assert [r["work"] for r in res.works()] == ["W08", "W03", "W17"]  # most seconds first
    assert res.works()[0]["seconds"] == pytest.approx(dur - 117.5)
    assert sum(r["share"] for r in res.works()) == pytest.approx(1.0)
    rank = res.ranking(10)
    assert rank[:3] == ["W08", "W03", "W17"] and len(rank) == 10 and len(set(rank)) == 10
    rows = res.to_rows("set1.wav")
    assert list(rows[0]) == list(tl.SEGMENT_COLUMNS) and rows[1]["work"] == "W17"


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_decode_timeline_suppresses_flicker_that_argmax_shows(seed):
    idx, sets = make_refs()
    q, _ = set_query(sets, [3, 17], [15, 15], noise=1.3, seed=seed)
    z = tl.normalise_scores(tl.window_work_scores(idx, q)[0])
    works = sorted(set(idx.works))
    truth = ["W03"] * 15 + ["W17"] * 15
    assert [works[j] for j in z.argmax(axis=1)] != truth  # noisy: the argmax flickers
    assert tl.decode_timeline(z, works) == truth


def test_random_queries_are_mostly_unknown_and_the_gates_are_what_makes_them_so():
    # 150 works: the best-match null has 300 recordings (p floor 1/301). Random windows are
    # the adversary: the decoder picks the best-fitting work and stretch, so a few chance
    # segments pass (measured: 9 of 20 files hold one, 7 % of the time); without the segment
    # gates (p-value and mean z) every file is named throughout.
    idx, _ = make_refs(n_works=150)
    null = tl.best_match_null(idx)
    starts = HOP_S * np.arange(40)
    gate = tl.segment_gate("auto", tl.index_null(idx))

    def named(**kw):
        files, time = 0, 0.0
        for seed in range(1, 21):
            q = np.random.default_rng(seed).normal(size=(40, DIM))
            res = tl.timeline(idx, q, starts, WIN_S, duration_of(starts), best_null=null, **kw)
            hits = [s for s in res.segments if s["work"] != tl.UNKNOWN]
            files += bool(hits)
            time += sum(s["end_s"] - s["start_s"] for s in hits) / res.duration_s
            assert kw or all(s["p_value"] < 0.05 and s["mean_z"] >= gate for s in hits)
        return files / 20, time / 20

    files, time = named()
    assert files <= 0.5 and time <= 0.1
    assert named(min_segment_z=0.0, possible_p=1.0) == (1.0, 1.0)


def test_an_unknown_query_gives_one_unknown_segment_and_no_works():
    idx, _ = make_refs(n_works=150)
    q = np.random.default_rng(2).normal(size=(40, DIM))
    starts = HOP_S * np.arange(40)
    res = tl.timeline(idx, q, starts, WIN_S, duration_of(starts))
    assert [s["work"] for s in res.segments] == [tl.UNKNOWN]
    assert res.works() == [] and math.isnan(res.segments[0]["p_value"])
    assert res.segments[0]["perf"] is None and len(res.ranking(5)) == 5

def test_one_window_gives_one_segment_over_the_whole_file():
    idx, sets = make_refs()
    q, _ = set_query(sets, [11], [1], noise=0.1)
    res = tl.timeline(idx, q, [0.0], WIN_S, 25.0)
    assert [(s["work"], s["start_s"], s["end_s"]) for s in res.segments] == [("W11", 0.0, 25.0)]


def test_empty_index_and_bad_inputs():
    empty = index_from_windows([], [], model_fingerprint="f" * 16,
                               feature_settings=FeatureSettings(),
                               window_settings=window_settings(30, 3))
    res = tl.timeline(empty, np.ones((3, DIM)), [0, 5, 10], WIN_S, 30.0)
    assert [(s["work"], s["start_s"], s["end_s"]) for s in res.segments] == [
        (tl.UNKNOWN, 0.0, 30.0)]
    idx, _ = make_refs()
    with pytest.raises(ValueError, match="T >= 1"):
        tl.timeline(idx, np.zeros((0, DIM)), [], WIN_S, 30.0)
    with pytest.raises(ConfigError, match="D=32"):
        tl.window_work_scores(idx, np.ones((2, 5)))
    with pytest.raises(ConfigError, match="duration_s"):
        tl.timeline(idx, np.ones((2, DIM)), [0, 5], WIN_S, 0.0)
    with pytest.raises(ConfigError, match="1 starts for 2 windows"):
        tl.timeline(idx, np.ones((2, DIM)), [0], WIN_S, 30.0)


def test_segments_not_significant_become_unknown_and_merge():
    idx, sets = make_refs()
    q, starts = set_query(sets, [3, 17, 8], [12, 10, 14])
    res = tl.timeline(idx, q, starts, WIN_S, duration_of(starts), possible_p=1e-12)
    assert [(s["work"], s["start_s"]) for s in res.segments] == [(tl.UNKNOWN, 0.0)]
    assert res.labels == [tl.UNKNOWN] * 36 and res.works() == []


def test_uncalibrated_index_still_gives_segment_p_values_from_its_best_match_null():
    idx, sets = make_refs()
    idx.calibration = None  # search p-values are NaN; the timeline's come from its own null
    q, starts = set_query(sets, [3, 17], [12, 10])
    res = tl.timeline(idx, q, starts, WIN_S, duration_of(starts))
    assert [s["work"] for s in res.segments] == ["W03", "W17"]
    null = tl.best_match_null(idx)
    assert all(s["p_value"] == pytest.approx(1 / (len(null) + 1)) for s in res.segments)


def test_best_match_p_counts_the_null_at_or_below_a_distance():
    null = np.array([0.2, 0.4, 0.4, 0.8])
    assert tl.best_match_p(null, 0.1) == pytest.approx(1 / 5)
    assert tl.best_match_p(null, 0.4) == pytest.approx(4 / 5)
    assert tl.best_match_p(null, 0.9) == pytest.approx(1.0)
    idx, _ = make_refs()
    d = tl.best_match_null(idx)
    assert len(d) == len(idx) and np.all(np.diff(d) >= 0)
    # each is the distance from a recording to the closest recording of another work
    k = 0
    own = idx.search([idx.window_sets()[k]], k=40, by="perf")[0]
    other = min(r["distance"] for r in own if r["work"] != idx.works[k])
    assert np.isclose(d, other, rtol=0, atol=1e-6).any()


def test_a_run_whose_work_is_not_in_the_search_top_becomes_unknown_not_another_work(
        monkeypatch):
    idx, sets = make_refs()
    q, starts = set_query(sets, [3, 17], [12, 10])

    def search(query, k=10, by="perf"):  # the index ranks W05 first and W03 nowhere
        top = {"work": "W05", "perf": "w05_v1", "p_value": 0.001, "distance": 0.0}
        if any(r["work"] == "W17" for r in real(query, k=k, by=by)[0]):
            top = {"work": "W17", "perf": "w17_v0", "p_value": 0.002, "distance": 0.0}
        return [[top]]

    null = tl.best_match_null(idx)  # before the search is replaced
    real = idx.search
    monkeypatch.setattr(idx, "search", search)
    res = tl.timeline(idx, q, starts, WIN_S, duration_of(starts), best_null=null)
    assert [(s["work"], s["perf"], s["p_value"]) for s in res.segments[:1]] == [
        (tl.UNKNOWN, None, pytest.approx(float("nan"), nan_ok=True))]
    assert [(s["work"], s["perf"]) for s in res.segments[1:]] == [("W17", "w17_v0")]


def test_crossing_near_interpolates_the_sign_change_nearest_the_cut():
    c = np.arange(6, dtype=float)  # window centres, s
    assert tl.crossing_near(np.array([2.0, 1.0, -1.0, -2.0, -3.0, -4.0]), c, 0.0) == 1.5
    # two falls (at 0.25 and at 4.5): the one nearest the current cut wins
    d = np.array([1.0, -3.0, 2.0, 2.0, 1.0, -1.0])
    assert tl.crossing_near(d, c, 4.0) == pytest.approx(4.5)
    assert tl.crossing_near(d, c, 1.0) == pytest.approx(0.25)
    # rises are not changes from the earlier work to the later one; none at all gives None
    assert tl.crossing_near(np.array([-1.0, 1.0, 2.0]), c[:3], 1.0) is None
    assert tl.crossing_near(np.array([0.0, 0.0]), c[:2], 0.5) is None


@pytest.mark.parametrize("keep_windows", [True, False])
def test_work_scores_are_window_work_scores_for_the_named_works(keep_windows):
    idx, sets = make_refs(keep_windows=keep_windows)
    q, _ = set_query(sets, [3, 17], [4, 5])
    full, works = tl.window_work_scores(idx, q)
    some = tl.work_scores(idx, q, ["W17", "W03", "not indexed"])
    np.testing.assert_allclose(some[:, :2], full[:, [works.index("W17"), works.index("W03")]],
                               rtol=1e-6)
    assert np.isneginf(some[:, 2]).all()


def test_the_auto_gate_follows_the_index_same_work_level():
    assert tl.segment_gate("auto", (0.8, 0.05, 3.0)) == pytest.approx(tl.AUTO_GATE_SHARE * 3.0)
    for stats in ((0.8, 0.05, math.nan), (0.8, 0.05, -1.0), (0.8, 0.05), None):
        assert tl.segment_gate("auto", stats) == tl.FIXED_GATE_Z
    assert tl.segment_gate(1.5, (0.8, 0.05, 3.0)) == 1.5
    with pytest.raises(ConfigError, match="min_segment_z"):
        tl.segment_gate("high", (0.8, 0.05, 3.0))
    idx, _ = make_refs()
    med, scale, same_z = tl.index_null(idx)
    assert same_z > 2.0  # clustered works: same-work rows far above the null
    one_each = index_from_windows([{"perf": f"p{i}", "work": f"W{i}"} for i in range(5)],
                                  [np.random.default_rng(i).normal(size=(3, DIM)) for i in range(5)],
                                  model_fingerprint="f" * 16, feature_settings=FeatureSettings(),
                                  window_settings=window_settings(30, 3), n_pairs=200)
    assert math.isnan(tl.index_null(one_each)[2])


def test_a_weak_model_keeps_its_works_with_the_auto_gate_not_with_a_fixed_z():
    """Works whose recordings agree only weakly (same-work rows ~1 z above the null, like a
    model at an early epoch): a fixed gate of 2 z leaves a set of them unknown, "auto" names
    its tunes."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, DIM))
    recs, sets = [], []
    for w in range(40):
        for v in range(2):
            recs.append({"perf": f"w{w}_v{v}", "work": f"W{w:02d}"})
            sets.append(centres[w] + 2.2 * rng.normal(size=(1, DIM)))
    idx = index_from_windows(recs, sets, model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(),
                             window_settings=window_settings(30, 3), n_pairs=2000)
    stats = tl.index_null(idx)
    assert 0.5 < stats[2] < 2.0 / tl.AUTO_GATE_SHARE
    q = np.concatenate([centres[w] + 2.2 * rng.normal(size=(12, DIM)) for w in (4, 17)])
    starts = HOP_S * np.arange(len(q))

    def works(**kw):
        res = tl.timeline(idx, q, starts, WIN_S, duration_of(starts), null_stats=stats,
                          possible_p=1.0, **kw)
        return [s["work"] for s in res.segments]

    assert works(min_segment_z=2.0) == [tl.UNKNOWN]
    assert works() == ["W04", "W17"]
