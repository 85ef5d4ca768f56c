"""Figures and tables of retrieval results: ``05_evaluate``, ``06_identify``, ``07_explore``.
Functions take the result objects of :mod:`chlib.retrieval` (which never import the UI) and
return matplotlib figures (or a DataFrame for the metrics table)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chlib.core.errors import ConfigError
from chlib.core.manifest import resolve_path
from chlib.data.features import load_feature
from chlib.retrieval.evaluate import Evaluation, TestSetResult
from chlib.retrieval.explore import ExplorerData
from chlib.retrieval.identify import query_features
from chlib.ui import plots

__all__ = ["metrics_table", "projection_figure", "testset_figure", "query_match_figure",
           "summary_text", "sets_text", "file_names", "per_work_title", "explorer_projection",
           "explorer_map_figure", "invariance_figure"]

FIGURE_KINDS = ("tsne", "umap", "pca", "ranks", "confused", "per_work")  # of testset_figure


def metrics_table(evaluation: Evaluation) -> pd.DataFrame:
    """The metrics with 95 % CIs and baselines, one row per (test set, metric); the title (the
    column axis name) names the checkpoint, the model, the distance rule and any notes."""
    ev, (rows, columns) = evaluation, evaluation.metrics_rows()
    df = pd.DataFrame(rows, columns=columns)
    df.columns.name = "; ".join([f"epoch {ev.epoch} ({ev.checkpoint}), model {ev.fingerprint}, "
                                 f"distance rule {ev.rule!r}", *ev.notes])
    return df


def projection_figure(result: TestSetResult, method: str = "tsne", *, seed: int = 0) -> Any:
    """t-SNE / UMAP / PCA map of a test set's recordings coloured by work, unseen works ringed."""
    labels = result.point_labels.tolist()
    return plots.plot_embedding_projection(
        result.points, labels, method=method, test_only=result.test_only,
        label_names=result.work_names, seed=seed,
        title=f"{result.name}: {method.upper()} of {len(labels)} recordings "
              f"({len(set(labels))} works; ringed = never seen in training)")


def testset_figure(result: TestSetResult, kind: str, *, save_dir: str | os.PathLike | None = None,
                   top: int = 20, seed: int = 0) -> Any:
    """One chart of a test set; saved as ``<save_dir>/<testset>_<kind>.png`` if given.
    ``kind``: "tsne", "umap", "pca" (maps), "ranks" (rank histogram), "confused" (work pairs
    confused at rank 1), "per_work" (per-work AP, worst first)."""
    if kind in ("tsne", "umap", "pca"):
        fig = projection_figure(result, kind, seed=seed)
    elif kind == "ranks":
        fig = plots.plot_rank_histogram(result.ranks, max_rank=top)
    elif kind == "confused":
        fig = plots.plot_confused_pairs(
            [(r["work_a"], r["work_b"], r["count"]) for r in result.confusions], top=top,
            value_label="queries whose nearest recording is the other work",
            label_names=result.work_names)
    elif kind == "per_work":
        fig = plots.plot_per_work_ap([(r["work"], r["ap"]) for r in result.per_work], top=top,
                                     label_names=result.work_names)
        fig.axes[0].set_title(f"{fig.axes[0].get_title()}\n{per_work_title(result)}",
                              fontsize="small")
    else:
        raise ConfigError(f"figure kind must be one of {FIGURE_KINDS}, got {kind!r}")
    if save_dir is not None:
        plots.save_figure(fig, Path(save_dir) / f"{result.name}_{kind}.png")
    return fig


def per_work_title(result: TestSetResult) -> str:
    """How many works the per-work views show and how many queries they leave out (those with
    no other recording of their work: nothing to find, no AP)."""
    m, text = result.metrics, f"{len(result.per_work)} works, worst first"
    if k := m.get("n_queries_without_relevant"):
        text += (f"; {k} of {m.get('n_queries')} queries left out (no other recording of their "
                 "work to find)")
    return text


def query_match_figure(query: str | os.PathLike, match: Mapping, hp: Any, *,
                       max_seconds: float = 30.0, device: str = "cpu") -> Any:
    """CQT of a query file (computed as identification does) beside the stored CQT of its best
    match (an index record with ``feat``)."""
    arrays, titles = [query_features(query, hp, device)], [f"query: {Path(query).name}"]
    if match.get("feat"):
        arrays.append(np.asarray(load_feature(resolve_path(match["feat"]))))
        titles.append(f"best match: {match.get('perf')} ({match.get('work')})")
    return plots.plot_cqts(arrays, titles, features=hp.features, max_seconds=max_seconds)


def summary_text(summary: Mapping) -> str:
    """A few readable lines from :func:`chlib.retrieval.identify.identification_summary`."""
    s = summary
    lines = [f"{s['n_queries']} queries identified ({s['n_failed']} could not be read)."]
    if s["n_with_truth"]:
        lines += [f"Of {s['n_with_truth']} queries whose work is known: true work first "
                  f"{s['top1']:.0%}, in the top 10 {s['top10']:.0%}.",
                  f"Of the {s['n_truth_indexed']} whose work has reference recordings: first "
                  f"{s['top1_indexed']:.0%}, top 10 {s['top10_indexed']:.0%} (the other "
                  f"{s['n_with_truth'] - s['n_truth_indexed']} are works never indexed: the "
                  "right answer for them is 'no confident match')."]
    if s["best_verdicts"]:
        lines.append("Verdicts of the best match: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s["best_verdicts"].items(), key=lambda t: -t[1])))
    return "\n".join(lines)


def sets_text(sets: Mapping, single: Mapping | None = None) -> str:
    """Readable lines from :func:`chlib.retrieval.segment.evaluate_sets` (``single``: the same
    works' recordings identified alone, :func:`identification_summary`, for comparison)."""
    lines = [f"{sets['n_sets']} sets: of each set's works, named among its top n (n = its "
             f"number of works) {sets['recall_at_n']:.0%}, among its top 10 "
             f"{sets['recall_at_10']:.0%}; every work in the top 10 for "
             f"{sets['all_in_top10']:.0%} of sets.",
             f"Time labelled with the right work {sets['time_accuracy']:.0%}; works named that "
             f"are not in the set {sets['false_work_share']:.0%}; boundaries off by "
             f"{sets['median_boundary_error_s']:.1f} s (median)."]
    if single and single.get("n_truth_indexed"):
        lines.append(f"Alone, the recordings of indexed works came first {single['top1_indexed']:.0%}"
                     f" and in the top 10 {single['top10_indexed']:.0%} (targets for sets: "
                     f"named among the top n >= {0.9 * single['top1_indexed']:.0%}, all in the top "
                     "10 for >= 80 % of sets, >= 80 % of the time right, boundaries <= 3 s).")
    return "\n".join(lines)


def file_names(rows: Iterable[Mapping], key: str = "query") -> list[dict]:
    """``rows`` to display: each path under ``key`` cut to its file name, with as many parent
    folders as tell files of one name apart (the CSV files keep the full paths)."""
    rows = [dict(r) for r in rows]
    todo, short, n = {str(r[key]) for r in rows if r.get(key)}, {}, 1
    while todo:
        counts = Counter(Path(p).parts[-n:] for p in todo)
        for p in list(todo):
            if counts[(parts := Path(p).parts)[-n:]] == 1 or n >= len(parts):
                short[p] = str(Path(*parts[-n:]))
                todo.discard(p)
        n += 1
    return [r | {key: short[str(r[key])]} if r.get(key) else r for r in rows]


def explorer_projection(data: ExplorerData, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates [N, 2] of the explorer's points (kept in ``data.projections``)."""
    if (key := (method, seed)) not in data.projections:
        data.projections[key] = plots.project_embeddings(data.embeddings, method, seed=seed)
    return data.projections[key]


def explorer_map_figure(data: ExplorerData, projection: str = "umap", colour_by: str = "work", *,
                        highlight_work: str = "", row: int | None = None, n_neighbours: int = 10,
                        seed: int = 0) -> Any:
    """The projection coloured by ``colour_by``; works matching ``highlight_work`` stand out
    (when colouring by work); ``row`` is starred and joined to its ``n_neighbours`` (ranked by
    the index's distance rule)."""
    highlight = data.matching_works(highlight_work) if colour_by == "work" else []
    nb = [n["row"] for n in data.neighbours(row, n_neighbours)] if row is not None else []
    return plots.plot_embedding_projection(
        explorer_projection(data, projection, seed), data.labels(colour_by), method=None,
        highlight=highlight or None, selected=row, neighbours=nb,
        title=f"{projection} of {len(data)} recordings, colour: {colour_by}")


def invariance_figure(table: pd.DataFrame, *, save_dir: str | os.PathLike | None = None) -> Any:
    """One panel per factor of :func:`chlib.retrieval.invariance.invariance_curves`: top-1 rate
    against the factor's value, the identity value marked, chance as a dashed line."""
    factors = list(dict.fromkeys(table["factor"]))
    cols = min(3, len(factors))  # rows of 3 panels: readable at a notebook's ~850 px
    n_rows = -(-len(factors) // cols)
    fig, axes = plots.new_figure(n_rows, cols, figsize=(3.0 * cols, 2.7 * n_rows + 0.4))
    axes = np.atleast_1d(axes).ravel()
    for ax, factor in zip(axes, factors, strict=False):
        rows = table[table["factor"] == factor]
        ax.plot(rows["value"], rows["top1"], marker="o")
        ax.axhline(float(rows["chance"].iloc[0]), ls="--", c="grey", lw=1, label="chance")
        ax.set(title=factor, xlabel=_INVARIANCE_UNITS.get(factor, "value"), ylim=(-0.02, 1.02))
    for ax in axes[len(factors):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("top-1: finds itself")
    fig.suptitle("What is the model blind to? Each recording changed in one factor only")
    if save_dir is not None:
        plots.save_figure(fig, Path(save_dir) / "invariance.png")
    return fig


_INVARIANCE_UNITS = {"transpose": "semitones", "tempo": "speed factor", "timbre": "EQ depth, dB",
                     "noise": "SNR, dB", "excerpt": "fraction kept"}
