"""Strip outputs, execution counts and run metadata from notebooks before committing them.

Usage::

    python tools/clear_notebook_outputs.py                 # every notebooks/*.ipynb, in place
    python tools/clear_notebook_outputs.py a.ipynb b.ipynb
    python tools/clear_notebook_outputs.py --check         # exit 1 if any notebook has outputs

Cleared: each code cell's ``outputs`` and ``execution_count``, cell metadata written by runs
(``execution``, ``papermill``, ``collapsed``, ``scrolled``), and notebook metadata written by
runs (``widgets`` state, ``papermill``). Cell sources, tags and ids are kept. Files are written
only when something changed, atomically, as nbformat writes them (1-space indent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["clear_notebook", "notebook_is_clean", "clear_file", "main"]

_CELL_META_RUN_KEYS = ("execution", "papermill", "collapsed", "scrolled")
_NB_META_RUN_KEYS = ("widgets", "papermill")


def clear_notebook(nb: dict) -> bool:
    """Clear ``nb`` (a notebook as a JSON dict) in place; True if anything was removed."""
    changed = False
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        for k in _CELL_META_RUN_KEYS:
            if k in meta:
                del meta[k]
                changed = True
        if cell.get("cell_type") != "code":
            if cell.pop("outputs", None) is not None or cell.pop("execution_count", None) is not None:
                changed = True
            continue
        if cell.get("outputs"):
            changed = True
        cell["outputs"] = []
        if cell.get("execution_count") is not None:
            changed = True
        cell["execution_count"] = None
    meta = nb.get("metadata", {})
    for k in _NB_META_RUN_KEYS:
        if k in meta:
            del meta[k]
            changed = True
    return changed


def notebook_is_clean(nb: dict) -> bool:
    """True when ``nb`` has no outputs, execution counts or run metadata."""
    return not clear_notebook(json.loads(json.dumps(nb)))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clear_file(path: str | os.PathLike, *, check: bool = False) -> bool:
    """Clear one ``.ipynb`` file in place (or only report, with ``check``); True if it had
    anything to clear."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    changed = clear_notebook(nb)
    if changed and not check:
        _write_atomic(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a notebook has outputs")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths] or sorted(
        (Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
    dirty = [p for p in paths if clear_file(p, check=args.check)]
    for p in dirty:
        print(f"{'has outputs' if args.check else 'cleared'}: {p}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
