"""Feature arrays on disk: the one loader of ``cqt_feat/<perf>.cqt.npy`` (:func:`load_feature`)
and the one model-input window (:func:`prepare_window`), so training and retrieval see the same
frames."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chlib.core.config import KEYED_TRANSFORMS, input_bins
from chlib.core.errors import ConfigError, FeatureError
from chlib.core.io import load_npy
from chlib.core.manifest import resolve_path
from chlib.signal.chroma import keyed_chroma_db
from chlib.signal.specaug import PAD_DB

__all__ = ["PAD_DB", "INPUT_TRANSFORMS", "input_bins", "load_feature", "prepare_window",
           "feature_path"]

# model-input transforms of a window of CQT frames (``input_transform`` in the run config; their
# output bins are declared in chlib.core.config.INPUT_TRANSFORM_BINS)
INPUT_TRANSFORMS = {"none": None, "keyed_chroma": keyed_chroma_db}


def feature_path(record: dict, manifest_path: str | os.PathLike | None = None) -> Path:
    """Path of a record's ``feat`` file (as given, else relative to the manifest's folder)."""
    if "feat" not in record:
        raise FeatureError(f"record {record.get('perf', record)!r} has no 'feat' key (use full.txt)")
    return resolve_path(record["feat"], manifest_path)


def prepare_window(feat: np.ndarray, start: int, window: int, mean_size: int, *,
                   transform: str = "none", bins_per_octave: int = 12,
                   key_shift: int = 0) -> np.ndarray:
    """One model input, float32 ``[window // mean_size, input bins]``: rows ``[start, start +
    window)`` of ``feat`` (only those are read from a memory map), through ``transform``
    (:data:`INPUT_TRANSFORMS`; "keyed_chroma": [*, 12] pitch classes, key-rotated per window),
    padded with -100 dB past the end, each ``mean_size`` consecutive frames averaged (leftover
    frames dropped). ``key_shift``: semitones added to the key a keyed transform estimates."""
    if feat.ndim != 2:
        raise FeatureError(f"features must be [frames, bins], got shape {feat.shape}")
    if mean_size < 1 or window < mean_size or start < 0:
        raise ConfigError(f"need window >= mean_size >= 1 and start >= 0, got window {window}, "
                          f"mean_size {mean_size}, start {start}")
    if key_shift and transform not in KEYED_TRANSFORMS:
        raise ConfigError(f"key_shift {key_shift} needs a keyed input transform "
                          f"({', '.join(KEYED_TRANSFORMS)}), got {transform!r}")
    rows = np.asarray(feat[start:start + window], dtype=np.float32)
    if input_bins(rows.shape[1], transform) != rows.shape[1]:
        extra = {"key_shift": int(key_shift)} if transform in KEYED_TRANSFORMS else {}
        rows = INPUT_TRANSFORMS[transform](rows, bins_per_octave=bins_per_octave, **extra)
    rows = np.pad(rows, ((0, window - len(rows)), (0, 0)), constant_values=PAD_DB)
    n_out = window // mean_size
    return rows[: n_out * mean_size].reshape(n_out, mean_size, -1).mean(axis=1, dtype=np.float32)


def load_feature(source: np.ndarray | str | os.PathLike) -> np.ndarray:
    """A [frames, bins] feature array: arrays pass through, paths are memory-mapped read-only
    (FeatureError when missing, not a plain ``.npy`` (no pickles), not 2-D or empty)."""
    if isinstance(source, np.ndarray):
        arr, name = source, "feature array"
    else:
        name = str(source)
        try:
            arr = load_npy(source, mmap_mode="r")
        except FileNotFoundError:
            raise FeatureError(f"{name}: feature file not found; re-run feature extraction") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise FeatureError(f"{name}: expected a [frames, bins] array, got shape {arr.shape}")
    return arr
