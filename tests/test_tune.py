"""Tests of chlib.train.tune: plans, experiment names, expansion, resumable runs, summaries, plots."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from chlib.core.config import HParams, load_hparams, save_hparams
from chlib.core.errors import ConfigError
from chlib.core.io import append_jsonl, read_json, read_jsonl, write_json
from chlib.train.tune import (
    READING_GUIDE,
    batch_commands,
    expand_plan,
    load_plan,
    ls_slope,
    parse_plan,
    reading,
    run_plan,
    seed_series,
    summarise,
)
from chlib.ui.runner import parse_cli_value
from chlib.ui.tune_figures import plot_tuning_curves, save_tuning_figures

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# plans and names


def test_tune_plan_unknown_key_is_config_error_with_suggestion():
    with pytest.raises(ConfigError, match="factors"):
        parse_plan({"factor": {"learning_rate": [0.001]}})


def test_tune_plan_factor_key_typo_names_the_key():
    with pytest.raises(ConfigError, match="'prob'"):
        parse_plan({"factors": {"spec_augmentation.roll_pitch.probb": [0.0, 0.5]}})


def test_tune_plan_rejects_hp_override_of_a_factor():
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_plan({"factors": {"learning_rate": [0.001]}, "hp_overrides": {"learning_rate": 0.1}})


def test_tune_plan_tuple_factor_needs_values_of_its_arity():
    with pytest.raises(ConfigError, match="2 keys"):
        parse_plan({"factors": {"adam_b1,adam_b2": [[0.9, 0.99, 0.5]]}})


@pytest.mark.parametrize("bad", [
    {"mode": "random"},
    {"seeds": [1, 1]},
    {"seeds": "1"},
    {"max_epochs": 0},
    {"foundation_checkpoint": "g_00000010"},
    {"base": {"recipe": "laptop", "config": "x.yaml"}},
    {"factors": {"learning_rate": 0.001}},
    {"factors": {"learning_rate": [0.001, 0.001]}},
])
def test_tune_plan_bad_values_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_plan(bad)


def test_tune_experiment_names_follow_the_original():
    plan = parse_plan({
        "learning_rates": [0.001],
        "m_per_classes": [4],
        "num_blockss": [3],
        "lr_decays": [0.998],
        "adam_betas": [[0.9, 0.999]],
        "optimizers": ["prodigy"],
        "chunk_frames": [[375, 300, 225]],
        "mean_sizes": [3],
        "spec_augmentations": [{
            "random_erase": {"prob": 0.5, "erase_num": 4, "region_size": [0.25, 0.1]},
            "roll_pitch": {"prob": 0.5, "shift_num": 7, "method": "low_melody"}}],
        "losses": [{"foc": {"output_dims": 10000, "weight": 1.0, "gamma": 2},
                    "triplet": {"margin": 0.3, "weight": 0.1}, "center": {"weight": 0.0}}],
    })
    names = {e.name for e in expand_plan(plan)}
    assert names == {
        "base", "lrate0.001", "m_per_class4", "num_blocks3", "lr_decay0.998",
        "adam_betas0.9_0.999", "optimizer_prodigy", "chunk_frame375_300_225_mean_size3",
        "erase_prob0.5_num4_size0.25_0.1_roll_prob0.5_shift7_low_melody",
        "FOC_dims10000_wt1.0_gamma2_TRIP_marg0.3_wt0.1_CNTR_wt0.0",
    }


def test_tune_original_sweep_keys_map_to_config_overrides():
    plan = parse_plan({"num_blockss": [3], "adam_betas": [[0.85, 0.995]],
                       "chunk_frames": [[250, 200, 150]], "mean_sizes": [2],
                       "m_per_classes": [], "learning_rates": {}})
    over = {e.name: e.overrides for e in expand_plan(plan)}
    assert over["num_blocks3"] == {"encoder": {"num_blocks": 3}}
    assert over["adam_betas0.85_0.995"] == {"adam_b1": 0.85, "adam_b2": 0.995}
    assert over["chunk_frame250_200_150_mean_size2"] == {"chunk_frame": [250, 200, 150],
                                                         "mean_size": 2}
    assert len(over) == 4  # base + 3; the empty sweeps are disabled
    for o in over.values():  # every override is a valid config change
        HParams().updated(o)


def test_tune_one_factor_and_grid_expansion_counts():
    factors = {"learning_rate": [0.001, 0.002], "m_per_class": [2, 4, 8]}
    one = expand_plan(parse_plan({"factors": factors}))
    assert len(one) == 1 + 2 + 3
    assert sum(len(e.settings) == 1 for e in one) == 5  # each varies exactly one factor
    assert len(expand_plan(parse_plan({"factors": factors, "include_base": False}))) == 5
    grid = expand_plan(parse_plan({"factors": factors, "mode": "grid"}))
    assert len(grid) == 6
    assert len({e.name for e in grid}) == 6
    assert {tuple(sorted(e.settings.items())) for e in grid} == {
        (("learning_rate", lr), ("m_per_class", m)) for lr in (0.001, 0.002) for m in (2, 4, 8)}
    three = dict(factors, **{"spec_augmentation.roll_pitch.prob": [0.0, 0.5]})
    assert len(expand_plan(parse_plan({"factors": three, "mode": "grid"}))) == 12


def test_tune_demo_plan_parses():
    plan = load_plan(REPO / "chlib" / "recipes" / "tune_demo.yaml")
    assert plan.seeds and len(plan.seeds) >= 2
    assert len(plan.factors) >= 2


# --------------------------------------------------------------------------------------------
# slopes, readings and summaries from synthetic metrics files


def test_tune_ls_slope_matches_polyfit_over_the_window():
    rng = np.random.default_rng(0)
    x = np.arange(10.0)
    y = 0.3 * x + rng.normal(0, 0.1, 10)
    assert ls_slope(x, y, 4) == pytest.approx(np.polyfit(x[-4:], y[-4:], 1)[0])
    assert ls_slope(x, y, 50) == pytest.approx(np.polyfit(x, y, 1)[0])
    assert math.isnan(ls_slope([3], [1.0], 5))


@pytest.mark.parametrize("m, v, expected", [
    (0.01, -0.05, "still improving"),
    (0.01, 0.0, "still improving"),
    (0.0, -0.05, "still improving"),
    (0.0, 0.0, "converged"),
    (-0.01, 0.05, "overfitting"),
    (0.0, 0.05, "overfitting"),
    (-0.01, 0.0, "degrading"),
    (-0.01, -0.05, "decoupled"),
    (0.01, 0.05, "decoupled"),
    (None, -0.05, "still improving"),
    (None, 0.05, "overfitting"),
    (None, None, "too short"),
])
def test_tune_reading_guide_rules(m, v, expected):
    assert reading(m, v, val_level=1.0) == expected
    assert expected in READING_GUIDE


def test_tune_reading_loss_threshold_is_relative_to_the_loss_level():
    # -0.05 per epoch is 0.5 % of a loss of 10 (flat) but 5 % of a loss of 1 (falling)
    assert reading(0.0, -0.04, val_level=10.0) == "converged"
    assert reading(0.0, -0.04, val_level=1.0) == "still improving"


def _write_run(seed_dir: Path, val: list[float], maps: list[float] | None, *,
               testset: str = "demo", status: str | None = "ok", repeat_epoch: int | None = None):
    seed_dir.mkdir(parents=True, exist_ok=True)
    path = seed_dir / "metrics.jsonl"
    for ep, v in enumerate(val):
        append_jsonl(path, {"kind": "train", "epoch": ep, "step": ep + 1, "total": 9.0})
        append_jsonl(path, {"kind": "val", "epoch": ep, "foc_loss": v, "total": v + 0.5})
        if maps is not None:
            append_jsonl(path, {"kind": "test", "epoch": ep, "testset": testset, "mAP": maps[ep]})
        if ep == repeat_epoch:  # a resumed run logs this epoch again: the last record must win
            append_jsonl(path, {"kind": "val", "epoch": ep, "foc_loss": v})
    if status is not None:
        write_json(seed_dir / "done.json", {"status": status, "error": "TrainingDivergedError: x"})


def _synthetic_tune_dir(root: Path) -> Path:
    exp = root / "experiments"
    ep = np.arange(6)
    # improving: mAP +0.02/epoch, val -0.05/epoch; seeds offset by +-0.01
    for s, off in ((1, -0.01), (2, 0.01)):
        _write_run(exp / "improving" / f"seed_{s}", list(2.0 - 0.05 * ep), list(0.3 + 0.02 * ep + off))
    # converged: flat at 0.30 / 1.5 (rises early, flat over the last 3 epochs)
    for s in (1, 2):
        _write_run(exp / "flat" / f"seed_{s}", [1.8, 1.6, 1.5, 1.5, 1.5, 1.5],
                   [0.1, 0.2, 0.3, 0.3, 0.3, 0.3])
    # within noise of "improving": finals 0.39 and 0.40
    for s, off in ((1, -0.01), (2, 0.0)):
        _write_run(exp / "close" / f"seed_{s}", list(2.0 - 0.05 * ep), list(0.3 + 0.02 * ep + off))
    # overfitting: val rising, mAP falling; a third seed diverged and must not be averaged
    for s in (1, 2):
        _write_run(exp / "overfit" / f"seed_{s}", list(1.0 + 0.1 * ep), list(0.3 - 0.02 * ep))
    _write_run(exp / "overfit" / "seed_3", [float("nan")], None, status="diverged")
    # one seed only, never marked done (as if run elsewhere), logs epoch 2 twice
    _write_run(exp / "single" / "seed_1", list(2.0 - 0.01 * ep), list(0.35 + 0.0 * ep),
               status=None, repeat_epoch=2)
    write_json(root / "plan.json", {"window": 3, "test_name": None, "seeds": [1, 2, 3],
                                    "flat_map_slope": 0.002, "flat_loss_slope": 0.005,
                                    "experiments": [{"name": "flat", "aliases": ["lrate0.001"],
                                                     "settings": {}}]})
    return root


def test_tune_seed_series_last_record_of_an_epoch_wins(tmp_path):
    _write_run(tmp_path / "r", [1.0, 2.0, 3.0], [0.1, 0.2, 0.3], repeat_epoch=None)
    append_jsonl(tmp_path / "r" / "metrics.jsonl", {"kind": "val", "epoch": 1, "foc_loss": 7.0})
    s = seed_series(read_jsonl(tmp_path / "r" / "metrics.jsonl"))
    assert s["val_loss"] == {0: 1.0, 1: 7.0, 2: 3.0}
    assert s["mAP"] == {"demo": {0: 0.1, 1: 0.2, 2: 0.3}}


def test_tune_summary_statistics_slopes_and_readings(tmp_path):
    root = _synthetic_tune_dir(tmp_path)
    summary = summarise(root)
    rows = {r["experiment"]: r for r in summary.rows}
    assert summary.test_name == "demo" and summary.window == 3

    imp = rows["improving"]
    finals = [0.3 + 0.1 - 0.01, 0.3 + 0.1 + 0.01]
    assert imp["mAP_final_mean"] == pytest.approx(np.mean(finals))
    assert imp["mAP_final_std"] == pytest.approx(np.std(finals, ddof=1))
    assert imp["val_loss_final_mean"] == pytest.approx(2.0 - 0.25)
    assert imp["mAP_slope_mean"] == pytest.approx(0.02)
    assert imp["val_slope_mean"] == pytest.approx(-0.05)
    assert imp["mAP_best_epoch_mean"] == pytest.approx(5)
    assert imp["reading"] == "still improving"

    flat = rows["flat"]
    assert flat["mAP_slope_mean"] == pytest.approx(0.0)  # only the last 3 epochs count
    assert flat["reading"] == "converged"
    assert flat["aliases"] == "lrate0.001"
    # planned seeds come from plan.json: seed 3 of "flat" has not begun
    assert (flat["seeds_total"], flat["seeds_ok"]) == (3, 2)
    assert "2/3" in next(line for line in summary.table.splitlines() if line.split()[1] == "flat")
    assert flat["mAP_best_epoch_mean"] == pytest.approx(2)  # first epoch reaching the best

    over = rows["overfit"]
    assert over["reading"] == "overfitting"
    assert over["seeds_ok"] == 2 and over["seeds_diverged"] == 1 and over["seeds_total"] == 3
    assert math.isfinite(over["val_loss_final_mean"])  # the diverged seed's NaN is not averaged
    assert "seed 3 diverged" in over["problems"]

    single = rows["single"]
    assert single["seeds_unmarked"] == 1
    assert math.isnan(single["mAP_final_std"])
    assert single["vs_top"] == "?"

    ranked = [r["experiment"] for r in summary.rows]
    assert ranked == ["improving", "close", "single", "flat", "overfit"]
    assert [r["rank"] for r in summary.rows] == [1, 2, 3, 4, 5]
    assert [r["vs_top"] for r in summary.rows] == ["top", "~top", "?", "below", "below"]
    for name in ranked:
        assert name in summary.table
    assert "1 diverged" in summary.table


def test_tune_summary_files_are_saved(tmp_path):
    root = _synthetic_tune_dir(tmp_path)
    summary = summarise(root)
    data = read_json(root / "summary.json")
    assert [r["experiment"] for r in data["rows"]] == [r["experiment"] for r in summary.rows]
    csv_lines = (root / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,experiment,")
    assert len(csv_lines) == 1 + len(summary.rows)


def test_tune_figures_are_written(tmp_path):
    root = _synthetic_tune_dir(tmp_path)
    summary = summarise(root)
    paths = save_tuning_figures(summary, root)
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_tuning_curves(summary)
    ax_map = fig.axes[0]
    assert len(ax_map.get_lines()) == len(summary.rows)  # one mean line per experiment


# --------------------------------------------------------------------------------------------
# running plans with a stand-in trainer (fast)


def _base_yaml(tmp_path: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    from helpers import make_tiny_dataset, tiny_config

    ds = make_tiny_dataset(tmp_path)
    path = tmp_path / "base.yaml"
    save_hparams(HParams.from_dict(tiny_config(ds)), path)
    return path


def _fake_train(calls: list, *, fail_on: str | None = None, diverge_on: str | None = None):
    """Writes a 3-epoch metrics file whose mAP depends on the run's learning rate and seed."""
    def fn(seed_dir: Path) -> None:
        calls.append(seed_dir)
        hp = load_hparams(seed_dir / "config" / "hparams.yaml")
        if fail_on and fail_on in str(seed_dir):
            raise ValueError("broken features")
        if diverge_on and diverge_on in str(seed_dir):
            from chlib.train.loop import TrainingDivergedError

            raise TrainingDivergedError("loss not finite")
        for ep in range(3):
            append_jsonl(seed_dir / "metrics.jsonl", {"kind": "val", "epoch": ep,
                                                      "foc_loss": 2.0 - 0.1 * ep})
            append_jsonl(seed_dir / "metrics.jsonl", {
                "kind": "test", "epoch": ep, "testset": "tiny",
                "mAP": 100 * hp.learning_rate + 0.01 * ep + 0.001 * hp.seed})
    return fn


def test_tune_run_plan_merges_duplicates_and_skips_finished_runs(tmp_path):
    base = _base_yaml(tmp_path)
    plan = parse_plan({"base": {"config": str(base)},
                       "factors": {"learning_rate": [0.002, 0.004]}, "seeds": [1, 2]})
    calls: list = []
    res = run_plan(plan, tmp_path / "tune", train_fn=_fake_train(calls), progress=False)
    # base has learning_rate 0.002: lrate0.002 is the base again and is not run twice
    assert [e.name for e in res.experiments] == ["base", "lrate0.004"]
    assert res.experiments[0].aliases == ("lrate0.002",)
    assert len(calls) == 4
    assert [c.parent.name for c in calls] == ["base", "lrate0.004", "base", "lrate0.004"]  # seed-major
    hp = load_hparams(tmp_path / "tune" / "experiments" / "lrate0.004" / "seed_2" / "config"
                      / "hparams.yaml")
    assert hp.learning_rate == 0.004 and hp.seed == 2
    rows = {r["experiment"]: r for r in res.summary.rows}
    assert rows["lrate0.004"]["mAP_final_mean"] == pytest.approx(0.4 + 0.02 + 0.0015)

    calls2: list = []
    res2 = run_plan(plan, tmp_path / "tune", train_fn=_fake_train(calls2), progress=False)
    assert calls2 == []
    assert all(r["status"] == "skipped (ok)" for r in res2.runs)


def test_tune_failed_run_is_reported_retried_and_diverged_is_not(tmp_path):
    base = _base_yaml(tmp_path)
    plan = parse_plan({"base": {"config": str(base)},
                       "factors": {"learning_rate": [0.004, 0.008]}, "seeds": [1]})
    calls: list = []
    res = run_plan(plan, tmp_path / "tune", progress=False,
                   train_fn=_fake_train(calls, fail_on="lrate0.004", diverge_on="lrate0.008"))
    status = {r["experiment"]: r["status"] for r in res.runs}
    assert status == {"base": "ok", "lrate0.004": "failed", "lrate0.008": "diverged"}
    assert "broken features" in res.report()
    rows = {r["experiment"]: r for r in res.summary.rows}
    assert rows["lrate0.008"]["reading"] == "diverged"
    assert rows["lrate0.004"]["seeds_failed"] == 1
    calls2: list = []
    run_plan(plan, tmp_path / "tune", progress=False, train_fn=_fake_train(calls2))
    assert [c.parent.name for c in calls2] == ["lrate0.004"]  # failed: retried; diverged: not


def test_tune_max_runs_stops_and_a_later_call_continues(tmp_path):
    base = _base_yaml(tmp_path)
    plan = parse_plan({"base": {"config": str(base)},
                       "factors": {"learning_rate": [0.004, 0.008]}, "seeds": [1]})
    calls: list = []
    res = run_plan(plan, tmp_path / "tune", progress=False, max_runs=2,
                   train_fn=_fake_train(calls))
    assert res.stopped_early and len(calls) == 2
    calls2: list = []
    res2 = run_plan(plan, tmp_path / "tune", progress=False, train_fn=_fake_train(calls2))
    assert len(calls2) == 1 and not res2.stopped_early


def test_tune_changed_settings_under_an_existing_experiment_are_refused(tmp_path):
    base = _base_yaml(tmp_path)
    plan = {"base": {"config": str(base)}, "factors": {"learning_rate": [0.004]}, "seeds": [1]}
    run_plan(parse_plan(plan), tmp_path / "tune", progress=False, train_fn=_fake_train([]))
    plan["hp_overrides"] = {"batch_size": 4}
    with pytest.raises(ConfigError, match="batch_size"):
        run_plan(parse_plan(plan), tmp_path / "tune", progress=False, train_fn=_fake_train([]))


def test_tune_invalid_setting_is_refused_before_any_training(tmp_path):
    base = _base_yaml(tmp_path)  # batch_size 8
    plan = parse_plan({"base": {"config": str(base)}, "factors": {"m_per_class": [2, 3]}})
    calls: list = []
    with pytest.raises(ConfigError, match="m_per_class3"):
        run_plan(plan, tmp_path / "tune", progress=False, train_fn=_fake_train(calls))
    assert calls == []


def test_tune_unknown_test_name_is_refused_before_training(tmp_path):
    base = _base_yaml(tmp_path)
    plan = parse_plan({"base": {"config": str(base)}, "test_name": "covers80"})
    with pytest.raises(ConfigError, match="covers80"):
        run_plan(plan, tmp_path / "tune", progress=False, train_fn=_fake_train([]))


def test_tune_batch_commands_round_trip_overrides(tmp_path):
    plan = parse_plan({"base": {"recipe": "laptop", "overrides": {"batch_size": 16}},
                       "factors": {"learning_rate": [0.004]}, "seeds": [7], "max_epochs": 5})
    cmds = batch_commands(plan, tmp_path / "tune", dataset_dir="datasets/demo")
    assert len(cmds) == 2
    import shlex

    parts = shlex.split(cmds[1])
    assert parts[:5] == ["python", "-m", "chlib", "run", "03_train"]
    assert parts[parts.index("--runs-root") + 1] == str(tmp_path / "tune" / "experiments" /
                                                        "lrate0.004")
    assert parts[parts.index("--run") + 1] == "seed_7"
    over = parse_cli_value(parts[parts.index("overrides") + 1])
    assert over == {"batch_size": 16, "learning_rate": 0.004, "seed": 7, "max_epochs": 5}


# --------------------------------------------------------------------------------------------
# real training (tiny model, tiny data)


@pytest.mark.slow
def test_tune_plan_2_factors_2_values_2_seeds_runs_to_a_summary(tmp_path):
    base = _base_yaml(tmp_path)
    plan = parse_plan({"base": {"config": str(base)}, "mode": "grid",
                       "factors": {"learning_rate": [0.001, 0.003], "m_per_class": [2, 4]},
                       "seeds": [1, 2], "max_epochs": 2, "early_stopping_patience": 2})
    res = run_plan(plan, tmp_path / "tune", device="cpu", progress=False)
    assert [r["status"] for r in res.runs] == ["ok"] * 8, res.report()
    summary = res.summary
    assert len(summary.rows) == 4
    for r in summary.rows:
        assert r["seeds_ok"] == 2
        assert 0.0 < r["mAP_final_mean"] <= 1.0 and math.isfinite(r["mAP_final_std"])
        assert math.isfinite(r["val_loss_final_mean"]) and math.isfinite(r["mAP_slope_mean"])
        assert r["reading"].split(" (")[0] in READING_GUIDE
    for name in ("lrate0.001_m_per_class2", "lrate0.003_m_per_class4"):
        seed_dir = tmp_path / "tune" / "experiments" / name / "seed_2"
        assert read_json(seed_dir / "done.json")["status"] == "ok"
        assert any((seed_dir / "logs").rglob("events.out.tfevents.*"))
        epochs = sorted({r["epoch"] for r in read_jsonl(seed_dir / "metrics.jsonl")
                         if r["kind"] == "epoch"})
        assert epochs == [0, 1]
    # the two seeds of one experiment are different runs
    a = read_jsonl(tmp_path / "tune/experiments/lrate0.001_m_per_class2/seed_1/metrics.jsonl")
    b = read_jsonl(tmp_path / "tune/experiments/lrate0.001_m_per_class2/seed_2/metrics.jsonl")
    assert [r["total"] for r in a if r["kind"] == "train"] != \
        [r["total"] for r in b if r["kind"] == "train"]
    save_tuning_figures(summary, tmp_path / "tune")
    assert (tmp_path / "tune" / "figures" / "tune_curves.png").is_file()


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from chlib.train.tune import load_plan, run_plan

    kill_after = {"exp": sys.argv[3], "epoch": int(sys.argv[4])}

    def cb(rec):
        if rec["experiment"] == kill_after["exp"] and rec["epoch"] == kill_after["epoch"]:
            os.kill(os.getpid(), signal.SIGKILL)

    run_plan(load_plan(sys.argv[1]), sys.argv[2], device="cpu", progress=False, callbacks=[cb])
""")


@pytest.mark.slow
def test_tune_killed_session_resumes_skipping_finished_experiments(tmp_path):
    base = _base_yaml(tmp_path)
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump({
        "base": {"config": str(base)}, "factors": {"learning_rate": [0.004]}, "seeds": [1],
        "max_epochs": 3, "early_stopping_patience": 5}))
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    tune = tmp_path / "tune"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), str(plan_path), str(tune), "lrate0.004",
                           "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    base_dir = tune / "experiments" / "base" / "seed_1"
    half = tune / "experiments" / "lrate0.004" / "seed_1"
    assert read_json(base_dir / "done.json")["status"] == "ok"
    assert not (half / "done.json").exists()
    base_log = (base_dir / "metrics.jsonl").read_text()

    res = run_plan(load_plan(plan_path), tune, device="cpu", progress=False)
    status = {r["experiment"]: r["status"] for r in res.runs}
    assert status == {"base": "skipped (ok)", "lrate0.004": "ok"}
    assert (base_dir / "metrics.jsonl").read_text() == base_log  # not trained again
    epochs = [r["epoch"] for r in read_jsonl(half / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [0, 1, 2]  # epoch 0 was not redone: resumed from its checkpoint
    assert {r["experiment"] for r in res.summary.rows} == {"base", "lrate0.004"}


@pytest.mark.slow
def test_tune_papermill_launch_passes_parameters_and_marks_done(tmp_path):
    """A stand-in 03_train notebook records its parameters and writes metrics."""
    import nbformat

    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), nb_dir / "01_prepare.ipynb")
    params = nbformat.v4.new_code_cell(
        'dataset_dir: str = "datasets/demo"\nrun_dir: str = "runs/x"\nrecipe: str = "laptop"\n'
        'max_epochs: int = 1\noverrides: dict = {}\ndevice: str = "auto"\nseed: int = 0\n')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(textwrap.dedent("""
        import json, pathlib
        d = pathlib.Path(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "params.json").write_text(json.dumps(dict(recipe=recipe, overrides=overrides,
                                                       seed=seed, device=device,
                                                       dataset_dir=dataset_dir)))
        with open(d / "metrics.jsonl", "a") as f:
            for ep in range(2):
                f.write(json.dumps({"kind": "val", "epoch": ep, "foc_loss": 1.0 - 0.1 * ep}) + "\\n")
                f.write(json.dumps({"kind": "test", "epoch": ep, "testset": "t",
                                    "mAP": overrides["learning_rate"] * 100 + 0.01 * ep}) + "\\n")
    """))
    nb = nbformat.v4.new_notebook(cells=[params, body])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nb_dir / "03_train.ipynb")
    base = _base_yaml(tmp_path)
    plan = parse_plan({"base": {"config": str(base)}, "factors": {"learning_rate": [0.004]},
                       "seeds": [3], "include_base": False})
    with pytest.raises(ConfigError, match="dataset_dir"):
        run_plan(plan, tmp_path / "tune", launch="papermill", cwd=tmp_path, progress=False)
    res = run_plan(plan, tmp_path / "tune", launch="papermill", cwd=tmp_path, device="cpu",
                   dataset_dir=str(tmp_path / "tiny"), progress=False)
    assert [r["status"] for r in res.runs] == ["ok"], res.report()
    seed_dir = tmp_path / "tune" / "experiments" / "lrate0.004" / "seed_3"
    got = json.loads((seed_dir / "params.json").read_text())
    assert got["seed"] == 3 and got["device"] == "cpu"
    assert got["dataset_dir"] == str(tmp_path / "tiny")
    assert got["overrides"]["learning_rate"] == 0.004  # the whole resolved config went over
    assert (seed_dir / "notebooks" / "03_train.ipynb").is_file()
    assert res.summary.rows[0]["mAP_final_mean"] == pytest.approx(0.41)


@pytest.mark.slow
def test_tune_notebook_runs_headless_with_production_step(tmp_path):
    from chlib.ui.runner import run_notebooks

    base = _base_yaml(tmp_path)
    plan = {"base": {"config": str(base)}, "factors": {"learning_rate": [0.004]}, "seeds": [1],
            "max_epochs": 1, "early_stopping_patience": 2}
    run_dir = tmp_path / "tune"
    record = run_notebooks(["04_tune"], run_dir=run_dir, cwd=REPO, progress=False, parameters={
        "dataset_dir": str(tmp_path / "tiny"), "plan": plan, "device": "cpu",
        "production_dir": str(tmp_path / "prod"),
        "production_overrides": {"k_folds": 2, "max_epochs": 1}})
    assert record.ok, record.summary()
    assert (run_dir / "figures" / "tune_curves.png").is_file()
    assert {r["experiment"] for r in read_json(run_dir / "summary.json")["rows"]} == \
        {"base", "lrate0.004"}
    state = read_json(tmp_path / "prod" / "state.json")
    assert state["final"]["status"] == "done" and len(state["folds"]) == 2
    executed = json.loads((run_dir / "notebooks" / "04_tune.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"]
                   for o in c.get("outputs", []))
    assert "vs top" in text and "production report" in text
