"""Figures of a tuning session (:mod:`chlib.train.tune`): curves per experiment and the ranking."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from chlib.train.tune_summary import TuneSummary
from chlib.ui.plots import new_figure, save_figure

__all__ = ["plot_tuning_curves", "plot_tuning_ranking", "save_tuning_figures"]


def _band(series_by_seed: Iterable[dict[int, float]]) -> tuple[np.ndarray, ...]:
    """Epochs, mean, min and max over the seeds that reached each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for s in series_by_seed:
        for ep, v in s.items():
            if math.isfinite(v):
                by_epoch.setdefault(ep, []).append(v)
    vals = [by_epoch[e] for e in sorted(by_epoch)]
    return (np.array(sorted(by_epoch), dtype=np.float64), np.array([np.mean(v) for v in vals]),
            np.array([min(v) for v in vals]), np.array([max(v) for v in vals]))


def plot_tuning_curves(summary: TuneSummary, *, experiments: Sequence[str] | None = None,
                       top: int | None = 8) -> Figure:
    """mAP and val loss per epoch: per experiment the mean over seeds and a band over the seed
    range; ``top`` keeps the best-ranked experiments (None: all)."""
    ranked = [r["experiment"] for r in summary.rows]
    names = list(experiments) if experiments is not None else ranked[: top or len(ranked)]
    fig, (ax_map, ax_val) = new_figure(1, 2, figsize=(12, 4.5))
    known = {r["experiment"] for r in summary.rows}
    for i, name in enumerate(names):
        if name not in known:
            continue
        color, seeds = f"C{i % 10}", summary.curves.get(name, {})
        for ax, get in ((ax_map, lambda s: s["mAP"].get(summary.test_name, {})),
                        (ax_val, lambda s: s["val_loss"])):
            eps, mean, lo, hi = _band(get(s) for s in seeds.values())
            if eps.size == 0:
                continue
            ax.plot(eps, mean, color=color, label=name, marker="o", markersize=3)
            if len(seeds) > 1:
                ax.fill_between(eps, lo, hi, color=color, alpha=0.2, linewidth=0)
    for ax, ylabel, title in ((ax_map, "mAP", f"mAP ({summary.test_name or 'no test set'})"),
                              (ax_val, "loss", "validation loss (focal)")):
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if handles := ax_val.get_legend_handles_labels()[0] or ax_map.get_legend_handles_labels()[0]:
        fig.legend(handles=handles, fontsize=8, loc="outside lower center",  # off the curves
                   ncols=min(len(handles), 2 if max(map(len, names)) > 30 else 4))
    fig.suptitle("mean over seeds; band = seed range", fontsize=9)
    return fig


def plot_tuning_ranking(summary: TuneSummary) -> Figure:
    """Bars of the experiments' mean final mAP (val loss without a test set) ± one seed std,
    best at the top; hatched: within noise of the top."""
    has_map = any(math.isfinite(r["mAP_final_mean"]) for r in summary.rows)
    key = "mAP_final" if has_map else "val_loss_final"
    rows = [r for r in summary.rows if math.isfinite(r[f"{key}_mean"])]
    fig, ax = new_figure(1, 1, figsize=(8, 0.45 * max(len(rows), 2) + 1.2))
    y = np.arange(len(rows))[::-1]
    means = [r[f"{key}_mean"] for r in rows]
    errs = [r[f"{key}_std"] if math.isfinite(r[f"{key}_std"]) else 0.0 for r in rows]
    bars = ax.barh(y, means, xerr=errs, color="C0", alpha=0.8, capsize=3)
    for bar, r in zip(bars, rows, strict=True):
        if r["vs_top"] == "below":
            bar.set_alpha(0.45)
        elif r["vs_top"] == "~top":
            bar.set_hatch("//")
    ax.set_yticks(y, [r["experiment"] for r in rows], fontsize=8)
    ax.set_xlabel(f"{f'final mAP ({summary.test_name})' if has_map else 'final val loss'}, "
                  "mean ± std over seeds")
    ax.set_title("experiments ranked (hatched: within noise of the top)", fontsize=10)
    return fig


def save_tuning_figures(summary: TuneSummary, tune_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw both figures and save them in ``<tune_dir>/figures/``; returns name -> path."""
    figures = {"tune_curves": plot_tuning_curves, "tune_ranking": plot_tuning_ranking}
    return {name: save_figure(fn(summary), Path(tune_dir) / "figures" / f"{name}.png")
            for name, fn in figures.items()}
