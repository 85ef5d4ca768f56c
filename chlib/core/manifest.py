"""Reading and writing manifests: dataset.txt, full.txt, split files and query/ref lists.

One record per line: a JSON object or the legacy TAB-separated ``key:value`` pairs (known keys
cast; the original's key names mapped by :data:`KEY_RENAMES`). Names (perf, work, source_perf)
are one line of text: a control character is a bad line; work names are read Unicode-NFC and
stripped, and names that differ only in case or spacing are warned about. Writers emit JSON
lines atomically; an empty list is a valid manifest (the original raised)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from chlib.core.errors import ManifestError
from chlib.core.io import atomic_write_text, json_text

__all__ = ["DATASET_KEYS", "FULL_KEYS", "KEY_RENAMES", "MAX_LISTED_PROBLEMS", "ManifestProblem",
           "parse_line", "read_manifest", "write_manifest", "read_work_id_map",
           "write_work_id_map", "assign_work_ids", "read_query_in_ref", "write_query_in_ref",
           "resolve_path", "source_perf"]

#: Required keys of a dataset.txt line.
DATASET_KEYS: tuple[str, ...] = ("perf", "wav", "work")
#: Required keys of a full.txt / split-file line.
FULL_KEYS: tuple[str, ...] = ("perf", "work", "feat", "feat_len", "work_id")
#: The original CoverHunter's key names -> CoverHunterMPS / chlib names.
KEY_RENAMES: dict[str, str] = {"utt": "perf", "song": "work", "song_id": "work_id"}
#: At most this many problems are spelled out in one ManifestError.
MAX_LISTED_PROBLEMS = 20

# keys with a known type; strings must be non-empty, numbers >= 0 (tempo > 0)
_TYPES: dict[str, type] = {
    **dict.fromkeys(("perf", "wav", "work", "feat", "source_perf"), str),
    **dict.fromkeys(("feat_len", "work_id", "len", "start", "version_id"), int),
    **dict.fromkeys(("dur_s", "start_s", "tempo"), float),
}
_WORDS = {str: "a non-empty string", int: "an integer", float: "a finite number"}
_NAME_KEYS = ("perf", "work", "source_perf")  # one line of text each


def _normalise_work(work: str) -> str:
    """A work name as compared: Unicode NFC (composed accents), no surrounding whitespace."""
    return unicodedata.normalize("NFC", work).strip()


def _control_char(text: str) -> str | None:
    """The first control character (tab, newline, ... or a line separator) in ``text``."""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)


@dataclass(frozen=True)
class ManifestProblem:
    """One bad line of a manifest: where it is and what is wrong with it."""

    path: str
    line: int  # 1-based line number
    message: str

    def __str__(self) -> str:
        return f"{self.path} line {self.line}: {self.message}"


def _parse_legacy(line: str) -> dict:
    """TAB-separated ``key:value`` pairs; the value is everything after the first colon."""
    rec: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in line.split("\t"))):
        key, sep, value = part.partition(":")
        if not sep:
            raise ValueError(
                f"field {part[:40]!r} has no ':'; a non-JSON line must be TAB-separated "
                "key:value pairs (or write the line as a JSON object starting with '{')")
        key = key.strip()
        with contextlib.suppress(ValueError):  # left as text; the type check reports it
            value = _TYPES.get(key, str)(value)
        rec[key] = value
    return rec


def _check_types(rec: dict) -> list[str]:
    """Type problems of a parsed record (empty list if fine); known values are cast in place."""
    out = []
    for key, typ in ((k, t) for k, t in _TYPES.items() if k in rec):
        v = rec[key]
        if typ is str:
            ok = isinstance(v, str) and bool(v.strip())
        else:  # a whole float is an int
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (typ is float or float(v).is_integer()))
        if not ok:
            out.append(f"{key} must be {_WORDS[typ]}, got {v!r}")
            continue
        rec[key] = v = typ(v)
        if key in _NAME_KEYS and (c := _control_char(v)) is not None:
            out.append(f"{key} {v!r} contains the control character {c!r}; a name must be one "
                       "line of text without tabs: fix it in the manifest")
        if key == "work":
            rec[key] = _normalise_work(v)
        if typ is not str and (v <= 0 if key == "tempo" else v < 0):
            out.append(f"{key} must be {'>' if key == 'tempo' else '>='} 0, got {v!r}")
    return out


def parse_line(line: str, *, required: Sequence[str] = ()) -> dict:
    """One manifest line (JSON or legacy TAB ``key:value``) as a record, the original's keys
    renamed; a ValueError names bad types of known keys and missing ``required`` keys."""
    line = line.strip()
    if line.startswith("{"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError("a JSON line must be an object {...}")
    else:
        rec = _parse_legacy(line)
    for old, new in KEY_RENAMES.items():
        if old in rec:
            if new in rec and rec[new] != rec[old]:
                raise ValueError(f"both {old!r} and {new!r} are given, with different values")
            rec[new] = rec.pop(old)
    problems = _check_types(rec)
    if missing := [k for k in required if k not in rec]:
        problems.insert(0, f"missing required key(s) {', '.join(map(repr, missing))}")
    if problems:
        raise ValueError("; ".join(problems))
    return rec


def _raise_problems(path: Path, problems: list[ManifestProblem], what: str) -> None:
    """One ManifestError listing ``problems`` (at most MAX_LISTED_PROBLEMS), if there are any."""
    if not problems:
        return
    lines = [f"{path}: {len(problems)} bad line(s) in {what}:"]
    lines += [f"  line {p.line}: {p.message}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    lines.append("Fix these lines (each line must be a JSON object with the keys listed), or "
                 "read with strict=False to skip them.")
    raise ManifestError("\n".join(lines))


def _lines(path: Path, what: str) -> Iterable[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines of a UTF-8 text file."""
    if not path.exists():
        raise ManifestError(f"{path}: {what} not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder, not a {what} file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of line 1
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return [(i, line) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _warn_similar_works(path: Path, first_line: dict[str, int]) -> None:
    """Warn about work names equal after casefold and whitespace collapse (likely one work)."""
    groups: dict[str, list[str]] = {}
    for work in first_line:
        groups.setdefault(" ".join(work.casefold().split()), []).append(work)
    for names in (g for g in groups.values() if len(g) > 1):
        listed = " and ".join(f"{w!r} (line {first_line[w]})" for w in names)
        warnings.warn(f"{path}: work names {listed} differ only in case or spacing and count as "
                      "different works; write them the same way if they are one work",
                      UserWarning, stacklevel=3)


@overload
def read_manifest(path: str | os.PathLike, required: Sequence[str] = ..., *,
                  strict: Literal[True] = ..., unique_key: str | None = ...) -> list[dict]: ...


@overload
def read_manifest(path: str | os.PathLike, required: Sequence[str] = ..., *,
                  strict: Literal[False], unique_key: str | None = ...
                  ) -> tuple[list[dict], list[ManifestProblem]]: ...


def read_manifest(path: str | os.PathLike, required: Sequence[str] = DATASET_KEYS, *,
                  strict: bool = True, unique_key: str | None = "perf"
                  ) -> list[dict] | tuple[list[dict], list[ManifestProblem]]:
    """The records of a manifest, in file order, each with the ``required`` keys (:data:`FULL_KEYS`
    for full.txt and split files) and a unique ``unique_key`` (the first kept). Bad lines raise
    one :class:`ManifestError` listing them all, or with ``strict=False`` come back beside the
    good records as ``(records, problems)``."""
    path = Path(path)
    records: list[dict] = []
    problems: list[ManifestProblem] = []
    seen: dict[Any, int] = {}
    first_line: dict[str, int] = {}  # work -> first line
    for lineno, line in _lines(path, "manifest"):
        try:
            rec = parse_line(line, required=required)
        except ValueError as e:
            problems.append(ManifestProblem(str(path), lineno, str(e)))
            continue
        if unique_key in rec:
            if (value := rec[unique_key]) in seen:
                problems.append(ManifestProblem(str(path), lineno, f"duplicate {unique_key} "
                                                f"{value!r} (first on line {seen[value]})"))
                continue
            seen[value] = lineno
        records.append(rec)
        if "work" in rec:
            first_line.setdefault(rec["work"], lineno)
    _warn_similar_works(path, first_line)
    if not strict:
        return records, problems
    _raise_problems(path, problems, "manifest")
    return records


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"value {obj!r} of type {type(obj).__name__} cannot be written to a manifest")


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records as UTF-8 JSON lines atomically (NumPy values and paths made plain)."""
    lines = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ManifestError(f"{path}: record {i} is a {type(rec).__name__}, not a dict")
        try:
            lines.append(json_text(rec, default=_json_default) + "\n")
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{path}: record {i} cannot be written as JSON: {e}") from None
    atomic_write_text(path, "".join(lines))


def read_work_id_map(path: str | os.PathLike) -> dict[str, int]:
    """``{work: id}`` of ``work_id.map`` (``"<work_id> <work>"`` lines; a work may have spaces)."""
    path = Path(path)
    out: dict[str, int] = {}
    ids: dict[int, int] = {}  # work id -> line
    problems = []
    for lineno, line in _lines(path, "work_id.map"):
        head, _, work = line.strip().partition(" ")
        work = _normalise_work(work)
        wid = int(head) if re.fullmatch(r"-?\d+", head) else None
        if wid is None or not work:
            msg = f"expected '<work_id> <work>', got {line.strip()[:60]!r}"
        elif work in out:
            msg = f"work {work!r} listed twice"
        elif wid in ids:
            msg = f"work_id {wid} also used on line {ids[wid]}"
        else:
            out[work], ids[wid] = wid, lineno
            continue
        problems.append(ManifestProblem(str(path), lineno, msg))
    _raise_problems(path, problems, "work_id map")
    return out


def write_work_id_map(path: str | os.PathLike, mapping: dict[str, int]) -> None:
    """Write ``work_id.map``: ``"<work_id> <work>"`` per line in id order, atomically."""
    if len(set(mapping.values())) != len(mapping):
        raise ManifestError(f"{path}: two works share one work_id; ids must be unique")
    if bad := [w for w in mapping if "\n" in w or not w.strip()]:
        raise ManifestError(f"{path}: work name {bad[0]!r} is empty or contains a newline")
    lines = [f"{wid} {work}\n" for work, wid in sorted(mapping.items(), key=lambda kv: kv[1])]
    atomic_write_text(path, "".join(lines))


def assign_work_ids(works: Iterable[str]) -> dict[str, int]:
    """Deterministic work ids: 0.. over the SORTED distinct work names (reproducible)."""
    return {w: i for i, w in enumerate(sorted(set(works)))}


def source_perf(record: dict) -> str:
    """The original recording a record comes from (its ``source_perf``, else its ``perf``)."""
    return record.get("source_perf") or record["perf"]


def read_query_in_ref(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Read a query_in_ref file: first line ``{"query_in_ref": [[qi, ri], ...]}``."""
    path = Path(path)
    first = next((line for _, line in _lines(path, "query_in_ref file")), "")
    try:
        obj = json.loads(first) if first else {}
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:1: malformed JSON ({e.msg})") from None
    pairs = obj.get("query_in_ref") if isinstance(obj, dict) else None
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)
            for p in pairs):
        raise ManifestError(f"{path}:1: expected {{\"query_in_ref\": [[query_index, ref_index],"
                            " ...]}} with non-negative integer indices")
    return [(int(a), int(b)) for a, b in pairs]


def write_query_in_ref(path: str | os.PathLike, pairs: Iterable[tuple[int, int]]) -> None:
    """Write ``{"query_in_ref": [[qi, ri], ...]}`` as a single line, atomically."""
    body = {"query_in_ref": [[int(a), int(b)] for a, b in pairs]}
    atomic_write_text(path, json_text(body) + "\n")


def resolve_path(value: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> Path:
    """The file a manifest path names: a relative one beside the manifest if it exists there
    (chlib's ``feat`` paths, so a dataset can move), else as given (the original's way)."""
    p = Path(value)
    if p.is_absolute() or manifest_path is None:
        return p
    beside = Path(manifest_path).parent / p
    return beside if beside.exists() else p
