"""The reference index: embeddings of known recordings, their works, calibration and search.

A :class:`ReferenceIndex` holds, for N reference recordings:

* ``embeddings`` [N, D] float32 unit rows, one per recording: the **mean of the unit window
  embeddings over all windows of the track, renormalised** (:func:`chlib.retrieval.protocol.track_vector`;
  the original used only the first 135 s window, or a random one, bug 13.4.3);
* optionally the window embeddings themselves (``windows`` [W, D] unit rows,
  ``window_owner`` [W] = row of the recording each window belongs to), needed for the
  ``rule="min"`` distance (min over window pairs, the evaluation rule of the original);
* metadata rows (``perf``, ``work``, ``work_id``, ``wav``, ``feat``, ``duration_s``,
  ``n_windows``), the model fingerprint and feature settings it was built with, the window
  recipe;
* per-work centroids (:class:`Centroids`) grouped by the ``work`` column (not by
  ``perf.split(".")``, bug 13.4.1);
* a calibration (:class:`Calibration`) of the distances between recordings of *different* works,
  turning a distance into a z-score and an empirical p-value.

The distance rule (``rule``, :mod:`chlib.retrieval.protocol`) is the same for search,
calibration and identification, and recorded in ``meta.json``: ``"mean"`` = 1 - cos of the
track vectors (one per recording, FAISS-able); ``"min"`` = min over window pairs of 1 - cos.

On disk (``save``/``load``) an index is a folder of plain files, never pickles::

    embeddings.npy  [N, D] float32        windows.npy  [W, D] float32 (optional)
    window_owner.npy [W] int64 (optional)  centroids.npy [K, D] float32 (optional)
    records.jsonl   one JSON object per recording
    meta.json       fingerprint, feature settings, window recipe, rule, calibration, centroid
                    table, and the shape + SHA-256 of every file above (written last)

Each file is written atomically and ``meta.json`` last; ``load`` checks every file against the
hashes in ``meta.json``, so an interrupted save is detected instead of half-read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.errors import CheckpointError, ConfigError, IndexMismatchError, ManifestError
from chlib.core.io import atomic_save_npy, atomic_write_text, file_sha256, read_json, write_json
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import DEFAULT_MIN_TAIL, embed_recordings, window_settings
from chlib.retrieval.protocol import (
    check_rule,
    cosine_distances,
    pair_distances,
    track_distances,
    track_vector,
    unit_rows,
)
from chlib.retrieval.scoring import rule_of

__all__ = [
    "INDEX_FORMAT",
    "DEFAULT_N_PAIRS",
    "DEFAULT_SEED",
    "ecdf_probabilities",
    "Calibration",
    "sample_cross_work_pairs",
    "calibrate_distances",
    "Centroids",
    "compute_centroids",
    "ReferenceIndex",
    "index_from_windows",
    "build_index",
    "is_tempo_copy",
]

INDEX_FORMAT = 1
DEFAULT_N_PAIRS = 50_000  # cross-work pairs sampled for the calibration (the fork's value)
DEFAULT_SEED = 12345  # the fork's calibration seed
RADIUS_STDS = 1.5  # centroid radius = mean + 1.5 std of member distances (the fork's rule)
FAISS_MIN_REFS = 200_000  # below this the exact numpy search is fast enough
_TEMPO_PERF = re.compile(r"^sp_[0-9.]+-.+")


def is_tempo_copy(record: dict) -> bool:
    """True for a tempo-augmented copy (perf ``sp_<factor>-<perf>`` or a foreign source_perf)."""
    perf = str(record.get("perf", ""))
    src = record.get("source_perf")
    return bool(_TEMPO_PERF.match(perf)) or (src not in (None, "", perf))


# --------------------------------------------------------------------------------------------
# calibration


def ecdf_probabilities() -> np.ndarray:
    """The 1001 ECDF probability anchors of the fork (fact sheet 9.4), float64 increasing.

    500 values log-spaced from 1e-6 up to (not including) 0.5, then 0.5, then the 500 mirrored
    values 1 - p: dense in both tails, where p-values are read.
    """
    low = np.logspace(np.log10(1e-6), np.log10(0.5), 501)[:-1]
    return np.concatenate([low, [0.5], (1.0 - low)[::-1]])


@dataclass
class Calibration:
    """Distribution of cosine distances between recordings of different works.

    ``mu``/``sigma`` (ddof 1) give the z-score; ``quantiles`` at ``probs`` (the 1001 anchors of
    :func:`ecdf_probabilities`) give the empirical p-value. ``n_pairs`` distances were used,
    drawn with ``seed`` by ``method`` ("all": every cross-work pair; "sampled": distinct pairs
    drawn without replacement), under distance ``rule``.
    """

    mu: float
    sigma: float
    quantiles: np.ndarray  # [1001] float32, non-decreasing
    probs: np.ndarray  # [1001] float32
    n_pairs: int
    seed: int = DEFAULT_SEED
    method: str = "sampled"
    rule: str = "mean"

    @property
    def p_floor(self) -> float:
        """Smallest p-value reported: 1 / (n_pairs + 1).

        With n unrelated pairs no distance can be shown to be rarer than about 1 in n + 1, so
        anything closer than every sampled pair gets this floor (the fork reported 1e-6).
        """
        return 1.0 / (self.n_pairs + 1)

    def z_score(self, d: np.ndarray | float) -> np.ndarray | float:
        """``(d - mu) / sigma``: negative = closer than typical unrelated pairs."""
        d = np.asarray(d, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (d - self.mu) / self.sigma if self.sigma > 0 else np.full_like(d, np.nan)
        return z if z.ndim else float(z)

    def p_value(self, d: np.ndarray | float) -> np.ndarray | float:
        """Empirical P(unrelated distance <= d), linearly interpolated on the ECDF anchors.

        Values at or below the smallest anchor get :attr:`p_floor`; above the largest, 1.
        Where several anchors share one distance value the largest probability is used
        (the ECDF is right-continuous).
        """
        d = np.asarray(d, dtype=np.float64)
        q = self.quantiles.astype(np.float64)
        p = self.probs.astype(np.float64)
        # keep, for each distinct quantile value, its largest probability
        rev_first = np.unique(q[::-1], return_index=True)[1]
        last = q.size - 1 - rev_first
        uq, up = q[last], p[last]
        out = np.interp(d, uq, up, left=self.p_floor, right=1.0)
        out = np.clip(out, self.p_floor, 1.0)
        return out if out.ndim else float(out)

    def to_json(self) -> dict:
        return {"mu": float(self.mu), "sigma": float(self.sigma),
                "quantiles": [float(x) for x in self.quantiles],
                "probs": [float(x) for x in self.probs], "n_pairs": int(self.n_pairs),
                "seed": int(self.seed), "method": self.method, "rule": self.rule}

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(mu=float(d["mu"]), sigma=float(d["sigma"]),
                   quantiles=np.asarray(d["quantiles"], dtype=np.float32),
                   probs=np.asarray(d["probs"], dtype=np.float32), n_pairs=int(d["n_pairs"]),
                   seed=int(d["seed"]), method=str(d["method"]), rule=str(d["rule"]))


def _work_codes(works: Sequence) -> np.ndarray:
    return np.unique(np.asarray([str(w) for w in works]), return_inverse=True)[1].astype(np.int64)


def sample_cross_work_pairs(
    works: Sequence,
    n_pairs: int = DEFAULT_N_PAIRS,
    rng: np.random.Generator | int = DEFAULT_SEED,
    *,
    enumerate_limit: int = 2_000_000,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Distinct unordered pairs (i < j) of recordings whose works differ.

    When the index has at most ``enumerate_limit`` unordered pairs they are all enumerated:
    every cross-work pair if there are no more than ``n_pairs``, else ``n_pairs`` of them drawn
    without replacement. Larger indexes draw random ordered pairs, reject same-work ones and
    duplicates, and repeat until ``n_pairs`` distinct pairs are found (uniform over unordered
    cross-work pairs). Returns ``(i, j, method)``, int64 arrays sorted by (i, j), ``method``
    "all" or "sampled".
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    codes = _work_codes(works)
    n = codes.size
    counts = np.bincount(codes) if n else np.zeros(0, np.int64)
    total_cross = n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())
    if total_cross <= 0 or n_pairs <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), "all"
    if n * (n - 1) // 2 <= enumerate_limit:
        i, j = np.triu_indices(n, k=1)
        keep = codes[i] != codes[j]
        i, j = i[keep].astype(np.int64), j[keep].astype(np.int64)
        if i.size <= n_pairs:
            return i, j, "all"
        pick = np.sort(rng.choice(i.size, size=n_pairs, replace=False))
        return i[pick], j[pick], "sampled"
    want = min(n_pairs, total_cross)
    keys = np.zeros(0, np.int64)
    for _ in range(1000):
        need = want - keys.size
        if need <= 0:
            break
        a = rng.integers(0, n, size=2 * need + 16)
        b = rng.integers(0, n, size=2 * need + 16)
        ok = codes[a] != codes[b]
        lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
        cand = np.concatenate([keys, lo * n + hi])
        _, first = np.unique(cand, return_index=True)
        keys = cand[np.sort(first)][:want]  # distinct, in draw order
    keys = np.sort(keys)
    return keys // n, keys % n, "sampled"


def calibrate_distances(distances: np.ndarray, *, seed: int = DEFAULT_SEED,
                        method: str = "sampled", rule: str = "mean") -> Calibration | None:
    """A :class:`Calibration` from unrelated-pair distances (None if there are fewer than 2)."""
    ds = np.sort(np.asarray(distances, dtype=np.float64).ravel())
    if ds.size < 2:
        return None
    probs = ecdf_probabilities()
    idx = np.rint(probs * (ds.size - 1)).astype(np.int64)
    return Calibration(
        mu=float(ds.mean()), sigma=float(ds.std(ddof=1)),
        quantiles=ds[idx].astype(np.float32), probs=probs.astype(np.float32),
        n_pairs=int(ds.size), seed=int(seed), method=method, rule=rule,
    )


# --------------------------------------------------------------------------------------------
# centroids


@dataclass
class Centroids:
    """Per-work spherical means of unit recording embeddings.

    ``coherence`` = norm of the mean of the unit vectors (1 = all identical, near 0 = spread);
    ``radius`` = mean + 1.5 std (ddof 0) of the members' cosine distances to the centroid.
    Rows are sorted by work name.
    """

    works: list[str]
    vectors: np.ndarray  # [K, D] float32 unit rows
    coherence: np.ndarray  # [K] float64
    radius: np.ndarray  # [K] float64
    n_members: np.ndarray  # [K] int64

    def row(self, work: str) -> int:
        try:
            return self.works.index(str(work))
        except ValueError:
            raise ConfigError(f"work {work!r} has no centroid in this index") from None

    def table(self) -> list[dict]:
        """One dict per work (for ``pandas.DataFrame``)."""
        return [{"work": w, "n_members": int(n), "coherence": float(c), "radius": float(r)}
                for w, n, c, r in zip(self.works, self.n_members, self.coherence, self.radius,
                                      strict=True)]


def _one_centroid(members: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(unit centroid [D], coherence, radius) of unit rows ``members`` [m, D]."""
    m = members.astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(m))
    if norm < 1e-8:
        centre, coherence = members[0].astype(np.float64), 0.0
    else:
        centre, coherence = m / norm, norm
    d = 1.0 - np.clip(members.astype(np.float64) @ centre, -1.0, 1.0)
    return centre.astype(np.float32), coherence, float(d.mean() + RADIUS_STDS * d.std())


def compute_centroids(embeddings: np.ndarray, works: Sequence) -> Centroids:
    """Centroids of unit ``embeddings`` [N, D] grouped by ``works`` [N] (the work column)."""
    works_s = np.asarray([str(w) for w in works])
    names, codes = np.unique(works_s, return_inverse=True)  # sorted names
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=names.size))]
    d = embeddings.shape[1] if embeddings.ndim == 2 else 0
    vecs = np.zeros((names.size, d), np.float32)
    coh = np.zeros(names.size)
    rad = np.zeros(names.size)
    for k in range(names.size):
        members = embeddings[order[bounds[k]:bounds[k + 1]]]
        vecs[k], coh[k], rad[k] = _one_centroid(members)
    return Centroids([str(n) for n in names], vecs, coh, rad, np.diff(bounds).astype(np.int64))


def _update_centroids(old: Centroids | None, embeddings: np.ndarray, works: Sequence,
                      touched: set[str]) -> Centroids:
    """Recompute only the works in ``touched``; the others are copied from ``old``."""
    if old is None:
        return compute_centroids(embeddings, works)
    works_s = np.asarray([str(w) for w in works])
    present = set(works_s.tolist())
    keep = {w: i for i, w in enumerate(old.works) if w in present and w not in touched}
    fresh = compute_centroids(
        embeddings[np.isin(works_s, list(touched & present))],
        works_s[np.isin(works_s, list(touched & present))],
    ) if touched & present else None
    names = sorted(present)
    d = embeddings.shape[1]
    out = Centroids(names, np.zeros((len(names), d), np.float32), np.zeros(len(names)),
                    np.zeros(len(names)), np.zeros(len(names), np.int64))
    fresh_row = {w: i for i, w in enumerate(fresh.works)} if fresh is not None else {}
    for k, w in enumerate(names):
        src, r = (old, keep[w]) if w in keep else (fresh, fresh_row[w])
        out.vectors[k], out.coherence[k] = src.vectors[r], src.coherence[r]
        out.radius[k], out.n_members[k] = src.radius[r], src.n_members[r]
    return out


# --------------------------------------------------------------------------------------------
# the index


_RECORD_KEYS = ("perf", "work", "work_id", "wav", "feat", "duration_s", "n_windows")


def _meta_row(rec: dict, n_windows: int) -> dict:
    for k in ("perf", "work"):
        if rec.get(k) in (None, ""):
            raise ManifestError(f"reference record {rec!r} has no {k!r}; use full.txt records")
    dur = rec.get("duration_s", rec.get("dur_s"))
    return {
        "perf": str(rec["perf"]),
        "work": str(rec["work"]),
        "work_id": None if rec.get("work_id") is None else int(rec["work_id"]),
        "wav": None if rec.get("wav") is None else str(rec["wav"]),
        "feat": None if rec.get("feat") is None else str(rec["feat"]),
        "duration_s": None if dur is None else float(dur),
        "n_windows": int(n_windows),
    }


@dataclass
class ReferenceIndex:
    """Reference recordings, their unit embeddings, works, centroids and calibration.

    Build with :func:`build_index` (from a model and manifest records) or
    :func:`index_from_windows` (from window embeddings); extend with :meth:`add` /
    :meth:`remove`; query with :meth:`search`; store with :meth:`save` / :meth:`load`.
    """

    embeddings: np.ndarray  # [N, D] float32 unit rows
    records: list[dict]  # N metadata rows (_RECORD_KEYS)
    model_fingerprint: str
    feature_settings: dict  # FeatureSettings.key()
    window_settings: dict  # chlib.retrieval.embed.window_settings(...)
    rule: str = "mean"  # "mean" | "min": the distance rule of search and calibration
    windows: np.ndarray | None = None  # [W, D] float32 unit rows, grouped by owner
    window_owner: np.ndarray | None = None  # [W] int64, non-decreasing
    calibration: Calibration | None = None
    centroids: Centroids | None = None
    n_pairs: int = DEFAULT_N_PAIRS
    seed: int = DEFAULT_SEED
    skipped: list[dict] = field(default_factory=list)  # recordings that could not be indexed
    _groups: tuple | None = field(default=None, init=False, repr=False, compare=False)

    # ---- basic views
    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def perfs(self) -> list[str]:
        return [r["perf"] for r in self.records]

    @property
    def works(self) -> list[str]:
        return [r["work"] for r in self.records]

    def window_sets(self) -> list[np.ndarray]:
        """The unit window embeddings of each recording, [n_windows_i, D] each."""
        if self.windows is None or self.window_owner is None:
            raise ConfigError("this index stores no window embeddings (built with keep_windows=False)")
        cuts = np.searchsorted(self.window_owner, np.arange(1, len(self)))
        return np.split(self.windows, cuts)

    # ---- compatibility
    def check_compatible(self, *, fingerprint: str | None = None,
                         features: Any | None = None, where: str = "index") -> None:
        """IndexMismatchError unless the index was built by ``fingerprint`` with ``features``."""
        if fingerprint is not None and fingerprint != self.model_fingerprint:
            raise IndexMismatchError(
                f"{where}: built by the model with fingerprint {self.model_fingerprint}, but the "
                f"model in use has fingerprint {fingerprint}. Embeddings of different models are "
                "not comparable: rebuild the index with this model (chlib.retrieval.index.build_index)."
            )
        if features is not None:
            want = features.key() if hasattr(features, "key") else dict(features)
            if want != self.feature_settings:
                diff = {k: (self.feature_settings.get(k), want.get(k))
                        for k in set(want) | set(self.feature_settings)
                        if self.feature_settings.get(k) != want.get(k)}
                raise IndexMismatchError(
                    f"{where}: built with feature settings {self.feature_settings}, but "
                    f"{want} are in use (differences, index vs now: {diff}). Rebuild the index "
                    "from features extracted with the current settings."
                )

    # ---- distances and search
    def _query_sets(self, query: Any) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
        """(unit query vectors [M, D] for rule mean, window sets for rule min)."""
        if isinstance(query, np.ndarray) or torch.is_tensor(query):
            q = np.asarray(query, dtype=np.float32)
            if q.ndim == 1:
                q = q[None]
            if q.ndim != 2 or q.shape[1] != self.dim:
                raise ConfigError(f"query must be [D] or [M, D] with D={self.dim}, got {q.shape}")
            sets = [row[None] for row in q]
            return unit_rows(q), sets
        sets = [np.atleast_2d(np.asarray(s, dtype=np.float32)) for s in query]
        for s in sets:
            if s.shape[1] != self.dim or len(s) == 0:
                raise ConfigError(f"each query window set must be [n >= 1, {self.dim}], got {s.shape}")
        return np.stack([track_vector(s) for s in sets]) if sets else None, sets

    def distances(self, query: Any) -> np.ndarray:
        """Distances [M, N] from queries to every reference under the index's rule.

        ``query``: a vector [D], vectors [M, D] (each one query) or a list of window sets
        [n_windows, D] (rule "mean" reduces each set with :func:`track_vector`).
        """
        vecs, sets = self._query_sets(query)
        if len(self) == 0:
            return np.zeros((0 if vecs is None else len(vecs), 0), np.float32)
        if self.rule == "min":
            return track_distances(sets, self.window_sets(), rule="min")
        return cosine_distances(vecs, self.embeddings)

    def search(self, query: Any, k: int = 10, by: str = "perf", *,
               use_faiss: bool | None = None) -> list[list[dict]]:
        """Top-``k`` references (or works) for each query, closest first.

        Parameters
        ----------
        query : [D], [M, D] or a list of window sets (see :meth:`distances`).
        k : results per query.
        by : "perf" ranks recordings; "work" ranks works by their closest recording.
        use_faiss : None = FAISS for rule "mean", ``by="perf"`` and more than 200 000
            references when ``faiss`` is installed; True/False to force. FAISS ``IndexFlatIP``
            is exact: results equal the numpy search up to float rounding.

        Returns
        -------
        one list per query of result rows ``{"rank", "perf", "work", "work_id", "distance",
        "z", "p_value"}`` (``by="work"`` adds ``"n_work_recordings"``; its p-value is for the
        closest of the work's m recordings, 1 - (1 - p)^m, so big works are not favoured).
        z and p are NaN without a calibration. Ties at the k-th place are broken arbitrarily.
        """
        if by not in ("perf", "work"):
            raise ConfigError(f"by must be 'perf' or 'work', got {by!r}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        vecs, sets = self._query_sets(query)
        n_q = 0 if vecs is None else len(vecs)
        if len(self) == 0:
            return [[] for _ in range(n_q)]
        if by == "perf":
            fa = use_faiss if use_faiss is not None else (
                self.rule == "mean" and len(self) > FAISS_MIN_REFS and _faiss_available())
            if fa:
                if self.rule != "mean":
                    raise ConfigError("use_faiss needs rule 'mean' (one vector per recording)")
                idx, dist = _faiss_topk(vecs, self.embeddings, k)
            else:
                idx, dist = self._exact_topk(vecs, sets, k)
            return [self._rows(idx[m], dist[m]) for m in range(n_q)]
        return self._search_works(vecs, sets, k)

    def _exact_topk(self, vecs: np.ndarray, sets: list[np.ndarray], k: int,
                    block_elements: int = 1 << 25) -> tuple[np.ndarray, np.ndarray]:
        n_q, n = len(vecs), len(self)
        kk = min(k, n)
        idx = np.zeros((n_q, kk), np.int64)
        dist = np.zeros((n_q, kk), np.float32)
        step = max(1, block_elements // n)
        for a in range(0, n_q, step):
            b = min(n_q, a + step)
            d = (track_distances(sets[a:b], self.window_sets(), rule="min") if self.rule == "min"
                 else cosine_distances(vecs[a:b], self.embeddings))
            i, dd = _topk_rows(d, kk)
            idx[a:b], dist[a:b] = i, dd
        return idx, dist

    def _work_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row order grouping works together, group starts, group sizes); cached."""
        if self._groups is None or self._groups[0].size != len(self):
            codes = _work_codes(self.works)
            order = np.argsort(codes, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
            sizes = np.diff(np.r_[starts, len(order)])
            self._groups = (order, starts, sizes)
        return self._groups

    def _search_works(self, vecs: np.ndarray, sets: list[np.ndarray], k: int) -> list[list[dict]]:
        order, starts, sizes = self._work_groups()
        out = []
        for m in range(len(vecs)):
            d = self.distances(sets[m:m + 1] if self.rule == "min" else vecs[m:m + 1])[0]
            ds = d[order]
            wmin = np.minimum.reduceat(ds, starts)  # [n_works]
            top, wd = _topk_rows(wmin[None], min(k, len(starts)))
            rows = []
            for rank, (g, dist) in enumerate(zip(top[0], wd[0], strict=True), start=1):
                seg = order[starts[g]:starts[g] + sizes[g]]
                best = int(seg[np.argmin(d[seg])])
                row = self._row(best, float(dist), rank)
                m_w = int(sizes[g])
                row["n_work_recordings"] = m_w
                if np.isfinite(row["p_value"]):
                    row["p_value"] = float(1.0 - (1.0 - row["p_value"]) ** m_w)
                rows.append(row)
            out.append(rows)
        return out

    def _row(self, i: int, dist: float, rank: int) -> dict:
        r = self.records[i]
        cal = self.calibration
        return {"rank": rank, "perf": r["perf"], "work": r["work"], "work_id": r.get("work_id"),
                "distance": float(dist),
                "z": float(cal.z_score(dist)) if cal else float("nan"),
                "p_value": float(cal.p_value(dist)) if cal else float("nan")}

    def _rows(self, idx: np.ndarray, dist: np.ndarray) -> list[dict]:
        return [self._row(int(i), float(d), r) for r, (i, d) in
                enumerate(zip(idx, dist, strict=True), start=1) if i >= 0]

    # ---- maintenance
    def recalibrate(self) -> None:
        """Recompute the calibration over the whole index (seeded: deterministic)."""
        self.calibration = _calibrate(self)

    def add(self, records: Sequence[dict], windows: Sequence[np.ndarray]) -> None:
        """Append recordings given their raw window embeddings ([n_windows, D] each).

        No rebuild: the new rows are appended, the centroids of the works they touch are
        recomputed, and the calibration is recomputed over the whole index (it is a global
        property: every new recording adds cross-work pairs; with the same seed and rows in the
        same order the result equals a fresh build). A perf already in the index is refused.
        """
        if len(records) != len(windows):
            raise ConfigError(f"add: {len(records)} records but {len(windows)} window sets")
        known = set(self.perfs)
        rows = []
        for rec, w in zip(records, windows, strict=True):
            w = np.atleast_2d(np.asarray(w, dtype=np.float32))
            if w.shape[1] != self.dim and len(self):
                raise ConfigError(f"add: {rec.get('perf')!r} has D={w.shape[1]}, index D={self.dim}")
            row = _meta_row(rec, len(w))
            if row["perf"] in known:
                raise ConfigError(f"add: perf {row['perf']!r} is already in the index; remove it first")
            known.add(row["perf"])
            rows.append((row, w))
        if not rows:
            return
        n0 = len(self)
        new_emb = np.stack([track_vector(w) for _, w in rows]).astype(np.float32)
        self.embeddings = np.concatenate([self.embeddings.reshape(-1, new_emb.shape[1]), new_emb])
        self.records = self.records + [r for r, _ in rows]
        if self.windows is not None:
            self.windows = np.concatenate([self.windows.reshape(-1, new_emb.shape[1])]
                                          + [unit_rows(w) for _, w in rows])
            owners = [np.full(len(w), n0 + k, np.int64) for k, (_, w) in enumerate(rows)]
            self.window_owner = np.concatenate([self.window_owner.astype(np.int64)] + owners)
        self._groups = None
        touched = {r["work"] for r, _ in rows}
        self.centroids = _update_centroids(self.centroids, self.embeddings, self.works, touched)
        self.recalibrate()

    def remove(self, *, perfs: Sequence[str] | None = None, works: Sequence[str] | None = None) -> int:
        """Remove recordings by perf id and/or whole works; returns how many were removed.

        Remaining rows keep their order; centroids of touched works are recomputed (a work with
        no recordings left loses its centroid) and the calibration is recomputed.
        """
        drop_p = {str(p) for p in (perfs or [])}
        drop_w = {str(w) for w in (works or [])}
        gone = np.array([r["perf"] in drop_p or r["work"] in drop_w for r in self.records], bool)
        if not gone.any():
            return 0
        touched = {r["work"] for r, g in zip(self.records, gone, strict=True) if g}
        self._groups = None
        keep = ~gone
        new_pos = np.cumsum(keep) - 1
        self.embeddings = self.embeddings[keep]
        self.records = [r for r, k in zip(self.records, keep, strict=True) if k]
        if self.windows is not None and self.window_owner is not None:
            wk = keep[self.window_owner]
            self.windows = self.windows[wk]
            self.window_owner = new_pos[self.window_owner[wk]].astype(np.int64)
        self.centroids = (_update_centroids(self.centroids, self.embeddings, self.works, touched)
                          if len(self) else None)
        self.recalibrate()
        return int(gone.sum())

    def add_tracks(self, model: torch.nn.Module, records: Sequence[dict], hp: Any, *,
                   device: str | torch.device | None = None,
                   manifest_path: str | os.PathLike | None = None,
                   progress: bool = True) -> list[dict]:
        """Embed ``records`` (manifest rows with ``feat``) with ``model`` and :meth:`add` them.

        The model must be the index's (fingerprint checked) and ``hp.features`` its feature
        settings. Returns the records that could not be embedded (``{"perf", "feat", "reason"}``).
        """
        self.check_compatible(fingerprint=model_fingerprint(model.state_dict()),
                              features=hp.features)
        wins, failed = _embed_records(model, records, hp, self.window_settings, device,
                                      manifest_path, None, progress)
        ok = [i for i, w in enumerate(wins) if w is not None]
        self.add([records[i] for i in ok], [wins[i] for i in ok])
        return failed

    # ---- storage
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index to ``folder`` (plain .npy / JSON, atomic files, meta.json last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict] = {}

        def put(name: str, arr: np.ndarray) -> None:
            atomic_save_npy(folder / name, arr)
            files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                           "sha256": file_sha256(folder / name)}

        put("embeddings.npy", self.embeddings.astype(np.float32))
        if self.windows is not None:
            put("windows.npy", self.windows.astype(np.float32))
            put("window_owner.npy", self.window_owner.astype(np.int64))
        if self.centroids is not None:
            put("centroids.npy", self.centroids.vectors.astype(np.float32))
        lines = "".join(json.dumps({k: r.get(k) for k in _RECORD_KEYS}, ensure_ascii=False) + "\n"
                        for r in self.records)
        atomic_write_text(folder / "records.jsonl", lines)
        files["records.jsonl"] = {"sha256": file_sha256(folder / "records.jsonl")}
        meta = {
            "format": INDEX_FORMAT,
            "kind": "chlib reference index",
            "n_recordings": len(self),
            "embed_dim": self.dim,
            "model_fingerprint": self.model_fingerprint,
            "feature_settings": self.feature_settings,
            "window_settings": self.window_settings,
            "rule": self.rule,
            "n_pairs": self.n_pairs,
            "seed": self.seed,
            "calibration": self.calibration.to_json() if self.calibration else None,
            "centroids": None if self.centroids is None else {
                "works": self.centroids.works,
                "coherence": [float(x) for x in self.centroids.coherence],
                "radius": [float(x) for x in self.centroids.radius],
                "n_members": [int(x) for x in self.centroids.n_members],
            },
            "skipped": self.skipped,
            "files": files,
        }
        write_json(folder / "meta.json", meta)
        for stale in ("windows.npy", "window_owner.npy", "centroids.npy"):
            if stale not in files and (folder / stale).exists():
                (folder / stale).unlink()
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, expect_fingerprint: str | None = None,
             expect_features: Any | None = None, verify: bool = True) -> ReferenceIndex:
        """Read an index written by :meth:`save`.

        ``expect_fingerprint`` / ``expect_features`` (a FeatureSettings or its ``key()``): an
        index built by another model or with other feature settings is refused with
        IndexMismatchError naming both. ``verify`` checks every file against the SHA-256 in
        ``meta.json`` (detects interrupted saves and edits). Arrays load with
        ``allow_pickle=False``.
        """
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise IndexMismatchError(
                f"{folder}: no meta.json, so no chlib index here; build one with "
                "chlib.retrieval.index.build_index(...) and save it"
            )
        meta = read_json(meta_path)
        if meta.get("format") != INDEX_FORMAT:
            raise IndexMismatchError(
                f"{folder}: index format {meta.get('format')!r}, this chlib reads format "
                f"{INDEX_FORMAT}; rebuild the index"
            )
        files = meta["files"]
        for name, info in files.items():
            p = folder / name
            if not p.is_file():
                raise IndexMismatchError(f"{p}: missing (interrupted save?); rebuild the index")
            if verify and file_sha256(p) != info["sha256"]:
                raise IndexMismatchError(
                    f"{p}: content differs from meta.json (an interrupted save or an edit); "
                    "save or rebuild the index again"
                )

        def arr(name: str) -> np.ndarray | None:
            if name not in files:
                return None
            return np.load(folder / name, allow_pickle=False)

        records = []
        for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
        cal = Calibration.from_json(meta["calibration"]) if meta.get("calibration") else None
        cen = None
        if meta.get("centroids") is not None:
            c = meta["centroids"]
            cen = Centroids(list(c["works"]), arr("centroids.npy"),
                            np.asarray(c["coherence"], np.float64),
                            np.asarray(c["radius"], np.float64),
                            np.asarray(c["n_members"], np.int64))
        idx = cls(
            embeddings=arr("embeddings.npy"), records=records,
            model_fingerprint=meta["model_fingerprint"],
            feature_settings=meta["feature_settings"], window_settings=meta["window_settings"],
            rule=meta["rule"], windows=arr("windows.npy"), window_owner=arr("window_owner.npy"),
            calibration=cal, centroids=cen, n_pairs=int(meta["n_pairs"]), seed=int(meta["seed"]),
            skipped=list(meta.get("skipped") or []),
        )
        if len(idx.records) != len(idx):
            raise IndexMismatchError(
                f"{folder}: {len(idx.records)} records but {len(idx)} embeddings; rebuild"
            )
        idx.check_compatible(fingerprint=expect_fingerprint, features=expect_features,
                             where=str(folder))
        return idx


# --------------------------------------------------------------------------------------------
# helpers: distances, top-k, faiss


def _topk_rows(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k smallest entries of each row, ascending."""
    n = d.shape[1]
    if k < n:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), d.shape).copy()
    vals = np.take_along_axis(d, part, axis=1)
    order = np.lexsort((part, vals), axis=1)  # by distance, then index
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(vals, order, axis=1)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_topk(q_unit: np.ndarray, refs_unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(refs_unit.shape[1])
    index.add(np.ascontiguousarray(refs_unit, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(q_unit, dtype=np.float32), min(k, len(refs_unit)))
    return idx.astype(np.int64), (1.0 - np.clip(sims, -1.0, 1.0)).astype(np.float32)


def _calibrate(index: ReferenceIndex) -> Calibration | None:
    i, j, method = sample_cross_work_pairs(index.works, index.n_pairs, index.seed)
    if i.size < 2:
        return None
    sets = index.window_sets() if index.rule == "min" else []
    d = pair_distances(sets, index.embeddings, i, j, rule=index.rule)
    return calibrate_distances(d, seed=index.seed, method=method, rule=index.rule)


# --------------------------------------------------------------------------------------------
# construction


def index_from_windows(
    records: Sequence[dict],
    windows: Sequence[np.ndarray],
    *,
    model_fingerprint: str,
    feature_settings: Any,
    window_settings: dict,
    rule: str = "mean",
    keep_windows: bool = True,
    n_pairs: int = DEFAULT_N_PAIRS,
    seed: int = DEFAULT_SEED,
    skipped: list[dict] | None = None,
) -> ReferenceIndex:
    """An index from reference records and their raw window embeddings ([n_windows, D] each).

    Track embeddings, centroids (by the ``work`` column) and the calibration are computed here.
    ``rule="min"`` needs ``keep_windows=True``.
    """
    check_rule(rule)
    if rule == "min" and not keep_windows:
        raise ConfigError("rule 'min' compares window embeddings: keep_windows must be True")
    if len(records) != len(windows):
        raise ConfigError(f"{len(records)} records but {len(windows)} window sets")
    feats = feature_settings.key() if hasattr(feature_settings, "key") else dict(feature_settings)
    dim = int(np.atleast_2d(windows[0]).shape[1]) if len(windows) else 0
    idx = ReferenceIndex(
        embeddings=np.zeros((0, dim), np.float32), records=[],
        model_fingerprint=str(model_fingerprint), feature_settings=feats,
        window_settings=dict(window_settings), rule=rule,
        windows=np.zeros((0, dim), np.float32) if keep_windows else None,
        window_owner=np.zeros(0, np.int64) if keep_windows else None,
        n_pairs=int(n_pairs), seed=int(seed), skipped=list(skipped or []),
    )
    idx.add(records, windows)
    return idx


def _embed_records(model: torch.nn.Module, records: Sequence[dict], hp: Any, wset: dict,
                   device: Any, manifest_path: Any, cache_dir: Any, progress: bool,
                   batch_size: int | None = None) -> tuple[list[np.ndarray | None], list[dict]]:
    """Window embeddings of reference records and the ``{"perf", "feat", "reason"}`` failures."""
    for r in records:
        if "feat" not in r:
            raise ManifestError(f"record {r.get('perf', r)!r} has no 'feat' key (use full.txt)")
    failures: list[dict] = []
    wins = embed_recordings(model, list(records), hp, cache_dir=cache_dir,
                            manifest_path=manifest_path, device=device, batch_size=batch_size,
                            hop=wset["hop"], tail=wset["tail"], min_tail=wset["min_tail"],
                            progress=progress, failures=failures)
    failed = [{"perf": records[f["index"]].get("perf"), "feat": f["feat"], "reason": f["reason"]}
              for f in failures]
    return wins, failed


def build_index(
    model: torch.nn.Module,
    records: Sequence[dict],
    hp: Any,
    *,
    fingerprint: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    rule: str | None = None,
    keep_windows: bool = True,
    tail: str = "shift",
    hop: int | None = None,
    min_tail: float = DEFAULT_MIN_TAIL,
    drop_tempo_copies: bool = True,
    n_pairs: int = DEFAULT_N_PAIRS,
    seed: int = DEFAULT_SEED,
    manifest_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ReferenceIndex:
    """Embed reference recordings (full.txt records) with ``model`` and index them.

    Every window of every track is embedded with the run's recipe (:mod:`chlib.retrieval.embed`).
    ``rule``: the distance rule, None = the run's (``hp.distance_rule``). Tempo copies
    (``sp_<f>-<perf>``) are left out unless ``drop_tempo_copies=False``. Recordings whose
    features cannot be read are listed in ``index.skipped`` (``{"perf", "feat", "reason"}``).
    ``fingerprint``: None = computed from the model; a different value is a CheckpointError.
    ``cache_dir``: reuse / store window embeddings (:func:`chlib.retrieval.embed.embed_recordings`).
    """
    actual = model_fingerprint(model.state_dict())
    if fingerprint is not None and fingerprint != actual:
        raise CheckpointError(
            f"fingerprint {fingerprint} was given but the model's weights hash to {actual}"
        )
    rule = check_rule(rule_of(hp) if rule is None else rule)
    recs = [r for r in records if not (drop_tempo_copies and is_tempo_copy(r))]
    for r in recs:
        _meta_row(r, 0)  # perf and work present
    perfs = [str(r["perf"]) for r in recs]
    if len(set(perfs)) != len(perfs):
        dup = sorted({p for p in perfs if perfs.count(p) > 1})[:5]
        raise ManifestError(f"duplicate perf ids in the reference records: {dup}")
    wset = window_settings(hp.chunk_len[0], hp.mean_size, hop=hop, tail=tail, min_tail=min_tail)
    wins, failed = _embed_records(model, recs, hp, wset, device, manifest_path, cache_dir,
                                  progress, batch_size)
    ok = [i for i, w in enumerate(wins) if w is not None]
    return index_from_windows(
        [recs[i] for i in ok], [wins[i] for i in ok], model_fingerprint=actual,
        feature_settings=hp.features, window_settings=wset, rule=rule,
        keep_windows=keep_windows, n_pairs=n_pairs, seed=seed, skipped=failed,
    )
