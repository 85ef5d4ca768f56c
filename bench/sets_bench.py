"""Sets of tunes on works the model never trained on: the timeline's metrics beside the same
recordings identified alone (issue 12), on any extracted dataset with a trained run.

The dataset's held-out test works are split: one recording of each (chosen by ``--seed``) is a
query, the work's other recordings are the references (the index holds only test works, so
every query's work is known to it and none was trained on). The queries are identified alone
(top-1 / top-10 of ``identify``) and joined into ``--n-sets`` sets of 2-4 (chlib.demo.sets:
crossfades, cuts, gaps), whose timelines are scored by chlib.retrieval.set_metrics.

    python bench/sets_bench.py --dataset /work/suite_data/fluid660 \\
        --run /work/suite_data/runs/G_660works --out /tmp/sets_suite
    python bench/sets_bench.py --dataset datasets/demo --run runs/demo --out /tmp/sets_demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from chlib.data.splits import read_split
from chlib.demo.sets import make_sets, read_sets
from chlib.retrieval import evaluate
from chlib.retrieval.identify import identification_summary, identify
from chlib.retrieval.index import build_index, is_tempo_copy
from chlib.retrieval.segment import DEFAULT_REFINE_S, evaluate_sets, identify_segments


def split_test_works(dataset: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(queries: one recording per test work with 2+, references: the rest of those works)."""
    by_work: dict[str, list[dict]] = {}
    for r in read_split(dataset, "test"):
        if r.get("wav") and not is_tempo_copy(r):
            by_work.setdefault(str(r["work"]), []).append(r)
    rng = np.random.default_rng(seed)
    queries, refs = [], []
    for work in sorted(by_work):
        recs = by_work[work]
        if len(recs) < 2:
            continue
        q = int(rng.integers(len(recs)))
        queries.append(recs[q])
        refs += [r for i, r in enumerate(recs) if i != q]
    return queries, refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True, help="folder for the sets and the results")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--n-sets", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hop-s", type=float, default=2.0)
    ap.add_argument("--refine-s", type=float, default=DEFAULT_REFINE_S,
                    help="window (s) that places each change between two works; 0: off")
    args = ap.parse_args()
    out = Path(args.out)
    model, hp, epoch, note = evaluate.load_checkpoint(args.run, args.checkpoint, "cpu")
    queries, refs = split_test_works(args.dataset, args.seed)
    index = build_index(model, refs, hp, device="cpu", progress=False)
    print(f"model epoch {epoch} {note}; {len(queries)} queries, {len(refs)} references of "
          f"{len(set(index.works))} unseen works")
    alone = identify([q["wav"] for q in queries], model=model, hp=hp, index=index, device="cpu")
    single = identification_summary(alone.rows, {q["wav"]: str(q["work"]) for q in queries},
                                    index_works=index.works)
    sets = read_sets(make_sets(queries, out / "sets", n_sets=args.n_sets, seed=args.seed))
    t0 = time.perf_counter()
    rep = identify_segments([s["wav"] for s in sets], model=model, hp=hp, index=index,
                            device="cpu", hop_s=args.hop_s, refine_s=args.refine_s)
    seconds = time.perf_counter() - t0
    res = evaluate_sets(sets, rep)
    keys = ("recall_at_n", "recall_at_10", "all_in_top10", "false_work_share", "time_accuracy",
            "median_boundary_error_s")
    print(f"alone: top-1 {single['top1']:.3f}, top-10 {single['top10']:.3f} "
          f"({single['n_with_truth']} queries)")
    print(f"sets ({res['n_sets']}, {sum(s['duration_s'] for s in sets) / 60:.1f} min of audio, "
          f"timelines in {seconds:.1f} s): "
          + ", ".join(f"{k} {res[k]:.3f}" for k in keys))
    print(res["by_n_works"][list(keys)].round(3).to_string())
    target = {"recall_at_n >= 0.9 x top-1": res["recall_at_n"] / (0.9 * single["top1"]),
              "all_in_top10 >= 0.8": res["all_in_top10"] / 0.8,
              "time_accuracy >= 0.8": res["time_accuracy"] / 0.8,
              "median boundary <= 3 s": 3.0 / max(res["median_boundary_error_s"], 1e-9)}
    print("ratios to the targets (>= 1 meets it): "
          + ", ".join(f"{k}: {v:.2f}" for k, v in target.items()))
    summary = {"single": {k: single[k] for k in ("top1", "top10", "n_with_truth")},
               "sets": {k: res[k] for k in (*keys, "n_sets")}, "timeline_s": seconds,
               "by_n_works": res["by_n_works"].reset_index().to_dict("records")}
    (out / "sets_bench.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
