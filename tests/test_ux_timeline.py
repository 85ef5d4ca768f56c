"""The timeline picture and the click-to-seek timeline player (issue 12, part C): one row per
file, bars where the segments are, one colour per work in every row, the truth under it, no
clipped text; the player's bars seek the ``<audio>`` element (checked in a real browser)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.image as plt_image
import numpy as np
import pytest
import soundfile as sf
from browser import notebook_page, wait_for_output
from matplotlib.text import Text

from chlib.core.errors import ConfigError
from chlib.retrieval.timeline import UNKNOWN, Timeline
from chlib.ui import plots
from chlib.ui.timeline_view import (
    UNKNOWN_COLOUR,
    TimelinePlayer,
    segments_table,
    timeline_figure,
    timeline_player,
)


def _tl(parts: list[tuple[float, float, str, float]]) -> Timeline:
    segs = [{"start_s": a, "end_s": b, "work": wk, "p_value": p, "perf": None if wk == UNKNOWN
             else f"{wk}-perf", "mean_z": 3.0} for a, b, wk, p in parts]
    return Timeline(segs, parts[-1][1])


def _items():
    a = _tl([(0, 40, "The Silver Spear", 0.003), (40, 55, UNKNOWN, math.nan),
             (55, 130, "The Maid Behind the Bar and a very long name indeed", 0.02)])
    b = _tl([(0, 70, "The Maid Behind the Bar and a very long name indeed", 0.01),
             (70, 100, "The Silver Spear", 0.04)])
    truth = [{"start_s": 0, "end_s": 42, "work": "The Silver Spear"},
             {"start_s": 50, "end_s": 130, "work": "The Maid Behind the Bar and a very long "
                                                   "name indeed"}]
    return [("/music/sets/first_set_of_reels_recorded_live_at_the_session.wav", a, truth),
            ("second.wav", b, None)]


def _bars(fig, kind: str) -> dict[tuple[int, int], object]:
    out = {}
    for p in fig.axes[0].patches:
        if (gid := p.get_gid() or "").startswith(kind + ":"):
            _, row, j = gid.split(":")
            out[(int(row), int(j))] = p
    return out


def test_figure_has_a_row_per_file_and_bars_where_the_segments_are():
    items = _items()
    fig = timeline_figure(items)
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == 2
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[1] == "second.wav" and labels[0].endswith("…") and "/music" not in labels[0]
    segs = _bars(fig, "seg")
    for row, (_, tl, _) in enumerate(items):
        for j, s in enumerate(tl.segments):
            bar = segs[(row, j)]
            assert bar.get_x() == pytest.approx(s["start_s"])
            assert bar.get_x() + bar.get_width() == pytest.approx(s["end_s"])
    assert len(segs) == 5
    colour = {(r, j): mcolors.to_hex(p.get_facecolor(), keep_alpha=False)
              for (r, j), p in segs.items()}
    assert colour[(0, 0)] == colour[(1, 1)] and colour[(0, 2)] == colour[(1, 0)]  # same work
    assert colour[(0, 0)] != colour[(0, 2)]
    assert colour[(0, 1)] == UNKNOWN_COLOUR and segs[(0, 1)].get_hatch()
    shade = {k: p.get_facecolor()[3] for k, p in segs.items()}
    assert shade[(0, 0)] > shade[(0, 2)] > 0.35  # p 0.003 darker than 0.02
    assert mcolors.to_hex(segs[(0, 2)].get_edgecolor()) == colour[(0, 2)]  # solid outline
    truth = _bars(fig, "truth")
    assert sorted(truth) == [(0, 0), (0, 1)]  # only the first file has a truth
    assert mcolors.to_hex(truth[(0, 0)].get_facecolor()) == colour[(0, 0)]
    assert truth[(0, 1)].get_x() == 50 and truth[(0, 1)].get_height() < segs[(0, 0)].get_height()
    assert ax.get_xlabel() == "time (min:s)"  # 130 s: m:ss ticks
    fig.canvas.draw()
    assert "2:00" in [t.get_text() for t in ax.get_xticklabels()]


def test_legend_is_capped_with_n_more_and_long_names_are_shortened():
    works = [f"Work number {i} with a rather long title for a legend" for i in range(15)]
    tl = _tl([(10 * i, 10 * i + 10 - i * 0.5, wk, 0.01) for i, wk in enumerate(works)])
    fig = timeline_figure([("a.wav", tl, None)], max_works_in_legend=5)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[-2:] == ["+10 more", UNKNOWN] and len(texts) == 7
    assert texts[0].startswith("Work number 0") and texts[0].endswith("…")  # most time first


def _drawn_texts(fig) -> list:
    """Every visible, non-empty text the figure draws (tick labels outside the view limits
    exist but are not drawn)."""
    ax = fig.axes[0]
    (x0, x1), ylim = ax.get_xlim(), sorted(ax.get_ylim())
    ticks = [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
    ticks += [t for t in ax.get_yticklabels() if ylim[0] <= t.get_position()[1] <= ylim[1]]
    every_tick = {*ax.get_xticklabels(), *ax.get_yticklabels()}
    out = ticks + [t for t in fig.findobj(Text) if t not in every_tick]  # titles, legend, ...
    return [t for t in out if t.get_visible() and t.get_text()]


@pytest.mark.parametrize(("n_files", "width_in"), [(1, 12.8), (3, 12.8), (30, 12.8), (3, 5.0)])
def test_no_text_is_clipped_and_the_png_is_1280_px_wide(tmp_path, n_files, width_in):
    base = _items()
    items = [(f"{i:02d}_{base[i % 2][0]}", base[i % 2][1], base[i % 2][2])
             for i in range(n_files)]
    fig = timeline_figure(items, width_in=width_in)
    fig.set_dpi(100)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = _drawn_texts(fig)
    assert len(texts) >= n_files + 5  # file names, ticks, axis label, title, legend
    for t in texts:
        e = t.get_window_extent(renderer)
        assert (e.x0 >= box.x0 - 0.5 and e.x1 <= box.x1 + 0.5 and e.y0 >= box.y0 - 0.5
                and e.y1 <= box.y1 + 0.5), (t.get_text(), e, box)
    assert fig.get_size_inches()[1] <= 16.0
    if n_files > 1:
        assert fig.get_size_inches()[1] > timeline_figure(items[:1]).get_size_inches()[1]
    path = tmp_path / "timeline.png"
    path.write_bytes(plots.figure_png(fig, dpi=100))
    assert plt_image.imread(path).shape[1] == round(100 * width_in)  # 1280 px at 12.8 in


def test_figure_refuses_no_items():
    with pytest.raises(ConfigError, match="no items"):
        timeline_figure([])


def test_segments_table_rows():
    rows = segments_table(_items()[0][1])
    assert rows[0] == {"start": "0:00", "end": "0:40", "work": "The Silver Spear",
                       "p_value": 0.003, "perf": "The Silver Spear-perf"}
    assert rows[2]["start"] == "0:55" and rows[2]["end"] == "2:10" and rows[1]["perf"] is None


def _tones(path: Path, seconds: float = 20.0, sr: int = 8000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * np.where(t < 7, 330, np.where(t < 13, 440, 550)) * t)
    sf.write(path, y.astype(np.float32), sr)
    return path


_THREE = [(0, 7, "Tone A", 0.004), (7, 13, "Tone B", 0.02), (13, 20, UNKNOWN, math.nan)]


def test_player_has_a_bar_per_segment_and_reports_clicks(tmp_path):
    wav, tl = _tones(tmp_path / "tones.wav"), _tl(_THREE)
    player = timeline_player(wav, tl)
    assert isinstance(player, TimelinePlayer) and not player.audio_cut
    starts = [float(v) for v in re.findall(r'data-start="([^"]+)"', player.markup)]
    assert starts == [s["start_s"] for s in tl.segments]
    assert 'title="Tone B, 0:07-0:13, p=0.02"' in player.markup
    assert "<audio controls" in player.markup and player.src.startswith("data:audio/wav;base64,")
    mine = timeline_player(wav, tl, colours={"Tone A": "#123456"}).markup  # e.g. a figure's
    assert "background:#123456" in mine.split('data-i="1"')[0]
    seen = []
    player.on_click(lambda i, seg: seen.append((i, seg["work"])))
    player.clicked = 1  # what the front end sends on a click on the 2nd bar
    assert seen == [(1, "Tone B")] and player.clicked == -1
    player.clicked = 1
    assert seen == [(1, "Tone B")] * 2


def test_player_says_when_the_audio_is_cut(tmp_path):
    player = TimelinePlayer(_tones(tmp_path / "tones.wav"), _tl(_THREE), max_seconds=10)
    assert player.audio_cut and "Audio cut at 0:10 of 0:20" in player.markup
    assert 'opacity:0.35' in player.markup.split('data-i="2"')[1].split(">")[0]


@pytest.mark.parametrize("kind", ["missing", "not audio"])
def test_unreadable_audio_gives_a_red_note_naming_the_file(tmp_path, kind):
    path = tmp_path / "broken.wav"
    if kind == "not audio":
        path.write_text("not a wav file")
    out = timeline_player(path, _tl(_THREE))
    assert not isinstance(out, TimelinePlayer)
    assert "color:#b00" in out.value and "broken.wav" in out.value
    assert out.value.count("data-start=") == 3  # the segments are still shown


_NOTEBOOK = """
import math, numpy as np, soundfile as sf
from chlib.retrieval.timeline import Timeline
from chlib.ui.timeline_view import timeline_player
sr = 8000
t = np.arange(20 * sr) / sr
sf.write("tones.wav", (0.3 * np.sin(2 * np.pi * np.where(t < 7, 330, np.where(t < 13, 440, 550))
                                    * t)).astype(np.float32), sr)
segs = [{"start_s": a, "end_s": b, "work": w, "p_value": p, "perf": None, "mean_z": 3.0}
        for a, b, w, p in [(0, 7, "The Silver Spear", 0.004), (7, 13, "The Maid Behind the Bar", 0.02),
                           (13, 20, "unknown", math.nan)]]
timeline_player("tones.wav", Timeline(segs, 20.0))
"""


@pytest.mark.slow
def test_browser_click_on_a_segment_seeks_the_audio(tmp_path):
    shots = Path(os.environ.get("CHLIB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with notebook_page(tmp_path, "timeline.ipynb", [_NOTEBOOK]) as page:
        wait_for_output(page, ".jp-OutputArea [data-start]", tmp_path / "failed.png")
        page.wait_for_function("() => document.querySelector('.jp-OutputArea audio')"
                               ".readyState >= 1", timeout=30_000)
        bars = page.locator(".jp-OutputArea [data-start]")
        assert bars.count() == 3
        bar = bars.nth(1).bounding_box()
        assert bar["width"] > 150  # 6 s of 20 on a full-width row
        bars.nth(1).click()
        page.wait_for_timeout(300)
        now = page.evaluate("() => document.querySelector('.jp-OutputArea audio').currentTime")
        assert 7.0 <= now < 8.5
        page.wait_for_timeout(400)  # a "timeupdate" or two
        left = page.evaluate("() => parseFloat(document.querySelector('.jp-OutputArea "
                             ".chlib-playhead').style.left)")
        assert 34.0 <= left <= 45.0  # the playhead at ~7 s of 20
        page.screenshot(path=str(shots / "browser_timeline_1280.png"))
        row = page.locator(".jp-OutputArea .chlib-timeline").first.bounding_box()
        audio = page.locator(".jp-OutputArea audio").first.bounding_box()
        assert row["width"] >= 800 and audio["width"] >= 0.95 * row["width"]  # full width
        assert audio["y"] > row["y"] + row["height"]  # the player under the bars
