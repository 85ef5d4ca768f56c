"""dataset.txt -> CQT features -> full.txt, work_id.map and splits: resumable and cached by key.

:func:`extract_dataset` runs the whole data preparation of one dataset folder::

    datasets/<name>/hparams.yaml   PrepConfig (optional; defaults otherwise)
    datasets/<name>/dataset.txt    input: {perf, wav, dur_s, work, version?} per line
    -> cqt_feat/<perf>.cqt.npy     [frames, bins] float32 dB (max 0), one per item
       cqt_feat/<perf>.cqt.json    cache sidecar: the key the array was computed with
       full.txt                    dataset keys + feat, feat_len, work_id (+ source_perf, tempo)
       work_id.map                 "<work_id> <work>", ids over sorted work names
       features.json               the FeatureSettings of cqt_feat
       train.txt val.txt test.txt test-only-work-ids.txt val-only-work-ids.txt
       extract_report.json         counts, timings and every skipped item with its reason

What happens, in order:

1. dataset.txt is read; bad lines are skipped and reported; records are sorted by perf and
   duplicate perfs dropped (first kept, reported).
2. Each record is expanded over ``aug_speed_mode``: factor 1.0 (within 0.01) is the record
   itself; another factor F gives perf ``sp_<F>-<perf>`` (the original's naming) with
   ``source_perf``, ``tempo`` = F and ``dur_s`` / F. The stretched audio is computed in memory
   (no ``sp_wav/`` files); its ``wav`` stays the source file.
3. Caching: each item's key is a hash of the audio file's content (SHA-256), the feature
   settings, the tempo factor and the tempo backend. An item whose sidecar holds the same key
   and whose array loads with the recorded shape is reused; anything else is recomputed. So a
   re-run recomputes nothing, a changed setting or a changed audio file recomputes exactly what
   changed, and a killed run resumes: arrays and sidecars are written atomically (array first,
   then sidecar), and leftover temporary files are removed at the start.
4. Decoding, resampling, peak normalisation and tempo stretching run in worker processes
   (``spawn`` start method, safe with torch), each file with its own time limit; CQTs are
   computed in the main process, in batches, on the chosen device.
5. Bad items (missing, empty, corrupt, non-audio, silent, NaN, too short, decoder crash or
   timeout) are skipped with a reason naming the file; the batch carries on.

Unlike the original, ``feat`` paths in full.txt are written relative to the dataset folder by
default (``cqt_feat/<perf>.cqt.npy``; ``feat_paths="absolute"`` for absolute ones), so the
folder can be moved; :func:`chlib.core.manifest.resolve_path` finds them. ``feat_len`` is read from
each array's shape (never guessed from the file size, bug 13.1.6); work ids come from sorted
work names (13.1.3). One extraction at a time per dataset folder.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chlib.core.config import FeatureSettings, PrepConfig, load_prep_config
from chlib.core.errors import AudioError, ChlibError, ConfigError, FeatureError, ManifestError
from chlib.core.io import atomic_save_npy, file_sha256, read_json, stable_hash, write_json
from chlib.core.manifest import (
    DATASET_KEYS,
    assign_work_ids,
    read_manifest,
    resolve_path,
    write_manifest,
    write_work_id_map,
)
from chlib.data.splits import split_by_work, write_splits

__all__ = [
    "CACHE_VERSION",
    "ExtractReport",
    "extract_dataset",
    "tempo_perf_id",
    "expand_tempo",
    "load_cached_feature",
]

#: Bumped whenever the decoding/CQT pipeline changes in a way that changes the arrays.
CACHE_VERSION = 1
#: Tempo factors within this distance of 1.0 mean "the original recording".
TEMPO_ONE_TOLERANCE = 0.01
_MAX_PERF_CHARS = 200


# --------------------------------------------------------------------------------------------
# report


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

    def to_dict(self) -> dict:
        return {
            "dataset_dir": str(self.dataset_dir),
            "n_records": self.n_records,
            "n_items": self.n_items,
            "n_ok": self.n_ok,
            "n_cached": self.n_cached,
            "n_computed": self.n_computed,
            "n_skipped": len(self.skipped),
            "skipped": self.skipped,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "paths": {k: str(v) for k, v in self.paths.items()},
            "split_sizes": self.split_sizes,
            "notes": self.notes,
        }

    def summary(self, max_skipped: int = 20) -> str:
        t = self.timings_s
        lines = [
            f"extracted {self.dataset_dir}: {self.n_ok} of {self.n_items} items ok "
            f"({self.n_computed} computed, {self.n_cached} from cache), "
            f"{len(self.skipped)} skipped, from {self.n_records} recordings",
            "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()),
        ]
        if self.split_sizes:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.split_sizes.items()))
        for s in self.skipped[:max_skipped]:
            lines.append(f"  skipped {s.get('perf')}: {s['reason']}")
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... and {len(self.skipped) - max_skipped} more "
                         f"(see {self.paths.get('report', 'extract_report.json')})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


# --------------------------------------------------------------------------------------------
# items


@dataclass
class _Item:
    index: int  # position in full.txt order
    record: dict  # the full.txt record without feat / feat_len / work_id
    wav: Path  # resolved audio path
    factor: float  # 1.0 for the original recording
    npy: Path
    meta: Path
    key: str = ""
    sha256: str = ""
    attempts: int = 0  # decoder crashes this item was part of


def tempo_perf_id(perf: str, factor: float) -> str:
    """The original's id of a tempo copy: ``sp_<factor>-<perf>`` (Python float formatting)."""
    return f"sp_{factor}-{perf}"


def _is_one(factor: float) -> bool:
    return abs(factor - 1.0) <= TEMPO_ONE_TOLERANCE


def expand_tempo(record: dict, factors: Sequence[float]) -> list[tuple[dict, float]]:
    """One ``(record, factor)`` per tempo factor, in the order of ``factors``.

    Factor ~1.0 keeps the record as it is; another factor F gives a copy with perf
    ``sp_<F>-<perf>``, ``source_perf`` = the original perf, ``tempo`` = F and
    ``dur_s`` = round(dur_s / F, 2). Repeated factors are dropped.
    """
    out: list[tuple[dict, float]] = []
    seen: set[str] = set()
    for f in factors:
        f = float(f)
        if _is_one(f):
            rec, f = dict(record), 1.0
        else:
            rec = dict(record)
            rec["perf"] = tempo_perf_id(record["perf"], f)
            rec["source_perf"] = record["perf"]
            rec["tempo"] = f
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
    if perf.startswith(".") or perf in (".", ".."):
        return f"perf id {perf!r} starts with '.'; rename it in dataset.txt"
    if len(perf) > _MAX_PERF_CHARS:
        return f"perf id is {len(perf)} characters long (limit {_MAX_PERF_CHARS}); shorten it"
    return None


# --------------------------------------------------------------------------------------------
# cache


def _resolved_tempo_backend(backend: str, needed: bool) -> str:
    """The backend name that goes into the cache key ("auto" resolved to the installed one).

    When tempo copies are needed, a missing backend is a ConfigError raised here, before any
    work starts (not one failure per item).
    """
    if not needed:
        return backend
    from chlib.signal.tempo import resolve_backend

    return str(resolve_backend(backend))


def _cache_key(sha256: str, settings: FeatureSettings, factor: float, backend: str) -> str:
    return stable_hash({
        "cache_version": CACHE_VERSION,
        "audio_sha256": sha256,
        "features": settings.key(),
        "tempo": None if _is_one(factor) else round(factor, 6),
        "tempo_backend": None if _is_one(factor) else backend,
    }, n_chars=32)


def load_cached_feature(npy: Path, meta: Path, key: str, n_bins: int) -> int | None:
    """Number of frames of a valid cached array for ``key``, else None.

    Valid = the sidecar holds ``key``, the array opens (memory-mapped) as float32 2-D with
    ``n_bins`` columns, at least one frame, and the shape recorded in the sidecar.
    """
    found = _cache_lookup(npy, meta, key, n_bins)
    return found if isinstance(found, int) else None


def _cache_lookup(npy: Path, meta: Path, key: str, n_bins: int) -> int | str | None:
    """Frames of a valid cached array, or the remembered reason a file failed, or None."""
    if not meta.is_file():
        return None
    try:
        info = read_json(meta)
        if not isinstance(info, dict) or info.get("key") != key:
            return None
        if isinstance(info.get("error"), str):
            return info["error"]
        if not npy.is_file():
            return None
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        ok = (arr.ndim == 2 and arr.dtype == np.float32 and arr.shape[1] == n_bins
              and arr.shape[0] >= 1 and list(arr.shape) == list(info.get("shape", [])))
        frames = int(arr.shape[0]) if ok else None
        del arr
        return frames
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _stat_key(p: Path) -> tuple[str, int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def _hash_memo_from_sidecars(metas: Sequence[Path]) -> dict[tuple[str, int, int], str]:
    """(path, size, mtime_ns) -> sha256 remembered in existing sidecars (saves re-hashing)."""
    memo: dict[tuple[str, int, int], str] = {}
    for m in metas:
        if not m.is_file():
            continue
        try:
            info = read_json(m)
            st = info["audio_stat"]
            memo[(str(st[0]), int(st[1]), int(st[2]))] = str(info["audio_sha256"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    return memo


_OUTPUT_NAMES = ("full.txt", "work_id.map", "features.json", "extract_report.json", "train.txt",
                 "val.txt", "test.txt", "test-only-work-ids.txt", "val-only-work-ids.txt")


def _remove_stale_temp_files(dataset_dir: Path, feat_dir: Path) -> int:
    """Delete temporary files (``.<name>.<random>.tmp``) that a killed run left behind."""
    stale = [p for p in feat_dir.glob(".*.tmp") if ".cqt." in p.name]
    stale += [p for p in dataset_dir.glob(".*.tmp")
              if any(p.name.startswith(f".{n}.") for n in _OUTPUT_NAMES)]
    n = 0
    for p in stale:
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


# --------------------------------------------------------------------------------------------
# decoding (runs in worker processes)


@dataclass
class _Failure:
    reason: str
    permanent: bool = False  # True: the file itself is bad (remembered until it changes)


def _exit_when_orphaned(parent_pid: int, poll_s: float = 1.0) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_init(parent_pid: int | None = None) -> None:
    """Set up a decoding worker: one thread each (the workers already run in parallel), and a
    watchdog that ends the worker if the main process dies (e.g. kill -9 or a killed notebook
    kernel); otherwise idle workers would wait forever on their job queue."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if parent_pid is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                         name="chlib-orphan-watchdog").start()


def _decode_job(
    wav: str, factor: float, sample_rate: int, backend: str, min_samples: int
) -> tuple[np.ndarray | _Failure, float]:
    """Decode, resample to mono ``sample_rate``, tempo-stretch and peak-normalise one file.

    Returns ``(signal float32 [samples], seconds)`` or ``(_Failure(reason), seconds)``.
    """
    t0 = time.perf_counter()
    try:
        from chlib.signal.audio import load_audio, peak_normalise

        y = load_audio(wav, sample_rate=sample_rate)
        if not _is_one(factor):
            from chlib.signal.tempo import time_stretch

            y = time_stretch(y, factor, sample_rate=sample_rate, backend=backend)
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 1 or not np.isfinite(y).all():
            return _Failure(f"{wav}: decoded audio is not a finite mono signal", True), 0.0
        if y.shape[0] < min_samples:
            what = "audio" if _is_one(factor) else f"audio after tempo x{factor}"
            return _Failure(
                f"{wav}: {what} is {y.shape[0] / sample_rate:.2f} s long; the CQT needs at least "
                f"{min_samples / sample_rate:.2f} s ({min_samples} samples at {sample_rate} Hz)",
                True), time.perf_counter() - t0
        y = np.asarray(peak_normalise(y), dtype=np.float32)
        return y, time.perf_counter() - t0
    except AudioError as e:
        return _Failure(str(e), True), time.perf_counter() - t0
    except ConfigError as e:
        return _Failure(f"{wav}: {e}"), time.perf_counter() - t0
    except ChlibError as e:
        return _Failure(f"{wav}: {e}", True), time.perf_counter() - t0
    except Exception as e:  # decoder libraries raise anything; the batch must go on
        return _Failure(f"{wav}: {type(e).__name__}: {e}"), time.perf_counter() - t0


def _probe() -> int:
    return os.getpid()


def _workers_can_start(ctx, timeout_s: float = 120.0) -> bool:
    """Whether a fresh spawn worker can run a trivial job (tells a broken set-up from a bad file)."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        pool.submit(_probe).result(timeout=timeout_s)
        return True
    except Exception:
        return False
    finally:
        _kill_pool(pool)


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            p.kill()
        except (OSError, AttributeError, ValueError):
            pass
    for p in procs:
        try:
            p.join(timeout=5)
        except (OSError, AttributeError, ValueError, AssertionError):
            pass


def _decode_all(
    items: Sequence[_Item],
    *,
    num_workers: int,
    timeout_s: float,
    sample_rate: int,
    backend: str,
    min_samples: int,
    job: Callable[..., tuple[np.ndarray | _Failure, float]] = _decode_job,
) -> Iterator[tuple[_Item, np.ndarray | _Failure, float]]:
    """Yield ``(item, signal or failure, seconds)`` for every item, in completion order.

    ``num_workers == 0`` decodes in this process (no timeout). Otherwise a spawn-context
    process pool decodes at most ``2 x num_workers`` files at a time; a file running longer than
    ``timeout_s`` is reported as failed and the pool is restarted (a hung worker cannot be
    interrupted otherwise). If a worker dies (a decoder crash), the files it may have held are
    retried one at a time so that only the culprit is skipped. ``job`` (a module-level
    function, picklable by name) is replaceable for tests.
    """
    args = (sample_rate, backend, min_samples)
    if num_workers <= 0:
        for it in items:
            res, sec = job(str(it.wav), it.factor, *args)
            yield it, res, sec
        return

    ctx = mp.get_context("spawn")
    queue: deque[_Item] = deque(items)
    n_results = 0
    while queue:
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx,
                                   initializer=_worker_init, initargs=(os.getpid(),))
        inflight: dict[Future, _Item] = {}  # insertion order = submission order
        started: dict[Future, float] = {}
        restart = False
        try:
            while (queue or inflight) and not restart:
                # a suspect (an item that was in flight when a worker died) runs alone
                solo = bool(queue) and queue[0].attempts > 0
                if solo or any(i.attempts for i in inflight.values()):
                    limit = 1
                else:
                    limit = 2 * num_workers
                while queue and len(inflight) < limit:
                    it = queue.popleft()
                    inflight[pool.submit(job, str(it.wav), it.factor, *args)] = it
                    if it.attempts:
                        break
                now = time.monotonic()
                for fut in list(inflight)[:num_workers]:  # these are running (FIFO dispatch)
                    started.setdefault(fut, now)
                done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
                broken: list[_Item] = []
                for fut in done:
                    it = inflight.pop(fut)
                    started.pop(fut, None)
                    try:
                        res, sec = fut.result()
                    except BrokenProcessPool:
                        broken.append(it)
                        continue
                    except Exception as e:  # pickling problems and the like
                        res, sec = _Failure(f"{it.wav}: {type(e).__name__}: {e}"), 0.0
                    n_results += 1
                    yield it, res, sec
                if broken:
                    broken += list(inflight.values())
                    inflight.clear()
                    for it in broken:
                        it.attempts += 1
                    if n_results == 0 and not _workers_can_start(ctx):
                        raise FeatureError(
                            "the decoding worker processes die before doing any work. In a "
                            "Python script, put the call under `if __name__ == \"__main__\":` "
                            "(worker processes use the 'spawn' start method, which re-imports "
                            "the script), or pass num_workers=0 to decode in this process"
                        )
                    if len(broken) == 1:  # it was alone in the pool: it is the culprit
                        it = broken[0]
                        yield it, _Failure(f"{it.wav}: the decoder crashed (worker process "
                                           "died); the file is probably corrupt"), 0.0
                    else:
                        queue.extendleft(reversed(sorted(broken, key=lambda i: i.index)))
                    restart = True
                    break
                now = time.monotonic()
                late = [f for f, t0 in started.items() if f in inflight and now - t0 > timeout_s]
                if late:
                    for fut in late:
                        it = inflight.pop(fut)
                        yield it, _Failure(
                            f"{it.wav}: decoding took longer than {timeout_s:.0f} s (per-file "
                            "limit); the file may be damaged or very long"), timeout_s
                    queue.extendleft(reversed(list(inflight.values())))
                    inflight.clear()
                    restart = True
        finally:
            if restart or inflight:
                _kill_pool(pool)
            else:
                pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# CQT in the main process


def _cqt_batch(
    signals: list[np.ndarray], settings: FeatureSettings, device, batch_size: int
) -> list[np.ndarray | str]:
    """CQTs of a batch; if the batch fails, each signal alone (so one bad item is isolated)."""
    from chlib.signal.cqt import compute_cqt_db_batch

    try:
        return list(compute_cqt_db_batch(signals, settings, device=device, batch_size=batch_size))
    except (ChlibError, RuntimeError, ValueError) as e:
        if len(signals) == 1:
            return [f"CQT failed: {type(e).__name__}: {e}"]
    out: list[np.ndarray | str] = []
    for y in signals:
        out.extend(_cqt_batch([y], settings, device, batch_size))
    return out


def _check_feature(feat: np.ndarray, n_bins: int) -> str | None:
    if feat.ndim != 2 or feat.shape[1] != n_bins or feat.shape[0] < 1:
        return f"CQT has shape {feat.shape}, expected [frames >= 1, {n_bins}]"
    if not np.isfinite(feat).all():
        return "CQT contains NaN or inf"
    return None


def _min_samples(settings: FeatureSettings) -> int:
    """Shortest signal the CQT accepts: half the longest kernel + 1 (reflect padding)."""
    try:
        from chlib.signal import cqt

        fn = getattr(cqt, "min_samples", None)
        if callable(fn):
            return int(fn(settings))
    except ImportError:
        pass
    q = 1.0 / (2 ** (1.0 / settings.bins_per_octave) - 1)
    kernel = 2 ** math.ceil(math.log2(q * settings.sample_rate / settings.fmin))
    return kernel // 2 + 1


# --------------------------------------------------------------------------------------------
# the pipeline


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


def _prepare_items(
    dataset_txt: Path, config: PrepConfig, feat_dir: Path, report: ExtractReport
) -> list[_Item]:
    """dataset.txt -> one item per (record, tempo factor), in full.txt order; problems reported."""
    records, problems = read_manifest(dataset_txt, required=DATASET_KEYS, strict=False,
                                      unique_key=None)
    for p in problems:
        report.skipped.append({"perf": None, "wav": None, "reason": str(p)})
    records = sorted(records, key=lambda r: r["perf"])
    kept: list[dict] = []
    seen: set[str] = set()
    for r in records:
        if r["perf"] in seen:
            report.skipped.append({"perf": r["perf"], "wav": r["wav"], "reason":
                                   f"{dataset_txt}: duplicate perf {r['perf']!r}; the first "
                                   "line (in perf order) was kept"})
            continue
        seen.add(r["perf"])
        bad = _bad_perf_reason(r["perf"])
        if bad:
            report.skipped.append({"perf": r["perf"], "wav": r["wav"], "reason": bad})
            continue
        kept.append(r)
    report.n_records = len(kept)
    items: list[_Item] = []
    n_collisions = 0
    all_perfs = {r["perf"] for r in kept}
    for r in kept:
        wav = resolve_path(r["wav"], dataset_txt)
        for rec, factor in expand_tempo(r, config.aug_speed_mode):
            if factor != 1.0 and rec["perf"] in all_perfs:
                report.skipped.append({"perf": rec["perf"], "wav": r["wav"], "reason":
                                       f"tempo copy id {rec['perf']!r} is already a perf in "
                                       "dataset.txt; rename that line"})
                n_collisions += 1
                continue
            items.append(_Item(index=len(items), record=rec, wav=wav, factor=factor,
                               npy=feat_dir / f"{rec['perf']}.cqt.npy",
                               meta=feat_dir / f"{rec['perf']}.cqt.json"))
    report.n_items = len(items) + n_collisions
    return items


def _hash_audio(
    items: Sequence[_Item], report: ExtractReport, progress: bool
) -> tuple[list[_Item], dict[Path, tuple[str, int, int]]]:
    """Content hash of every audio file; items whose file is missing are skipped."""
    memo = _hash_memo_from_sidecars([it.meta for it in items])
    stats: dict[Path, tuple[str, int, int]] = {}
    digests: dict[Path, str | None] = {}
    wavs = sorted({it.wav for it in items}, key=str)
    for wav in _progress(wavs, desc="hashing audio", unit="file", disable=not progress):
        st = _stat_key(wav) if wav.is_file() else None
        if st is None:
            digests[wav] = None
            continue
        stats[wav] = st
        digests[wav] = memo.get(st) or file_sha256(wav)
    ok = []
    for it in items:
        if digests[it.wav] is None:
            reason = (f"{it.wav}: audio file not found" if not it.wav.exists()
                      else f"{it.wav}: not a regular file")
            report.skipped.append({"perf": it.record["perf"], "wav": it.record["wav"],
                                   "reason": reason + " (check the wav path in dataset.txt)"})
            continue
        it.sha256 = digests[it.wav]  # type: ignore[assignment]
        ok.append(it)
    return ok, stats


def extract_dataset(
    dataset_dir: str | os.PathLike,
    *,
    config: PrepConfig | None = None,
    device: str | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    file_timeout_s: float = 300.0,
    feat_paths: str = "relative",
) -> ExtractReport:
    """Extract CQT features for ``dataset_dir/dataset.txt`` and write full.txt, maps and splits.

    Caches by key (audio content + feature settings + tempo factor + tempo backend): a re-run
    recomputes nothing; a changed setting or audio file recomputes what changed; a killed run
    resumes. See the module docstring for the files written.

    Parameters
    ----------
    dataset_dir : folder holding ``dataset.txt`` (and optionally ``hparams.yaml``).
    config : data-prep settings; default: ``dataset_dir/hparams.yaml`` (or the defaults).
    device : device for the CQT (``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``); default: the
        config's ``device``.
    progress : show tqdm progress bars.
    num_workers : decoding processes (0 = decode in this process); default: the config's.
    file_timeout_s : seconds one file may take to decode and stretch before it is skipped.
    feat_paths : ``"relative"`` (``cqt_feat/<perf>.cqt.npy``, relative to the dataset folder)
        or ``"absolute"``.

    Returns
    -------
    :class:`ExtractReport` (also written to ``extract_report.json``).

    Raises
    ------
    ManifestError if dataset.txt is missing; FeatureError if no item could be extracted
    (after writing the report).
    """
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
    settings = config.features
    workers = config.num_workers if num_workers is None else int(num_workers)
    from chlib.core.device import pick_device

    dev = pick_device(device if device is not None else config.device)
    backend = _resolved_tempo_backend(
        config.tempo_backend, needed=any(not _is_one(f) for f in config.aug_speed_mode))
    feat_dir = dataset_dir / "cqt_feat"
    feat_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractReport(dataset_dir=dataset_dir)
    timings = report.timings_s
    n_tmp = _remove_stale_temp_files(dataset_dir, feat_dir)
    if n_tmp:
        report.notes.append(f"removed {n_tmp} temporary file(s) left by an interrupted run")

    # 1. items and cache look-up
    t0 = time.perf_counter()
    items = _prepare_items(dataset_txt, config, feat_dir, report)
    items, stats = _hash_audio(items, report, progress)
    timings["hash"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames: dict[int, int] = {}
    failed: dict[int, str] = {}
    todo: list[_Item] = []
    for it in items:
        it.key = _cache_key(it.sha256, settings, it.factor, backend)
        found = _cache_lookup(it.npy, it.meta, it.key, settings.n_bins)
        if found is None:
            todo.append(it)
        elif isinstance(found, str):
            failed[it.index] = found + " [remembered from an earlier run: fix or replace the file to retry]"
        else:
            frames[it.index] = found
    report.n_cached = len(frames)
    if failed:
        report.notes.append(f"{len(failed)} item(s) failed in an earlier run on the same audio and "
                            "settings and were not retried")
    timings["cache_check"] = time.perf_counter() - t0

    # 2. decode in workers, CQT here, save
    t_decode = t_cqt = t_save = 0.0

    def remember_failure(it: _Item, reason: str) -> None:
        """A permanent failure is written to the sidecar so re-runs do not decode it again."""
        it.npy.unlink(missing_ok=True)
        write_json(it.meta, {"key": it.key, "perf": it.record["perf"], "error": reason,
                             "audio_sha256": it.sha256, "audio_stat": list(stats[it.wav]),
                             "cache_version": CACHE_VERSION}, indent=None)
    batch: list[tuple[_Item, np.ndarray]] = []

    def flush() -> None:
        nonlocal t_cqt, t_save
        if not batch:
            return
        t1 = time.perf_counter()
        feats = _cqt_batch([y for _, y in batch], settings, dev, config.batch_size)
        t_cqt += time.perf_counter() - t1
        t1 = time.perf_counter()
        for (it, _), feat in zip(batch, feats, strict=True):
            if isinstance(feat, str):
                failed[it.index] = f"{it.wav}: {feat}"
                continue
            feat = np.ascontiguousarray(feat, dtype=np.float32)
            bad = _check_feature(feat, settings.n_bins)
            if bad:
                failed[it.index] = f"{it.wav}: {bad}"
                continue
            atomic_save_npy(it.npy, feat)
            write_json(it.meta, {
                "key": it.key, "perf": it.record["perf"], "shape": list(feat.shape),
                "dtype": "float32", "audio_sha256": it.sha256, "audio_stat": list(stats[it.wav]),
                "wav": str(it.wav), "tempo": it.factor, "tempo_backend":
                None if _is_one(it.factor) else backend, "features": settings.key(),
                "cache_version": CACHE_VERSION,
            }, indent=None)
            frames[it.index] = int(feat.shape[0])
        t_save += time.perf_counter() - t1
        batch.clear()

    t0 = time.perf_counter()
    if todo:
        bar = _progress(total=len(todo), desc="extracting CQT", unit="item", disable=not progress)
        try:
            for it, res, sec in _decode_all(
                todo, num_workers=workers, timeout_s=file_timeout_s,
                sample_rate=settings.sample_rate, backend=backend,
                min_samples=_min_samples(settings),
            ):
                t_decode += sec
                if isinstance(res, _Failure):
                    failed[it.index] = res.reason
                    if res.permanent:
                        remember_failure(it, res.reason)
                    bar.update(1)
                    continue
                batch.append((it, res))
                if len(batch) >= config.batch_size:
                    n = len(batch)
                    flush()
                    bar.update(n)
            n = len(batch)
            flush()
            bar.update(n)
        finally:
            bar.close()
    report.n_computed = len(frames) - report.n_cached
    timings["decode_workers_sum"] = t_decode
    timings["cqt"] = t_cqt
    timings["save"] = t_save
    timings["extract_wall"] = time.perf_counter() - t0

    # 3. full.txt, work ids, features.json, splits, report
    for it in items:
        if it.index in failed:
            report.skipped.append({"perf": it.record["perf"], "wav": it.record["wav"],
                                   "reason": failed[it.index]})
    good = [it for it in items if it.index in frames]
    work_ids = assign_work_ids(it.record["work"] for it in good)
    full = []
    for it in good:
        rec = dict(it.record)
        rec["feat"] = (str(Path("cqt_feat") / it.npy.name) if feat_paths == "relative"
                       else str(it.npy.resolve()))
        rec["feat_len"] = frames[it.index]
        rec["work_id"] = work_ids[rec["work"]]
        full.append(rec)
    report.n_ok = len(full)
    paths = report.paths
    paths.update({"full": dataset_dir / "full.txt", "work_id_map": dataset_dir / "work_id.map",
                  "features": dataset_dir / "features.json", "cqt_feat": feat_dir,
                  "report": dataset_dir / "extract_report.json"})
    write_manifest(paths["full"], full)
    write_work_id_map(paths["work_id_map"], work_ids)
    write_json(paths["features"], settings.key())
    splits = split_by_work(
        full, val_data_split=config.val_data_split, val_unseen=config.val_unseen,
        test_data_split=config.test_data_split, test_data_unseen=config.test_data_unseen,
        seed=config.seed,
    )
    for name, p in write_splits(dataset_dir, splits).items():
        paths[name] = p
    report.split_sizes = {"train": len(splits.train), "val": len(splits.val),
                          "test": len(splits.test)}
    report.notes += splits.notes
    timings["total"] = time.perf_counter() - t_start
    write_json(paths["report"], report.to_dict())
    if report.n_ok == 0:
        raise FeatureError(
            f"{dataset_txt}: no item could be extracted ({len(report.skipped)} skipped); "
            f"see {paths['report']} for the reason of each"
        )
    return report
