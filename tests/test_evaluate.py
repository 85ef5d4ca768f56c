"""chlib.retrieval.evaluate on a tiny real run: a CoverHunterNet checkpoint and synthetic features.

Recordings of one work share a base CQT pattern (plus small noise) and different works have
unrelated patterns, so even an untrained model maps a work's recordings close together: the
pipeline must then find every cover at rank 1 (mAP 1). Scrambling labels must break that.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config

from chlib.core.config import HParams, save_hparams
from chlib.core.errors import CheckpointError, ConfigError, ManifestError
from chlib.core.manifest import write_manifest
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import save_checkpoint
from chlib.retrieval import evaluate, explore, identify
from chlib.retrieval.scoring import MODEL_FREE
from chlib.ui import report

N_BINS = 24
WORKS = ["reel", "jig", "hornpipe", "polka"]


def _tiny_hp(**extra) -> HParams:
    return HParams.from_dict(tiny_config(fmin=32.0, chunk_frame=[15], mean_size=3, batch_size=4,
                                         foc={"output_dims": len(WORKS)}, **extra))


def _write_dataset(root, rng, *, works=WORKS, perfs=3, name="test"):
    feat_dir = root / "cqt_feat"
    feat_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for wid, work in enumerate(works):
        base = rng.uniform(-80, 0, size=(60, N_BINS)).astype(np.float32)
        for v in range(perfs):
            perf = f"{work}_v{v}"
            feat = base + rng.normal(0, 0.5, size=base.shape).astype(np.float32)
            np.save(feat_dir / f"{perf}.cqt.npy", feat)
            records.append({"perf": perf, "wav": f"{perf}.wav", "work": work,
                            "work_id": wid, "feat": f"cqt_feat/{perf}.cqt.npy",
                            "feat_len": 60, "dur_s": 2.4})
    path = root / f"{name}.txt"
    write_manifest(path, records)
    return path, records


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    rng = np.random.default_rng(0)
    test_txt, records = _write_dataset(root / "data", rng)
    train_txt = root / "data" / "train.txt"
    write_manifest(train_txt, [r for r in records if r["work"] in ("reel", "jig")])
    hp = _tiny_hp(train_path=str(train_txt),
                  testsets={"demo_test": {"query_path": str(test_txt),
                                          "ref_path": str(test_txt)}})
    run = root / "run"
    save_hparams(hp, run / "config" / "hparams.yaml")
    torch.manual_seed(0)
    model = CoverHunterNet(hp.model_config())
    save_checkpoint(run / "checkpoints", 0, model_state=model.state_dict())
    return {"run": run, "test_txt": test_txt, "records": records, "root": root}


@pytest.fixture(scope="module")
def evaluation(tiny_run):
    return evaluate.evaluate_run(tiny_run["run"], device="cpu", n_boot=200, progress=False)


def test_covers_are_found_at_rank_one(evaluation):
    r = evaluation.result()
    assert r.name == "demo_test"
    assert r.metrics["n_queries"] == 12
    assert r.metrics["mAP"] == pytest.approx(1.0)
    assert r.metrics["HR1"] == pytest.approx(1.0) and r.metrics["MR1"] == pytest.approx(1.0)
    assert r.ranks.tolist() == [1] * 12
    assert np.all(np.diag(r.exclude)) and r.exclude.sum() == 12  # only self-matches excluded
    assert r.ci["mAP"]["low"] <= r.metrics["mAP"] <= r.ci["mAP"]["high"] + 1e-12
    assert r.confusions == []


def test_checkpoint_best_falls_back_to_latest_with_a_note(evaluation):
    assert evaluation.epoch == 0
    assert any("best.json" in n for n in evaluation.notes)


def test_never_seen_works_are_the_ones_missing_from_training(evaluation):
    r = evaluation.result()
    names = {r.work_names[lab] for lab in r.test_only}
    assert names == {"hornpipe", "polka"}
    assert r.points.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(r.points, axis=1), 1.0, atol=1e-5)


def test_table_has_a_row_per_metric_with_ci_and_names_the_rule(evaluation):
    t = report.metrics_table(evaluation)
    assert list(t["metric"]) == ["mAP", "MR1", "HR1", "HR10", "P@10"]
    assert t["low"].notna().all() and t["high"].notna().all()
    assert set(t["rule"]) == {evaluation.rule} and f"distance rule {evaluation.rule!r}" in t.columns.name


def test_save_writes_original_style_distance_export(evaluation, tmp_path):
    paths = evaluation.save(tmp_path)
    d = np.load(paths["demo_test.dist"])
    labels = np.load(paths["demo_test.ref_labels"])
    assert d.shape == (12, 12) and np.all(np.diag(d) == -1) and np.all(d[~np.eye(12, dtype=bool)] >= 0)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    meta = json.loads(paths["metrics"].read_text())
    assert meta["epoch"] == 0 and meta["testsets"]["demo_test"]["metrics"]["mAP"] == pytest.approx(1)
    assert meta["distance_rule"] == meta["testsets"]["demo_test"]["distance_rule"] == "mean"
    perfs = json.loads(paths["demo_test.perfs"].read_text())
    assert perfs["query_works"][:3] == ["reel"] * 3


@pytest.mark.parametrize("kind", ["pca", "tsne", "ranks", "confused", "per_work"])
def test_figures_are_saved_as_png(evaluation, tmp_path, kind):
    fig = report.testset_figure(evaluation.result(), kind, save_dir=tmp_path)
    assert (tmp_path / f"demo_test_{kind}.png").read_bytes()[:4] == b"\x89PNG"
    assert fig.axes
    with pytest.raises(ConfigError, match="figure kind"):
        report.testset_figure(evaluation.result(), "pie")


def test_scrambled_labels_lower_the_scores(tiny_run, tmp_path):
    rng = np.random.default_rng(1)
    records = [dict(r) for r in tiny_run["records"]]
    wids = [r["work_id"] for r in records]
    rng.shuffle(wids)
    while wids[:3] == [0, 0, 0]:
        rng.shuffle(wids)
    for r, w in zip(records, wids, strict=True):
        r["work_id"] = w
        r["feat"] = str(tiny_run["root"] / "data" / r["feat"])
    scrambled = tmp_path / "scrambled.txt"
    write_manifest(scrambled, records)
    ev = evaluate.evaluate_run(tiny_run["run"], testsets=[scrambled], device="cpu", n_boot=50,
                               progress=False)
    r = ev.result("scrambled")
    assert r.metrics["mAP"] < 0.9
    assert r.confusions and r.confusions[0]["count"] >= 1


def test_tempo_copies_and_missing_features(tiny_run, tmp_path):
    data = tiny_run["root"] / "data"
    recs = [dict(r, feat=str(data / r["feat"])) for r in tiny_run["records"][:6]]
    copy = dict(recs[0], perf="sp_0.9-" + recs[0]["perf"], source_perf=recs[0]["perf"])
    missing = dict(recs[1], perf="ghost", feat=str(tmp_path / "nope.npy"))
    path = tmp_path / "extra.txt"
    write_manifest(path, recs + [copy, missing])
    ev = evaluate.evaluate_run(tiny_run["run"], testsets={"x": path}, device="cpu", n_boot=20,
                               progress=False, cache=False)
    r = ev.result("x")
    assert r.skipped == [{"perf": "ghost", "role": "query and ref",
                          "reason": "no usable features"}]
    assert len(r.q_perfs) == 7
    i, j = r.q_perfs.index(copy["perf"]), r.q_perfs.index(recs[0]["perf"])
    assert r.exclude[i, j] and r.exclude[j, i]  # a tempo copy never matches its source


def test_embeddings_are_cached_under_the_run(tiny_run, evaluation):
    files = list((tiny_run["run"] / "embeddings").rglob("*.npy"))
    assert len(files) == 12


def test_resolve_testsets_forms(tmp_path):
    hp = _tiny_hp(test_path="data/test.txt")
    (specs,) = evaluate.resolve_testsets(hp, root=tmp_path)
    assert specs.name == "test" and specs.query_path == tmp_path / "data/test.txt"
    specs = evaluate.resolve_testsets(hp, {"a": ("q.txt", "r.txt")})
    assert (specs[0].query_path.name, specs[0].ref_path.name) == ("q.txt", "r.txt")
    specs = evaluate.resolve_testsets(hp, ["x/test.txt", "y/test.txt"])
    assert [s.name for s in specs] == ["test", "test_"]
    with pytest.raises(ConfigError, match="no test sets"):
        evaluate.resolve_testsets(_tiny_hp(), None)
    with pytest.raises(ConfigError, match="query_path"):
        evaluate.resolve_testsets(hp, {"a": {"ref_path": "r.txt"}})


def test_load_checkpoint_rejects_a_bad_choice(tiny_run):
    with pytest.raises(CheckpointError, match="'best', 'latest' or an epoch"):
        evaluate.load_checkpoint(tiny_run["run"], "newest", "cpu")
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 3"):
        evaluate.load_checkpoint(tiny_run["run"], "3", "cpu")


def test_top1_confusions_counts_unordered_pairs():
    dist = np.array([[0.0, 0.1, 0.5, 0.9],
                     [0.1, 0.0, 0.2, 0.9],
                     [0.5, 0.2, 0.0, 0.05],
                     [0.9, 0.9, 0.05, 0.0]])
    labels = ["a", "b", "a", "b"]
    rows = evaluate.top1_confusions(dist, labels, labels, exclude=np.eye(4, dtype=bool))
    assert rows == [{"work_a": "a", "work_b": "b", "count": 4, "min_distance": 0.05}]
    same = ["a", "a", "b", "b"]
    assert evaluate.top1_confusions(dist, same, same, exclude=np.eye(4, dtype=bool)) == []


# --------------------------------------------------------------------------------------------
# identification and exploration helpers


def _abs_records(tiny_run):
    data = tiny_run["root"] / "data"
    return [dict(r, feat=str(data / r["feat"])) for r in tiny_run["records"]]


def test_reference_index_is_built_then_reused_then_rebuilt_when_references_change(tiny_run):
    model, hp, _, _ = evaluate.load_checkpoint(tiny_run["run"], "latest", "cpu")
    refs = _abs_records(tiny_run)
    idx, status = identify.reference_index_for_run(tiny_run["run"], model, hp, refs[:9],
                                                   device="cpu", progress=False)
    assert status.startswith("built") and len(idx) == 9
    idx2, status = identify.reference_index_for_run(tiny_run["run"], model, hp, refs[:9],
                                                    device="cpu", progress=False)
    assert status.startswith("loaded") and idx2.perfs == idx.perfs
    np.testing.assert_allclose(idx2.embeddings, idx.embeddings)
    idx3, status = identify.reference_index_for_run(tiny_run["run"], model, hp, refs,
                                                    device="cpu", progress=False)
    assert "other recordings" in status and len(idx3) == 12
    _, status = identify.reference_index_for_run(tiny_run["run"], model, hp, refs, rebuild=True,
                                                 device="cpu", progress=False)
    assert "rebuild asked for" in status


def test_reference_records_default_to_everything_but_the_test_split(tmp_path):
    def rows(names, split):
        return [{"perf": n, "work": n[0], "wav": f"a/{n}.wav", "feat": f"f/{n}.npy",
                 "split": split} for n in names]

    write_manifest(tmp_path / "train.txt", rows(["a1", "b1"], "train"))
    write_manifest(tmp_path / "val.txt", rows(["a2"], "val"))
    write_manifest(tmp_path / "test.txt", rows(["a3", "c1"], "test") +
                   [{"perf": "sp_0.9-a3", "work": "a", "wav": "a/a3.wav", "feat": "f/x.npy",
                     "source_perf": "a3"}])
    refs = identify.reference_records(tmp_path)
    assert [r["perf"] for r in refs] == ["a1", "b1", "a2"]
    assert all(Path(r["wav"]).is_absolute() and Path(r["feat"]).is_absolute() for r in refs)
    q = identify.identification_queries("", tmp_path)
    assert [Path(p).name for p in q.paths] == ["a3.wav", "c1.wav"]  # the tempo copy once only
    assert q.truth == {q.paths[0]: "a", q.paths[1]: "c"}
    only = identify.reference_records(tmp_path, tmp_path / "test.txt")
    assert [r["perf"] for r in only] == ["a3", "c1", "sp_0.9-a3"]
    with pytest.raises(ConfigError, match="no such file"):
        identify.identification_queries(tmp_path / "nope.wav", tmp_path)
    with pytest.raises(ManifestError, match="held-out"):
        identify.identification_queries("", tmp_path / "empty")


def test_identification_summary_counts_ranks_of_the_true_work():
    def row(q, rank, work, verdict="no confident match"):
        return {"query": q, "rank": rank, "work": work, "distance": 0.1 * rank,
                "verdict": verdict, "error": None}

    rows = [row("q1", 1, "A", "likely the same work"), row("q1", 2, "B"),
            row("q2", 1, "B"), row("q2", 2, "C"), row("q2", 3, "A"),
            row("q3", 1, "A"), row("q3", 2, "B"),
            {"query": "q4", "rank": None, "work": None, "error": "unreadable"}]
    truth = {"q1": "A", "q2": "A", "q3": "Z", "q4": "A"}
    s = identify.identification_summary(rows, truth, index_works=["A", "B", "C"])
    assert s["n_queries"] == 4 and s["n_failed"] == 1 and s["n_with_truth"] == 3
    assert s["top1"] == pytest.approx(1 / 3) and s["top10"] == pytest.approx(2 / 3)
    assert s["n_truth_indexed"] == 2
    assert s["top1_indexed"] == pytest.approx(0.5) and s["top10_indexed"] == pytest.approx(1.0)
    assert [p["rank_of_true_work"] for p in s["per_query"]] == [1, 3, None]
    text = report.summary_text(s)
    assert "true work first 33%" in text and "in the top 10 67%" in text


def test_explorer_data_joins_references_and_queries(tiny_run):
    from chlib.retrieval.index import build_index

    model, hp, _, _ = evaluate.load_checkpoint(tiny_run["run"], "latest", "cpu")
    recs = _abs_records(tiny_run)
    index = build_index(model, recs[:6], hp, progress=False)
    data = explore.explorer_data(index, recs[3:], model, hp, run_dir=tiny_run["run"],
                                  metadata=[{"perf": r["perf"], "era": "old"} for r in recs],
                                  device="cpu", progress=False)
    assert len(data) == 12  # 6 references + the 6 queries not already indexed
    assert [r["role"] for r in data.records].count("query") == 6
    assert data.records[0]["era"] == "old" and "era" in data.columns()
    np.testing.assert_allclose(np.linalg.norm(data.embeddings, axis=1), 1.0, atol=1e-5)
    nb = data.neighbours(0, 2)
    assert [n["work"] for n in nb] == ["reel", "reel"]  # its two covers come first
    assert all(n["row"] != 0 for n in data.neighbours(0, 20)) and len(data.neighbours(0, 20)) == 11
    assert data.index_of("jig_v1") == 4 and data.matching_works("ORN") == ["hornpipe"]
    assert report.explorer_projection(data, "pca").shape == (12, 2)
    assert data.row_of("") == 6 and data.row_of("jig_v1") == 4  # "": the first query
    ax = report.explorer_map_figure(data, "pca", "work", highlight_work="reel", row=6,
                                    n_neighbours=3).axes[0]
    labels = {c.get_label(): len(c.get_offsets()) for c in ax.collections}
    assert labels["selected"] == 1 and labels["neighbours"] == 3 and labels["reel"] == 3
    with pytest.raises(ConfigError, match="no metadata column"):
        data.labels("tempo")


def test_random_embedding_baseline_is_chance_level_on_a_large_random_problem():
    from chlib.retrieval.evaluate import random_embedding_baseline
    from chlib.retrieval.metrics import self_exclusion_mask

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(50), 2)  # 50 works x 2 recordings
    wins = [rng.standard_normal((2, 16)).astype(np.float32) for _ in labels]
    perfs = [f"p{i}" for i in range(len(labels))]
    exclude = self_exclusion_mask(perfs, perfs)
    base = random_embedding_baseline(wins, wins, labels, labels, exclude, same=True, n_draws=10)
    # one relevant item among 99 candidates: expected rank ~50, HR1 ~1/99
    assert 30 < base["MR1"] < 70
    assert base["HR1"] < 0.06 and base["mAP"] < 0.12


def test_evaluation_carries_random_and_untrained_baselines_below_the_model(evaluation):
    r = evaluation.result()
    assert set(r.baselines) == {"random embeddings", "untrained model", MODEL_FREE}
    assert 0.0 < r.baselines[MODEL_FREE]["mAP"] <= 1.0  # 2D-FTM of the same features
    # the fixture's features make covers trivially close: any network ranks them first, random
    # vectors do not
    assert r.baselines["random embeddings"]["mAP"] < 0.9 * r.metrics["mAP"]
    assert r.baselines["untrained model"]["mAP"] == pytest.approx(1.0)
    assert 1.0 <= r.baselines["random embeddings"]["MR1"] <= 11.0
    t = report.metrics_table(evaluation)
    assert "random embeddings" in t.columns and "untrained model" in t.columns
    assert MODEL_FREE in t.columns
