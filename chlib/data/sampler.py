"""Batch samplers: m recordings of each of batch_size/m works per training batch.

:class:`MPerClassBatchSampler` replaces the original's MPerClassSampler (coverhunter-facts 4.3,
bug 13.2.3): every work is in exactly one batch per epoch, every batch holds ``batch_size`` real
items, each with its own 63-bit seed; a pure function of ``(seed, stream, epoch)``. Under
torch.distributed ``batch_size`` is the global batch: rank r of W takes the r-th contiguous
slice of whole works of each global batch, so the union over ranks is the single-process batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from chlib.core.errors import ConfigError

__all__ = ["MPerClassBatchSampler", "grouped_batches", "item_rng"]


def item_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator for the seed sequence ``(seed, *keys)`` (all non-negative ints)."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


class MPerClassBatchSampler:
    """Yield batches of ``(item_index, item_seed)``: ``batch_size // m`` works x ``m`` items.

    ``labels``: work id per dataset item; ``stream`` keeps several samplers of one run
    independent. Call :meth:`set_epoch` before iterating; ``len()`` = batches left. With
    ``world_size`` > 1 it yields rank ``rank``'s share of each global batch: ``batch_size //
    world_size`` items, ``works per batch // world_size`` whole works (:meth:`epoch_batches`)."""

    def __init__(self, labels: Sequence[int], *, m: int, batch_size: int, seed: int, stream: int = 0,
                 group_seeds: bool = False, rank: int = 0, world_size: int = 1):
        if m < 1 or batch_size < 1 or batch_size % m:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of m_per_class ({m})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside the {world_size} processes of this run")
        if (batch_size // m) % world_size:
            k, fit = batch_size // m, -(-(batch_size // m) // world_size) * world_size * m
            raise ConfigError(
                f"batch_size {batch_size} / m_per_class {m} = {k} works per batch cannot be "
                f"split over {world_size} processes (each takes whole works): batch_size is the "
                f"global batch; make batch_size / m_per_class a multiple of {world_size}, e.g. "
                f"batch_size {fit}, or launch another number of processes")
        if len(labels) == 0:
            raise ConfigError("the training set is empty: no items to sample batches from")
        self.m = int(m)
        self.batch_size = int(batch_size)
        self.k = self.batch_size // self.m  # works per batch
        self.seed = int(seed)
        self.stream = int(stream)
        by_work: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            by_work.setdefault(int(lab), []).append(i)
        self.works = sorted(by_work)  # fixed order before shuffling: reproducible
        self.n_works = len(self.works)
        self.items = [np.asarray(by_work[w], dtype=np.int64) for w in self.works]
        self.epoch = 0
        self.start_batch = 0
        self.group_seeds = bool(group_seeds)  # items (index, seed, group seed): see epoch_batches
        self.rank, self.world_size = int(rank), int(world_size)

    @property
    def batches_per_epoch(self) -> int:
        """``ceil(n_works / (batch_size // m))``."""
        return math.ceil(self.n_works / self.k)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate over, skipping its first ``start_batch`` batches."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _work_groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Positions (into self.works) of the k works of each batch of one epoch: shuffled, a
        short last group completed with other works (repeats only when there are too few)."""
        order = rng.permutation(self.n_works)
        groups = [order[i : i + self.k] for i in range(0, self.n_works, self.k)]
        if short := self.k - len(groups[-1]):
            others = np.setdiff1d(np.arange(self.n_works), groups[-1])
            extra = (rng.choice(others, size=short, replace=False) if len(others) >= short
                     else rng.choice(self.n_works, size=short, replace=True))
            groups[-1] = np.concatenate([groups[-1], extra])
        return groups

    def _draw_items(self, pos: int, rng: np.random.Generator) -> np.ndarray:
        """m items of a work: without replacement if it has m, else all plus random repeats."""
        items = self.items[pos]
        if len(items) >= self.m:
            return rng.choice(items, size=self.m, replace=False)
        extra = rng.choice(items, size=self.m - len(items), replace=True)
        return rng.permutation(np.concatenate([items, extra]))

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, ...]]]:
        """This rank's share of every batch of ``epoch`` (:meth:`global_batches`): the slice
        ``[rank * n, (rank + 1) * n)``, ``n = batch_size // world_size``: whole works, as the m
        items of a work are contiguous."""
        batches = self.global_batches(epoch)
        if self.world_size == 1:
            return batches
        n = self.batch_size // self.world_size
        return [b[self.rank * n : (self.rank + 1) * n] for b in batches]

    def global_batches(self, epoch: int) -> list[list[tuple[int, ...]]]:
        """Every batch of ``epoch``: lists of ``(item_index, item_seed)``, batch_size long; with
        ``group_seeds``, ``(item_index, item_seed, group_seed)``, the m items of a work sharing
        one group seed (aligned training picks one passage per work with it), drawn from a
        stream of their own so the items and their seeds are those of a plain sampler."""
        rng = item_rng(self.seed, self.stream, epoch)
        groups_rng = item_rng(self.seed, self.stream, epoch, 1)
        out = []
        for group in self._work_groups(rng):
            idx = np.concatenate([self._draw_items(int(p), rng) for p in group])
            seeds = rng.integers(0, 2**63 - 1, size=len(idx), dtype=np.int64)
            if not self.group_seeds:
                out.append([(int(i), int(s)) for i, s in zip(idx, seeds, strict=True)])
                continue
            shared = np.repeat(groups_rng.integers(0, 2**63 - 1, size=len(group)), self.m)
            out.append([(int(i), int(s), int(g)) for i, s, g in zip(idx, seeds, shared,
                                                                   strict=True)])
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.epoch_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume (the batches themselves are recomputed)."""
        return {"seed": self.seed, "stream": self.stream, "epoch": self.epoch,
                "start_batch": self.start_batch, "m": self.m, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "stream", "m", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(f"sampler state was saved with {key}={state[key]}, this run has "
                                  f"{getattr(self, key)}; resume with the same settings or anew")
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))


def grouped_batches(labels: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: every item once, sorted by work (stable), so that batch losses that
    need positives (triplet) are meaningful on validation data too."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
