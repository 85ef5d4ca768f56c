"""Speed of the demo-data generator (chlib.demo), on CPU.

1. Tune selection from a warm cache: ``demo_tunes(6)`` a second time (no music21 parsing).
   Target < 2 s (parsing 6 tunes with music21 takes ~1 s or more).
2. A tiny dataset, 4 works x 3 versions x 8-10 s, rendered in this process. Target < 20 s
   (~1-2 s on an idle 2-core machine).
3. The same dataset with 2 worker processes (spawn start-up included), for comparison.

Run: ``.venv/bin/python bench/bench_demo.py`` (well under a minute once the tunes are cached).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from chlib.demo import demo_tunes, make_demo_dataset

TARGET_CACHED_TUNES_S = 2.0
TARGET_TINY_S = 20.0
TINY = dict(n_works=4, perfs_per_work=3, min_seconds=8.0, max_seconds=10.0, seed=0,
            progress=False)


def report(name: str, seconds: float, target: float | None = None) -> None:
    ratio = f"  ({seconds / target:.2f} x target {target:g} s)" if target else ""
    print(f"{name:<44s} {seconds:8.2f} s{ratio}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "tunes"
        t0 = time.perf_counter()
        demo_tunes(6, seed=0, cache_dir=cache)
        report("demo_tunes(6), cold cache (music21 parse)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        demo_tunes(6, seed=0, cache_dir=cache)
        report("demo_tunes(6), warm cache", time.perf_counter() - t0, TARGET_CACHED_TUNES_S)
        t0 = time.perf_counter()
        make_demo_dataset(Path(tmp) / "serial", cache_dir=cache, num_workers=0, **TINY)
        report("tiny dataset (12 x 8-10 s), in process", time.perf_counter() - t0,
               TARGET_TINY_S)
        t0 = time.perf_counter()
        make_demo_dataset(Path(tmp) / "pool", cache_dir=cache, num_workers=2, **TINY)
        report("tiny dataset (12 x 8-10 s), 2 workers", time.perf_counter() - t0, TARGET_TINY_S)


if __name__ == "__main__":
    main()
