"""Spectral augmentation: boxes inside the array, pitch rolls, tempo resampling, the chain."""

from __future__ import annotations

import numpy as np
import pytest

from chlib.core.config import RandomEraseConfig, RollPitchConfig, SpecAugConfig
from chlib.core.errors import ConfigError
from chlib.signal.specaug import (
    FLEX_FILL_DB,
    PAD_DB,
    erase_boxes,
    random_accompaniment,
    random_erase,
    roll_pitch,
    spec_augment,
    tempo_resample,
)


def _chunk(t: int = 40, f: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (-60.0 + 20.0 * rng.random((t, f))).astype(np.float32)  # values in [-60, -40)


@pytest.mark.parametrize("shape", [(40, 96), (7, 12), (1125, 96), (3, 5)])
def test_erase_boxes_lie_inside_and_are_never_empty(shape):
    t, f = shape
    rng = np.random.default_rng(1)
    boxes = [b for _ in range(300) for b in erase_boxes(t, f, rng=rng, erase_num=4)]
    for t0, t1, f0, f1 in boxes:
        assert 0 <= t0 < t1 <= t and 0 <= f0 < f1 <= f
    # the original never erased the last half-box of frames nor the first (empty slices):
    assert min(b[0] for b in boxes) == 0
    assert max(b[1] for b in boxes) == t


def test_random_erase_sets_exactly_the_boxes_to_the_chunk_minimum():
    x = _chunk()
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    out = random_erase(x, rng=rng_a, erase_num=3, region_size=(0.25, 0.1))
    boxes = erase_boxes(40, 96, rng=rng_b, erase_num=3, region_size=(0.25, 0.1))
    mask = np.zeros_like(x, dtype=bool)
    for t0, t1, f0, f1 in boxes:
        mask[t0:t1, f0:f1] = True
    assert mask.sum() >= 10 * 9  # int(40 * .25) x int(96 * .1) at least
    np.testing.assert_array_equal(out[mask], np.float32(x.min()))
    np.testing.assert_array_equal(out[~mask], x[~mask])
    assert not np.shares_memory(out, x)


def test_random_erase_fixed_fill_and_bad_region():
    x = _chunk()
    out = random_erase(x, rng=np.random.default_rng(0), erase_num=1, fill=-123.0)
    assert (out == -123.0).sum() == 10 * 9
    with pytest.raises(ConfigError, match="region_size"):
        random_erase(x, rng=np.random.default_rng(0), region_size=(0.0, 0.1))


def test_roll_pitch_default_is_a_circular_roll_by_minus_n_zero_or_n():
    x = _chunk()
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(60):
        out = roll_pitch(x, rng=rng, shift_num=12, method="default")
        matches = [s for s in (-12, 0, 12) if np.array_equal(out, np.roll(x, s, axis=1))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {-12, 0, 12}


def test_roll_pitch_low_melody_moves_up_without_wrapping_and_keeps_padding():
    x = _chunk(t=30)
    x[25:] = PAD_DB  # end padding rows
    rng = np.random.default_rng(7)
    shifts = set()
    for _ in range(40):
        out = roll_pitch(x, rng=rng, shift_num=12, method="low_melody")
        s = next(s for s in range(1, 13) if np.allclose(out[:, s:], x[:, : 96 - s]))
        shifts.add(s)
        assert np.all(out[25:, :s] == PAD_DB)  # padding stays padding
        vacated = out[:25, :s]
        assert np.isfinite(vacated).all()
        # the fill is shaped like the band above it: within the chunk's own level range
        assert vacated.min() >= x[:25].min() - 20 and vacated.max() <= x[:25].max() + 1e-3
    assert len(shifts) > 5


def test_roll_pitch_flex_melody_shifts_without_wrap_and_fills_minus_128():
    x = _chunk()
    rng = np.random.default_rng(11)
    nonzero = 0
    for _ in range(30):
        out = roll_pitch(x, rng=rng, shift_num=12, method="flex_melody")
        s = next(s for s in range(-12, 13) if (
            np.array_equal(out[:, max(s, 0): 96 + min(s, 0)], x[:, max(-s, 0): 96 - max(s, 0)])))
        if s:
            nonzero += 1
            vac = out[:, :s] if s > 0 else out[:, s:]
            assert np.all(vac == FLEX_FILL_DB)
    assert nonzero > 0


def test_roll_pitch_unknown_method():
    with pytest.raises(ConfigError, match="roll_pitch.method"):
        roll_pitch(_chunk(), rng=np.random.default_rng(0), method="sideways")


def test_tempo_resample_shapes_and_values():
    ramp = np.repeat(np.arange(50, dtype=np.float32)[:, None], 4, axis=1)
    fast = tempo_resample(ramp, 40)  # 50 frames squeezed into 40
    assert fast.shape == (40, 4) and fast.dtype == np.float32
    assert np.all(np.diff(fast[:, 0]) > 0) and fast[0, 0] >= 0 and fast[-1, 0] <= 49
    const = np.full((33, 3), -7.0, dtype=np.float32)
    np.testing.assert_allclose(tempo_resample(const, 45), -7.0)


def test_spec_augment_probabilities_and_reproducibility():
    x = _chunk()
    off = SpecAugConfig()
    out = spec_augment(x, off, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)
    on = SpecAugConfig(RandomEraseConfig(prob=1.0, erase_num=2),
                       RollPitchConfig(prob=1.0, shift_num=5, method="low_melody"))
    a = spec_augment(x, on, rng=np.random.default_rng(42))
    b = spec_augment(x, on, rng=np.random.default_rng(42))
    c = spec_augment(x, on, rng=np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, x) and not np.array_equal(a, c)
    np.testing.assert_array_equal(x, _chunk())  # input untouched


def test_roll_pitch_random_shifts_both_ways_without_wrap_filling_the_row_minimum():
    x = _chunk(t=20)
    x[15:] = PAD_DB
    rng = np.random.default_rng(2)
    shifts = set()
    for _ in range(80):
        out = roll_pitch(x, rng=rng, shift_num=6, method="random")
        s = next(s for s in range(-6, 7) if (
            np.array_equal(out[:, max(s, 0): 96 + min(s, 0)], x[:, max(-s, 0): 96 - max(s, 0)])))
        shifts.add(s)
        vac = out[:, :s] if s > 0 else out[:, 96 + s:] if s < 0 else out[:, :0]
        np.testing.assert_array_equal(vac, np.broadcast_to(x.min(axis=1, keepdims=True), vac.shape))
        assert np.all(out[15:] == PAD_DB)
    assert shifts == set(range(-6, 7))


def test_random_eq_is_a_smooth_envelope_within_its_depth():
    from chlib.signal.specaug import random_eq

    x = np.full((10, 96), -20.0, dtype=np.float32)
    y = random_eq(x, 12.0, rng=np.random.default_rng(0))
    curve = y[0] - x[0]
    assert np.allclose(y, y[0])  # the same envelope on every frame
    assert np.abs(curve).max() == pytest.approx(12.0, abs=1e-4)
    assert np.abs(np.diff(curve)).max() < 2.0  # smooth over the bins
    assert random_eq(np.full((2, 8), -99.0, np.float32), 30.0, rng=np.random.default_rng(1)).min() >= -100.0


def test_accompaniment_adds_the_keys_triads_and_bass_without_touching_the_melody():
    melody = np.full((200, 96), -100.0, np.float32)
    melody[:, 12 * 4 + 2] = 0.0  # one loud note, pitch class 2, fifth octave
    tonic = 2
    out = random_accompaniment(melody, tonic, rng=np.random.default_rng(0))
    assert out.shape == melody.shape and out.dtype == np.float32 and out.min() >= -100.0
    assert out[:, 12 * 4 + 2].max() > -1.0  # the melody stays on top of its bin
    added = (out > -90).any(axis=0)
    pcs = {b % 12 for b in np.flatnonzero(added[:36])}  # fundamentals of bass and chords
    scale = {(tonic + d) % 12 for d in (0, 2, 4, 5, 7, 9, 11)}
    assert pcs and pcs <= scale  # diatonic to the key, nothing chromatic
    assert added[12:24].any()  # a bass line in the second octave
    same = random_accompaniment(melody, tonic, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, same)  # the generator decides everything
    other = random_accompaniment(melody, tonic, rng=np.random.default_rng(1))
    assert not np.array_equal(out, other)


def test_accompaniment_level_follows_the_chunk_and_short_ranges_pass_through():
    quiet = np.full((100, 96), -100.0, np.float32)
    quiet[:, 60] = -40.0
    out = random_accompaniment(quiet, 0, rng=np.random.default_rng(2), level_db=(10.0, 10.0))
    bass_peak = out[:, 12:24].max()
    assert -40.0 - 10.0 - 1.0 < bass_peak <= -40.0 - 10.0 + 1.0  # 10 dB under the chunk's peak
    three_octaves = np.zeros((50, 36), np.float32) - 30.0
    np.testing.assert_array_equal(random_accompaniment(three_octaves, 0,
                                                       rng=np.random.default_rng(0)),
                                  three_octaves)
    for frames in (1, 3, 7):  # chords cut short at the end of a tiny chunk
        assert random_accompaniment(quiet[:frames], 5, rng=np.random.default_rng(3)).shape == (
            frames, 96)
