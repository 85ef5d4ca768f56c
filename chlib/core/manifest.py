"""Reading and writing manifests: dataset.txt, full.txt, split files and query/ref lists.

One record per line, in either of the two formats CoverHunter(MPS) reads: a JSON object (e.g.
``{"perf": "cover80_00000000_0_0", "wav": "data/a.wav", "dur_s": 231.4, "work": "A_Song"}``) or
the legacy TAB-separated ``key:value`` pairs (the value is everything after the first colon;
the original kept every legacy value a string except ``len``, chlib also casts the numeric keys
it knows so that both formats give the same records). Blank lines are skipped; the original's
key names are mapped on read (``utt`` -> ``perf``, ``song`` -> ``work``, ``song_id`` ->
``work_id``). Every line is validated and all problems of a file are reported together with
file name and line number, or, with ``strict=False``, returned beside the good records.

Writers emit one JSON object per line (UTF-8, non-ASCII kept), atomically. Unlike the original,
an empty list is a valid, empty manifest (e.g. ``val.txt`` when ``val_data_split`` is 0).
Paths inside manifests (``wav``, ``feat``) are stored as written; :func:`resolve_path` finds
the file they name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from chlib.core.errors import ManifestError
from chlib.core.io import atomic_write_text

__all__ = [
    "DATASET_KEYS",
    "FULL_KEYS",
    "KEY_RENAMES",
    "MAX_LISTED_PROBLEMS",
    "ManifestProblem",
    "parse_line",
    "read_manifest",
    "write_manifest",
    "read_work_id_map",
    "write_work_id_map",
    "assign_work_ids",
    "read_query_in_ref",
    "write_query_in_ref",
    "resolve_path",
    "source_perf",
]

#: Required keys of a dataset.txt line.
DATASET_KEYS: tuple[str, ...] = ("perf", "wav", "work")
#: Required keys of a full.txt / split-file line.
FULL_KEYS: tuple[str, ...] = ("perf", "work", "feat", "feat_len", "work_id")
#: The original CoverHunter's key names -> CoverHunterMPS / chlib names.
KEY_RENAMES: dict[str, str] = {"utt": "perf", "song": "work", "song_id": "work_id"}
#: At most this many problems are spelled out in one ManifestError.
MAX_LISTED_PROBLEMS = 20

# Keys with a known type. Strings must be non-empty.
_STR_KEYS = ("perf", "wav", "work", "feat", "source_perf")
_INT_KEYS = ("feat_len", "work_id", "len", "start", "version_id")
_FLOAT_KEYS = ("dur_s", "start_s", "tempo")
_NON_NEGATIVE = ("feat_len", "work_id", "len", "start", "version_id", "dur_s", "start_s")


@dataclass(frozen=True)
class ManifestProblem:
    """One bad line of a manifest: where it is and what is wrong with it."""

    path: str
    line: int  # 1-based line number
    message: str

    def __str__(self) -> str:
        return f"{self.path} line {self.line}: {self.message}"


# --------------------------------------------------------------------------------------------
# parsing one line


def _cast_legacy(key: str, value: str) -> Any:
    """Legacy ``key:value`` values are strings; cast the keys whose type chlib knows."""
    cast = int if key in _INT_KEYS else float if key in _FLOAT_KEYS else str
    try:
        return cast(value)
    except ValueError:
        return value  # left as a string; the type check reports it


def _parse_legacy(line: str) -> dict:
    rec: dict[str, Any] = {}
    for part in line.split("\t"):
        part = part.strip()
        if not part:
            continue
        if ":" not in part:
            raise ValueError(
                f"field {part[:40]!r} has no ':'; a non-JSON line must be TAB-separated "
                "key:value pairs (or write the line as a JSON object starting with '{')"
            )
        key, value = part.split(":", 1)
        rec[key.strip()] = _cast_legacy(key.strip(), value)
    return rec


def _check_types(rec: dict) -> list[str]:
    """Type problems of a parsed record (empty list if fine)."""
    out = []
    for k in _STR_KEYS:
        if k in rec and (not isinstance(rec[k], str) or not rec[k].strip()):
            out.append(f"{k} must be a non-empty string, got {rec[k]!r}")
    for k in _INT_KEYS:
        if k in rec:
            v = rec[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                isinstance(v, float) and not v.is_integer()
            ):
                out.append(f"{k} must be an integer, got {v!r}")
            else:
                rec[k] = int(v)
    for k in _FLOAT_KEYS:
        if k in rec:
            v = rec[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                out.append(f"{k} must be a finite number, got {v!r}")
            else:
                rec[k] = float(v)
    for k in _NON_NEGATIVE:
        if k in rec and isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool):
            if rec[k] < 0:
                out.append(f"{k} must be >= 0, got {rec[k]!r}")
    if "tempo" in rec and isinstance(rec["tempo"], float) and rec["tempo"] <= 0:
        out.append(f"tempo must be > 0, got {rec['tempo']!r}")
    return out


def parse_line(line: str, *, required: Sequence[str] = ()) -> dict:
    """Parse one manifest line (JSON object or legacy TAB ``key:value``) into a record.

    Renames the original's keys (``utt``/``song``/``song_id``), checks the types of known keys
    and that every key in ``required`` is present. Raises ``ValueError`` with a short message
    (no file name: :func:`read_manifest` adds file and line).
    """
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
    missing = [k for k in required if k not in rec]
    if missing:
        problems.insert(0, f"missing required key(s) {', '.join(map(repr, missing))}")
    if problems:
        raise ValueError("; ".join(problems))
    return rec


# --------------------------------------------------------------------------------------------
# reading and writing whole files


def _format_problems(path: Path, problems: list[ManifestProblem], what: str) -> str:
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"{path}: {len(problems)} bad line(s) in {what}:"]
    lines += [f"  line {p.line}: {p.message}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    lines.append(
        "Fix these lines (each line must be a JSON object with the keys listed), or read with "
        "strict=False to skip them."
    )
    return "\n".join(lines)


@overload
def read_manifest(
    path: str | os.PathLike,
    required: Sequence[str] = ...,
    *,
    strict: Literal[True] = ...,
    unique_key: str | None = ...,
) -> list[dict]: ...


@overload
def read_manifest(
    path: str | os.PathLike,
    required: Sequence[str] = ...,
    *,
    strict: Literal[False],
    unique_key: str | None = ...,
) -> tuple[list[dict], list[ManifestProblem]]: ...


def read_manifest(
    path: str | os.PathLike,
    required: Sequence[str] = DATASET_KEYS,
    *,
    strict: bool = True,
    unique_key: str | None = "perf",
) -> list[dict] | tuple[list[dict], list[ManifestProblem]]:
    """Read a manifest (dataset.txt, full.txt, train/val/test.txt, query/ref list).

    Parameters
    ----------
    path : the file; JSON lines or legacy TAB ``key:value`` lines, blank lines skipped.
    required : keys every record must have (default ``("perf", "wav", "work")``; use
        :data:`FULL_KEYS` for full.txt and split files, ``()`` for anything).
    strict : True (default): any bad line raises one :class:`ManifestError` listing every
        problem (file, line number, reason; at most 20 spelled out). False: return
        ``(good_records, problems)`` instead, so a batch job can skip bad lines.
    unique_key : a key whose values must be unique (default ``"perf"``; None to allow
        duplicates, e.g. when the caller de-duplicates itself). A repeated value is a problem on
        the later line; the first occurrence is kept.

    Returns
    -------
    list of dicts in file order (strict), or ``(records, problems)``.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest file not found")
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; give the manifest file (e.g. dataset.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"{path}: not UTF-8 text (byte {e.start}); save the manifest as UTF-8"
        ) from None
    records: list[dict] = []
    problems: list[ManifestProblem] = []
    seen: dict[Any, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = parse_line(line, required=required)
        except ValueError as e:
            problems.append(ManifestProblem(str(path), lineno, str(e)))
            continue
        if unique_key is not None and unique_key in rec:
            value = rec[unique_key]
            if value in seen:
                problems.append(ManifestProblem(
                    str(path), lineno,
                    f"duplicate {unique_key} {value!r} (first on line {seen[value]})",
                ))
                continue
            seen[value] = lineno
        records.append(rec)
    if not strict:
        return records, problems
    if problems:
        raise ManifestError(_format_problems(path, problems, "manifest"))
    return records


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"value {obj!r} of type {type(obj).__name__} cannot be written to a manifest")


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records as JSON lines (one object per line, UTF-8, trailing newline), atomically.

    NumPy scalars and paths are converted to plain JSON values. An empty ``records`` writes an
    empty file (allowed in chlib; the original raised).
    """
    lines = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ManifestError(f"{path}: record {i} is a {type(rec).__name__}, not a dict")
        try:
            lines.append(json.dumps(rec, ensure_ascii=False, default=_json_default))
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{path}: record {i} cannot be written as JSON: {e}") from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------------
# work ids


def read_work_id_map(path: str | os.PathLike) -> dict[str, int]:
    """Read ``work_id.map`` (``"<work_id> <work>"`` per line, the fork's order) -> {work: id}.

    The work string is everything after the first space (it may contain spaces).
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: work_id.map not found")
    out: dict[str, int] = {}
    ids: dict[int, int] = {}
    problems = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        head, sep, work = line.strip().partition(" ")
        try:
            wid = int(head)
        except ValueError:
            wid = None
        if not sep or wid is None or not work:
            problems.append(ManifestProblem(
                str(path), lineno, f"expected '<work_id> <work>', got {line.strip()[:60]!r}"))
            continue
        if work in out:
            problems.append(ManifestProblem(str(path), lineno, f"work {work!r} listed twice"))
            continue
        if wid in ids:
            problems.append(ManifestProblem(
                str(path), lineno, f"work_id {wid} also used on line {ids[wid]}"))
            continue
        out[work] = wid
        ids[wid] = lineno
    if problems:
        raise ManifestError(_format_problems(path, problems, "work_id map"))
    return out


def write_work_id_map(path: str | os.PathLike, mapping: dict[str, int]) -> None:
    """Write ``work_id.map``: ``"<work_id> <work>"`` per line in id order, atomically."""
    ids = list(mapping.values())
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{path}: two works share one work_id; ids must be unique")
    for w in mapping:
        if "\n" in w or not w.strip():
            raise ManifestError(f"{path}: work name {w!r} is empty or contains a newline")
    lines = [f"{wid} {work}\n" for work, wid in sorted(mapping.items(), key=lambda kv: kv[1])]
    atomic_write_text(path, "".join(lines))


def assign_work_ids(works: Iterable[str]) -> dict[str, int]:
    """Deterministic work ids: 0.. over the SORTED distinct work names (reproducible)."""
    return {w: i for i, w in enumerate(sorted(set(works)))}


def source_perf(record: dict) -> str:
    """The original recording a record comes from (its ``source_perf``, else its ``perf``)."""
    return record.get("source_perf") or record["perf"]


# --------------------------------------------------------------------------------------------
# query-in-ref files


def read_query_in_ref(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Read a query_in_ref file: first line ``{"query_in_ref": [[qi, ri], ...]}``."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: query_in_ref file not found")
    first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    try:
        obj = json.loads(first) if first else {}
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:1: malformed JSON ({e.msg})") from None
    pairs = obj.get("query_in_ref") if isinstance(obj, dict) else None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x >= 0 for x in p)
        for p in pairs
    ):
        raise ManifestError(
            f"{path}:1: expected {{\"query_in_ref\": [[query_index, ref_index], ...]}} with "
            "non-negative integer indices"
        )
    return [(int(a), int(b)) for a, b in pairs]


def write_query_in_ref(path: str | os.PathLike, pairs: Iterable[tuple[int, int]]) -> None:
    """Write ``{"query_in_ref": [[qi, ri], ...]}`` as a single line, atomically."""
    body = {"query_in_ref": [[int(a), int(b)] for a, b in pairs]}
    atomic_write_text(path, json.dumps(body, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# paths


def resolve_path(value: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> Path:
    """The file a manifest path names.

    Absolute paths are returned as they are. A relative path is tried first relative to the
    folder holding the manifest (chlib writes ``feat`` paths relative to the dataset folder, so
    a dataset folder can be moved or zipped), then as given, i.e. relative to the current
    directory (the original's convention: paths relative to the repository root). If neither
    exists the as-given path is returned (the caller reports it as missing).
    """
    p = Path(value)
    if p.is_absolute() or manifest_path is None:
        return p
    beside = Path(manifest_path).parent / p
    if beside.exists():
        return beside
    return p
