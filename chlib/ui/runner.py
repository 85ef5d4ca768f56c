"""Run the numbered notebooks headless with papermill (``python -m chlib run``) into
``runs/<run>/notebooks/``, with their ``parameters`` cells overridden (``run_dir`` =
``runs/<run>`` where declared); a parameter that no chosen notebook declares is an error. With
``progress`` the terminal shows each notebook's live copy and the lines it prints (training: one
per epoch) as they come; a failure is summarised (notebook, cell, how to resume)."""

from __future__ import annotations

import ast
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from nbclient.exceptions import DeadKernelError

from chlib.core.errors import ConfigError
from chlib.core.progress import echo

__all__ = ["NOTEBOOKS", "find_notebooks_dir", "notebook_path", "notebook_parameters",
           "parameter_help", "parse_cli_value", "run_notebooks", "RunRecord"]

#: The numbered notebooks, in pipeline order.
NOTEBOOKS = ("01_prepare", "02_extract", "03_train", "04_tune", "05_evaluate", "06_identify",
             "07_explore", "08_probe")


def find_notebooks_dir(start: str | Path | None = None) -> Path:
    """The ``notebooks/`` folder: searched from ``start`` (cwd) upwards, then beside chlib."""
    here = Path(start or Path.cwd()).resolve()
    for d in [here, *here.parents, Path(__file__).resolve().parents[2]]:
        if (d / "notebooks" / f"{NOTEBOOKS[0]}.ipynb").exists():
            return d / "notebooks"
    raise ConfigError(
        f"no notebooks/ folder found from {here} upwards; run from the chlib repository root")


def notebook_path(name: str, notebooks_dir: Path | None = None) -> Path:
    """Path of a notebook given as ``03_train``, ``03`` or ``03_train.ipynb``."""
    stem = name.removesuffix(".ipynb")
    if not (matches := [n for n in NOTEBOOKS if stem in (n, n.split("_")[0])]):
        raise ConfigError(f"unknown notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
    if not (path := (notebooks_dir or find_notebooks_dir()) / f"{matches[0]}.ipynb").exists():
        raise ConfigError(f"{path}: notebook not found")
    return path


def _inspect(path: str | Path) -> dict[str, dict]:
    if not (params := pm.inspect_notebook(str(path))):
        raise ConfigError(f"{path}: no parameters declared (no cell tagged 'parameters')")
    return params


def _literal(text: str) -> Any:
    """A Python literal's value, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """Names and defaults of the notebook's ``parameters`` cell (non-literals as source text)."""
    return {name: _literal(p["default"]) for name, p in _inspect(path).items()}


def parameter_help(path: str | Path) -> list[str]:
    """One line per parameter: ``name = default  # help`` (the trailing comment of its line)."""
    return [f"{name} = {p['default']}" + (f"  # {p['help']}" if p["help"] else "")
            for name, p in _inspect(path).items()]


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_cli_value(text: str) -> Any:
    """``-p key value`` values: Python/YAML-ish literals (numbers, bools, None, lists), else str."""
    return _WORDS.get(text.strip().lower(), _literal(text))


@dataclass
class RunRecord:
    """What one batch run did: per notebook its output path, wall time and error (or None)."""

    run_dir: Path
    executed: list[dict] = field(default_factory=list)  # notebook, output, error, seconds, ...

    @property
    def ok(self) -> bool:
        return all(e["error"] is None for e in self.executed)

    def summary(self) -> str:
        return "\n".join([f"run folder: {self.run_dir}"] + [
            f"  {e['notebook']:<12} {e['seconds']:7.1f} s  "
            f"{'ok' if e['error'] is None else 'FAILED: ' + e['error']}  -> {e['output']}"
            for e in self.executed])


_RESUME = ("then re-run the same command: finished steps (features, checkpoints, index) are "
           "reused and training resumes")


def _failed_cell(out: Path) -> str:
    """The cell that failed (else the last one papermill started), read from the output
    notebook: ``cell N ('its code')``."""
    try:
        code = [c for c in nbformat.read(str(out), as_version=4).cells if c.cell_type == "code"]
    except (OSError, ValueError):
        code = []
    meta = [(n, c, c.metadata.get("papermill", {})) for n, c in enumerate(code, 1)]
    started = [(n, c) for n, c, m in meta if m.get("exception")] \
        or [(n, c) for n, c, m in meta if m.get("start_time")]
    return (f"cell {started[-1][0]} ({' '.join(started[-1][1].source.split())[:80]!r})"
            if started else "an unknown cell")


class _Echo:
    """papermill's ``stdout_file``: each complete line a notebook prints, echoed at once."""

    def __init__(self, prefix: str):
        self.prefix, self.part = prefix, ""

    def write(self, text: str) -> None:
        *lines, self.part = (self.part + text).split("\n")
        for line in lines:
            echo(self.prefix + line.rsplit("\r", 1)[-1])

    def flush(self) -> None:  # lines are echoed as they complete
        pass


def run_notebooks(names: Sequence[str], *, run: str | None = None,
                  run_dir: str | Path | None = None, parameters: dict[str, Any] | None = None,
                  runs_root: str | Path = "runs", cwd: str | Path | None = None,
                  progress: bool = True, stop_on_error: bool = True) -> RunRecord:
    """Execute notebooks ``names`` (``01_prepare``, ``02`` ...) in order into
    ``<run_dir>/notebooks/`` (default ``runs_root/run``), each with the ``parameters`` it
    declares; kernels run in ``cwd`` (default: the repository root)."""
    nb_dir = find_notebooks_dir(cwd)
    if run_dir is None and run is None:
        raise ConfigError("give run= (a name under runs/) or run_dir=")
    run_dir = Path(run_dir) if run_dir is not None else Path(runs_root) / run
    params = parameters or {}
    paths = [notebook_path(n, nb_dir) for n in names]
    declared = {p: notebook_parameters(p) for p in paths}
    known = {k for d in declared.values() for k in d}
    if unknown := sorted(set(params) - known):
        raise ConfigError(
            f"parameter(s) {', '.join(unknown)} are declared by none of "
            f"{', '.join(p.stem for p in paths)}; declared: {', '.join(sorted(known))}")
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    record, given = RunRecord(run_dir=run_dir), {"run_dir": str(run_dir), **params}
    for path in paths:
        mine = {k: v for k, v in given.items() if k in declared[path]}
        out, t0, error = run_dir / "notebooks" / path.name, time.perf_counter(), None
        if progress:
            echo(f"executing {path.stem} (live copy: {out})")
        try:
            pm.execute_notebook(str(path), str(out), parameters=mine, kernel_name="python3",
                                cwd=str(Path(cwd) if cwd else nb_dir.parent),
                                progress_bar=progress,
                                stdout_file=_Echo(f"  {path.stem}: ") if progress else None)
        except pm.PapermillExecutionError as e:
            error = f"{e.ename}: {e.evalue} in {_failed_cell(out)}; fix it, {_RESUME} (see {out})"
        except DeadKernelError:
            error = (f"the kernel died in {_failed_cell(out)}: it was killed, most likely out "
                     f"of memory (or by a signal); lower batch sizes or free memory, {_RESUME} "
                     f"(see {out})")
        except KeyboardInterrupt:
            error, stop_on_error = f"interrupted in {_failed_cell(out)}; {_RESUME}", True
        record.executed.append({"notebook": path.stem, "output": str(out), "error": error,
                                "seconds": time.perf_counter() - t0, "parameters": mine})
        if error and stop_on_error:
            break
    return record
