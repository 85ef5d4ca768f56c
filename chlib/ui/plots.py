"""Figures for the notebooks (CQTs, training curves, embedding maps, evaluation charts), each a
matplotlib ``Figure`` on an Agg canvas (no pyplot; Jupyter shows it via a PNG formatter registered
here). CQTs are ``[frames, bins]`` in dB (0 = the track's loudest cell), bin ``b`` at
``fmin * 2 ** (b / bins_per_octave)`` Hz."""

from __future__ import annotations

import io
import math
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from chlib.core.errors import ConfigError
from chlib.core.io import atomic_write_bytes

__all__ = ["new_figure", "figure_png", "save_figure", "note_name", "plot_cqt", "plot_cqts",
           "training_curves", "plot_training_curves", "project_embeddings",
           "plot_embedding_projection", "plot_rank_histogram", "plot_confused_pairs",
           "plot_per_work_ap", "plot_count_histogram"]

_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p")
_MAX_KEYED = 40  # works a map styles and names in its legend; the rest are grey "others"


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (8, 4),
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """A Figure with an Agg canvas and its axes (``squeeze``d like ``plt.subplots``)."""
    _register_notebook_display()
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (folders are created); returns the path."""
    _register_notebook_display()  # so that a Figure made elsewhere also shows as a PNG
    if (path := Path(path)).suffix.lower() != ".png":
        raise ConfigError(f"save_figure: {path} should end in .png")
    atomic_write_bytes(path, figure_png(fig, dpi=120))
    return path


def _register_notebook_display() -> None:
    """Inside IPython, show a returned Figure as a PNG without pyplot (idempotent)."""
    ip = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    png = ip.display_formatter.formatters["image/png"] if ip is not None else None
    if png is not None and Figure not in png.type_printers:  # the inline backend's wins
        png.for_type(Figure, figure_png)


def note_name(freq_hz: float) -> str:
    """Nearest equal-tempered note name of ``freq_hz`` (A4 = 440 Hz), e.g. 32 Hz -> ``"C1"``."""
    if freq_hz <= 0:
        raise ConfigError(f"note_name: frequency must be > 0 Hz, got {freq_hz}")
    midi = int(round(69 + 12 * math.log2(freq_hz / 440.0)))
    return f"{_NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def plot_cqts(cqts: Sequence[np.ndarray], titles: Sequence[str] | None = None, *,
              frames_per_second: float = 25.0, fmin: float = 32.0, bins_per_octave: int = 12,
              features: Any = None, ncols: int | None = None, max_seconds: float | None = None,
              panel_size: tuple[float, float] = (4.0, 3.0)) -> Figure:
    """CQTs [frames, bins] (dB, shown from -80 to 0) side by side: time (s) across, pitch up
    (octave ticks named). ``features`` (a FeatureSettings) replaces ``frames_per_second``,
    ``fmin`` and ``bins_per_octave``; ``ncols``: one row of at most 4; ``max_seconds`` crops."""
    if features is not None:
        frames_per_second, fmin = float(features.frames_per_second), float(features.fmin)
        bins_per_octave = int(features.bins_per_octave)
    arrays = [np.asarray(c) for c in cqts]
    if not arrays or (titles is not None and len(titles) != len(arrays)):
        raise ConfigError(f"plot_cqts: {len(titles or [])} titles for {len(arrays)} CQT arrays")
    for i, a in enumerate(arrays):
        if a.ndim != 2 or 0 in a.shape:
            raise ConfigError(f"cqts[{i}]: expected a [frames, bins] array, got shape {a.shape}")
    if max_seconds is not None:
        arrays = [a[: max(1, int(round(max_seconds * frames_per_second)))] for a in arrays]
    ncols = ncols or min(len(arrays), 4)
    nrows = math.ceil(len(arrays) / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
                           squeeze=False)
    for ax in axes.flat[len(arrays):]:
        ax.set_visible(False)
    for i, (ax, cqt) in enumerate(zip(axes.flat, arrays, strict=False)):
        im = ax.imshow(cqt.T, origin="lower", aspect="auto", cmap="magma", vmin=-80.0, vmax=0.0,
                       extent=(0.0, len(cqt) / frames_per_second, -0.5, cqt.shape[1] - 0.5),
                       interpolation="nearest")
        ticks = list(range(0, cqt.shape[1], bins_per_octave))
        ax.set_yticks(ticks, [note_name(fmin * 2 ** (b / bins_per_octave)) for b in ticks])
        ax.set(xlabel="time (s)", ylabel="" if i % ncols else "CQT bin (note)")
        ax.set_title(_wrap(titles[i], int(panel_size[0] * 11)) if titles else "", fontsize=9)
    fig.colorbar(im, ax=list(axes.flat), label="dB", shrink=0.8 if len(arrays) > 1 else 1.0)
    return fig


def plot_cqt(cqt: np.ndarray, *, title: str | None = None, **kwargs: Any) -> Figure:
    """One CQT [frames, bins] in dB with a colour bar (keywords: :func:`plot_cqts`)."""
    return plot_cqts([cqt], None if title is None else [title], panel_size=(8, 3.5), **kwargs)


_LOSS_KEYS = ("loss", "foc_loss", "total_loss", "total", "tri_loss", "cen_loss")


def _losses_of(row: Mapping, prefix: str = "") -> dict[str, float]:
    """Loss values of a metrics row: a ``losses`` mapping, else top-level ``<prefix>*loss`` /
    ``<prefix>total`` keys (prefix stripped)."""
    if not isinstance(src := row.get("losses"), Mapping):
        src = {k[len(prefix):]: v for k, v in row.items()
               if k.startswith(prefix) and (k.endswith("loss") or k == f"{prefix}total")}
    return {k: float(v) for k, v in src.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def training_curves(rows: Iterable[Mapping], loss_key: str | None = None) -> dict:
    """Per-epoch series of metrics records: ``{"loss_key", "train", "val", "mAP"}``; ``train`` /
    ``val``: epoch -> loss (an ``epoch`` record wins over that epoch's averaged ``train`` / ``val``
    records), ``mAP``: test set -> {epoch -> mAP}; ``loss_key`` None: one both curves have."""
    losses: list[tuple] = []  # (curve, 0 from an epoch record else 1, epoch, loss name, value)
    maps: dict[str, dict[int, float]] = {}
    for r in rows:
        if not isinstance(r, Mapping) or r.get("epoch") is None:
            continue
        kind, epoch = r.get("kind"), int(r["epoch"])
        if kind in ("train", "val"):
            losses += [(kind, 1, epoch, k, v) for k, v in _losses_of(r).items()]
        elif kind == "test" and isinstance(r.get("mAP"), (int, float)):
            maps.setdefault(str(r.get("testset", "test")), {})[epoch] = float(r["mAP"])
        elif kind in ("epoch", None):
            for curve in ("train", "val"):
                losses += [(curve, 0, epoch, k, v) for k, v in _losses_of(r, curve + "_").items()]
            for k, v in r.items():
                if k.startswith("mAP/") and isinstance(v, (int, float)):
                    maps.setdefault(k[4:], {})[epoch] = float(v)
    df = pd.DataFrame(losses, columns=["curve", "prio", "epoch", "loss", "value"])
    t_names, v_names = (set(df["loss"][df["curve"] == c]) for c in ("train", "val"))
    names = t_names & v_names or t_names or v_names
    first = next((k for k in _LOSS_KEYS if k in names), min(names, default=None))
    key = first if loss_key is None else loss_key if loss_key in names else None
    df = df[df["loss"] == key]
    df = df[df["prio"] == df.groupby(["curve", "epoch"])["prio"].transform("min")]
    curves: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    for (curve, epoch), value in df.groupby(["curve", "epoch"])["value"].mean().items():
        curves[curve][int(epoch)] = float(value)
    return {"loss_key": key, **curves, "mAP": maps}


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_training_curves(rows: Iterable[Mapping], *, loss_key: str | None = None) -> Figure:
    """Loss per epoch (train, validation) on the left and mAP per test set on the right, of
    ``metrics.jsonl`` records (``loss_key`` as in :func:`training_curves`)."""
    c = training_curves(list(rows), loss_key)
    fig, (ax_loss, ax_map) = new_figure(1, 2, figsize=(11, 3.8))
    for ax, curves, ylabel, title, empty in (
            (ax_loss, {"train": c["train"], "validation": c["val"]}, c["loss_key"] or "loss",
             "loss", "no loss records yet"),
            (ax_map, dict(sorted(c["mAP"].items())), "mAP", "test-set mAP",
             "no test-set records")):
        for label, series in curves.items():
            if series:
                epochs = sorted(series)
                ax.plot(epochs, [series[e] for e in epochs], marker="o", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        if ax.lines:
            ax.legend()
        else:
            _note(ax, empty)
    if c["mAP"]:
        ax_map.set_ylim(0, 1.02)
    return fig


def project_embeddings(emb: np.ndarray, method: str = "tsne", *, seed: int = 0) -> np.ndarray:
    """2-D coordinates [N, 2] of embeddings ``emb`` [N, D] by "pca", "tsne" or "umap" (cosine;
    umap's first import compiles with numba, ~20 s). Neighbourhoods shrink for small N so a tiny
    test set still gets a map; N < 3 falls back to PCA."""
    if (x := np.asarray(emb, dtype=np.float64)).ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"project_embeddings: expected [N, D] embeddings, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("project_embeddings: embeddings contain NaN or inf values")
    method, n = method.lower(), x.shape[0]
    if method not in ("pca", "tsne", "umap"):
        raise ConfigError(f"project_embeddings: method must be pca, tsne or umap, got {method!r}")
    if method == "pca" or n < 3:
        xc = x - x.mean(axis=0, keepdims=True)
        out = xc @ np.linalg.svd(xc, full_matrices=False)[2][:2].T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                    random_state=seed).fit_transform(x).astype(np.float64)
    import umap  # slow (numba), so only imported when asked for

    reducer = umap.UMAP(n_components=2, n_neighbors=int(max(2, min(15, n - 1))), metric="cosine",
                        random_state=seed, init="random" if n < 10 else "spectral", n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _wrap(text: str, width: int, lines: int = 3) -> str:
    """``text`` on at most ``lines`` lines of ``width`` characters (long words broken)."""
    return textwrap.fill(text, width, max_lines=lines, placeholder=" …")


_MARKS = ("never seen in training", "selected", "neighbours")


def plot_embedding_projection(emb: np.ndarray, labels: Sequence, *, method: str | None = "tsne",
                              test_only: Iterable | None = None,
                              highlight: Iterable | None = None,
                              label_names: Mapping | None = None, seed: int = 0,
                              title: str | None = None, selected: int | None = None,
                              neighbours: Sequence[int] = ()) -> Figure:
    """A 2-D map of recordings, one collection per work label: ``test_only`` labels ringed,
    ``highlight`` ones bold and annotated (the rest faded), ``selected`` (a row) a star joined to
    its ``neighbours``. ``emb``: [N, D] embeddings projected by ``method``, or [N, 2] coordinates
    with ``method`` None."""
    labels, x = list(labels), np.asarray(emb)
    if x.ndim != 2 or x.shape[0] != len(labels) or (method is None and x.shape[1] != 2):
        raise ConfigError(f"plot_embedding_projection: {len(labels)} labels for embeddings of "
                          f"shape {x.shape} (method=None needs [N, 2] coordinates)")
    xy = x.astype(np.float64) if method is None else project_embeddings(x, method, seed=seed)
    names, hl, unseen = dict(label_names or {}), set(highlight or ()), set(test_only or ())
    works, lab_arr = list(dict.fromkeys(labels)), np.array([str(v) for v in labels], dtype=object)
    size = Counter(lab_arr.tolist())  # the most recorded works (and highlighted ones) get styles
    keyed = set(sorted(works, key=lambda w: (w not in hl, -size[str(w)]))[:_MAX_KEYED])
    fig, ax = new_figure(figsize=(9 if len(keyed) <= 20 else 11, 6))
    for i, lab in enumerate(w for w in works if w in keyed):  # colour + shape unique per work
        m, bold, name = lab_arr == str(lab), lab in hl, str(names.get(lab, lab))
        ax.scatter(xy[m, 0], xy[m, 1], color=colormaps["tab10"](i % 10), s=70 if bold else 28,
                   marker=_MARKERS[(i // 10) % len(_MARKERS)], zorder=3 if bold else 2,
                   alpha=0.2 if hl and not bold else 0.9, edgecolors="black" if bold else "none",
                   label=_short(name))
        for px, py in xy[m] if bold else ():
            ax.annotate(name, (px, py), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if others := [str(w) for w in works if w not in keyed]:
        m = np.isin(lab_arr, others)
        ax.scatter(xy[m, 0], xy[m, 1], color="lightgrey", s=16, zorder=1,
                   label=f"others ({len(others)} works)")
    ring = np.flatnonzero([lab in unseen for lab in labels])
    nb = [int(j) for j in neighbours] if selected is not None else []
    for rows, mark, size, width, z in ((ring, _MARKS[0], 160, 1.0, 4), (nb, _MARKS[2], 60, 1.2, 5)):
        if len(rows):  # open black circles
            ax.scatter(xy[rows, 0], xy[rows, 1], s=size, facecolors="none", edgecolors="black",
                       linewidths=width, label=mark, zorder=z)
    if selected is not None:  # a star, joined by a line to each neighbour
        seg = np.array([[selected, j] for j in nb], dtype=int).reshape(-1, 2).T
        ax.plot(xy[seg, 0], xy[seg, 1], color="black", linewidth=0.6, alpha=0.6, zorder=4)
        ax.scatter([xy[selected, 0]], [xy[selected, 1]], s=260, marker="*", color="black",
                   label=_MARKS[1], zorder=6)
    ringed = f" ({len(unseen & set(labels))} never seen, ringed)" if len(ring) else ""
    ax.set_title(title or f"{method or 'projection'}: {len(labels)} recordings, {len(works)} "
                 f"works{ringed}", fontsize=10)
    ax.set(xticks=[], yticks=[])
    shown = {_short(str(names.get(v, v))) for v in hl} | set(_MARKS)
    handles = [h for h in ax.collections if not hl or h.get_label() in shown]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, ncols=1 if len(handles) <= 22 else 2,
              title="work (colour + shape)", title_fontsize=8)
    return fig


def plot_rank_histogram(ranks: Sequence[int], *, max_rank: int = 20) -> Figure:
    """Histogram of the 1-based rank of each query's first correct recording: a bar per rank
    up to ``max_rank`` (rank 1 green), then a grey "> max_rank" bar; ranks <= 0 (no other
    recording of the work) are only counted in the title."""
    if max_rank < 1:
        raise ConfigError(f"plot_rank_histogram: max_rank must be >= 1, got {max_rank}")
    r = np.asarray(list(ranks), dtype=np.int64)
    fig, ax = new_figure(figsize=(7, 3.5))
    sns.histplot(x=np.minimum(r[r > 0], max_rank + 1), bins=np.arange(0.5, max_rank + 2),
                 color="tab:blue", alpha=1.0, ax=ax)
    ax.patches[0].set_facecolor("tab:green")
    ax.patches[-1].set_facecolor("tab:gray")
    ticks = [1, *range(5, max_rank, 5)]  # max_rank itself would crowd the ">max_rank" label
    ax.set_xticks([*ticks, max_rank + 1], [*map(str, ticks), f">{max_rank}"])
    ax.set(xlabel="rank of the first correct recording", ylabel="queries")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    n_none, scored = int(np.sum(r <= 0)), r[r > 0]
    ax.set_title(f"{len(scored)} queries: {np.mean(scored == 1) if len(scored) else 0.0:.0%} "
                 "correct at rank 1" + (f" ({n_none} left out: no other recording of their "
                                        "work)" if n_none else ""), fontsize=10)
    return fig


def _hbars(items: list[tuple[str, float]], colours: Sequence, *, xlabel: str, title: str,
           empty: str, xlim: tuple[float, float] | None = None) -> Figure:
    """Horizontal seaborn bars of ``(label, value)`` items, the first at the top (whole-number
    ticks for whole-number values when no ``xlim``)."""
    longest = max((len(label) for label, _ in items), default=0)  # room for the bars too
    fig, ax = new_figure(figsize=(max(7.0, 3.5 + 0.065 * longest), 0.35 * max(len(items), 3) + 1.2))
    if not items:
        _note(ax, empty)
        ax.set_axis_off()
        return fig
    df = pd.DataFrame({"row": range(len(items)), "value": [v for _, v in items]})
    sns.barplot(df, x="value", y="row", hue="row", orient="h", palette=list(colours),
                legend=False, ax=ax)
    ax.set_yticks(range(len(items)), [label for label, _ in items], fontsize=8)
    ax.set(xlabel=_wrap(xlabel, 35), ylabel="", xlim=xlim)
    ax.set_title(_wrap(title, 60), fontsize=10)
    if xlim is None and all(v.is_integer() for _, v in items):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_confused_pairs(pairs: Iterable, *, top: int = 15, value_label: str = "confusions",
                        label_names: Mapping | None = None) -> Figure:
    """Horizontal bars of the ``top`` work pairs most often confused, largest at the top;
    ``pairs`` holds ``(work_a, work_b, value)`` tuples or dicts with ``work_a``, ``work_b`` and
    ``count``."""
    rows = [(p["work_a"], p["work_b"], p["count"]) if isinstance(p, Mapping) else p for p in pairs]
    rows = sorted([(a, b, float(v)) for a, b, v in rows], key=lambda t: -t[2])[:top]
    names = dict(label_names or {})
    items = [(f"{_short(str(names.get(a, a)), 30)}  ↔  {_short(str(names.get(b, b)), 30)}", v)
             for a, b, v in rows]
    return _hbars(items, ["tab:red"] * len(items), xlabel=value_label,
                  title="most confused work pairs", empty="no confusions")


def plot_per_work_ap(per_work: Mapping | Iterable, *, top: int = 30, worst_first: bool = True,
                     label_names: Mapping | None = None) -> Figure:
    """Average precision of ``top`` works as bars, worst first; ``per_work`` maps work -> AP,
    or holds ``(work, ap)`` pairs or dicts with ``work`` and ``ap``. Bars under 0.5 are red."""
    pairs = per_work.items() if isinstance(per_work, Mapping) else per_work
    items = [(p["work"], p["ap"]) if isinstance(p, Mapping) else p for p in pairs]
    items = sorted([(k, float(v)) for k, v in items], key=lambda t: t[1],
                   reverse=not worst_first)[:top]
    names = dict(label_names or {})
    return _hbars([(_short(str(names.get(k, k))), v) for k, v in items],
                  ["tab:red" if v < 0.5 else "tab:blue" for _, v in items],
                  xlabel="average precision", empty="no works", xlim=(0, 1),
                  title=f"per-work AP, {'worst' if worst_first else 'best'} {len(items)}")


def plot_count_histogram(counts: Mapping | pd.Series, *, xlabel: str, ylabel: str,
                         title: str | None = None) -> Figure:
    """Bars of how many items (values) have each whole-number count (index), e.g.
    :func:`chlib.data.datatools.works_histogram`: a bar per count at its place on a whole-number
    axis, gaps kept, so one count is one narrow bar over its number."""
    c = pd.Series(counts).sort_index()
    fig, ax = new_figure(figsize=(6, 3.5))
    sns.barplot(x=np.asarray(c.index, dtype=np.int64), y=c.to_numpy(), native_scale=True,
                color="tab:blue", width=0.6, ax=ax)
    ax.set_xlim(c.index.min() - 1, c.index.max() + 1)
    if len(c) <= 15:
        ax.set_xticks(list(c.index), [str(int(v)) for v in c.index])
    for axis in (ax.xaxis, ax.yaxis) if len(c) > 15 else (ax.yaxis,):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(_wrap(title or "", 60), fontsize=10)
    return fig
