"""Small interactive helpers for the notebooks: forms, tables, audio players, live plots.

Headless runs (papermill, plain Python) never depend on widgets, whose callbacks do not fire
there: the ``parameters`` cell drives every computation, and a form only edits those values when
a person is at the keyboard (:func:`interactive_session`).
"""

from __future__ import annotations

import ast
import html
import io
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as w
import numpy as np
import pandas as pd
import soundfile as sf
from IPython import get_ipython
from IPython.display import Audio, Image, display

from chlib.core.errors import AudioError, ChlibError, ConfigError
from chlib.core.manifest import read_manifest
from chlib.data.features import feature_path, load_feature
from chlib.retrieval.identify import find_audio_files, identify
from chlib.ui.plots import figure_png, plot_cqts, plot_training_curves
from chlib.ui.report import explorer_map_figure, query_match_figure

__all__ = ["in_papermill", "interactive_session", "use_project_root", "table", "ParameterForm",
           "parameter_form", "edit_parameters", "show", "audio_excerpt_wav", "audio_player",
           "results_table", "TrainingMonitor", "audio", "cqt_examples", "epoch_table",
           "IdentifyApp", "EmbeddingExplorer"]

#: Environment variable forcing the answer of :func:`interactive_session` ("1" / "0").
INTERACTIVE_ENV = "CHLIB_INTERACTIVE"
_STYLE = {"description_width": "initial"}


# -- where are we running? -------------------------------------------------------------------------


def _kernel() -> Any:
    return getattr(get_ipython(), "kernel", None)


def in_papermill() -> bool:
    """True inside a kernel driven by papermill / nbclient (cells run with ``allow_stdin=False``,
    unlike JupyterLab, VS Code and Colab)."""
    k = _kernel()
    return k is not None and not bool(getattr(k, "_allow_stdin", False))


def interactive_session() -> bool:
    """True when a person is at a notebook front end (an IPython kernel, not papermill); never in
    plain Python, pytest or the terminal. ``CHLIB_INTERACTIVE=1`` / ``0`` forces it."""
    forced = os.environ.get(INTERACTIVE_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "0", "false", "no"):
        return forced in ("1", "true", "yes")
    return _kernel() is not None and not in_papermill()


def use_project_root() -> Path:
    """Make the project folder the working directory when a notebook runs from ``notebooks/``
    (as JupyterLab starts it), so that ``datasets/demo`` means the same headless; returns it."""
    cwd = Path.cwd()
    if (cwd / "01_prepare.ipynb").is_file() and cwd.name == "notebooks":
        os.chdir(cwd.parent)
    return Path.cwd()


def show(*objs: Any) -> None:
    """``IPython.display.display`` inside IPython, ``print`` elsewhere (scripts, tests)."""
    if get_ipython() is not None:
        display(*objs)
    else:
        print(*objs, sep="\n")


# -- tables ----------------------------------------------------------------------------------------


def table(rows: Iterable[Mapping], columns: Sequence[str] | None = None, *,
          max_rows: int | None = 30, title: str | None = None) -> pd.DataFrame:
    """Rows of dicts as a DataFrame for a notebook cell; ``columns`` picks and orders the keys,
    at most ``max_rows`` rows are kept (None: all). The title (and "first n of N rows") names
    the column axis, so it heads the table in HTML and text alike."""
    rows = [dict(r) for r in rows]
    df = pd.DataFrame(rows[:max_rows] if max_rows is not None else rows,
                      columns=list(columns) if columns is not None else None)
    cut = f"first {len(df)} of {len(rows)} rows" if len(df) < len(rows) else ""
    df.columns.name = "; ".join(t for t in (title, cut) if t) or None
    return df


# -- parameter forms -------------------------------------------------------------------------------


def _parse_literal(text: str, name: str, default: Any) -> Any:
    try:
        value = ast.literal_eval(text) if text.strip() or default is not None else None
    except (ValueError, SyntaxError) as e:
        raise ConfigError(
            f"parameter {name}: {text!r} is not a Python literal like {default!r} ({e})") from e
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(f"parameter {name}: expected a {type(default).__name__} like "
                          f"{default!r}, got {value!r}")
    return value


class ParameterForm:
    """A column of labelled inputs (``widget``), one per parameter, read back by :meth:`values`:
    bool -> checkbox, int / float -> number box, str -> text box (a dropdown with ``choices``),
    anything else -> a Python literal's text."""

    def __init__(self, defaults: Mapping[str, Any], *,
                 choices: Mapping[str, Sequence] | None = None, title: str | None = None):
        self.defaults = dict(defaults)
        self.choices = {k: list(v) for k, v in (choices or {}).items()}
        unknown = sorted(set(self.choices) - set(self.defaults))
        if unknown:
            raise ConfigError(f"parameter_form: choices given for unknown parameters {unknown}")
        self.inputs: dict[str, Any] = {}
        for name, default in self.defaults.items():
            kw = {"description": name, "style": _STYLE}
            if name in self.choices:
                if default not in self.choices[name]:
                    raise ConfigError(f"parameter_form: default {default!r} of {name} is not "
                                      f"among {self.choices[name]}")
                box = w.Dropdown(options=self.choices[name], value=default, **kw)
            elif isinstance(default, bool):
                box = w.Checkbox(value=default, indent=False, **kw)
            else:  # a number box, or a text box holding the string or a literal's text
                box = (w.IntText if isinstance(default, int) else w.FloatText
                       if isinstance(default, float) else w.Text)(
                    value=default if self._plain(name) else repr(default),
                    layout=w.Layout(width="32em"), **kw)
            self.inputs[name] = box
        head = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.widget = w.VBox(head + list(self.inputs.values()))

    def _plain(self, name: str) -> bool:
        """True when the input holds the value itself, not a literal's text."""
        return name in self.choices or isinstance(self.defaults[name], (bool, int, float, str))

    def value(self, name: str) -> Any:
        """Current value of one parameter, typed like its default."""
        raw = self.inputs[name].value
        return raw if self._plain(name) else _parse_literal(raw, name, self.defaults[name])

    def values(self) -> dict[str, Any]:
        """All current values, typed like the defaults (a bad literal raises ConfigError)."""
        return {name: self.value(name) for name in self.defaults}

    def set_values(self, values: Mapping[str, Any]) -> None:
        """Put ``values`` into the inputs (unknown names raise ConfigError)."""
        for name, v in values.items():
            if name not in self.inputs:
                raise ConfigError(f"parameter_form: no parameter named {name!r}")
            self.inputs[name].value = v if self._plain(name) else repr(v)

    def observe(self, callback: Callable[[str, Any], None]) -> None:
        """Call ``callback(name, value)`` after each edit (interactive sessions only)."""
        for name, box in self.inputs.items():
            def _changed(change: Any, _name: str = name) -> None:
                try:
                    callback(_name, self.value(_name))
                except ConfigError:
                    pass  # half-typed literal: wait for the next keystroke

            box.observe(_changed, names="value")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


parameter_form = ParameterForm  # the notebooks' name for it


def edit_parameters(namespace: dict, names: Sequence[str], *,
                    choices: Mapping[str, Sequence] | None = None,
                    title: str = "Parameters (edit, then run the cells below)",
                    force: bool | None = None) -> ParameterForm | None:
    """In an interactive session, show a form for ``names`` that writes edits into ``namespace``
    (``edit_parameters(globals(), [...])`` after the parameters cell); else nothing, None."""
    if not (interactive_session() if force is None else force):
        return None
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ConfigError(f"edit_parameters: {missing} are not defined in the parameters cell")
    form = parameter_form({n: namespace[n] for n in names}, choices=choices, title=title)
    form.observe(lambda name, value: namespace.__setitem__(name, value))
    show(form.widget)
    return form


# -- audio and result tables -----------------------------------------------------------------------


def audio_excerpt_wav(path: str | os.PathLike, *, start_s: float = 0.0,
                      max_seconds: float = 30.0) -> bytes:
    """A mono 16-bit WAV (bytes) of ``max_seconds`` of ``path`` from ``start_s`` at the file's
    sample rate, for players (an excerpt keeps notebooks small)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            f.seek(min(int(start_s * sr), max(f.frames - 1, 0)))
            y = f.read(frames=int(max_seconds * sr), dtype="float32", always_2d=True).mean(axis=1)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot decode audio for playback ({e})") from e
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    buf = io.BytesIO()
    sf.write(buf, y / peak if peak > 1.0 else y, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_player(path: str | os.PathLike, *, start_s: float = 0.0,
                 max_seconds: float = 30.0) -> Any:
    """An ipywidgets Audio player for an excerpt of ``path``; an unreadable file gives a red
    note naming it, so one bad file does not break a table."""
    try:
        data = audio_excerpt_wav(path, start_s=start_s, max_seconds=max_seconds)
    except AudioError as e:
        return w.HTML(f"<span style='color:#b00'>{html.escape(str(e))}</span>")
    return w.Audio(value=data, format="wav", autoplay=False, loop=False,
                   layout=w.Layout(width="16em"))


def results_table(rows: Sequence[Mapping], columns: Sequence[str], *,
                  audio_column: str | None = None, max_seconds: float = 30.0) -> Any:
    """An ipywidgets grid of result rows (``columns``), with a player in a last column when
    ``audio_column`` names the key of each row's audio path."""
    cells = [w.HTML(f"<b>{html.escape(c)}</b>") for c in columns]
    cells += [w.HTML("<b>listen</b>")] if audio_column else []
    for r in rows:
        text = [r.get(c) for c in columns]
        cells += [w.HTML(html.escape("" if v is None else format(v, ".3f")
                                     if isinstance(v, (float, np.floating)) else str(v)))
                  for v in text]
        if audio_column:
            p = r.get(audio_column)
            cells.append(audio_player(p, max_seconds=max_seconds) if p else w.HTML(""))
    ncols = len(columns) + (1 if audio_column else 0)
    return w.GridBox(cells, layout=w.Layout(grid_template_columns=" ".join(["auto"] * ncols),
                                            grid_gap="2px 12px"))


# -- live training curves --------------------------------------------------------------------------


class TrainingMonitor:
    """A training callback that redraws loss and mAP curves in place after every epoch;
    headless or with ``live=False`` it draws only on :meth:`figure` (``print_epochs``: a line
    per epoch). ``rows`` seeds it with earlier records (a resumed run's)."""

    def __init__(self, *, live: bool | None = None, every: int = 1,
                 rows: Iterable[Mapping] = (), print_epochs: bool = False):
        self.live = interactive_session() if live is None else live
        self.every = max(1, int(every))
        self.rows: list[dict] = [dict(r) for r in rows]
        self.print_epochs = print_epochs
        self._handle = None

    def __call__(self, record: Mapping | None = None, **kwargs: Any) -> None:
        rec = dict(record or {}, **kwargs)
        if rec:
            self.rows.append(rec)
        if rec.get("kind") != "epoch":
            return
        if self.live and int(rec.get("epoch") or 0) % self.every == 0:
            fig = self.figure()
            if self._handle is None:
                self._handle = display(fig, display_id=True)
            else:
                self._handle.update(fig)
        elif not self.live and self.print_epochs:
            print(self.epoch_line(rec), flush=True)

    @staticmethod
    def epoch_line(rec: Mapping) -> str:
        """One line for an epoch record: the epoch and its numeric values."""
        return "  ".join([f"epoch {rec.get('epoch')}"] + [
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("kind", "epoch", "time", "timestamp")
            and isinstance(v, (int, float)) and not isinstance(v, bool)])

    def figure(self) -> Any:
        """The current curves (see :func:`chlib.ui.plots.plot_training_curves`)."""
        return plot_training_curves(self.rows)


# -- small views of files on disk ------------------------------------------------------------------


def audio(path: str | os.PathLike, *, start_s: float = 0.0, max_seconds: float = 30.0) -> Audio:
    """An ``IPython.display.Audio`` of an excerpt: unlike a widget, it plays in saved notebooks."""
    return Audio(data=audio_excerpt_wav(path, start_s=start_s, max_seconds=max_seconds),
                 autoplay=False)


def cqt_examples(manifest_path: str | os.PathLike, *, work: str | None = None, n: int = 3
                 ) -> tuple[list[np.ndarray], list[str]]:
    """``(CQT arrays [frames, bins], perf titles)`` of ``n`` performances of one work (None: the
    one with most recordings) from a full.txt-style manifest, tempo copies skipped."""
    recs = [r for r in read_manifest(manifest_path, required=("perf", "work", "feat"))
            if r.get("source_perf") in (None, "", r["perf"])]
    if not recs:
        raise ConfigError(f"{manifest_path}: no recordings with features")
    work = work if work is not None else Counter(r["work"] for r in recs).most_common(1)[0][0]
    chosen = [r for r in recs if r["work"] == work][: max(1, n)]
    if not chosen:
        raise ConfigError(f"{manifest_path}: no recording of work {work!r}")
    arrays = [np.asarray(load_feature(feature_path(r, manifest_path))) for r in chosen]
    return arrays, [str(r["perf"]) for r in chosen]


_EPOCH_COLUMNS = ("epoch", "step", "train_total", "train_foc_loss", "val_loss", "lr", "is_best")


def epoch_table(rows: Iterable[Mapping], *, max_rows: int | None = 60) -> pd.DataFrame:
    """One row per epoch of training's ``epoch`` records (the last one wins): losses, learning
    rate, mAP per test set and the best-epoch flag."""
    by_epoch = {int(r["epoch"]): dict(r) for r in rows
                if r.get("kind", "epoch") == "epoch" and r.get("epoch") is not None}
    recs = [by_epoch[e] for e in sorted(by_epoch)]
    maps = sorted({k for r in recs for k in r if k.startswith("mAP/")})
    cols = [c for c in _EPOCH_COLUMNS[:-1] if any(c in r for r in recs)] + maps
    cols += ["is_best"] if any("is_best" in r for r in recs) else []
    return table(recs, cols, max_rows=max_rows,
                 title=f"{len(recs)} epochs" if recs else "no epochs yet")


# -- interactive identification (06_identify) ------------------------------------------------------


class IdentifyApp:
    """Upload or type a query, set top-k and the p threshold, press Identify: the matches with
    players and the query's CQT beside its best match's. ``widget`` is the box to display,
    ``report`` the last IdentifyReport; nothing runs until the button is pressed."""

    def __init__(self, model: Any, hp: Any, index: Any, *, device: str = "auto",
                 top_k: int = 10, threshold_p: float = 0.001, path: str = "",
                 upload_dir: str | os.PathLike | None = None, max_seconds: float = 30.0):
        self.model, self.hp, self.index, self.device = model, hp, index, device
        self.max_seconds, self.report = max_seconds, None
        self._by_perf = {r["perf"]: r for r in index.records}
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None
        self.upload = w.FileUpload(accept="audio/*", multiple=False, description="upload audio")
        self.path = w.Text(value=str(path), description="or a path", style=_STYLE,
                           placeholder="an audio file or a folder", layout=w.Layout(width="40em"))
        self.top_k = w.IntSlider(value=int(top_k), min=1, max=50, description="top k", style=_STYLE)
        self.threshold = w.FloatLogSlider(value=float(threshold_p), base=10, min=-6, max=-1,
                                          step=0.25, description="p threshold", style=_STYLE,
                                          readout_format=".0e")
        self.button = w.Button(description="Identify", button_style="primary", icon="search")
        self.out = w.Output()
        self.button.on_click(lambda _b: self.run())
        self.widget = w.VBox([w.HBox([self.upload, self.path]),
                              w.HBox([self.top_k, self.threshold]), self.button, self.out])

    def query_paths(self) -> list[str]:
        """The uploaded file (saved to ``upload_dir`` or a temporary folder), else the path box's
        file or folder's audio files."""
        files = self.upload.value
        if files:
            item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
            folder = self.upload_dir or Path(tempfile.mkdtemp(prefix="chlib_upload_"))
            folder.mkdir(parents=True, exist_ok=True)
            (target := folder / Path(item["name"]).name).write_bytes(bytes(item["content"]))
            return [str(target)]
        p = Path(self.path.value.strip())
        if str(p) in ("", "."):
            raise ConfigError("upload an audio file or type the path of one")
        if p.is_dir():
            return [str(f) for f in find_audio_files(p)]
        if not p.is_file():
            raise ConfigError(f"{p}: no such file or folder")
        return [str(p)]

    def run(self) -> None:
        """Identify the chosen query and show the results (called by the button)."""
        self.out.clear_output()
        with self.out:
            try:
                paths = self.query_paths()
                self.report = identify(paths, model=self.model, hp=self.hp, index=self.index,
                                       device=self.device, top_k=self.top_k.value,
                                       threshold_p=self.threshold.value)
            except ChlibError as e:
                print(f"error: {e}")
                return
            for q in paths:
                display(*self.views(q))
            if self.report.errors:
                display(table(self.report.errors, title="could not be read"))
            best = [r for r in self.report.best() if r["rank"] == 1]
            if best:
                display(Image(figure_png(self.match_figure(best[0]), 90)))

    def views(self, query: str) -> list:
        """The query's player and its results grid with a player per match."""
        rows = [dict(r, wav=self._by_perf.get(r["perf"], {}).get("wav"))
                for r in self.report.rows if r["query"] == query and r["rank"]]
        head = w.HBox([w.HTML(f"<b>{html.escape(Path(query).name)}</b>&nbsp;"),
                       audio_player(query, max_seconds=self.max_seconds)])
        grid = results_table(rows, ["rank", "work", "perf", "distance", "p_value", "verdict"],
                             audio_column="wav", max_seconds=self.max_seconds)
        return [head, grid]

    def match_figure(self, best_row: Mapping) -> Any:
        """CQT of the query beside its best match's."""
        return query_match_figure(best_row["query"], self._by_perf.get(best_row["perf"], {}), self.hp,
                                  max_seconds=self.max_seconds)


# -- the embedding explorer (07_explore) -----------------------------------------------------------


class EmbeddingExplorer:
    """Map of an ExplorerData's recordings: colour by any column, find a work, pick a recording
    to list its neighbours, hear it and see its CQT (plain ipywidgets + PNGs); ``widget``."""

    def __init__(self, data: Any, *, projection: str = "umap", colour_by: str = "work",
                 highlight_work: str = "", point: str = "", n_neighbours: int = 10,
                 seed: int = 0, features: Any = None, max_seconds: float = 30.0):
        self.data, self.seed, self.features, self.max_seconds = data, seed, features, max_seconds
        self.projection = w.Dropdown(options=["umap", "tsne", "pca"], value=projection,
                                     description="projection", style=_STYLE)
        self.colour = w.Dropdown(options=data.columns(), value=colour_by, description="colour by",
                                 style=_STYLE)
        self.search = w.Text(value=highlight_work, description="highlight work",
                             placeholder="part of a work name", style=_STYLE)
        perfs = [str(r["perf"]) for r in data.records]
        self.point = w.Dropdown(options=perfs, value=perfs[data.index_of(point) if point else 0],
                                description="recording", style=_STYLE,
                                layout=w.Layout(width="36em"))
        self.k = w.IntSlider(value=n_neighbours, min=1, max=50, description="neighbours", style=_STYLE)
        self.map_out, self.detail_out = w.Output(), w.Output()
        for control in (self.projection, self.colour, self.search, self.point, self.k):
            control.observe(lambda _c: self.refresh(), names="value")
        self.widget = w.VBox([
            w.HBox([self.projection, self.colour, self.search]), w.HBox([self.point, self.k]),
            w.HBox([self.map_out, self.detail_out])])

    def state(self) -> dict:
        """The current choices as plain values."""
        return {"projection": self.projection.value, "colour_by": self.colour.value,
                "highlight": self.data.matching_works(self.search.value.strip()),
                "row": self.data.index_of(self.point.value), "k": self.k.value}

    def map_figure(self) -> Any:
        """The projection with the current colouring, highlight, selection and neighbours."""
        s = self.state()
        return explorer_map_figure(self.data, s["projection"], s["colour_by"], row=s["row"],
                                   highlight_work=self.search.value.strip(),
                                   n_neighbours=s["k"], seed=self.seed)

    def refresh(self) -> None:
        """Redraw the map and the selected recording's details."""
        s = self.state()
        self.map_out.clear_output(wait=True)
        with self.map_out:
            display(Image(figure_png(self.map_figure(), 90)))
        self.detail_out.clear_output(wait=True)
        with self.detail_out:
            rec = self.data.records[s["row"]]
            print(f"{rec['perf']} - {rec['work']} ({rec.get('role')})")
            if rec.get("wav"):
                display(audio_player(rec["wav"], max_seconds=self.max_seconds))
            display(table(self.data.neighbours(s["row"], s["k"]),
                          ["rank", "perf", "work", "role", "distance", "same_work"]))
            if rec.get("feat"):
                fig = plot_cqts([self.data.cqt(s["row"])], [str(rec["perf"])],
                                features=self.features, max_seconds=self.max_seconds,
                                panel_size=(6, 2.8))
                display(Image(figure_png(fig, 90)))

    def show(self) -> None:
        """Display the explorer and draw it once."""
        show(self.widget)
        self.refresh()
