#!/usr/bin/env python3
"""Tunes that a suite's held-out works share with the demo generator's works (a leak check).

Training on the FluidSynth suite plus works of chlib's demo generator (README, run I) is only
a fair test if no held-out suite work is also among the demo works under another name: the
suite draws on O'Neill's 1850 collection, the demo on Ryan's Mammoth (1883), and the same tune
is often in both. This compares melodies, not names: the longest run of equal successive
intervals between each held-out suite tune (``NEW/tunes/*/*.json``, written by make_suite.py)
and each demo tune (the demo's cached parses). A run of a whole strain (>= 48 intervals) is the
same tune; 16-20 is a shared stock figure.

    python bench/suite/shared_tunes.py --suite datasets/fluid660 --demo datasets/demo200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chlib.demo.tunes import default_tune_cache_dir


def longest_shared_run(a: np.ndarray, b: np.ndarray, limit: int = 400) -> int:
    """Length of the longest common run of two interval sequences (their first ``limit``)."""
    a, b = a[:limit], b[:limit]
    prev, best = np.zeros(len(b) + 1, np.int32), 0
    for x in a:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b == x, prev[:-1] + 1, 0)
        best, prev = max(best, int(cur.max(initial=0))), cur
    return best


def suite_tunes(suite: Path) -> dict[str, np.ndarray]:
    """Held-out (test and validation) works of a suite -> the intervals of their melody."""
    sources = json.loads((suite / "suite_info.json").read_text())["sources"]
    parsed = {(t["corpus"], t["source"], str(t.get("number"))): [int(n[2]) for n in t["notes"]]
              for f in sorted(suite.glob("tunes/*/*.json")) for t in json.loads(f.read_text())}
    held = {json.loads(line)["work"] for name in ("test.txt", "val.txt")
            for line in (suite / name).read_text().splitlines() if line.strip()}
    out = {}
    for work in sorted(held):
        path, _, number = sources.get(work, "").partition("#")
        corpus, _, fname = path.partition("/")
        if (key := (corpus, fname, number)) in parsed:
            out[work] = np.diff(parsed[key])
    return out


def demo_melodies(demo: Path) -> dict[str, np.ndarray]:
    """The demo dataset's works -> the intervals of their melody (from the tune cache)."""
    cache, out = default_tune_cache_dir(), {}
    for w in json.loads((demo / "demo_info.json").read_text())["works"]:
        hit = next(cache.rglob(Path(w["source"]).stem + ".json"), None)
        if hit is not None and (notes := json.loads(hit.read_text()).get("notes")):
            out[w["work"]] = np.diff([int(n[0]) for n in notes])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=Path, required=True)
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--min-run", type=int, default=16)
    args = ap.parse_args(argv)
    held, demo = suite_tunes(args.suite), demo_melodies(args.demo)
    print(f"{len(held)} held-out suite works against {len(demo)} demo works")
    for run, work, other in sorted(((longest_shared_run(a, b), w, d) for w, a in held.items()
                                    for d, b in demo.items()), reverse=True):
        if run < args.min_run:
            break
        print(f"{run:4d} intervals in common: {work}  ~  {other}"
              + ("  (the same tune)" if run >= 48 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
