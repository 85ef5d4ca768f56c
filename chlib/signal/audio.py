"""Audio in: decode, mix to mono, resample, validate, peak-normalise.
Every recording enters through :func:`load_audio`: a float32 mono signal at the feature sample
rate, or an :class:`~chlib.core.errors.AudioError` naming the file, what is wrong and what to
do. Decoding: ``soundfile`` (WAV, FLAC, OGG, Opus, MP3), else ``torchaudio``. Files are read,
checked, mixed and resampled ``DECODE_BLOCK`` frames at a time into one float32 output, so a
long recording never exists as a full-length multichannel or float64 copy."""

from __future__ import annotations

import contextlib
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

#: Frames decoded, checked, mixed and resampled at a time (6 s at 44.1 kHz).
DECODE_BLOCK: int = 1 << 18
#: Files above this many samples (all channels) are not decoded whole in the threads of
#: :func:`iter_load_audio` but streamed, block by block, in the caller's thread.
_THREAD_DECODE_SAMPLES: int = 1 << 24


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioError(f"{path}: file not found; check the path (relative paths are "
                         f"resolved from {os.getcwd()})")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file; point to the file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes); the copy or download was "
                         "interrupted: copy or re-encode it again")


_SOUNDFILE_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError, ValueError)


def _first_that_reads(path: Path, soundfile_fn, torchaudio_fn, what: str, advice: str):
    """``soundfile_fn()``, else the optional ``torchaudio_fn()``; AudioError if neither works."""
    _check_file(path)
    try:
        return soundfile_fn()
    except _SOUNDFILE_ERRORS as e_sf:
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


_DECODE_ADVICE = "re-encode it, e.g. `ffmpeg -i in.m4a out.flac`"


def _torchaudio_decode(path: Path) -> tuple[np.ndarray, int]:
    wav, sr = _torchaudio().load(str(path))
    return wav.to(torch.float32).numpy().T, int(sr)  # [n, channels], a view of one copy


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file as stored: ``(samples [n_samples, channels] float32, sample rate in Hz)``.
    The whole file at once: :func:`load_audio` streams instead."""
    path = Path(path)

    def with_soundfile() -> tuple[np.ndarray, int]:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return data, int(sr)

    return _first_that_reads(path, with_soundfile, lambda: _torchaudio_decode(path),
                             "cannot decode the audio", _DECODE_ADVICE)


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


def _resample_rows(x: torch.Tensor, plan: tuple, rows_per_chunk: int = 16384) -> torch.Tensor:
    """Output rows (``new`` samples each) of the padded input ``x``: row r reads
    ``x[r * orig : r * orig + n_taps]``; as many rows as ``x`` holds."""
    orig, new, _, n_taps, groups = plan
    n_rows = max(0, (x.shape[-1] - n_taps) // orig + 1)
    out = torch.empty(n_rows, new, dtype=torch.float32)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        seg = x[r0 * orig:(r1 - 1) * orig + n_taps]
        for start, end, lo, hi, w in groups:
            out[r0:r1, start:end] = seg[lo:].unfold(0, hi - lo, orig)[: r1 - r0] @ w
    return out.reshape(-1)


def _n_resampled(length: int, orig: int, new: int) -> int:
    """torchaudio's output length rule (computed the same way)."""
    return int(torch.ceil(torch.as_tensor(new * length / orig)).long())


def _resample_grouped(y: torch.Tensor, plan: tuple) -> torch.Tensor:
    orig, new, width = plan[:3]
    out = _resample_rows(F.pad(y, (width, width + orig)), plan)
    return out[: _n_resampled(y.shape[-1], orig, new)]


class _Resampler:
    """:func:`resample` of a stream: ``push(block)`` returns the output the input so far
    determines, ``finish()`` the rest; joined, they equal ``resample`` of the joined input
    (each output row is the same sum over the same input samples). Holds one block."""

    def __init__(self, orig_sr: int, new_sr: int) -> None:
        self.rates = (int(orig_sr), int(new_sr))
        self.plan = None if orig_sr == new_sr else _resample_plan(*self.rates)
        self.held: list[np.ndarray] = []  # different rates without a plan: all, until finish
        self.n_in = 0
        self.n_out = 0
        self.x = np.zeros(self.plan[2] if self.plan else 0, dtype=np.float32)  # from next row on

    def _rows(self, y: np.ndarray) -> np.ndarray:
        x = np.concatenate([self.x, y])
        out = _resample_rows(torch.from_numpy(x), self.plan).numpy()
        self.x = x[len(out) // self.plan[1] * self.plan[0]:]
        self.n_out += len(out)
        return out

    def push(self, y: np.ndarray) -> np.ndarray:
        self.n_in += len(y)
        if self.plan is None and self.rates[0] != self.rates[1]:
            self.held.append(y.copy())
            return y[:0]
        return self._rows(y) if self.plan else y

    def finish(self) -> np.ndarray:
        if not self.plan:
            return resample(np.concatenate([np.zeros(0, np.float32), *self.held]), *self.rates)
        orig, new, width = self.plan[:3]
        out = self._rows(np.zeros(width + orig, dtype=np.float32))
        return out[: max(0, len(out) - (self.n_out - _n_resampled(self.n_in, orig, new)))]


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
    empty, undecodable, not finite, silent (peak < ``silence_peak``) or under ``min_seconds``.
    Streamed: besides the result, memory holds one block of ``DECODE_BLOCK`` frames (soundfile;
    the torchaudio fallback decodes the whole file first)."""
    path = Path(path)
    kw = dict(sample_rate=sample_rate, min_seconds=min_seconds, silence_peak=silence_peak)

    def with_soundfile() -> np.ndarray:
        with sf.SoundFile(str(path)) as f:
            blocks = f.blocks(DECODE_BLOCK, dtype="float32", always_2d=True)
            return _convert_blocks(path, blocks, int(f.samplerate), f.frames, **kw)

    return _first_that_reads(path, with_soundfile,
                             lambda: _convert(path, *_torchaudio_decode(path), **kw),
                             "cannot decode the audio", _DECODE_ADVICE)


def _convert(path: Path, data: np.ndarray, sr: int, **kw) -> np.ndarray:
    """:func:`_convert_blocks` on decoded ``data [n, channels]``."""
    blocks = (data[i:i + DECODE_BLOCK] for i in range(0, len(data), DECODE_BLOCK))
    return _convert_blocks(path, blocks, sr, len(data), **kw)


def _append(out: np.ndarray, filled: int, chunk: np.ndarray) -> tuple[np.ndarray, int]:
    """Write ``chunk`` at ``out[filled:]``, growing ``out`` in place when it is too short."""
    if filled + len(chunk) > len(out):
        out.resize(max(filled + len(chunk), len(out) * 5 // 4), refcheck=False)
    out[filled:filled + len(chunk)] = chunk
    return out, filled + len(chunk)


def _convert_blocks(path: Path, blocks: Iterable[np.ndarray], sr: int, expected: int, *,
                    sample_rate: int, min_seconds: float,
                    silence_peak: float = SILENCE_PEAK) -> np.ndarray:
    """Checks of :func:`load_audio` on decoded blocks ``[frames, channels]``, each mixed to mono
    and resampled into one float32 output (allocated for ``expected`` frames, grown if need be)."""
    resampler = _Resampler(sr, sample_rate)
    expected = expected if 0 <= expected <= 1 << 35 else 0  # libsndfile: huge = not known
    out = np.empty(_n_resampled(expected, sr, sample_rate), dtype=np.float32)
    filled = n = bad = channels = 0
    peak = 0.0
    for block in blocks:
        n, channels = n + block.shape[0], block.shape[1]
        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
        if bad or not len(block):
            continue  # a damaged file is only counted from here on
        y = to_mono(block)
        peak = max(peak, float(y.max()), -float(y.min()))
        out, filled = _append(out, filled, resampler.push(y))
    if n == 0:
        raise AudioError(f"{path}: decodes to 0 samples; the file holds no audio: "
                         "re-export it or remove it from the list")
    if bad:
        raise AudioError(f"{path}: {bad} samples are NaN or infinite; "
                         "the file is damaged (often a float WAV written by a crashed program): "
                         "re-export it")
    if peak < silence_peak:
        db = 20 * np.log10(max(peak, 1e-12))
        raise AudioError(
            f"{path}: silent: peak amplitude {peak:.2e} ({db:.0f} dBFS) is below "
            f"{silence_peak:.0e} ({20 * np.log10(silence_peak):.0f} dBFS)"
            + ("; the channels may cancel out when mixed to mono (phase-inverted stereo)"
               if channels > 1 else "") + ": check the file, or remove it from the list")
    if (duration := n / sr) < min_seconds:
        raise AudioError(f"{path}: too short: {duration:.3f} s, the minimum is "
                         f"{min_seconds:.3f} s (one lowest-frequency CQT kernel); use a longer "
                         "recording or remove it from the list")
    out, filled = _append(out, filled, resampler.finish())
    out.resize(filled, refcheck=False)
    return out


def _try_decode(path: Path) -> tuple[np.ndarray, int] | str | None:
    """``decode_audio(path)``, the reason it failed, or None for a long file (to stream)."""
    with contextlib.suppress(*_SOUNDFILE_ERRORS):
        if (info := sf.info(str(path))).frames * info.channels > _THREAD_DECODE_SAMPLES:
            return None
    try:
        return decode_audio(path)
    except AudioError as e:
        return str(e)


def _try_convert(path: Path, decoded: tuple[np.ndarray, int] | str | None, *, sample_rate: int,
                 min_seconds: float, normalise: bool) -> tuple[np.ndarray | None, str | None]:
    """``(signal, None)`` from a decoded file (None: stream it from ``path``), or
    ``(None, reason)``."""
    if isinstance(decoded, str):
        return None, decoded
    kw = dict(sample_rate=sample_rate, min_seconds=min_seconds)
    try:
        y = load_audio(path, **kw) if decoded is None else _convert(path, *decoded, **kw)
    except AudioError as e:
        return None, str(e)
    return (peak_normalise(y, out=y) if normalise else y), None


def try_load_audio(path: str | os.PathLike, *, sample_rate: int = 16000,
                   min_seconds: float = MIN_SECONDS,
                   normalise: bool = False) -> tuple[np.ndarray | None, str | None]:
    """:func:`load_audio` that reports instead of raising: ``(signal, None)`` or ``(None, reason)``.
    Only :class:`AudioError` becomes a reason; ``normalise`` applies :func:`peak_normalise`."""
    return _try_convert(Path(path), None, sample_rate=sample_rate, min_seconds=min_seconds,
                        normalise=normalise)


def iter_load_audio(paths: Iterable[str | os.PathLike], *, sample_rate: int = 16000,
                    min_seconds: float = MIN_SECONDS, normalise: bool = False,
                    num_workers: int = 2, read_ahead: int | None = None,
                    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode many files in a thread pool; yield ``(index, signal or None, reason or None)``.
    In input order, at most ``read_ahead`` (default ``2 * num_workers``) decoded files waiting;
    ``num_workers <= 1``: all in this thread. Only decoding (libsndfile, outside the GIL) runs in
    the threads (a file over ``_THREAD_DECODE_SAMPLES`` samples is streamed here instead);
    checks and resampling run here, so torch's OpenMP team is never started from
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


def peak_normalise(y: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``y / max(0.001, max|y|) * 0.999`` (the original's rule), float32 ``[n_samples]``;
    ``out=y`` (a float32 array) normalises in place, without a second full-length copy."""
    y = np.asarray(y, dtype=np.float32)
    peak = max(float(y.max()), -float(y.min())) if y.size else 0.0
    out = np.divide(y, np.float32(max(0.001, peak)), out=out)
    out *= np.float32(0.999)
    return out


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
