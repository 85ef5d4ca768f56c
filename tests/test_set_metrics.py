"""Tests of chlib.retrieval.set_metrics on hand-computed cases (issue 12, part A)."""

from __future__ import annotations

import math

import pytest

from chlib.retrieval import set_metrics as sm
from chlib.retrieval.timeline import Timeline


def seg(a, b, work):
    return {"start_s": a, "end_s": b, "work": work}


# case 1 (100 s): true A 0-40, gap 40-50, B 50-100; predicted A 0-35, unknown 35-55,
# B 55-90, C 90-100. Right: 0-35 (35 s), the gap 40-50 (10 s), 55-90 (35 s) = 80 s.
TRUE1 = [seg(0, 40, "A"), seg(50, 100, "B")]
PRED1 = [seg(0, 35, "A"), seg(35, 55, "unknown"), seg(55, 90, "B"), seg(90, 100, "C")]
# case 2 (90 s): true A 0-30, B 30-60, C 60-90; predicted A 0-28, B 28-90.
# Right: 0-28 and 30-60 = 58 s; boundaries 30 and 60, predicted 28: errors 2 and 32.
TRUE2 = [seg(0, 30, "A"), seg(30, 60, "B"), seg(60, 90, "C")]
PRED2 = [seg(0, 28, "A"), seg(28, 90, "B")]


def test_set_recall():
    assert sm.set_recall(["B", "X", "A", "Y"], ["A", "B", "A"], 2) == 0.5
    assert sm.set_recall(["B", "X", "A", "Y"], ["A", "B", "A"], 3) == 1.0
    assert sm.set_recall(["X"], ["A", "B", "C"], 10) == 0.0
    assert math.isnan(sm.set_recall(["A"], [], 10))


def test_false_work_share():
    assert sm.false_work_share(["A", "X", "X", "Y"], ["A", "B"]) == pytest.approx(2 / 3)
    assert sm.false_work_share([], ["A"]) == 0.0
    assert sm.false_work_share(["A", "B"], ["B", "A"]) == 0.0


def test_time_accuracy_exact_from_endpoints():
    assert sm.time_accuracy(PRED1, TRUE1, 100.0) == pytest.approx(0.80)
    assert sm.time_accuracy(PRED2, TRUE2, 90.0) == pytest.approx(58 / 90)
    assert sm.time_accuracy(TRUE2, TRUE2, 90.0) == 1.0
    # all unknown over case 1: only the 10 s gap is right
    assert sm.time_accuracy([seg(0, 100, "unknown")], TRUE1, 100.0) == pytest.approx(0.10)
    # boundaries off any grid: true A 0-33.3, B 33.3-70; predicted A 0-40.1, B 40.1-70
    assert sm.time_accuracy([seg(0, 40.1, "A"), seg(40.1, 70, "B")],
                            [seg(0, 33.3, "A"), seg(33.3, 70, "B")],
                            70.0) == pytest.approx(1 - 6.8 / 70)


def test_boundary_errors():
    assert sm.boundary_errors(PRED1, TRUE1) == [10.0]  # gap midpoint 45; predicted 35, 55, 90
    assert sm.boundary_errors(PRED2, TRUE2) == [2.0, 32.0]
    # no predicted boundary: the nearer end of the file (40 s from 0, 60 from 100)
    assert sm.boundary_errors([seg(0, 100, "A")], [seg(0, 40, "A"), seg(40, 100, "B")]) == [40.0]
    # equal neighbouring labels are no boundary; unknown vs a work is one
    pred = [seg(0, 20, "A"), seg(20, 50, "A"), seg(50, 100, "unknown")]
    assert sm.boundary_errors(pred, [seg(0, 40, "A"), seg(40, 100, "B")]) == [10.0]
    assert sm.boundary_errors(PRED2, [seg(0, 90, "A")]) == []  # one tune: no boundary


def test_set_report_on_three_hand_computed_sets():
    sets = [
        {"set_id": "s1", "ranking": ["A", "C", "B"], "named_works": ["A", "C"],
         "pred_segments": PRED1, "true_segments": TRUE1, "duration_s": 100.0},
        {"set_id": "s2", "ranking": ["A", "B"], "named_works": ["A", "B"],
         "pred_segments": [seg(0, 50, "A"), seg(50, 100, "B")],
         "true_segments": [seg(0, 50, "A"), seg(50, 100, "B")], "duration_s": 100.0},
        {"set_id": "s3", "ranking": ["A", "B", "X"], "named_works": ["A", "B"],
         "pred_segments": PRED2, "true_segments": TRUE2, "duration_s": 90.0},
    ]
    rep = sm.set_report(sets)
    # per set: recall@n 1/2, 1, 2/3; recall@10 1, 1, 2/3; false share 1/2, 0, 0;
    # time 0.8, 1, 58/90; boundary errors [10], [0], [2, 32] -> median of 0, 2, 10, 32 = 6
    assert rep["n_sets"] == 3
    assert rep["recall_at_n"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert rep["recall_at_10"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert rep["all_in_top10"] == pytest.approx(2 / 3)
    assert rep["false_work_share"] == pytest.approx(1 / 6)
    assert rep["time_accuracy"] == pytest.approx((0.8 + 1 + 58 / 90) / 3)
    assert rep["median_boundary_error_s"] == 6.0
    by = rep["by_n_works"]
    assert list(by.index) == [2, 3]
    assert by.loc[2, "n_sets"] == 2 and by.loc[3, "n_sets"] == 1
    assert by.loc[2, "recall_at_n"] == pytest.approx(0.75)
    assert by.loc[2, "false_work_share"] == pytest.approx(0.25)
    assert by.loc[2, "time_accuracy"] == pytest.approx(0.9)
    assert by.loc[2, "median_boundary_error_s"] == 5.0
    assert by.loc[3, "recall_at_10"] == pytest.approx(2 / 3)
    assert by.loc[3, "all_in_top10"] == 0.0
    assert by.loc[3, "median_boundary_error_s"] == 17.0
    assert list(rep["per_set"]["set_id"]) == ["s1", "s2", "s3"]


def test_from_timeline_and_empty_report():
    t = Timeline([seg(0, 40, "A") | {"p_value": 0.001, "perf": "a1", "mean_z": 5.0},
                  seg(40, 100, "unknown") | {"p_value": math.nan, "perf": None,
                                             "mean_z": 1.0}],
                 100.0, best_z={"A": 6.0, "B": 2.0, "C": 3.0})
    entry = sm.from_timeline(t, TRUE1, set_id="x")
    assert entry["ranking"] == ["A", "C", "B"] and entry["named_works"] == ["A"]
    m = sm.evaluate_set(entry["ranking"], entry["named_works"], entry["pred_segments"],
                        entry["true_segments"], entry["duration_s"])
    assert m["recall_at_n"] == 0.5 and m["recall_at_10"] == 1.0  # B is third
    assert m["time_accuracy"] == pytest.approx(0.5)  # 0-40 A and the gap 40-50
    assert m["boundary_errors"] == [5.0]
    empty = sm.set_report([])
    assert empty["n_sets"] == 0 and math.isnan(empty["time_accuracy"])
