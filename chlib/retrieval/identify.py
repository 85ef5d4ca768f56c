"""Identify unknown recordings against a reference index (and the procedures of ``06_identify``).

Queries are embedded over the whole track (not only the first 135 s, bug 13.4.3) and searched
by the index's rule; verdict: ``p < threshold_p`` (0.001) "likely the same work", ``p <
possible_p`` (0.05) "possibly related", else "no confident match". An unreadable query gets an
``error`` row and the batch goes on."""

from __future__ import annotations

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
from chlib.core.manifest import DATASET_KEYS
from chlib.core.progress import progress as progress_bar
from chlib.data.splits import read_split
from chlib.model.checkpoint import model_fingerprint
from chlib.retrieval.embed import embed_windows
from chlib.retrieval.evaluate import write_csv
from chlib.retrieval.index import ReferenceIndex, build_index, is_tempo_copy
from chlib.retrieval.scoring import expansion_of, rule_of
from chlib.signal.audio import try_load_audio
from chlib.signal.cqt import compute_cqt_db

__all__ = ["VERDICT_LIKELY", "VERDICT_POSSIBLE", "VERDICT_NONE", "VERDICT_UNCALIBRATED",
           "CSV_COLUMNS", "AUDIO_EXTENSIONS", "verdict", "IdentifyReport", "identify",
           "identify_folder", "find_audio_files", "query_features", "read_split",
           "reference_records", "reference_index_for_run", "Queries", "identification_queries",
           "identification_summary"]

VERDICT_LIKELY = "likely the same work"
VERDICT_POSSIBLE = "possibly related"
VERDICT_NONE = "no confident match"
VERDICT_UNCALIBRATED = "no calibration"
CSV_COLUMNS = ("query", "rank", "perf", "work", "work_id", "distance", "z", "p_value", "verdict",
               "n_work_recordings", "query_duration_s", "query_windows", "error")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a")
QUERY_CHUNK = 16  # queries embedded and searched together (bounds memory for big folders)
QUERY_FRAMES = 90_000  # feature frames held at once (~1 h): bounds memory for long queries


def verdict(p_value: float, threshold_p: float = 0.001, possible_p: float = 0.05) -> str:
    """Plain-words reading of a calibrated p-value (see the module docstring)."""
    if p_value is None or not np.isfinite(p_value):
        return VERDICT_UNCALIBRATED
    if p_value < threshold_p:
        return VERDICT_LIKELY
    return VERDICT_POSSIBLE if p_value < possible_p else VERDICT_NONE


@dataclass
class IdentifyReport:
    """What :func:`identify` found: ``rows`` (one per query and rank, :data:`CSV_COLUMNS`; a
    failed query: one row, ``rank`` None, its ``error``) and ``timings`` (seconds per stage
    summed over queries, ``total_s``, ``n_queries``, ``n_failed``)."""

    rows: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[dict]:
        """``{"query", "error"}`` for every query that could not be processed."""
        return [{"query": r["query"], "error": r["error"]} for r in self.rows if r["error"]]

    def best(self) -> list[dict]:
        """The rank-1 row of every query (and the error row of failed ones)."""
        return [r for r in self.rows if r["rank"] in (1, None)]

    def first_match(self) -> dict:
        """The rank-1 row of the first identified query; FeatureError naming every query and
        why it could not be read when none could (ConfigError when there were none)."""
        if (best := next((r for r in self.rows if r["rank"] == 1), None)) is not None:
            return best
        if not self.rows:
            raise ConfigError("no queries to identify: give query_path (an audio file, a folder "
                              "of audio files or a manifest)")
        listed = "\n".join(f"  {e['query']}: {e['error'].removeprefix(e['query'] + ': ')}"
                           for e in self.errors)
        raise FeatureError(
            f"no query could be read ({len(self.errors)} file(s)):\n{listed}\nGive query_path "
            "audio that decodes (wav, flac, ogg, mp3, ...), is not silent and lasts a few "
            "seconds; convert other files first (e.g. ffmpeg -i in.xyz out.wav)")

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV (columns :data:`CSV_COLUMNS`), atomically."""
        return write_csv(path, self.rows, CSV_COLUMNS)


def _empty_row(query: str) -> dict:
    return {k: None for k in CSV_COLUMNS} | {"query": query}


def _add_time(timings: dict | None, key: str, since: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - since


def query_features(path: str | os.PathLike, hp: Any, device: str | torch.device = "cpu", *,
                   timings: dict | None = None) -> np.ndarray:
    """CQT [frames, bins] in dB of an audio file, made as extraction does (``hp.features``);
    FeatureError naming the file when it cannot be used. ``timings`` gets the stage times."""
    t0 = time.perf_counter()
    try:
        y, err = try_load_audio(path, sample_rate=hp.features.sample_rate, normalise=True)
    except Exception as e:  # decoders raise anything; a batch must go on
        y, err = None, f"{path}: {type(e).__name__}: {e}"
    _add_time(timings, "decode_s", t0)
    if err is not None:
        raise FeatureError(err)
    t1 = time.perf_counter()
    dev = pick_device(device)
    try:
        return compute_cqt_db(y, hp.features, device=dev)
    except ChlibError as e:
        raise FeatureError(f"{path}: {e}") from e
    finally:
        synchronize(dev)
        _add_time(timings, "features_s", t1)


def _window_mismatch(ws: Mapping, hp: Any) -> str | None:
    """Why an index's window recipe ``ws`` does not fit the run ``hp`` (None if it does)."""
    transform = getattr(hp, "input_transform", "none")
    if (ws.get("window") == hp.chunk_len[0] and ws.get("mean_size") == hp.mean_size
            and ws.get("transform", "none") == transform):
        return None
    return (f"index windows are {ws.get('window')} raw frames averaged by {ws.get('mean_size')} "
            f"(input transform {ws.get('transform', 'none')}), but this run uses chunk_len "
            f"{hp.chunk_len[0]}, mean_size {hp.mean_size} and input_transform {transform}")


def _embed_and_search(batch: list[tuple[str, np.ndarray]], model: torch.nn.Module, hp: Any,
                      index: ReferenceIndex, dev: torch.device, timings: dict, search: dict
                      ) -> list[list[dict]]:
    """Rows of each query of ``batch`` (path, features) (``search``: top_k, by, verdict bounds)."""
    t0 = time.perf_counter()
    windows = embed_windows(model, [f for _, f in batch], **index.window_settings, device=dev,
                            batch_size=hp.eval_batch_size, progress=False)
    synchronize(dev)
    _add_time(timings, "model_s", t0)
    t0 = time.perf_counter()
    results = index.search(windows, k=search["top_k"], by=search["by"])
    _add_time(timings, "search_s", t0)
    fps = hp.features.frames_per_second
    return [[_empty_row(path) | {c: hit[c] for c in CSV_COLUMNS if c in hit}
             | {"verdict": verdict(hit["p_value"], *search["bounds"]),
                "query_duration_s": round(feat.shape[0] / fps, 3), "query_windows": len(wins)}
             for hit in hits] for (path, feat), wins, hits in zip(batch, windows, results,
                                                                  strict=True)]


def identify(paths: Sequence[str | os.PathLike], *, model: torch.nn.Module, hp: Any,
             index: ReferenceIndex, device: str | torch.device = "auto", top_k: int = 10,
             by: str = "work", threshold_p: float = 0.001, possible_p: float = 0.05,
             progress: bool = False) -> IdentifyReport:
    """Identify each audio file in ``paths`` against ``index``, which must be ``model``'s, with
    ``hp``'s feature settings and window recipe (else IndexMismatchError). ``top_k`` rows per
    query, ``by`` "work" or "perf"; ``threshold_p`` <= ``possible_p``: the verdict bounds."""
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if not 0 < threshold_p <= possible_p <= 1:
        raise ConfigError(f"need 0 < threshold_p <= possible_p <= 1, got {threshold_p} and "
                          f"{possible_p}")
    index.check_compatible(fingerprint=model_fingerprint(model.state_dict()), features=hp.features)
    if (why := _window_mismatch(index.window_settings, hp)) is not None:
        raise IndexMismatchError(f"{why}; rebuild the index with this run's settings")
    dev = pick_device(device)
    t_all = time.perf_counter()
    timings = {"decode_s": 0.0, "features_s": 0.0, "model_s": 0.0, "search_s": 0.0}
    search = {"top_k": top_k, "by": by, "bounds": (threshold_p, possible_p)}
    paths = [str(p) for p in paths]
    per_query: list[list[dict]] = [[] for _ in paths]
    batch: list[tuple[int, np.ndarray]] = []  # queries whose features wait to be embedded
    bar = progress_bar(total=len(paths), desc="identify", unit="file", enabled=progress,
                       leave=False)

    def flush() -> None:
        done = _embed_and_search([(paths[k], f) for k, f in batch], model, hp, index, dev,
                                 timings, search)
        for (k, _), r in zip(batch, done, strict=True):
            per_query[k] = r
        bar.update(len(batch))
        batch.clear()

    for k, p in enumerate(paths):
        try:
            batch.append((k, query_features(p, hp, dev, timings=timings)))
        except ChlibError as e:
            per_query[k] = [_empty_row(p) | {"error": str(e)}]
            bar.update(1)
        if batch and (len(batch) >= QUERY_CHUNK
                      or sum(len(f) for _, f in batch) >= QUERY_FRAMES or k == len(paths) - 1):
            flush()
    bar.close()
    rows = [r for rs in per_query for r in rs]
    timings |= {"total_s": time.perf_counter() - t_all, "n_queries": len(paths),
                "n_failed": len({r["query"] for r in rows if r["error"]})}
    return IdentifyReport(rows, timings)


def find_audio_files(folder: str | os.PathLike, *, recursive: bool = False,
                     extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[Path]:
    """Audio files in ``folder`` (by extension, case-insensitive), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder")
    exts = {e.lower() for e in extensions}
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in exts)


def identify_folder(folder: str | os.PathLike, *, model: torch.nn.Module, hp: Any,
                    index: ReferenceIndex, out_csv: str | os.PathLike | None = None,
                    recursive: bool = False, extensions: Sequence[str] = AUDIO_EXTENSIONS,
                    **kwargs: Any) -> IdentifyReport:
    """:func:`identify` (``kwargs``: device, top_k, by, thresholds) every audio file of
    ``folder``; write the rows to ``out_csv`` (atomic) if given."""
    files = find_audio_files(folder, recursive=recursive, extensions=extensions)
    if not files:
        raise ConfigError(f"{folder}: no audio files with extensions {', '.join(extensions)}; "
                          "check the folder or pass recursive=True")
    report = identify(files, model=model, hp=hp, index=index, **kwargs)
    if out_csv is not None:
        report.to_csv(out_csv)
    return report


def reference_records(dataset_dir: str | os.PathLike, reference_manifest: str | os.PathLike = ""
                      ) -> list[dict]:
    """The recordings to index (absolute paths): ``reference_manifest`` if given, else the
    dataset's train + val recordings (all but the held-out test.txt), else its full.txt."""
    if reference_manifest:
        return read_split(reference_manifest, required=("perf", "work", "feat"))
    recs = read_split(dataset_dir, "train") + read_split(dataset_dir, "val")
    if not (recs := recs or read_split(dataset_dir, "full")):
        raise ManifestError(f"{dataset_dir}: no train.txt, val.txt or full.txt; run 02_extract "
                            "on the dataset or give reference_manifest")
    return recs


def _why_not_reuse(folder: Path, fingerprint: str, hp: Any, records: Sequence[dict]
                   ) -> tuple[ReferenceIndex | None, str]:
    """The saved index when it fits the run, else None and why not (a damaged or tampered one
    among them: its feature paths must lie in the run folder or beside the records' own)."""
    if not (folder / "meta.json").is_file():
        return None, "no index yet"
    roots = {folder.parent, *(Path(r["feat"]).resolve().parent for r in records if r.get("feat"))}
    wanted = sorted(str(r["perf"]) for r in records if not is_tempo_copy(r))
    try:
        idx = ReferenceIndex.load(folder, expect_fingerprint=fingerprint,
                                  expect_features=hp.features, feature_roots=sorted(map(str, roots)))
    except IndexMismatchError as e:
        return None, str(e)
    if _window_mismatch(idx.window_settings, hp) is not None:
        return None, "the index was built with another window recipe"
    if idx.rule != rule_of(hp):
        return None, f"the index ranks by distance rule {idx.rule!r}, the run by {rule_of(hp)!r}"
    if (kv := idx.window_settings.get("key_variants", [0])) != (want := list(hp.key_variants)):
        return None, f"the index reads keys {kv}, the run {want}"
    if idx.expansion != expansion_of(hp):
        return None, "the index and the run differ in neighbour expansion"
    if sorted(idx.perfs + [str(s.get("perf")) for s in idx.skipped]) != wanted:
        return None, "the index holds other recordings"
    return idx, ""


def reference_index_for_run(run_dir: str | os.PathLike, model: Any, hp: Any,
                            records: Sequence[dict], *, rebuild: bool = False,
                            device: str = "auto", progress: bool = True) -> tuple[Any, str]:
    """``(index, status)``: ``run_dir/index`` loaded when it is this model's, with the run's
    settings and rule, of exactly these recordings; else (or with ``rebuild``; a damaged or
    tampered index too) built from the records (embeddings cached in ``run_dir/embeddings``)
    and saved."""
    folder = Path(run_dir) / "index"
    fp = model_fingerprint(model.state_dict())
    idx, why = (None, "rebuild asked for") if rebuild else _why_not_reuse(folder, fp, hp, records)
    if idx is not None:
        return idx, f"loaded {folder}: {len(idx)} reference recordings"
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


def _queries_of(recs: list[dict], source: str) -> Queries:
    """Queries of manifest records: tempo copies and repeated audio files are listed once."""
    truth: dict[str, str] = {}
    for r in recs:
        if r.get("wav") and not is_tempo_copy(r):
            truth.setdefault(r["wav"], str(r["work"]))
    return Queries(list(truth), truth, source)


def identification_queries(query_path: str | os.PathLike, dataset_dir: str | os.PathLike
                           ) -> Queries:
    """What to identify: ``""`` = the dataset's held-out test recordings (truth known); an
    audio file; a folder of audio files (no truth); or a manifest (``.txt`` / ``.jsonl``, truth
    from its ``work``)."""
    if str(query_path) == "":
        if not (recs := read_split(dataset_dir, "test")):
            raise ManifestError(f"{dataset_dir}: no held-out recordings (test.txt is missing or "
                                "empty); give query_path (an audio file, a folder or a manifest)")
        return _queries_of(recs, f"{Path(dataset_dir) / 'test.txt'} (held-out recordings)")
    p = Path(query_path)
    if p.is_dir():
        if not (files := find_audio_files(p)):
            raise ConfigError(f"query_path {p}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) "
                              "in this folder; give a folder of audio files, a file or a manifest")
        return Queries([str(f) for f in files], {}, str(p))
    if p.suffix.lower() in (".txt", ".jsonl"):
        return _queries_of(read_split(p, required=DATASET_KEYS), str(p))
    if not p.is_file():
        raise ConfigError(f"query_path {p}: no such file or folder")
    return Queries([str(p)], {}, str(p))


def identification_summary(rows: Sequence[Mapping], truth: Mapping[str, str], *,
                           index_works: Sequence[str] | None = None) -> dict:
    """How often the true work (``truth``: query path -> work) came first / in the top 10 of
    ``by="work"`` rows; ``*_indexed`` shares count only works with reference recordings."""
    failed = {r["query"] for r in rows if r.get("error")}
    by_query: dict[str, list[Mapping]] = {}
    for r in rows:
        if not r.get("error"):
            by_query.setdefault(str(r["query"]), []).append(r)
    known = None if index_works is None else set(index_works)
    per_query = []
    for q, work in truth.items():
        if q in failed or q not in by_query:
            continue
        hits = sorted(by_query[q], key=lambda r: r["rank"])
        per_query.append({
            "query": q, "true_work": work,
            "rank_of_true_work": next((int(h["rank"]) for h in hits if str(h["work"]) == work),
                                      None),
            "in_index": known is None or work in known,
            "best_work": hits[0]["work"], "best_distance": hits[0]["distance"],
            "verdict": hits[0]["verdict"]})

    def share(top: int, indexed_only: bool) -> float:
        ranks = [p["rank_of_true_work"] for p in per_query if p["in_index"] or not indexed_only]
        return sum(r is not None and r <= top for r in ranks) / len(ranks) if ranks else np.nan

    n_indexed = sum(p["in_index"] for p in per_query)
    return {"n_queries": len(set(by_query) | failed), "n_failed": len(failed),
            "n_with_truth": len(per_query), "n_truth_indexed": n_indexed,
            "top1": share(1, False), "top10": share(10, False),
            "top1_indexed": share(1, True), "top10_indexed": share(10, True),
            "best_verdicts": dict(Counter(p["verdict"] for p in per_query)),
            "per_query": per_query}
