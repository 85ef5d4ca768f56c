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

The procedures of ``06_identify`` are here too: the run's reference index
(:func:`reference_index_for_run`, built with the run's distance rule), the queries
(:func:`identification_queries`) and how often the true work came first
(:func:`identification_summary`).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.device import pick_device, synchronize
from chlib.core.errors import (
    ChlibError,
    ConfigError,
    FeatureError,
    IndexMismatchError,
    ManifestError,
)
from chlib.core.io import atomic_write_text
from chlib.core.manifest import read_manifest, resolve_path
from chlib.core.progress import progress as progress_bar
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import embed_windows
from chlib.retrieval.index import ReferenceIndex, build_index, is_tempo_copy
from chlib.retrieval.scoring import rule_of
from chlib.signal.audio import try_load_audio
from chlib.signal.cqt import compute_cqt_db

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
    "query_features",
    "read_split",
    "reference_records",
    "reference_index_for_run",
    "Queries",
    "identification_queries",
    "identification_summary",
    "summary_text",
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


def query_features(path: str | os.PathLike, hp: Any, device: str | torch.device = "cpu", *,
                   timings: dict | None = None) -> np.ndarray:
    """CQT [frames, bins] in dB of an audio file: decoded mono at ``hp.features.sample_rate``,
    peak-normalised, transformed with ``hp.features``. The one query path of identification and
    of the query-vs-match figure. FeatureError (naming the file) when it cannot be used;
    ``timings`` (optional) gets ``decode_s`` / ``features_s`` added."""
    t0 = time.perf_counter()
    try:
        y, err = try_load_audio(path, sample_rate=hp.features.sample_rate, normalise=True)
    except Exception as e:  # decoders raise anything; a batch must go on
        y, err = None, f"{path}: {type(e).__name__}: {e}"
    t1 = time.perf_counter()
    if timings is not None:
        timings["decode_s"] = timings.get("decode_s", 0.0) + t1 - t0
    if err is not None:
        raise FeatureError(err)
    dev = pick_device(device)
    try:
        return compute_cqt_db(y, hp.features, device=dev)
    except ChlibError as e:
        raise FeatureError(f"{path}: {e}") from e
    finally:
        synchronize(dev)
        if timings is not None:
            timings["features_s"] = timings.get("features_s", 0.0) + time.perf_counter() - t1


def _check_index(index: ReferenceIndex, model: torch.nn.Module, hp: Any) -> None:
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
    bar = progress_bar(total=len(paths), desc="identify", unit="file", enabled=progress,
                       leave=False)
    for c0 in range(0, len(paths), chunk):
        group = paths[c0:c0 + chunk]
        feats: dict[int, np.ndarray] = {}
        rows: list[list[dict]] = [[] for _ in group]  # per query, kept in input order
        for k, p in enumerate(group):
            try:
                feats[k] = query_features(p, hp, dev, timings=timings)
            except ChlibError as e:
                rows[k].append(_empty_row(p) | {"error": str(e)})
        ok = sorted(feats)
        if ok:
            t0 = time.perf_counter()
            windows = embed_windows(model, [feats[k] for k in ok], window=ws["window"],
                                    mean_size=ws["mean_size"], hop=ws["hop"], tail=ws["tail"],
                                    min_tail=ws["min_tail"], device=dev,
                                    batch_size=hp.eval_batch_size, progress=False)
            synchronize(dev)
            timings["model_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            results = index.search(windows, k=top_k, by=by)
            timings["search_s"] += time.perf_counter() - t0
            for k, wins, hits in zip(ok, windows, results, strict=True):
                for hit in hits:
                    row = _empty_row(group[k])
                    row.update({key: hit.get(key) for key in CSV_COLUMNS if key in hit})
                    row["verdict"] = verdict(hit["p_value"], threshold_p, possible_p)
                    row["query_duration_s"] = round(feats[k].shape[0] / fps, 3)
                    row["query_windows"] = int(len(wins))
                    rows[k].append(row)
        report.rows.extend(r for per_query in rows for r in per_query)
        bar.update(len(group))
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


# --------------------------------------------------------------------------------------------
# the procedures of 06_identify


def _absolute(rec: dict, manifest_path: Path) -> dict:
    """A copy of ``rec`` whose ``wav`` / ``feat`` paths are absolute (resolved like chlib does)."""
    out = dict(rec)
    for k in ("wav", "feat"):
        if out.get(k):
            out[k] = str(resolve_path(out[k], manifest_path).resolve())
    return out


def read_split(dataset_dir: str | os.PathLike, split: str) -> list[dict]:
    """Records of ``dataset_dir/<split>.txt`` (train, val, test, full) with absolute paths;
    [] when the file is absent."""
    path = Path(dataset_dir) / f"{split}.txt"
    if not path.is_file():
        return []
    return [_absolute(r, path) for r in read_manifest(path, required=("perf", "work"))]


def reference_records(dataset_dir: str | os.PathLike, reference_manifest: str | os.PathLike = ""
                      ) -> list[dict]:
    """The recordings to index as references, with absolute ``wav`` / ``feat`` paths.

    Default: the dataset's train + val recordings, i.e. every recording not held out as a query
    (``test.txt``); without split files, all of ``full.txt``. A ``reference_manifest`` (a
    full.txt-style file) replaces that choice. Tempo copies are kept here and dropped by
    :func:`chlib.retrieval.index.build_index`.
    """
    if reference_manifest:
        p = Path(reference_manifest)
        return [_absolute(r, p) for r in read_manifest(p, required=("perf", "work", "feat"))]
    recs = read_split(dataset_dir, "train") + read_split(dataset_dir, "val")
    if not recs:
        recs = read_split(dataset_dir, "full")
    if not recs:
        raise ManifestError(
            f"{dataset_dir}: no train.txt, val.txt or full.txt; run 02_extract on the dataset "
            "or give reference_manifest"
        )
    return recs


def reference_index_for_run(run_dir: str | os.PathLike, model: Any, hp: Any,
                            records: Sequence[dict], *, rebuild: bool = False,
                            device: str = "auto", progress: bool = True) -> tuple[Any, str]:
    """The run's reference index in ``run_dir/index``: loaded when it matches, else built.

    It matches when it was built by this model (fingerprint), with these feature settings,
    window recipe and the run's distance rule (``hp.distance_rule``), from exactly these
    recordings (perf ids, tempo copies aside). Otherwise (or
    with ``rebuild``) every record is embedded (cached in ``run_dir/embeddings``), indexed and
    saved. Returns ``(index, status)`` with status "loaded ..." or "built ...".
    """
    folder = Path(run_dir) / "index"
    fingerprint = model_fingerprint(model.state_dict())
    wanted = sorted(str(r["perf"]) for r in records if not is_tempo_copy(r))
    why = "rebuild asked for"
    if not rebuild and (folder / "meta.json").is_file():
        try:
            idx = ReferenceIndex.load(folder, expect_fingerprint=fingerprint,
                                      expect_features=hp.features)
            ws = idx.window_settings
            have = sorted(idx.perfs + [str(s.get("perf")) for s in idx.skipped])
            if ws.get("window") != hp.chunk_len[0] or ws.get("mean_size") != hp.mean_size:
                why = "the index was built with another window recipe"
            elif idx.rule != rule_of(hp):
                why = (f"the index ranks by distance rule {idx.rule!r}, the run by "
                       f"{rule_of(hp)!r}")
            elif have != wanted:
                why = "the index holds other recordings"
            else:
                return idx, f"loaded {folder}: {len(idx)} reference recordings"
        except IndexMismatchError as e:
            why = str(e)
    elif not rebuild:
        why = "no index yet"
    dev = next(model.parameters()).device if device == "auto" else device
    idx = build_index(model, records, hp, device=dev, cache_dir=Path(run_dir) / "embeddings",
                      rule=rule_of(hp), progress=progress)
    idx.save(folder)
    return idx, (f"built {folder}: {len(idx)} reference recordings, {len(idx.skipped)} skipped "
                 f"({why})")


@dataclass
class Queries:
    """Audio files to identify and, where a manifest says so, their true work."""

    paths: list[str]
    truth: dict[str, str] = field(default_factory=dict)  # path -> work name
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)


def identification_queries(query_path: str | os.PathLike, dataset_dir: str | os.PathLike
                           ) -> Queries:
    """What to identify: ``""`` = the dataset's held-out test recordings (truth known); an
    audio file; a folder of audio files (no truth); or a manifest (``.txt`` / ``.jsonl``, truth
    from its ``work``). Tempo copies and repeated audio files are listed once."""
    def from_records(recs: list[dict], source: str) -> Queries:
        q = Queries([], {}, source)
        for r in recs:
            if is_tempo_copy(r) or not r.get("wav") or r["wav"] in q.truth:
                continue
            q.paths.append(r["wav"])
            q.truth[r["wav"]] = str(r["work"])
        return q

    if str(query_path) == "":
        recs = read_split(dataset_dir, "test")
        if not recs:
            raise ManifestError(
                f"{dataset_dir}: no held-out recordings (test.txt is missing or empty); give "
                "query_path (an audio file, a folder or a manifest)"
            )
        return from_records(recs, f"{Path(dataset_dir) / 'test.txt'} (held-out recordings)")
    p = Path(query_path)
    if p.is_dir():
        return Queries([str(f) for f in find_audio_files(p)], {}, str(p))
    if p.suffix.lower() in (".txt", ".jsonl"):
        return from_records([_absolute(r, p) for r in read_manifest(p)], str(p))
    if not p.is_file():
        raise ConfigError(f"query_path {p}: no such file or folder")
    return Queries([str(p)], {}, str(p))


def identification_summary(rows: Sequence[Mapping], truth: Mapping[str, str], *,
                           index_works: Sequence[str] | None = None) -> dict:
    """How often identification put the true work first / in the top 10.

    ``rows`` are :class:`chlib.retrieval.identify.IdentifyReport` rows (``by="work"``: one row per work
    and rank), ``truth`` maps query path -> true work. Shares are over queries with a known
    work; ``*_indexed`` shares only over those whose work has reference recordings (a work
    with none cannot be found: the right answer there is "no confident match").
    """
    by_query: dict[str, list[Mapping]] = {}
    failed = set()
    for r in rows:
        if r.get("error"):
            failed.add(r["query"])
            continue
        by_query.setdefault(str(r["query"]), []).append(r)
    known = set(index_works) if index_works is not None else None
    n_truth = n_indexed = top1 = top10 = top1_i = top10_i = 0
    verdicts: Counter = Counter()
    per_query = []
    for q, work in truth.items():
        if q in failed or q not in by_query:
            continue
        hits = sorted(by_query[q], key=lambda r: r["rank"])
        rank = next((int(h["rank"]) for h in hits if str(h["work"]) == work), None)
        indexed = known is None or work in known
        n_truth += 1
        n_indexed += indexed
        t1, t10 = rank == 1, rank is not None and rank <= 10
        top1 += t1
        top10 += t10
        top1_i += t1 and indexed
        top10_i += t10 and indexed
        verdicts[hits[0].get("verdict")] += 1
        per_query.append({"query": q, "true_work": work, "rank_of_true_work": rank,
                          "in_index": indexed, "best_work": hits[0]["work"],
                          "best_distance": hits[0]["distance"], "verdict": hits[0]["verdict"]})

    def share(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {"n_queries": len(set(by_query) | failed), "n_failed": len(failed),
            "n_with_truth": n_truth, "n_truth_indexed": n_indexed,
            "top1": share(top1, n_truth), "top10": share(top10, n_truth),
            "top1_indexed": share(top1_i, n_indexed), "top10_indexed": share(top10_i, n_indexed),
            "best_verdicts": dict(verdicts), "per_query": per_query}


def summary_text(summary: Mapping) -> str:
    """A few readable lines from :func:`identification_summary`."""
    s = summary
    lines = [f"{s['n_queries']} queries identified ({s['n_failed']} could not be read)."]
    if s["n_with_truth"]:
        lines.append(
            f"Of {s['n_with_truth']} queries whose work is known: true work first "
            f"{s['top1']:.0%}, in the top 10 {s['top10']:.0%}.")
        lines.append(
            f"Of the {s['n_truth_indexed']} whose work has reference recordings: first "
            f"{s['top1_indexed']:.0%}, top 10 {s['top10_indexed']:.0%} (the other "
            f"{s['n_with_truth'] - s['n_truth_indexed']} are works never indexed: the right "
            "answer for them is 'no confident match').")
    if s["best_verdicts"]:
        lines.append("Verdicts of the best match: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s["best_verdicts"].items(), key=lambda t: -t[1])))
    return "\n".join(lines)
