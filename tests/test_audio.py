"""chlib.signal.audio: decoding, mono mix, resampling, validation errors, peak normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import sine as _tone

from chlib.core.errors import AudioError
from chlib.signal.audio import (
    MIN_SECONDS,
    audio_info,
    iter_load_audio,
    load_audio,
    peak_normalise,
    try_load_audio,
)


def _dominant_hz(y: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * sr / len(y))


def test_wav_at_target_rate_is_returned_sample_exact(tmp_path):
    y = _tone(440, 1.5, 16000)
    path = tmp_path / "a.wav"
    sf.write(path, y, 16000, subtype="FLOAT")
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    np.testing.assert_array_equal(out, y)


def test_stereo_is_mean_of_channels(tmp_path):
    left, right = _tone(300, 1.2, 16000, 0.6), _tone(500, 1.2, 16000, 0.2)
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


def test_resampling_44k1_stereo_keeps_pitch_and_duration(tmp_path):
    y = _tone(440, 2.0, 44100)
    path = tmp_path / "cd.wav"
    sf.write(path, np.stack([y, y], axis=1), 44100, subtype="PCM_16")
    out = load_audio(path, sample_rate=16000)
    assert abs(len(out) - 32000) <= 1
    assert abs(_dominant_hz(out, 16000) - 440) < 1.0
    assert 0.45 < np.abs(out).max() < 0.55


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_compressed_formats_decode_without_ffmpeg(tmp_path, fmt, ext):
    y = _tone(660, 2.0, 22050)
    path = tmp_path / f"x.{ext}"
    sf.write(path, y, 22050, format=fmt)
    out = load_audio(path, sample_rate=16000)
    # MP3 encoders add up to a few frames of priming; everything else is sample exact.
    assert abs(len(out) / 16000 - 2.0) < 0.1
    assert abs(_dominant_hz(out, 16000) - 660) < 2.0


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nothere.wav"
    with pytest.raises(AudioError, match="nothere.wav.*not found"):
        load_audio(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp3"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.mp3.*empty"):
        load_audio(path)


@pytest.mark.parametrize("content", [b"this is not audio at all " * 40, bytes(range(256)) * 20])
def test_corrupt_or_non_audio_content(tmp_path, content):
    path = tmp_path / "fake.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="fake.wav.*cannot decode"):
        load_audio(path)


def test_nan_samples_are_rejected(tmp_path):
    y = _tone(440, 1.5, 16000)
    y[100] = np.nan
    y[200] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, y, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: 2 samples are NaN or infinite"):
        load_audio(path)


@pytest.mark.parametrize("amp", [0.0, 5e-5])
def test_silent_audio_is_rejected(tmp_path, amp):
    path = tmp_path / "quiet.wav"
    sf.write(path, _tone(440, 1.5, 16000, amp), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="quiet.wav: silent"):
        load_audio(path)


def test_quiet_but_not_silent_audio_is_accepted(tmp_path):
    path = tmp_path / "soft.wav"
    sf.write(path, _tone(440, 1.5, 16000, 3e-4), 16000, subtype="FLOAT")
    assert np.abs(load_audio(path)).max() > 2e-4


def test_phase_inverted_stereo_is_silent_after_mixing(tmp_path):
    y = _tone(440, 1.5, 16000)
    path = tmp_path / "inv.wav"
    sf.write(path, np.stack([y, -y], axis=1), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="phase-inverted"):
        load_audio(path)


def test_too_short_audio_and_the_min_seconds_parameter(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _tone(440, 0.5, 16000), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="short.wav: too short: 0.500 s"):
        load_audio(path)
    assert len(load_audio(path, min_seconds=0.4)) == 8000
    assert 1.0 <= MIN_SECONDS <= 1.1


def test_peak_normalise_follows_the_original_rule():
    y = np.array([0.1, -0.5, 0.25], dtype=np.float32)
    np.testing.assert_allclose(peak_normalise(y), y / 0.5 * 0.999, rtol=1e-6)
    quiet = np.array([0.0002, -0.0005], dtype=np.float32)
    np.testing.assert_allclose(peak_normalise(quiet), quiet / 0.001 * 0.999, rtol=1e-6)
    assert peak_normalise(y).dtype == np.float32


def test_audio_info_reads_header(tmp_path):
    path = tmp_path / "info.flac"
    sf.write(path, np.zeros((22050 * 3, 2), dtype=np.float32) + 0.1, 22050, format="FLAC")
    duration, sr, channels = audio_info(path)
    assert (sr, channels) == (22050, 2)
    assert duration == pytest.approx(3.0, abs=1e-6)


def test_audio_info_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="gone.wav.*not found"):
        audio_info(tmp_path / "gone.wav")
    bad = tmp_path / "bad.ogg"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(AudioError, match="bad.ogg.*cannot read"):
        audio_info(bad)


def test_try_and_iter_load_report_bad_files_and_keep_order(tmp_path):
    paths: list[Path] = []
    for i, amp in enumerate([0.5, 0.0, 0.3, 0.4]):
        p = tmp_path / f"f{i}.wav"
        sf.write(p, _tone(200 + 100 * i, 1.2, 16000, amp), 16000, subtype="FLOAT")
        paths.append(p)
    paths.insert(2, tmp_path / "missing.wav")
    y, err = try_load_audio(paths[1])
    assert y is None and "silent" in err
    y, err = try_load_audio(paths[0], normalise=True)
    assert err is None and np.abs(y).max() == pytest.approx(0.999, abs=1e-6)
    for workers in (1, 3):
        results = list(iter_load_audio(paths, num_workers=workers, read_ahead=2))
        assert [r[0] for r in results] == list(range(len(paths)))
        ok = [r[1] is not None for r in results]
        assert ok == [True, False, False, True, True]
        assert "missing.wav" in results[2][2]
        assert abs(_dominant_hz(results[4][1], 16000) - 500) < 2


@pytest.mark.parametrize("orig_sr", [44100, 22050, 48000, 8000])
@pytest.mark.parametrize("n", [1, 999, 30011])
def test_resample_equals_torchaudio_default(orig_sr, n, rng):
    import torch
    import torchaudio.functional as taf

    from chlib.signal.audio import resample

    y = (rng.standard_normal(n) * 0.3).astype(np.float32)
    ours = resample(y, orig_sr, 16000)
    ref = taf.resample(torch.from_numpy(y), orig_sr, 16000).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6)
