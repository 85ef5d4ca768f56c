"""Segment identification: the timeline of each query file (which works, where) and, for sets
with known contents, the set metrics (``06_identify``, ``chlib identify --segments``).

A query's CQT is cut into overlapping windows of the run's shortest training chunk (18 s for the
laptop recipe; the model was trained on chunks that long) every ``hop_s`` seconds (2 s), the
last one aligned to the end; the windows are embedded by the run's model, as identification
does, and decoded by :func:`chlib.retrieval.timeline.timeline` against the reference index.
Queries go one at a time (a 2-hour file is 3,600 windows, a few MB of embeddings); an
unreadable one is reported and the batch goes on."""

from __future__ import annotations

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
    Timeline,
    best_match_null,
    index_null,
    timeline,
)

__all__ = ["DEFAULT_HOP_S", "SEGMENT_CSV_COLUMNS", "timeline_window", "query_windows",
           "SegmentReport", "identify_segments", "evaluate_sets"]

DEFAULT_HOP_S = 2.0  # seconds between timeline windows: boundaries land within ~1 s of a change
SEGMENT_CSV_COLUMNS = (*SEGMENT_COLUMNS, "error")


def timeline_window(hp: Any) -> int:
    """Raw CQT frames of a timeline window: the run's shortest training chunk."""
    return int(min(hp.chunk_len))


def query_windows(feat: np.ndarray, model: torch.nn.Module, hp: Any, *,
                  hop_s: float = DEFAULT_HOP_S, window: int | None = None,
                  device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(windows [T, D], starts_s [T], window_s)``: embeddings of ``feat`` [frames, bins]'s
    windows of ``window`` raw frames (default :func:`timeline_window`) every ``hop_s`` seconds,
    the last aligned to the end (a query shorter than a window: one padded window at 0)."""
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
                            bins_per_octave=hp.features.bins_per_octave)
    return wins, np.asarray(starts, np.float64) / fps, window / fps


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
                      progress: bool = False, **decoder: Any) -> SegmentReport:
    """The :class:`~chlib.retrieval.timeline.Timeline` of each audio file of ``paths`` against
    ``index`` (``model``'s, with ``hp``'s features, else IndexMismatchError); ``decoder``:
    keyword arguments of :func:`~chlib.retrieval.timeline.timeline` (``unknown_z``,
    ``switch_penalty``, ``possible_p``, ...)."""
    index.check_compatible(fingerprint=model_fingerprint(model.state_dict()), features=hp.features)
    dev = pick_device(device)
    if decoder.get("best_null") is None:  # the index's statistics, once for all the queries
        decoder["best_null"] = best_match_null(index)
    if decoder.get("null_stats") is None and decoder.get("null", "index") == "index":
        decoder["null_stats"] = index_null(index)
    report = SegmentReport(timings={"features_s": 0.0, "model_s": 0.0, "decode_s": 0.0})
    t_all = time.perf_counter()
    bar = progress_bar(total=len(paths), desc="timelines", unit="file", enabled=progress,
                       leave=False)
    for p in map(str, paths):
        try:
            t0 = time.perf_counter()
            feat = query_features(p, hp, dev)
            t1 = time.perf_counter()
            wins, starts, window_s = query_windows(feat, model, hp, hop_s=hop_s, window=window,
                                                   device=dev)
            synchronize(dev)
            t2 = time.perf_counter()
            report.timelines[p] = timeline(index, wins, starts, window_s,
                                           len(feat) / hp.features.frames_per_second, **decoder)
            for key, a, b in (("features_s", t0, t1), ("model_s", t1, t2),
                              ("decode_s", t2, time.perf_counter())):
                report.timings[key] += b - a
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

