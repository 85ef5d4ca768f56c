"""Audio in: decode, mix to mono, resample, validate, peak-normalise.

Every recording enters chlib through :func:`load_audio`, which returns a float32 mono signal at
the feature sample rate (16 kHz by default) or raises :class:`~chlib.core.errors.AudioError` saying
which file is wrong, what is wrong with it and what to do.

Decoding goes through ``soundfile`` (libsndfile >= 1.1 reads WAV, FLAC, OGG/Vorbis, Opus and MP3
without FFmpeg). If soundfile cannot read a format and ``torchaudio.load`` can (it needs
torchcodec and FFmpeg's shared libraries), that is tried next. Resampling reproduces
``torchaudio.functional.resample`` with its default windowed-sinc filter (as CoverHunterMPS does
on its GPU path), on the CPU in float32, skipping the kernel's zero taps (:func:`resample`).

Checks, in order: the file exists, is not empty, decodes, holds at least one sample, has only
finite samples, is not silent (peak of the mono mix below ``SILENCE_PEAK`` = 1e-4, i.e. -80
dBFS) and lasts at least ``min_seconds`` after decoding (default :data:`MIN_SECONDS`).

Worker-friendly helpers: :func:`try_load_audio` returns ``(signal, None)`` or ``(None, reason)``
instead of raising (for batch jobs that skip and report bad files), and
:func:`iter_load_audio` decodes a list of files with a small thread pool, yielding results in
input order with bounded read-ahead. Threads suffice for decoding (libsndfile runs outside the
GIL through cffi) and avoid the start-up cost and pickling rules of worker processes in
notebooks.
"""

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

__all__ = [
    "MIN_SECONDS",
    "SILENCE_PEAK",
    "load_audio",
    "try_load_audio",
    "iter_load_audio",
    "decode_audio",
    "to_mono",
    "resample",
    "peak_normalise",
    "audio_info",
]

#: Shortest accepted recording, in seconds (after decoding). 16384 samples at 16 kHz: the length
#: of one lowest-bin CQT kernel with the default features (fmin 32 Hz, 12 bins per octave: the
#: kernel spans Q * sr / fmin = 8409 samples, rounded up to the 16384-point FFT both flavours
#: use). It is also comfortably above the 8193 samples nnAudio's reflect padding (half a kernel,
#: 8192 samples) needs, and gives 25 frames: anything shorter carries no usable features.
MIN_SECONDS: float = 16384 / 16000

#: Peak amplitude (of the mono mix, full scale = 1.0) below which a recording counts as silent:
#: 1e-4 = -80 dBFS, under the noise floor of 16-bit audio with dither.
SILENCE_PEAK: float = 1e-4


def _describe(path: Path) -> str:
    return str(path)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioError(f"{_describe(path)}: file not found; check the path (relative paths are "
                         f"resolved from {os.getcwd()})")
    if path.is_dir():
        raise AudioError(f"{_describe(path)}: is a folder, not an audio file; point to the file")
    if path.stat().st_size == 0:
        raise AudioError(f"{_describe(path)}: file is empty (0 bytes); the copy or download was "
                         "interrupted: copy or re-encode it again")


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data, int(sr)


def _decode_torchaudio(path: Path) -> tuple[np.ndarray, int]:
    import torchaudio  # imported late: loading it costs ~1 s and it is rarely needed here

    wav, sr = torchaudio.load(str(path))
    return wav.to(torch.float32).numpy().T.copy(), int(sr)


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a file as it is stored.

    Returns ``(samples [n_samples, channels] float32, sample_rate in Hz)``. Raises
    :class:`AudioError` for a missing, empty or undecodable file.
    """
    path = Path(path)
    _check_file(path)
    try:
        return _decode_soundfile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e_sf:
        first = f"soundfile: {e_sf}"
    try:
        return _decode_torchaudio(path)
    except Exception as e_ta:  # any failure of the optional fallback is reported
        second = f"torchaudio: {type(e_ta).__name__}: {e_ta}"
    raise AudioError(
        f"{_describe(path)}: cannot decode the audio ({first}; {second.splitlines()[0][:200]}). "
        "The file is corrupt, not audio, or in a format libsndfile cannot read (it reads wav, "
        "flac, ogg, opus and mp3): re-encode it, e.g. `ffmpeg -i in.m4a out.flac`"
    )


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Mean over channels: ``[n_samples, channels]`` (or ``[n_samples]``) -> ``[n_samples]`` float32."""
    if samples.ndim == 1:
        return np.asarray(samples, dtype=np.float32)
    n_channels = samples.shape[1]
    if n_channels == 1:
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

    ``torchaudio.functional.resample`` applies, for each of the ``new`` output phases, a kernel
    of ``2 * width + orig`` taps as one strided ``conv1d``; only ~``12 * orig / new`` taps of
    each are non-zero (the rest lie outside the sinc window). For 44.1 -> 16 kHz that is ~34 of
    475 taps. We keep, for groups of neighbouring phases, only the tap range where one of them
    is non-zero and apply it as a matrix product on a strided view of the signal: the same
    kernel values and sums, ~8x fewer multiplications. Returns None when torchaudio's private
    kernel builder is unavailable (then the public function is used).
    """
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
    nonzero = taps.abs() > taps.abs().max() * 1e-12
    runs = []
    for i in range(new):
        idx = torch.nonzero(nonzero[i]).flatten()
        runs.append((int(idx[0]), int(idx[-1]) + 1))
    # dynamic programme over contiguous phase groups: multiplications + a per-call overhead
    best, back = [0.0] + [math.inf] * new, [0] * (new + 1)
    for end in range(1, new + 1):
        lo, hi = runs[end - 1]
        for start in range(end - 1, -1, -1):
            lo, hi = min(lo, runs[start][0]), max(hi, runs[start][1])
            cost = best[start] + (hi - lo) * (end - start) + 700.0
            if cost < best[end]:
                best[end], back[end] = cost, start
    groups, end = [], new
    while end > 0:
        start = back[end]
        lo = min(r[0] for r in runs[start:end])
        hi = max(r[1] for r in runs[start:end])
        groups.append((start, end, lo, hi, taps[start:end, lo:hi].t().contiguous()))
        end = start
    return orig, new, int(width), int(taps.shape[1]), groups[::-1]


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
    target = int(torch.ceil(torch.as_tensor(new * length / orig)).long())
    return out.reshape(-1)[:target]


def resample(y: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float32 signal ``[n_samples]`` from ``orig_sr`` to ``new_sr`` Hz (CPU).

    Numerically ``torchaudio.functional.resample`` with default settings (windowed sinc, 6 zero
    crossings, rolloff 0.99; agreement ~1e-7), computed without the kernel's zero taps (see
    :func:`_resample_plan`; 44.1 -> 16 kHz runs several times faster). Returns the input
    unchanged when the rates agree.
    """
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


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = 16000,
    min_seconds: float = MIN_SECONDS,
    silence_peak: float = SILENCE_PEAK,
) -> np.ndarray:
    """Decode ``path`` to a finite float32 mono signal ``[n_samples]`` at ``sample_rate`` Hz.

    Stereo and multichannel files are averaged to mono. Not peak-normalised (see
    :func:`peak_normalise`). Raises :class:`AudioError` naming the file when it is missing,
    empty, undecodable, holds NaN/inf samples, is silent (peak < ``silence_peak``) or is shorter
    than ``min_seconds`` seconds.
    """
    path = Path(path)
    data, sr = decode_audio(path)
    return _check_and_convert(path, data, sr, sample_rate=sample_rate, min_seconds=min_seconds,
                              silence_peak=silence_peak)


def _check_and_convert(
    path: Path,
    data: np.ndarray,
    sr: int,
    *,
    sample_rate: int,
    min_seconds: float,
    silence_peak: float,
) -> np.ndarray:
    """Checks of :func:`load_audio` on decoded ``data [n, channels]``, then mono + resample."""
    if data.shape[0] == 0:
        raise AudioError(f"{_describe(path)}: decodes to 0 samples; the file holds no audio: "
                         "re-export it or remove it from the list")
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise AudioError(f"{_describe(path)}: {n_bad} samples are NaN or infinite; the file is "
                         "damaged (often a float WAV written by a crashed program): re-export it")
    y = to_mono(data)
    peak = float(np.max(np.abs(y)))
    if peak < silence_peak:
        db = 20 * np.log10(max(peak, 1e-12))
        raise AudioError(
            f"{_describe(path)}: silent: peak amplitude {peak:.2e} ({db:.0f} dBFS) is below "
            f"{silence_peak:.0e} ({20 * np.log10(silence_peak):.0f} dBFS)"
            + ("; the channels may cancel out when mixed to mono (phase-inverted stereo)"
               if data.shape[1] > 1 else "")
            + ": check the file, or remove it from the list"
        )
    duration = y.shape[0] / sr
    if duration < min_seconds:
        raise AudioError(f"{_describe(path)}: too short: {duration:.3f} s, the minimum is "
                         f"{min_seconds:.3f} s (one lowest-frequency CQT kernel); use a longer "
                         "recording or remove it from the list")
    return resample(y, sr, sample_rate)


def try_load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = 16000,
    min_seconds: float = MIN_SECONDS,
    normalise: bool = False,
) -> tuple[np.ndarray | None, str | None]:
    """:func:`load_audio` that reports instead of raising: ``(signal, None)`` or ``(None, reason)``.

    A pure, top-level function (safe in a worker thread or process). ``normalise`` applies
    :func:`peak_normalise`. Only :class:`AudioError` is turned into a reason; programming
    errors still raise.
    """
    try:
        y = load_audio(path, sample_rate=sample_rate, min_seconds=min_seconds)
    except AudioError as e:
        return None, str(e)
    return (peak_normalise(y) if normalise else y), None


def iter_load_audio(
    paths: Iterable[str | os.PathLike],
    *,
    sample_rate: int = 16000,
    min_seconds: float = MIN_SECONDS,
    normalise: bool = False,
    num_workers: int = 2,
    read_ahead: int | None = None,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode many files in a thread pool; yield ``(index, signal or None, reason or None)``.

    Results come in input order. At most ``read_ahead`` (default ``2 * num_workers``) decoded
    files wait in memory at a time. ``num_workers <= 1`` does everything in the calling thread.
    Only the decoding (libsndfile, outside the GIL) runs in the worker threads; the checks,
    mono mix and resampling run in the calling thread, so that torch's OpenMP thread team is
    never started from several threads at once (oversubscribed OpenMP teams slow every stage
    several-fold on a 2-core machine).
    """
    kw = dict(sample_rate=sample_rate, min_seconds=min_seconds, normalise=normalise)
    if num_workers <= 1:
        for i, p in enumerate(paths):
            y, err = try_load_audio(p, **kw)
            yield i, y, err
        return

    def finish(path: Path, job: Future) -> tuple[np.ndarray | None, str | None]:
        decoded, err = job.result()
        if err is not None:
            return None, err
        try:
            y = _check_and_convert(path, decoded[0], decoded[1], sample_rate=sample_rate,
                                   min_seconds=min_seconds, silence_peak=SILENCE_PEAK)
        except AudioError as e:
            return None, str(e)
        return (peak_normalise(y) if normalise else y), None

    ahead = max(1, read_ahead or 2 * num_workers)
    pending: deque[tuple[int, Path, Future]] = deque()
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="chlib-audio") as pool:
        for i, p in enumerate(paths):
            pending.append((i, Path(p), pool.submit(_try_decode, Path(p))))
            if len(pending) >= ahead:
                j, path, job = pending.popleft()
                yield (j, *finish(path, job))
        while pending:
            j, path, job = pending.popleft()
            yield (j, *finish(path, job))


def _try_decode(path: Path) -> tuple[tuple[np.ndarray, int] | None, str | None]:
    try:
        return decode_audio(path), None
    except AudioError as e:
        return None, str(e)


def peak_normalise(y: np.ndarray) -> np.ndarray:
    """``y / max(0.001, max|y|) * 0.999`` (the original's rule), float32 ``[n_samples]``.

    Signals quieter than 0.001 peak are amplified by at most 999x (not to full scale).
    """
    y = np.asarray(y, dtype=np.float32)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    return (y / np.float32(max(0.001, peak)) * np.float32(0.999)).astype(np.float32, copy=False)


def audio_info(path: str | os.PathLike) -> tuple[float, int, int]:
    """``(duration in seconds, sample rate in Hz, channels)`` from the header, without decoding.

    Uses ``soundfile.info`` (for MP3 libsndfile may scan the frames; still much faster than
    decoding). Falls back to ``torchaudio.info`` where available. Raises :class:`AudioError`
    naming the file when it is missing, empty or unreadable.
    """
    path = Path(path)
    _check_file(path)
    try:
        info = sf.info(str(path))
        return float(info.frames) / float(info.samplerate), int(info.samplerate), int(info.channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e_sf:
        first = f"soundfile: {e_sf}"
    try:
        import torchaudio

        meta = torchaudio.info(str(path))
        return (float(meta.num_frames) / float(meta.sample_rate), int(meta.sample_rate),
                int(meta.num_channels))
    except Exception as e_ta:  # optional fallback: report, do not crash
        second = f"torchaudio: {type(e_ta).__name__}"
    raise AudioError(f"{_describe(path)}: cannot read the audio header ({first}; {second}); the "
                     "file is corrupt, not audio, or in a format libsndfile cannot read: "
                     "re-encode it to flac, wav, ogg or mp3")
