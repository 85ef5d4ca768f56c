"""The demo dataset on disk: :func:`make_demo_dataset` (demo_tunes -> draw_performance_params
-> render_performance per file) and its resumable render loop."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chlib.core.config import PrepConfig
from chlib.core.errors import ConfigError
from chlib.core.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    read_jsonl,
    stable_hash,
)
from chlib.core.manifest import read_manifest, write_manifest
from chlib.core.parallel import JobFailure, WorkerStartError, run_jobs
from chlib.core.progress import progress as progress_bar
from chlib.demo.perform import (
    INSTRUMENTS,
    DemoPerformanceParams,
    describe_performance,
    draw_performance_params,
)
from chlib.demo.synth import render_performance
from chlib.demo.tunes import PC_NAMES, Tune, demo_tunes

_RENDER_VERSION = 1  # bump when the synthesiser changes (re-renders files via the manifest)
_AUDIO_FORMATS = {"flac": {"format": "FLAC", "subtype": "PCM_16"},
                  "wav": {"format": "WAV", "subtype": "PCM_16"}}

DEMO_PREP_CONFIG: dict[str, Any] = {"aug_speed_mode": [1.0], "val_data_split": 0.1,
                                    "val_unseen": 0.05, "test_data_split": 0.1,
                                    "test_data_unseen": 0.1}
"""Data-prep settings of the demo's ``hparams.yaml`` (over PrepConfig defaults; why: its header)."""

_HPARAMS_HEADER = """\
# Data-prep settings for the chlib demo dataset (chlib.demo.generate.make_demo_dataset).
# aug_speed_mode [1.0]: the versions already span +-25 % tempo; [0.9, 1.0, 1.1] turns
# on tempo augmentation (three times the extraction time and disk).
# Splits: 10 % of works test-only, 5 % val-only, one val and one test version per
# remaining work."""


@dataclass
class _Job:
    perf: str
    work: str
    tune: Tune
    params: DemoPerformanceParams
    path: Path
    key: str  # hash of everything the file's content depends on


def _slug(text: str, max_len: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    return s[:max_len].rstrip("_") or "tune"


def _manifest_path(path: Path) -> str:
    """``path`` relative to the current directory when it lies under it, else absolute."""
    path, cwd = path.resolve(), Path.cwd().resolve()
    return (path.relative_to(cwd) if path.is_relative_to(cwd) else path).as_posix()


def _render_to_file(tune: Tune, params: DemoPerformanceParams, sample_rate: int, path: str,
                    audio_format: str) -> tuple[str, int]:
    """Render and write atomically; returns (sha256 of the file, samples). Runs in workers."""
    import soundfile as sf

    y = render_performance(tune, params, sample_rate)
    buf = io.BytesIO()
    sf.write(buf, y, sample_rate, **_AUDIO_FORMATS[audio_format])
    atomic_write_bytes(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest(), len(y)


def _read_render_manifest(path: Path) -> dict[str, dict]:
    try:
        return {str(r["perf"]): r for r in read_jsonl(path) if isinstance(r, dict) and "perf" in r}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable manifest: everything is re-rendered


def _is_current(job: _Job, rec: dict) -> bool:
    """True when ``job.path`` holds exactly what the manifest says was rendered for ``job.key``."""
    with contextlib.suppress(OSError):  # a missing or unreadable file is re-rendered
        return rec.get("key") == job.key and file_sha256(job.path) == rec.get("sha256")
    return False


def _plan_jobs(tunes: list[Tune], out_dir: Path, args: dict) -> tuple[list[_Job], list[dict]]:
    """Every performance to render (in dataset order) and each work's info for demo_info.json;
    ``args``: make_demo_dataset's, as recorded in demo_info.json."""
    jobs, works_info = [], []
    for wi, tune in enumerate(tunes):
        work = f"w{wi:03d}_{_slug(tune.title)}"
        works_info.append({"work": work, "title": tune.title, "source": tune.source,
                           "rhythm": tune.rhythm, "meter": tune.meter,
                           "key": f"{PC_NAMES[tune.tonic]} {tune.mode}",
                           "base_bpm": round(tune.base_bpm, 1)})
        plist = draw_performance_params(tune, args["perfs_per_work"],
                                        np.random.default_rng([args["seed"], wi]),
                                        min_seconds=args["min_seconds"],
                                        max_seconds=args["max_seconds"])
        for pj, params in enumerate(plist):
            perf, fmt = f"{work}_v{pj:02d}", args["audio_format"]
            key = stable_hash({"render_version": _RENDER_VERSION, "tune": tune.to_json(),
                               "params": params.to_json(), "sample_rate": args["sample_rate"],
                               "format": fmt}, n_chars=20)
            jobs.append(_Job(perf, work, tune, params, out_dir / "audio" / work / f"{perf}.{fmt}",
                             key))
    return jobs, works_info


def _rendered(todo: list[_Job], workers: int, sample_rate: int, audio_format: str,
              bar: Any) -> Iterator[tuple[_Job, Any]]:
    """Yield (job, (sha256, samples) or JobFailure) per job; when worker processes cannot start
    (an unguarded script under spawn), warn and render the rest in this process."""
    args = [(j.tune, j.params, sample_rate, str(j.path), audio_format) for j in todo]
    finished: set[int] = set()
    try:
        for i, result in run_jobs(_render_to_file, args, num_workers=workers):
            finished.add(i)
            bar.update(1)
            yield todo[i], result
    except WorkerStartError as e:
        warnings.warn(f"make_demo_dataset: {e}; rendering in this process (num_workers=0 "
                      "skips the pool)", stacklevel=3)
        rest = [j for i, j in enumerate(todo) if i not in finished]
        yield from _rendered(rest, 0, sample_rate, audio_format, bar)


def _check_args(n_works: Any, perfs_per_work: Any, min_seconds: float, max_seconds: float,
                audio_format: str) -> None:
    if audio_format not in _AUDIO_FORMATS:
        raise ConfigError(f"audio_format must be one of {sorted(_AUDIO_FORMATS)}, got "
                          f"{audio_format!r} (ogg and mp3 encoders are not bit-reproducible)")
    for name, v in (("n_works", n_works), ("perfs_per_work", perfs_per_work)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"make_demo_dataset: {name} must be a positive integer, got {v!r}")
    if not (0.5 <= min_seconds <= max_seconds <= 3600):
        raise ConfigError("make_demo_dataset: need 0.5 <= min_seconds <= max_seconds <= 3600, "
                          f"got {min_seconds}, {max_seconds}")


def make_demo_dataset(out_dir: str | os.PathLike, *, n_works: int = 40, perfs_per_work: int = 6,
                      min_seconds: float = 25.0, max_seconds: float = 40.0,
                      sample_rate: int = 16000, seed: int = 0, audio_format: str = "flac",
                      progress: bool = True, cache_dir: str | os.PathLike | None = None,
                      num_workers: int | None = None) -> Path:
    """Write a synthetic cover-song dataset of real fiddle tunes; return its ``dataset.txt``.
    Writes ``audio/<work>/<perf>.flac`` (mono, 16-bit), ``dataset.txt`` (JSON lines {perf, wav,
    dur_s, work, version}; ``wav`` relative to the current directory when under it),
    ``hparams.yaml`` (only if absent), ``demo_info.json``, ``render_manifest.jsonl`` (per
    file: parameter and content hashes) and ``labels.csv`` (:func:`write_demo_labels`).
    Deterministic in ``seed`` and resumable: files matching the manifest are kept, failed ones
    left out and listed. ``num_workers``: None = up to 8 for 8+
    files, 0 or 1 = here. The default 240 files take ~11 s on 2 cores (+5 s to parse the tunes)."""
    _check_args(n_works, perfs_per_work, min_seconds, max_seconds, audio_format)
    args = {"n_works": int(n_works), "perfs_per_work": int(perfs_per_work),
            "min_seconds": min_seconds, "max_seconds": max_seconds, "sample_rate": sample_rate,
            "seed": int(seed), "audio_format": audio_format}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tunes = demo_tunes(args["n_works"], args["seed"], cache_dir=cache_dir,
                       fallback_dir=out_dir / ".cache" / "demo_tunes")
    jobs, works_info = _plan_jobs(tunes, out_dir, args)
    manifest_file = out_dir / "render_manifest.jsonl"
    manifest = _read_render_manifest(manifest_file)
    done = {j.perf: manifest[j.perf] for j in jobs if _is_current(j, manifest.get(j.perf, {}))}
    todo = [j for j in jobs if j.perf not in done]
    failures: list[dict] = []
    if num_workers is None:
        num_workers = 0 if len(todo) < 8 else min(os.cpu_count() or 1, 8, len(todo) // 4)
    with progress_bar(total=len(todo), desc="rendering demo performances", unit="file",
                      enabled=progress and bool(todo)) as bar:
        for job, result in _rendered(todo, int(num_workers) if num_workers > 1 else 0,
                                     sample_rate, audio_format, bar):
            if isinstance(result, JobFailure):
                failures.append({"perf": job.perf, "reason": result.message})
                continue
            done[job.perf] = {"perf": job.perf, "file": job.path.relative_to(out_dir).as_posix(),
                              "key": job.key, "sha256": result[0], "samples": result[1],
                              "sample_rate": sample_rate}
            append_jsonl(manifest_file, done[job.perf])  # each finished file recorded at once
    kept = {**manifest, **done}  # other settings' entries are kept: their files stay reusable
    write_manifest(manifest_file, (kept[k] for k in sorted(kept)))
    _write_info(out_dir, args, works_info, failures)
    dataset = out_dir / "dataset.txt"
    write_manifest(dataset, ({"perf": j.perf, "wav": _manifest_path(j.path),
                              "dur_s": round(done[j.perf]["samples"] / sample_rate, 3),
                              "work": j.work, "version": describe_performance(j.params, j.tune)}
                             for j in jobs if j.perf in done))
    write_demo_labels(out_dir)
    if failures:
        warnings.warn(f"make_demo_dataset: {len(failures)} of {len(jobs)} performances failed to "
                      f"render and were left out of {dataset}; see {out_dir / 'demo_info.json'}",
                      stacklevel=2)
    return dataset


def _write_info(out_dir: Path, args: dict, works_info: list[dict], failures: list[dict]) -> None:
    """``hparams.yaml`` (only when absent: a user's edits are kept) and ``demo_info.json``."""
    if not (out_dir / "hparams.yaml").exists():
        cfg = PrepConfig.from_dict({**DEMO_PREP_CONFIG, "seed": args["seed"]}, where="demo hparams")
        atomic_write_text(out_dir / "hparams.yaml",
                          _HPARAMS_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(out_dir / "demo_info.json", json.dumps({
        "generator": "chlib.demo.generate.make_demo_dataset", "args": args,
        "render_version": _RENDER_VERSION,
        "corpus": "music21 ryansMammoth (Ryan's Mammoth Collection, 1883)",
        "works": works_info, "failed": failures}, indent=2, ensure_ascii=False))


DEMO_LABEL_COLUMNS = ("perf", "rhythm", "meter", "key", "mode", "instrument")
"""Columns of the demo's ``labels.csv``: tune type, time signature, performed key ("D major":
the written key transposed by the version's ``key +n``), its mode, the lead instrument."""

_TRANSPOSE = re.compile(r"^key ([+-]?\d+)$")


def demo_label_rows(records: list[dict], works_info: list[dict]) -> list[dict]:
    """One row of :data:`DEMO_LABEL_COLUMNS` per dataset.txt record, from the work's entry in
    demo_info.json (rhythm, meter, written key) and the record's ``version`` text (its
    transposition and lead instrument: :func:`~chlib.demo.perform.describe_performance`)."""
    works = {w["work"]: w for w in works_info}
    rows = []
    for r in records:
        info = works.get(str(r.get("work")))
        if info is None:
            raise ConfigError(f"demo labels: work {r.get('work')!r} of {r.get('perf')!r} is not "
                              "in demo_info.json; regenerate the demo dataset")
        parts = [p.strip() for p in str(r.get("version", "")).split(",")]
        shift = next((int(m.group(1)) for p in parts if (m := _TRANSPOSE.match(p))), 0)
        tonic, _, mode = str(info["key"]).partition(" ")
        key = PC_NAMES[(PC_NAMES.index(tonic) + shift) % 12] if tonic in PC_NAMES else tonic
        rows.append({"perf": r["perf"], "rhythm": info.get("rhythm", ""),
                     "meter": info.get("meter", ""), "key": f"{key} {mode}".strip(),
                     "mode": mode, "instrument": next((p for p in parts if p in INSTRUMENTS), "")})
    return rows


def write_demo_labels(dataset_dir: str | os.PathLike) -> Path:
    """Write ``labels.csv`` (keyed by perf, :data:`DEMO_LABEL_COLUMNS`) beside a demo dataset's
    ``dataset.txt`` and ``demo_info.json``, also for a dataset generated before labels existed;
    the audio and every other file stay as they are. Returns its path."""
    folder = Path(dataset_dir)
    if not (folder / "demo_info.json").is_file() or not (folder / "dataset.txt").is_file():
        raise ConfigError(f"{folder}: no demo_info.json or dataset.txt: not a demo dataset "
                          "(chlib.demo.make_demo_dataset writes both)")
    works_info = json.loads((folder / "demo_info.json").read_text(encoding="utf-8"))["works"]
    rows = demo_label_rows(read_manifest(folder / "dataset.txt", required=("perf", "work")),
                           works_info)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(DEMO_LABEL_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "labels.csv", buf.getvalue())
    return folder / "labels.csv"
