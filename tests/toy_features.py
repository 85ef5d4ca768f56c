"""A tiny, learnable synthetic feature set for tests (moved out of chlib.data.dataset)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chlib.core.io import atomic_save_npy
from chlib.core.manifest import write_manifest


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
