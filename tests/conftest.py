"""Shared pytest fixtures: the golden-fixture folder and a seeded random generator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    """``shared/`` beside the repository (CI clones it there), else the repository's own."""
    beside = Path(__file__).resolve().parents[2] / "shared"
    if (beside / "fixtures").is_dir():
        return beside
    return REPO_ROOT / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared/`` folder (reference documents and fixtures)."""
    return _shared_dir()


def require_fixture(path: Path) -> Path:
    """``path`` when it exists; else skip the test, or fail it under CI (``CI=true``).

    CI always has ``shared/`` beside the clone, so a missing fixture there is a broken path, not
    an absent optional folder: it must not pass silently as a skip.
    """
    if path.exists():
        return path
    msg = f"golden fixture not found at {path} (set CHLIB_FIXTURES or put shared/ beside the repo)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + "; under CI the fixtures must be present")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    """``shared/fixtures``; skipped when absent, a failure under CI."""
    return require_fixture(shared_dir / "fixtures")


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator per test."""
    return np.random.default_rng(20231125)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run several times faster on one thread, above all on a busy 2-core machine
    (modules that train use it with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count changes every later test in the process (a
    resumed run then differs from an uninterrupted one in the last bits): use one_torch_thread."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, (f"this test left torch with {after} threads (it had {before}): use "
                             "the one_torch_thread fixture instead of torch.set_num_threads")
