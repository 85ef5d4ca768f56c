"""Tests of chlib.retrieval.embed: windows, window preparation, batching, distances and the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import StandIn

from chlib.core.config import HParams
from chlib.core.errors import CheckpointError, ConfigError, FeatureError
from chlib.retrieval.embed import (
    PAD_DB,
    embed_recordings,
    embed_windows,
    prepare_window,
    window_starts,
)
from chlib.retrieval.protocol import track_distances, track_vector


def feats(rng, n_frames, n_bins=12):
    return (rng.random((n_frames, n_bins)) * -80.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# windows


def test_window_starts_drop_reproduces_the_original_rule():
    w = 3375  # 135 s at 25 frames/s
    assert window_starts(7500, w, tail="drop") == [0, 3375]  # 300 s: tail of 30 s lost
    assert window_starts(6750, w, tail="drop") == [0]  # start + window < length, strictly
    assert window_starts(6751, w, tail="drop") == [0, 3375]
    assert window_starts(100, w, tail="drop") == [0]


def test_window_starts_shift_adds_an_end_aligned_window_for_a_long_tail():
    w = 3375
    assert window_starts(6750, w) == [0, 3375]  # exact fit, no tail
    assert window_starts(7500, w) == [0, 3375]  # tail 750 = 0.22 window < 0.25: dropped
    assert window_starts(8000, w) == [0, 3375, 8000 - 3375]  # tail 1250 = 0.37 window
    assert window_starts(8000, w, min_tail=0.5) == [0, 3375]
    assert window_starts(100, w) == [0]


def test_window_starts_pad_continues_the_grid():
    assert window_starts(8000, 3375, tail="pad") == [0, 3375, 6750]
    assert window_starts(25, 10, hop=5, tail="pad") == [0, 5, 10, 15]  # last covers 15..24
    assert window_starts(27, 10, hop=5, tail="pad") == [0, 5, 10, 15]  # tail 2 < 2.5
    assert window_starts(28, 10, hop=5, tail="pad") == [0, 5, 10, 15, 20]


def test_window_starts_with_overlap_cover_the_track():
    starts = window_starts(100, 30, hop=10)
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70]
    assert starts[-1] + 30 == 100


@pytest.mark.parametrize("bad", [{"window": 0}, {"hop": 0}, {"tail": "cut"}, {"min_tail": 2.0}])
def test_window_starts_refuses_bad_settings(bad):
    kw = {"window": 10, **bad}
    window = kw.pop("window")
    with pytest.raises(ConfigError):
        window_starts(100, window, **kw)


def test_prepare_window_slices_pads_and_averages():
    feat = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    out = prepare_window(feat, 6, 6, 2)  # rows 6..9 then 2 padded rows
    assert out.shape == (3, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], (feat[6] + feat[7]) / 2)
    np.testing.assert_allclose(out[1], (feat[8] + feat[9]) / 2)
    np.testing.assert_allclose(out[2], [PAD_DB, PAD_DB])


def test_prepare_window_drops_leftover_frames_like_the_original():
    feat = np.ones((20, 3), dtype=np.float32)
    feat[6] = 99.0  # the 7th frame is a leftover of window 7 with mean_size 3
    out = prepare_window(feat, 0, 7, 3)
    assert out.shape == (2, 3)
    assert np.all(out == 1.0)


def test_prepare_window_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    feat = feats(rng, 50, 5)
    out = prepare_window(feat, 41, 12, 3)
    padded = np.vstack([feat[41:], np.full((3, 5), PAD_DB, np.float32)])
    ref = np.array([padded[3 * k:3 * k + 3].mean(axis=0) for k in range(4)])
    np.testing.assert_allclose(out, ref, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# embedding


def test_embed_windows_batching_does_not_change_results(tmp_path):
    rng = np.random.default_rng(1)
    tracks = [feats(rng, n) for n in (40, 100, 7, 230, 61)]
    model = StandIn()
    one = embed_windows(model, tracks, window=30, mean_size=3, batch_size=1, progress=False)
    many = embed_windows(model, tracks, window=30, mean_size=3, batch_size=64, progress=False)
    for a, b, t in zip(one, many, tracks, strict=True):
        assert a.shape == (len(window_starts(len(t), 30)), 8)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_embed_windows_from_paths_equals_from_arrays_and_each_window_is_the_model_output(tmp_path):
    rng = np.random.default_rng(2)
    tracks = [feats(rng, n) for n in (90, 35)]
    paths = []
    for i, t in enumerate(tracks):
        p = tmp_path / f"t{i}.cqt.npy"
        np.save(p, t)
        paths.append(p)
    model = StandIn()
    a = embed_windows(model, tracks, window=30, mean_size=3, progress=False)
    b = embed_windows(model, [str(p) for p in paths], window=30, mean_size=3, progress=False)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # window 2 of track 0 by hand
    w = prepare_window(tracks[0], 60, 30, 3)
    with torch.no_grad():
        ref = model(torch.from_numpy(w[None])).numpy()[0]
    np.testing.assert_allclose(a[0][2], ref, rtol=1e-5)


def test_embed_windows_restores_the_training_mode_and_uses_eval_mode():
    class ModeSpy(StandIn):
        def forward(self, x):
            assert not self.training
            return super().forward(x)

    model = ModeSpy()
    model.train()
    embed_windows(model, [np.zeros((40, 12), np.float32)], window=30, mean_size=3, progress=False)
    assert model.training


def test_embed_windows_reports_bad_files_and_continues(tmp_path):
    rng = np.random.default_rng(3)
    good = tmp_path / "good.npy"
    np.save(good, feats(rng, 50))
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"not numpy")
    wrong_bins = tmp_path / "bins.npy"
    np.save(wrong_bins, feats(rng, 50, n_bins=5))
    nan = feats(rng, 50)
    nan[3, 3] = np.nan
    inputs = [good, tmp_path / "missing.npy", corrupt, wrong_bins, nan, good]
    failures: list = []
    out = embed_windows(StandIn(), inputs, window=30, mean_size=3, n_bins=12, progress=False,
                       failures=failures)
    assert [o is None for o in out] == [False, True, True, True, True, False]
    assert [f["index"] for f in failures] == [1, 2, 3, 4]
    assert "not found" in failures[0]["reason"]
    assert "bins" in failures[2]["reason"] and "NaN" in failures[3]["reason"]
    with pytest.raises(FeatureError, match="missing.npy"):
        embed_windows(StandIn(), inputs, window=30, mean_size=3, progress=False)


def test_embed_windows_refuses_pickled_npy(tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FeatureError, match="obj.npy"):
        embed_windows(StandIn(), [p], window=30, mean_size=3, progress=False)


def test_embed_windows_hp_uses_the_first_chunk_length():
    hp = HParams.from_dict({"chunk_frame": [20, 15], "mean_size": 2, "n_bins": 12,
                            "input_dim": 12})
    t = np.zeros((100, 12), np.float32)
    out = embed_recordings(StandIn(), [t], hp, progress=False)
    assert out[0].shape[0] == len(window_starts(100, 40))


# --------------------------------------------------------------------------------------------
# distances


def brute_distances(qs, rs, rule):
    def unit(x):
        return x / np.linalg.norm(x)

    out = np.zeros((len(qs), len(rs)))
    for i, q in enumerate(qs):
        for j, r in enumerate(rs):
            if rule == "min":
                out[i, j] = min(1 - np.dot(unit(a), unit(b)) for a in q for b in r)
            else:  # cosine distance of the unit means of unit windows
                mq = unit(np.mean([unit(a) for a in q], axis=0))
                mr = unit(np.mean([unit(b) for b in r], axis=0))
                out[i, j] = 1 - np.dot(mq, mr)
    return out


@pytest.mark.parametrize("rule", ["min", "mean"])
@pytest.mark.parametrize("block_elements", [1, 50, 1 << 25])
def test_track_distances_equal_a_double_loop(rule, block_elements):
    rng = np.random.default_rng(4)
    qs = [rng.normal(size=(n, 6)) for n in (1, 3, 2, 4)]
    rs = [rng.normal(size=(n, 6)) for n in (2, 1, 5)]
    got = track_distances(qs, rs, rule=rule, block_elements=block_elements)
    assert got.shape == (4, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, brute_distances(qs, rs, rule), atol=1e-5)


def test_track_distances_refuse_an_unknown_rule():
    with pytest.raises(ConfigError, match="distance rule"):
        track_distances([np.ones((1, 2))], [np.ones((1, 2))], rule="avg")


def test_track_distance_to_itself_is_zero_and_in_range():
    rng = np.random.default_rng(5)
    ts = [rng.normal(size=(3, 16)) for _ in range(5)]
    d = track_distances(ts, ts, rule="min")
    assert np.allclose(np.diag(d), 0.0, atol=1e-5)
    assert d.min() >= 0.0 and d.max() <= 2.0


def test_track_vector_is_the_renormalised_mean_of_unit_windows():
    w = np.array([[3.0, 0.0], [0.0, 0.5]])
    e = track_vector(w)
    np.testing.assert_allclose(e, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    assert track_vector(np.array([[1.0, 0.0], [-2.0, 0.0]])).tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------
# cache


def small_hp(**over):
    d = {"chunk_frame": [15], "mean_size": 2, "n_bins": 12, "input_dim": 12}
    d.update(over)
    return HParams.from_dict(d)


def write_tracks(tmp_path, rng, lengths):
    paths = []
    for i, n in enumerate(lengths):
        p = tmp_path / "feat" / f"t{i}.npy"
        p.parent.mkdir(exist_ok=True)
        np.save(p, feats(rng, n))
        paths.append(p)
    return paths


def test_cache_reuses_embeddings_for_the_same_model_and_settings(tmp_path):
    rng = np.random.default_rng(6)
    paths = write_tracks(tmp_path, rng, (40, 75))
    hp = small_hp()
    model = StandIn()
    a = embed_recordings(model, paths, hp, cache_dir=tmp_path / "cache", progress=False)
    calls = model.calls
    b = embed_recordings(model, paths, hp, cache_dir=tmp_path / "cache", progress=False)
    assert model.calls == calls  # nothing recomputed
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    direct = embed_recordings(model, paths, hp, progress=False)
    for x, y in zip(a, direct, strict=True):
        np.testing.assert_array_equal(x, y)
    for f in (tmp_path / "cache").rglob("*.npy"):
        np.load(f, allow_pickle=False)  # plain arrays, never pickles


def test_cache_never_reuses_after_a_model_setting_or_file_change(tmp_path):
    rng = np.random.default_rng(7)
    paths = write_tracks(tmp_path, rng, (40, 75))
    cache = tmp_path / "cache"
    hp = small_hp()
    model = StandIn(seed=0)
    base = embed_recordings(model, paths, hp, cache_dir=cache, progress=False)

    # changed weights -> other fingerprint -> recomputed, different values
    with torch.no_grad():
        model.proj.mul_(2.0)
    calls = model.calls
    new = embed_recordings(model, paths, hp, cache_dir=cache, progress=False)
    assert model.calls > calls
    np.testing.assert_allclose(new[0], 2 * base[0], rtol=1e-5)

    # changed window recipe -> recomputed, other shape
    calls = model.calls
    other = embed_recordings(model, paths, small_hp(mean_size=3), cache_dir=cache, progress=False)
    assert model.calls > calls
    assert other[1].shape[0] != new[1].shape[0] or not np.allclose(other[1], new[1])

    # changed feature setting (same window) -> recomputed
    calls = model.calls
    embed_recordings(model, paths, small_hp(fmin=40.0), cache_dir=cache, progress=False)
    assert model.calls > calls

    # changed feature file content -> recomputed for that file only
    np.save(paths[0], feats(rng, 90))
    os.utime(paths[0], ns=(1, 1))
    calls = model.calls
    again = embed_recordings(model, paths, hp, cache_dir=cache, progress=False)
    assert model.calls == calls + 1  # one batch, track 0 only
    assert again[0].shape[0] == len(window_starts(90, 30))
    np.testing.assert_array_equal(again[1], new[1])


def test_cache_refuses_a_fingerprint_that_is_not_the_models(tmp_path):
    rng = np.random.default_rng(8)
    paths = write_tracks(tmp_path, rng, (40,))
    with pytest.raises(CheckpointError, match="0123456789abcdef"):
        embed_recordings(StandIn(), paths, small_hp(), cache_dir=tmp_path / "c",
                         fingerprint="0123456789abcdef", progress=False)


def test_cache_reports_missing_files_when_asked(tmp_path):
    rng = np.random.default_rng(9)
    paths = write_tracks(tmp_path, rng, (40,))
    failures: list = []
    out = embed_recordings(StandIn(), [tmp_path / "nope.npy", paths[0]], small_hp(),
                           cache_dir=tmp_path / "c", progress=False, failures=failures)
    assert out[0] is None and out[1] is not None
    assert failures[0]["index"] == 0 and "not found" in failures[0]["reason"]
