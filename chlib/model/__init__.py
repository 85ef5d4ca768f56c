"""The CoverHunter model: Conformer encoder, attentive statistics pooling, ``CoverHunterNet``."""

from __future__ import annotations

from chlib.model.conformer import ConformerEncoder, sinusoid_table, subsampled_length
from chlib.model.network import CoverHunterNet
from chlib.model.pooling import AttentiveStatisticsPooling

__all__ = ["CoverHunterNet", "ConformerEncoder", "AttentiveStatisticsPooling", "subsampled_length",
           "sinusoid_table"]
