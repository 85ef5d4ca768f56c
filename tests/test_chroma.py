"""chlib.signal.chroma: pitch classes land where they should; 2D-FTM ignores key and time shifts."""

from __future__ import annotations

import numpy as np
import pytest

from chlib.core.errors import FeatureError
from chlib.signal.chroma import chroma_from_cqt, ftm2d


def _tune_cqt(rng: np.random.Generator, n_frames: int = 900, shift: int = 0) -> np.ndarray:
    """A [frames, 96] dB 'CQT' of a random melody on a steady beat (8 frames per note)."""
    notes = rng.integers(24, 60, size=n_frames // 8)
    feat = np.full((n_frames, 96), -80.0, dtype=np.float32)
    for i, n in enumerate(notes):
        rows = slice(i * 8, i * 8 + 8)
        feat[rows, n + shift] = 0.0
        feat[rows, n + shift + 12] = -12.0  # an overtone an octave up
        feat[i * 8, :] = np.maximum(feat[i * 8, :], -30.0)  # an onset
    return feat


def test_chroma_puts_a_bin_in_its_pitch_class():
    feat = np.full((4, 96), -100.0, dtype=np.float32)
    feat[:, 12 * 3 + 7] = 0.0  # pitch class 7, fourth octave
    chroma = chroma_from_cqt(feat)
    assert chroma.shape == (4, 12)
    assert np.all(chroma.argmax(axis=1) == 7) and np.allclose(chroma.max(axis=1), 1.0)


def test_ftm2d_is_unit_norm_and_sized_by_the_patch(rng):
    v = ftm2d(_tune_cqt(rng), patch_beats=20)
    assert v.shape == (12 * 20,) and v.dtype == np.float32
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)


def test_ftm2d_ignores_transposition_but_tells_tunes_apart():
    a = ftm2d(_tune_cqt(np.random.default_rng(1)), patch_beats=20)
    a_up = ftm2d(_tune_cqt(np.random.default_rng(1), shift=5), patch_beats=20)
    b = ftm2d(_tune_cqt(np.random.default_rng(2)), patch_beats=20)
    same, other = 1 - float(a @ a_up), 1 - float(a @ b)
    assert same < 0.01  # transposed by 5 semitones: (almost) the same vector
    assert other > 3 * same


def test_short_tracks_are_padded_to_one_patch(rng):
    assert ftm2d(_tune_cqt(rng, n_frames=80), patch_beats=75).shape == (900,)


def test_bad_shapes_are_refused():
    with pytest.raises(FeatureError, match="bins"):
        chroma_from_cqt(np.zeros((10, 5), dtype=np.float32))


def test_keyed_chroma_is_the_same_in_every_key_and_octave(rng):
    from chlib.signal.chroma import keyed_chroma_db

    a = keyed_chroma_db(_tune_cqt(np.random.default_rng(5)))
    up_a_fifth = keyed_chroma_db(_tune_cqt(np.random.default_rng(5), shift=7))
    up_an_octave = keyed_chroma_db(_tune_cqt(np.random.default_rng(5), shift=12))
    assert a.shape == (900, 12) and a.max() <= 0.01 and a.min() >= -60.0
    np.testing.assert_allclose(a, up_a_fifth, atol=1e-4)
    np.testing.assert_allclose(a, up_an_octave, atol=1e-4)
