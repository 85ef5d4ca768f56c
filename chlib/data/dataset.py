"""Training and validation chunks cut from memory-mapped CQT features.

:class:`ChunkDataset` gives, for one item, the pair ``(feat [chunk_len // mean_size, bins]
float32 tensor, work_id int)``, the original AudioFeatDataset's item (coverhunter-facts 4.1):

1. a start frame: ``mode="random"``: uniform over every start that fits the crop inside the
   track, ``[0, n_frames - crop]`` (0 when the track is shorter), where ``n_frames`` is the
   **true** length, the number of rows of the array (never estimated from a file size, bug
   13.1.6); ``mode="defined"``: the record's ``start`` key (0 if absent);
2. the rows ``[start, start + crop)`` are read from the memory-mapped ``.npy`` (only those pages
   are touched, so a feature set larger than RAM trains), padded at the end with -100 dB and
   averaged over groups of ``mean_size`` frames by :func:`chlib.data.features.prepare_window`, the same
   function every embedding goes through;
3. optional feature-domain tempo jitter (``tempo_jitter = j``): the crop is
   ``round(chunk_len x f)`` raw frames for a factor f uniform in [1 - j, 1 + j], resampled to the
   chunk length, i.e. the music plays f times faster; bins (pitch) are untouched. A cheap
   alternative to audio-domain tempo copies (prep's ``aug_speed_mode``);
4. optional spectral augmentation (:func:`chlib.signal.specaug.spec_augment`).

Randomness: the index is either an ``int`` or an ``(int, item_seed)`` pair (what
:class:`chlib.data.sampler.MPerClassBatchSampler` yields). With a seed pair, that seed drives the
crop and the augmentation, so results do not depend on DataLoader workers. With a plain int the
generator is seeded from ``(dataset seed, index)``: the same crop every time, which is what
validation wants (stable val loss for early stopping, instead of the original's fresh random
crops each epoch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from chlib.core.config import SpecAugConfig
from chlib.core.errors import ConfigError
from chlib.core.io import atomic_save_npy
from chlib.core.manifest import write_manifest
from chlib.data.features import feature_path, load_feature, prepare_window
from chlib.data.sampler import item_rng
from chlib.signal.specaug import spec_augment, tempo_resample

__all__ = [
    "ChunkDataset",
    "find_missing_features",
    "feature_lengths",
    "worker_init",
    "write_toy_dataset",
]


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


def write_toy_dataset(
    out_dir: str | os.PathLike,
    *,
    n_works: int = 6,
    n_perfs: int = 4,
    frames: tuple[int, int] = (30, 60),
    n_bins: int = 96,
    noise_db: float = 6.0,
    seed: int = 0,
) -> Path:
    """Write a tiny, learnable synthetic feature set; returns the path of its ``full.txt``.

    Work w has a fixed spectral envelope (a few "active" bins at about -10 dB over a -80 dB
    floor); each of its ``n_perfs`` recordings is that envelope plus Gaussian noise
    (``noise_db``), ``frames`` = (min, max) rows long, clipped to <= 0 dB like real features.
    Any crop of a recording identifies its work, so a model can learn it in a few steps. Feature
    paths in full.txt are absolute. For tests, benchmarks and examples; not music.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    recs = []
    for w in range(n_works):
        env = np.full(n_bins, -80.0, dtype=np.float32)
        env[rng.choice(n_bins, size=max(1, n_bins // 12), replace=False)] = -10.0
        for p in range(n_perfs):
            n = int(rng.integers(frames[0], frames[1] + 1))
            feat = env[None, :] + rng.normal(0.0, noise_db, size=(n, n_bins)).astype(np.float32)
            feat = np.minimum(feat, 0.0).astype(np.float32)
            perf = f"toy_w{w:03d}_p{p:02d}"
            path = (out / "cqt_feat" / f"{perf}.cqt.npy").resolve()
            atomic_save_npy(path, feat)
            recs.append({"perf": perf, "work": f"work{w:03d}", "work_id": w, "feat": str(path),
                         "feat_len": n, "dur_s": n / 25.0})
    write_manifest(out / "full.txt", recs)
    return out / "full.txt"
