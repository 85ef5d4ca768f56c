"""chlib.retrieval.probe (08_probe): grouped folds, metrics by hand, bootstrap intervals, the
bad label inputs, the results files, the untrained network and the model-free feature."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from chlib.core.config import ModelConfig
from chlib.core.errors import ConfigError
from chlib.model.checkpoint import model_fingerprint
from chlib.model.network import CoverHunterNet
from chlib.retrieval import probe


def _records(n_works: int = 20, per_work: int = 5, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """Recordings with a work-level ``rhythm`` (3 values) and a per-recording ``instrument``
    (3 values) and 8-D features whose first 3 dimensions carry the rhythm."""
    rng = np.random.default_rng(seed)
    recs, x = [], []
    for w in range(n_works):
        for v in range(per_work):
            recs.append({"perf": f"w{w:02d}_v{v}", "work": f"w{w:02d}", "wav": f"/a/{w}_{v}.flac",
                         "rhythm": ["reel", "jig", "hornpipe"][w % 3],
                         "instrument": ["fiddle", "flute", "piano"][(w + v) % 3]})
            x.append(rng.normal(size=8) + 3.0 * np.eye(8)[w % 3])
    return recs, np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# folds and metrics


def test_grouped_folds_keep_every_work_on_one_side_of_every_split():
    recs, _ = _records(n_works=23, per_work=4)
    lab = probe.prepare_label(recs, "instrument", n_folds=5)
    folds = probe.grouped_folds(lab.y, lab.groups, 5, seed=3)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(len(lab.y)))  # each row tested exactly once
    for train, test in folds:
        assert not set(lab.groups[train]) & set(lab.groups[test])
        assert len(test) and len(train)


def test_grouped_folds_refuse_fewer_works_than_folds():
    with pytest.raises(ConfigError, match="3 works for 5 folds"):
        probe.grouped_folds(np.array([0, 1, 0, 1]), np.array([0, 1, 2, 2]), 5)
    with pytest.raises(ConfigError, match="n_folds"):
        probe.grouped_folds(np.array([0, 1]), np.array([0, 1]), 1)


def test_accuracy_balanced_accuracy_and_majority_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    assert probe.accuracy(y, pred) == pytest.approx(4 / 6)
    assert probe.balanced_accuracy(y, pred) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert probe.balanced_accuracy(y, np.zeros(6, int)) == pytest.approx(0.5)  # constant: 1/C
    # fold A: train rows 2-5 (classes 0,0,1,1: tie -> 0) test rows 0,1; fold B: train rows
    # 0,1,4,5 (0,0,1,1 -> 0) test 2,3; fold C: train 0-3 (all 0) test 4,5
    folds = [(np.array([2, 3, 4, 5]), np.array([0, 1])), (np.array([0, 1, 4, 5]), np.array([2, 3])),
             (np.array([0, 1, 2, 3]), np.array([4, 5]))]
    maj = probe.majority_proba(y, folds, 2).argmax(1)
    assert maj.tolist() == [0, 0, 0, 0, 0, 0]
    assert probe.accuracy(y, maj) == pytest.approx(4 / 6)
    assert probe.balanced_accuracy(y, maj) == pytest.approx(0.5)
    y2 = np.array([1, 1, 0, 0, 1, 0])  # fold A's train (0,0,1,0) -> 0, fold B's (1,1,1) -> 1;
    # row 4 is in no test fold: no prediction (all-zero probabilities, argmax 0)
    folds2 = [(np.array([2, 3, 4, 5]), np.array([0, 1])), (np.array([0, 1, 4]), np.array([2, 3, 5]))]
    assert probe.majority_proba(y2, folds2, 2).argmax(1).tolist() == [0, 0, 1, 1, 0, 1]


def test_bootstrap_ci_contains_the_point_and_narrows_with_more_works():
    def case(n_works: int) -> dict:
        rng = np.random.default_rng(1)
        groups = np.repeat(np.arange(n_works), 4)
        y = rng.integers(0, 3, size=groups.size)
        pred = np.where(rng.random(groups.size) < 0.7, y, (y + 1) % 3)
        return probe.bootstrap_ci(y, pred, groups, n_boot=500, seed=0)

    small, large = case(20), case(2000)  # 100 x the works: ~10 x narrower
    for ci in (small, large):
        for m in ("accuracy", "balanced_accuracy"):
            assert ci[m]["low"] <= ci[m]["point"] <= ci[m]["high"]
    for m in ("accuracy", "balanced_accuracy"):
        width = {n: c[m]["high"] - c[m]["low"] for n, c in (("s", small), ("l", large))}
        assert width["l"] < width["s"] / 2
    none = probe.bootstrap_ci(np.array([0, 1]), np.array([0, 1]), np.array([0, 1]), n_boot=0)
    assert none["accuracy"]["point"] == 1.0 and np.isnan(none["accuracy"]["low"])


# --------------------------------------------------------------------------------------------
# bad label inputs


def test_unknown_column_lists_the_available_ones():
    recs, _ = _records()
    with pytest.raises(ConfigError) as e:
        probe.check_columns(recs, ["region"])
    assert "'region'" in str(e.value) and "rhythm (3 values)" in str(e.value)
    assert "instrument (3 values)" in str(e.value) and "wav" not in str(e.value)


def test_column_with_one_value_is_skipped_with_a_message():
    recs, x = _records()
    for r in recs:
        r["decade"] = "1880s"
    res = probe.run_probes({"trained": x}, recs, ["decade", "rhythm"], n_boot=20, n_folds=3)
    assert set(res.table["label"]) == {"rhythm"}
    assert any("'decade'" in n and "only one value ('1880s')" in n and "skipped" in n
               for n in res.notes)


def test_recordings_without_a_value_are_left_out_and_counted():
    recs, x = _records()
    for r in recs[:7]:
        r["rhythm"] = ""
    recs[7]["rhythm"] = None
    res = probe.run_probes({"trained": x}, recs, ["rhythm"], n_boot=20, n_folds=3)
    assert (res.table["n_recordings"] == len(recs) - 8).all()
    assert any("8 of 100 recordings have no value" in n for n in res.notes)
    assert set(res.predictions["perf"]) == {r["perf"] for r in recs[8:]}


def test_classes_with_fewer_works_than_folds_are_merged_or_dropped():
    recs, _ = _records(n_works=20)
    for r in recs:  # two works of 'slide', two of 'polka': 2 < 5 folds each, 4 together
        r["rhythm"] = {"w00": "slide", "w01": "slide", "w02": "polka", "w03": "polka"}.get(
            r["work"], r["rhythm"])
    lab = probe.prepare_label(recs, "rhythm", n_folds=5)
    assert "other" not in lab.classes and "slide" not in lab.classes  # 4 works < 5: dropped
    assert any("'polka' (2 works)" in n and "left out" in n for n in lab.notes)
    merged = probe.prepare_label(recs, "rhythm", n_folds=4)
    assert "other" in merged.classes and "slide" not in merged.classes
    assert any("merged into 'other'" in n for n in merged.notes)
    dropped = probe.prepare_label(recs, "rhythm", n_folds=4, rare="drop")
    assert "other" not in dropped.classes and len(dropped.y) == len(recs) - 20
    with pytest.raises(ConfigError, match="rare"):
        probe.prepare_label(recs, "rhythm", rare="keep")


def test_a_column_of_identifiers_is_skipped():
    recs, _ = _records()
    lab = probe.prepare_label(recs, "rhythm", max_classes=2)
    assert lab.n_folds == 0 and "3 distinct values" in lab.notes[-1]


def test_label_csv_reports_unknown_perf_ids_and_recordings_without_a_row(tmp_path):
    recs, _ = _records(n_works=3, per_work=2)
    path = tmp_path / "labels.csv"
    rows = [{"perf": r["perf"], "region": "Sligo" if i % 2 else "Clare", "work": "x"}
            for i, r in enumerate(recs[:-1])] + [{"perf": "nobody_v9", "region": "Clare"}]
    pd.DataFrame(rows).to_csv(path, index=False)
    merged, notes = probe.merge_labels(recs, probe.read_label_csv(path), str(path))
    assert merged[0]["region"] == "Clare" and "region" not in merged[-1]
    assert any("1 perf id(s) not among the 6 recordings (nobody_v9)" in n for n in notes)
    assert any("1 of 6 recordings have no row" in n for n in notes)
    assert merged[0]["work"] == recs[0]["work"] and any("work ignored" in n for n in notes)


def test_label_csv_without_perf_column_duplicates_or_missing_file_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("id,region\nx,Clare\n")
    with pytest.raises(ConfigError, match="no 'perf' column .*id, region"):
        probe.read_label_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("perf,region\nx,Clare\nx,Sligo\n")
    with pytest.raises(ConfigError, match="listed twice: x"):
        probe.read_label_csv(tmp_path / "b.csv")
    with pytest.raises(ConfigError, match="c.csv: label file not found"):
        probe.read_label_csv(tmp_path / "c.csv")


def test_labels_csv_for_writes_a_demo_datasets_labels_when_missing(tmp_path):
    lines = [{"perf": "w000_a_v00", "wav": "a.flac", "dur_s": 9.0, "work": "w000_a",
              "version": "tempo 100 bpm, key +2, flute, reel, AB, tuning +3 c"},
             {"perf": "w000_a_v01", "wav": "b.flac", "dur_s": 9.0, "work": "w000_a",
              "version": "tempo 90 bpm, key -1, octave -1, piano, reel, AB, chords on accordion"}]
    (tmp_path / "dataset.txt").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "demo_info.json").write_text(json.dumps({"works": [
        {"work": "w000_a", "rhythm": "reel", "meter": "2/4", "key": "G major"}]}))
    assert probe.labels_csv_for(tmp_path, write_demo=False) is None
    path = probe.labels_csv_for(tmp_path)
    got = pd.read_csv(path, dtype=str)
    assert got.to_dict("records") == [
        {"perf": "w000_a_v00", "rhythm": "reel", "meter": "2/4", "key": "A major",
         "mode": "major", "instrument": "flute"},
        {"perf": "w000_a_v01", "rhythm": "reel", "meter": "2/4", "key": "F# major",
         "mode": "major", "instrument": "piano"}]
    assert probe.labels_csv_for(tmp_path, "elsewhere.csv").name == "elsewhere.csv"


# --------------------------------------------------------------------------------------------
# probes, results, files


def test_probes_beat_the_majority_on_a_separable_label_and_save_their_files(tmp_path):
    recs, x = _records(n_works=24, per_work=5)
    noise = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    res = probe.run_probes({"trained": x, "cqt_stats": noise}, recs, ["rhythm", "instrument"],
                           n_boot=100, n_folds=4, k=5)
    t = res.table.set_index(["label", "feature", "probe"])
    assert len(t) == 2 * (1 + 2 * 2)
    assert {("rhythm", "none", "majority"), ("instrument", "none", "majority")} <= set(t.index)
    assert t.loc[("rhythm", "trained", "logreg"), "accuracy"] > 0.9
    assert t.loc[("rhythm", "trained", "knn"), "balanced_accuracy"] > 0.9
    assert t.loc[("rhythm", "none", "majority"), "balanced_accuracy"] == pytest.approx(1 / 3)
    assert t.loc[("rhythm", "cqt_stats", "logreg"), "accuracy"] < 0.6
    assert (t["accuracy_low"] <= t["accuracy"]).all() and (t["accuracy"] <= t["accuracy_high"]).all()
    conf = res.confusion("rhythm")
    assert list(conf.index) == ["hornpipe", "jig", "reel"] and conf.to_numpy().sum() == len(recs)
    worst = res.disagreements("rhythm", "cqt_stats", "logreg", k=5)
    assert len(worst) == 5 and (worst["given"] != worst["predicted"]).all()
    assert worst["confidence"].is_monotonic_decreasing
    with pytest.raises(ConfigError, match="no probe result"):
        res.rows("rhythm", "untrained", "logreg")
    paths = res.save(tmp_path / "probe")
    assert pd.read_csv(paths["results"]).shape == (len(t), len(probe.TABLE_COLUMNS))
    assert len(pd.read_csv(paths["predictions"])) == len(t) * len(recs)
    doc = json.loads(paths["json"].read_text())
    assert doc["classes"]["rhythm"] == ["hornpipe", "jig", "reel"] and len(doc["results"]) == len(t)


def test_run_probes_refuses_unknown_probes_and_misaligned_features():
    recs, x = _records()
    with pytest.raises(ConfigError, match="unknown probe"):
        probe.run_probes({"trained": x}, recs, ["rhythm"], probes=["svm"])
    with pytest.raises(ConfigError, match="rows for"):
        probe.run_probes({"trained": x[:-1]}, recs, ["rhythm"])
    empty = probe.run_probes({"trained": x}, recs, ["rhythm"], max_classes=2, n_boot=10)
    assert empty.table.empty and list(empty.table.columns) == list(probe.TABLE_COLUMNS)


def test_untrained_model_is_seeded_and_leaves_the_global_generator_alone():
    cfg = ModelConfig(input_dim=12, embed_dim=16, output_dims=16, num_blocks=1, attention_dim=16,
                      conv_kernel=3, num_classes=4)
    trained = CoverHunterNet(cfg)
    torch.manual_seed(42)
    before = torch.rand(1)
    torch.manual_seed(42)
    a = probe.untrained_model(trained, seed=7)
    assert torch.rand(1) == before  # the global generator did not move
    b = probe.untrained_model(trained, seed=7)
    c = probe.untrained_model(trained, seed=8)
    assert model_fingerprint(a.state_dict()) == model_fingerprint(b.state_dict())
    assert model_fingerprint(a.state_dict()) != model_fingerprint(c.state_dict())
    assert not a.training and a.cfg == trained.cfg


def test_model_free_stats_are_chroma_and_cqt_means_and_stds(tmp_path):
    feat = np.full((50, 24), -60.0, np.float32)
    feat[:, 7] = 0.0  # pitch class 7 of the lowest octave is the loudest, always
    np.save(tmp_path / "a.npy", feat)
    hp = SimpleNamespace(features=SimpleNamespace(bins_per_octave=12))
    (vec,), = [probe.model_free_stats([{"feat": str(tmp_path / "a.npy")}], hp)]
    assert vec.shape == (24 + 2 * 24,)
    assert vec[:12].argmax() == 7 and np.allclose(vec[12:24], 0.0)  # constant over frames
    assert vec[24 + 7] == 0.0 and vec[24] == -60.0 and np.allclose(vec[48:], 0.0)
    assert probe.model_free_stats([{"feat": str(tmp_path / "missing.npy")}], hp) == [None]


def test_the_small_trainable_head_is_a_probe_too():
    recs, x = _records(n_works=24)
    res = probe.run_probes({"trained": x}, recs, ["rhythm"], probes=["mlp"], n_boot=20, n_folds=4)
    t = res.table.set_index("probe")
    assert t.loc["mlp", "accuracy"] > t.loc["majority", "accuracy"] + 0.2


def test_probe_views_draw_the_confusion_map_and_tables():
    from chlib.ui import probe_view

    recs, x = _records(n_works=12, per_work=4)
    res = probe.run_probes({"trained": x}, recs, ["rhythm"], n_boot=20, n_folds=3)
    view = probe_view.results_view(res)
    assert list(view["probe"]) == ["majority", "logreg", "knn"]
    assert view["feature"].iloc[0] == "none (baseline)" and "[" in view["accuracy"].iloc[1]
    fig = probe_view.confusion_figure(res, "rhythm")
    assert "rhythm: logreg" in fig.axes[0].get_title()
    fig = probe_view.label_map_figure(x, [r["rhythm"] for r in recs], method="pca")
    assert len(fig.axes[0].get_legend().get_texts()) == 3
    with pytest.raises(ConfigError, match="3 labels for 48"):
        probe_view.label_map_figure(x, ["a", "b", "c"], method="pca")
    assert len(probe_view.disagreement_table(res, "rhythm", k=2)) <= 2


def test_verdicts_say_above_only_where_the_intervals_part():
    cols = ["label", "feature", "probe", "balanced_accuracy", "balanced_accuracy_low",
            "balanced_accuracy_high"]
    t = pd.DataFrame([["meter", "none", "majority", 0.50, 0.50, 0.50],
                      ["meter", "trained", "logreg", 0.80, 0.70, 0.90],
                      ["meter", "trained", "knn", 0.60, 0.50, 0.70],
                      ["meter", "cqt_stats", "logreg", 0.75, 0.65, 0.85],
                      ["meter", "untrained", "knn", 0.30, 0.20, 0.40]], columns=cols)
    (line,) = probe.verdicts(t)
    assert line.startswith("meter: the run's model (logreg, balanced accuracy 0.80 [0.70, 0.90])")
    assert "above the majority baseline (0.50)" in line
    assert "level with chroma + CQT statistics (no learning) (0.75)" in line
    assert "above untrained network (same architecture) (0.30)" in line
    t.loc[1, ["balanced_accuracy_low", "balanced_accuracy_high"]] = [0.05, 0.15]
    t.loc[1, "balanced_accuracy"] = 0.10
    t.loc[2, "balanced_accuracy"] = 0.0
    assert "below the majority baseline" in probe.verdicts(t)[0]
