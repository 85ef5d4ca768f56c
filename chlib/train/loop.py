"""Training a CoverHunter model: one loop, readable top to bottom.

``train(run_dir)`` reads ``runs/<name>/config/hparams.yaml`` (paths in it are relative to the
current directory, as in the original), builds the data, the model and the optimizer, resumes
from the newest checkpoint if there is one, and runs epochs until ``max_epochs`` or early
stopping. What one epoch is:

* one :class:`~chlib.data.sampler.MPerClassBatchSampler` per training chunk length
  (``chunk_frame[i] x mean_size`` raw frames); each visits every training work once per epoch in
  groups of ``batch_size // m_per_class`` works x ``m_per_class`` chunks, so every sampler has
  ``ceil(n_works / works_per_batch)`` batches;
* the samplers are interleaved as in the original: round r takes the r-th batch of every chunk
  length and processes them in a shuffled order (seeded), so an epoch is
  ``len(chunk_frame) x ceil(n_works / works_per_batch)`` optimizer steps.

After each epoch (0-based index e; checkpoints are named by it, ``g_0000000e``, as the
original's):

1. validation loss on ``val_path`` every ``every_n_epoch_to_test`` epochs: every val recording
   once, with a fixed crop (seeded by the run seed and the item), no augmentation, batches grouped
   by work; the focal, triplet and center parts are reported separately (``csi_val/...``).
   **val_loss = the mean focal loss**, the original's choice, used for early stopping with
   ``early_stop_metric: val_loss``, computed over the val recordings of works that are in the
   training data only. The original also scored val recordings of works held out of training
   (``val_unseen``): their focal class is never trained, so that loss can only grow as the head
   learns the training works, and val_loss rose while retrieval improved (seen on the demo
   data). Held-out works are judged by retrieval instead: the ``val_unseen`` test set that
   :func:`make_run_config` sets up (early-stop on its mAP with ``early_stop_metric: mAP``);
2. every test set of ``hp.testsets`` whose ``every_n_epoch_to_test`` divides ``e + 1``: window
   embeddings (:func:`chlib.retrieval.embed.embed_tracks`), min-over-windows cosine distances, and mAP / MR1 /
   HR1 / HR10 with work_id labels. A reference is never ranked for a query when it is the same
   recording or a tempo copy of it (perf / ``source_perf``), and pairs of ``query_in_ref_path``
   are excluded too;
3. early stopping (:class:`EarlyStopping`) on val_loss or on the EMA-smoothed mean mAP of
   ``map_stopping_testsets``; the best epoch goes to ``checkpoints/best.json``;
4. a checkpoint every ``every_n_epoch_to_save`` epochs, for a new best epoch and for the last
   one: ``g_`` (weights) and ``do_`` (optimizer, step, epoch, early-stopping state, RNG states,
   sampler position): a resumed run continues exactly where it was; the learning rate is a pure
   function of the step and epoch (:func:`lr_at`), so it continues too (the original reset it).

Resuming from an epoch's checkpoint (after a crash, kill -9 or a later call with a larger
``max_epochs``) is exact: on the CPU with ``deterministic: true`` the weights come out
bit-identical to an uninterrupted run. Ctrl-C saves a checkpoint of the epoch in progress
(marked incomplete, with the number of finished rounds) and returns; a later ``train`` call
finishes that epoch, repeating the round that was cut short (so that resume is close but not
bit-exact). A non-finite loss or gradient skips the update; three in a row save a checkpoint
and raise :class:`TrainingDivergedError`.

Logs: TensorBoard scalars with the original's tags under ``<run>/logs/<runid>/`` and one JSON
record per event in ``<run>/metrics.jsonl`` (read it with :func:`read_metrics` /
:func:`epoch_table`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from chlib.core.config import HParams, deep_merge, load_hparams, save_hparams
from chlib.core.device import pick_device
from chlib.core.errors import ChlibError, ConfigError, FeatureError
from chlib.core.io import append_jsonl, read_json, read_jsonl, write_json
from chlib.core.manifest import FULL_KEYS, read_manifest, source_perf, write_manifest
from chlib.data.dataset import ChunkDataset, feature_lengths, find_missing_features, worker_init
from chlib.data.features import feature_path, load_feature
from chlib.data.sampler import MPerClassBatchSampler, grouped_batches, item_rng
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import (
    BEST_FILE,
    checkpoint_name,
    list_checkpoints,
    load_generator_state,
    load_state_into,
    load_train_state,
    save_checkpoint,
)
from chlib.retrieval.embed import embed_tracks_hp, track_distances
from chlib.retrieval.metrics import (
    query_in_ref_mask,
    read_query_in_ref,
    retrieval_metrics,
    self_exclusion_mask,
)

__all__ = [
    "TrainResult",
    "TrainingDivergedError",
    "TrainingData",
    "EarlyStopping",
    "lr_at",
    "train",
    "prepare_training_data",
    "evaluate_testsets",
    "validation_loss",
    "seen_work_records",
    "read_metrics",
    "epoch_table",
    "RECIPES_DIR",
    "recipe_path",
    "load_recipe",
    "make_run_config",
]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
LOSS_NAMES = ("foc_loss", "tri_loss", "cen_loss")
NAN_PATIENCE = 3  # consecutive non-finite losses before giving up
_ORDER_STREAM = 1_000_003  # seed-sequence key of the per-round loader order (any constant)


class TrainingDivergedError(ChlibError):
    """The loss was not finite for several consecutive steps."""


# --------------------------------------------------------------------------------------------
# learning-rate schedule


def lr_at(step: int, epoch: int, hp: HParams) -> float:
    """Learning rate of optimizer update number ``step`` (1-based), made in epoch ``epoch`` (0-based).

    1. warm-up (when ``hp.warmup`` and ``warmup_steps > 0``): ``learning_rate x step / warmup_steps``
       for steps 1..warmup_steps;
    2. then ``learning_rate`` for ``hold_steps`` more steps;
    3. then ``max(min_lr, learning_rate x lr_decay ** n)`` with
       ``n = (step - warmup - hold) // lr_decay_every`` when ``lr_decay_unit == "steps"``, or
       ``n = epoch // lr_decay_every`` when it is ``"epochs"`` (warm-up and hold still count in
       steps; the epoch count is not shifted by them).

    The original (no warm-up or hold, decay 0.9 every 1000 steps) is ``lr_decay_unit: steps``,
    ``lr_decay_every: 1000``: steps 1..999 at 0.001, 1000..1999 at 0.0009, ...
    """
    if step < 1:
        raise ValueError(f"step is 1-based, got {step}")
    base = hp.learning_rate
    warm = hp.warmup_steps if hp.warmup else 0
    if warm > 0 and step <= warm:
        return base * step / warm
    if step <= warm + hp.hold_steps:
        return base
    if hp.lr_decay_unit == "steps":
        n = (step - warm - hp.hold_steps) // hp.lr_decay_every
    else:
        n = max(0, epoch) // hp.lr_decay_every
    return max(hp.min_lr, base * hp.lr_decay**n)


# --------------------------------------------------------------------------------------------
# early stopping


@dataclass
class EarlyStopping:
    """Early-stopping bookkeeping (the fork's rules, coverhunter-facts 7.5).

    ``metric="val_loss"``: an epoch is better when its val_loss is strictly lower than the best so
    far; it becomes the best epoch and resets the counter, else the counter grows by one.
    ``metric="mAP"``: raw = mean mAP over the stopping test sets; smoothed = EMA with ``alpha``
    (first value = raw). The best *raw* mAP names the best epoch; the counter resets when the
    *smoothed* value beats the best smoothed value, else it grows. ``metric="train_loss"`` (used
    when there is no validation set) works like val_loss. The counter does not grow during the
    learning-rate warm-up/hold (``in_hold``). Stop when ``counter >= patience``.
    """

    metric: str = "val_loss"
    patience: int = 20
    alpha: float = 0.3
    best_validation_loss: float = math.inf
    best_raw_map: float = -math.inf
    best_smoothed_map: float = -math.inf
    smoothed_map: float | None = None
    early_stopping_counter: int = 0
    map_stopping_counter: int = 0
    best_checkpoint_epoch: int | None = None
    best_checkpoint_value: float | None = None

    @property
    def counter(self) -> int:
        return self.map_stopping_counter if self.metric == "mAP" else self.early_stopping_counter

    @property
    def should_stop(self) -> bool:
        return self.counter >= self.patience

    def update(self, epoch: int, value: float, *, in_hold: bool = False) -> bool:
        """Record ``value`` (a loss, or the mean mAP) of ``epoch``; True if it is the new best."""
        if not math.isfinite(value):
            if not in_hold:
                self._bump()
            return False
        if self.metric == "mAP":
            self.smoothed_map = value if self.smoothed_map is None else (
                self.alpha * value + (1.0 - self.alpha) * self.smoothed_map)
            is_best = value > self.best_raw_map
            if is_best:
                self.best_raw_map = value
                self._set_best(epoch, value)
            if self.smoothed_map > self.best_smoothed_map:
                self.best_smoothed_map = self.smoothed_map
                self.map_stopping_counter = 0
            elif not in_hold:
                self.map_stopping_counter += 1
            return is_best
        if value < self.best_validation_loss:
            self.best_validation_loss = value
            self._set_best(epoch, value)
            self.early_stopping_counter = 0
            return True
        if not in_hold:
            self._bump()
        return False

    def _set_best(self, epoch: int, value: float) -> None:
        self.best_checkpoint_epoch = int(epoch)
        self.best_checkpoint_value = float(value)

    def _bump(self) -> None:
        if self.metric == "mAP":
            self.map_stopping_counter += 1
        else:
            self.early_stopping_counter += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "metric", "best_validation_loss", "best_raw_map", "best_smoothed_map", "smoothed_map",
            "early_stopping_counter", "map_stopping_counter", "best_checkpoint_epoch",
            "best_checkpoint_value")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k != "metric" and hasattr(self, k):
                setattr(self, k, v)


# --------------------------------------------------------------------------------------------
# data


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
    if not path.is_file():
        raise ConfigError(
            f"{hp.source}: {what} {path_str!r} not found (paths are relative to the current "
            f"directory {os.getcwd()}); check the path or run the split step first"
        )
    return read_manifest(path, FULL_KEYS), path


def prepare_training_data(hp: HParams) -> TrainingData:
    """Read and check the training and validation splits named in ``hp``.

    Raises a :class:`ConfigError` or :class:`FeatureError` with the remedy for: no or missing
    ``train_path``, an empty training set, missing feature files, features whose bins differ from
    ``input_dim``, a chunk longer than every training track, work ids that do not fit the focal
    head. Warns (and lists in ``.warnings``) when a chunk is longer than most tracks or when there
    are fewer works than a batch needs.
    """
    if not hp.train_path:
        raise ConfigError(
            f"{hp.source}: train_path is not set; point it at the training split, e.g. "
            "datasets/<name>/train.txt (see chlib.train.loop.make_run_config)"
        )
    train, train_path = _read_split(hp.train_path, "train_path", hp)
    if not train:
        raise ConfigError(f"{train_path}: the training split is empty; check the split step")
    val, val_path = _read_split(hp.val_path, "val_path", hp)
    notes: list[str] = []

    for recs, mpath in ((train, train_path), (val, val_path)):
        missing = find_missing_features(recs, mpath)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FeatureError(
                f"{mpath}: {len(missing)} of {len(recs)} feature files are missing: {shown}. "
                f"Paths are relative to the current directory ({os.getcwd()}); re-run feature "
                "extraction or fix the 'feat' paths"
            )
    first = load_feature(feature_path(train[0], train_path))
    if first.shape[1] != hp.model.input_dim:
        raise FeatureError(
            f"{feature_path(train[0], train_path)}: features have {first.shape[1]} bins but "
            f"input_dim / n_bins is {hp.model.input_dim}; use features made with these settings "
            "or change n_bins"
        )

    lengths = feature_lengths(train, train_path)
    for chunk_frames, raw in zip(hp.chunk_frame, hp.chunk_len, strict=True):
        short = int((lengths < raw).sum())
        secs = raw / hp.frames_per_second
        if short == len(lengths):
            raise ConfigError(
                f"{hp.source}: chunk_frame {chunk_frames} x mean_size {hp.mean_size} = {raw} frames "
                f"({secs:.0f} s) is longer than every training track (longest: {int(lengths.max())} "
                f"frames, {lengths.max() / hp.frames_per_second:.0f} s); every chunk would be mostly "
                "-100 dB padding. Lower chunk_frame (or mean_size)"
            )
        if short > len(lengths) / 2:
            notes.append(
                f"chunk {raw} frames ({secs:.0f} s) is longer than {short} of {len(lengths)} "
                "training tracks; they will be padded with -100 dB (consider a shorter chunk_frame)"
            )

    labels = [int(r["work_id"]) for r in train + val]
    n_works = len({int(r["work_id"]) for r in train})
    max_label = max(labels)
    if hp.num_classes_auto:
        num_classes = max_label + 1
    else:
        num_classes = hp.model.num_classes
        if max_label >= num_classes:
            raise ConfigError(
                f"{hp.source}: work_id {max_label} does not fit foc.output_dims = {num_classes} "
                "classes (labels must be < foc.output_dims); set foc.output_dims: auto to size "
                "the head to the data"
            )
    if n_works < hp.works_per_batch:
        notes.append(
            f"the training set has {n_works} works but a batch takes {hp.works_per_batch} "
            f"(batch_size {hp.batch_size} / m_per_class {hp.m_per_class}); works will repeat "
            "within a batch"
        )
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return TrainingData(train, val, train_path, val_path, num_classes, n_works, notes)


def _loader_kwargs(hp: HParams, device: torch.device, stream: int) -> dict:
    nw = max(0, int(hp.num_workers))
    kw: dict[str, Any] = {
        "num_workers": nw,
        "pin_memory": device.type == "cuda",
        "generator": torch.Generator().manual_seed(hp.seed + stream),  # not the global RNG
    }
    if nw > 0:
        kw.update(persistent_workers=True, worker_init_fn=worker_init)
    return kw


def _train_loaders(
    data: TrainingData, hp: HParams, device: torch.device
) -> tuple[list[DataLoader], list[MPerClassBatchSampler]]:
    labels = [int(r["work_id"]) for r in data.train]
    loaders, samplers = [], []
    for i, chunk_len in enumerate(hp.chunk_len):
        ds = ChunkDataset(data.train, chunk_len=chunk_len, mean_size=hp.mean_size, mode=hp.mode,
                          spec_aug=hp.spec_augmentation, tempo_jitter=hp.tempo_jitter,
                          seed=hp.seed, manifest_path=data.train_manifest)
        sampler = MPerClassBatchSampler(labels, m=hp.m_per_class, batch_size=hp.batch_size,
                                        seed=hp.seed, stream=i)
        loaders.append(DataLoader(ds, batch_sampler=sampler, **_loader_kwargs(hp, device, i)))
        samplers.append(sampler)
    return loaders, samplers


def seen_work_records(val: list[dict], train: list[dict]) -> list[dict]:
    """The val records whose work is in the training data (the only ones a focal loss can
    judge: a held-out work's class is never trained)."""
    seen = {int(r["work_id"]) for r in train}
    return [r for r in val if int(r["work_id"]) in seen]


def _val_loader(data: TrainingData, hp: HParams, device: torch.device) -> DataLoader | None:
    val = seen_work_records(data.val, data.train)
    if not val:
        return None
    ds = ChunkDataset(val, chunk_len=hp.chunk_len[0], mean_size=hp.mean_size, mode=hp.mode,
                      spec_aug=None, seed=hp.seed, manifest_path=data.val_manifest)
    batches = grouped_batches(ds.labels, hp.batch_size)
    # in this process: a small set, and no worker start-up per validation
    return DataLoader(ds, batch_sampler=batches, num_workers=0, pin_memory=device.type == "cuda")


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Mean loss parts over every validation item: ``{"foc_loss", ["tri_loss", "cen_loss"], "total"}``.

    Each batch's losses are weighted by its size. The model is in eval mode (no dropout, BN
    running statistics).
    """
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            total, parts = model.compute_loss(x, y)
        b = len(y)
        for k, v in {**parts, "total": total}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
    return {k: v / max(n, 1) for k, v in sums.items()}


def _eval_records(path_str: str, hp: HParams) -> tuple[list[dict], Path]:
    path = hp.resolve_path(path_str)
    if not path.is_file():
        raise ConfigError(f"{hp.source}: test-set list {path_str!r} not found (relative to {os.getcwd()})")
    return read_manifest(path, FULL_KEYS), path


def evaluate_testsets(
    model: torch.nn.Module,
    hp: HParams,
    device: torch.device,
    *,
    epoch: int | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """mAP, MR1, HR1, HR10 (and P@10, counts) for the test sets of ``hp``.

    ``names``: which sets (default: those whose ``every_n_epoch_to_test`` divides ``epoch + 1``,
    or all when ``epoch`` is None). Labels are work ids; a query never ranks its own recording or
    a tempo copy of it; ``query_in_ref_path`` pairs are excluded as well. Embeddings are the same
    window embeddings as everywhere else (:func:`chlib.retrieval.embed.embed_tracks`, window
    ``chunk_frame[0] x mean_size`` raw frames, batch ``eval_batch_size``, chlib's default tail
    handling: the end of a track is embedded too).
    """
    results: dict[str, dict[str, float]] = {}
    for name, ts in hp.testsets.items():
        if names is not None and name not in names:
            continue
        if names is None and epoch is not None and (epoch + 1) % ts.every_n_epoch_to_test:
            continue
        q_recs, q_path = _eval_records(ts.query_path, hp)
        same = hp.resolve_path(ts.ref_path) == q_path
        r_recs, r_path = (q_recs, q_path) if same else _eval_records(ts.ref_path, hp)

        def embed(recs: list[dict], mpath: Path) -> list[np.ndarray]:
            return embed_tracks_hp(model, [feature_path(r, mpath) for r in recs], hp,
                                   device=device, progress=False)

        q_emb = embed(q_recs, q_path)
        r_emb = q_emb if same else embed(r_recs, r_path)
        dist = track_distances(q_emb, r_emb)
        exclude = self_exclusion_mask([r["perf"] for r in q_recs], [r["perf"] for r in r_recs],
                                      query_sources=[source_perf(r) for r in q_recs],
                                      ref_sources=[source_perf(r) for r in r_recs])
        if ts.query_in_ref_path:
            pairs = read_query_in_ref(hp.resolve_path(ts.query_in_ref_path))
            exclude |= query_in_ref_mask(pairs, len(q_recs), len(r_recs))
        results[name] = retrieval_metrics(dist, [int(r["work_id"]) for r in q_recs],
                                          [int(r["work_id"]) for r in r_recs], exclude=exclude)
    return results


# --------------------------------------------------------------------------------------------
# resume state


def _rng_state(device: torch.device) -> dict:
    """Every global RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], [int(v) for v in np_state[1]], *[
            float(v) if isinstance(v, float) else int(v) for v in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Progress:
    """Where the run is: what a resume must restore besides weights and optimizer."""

    epoch: int = 0  # epoch in progress (0-based)
    batch_in_epoch: int = 0  # rounds of this epoch already done
    step: int = 0  # optimizer updates made so far
    bad_steps: int = 0  # consecutive non-finite losses


def _train_state(epoch: int, prog: _Progress, optimizer: torch.optim.Optimizer,
                 stopper: EarlyStopping, samplers: list[MPerClassBatchSampler], hp: HParams,
                 num_classes: int, device: torch.device, *, complete: bool) -> dict:
    """The ``do_`` content: the original's keys plus chlib's resume state under ``"chlib"``."""
    return {
        "optim_g": optimizer.state_dict(),
        "steps": prog.step,
        "epoch": epoch,
        "early_stopping": stopper.state_dict(),
        "chlib": {
            "version": 1,
            "epoch_complete": complete,
            "batch_in_epoch": 0 if complete else prog.batch_in_epoch,
            "lr": lr_at(max(prog.step, 1), epoch, hp),
            "num_classes": num_classes,
            "rng": _rng_state(device),
            "samplers": [s.state_dict() for s in samplers],
            "hparams": yaml.safe_dump(hp.to_dict(), sort_keys=False),
        },
    }


# --------------------------------------------------------------------------------------------
# logging


class _Log:
    """TensorBoard (original tag names) + ``metrics.jsonl``; TensorBoard is optional."""

    def __init__(self, run_dir: Path, run_id: str):
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "logs" / run_id))
        except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
            warnings.warn("tensorboard is not installed; logging to metrics.jsonl only", stacklevel=3)

    def scalars(self, prefix: str, values: dict[str, float], x: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, x)

    def record(self, kind: str, **fields: Any) -> dict:
        rec = {"kind": kind, **fields, "time": time.time()}
        append_jsonl(self.jsonl, rec)
        return rec

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of ``<run>/metrics.jsonl`` (all, or those of one ``kind``: train/val/test/epoch)."""
    recs = read_jsonl(Path(run_dir) / "metrics.jsonl")
    return [r for r in recs if kind is None or r.get("kind") == kind]


def epoch_table(run_dir: str | os.PathLike) -> Any:
    """One row per epoch (a pandas DataFrame): train/val losses, lr, step, mAP per test set...

    When an epoch was run twice (a resume after a kill), its last record wins.
    """
    import pandas as pd

    by_epoch: dict[int, dict] = {}
    for r in read_metrics(run_dir, "epoch"):
        by_epoch[int(r["epoch"])] = {k: v for k, v in r.items() if k != "kind"}
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    return pd.DataFrame(rows).set_index("epoch") if rows else pd.DataFrame()


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What a :func:`train` call did."""

    run_dir: Path
    epochs_done: int  # completed epochs of the run (over all calls)
    steps: int
    best_epoch: int | None
    best_value: float | None
    best_metric: str
    stopped_early: bool
    interrupted: bool
    last_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # epoch records of this call


def _optimizer(model: torch.nn.Module, hp: HParams) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError(
                f"{hp.source}: optimizer: prodigy needs the 'prodigyopt' package "
                "(pip install prodigyopt), or set optimizer: adamw"
            ) from None
        return Prodigy(params, lr=1.0, betas=(hp.adam_b1, hp.adam_b2), weight_decay=hp.weight_decay,
                       decouple=True, d_coef=hp.prodigy_d_coef,
                       safeguard_warmup=hp.prodigy_safeguard_warmup)
    return torch.optim.AdamW(params, lr=hp.learning_rate, betas=(hp.adam_b1, hp.adam_b2),
                             weight_decay=hp.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, hp: HParams) -> float:
    """Apply the schedule; for Prodigy it scales the base lr of 1.0. Returns what to log."""
    scale = lr / hp.learning_rate if hp.optimizer == "prodigy" else lr
    for g in optimizer.param_groups:
        g["lr"] = scale
    if hp.optimizer == "prodigy":
        return float(optimizer.param_groups[0].get("d", scale))
    return lr


@contextlib.contextmanager
def _deterministic(on: bool, device: torch.device):
    if not on:
        yield
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
           torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[1], old[2]


def _load_hp(run_dir: Path, hp: HParams | None) -> HParams:
    cfg = run_dir / "config" / "hparams.yaml"
    if hp is None:
        if not cfg.is_file():
            raise ConfigError(
                f"{cfg}: no training config; write one with chlib.train.loop.make_run_config(...) or "
                "pass hp="
            )
        return load_hparams(cfg)
    save_hparams(hp, cfg)  # the run folder records what it was trained with
    return hp


def _find_resume(ckpt_dir: Path) -> tuple[int, Path] | None:
    done = list_checkpoints(ckpt_dir, "do_")
    gens = list_checkpoints(ckpt_dir, "g_")
    both = sorted(set(done) & set(gens))
    return (both[-1], done[both[-1]]) if both else None


def train(
    run_dir: str | os.PathLike,
    *,
    hp: HParams | None = None,
    device: str | torch.device = "auto",
    max_epochs: int | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict], Any]] | None = None,
) -> TrainResult:
    """Train (or resume training) the run in ``run_dir``; see the module docstring.

    Args:
        run_dir: ``runs/<name>/``; its ``config/hparams.yaml`` is read unless ``hp`` is given
            (then ``hp`` is written there).
        hp: settings to use instead of the file.
        device: "auto" (= ``hp.device``, itself "auto" by default: cuda, mps, else cpu), or a
            device name.
        max_epochs: stop before epoch index ``max_epochs`` (default ``hp.max_epochs``); a resumed
            run counts the epochs it already did.
        progress: show a tqdm bar per epoch.
        callbacks: functions called after each epoch with that epoch's record (a dict: epoch,
            step, lr, ``train_<loss>``, ``val_<loss>``, ``mAP/<testset>`` ...).

    Returns:
        :class:`TrainResult`. Ctrl-C saves and returns with ``interrupted=True``.
    """
    run_dir = Path(run_dir)
    hp = _load_hp(run_dir, hp)
    max_epochs = hp.max_epochs if max_epochs is None else int(max_epochs)
    dev = pick_device(hp.device if device in (None, "auto") else device)
    ckpt_dir = run_dir / "checkpoints"
    data = prepare_training_data(hp)

    torch.manual_seed(hp.seed)  # model initialisation and dropout
    model = CoverHunterNet(hp.model_config(data.num_classes)).to(dev)
    optimizer = _optimizer(model, hp)
    loaders, samplers = _train_loaders(data, hp, dev)
    val_loader = _val_loader(data, hp, dev)
    metric = hp.early_stop_metric if (hp.early_stop_metric == "mAP" or val_loader) else "train_loss"
    stopper = EarlyStopping(metric=metric, patience=hp.early_stopping_patience,
                            alpha=hp.map_smoothing_alpha)
    prog = _Progress()
    rounds = samplers[0].batches_per_epoch

    resume = _find_resume(ckpt_dir)
    if resume is not None:
        r_epoch, do_path = resume
        state = load_train_state(do_path)
        load_state_into(model, load_generator_state(ckpt_dir / checkpoint_name(r_epoch)),
                        where=str(ckpt_dir / checkpoint_name(r_epoch)))
        optimizer.load_state_dict(state["optim_g"])
        stopper.load_state_dict(state.get("early_stopping", {}))
        extra = state.get("chlib", {})
        complete = extra.get("epoch_complete", True)
        prog.step = int(state.get("steps", 0))
        prog.epoch = r_epoch + 1 if complete else r_epoch
        prog.batch_in_epoch = 0 if complete else int(extra.get("batch_in_epoch", 0))
        if "rng" in extra:
            _set_rng_state(extra["rng"], dev)
        if progress:
            print(f"resuming {run_dir} from {checkpoint_name(r_epoch)} "
                  f"(epoch {prog.epoch}, step {prog.step})")

    amp = hp.amp == "bf16" and dev.type == "cuda"
    if hp.amp == "bf16" and not amp:
        warnings.warn(f"amp: bf16 is used on CUDA only; training in float32 on {dev.type}", stacklevel=2)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    loss_fn = torch.compile(model.compute_loss) if hp.compile else model.compute_loss
    log = _Log(run_dir, time.strftime("%Y%m%d-%H%M%S"))
    history: list[dict] = []
    interrupted = stopped = False
    last_ckpt: Path | None = None
    t_start = time.time()

    def save(epoch: int, complete: bool) -> Path:
        return save_checkpoint(ckpt_dir, epoch, model_state=model.state_dict(),
                               train_state=_train_state(epoch, prog, optimizer, stopper, samplers,
                                                        hp, data.num_classes, dev, complete=complete))

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
        """One optimizer update; None when the loss or gradient was not finite (no update)."""
        model.train()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            total, parts = loss_fn(x, y)
        if not torch.isfinite(total):
            return None
        total.backward()
        if hp.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
            if not torch.isfinite(norm):
                return None
        optimizer.step()
        return {**{k: float(v) for k, v in parts.items()}, "total": float(total.detach())}

    stop_reason = ""
    with _deterministic(hp.deterministic, dev):
        try:
            if stopper.should_stop:
                stopped, stop_reason = True, "early stopping had already triggered"
            while prog.epoch < max_epochs and not stopped:
                epoch, t_epoch = prog.epoch, time.time()
                for s in samplers:
                    s.set_epoch(epoch, prog.batch_in_epoch)
                order_rng = item_rng(hp.seed, _ORDER_STREAM, epoch)
                orders = [order_rng.permutation(len(loaders)) for _ in range(rounds)]
                sums: dict[str, float] = {}
                n_ok = 0
                since: dict[str, float] = {}
                n_since = 0
                bar = tqdm(total=(rounds - prog.batch_in_epoch) * len(loaders),
                           desc=f"epoch {epoch}", disable=not progress, leave=False)
                iters = [iter(dl) for dl in loaders]
                for r in range(prog.batch_in_epoch, rounds):
                    batches = [next(it) for it in iters]
                    for li in orders[r]:
                        lr = lr_at(prog.step + 1, epoch, hp)
                        lr_logged = _set_lr(optimizer, lr, hp)
                        losses = train_step(*batches[li])
                        prog.step += 1
                        bar.update(1)
                        if losses is None:
                            prog.bad_steps += 1
                            if prog.bad_steps >= NAN_PATIENCE:
                                path = save(epoch, complete=False)
                                raise TrainingDivergedError(
                                    f"{run_dir}: the loss or gradient was not finite for "
                                    f"{NAN_PATIENCE} steps in a row (step {prog.step}, lr {lr:.3g}); "
                                    f"state saved to {path}. Lower learning_rate, check the "
                                    "features for NaN/inf, or set grad_clip")
                            continue
                        prog.bad_steps = 0
                        n_ok += 1
                        n_since += 1
                        for k, v in losses.items():
                            sums[k] = sums.get(k, 0.0) + v
                            since[k] = since.get(k, 0.0) + v
                        if prog.step == 1 or prog.step % hp.log_every_steps == 0:
                            means = {k: v / n_since for k, v in since.items()}
                            log.scalars("csi", {"lr": lr_logged, **means}, prog.step)
                            log.record("train", epoch=epoch, step=prog.step, lr=lr_logged, **means)
                            bar.set_postfix(loss=f"{means['total']:.3f}", lr=f"{lr_logged:.2g}")
                            since, n_since = {}, 0
                    prog.batch_in_epoch = r + 1
                bar.close()

                # ---- end of epoch: validation, test sets, early stopping, checkpoint
                rec: dict[str, Any] = {"epoch": epoch, "step": prog.step,
                                       "lr": lr_at(max(prog.step, 1), epoch, hp),
                                       "epoch_s": time.time() - t_epoch}
                rec.update({f"train_{k}": v / max(n_ok, 1) for k, v in sums.items()})
                evaluate = (epoch + 1) % hp.every_n_epoch_to_test == 0 or epoch + 1 >= max_epochs
                if val_loader is not None and evaluate:
                    val = validation_loss(model, val_loader, dev, autocast)
                    log.scalars("csi_val", val, epoch)
                    log.record("val", epoch=epoch, step=prog.step, **val)
                    rec.update({f"val_{k}": v for k, v in val.items()})
                    rec["val_loss"] = val["foc_loss"]
                force_all = epoch + 1 >= max_epochs  # final pass: every test set
                tests = evaluate_testsets(model, hp, dev, epoch=epoch,
                                          names=list(hp.testsets) if force_all else None)
                for name, m in tests.items():
                    if log.tb is not None:
                        log.tb.add_scalar(f"mAP/{name}", m["mAP"], epoch)
                        log.tb.add_scalar(f"hit_rate/{name}", m["HR1"], epoch)
                        log.tb.add_scalar(f"MR1/{name}", m["MR1"], epoch)
                    log.record("test", epoch=epoch, step=prog.step, testset=name,
                               **{k: m[k] for k in ("mAP", "MR1", "HR1", "HR10") if k in m},
                               n_queries=m.get("n_queries"))
                    rec[f"mAP/{name}"] = m["mAP"]
                    rec[f"MR1/{name}"] = m["MR1"]
                    rec[f"HR1/{name}"] = m["HR1"]

                in_hold = prog.step <= (hp.warmup_steps if hp.warmup else 0) + hp.hold_steps
                is_best = False
                if stopper.metric == "mAP":
                    maps = [tests[n]["mAP"] for n in hp.map_stopping_testsets if n in tests]
                    if len(maps) == len(hp.map_stopping_testsets):
                        is_best = stopper.update(epoch, float(np.mean(maps)), in_hold=in_hold)
                        rec["smoothed_mAP"] = stopper.smoothed_map
                elif stopper.metric == "val_loss":
                    if "val_loss" in rec:
                        is_best = stopper.update(epoch, rec["val_loss"], in_hold=in_hold)
                else:
                    is_best = stopper.update(epoch, rec.get("train_foc_loss", math.inf), in_hold=in_hold)
                rec.update(best_epoch=stopper.best_checkpoint_epoch, is_best=is_best,
                           early_stopping_counter=stopper.counter)

                prog.epoch, prog.batch_in_epoch = epoch + 1, 0
                stopped = stopper.should_stop
                if is_best or stopped or (epoch + 1) % hp.every_n_epoch_to_save == 0 \
                        or prog.epoch >= max_epochs:
                    last_ckpt = save(epoch, complete=True)
                if is_best:
                    write_json(ckpt_dir / BEST_FILE, {"epoch": epoch, "metric": stopper.metric,
                                                      "value": stopper.best_checkpoint_value})
                log.flush()
                rec = log.record("epoch", **rec)
                history.append(rec)
                if progress:
                    shown = {k: v for k, v in rec.items() if k in (
                        "train_total", "val_loss", "lr") or k.startswith("mAP/")}
                    print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
                for cb in callbacks or ():
                    cb(rec)
                if stopped:
                    stop_reason = (f"early stopping: no improvement of {stopper.metric} for "
                                   f"{stopper.counter} evaluations (patience {stopper.patience})")
        except KeyboardInterrupt:
            interrupted = True
            last_ckpt = save(prog.epoch, complete=False)
            print(f"\ninterrupted: saved {last_ckpt} (epoch {prog.epoch}, step {prog.step}); "
                  "call train() again to continue")
        finally:
            log.close()
    if progress and stop_reason:
        print(stop_reason)
    if progress and not interrupted:
        print(f"done in {time.time() - t_start:.0f} s: {prog.epoch} epochs, {prog.step} steps; "
              f"best epoch {stopper.best_checkpoint_epoch} ({stopper.metric} "
              f"{stopper.best_checkpoint_value})")
    return TrainResult(
        run_dir=run_dir, epochs_done=prog.epoch, steps=prog.step,
        best_epoch=stopper.best_checkpoint_epoch, best_value=stopper.best_checkpoint_value,
        best_metric=stopper.metric, stopped_early=stopped, interrupted=interrupted,
        last_checkpoint=last_ckpt, history=history)


# --------------------------------------------------------------------------------------------
# recipes and run configs


def recipe_path(recipe: str | os.PathLike) -> Path:
    """The YAML of a recipe name ("laptop", "coverhunter") or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown recipe {str(recipe)!r}: use one of {', '.join(known)} or a .yaml path")


def load_recipe(recipe: str | os.PathLike = "laptop") -> dict:
    """A recipe's YAML mapping (not yet validated; no data paths)."""
    from chlib.core.config import load_yaml

    return load_yaml(recipe_path(recipe))


def _held_out_list(dataset_dir: Path, split: str, out: Path, *, keep_if_all: bool) -> Path | None:
    """Write the ``<split>.txt`` records of works held out entirely (``<split>-only-work-ids.txt``)
    to ``out``; None when there are fewer than 2 such works (or, unless ``keep_if_all``, when
    the split holds nothing else, so that a second list would repeat it)."""
    ids_file, split_file = dataset_dir / f"{split}-only-work-ids.txt", dataset_dir / f"{split}.txt"
    if not ids_file.is_file() or not split_file.is_file():
        return None
    ids = {int(line) for line in ids_file.read_text(encoding="utf-8").split() if line.strip()}
    every = read_manifest(split_file, FULL_KEYS)
    # feature paths re-anchored: the copy lives elsewhere than the split file
    recs = [{**r, "feat": str(feature_path(r, split_file))} for r in every
            if int(r["work_id"]) in ids]
    if len({r["work_id"] for r in recs}) < 2 or (len(recs) == len(every) and not keep_if_all):
        return None
    write_manifest(out, recs)
    return out


def make_run_config(
    run_dir: str | os.PathLike,
    recipe: str | os.PathLike = "laptop",
    overrides: dict | None = None,
    *,
    dataset_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``<run_dir>/config/hparams.yaml`` from a recipe and a dataset's split files.

    With ``dataset_dir`` (a folder made by the extract and split steps), it sets ``train_path``
    (train.txt), ``val_path`` (val.txt when it has records), the CQT settings and ``input_dim``
    from ``features.json``, and test sets: ``test`` (query = ref = test.txt) and, when some works
    were held out entirely and the test set also holds seen works, ``unseen`` (the held-out
    works' test recordings only, written to ``<run_dir>/config/test_unseen.txt``); and, when
    at least two works were held out for validation (``val_unseen``), ``val_unseen`` (their
    val recordings, ``<run_dir>/config/val_unseen.txt``): the test set a recipe can early-stop
    on (``early_stop_metric: mAP``, ``map_stopping_testsets: [val_unseen]``) without touching
    the test works. A recipe asking for mAP stopping on a set the dataset cannot provide falls
    back to val_loss, with a warning. Paths are written as given (relative paths stay
    relative to the current directory, as the original expects). ``overrides`` (nested dict, YAML
    key names) are merged last. The result is validated. Returns the YAML path.
    """
    run_dir = Path(run_dir)
    d = load_recipe(recipe)
    if dataset_dir is not None:
        ds = Path(dataset_dir)
        if not (ds / "train.txt").is_file():
            raise ConfigError(f"{ds}: no train.txt; run the split step on this dataset first")
        d["train_path"] = str(ds / "train.txt")
        val = ds / "val.txt"
        if val.is_file() and read_manifest(val, FULL_KEYS):
            d["val_path"] = str(val)
        else:
            d.pop("val_path", None)
        feats = ds / "features.json"
        if feats.is_file():
            f = read_json(feats)
            for yk, fk in (("sample_rate", "sample_rate"), ("hop_length", "hop_length"),
                           ("fmin", "fmin"), ("n_bins", "n_bins"),
                           ("bins_per_octave", "bins_per_octave"), ("cqt_flavour", "flavour")):
                if fk in f:
                    d[yk] = f[fk]
            if "n_bins" in f:
                d["input_dim"] = f["n_bins"]
        test = ds / "test.txt"
        if test.is_file() and read_manifest(test, FULL_KEYS):
            d["test"] = {"query_path": str(test), "ref_path": str(test), "every_n_epoch_to_test": 1}
            unseen = _held_out_list(ds, "test", run_dir / "config" / "test_unseen.txt",
                                    keep_if_all=False)
            if unseen is not None:
                d["unseen"] = {"query_path": str(unseen), "ref_path": str(unseen),
                               "every_n_epoch_to_test": 1}
        val_unseen = _held_out_list(ds, "val", run_dir / "config" / "val_unseen.txt",
                                    keep_if_all=True)
        if val_unseen is not None:
            d["val_unseen"] = {"query_path": str(val_unseen), "ref_path": str(val_unseen),
                               "every_n_epoch_to_test": 1}
    if overrides:
        d = deep_merge(d, overrides)
    wanted = d.get("map_stopping_testsets") or []
    if d.get("early_stop_metric") == "mAP" and not all(
            isinstance(d.get(n), dict) or n in (d.get("testsets") or {}) for n in wanted):
        warnings.warn(
            f"recipe {recipe}: early stopping on the mAP of {wanted} is not possible with this "
            "dataset (no such test set: it needs works held out for validation, val_unseen in "
            "the data-prep config); using val_loss instead", stacklevel=2)
        d["early_stop_metric"], d["map_stopping_testsets"] = "val_loss", []
    hp = HParams.from_dict(d, where=f"recipe {recipe} + overrides")
    out = run_dir / "config" / "hparams.yaml"
    save_hparams(hp, out)
    return out
