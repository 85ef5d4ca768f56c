"""Production training: k folds over the whole dataset, then a final full-data run.

CoverHunterMPS's ``train_prod`` (fact sheet 10.2), resumable and without its bugs. Folder:
``config/hparams.yaml``, ``state.json`` (progress, written atomically after each step),
``data/`` (``folds.json`` + per-fold manifests), ``fold_<k>/`` and ``final/`` (ordinary run
folders; the final run's best checkpoint is the product) and ``report.txt``.

Folds are grouped by source recording (tempo copies never straddle a fold), held-out recordings
removed first. Fold 1 trains from scratch; its end fixes the LR anchor and the ratio of
:func:`lr_plan`; fold ``j >= 2`` starts from the best checkpoint so far at its planned LR,
without warm-up. The final run trains on every record, validated on the held-out set.
Deviations, on purpose: early stopping per fold; the global best is the best fold under
``early_stop_metric: mAP``, else the previous fold's best; the final LR is kept between
``min_lr`` and the anchor; anchor and ratio survive a resume; a changed config or manifest under
an existing folder is an error.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

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
from chlib.train.runs import check_saved_config
from chlib.train.schedule import lr_at

__all__ = ["ProdResult", "lr_plan", "run_production", "production_rows", "report_production"]

STATE_FILE = "state.json"


def lr_plan(*, learning_rate: float, anchor: float, min_lr: float, k: int,
            final_fold_position: float | None = None) -> dict:
    """Start learning rates ``{"ratio", "folds": [fold 1, ..., fold k], "final"}``.

    Fold 1 at ``learning_rate``, fold ``j >= 2`` at ``anchor x ratio ** (j - 2)`` with
    ``ratio = (min_lr / anchor) ** (1 / (k - 1))``, the final run at position
    ``final_fold_position`` (default ``k - 0.5``) kept between ``min_lr`` and the anchor (the
    original's formula leaves that range for positions below 2 or above k + 1).
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
    hp = hp if isinstance(hp, HParams) else load_hparams(hp)
    remedy = "use a new production folder, or pass hp=None to resume with the saved config"
    if not (prod_dir / STATE_FILE).is_file() or not check_saved_config(cfg, hp, remedy):
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


def _seed_checkpoint(src_run: Path, epoch: int, dst_run: Path) -> None:
    """Copy ``src_run``'s checkpoint of ``epoch`` into ``dst_run`` as its epoch 0, not begun:
    weights and optimizer state kept; step, epoch, LR schedule and early stopping start afresh."""
    src = src_run / "checkpoints"
    dst = dst_run / "checkpoints"
    g_path, do_path = src / checkpoint_name(epoch, "g_"), src / checkpoint_name(epoch, "do_")
    if not g_path.is_file() or not do_path.is_file():
        raise ConfigError(f"{src}: checkpoint of epoch {epoch} (g_ and do_) not found; the "
                          "production state points at it. Was it deleted?")
    state = load_train_state(do_path)
    state.update(steps=0, epoch=0, early_stopping={})
    state["chlib"] = {**state.get("chlib", {}), "epoch_complete": False, "batch_in_epoch": 0,
                      "started_from": f"{src_run.name}:{epoch}"}
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
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl")
            if r.get("kind") == "epoch" and r.get("epoch") == epoch]
    return recs[-1] if recs else {}


@dataclass
class ProdResult:
    """What :func:`run_production` did: the ``state.json`` entries of the folds and the final
    run, the LR plan, the product checkpoint (the final run's best) and the report."""

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
                 f"{'complete' if self.complete else 'not complete'}",
                 *_progress_lines(self.anchor, self.ratio, self.folds, self.final)]
        if self.best_checkpoint is not None:
            lines.append(f"  product: {self.best_checkpoint}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def _sorted_folds(state: dict) -> list[dict]:
    return [state["folds"][k] for k in sorted(state["folds"], key=int)]


def _progress_lines(anchor: float | None, ratio: float | None, folds: list[dict],
                    final: dict | None) -> list[str]:
    """The LR plan and one line per fold and final run (``state.json`` entries)."""
    lines = [f"LR anchor {anchor:.3g}, ratio {ratio:.4g} per fold"] if anchor is not None else []
    for f in folds + ([dict(final, fold="final")] if final else []):
        name = "final" if f["fold"] == "final" else f"fold {f['fold']}"
        lines.append(f"  {name:<8} {f['status']:<8} start lr {f['start_lr']:.3g}  from "
                     f"{_from(f.get('init_from'))}  best epoch {f.get('best_epoch', '-')} "
                     f"({f.get('metric', '-')} {_fmt(f.get('best_value'))})")
    return lines


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


def _begin_run(prod_dir: Path, hp: HParams, run_dir: Path, what: str, init: dict | None,
               over: dict) -> None:
    """Write a fold's or the final run's config, and its starting checkpoint when ``init``."""
    if (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: has training logs but {STATE_FILE} does not list {what} "
                          f"as started; the folder and the state disagree. Delete {run_dir} to "
                          "retrain it")
    if init is not None:
        _seed_checkpoint(prod_dir / init["run"], init["epoch"], run_dir)
    save_hparams(hp.updated({**over, "max_epochs": hp.max_epochs}),
                 run_dir / "config" / "hparams.yaml")


def _start_fold(prod_dir: Path, hp: HParams, state: dict, data: dict, i: int,
                base_over: dict) -> dict:
    """Write fold ``i``'s config (and its starting checkpoint) and mark it started."""
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
                 "lr_decay": decay, "hold_steps": hold})
    _begin_run(prod_dir, hp, prod_dir / f"fold_{i}", f"fold {i}", init, over)
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
    init, held = state["global_best"], data["heldout"]
    plan = lr_plan(learning_rate=hp.learning_rate, anchor=state["anchor"], min_lr=hp.min_lr,
                   k=hp.k_folds, final_fold_position=hp.final_fold_position)
    over = {**base_over, "train_path": str(prod_dir / "data" / "full_train.txt"),
            "val_path": None if held is None else str(held), "learning_rate": plan["final"],
            "lr_decay": hp.final_lr_decay, "hold_steps": hp.fold_hold_steps, "warmup": False,
            "early_stopping_patience": hp.final_early_stopping_patience}
    _begin_run(prod_dir, hp, prod_dir / "final", "the final run", init, over)
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

    ``hp``: the production config (HParams or YAML; None: the saved one). ``dataset_dir``: its
    ``full.txt`` and ``test.txt`` are the whole dataset and the held-out set unless
    ``full_manifest`` / ``heldout_manifest`` say otherwise (without either: ``hp.train_path`` /
    ``hp.test_path``). ``keep_checkpoints``: ``"best"`` (a finished fold keeps its best epoch)
    or ``"all"``. ``on_event(name, info)``: at ``fold_start``, ``fold_done``, ``folds_done``,
    ``final_start``, ``final_done``. ``complete`` is False if a run was interrupted.
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
    folds, fin = _sorted_folds(state), state.get("final")
    best = None
    if fin and fin.get("status") == "done" and fin.get("best_epoch") is not None:
        best = prod_dir / "final" / "checkpoints" / checkpoint_name(fin["best_epoch"])
    report = report_production(prod_dir) if complete else ""
    return ProdResult(prod_dir=prod_dir, folds=folds, final=fin, anchor=state.get("anchor"),
                      ratio=state.get("ratio"), best_checkpoint=best, complete=complete,
                      notes=notes, report=report)


def _runs_of(prod_dir: Path) -> list[tuple[str, Path]]:
    folds = sorted((p for p in prod_dir.glob("fold_*") if p.is_dir()
                    and p.name.split("_")[-1].isdigit()), key=lambda p: int(p.name.split("_")[-1]))
    runs = [(p.name, p) for p in folds]
    if (prod_dir / "final").is_dir():
        runs.append(("final", prod_dir / "final"))
    return runs


def production_rows(prod_dir: str | os.PathLike) -> list[dict]:
    """One row per (run, epoch) with test-set mAPs: ``{"run", "epoch", "mAP": {testset: value},
    "elapsed_s", "average"}``; ``average`` only when every test set seen in the folder has a
    value at that epoch; elapsed from the first record of the first run; last record wins."""
    runs = [(name, read_jsonl(run_dir / "metrics.jsonl")) for name, run_dir in _runs_of(Path(prod_dir))]
    times = [float(r["time"]) for _, recs in runs for r in recs if r.get("time") is not None]
    tests = pd.DataFrame([
        {"run": name, "epoch": int(r["epoch"]), "testset": str(r["testset"]),
         "mAP": float(r["mAP"]), "time": r.get("time")}
        for name, recs in runs for r in recs
        if r.get("kind") == "test" and r.get("testset") is not None and r.get("mAP") is not None])
    if tests.empty:
        return []
    tests["run"] = pd.Categorical(tests["run"], categories=[n for n, _ in runs], ordered=True)
    tests["time"] = pd.to_numeric(tests["time"])
    maps = tests.pivot_table(index=["run", "epoch"], columns="testset", values="mAP",
                             aggfunc="last", observed=True)
    last_time = tests.groupby(["run", "epoch"], observed=True)["time"].last()
    rows = []
    for (run, epoch), m in maps.iterrows():
        m, t = m.dropna(), last_time[(run, epoch)]
        rows.append({"run": run, "epoch": int(epoch), "mAP": m.to_dict(),
                     "elapsed_s": None if pd.isna(t) else float(t) - min(times),
                     "average": float(m.mean()) if len(m) == maps.shape[1] else None})
    return rows


def _from(init: dict | None) -> str:
    return "scratch" if not init else f"{init['run']}:{init['epoch']}"


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def report_production(prod_dir: str | os.PathLike, *, top: int = 3) -> str:
    """The original's ``report_prod_logs`` from the metrics files: the folds' progress, the
    ``top`` epochs per test set and by average mAP, and the per-set detail of the best average."""
    prod_dir = Path(prod_dir)
    rows = production_rows(prod_dir)
    lines = [f"production report: {prod_dir}"]
    if (prod_dir / STATE_FILE).is_file():
        state = read_json(prod_dir / STATE_FILE)
        lines += _progress_lines(state.get("anchor"), state.get("ratio"), _sorted_folds(state),
                                 state.get("final"))
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
