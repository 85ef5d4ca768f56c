"""Retrieval metrics for cover-song identification: mAP, MR1, HR1, HR10, P@10, bootstrap CIs.

Conventions (the same as the original ``calc_map``, fact sheet section 8.3):

* ``dist[q, r]`` is a distance (smaller = more similar) between query ``q`` and reference ``r``;
  references are ranked by ascending distance with a **stable** sort, so equal distances keep
  their column order.
* Cells that must not be ranked (a query against itself, a tempo copy of the same recording,
  pairs listed in a ``query_in_ref`` file) are removed with a boolean ``exclude`` mask of the same
  shape. Unlike the original's ``-1`` sentinels, a genuinely negative or zero distance is never
  dropped.
* A reference is *relevant* to a query when their labels (work ids) are equal.
* Ranks are 1-based and counted among the non-excluded references only.

Per query (``topk`` = None means the whole list, the original used 10 000):

* AP = (1 / c) x sum over relevant refs at rank k <= topk of (relevant refs up to k) / k, where
  c = number of relevant refs within topk (the original's normalisation; equal to the textbook AP
  when topk covers the list); 0 when none is found.
* rank1 = rank of the first relevant ref in the whole list (0 when the query has none).
* top10 = number of relevant refs in ranks 1..10.
* hit = 1 when the nearest non-excluded ref is relevant.

Aggregates: mAP = mean AP, MR1 = mean rank1, HR1 = mean hit (the original's ``hit_rate``),
HR10 = fraction of queries with rank1 in 1..10, P@10 = mean(top10) / 10 (the original's
``top10``).

Queries without any relevant reference: the original keeps them in every denominator with AP 0
and rank1 0 (which *lowers* MR1, i.e. makes it look better). ``no_relevant="count_as_zero"``
(default) reproduces that; ``no_relevant="skip"`` leaves them out of every mean.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from chlib.core.errors import ConfigError, ManifestError
from chlib.core.manifest import read_query_in_ref as _read_query_in_ref

__all__ = [
    "NO_RELEVANT_POLICIES",
    "METRIC_NAMES",
    "retrieval_metrics",
    "per_query_stats",
    "per_query_ap",
    "per_work_ap",
    "rank_of_first_correct",
    "most_confused_pairs",
    "self_exclusion_mask",
    "query_in_ref_mask",
    "read_query_in_ref",
    "bootstrap_ci",
]

NO_RELEVANT_POLICIES = ("count_as_zero", "skip")
METRIC_NAMES = ("mAP", "MR1", "HR1", "HR10", "P@10")


# --------------------------------------------------------------------------------------------
# input checks


def _check_inputs(
    dist: np.ndarray,
    query_labels: Sequence | np.ndarray,
    ref_labels: Sequence | np.ndarray,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (dist [Q, R], q label codes [Q], r label codes [R], valid bool [Q, R]).

    Labels come back as int codes (equal labels <=> equal codes).
    """
    d = np.asarray(dist)
    if d.ndim != 2:
        raise ConfigError(f"distance matrix must be 2-D [queries, refs], got shape {d.shape}")
    n_q, n_r = d.shape
    ql = np.asarray(query_labels)
    rl = np.asarray(ref_labels)
    if ql.shape != (n_q,):
        raise ConfigError(
            f"query_labels has shape {ql.shape} but the distance matrix has {n_q} query rows"
        )
    if rl.shape != (n_r,):
        raise ConfigError(
            f"ref_labels has shape {rl.shape} but the distance matrix has {n_r} ref columns"
        )
    if np.isnan(d).any():
        bad = np.argwhere(np.isnan(d))[0]
        raise ConfigError(
            f"distance matrix holds NaN (first at query {bad[0]}, ref {bad[1]}); the embeddings "
            "are probably NaN: check the model and the features"
        )
    # compare labels as small integer codes (string labels would make [Q, R] object compares)
    _, codes = np.unique(np.concatenate([ql.astype(object), rl.astype(object)]).astype(str)
                         if ql.dtype != rl.dtype or ql.dtype.kind not in "iub"
                         else np.concatenate([ql, rl]), return_inverse=True)
    ql, rl = codes[:n_q], codes[n_q:]
    if exclude is None:
        valid = np.ones((n_q, n_r), dtype=bool)
    else:
        ex = np.asarray(exclude)
        if ex.shape != (n_q, n_r) or ex.dtype != bool:
            raise ConfigError(
                f"exclude must be a boolean mask of shape {(n_q, n_r)}, got {ex.dtype} {ex.shape}"
            )
        valid = ~ex
    return d, ql, rl, valid


def _check_policy(no_relevant: str) -> None:
    if no_relevant not in NO_RELEVANT_POLICIES:
        raise ConfigError(
            f"no_relevant must be one of {NO_RELEVANT_POLICIES}, got {no_relevant!r}"
        )


# --------------------------------------------------------------------------------------------
# per-query core


def _relevant_ranks(d_row: np.ndarray, valid_row: np.ndarray, rel_cols: np.ndarray) -> np.ndarray:
    """1-based ranks (among valid columns, stable ascending sort) of the columns ``rel_cols``.

    ``rel_cols`` must be valid columns in increasing order. The rank of column j is
    1 + #(valid columns with a smaller distance) + #(valid columns before j with an equal one).
    """
    vals = d_row[valid_row]
    s = np.sort(vals)
    x = d_row[rel_cols]
    lo = np.searchsorted(s, x, side="left")
    hi = np.searchsorted(s, x, side="right")
    ranks = lo + 1
    tied = np.flatnonzero(hi - lo > 1)
    if tied.size:  # rare: equal distances; count equal valid columns that come earlier
        cols = rel_cols[tied]
        eq = (d_row[None, :] == x[tied, None]) & valid_row[None, :]
        before = np.arange(d_row.size)[None, :] < cols[:, None]
        ranks[tied] += (eq & before).sum(axis=1)
    return ranks


def per_query_stats(
    dist: np.ndarray,
    query_labels: Sequence | np.ndarray,
    ref_labels: Sequence | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    topk: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query retrieval statistics, the building blocks of every aggregate.

    Parameters
    ----------
    dist : float array [Q, R]
        Distances (smaller = closer). NaN is an error; +-inf and negative values are ranked.
    query_labels, ref_labels : arrays [Q], [R]
        Work labels (any comparable type: ints or strings).
    exclude : bool array [Q, R] or None
        True where a cell must not be ranked at all.
    topk : int or None
        Only relevant refs at rank <= topk count towards AP (None: the whole list).

    Returns
    -------
    dict of arrays [Q]: ``ap`` (float64), ``rank1`` (int64, 0 = no relevant ref),
    ``top10`` (int64, relevant refs in ranks 1..10), ``hit`` (bool, top-1 is relevant),
    ``n_relevant`` (int64, non-excluded relevant refs), ``n_valid`` (int64, non-excluded refs).
    """
    d, ql, rl, valid = _check_inputs(dist, query_labels, ref_labels, exclude)
    if topk is not None and topk < 1:
        raise ConfigError(f"topk must be >= 1 or None, got {topk}")
    n_q = d.shape[0]
    rel = (ql[:, None] == rl[None, :]) & valid  # [Q, R]
    ap = np.zeros(n_q)
    rank1 = np.zeros(n_q, dtype=np.int64)
    top10 = np.zeros(n_q, dtype=np.int64)
    n_rel = rel.sum(axis=1).astype(np.int64)
    n_valid = valid.sum(axis=1).astype(np.int64)
    limit = np.inf if topk is None else topk
    for i in np.flatnonzero(n_rel):
        cols = np.flatnonzero(rel[i])
        ranks = np.sort(_relevant_ranks(d[i], valid[i], cols))
        rank1[i] = ranks[0]
        top10[i] = int(np.count_nonzero(ranks <= 10))
        inside = ranks[ranks <= limit]
        if inside.size:
            ap[i] = float(np.mean(np.arange(1, inside.size + 1) / inside))
    return {
        "ap": ap,
        "rank1": rank1,
        "top10": top10,
        "hit": rank1 == 1,
        "n_relevant": n_rel,
        "n_valid": n_valid,
    }


def _aggregate(stats: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, float]:
    """Means over the queries selected by ``keep`` (bool [Q])."""
    n = int(keep.sum())
    if n == 0:
        return {m: float("nan") for m in METRIC_NAMES}
    r1 = stats["rank1"][keep]
    return {
        "mAP": float(stats["ap"][keep].mean()),
        "MR1": float(r1.mean()),
        "HR1": float(stats["hit"][keep].mean()),
        "HR10": float(((r1 >= 1) & (r1 <= 10)).mean()),
        "P@10": float(stats["top10"][keep].mean() / 10.0),
    }


def _kept(stats: dict[str, np.ndarray], no_relevant: str) -> np.ndarray:
    if no_relevant == "skip":
        return stats["n_relevant"] > 0
    return np.ones(stats["ap"].shape, dtype=bool)


def retrieval_metrics(
    dist: np.ndarray,
    query_labels: Sequence | np.ndarray,
    ref_labels: Sequence | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    topk: int | None = None,
    no_relevant: str = "count_as_zero",
) -> dict[str, float | int]:
    """mAP, MR1, HR1, HR10 and P@10 of a query x reference distance matrix.

    Parameters
    ----------
    dist : float array [Q, R]
        Distances, smaller = closer (cosine distance in [0, 2] for chlib embeddings).
    query_labels, ref_labels : arrays [Q], [R]
        Work labels; a ref is relevant to a query when the labels are equal.
    exclude : bool array [Q, R] or None
        Cells to leave out of the ranking (see :func:`self_exclusion_mask`,
        :func:`query_in_ref_mask`).
    topk : int or None
        Depth of the AP sum (the original passes 10 000; None = whole list).
    no_relevant : "count_as_zero" | "skip"
        What to do with queries that have no non-excluded relevant reference:
        ``"count_as_zero"`` (the original) keeps them in every mean with AP 0, rank1 0, hit 0;
        ``"skip"`` leaves them out of every mean.

    Returns
    -------
    dict with ``mAP``, ``MR1`` (mean 1-based rank of the first correct ref, lower is better),
    ``HR1`` (= hit rate, top-1 accuracy), ``HR10`` (fraction with a correct ref in the top 10),
    ``P@10`` (precision at 10), ``n_queries`` (rows of ``dist``), ``n_queries_scored`` (rows in the
    means) and ``n_queries_without_relevant``. Means over zero queries are NaN.
    """
    _check_policy(no_relevant)
    stats = per_query_stats(dist, query_labels, ref_labels, exclude=exclude, topk=topk)
    keep = _kept(stats, no_relevant)
    out: dict[str, float | int] = dict(_aggregate(stats, keep))
    out["n_queries"] = int(stats["ap"].size)
    out["n_queries_scored"] = int(keep.sum())
    out["n_queries_without_relevant"] = int((stats["n_relevant"] == 0).sum())
    return out


def per_query_ap(
    dist: np.ndarray,
    query_labels: Sequence | np.ndarray,
    ref_labels: Sequence | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    topk: int | None = None,
) -> np.ndarray:
    """Average precision of every query, float64 [Q] (0 for queries with no relevant ref)."""
    return per_query_stats(dist, query_labels, ref_labels, exclude=exclude, topk=topk)["ap"]


def rank_of_first_correct(
    dist: np.ndarray,
    query_labels: Sequence | np.ndarray,
    ref_labels: Sequence | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """1-based rank of the first relevant ref per query, int64 [Q]; 0 = no relevant ref.

    Feed it to a histogram (ranks 1, 2-5, 6-10, >10, none) to see where the misses are.
    """
    return per_query_stats(dist, query_labels, ref_labels, exclude=exclude)["rank1"]


def per_work_ap(
    dist: np.ndarray,
    query_labels: Sequence | np.ndarray,
    ref_labels: Sequence | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    topk: int | None = None,
    no_relevant: str = "count_as_zero",
) -> list[dict]:
    """Mean AP per query work, sorted worst first (ties by label).

    Returns a list of ``{"work": label, "ap": mean AP of its queries, "n_queries": int,
    "mean_rank1": float}`` (``pandas.DataFrame(result)`` makes it a table). With
    ``no_relevant="skip"`` queries without a relevant ref are left out (and a work with only such
    queries is left out).
    """
    _check_policy(no_relevant)
    stats = per_query_stats(dist, query_labels, ref_labels, exclude=exclude, topk=topk)
    keep = _kept(stats, no_relevant)
    ql = np.asarray(query_labels)[keep]
    ap = stats["ap"][keep]
    r1 = stats["rank1"][keep]
    works, inv = np.unique(ql, return_inverse=True)
    counts = np.bincount(inv, minlength=works.size)
    ap_sum = np.bincount(inv, weights=ap, minlength=works.size)
    r1_sum = np.bincount(inv, weights=r1, minlength=works.size)
    rows = [
        {
            "work": _plain(works[w]),
            "ap": float(ap_sum[w] / counts[w]),
            "n_queries": int(counts[w]),
            "mean_rank1": float(r1_sum[w] / counts[w]),
        }
        for w in range(works.size)
    ]
    rows.sort(key=lambda r: (r["ap"], str(r["work"])))
    return rows


def most_confused_pairs(
    dist: np.ndarray,
    labels: Sequence | np.ndarray,
    k: int = 20,
    *,
    ref_labels: Sequence | np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> list[dict]:
    """The ``k`` closest pairs that belong to *different* works (the worst false matches).

    With ``ref_labels=None`` ``dist`` is a square query == ref matrix and each unordered pair
    (i < j) is reported once; otherwise rows are queries and columns refs. Returns a list of
    ``{"query": i, "ref": j, "query_label", "ref_label", "distance"}``, closest first.
    """
    d, ql, rl, valid = _check_inputs(
        dist, labels, labels if ref_labels is None else ref_labels, exclude
    )
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    cand = valid & (ql[:, None] != rl[None, :])
    if ref_labels is None:
        if d.shape[0] != d.shape[1]:
            raise ConfigError(
                f"most_confused_pairs without ref_labels needs a square matrix, got {d.shape}"
            )
        cand &= np.triu(np.ones(d.shape, dtype=bool), k=1)
    flat = np.flatnonzero(cand)
    if flat.size == 0:
        return []
    vals = d.ravel()[flat]
    kk = min(k, flat.size)
    part = np.argpartition(vals, kk - 1)[:kk] if kk < flat.size else np.arange(flat.size)
    part = part[np.lexsort((flat[part], vals[part]))]
    q_orig = np.asarray(labels)
    r_orig = q_orig if ref_labels is None else np.asarray(ref_labels)
    out = []
    for p in part:
        i, j = divmod(int(flat[p]), d.shape[1])
        out.append({
            "query": i,
            "ref": j,
            "query_label": _plain(q_orig[i]),
            "ref_label": _plain(r_orig[j]),
            "distance": float(d[i, j]),
        })
    return out


def _plain(x: object) -> object:
    """A numpy scalar as a plain Python value (for tables and JSON)."""
    return x.item() if isinstance(x, np.generic) else x


# --------------------------------------------------------------------------------------------
# exclusion masks


def self_exclusion_mask(
    query_ids: Sequence[str],
    ref_ids: Sequence[str],
    *,
    query_sources: Sequence[str | None] | None = None,
    ref_sources: Sequence[str | None] | None = None,
) -> np.ndarray:
    """Boolean [Q, R] mask: True where the ref is the query itself or a copy of the same recording.

    A cell is excluded when the perf ids are equal, or — when sources are given — when the two
    come from the same source recording (``source_perf`` of a tempo copy ``sp_<f>-<perf>``; an
    original's source is its own perf; ``None`` entries fall back to the perf id). This also
    removes the original's blind spot of tempo copies matching their own source (bug 13.3.3).
    """
    q_ids = [str(x) for x in query_ids]
    r_ids = [str(x) for x in ref_ids]
    qc, rc = _shared_codes(q_ids, r_ids)
    mask = qc[:, None] == rc[None, :]
    if query_sources is not None or ref_sources is not None:
        qs, rs = _shared_codes(_sources(q_ids, query_sources, "query"),
                               _sources(r_ids, ref_sources, "ref"))
        mask |= qs[:, None] == rs[None, :]
    return mask


def _shared_codes(a: list[str], b: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for two lists of strings over one shared vocabulary."""
    _, codes = np.unique(np.asarray(a + b, dtype=str), return_inverse=True)
    return codes[: len(a)], codes[len(a):]


def _sources(ids: list[str], sources: Sequence[str | None] | None, what: str) -> list[str]:
    if sources is None:
        return list(ids)
    if len(sources) != len(ids):
        raise ConfigError(f"{what}_sources has {len(sources)} entries but there are {len(ids)} ids")
    return [str(s) if s is not None and s != "" else i for i, s in zip(ids, sources, strict=True)]


def read_query_in_ref(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Read the original's query_in_ref file: first line ``{"query_in_ref": [[qi, ri], ...]}``.

    Indices are 0-based positions in the query and ref list files (see
    :func:`chlib.core.manifest.read_query_in_ref`, which this calls). ManifestError on a bad file.
    """
    return _read_query_in_ref(path)


def query_in_ref_mask(pairs: Sequence[Sequence[int]], n_queries: int, n_refs: int) -> np.ndarray:
    """Boolean [Q, R] mask with True at each (query index, ref index) pair.

    Indices out of range raise ManifestError (the original checked them against the list sizes).
    """
    mask = np.zeros((n_queries, n_refs), dtype=bool)
    if len(pairs) == 0:
        return mask
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    bad = (arr[:, 0] < 0) | (arr[:, 0] >= n_queries) | (arr[:, 1] < 0) | (arr[:, 1] >= n_refs)
    if bad.any():
        qi, ri = arr[np.flatnonzero(bad)[0]]
        raise ManifestError(
            f"query_in_ref pair ({qi}, {ri}) is out of range for {n_queries} queries x "
            f"{n_refs} refs; regenerate the file for these query/ref lists"
        )
    mask[arr[:, 0], arr[:, 1]] = True
    return mask


# --------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(
    dist: np.ndarray,
    q_labels: Sequence | np.ndarray,
    r_labels: Sequence | np.ndarray,
    exclude: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int | np.random.Generator = 12345,
    confidence: float = 0.95,
    *,
    topk: int | None = None,
    no_relevant: str = "count_as_zero",
) -> dict[str, dict[str, float]]:
    """Work-stratified bootstrap confidence intervals of mAP, MR1, HR1, HR10 and P@10.

    Each replicate draws as many query works as there are (with replacement), takes every query
    row of each drawn work (a work drawn twice counts twice) and keeps **all** reference columns,
    as the fork does (fact sheet 8.4). Because the references never change, the per-query
    statistics are computed once and a replicate is a weighted mean over works — all replicates
    come from one matrix product.

    Returns ``{metric: {"point", "mean", "low", "high", "std"}}``: point = full-data value,
    mean / std (ddof 0) over replicates, low / high = the (1 - confidence) / 2 and
    (1 + confidence) / 2 percentiles. ``seed`` may be an int (the fork's 12345) or a Generator.
    """
    _check_policy(no_relevant)
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    stats = per_query_stats(dist, q_labels, r_labels, exclude=exclude, topk=topk)
    keep = _kept(stats, no_relevant)
    point = _aggregate(stats, keep)

    ql = np.asarray(q_labels)
    works, inv = np.unique(ql, return_inverse=True)
    n_w = works.size
    w = keep.astype(np.float64)
    r1 = stats["rank1"].astype(np.float64)
    per_query = {
        "mAP": stats["ap"],
        "MR1": r1,
        "HR1": stats["hit"].astype(np.float64),
        "HR10": ((r1 >= 1) & (r1 <= 10)).astype(np.float64),
        "P@10": stats["top10"] / 10.0,
    }
    count_w = np.bincount(inv, weights=w, minlength=n_w)  # scored queries per work
    sums_w = np.stack(
        [np.bincount(inv, weights=per_query[m] * w, minlength=n_w) for m in METRIC_NAMES], axis=1
    )  # [works, metrics]

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    draws = rng.integers(0, n_w, size=(n_boot, n_w))  # [n_boot, n_works]
    offsets = (np.arange(n_boot, dtype=np.int64) * n_w)[:, None]
    times = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_w).reshape(n_boot, n_w)
    times = times.astype(np.float64)  # how often each work was drawn in each replicate
    denom = times @ count_w  # [n_boot]
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (times @ sums_w) / denom[:, None]  # [n_boot, metrics]

    lo_q = 100 * (1 - confidence) / 2
    hi_q = 100 * (1 + confidence) / 2
    out: dict[str, dict[str, float]] = {}
    for j, m in enumerate(METRIC_NAMES):
        col = reps[:, j]
        col = col[np.isfinite(col)]
        if col.size == 0:
            out[m] = {k: float("nan") for k in ("point", "mean", "low", "high", "std")}
            out[m]["point"] = point[m]
            continue
        out[m] = {
            "point": point[m],
            "mean": float(col.mean()),
            "low": float(np.percentile(col, lo_q)),
            "high": float(np.percentile(col, hi_q)),
            "std": float(col.std()),
        }
    return out
