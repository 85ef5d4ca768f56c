"""Coarse-to-fine training against plain training at the same number of steps (issue 12).

From one checkpoint of a trained run (``--base``, epoch ``--from-epoch``), two runs go on for
``--epochs`` more epochs with the same seeds and settings: ``plain`` (the run's recipe: chunks
at random starts) and ``aligned`` (the m chunks of a work in a batch cut at one passage aligned
between its versions, mined with that same checkpoint: chlib.train.align). Both evaluate the
held-out works after every epoch; the table prints each test set's mAP per step, then the sets'
metrics (bench/sets_bench.py's protocol) of both final checkpoints.

    cd <project folder>   # paths in the run's config are relative to it
    python bench/align_finetune.py --base runs/G --from-epoch 17 --epochs 4 --out runs/align
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from chlib.core.manifest import read_manifest
from chlib.demo.sets import make_sets, read_sets
from chlib.retrieval import evaluate
from chlib.retrieval.index import build_index
from chlib.retrieval.segment import evaluate_sets, identify_segments
from chlib.train.align import mine_alignments, write_alignments
from chlib.train.loop import train
from chlib.train.runs import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sets_bench import split_test_works  # noqa: E402


def branch(base: Path, epoch: int, out: Path, extra: dict) -> Path:
    """A run folder that resumes ``base`` after ``epoch``: its config (plus ``extra``), that
    epoch's checkpoints and the metrics up to it."""
    if out.exists():
        return out  # resume an interrupted comparison
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(base / "config", out / "config")
    cfg = yaml.safe_load((out / "config" / "hparams.yaml").read_text()) | extra
    (out / "config" / "hparams.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for prefix in ("g_", "do_"):
        shutil.copy(base / "checkpoints" / f"{prefix}{epoch:08d}", out / "checkpoints")
    lines = [x for x in (base / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("epoch", 0) <= epoch]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out


def sets_metrics(run: Path, dataset: str, out: Path) -> dict:
    model, hp, _, _ = evaluate.load_checkpoint(run, "latest", "cpu")
    queries, refs = split_test_works(dataset, 0)
    index = build_index(model, refs, hp, device="cpu", progress=False)
    sets = read_sets(make_sets(queries, out, n_sets=40, seed=0))
    rep = identify_segments([s["wav"] for s in sets], model=model, hp=hp, index=index,
                            device="cpu")
    return evaluate_sets(sets, rep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--from-epoch", type=int, required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hop", type=int, default=25, help="frames between mined windows (1 s)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base, out = Path(args.base), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    al_path = out / "alignments.json"
    model, hp, _, _ = evaluate.load_checkpoint(base, args.from_epoch, "cpu")
    if not al_path.exists():
        t0 = time.perf_counter()
        train_manifest = hp.resolve_path(hp.train_path)
        recs = read_manifest(train_manifest)
        al = mine_alignments(model, recs, hp, hop=args.hop, manifest_path=train_manifest)
        write_alignments(al_path, al)
        n_works = len({g["work"] for g in al["groups"]})
        print(f"mined {len(al['groups'])} aligned passages in {n_works} works from "
              f"{len(recs)} recordings in {time.perf_counter() - t0:.0f} s")
    runs = {"plain": branch(base, args.from_epoch, out / "plain", {}),
            "aligned": branch(base, args.from_epoch, out / "aligned",
                              {"align_path": str(al_path.resolve())})}
    for name, run in runs.items():
        t0 = time.perf_counter()
        train(run, device="cpu", max_epochs=args.from_epoch + 1 + args.epochs, progress=False)
        print(f"{name}: {args.epochs} epochs in {(time.perf_counter() - t0) / 60:.1f} min",
              flush=True)
    rows = []
    for name, run in runs.items():
        for r in read_metrics(run):
            if r.get("kind") == "test" and r["epoch"] > args.from_epoch:
                rows.append({"run": name, "step": r["step"], "testset": r["testset"],
                             "mAP": r["mAP"]})
    table = pd.DataFrame(rows).pivot_table(index=["testset", "step"], columns="run",
                                           values="mAP")
    print(table.round(3).to_string())
    dataset = str(hp.resolve_path(hp.train_path).parent)
    for name, run in runs.items():
        m = sets_metrics(run, dataset, out / f"sets_{name}")
        print(f"{name} sets: " + ", ".join(f"{k} {m[k]:.3f}" for k in (
            "recall_at_n", "all_in_top10", "false_work_share", "time_accuracy",
            "median_boundary_error_s")))


if __name__ == "__main__":
    main()
