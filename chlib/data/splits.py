"""Train / val / test splits and k folds, by work and by original recording, reproducibly.

Unlike the original (unseeded splits of full.txt lines that leaked tempo copies across splits,
13.1.1-2), every record sits with its recording (``source_perf``, else ``perf``) in one split or
fold, drawn from a ``numpy.random.Generator`` seeded by ``seed``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chlib.core.errors import ConfigError, ManifestError
from chlib.core.io import atomic_write_text
from chlib.core.manifest import (
    assign_work_ids,
    read_manifest,
    resolve_path,
    source_perf,
    write_manifest,
)

__all__ = ["Splits", "split_by_work", "write_splits", "read_split", "kfold_groups"]


@dataclass
class Splits:
    """The three record lists and the works held out entirely (by work_id)."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    test_only_work_ids: list[int]
    val_only_work_ids: list[int]
    notes: list[str] = field(default_factory=list)  # adjustments made (e.g. fewer unseen works)

    def summary(self) -> str:
        held = {"val": f" ({len(self.val_only_work_ids)} val-only)",
                "test": f" ({len(self.test_only_work_ids)} test-only)"}
        lines = [f"{name + ':':6} {len(recs)} records, {len({r['work'] for r in recs})} works"
                 f"{held.get(name, '')}"
                 for name, recs in (("train", self.train), ("val", self.val), ("test", self.test))]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    __str__ = summary


def _group_recordings(records: Sequence[dict]) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """``(recording -> indices of its records, work -> its sorted recordings)``; a recording is
    ``source_perf`` or ``perf``."""
    groups: dict[str, list[int]] = {}  # recording -> its records
    work_of: dict[str, str] = {}  # recording -> its work
    for i, rec in enumerate(records):
        if "perf" not in rec or "work" not in rec:
            raise ManifestError(f"record {i} ({rec.get('perf', '?')!r}) has no 'perf' or 'work'")
        src = source_perf(rec)
        if src in work_of and work_of[src] != rec["work"]:
            raise ManifestError(f"records of recording {src!r} name two works ({work_of[src]!r} "
                                f"and {rec['work']!r}); a tempo copy must keep its source's work")
        work_of[src] = rec["work"]
        groups.setdefault(src, []).append(i)
    work_recs: dict[str, list[str]] = {}
    for src in sorted(groups):
        work_recs.setdefault(work_of[src], []).append(src)
    return groups, work_recs


def _work_ids(records: Sequence[dict]) -> dict[str, int]:
    """work -> work_id from the records' ``work_id`` column, else from sorted work names."""
    if all("work_id" in r for r in records):
        out: dict[str, int] = {}
        for r in records:
            if out.setdefault(r["work"], int(r["work_id"])) != int(r["work_id"]):
                raise ManifestError(f"work {r['work']!r} has two work_ids ({out[r['work']]} "
                                    f"and {r['work_id']})")
        return out
    return assign_work_ids(r["work"] for r in records)


def _largest_remainder(sizes: list[int], capacity: list[int], fraction: float,
                       rng: np.random.Generator) -> list[int]:
    """Per-work counts summing to about ``fraction`` x sum(sizes), each <= its capacity: floors
    first, the rest one each to the largest remainders (random ties)."""
    if fraction <= 0 or not sizes:
        return [0] * len(sizes)
    quotas = [n * fraction for n in sizes]
    counts = [min(math.floor(q), c) for q, c in zip(quotas, capacity, strict=True)]
    if (missing := round(sum(sizes) * fraction) - sum(counts)) <= 0:
        return counts
    tie = rng.random(len(sizes))
    order = sorted(range(len(sizes)), key=lambda j: (-(quotas[j] - math.floor(quotas[j])), tie[j]))
    for j in [j for j in order if counts[j] < capacity[j]][:missing]:
        counts[j] += 1
    return counts


def _hold_out(works: list[str], n_works: int, fraction: float, what: str,
              rng: np.random.Generator, notes: list[str]) -> list[str]:
    """``fraction`` x ``n_works`` (at least 1) of ``works`` drawn at random, leaving >= 1."""
    if fraction <= 0:
        return []
    wanted = max(1, int(n_works * fraction))
    n = min(wanted, max(0, len(works) - 1))
    if n < wanted:
        notes.append(f"{what}: {n} work(s) held out instead of {wanted} (need >= 1 train work)")
    return sorted(rng.choice(works, size=n, replace=False).tolist()) if n else []


def split_by_work(records: Sequence[dict], *, val_data_split: float = 0.0,
                  val_unseen: float = 0.0, test_data_split: float = 0.0,
                  test_data_unseen: float = 0.0, seed: int = 1234) -> Splits:
    """Split full.txt records (``perf``, ``work``, optional ``work_id``) into train / val / test.

    ``test_data_unseen`` / ``val_unseen``: fraction of *all* works held out (at least one when
    > 0, never every work). ``val_data_split`` / ``test_data_split``: about that fraction of the
    seen recordings (per work rounded down, the rest by largest remainder); one recording of
    every seen work stays in train. Each list keeps the input's record order."""
    for name, v in (("val_data_split", val_data_split), ("val_unseen", val_unseen),
                    ("test_data_split", test_data_split), ("test_data_unseen", test_data_unseen)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"split: {name} must be in [0, 1), got {v}")
    if val_data_split + test_data_split >= 1.0:
        raise ConfigError("split: val_data_split + test_data_split must be < 1")

    rng, notes = np.random.default_rng(seed), []
    groups, work_recs = _group_recordings(records)
    ids, works = _work_ids(records), sorted(work_recs)
    test_only = _hold_out(works, len(works), test_data_unseen, "test_data_unseen", rng, notes)
    rest = [w for w in works if w not in test_only]
    val_only = _hold_out(rest, len(works), val_unseen, "val_unseen", rng, notes)
    seen = [w for w in rest if w not in val_only]

    where: dict[str, str] = {}  # recording -> split name
    for name, held in (("test", test_only), ("val", val_only)):
        where.update({src: name for w in held for src in work_recs[w]})
    sizes = [len(work_recs[w]) for w in seen]
    capacity = [n - 1 for n in sizes]  # one recording of each seen work stays in train
    n_val = _largest_remainder(sizes, capacity, val_data_split, rng)
    capacity = [c - v for c, v in zip(capacity, n_val, strict=True)]
    n_test = _largest_remainder(sizes, capacity, test_data_split, rng)
    for w, nv, nt in zip(seen, n_val, n_test, strict=True):
        order = [work_recs[w][j] for j in rng.permutation(len(work_recs[w]))]
        for k, src in enumerate(order):
            where[src] = "val" if k < nv else "test" if k < nv + nt else "train"

    split_of = {i: where[src] for src, idxs in groups.items() for i in idxs}
    return Splits(**{name: [r for i, r in enumerate(records) if split_of[i] == name]
                     for name in ("train", "val", "test")},
                  test_only_work_ids=sorted(ids[w] for w in test_only),
                  val_only_work_ids=sorted(ids[w] for w in val_only), notes=notes)


def write_splits(dataset_dir: str | os.PathLike, splits: Splits) -> dict[str, Path]:
    """Write train, val, test and the {test,val}-only-work-ids ``.txt`` files (one bare work_id
    a line), even when empty, so no stale file survives. Returns name -> path."""
    d = Path(dataset_dir)
    paths = {name: d / f"{name}.txt" for name in ("train", "val", "test")}
    for name, p in paths.items():
        write_manifest(p, getattr(splits, name))
    for name, ids in (("test-only-work-ids", splits.test_only_work_ids),
                      ("val-only-work-ids", splits.val_only_work_ids)):
        paths[name] = d / f"{name}.txt"
        atomic_write_text(paths[name], "".join(f"{int(i)}\n" for i in ids))
    return paths


def read_split(path_or_dataset_dir: str | os.PathLike, split: str | None = None, *,
               required: Sequence[str] = ("perf", "work")) -> list[dict]:
    """Records of a split file with absolute ``wav`` / ``feat`` paths.

    ``read_split(dataset_dir, "test")``: ``dataset_dir/test.txt``, [] when absent;
    ``read_split(manifest_path)``: that file, ManifestError when absent."""
    path = Path(path_or_dataset_dir)
    if split is not None:
        path = path / f"{split}.txt"
        if not path.is_file():
            return []
    elif not path.is_file():
        raise ManifestError(f"{path}: split file not found; check the path or run the split step")
    records = read_manifest(path, required=tuple(required))
    for rec in records:
        rec.update({k: str(resolve_path(rec[k], path).resolve()) for k in ("wav", "feat")
                    if rec.get(k)})
    return records


def kfold_groups(records: Sequence[dict], k: int, seed: int = 1234) -> list[list[int]]:
    """``k`` sorted lists of record indices (a partition), stratified by work and grouped by
    recording: each work's shuffled recordings are dealt round-robin over the folds, continuing
    where the previous work stopped."""
    if not isinstance(k, int) or k < 2:
        raise ConfigError(f"kfold: k must be an integer >= 2, got {k!r}")
    groups, work_recs = _group_recordings(records)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    pointer = int(rng.integers(k))
    for _, recs in sorted(work_recs.items()):
        for j in rng.permutation(len(recs)):
            folds[pointer % k].extend(groups[recs[j]])
            pointer += 1
    return [sorted(f) for f in folds]
