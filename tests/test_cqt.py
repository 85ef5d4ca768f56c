"""chlib.signal.cqt: golden agreement of both flavours, tone placement, batching, frame counts, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chlib.core.config import FeatureSettings
from chlib.core.errors import AudioError, ConfigError
from chlib.signal.audio import load_audio, peak_normalise
from chlib.signal.cqt import (
    CQTExtractor,
    amplitude_to_db,
    compute_cqt_db,
    compute_cqt_db_batch,
    coverhunter_spectral_kernel,
    get_extractor,
    min_samples,
    n_frames,
)

SR = 16000
COVERHUNTER = FeatureSettings(flavour="coverhunter")
NNAUDIO = FeatureSettings(flavour="nnaudio")
FLAVOURS = {"coverhunter": COVERHUNTER, "nnaudio": NNAUDIO}


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "cqt_golden" / "cqt_golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tune_signal(fixtures_dir: Path) -> np.ndarray:
    """tune.wav through our own decoding and peak normalisation."""
    return peak_normalise(load_audio(fixtures_dir / "cqt_golden" / "tune.wav", sample_rate=SR))


def _max_diff_above(ours: np.ndarray, ref: np.ndarray, floor_db: float) -> float:
    assert ours.shape == ref.shape
    mask = ref > floor_db
    assert mask.sum() > 1000, "too few reference cells above the floor for a meaningful test"
    return float(np.abs(ours.astype(np.float64) - ref)[mask].max())


# ---------------------------------------------------------------------------------- golden


@pytest.mark.golden
def test_cqt_golden_decoding_reproduces_fixture_signal(golden, tune_signal):
    np.testing.assert_allclose(tune_signal, golden["signal"], atol=1e-6)


@pytest.mark.golden
@pytest.mark.parametrize("source", ["fixture_signal", "decoded_tune_wav"])
def test_cqt_golden_coverhunter_within_0p05_db_above_minus_60(golden, tune_signal, source):
    y = golden["signal"] if source == "fixture_signal" else tune_signal
    db = compute_cqt_db(y, COVERHUNTER, device="cpu")
    assert db.shape == golden["coverhunter"].shape == (300, 96)
    assert db.dtype == np.float32
    assert _max_diff_above(db, golden["coverhunter"], -60.0) < 0.05
    # the README's stricter reading: close on every cell above -80 dB as well
    assert _max_diff_above(db, golden["coverhunter"], -80.0) < 0.05


@pytest.mark.golden
def test_cqt_golden_coverhunter_float64_matches_original_precision(golden):
    db = compute_cqt_db(golden["signal"], COVERHUNTER, device="cpu", dtype=torch.float64)
    assert _max_diff_above(db, golden["coverhunter"], -60.0) < 0.005


@pytest.mark.golden
@pytest.mark.parametrize("source", ["fixture_signal", "decoded_tune_wav"])
def test_cqt_golden_nnaudio_matches_cqt1992v2(golden, tune_signal, source):
    y = golden["signal"] if source == "fixture_signal" else tune_signal
    db = compute_cqt_db(y, NNAUDIO, device="cpu")
    assert db.shape == golden["nnaudio_cqt1992v2"].shape == (301, 96)
    assert _max_diff_above(db, golden["nnaudio_cqt1992v2"], -60.0) < 0.01


@pytest.mark.golden
def test_cqt_golden_flavours_really_differ(golden):
    """Guard against testing one flavour twice: the two references are far apart."""
    a = compute_cqt_db(golden["signal"], COVERHUNTER, device="cpu")
    b = compute_cqt_db(golden["signal"], NNAUDIO, device="cpu")
    assert np.abs(a - b[:300]).mean() > 1.0


# ---------------------------------------------------------------------------------- exactness


def test_coverhunter_fast_path_equals_dense_reference_on_noise(rng):
    """Real-FFT folding and bin grouping reproduce |kernel @ fft(frame)| exactly (float64)."""
    y = (rng.standard_normal(SR) * 0.3).astype(np.float32)
    kernel = coverhunter_spectral_kernel(COVERHUNTER)
    n_fft, hop = kernel.shape[1], COVERHUNTER.hop_length
    padded = np.pad(y.astype(np.float64), ((n_fft - hop + 1) // 2, (n_fft - hop) // 2))
    frames = np.stack([padded[j * hop:j * hop + n_fft] for j in range(len(y) // hop)])
    reference = np.abs(np.fft.fft(frames, axis=1) @ kernel.T)
    ext = CQTExtractor(COVERHUNTER, device="cpu", dtype=torch.float64)
    ours = ext(torch.from_numpy(y)).numpy()[0]
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12 * reference.max())


def test_coverhunter_kernel_is_sparse_and_top_bins_reach_past_nyquist():
    kernel = coverhunter_spectral_kernel(COVERHUNTER)
    assert kernel.shape == (96, 16384)
    nonzero = np.abs(kernel) > 0
    assert nonzero.sum() < 0.05 * kernel.size
    assert nonzero[-1, 8193:].any()  # the fold onto the real-FFT half is exercised
    assert not nonzero[0, 200:].any()


# ---------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("flavour", ["coverhunter", "nnaudio"])
@pytest.mark.parametrize("k", [0, 10, 33, 57, 80, 95])
def test_pure_tone_peaks_in_its_bin(flavour, k):
    freq = 32.0 * 2 ** (k / 12)
    t = np.arange(2 * SR) / SR
    y = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    db = compute_cqt_db(y, FLAVOURS[flavour], device="cpu")
    profile = db.mean(axis=0)
    assert int(profile.argmax()) == k
    assert db.max() == 0.0


@pytest.mark.parametrize("flavour", ["coverhunter", "nnaudio"])
def test_batched_output_equals_per_item_output(flavour, rng):
    settings = FLAVOURS[flavour]
    lengths = [20000, 33000, 9000, 2 * SR + 17, 12345]
    signals = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    signals[1][5000:9000] += np.sin(np.arange(4000) * 0.3).astype(np.float32)
    batched = compute_cqt_db_batch(signals, settings, device="cpu", batch_size=3)
    assert len(batched) == len(signals)
    for y, got in zip(signals, batched, strict=True):
        alone = compute_cqt_db(y, settings, device="cpu")
        assert got.shape == alone.shape == (n_frames(len(y), settings), 96)
        np.testing.assert_allclose(got, alone, atol=1e-3)


@pytest.mark.parametrize("n_samples", [9000, 16000, 16639, 16640, 160000])
def test_frame_counts_per_flavour(n_samples, rng):
    y = (rng.standard_normal(n_samples) * 0.1).astype(np.float32)
    assert n_frames(n_samples, NNAUDIO) == n_samples // 640 + 1
    assert n_frames(n_samples, COVERHUNTER) == n_samples // 640
    for settings in (NNAUDIO, COVERHUNTER):
        assert compute_cqt_db(y, settings, device="cpu").shape == (n_frames(n_samples, settings), 96)


def test_ten_seconds_give_25_frames_per_second():
    assert n_frames(10 * SR, NNAUDIO) == 251
    assert n_frames(10 * SR, COVERHUNTER) == 250
    assert NNAUDIO.frames_per_second == 25.0


@pytest.mark.parametrize("flavour", ["coverhunter", "nnaudio"])
def test_forward_on_cpu_matches_numpy_api_and_caches_extractor(flavour, rng):
    settings = FLAVOURS[flavour]
    ext = get_extractor(settings, "cpu")
    assert get_extractor(settings, torch.device("cpu")) is ext
    assert ext.device.type == "cpu"
    assert all(b.device.type == "cpu" for b in ext.buffers())
    batch = torch.from_numpy((rng.standard_normal((2, SR)) * 0.2).astype(np.float32))
    mag = ext(batch)
    assert mag.shape == (2, n_frames(SR, settings), 96)
    assert (mag >= 0).all()
    db = amplitude_to_db(mag)
    np.testing.assert_allclose(db[1].numpy(), compute_cqt_db(batch[1].numpy(), settings, "cpu"),
                               atol=1e-4)


def test_amplitude_to_db_is_per_track_and_typed():
    track = np.abs(np.random.default_rng(1).standard_normal((5, 4))) + 0.1
    mag = np.stack([track, track * 100.0])
    db = amplitude_to_db(mag)
    assert db.shape == mag.shape
    np.testing.assert_allclose(db.max(axis=(1, 2)), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(db[0], db[1], atol=1e-6)  # scaling a track shifts nothing
    tensor_db = amplitude_to_db(torch.from_numpy(mag))
    assert isinstance(tensor_db, torch.Tensor)
    np.testing.assert_allclose(tensor_db.numpy(), db, atol=1e-9)
    expected = 20 * np.log10(mag[0] + 1e-9) - 20 * np.log10(mag[0].max() + 1e-9)
    np.testing.assert_allclose(db[0], expected, atol=1e-9)


@pytest.mark.parametrize("flavour", ["coverhunter", "nnaudio"])
def test_too_short_input_raises_audio_error(flavour):
    settings = FLAVOURS[flavour]
    need = min_samples(settings)
    with pytest.raises(AudioError, match="too short"):
        compute_cqt_db(np.zeros(need - 1, dtype=np.float32), settings, device="cpu")
    ok = compute_cqt_db(np.full(need, 0.1, dtype=np.float32), settings, device="cpu")
    assert ok.shape[0] == n_frames(need, settings) >= 1


def test_min_samples_default_values():
    assert min_samples(NNAUDIO) == 8193
    assert min_samples(COVERHUNTER) == 640


def test_bad_signals_and_options_raise_clear_errors():
    with pytest.raises(AudioError, match="NaN"):
        compute_cqt_db(np.full(SR, np.nan, dtype=np.float32), COVERHUNTER, device="cpu")
    with pytest.raises(AudioError, match="mono"):
        compute_cqt_db(np.zeros((SR, 2), dtype=np.float32), COVERHUNTER, device="cpu")
    with pytest.raises(ConfigError, match="float32"):
        CQTExtractor(NNAUDIO, device="cpu", dtype=torch.float64)
    with pytest.raises(ConfigError, match="device"):
        compute_cqt_db(np.zeros(SR, dtype=np.float32), COVERHUNTER, device="tpu")
    with pytest.raises(ConfigError, match="flavour"):
        compute_cqt_db(np.zeros(SR, dtype=np.float32), FeatureSettings(flavour="librosa"), "cpu")
