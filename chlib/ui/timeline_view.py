"""Pictures of decoded timelines (:class:`chlib.retrieval.timeline.Timeline`): one row per query
file with a coloured bar per segment (one colour per work, the same in every row; "unknown"
hatched light grey; darker = lower p-value) and, when the truth is known, a thin bar under it
with the true tunes; and :class:`TimelinePlayer`, the segments as bars above an ``<audio>``
player: a click on a bar plays the recording from that segment's start (front-end only) and
reports the segment's index to Python (``clicked``)."""

from __future__ import annotations

import base64
import html
import math
import os
import textwrap
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as w
import soundfile as sf
import traitlets
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MultipleLocator

from chlib.core.errors import AudioError, ConfigError
from chlib.retrieval.timeline import UNKNOWN, Timeline
from chlib.ui.plots import new_figure
from chlib.ui.widgets import audio_excerpt_wav

__all__ = ["UNKNOWN_COLOUR", "work_colours", "clock", "timeline_figure", "segments_table",
           "segments_html", "TimelinePlayer", "timeline_player"]

UNKNOWN_COLOUR = "#d4d4d4"  # light grey (hatched in figures) for time matched to no work
PLAYER_RATE = 16_000  # Hz of the player's WAV: 10 min = 19 MB in the notebook (44.1 kHz: 53 MB)
_PALETTE = [c for name in ("tab10", "Dark2", "Set1") for c in colormaps[name].colors]  # 27
_TICK_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
_ROW_IN, _MAX_HEIGHT_IN = 0.55, 16.0  # inches per file row; the tallest figure


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def clock(seconds: float) -> str:
    """``seconds`` as "m:ss" (whole seconds, minutes past 59 kept: 75 min = "75:00")."""
    s = int(round(float(seconds))) if math.isfinite(seconds) else 0
    return f"{s // 60}:{s % 60:02d}"


def _alpha(p_value: Any) -> float:
    """Shade of a segment: 0.35 (p >= 0.5, or NaN) .. 1 (p <= 0.001), linear in -log10 p, so
    segments that all pass p < 0.05 still differ (1 - p would make them all ~1)."""
    p = float(p_value) if p_value is not None else math.nan
    if not math.isfinite(p):
        return 0.35
    conf = min(max(-math.log10(max(p, 1e-12)) - math.log10(2), 0.0) / (3 - math.log10(2)), 1.0)
    return 0.35 + 0.65 * conf


def work_colours(segment_lists: Sequence[Sequence[dict]]) -> tuple[dict[str, Any], list[str]]:
    """(work -> colour, works most seconds first) over all ``segment_lists``: the same work
    gets the same colour in every row; :data:`UNKNOWN` is light grey; past 27 works colours
    repeat (the legend names only the most-timed ones)."""
    secs: Counter = Counter()
    for segs in segment_lists:
        for s in segs:
            if s["work"] != UNKNOWN:
                secs[str(s["work"])] += float(s["end_s"]) - float(s["start_s"])
    order = sorted(secs, key=lambda k: (-secs[k], k))
    colours: dict[str, Any] = {wk: _PALETTE[i % len(_PALETTE)] for i, wk in enumerate(order)}
    return colours | {UNKNOWN: UNKNOWN_COLOUR}, order


def _time_axis(ax: Any, duration_s: float, width_in: float) -> None:
    """Ticks at a round step (about one an inch, at most 12), labelled in seconds, or "m:ss"
    past two minutes."""
    most = min(12, max(3, int(width_in)))
    step = next((s for s in _TICK_STEPS_S if duration_s / s <= most), _TICK_STEPS_S[-1])
    ax.xaxis.set_major_locator(MultipleLocator(step))
    long = duration_s > 120
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _pos: clock(x) if long else f"{x:.0f}"))
    ax.set_xlabel("time (min:s)" if long else "time (s)")


def timeline_figure(items: Sequence[tuple[str, Timeline, list[dict] | None]], *,
                    max_works_in_legend: int = 12, width_in: float = 11.0) -> Figure:
    """One row per ``(label, timeline, truth)`` item, first at the top: each decoded segment a
    bar from its ``start_s`` to ``end_s`` (seconds) coloured by work, shaded by p-value
    (darker = lower; NaN palest); ``truth`` (segments ``{"start_s", "end_s", "work"}``, or
    None) a thin bar under the row, gaps blank. Bars carry gids ``seg:<row>:<j>`` and
    ``truth:<row>:<j>``. The legend names the ``max_works_in_legend`` most-timed works, then
    "+N more". ``label``: a file name or path (its name is shown, shortened)."""
    items = list(items)
    if not items:
        raise ConfigError("timeline_figure: no items; pass [(label, timeline, truth or None)]")
    if max_works_in_legend < 1 or not width_in > 2:
        raise ConfigError(f"timeline_figure: need max_works_in_legend >= 1 and width_in > 2 "
                          f"inches, got {max_works_in_legend} and {width_in}")
    colours, order = work_colours([t.segments for _, t, _ in items]
                                  + [tr or [] for _, _, tr in items])
    shown = order[:max_works_in_legend]
    ncols = max(1, min(4, int(width_in // 2.8)))
    n_handles = len(shown) + (len(order) > len(shown)) + 1
    height = min(_MAX_HEIGHT_IN, 1.4 + _ROW_IN * len(items) + 0.25 * math.ceil(n_handles / ncols))
    fig, ax = new_figure(figsize=(width_in, height))
    for row, (_, tl, truth) in enumerate(items):  # decoded bar, then the thin truth bar under it
        for kind, segs, y, h in (("seg", tl.segments, row - 0.08, 0.5),
                                 ("truth", truth or [], row + 0.28, 0.14)):
            for j, s in enumerate(segs):
                unknown, p = s["work"] == UNKNOWN, s.get("p_value") if kind == "seg" else 0.0
                rgb = mcolors.to_rgb(colours.get(str(s["work"]), UNKNOWN_COLOUR))
                ax.barh(y, float(s["end_s"]) - float(s["start_s"]), left=float(s["start_s"]),
                        height=h, facecolor=(*rgb, 1.0 if unknown else _alpha(p)),
                        hatch="///" if unknown else None,  # a solid outline names the work
                        edgecolor="white" if unknown else rgb, linewidth=0.8,
                        gid=f"{kind}:{row}:{j}")
    any_truth = any(tr for _, _, tr in items)
    duration = max([t.duration_s for _, t, _ in items]
                   + [float(s["end_s"]) for _, _, tr in items for s in tr or []])
    ax.set_xlim(0, max(duration, 1.0))
    ax.set_ylim(len(items) - 0.5, -0.5)  # first item at the top
    ax.set_yticks(range(len(items)), [_short(Path(str(lb)).name or str(lb), 32)
                                      for lb, _, _ in items], fontsize=8)
    _time_axis(ax, duration, width_in)
    ax.spines[["top", "right"]].set_visible(False)
    title = ("decoded works (bars; darker = lower p-value)"
             + (", true tunes (thin bar under each row)" if any_truth else ""))
    fig.suptitle(textwrap.fill(title, int(width_in * 10)), fontsize=10)  # ~10 chars an inch
    handles = [Patch(color=colours[wk], label=_short(wk, 30)) for wk in shown]
    if len(order) > len(shown):
        handles.append(Patch(color="none", label=f"+{len(order) - len(shown)} more"))
    handles.append(Patch(facecolor=UNKNOWN_COLOUR, hatch="///", edgecolor="white",
                         label=UNKNOWN))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=8,
               frameon=False)
    return fig


def segments_table(timeline: Timeline) -> list[dict]:
    """Rows ``{"start", "end"}`` ("m:ss") ``, "work", "p_value", "perf"}`` of the segments."""
    return [{"start": clock(s["start_s"]), "end": clock(s["end_s"]), "work": s["work"],
             "p_value": s.get("p_value"), "perf": s.get("perf")} for s in timeline.segments]


def _tooltip(s: dict) -> str:
    p = s.get("p_value")
    p_text = f"p={p:.3g}" if isinstance(p, (int, float)) and math.isfinite(p) else "p=n/a"
    return f"{s['work']}, {clock(s['start_s'])}-{clock(s['end_s'])}, {p_text}"


def segments_html(timeline: Timeline, *, playable_s: float | None = None,
                  colours: Mapping[str, Any] | None = None) -> str:
    """The segments as full-width coloured bars (``div[data-i][data-start]``, start in
    seconds; the title is "work, start-end, p"; unknown striped grey) and a playhead
    (``.chlib-playhead``); bars starting past ``playable_s`` (the audio's length) are faded.
    ``colours``: work -> colour (:func:`work_colours` of several files, to match a figure);
    None: this timeline's own."""
    colours = {**work_colours([timeline.segments])[0], **(colours or {})}
    dur = max(float(timeline.duration_s), 1e-9)
    bars = []
    for i, s in enumerate(timeline.segments):
        a, b, unknown = float(s["start_s"]), float(s["end_s"]), s["work"] == UNKNOWN
        rgb = ("repeating-linear-gradient(45deg,#d4d4d4 0 6px,#e6e6e6 6px 12px)" if unknown
               else mcolors.to_hex(colours[s["work"]]))
        fade = 0.35 if playable_s is not None and a >= playable_s else (
            1.0 if unknown else _alpha(s.get("p_value")))
        bars.append(
            f'<div data-i="{i}" data-start="{a:g}" title="{html.escape(_tooltip(s))}" '
            f'style="position:absolute;left:{100 * a / dur:.3f}%;width:{100 * (b - a) / dur:.3f}%;'
            f'top:0;bottom:0;background:{rgb};opacity:{fade:.2f};cursor:pointer;'
            f'box-sizing:border-box;border-right:1px solid #fff;overflow:hidden;'
            f'white-space:nowrap;text-overflow:ellipsis;font-size:12px;line-height:30px;'
            f'padding:0 4px;color:{"#333" if unknown else "#fff"}">'
            f'{html.escape(str(s["work"]))}</div>')
    head = ('<div class="chlib-playhead" style="position:absolute;left:0;top:-3px;bottom:-3px;'
            'width:2px;background:#000;pointer-events:none"></div>')
    return (f'<div class="chlib-timeline" data-duration="{dur:g}" style="position:relative;'
            f'width:100%;height:30px;background:#f4f4f4">{"".join(bars)}{head}</div>'
            f'<div style="display:flex;justify-content:space-between;font-size:11px;'
            f'color:#555"><span>0:00</span><span>{clock(dur)}</span></div>')


class TimelinePlayer(anywidget.AnyWidget):
    """The segments of ``timeline`` as clickable bars above an ``<audio controls>`` player of
    the first ``max_seconds`` (seconds) of ``path`` (a WAV data URL; a note says when it is
    cut; ``colours`` as in :func:`segments_html`). A click on a bar plays from that segment's start and sets ``clicked`` to its index;
    Python calls the :meth:`on_click` callbacks with ``(index, segment)`` and sets it back to
    -1. Raises :class:`AudioError` when ``path`` cannot be read (:func:`timeline_player`
    shows a note instead)."""

    _esm = """
    function render({ model, el }) {
      const draw = () => {
        el.innerHTML = model.get("markup");
        const audio = el.querySelector("audio");
        audio.src = model.get("src");
        const head = el.querySelector(".chlib-playhead");
        const duration = Number(el.querySelector(".chlib-timeline").dataset.duration);
        audio.addEventListener("timeupdate", () => {  // the playhead follows the audio
          head.style.left = `${(100 * audio.currentTime) / duration}%`;
        });
        el.querySelectorAll("[data-start]").forEach((bar) => {
          bar.addEventListener("click", () => {
            audio.currentTime = Number(bar.dataset.start);
            audio.play().catch(() => {});  // a browser may refuse to play; the seek stands
            model.set("clicked", Number(bar.dataset.i));
            model.save_changes();
          });
        });
      };
      model.on("change:markup", draw);
      draw();
    }
    export default { render };
    """
    markup = traitlets.Unicode("").tag(sync=True)
    src = traitlets.Unicode("").tag(sync=True)
    clicked = traitlets.Int(-1).tag(sync=True)

    def __init__(self, path: str | os.PathLike, timeline: Timeline, *,
                 max_seconds: float = 600.0, colours: Mapping[str, Any] | None = None,
                 **kwargs: Any):
        if not max_seconds > 0:
            raise ConfigError(f"TimelinePlayer: max_seconds must be > 0, got {max_seconds}")
        wav = audio_excerpt_wav(path, max_seconds=max_seconds, sample_rate=PLAYER_RATE)
        total = float(sf.info(str(path)).duration)
        cut = total > max_seconds + 1e-6
        note = (f'<div style="font-size:12px;color:#a60">Audio cut at {clock(max_seconds)} of '
                f'{clock(total)} (max_seconds); later segments cannot be played.</div>'
                if cut else "")
        super().__init__(layout=w.Layout(width="100%"), **kwargs)
        self.path, self.timeline, self._callbacks = Path(path), timeline, []
        self.audio_cut = cut
        self.src = "data:audio/wav;base64," + base64.b64encode(wav).decode()
        bars = segments_html(timeline, playable_s=max_seconds if cut else None, colours=colours)
        self.markup = (bars + note + '<audio controls preload="auto" '
                       'style="width:100%;margin-top:4px"></audio>')
        self.observe(self._handle_click, names="clicked")

    def on_click(self, callback: Callable[[int, dict], Any]) -> None:
        """Call ``callback(index, segment)`` after each click on a segment bar."""
        self._callbacks.append(callback)

    def _handle_click(self, change: dict) -> None:
        if (i := int(change["new"])) < 0:
            return
        self.clicked = -1  # handled: a second click on the same bar counts again
        if i < len(self.timeline.segments):
            for cb in self._callbacks:
                cb(i, self.timeline.segments[i])


def timeline_player(path: str | os.PathLike, timeline: Timeline, **kw: Any) -> Any:
    """A :class:`TimelinePlayer` (keywords passed on); when ``path`` cannot be read, a red
    note naming the file and the reason above the segment bars (not playable)."""
    try:
        return TimelinePlayer(path, timeline, **kw)
    except (AudioError, RuntimeError, sf.LibsndfileError) as e:
        reason = str(e) if isinstance(e, AudioError) else f"{path}: cannot read audio ({e})"
        return w.HTML(f"<span style='color:#b00'>{html.escape(reason)}</span>"
                      + segments_html(timeline), layout=w.Layout(width="100%"))
