"""What the reference index knows about its distances: the distribution of distances between
recordings of different works (:class:`Calibration`: z-scores, p-values) and per-work
:class:`Centroids`, grouped by the ``work`` column (not by ``perf.split(".")``, bug 13.4.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from chlib.core.errors import ConfigError

__all__ = ["DEFAULT_N_PAIRS", "DEFAULT_SEED", "ecdf_probabilities", "Calibration", "work_codes",
           "sample_cross_work_pairs", "calibrate_distances", "Centroids", "compute_centroids"]

DEFAULT_N_PAIRS = 50_000  # cross-work pairs sampled for the calibration (the fork's value)
DEFAULT_SEED = 12345  # the fork's calibration seed
RADIUS_STDS = 1.5  # centroid radius = mean + 1.5 std of member distances (the fork's rule)


def ecdf_probabilities() -> np.ndarray:
    """The fork's 1001 ECDF anchors (fact sheet 9.4), increasing: 500 log-spaced from 1e-6 to
    below 0.5, 0.5, and the 500 mirrored 1 - p: dense in both tails, where p-values are read."""
    low = np.logspace(np.log10(1e-6), np.log10(0.5), 501)[:-1]
    return np.concatenate([low, [0.5], (1.0 - low)[::-1]])


@dataclass
class Calibration:
    """Distances between recordings of different works under ``rule``: ``mu``/``sigma`` (ddof
    1) give the z-score, ``quantiles`` at ``probs`` the p-value; ``method`` "all" or "sampled"."""

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
        """Smallest p-value reported, 1 / (n_pairs + 1) (the fork reported 1e-6)."""
        return 1.0 / (self.n_pairs + 1)

    def z_score(self, d: np.ndarray | float) -> np.ndarray | float:
        """``(d - mu) / sigma``: negative = closer than typical unrelated pairs."""
        d = np.asarray(d, dtype=np.float64)
        z = (d - self.mu) / self.sigma if self.sigma > 0 else np.full_like(d, np.nan)
        return z if z.ndim else float(z)

    def p_value(self, d: np.ndarray | float) -> np.ndarray | float:
        """Empirical P(unrelated distance <= d) in [:attr:`p_floor`, 1], interpolated on the ECDF
        anchors (right-continuous: anchors sharing a distance take the largest probability)."""
        q = self.quantiles.astype(np.float64)
        last = q.size - 1 - np.unique(q[::-1], return_index=True)[1]  # last anchor per value
        out = np.interp(np.asarray(d, dtype=np.float64), q[last],
                        self.probs.astype(np.float64)[last], left=self.p_floor, right=1.0)
        out = np.clip(out, self.p_floor, 1.0)
        return out if out.ndim else float(out)

    def to_json(self) -> dict:
        return {**asdict(self), "quantiles": self.quantiles.tolist(), "probs": self.probs.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(**{**d, "quantiles": np.asarray(d["quantiles"], dtype=np.float32),
                      "probs": np.asarray(d["probs"], dtype=np.float32)})


def work_codes(works: Sequence) -> np.ndarray:
    """int64 codes [N] of work names (equal names <=> equal codes, in sorted name order)."""
    return np.unique(np.asarray([str(w) for w in works]), return_inverse=True)[1].astype(np.int64)


def sample_cross_work_pairs(works: Sequence, n_pairs: int = DEFAULT_N_PAIRS,
                            rng: np.random.Generator | int = DEFAULT_SEED, *,
                            enumerate_limit: int = 2_000_000
                            ) -> tuple[np.ndarray, np.ndarray, str]:
    """``(i, j, method)``: up to ``n_pairs`` distinct pairs i < j (int64, sorted) of recordings
    of different works, uniform over such pairs; ``method`` "all" or "sampled". Up to
    ``enumerate_limit`` pairs are enumerated, beyond random pairs are drawn and rejected."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    codes = work_codes(works)
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
        if (need := want - keys.size) <= 0:
            break
        a = rng.integers(0, n, size=2 * need + 16)
        b = rng.integers(0, n, size=2 * need + 16)
        ok = codes[a] != codes[b]
        cand = np.concatenate([keys, np.minimum(a[ok], b[ok]) * n + np.maximum(a[ok], b[ok])])
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
    return Calibration(mu=float(ds.mean()), sigma=float(ds.std(ddof=1)),
                       quantiles=ds[idx].astype(np.float32), probs=probs.astype(np.float32),
                       n_pairs=int(ds.size), seed=int(seed), method=method, rule=rule)


@dataclass
class Centroids:
    """Per-work spherical means of unit recording embeddings, rows sorted by work name;
    ``coherence`` = norm of the mean (1 = all identical, near 0 = spread), ``radius`` = mean +
    1.5 std (ddof 0) of the members' cosine distances to the centroid."""

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

    def to_json(self) -> dict:
        """Everything but ``vectors`` (stored as ``centroids.npy``)."""
        return {"works": self.works, "coherence": self.coherence.tolist(),
                "radius": self.radius.tolist(), "n_members": self.n_members.tolist()}

    @classmethod
    def from_json(cls, d: dict, vectors: np.ndarray) -> Centroids:
        return cls(list(d["works"]), vectors, np.asarray(d["coherence"], np.float64),
                   np.asarray(d["radius"], np.float64), np.asarray(d["n_members"], np.int64))


def compute_centroids(embeddings: np.ndarray, works: Sequence) -> Centroids:
    """Centroids of unit ``embeddings`` [N, D] grouped by ``works`` [N] (the work column)."""
    names, codes = np.unique(np.asarray([str(w) for w in works]), return_inverse=True)
    sizes = np.bincount(codes, minlength=names.size)
    groups = np.split(embeddings[np.argsort(codes, kind="stable")].astype(np.float64),
                      np.cumsum(sizes)[:-1])
    vecs = np.zeros((names.size, embeddings.shape[1]), np.float32)
    coh, rad = np.zeros((2, names.size))
    for k, members in enumerate(groups):
        m = members.mean(axis=0)
        norm = float(np.linalg.norm(m))
        centre = members[0] if norm < 1e-8 else m / norm  # members that cancel out: coherence 0
        coh[k] = 0.0 if norm < 1e-8 else norm
        d = 1.0 - np.clip(members @ centre, -1.0, 1.0)
        vecs[k], rad[k] = centre, d.mean() + RADIUS_STDS * d.std()
    return Centroids([str(n) for n in names], vecs, coh, rad, sizes.astype(np.int64))
