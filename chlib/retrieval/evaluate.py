"""Evaluate a trained run on its test sets: the procedure behind ``05_evaluate``.

:func:`evaluate_run` loads one checkpoint of a run (``"best"``, ``"latest"`` or an epoch),
embeds every recording of each test set through the one embedding path
(:mod:`chlib.retrieval.embed`, cached under ``run_dir/embeddings``), scores it with the one
scorer (:mod:`chlib.retrieval.scoring`: distances under the run's ``distance_rule``, the same
rule its reference index searches by) and adds work-stratified bootstrap confidence intervals
(:mod:`chlib.retrieval.metrics`). Per test set it also keeps what the charts need: the rank of the first
correct recording per query, per-work AP, the most confused work pairs and one embedding per
recording for t-SNE / UMAP maps, with works never seen in training marked.

Test sets come from the run config (``hp.testsets``, else ``hp.test_path``) or are given
explicitly. A recording is never matched against itself or against a tempo copy of itself
(:func:`chlib.retrieval.metrics.self_exclusion_mask`), whether query and reference lists are the same
file or not; an original-style ``query_in_ref_path`` adds its pairs to the exclusions.

Files written by :meth:`Evaluation.save` (``run_dir/evaluation/`` by default)::

    metrics.json                  checkpoint, epoch, fingerprint, metrics and CIs per test set
    <testset>.npy                 distance matrix [Q, R] float32, -1 in excluded cells
                                  (the original's ``-dist_name`` export)
    <testset>.reflabels.npy       work labels of the columns [R]   (the original's export)
    <testset>.querylabels.npy     work labels of the rows [Q]
    <testset>.exclude.npy         bool [Q, R], True where a cell was not ranked
    <testset>.perfs.json          perf ids and work names of rows and columns

and PNG figures by :func:`chlib.ui.report.testset_figure` (``run_dir/figures/<testset>_<kind>.png``).
``06_identify`` and ``07_explore`` live in :mod:`chlib.retrieval.identify` and
:mod:`chlib.retrieval.explore`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chlib.core.errors import CheckpointError, ConfigError, ManifestError
from chlib.core.io import atomic_save_npy, write_json
from chlib.core.manifest import read_manifest
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import (
    find_checkpoint_dir,
    load_model,
    model_fingerprint,
    read_best_epoch,
)
from chlib.retrieval import metrics
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.protocol import check_rule, track_distances, track_vectors
from chlib.retrieval.scoring import ScoringInputs, rule_of, score_inputs

__all__ = [
    "FIGURE_KINDS",
    "TestSetSpec",
    "TestSetResult",
    "Evaluation",
    "resolve_testsets",
    "load_checkpoint",
    "top1_confusions",
    "random_embedding_baseline",
    "score_testset",
    "evaluate_run",
]

#: Kinds accepted by :func:`chlib.ui.report.testset_figure`.
FIGURE_KINDS = ("tsne", "umap", "pca", "ranks", "confused", "per_work")


@dataclass(frozen=True)
class TestSetSpec:
    """One retrieval test set: query and reference manifests (full.txt-style lines)."""

    name: str
    query_path: Path
    ref_path: Path
    query_in_ref_path: Path | None = None


def _spec_from(name: str, value: Any, root: Path | None) -> TestSetSpec:
    def p(x: Any) -> Path:
        x = Path(x)
        return x if x.is_absolute() or root is None or x.exists() else root / x

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
    raise ConfigError(
        f"test set {name!r}: give a manifest path, (query_path, ref_path) or a mapping with "
        f"query_path/ref_path, got {value!r}"
    )


def resolve_testsets(hp: Any, testsets: Any = None, *, root: str | os.PathLike | None = None
                     ) -> list[TestSetSpec]:
    """The test sets to evaluate.

    ``testsets`` may be None (the run config's ``testsets``, else its ``test_path`` as a test
    set named "test"), a manifest path or a list of them (query = reference = the file, each
    named after its file stem), or a mapping name -> path | (query, ref) | {query_path,
    ref_path, query_in_ref_path}. Relative paths that do not exist as given are taken relative
    to ``root``.
    """
    root_p = Path(root) if root is not None else None
    if testsets is None or (isinstance(testsets, (list, tuple, dict)) and len(testsets) == 0):
        specs = [_spec_from(ts.name, {"query_path": ts.query_path, "ref_path": ts.ref_path,
                                      "query_in_ref_path": ts.query_in_ref_path}, root_p)
                 for ts in getattr(hp, "testsets", {}).values()]
        if not specs and getattr(hp, "test_path", None):
            specs = [_spec_from("test", hp.test_path, root_p)]
        if not specs:
            raise ConfigError(
                f"{getattr(hp, 'source', 'run config')}: no test sets configured (no testsets "
                "and no test_path); pass testsets=['datasets/<name>/test.txt']"
            )
        return specs
    if isinstance(testsets, (str, os.PathLike)):
        testsets = [testsets]
    if isinstance(testsets, Mapping):
        return [_spec_from(str(k), v, root_p) for k, v in testsets.items()]
    specs, seen = [], set()
    for v in testsets:
        name = Path(v).stem if isinstance(v, (str, os.PathLike)) else str(v)
        while name in seen:
            name += "_"
        seen.add(name)
        specs.append(_spec_from(name, v, root_p))
    return specs


def load_checkpoint(run_dir: str | os.PathLike, checkpoint: str | int = "best",
                    device: str = "auto") -> tuple[Any, Any, int, str]:
    """``chlib.model.checkpoint.load_model`` with one convenience: ``"best"`` falls back to
    ``"latest"`` (with a note) when the run has no ``best.json``.

    Returns ``(model in eval mode, hp, epoch, note)``; ``note`` is "" or says what was chosen.
    """
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        checkpoint = int(checkpoint)
    note = ""
    if checkpoint == "best":
        if read_best_epoch(find_checkpoint_dir(run_dir)) is None:
            checkpoint = "latest"
            note = "no best.json in the run: evaluated the latest checkpoint instead of 'best'"
    elif checkpoint not in ("latest",) and not isinstance(checkpoint, int):
        raise CheckpointError(
            f"checkpoint must be 'best', 'latest' or an epoch number, got {checkpoint!r}"
        )
    model, hp, epoch = load_model(run_dir, checkpoint, device)
    return model, hp, epoch, note


# --------------------------------------------------------------------------------------------
# confusions


def top1_confusions(dist: np.ndarray, q_labels: Sequence, r_labels: Sequence, *,
                    exclude: np.ndarray | None = None) -> list[dict]:
    """Work pairs confused at rank 1: how often a query's nearest reference is another work.

    For each query whose nearest non-excluded reference has a different label, the unordered
    pair (query work, that reference's work) is counted. Returns ``[{"work_a", "work_b",
    "count", "min_distance"}]``, most frequent first (ties: closer first, then by label).
    """
    d = np.asarray(dist, dtype=np.float64)
    ql, rl = list(q_labels), list(r_labels)
    if d.shape != (len(ql), len(rl)):
        raise ConfigError(f"top1_confusions: labels {len(ql)} x {len(rl)} for a {d.shape} matrix")
    if exclude is not None:
        d = np.where(exclude, np.inf, d)
    counts: Counter = Counter()
    closest: dict[tuple, float] = {}
    for i in range(d.shape[0]):
        if not np.isfinite(d[i]).any():
            continue
        j = int(np.argmin(d[i]))  # first minimum = stable order, as the metrics rank
        if rl[j] == ql[i]:
            continue
        a, b = sorted((ql[i], rl[j]), key=str)
        counts[(a, b)] += 1
        closest[(a, b)] = min(closest.get((a, b), np.inf), float(d[i, j]))
    rows = [{"work_a": a, "work_b": b, "count": n, "min_distance": closest[(a, b)]}
            for (a, b), n in counts.items()]
    rows.sort(key=lambda r: (-r["count"], r["min_distance"], str(r["work_a"]), str(r["work_b"])))
    return rows


# --------------------------------------------------------------------------------------------
# results


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


@dataclass
class TestSetResult:
    """Everything computed for one test set (arrays are rows = queries, columns = refs)."""

    name: str
    spec: TestSetSpec
    q_perfs: list[str]
    r_perfs: list[str]
    q_labels: np.ndarray  # [Q] work labels (work_id ints when the manifests have them)
    r_labels: np.ndarray  # [R]
    dist: np.ndarray  # [Q, R] float32 cosine distances under ``rule``
    exclude: np.ndarray  # [Q, R] bool, True = not ranked
    metrics: dict  # retrieval_metrics output
    ci: dict  # bootstrap_ci output: metric -> {point, mean, low, high, std}
    ranks: np.ndarray  # [Q] rank of the first correct reference, 0 = none
    per_work: list[dict]  # per_work_ap rows, worst first, with "name"
    confusions: list[dict]  # top1_confusions rows, with names
    closest_wrong: list[dict]  # most_confused_pairs rows (recording pairs), with perf ids
    points: np.ndarray  # [N, D] one unit vector per distinct recording (queries, then refs)
    point_labels: np.ndarray  # [N]
    point_perfs: list[str]
    work_names: dict = field(default_factory=dict)  # label -> work name
    test_only: set = field(default_factory=set)  # labels of works absent from training
    skipped: list[dict] = field(default_factory=list)  # recordings without usable features
    # name -> retrieval_metrics of a reference point on the same queries and exclusions
    # ("random embeddings", "untrained model"): what the trained model must beat
    baselines: dict = field(default_factory=dict)
    rule: str = "min"  # the distance rule the matrix was computed with

    def metric_rows(self) -> list[dict]:
        """One row per metric: value with its bootstrap CI (``low`` / ``high``), and the value of
        each baseline on the same queries in its own column."""
        rows = []
        for m in ("mAP", "MR1", "HR1", "HR10", "P@10"):
            c = self.ci.get(m, {})
            row = {"testset": self.name, "rule": self.rule, "metric": m, "value": self.metrics.get(m),
                   "low": c.get("low"), "high": c.get("high"),
                   "queries": self.metrics.get("n_queries"), "refs": len(self.r_perfs)}
            for b, scores in self.baselines.items():
                row[b] = scores.get(m)
            rows.append(row)
        return rows

    def name_of(self, label: Any) -> str:
        return str(self.work_names.get(_plain(label), label))

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the distance matrix (-1 in excluded cells), labels, mask and perf ids."""
        out = Path(out_dir)
        d = np.where(self.exclude, -1.0, self.dist).astype(np.float32)
        paths = {"dist": out / f"{self.name}.npy",
                 "ref_labels": out / f"{self.name}.reflabels.npy",
                 "query_labels": out / f"{self.name}.querylabels.npy",
                 "exclude": out / f"{self.name}.exclude.npy",
                 "perfs": out / f"{self.name}.perfs.json"}
        atomic_save_npy(paths["dist"], d)
        atomic_save_npy(paths["ref_labels"], np.asarray(self.r_labels))
        atomic_save_npy(paths["query_labels"], np.asarray(self.q_labels))
        atomic_save_npy(paths["exclude"], self.exclude)
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

    def title(self) -> str:
        """One line naming the checkpoint, the model and the distance rule (and any notes)."""
        return "; ".join([f"epoch {self.epoch} ({self.checkpoint}), model {self.fingerprint}, "
                          f"distance rule {self.rule!r}", *self.notes])

    def columns(self) -> list[str]:
        """Columns of :meth:`rows` for a table: metric, CI, every baseline, counts."""
        extra = list(dict.fromkeys(b for r in self.results.values() for b in r.baselines))
        return ["testset", "rule", "metric", "value", "low", "high", *extra, "queries", "refs"]

    def result(self, name: str | None = None) -> TestSetResult:
        """The named test set's result (default: the first one)."""
        if name is None or name == "":
            return next(iter(self.results.values()))
        if name not in self.results:
            raise ConfigError(f"no test set {name!r}; evaluated: {', '.join(self.results)}")
        return self.results[name]

    def rows(self) -> list[dict]:
        """Metric rows of every test set (see :meth:`TestSetResult.metric_rows`)."""
        return [row for r in self.results.values() for row in r.metric_rows()]

    def skipped(self) -> list[dict]:
        return [dict(s, testset=n) for n, r in self.results.items() for s in r.skipped]

    def save(self, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Write ``metrics.json`` and each test set's arrays (default ``run_dir/evaluation``)."""
        out = Path(out_dir) if out_dir is not None else self.run_dir / "evaluation"
        paths: dict[str, Path] = {}
        for name, r in self.results.items():
            for k, p in r.save(out).items():
                paths[f"{name}.{k}"] = p
        paths["metrics"] = out / "metrics.json"
        write_json(paths["metrics"], {
            "run_dir": str(self.run_dir), "checkpoint": self.checkpoint, "epoch": self.epoch,
            "fingerprint": self.fingerprint, "notes": self.notes, "distance_rule": self.rule,
            "testsets": {n: {"query_path": str(r.spec.query_path),
                             "ref_path": str(r.spec.ref_path), "distance_rule": r.rule,
                             "metrics": r.metrics, "ci": r.ci, "baselines": r.baselines,
                             "n_skipped": len(r.skipped)} for n, r in self.results.items()},
        })
        return paths


# --------------------------------------------------------------------------------------------
# the procedure


def _train_works(hp: Any, root: Path | None) -> set[str] | None:
    """Work names of the run's training manifest (None when there is none to read)."""
    path = getattr(hp, "train_path", None)
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and not p.exists() and root is not None:
        p = root / p
    if not p.exists():
        return None
    return {str(r.get("work", r.get("work_id"))) for r in read_manifest(p, required=())}


def random_embedding_baseline(q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray],
                              q_labels: np.ndarray, r_labels: np.ndarray, exclude: np.ndarray, *,
                              same: bool, rule: str = "min", n_draws: int = 20, seed: int = 12345,
                              no_relevant: str = "count_as_zero") -> dict:
    """Chance level: the metrics of random unit window embeddings, averaged over ``n_draws``.

    Each recording keeps its number of windows and the distance ``rule``, so the baseline sees
    exactly the queries, references and exclusions the model sees. ``same``: queries and
    references are one list (they then share their random vectors).
    """
    rng = np.random.default_rng(seed)
    dim = int(q_windows[0].shape[1])
    sums = dict.fromkeys(metrics.METRIC_NAMES, 0.0)
    for _ in range(n_draws):
        qw = [rng.standard_normal((len(w), dim)).astype(np.float32) for w in q_windows]
        rw = qw if same else [rng.standard_normal((len(w), dim)).astype(np.float32)
                              for w in r_windows]
        scores = metrics.retrieval_metrics(track_distances(qw, rw, rule=rule), q_labels,
                                           r_labels, exclude=exclude, no_relevant=no_relevant)
        for k in sums:
            sums[k] += float(scores[k])
    return {k: v / n_draws for k, v in sums.items()}


def _usable(name: str, spec: TestSetSpec, q_records: list[dict], r_records: list[dict],
            q_windows: list, r_windows: list) -> tuple[list, list, list, list, list[dict]]:
    """Drop recordings without window embeddings: (q recs, r recs, q wins, r wins, skipped)."""
    same = r_records is q_records
    roles = [("query and ref" if same else "query", q_records, q_windows)]
    if not same:
        roles.append(("ref", r_records, r_windows))
    skipped = [{"perf": r.get("perf"), "role": role, "reason": "no usable features"}
               for role, recs, wins in roles
               for r, w in zip(recs, wins, strict=True) if w is None]
    q_keep = [i for i, w in enumerate(q_windows) if w is not None]
    r_keep = [i for i, w in enumerate(r_windows) if w is not None]
    if not q_keep or not r_keep:
        raise ManifestError(
            f"test set {name!r}: no {'query' if not q_keep else 'reference'} recording has "
            f"usable features ({spec.query_path if not q_keep else spec.ref_path}); re-run "
            "feature extraction")
    if spec.query_in_ref_path is not None and skipped:
        raise ManifestError(
            f"test set {name!r}: recordings without features break the positions in "
            f"{spec.query_in_ref_path}; re-extract the missing features")
    return ([q_records[i] for i in q_keep], [r_records[i] for i in r_keep],
            [q_windows[i] for i in q_keep], [r_windows[i] for i in r_keep], skipped)


def _chart_data(s: ScoringInputs, no_relevant: str, top_pairs: int) -> dict:
    """Ranks, per-work AP, confused work pairs and closest wrong recordings of one test set."""
    d, ql, rl, ex, names = s.dist, s.q_labels, s.r_labels, s.exclude, s.work_names
    per_work = metrics.per_work_ap(d, ql, rl, exclude=ex, no_relevant=no_relevant)
    for row in per_work:
        row["name"] = str(names.get(row["work"], row["work"]))
    confusions = top1_confusions(d, ql, rl, exclude=ex)
    for row in confusions:
        row["name_a"] = str(names.get(row["work_a"], row["work_a"]))
        row["name_b"] = str(names.get(row["work_b"], row["work_b"]))
    one_list = s.q_perfs == s.r_perfs  # report each unordered pair once
    closest = metrics.most_confused_pairs(d, ql, top_pairs, exclude=ex,
                                          ref_labels=None if one_list else rl)
    for row in closest:
        row["query_perf"] = s.q_perfs[row["query"]]
        row["ref_perf"] = s.r_perfs[row["ref"]]
    return {"ranks": metrics.rank_of_first_correct(d, ql, rl, exclude=ex), "per_work": per_work,
            "confusions": confusions, "closest_wrong": closest}


def score_testset(name: str, spec: TestSetSpec, q_records: list[dict], r_records: list[dict],
                  q_windows: list, r_windows: list, *, rule: str = "min",
                  train_works: set[str] | None = None, n_boot: int = 1000, seed: int = 12345,
                  confidence: float = 0.95, no_relevant: str = "count_as_zero",
                  top_pairs: int = 20) -> TestSetResult:
    """Metrics, CIs, baselines and chart data of one test set from its window embeddings.

    ``q_windows`` / ``r_windows``: :func:`chlib.retrieval.embed.embed_recordings` outputs
    ([n_windows, D] per recording, None for a failed one: dropped and listed in ``skipped``).
    The matrix and exclusions come from :func:`chlib.retrieval.scoring.score_inputs` under
    ``rule``. ``train_works``: work names seen in training; the others are "test-only".
    """
    q_recs, r_recs, qw, rw, skipped = _usable(name, spec, q_records, r_records, q_windows,
                                              r_windows)
    s = score_inputs(q_recs, r_recs, qw, rw, rule=rule, query_in_ref_path=spec.query_in_ref_path,
                     where=f"test set {name!r} ({spec.query_path}, {spec.ref_path})")
    scores = metrics.retrieval_metrics(s.dist, s.q_labels, s.r_labels, exclude=s.exclude,
                                       no_relevant=no_relevant)
    baselines = {"random embeddings": random_embedding_baseline(
        qw, rw, s.q_labels, s.r_labels, s.exclude, same=s.q_perfs == s.r_perfs, rule=rule,
        seed=seed, no_relevant=no_relevant)}
    ci = metrics.bootstrap_ci(s.dist, s.q_labels, s.r_labels, s.exclude, n_boot=n_boot, seed=seed,
                              confidence=confidence, no_relevant=no_relevant)
    # one point per distinct recording: queries, then references not already among them
    seen = set(s.q_perfs)
    extra = [j for j, p in enumerate(s.r_perfs) if p not in seen]
    point_labels = np.concatenate([s.q_labels, s.r_labels[extra]]) if extra else s.q_labels.copy()
    test_only: set = set()
    if train_works is not None:
        test_only = {_plain(lab) for lab in point_labels
                     if str(s.work_names.get(_plain(lab), lab)) not in train_works}
    return TestSetResult(
        name=name, spec=spec, q_perfs=s.q_perfs, r_perfs=s.r_perfs, q_labels=s.q_labels,
        r_labels=s.r_labels, dist=s.dist, exclude=s.exclude, metrics=scores, ci=ci,
        **_chart_data(s, no_relevant, top_pairs),
        points=track_vectors(qw + [rw[j] for j in extra]), point_labels=point_labels,
        point_perfs=s.q_perfs + [s.r_perfs[j] for j in extra], work_names=s.work_names,
        test_only=test_only, skipped=skipped, baselines=baselines, rule=rule,
    )


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    checkpoint: str | int = "best",
    testsets: Any = None,
    device: str = "auto",
    rule: str | None = None,
    n_boot: int = 1000,
    seed: int = 12345,
    confidence: float = 0.95,
    no_relevant: str = "count_as_zero",
    cache: bool = True,
    progress: bool = True,
    root: str | os.PathLike | None = None,
    untrained_baseline: bool = True,
) -> Evaluation:
    """Evaluate one checkpoint of a run on its test sets (or on the given manifests).

    Parameters
    ----------
    run_dir : the run folder (``config/hparams.yaml`` + ``checkpoints/``).
    checkpoint : "best" (falls back to "latest" when the run has no best.json), "latest" or
        an epoch number.
    testsets : None (the run config's test sets) or manifests: see :func:`resolve_testsets`.
        Manifests must be full.txt-style (a ``feat`` per line, paths resolved beside the file).
    device : "auto", "cpu", "cuda", "mps".
    rule : the distance rule; None (default) = the run's ``distance_rule``, the rule its
        reference index and identification use. Another value is for comparisons only.
    n_boot, seed, confidence : bootstrap replicates, its seed (the fork's 12345), CI level.
    no_relevant : "count_as_zero" (the original) or "skip": queries whose work has no other
        recording among the references.
    cache : reuse embeddings from ``run_dir/embeddings`` (keyed by model fingerprint, window
        recipe, feature settings and feature file; **this function caches**).
    root : folder that relative manifest paths in the config refer to (default: the current
        directory, as the original's repo-root-relative paths expect).
    untrained_baseline : also score the same architecture with random (untrained) weights,
        seeded by ``seed``, on the same queries: the "untrained model" baseline column. Every
        result also carries a "random embeddings" baseline (chance level).

    Returns an :class:`Evaluation`; nothing is written (call ``.save()``; figures:
    :mod:`chlib.ui.report`).
    """
    run_dir = Path(run_dir)
    model, hp, epoch, note = load_checkpoint(run_dir, checkpoint, device)
    rule = check_rule(rule_of(hp) if rule is None else rule)
    dev = next(model.parameters()).device
    fingerprint = model_fingerprint(model.state_dict())
    root_p = Path(root) if root is not None else None
    train_works = _train_works(hp, root_p)
    memo: dict[tuple[Path, str], list] = {}

    def embed(path: Path, records: list[dict]) -> list:
        key = (path.resolve(), "|".join(str(r["perf"]) for r in records))
        if key not in memo:
            memo[key] = embed_recordings(
                model, records, hp, cache_dir=run_dir / "embeddings" if cache else None,
                fingerprint=fingerprint, manifest_path=path, device=dev, progress=progress,
                failures=[])
        return memo[key]

    results: dict[str, TestSetResult] = {}
    manifests: dict[str, tuple] = {}
    for spec in resolve_testsets(hp, testsets, root=root_p):
        q_records = read_manifest(spec.query_path, required=("perf", "feat"))
        r_records = (q_records if spec.ref_path == spec.query_path
                     else read_manifest(spec.ref_path, required=("perf", "feat")))
        manifests[spec.name] = (spec, q_records, r_records)
        qw = embed(spec.query_path, q_records)
        rw = qw if r_records is q_records else embed(spec.ref_path, r_records)
        results[spec.name] = score_testset(
            spec.name, spec, q_records, r_records, qw, rw, rule=rule, train_works=train_works,
            n_boot=n_boot, seed=seed, confidence=confidence, no_relevant=no_relevant)
    if untrained_baseline and results:
        _score_untrained(model, hp, results, manifests=manifests, device=dev, seed=seed,
                         no_relevant=no_relevant)
    notes = [note] if note else []
    if train_works is None:
        notes.append("the run config names no readable train_path: never-seen works are not "
                     "marked")
    return Evaluation(run_dir=run_dir, checkpoint=checkpoint, epoch=epoch,
                      fingerprint=fingerprint, results=results, notes=notes, rule=rule)


def _score_untrained(model: Any, hp: Any, results: dict[str, TestSetResult], *,
                     manifests: dict, device: Any, seed: int, no_relevant: str) -> None:
    """Add the "untrained model" baseline to each result: same architecture, random weights."""
    torch.manual_seed(seed)
    untrained = CoverHunterNet(model.cfg).to(device).eval()
    for name, (spec, q_records, r_records) in manifests.items():
        res = results[name]
        q_by = {str(r["perf"]): r for r in q_records}
        r_by = {str(r["perf"]): r for r in r_records}
        qw = embed_recordings(untrained, [q_by[p] for p in res.q_perfs], hp,
                              manifest_path=spec.query_path, device=device, progress=False)
        rw = qw if res.r_perfs == res.q_perfs else embed_recordings(
            untrained, [r_by[p] for p in res.r_perfs], hp, manifest_path=spec.ref_path,
            device=device, progress=False)
        scores = metrics.retrieval_metrics(track_distances(qw, rw, rule=res.rule), res.q_labels,
                                           res.r_labels, exclude=res.exclude,
                                           no_relevant=no_relevant)
        res.baselines["untrained model"] = {k: float(scores[k]) for k in metrics.METRIC_NAMES}
