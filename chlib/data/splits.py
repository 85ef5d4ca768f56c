"""Train / val / test splits and k folds, by work and by original recording, reproducibly.

Unlike the original (splits over full.txt lines with unseeded ``random``: tempo copies of one
recording leaked across splits, 13.1.1, and nothing was reproducible, 13.1.2), every record sits
with its recording (``source_perf``, else ``perf``) in one split or fold, and everything is drawn
from a ``numpy.random.Generator`` seeded by ``seed`` (independent of the records' file order).
``test_data_unseen`` / ``val_unseen`` hold out that fraction of *all* works (at least one when
> 0, never every work). ``val_data_split`` / ``test_data_split`` give about that fraction of the
seen recordings to val / test: per work ``n x fraction`` rounded down, the leftover to the works
with the largest remainders (random ties). One recording of every seen work stays in train.
"""

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

__all__ = ["Splits", "split_by_work", "write_splits", "read_split", "kfold_groups",
           "group_recordings"]


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
        def works(recs: list[dict]) -> int:
            return len({r["work"] for r in recs})

        lines = [
            f"train: {len(self.train)} records, {works(self.train)} works",
            f"val:   {len(self.val)} records, {works(self.val)} works "
            f"({len(self.val_only_work_ids)} val-only)",
            f"test:  {len(self.test)} records, {works(self.test)} works "
            f"({len(self.test_only_work_ids)} test-only)",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    __str__ = summary


def group_recordings(records: Sequence[dict]) -> dict[str, list[int]]:
    """Map each original recording (``source_perf`` or ``perf``) to the indices of its records.

    Raises :class:`ManifestError` if a record lacks ``perf``/``work`` or if the copies of one
    recording claim different works.
    """
    groups: dict[str, list[int]] = {}
    work_of: dict[str, str] = {}
    for i, rec in enumerate(records):
        if "perf" not in rec or "work" not in rec:
            raise ManifestError(f"record {i} ({rec.get('perf', '?')!r}) has no 'perf' or 'work'")
        src = source_perf(rec)
        if src in work_of and work_of[src] != rec["work"]:
            raise ManifestError(
                f"records of recording {src!r} name two works ({work_of[src]!r} and "
                f"{rec['work']!r}); a tempo copy must keep its source's work"
            )
        work_of[src] = rec["work"]
        groups.setdefault(src, []).append(i)
    return groups


def _work_ids(records: Sequence[dict]) -> dict[str, int]:
    """work -> work_id from the records' ``work_id`` column, else from sorted work names."""
    if all("work_id" in r for r in records):
        out: dict[str, int] = {}
        for r in records:
            if out.setdefault(r["work"], int(r["work_id"])) != int(r["work_id"]):
                raise ManifestError(
                    f"work {r['work']!r} has two work_ids ({out[r['work']]} and {r['work_id']})"
                )
        return out
    return assign_work_ids(r["work"] for r in records)


def _largest_remainder(
    sizes: list[int], capacity: list[int], fraction: float, rng: np.random.Generator
) -> list[int]:
    """Per-work counts summing to about ``fraction`` x sum(sizes), each <= its capacity.

    Floor of each work's quota first; the remaining count goes, one each, to the works with the
    largest fractional remainders (random order among equal remainders).
    """
    if fraction <= 0 or not sizes:
        return [0] * len(sizes)
    quotas = [n * fraction for n in sizes]
    counts = [min(math.floor(q), c) for q, c in zip(quotas, capacity, strict=True)]
    missing = round(sum(sizes) * fraction) - sum(counts)
    if missing <= 0:
        return counts
    tie = rng.random(len(sizes))
    order = sorted(range(len(sizes)), key=lambda j: (-(quotas[j] - math.floor(quotas[j])), tie[j]))
    for j in order:
        if missing == 0:
            break
        if counts[j] < capacity[j]:
            counts[j] += 1
            missing -= 1
    return counts


def _recordings_by_work(records: Sequence[dict], groups: dict[str, list[int]]
                        ) -> dict[str, list[str]]:
    """work -> its original recordings (sorted source perf ids)."""
    work_recs: dict[str, list[str]] = {}
    for src in sorted(groups):
        work_recs.setdefault(records[groups[src][0]]["work"], []).append(src)
    return work_recs


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


def split_by_work(
    records: Sequence[dict],
    *,
    val_data_split: float = 0.0,
    val_unseen: float = 0.0,
    test_data_split: float = 0.0,
    test_data_unseen: float = 0.0,
    seed: int = 1234,
) -> Splits:
    """Split full.txt records into train / val / test by work and by original recording.

    Parameters
    ----------
    records : full.txt-style dicts with ``perf`` and ``work`` (``work_id`` if present is used
        for the held-out id lists; otherwise ids come from sorted work names). Tempo copies are
        recognised by ``source_perf``.
    val_data_split, test_data_split : fraction in [0, 1) of the seen works' *recordings* for
        val and test (overall, see the module docstring for the per-work rule).
    val_unseen, test_data_unseen : fraction in [0, 1) of all works held out entirely for
        val / test (at least 1 work when > 0; at least one work always stays in train).
    seed : seeds a ``numpy.random.Generator``; same records + same seed -> same splits.

    Returns
    -------
    :class:`Splits`, each list in the input's record order.
    """
    for name, v in (("val_data_split", val_data_split), ("val_unseen", val_unseen),
                    ("test_data_split", test_data_split), ("test_data_unseen", test_data_unseen)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"split: {name} must be in [0, 1), got {v}")
    if val_data_split + test_data_split >= 1.0:
        raise ConfigError("split: val_data_split + test_data_split must be < 1")

    rng = np.random.default_rng(seed)
    groups = group_recordings(records)
    ids = _work_ids(records)
    work_recs = _recordings_by_work(records, groups)
    works = sorted(work_recs)
    notes: list[str] = []
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
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i, rec in enumerate(records):
        out[split_of[i]].append(rec)
    return Splits(train=out["train"], val=out["val"], test=out["test"],
                  test_only_work_ids=sorted(ids[w] for w in test_only),
                  val_only_work_ids=sorted(ids[w] for w in val_only), notes=notes)


def write_splits(dataset_dir: str | os.PathLike, splits: Splits) -> dict[str, Path]:
    """Write train.txt, val.txt, test.txt, test-only-work-ids.txt and val-only-work-ids.txt.

    Every file is written, even when empty (so no stale file from an earlier run survives).
    The id files hold one bare integer work_id per line. Returns name -> path.
    """
    d = Path(dataset_dir)
    paths = {name: d / f"{name}.txt" for name in ("train", "val", "test")}
    for name, p in paths.items():
        write_manifest(p, getattr(splits, name))
    for name, ids in (("test-only-work-ids", splits.test_only_work_ids),
                      ("val-only-work-ids", splits.val_only_work_ids)):
        p = d / f"{name}.txt"
        atomic_write_text(p, "".join(f"{int(i)}\n" for i in ids))
        paths[name] = p
    return paths


def read_split(path_or_dataset_dir: str | os.PathLike, split: str | None = None, *,
               required: Sequence[str] = ("perf", "work")) -> list[dict]:
    """Records of a split file with absolute ``wav`` / ``feat`` paths (resolved like chlib does).

    ``read_split(dataset_dir, "test")`` reads ``dataset_dir/test.txt`` (train, val, test, full)
    and gives [] when that file is absent; ``read_split(manifest_path)`` reads that manifest and
    raises ManifestError when it is absent. ``required``: keys every line must have.
    """
    path = Path(path_or_dataset_dir)
    if split is not None:
        path = path / f"{split}.txt"
        if not path.is_file():
            return []
    elif not path.is_file():
        raise ManifestError(f"{path}: split file not found; check the path or run the split step")
    out = []
    for rec in read_manifest(path, required=tuple(required)):
        for k in ("wav", "feat"):
            if rec.get(k):
                rec[k] = str(resolve_path(rec[k], path).resolve())
        out.append(rec)
    return out


def kfold_groups(records: Sequence[dict], k: int, seed: int = 1234) -> list[list[int]]:
    """K folds of record indices, stratified by work and grouped by original recording.

    Each work's recordings are shuffled and dealt round-robin over the folds, continuing from
    where the previous work stopped, so every fold gets about 1/k of each work (for works with
    at least k recordings) and about 1/k of all recordings. All records of one recording (its
    tempo copies) are in the same fold. Fold ``i`` is the validation part of round ``i``; its
    training part is every other index.

    Returns ``k`` sorted lists of indices into ``records`` (together a partition).
    """
    if not isinstance(k, int) or k < 2:
        raise ConfigError(f"kfold: k must be an integer >= 2, got {k!r}")
    groups = group_recordings(records)
    work_recs = _recordings_by_work(records, groups)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    pointer = int(rng.integers(k))
    for w in sorted(work_recs):
        recs = work_recs[w]
        for j in rng.permutation(len(recs)):
            folds[pointer % k].extend(groups[recs[j]])
            pointer += 1
    return [sorted(f) for f in folds]
