"""Training chunks: shapes, padding, mean_size averaging, crop positions, memory maps, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_toy_dataset
from torch.utils.data import DataLoader

from chlib.core.config import RandomEraseConfig, SpecAugConfig
from chlib.core.errors import ConfigError, FeatureError
from chlib.core.io import atomic_save_npy
from chlib.core.manifest import FULL_KEYS, read_manifest
from chlib.data.dataset import ChunkDataset, find_missing_features
from chlib.data.features import load_feature, prepare_window
from chlib.data.sampler import MPerClassBatchSampler


def _ramp_record(tmp_path, n_frames: int, n_bins: int = 4, feat_len: int | None = None) -> dict:
    """A track whose frame i holds the value -i in every bin (so a crop reveals its start)."""
    feat = -np.repeat(np.arange(n_frames, dtype=np.float32)[:, None], n_bins, axis=1)
    path = tmp_path / f"ramp{n_frames}.npy"
    atomic_save_npy(path, feat)
    return {"perf": f"r{n_frames}", "work": "w", "work_id": 0, "feat": str(path),
            "feat_len": n_frames if feat_len is None else feat_len}


def test_toy_dataset_items_have_the_model_shape(tmp_path):
    full = write_toy_dataset(tmp_path, n_works=3, n_perfs=2)
    recs = read_manifest(full, FULL_KEYS)
    ds = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0)
    x, y = ds[0]
    assert x.shape == (15, 96) and x.dtype == torch.float32 and y == recs[0]["work_id"]


def test_keyed_chroma_items_have_12_bins_and_ignore_transposition(tmp_path):
    full = write_toy_dataset(tmp_path, n_works=3, n_perfs=2)
    recs = read_manifest(full, FULL_KEYS)
    ds = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0, transform="keyed_chroma")
    x, _ = ds[0]
    assert x.shape == (15, 12) and float(x.max()) <= 0.01
    feat = np.asarray(load_feature(ds.paths[0]))[:45]
    up = np.full_like(feat, -100.0)
    up[:, 5:] = feat[:, :-5]  # five semitones up
    a = prepare_window(feat, 0, 45, 3, transform="keyed_chroma")
    b = prepare_window(up, 0, 45, 3, transform="keyed_chroma")
    assert np.abs(a - b).max() < 2.0  # dB; only the five lost top bins differ, a little
    with pytest.raises(ConfigError, match="input_transform"):
        prepare_window(feat, 0, 45, 3, transform="chroma")


def test_short_track_is_padded_with_minus_100_at_the_end(tmp_path):
    rec = _ramp_record(tmp_path, 10)
    ds = ChunkDataset([rec], chunk_len=24, mean_size=2, mode="random")
    x, _ = ds[0]
    assert x.shape == (12, 4)
    np.testing.assert_allclose(x[:5, 0], [-0.5, -2.5, -4.5, -6.5, -8.5])  # mean of frame pairs
    assert torch.all(x[5:] == -100.0)


def test_mean_size_averages_groups_and_drops_leftover_frames(tmp_path):
    rec = _ramp_record(tmp_path, 100)
    ds = ChunkDataset([{**rec, "start": 7}], chunk_len=10, mean_size=3, mode="defined")
    x, _ = ds[0]
    assert x.shape == (3, 4)  # 10 // 3; the 10th frame is dropped
    np.testing.assert_allclose(x[:, 0], [-8.0, -11.0, -14.0])  # frames 7-9, 10-12, 13-15


def test_random_start_covers_the_true_length_not_the_manifest_estimate(tmp_path):
    # feat_len in the manifest says 50 (like the original's size estimate); the array has 100 rows
    rec = _ramp_record(tmp_path, 100, feat_len=50)
    ds = ChunkDataset([rec], chunk_len=20, mean_size=1, mode="random")
    starts = {int(-ds[(0, s)][0][0, 0]) for s in range(400)}
    assert min(starts) == 0 and max(starts) == 80  # every start in [0, 100 - 20] is possible
    assert len(starts) > 60


def test_int_index_gives_a_fixed_crop_and_seeded_index_varies(tmp_path):
    rec = _ramp_record(tmp_path, 200)
    ds = ChunkDataset([rec], chunk_len=20, mean_size=1, seed=5)
    assert torch.equal(ds[0][0], ds[0][0])
    assert not torch.equal(ds[(0, 1)][0], ds[(0, 2)][0])
    assert torch.equal(ds[(0, 9)][0], ds[(0, 9)][0])
    other = ChunkDataset([rec], chunk_len=20, mean_size=1, seed=6)
    assert not torch.equal(ds[0][0], other[0][0])


def test_features_are_memory_mapped(tmp_path):
    rec = _ramp_record(tmp_path, 30)
    arr = load_feature(rec["feat"])
    assert isinstance(arr, np.memmap) and not arr.flags.writeable


def test_tempo_jitter_keeps_the_shape_and_changes_the_crop(tmp_path):
    rec = _ramp_record(tmp_path, 400)
    ds = ChunkDataset([rec], chunk_len=60, mean_size=3, tempo_jitter=0.2)
    spans = set()
    for s in range(30):
        x = ds[(0, s)][0]
        assert x.shape == (20, 4)
        spans.add(round(float(x[0, 0] - x[-1, 0]), 3))  # a ramp: span grows with the factor
    assert len(spans) > 5


def test_augmentation_applies_to_training_items(tmp_path):
    full = write_toy_dataset(tmp_path, n_works=2, n_perfs=2)
    recs = read_manifest(full, FULL_KEYS)
    aug = SpecAugConfig(random_erase=RandomEraseConfig(prob=1.0, erase_num=2))
    plain = ChunkDataset(recs, chunk_len=30, seed=0)
    erased = ChunkDataset(recs, chunk_len=30, seed=0, spec_aug=aug)
    a, b = plain[(1, 77)][0], erased[(1, 77)][0]
    changed = (a != b).sum().item()
    assert changed >= int(30 * 0.25) * int(96 * 0.1)


def test_loader_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    full = write_toy_dataset(tmp_path, n_works=4, n_perfs=3)
    recs = read_manifest(full, FULL_KEYS)
    ds = ChunkDataset(recs, chunk_len=24, mean_size=2, seed=0)
    labels = [r["work_id"] for r in recs]
    out = []
    for nw in (0, 1):
        sampler = MPerClassBatchSampler(labels, m=2, batch_size=4, seed=1)
        sampler.set_epoch(0)
        out.append([(x.clone(), y.clone()) for x, y in DataLoader(ds, batch_sampler=sampler,
                                                                   num_workers=nw)])
    assert len(out[0]) == len(out[1]) == 2
    for (xa, ya), (xb, yb) in zip(*out, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 12, 96)


def test_missing_and_corrupt_features_are_reported(tmp_path):
    rec = _ramp_record(tmp_path, 10)
    gone = {**rec, "perf": "gone", "feat": str(tmp_path / "nope.npy")}
    assert find_missing_features([rec, gone]) == [gone["feat"]]
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(FeatureError, match="bad.npy"):
        load_feature(bad)
    ds = ChunkDataset([gone], chunk_len=10)
    with pytest.raises(FeatureError, match="nope.npy"):
        ds[0]


def test_timbre_eq_changes_training_crops_but_not_their_shape(tmp_path):
    full = write_toy_dataset(tmp_path, n_works=3, n_perfs=2)
    recs = read_manifest(full, FULL_KEYS)
    plain = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0)
    eq = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0, timbre_eq_db=20.0)
    a, b = plain[(0, 7)][0], eq[(0, 7)][0]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_accompaniment_changes_the_share_of_crops_it_is_asked_to(tmp_path):
    full = write_toy_dataset(tmp_path, n_works=3, n_perfs=2)
    recs = read_manifest(full, FULL_KEYS)
    plain = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0)
    always = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0, accompaniment_prob=1.0)
    never = ChunkDataset(recs, chunk_len=45, mean_size=3, seed=0, accompaniment_prob=0.0)
    keys = [(i % len(recs), 100 + i) for i in range(12)]
    assert all(not torch.allclose(plain[k][0], always[k][0]) for k in keys)
    assert all(torch.equal(plain[k][0], never[k][0]) for k in keys)
    assert all(plain[k][0].shape == always[k][0].shape for k in keys)
    with pytest.raises(ConfigError, match="accompaniment_prob"):
        ChunkDataset(recs, chunk_len=45, accompaniment_prob=1.5)
