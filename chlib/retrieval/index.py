"""The reference index: embeddings of known recordings, their works, calibration and search.

Track vectors cover all windows (the original: the first 135 s only, bug 13.4.3); one distance
rule serves search and calibration. On disk: a folder of plain files, never pickles:
``embeddings.npy``, optional ``windows.npy``, ``window_owner.npy``, ``centroids.npy``,
``records.jsonl`` and ``meta.json`` (settings, calibration, centroid table, shape + SHA-256 of
every other file), each written atomically, ``meta.json`` last; ``load`` checks the hashes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.errors import ConfigError, IndexMismatchError, ManifestError
from chlib.core.io import atomic_save_npy, atomic_write_text, file_sha256, read_json, write_json
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval import protocol
from chlib.retrieval.ann import AnnIndex
from chlib.retrieval.calibration import (
    DEFAULT_N_PAIRS,
    DEFAULT_SEED,
    Calibration,
    Centroids,
    calibrate_distances,
    compute_centroids,
    ecdf_probabilities,
    sample_cross_work_pairs,
    work_codes,
)
from chlib.retrieval.embed import DEFAULT_MIN_TAIL, embed_recordings, hp_window_settings
from chlib.retrieval.scoring import expansion_of, rule_of

__all__ = ["INDEX_FORMAT", "DEFAULT_N_PAIRS", "DEFAULT_SEED", "ecdf_probabilities", "Calibration",
           "sample_cross_work_pairs", "calibrate_distances", "Centroids", "compute_centroids",
           "ReferenceIndex", "index_from_windows", "build_index", "is_tempo_copy"]

INDEX_FORMAT = 1
FAISS_MIN_REFS = 200_000  # below this the exact numpy search is fast enough
ANN_CANDIDATES = 32  # by work through FAISS: works of the 32 x k nearest recordings
ANN_DIR = "ann"  # ReferenceIndex.save: the FAISS index (IVF-PQ / HNSW) in this subfolder
BLOCK_ELEMENTS = 1 << 25  # cap on one query block x references distance matrix
_TEMPO_PERF = re.compile(r"^sp_[0-9.]+-.+")
_RECORD_KEYS = ("perf", "work", "work_id", "wav", "feat", "duration_s", "n_windows")
_META_KEYS = ("model_fingerprint", "feature_settings", "window_settings", "rule", "n_pairs", "seed")
_OPTIONAL_META = {"expansion": False}  # keys older indexes lack, with the value they meant


def is_tempo_copy(record: dict) -> bool:
    """True for a tempo-augmented copy (perf ``sp_<factor>-<perf>`` or a foreign source_perf)."""
    perf = str(record.get("perf", ""))
    src = record.get("source_perf")
    return bool(_TEMPO_PERF.match(perf)) or (src not in (None, "", perf))


def _settings_key(features: Any) -> dict:
    """A FeatureSettings' ``key()``, or a copy of an already-keyed dict."""
    return features.key() if hasattr(features, "key") else dict(features)


def _meta_row(rec: dict, n_windows: int) -> dict:
    for k in ("perf", "work"):
        if rec.get(k) in (None, ""):
            raise ManifestError(f"reference record {rec!r} has no {k!r}; use full.txt records")
    dur = rec.get("duration_s", rec.get("dur_s"))
    optional = {k: None if rec.get(k) is None else cast(rec[k])
                for k, cast in (("work_id", int), ("wav", str), ("feat", str))}
    return {"perf": str(rec["perf"]), "work": str(rec["work"]), **optional,
            "duration_s": None if dur is None else float(dur), "n_windows": int(n_windows)}


def _topk_rows(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k smallest entries of each row (ties by index)."""
    n = d.shape[1]
    part = (np.argpartition(d, k - 1, axis=1)[:, :k] if k < n
            else np.tile(np.arange(n), (d.shape[0], 1)))
    vals = np.take_along_axis(d, part, axis=1)
    order = np.lexsort((part, vals), axis=1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


@dataclass
class ReferenceIndex:
    """Reference recordings with unit embeddings, works, centroids and calibration."""

    embeddings: np.ndarray  # [N, D] float32 unit rows
    records: list[dict]  # N metadata rows (_RECORD_KEYS)
    model_fingerprint: str
    feature_settings: dict  # FeatureSettings.key()
    window_settings: dict  # chlib.retrieval.embed.window_settings(...)
    rule: str = "mean"  # "mean" | "min": the distance rule of search and calibration
    expansion: bool = False  # neighbour expansion of search and calibration (protocol)
    windows: np.ndarray | None = None  # [W, D] float32 unit rows, grouped by owner
    window_owner: np.ndarray | None = None  # [W] int64, non-decreasing
    calibration: Calibration | None = None
    centroids: Centroids | None = None
    n_pairs: int = DEFAULT_N_PAIRS
    seed: int = DEFAULT_SEED
    skipped: list[dict] = field(default_factory=list)  # recordings that could not be indexed
    _groups: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _ann: AnnIndex | None = field(default=None, init=False, repr=False, compare=False)
    _nn: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _rv: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

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

    @property
    def readings(self) -> int:
        """Key readings per window (``key_variants`` of the window settings; 1 = none)."""
        return len(self.window_settings.get("key_variants", [0]))

    def window_sets(self) -> list[np.ndarray]:
        """The unit window embeddings of each recording, [n_windows_i x readings, D] each."""
        if self.windows is None or self.window_owner is None:
            raise ConfigError("this index stores no window embeddings (built with "
                              "keep_windows=False)")
        return np.split(self.windows, np.searchsorted(self.window_owner, np.arange(1, len(self))))

    def check_compatible(self, *, fingerprint: str | None = None,
                         features: Any | None = None, where: str = "index") -> None:
        """IndexMismatchError unless the index was built by ``fingerprint`` with ``features``."""
        if fingerprint is not None and fingerprint != self.model_fingerprint:
            raise IndexMismatchError(
                f"{where}: built by the model with fingerprint {self.model_fingerprint}, but the "
                f"model in use has fingerprint {fingerprint}; embeddings of different models are "
                "not comparable: rebuild the index with this model (build_index)")
        have = self.feature_settings
        if features is not None and (want := _settings_key(features)) != have:
            diff = {k: (have.get(k), want.get(k)) for k in set(want) | set(have)
                    if have.get(k) != want.get(k)}
            raise IndexMismatchError(
                f"{where}: built with feature settings {have}, but {want} are in use (differences, "
                f"index vs now: {diff}). Rebuild it from features extracted with these settings.")

    def _query_sets(self, query: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        """(unit query vectors [M, D], window sets [n_windows, D] per query)."""
        if isinstance(query, np.ndarray) or torch.is_tensor(query):
            q = np.asarray(query, dtype=np.float32)
            if q.ndim not in (1, 2) or q.shape[-1] != self.dim:
                raise ConfigError(f"query must be [D] or [M, D] with D={self.dim}, got {q.shape}")
            query = np.atleast_2d(q)[:, None]  # one single-window set per vector
        sets = [np.atleast_2d(np.asarray(s, dtype=np.float32)) for s in query]
        if bad := [s.shape for s in sets if s.shape[1] != self.dim or len(s) == 0]:
            raise ConfigError(f"each query window set must be [n >= 1, {self.dim}], got {bad[0]}")
        return protocol.track_vectors(sets) if sets else np.zeros((0, self.dim)), sets

    def ann(self, kind: str = "auto", **params: Any) -> AnnIndex:
        """The FAISS index of the track vectors (:class:`~chlib.retrieval.ann.AnnIndex`; exact
        up to 200,000 rows, IVF-PQ with exact re-ranking above), built on first use with
        ``kind`` and ``params`` and kept until the rows change."""
        if self._ann is None or len(self._ann) != len(self):
            self._ann = AnnIndex.build(self.embeddings, kind=kind, **params)
        return self._ann

    def _ann_rows(self, vecs: np.ndarray, k: int, by: str) -> list[list[dict] | None]:
        """:meth:`search` through :meth:`ann`; by work, the works of the ``ANN_CANDIDATES`` x k
        nearest recordings ranked by their closest one (None where fewer than k works turn up:
        the caller searches that query exactly)."""
        n_works = len(self._work_groups()[1])
        want = min(k, len(self) if by == "perf" else n_works)
        depth = want if by == "perf" else min(len(self), max(256, ANN_CANDIDATES * want))
        idx, sim = self.ann().search(vecs, depth)
        dist = (1.0 - np.clip(sim, -1.0, 1.0)).astype(np.float32)
        if by == "perf":
            return [self._rows(i, d) for i, d in zip(idx, dist, strict=True)]
        sizes = self._work_sizes()
        out: list[list[dict] | None] = []
        for ii, dd in zip(idx, dist, strict=True):
            rows, seen = [], set()
            for i, d in zip(ii, dd, strict=True):
                if i >= 0 and (w := self.records[int(i)]["work"]) not in seen and len(rows) < want:
                    seen.add(w)
                    rows.append(self._work_row(int(i), float(d), len(rows) + 1, int(sizes[i])))
            out.append(rows if len(rows) == want else None)
        return out

    def reading_vectors(self) -> np.ndarray:
        """float32 [readings, N, D]: each reading's track vectors (rule "mean"; cached)."""
        if self._rv is None or self._rv.shape[1] != len(self):
            self._rv = (self.embeddings[None] if self.readings == 1 else
                        protocol.reading_vectors(self.window_sets(), self.readings))
        return self._rv

    def _ref_distances(self, rows: np.ndarray) -> np.ndarray:
        """Distances [len(rows), N] of the references ``rows`` to every reference."""
        if self.rule == "min":
            sets = self.window_sets()
            return protocol.track_distances([sets[i] for i in rows], sets, rule=self.rule,
                                            readings=self.readings)
        rv = self.reading_vectors()
        return protocol.reading_vector_distances(rv[:, rows], rv)

    def neighbours(self) -> np.ndarray:
        """int64 [N, N_SPARE]: each reference's nearest other references, closest first (-1:
        none); computed in blocks on first use (N x N distances) and kept until rows change."""
        if self._nn is None or len(self._nn) != len(self):
            self._nn = protocol.nearest_others_of(self._ref_distances, len(self),
                                                  block=max(1, BLOCK_ELEMENTS // max(1, len(self))))
        return self._nn

    def search(self, query: Any, k: int = 10, by: str = "perf", *,
               use_faiss: bool | None = None,
               own_rows: Sequence[int] | None = None) -> list[list[dict]]:
        """Per query (a vector [D], vectors [M, D] or window sets [n_windows, D]), the top-``k``
        rows ``{"rank", "perf", "work", "work_id", "distance", "z", "p_value"}``, closest first.
        ``by="work"`` ranks works by their closest recording, adds ``n_work_recordings`` and
        takes the p-value of the closest of m, 1 - (1 - p)^m, so big works are not favoured.
        ``use_faiss``: through :meth:`ann` (rule "mean", one key reading, no expansion only);
        None = when FAISS is installed and the index holds over FAISS_MIN_REFS recordings.
        Queries come with the index's key readings (embedded with :attr:`window_settings`);
        with :attr:`expansion` distances are neighbour-expanded, and ``own_rows`` (one per
        query, -1: none) names a query that is itself a reference (never its own neighbour)."""
        if by not in ("perf", "work"):
            raise ConfigError(f"by must be 'perf' or 'work', got {by!r}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        vecs, sets = self._query_sets(query)
        if len(self) == 0:
            return [[] for _ in sets]
        plain = self.rule == "mean" and self.readings == 1 and not self.expansion
        if use_faiss is None:
            use_faiss = (plain and len(self) > FAISS_MIN_REFS
                         and importlib.util.find_spec("faiss") is not None)
        if use_faiss:
            if not plain:
                raise ConfigError("use_faiss needs rule 'mean', one key reading and no neighbour "
                                  "expansion (one vector per recording)")
            found = self._ann_rows(vecs, k, by)
            exact = [i for i, rows in enumerate(found) if rows is None]
            for i, rows in zip(exact, self.search([sets[i] for i in exact], k, by,
                                                  use_faiss=False), strict=True):
                found[i] = rows
            return found  # type: ignore[return-value]
        out: list[list[dict]] = []
        step = max(1, BLOCK_ELEMENTS // len(self))
        for a in range(0, len(sets), step):
            if self.rule == "min":
                d = protocol.track_distances(sets[a:a + step], self.window_sets(), rule=self.rule,
                                             readings=self.readings)
            elif self.readings > 1:
                d = protocol.reading_vector_distances(
                    protocol.reading_vectors(sets[a:a + step], self.readings),
                    self.reading_vectors())
            else:
                d = protocol.cosine_distances(vecs[a:a + step], self.embeddings)
            if self.expansion and len(self) > 1:
                own = None if own_rows is None else np.asarray(own_rows[a:a + step], np.int64)
                d = protocol.expand_search(d, own, self._ref_distances, self.neighbours())
            if by == "perf":
                out += [self._rows(i, dd) for i, dd in zip(*_topk_rows(d, min(k, len(self))),
                                                           strict=True)]
            else:
                out += [self._work_rows(row, k) for row in d]
        return out

    def _work_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row order grouping works together, group starts, group sizes); cached."""
        if self._groups is None or self._groups[0].size != len(self):
            codes = work_codes(self.works)
            order = np.argsort(codes, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
            sizes = np.diff(np.r_[starts, len(order)])
            per_row = np.empty(len(order), np.int64)
            per_row[order] = np.repeat(sizes, sizes)  # recordings of each row's work
            self._groups = (order, starts, sizes, per_row)
        return self._groups[:3]

    def _work_sizes(self) -> np.ndarray:
        """[N] int64: the number of recordings of each row's work (cached)."""
        self._work_groups()
        return self._groups[3]

    def _work_rows(self, d: np.ndarray, k: int) -> list[dict]:
        """Works ranked by their closest recording, for one query's distances ``d`` [N]."""
        order, starts, sizes = self._work_groups()
        top, wd = _topk_rows(np.minimum.reduceat(d[order], starts)[None], min(k, len(starts)))
        rows = []
        for rank, (g, dist) in enumerate(zip(top[0], wd[0], strict=True), start=1):
            seg = order[starts[g]:starts[g] + sizes[g]]
            rows.append(self._work_row(int(seg[np.argmin(d[seg])]), dist, rank, int(sizes[g])))
        return rows

    def _work_row(self, i: int, dist: float, rank: int, m_w: int) -> dict:
        """Row of a work whose closest recording is ``i``: p of the closest of its ``m_w``."""
        row = self._row(i, dist, rank) | {"n_work_recordings": m_w}
        if np.isfinite(row["p_value"]):
            row["p_value"] = float(1.0 - (1.0 - row["p_value"]) ** m_w)
        return row

    def _row(self, i: int, dist: float, rank: int) -> dict:
        r, cal = self.records[i], self.calibration
        return {"rank": rank, "perf": r["perf"], "work": r["work"], "work_id": r.get("work_id"),
                "distance": float(dist), "z": float(cal.z_score(dist)) if cal else float("nan"),
                "p_value": float(cal.p_value(dist)) if cal else float("nan")}

    def _rows(self, idx: np.ndarray, dist: np.ndarray) -> list[dict]:
        return [self._row(int(i), d, r) for r, (i, d) in
                enumerate(zip(idx, dist, strict=True), start=1) if i >= 0]

    def recalibrate(self) -> None:
        """Recompute the calibration over the whole index (seeded: deterministic)."""
        i, j, method = sample_cross_work_pairs(self.works, self.n_pairs, self.seed)
        sets = self.window_sets() if self.rule == "min" else []
        vecs = self.reading_vectors() if self.rule == "mean" and self.readings > 1 \
            else self.embeddings

        def pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return protocol.pair_distances(sets, vecs, a, b, rule=self.rule,
                                           readings=self.readings)
        d = [] if i.size < 2 else (protocol.expanded_pairs(pairs, self.neighbours(), i, j)
                                   if self.expansion else pairs(i, j))
        self.calibration = calibrate_distances(d, seed=self.seed, method=method, rule=self.rule)

    def _refresh(self) -> None:
        """Centroids and calibration after the rows changed."""
        self._groups = self._ann = self._nn = self._rv = None
        self.centroids = compute_centroids(self.embeddings, self.works) if len(self) else None
        self.recalibrate()

    def add(self, records: Sequence[dict], windows: Sequence[np.ndarray]) -> None:
        """Append recordings given their raw window embeddings ([n_windows, D] each); a known
        perf is refused. The result equals a fresh build with the rows in this order."""
        if len(records) != len(windows):
            raise ConfigError(f"add: {len(records)} records but {len(windows)} window sets")
        known = set(self.perfs)
        rows, sets = [], []
        for rec, w in zip(records, windows, strict=True):
            w = np.atleast_2d(np.asarray(w, dtype=np.float32))
            if w.shape[1] != self.dim and len(self):
                raise ConfigError(f"add: {rec.get('perf')!r} has D={w.shape[1]}, index D={self.dim}")
            row = _meta_row(rec, len(protocol.reading_rows(w, self.readings)))
            if row["perf"] in known:
                raise ConfigError(f"add: perf {row['perf']!r} is already in the index; remove it first")
            known.add(row["perf"])
            rows.append(row)
            sets.append(w)
        if not rows:
            return
        n0, dim = len(self), sets[0].shape[1]
        self.embeddings = np.concatenate([  # one vector per recording: its estimated key's
            self.embeddings.reshape(-1, dim),
            protocol.track_vectors([protocol.reading_rows(w, self.readings) for w in sets])])
        self.records = self.records + rows
        if self.windows is not None:
            self.windows = np.concatenate([self.windows.reshape(-1, dim),
                                           *map(protocol.unit_rows, sets)])
            owners = np.repeat(np.arange(n0, n0 + len(sets)), [len(w) for w in sets])
            self.window_owner = np.concatenate([self.window_owner, owners]).astype(np.int64)
        self._refresh()

    def remove(self, *, perfs: Sequence[str] | None = None,
               works: Sequence[str] | None = None) -> int:
        """Remove recordings by perf id and/or whole works (the others keep their order);
        centroids and calibration are recomputed. Returns how many were removed."""
        drop_p = {str(p) for p in (perfs or [])}
        drop_w = {str(w) for w in (works or [])}
        keep = np.array([r["perf"] not in drop_p and r["work"] not in drop_w
                         for r in self.records], bool)
        if keep.all():
            return 0
        self.embeddings = self.embeddings[keep]
        self.records = [r for r, k in zip(self.records, keep, strict=True) if k]
        if self.windows is not None and self.window_owner is not None:
            wk = keep[self.window_owner]
            self.windows = self.windows[wk]
            self.window_owner = (np.cumsum(keep) - 1)[self.window_owner[wk]].astype(np.int64)
        self._refresh()
        return int((~keep).sum())

    def add_tracks(self, model: torch.nn.Module, records: Sequence[dict], hp: Any, *,
                   device: str | torch.device | None = None,
                   manifest_path: str | os.PathLike | None = None,
                   progress: bool = True) -> list[dict]:
        """Embed ``records`` (manifest rows with ``feat``) with the index's ``model`` (checked)
        and :meth:`add` them. Returns the failures (``{"perf", "feat", "reason"}``)."""
        self.check_compatible(fingerprint=model_fingerprint(model.state_dict()),
                              features=hp.features)
        recs, wins, failed = _embed_records(model, records, hp, self.window_settings,
                                            device=device, manifest_path=manifest_path,
                                            progress=progress)
        self.add(recs, wins)
        return failed

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
        if self._ann is not None and self._ann.kind != "flat" and len(self._ann) == len(self):
            self._ann.save(folder / ANN_DIR)  # slow to rebuild (k-means); an exact one is not
        else:  # a saved one is stale: it indexed other rows
            for name in ("ann.json", "index.faiss"):
                (folder / ANN_DIR / name).unlink(missing_ok=True)
        write_json(folder / "meta.json", {
            "format": INDEX_FORMAT, "kind": "chlib reference index",
            "n_recordings": len(self), "embed_dim": self.dim,
            **{k: getattr(self, k) for k in (*_META_KEYS, *_OPTIONAL_META)},
            "calibration": self.calibration.to_json() if self.calibration else None,
            "centroids": self.centroids.to_json() if self.centroids is not None else None,
            "skipped": self.skipped, "files": files,
        })
        for stale in ("windows.npy", "window_owner.npy", "centroids.npy"):
            if stale not in files and (folder / stale).exists():
                (folder / stale).unlink()
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, expect_fingerprint: str | None = None,
             expect_features: Any | None = None, verify: bool = True,
             feature_roots: Sequence[str | os.PathLike] | None = None) -> ReferenceIndex:
        """Read an index written by :meth:`save`; another model or feature settings than
        ``expect_*`` is an IndexMismatchError, and so is a damaged or tampered index: a file
        listed in ``meta.json`` that resolves outside ``folder``, or (given ``feature_roots``) a
        record whose ``feat`` resolves outside them (neither is opened). ``verify`` checks the
        files' SHA-256."""
        folder = Path(folder)
        where = meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise IndexMismatchError(f"{folder}: no meta.json, so no chlib index here; build one "
                                     "with chlib.retrieval.index.build_index(...) and save it")
        try:
            _refuse_outside(meta_path, [folder], "meta.json")
            meta = read_json(meta_path)
            if meta.get("format") != INDEX_FORMAT:
                raise IndexMismatchError(f"{folder}: index format {meta.get('format')!r}, this "
                                         f"chlib reads format {INDEX_FORMAT}; rebuild the index")
            files = {str(name): str(info["sha256"]) for name, info in meta["files"].items()}
            for name in dict.fromkeys(("embeddings.npy", "records.jsonl", *files)):
                _refuse_outside(p := folder / name, [folder], f"{meta_path}: file entry {name!r}")
                if not p.is_file() or (verify and file_sha256(p) != files[name]):
                    raise IndexMismatchError(f"{p}: missing or unlike meta.json (an interrupted "
                                             "save or an edit); save or rebuild the index")
            where = folder / "records.jsonl"
            records = _read_records(where, feature_roots)
            arrays = {}
            for name in (n for n in files if n.endswith(".npy")):
                where = folder / name
                arrays[name] = np.load(where, allow_pickle=False)
            where, cal, cen = meta_path, meta.get("calibration"), meta.get("centroids")
            idx = cls(
                embeddings=arrays["embeddings.npy"], records=records,
                **{k: meta[k] for k in _META_KEYS},
                **{k: meta.get(k, v) for k, v in _OPTIONAL_META.items()},
                windows=arrays.get("windows.npy"),
                window_owner=arrays.get("window_owner.npy"),
                calibration=Calibration.from_json(cal) if cal else None,
                centroids=None if cen is None else Centroids.from_json(
                    cen, arrays.get("centroids.npy")),
                skipped=list(meta.get("skipped") or []))
            if idx.embeddings.ndim != 2 or len(records) != len(idx):
                raise ValueError(f"{len(records)} records but embeddings of shape "
                                 f"{idx.embeddings.shape}")
        except (ValueError, KeyError, TypeError, AttributeError, OSError, EOFError) as e:
            raise IndexMismatchError(f"{where}: damaged index ({type(e).__name__}: {e}); rebuild "
                                     "it (06_identify does, or build_index(...).save(folder))"
                                     ) from None
        idx.check_compatible(fingerprint=expect_fingerprint, features=expect_features,
                             where=str(folder))
        if ((folder / ANN_DIR / "ann.json").is_file()  # tampered: IndexMismatchError
                and importlib.util.find_spec("faiss") is not None):  # else: exact search
            ann = AnnIndex.load(folder / ANN_DIR, dim=idx.dim)
            idx._ann = ann if len(ann) == len(idx) else None  # an older save's: rebuilt on use
        return idx


def _refuse_outside(path: str | os.PathLike, roots: Sequence[str | os.PathLike], what: str
                    ) -> None:
    """IndexMismatchError (tampering) unless ``path`` resolves inside one of ``roots``
    (symlinks followed; the file itself is not opened)."""
    p = Path(path).resolve()
    if not any(p.is_relative_to(Path(r).resolve()) for r in roots):
        raise IndexMismatchError(f"{what} resolves to {p}, outside {', '.join(map(str, roots))}; "
                                 "treated as tampering (not opened): rebuild the index")


def _read_records(path: Path, feature_roots: Sequence[str | os.PathLike] | None) -> list[dict]:
    """The rows of ``records.jsonl`` (ValueError naming the line of a torn or foreign one); a
    ``feat`` outside ``feature_roots`` (when given) is refused as tampering."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            if line.strip():
                rows.append(row := json.loads(line))
                if not (isinstance(row, dict) and "perf" in row and "work" in row):
                    raise ValueError("not a record with perf and work")
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
        if line.strip() and feature_roots is not None and row.get("feat"):
            _refuse_outside(row["feat"], feature_roots,
                            f"{path}, line {n}: feature path {row['feat']!r} of {row['perf']!r}")
    return rows


def index_from_windows(records: Sequence[dict], windows: Sequence[np.ndarray], *,
                       model_fingerprint: str, feature_settings: Any, window_settings: dict,
                       rule: str = "mean", keep_windows: bool = True,
                       n_pairs: int = DEFAULT_N_PAIRS, seed: int = DEFAULT_SEED,
                       skipped: list[dict] | None = None,
                       expansion: bool = False) -> ReferenceIndex:
    """An index (centroids and calibration included) from reference records and their raw
    window embeddings ([n_windows, D] each). ``rule="min"`` needs ``keep_windows=True``."""
    protocol.check_rule(rule)
    if rule == "min" and not keep_windows:
        raise ConfigError("rule 'min' compares window embeddings: keep_windows must be True")
    if "key_variants" in window_settings and not keep_windows:
        raise ConfigError("key readings are compared window by window: keep_windows must be True")
    if len(records) != len(windows):
        raise ConfigError(f"{len(records)} records but {len(windows)} window sets")
    dim = int(np.atleast_2d(windows[0]).shape[1]) if len(windows) else 0
    idx = ReferenceIndex(
        embeddings=np.zeros((0, dim), np.float32), records=[],
        model_fingerprint=str(model_fingerprint), feature_settings=_settings_key(feature_settings),
        window_settings=dict(window_settings), rule=rule, expansion=bool(expansion),
        windows=np.zeros((0, dim), np.float32) if keep_windows else None,
        window_owner=np.zeros(0, np.int64) if keep_windows else None,
        n_pairs=int(n_pairs), seed=int(seed), skipped=list(skipped or []),
    )
    idx.add(records, windows)
    return idx


def _embed_records(model: torch.nn.Module, records: Sequence[dict], hp: Any, wset: dict,
                   **kw: Any) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """:func:`embed_recordings`: (records, window embeddings, ``{"perf", "feat", "reason"}``)."""
    failures: list[dict] = []
    wins = embed_recordings(model, list(records), hp, hop=wset["hop"], tail=wset["tail"],
                            min_tail=wset["min_tail"], failures=failures, **kw)
    ok = [i for i, w in enumerate(wins) if w is not None]
    failed = [{"perf": records[f["index"]].get("perf"), "feat": f["feat"], "reason": f["reason"]}
              for f in failures]
    return [records[i] for i in ok], [wins[i] for i in ok], failed


def build_index(model: torch.nn.Module, records: Sequence[dict], hp: Any, *,
                device: str | torch.device | None = None, rule: str | None = None,
                keep_windows: bool = True, tail: str = "shift", hop: int | None = None,
                min_tail: float = DEFAULT_MIN_TAIL, drop_tempo_copies: bool = True,
                n_pairs: int = DEFAULT_N_PAIRS, seed: int = DEFAULT_SEED,
                manifest_path: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> ReferenceIndex:
    """Embed every window of reference recordings (full.txt records; ``cache_dir`` caches them)
    and index them under ``rule`` (None = ``hp.distance_rule``), tempo copies left out unless
    ``drop_tempo_copies=False``; unreadable features go to ``index.skipped``."""
    rule = protocol.check_rule(rule_of(hp) if rule is None else rule)
    recs = [r for r in records if not (drop_tempo_copies and is_tempo_copy(r))]
    for r in recs:
        _meta_row(r, 0)  # perf and work present
    if dup := sorted(p for p, n in Counter(str(r["perf"]) for r in recs).items() if n > 1):
        raise ManifestError(f"duplicate perf ids in the reference records: {dup[:5]}")
    wset = hp_window_settings(hp, hop=hop, tail=tail, min_tail=min_tail)
    recs, wins, failed = _embed_records(model, recs, hp, wset, device=device, progress=progress,
                                        manifest_path=manifest_path, cache_dir=cache_dir)
    return index_from_windows(
        recs, wins, model_fingerprint=model_fingerprint(model.state_dict()),
        feature_settings=hp.features, window_settings=wset, rule=rule,
        keep_windows=keep_windows, n_pairs=n_pairs, seed=seed, skipped=failed,
        expansion=expansion_of(hp),
    )
