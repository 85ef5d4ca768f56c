"""Issue 11 (tables): short query names in 06, CSV beside the JSON of 05 and 03, per-work views
without unscorable queries and a default test set that can score every query, and the words
that say how the best epoch is chosen."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_config

from chlib.core.config import HParams
from chlib.core.io import append_jsonl
from chlib.retrieval import evaluate
from chlib.retrieval.identify import IdentifyReport
from chlib.train import runs
from chlib.ui import report


def _rows(paths):
    return [{"query": p, "rank": 1, "work": "reel", "p_value": 0.01, "verdict": "possibly related"}
            for p in paths]


def test_displayed_queries_are_file_names_and_the_csv_keeps_the_paths(tmp_path):
    paths = ["/music/box/a/tune.wav", "/music/box/b/tune.wav", "/music/box/c/other.flac"]
    shown = report.file_names(_rows(paths))
    assert [r["query"] for r in shown] == ["a/tune.wav", "b/tune.wav", "other.flac"]
    assert [r["work"] for r in shown] == ["reel"] * 3
    out = IdentifyReport(_rows(paths)).to_csv(tmp_path / "r.csv")
    with open(out, encoding="utf-8") as f:
        assert [r["query"] for r in csv.DictReader(f)] == paths
    assert report.file_names([{"query": None, "x": 1}]) == [{"query": None, "x": 1}]


def _records(works):
    return [{"perf": f"{w}_{i}", "work": w, "work_id": k, "feat": "x"}
            for k, (w, n) in enumerate(works.items()) for i in range(n)]


def _result(name, works, seed=0):
    """A scored test set: recordings of one work share a direction, so they match."""
    recs = _records(works)
    rng = np.random.default_rng(seed)
    base = {w: rng.standard_normal(8) for w in works}
    wins = [(base[r["work"]] + 0.1 * rng.standard_normal(8))[None].astype(np.float32)
            for r in recs]
    spec = evaluate.TestSetSpec(name, Path(f"{name}.txt"), Path(f"{name}.txt"))
    return evaluate.score_testset(name, spec, recs, recs, wins, wins, rule="mean", n_boot=20)


def _evaluation(results):
    return evaluate.Evaluation(run_dir=Path("run"), checkpoint="best", epoch=3, fingerprint="f",
                               results={r.name: r for r in results}, rule="mean")


def test_metrics_csv_beside_metrics_json_holds_the_displayed_table(tmp_path):
    ev = _evaluation([_result("test", {"reel": 2, "jig": 3, "polka": 1})])
    paths = ev.save(tmp_path)
    assert paths["metrics_csv"] == tmp_path / "metrics.csv"
    got = pd.read_csv(paths["metrics_csv"])
    shown = report.metrics_table(ev)
    assert list(got.columns) == list(shown.columns)
    assert got["metric"].tolist() == shown["metric"].tolist()
    np.testing.assert_allclose(got["value"], shown["value"].astype(float))
    assert not list(tmp_path.glob(".*.tmp"))


def test_epoch_csv_beside_metrics_jsonl(tmp_path):
    for epoch, loss in ((0, 2.0), (1, 1.5), (1, 1.4), (2, 1.2)):  # epoch 1 run twice
        append_jsonl(tmp_path / "metrics.jsonl", {"kind": "epoch", "epoch": epoch,
                                                   "val_loss": loss, "mAP/test": loss / 4})
    append_jsonl(tmp_path / "metrics.jsonl", {"kind": "train", "step": 9, "loss": 3.0})
    out = runs.save_epoch_table(tmp_path)
    assert out == tmp_path / "epochs.csv"
    got = pd.read_csv(out, index_col="epoch")
    pd.testing.assert_frame_equal(got, runs.epoch_table(tmp_path), check_dtype=False)
    assert got.loc[1, "val_loss"] == pytest.approx(1.4)


def test_per_work_views_leave_out_queries_without_any_relevant_reference():
    r = _result("test", {"reel": 2, "jig": 3, "solo": 1, "lone": 1})
    assert {row["name"] for row in r.per_work} == {"reel", "jig"}
    assert all(row["mean_rank1"] >= 1 for row in r.per_work)
    title = report.per_work_title(r)
    assert "2 works" in title and "2 of 7 queries" in title and "left out" in title
    fig = report.testset_figure(r, "per_work")
    assert "2 of 7 queries" in fig.axes[0].get_title()
    assert "left out" not in report.per_work_title(_result("u", {"reel": 2, "jig": 2}))


def test_the_default_test_set_is_one_where_every_query_can_be_scored():
    test = _result("test", {"reel": 2, "solo": 1})
    unseen = _result("unseen", {"jig": 2, "polka": 3})
    ev = _evaluation([test, unseen])
    chosen, note = ev.pick()
    assert chosen is unseen and ev.result() is unseen and ev.result("") is unseen
    assert "'test'" in note and "1 of 3 queries" in note and "'unseen'" in note
    assert ev.pick("test") == (test, "")
    lone = _evaluation([test])
    assert lone.pick() == (test, "")  # nothing better: the first


def _hp(**extra):
    return HParams.from_dict(tiny_config(
        **extra, val_unseen={"query_path": "v.txt", "ref_path": "v.txt"},
        test={"query_path": "t.txt", "ref_path": "t.txt"}))


def test_stopping_text_says_what_the_run_does():
    by_map = runs.stopping_text(_hp(early_stop_metric="mAP", map_stopping_testsets=["val_unseen"],
                                    early_stopping_patience=20, val_path="val.txt"))
    assert "highest mAP" in by_map and "val_unseen" in by_map and "20" in by_map
    assert "validation loss" not in by_map
    two = runs.stopping_text(_hp(early_stop_metric="mAP", early_stopping_patience=5,
                                 map_stopping_testsets=["val_unseen", "test"]))
    assert "mean mAP" in two and "'val_unseen', 'test'" in two and "5" in two
    by_loss = runs.stopping_text(_hp(val_path="val.txt", early_stopping_patience=7))
    assert "lowest validation loss" in by_loss and "7" in by_loss and "mAP" not in by_loss
    no_val = runs.stopping_text(_hp())
    assert "training loss" in no_val and "no validation" in no_val
