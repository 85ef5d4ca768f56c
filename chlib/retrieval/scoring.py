"""The one scorer of a retrieval test set (training, ``05_evaluate``, k-fold, tuning):
distances under the run's rule (:mod:`chlib.retrieval.protocol`), labels and exclusions: a
recording is never ranked against itself or a tempo copy of its source (``source_perf``), nor
against the (query index, ref index) pairs of an original-style ``query_in_ref`` file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chlib.core.errors import FeatureError, ManifestError
from chlib.core.manifest import source_perf
from chlib.data.features import feature_path, load_feature
from chlib.retrieval import metrics
from chlib.retrieval.protocol import expand_by_neighbours, track_distances
from chlib.signal.chroma import ftm2d

__all__ = ["ScoringInputs", "record_labels", "score_inputs", "score_windows", "rule_of",
           "readings_of", "expansion_of", "comparison", "expanded", "MODEL_FREE", "model_free_windows"]

MODEL_FREE = "2D-FTM (no learning)"  # the name of the model-free baseline in every report


def model_free_windows(records: Sequence[dict], hp: Any, *,
                       manifest_path: str | os.PathLike | None = None) -> list[np.ndarray | None]:
    """The 2D-FTM vector of each record's features as a one-window set [1, 900] (None for an
    unusable feature file), scored like a model's windows: the baseline no model may lose to."""
    out: list[np.ndarray | None] = []
    for r in records:
        try:
            feat = np.asarray(load_feature(feature_path(r, manifest_path)))
        except FeatureError:
            out.append(None)
            continue
        out.append(ftm2d(feat, fps=hp.features.frames_per_second,
                         bins_per_octave=hp.features.bins_per_octave)[None, :])
    return out


def rule_of(hp: Any) -> str:
    """The distance rule of a run config (``hp.distance_rule``; "min" for older configs)."""
    return str(getattr(hp, "distance_rule", "min"))


def readings_of(hp: Any) -> int:
    """Key readings per window of a run config (``len(hp.key_variants)``; 1 for older ones)."""
    return len(getattr(hp, "key_variants", [0]))


def comparison(hp: Any) -> dict:
    """A run's comparison settings as keyword arguments: ``rule``, ``readings``, ``expansion``."""
    return {"rule": rule_of(hp), "readings": readings_of(hp), "expansion": expansion_of(hp)}


def expansion_of(hp: Any) -> bool:
    """Whether a run compares recordings with their nearest neighbours (``neighbour_expansion``;
    False for older configs)."""
    return bool(getattr(hp, "neighbour_expansion", False))


@dataclass
class ScoringInputs:
    """What the metrics are computed from (rows = queries, columns = references)."""

    dist: np.ndarray  # [Q, R] float32 distances under ``rule``
    exclude: np.ndarray  # [Q, R] bool, True = not ranked
    q_labels: np.ndarray  # [Q] work labels
    r_labels: np.ndarray  # [R]
    work_names: dict  # label -> work name (work_id labels only)
    q_perfs: list[str]
    r_perfs: list[str]
    rule: str

    def name_of(self, label: Any) -> str:
        """The work name of a label (the label itself for name labels)."""
        return str(self.work_names.get(label, label))


def record_labels(records: Sequence[dict], where: Any = "records") -> tuple[np.ndarray, dict]:
    """Work labels [N] (work_id ints if every record has one, else names), label -> name map."""
    if all("work_id" in r for r in records):
        labels = np.array([int(r["work_id"]) for r in records], dtype=np.int64)
        return labels, {int(r["work_id"]): str(r.get("work", r["work_id"])) for r in records}
    if not all("work" in r for r in records):
        raise ManifestError(f"{where}: every line needs a work (or work_id) to score retrieval")
    return np.array([str(r["work"]) for r in records], dtype=object), {}


def expanded(dist: np.ndarray, r_windows: Sequence[np.ndarray], same: bool, exclude: np.ndarray,
             *, rule: str, readings: int = 1, ref_sources: Sequence[str | None] | None = None,
             r_perfs: Sequence[str] | None = None) -> np.ndarray:
    """``dist`` [Q, R] neighbour-expanded (:func:`~chlib.retrieval.protocol.expand_by_neighbours`)
    among the references ``r_windows`` (``same``: the queries are the references, ``dist`` is
    their own [R, R]); ``exclude`` [Q, R]: the pairs never ranked."""
    d_rr = dist if same else track_distances(r_windows, r_windows, rule=rule, readings=readings)
    r_ex = None
    if r_perfs is not None:
        r_ex = metrics.self_exclusion_mask(list(r_perfs), list(r_perfs),
                                           query_sources=ref_sources, ref_sources=ref_sources)
    return expand_by_neighbours(dist, d_rr, exclude, r_ex)


def score_inputs(q_records: Sequence[dict], r_records: Sequence[dict],
                 q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray], *, rule: str,
                 readings: int = 1, expansion: bool = False,
                 query_in_ref_path: str | os.PathLike | None = None,
                 where: str = "test set") -> ScoringInputs:
    """Distances [Q, R] under ``rule`` (windows [n_windows x readings, D] per record; with
    ``expansion``, neighbour-expanded among the references), labels, exclusions."""
    q_labels, q_names = record_labels(q_records, f"{where} queries")
    r_labels, r_names = record_labels(r_records, f"{where} references")
    if q_labels.dtype != r_labels.dtype:
        raise ManifestError(f"{where}: queries and references must both carry work_id "
                            "(full.txt lines) or both only work names")
    q_perfs = [str(r["perf"]) for r in q_records]
    r_perfs = [str(r["perf"]) for r in r_records]
    exclude = metrics.self_exclusion_mask(q_perfs, r_perfs,
                                          query_sources=[source_perf(r) for r in q_records],
                                          ref_sources=[source_perf(r) for r in r_records])
    if query_in_ref_path:
        pairs = metrics.read_query_in_ref(query_in_ref_path)
        exclude |= metrics.query_in_ref_mask(pairs, len(q_perfs), len(r_perfs))
    dist = track_distances(q_windows, r_windows, rule=rule, readings=readings)
    if expansion:
        dist = expanded(dist, r_windows, q_perfs == r_perfs, exclude, rule=rule,
                        readings=readings, ref_sources=[source_perf(r) for r in r_records],
                        r_perfs=r_perfs)
    return ScoringInputs(dist, exclude, q_labels,
                         r_labels, {**r_names, **q_names}, q_perfs, r_perfs, rule)


def score_windows(q_records: Sequence[dict], r_records: Sequence[dict],
                  q_windows: Sequence[np.ndarray], r_windows: Sequence[np.ndarray], *, rule: str,
                  readings: int = 1, expansion: bool = False,
                  query_in_ref_path: str | os.PathLike | None = None,
                  no_relevant: str = "count_as_zero") -> dict:
    """``retrieval_metrics`` (mAP, MR1, HR1, HR10, P@10, counts) of :func:`score_inputs`."""
    s = score_inputs(q_records, r_records, q_windows, r_windows, rule=rule, readings=readings,
                     expansion=expansion, query_in_ref_path=query_in_ref_path)
    return metrics.retrieval_metrics(s.dist, s.q_labels, s.r_labels, exclude=s.exclude,
                                     no_relevant=no_relevant)
