#!/usr/bin/env python3
"""Grow a suite's training side with more works, keeping its validation and test splits.

The "more works" candidate of the generalisation suite (README): render the same generator with
more works (``make_suite.py --works 660 --versions 4 --seed 1`` into NEW; the first works are the
base suite's, so copy or hard-link its audio into NEW/audio first and they are reused), then

    python bench/suite/more_works.py merge --base fluid260 --new fluid660
    python -c "from chlib.data.extract import extract_dataset; extract_dataset('fluid660')"
    python bench/suite/more_works.py splits --base fluid260 --new fluid660

``merge`` writes NEW/dataset.txt = every base recording (all its versions) + the new works only
(the suite's own list is kept as dataset_suite.txt) and copies the base's hparams.yaml;
``splits`` (after extraction) makes NEW's test and validation splits exactly the base's
recordings and puts every other recording in train, so held-out figures stay comparable.

``add`` writes NEW/train_plus_<name>.txt: NEW's train.txt plus every recording of another
extracted collection (``--extra``, e.g. a 200-work demo set, ``make_demo_dataset``), renamed
``<name>_<perf>``, work ids after NEW's, feature paths absolute, leaving out the works named in
``--exclude`` and any whose melody a held-out work of NEW shares (``shared_tunes.py``; run I of
the README: 192 of 200 demo works, whose held-out suite twin it found afterwards)::

    python bench/suite/more_works.py add --base fluid260 --new fluid660 --extra demo200 \
        --exclude-from datasets/demo/full.txt   # the demo's own 40 works, kept unseen
    python bench/generalisation.py ... --set train_path=fluid660/train_plus_demo200.txt
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import shared_tunes  # beside this script


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def merge(base: Path, new: Path) -> None:
    old, suite = _records(base / "dataset.txt"), _records(new / "dataset.txt")
    known = {r["work"] for r in old}
    extra = [r for r in suite if r["work"] not in known]
    if max(known) >= min((r["work"] for r in extra), default="~"):
        raise SystemExit("new work names must sort after the base's (so work ids do not move)")
    shutil.copy(new / "dataset.txt", new / "dataset_suite.txt")
    _write(new / "dataset.txt", [json.dumps(r, ensure_ascii=False) for r in old + extra])
    shutil.copy(base / "hparams.yaml", new / "hparams.yaml")
    print(f"{len(old)} base recordings + {len(extra)} of {len({r['work'] for r in extra})} new works")


def splits(base: Path, new: Path) -> None:
    held = {name: {r["perf"] for r in _records(base / f"{name}.txt")} for name in ("test", "val")}
    out: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for line in (new / "full.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            perf = json.loads(line)["perf"]
            out[next((n for n, s in held.items() if perf in s), "train")].append(line)
    ids = {r["perf"]: r["work_id"] for r in _records(base / "full.txt")}
    moved = [p for p, w in ((json.loads(x)["perf"], json.loads(x)["work_id"])
                            for v in out.values() for x in v) if p in ids and ids[p] != w]
    if moved:
        raise SystemExit(f"work ids moved for {len(moved)} recordings (e.g. {moved[0]})")
    for name, lines in out.items():
        _write(new / f"{name}.txt", lines)
    for name in ("test-only-work-ids.txt", "val-only-work-ids.txt"):
        shutil.copy(base / name, new / name)
    print(", ".join(f"{k} {len(v)}" for k, v in out.items()))


def add(new: Path, extra: Path, exclude_from: list[Path], min_run: int = 48) -> Path:
    """NEW/train_plus_<extra name>.txt (module docstring); returns its path."""
    train = _records(new / "train.txt")
    bare = {w.split("_", 1)[-1] for p in exclude_from for w in (r["work"] for r in _records(p))}
    held = shared_tunes.suite_tunes(new)
    twins = {d for d, b in shared_tunes.demo_melodies(extra).items()
             if any(shared_tunes.longest_shared_run(a, b) >= min_run for a in held.values())}
    keep = [r for r in _records(extra / "full.txt")
            if r["work"].split("_", 1)[-1] not in bare and r["work"] not in twins]
    first = 1 + max(int(r["work_id"]) for r in _records(new / "full.txt"))
    ids = {w: first + i for i, w in enumerate(sorted({r["work"] for r in keep}))}
    added = [r | {"perf": f"{extra.name}_{r['perf']}", "work": f"{extra.name}_{r['work']}",
                  "work_id": ids[r["work"]], "feat": str((extra / r["feat"]).resolve())}
             for r in keep]
    out = new / f"train_plus_{extra.name}.txt"
    _write(out, [json.dumps(r) for r in train + added])
    print(f"{out}: {len(train)} + {len(added)} recordings of {len(ids)} works "
          f"({len(twins)} left out as twins of held-out works: {sorted(twins)})")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["merge", "splits", "add"])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--extra", type=Path, help="add: another extracted collection")
    ap.add_argument("--exclude-from", type=Path, nargs="*", default=[],
                    help="add: manifests whose works (by name) to leave out")
    args = ap.parse_args()
    if args.step == "add":
        add(args.new, args.extra, args.exclude_from)
    else:
        (merge if args.step == "merge" else splits)(args.base, args.new)
