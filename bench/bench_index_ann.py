"""The reference index (what 06, `chlib identify` and the service search) at 10^5-10^6
recordings, through FAISS (``ReferenceIndex.search(..., use_faiss=True)``: IVF-PQ with exact
re-ranking above 200,000 rows) against its exact numpy search: latency of one query by work
(p50 / p95) and agreement of the top-10 works.

    python bench/bench_index_ann.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from chlib.core.config import FeatureSettings
from chlib.retrieval.embed import window_settings
from chlib.retrieval.index import index_from_windows

D, PER_WORK = 128, 4


def synthetic(n: int, seed: int = 0):
    """n recordings (n / 4 works of 4 around a random centre) and 200 queries of known works."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // PER_WORK, D)).astype(np.float32)
    vecs = np.repeat(centres, PER_WORK, axis=0) + 0.6 * rng.standard_normal((n, D), np.float32)
    recs = [{"perf": f"p{i}", "work": f"w{i // PER_WORK}"} for i in range(n)]
    idx = index_from_windows(recs, list(vecs[:, None]), model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(),
                             window_settings=window_settings(30, 3), keep_windows=False)
    truth = rng.choice(len(centres), 200, replace=False)
    q = centres[truth] + 0.6 * rng.standard_normal((200, D), np.float32)
    return idx, q, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args()
    for n in args.sizes:
        t0 = time.perf_counter()
        idx, q, truth = synthetic(n)
        t1 = time.perf_counter()
        idx.ann()
        t2 = time.perf_counter()
        times, same, top1 = {"faiss": [], "exact": []}, [], []
        for i, v in enumerate(q):
            rows = {}
            for how in ("faiss", "exact"):
                s = time.perf_counter()
                rows[how] = idx.search(v, k=10, by="work", use_faiss=how == "faiss")[0]
                times[how].append(time.perf_counter() - s)
            same.append(len({r["work"] for r in rows["faiss"]} & {r["work"] for r in rows["exact"]}) / 10)
            top1.append(rows["faiss"][0]["work"] == f"w{truth[i]}")
        ms = {h: np.percentile(np.array(t) * 1e3, [50, 95]) for h, t in times.items()}
        print(f"{n:>8} refs ({idx.ann().kind}; index {t1 - t0:.0f} s, FAISS build {t2 - t1:.0f} s): "
              f"by work, one query: FAISS p50 {ms['faiss'][0]:.1f} ms p95 {ms['faiss'][1]:.1f} ms, "
              f"exact p50 {ms['exact'][0]:.1f} ms p95 {ms['exact'][1]:.1f} ms "
              f"(speed-up {ms['exact'][0] / ms['faiss'][0]:.1f}x); top-10 works shared with exact "
              f"{np.mean(same):.3f}; top-1 right {np.mean(top1):.3f}")


if __name__ == "__main__":
    main()
