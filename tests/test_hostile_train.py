"""Issue 10, config and training side: hostile settings, run folders and checkpoints.

Each test is named after the item of the issue it checks (item1 ... item9)."""

from __future__ import annotations

import typing
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from bad_inputs import (
    write_checkpoint_with_object,
    write_metrics_with_bad_middle_line,
    write_single_work_split,
    write_stale_checkpoint_temps,
)
from helpers import TINY_MODEL, write_toy_dataset

import chlib.core.io as io_mod
from chlib.core import config, schema
from chlib.core.config import (
    HParams,
    PrepConfig,
    load_hparams,
    load_prep_config,
    save_hparams,
)
from chlib.core.errors import CheckpointError, ChlibError, ConfigError
from chlib.model.checkpoint import list_checkpoints, load_generator_state, load_model
from chlib.train.data import prepare_training_data
from chlib.train.kfold import production_rows
from chlib.train.loop import train
from chlib.train.runs import (
    RECIPES_DIR,
    epoch_table,
    make_run_config,
    read_metrics,
    recipe_path,
)
from chlib.train.tune_plan import parse_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n_works=4, n_perfs=2, frames=(30, 40))


def _hp(toy: Path, **over) -> HParams:
    d = {"train_path": str(toy), "val_path": str(toy), "chunk_frame": [15], "mean_size": 2,
         "batch_size": 4, "m_per_class": 2, "num_workers": 0, **TINY_MODEL,
         "foc": {"output_dims": "auto"}, "learning_rate": 0.003, "log_every_steps": 2,
         "max_epochs": 1}
    return HParams.from_dict(schema.deep_merge(d, over))


def _train(run: Path, hp: HParams | None = None, **kw):
    return train(run, hp=hp, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    """A run folder with one finished epoch (config + checkpoints + metrics)."""
    run = tmp_path_factory.mktemp("trained")
    _train(run, _hp(toy))
    return run


# ------------------------------------------------------- item 1: every accepted value runs

BAD_VALUES = [
    ({"log_every_steps": 0}, "log_every_steps"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"adam_b1": 1.5}, "adam_b1"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"warmup_steps": -5}, "warmup_steps"),
    ({"seed": -1}, "seed"),
    ({"fold_lr_decay": 0.0}, "fold_lr_decay"),
    ({"final_early_stopping_patience": 0}, "final_early_stopping_patience"),
    ({"lr_initial_fold2": -0.001}, "lr_initial_fold2"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"encoder": {"dropout": 1.0}}, "encoder.dropout"),
    ({"encoder": {"conv_kernel": 4}}, "encoder.conv_kernel"),
    ({"encoder": {"attention_dim": 0}}, "encoder.attention_dim"),
    ({"foc": {"gamma": -1.0}}, "foc.gamma"),
    ({"spec_augmentation": {"random_erase": {"region_size": [0.5, 2.0]}}}, "region_size"),
    ({"foc": {"weight": 0.0}, "triplet": {"weight": 0.0}}, "loss weights"),
]


@pytest.mark.parametrize(("over", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_item1_values_the_code_cannot_run_are_refused_by_the_config(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        HParams().updated(over)


def test_item1_prep_config_bounds(tmp_path):
    for bad, key in (({"seed": -3}, "seed"), ({"batch_size": 0}, "batch_size"),
                     ({"num_workers": -1}, "num_workers")):
        (tmp_path / "hparams.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=key):
            load_prep_config(tmp_path / "hparams.yaml")


def _numeric_fields(cls: type, prefix: str = ""):
    """(dotted name, field) of each YAML field holding numbers (X | None, lists, tuples too)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        typ = hints[f.name]
        if is_dataclass(typ):
            yield from _numeric_fields(typ, prefix + f.name + ".")
        elif f.metadata.get("key", "") is not None and {typ, *typing.get_args(typ)} & {int, float}:
            yield prefix + f.name, f


@pytest.mark.parametrize("cls", [HParams, PrepConfig, config.TestSetConfig],
                         ids=["HParams", "PrepConfig", "TestSetConfig"])
def test_item1_every_numeric_field_declares_its_bounds(cls):
    unbounded = [name for name, f in _numeric_fields(cls) if f.metadata["rule"] is None]
    assert not unbounded, f"numeric fields without a declared range: {unbounded}"


def test_item1_tune_plan_bounds():
    with pytest.raises(ConfigError, match="max_epochs"):
        parse_plan({"max_epochs": 0})
    with pytest.raises(ConfigError, match="flat_map_slope"):
        parse_plan({"flat_map_slope": -1})


def test_item1_zero_log_every_steps_no_longer_reaches_training(toy, tmp_path):
    with pytest.raises(ConfigError, match="log_every_steps must be >= 1"):
        _train(tmp_path / "r", _hp(toy, log_every_steps=0))
    assert not (tmp_path / "r" / "config" / "hparams.yaml").exists()


# ------------------------------------------------------- item 2: YAML 1.1's "1e-3" is a number


def test_item2_numeric_strings_are_read_as_numbers(tmp_path):
    p = tmp_path / "hparams.yaml"
    p.write_text("learning_rate: 1e-3\nmin_lr: 5E-5\nbatch_size: '64'\nmax_epochs: 1e2\n"
                 "encoder:\n  dropout: 1e-1\nchunk_frame: [150, 1.2e2]\n")
    assert yaml.safe_load(p.read_text())["learning_rate"] == "1e-3"  # what PyYAML gives
    hp = load_hparams(p)
    assert hp.learning_rate == 0.001 and hp.min_lr == 5e-5 and hp.batch_size == 64
    assert hp.max_epochs == 100 and isinstance(hp.max_epochs, int)
    assert hp.model.dropout == 0.1 and hp.chunk_frame == [150, 120]
    (tmp_path / "prep.yaml").write_text("val_data_split: 1e-1\n")
    assert load_prep_config(tmp_path / "prep.yaml").val_data_split == 0.1
    assert parse_plan({"flat_map_slope": "1e-3"}).flat_map_slope == 0.001


def test_item2_non_numeric_strings_are_still_refused(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate must be float, got 'fast'"):
        HParams.from_dict({"learning_rate": "fast"})
    with pytest.raises(ConfigError, match="batch_size must be int, got '1.5'"):
        HParams.from_dict({"batch_size": "1.5"})
    with pytest.raises(ConfigError, match="warmup must be bool"):
        HParams.from_dict({"warmup": "1"})


# ------------------------------------------------------- item 3: a recipe path that is missing


def test_item3_missing_recipe_file_is_named_as_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for arg in ("recipes/mine.yaml", "mine.yml", str(tmp_path / "sub" / "x")):
        with pytest.raises(ConfigError) as e:
            recipe_path(arg)
        msg = str(e.value)
        assert "does not exist" in msg and str((tmp_path / arg).resolve()) in msg, msg
        assert "unknown recipe" not in msg


def test_item3_unknown_recipe_name_lists_the_built_in_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'lapton'") as e:
        recipe_path("lapton")
    assert all(p.stem in str(e.value) for p in RECIPES_DIR.glob("*.yaml"))
    assert "does not exist" not in str(e.value)


# ------------------------------------------------------- item 4: refuse what cannot learn


def test_item4_zero_patience_is_refused(toy, tmp_path):
    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 1"):
        _hp(toy, early_stopping_patience=0)


def test_item4_a_single_training_work_is_refused_before_training(tmp_path):
    one = write_single_work_split(tmp_path / "one")
    hp = HParams.from_dict({"train_path": str(one), "chunk_frame": [15], "mean_size": 2,
                            "batch_size": 4, "m_per_class": 2, "num_workers": 0, **TINY_MODEL,
                            "foc": {"output_dims": "auto"}, "max_epochs": 1})
    with pytest.raises(ConfigError, match=r"1 work .*at least 2 works"):
        prepare_training_data(hp)
    with pytest.raises(ConfigError, match="at least 2 works"):
        _train(tmp_path / "r", hp)
    assert not list_checkpoints(tmp_path / "r" / "checkpoints")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# ------------------------------------------------------- item 5: a run keeps its real config


def test_item5_other_architecture_is_refused_before_the_config_is_written(toy, trained):
    cfg = trained / "config" / "hparams.yaml"
    before = cfg.read_text()
    with pytest.raises(ConfigError) as e:
        make_run_config(trained, "laptop", {"train_path": str(toy)})
    msg = str(e.value)
    assert "encoder.num_blocks" in msg and "embed_dim" in msg and "new run folder" in msg
    assert "learning_rate" not in msg  # only what the checkpoints depend on
    with pytest.raises(ConfigError, match=r"encoder\.num_blocks 1 -> 2"):
        _train(trained, _hp(toy, encoder={"num_blocks": 2}), max_epochs=2)
    assert cfg.read_text() == before
    load_model(trained, device="cpu")  # 05/06 still load it


def test_item5_resume_with_other_settings_warns_old_to_new(toy, tmp_path):
    run = tmp_path / "r"
    _train(run, _hp(toy))
    with pytest.warns(UserWarning, match=r"learning_rate 0\.003 -> 0\.001") as w:
        _train(run, _hp(toy, learning_rate=0.001, max_epochs=2))
    msg = next(str(x.message) for x in w if "learning_rate" in str(x.message))
    assert "max_epochs 1 -> 2" in msg and str(run) in msg
    with warnings.catch_warnings(record=True) as w:  # the same settings again: silent
        warnings.simplefilter("always")
        assert _train(run, max_epochs=3).epochs_done == 3
    assert not [x for x in w if "->" in str(x.message)]


# ------------------------------------------------------- item 6: stale checkpoint temp files


def test_item6_training_removes_stale_checkpoint_temp_files(toy, tmp_path):
    run = tmp_path / "r"
    stale = write_stale_checkpoint_temps(run / "checkpoints")
    keep = run / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    _train(run, _hp(toy))
    assert not any(p.exists() for p in stale)
    assert keep.read_text() == "mine" and list_checkpoints(run / "checkpoints")


# ------------------------------------------------------- item 7: one training per run folder


def test_item7_a_second_training_of_a_run_folder_is_refused(toy, tmp_path):
    run = tmp_path / "r"
    stale = write_stale_checkpoint_temps(run / "checkpoints")
    with io_mod.folder_lock(run, "training (the first one)"):
        with pytest.raises(ChlibError, match=r"training \(the first one\)"):
            _train(run, _hp(toy))
        with pytest.raises(ChlibError, match=r"training \(the first one\)"):
            make_run_config(run, "laptop", {"train_path": str(toy)})
    assert all(p.exists() for p in stale)  # the holder's temp files are not touched
    assert not (run / "config" / "hparams.yaml").exists()
    assert _train(run, _hp(toy)).epochs_done == 1  # released: trains


# ------------------------------------------------------- item 8: no advice to load unsafely


def test_item8_tampered_checkpoint_gets_our_message(tmp_path):
    p = write_checkpoint_with_object(tmp_path / "checkpoints" / "g_00000000")
    with pytest.raises(CheckpointError) as e:
        load_generator_state(p)
    msg = str(e.value)
    assert str(p) in msg and "holds objects other than tensors" in msg
    assert "not a chlib checkpoint or was tampered with" in msg
    assert "weights_only=False" not in msg and "weights_only" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # torch's text hidden


def test_item8_load_model_of_a_tampered_run(trained, tmp_path):
    run = tmp_path / "run"
    (run / "config").mkdir(parents=True)
    (run / "config" / "hparams.yaml").write_text((trained / "config" / "hparams.yaml").read_text())
    state = load_generator_state(list_checkpoints(trained / "checkpoints")[0])
    write_checkpoint_with_object(run / "checkpoints" / "g_00000000", state)
    with pytest.raises(CheckpointError, match="tampered") as e:
        load_model(run, device="cpu")
    assert "weights_only=False" not in str(e.value)


# ------------------------------------------------------- item 9: metrics readers name the file


def test_item9_a_bad_metrics_line_is_reported_with_the_file(tmp_path):
    run = tmp_path / "run"
    p = write_metrics_with_bad_middle_line(run / "metrics.jsonl")
    for read in (read_metrics, epoch_table):
        with pytest.raises(ValueError) as e:
            read(run)
        assert str(p) in str(e.value) and "line 2" in str(e.value)
    prod = tmp_path / "prod"
    write_metrics_with_bad_middle_line(prod / "fold_1" / "metrics.jsonl")
    with pytest.raises(ValueError, match="fold_1"):
        production_rows(prod)


def test_item9_training_a_run_with_a_bad_metrics_line_stops_before_training(toy, tmp_path):
    run = tmp_path / "run"
    p = write_metrics_with_bad_middle_line(run / "metrics.jsonl")
    with pytest.raises(ValueError, match="line 2") as e:
        _train(run, _hp(toy))
    assert str(p) in str(e.value)
    assert not list_checkpoints(run / "checkpoints")


def test_item2_a_string_number_round_trips_through_save_hparams(tmp_path):
    hp = HParams.from_dict({"learning_rate": "2e-4", **TINY_MODEL})
    save_hparams(hp, tmp_path / "h.yaml")
    assert load_hparams(tmp_path / "h.yaml").to_dict() == hp.to_dict()
