"""Segment identification: the timeline of each query file (which works, where) and, for sets
with known contents, the set metrics (``06_identify``, ``chlib identify --segments``).

A query's CQT is cut into overlapping windows of the run's shortest training chunk (18 s for the
laptop recipe; the model was trained on chunks that long) every ``hop_s`` seconds (2 s), the
last one aligned to the end; the windows are embedded by the run's model, as identification
does, and decoded by :func:`chlib.retrieval.timeline.timeline` against the reference index.
Queries go one at a time (a 2-hour file is 3,600 windows, a few MB of embeddings); an
unreadable one is reported and the batch goes on.

Each change between two named works is then placed more finely (:func:`refine_boundaries`):
windows of ``refine_s`` seconds (6 s) every 0.5 s around the cut are scored against the two
works, and the cut moves to where the earlier work's score falls below the later one's. An
18-s window that straddles a change half matches both tunes, so the coarse cut wanders by
seconds; on the demo's 40 sets the median boundary error went from 3.09 s to 1.77 s (5 s
windows: 1.66 s, 9 s: 2.12 s, 12 s: 2.53 s); the suite's sets (FluidSynth, another
generator) are in the README."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.device import pick_device, synchronize
from chlib.core.errors import ChlibError, ConfigError
from chlib.core.progress import progress as progress_bar
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import embed_windows, window_starts
from chlib.retrieval.evaluate import write_csv
from chlib.retrieval.identify import query_features
from chlib.retrieval.index import ReferenceIndex
from chlib.retrieval.set_metrics import from_timeline, set_report
from chlib.retrieval.timeline import (
    SEGMENT_COLUMNS,
    UNKNOWN,
    Timeline,
    best_match_null,
    crossing_near,
    index_null,
    timeline,
    work_scores,
)

__all__ = ["DEFAULT_HOP_S", "DEFAULT_REFINE_S", "SEGMENT_CSV_COLUMNS", "timeline_window",
           "query_windows", "refine_boundaries", "feature_timeline", "SegmentReport",
           "identify_segments", "evaluate_sets"]

DEFAULT_HOP_S = 2.0  # seconds between timeline windows (1 s gave no better boundaries)
DEFAULT_REFINE_S = 6.0  # seconds of the short windows that place a change (module docstring)
REFINE_HOP_S = 0.5
REFINE_REACH_S = 6.0  # a cut moves at most this far (seconds)
SEGMENT_CSV_COLUMNS = (*SEGMENT_COLUMNS, "error")


def timeline_window(hp: Any) -> int:
    """Raw CQT frames of a timeline window: the run's shortest training chunk."""
    return int(min(hp.chunk_len))


def query_windows(feat: np.ndarray, model: torch.nn.Module, hp: Any, *,
                  hop_s: float = DEFAULT_HOP_S, window: int | None = None,
                  device: str | torch.device | None = None,
                  key_variants: Sequence[int] = (0,)) -> tuple[np.ndarray, np.ndarray, float]:
    """``(windows [T x len(key_variants), D], starts_s [T], window_s)``: embeddings of ``feat``
    [frames, bins]'s windows of ``window`` raw frames (default :func:`timeline_window`) every
    ``hop_s`` seconds, the last aligned to the end (a query shorter than a window: one padded
    window at 0), each at ``key_variants`` key readings (the index's, for a timeline)."""
    if not hop_s > 0:
        raise ConfigError(f"hop_s must be > 0 seconds, got {hop_s}")
    fps = hp.features.frames_per_second
    window = timeline_window(hp) if window is None else int(window)
    hop = max(1, round(hop_s * fps))
    starts = window_starts(len(feat), window, hop=hop, tail="shift", min_tail=0.0)
    (wins,) = embed_windows(model, [feat], window=window, mean_size=hp.mean_size, hop=hop,
                            tail="shift", min_tail=0.0, device=device,
                            batch_size=hp.eval_batch_size, progress=False,
                            transform=hp.input_transform,
                            bins_per_octave=hp.features.bins_per_octave,
                            key_variants=key_variants)
    return wins, np.asarray(starts, np.float64) / fps, window / fps


def refine_boundaries(tl: Timeline, feat: np.ndarray, model: torch.nn.Module, hp: Any,
                      index: ReferenceIndex, *, refine_s: float = DEFAULT_REFINE_S,
                      hop_s: float = REFINE_HOP_S, reach_s: float = REFINE_REACH_S,
                      device: str | torch.device | None = None) -> Timeline:
    """``tl`` with each cut between two named works moved to where, in windows of
    ``refine_s`` seconds every ``hop_s`` s of ``feat`` [frames, bins] within ``reach_s`` s of
    the cut, the earlier work's score (max cosine similarity) falls below the later one's
    (:func:`~chlib.retrieval.timeline.crossing_near`); kept where they never cross. Cuts next
    to "unknown" stay; labels and p-values are unchanged."""
    if not refine_s > 0:
        raise ConfigError(f"refine_s must be > 0 seconds, got {refine_s}")
    fps = hp.features.frames_per_second
    window = max(1, round(refine_s * fps))
    segs = [dict(s) for s in tl.segments]
    for a, b in zip(segs[:-1], segs[1:], strict=True):
        if UNKNOWN in (a["work"], b["work"]) or a["work"] == b["work"]:
            continue
        cut = a["end_s"]
        lo = max(0, math.floor((max(a["start_s"], cut - reach_s) - refine_s / 2) * fps))
        hi = min(len(feat), math.ceil((min(b["end_s"], cut + reach_s) + refine_s / 2) * fps))
        if hi - lo <= window:
            continue
        wins, starts, win_s = query_windows(feat[lo:hi], model, hp, hop_s=hop_s, window=window,
                                            device=device)
        scores = work_scores(index, wins, [a["work"], b["work"]])
        t = crossing_near(scores[:, 0] - scores[:, 1], lo / fps + starts + win_s / 2, cut)
        if t is not None and a["start_s"] < t < b["end_s"]:
            a["end_s"] = b["start_s"] = t
    return dataclasses.replace(tl, segments=segs)


def feature_timeline(feat: np.ndarray, model: torch.nn.Module, hp: Any, index: ReferenceIndex,
                     *, hop_s: float = DEFAULT_HOP_S, window: int | None = None,
                     refine_s: float | None = DEFAULT_REFINE_S,
                     device: str | torch.device | None = None, **decoder: Any) -> Timeline:
    """The timeline of one query's features ``feat`` [frames, bins]: :func:`query_windows`,
    :func:`~chlib.retrieval.timeline.timeline` (``decoder``: its keyword arguments), then
    :func:`refine_boundaries` unless ``refine_s`` is None, 0, or not shorter than the
    timeline's windows."""
    wins, starts, window_s = query_windows(
        feat, model, hp, hop_s=hop_s, window=window, device=device,
        key_variants=index.window_settings.get("key_variants", [0]))
    tl = timeline(index, wins, starts, window_s, len(feat) / hp.features.frames_per_second,
                  **decoder)
    if refine_s and refine_s < window_s:
        tl = refine_boundaries(tl, feat, model, hp, index, refine_s=refine_s, device=device)
    return tl


@dataclass
class SegmentReport:
    """Timelines of the queries that could be read (``timelines``: path -> Timeline), one
    ``{"query", "error"}`` per query that could not (``errors``), and stage ``timings`` (s)."""

    timelines: dict[str, Timeline] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """``segments.csv`` rows (:data:`SEGMENT_CSV_COLUMNS`), failed queries with their error."""
        out = [r | {"error": None} for q, t in self.timelines.items() for r in t.to_rows(q)]
        return out + [{c: None for c in SEGMENT_CSV_COLUMNS} | e for e in self.errors]

    def works(self) -> list[dict]:
        """The whole-file answers: per query and work found, its seconds, share and p-value."""
        return [{"query": q} | r for q, t in self.timelines.items() for r in t.works()]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`rows` as CSV, atomically."""
        return write_csv(path, self.rows(), SEGMENT_CSV_COLUMNS)


def identify_segments(paths: Sequence[str | os.PathLike], *, model: torch.nn.Module, hp: Any,
                      index: ReferenceIndex, device: str | torch.device = "auto",
                      hop_s: float = DEFAULT_HOP_S, window: int | None = None,
                      refine_s: float | None = DEFAULT_REFINE_S, progress: bool = False,
                      **decoder: Any) -> SegmentReport:
    """The :class:`~chlib.retrieval.timeline.Timeline` of each audio file of ``paths`` against
    ``index`` (``model``'s, with ``hp``'s features, else IndexMismatchError); ``decoder``:
    keyword arguments of :func:`~chlib.retrieval.timeline.timeline` (``unknown_z``,
    ``switch_penalty``, ``possible_p``, ...); ``refine_s``: :func:`feature_timeline`'s.
    ``timings`` (s): decoding and CQT (``features_s``), then windows, search, decoding and
    boundary refinement (``timeline_s``)."""
    index.check_compatible(fingerprint=model_fingerprint(model.state_dict()), features=hp.features)
    dev = pick_device(device)
    if decoder.get("best_null") is None:  # the index's statistics, once for all the queries
        decoder["best_null"] = best_match_null(index)
    if decoder.get("null_stats") is None and decoder.get("null", "index") == "index":
        decoder["null_stats"] = index_null(index)
    report = SegmentReport(timings={"features_s": 0.0, "timeline_s": 0.0})
    t_all = time.perf_counter()
    bar = progress_bar(total=len(paths), desc="timelines", unit="file", enabled=progress,
                       leave=False)
    for p in map(str, paths):
        try:
            t0 = time.perf_counter()
            feat = query_features(p, hp, dev)
            t1 = time.perf_counter()
            report.timelines[p] = feature_timeline(feat, model, hp, index, hop_s=hop_s,
                                                   window=window, refine_s=refine_s,
                                                   device=dev, **decoder)
            synchronize(dev)
            report.timings["features_s"] += t1 - t0
            report.timings["timeline_s"] += time.perf_counter() - t1
        except ChlibError as e:
            report.errors.append({"query": p, "error": str(e)})
        bar.update(1)
    bar.close()
    report.timings |= {"total_s": time.perf_counter() - t_all, "n_queries": len(paths),
                       "n_failed": len(report.errors)}
    return report


def evaluate_sets(sets: Sequence[Mapping], report: SegmentReport) -> dict:
    """:func:`~chlib.retrieval.set_metrics.set_report` of the sets (``read_sets`` rows: ``wav``,
    ``set``, ``segments``) whose timelines ``report`` holds; ``n_missing``: sets it lacks."""
    entries = [from_timeline(report.timelines[s["wav"]], s["segments"], set=s["set"])
               for s in sets if s["wav"] in report.timelines]
    return set_report(entries) | {"n_missing": len(sets) - len(entries)}

