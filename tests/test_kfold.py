"""Tests of chlib.train.kfold: the production LR plan, folds, kill/resume, and the report."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError
from chlib.core.io import append_jsonl, read_json, read_jsonl, write_json
from chlib.core.manifest import read_manifest, source_perf, write_manifest
from chlib.model.checkpoint import list_checkpoints
from chlib.train.kfold import (
    _prepare_data,
    lr_plan,
    production_rows,
    report_production,
    run_production,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from helpers import make_tiny_dataset, tiny_config  # noqa: E402

# --------------------------------------------------------------------------------------------
# learning-rate plan


def test_kfold_lr_plan_descends_log_linearly_from_the_anchor_to_min_lr():
    plan = lr_plan(learning_rate=1e-3, anchor=8e-4, min_lr=1e-5, k=5, final_fold_position=4.5)
    folds = plan["folds"]
    assert len(folds) == 5
    assert folds[0] == 1e-3 and folds[1] == pytest.approx(8e-4)
    ratios = [b / a for a, b in zip(folds[1:], folds[2:], strict=False)]
    assert ratios == pytest.approx([plan["ratio"]] * 3)
    assert folds[-1] * plan["ratio"] == pytest.approx(1e-5)  # a virtual fold k+1 is at min_lr
    assert plan["final"] == pytest.approx(8e-4 * plan["ratio"] ** 2.5)
    assert folds[3] > plan["final"] > folds[4]
    default = lr_plan(learning_rate=1e-3, anchor=8e-4, min_lr=1e-5, k=5)
    assert default["final"] == pytest.approx(8e-4 * plan["ratio"] ** 2.5)  # k - 0.5 = 4.5


def test_kfold_lr_plan_final_lr_stays_between_min_lr_and_anchor():
    # k = 2, default position 1.5: the unclamped formula gives anchor / sqrt(ratio) > anchor
    two = lr_plan(learning_rate=4e-3, anchor=3.6e-3, min_lr=1e-4, k=2)
    assert two["final"] == pytest.approx(3.6e-3)
    far = lr_plan(learning_rate=1e-3, anchor=1e-3, min_lr=1e-5, k=3, final_fold_position=9)
    assert far["final"] == pytest.approx(1e-5)


def test_kfold_lr_plan_needs_positive_min_lr():
    with pytest.raises(ConfigError, match="min_lr"):
        lr_plan(learning_rate=1e-3, anchor=1e-3, min_lr=0.0, k=3)


# --------------------------------------------------------------------------------------------
# folds


def _dataset_with_tempo_copies(tmp_path: Path) -> Path:
    ds = make_tiny_dataset(tmp_path)
    recs = read_manifest(ds / "full.txt")
    copies = [dict(r, perf=f"sp_1.1-{r['perf']}", source_perf=r["perf"]) for r in recs]
    write_manifest(ds / "full.txt", recs + copies)
    return ds


def test_prod_folds_keep_recordings_together_and_leave_out_heldout(tmp_path):
    ds = _dataset_with_tempo_copies(tmp_path)
    hp = HParams.from_dict(tiny_config(ds, k_folds=3))
    prod = tmp_path / "prod"
    data = _prepare_data(prod, hp, ds / "full.txt", ds / "test.txt")
    held = {r["perf"] for r in read_manifest(ds / "test.txt")}
    assert data["removed"] == 2 * len(held)  # each held-out recording and its tempo copy
    vals = [read_manifest(prod / "data" / f"fold_{i}_val.txt") for i in (1, 2, 3)]
    all_val = [source_perf(r) for v in vals for r in v]
    assert sorted(all_val) == sorted(source_perf(r) for r in
                                     read_manifest(prod / "data" / "full_train.txt"))
    assert not set(all_val) & held
    for i, v in enumerate(vals, start=1):
        train = read_manifest(prod / "data" / f"fold_{i}_train.txt")
        assert not {source_perf(r) for r in v} & {source_perf(r) for r in train}
        assert len(train) + len(v) == data["n_records"]
        assert all(Path(r["feat"]).is_absolute() and Path(r["feat"]).is_file() for r in train)
    assert data["num_classes"] == 6

    write_manifest(ds / "full.txt", read_manifest(ds / "full.txt")[:-2])
    with pytest.raises(ConfigError, match="another manifest"):
        _prepare_data(prod, hp, ds / "full.txt", ds / "test.txt")


def test_prod_val_loss_mode_without_heldout_set_is_refused(tmp_path):
    ds = make_tiny_dataset(tmp_path)
    hp = HParams.from_dict(tiny_config(ds, k_folds=3))
    with pytest.raises(ConfigError, match="held-out"):
        run_production(tmp_path / "prod", hp=hp, full_manifest=ds / "full.txt", progress=False)


# --------------------------------------------------------------------------------------------
# report


def _log(run_dir: Path, epoch: int, t: float, maps: dict[str, float]) -> None:
    for name, m in maps.items():
        append_jsonl(run_dir / "metrics.jsonl", {"kind": "test", "epoch": epoch, "testset": name,
                                                 "mAP": m, "time": t})


def test_prod_report_ranks_per_test_set_and_by_average(tmp_path):
    prod = tmp_path / "prod"
    _log(prod / "fold_1", 0, 1000.0, {"alpha": 0.30, "beta": 0.50})
    _log(prod / "fold_1", 1, 1100.0, {"alpha": 0.40})  # beta not evaluated: no average
    _log(prod / "fold_2", 0, 1200.0, {"alpha": 0.35, "beta": 0.60})
    _log(prod / "final", 0, 1300.0, {"alpha": 0.50, "beta": 0.20})
    _log(prod / "final", 1, 4661.0, {"alpha": 0.45, "beta": 0.45})
    rows = production_rows(prod)
    assert [(r["run"], r["epoch"]) for r in rows] == [
        ("fold_1", 0), ("fold_1", 1), ("fold_2", 0), ("final", 0), ("final", 1)]
    assert rows[1]["average"] is None
    assert rows[2]["average"] == pytest.approx(0.475)
    assert rows[4]["elapsed_s"] == pytest.approx(3661.0)
    text = report_production(prod, top=2)
    alpha = text.split("test set 'alpha'")[1].splitlines()[1:3]
    assert "final" in alpha[0] and "0.5000" in alpha[0] and "0.4500" in alpha[1]
    avg = text.split("by average mAP")[1].splitlines()[1:3]
    assert "fold_2" in avg[0] and "0.4750" in avg[0]
    assert "final" in avg[1] and "0.4500" in avg[1] and "01:01:01" in avg[1]
    assert "best average: fold_2 epoch 0: alpha 0.3500, beta 0.6000" in text


# --------------------------------------------------------------------------------------------
# a real 3-fold production run: killed (SIGKILL) mid-fold and after the last fold, resumed

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from chlib.train.kfold import run_production

    prod_dir, hp_path, ds, mode = sys.argv[1:5]
    current = {"fold": None}

    def on_event(name, info):
        if name == "fold_start":
            current["fold"] = info["fold"]
        if mode == "after_folds" and name == "folds_done":
            os.kill(os.getpid(), signal.SIGKILL)

    def cb(rec):
        if mode == "mid_fold2" and current["fold"] == 2 and rec["epoch"] == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    run_production(prod_dir, hp=hp_path, dataset_dir=ds, device="cpu", progress=False,
                   callbacks=[cb], on_event=on_event)
""")


def _run_killed(tmp_path: Path, prod: Path, hp_path: Path, ds: Path, mode: str) -> None:
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), str(prod), str(hp_path), str(ds), mode],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _epochs(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]


@pytest.mark.slow
def test_prod_3_folds_killed_and_resumed_complete_with_a_report(tmp_path):
    ds = make_tiny_dataset(tmp_path)
    hp = HParams.from_dict(tiny_config(ds, k_folds=3, max_epochs=2, early_stopping_patience=5,
                                       final_early_stopping_patience=5, fold_lr_decay=0.5))
    hp_path = tmp_path / "prod.yaml"
    save_hparams(hp, hp_path)
    prod = tmp_path / "prod"

    _run_killed(tmp_path, prod, hp_path, ds, "mid_fold2")
    state = read_json(prod / "state.json")
    assert state["folds"]["1"]["status"] == "done" and state["folds"]["2"]["status"] == "started"
    anchor, ratio = state["anchor"], state["ratio"]
    assert anchor > 0 and ratio == pytest.approx((hp.min_lr / anchor) ** 0.5)

    _run_killed(tmp_path, prod, hp_path, ds, "after_folds")
    state = read_json(prod / "state.json")
    assert [state["folds"][k]["status"] for k in "123"] == ["done"] * 3
    assert state["final"] is None
    assert (state["anchor"], state["ratio"]) == (anchor, ratio)  # persisted (bug 13.5.2)

    res = run_production(prod, hp=hp_path, dataset_dir=ds, device="cpu", progress=False)
    assert res.complete
    assert [f["status"] for f in res.folds] == ["done"] * 3
    assert res.final["status"] == "done"
    assert res.best_checkpoint is not None and res.best_checkpoint.is_file()
    # each fold ran its epochs exactly once; fold 2 resumed after its epoch 0
    for name in ("fold_1", "fold_2", "fold_3", "final"):
        assert _epochs(prod / name) == [0, 1], name
    # LR strategy: fold 2 at the anchor, fold 3 one ratio lower, final at position k - 0.5
    assert res.folds[1]["start_lr"] == pytest.approx(anchor)
    assert res.folds[2]["start_lr"] == pytest.approx(anchor * ratio)
    assert res.final["start_lr"] == pytest.approx(anchor * ratio ** 0.5)
    lr2 = [r["lr"] for r in read_jsonl(prod / "fold_2" / "metrics.jsonl") if r["kind"] == "train"]
    assert lr2[0] == pytest.approx(anchor)
    # folds 2, 3 and the final run start from a previous best checkpoint (val_loss: the chain)
    assert res.folds[1]["init_from"] == {"run": "fold_1", "epoch": res.folds[0]["best_epoch"],
                                         "value": res.folds[0]["best_value"],
                                         "metric": "val_loss"}
    assert res.final["init_from"]["run"] == "fold_3"
    # each fold's best is judged on its own val set: fold bests are that fold's val losses
    for f in res.folds:
        val = {r["epoch"]: r["foc_loss"] for r in
               read_jsonl(prod / f"fold_{f['fold']}" / "metrics.jsonl") if r["kind"] == "val"}
        assert f["best_value"] == pytest.approx(min(val.values()))
    # finished folds keep only their best checkpoint
    for f in res.folds:
        assert list(list_checkpoints(prod / f"fold_{f['fold']}" / "checkpoints")) == \
            [f["best_epoch"]]
    text = (prod / "report.txt").read_text()
    assert "test set 'tiny'" in text and "by average mAP over tiny" in text
    assert res.report.strip() == text.strip()

    # the kills changed nothing: an uninterrupted run gives the same bests, bit for bit
    ref = run_production(tmp_path / "ref", hp=hp_path, dataset_dir=ds, device="cpu",
                         progress=False)
    assert [(f["best_epoch"], f["best_value"]) for f in ref.folds + [ref.final]] == \
        [(f["best_epoch"], f["best_value"]) for f in res.folds + [res.final]]

    # done: a further call trains nothing
    before = {n: (prod / n / "metrics.jsonl").read_text() for n in ("fold_3", "final")}
    again = run_production(prod, dataset_dir=ds, device="cpu", progress=False)
    assert again.complete and again.best_checkpoint == res.best_checkpoint
    assert {n: (prod / n / "metrics.jsonl").read_text() for n in before} == before
    # other settings under the same production folder are refused
    with pytest.raises(ConfigError, match="learning_rate"):
        run_production(prod, hp=hp.updated({"learning_rate": 0.01}), dataset_dir=ds,
                       progress=False)
    assert math.isfinite(res.final["best_value"])


@pytest.mark.slow
def test_prod_map_mode_restarts_from_the_best_fold_by_map(tmp_path):
    """With early_stop_metric mAP, fold bests are comparable (same test sets): the global best
    is the fold with the highest mAP and later runs start from it."""
    ds = make_tiny_dataset(tmp_path)
    hp = HParams.from_dict(tiny_config(ds, k_folds=2, max_epochs=1, early_stop_metric="mAP",
                                       map_stopping_testsets=["tiny"]))
    prod = tmp_path / "prod"
    res = run_production(prod, hp=hp, dataset_dir=ds, device="cpu", progress=False)
    assert res.complete
    f1, f2 = res.folds
    best = f1 if f1["best_value"] >= f2["best_value"] else f2
    assert res.final["init_from"]["run"] == f"fold_{best['fold']}"
    assert f2["improved_global"] == (f2["best_value"] > f1["best_value"])
    maps = {r["epoch"]: r["mAP"] for r in read_jsonl(prod / "fold_1" / "metrics.jsonl")
            if r["kind"] == "test"}
    assert f1["best_value"] == pytest.approx(max(maps.values()))
    state = read_json(prod / "state.json")
    write_json(prod / "state_copy.json", state)  # the state is plain JSON
