"""Issue 10, retrieval and runner side: hostile input to identification, the reference index and
the notebook runner. Each test is named after the item of the issue it checks (item1 ... item6)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
from bad_inputs import (
    make_damaged_index_meta,
    make_index_feat_outside,
    make_index_file_entry_outside,
    write_kernel_killing_notebook,
    write_unreadable_query_folder,
)
from helpers import StandIn, make_tiny_dataset, tiny_config

import chlib.retrieval.embed as embed_mod
import chlib.retrieval.identify as identify_mod
import chlib.retrieval.index as index_mod
from chlib.__main__ import main as chlib_main
from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError, FeatureError, IndexMismatchError
from chlib.core.io import write_json
from chlib.model.checkpoint import save_checkpoint
from chlib.model.network import CoverHunterNet
from chlib.retrieval.embed import embed_windows
from chlib.retrieval.identify import (
    identification_queries,
    identification_summary,
    identify,
    reference_index_for_run,
)
from chlib.retrieval.index import ReferenceIndex, build_index
from chlib.retrieval.protocol import track_distances
from chlib.ui.runner import run_notebooks

REPO = Path(__file__).resolve().parents[1]
N_BINS = 96  # HParams' default feature bins


@pytest.fixture
def refs(tmp_path):
    """(hp, model, records with absolute feat paths, run folder) of 3 works x 2 recordings."""
    hp = HParams.from_dict({"chunk_frame": [25], "mean_size": 2})  # windows of 50 frames
    rng = np.random.default_rng(0)
    records = []
    for w in range(3):
        for v in range(2):
            feat = tmp_path / "ds" / "cqt_feat" / f"w{w}v{v}.npy"
            feat.parent.mkdir(parents=True, exist_ok=True)
            np.save(feat, (rng.normal(size=(120, N_BINS)) * 10 - 50).astype(np.float32))
            records.append({"perf": f"w{w}v{v}", "work": f"work{w}", "work_id": w,
                            "wav": str(tmp_path / "audio" / f"w{w}v{v}.wav"), "feat": str(feat)})
    model = StandIn(n_bins=N_BINS, dim=8, centre=True, scale=1.0)
    return hp, model, records, tmp_path / "run"


def _saved_index(refs) -> Path:
    hp, model, records, run_dir = refs
    index, status = reference_index_for_run(run_dir, model, hp, records, device="cpu",
                                            progress=False)
    assert status.startswith("built")
    return run_dir / "index"


# ------------------------------------------------------------------ item 1: no readable query


def test_item1_no_readable_query_names_each_file_and_what_to_do(refs, tmp_path):
    hp, model, records, run_dir = refs
    index = build_index(model, records, hp, device="cpu", progress=False)
    bad = write_unreadable_query_folder(tmp_path / "queries")
    queries = identification_queries(tmp_path / "queries", tmp_path / "ds")
    report = identify(queries.paths, model=model, hp=hp, index=index, device="cpu")
    with pytest.raises(FeatureError) as err:
        report.first_match()
    msg = str(err.value)
    assert "no query could be read" in msg
    for p in bad:
        assert str(p) in msg
    assert "audio" in msg and "query_path" in msg  # what to do
    # one corrupt file on its own
    one = identify([bad[0]], model=model, hp=hp, index=index, device="cpu")
    with pytest.raises(FeatureError, match="(?s)no query could be read.*q_corrupt.mp3"):
        one.first_match()


def test_item1_first_match_is_the_best_row_of_the_first_identified_query(refs, tmp_path):
    hp, model, records, run_dir = refs
    index = build_index(model, records, hp, device="cpu", progress=False)
    rep = identify_mod.IdentifyReport(rows=[
        identify_mod._empty_row("bad.wav") | {"error": "bad.wav: not audio"},
        identify_mod._empty_row("good.wav") | {"rank": 1, "perf": "w0v0", "work": "work0"}])
    assert rep.first_match()["query"] == "good.wav"
    assert len(index) == 6


def test_item1_a_folder_without_audio_files_is_a_clear_error(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "readme.txt").write_text("not audio")
    with pytest.raises(ConfigError, match="no audio files"):
        identification_queries(tmp_path / "q", tmp_path)


def test_item1_the_identify_notebook_stops_with_the_message_not_stopiteration():
    nb = nbformat.read(str(REPO / "notebooks" / "06_identify.ipynb"), as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "next(r for r in report.best()" not in code
    assert "report.first_match()" in code


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny dataset and an untrained (but loadable) run of a 1-block CoverHunterNet."""
    ds = make_tiny_dataset(tmp_path)
    hp = HParams.from_dict(tiny_config(ds))
    model = CoverHunterNet(hp.model_config(6))
    run_dir = tmp_path / "run"
    save_hparams(hp, run_dir / "config" / "hparams.yaml")
    save_checkpoint(run_dir / "checkpoints", 1, model_state=model.state_dict())
    return ds, run_dir


@pytest.mark.slow
def test_item1_identify_notebook_on_unreadable_queries_says_so(tiny_run, tmp_path):
    ds, run_dir = tiny_run
    bad = write_unreadable_query_folder(tmp_path / "queries")
    rec = run_notebooks(["06"], run_dir=run_dir, progress=False, parameters={
        "dataset_dir": str(ds), "query_path": str(tmp_path / "queries"), "device": "cpu"})
    assert not rec.ok
    err = rec.executed[0]["error"]
    assert "StopIteration" not in err and "no query could be read" in err
    assert all(p.name in err for p in bad)
    assert (run_dir / "identify_results.csv").exists()  # the failures are on disk


# ------------------------------------------------------------------ item 2: damaged meta.json


@pytest.mark.parametrize("how", ["truncated", "no_rule", "no_files", "no_sha", "a_list"])
def test_item2_damaged_meta_json_is_a_damaged_index(refs, how):
    folder = _saved_index(refs)
    meta = make_damaged_index_meta(folder, how)
    with pytest.raises(IndexMismatchError, match="meta.json") as err:
        ReferenceIndex.load(folder)
    assert "rebuild" in str(err.value)
    assert str(meta) in str(err.value)


@pytest.mark.parametrize("how", ["truncated", "no_rule", "no_sha"])
def test_item2_reference_index_for_run_rebuilds_a_damaged_index(refs, how):
    hp, model, records, run_dir = refs
    folder = _saved_index(refs)
    make_damaged_index_meta(folder, how)
    index, status = reference_index_for_run(run_dir, model, hp, records, device="cpu",
                                            progress=False)
    assert status.startswith("built") and "meta.json" in status
    assert len(index) == 6 and ReferenceIndex.load(folder).perfs == index.perfs


def test_item2_a_torn_records_line_is_a_damaged_index(refs):
    folder = _saved_index(refs)
    rec = folder / "records.jsonl"
    rec.write_text(rec.read_text()[:-20])
    with pytest.raises(IndexMismatchError, match="records.jsonl"):
        ReferenceIndex.load(folder, verify=False)


# ------------------------------------------------------------------ item 3: tampered index


def _record_calls(monkeypatch, module, name):
    seen: list[str] = []
    real = getattr(module, name)

    def spy(path, *a, **kw):
        seen.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("entry", ["../../secret.txt", "ABSOLUTE"])
def test_item3_index_file_outside_the_folder_is_refused_unopened(refs, monkeypatch, entry):
    folder = _saved_index(refs)
    secret = folder.parent.parent / "secret.txt"
    secret.write_text("not yours")
    entry = str(secret) if entry == "ABSOLUTE" else entry
    make_index_file_entry_outside(folder, entry)
    hashed = _record_calls(monkeypatch, index_mod, "file_sha256")
    loaded = _record_calls(monkeypatch, index_mod.np, "load")
    with pytest.raises(IndexMismatchError, match="outside") as err:
        ReferenceIndex.load(folder)
    assert entry in str(err.value) and "tamper" in str(err.value)
    assert not any("secret" in p for p in hashed + loaded)


def test_item3_index_file_that_is_a_symlink_out_is_refused(refs, monkeypatch):
    folder = _saved_index(refs)
    secret = folder.parent.parent / "secret.npy"
    np.save(secret, np.zeros((6, 8), np.float32))
    (folder / "centroids.npy").unlink()
    (folder / "centroids.npy").symlink_to(secret)
    hashed = _record_calls(monkeypatch, index_mod, "file_sha256")
    with pytest.raises(IndexMismatchError, match="centroids.npy.*outside"):
        ReferenceIndex.load(folder)
    assert not any("secret" in p for p in hashed)


def test_item3_feature_path_outside_the_named_folders_is_refused(refs, monkeypatch):
    hp, model, records, run_dir = refs
    folder = _saved_index(refs)
    secret = run_dir.parent / "elsewhere" / "secret.npy"
    secret.parent.mkdir()
    np.save(secret, np.zeros((120, N_BINS), np.float32))
    make_index_feat_outside(folder, str(secret), row=2)
    roots = [run_dir, Path(records[0]["feat"]).parent]
    with pytest.raises(IndexMismatchError, match="w1v0") as err:
        ReferenceIndex.load(folder, feature_roots=roots)
    assert str(secret) in str(err.value) and "tamper" in str(err.value)
    ReferenceIndex.load(folder)  # the plain loader opens no feature file
    opened = _record_calls(monkeypatch, embed_mod, "load_feature")
    hashed = _record_calls(monkeypatch, embed_mod, "file_sha256")
    index, status = reference_index_for_run(run_dir, model, hp, records, device="cpu",
                                            progress=False)
    assert status.startswith("built") and str(secret) in status
    assert index.records[2]["feat"] == records[2]["feat"]
    assert not any("secret" in p for p in opened + hashed)


def test_item3_relative_traversal_in_a_feature_path_is_refused(refs):
    hp, model, records, run_dir = refs
    folder = _saved_index(refs)
    make_index_feat_outside(folder, str(Path(records[0]["feat"]).parent / ".." / ".." / "x.npy"))
    with pytest.raises(IndexMismatchError, match="outside"):
        ReferenceIndex.load(folder, feature_roots=[run_dir, Path(records[0]["feat"]).parent])


# ------------------------------------------------------------------ item 4: NaN in the summary


def _no_nan(name):
    raise AssertionError(f"{name} in JSON")


def test_item4_identify_summary_with_an_unscorable_value_is_valid_json_with_null(tmp_path):
    rows = [{"query": "q.wav", "rank": 1, "work": "other", "distance": 0.5,
             "verdict": "no confident match", "error": None}]
    summary = identification_summary(rows, {"q.wav": "never indexed"}, index_works=["other"])
    assert math.isnan(summary["top1_indexed"])  # no query of an indexed work: unscorable
    write_json(tmp_path / "identify_summary.json", summary)
    back = json.loads((tmp_path / "identify_summary.json").read_text(), parse_constant=_no_nan)
    assert back["top1_indexed"] is None and back["top1"] == 0.0


def test_item4_the_identify_notebook_writes_its_summary_with_write_json():
    nb = nbformat.read(str(REPO / "notebooks" / "06_identify.ipynb"), as_version=4)
    cell = next(c.source for c in nb.cells if "identify_summary.json" in c.source)
    assert "write_json(" in cell and "json.dump" not in cell


# ------------------------------------------------------------------ item 5: a killed kernel


@pytest.fixture
def killing_repo(tmp_path):
    write_kernel_killing_notebook(tmp_path / "notebooks" / "01_prepare.ipynb")
    return tmp_path


def test_item5_killed_kernel_names_notebook_cell_and_cause(killing_repo):
    rec = run_notebooks(["01"], run="r", runs_root=killing_repo / "runs", cwd=killing_repo,
                        progress=False)
    assert not rec.ok
    err = rec.executed[0]["error"]
    assert "kernel died" in err and "os.kill" in err
    assert "cell 4" in err  # parameters, injected parameters, x = 1 + 1, then the killing cell
    assert "out of memory" in err and "re-run" in err
    assert "01_prepare" in rec.summary()


def test_item5_cli_prints_a_summary_and_exits_non_zero_on_a_killed_kernel(killing_repo,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(killing_repo)
    code = chlib_main(["run", "01", "--run", "r", "--runs-root", str(killing_repo / "runs")])
    out = capsys.readouterr()
    assert code != 0
    assert "01_prepare" in out.out and "kernel died" in out.out
    assert "Traceback" not in out.out + out.err


# ------------------------------------------------------------------ item 6: long queries


def test_item6_windows_are_prepared_batch_by_batch_not_all_at_once(monkeypatch):
    prepared = {"n": 0}
    real = embed_mod.prepare_window

    def counting(*a, **kw):
        prepared["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(embed_mod, "prepare_window", counting)
    embedded = {"n": 0, "most_waiting": 0}
    model = StandIn(n_bins=N_BINS, dim=4)
    forward = model.forward

    def watching(x):
        embedded["most_waiting"] = max(embedded["most_waiting"], prepared["n"] - embedded["n"])
        embedded["n"] += len(x)
        return forward(x)

    model.forward = watching
    long_feat = np.full((50 * 400, N_BINS), -40.0, np.float32)  # 400 windows
    out = embed_windows(model, [long_feat], window=50, mean_size=2, batch_size=8, progress=False)
    assert out[0].shape == (400, 4)
    assert embedded["most_waiting"] <= 8


def test_item6_min_rule_blocks_a_long_query_within_the_cap():
    import tracemalloc

    rng = np.random.default_rng(0)
    q = [rng.normal(size=(20_000, 2)).astype(np.float32)]  # one very long query
    r = [rng.normal(size=(10, 2)).astype(np.float32) for _ in range(10)]
    tracemalloc.start()
    d = track_distances(q, r, rule="min", block_elements=10_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 2**20  # a [20000, 100] block alone is 8 MB
    qu = q[0] / np.linalg.norm(q[0], axis=1, keepdims=True)
    want = [1 - (qu @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T).max() for x in r]
    np.testing.assert_allclose(d[0], want, atol=1e-5)


def test_item6_identify_embeds_a_long_query_before_computing_the_next(refs, monkeypatch):
    hp, model, records, run_dir = refs
    index = build_index(model, records, hp, device="cpu", progress=False)
    calls: list[str] = []
    long_feat = np.full((2_000, N_BINS), -40.0, np.float32)

    def fake_features(path, hp, device="cpu", *, timings=None):
        calls.append("features")
        return long_feat

    real_embed = identify_mod.embed_windows

    def spy_embed(model, feats, **kw):
        calls.append(f"embed {len(feats)}")
        return real_embed(model, feats, **kw)

    monkeypatch.setattr(identify_mod, "query_features", fake_features)
    monkeypatch.setattr(identify_mod, "embed_windows", spy_embed)
    monkeypatch.setattr(identify_mod, "QUERY_FRAMES", 1_500)
    rep = identify(["a.wav", "b.wav", "c.wav"], model=model, hp=hp, index=index, device="cpu")
    assert calls == ["features", "embed 1"] * 3
    assert [r["query"] for r in rep.best()] == ["a.wav", "b.wav", "c.wav"]
