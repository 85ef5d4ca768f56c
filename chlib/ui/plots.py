"""Figures for the notebooks: CQTs, training curves, embedding maps and evaluation charts.

Every function takes explicit data (arrays, lists of dicts), never reads files, and returns a
:class:`matplotlib.figure.Figure`, so the same call serves a notebook cell, a headless run and a
test. :func:`save_figure` writes a PNG atomically. Figures are built with the object-oriented API
(``Figure`` + ``FigureCanvasAgg``), not ``pyplot``: nothing is left open in pyplot's registry and
no GUI backend is needed; Jupyter shows a returned Figure through its ``_repr_png_``.

Units: CQT arrays are ``[frames, bins]`` in dB (0 = the track's loudest cell), frames at
``frames_per_second`` (25 by default: 16 kHz, hop 640), bin ``b`` centred on
``fmin * 2 ** (b / bins_per_octave)`` Hz.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chlib.core.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "new_figure",
    "plot_cqt",
    "plot_cqts",
    "training_curves",
    "plot_training_curves",
    "project_embeddings",
    "plot_embedding_projection",
    "plot_rank_histogram",
    "plot_confused_pairs",
    "plot_per_work_ap",
    "save_figure",
    "note_name",
]

_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "p")


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (8, 4),
               **subplot_kw: Any):
    """A Figure with an Agg canvas and its axes (``squeeze``d like ``plt.subplots``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _register_notebook_display()
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _register_notebook_display() -> None:
    """Inside IPython, show a returned Figure as a PNG (no pyplot or ``%matplotlib`` needed).

    Figures built here are not pyplot-managed, so IPython needs a PNG formatter for them; the
    inline backend registers one only after pyplot is imported. Idempotent; a no-op elsewhere.
    """
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython
    from matplotlib.figure import Figure

    ip = get_ipython()
    if ip is None:
        return
    png = ip.display_formatter.formatters["image/png"]
    if Figure not in png.type_printers:  # the inline backend may have registered its own
        png.for_type(Figure, _figure_png)


def note_name(freq_hz: float) -> str:
    """Nearest equal-tempered note name of ``freq_hz`` (A4 = 440 Hz), e.g. 32 Hz -> ``"C1"``."""
    if freq_hz <= 0:
        raise ConfigError(f"note_name: frequency must be > 0 Hz, got {freq_hz}")
    midi = int(round(69 + 12 * math.log2(freq_hz / 440.0)))
    return f"{_NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def _check_cqt(cqt: np.ndarray, what: str = "cqt") -> np.ndarray:
    a = np.asarray(cqt)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ConfigError(f"{what}: expected a [frames, bins] array, got shape {a.shape}")
    return a


def _draw_cqt(ax, cqt: np.ndarray, *, frames_per_second: float, fmin: float,
              bins_per_octave: int, vmin: float | None, vmax: float | None, title: str | None):
    n_frames, n_bins = cqt.shape
    extent = (0.0, n_frames / frames_per_second, -0.5, n_bins - 0.5)
    im = ax.imshow(cqt.T, origin="lower", aspect="auto", extent=extent, cmap="magma",
                   vmin=vmin, vmax=vmax, interpolation="nearest")
    ticks = list(range(0, n_bins, bins_per_octave))
    ax.set_yticks(ticks)
    ax.set_yticklabels([note_name(fmin * 2 ** (b / bins_per_octave)) for b in ticks])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("CQT bin (note)")
    if title:
        ax.set_title(title, fontsize=9)
    return im


def _axes_from(features: Any, frames_per_second: float, fmin: float,
               bins_per_octave: int) -> tuple[float, float, int]:
    if features is None:
        return frames_per_second, fmin, bins_per_octave
    return float(features.frames_per_second), float(features.fmin), int(features.bins_per_octave)


def plot_cqt(cqt: np.ndarray, *, frames_per_second: float = 25.0, fmin: float = 32.0,
             bins_per_octave: int = 12, features: Any = None, title: str | None = None,
             vmin: float | None = -80.0, vmax: float | None = 0.0,
             figsize: tuple[float, float] = (8, 3.5)) -> Figure:
    """One CQT as an image: time (s) across, pitch up, colour = dB.

    Parameters
    ----------
    cqt : array [frames, bins], dB (0 = loudest cell of the track).
    frames_per_second : frames per second of ``cqt`` (25 for 16 kHz audio with hop 640).
    fmin, bins_per_octave : pitch of bin 0 in Hz and bins per octave (octave ticks are named).
    features : a :class:`chlib.core.config.FeatureSettings`; when given, its frames per second,
        fmin and bins per octave replace the three arguments above.
    vmin, vmax : dB range of the colour scale (None: the data range).
    """
    frames_per_second, fmin, bins_per_octave = _axes_from(features, frames_per_second, fmin,
                                                           bins_per_octave)
    cqt = _check_cqt(cqt)
    fig, ax = new_figure(figsize=figsize)
    im = _draw_cqt(ax, cqt, frames_per_second=frames_per_second, fmin=fmin,
                   bins_per_octave=bins_per_octave, vmin=vmin, vmax=vmax, title=title)
    fig.colorbar(im, ax=ax, label="dB")
    return fig


def plot_cqts(cqts: Sequence[np.ndarray], titles: Sequence[str] | None = None, *,
              frames_per_second: float = 25.0, fmin: float = 32.0, bins_per_octave: int = 12,
              features: Any = None, ncols: int | None = None, max_seconds: float | None = None,
              vmin: float | None = -80.0, vmax: float | None = 0.0,
              panel_size: tuple[float, float] = (4.0, 3.0)) -> Figure:
    """Several CQTs side by side (e.g. performances of one work), one panel each.

    ``max_seconds`` crops every panel to its first seconds so tempo and key can be compared;
    ``ncols`` defaults to all panels in one row (at most 4 per row). ``features`` (a
    FeatureSettings) sets the time and pitch axes as in :func:`plot_cqt`.
    """
    frames_per_second, fmin, bins_per_octave = _axes_from(features, frames_per_second, fmin,
                                                           bins_per_octave)
    if len(cqts) == 0:
        raise ConfigError("plot_cqts: no CQT arrays given")
    if titles is not None and len(titles) != len(cqts):
        raise ConfigError(f"plot_cqts: {len(titles)} titles for {len(cqts)} CQT arrays")
    arrays = [_check_cqt(c, f"cqts[{i}]") for i, c in enumerate(cqts)]
    if max_seconds is not None:
        n = max(1, int(round(max_seconds * frames_per_second)))
        arrays = [a[:n] for a in arrays]
    ncols = ncols or min(len(arrays), 4)
    nrows = math.ceil(len(arrays) / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
                           squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= len(arrays):
            ax.set_visible(False)
            continue
        im = _draw_cqt(ax, arrays[i], frames_per_second=frames_per_second, fmin=fmin,
                       bins_per_octave=bins_per_octave, vmin=vmin, vmax=vmax,
                       title=titles[i] if titles else None)
        if i % ncols:
            ax.set_ylabel("")
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), label="dB", shrink=0.8)
    return fig


# --------------------------------------------------------------------------------------------
# training curves

_LOSS_KEYS = ("loss", "foc_loss", "total_loss", "total", "tri_loss", "cen_loss")


def _losses_of(row: Mapping, prefix: str = "") -> dict[str, float]:
    """Loss values of a metrics row: a ``losses`` mapping, else top-level ``<prefix>*loss`` /
    ``<prefix>total`` keys (prefix stripped)."""
    src = row.get("losses")
    if not isinstance(src, Mapping):
        src = {k[len(prefix):]: v for k, v in row.items()
               if k.startswith(prefix) and (k.endswith("loss") or k == f"{prefix}total")}
    return {k: float(v) for k, v in src.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _pick_loss(available: Iterable[str], wanted: str | None) -> str | None:
    avail = list(available)
    if wanted is not None:
        return wanted if wanted in avail else None
    return next((k for k in _LOSS_KEYS if k in avail), avail[0] if avail else None)


def training_curves(rows: Iterable[Mapping], loss_key: str | None = None) -> dict:
    """Per-epoch series from metrics records: ``{"loss_key", "train", "val", "mAP"}``.

    ``train`` / ``val`` map epoch -> loss, ``mAP`` maps test set -> {epoch -> mAP}. Sources, in
    order of preference: ``epoch`` records (``train_<loss>``, ``val_<loss>``, ``mAP/<set>``, as
    :func:`chlib.train.loop.train` writes them and passes to callbacks), then ``train`` records
    (averaged per epoch), ``val`` records and ``test`` records.
    """
    train_steps: dict[int, list[dict]] = {}
    val_rows: dict[int, dict] = {}
    ep_train: dict[int, dict] = {}
    ep_val: dict[int, dict] = {}
    maps: dict[str, dict[int, float]] = {}
    for r in rows:
        if not isinstance(r, Mapping) or r.get("epoch") is None:
            continue
        kind, epoch = r.get("kind"), int(r["epoch"])
        if kind == "train":
            train_steps.setdefault(epoch, []).append(_losses_of(r))
        elif kind == "val":
            val_rows[epoch] = _losses_of(r)
        elif kind == "test" and isinstance(r.get("mAP"), (int, float)):
            maps.setdefault(str(r.get("testset", "test")), {})[epoch] = float(r["mAP"])
        elif kind == "epoch" or kind is None:
            ep_train[epoch] = _losses_of(r, "train_")
            ep_val[epoch] = _losses_of(r, "val_")
            for k, v in r.items():
                if k.startswith("mAP/") and isinstance(v, (int, float)):
                    maps.setdefault(k[4:], {})[epoch] = float(v)
    t_names = {k for d in ep_train.values() for k in d}
    t_names |= {k for steps in train_steps.values() for d in steps for k in d}
    v_names = {k for d in (*ep_val.values(), *val_rows.values()) for k in d}
    both = t_names & v_names  # prefer a loss that both curves have
    names = both or t_names or v_names
    key = _pick_loss(sorted(names, key=lambda k: (k not in _LOSS_KEYS, k)), loss_key)
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    if key is not None:
        for e in sorted(set(ep_train) | set(train_steps)):
            if key in ep_train.get(e, {}):
                train[e] = ep_train[e][key]
            else:
                vals = [d[key] for d in train_steps.get(e, []) if key in d]
                if vals:
                    train[e] = float(np.mean(vals))
        for e in sorted(set(ep_val) | set(val_rows)):
            src = ep_val.get(e, {}) if key in ep_val.get(e, {}) else val_rows.get(e, {})
            if key in src:
                val[e] = src[key]
    return {"loss_key": key, "train": train, "val": val, "mAP": maps}


def plot_training_curves(rows: Iterable[Mapping], *, loss_key: str | None = None,
                         figsize: tuple[float, float] = (11, 3.8)) -> Figure:
    """Loss per epoch (train and validation) and mAP per test set per epoch.

    Parameters
    ----------
    rows : metrics records as in ``runs/<name>/metrics.jsonl`` (see :func:`training_curves`):
        ``epoch`` records with ``train_<loss>``, ``val_<loss>``, ``mAP/<testset>``; or ``train``
        / ``val`` records with loss keys (or a ``losses`` mapping) and ``test`` records with
        ``testset`` and ``mAP``.
    loss_key : which loss to draw (default: ``loss``, else ``foc_loss`` - the original's
        val_loss -, else ``total``, else the first one seen).

    Returns a Figure with two axes: left losses, right mAP (a note when there is nothing yet).
    """
    c = training_curves(list(rows), loss_key)
    fig, (ax_loss, ax_map) = new_figure(1, 2, figsize=figsize)
    for series, label, marker in ((c["train"], "train", "o"), (c["val"], "validation", "s")):
        if series:
            ep = sorted(series)
            ax_loss.plot(ep, [series[e] for e in ep], marker=marker, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel(c["loss_key"] or "loss")
    ax_loss.set_title("loss")
    if c["train"] or c["val"]:
        ax_loss.legend()
    else:
        ax_loss.text(0.5, 0.5, "no loss records yet", ha="center", va="center",
                     transform=ax_loss.transAxes)
    for name, series in sorted(c["mAP"].items()):
        ep = sorted(series)
        ax_map.plot(ep, [series[e] for e in ep], marker="o", label=name)
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("mAP")
    ax_map.set_title("test-set mAP")
    if c["mAP"]:
        ax_map.set_ylim(0, 1.02)
        ax_map.legend()
    else:
        ax_map.text(0.5, 0.5, "no test-set records", ha="center", va="center",
                    transform=ax_map.transAxes)
    return fig


# --------------------------------------------------------------------------------------------
# embeddings


def project_embeddings(emb: np.ndarray, method: str = "tsne", *, seed: int = 0,
                       metric: str = "cosine") -> np.ndarray:
    """2-D coordinates of embeddings for a map: ``"pca"``, ``"tsne"`` or ``"umap"``.

    Parameters
    ----------
    emb : array [N, D], one vector per recording (need not be unit length).
    method : "pca" (instant, linear), "tsne" (scikit-learn; local neighbourhoods) or "umap"
        (umap-learn; the first import compiles with numba, ~20 s once).
    seed : random state of t-SNE / UMAP (PCA is deterministic).
    metric : distance for t-SNE and UMAP ("cosine" matches the retrieval distance).

    Returns an array [N, 2]. Neighbourhood sizes shrink for small N (perplexity < N,
    n_neighbors < N) so that a tiny test set still gets a map; N < 3 falls back to PCA.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"project_embeddings: expected [N, D] embeddings, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("project_embeddings: embeddings contain NaN or inf values")
    method = method.lower()
    if method not in ("pca", "tsne", "umap"):
        raise ConfigError(f"project_embeddings: method must be pca, tsne or umap, got {method!r}")
    n = x.shape[0]
    if method == "pca" or n < 3:
        return _pca_2d(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, metric=metric, init="pca",
                    random_state=seed).fit_transform(x).astype(np.float64)
    import umap  # slow (numba), so only imported when asked for

    reducer = umap.UMAP(n_components=2, n_neighbors=int(max(2, min(15, n - 1))), metric=metric,
                        random_state=seed, init="random" if n < 10 else "spectral", n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0, keepdims=True)
    if xc.shape[0] < 2 or not np.any(xc):
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    out = xc @ vt[:2].T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _label_style(labels: Sequence) -> dict:
    """A colour and marker per distinct label (20 colours x 8 markers before repeating).

    The 20 colours are tab20's dark shades first, then its light ones, so that up to 10 labels
    get 10 clearly different hues.
    """
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    uniq = list(dict.fromkeys(labels))
    return {lab: (cmap(order[i % 20]), _MARKERS[(i // 20) % len(_MARKERS)])
            for i, lab in enumerate(uniq)}


def plot_embedding_projection(emb: np.ndarray, labels: Sequence, *, method: str | None = "tsne",
                              test_only: Iterable | None = None,
                              highlight: Iterable | None = None,
                              label_names: Mapping | None = None, seed: int = 0,
                              title: str | None = None, annotate: bool | None = None,
                              selected: int | None = None,
                              neighbours: Sequence[int] = (),
                              figsize: tuple[float, float] = (9, 6)) -> Figure:
    """A 2-D map of recordings coloured by work, never-seen works ringed, chosen works bold.

    Parameters
    ----------
    emb : array [N, D] embeddings, or [N, 2] coordinates when ``method`` is None.
    labels : N work labels (ids or names), one per row.
    method : "tsne", "umap", "pca" (see :func:`project_embeddings`) or None (``emb`` is 2-D).
    test_only : labels of works never seen in training: their points get a black ring.
    highlight : labels to emphasise; every other point is drawn faded.
    label_names : optional label -> display name (legend and annotations).
    annotate : write the work name beside each highlighted point (default: when highlighting).
    selected : row of a chosen point, drawn as a large black star ("selected" collection).
    neighbours : rows of its neighbours, joined to it by thin lines and drawn with black
        edges ("neighbours" collection).

    Returns the Figure; the scatter points of each label are one collection whose ``label``
    is the work's display name (test-only rings form one extra collection, "never seen").
    """
    labels = list(labels)
    x = np.asarray(emb)
    if x.ndim != 2 or x.shape[0] != len(labels):
        raise ConfigError(
            f"plot_embedding_projection: {len(labels)} labels for embeddings of shape {x.shape}"
        )
    if method is None:
        if x.shape[1] != 2:
            raise ConfigError("plot_embedding_projection: method=None needs [N, 2] coordinates")
        xy = x.astype(np.float64)
    else:
        xy = project_embeddings(x, method, seed=seed)
    names = dict(label_names or {})
    style = _label_style(labels)
    hl = set(highlight) if highlight is not None else set()
    to = set(test_only) if test_only is not None else set()
    annotate = bool(hl) if annotate is None else annotate
    lab_arr = np.array([str(v) for v in labels], dtype=object)
    fig, ax = new_figure(figsize=figsize)
    for lab, (colour, marker) in style.items():
        m = lab_arr == str(lab)
        faded = bool(hl) and lab not in hl
        ax.scatter(xy[m, 0], xy[m, 1], color=colour, marker=marker,
                   s=70 if lab in hl else 28, alpha=0.2 if faded else 0.9,
                   edgecolors="black" if lab in hl else "none",
                   label=_short(str(names.get(lab, lab))), zorder=3 if lab in hl else 2)
        if annotate and lab in hl:
            for px, py in xy[m]:
                ax.annotate(str(names.get(lab, lab)), (px, py), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
    ring = np.array([lab in to for lab in labels], dtype=bool)
    if ring.any():
        ax.scatter(xy[ring, 0], xy[ring, 1], s=160, facecolors="none", edgecolors="black",
                   linewidths=1.0, label="never seen in training", zorder=4)
    nb = [int(j) for j in neighbours]
    if selected is not None:
        for j in nb:
            ax.plot([xy[selected, 0], xy[j, 0]], [xy[selected, 1], xy[j, 1]], color="black",
                    linewidth=0.6, alpha=0.6, zorder=4)
        if nb:
            ax.scatter(xy[nb, 0], xy[nb, 1], s=60, facecolors="none", edgecolors="black",
                       linewidths=1.2, label="neighbours", zorder=5)
        ax.scatter([xy[selected, 0]], [xy[selected, 1]], s=260, marker="*", color="black",
                   label="selected", zorder=6)
    n_works = len(style)
    ax.set_title(title or f"{method or 'projection'}: {len(labels)} recordings, {n_works} works"
                 + (f" ({len(set(lab for lab in labels if lab in to))} never seen, ringed)"
                    if ring.any() else ""), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if n_works <= 20 or hl:
        marks = ("never seen in training", "selected", "neighbours")
        handles = [h for h in ax.collections
                   if not hl or h.get_label() in {_short(str(names.get(x, x))) for x in hl}
                   or h.get_label() in marks]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, ncols=1 if len(handles) <= 24 else 2)
    return fig


# --------------------------------------------------------------------------------------------
# evaluation charts


def plot_rank_histogram(ranks: Sequence[int], *, max_rank: int = 20,
                        figsize: tuple[float, float] = (7, 3.5)) -> Figure:
    """How far down the ranking the first correct recording sits, per query.

    Parameters
    ----------
    ranks : 1-based rank of the first recording of the query's work, per query; 0 (or less)
        means the query's work has no other recording among the references.
    max_rank : ranks 1..max_rank get one bar each; larger ranks share a final "> max_rank" bar.

    Returns a Figure with ``max_rank + 1`` bars (the last one the overflow bar).
    """
    r = np.asarray(list(ranks), dtype=np.int64)
    if max_rank < 1:
        raise ConfigError(f"plot_rank_histogram: max_rank must be >= 1, got {max_rank}")
    found = r[r > 0]
    counts = [int(np.sum(found == k)) for k in range(1, max_rank + 1)]
    counts.append(int(np.sum(found > max_rank)))
    fig, ax = new_figure(figsize=figsize)
    pos = np.arange(1, max_rank + 2)
    colours = ["tab:green"] + ["tab:blue"] * (max_rank - 1) + ["tab:gray"]
    ax.bar(pos, counts, color=colours)
    ax.set_xticks([1, *range(5, max_rank + 1, 5), max_rank + 1])
    ax.set_xticklabels([str(t) for t in [1, *range(5, max_rank + 1, 5)]] + [f">{max_rank}"])
    ax.set_xlabel("rank of the first correct recording")
    ax.set_ylabel("queries")
    n_none = int(np.sum(r <= 0))
    share = counts[0] / len(r) if len(r) else 0.0
    ax.set_title(f"{len(r)} queries: {share:.0%} correct at rank 1"
                 + (f"; {n_none} without any other recording of their work" if n_none else ""),
                 fontsize=10)
    return fig


def _pair_rows(pairs: Iterable) -> list[tuple[Any, Any, float]]:
    out = []
    for p in pairs:
        if isinstance(p, Mapping):
            a = p.get("work_a", p.get("a"))
            b = p.get("work_b", p.get("b"))
            v = p.get("count", p.get("value", p.get("n", p.get("distance"))))
        else:
            a, b, v = p[0], p[1], p[2]
        out.append((a, b, float(v)))
    return out


def plot_confused_pairs(pairs: Iterable, *, top: int = 15, value_label: str = "confusions",
                        label_names: Mapping | None = None,
                        figsize: tuple[float, float] | None = None) -> Figure:
    """Horizontal bars of the work pairs most often confused, largest at the top.

    Parameters
    ----------
    pairs : ``(work_a, work_b, value)`` tuples or dicts with ``work_a``, ``work_b`` and
        ``count`` (or ``value``), e.g. how often a recording of ``work_a`` ranked a recording of
        ``work_b`` first.
    top : keep the ``top`` largest values.
    """
    rows = sorted(_pair_rows(pairs), key=lambda t: -t[2])[:top]
    names = dict(label_names or {})
    fig, ax = new_figure(figsize=figsize or (7, 0.35 * max(len(rows), 3) + 1.2))
    if not rows:
        ax.text(0.5, 0.5, "no confusions", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    text = [f"{names.get(a, a)}  ↔  {names.get(b, b)}" for a, b, _ in rows]
    values = [v for *_, v in rows]
    ax.barh(range(len(rows)), values, color="tab:red")
    if all(float(v).is_integer() for v in values):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(text, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(value_label)
    ax.set_title("most confused work pairs", fontsize=10)
    return fig


def plot_per_work_ap(per_work: Mapping | Iterable, *, top: int = 30, worst_first: bool = True,
                     label_names: Mapping | None = None,
                     figsize: tuple[float, float] | None = None) -> Figure:
    """Average precision per work as horizontal bars, worst first (the works to look at).

    Parameters
    ----------
    per_work : mapping work -> AP in [0, 1], or ``(work, ap)`` pairs, or dicts with ``work``
        and ``ap``.
    top : how many works to show.
    """
    if isinstance(per_work, Mapping):
        items = [(k, float(v)) for k, v in per_work.items()]
    else:
        items = []
        for p in per_work:
            if isinstance(p, Mapping):
                items.append((p.get("work", p.get("label")), float(p["ap"])))
            else:
                items.append((p[0], float(p[1])))
    items.sort(key=lambda t: t[1], reverse=not worst_first)
    items = items[:top]
    names = dict(label_names or {})
    fig, ax = new_figure(figsize=figsize or (7, 0.3 * max(len(items), 3) + 1.2))
    if not items:
        ax.text(0.5, 0.5, "no works", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ax.barh(range(len(items)), [v for _, v in items],
            color=["tab:red" if v < 0.5 else "tab:blue" for _, v in items])
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([str(names.get(k, k)) for k, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.set_title(f"per-work AP, {'worst' if worst_first else 'best'} {len(items)}", fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (folders are created); returns the path."""
    from chlib.core.io import atomic_write_bytes

    _register_notebook_display()  # so that a Figure made elsewhere also shows as a PNG
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"save_figure: {path} should end in .png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return path
