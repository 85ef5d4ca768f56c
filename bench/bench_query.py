"""Query latency of identify and index build throughput, on CPU.

1. One 4-minute query file (44.1 kHz stereo WAV, synthetic) to a top-10 list against 100,000
   synthetic reference embeddings (random unit vectors), with the default CoverHunter
   architecture (random weights) and the nnAudio CQT: time per stage (decode, features, model,
   search). Targets: total < 2 s, search < 50 ms.
2. Search alone: one query vector against the 100,000 references (exact numpy top-10).
3. Index build throughput (recordings per second) with a small model over 4-minute feature files.

Run: ``.venv/bin/python bench/bench_query.py`` (about a minute on 2 cores; ``--threads N`` sets
torch's CPU threads, ``--refs N`` the index size).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from chlib.core.config import HParams, ModelConfig
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import window_settings
from chlib.retrieval.identify import identify
from chlib.retrieval.index import (
    ReferenceIndex,
    build_index,
    calibrate_distances,
    compute_centroids,
)

TARGET_TOTAL_S = 2.0
TARGET_SEARCH_S = 0.050


def synthetic_song(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Stereo float32 [samples, 2]: random notes with harmonics plus a little noise."""
    n_note = int(0.25 * sr)
    t = np.arange(n_note) / sr
    env = np.minimum(1.0, 40 * t) * np.exp(-4 * t)
    notes = 110.0 * 2 ** (rng.integers(0, 36, size=int(seconds / 0.25)) / 12)
    mono = np.concatenate([env * sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3, 4))
                           for f in notes])
    mono = 0.2 * mono + 0.01 * rng.normal(size=mono.size)
    return np.stack([mono, 0.9 * mono], axis=1).astype(np.float32)


def random_index(n_refs: int, dim: int, fingerprint: str, hp: HParams,
                 rng: np.random.Generator) -> ReferenceIndex:
    """An index of ``n_refs`` random unit vectors (2 per work) with a real calibration."""
    emb = rng.normal(size=(n_refs, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    records = [{"perf": f"ref{i:06d}", "work": f"work{i // 2:06d}", "work_id": i // 2,
                "wav": None, "feat": None, "duration_s": 240.0, "n_windows": 1}
               for i in range(n_refs)]
    idx = ReferenceIndex(
        embeddings=emb, records=records, model_fingerprint=fingerprint,
        feature_settings=hp.features.key(),
        window_settings=window_settings(hp.chunk_len[0], hp.mean_size),
    )
    i = rng.integers(0, n_refs, 60_000)
    j = rng.integers(0, n_refs, 60_000)
    keep = (i // 2) != (j // 2)
    d = 1.0 - np.einsum("pd,pd->p", emb[i[keep]], emb[j[keep]])
    idx.calibration = calibrate_distances(d[:50_000])
    idx.centroids = compute_centroids(emb, idx.works)
    return idx


def bench_query(args: argparse.Namespace, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    hp = HParams()  # default features (nnAudio CQT) and windows (3375 frames = 135 s)
    print(f"building the default CoverHunter model (random weights), {args.refs:,} references ...")
    model = CoverHunterNet(ModelConfig()).eval()
    fp = model_fingerprint(model.state_dict())
    t0 = time.perf_counter()
    index = random_index(args.refs, model.cfg.embed_dim, fp, hp, rng)
    print(f"  synthetic index ready in {time.perf_counter() - t0:.1f} s")

    wav = tmp / "query.wav"
    sf.write(wav, synthetic_song(240.0, 44100, rng), 44100)
    identify([wav], model=model, hp=hp, index=index, device="cpu", top_k=10)  # warm-up
    runs = [identify([wav], model=model, hp=hp, index=index, device="cpu", top_k=10).timings
            for _ in range(args.repeats)]
    stages = ("decode_s", "features_s", "model_s", "search_s", "total_s")
    med = {k: statistics.median(r[k] for r in runs) for k in stages}
    med.update({f"min_{k}": min(r[k] for r in runs) for k in stages})

    vec = index.embeddings[123] + 0.1 * rng.normal(size=index.dim).astype(np.float32)
    index.search(vec, k=10)
    t_search = []
    for _ in range(20):
        t0 = time.perf_counter()
        index.search(vec, k=10, by="perf")
        t_search.append(time.perf_counter() - t0)
    med["search_only_perf_s"] = statistics.median(t_search)
    return med


def bench_build(args: argparse.Namespace, tmp: Path) -> dict:
    rng = np.random.default_rng(1)
    hp = HParams.from_dict({"encoder": {"num_blocks": 2, "output_dims": 64, "attention_dim": 128},
                            "embed_dim": 64, "foc": {"output_dims": 100}})
    model = CoverHunterNet(hp.model).eval()
    n_frames = int(240 * hp.frames_per_second)  # 4-minute tracks
    records = []
    for i in range(args.build_tracks):
        p = tmp / f"t{i}.npy"
        np.save(p, (rng.random((n_frames, hp.features.n_bins)) * -80).astype(np.float32))
        records.append({"perf": f"t{i}", "work": f"w{i // 2}", "work_id": i // 2, "feat": str(p)})
    build_index(model, records[:2], hp, device="cpu", progress=False)  # warm-up
    t0 = time.perf_counter()
    idx = build_index(model, records, hp, device="cpu", progress=False)
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return {"tracks": len(idx), "seconds": dt, "per_s": len(idx) / dt, "params": n_params,
            "windows_per_track": idx.records[0]["n_windows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--build-tracks", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory() as d:
        q = bench_query(args, Path(d))
        b = bench_build(args, Path(d))
    print("\nquery: one 4-minute file -> top-10 of "
          f"{args.refs:,} references (median of {args.repeats})")
    print(f"  {'stage':<9} {'median':>9} {'min':>9}")
    for k in ("decode_s", "features_s", "model_s", "search_s"):
        print(f"  {k[:-2]:<9} {q[k] * 1000:6.0f} ms {q['min_' + k] * 1000:6.0f} ms")
    print(f"  {'total':<9} {q['total_s'] * 1000:6.0f} ms {q['min_total_s'] * 1000:6.0f} ms"
          f"   target < {TARGET_TOTAL_S * 1000:.0f} ms, ratio (median) "
          f"{q['total_s'] / TARGET_TOTAL_S:.2f}")
    print(f"  search (identify, by work) {q['search_s'] * 1000:.1f} ms; "
          f"search alone (one vector, by perf) {q['search_only_perf_s'] * 1000:.1f} ms   "
          f"target < {TARGET_SEARCH_S * 1000:.0f} ms   ratio "
          f"{q['search_only_perf_s'] / TARGET_SEARCH_S:.2f}")
    print(f"\nindex build, small model ({b['params'] / 1e6:.2f} M parameters), "
          f"{b['tracks']} tracks of 4 min ({b['windows_per_track']} windows each):")
    print(f"  {b['seconds']:.2f} s = {b['per_s']:.1f} recordings/s")


if __name__ == "__main__":
    main()
