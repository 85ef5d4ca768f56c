"""Evaluate a trained run: the procedures behind ``05_evaluate``, ``06_identify``, ``07_explore``.

Sections: retrieval evaluation on test sets (05); identification of a dataset's held-out
recordings against the run's reference index, with a summary of how often the true work came
first (06); the embedding explorer's data (07).

:func:`evaluate_run` loads one checkpoint of a run (``"best"``, ``"latest"`` or an epoch),
embeds every recording of each test set through the one embedding path (:mod:`chlib.retrieval.embed`,
cached under ``run_dir/embeddings``), builds the query x reference distance matrix and computes
mAP, MR1, HR@1, HR@10 (and P@10) with work-stratified bootstrap confidence intervals
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

and PNG figures by :meth:`TestSetResult.figure` (``run_dir/figures/<testset>_<kind>.png``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chlib.core.errors import CheckpointError, ConfigError, ManifestError

__all__ = [
    "FIGURE_KINDS",
    "TestSetSpec",
    "TestSetResult",
    "Evaluation",
    "resolve_testsets",
    "load_checkpoint",
    "top1_confusions",
    "score_testset",
    "evaluate_run",
    "read_split",
    "reference_records",
    "reference_index_for_run",
    "Queries",
    "identification_queries",
    "identification_summary",
    "summary_text",
    "query_features",
    "query_match_figure",
    "ExplorerData",
    "explorer_data",
]

#: Kinds accepted by :meth:`TestSetResult.figure`.
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
    from chlib.model.checkpoint import find_checkpoint_dir, load_model, read_best_epoch

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
    dist: np.ndarray  # [Q, R] float32 cosine distances (min over window pairs)
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

    def metric_rows(self) -> list[dict]:
        """One row per metric: value with its bootstrap CI (``low`` / ``high``), and the value of
        each baseline on the same queries in its own column."""
        rows = []
        for m in ("mAP", "MR1", "HR1", "HR10", "P@10"):
            c = self.ci.get(m, {})
            row = {"testset": self.name, "metric": m, "value": self.metrics.get(m),
                   "low": c.get("low"), "high": c.get("high"),
                   "queries": self.metrics.get("n_queries"), "refs": len(self.r_perfs)}
            for b, scores in self.baselines.items():
                row[b] = scores.get(m)
            rows.append(row)
        return rows

    def name_of(self, label: Any) -> str:
        return str(self.work_names.get(_plain(label), label))

    def projection_figure(self, method: str = "tsne", *, seed: int = 0):
        """t-SNE / UMAP / PCA map of the recordings coloured by work, unseen works ringed."""
        from chlib.ui.plots import plot_embedding_projection

        labels = [_plain(x) for x in self.point_labels]
        return plot_embedding_projection(
            self.points, labels, method=method, test_only=self.test_only,
            label_names=self.work_names, seed=seed,
            title=f"{self.name}: {method.upper()} of {len(labels)} recordings "
                  f"({len(set(labels))} works; ringed = never seen in training)")

    def figure(self, kind: str, *, save_dir: str | os.PathLike | None = None, top: int = 20,
               seed: int = 0):
        """One chart of this test set; saved as ``<save_dir>/<testset>_<kind>.png`` if given.

        ``kind``: "tsne", "umap", "pca" (maps), "ranks" (rank histogram), "confused" (work
        pairs confused at rank 1), "per_work" (per-work AP, worst first).
        """
        from chlib.ui import plots

        if kind in ("tsne", "umap", "pca"):
            fig = self.projection_figure(kind, seed=seed)
        elif kind == "ranks":
            fig = plots.plot_rank_histogram(self.ranks, max_rank=top)
        elif kind == "confused":
            fig = plots.plot_confused_pairs(
                [(r["work_a"], r["work_b"], r["count"]) for r in self.confusions], top=top,
                value_label="queries whose nearest recording is the other work",
                label_names=self.work_names)
        elif kind == "per_work":
            fig = plots.plot_per_work_ap([(r["work"], r["ap"]) for r in self.per_work], top=top,
                                         label_names=self.work_names)
        else:
            raise ConfigError(f"figure kind must be one of {FIGURE_KINDS}, got {kind!r}")
        if save_dir is not None:
            plots.save_figure(fig, Path(save_dir) / f"{self.name}_{kind}.png")
        return fig

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the distance matrix (-1 in excluded cells), labels, mask and perf ids."""
        from chlib.core.io import atomic_save_npy, write_json

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

    def table(self):
        """The metrics with 95 % CIs as a :class:`chlib.ui.widgets.Table` (text + HTML)."""
        from chlib.ui.widgets import Table

        title = f"epoch {self.epoch} ({self.checkpoint}), model {self.fingerprint}"
        extra = list(dict.fromkeys(b for r in self.results.values() for b in r.baselines))
        return Table(self.rows(), ["testset", "metric", "value", "low", "high", *extra,
                                   "queries", "refs"],
                     title="; ".join([title, *self.notes]))

    def skipped(self) -> list[dict]:
        return [dict(s, testset=n) for n, r in self.results.items() for s in r.skipped]

    def save(self, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Write ``metrics.json`` and each test set's arrays (default ``run_dir/evaluation``)."""
        from chlib.core.io import write_json

        out = Path(out_dir) if out_dir is not None else self.run_dir / "evaluation"
        paths: dict[str, Path] = {}
        for name, r in self.results.items():
            for k, p in r.save(out).items():
                paths[f"{name}.{k}"] = p
        paths["metrics"] = out / "metrics.json"
        write_json(paths["metrics"], {
            "run_dir": str(self.run_dir), "checkpoint": self.checkpoint, "epoch": self.epoch,
            "fingerprint": self.fingerprint, "notes": self.notes,
            "testsets": {n: {"query_path": str(r.spec.query_path),
                             "ref_path": str(r.spec.ref_path),
                             "metrics": r.metrics, "ci": r.ci, "baselines": r.baselines,
                             "n_skipped": len(r.skipped)} for n, r in self.results.items()},
        })
        return paths


# --------------------------------------------------------------------------------------------
# the procedure


def _labels(records: list[dict], where: Path) -> tuple[np.ndarray, dict]:
    """Work labels of records (work_id ints when every record has one, else work names)."""
    if all("work_id" in r for r in records):
        labels = np.array([int(r["work_id"]) for r in records], dtype=np.int64)
        names = {int(r["work_id"]): str(r.get("work", r["work_id"])) for r in records}
        return labels, names
    if not all("work" in r for r in records):
        raise ManifestError(f"{where}: every line needs a work (or work_id) to score retrieval")
    return np.array([str(r["work"]) for r in records], dtype=object), {}


def _train_works(hp: Any, root: Path | None) -> set[str] | None:
    """Work names of the run's training manifest (None when there is none to read)."""
    from chlib.core.manifest import read_manifest

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
                              same: bool, n_draws: int = 20, seed: int = 12345,
                              no_relevant: str = "count_as_zero") -> dict:
    """Chance level: the metrics of random unit window embeddings, averaged over ``n_draws``.

    Each recording keeps its number of windows and the distance rule (min over window pairs),
    so the baseline sees exactly the queries, references and exclusions the model sees.
    ``same``: queries and references are one list (they then share their random vectors).
    """
    from chlib.retrieval import metrics
    from chlib.retrieval.embed import track_distances

    rng = np.random.default_rng(seed)
    dim = int(q_windows[0].shape[1])
    keys = ("mAP", "MR1", "HR1", "HR10", "P@10")
    sums = dict.fromkeys(keys, 0.0)
    for _ in range(n_draws):
        qw = [rng.standard_normal((len(w), dim)).astype(np.float32) for w in q_windows]
        rw = qw if same else [rng.standard_normal((len(w), dim)).astype(np.float32)
                              for w in r_windows]
        scores = metrics.retrieval_metrics(track_distances(qw, rw), q_labels, r_labels,
                                           exclude=exclude, no_relevant=no_relevant)
        for k in keys:
            sums[k] += float(scores[k])
    return {k: v / n_draws for k, v in sums.items()}


def score_testset(name: str, spec: TestSetSpec, q_records: list[dict], r_records: list[dict],
                  q_windows: list, r_windows: list, *, train_works: set[str] | None = None,
                  n_boot: int = 1000, seed: int = 12345, confidence: float = 0.95,
                  no_relevant: str = "count_as_zero", top_pairs: int = 20) -> TestSetResult:
    """Metrics and chart data of one test set from its records and window embeddings.

    ``q_windows`` / ``r_windows`` are :func:`chlib.retrieval.embed.embed_tracks` outputs ([n_windows, D]
    per recording, None for a failed one; failed recordings are dropped and listed in
    ``skipped``). ``train_works``: work names seen in training; the others are "test-only".
    """
    from chlib.core.manifest import source_perf
    from chlib.retrieval import metrics
    from chlib.retrieval.embed import track_distances, track_embeddings

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
            "feature extraction"
        )
    q_recs = [q_records[i] for i in q_keep]
    r_recs = [r_records[i] for i in r_keep]
    qw = [q_windows[i] for i in q_keep]
    rw = [r_windows[i] for i in r_keep]
    q_labels, q_names = _labels(q_recs, spec.query_path)
    r_labels, r_names = _labels(r_recs, spec.ref_path)
    if q_labels.dtype != r_labels.dtype:
        raise ManifestError(
            f"test set {name!r}: {spec.query_path} and {spec.ref_path} must both carry work_id "
            "(full.txt lines) or both only work names"
        )
    names = {**r_names, **q_names}
    q_perfs = [str(r["perf"]) for r in q_recs]
    r_perfs = [str(r["perf"]) for r in r_recs]
    dist = track_distances(qw, rw)
    exclude = metrics.self_exclusion_mask(q_perfs, r_perfs,
                                          query_sources=[source_perf(r) for r in q_recs],
                                          ref_sources=[source_perf(r) for r in r_recs])
    if spec.query_in_ref_path is not None:
        if len(q_keep) != len(q_records) or len(r_keep) != len(r_records):
            raise ManifestError(
                f"test set {name!r}: recordings without features break the positions in "
                f"{spec.query_in_ref_path}; re-extract the missing features"
            )
        pairs = metrics.read_query_in_ref(spec.query_in_ref_path)
        exclude |= metrics.query_in_ref_mask(pairs, len(q_perfs), len(r_perfs))
    scores = metrics.retrieval_metrics(dist, q_labels, r_labels, exclude=exclude,
                                       no_relevant=no_relevant)
    baselines = {"random embeddings": random_embedding_baseline(
        qw, rw, q_labels, r_labels, exclude, same=q_perfs == r_perfs, seed=seed,
        no_relevant=no_relevant)}
    ci = metrics.bootstrap_ci(dist, q_labels, r_labels, exclude, n_boot=n_boot, seed=seed,
                              confidence=confidence, no_relevant=no_relevant)
    ranks = metrics.rank_of_first_correct(dist, q_labels, r_labels, exclude=exclude)
    per_work = metrics.per_work_ap(dist, q_labels, r_labels, exclude=exclude,
                                   no_relevant=no_relevant)
    for row in per_work:
        row["name"] = str(names.get(row["work"], row["work"]))
    confusions = top1_confusions(dist, q_labels, r_labels, exclude=exclude)
    for row in confusions:
        row["name_a"] = str(names.get(row["work_a"], row["work_a"]))
        row["name_b"] = str(names.get(row["work_b"], row["work_b"]))
    if q_perfs == r_perfs:  # one list: report each unordered pair once
        closest = metrics.most_confused_pairs(dist, q_labels, top_pairs, exclude=exclude)
    else:
        closest = metrics.most_confused_pairs(dist, q_labels, top_pairs, ref_labels=r_labels,
                                              exclude=exclude)
    for row in closest:
        row["query_perf"] = q_perfs[row["query"]]
        row["ref_perf"] = r_perfs[row["ref"]]
    # one point per distinct recording: queries, then references not already among them
    seen = set(q_perfs)
    extra = [j for j, p in enumerate(r_perfs) if p not in seen]
    points = track_embeddings(qw + [rw[j] for j in extra])
    point_labels = np.concatenate([q_labels, r_labels[extra]]) if extra else q_labels.copy()
    point_perfs = q_perfs + [r_perfs[j] for j in extra]
    test_only: set = set()
    if train_works is not None:
        test_only = {_plain(lab) for lab in point_labels
                     if str(names.get(_plain(lab), lab)) not in train_works}
    return TestSetResult(
        name=name, spec=spec, q_perfs=q_perfs, r_perfs=r_perfs, q_labels=q_labels,
        r_labels=r_labels, dist=dist, exclude=exclude, metrics=scores, ci=ci, ranks=ranks,
        per_work=per_work, confusions=confusions, closest_wrong=closest, points=points,
        point_labels=point_labels, point_perfs=point_perfs, work_names=names,
        test_only=test_only, skipped=skipped, baselines=baselines,
    )


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    checkpoint: str | int = "best",
    testsets: Any = None,
    device: str = "auto",
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

    Returns an :class:`Evaluation`; nothing is written (call ``.save()`` and ``.figure()``).
    """
    from chlib.core.manifest import read_manifest, resolve_path
    from chlib.model.checkpoint import model_fingerprint
    from chlib.retrieval.embed import cached_embed_tracks, embed_tracks_hp

    run_dir = Path(run_dir)
    model, hp, epoch, note = load_checkpoint(run_dir, checkpoint, device)
    dev = next(model.parameters()).device
    fingerprint = model_fingerprint(model.state_dict())
    root_p = Path(root) if root is not None else None
    specs = resolve_testsets(hp, testsets, root=root_p)
    train_works = _train_works(hp, root_p)
    memo: dict[tuple[Path, str], list] = {}

    def embed(path: Path, records: list[dict]) -> list:
        key = (path.resolve(), "|".join(str(r["perf"]) for r in records))
        if key not in memo:
            failures: list = []
            if cache:
                memo[key] = cached_embed_tracks(model, fingerprint, records, hp,
                                                run_dir / "embeddings", device=dev,
                                                manifest_path=path, progress=progress,
                                                failures=failures)
            else:
                feats = [resolve_path(r["feat"], path) for r in records]
                memo[key] = embed_tracks_hp(model, feats, hp, dev, progress=progress,
                                            failures=failures)
        return memo[key]

    results: dict[str, TestSetResult] = {}
    manifests: dict[str, tuple] = {}
    for spec in specs:
        q_records = read_manifest(spec.query_path, required=("perf", "feat"))
        r_records = (q_records if spec.ref_path == spec.query_path
                     else read_manifest(spec.ref_path, required=("perf", "feat")))
        manifests[spec.name] = (spec, q_records, r_records)
        qw = embed(spec.query_path, q_records)
        rw = qw if r_records is q_records else embed(spec.ref_path, r_records)
        results[spec.name] = score_testset(
            spec.name, spec, q_records, r_records, qw, rw, train_works=train_works,
            n_boot=n_boot, seed=seed, confidence=confidence, no_relevant=no_relevant)
    if untrained_baseline and results:
        _score_untrained(model, hp, results, manifests=manifests, device=dev, seed=seed,
                         no_relevant=no_relevant)
    notes = [note] if note else []
    if train_works is None:
        notes.append("the run config names no readable train_path: never-seen works are not "
                     "marked")
    return Evaluation(run_dir=run_dir, checkpoint=checkpoint, epoch=epoch,
                      fingerprint=fingerprint, results=results, notes=notes)


def _score_untrained(model: Any, hp: Any, results: dict[str, TestSetResult], *,
                     manifests: dict, device: Any, seed: int, no_relevant: str) -> None:
    """Add the "untrained model" baseline to each result: same architecture, random weights."""
    import torch

    from chlib.core.manifest import resolve_path
    from chlib.model import CoverHunterNet
    from chlib.retrieval import metrics
    from chlib.retrieval.embed import embed_tracks_hp, track_distances

    torch.manual_seed(seed)
    untrained = CoverHunterNet(model.cfg).to(device).eval()
    for name, (spec, q_records, r_records) in manifests.items():
        res = results[name]
        q_feat = {str(r["perf"]): resolve_path(r["feat"], spec.query_path) for r in q_records}
        r_feat = {str(r["perf"]): resolve_path(r["feat"], spec.ref_path) for r in r_records}
        qw = embed_tracks_hp(untrained, [q_feat[p] for p in res.q_perfs], hp, device,
                             progress=False)
        rw = qw if res.r_perfs == res.q_perfs else embed_tracks_hp(
            untrained, [r_feat[p] for p in res.r_perfs], hp, device, progress=False)
        scores = metrics.retrieval_metrics(track_distances(qw, rw), res.q_labels, res.r_labels,
                                           exclude=res.exclude, no_relevant=no_relevant)
        res.baselines["untrained model"] = {k: float(scores[k])
                                            for k in ("mAP", "MR1", "HR1", "HR10", "P@10")}


# --------------------------------------------------------------------------------------------
# identification of a dataset's held-out recordings (06_identify)


def _absolute(rec: dict, manifest_path: Path) -> dict:
    """A copy of ``rec`` whose ``wav`` / ``feat`` paths are absolute (resolved like chlib does)."""
    from chlib.core.manifest import resolve_path

    out = dict(rec)
    for k in ("wav", "feat"):
        if out.get(k):
            out[k] = str(resolve_path(out[k], manifest_path).resolve())
    return out


def read_split(dataset_dir: str | os.PathLike, split: str) -> list[dict]:
    """Records of ``dataset_dir/<split>.txt`` (train, val, test, full) with absolute paths;
    [] when the file is absent."""
    from chlib.core.manifest import read_manifest

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
    from chlib.core.manifest import read_manifest

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

    It matches when it was built by this model (fingerprint), with these feature settings and
    window recipe, from exactly these recordings (perf ids, tempo copies aside). Otherwise (or
    with ``rebuild``) every record is embedded (cached in ``run_dir/embeddings``), indexed and
    saved. Returns ``(index, status)`` with status "loaded ..." or "built ...".
    """
    from chlib.core.errors import IndexMismatchError
    from chlib.model.checkpoint import model_fingerprint
    from chlib.retrieval.index import ReferenceIndex, build_index, is_tempo_copy

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
                      progress=progress)
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
    from chlib.core.manifest import read_manifest
    from chlib.retrieval.identify import find_audio_files
    from chlib.retrieval.index import is_tempo_copy

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


def query_features(path: str | os.PathLike, hp: Any, device: str = "cpu") -> np.ndarray:
    """CQT [frames, bins] in dB of an audio file, exactly as identification computes it."""
    from chlib.core.device import pick_device
    from chlib.signal.audio import load_audio, peak_normalise
    from chlib.signal.cqt import compute_cqt_db

    y = peak_normalise(load_audio(path, sample_rate=hp.features.sample_rate))
    return compute_cqt_db(y, hp.features, device=pick_device(device))


def query_match_figure(query: str | os.PathLike, match: Mapping, hp: Any, *,
                       max_seconds: float = 30.0, device: str = "cpu") -> Any:
    """CQT of a query file beside the CQT of its best match (an index record with ``feat``)."""
    from chlib.core.manifest import resolve_path
    from chlib.data.features import load_feature
    from chlib.ui.plots import plot_cqts

    q = query_features(query, hp, device)
    arrays, titles = [q], [f"query: {Path(query).name}"]
    if match.get("feat"):
        arrays.append(np.asarray(load_feature(resolve_path(match["feat"]))))
        titles.append(f"best match: {match.get('perf')} ({match.get('work')})")
    return plot_cqts(arrays, titles, features=hp.features, max_seconds=max_seconds)


# --------------------------------------------------------------------------------------------
# the embedding explorer's data (07_explore)


@dataclass
class ExplorerData:
    """Recordings as points: unit embeddings [N, D] and one metadata record each.

    Records carry ``perf``, ``work``, ``role`` ("reference" / "query"), ``wav``, ``feat`` and
    any other manifest column (e.g. ``version``, ``dur_s``). Projections are computed once per
    (method, seed) and kept.
    """

    embeddings: np.ndarray
    records: list[dict]
    _projections: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def columns(self, max_values: int = 20) -> list[str]:
        """Metadata columns usable for colouring: ``work``, ``role`` and every other column with
        at most ``max_values`` distinct values and at most one per two recordings (a column
        unique per recording colours nothing)."""
        skip = {"wav", "feat", "perf", "feat_len", "source_perf", "work_id", "work", "role",
                "n_windows"}
        cols = list(dict.fromkeys(k for r in self.records for k in r if k not in skip))
        limit = min(max_values, max(2, len(self.records) // 2))
        few = [c for c in cols if len({str(r.get(c, "")) for r in self.records}) <= limit]
        return ["work", "role"] + few

    def labels(self, column: str) -> list:
        if column not in self.columns():
            raise ConfigError(f"no metadata column {column!r}; choose from {self.columns()}")
        return [r.get(column, "") for r in self.records]

    def index_of(self, perf: str) -> int:
        """Row of a perf id (exact), else the first row whose perf contains it."""
        perfs = [str(r["perf"]) for r in self.records]
        if perf in perfs:
            return perfs.index(perf)
        for i, p in enumerate(perfs):
            if perf and perf.lower() in p.lower():
                return i
        raise ConfigError(f"no recording {perf!r} among {len(perfs)} points")

    def matching_works(self, text: str) -> list[str]:
        """Works whose name contains ``text`` (case-insensitive); [] for empty text."""
        if not text:
            return []
        return sorted({str(r["work"]) for r in self.records if text.lower() in str(r["work"]).lower()})

    def neighbours(self, i: int, k: int = 10) -> list[dict]:
        """The ``k`` nearest other recordings of row ``i`` by cosine distance, closest first."""
        d = 1.0 - self.embeddings @ self.embeddings[i]
        d[i] = np.inf
        order = np.argsort(d, kind="stable")[: max(0, min(k, len(self) - 1))]
        me = self.records[i]
        return [{"rank": n + 1, "perf": self.records[j]["perf"], "work": self.records[j]["work"],
                 "role": self.records[j].get("role"), "distance": float(d[j]),
                 "same_work": self.records[j]["work"] == me["work"], "row": int(j)}
                for n, j in enumerate(order)]

    def project(self, method: str, seed: int = 0) -> np.ndarray:
        """2-D coordinates [N, 2] (cached per method and seed)."""
        from chlib.ui.plots import project_embeddings

        key = (method, seed)
        if key not in self._projections:
            self._projections[key] = project_embeddings(self.embeddings, method, seed=seed)
        return self._projections[key]

    def row_of(self, point: str = "") -> int:
        """Row of ``point`` (a perf id or part of one); "" gives the first query (else row 0)."""
        if point:
            return self.index_of(point)
        return next((i for i, r in enumerate(self.records) if r.get("role") == "query"), 0)

    def map_figure(self, projection: str = "umap", colour_by: str = "work", *,
                   highlight_work: str = "", row: int | None = None, n_neighbours: int = 10,
                   seed: int = 0):
        """The projection coloured by ``colour_by``; works matching ``highlight_work`` stand out
        (when colouring by work); ``row`` is starred and joined to its ``n_neighbours``."""
        from chlib.ui.plots import plot_embedding_projection

        highlight = self.matching_works(highlight_work) if colour_by == "work" else []
        nb = [n["row"] for n in self.neighbours(row, n_neighbours)] if row is not None else []
        return plot_embedding_projection(
            self.project(projection, seed), self.labels(colour_by), method=None,
            highlight=highlight or None, selected=row, neighbours=nb,
            title=f"{projection} of {len(self)} recordings, colour: {colour_by}")

    def cqt(self, i: int) -> np.ndarray:
        """The stored CQT [frames, bins] of row ``i``."""
        from chlib.data.features import load_feature

        return np.asarray(load_feature(self.records[i]["feat"]))


def explorer_data(index: Any, query_records: Sequence[dict], model: Any, hp: Any, *,
                  run_dir: str | os.PathLike, metadata: Sequence[dict] = (),
                  device: str = "auto", progress: bool = True) -> ExplorerData:
    """Reference recordings (from ``index``) plus query recordings (embedded here, cached in
    ``run_dir/embeddings``) as one :class:`ExplorerData`. ``metadata`` rows (e.g. full.txt)
    add their columns to the records with the same perf."""
    from chlib.retrieval.embed import cached_embed_tracks, track_embedding
    from chlib.retrieval.index import is_tempo_copy

    meta = {str(r["perf"]): r for r in metadata}
    refs = set(index.perfs)
    qrecs = [r for r in query_records if not is_tempo_copy(r) and str(r["perf"]) not in refs]
    dev = next(model.parameters()).device if device == "auto" else device
    failures: list = []
    wins = cached_embed_tracks(model, None, qrecs, hp, Path(run_dir) / "embeddings", device=dev,
                               progress=progress, failures=failures) if qrecs else []
    records, vecs = [], []
    for r, v in zip(index.records, index.embeddings, strict=True):
        records.append({**meta.get(r["perf"], {}), **{k: x for k, x in r.items() if x is not None},
                        "role": "reference"})
        vecs.append(v)
    for r, w in zip(qrecs, wins, strict=True):
        if w is None:
            continue
        records.append({**meta.get(str(r["perf"]), {}), **r, "role": "query"})
        vecs.append(track_embedding(w))
    if not records:
        raise ManifestError("explorer_data: no reference or query recording to show")
    return ExplorerData(np.stack(vecs).astype(np.float32), records)
