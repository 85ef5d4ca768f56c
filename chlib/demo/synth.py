"""A small NumPy additive (wavetable) synthesiser: instruments, room and noise."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy.fft import next_fast_len
from scipy.signal import fftconvolve

from chlib.core.errors import ChlibError, ConfigError
from chlib.demo.perform import DemoPerformanceParams, Events, performance_events
from chlib.demo.tunes import Tune

_N_HARM = 40  # harmonics in a wavetable, fewer where they would pass 0.92 x Nyquist
_TABLE_SIZE = 4096


class _Timbre(NamedTuple):
    attack_s: float
    decay_s: float  # time constant of an exponentially decaying body (0 = sustained)
    release_s: float
    ring_s: float  # how long a struck/plucked note rings past its written end (else 0)
    vibrato_cents: float
    vibrato_hz: float
    brightness_decay_s: float  # bright -> dull spectrum time constant (0 = static)
    detune_cents: float  # a second, detuned voice (accordion reeds); 0 = none
    articulation: float  # held fraction of the written duration


_TIMBRES = {
    "fiddle": _Timbre(0.05, 0.0, 0.06, 0.0, 18.0, 5.6, 0.0, 0.0, 0.97),
    "flute": _Timbre(0.04, 0.0, 0.05, 0.0, 10.0, 5.0, 0.0, 0.0, 0.9),
    "piano": _Timbre(0.004, 0.7, 0.12, 0.05, 0.0, 0.0, 0.25, 0.0, 1.0),
    "accordion": _Timbre(0.02, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0, 7.0, 0.95),
    "plucked": _Timbre(0.002, 0.35, 0.08, 0.3, 0.0, 0.0, 0.12, 0.0, 1.0),
    "drone": _Timbre(0.6, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 4.0, 1.0),
}


def _profile(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic amplitudes [_N_HARM] of a timbre at the attack (bright) and later (dull)."""
    h = np.arange(1, _N_HARM + 1, dtype=float)
    body = 1.0 + 0.6 * np.exp(-0.5 * ((h - 4) / 1.5) ** 2) + 0.4 * np.exp(-0.5 * ((h - 9) / 2) ** 2)
    reeds = np.where(h <= 12, 1.0 / h ** 0.6, 1.0 / h ** 1.4)
    pluck = np.abs(np.sin(np.pi * h * 0.18)) + 0.05
    bright, dull = {  # (bright, dull or None: the same)
        "fiddle": (body / h ** 0.95, None),  # body resonances near harmonics 4 and 9
        "flute": (np.where(h == 1, 1.0, np.where(h == 2, 0.4, 0.35 / h ** 1.6)), None),
        "piano": (1.0 / h ** 1.2, 1.0 / h ** 2.6),
        "accordion": (reeds * (1.0 + 0.3 * (h % 2)), None),
        "plucked": (pluck / h ** 0.9, pluck / h ** 2.4),
        "drone": (np.where(h % 2 == 1, 1.0 / h, 0.35 / h), None),
    }[kind]
    return bright, bright if dull is None else dull


@lru_cache(maxsize=1024)
def _wavetable(kind: str, which: str, n_harm: int) -> np.ndarray:
    """One period of a band-limited waveform [_TABLE_SIZE + 1] (last = first, for
    interpolation), scaled by the bright table's harmonic sum."""
    bright, dull = _profile(kind)
    amps = (bright if which == "bright" else dull)[:n_harm]
    h = np.arange(1, n_harm + 1)
    phases = np.pi * h * (h - 1) / n_harm  # fixed Schroeder-like phases: a non-peaky waveform
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)  # a sum of sines via one FFT
    spectrum[h] = 0.5 * _TABLE_SIZE * amps * np.exp(1j * (phases - 0.5 * np.pi))
    table = np.fft.irfft(spectrum, _TABLE_SIZE) / max(float(np.sum(bright[:n_harm])), 1e-9)
    return np.append(table, table[0])


def _lookup(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Linearly interpolated wavetable read at ``phase`` (cycles)."""
    pos = (phase - np.floor(phase)) * _TABLE_SIZE
    i0 = pos.astype(np.int64)
    return table[i0] + (pos - i0) * (table[i0 + 1] - table[i0])


def _render_voice(out: np.ndarray, ev: Events, kind: str, sample_rate: int,
                  rng: np.random.Generator) -> None:
    """Add the notes of one voice into ``out`` [samples] in place."""
    tb = _TIMBRES[kind]
    vib_phases = rng.uniform(0.0, 2.0 * np.pi, len(ev.onset))
    osc_phases = rng.random(len(ev.onset))
    for k, (onset, dur, midi, amp) in enumerate(zip(*ev, strict=True)):
        f0 = 440.0 * 2.0 ** ((float(midi) - 69.0) / 12.0)
        held = float(dur) * tb.articulation + tb.ring_s
        start = int(round(float(onset) * sample_rate))
        if (length := min(int((held + tb.release_s) * sample_rate), len(out) - start)) <= 2:
            continue
        t = np.arange(length) / sample_rate
        env = np.minimum(1.0, t / tb.attack_s)  # linear attack, held or decaying, then release
        if tb.decay_s > 0:
            env *= np.exp(-t / (tb.decay_s * (1.0 + 60.0 / max(f0, 50.0))))
        env[t > held] *= np.exp(-(t[t > held] - held) / (tb.release_s / 4.0))
        f_top = f0 * (1.0 + tb.vibrato_cents / 1200.0) * (1.0 + tb.detune_cents / 1200.0)
        n_harm = int(max(1, min(_N_HARM, (0.46 * sample_rate) // f_top)))
        if tb.vibrato_cents > 0:  # delayed vibrato for bowed and blown timbres
            depth = tb.vibrato_cents / 1200.0 * np.log(2.0) * np.minimum(1.0, t / 0.25)
            inst_f = f0 * (1.0 + depth * np.sin(2 * np.pi * tb.vibrato_hz * t + vib_phases[k]))
            phase = np.cumsum(inst_f) / sample_rate + osc_phases[k]  # cycles
        else:
            phase = f0 * t + osc_phases[k]
        bright = _wavetable(kind, "bright", n_harm)
        y = _lookup(bright, phase)
        if tb.brightness_decay_s > 0:
            dull = _lookup(_wavetable(kind, "dull", n_harm), phase)
            y = dull + (y - dull) * np.exp(-t / tb.brightness_decay_s)
        if tb.detune_cents > 0:
            y = 0.5 * (y + _lookup(bright, phase * 2.0 ** (tb.detune_cents / 1200.0)))
        if kind == "flute":  # a little breath noise, following the envelope
            y = y + 0.03 * rng.standard_normal(length)
        out[start:start + length] += float(amp) * env * y


def _room(y: np.ndarray, rt60: float, wet: float, sample_rate: int,
          rng: np.random.Generator) -> np.ndarray:
    """Mix ``y`` with its convolution by a decaying-noise impulse response (``rt60`` s to
    -60 dB, 8 ms pre-delay, slightly darkened)."""
    if wet <= 0:
        return y
    n_ir = max(16, int(min(rt60 * 1.2, 2.0) * sample_rate))
    ir = rng.standard_normal(n_ir) * np.exp(-6.91 * np.arange(n_ir) / sample_rate / rt60)
    ir = np.convolve(ir, [0.25, 0.5, 0.25], mode="same")
    ir[: int(0.008 * sample_rate)] = 0.0
    ir /= np.sqrt(np.sum(ir ** 2)) + 1e-12
    return (1.0 - wet) * y + wet * fftconvolve(y, ir)[: len(y)]


def _noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white or pink (1/f power) noise [n]."""
    x = rng.standard_normal(n)
    if colour == "pink":
        n_fft = next_fast_len(n, real=True)
        spec = np.fft.rfft(x, n_fft)
        x = np.fft.irfft(spec / np.sqrt(np.maximum(np.arange(len(spec)), 1.0)), n_fft)[:n]
    return x / (_rms(x) + 1e-12)


def _rms(y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(y ** 2)))


def render_performance(tune: Tune, params: DemoPerformanceParams,
                       sample_rate: int = 16000) -> np.ndarray:
    """Render one performance of ``tune`` (bit-identical for equal arguments): float32
    [round(params.duration_s * sample_rate)] in [-0.9, 0.9]; ``sample_rate``: Hz, 4000..192000."""
    params.validate()
    if not isinstance(sample_rate, (int, np.integer)) or not (4000 <= sample_rate <= 192000):
        raise ConfigError(f"sample_rate must be an integer in [4000, 192000] Hz, got {sample_rate}")
    sample_rate, rng = int(sample_rate), np.random.default_rng(params.seed)
    n = int(round(params.duration_s * sample_rate))
    melody, accomp = performance_events(tune, params, rng)
    voice = np.zeros(n)
    _render_voice(voice, melody, params.instrument, sample_rate, rng)
    if len(accomp.onset):
        acc = np.zeros(n)
        kind = "drone" if params.accompaniment == "drone" else params.accompaniment_instrument
        _render_voice(acc, accomp, kind, sample_rate, rng)
        gain = (_rms(voice) + 1e-12) / (_rms(acc) + 1e-12)
        voice += acc * gain * 10.0 ** (params.accompaniment_gain_db / 20.0)
    y = _room(voice, params.room_rt60_s, params.room_wet, sample_rate, rng)
    if not np.isfinite(rms := _rms(y)) or rms <= 0:
        raise ChlibError(f"render_performance: tune {tune.title!r} rendered silent or "
                         f"non-finite with {params}; report this with the parameters")
    y = y / rms + _noise(n, params.noise_colour, rng) * 10.0 ** (-params.snr_db / 20.0)
    y *= 10.0 ** (params.loudness_db / 20.0) / _rms(y)
    fade_in, fade_out = min(n, int(0.01 * sample_rate)), min(n, int(0.05 * sample_rate))
    y[:fade_in] *= np.linspace(0.0, 1.0, fade_in)
    y[n - fade_out:] *= np.linspace(1.0, 0.0, fade_out)
    return (y * min(1.0, 0.9 / max(float(np.max(np.abs(y))), 1e-12))).astype(np.float32)
