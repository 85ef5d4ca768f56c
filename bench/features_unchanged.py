#!/usr/bin/env python3
"""Re-extract some recordings of an extracted dataset with the current code and compare them with
the features already on disk (written by an earlier version): are the features unchanged?

    python bench/features_unchanged.py datasets/fluid260 [--n 24] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chlib.core.config import FeatureSettings
from chlib.data.splits import read_split
from chlib.signal.audio import load_audio, peak_normalise
from chlib.signal.cqt import compute_cqt_db_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--n", type=int, default=24, help="recordings, spread over full.txt")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    recs = read_split(args.dataset, "full", required=("perf", "wav", "feat"))  # absolute paths
    recs = recs[:: max(1, len(recs) // args.n)][: args.n]
    settings = FeatureSettings(**json.loads((args.dataset / "features.json").read_text()))
    signals = [peak_normalise(load_audio(r["wav"], sample_rate=settings.sample_rate))
               for r in recs]
    new = compute_cqt_db_batch(signals, settings, device="cpu", batch_size=args.batch_size)
    diff = [float(np.abs(n - np.load(r["feat"])).max())
            for n, r in zip(new, recs, strict=True)]
    print(f"{len(recs)} recordings of {args.dataset}: max |new - old| = {max(diff):.2e} dB, "
          f"{sum(d == 0 for d in diff)} identical")


if __name__ == "__main__":
    main()
