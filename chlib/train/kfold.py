"""Production training: k folds over the whole dataset, then a final full-data run.

CoverHunterMPS's ``train_prod`` (fact sheet 10.2), resumable and without its bugs. Folder:
``config/hparams.yaml``, ``state.json`` (progress, written atomically after each step),
``data/`` (``folds.json`` + fold manifests), ``fold_<k>/`` and ``final/`` (run folders; the
final run's best checkpoint is the product) and ``report.txt``. Folds are grouped by source
recording, held-out recordings removed first. Fold 1 trains from scratch and fixes the LR plan
(:func:`lr_plan`); fold ``j >= 2`` starts from the global best checkpoint (the best fold under
``early_stop_metric: mAP``, else the previous fold) at its planned LR without warm-up; the final
run trains on every record, validated on the held-out set.
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
from chlib.core.schema import check
from chlib.data.splits import kfold_groups
from chlib.model.checkpoint import checkpoint_name, list_checkpoints, load_train_state
from chlib.train.loop import train
from chlib.train.runs import read_metrics, run_config
from chlib.train.schedule import lr_at

__all__ = ["ProdResult", "lr_plan", "run_production", "production_rows", "report_production"]

STATE_FILE = "state.json"


def lr_plan(*, learning_rate: float, anchor: float, min_lr: float, k: int,
            final_fold_position: float | None = None) -> dict:
    """Start learning rates ``{"ratio", "folds": [fold 1, ..., fold k], "final"}``: fold 1 at
    ``learning_rate``, fold ``j >= 2`` at ``anchor x ratio ** (j - 2)`` with ``ratio = (min_lr /
    anchor) ** (1 / (k - 1))``, the final run at ``final_fold_position`` (default ``k - 0.5``),
    kept between ``min_lr`` and the anchor (unlike the original)."""
    if k < 2:
        raise ConfigError(f"k_folds must be >= 2, got {k}")
    check(anchor > 0 and min_lr > 0, "production LR plan", f"anchor ({anchor}) and min_lr "
          f"({min_lr}) must be > 0 (the fold learning rates descend log-linearly from the anchor "
          "toward min_lr); set min_lr > 0")
    ratio = (min_lr / anchor) ** (1.0 / (k - 1))
    pos = k - 0.5 if final_fold_position is None else float(final_fold_position)
    final = anchor * ratio ** (pos - 2)
    lo, hi = sorted((min_lr, anchor))
    return {"ratio": ratio,
            "folds": [learning_rate] + [anchor * ratio ** (j - 2) for j in range(2, k + 1)],
            "final": min(max(final, lo), hi)}


def _manifests(hp: HParams, dataset_dir: str | os.PathLike | None,
               full_manifest: str | os.PathLike | None,
               heldout_manifest: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """The whole dataset's and the held-out manifest: given, else the dataset's, else hp's."""
    ds = Path(dataset_dir) if dataset_dir is not None else None
    held_ds = ds / "test.txt" if ds is not None and (ds / "test.txt").is_file() else None
    full = full_manifest or (ds and ds / "full.txt") or hp.train_path
    held = heldout_manifest or held_ds or hp.test_path
    full, held = Path(full) if full else None, Path(held) if held else None
    if full is None or not full.is_file():
        raise ConfigError(f"production training needs the whole dataset's manifest: pass "
                          f"dataset_dir= (uses its full.txt) or full_manifest= (got {full})")
    check(held is None or held.is_file(), str(held), "held-out manifest not found")
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
    check(bool(kept), str(full), "no records left after removing the held-out recordings")
    folds_path = data_dir / "folds.json"
    sha, held_sha = file_sha256(full), None if held is None else file_sha256(held)
    if folds_path.is_file():
        info = read_json(folds_path)
        same = (info["manifest_sha256"], info.get("heldout_sha256"), info["k"]) == (
            sha, held_sha, hp.k_folds)
        check(same, str(folds_path), f"the folds were drawn from another manifest, held-out set "
              f"or k ({info['manifest']}, {info.get('heldout')}, k={info['k']}); use a new "
              "production folder for changed data")
        folds = info["folds"]
    else:
        folds = kfold_groups(kept, hp.k_folds, seed=hp.seed)
        check(all(folds), str(full), f"{len(kept)} recordings are too few for {hp.k_folds} "
              "folds (a fold would be empty); lower k_folds")
        for i, fold in enumerate(folds, start=1):
            in_val = set(fold)
            write_manifest(data_dir / f"fold_{i}_train.txt",
                           [r for j, r in enumerate(kept) if j not in in_val])
            write_manifest(data_dir / f"fold_{i}_val.txt", [kept[j] for j in fold])
        write_manifest(data_dir / "full_train.txt", kept)
        write_json(folds_path, {"manifest": str(full), "manifest_sha256": sha, "k": hp.k_folds,
                                "seed": hp.seed, "heldout": None if held is None else str(held),
                                "heldout_sha256": held_sha, "removed_heldout_records": removed,
                                "n_records": len(kept), "folds": folds})
    return {"folds": folds, "n_records": len(kept), "removed": removed,
            "num_classes": max(ids.values()) + 1, "heldout": held}


def _seed_checkpoint(src_run: Path, epoch: int, dst_run: Path) -> None:
    """Copy ``src_run``'s checkpoint of ``epoch`` into ``dst_run`` as its epoch 0, not begun:
    weights and optimizer state kept; step, epoch, LR schedule and early stopping start afresh."""
    src, dst = src_run / "checkpoints", dst_run / "checkpoints"
    g_path, do_path = src / checkpoint_name(epoch, "g_"), src / checkpoint_name(epoch, "do_")
    check(g_path.is_file() and do_path.is_file(), str(src), f"checkpoint of epoch {epoch} (g_ "
          "and do_) not found; the production state points at it. Was it deleted?")
    state = load_train_state(do_path)
    state.update(steps=0, epoch=0, early_stopping={})
    state["chlib"] = {**state.get("chlib", {}), "epoch_complete": False, "batch_in_epoch": 0,
                      "started_from": f"{src_run.name}:{epoch}"}
    atomic_torch_save(dst / checkpoint_name(0, "do_"), state)
    atomic_write_bytes(dst / checkpoint_name(0, "g_"), g_path.read_bytes())


def _prune(run_dir: Path, keep: int) -> None:
    """Delete the g_/do_ files of ``run_dir`` except those of epoch ``keep``."""
    for prefix in ("g_", "do_"):
        for epoch, path in list_checkpoints(run_dir / "checkpoints", prefix).items():
            if epoch != keep:
                path.unlink(missing_ok=True)


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
        init = f.get("init_from")
        start = f"{init['run']}:{init['epoch']}" if init else "scratch"
        lines.append(f"  {name:<8} {f['status']:<8} start lr {f['start_lr']:.3g}  from {start}  "
                     f"best epoch {f.get('best_epoch', '-')} ({f.get('metric', '-')} "
                     f"{_fmt(f.get('best_value'))})")
    return lines


def _train_run(run_dir: Path, hp: HParams, info: dict, train_kw: dict, *, required: bool) -> bool:
    """Train a fold or the final run and record it in its ``state.json`` entry ``info`` (no
    best epoch: the last checkpoint, metric ``hp.early_stop_metric``); False if interrupted."""
    r = train(run_dir, **train_kw)
    if r.interrupted:
        return False
    epoch = r.best_epoch if r.best_epoch is not None else \
        max(list_checkpoints(run_dir / "checkpoints"), default=None)
    check(epoch is not None or not required, str(run_dir), "the run finished without a "
          "checkpoint; check max_epochs and every_n_epoch_to_save")
    recs = [e for e in read_metrics(run_dir, "epoch") if e.get("epoch") == epoch]
    info.update(status="done", best_epoch=epoch, best_value=r.best_value,
                metric=r.best_metric if r.best_epoch is not None else hp.early_stop_metric,
                last_epoch=r.epochs_done - 1, stopped_early=r.stopped_early,
                finished_at=time.time(), best_record=recs[-1] if recs else {})
    return True


def _start_run(prod_dir: Path, hp: HParams, state: dict, data: dict, i: int,
               base_over: dict) -> dict:
    """Begin fold ``i`` (``i > 1``: from the global best at its planned LR) or, for ``i = k + 1``,
    the final run (every record, from the global best): write its config (and its starting
    checkpoint), mark it started in ``state.json``; returns its state entry."""
    data_dir, final = prod_dir / "data", i > hp.k_folds
    init, over = state.get("global_best") if i > 1 else None, dict(base_over)
    if final:
        lr = lr_plan(learning_rate=hp.learning_rate, anchor=state["anchor"], min_lr=hp.min_lr,
                     k=hp.k_folds, final_fold_position=hp.final_fold_position)["final"]
        held = data["heldout"]
        over.update(train_path=str(data_dir / "full_train.txt"),
                    val_path=None if held is None else str(held), learning_rate=lr,
                    lr_decay=hp.final_lr_decay, hold_steps=hp.fold_hold_steps, warmup=False,
                    early_stopping_patience=hp.final_early_stopping_patience)
        entry = {"start_lr": lr, "n_train": data["n_records"]}
    else:
        if i == 1:
            lr, decay, hold = hp.learning_rate, hp.lr_decay, 0
        else:  # the fold starts at its LR directly: no second warm-up
            lr = state["anchor"] * state["ratio"] ** (i - 2)
            decay, hold, over["warmup"] = hp.fold_lr_decay, hp.fold_hold_steps, False
        over.update(train_path=str(data_dir / f"fold_{i}_train.txt"),
                    val_path=str(data_dir / f"fold_{i}_val.txt"), learning_rate=lr,
                    lr_decay=decay, hold_steps=hold)
        n_val = len(data["folds"][i - 1])
        entry = {"fold": i, "start_lr": lr, "lr_decay": decay, "hold_steps": hold,
                 "n_train": data["n_records"] - n_val, "n_val": n_val}
    run_dir = prod_dir / ("final" if final else f"fold_{i}")
    check(not (run_dir / "metrics.jsonl").is_file(), str(run_dir), f"has training logs but "
          f"{STATE_FILE} does not list {'the final run' if final else f'fold {i}'} as started; "
          f"the folder and the state disagree. Delete {run_dir} to retrain it")
    if init is not None:
        _seed_checkpoint(prod_dir / init["run"], init["epoch"], run_dir)
    save_hparams(hp.updated(over), run_dir / "config" / "hparams.yaml")
    entry.update(status="started", init_from=init, started_at=time.time())
    if final:
        state["final"] = entry
    else:
        state["folds"][str(i)] = entry
    write_json(prod_dir / STATE_FILE, state)
    return entry


def _fold_done(prod_dir: Path, hp: HParams, state: dict, i: int, fs: dict) -> None:
    """After fold ``i``: fix the LR anchor (fold 1), update the global best, save the state."""
    fold_dir = prod_dir / f"fold_{i}"
    if i == 1 and state.get("anchor") is None:
        anchor = hp.lr_initial_fold2
        if anchor is None:  # the LR of the last update before fold 1's best checkpoint
            fold_hp = load_hparams(fold_dir / "config" / "hparams.yaml")
            ckpt = fold_dir / "checkpoints" / checkpoint_name(fs["best_epoch"], "do_")
            at_best = lr_at(max(int(load_train_state(ckpt).get("steps", 1)), 1), fs["best_epoch"],
                            fold_hp)
            anchor = at_best if at_best > hp.min_lr else hp.learning_rate
        plan = lr_plan(learning_rate=hp.learning_rate, anchor=anchor, min_lr=hp.min_lr,
                       k=hp.k_folds, final_fold_position=hp.final_fold_position)
        state["anchor"], state["ratio"] = anchor, plan["ratio"]
    gb, value = state.get("global_best") or {}, fs["best_value"]
    # mAP bests are comparable across folds: keep an earlier, better fold's checkpoint as the start
    by_map = hp.early_stop_metric == fs["metric"] == gb.get("metric") == "mAP"
    fs["improved_global"] = not (by_map and None not in (value, gb.get("value"))
                                 and value <= gb["value"])
    if fs["improved_global"]:
        state["global_best"] = {"run": fold_dir.name, "epoch": fs["best_epoch"], "value": value,
                                "metric": fs["metric"]}
    write_json(prod_dir / STATE_FILE, state)


def run_production(prod_dir: str | os.PathLike, *, hp: HParams | str | os.PathLike | None = None,
                   dataset_dir: str | os.PathLike | None = None,
                   full_manifest: str | os.PathLike | None = None,
                   heldout_manifest: str | os.PathLike | None = None, device: str = "auto",
                   progress: bool = True,
                   callbacks: Sequence[Callable[[dict], Any]] | None = None,
                   on_event: Callable[[str, dict], Any] | None = None) -> ProdResult:
    """Run (or resume) k-fold production training in ``prod_dir`` (see the module docstring).

    ``hp``: None resumes with the saved config. The data: ``full_manifest`` / ``heldout_manifest``,
    else ``dataset_dir``'s ``full.txt`` / ``test.txt``, else ``hp.train_path`` / ``hp.test_path``.
    A finished fold keeps its best checkpoint only. ``on_event(name, info)``: at ``fold_start``,
    ``fold_done``, ``folds_done``, ``final_start``, ``final_done``.
    """
    prod_dir = Path(prod_dir)
    state_path = prod_dir / STATE_FILE
    remedy = "use a new production folder, or pass hp=None to resume with the saved config"
    hp = run_config(prod_dir, hp, "no production config; pass hp= (an HParams or a YAML path)",
                    remedy if state_path.is_file() else None)  # started: kept
    data = _prepare_data(prod_dir, hp,
                         *_manifests(hp, dataset_dir, full_manifest, heldout_manifest))
    state = read_json(state_path) if state_path.is_file() else {
        "version": 1, "folds": {}, "anchor": None, "ratio": None, "global_best": None,
        "final": None}
    state.setdefault("k", hp.k_folds)
    notes = [f"{data['removed']} record(s) of held-out recordings were left out of the fold "
             "data"] if data["removed"] else []
    base_over: dict = {"test_path": None}
    if hp.num_classes_auto:
        base_over["foc"] = {"output_dims": data["num_classes"]}
    emit = on_event or (lambda name, info: None)
    train_kw = {"device": device, "progress": progress, "callbacks": callbacks}

    for i in range(1, hp.k_folds + 2):  # the folds, then the final run on every record
        final = i > hp.k_folds
        kind, run_dir = ("final", prod_dir / "final") if final else ("fold", prod_dir / f"fold_{i}")
        if final:
            emit("folds_done", {"global_best": state["global_best"], "anchor": state["anchor"],
                                "ratio": state["ratio"]})
        fs = state.get("final") if final else state["folds"].get(str(i))
        if fs is None:
            fs = _start_run(prod_dir, hp, state, data, i, base_over)
            emit(f"{kind}_start", dict(fs))
        elif fs["status"] == "done":
            if not final:  # again: a kill may have come before the pruning
                _prune(run_dir, fs["best_epoch"])
            continue
        if not _train_run(run_dir, hp, fs, train_kw, required=not final):
            return _result(prod_dir, state, notes, complete=False)
        if final:
            write_json(prod_dir / STATE_FILE, state)
        else:
            _fold_done(prod_dir, hp, state, i, fs)
            _prune(run_dir, fs["best_epoch"])
        emit(f"{kind}_done", dict(fs))
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


def _runs_of(prod_dir: Path) -> list[Path]:
    """The fold run folders in fold order, then ``final``."""
    folds = sorted((p for p in prod_dir.glob("fold_*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    return [p for p in [*folds, prod_dir / "final"] if p.is_dir()]


def production_rows(prod_dir: str | os.PathLike) -> list[dict]:
    """One row per (run, epoch) with test-set mAPs: ``{"run", "epoch", "mAP": {testset: value},
    "elapsed_s", "average"}``; ``average`` only when every test set seen in the folder has a
    value at that epoch; elapsed from the first record of the first run; last record wins."""
    recs = [(i, run_dir.name, r) for i, run_dir in enumerate(_runs_of(Path(prod_dir)))
            for r in read_jsonl(run_dir / "metrics.jsonl")]
    t0 = min((float(r["time"]) for _, _, r in recs if r.get("time") is not None), default=0.0)
    by_epoch: dict[tuple[int, int], dict] = {}
    for i, name, r in recs:
        if r.get("kind") == "test" and r.get("testset") is not None and r.get("mAP") is not None:
            row = by_epoch.setdefault((i, int(r["epoch"])), {
                "run": name, "epoch": int(r["epoch"]), "mAP": {}, "elapsed_s": None})
            row["mAP"][str(r["testset"])] = float(r["mAP"])
            if r.get("time") is not None:
                row["elapsed_s"] = float(r["time"]) - t0
    n_sets = len({s for row in by_epoch.values() for s in row["mAP"]})
    rows = [by_epoch[k] for k in sorted(by_epoch)]
    for row in rows:
        row["mAP"] = dict(sorted(row["mAP"].items()))
        vals = list(row["mAP"].values())
        row["average"] = sum(vals) / len(vals) if len(vals) == n_sets else None
    return rows


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60:02d}:{m % 60:02d}:{s:02d}"


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
        return "\n".join([*lines, "no test-set mAP logged yet"])
    rankings = [(f"for test set {s!r}", "mAP", lambda r, s=s: r["mAP"].get(s)) for s in sets]
    rankings.append((f"by average mAP over {', '.join(sets)}", "average", lambda r: r["average"]))
    for what, label, value in rankings:  # the average comes last: ``ranked`` then holds its ranks
        ranked = sorted((r for r in rows if value(r) is not None), key=value, reverse=True)
        lines += [f"\ntop {top} epochs {what}:"] + [
            f"  {r['run']:<8} epoch {r['epoch']:>4}  {label} {value(r):.4f}  "
            f"elapsed {_hms(r['elapsed_s'])}" for r in ranked[:top]]
    if ranked:
        lines.append(f"\nbest average: {ranked[0]['run']} epoch {ranked[0]['epoch']}: " +
                     ", ".join(f"{s} {v:.4f}" for s, v in ranked[0]["mAP"].items()))
    return "\n".join(lines)
