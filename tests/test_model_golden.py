"""Golden tests: chlib's model reproduces a CoverHunter(MPS) checkpoint's outputs.

The fixture (../shared/fixtures/coverhunter_golden, see its README) holds a checkpoint in the
original on-disk format and the outputs the original model class gives for fixed inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import require_fixture

from chlib.core.config import load_hparams
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import load_generator_state, load_model, load_state_into

pytestmark = pytest.mark.golden

_REPO = Path(__file__).resolve().parents[1]
FIXTURE = (
    Path(os.environ.get("CHLIB_FIXTURES", _REPO.parent / "shared" / "fixtures"))
    / "coverhunter_golden"
)
ATOL = 1e-4  # float32 on CPU, as the fixture's README states


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    require_fixture(FIXTURE)
    with np.load(FIXTURE / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def golden_model(golden) -> CoverHunterNet:
    hp = load_hparams(FIXTURE / "config" / "hparams.yaml")
    raw = torch.load(FIXTURE / "checkpoints" / "g_00000003", map_location="cpu", weights_only=True)
    assert set(raw) == {"generator"}
    model = CoverHunterNet(hp.model)
    model.load_state_dict(raw["generator"], strict=True)
    return model.eval()


def test_golden_state_dict_keys_order_and_shapes_match_original(golden_model):
    expected = json.loads((FIXTURE / "state_dict_shapes.json").read_text())
    ours = {k: list(v.shape) for k, v in golden_model.state_dict().items()}
    assert list(ours) == list(expected)  # same 265 keys in the same order
    assert ours == expected


def test_golden_embeddings_match(golden, golden_model):
    with torch.no_grad():
        embed_a = golden_model(torch.from_numpy(golden["x_a"])).numpy()
        embed_b = golden_model(torch.from_numpy(golden["x_b"])).numpy()
    np.testing.assert_allclose(embed_a, golden["embed_a"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(embed_b, golden["embed_b"], rtol=0, atol=ATOL)


def test_golden_focal_head_logits_match(golden, golden_model):
    with torch.no_grad():
        for name in ("a", "b"):
            f_t = torch.from_numpy(golden[f"embed_{name}"])
            logits = golden_model.classify(f_t, use_bottleneck=False).numpy()
            np.testing.assert_allclose(logits, golden[f"foc_logits_{name}"], rtol=0, atol=ATOL)


def test_golden_losses_match(golden, golden_model):
    with torch.no_grad():
        total, parts = golden_model.compute_loss(
            torch.from_numpy(golden["x_a"]), torch.from_numpy(golden["labels"])
        )
    assert set(parts) == {"foc_loss", "tri_loss", "cen_loss"}
    for key, ref in (("foc_loss", "loss_foc"), ("tri_loss", "loss_tri"), ("cen_loss", "loss_cen")):
        assert float(parts[key]) == pytest.approx(float(golden[ref]), abs=ATOL), key
    assert float(total) == pytest.approx(float(golden["loss_total"]), abs=ATOL)


def _copy_fixture(dst: Path, ckpt_folder: str, *, focal_block: str) -> Path:
    """A run folder with the fixture's checkpoint in ``ckpt_folder`` and its yaml's focal block
    named ``focal_block`` ("foc" for CoverHunterMPS, "ce" for the original)."""
    config = yaml.safe_load((FIXTURE / "config" / "hparams.yaml").read_text())
    config[focal_block] = config.pop("foc")
    (dst / "config").mkdir(parents=True)
    (dst / "config" / "hparams.yaml").write_text(yaml.safe_dump(config))
    (dst / ckpt_folder).mkdir()
    shutil.copy(FIXTURE / "checkpoints" / "g_00000003", dst / ckpt_folder / "g_00000003")
    return dst


@pytest.mark.parametrize(
    ("ckpt_folder", "focal_block"), [("pt_model", "ce"), ("checkpoints", "foc")]
)
def test_golden_load_model_in_original_and_fork_layouts(golden, tmp_path, ckpt_folder, focal_block):
    run = _copy_fixture(tmp_path / "run", ckpt_folder, focal_block=focal_block)
    model, hp, epoch = load_model(run, epoch="latest", device="cpu")
    assert epoch == 3
    assert hp.model.num_classes == 50
    assert not model.training
    with torch.no_grad():
        embed_a = model(torch.from_numpy(golden["x_a"])).numpy()
    np.testing.assert_allclose(embed_a, golden["embed_a"], rtol=0, atol=ATOL)


def test_golden_load_model_sizes_auto_head_from_checkpoint(golden, tmp_path):
    run = _copy_fixture(tmp_path / "run", "checkpoints", focal_block="foc")
    config = yaml.safe_load((run / "config" / "hparams.yaml").read_text())
    config["foc"]["output_dims"] = "auto"
    (run / "config" / "hparams.yaml").write_text(yaml.safe_dump(config))
    model, _, _ = load_model(run, epoch=3, device="cpu")
    assert model.cfg.num_classes == 50
    with torch.no_grad():
        logits = model.classify(torch.from_numpy(golden["embed_b"]), use_bottleneck=False)
    np.testing.assert_allclose(logits.numpy(), golden["foc_logits_b"], rtol=0, atol=ATOL)


def test_golden_checkpoint_round_trips_through_load_state_into(golden_model):
    state = load_generator_state(FIXTURE / "checkpoints" / "g_00000003")
    fresh = CoverHunterNet(golden_model.cfg)
    load_state_into(fresh, state)
    for key, value in golden_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
