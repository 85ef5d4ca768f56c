"""What a person sees in JupyterLab at 1280 px (issue 11), in a real headless Chromium: 07's
explorer map is the largest thing on screen and picks a recording when clicked; 06's tables
keep their verdict column on screen. Screenshots go to tmp_path, or to ``$CHLIB_SCREENSHOTS``
(how docs/figures/browser_*.png were made)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import VIEWPORT, notebook_page, wait_for_output

pytestmark = pytest.mark.slow

_EXPLORER = """
import numpy as np
from chlib.retrieval.explore import ExplorerData
from chlib.ui import explorer

rng = np.random.default_rng(0)
centres = rng.normal(size=(12, 16))
emb, recs = [], []
for i in range(72):
    v = centres[i % 12] + rng.normal(0, 0.3, 16)
    emb.append(v / np.linalg.norm(v))
    recs.append({"perf": f"perf{i:02d}", "work": f"The tune number {i % 12}",
                 "role": "query" if i < 12 else "reference"})
ex = explorer.EmbeddingExplorer(ExplorerData(np.array(emb, dtype=np.float32), recs),
                                projection="pca", point="perf00")
ex.show()
"""

_TABLE = """
from chlib.ui import report, widgets

folder = "/home/someone/Music/field recordings/2023 summer sessions/County Clare/Ennis/"
rows = [{"query": folder + f"session_{i:02d}_the_long_named_reel_and_its_jig.wav",
         "work": f"The Maid Behind the Bar {i}", "distance": 0.1234, "p_value": 0.0004,
         "verdict": "likely the same work", "error": None} for i in range(6)]
widgets.table(report.file_names(rows), ["query", "work", "distance", "p_value", "verdict",
                                        "error"], title="best match each")
"""


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("CHLIB_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def test_explorer_map_is_the_largest_thing_and_a_click_picks_a_point(tmp_path):
    with notebook_page(tmp_path, "explore.ipynb", [_EXPLORER]) as page:
        wait_for_output(page, ".jp-OutputArea svg circle[data-i]", tmp_path / "failed.png")
        page.wait_for_timeout(500)
        page.screenshot(path=str(_shots(tmp_path) / "browser_explorer_1280.png"))
        svg = _box(page, ".jp-OutputArea svg")
        panel = _box(page, ".jp-NotebookPanel")
        assert svg["width"] >= 0.85 * panel["width"] - 80  # the notebook's width, minus margins
        assert svg["width"] >= 800 and svg["height"] >= 0.6 * svg["width"] * 0.9
        others = page.locator(".jp-OutputArea-output img, .jp-OutputArea-output table")
        for i in range(others.count()):  # nothing else in the output is as big as the map
            b = others.nth(i).bounding_box()
            if b:
                assert b["width"] * b["height"] < svg["width"] * svg["height"]
        assert svg["x"] + svg["width"] <= VIEWPORT["width"]
        titles = page.locator(".jp-OutputArea svg circle title")
        assert titles.count() == 72 and "The tune number" in titles.first.text_content()
        detail = page.locator(".jp-OutputArea-output pre").first
        assert "perf00" in detail.text_content()
        page.locator(".jp-OutputArea svg circle[data-i='17']").click(force=True)
        page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output pre')]"
                               ".some(e => e.textContent.includes('perf17'))", timeout=30_000)
        selects = page.locator(".jp-OutputArea select")
        assert "perf17" in [selects.nth(i).input_value() for i in range(selects.count())]
        page.screenshot(path=str(_shots(tmp_path) / "browser_explorer_clicked_1280.png"))
        svg_after = _box(page, ".jp-OutputArea svg")
        assert abs(svg_after["width"] - svg["width"]) < 2  # a pick does not squeeze the map


def test_identify_table_keeps_work_and_verdict_on_screen(tmp_path):
    with notebook_page(tmp_path, "table.ipynb", [_TABLE]) as page:
        wait_for_output(page, ".jp-OutputArea-output table", tmp_path / "failed.png")
        page.screenshot(path=str(_shots(tmp_path) / "browser_identify_table_1280.png"))
        table = _box(page, ".jp-OutputArea-output table")
        assert table["x"] + table["width"] <= VIEWPORT["width"]
        header = page.locator(".jp-OutputArea-output table th", has_text="verdict").first
        b = header.bounding_box()
        assert b and b["x"] + b["width"] <= VIEWPORT["width"]
        text = page.locator(".jp-OutputArea-output table").first.text_content()
        assert "session_00_the_long_named_reel_and_its_jig.wav" in text
        assert "/home/someone" not in text  # the file name, not the full path
        caption = page.locator(".jp-OutputArea-output table caption").first
        assert caption.text_content() == "best match each" and caption.is_visible()
        first_cells = page.locator(".jp-OutputArea-output table tbody tr td:first-child")
        assert first_cells.first.text_content().startswith("session_00")  # no row numbers
