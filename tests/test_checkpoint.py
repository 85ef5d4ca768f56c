"""Checkpoint files: layout, round trips, strict loading with readable errors, fingerprints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from chlib.core.config import ModelConfig
from chlib.core.errors import CheckpointError
from chlib.core.io import write_json
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import (
    checkpoint_name,
    find_checkpoint_dir,
    latest_epoch,
    list_checkpoints,
    load_generator_state,
    load_model,
    load_state_into,
    load_train_state,
    model_fingerprint,
    save_checkpoint,
)

TINY = ModelConfig(
    input_dim=96, embed_dim=32, output_dims=32, num_blocks=1, attention_dim=48,
    conv_kernel=5, num_classes=20,
)


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> CoverHunterNet:
    torch.manual_seed(seed)
    return CoverHunterNet(cfg)


def _tiny_yaml(focal_block: str = "foc", output_dims: int | str = 20) -> dict:
    return {
        "input_dim": 96,
        "embed_dim": 32,
        "encoder": {"output_dims": 32, "num_blocks": 1, "attention_dim": 48, "conv_kernel": 5},
        focal_block: {"output_dims": output_dims, "weight": 1.0, "gamma": 2},
        "triplet": {"margin": 0.3, "weight": 0.1},
        "center": {"weight": 0.0},
    }


def _run_dir(root: Path, ckpt_folder: str, epochs: list[int], focal_block: str = "foc",
             output_dims: int | str = 20) -> tuple[Path, dict[int, CoverHunterNet]]:
    (root / "config").mkdir(parents=True)
    config = _tiny_yaml(focal_block, output_dims)
    (root / "config" / "hparams.yaml").write_text(yaml.safe_dump(config))
    models = {}
    for epoch in epochs:
        models[epoch] = _model(seed=epoch)
        save_checkpoint(root / ckpt_folder, epoch, model_state=models[epoch].state_dict())
    return root, models


def _x() -> torch.Tensor:
    return torch.rand(2, 40, 96, generator=torch.Generator().manual_seed(7))


# ---- file layout --------------------------------------------------------------------------


def test_save_writes_original_layout_and_round_trips(tmp_path):
    model = _model()
    train_state = {"optim_g": {"state": {}, "param_groups": []}, "steps": 120, "epoch": 12,
                   "early_stopping": {"best_validation_loss": 1.5}}
    g_path = save_checkpoint(tmp_path, 12, model_state=model.state_dict(), train_state=train_state)
    assert g_path == tmp_path / "g_00000012"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["do_00000012", "g_00000012"]

    raw = torch.load(g_path, weights_only=True)
    assert list(raw) == ["generator"]  # exactly what the original tools expect

    fresh = _model(seed=99)
    load_state_into(fresh, load_generator_state(g_path))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert load_train_state(tmp_path / "do_00000012") == train_state


def test_list_checkpoints_includes_epoch_zero_and_ignores_other_files(tmp_path):
    state = _model().state_dict()
    for epoch in (0, 2, 10):
        save_checkpoint(tmp_path, epoch, model_state=state, train_state={"epoch": epoch})
    (tmp_path / ".g_00000011.abc.tmp").write_bytes(b"partial")
    (tmp_path / "g_notanepoch").write_bytes(b"")
    found = list_checkpoints(tmp_path)
    assert found == {0: tmp_path / "g_00000000", 2: tmp_path / "g_00000002",
                     10: tmp_path / "g_00000010"}
    assert list(list_checkpoints(tmp_path, prefix="do_")) == [0, 2, 10]
    assert latest_epoch(tmp_path) == 10
    assert list_checkpoints(tmp_path / "missing") == {}
    assert latest_epoch(tmp_path / "missing") is None


def test_only_an_epoch_zero_checkpoint_is_loaded_as_latest(tmp_path):
    run, models = _run_dir(tmp_path / "run", "checkpoints", [0])
    model, _, epoch = load_model(run, device="cpu")
    assert epoch == 0
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), models[0].eval()(_x()))


def test_checkpoint_name_pads_to_eight_digits():
    assert checkpoint_name(12) == "g_00000012"
    assert checkpoint_name(3, "do_") == "do_00000003"


@pytest.mark.parametrize("folder", ["checkpoints", "pt_model", "prod_checkpoints"])
def test_find_checkpoint_dir_accepts_each_layout(tmp_path, folder):
    save_checkpoint(tmp_path / folder, 1, model_state=_model().state_dict())
    assert find_checkpoint_dir(tmp_path) == tmp_path / folder
    assert find_checkpoint_dir(tmp_path / folder) == tmp_path / folder


def test_find_checkpoint_dir_refuses_ambiguous_or_empty_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no g_"):
        find_checkpoint_dir(tmp_path)
    for folder in ("checkpoints", "pt_model"):
        save_checkpoint(tmp_path / folder, 1, model_state=_model().state_dict())
    with pytest.raises(CheckpointError, match="several"):
        find_checkpoint_dir(tmp_path)


# ---- loading whole models -----------------------------------------------------------------


def test_load_model_original_layout_with_ce_block(tmp_path):
    run, models = _run_dir(tmp_path / "run", "pt_model", [1, 4], focal_block="ce")
    model, hp, epoch = load_model(run, device="cpu")
    assert epoch == 4
    assert hp.model.num_classes == 20
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), models[4].eval()(_x()))


def test_load_model_picks_requested_best_and_auto_epochs(tmp_path):
    run, models = _run_dir(tmp_path / "run", "checkpoints", [1, 2, 3], output_dims="auto")
    model, _, epoch = load_model(run, epoch=2, device="cpu")
    assert epoch == 2
    assert model.cfg.num_classes == 20  # auto: sized from the checkpoint's head
    with pytest.raises(CheckpointError, match="best.json"):
        load_model(run, epoch="best", device="cpu")
    write_json(run / "checkpoints" / "best.json", {"epoch": 1, "mAP": 0.5})
    model, _, epoch = load_model(run, epoch="best", device="cpu")
    assert epoch == 1
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), models[1].eval()(_x()))
    with pytest.raises(CheckpointError, match="available: 1, 2, 3"):
        load_model(run, epoch=7, device="cpu")


def test_load_model_accepts_the_checkpoint_folder_itself(tmp_path):
    run, _ = _run_dir(tmp_path / "run", "checkpoints", [5])
    _, _, epoch = load_model(run / "checkpoints", device="cpu")
    assert epoch == 5


# ---- strict loading -----------------------------------------------------------------------


def test_class_count_mismatch_lists_key_shapes_and_hint():
    state = _model(dataclasses.replace(TINY, num_classes=50)).state_dict()
    target = _model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_state_into(target, state, where="g_00000003")
    msg = str(err.value)
    assert "g_00000003" in msg
    assert "_ce_layer.weight: checkpoint (50, 32), model (20, 32)" in msg
    assert "_center_loss.centers: checkpoint (50, 32), model (20, 32)" in msg
    assert "foc.output_dims differs: checkpoint has 50 classes, config 20" in msg
    for key, value in target.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_block_count_mismatch_lists_every_missing_and_unexpected_key():
    two_blocks = _model(dataclasses.replace(TINY, num_blocks=2))
    extra = [k for k in two_blocks.state_dict() if k.startswith("_encoder.encoders.1.")]
    with pytest.raises(CheckpointError) as err:
        load_state_into(_model(), two_blocks.state_dict())
    msg = str(err.value)
    assert f"unexpected in the checkpoint ({len(extra)})" in msg
    assert all(k in msg for k in extra)
    assert "encoder.num_blocks differs: checkpoint 2, config 1" in msg

    with pytest.raises(CheckpointError) as err:
        load_state_into(two_blocks, _model().state_dict())
    assert f"missing from the checkpoint ({len(extra)})" in str(err.value)


def test_unreadable_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_generator_state(tmp_path / "g_00000001")
    (tmp_path / "g_00000002").write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_generator_state(tmp_path / "g_00000002")
    save_checkpoint(tmp_path, 3, model_state=_model().state_dict(), train_state={"steps": 1})
    with pytest.raises(CheckpointError, match="do_"):
        load_generator_state(tmp_path / "do_00000003")


# ---- fingerprint --------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive_to_one_weight(tmp_path):
    model = _model()
    state = model.state_dict()
    fp = model_fingerprint(state)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(dict(reversed(list(state.items())))) == fp  # key order irrelevant
    save_checkpoint(tmp_path, 0, model_state=state)
    assert model_fingerprint(load_generator_state(tmp_path / "g_00000000")) == fp

    changed = {k: v.clone() for k, v in state.items()}
    changed["_encoder.encoders.0.self_attn.pos_bias_u"][0, 0] += 1e-3
    assert model_fingerprint(changed) != fp
    assert model_fingerprint(_model(seed=1).state_dict()) != fp
