#!/usr/bin/env python3
"""What a trained model misses on the suite's unseen works, by the generator's own record.

The FluidSynth suite writes each version's recipe into its manifest line ("version": "...,
key +2, octave -1, ..., bass+chords on church organ, ..." or "..., solo, ..."). This reads it
back and reports, for a run's kept checkpoint compared plainly (one reading, no expansion: the
model alone):

- how often the key estimate of ``keyed_chroma`` (:func:`chlib.signal.chroma.key_rotation`)
  disagrees with the one its work's other versions get, on the training works, and by how many
  semitones;
- the test queries' AP when their key agrees with their work's and when it does not, and the
  share of same-work pairs in the query's top 5 by key agreement and by accompaniment.

    python bench/suite/why_missed.py --dataset datasets/fluid660 --run runs/G
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from chlib.core.manifest import read_manifest
from chlib.data.features import feature_path, load_feature
from chlib.model.checkpoint import load_model
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.metrics import per_query_ap
from chlib.retrieval.protocol import track_distances
from chlib.signal.chroma import chroma_from_cqt, key_rotation

_KEY = re.compile(r"key ([+-]\d+)")


def key_offsets(records: list[dict], manifest: Path) -> list[int]:
    """(estimated key - the generator's transposition) mod 12 of each record: equal within a
    work when the estimate is consistent."""
    out = []
    for r in records:
        est = key_rotation(chroma_from_cqt(np.asarray(load_feature(feature_path(r, manifest)))))
        out.append((est - int(_KEY.search(r["version"]).group(1))) % 12)
    return out


def agreement(records: list[dict], offsets: list[int]) -> tuple[np.ndarray, Counter]:
    """Per record: does its offset equal its work's most common one; and the misses' sizes."""
    by_work: dict[str, list[int]] = defaultdict(list)
    for r, o in zip(records, offsets, strict=True):
        by_work[r["work"]].append(o)
    mode = {w: Counter(v).most_common(1)[0][0] for w, v in by_work.items()}
    ok = np.array([o == mode[r["work"]] for r, o in zip(records, offsets, strict=True)])
    misses = Counter(min((o - mode[r["work"]]) % 12, (mode[r["work"]] - o) % 12)
                     for r, o, good in zip(records, offsets, ok, strict=True) if not good)
    return ok, misses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="a suite dataset (train/test.txt)")
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--checkpoint", default="best")
    args = ap.parse_args(argv)
    train_path, test_path = args.dataset / "train.txt", args.dataset / "test.txt"
    train = read_manifest(train_path)
    ok_train, misses = agreement(train, key_offsets(train, train_path))
    total = sum(misses.values())
    print(f"training works: key estimate off for {1 - ok_train.mean():.1%} of {len(train)} "
          "versions; by (semitones, share of misses): "
          + ", ".join(f"{k}: {n / total:.0%}" for k, n in sorted(misses.items())))

    test = [r for r in read_manifest(test_path) if not str(r["perf"]).startswith("sp_")]
    ok, _ = agreement(test, key_offsets(test, test_path))
    model, hp, epoch = load_model(args.run, args.checkpoint, device="cpu")
    plain = hp.updated({"key_variants": [0], "neighbour_expansion": False})
    wins = embed_recordings(model, test, plain, manifest_path=test_path, progress=False)
    dist = track_distances(wins, wins, rule=plain.distance_rule)
    works = np.array([r["work"] for r in test])
    eye = np.eye(len(test), dtype=bool)
    ap_q = per_query_ap(dist, works, works, exclude=eye)
    print(f"test (epoch {epoch}, {len(test)} queries): AP {np.nanmean(ap_q):.3f}; key agrees "
          f"({ok.mean():.0%}) {np.nanmean(ap_q[ok]):.3f}, key off {np.nanmean(ap_q[~ok]):.3f}")
    d = np.where(eye, np.inf, dist)
    rank = np.argsort(np.argsort(d, axis=1), axis=1)  # rank of each reference per query
    solo = np.array(["solo" in r["version"] for r in test])
    tally: dict[str, list[bool]] = defaultdict(list)
    for i, j in zip(*np.nonzero((works[:, None] == works[None]) & ~eye), strict=True):
        top5 = bool(rank[i, j] < 5)
        keys = "both agree" if ok[i] and ok[j] else ("one off" if ok[i] != ok[j] else "both off")
        tally[f"key {keys}"].append(top5)
        tally[f"{'solo' if solo[i] else 'accompanied'} query, "
              f"{'solo' if solo[j] else 'accompanied'} version"].append(top5)
    for name, hits in sorted(tally.items()):
        print(f"  same-work pairs, {name}: {np.mean(hits):.0%} in the top 5 ({len(hits)} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
