"""Training and validation chunks cut from memory-mapped CQT features.

:class:`ChunkDataset` item = ``(feat [chunk_len // mean_size, bins] float32 tensor, work_id)``,
the original's (coverhunter-facts 4.1; start drawn from the true row count, bug 13.1.6). An
index ``(int, item_seed)`` (from the sampler) seeds crop and augmentation; a plain int seeds
from ``(dataset seed, index)``: the same crop every time (a stable validation loss)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from chlib.core.config import SpecAugConfig
from chlib.core.errors import ConfigError
from chlib.data.features import feature_path, load_feature, prepare_window
from chlib.data.sampler import item_rng
from chlib.signal.chroma import chroma_from_cqt, key_rotation
from chlib.signal.specaug import random_accompaniment, random_eq, spec_augment, tempo_resample

__all__ = ["ChunkDataset", "find_missing_features", "feature_lengths", "worker_init"]


def find_missing_features(records: Sequence[dict],
                          manifest_path: str | os.PathLike | None = None) -> list[str]:
    """Feature paths of ``records`` that do not exist (as written in the records)."""
    return [str(r.get("feat")) for r in records
            if "feat" not in r or not feature_path(r, manifest_path).is_file()]


def feature_lengths(records: Sequence[dict], manifest_path: str | os.PathLike | None = None) -> np.ndarray:
    """Frames per record (planning only): ``feat_len``, else the ``.npy`` header's row count."""
    return np.array([int(r["feat_len"]) if r.get("feat_len") is not None
                     else load_feature(feature_path(r, manifest_path)).shape[0] for r in records],
                    dtype=np.int64)


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy's global RNG from the worker's torch seed (for
    third-party code; chlib's items carry their own seeds)."""
    np.random.seed(torch.initial_seed() % 2**32)


class ChunkDataset(Dataset):
    """Fixed-length chunks of the tracks in full.txt-style ``records`` (``feat``, ``work_id``).

    ``chunk_len``: raw CQT frames per crop; ``mode``: "random" start or "defined" (the record's
    ``start``); ``spec_aug`` None for validation; ``tempo_jitter`` j: crops of
    ``round(chunk_len x f)``, f uniform in [1 - j, 1 + j], resampled to the chunk length."""

    def __init__(self, records: Sequence[dict], *, chunk_len: int, mean_size: int = 1,
                 mode: str = "random", spec_aug: SpecAugConfig | None = None,
                 tempo_jitter: float = 0.0, seed: int = 0,
                 manifest_path: str | os.PathLike | None = None, transform: str = "none",
                 bins_per_octave: int = 12, timbre_eq_db: float = 0.0,
                 accompaniment_prob: float = 0.0,
                 aligned: Mapping[int, Sequence[Mapping[int, int]]] | None = None) -> None:
        if mode not in ("random", "defined"):
            raise ConfigError(f"mode must be 'random' or 'defined', got {mode!r}")
        if mean_size < 1 or chunk_len < mean_size:
            raise ConfigError(f"chunk_len ({chunk_len}) must be >= mean_size ({mean_size}) >= 1")
        if not 0.0 <= tempo_jitter < 1.0:
            raise ConfigError(f"tempo_jitter must be in [0, 1), got {tempo_jitter}")
        self.records = list(records)
        if bad := [r.get("perf") for r in self.records if "work_id" not in r]:
            raise ConfigError(f"record {bad[0]!r} has no work_id; use full.txt-style records")
        self.labels = [int(r["work_id"]) for r in self.records]
        self.paths = [feature_path(r, manifest_path) for r in self.records]
        self.chunk_len = int(chunk_len)
        self.mean_size = int(mean_size)
        self.mode = mode
        self.spec_aug = spec_aug if spec_aug is not None and spec_aug.enabled else None
        self.tempo_jitter = float(tempo_jitter)
        self.seed = int(seed)
        self.transform, self.bins_per_octave = transform, int(bins_per_octave)
        self.timbre_eq_db = float(timbre_eq_db)  # > 0: a random EQ per crop, before the transform
        if not 0.0 <= accompaniment_prob <= 1.0:
            raise ConfigError(f"accompaniment_prob must be in [0, 1], got {accompaniment_prob}")
        self.accompaniment_prob = float(accompaniment_prob)  # share of crops given bass + chords
        # work id -> groups {item index: start frame} of one passage (chlib.train.align)
        self.aligned = {int(k): list(v) for k, v in (aligned or {}).items() if v}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_out(self) -> int:
        """Model frames per item: ``chunk_len // mean_size``."""
        return self.chunk_len // self.mean_size

    def _aligned_start(self, idx: int, group_seed: int | None) -> int | None:
        """The start of item ``idx`` in the passage that ``group_seed`` picks for its work."""
        groups = self.aligned.get(self.labels[idx]) if group_seed is not None else None
        return groups[group_seed % len(groups)].get(idx) if groups else None

    def crop(self, idx: int, rng: np.random.Generator, group_seed: int | None = None
             ) -> np.ndarray:
        """The (unaugmented) chunk of item ``idx``: [chunk_len // mean_size, bins] float32;
        with ``aligned`` groups and a ``group_seed``, cut at that passage's start."""
        feat = load_feature(self.paths[idx])
        j = self.tempo_jitter
        factor = float(rng.uniform(1.0 - j, 1.0 + j)) if j > 0 else 1.0
        span = max(self.mean_size, int(round(self.chunk_len * factor)))
        if self.mode == "defined":
            start = int(self.records[idx].get("start", 0))
        else:
            start = int(rng.integers(0, len(feat) - span + 1)) if len(feat) > span else 0
        if (at := self._aligned_start(idx, group_seed)) is not None:
            start = min(at, max(0, len(feat) - span))
        if self.accompaniment_prob > 0 and rng.random() < self.accompaniment_prob:
            feat = np.asarray(feat[start:start + span], dtype=np.float32)
            tonic = key_rotation(chroma_from_cqt(feat, bins_per_octave=self.bins_per_octave))
            feat = random_accompaniment(feat, tonic, rng=rng, bins_per_octave=self.bins_per_octave)
            start = 0
        if self.timbre_eq_db > 0:
            feat = random_eq(feat[start:start + span], self.timbre_eq_db * rng.random(), rng=rng)
            start = 0
        chunk = prepare_window(feat, start, span, self.mean_size, transform=self.transform,
                               bins_per_octave=self.bins_per_octave)  # [span // mean_size, bins]
        if span != self.chunk_len:
            chunk = tempo_resample(chunk, self.n_out)
        return np.ascontiguousarray(chunk, dtype=np.float32)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        group = None
        if isinstance(key, (tuple, list)):  # (index, item seed[, group seed]) from the sampler
            idx, rng = int(key[0]), np.random.default_rng(int(key[1]))
            group = int(key[2]) if len(key) > 2 else None
        else:
            idx, rng = int(key), item_rng(self.seed, int(key))
        chunk = self.crop(idx, rng, group)
        if self.spec_aug is not None:
            chunk = spec_augment(chunk, self.spec_aug, rng=rng)
        return torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)), self.labels[idx]
