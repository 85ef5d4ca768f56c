"""Figures that read: drawn on the Agg canvas and measured (text inside the figure, no text over
other text, whole-number ticks on count axes, a legend that names every work)."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from chlib.train.tune_summary import TuneSummary  # noqa: E402
from chlib.ui import plots, tune_figures  # noqa: E402

LONG = ["The Boys of Bluegill's Favourite Reel", "Sí Bheag, Sí Mhór (arr. O'Carolan)",
        "Drowsy Maggie / The Silver Spear (medley)", "An Chúileann: slow air in G minor",
        "Tommy Peoples' Wedding Jig no. 2", "Hardiman the Fiddler, second setting"]


def _layout_texts(fig) -> list[Text]:
    """Visible, non-empty titles, axis labels, tick labels and legend texts of ``fig``."""
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  *_drawn_tick_labels(ax)]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
    texts += [t for leg in fig.legends for t in leg.get_texts()]
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def _drawn_tick_labels(ax) -> list[Text]:
    """The labels of the ticks drawn (those inside the view limits)."""
    ticks = [*ax.xaxis._update_ticks(), *ax.yaxis._update_ticks()]
    return [lab for t in ticks for lab in (t.label1, t.label2) if lab.get_visible()]


def _text_problems(fig) -> list[str]:
    """Text boxes outside the figure and pairs of overlapping texts, after drawing."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    drawn = {id(t) for ax in fig.axes for t in _drawn_tick_labels(ax)}
    undrawn = {id(lab) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
               for t in axis.get_major_ticks() + axis.get_minor_ticks()
               for lab in (t.label1, t.label2)} - drawn
    found = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and id(t) not in undrawn:
            e = t.get_window_extent(renderer)
            if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
                found.append(f"outside the figure: {t.get_text()!r}")
    boxes = [(t.get_text(), t.get_window_extent(renderer).shrunk(0.98, 0.9))
             for t in _layout_texts(fig)]
    found += [f"overlap: {a!r} / {b!r}" for (a, ea), (b, eb) in itertools.combinations(boxes, 2)
              if ea.overlaps(eb)]
    return found


def _integer_ticks(axis) -> bool:
    lo, hi = sorted(axis.get_view_interval())
    ticks = [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]
    return len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


# --- the figures, with the inputs that showed the problems (also drawn by the PNG script)


def confused_figure():
    pairs = [(LONG[i], LONG[(i + 1 + j) % 6], 9 - i - j) for i in range(6) for j in range(3)]
    return plots.plot_confused_pairs(
        pairs, top=15, value_label="queries whose nearest recording is the other work")


def query_match_figure():
    t, b = np.arange(900)[:, None], np.arange(84)[None, :]  # smooth, so the PNGs stay small
    cqts = [-40 + 40 * np.sin(t / 25 + b / 6)[:750], -40 + 40 * np.cos(t / 30 - b / 5)]
    titles = ["query: 2019-07-14_live_at_the_cobblestone_dublin_session_take3.wav",
              f"best match: drowsy_maggie_fiddle_and_flute_studio_version_02 ({LONG[2]})"]
    return plots.plot_cqts(cqts, titles, max_seconds=30.0)


def embedding_figure(n_works: int = 32, **kwargs):
    rng = np.random.default_rng(1)
    labels = [w for w in range(n_works) for _ in range(2 + w % 3)]
    xy = rng.normal(size=(len(labels), 2)) + np.array(labels)[:, None] % 7
    names = {w: f"{LONG[w % 6][:24]} {w}" for w in range(n_works)}
    return plots.plot_embedding_projection(xy, labels, method=None, label_names=names,
                                           test_only={0, 5}, **kwargs)


def rank_figure():
    return plots.plot_rank_histogram([1, 1, 1, 2, 4, 7, 30], max_rank=20)


def works_counts() -> pd.Series:
    return pd.Series({6: 3}, name="works").rename_axis("recordings per work")


def works_figure():
    return plots.plot_count_histogram(works_counts(), xlabel="performances (recordings) per work",
                                      ylabel="number of works", title="demo: 3 works")


def _summary() -> TuneSummary:
    names = [f"lrate{lr}_chunk_frame375_300_225_mean_size3_roll_pitch{p}"
             for lr in ("0.001", "0.0005") for p in ("0.0", "0.5", "0.8")]
    rows, curves = [], {}
    for i, name in enumerate(names):
        final = 0.5 - 0.03 * i
        rows.append({"experiment": name, "mAP_final_mean": final, "mAP_final_std": 0.02,
                     "val_loss_final_mean": 1.0 + 0.1 * i, "val_loss_final_std": 0.05,
                     "vs_top": "top" if i == 0 else "~top" if i < 3 else "below"})
        curves[name] = {s: {"mAP": {"demo": {e: final * (e + 1) / 8 + 0.01 * s for e in range(8)}},
                            "val_loss": {e: 2.0 - 0.1 * e + 0.02 * s for e in range(8)}}
                        for s in (1, 2)}
    return TuneSummary(rows=rows, table="", curves=curves, test_name="demo", window=3)


def tune_curves_figure():
    return tune_figures.plot_tuning_curves(_summary())


def tune_ranking_figure():
    return tune_figures.plot_tuning_ranking(_summary())


FIGURES = {"confused_pairs": confused_figure, "query_vs_match": query_match_figure,
           "embedding_map": embedding_figure, "rank_histogram": rank_figure,
           "works_histogram": works_figure, "tune_curves": tune_curves_figure,
           "tune_ranking": tune_ranking_figure}


# --- item 1: clipped and overlapping text


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_ux_figure_text_inside_and_not_overlapping(name):
    assert _text_problems(FIGURES[name]()) == []


def test_ux_cqt_titles_are_wrapped_not_lost():
    fig = query_match_figure()
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles[0].replace("\n", "").startswith("query: 2019-07-14_live")
    assert "Drowsy Maggie" in titles[1].replace("\n", " ")


# --- item 2: embedding maps of many works


def _work_collections(ax):
    return [c for c in ax.collections if c.get_label() not in plots._MARKS]


@pytest.mark.parametrize("n_works", [24, 40])
def test_ux_embedding_map_styles_unique_per_work_and_legend_names_each(n_works):
    fig = embedding_figure(n_works)
    ax = fig.axes[0]
    works = _work_collections(ax)
    assert len(works) == n_works
    styles = {(tuple(np.round(c.get_facecolor()[0][:3], 3)), c.get_paths()[0].vertices.tobytes())
              for c in works}
    assert len(styles) == n_works  # colour + marker tell every work apart
    legends = [*fig.legends, *([ax.get_legend()] if ax.get_legend() else [])]
    assert len(legends) == 1
    texts = [t.get_text() for t in legends[0].get_texts()]
    assert sum(t in {c.get_label() for c in works} for t in texts) == n_works
    assert "never seen in training" in texts  # the rings are explained
    assert "colour + shape" in legends[0].get_title().get_text()  # and the shapes
    assert _text_problems(fig) == []


def test_ux_embedding_map_of_very_many_works_lists_top_works_and_others():
    fig = embedding_figure(70)
    legend = (fig.legends or [fig.axes[0].get_legend()])[0]
    texts = [t.get_text() for t in legend.get_texts()]
    others = [t for t in texts if t.startswith("others")]
    assert len(others) == 1 and "30 works" in others[0]
    assert len(texts) - 1 - 1 == plots._MAX_KEYED  # works + "others" + the ring
    assert _text_problems(fig) == []


# --- item 3: count axes and single values


def test_ux_rank_histogram_count_axis_has_whole_numbers():
    fig = rank_figure()
    fig.canvas.draw()
    assert _integer_ticks(fig.axes[0].yaxis)
    boxes = [t.get_window_extent() for t in _drawn_tick_labels(fig.axes[0])
             if t in fig.axes[0].get_xticklabels()]
    gaps = [b.x0 - a.x1 for a, b in zip(boxes, boxes[1:], strict=False)]
    assert min(gaps) > 10  # "20" and ">20" are not run together


def test_ux_count_histogram_of_one_value_is_one_bar_on_whole_numbers():
    fig = works_figure()
    ax = fig.axes[0]
    fig.canvas.draw()
    (bar,) = [p for p in ax.patches if p.get_height() > 0]
    assert bar.get_height() == 3
    assert bar.get_x() < 6 < bar.get_x() + bar.get_width() and bar.get_width() <= 0.8
    assert [t.get_text() for t in ax.get_xticklabels()] == ["6"]
    assert _integer_ticks(ax.yaxis)


def test_ux_count_histogram_keeps_gaps_between_counts():
    counts = pd.Series({1: 4, 2: 10, 7: 1})
    fig = plots.plot_count_histogram(counts, xlabel="recordings per work", ylabel="works")
    ax = fig.axes[0]
    fig.canvas.draw()
    centres = sorted(p.get_x() + p.get_width() / 2 for p in ax.patches if p.get_height() > 0)
    np.testing.assert_allclose(centres, [1, 2, 7])
    assert _integer_ticks(ax.xaxis) and _integer_ticks(ax.yaxis)


# --- tuning figures


def test_ux_tune_curves_legend_does_not_cover_the_curves():
    fig = tune_curves_figure()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert len(legends[0].get_texts()) == len(_summary().rows)
