"""Training a CoverHunter model: one loop, readable top to bottom (nanoGPT-style).

An epoch is ``len(chunk_frame) x ceil(n_works / works_per_batch)`` steps (round r: the r-th
batch of every chunk length's sampler, in a seeded order), then val loss, the test sets due,
early stopping (``best.json``) and the checkpoints ``g_0000000e`` / ``do_0000000e``. Resume is
exact (CPU + ``deterministic: true``: bit-identical weights): ``do_`` holds optimizer, step,
epoch, early stopping, RNG and sampler states; the LR is a pure function of step and epoch.
Logs: TensorBoard (the original's tags) under ``<run>/logs/<runid>/`` (one per run: a resumed
run appends to it) and ``metrics.jsonl``; with ``progress``, one printed line per epoch. Under
``torchrun`` (WORLD_SIZE > 1) one process per device trains with DDP on shares of the global
batch; rank 0 alone evaluates, logs and saves (:mod:`chlib.train.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from chlib.core.config import HParams, load_hparams
from chlib.core.device import pick_device
from chlib.core.errors import ChlibError, ConfigError
from chlib.core.io import append_jsonl, write_json
from chlib.core.manifest import FULL_KEYS, read_manifest
from chlib.core.progress import progress as progress_bar
from chlib.data.sampler import MPerClassBatchSampler, item_rng
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import (
    BEST_FILE,
    checkpoint_name,
    list_checkpoints,
    load_generator_state,
    load_state_into,
    load_train_state,
    remove_temp_files,
    save_checkpoint,
)
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.scoring import comparison, score_windows
from chlib.train import distributed
from chlib.train.data import (
    make_val_loader,
    prepare_training_data,
    seen_work_records,
    train_loaders,
)
from chlib.train.diagnose import memorising, model_free_scores
from chlib.train.distributed import SINGLE, DistEnv
from chlib.train.runs import (
    epoch_table,
    load_recipe,
    make_run_config,
    read_metrics,
    run_config,
    setting_changes,
)
from chlib.train.schedule import EarlyStopping, lr_at

# re-exported here for the notebooks, bench scripts and tests that import them from the loop
__all__ = [
    "TrainResult", "TrainState", "TrainingDivergedError", "EarlyStopping", "lr_at", "train",
    "prepare_training_data", "evaluate_testsets", "validation_loss", "seen_work_records",
    "read_metrics", "epoch_table", "load_recipe", "make_run_config", "load_hparams",
]

NAN_PATIENCE = 3  # consecutive non-finite losses before giving up
_ORDER_STREAM = 1_000_003  # seed-sequence key of the per-round loader order (any constant)


class TrainingDivergedError(ChlibError):
    """The loss was not finite for several consecutive steps."""


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                    autocast: Callable[[], Any] = contextlib.nullcontext, *,
                    desc: str = "") -> dict[str, float]:
    """Mean loss parts over every validation item, batches weighted by size, model in eval mode:
    ``{"foc_loss", ["tri_loss", "cen_loss"], "total"}``; ``desc``: a progress bar's label."""
    model.eval()
    sums, n = Counter[str](), 0
    batches = iter(loader)  # tqdm over the DataLoader itself would draw from the global RNG
    for x, y in progress_bar(batches, total=len(loader), desc=desc, unit="batch",
                             enabled=bool(desc), leave=False):
        with autocast():
            total, parts = model.compute_loss(x.to(device), y.to(device))
        sums.update({k: float(v) * len(y) for k, v in {**parts, "total": total}.items()})
        n += len(y)
    return {k: v / max(n, 1) for k, v in sums.items()}


def _embedded(model: torch.nn.Module, path_str: str, hp: HParams,
              device: torch.device) -> tuple[list[dict], Path, Any]:
    """A test-set list's records, path and embedded windows."""
    path = hp.resolve_path(path_str)
    if not path.is_file():
        raise ConfigError(f"{hp.source}: test-set list {path_str!r} not found (relative to {os.getcwd()})")
    recs = read_manifest(path, FULL_KEYS)
    return recs, path, embed_recordings(model, recs, hp, manifest_path=path, device=device,
                                        progress=False)


def evaluate_testsets(model: torch.nn.Module, hp: HParams, device: torch.device, *,
                      epoch: int | None = None, names: Sequence[str] | None = None,
                      desc: str = "") -> dict[str, dict[str, float]]:
    """mAP, MR1, HR1, HR10 (and P@10, counts) of the test sets ``names`` (default: those due
    after ``epoch``, or all when ``epoch`` is None), scored under ``hp.distance_rule``;
    ``desc``: a progress bar's label (one step per test set)."""
    results: dict[str, dict[str, float]] = {}
    due = [name for name, ts in hp.testsets.items()
           if ((name in names) if names is not None
               else epoch is None or (epoch + 1) % ts.every_n_epoch_to_test == 0)]
    for name in progress_bar(due, desc=desc, unit="test set", enabled=bool(desc), leave=False):
        ts = hp.testsets[name]
        q_recs, q_path, q_win = _embedded(model, ts.query_path, hp, device)
        r_recs, _, r_win = (q_recs, q_path, q_win) if hp.resolve_path(ts.ref_path) == q_path \
            else _embedded(model, ts.ref_path, hp, device)
        qir = hp.resolve_path(ts.query_in_ref_path) if ts.query_in_ref_path else None
        results[name] = score_windows(q_recs, r_recs, q_win, r_win, **comparison(hp),
                                      query_in_ref_path=qir)
    return results


def _rng_state(device: torch.device) -> dict:
    """Every global RNG state, in types that ``torch.load(weights_only=True)`` accepts."""
    name, key, *rest = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, [int(v) for v in key],
                       *[float(v) if isinstance(v, float) else int(v) for v in rest]],
             "torch": torch.get_rng_state()}
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
class TrainState:
    """Everything a resume restores (with the RNG states, kept in the checkpoint only)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stopper: EarlyStopping
    samplers: list[MPerClassBatchSampler]
    epoch: int = 0  # epoch in progress (0-based)
    batch_in_epoch: int = 0  # rounds of this epoch already done
    step: int = 0  # optimizer updates made so far
    bad_steps: int = 0  # consecutive non-finite losses

    def train_state(self, epoch: int, hp: HParams, num_classes: int, device: torch.device, *,
                    complete: bool) -> dict:
        """The ``do_`` content: the original's keys plus chlib's resume state under ``"chlib"``."""
        return {"optim_g": self.optimizer.state_dict(), "steps": self.step, "epoch": epoch,
                "early_stopping": self.stopper.state_dict(), "chlib": {
                    "version": 1, "epoch_complete": complete,
                    "batch_in_epoch": 0 if complete else self.batch_in_epoch,
                    "lr": lr_at(max(self.step, 1), epoch, hp), "num_classes": num_classes,
                    "rng": _rng_state(device),
                    "samplers": [s.state_dict() for s in self.samplers],
                    "hparams": yaml.safe_dump(hp.to_dict(), sort_keys=False)}}

    def resume(self, ckpt_dir: Path, device: torch.device,
               env: DistEnv = SINGLE) -> tuple[int, dict] | None:
        """Load the newest checkpoint with both g_ and do_ files: its epoch and the settings it
        was trained with (``{}``: unknown, or a start not yet trained from), or None. Every
        rank loads the same one (its own RNG states when saved by as many ranks)."""
        done = list_checkpoints(ckpt_dir, "do_")
        epoch = max(set(done) & set(list_checkpoints(ckpt_dir, "g_")), default=None)
        if epoch is None:
            return None
        state = load_train_state(done[epoch])
        g_path = ckpt_dir / checkpoint_name(epoch)
        load_state_into(self.model, load_generator_state(g_path), where=str(g_path))
        self.optimizer.load_state_dict(state["optim_g"])
        self.stopper.load_state_dict(state.get("early_stopping", {}))
        extra = state.get("chlib", {})
        complete = extra.get("epoch_complete", True)
        self.step, self.epoch = int(state.get("steps", 0)), epoch + int(complete)
        self.batch_in_epoch = 0 if complete else int(extra.get("batch_in_epoch", 0))
        ranks = extra.get("rng_ranks") or []
        if rng := ranks[env.rank] if len(ranks) == env.world_size > 1 else extra.get("rng"):
            _set_rng_state(rng, device)
        return epoch, yaml.safe_load(extra["hparams"]) if self.step and "hparams" in extra else {}


class _Log:
    """TensorBoard (original tag names) + ``metrics.jsonl``; TensorBoard is optional."""

    def __init__(self, run_dir: Path, step: int, enabled: bool = True):
        """A resumed run (``step`` updates done) appends to the run's newest TensorBoard folder
        and hides the steps after ``step`` that an earlier call logged (``purge_step``).
        ``enabled`` False (ranks > 0): nothing is written."""
        self.jsonl, self.tb = run_dir / "metrics.jsonl" if enabled else None, None
        if not enabled:
            return
        logs = run_dir / "logs"
        old = sorted(p for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else []
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(old[-1] if old else logs / time.strftime(
                "%Y%m%d-%H%M%S")), purge_step=step + 1 if old else None)
        except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
            warnings.warn("tensorboard is not installed; logging to metrics.jsonl only", stacklevel=3)

    def scalars(self, prefix: str, values: dict[str, float], x: int) -> None:
        """TensorBoard scalars ``<prefix><key>`` (non-finite values skipped)."""
        for k, v in values.items():
            if self.tb is not None and v is not None and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}{k}", v, x)

    def record(self, kind: str, **fields: Any) -> dict:
        rec = {"kind": kind, **fields, "time": time.time()}
        if self.jsonl is not None:
            append_jsonl(self.jsonl, rec)
        return rec


def _optimizer(model: torch.nn.Module, hp: HParams) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError(
                f"{hp.source}: optimizer: prodigy needs the 'prodigyopt' package "
                "(pip install prodigyopt), or set optimizer: adamw") from None
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
    return float(optimizer.param_groups[0].get("d", scale)) if hp.optimizer == "prodigy" else lr


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


class _Run:
    """The fixed parts of a training call: data, loaders, logging, AMP and the loss; builds
    model, optimizer and early stopping in ``state`` and resumes it from the newest checkpoint."""

    def __init__(self, run_dir: Path, hp: HParams, device: torch.device, max_epochs: int,
                 progress: bool, env: DistEnv = SINGLE):
        self.run_dir, self.hp, self.device, self.env = run_dir, hp, device, env
        self.max_epochs, self.progress = max_epochs, progress
        self.ckpt_dir = run_dir / "checkpoints"
        self.data = prepare_training_data(hp)
        torch.manual_seed(hp.seed)  # model initialisation and dropout
        model = CoverHunterNet(hp.model_config(self.data.num_classes)).to(device)
        distributed.prepare_model(model, env, hp.seed)
        self.loaders, samplers = train_loaders(self.data, hp, device, rank=env.rank,
                                               world_size=env.world_size)
        self.val_loader = make_val_loader(self.data, hp, device)
        metric = hp.early_stop_metric if (hp.early_stop_metric == "mAP" or self.val_loader) \
            else "train_loss"
        stopper = EarlyStopping(metric=metric, patience=hp.early_stopping_patience,
                                alpha=hp.map_smoothing_alpha)
        self.state = st = TrainState(model, _optimizer(model, hp), stopper, samplers)
        resumed, trained_with = st.resume(self.ckpt_dir, device, env) or (None, {})
        distributed.check_same((st.epoch, st.step, st.batch_in_epoch), env, run_dir)
        if trained_with and (changes := setting_changes(trained_with, hp, str(run_dir))):
            warnings.warn(f"{run_dir}: resuming from {checkpoint_name(resumed)} with settings "
                          f"other than those it was trained with: {changes} (training goes on "
                          "with the new ones)", stacklevel=3)
        if resumed is not None and progress:
            print(f"resuming {run_dir} from {checkpoint_name(resumed)} "
                  f"(epoch {st.epoch}, step {st.step})")
        self.amp = hp.amp == "bf16" and device.type == "cuda"
        if hp.amp == "bf16" and not self.amp:
            warnings.warn(f"amp: bf16 is used on CUDA only; training in float32 on {device.type}",
                          stacklevel=3)
        self.net, loss = distributed.parallel_loss(model, env, device)  # net: put in train mode
        self.loss_fn = torch.compile(loss) if hp.compile else loss
        self.log = _Log(run_dir, st.step, enabled=env.is_main)
        if env.active and env.is_main:  # printed, and a "distributed" record in metrics.jsonl
            self.log.record("distributed", **distributed.announce(env, hp.batch_size, hp.learning_rate))

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def save(self, st: TrainState, epoch: int, complete: bool, sync: bool = True) -> Path:
        """Rank 0 writes (with every rank's RNG states), the others wait; ``sync`` False (a
        Ctrl-C, which reaches the ranks at different moments): rank 0 alone, no collective."""
        rngs = distributed.gather(_rng_state(self.device), self.env) if sync else []
        path = self.ckpt_dir / checkpoint_name(epoch)
        if self.env.is_main:
            state = st.train_state(epoch, self.hp, self.data.num_classes, self.device,
                                   complete=complete)
            if len(rngs) > 1:
                state["chlib"]["rng_ranks"] = rngs
            path = save_checkpoint(self.ckpt_dir, epoch, model_state=st.model.state_dict(),
                                   train_state=state)
        if sync:
            distributed.barrier(self.env)
        return path


def _train_step(run: _Run, st: TrainState, x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
    """One optimizer update; None when the loss or gradient was not finite (no update)."""
    run.net.train()
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    st.optimizer.zero_grad(set_to_none=True)
    with run.autocast():
        total, parts = run.loss_fn(x, y)
    if not torch.isfinite(total):
        return None
    total.backward()
    if run.hp.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(st.model.parameters(), run.hp.grad_clip)
        if not torch.isfinite(norm):
            return None
    st.optimizer.step()
    return {**{k: float(v) for k, v in parts.items()}, "total": float(total.detach())}


def _run_epoch(run: _Run, st: TrainState) -> dict[str, float]:
    """The rounds of epoch ``st.epoch`` from ``st.batch_in_epoch`` on; mean train losses."""
    hp, epoch, log = run.hp, st.epoch, run.log
    rounds = st.samplers[0].batches_per_epoch
    for s in st.samplers:
        s.set_epoch(epoch, st.batch_in_epoch)
    order_rng = item_rng(hp.seed, _ORDER_STREAM, epoch)
    orders = [order_rng.permutation(len(run.loaders)) for _ in range(rounds)]
    sums: Counter[str] = Counter()
    since: list[dict[str, float]] = []  # the losses since the last log record
    n_ok = 0
    bar = progress_bar(total=(rounds - st.batch_in_epoch) * len(run.loaders), desc=f"epoch {epoch}",
                       enabled=run.progress, leave=False)
    iters = [iter(dl) for dl in run.loaders]
    for r in range(st.batch_in_epoch, rounds):
        batches = [next(it) for it in iters]
        for li in orders[r]:
            lr = lr_at(st.step + 1, epoch, hp)
            lr_logged = _set_lr(st.optimizer, lr, hp)
            losses = _train_step(run, st, *batches[li])
            st.step += 1
            bar.update(1)
            if losses is None:
                st.bad_steps += 1
                if st.bad_steps >= NAN_PATIENCE:
                    path = run.save(st, epoch, complete=False)
                    raise TrainingDivergedError(
                        f"{run.run_dir}: the loss or gradient was not finite for {NAN_PATIENCE} "
                        f"steps in a row (step {st.step}, lr {lr:.3g}); state saved to {path}. "
                        "Lower learning_rate, check the features for NaN/inf, or set grad_clip")
                continue
            st.bad_steps = 0
            n_ok += 1
            sums.update(losses)
            since.append(losses)
            if st.step == 1 or st.step % hp.log_every_steps == 0:
                means = {k: float(np.mean([d[k] for d in since])) for k in since[0]}
                log.scalars("csi/", {"lr": lr_logged, **means}, st.step)
                log.record("train", epoch=epoch, step=st.step, lr=lr_logged, **means)
                bar.set_postfix(loss=f"{means['total']:.3f}", lr=f"{lr_logged:.2g}")
                since = []
        st.batch_in_epoch = r + 1
    bar.close()
    return {f"train_{k}": v / max(n_ok, 1) for k, v in sums.items()}


def _evaluate(run: _Run, st: TrainState, epoch: int, rec: dict) -> dict[str, dict]:
    """Validation loss and the test sets due this epoch, logged and added to ``rec``."""
    hp, log = run.hp, run.log
    final = epoch + 1 >= run.max_epochs
    if run.val_loader is not None and ((epoch + 1) % hp.every_n_epoch_to_test == 0 or final):
        val = validation_loss(st.model, run.val_loader, run.device, run.autocast,
                              desc=f"epoch {epoch}: validation loss" if run.progress else "")
        log.scalars("csi_val/", val, epoch)
        log.record("val", epoch=epoch, step=st.step, **val)
        rec.update({f"val_{k}": v for k, v in val.items()})
        rec["val_loss"] = val["foc_loss"]
    # the final pass evaluates every test set
    tests = evaluate_testsets(st.model, hp, run.device, epoch=epoch,
                              names=list(hp.testsets) if final else None,
                              desc=f"epoch {epoch}: test sets" if run.progress else "")
    for name, m in tests.items():
        log.scalars("", {f"{tag}/{name}": m[key] for tag, key in
                         (("mAP", "mAP"), ("hit_rate", "HR1"), ("MR1", "MR1"))}, epoch)
        log.record("test", epoch=epoch, step=st.step, testset=name,
                   **{k: m[k] for k in ("mAP", "MR1", "HR1", "HR10") if k in m},
                   n_queries=m.get("n_queries"))
        rec.update({f"mAP/{name}": m["mAP"], f"MR1/{name}": m["MR1"], f"HR1/{name}": m["HR1"]})
    return tests


def _early_stopping(hp: HParams, st: TrainState, epoch: int, rec: dict, tests: dict) -> bool:
    """Update the early-stopping state with this epoch's metric; True for a new best epoch."""
    stopper = st.stopper
    value = rec.get("val_loss") if stopper.metric == "val_loss" else \
        rec.get("train_foc_loss", math.inf)
    if stopper.metric == "mAP":
        maps = [tests[n]["mAP"] for n in hp.map_stopping_testsets if n in tests]
        value = float(np.mean(maps)) if len(maps) == len(hp.map_stopping_testsets) else None
    in_hold = st.step <= (hp.warmup_steps if hp.warmup else 0) + hp.hold_steps
    is_best = value is not None and stopper.update(epoch, value, in_hold=in_hold,
                                                   tie_loss=rec.get("val_loss"))
    if stopper.metric == "mAP" and value is not None:
        rec["smoothed_mAP"] = stopper.smoothed_map
    rec.update(best_epoch=stopper.best_checkpoint_epoch, is_best=is_best,
               early_stopping_counter=stopper.counter)
    return is_best


def _end_of_epoch(run: _Run, st: TrainState, train_means: dict, t_epoch: float) -> tuple[dict, Path | None]:
    """Validation, test sets, early stopping, checkpoint and the epoch record."""
    hp, epoch = run.hp, st.epoch
    rec: dict[str, Any] = {"epoch": epoch, "step": st.step, "lr": lr_at(max(st.step, 1), epoch, hp),
                           "epoch_s": time.time() - t_epoch, **train_means}
    is_best = run.env.is_main and _early_stopping(hp, st, epoch, rec,
                                                  _evaluate(run, st, epoch, rec))
    rec, is_best = distributed.main_decisions(rec, is_best, st.stopper, run.env)
    st.epoch, st.batch_in_epoch = epoch + 1, 0
    saved = None
    if is_best or st.stopper.should_stop or (epoch + 1) % hp.every_n_epoch_to_save == 0 \
            or st.epoch >= run.max_epochs:
        saved = run.save(st, epoch, complete=True)
    if is_best and run.env.is_main:
        write_json(run.ckpt_dir / BEST_FILE, {"epoch": epoch, "metric": st.stopper.metric,
                                              "value": st.stopper.best_checkpoint_value})
    if run.log.tb is not None:
        run.log.tb.flush()
    return run.log.record("epoch", **rec), saved


def _check_learning(run: _Run, rec: dict, warned: bool) -> bool:
    """Warn once per call when the run memorises instead of learning (:func:`memorising`) on
    the test sets of works never trained on: the mAP-stopping sets and any named *unseen*."""
    held_out = dict.fromkeys([*run.hp.map_stopping_testsets,
                              *(n for n in run.hp.testsets if "unseen" in n)])
    if warned or not (msg := memorising(read_metrics(run.run_dir, "epoch"), list(held_out))):
        return warned
    warnings.warn(msg, stacklevel=3)
    run.log.record("diagnosis", epoch=rec["epoch"], step=rec["step"], message=msg)
    return True


def _model_free_baseline(run: _Run, last: dict) -> None:
    """Once per run: the 2D-FTM mAP of each test set, recorded and printed beside the model's."""
    if read_metrics(run.run_dir, "baseline"):
        return
    try:
        scores = model_free_scores(run.hp)
    except ChlibError as e:  # a baseline must never fail a finished training
        warnings.warn(f"model-free baseline not computed: {e}", stacklevel=3)
        return
    run.log.record("baseline", method="2D-FTM", step=last["step"], scores=scores)
    if run.progress:
        for name, sc in scores.items():
            model = last.get(f"mAP/{name}")
            print(f"{name}: mAP {model:.3f} (last epoch) vs {sc['mAP']:.3f} for the model-free "
                  "2D-FTM baseline" if model is not None else f"{name}: 2D-FTM {sc['mAP']:.3f}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" \
        if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _epoch_line(rec: dict, took: float, eta: float) -> str:
    """The printed line of an epoch: losses, lr, mAPs, its time (with evaluation) and the time
    left (at most: early stopping may end sooner)."""
    shown = {k: v for k, v in rec.items()
             if k in ("train_total", "val_loss", "lr") or k.startswith("mAP/")}
    return (f"epoch {rec['epoch']}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
            + f"; {took:.1f} s, ETA {_duration(eta)}")


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


def train(run_dir: str | os.PathLike, *, hp: HParams | None = None,
          device: str | torch.device = "auto", max_epochs: int | None = None,
          progress: bool = True,
          callbacks: Sequence[Callable[[dict], Any]] | None = None) -> TrainResult:
    """Train (or resume training) the run in ``run_dir``; see the module docstring.

    ``hp``: instead of ``<run>/config/hparams.yaml`` (then written there). ``device``: "auto"
    (= ``hp.device``) or a name. ``max_epochs``: stop before this epoch index. ``callbacks``:
    called with each epoch record. Ctrl-C saves and returns with ``interrupted=True``. A second
    training of the same folder meanwhile stops at once (FolderLockedError naming this one).
    """
    run_dir = Path(run_dir)
    with distributed.session() as env, distributed.run_lock(run_dir, env, "training"):
        return _train_locked(run_dir, hp, device, max_epochs, progress, callbacks, env)


def _train_locked(run_dir: Path, hp: HParams | None, device: str | torch.device,
                  max_epochs: int | None, progress: bool,
                  callbacks: Sequence[Callable[[dict], Any]] | None, env: DistEnv) -> TrainResult:
    read_metrics(run_dir)  # a damaged log stops the run now, not after its first epoch
    if env.is_main or hp is None:  # saved (what it trained with) by rank 0; the others read
        hp = run_config(run_dir, hp, "no training config; write one with "
                        "chlib.train.loop.make_run_config(...) or pass hp=")
    hp = hp if isinstance(hp, HParams) else load_hparams(hp)
    if env.is_main:
        remove_temp_files(run_dir / "checkpoints")  # left by a killed save (we hold the lock)
    distributed.barrier(env)
    max_epochs = hp.max_epochs if max_epochs is None else int(max_epochs)
    dev = distributed.rank_device(pick_device(hp.device if device in (None, "auto") else device), env)
    progress = progress and env.is_main
    run = _Run(run_dir, hp, dev, max_epochs, progress, env)
    st, sp = run.state, run.state.stopper
    history: list[dict] = []
    interrupted, last_ckpt, t_start = False, None, time.time()
    already_stopped, warned = sp.should_stop, False
    with _deterministic(hp.deterministic, dev):
        try:
            while st.epoch < max_epochs and not sp.should_stop:
                t_epoch = time.time()
                train_means = _run_epoch(run, st)
                rec, saved = _end_of_epoch(run, st, train_means, t_epoch)
                last_ckpt = saved or last_ckpt
                history.append(rec)
                warned = _check_learning(run, rec, warned) if env.is_main else True
                if progress:
                    left = 0 if sp.should_stop else max_epochs - st.epoch
                    now = time.time()
                    print(_epoch_line(rec, now - t_epoch, (now - t_start) / len(history) * left),
                          flush=True)
                for cb in callbacks or ():
                    cb(rec)
        except KeyboardInterrupt:
            interrupted = True
            last_ckpt = run.save(st, st.epoch, complete=False, sync=not env.active)
            print(f"\ninterrupted: saved {last_ckpt} (epoch {st.epoch}, step {st.step}); "
                  "call train() again to continue")
        finally:
            if run.log.tb is not None:
                run.log.tb.close()
    if progress and sp.should_stop:
        print("early stopping had already triggered" if already_stopped else f"early stopping: "
              f"no improvement of {sp.metric} for {sp.counter} evaluations (patience {sp.patience})")
    if progress and not interrupted:
        print(f"done in {time.time() - t_start:.0f} s: {st.epoch} epochs, {st.step} steps; "
              f"best epoch {sp.best_checkpoint_epoch} ({sp.metric} {sp.best_checkpoint_value})")
    if not interrupted and history and env.is_main:
        _model_free_baseline(run, history[-1])
    return TrainResult(run_dir=run_dir, epochs_done=st.epoch, steps=st.step,
                       best_epoch=sp.best_checkpoint_epoch, best_value=sp.best_checkpoint_value,
                       best_metric=sp.metric, stopped_early=sp.should_stop,
                       interrupted=interrupted, last_checkpoint=last_ckpt, history=history)
