"""Attentive statistics pooling (channel-wise, ECAPA-TDNN style): [B, T', C] -> [B, C_out].

1. global mean m and std s of each channel over time (uniform weights);
2. per frame, the attention input [h_t, m, s] (3C) -> Linear(3C -> C) -> tanh
   -> Conv1d(C -> C, k=1) gives one logit per channel and frame; softmax over time;
3. attention-weighted mean and std of each channel -> [B, 2C];
4. ``_final_layer`` Linear(2C -> C_out, no bias).

Attribute names (``_linear.linear_layer``, ``_conv.conv``, ``_final_layer``) match the original's
state_dict keys. The std is sqrt(max(variance, 1e-12)), as in the original."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AttentiveStatisticsPooling", "weighted_mean_std"]

STD_EPS = 1e-12  # variance floor before the square root


def weighted_mean_std(x: Tensor, weights: Tensor, eps: float = STD_EPS) -> tuple[Tensor, Tensor]:
    """Weighted mean and std over the last axis: ``x`` [B, C, T], ``weights`` [B, C or 1, T]
    summing to 1 over T -> (mean [B, C], std [B, C])."""
    mean = (weights * x).sum(dim=2)  # [B, C]
    var = (weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)  # [B, C]
    return mean, torch.sqrt(var.clamp(min=eps))


def _xavier_in_box(name: str, layer: nn.Linear | nn.Conv1d) -> nn.Module:
    """``layer`` with Xavier-uniform weights, held as ``<box>.<name>`` (the original's keys)."""
    nn.init.xavier_uniform_(layer.weight)
    box = nn.Module()
    box.add_module(name, layer)
    return box


class AttentiveStatisticsPooling(nn.Module):
    """``forward(x [B, T', channels]) -> [B, out_dim]``; all frames are valid (no padding)."""

    def __init__(self, channels: int, out_dim: int) -> None:
        super().__init__()
        self._linear = _xavier_in_box("linear_layer", nn.Linear(3 * channels, channels))
        self._conv = _xavier_in_box("conv", nn.Conv1d(channels, channels, kernel_size=1))
        self._final_layer = nn.Linear(2 * channels, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(1, 2)  # [B, C, T']
        b, c, t = h.shape
        mean, std = weighted_mean_std(h, h.new_full((b, 1, t), 1.0 / t))  # equal weights: [B, C]
        context = torch.cat([h, mean.unsqueeze(2).expand(b, c, t),
                             std.unsqueeze(2).expand(b, c, t)], dim=1)  # [B, 3C, T']
        hidden = torch.tanh(self._linear.linear_layer(context.transpose(1, 2)))  # [B, T', C]
        logits = self._conv.conv(hidden.transpose(1, 2))  # [B, C, T'] per channel and frame
        mean, std = weighted_mean_std(h, torch.softmax(logits, dim=2))  # weights sum to 1 over T'
        return self._final_layer(torch.cat([mean, std], dim=1))  # [B, 2C] -> [B, out_dim]
