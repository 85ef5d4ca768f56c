"""The three training losses of CoverHunter: focal, batch-hard triplet and center loss.

All three take float tensors and compute in float32 (inputs in bf16/fp16 under autocast are
cast up first). Shapes: ``logits`` [B, n_classes], ``embeddings`` [B, D], ``labels`` int64 [B]
with values in [0, n_classes). Each returns a scalar tensor (the batch mean).

What differs from the original is stated in each class docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FocalLoss", "BatchHardTripletLoss", "CenterLoss", "pairwise_euclidean"]

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # ~1.19e-7, the fork's epsilon


class FocalLoss(nn.Module):
    """Focal loss without class weights: mean over the batch of (1 - p_t)^gamma * -log(p_t).

    As in CoverHunterMPS, p = softmax(logits) + eps with eps = float32 machine epsilon
    (~1.19e-7) added to every class probability; this caps a sample's loss at
    -log(eps) ~ 15.9, which shapes training, so it is kept (the original CoverHunter added the
    float64 epsilon, which is lost in float32 arithmetic for ordinary probabilities).

    Differences from the original:

    * ``1 - p_t`` is clamped at 0. With the epsilon, a probability of exactly 1 gives
      ``1 - p_t = -eps``; a non-integer ``gamma`` then turned the loss into NaN. For the default
      gamma = 2 the change is below 1e-13.
    * The original's optional per-class ``alpha`` weights (orig only, read from a counts file)
      are not supported.
    """

    def __init__(self, gamma: float = 2.0, eps: float = FLOAT32_EPS) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.eps = float(eps)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        probs = torch.softmax(logits.float(), dim=-1) + self.eps  # [B, C]
        p_t = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # [B]
        weight = (1.0 - p_t).clamp(min=0.0).pow(self.gamma)  # [B]
        return (weight * -torch.log(p_t)).mean()


def pairwise_euclidean(embeddings: Tensor, zero_eps: float = 1e-16) -> Tensor:
    """Euclidean distances between all rows, [B, D] -> [B, B], via the Gram matrix.

    d^2 = |a|^2 - 2 a.b + |b|^2 clamped at 0. Exact zeros (the diagonal, duplicates) get
    ``zero_eps`` added before the square root and are zeroed again after it, so they stay 0
    with a finite gradient.
    """
    gram = embeddings @ embeddings.t()  # [B, B]
    sq_norm = gram.diagonal()  # [B]
    d2 = (sq_norm.unsqueeze(1) - 2.0 * gram + sq_norm.unsqueeze(0)).clamp(min=0.0)  # [B, B]
    zero = (d2 == 0.0).to(d2.dtype)
    return torch.sqrt(d2 + zero * zero_eps) * (1.0 - zero)


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss on Euclidean distances of the raw (un-normalised) embedding.

    For each anchor i:

    * hardest positive = max over j != i with the same label of d(i, j); other entries count
      as 0 (so an anchor without a positive gets 0);
    * hardest negative = min over j with another label of d(i, j), computed by adding the row's
      largest distance to same-label entries before the min;
    * loss_i = max(0, d_pos - d_neg + margin); the result is the mean over anchors.

    Same as the original, including its edge case: a batch with a single label has no negative,
    and then d_neg is the row maximum plus the smallest same-label distance.
    """

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = pairwise_euclidean(embeddings.float())  # [B, B]
        same = labels.unsqueeze(0) == labels.unsqueeze(1)  # [B, B] bool
        not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive = (same & not_self).to(dist.dtype)
        hardest_pos = (dist * positive).max(dim=1).values  # [B]
        row_max = dist.max(dim=1, keepdim=True).values  # [B, 1]
        hardest_neg = (dist + row_max * same.to(dist.dtype)).min(dim=1).values  # [B]
        return torch.relu(hardest_pos - hardest_neg + self.margin).mean()


class CenterLoss(nn.Module):
    """Center loss: mean over the batch of |f_i - c_{y_i}|^2, with learnable ``centers``.

    ``centers`` [n_classes, dim] is an ordinary parameter (init N(0, 1)), trained by the same
    optimizer as the rest (not the classic moving-average rule), as in the original. The key
    ``_center_loss.centers`` is in every CoverHunter state_dict, even with center loss off.

    Difference from the original: it computes only each sample's distance to its own center
    (the original built the full [B, n_classes] distance matrix, then masked it). The masked
    entries were clamped to 1e-12 before summing, which added a constant (n_classes - 1) x 1e-12
    (3e-8 at 30 000 classes) to the loss and made it cost B x n_classes memory; neither is kept.
    Each sample's distance is still clamped to [1e-12, 1e12], so gradients match the original's.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        diff = embeddings.float() - self.centers[labels.long()].float()  # [B, D]
        d2 = diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12)  # [B]
        return d2.mean()
