"""Is the run learning the tunes, or memorising its recordings? Two checks that training runs
and ``03_train`` prints, so nobody mistakes a model at chance for a working one: :func:`memorising`
(the loss fell, held-out mAP did not rise) and :func:`model_free_scores` (the 2D-FTM baseline,
no learning, printed beside the model's mAP at the end of training)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chlib.core.manifest import read_manifest
from chlib.retrieval.scoring import expansion_of, model_free_windows, score_windows

__all__ = ["memorising", "model_free_scores", "LIKELY_CAUSES"]

LIKELY_CAUSES = (
    "versions of a work differ in ways the augmentation does not cover (keys beyond the pitch "
    "shifts, octaves and registers of other instruments: try `input_transform: keyed_chroma`), "
    "too few works (under ~100) or recordings per work for the model to learn what they share, "
    "chunks much longer than the recordings (mostly padding), or a learning rate too high to "
    "settle")


def memorising(epochs: Sequence[Mapping], testsets: Sequence[str], *, min_epochs: int = 5,
               min_rise: float = 0.02, min_loss_drop: float = 0.3) -> str | None:
    """A warning when held-out mAP stayed at its first-epoch level while the loss fell.

    ``epochs``: the run's epoch records (``train_total``, ``mAP/<testset>``) in order;
    ``testsets``: the held-out test sets to watch (works never trained on). It fires after
    ``min_epochs`` epochs when the training loss fell by ``min_loss_drop`` (a fraction) of its
    first value and no watched set's best mAP rose ``min_rise`` above its first value. None
    when the run is learning, or when there is too little to tell.
    """
    if len(epochs) < min_epochs:
        return None
    losses = [float(e["train_total"]) for e in epochs if e.get("train_total") is not None]
    if len(losses) < min_epochs or losses[-1] > (1 - min_loss_drop) * losses[0]:
        return None
    stalled = []
    for name in testsets:
        values = [float(e[f"mAP/{name}"]) for e in epochs if e.get(f"mAP/{name}") is not None]
        if len(values) < min_epochs:
            continue
        if max(values[1:]) - values[0] >= min_rise:
            return None  # one held-out set is improving: learning
        stalled.append(f"{name} {values[0]:.3f} -> best {max(values):.3f}")
    if not stalled:
        return None
    return (f"memorising, not learning: over {len(epochs)} epochs the training loss fell "
            f"{100 * (1 - losses[-1] / losses[0]):.0f} % ({losses[0]:.2f} -> {losses[-1]:.2f}) "
            f"while the mAP of works it never trained on stayed at its first-epoch level "
            f"({'; '.join(stalled)}). Likely causes: {LIKELY_CAUSES}.")


def model_free_scores(hp: Any) -> dict[str, dict[str, float]]:
    """mAP (and HR1, HR10, MR1) of the 2D-FTM baseline on each test set of the run config."""
    out = {}
    for name, ts in hp.testsets.items():
        q_path, r_path = hp.resolve_path(ts.query_path), hp.resolve_path(ts.ref_path)
        q = read_manifest(q_path, required=("perf", "work", "feat"))
        r = q if r_path == q_path else read_manifest(r_path, required=("perf", "work", "feat"))
        qw = model_free_windows(q, hp, manifest_path=q_path)
        rw = qw if r is q else model_free_windows(r, hp, manifest_path=r_path)
        keep_q, keep_r = ([i for i, w in enumerate(ws) if w is not None] for ws in (qw, rw))
        whole = len(keep_q) == len(q) and len(keep_r) == len(r)  # positions of query_in_ref hold
        scores = score_windows([q[i] for i in keep_q], [r[i] for i in keep_r],
                               [qw[i] for i in keep_q], [rw[i] for i in keep_r], rule="mean",
                               expansion=expansion_of(hp),
                               query_in_ref_path=ts.query_in_ref_path if whole else None)
        out[name] = {k: float(scores[k]) for k in ("mAP", "HR1", "HR10", "MR1") if k in scores}
    return out
