"""The one progress bar of chlib: a ``tqdm.auto`` bar (a silent no-op bar when disabled)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["progress", "echo"]


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, leave: bool = True) -> tqdm:
    """A bar over ``iterable``, or a manual one (``total``, ``update(n)``, ``close()``);
    disabled, it draws nothing but still iterates and accepts ``update`` / ``set_postfix``."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not enabled)


def echo(line: str) -> None:
    """Print ``line`` to stdout at once, above the bars drawing in this process."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
