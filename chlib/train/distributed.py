"""Training on several devices with torch.distributed: one process per device, launched by
``torchrun`` (one node or several), wrapped in DistributedDataParallel (DDP).

``torchrun --nproc_per_node 4 -m chlib train runs/big`` sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`session` joins the process group they describe (NCCL for CUDA tensors, gloo
for CPU ones) and leaves it at the end. Without WORLD_SIZE (or with 1) nothing here changes a
single-process run: every helper is then the identity or a no-op.

Exactness: ``batch_size`` is the GLOBAL batch; each rank gets a contiguous slice of its whole
works (:class:`chlib.data.sampler.MPerClassBatchSampler`). Each rank embeds its slice, the
embeddings and labels are gathered (autograd-aware) and every rank computes the loss of the
whole global batch, so the batch-hard triplet loss and the ``_bottleneck`` BatchNorm (on the
gathered embeddings) see exactly the single-process batch. The gradient reaching a rank's own
embeddings is then ``world_size`` times its share (each rank's copy of the loss sends one), the
head's gradient is the whole one on every rank, and DDP averages over ranks: the result is the
single-process gradient (``tests/test_ddp.py`` checks it numerically). The BatchNorms of the
embedding path (``_global_cmvn``, the Conformer conv modules') see only their rank's items, so
they become BatchNorms whose training statistics are the global batch's:
:class:`GlobalBatchNorm1d` on CPU (torch's SyncBatchNorm takes GPU tensors only), SyncBatchNorm
on CUDA; both keep the state_dict keys. Rank 0 evaluates, logs and saves; the others wait for
its decisions (:func:`from_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather, all_reduce
from torch.nn.parallel import DistributedDataParallel

from chlib.core.errors import ConfigError
from chlib.core.io import folder_lock
from chlib.data.sampler import item_rng

__all__ = ["DistEnv", "SINGLE", "env_from_os", "session", "run_lock", "rank_device",
           "prepare_model", "parallel_loss", "from_main", "main_decisions", "check_same", "gather",
           "barrier", "announce", "GlobalBatchNorm1d"]

# rank 0 evaluates the test sets while the others wait in a collective: allow for a long one
TIMEOUT = datetime.timedelta(hours=2)
_RANK_STREAM = 1_000_033  # seed-sequence key of the dropout seeds of ranks > 0 (any constant)


@contextlib.contextmanager
def _autograd_collectives() -> Iterator[None]:
    """Recent torch marks torch.distributed.nn.functional (its public autograd-aware
    collectives, which torch 2.1 has too) deprecated in favour of a private module: quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.distributed\.nn\.functional", FutureWarning)
        yield


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, logs and saves."""
        return self.rank == 0


SINGLE = DistEnv()  # a single-process run


def env_from_os() -> DistEnv:
    """The DistEnv that torchrun's RANK, WORLD_SIZE and LOCAL_RANK describe (single process
    when WORLD_SIZE is unset); a ConfigError for values that do not fit together."""
    try:
        env = DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") \
            from None
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ConfigError(f"RANK {env.rank} / WORLD_SIZE {env.world_size} / LOCAL_RANK "
                          f"{env.local_rank} do not fit together; launch with torchrun")
    return env


@contextlib.contextmanager
def session() -> Iterator[DistEnv]:
    """The process group of this launch, joined (env://: MASTER_ADDR, MASTER_PORT) for the
    ``with`` block and left after it; a single process (or a group already joined by the
    caller) is yielded as it is."""
    env = env_from_os()
    if not env.active or dist.is_initialized():
        if dist.is_initialized() and dist.get_world_size() != env.world_size:
            raise ConfigError(f"the process group has {dist.get_world_size()} processes but "
                              f"WORLD_SIZE is {env.world_size}")
        yield env
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: train in one process")
    # one group for both kinds of tensors: the device (cpu or cuda) is chosen later
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        yield env
    finally:
        dist.destroy_process_group()


def run_lock(run_dir: Path, env: DistEnv, what: str) -> contextlib.AbstractContextManager:
    """The run folder's lock, held by rank 0 only (a second training stops at once)."""
    return folder_lock(run_dir, what, wait=False) if env.is_main else contextlib.nullcontext()


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run, the CPU for a CPU one."""
    if not env.active:
        return device
    if device.type == "mps":
        raise ConfigError("Apple MPS has no torch.distributed backend: train on a Mac in one "
                          "process (without torchrun), or set device: cpu to train on CPUs")
    if device.type != "cuda":
        return torch.device("cpu")
    if env.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {env.local_rank} but this node has "
                          f"{torch.cuda.device_count()} CUDA devices: lower --nproc_per_node")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics (mean, biased variance; the running ones too)
    are those of the global batch: sums over every rank's items, all-reduced with autograd.
    Outside training, or in a single process, it is nn.BatchNorm1d; same state_dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # all but the channel dimension
        shape = [1, -1] + [1] * (x.dim() - 2)
        with _autograd_collectives():
            sums = all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / x.shape[1])]))
            n = sums[-1].detach()
            mean = sums[:-1] / n
            centred = x - mean.view(shape)
            var = all_reduce(centred.pow(2).sum(dims)) / n  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                    else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1), alpha=f)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def prepare_model(model: nn.Module, env: DistEnv, seed: int) -> None:
    """Before the optimizer is built: every BatchNorm of the embedding path (``_global_cmvn``,
    each Conformer block's conv-module norm) made global, its state kept; ``_bottleneck``
    stays (it normalises the gathered embeddings: the global batch already). Ranks > 0 get
    dropout seeds of their own (rank 0 keeps the single-process stream)."""
    if not env.active:
        return
    for name, old in list(model.named_modules()):
        if type(old) is not nn.BatchNorm1d or name == "_bottleneck":
            continue
        cls = nn.SyncBatchNorm if old.weight.device.type == "cuda" else GlobalBatchNorm1d
        new = cls(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
                  track_running_stats=old.track_running_stats).to(old.weight.device)
        new.load_state_dict(old.state_dict())
        for p_new, p_old in zip(new.parameters(), old.parameters(), strict=True):
            p_new.requires_grad_(p_old.requires_grad)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    if env.rank:
        torch.manual_seed(int(item_rng(seed, _RANK_STREAM, env.rank).integers(2**63 - 1)))


class _GlobalBatchLoss(nn.Module):
    """forward(x, labels) = the model's loss over the global batch: every rank's embeddings
    and labels gathered (rank order = the single-process batch order)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.model(x)
        with _autograd_collectives():
            f_all = torch.cat(all_gather(f), dim=0)  # [B_global, D], with autograd
        y_all = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
        dist.all_gather(y_all, labels.contiguous())
        return self.model.loss_from_embedding(f_all, torch.cat(y_all))


def parallel_loss(model: nn.Module, env: DistEnv,
                  device: torch.device) -> tuple[nn.Module, Callable[..., Any]]:
    """``(module to put in train mode, loss function (x, labels) -> (total, parts))``: the
    model and its ``compute_loss`` in a single process, else a DDP module over the global loss."""
    if not env.active:
        return model, model.compute_loss
    ddp = DistributedDataParallel(
        _GlobalBatchLoss(model), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=model.cfg.center_weight <= 0)  # centers unused without it
    return ddp, ddp


def from_main(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` (picklable), on every rank."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_decisions(rec: dict, is_best: bool, stopper: Any,
                   env: DistEnv) -> tuple[dict, bool]:
    """Rank 0's epoch record and decisions (a new best epoch; early stopping: ``stopper``'s
    state, loaded on every rank) after its evaluation; as given in a single process."""
    if not env.active:
        return rec, is_best
    rec, is_best, state = from_main((rec, is_best, stopper.state_dict()), env)
    stopper.load_state_dict(state)
    return rec, is_best


def check_same(value: Any, env: DistEnv, run_dir: Path) -> None:
    """A ConfigError unless every rank resumed at the same ``value`` (epoch, step, round): the
    ranks read the run folder each, so every node must see it (a shared filesystem)."""
    values = gather(value, env)
    if any(v != values[0] for v in values):
        raise ConfigError(f"{run_dir}: the ranks resume from different states {values} (rank "
                          "order); the run folder must be one every node sees (shared storage)")


def gather(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.active:
        dist.barrier()


def announce(env: DistEnv, batch_size: int, lr: float) -> dict[str, Any]:
    """Print the line of a distributed run's start (batch_size is the global batch, the
    learning rate is used as given: not scaled by the world size); returns its values."""
    values = {"world_size": env.world_size, "batch_size": batch_size,
              "per_rank_batch": batch_size // env.world_size, "lr": lr}
    print(f"world size {env.world_size}, global batch {batch_size}, per-rank batch "
          f"{values['per_rank_batch']}, lr {lr:g} (not scaled)", flush=True)
    return values
