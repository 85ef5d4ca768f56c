"""Metrics of set identification: several works in one recording (issue 12).

Truth for a set: segments ``{"start_s", "end_s", "work"}`` of its tunes (seconds; the gaps
between tunes belong to no work). Predictions: the segments of a
:class:`chlib.retrieval.timeline.Timeline` ("unknown" = no work), its named works and ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["UNKNOWN", "set_recall", "false_work_share", "time_accuracy", "boundary_errors",
           "evaluate_set", "from_timeline", "set_report"]

UNKNOWN = "unknown"  # the timeline's label for time matched to no work


def set_recall(ranking: Sequence[str], true_works: Sequence[str], k: int) -> float:
    """recall@k = |distinct true works in ``ranking[:k]``| / |distinct true works|
    (NaN when the set has no works)."""
    truth = set(map(str, true_works))
    if not truth:
        return float("nan")
    return len(truth & set(map(str, list(ranking)[:k]))) / len(truth)


def false_work_share(named_works: Sequence[str], true_works: Sequence[str]) -> float:
    """|distinct named works not in the set| / |distinct named works| (0 when none is named)."""
    named = set(map(str, named_works)) - {UNKNOWN}
    return len(named - set(map(str, true_works))) / len(named) if named else 0.0


def _label_at(segments: Sequence[Mapping], t: float, default: str | None) -> str | None:
    for s in segments:
        if s["start_s"] <= t < s["end_s"]:
            return None if s["work"] in (None, UNKNOWN) else str(s["work"])
    return default


def time_accuracy(pred_segments: Sequence[Mapping], true_segments: Sequence[Mapping],
                  duration_s: float) -> float:
    """Share of [0, ``duration_s``] where the predicted work equals the true one; time in no
    true tune is right when predicted "unknown" (or not covered). Exact: the label functions
    are constant between consecutive segment endpoints, read at each piece's midpoint."""
    ends = {0.0, float(duration_s)} | {min(max(float(s[k]), 0.0), duration_s)
                                       for s in (*pred_segments, *true_segments)
                                       for k in ("start_s", "end_s")}
    cuts = sorted(ends)
    right = sum(b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)
                if _label_at(pred_segments, (a + b) / 2, None)
                == _label_at(true_segments, (a + b) / 2, None))
    return right / duration_s if duration_s > 0 else float("nan")


def _boundaries(segments: Sequence[Mapping], changes_only: bool) -> list[float]:
    segs = sorted(segments, key=lambda s: s["start_s"])
    return [(a["end_s"] + b["start_s"]) / 2 for a, b in zip(segs[:-1], segs[1:], strict=True)
            if not changes_only or a["work"] != b["work"]]


def boundary_errors(pred_segments: Sequence[Mapping], true_segments: Sequence[Mapping], *,
                    duration_s: float | None = None) -> list[float]:
    """For each true boundary (between consecutive true tunes: the midpoint of the gap if
    there is one), the distance in seconds to the nearest predicted boundary between two
    different labels ("unknown" included); with none predicted, to the nearer end of the
    file (0 or ``duration_s``, default: the last segment end)."""
    true_b = _boundaries(true_segments, changes_only=False)
    pred_b = np.asarray(_boundaries(pred_segments, changes_only=True), np.float64)
    if duration_s is None:
        duration_s = max((float(s["end_s"]) for s in (*pred_segments, *true_segments)),
                         default=0.0)
    if pred_b.size == 0:
        return [float(min(b, duration_s - b)) for b in true_b]
    return [float(np.abs(pred_b - b).min()) for b in true_b]


def evaluate_set(ranking: Sequence[str], named_works: Sequence[str],
                 pred_segments: Sequence[Mapping], true_segments: Sequence[Mapping],
                 duration_s: float, k: int = 10) -> dict:
    """The metrics of one set: ``n_works``, ``recall_at_n`` (k = its number of works),
    ``recall_at_10`` (``k``), ``all_in_top10``, ``false_work_share``, ``time_accuracy`` and
    ``boundary_errors`` (list, seconds)."""
    works = sorted({str(s["work"]) for s in true_segments if s["work"] not in (None, UNKNOWN)})
    r10 = set_recall(ranking, works, k)
    return {"n_works": len(works), "recall_at_n": set_recall(ranking, works, len(works)),
            "recall_at_10": r10, "all_in_top10": bool(r10 == 1.0),
            "false_work_share": false_work_share(named_works, works),
            "time_accuracy": time_accuracy(pred_segments, true_segments, duration_s),
            "boundary_errors": boundary_errors(pred_segments, true_segments,
                                               duration_s=duration_s)}


def from_timeline(timeline: Any, true_segments: Sequence[Mapping], **extra: Any) -> dict:
    """One :func:`set_report` entry from a Timeline and the set's true segments (``extra``,
    e.g. ``set_id``, is kept)."""
    return {"ranking": timeline.ranking(10), "named_works": [r["work"] for r in timeline.works()],
            "pred_segments": timeline.segments, "true_segments": list(true_segments),
            "duration_s": timeline.duration_s, **extra}


def set_report(per_set: Sequence[Mapping]) -> dict:
    """Summary over sets, each ``{"ranking", "named_works", "pred_segments",
    "true_segments", "duration_s"}`` (:func:`from_timeline`; other keys are kept in
    ``per_set``): means of recall@n (n = the set's works), recall@10, share of sets with all
    works in the top 10, false-work share and time accuracy; the median boundary error over
    all true boundaries of all sets (s); ``by_n_works``: the same per number of works
    (DataFrame, index ``n_works``); ``per_set``: one row per set."""
    rows = []
    for entry in per_set:
        m = evaluate_set(entry["ranking"], entry["named_works"], entry["pred_segments"],
                         entry["true_segments"], float(entry["duration_s"]))
        rows.append({k: v for k, v in entry.items() if k not in (
            "ranking", "named_works", "pred_segments", "true_segments")} | m)
    table = pd.DataFrame(rows, columns=None if rows else ["n_works", "boundary_errors"])

    def summary(t: pd.DataFrame) -> dict:
        errs = [e for es in t["boundary_errors"] for e in es]
        means = {c: float(t[c].mean()) if len(t) else float("nan") for c in
                 ("recall_at_n", "recall_at_10", "all_in_top10", "false_work_share",
                  "time_accuracy")}
        return {"n_sets": len(t), **means,
                "median_boundary_error_s": float(np.median(errs)) if errs else float("nan")}

    by_n = pd.DataFrame([{"n_works": n, **summary(g)} for n, g in table.groupby("n_works")]
                        ).set_index("n_works") if rows else pd.DataFrame()
    return summary(table) | {"by_n_works": by_n, "per_set": table}
