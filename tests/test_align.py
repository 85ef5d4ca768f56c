"""Coarse-to-fine training (issue 12): aligned passages mined between versions of a work, the
sampler's shared group seeds, chunks cut at the aligned starts, and a run trained with them."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from helpers import N_BINS, make_tiny_dataset, tiny_config
from helpers import StandIn as _StandIn

from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError
from chlib.core.manifest import read_manifest
from chlib.data.dataset import ChunkDataset
from chlib.data.sampler import MPerClassBatchSampler
from chlib.train.align import aligned_groups, mine_alignments, read_alignments, write_alignments
from chlib.train.loop import train

StandIn = partial(_StandIn, n_bins=N_BINS, dim=16, centre=False, scale=1.0)


class Flat(torch.nn.Module):
    """A stand-in that sees where things are in a window: its frames, flattened, projected."""

    def __init__(self, frames: int = 20, dim: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(frames * N_BINS, dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1) @ self.proj


def _versions(root, n_works: int = 3, n_recs: int = 3, frames: int = 120) -> list[dict]:
    """Versions of a work: one smooth template (frames vary slowly), each rolled by a multiple
    of 5 frames (so a 5-frame hop can land on the same passage), plus noise."""
    rng = np.random.default_rng(0)
    recs = []
    for w in range(n_works):
        steps = rng.normal(size=(frames + 10, N_BINS))
        template = np.stack([steps[i:i + 10].mean(axis=0) for i in range(frames)])
        for r in range(n_recs):
            x = np.roll(template, 5 * int(rng.integers(frames // 5)), axis=0)
            x = x + 0.1 * rng.normal(size=x.shape)
            path = root / f"w{w}_r{r}.npy"
            np.save(path, x.astype(np.float32))
            recs.append({"perf": f"w{w}_r{r}", "work": f"work{w}", "work_id": w,
                         "feat": str(path)})
    return recs


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_mined_groups_pair_the_same_passage_of_two_versions(tmp_path):
    recs = _versions(tmp_path)
    hp = HParams.from_dict(tiny_config())  # chunk_frame [20], mean_size 1: 20-frame windows
    al = mine_alignments(Flat(), recs, hp, hop=5, min_similarity=0.5)
    assert al["window"] == 20 and al["groups"]
    by_perf = {r["perf"]: np.load(r["feat"]) for r in recs}
    same, other = [], []
    rng = np.random.default_rng(0)
    for g in al["groups"]:
        (pa, sa), (pb, sb) = list(g["starts"].items())[:2]
        assert pa.split("_")[0] == pb.split("_")[0] == g["work"].replace("work", "w")
        a, b = by_perf[pa][sa:sa + 20], by_perf[pb][sb:sb + 20]
        same.append(_corr(a, b))
        rb = int(rng.integers(0, len(by_perf[pb]) - 20))
        other.append(_corr(a, by_perf[pb][rb:rb + 20]))
    # the aligned windows hold the same passage, random windows of the other version do not
    assert np.median(same) > 0.9 and np.median(same) > np.median(other) + 0.5
    assert len(al["groups"]) >= 3 * 10  # most of each pivot's 21 windows found a partner


def test_alignments_file_round_trip_and_refusals(tmp_path):
    ds = make_tiny_dataset(tmp_path)
    recs = read_manifest(ds / "train.txt")
    al = mine_alignments(StandIn(), recs, HParams.from_dict(tiny_config(ds)), hop=5,
                         min_similarity=0.5)
    path = write_alignments(tmp_path / "al.json", al)
    assert read_alignments(path) == al
    groups = aligned_groups(al, recs)
    assert groups and all(len(g) >= 2 for gs in groups.values() for g in gs)
    assert all(recs[i]["work_id"] == w for w, gs in groups.items() for g in gs for i in g)
    assert aligned_groups(al, recs[:1]) == {}  # groups need two of the records given
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "groups": [{"work": "w", "starts": {"a": -3}}]}))
    with pytest.raises(ConfigError, match="bad.json: group 0"):
        read_alignments(bad)
    with pytest.raises(ConfigError, match="hop"):
        mine_alignments(StandIn(), recs, HParams.from_dict(tiny_config(ds)), hop=0)


def test_group_seeds_are_shared_by_a_works_items_and_leave_the_plain_batches_alone():
    labels = [w for w in range(6) for _ in range(3)]
    plain = MPerClassBatchSampler(labels, m=2, batch_size=4, seed=3).epoch_batches(1)
    grouped = MPerClassBatchSampler(labels, m=2, batch_size=4, seed=3,
                                    group_seeds=True).epoch_batches(1)
    assert [[t[:2] for t in b] for b in grouped] == plain  # same items, same item seeds
    for batch in grouped:
        for a in range(0, len(batch), 2):
            w = {labels[i] for i, _, _ in batch[a:a + 2]}
            assert len(w) == 1 and batch[a][2] == batch[a + 1][2]
        assert batch[0][2] != batch[2][2]


def test_chunks_are_cut_at_the_aligned_start(tmp_path):
    feats = []
    for k in range(2):
        f = tmp_path / f"f{k}.npy"
        np.save(f, np.repeat(np.arange(100, dtype=np.float32)[:, None], 4, axis=1))  # row = frame
        feats.append({"perf": f"p{k}", "work": "w", "work_id": 0, "feat": str(f)})
    groups = {0: [{0: 10, 1: 40}, {0: 70, 1: 5}]}
    ds = ChunkDataset(feats, chunk_len=20, aligned=groups)
    for seed in range(4):
        g = groups[0][seed % 2]
        for i in (0, 1):
            x, _ = ds[(i, 123 + seed, seed)]
            assert float(x[0, 0]) == min(g[i], 80)  # the chunk starts at the group's frame
    starts = {float(ds[(0, s)][0][0, 0]) for s in range(20)}  # no group seed: random starts
    assert len(starts) > 5


def test_a_run_trains_with_aligned_chunks(tmp_path, monkeypatch, one_torch_thread):
    ds = make_tiny_dataset(tmp_path)
    recs = read_manifest(ds / "train.txt")
    hp = HParams.from_dict(tiny_config(ds))
    al_path = write_alignments(tmp_path / "al.json",
                               mine_alignments(StandIn(), recs, hp, hop=5, min_similarity=0.5))
    seen = []
    real = ChunkDataset._aligned_start

    def spy(self, idx, group_seed):
        out = real(self, idx, group_seed)
        seen.append((group_seed is not None, out))
        return out

    monkeypatch.setattr(ChunkDataset, "_aligned_start", spy)
    run = tmp_path / "run"
    save_hparams(HParams.from_dict(tiny_config(ds, max_epochs=1, align_path=str(al_path))),
                 run / "config" / "hparams.yaml")
    result = train(run, device="cpu", max_epochs=1, progress=False)
    assert result.epochs_done == 1
    train_items = [s for s in seen if s[0]]  # training items carry a group seed
    assert train_items and sum(s[1] is not None for s in train_items) >= len(train_items) // 2
