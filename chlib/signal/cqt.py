"""Constant-Q transform in two flavours behind one interface: ``nnaudio`` and ``coverhunter``.
Both give a magnitude CQT ``[frames, bins]`` (bin k at ``fmin * 2**(k / bpo)`` Hz);
:func:`amplitude_to_db` gives dB below the track's loudest cell. Defaults: 25 frames per second
over 32 Hz .. 7.7 kHz. A model trained on one flavour degrades on the other.

``nnaudio``: CoverHunterMPS's nnAudio ``CQT1992v2`` on every device (the fork's CUDA
``CQT2010v2`` differs by up to 39 dB on single cells), reflect-padded per track, so a track in
a zero-padded batch gets the frames it gets alone. ``coverhunter``: the original's "PyCqt" in
torch (Hamming-windowed kernels in ``n_fft`` = 16384, spectral entries < 0.01 zeroed). Each bin's
kernel is non-zero on one run of FFT bins, so the real FFT of each frame is multiplied, per group
of neighbouring bins, only over the run that group needs. Float32 agrees with the float64
original within 0.001 dB above -60 dB; about 4 s per audio-hour on one torch thread
(``bench/bench_extract.py``)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chlib.core.config import FeatureSettings
from chlib.core.device import device_dtype_ok, pick_device
from chlib.core.errors import AudioError, ConfigError

__all__ = ["DB_EPS", "CQTExtractor", "amplitude_to_db", "compute_cqt_db", "compute_cqt_db_batch",
           "n_frames", "min_samples", "kernel_length", "coverhunter_spectral_kernel",
           "get_extractor", "group_runs", "nonzero_runs"]

#: Added to magnitudes before the logarithm (the original's constant).
DB_EPS: float = 1e-9
_KERNEL_THRESHOLD: float = 0.01  # the original zeroes spectral-kernel entries below it


def _quality(settings: FeatureSettings) -> float:
    return 1.0 / (2.0 ** (1.0 / settings.bins_per_octave) - 1.0)


def kernel_length(settings: FeatureSettings) -> int:
    """Samples spanned by the lowest-bin kernel (both flavours): the next power of two
    >= ``Q * sr / fmin``."""
    return int(2 ** math.ceil(math.log2(_quality(settings) * settings.sample_rate / settings.fmin)))


def n_frames(n_samples: int, settings: FeatureSettings) -> int:
    """CQT frames of ``n_samples``: ``n // hop``, plus one for ``nnaudio`` (centred frames)."""
    return int(n_samples) // settings.hop_length + (1 if settings.flavour == "nnaudio" else 0)


def min_samples(settings: FeatureSettings) -> int:
    """Fewest samples accepted: one hop (``coverhunter``), half a kernel + 1 (``nnaudio``'s
    reflect padding; 8193 by default)."""
    nnaudio = settings.flavour == "nnaudio"
    return kernel_length(settings) // 2 + 1 if nnaudio else settings.hop_length


def amplitude_to_db(mag: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """``20 * log10(mag + 1e-9)`` minus its maximum over the last two axes: ``[frames, bins]``
    or ``[B, frames, bins]``, tensor or array (same type back); crop padded tracks first, or
    padding frames take part in the maximum."""
    if isinstance(mag, torch.Tensor):
        db = 20.0 * torch.log10(mag + DB_EPS)
        return db - db.amax(dim=(-2, -1), keepdim=True)
    db = 20.0 * np.log10(np.asarray(mag) + DB_EPS)
    return db - db.max(axis=(-2, -1), keepdims=True)


def coverhunter_spectral_kernel(settings: FeatureSettings) -> np.ndarray:
    """The original's spectral kernel, dense ``[n_bins, n_fft]`` complex128, such that
    ``abs(kernel @ np.fft.fft(frame))`` is one CQT frame of ``n_fft`` samples."""
    sr, q, n_fft = settings.sample_rate, _quality(settings), kernel_length(settings)
    kernel = np.zeros((settings.n_bins, n_fft), dtype=np.complex128)
    for k in range(settings.n_bins):
        freq = settings.fmin * 2.0 ** (k / settings.bins_per_octave)
        length = 2 * round(q * sr / freq / 2) + 1
        n = np.arange(length) - (length - 1) / 2
        temporal = np.hamming(length) * np.exp(2j * np.pi * q * n / length) / length
        start = (n_fft - length + 1) // 2
        kernel[k, start:start + length] = temporal
    kernel = np.fft.fft(kernel, axis=1)
    kernel[np.abs(kernel) < _KERNEL_THRESHOLD] = 0
    return np.conj(kernel) / n_fft


def _fold_to_real_fft(kernel: np.ndarray) -> np.ndarray:
    """Real matrix ``[2 * (n_fft // 2 + 1), 2 * n_bins]`` acting on ``view_as_real(rfft(frame))``.
    For a real frame, ``FFT[n - m] = conj(FFT[m])``, so ``sum_m w[m] FFT[m]`` over all m equals
    ``sum_{m <= n/2} (a_m FFT[m] + b_m conj(FFT[m]))`` with ``a_m = w[m]``, ``b_m = w[n - m]``
    (``b_0 = b_{n/2} = 0``). Writing ``FFT = c + i d`` gives real rows for c and d and real
    columns for the real and imaginary parts of each bin."""
    n_bins, n_fft = kernel.shape
    half = n_fft // 2
    a = kernel[:, : half + 1]
    b = np.zeros_like(a)
    b[:, 1:half] = kernel[:, n_fft - 1: half: -1]
    w = np.zeros((2 * (half + 1), 2 * n_bins))
    w[0::2, 0::2] = (a.real + b.real).T
    w[1::2, 0::2] = (b.imag - a.imag).T
    w[0::2, 1::2] = (a.imag + b.imag).T
    w[1::2, 1::2] = (a.real - b.real).T
    return w


def _bin_runs(w: np.ndarray) -> list[tuple[int, int]]:
    """For each bin, the half-open run ``[lo, hi)`` of real-FFT bins where its kernel is non-zero."""
    n_bins = w.shape[1] // 2
    nonzero = (np.abs(w[0::2]) + np.abs(w[1::2])).reshape(w.shape[0] // 2, n_bins, 2).sum(-1) > 0
    return nonzero_runs(nonzero.T)


def nonzero_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Per row of a boolean ``mask [rows, n]``, ``[first, last + 1)`` of its True entries
    (``(0, 1)`` for a row without any): the input of :func:`group_runs`."""
    return [(int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 1)
            for idx in map(np.flatnonzero, mask)]


def group_runs(runs: list[tuple[int, int]],
               call_cost: float = 10000.0) -> list[tuple[int, int, int, int]]:
    """Split rows (CQT bins, resampler phases) with non-zero runs ``[lo, hi)`` into contiguous
    groups minimising ``sum(group run width x rows) + call_cost x groups`` (dynamic programme;
    ``call_cost``: a small matmul's overhead in multiplies). Returns ``(start, end, lo, hi)``:
    the half-open rows of each group and the run covering them."""
    n = len(runs)
    best = [0.0] + [math.inf] * n
    back = [(0, 0, 0)] * (n + 1)  # (start, lo, hi) of the best last group ending at each row
    for end in range(1, n + 1):
        lo, hi = runs[end - 1]
        for start in range(end - 1, -1, -1):
            lo, hi = min(lo, runs[start][0]), max(hi, runs[start][1])
            if (cost := best[start] + (hi - lo) * (end - start) + call_cost) < best[end]:
                best[end], back[end] = cost, (start, lo, hi)
    groups, end = [], n
    while end > 0:
        start, lo, hi = back[end]
        groups.append((start, end, lo, hi))
        end = start
    return groups[::-1]


class _CoverHunterCQT(nn.Module):
    """The original's CQT on torch. ``transform([B, padded]) -> magnitude [B, frames, bins]``."""

    def __init__(self, settings: FeatureSettings, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_fft, self.hop, self.n_bins = (kernel_length(settings), settings.hop_length,
                                             settings.n_bins)
        self.pad_left = math.ceil((self.n_fft - self.hop) / 2)
        self.pad_right = (self.n_fft - self.hop) // 2
        w = _fold_to_real_fft(coverhunter_spectral_kernel(settings))
        self.groups = group_runs(_bin_runs(w))
        for i, (start, end, lo, hi) in enumerate(self.groups):
            block = torch.from_numpy(np.ascontiguousarray(w[2 * lo:2 * hi, 2 * start:2 * end]))
            self.register_buffer(f"w{i}", block.to(dtype))

    def pad_one(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-pad one track ``[n]`` -> ``[n + n_fft - hop]`` (the original's padding)."""
        return F.pad(y, (self.pad_left, self.pad_right))

    def transform(self, padded: torch.Tensor) -> torch.Tensor:
        """``padded [B, P]`` -> magnitude ``[B, (P - n_fft) // hop + 1, n_bins]``."""
        bsz, total = padded.shape
        frames = (total - self.n_fft) // self.hop + 1
        weights = [getattr(self, f"w{i}") for i in range(len(self.groups))]
        dtype = weights[0].dtype
        padded = padded.to(dtype)
        step = max(1, (128 if padded.device.type == "cpu" else 4096) // bsz)  # frames per matmul
        view = padded.unfold(-1, self.n_fft, self.hop)  # [B, frames, n_fft], no copy
        out = torch.empty(bsz, frames, 2 * self.n_bins, dtype=dtype, device=padded.device)
        for t0 in range(0, frames, step):
            t1 = min(frames, t0 + step)
            block = view[:, t0:t1].reshape(-1, self.n_fft)
            spec = torch.view_as_real(torch.fft.rfft(block)).reshape(block.shape[0], -1)
            res = out[:, t0:t1].view(-1, 2 * self.n_bins) if bsz == 1 else None
            for (start, end, lo, hi), wmat in zip(self.groups, weights, strict=True):
                part = spec[:, 2 * lo:2 * hi] @ wmat
                if res is not None:
                    res[:, 2 * start:2 * end] = part
                else:
                    out[:, t0:t1, 2 * start:2 * end] = part.view(bsz, t1 - t0, -1)
        return torch.linalg.vector_norm(out.view(bsz, frames, self.n_bins, 2), dim=-1)


class _NnAudioCQT(nn.Module):
    """nnAudio ``CQT1992v2`` with per-track reflect padding. Float32."""

    def __init__(self, settings: FeatureSettings) -> None:
        super().__init__()
        from nnAudio.features.cqt import CQT1992v2

        self.cqt = CQT1992v2(sr=settings.sample_rate, hop_length=settings.hop_length,
                             fmin=settings.fmin, n_bins=settings.n_bins,
                             bins_per_octave=settings.bins_per_octave,
                             center=False, verbose=False)  # center: pad_one pads each track
        self.half = int(self.cqt.kernel_width) // 2

    def pad_one(self, y: torch.Tensor) -> torch.Tensor:
        """Reflect-pad one track ``[n]`` by half a kernel on both sides (nnAudio's ``center``)."""
        return F.pad(y[None, None], (self.half, self.half), mode="reflect")[0, 0]

    def transform(self, padded: torch.Tensor) -> torch.Tensor:
        """``padded [B, P]`` -> magnitude ``[B, (P - kernel) // hop + 1, n_bins]``."""
        return self.cqt(padded.to(torch.float32)).transpose(1, 2).contiguous()


class CQTExtractor(nn.Module):
    """Magnitude CQT of a batch of equal-length signals, for the flavour in ``settings``.
    Kernels are buffers (``.to(device)`` moves them); ``device`` None picks cuda, mps, cpu.
    ``dtype`` (``coverhunter`` only): float32 (default) or float64 (not on MPS). Signals of
    different lengths: :func:`compute_cqt_db_batch`."""

    def __init__(self, settings: FeatureSettings, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.settings = settings.validate()
        dev, dtype = pick_device(device), dtype or torch.float32
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"CQT dtype must be torch.float32 or torch.float64, got {dtype}")
        if not device_dtype_ok(dev, dtype):
            raise ConfigError(f"CQT dtype {dtype} is not available on {dev}; use torch.float32")
        if settings.flavour == "nnaudio" and dtype != torch.float32:
            raise ConfigError("the nnaudio CQT flavour computes in float32 only; drop dtype")
        self.impl: nn.Module = (_NnAudioCQT(settings) if settings.flavour == "nnaudio"
                                else _CoverHunterCQT(settings, dtype))
        self.to(dev).eval()

    @property
    def device(self) -> torch.device:
        """Device the kernels live on."""
        return next(iter(self.buffers())).device

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch [B, samples]`` (or ``[samples]``) -> magnitude ``[B, frames, bins]``."""
        if batch.dim() == 1:
            batch = batch[None]
        if batch.dim() != 2:
            raise ValueError(
                f"CQT input must be [batch, samples] or [samples], got {tuple(batch.shape)}")
        _check_length(batch.shape[-1], self.settings, "input")
        batch = batch.to(self.device, torch.float32)
        with torch.no_grad():
            return self.impl.transform(torch.stack([self.impl.pad_one(y) for y in batch]))


def _check_length(n: int, settings: FeatureSettings, what: str) -> None:
    if n < (need := min_samples(settings)):
        raise AudioError(f"{what}: {n} samples ({n / settings.sample_rate:.3f} s) is too short for "
                         f"the {settings.flavour} CQT, which needs at least {need} samples "
                         f"({need / settings.sample_rate:.3f} s at {settings.sample_rate} Hz); use "
                         "longer audio")


@functools.lru_cache(maxsize=8)
def _cached_extractor(settings: FeatureSettings, device: str,
                      dtype: torch.dtype | None) -> CQTExtractor:
    return CQTExtractor(settings, device=device, dtype=dtype)


def get_extractor(settings: FeatureSettings, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> CQTExtractor:
    """The cached :class:`CQTExtractor` for ``(settings, device, dtype)`` (8 kept per process)."""
    return _cached_extractor(settings, str(pick_device(device)), dtype or torch.float32)


def compute_cqt_db_batch(signals: list[np.ndarray], settings: FeatureSettings,
                         device: str | torch.device | None = None, batch_size: int = 16,
                         dtype: torch.dtype | None = None) -> list[np.ndarray]:
    """CQT in dB of many mono signals ``[n_samples]`` (at ``settings.sample_rate``); returns, in
    input order, float32 ``[n_frames(len), bins]``, 0 dB = each track's maximum.
    Batches of similar lengths are zero-padded and each result cropped to its own frames, so
    batched output equals per-track output. :class:`AudioError` for a signal that is not 1-D,
    not finite or shorter than :func:`min_samples`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for i, y in enumerate(signals):
        if (y := np.asarray(y)).ndim != 1:
            raise AudioError(f"signal {i}: expected a mono signal [samples], got shape {y.shape}; "
                             "mix to mono first (chlib.signal.audio.to_mono)")
        _check_length(y.shape[0], settings, f"signal {i}")
        if not np.isfinite(y).all():
            raise AudioError(f"signal {i}: contains NaN or infinite samples; decode it again with "
                             "chlib.signal.audio.load_audio, which rejects damaged files")
    extractor = get_extractor(settings, device, dtype)
    order = sorted(range(len(signals)), key=lambda i: -len(signals[i]))
    results: list[np.ndarray | None] = [None] * len(signals)
    with torch.no_grad():
        for b0 in range(0, len(order), batch_size):
            idx = order[b0:b0 + batch_size]
            padded = [extractor.impl.pad_one(torch.as_tensor(
                np.asarray(signals[i], dtype=np.float32), device=extractor.device)) for i in idx]
            width = max(p.shape[0] for p in padded)
            batch = torch.stack([F.pad(p, (0, width - p.shape[0])) for p in padded])
            mag = extractor.impl.transform(batch)
            for row, i in enumerate(idx):
                crop = mag[row, : n_frames(len(signals[i]), settings)]
                results[i] = amplitude_to_db(crop).to(torch.float32).cpu().numpy()
    return results  # type: ignore[return-value]


def compute_cqt_db(y: np.ndarray, settings: FeatureSettings,
                   device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> np.ndarray:
    """CQT in dB of one mono signal ``[n_samples]``: float32 ``[n_frames, bins]``, max 0 dB."""
    return compute_cqt_db_batch([y], settings, device=device, batch_size=1, dtype=dtype)[0]
