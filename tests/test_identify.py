"""Tests of chlib.retrieval.identify with a tiny stand-in model and synthetic audio."""

from __future__ import annotations

import csv
from functools import partial

import numpy as np
import pytest
import soundfile as sf
from helpers import StandIn as _StandIn

from chlib.core.config import HParams
from chlib.core.errors import IndexMismatchError
from chlib.retrieval.identify import (
    CSV_COLUMNS,
    VERDICT_LIKELY,
    VERDICT_NONE,
    VERDICT_POSSIBLE,
    identify,
    identify_folder,
    verdict,
)
from chlib.retrieval.index import build_index
from chlib.signal.audio import load_audio, peak_normalise
from chlib.signal.cqt import compute_cqt_db

SR = 16000
StandIn = partial(_StandIn, n_bins=96, dim=16, centre=True, scale=1.0)  # CQT input


def tune(seed: int, seconds: float) -> np.ndarray:
    """A little melody of random notes (sine tones with harmonics), float32 mono."""
    rng = np.random.default_rng(seed)
    notes = 220.0 * 2 ** (rng.integers(0, 24, size=int(seconds * 2)) / 12)
    n = int(SR * 0.5)
    t = np.arange(n) / SR
    env = np.minimum(1.0, 20 * t) * np.exp(-3 * t)
    parts = [env * sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3)) for f in notes]
    return (0.3 * np.concatenate(parts)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("identify")
    hp = HParams.from_dict({"chunk_frame": [25], "mean_size": 2})  # windows of 50 frames = 2 s
    model = StandIn()
    records = []
    for w in range(3):
        for v in range(2):
            wav = root / "refs" / f"w{w}v{v}.wav"
            wav.parent.mkdir(exist_ok=True)
            sf.write(wav, tune(10 * w + v, 8.0 + 2 * v), SR)
            y = peak_normalise(load_audio(wav, sample_rate=SR))
            feat = root / "feat" / f"w{w}v{v}.npy"
            feat.parent.mkdir(exist_ok=True)
            np.save(feat, compute_cqt_db(y, hp.features, device="cpu"))
            records.append({"perf": f"w{w}v{v}", "work": f"work{w}", "work_id": w,
                            "wav": str(wav), "feat": str(feat)})
    index = build_index(model, records, hp, device="cpu", progress=False)
    # unrelated distractors so that the calibration has enough cross-work pairs for p < 0.001
    rng = np.random.default_rng(0)
    extra = [{"perf": f"x{i}", "work": f"x{i // 2}"} for i in range(80)]
    index.add(extra, [rng.normal(size=(2, 16)) for _ in extra])
    return root, hp, model, index, records


def test_identify_finds_a_reference_itself_with_distance_zero(setup):
    root, hp, model, index, records = setup
    rep = identify([records[2]["wav"]], model=model, hp=hp, index=index, device="cpu",
                   top_k=5, by="perf")
    top = rep.best()[0]
    assert top["perf"] == records[2]["perf"] and top["work"] == "work1"
    assert top["distance"] == pytest.approx(0.0, abs=1e-4)
    assert top["p_value"] < 0.001 and top["verdict"] == VERDICT_LIKELY
    assert top["query_windows"] >= 4  # all 8 s are embedded, not only the first window
    assert len(rep.rows) == 5 and [r["rank"] for r in rep.rows] == [1, 2, 3, 4, 5]
    for k in ("decode_s", "features_s", "model_s", "search_s", "total_s"):
        assert rep.timings[k] >= 0.0
    assert rep.timings["total_s"] >= rep.timings["model_s"]


def test_identify_folder_writes_the_csv_and_reports_corrupt_files(setup, tmp_path):
    root, hp, model, index, records = setup
    q = tmp_path / "queries"
    q.mkdir()
    (q / "a_corrupt.wav").write_bytes(b"RIFF but not really a wav file")
    sf.write(q / "b_short.wav", np.zeros(100, np.float32) + 0.1, SR)  # too short to decode
    sf.write(q / "c_good.flac", tune(0, 8.0), SR)  # the same tune as reference w0v0
    (q / "notes.txt").write_text("not audio, not picked up")
    out = tmp_path / "out" / "matches.csv"
    rep = identify_folder(q, model=model, hp=hp, index=index, out_csv=out, device="cpu", top_k=3)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    by_query = {}
    for r in rows:
        by_query.setdefault(r["query"].rsplit("/", 1)[-1], []).append(r)
    assert set(by_query) == {"a_corrupt.wav", "b_short.wav", "c_good.flac"}
    assert by_query["a_corrupt.wav"][0]["error"] and by_query["a_corrupt.wav"][0]["rank"] == ""
    assert "short" in by_query["b_short.wav"][0]["error"]
    good = by_query["c_good.flac"]
    assert len(good) == 3 and not good[0]["error"]
    assert good[0]["work"] == "work0" and good[0]["verdict"] == VERDICT_LIKELY
    assert float(good[0]["distance"]) < 1e-3
    assert good[0]["n_work_recordings"] == "2"  # by="work" is the default
    assert rep.timings["n_failed"] == 2 and rep.timings["n_queries"] == 3
    assert len(rep.errors) == 2


def test_identify_refuses_an_index_of_another_model(setup):
    root, hp, model, index, records = setup
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        identify([records[0]["wav"]], model=StandIn(seed=1), hp=hp, index=index, device="cpu")


def test_identify_refuses_an_index_built_with_other_windows(setup):
    root, hp, model, index, records = setup
    other = hp.updated({"chunk_frame": [30]})
    with pytest.raises(IndexMismatchError, match="chunk_len"):
        identify([records[0]["wav"]], model=model, hp=other, index=index, device="cpu")


def test_identify_verdict_bands():
    assert verdict(1e-5) == VERDICT_LIKELY
    assert verdict(0.01) == VERDICT_POSSIBLE
    assert verdict(0.2) == VERDICT_NONE
    assert verdict(0.01, threshold_p=0.02) == VERDICT_LIKELY
    assert verdict(float("nan")) == "no calibration"
