"""Small interactive helpers for the notebooks: forms, tables, audio players, live plots.
Headless runs never depend on widgets (their callbacks do not fire there): the ``parameters``
cell drives every computation; a form only edits it in an :func:`interactive_session`."""

from __future__ import annotations

import ast
import contextlib
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
_MATCH_COLUMNS = ["rank", "work", "perf", "distance", "p_value", "verdict"]


def _kernel() -> Any:
    return getattr(get_ipython(), "kernel", None)


def in_papermill() -> bool:
    """True in a kernel driven by papermill / nbclient (``allow_stdin=False``, unlike Jupyter)."""
    return (k := _kernel()) is not None and not getattr(k, "_allow_stdin", False)


def interactive_session() -> bool:
    """True in a notebook front end's kernel, not papermill, plain Python or pytest;
    ``CHLIB_INTERACTIVE=1`` / ``0`` forces it."""
    forced = os.environ.get(INTERACTIVE_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "0", "false", "no"):
        return forced in ("1", "true", "yes")
    return _kernel() is not None and not in_papermill()


def use_project_root() -> Path:
    """Leave ``notebooks/`` (where JupyterLab starts) for the project folder, so relative paths
    mean the same as headless; returns the working directory."""
    if ((cwd := Path.cwd()) / "01_prepare.ipynb").is_file() and cwd.name == "notebooks":
        os.chdir(cwd.parent)
    return Path.cwd()


def show(*objs: Any) -> None:
    """``IPython.display.display`` inside IPython, ``print`` elsewhere (scripts, tests)."""
    if get_ipython() is not None:
        display(*objs)
    else:
        print(*objs, sep="\n")


def table(rows: Iterable[Mapping], columns: Sequence[str] | None = None, *,
          max_rows: int | None = 30, title: str | None = None) -> pd.DataFrame:
    """Rows of dicts as a DataFrame (``columns`` picks the keys, ``max_rows`` None: all); the
    title (and "first n of N rows") names the column axis, so it heads HTML and text alike."""
    rows = [dict(r) for r in rows]
    df = pd.DataFrame(rows[:max_rows], columns=columns)
    cut = f"first {len(df)} of {len(rows)} rows" if len(df) < len(rows) else ""
    df.columns.name = "; ".join(t for t in (title, cut) if t) or None
    return df


class ParameterForm:
    """A column of labelled inputs (``widget``), one per parameter, read back by :meth:`values`:
    bool -> checkbox, int / float -> number box, str -> text box (a dropdown with ``choices``),
    anything else -> a Python literal's text."""

    def __init__(self, defaults: Mapping[str, Any], *,
                 choices: Mapping[str, Sequence] | None = None, title: str | None = None):
        self.defaults = dict(defaults)
        choices = {k: list(v) for k, v in (choices or {}).items()}
        if unknown := sorted(set(choices) - set(self.defaults)):
            raise ConfigError(f"parameter_form: choices given for unknown parameters {unknown}")
        # parameters whose input holds a Python literal's text, not the value itself
        self._literal = {n for n, d in self.defaults.items()
                         if n not in choices and not isinstance(d, (bool, int, float, str))}
        self.inputs: dict[str, Any] = {}
        for name, default in self.defaults.items():
            kw = {"description": name, "style": _STYLE}
            if name in choices:
                if default not in choices[name]:
                    raise ConfigError(f"parameter_form: default {default!r} of {name} is not "
                                      f"among {choices[name]}")
                self.inputs[name] = w.Dropdown(options=choices[name], value=default, **kw)
            elif isinstance(default, bool):
                self.inputs[name] = w.Checkbox(value=default, indent=False, **kw)
            else:
                box = {int: w.IntText, float: w.FloatText}.get(type(default), w.Text)
                self.inputs[name] = box(value=repr(default) if name in self._literal else default,
                                        layout=w.Layout(width="32em"), **kw)
        head = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.widget = w.VBox(head + list(self.inputs.values()))

    def value(self, name: str) -> Any:
        """Current value of one parameter, typed like its default (a bad literal: ConfigError)."""
        raw, default = self.inputs[name].value, self.defaults[name]
        if name not in self._literal:
            return raw
        try:
            value = ast.literal_eval(raw) if raw.strip() or default is not None else None
        except (ValueError, SyntaxError) as e:
            raise ConfigError(
                f"parameter {name}: {raw!r} is not a Python literal like {default!r} ({e})") from e
        if default is not None and not isinstance(value, type(default)):
            raise ConfigError(f"parameter {name}: expected a {type(default).__name__} like "
                              f"{default!r}, got {value!r}")
        return value

    def values(self) -> dict[str, Any]:
        """All current values, typed like the defaults."""
        return {name: self.value(name) for name in self.defaults}

    def set_values(self, values: Mapping[str, Any]) -> None:
        """Put ``values`` into the inputs (unknown names raise ConfigError)."""
        for name, v in values.items():
            if name not in self.inputs:
                raise ConfigError(f"parameter_form: no parameter named {name!r}")
            self.inputs[name].value = repr(v) if name in self._literal else v

    def observe(self, callback: Callable[[str, Any], None]) -> None:
        """Call ``callback(name, value)`` after each edit (interactive sessions only)."""
        for name, box in self.inputs.items():
            def _changed(change: Any, _name: str = name) -> None:
                with contextlib.suppress(ConfigError):  # a half-typed literal: wait for more
                    callback(_name, self.value(_name))

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
    if missing := [n for n in names if n not in namespace]:
        raise ConfigError(f"edit_parameters: {missing} are not defined in the parameters cell")
    form = parameter_form({n: namespace[n] for n in names}, choices=choices, title=title)
    form.observe(namespace.__setitem__)
    show(form.widget)
    return form


def audio_excerpt_wav(path: str | os.PathLike, *, start_s: float = 0.0,
                      max_seconds: float = 30.0) -> bytes:
    """A mono 16-bit WAV (bytes) of ``max_seconds`` of ``path`` from ``start_s`` at the file's
    sample rate, for players (an excerpt keeps notebooks small)."""
    if not (path := Path(path)).exists():
        raise AudioError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            f.seek(min(int(start_s * sr), max(f.frames - 1, 0)))
            y = f.read(frames=int(max_seconds * sr), dtype="float32", always_2d=True).mean(axis=1)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot decode audio for playback ({e})") from e
    buf = io.BytesIO()
    sf.write(buf, y / max(1.0, float(np.max(np.abs(y), initial=0.0))), sr, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def audio_player(path: str | os.PathLike, *, max_seconds: float = 30.0) -> Any:
    """An ipywidgets Audio player of an excerpt; an unreadable file gives a red note instead."""
    try:
        data = audio_excerpt_wav(path, max_seconds=max_seconds)
    except AudioError as e:
        return w.HTML(f"<span style='color:#b00'>{html.escape(str(e))}</span>")
    return w.Audio(value=data, format="wav", autoplay=False, loop=False,
                   layout=w.Layout(width="16em"))


def audio(path: str | os.PathLike, *, start_s: float = 0.0, max_seconds: float = 30.0) -> Audio:
    """An ``IPython.display.Audio`` of an excerpt: unlike a widget, it plays in saved notebooks."""
    return Audio(data=audio_excerpt_wav(path, start_s=start_s, max_seconds=max_seconds),
                 autoplay=False)


def results_table(rows: Sequence[Mapping], columns: Sequence[str], *,
                  audio_column: str | None = None, max_seconds: float = 30.0) -> Any:
    """An ipywidgets grid of ``columns`` of ``rows``, plus a player of each ``audio_column``."""
    head = [*columns, "listen"] if audio_column else list(columns)
    cells = [w.HTML(f"<b>{html.escape(c)}</b>") for c in head]
    for r in rows:
        cells += [w.HTML(html.escape("" if v is None else format(v, ".3f") if isinstance(
            v, (float, np.floating)) else str(v))) for v in (r.get(c) for c in columns)]
        if audio_column:
            p = r.get(audio_column)
            cells.append(audio_player(p, max_seconds=max_seconds) if p else w.HTML(""))
    return w.GridBox(cells, layout=w.Layout(grid_template_columns=" ".join(["auto"] * len(head)),
                                            grid_gap="2px 12px"))


class TrainingMonitor:
    """A training callback that redraws loss and mAP curves in place after every epoch;
    headless or with ``live=False`` it draws only on :meth:`figure` (``print_epochs``: a line
    per epoch). ``rows`` seeds it with earlier records (a resumed run's)."""

    def __init__(self, *, live: bool | None = None, rows: Iterable[Mapping] = (),
                 print_epochs: bool = False):
        self.live = interactive_session() if live is None else live
        self.rows: list[dict] = [dict(r) for r in rows]
        self.print_epochs, self._handle = print_epochs, None

    def __call__(self, record: Mapping) -> None:
        self.rows.append(rec := dict(record))
        if rec.get("kind") != "epoch":
            return
        if self.live and self._handle is None:
            self._handle = display(self.figure(), display_id=True)
        elif self.live:
            self._handle.update(self.figure())
        elif self.print_epochs:
            print(self.epoch_line(rec), flush=True)

    @staticmethod
    def epoch_line(rec: Mapping) -> str:
        """One line for an epoch record: the epoch and its numeric values."""
        return "  ".join([f"epoch {rec.get('epoch')}"] + [
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
            if k not in ("kind", "epoch", "time", "timestamp")
            and isinstance(v, (int, float)) and not isinstance(v, bool)])

    def figure(self) -> Any:
        """The current curves (:func:`chlib.ui.plots.plot_training_curves`)."""
        return plot_training_curves(self.rows)


def epoch_table(rows: Iterable[Mapping], *, max_rows: int | None = 60) -> pd.DataFrame:
    """One row per epoch of training's ``epoch`` records (the last one wins): losses, learning
    rate, mAP per test set and the best-epoch flag."""
    by_epoch = {int(r["epoch"]): dict(r) for r in rows
                if r.get("kind", "epoch") == "epoch" and r.get("epoch") is not None}
    recs = [by_epoch[e] for e in sorted(by_epoch)]
    maps = sorted({k for r in recs for k in r if k.startswith("mAP/")})
    cols = [c for c in ("epoch", "step", "train_total", "train_foc_loss", "val_loss", "lr",
                        *maps, "is_best") if any(c in r for r in recs)]
    return table(recs, cols, max_rows=max_rows,
                 title=f"{len(recs)} epochs" if recs else "no epochs yet")


def cqt_examples(manifest_path: str | os.PathLike, *, work: str | None = None, n: int = 3
                 ) -> tuple[list[np.ndarray], list[str]]:
    """``(CQT arrays [frames, bins], perf titles)`` of ``n`` performances of one work (None: the
    one with most recordings) from a full.txt-style manifest, tempo copies skipped."""
    recs = [r for r in read_manifest(manifest_path, required=("perf", "work", "feat"))
            if r.get("source_perf") in (None, "", r["perf"])]
    if not recs:
        raise ConfigError(f"{manifest_path}: no recordings with features")
    work = work if work is not None else Counter(r["work"] for r in recs).most_common(1)[0][0]
    if not (chosen := [r for r in recs if r["work"] == work][: max(1, n)]):
        raise ConfigError(f"{manifest_path}: no recording of work {work!r}")
    arrays = [np.asarray(load_feature(feature_path(r, manifest_path))) for r in chosen]
    return arrays, [str(r["perf"]) for r in chosen]


def _png(fig: Any) -> Image:
    return Image(figure_png(fig, 90))


class IdentifyApp:
    """Upload or type a query, set ``top_k`` and ``threshold_p``, press Identify: the matches
    with players and the query's CQT beside its best match's. ``widget`` is the box to display,
    ``report`` the last IdentifyReport; nothing runs until the button is pressed."""

    def __init__(self, model: Any, hp: Any, index: Any, *, device: str = "auto",
                 top_k: int = 10, threshold_p: float = 0.001, path: str = "",
                 upload_dir: str | os.PathLike | None = None, max_seconds: float = 30.0):
        self.model, self.hp, self.index, self.device = model, hp, index, device
        self.max_seconds, self.upload_dir, self.report = max_seconds, upload_dir, None
        self._by_perf = {r["perf"]: r for r in index.records}
        form = ParameterForm({"query_path": str(path), "top_k": int(top_k),
                              "threshold_p": float(threshold_p)})
        self.path, self.top_k, self.threshold = form.inputs.values()
        self.upload = w.FileUpload(accept="audio/*", multiple=False, description="upload audio")
        button, self.out = w.Button(description="Identify", button_style="primary"), w.Output()
        button.on_click(lambda _b: self.run())
        self.widget = w.VBox([self.upload, form.widget, button, self.out])

    def query_paths(self) -> list[str]:
        """The uploaded file (saved to ``upload_dir`` or a temporary folder), else the file or
        the audio files of the folder that ``query_path`` names."""
        if files := self.upload.value:
            item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
            folder = Path(self.upload_dir or tempfile.mkdtemp(prefix="chlib_upload_"))
            folder.mkdir(parents=True, exist_ok=True)
            (target := folder / Path(item["name"]).name).write_bytes(bytes(item["content"]))
            return [str(target)]
        if str(p := Path(self.path.value.strip())) in ("", "."):
            raise ConfigError("upload an audio file or type the path of one")
        if not p.exists():
            raise ConfigError(f"{p}: no such file or folder")
        return [str(f) for f in find_audio_files(p)] if p.is_dir() else [str(p)]

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
            if best := [r for r in self.report.best() if r["rank"] == 1]:
                display(_png(self.match_figure(best[0])))

    def views(self, query: str) -> list:
        """The query's player and its results grid with a player per match."""
        rows = [dict(r, wav=self._by_perf.get(r["perf"], {}).get("wav"))
                for r in self.report.rows if r["query"] == query and r["rank"]]
        head = w.HBox([w.HTML(f"<b>{html.escape(Path(query).name)}</b>&nbsp;"),
                       audio_player(query, max_seconds=self.max_seconds)])
        return [head, results_table(rows, _MATCH_COLUMNS, audio_column="wav",
                                    max_seconds=self.max_seconds)]

    def match_figure(self, best_row: Mapping) -> Any:
        """CQT of the query beside its best match's."""
        return query_match_figure(best_row["query"], self._by_perf.get(best_row["perf"], {}),
                                  self.hp, max_seconds=self.max_seconds)


class EmbeddingExplorer:
    """Map of an ExplorerData's recordings: colour by any column, find a work, pick a recording
    to list its neighbours, hear it and see its CQT (plain ipywidgets + PNGs); ``widget``."""

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
        self.map_out, self.detail_out = w.Output(), w.Output()
        self.widget = w.VBox([form.widget, w.HBox([self.map_out, self.detail_out])])

    def state(self) -> dict:
        """The current choices as plain values."""
        return {"projection": self.projection.value, "colour_by": self.colour.value,
                "highlight": self.data.matching_works(self.search.value.strip()),
                "row": self.data.index_of(self.point.value), "k": self.k.value}

    def map_figure(self) -> Any:
        """The projection with the current colouring, highlight, selection and neighbours."""
        return explorer_map_figure(self.data, self.projection.value, self.colour.value,
                                   row=self.data.index_of(self.point.value),
                                   highlight_work=self.search.value.strip(),
                                   n_neighbours=self.k.value, seed=self.seed)

    def refresh(self) -> None:
        """Redraw the map and the selected recording's details."""
        row = self.data.index_of(self.point.value)
        rec = self.data.records[row]
        for out in (self.map_out, self.detail_out):
            out.clear_output(wait=True)
        with self.map_out:
            display(_png(self.map_figure()))
        with self.detail_out:
            print(f"{rec['perf']} - {rec['work']} ({rec.get('role')})")
            if rec.get("wav"):
                display(audio_player(rec["wav"], max_seconds=self.max_seconds))
            display(table(self.data.neighbours(row, self.k.value),
                          ["rank", "perf", "work", "role", "distance", "same_work"]))
            if rec.get("feat"):
                display(_png(plot_cqts([self.data.cqt(row)], [str(rec["perf"])],
                                       features=self.features, max_seconds=self.max_seconds,
                                       panel_size=(6, 2.8))))

    def show(self) -> None:
        """Display the explorer and draw it once."""
        show(self.widget)
        self.refresh()
