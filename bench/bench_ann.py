"""Search at 10^6-10^7 references with chlib.retrieval.ann (issue 14), on CPU.

For each size N: N random unit vectors of D=128 (CoverHunterNet's default embed_dim), 1,000 of
them planted: the queries are noisy copies of those (``--noise`` 0.05 per dimension: cosine
~0.87 to their reference, while random pairs sit at 0 +- 0.09), so recall is measurable.
Measured: build time, RSS growth, the index's own size (its saved file), query latency p50/p95
one query at a time and for a batch of 1,000, recall@10 of the planted copies and vs an exact
search (the exact top-1 in the approximate top-10; exact search on ``--exact-queries`` queries).
Targets, printed as ratios (<= 1 for time and memory, >= 1 for recall is met):
10^6: <= 20 ms per query (p95, one at a time) with recall@10 >= 0.99; 10^7: index <= 8 GB and
<= 50 ms per query.

Run: ``.venv/bin/python bench/bench_ann.py --sizes 100000 1000000`` (``--kinds auto ivfpq hnsw``,
``--threads N``, ``--nprobe`` to override). About 2 minutes for 10^6 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from chlib.retrieval.ann import AnnIndex, default_params, recall_at

D = 128
N_PLANTED = 1000
TARGETS = {1_000_000: {"ms": 20.0, "recall": 0.99}, 10_000_000: {"ms": 50.0, "gb": 8.0}}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def make_data(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, D] unit references (made in blocks: no float64 copy), 1,000 queries and their truth."""
    rng = np.random.default_rng(seed)
    refs = np.empty((n, D), np.float32)
    for a in range(0, n, 1 << 20):
        block = rng.standard_normal((min(n, a + (1 << 20)) - a, D), dtype=np.float32)
        refs[a:a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    truth = rng.choice(n, min(N_PLANTED, n), replace=False)
    q = refs[truth] + noise * rng.standard_normal((len(truth), D), dtype=np.float32)
    return refs, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), truth


def exact_top1(refs: np.ndarray, q: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """[M] index of each query's most similar reference, by NumPy in blocks of rows (no
    second copy of the references, unlike a flat FAISS index)."""
    best, arg = np.full(len(q), -np.inf, np.float32), np.zeros(len(q), np.int64)
    for a in range(0, len(refs), block):
        s = q @ refs[a:a + block].T  # [M, block]
        i = s.argmax(axis=1)
        better = s[np.arange(len(q)), i] > best
        best[better], arg[better] = s[np.arange(len(q)), i][better], a + i[better]
    return arg


def latency_ms(ann: AnnIndex, q: np.ndarray, k: int, n_single: int, **kw) -> dict:
    ann.search(q[:10], k, **kw)  # warm-up
    single = []
    for row in q[:n_single]:
        t = time.perf_counter()
        ann.search(row[None, :], k, **kw)
        single.append(1e3 * (time.perf_counter() - t))
    t = time.perf_counter()
    idx, _ = ann.search(q, k, **kw)
    batch = 1e3 * (time.perf_counter() - t)
    return {"p50": float(np.percentile(single, 50)), "p95": float(np.percentile(single, 95)),
            "batch_ms": batch, "batch_per_q": batch / len(q), "idx": idx}


def bench_size(n: int, kind: str, args: argparse.Namespace) -> None:
    refs, q, truth = make_data(n, args.noise, args.seed)
    params = {"nprobe": args.nprobe} if args.nprobe and kind in ("ivfpq", "auto") else {}
    p = default_params(n, D, kind=kind, float16=args.float16, **params)
    rss0, t = rss_bytes(), time.perf_counter()
    ann = AnnIndex.build(refs, kind=p.kind, float16=args.float16, seed=args.seed,
                         threads=args.threads, **params)
    build_s, rss_growth = time.perf_counter() - t, rss_bytes() - rss0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t = time.perf_counter()
        ann.save(tmp)
        save_s, size = time.perf_counter() - t, (Path(tmp) / "index.faiss").stat().st_size
        t = time.perf_counter()
        AnnIndex.load(tmp, dim=D, n=n, threads=args.threads)
        load_s = time.perf_counter() - t
    lat = latency_ms(ann, q, 10, args.single)
    m = args.exact_queries
    ex_idx = exact_top1(refs, q[:m])
    r_planted = recall_at(10, truth, lat["idx"])
    r_exact = recall_at(10, ex_idx, lat["idx"][:m])
    keys = {"flat": (), "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
            "ivfpq": ("nlist", "nprobe", "pq_m", "pq_nbits", "refine_factor", "train_size")}
    shown = {k: getattr(p, k) for k in ("float16", *keys[p.kind])}
    print(f"\nN={n:,} D={D} kind={p.kind} {shown} threads={args.threads}")
    print(f"  build {build_s:8.1f} s   save {save_s:.1f} s   load {load_s:.1f} s")
    print(f"  memory: RSS growth {rss_growth / 2**20:8.0f} MiB   index file "
          f"{size / 2**20:8.0f} MiB ({size / n:.0f} B/row)")
    print(f"  one query: p50 {lat['p50']:6.2f} ms  p95 {lat['p95']:6.2f} ms ({args.single} "
          f"queries)   batch of {len(q)}: {lat['batch_ms']:.0f} ms ({lat['batch_per_q']:.2f} "
          "ms/query)")
    print(f"  recall@10: planted copies {r_planted:.4f} ({len(q)} queries), exact top-1 "
          f"{r_exact:.4f} ({m} queries)")
    if tg := TARGETS.get(n):
        out = [f"p95/{tg['ms']:.0f} ms = {lat['p95'] / tg['ms']:.2f}"]
        if "recall" in tg:
            out.append(f"recall/{tg['recall']} = {min(r_planted, r_exact) / tg['recall']:.3f}")
        if "gb" in tg:
            out.append(f"size/{tg['gb']:.0f} GB = {size / 1e9 / tg['gb']:.2f}")
        print("  targets: " + ", ".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["auto"], choices=["auto", "flat", "ivfpq",
                                                                     "hnsw"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--nprobe", type=int, default=0, help="override ivfpq's nprobe (0: default)")
    ap.add_argument("--float16", action="store_true", help="float16 storage (flat, re-rank)")
    ap.add_argument("--noise", type=float, default=0.05, help="per-dimension noise of a copy")
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--exact-queries", type=int, default=200, help="queries searched exactly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the saved index (default: /tmp)")
    args = ap.parse_args()
    for n in args.sizes:
        for kind in args.kinds:
            bench_size(n, kind, args)


if __name__ == "__main__":
    main()
