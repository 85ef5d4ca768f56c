"""Shared test helpers: test signals, a stand-in model, tiny feature datasets and configs.

Tests import them as ``from helpers import ...`` (pytest puts ``tests/`` on the path). Two
feature sets, neither audio: :func:`write_toy_dataset` (a fixed spectral envelope per work: any
crop identifies its work) and :func:`make_tiny_dataset` (a random "melody" template per work,
circularly shifted per recording: a tiny model learns to group them within a few epochs, so mAP
moves and training curves mean something), with :func:`tiny_config` to train on the latter.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import ipywidgets
import numpy as np
import soundfile as sf
import torch
from torch import nn

from chlib.core.io import atomic_save_npy
from chlib.core.manifest import write_manifest

__all__ = ["tone", "sine", "write_tone", "StandIn", "write_toy_dataset", "make_tiny_dataset",
           "tiny_config", "N_BINS", "TINY_MODEL"]

N_BINS = 24  # feature bins of make_tiny_dataset and tiny_config
# a 1-block, width-32 network (config keys), for training tests on 96-bin toy features
TINY_MODEL = {"encoder": {"output_dims": 32, "num_blocks": 1, "attention_dim": 64}, "embed_dim": 16}


def tone(seconds: float, *, sample_rate: int = 16000, freqs: tuple[float, ...] = (220.0, 330.0),
         channels: int = 1, amplitude: float = 0.4, noise: float = 0.01,
         seed: int = 0) -> np.ndarray:
    """A sum of sines plus a little noise: float32 [samples] or [samples, channels]."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    y = sum(np.sin(2 * np.pi * f * t) for f in freqs) / max(1, len(freqs))
    if noise:
        y = y + noise * np.random.default_rng(seed).standard_normal(n)
    y = (amplitude * y).astype(np.float32)
    if channels > 1:
        y = np.stack([y * (1.0 - 0.1 * c) for c in range(channels)], axis=1)
    return y


def sine(freq: float, seconds: float = 2.0, sr: int = 16000, amp: float = 0.5) -> np.ndarray:
    """A pure sine, float32 [samples]."""
    return tone(seconds, sample_rate=sr, freqs=(freq,), amplitude=amp, noise=0.0)


def write_tone(path: str | Path, seconds: float = 2.0, *, sample_rate: int = 16000,
               subtype: str | None = None, **tone_args) -> Path:
    """Write a :func:`tone` file; the format follows the suffix (.wav, .flac, .ogg, .mp3)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, sample_rate=sample_rate, **tone_args), sample_rate,
             subtype=subtype)
    return path


class StandIn(nn.Module):
    """Tiny deterministic stand-in for CoverHunterNet: [B, T, F] -> [B, D], counting its calls.

    The embedding is (mean and std over time) @ a random projection, divided by ``scale``;
    ``centre`` first removes each input's overall mean (so the level of a recording is ignored).
    """

    def __init__(self, n_bins: int = 12, dim: int = 8, seed: int = 0, *, centre: bool = False,
                 scale: float = 50.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(2 * n_bins, dim, generator=g))
        self.centre, self.scale, self.calls = centre, scale, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.centre:
            x = x - x.mean(dim=(1, 2), keepdim=True)
        return torch.cat([x.mean(dim=1), x.std(dim=1)], dim=1) @ self.proj / self.scale


def write_toy_dataset(
    out_dir: str | os.PathLike,
    *,
    n_works: int = 6,
    n_perfs: int = 4,
    frames: tuple[int, int] = (30, 60),
    n_bins: int = 96,
    noise_db: float = 6.0,
    seed: int = 0,
) -> Path:
    """Write synthetic features and their ``full.txt`` (absolute feat paths); returns its path.

    Work w has a fixed spectral envelope (a few bins at -10 dB over a -80 dB floor); each of its
    ``n_perfs`` recordings is that envelope plus Gaussian noise (``noise_db``), ``frames`` =
    (min, max) rows long, clipped to <= 0 dB. Any crop identifies its work. Not music.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    recs = []
    for w in range(n_works):
        env = np.full(n_bins, -80.0, dtype=np.float32)
        env[rng.choice(n_bins, size=max(1, n_bins // 12), replace=False)] = -10.0
        for p in range(n_perfs):
            n = int(rng.integers(frames[0], frames[1] + 1))
            feat = env[None, :] + rng.normal(0.0, noise_db, size=(n, n_bins)).astype(np.float32)
            feat = np.minimum(feat, 0.0).astype(np.float32)
            perf = f"toy_w{w:03d}_p{p:02d}"
            path = (out / "cqt_feat" / f"{perf}.cqt.npy").resolve()
            atomic_save_npy(path, feat)
            recs.append({"perf": perf, "work": f"work{w:03d}", "work_id": w, "feat": str(path),
                         "feat_len": n, "dur_s": n / 25.0})
    write_manifest(out / "full.txt", recs)
    return out / "full.txt"


def make_tiny_dataset(root: str | Path, *, n_works: int = 6, n_recs: int = 4, frames: int = 60,
                      seed: int = 0) -> Path:
    """Write ``<root>/tiny/`` with cqt_feat/*.npy, full.txt, train.txt, val.txt and test.txt.

    train/val/test: recordings 0-1 / 2 / 3 of every work (grouped by recording). Returns the
    dataset folder.
    """
    ds = Path(root) / "tiny"
    (ds / "cqt_feat").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    for w in range(n_works):
        template = rng.normal(0.0, 1.0, size=(frames, N_BINS))
        for r in range(n_recs):
            shift = int(rng.integers(frames))
            x = np.roll(template, shift, axis=0) + rng.normal(0.0, 0.5, size=template.shape)
            x = (x - x.max()) * 10.0
            perf = f"w{w}_r{r}"
            path = ds / "cqt_feat" / f"{perf}.cqt.npy"
            np.save(path, x.astype(np.float32))
            recs.append({"perf": perf, "wav": f"audio/{perf}.wav", "work": f"work{w}", "work_id": w,
                         "feat": str(path),
                         "feat_len": frames, "dur_s": frames / 25.0, "rec": r})
    strip = [{k: v for k, v in r.items() if k != "rec"} for r in recs]
    write_manifest(ds / "full.txt", strip)
    write_manifest(ds / "train.txt", [s for s, r in zip(strip, recs, strict=True) if r["rec"] < 2])
    write_manifest(ds / "val.txt", [s for s, r in zip(strip, recs, strict=True) if r["rec"] == 2])
    write_manifest(ds / "test.txt", [s for s, r in zip(strip, recs, strict=True) if r["rec"] == 3])
    return ds


def tiny_config(ds: str | Path | None = None, **extra) -> dict:
    """A training config mapping for a 1-block, width-32 model on ``N_BINS``-bin features;
    ``extra`` keys are merged on top (top level). With ``ds`` (a :func:`make_tiny_dataset`
    folder) it trains on its train/val split, with test set ``tiny`` = query = ref = full.txt."""
    cfg = {
        "n_bins": N_BINS, "input_dim": N_BINS, "chunk_frame": [20], "mean_size": 1,
        "m_per_class": 2, "batch_size": 8, "embed_dim": 16,
        "encoder": {"output_dims": 32, "num_blocks": 1, "attention_dim": 32},
        "foc": {"output_dims": "auto"}, "max_epochs": 3, "early_stopping_patience": 2,
        "num_workers": 0, "learning_rate": 0.002, "min_lr": 0.0001, "lr_decay": 0.9,
        "lr_decay_every": 2, "log_every_steps": 1, "eval_batch_size": 16, "device": "cpu",
        "spec_augmentation": {"random_erase": {"prob": 0.0}, "roll_pitch": {"prob": 0.0}},
    }
    if ds is not None:
        ds = Path(ds)
        cfg.update(train_path=str(ds / "train.txt"), val_path=str(ds / "val.txt"),
                   tiny={"query_path": str(ds / "full.txt"), "ref_path": str(ds / "full.txt")})
    return {**cfg, **extra}


def fake_upload(upload, name: str, data: bytes) -> None:
    """What the browser does to a FileUpload when a file is chosen, in ipywidgets 8 or 7 (the
    one Colab ships), so the same tests run against both."""
    if ipywidgets.__version__.startswith("7."):
        upload.metadata = [{"name": name, "type": "audio/wav", "size": len(data),
                            "lastModified": 0}]
        upload.data = [data]
        upload._counter += 1
    else:
        upload.value = ({"name": name, "type": "audio/wav", "size": len(data),
                         "content": memoryview(data),
                         "last_modified": datetime.datetime(2024, 1, 1)},)
