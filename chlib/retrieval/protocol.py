"""The distance rule: window embeddings -> track representation -> track distance.

The one owner of how two recordings are compared (evaluation, index, calibration, identify).
A recording is a set of L2-normalised window embeddings ``[n_windows, D]``, ``1 - cos`` apart
(in [0, 2]). :data:`DISTANCE_RULES`: ``"min"`` = minimum over all window pairs (the original's
rule: the best-matching passages decide); ``"mean"`` = distance of the unit mean window vectors
(:func:`track_vector`: one vector per recording, FAISS-able).

Key readings (a run's ``key_variants``, keyed model inputs only): each window is embedded once
per reading of its key, the rows of a track interleaved window by window (``readings`` rows
per window, the estimated key first). Two tracks are then compared reading against estimate
both ways, the query read every way against the reference as estimated and the other way
round, and the closer decides: ``min(D(q_all, r_0), D(q_0, r_all))`` under the rule. Two
re-read tracks are never compared with each other: inputs rotated away from their key look
alike to a model and matched unrelated works (the demo's works: mAP 0.93 -> 0.76 when they
were).

Neighbour expansion (a run's ``neighbour_expansion``): each of the two recordings is compared
together with its nearest neighbour among the references, ``d*(q, r) = mean of d(a, b)`` for
``a`` in {q, n(q)} and ``b`` in {r, n(r)} (average query expansion with database-side
augmentation, Chum et al. 2007, Arandjelovic & Zisserman 2012): a version far from the query
but close to the query's best match moves up. ``n(r)`` is never the query itself or a copy of
it (:func:`expand_by_neighbours`), so a test set searched against itself gains nothing an
identification could not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chlib.core.errors import ConfigError

__all__ = ["DISTANCE_RULES", "check_rule", "unit_rows", "track_vector", "track_vectors",
           "cosine_distances", "reading_rows", "track_distances", "pair_distances",
           "nearest_others", "nearest_others_of", "expand_by_neighbours", "expand_rows",
           "expanded_pairs", "expand_search", "N_SPARE",
           "reading_vectors", "reading_vector_distances"]

N_SPARE = 4  # nearest others kept per reference: n(r) skips those that are the query itself

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


def reading_rows(windows: np.ndarray, readings: int, reading: int = 0) -> np.ndarray:
    """The rows of one key ``reading`` of a track's ``[n_windows x readings, D]`` rows."""
    windows = np.asarray(windows)
    if readings < 1 or len(windows) % readings or not 0 <= reading < readings:
        raise ConfigError(f"a track of {len(windows)} rows cannot hold {readings} key readings "
                          f"per window (reading {reading}); embed it with the index's or run's "
                          "window settings")
    return windows[reading::readings]


def _one_reading(q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray], rule: str,
                 block_elements: int) -> np.ndarray:
    q, q_off = _stack_windows(q_windows, "q_windows")
    r, r_off = _stack_windows(r_windows, "r_windows")
    if q.shape[1] != r.shape[1]:
        raise ConfigError(f"query windows have D={q.shape[1]} but reference windows D={r.shape[1]}")
    if rule == "mean":
        return cosine_distances(track_vectors(q_windows), track_vectors(r_windows))
    return _min_distances(q, q_off, r, r_off, block_elements)


def track_distances(q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray], *,
                    rule: str, readings: int = 1, block_elements: int = 1 << 25) -> np.ndarray:
    """Distances float32 [Q, R] in [0, 2] of every query track to every reference track, from
    [n_windows_i x readings, D] window embeddings (raw or unit) per track (``readings`` > 1:
    key readings, module docstring); ``block_elements`` caps one window x window similarity
    block (memory, rule "min")."""
    check_rule(rule)
    if readings == 1:
        return _one_reading(q_windows, r_windows, rule, block_elements)
    q0 = [reading_rows(t, readings) for t in q_windows]
    r0 = [reading_rows(t, readings) for t in r_windows]
    if rule == "min":  # the query's every reading against the reference's estimate, and back
        return np.minimum(_one_reading(q_windows, r0, rule, block_elements),
                          _one_reading(q0, r_windows, rule, block_elements))
    return reading_vector_distances(reading_vectors(q_windows, readings),
                                    reading_vectors(r_windows, readings))


def reading_vectors(tracks: Sequence[np.ndarray], readings: int) -> np.ndarray:
    """float32 [readings, N, D]: :func:`track_vector` of each reading of each track."""
    return np.stack([track_vectors([reading_rows(t, readings, k) for t in tracks])
                     for k in range(readings)])


def reading_vector_distances(qv: np.ndarray, rv: np.ndarray) -> np.ndarray:
    """Rule "mean" with key readings: float32 [Q, R] from :func:`reading_vectors` ``qv``
    [readings, Q, D] and ``rv`` [readings, R, D], each reading against the estimate both ways."""
    out = cosine_distances(qv[0], rv[0])
    for k in range(1, qv.shape[0]):
        out = np.minimum(out, np.minimum(cosine_distances(qv[k], rv[0]),
                                         cosine_distances(qv[0], rv[k])))
    return out


def pair_distances(sets: Sequence[np.ndarray], vectors: np.ndarray, i: np.ndarray,
                   j: np.ndarray, *, rule: str, readings: int = 1, chunk: int = 8192) -> np.ndarray:
    """Distances float64 [P] of track pairs ``(i[p], j[p])`` from unit window ``sets`` (rule
    "min"; with ``readings`` > 1 key readings, module docstring) or unit track ``vectors``
    (rule "mean": [N, D], or :func:`reading_vectors` [readings, N, D] with ``readings`` > 1),
    for the index calibration."""
    if check_rule(rule) == "mean":
        if readings == 1:
            e = np.asarray(vectors, np.float64)
            sims = np.concatenate([np.einsum("pd,pd->p", e[i[a:a + chunk]], e[j[a:a + chunk]])
                                   for a in range(0, i.size, chunk)] or [np.zeros(0)])
        else:
            v = np.asarray(vectors if vectors is not None and np.ndim(vectors) == 3
                           else reading_vectors(sets, readings), np.float64)
            sims = np.maximum(np.einsum("knd,nd->kn", v[:, i], v[0, j]),
                              np.einsum("nd,knd->kn", v[0, i], v[:, j])).max(axis=0)
        return 1.0 - np.clip(sims, -1.0, 1.0)
    if readings == 1:
        every = _padded(sets)
        return 1.0 - np.clip(_best_pairs(every, every, i, j, chunk), -1.0, 1.0)
    every = _padded([unit_rows(t) for t in sets])
    estimate = _padded([unit_rows(reading_rows(t, readings)) for t in sets])
    sims = np.maximum(_best_pairs(every, estimate, i, j, chunk),
                      _best_pairs(estimate, every, i, j, chunk))
    return 1.0 - np.clip(sims, -1.0, 1.0)


def _padded(sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Window sets as one zero-padded float64 array [N, w_max, D] and its mask of real rows."""
    sizes = np.array([len(t) for t in sets])
    mask = np.arange(sizes.max())[None, :] < sizes[:, None]
    pad = np.zeros((*mask.shape, sets[0].shape[1]), np.float64)
    pad[mask] = np.concatenate(sets)
    return pad, mask


def _best_pairs(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], i: np.ndarray,
                j: np.ndarray, chunk: int) -> np.ndarray:
    """Highest similarity [P] of any row of ``a``'s set ``i[p]`` with any row of ``b``'s set
    ``j[p]`` (:func:`_padded` sets), ``chunk`` pairs at a time."""
    (pa, ma), (pb, mb) = a, b
    out = np.empty(i.size, np.float64)
    for s in range(0, i.size, chunk):
        ii, jj = i[s:s + chunk], j[s:s + chunk]
        valid = ma[ii][:, :, None] & mb[jj][:, None, :]
        out[s:s + chunk] = np.where(valid, np.einsum("pad,pbd->pab", pa[ii], pb[jj]),
                                    -np.inf).max(axis=(1, 2))
    return out


def nearest_others(d: np.ndarray, exclude: np.ndarray | None = None,
                   m: int = N_SPARE) -> np.ndarray:
    """int64 [N, m]: the columns of each row's ``m`` smallest distances of ``d`` [N, C], closest
    first, skipping ``exclude`` [N, C] True cells; -1 where a row has fewer than ``m``."""
    d = np.array(d, dtype=np.float64, copy=True)
    if exclude is not None:
        d[exclude] = np.inf
    m = min(int(m), d.shape[1])
    if m < 1:
        return np.full((d.shape[0], 0), -1, np.int64)
    part = np.argpartition(d, m - 1, axis=1)[:, :m] if m < d.shape[1] else \
        np.tile(np.arange(d.shape[1]), (d.shape[0], 1))
    order = np.take_along_axis(part, np.argsort(np.take_along_axis(d, part, 1), axis=1,
                                                kind="stable"), 1)
    return np.where(np.isfinite(np.take_along_axis(d, order, 1)), order, -1).astype(np.int64)


def expand_rows(d_qr: np.ndarray, d_nr: np.ndarray, r_nn: np.ndarray,
                q_exclude: np.ndarray | None = None) -> np.ndarray:
    """Neighbour-expanded distances float32 [Q, R] (module docstring) from ``d_qr`` [Q, R],
    ``d_nr`` [Q, R] (the distances of each query's nearest reference n(q) to every reference;
    ``d_qr``'s own row where a query has none) and ``r_nn`` [R, m] (:func:`nearest_others` of
    the references among themselves). n(r) is the first of ``r_nn[r]`` that ``q_exclude``
    [Q, R] does not mark for the query (the query itself, its copies); r itself where none."""
    q, r = d_qr.shape
    if r_nn.shape[1] == 0:
        nb = np.broadcast_to(np.arange(r), (q, r))
    else:
        nb = np.broadcast_to(np.arange(r), (q, r)).copy()  # fallback: r itself
        done = np.zeros((q, r), bool)
        for j in range(r_nn.shape[1]):
            cand = r_nn[:, j]
            ok = np.broadcast_to(cand >= 0, (q, r))
            if q_exclude is not None:  # [Q, R]: is r's j-th neighbour excluded for the query
                ok = ok & ~q_exclude[:, np.maximum(cand, 0)]
            take = ok & ~done
            nb[take] = np.broadcast_to(cand, (q, r))[take]
            done |= take
    out = (d_qr + d_nr + np.take_along_axis(d_qr, nb, 1) + np.take_along_axis(d_nr, nb, 1)) / 4
    return out.astype(np.float32)


def expand_by_neighbours(d_qr: np.ndarray, d_rr: np.ndarray, q_exclude: np.ndarray | None = None,
                         r_exclude: np.ndarray | None = None) -> np.ndarray:
    """:func:`expand_rows` of a whole test set: ``d_qr`` [Q, R] queries to references, ``d_rr``
    [R, R] references among themselves, ``q_exclude`` [Q, R] / ``r_exclude`` [R, R] the pairs
    never ranked (a recording and its copies; the diagonal of ``d_rr`` is always excluded)."""
    r_ex = np.eye(d_rr.shape[0], dtype=bool) if r_exclude is None else r_exclude | np.eye(
        d_rr.shape[0], dtype=bool)
    return _expand(d_qr, q_exclude, lambda rows: d_rr[rows], nearest_others(d_rr, r_ex))


def _expand(d_qr: np.ndarray, q_exclude: np.ndarray | None,
            distance_rows: Callable[[np.ndarray], np.ndarray], r_nn: np.ndarray) -> np.ndarray:
    """:func:`expand_rows` with n(q) each query's nearest reference that ``q_exclude`` allows,
    its distances to every reference from ``distance_rows(rows) -> [len(rows), R]``."""
    q_nn = nearest_others(d_qr, q_exclude, m=1)[:, 0]
    d_nr = np.array(d_qr, dtype=np.float32, copy=True)
    if (has := q_nn >= 0).any():
        d_nr[has] = distance_rows(q_nn[has])
    return expand_rows(d_qr, d_nr, r_nn, q_exclude)


def nearest_others_of(distance_rows: Callable[[np.ndarray], np.ndarray], n: int, *,
                      block: int) -> np.ndarray:
    """:func:`nearest_others` of ``n`` references among themselves (each never its own), from
    ``distance_rows(rows) -> [len(rows), n]`` called on ``block`` rows at a time."""
    parts = []
    for a in range(0, n, block):
        rows = np.arange(a, min(n, a + block))
        own = np.zeros((len(rows), n), bool)
        own[np.arange(len(rows)), rows] = True
        parts.append(nearest_others(distance_rows(rows), own))
    return np.concatenate(parts) if parts else np.zeros((0, N_SPARE), np.int64)


def expanded_pairs(pairs: Callable[[np.ndarray, np.ndarray], np.ndarray], nn: np.ndarray,
                   i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Neighbour-expanded distances [P] of pairs ``(i, j)`` of references, ``i`` playing the
    query: ``pairs(a, b)`` the plain distances, ``nn`` :func:`nearest_others`; n(i) is i's
    nearest, n(j) j's nearest that is not i (each itself where it has none)."""
    ni = np.where(nn[i, 0] >= 0, nn[i, 0], i)
    nj = np.where(nn[j, 0] == i, nn[j, 1] if nn.shape[1] > 1 else j, nn[j, 0])
    nj = np.where(nj >= 0, nj, j)
    return (pairs(i, j) + pairs(ni, j) + pairs(i, nj) + pairs(ni, nj)) / 4


def expand_search(d: np.ndarray, own: np.ndarray | None,
                  distance_rows: Callable[[np.ndarray], np.ndarray], nn: np.ndarray) -> np.ndarray:
    """:func:`expand_rows` of a search: query distances ``d`` [Q, N] to an index's references,
    ``own`` [Q] the reference that is the query itself (-1: none; never its own neighbour),
    ``distance_rows(rows)`` [len(rows), N] among the references, ``nn`` their
    :func:`nearest_others`."""
    ex = None
    if own is not None:
        ex = np.zeros(d.shape, bool)
        hit = own >= 0
        ex[np.flatnonzero(hit), own[hit]] = True
    return _expand(d, ex, distance_rows, nn)
