"""``CoverHunterNet``: the CoverHunter model, with state_dict keys identical to the original.

Data path (default sizes in brackets)::

    x [B, T, F=96]            CQT frames after mean_size averaging, dB
      _global_cmvn            BatchNorm1d over the F bins (batch stats in train, running in eval)
      _encoder                ConformerEncoder -> [B, T', output_dims=128], T' ~ T / 4
      _embed_lo (optional)    Linear(output_dims -> embed_dim) per frame, only if they differ
      _pool_layer             attentive statistics pooling -> f_t [B, embed_dim=128]
    = forward(x): the retrieval embedding (raw: not normalised, not bottlenecked)

    training branch on f_t:
      _bottleneck             BatchNorm1d(embed_dim), bias frozen -> f_i
      _ce_layer               Linear(embed_dim -> num_classes, no bias) -> logits -> focal loss
      triplet loss, center loss (``_center_loss.centers``) on f_t itself

All sizes come from :class:`chlib.core.config.ModelConfig`. Loss weighting is in
:meth:`CoverHunterNet.loss_from_embedding`. Weights are initialised from torch's global RNG:
seed it (``torch.manual_seed``) before building the model for a reproducible start.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from chlib.core.config import ModelConfig
from chlib.core.errors import ConfigError, FeatureError
from chlib.model.conformer import ConformerEncoder
from chlib.model.losses import BatchHardTripletLoss, CenterLoss, FocalLoss
from chlib.model.pooling import AttentiveStatisticsPooling

__all__ = ["CoverHunterNet", "HEAD_PREFIXES"]

# Parameters whose size depends on the number of classes (not used to compute embeddings).
HEAD_PREFIXES = ("_ce_layer.", "_center_loss.")


class CoverHunterNet(nn.Module):
    """The CoverHunter network (see the module docstring for the layer stack).

    ``forward(x: [B, T, input_dim]) -> [B, embed_dim]`` float embedding f_t; T >= 7 frames.
    Works on cpu, cuda and mps (float32 only; no float64 anywhere).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = cfg.validate()
        self.cfg = cfg
        # Attribute order = the original's state_dict order.
        self._global_cmvn = nn.BatchNorm1d(cfg.input_dim)
        self._encoder = ConformerEncoder(
            input_dim=cfg.input_dim,
            width=cfg.output_dims,
            num_blocks=cfg.num_blocks,
            n_heads=cfg.num_heads,
            ffn_hidden=cfg.attention_dim,
            conv_kernel=cfg.conv_kernel,
            dropout=cfg.dropout,
        )
        self._embed_lo: nn.Linear | None = None
        if cfg.output_dims != cfg.embed_dim:
            self._embed_lo = nn.Linear(cfg.output_dims, cfg.embed_dim)
        self._bottleneck = nn.BatchNorm1d(cfg.embed_dim)
        self._bottleneck.bias.requires_grad_(False)  # frozen, as in the original
        self._pool_layer = AttentiveStatisticsPooling(cfg.embed_dim, cfg.embed_dim)
        self._ce_layer = nn.Linear(cfg.embed_dim, cfg.num_classes, bias=False)
        self._foc_loss = FocalLoss(gamma=cfg.foc_gamma)
        self._triplet_loss = BatchHardTripletLoss(margin=cfg.triplet_margin)
        self._center_loss = CenterLoss(cfg.num_classes, cfg.embed_dim)  # always: key must exist

    # ---- embedding -------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Pooled embedding f_t [B, embed_dim] of features ``x`` [B, T, input_dim]."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.input_dim:
            raise FeatureError(
                f"model input must be [batch, frames, {self.cfg.input_dim} bins], got "
                f"{list(x.shape)}: check that the features were made with n_bins = input_dim"
            )
        h = self._global_cmvn(x.transpose(1, 2)).transpose(1, 2)  # [B, T, F], per-bin BN
        h = self._encoder(h)  # [B, T', output_dims]
        if self._embed_lo is not None:
            h = self._embed_lo(h)  # [B, T', embed_dim]
        return self._pool_layer(h)  # [B, embed_dim]

    # ---- classification head and losses ----------------------------------------------------

    def classify(self, f_t: Tensor, *, use_bottleneck: bool = True) -> Tensor:
        """Focal-head logits [B, num_classes] for embeddings ``f_t`` [B, embed_dim].

        ``use_bottleneck=True`` is the training path (logits of BN(f_t)); ``False`` applies the
        head directly to f_t, as the original's ``inference()`` does.
        """
        return self._ce_layer(self._bottleneck(f_t) if use_bottleneck else f_t)

    def loss_from_embedding(self, f_t: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted training loss for embeddings ``f_t`` [B, embed_dim] and ``labels`` [B].

        total = foc_weight x focal + triplet_weight x triplet (if triplet_weight > 0)
        + center_weight x center (if center_weight > 0).

        Difference from the original: it added the triplet term only for weights **> 0.01**
        (a weight of exactly 0.01 silently disabled it); here any positive weight counts.
        The parts are detached (for logging); back-propagate ``total``.
        """
        labels = labels.long()
        n_classes = self.cfg.num_classes
        if labels.dim() != 1 or len(labels) != len(f_t):
            raise ConfigError(f"labels must be [batch={len(f_t)}], got {list(labels.shape)}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ConfigError(
                f"label {hi if hi >= n_classes else lo} is outside the focal head's "
                f"[0, {n_classes}) classes: raise foc.output_dims (or set it to auto)"
            )
        cfg = self.cfg
        foc = self._foc_loss(self.classify(f_t), labels)
        total = cfg.foc_weight * foc
        parts = {"foc_loss": foc.detach()}
        if cfg.triplet_weight > 0:
            tri = self._triplet_loss(f_t, labels)
            total = total + cfg.triplet_weight * tri
            parts["tri_loss"] = tri.detach()
        if cfg.center_weight > 0:
            cen = self._center_loss(f_t, labels)
            total = total + cfg.center_weight * cen
            parts["cen_loss"] = cen.detach()
        return total, parts

    def compute_loss(self, x: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``forward`` then :meth:`loss_from_embedding`: (total scalar, {"foc_loss", ...})."""
        return self.loss_from_embedding(self(x), labels)

    # ---- parameter groups ------------------------------------------------------------------

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters sized by the number of classes: ``_ce_layer.weight``, center-loss centers."""
        for name, p in self.named_parameters():
            if name.startswith(HEAD_PREFIXES):
                yield p

    def embedding_parameters(self) -> Iterator[nn.Parameter]:
        """All other parameters: the embedding path plus the bottleneck BN (256 at default).

        This is the fact sheet's "2.23 M without head and centers" split.
        """
        for name, p in self.named_parameters():
            if not name.startswith(HEAD_PREFIXES):
                yield p

    def parameter_counts(self) -> dict[str, int]:
        """``{"embedding": n, "head": n, "total": n, "trainable": n}`` (numbers of values)."""
        emb = sum(p.numel() for p in self.embedding_parameters())
        head = sum(p.numel() for p in self.head_parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"embedding": emb, "head": head, "total": emb + head, "trainable": trainable}

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return self._ce_layer.weight.device
