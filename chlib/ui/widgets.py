"""Small interactive helpers for the notebooks: forms, tables, audio players, live plots.

Headless runs (papermill, nbconvert, plain Python) never depend on anything here: widget
callbacks do not fire under papermill, so the notebooks' ``parameters`` cell drives every
computation and the widgets only *edit* those values when a person is at the keyboard.

* :func:`interactive_session` tells the two situations apart (see its docstring for the rule).
* :func:`parameter_form` builds a form from a dict of defaults and reads the values back;
  :func:`edit_parameters` shows one that writes each change into the notebook's namespace.
* :class:`Table` / :func:`table` is a dependency-free table (text and HTML) for lists of dicts.
* :func:`audio_player`, :func:`results_table` show results with players for each recording.
* :class:`TrainingMonitor` redraws loss / mAP curves once per epoch during training.

ipywidgets is imported inside the functions that need it, so ``import chlib.ui.widgets`` is cheap.
"""

from __future__ import annotations

import ast
import html
import io
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chlib.core.errors import AudioError, ChlibError, ConfigError

__all__ = [
    "in_papermill",
    "interactive_session",
    "use_project_root",
    "Table",
    "table",
    "ParameterForm",
    "parameter_form",
    "edit_parameters",
    "show",
    "audio_excerpt_wav",
    "audio_player",
    "results_table",
    "TrainingMonitor",
    "audio",
    "cqt_examples",
    "epoch_table",
    "IdentifyApp",
    "EmbeddingExplorer",
]

#: Environment variable forcing the answer of :func:`interactive_session` ("1" / "0").
INTERACTIVE_ENV = "CHLIB_INTERACTIVE"


# --------------------------------------------------------------------------------------------
# where are we running?


def _kernel():
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    ip = get_ipython()
    return getattr(ip, "kernel", None) if ip is not None else None


def in_papermill() -> bool:
    """True when this code runs in a kernel driven by papermill / nbclient / nbconvert.

    Those clients execute cells with ``allow_stdin=False`` (nbclient sets it for every cell),
    whereas JupyterLab, Notebook, VS Code and Colab allow ``input()``. So: True inside an
    IPython kernel whose current request does not allow stdin.
    """
    k = _kernel()
    return k is not None and not bool(getattr(k, "_allow_stdin", False))


def interactive_session() -> bool:
    """True when a person is at a notebook front end and widgets can be used.

    ``CHLIB_INTERACTIVE=1`` / ``0`` in the environment forces the answer. Otherwise: inside an
    IPython kernel (JupyterLab, Colab, VS Code) and not under papermill. Plain Python, pytest and
    the IPython terminal are not interactive sessions (no widget front end).
    """
    forced = os.environ.get(INTERACTIVE_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    return _kernel() is not None and not in_papermill()


def use_project_root() -> Path:
    """Make the project folder the working directory when a notebook runs from ``notebooks/``.

    JupyterLab starts a notebook's kernel in the notebook's own folder, while headless runs
    (``python -m chlib run``) start in the project folder; moving up one level when the
    working directory holds the numbered notebooks makes relative paths such as
    ``datasets/demo`` mean the same in both. Anywhere else (Colab, a project folder) nothing
    changes. Returns the working directory.
    """
    cwd = Path.cwd()
    if (cwd / "01_prepare.ipynb").is_file() and cwd.name == "notebooks":
        os.chdir(cwd.parent)
    return Path.cwd()


def show(*objs: Any) -> None:
    """``IPython.display.display`` inside IPython, ``print`` elsewhere (scripts, tests)."""
    if "IPython" in sys.modules:
        from IPython import get_ipython

        if get_ipython() is not None:
            from IPython.display import display

            display(*objs)
            return
    for o in objs:
        print(o)


# --------------------------------------------------------------------------------------------
# tables


def _cell_text(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if np.isnan(v) else format(float(v), floatfmt)
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell_text(x, floatfmt) for x in v)
    return str(v)


class Table:
    """Rows of dicts shown as a table: plain text in a terminal, HTML in a notebook.

    ``Table(rows).rows`` keeps the data; ``str(table)`` / ``repr`` is an aligned text table and
    ``_repr_html_`` an HTML one, so ending a notebook cell with a Table displays it, and
    papermill saves both forms.
    """

    def __init__(self, rows: Iterable[Mapping], columns: Sequence[str] | None = None, *,
                 floatfmt: str = ".4g", max_rows: int | None = None, title: str | None = None):
        self.rows = [dict(r) for r in rows]
        if columns is None:
            columns = list(dict.fromkeys(k for r in self.rows for k in r))
        self.columns = list(columns)
        self.floatfmt = floatfmt
        self.max_rows = max_rows
        self.title = title

    def __len__(self) -> int:
        return len(self.rows)

    def _shown(self) -> tuple[list[dict], int]:
        if self.max_rows is None or len(self.rows) <= self.max_rows:
            return self.rows, 0
        return self.rows[: self.max_rows], len(self.rows) - self.max_rows

    def cells(self) -> list[list[str]]:
        """The displayed cells as strings, header row first."""
        shown, _ = self._shown()
        return [list(self.columns)] + [
            [_cell_text(r.get(c), self.floatfmt) for c in self.columns] for r in shown
        ]

    def to_text(self) -> str:
        cells = self.cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = ["  ".join(s.ljust(w) for s, w in zip(row, widths, strict=True)).rstrip()
                 for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        _, hidden = self._shown()
        if hidden:
            lines.append(f"... {hidden} more rows")
        if self.title:
            lines.insert(0, self.title)
        return "\n".join(lines)

    def to_html(self) -> str:
        cells = self.cells()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in cells[1:]
        )
        _, hidden = self._shown()
        foot = f"<p>... {hidden} more rows</p>" if hidden else ""
        cap = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return (f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                + foot)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return self.to_text()

    __str__ = __repr__

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write all rows (not only the shown ones) as CSV, atomically."""
        import csv

        from chlib.core.io import atomic_write_text

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in self.columns})
        atomic_write_text(path, buf.getvalue())
        return Path(path)


def table(rows: Iterable[Mapping], columns: Sequence[str] | None = None, *,
          floatfmt: str = ".4g", max_rows: int | None = 30, title: str | None = None) -> Table:
    """A :class:`Table` of ``rows`` (a list of dicts), showing at most ``max_rows`` rows."""
    return Table(rows, columns, floatfmt=floatfmt, max_rows=max_rows, title=title)


# --------------------------------------------------------------------------------------------
# parameter forms


def _parse_literal(text: str, name: str, default: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(
            f"parameter {name}: {text!r} is not a Python literal like {default!r} ({e})"
        ) from e
    if not isinstance(value, type(default)):
        raise ConfigError(
            f"parameter {name}: expected a {type(default).__name__} like {default!r}, got {value!r}"
        )
    return value


class ParameterForm:
    """A column of labelled inputs, one per parameter; :meth:`values` reads them back.

    Types follow the defaults: bool -> checkbox, int -> integer box, float -> number box,
    str -> text box (or a dropdown when ``choices`` lists the options), list / dict / None ->
    a text box holding a Python literal. ``widget`` is the ipywidgets container to display.
    """

    def __init__(self, defaults: Mapping[str, Any], *,
                 choices: Mapping[str, Sequence] | None = None,
                 descriptions: Mapping[str, str] | None = None,
                 title: str | None = None):
        import ipywidgets as w

        self.defaults = dict(defaults)
        self.choices = {k: list(v) for k, v in (choices or {}).items()}
        unknown = sorted(set(self.choices) - set(self.defaults))
        if unknown:
            raise ConfigError(f"parameter_form: choices given for unknown parameters {unknown}")
        self.inputs: dict[str, Any] = {}
        style = {"description_width": "initial"}
        layout = w.Layout(width="32em")
        for name, default in self.defaults.items():
            desc = (descriptions or {}).get(name, name)
            if name in self.choices:
                opts = self.choices[name]
                if default not in opts:
                    raise ConfigError(
                        f"parameter_form: default {default!r} of {name} is not among {opts}"
                    )
                box = w.Dropdown(options=opts, value=default, description=desc, style=style,
                                 layout=layout)
            elif isinstance(default, bool):
                box = w.Checkbox(value=default, description=desc, style=style, indent=False)
            elif isinstance(default, int):
                box = w.IntText(value=default, description=desc, style=style, layout=layout)
            elif isinstance(default, float):
                box = w.FloatText(value=default, description=desc, style=style, layout=layout)
            elif isinstance(default, str):
                box = w.Text(value=default, description=desc, style=style, layout=layout)
            else:
                box = w.Text(value=repr(default), description=desc, style=style, layout=layout)
            self.inputs[name] = box
        children = list(self.inputs.values())
        if title:
            children.insert(0, w.HTML(f"<b>{html.escape(title)}</b>"))
        self.widget = w.VBox(children)

    def value(self, name: str) -> Any:
        """Current value of one parameter, typed like its default."""
        default = self.defaults[name]
        raw = self.inputs[name].value
        if name in self.choices or isinstance(default, (bool, int, float, str)):
            return raw
        return _parse_literal(raw, name, default) if default is not None else (
            ast.literal_eval(raw) if raw.strip() else None)

    def values(self) -> dict[str, Any]:
        """All current values, typed like the defaults (a bad literal raises ConfigError)."""
        return {name: self.value(name) for name in self.defaults}

    def set_values(self, values: Mapping[str, Any]) -> None:
        """Put ``values`` into the inputs (unknown names raise ConfigError)."""
        for name, v in values.items():
            if name not in self.inputs:
                raise ConfigError(f"parameter_form: no parameter named {name!r}")
            box = self.inputs[name]
            plain = name in self.choices or isinstance(self.defaults[name], (bool, int, float, str))
            box.value = v if plain else repr(v)

    def observe(self, callback: Callable[[str, Any], None]) -> None:
        """Call ``callback(name, value)`` after each edit (interactive sessions only)."""
        for name, box in self.inputs.items():
            def _changed(change, _name=name):
                try:
                    callback(_name, self.value(_name))
                except ConfigError:
                    pass  # half-typed literal: wait for the next keystroke

            box.observe(_changed, names="value")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def parameter_form(defaults: Mapping[str, Any], *, choices: Mapping[str, Sequence] | None = None,
                   descriptions: Mapping[str, str] | None = None,
                   title: str | None = None) -> ParameterForm:
    """A :class:`ParameterForm` for ``defaults`` (name -> default value); read back with
    ``form.values()``."""
    return ParameterForm(defaults, choices=choices, descriptions=descriptions, title=title)


def edit_parameters(namespace: dict, names: Sequence[str], *,
                    choices: Mapping[str, Sequence] | None = None,
                    title: str = "Parameters (edit, then run the cells below)",
                    force: bool | None = None) -> ParameterForm | None:
    """In an interactive session, show a form for ``names`` that writes edits into ``namespace``.

    Use it right after the ``parameters`` cell: ``edit_parameters(globals(), ["n_works", ...])``.
    Every edit updates ``namespace[name]`` immediately; re-run the cells below to use it.
    Headless (papermill), or with ``force=False``, nothing is shown and None is returned, so the
    parameters cell alone drives the run.
    """
    if not (interactive_session() if force is None else force):
        return None
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ConfigError(f"edit_parameters: {missing} are not defined in the parameters cell")
    form = parameter_form({n: namespace[n] for n in names}, choices=choices, title=title)
    form.observe(lambda name, value: namespace.__setitem__(name, value))
    show(form.widget)
    return form


# --------------------------------------------------------------------------------------------
# audio and result tables


def audio_excerpt_wav(path: str | os.PathLike, *, start_s: float = 0.0,
                      max_seconds: float = 30.0) -> bytes:
    """A mono 16-bit WAV (bytes) of ``max_seconds`` of ``path`` from ``start_s``, for players.

    Decodes with soundfile (wav, flac, ogg, mp3); keeps the file's sample rate. Embedding an
    excerpt keeps notebooks small whatever the file's length and format.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            f.seek(min(int(start_s * sr), max(f.frames - 1, 0)))
            y = f.read(frames=int(max_seconds * sr), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot decode audio for playback ({e})") from e
    y = y.mean(axis=1)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 1.0:
        y = y / peak
    buf = io.BytesIO()
    sf.write(buf, y, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_player(path: str | os.PathLike, *, start_s: float = 0.0, max_seconds: float = 30.0):
    """An ipywidgets Audio player (no autoplay, no loop) for an excerpt of ``path``.

    An unreadable file gives a short red HTML note naming it instead of raising, so one bad
    file does not break a results table.
    """
    import ipywidgets as w

    try:
        data = audio_excerpt_wav(path, start_s=start_s, max_seconds=max_seconds)
    except AudioError as e:
        return w.HTML(f"<span style='color:#b00'>{html.escape(str(e))}</span>")
    return w.Audio(value=data, format="wav", autoplay=False, loop=False,
                   layout=w.Layout(width="16em"))


def results_table(rows: Sequence[Mapping], columns: Sequence[str], *,
                  audio_column: str | None = None, max_seconds: float = 30.0,
                  floatfmt: str = ".3f"):
    """A grid of result rows with an audio player in the last column.

    Parameters
    ----------
    rows : dicts, one per result (e.g. identify's matches).
    columns : keys shown as text columns, in order.
    audio_column : key of each row holding an audio path; its player fills the last column
        (rows without a path get an empty cell).

    Returns an ipywidgets GridBox of ``len(rows) + 1`` rows (header first).
    """
    import ipywidgets as w

    ncols = len(columns) + (1 if audio_column else 0)
    header = [w.HTML(f"<b>{html.escape(c)}</b>") for c in columns]
    if audio_column:
        header.append(w.HTML("<b>listen</b>"))
    cells = list(header)
    for r in rows:
        cells += [w.HTML(html.escape(_cell_text(r.get(c), floatfmt))) for c in columns]
        if audio_column:
            p = r.get(audio_column)
            cells.append(audio_player(p, max_seconds=max_seconds) if p else w.HTML(""))
    return w.GridBox(cells, layout=w.Layout(
        grid_template_columns=" ".join(["auto"] * ncols), grid_gap="2px 12px"))


# --------------------------------------------------------------------------------------------
# live training curves


class TrainingMonitor:
    """A training callback that redraws loss and mAP curves after every epoch.

    Interactive: one display area updated in place (``IPython.display`` handle). Headless
    (papermill) or with ``live=False``: draws nothing until :meth:`figure` is called at the end
    (and prints one line per epoch with ``print_epochs=True``; training prints its own).

    Pass it to ``chlib.train.loop.train(..., callbacks=[monitor])``: it is called with each epoch's
    record (``kind`` "epoch", ``train_<loss>``, ``val_<loss>``, ``mAP/<testset>`` ...), keeps
    them and redraws. ``rows`` seeds it with earlier records (a resumed run's metrics.jsonl).
    """

    def __init__(self, *, live: bool | None = None, every: int = 1,
                 rows: Iterable[Mapping] = (), print_epochs: bool = False):
        self.live = interactive_session() if live is None else live
        self.every = max(1, int(every))
        self.rows: list[dict] = [dict(r) for r in rows]  # e.g. read_metrics() of a resumed run
        self.print_epochs = print_epochs
        self._handle = None

    def __call__(self, record: Mapping | None = None, **kwargs: Any) -> None:
        rec = dict(record or {}, **kwargs)
        if not rec:
            return
        self.rows.append(rec)
        if rec.get("kind") != "epoch":
            return
        epoch = rec.get("epoch", 0)
        if self.live and int(epoch or 0) % self.every == 0:
            self._redraw()
        elif not self.live and self.print_epochs:
            print(self.epoch_line(rec), flush=True)

    @staticmethod
    def epoch_line(rec: Mapping) -> str:
        """One line for an epoch record: the epoch and its numeric values."""
        parts = [f"epoch {rec.get('epoch')}"]
        for k, v in rec.items():
            if k in ("kind", "epoch", "time", "timestamp"):
                continue
            if isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
            elif isinstance(v, int) and not isinstance(v, bool):
                parts.append(f"{k} {v}")
        return "  ".join(parts)

    def figure(self):
        """The current curves (see :func:`chlib.ui.plots.plot_training_curves`)."""
        from chlib.ui.plots import plot_training_curves

        return plot_training_curves(self.rows)

    def _redraw(self) -> None:
        from IPython.display import display

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


# --------------------------------------------------------------------------------------------
# small views of files on disk


def audio(path: str | os.PathLike, *, start_s: float = 0.0, max_seconds: float = 30.0):
    """An ``IPython.display.Audio`` of an excerpt: plays in JupyterLab, Colab and in saved
    (papermill) notebooks alike, unlike a widget."""
    from IPython.display import Audio

    return Audio(data=audio_excerpt_wav(path, start_s=start_s, max_seconds=max_seconds),
                 autoplay=False)


def cqt_examples(manifest_path: str | os.PathLike, *, work: str | None = None, n: int = 3
                 ) -> tuple[list[np.ndarray], list[str]]:
    """CQT arrays and titles of ``n`` performances of one work from a full.txt-style manifest.

    ``work`` None picks the work with the most recordings (ties: the first in the file);
    tempo copies are skipped. Returns ``(arrays [frames, bins] each, "perf (work)" titles)``.
    """
    from collections import Counter

    from chlib.core.manifest import read_manifest
    from chlib.data.features import feature_path, load_feature

    recs = [r for r in read_manifest(manifest_path, required=("perf", "work", "feat"))
            if not r.get("source_perf") or r.get("source_perf") == r["perf"]]
    if not recs:
        raise ConfigError(f"{manifest_path}: no recordings with features")
    if work is None:
        counts = Counter(r["work"] for r in recs)
        work = max(counts, key=lambda w: (counts[w], -next(i for i, r in enumerate(recs)
                                                           if r["work"] == w)))
    chosen = [r for r in recs if r["work"] == work][: max(1, n)]
    if not chosen:
        raise ConfigError(f"{manifest_path}: no recording of work {work!r}")
    arrays = [np.asarray(load_feature(feature_path(r, manifest_path))) for r in chosen]
    return arrays, [f"{r['perf']}" for r in chosen]


_EPOCH_COLUMNS = ("epoch", "step", "train_total", "train_foc_loss", "val_loss", "lr", "is_best")


def epoch_table(rows: Iterable[Mapping], *, max_rows: int | None = 60) -> Table:
    """One row per epoch from training's ``epoch`` records (the last record of an epoch wins),
    with the losses, learning rate, mAP per test set and the best-epoch flag."""
    by_epoch: dict[int, dict] = {}
    for r in rows:
        if r.get("kind", "epoch") == "epoch" and r.get("epoch") is not None:
            by_epoch[int(r["epoch"])] = dict(r)
    recs = [by_epoch[e] for e in sorted(by_epoch)]
    maps = sorted({k for r in recs for k in r if k.startswith("mAP/")})
    cols = [c for c in _EPOCH_COLUMNS if any(c in r for r in recs)]
    cols = cols[:-1] + maps + cols[-1:] if cols and cols[-1] == "is_best" else cols + maps
    return Table(recs, cols, floatfmt=".4g", max_rows=max_rows,
                 title=f"{len(recs)} epochs" if recs else "no epochs yet")


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# interactive identification (06_identify)


class IdentifyApp:
    """Upload a file or type a path, set top-k and the p threshold, press Identify.

    Shows the matches as a table with an audio player for the query and each match, and the
    query's CQT beside its best match's. ``widget`` is the ipywidgets box to display; the
    last :class:`chlib.retrieval.identify.IdentifyReport` is kept in ``report``. Nothing runs until the
    button is pressed (so nothing runs under papermill).
    """

    def __init__(self, model: Any, hp: Any, index: Any, *, device: str = "auto",
                 top_k: int = 10, threshold_p: float = 0.001, path: str = "",
                 upload_dir: str | os.PathLike | None = None, max_seconds: float = 30.0):
        import ipywidgets as w

        self.model, self.hp, self.index, self.device = model, hp, index, device
        self.max_seconds = max_seconds
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None
        self.report = None
        style = {"description_width": "initial"}
        self.upload = w.FileUpload(accept="audio/*", multiple=False, description="upload audio")
        self.path = w.Text(value=str(path), description="or a path", style=style,
                           placeholder="an audio file or a folder", layout=w.Layout(width="40em"))
        self.top_k = w.IntSlider(value=int(top_k), min=1, max=50, description="top k",
                                 style=style)
        self.threshold = w.FloatLogSlider(value=float(threshold_p), base=10, min=-6, max=-1,
                                          step=0.25, description="p threshold", style=style,
                                          readout_format=".0e")
        self.button = w.Button(description="Identify", button_style="primary", icon="search")
        self.out = w.Output()
        self.button.on_click(lambda _b: self.run())
        self.widget = w.VBox([w.HBox([self.upload, self.path]), w.HBox([self.top_k, self.threshold]),
                              self.button, self.out])

    def query_paths(self) -> list[str]:
        """The uploaded file (saved to ``upload_dir`` or a temporary folder), else the path box
        (a file, or every audio file of a folder)."""
        import tempfile

        from chlib.retrieval.identify import find_audio_files

        files = self.upload.value
        if files:
            item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
            folder = self.upload_dir or Path(tempfile.mkdtemp(prefix="chlib_upload_"))
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / Path(item["name"]).name
            target.write_bytes(bytes(item["content"]))
            return [str(target)]
        p = Path(self.path.value.strip())
        if not str(p) or str(p) == ".":
            raise ConfigError("upload an audio file or type the path of one")
        if p.is_dir():
            return [str(f) for f in find_audio_files(p)]
        if not p.is_file():
            raise ConfigError(f"{p}: no such file or folder")
        return [str(p)]

    def run(self) -> None:
        """Identify the chosen query and show the results (called by the button)."""
        from IPython.display import Image, display

        from chlib.retrieval.identify import identify

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
            fig_rows = [r for r in self.report.best() if r["rank"] == 1]
            if fig_rows:
                display(Image(_fig_png(self.match_figure(fig_rows[0]))))

    def views(self, query: str) -> list:
        """The query's player and its results grid with a player per match."""
        import ipywidgets as w

        rows = [dict(r) for r in self.report.rows if r["query"] == query and r["rank"]]
        by_perf = {r["perf"]: r for r in self.index.records}
        for r in rows:
            r["wav"] = (by_perf.get(r["perf"]) or {}).get("wav")
        head = w.HBox([w.HTML(f"<b>{html.escape(Path(query).name)}</b>&nbsp;"),
                       audio_player(query, max_seconds=self.max_seconds)])
        grid = results_table(rows, ["rank", "work", "perf", "distance", "p_value", "verdict"],
                             audio_column="wav", max_seconds=self.max_seconds)
        return [head, grid]

    def match_figure(self, best_row: Mapping):
        """CQT of the query beside its best match (see :func:`chlib.retrieval.evaluate.query_match_figure`)."""
        from chlib.retrieval.evaluate import query_match_figure

        by_perf = {r["perf"]: r for r in self.index.records}
        return query_match_figure(best_row["query"], by_perf.get(best_row["perf"], {}), self.hp,
                                  max_seconds=self.max_seconds)


# --------------------------------------------------------------------------------------------
# the embedding explorer (07_explore)


class EmbeddingExplorer:
    """Projection of reference and query recordings; colour by any column; find a work; pick
    a recording to list its nearest neighbours, hear it and see its CQT.

    ``data`` is a :class:`chlib.retrieval.evaluate.ExplorerData`. Pure ipywidgets + matplotlib PNGs, so it
    works in JupyterLab and Colab without extensions. ``widget`` is the box to display.
    """

    def __init__(self, data: Any, *, projection: str = "umap", colour_by: str = "work",
                 highlight_work: str = "", point: str = "", n_neighbours: int = 10,
                 seed: int = 0, features: Any = None, max_seconds: float = 30.0):
        import ipywidgets as w

        self.data, self.seed, self.features, self.max_seconds = data, seed, features, max_seconds
        style = {"description_width": "initial"}
        self.projection = w.Dropdown(options=["umap", "tsne", "pca"], value=projection,
                                     description="projection", style=style)
        self.colour = w.Dropdown(options=data.columns(), value=colour_by, description="colour by",
                                 style=style)
        self.search = w.Text(value=highlight_work, description="highlight work",
                             placeholder="part of a work name", style=style)
        perfs = [str(r["perf"]) for r in data.records]
        start = data.index_of(point) if point else 0
        self.point = w.Dropdown(options=perfs, value=perfs[start], description="recording",
                                style=style, layout=w.Layout(width="36em"))
        self.k = w.IntSlider(value=n_neighbours, min=1, max=50, description="neighbours",
                             style=style)
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

    def map_figure(self):
        """The projection with the current colouring, highlight, selection and neighbours."""
        s = self.state()
        return self.data.map_figure(s["projection"], s["colour_by"],
                                    highlight_work=self.search.value.strip(), row=s["row"],
                                    n_neighbours=s["k"], seed=self.seed)

    def refresh(self) -> None:
        """Redraw the map and the selected recording's details."""
        from IPython.display import Image, display

        from chlib.ui.plots import plot_cqt

        s = self.state()
        self.map_out.clear_output(wait=True)
        with self.map_out:
            display(Image(_fig_png(self.map_figure())))
        self.detail_out.clear_output(wait=True)
        with self.detail_out:
            rec = self.data.records[s["row"]]
            print(f"{rec['perf']} - {rec['work']} ({rec.get('role')})")
            if rec.get("wav"):
                display(audio_player(rec["wav"], max_seconds=self.max_seconds))
            display(table(self.data.neighbours(s["row"], s["k"]),
                          ["rank", "perf", "work", "role", "distance", "same_work"]))
            if rec.get("feat"):
                fps = self.features.frames_per_second if self.features is not None else 25.0
                fig = plot_cqt(self.data.cqt(s["row"])[: int(self.max_seconds * fps)],
                               features=self.features, title=str(rec["perf"]),
                               figsize=(6, 2.8))
                display(Image(_fig_png(fig)))

    def show(self) -> None:
        """Display the explorer and draw it once."""
        show(self.widget)
        self.refresh()
