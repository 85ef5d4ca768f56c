"""Training and validation chunks cut from memory-mapped CQT features.

:class:`ChunkDataset` item = ``(feat [chunk_len // mean_size, bins] float32 tensor, work_id)``,
the original AudioFeatDataset's item (coverhunter-facts 4.1): a start frame (``"random"``:
uniform over ``[0, n_frames - crop]`` with the array's true row count, never a file-size guess,
bug 13.1.6; ``"defined"``: the record's ``start``), the rows read from the memory map, padded
with -100 dB and frame-averaged by :func:`chlib.data.features.prepare_window` (what every
embedding uses); optional tempo jitter j (crop ``round(chunk_len x f)``, f uniform in
[1 - j, 1 + j], resampled to the chunk length) and spectral augmentation.

An index ``(int, item_seed)`` (from :class:`chlib.data.sampler.MPerClassBatchSampler`) seeds the
crop and augmentation; a plain int seeds from ``(dataset seed, index)``: the same crop every
time, which gives validation a stable loss.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from chlib.core.config import SpecAugConfig
from chlib.core.errors import ConfigError
from chlib.data.features import feature_path, load_feature, prepare_window
from chlib.data.sampler import item_rng
from chlib.signal.specaug import spec_augment, tempo_resample

__all__ = ["ChunkDataset", "find_missing_features", "feature_lengths", "worker_init"]


def find_missing_features(
    records: Sequence[dict], manifest_path: str | os.PathLike | None = None
) -> list[str]:
    """Feature paths of ``records`` that do not exist (as written in the records)."""
    return [str(r.get("feat")) for r in records
            if "feat" not in r or not feature_path(r, manifest_path).is_file()]


def feature_lengths(records: Sequence[dict], manifest_path: str | os.PathLike | None = None) -> np.ndarray:
    """Frames per record: ``feat_len`` when present, else read from the ``.npy`` header.

    Used for checks and planning only; crops always use the array's own row count.
    """
    out = np.empty(len(records), dtype=np.int64)
    for i, r in enumerate(records):
        if r.get("feat_len") is not None:
            out[i] = int(r["feat_len"])
        else:
            out[i] = load_feature(feature_path(r, manifest_path)).shape[0]
    return out


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy's legacy global RNG from the worker's torch seed.

    chlib's own randomness never uses global state (items carry their seeds); this only makes
    third-party code that does deterministic per worker. torch seeds each worker from the
    loader's ``generator`` and the worker id.
    """
    np.random.seed(torch.initial_seed() % 2**32)


class ChunkDataset(Dataset):
    """Fixed-length chunks of the tracks in ``records`` (full.txt / split-file records).

    Args:
        records: dicts with ``feat`` (path of a [frames, bins] float ``.npy``) and ``work_id``.
        chunk_len: crop length in raw CQT frames (``chunk_frame[i] x mean_size``).
        mean_size: frames averaged into one model frame; the item has
            ``chunk_len // mean_size`` rows.
        mode: "random" (start drawn per item) or "defined" (record's ``start``).
        spec_aug: augmentation settings, or None for none (validation).
        tempo_jitter: j >= 0; crops are time-resampled by a factor uniform in [1 - j, 1 + j]
            (0 = off).
        seed: seed for plain-int indices (fixed crops).
        manifest_path: the manifest the records came from (to resolve relative ``feat`` paths).

    ``__getitem__(i | (i, item_seed)) -> (Tensor [chunk_len // mean_size, bins] float32, int)``.
    """

    def __init__(
        self,
        records: Sequence[dict],
        *,
        chunk_len: int,
        mean_size: int = 1,
        mode: str = "random",
        spec_aug: SpecAugConfig | None = None,
        tempo_jitter: float = 0.0,
        seed: int = 0,
        manifest_path: str | os.PathLike | None = None,
    ):
        if mode not in ("random", "defined"):
            raise ConfigError(f"mode must be 'random' or 'defined', got {mode!r}")
        if mean_size < 1 or chunk_len < mean_size:
            raise ConfigError(f"chunk_len ({chunk_len}) must be >= mean_size ({mean_size}) >= 1")
        if not 0.0 <= tempo_jitter < 1.0:
            raise ConfigError(f"tempo_jitter must be in [0, 1), got {tempo_jitter}")
        self.records = list(records)
        for r in self.records:
            if "work_id" not in r:
                raise ConfigError(f"record {r.get('perf')!r} has no work_id; use full.txt-style records")
        self.labels = [int(r["work_id"]) for r in self.records]
        self.paths = [feature_path(r, manifest_path) for r in self.records]
        self.chunk_len = int(chunk_len)
        self.mean_size = int(mean_size)
        self.mode = mode
        self.spec_aug = spec_aug if spec_aug is not None and spec_aug.enabled else None
        self.tempo_jitter = float(tempo_jitter)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_out(self) -> int:
        """Model frames per item: ``chunk_len // mean_size``."""
        return self.chunk_len // self.mean_size

    def _rng(self, key: int | tuple[int, int]) -> tuple[int, np.random.Generator]:
        if isinstance(key, (tuple, list)):
            idx, item_seed = int(key[0]), int(key[1])
            return idx, np.random.default_rng(item_seed)
        idx = int(key)
        return idx, item_rng(self.seed, idx)

    def crop(self, idx: int, rng: np.random.Generator) -> np.ndarray:
        """The (unaugmented) chunk of item ``idx``: [chunk_len // mean_size, bins] float32."""
        feat = load_feature(self.paths[idx])
        n_frames = feat.shape[0]
        factor = 1.0
        if self.tempo_jitter > 0:
            factor = float(rng.uniform(1.0 - self.tempo_jitter, 1.0 + self.tempo_jitter))
        span = max(self.mean_size, int(round(self.chunk_len * factor)))
        if self.mode == "defined":
            start = int(self.records[idx].get("start", 0))
        else:
            start = int(rng.integers(0, n_frames - span + 1)) if n_frames > span else 0
        # copy only the needed rows out of the memory map, then pad and average
        rows = np.asarray(feat[start : start + span], dtype=np.float32)
        chunk = prepare_window(rows, 0, span, self.mean_size)  # [span // mean_size, bins]
        if span != self.chunk_len:
            chunk = tempo_resample(chunk, self.n_out)
        return np.ascontiguousarray(chunk, dtype=np.float32)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        idx, rng = self._rng(key)
        chunk = self.crop(idx, rng)
        if self.spec_aug is not None:
            chunk = spec_augment(chunk, self.spec_aug, rng=rng)
        return torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)), self.labels[idx]
