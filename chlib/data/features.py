"""Feature arrays on disk: the one loader of ``cqt_feat/<perf>.cqt.npy`` and the model-input window.

Every layer that reads features (training chunks, window embeddings, the index, the explorer)
goes through :func:`load_feature`, and every model input is cut by :func:`prepare_window`, so
training and retrieval see the same frames.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chlib.core.errors import ConfigError, FeatureError
from chlib.core.manifest import resolve_path
from chlib.signal.specaug import PAD_DB

__all__ = ["PAD_DB", "load_feature", "prepare_window", "feature_path"]

def feature_path(record: dict, manifest_path: str | os.PathLike | None = None) -> Path:
    """Path of a record's ``feat`` file (as given, i.e. relative to the current directory as in
    the original, else relative to the manifest's folder)."""
    if "feat" not in record:
        raise FeatureError(f"record {record.get('perf', record)!r} has no 'feat' key (use full.txt)")
    return resolve_path(record["feat"], manifest_path)


def prepare_window(feat: np.ndarray, start: int, window: int, mean_size: int) -> np.ndarray:
    """One model input: rows ``[start, start + window)`` of ``feat``, padded, frame-averaged.

    Parameters
    ----------
    feat : array [frames, bins]
        CQT in dB (a memory-mapped array is fine: only the window's rows are read).
    start : int >= 0
        First raw frame.
    window : int >= mean_size
        Raw frames in the window; rows past the end of ``feat`` are filled with -100 dB.
    mean_size : int >= 1
        Average each group of ``mean_size`` consecutive frames (leftover frames dropped).

    Returns
    -------
    float32 array [window // mean_size, bins]
    """
    if feat.ndim != 2:
        raise FeatureError(f"features must be [frames, bins], got shape {feat.shape}")
    if mean_size < 1 or window < mean_size:
        raise ConfigError(f"need window >= mean_size >= 1, got window {window}, mean_size {mean_size}")
    if start < 0:
        raise ConfigError(f"window start must be >= 0, got {start}")
    n_bins = feat.shape[1]
    rows = np.asarray(feat[start:start + window], dtype=np.float32)
    if rows.shape[0] < window:
        pad = np.full((window - rows.shape[0], n_bins), PAD_DB, dtype=np.float32)
        rows = np.concatenate([rows, pad], axis=0)
    n_out = window // mean_size
    rows = rows[: n_out * mean_size].reshape(n_out, mean_size, n_bins)
    return rows.mean(axis=1, dtype=np.float32)


def load_feature(source: np.ndarray | str | os.PathLike) -> np.ndarray:
    """A [frames, bins] feature array: arrays pass through, paths are memory-mapped read-only.

    Raises FeatureError naming the file when it is missing, not a plain ``.npy`` (pickles are
    refused), not 2-D or empty.
    """
    if isinstance(source, np.ndarray):
        arr, name = source, "feature array"
    else:
        name = str(source)
        try:
            arr = np.load(source, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise FeatureError(f"{name}: feature file not found; re-run feature extraction") from None
        except (ValueError, OSError, EOFError) as e:
            raise FeatureError(f"{name}: not a readable .npy feature file ({e}); re-extract it") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise FeatureError(f"{name}: expected a [frames, bins] array, got shape {arr.shape}")
    return arr
