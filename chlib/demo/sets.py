"""Demo sets: recordings played back to back, as sessions play 2-4 tunes in a set, with the
ground truth of which tune plays where (issue 12). :func:`make_sets` writes, in ``out_dir``,
``set_NNN.wav`` (mono 16-bit PCM), ``sets_info.json`` (settings, unreadable inputs) and
``sets.jsonl``, one JSON object a line::

    {"set": "set_000", "wav": "set_000.wav", "duration_s": 64.1, "sample_rate": 16000,
     "segments": [{"start_s": 0.0, "end_s": 30.85, "work": "...", "perf": "..."}, ...],
     "joins": [{"kind": "crossfade", "start_s": 30.1, "end_s": 31.6}, ...],
     "key": "...", "sha256": "..."}

``wav`` is relative to the folder of ``sets.jsonl`` (the folder can move); :func:`read_sets`
returns it absolute. Segments are in time order; at a crossfade both tunes' segments meet at its
midpoint, a gap belongs to no segment. Join mix, drawn per join: a gap with probability
``gap_share`` (0.5-3 s; half digital silence, half white noise at -50 dBFS RMS), else an
equal-power crossfade or a hard cut, equally likely."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from chlib.core.errors import AudioError, ChlibError, ConfigError, ManifestError
from chlib.core.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    folder_lock,
    json_text,
    read_jsonl,
    stable_hash,
    write_json,
)
from chlib.data.splits import read_split
from chlib.signal.audio import audio_info, iter_load_audio, try_load_audio

__all__ = ["SETS_FILE", "PART_PEAK", "NOISE_DBFS", "GAP_RANGE_S", "make_sets", "make_demo_sets",
           "sets_for",
           "read_sets"]

SETS_FILE = "sets.jsonl"  #: the ground truth's name inside a sets folder
PART_PEAK = 0.7  #: each part's peak; two parts in an equal-power crossfade stay under 0.99
NOISE_DBFS = -50.0  #: RMS level of the quiet noise in half of the gaps, dB re full scale
GAP_RANGE_S = (0.5, 3.0)  #: a gap's length in seconds, drawn uniformly
_VERSION = 1  # bump when the mixing changes: every set is rendered again
_KEEP_SAMPLES = 1 << 27  # decoded inputs kept in memory up to 512 MB; beyond, re-read per set
_TOL_S = 1e-3  # read_sets: times may exceed duration_s by rounding


def _plan(works: list[str], n_sets: int, min_works: int, max_works: int, gap_share: float,
          rng: np.random.Generator) -> list[dict]:
    """Per set: indices into ``works`` (distinct works; from a shuffled deck, so every recording
    is used once before any is used twice) and its joins. Sizes min..max in equal numbers (+-1)."""
    top = min(max_works, len(set(works)))
    sizes = rng.permutation([min_works + i % (top - min_works + 1) for i in range(n_sets)])
    deck: list[int] = []
    plans = []
    for size in sizes:
        parts: list[int] = []
        while len(parts) < size:
            taken = {works[p] for p in parts}
            if (pick := next((j for j in deck if works[j] not in taken), None)) is None:
                deck += rng.permutation(len(works)).tolist()
                continue
            deck.remove(pick)
            parts.append(pick)
        joins = []
        for _ in range(size - 1):
            if (u := rng.random()) < gap_share:
                joins.append({"kind": "gap", "gap_s": round(float(rng.uniform(*GAP_RANGE_S)), 3),
                              "noise": bool(rng.random() < 0.5)})
            else:
                joins.append({"kind": "crossfade" if u < (1 + gap_share) / 2 else "cut"})
        plans.append({"parts": parts, "joins": joins})
    return plans


def _mix(parts: list[np.ndarray], joins: list[dict], *, sr: int, crossfade_s: float,
         rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]], list[list[float]]]:
    """Join mono float32 ``parts`` [n_i] at ``sr`` Hz: (signal [n], each part's [start, end) and
    each join's span, in samples). A crossfade takes at most half of either part."""
    y, spans, join_spans = parts[0], [[0.0, float(len(parts[0]))]], []
    for prev, part, join in zip(parts, parts[1:], joins, strict=False):
        end = len(y)
        n = min(round(crossfade_s * sr), len(prev) // 2, len(part) // 2) \
            if join["kind"] == "crossfade" else 0
        theta = (np.arange(n) + 0.5) * (np.pi / 2 / max(n, 1))  # equal power: cos^2 + sin^2 = 1
        faded = y[end - n:] * np.cos(theta) + part[:n] * np.sin(theta)
        g = round(join.get("gap_s", 0.0) * sr)
        gap = (rng.normal(0.0, 10 ** (NOISE_DBFS / 20), g) if join.get("noise") else np.zeros(g))
        y = np.concatenate([y[:end - n], faded.astype(np.float32), gap.astype(np.float32),
                            part[n:]])
        spans[-1][1] = end - n / 2  # a crossfade's midpoint; a cut's or gap's start
        spans.append([end - n / 2 + g, float(len(y))])
        join_spans.append([float(end - n), float(end + g)])
    return y, spans, join_spans


def _wav_bytes(y: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(y, -1.0, 1.0), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _first_rate(records: Sequence[dict]) -> int:
    """The sample rate of the first file whose header reads (16 kHz if none does)."""
    for r in records:
        with contextlib.suppress(AudioError):
            return audio_info(r["wav"])[1]
    return 16000


def _load(path: str, sr: int) -> np.ndarray:
    """A part as mixed: mono float32 at ``sr`` Hz, peak :data:`PART_PEAK`."""
    y, why = try_load_audio(path, sample_rate=sr, normalise=True)
    if y is None:
        raise AudioError(f"{why} (it read earlier in this run: was it changed?)")
    return y * np.float32(PART_PEAK / 0.999)


def _is_current(out_dir: Path, rec: dict, key: str) -> bool:
    with contextlib.suppress(OSError, KeyError, TypeError):
        return rec.get("key") == key and file_sha256(out_dir / rec["wav"]) == rec.get("sha256")
    return False


def _render(name: str, parts: list[np.ndarray], recs: list[dict], joins: list[dict], *,
            out_dir: Path, sr: int, crossfade_s: float, rng: np.random.Generator) -> dict:
    """Mix one set, write its wav atomically; its sets.jsonl record (less ``key``)."""
    y, spans, join_spans = _mix(parts, joins, sr=sr, crossfade_s=crossfade_s, rng=rng)
    atomic_write_bytes(out_dir / f"{name}.wav", data := _wav_bytes(y, sr))
    sec = lambda n: round(n / sr, 4)  # noqa: E731
    return {"set": name, "wav": f"{name}.wav", "duration_s": round(len(y) / sr, 6),
            "sample_rate": sr,
            "segments": [{"start_s": sec(a), "end_s": sec(b), "work": r["work"], "perf": r["perf"]}
                         for (a, b), r in zip(spans, recs, strict=True)],
            "joins": [{"kind": j["kind"], "start_s": sec(a), "end_s": sec(b)}
                      for j, (a, b) in zip(joins, join_spans, strict=True)],
            "sha256": hashlib.sha256(data).hexdigest()}


def make_sets(records: Sequence[dict], out_dir: str | os.PathLike, *, n_sets: int = 40,
              min_works: int = 2, max_works: int = 4, seed: int = 0, crossfade_s: float = 1.5,
              gap_share: float = 0.3, sample_rate: int | None = None) -> Path:
    """Join ``records`` (manifest records with perf, work, wav) into ``n_sets`` sets of
    ``min_works``..``max_works`` recordings of distinct works (at most as many as there are
    works); return the ``sets.jsonl`` path (format and join mix: the module's docstring).

    ``crossfade_s``: seconds >= 0 (0: crossfades become cuts; at most half of either part);
    ``gap_share``: 0..1, the share of joins that are gaps; ``sample_rate``: Hz of the sets,
    default the first readable file's. Parts are mono, resampled and peak-normalised to
    :data:`PART_PEAK`. Deterministic in ``seed``. Resumable: a set whose wav matches its entry
    (same input contents, by hash, and settings) is kept, the others are written atomically.
    Unreadable recordings are left out, warned about and listed in ``sets_info.json``; the sets
    are drawn from the rest (a rerun decodes every input again to know which read)."""
    if not (all(isinstance(v, int) for v in (n_sets, min_works, max_works, seed))
            and n_sets >= 1 and 1 <= min_works <= max_works and seed >= 0
            and 0.0 <= crossfade_s <= 60.0 and 0.0 <= gap_share <= 1.0):
        raise ConfigError(f"make_sets: need integers n_sets >= 1, 1 <= min_works <= max_works, "
                          f"seed >= 0 and 0 <= crossfade_s <= 60, 0 <= gap_share <= 1; got "
                          f"{n_sets!r}, {min_works!r}, {max_works!r}, {seed!r}, {crossfade_s!r}, "
                          f"{gap_share!r}")
    if bad := [i for i, r in enumerate(records) if not all(r.get(k) for k in ("perf", "work", "wav"))]:
        raise ManifestError(f"make_sets: record {bad[0]} ({records[bad[0]]!r:.80}) lacks perf, "
                            f"work or wav ({len(bad)} such records): fix the manifest")
    sr = int(sample_rate or _first_rate(records))
    loaded: dict[int, np.ndarray | None] = {}  # None: too many to keep, re-read when needed
    skipped, kept = [], 0
    for i, y, why in iter_load_audio([r["wav"] for r in records], sample_rate=sr, normalise=True):
        if y is None:
            skipped.append({"perf": records[i]["perf"], "wav": str(records[i]["wav"]), "reason": why})
            continue
        kept += len(y)
        loaded[i] = y * np.float32(PART_PEAK / 0.999) if kept <= _KEEP_SAMPLES else None
    if skipped:
        warnings.warn(f"make_sets: {len(skipped)} of {len(records)} recordings cannot be read and "
                      "are left out of the sets:\n" + "\n".join(s["reason"] for s in skipped),
                      UserWarning, stacklevel=2)
    ok = sorted(loaded)
    if len(works := {records[i]["work"] for i in ok}) < min_works:
        raise ConfigError(f"make_sets: {len(works)} distinct works among the {len(ok)} readable "
                          f"recordings, a set needs min_works={min_works}: pass more recordings "
                          "or lower min_works")
    plans = _plan([records[i]["work"] for i in ok], n_sets, min_works, max_works, gap_share,
                  np.random.default_rng(seed))
    sha = {i: file_sha256(records[i]["wav"]) for i in ok}
    out_dir = Path(out_dir)
    sets_file = out_dir / SETS_FILE
    with folder_lock(out_dir, "make_sets"):
        old: dict[str, dict] = {}
        with contextlib.suppress(ManifestError, OSError, UnicodeDecodeError):
            old = {r.get("set"): r for r in read_jsonl(sets_file) if isinstance(r, dict)}
        done = []
        for k, plan in enumerate(plans):
            name, idx = f"set_{k:03d}", [ok[p] for p in plan["parts"]]
            key = stable_hash({"version": _VERSION, "sr": sr, "seed": seed, "set": k,
                               "crossfade_s": crossfade_s, "joins": plan["joins"],
                               "parts": [(records[i]["perf"], records[i]["work"], sha[i])
                                         for i in idx]}, n_chars=20)
            if not _is_current(out_dir, rec := old.get(name, {}), key):
                parts = [_load(records[i]["wav"], sr) if loaded[i] is None else loaded[i]
                         for i in idx]
                rec = {**_render(name, parts, [records[i] for i in idx], plan["joins"],
                                 out_dir=out_dir, sr=sr, crossfade_s=crossfade_s,
                                 rng=np.random.default_rng([seed, k])), "key": key}
                append_jsonl(sets_file, rec)  # a killed run keeps the sets it finished
            done.append(rec)
        atomic_write_text(sets_file, "".join(json_text(r) + "\n" for r in done))
        write_json(out_dir / "sets_info.json", {
            "generator": "chlib.demo.sets.make_sets", "version": _VERSION, "sample_rate": sr,
            "args": {"n_sets": n_sets, "min_works": min_works, "max_works": max_works,
                     "seed": seed, "crossfade_s": crossfade_s, "gap_share": gap_share},
            "sets": len(done), "skipped": skipped})
    return sets_file


def make_demo_sets(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                   known_works_only: bool = True, **kw: Any) -> Path:
    """:func:`make_sets` (settings ``kw``) of the dataset's held-out ``test.txt`` recordings, in
    ``out_dir`` (default ``<dataset_dir>/sets``). ``known_works_only``: only recordings whose
    work also has recordings in ``train.txt`` or ``val.txt`` (the reference part), so every
    tune of a set can be identified. Returns the ``sets.jsonl`` path."""
    d = Path(dataset_dir)
    test = read_split(d, "test")
    if known_works_only:
        known = {r["work"] for s in ("train", "val") for r in read_split(d, s)}
        test = [r for r in test if r["work"] in known]
    if not test:
        raise ManifestError(f"{d / 'test.txt'}: no test recordings"
                            f"{' of works in train.txt / val.txt' if known_works_only else ''}; "
                            "run the split step with test_data_split > 0 first")
    return make_sets(test, d / "sets" if out_dir is None else out_dir, **kw)


def sets_for(dataset_dir: str | os.PathLike, sets_path: str = "auto") -> tuple[Path | None, str]:
    """The sets file that 06 scores and a line saying where it comes from: ``"auto"`` =
    :func:`make_demo_sets` of the dataset (None, and why, when its held-out recordings cannot
    make sets); ``""`` = none; else ``sets_path`` itself (a sets.jsonl or its folder)."""
    if sets_path == "":
        return None, "no sets (sets_path is empty)"
    if sets_path != "auto":
        return Path(sets_path), f"sets from {sets_path}"
    try:
        path = make_demo_sets(dataset_dir)
    except ChlibError as e:
        return None, f"no sets made from {dataset_dir}: {e}"
    return path, f"sets made from the held-out recordings of {dataset_dir}: {path}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problem(rec: Any) -> str | None:
    """What is wrong with one sets.jsonl record, or None."""
    if not isinstance(rec, dict):
        return "a line must be a JSON object {...}"
    if missing := [k for k in ("set", "wav", "duration_s", "segments") if k not in rec]:
        return f"missing key(s) {', '.join(missing)}"
    if not (isinstance(rec["set"], str) and isinstance(rec["wav"], str) and rec["wav"]):
        return "set and wav must be strings"
    if not (_is_num(dur := rec["duration_s"]) and dur > 0):
        return f"duration_s must be a positive number, got {dur!r}"
    if not isinstance(segs := rec["segments"], list) or not segs:
        return "segments must be a non-empty list"
    prev = 0.0
    for j, s in enumerate(segs):
        if not isinstance(s, dict):
            return f"segment {j} must be a JSON object, got {s!r:.40}"
        if miss := [k for k in ("start_s", "end_s", "work", "perf") if k not in s]:
            return f"segment {j}: missing key(s) {', '.join(miss)}"
        if not (_is_num(a := s["start_s"]) and _is_num(b := s["end_s"]) and 0 <= a < b):
            return f"segment {j}: need numbers 0 <= start_s < end_s, got {a!r}, {b!r}"
        if a < prev - _TOL_S:
            return (f"segment {j} starts at {a} s, before segment {j - 1} ends ({prev} s): "
                    "segments must be in time order and must not overlap")
        if b > dur + _TOL_S:
            return f"segment {j} ends at {b} s, beyond duration_s {dur}"
        prev = b
    return None


def read_sets(path: str | os.PathLike) -> list[dict]:
    """The records of a ``sets.jsonl`` (or of the one in folder ``path``), ``wav`` absolute.
    One :class:`ManifestError` names the file and line of every malformed line, missing key,
    segment out of order or beyond ``duration_s``."""
    path = Path(path)
    path = path / SETS_FILE if path.is_dir() else path
    if not path.is_file():
        raise ManifestError(f"{path}: sets file not found; write it with make_sets or "
                            "make_demo_sets (chlib.demo.sets)")
    out, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            why = _problem(rec := json.loads(line))
        except json.JSONDecodeError as e:
            why = f"not a JSON record ({e.msg} at column {e.colno})"
        if why:
            problems.append(f"{path} line {n}: {why}")
            continue
        out.append({**rec, "wav": str((path.parent / rec["wav"]).resolve())})
    if problems:
        raise ManifestError("\n".join(problems[:20]) + "\nRepair or delete those lines, or write "
                            "the sets again with make_sets")
    return out
