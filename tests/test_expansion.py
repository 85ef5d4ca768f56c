"""Neighbour expansion (``neighbour_expansion``): each recording compared together with its
nearest reference (chlib.retrieval.protocol), in evaluation, search and calibration alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

import chlib.retrieval.identify as identify_module
import chlib.retrieval.index as index_module
from chlib.core.config import FeatureSettings, HParams
from chlib.retrieval.calibration import sample_cross_work_pairs
from chlib.retrieval.embed import window_settings
from chlib.retrieval.explore import ExplorerData
from chlib.retrieval.index import ReferenceIndex, index_from_windows
from chlib.retrieval.metrics import retrieval_metrics
from chlib.retrieval.protocol import (
    expand_by_neighbours,
    nearest_others,
    pair_distances,
    track_distances,
)
from chlib.retrieval.scoring import expansion_of, score_inputs


def clustered(n_works=8, per_work=3, dim=12, seed=0, noise=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_works, dim))
    recs, wins = [], []
    for w in range(n_works):
        for v in range(per_work):
            wins.append((centres[w] + noise * rng.normal(size=(int(rng.integers(1, 3)), dim)))
                        .astype(np.float32))
            recs.append({"perf": f"w{w}_v{v}", "work": f"W{w}", "work_id": w})
    return recs, wins


def brute_expanded(d_qr, d_rr, q_excl, r_excl=None):
    """By hand: n(q) the nearest allowed reference, n(r) the nearest other reference that is
    neither a copy of r nor excluded for the query, the mean of the four distances."""
    q, r = d_qr.shape
    r_excl = np.zeros((r, r), bool) if r_excl is None else r_excl
    out = np.zeros((q, r))
    for i in range(q):
        allowed = [c for c in range(r) if not q_excl[i, c]]
        nq = min(allowed, key=lambda c: d_qr[i, c])
        for j in range(r):
            others = [c for c in range(r) if c != j and not q_excl[i, c] and not r_excl[j, c]]
            nr = min(others, key=lambda c: d_rr[j, c]) if others else j
            out[i, j] = (d_qr[i, j] + d_rr[nq, j] + d_qr[i, nr] + d_rr[nq, nr]) / 4
    return out


def test_expansion_equals_the_four_distance_mean_by_hand():
    recs, wins = clustered()
    d = track_distances(wins, wins, rule="mean")
    excl = np.eye(len(wins), dtype=bool)
    excl[0, 1] = excl[1, 0] = True  # a pair never ranked (a recording and its copy)
    got = expand_by_neighbours(d, d, excl, excl)
    np.testing.assert_allclose(got, brute_expanded(d, d, excl, excl), atol=1e-6)


def test_a_query_is_never_the_neighbour_that_brings_a_reference_closer_to_it():
    # r's nearest other is q itself: in a set searched against itself that would put
    # d(q, q) = 0 into d*(q, r); it must be r's next neighbour instead
    d = np.array([[0.0, 0.9, 0.1], [0.9, 0.0, 0.5], [0.1, 0.5, 0.0]], np.float32)
    d[1, 0] = d[0, 1] = 0.9
    d_rr = d.copy()
    d_rr[1, 0] = d_rr[0, 1] = 0.05  # reference 1's nearest is recording 0
    got = expand_by_neighbours(d, d_rr, np.eye(3, dtype=bool), None)
    # q=0, r=1: n(q)=2, n(r) must skip 0 and be 2: (0.9 + 0.5 + 0.1 + 0) / 4
    assert got[0, 1] == pytest.approx((0.9 + 0.5 + 0.1 + 0.0) / 4)


def test_expansion_lifts_a_version_reached_only_through_its_neighbour():
    # chain A - B - C of one work, C far from A but close to B; D another work, nearer A than C
    pts = {"A": [1, 0, 0], "B": [0.8, 0.6, 0], "C": [0.28, 0.96, 0], "D": [0.5, 0, 0.866]}
    wins = [np.array([p], np.float32) for p in pts.values()]
    labels = ["x", "x", "x", "y"]
    d = track_distances(wins, wins, rule="mean")
    eye = np.eye(4, dtype=bool)
    assert d[0, 3] < d[0, 2]  # plainly, A finds D before C
    e = expand_by_neighbours(d, d, eye, eye)
    assert e[0, 2] < e[0, 3]  # expanded, C (B's neighbour) comes before D
    plain = retrieval_metrics(d, labels, labels, exclude=eye)["mAP"]
    assert retrieval_metrics(e, labels, labels, exclude=eye)["mAP"] > plain


def test_nearest_others_skip_excluded_cells_and_mark_missing():
    d = np.array([[0.0, 0.3, 0.1], [0.3, 0.0, 0.2]])
    ex = np.array([[True, False, False], [False, True, True]])
    np.testing.assert_array_equal(nearest_others(d, ex, m=3), [[2, 1, -1], [0, -1, -1]])


def index(recs, wins, **kw):
    return index_from_windows(recs, wins, model_fingerprint="f" * 16,
                              feature_settings=FeatureSettings(),
                              window_settings=window_settings(30, 3), **kw)


@pytest.mark.parametrize("rule", ["mean", "min"])
def test_index_search_is_the_expanded_distance_of_a_query_outside_the_index(rule):
    recs, wins = clustered(seed=2)
    idx = index(recs, wins, rule=rule, expansion=True)
    queries, _ = clustered(seed=3)[1][:4], None
    d_qr = track_distances(queries, wins, rule=rule)
    d_rr = track_distances(wins, wins, rule=rule)
    want = brute_expanded(d_qr, d_rr, np.zeros(d_qr.shape, bool))
    perfs = [r["perf"] for r in recs]
    for row, hits in zip(want, idx.search(queries, k=5), strict=True):
        got = [row[perfs.index(h["perf"])] for h in hits]  # each hit at its own d*
        np.testing.assert_allclose([h["distance"] for h in hits], got, atol=1e-5)
        np.testing.assert_allclose(got, np.sort(row)[:5], atol=1e-5)  # and the 5 closest
    # a reference searched as a query: with own_rows it is not its own neighbour
    own = idx.search([wins[5]], k=3, own_rows=[5])[0]
    ex = np.zeros((1, len(wins)), bool)
    ex[0, 5] = True
    row = brute_expanded(d_rr[5:6], d_rr, ex)[0]
    assert own[0]["perf"] == recs[5]["perf"]  # itself, at half its neighbour's distance
    assert own[1]["distance"] == pytest.approx(np.sort(row)[1], abs=1e-5)


def test_index_calibration_is_of_expanded_pair_distances(monkeypatch):
    recs, wins = clustered(n_works=10, seed=4)
    grown = index(recs, wins, n_pairs=200, expansion=True)
    i, j, _ = sample_cross_work_pairs(grown.works, 200, grown.seed)
    d_rr = track_distances(wins, wins, rule="mean")
    want = []
    for a, b in zip(i, j, strict=True):  # a plays the query: n(b) is never a
        na = min((c for c in range(len(wins)) if c != a), key=lambda c: d_rr[a, c])
        nb = min((c for c in range(len(wins)) if c not in (a, b)), key=lambda c: d_rr[b, c])
        want.append((d_rr[a, b] + d_rr[na, b] + d_rr[a, nb] + d_rr[na, nb]) / 4)
    seen = {}
    real = index_module.calibrate_distances

    def spy(d, **kw):  # the distances the index calibrates on
        seen["d"] = np.asarray(d)
        return real(d, **kw)
    monkeypatch.setattr(index_module, "calibrate_distances", spy)
    grown.recalibrate()
    np.testing.assert_allclose(seen["d"], want, atol=1e-5)
    plain = pair_distances([], grown.embeddings, i, j, rule="mean")
    assert np.mean(want) < np.mean(plain)  # expanded cross-work pairs sit closer: a null of their own


def test_index_keeps_its_expansion_through_save_and_an_older_index_loads_without(tmp_path):
    recs, wins = clustered()
    idx = index(recs, wins, expansion=True)
    idx.save(tmp_path / "i")
    assert ReferenceIndex.load(tmp_path / "i").expansion is True
    meta = json.loads((tmp_path / "i" / "meta.json").read_text())
    del meta["expansion"]
    (tmp_path / "i" / "meta.json").write_text(json.dumps(meta))
    assert ReferenceIndex.load(tmp_path / "i").expansion is False


def test_evaluation_scores_the_expanded_distances_and_configs_default_to_plain():
    recs, wins = clustered(seed=5)
    s = score_inputs(recs, recs, wins, wins, rule="mean", expansion=True)
    d = track_distances(wins, wins, rule="mean")
    np.testing.assert_allclose(s.dist, expand_by_neighbours(d, d, s.exclude, s.exclude),
                               atol=1e-6)
    assert expansion_of(HParams()) is False
    assert expansion_of(HParams.from_dict({"neighbour_expansion": True})) is True


def test_explorer_neighbours_rank_by_the_expanded_distances_of_its_points():
    recs, wins = clustered(seed=6)
    vecs = np.stack([w.mean(0) / np.linalg.norm(w.mean(0)) for w in wins]).astype(np.float32)
    data = ExplorerData(vecs, recs, rule="min", windows=wins, expansion=True)
    d = track_distances(wins, wins, rule="min")
    eye = np.eye(len(wins), dtype=bool)
    row = expand_by_neighbours(d, d, eye, eye)[3]
    got = data.neighbours(3, k=5)
    np.testing.assert_allclose([g["distance"] for g in got],
                               np.sort(np.delete(row, 3))[:5], atol=1e-5)
    plain = ExplorerData(vecs, recs, rule="min", windows=wins).neighbours(3, k=5)
    np.testing.assert_allclose([g["distance"] for g in plain], np.sort(np.delete(d[3], 3))[:5],
                               atol=1e-5)


def test_a_saved_index_is_rebuilt_when_the_run_compares_otherwise(tmp_path):
    recs, wins = clustered()
    keyed = window_settings(60, 3, transform="keyed_chroma", bins_per_octave=12)
    idx = index_from_windows(recs, wins, model_fingerprint="a" * 16,
                             feature_settings=FeatureSettings(), window_settings=keyed,
                             expansion=True)
    idx.save(tmp_path / "index")
    base = {"chunk_frame": [20], "mean_size": 3, "input_transform": "keyed_chroma"}
    hp = HParams.from_dict(base)
    assert identify_module._why_not_reuse(tmp_path / "index", "a" * 16, hp, recs) == (
        None, "the index and the run differ in neighbour expansion")
    kv = HParams.from_dict(base | {"neighbour_expansion": True, "key_variants": [0, 7]})
    why = identify_module._why_not_reuse(tmp_path / "index", "a" * 16, kv, recs)
    assert why == (None, "the index reads keys [0], the run [0, 7]")
    same = HParams.from_dict(base | {"neighbour_expansion": True})
    assert identify_module._why_not_reuse(tmp_path / "index", "a" * 16, same, recs)[0] is not None
