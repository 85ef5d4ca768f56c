"""dataset.txt -> CQT features -> full.txt, work_id.map and splits: resumable and cached by key.

:func:`extract_dataset` reads one folder's ``dataset.txt`` ({perf, wav, dur_s, work, version?}
per line) and optional ``hparams.yaml`` (PrepConfig) and writes there ``cqt_feat/<perf>.cqt.npy``
([frames, bins] float32 dB, max 0) with its cache sidecar ``.cqt.json``, full.txt (+ feat,
feat_len, work_id), work_id.map (ids over sorted work names), features.json, the split files and
extract_report.json (every skipped item with its reason). Cache key: audio SHA-256 + feature
settings + tempo factor and backend, so a re-run recomputes only what changed and a killed run
resumes. Decoding runs in spawn workers (a crashing or hanging file fails alone), the CQT in
batches bounded by padded samples (a long file alone). One run per folder at a time (a lock);
a run that yields much less than the previous full.txt keeps the old outputs unless asked."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chlib.core.config import FeatureSettings, PrepConfig, load_prep_config
from chlib.core.device import pick_device
from chlib.core.errors import AudioError, ChlibError, ConfigError, FeatureError, ManifestError
from chlib.core.io import (
    atomic_save_npy,
    file_sha256,
    folder_lock,
    read_json,
    stable_hash,
    write_json,
)
from chlib.core.manifest import (
    DATASET_KEYS,
    assign_work_ids,
    read_manifest,
    resolve_path,
    write_manifest,
    write_work_id_map,
)
from chlib.core.parallel import JobFailure, WorkerStartError, run_jobs
from chlib.core.progress import progress as progress_bar
from chlib.data.features import load_feature
from chlib.data.splits import split_by_work, write_splits
from chlib.signal.audio import load_audio, peak_normalise
from chlib.signal.cqt import compute_cqt_db_batch, min_samples
from chlib.signal.tempo import resolve_backend, time_stretch

__all__ = ["CACHE_VERSION", "BATCH_MAX_SECONDS", "ExtractReport", "extract_dataset",
           "expand_tempo"]

#: Bumped whenever the decoding/CQT pipeline changes in a way that changes the arrays.
CACHE_VERSION = 1
#: Tempo factors within this distance of 1.0 mean "the original recording".
TEMPO_ONE_TOLERANCE = 0.01
#: A CQT batch holds at most this much audio once zero-padded to its longest signal (16 tracks
#: of 10 minutes); a longer signal is computed alone.
BATCH_MAX_SECONDS = 16 * 600.0
_MAX_PERF_CHARS = 200
_OUTPUT_NAMES = ("full.txt", "work_id.map", "features.json", "extract_report.json", "train.txt",
                 "val.txt", "test.txt", "test-only-work-ids.txt", "val-only-work-ids.txt")


@dataclass
class ExtractReport:
    """What :func:`extract_dataset` did. ``print(report)`` gives a readable summary."""

    dataset_dir: Path
    n_records: int = 0  # usable dataset.txt records (after dropping bad lines and duplicates)
    n_items: int = 0  # records x tempo factors
    n_ok: int = 0  # items in full.txt
    n_cached: int = 0  # of which reused from cqt_feat/
    n_computed: int = 0  # of which computed now
    skipped: list[dict] = field(default_factory=list)  # {"perf", "wav", "reason"}
    timings_s: dict[str, float] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skip(self, perf: str | None, wav: str | None, reason: str) -> None:
        self.skipped.append({"perf": perf, "wav": wav, "reason": reason})

    def to_dict(self) -> dict:
        return {**asdict(self), "dataset_dir": str(self.dataset_dir), "n_skipped": len(self.skipped),
                "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
                "paths": {k: str(v) for k, v in self.paths.items()}}

    def summary(self, max_skipped: int = 20) -> str:
        lines = [f"extracted {self.dataset_dir}: {self.n_ok} of {self.n_items} items ok "
                 f"({self.n_computed} computed, {self.n_cached} from cache), "
                 f"{len(self.skipped)} skipped, from {self.n_records} recordings",
                 "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings_s.items())]
        if self.split_sizes:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.split_sizes.items()))
        lines += [f"  skipped {s.get('perf')}: {s['reason']}" for s in self.skipped[:max_skipped]]
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... and {len(self.skipped) - max_skipped} more "
                         f"(see {self.paths.get('report', 'extract_report.json')})")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    __str__ = summary


@dataclass
class _Item:
    index: int  # position in full.txt order
    record: dict  # the full.txt record without feat / feat_len / work_id
    wav: Path  # resolved audio path
    factor: float  # 1.0 for the original recording
    npy: Path
    meta: Path
    key: str = ""  # cache key
    sha256: str = ""  # of the audio file
    stat: tuple[str, int, int] = ("", 0, 0)  # audio (resolved path, size, mtime_ns)
    frames: int | None = None  # frames of the cached or computed array
    error: str | None = None  # why the item failed


def _is_one(factor: float) -> bool:
    return abs(factor - 1.0) <= TEMPO_ONE_TOLERANCE


def expand_tempo(record: dict, factors: Sequence[float]) -> list[tuple[dict, float]]:
    """One ``(record, factor)`` per distinct tempo factor, in order: factor ~1.0 keeps the
    record; F gives the original's copy ``sp_<F>-<perf>`` with ``source_perf``, ``tempo`` = F
    and ``dur_s`` / F."""
    out: list[tuple[dict, float]] = []
    seen: set[str] = set()
    for f in map(float, factors):
        rec = dict(record)
        if _is_one(f):
            f = 1.0
        else:
            rec.update(perf=f"sp_{f}-{record['perf']}", source_perf=record["perf"], tempo=f)
            if isinstance(rec.get("dur_s"), (int, float)):
                rec["dur_s"] = round(float(rec["dur_s"]) / f, 2)
        if rec["perf"] not in seen:
            seen.add(rec["perf"])
            out.append((rec, f))
    return out


def _bad_perf_reason(perf: str) -> str | None:
    if any(c in perf for c in "/\\\0\n\r\t"):
        return (f"perf id {perf!r} contains a path separator or control character; perf ids "
                "are used as file names (cqt_feat/<perf>.cqt.npy): rename it in dataset.txt")
    if perf.startswith("."):
        return f"perf id {perf!r} starts with '.'; rename it in dataset.txt"
    if len(perf) > _MAX_PERF_CHARS:
        return f"perf id is {len(perf)} characters long (limit {_MAX_PERF_CHARS}); shorten it"
    return None


def _read_items(dataset_txt: Path, factors: Sequence[float], feat_dir: Path,
                report: ExtractReport) -> list[_Item]:
    """Step 1: dataset.txt -> one item per (record, tempo factor), in full.txt order."""
    with warnings.catch_warnings(record=True) as caught:  # near-duplicate work names
        warnings.simplefilter("always")
        records, problems = read_manifest(dataset_txt, required=DATASET_KEYS, strict=False,
                                          unique_key=None)
    report.notes += [str(w.message) for w in caught]
    for p in problems:
        report.skip(None, None, str(p))
    kept: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["perf"]):
        bad = (f"{dataset_txt}: duplicate perf {r['perf']!r}; the first line (in perf order) was "
               "kept" if r["perf"] in kept else _bad_perf_reason(r["perf"]))
        if bad:
            report.skip(r["perf"], r["wav"], bad)
        else:
            kept[r["perf"]] = r
    report.n_records = len(kept)
    items: list[_Item] = []
    for r in kept.values():
        wav = resolve_path(r["wav"], dataset_txt)
        for rec, factor in expand_tempo(r, factors):
            report.n_items += 1
            if factor != 1.0 and rec["perf"] in kept:
                report.skip(rec["perf"], r["wav"], f"tempo copy id {rec['perf']!r} is already "
                            "a perf in dataset.txt; rename that line")
                continue
            items.append(_Item(index=len(items), record=rec, wav=wav, factor=factor,
                               npy=feat_dir / f"{rec['perf']}.cqt.npy",
                               meta=feat_dir / f"{rec['perf']}.cqt.json"))
    return items


def _cache_key(sha256: str, settings: FeatureSettings, factor: float, backend: str) -> str:
    same = _is_one(factor)
    return stable_hash({"cache_version": CACHE_VERSION, "audio_sha256": sha256,
                        "features": settings.key(), "tempo": None if same else round(factor, 6),
                        "tempo_backend": None if same else backend}, n_chars=32)


def _cache_lookup(it: _Item, n_bins: int) -> None:
    """Set ``it.frames`` from a valid cached array (float32, the sidecar's shape) or ``it.error``
    to the remembered reason its file failed; neither: it must be computed."""
    try:
        info = read_json(it.meta) if it.meta.is_file() else None
    except (OSError, ValueError):
        return
    if not isinstance(info, dict) or info.get("key") != it.key:
        return
    if isinstance(info.get("error"), str):
        it.error = (f"{info['error']} [remembered from an earlier run: fix or replace the file "
                    "to retry]")
        return
    with contextlib.suppress(FeatureError):
        arr = load_feature(it.npy)
        if (arr.dtype == np.float32 and arr.shape[1] == n_bins
                and list(arr.shape) == list(info.get("shape", []))):
            it.frames = int(arr.shape[0])


def _remove_stale_temp_files(dataset_dir: Path, feat_dir: Path) -> int:
    """Delete temporary files (``.<name>.<random>.tmp``) that a killed run left behind."""
    stale = [*feat_dir.glob(".*.cqt.*.tmp"), *(p for p in dataset_dir.glob(".*.tmp") if any(
        p.name.startswith(f".{n}.") for n in _OUTPUT_NAMES))]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _hash_audio(items: Sequence[_Item], report: ExtractReport, progress: bool) -> list[_Item]:
    """Step 2a: content hash of every audio file (reusing the ones remembered in sidecars by
    (path, size, mtime_ns)); items whose file is missing or unreadable are skipped."""
    memo: dict[tuple[str, int, int], str] = {}
    for it in items:
        try:
            st = (info := read_json(it.meta))["audio_stat"]
            memo[(str(st[0]), int(st[1]), int(st[2]))] = str(info["audio_sha256"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    stats: dict[Path, tuple[str, int, int]] = {}
    why: dict[Path, str] = {}  # files that cannot be used
    for wav in progress_bar(sorted({it.wav for it in items}, key=str), desc="hashing audio",
                            unit="file", enabled=progress):
        try:
            if not wav.is_file():
                why[wav] = ("not a regular file" if wav.exists() else "audio file not found"
                            ) + " (check the wav path in dataset.txt)"
                continue
            st = wav.stat()
            key = (str(wav.resolve()), st.st_size, st.st_mtime_ns)
            memo[key] = memo.get(key) or file_sha256(wav)
            stats[wav] = key
        except OSError as e:  # e.g. no permission: this file only
            why[wav] = (f"cannot read it ({type(e).__name__}: {e.strerror or e}); check that "
                        "this user may read the file and its folders")
    ok = []
    for it in items:
        if it.wav in why:
            report.skip(it.record["perf"], it.record["wav"], f"{it.wav}: {why[it.wav]}")
            continue
        it.stat, it.sha256 = stats[it.wav], memo[stats[it.wav]]
        ok.append(it)
    return ok


def _plan(items: Sequence[_Item], settings: FeatureSettings, backend: str,
          report: ExtractReport) -> list[_Item]:
    """Step 2b: cache keys and look-ups -> the items to compute."""
    for it in items:
        it.key = _cache_key(it.sha256, settings, it.factor, backend)
        _cache_lookup(it, settings.n_bins)
    report.n_cached = sum(it.frames is not None for it in items)
    if n_failed := sum(it.error is not None for it in items):
        report.notes.append(f"{n_failed} item(s) failed in an earlier run on the same audio and "
                            "settings and were not retried")
    return [it for it in items if it.frames is None and it.error is None]


@dataclass
class _Failure:
    reason: str
    permanent: bool = False  # True: the file itself is bad (remembered until it changes)


def _decode_job(wav: str, factor: float, sample_rate: int, backend: str,
                min_samples: int) -> tuple[np.ndarray | _Failure, float]:
    """``(signal float32 [samples] or _Failure, seconds)``: decode, resample to mono, stretch
    and peak-normalise one file."""
    t0 = time.perf_counter()
    try:
        y = load_audio(wav, sample_rate=sample_rate)
        if not _is_one(factor):
            y = time_stretch(y, factor, sample_rate=sample_rate, backend=backend)
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 1 or not np.isfinite(y).all():
            raise AudioError(f"{wav}: decoded audio is not a finite mono signal")
        if y.shape[0] < min_samples:
            what = "audio" if _is_one(factor) else f"audio after tempo x{factor}"
            raise AudioError(
                f"{wav}: {what} is {y.shape[0] / sample_rate:.2f} s long; the CQT needs at least "
                f"{min_samples / sample_rate:.2f} s ({min_samples} samples at {sample_rate} Hz)")
        return peak_normalise(y, out=y), time.perf_counter() - t0
    except ChlibError as e:  # remembered until the file changes, but a ConfigError (e.g. a
        # tempo backend problem) is retried next run
        failure = _Failure(str(e) if isinstance(e, AudioError) else f"{wav}: {e}",
                           not isinstance(e, ConfigError))
    except Exception as e:  # decoder libraries raise anything; the batch must go on
        failure = _Failure(f"{wav}: {type(e).__name__}: {e}")
    return failure, time.perf_counter() - t0


def _decode_all(items: Sequence[_Item], *, num_workers: int, timeout_s: float, sample_rate: int,
                backend: str, min_samples: int, job: Callable | None = None,
                ) -> Iterator[tuple[_Item, np.ndarray | _Failure, float]]:
    """Yield ``(item, signal or failure, seconds)`` for every item, in completion order
    (``num_workers == 0``: here, no timeout; ``job`` is replaceable for tests)."""
    jobs = [(str(it.wav), it.factor, sample_rate, backend, min_samples) for it in items]
    why = {"timeout": f"decoding took longer than {timeout_s:.0f} s (per-file limit); the file "
                      "may be damaged or very long",
           "crash": "the decoder crashed (worker process died); the file is probably corrupt"}
    try:
        for i, out in run_jobs(job or _decode_job, jobs, num_workers=num_workers,
                               timeout_s=timeout_s):
            it = items[i]
            if not isinstance(out, JobFailure):
                yield it, *out
            else:
                yield (it, _Failure(f"{it.wav}: {why.get(out.kind, out.message)}"),
                       timeout_s if out.kind == "timeout" else 0.0)
    except WorkerStartError as e:
        raise FeatureError(f"the decoding {e}; or pass num_workers=0 to decode in this "
                           "process") from None


def _cqt_batch(signals: list[np.ndarray], settings: FeatureSettings, device,
               batch_size: int) -> list[np.ndarray | str]:
    """CQTs of a batch; if the batch fails, each signal alone (so one bad item is isolated)."""
    try:
        return list(compute_cqt_db_batch(signals, settings, device=device, batch_size=batch_size))
    except (ChlibError, RuntimeError, ValueError) as e:
        if len(signals) == 1:
            return [f"CQT failed: {type(e).__name__}: {e}"]
    return [f for y in signals for f in _cqt_batch([y], settings, device, batch_size)]


def _compute(todo: Sequence[_Item], settings: FeatureSettings, device, batch_size: int,
             backend: str, timings: dict[str, float], *, num_workers: int, timeout_s: float,
             progress: bool) -> None:
    """Step 3: decode ``todo`` in the pool, CQT in batches, write arrays and sidecars; sets each
    item's ``frames`` or ``error`` (a permanent failure goes to the sidecar too, so that re-runs
    do not decode the file again)."""
    def sidecar(it: _Item, **extra: object) -> None:
        write_json(it.meta, {"key": it.key, "perf": it.record["perf"], **extra,
                             "audio_sha256": it.sha256, "audio_stat": list(it.stat),
                             "cache_version": CACHE_VERSION}, indent=None)

    def flush() -> int:  # CQT and save the queued signals; returns how many items finished
        if not batch:
            return 0
        t0 = time.perf_counter()
        feats = _cqt_batch([y for _, y in batch], settings, device, batch_size)
        t1 = time.perf_counter()
        for (it, _), feat in zip(batch, feats, strict=True):
            if isinstance(feat, str):
                it.error = f"{it.wav}: {feat}"
                continue
            atomic_save_npy(it.npy, np.ascontiguousarray(feat, dtype=np.float32))
            sidecar(it, shape=list(feat.shape), dtype="float32", wav=str(it.wav), tempo=it.factor,
                    tempo_backend=None if _is_one(it.factor) else backend,
                    features=settings.key())
            it.frames = int(feat.shape[0])
        timings["cqt"] += t1 - t0
        timings["save"] += time.perf_counter() - t1
        n = len(batch)
        batch.clear()
        return n

    def padded(n: int, longest: int) -> bool:  # would n signals padded to longest fit?
        return n <= batch_size and n * longest <= BATCH_MAX_SECONDS * settings.sample_rate

    batch: list[tuple[_Item, np.ndarray]] = []
    bar = progress_bar(total=len(todo), desc="extracting CQT", unit="item",
                       enabled=progress and bool(todo))
    try:
        for it, res, sec in _decode_all(todo, num_workers=num_workers, timeout_s=timeout_s,
                                        sample_rate=settings.sample_rate, backend=backend,
                                        min_samples=min_samples(settings)):
            timings["decode_workers_sum"] += sec
            if isinstance(res, _Failure):
                it.error = res.reason
                if res.permanent:
                    it.npy.unlink(missing_ok=True)
                    sidecar(it, error=res.reason)
                bar.update(1)
            else:
                longest = max([len(res), *(len(y) for _, y in batch)])
                if batch and not padded(len(batch) + 1, longest):
                    bar.update(flush())
                batch.append((it, res))
                full = not padded(len(batch) + 1, max(len(y) for _, y in batch))
                bar.update(flush() if full else 0)
        bar.update(flush())
    finally:
        bar.close()


def _check_shrink(dataset_dir: Path, n_new: int, report: ExtractReport) -> None:
    """FeatureError if ``n_new`` items would replace a full.txt more than twice as long."""
    try:
        text = (dataset_dir / "full.txt").read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return
    if (n_old := sum(1 for line in text.split("\n") if line.strip())) <= 2 * n_new:
        return
    why = f"; e.g. {report.skipped[0]['reason']}" if report.skipped else ""
    raise FeatureError(
        f"{dataset_dir}: this run extracted {n_new} item(s) but the previous full.txt has "
        f"{n_old}, so full.txt, work_id.map, the split files and extract_report.json were kept "
        f"as they were. {len(report.skipped)} item(s) were skipped{why}. Check that "
        "dataset.txt is complete and its audio reachable (a drive unmounted?); if the dataset "
        "really shrank, run again with extract_dataset(..., allow_shrink=True) (notebook "
        "02_extract: parameter allow_shrink = True)")


def _write_outputs(dataset_dir: Path, items: Sequence[_Item], config: PrepConfig,
                   feat_paths: str, report: ExtractReport, allow_shrink: bool) -> None:
    for it in items:
        if it.error is not None:
            report.skip(it.record["perf"], it.record["wav"], it.error)
    good = [it for it in items if it.frames is not None]
    work_ids = assign_work_ids(it.record["work"] for it in good)
    full = [{**it.record, "feat": str(Path("cqt_feat") / it.npy.name) if feat_paths == "relative"
             else str(it.npy.resolve()), "feat_len": it.frames,
             "work_id": work_ids[it.record["work"]]} for it in good]
    report.n_ok = len(full)
    if not allow_shrink:
        _check_shrink(dataset_dir, len(full), report)
    paths = report.paths
    paths.update({"full": dataset_dir / "full.txt", "work_id_map": dataset_dir / "work_id.map",
                  "features": dataset_dir / "features.json", "cqt_feat": dataset_dir / "cqt_feat",
                  "report": dataset_dir / "extract_report.json"})
    write_manifest(paths["full"], full)
    write_work_id_map(paths["work_id_map"], work_ids)
    write_json(paths["features"], config.features.key())
    splits = split_by_work(full, val_data_split=config.val_data_split,
                           val_unseen=config.val_unseen, test_data_split=config.test_data_split,
                           test_data_unseen=config.test_data_unseen, seed=config.seed)
    paths.update(write_splits(dataset_dir, splits))
    report.split_sizes = {k: len(getattr(splits, k)) for k in ("train", "val", "test")}
    report.notes += splits.notes


def _extract(dataset_dir: Path, config: PrepConfig, backend: str, device: str | None,
             progress: bool, num_workers: int | None, file_timeout_s: float, feat_paths: str,
             allow_shrink: bool) -> ExtractReport:
    """Steps 1-4 of :func:`extract_dataset`, under its lock."""
    dataset_txt = dataset_dir / "dataset.txt"
    feat_dir = dataset_dir / "cqt_feat"
    feat_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractReport(dataset_dir=dataset_dir)
    timings = report.timings_s
    if n_tmp := _remove_stale_temp_files(dataset_dir, feat_dir):
        report.notes.append(f"removed {n_tmp} temporary file(s) left by an interrupted run")

    t0 = time.perf_counter()
    items = _hash_audio(_read_items(dataset_txt, config.aug_speed_mode, feat_dir, report),
                        report, progress)
    timings["hash"] = (t1 := time.perf_counter()) - t0
    todo = _plan(items, config.features, backend, report)
    timings["cache_check"] = (t0 := time.perf_counter()) - t1
    timings.update(decode_workers_sum=0.0, cqt=0.0, save=0.0)
    _compute(todo, config.features, pick_device(device if device is not None else config.device),
             config.batch_size, backend, timings, timeout_s=file_timeout_s, progress=progress,
             num_workers=config.num_workers if num_workers is None else num_workers)
    report.n_computed = sum(it.frames is not None for it in todo)
    timings["extract_wall"] = time.perf_counter() - t0
    _write_outputs(dataset_dir, items, config, feat_paths, report, allow_shrink)
    return report


def extract_dataset(dataset_dir: str | os.PathLike, *, config: PrepConfig | None = None,
                    device: str | None = None, progress: bool = True,
                    num_workers: int | None = None, file_timeout_s: float = 300.0,
                    feat_paths: str = "relative", allow_shrink: bool = False) -> ExtractReport:
    """Extract CQT features for ``dataset_dir/dataset.txt`` and write full.txt, maps and splits.

    ``config`` defaults to ``dataset_dir/hparams.yaml``; ``device`` and ``num_workers``
    (decoding processes, 0 = here) to the config's; ``file_timeout_s``: per file to decode and
    stretch; ``feat_paths``: ``"relative"`` or ``"absolute"``; ``allow_shrink``: let a run that
    yields under half the items of the previous full.txt (or none) replace its outputs (else
    FeatureError, outputs kept). Holds the folder's lock (FolderLockedError while another run
    works there). Returns the report (also in ``extract_report.json``); ManifestError without
    dataset.txt, FeatureError (after writing the report) if no item could be extracted."""
    t_start = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    if feat_paths not in ("relative", "absolute"):
        raise ConfigError(f"feat_paths must be 'relative' or 'absolute', got {feat_paths!r}")
    dataset_txt = dataset_dir / "dataset.txt"
    if not dataset_txt.is_file():
        raise ManifestError(f"{dataset_txt}: not found; write dataset.txt first (one JSON line "
                            "per recording with perf, wav, work, dur_s) or use chlib.data.importers")
    if config is None:
        config = load_prep_config(dataset_dir / "hparams.yaml")
    backend = config.tempo_backend
    if any(not _is_one(f) for f in config.aug_speed_mode):  # a missing backend fails here, once
        backend = str(resolve_backend(backend))
    with folder_lock(dataset_dir, "feature extraction (extract_dataset)"):
        report = _extract(dataset_dir, config, backend, device, progress, num_workers,
                          file_timeout_s, feat_paths, allow_shrink)
        report.timings_s["total"] = time.perf_counter() - t_start
        write_json(report.paths["report"], report.to_dict())
    if report.n_ok == 0:
        raise FeatureError(f"{dataset_txt}: no item could be extracted ({len(report.skipped)} "
                           f"skipped); see {report.paths['report']} for the reason of each")
    return report
