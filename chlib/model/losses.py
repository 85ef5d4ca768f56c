"""The three training losses of CoverHunter: focal, batch-hard triplet and center loss.
All compute in float32 (autocast inputs are cast up). Shapes: ``logits`` [B, n_classes],
``embeddings`` [B, D], ``labels`` int64 [B] in [0, n_classes); each returns the batch mean.
Differences from the original are stated in each class docstring."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FocalLoss", "BatchHardTripletLoss", "CenterLoss", "pairwise_euclidean"]

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # ~1.19e-7, the fork's epsilon


class FocalLoss(nn.Module):
    """Focal loss without class weights: mean over the batch of (1 - p_t)^gamma * -log(p_t).
    As in CoverHunterMPS, p = softmax(logits) + float32 epsilon, which caps a sample's loss at
    -log(eps) ~ 15.9 and so shapes training. Differences: ``1 - p_t`` is clamped at 0 (p_t = 1
    gave ``-eps`` and NaN for a non-integer gamma); the original's per-class ``alpha`` weights
    are not supported."""

    def __init__(self, gamma: float = 2.0, eps: float = FLOAT32_EPS) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.eps = float(eps)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        probs = torch.softmax(logits.float(), dim=-1) + self.eps  # [B, C]
        p_t = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # [B]
        return ((1.0 - p_t).clamp(min=0.0).pow(self.gamma) * -torch.log(p_t)).mean()


def pairwise_euclidean(embeddings: Tensor, zero_eps: float = 1e-16) -> Tensor:
    """Euclidean distances between all rows, [B, D] -> [B, B], via the Gram matrix; d^2 is
    clamped at 0, exact zeros get ``zero_eps`` under the root and are zeroed again after it (so
    they stay 0 with a finite gradient)."""
    gram = embeddings @ embeddings.t()  # [B, B]
    sq_norm = gram.diagonal()  # [B]
    d2 = (sq_norm.unsqueeze(1) - 2.0 * gram + sq_norm.unsqueeze(0)).clamp(min=0.0)  # [B, B]
    zero = (d2 == 0.0).to(d2.dtype)
    return torch.sqrt(d2 + zero * zero_eps) * (1.0 - zero)


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss on Euclidean distances of the raw (un-normalised) embedding.
    Per anchor: max(0, hardest positive - hardest negative + margin), where an anchor without a
    positive gets 0 and the negative min is taken after adding the row maximum to same-label
    entries (as the original, so a single-label batch gets row max + smallest same distance)."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_euclidean(embeddings.float())  # [B, B]
        same = labels.unsqueeze(0) == labels.unsqueeze(1)  # [B, B] bool
        not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        hardest_pos = (dist * (same & not_self).to(dist.dtype)).max(dim=1).values  # [B]
        row_max = dist.max(dim=1, keepdim=True).values  # [B, 1]
        hardest_neg = (dist + row_max * same.to(dist.dtype)).min(dim=1).values  # [B]
        return torch.relu(hardest_pos - hardest_neg + self.margin).mean()


class CenterLoss(nn.Module):
    """Center loss: mean over the batch of |f_i - c_{y_i}|^2, with learnable ``centers``
    [n_classes, dim] (init N(0, 1)), trained by the optimizer, as in the original;
    the key is in every state_dict, even with center loss off. Difference: only each sample's
    own center distance is computed (the original's masked [B, n_classes] matrix added a
    constant (n_classes - 1) x 1e-12); distances are still clamped to [1e-12, 1e12]."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        diff = embeddings.float() - self.centers[labels.long()].float()  # [B, D]
        return diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12).mean()  # [B] -> batch mean
