"""Spectral augmentation of training chunks (the original's SpecAug, with its bugs fixed).
Every function takes a chunk ``feat [frames, bins]`` (dB <= 0, -100 dB end padding) and an
explicit ``numpy.random.Generator`` and returns a new array of the same shape and dtype.
Fixes (coverhunter-facts 4.2, 13.2.1-2): erase boxes lie wholly inside the array (the
original's centre draw gave empty slices) and are filled with the chunk's minimum (not a
uniform draw in [-128, 0) dB, which could be louder than its surroundings)."""

from __future__ import annotations

import numpy as np

from chlib.core.config import SpecAugConfig
from chlib.core.errors import ConfigError

__all__ = ["PAD_DB", "FLEX_FILL_DB", "random_erase", "erase_boxes", "roll_pitch",
           "roll_pitch_default", "roll_pitch_low_melody", "roll_pitch_flex_melody",
           "roll_pitch_random", "tempo_resample", "random_eq", "random_accompaniment",
           "spec_augment"]

PAD_DB = -100.0  # value of end padding (rows past the end of a track)
FLEX_FILL_DB = -128.0  # value of bins vacated by flex_melody (the fork's choice)


def _check_2d(feat: np.ndarray, what: str) -> None:
    if feat.ndim != 2 or feat.shape[0] < 1 or feat.shape[1] < 1:
        raise ValueError(f"{what}: expected a non-empty [frames, bins] array, got shape {feat.shape}")


def erase_boxes(n_frames: int, n_bins: int, *, rng: np.random.Generator, erase_num: int = 4,
                region_size: tuple[float, float] = (0.25, 0.1)) -> list[tuple[int, int, int, int]]:
    """``erase_num`` half-open boxes ``(t0, t1, f0, f1)`` wholly inside ``[n_frames, n_bins]``.
    Sizes are the original's fractions ``region_size`` (time, frequency), at least 1; the
    corner is uniform over every position that keeps the box inside."""
    rt, rf = region_size
    if not (0 < rt <= 1 and 0 < rf <= 1):
        raise ConfigError(f"random_erase.region_size fractions must be in (0, 1], got {region_size}")
    h, w = min(n_frames, max(1, int(n_frames * rt))), min(n_bins, max(1, int(n_bins * rf)))
    boxes = []
    for _ in range(erase_num):
        t0 = int(rng.integers(0, n_frames - h + 1))
        f0 = int(rng.integers(0, n_bins - w + 1))
        boxes.append((t0, t0 + h, f0, f0 + w))
    return boxes


def random_erase(feat: np.ndarray, *, rng: np.random.Generator, erase_num: int = 4,
                 region_size: tuple[float, float] = (0.25, 0.1),
                 fill: float | None = None) -> np.ndarray:
    """Set ``erase_num`` (possibly overlapping) :func:`erase_boxes` of ``feat`` to ``fill`` dB
    (None: the chunk's minimum)."""
    _check_2d(feat, "random_erase")
    out = np.array(feat, copy=True)
    value = float(out.min()) if fill is None else float(fill)
    for t0, t1, f0, f1 in erase_boxes(out.shape[0], out.shape[1], rng=rng, erase_num=erase_num,
                                      region_size=region_size):
        out[t0:t1, f0:f1] = value
    return out


def roll_pitch_default(feat: np.ndarray, *, rng: np.random.Generator, shift_num: int = 12) -> np.ndarray:
    """The original's pitch roll: shift s uniform in {-shift_num, 0, +shift_num} bins, circular
    (the top octave may land below the lowest one; kept for fidelity)."""
    _check_2d(feat, "roll_pitch")
    return np.roll(feat, int(rng.choice([-shift_num, 0, shift_num])), axis=1)


def roll_pitch_low_melody(feat: np.ndarray, *, rng: np.random.Generator,
                          shift_num: int = 12) -> np.ndarray:
    """The fork's ``low_melody`` roll: move everything up by s in [1, shift_num] bins, no wrap.
    The top s bins are discarded; the s vacated bottom bins are filled with noise shaped like
    the band just above them:

    1. rows made entirely of -100 dB are padding; over the other rows, the lowest per-bin mean
       is the "target" level that the very bottom should fade towards;
    2. a reference band of 6-8 bins directly above the vacated ones gives, per frame, a mean m
       and a standard deviation sd;
    3. noise ~ N(m, 0.5 sd) per frame and vacated bin, floored at m - sd; when s > 2 a raised
       cosine subtracts (m - target) at the bottom bin, fading to 0 at the boundary; capped at
       m + sd;
    4. the top min(5, s) noise bins are blended with the mirror image of the bins above the
       boundary, mirror weight rising linearly from 0.1 to 0.6 towards the boundary;
    5. padding rows get -100 dB in the vacated bins. If s >= bins nothing happens."""
    _check_2d(feat, "roll_pitch")
    n_frames, n_bins = feat.shape
    s = int(rng.integers(1, shift_num + 1)) if shift_num >= 1 else 0
    if s == 0 or s >= n_bins:
        return np.array(feat, copy=True)
    x = feat.astype(np.float64, copy=False)
    real = ~np.all(x == PAD_DB, axis=1)  # [frames]: not a padding row
    out = np.empty_like(x)
    out[:, s:] = x[:, : n_bins - s]  # bins move up by s; the top s are dropped
    if not real.any():
        out[:, :s] = PAD_DB
        return out.astype(feat.dtype)
    target = float(x[real].mean(axis=0).min())
    band = out[:, s:min(n_bins, s + 6 + int(rng.integers(0, 3)))]  # [frames, 6..8]
    m = band.mean(axis=1, keepdims=True)  # [frames, 1]
    sd = band.std(axis=1, keepdims=True)
    noise = np.maximum(rng.normal(0.0, 1.0, size=(n_frames, s)) * (0.5 * sd) + m, m - sd)
    if s > 2:
        w = 0.5 * (1.0 + np.cos(np.pi * np.arange(s) / (s - 1)))  # 1 at bin 0 -> 0 at bin s-1
        noise = noise - (m - target) * w[None, :]
    noise = np.minimum(noise, m + sd)
    k = min(5, s)
    weights = np.linspace(0.1, 0.6, k)  # for vacated bins s-k .. s-1 (towards the boundary)
    for j, wt in zip(range(s - k, s), weights, strict=True):
        mirror = min(n_bins - 1, 2 * s - 1 - j)  # reflection of bin j about the boundary
        noise[:, j] = (1.0 - wt) * noise[:, j] + wt * out[:, mirror]
    out[:, :s] = np.where(real[:, None], noise, PAD_DB)
    return out.astype(feat.dtype)


def roll_pitch_flex_melody(feat: np.ndarray, *, rng: np.random.Generator,
                           shift_num: int = 12) -> np.ndarray:
    """The fork's ``flex_melody`` roll (its author marks it "not recommended").
    The tonal centre c is the integer mean bin index of all cells above the chunk's 90th
    percentile (bins // 2 if none). The shift s is uniform in
    [-min(shift_num, c), +min(shift_num, bins - c)], without wrapping; vacated bins get -128 dB."""
    _check_2d(feat, "roll_pitch")
    n_bins = feat.shape[1]
    _, cols = np.nonzero(feat > np.percentile(feat, 90))
    c = int(cols.mean()) if cols.size else n_bins // 2
    lo, hi = -min(shift_num, c), min(shift_num, n_bins - c)
    return _shift_bins(feat, int(rng.integers(lo, hi + 1)), np.full_like(feat, FLEX_FILL_DB))


def roll_pitch_random(feat: np.ndarray, *, rng: np.random.Generator, shift_num: int = 12) -> np.ndarray:
    """chlib's key change: shift by s uniform in [-shift_num, +shift_num] bins, no wrap; vacated
    bins get their frame's minimum (padding rows stay -100 dB)."""
    _check_2d(feat, "roll_pitch")
    n_bins = feat.shape[1]
    if (s := int(rng.integers(-shift_num, shift_num + 1))) == 0 or abs(s) >= n_bins:
        return np.array(feat, copy=True)
    return _shift_bins(feat, s, np.repeat(feat.min(axis=1, keepdims=True), n_bins,
                                          axis=1).astype(feat.dtype))


def _shift_bins(feat: np.ndarray, s: int, out: np.ndarray) -> np.ndarray:
    """``feat`` moved up by ``s`` bins (down if negative) into ``out``, which fills the rest."""
    if s == 0:
        out[:] = feat
    elif s > 0:
        out[:, s:] = feat[:, : feat.shape[1] - s]
    else:
        out[:, :s] = feat[:, -s:]
    return out


_ROLLS = {"default": roll_pitch_default, "low_melody": roll_pitch_low_melody,
          "flex_melody": roll_pitch_flex_melody, "random": roll_pitch_random}


def roll_pitch(feat: np.ndarray, *, rng: np.random.Generator, shift_num: int = 12,
               method: str = "default") -> np.ndarray:
    """Pitch roll by ``method`` ("default", "low_melody", "flex_melody" or "random"); see above."""
    if method not in _ROLLS:
        raise ConfigError(f"roll_pitch.method must be one of {sorted(_ROLLS)}, got {method!r}")
    return _ROLLS[method](feat, rng=rng, shift_num=shift_num)


def tempo_resample(feat: np.ndarray, n_out: int) -> np.ndarray:
    """Linear interpolation of ``feat`` [frames, bins] to float32 ``[n_out, bins]`` along time
    (feature-domain tempo jitter; pitch untouched)."""
    _check_2d(feat, "tempo_resample")
    if (n_in := feat.shape[0]) == n_out:
        return np.array(feat, dtype=np.float32, copy=True)
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)  # centres
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0)[:, None].astype(np.float32)
    x = feat.astype(np.float32, copy=False)
    return (x[i0] * (1.0 - frac) + x[i1] * frac).astype(np.float32)


def random_eq(feat: np.ndarray, depth_db: float, *, rng: np.random.Generator) -> np.ndarray:
    """``feat`` [frames, bins] dB plus one random smooth spectral envelope (three cosines over
    the bins, random phases) scaled to at most ``depth_db`` dB: another instrument's or room's
    colour. Values stay >= -100 dB; float32."""
    pos = np.linspace(0.0, 1.0, feat.shape[1])
    curve = sum(np.cos(2 * np.pi * (k * pos + rng.random())) / k for k in (1, 2, 3))
    curve = curve / max(1e-9, float(np.abs(curve).max())) * depth_db
    return np.maximum(np.asarray(feat, dtype=np.float32) + curve.astype(np.float32), PAD_DB)


def spec_augment(feat: np.ndarray, cfg: SpecAugConfig, *, rng: np.random.Generator) -> np.ndarray:
    """roll_pitch, then random_erase, each with its own ``prob``; a new array, as the original."""
    rp, re, out = cfg.roll_pitch, cfg.random_erase, feat
    if rp.prob > 0 and rng.random() < rp.prob:
        out = roll_pitch(out, rng=rng, shift_num=rp.shift_num, method=rp.method)
    if re.prob > 0 and rng.random() < re.prob:
        out = random_erase(out, rng=rng, erase_num=re.erase_num, region_size=re.region_size)
    return np.array(feat, copy=True) if out is feat else out


# diatonic triads of a major key, as pitch classes above its tonic, and how often each is drawn
_TRIADS = ((0, 4, 7), (7, 11, 2), (5, 9, 0), (9, 0, 4), (2, 5, 9))  # I, V, IV, vi, ii
_TRIAD_P = np.array([0.35, 0.3, 0.2, 0.1, 0.05])
_PARTIAL_SEMITONES = (0, 12, 19, 24, 28, 31, 34, 36)  # harmonics 1-8, in semitones


def random_accompaniment(feat: np.ndarray, tonic: int, *, rng: np.random.Generator,
                         bins_per_octave: int = 12, level_db: tuple[float, float] = (-6.0, 12.0),
                         chord_frames: tuple[int, int] = (12, 60)) -> np.ndarray:
    """``feat`` [frames, bins] dB (lowest bin = pitch class 0) plus a random accompaniment: a
    bass line and diatonic triads (I, V, IV, vi, ii) of the major key on pitch class ``tonic``,
    one chord per ``chord_frames`` frames (uniform), struck once or repeatedly, its root in the
    second octave and its three tones in the third to fifth, each with eight harmonics of a
    random spectral slope and a decaying envelope, mixed in the linear domain ``level_db`` dB
    (uniform; negative = louder) below the chunk's 95th-percentile frame peak, as loud as the
    bass and chords of the FluidSynth suite. It teaches a model that a tune with chords and bass
    is the tune played alone (the suite's solo/accompanied pairs were its hardest). float32,
    >= -100 dB; chunks of under four octaves come back unchanged."""
    feat = np.asarray(feat, dtype=np.float32)
    frames, n_bins = feat.shape
    step, n_oct = bins_per_octave // 12, n_bins // max(1, bins_per_octave)
    if n_oct < 4 or step < 1:
        return feat.copy()
    mag = 10.0 ** (feat / 20.0)
    amp = float(np.percentile(mag.max(axis=1), 95)) * 10.0 ** (-rng.uniform(*level_db) / 20.0)
    partials = np.arange(1, 9, dtype=np.float64) ** -rng.uniform(0.5, 2.0)
    decay, chord_oct = rng.uniform(5.0, 40.0), int(rng.integers(2, min(4, n_oct - 2) + 1))
    acc = np.zeros_like(mag)
    t = 0
    while t < frames:
        n = min(int(rng.integers(chord_frames[0], chord_frames[1] + 1)), frames - t)
        triad = _TRIADS[int(rng.choice(len(_TRIADS), p=_TRIAD_P))]
        period = int(rng.integers(min(n, max(4, n // 4)), n + 1))
        env = np.exp(-(np.arange(n) % period) / decay) * 0.8 + 0.2
        notes = [(12 + (tonic + triad[0]) % 12, 1.0)]  # the bass: the chord's root
        notes += [(chord_oct * 12 + (tonic + pc) % 12, 0.7) for pc in triad]
        for semi, gain in notes:
            for up, partial in zip(_PARTIAL_SEMITONES, partials, strict=True):
                if (b := (semi + up) * step) < n_bins:
                    acc[t:t + n, b] += amp * gain * partial * env
        t += n
    return np.maximum(20.0 * np.log10(mag + acc + 1e-10), PAD_DB).astype(np.float32)
