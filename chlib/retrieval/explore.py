"""The embedding explorer's data (``07_explore``): the run index's reference recordings and
embedded queries as points with metadata, neighbours ranked by the index's rule."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chlib.core.errors import ConfigError, ManifestError
from chlib.data.features import load_feature
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.index import is_tempo_copy
from chlib.retrieval.protocol import (
    cosine_distances,
    expand_by_neighbours,
    reading_rows,
    track_distances,
    track_vector,
    unit_rows,
)

__all__ = ["ExplorerData", "explorer_data"]


@dataclass
class ExplorerData:
    """Recordings as points: unit embeddings [N, D] and one metadata record each (``perf``,
    ``work``, ``role`` "reference" / "query", ``wav``, ``feat``, other manifest columns).
    ``projections``: 2-D maps per (method, seed), kept by :mod:`chlib.ui.report`."""

    embeddings: np.ndarray  # [N, D] float32 unit track vectors
    records: list[dict]
    rule: str = "mean"
    windows: list | None = None  # [n_windows x readings, D] unit window sets per row
    readings: int = 1  # key readings per window (the index's)
    expansion: bool = False  # neighbour expansion among all the points (the index's)
    projections: dict = field(default_factory=dict, repr=False)
    _expanded_d: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def columns(self, max_values: int = 20) -> list[str]:
        """Metadata columns to colour by: ``work``, ``role`` and every other column with at most
        ``max_values`` distinct values and at most one per two recordings."""
        skip = {"wav", "feat", "perf", "feat_len", "source_perf", "work_id", "work", "role",
                "n_windows"}
        cols = dict.fromkeys(k for r in self.records for k in r if k not in skip)
        limit = min(max_values, max(2, len(self.records) // 2))
        return ["work", "role"] + [c for c in cols
                                   if len({str(r.get(c, "")) for r in self.records}) <= limit]

    def labels(self, column: str) -> list:
        if column not in self.columns():
            raise ConfigError(f"no metadata column {column!r}; choose from {self.columns()}")
        return [r.get(column, "") for r in self.records]

    def index_of(self, perf: str) -> int:
        """Row of a perf id (exact), else the first row whose perf contains it."""
        perfs = [str(r["perf"]) for r in self.records]
        if perf in perfs:
            return perfs.index(perf)
        found = (i for i, p in enumerate(perfs) if perf and perf.lower() in p.lower())
        if (i := next(found, None)) is None:
            raise ConfigError(f"no recording {perf!r} among {len(perfs)} points")
        return i

    def matching_works(self, text: str) -> list[str]:
        """Works whose name contains ``text`` (case-insensitive); [] for empty text."""
        works = {str(r["work"]) for r in self.records}
        return sorted(w for w in works if text and text.lower() in w.lower())

    def neighbours(self, i: int, k: int = 10) -> list[dict]:
        """The ``k`` nearest other recordings of row ``i`` under :attr:`rule`, closest first."""
        if self.expansion and len(self) > 1:
            d = self._expanded()[i]
        elif (self.rule == "min" or self.readings > 1) and self.windows is not None:
            d = track_distances(self.windows[i:i + 1], self.windows, rule=self.rule,
                                readings=self.readings)[0]
        else:
            d = cosine_distances(self.embeddings[i:i + 1], self.embeddings)[0]
        d = d.astype(np.float64)
        d[i] = np.inf
        order = np.argsort(d, kind="stable")[: max(0, min(k, len(self) - 1))]
        rec = self.records
        return [{"rank": n + 1, "perf": rec[j]["perf"], "work": rec[j]["work"],
                 "role": rec[j].get("role"), "distance": float(d[j]),
                 "same_work": rec[j]["work"] == rec[i]["work"], "row": int(j)}
                for n, j in enumerate(order)]

    def _expanded(self) -> np.ndarray:
        """[N, N] neighbour-expanded distances among all points (computed once)."""
        if self._expanded_d is None or len(self._expanded_d) != len(self):
            d = (track_distances(self.windows, self.windows, rule=self.rule,
                                 readings=self.readings) if self.windows is not None
                 else cosine_distances(self.embeddings, self.embeddings))
            eye = np.eye(len(self), dtype=bool)
            self._expanded_d = expand_by_neighbours(d, d, eye, eye)
        return self._expanded_d

    def row_of(self, point: str = "") -> int:
        """Row of ``point`` (a perf id or part of one); "" gives the first query (else row 0)."""
        if point:
            return self.index_of(point)
        return next((i for i, r in enumerate(self.records) if r.get("role") == "query"), 0)

    def cqt(self, i: int) -> np.ndarray:
        """The stored CQT [frames, bins] of row ``i``."""
        return np.asarray(load_feature(self.records[i]["feat"]))


def explorer_data(index: Any, query_records: Sequence[dict], model: Any, hp: Any, *,
                  run_dir: str | os.PathLike, metadata: Sequence[dict] = (),
                  device: str = "auto", progress: bool = True) -> ExplorerData:
    """Reference recordings (from ``index``) plus query recordings (embedded here, cached in
    ``run_dir/embeddings``) as one :class:`ExplorerData` that ranks by the index's rule;
    ``metadata`` rows (e.g. full.txt) add their columns to the records with the same perf."""
    meta = {str(r["perf"]): r for r in metadata}
    refs = set(index.perfs)
    qrecs = [r for r in query_records if not is_tempo_copy(r) and str(r["perf"]) not in refs]
    dev = next(model.parameters()).device if device == "auto" else device
    wins = embed_recordings(model, qrecs, hp, cache_dir=Path(run_dir) / "embeddings", device=dev,
                            progress=progress, failures=[]) if qrecs else []  # failed: None
    records = [{**meta.get(r["perf"], {}), **{k: x for k, x in r.items() if x is not None},
                "role": "reference"} for r in index.records]
    vecs = list(index.embeddings)
    sets = list(index.window_sets()) if index.windows is not None else None
    for r, w in zip(qrecs, wins, strict=True):
        if w is not None:
            records.append({**meta.get(str(r["perf"]), {}), **r, "role": "query"})
            vecs.append(track_vector(reading_rows(w, index.readings)))
            if sets is not None:
                sets.append(unit_rows(w))
    if not records:
        raise ManifestError("explorer_data: no reference or query recording to show")
    return ExplorerData(np.stack(vecs).astype(np.float32), records, rule=index.rule, windows=sets,
                        readings=index.readings, expansion=index.expansion)
