"""Tuning summaries: per-experiment statistics over seeds, from the runs' metrics files alone.

:func:`summarise` reads ``experiments/<name>/seed_<s>/metrics.jsonl`` (+ ``done.json`` /
``failed.json``), so runs launched elsewhere are summarised once copied back. Std is the sample
std (ddof 1); diverged or failed seeds are listed, never averaged. The reading (:func:`reading`,
:data:`READING_GUIDE`) comes from the mean least-squares slopes of mAP and val loss over the
last ``window`` epochs, each rising, falling or flat (table ``_READINGS``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from chlib.core.config import load_hparams
from chlib.core.errors import ChlibError
from chlib.core.io import atomic_write_text, read_json, read_jsonl, write_json

__all__ = ["FLAT_MAP_SLOPE", "FLAT_LOSS_SLOPE", "READING_GUIDE", "TuneSummary", "seed_status",
           "seed_series", "ls_slope", "reading", "summarise", "format_table"]

#: |mAP slope| (mAP units per epoch, mAP in [0, 1]) below which mAP counts as flat.
FLAT_MAP_SLOPE = 0.002
#: |val-loss slope| / |mean val loss| (per epoch) below which the val loss counts as flat.
FLAT_LOSS_SLOPE = 0.005

#: reading -> advice (the reading-guide column, see the module docstring for the rules).
READING_GUIDE: dict[str, str] = {
    "still improving": "not finished: train longer or raise early_stopping_patience",
    "converged": "curves flat: compare experiments as they are",
    "overfitting": "val loss rising: stop earlier, add augmentation or data, or a smaller model",
    "degrading": "mAP falling while the loss is flat: stop earlier; check the test set",
    "decoupled": "val loss and mAP disagree: prefer early_stop_metric: mAP",
    "too short": "fewer than 2 validated epochs: train more epochs",
    "diverged": "no seed finished (NaN guard): lower learning_rate or check the data",
    "no data": "no metrics yet",
}


def seed_status(seed_dir: str | os.PathLike) -> str:
    """``ok`` / ``diverged`` (done.json), ``failed`` (failed.json), ``unmarked`` (metrics but no
    marker: running, killed, or launched elsewhere) or ``pending`` (nothing yet)."""
    seed_dir = Path(seed_dir)
    if (seed_dir / "done.json").is_file():
        try:
            return str(read_json(seed_dir / "done.json").get("status", "ok"))
        except ValueError:
            return "unmarked"
    if (seed_dir / "failed.json").is_file():
        return "failed"
    return "unmarked" if (seed_dir / "metrics.jsonl").is_file() else "pending"


def _val_loss_of(rec: Mapping) -> float | None:
    return next((float(rec[k]) for k in ("val_loss", "foc_loss", "total") if rec.get(k) is not None),
                None)


def seed_series(records: Iterable[Mapping]) -> dict:
    """``{"val_loss": {epoch: value}, "mAP": {testset: {epoch: mAP}}}`` of one run's records:
    the focal loss of ``val`` records (``total`` without one); the last record of an epoch wins."""
    val: dict[int, float] = {}
    maps: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.get("epoch") is None:
            continue
        ep, kind = int(rec["epoch"]), rec.get("kind")
        if kind == "val" and (v := _val_loss_of(rec)) is not None:
            val[ep] = v
        elif kind == "test" and rec.get("testset") is not None and rec.get("mAP") is not None:
            maps.setdefault(str(rec["testset"]), {})[ep] = float(rec["mAP"])
    return {"val_loss": dict(sorted(val.items())),
            "mAP": {k: dict(sorted(v.items())) for k, v in sorted(maps.items())}}


def ls_slope(epochs: Sequence[float], values: Sequence[float], window: int) -> float:
    """Least-squares slope (value units per epoch) over the last ``window`` points; NaN for
    fewer than 2 (the original's 0 would read as "flat")."""
    x = np.asarray(list(epochs)[-window:], dtype=np.float64)
    y = np.asarray(list(values)[-window:], dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _sign(slope: float | None, eps: float) -> int:
    """+1 rising, -1 falling, 0 flat (within ``eps``) or missing."""
    if slope is None or not math.isfinite(slope):
        return 0
    return int(slope > eps) - int(slope < -eps)


# (mAP slope sign, val-loss slope sign) -> reading; a missing slope counts as flat
_READINGS = {
    (1, 1): "decoupled", (1, 0): "still improving", (1, -1): "still improving",
    (0, 1): "overfitting", (0, 0): "converged", (0, -1): "still improving",
    (-1, 1): "overfitting", (-1, 0): "degrading", (-1, -1): "decoupled",
}


def reading(map_slope: float | None, val_slope: float | None, *, val_level: float | None = None,
            flat_map_slope: float = FLAT_MAP_SLOPE,
            flat_loss_slope: float = FLAT_LOSS_SLOPE) -> str:
    """The reading-guide label of an mAP and a val-loss slope (per epoch); the loss slope is
    flat below ``flat_loss_slope x |val_level|``. No mAP slope (None/NaN, no test set): the loss
    alone decides; neither: ``too short``."""
    if not any(s is not None and math.isfinite(s) for s in (map_slope, val_slope)):
        return "too short"
    level = abs(val_level) if val_level is not None and math.isfinite(val_level) else 1.0
    return _READINGS[_sign(map_slope, flat_map_slope), _sign(val_slope, flat_loss_slope * level)]


def _seed_stats(series: dict, test_name: str | None, window: int, *, flat_map_slope: float,
                flat_loss_slope: float) -> dict:
    val = series["val_loss"]
    maps = series["mAP"].get(test_name, {}) if test_name else {}
    out: dict[str, Any] = {"last_epoch": max([*val, *maps], default=None)}
    for pre, slope, curve, best in (("val_loss", "val_slope", val, np.argmin),
                                    ("mAP", "mAP_slope", maps, np.argmax)):
        if curve:
            ep, vals = list(curve), list(curve.values())
            i = int(best(vals))
            out.update({f"{pre}_final": vals[-1], f"{pre}_best": vals[i],
                        f"{pre}_best_epoch": ep[i], slope: ls_slope(ep, vals, window)})
    if val:
        out["val_level"] = float(np.mean(list(val.values())[-window:]))
    out["reading"] = "no data" if not val and not maps else reading(
        out.get("mAP_slope"), out.get("val_slope"), val_level=out.get("val_level"),
        flat_map_slope=flat_map_slope, flat_loss_slope=flat_loss_slope)
    return out


@dataclass
class TuneSummary:
    """One row per experiment (dicts, see :func:`summarise`), the formatted table, the curves
    (experiment -> seed -> series) and notes."""

    rows: list[dict]
    table: str
    curves: dict[str, dict[int, dict]]
    test_name: str | None
    window: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.table


# the columns of summary.csv, in order
_ROW_FIELDS = ["rank", "experiment", "seeds_ok", "seeds_total", "seeds_diverged", "seeds_failed",
               "seeds_unmarked", "val_loss_final_mean", "val_loss_final_std",
               "val_loss_best_mean", "val_loss_best_std", "val_loss_best_epoch_mean",
               "val_slope_mean", "mAP_final_mean", "mAP_final_std", "mAP_best_mean",
               "mAP_best_std", "mAP_best_epoch_mean", "mAP_slope_mean", "last_epoch_mean",
               "mAP_final_n", "vs_top", "reading", "seeds_disagree", "advice", "aliases",
               "settings", "problems"]


def _discover(tune_dir: Path) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = {}
    for sd in sorted((tune_dir / "experiments").glob("*/seed_*")):
        if sd.is_dir() and re.fullmatch(r"seed_-?\d+", sd.name):
            out.setdefault(sd.parent.name, {})[int(sd.name[5:])] = sd
    return {name: dict(sorted(seeds.items())) for name, seeds in out.items()}


def _window_of(plan_info: dict, seed_dirs: Iterable[Path]) -> int:
    if plan_info.get("window"):
        return int(plan_info["window"])
    for sd in seed_dirs:
        if (sd / "config" / "hparams.yaml").is_file():
            try:
                return load_hparams(sd / "config" / "hparams.yaml").early_stopping_patience
            except ChlibError:
                continue
    return 5


def _pick_test_set(test_name: str | None, curves: dict, notes: list[str]) -> str | None:
    all_sets = {t for seeds in curves.values() for series in seeds.values() for t in series["mAP"]}
    if test_name is None and all_sets:
        test_name = sorted(all_sets)[0]
        if len(all_sets) > 1:
            notes.append(f"several test sets ({', '.join(sorted(all_sets))}); summarising "
                         f"{test_name!r} (pass test_name= to choose)")
    elif test_name is not None and all_sets and test_name not in all_sets:
        notes.append(f"test set {test_name!r} appears in no metrics file "
                     f"(found: {', '.join(sorted(all_sets))})")
    return test_name


def _problems(seed_dirs: dict[int, Path], statuses: dict[int, str]) -> str:
    """"seed <s> diverged: <error>; ..." for the diverged and failed seeds."""
    out = []
    for seed, st in sorted(statuses.items()):
        if st in ("diverged", "failed"):
            try:
                err = read_json(seed_dirs[seed] / ("done.json" if st == "diverged"
                                                   else "failed.json")).get("error", "")
            except ValueError:
                err = ""
            out.append(f"seed {seed} {st}: {err}"[:200])
    return "; ".join(out)


def summarise(tune_dir: str | os.PathLike, *, test_name: str | None = None,
              window: int | None = None, flat_map_slope: float | None = None,
              flat_loss_slope: float | None = None, save: bool = True) -> TuneSummary:
    """Summarise every experiment under ``<tune_dir>/experiments/`` from its metrics files.

    Seeds ``ok`` or ``unmarked`` enter the statistics. Ranked by mean final mAP of ``test_name``
    (final val loss without test sets): the last epoch is not chosen on the test set, so unlike
    a best-of-epochs value it is not biased upwards. ``vs_top`` ``~top``: within 2 standard
    errors of the top. Saves ``summary.csv`` and ``summary.json`` unless ``save=False``.
    """
    tune_dir = Path(tune_dir)
    found = _discover(tune_dir)
    plan_info = read_json(tune_dir / "plan.json") if (tune_dir / "plan.json").is_file() else {}
    window = window or _window_of(plan_info, [sd for s in found.values() for sd in s.values()])
    fm = plan_info.get("flat_map_slope", FLAT_MAP_SLOPE) if flat_map_slope is None else flat_map_slope
    fl = plan_info.get("flat_loss_slope", FLAT_LOSS_SLOPE) if flat_loss_slope is None else flat_loss_slope
    notes: list[str] = []
    curves = {name: {seed: seed_series(read_jsonl(sd / "metrics.jsonl")) for seed, sd in seeds.items()}
              for name, seeds in found.items()}
    test_name = _pick_test_set(test_name or plan_info.get("test_name"), curves, notes)
    planned = {e["name"]: e for e in plan_info.get("experiments", [])}
    rows = []
    for name, seed_dirs in found.items():
        statuses = {seed: seed_status(sd) for seed, sd in seed_dirs.items()}
        if name in planned:  # planned runs not begun count as pending
            statuses = {int(s): "pending" for s in plan_info.get("seeds") or []} | statuses
        per_seed = [_seed_stats(curves[name][seed], test_name, window, flat_map_slope=fm,
                                flat_loss_slope=fl)
                    for seed, st in sorted(statuses.items()) if st in ("ok", "unmarked")]
        rows.append({**_experiment_row(name, per_seed, statuses, fm, fl),
                     "aliases": ", ".join(planned.get(name, {}).get("aliases", [])),
                     "settings": planned.get(name, {}).get("settings", {}),
                     "problems": _problems(seed_dirs, statuses)})
    _rank(rows)
    table = format_table(rows, test_name=test_name, window=window)
    table += "".join(f"\nnote: {n}" for n in notes)
    summary = TuneSummary(rows=rows, table=table, curves=curves, test_name=test_name,
                          window=window, notes=notes)
    if save and found:
        _save_summary(tune_dir, summary)
    return summary


# the per-seed statistics averaged into a row; the first four also get a sample std and a count
_STATS = ["val_loss_final", "val_loss_best", "mAP_final", "mAP_best", "val_loss_best_epoch",
          "mAP_best_epoch", "val_slope", "mAP_slope", "last_epoch", "val_level"]


def _experiment_row(name: str, per_seed: list[dict], statuses: dict[int, str],
                    fm: float, fl: float) -> dict:
    stats = pd.DataFrame(per_seed, columns=_STATS, dtype=float).replace([np.inf, -np.inf], np.nan)
    counts = Counter(statuses.values())
    row: dict[str, Any] = {"experiment": name, "seeds_total": len(statuses),
                           **{f"seeds_{st}": counts[st] for st in ("ok", "diverged", "failed",
                                                                   "unmarked")}}
    for i, col in enumerate(stats):
        row[f"{col}_mean"] = float(stats[col].mean())
        if i < 4:
            row[f"{col}_std"], row[f"{col}_n"] = float(stats[col].std()), int(stats[col].count())
    val_level = row.pop("val_level_mean")
    if not per_seed:
        label = "diverged" if row["seeds_diverged"] else "no data"
    else:
        label = reading(row["mAP_slope_mean"], row["val_slope_mean"], val_level=val_level,
                        flat_map_slope=fm, flat_loss_slope=fl)
    disagree = len({s["reading"] for s in per_seed}) > 1
    return {**row, "reading": label + (" (seeds disagree)" if disagree else ""),
            "seeds_disagree": disagree, "advice": READING_GUIDE.get(label, "")}


def _rank(rows: list[dict]) -> None:
    """Sort rows in place (best first) and fill ``rank`` and ``vs_top``."""
    key = "mAP_final" if any(math.isfinite(r["mAP_final_mean"]) for r in rows) else "val_loss_final"
    sign = -1.0 if key == "mAP_final" else 1.0
    rows.sort(key=lambda r: sign * r[f"{key}_mean"] if math.isfinite(r[f"{key}_mean"]) else math.inf)
    top = rows[0] if rows else {}
    for i, r in enumerate(rows, start=1):
        m, n, sd = r[f"{key}_mean"], r[f"{key}_n"], r[f"{key}_std"]
        r["rank"] = i if math.isfinite(m) else None
        if r["rank"] is None:
            r["vs_top"] = ""
        elif i == 1:
            r["vs_top"] = "top"
        elif n < 2 or top[f"{key}_n"] < 2:
            r["vs_top"] = "?"
        else:  # within 2 standard errors of the difference: noise
            se = math.sqrt(top[f"{key}_std"] ** 2 / top[f"{key}_n"] + sd**2 / n)
            r["vs_top"] = "~top" if abs(top[f"{key}_mean"] - m) <= 2 * se else "below"


def _num(v: float | None, fmt: str) -> str:
    return format(v, fmt) if v is not None and math.isfinite(v) else "-"


def _pm(mean: float, std: float) -> str:
    shown = math.isfinite(mean) and math.isfinite(std)
    return _num(mean, ".3f") + (f"±{std:.3f}" if shown else "")


def _seeds_cell(r: dict) -> str:
    extra = [f"{r[f'seeds_{k}']} {k}" for k in ("diverged", "failed", "unmarked")
             if r.get(f"seeds_{k}")]
    return f"{r['seeds_ok'] + r['seeds_unmarked']}/{r['seeds_total']}" + \
        (f" ({', '.join(extra)})" if extra else "")


def format_table(rows: Sequence[dict], *, test_name: str | None = None,
                 window: int | None = None) -> str:
    """The summary rows as a text table (pandas ``to_string``), with a legend and problems."""
    def best(r: dict) -> str:
        at = r["mAP_best_epoch_mean"]
        return _pm(r["mAP_best_mean"], r["mAP_best_std"]) + (f" @{at:.1f}" if math.isfinite(at) else "")

    table = pd.DataFrame({
        "#": ["" if r["rank"] is None else str(r["rank"]) for r in rows],
        "experiment": [r["experiment"] + (f" (= {r['aliases']})" if r.get("aliases") else "")
                       for r in rows],
        "seeds": [_seeds_cell(r) for r in rows],
        "val loss (final)": [_pm(r["val_loss_final_mean"], r["val_loss_final_std"]) for r in rows],
        f"mAP {test_name or ''} (final)": [_pm(r["mAP_final_mean"], r["mAP_final_std"]) for r in rows],
        "best mAP @epoch": [best(r) for r in rows],
        "mAP slope": [_num(r["mAP_slope_mean"], "+.4f") for r in rows],
        "val slope": [_num(r["val_slope_mean"], "+.4f") for r in rows],
        "vs top": [r["vs_top"] for r in rows],
        "reading": [r["reading"] for r in rows],
    })
    lines = [table.to_string(index=False, justify="left"), "",
             f"mean±std over seeds (sample std); slopes per epoch over the last {window or '?'} "
             "epochs; '~top': within 2 standard errors of the top (noise); '?': one seed, "
             "cannot tell"]
    lines += [f"{r['experiment']}: {r['problems']}" for r in rows if r.get("problems")]
    return "\n".join(lines)


def _save_summary(tune_dir: Path, summary: TuneSummary) -> None:
    def cell(v: Any) -> Any:  # as the csv module writes them: None -> "", NaN -> "nan"
        return "" if v is None else yaml.safe_dump(v, default_flow_style=True).strip() \
            if isinstance(v, dict) else v

    cells = [{k: cell(r.get(k)) for k in _ROW_FIELDS} for r in summary.rows]
    csv_text = pd.DataFrame(cells, columns=_ROW_FIELDS).to_csv(
        index=False, lineterminator="\r\n", na_rep="nan")
    atomic_write_text(tune_dir / "summary.csv", csv_text)
    # JSON has no NaN: non-finite numbers become null
    rows = json.loads(json.dumps(summary.rows), parse_constant=lambda _: None)
    write_json(tune_dir / "summary.json", {
        "test_name": summary.test_name, "window": summary.window, "notes": summary.notes,
        "rows": rows, "reading_guide": READING_GUIDE,
    })
