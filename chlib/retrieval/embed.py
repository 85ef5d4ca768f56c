"""Whole-track window embeddings: the one embedding path of chlib.

Training-time evaluation, ``05_evaluate``, the reference index and ``identify`` all embed tracks
with :func:`embed_tracks` and compare them with :func:`track_distances` (or the index's
:func:`track_embedding`), so a metric measures exactly what identification will do.

A track's CQT features ``[frames, bins]`` (dB, 25 frames/s by default) are cut into windows of
``window`` raw frames (``hp.chunk_len[0]`` = ``chunk_frame[0] x mean_size``, 3375 frames =
135 s by default), each window is padded with -100 dB if it runs past the end, averaged over
groups of ``mean_size`` frames (:func:`prepare_window`, the original's "defined mode" chunk) and
embedded by the model (``[B, window // mean_size, bins] -> [B, D]``).

Windows (:func:`window_starts`) are placed over the **true feature length** (rows of the
array), not the manifest's ``dur_s``:

* ``tail="shift"`` (chlib's default): non-overlapping windows from frame 0; if the leftover tail
  is longer than ``min_tail`` of a window, one more window aligned to the end of the track is
  added (it overlaps the previous one), so the end of a track is never ignored;
* ``tail="drop"``: the original (fact sheet 8.1): windows start at 0, hop, 2 hop, ... while
  ``start + window < n_frames`` (strictly), always at least the start-0 window; the tail is lost;
* ``tail="pad"``: like "shift" but the extra window starts where the previous one ended and is
  padded with -100 dB.

A track shorter than one window always gives one window at 0, padded with -100 dB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.device import pick_device
from chlib.core.errors import CheckpointError, ConfigError, FeatureError
from chlib.core.io import atomic_save_npy, stable_hash, write_json
from chlib.data.features import PAD_DB, load_feature, prepare_window

__all__ = [
    "PAD_DB",
    "TAIL_MODES",
    "DEFAULT_MIN_TAIL",
    "window_starts",
    "prepare_window",
    "load_feature",
    "embed_tracks",
    "embed_tracks_hp",
    "window_settings",
    "unit_rows",
    "track_distances",
    "track_embedding",
    "track_embeddings",
    "cached_embed_tracks",
    "EMBED_CACHE_VERSION",
]

TAIL_MODES = ("shift", "drop", "pad")
DEFAULT_MIN_TAIL = 0.25  # a tail shorter than this fraction of a window is not embedded
EMBED_CACHE_VERSION = 1  # bump when the embedding recipe changes: old caches are then ignored


# --------------------------------------------------------------------------------------------
# windows


def window_starts(
    n_frames: int,
    window: int,
    *,
    hop: int | None = None,
    tail: str = "shift",
    min_tail: float = DEFAULT_MIN_TAIL,
) -> list[int]:
    """Start frames of the embedding windows of a track of ``n_frames`` raw CQT frames.

    Parameters
    ----------
    n_frames : int >= 0
        True feature length (rows of the ``.npy``).
    window : int > 0
        Window length in raw frames (``hp.chunk_len[0]``; 3375 = 135 s at 25 frames/s).
    hop : int > 0 or None
        Distance between window starts in raw frames (default ``window``: no overlap).
    tail : "shift" | "drop" | "pad"
        What to do with the end of the track that no full window covers (module docstring).
    min_tail : float in [0, 1]
        "shift" / "pad" add a window for the tail only if the tail is longer than
        ``min_tail x window`` frames (default 0.25: 34 s for a 135 s window).

    Returns
    -------
    list of int, increasing, at least one (``[0]`` for a track shorter than a window).
    """
    if window < 1:
        raise ConfigError(f"window must be >= 1 raw frame, got {window}")
    hop = window if hop is None else int(hop)
    if hop < 1:
        raise ConfigError(f"hop must be >= 1 raw frame, got {hop}")
    if tail not in TAIL_MODES:
        raise ConfigError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    if not 0.0 <= min_tail <= 1.0:
        raise ConfigError(f"min_tail must be in [0, 1], got {min_tail}")
    n_frames = int(n_frames)
    if n_frames <= window:
        return [0]
    if tail == "drop":  # the original: start + window < length, strictly
        return list(range(0, n_frames - window, hop)) or [0]
    starts = list(range(0, n_frames - window + 1, hop))
    covered = starts[-1] + window
    if n_frames - covered > min_tail * window:
        starts.append(n_frames - window if tail == "shift" else starts[-1] + hop)
    return starts


# --------------------------------------------------------------------------------------------
# embedding


def window_settings(
    window: int, mean_size: int, *, hop: int | None = None, tail: str = "shift",
    min_tail: float = DEFAULT_MIN_TAIL,
) -> dict:
    """The window recipe as a plain dict (part of cache keys and of the index's metadata)."""
    return {"window": int(window), "mean_size": int(mean_size),
            "hop": int(window if hop is None else hop), "tail": tail, "min_tail": float(min_tail)}


def _iter_windows(
    features: Sequence[np.ndarray | str | os.PathLike],
    settings: dict,
    n_bins: int | None,
    failures: list | None,
) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """Yield ``(track index, n_windows, window array or None)``, one window at a time.

    For a failed track (recorded in ``failures``) a single ``(i, 0, None)`` is yielded.
    """
    for i, src in enumerate(features):
        try:
            feat = load_feature(src)
            if n_bins is not None and feat.shape[1] != n_bins:
                raise FeatureError(
                    f"{_name(src)}: {feat.shape[1]} CQT bins but the model expects {n_bins}; "
                    "re-extract the features with this run's feature settings"
                )
            starts = window_starts(feat.shape[0], settings["window"], hop=settings["hop"],
                                   tail=settings["tail"], min_tail=settings["min_tail"])
            wins = [prepare_window(feat, s, settings["window"], settings["mean_size"]) for s in starts]
            if not all(np.isfinite(w).all() for w in wins):
                raise FeatureError(f"{_name(src)}: features hold NaN or inf values; re-extract them")
        except FeatureError as e:
            if failures is None:
                raise
            failures.append({"index": i, "feat": _name(src), "reason": str(e)})
            yield i, 0, None
            continue
        for w in wins:
            yield i, len(wins), w


def _name(src: Any) -> str:
    return "feature array" if isinstance(src, np.ndarray) else str(src)


def embed_tracks(
    model: torch.nn.Module,
    features: Sequence[np.ndarray | str | os.PathLike],
    *,
    window: int,
    mean_size: int,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    hop: int | None = None,
    tail: str = "shift",
    min_tail: float = DEFAULT_MIN_TAIL,
    n_bins: int | None = None,
    progress: bool = True,
    failures: list | None = None,
) -> list[np.ndarray | None]:
    """Embed every window of every track.

    Parameters
    ----------
    model : nn.Module mapping float32 [B, window // mean_size, bins] -> [B, D]
        Put in eval mode for the call (its previous mode is restored afterwards).
    features : sequence of [frames, bins] arrays or ``.npy`` paths (memory-mapped)
    window, mean_size, hop, tail, min_tail : the window recipe (:func:`window_starts`,
        :func:`prepare_window`).
    device : where the model runs: None (default) = where its parameters are; otherwise
        "auto", "cpu", "cuda", "mps" or a torch.device, and the model is moved there.
    batch_size : windows per forward pass; windows of different tracks share batches.
    n_bins : if given, every track must have this many CQT bins.
    progress : show a tqdm progress bar over windows.
    failures : None (default) -> the first unusable feature file raises FeatureError;
        a list -> bad tracks are appended as ``{"index", "feat", "reason"}``, their result is
        None and the others are embedded (batch jobs skip and report).

    Returns
    -------
    list (one per track, in input order) of float32 CPU arrays [n_windows, D], raw (not
    normalised) model outputs; None for a failed track.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    settings = window_settings(window, mean_size, hop=hop, tail=tail, min_tail=min_tail)
    window_starts(1, window, hop=hop, tail=tail, min_tail=min_tail)  # validate the recipe early
    device = _model_device(model) if device is None else pick_device(device)
    n_tracks = len(features)
    out: list[list[np.ndarray] | None] = [[] for _ in range(n_tracks)]
    expected: dict[int, int] = {}
    was_training = model.training
    model.eval()
    model.to(device)
    bar = _progress(progress, n_tracks)
    try:
        batch: list[np.ndarray] = []
        owners: list[int] = []

        def flush() -> None:
            x = torch.from_numpy(np.stack(batch)).to(device)  # [B, T, F]
            with torch.inference_mode():
                emb = model(x)
            emb = emb.detach().to("cpu", torch.float32).numpy()
            for row, owner in zip(emb, owners, strict=True):
                out[owner].append(row)
            batch.clear()
            owners.clear()

        last = -1
        for i, n_win, w in _iter_windows(features, settings, n_bins, failures):
            if i != last and bar is not None:
                bar.update(i - last)
                last = i
            if w is None:
                out[i] = None
                continue
            expected[i] = n_win
            batch.append(w)
            owners.append(i)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        if bar is not None:
            bar.update(n_tracks - 1 - last)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    result: list[np.ndarray | None] = []
    for i, rows in enumerate(out):
        if rows is None:
            result.append(None)
            continue
        assert len(rows) == expected[i]
        result.append(np.stack(rows).astype(np.float32, copy=False))
    return result


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="embedding", unit="track", leave=False)


def embed_tracks_hp(
    model: torch.nn.Module,
    features: Sequence[np.ndarray | str | os.PathLike],
    hp: Any,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> list[np.ndarray | None]:
    """:func:`embed_tracks` with the run's recipe: ``window = hp.chunk_len[0]``,
    ``mean_size = hp.mean_size``, ``batch_size = hp.eval_batch_size``,
    ``n_bins = hp.features.n_bins`` (keyword arguments override)."""
    kw: dict[str, Any] = {"window": hp.chunk_len[0], "mean_size": hp.mean_size,
                          "batch_size": hp.eval_batch_size, "n_bins": hp.features.n_bins}
    kw.update(kwargs)
    return embed_tracks(model, features, device=device, **kw)


# --------------------------------------------------------------------------------------------
# distances


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` [N, D] divided by their L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def _stack_windows(tracks: Sequence[np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit window rows [W, D] and segment offsets [n_tracks] (start row of each track)."""
    if len(tracks) == 0:
        raise ConfigError(f"{what}: no tracks given")
    counts = []
    for i, t in enumerate(tracks):
        if t is None or np.ndim(t) != 2 or len(t) == 0:
            raise ConfigError(
                f"{what}[{i}]: expected a [n_windows >= 1, D] array, got "
                f"{None if t is None else np.shape(t)}"
            )
        counts.append(len(t))
    rows = unit_rows(np.concatenate([np.asarray(t, dtype=np.float32) for t in tracks], axis=0))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return rows, offsets


def track_distances(
    q_windows: Sequence[np.ndarray],
    r_windows: Sequence[np.ndarray],
    *,
    reduce: str = "min",
    block_elements: int = 1 << 25,
) -> np.ndarray:
    """Cosine distance between every query track and every reference track.

    Every window embedding is L2-normalised; the distance of two windows is
    ``1 - cos`` in [0, 2]; the distance of two tracks is the **min** over all their window pairs
    (``reduce="min"``, the original's rule: the best-matching passages decide) or the **mean**
    over window pairs (``reduce="mean"``).

    Parameters
    ----------
    q_windows, r_windows : sequences of [n_windows_i, D] arrays (outputs of :func:`embed_tracks`)
    reduce : "min" | "mean"
    block_elements : cap on the size of one window x window similarity block (memory).

    Returns
    -------
    float32 array [Q, R]
    """
    if reduce not in ("min", "mean"):
        raise ConfigError(f"reduce must be 'min' or 'mean', got {reduce!r}")
    q, q_off = _stack_windows(q_windows, "q_windows")
    r, r_off = _stack_windows(r_windows, "r_windows")
    if q.shape[1] != r.shape[1]:
        raise ConfigError(f"query windows have D={q.shape[1]} but reference windows D={r.shape[1]}")
    q_counts = np.diff(np.append(q_off, q.shape[0]))
    r_counts = np.diff(np.append(r_off, r.shape[0]))
    n_q, n_r = len(q_off), len(r_off)
    out = np.empty((n_q, n_r), dtype=np.float32)
    # blocks of whole query tracks, sized so that one similarity block stays under the cap
    rows_per_block = max(1, block_elements // max(1, r.shape[0]))
    t0 = 0
    while t0 < n_q:
        t1 = t0 + 1
        while t1 < n_q and q_off[t1] + q_counts[t1] - q_off[t0] <= rows_per_block:
            t1 += 1
        a, b = q_off[t0], q_off[t1 - 1] + q_counts[t1 - 1]
        dist = 1.0 - np.clip(q[a:b] @ r.T, -1.0, 1.0)  # [block windows, all ref windows]
        local = q_off[t0:t1] - a
        if reduce == "min":
            per_q = np.minimum.reduceat(dist, local, axis=0)
            out[t0:t1] = np.minimum.reduceat(per_q, r_off, axis=1)
        else:
            per_q = np.add.reduceat(dist, local, axis=0)
            summed = np.add.reduceat(per_q, r_off, axis=1)
            out[t0:t1] = summed / (q_counts[t0:t1, None] * r_counts[None, :])
        t0 = t1
    return out


def track_embedding(windows: np.ndarray) -> np.ndarray:
    """One unit vector [D] per track: the mean of its unit window embeddings, renormalised.

    If the unit windows cancel out (mean norm < 1e-8) the first unit window is returned.
    """
    w = unit_rows(np.atleast_2d(np.asarray(windows, dtype=np.float32)))
    m = w.mean(axis=0)
    n = float(np.linalg.norm(m))
    if n < 1e-8:
        return w[0].copy()
    return (m / n).astype(np.float32)


def track_embeddings(tracks: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`track_embedding` of each track, stacked: float32 [N, D]."""
    return np.stack([track_embedding(t) for t in tracks]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# cache


def _feature_key(src: str | os.PathLike, key_by: str) -> dict:
    p = Path(src).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FeatureError(f"{src}: feature file not found; re-run feature extraction") from None
    key: dict[str, Any] = {"path": str(p), "size": st.st_size}
    if key_by == "content":
        from chlib.core.io import file_sha256

        key["sha256"] = file_sha256(p)
    else:
        key["mtime_ns"] = st.st_mtime_ns
    return key


def cached_embed_tracks(
    model: torch.nn.Module,
    fingerprint: str | None,
    features: Sequence[dict | str | os.PathLike],
    hp: Any,
    cache_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    hop: int | None = None,
    tail: str = "shift",
    min_tail: float = DEFAULT_MIN_TAIL,
    key_by: str = "stat",
    manifest_path: str | os.PathLike | None = None,
    progress: bool = True,
    failures: list | None = None,
) -> list[np.ndarray | None]:
    """:func:`embed_tracks_hp` with an on-disk cache. **This function caches.**

    One ``.npy`` [n_windows, D] per track under
    ``cache_dir/<model fingerprint>/<settings hash>/<track hash>.npy``, where

    * the model fingerprint is computed from ``model.state_dict()`` (a ``fingerprint`` argument
      that disagrees with it is a CheckpointError: it would poison the cache);
    * the settings hash covers the window recipe, ``hp.features`` and the cache version
      (``settings.json`` in that folder spells them out);
    * the track hash covers the feature file's absolute path and size plus its mtime
      (``key_by="stat"``, default) or its SHA-256 (``key_by="content"``, slower, immune to
      touched-but-unchanged files).

    So a changed model, window recipe, feature setting or feature file never reuses an
    embedding. Writes are atomic; nothing is pickled. ``features`` are ``.npy`` paths or
    manifest records (their ``feat`` key, resolved with :func:`chlib.core.manifest.resolve_path`).
    Returns what :func:`embed_tracks` returns.
    """
    from chlib.core.manifest import resolve_path
    from chlib.model.checkpoint import model_fingerprint

    if key_by not in ("stat", "content"):
        raise ConfigError(f"key_by must be 'stat' or 'content', got {key_by!r}")
    actual = model_fingerprint(model.state_dict())
    if fingerprint is not None and fingerprint != actual:
        raise CheckpointError(
            f"fingerprint {fingerprint} was given but the model's weights hash to {actual}; "
            "pass fingerprint=None (computed) or the fingerprint of this very model"
        )
    settings = window_settings(hp.chunk_len[0], hp.mean_size, hop=hop, tail=tail, min_tail=min_tail)
    settings_doc = {"version": EMBED_CACHE_VERSION, "windows": settings,
                    "features": hp.features.key(), "model_fingerprint": actual}
    folder = Path(cache_dir) / actual / stable_hash(settings_doc)
    if not (folder / "settings.json").exists():
        write_json(folder / "settings.json", settings_doc)

    paths: list[Path] = []
    for f in features:
        if isinstance(f, dict):
            if "feat" not in f:
                raise FeatureError(f"record {f.get('perf', f)!r} has no 'feat' key (use full.txt)")
            paths.append(resolve_path(f["feat"], manifest_path))
        else:
            paths.append(Path(f))

    result: list[np.ndarray | None] = [None] * len(paths)
    todo: list[int] = []
    files: dict[int, Path] = {}
    for i, p in enumerate(paths):
        try:
            key = _feature_key(p, key_by)
        except FeatureError as e:
            if failures is None:
                raise
            failures.append({"index": i, "feat": str(p), "reason": str(e)})
            continue
        files[i] = folder / f"{stable_hash(key, 24)}.npy"
        if files[i].exists():
            try:
                result[i] = np.load(files[i], allow_pickle=False)
                continue
            except (ValueError, OSError, EOFError):
                pass  # unreadable cache entry: recompute it
        todo.append(i)
    if todo:
        local_failures: list | None = [] if failures is not None else None
        kw: dict[str, Any] = {"hop": hop, "tail": tail, "min_tail": min_tail, "progress": progress,
                              "failures": local_failures}
        if batch_size is not None:
            kw["batch_size"] = batch_size
        fresh = embed_tracks_hp(model, [paths[i] for i in todo], hp, device, **kw)
        for j, emb in zip(todo, fresh, strict=True):
            if emb is not None:
                atomic_save_npy(files[j], emb)
                result[j] = emb
        if failures is not None and local_failures:
            for fl in local_failures:
                failures.append({**fl, "index": todo[fl["index"]]})
    return result

