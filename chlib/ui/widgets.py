"""Small interactive helpers for the notebooks: forms, tables, audio players, live plots.
Headless runs never depend on widgets (their callbacks do not fire there): the ``parameters``
cell drives every computation; a form only edits it in an :func:`interactive_session`."""

from __future__ import annotations

import ast
import contextlib
import html
import io
import math
import os
import re
import tokenize
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
from scipy.signal import resample_poly
from traitlets import TraitError

from chlib.core.errors import AudioError, ConfigError
from chlib.core.io import atomic_write_text, json_text, read_json
from chlib.core.manifest import read_manifest
from chlib.data.features import feature_path, load_feature
from chlib.ui.plots import figure_png, plot_training_curves

__all__ = ["Table", "in_papermill", "interactive_session", "use_project_root", "table", "ParameterForm",
           "parameter_form", "parameter_comments", "quoted_choices", "edit_parameters", "show",
           "audio_excerpt_wav", "audio_player", "results_table", "TrainingMonitor", "audio",
           "cqt_examples", "epoch_table", "png_image"]

#: Environment variable forcing the answer of :func:`interactive_session` ("1" / "0").
INTERACTIVE_ENV = "CHLIB_INTERACTIVE"
_STYLE = {"description_width": "13em"}  # one label width: the inputs line up
# the hover help's trait: "tooltip" in ipywidgets 8, "description_tooltip" in 7 (Colab's)
TOOLTIP = "tooltip" if "tooltip" in w.Text.class_trait_names() else "description_tooltip"


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


def _cell(v: Any) -> Any:
    """A table cell's text: floats to 4 significant digits (whole ones as integers), NaN and
    None blank."""
    if v is None:
        return ""
    if not isinstance(v, float):
        return v
    if v != v:
        return ""
    return f"{v:.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"


class Table(pd.DataFrame):
    """A DataFrame that shows in a notebook as a table a person reads: its title (the column
    axis' name) as a caption above it, no row numbers, text left-aligned, numbers to 4
    significant digits, HTML in cells escaped. Everything else is the DataFrame's."""

    @property
    def _constructor(self) -> type:
        return Table

    def _repr_html_(self) -> str:
        plain = pd.DataFrame(self).rename_axis(columns=None)
        text = [c for c in plain.columns if not pd.api.types.is_numeric_dtype(plain[c])]
        return (plain.style.hide(axis="index").set_caption(html.escape(self.columns.name or ""))
                .format(_cell, escape="html")
                .set_properties(subset=text, **{"text-align": "left"})
                .set_table_styles([{"selector": "caption", "props": "caption-side: top; "
                                    "text-align: left; font-weight: bold; padding: 4px 0"},
                                   {"selector": "th", "props": "text-align: left"}])
                .to_html())


def table(rows: Iterable[Mapping], columns: Sequence[str] | None = None, *,
          max_rows: int | None = 30, title: str | None = None) -> Table:
    """Rows of dicts as a :class:`Table` (``columns`` picks the keys, ``max_rows`` None: all);
    the title (and "first n of N rows") names the column axis, so it heads HTML and text alike."""
    rows = [dict(r) for r in rows]
    df = Table(pd.DataFrame(rows[:max_rows], columns=columns))
    cut = f"first {len(df)} of {len(rows)} rows" if len(df) < len(rows) else ""
    df.columns.name = "; ".join(t for t in (title, cut) if t) or None
    return df


class ParameterForm:
    """A column of labelled inputs (``widget``), one per parameter, read back by :meth:`values`:
    bool -> checkbox, int / float -> number box, str -> text box (a dropdown with ``choices``),
    anything else -> a Python literal's text. ``help`` (name -> text, e.g. the parameter's
    comment) is shown beside the input and as its tooltip; a str parameter whose help lists
    quoted values (:func:`quoted_choices`) gets a dropdown, or a combo box if more is allowed."""

    def __init__(self, defaults: Mapping[str, Any], *,
                 choices: Mapping[str, Sequence] | None = None, title: str | None = None,
                 help: Mapping[str, str] | None = None):
        self.defaults, help = dict(defaults), dict(help or {})
        choices = {k: list(v) for k, v in (choices or {}).items()}
        if unknown := sorted(set(choices) - set(self.defaults)):
            raise ConfigError(f"parameter_form: choices given for unknown parameters {unknown}")
        # parameters whose input holds a Python literal's text, not the value itself
        self._literal = {n for n, d in self.defaults.items()
                         if n not in choices and not isinstance(d, (bool, int, float, str))}
        self.inputs: dict[str, Any] = {}
        for name, default in self.defaults.items():
            kw = {"description": name, "style": _STYLE, TOOLTIP: help.get(name) or None}
            wide = {"layout": w.Layout(width="32em"), **kw}
            listed, closed = quoted_choices(help.get(name, "")) if isinstance(
                default, str) else ([], True)
            if name in choices:
                if default not in choices[name]:
                    raise ConfigError(f"parameter_form: default {default!r} of {name} is not "
                                      f"among {choices[name]}")
                self.inputs[name] = w.Dropdown(options=choices[name], value=default, **kw)
            elif listed and closed and default in listed:
                self.inputs[name] = w.Dropdown(options=listed, value=default, **kw)
            elif listed:  # suggestions, free text still allowed
                self.inputs[name] = w.Combobox(options=listed, value=default,
                                               ensure_option=False, **wide)
            elif isinstance(default, bool):
                self.inputs[name] = w.Checkbox(value=default, indent=True, **kw)
            else:
                box = {int: w.IntText, float: w.FloatText}.get(type(default), w.Text)
                self.inputs[name] = box(value=repr(default) if name in self._literal else default,
                                        **wide)
        head = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.widget = w.VBox(head + [w.HBox([box, w.HTML(
            f"<span style='color:#666'>&nbsp;{html.escape(help[n])}</span>")]) if help.get(n)
            else box for n, box in self.inputs.items()])

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
    (``edit_parameters(globals(), [...])`` after the parameters cell); else nothing, None.
    The parameters' comments are its help; edits that differ from the notebook's values are
    kept (:class:`_SavedForm`, not under papermill) and applied again when it reruns (Run All)."""
    if not (interactive_session() if force is None else force):
        return None
    if missing := [n for n in names if n not in namespace]:
        raise ConfigError(f"edit_parameters: {missing} are not defined in the parameters cell")
    notebook = _notebook_path(namespace)
    form = parameter_form({n: namespace[n] for n in names}, choices=choices, title=title,
                          help=parameter_comments(_parameters_source(namespace, names, notebook)))
    saved = None if in_papermill() else _SavedForm(notebook, tuple(names))
    if applied := _apply_saved(form, saved.load() if saved else {}):
        namespace.update((n, form.value(n)) for n in applied)
        print(f"from the saved form ({saved.where}): " + ", ".join(
            f"{n} = {namespace[n]!r} (notebook: {form.defaults[n]!r})" for n in applied)
              + '; "reset to defaults" below goes back to the notebook\'s values')
    elif saved and saved.path is None:
        print(f"form edits are kept {saved.where}: they survive Run All, not a kernel restart")
    current = {n: namespace[n] for n in names}

    def _edited(name: str, value: Any) -> None:
        namespace[name] = current[name] = value
        if saved:
            saved.save({n: v for n, v in current.items() if v != form.defaults[n]})

    form.observe(_edited)
    form.reset_button = w.Button(description="reset to defaults", icon="undo")
    form.reset_button.on_click(lambda _b: form.set_values(form.defaults))
    form.widget.children += (form.reset_button,)
    show(form.widget)
    return form


def parameter_comments(source: str) -> dict[str, str]:
    """Name -> the comment ending its assignment line, in a parameters cell's ``source``."""
    try:
        tree = ast.parse(source)
        notes = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(
            io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    except (SyntaxError, tokenize.TokenError):
        return {}
    return {t.id: notes[node.end_lineno] for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.end_lineno in notes
            for t in getattr(node, "targets", [getattr(node, "target", None)])
            if isinstance(t, ast.Name)}


def quoted_choices(comment: str) -> tuple[list[str], bool]:
    """The double-quoted values a parameter comment lists (none unless two or more) and whether
    they are all of them (False once an unquoted alternative follows: "or the path of ...")."""
    more = re.search(r'\bor (?!")', comment)
    found = re.findall(r'"([^"]*)"', comment[:more.start()] if more else comment)
    return (found if len(found) > 1 else []), more is None


def _notebook_path(namespace: Mapping) -> Path | None:
    """The running notebook's path as the kernel knows it (``__session__``, JPY_SESSION_NAME:
    absolute from jupyter_server); None if unknown (Colab, VS Code, plain IPython)."""
    name = namespace.get("__session__") or os.environ.get("JPY_SESSION_NAME")
    return Path(name) if name and str(name).endswith(".ipynb") else None


def _parameters_source(namespace: Mapping, names: Sequence[str], notebook: Path | None) -> str:
    """The latest input cell (IPython's ``In``) commenting all ``names``, else the notebook
    file's cell tagged ``parameters``, else ""."""
    for cell in reversed(list(namespace.get("In") or [])):
        if "#" in cell and set(names) <= set(parameter_comments(cell)):
            return cell
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        for cell in read_json(notebook)["cells"]:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                return "".join(cell["source"])
    return ""


_MEMORY_FORMS: dict[tuple, dict] = {}  # a form's edits while its notebook's path is unknown


class _SavedForm:
    """A form's edits between runs: ``.<notebook stem>.form.json`` beside the notebook, or in
    memory (``_MEMORY_FORMS``) when the kernel does not know the notebook."""

    def __init__(self, notebook: Path | None, key: tuple):
        self.key = key
        self.path = notebook.parent / f".{notebook.stem}.form.json" if notebook else None
        self.where = str(self.path) if self.path else "in memory only (notebook path unknown)"

    def load(self) -> dict:
        if self.path is None:
            return dict(_MEMORY_FORMS.get(self.key, {}))
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            print(f"note: {self.path} ignored, unreadable ({e})")
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, edits: Mapping[str, Any]) -> None:
        if self.path is None:
            _MEMORY_FORMS[self.key] = dict(edits)
        elif edits:
            atomic_write_text(self.path, json_text(edits, 2, default=repr) + "\n")
        else:
            self.path.unlink(missing_ok=True)


def _apply_saved(form: ParameterForm, saved: Mapping[str, Any]) -> list[str]:
    """Put the saved values that still fit their parameter into ``form``; their names."""
    applied = []
    for name, value in saved.items():
        default = form.defaults.get(name)
        if name not in form.defaults or value == default or not (
                name in form._literal or type(value) is type(default)
                or (type(default) is float and type(value) is int)):
            continue
        try:
            form.set_values({name: value})
            form.value(name)
        except (ConfigError, TraitError):
            form.set_values({name: default})
            continue
        applied.append(name)
    return applied


def audio_excerpt_wav(path: str | os.PathLike, *, start_s: float = 0.0,
                      max_seconds: float = 30.0, sample_rate: int | None = None) -> bytes:
    """A mono 16-bit WAV (bytes) of ``max_seconds`` of ``path`` from ``start_s`` at the file's
    sample rate (or resampled to ``sample_rate``), for players (an excerpt keeps notebooks
    small)."""
    if not (path := Path(path)).exists():
        raise AudioError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            f.seek(min(int(start_s * sr), max(f.frames - 1, 0)))
            y = f.read(frames=int(max_seconds * sr), dtype="float32", always_2d=True).mean(axis=1)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot decode audio for playback ({e})") from e
    if sample_rate and sample_rate != sr and len(y):
        g = math.gcd(int(sample_rate), sr)
        y, sr = resample_poly(y, int(sample_rate) // g, sr // g).astype(np.float32), int(sample_rate)
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


def png_image(fig: Any) -> Image:
    """``fig`` as an IPython PNG image at 90 dpi."""
    return Image(figure_png(fig, 90))
