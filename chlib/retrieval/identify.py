"""Identify unknown recordings against a reference index.

For each query audio file (any format :func:`chlib.signal.audio.load_audio` reads, any length):

1. **decode**: mono, resampled to the run's sample rate, peak-normalised (as extraction does);
2. **features**: CQT in dB with the run's own :class:`~chlib.core.config.FeatureSettings`
   (``hp.features``, :func:`chlib.signal.cqt.compute_cqt_db`);
3. **model**: every window of the whole track is embedded (:mod:`chlib.retrieval.embed`, with the window
   recipe stored in the index), not only the first 135 s as the original did (bug 13.4.3);
4. **search**: distances to the references by the index's own rule, top-k, each with a z-score
   and an empirical p-value from the index calibration, and a verdict in plain words.

Verdicts (per result row, from its p-value; thresholds are arguments, not hard-coded):

* ``p < threshold_p`` (0.001): "likely the same work";
* ``p < possible_p`` (0.05): "possibly related";
* otherwise "no confident match" ("no calibration" when the index has none).

A query file that cannot be decoded or is too short is reported in its own row (``error``
column) and the batch continues. Each stage is timed (seconds, summed over queries).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.device import pick_device, synchronize
from chlib.core.errors import ChlibError, ConfigError, IndexMismatchError
from chlib.core.io import atomic_write_text
from chlib.retrieval.embed import embed_tracks
from chlib.retrieval.index import ReferenceIndex

__all__ = [
    "VERDICT_LIKELY",
    "VERDICT_POSSIBLE",
    "VERDICT_NONE",
    "VERDICT_UNCALIBRATED",
    "CSV_COLUMNS",
    "AUDIO_EXTENSIONS",
    "verdict",
    "IdentifyReport",
    "identify",
    "identify_folder",
    "find_audio_files",
]

VERDICT_LIKELY = "likely the same work"
VERDICT_POSSIBLE = "possibly related"
VERDICT_NONE = "no confident match"
VERDICT_UNCALIBRATED = "no calibration"
CSV_COLUMNS = ("query", "rank", "perf", "work", "work_id", "distance", "z", "p_value", "verdict",
               "n_work_recordings", "query_duration_s", "query_windows", "error")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a")


def verdict(p_value: float, threshold_p: float = 0.001, possible_p: float = 0.05) -> str:
    """Plain-words reading of a calibrated p-value (see the module docstring)."""
    if p_value is None or not np.isfinite(p_value):
        return VERDICT_UNCALIBRATED
    if p_value < threshold_p:
        return VERDICT_LIKELY
    if p_value < possible_p:
        return VERDICT_POSSIBLE
    return VERDICT_NONE


@dataclass
class IdentifyReport:
    """What :func:`identify` found.

    ``rows``: one dict per (query, rank) with the :data:`CSV_COLUMNS` keys; a failed query has
    one row with ``rank`` None and its ``error``. ``timings``: seconds per stage summed over
    queries (``decode_s``, ``features_s``, ``model_s``, ``search_s``) plus ``total_s`` and
    ``n_queries``/``n_failed``. ``pandas.DataFrame(report.rows)`` gives the table.
    """

    rows: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[dict]:
        """``{"query", "error"}`` for every query that could not be processed."""
        return [{"query": r["query"], "error": r["error"]} for r in self.rows if r["error"]]

    def best(self) -> list[dict]:
        """The rank-1 row of every query (and the error row of failed ones)."""
        return [r for r in self.rows if r["rank"] in (1, None)]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV (columns :data:`CSV_COLUMNS`), atomically."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
        atomic_write_text(path, buf.getvalue())
        return Path(path)


def _empty_row(query: str) -> dict:
    return {k: None for k in CSV_COLUMNS} | {"query": query}


def _check_index(index: ReferenceIndex, model: torch.nn.Module, hp: Any) -> None:
    from chlib.model.checkpoint import model_fingerprint

    index.check_compatible(fingerprint=model_fingerprint(model.state_dict()),
                           features=hp.features)
    ws = index.window_settings
    if ws.get("window") != hp.chunk_len[0] or ws.get("mean_size") != hp.mean_size:
        raise IndexMismatchError(
            f"index windows are {ws.get('window')} raw frames averaged by {ws.get('mean_size')}, "
            f"but this run uses chunk_len {hp.chunk_len[0]} and mean_size {hp.mean_size}; "
            "rebuild the index with this run's settings"
        )


def identify(
    paths: Sequence[str | os.PathLike],
    *,
    model: torch.nn.Module,
    hp: Any,
    index: ReferenceIndex,
    device: str | torch.device = "auto",
    top_k: int = 10,
    by: str = "work",
    threshold_p: float = 0.001,
    possible_p: float = 0.05,
    chunk: int = 16,
    check: bool = True,
    progress: bool = False,
) -> IdentifyReport:
    """Identify each audio file in ``paths`` against ``index``.

    Parameters
    ----------
    paths : audio files (any length; shorter than one window is padded).
    model, hp : the run's model (eval mode is set for the call) and its HParams; ``hp.features``
        drives decoding (sample rate) and the CQT.
    index : a :class:`~chlib.retrieval.index.ReferenceIndex` built by this very model with these feature
        settings and window recipe (checked unless ``check=False``: IndexMismatchError).
    device : where the CQT and the model run ("auto" = CUDA, else MPS, else CPU).
    top_k : results per query; by : "work" (one row per work) or "perf" (per recording).
    threshold_p, possible_p : p-value bounds of the verdicts.
    chunk : queries processed together (bounds memory for big folders).

    Returns an :class:`IdentifyReport` (rows, per-stage timings).
    """
    from chlib.signal.audio import try_load_audio
    from chlib.signal.cqt import compute_cqt_db

    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if not 0 < threshold_p <= possible_p <= 1:
        raise ConfigError(
            f"need 0 < threshold_p <= possible_p <= 1, got {threshold_p} and {possible_p}"
        )
    if check:
        _check_index(index, model, hp)
    dev = pick_device(device)
    ws = index.window_settings
    fps = hp.features.frames_per_second
    t_all = time.perf_counter()
    timings = {"decode_s": 0.0, "features_s": 0.0, "model_s": 0.0, "search_s": 0.0}
    report = IdentifyReport()
    paths = [str(p) for p in paths]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="identify", unit="file", leave=False)
    for c0 in range(0, len(paths), chunk):
        group = paths[c0:c0 + chunk]
        feats: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        for k, p in enumerate(group):
            t0 = time.perf_counter()
            try:
                y, err = try_load_audio(p, sample_rate=hp.features.sample_rate, normalise=True)
            except Exception as e:  # decoders raise anything; the batch must go on
                y, err = None, f"{p}: {type(e).__name__}: {e}"
            timings["decode_s"] += time.perf_counter() - t0
            if err is not None:
                failed[k] = err
                continue
            t0 = time.perf_counter()
            try:
                feats[k] = compute_cqt_db(y, hp.features, device=dev)
            except ChlibError as e:
                failed[k] = f"{p}: {e}"
            synchronize(dev)
            timings["features_s"] += time.perf_counter() - t0
        ok = sorted(feats)
        windows: list = []
        results: list[list[dict]] = []
        if ok:
            t0 = time.perf_counter()
            windows = embed_tracks(model, [feats[k] for k in ok], window=ws["window"],
                                   mean_size=ws["mean_size"], hop=ws["hop"], tail=ws["tail"],
                                   min_tail=ws["min_tail"], device=dev,
                                   batch_size=hp.eval_batch_size, progress=False)
            synchronize(dev)
            timings["model_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            results = index.search(windows, k=top_k, by=by)
            timings["search_s"] += time.perf_counter() - t0
        by_k = dict(zip(ok, range(len(ok)), strict=True))
        for k, p in enumerate(group):
            if k in failed:
                row = _empty_row(p)
                row["error"] = failed[k]
                report.rows.append(row)
                continue
            j = by_k[k]
            for hit in results[j]:
                row = _empty_row(p)
                row.update({key: hit.get(key) for key in CSV_COLUMNS if key in hit})
                row["verdict"] = verdict(hit["p_value"], threshold_p, possible_p)
                row["query_duration_s"] = round(feats[k].shape[0] / fps, 3)
                row["query_windows"] = int(len(windows[j]))
                report.rows.append(row)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    timings["total_s"] = time.perf_counter() - t_all
    timings["n_queries"] = len(paths)
    timings["n_failed"] = len({r["query"] for r in report.rows if r["error"]})
    report.timings = timings
    return report


def find_audio_files(folder: str | os.PathLike, *, recursive: bool = False,
                     extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[Path]:
    """Audio files in ``folder`` (by extension, case-insensitive), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder")
    exts = {e.lower() for e in extensions}
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in exts)


def identify_folder(
    folder: str | os.PathLike,
    *,
    model: torch.nn.Module,
    hp: Any,
    index: ReferenceIndex,
    out_csv: str | os.PathLike | None = None,
    recursive: bool = False,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    **kwargs: Any,
) -> IdentifyReport:
    """:func:`identify` every audio file of ``folder``; write the rows to ``out_csv`` (atomic).

    Extra keyword arguments go to :func:`identify` (device, top_k, by, thresholds ...).
    """
    files = find_audio_files(folder, recursive=recursive, extensions=extensions)
    if not files:
        raise ConfigError(
            f"{folder}: no audio files with extensions {', '.join(extensions)}; "
            "check the folder or pass recursive=True"
        )
    report = identify(files, model=model, hp=hp, index=index, **kwargs)
    if out_csv is not None:
        report.to_csv(out_csv)
    return report
