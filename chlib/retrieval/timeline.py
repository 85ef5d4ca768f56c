"""Which works a recording holds, and where: a timeline decoded from overlapping query windows.

A set of tunes, a medley or a concert is embedded window by window (``windows`` [T, D], one
every few seconds). Each window is scored against every reference work (max cosine similarity
over the work's reference windows, or its track vectors when the index keeps no windows), the
scores are normalised per window by a robust null (:func:`normalise_scores`), and the sequence
is decoded by :func:`viterbi` over the candidate works plus one "unknown" state.

Why Viterbi with a switch penalty, not a per-window argmax: the penalty is a prior that a tune
lasts many windows, so one noisy window cannot flip the label (the argmax flickers); the
max-sum decoding is exact and linear in T x S (the best predecessor is the same state or the
previous step's global best minus the penalty); change-point methods would need a cost per
segment anyway, which is what the penalty is. Each decoded segment is then searched in the
index as one window set (``by="work"``), so its p-value is on the index's calibration, the
same rule as identification; a segment with ``p >= possible_p`` becomes "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from chlib.core.errors import ConfigError
from chlib.retrieval.calibration import work_codes
from chlib.retrieval.index import ReferenceIndex
from chlib.retrieval.protocol import unit_rows

__all__ = ["UNKNOWN", "BLOCK_BYTES", "DEFAULT_UNKNOWN_Z", "DEFAULT_SWITCH_PENALTY",
           "DEFAULT_MIN_SEGMENT_Z",
           "SEGMENT_COLUMNS", "window_work_scores", "work_scores", "normalise_scores", "index_null",
           "segment_gate", "best_match_null", "best_match_p", "viterbi", "crossing_near",
           "decode_timeline", "segments_from_labels", "Timeline", "timeline"]

UNKNOWN = "unknown"  # label of time matched to no work (a work with this name would merge in)
BLOCK_BYTES = 64 << 20  # cap on one [query windows, reference rows] float32 block
# Defaults, in z units of the index's null (index_null: similarities between reference rows of
# different works). Chosen on the demo's sets (its 40 sets with the 06 index of 40 works, and 40
# sets of its 4 unseen test works): 18 s windows every 2 s; unknown_z 1.0 and 1.5 with a
# penalty of 4 gave the same time accuracy on the demo (0.80 and 0.93); 2.5 left most right
# windows unknown. The FluidSynth suite's sets (another generator) preferred 1.0, so that one
# choice also saw the suite. The per-window null (null="window") needs many works: with the
# 4-work index it labelled 7 % of the time right, the index's null 93 %. Two gates then keep a
# decoded segment: its best-match p-value (best_match_p) < possible_p, and its mean z >=
# min_segment_z. The z gate is what keeps recordings of no indexed work unknown: the suite's
# 40 sets against the demo's index (none of their works in it) had a named segment in 35
# files without it, 17 at 2.0, 8 at 2.2; 2.0 cost the demo's sets nothing.
# A fixed z suits one model only: a weaker model (a fresh `make demo` that kept epoch 6) has
# its same-work windows at 1.75 z of the null, so a gate of 2.0 left 83 % of its sets'
# time unknown. "auto" (the default) puts the gate at AUTO_GATE_SHARE of the index's own
# same-work level (index_null's same_z): 0.7 x 2.83 = 1.98 for the demo's model (its sets
# unchanged), 1.22 for that weaker one (time right 0.17 -> 0.65), 1.38 for the suite's
# model G (0.57 -> 0.64, false works 0.01 -> 0.03).
DEFAULT_UNKNOWN_Z = 1.0
DEFAULT_SWITCH_PENALTY = 4.0
DEFAULT_MIN_SEGMENT_Z = "auto"
AUTO_GATE_SHARE = 0.7
FIXED_GATE_Z = 2.0  # the "auto" gate where the index has no same-work level (one recording each)
SEGMENT_COLUMNS = ("query", "start_s", "end_s", "work", "p_value", "perf")


def _reference_rows(index: ReferenceIndex) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(unit reference rows [R, D], their record index [R], the works [W] in sorted order):
    the stored windows when every recording has some, else the track vectors."""
    n, owner, works = len(index), index.window_owner, sorted(set(index.works))
    if (index.windows is not None and owner is not None and len(owner) == len(index.windows)
            and np.array_equal(np.unique(owner), np.arange(n))):
        return index.windows, np.asarray(owner, np.int64), works
    return index.embeddings, np.arange(n, dtype=np.int64), works


def _similarities(q_unit: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Cosine similarities float32 [t, R] of one block of unit query windows (tests spy on it)."""
    return (q_unit @ refs.T).astype(np.float32, copy=False)


def window_work_scores(index: ReferenceIndex, windows: np.ndarray, *,
                       block_bytes: int | None = None, with_best: bool = False
                       ) -> tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], np.ndarray]:
    """``(scores float32 [T, W], works [W])``: max cosine similarity of each query window
    (rows of ``windows`` [T, D], raw; normalised here) to each work's reference rows, works
    in sorted name order. Query windows go in blocks so each [t, R] temporary stays under
    ``block_bytes`` (None = :data:`BLOCK_BYTES`). ``with_best`` adds ``best`` int64 [T, W]:
    the record (row of ``index.records``) that gave each max (lowest row on ties)."""
    q = np.asarray(windows, dtype=np.float32)
    if q.ndim != 2 or (len(index) and q.shape[1] != index.dim):
        raise ConfigError(f"windows must be [T, D] with D={index.dim}, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ConfigError("windows hold NaN or inf values; re-embed the query")
    refs, owner, works = _reference_rows(index)
    codes = work_codes(index.works)[owner] if len(index) else owner  # sorted-name codes
    order = np.argsort(codes, kind="stable")  # reference rows grouped by work
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0]) if len(order) else order
    permute = not np.array_equal(order, np.arange(len(order)))
    scores = np.zeros((len(q), len(works)), np.float32)
    best = np.full((len(q), len(works)) if with_best else (0, 0), -1, np.int64)
    step = max(1, int(block_bytes or BLOCK_BYTES) // (4 * max(1, len(refs))))
    cols = np.arange(len(refs), dtype=np.int32)[None]
    for a in range(0, len(q) if len(works) else 0, step):
        sims = _similarities(unit_rows(q[a:a + step]), refs)  # [t, R]
        if permute:
            sims = sims[:, order]
        scores[a:a + step] = mx = np.maximum.reduceat(sims, starts, axis=1)  # [t, W]
        if with_best:
            hit = sims == np.repeat(mx, np.diff(np.r_[starts, len(order)]), axis=1)
            first = np.minimum.reduceat(np.where(hit, cols, len(refs)), starts, axis=1)
            best[a:a + step] = owner[order[first]]
    return (scores, works, best) if with_best else (scores, works)


def work_scores(index: ReferenceIndex, windows: np.ndarray, works: Sequence[str]) -> np.ndarray:
    """Max cosine similarity float32 [T, len(works)] of each query window (rows of
    ``windows`` [T, D], raw) to each of ``works``' reference rows (-inf for a work the index
    lacks): :func:`window_work_scores` for a few works, without sorting the whole index."""
    refs, owner, _ = _reference_rows(index)
    rec_work = np.asarray(index.works, dtype=object)
    q = unit_rows(np.asarray(windows, dtype=np.float32))
    out = np.full((len(q), len(works)), -np.inf, np.float32)
    for j, name in enumerate(works):
        rows = np.flatnonzero(np.isin(owner, np.flatnonzero(rec_work == name)))
        if len(rows) and len(q):
            out[:, j] = _similarities(q, refs[rows]).max(axis=1)
    return out


def normalise_scores(scores: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Robust per-window z float32 [T, W]: ``(s - median_t) / (1.4826 * MAD_t + eps)``, median
    and MAD over all works of window t. Most works do not match a given window, so they are
    that window's null: z says how far a work stands out of it (1.4826 x MAD = std for a
    normal null). Needs a few dozen works to mean much; with one work z is 0."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        return np.zeros(s.shape, np.float32)
    med = np.median(s, axis=1, keepdims=True)
    mad = np.median(np.abs(s - med), axis=1, keepdims=True)
    return ((s - med) / (1.4826 * mad + eps)).astype(np.float32)


def _same_work_median(refs: np.ndarray, owner: np.ndarray, codes: np.ndarray, n: int,
                      rng: np.random.Generator, pool: np.ndarray | None = None) -> float:
    """Median cosine similarity of ``n`` random pairs of reference rows of one work in two
    different recordings (NaN when no work has two recordings); the first row of each pair
    from ``pool`` (rows; None = any)."""
    if not len(refs):
        return math.nan
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], codes)  # first row of each row's work (sorted)
    sizes = np.bincount(codes)[codes]
    a = rng.integers(len(refs), size=n) if pool is None else pool[rng.integers(len(pool), size=n)]
    b = order[starts[a] + rng.integers(0, sizes[a])]
    keep = owner[a] != owner[b]
    if not keep.any():
        return math.nan
    return float(np.median(np.einsum("nd,nd->n", refs[a[keep]], refs[b[keep]])))


def index_null(index: ReferenceIndex, n_pairs: int = 20_000, seed: int = 0
               ) -> tuple[float, float, float]:
    """``(median, scale, same_z)``: median and robust scale of the cosine similarity between
    reference rows (windows, or track vectors) of different works, the index's own null
    whatever its number of works; ``same_z``, the median similarity of rows of one work in
    two recordings in those z units (NaN when no work has two), what a true match scores."""
    refs, owner, _ = _reference_rows(index)
    codes = work_codes(index.works)[owner] if len(index) else owner
    rng = np.random.default_rng(seed)
    i, j = rng.integers(len(refs), size=(2, n_pairs)) if len(refs) else (owner, owner)
    estimate = None
    if index.readings > 1 and len(owner) == len(refs) and len(refs):  # the i side as a query
        first = np.searchsorted(owner, owner)  # window rows: its estimated key
        estimate = np.flatnonzero((np.arange(len(owner)) - first) % index.readings == 0)
        i = estimate[rng.integers(len(estimate), size=n_pairs)]
    keep = codes[i] != codes[j]
    if not keep.any():
        return 0.0, 1.0, math.nan
    sims = np.einsum("nd,nd->n", refs[i[keep]], refs[j[keep]]).astype(np.float64)
    med = float(np.median(sims))
    scale = float(1.4826 * np.median(np.abs(sims - med))) or 1.0
    same = _same_work_median(refs, owner, codes, n_pairs // 4, rng, estimate)
    return med, scale, (same - med) / scale


def segment_gate(min_segment_z: float | str, null_stats: Sequence[float] | None) -> float:
    """The mean z a decoded segment needs to keep its work: ``min_segment_z`` itself, or for
    "auto" :data:`AUTO_GATE_SHARE` x the index's same-work level (``null_stats[2]``, from
    :func:`index_null`; :data:`FIXED_GATE_Z` when there is none or it is not positive)."""
    if min_segment_z == "auto":
        same = float(null_stats[2]) if null_stats is not None and len(null_stats) > 2 else math.nan
        return AUTO_GATE_SHARE * same if math.isfinite(same) and same > 0 else FIXED_GATE_Z
    if isinstance(min_segment_z, str) or not math.isfinite(float(min_segment_z)):
        raise ConfigError(f"min_segment_z must be a number or 'auto', got {min_segment_z!r}")
    return float(min_segment_z)


def best_match_null(index: ReferenceIndex, n_queries: int = 400, seed: int = 0) -> np.ndarray:
    """Sorted distances (the index's rule) from up to ``n_queries`` reference recordings, each
    searched as a query, to the closest recording of *another* work: what the best of the
    index's works scores on a recording of none of them. :func:`best_match_p` reads it."""
    n = len(index)
    if n == 0:
        return np.zeros(0)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, n_queries), replace=False))
    sets = (index.window_sets() if index.windows is not None
            else [index.embeddings[i:i + 1] for i in range(n)])
    rows = index.search([sets[i] for i in pick], k=2, by="work", own_rows=pick)
    best = [next((r["distance"] for r in rr if r["work"] != index.works[i]), math.nan)
            for i, rr in zip(pick, rows, strict=True)]
    return np.sort(np.asarray([b for b in best if math.isfinite(b)], dtype=np.float64))


def best_match_p(null: np.ndarray, distance: float) -> float:
    """Share (with one pseudo-count) of ``null`` (:func:`best_match_null`) at or below
    ``distance``: the chance that a recording of no indexed work matches its best work this
    well. It accounts for the number of works searched, which a per-work p-value does not."""
    return float((np.searchsorted(null, distance, side="right") + 1) / (len(null) + 1))


def viterbi(emissions: np.ndarray, switch_penalty: float) -> np.ndarray:
    """Labels int64 [T] maximising ``sum_t e[t, l_t] - switch_penalty * #{t: l_t != l_t-1}``
    for ``emissions`` [T, S] (exact, O(T x S)). Ties go to the lowest state index (at each
    step among the maximising predecessors, and for the last label)."""
    e = np.asarray(emissions, dtype=np.float64)
    if e.ndim != 2 or e.shape[1] == 0:
        raise ConfigError(f"emissions must be [T, S >= 1], got shape {e.shape}")
    if not (switch_penalty >= 0 and math.isfinite(switch_penalty)):
        raise ConfigError(f"switch_penalty must be a finite number >= 0, got {switch_penalty}")
    n_t, n_s = e.shape
    if n_t == 0:
        return np.zeros(0, np.int64)
    states = np.arange(n_s)
    delta = e[0].copy()
    prev_best = np.zeros(n_t, np.int64)  # argmax of delta at step t - 1
    switched = np.zeros((n_t, n_s), bool)  # state s at t came from prev_best[t], not from s
    for t in range(1, n_t):
        b = int(np.argmax(delta))  # lowest index among maxima
        stay, move = delta, delta[b] - switch_penalty
        switched[t] = (move > stay) | ((move == stay) & (b < states))
        prev_best[t] = b
        delta = np.where(switched[t], move, stay) + e[t]
    labels = np.empty(n_t, np.int64)
    labels[-1] = int(np.argmax(delta))
    for t in range(n_t - 1, 0, -1):
        labels[t - 1] = prev_best[t] if switched[t, labels[t]] else labels[t]
    return labels


def crossing_near(diff: np.ndarray, centres_s: np.ndarray, near_s: float) -> float | None:
    """The time (s) nearest ``near_s`` at which ``diff`` [n] (the earlier work's score minus
    the later one's, at window centres ``centres_s`` [n], increasing) goes from > 0 to <= 0,
    linearly interpolated between the two centres; None when it never does."""
    d, c = np.asarray(diff, np.float64), np.asarray(centres_s, np.float64)
    i = np.flatnonzero((d[:-1] > 0) & (d[1:] <= 0))
    if i.size == 0:
        return None
    t = c[i] + (c[i + 1] - c[i]) * d[i] / (d[i] - d[i + 1])
    return float(t[np.argmin(np.abs(t - near_s))])


def decode_timeline(z: np.ndarray, works: Sequence[str], *,
                    unknown_z: float = DEFAULT_UNKNOWN_Z,
                    switch_penalty: float = DEFAULT_SWITCH_PENALTY, top_m: int = 5) -> list[str]:
    """The work (or :data:`UNKNOWN`) of each window of ``z`` [T, W] (:func:`normalise_scores`).
    States: the union of every window's ``top_m`` works, plus "unknown" (state 0, so ties go
    to it) emitting the constant ``unknown_z``: a window must beat it to be named. See
    :data:`DEFAULT_UNKNOWN_Z` for how the defaults were chosen."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(works):
        raise ConfigError(f"z must be [T, {len(works)}] (one column per work), got {z.shape}")
    if top_m < 1:
        raise ConfigError(f"top_m must be >= 1, got {top_m}")
    if len(works) == 0:
        return [UNKNOWN] * len(z)
    m = min(top_m, z.shape[1])
    top = np.argpartition(-z, m - 1, axis=1)[:, :m] if m < z.shape[1] else np.arange(m)
    cand = np.unique(top)
    em = np.concatenate([np.full((len(z), 1), float(unknown_z)), z[:, cand]], axis=1)
    names = [UNKNOWN] + [str(works[c]) for c in cand]
    return [names[s] for s in viterbi(em, switch_penalty)]


def segments_from_labels(labels: Sequence, window_starts_s: Sequence[float],
                         window_len_s: float, duration_s: float) -> list[dict]:
    """Runs of equal labels as ``{"start_s", "end_s", "work", "first_window",
    "last_window"}``: a window votes for its centre, so a change between windows i and i+1
    falls midway between their centres; the first run starts at 0, the last ends at
    ``duration_s`` (seconds)."""
    starts = np.asarray(window_starts_s, dtype=np.float64)
    if len(starts) != len(labels):
        raise ConfigError(f"{len(labels)} labels but {len(starts)} window start times")
    centres = starts + float(window_len_s) / 2.0
    segs: list[dict] = []
    for i, lab in enumerate(labels):
        if segs and segs[-1]["work"] == lab:
            segs[-1]["last_window"] = i
            continue
        cut = 0.0 if not segs else min(max((centres[i - 1] + centres[i]) / 2, 0.0), duration_s)
        if segs:
            segs[-1]["end_s"] = float(cut)
        segs.append({"start_s": float(cut), "end_s": float(duration_s), "work": lab,
                     "first_window": i, "last_window": i})
    return segs


@dataclass
class Timeline:
    """Segments ``{"start_s", "end_s", "work", "p_value", "perf", "mean_z"}`` in time order
    covering [0, ``duration_s``]; ``labels``: the final label of each window; ``best_z``:
    each work's best per-window z (:func:`normalise_scores`) over the file (for
    :meth:`ranking`)."""

    segments: list[dict]
    duration_s: float
    labels: list[str] = field(default_factory=list)
    best_z: dict[str, float] = field(default_factory=dict)

    def works(self) -> list[dict]:
        """The whole-file answer: per named work ``{"work", "seconds", "share", "p_value"
        (best of its segments), "first_start_s"}``, most seconds first."""
        rows: dict[str, dict] = {}
        for s in self.segments:
            if s["work"] == UNKNOWN:
                continue
            r = rows.setdefault(s["work"], {"work": s["work"], "seconds": 0.0, "share": 0.0,
                                            "p_value": math.nan, "first_start_s": s["start_s"]})
            r["seconds"] += s["end_s"] - s["start_s"]
            r["p_value"] = float(np.fmin(r["p_value"], s["p_value"]))  # NaN never wins
        for r in rows.values():
            r["share"] = r["seconds"] / self.duration_s if self.duration_s > 0 else math.nan
        return sorted(rows.values(), key=lambda r: (-r["seconds"], r["first_start_s"]))

    def ranking(self, k: int = 10) -> list[str]:
        """Up to ``k`` works for recall@k: the named ones (:meth:`works` order), then the
        others by their best z over the file."""
        named = [r["work"] for r in self.works()]
        seen = set(named)
        rest = sorted((w for w in self.best_z if w not in seen),
                      key=lambda w: (-self.best_z[w], w))
        return (named + rest)[:k]

    def to_rows(self, query: str) -> list[dict]:
        """Rows for ``segments.csv`` (columns :data:`SEGMENT_COLUMNS`)."""
        return [{"query": str(query)} | {c: s[c] for c in SEGMENT_COLUMNS[1:]}
                for s in self.segments]


def timeline(index: ReferenceIndex, windows: np.ndarray, window_starts_s: Sequence[float],
             window_len_s: float, duration_s: float, *, unknown_z: float = DEFAULT_UNKNOWN_Z,
             switch_penalty: float = DEFAULT_SWITCH_PENALTY, top_m: int = 5,
             possible_p: float = 0.05, search_k: int = 10, block_bytes: int | None = None,
             null: str = "index", best_null: np.ndarray | None = None,
             null_stats: Sequence[float] | None = None,
             min_segment_z: float | str = DEFAULT_MIN_SEGMENT_Z) -> Timeline:
    """The :class:`Timeline` of a query from its window embeddings ``windows`` [T, D] (raw),
    their start times and length (seconds) and its duration (seconds). Window scores are z
    units of ``null``: "index" (:func:`index_null`, whatever the number of works) or "window"
    (:func:`normalise_scores`, needs many works). Each decoded run is searched as one window
    set (``index.search(..., k=search_k, by="work")``) for the decoded work's distance and
    closest recording (perf); its p-value is :func:`best_match_p` of that distance against
    ``best_null`` (default :func:`best_match_null` of the index; pass it to reuse it across
    queries; likewise ``null_stats``, :func:`index_null`'s result). A run whose work is not in
    the top ``search_k``, has ``p >= possible_p`` or a mean z under :func:`segment_gate`
    becomes "unknown" (NaN p-value, no perf), never another work (the windows' evidence
    decides the work, the run's search only confirms it); equal neighbours then merge and are
    searched again."""
    w = np.asarray(windows, dtype=np.float32)
    v = index.readings  # rows per window: the index's key readings, the estimate first
    if w.ndim != 2 or len(w) == 0 or len(w) % v:
        raise ConfigError(f"windows must be [T >= 1 windows x {v} key readings, D] window "
                          f"embeddings of the query (the index's window settings), got shape "
                          f"{w.shape}: embed at least one window")
    if not duration_s > 0 or len(window_starts_s) != len(w) // v:
        raise ConfigError(f"need duration_s > 0 seconds and one start time per window, got "
                          f"{duration_s} s and {len(window_starts_s)} starts for "
                          f"{len(w) // v} windows")
    # window scores: each window at its estimated key against every reading of the references
    scores, works = window_work_scores(index, w[0::v], block_bytes=block_bytes)
    best_null = best_match_null(index) if best_null is None else best_null
    if null not in ("index", "window"):
        raise ConfigError(f"null must be 'index' or 'window', got {null!r}")
    per_window = normalise_scores(scores)  # the "window" null, and the others' order below
    if null == "index":
        null_stats = index_null(index) if null_stats is None else null_stats
        med, scale = null_stats[0], null_stats[1]
        z = ((scores - med) / scale).astype(np.float32)
    else:
        z = per_window
    gate = segment_gate(min_segment_z, null_stats if null == "index" else None)
    labels = decode_timeline(z, works, unknown_z=unknown_z, switch_penalty=switch_penalty,
                             top_m=top_m)
    col = {name: j for j, name in enumerate(works)}
    found: dict[tuple[int, int], dict] = {}  # run -> the row that labels it
    while True:
        changed = False
        cuts = [0, *(i for i in range(1, len(labels)) if labels[i] != labels[i - 1]), len(labels)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):  # runs of equal labels
            if labels[a] == UNKNOWN or (a, b) in found:
                continue
            rows = index.search([w[a * v:b * v]], k=search_k, by="work")[0]
            row = next((r for r in rows if r["work"] == labels[a]), None)
            if row is not None:
                row = row | {"p_value": best_match_p(best_null, row["distance"])}
            found[(a, b)] = row
            weak = float(np.mean(z[a:b, col[labels[a]]])) < gate
            new = (UNKNOWN if row is None or row["p_value"] >= possible_p or weak
                   else labels[a])
            if new != labels[a]:
                labels[a:b] = [new] * (b - a)
                changed = True
        if not changed:
            break
    segments = []
    for s in segments_from_labels(labels, window_starts_s, window_len_s, duration_s):
        a, b, work = s["first_window"], s["last_window"] + 1, s["work"]
        row = found.get((a, b)) if work != UNKNOWN else None
        zz = (z[a:b, col[work]] if work in col else z[a:b].max(axis=1) if z.shape[1]
              else np.full(b - a, np.nan))
        segments.append({"start_s": s["start_s"], "end_s": s["end_s"], "work": work,
                         "p_value": row["p_value"] if row else math.nan,
                         "perf": row["perf"] if row else None, "mean_z": float(np.mean(zz))})
    # the others' order for recall@k: each work's best per-window z (a window's own null), which
    # ranked the sets' unnamed works better than the index's null (0.80 against 0.70 of the
    # suite's sets with all works in the top 10)
    best = per_window.max(axis=0) if len(works) else np.zeros(0)
    best_z = dict(zip(works, best.astype(float).tolist(), strict=True))
    return Timeline(segments, float(duration_s), labels, best_z)
