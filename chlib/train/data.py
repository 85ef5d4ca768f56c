"""The data of a training run: its splits, checked with remedies, and the loaders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from chlib.core.config import HParams
from chlib.core.errors import FeatureError
from chlib.core.manifest import FULL_KEYS, read_manifest
from chlib.core.schema import check
from chlib.data.dataset import ChunkDataset, feature_lengths, find_missing_features, worker_init
from chlib.data.features import feature_path, load_feature
from chlib.data.sampler import MPerClassBatchSampler, grouped_batches
from chlib.train.align import aligned_groups, read_alignments

__all__ = ["TrainingData", "prepare_training_data", "seen_work_records", "train_loaders",
           "make_val_loader"]


@dataclass
class TrainingData:
    """The records of a run's splits, checked, and the size of the focal head."""

    train: list[dict]
    val: list[dict]
    train_manifest: Path
    val_manifest: Path | None
    num_classes: int
    n_works: int
    warnings: list[str] = field(default_factory=list)


def _read_split(path_str: str | None, what: str, hp: HParams) -> tuple[list[dict], Path | None]:
    if not path_str:
        return [], None
    path = hp.resolve_path(path_str)
    check(path.is_file(), hp.source, f"{what} {path_str!r} not found (paths are relative to the "
          f"current directory {os.getcwd()}); check the path or run the split step first")
    return read_manifest(path, FULL_KEYS), path


def _check_features(splits: Sequence[tuple[list[dict], Path | None]], hp: HParams) -> None:
    for recs, mpath in splits:
        missing = find_missing_features(recs, mpath)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FeatureError(
                f"{mpath}: {len(missing)} of {len(recs)} feature files are missing: {shown}. "
                f"Paths are relative to the current directory ({os.getcwd()}); re-run feature "
                "extraction or fix the 'feat' paths")
    first_path = feature_path(splits[0][0][0], splits[0][1])
    bins = load_feature(first_path).shape[1]
    if bins != hp.features.n_bins:
        raise FeatureError(
            f"{first_path}: features have {bins} bins but n_bins is {hp.features.n_bins}; use "
            "features made with these settings or change n_bins")


def _check_chunks(lengths: np.ndarray, hp: HParams, notes: list[str]) -> None:
    for chunk_frames, raw in zip(hp.chunk_frame, hp.chunk_len, strict=True):
        short = int((lengths < raw).sum())
        secs = raw / hp.frames_per_second
        check(short < len(lengths), hp.source, f"chunk_frame {chunk_frames} x mean_size "
              f"{hp.mean_size} = {raw} frames ({secs:.0f} s) is longer than every training track "
              f"(longest: {int(lengths.max())} frames, {lengths.max() / hp.frames_per_second:.0f} "
              "s); every chunk would be mostly -100 dB padding. Lower chunk_frame (or mean_size)")
        if short > len(lengths) / 2:
            notes.append(
                f"chunk {raw} frames ({secs:.0f} s) is longer than {short} of {len(lengths)} "
                "training tracks; they will be padded with -100 dB (consider a shorter chunk_frame)")


def prepare_training_data(hp: HParams) -> TrainingData:
    """Read and check the training and validation splits named in ``hp``: a ConfigError or
    FeatureError with the remedy for each problem, warnings (also in ``.warnings``) for a chunk
    longer than most tracks or fewer works than a batch takes."""
    check(bool(hp.train_path), hp.source, "train_path is not set; point it at the training "
          "split, e.g. datasets/<name>/train.txt (see chlib.train.loop.make_run_config)")
    train, train_path = _read_split(hp.train_path, "train_path", hp)
    check(bool(train), str(train_path), "the training split is empty; check the split step")
    val, val_path = _read_split(hp.val_path, "val_path", hp)
    _check_features([(train, train_path), (val, val_path)], hp)
    notes: list[str] = []
    _check_chunks(feature_lengths(train, train_path), hp, notes)
    n_works = len({int(r["work_id"]) for r in train})
    check(n_works >= 2, str(train_path), f"the training split holds {n_works} work "
          f"({train[0].get('work', train[0]['work_id'])!r}): a model learns by telling works "
          "apart and needs at least 2 works to learn anything (its loss would be 0); add "
          "recordings of other works or check the split step")
    # labels are checked once, here (the manifest reader refuses negative ids), not every step
    max_label = max(int(r["work_id"]) for r in train + val)
    num_classes = max_label + 1 if hp.num_classes_auto else hp.model.num_classes
    check(max_label < num_classes, hp.source, f"work_id {max_label} does not fit "
          f"foc.output_dims = {num_classes} classes (labels must be < foc.output_dims); set "
          "foc.output_dims: auto to size the head to the data")
    if n_works < hp.works_per_batch:
        notes.append(
            f"the training set has {n_works} works but a batch takes {hp.works_per_batch} "
            f"(batch_size {hp.batch_size} / m_per_class {hp.m_per_class}); works will repeat "
            "within a batch")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return TrainingData(train, val, train_path, val_path, num_classes, n_works, notes)


def train_loaders(data: TrainingData, hp: HParams, device: torch.device, *, rank: int = 0,
                  world_size: int = 1) -> tuple[list[DataLoader], list[MPerClassBatchSampler]]:
    """One loader (and its sampler) per chunk length; with ``world_size`` > 1, rank ``rank``'s
    share of each global batch of ``hp.batch_size`` items."""
    labels = [int(r["work_id"]) for r in data.train]
    nw = max(0, int(hp.num_workers))
    loaders, samplers = [], []
    aligned = (aligned_groups(read_alignments(hp.resolve_path(hp.align_path)), data.train)
               if hp.align_path else None)
    for i, chunk_len in enumerate(hp.chunk_len):
        ds = ChunkDataset(data.train, chunk_len=chunk_len, mean_size=hp.mean_size, mode=hp.mode,
                          spec_aug=hp.spec_augmentation, tempo_jitter=hp.tempo_jitter,
                          seed=hp.seed, manifest_path=data.train_manifest,
                          transform=hp.input_transform, bins_per_octave=hp.features.bins_per_octave,
                          timbre_eq_db=hp.timbre_eq_db,
                          accompaniment_prob=hp.accompaniment_prob, aligned=aligned)
        sampler = MPerClassBatchSampler(labels, m=hp.m_per_class, batch_size=hp.batch_size,
                                        seed=hp.seed, stream=i, group_seeds=aligned is not None,
                                        rank=rank, world_size=world_size)
        workers = {"persistent_workers": True, "worker_init_fn": worker_init} if nw else {}
        loaders.append(DataLoader(ds, batch_sampler=sampler, num_workers=nw,
                                  pin_memory=device.type == "cuda",
                                  generator=torch.Generator().manual_seed(hp.seed + i), **workers))
        samplers.append(sampler)
    return loaders, samplers


def seen_work_records(val: list[dict], train: list[dict]) -> list[dict]:
    """The val records whose work is in the training data (the only ones a focal loss can
    judge: a held-out work's class is never trained)."""
    seen = {int(r["work_id"]) for r in train}
    return [r for r in val if int(r["work_id"]) in seen]


def make_val_loader(data: TrainingData, hp: HParams, device: torch.device) -> DataLoader | None:
    val = seen_work_records(data.val, data.train)
    if not val:
        return None
    ds = ChunkDataset(val, chunk_len=hp.chunk_len[0], mean_size=hp.mean_size, mode=hp.mode,
                      spec_aug=None, seed=hp.seed, manifest_path=data.val_manifest,
                      transform=hp.input_transform, bins_per_octave=hp.features.bins_per_octave)
    # in this process: a small set, and no worker start-up per validation
    return DataLoader(ds, batch_sampler=grouped_batches(ds.labels, hp.batch_size), num_workers=0,
                      pin_memory=device.type == "cuda")
