"""Tiny generated features and training configs for the tuning and production tests.

Tests import it as ``from tiny_tune_data import ...`` (pytest puts ``tests/`` on the path).
The features are not audio: each work has a random [frames, bins] "melody" template and each of
its recordings is that template, circularly shifted in time, plus noise, in dB (max 0). A tiny
model learns to group them within a few epochs, so mAP moves and the curves mean something.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chlib.core.manifest import write_manifest

__all__ = ["make_tiny_dataset", "tiny_config", "N_BINS"]

N_BINS = 24


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


def tiny_config(ds: str | Path, **extra) -> dict:
    """A training config mapping for a 1-block, width-32 model on the tiny dataset.

    Test set ``tiny`` = query = ref = full.txt. ``extra`` keys are merged on top (top level).
    """
    ds = Path(ds)
    cfg = {
        "train_path": str(ds / "train.txt"),
        "val_path": str(ds / "val.txt"),
        "n_bins": N_BINS,
        "input_dim": N_BINS,
        "chunk_frame": [20],
        "mean_size": 1,
        "m_per_class": 2,
        "batch_size": 8,
        "embed_dim": 16,
        "encoder": {"output_dims": 32, "num_blocks": 1, "attention_dim": 32},
        "foc": {"output_dims": "auto"},
        "max_epochs": 3,
        "early_stopping_patience": 2,
        "num_workers": 0,
        "learning_rate": 0.002,
        "min_lr": 0.0001,
        "lr_decay": 0.9,
        "lr_decay_every": 2,
        "log_every_steps": 1,
        "eval_batch_size": 16,
        "device": "cpu",
        "spec_augmentation": {"random_erase": {"prob": 0.0}, "roll_pitch": {"prob": 0.0}},
        "tiny": {"query_path": str(ds / "full.txt"), "ref_path": str(ds / "full.txt")},
    }
    cfg.update(extra)
    return cfg
