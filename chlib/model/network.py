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

Sizes come from :class:`chlib.core.config.ModelConfig`. Weights are initialised from torch's
global RNG: ``torch.manual_seed`` before building for a reproducible start."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from chlib.core.config import ModelConfig
from chlib.core.errors import ConfigError, FeatureError
from chlib.model.conformer import ConformerEncoder
from chlib.model.losses import BatchHardTripletLoss, CenterLoss, FocalLoss
from chlib.model.pooling import AttentiveStatisticsPooling

__all__ = ["CoverHunterNet", "HEAD_PREFIXES", "untrained_model"]

# Parameters whose size depends on the number of classes (not used to compute embeddings).
HEAD_PREFIXES = ("_ce_layer.", "_center_loss.")


class CoverHunterNet(nn.Module):
    """The CoverHunter network (layer stack: the module docstring). ``forward(x: [B, T,
    input_dim]) -> [B, embed_dim]`` float embedding f_t; T >= 7 frames. Works on cpu, cuda and
    mps (float32 only; no float64 anywhere)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg = cfg.validate()
        # Attribute order = the original's state_dict order.
        self._global_cmvn = nn.BatchNorm1d(cfg.input_dim)
        self._encoder = ConformerEncoder(cfg.input_dim, cfg.output_dims, cfg.num_blocks,
                                         cfg.num_heads, cfg.attention_dim, cfg.conv_kernel,
                                         cfg.dropout)
        self._embed_lo: nn.Linear | None = (nn.Linear(cfg.output_dims, cfg.embed_dim)
                                            if cfg.output_dims != cfg.embed_dim else None)
        self._bottleneck = nn.BatchNorm1d(cfg.embed_dim)
        self._bottleneck.bias.requires_grad_(False)  # frozen, as in the original
        self._pool_layer = AttentiveStatisticsPooling(cfg.embed_dim, cfg.embed_dim)
        self._ce_layer = nn.Linear(cfg.embed_dim, cfg.num_classes, bias=False)
        self._foc_loss = FocalLoss(gamma=cfg.foc_gamma)
        self._triplet_loss = BatchHardTripletLoss(margin=cfg.triplet_margin)
        self._center_loss = CenterLoss(cfg.num_classes, cfg.embed_dim)  # always: key must exist

    def forward(self, x: Tensor) -> Tensor:
        """Pooled embedding f_t [B, embed_dim] of features ``x`` [B, T, input_dim]."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.input_dim:
            raise FeatureError(f"model input must be [batch, frames, {self.cfg.input_dim} bins], "
                               f"got {list(x.shape)}: were the features made with n_bins = "
                               "input_dim?")
        h = self._global_cmvn(x.transpose(1, 2)).transpose(1, 2)  # [B, T, F], per-bin BN
        h = self._encoder(h)  # [B, T', output_dims]
        if self._embed_lo is not None:
            h = self._embed_lo(h)  # [B, T', embed_dim]
        return self._pool_layer(h)  # [B, embed_dim]

    def classify(self, f_t: Tensor, *, use_bottleneck: bool = True) -> Tensor:
        """Focal-head logits [B, num_classes] of BN(f_t) (training), or of f_t itself with
        ``use_bottleneck=False`` (the original's ``inference()``)."""
        return self._ce_layer(self._bottleneck(f_t) if use_bottleneck else f_t)

    def loss_from_embedding(self, f_t: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total, detached parts)`` for ``f_t`` [B, embed_dim] and ``labels`` [B]: the focal,
        triplet and center losses by their weights (the original skipped triplet weights <= 0.01;
        here any positive weight counts). Labels must lie in [0, num_classes): training checks
        its data once when it loads it (no per-step host sync, no torch.compile graph break);
        :meth:`check_labels` does it for other callers."""
        labels, cfg = labels.long(), self.cfg
        if labels.dim() != 1 or len(labels) != len(f_t):
            raise ConfigError(f"labels must be [batch={len(f_t)}], got {list(labels.shape)}")
        foc = self._foc_loss(self.classify(f_t), labels)
        total, parts = cfg.foc_weight * foc, {"foc_loss": foc.detach()}
        for name, weight, loss in (("tri_loss", cfg.triplet_weight, self._triplet_loss),
                                   ("cen_loss", cfg.center_weight, self._center_loss)):
            if weight > 0:
                value = loss(f_t, labels)
                total = total + weight * value
                parts[name] = value.detach()
        return total, parts

    def check_labels(self, labels: Tensor) -> None:
        """ConfigError unless every label is in the focal head's [0, num_classes) (one host
        sync; call it once per data set, not per step)."""
        n_classes = self.cfg.num_classes
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ConfigError(f"label {hi if hi >= n_classes else lo} is outside the focal head's "
                              f"[0, {n_classes}) classes: raise foc.output_dims (or set it to "
                              "auto)")

    def compute_loss(self, x: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``forward`` then :meth:`loss_from_embedding`: (total scalar, {"foc_loss", ...})."""
        return self.loss_from_embedding(self(x), labels)

    def _parameters_where(self, head: bool) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if name.startswith(HEAD_PREFIXES) == head)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters sized by the number of classes: ``_ce_layer.weight``, center-loss centers."""
        return self._parameters_where(True)

    def embedding_parameters(self) -> Iterator[nn.Parameter]:
        """All others: embedding path + bottleneck BN (the fact sheet's "2.23 M without head")."""
        return self._parameters_where(False)

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


def untrained_model(model: CoverHunterNet, *, seed: int = 0) -> CoverHunterNet:
    """A :class:`CoverHunterNet` of ``model``'s config, randomly initialised from ``seed`` (the
    global torch generator is left as it was), in eval mode on ``model``'s device: the
    "untrained network" baseline of 05 and 08."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CoverHunterNet(model.cfg)
    return net.to(next(model.parameters()).device).eval()
