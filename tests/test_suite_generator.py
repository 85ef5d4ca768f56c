"""bench/suite/make_suite.py: the FluidSynth benchmark generator, on a 2 works x 2 versions suite.

Needs the fluidsynth and sox binaries and a General-MIDI soundfont (apt-get install fluidsynth
fluid-soundfont-gm sox). Without them the test is skipped, except under CI (CI=true) where it fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SUITE = Path(__file__).resolve().parents[1] / "bench" / "suite" / "make_suite.py"
SECONDS = (3.0, 4.0)
ARGS = dict(works=2, versions=2, seed=7, corpora=("bach", "ryansMammoth"), workers=2,
            seconds=SECONDS, log=lambda *a: None)


def _load():
    spec = importlib.util.spec_from_file_location("make_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_suite"] = mod  # worker processes unpickle make_suite.render_one
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def suite():
    mod = _load()
    missing = mod.render.tools_missing() + ([] if mod.render.find_fonts() else ["a GM soundfont"])
    if missing:
        msg = (f"bench/suite needs {', '.join(missing)} "
               "(apt-get install fluidsynth fluid-soundfont-gm sox)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI must install them")
        pytest.skip(msg)
    return mod


def _digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("audio/*/*.flac"))}


@pytest.mark.slow
def test_suite_manifest_audio_and_determinism(suite, tmp_path):
    out = tmp_path / "a"
    dataset = suite.make_suite(out, **ARGS)
    info = json.loads((out / "suite_info.json").read_text())
    assert info["failed"] == [] and info["recordings"] == 4 and info["soundfonts"]
    recs = [json.loads(x) for x in dataset.read_text().splitlines()]
    assert len(recs) == 4
    assert {tuple(sorted(r)) for r in recs} == {("dur_s", "perf", "version", "wav", "work")}
    works = sorted({r["work"] for r in recs})
    assert len(works) == 2 and len({r["perf"] for r in recs}) == 4
    audio = {}
    for r in recs:
        path = out / r["wav"]
        assert path.parent.name == r["work"] and path.suffix == ".flac"
        y, sr = sf.read(str(path), dtype="float32")
        assert sr == 16000 and y.ndim == 1
        assert r["dur_s"] == pytest.approx(len(y) / sr, abs=0.01)
        assert SECONDS[0] - 0.01 <= r["dur_s"] <= SECONDS[1] + 0.01
        assert np.isfinite(y).all() and 0.05 < np.abs(y).max() <= 1.0
        assert r["version"]
        audio[r["perf"]] = y
    for w in works:  # two versions of a work are two different renderings
        a, b = (audio[r["perf"]] for r in recs if r["work"] == w)
        n = min(len(a), len(b))
        assert len(a) != len(b) or not np.allclose(a[:n], b[:n], atol=1e-3)
        assert len({r["version"] for r in recs if r["work"] == w}) == 2

    again = tmp_path / "b"  # same seed, fresh folder: the same bytes
    suite.make_suite(again, **ARGS)
    assert _digests(again) == _digests(out) and len(_digests(out)) == 4
    assert (again / "dataset.txt").read_text() == dataset.read_text()

    before = {p: p.stat().st_mtime_ns for p in out.glob("audio/*/*.flac")}  # resumable: kept
    suite.make_suite(out, **ARGS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("audio/*/*.flac")} == before
    assert json.loads((out / "suite_info.json").read_text())["reused"] == 4
