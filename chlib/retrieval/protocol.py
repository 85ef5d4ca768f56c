"""The distance rule: window embeddings -> track representation -> track distance.

The one owner of how two recordings are compared (evaluation, index, calibration, identify).
A recording is a set of L2-normalised window embeddings ``[n_windows, D]``, ``1 - cos`` apart
(in [0, 2]). :data:`DISTANCE_RULES`: ``"min"`` = minimum over all window pairs (the original's
rule: the best-matching passages decide); ``"mean"`` = distance of the unit mean window vectors
(:func:`track_vector`: one vector per recording, FAISS-able).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chlib.core.errors import ConfigError

__all__ = ["DISTANCE_RULES", "check_rule", "unit_rows", "track_vector", "track_vectors",
           "cosine_distances", "track_distances", "pair_distances"]

DISTANCE_RULES = ("min", "mean")


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`DISTANCE_RULES`, else ConfigError."""
    if rule not in DISTANCE_RULES:
        raise ConfigError(f"distance rule must be one of {DISTANCE_RULES}, got {rule!r}")
    return rule


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` [N, D] divided by their L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def track_vector(windows: np.ndarray) -> np.ndarray:
    """Unit mean [D] of a track's unit windows [n_windows, D] (the first if they cancel out)."""
    w = unit_rows(np.atleast_2d(np.asarray(windows, dtype=np.float32)))
    m = w.mean(axis=0)
    n = float(np.linalg.norm(m))
    return w[0].copy() if n < 1e-8 else (m / n).astype(np.float32)


def track_vectors(tracks: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`track_vector` of each track, stacked: float32 [N, D]."""
    return np.stack([track_vector(t) for t in tracks]).astype(np.float32)


def cosine_distances(q_unit: np.ndarray, r_unit: np.ndarray) -> np.ndarray:
    """``1 - q . r`` for unit rows [M, D] x [N, D]: float32 [M, N] in [0, 2]."""
    return (1.0 - np.clip(q_unit @ r_unit.T, -1.0, 1.0)).astype(np.float32)


def _stack_windows(tracks: Sequence[np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit window rows [W, D] and the start row of each track [n_tracks]."""
    if len(tracks) == 0:
        raise ConfigError(f"{what}: no tracks given")
    for i, t in enumerate(tracks):
        if t is None or np.ndim(t) != 2 or len(t) == 0:
            raise ConfigError(f"{what}[{i}]: expected a [n_windows >= 1, D] array, got "
                              f"{None if t is None else np.shape(t)}")
    rows = unit_rows(np.concatenate([np.asarray(t, dtype=np.float32) for t in tracks]))
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tracks])[:-1]]).astype(np.int64)
    return rows, offsets


def _min_distances(q: np.ndarray, q_off: np.ndarray, r: np.ndarray, r_off: np.ndarray,
                   block_elements: int) -> np.ndarray:
    """Min over window pairs, in blocks of query windows under ``block_elements`` cells (a long
    query is split over blocks too, so memory stays bounded)."""
    owner = np.repeat(np.arange(len(q_off)), np.diff(np.append(q_off, q.shape[0])))
    out = np.full((len(q_off), len(r_off)), np.inf, dtype=np.float32)
    step = max(1, block_elements // max(1, r.shape[0]))
    for a in range(0, q.shape[0], step):
        dist = 1.0 - np.clip(q[a:a + step] @ r.T, -1.0, 1.0)  # [block windows, all ref windows]
        own = owner[a:a + step]
        firsts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])  # each track's first row
        per_q = np.minimum.reduceat(np.minimum.reduceat(dist, firsts, axis=0), r_off, axis=1)
        out[own[firsts]] = np.minimum(out[own[firsts]], per_q)
    return out


def track_distances(q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray], *,
                    rule: str, block_elements: int = 1 << 25) -> np.ndarray:
    """Distances float32 [Q, R] in [0, 2] of every query track to every reference track, from
    [n_windows_i, D] window embeddings (raw or unit) per track; ``block_elements`` caps one
    window x window similarity block (memory, rule "min")."""
    check_rule(rule)
    q, q_off = _stack_windows(q_windows, "q_windows")
    r, r_off = _stack_windows(r_windows, "r_windows")
    if q.shape[1] != r.shape[1]:
        raise ConfigError(f"query windows have D={q.shape[1]} but reference windows D={r.shape[1]}")
    if rule == "mean":
        return cosine_distances(track_vectors(q_windows), track_vectors(r_windows))
    return _min_distances(q, q_off, r, r_off, block_elements)


def pair_distances(sets: Sequence[np.ndarray], vectors: np.ndarray, i: np.ndarray,
                   j: np.ndarray, *, rule: str, chunk: int = 8192) -> np.ndarray:
    """Distances float64 [P] of track pairs ``(i[p], j[p])`` from unit window ``sets`` (rule
    "min") or unit track ``vectors`` [N, D] (rule "mean"), for the index calibration."""
    if check_rule(rule) == "mean":
        e = np.asarray(vectors, np.float64)
    else:
        sizes = np.array([len(s) for s in sets])
        mask = np.arange(sizes.max())[None, :] < sizes[:, None]  # [N, w_max] real windows
        pad = np.zeros((*mask.shape, sets[0].shape[1]), np.float64)
        pad[mask] = np.concatenate(sets)
    out = np.empty(i.size, np.float64)
    for a in range(0, i.size, chunk):
        ii, jj = i[a:a + chunk], j[a:a + chunk]
        if rule == "mean":
            sims = np.einsum("pd,pd->p", e[ii], e[jj])
        else:
            valid = mask[ii][:, :, None] & mask[jj][:, None, :]
            sims = np.where(valid, np.einsum("pad,pbd->pab", pad[ii], pad[jj]), -np.inf)
            sims = sims.max(axis=(1, 2))
        out[a:a + chunk] = 1.0 - np.clip(sims, -1.0, 1.0)
    return out
