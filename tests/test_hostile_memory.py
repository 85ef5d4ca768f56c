"""Issue 10, memory on long files: bounded CQT batches and blocks (mem1), streamed decoding
(mem2), the long-file benchmark (mem3)."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from bad_inputs import make_pool_result_arrays, write_long_stereo_wav

from chlib.core.config import FeatureSettings
from chlib.core.parallel import run_jobs
from chlib.signal import audio, cqt
from chlib.signal.cqt import (
    compute_cqt_db,
    compute_cqt_db_batch,
    get_extractor,
    kernel_length,
    n_frames,
)

SR = 16000
FLAVOURS = {"coverhunter": FeatureSettings(flavour="coverhunter"),
            "nnaudio": FeatureSettings(flavour="nnaudio")}
REPO = Path(__file__).resolve().parents[1]


def _music_like(n: int, seed: int = 3) -> np.ndarray:
    """Noise, a few tones and one loud burst late in the signal (the track maximum)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    y = 0.05 * rng.standard_normal(n) + 0.2 * np.sin(2 * np.pi * 220 * t) * (t % 2 < 1)
    y += 0.1 * np.sin(2 * np.pi * 1760 * t)
    y[int(0.8 * n):int(0.8 * n) + 4000] *= 4.0
    return y.astype(np.float32)


def _spy_transform(monkeypatch, settings: FeatureSettings, fake: bool = False) -> list[tuple]:
    """Record the [batch, samples] shape of every transform call (``fake``: return ones)."""
    impl = get_extractor(settings, "cpu").impl
    real, calls = impl.transform, []

    def spy(padded: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(padded.shape))
        if not fake:
            return real(padded)
        frames = (padded.shape[1] - kernel_length(settings)) // settings.hop_length + 1
        return torch.ones(padded.shape[0], frames, settings.n_bins)

    monkeypatch.setattr(impl, "transform", spy)
    return calls


# ------------------------------------------------------------------ mem1: CQT blocks, batches


@pytest.mark.parametrize("flavour", ["coverhunter", "nnaudio"])
def test_mem1_blockwise_cqt_equals_whole_signal(flavour, monkeypatch):
    settings = FLAVOURS[flavour]
    y = _music_like(170_000)  # ~4 blocks of 40,000 samples
    whole = compute_cqt_db(y, settings, device="cpu")
    calls = _spy_transform(monkeypatch, settings)
    blocked = compute_cqt_db_batch([y], settings, device="cpu", block_samples=40_000)[0]
    assert len(calls) >= 1 and sum(b for b, _ in calls) >= 4  # really in blocks
    assert max(p for _, p in calls) <= 40_000 + kernel_length(settings)
    assert blocked.shape == whole.shape == (n_frames(len(y), settings), 96)
    assert blocked.dtype == np.float32 and blocked.max() == 0.0
    assert float(np.abs(blocked - whole).max()) < 1e-3


@pytest.mark.parametrize("flavour", ["coverhunter", "nnaudio"])
def test_mem1_mixed_lengths_in_small_sub_batches_equal_per_item(flavour):
    settings = FLAVOURS[flavour]
    signals = [_music_like(n, seed=n) for n in (150_000, 20_000, 33_000, 9_000, 90_000)]
    got = compute_cqt_db_batch(signals, settings, device="cpu", batch_size=3,
                               block_samples=40_000, max_batch_samples=100_000)
    for y, g in zip(signals, got, strict=True):
        alone = compute_cqt_db(y, settings, device="cpu")
        assert g.shape == alone.shape
        assert float(np.abs(g - alone).max()) < 1e-3


def test_mem1_one_long_signal_does_not_pad_the_batch(monkeypatch):
    """The issue's case, scaled: one long signal with nine short clips. Each transform call
    holds at most BATCH_SAMPLES samples and little padding (before: 10 x the long one)."""
    settings = FLAVOURS["nnaudio"]
    calls = _spy_transform(monkeypatch, settings, fake=True)
    long = np.zeros(2 * cqt.BLOCK_SAMPLES + 12_345, dtype=np.float32)
    clips = [np.zeros(30 * SR + 100 * i, dtype=np.float32) for i in range(9)]
    out = compute_cqt_db_batch([long, *clips], settings, device="cpu", batch_size=16)
    assert [o.shape[0] for o in out] == [n_frames(len(y), settings) for y in [long, *clips]]
    assert max(b * p for b, p in calls) <= cqt.BATCH_SAMPLES
    assert max(p for _, p in calls) <= cqt.BLOCK_SAMPLES + kernel_length(settings)
    total = sum(b * p for b, p in calls)
    useful = sum(len(y) for y in [long, *clips])
    assert total < 1.3 * useful  # padding and block overlap stay small


# ------------------------------------------------------------------ mem2: streamed decoding


def test_mem2_streamed_decode_equals_whole_file_decode(tmp_path, monkeypatch):
    import torchaudio.functional as taf

    rng = np.random.default_rng(5)
    stereo = (rng.standard_normal((200_001, 2)) * 0.2).astype(np.float32)
    sf.write(tmp_path / "st.wav", stereo, 44100, subtype="FLOAT")
    mono16 = (rng.standard_normal(100_003) * 0.2).astype(np.float32)
    sf.write(tmp_path / "m.wav", mono16, SR, subtype="FLOAT")
    monkeypatch.setattr(audio, "DECODE_BLOCK", 4097)  # many blocks, none aligned to a row
    ref = taf.resample(torch.from_numpy(audio.to_mono(stereo)), 44100, SR).numpy()
    got = audio.load_audio(tmp_path / "st.wav")
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-6)
    np.testing.assert_array_equal(audio.load_audio(tmp_path / "m.wav"), mono16)
    y, err = audio.try_load_audio(tmp_path / "st.wav", normalise=True)
    assert err is None
    np.testing.assert_allclose(y, audio.peak_normalise(ref), atol=2e-6)


def test_mem2_decode_holds_no_full_length_multichannel_copy(tmp_path):
    """120 s of 44.1 kHz stereo: float32 stereo would be 42 MB, the 16 kHz result is 7.7 MB;
    decoding (and normalising) may hold the result plus a few blocks, nothing full-length."""
    path = write_long_stereo_wav(tmp_path, seconds=120.0)
    out_bytes = 120 * SR * 4
    for normalise in (False, True):
        tracemalloc.start()
        try:
            y, err = audio.try_load_audio(path, normalise=normalise)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err is None and y.shape == (120 * SR,)
        assert peak < 1.5 * out_bytes + 8e6, f"peak {peak / 1e6:.1f} MB (normalise={normalise})"


def test_mem2_errors_are_still_found_when_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "DECODE_BLOCK", 1000)
    bad = np.full((20_000, 2), 0.3, dtype=np.float32)
    bad[15_000:15_010] = np.nan  # damage in a late block only
    sf.write(tmp_path / "nan.wav", bad, SR, subtype="FLOAT")
    y, err = audio.try_load_audio(tmp_path / "nan.wav")
    assert y is None and "20 samples are NaN" in err and "nan.wav" in err
    quiet = np.zeros((30_000, 2), dtype=np.float32)
    quiet[:, 0], quiet[:, 1] = 0.3, -0.3  # phase-inverted: silent once mixed
    sf.write(tmp_path / "inv.wav", quiet, SR, subtype="FLOAT")
    y, err = audio.try_load_audio(tmp_path / "inv.wav")
    assert y is None and "silent" in err and "phase-inverted" in err


def test_mem2_iter_load_audio_streams_long_files_in_the_caller(tmp_path, monkeypatch):
    path = write_long_stereo_wav(tmp_path, seconds=3.0)
    short = write_long_stereo_wav(tmp_path, "short.wav", seconds=1.5)
    want = [audio.load_audio(path), audio.load_audio(short)]
    monkeypatch.setattr(audio, "_THREAD_DECODE_SAMPLES", 2 * 44100 * 2)
    whole = audio.decode_audio
    decoded: list[str] = []
    monkeypatch.setattr(audio, "decode_audio", lambda p: decoded.append(Path(p).name) or whole(p))
    got = list(audio.iter_load_audio([path, short], num_workers=2))
    assert decoded == ["short.wav"]  # the long file was never decoded whole
    for (_, y, err), ref in zip(got, want, strict=True):
        assert err is None
        np.testing.assert_array_equal(y, ref)


def test_mem2_peak_normalise_in_place_equals_the_copy(rng):
    y = (rng.standard_normal(10_001) * 0.7).astype(np.float32)
    copy = audio.peak_normalise(y)
    same = audio.peak_normalise(y, out=y)
    assert same is y
    np.testing.assert_array_equal(same, copy)


# ------------------------------------------------------------------ mem3: the benchmark


@pytest.mark.slow
def test_mem3_long_files_benchmark_runs_and_reports(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "long_files.py"), "--hours",
                          "0.02", "--stereo-hours", "0.02", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("GB target") == 4 and "FAILED" not in out.stdout
    assert "4 of 4 cases within their targets" in out.stdout



def test_mem4_a_workers_large_result_arrives_in_one_copy():
    """A decoded 2-hour signal came back from a decoding worker as two full copies in the main
    process (the pickled message, then the array): now it is read straight into its array."""
    n = 20_000_000
    tracemalloc.start()
    try:
        [(_, out)] = list(run_jobs(make_pool_result_arrays, [(n,)], num_workers=1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    big, strided, empty = out
    assert big.shape == (n,) and float(big[-1]) == 0.5 and big.flags.writeable
    assert strided.tolist() == [0, 2, 4] and empty.shape == (0,)
    assert peak < 1.4 * big.nbytes, f"the result took {peak / big.nbytes:.2f} x its size here"
