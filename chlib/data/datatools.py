"""Looking at datasets: overlap / leakage between two manifests (:func:`compare_datasets`),
recordings per work (:func:`works_histogram`) and the ``query_in_ref`` file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from chlib.core.errors import ManifestError
from chlib.core.io import file_sha256
from chlib.core.manifest import read_manifest, resolve_path, source_perf, write_query_in_ref

__all__ = ["DatasetOverlap", "compare_datasets", "works_histogram", "make_query_in_ref"]


@dataclass
class DatasetOverlap:
    """Overlap between manifests A and B; tempo copies count as their source recording.

    ``same_audio``: ``{"sha256", "perfs_a", "perfs_b"}`` of audio in both sets (perf ids may
    differ); ``duplicates_a`` / ``_b``: ``{"sha256", "perfs"}`` of audio under several ids in one.
    """

    path_a: str
    path_b: str
    n_perfs_a: int
    n_perfs_b: int
    n_works_a: int
    n_works_b: int
    shared_works: list[str]
    shared_perfs: list[str]
    same_audio: list[dict] = field(default_factory=list)
    duplicates_a: list[dict] = field(default_factory=list)
    duplicates_b: list[dict] = field(default_factory=list)
    missing_audio_a: int = 0  # recordings whose wav file was not found or unreadable
    missing_audio_b: int = 0
    hashed: bool = True

    @property
    def same_audio_different_ids(self) -> list[dict]:
        """Entries of ``same_audio`` where no perf id is shared (renamed duplicates)."""
        return [x for x in self.same_audio if not set(x["perfs_a"]) & set(x["perfs_b"])]

    @property
    def leaks(self) -> bool:
        """True if any recording (by perf id or by audio content) is in both sets."""
        return bool(self.shared_perfs or self.same_audio)

    def summary(self) -> str:
        def listed(what: str, names: list[str]) -> str:
            more = " ..." if len(names) > 10 else ""
            return f"{what}: {len(names)}" + (f" ({', '.join(names[:10])}{more})" if names else "")

        lines = [f"A: {self.path_a}: {self.n_perfs_a} perfs, {self.n_works_a} works",
                 f"B: {self.path_b}: {self.n_perfs_b} perfs, {self.n_works_b} works",
                 listed("shared works", self.shared_works),
                 listed("shared perf ids", self.shared_perfs)]
        if self.hashed:
            renamed = self.same_audio_different_ids
            lines.append(f"identical audio in both sets: {len(self.same_audio)} recording(s), "
                         f"{len(renamed)} of them under different perf ids")
            lines += [f"  A {', '.join(x['perfs_a'])} == B {', '.join(x['perfs_b'])}"
                      for x in renamed[:10]]
            lines.append(f"identical audio under several perf ids: {len(self.duplicates_a)} in A, "
                         f"{len(self.duplicates_b)} in B")
            if self.missing_audio_a or self.missing_audio_b:
                lines.append(f"audio files not found or unreadable (not compared): "
                             f"{self.missing_audio_a} in A, {self.missing_audio_b} in B")
        else:
            lines.append("audio content not compared (hash_audio=False)")
        lines.append("LEAKAGE: some recordings are in both sets" if self.leaks
                     else "no recording is in both sets")
        return "\n".join(lines)

    __str__ = summary


def _hash_recordings(records: list[dict], manifest: Path,
                     cache: dict[Path, str | None]) -> tuple[dict[str, list[str]], int]:
    """sha256 -> source perf ids of the recordings whose wav can be read; and the rest's count."""
    # the first record of each recording wins (later ones are overwritten first)
    wav_of = {source_perf(r): r["wav"] for r in reversed(records) if "wav" in r}
    by_hash: dict[str, list[str]] = {}
    missing = 0
    for perf, wav in sorted(wav_of.items()):
        p = resolve_path(wav, manifest)
        key = p.resolve() if p.exists() else p
        if key not in cache:
            try:
                cache[key] = file_sha256(p) if p.is_file() else None
            except OSError:  # no permission: counted like a missing file, the rest goes on
                cache[key] = None
        if cache[key] is None:
            missing += 1
        else:
            by_hash.setdefault(cache[key], []).append(perf)
    return by_hash, missing


def compare_datasets(a_path: str | os.PathLike, b_path: str | os.PathLike, *,
                     hash_audio: bool = True) -> DatasetOverlap:
    """Overlap and leakage between two manifests: works, perf ids and, with ``hash_audio``, the
    SHA-256 of the ``wav`` files (the same recording under two ids). ``print()`` the result."""
    a_path, b_path = Path(a_path), Path(b_path)
    a, b = (read_manifest(p, required=("perf", "work")) for p in (a_path, b_path))
    works_a, works_b = {r["work"] for r in a}, {r["work"] for r in b}
    perfs_a, perfs_b = {r["perf"] for r in a}, {r["perf"] for r in b}
    out = DatasetOverlap(str(a_path), str(b_path), len(perfs_a), len(perfs_b), len(works_a),
                         len(works_b), shared_works=sorted(works_a & works_b),
                         shared_perfs=sorted(perfs_a & perfs_b), hashed=hash_audio)
    if not hash_audio:
        return out
    cache: dict[Path, str | None] = {}
    ha, out.missing_audio_a = _hash_recordings(a, a_path, cache)
    hb, out.missing_audio_b = _hash_recordings(b, b_path, cache)
    out.same_audio = [{"sha256": h, "perfs_a": ha[h], "perfs_b": hb[h]}
                      for h in sorted(ha.keys() & hb.keys())]
    out.duplicates_a = [{"sha256": h, "perfs": p} for h, p in sorted(ha.items()) if len(p) > 1]
    out.duplicates_b = [{"sha256": h, "perfs": p} for h, p in sorted(hb.items()) if len(p) > 1]
    return out


def works_histogram(records: Sequence[dict] | str | os.PathLike) -> pd.Series:
    """Number of works (values) with each number of recordings (index, ascending).

    ``records``: manifest dicts with ``perf`` and ``work``, or a manifest path; tempo copies
    count as their source recording. Drawing is :mod:`chlib.ui`'s business."""
    if isinstance(records, (str, os.PathLike)):
        records = read_manifest(records, required=("perf", "work"))
    if not records:
        raise ManifestError("works_histogram: no records to count")
    recs = pd.DataFrame({"work": [r["work"] for r in records],
                         "recording": [source_perf(r) for r in records]})
    counts = recs.groupby("work")["recording"].nunique().value_counts().sort_index()
    counts.index.name, counts.name = "recordings per work", "works"
    return counts


def make_query_in_ref(query_path: str | os.PathLike, ref_path: str | os.PathLike,
                      out_path: str | os.PathLike) -> list[tuple[int, int]]:
    """Write (and return) the ``query_in_ref`` pairs ``[query_index, ref_index]`` (0-based, file
    order) of every perf in both lists, which evaluation excludes from the ranking (the
    original crashed whenever a perf matched, fact sheet 13.4.5)."""
    query, ref = (read_manifest(p, required=("perf",)) for p in (query_path, ref_path))
    ref_index = {r["perf"]: i for i, r in enumerate(ref)}
    pairs = [(qi, ref_index[q["perf"]]) for qi, q in enumerate(query) if q["perf"] in ref_index]
    write_query_in_ref(out_path, pairs)
    return pairs
