"""Pitch-preserving tempo change of a mono signal (the original's "speed" augmentation).
Backends: ``sox`` (the binary, WSOLA as the original), ``pedalboard`` (Rubber Band) and
``librosa`` (phase vocoder); ``auto`` picks the first available. They differ in artefacts, not
in pitch or length: augment a dataset with one backend throughout (``tempo_backend``)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from chlib.core.errors import AudioError, ConfigError

__all__ = ["BACKENDS", "IDENTITY_TOLERANCE", "available_backends", "resolve_backend", "time_stretch"]

#: Backends in the order ``auto`` tries them.
BACKENDS: tuple[str, ...] = ("sox", "pedalboard", "librosa")

#: Factors within this distance of 1.0 return the input unchanged (the original's rule).
IDENTITY_TOLERANCE: float = 0.01
_SOX_TIMEOUT_S: float = 600.0  # seconds one sox call may take (hours of audio take seconds)


def _installed(backend: str) -> bool:
    found = shutil.which("sox") if backend == "sox" else importlib.util.find_spec(backend)
    return found is not None


def available_backends() -> list[str]:
    """The backends usable on this machine, in ``auto``'s order of preference."""
    return [b for b in BACKENDS if _installed(b)]


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend for ``backend`` (``auto``: the first available); ConfigError if
    unknown or not installed."""
    if (name := str(backend).lower()) != "auto" and name not in BACKENDS:
        raise ConfigError(f"tempo backend {backend!r} is unknown: use 'auto', "
                          + ", ".join(repr(b) for b in BACKENDS))
    have = available_backends()
    if name == "auto":
        if not have:
            raise ConfigError("no tempo backend is installed: `pip install librosa` (or install "
                              "sox / `pip install pedalboard`)")
        return have[0]
    if name not in have:
        how = (f"`pip install {name}`" if name != "sox" else "install the sox program (`apt-get "
               "install sox`, `brew install sox`, `conda install -c conda-forge sox`)")
        raise ConfigError(f"tempo backend {name!r} was asked for but is not available on this "
                          f"machine: {how}, or use backend='auto' (available here: "
                          f"{', '.join(have) or 'none'})")
    return name


def _stretch_sox(y: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="chlib-sox-") as tmp:
        src, dst = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        sf.write(str(src), y, sample_rate, subtype="FLOAT")
        cmd = ["sox", "-q", str(src), "-t", "wav", "-e", "floating-point", "-b", "32",
               str(dst), "tempo", f"{factor:.6g}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_SOX_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise AudioError(f"sox tempo {factor}: no result after {_SOX_TIMEOUT_S:.0f} s; "
                             "try backend='librosa'") from e
        if proc.returncode != 0 or not dst.exists():
            raise AudioError(f"sox tempo {factor} failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[:300]}; try backend='librosa'")
        out, _ = sf.read(str(dst), dtype="float32", always_2d=True)
    return out[:, 0]


def _stretch_pedalboard(y: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    import pedalboard

    out = pedalboard.time_stretch(y[None, :], float(sample_rate), stretch_factor=float(factor))
    return np.asarray(out, dtype=np.float32).reshape(-1)


def _stretch_librosa(y: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    import librosa

    return librosa.effects.time_stretch(y, rate=float(factor)).astype(np.float32, copy=False)


_IMPL = {"sox": _stretch_sox, "pedalboard": _stretch_pedalboard, "librosa": _stretch_librosa}


def time_stretch(y: np.ndarray, factor: float, *, sample_rate: int,
                 backend: str = "auto") -> np.ndarray:
    """Change the tempo of mono ``y [n_samples]`` by ``factor``, keeping the pitch.
    ``factor`` > 1 is faster (about ``n_samples / factor`` float32 samples back);
    ``|factor - 1| <= 0.01`` returns ``y`` itself. :class:`ConfigError` for a bad factor or
    backend, :class:`AudioError` when the backend fails on this signal."""
    if not np.isfinite(factor := float(factor)) or factor <= 0:
        raise ConfigError(f"tempo factor must be a positive number, got {factor}")
    if not 0.25 <= factor <= 4.0:
        raise ConfigError(f"tempo factor {factor} is outside 0.25..4; the original uses 0.8..1.2")
    name = resolve_backend(backend)
    if abs(factor - 1.0) <= IDENTITY_TOLERANCE + 1e-9:  # 1.01 counts as within 0.01
        return y
    if (y := np.asarray(y, dtype=np.float32)).ndim != 1:
        raise AudioError(f"time_stretch expects a mono signal [samples], got shape {y.shape}")
    if y.shape[0] < 4096:
        raise AudioError(f"time_stretch: {y.shape[0]} samples is too short to stretch "
                         "(at least 4096 needed)")
    return _IMPL[name](np.ascontiguousarray(y), factor, int(sample_rate))
