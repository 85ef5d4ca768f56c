"""Tests of chlib.retrieval.metrics against brute-force loops, scikit-learn and hand-made cases."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from chlib.core.errors import ConfigError, ManifestError
from chlib.retrieval.metrics import (
    bootstrap_ci,
    most_confused_pairs,
    per_query_ap,
    per_query_stats,
    per_work_ap,
    query_in_ref_mask,
    rank_of_first_correct,
    read_query_in_ref,
    retrieval_metrics,
    self_exclusion_mask,
)

# --------------------------------------------------------------------------------------------
# a plain-loop reference of the original's calc_map (fact sheet 8.3), with a boolean mask


def brute_force(dist, ql, rl, exclude=None, topk=None, no_relevant="count_as_zero"):
    n_q, n_r = dist.shape
    aps, r1s, t10s, hits, has_rel = [], [], [], [], []
    for i in range(n_q):
        items = [(dist[i, j], j) for j in range(n_r) if exclude is None or not exclude[i, j]]
        items.sort(key=lambda t: (t[0], t[1]))  # stable: ties keep column order
        rel = [ql[i] == rl[j] for _, j in items]
        c, s, first = 0, 0.0, 0
        for k, r in enumerate(rel):
            if r and first == 0:
                first = k + 1
            if r and (topk is None or k < topk):
                c += 1
                s += c / (k + 1)
        aps.append(s / c if c else 0.0)
        r1s.append(first)
        t10s.append(sum(rel[:10]))
        hits.append(1.0 if rel and rel[0] else 0.0)
        has_rel.append(any(rel))
    keep = np.array(has_rel) if no_relevant == "skip" else np.ones(n_q, dtype=bool)
    r1 = np.array(r1s, dtype=float)[keep]
    return {
        "mAP": float(np.mean(np.array(aps)[keep])),
        "MR1": float(np.mean(r1)),
        "HR1": float(np.mean(np.array(hits)[keep])),
        "HR10": float(np.mean((r1 >= 1) & (r1 <= 10))),
        "P@10": float(np.mean(np.array(t10s)[keep]) / 10),
        "ap": np.array(aps),
        "rank1": np.array(r1s),
    }


def random_case(seed, n_q=30, n_r=60, n_works=8, quantise=None):
    rng = np.random.default_rng(seed)
    ql = rng.integers(0, n_works, n_q)
    rl = rng.integers(0, n_works, n_r)
    d = rng.random((n_q, n_r))
    if quantise:  # force many ties
        d = np.round(d * quantise) / quantise
    return d, ql, rl


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantise", [None, 4])
@pytest.mark.parametrize("topk", [None, 5])
def test_metrics_equal_brute_force_loops(seed, quantise, topk):
    d, ql, rl = random_case(seed, quantise=quantise)
    exclude = np.random.default_rng(seed + 100).random(d.shape) < 0.1
    got = retrieval_metrics(d, ql, rl, exclude=exclude, topk=topk)
    ref = brute_force(d, ql, rl, exclude, topk)
    for m in ("mAP", "MR1", "HR1", "HR10", "P@10"):
        assert got[m] == pytest.approx(ref[m], abs=1e-12), m
    stats = per_query_stats(d, ql, rl, exclude=exclude, topk=topk)
    np.testing.assert_allclose(stats["ap"], ref["ap"], atol=1e-12)
    np.testing.assert_array_equal(stats["rank1"], ref["rank1"])


@pytest.mark.parametrize("seed", [3, 4])
def test_per_query_ap_equals_sklearn_average_precision(seed):
    d, ql, rl = random_case(seed, n_q=20, n_r=80, n_works=5)
    ap = per_query_ap(d, ql, rl)
    for i in range(d.shape[0]):
        y = ql[i] == rl
        if not y.any():
            assert ap[i] == 0.0
            continue
        # sklearn ranks by score descending; no ties in continuous random distances
        assert ap[i] == pytest.approx(average_precision_score(y, -d[i]), abs=1e-12)


def test_perfect_ranking_gives_map_1_and_mr1_1():
    labels = np.array([0, 0, 1, 1, 2, 2])
    d = (labels[:, None] != labels[None, :]).astype(float) + 0.01 * np.random.default_rng(0).random((6, 6))
    ex = np.eye(6, dtype=bool)
    m = retrieval_metrics(d, labels, labels, exclude=ex)
    assert m["mAP"] == pytest.approx(1.0)
    assert m["MR1"] == pytest.approx(1.0)
    assert m["HR1"] == pytest.approx(1.0)
    assert m["HR10"] == pytest.approx(1.0)
    assert m["P@10"] == pytest.approx(0.1)  # one relevant ref per query in the top 10


def test_reversed_ranking_puts_the_relevant_ref_last():
    # 1 query, 5 refs, the only relevant ref is the farthest one
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.9]])
    m = retrieval_metrics(d, [7], [1, 2, 3, 4, 7])
    assert m["mAP"] == pytest.approx(1 / 5)
    assert m["MR1"] == 5
    assert m["HR1"] == 0.0


def test_hand_computed_ap_two_relevant_refs():
    # relevant at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    m = retrieval_metrics(d, [1], [0, 1, 0, 1, 0])
    assert m["mAP"] == pytest.approx(0.5)
    assert m["MR1"] == 2
    assert m["P@10"] == pytest.approx(0.2)


def test_ties_keep_column_order():
    d = np.array([[0.5, 0.5, 0.5]])
    # relevant ref is the last of three equal distances -> rank 3
    assert rank_of_first_correct(d, [1], [0, 0, 1])[0] == 3
    assert rank_of_first_correct(d, [1], [1, 0, 0])[0] == 1


def test_negative_and_zero_distances_are_ranked_not_dropped():
    d = np.array([[-2e-16, 0.0, 0.3]])
    m = retrieval_metrics(d, [1], [1, 0, 0])
    assert m["MR1"] == 1 and m["mAP"] == 1.0


def test_exclusion_mask_removes_cells_from_the_ranking():
    d = np.array([[0.0, 0.1, 0.2]])
    labels_r = [5, 0, 5]
    assert retrieval_metrics(d, [5], labels_r)["MR1"] == 1
    ex = np.array([[True, False, False]])
    m = retrieval_metrics(d, [5], labels_r, exclude=ex)
    assert m["MR1"] == 2  # rank among non-excluded refs
    assert m["mAP"] == pytest.approx(0.5)


def test_queries_without_relevant_ref_under_both_policies():
    d = np.array([[0.1, 0.2], [0.1, 0.2]])
    ql = [0, 9]  # query 1 has no relevant ref
    rl = [0, 1]
    orig = retrieval_metrics(d, ql, rl)
    assert orig["n_queries_without_relevant"] == 1
    assert orig["mAP"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert orig["MR1"] == pytest.approx(0.5)  # (1 + 0) / 2: the original's flattering MR1
    assert orig["n_queries_scored"] == 2
    skip = retrieval_metrics(d, ql, rl, no_relevant="skip")
    assert skip["mAP"] == 1.0 and skip["MR1"] == 1.0 and skip["n_queries_scored"] == 1
    ref = brute_force(d, np.array(ql), np.array(rl), no_relevant="skip")
    assert skip["mAP"] == ref["mAP"]


def test_unknown_no_relevant_policy_is_refused():
    with pytest.raises(ConfigError, match="no_relevant"):
        retrieval_metrics(np.zeros((1, 1)), [0], [0], no_relevant="ignore")


def test_nan_distance_is_refused_with_its_position():
    d = np.array([[0.1, np.nan]])
    with pytest.raises(ConfigError, match="ref 1"):
        retrieval_metrics(d, [0], [0, 1])


def test_string_labels_work_like_int_labels():
    d, ql, rl = random_case(5)
    a = retrieval_metrics(d, ql, rl)
    b = retrieval_metrics(d, [f"w{x}" for x in ql], [f"w{x}" for x in rl])
    assert a == b


def test_metrics_on_5000_by_5000_take_under_a_second():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 1000, 5000)
    d = rng.random((5000, 5000)).astype(np.float32)
    ex = np.eye(5000, dtype=bool)
    t = time.perf_counter()
    retrieval_metrics(d, lab, lab, exclude=ex)
    # the brief's budget is 1 s; allow slack for a loaded 2-core CI machine
    assert time.perf_counter() - t < 3.0


def test_per_work_ap_is_sorted_worst_first_and_matches_per_query_means():
    d, ql, rl = random_case(6)
    rows = per_work_ap(d, ql, rl)
    aps = [r["ap"] for r in rows]
    assert aps == sorted(aps)
    ap = per_query_ap(d, ql, rl)
    for r in rows:
        assert r["ap"] == pytest.approx(ap[ql == r["work"]].mean())
        assert r["n_queries"] == int((ql == r["work"]).sum())


def test_most_confused_pairs_are_the_closest_cross_work_pairs():
    labels = np.array([0, 0, 1, 1])
    d = np.array([
        [0.0, 0.1, 0.05, 0.9],
        [0.1, 0.0, 0.8, 0.3],
        [0.05, 0.8, 0.0, 0.2],
        [0.9, 0.3, 0.2, 0.0],
    ])
    pairs = most_confused_pairs(d, labels, k=2)
    assert [(p["query"], p["ref"]) for p in pairs] == [(0, 2), (1, 3)]
    assert pairs[0]["distance"] == pytest.approx(0.05)
    assert all(p["query_label"] != p["ref_label"] for p in pairs)


def test_self_exclusion_mask_excludes_same_perf_and_tempo_copies_of_the_source():
    q = ["a", "b"]
    r = ["a", "sp_0.9-a", "b", "c"]
    plain = self_exclusion_mask(q, r)
    assert plain.tolist() == [[True, False, False, False], [False, False, True, False]]
    with_src = self_exclusion_mask(q, r, ref_sources=[None, "a", None, None])
    assert with_src.tolist() == [[True, True, False, False], [False, False, True, False]]


def test_query_in_ref_file_round_trip_and_out_of_range(tmp_path):
    p = tmp_path / "qir.txt"
    p.write_text(json.dumps({"query_in_ref": [[0, 1], [1, 0]]}) + "\nignored line\n")
    pairs = read_query_in_ref(p)
    assert pairs == [(0, 1), (1, 0)]
    mask = query_in_ref_mask(pairs, 2, 3)
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    with pytest.raises(ManifestError, match="out of range"):
        query_in_ref_mask([(2, 0)], 2, 3)
    bad = tmp_path / "bad.txt"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(ManifestError, match="query_in_ref"):
        read_query_in_ref(bad)


# --------------------------------------------------------------------------------------------
# bootstrap


def clustered_case(seed, n_works, per_work=3, noise=0.6, block=20):
    """Square matrix of a noisy retrieval problem with ``n_works`` works.

    Works come in independent blocks of ``block`` works (cross-block distances are far larger
    than any within-block one), so adding blocks adds queries of the same difficulty.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_works), per_work)
    centres = rng.normal(size=(n_works, 16))
    x = centres[labels] + noise * rng.normal(size=(labels.size, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - x @ x.T
    blk = labels // block
    d = d + 10.0 * (blk[:, None] != blk[None, :])
    return d, labels, np.eye(labels.size, dtype=bool)


def test_bootstrap_ci_contains_the_point_estimate():
    d, lab, ex = clustered_case(0, 40)
    ci = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=500, seed=1)
    point = retrieval_metrics(d, lab, lab, exclude=ex)
    for m in ("mAP", "MR1", "HR1", "HR10", "P@10"):
        assert ci[m]["point"] == pytest.approx(point[m])
        assert ci[m]["low"] <= ci[m]["point"] <= ci[m]["high"], m
    assert ci["mAP"]["std"] > 0 and ci["MR1"]["std"] > 0


def test_bootstrap_ci_shrinks_with_more_works():
    d, lab, ex = clustered_case(1, 20)
    small = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=400)
    d, lab, ex = clustered_case(1, 320)
    large = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=400)
    w_small = small["mAP"]["high"] - small["mAP"]["low"]
    w_large = large["mAP"]["high"] - large["mAP"]["low"]
    assert w_large < 0.6 * w_small  # ~1/sqrt(16) = 0.25 expected


def test_bootstrap_is_reproducible_for_a_seed_and_differs_between_seeds():
    d, lab, ex = clustered_case(2, 30)
    a = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=200, seed=7)
    b = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=200, seed=7)
    c = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=200, seed=8)
    assert a == b
    assert a["mAP"]["mean"] != c["mAP"]["mean"]


def test_bootstrap_replicate_equals_recomputed_metrics_on_resampled_rows():
    # one replicate by hand: draw works, stack their query rows, recompute with the brute force
    d, lab, ex = clustered_case(3, 10)
    works = np.unique(lab)
    rng = np.random.default_rng(99)
    drawn = works[rng.integers(0, works.size, size=works.size)]
    rows = np.concatenate([np.flatnonzero(lab == w) for w in drawn])
    ref = brute_force(d[rows], lab[rows], lab, ex[rows])
    ci = bootstrap_ci(d, lab, lab, exclude=ex, n_boot=1, seed=np.random.default_rng(99))
    assert ci["mAP"]["mean"] == pytest.approx(ref["mAP"])
    assert ci["MR1"]["mean"] == pytest.approx(ref["MR1"])


def test_bootstrap_1000_on_500_queries_is_fast():
    d, lab, ex = clustered_case(4, 125, per_work=4)
    t = time.perf_counter()
    bootstrap_ci(d, lab, lab, exclude=ex, n_boot=1000)
    assert time.perf_counter() - t < 5.0
