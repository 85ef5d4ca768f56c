"""Production training: k folds over the whole dataset, then a final full-data run.

CoverHunterMPS's ``train_prod`` (fact sheet 10.2), resumable and without its bugs. Files::

    <prod_dir>/config/hparams.yaml      the production config, as given
    <prod_dir>/state.json               progress marker, written atomically after each step
    <prod_dir>/data/folds.json          the k folds (record indices) + the manifests' hashes
    <prod_dir>/data/fold_<k>_{train,val}.txt, full_train.txt   per-fold / final-run records
    <prod_dir>/fold_<k>/, final/        ordinary training run folders (the final run's best
                                        checkpoint is the product)
    <prod_dir>/report.txt               :func:`report_production`

Procedure: folds from :func:`chlib.data.splits.kfold_groups` (stratified by work, grouped by
source recording, so tempo copies never straddle a fold; held-out recordings removed first).
Fold 1 trains from scratch at ``learning_rate``. When it ends the LR anchor is fixed
(``lr_initial_fold2``, else the LR at fold 1's best checkpoint if above ``min_lr``, else
``learning_rate``) and ``ratio = (min_lr / anchor) ** (1 / (k - 1))``; fold ``j >= 2`` starts at
``anchor x ratio ** (j - 2)`` with ``fold_lr_decay``, ``fold_hold_steps`` and no warm-up, from
the weights and optimizer state of the best checkpoint so far, copied in as its epoch 0 (its
step, epoch and LR schedule start afresh). The final run trains on every record, validated on
the held-out set, from the global best at the LR of :func:`lr_plan` (``final_fold_position``,
default ``k - 0.5``), with ``final_lr_decay`` and ``final_early_stopping_patience``.

Deviations from the original, on purpose: early stopping starts afresh per fold (a fold's best
is measured on its own validation set); the global best is the best fold with
``early_stop_metric: mAP`` (comparable across folds), else the previous fold's best; checkpoints
stay in each fold's folder (``keep_checkpoints="best"`` keeps a finished fold's best epoch);
``max_epochs`` is per fold; the final LR is kept between ``min_lr`` and the anchor; test sets
come from ``hp``; anchor and ratio are stored in ``state.json`` (the original lost the ratio on
resume); resumable at every point, and a changed config or manifest under an existing folder is
an error; ``foc.output_dims: auto`` is resolved once over every record. Caveat (the original's
too): after fold 1 a fold's validation records were trained on earlier, so later validation
losses are optimistic; mAP on external test sets does not have this problem.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chlib.core.config import HParams, load_hparams, save_hparams
from chlib.core.errors import ConfigError, ManifestError
from chlib.core.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    read_json,
    read_jsonl,
    write_json,
)
from chlib.core.manifest import FULL_KEYS, read_manifest, resolve_path, source_perf, write_manifest
from chlib.data.splits import kfold_groups
from chlib.model.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_train_state,
    read_best_epoch,
)
from chlib.train.loop import TrainResult, train
from chlib.train.schedule import lr_at

__all__ = [
    "ProdResult",
    "lr_plan",
    "run_production",
    "production_rows",
    "report_production",
]

STATE_FILE = "state.json"


# --------------------------------------------------------------------------------------------
# learning-rate plan


def lr_plan(*, learning_rate: float, anchor: float, min_lr: float, k: int,
            final_fold_position: float | None = None) -> dict:
    """Start learning rates of the folds and the final run (fact sheet 10.2).

    Returns ``{"ratio", "folds": [lr of fold 1, ..., fold k], "final"}``: fold 1 at
    ``learning_rate``, fold ``j >= 2`` at ``anchor x ratio ** (j - 2)`` with
    ``ratio = (min_lr / anchor) ** (1 / (k - 1))``, the final run at
    ``anchor x ratio ** (final_fold_position - 2)`` (default position ``k - 0.5``), kept
    between ``min_lr`` and the anchor: the original's formula extrapolates *above* the anchor
    for positions below 2 (k = 2 with the default position 1.5 gives 6x the anchor for
    ``min_lr / anchor = 1/36``) and below ``min_lr`` for positions above k + 1.
    """
    if k < 2:
        raise ConfigError(f"k_folds must be >= 2, got {k}")
    if not (anchor > 0 and min_lr > 0):
        raise ConfigError(
            f"production LR plan: anchor ({anchor}) and min_lr ({min_lr}) must be > 0 (the fold "
            "learning rates descend log-linearly from the anchor toward min_lr); set min_lr > 0"
        )
    ratio = (min_lr / anchor) ** (1.0 / (k - 1))
    pos = k - 0.5 if final_fold_position is None else float(final_fold_position)
    final = anchor * ratio ** (pos - 2)
    lo, hi = sorted((min_lr, anchor))
    return {"ratio": ratio,
            "folds": [learning_rate] + [anchor * ratio ** (j - 2) for j in range(2, k + 1)],
            "final": min(max(final, lo), hi)}


# --------------------------------------------------------------------------------------------
# state and data


def _load_state(prod_dir: Path) -> dict:
    path = prod_dir / STATE_FILE
    if path.is_file():
        return read_json(path)
    return {"version": 1, "folds": {}, "anchor": None, "ratio": None, "global_best": None,
            "final": None}


def _save_state(prod_dir: Path, state: dict) -> None:
    write_json(prod_dir / STATE_FILE, state)


def _resolve_hp(prod_dir: Path, hp: HParams | str | os.PathLike | None) -> HParams:
    cfg = prod_dir / "config" / "hparams.yaml"
    if hp is None:
        if not cfg.is_file():
            raise ConfigError(f"{cfg}: no production config; pass hp= (an HParams or a YAML path)")
        return load_hparams(cfg)
    if not isinstance(hp, HParams):
        hp = load_hparams(hp)
    if cfg.is_file() and (prod_dir / STATE_FILE).is_file():
        old = load_hparams(cfg).to_dict()
        new = hp.to_dict()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                f"{cfg}: this production run was started with other settings (differing: "
                f"{', '.join(diff)}); use a new production folder, or pass hp=None to resume "
                "with the saved config"
            )
        return hp
    save_hparams(hp, cfg)
    return hp


def _manifests(hp: HParams, dataset_dir: str | os.PathLike | None,
               full_manifest: str | os.PathLike | None,
               heldout_manifest: str | os.PathLike | None) -> tuple[Path, Path | None]:
    ds = Path(dataset_dir) if dataset_dir is not None else None
    full = Path(full_manifest) if full_manifest is not None else (
        ds / "full.txt" if ds is not None else (Path(hp.train_path) if hp.train_path else None))
    if full is None or not full.is_file():
        raise ConfigError(f"production training needs the whole dataset's manifest: pass "
                          f"dataset_dir= (uses its full.txt) or full_manifest= (got {full})")
    held = Path(heldout_manifest) if heldout_manifest is not None else (
        ds / "test.txt" if ds is not None and (ds / "test.txt").is_file() else (
            Path(hp.test_path) if hp.test_path else None))
    if held is not None and not held.is_file():
        raise ConfigError(f"{held}: held-out manifest not found")
    if held is None and hp.early_stop_metric != "mAP":
        raise ConfigError(
            "production training with early_stop_metric: val_loss needs a held-out set to "
            "validate the final run: pass heldout_manifest= (or a dataset_dir with test.txt)")
    return full, held


def _prepare_data(prod_dir: Path, hp: HParams, full: Path, held: Path | None) -> dict:
    """Write (once) the folds and the per-fold manifests; returns the data description."""
    data_dir = prod_dir / "data"
    records = read_manifest(full, FULL_KEYS)
    held_recs = read_manifest(held, FULL_KEYS) if held is not None else []
    ids: dict[str, int] = {}
    for r in records + held_recs:
        if ids.setdefault(r["work"], int(r["work_id"])) != int(r["work_id"]):
            raise ManifestError(
                f"work {r['work']!r} has work_id {ids[r['work']]} in one manifest and "
                f"{r['work_id']} in another ({full}, {held}); both must use the same work_id.map")
    held_sources = {source_perf(r) for r in held_recs}
    # fold manifests live in <prod_dir>/data: feature paths must not depend on the manifest's folder
    kept = [dict(r, feat=os.path.abspath(resolve_path(r["feat"], full)))
            for r in records if source_perf(r) not in held_sources]
    removed = len(records) - len(kept)
    if not kept:
        raise ConfigError(f"{full}: no records left after removing the held-out recordings")

    folds_path = data_dir / "folds.json"
    sha = file_sha256(full)
    held_sha = None if held is None else file_sha256(held)
    if folds_path.is_file():
        info = read_json(folds_path)
        if (info["manifest_sha256"], info.get("heldout_sha256"), info["k"]) != (
                sha, held_sha, hp.k_folds):
            raise ConfigError(
                f"{folds_path}: the folds were drawn from another manifest, held-out set or k "
                f"({info['manifest']}, {info.get('heldout')}, k={info['k']}); use a new "
                "production folder for changed data")
        folds = info["folds"]
    else:
        folds = kfold_groups(kept, hp.k_folds, seed=hp.seed)
        if any(len(f) == 0 for f in folds):
            raise ConfigError(f"{full}: {len(kept)} recordings are too few for {hp.k_folds} folds "
                              "(a fold would be empty); lower k_folds")
        for i, fold in enumerate(folds, start=1):
            in_val = set(fold)
            write_manifest(data_dir / f"fold_{i}_train.txt",
                           [r for j, r in enumerate(kept) if j not in in_val])
            write_manifest(data_dir / f"fold_{i}_val.txt", [kept[j] for j in fold])
        write_manifest(data_dir / "full_train.txt", kept)
        write_json(folds_path, {"manifest": str(full), "manifest_sha256": sha, "k": hp.k_folds,
                                "seed": hp.seed, "heldout": None if held is None else str(held),
                                "heldout_sha256": held_sha,
                                "removed_heldout_records": removed,
                                "n_records": len(kept), "folds": folds})
    max_id = max(int(r["work_id"]) for r in records + held_recs)
    return {"folds": folds, "n_records": len(kept), "removed": removed, "num_classes": max_id + 1,
            "heldout": held}


# --------------------------------------------------------------------------------------------
# starting a run from another run's checkpoint


def _seed_checkpoint(src_run: Path, epoch: int, dst_run: Path) -> None:
    """Copy ``src_run``'s checkpoint of ``epoch`` into ``dst_run`` as its epoch 0, not begun.

    The weights and the optimizer state are kept; the new run starts at epoch 0, batch 0, step 0
    (so its learning-rate schedule, in steps or epochs, starts at its own ``learning_rate``) with
    an empty early-stopping state (its bests are its own). The first epoch's checkpoint replaces
    the copy. Relies on the ``do_`` layout of :mod:`chlib.train.loop` (``steps``, ``epoch``,
    ``early_stopping``, ``chlib.epoch_complete``, ``chlib.batch_in_epoch``).
    """
    src = src_run / "checkpoints"
    dst = dst_run / "checkpoints"
    g_path, do_path = src / checkpoint_name(epoch, "g_"), src / checkpoint_name(epoch, "do_")
    if not g_path.is_file() or not do_path.is_file():
        raise ConfigError(f"{src}: checkpoint of epoch {epoch} (g_ and do_) not found; the "
                          "production state points at it. Was it deleted?")
    state = load_train_state(do_path)
    state.update(steps=0, epoch=0, early_stopping={})
    extra = dict(state.get("chlib", {}))
    extra.update(epoch_complete=False, batch_in_epoch=0, started_from=f"{src_run.name}:{epoch}")
    state["chlib"] = extra
    atomic_torch_save(dst / checkpoint_name(0, "do_"), state)
    atomic_write_bytes(dst / checkpoint_name(0, "g_"), g_path.read_bytes())


def _prune(run_dir: Path, keep: set[int]) -> None:
    """Delete the g_/do_ files of ``run_dir`` except the epochs in ``keep``."""
    ckpt = run_dir / "checkpoints"
    for prefix in ("g_", "do_"):
        for epoch, path in list_checkpoints(ckpt, prefix).items():
            if epoch not in keep:
                path.unlink(missing_ok=True)


def _best_of(run_dir: Path) -> tuple[int | None, float | None, str | None]:
    ckpt = run_dir / "checkpoints"
    epoch = read_best_epoch(ckpt)
    if epoch is None:
        last = max(list_checkpoints(ckpt), default=None)
        return last, None, None
    info = read_json(ckpt / "best.json")
    return epoch, info.get("value"), info.get("metric")


def _epoch_record(run_dir: Path, epoch: int | None) -> dict:
    out: dict = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r.get("kind") == "epoch" and r.get("epoch") == epoch:
            out = r
    return out


# --------------------------------------------------------------------------------------------
# the procedure


@dataclass
class ProdResult:
    """What :func:`run_production` did (or found done): per fold and final run (dicts from
    ``state.json``: status, start_lr, init_from, best_epoch, best_value, metric, last_epoch ...),
    the LR anchor and ratio, the product checkpoint (the final run's best) and the report."""

    prod_dir: Path
    folds: list[dict]
    final: dict | None
    anchor: float | None
    ratio: float | None
    best_checkpoint: Path | None
    complete: bool
    notes: list[str] = field(default_factory=list)
    report: str = ""

    def summary(self) -> str:
        lines = [f"production folder {self.prod_dir}: "
                 f"{'complete' if self.complete else 'not complete'}"]
        if self.anchor is not None:
            lines.append(f"  LR anchor {self.anchor:.3g}, ratio {self.ratio:.4g} per fold")
        for f in self.folds:
            lines.append(f"  fold {f['fold']}: {f['status']}, start lr {f['start_lr']:.3g}, "
                         f"epochs 0..{f.get('last_epoch', '?')}, best epoch "
                         f"{f.get('best_epoch')} ({f.get('metric')} {_fmt(f.get('best_value'))})")
        if self.final:
            f = self.final
            lines.append(f"  final: {f['status']}, start lr {f['start_lr']:.3g}, best epoch "
                         f"{f.get('best_epoch')} ({f.get('metric')} {_fmt(f.get('best_value'))})")
        if self.best_checkpoint is not None:
            lines.append(f"  product: {self.best_checkpoint}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def _lr_of_checkpoint(run_dir: Path, epoch: int, hp: HParams) -> float:
    """Learning rate of the last update before ``run_dir``'s checkpoint of ``epoch``."""
    state = load_train_state(run_dir / "checkpoints" / checkpoint_name(epoch, "do_"))
    return lr_at(max(int(state.get("steps", 1)), 1), epoch, hp)


def _finish(run_dir: Path, hp: HParams, result: TrainResult, info: dict, *,
            required: bool) -> None:
    """Record a finished fold or final run in its ``state.json`` entry ``info``."""
    best_epoch, best_value, metric = _best_of(run_dir)
    if best_epoch is None and required:
        raise ConfigError(f"{run_dir}: the run finished without a checkpoint; check "
                          "max_epochs and every_n_epoch_to_save")
    info.update(status="done", best_epoch=best_epoch, best_value=best_value,
                metric=metric or hp.early_stop_metric, last_epoch=result.epochs_done - 1,
                stopped_early=result.stopped_early, finished_at=time.time(),
                best_record=_epoch_record(run_dir, best_epoch))


def _check_fresh(run_dir: Path, what: str) -> None:
    if (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: has training logs but {STATE_FILE} does not list {what} "
                          f"as started; the folder and the state disagree. Delete {run_dir} to "
                          "retrain it")


def _start_fold(prod_dir: Path, hp: HParams, state: dict, data: dict, i: int,
                base_over: dict) -> dict:
    """Write fold ``i``'s config (and its starting checkpoint) and mark it started."""
    fold_dir = prod_dir / f"fold_{i}"
    _check_fresh(fold_dir, f"fold {i}")
    init = state.get("global_best") if i > 1 else None
    over = dict(base_over)
    if i == 1:
        start_lr, decay, hold = hp.learning_rate, hp.lr_decay, 0
    else:  # the fold starts at its LR directly: no second warm-up
        start_lr = state["anchor"] * state["ratio"] ** (i - 2)
        decay, hold = hp.fold_lr_decay, hp.fold_hold_steps
        over["warmup"] = False
    data_dir = prod_dir / "data"
    over.update({"train_path": str(data_dir / f"fold_{i}_train.txt"),
                 "val_path": str(data_dir / f"fold_{i}_val.txt"), "learning_rate": start_lr,
                 "lr_decay": decay, "hold_steps": hold, "max_epochs": hp.max_epochs})
    if init is not None:
        _seed_checkpoint(prod_dir / init["run"], init["epoch"], fold_dir)
    save_hparams(hp.updated(over), fold_dir / "config" / "hparams.yaml")
    n_val = len(data["folds"][i - 1])
    fs = {"fold": i, "status": "started", "start_lr": start_lr, "init_from": init,
          "lr_decay": decay, "hold_steps": hold, "n_train": data["n_records"] - n_val,
          "n_val": n_val, "started_at": time.time()}
    state["folds"][str(i)] = fs
    _save_state(prod_dir, state)
    return fs


def _fold_done(prod_dir: Path, hp: HParams, state: dict, i: int, fs: dict) -> None:
    """After fold ``i``: fix the LR anchor (fold 1) and update the global best."""
    fold_dir = prod_dir / f"fold_{i}"
    if i == 1 and state.get("anchor") is None:
        anchor = hp.lr_initial_fold2
        if anchor is None:
            fold_hp = load_hparams(fold_dir / "config" / "hparams.yaml")
            at_best = _lr_of_checkpoint(fold_dir, fs["best_epoch"], fold_hp)
            anchor = at_best if at_best > hp.min_lr else hp.learning_rate
        plan = lr_plan(learning_rate=hp.learning_rate, anchor=anchor, min_lr=hp.min_lr,
                       k=hp.k_folds, final_fold_position=hp.final_fold_position)
        state["anchor"], state["ratio"] = anchor, plan["ratio"]
    gb, value = state.get("global_best"), fs["best_value"]
    if hp.early_stop_metric == "mAP" and fs["metric"] == "mAP" and gb is not None \
            and gb.get("metric") == "mAP" and value is not None \
            and gb.get("value") is not None and value <= gb["value"]:
        fs["improved_global"] = False  # keep the earlier fold's checkpoint as the start
    else:
        state["global_best"] = {"run": fold_dir.name, "epoch": fs["best_epoch"], "value": value,
                                "metric": fs["metric"]}
        fs["improved_global"] = True
    _save_state(prod_dir, state)


def _start_final(prod_dir: Path, hp: HParams, state: dict, data: dict, base_over: dict) -> dict:
    """Write the final run's config and starting checkpoint (the global best); mark it started."""
    final_dir = prod_dir / "final"
    _check_fresh(final_dir, "the final run")
    init, held = state["global_best"], data["heldout"]
    plan = lr_plan(learning_rate=hp.learning_rate, anchor=state["anchor"], min_lr=hp.min_lr,
                   k=hp.k_folds, final_fold_position=hp.final_fold_position)
    over = {**base_over, "train_path": str(prod_dir / "data" / "full_train.txt"),
            "val_path": None if held is None else str(held), "learning_rate": plan["final"],
            "lr_decay": hp.final_lr_decay, "hold_steps": hp.fold_hold_steps, "warmup": False,
            "early_stopping_patience": hp.final_early_stopping_patience,
            "max_epochs": hp.max_epochs}
    _seed_checkpoint(prod_dir / init["run"], init["epoch"], final_dir)
    save_hparams(hp.updated(over), final_dir / "config" / "hparams.yaml")
    fin = {"status": "started", "start_lr": plan["final"], "init_from": init,
           "n_train": data["n_records"], "started_at": time.time()}
    state["final"] = fin
    _save_state(prod_dir, state)
    return fin


def run_production(
    prod_dir: str | os.PathLike,
    *,
    hp: HParams | str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    full_manifest: str | os.PathLike | None = None,
    heldout_manifest: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    keep_checkpoints: str = "best",
    callbacks: Sequence[Callable[[dict], Any]] | None = None,
    on_event: Callable[[str, dict], Any] | None = None,
) -> ProdResult:
    """Run (or resume) k-fold production training in ``prod_dir``; see the module docstring.

    ``hp``: the production config (HParams or YAML; keys ``k_folds``, ``fold_lr_decay``,
    ``final_lr_decay``, ``fold_hold_steps``, ``final_fold_position``,
    ``final_early_stopping_patience``, ``lr_initial_fold2`` + the training keys); None: the one
    saved in ``<prod_dir>/config/hparams.yaml``. ``dataset_dir``: its ``full.txt`` is the whole
    dataset and ``test.txt`` the held-out set unless ``full_manifest`` / ``heldout_manifest``
    say otherwise (without either: ``hp.train_path`` / ``hp.test_path``). ``keep_checkpoints``:
    ``"best"`` (a finished fold keeps its best epoch) or ``"all"``. ``callbacks`` go to
    :func:`chlib.train.loop.train`; ``on_event(name, info)`` is called at ``fold_start``,
    ``fold_done``, ``folds_done``, ``final_start``, ``final_done`` (after the state is saved).
    Returns a :class:`ProdResult`; ``complete`` is False if a run was interrupted (Ctrl-C).
    """
    if keep_checkpoints not in ("best", "all"):
        raise ConfigError(f"keep_checkpoints must be 'best' or 'all', got {keep_checkpoints!r}")
    prod_dir = Path(prod_dir)
    hp = _resolve_hp(prod_dir, hp)
    data = _prepare_data(prod_dir, hp, *_manifests(hp, dataset_dir, full_manifest, heldout_manifest))
    state = _load_state(prod_dir)
    state.setdefault("k", hp.k_folds)
    notes = [f"{data['removed']} record(s) of held-out recordings were left out of the fold "
             "data"] if data["removed"] else []
    base_over: dict = {"test_path": None}
    if hp.num_classes_auto:
        base_over["foc"] = {"output_dims": data["num_classes"]}
    emit = on_event or (lambda name, info: None)

    for i in range(1, hp.k_folds + 1):
        fold_dir, fs = prod_dir / f"fold_{i}", state["folds"].get(str(i))
        if fs is None:
            fs = _start_fold(prod_dir, hp, state, data, i, base_over)
            emit("fold_start", dict(fs))
        elif fs["status"] == "done":
            if keep_checkpoints == "best":  # idempotent: a kill may have come before the pruning
                _prune(fold_dir, {fs["best_epoch"]})
            continue
        result = train(fold_dir, device=device, progress=progress, callbacks=callbacks)
        if result.interrupted:
            return _result(prod_dir, state, notes, complete=False)
        _finish(fold_dir, hp, result, fs, required=True)
        _fold_done(prod_dir, hp, state, i, fs)
        if keep_checkpoints == "best":
            _prune(fold_dir, {fs["best_epoch"]})
        emit("fold_done", dict(fs))
    emit("folds_done", {"global_best": state["global_best"], "anchor": state["anchor"],
                        "ratio": state["ratio"]})

    fin = state.get("final")  # the final run on everything, validated on the held-out set
    if fin is None or fin["status"] != "done":
        if fin is None:
            fin = _start_final(prod_dir, hp, state, data, base_over)
            emit("final_start", dict(fin))
        result = train(prod_dir / "final", device=device, progress=progress, callbacks=callbacks)
        if result.interrupted:
            return _result(prod_dir, state, notes, complete=False)
        _finish(prod_dir / "final", hp, result, fin, required=False)
        _save_state(prod_dir, state)
        emit("final_done", dict(fin))
    out = _result(prod_dir, state, notes, complete=True)
    atomic_write_text(prod_dir / "report.txt", out.report + "\n")
    return out


def _result(prod_dir: Path, state: dict, notes: list[str], *, complete: bool) -> ProdResult:
    folds = [state["folds"][k] for k in sorted(state["folds"], key=int)]
    fin = state.get("final")
    best = None
    if fin and fin.get("status") == "done" and fin.get("best_epoch") is not None:
        best = prod_dir / "final" / "checkpoints" / checkpoint_name(fin["best_epoch"])
    report = report_production(prod_dir) if complete else ""
    return ProdResult(prod_dir=prod_dir, folds=folds, final=fin, anchor=state.get("anchor"),
                      ratio=state.get("ratio"), best_checkpoint=best, complete=complete,
                      notes=notes, report=report)


# --------------------------------------------------------------------------------------------
# report (the original's report_prod_logs, from metrics.jsonl)


def _runs_of(prod_dir: Path) -> list[tuple[str, Path]]:
    folds = sorted((p for p in prod_dir.glob("fold_*") if p.is_dir()
                    and p.name.split("_")[-1].isdigit()), key=lambda p: int(p.name.split("_")[-1]))
    runs = [(p.name, p) for p in folds]
    if (prod_dir / "final").is_dir():
        runs.append(("final", prod_dir / "final"))
    return runs


def production_rows(prod_dir: str | os.PathLike) -> list[dict]:
    """One row per (run, epoch) with test-set mAPs: ``{"run", "epoch", "elapsed_s", "mAP":
    {testset: value}, "average"}`` (``average`` only when every test set seen in the production
    folder has a value at that epoch). Elapsed time counts from the first record of the first run.
    When an epoch was logged twice (a resume), the last record wins."""
    prod_dir = Path(prod_dir)
    per_run: list[tuple[str, dict[int, dict]]] = []
    sets: set[str] = set()
    t0 = math.inf
    for name, run_dir in _runs_of(prod_dir):
        by_epoch: dict[int, dict] = {}
        for r in read_jsonl(run_dir / "metrics.jsonl"):
            if r.get("time") is not None:
                t0 = min(t0, float(r["time"]))
            if r.get("kind") == "test" and r.get("testset") is not None and r.get("mAP") is not None:
                e = by_epoch.setdefault(int(r["epoch"]), {"mAP": {}, "time": None})
                e["mAP"][str(r["testset"])] = float(r["mAP"])
                e["time"] = float(r["time"]) if r.get("time") is not None else e["time"]
                sets.add(str(r["testset"]))
        per_run.append((name, by_epoch))
    rows = []
    for name, by_epoch in per_run:
        for epoch in sorted(by_epoch):
            e = by_epoch[epoch]
            row = {"run": name, "epoch": epoch, "mAP": dict(sorted(e["mAP"].items())),
                   "elapsed_s": (e["time"] - t0) if e["time"] is not None and math.isfinite(t0)
                   else None, "average": None}
            if sets and set(e["mAP"]) == sets:
                row["average"] = sum(e["mAP"].values()) / len(sets)
            rows.append(row)
    return rows


def _from(init: dict | None) -> str:
    return "scratch" if not init else f"{init['run']}:{init['epoch']}"


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def report_production(prod_dir: str | os.PathLike, *, top: int = 3) -> str:
    """The original's ``report_prod_logs`` from our metrics files: for each test set the
    ``top`` (run, epoch, mAP, elapsed) rows; the ``top`` (run, epoch) by the average mAP over all
    test sets (epochs where every set has a value); the per-set detail of the best average; plus
    the folds' progress from ``state.json``. Test sets are whatever the runs logged."""
    prod_dir = Path(prod_dir)
    rows = production_rows(prod_dir)
    lines = [f"production report: {prod_dir}"]
    if (prod_dir / STATE_FILE).is_file():
        state = read_json(prod_dir / STATE_FILE)
        if state.get("anchor") is not None:
            lines.append(f"LR anchor {state['anchor']:.3g}, ratio {state['ratio']:.4g}")
        for f in [state["folds"][k] for k in sorted(state["folds"], key=int)] + (
                [dict(state["final"], fold="final")] if state.get("final") else []):
            lines.append(f"  {'fold ' + str(f['fold']) if f['fold'] != 'final' else 'final':<8} "
                         f"{f['status']:<8} start lr {f['start_lr']:.3g}  from "
                         f"{_from(f.get('init_from'))}  best epoch {f.get('best_epoch', '-')} "
                         f"({f.get('metric', '-')} {_fmt(f.get('best_value'))})")
    sets = sorted({s for r in rows for s in r["mAP"]})
    if not sets:
        lines.append("no test-set mAP logged yet")
        return "\n".join(lines)
    for s in sets:
        ranked = sorted((r for r in rows if s in r["mAP"]), key=lambda r: -r["mAP"][s])[:top]
        lines.append(f"\ntop {top} epochs for test set {s!r}:")
        lines += [f"  {r['run']:<8} epoch {r['epoch']:>4}  mAP {r['mAP'][s]:.4f}  "
                  f"elapsed {_hms(r['elapsed_s'])}" for r in ranked]
    avg = sorted((r for r in rows if r["average"] is not None), key=lambda r: -r["average"])
    lines.append(f"\ntop {top} epochs by average mAP over {', '.join(sets)}:")
    lines += [f"  {r['run']:<8} epoch {r['epoch']:>4}  average {r['average']:.4f}  "
              f"elapsed {_hms(r['elapsed_s'])}" for r in avg[:top]]
    if avg:
        b = avg[0]
        lines.append(f"\nbest average: {b['run']} epoch {b['epoch']}: " +
                     ", ".join(f"{s} {v:.4f}" for s, v in b["mAP"].items()))
    return "\n".join(lines)
