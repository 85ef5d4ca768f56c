"""chlib.signal.tempo: length, pitch preservation, identity, backends and their errors."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf
from helpers import sine as _tone

import chlib.signal.tempo as tempo
from chlib.core.errors import AudioError, ConfigError
from chlib.signal.tempo import available_backends, resolve_backend, time_stretch

SR = 16000


def _dominant_hz(y: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * SR / len(y))


def _semitones(a: float, b: float) -> float:
    return abs(12 * np.log2(a / b))


def test_librosa_is_always_available():
    assert "librosa" in available_backends()
    assert resolve_backend("auto") == available_backends()[0]


@pytest.mark.parametrize("factor", [0.8, 0.9, 1.1, 1.2])
def test_length_is_input_length_over_factor(factor):
    y = _tone(440)
    out = time_stretch(y, factor, sample_rate=SR, backend="librosa")
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - len(y) / factor) <= 0.01 * len(y)


@pytest.mark.parametrize("factor", [0.8, 1.2])
@pytest.mark.parametrize("freq", [220.0, 987.8])
def test_pitch_is_preserved(factor, freq):
    y = _tone(freq)
    out = time_stretch(y, factor, sample_rate=SR, backend="librosa")
    assert _semitones(_dominant_hz(out), freq) < 0.5  # within one CQT bin (12 per octave)


def test_pitch_preservation_test_would_catch_a_plain_speed_change():
    """Resampling (sox `speed`) moves a 440 Hz tone by 3+ semitones at factor 1.2."""
    y = _tone(440)
    sped_up = np.interp(np.arange(0, len(y), 1.2), np.arange(len(y)), y).astype(np.float32)
    assert _semitones(_dominant_hz(sped_up), 440) > 3


@pytest.mark.parametrize("factor", [1.0, 0.995, 1.01])
def test_factors_near_one_return_the_input_unchanged(factor):
    y = _tone(440)
    out = time_stretch(y, factor, sample_rate=SR, backend="auto")
    assert out is y


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="'rubberband' is unknown"):
        time_stretch(_tone(440), 1.1, sample_rate=SR, backend="rubberband")


def test_missing_backends_are_config_errors_that_say_how_to_install(monkeypatch):
    monkeypatch.setattr(tempo.shutil, "which", lambda name: None)
    real = tempo._installed
    monkeypatch.setattr(tempo, "_installed", lambda name: name != "pedalboard" and real(name))
    with pytest.raises(ConfigError, match="'sox' was asked for but is not available.*apt-get"):
        time_stretch(_tone(440), 1.1, sample_rate=SR, backend="sox")
    with pytest.raises(ConfigError, match="pip install pedalboard"):
        time_stretch(_tone(440), 1.1, sample_rate=SR, backend="pedalboard")
    assert resolve_backend("auto") == "librosa"


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), 10.0])
def test_bad_factors_are_rejected(factor):
    with pytest.raises(ConfigError, match="factor"):
        time_stretch(_tone(440), factor, sample_rate=SR, backend="librosa")


def test_stereo_input_is_rejected():
    with pytest.raises(AudioError, match="mono"):
        time_stretch(np.zeros((SR, 2), dtype=np.float32), 1.2, sample_rate=SR, backend="librosa")


def test_sox_backend_runs_sox_without_a_shell(monkeypatch):
    """The sox path: argument list (no shell), temp files, output read back."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        data, sr = sf.read(cmd[2], dtype="float32")
        factor = float(cmd[-1])
        short = np.interp(np.arange(0, len(data), factor), np.arange(len(data)), data)
        sf.write(cmd[-3], short.astype(np.float32), sr, subtype="FLOAT")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    real = tempo._installed
    monkeypatch.setattr(tempo, "_installed", lambda name: name == "sox" or real(name))
    monkeypatch.setattr(tempo.subprocess, "run", fake_run)
    out = time_stretch(_tone(440), 1.25, sample_rate=SR, backend="sox")
    (cmd, kwargs), = calls
    assert isinstance(cmd, list) and cmd[0] == "sox" and cmd[-2:] == ["tempo", "1.25"]
    assert not kwargs.get("shell", False)
    assert abs(len(out) - 2 * SR / 1.25) <= 2


def test_sox_failure_is_an_audio_error(monkeypatch):
    real = tempo._installed
    monkeypatch.setattr(tempo, "_installed", lambda name: name == "sox" or real(name))
    monkeypatch.setattr(tempo.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", "sox FAIL boom"))
    with pytest.raises(AudioError, match="sox tempo 1.2 failed.*boom"):
        time_stretch(_tone(440), 1.2, sample_rate=SR, backend="sox")


@pytest.mark.skipif("sox" not in available_backends(), reason="sox is not on PATH")
def test_real_sox_length_and_pitch():
    out = time_stretch(_tone(440), 0.8, sample_rate=SR, backend="sox")
    assert abs(len(out) - 2 * SR / 0.8) <= 0.01 * 2 * SR
    assert _semitones(_dominant_hz(out), 440) < 0.5


@pytest.mark.skipif("pedalboard" not in available_backends(), reason="pedalboard not installed")
def test_real_pedalboard_length_and_pitch():
    out = time_stretch(_tone(440), 1.2, sample_rate=SR, backend="pedalboard")
    assert abs(len(out) - 2 * SR / 1.2) <= 0.02 * 2 * SR
    assert _semitones(_dominant_hz(out), 440) < 0.5
