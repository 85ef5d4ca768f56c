"""The embedding explorer of 07_explore: a map of a run's recordings (full width, fixed size,
work names on hover, a click picks a point), a point's neighbours, audio and CQT.

The map is a PNG of the matplotlib figure inside an SVG with one invisible circle per point
(its ``<title>`` is the hover text). :class:`ClickableMap` shows that SVG in a tiny anywidget
whose front-end code (below, 15 lines) reports the clicked circle's index to Python; anywidget
works in JupyterLab, Notebook 7, VS Code and Colab (there after
``google.colab.output.enable_custom_widget_manager()``, which the notebooks' set-up cell runs)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

import anywidget
import ipywidgets as w
import numpy as np
import traitlets
from IPython.display import display

from chlib.ui.plots import figure_png, plot_cqts
from chlib.ui.report import explorer_map_figure, explorer_projection
from chlib.ui.widgets import ParameterForm, audio_player, png_image, show, table

__all__ = ["projection_note", "svg_with_names", "ClickableMap", "EmbeddingExplorer"]

_MAP_INCHES = (11.0, 7.0)  # the explorer's map: 1100 x 700 px at 100 dpi, whatever is shown


def projection_note(data: Any, method: str, seed: int = 0) -> str:
    """What to say while ``data``'s ``method`` map is computed ("" if it is fast or cached)."""
    if method == "pca" or (method, seed) in data.projections:
        return ""
    name = {"tsne": "t-SNE", "umap": "UMAP"}.get(method, method)
    return f"Computing the {name} map of {len(data)} recordings (can take ~20 s)..."


def svg_with_names(fig: Any, xy: np.ndarray, names: Sequence[str]) -> str:
    """``fig`` as an inline SVG of its PNG, each point of ``xy`` (data coordinates of its first
    axes) named on hover by an SVG ``<title>`` (no front-end extension needed)."""
    png = base64.b64encode(figure_png(fig, fig.dpi)).decode()  # draws: the layout is final
    wd, ht = (round(v * fig.dpi) for v in fig.get_size_inches())
    px = fig.axes[0].transData.transform(np.asarray(xy, dtype=np.float64))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{ht - y:.1f}" r="7" fill="#fff" fill-opacity="0" '
                   f'data-i="{i}" style="cursor:pointer"><title>{html.escape(str(n))}</title>'
                   "</circle>" for i, ((x, y), n) in enumerate(zip(px, names, strict=True)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{wd}" height="{ht}" '
            f'viewBox="0 0 {wd} {ht}" style="max-width:100%;height:auto">'
            f'<image href="data:image/png;base64,{png}" width="{wd}" height="{ht}"/>{dots}</svg>')


class ClickableMap(anywidget.AnyWidget):
    """Shows ``svg`` (from :func:`svg_with_names`); a click on a point's circle sets ``picked``
    to its index (Python sets it back to -1 once handled, so a second click on it counts)."""

    _esm = """
    function render({ model, el }) {
      const draw = () => {
        el.innerHTML = model.get("svg");
        el.querySelectorAll("circle[data-i]").forEach((dot) => {
          dot.addEventListener("click", () => {
            model.set("picked", Number(dot.dataset.i));
            model.save_changes();
          });
        });
      };
      model.on("change:svg", draw);
      draw();
    }
    export default { render };
    """
    svg = traitlets.Unicode("").tag(sync=True)
    picked = traitlets.Int(-1).tag(sync=True)


class EmbeddingExplorer:
    """Map of an ExplorerData's recordings: colour by any column, find a work, pick a recording
    to list its neighbours (from the ``point`` box or by clicking it on the map), hear it and see
    its CQT; ``widget``: the controls, then the map (full width, fixed size, names on hover),
    then the details."""

    def __init__(self, data: Any, *, projection: str = "umap", colour_by: str = "work",
                 highlight_work: str = "", point: str = "", n_neighbours: int = 10,
                 seed: int = 0, features: Any = None, max_seconds: float = 30.0):
        self.data, self.seed, self.features, self.max_seconds = data, seed, features, max_seconds
        perfs = [str(r["perf"]) for r in data.records]
        form = ParameterForm(
            {"projection": projection, "colour_by": colour_by, "highlight_work": highlight_work,
             "point": perfs[data.index_of(point) if point else 0], "n_neighbours": n_neighbours},
            choices={"projection": ["umap", "tsne", "pca"], "colour_by": data.columns(),
                     "point": perfs})
        self.projection, self.colour, self.search, self.point, self.k = form.inputs.values()
        form.observe(lambda _name, _value: self.refresh())
        self.status, self.detail_out = w.HTML(), w.Output()
        self.map = ClickableMap(layout=w.Layout(width="100%"))
        self.map.observe(self._clicked, names="picked")
        self.widget = w.VBox([form.widget, self.status, self.map, self.detail_out])

    def _clicked(self, change: dict) -> None:
        """A click on the map picks that recording (the ``point`` box follows and redraws)."""
        if (i := change["new"]) < 0:
            return
        self.map.picked = -1
        if 0 <= i < len(self.data):
            self.point.value = str(self.data.records[i]["perf"])

    def state(self) -> dict:
        """The current choices as plain values."""
        return {"projection": self.projection.value, "colour_by": self.colour.value,
                "highlight": self.data.matching_works(self.search.value.strip()),
                "row": self.data.index_of(self.point.value), "k": self.k.value}

    def map_figure(self) -> Any:
        """The projection with the current colouring, highlight, selection and neighbours."""
        fig = explorer_map_figure(self.data, self.projection.value, self.colour.value,
                                  row=self.data.index_of(self.point.value),
                                  highlight_work=self.search.value.strip(),
                                  n_neighbours=self.k.value, seed=self.seed)
        fig.set_size_inches(*_MAP_INCHES)
        return fig

    def refresh(self) -> None:
        """Redraw the map and the selected recording's details."""
        row = self.data.index_of(self.point.value)
        rec, method = self.data.records[row], self.projection.value
        if note := projection_note(self.data, method, self.seed):
            self.status.value = f"<i>{html.escape(note)}</i>"
        try:
            names = [f"{r['work']} - {r['perf']} ({r.get('role')})" for r in self.data.records]
            self.map.svg = svg_with_names(self.map_figure(), explorer_projection(
                self.data, method, self.seed), names)
        finally:
            self.status.value = ""
        self.detail_out.clear_output(wait=True)
        with self.detail_out:
            print(f"{rec['perf']} - {rec['work']} ({rec.get('role')})")
            if rec.get("wav"):
                display(audio_player(rec["wav"], max_seconds=self.max_seconds))
            display(table(self.data.neighbours(row, self.k.value),
                          ["rank", "perf", "work", "role", "distance", "same_work"]))
            if rec.get("feat"):
                display(png_image(plot_cqts([self.data.cqt(row)], [str(rec["perf"])],
                                       features=self.features, max_seconds=self.max_seconds,
                                       panel_size=(6, 2.8))))

    def show(self) -> None:
        """Display the explorer and draw it once."""
        show(self.widget)
        self.refresh()
