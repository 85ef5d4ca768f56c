"""Nearest-neighbour search over 10^6-10^7 unit reference vectors with FAISS (issue 14).

Cosine similarity is the inner product of unit rows (``protocol.unit_rows``), so every kind
uses ``METRIC_INNER_PRODUCT`` and returns similarities (1 = same direction), not distances.

Kinds (``kind=``):

- ``"flat"``: exact ``IndexFlatIP`` (``IndexScalarQuantizer`` QT_fp16 with ``float16=True``:
  half the memory, similarities within ~1e-3). ``"auto"`` picks it up to ``exact_max`` rows
  (200,000 by default: ~2 ms per query at 10^5 rows, D=128, 2 cores: no approximation needed).
- ``"ivfpq"``: the approximate default above that. An inverted file (``nlist`` ~ 4 sqrt(N)
  k-means cells, ``nprobe`` of them scanned) of product-quantised codes (``pq_m`` sub-vectors
  of ``pq_nbits`` bits: D/4 bytes per row), re-ranked exactly (``refine_factor`` x k
  candidates re-scored from rows stored in an ``IndexFlatIP``, or QT_fp16 with ``float16``:
  ``IndexRefine``), so the similarities returned are exact (to ~1e-3 with ``float16``).
  Chosen over HNSW because its build is a k-means on a sample plus one linear pass (20-40 s
  at 10^6 and 325 s at 10^7 on 2 shared cores; HNSW's graph insertion took 26 s at 10^5 and
  grows faster than N: an hour or more at 10^7, estimated), its memory is predictable (D/4 +
  8 bytes per row of codes and ids plus the re-rank store: 5.3 GB measured at N=10^7, D=128,
  ~2.9 GB with ``float16``), and ``nprobe`` trades speed for recall at search time without
  a rebuild.
- ``"hnsw"``: ``IndexHNSWFlat`` (``IndexHNSWSQ`` fp16 with ``float16``), ``hnsw_m`` links per
  node, ``ef_search`` candidates; faster per query at 10^6 when its build time is affordable.

On disk, pickle-free: ``index.faiss`` (FAISS's own format, ``faiss.write_index``) and
``ann.json`` (kind, parameters, N, D, the file's SHA-256), both written atomically, the JSON
last; :meth:`AnnIndex.load` checks the checksum, N and D before using the file.

FAISS is optional (``pip install faiss-cpu``); it is imported only when an index is built or
loaded. Runs on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chlib.core.errors import ConfigError, IndexMismatchError
from chlib.core.io import atomic_open, file_sha256, read_json, write_json

__all__ = ["ANN_FORMAT", "EXACT_MAX", "KINDS", "AnnParams", "default_params", "AnnIndex",
           "recall_at"]

ANN_FORMAT = 1
EXACT_MAX = 200_000  # "auto" searches exactly up to this many rows
KINDS = ("auto", "flat", "ivfpq", "hnsw")
INDEX_FILE, META_FILE = "index.faiss", "ann.json"
UNIT_TOL = 1e-3  # |norm - 1| allowed for a "unit" row (float16 round trips stay well inside)


def _faiss() -> Any:
    try:
        import faiss  # optional: only large reference libraries need it
    except ImportError:
        raise ConfigError("chlib.retrieval.ann needs FAISS: pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True)
class AnnParams:
    """Parameters of one index; :func:`default_params` derives them from N and D."""

    kind: str  # "flat" | "ivfpq" | "hnsw" (resolved, never "auto")
    float16: bool = False  # store rows (flat, hnsw, re-rank store) as float16
    nlist: int = 0  # ivfpq: k-means cells, ~4 sqrt(N)
    nprobe: int = 0  # ivfpq: cells scanned per query
    pq_m: int = 0  # ivfpq: sub-vectors per row (divides D); pq_m * pq_nbits / 8 bytes per code
    pq_nbits: int = 8  # ivfpq: bits per sub-vector code
    refine_factor: int = 4  # ivfpq: candidates re-ranked exactly = refine_factor * k (0: none)
    train_size: int = 0  # ivfpq: rows sampled to train k-means and PQ
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw: candidates while inserting
    ef_search: int = 128  # hnsw: candidates while searching (raised to k when smaller)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def default_params(n: int, d: int, *, kind: str = "auto", float16: bool = False,
                   exact_max: int = EXACT_MAX, **overrides: Any) -> AnnParams:
    """The parameters for ``n`` rows of dimension ``d``: ``kind="auto"`` is ``"flat"`` up to
    ``exact_max`` rows, else ``"ivfpq"`` with nlist = 4 sqrt(n) (at most n / 39, FAISS's
    minimum of training points per cell), nprobe = nlist / 16 in [16, 2048] (on random unit
    rows, the worst case for an inverted file, nlist / 16 gave recall@10 0.997 of planted
    copies at N=10^6, nlist / 32 0.992, nlist / 64 0.974), pq_m = D / 4 (the
    largest divisor of D not above it), 8 bits, train_size = 40 nlist. ``overrides`` replace any
    field (unknown names or impossible values: ConfigError)."""
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}: use one of {KINDS}")
    if n < 1 or d < 1:
        raise ConfigError(f"an index needs at least one row of dimension >= 1, got [{n}, {d}]")
    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivfpq"
    fields = {f.name for f in dataclasses.fields(AnnParams)} - {"kind", "float16"}
    if bad := sorted(set(overrides) - fields):
        raise ConfigError(f"unknown index parameter(s) {bad}; known: {sorted(fields)}")
    base: dict[str, Any] = {}
    if kind == "ivfpq":
        nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39)))
        base = {"nlist": nlist, "nprobe": int(min(nlist, max(16, min(2048, nlist // 16)))),
                "pq_m": max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0),
                "train_size": int(min(n, 40 * nlist))}
    p = AnnParams(kind=kind, float16=bool(float16), **{**base, **overrides})
    ints = {k: v for k, v in p.to_json().items() if k not in ("kind", "float16")}
    if any(not isinstance(v, (int, np.integer)) or v < 0 for v in ints.values()):
        raise ConfigError(f"index parameters must be integers >= 0, got {ints}")
    if kind == "ivfpq" and (d % max(p.pq_m, 1) or not 1 <= p.nlist <= n or p.nprobe < 1
                            or not 1 <= p.pq_nbits <= 16):
        raise ConfigError(f"ivfpq parameters {ints} impossible for N={n}, D={d}: pq_m must "
                          "divide D, 1 <= nlist <= N, nprobe >= 1, 1 <= pq_nbits <= 16")
    if kind == "hnsw" and p.hnsw_m < 2:
        raise ConfigError(f"hnsw_m={p.hnsw_m}: use >= 2 (32 is typical)")
    return p


def _rows(x: Any, what: str, d: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 [M, D] array of finite unit rows, else ConfigError."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or (d is not None and a.shape[1] != d):
        want = f"[M, {d}]" if d is not None else "[N, D]"
        raise ConfigError(f"{what}: shape {a.shape}, expected {want} with M >= 1 (one row per "
                          "vector; a single vector is x[None, :])")
    a = np.ascontiguousarray(a, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", a, a))  # [N]: no [N, D] temporary
    if not np.isfinite(norms).all():
        raise ConfigError(f"{what}: contains NaN or inf; re-embed those recordings")
    if (worst := float(np.abs(norms - 1.0).max())) > UNIT_TOL:
        raise ConfigError(f"{what}: rows must be unit vectors (|norm - 1| <= {UNIT_TOL}), worst "
                          f"is off by {worst:.3g}; normalise with protocol.unit_rows")
    return a


def recall_at(k: int, exact_idx: np.ndarray, found_idx: np.ndarray) -> float:
    """Share of queries whose true nearest neighbour is among the first ``k`` found.

    exact_idx : [M] int (the planted answer) or [M, >= 1] (an exact search; column 0 counts)
    found_idx : [M, >= k] int, the approximate search's indices
    Returns a float in [0, 1] (FAISS's "1-recall@k")."""
    e, f = np.asarray(exact_idx), np.asarray(found_idx)
    e = e[:, 0] if e.ndim == 2 else e
    if k < 1 or f.ndim != 2 or f.shape[1] < k or len(e) != len(f) or len(f) == 0:
        raise ConfigError(f"recall_at: k={k}, exact {np.shape(exact_idx)}, found {f.shape}: need "
                          "k >= 1 and found [M, >= k] for the same M >= 1 queries")
    return float((f[:, :k] == e[:, None]).any(axis=1).mean())


def _new_index(faiss: Any, x: np.ndarray, p: AnnParams, seed: int) -> Any:
    """A trained FAISS index of kind ``p.kind`` holding the rows of ``x`` [N, D]."""
    d = x.shape[1]
    ip = faiss.METRIC_INNER_PRODUCT
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if p.kind == "flat":
        index = (faiss.IndexScalarQuantizer(d, fp16, ip) if p.float16
                 else faiss.IndexFlatIP(d))
    elif p.kind == "hnsw":
        index = (faiss.IndexHNSWSQ(d, fp16, p.hnsw_m, ip) if p.float16
                 else faiss.IndexHNSWFlat(d, p.hnsw_m, ip))
        index.hnsw.efConstruction = p.ef_construction
    else:
        quantizer = faiss.IndexFlatIP(d)  # the wrappers keep their parts alive
        index = ivf = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.pq_nbits, ip)
        ivf.cp.seed = ivf.pq.cp.seed = seed
        sample = x[np.sort(np.random.default_rng(seed).choice(len(x), p.train_size,
                                                              replace=False))]
        ivf.train(sample)  # before wrapping: IndexRefine.train was several times slower
        if p.refine_factor:
            store = (faiss.IndexScalarQuantizer(d, fp16, ip) if p.float16
                     else faiss.IndexFlatIP(d))
            store.train(sample)
            index = faiss.IndexRefine(ivf, store)
            index.k_factor = float(p.refine_factor)
    if not index.is_trained:
        index.train(x)  # scalar quantisers: fp16 needs no statistics, but FAISS asks
    index.add(x)
    return index


class AnnIndex:
    """A FAISS index over N unit rows; results are row positions 0..N-1 in build order.

    Build with :meth:`build`, read with :meth:`load`. ``threads`` (None: all cores) is passed to
    ``faiss.omp_set_num_threads`` for each build and search and the previous count restored
    after (the OpenMP pool is the process's: torch shares it)."""

    def __init__(self, index: Any, params: AnnParams, *, threads: int | None = None) -> None:
        self._index, self.params = index, params
        self.threads = threads
        if threads is not None and int(threads) < 1:
            raise ConfigError(f"threads={threads}: use >= 1 or None (all cores)")

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def kind(self) -> str:
        return self.params.kind

    @contextlib.contextmanager
    def _threads(self) -> Iterator[Any]:
        """FAISS with ``self.threads`` OpenMP threads, the process's setting restored after
        (the OpenMP pool is shared: torch would keep FAISS's count otherwise)."""
        faiss = _faiss()
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(int(self.threads or os.cpu_count() or 1))
        try:
            yield faiss
        finally:
            faiss.omp_set_num_threads(before)

    @classmethod
    def build(cls, vectors: np.ndarray, *, kind: str = "auto", float16: bool = False,
              seed: int = 0, exact_max: int = EXACT_MAX, threads: int | None = None,
              **params: Any) -> AnnIndex:
        """Index ``vectors`` ([N, D] unit rows, float32 or castable). ``kind`` is one of
        ``KINDS``; ``params`` override :func:`default_params` (e.g. ``nprobe=64``); ``seed``
        fixes the training sample and k-means, so a rebuild gives the same index."""
        x = _rows(vectors, "build: vectors")
        p = default_params(len(x), x.shape[1], kind=kind, float16=float16,
                           exact_max=exact_max, **params)
        self = cls(None, p, threads=threads)
        with self._threads() as faiss:
            self._index = _new_index(faiss, x, p, seed)
        return self

    def search(self, q: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar rows to each query.

        q : [M, D] unit rows; k : int >= 1; nprobe / ef_search override the index's setting
        for this call. Returns (idx [M, k] int64, sim [M, k] float32 cosine similarity),
        best first; where fewer than k rows are found, idx is -1 and sim is -inf."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k={k!r}: the number of neighbours must be an integer >= 1")
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name}={v}: use >= 1 or None (the index's setting)")
        x = _rows(q, "search: queries", self.dim)
        p, index = self.params, self._index
        with self._threads() as faiss:
            if p.kind == "ivfpq":
                faiss.extract_index_ivf(index).nprobe = int(nprobe or p.nprobe)
            elif p.kind == "hnsw":
                index.hnsw.efSearch = int(max(ef_search or p.ef_search, k))
            sim, idx = index.search(x, int(k))
        idx = idx.astype(np.int64)
        sim = np.where(idx < 0, -np.inf, sim).astype(np.float32)
        return idx, sim

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``index.faiss`` and ``ann.json`` (kind, parameters, N, D, SHA-256) into
        ``folder``, each atomically, the JSON last. Returns the folder."""
        faiss, folder = _faiss(), Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(folder / INDEX_FILE) as f:
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
        write_json(folder / META_FILE, {
            "format": ANN_FORMAT, "kind": "chlib ann index", "index_kind": self.kind,
            "params": self.params.to_json(), "n": len(self), "dim": self.dim,
            "file": INDEX_FILE, "sha256": file_sha256(folder / INDEX_FILE),
            "faiss_version": getattr(faiss, "__version__", None)})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, dim: int | None = None, n: int | None = None,
             threads: int | None = None) -> AnnIndex:
        """Read an index written by :meth:`save`. A missing, damaged or edited file (checksum),
        an N or D unlike ``ann.json``, or unlike ``dim`` / ``n`` when given (the embeddings in
        use), is an IndexMismatchError naming the file: rebuild the index."""
        faiss, folder = _faiss(), Path(folder)
        meta_path, path = folder / META_FILE, folder / INDEX_FILE
        fix = "rebuild it (AnnIndex.build(vectors).save(folder))"
        if not meta_path.is_file() or not path.is_file():
            raise IndexMismatchError(f"{folder}: no {META_FILE} + {INDEX_FILE}, so no chlib ANN "
                                     f"index here; {fix}")
        try:
            meta = read_json(meta_path)
            if meta.get("format") != ANN_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, this chlib reads {ANN_FORMAT}")
            params = AnnParams(**meta["params"])
            want_n, want_d = int(meta["n"]), int(meta["dim"])
            sha = str(meta["sha256"])
        except (ValueError, KeyError, TypeError) as e:
            raise IndexMismatchError(f"{meta_path}: damaged ({type(e).__name__}: {e}); {fix}"
                                     ) from None
        if file_sha256(path) != sha:
            raise IndexMismatchError(f"{path}: SHA-256 unlike {meta_path} (an edit, a damaged "
                                     f"copy or an interrupted save); not opened: {fix}")
        if dim is not None and int(dim) != want_d:
            raise IndexMismatchError(f"{path}: D={want_d}, but the embeddings in use have "
                                     f"D={dim} (another model?); {fix} with this model")
        if n is not None and int(n) != want_n:
            raise IndexMismatchError(f"{path}: N={want_n} rows, but the reference library has "
                                     f"{n}; {fix} after adding or removing recordings")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexMismatchError(f"{path}: FAISS cannot read it ({e}); {fix}") from None
        if (int(index.ntotal), int(index.d)) != (want_n, want_d):
            raise IndexMismatchError(f"{path}: holds [{index.ntotal}, {index.d}], {meta_path} "
                                     f"says [{want_n}, {want_d}]; {fix}")
        return cls(index, params, threads=threads)
