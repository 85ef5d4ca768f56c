"""The trainer: LR schedule, files it writes, learning, exact resume, kill -9, Ctrl-C,
early stopping and configuration errors. Tiny model, tiny synthetic features, CPU."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, make_tiny_dataset, tiny_config, write_toy_dataset

import chlib.train.loop as T
from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError, FeatureError, ManifestError
from chlib.core.io import read_json
from chlib.core.manifest import FULL_KEYS, read_manifest, write_manifest
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import list_checkpoints, load_generator_state, load_train_state
from chlib.train.data import make_val_loader, prepare_training_data
from chlib.train.loop import (
    EarlyStopping,
    epoch_table,
    lr_at,
    make_run_config,
    read_metrics,
    train,
    validation_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """full.txt of 6 works x 4 recordings, 30-60 frames x 96 bins (absolute feature paths)."""
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n_works=6, n_perfs=4, frames=(30, 60))


def _hp(toy: Path, **over) -> HParams:
    d = {
        "train_path": str(toy), "val_path": str(toy),
        "chunk_frame": [20, 15], "mean_size": 2, "batch_size": 8, "m_per_class": 2,
        "num_workers": 0, **TINY_MODEL, "foc": {"output_dims": "auto"}, "learning_rate": 0.003,
        "log_every_steps": 2, "deterministic": True, "max_epochs": 2,
    }
    d.update(over)
    return HParams.from_dict(d)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# learning-rate schedule


def test_lr_at_reproduces_the_original_per_1000_step_decay():
    hp = HParams()  # learning_rate 0.001, lr_decay 0.9 every 1000 steps, min_lr 1e-4
    assert lr_at(1, 0, hp) == lr_at(999, 0, hp) == pytest.approx(0.001)
    assert lr_at(1000, 0, hp) == pytest.approx(0.0009)
    assert lr_at(2000, 5, hp) == pytest.approx(0.00081)
    assert lr_at(10**6, 0, hp) == pytest.approx(1e-4)  # floored at min_lr


def test_lr_at_warmup_hold_decay_floor_in_epochs():
    hp = HParams.from_dict({"learning_rate": 0.01, "warmup": True, "warmup_steps": 10,
                            "hold_steps": 5, "lr_decay": 0.5, "lr_decay_every": 2,
                            "lr_decay_unit": "epochs", "min_lr": 0.002})
    assert lr_at(1, 0, hp) == pytest.approx(0.001)
    assert lr_at(5, 0, hp) == pytest.approx(0.005)
    assert lr_at(10, 0, hp) == lr_at(15, 3, hp) == pytest.approx(0.01)  # warm-up end, hold
    assert lr_at(16, 1, hp) == pytest.approx(0.01)
    assert lr_at(16, 2, hp) == pytest.approx(0.005)
    assert lr_at(99, 4, hp) == pytest.approx(0.0025)
    assert lr_at(99, 6, hp) == pytest.approx(0.002)  # floor
    # warmup_steps without warmup: true has no effect (as the original's yaml keys)
    off = HParams.from_dict({"learning_rate": 0.01, "warmup": False, "warmup_steps": 10})
    assert lr_at(1, 0, off) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        lr_at(0, 0, hp)


def test_lr_decay_in_steps_counts_after_warmup_and_hold():
    hp = HParams.from_dict({"learning_rate": 1.0, "warmup": True, "warmup_steps": 4,
                            "hold_steps": 6, "lr_decay": 0.5, "lr_decay_every": 10,
                            "min_lr": 0.0})
    assert lr_at(19, 0, hp) == 1.0 and lr_at(20, 0, hp) == 0.5 and lr_at(30, 0, hp) == 0.25


# --------------------------------------------------------------------------------------------
# early stopping bookkeeping


def test_early_stopping_on_val_loss_counts_non_improvements():
    es = EarlyStopping(metric="val_loss", patience=2)
    assert es.update(0, 1.0) and es.update(1, 0.8)
    assert not es.update(2, 0.8)  # equal is not better
    assert not es.should_stop
    assert not es.update(3, 0.9, in_hold=True) and es.counter == 1  # no count during hold
    assert not es.update(4, 0.95) and es.should_stop
    assert es.best_checkpoint_epoch == 1 and es.best_checkpoint_value == 0.8


def test_early_stopping_on_map_uses_the_smoothed_value_for_patience():
    es = EarlyStopping(metric="mAP", patience=2, alpha=0.5)
    assert es.update(0, 0.2)
    assert es.update(1, 0.6)  # smoothed 0.4
    assert not es.update(2, 0.3)  # smoothed 0.35: counter 1, raw not a best
    assert es.smoothed_map == pytest.approx(0.35) and es.counter == 1
    assert not es.update(3, 0.5)  # smoothed 0.425 > 0.4: counter resets, raw best stays 0.6
    assert es.counter == 0 and es.best_checkpoint_epoch == 1
    state = es.state_dict()
    again = EarlyStopping(metric="mAP", patience=2, alpha=0.5)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_early_stopping_on_map_breaks_a_tie_by_the_validation_loss():
    es = EarlyStopping(metric="mAP", patience=5)
    assert es.update(0, 0.9, tie_loss=3.0)
    assert es.update(1, 1.0, tie_loss=2.0)
    assert not es.update(2, 1.0, tie_loss=2.5)  # a tie, but a higher loss
    assert es.update(3, 1.0, tie_loss=0.1)  # a tie with a lower loss: the new best
    assert not es.update(4, 1.0)  # a tie without a loss never replaces it
    assert not es.update(5, 0.99, tie_loss=0.0)  # a lower mAP never does
    assert es.best_checkpoint_epoch == 3
    old = {k: v for k, v in es.state_dict().items() if k != "best_tie_loss"}
    resumed = EarlyStopping(metric="mAP", patience=5)
    resumed.load_state_dict(old)  # a state saved before the tie-break: no tie replaces
    assert not resumed.update(6, 1.0, tie_loss=0.05) and resumed.best_checkpoint_epoch == 3


# --------------------------------------------------------------------------------------------
# a short run: files, logs, learning


@pytest.fixture(scope="module")
def two_epoch_run(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("run2")
    hp = _hp(toy, toy_set={"query_path": str(toy), "ref_path": str(toy)})
    seen = []
    result = train(run, hp=hp, device="cpu", progress=False, callbacks=[seen.append])
    return run, result, seen


def test_two_epochs_write_checkpoints_metrics_and_best(two_epoch_run):
    run, result, seen = two_epoch_run
    assert result.epochs_done == 2 and result.steps == 2 * 2 * 2  # 2 lengths x ceil(6/4) rounds
    assert sorted(list_checkpoints(run / "checkpoints")) == [0, 1]
    assert sorted(list_checkpoints(run / "checkpoints", "do_")) == [0, 1]
    state = load_train_state(run / "checkpoints" / "do_00000001")
    assert {"optim_g", "steps", "epoch", "early_stopping", "chlib"} <= set(state)
    assert state["steps"] == 8 and state["epoch"] == 1 and state["chlib"]["epoch_complete"]
    best = read_json(run / "checkpoints" / "best.json")
    assert best["metric"] == "val_loss" and best["epoch"] == result.best_epoch
    assert best["value"] == pytest.approx(result.best_value)
    assert (run / "config" / "hparams.yaml").is_file()

    kinds = {r["kind"] for r in read_metrics(run)}
    assert kinds == {"train", "val", "test", "epoch", "baseline"}
    (baseline,) = read_metrics(run, "baseline")  # the model-free 2D-FTM, once per run
    assert baseline["method"] == "2D-FTM" and 0.0 <= baseline["scores"]["toy_set"]["mAP"] <= 1.0
    tests = read_metrics(run, "test")
    assert {r["testset"] for r in tests} == {"toy_set"}
    assert all(0.0 <= r["mAP"] <= 1.0 and r["MR1"] >= 1.0 for r in tests)
    table = epoch_table(run)
    assert list(table.index) == [0, 1]
    assert {"train_total", "val_loss", "val_foc_loss", "val_tri_loss", "mAP/toy_set", "lr"} <= set(table.columns)
    assert [r["epoch"] for r in seen] == [0, 1] and "val_loss" in seen[0]


def test_tensorboard_has_the_original_tags(two_epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = two_epoch_run
    (logdir,) = list((run / "logs").iterdir())
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"csi/lr", "csi/foc_loss", "csi/tri_loss", "csi/total", "csi_val/foc_loss",
            "csi_val/tri_loss", "mAP/toy_set", "hit_rate/toy_set"} <= tags
    steps = [e.step for e in acc.Scalars("csi/total")]
    assert steps[0] == 1 and 2 in steps  # step 1 and every log_every_steps


def test_loss_decreases_on_a_learnable_toy_problem(toy, tmp_path):
    hp = _hp(toy, max_epochs=5, log_every_steps=1)
    result = train(tmp_path / "run", hp=hp, device="cpu", progress=False)
    hist = result.history
    assert hist[-1]["train_total"] < 0.6 * hist[0]["train_total"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]


# --------------------------------------------------------------------------------------------
# resume


def test_exact_resume_two_epochs_equal_one_plus_one(toy, tmp_path):
    hp = _hp(toy, spec_augmentation={"random_erase": {"prob": 0.5}, "roll_pitch": {"prob": 0.5}})
    train(tmp_path / "straight", hp=hp, device="cpu", progress=False, max_epochs=2)
    train(tmp_path / "split", hp=hp, device="cpu", progress=False, max_epochs=1)
    again = train(tmp_path / "split", device="cpu", progress=False, max_epochs=2)  # hparams from disk
    assert again.epochs_done == 2 and again.steps == 8
    a = load_generator_state(tmp_path / "straight" / "checkpoints" / "g_00000001")
    b = load_generator_state(tmp_path / "split" / "checkpoints" / "g_00000001")
    assert _same_state(a, b)
    sa = load_train_state(tmp_path / "straight" / "checkpoints" / "do_00000001")
    sb = load_train_state(tmp_path / "split" / "checkpoints" / "do_00000001")
    assert sa["chlib"]["lr"] == sb["chlib"]["lr"] and sa["steps"] == sb["steps"]
    ea, eb = sa["optim_g"]["state"], sb["optim_g"]["state"]
    assert all(torch.equal(ea[k]["exp_avg"], eb[k]["exp_avg"]) for k in ea)


def test_lr_continues_after_resume_instead_of_resetting(toy, tmp_path):
    hp = _hp(toy, lr_decay=0.5, lr_decay_every=1, lr_decay_unit="epochs", min_lr=0.0)
    train(tmp_path / "r", hp=hp, device="cpu", progress=False, max_epochs=2)
    more = train(tmp_path / "r", device="cpu", progress=False, max_epochs=3)
    assert [r["epoch"] for r in more.history] == [2]
    assert more.history[0]["lr"] == pytest.approx(0.003 * 0.25)
    steps = [r["step"] for r in read_metrics(tmp_path / "r", "train")]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # no step counted twice


@pytest.mark.slow
def test_kill_minus_9_then_restart_resumes_and_matches_an_uninterrupted_run(toy, tmp_path):
    hp = _hp(toy, max_epochs=8)
    reference = tmp_path / "reference"
    train(reference, hp=hp, device="cpu", progress=False)
    run = tmp_path / "killed"
    save_hparams(hp, run / "config" / "hparams.yaml")
    # a 0.5 s pause after each epoch (after its checkpoint) leaves time to kill it mid-run
    code = ("import time, torch; torch.set_num_threads(1); from chlib.train.loop import train; "
            "train('killed', device='cpu', progress=False, callbacks=[lambda r: time.sleep(0.5)])")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "g_00000001").exists():
            assert proc.poll() is None, "training process ended before the kill"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = max(list_checkpoints(run / "checkpoints"))
    assert killed_at < 7
    result = train(run, device="cpu", progress=False)
    assert result.epochs_done == 8
    a = load_generator_state(reference / "checkpoints" / "g_00000007")
    b = load_generator_state(run / "checkpoints" / "g_00000007")
    assert _same_state(a, b)


def test_keyboard_interrupt_saves_and_a_later_call_finishes_the_epoch(toy, tmp_path, monkeypatch):
    hp = _hp(toy, max_epochs=2)
    real = T.lr_at

    def interrupting(step, epoch, hp_):
        if step == 7:  # epoch 1, second round (steps 5-6 were its first)
            raise KeyboardInterrupt
        return real(step, epoch, hp_)

    monkeypatch.setattr(T, "lr_at", interrupting)
    result = train(tmp_path / "r", hp=hp, device="cpu", progress=False)
    assert result.interrupted and result.epochs_done == 1 and result.steps == 6
    state = load_train_state(tmp_path / "r" / "checkpoints" / "do_00000001")
    assert not state["chlib"]["epoch_complete"] and state["chlib"]["batch_in_epoch"] == 1
    monkeypatch.setattr(T, "lr_at", real)
    done = train(tmp_path / "r", device="cpu", progress=False)
    assert not done.interrupted and done.epochs_done == 2 and done.steps == 8
    assert load_train_state(tmp_path / "r" / "checkpoints" / "do_00000001")["chlib"]["epoch_complete"]


# --------------------------------------------------------------------------------------------
# stopping rules and failures


def test_early_stopping_stops_the_loop_and_records_the_best_epoch(toy, tmp_path, monkeypatch):
    rising = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    monkeypatch.setattr(T, "validation_loss", lambda *a, **k: {"foc_loss": next(rising), "total": 0.0})
    hp = _hp(toy, max_epochs=6, early_stopping_patience=2)
    result = train(tmp_path / "r", hp=hp, device="cpu", progress=False)
    assert result.stopped_early and result.epochs_done == 3
    assert result.best_epoch == 0 and read_json(tmp_path / "r" / "checkpoints" / "best.json")["epoch"] == 0
    assert 0 in list_checkpoints(tmp_path / "r" / "checkpoints")  # the best epoch is saved
    again = train(tmp_path / "r", device="cpu", progress=False)  # already stopped: no more epochs
    assert again.stopped_early and again.epochs_done == 3 and again.history == []


def test_non_finite_losses_save_and_raise(toy, tmp_path, monkeypatch):
    def nan_loss(self, x, labels):
        return torch.tensor(math.nan, requires_grad=True), {"foc_loss": torch.tensor(math.nan)}

    monkeypatch.setattr(CoverHunterNet, "compute_loss", nan_loss)
    with pytest.raises(T.TrainingDivergedError, match="3 steps in a row"):
        train(tmp_path / "r", hp=_hp(toy), device="cpu", progress=False)
    assert list_checkpoints(tmp_path / "r" / "checkpoints")  # state saved for inspection


def test_config_errors_are_clear(toy, tmp_path):
    with pytest.raises(ConfigError, match="train_path is not set"):
        T.prepare_training_data(HParams())
    with pytest.raises(ConfigError, match="not found"):
        T.prepare_training_data(_hp(toy, train_path=str(tmp_path / "missing.txt")))
    recs = read_manifest(toy, FULL_KEYS)
    broken = tmp_path / "broken.txt"
    write_manifest(broken, recs[:2] + [{**recs[2], "feat": str(tmp_path / "gone.npy")}])
    with pytest.raises(FeatureError, match=r"1 of 3 feature files are missing: .*gone\.npy"):
        T.prepare_training_data(_hp(toy, train_path=str(broken), val_path=None))
    with pytest.raises(ConfigError, match="longer than every training track"):
        T.prepare_training_data(_hp(toy, chunk_frame=[100], mean_size=3))
    with pytest.raises(ConfigError, match="foc.output_dims: auto"):
        T.prepare_training_data(_hp(toy, foc={"output_dims": 3}))
    negative = tmp_path / "negative.txt"  # labels are checked once, when the data is loaded
    write_manifest(negative, recs[:4] + [{**recs[4], "work_id": -1}])
    with pytest.raises(ManifestError, match=r"(?s)negative\.txt.*work_id must be >= 0"):
        T.prepare_training_data(_hp(toy, train_path=str(negative), val_path=None))
    with pytest.raises(ConfigError, match="multiple of m_per_class"):
        _hp(toy, batch_size=6, m_per_class=4)
    with pytest.warns(UserWarning, match="longer than"):
        data = T.prepare_training_data(_hp(toy, chunk_frame=[25], mean_size=2))  # 50 of 30-60 frames
    assert data.num_classes == 6 and data.n_works == 6
    with pytest.raises(ConfigError, match="prodigyopt"):
        try:
            import prodigyopt  # noqa: F401
            pytest.skip("prodigyopt is installed")
        except ImportError:
            train(tmp_path / "p", hp=_hp(toy, optimizer="prodigy"), device="cpu", progress=False)


# --------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("recipe", ["coverhunter", "laptop"])
def test_recipes_load_and_make_run_config_points_at_the_splits(recipe, toy, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    recs = read_manifest(toy, FULL_KEYS)
    write_manifest(ds / "train.txt", [r for r in recs[1:] if r["work_id"] < 4])
    write_manifest(ds / "val.txt", [])
    write_manifest(ds / "test.txt", recs[:1] + [r for r in recs if r["work_id"] >= 4])
    (ds / "test-only-work-ids.txt").write_text("4\n5\n")
    path = make_run_config(tmp_path / "run", recipe, dataset_dir=ds, overrides={"seed": 7})
    hp = T.load_hparams(path)
    assert hp.train_path == str(ds / "train.txt") and hp.val_path is None and hp.seed == 7
    assert set(hp.testsets) == {"test", "unseen"}
    unseen = read_manifest(hp.testsets["unseen"].query_path, FULL_KEYS)
    assert {r["work_id"] for r in unseen} == {4, 5}
    if recipe == "coverhunter":
        assert hp.chunk_frame == [1125, 900, 675] and hp.model.num_classes == 30000
        assert hp.model.num_blocks == 6 and hp.lr_decay == 0.9 and hp.lr_decay_every == 1000
        assert hp.spec_augmentation.random_erase.prob == 0.5
    else:
        assert hp.num_classes_auto
    with pytest.raises(ConfigError, match="unknown recipe"):
        make_run_config(tmp_path / "x", "nonexistent")


def test_make_run_config_without_dataset_writes_the_recipe_as_is(tmp_path):
    path = make_run_config(tmp_path / "run", "coverhunter")
    assert (T.load_hparams(path).to_dict()
            == HParams.from_dict(T.load_recipe("coverhunter")).to_dict())


def test_laptop_recipe_without_held_out_validation_works_falls_back_to_val_loss(tmp_path):
    # the laptop recipe early-stops on the mAP of val_unseen, which needs a dataset with works
    # held out for validation; without one it says so and uses val_loss
    with pytest.warns(UserWarning, match="val_unseen"):
        path = make_run_config(tmp_path / "run", "laptop")
    hp = T.load_hparams(path)
    assert hp.early_stop_metric == "val_loss" and hp.map_stopping_testsets == []
    recipe = T.load_recipe("laptop")
    assert recipe["early_stop_metric"] == "mAP" and recipe["map_stopping_testsets"] == ["val_unseen"]


def test_make_run_config_adds_val_unseen_for_map_stopping_and_falls_back_without_it(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = Path("ds")  # relative, with feature paths relative to the dataset folder (as extract writes)
    recs = [{**r, "feat": str(Path(r["feat"]).relative_to(ds.resolve()))}
            for r in read_manifest(write_toy_dataset(ds), FULL_KEYS)]
    write_manifest(ds / "train.txt", [r for r in recs if r["work_id"] < 4])
    write_manifest(ds / "val.txt", [r for r in recs if r["work_id"] >= 4])
    (ds / "val-only-work-ids.txt").write_text("4\n5\n")
    over = {"early_stop_metric": "mAP", "map_stopping_testsets": ["val_unseen"]}
    hp = T.load_hparams(make_run_config(tmp_path / "a", "laptop", dataset_dir=ds, overrides=over))
    assert hp.early_stop_metric == "mAP" and set(hp.testsets) == {"val_unseen"}
    listed = read_manifest(hp.testsets["val_unseen"].query_path, FULL_KEYS)
    assert len(listed) == 8 and all(Path(r["feat"]).is_file() for r in listed)
    assert T.evaluate_testsets(CoverHunterNet(hp.model_config(6)), hp, torch.device("cpu"))
    (ds / "val-only-work-ids.txt").write_text("")
    with pytest.warns(UserWarning, match="using val_loss instead"):
        path = make_run_config(tmp_path / "b", "laptop", dataset_dir=ds, overrides=over)
    assert T.load_hparams(path).early_stop_metric == "val_loss"


def test_validation_loss_only_scores_works_the_model_is_trained_on():
    from chlib.train.loop import seen_work_records

    train = [{"perf": "a1", "work_id": 0}, {"perf": "b1", "work_id": 1}]
    val = [{"perf": "a2", "work_id": 0}, {"perf": "c1", "work_id": 2}, {"perf": "b2", "work_id": 1}]
    assert [r["perf"] for r in seen_work_records(val, train)] == ["a2", "b2"]
    assert seen_work_records([{"perf": "c1", "work_id": 2}], train) == []


def test_the_validation_bar_draws_from_the_global_rng_as_the_bare_loader_does(tmp_path):
    """Training's random stream must not depend on the validation progress bar (tqdm over a
    DataLoader itself draws otherwise, which once changed every step after the first epoch)."""
    hp = HParams.from_dict(tiny_config(make_tiny_dataset(tmp_path)))
    data = prepare_training_data(hp)
    loader = make_val_loader(data, hp, torch.device("cpu"))
    model = CoverHunterNet(hp.model_config(data.num_classes))
    after = []
    for desc in ("", "epoch 0: validation loss", None):
        torch.manual_seed(0)
        if desc is None:
            for _ in loader:  # the bare loader
                pass
        else:
            validation_loss(model, loader, torch.device("cpu"), desc=desc)
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[2]) and torch.equal(after[1], after[2])
