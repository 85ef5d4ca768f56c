"""Retrieval metrics for cover-song identification: mAP, MR1, HR1, HR10, P@10, bootstrap CIs.

Conventions of the original ``calc_map`` (fact sheet 8.3): ``dist[q, r]`` is a distance; refs
are ranked by ascending distance with a **stable** sort, 1-based among non-excluded refs; a ref
is relevant when its label (work) equals the query's. Cells not to rank (self matches, tempo
copies, ``query_in_ref`` pairs) are True in a bool ``exclude`` [Q, R]; unlike the original's
``-1`` sentinels a genuinely negative or zero distance is never dropped.

Per query: AP = (1 / c) x sum over relevant refs at rank k <= topk of (relevant refs up to k) / k,
c = relevant refs within topk (the original's normalisation); rank1 = rank of the first relevant
ref (0 = none); top10 = relevant refs in ranks 1..10; hit = top-1 is relevant. Aggregates: mAP,
MR1 = mean rank1, HR1 = mean hit, HR10 = share with rank1 in 1..10, P@10 = mean top10 / 10.
``no_relevant="count_as_zero"`` (the original) keeps queries without a relevant ref in every
mean (AP 0, rank1 0: this *lowers* MR1); ``"skip"`` leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chlib.core.errors import ConfigError, ManifestError
from chlib.core.manifest import read_query_in_ref

__all__ = ["NO_RELEVANT_POLICIES", "METRIC_NAMES", "retrieval_metrics", "per_query_stats",
           "per_query_ap", "per_work_ap", "rank_of_first_correct", "most_confused_pairs",
           "self_exclusion_mask", "query_in_ref_mask", "read_query_in_ref", "bootstrap_ci"]

NO_RELEVANT_POLICIES = ("count_as_zero", "skip")
METRIC_NAMES = ("mAP", "MR1", "HR1", "HR10", "P@10")
Labels = Sequence | np.ndarray


def _check_inputs(dist: np.ndarray, query_labels: Labels, ref_labels: Labels,
                  exclude: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dist [Q, R], q label codes [Q], r label codes [R], valid bool [Q, R]); equal labels:
    equal int codes."""
    d = np.asarray(dist)
    if d.ndim != 2:
        raise ConfigError(f"distance matrix must be 2-D [queries, refs], got shape {d.shape}")
    n_q, n_r = d.shape
    ql, rl = np.asarray(query_labels), np.asarray(ref_labels)
    for name, lab, n, what in (("query", ql, n_q, "query rows"), ("ref", rl, n_r, "ref columns")):
        if lab.shape != (n,):
            raise ConfigError(f"{name}_labels has shape {lab.shape} but the distance matrix has "
                              f"{n} {what}")
    if np.isnan(d).any():
        q, r = np.argwhere(np.isnan(d))[0]
        raise ConfigError(f"distance matrix holds NaN (first at query {q}, ref {r}); the "
                          "embeddings are probably NaN: check the model and the features")
    # small integer codes: string labels would make [Q, R] object compares
    both = (np.concatenate([ql.astype(object), rl.astype(object)]).astype(str)
            if ql.dtype != rl.dtype or ql.dtype.kind not in "iub" else np.concatenate([ql, rl]))
    codes = np.unique(both, return_inverse=True)[1]
    ex = np.zeros((n_q, n_r), dtype=bool) if exclude is None else np.asarray(exclude)
    if ex.shape != (n_q, n_r) or ex.dtype != bool:
        raise ConfigError(f"exclude must be a boolean mask of shape {(n_q, n_r)}, got {ex.dtype} "
                          f"{ex.shape}")
    return d, codes[:n_q], codes[n_q:], ~ex


def _relevant_ranks(d_row: np.ndarray, valid_row: np.ndarray, rel_cols: np.ndarray) -> np.ndarray:
    """1-based ranks (among valid columns, stable ascending sort) of the valid, increasing
    columns ``rel_cols``: 1 + #(smaller distances) + #(equal distances in earlier columns)."""
    s = np.sort(d_row[valid_row])
    x = d_row[rel_cols]
    lo = np.searchsorted(s, x, side="left")
    ranks = lo + 1
    tied = np.flatnonzero(np.searchsorted(s, x, side="right") - lo > 1)
    if tied.size:  # rare: equal distances; count equal valid columns that come earlier
        eq = (d_row[None, :] == x[tied, None]) & valid_row[None, :]
        before = np.arange(d_row.size)[None, :] < rel_cols[tied][:, None]
        ranks[tied] += (eq & before).sum(axis=1)
    return ranks


def per_query_stats(dist: np.ndarray, query_labels: Labels, ref_labels: Labels, *,
                    exclude: np.ndarray | None = None, topk: int | None = None
                    ) -> dict[str, np.ndarray]:
    """Per-query statistics [Q]: ``ap``, ``rank1`` (0 = no relevant ref), ``top10``, ``hit``,
    ``n_relevant`` and ``n_valid`` (non-excluded refs). NaN distances are an error, +-inf and
    negative ones are ranked; only relevant refs at rank <= ``topk`` (None: all) count for AP."""
    d, ql, rl, valid = _check_inputs(dist, query_labels, ref_labels, exclude)
    if topk is not None and topk < 1:
        raise ConfigError(f"topk must be >= 1 or None, got {topk}")
    rel = (ql[:, None] == rl[None, :]) & valid  # [Q, R]
    n_rel = rel.sum(axis=1).astype(np.int64)
    ap = np.zeros(d.shape[0])
    rank1, top10 = np.zeros((2, d.shape[0]), dtype=np.int64)
    for i in np.flatnonzero(n_rel):
        ranks = np.sort(_relevant_ranks(d[i], valid[i], np.flatnonzero(rel[i])))
        rank1[i] = ranks[0]
        top10[i] = np.count_nonzero(ranks <= 10)
        inside = ranks if topk is None else ranks[ranks <= topk]
        if inside.size:
            ap[i] = float(np.mean(np.arange(1, inside.size + 1) / inside))
    return {"ap": ap, "rank1": rank1, "top10": top10, "hit": rank1 == 1, "n_relevant": n_rel,
            "n_valid": valid.sum(axis=1).astype(np.int64)}


def _per_query_values(stats: dict[str, np.ndarray]) -> np.ndarray:
    """float64 [Q, len(METRIC_NAMES)]: each query's term in each metric's mean."""
    r1 = stats["rank1"]
    return np.stack([stats["ap"], r1, stats["hit"], (r1 >= 1) & (r1 <= 10),
                     stats["top10"] / 10.0], axis=1).astype(np.float64)


def _means(stats: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, float]:
    """Each metric's mean over the queries selected by ``keep`` (bool [Q]); NaN over none."""
    values = _per_query_values(stats)[keep]
    return {m: float(values[:, j].mean()) if keep.any() else float("nan")
            for j, m in enumerate(METRIC_NAMES)}


def _scored_stats(dist: np.ndarray, query_labels: Labels, ref_labels: Labels,
                  exclude: np.ndarray | None, topk: int | None, no_relevant: str
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`per_query_stats` and the bool [Q] of queries kept by the ``no_relevant`` policy."""
    if no_relevant not in NO_RELEVANT_POLICIES:
        raise ConfigError(f"no_relevant must be one of {NO_RELEVANT_POLICIES}, got {no_relevant!r}")
    stats = per_query_stats(dist, query_labels, ref_labels, exclude=exclude, topk=topk)
    return stats, (stats["n_relevant"] > 0) | (no_relevant == "count_as_zero")


def retrieval_metrics(dist: np.ndarray, query_labels: Labels, ref_labels: Labels, *,
                      exclude: np.ndarray | None = None, topk: int | None = None,
                      no_relevant: str = "count_as_zero") -> dict[str, float | int]:
    """mAP, MR1, HR1, HR10, P@10 (NaN over zero queries), ``n_queries``, ``n_queries_scored``
    and ``n_queries_without_relevant`` of a distance matrix [Q, R]. ``topk``: depth of the AP
    sum (the original: 10 000; None = all); ``no_relevant``: see the module docstring."""
    stats, keep = _scored_stats(dist, query_labels, ref_labels, exclude, topk, no_relevant)
    return {**_means(stats, keep), "n_queries": int(keep.size), "n_queries_scored": int(keep.sum()),
            "n_queries_without_relevant": int((stats["n_relevant"] == 0).sum())}


def per_query_ap(dist: np.ndarray, query_labels: Labels, ref_labels: Labels, *,
                 exclude: np.ndarray | None = None, topk: int | None = None) -> np.ndarray:
    """Average precision of every query, float64 [Q] (0 for queries with no relevant ref)."""
    return per_query_stats(dist, query_labels, ref_labels, exclude=exclude, topk=topk)["ap"]


def rank_of_first_correct(dist: np.ndarray, query_labels: Labels, ref_labels: Labels, *,
                          exclude: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of the first relevant ref per query, int64 [Q]; 0 = no relevant ref."""
    return per_query_stats(dist, query_labels, ref_labels, exclude=exclude)["rank1"]


def per_work_ap(dist: np.ndarray, query_labels: Labels, ref_labels: Labels, *,
                exclude: np.ndarray | None = None, topk: int | None = None,
                no_relevant: str = "count_as_zero") -> list[dict]:
    """Mean AP per query work, worst first (ties by label): ``{"work", "ap", "n_queries",
    "mean_rank1"}`` rows. With ``no_relevant="skip"`` queries without a relevant ref (and works
    with only such queries) are left out."""
    stats, keep = _scored_stats(dist, query_labels, ref_labels, exclude, topk, no_relevant)
    works, inv = np.unique(np.asarray(query_labels)[keep], return_inverse=True)
    counts = np.bincount(inv, minlength=works.size)
    ap_sum = np.bincount(inv, weights=stats["ap"][keep], minlength=works.size)
    r1_sum = np.bincount(inv, weights=stats["rank1"][keep], minlength=works.size)
    rows = [{"work": _plain(works[w]), "ap": float(ap_sum[w] / counts[w]),
             "n_queries": int(counts[w]), "mean_rank1": float(r1_sum[w] / counts[w])}
            for w in range(works.size)]
    return sorted(rows, key=lambda r: (r["ap"], str(r["work"])))


def most_confused_pairs(dist: np.ndarray, labels: Labels, k: int = 20, *,
                        ref_labels: Labels | None = None,
                        exclude: np.ndarray | None = None) -> list[dict]:
    """The ``k`` closest pairs of *different* works, closest first: ``{"query", "ref",
    "query_label", "ref_label", "distance"}``. Without ``ref_labels`` ``dist`` is one square
    list and each unordered pair (i < j) is reported once."""
    q_orig = np.asarray(labels)
    r_orig = q_orig if ref_labels is None else np.asarray(ref_labels)
    d, ql, rl, valid = _check_inputs(dist, q_orig, r_orig, exclude)
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    cand = valid & (ql[:, None] != rl[None, :])
    if ref_labels is None:
        if d.shape[0] != d.shape[1]:
            raise ConfigError(f"most_confused_pairs without ref_labels needs a square matrix, "
                              f"got {d.shape}")
        cand &= np.triu(np.ones(d.shape, dtype=bool), k=1)
    flat = np.flatnonzero(cand)
    vals = d.ravel()[flat]
    kk = min(k, flat.size)
    part = np.argpartition(vals, kk - 1)[:kk] if kk < flat.size else np.arange(flat.size)
    part = part[np.lexsort((flat[part], vals[part]))]
    rows = [divmod(int(flat[p]), d.shape[1]) for p in part]
    return [{"query": i, "ref": j, "query_label": _plain(q_orig[i]),
             "ref_label": _plain(r_orig[j]), "distance": float(d[i, j])} for i, j in rows]


def _plain(x: object) -> object:
    """A numpy scalar as a plain Python value (for tables and JSON)."""
    return x.item() if isinstance(x, np.generic) else x


def self_exclusion_mask(query_ids: Sequence[str], ref_ids: Sequence[str], *,
                        query_sources: Sequence[str | None] | None = None,
                        ref_sources: Sequence[str | None] | None = None) -> np.ndarray:
    """Bool [Q, R]: True where the perf ids are equal or (with sources: ``source_perf``, None /
    "" = the perf id) both come from the same recording, so a tempo copy never matches its own
    source (the original's blind spot, bug 13.3.3)."""
    q_ids, r_ids = [str(x) for x in query_ids], [str(x) for x in ref_ids]
    pairs = [(q_ids, r_ids)]
    if query_sources is not None or ref_sources is not None:
        pairs.append((_sources(q_ids, query_sources, "query"), _sources(r_ids, ref_sources, "ref")))
    mask = np.zeros((len(q_ids), len(r_ids)), dtype=bool)
    for a, b in pairs:
        codes = np.unique(np.asarray(a + b, dtype=str), return_inverse=True)[1]  # shared codes
        mask |= codes[:len(a), None] == codes[None, len(a):]
    return mask


def _sources(ids: list[str], sources: Sequence[str | None] | None, what: str) -> list[str]:
    sources = ids if sources is None else sources
    if len(sources) != len(ids):
        raise ConfigError(f"{what}_sources has {len(sources)} entries but there are {len(ids)} ids")
    return [str(s) if s is not None and s != "" else i for i, s in zip(ids, sources, strict=True)]


def query_in_ref_mask(pairs: Sequence[Sequence[int]], n_queries: int, n_refs: int) -> np.ndarray:
    """Bool [Q, R], True at each (query, ref) index pair; out-of-range pairs: ManifestError."""
    mask = np.zeros((n_queries, n_refs), dtype=bool)
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    bad = (arr < 0).any(axis=1) | (arr[:, 0] >= n_queries) | (arr[:, 1] >= n_refs)
    if bad.any():
        qi, ri = arr[np.flatnonzero(bad)[0]]
        raise ManifestError(f"query_in_ref pair ({qi}, {ri}) is out of range for {n_queries} "
                            f"queries x {n_refs} refs; regenerate the file for these lists")
    mask[arr[:, 0], arr[:, 1]] = True
    return mask


def bootstrap_ci(dist: np.ndarray, q_labels: Labels, r_labels: Labels,
                 exclude: np.ndarray | None = None, n_boot: int = 1000,
                 seed: int | np.random.Generator = 12345, confidence: float = 0.95, *,
                 topk: int | None = None, no_relevant: str = "count_as_zero"
                 ) -> dict[str, dict[str, float]]:
    """Work-stratified bootstrap CIs: ``{metric: {"point", "mean", "low", "high", "std"}}``.

    A replicate draws query works with replacement, each with all its query rows against **all**
    reference columns (the fork, fact sheet 8.4), so it is a weighted mean of per-work sums: one
    matrix product. ``low`` / ``high``: the (1 -+ confidence) / 2 percentiles; ``std``: ddof 0.
    """
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    stats, keep = _scored_stats(dist, q_labels, r_labels, exclude, topk, no_relevant)
    point = _means(stats, keep)
    works, inv = np.unique(np.asarray(q_labels), return_inverse=True)
    n_w = works.size
    w = keep.astype(np.float64)
    count_w = np.bincount(inv, weights=w, minlength=n_w)  # scored queries per work
    values = _per_query_values(stats) * w[:, None]
    sums_w = np.stack([np.bincount(inv, weights=values[:, j], minlength=n_w)
                       for j in range(len(METRIC_NAMES))], axis=1)  # [works, metrics]
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    draws = rng.integers(0, n_w, size=(n_boot, n_w))
    times = np.apply_along_axis(np.bincount, 1, draws, minlength=n_w).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # times: draws of each work per replicate
        reps = (times @ sums_w) / (times @ count_w)[:, None]  # [n_boot, metrics]
    out: dict[str, dict[str, float]] = {}
    for j, m in enumerate(METRIC_NAMES):
        col = reps[:, j][np.isfinite(reps[:, j])]
        col = col if col.size else np.array([np.nan])  # no finite replicate: all NaN
        low, high = np.percentile(col, [50 * (1 - confidence), 50 * (1 + confidence)])
        out[m] = {"point": point[m], "mean": float(col.mean()), "low": float(low),
                  "high": float(high), "std": float(col.std())}
    return out
