"""Run the numbered notebooks headless with papermill (batch runs).

``python -m chlib run 01_prepare 02_extract --run demo -p dataset_dir datasets/demo`` executes
each notebook in order, with the given parameters, into ``runs/<run>/notebooks/<name>.ipynb``.
Only the notebook's ``parameters`` cell is overridden (papermill's rule), and a parameter that
none of the chosen notebooks declares is an error, so a typo cannot be silently ignored.
Every notebook receives ``run_dir`` (= ``runs/<run>``) when it declares it.
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chlib.core.errors import ConfigError

__all__ = [
    "NOTEBOOKS",
    "find_notebooks_dir",
    "notebook_path",
    "notebook_parameters",
    "parse_cli_value",
    "run_notebooks",
    "RunRecord",
]

#: The numbered notebooks, in pipeline order.
NOTEBOOKS = (
    "01_prepare",
    "02_extract",
    "03_train",
    "04_tune",
    "05_evaluate",
    "06_identify",
    "07_explore",
)


def find_notebooks_dir(start: str | Path | None = None) -> Path:
    """The repository's ``notebooks/`` folder: searched from ``start`` (cwd) upwards, then
    beside the installed package."""
    here = Path(start or Path.cwd()).resolve()
    for d in [here, *here.parents]:
        if (d / "notebooks" / f"{NOTEBOOKS[0]}.ipynb").exists():
            return d / "notebooks"
    pkg = Path(__file__).resolve().parents[2] / "notebooks"
    if pkg.exists():
        return pkg
    raise ConfigError(
        f"no notebooks/ folder found from {here} upwards; run from the chlib repository root"
    )


def notebook_path(name: str, notebooks_dir: Path | None = None) -> Path:
    """Path of a notebook given as ``03_train``, ``03`` or ``03_train.ipynb``."""
    nb_dir = notebooks_dir or find_notebooks_dir()
    stem = name.removesuffix(".ipynb")
    matches = [n for n in NOTEBOOKS if n == stem or n.split("_")[0] == stem]
    if not matches:
        raise ConfigError(f"unknown notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
    path = nb_dir / f"{matches[0]}.ipynb"
    if not path.exists():
        raise ConfigError(f"{path}: notebook not found")
    return path


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """Names and default values declared in the notebook's ``parameters`` cell."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            out: dict[str, Any] = {}
            for node in ast.parse(src).body:
                target = None
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target, value = node.targets[0], node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    target, value = node.target, node.value
                if isinstance(target, ast.Name):
                    try:
                        out[target.id] = ast.literal_eval(value)
                    except ValueError:
                        out[target.id] = ast.unparse(value)
            return out
    raise ConfigError(f"{path}: no cell tagged 'parameters'")


def parse_cli_value(text: str) -> Any:
    """``-p key value`` values: Python/YAML-ish literals (numbers, bools, None, lists), else str."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass
class RunRecord:
    """What one batch run did: each notebook's output path, wall time and error (if any)."""

    run_dir: Path
    executed: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e["error"] is None for e in self.executed)

    def summary(self) -> str:
        lines = [f"run folder: {self.run_dir}"]
        for e in self.executed:
            status = "ok" if e["error"] is None else f"FAILED: {e['error']}"
            lines.append(f"  {e['notebook']:<12} {e['seconds']:7.1f} s  {status}  -> {e['output']}")
        return "\n".join(lines)


def run_notebooks(
    names: Sequence[str],
    *,
    run: str | None = None,
    run_dir: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    runs_root: str | Path = "runs",
    cwd: str | Path | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    stop_on_error: bool = True,
) -> RunRecord:
    """Execute notebooks in order with papermill into ``<run_dir>/notebooks/``.

    Parameters
    ----------
    names : notebook names (``01_prepare``, ``02`` ...), executed in the given order.
    run : name of the run folder under ``runs_root``; or give ``run_dir`` directly.
    parameters : values for the notebooks' ``parameters`` cells. Each notebook receives the
        subset it declares; a key no chosen notebook declares raises :class:`ConfigError`.
    cwd : working directory of the kernels (default: the repository root), so relative paths
        in parameters resolve as they do on the command line.
    """
    import papermill as pm

    nb_dir = find_notebooks_dir(cwd)
    repo_root = nb_dir.parent
    if run_dir is None:
        if run is None:
            raise ConfigError("give run= (a name under runs/) or run_dir=")
        run_dir = Path(runs_root) / run
    run_dir = Path(run_dir)
    params = dict(parameters or {})
    paths = [notebook_path(n, nb_dir) for n in names]
    declared = {p: notebook_parameters(p) for p in paths}
    known = set().union(*[set(d) for d in declared.values()]) if declared else set()
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"parameter(s) {', '.join(unknown)} are declared by none of "
            f"{', '.join(p.stem for p in paths)}; declared: {', '.join(sorted(known))}"
        )
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_dir=run_dir)
    for path in paths:
        mine = {k: v for k, v in params.items() if k in declared[path]}
        if "run_dir" in declared[path] and "run_dir" not in mine:
            mine["run_dir"] = str(run_dir)
        out = out_dir / path.name
        t0 = time.perf_counter()
        error = None
        try:
            pm.execute_notebook(
                str(path),
                str(out),
                parameters=mine,
                kernel_name=kernel_name,
                cwd=str(Path(cwd) if cwd else repo_root),
                progress_bar=progress,
            )
        except pm.PapermillExecutionError as e:
            error = f"{e.ename}: {e.evalue} (cell {e.exec_count}; see {out})"
        record.executed.append(
            {"notebook": path.stem, "output": str(out), "seconds": time.perf_counter() - t0,
             "error": error, "parameters": mine}
        )
        if error and stop_on_error:
            break
    return record
