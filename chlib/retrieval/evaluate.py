"""Evaluate a trained run on its test sets (``05_evaluate``): :func:`evaluate_run` embeds and
scores each (:mod:`chlib.retrieval.scoring`), adding bootstrap CIs, baselines and chart data.

Files written by :meth:`Evaluation.save` (``run_dir/evaluation/`` by default)::

    metrics.json                  checkpoint, epoch, fingerprint, metrics and CIs per test set
    metrics.csv                   the metrics table (05's): one row per test set and metric
    <testset>.npy                 distance matrix [Q, R] float32, -1 in excluded cells
                                  (the original's ``-dist_name`` export)
    <testset>.reflabels.npy       work labels of the columns [R]   (the original's export)
    <testset>.querylabels.npy     work labels of the rows [Q]
    <testset>.exclude.npy         bool [Q, R], True where a cell was not ranked
    <testset>.perfs.json          perf ids and work names of rows and columns
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from chlib.core.errors import CheckpointError, ConfigError, ManifestError
from chlib.core.io import atomic_save_npy, atomic_write_text, write_json
from chlib.core.manifest import read_manifest
from chlib.model.checkpoint import (
    find_checkpoint_dir,
    load_model,
    model_fingerprint,
    read_best_epoch,
)
from chlib.model.network import untrained_model
from chlib.retrieval import metrics, scoring
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.protocol import check_rule, reading_rows, track_distances, track_vectors

__all__ = ["TestSetSpec", "TestSetResult", "Evaluation", "resolve_testsets", "write_csv",
           "load_checkpoint", "top1_confusions", "random_embedding_baseline", "score_testset",
           "evaluate_run"]


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with ``columns`` (None and missing keys as ""), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


@dataclass(frozen=True)
class TestSetSpec:
    """One retrieval test set: query and reference manifests (full.txt-style lines)."""

    name: str
    query_path: Path
    ref_path: Path
    query_in_ref_path: Path | None = None


def _under(root: Path | None, path: Any) -> Path:
    """``path``, or ``root / path`` when it is relative and does not exist as given."""
    p = Path(path)
    return p if p.is_absolute() or root is None or p.exists() else root / p


def _spec_from(name: str, value: Any, root: Path | None) -> TestSetSpec:
    p = partial(_under, root)
    if isinstance(value, TestSetSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        return TestSetSpec(name, p(value), p(value))
    if isinstance(value, Mapping):
        if "query_path" not in value:
            raise ConfigError(f"test set {name!r}: needs query_path (and optionally ref_path)")
        q = p(value["query_path"])
        qir = value.get("query_in_ref_path")
        return TestSetSpec(name, q, p(value.get("ref_path") or q), p(qir) if qir else None)
    if isinstance(value, Sequence) and len(value) == 2:
        return TestSetSpec(name, p(value[0]), p(value[1]))
    raise ConfigError(f"test set {name!r}: give a manifest path, (query_path, ref_path) or a "
                      f"mapping with query_path/ref_path, got {value!r}")


def resolve_testsets(hp: Any, testsets: Any = None, *, root: str | os.PathLike | None = None
                     ) -> list[TestSetSpec]:
    """The test sets: None = the config's ``testsets`` (else ``test_path``, named "test"); a
    manifest or a list of them (query = reference list, named by file stem); or a mapping
    name -> path | (query, ref) | {query_path, ref_path, query_in_ref_path}. Relative paths
    that do not exist as given are taken relative to ``root``."""
    root_p = Path(root) if root is not None else None
    if not testsets:
        testsets = {ts.name: vars(ts) for ts in getattr(hp, "testsets", {}).values()}
        if not testsets and getattr(hp, "test_path", None):
            testsets = {"test": hp.test_path}
        if not testsets:
            raise ConfigError(f"{getattr(hp, 'source', 'run config')}: no test sets configured (no "
                              "testsets, no test_path); pass testsets=['datasets/<name>/test.txt']")
    if isinstance(testsets, (str, os.PathLike)):
        testsets = [testsets]
    if isinstance(testsets, Mapping):
        return [_spec_from(str(k), v, root_p) for k, v in testsets.items()]
    specs: dict[str, TestSetSpec] = {}
    for v in testsets:
        name = Path(v).stem if isinstance(v, (str, os.PathLike)) else str(v)
        while name in specs:
            name += "_"
        specs[name] = _spec_from(name, v, root_p)
    return list(specs.values())


def load_checkpoint(run_dir: str | os.PathLike, checkpoint: str | int = "best",
                    device: str = "auto") -> tuple[Any, Any, int, str]:
    """``chlib.model.checkpoint.load_model``, but ``"best"`` falls back to ``"latest"`` without
    a ``best.json``: ``(model in eval mode, hp, epoch, note)``, the note "" or what was chosen."""
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        checkpoint = int(checkpoint)
    if checkpoint not in ("best", "latest") and not isinstance(checkpoint, int):
        raise CheckpointError(f"checkpoint must be 'best', 'latest' or an epoch number, got "
                              f"{checkpoint!r}")
    note = ""
    if checkpoint == "best" and read_best_epoch(find_checkpoint_dir(run_dir)) is None:
        checkpoint, note = "latest", "no best.json in the run: evaluated the latest checkpoint"
    return (*load_model(run_dir, checkpoint, device), note)


def top1_confusions(dist: np.ndarray, q_labels: Sequence, r_labels: Sequence, *,
                    exclude: np.ndarray | None = None) -> list[dict]:
    """Work pairs confused at rank 1: for each query whose nearest non-excluded reference is
    another work, the unordered pair (query work, that work) is counted. Rows ``{"work_a",
    "work_b", "count", "min_distance"}``, most frequent first (ties: closer, then by label)."""
    d = np.asarray(dist, dtype=np.float64)
    ql, rl = list(q_labels), list(r_labels)
    if d.shape != (len(ql), len(rl)):
        raise ConfigError(f"top1_confusions: labels {len(ql)} x {len(rl)} for a {d.shape} matrix")
    if exclude is not None:
        d = np.where(exclude, np.inf, d)
    found: dict[tuple, list[float]] = {}
    for i in np.flatnonzero(np.isfinite(d).any(axis=1)):
        j = int(np.argmin(d[i]))  # first minimum = stable order, as the metrics rank
        if rl[j] != ql[i]:
            found.setdefault(tuple(sorted((ql[i], rl[j]), key=str)), []).append(float(d[i, j]))
    rows = [{"work_a": a, "work_b": b, "count": len(ds), "min_distance": min(ds)}
            for (a, b), ds in found.items()]
    return sorted(rows, key=lambda r: (-r["count"], r["min_distance"], str(r["work_a"]),
                                       str(r["work_b"])))


@dataclass
class TestSetResult(scoring.ScoringInputs):
    """Everything computed for one test set: the scoring inputs (distances, exclusions, labels,
    perf ids, rule; rows = queries, columns = references) and what came of them."""

    name: str
    spec: TestSetSpec
    metrics: dict  # retrieval_metrics output
    ci: dict  # bootstrap_ci output: metric -> {point, mean, low, high, std}
    ranks: np.ndarray  # [Q] rank of the first correct reference, 0 = none
    per_work: list[dict]  # per_work_ap rows, worst first, with "name"; scorable queries only
    confusions: list[dict]  # top1_confusions rows, with names
    closest_wrong: list[dict]  # most_confused_pairs rows (recording pairs), with perf ids
    points: np.ndarray  # [N, D] one unit vector per distinct recording (queries, then refs)
    point_labels: np.ndarray  # [N]
    point_perfs: list[str]
    test_only: set = field(default_factory=set)  # labels of works absent from training
    skipped: list[dict] = field(default_factory=list)  # recordings without usable features
    baselines: dict = field(default_factory=dict)  # name -> metrics the model must beat

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the distance matrix (-1 in excluded cells), labels, mask and perf ids."""
        arrays = {"dist": (".npy", np.where(self.exclude, -1.0, self.dist).astype(np.float32)),
                  "ref_labels": (".reflabels.npy", np.asarray(self.r_labels)),
                  "query_labels": (".querylabels.npy", np.asarray(self.q_labels)),
                  "exclude": (".exclude.npy", self.exclude)}
        paths = {}
        for k, (suffix, arr) in arrays.items():
            atomic_save_npy(paths.setdefault(k, Path(out_dir) / f"{self.name}{suffix}"), arr)
        paths["perfs"] = Path(out_dir) / f"{self.name}.perfs.json"
        write_json(paths["perfs"], {
            "query_perfs": self.q_perfs, "ref_perfs": self.r_perfs,
            "query_works": [self.name_of(x) for x in self.q_labels],
            "ref_works": [self.name_of(x) for x in self.r_labels],
        })
        return paths


@dataclass
class Evaluation:
    """The result of :func:`evaluate_run`: one :class:`TestSetResult` per test set."""

    run_dir: Path
    checkpoint: str | int
    epoch: int
    fingerprint: str
    results: dict[str, TestSetResult]
    notes: list[str] = field(default_factory=list)
    rule: str = "min"  # the run's distance rule (hp.distance_rule), used for every test set

    def result(self, name: str | None = None) -> TestSetResult:
        """The named test set's result (default: see :meth:`pick`)."""
        return self.pick(name)[0]

    def pick(self, name: str | None = None) -> tuple[TestSetResult, str]:
        """``(result, note)``: the named test set's, note ""; with no name the first in which
        every query has a relevant reference (else the first), the note naming those passed
        over and their queries that cannot be scored."""
        if name and name not in self.results:
            raise ConfigError(f"no test set {name!r}; evaluated: {', '.join(self.results)}")
        if name:
            return self.results[name], ""
        names = list(self.results)
        ms = {n: self.results[n].metrics for n in names}
        chosen = next((n for n in names if not ms[n].get("n_queries_without_relevant")), names[0])
        if not (passed := names[:names.index(chosen)]):
            return self.results[chosen], ""
        why = ", ".join(f"{n!r} ({ms[n]['n_queries_without_relevant']} of {ms[n]['n_queries']} "
                        "queries have no other recording of their work)" for n in passed)
        return self.results[chosen], (f"test set {chosen!r} shown, where every query has another "
                                      f"recording of its work; passed over: {why}")

    def metrics_rows(self) -> tuple[list[dict], list[str]]:
        """The metrics table's rows, one per (test set, metric) with the CI bounds, baselines and
        counts, and its columns (05's table and ``metrics.csv``)."""
        results = self.results.values()
        rows = [{"testset": r.name, "rule": r.rule, "metric": m, "value": r.metrics.get(m),
                 "low": r.ci.get(m, {}).get("low"), "high": r.ci.get(m, {}).get("high"),
                 "queries": r.metrics.get("n_queries"), "refs": len(r.r_perfs),
                 **{b: scores.get(m) for b, scores in r.baselines.items()}}
                for r in results for m in metrics.METRIC_NAMES]
        extra = list(dict.fromkeys(b for r in results for b in r.baselines))
        return rows, ["testset", "rule", "metric", "value", "low", "high", *extra, "queries",
                      "refs"]

    def save(self, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Write ``metrics.json``, ``metrics.csv`` and each test set's arrays (default
        ``run_dir/evaluation``)."""
        out = Path(out_dir) if out_dir is not None else self.run_dir / "evaluation"
        paths = {f"{name}.{k}": p for name, r in self.results.items()
                 for k, p in r.save(out).items()}
        paths["metrics"] = out / "metrics.json"
        write_json(paths["metrics"], {
            "run_dir": str(self.run_dir), "checkpoint": self.checkpoint, "epoch": self.epoch,
            "fingerprint": self.fingerprint, "notes": self.notes, "distance_rule": self.rule,
            "testsets": {n: {"query_path": str(r.spec.query_path),
                             "ref_path": str(r.spec.ref_path), "distance_rule": r.rule,
                             "metrics": r.metrics, "ci": r.ci, "baselines": r.baselines,
                             "n_skipped": len(r.skipped)} for n, r in self.results.items()},
        })
        paths["metrics_csv"] = write_csv(out / "metrics.csv", *self.metrics_rows())
        return paths


def _train_works(hp: Any, root: Path | None) -> set[str] | None:
    """Work names of the run's training manifest (None when there is none to read)."""
    path = getattr(hp, "train_path", None)
    if not path or not (p := _under(root, path)).exists():
        return None
    return {str(r.get("work", r.get("work_id"))) for r in read_manifest(p, required=())}


def _scores(q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray], q_labels: Any,
            r_labels: Any, exclude: np.ndarray, rule: str, no_relevant: str,
            readings: int = 1, expansion: bool = False, same: bool = False) -> dict[str, float]:
    """The five metrics of window embeddings under ``rule`` (for the baselines); ``same``: the
    queries are the references (for ``expansion``)."""
    dist = track_distances(q_windows, r_windows, rule=rule, readings=readings)
    if expansion:
        dist = scoring.expanded(dist, r_windows, same, exclude, rule=rule, readings=readings)
    got = metrics.retrieval_metrics(dist, q_labels, r_labels, exclude=exclude,
                                    no_relevant=no_relevant)
    return {m: float(got[m]) for m in metrics.METRIC_NAMES}


def random_embedding_baseline(q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray],
                              q_labels: np.ndarray, r_labels: np.ndarray, exclude: np.ndarray, *,
                              same: bool, rule: str = "min", n_draws: int = 20, seed: int = 12345,
                              no_relevant: str = "count_as_zero", readings: int = 1,
                              expansion: bool = False) -> dict:
    """Chance level: the metrics of random window embeddings (as many windows per recording
    as the model's, same exclusions), averaged over ``n_draws``; ``same``: queries and
    references are one list (and share their random vectors)."""
    rng = np.random.default_rng(seed)
    dim = int(q_windows[0].shape[1])
    draws = []
    for _ in range(n_draws):
        qw = [rng.standard_normal((len(w), dim)).astype(np.float32) for w in q_windows]
        rw = qw if same else [rng.standard_normal((len(w), dim)).astype(np.float32)
                              for w in r_windows]
        draws.append(list(_scores(qw, rw, q_labels, r_labels, exclude, rule, no_relevant,
                                  readings, expansion, same).values()))
    return dict(zip(metrics.METRIC_NAMES, np.mean(draws, axis=0).tolist(), strict=True))


def _usable(name: str, spec: TestSetSpec, q_records: list[dict], r_records: list[dict],
            q_windows: list, r_windows: list) -> tuple[list[int], list[int], list[dict]]:
    """Rows and columns with window embeddings (query, ref indices) and the skipped records."""
    same = r_records is q_records
    roles = [("query and ref" if same else "query", q_records, q_windows)]
    roles += [] if same else [("ref", r_records, r_windows)]
    skipped = [{"perf": r.get("perf"), "role": role, "reason": "no usable features"}
               for role, recs, wins in roles
               for r, w in zip(recs, wins, strict=True) if w is None]
    q_keep, r_keep = ([i for i, w in enumerate(ws) if w is not None]
                      for ws in (q_windows, r_windows))
    for what, kept, path in (("query", q_keep, spec.query_path),
                             ("reference", r_keep, spec.ref_path)):
        if not kept:
            raise ManifestError(f"test set {name!r}: no {what} recording has usable features "
                                f"({path}); re-run feature extraction")
    if spec.query_in_ref_path is not None and skipped:
        raise ManifestError(
            f"test set {name!r}: recordings without features break the positions in "
            f"{spec.query_in_ref_path}; re-extract the missing features")
    return q_keep, r_keep, skipped


def _chart_data(s: scoring.ScoringInputs, no_relevant: str, top_pairs: int) -> dict:
    """Ranks, per-work AP, confused work pairs and closest wrong recordings of one test set."""
    d, ql, rl, ex = s.dist, s.q_labels, s.r_labels, s.exclude
    per_work = [dict(row, name=s.name_of(row["work"]))  # queries that cannot be scored left out
                for row in metrics.per_work_ap(d, ql, rl, exclude=ex, no_relevant="skip")]
    confusions = [dict(row, name_a=s.name_of(row["work_a"]), name_b=s.name_of(row["work_b"]))
                  for row in top1_confusions(d, ql, rl, exclude=ex)]
    one_list = s.q_perfs == s.r_perfs  # report each unordered pair once
    closest = [dict(row, query_perf=s.q_perfs[row["query"]], ref_perf=s.r_perfs[row["ref"]])
               for row in metrics.most_confused_pairs(d, ql, top_pairs, exclude=ex,
                                                      ref_labels=None if one_list else rl)]
    return {"ranks": metrics.rank_of_first_correct(d, ql, rl, exclude=ex), "per_work": per_work,
            "confusions": confusions, "closest_wrong": closest}


def score_testset(name: str, spec: TestSetSpec, q_records: list[dict], r_records: list[dict],
                  q_windows: list, r_windows: list, *, rule: str = "min", readings: int = 1,
                  expansion: bool = False,
                  train_works: set[str] | None = None, n_boot: int = 1000, seed: int = 12345,
                  confidence: float = 0.95, no_relevant: str = "count_as_zero",
                  top_pairs: int = 20, baseline_windows: Mapping[str, tuple] | None = None,
                  baseline_readings: Mapping[str, int] | None = None) -> TestSetResult:
    """Metrics, CIs, baselines and chart data of one test set from its window embeddings (None
    for a failed recording: dropped, listed in ``skipped``; ``readings`` key readings per
    window). ``train_works``: work names seen in training; ``baseline_windows``: name ->
    (query, ref) windows of another model, scored too (with ``baseline_readings[name]``
    readings, default ``readings``)."""
    qi, ri, skipped = _usable(name, spec, q_records, r_records, q_windows, r_windows)
    qw, rw = [q_windows[i] for i in qi], [r_windows[j] for j in ri]
    s = scoring.score_inputs([q_records[i] for i in qi], [r_records[j] for j in ri], qw, rw,
                             rule=rule, readings=readings, expansion=expansion,
                             query_in_ref_path=spec.query_in_ref_path,
                             where=f"test set {name!r} ({spec.query_path}, {spec.ref_path})")
    labels = (s.q_labels, s.r_labels, s.exclude)
    baselines = {"random embeddings": random_embedding_baseline(
        qw, rw, *labels, same=s.q_perfs == s.r_perfs, rule=rule, seed=seed,
        no_relevant=no_relevant, readings=readings, expansion=expansion)}
    for b, (bq, br) in (baseline_windows or {}).items():
        baselines[b] = _scores([bq[i] for i in qi], [br[j] for j in ri], *labels, rule, no_relevant,
                               (baseline_readings or {}).get(b, readings), expansion,
                               s.q_perfs == s.r_perfs)
    # one point per distinct recording: queries, then references not already among them
    seen = set(s.q_perfs)
    extra = [j for j, p in enumerate(s.r_perfs) if p not in seen]
    point_labels = np.concatenate([s.q_labels, s.r_labels[extra]])
    test_only = set() if train_works is None else {
        lab for lab in point_labels.tolist() if s.name_of(lab) not in train_works}
    return TestSetResult(
        **vars(s), name=name, spec=spec,
        metrics=metrics.retrieval_metrics(s.dist, s.q_labels, s.r_labels, exclude=s.exclude,
                                          no_relevant=no_relevant),
        ci=metrics.bootstrap_ci(s.dist, s.q_labels, s.r_labels, s.exclude, n_boot=n_boot,
                                seed=seed, confidence=confidence, no_relevant=no_relevant),
        **_chart_data(s, no_relevant, top_pairs),
        points=track_vectors([reading_rows(w, readings) for w in qw + [rw[j] for j in extra]]),
        point_labels=point_labels,
        point_perfs=s.q_perfs + [s.r_perfs[j] for j in extra], test_only=test_only,
        skipped=skipped, baselines=baselines,
    )


def _both(embed: Callable[..., list], spec: TestSetSpec, q_records: list[dict],
          r_records: list[dict]) -> tuple[list, list]:
    """``embed(records, manifest_path=...)`` of the queries and the references (one if same)."""
    qw = embed(q_records, manifest_path=spec.query_path)
    return qw, qw if r_records is q_records else embed(r_records, manifest_path=spec.ref_path)


def evaluate_run(run_dir: str | os.PathLike, *, checkpoint: str | int = "best",
                 testsets: Any = None, device: str = "auto", rule: str | None = None,
                 n_boot: int = 1000, seed: int = 12345, confidence: float = 0.95,
                 no_relevant: str = "count_as_zero", cache: bool = True, progress: bool = True,
                 root: str | os.PathLike | None = None,
                 untrained_baseline: bool = True, model_free_baseline: bool = True
                 ) -> Evaluation:
    """Evaluate one checkpoint (:func:`load_checkpoint`) on the run's test sets or ``testsets``
    (:func:`resolve_testsets`); nothing is written (see :meth:`Evaluation.save`), but with
    ``cache`` **this function caches** embeddings in ``run_dir/embeddings``. ``rule``: None =
    the run's ``distance_rule``. ``seed`` seeds the bootstrap and the baselines: random
    embeddings, random weights (``untrained_baseline``) and the features' 2D-FTM
    (``model_free_baseline``, :data:`~chlib.retrieval.scoring.MODEL_FREE`)."""
    run_dir = Path(run_dir)
    model, hp, epoch, note = load_checkpoint(run_dir, checkpoint, device)
    rule = check_rule(scoring.rule_of(hp) if rule is None else rule)
    readings = scoring.readings_of(hp)
    dev = next(model.parameters()).device
    fingerprint = model_fingerprint(model.state_dict())
    root_p = Path(root) if root is not None else None
    train_works = _train_works(hp, root_p)
    embedders = {"model": partial(embed_recordings, model, hp=hp, device=dev, failures=[],
                                  fingerprint=fingerprint, progress=progress,
                                  cache_dir=run_dir / "embeddings" if cache else None)}
    if untrained_baseline:
        untrained = untrained_model(model, seed=seed)
        embedders["untrained model"] = partial(embed_recordings, untrained, hp=hp, device=dev,
                                               failures=[], progress=False)
    if model_free_baseline:
        embedders[scoring.MODEL_FREE] = partial(scoring.model_free_windows, hp=hp)
    results: dict[str, TestSetResult] = {}
    for spec in resolve_testsets(hp, testsets, root=root_p):
        q_records = read_manifest(spec.query_path, required=("perf", "feat"))
        r_records = (q_records if spec.ref_path == spec.query_path
                     else read_manifest(spec.ref_path, required=("perf", "feat")))
        others = {k: _both(e, spec, q_records, r_records) for k, e in embedders.items()}
        qw, rw = others.pop("model")
        results[spec.name] = score_testset(
            spec.name, spec, q_records, r_records, qw, rw, rule=rule, readings=readings,
            expansion=scoring.expansion_of(hp),
            train_works=train_works, n_boot=n_boot, seed=seed, confidence=confidence,
            no_relevant=no_relevant, baseline_windows=others,
            baseline_readings={scoring.MODEL_FREE: 1})
    notes = [note] if note else []
    if readings > 1 or scoring.expansion_of(hp):
        how = [f"key readings {hp.key_variants}"] if readings > 1 else []
        how += ["neighbour expansion"] if scoring.expansion_of(hp) else []
        notes.append(f"compared with {' and '.join(how)} (the run's comparison settings)")
    if train_works is None:
        notes.append("the run config names no readable train_path: never-seen works are not "
                     "marked")
    return Evaluation(run_dir=run_dir, checkpoint=checkpoint, epoch=epoch,
                      fingerprint=fingerprint, results=results, notes=notes, rule=rule)
