"""The pictures and tables of ``08_probe`` (:mod:`chlib.retrieval.probe`): the results table
with confidence intervals, a confusion matrix (seaborn heatmap), the embedding map coloured by a
label and the recordings a probe most confidently disagrees with, each with a player."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.figure import Figure

from chlib.core.errors import ConfigError
from chlib.retrieval.probe import FEATURES, PROBES, ProbeResult
from chlib.ui.plots import new_figure, project_embeddings
from chlib.ui.widgets import Table, results_table, table

__all__ = ["results_view", "confusion_figure", "label_map_figure", "disagreement_table",
           "disagreement_players"]

_MAX_LEGEND = 20  # classes named in a map's legend; the rest share a grey "others"


def _ci(point: float, low: float, high: float) -> str:
    """``0.62 [0.55, 0.70]`` with no-break spaces (a table cell keeps it on one line); the
    point alone without an interval."""
    if not np.isfinite(point):
        return ""
    return f"{point:.2f}" + (f"\u00a0[{low:.2f},\u00a0{high:.2f}]" if np.isfinite(low) else "")


def results_view(result: ProbeResult, *, title: str = "") -> Table:
    """The results table as a person reads it: per label, the majority baseline first, then
    each feature's probes; accuracies as ``point [low, high]`` (95 % bootstrap over works)."""
    t = result.table
    order = {"none": -1, **{f: i for i, f in enumerate(FEATURES)}}
    rows = [{"label": r["label"], "feature": FEATURES.get(r["feature"], "none (baseline)"),
             "probe": r["probe"], "recordings": r["n_recordings"], "works": r["n_works"],
             "classes": r["n_classes"],
             "accuracy": _ci(r["accuracy"], r["accuracy_low"], r["accuracy_high"]),
             "balanced accuracy": _ci(r["balanced_accuracy"], r["balanced_accuracy_low"],
                                      r["balanced_accuracy_high"])}
            for r in sorted(t.to_dict("records"), key=lambda r: (
                r["label"], order.get(r["feature"], 99), PROBES.index(r["probe"])
                if r["probe"] in PROBES else -1))]
    return table(rows, ["label", "feature", "probe", "recordings", "works", "classes",
                        "accuracy", "balanced accuracy"], max_rows=None,
                 title=title or "probes, cross-validated by work (95 % CI over works)")


def confusion_figure(result: ProbeResult, label: str, feature: str = "trained",
                     probe: str = "logreg") -> Figure:
    """Heatmap of the out-of-fold predictions: rows the given labels, columns the predicted
    ones, colour the share of the row, each cell annotated with its count of recordings."""
    counts = result.confusion(label, feature, probe)
    share = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
    n = len(counts)
    fig, ax = new_figure(figsize=(max(4.5, 0.7 * n + 2.5), max(3.5, 0.55 * n + 1.8)))
    sns.heatmap(share, annot=counts.to_numpy(), fmt="d", cmap="Blues", vmin=0.0, vmax=1.0,
                cbar_kws={"label": "share of the given label's recordings"}, ax=ax,
                linewidths=0.5, linecolor="white")
    acc = np.trace(counts.to_numpy()) / max(1, int(counts.to_numpy().sum()))
    ax.set(xlabel="predicted (out of fold)", ylabel=f"given {label}",
           title=f"{label}: {probe} on {FEATURES.get(feature, feature)} (accuracy {acc:.2f})")
    ax.title.set_fontsize(10)
    return fig


def label_map_figure(x: np.ndarray, labels: Sequence, *, method: str = "tsne", seed: int = 0,
                     title: str = "", missing: str = "(no label)") -> Figure:
    """A 2-D map (``method``: "tsne", "umap" or "pca") of embeddings ``x`` [N, D], one colour
    per value of ``labels`` [N] (missing values grey)."""
    if len(labels) != len(x):
        raise ConfigError(f"label_map_figure: {len(labels)} labels for {len(x)} embeddings")
    xy = project_embeddings(np.asarray(x), method, seed=seed)
    names = np.array([missing if v is None or str(v).strip() == "" else str(v) for v in labels])
    counts = pd.Series(names[names != missing]).value_counts()
    keyed = list(counts.index[:_MAX_LEGEND])
    fig, ax = new_figure(figsize=(9, 6))
    rest = ~np.isin(names, keyed)
    if rest.any():
        ax.scatter(xy[rest, 0], xy[rest, 1], s=14, color="lightgrey", label="others / no label")
    palette = colormaps["tab20" if len(keyed) > 10 else "tab10"]
    for i, name in enumerate(sorted(keyed)):
        m = names == name
        ax.scatter(xy[m, 0], xy[m, 1], s=30, color=palette(i % palette.N), alpha=0.9,
                   label=f"{name} ({int(m.sum())})")
    ax.set(xticks=[], yticks=[])
    ax.set_title(title or f"{method}: {len(x)} recordings", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def disagreement_table(result: ProbeResult, label: str, feature: str = "trained",
                       probe: str = "logreg", k: int = 10) -> Table:
    """The ``k`` recordings the probe most confidently disagrees with (perf, work, given and
    predicted label, out-of-fold probability of the prediction)."""
    df = result.disagreements(label, feature, probe, k)
    return table(df.to_dict("records"), ["perf", "work", "given", "predicted", "confidence"],
                 max_rows=None, title=f"{label}: where {probe} on {FEATURES.get(feature, feature)}"
                                      " most confidently disagrees with the given label")


def disagreement_players(result: ProbeResult, label: str, feature: str = "trained",
                         probe: str = "logreg", k: int = 10, *, max_seconds: float = 20.0) -> Any:
    """The same recordings as :func:`disagreement_table` in a grid with an audio player each."""
    rows = result.disagreements(label, feature, probe, k).to_dict("records")
    return results_table(rows, ["perf", "given", "predicted", "confidence"], audio_column="wav",
                         max_seconds=max_seconds)
