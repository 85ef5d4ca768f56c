"""Training throughput on this machine: chlib's data pipeline vs plain tensors.

What is measured (CPU unless --device says otherwise):

* model: the DEFAULT architecture (``ModelConfig()``: 6 conformer blocks, width 128, embed 128)
  with a 1000-class focal head (instead of 30000: the head size barely changes the step time and
  1000 is closer to real work counts), triplet loss on, AdamW, grad clip 1.0;
* batch 32 chunks of 1125 model frames (= 3375 raw CQT frames with mean_size 3, 135 s) x 96 bins,
  4 works x m 8 per batch;
* "pipeline": chlib's path: :class:`chlib.data.dataset.ChunkDataset` over memory-mapped ``.npy``
  features in a temporary folder (64 tracks of 4000 frames), spectral augmentation as the
  original recipe (erase 0.5, roll 0.5), :class:`chlib.data.sampler.MPerClassBatchSampler`,
  a DataLoader with ``--workers`` worker processes (1 = the recipe default);
* "plain": the same forward + backward + optimizer step on pre-made tensors of the same shapes;
* the loader's own speed (no model), and the time the training loop waited for data, as a
  percentage of the step time (target < 10%); peak RSS of this process and of its workers.

One warm-up step (pipeline), then ``--steps`` timed steps of each kind. On 2 CPU cores a step takes about
20 s, so the default run takes about 2 minutes. Usage::

    python bench/bench_train.py [--steps 2] [--workers 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from chlib.core.config import ModelConfig, RandomEraseConfig, RollPitchConfig, SpecAugConfig
from chlib.core.device import pick_device, synchronize
from chlib.core.io import atomic_save_npy
from chlib.data.dataset import ChunkDataset, worker_init
from chlib.data.sampler import MPerClassBatchSampler
from chlib.model import CoverHunterNet

BATCH, M, CHUNK_FRAMES, MEAN_SIZE, BINS, CLASSES = 32, 8, 1125, 3, 96, 1000
N_WORKS, N_PERFS, TRACK_FRAMES = 16, 4, 4000


def _peak_rss_mb(who: int) -> float:
    kb = resource.getrusage(who).ru_maxrss
    return kb / 1024 / 1024 if sys.platform == "darwin" else kb / 1024  # macOS reports bytes


def _write_features(folder: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for w in range(N_WORKS):
        for p in range(N_PERFS):
            path = folder / f"w{w}_p{p}.npy"
            atomic_save_npy(path, (-80 * rng.random((TRACK_FRAMES, BINS))).astype(np.float32))
            recs.append({"perf": path.stem, "work": str(w), "work_id": w, "feat": str(path),
                         "feat_len": TRACK_FRAMES})
    return recs


def _step(model, opt, x, y) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    total, _ = model.compute_loss(x, y)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    synchronize(x.device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps of each kind (default 2)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = CoverHunterNet(replace(ModelConfig(), num_classes=CLASSES)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99), weight_decay=0.01)
    chunk_len = CHUNK_FRAMES * MEAN_SIZE
    aug = SpecAugConfig(RandomEraseConfig(prob=0.5), RollPitchConfig(prob=0.5))
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {BATCH} x "
          f"{CHUNK_FRAMES} frames x {BINS} bins, default model + {CLASSES}-class head "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

    with tempfile.TemporaryDirectory() as tmp:
        recs = _write_features(Path(tmp))
        ds = ChunkDataset(recs, chunk_len=chunk_len, mean_size=MEAN_SIZE, spec_aug=aug, seed=0)
        sampler = MPerClassBatchSampler([r["work_id"] for r in recs], m=M, batch_size=BATCH, seed=0)

        def loader(workers: int) -> DataLoader:
            kw = {"worker_init_fn": worker_init} if workers else {}
            return DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                              pin_memory=device.type == "cuda", **kw)

        # 1. the loader alone, in this process
        t = time.perf_counter()
        n = 0
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for x, _ in loader(0):
                n += len(x)
        load_rate = n / (time.perf_counter() - t)

        # 2. steps fed by the pipeline; the first one (worker start-up, model warm-up) untimed
        sampler.set_epoch(10)
        it = iter(loader(args.workers))
        waits, steps = [], []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            wait = time.perf_counter() - t
            step = _step(model, opt, x, y)
            if i > 0:
                waits.append(wait)
                steps.append(step)

        # 3. the same steps on pre-made tensors of the same shapes
        x0 = torch.randn(BATCH, CHUNK_FRAMES, BINS, device=device) * 20 - 60
        y0 = (torch.arange(BATCH, device=device) // M)
        plain = [_step(model, opt, x0, y0) for _ in range(args.steps)]
        del it

    plain_s, step_s, wait_s = float(np.mean(plain)), float(np.mean(steps)), float(np.mean(waits))
    print(f"loader alone (0 workers):       {load_rate:8.1f} chunks/s")
    print(f"plain step (pre-made tensors):  {BATCH / plain_s:8.2f} chunks/s  ({plain_s:.2f} s/step)")
    print(f"pipeline step ({args.workers} worker(s)):     {BATCH / (step_s + wait_s):8.2f} chunks/s  "
          f"({step_s + wait_s:.2f} s/step, of which {wait_s:.3f} s waiting for data)")
    print(f"loader overhead: {100 * wait_s / plain_s:.2f}% of the plain step time spent waiting for "
          f"data (target < 10%); making a batch costs {BATCH / load_rate:.2f} s of CPU = "
          f"{100 * BATCH / load_rate / plain_s:.1f}% of a step, taken from the step when the "
          "cores are all busy")
    print(f"peak RSS: {_peak_rss_mb(resource.RUSAGE_SELF):.0f} MB (this process), "
          f"{_peak_rss_mb(resource.RUSAGE_CHILDREN):.0f} MB (largest worker)")


if __name__ == "__main__":
    main()
