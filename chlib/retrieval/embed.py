"""Whole-track window embeddings: the one embedding path of chlib (evaluation, index, identify).

A CQT ``[frames, bins]`` is cut into windows of ``window`` raw frames (``hp.chunk_len[0]``),
padded with -100 dB, averaged over ``mean_size`` frames (:func:`prepare_window`) and embedded
(``[B, window // mean_size, bins] -> [B, D]``). :func:`window_starts`: ``tail="shift"``
(default) non-overlapping windows from 0 plus one aligned to the end when the leftover exceeds
``min_tail`` of a window; ``"drop"`` the original (starts 0, hop, ... while ``start + window <
n_frames``); ``"pad"`` like "shift" but the extra window starts where the previous one ended. A
track shorter than one window gives one padded window at 0."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.config import KEYED_TRANSFORMS
from chlib.core.device import pick_device
from chlib.core.errors import CheckpointError, ConfigError, FeatureError
from chlib.core.io import atomic_save_npy, file_sha256, stable_hash, write_json
from chlib.core.progress import progress as progress_bar
from chlib.data.features import PAD_DB, feature_path, load_feature, prepare_window
from chlib.model.checkpoint import model_fingerprint

__all__ = ["PAD_DB", "TAIL_MODES", "DEFAULT_MIN_TAIL", "EMBED_CACHE_VERSION", "window_starts",
           "window_settings", "hp_window_settings", "prepare_window", "load_feature", "embed_windows",
           "embed_recordings"]

TAIL_MODES = ("shift", "drop", "pad")
DEFAULT_MIN_TAIL = 0.25  # a tail shorter than this fraction of a window is not embedded
EMBED_CACHE_VERSION = 1  # bump when the embedding recipe changes: old caches are then ignored


def window_starts(n_frames: int, window: int, *, hop: int | None = None, tail: str = "shift",
                  min_tail: float = DEFAULT_MIN_TAIL) -> list[int]:
    """Increasing start frames (at least ``[0]``) of the windows of a track of ``n_frames``
    raw frames; ``hop`` default ``window``; ``tail``, ``min_tail`` in [0, 1]: module docstring."""
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
    if n_frames - (starts[-1] + window) > min_tail * window:
        starts.append(n_frames - window if tail == "shift" else starts[-1] + hop)
    return starts


def window_settings(window: int, mean_size: int, *, hop: int | None = None, tail: str = "shift",
                    min_tail: float = DEFAULT_MIN_TAIL, transform: str = "none",
                    bins_per_octave: int = 12, key_variants: Sequence[int] = (0,)) -> dict:
    """The window recipe as a plain dict (part of cache keys and of the index's metadata); a
    model-input ``transform`` other than "none" is part of it (with the CQT's bins per octave),
    and so are ``key_variants`` other than ``(0,)``: each window is then embedded once per key
    reading (semitones added to the keyed transform's estimate), one row each, so a track's
    rows are ``[n_windows x len(key_variants), D]`` and rule "min" takes the best reading."""
    out = {"window": int(window), "mean_size": int(mean_size),
           "hop": int(window if hop is None else hop), "tail": tail, "min_tail": float(min_tail)}
    if transform != "none":
        out.update(transform=transform, bins_per_octave=int(bins_per_octave))
    variants = [int(k) for k in key_variants]
    if variants != [0]:
        if transform not in KEYED_TRANSFORMS or not variants or variants[0] != 0:
            raise ConfigError(f"key_variants {variants} need a keyed input transform "
                              f"({', '.join(KEYED_TRANSFORMS)}) and must start with 0; got "
                              f"transform {transform!r}")
        out["key_variants"] = variants
    return out


def hp_window_settings(hp: Any, **kw: Any) -> dict:
    """:func:`window_settings` of a run config (its first chunk length, input transform and key
    variants)."""
    return window_settings(hp.chunk_len[0], hp.mean_size, transform=hp.input_transform,
                           bins_per_octave=hp.features.bins_per_octave,
                           key_variants=getattr(hp, "key_variants", [0]), **kw)


def _name(src: Any) -> str:
    return "feature array" if isinstance(src, np.ndarray) else str(src)


def _track_windows(src: Any, settings: dict, n_bins: int | None) -> Iterator[np.ndarray]:
    """The model inputs [window // mean_size, bins] of one track, made one at a time (memory
    stays bounded on a long track); FeatureError, before the first, if the track is unusable."""
    feat = load_feature(src)
    if n_bins is not None and feat.shape[1] != n_bins:
        raise FeatureError(f"{_name(src)}: {feat.shape[1]} CQT bins but the model expects "
                           f"{n_bins}; re-extract the features with this run's feature settings")
    step = max(1, (1 << 22) // feat.shape[1])  # rows checked at once (a memory map is paged in)
    if not all(np.isfinite(feat[a:a + step]).all() for a in range(0, feat.shape[0], step)):
        raise FeatureError(f"{_name(src)}: features hold NaN or inf values; re-extract them")
    starts = window_starts(feat.shape[0], settings["window"], hop=settings["hop"],
                           tail=settings["tail"], min_tail=settings["min_tail"])
    return (window for s in starts for window in _readings(prepare_window(
        feat, s, settings["window"], settings["mean_size"],
        transform=settings.get("transform", "none"),
        bins_per_octave=settings.get("bins_per_octave", 12)), settings.get("key_variants", [0])))


def _readings(window: np.ndarray, key_variants: Sequence[int]) -> Iterator[np.ndarray]:
    """A keyed window [frames, 12] at each key reading: rotated by the reading's semitones,
    what ``prepare_window(..., key_shift=k)`` gives, without estimating the key again."""
    return (np.roll(window, -k, axis=1) if k else window for k in key_variants)


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def embed_windows(model: torch.nn.Module, features: Sequence[np.ndarray | str | os.PathLike], *,
                  window: int, mean_size: int, device: str | torch.device | None = None,
                  batch_size: int = 64, hop: int | None = None, tail: str = "shift",
                  min_tail: float = DEFAULT_MIN_TAIL, n_bins: int | None = None,
                  progress: bool = True, failures: list | None = None,
                  transform: str = "none", bins_per_octave: int = 12,
                  key_variants: Sequence[int] = (0,)) -> list[np.ndarray | None]:
    """Raw window embeddings, float32 [n_windows x len(key_variants), D] per track of
    ``features`` ([frames, bins] arrays or ``.npy`` paths; rows window by window, each window's
    key readings together), the model in eval mode on ``device`` (None = where it is), in
    batches of ``batch_size`` windows; ``n_bins``: CQT bins every track must have. An unusable
    feature file raises FeatureError, or with a ``failures`` list adds ``{"index", "feat",
    "reason"}`` to it and gives None."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    settings = window_settings(window, mean_size, hop=hop, tail=tail, min_tail=min_tail,
                               transform=transform, bins_per_octave=bins_per_octave,
                               key_variants=key_variants)
    window_starts(1, window, hop=hop, tail=tail, min_tail=min_tail)  # validate the recipe early
    device = _model_device(model) if device is None else pick_device(device)
    out: list[list[np.ndarray] | None] = [[] for _ in features]
    pending: list[tuple[int, np.ndarray]] = []  # (track, model input) of the next batch

    def flush() -> None:
        with torch.inference_mode():  # [B, T, F] -> [B, D]
            emb = model(torch.from_numpy(np.stack([w for _, w in pending])).to(device))
        for (owner, _), row in zip(pending, emb.to("cpu", torch.float32).numpy(), strict=True):
            out[owner].append(row)
        pending.clear()

    was_training = model.training
    model.eval().to(device)
    bar = progress_bar(total=len(features), desc="embedding", unit="track", enabled=progress,
                       leave=False)
    try:
        for i, src in enumerate(features):
            try:
                wins = _track_windows(src, settings, n_bins)
            except FeatureError as e:
                if failures is None:
                    raise
                failures.append({"index": i, "feat": _name(src), "reason": str(e)})
                out[i], wins = None, []
            for w in wins:
                pending.append((i, w))
                if len(pending) >= batch_size:
                    flush()
            bar.update(1)
        if pending:
            flush()
    finally:
        bar.close()
        model.train(was_training)
    return [None if rows is None else np.stack(rows).astype(np.float32, copy=False) for rows in out]


def _feature_key(src: str | os.PathLike, key_by: str) -> dict | None:
    """What a cached track is keyed by; None for a missing file (embedding then reports it)."""
    p = Path(src).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    extra = {"sha256": file_sha256(p)} if key_by == "content" else {"mtime_ns": st.st_mtime_ns}
    return {"path": str(p), "size": st.st_size, **extra}


def _cache_folder(model: torch.nn.Module, fingerprint: str | None, settings: dict, hp: Any,
                  cache_dir: str | os.PathLike) -> Path:
    actual = model_fingerprint(model.state_dict())
    if fingerprint is not None and fingerprint != actual:
        raise CheckpointError(
            f"fingerprint {fingerprint} was given but the model's weights hash to {actual}; "
            "pass fingerprint=None (computed) or the fingerprint of this very model")
    doc = {"version": EMBED_CACHE_VERSION, "windows": settings, "features": hp.features.key(),
           "model_fingerprint": actual}
    folder = Path(cache_dir) / actual / stable_hash(doc)
    if not (folder / "settings.json").exists():
        write_json(folder / "settings.json", doc)
    return folder


def embed_recordings(model: torch.nn.Module,
                     records: Sequence[dict | np.ndarray | str | os.PathLike], hp: Any, *,
                     cache_dir: str | os.PathLike | None = None, fingerprint: str | None = None,
                     manifest_path: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, batch_size: int | None = None,
                     hop: int | None = None, tail: str = "shift",
                     min_tail: float = DEFAULT_MIN_TAIL, key_by: str = "stat",
                     progress: bool = True, failures: list | None = None
                     ) -> list[np.ndarray | None]:
    """:func:`embed_windows` of manifest records (``feat`` beside ``manifest_path``), ``.npy``
    paths or arrays with the run's recipe (:func:`hp_window_settings`, ``hp.eval_batch_size``
    unless given, ``hp.features.n_bins``). With ``cache_dir`` **this function caches** files
    (never arrays) as ``<model fingerprint>/<hash of recipe, hp.features, version>/<track
    hash>.npy``, hashing path and size plus mtime (``key_by="stat"``) or SHA-256 ("content")."""
    if key_by not in ("stat", "content"):
        raise ConfigError(f"key_by must be 'stat' or 'content', got {key_by!r}")
    settings = hp_window_settings(hp, hop=hop, tail=tail, min_tail=min_tail)
    srcs = [feature_path(r, manifest_path) if isinstance(r, dict)
            else r if isinstance(r, np.ndarray) else Path(r) for r in records]
    run = partial(embed_windows, model, **settings, device=device, n_bins=hp.features.n_bins,
                  batch_size=batch_size or hp.eval_batch_size, progress=progress)
    if cache_dir is None:
        return run(srcs, failures=failures)
    folder = _cache_folder(model, fingerprint, settings, hp, cache_dir)
    keys = {i: _feature_key(p, key_by) for i, p in enumerate(srcs) if not isinstance(p, np.ndarray)}
    files = {i: folder / f"{stable_hash(k, 24)}.npy" for i, k in keys.items() if k is not None}
    result: list[np.ndarray | None] = [None] * len(srcs)
    for i, f in files.items():
        with suppress(ValueError, OSError, EOFError):  # absent or unreadable: (re)compute it
            result[i] = np.load(f, allow_pickle=False)
    todo = [i for i, r in enumerate(result) if r is None]
    if not todo:
        return result
    local: list | None = [] if failures is not None else None
    for j, emb in zip(todo, run([srcs[i] for i in todo], failures=local), strict=True):
        if emb is not None and j in files:
            atomic_save_npy(files[j], emb)
        result[j] = emb
    if failures is not None:
        failures += [{**f, "index": todo[f["index"]]} for f in local]
    return result
