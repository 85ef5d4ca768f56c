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

__all__ = ["DB_EPS", "BLOCK_SAMPLES", "BATCH_SAMPLES", "CQTExtractor", "amplitude_to_db",
           "compute_cqt_db", "compute_cqt_db_batch",
           "n_frames", "min_samples", "kernel_length", "coverhunter_spectral_kernel",
           "get_extractor", "group_runs", "nonzero_runs"]

#: Added to magnitudes before the logarithm (the original's constant).
DB_EPS: float = 1e-9
_KERNEL_THRESHOLD: float = 0.01  # the original zeroes spectral-kernel entries below it
#: Signals longer than this (samples; 4.4 min at 16 kHz) are transformed in blocks of frames.
BLOCK_SAMPLES: int = 2 ** 22
#: Most samples, padding included, in one transform call of :func:`compute_cqt_db_batch`.
BATCH_SAMPLES: int = 2 ** 24
_MAX_PADDING = 0.25  # most of a sub-batch that may be zero padding


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
        # a frame j reads samples [j * hop - left, j * hop - left + width) of the track,
        # padded with pad_mode outside it (what pad_one does to the whole track)
        self.left, self.width, self.pad_mode = self.pad_left, self.n_fft, "constant"
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
        self.hop, self.left, self.width = settings.hop_length, self.half, 2 * self.half
        self.pad_mode = "reflect"

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


def _all_finite(y: np.ndarray, step: int = 1 << 20) -> bool:
    return all(np.isfinite(y[i:i + step]).all() for i in range(0, len(y), step))


def _span(impl: nn.Module, y: np.ndarray, f0: int, f1: int, device: torch.device) -> torch.Tensor:
    """The samples frames ``[f0, f1)`` of ``y`` read, padded as the flavour pads a whole track:
    float32 ``[(f1 - f0 - 1) * hop + width]``."""
    a = f0 * impl.hop - impl.left
    b = (f1 - 1) * impl.hop + impl.width - impl.left
    seg = torch.as_tensor(np.asarray(y[max(a, 0):min(b, len(y))], dtype=np.float32), device=device)
    pads = (max(0, -a), max(0, b - len(y)))
    if pads == (0, 0):
        return seg
    return F.pad(seg[None, None], pads, mode=impl.pad_mode)[0, 0]


def _sub_batches(sizes: list[int], batch_size: int, max_samples: int) -> list[list[int]]:
    """Group items of ``sizes`` samples, longest first, into sub-batches of at most
    ``batch_size`` items and ``max_samples`` samples once padded to the longest, at most
    ``_MAX_PADDING`` of which padding (an item longer than ``max_samples`` goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if groups and len(g := groups[-1]) < batch_size:
            cells = sizes[g[0]] * (len(g) + 1)
            if cells <= max_samples and cells - total - sizes[i] <= _MAX_PADDING * cells:
                g.append(i)
                total += sizes[i]
                continue
        groups.append([i])
        total = sizes[i]
    return groups


def _magnitude_to_db(mag: torch.Tensor) -> np.ndarray:
    """:func:`amplitude_to_db` of one track's magnitude ``[frames, bins]``, in place."""
    db = mag.add_(DB_EPS).log10_().mul_(20.0)
    return db.sub_(db.max()).to(torch.float32).numpy()


def compute_cqt_db_batch(signals: list[np.ndarray], settings: FeatureSettings,
                         device: str | torch.device | None = None, batch_size: int = 16,
                         dtype: torch.dtype | None = None, *, block_samples: int = BLOCK_SAMPLES,
                         max_batch_samples: int = BATCH_SAMPLES) -> list[np.ndarray]:
    """CQT in dB of many mono signals ``[n_samples]`` (at ``settings.sample_rate``); returns, in
    input order, float32 ``[n_frames(len), bins]``, 0 dB = each track's maximum.
    A signal longer than ``block_samples`` is cut into blocks of frames, each read with the
    kernel span around its frames (so neighbours overlap by a kernel less one hop) and stitched
    into the whole-signal result; signals and blocks of similar lengths share sub-batches of at
    most ``batch_size`` items and ``max_batch_samples`` samples (a quarter of them padding at
    most), each result cropped to its own frames. So the output equals per-track output and
    memory stays bounded whatever the lengths: the results, plus one sub-batch.
    :class:`AudioError` for a signal that is not 1-D, not finite or shorter than
    :func:`min_samples`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    signals = [np.asarray(y) for y in signals]
    for i, y in enumerate(signals):
        if y.ndim != 1:
            raise AudioError(f"signal {i}: expected a mono signal [samples], got shape {y.shape}; "
                             "mix to mono first (chlib.signal.audio.to_mono)")
        _check_length(y.shape[0], settings, f"signal {i}")
        if not _all_finite(y):
            raise AudioError(f"signal {i}: contains NaN or infinite samples; decode it again with "
                             "chlib.signal.audio.load_audio, which rejects damaged files")
    extractor = get_extractor(settings, device, dtype)
    impl, hop, dev = extractor.impl, settings.hop_length, extractor.device
    block_frames = max(4, block_samples // hop)
    pieces: list[tuple[int, int, int]] = []  # (signal, first frame, end frame)
    for i, y in enumerate(signals):
        total = n_frames(len(y), settings)
        k = 1 if len(y) <= block_samples else -(-total // block_frames)
        pieces += [(i, j * total // k, (j + 1) * total // k) for j in range(k)]
    todo = [0] * len(signals)  # pieces left per signal
    for i, _, _ in pieces:
        todo[i] += 1
    mags: list[torch.Tensor | None] = [None] * len(signals)
    results: list[np.ndarray | None] = [None] * len(signals)
    sizes = [(f1 - f0 - 1) * hop + impl.width for _, f0, f1 in pieces]
    with torch.no_grad():
        for group in _sub_batches(sizes, batch_size, max_batch_samples):
            batch = torch.zeros(len(group), sizes[group[0]], device=dev)
            for row, p in enumerate(group):
                batch[row, : sizes[p]] = _span(impl, signals[pieces[p][0]], *pieces[p][1:], dev)
            mag = impl.transform(batch).cpu()
            del batch
            for row, p in enumerate(group):
                i, f0, f1 = pieces[p]
                if mags[i] is None:
                    mags[i] = torch.empty(n_frames(len(signals[i]), settings), settings.n_bins,
                                          dtype=mag.dtype)
                mags[i][f0:f1] = mag[row, : f1 - f0]
                todo[i] -= 1
                if todo[i] == 0:
                    results[i], mags[i] = _magnitude_to_db(mags[i]), None
    return results  # type: ignore[return-value]


def compute_cqt_db(y: np.ndarray, settings: FeatureSettings,
                   device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> np.ndarray:
    """CQT in dB of one mono signal ``[n_samples]``: float32 ``[n_frames, bins]``, max 0 dB."""
    return compute_cqt_db_batch([y], settings, device=device, batch_size=1, dtype=dtype)[0]
