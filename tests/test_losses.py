"""Losses against references written out by hand (float64 NumPy, loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chlib.model.losses import FLOAT32_EPS, BatchHardTripletLoss, CenterLoss, FocalLoss


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- triplet ----------------------------------------------------------------------------------


def _triplet_brute_force(emb: np.ndarray, labels: np.ndarray, margin: float) -> float:
    """Batch-hard triplet loss with explicit loops; every anchor must have a negative."""
    losses = []
    for i in range(len(emb)):
        dist = [float(np.linalg.norm(emb[i] - emb[j])) for j in range(len(emb))]
        positives = [dist[j] for j in range(len(emb)) if j != i and labels[j] == labels[i]]
        negatives = [dist[j] for j in range(len(emb)) if labels[j] != labels[i]]
        d_pos = max(positives) if positives else 0.0
        losses.append(max(0.0, d_pos - min(negatives) + margin))
    return float(np.mean(losses))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.3, 2.0])
def test_triplet_matches_brute_force(seed, margin):
    rng = _rng(seed)
    labels = np.array([0, 0, 0, 4, 4, 7, 7, 7, 9])  # label 9 has no positive
    emb = rng.normal(size=(len(labels), 16)).astype(np.float32)
    got = BatchHardTripletLoss(margin)(torch.from_numpy(emb), torch.from_numpy(labels))
    assert float(got) == pytest.approx(_triplet_brute_force(emb, labels, margin), abs=1e-5)


def test_triplet_is_zero_when_classes_are_far_apart():
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.1]])
    assert float(BatchHardTripletLoss(0.3)(emb, labels)) == 0.0


def test_triplet_gradient_is_finite_with_duplicate_embeddings():
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    loss = BatchHardTripletLoss(0.3)(emb, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()


# ---- focal ------------------------------------------------------------------------------------


def _focal_direct(logits: np.ndarray, labels: np.ndarray, gamma: float) -> float:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True) + FLOAT32_EPS
    p_t = p[np.arange(len(labels)), labels]
    return float(np.mean((1.0 - p_t) ** gamma * -np.log(p_t)))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_focal_matches_direct_formula(gamma):
    rng = _rng(3)
    logits = (3.0 * rng.normal(size=(8, 11))).astype(np.float32)
    labels = rng.integers(0, 11, size=8)
    got = FocalLoss(gamma)(torch.from_numpy(logits), torch.from_numpy(labels))
    assert float(got) == pytest.approx(_focal_direct(logits, labels, gamma), rel=1e-5, abs=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    rng = _rng(4)
    logits = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 5, size=6))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert float(FocalLoss(0.0)(logits, labels)) == pytest.approx(float(ce), abs=1e-5)


def test_focal_is_finite_for_a_certain_prediction_with_fractional_gamma():
    logits = torch.tensor([[200.0, 0.0, 0.0]])  # softmax gives exactly 1.0 in float32
    loss = FocalLoss(gamma=1.5)(logits, torch.tensor([0]))
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


# ---- center -----------------------------------------------------------------------------------


def test_center_loss_matches_direct_formula():
    torch.manual_seed(0)
    loss_fn = CenterLoss(num_classes=6, dim=4)
    rng = _rng(5)
    emb = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 5, 5, 2, 0])
    centers = loss_fn.centers.detach().numpy().astype(np.float64)
    expected = np.mean([np.sum((emb[i] - centers[labels[i]]) ** 2) for i in range(len(emb))])
    got = loss_fn(torch.from_numpy(emb), torch.from_numpy(labels))
    assert got.item() == pytest.approx(float(expected), rel=1e-6)


def test_center_loss_moves_only_the_centers_of_batch_labels():
    loss_fn = CenterLoss(num_classes=6, dim=4)
    emb = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    loss_fn(emb, torch.tensor([1, 1, 4])).backward()
    touched = loss_fn.centers.grad.abs().sum(dim=1) > 0
    assert touched.tolist() == [False, True, False, False, True, False]
