"""Audio in: decode, mix to mono, resample, validate, peak-normalise.
Every recording enters through :func:`load_audio`: a float32 mono signal at the feature sample
rate, or an :class:`~chlib.core.errors.AudioError` naming the file, what is wrong and what to
do. Decoding: ``soundfile`` (WAV, FLAC, OGG, Opus, MP3), else ``torchaudio``."""

from __future__ import annotations

import functools
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from chlib.core.errors import AudioError
from chlib.signal.cqt import group_runs, nonzero_runs

__all__ = ["MIN_SECONDS", "SILENCE_PEAK", "load_audio", "try_load_audio", "iter_load_audio",
           "decode_audio", "to_mono", "resample", "peak_normalise", "audio_info"]

#: Shortest accepted recording, in seconds: one lowest-bin CQT kernel of the default features.
MIN_SECONDS: float = 16384 / 16000

#: Mono peak (full scale 1.0) below which a recording is silent: -80 dBFS, under 16-bit dither.
SILENCE_PEAK: float = 1e-4


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioError(f"{path}: file not found; check the path (relative paths are "
                         f"resolved from {os.getcwd()})")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file; point to the file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes); the copy or download was "
                         "interrupted: copy or re-encode it again")


def _first_that_reads(path: Path, soundfile_fn, torchaudio_fn, what: str, advice: str):
    """``soundfile_fn()``, else the optional ``torchaudio_fn()``; AudioError if neither works."""
    _check_file(path)
    try:
        return soundfile_fn()
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e_sf:
        first = f"soundfile: {e_sf}"
    try:
        return torchaudio_fn()  # imports torchaudio late: ~1 s, rarely needed
    except Exception as e_ta:  # any failure of the optional fallback is reported
        second = f"torchaudio: {type(e_ta).__name__}: {e_ta}".splitlines()[0][:200]
    raise AudioError(f"{path}: {what} ({first}; {second}). The file is corrupt, not audio, or in "
                     f"a format libsndfile cannot read (wav, flac, ogg, opus, mp3): {advice}")


def _torchaudio():
    import torchaudio

    return torchaudio


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file as stored: ``(samples [n_samples, channels] float32, sample rate in Hz)``."""
    path = Path(path)

    def with_soundfile() -> tuple[np.ndarray, int]:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return data, int(sr)

    def with_torchaudio() -> tuple[np.ndarray, int]:
        wav, sr = _torchaudio().load(str(path))
        return wav.to(torch.float32).numpy().T.copy(), int(sr)

    return _first_that_reads(path, with_soundfile, with_torchaudio, "cannot decode the audio",
                             "re-encode it, e.g. `ffmpeg -i in.m4a out.flac`")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Mean over channels: ``[n_samples, channels]`` (or ``[n_samples]``) -> ``[n_samples]`` float32."""
    if samples.ndim == 1:
        return np.asarray(samples, dtype=np.float32)
    if (n_channels := samples.shape[1]) == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    # channel by channel: several times faster than samples.mean(axis=1) on interleaved data
    out = np.array(samples[:, 0], dtype=np.float32)
    for c in range(1, n_channels):
        out += samples[:, c]
    out *= np.float32(1.0 / n_channels)
    return out


@functools.lru_cache(maxsize=16)
def _resample_plan(orig_sr: int, new_sr: int) -> tuple[int, int, int, int, list] | None:
    """torchaudio's own resampling kernel, split into groups of phases without the zero taps.
    Only ~``12 * orig / new`` of each phase's taps are non-zero (44.1 -> 16 kHz: ~34 of 475), so
    each group of phases multiplies only its tap range: same sums, ~8x fewer multiplications.
    None when torchaudio's private kernel builder is unavailable."""
    try:
        from torchaudio.functional.functional import _get_sinc_resample_kernel

        gcd = math.gcd(orig_sr, new_sr)
        kernel, width = _get_sinc_resample_kernel(orig_sr, new_sr, gcd, 6, 0.99, "sinc_interp_hann",
                                                  None, torch.device("cpu"), torch.float32)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None
    orig, new = orig_sr // gcd, new_sr // gcd
    taps = kernel[:, 0, :].to(torch.float32)
    if taps.shape[0] != new:
        return None
    runs = nonzero_runs((taps.abs() > taps.abs().max() * 1e-12).numpy())
    groups = [(start, end, lo, hi, taps[start:end, lo:hi].t().contiguous())
              for start, end, lo, hi in group_runs(runs, call_cost=700.0)]
    return orig, new, int(width), int(taps.shape[1]), groups


def _resample_grouped(y: torch.Tensor, plan: tuple, rows_per_chunk: int = 16384) -> torch.Tensor:
    orig, new, width, n_taps, groups = plan
    length = y.shape[-1]
    x = F.pad(y, (width, width + orig))
    n_blocks = (x.shape[-1] - n_taps) // orig + 1
    out = torch.empty(n_blocks, new, dtype=torch.float32)
    for r0 in range(0, n_blocks, rows_per_chunk):
        r1 = min(n_blocks, r0 + rows_per_chunk)
        seg = x[r0 * orig:(r1 - 1) * orig + n_taps]
        for start, end, lo, hi, w in groups:
            out[r0:r1, start:end] = seg[lo:].unfold(0, hi - lo, orig)[: r1 - r0] @ w
    # the same output length rule as torchaudio (computed the same way)
    return out.reshape(-1)[: int(torch.ceil(torch.as_tensor(new * length / orig)).long())]


def resample(y: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample mono float32 ``[n_samples]`` from ``orig_sr`` to ``new_sr`` Hz on the CPU:
    ``torchaudio.functional.resample``'s defaults (agreement ~1e-7), several times faster."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    if orig_sr == new_sr:
        return y
    if y.ndim != 1:
        raise ValueError(f"resample expects a mono signal [samples], got shape {y.shape}")
    plan = _resample_plan(int(orig_sr), int(new_sr))
    with torch.no_grad():
        if plan is None:
            import torchaudio.functional as taf

            return taf.resample(torch.from_numpy(y), int(orig_sr), int(new_sr)).numpy()
        return _resample_grouped(torch.from_numpy(y), plan).numpy()


def load_audio(path: str | os.PathLike, *, sample_rate: int = 16000,
               min_seconds: float = MIN_SECONDS, silence_peak: float = SILENCE_PEAK) -> np.ndarray:
    """Decode ``path`` to a finite float32 mono signal ``[n_samples]`` at ``sample_rate`` Hz.
    Channels are averaged; not peak-normalised. :class:`AudioError` when the file is missing,
    empty, undecodable, not finite, silent (peak < ``silence_peak``) or under ``min_seconds``."""
    path = Path(path)
    return _check_and_convert(path, *decode_audio(path), sample_rate=sample_rate,
                              min_seconds=min_seconds, silence_peak=silence_peak)


def _check_and_convert(path: Path, data: np.ndarray, sr: int, *, sample_rate: int,
                       min_seconds: float, silence_peak: float = SILENCE_PEAK) -> np.ndarray:
    """Checks of :func:`load_audio` on decoded ``data [n, channels]``, then mono + resample."""
    if data.shape[0] == 0:
        raise AudioError(f"{path}: decodes to 0 samples; the file holds no audio: "
                         "re-export it or remove it from the list")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: {int((~np.isfinite(data)).sum())} samples are NaN or infinite; "
                         "the file is damaged (often a float WAV written by a crashed program): "
                         "re-export it")
    y = to_mono(data)
    if (peak := float(np.max(np.abs(y)))) < silence_peak:
        db = 20 * np.log10(max(peak, 1e-12))
        raise AudioError(
            f"{path}: silent: peak amplitude {peak:.2e} ({db:.0f} dBFS) is below "
            f"{silence_peak:.0e} ({20 * np.log10(silence_peak):.0f} dBFS)"
            + ("; the channels may cancel out when mixed to mono (phase-inverted stereo)"
               if data.shape[1] > 1 else "") + ": check the file, or remove it from the list")
    if (duration := y.shape[0] / sr) < min_seconds:
        raise AudioError(f"{path}: too short: {duration:.3f} s, the minimum is "
                         f"{min_seconds:.3f} s (one lowest-frequency CQT kernel); use a longer "
                         "recording or remove it from the list")
    return resample(y, sr, sample_rate)


def _try_decode(path: Path) -> tuple[np.ndarray, int] | str:
    """``decode_audio(path)``, or the reason it failed."""
    try:
        return decode_audio(path)
    except AudioError as e:
        return str(e)


def _try_convert(path: Path, decoded: tuple[np.ndarray, int] | str, *, sample_rate: int,
                 min_seconds: float, normalise: bool) -> tuple[np.ndarray | None, str | None]:
    """``(signal, None)`` from a decoded file, or ``(None, reason)``."""
    if isinstance(decoded, str):
        return None, decoded
    try:
        y = _check_and_convert(path, *decoded, sample_rate=sample_rate, min_seconds=min_seconds)
    except AudioError as e:
        return None, str(e)
    return (peak_normalise(y) if normalise else y), None


def try_load_audio(path: str | os.PathLike, *, sample_rate: int = 16000,
                   min_seconds: float = MIN_SECONDS,
                   normalise: bool = False) -> tuple[np.ndarray | None, str | None]:
    """:func:`load_audio` that reports instead of raising: ``(signal, None)`` or ``(None, reason)``.
    Only :class:`AudioError` becomes a reason; ``normalise`` applies :func:`peak_normalise`."""
    path = Path(path)
    return _try_convert(path, _try_decode(path), sample_rate=sample_rate,
                        min_seconds=min_seconds, normalise=normalise)


def iter_load_audio(paths: Iterable[str | os.PathLike], *, sample_rate: int = 16000,
                    min_seconds: float = MIN_SECONDS, normalise: bool = False,
                    num_workers: int = 2, read_ahead: int | None = None,
                    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode many files in a thread pool; yield ``(index, signal or None, reason or None)``.
    In input order, at most ``read_ahead`` (default ``2 * num_workers``) decoded files waiting;
    ``num_workers <= 1``: all in this thread. Only decoding (libsndfile, outside the GIL) runs in
    the threads; checks and resampling run here, so torch's OpenMP team is never started from
    several threads at once (which slows every stage several-fold on 2 cores)."""
    kw = dict(sample_rate=sample_rate, min_seconds=min_seconds, normalise=normalise)
    if num_workers <= 1:
        for i, p in enumerate(paths):
            yield i, *try_load_audio(p, **kw)
        return
    ahead = max(1, read_ahead or 2 * num_workers)
    pending: deque[tuple[int, Path, Future]] = deque()
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="chlib-audio") as pool:
        for i, p in enumerate(paths):
            pending.append((i, Path(p), pool.submit(_try_decode, Path(p))))
            if len(pending) >= ahead:
                j, path, job = pending.popleft()
                yield j, *_try_convert(path, job.result(), **kw)
        while pending:
            j, path, job = pending.popleft()
            yield j, *_try_convert(path, job.result(), **kw)


def peak_normalise(y: np.ndarray) -> np.ndarray:
    """``y / max(0.001, max|y|) * 0.999`` (the original's rule), float32 ``[n_samples]``."""
    y = np.asarray(y, dtype=np.float32)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return (y / np.float32(max(0.001, peak)) * np.float32(0.999)).astype(np.float32, copy=False)


def audio_info(path: str | os.PathLike) -> tuple[float, int, int]:
    """``(duration in seconds, sample rate in Hz, channels)`` from the header, without decoding."""
    path = Path(path)

    def with_soundfile() -> tuple[float, int, int]:
        info = sf.info(str(path))
        return float(info.frames) / float(info.samplerate), int(info.samplerate), int(info.channels)

    def with_torchaudio() -> tuple[float, int, int]:
        meta = _torchaudio().info(str(path))
        return (float(meta.num_frames) / float(meta.sample_rate), int(meta.sample_rate),
                int(meta.num_channels))

    return _first_that_reads(path, with_soundfile, with_torchaudio,
                             "cannot read the audio header", "re-encode it to flac, wav, ogg or mp3")
