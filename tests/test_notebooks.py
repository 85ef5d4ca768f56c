"""The numbered notebooks: committed clean, parameters declared properly, and each one runs
headless (papermill, through chlib.ui.runner) on tiny data and leaves its artifacts behind.

The chain runs once per module on a demo dataset of 5 works x 3 performances of 8-12 s, with
a tiny model (1 conformer block, width 32, 2 epochs): 01 -> 02 -> 03 are module fixtures, and
05, 06, 07 each run against the trained run. 04_tune belongs to chlib.train.tune's own tests.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
from pathlib import Path

import nbformat
import papermill
import pytest

from chlib.ui.runner import NOTEBOOKS, notebook_parameters, run_notebooks

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
SHARED_DEFAULTS = {"dataset_dir": "datasets/demo", "run_dir": "runs/demo", "device": "auto",
                   "seed": 0}
TINY_TRAINING = {
    "chunk_frame": [50], "embed_dim": 32, "batch_size": 8, "m_per_class": 2,
    "encoder": {"num_blocks": 1, "output_dims": 32, "attention_dim": 32},
    "warmup_steps": 2, "num_workers": 0, "eval_batch_size": 16,
}


def _clear_tool():
    spec = importlib.util.spec_from_file_location("clear_notebook_outputs",
                                                  REPO / "tools" / "clear_notebook_outputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _committed() -> list[Path]:
    return sorted(NB_DIR.glob("*.ipynb"))


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


# --------------------------------------------------------------------------------------------
# static checks of the committed notebooks (fast)


def test_every_pipeline_notebook_but_tune_is_committed():
    names = {p.stem for p in _committed()}
    assert set(NOTEBOOKS) - {"04_tune"} <= names


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.stem)
def test_committed_notebook_is_clean_and_has_a_parameters_cell(path):
    nb = nbformat.read(str(path), as_version=4)
    tool = _clear_tool()
    assert tool.notebook_is_clean(nb), f"{path.name} has outputs: run tools/clear_notebook_outputs.py"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    code = _code_cells(nb)
    assert "google.colab" in code[0].source, "first code cell is the Colab set-up cell"
    assert code[1] is tagged[0], "the parameters cell comes right after the set-up cell"


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.stem)
def test_parameters_are_annotated_commented_and_shared_names_keep_defaults(path):
    declared = notebook_parameters(path)
    inspected = papermill.inspect_notebook(str(path))
    cell = next(c for c in nbformat.read(path, as_version=4).cells
                if "parameters" in c.metadata.get("tags", []))
    written = {n.target.id for n in ast.parse(cell.source).body if isinstance(n, ast.AnnAssign)}
    # papermill skips a line it cannot parse (e.g. "=" inside the comment) with only a message
    assert set(inspected) == written == set(declared), "papermill must parse every parameter line"
    for name, p in inspected.items():
        assert p["inferred_type_name"] not in ("None", ""), f"{name} has no type annotation"
        assert p["help"], f"{name} has no trailing comment"
    for name, default in SHARED_DEFAULTS.items():
        if name == "run_dir" and path.stem == "04_tune":
            continue  # tuning writes many runs: its own folder by default, not the demo run's
        if name in declared:
            assert declared[name] == default, f"shared parameter {name} should default to {default!r}"


def test_clear_tool_strips_an_executed_notebook(tmp_path):
    tool = _clear_tool()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.execution_count = 3
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                           execution_count=3)]
    cell.metadata["papermill"] = {"duration": 0.1}
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_markdown_cell("# title")]
    nb.metadata["widgets"] = {"state": {}}
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, str(path))
    assert tool.main([str(path), "--check"]) == 1
    assert tool.main([str(path)]) == 0
    back = json.loads(path.read_text())
    assert back["cells"][0]["outputs"] == [] and back["cells"][0]["execution_count"] is None
    assert back["cells"][0]["metadata"] == {"tags": ["parameters"]}
    assert "widgets" not in back["metadata"]
    assert tool.main([str(path), "--check"]) == 0


# --------------------------------------------------------------------------------------------
# the headless chain on tiny data


def _run(name: str, root: Path, **parameters):
    rec = run_notebooks([name], run_dir=root / "run", parameters=parameters, progress=False)
    assert rec.ok, rec.summary()
    out = Path(rec.executed[0]["output"])
    return nbformat.read(str(out), as_version=4), rec.executed[0]["seconds"]


def _outputs(nb, mime: str) -> list:
    return [o for c in _code_cells(nb) for o in c.get("outputs", [])
            if mime in o.get("data", {})]


def _no_widgets_shown(nb) -> bool:
    """Headless runs must not show the parameter forms (papermill fires no callbacks)."""
    for c in _code_cells(nb):
        if "edit_parameters(" in c.source and c.get("outputs"):
            return False
    return True


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbchain")
    return {"root": root, "data": root / "data", "run": root / "run", "seconds": {}}


@pytest.fixture(scope="module")
def prepared(chain):
    nb, s = _run("01_prepare", chain["root"], dataset_dir=str(chain["data"]), n_works=5,
                 perfs_per_work=3, min_seconds=8.0, max_seconds=12.0)
    chain["seconds"]["01_prepare"] = s
    return nb


@pytest.fixture(scope="module")
def extracted(chain, prepared):
    nb, s = _run("02_extract", chain["root"], dataset_dir=str(chain["data"]), device="cpu",
                 num_workers=0)
    chain["seconds"]["02_extract"] = s
    return nb


@pytest.fixture(scope="module")
def trained(chain, extracted):
    nb, s = _run("03_train", chain["root"], dataset_dir=str(chain["data"]), device="cpu",
                 max_epochs=2, overrides=TINY_TRAINING)
    chain["seconds"]["03_train"] = s
    return nb


@pytest.mark.slow
def test_prepare_notebook_writes_the_demo_manifest_and_histogram(chain, prepared):
    lines = (chain["data"] / "dataset.txt").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 15 and len({r["work"] for r in records}) == 5
    assert all(8.0 <= r["dur_s"] <= 12.5 for r in records)
    assert (chain["data"] / "hparams.yaml").is_file()
    assert (chain["run"] / "figures" / "01_works_histogram.png").stat().st_size > 1000
    assert len(_outputs(prepared, "image/png")) == 1
    assert _no_widgets_shown(prepared)


@pytest.mark.slow
def test_extract_notebook_writes_features_splits_and_cqt_picture(chain, extracted):
    data = chain["data"]
    full = [json.loads(x) for x in (data / "full.txt").read_text().splitlines()]
    assert len(full) == 15 and len(list((data / "cqt_feat").glob("*.cqt.npy"))) == 15
    n_split = sum(len((data / f"{s}.txt").read_text().splitlines()) for s in ("train", "val", "test"))
    assert n_split == 15
    assert json.loads((data / "extract_report.json").read_text())["n_skipped"] == 0
    assert (chain["run"] / "figures" / "02_cqt_examples.png").is_file()
    assert len(_outputs(extracted, "image/png")) == 1
    assert _no_widgets_shown(extracted)


@pytest.mark.slow
def test_train_notebook_trains_the_tiny_recipe_and_saves_curves(chain, trained):
    run = chain["run"]
    config = (run / "config" / "hparams.yaml").read_text()
    assert "num_blocks: 1" in config and "output_dims: 32" in config
    assert (run / "checkpoints" / "g_00000001").is_file()
    assert (run / "checkpoints" / "best.json").is_file()
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert "mAP/test" in epochs[-1]
    assert (run / "figures" / "03_training_curves.png").is_file()
    assert len(_outputs(trained, "image/png")) == 1
    assert _no_widgets_shown(trained)


@pytest.mark.slow
def test_evaluate_notebook_reports_metrics_with_ci_figures_and_exports(chain, trained):
    nb, s = _run("05_evaluate", chain["root"], device="cpu", projections=["tsne", "pca"],
                 n_boot=100)
    chain["seconds"]["05_evaluate"] = s
    run = chain["run"]
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    test = metrics["testsets"]["test"]
    assert 0.0 <= test["metrics"]["mAP"] <= 1.0
    assert test["ci"]["mAP"]["low"] <= test["ci"]["mAP"]["high"]
    import numpy as np

    n_test = len((chain["data"] / "test.txt").read_text().splitlines())
    assert np.load(run / "evaluation" / "test.npy").shape == (n_test, n_test)
    assert np.load(run / "evaluation" / "test.reflabels.npy").shape == (n_test,)
    for kind in ("tsne", "pca", "ranks", "confused", "per_work"):
        assert (run / "figures" / f"test_{kind}.png").is_file(), kind
    assert (run / "figures" / "invariance.png").is_file()
    assert len(_outputs(nb, "image/png")) == 6
    assert "2D-FTM (no learning)" in metrics["testsets"]["test"]["baselines"]
    assert _no_widgets_shown(nb)


@pytest.mark.slow
def test_identify_notebook_identifies_held_out_recordings(chain, trained):
    nb, s = _run("06_identify", chain["root"], dataset_dir=str(chain["data"]), device="cpu",
                 top_k=3)
    chain["seconds"]["06_identify"] = s
    run = chain["run"]
    with open(run / "identify_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from chlib.retrieval.identify import CSV_COLUMNS

    assert list(rows[0]) == list(CSV_COLUMNS)
    test_wavs = {json.loads(x)["wav"] for x in (chain["data"] / "test.txt").read_text().splitlines()}
    assert {Path(r["query"]).name for r in rows} == {Path(w).name for w in test_wavs}
    assert all(1 <= int(r["rank"]) <= 3 for r in rows)
    summary = json.loads((run / "identify_summary.json").read_text())
    assert summary["n_queries"] == len(test_wavs) and summary["n_with_truth"] == len(test_wavs)
    assert 0.0 <= summary["top10"] <= 1.0
    assert (run / "index" / "meta.json").is_file()
    assert (run / "figures" / "06_query_vs_best_match.png").is_file()
    printed = "".join(o.get("text", "") for c in _code_cells(nb) for o in c.get("outputs", [])
                      if o.get("output_type") == "stream")
    assert "true work first" in printed
    assert len(_outputs(nb, "text/html")) >= 2  # result tables and audio players
    assert _no_widgets_shown(nb)


@pytest.mark.slow
def test_explore_notebook_draws_the_map_neighbours_and_cqts(chain, trained):
    nb, s = _run("07_explore", chain["root"], dataset_dir=str(chain["data"]), device="cpu",
                 projection="pca", colour_by="role", n_neighbours=4)
    chain["seconds"]["07_explore"] = s
    figures = chain["run"] / "figures"
    assert (figures / "07_map_pca.png").is_file()
    assert (figures / "07_chosen_and_nearest_cqt.png").is_file()
    assert len(_outputs(nb, "image/png")) == 2
    tables = [o["data"]["text/html"] for o in _outputs(nb, "text/html")
              if "nearest recordings" in o["data"].get("text/plain", "")]
    assert len(tables) == 1 and tables[0].split("<tbody>")[1].count("<tr") == 4  # 4 neighbours
    assert _no_widgets_shown(nb)
    print("notebook seconds:", json.dumps(chain["seconds"]))


@pytest.mark.slow
def test_probe_notebook_probes_labels_beside_their_baselines(chain, trained):
    nb, s = _run("08_probe", chain["root"], dataset_dir=str(chain["data"]), device="cpu",
                 label_columns=["instrument", "rhythm"], n_folds=3, n_boot=50, projection="pca",
                 n_disagreements=3)
    chain["seconds"]["08_probe"] = s
    out = chain["run"] / "probe"
    assert (chain["data"] / "labels.csv").is_file()  # the demo generator wrote it
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probed = {r["label"] for r in rows}
    assert probed and probed <= {"instrument", "rhythm"}
    for label in probed:
        got = {(r["feature"], r["probe"]) for r in rows if r["label"] == label}
        assert got == {("none", "majority")} | {(f, p) for f in ("trained", "untrained", "cqt_stats")
                                                for p in ("logreg", "knn")}
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["accuracy_low"]) <= float(r["accuracy"]) <= float(r["accuracy_high"])
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["results"]) == len(rows) and set(doc["classes"]) == probed
    assert (out / "predictions.csv").is_file()
    for label in probed:
        assert (out / f"confusion_{label}_trained_logreg.png").is_file()
        assert (out / f"map_{label}_trained_pca.png").is_file()
    assert len(_outputs(nb, "image/png")) == 2 * len(probed)
    assert _no_widgets_shown(nb)
