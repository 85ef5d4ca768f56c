"""Shared pytest fixtures: the golden-fixture folder and a seeded random generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    """``shared/fixtures``; tests that need it are skipped when it is absent."""
    path = shared_dir / "fixtures"
    if not path.is_dir():
        pytest.skip(f"golden fixtures not found at {path}")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator per test."""
    return np.random.default_rng(20231125)
