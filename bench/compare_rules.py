"""Compare the two distance rules ("min", "mean") on a trained run.

For each rule: the run's test sets evaluated with it (mAP with its 95 % CI, HR@1, HR@10), and
the time of one top-10 query against ``--refs`` synthetic references (unit window embeddings,
with the run's typical number of windows per recording). Prints a small table.

    python bench/compare_rules.py RUN_DIR --root DATASET_PARENT [--refs 100000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from chlib.core.manifest import read_manifest
from chlib.data.features import feature_path, load_feature
from chlib.retrieval.embed import window_starts
from chlib.retrieval.evaluate import evaluate_run, load_checkpoint, resolve_testsets
from chlib.retrieval.index import index_from_windows
from chlib.retrieval.protocol import DISTANCE_RULES


def query_time(rule: str, n_refs: int, windows_per_rec: float, dim: int, repeats: int = 3) -> float:
    """Median seconds of one top-10 search against ``n_refs`` synthetic references."""
    rng = np.random.default_rng(0)
    counts = np.maximum(1, rng.poisson(max(windows_per_rec - 1, 0), n_refs) + 1)
    wins = [rng.standard_normal((int(c), dim)).astype(np.float32) for c in counts]
    recs = [{"perf": f"p{i}", "work": f"w{i // 2}"} for i in range(n_refs)]
    idx = index_from_windows(recs, wins, model_fingerprint="synthetic", feature_settings={},
                             window_settings={}, rule=rule, n_pairs=1000)
    q = [rng.standard_normal((max(1, round(windows_per_rec)), dim)).astype(np.float32)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        idx.search(q, k=10, by="perf")
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def windows_per_recording(run_dir: str, root: str | None, checkpoint: str) -> tuple[float, Any]:
    """Mean number of embedding windows per test-set recording (true feature lengths), and hp."""
    _, hp, _, _ = load_checkpoint(run_dir, checkpoint, "cpu")
    counts = []
    for spec in resolve_testsets(hp, None, root=root):
        for rec in read_manifest(spec.query_path, required=("perf", "feat")):
            n = load_feature(feature_path(rec, spec.query_path)).shape[0]
            counts.append(len(window_starts(n, hp.chunk_len[0])))
    return float(np.mean(counts)), hp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--root", default=None, help="folder the run config's relative paths start in")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    wpr, hp = windows_per_recording(args.run_dir, args.root, args.checkpoint)
    rows, dim, epoch = [], 0, None
    for rule in DISTANCE_RULES:
        ev = evaluate_run(args.run_dir, checkpoint=args.checkpoint, rule=rule, device=args.device,
                          root=args.root, progress=False, untrained_baseline=False)
        epoch = ev.epoch
        for name, r in ev.results.items():
            dim = int(r.points.shape[1])
            ci = r.ci["mAP"]
            rows.append({"rule": rule, "testset": name, "mAP": r.metrics["mAP"],
                         "CI": f"[{ci['low']:.3f}, {ci['high']:.3f}]", "HR1": r.metrics["HR1"],
                         "HR10": r.metrics["HR10"], "queries": r.metrics["n_queries"]})
    times = {rule: query_time(rule, args.refs, wpr, dim) for rule in DISTANCE_RULES}
    print(f"run {args.run_dir}, epoch {epoch}; {wpr:.2f} windows per recording, D={dim}, "
          f"config distance_rule={getattr(hp, 'distance_rule', 'min')}")
    print(f"{'rule':5} {'testset':14} {'mAP':>6} {'95% CI':>16} {'HR1':>6} {'HR10':>6} "
          f"{'queries':>7} {'top-10 / ' + str(args.refs) + ' refs':>20}")
    for row in rows:
        print(f"{row['rule']:5} {row['testset']:14} {row['mAP']:6.3f} {row['CI']:>16} "
              f"{row['HR1']:6.3f} {row['HR10']:6.3f} {row['queries']:7d} "
              f"{times[row['rule']] * 1000:17.1f} ms")


if __name__ == "__main__":
    main()
