"""CoverHunterNet: shapes, sizes, gradients, determinism and configurability."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chlib.core.config import ModelConfig
from chlib.core.errors import ConfigError, FeatureError
from chlib.model import CoverHunterNet, sinusoid_table, subsampled_length
from chlib.model.conformer import RelPositionalEncoding

# A small model for the tests that run many forwards: 2 blocks, width 64.
SMALL = ModelConfig(
    input_dim=24, embed_dim=64, output_dims=64, num_blocks=2, attention_dim=96,
    conv_kernel=7, num_classes=12, center_weight=0.01,
)


def _model(cfg: ModelConfig, seed: int = 0) -> CoverHunterNet:
    torch.manual_seed(seed)
    return CoverHunterNet(cfg)


def _features(batch: int, frames: int, bins: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -80.0 * torch.rand(batch, frames, bins, generator=g)  # dB-like values


def test_default_model_parameter_counts_match_original():
    counts = CoverHunterNet(ModelConfig()).parameter_counts()
    assert counts["total"] == 9_910_976
    assert counts["embedding"] == 2_230_976  # without _ce_layer and the center-loss centers
    assert counts["head"] == 2 * 30_000 * 128
    assert counts["trainable"] == counts["total"] - 128  # the frozen bottleneck bias


def test_default_model_embeds_training_chunk_shape():
    model = _model(ModelConfig()).eval()
    with torch.no_grad():
        out = model(_features(4, 375, 96))
    assert out.shape == (4, 128)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("frames", [7, 8, 15, 100, 375, 2001])
def test_encoder_subsamples_time_by_four(frames):
    model = _model(SMALL).eval()
    x = _features(2, frames, SMALL.input_dim)
    with torch.no_grad():
        h = model._encoder(x)
        emb = model(x)
    assert h.shape == (2, ((frames - 1) // 2 - 1) // 2, SMALL.output_dims)
    assert subsampled_length(frames) == h.shape[1]
    assert emb.shape == (2, SMALL.embed_dim)


def test_subsampled_length_of_original_chunks():
    assert [subsampled_length(t) for t in (1125, 900, 675)] == [280, 224, 168]


def test_positional_table_grows_for_long_inputs_with_same_rows():
    enc = RelPositionalEncoding(16, dropout=0.0, max_len=8)
    x = torch.zeros(1, 30, 16)
    _, pos = enc(x)
    assert pos.shape == (1, 30, 16)
    assert enc.table.shape[0] >= 30
    assert torch.equal(pos[0], sinusoid_table(30, 16))
    assert "table" not in enc.state_dict()  # not a checkpoint entry


def test_model_beyond_table_length_equals_model_with_big_table():
    small_table = _model(SMALL).eval()
    big_table = _model(SMALL).eval()
    small_table._encoder.pos_enc.table = sinusoid_table(5, SMALL.output_dims)
    x = _features(1, 200, SMALL.input_dim)  # 49 subsampled frames > 5 rows
    with torch.no_grad():
        torch.testing.assert_close(small_table(x), big_table(x), rtol=0, atol=0)


def test_every_trainable_parameter_gets_a_gradient():
    cfg = dataclasses.replace(SMALL, output_dims=64, embed_dim=32)  # _embed_lo in the path too
    model = _model(cfg).train()
    labels = torch.tensor([0, 0, 3, 3, 7, 7])
    total, parts = model.compute_loss(_features(6, 120, cfg.input_dim), labels)
    assert set(parts) == {"foc_loss", "tri_loss", "cen_loss"}
    total.backward()
    no_grad = [
        name for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert no_grad == []
    assert not model._bottleneck.bias.requires_grad
    assert model._bottleneck.bias.grad is None


def test_center_loss_term_absent_when_weight_zero_and_total_is_weighted_sum():
    cfg = dataclasses.replace(SMALL, center_weight=0.0, triplet_weight=0.01, foc_weight=0.5)
    model = _model(cfg).eval()
    with torch.no_grad():
        x = _features(4, 60, cfg.input_dim)
        total, parts = model.compute_loss(x, torch.tensor([1, 1, 2, 2]))
    assert set(parts) == {"foc_loss", "tri_loss"}  # weight 0.01 counts here (orig needed > 0.01)
    expected = 0.5 * parts["foc_loss"] + 0.01 * parts["tri_loss"]
    torch.testing.assert_close(total, expected)
    assert "_center_loss.centers" in model.state_dict()


def test_eval_embeddings_are_deterministic_and_batch_independent():
    model = _model(SMALL).eval()
    x = _features(3, 90, SMALL.input_dim)
    with torch.no_grad():
        first, second = model(x), model(x)
        alone = model(x[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-5)


def test_train_mode_uses_dropout_and_batch_statistics():
    model = _model(SMALL)
    x = _features(3, 90, SMALL.input_dim)
    with torch.no_grad():
        model.train()
        train_out = model(x)
        model.eval()
        eval_out = model(x)
    assert not torch.allclose(train_out, eval_out)


def test_embed_lo_projects_when_widths_differ():
    cfg = dataclasses.replace(SMALL, output_dims=64, embed_dim=32)
    model = _model(cfg).eval()
    state = model.state_dict()
    assert state["_embed_lo.weight"].shape == (32, 64)
    assert state["_pool_layer._final_layer.weight"].shape == (32, 64)
    x = _features(2, 60, cfg.input_dim)
    with torch.no_grad():
        before = model(x)
        model._embed_lo.weight.mul_(2.0)
        after = model(x)
    assert before.shape == (2, 32)
    assert not torch.allclose(before, after)  # the projection is on the embedding path
    assert "_embed_lo.weight" not in _model(SMALL).state_dict()


def test_other_sizes_build_and_run():
    cfg = ModelConfig(
        input_dim=48, embed_dim=64, output_dims=64, num_blocks=2, attention_dim=128,
        num_heads=8, conv_kernel=31, num_classes=5,
    )
    model = _model(cfg).eval()
    state = model.state_dict()
    assert state["_encoder.encoders.1.self_attn.pos_bias_u"].shape == (8, 8)
    assert state["_encoder.encoders.0.conv_module.depthwise_conv.weight"].shape == (64, 1, 31)
    assert state["_encoder.embed.out.0.weight"].shape == (64, 64 * subsampled_length(48))
    assert not any(k.startswith("_encoder.encoders.2.") for k in state)
    with torch.no_grad():
        assert model(_features(2, 50, 48)).shape == (2, 64)


def test_bad_inputs_raise_clear_errors():
    model = _model(SMALL).eval()
    with pytest.raises(FeatureError, match="24 bins"):
        model(_features(1, 50, 23))
    with pytest.raises(FeatureError, match="at least 7"):
        model(_features(1, 6, SMALL.input_dim))
    with pytest.raises(ConfigError, match="foc.output_dims"):  # checked once per data set
        model.check_labels(torch.tensor([0, SMALL.num_classes]))
    with pytest.raises(ConfigError, match="outside"):
        model.check_labels(torch.tensor([-1, 0]))
    model.check_labels(torch.tensor([0, SMALL.num_classes - 1]))
    with pytest.raises(ConfigError, match="odd"):
        CoverHunterNet(dataclasses.replace(SMALL, conv_kernel=4))
