"""Generalisation suite: held-out works' mAP against training steps, beside a model-free baseline.

Trains one recipe on an extracted dataset (its train split) and evaluates, after every epoch,
the works it never saw: the dataset's own held-out works (``unseen``/``test``) and any number
of collections from other generators (``--extra NAME=full.txt``, e.g. the FluidSynth suite of
``bench/suite`` against the built-in demo, or the other way round). The 2D-FTM baseline (no
learning, :mod:`chlib.signal.chroma`) is scored on the same queries, so a curve that stays
below it is a model that has not learnt what makes two recordings the same tune.

    python bench/generalisation.py --dataset datasets/fluid260 --run runs/gen_laptop \\
        --recipe laptop --extra demo=datasets/demo/full.txt --max-epochs 15
    python bench/generalisation.py --run runs/gen_laptop --report   # table only
    python bench/generalisation.py --compare runs/A runs/B --steps 288 576 1000   # side by side
    python bench/generalisation.py --run runs/G --rescore --set key_variants=[0,7] \
        neighbour_expansion=true   # every saved epoch again, compared the recipe's new way

Prints one table: steps, minutes of training, training loss, and each test set's mAP, then
the baseline's mAP per test set and the chance level (mean share of relevant references).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml

from chlib.core.config import deep_merge, load_hparams
from chlib.core.manifest import read_manifest
from chlib.model.checkpoint import list_checkpoints, load_model
from chlib.train.diagnose import model_free_scores
from chlib.train.loop import evaluate_testsets, train
from chlib.train.runs import make_run_config, read_metrics


def parse_overrides(pairs: list[str]) -> dict:
    """``a.b=1`` -> {"a": {"b": 1}} with YAML-typed values."""
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def configure(run: Path, dataset: Path, recipe: str, overrides: dict, extras: dict[str, Path]) -> None:
    """Write the run config: the recipe on ``dataset`` plus one test set per extra collection."""
    tests = {name: {"query_path": str(p), "ref_path": str(p)} for name, p in extras.items()}
    make_run_config(run, recipe, deep_merge(overrides, tests), dataset_dir=dataset)


def _records(path: Path) -> list[dict]:
    return [r for r in read_manifest(path) if not str(r["perf"]).startswith("sp_")]


def baseline_scores(hp_path: Path) -> dict[str, dict]:
    """2D-FTM mAP (:func:`chlib.train.diagnose.model_free_scores`) and chance per test set."""
    hp = load_hparams(hp_path)
    out = {}
    for name, scores in model_free_scores(hp).items():
        recs = _records(hp.resolve_path(hp.testsets[name].query_path))
        works = pd.Series([r["work"] for r in recs])
        counts = works.map(works.value_counts()) - 1
        out[name] = {"2D-FTM mAP": scores["mAP"],
                     "chance": float((counts / (len(recs) - 1)).mean()), "queries": len(recs)}
    return out


RESCORED = "rescored.jsonl"  # --rescore: one line per (epoch, test set) of the saved models


def rescore(run: Path, overrides: dict, epochs: list[int] | None = None) -> Path:
    """Score every saved epoch (or ``epochs``) of ``run`` again on its test sets, with the run
    config plus ``overrides`` (comparison settings such as ``key_variants`` and
    ``neighbour_expansion``; the model is the saved one), through the training loop's own
    evaluation. Writes ``run/rescored.jsonl`` (the training's metrics.jsonl is left alone);
    epochs already in it are skipped, so a killed rescore resumes."""
    hp = load_hparams(run / "config" / "hparams.yaml").updated(overrides)
    steps = {int(r["epoch"]): int(r["step"]) for r in read_metrics(run, "epoch")}
    out = run / RESCORED
    done = {(r["epoch"], json.dumps(r["settings"], sort_keys=True))
            for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    key = json.dumps(overrides, sort_keys=True)
    saved = sorted(list_checkpoints(run / "checkpoints"))
    for epoch in [e for e in saved if epochs is None or e in epochs]:
        if (epoch, key) in done:
            continue
        model, _, _ = load_model(run, epoch, device="cpu", hp=hp)
        results = evaluate_testsets(model, hp, torch.device("cpu"))
        with out.open("a") as f:
            for name, res in results.items():
                f.write(json.dumps({"epoch": epoch, "step": steps.get(epoch), "testset": name,
                                    "mAP": res["mAP"], "HR1": res["HR1"],
                                    "settings": overrides}) + "\n")
        print(f"epoch {epoch} (step {steps.get(epoch)}): " + ", ".join(
            f"{n} {r['mAP']:.3f}" for n, r in results.items()), flush=True)
    return out


def rescored_curve(run: Path, overrides: dict) -> pd.DataFrame:
    """:func:`curve`'s table with the mAP of :func:`rescore` under ``overrides``."""
    key = json.dumps(overrides, sort_keys=True)
    rows = [r for r in map(json.loads, (run / RESCORED).read_text().splitlines())
            if json.dumps(r["settings"], sort_keys=True) == key]
    table = pd.DataFrame(rows).pivot_table(index="step", columns="testset", values="mAP")
    plain = curve(run)
    table.insert(0, "train_loss", plain["train_loss"].reindex(table.index))
    table.insert(0, "minutes", plain["minutes"].reindex(table.index))
    return table.round(3)


def curve(run: Path) -> pd.DataFrame:
    """One row per evaluated epoch: step, minutes, train loss, mAP of every test set."""
    tests = pd.DataFrame(read_metrics(run, "test"))
    epochs = pd.DataFrame(read_metrics(run, "epoch"))
    table = tests.pivot_table(index="step", columns="testset", values="mAP")
    ep = epochs.set_index("step")
    table.insert(0, "train_loss", ep["train_total"].reindex(table.index))
    table.insert(0, "minutes", (ep["epoch_s"].cumsum() / 60).reindex(table.index))
    return table.round(3)


def compare(runs: list[Path], steps: list[int]) -> pd.DataFrame:
    """mAP of each run's test sets at the evaluated step nearest each of ``steps`` (and the
    training minutes it took), one row per (run, step)."""
    rows = []
    for run in runs:
        table = curve(run)
        for want in steps:
            step = int(table.index[abs(table.index - want).argmin()])
            rows.append({"run": run.name, "step": step, **table.loc[step].to_dict()})
    table = pd.DataFrame(rows).drop_duplicates(["run", "step"])
    return table.set_index(["run", "step"]).round(3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--compare", nargs="*", type=Path, help="runs to tabulate side by side")
    ap.add_argument("--steps", nargs="*", type=int, default=[288, 576, 1000, 1600, 2000])
    ap.add_argument("--dataset", type=Path, help="extracted dataset with train/val/test splits")
    ap.add_argument("--recipe", default="laptop")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, e.g. learning_rate=0.001")
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=full.txt of another collection")
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--report", action="store_true", help="print the table of an existing run")
    ap.add_argument("--rescore", action="store_true",
                    help="score the saved epochs again with --set comparison settings")
    ap.add_argument("--epochs", nargs="*", type=int, help="--rescore only these epochs")
    args = ap.parse_args(argv)
    pd.set_option("display.width", 160)
    if args.compare:
        print(compare(args.compare, args.steps).to_string())
        return 0
    if args.rescore:
        overrides = parse_overrides(args.set)
        rescore(args.run, overrides, args.epochs)
        print(rescored_curve(args.run, overrides).to_string())
        return 0
    hp_path = args.run / "config" / "hparams.yaml"
    if not args.report:
        if not hp_path.exists():
            extras = dict((n, Path(p)) for n, _, p in (e.partition("=") for e in args.extra))
            configure(args.run, args.dataset, args.recipe, parse_overrides(args.set), extras)
        train(args.run, max_epochs=args.max_epochs, progress=False)
    pd.set_option("display.width", 160)
    print(curve(args.run).to_string())
    base = baseline_scores(hp_path)
    print(pd.DataFrame(base).T.round(3).to_string())
    (args.run / "generalisation.json").write_text(json.dumps(
        {"curve": curve(args.run).reset_index().to_dict("records"), "baseline": base}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
