"""What else do a run's embeddings know (``08_probe``)? Probes of recording labels (tune type,
meter, region, instrument, decade...) on the run's track vectors, beside the same probes on a
model-free feature and on an untrained network of the same architecture.

A label column comes from the manifest or from a CSV keyed by ``perf``. Each probe (a logistic
regression, k nearest neighbours) is scored on out-of-fold predictions of a cross-validation
**grouped by work**: no work has recordings on both sides of a split, else a probe would only
recognise the tune. Accuracy and balanced accuracy (mean recall over classes) get bootstrap
confidence intervals that resample works; the majority class of each training fold is the
floor every probe must clear."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from chlib.core.errors import ConfigError, FeatureError, ManifestError
from chlib.core.io import atomic_write_text, write_json
from chlib.data.features import feature_path, load_feature
from chlib.data.splits import read_split
from chlib.demo.generate import write_demo_labels
from chlib.model.network import untrained_model
from chlib.retrieval.embed import embed_recordings
from chlib.retrieval.evaluate import load_checkpoint
from chlib.retrieval.index import is_tempo_copy
from chlib.retrieval.protocol import reading_rows, track_vector
from chlib.retrieval.scoring import readings_of
from chlib.signal.chroma import chroma_from_cqt

__all__ = ["FEATURES", "PROBES", "MAJORITY", "TABLE_COLUMNS", "PREDICTION_COLUMNS", "LabelSet", "ProbeInputs", "ProbeResult",
           "read_label_csv", "merge_labels", "label_columns", "check_columns", "labels_csv_for",
           "prepare_label", "grouped_folds", "out_of_fold_proba", "majority_proba", "accuracy",
           "balanced_accuracy", "bootstrap_ci", "untrained_model", "track_vectors_of",
           "model_free_stats", "load_probe_inputs", "probe_features", "run_probes", "verdicts"]

FEATURES = {"trained": "the run's model", "untrained": "untrained network (same architecture)",
            "cqt_stats": "chroma + CQT statistics (no learning)"}
"""Feature names of the results table and what each is."""
PROBES = ("logreg", "knn", "mlp")
"""Probes: a logistic regression, k nearest neighbours (cosine) and, optional, a small trainable
head on the frozen encoder's track vectors (one hidden layer of 64 units, early stopping)."""
MAJORITY = "majority"  # the baseline row's probe (its feature: "none")
TABLE_COLUMNS = ("label", "feature", "probe", "n_recordings", "n_works", "n_classes", "n_folds",
                 "accuracy", "accuracy_low", "accuracy_high", "balanced_accuracy",
                 "balanced_accuracy_low", "balanced_accuracy_high")
PREDICTION_COLUMNS = ("label", "feature", "probe", "perf", "work", "given", "predicted",
                      "confidence", "fold", "wav")
_NOT_LABELS = {"perf", "wav", "feat", "feat_len", "work", "work_id", "source_perf", "dur_s",
               "tempo", "start_s"}


# --------------------------------------------------------------------------------------------
# labels


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == ""


def read_label_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A label CSV as text columns (``""`` = missing), one row per ``perf``; ConfigError naming
    the file when it is missing, has no ``perf`` column or repeats a perf id."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: label file not found; give labels_csv='' to use the "
                          "manifest's own columns, or the path of a CSV with a 'perf' column")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [str(c).strip() for c in df.columns]
    if "perf" not in df.columns:
        raise ConfigError(f"{path}: no 'perf' column (columns: {', '.join(df.columns)}); the "
                          "CSV needs one, holding the recordings' perf ids as in full.txt")
    df["perf"] = df["perf"].str.strip()
    if (dup := df["perf"][df["perf"].duplicated()]).size:
        raise ConfigError(f"{path}: perf id(s) listed twice: {', '.join(dup.unique()[:5])}; "
                          "keep one row per recording")
    return df


def merge_labels(records: Sequence[dict], labels: pd.DataFrame, source: str = "labels.csv"
                 ) -> tuple[list[dict], list[str]]:
    """``records`` with the columns of ``labels`` (by ``perf``; the CSV wins over a manifest
    column of the same name) and notes on perf ids of the CSV not in the records and on
    records without a CSV row (their labels count as missing)."""
    kept = [c for c in labels.columns if c not in _NOT_LABELS]
    rows = {str(r["perf"]): {k: r[k] for k in kept} for r in labels.to_dict("records")}
    perfs = {str(r["perf"]) for r in records}
    notes = []
    if ignored := [c for c in labels.columns if c != "perf" and c not in kept]:
        notes.append(f"{source}: column(s) {', '.join(ignored)} ignored: the manifest's own "
                     "(work, paths, durations) are used; rename them to use them as labels")
    if unknown := sorted(set(rows) - perfs):
        notes.append(f"{source}: {len(unknown)} perf id(s) not among the {len(perfs)} recordings"
                     f" ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}): "
                     "ignored; check they are spelled as full.txt's perf ids")
    if absent := sorted(perfs - set(rows)):
        notes.append(f"{source}: {len(absent)} of {len(perfs)} recordings have no row "
                     f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}); their "
                     "labels count as missing")
    return [{**r, **rows.get(str(r["perf"]), {})} for r in records], notes


def label_columns(records: Sequence[dict]) -> dict[str, int]:
    """Columns that could be labels (all but paths, ids and numbers of the manifest), each with
    its number of distinct non-missing values."""
    cols = dict.fromkeys(k for r in records for k in r if k not in _NOT_LABELS)
    return {c: len({str(r[c]).strip() for r in records if not _missing(r.get(c))})
            for c in cols}


def check_columns(records: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """``columns`` as a list, or ConfigError naming an unknown one and listing the columns
    there are (with their numbers of distinct values)."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ConfigError("no label column given; name one or more in label_columns")
    have = label_columns(records)
    if bad := [c for c in columns if c not in have]:
        listed = ", ".join(f"{c} ({n} values)" for c, n in have.items()) or "none"
        raise ConfigError(f"unknown label column(s) {', '.join(map(repr, bad))}; the recordings "
                          f"have: {listed}. Add the column to the manifest or to a labels CSV "
                          "keyed by perf (labels_csv)")
    return columns


def labels_csv_for(dataset_dir: str | os.PathLike, labels_csv: str | os.PathLike = "",
                   *, write_demo: bool = True) -> Path | None:
    """The label CSV to use: ``labels_csv`` if given, else ``dataset_dir/labels.csv`` when it
    exists; a demo dataset without one (``demo_info.json``) gets it written first
    (``write_demo``); None when there is none (the manifest's columns are used)."""
    if labels_csv:
        return Path(labels_csv)
    folder = Path(dataset_dir)
    if not (folder / "labels.csv").is_file() and write_demo and (folder / "demo_info.json").is_file():
        write_demo_labels(folder)
    return folder / "labels.csv" if (folder / "labels.csv").is_file() else None


@dataclass
class LabelSet:
    """One label column made ready for probing: ``rows`` [M] indices into the records probed,
    ``y`` [M] class codes into ``classes``, ``groups`` [M] work codes; ``notes``: what was
    left out or merged, and why."""

    column: str
    rows: np.ndarray
    y: np.ndarray
    classes: list[str]
    groups: np.ndarray
    n_folds: int
    notes: list[str] = field(default_factory=list)


def _works_per_class(values: list[str], works: list[str]) -> dict[str, int]:
    pairs = pd.DataFrame({"v": values, "w": works}).drop_duplicates()
    return pairs["v"].value_counts().to_dict()


def _rare_classes(column: str, values: list[str], works: list[str], n_folds: int, rare: str
                  ) -> tuple[list[str | None], list[str]]:
    """Values with classes of fewer than ``n_folds`` works merged into "other" (dropped when
    "other" is still too small, or with ``rare="drop"``: None)."""
    counts = _works_per_class(values, works)
    small = sorted(c for c, n in counts.items() if n < n_folds)
    if not small:
        return list(values), []
    said = ", ".join(f"{c!r} ({counts[c]} work{'s' * (counts[c] != 1)})" for c in small)
    if rare == "other":
        merged = ["other" if v in small else v for v in values]
        if _works_per_class(merged, works).get("other", 0) >= n_folds:
            return merged, [f"column {column!r}: classes with fewer works than the {n_folds} "
                            f"folds merged into 'other': {said}"]
        values, small_now = merged, {"other"}
        why = f"; even merged into 'other' they span fewer than {n_folds} works"
    else:
        small_now, why = set(small), ""
    return ([None if v in small_now else v for v in values],
            [f"column {column!r}: recordings of classes with fewer works than the {n_folds} "
             f"folds left out: {said}{why}; a smaller n_folds keeps them"])


def prepare_label(records: Sequence[dict], column: str, *, n_folds: int = 5,
                  rare: str = "other", max_classes: int = 30) -> LabelSet:
    """The recordings of ``records`` with a value in ``column`` (others left out, counted),
    coded for probing; classes of fewer than ``n_folds`` works are merged into "other"
    (``rare="other"``) or left out ("drop"). A column left with one class, or with more than
    ``max_classes``, is skipped: ``n_folds`` 0 and no rows, the reason in ``notes``."""
    if rare not in ("other", "drop"):
        raise ConfigError(f"rare must be 'other' or 'drop', got {rare!r}")
    raw = [r.get(column) for r in records]
    keep = [i for i, v in enumerate(raw) if not _missing(v)]
    notes = [f"column {column!r}: {len(raw) - len(keep)} of {len(raw)} recordings have no value: "
             "left out"] if len(keep) < len(raw) else []
    values = [str(raw[i]).strip() for i in keep]
    works = [str(records[i]["work"]) for i in keep]
    if len(distinct := set(values)) > max_classes:
        return LabelSet(column, np.array([], int), np.array([], int), [], np.array([], int), 0,
                        notes + [f"column {column!r}: {len(distinct)} distinct values (more than "
                                 f"max_classes={max_classes}): skipped; bin it into a few "
                                 "categories (e.g. decades) in a labels CSV"])
    values, rare_notes = _rare_classes(column, values, works, n_folds, rare)
    notes += rare_notes
    kept = [j for j, v in enumerate(values) if v is not None]
    classes = sorted({values[j] for j in kept})
    if len(classes) < 2:
        what = f"only one value ({classes[0]!r})" if classes else "no value left"
        return LabelSet(column, np.array([], int), np.array([], int), classes,
                        np.array([], int), 0, notes + [f"column {column!r}: {what} among the "
                                                       "recordings probed: skipped (nothing to "
                                                       "tell apart)"])
    work_codes = {w: g for g, w in enumerate(sorted({works[j] for j in kept}))}
    return LabelSet(column, np.array([keep[j] for j in kept]),
                    np.array([classes.index(values[j]) for j in kept]), classes,
                    np.array([work_codes[works[j]] for j in kept]), n_folds, notes)


# --------------------------------------------------------------------------------------------
# grouped cross-validation and the probes


def grouped_folds(y: np.ndarray, groups: np.ndarray, n_folds: int = 5, *, seed: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` (train rows, test rows) pairs of a stratified cross-validation grouped by
    ``groups`` [N] (works): every group lies wholly on one side of each split, every row is in
    exactly one test fold."""
    y, groups = np.asarray(y), np.asarray(groups)
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ConfigError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if (n_groups := np.unique(groups).size) < n_folds:
        raise ConfigError(f"{n_groups} works for {n_folds} folds: each fold needs works of its "
                          "own; lower n_folds or add works")
    cv = StratifiedGroupKFold(n_splits=int(n_folds), shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y, groups)]


def _make_probe(probe: str, n_train: int, k: int, seed: int) -> Any:
    """A scikit-learn classifier over standardised features."""
    if probe == "logreg":
        clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    elif probe == "knn":
        clf = KNeighborsClassifier(n_neighbors=max(1, min(k, n_train)), metric="cosine")
    elif probe == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=500,
                            early_stopping=n_train >= 50, random_state=seed)
    else:
        raise ConfigError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")
    return make_pipeline(StandardScaler(), clf)


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, folds: Sequence[tuple], n_classes: int, *,
                      probe: str = "logreg", k: int = 5, seed: int = 0) -> np.ndarray:
    """Class probabilities [N, n_classes] of each row of ``x`` [N, D], from the probe fitted on
    the other folds (a class absent from a training fold gets probability 0 there)."""
    proba = np.zeros((len(y), n_classes))
    for train, test in folds:
        seen = np.unique(y[train])
        if seen.size == 1:  # nothing to fit: the one class seen
            proba[np.ix_(test, seen)] = 1.0
            continue
        model = _make_probe(probe, len(train), k, seed).fit(x[train], y[train])
        proba[np.ix_(test, model.classes_)] = model.predict_proba(x[test])
    return proba


def majority_proba(y: np.ndarray, folds: Sequence[tuple], n_classes: int) -> np.ndarray:
    """The baseline's one-hot probabilities [N, n_classes]: each test fold gets the most
    frequent class of its training fold (the lowest code on ties)."""
    proba = np.zeros((len(y), n_classes))
    for train, test in folds:
        proba[test, np.bincount(y[train], minlength=n_classes).argmax()] = 1.0
    return proba


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of rows predicted right."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of their recall (1 / n_classes for a
    constant prediction)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, *,
                 n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
                 ) -> dict[str, dict[str, float]]:
    """``{"accuracy" | "balanced_accuracy": {"point", "low", "high"}}``: percentile intervals of
    ``n_boot`` replicates that draw works (``groups`` [N]) with replacement, each with all its
    out-of-fold predictions (counts per work and class, one matrix product)."""
    if n_boot < 0 or not 0 < confidence < 1:
        raise ConfigError(f"need n_boot >= 0 and 0 < confidence < 1, got {n_boot}, {confidence}")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    point = {"accuracy": accuracy(y_true, y_pred),
             "balanced_accuracy": balanced_accuracy(y_true, y_pred)}
    if n_boot == 0:
        return {m: {"point": v, "low": math.nan, "high": math.nan} for m, v in point.items()}
    _, g = np.unique(groups, return_inverse=True)
    _, c = np.unique(y_true, return_inverse=True)
    n_g, n_c = g.max() + 1, c.max() + 1
    total = np.zeros((n_g, n_c))
    right = np.zeros((n_g, n_c))
    np.add.at(total, (g, c), 1.0)
    np.add.at(right, (g, c), (y_true == y_pred).astype(float))
    draws = np.random.default_rng(seed).integers(0, n_g, size=(n_boot, n_g))
    times = np.stack([np.bincount(d, minlength=n_g) for d in draws]).astype(float)
    tot, hit = times @ total, times @ right  # [n_boot, classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = {"accuracy": hit.sum(1) / tot.sum(1),
                "balanced_accuracy": np.nanmean(np.where(tot > 0, hit / tot, np.nan), axis=1)}
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
    return {m: {"point": point[m], "low": float(np.percentile(reps[m], lo)),
                "high": float(np.percentile(reps[m], hi))} for m in point}


# --------------------------------------------------------------------------------------------
# features


def track_vectors_of(model: torch.nn.Module, records: Sequence[dict], hp: Any, *,
                     cache_dir: str | os.PathLike | None, progress: bool = True
                     ) -> list[np.ndarray | None]:
    """The run's track vector [D] (unit mean of unit windows, as 05 and 07 use) of each record
    through ``model`` (embeddings cached in ``cache_dir``); None for an unusable feature file."""
    wins = embed_recordings(model, records, hp, cache_dir=cache_dir, progress=progress,
                            failures=[])
    n = readings_of(hp)
    return [None if w is None else track_vector(reading_rows(w, n)) for w in wins]


def model_free_stats(records: Sequence[dict], hp: Any) -> list[np.ndarray | None]:
    """Per record a float32 vector [24 + 2 * bins]: mean and std over frames of its chroma
    (12 pitch classes, frame max 1) and of its CQT (dB re the track max); None when the feature
    file is unusable. No learning: what any probe can read from the spectrum alone."""
    out: list[np.ndarray | None] = []
    for r in records:
        try:
            feat = np.asarray(load_feature(feature_path(r)), dtype=np.float32)
            chroma = chroma_from_cqt(feat, bins_per_octave=hp.features.bins_per_octave)
        except FeatureError:
            out.append(None)
            continue
        out.append(np.concatenate([chroma.mean(0), chroma.std(0), feat.mean(0), feat.std(0)])
                   .astype(np.float32))
    return out


@dataclass
class ProbeInputs:
    """A run's model and the recordings to probe (labels merged in); ``notes``: what was
    reported on the way (unknown perf ids, recordings without labels...)."""

    model: Any
    hp: Any
    epoch: int
    run_dir: Path
    records: list[dict]
    columns: list[str]
    notes: list[str] = field(default_factory=list)


def load_probe_inputs(run_dir: str | os.PathLike, dataset_dir: str | os.PathLike, *,
                      label_columns: Sequence[str], manifest: str | os.PathLike = "",
                      labels_csv: str | os.PathLike = "", checkpoint: str | int = "best",
                      device: str = "auto") -> ProbeInputs:
    """The run's model (``checkpoint``) and the recordings of ``manifest`` (default: the
    dataset's full.txt; tempo copies left out) with the label CSV's columns
    (:func:`labels_csv_for`); ConfigError for an unknown label column, before any embedding."""
    records = read_split(manifest) if manifest else read_split(dataset_dir, "full")
    if not records:
        raise ManifestError(f"{dataset_dir}: no full.txt; run 02_extract, or give manifest")
    records = [r for r in records if not is_tempo_copy(r)]
    notes = []
    if (csv_path := labels_csv_for(dataset_dir, labels_csv)) is not None:
        records, notes = merge_labels(records, read_label_csv(csv_path), str(csv_path))
    columns = check_columns(records, label_columns)
    model, hp, epoch, note = load_checkpoint(run_dir, checkpoint, device)
    return ProbeInputs(model, hp, epoch, Path(run_dir), records, columns,
                       notes + ([note] if note else []))


def probe_features(inputs: ProbeInputs, names: Sequence[str] = tuple(FEATURES), *,
                   seed: int = 0, progress: bool = True) -> tuple[dict[str, np.ndarray], list[dict]]:
    """``({name: [N, D] float32}, the N records)`` for the features ``names`` of
    :data:`FEATURES`; a recording any feature cannot be computed for is left out (noted)."""
    if bad := [n for n in names if n not in FEATURES]:
        raise ConfigError(f"unknown feature(s) {bad}; choose from {', '.join(FEATURES)}")
    cache = inputs.run_dir / "embeddings"
    made: dict[str, list] = {}
    for name in names:
        if name == "cqt_stats":
            made[name] = model_free_stats(inputs.records, inputs.hp)
        else:
            net = inputs.model if name == "trained" else untrained_model(inputs.model, seed=seed)
            made[name] = track_vectors_of(net, inputs.records, inputs.hp, cache_dir=cache,
                                          progress=progress)
    ok = [i for i in range(len(inputs.records)) if all(v[i] is not None for v in made.values())]
    if len(ok) < len(inputs.records):
        inputs.notes.append(f"{len(inputs.records) - len(ok)} recordings left out: their feature "
                            "files could not be read (re-run 02_extract)")
    return ({n: np.stack([v[i] for i in ok]).astype(np.float32) for n, v in made.items()},
            [inputs.records[i] for i in ok])


# --------------------------------------------------------------------------------------------
# the results


@dataclass
class ProbeResult:
    """The results ``table`` (one row per label, feature, probe), the out-of-fold
    ``predictions`` (one row per recording and table row) and the ``notes`` of the run."""

    table: pd.DataFrame
    predictions: pd.DataFrame
    classes: dict[str, list[str]]
    notes: list[str]
    settings: dict

    def rows(self, label: str, feature: str, probe: str) -> pd.DataFrame:
        """The out-of-fold predictions of one table row (ConfigError if it is not there)."""
        sel = self.predictions[(self.predictions["label"] == label)
                               & (self.predictions["feature"] == feature)
                               & (self.predictions["probe"] == probe)]
        if sel.empty:
            have = sorted(set(zip(self.table["label"], self.table["feature"],
                                  self.table["probe"], strict=True)))
            raise ConfigError(f"no probe result for ({label!r}, {feature!r}, {probe!r}); there "
                              f"are: {have}")
        return sel

    def confusion(self, label: str, feature: str = "trained", probe: str = "logreg"
                  ) -> pd.DataFrame:
        """Recordings per (given label: rows, predicted label: columns), every class shown."""
        sel, classes = self.rows(label, feature, probe), self.classes[label]
        return (pd.crosstab(pd.Categorical(sel["given"], classes),
                            pd.Categorical(sel["predicted"], classes), dropna=False)
                .rename_axis(index="given", columns="predicted"))

    def disagreements(self, label: str, feature: str = "trained", probe: str = "logreg",
                      k: int = 10) -> pd.DataFrame:
        """The ``k`` recordings whose given label the probe most confidently contradicts:
        perf, work, given, predicted, confidence (out-of-fold probability of the prediction),
        wav; most confident first."""
        sel = self.rows(label, feature, probe)
        wrong = sel[sel["given"] != sel["predicted"]]
        return (wrong.sort_values(["confidence", "perf"], ascending=[False, True]).head(k)
                [["perf", "work", "given", "predicted", "confidence", "wav"]]
                .reset_index(drop=True))

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``results.csv``, ``predictions.csv`` and ``results.json`` (table, classes, notes,
        settings) in ``out_dir``, written atomically."""
        out = Path(out_dir)
        paths = {"results": out / "results.csv", "predictions": out / "predictions.csv",
                 "json": out / "results.json"}
        atomic_write_text(paths["results"], self.table.to_csv(index=False))
        atomic_write_text(paths["predictions"], self.predictions.to_csv(index=False))
        write_json(paths["json"], {"results": self.table.to_dict("records"),
                                   "classes": self.classes, "notes": self.notes,
                                   "settings": self.settings})
        return paths


def _row(labels: LabelSet, feature: str, probe: str, proba: np.ndarray, n_boot: int,
         seed: int) -> dict:
    """One results-table row from out-of-fold probabilities [M, C]."""
    ci = bootstrap_ci(labels.y, proba.argmax(1), labels.groups, n_boot=n_boot, seed=seed)
    return {"label": labels.column, "feature": feature, "probe": probe,
            "n_recordings": len(labels.y), "n_works": int(np.unique(labels.groups).size),
            "n_classes": len(labels.classes), "n_folds": labels.n_folds,
            **{f"{m}{s}": ci[m][k] for m in ci for k, s in (("point", ""), ("low", "_low"),
                                                           ("high", "_high"))}}


def _predictions(labels: LabelSet, records: Sequence[dict], feature: str, probe: str,
                 proba: np.ndarray, fold_of: np.ndarray) -> pd.DataFrame:
    recs = [records[i] for i in labels.rows]
    pred = proba.argmax(1)
    return pd.DataFrame({"label": labels.column, "feature": feature, "probe": probe,
                         "perf": [r["perf"] for r in recs], "work": [r["work"] for r in recs],
                         "given": [labels.classes[c] for c in labels.y],
                         "predicted": [labels.classes[c] for c in pred],
                         "confidence": proba[np.arange(len(pred)), pred],
                         "fold": fold_of, "wav": [r.get("wav", "") for r in recs]})


def run_probes(features: Mapping[str, np.ndarray], records: Sequence[dict],
               columns: Sequence[str], *, probes: Sequence[str] = ("logreg", "knn"),
               n_folds: int = 5,
               n_boot: int = 1000, k: int = 5, rare: str = "other", max_classes: int = 30,
               seed: int = 0) -> ProbeResult:
    """Every probe on every feature ([N, D] rows aligned with ``records``) for every label
    column, plus the majority baseline per column, on the same grouped folds per column."""
    if bad := [p for p in probes if p not in PROBES]:
        raise ConfigError(f"unknown probe(s) {bad}; choose from {', '.join(PROBES)}")
    for name, x in features.items():
        if len(x) != len(records):
            raise ConfigError(f"feature {name!r}: {len(x)} rows for {len(records)} recordings")
    rows, preds, classes, notes = [], [], {}, []
    for column in check_columns(records, columns):
        labels = prepare_label(records, column, n_folds=n_folds, rare=rare,
                               max_classes=max_classes)
        notes += labels.notes
        if not labels.n_folds:
            continue
        folds = grouped_folds(labels.y, labels.groups, n_folds, seed=seed)
        fold_of = np.zeros(len(labels.y), int)
        for f, (_, test) in enumerate(folds):
            fold_of[test] = f
        classes[column] = labels.classes
        runs = [("none", MAJORITY, majority_proba(labels.y, folds, len(labels.classes)))]
        runs += [(name, p, out_of_fold_proba(x[labels.rows], labels.y, folds,
                                             len(labels.classes), probe=p, k=k, seed=seed))
                 for name, x in features.items() for p in probes]
        for feature, probe, proba in runs:
            rows.append(_row(labels, feature, probe, proba, n_boot, seed))
            preds.append(_predictions(labels, records, feature, probe, proba, fold_of))
    settings = {"probes": list(probes), "n_folds": n_folds, "n_boot": n_boot, "k": k,
                "rare": rare, "seed": seed, "features": list(features)}
    return ProbeResult(pd.DataFrame(rows, columns=list(TABLE_COLUMNS)),
                       pd.concat(preds, ignore_index=True) if preds
                       else pd.DataFrame(columns=list(PREDICTION_COLUMNS)), classes, notes, settings)


def verdicts(table: pd.DataFrame, feature: str = "trained") -> list[str]:
    """One sentence per label of a results ``table``: the best probe (balanced accuracy) on
    ``feature`` against the best of every other feature and the majority baseline, "above" or
    "below" only where the 95 % intervals do not overlap, else "level with"."""
    out = []
    for label, t in table.groupby("label", sort=False):
        mine = t[t["feature"] == feature]
        if mine.empty:
            continue
        best = mine.loc[mine["balanced_accuracy"].idxmax()]
        parts = []
        for other, o in t[t["feature"] != feature].groupby("feature", sort=False):
            rival = o.loc[o["balanced_accuracy"].idxmax()]
            word = ("above" if best["balanced_accuracy_low"] > rival["balanced_accuracy_high"]
                    else "below" if best["balanced_accuracy_high"] < rival["balanced_accuracy_low"]
                    else "level with")
            name = "the majority baseline" if other == "none" else FEATURES.get(other, other)
            parts.append(f"{word} {name} ({rival['balanced_accuracy']:.2f})")
        out.append(f"{label}: {FEATURES.get(feature, feature)} ({best['probe']}, balanced "
                   f"accuracy {best['balanced_accuracy']:.2f} [{best['balanced_accuracy_low']:.2f}"
                   f", {best['balanced_accuracy_high']:.2f}]) is " + "; ".join(parts))
    return out
