"""07's explorer (issue 11): the map on its own full-width row at a fixed size, names on hover,
a busy message while a slow projection is computed."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import ipywidgets as w
import matplotlib.image as plt_image
import numpy as np
from test_widgets import _explorer_data

from chlib.ui import explorer, plots
from chlib.ui.report import explorer_projection


def _svg_size(markup: str) -> tuple[int, int]:
    head = re.search(r"<svg[^>]*>", markup).group(0)
    return (int(re.search(r' width="(\d+)"', head).group(1)),
            int(re.search(r' height="(\d+)"', head).group(1)))


def _boxes_holding(root, target):
    """The boxes on the path from ``root`` down to ``target``."""
    if root is target:
        return []
    for child in getattr(root, "children", ()):
        if (path := _boxes_holding(child, target)) is not None:
            return [root, *path]
    return None


def test_map_has_its_own_full_width_row_and_keeps_its_size_after_a_pick(tmp_path):
    ex = explorer.EmbeddingExplorer(_explorer_data(tmp_path), projection="pca", point="p4")
    ex.refresh()
    assert ex.map in ex.widget.children and ex.detail_out in ex.widget.children
    assert isinstance(ex.widget, w.VBox)
    assert not any(isinstance(b, w.HBox) for b in _boxes_holding(ex.widget, ex.map))
    kids = list(ex.widget.children)
    assert kids.index(ex.map) < kids.index(ex.detail_out)  # controls, map, then the table
    assert ex.map.layout.width == "100%"
    assert _svg_size(ex.map.svg) == (1100, 700)
    ex.point.value = "p7"  # a pick redraws the map at the same size
    assert "p7" in ex.map.svg and _svg_size(ex.map.svg) == (1100, 700)
    ex.colour.value = "instrument"  # a shorter legend does not shrink it either
    assert _svg_size(ex.map.svg) == (1100, 700)


def test_points_carry_their_work_names_on_hover(tmp_path):
    data = _explorer_data(tmp_path)
    ex = explorer.EmbeddingExplorer(data, projection="pca")
    ex.refresh()
    dots = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"[^>]*><title>([^<]*)</title>',
                      ex.map.svg)
    assert len(dots) == len(data)
    ElementTree.fromstring(ex.map.svg)  # well-formed SVG
    for (_, _, name), rec in zip(dots, data.records, strict=True):
        assert rec["work"] in name and rec["perf"] in name
    xy = explorer_projection(data, "pca", 0)
    cx, cy = (np.array([float(d[k]) for d in dots]) for k in (0, 1))
    assert np.all((cx > 0) & (cx < 1100) & (cy > 0) & (cy < 700))
    np.testing.assert_array_equal(np.argsort(cx), np.argsort(xy[:, 0]))
    np.testing.assert_array_equal(np.argsort(cy), np.argsort(-xy[:, 1]))  # SVG y points down
    png = base64.b64decode(re.search(r'base64,([^"]+)"', ex.map.svg).group(1))
    pixels = plt_image.imread(io.BytesIO(png))
    x, y = (round(float(v)) for v in dots[ex.state()["row"]][:2])
    assert pixels[y, x, :3].max() < 0.3  # the hover spot sits on the chosen point's black star


def test_a_slow_projection_shows_a_busy_message_while_it_runs(tmp_path, monkeypatch):
    data = _explorer_data(tmp_path)
    seen = []

    def fake_project(emb, method, *, seed=0):
        seen.append((method, ex.status.value))
        return np.asarray(emb, dtype=np.float64)[:, :2]

    monkeypatch.setattr(plots, "project_embeddings", fake_project)
    ex = explorer.EmbeddingExplorer(data, projection="tsne")
    ex.refresh()
    assert seen and seen[0][0] == "tsne" and "t-SNE" in seen[0][1] and "9 recordings" in seen[0][1]
    assert ex.status.value == ""  # cleared once the map is drawn
    assert explorer.projection_note(data, "tsne", 0) == ""  # cached now: no message
    assert explorer.projection_note(data, "pca", 0) == ""  # fast


def test_the_notebook_announces_the_projection_before_computing_it():
    nb = json.loads((Path(__file__).parents[1] / "notebooks/07_explore.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    step2 = next(c for c in cells if "explorer_map_figure" in c)
    assert step2.index("projection_note(") < step2.index("explorer_map_figure")


def test_a_click_on_the_map_picks_that_recording(tmp_path):
    data = _explorer_data(tmp_path)
    ex = explorer.EmbeddingExplorer(data, projection="pca", point="p1")
    ex.refresh()
    i = next(j for j, r in enumerate(data.records) if r["perf"] == "p6")
    assert f'data-i="{i}"' in ex.map.svg
    ex.map.picked = i  # what the front end sends on a click on that circle
    assert ex.point.value == "p6" and ex.state()["row"] == i
    assert ex.map.picked == -1  # handled: a second click on the same point counts again
    ex.point.value = "p1"
    ex.map.picked = i
    assert ex.point.value == "p6"
