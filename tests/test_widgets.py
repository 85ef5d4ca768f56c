"""chlib.ui.widgets: session detection, tables, forms (value round trip), players, monitor."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import soundfile as sf
from helpers import fake_upload, write_tone

from chlib.core.errors import AudioError, ConfigError
from chlib.retrieval.segment import SegmentReport
from chlib.retrieval.timeline import Timeline
from chlib.ui import explorer, identify_app, widgets
from chlib.ui.timeline_view import TimelinePlayer


def test_plain_python_is_not_an_interactive_session(monkeypatch):
    monkeypatch.delenv(widgets.INTERACTIVE_ENV, raising=False)
    assert widgets.interactive_session() is False
    assert widgets.in_papermill() is False


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("yes", True)])
def test_environment_forces_the_session_kind(monkeypatch, value, expected):
    monkeypatch.setenv(widgets.INTERACTIVE_ENV, value)
    assert widgets.interactive_session() is expected


def test_kernel_without_stdin_counts_as_papermill(monkeypatch):
    class FakeKernel:
        _allow_stdin = False

    monkeypatch.delenv(widgets.INTERACTIVE_ENV, raising=False)
    monkeypatch.setattr(widgets, "_kernel", lambda: FakeKernel())
    assert widgets.in_papermill() and not widgets.interactive_session()
    FakeKernel._allow_stdin = True  # JupyterLab / Colab allow input()
    assert not widgets.in_papermill() and widgets.interactive_session()


def test_use_project_root_leaves_the_notebooks_folder_only(tmp_path, monkeypatch):
    nbs = tmp_path / "proj" / "notebooks"
    nbs.mkdir(parents=True)
    (nbs / "01_prepare.ipynb").write_text("{}")
    monkeypatch.chdir(nbs)
    assert widgets.use_project_root() == tmp_path / "proj"
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert widgets.use_project_root() == other


def test_table_is_a_dataframe_of_the_chosen_columns():
    rows = [{"metric": "mAP", "value": 0.5, "n": 3, "extra": 1},
            {"metric": "MR1", "value": None, "note": None}]
    t = widgets.table(rows, ["metric", "value", "n"], title="scores")
    assert list(t.columns) == ["metric", "value", "n"] and t["metric"].tolist() == ["mAP", "MR1"]
    text = str(t).splitlines()
    assert text[0].split()[:1] == ["scores"] and text[0].split()[-3:] == ["metric", "value", "n"]
    assert text[1].split()[:3] == ["0", "mAP", "0.5"]
    h = t._repr_html_()  # caption, no row numbers, numbers readable, missing ones blank
    assert h.count("<tr") == 3 and "<caption>scores</caption>" in h
    assert re.search(r"<th [^>]*>value</th>", h) and re.search(r"<td [^>]*>0.5</td>", h)
    assert re.search(r"<td [^>]*>3</td>", h) and not re.search(r"<td [^>]*>(nan|None)</td>", h)
    assert "row_heading" not in h and not re.search(r"<th [^>]*>0</th>", h)
    h = widgets.table(rows, ["metric", "note"])._repr_html_()  # a missing text is blank too
    assert not re.search(r"<td [^>]*>(nan|None)</td>", h) and h.count("<td") == 4
    assert isinstance(t[["metric"]], widgets.Table)  # a selection still shows this way


def test_table_escapes_html_and_truncates_with_a_note():
    rows = [{"name": f"<b>{i}</b>"} for i in range(5)]
    t = widgets.table(rows, max_rows=2, title="names")
    assert "&lt;b&gt;0&lt;/b&gt;" in t._repr_html_() and "<b>0</b>" not in t._repr_html_()
    assert len(t) == 2 and t.columns.name == "names; first 2 of 5 rows"
    assert len(widgets.table(rows, max_rows=None)) == 5
    assert widgets.table([], ["a", "b"]).columns.tolist() == ["a", "b"]


def test_parameter_form_round_trips_typed_values():
    defaults = {"n_works": 5, "min_seconds": 10.0, "source": "demo", "fast": False,
                "projections": ["tsne", "umap"], "overrides": {"batch_size": 8}}
    form = widgets.parameter_form(defaults, choices={"source": ["demo", "covers80"]})
    assert form.values() == defaults
    new = {"n_works": 7, "min_seconds": 2.5, "source": "covers80", "fast": True,
           "projections": ["pca"], "overrides": {"encoder": {"num_blocks": 1}}}
    form.set_values(new)
    assert form.values() == new
    assert type(form.values()["n_works"]) is int


def test_parameter_form_bad_literal_and_unknown_choice():
    form = widgets.parameter_form({"projections": ["tsne"]})
    form.inputs["projections"].value = "[tsne"
    with pytest.raises(ConfigError, match="projections"):
        form.values()
    form.inputs["projections"].value = "'tsne'"
    with pytest.raises(ConfigError, match="expected a list"):
        form.values()
    with pytest.raises(ConfigError, match="not among"):
        widgets.parameter_form({"source": "x"}, choices={"source": ["demo"]})
    with pytest.raises(ConfigError, match="unknown parameters"):
        widgets.parameter_form({"a": 1}, choices={"b": [1]})


def test_edit_parameters_writes_edits_into_the_namespace():
    ns = {"n_works": 5, "seed": 0}
    form = widgets.edit_parameters(ns, ["n_works"], force=True)
    form.inputs["n_works"].value = 9
    assert ns == {"n_works": 9, "seed": 0}
    assert widgets.edit_parameters(ns, ["n_works"], force=False) is None
    with pytest.raises(ConfigError, match="not defined"):
        widgets.edit_parameters(ns, ["nope"], force=True)


def _tone(path, seconds=2.0, sr=8000):
    return write_tone(path, seconds, sample_rate=sr, freqs=(440.0,), amplitude=0.5, noise=0.0)


def test_audio_excerpt_is_a_short_mono_wav(tmp_path):
    wav = widgets.audio_excerpt_wav(_tone(tmp_path / "a.wav", seconds=3.0), start_s=1.0,
                                    max_seconds=1.5)
    y, sr = sf.read(io.BytesIO(wav))
    assert sr == 8000 and y.ndim == 1 and len(y) == 12000
    with pytest.raises(AudioError, match="not found"):
        widgets.audio_excerpt_wav(tmp_path / "missing.wav")


def test_audio_player_and_results_table(tmp_path):
    import ipywidgets as w

    good = _tone(tmp_path / "a.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    player = widgets.audio_player(good)
    assert isinstance(player, w.Audio) and not player.autoplay and not player.loop
    note = widgets.audio_player(bad)
    assert isinstance(note, w.HTML) and "bad.wav" in note.value
    rows = [{"rank": 1, "work": "reel", "distance": 0.12, "wav": str(good)},
            {"rank": 2, "work": "jig", "distance": 0.5, "wav": None}]
    grid = widgets.results_table(rows, ["rank", "work", "distance"], audio_column="wav")
    assert len(grid.children) == 3 * 4  # header + 2 rows, 3 text columns + a player
    assert isinstance(grid.children[7], w.Audio)
    assert grid.children[6].value == "0.120"


def test_training_monitor_headless_prints_epochs_and_keeps_rows(capsys):
    mon = widgets.TrainingMonitor(live=False, print_epochs=True,
                                  rows=[{"kind": "epoch", "epoch": 0, "train_total": 3.0}])
    mon({"kind": "epoch", "epoch": 1, "step": 3, "train_total": 2.0, "val_total": 1.5})
    out = capsys.readouterr().out
    assert out.strip() == "epoch 1  step 3  train_total 2  val_total 1.5"
    assert len(mon.rows) == 2
    fig = mon.figure()
    train_line = fig.axes[0].get_lines()[0]
    assert list(train_line.get_xdata()) == [0, 1] and list(train_line.get_ydata()) == [3.0, 2.0]
    quiet = widgets.TrainingMonitor(live=False)
    quiet({"kind": "epoch", "epoch": 0, "train_total": 1.0})
    assert capsys.readouterr().out == "" and len(quiet.rows) == 1


def test_session_detection_inside_a_real_kernel():
    """JupyterLab / Colab send allow_stdin=True, papermill (nbclient) False."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        seen = {}
        for allow in (True, False):
            msg_id = kc.execute("from chlib.ui.widgets import interactive_session, in_papermill\n"
                                "print(interactive_session(), in_papermill())", allow_stdin=allow)
            out = []
            while True:
                m = kc.get_iopub_msg(timeout=60)
                if m["parent_header"].get("msg_id") != msg_id:
                    continue
                if m["msg_type"] == "stream":
                    out.append(m["content"]["text"])
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    break
            seen[allow] = "".join(out).split()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert seen == {True: ["True", "False"], False: ["False", "True"]}


def test_epoch_table_keeps_the_last_record_of_each_epoch_and_map_columns():
    rows = [{"kind": "train", "epoch": 0, "total": 9.0},
            {"kind": "epoch", "epoch": 0, "step": 2, "train_total": 3.0, "val_loss": 2.0,
             "mAP/test": 0.2, "is_best": True},
            {"kind": "epoch", "epoch": 1, "step": 4, "train_total": 2.5, "val_loss": 2.1,
             "mAP/test": 0.3, "is_best": False},
            {"kind": "epoch", "epoch": 1, "step": 4, "train_total": 2.4, "val_loss": 2.2,
             "mAP/test": 0.35, "is_best": False}]
    t = widgets.epoch_table(rows)
    assert list(t.columns) == ["epoch", "step", "train_total", "val_loss", "mAP/test", "is_best"]
    assert t["train_total"].tolist() == [3.0, 2.4] and t.columns.name == "2 epochs"


def test_cqt_examples_pick_the_work_with_most_recordings(tmp_path):
    from chlib.core.manifest import write_manifest

    recs = []
    for perf, work, n in (("a1", "A", 10), ("b1", "B", 20), ("b2", "B", 30), ("b3", "B", 40),
                          ("a2", "A", 50)):
        np.save(tmp_path / f"{perf}.npy", np.full((n, 4), -1.0, dtype=np.float32))
        recs.append({"perf": perf, "work": work, "feat": f"{perf}.npy"})
    recs.append({"perf": "sp_0.9-b1", "work": "B", "feat": "b1.npy", "source_perf": "b1"})
    write_manifest(tmp_path / "full.txt", recs)
    arrays, titles = widgets.cqt_examples(tmp_path / "full.txt", n=5)
    assert titles == ["b1", "b2", "b3"]  # the tempo copy is skipped
    assert [a.shape[0] for a in arrays] == [20, 30, 40]
    arrays, titles = widgets.cqt_examples(tmp_path / "full.txt", work="A", n=1)
    assert titles == ["a1"]


def test_audio_is_a_playable_ipython_object(tmp_path):
    import io

    a = widgets.audio(_tone(tmp_path / "a.wav", seconds=3.0), max_seconds=1.0)
    assert a._repr_html_().strip().startswith("<audio") and "base64" in a._repr_html_()
    y, sr = sf.read(io.BytesIO(a.data))
    assert len(y) == sr == 8000  # one second embedded, not the whole file


def _identify_fixture(tmp_path):
    from chlib.core.config import HParams

    hp = HParams.from_dict({"n_bins": 24})
    feat = tmp_path / "ref.npy"
    np.save(feat, np.random.default_rng(0).uniform(-80, 0, (100, 24)).astype(np.float32))
    ref_wav = _tone(tmp_path / "ref.wav", sr=16000)

    class FakeIndex:
        records = [{"perf": "ref_v0", "work": "reel", "wav": str(ref_wav), "feat": str(feat)}]

    return hp, FakeIndex()


def test_identify_app_paths_from_upload_and_path_box(tmp_path):

    hp, index = _identify_fixture(tmp_path)
    app = identify_app.IdentifyApp(None, hp, index, upload_dir=tmp_path / "up", top_k=5)
    assert app.top_k.value == 5 and app.threshold.value == pytest.approx(0.001)
    with pytest.raises(ConfigError, match="upload an audio file"):
        app.query_paths()
    app.path.value = str(tmp_path / "missing.wav")
    with pytest.raises(ConfigError, match="no such file"):
        app.query_paths()
    folder = tmp_path / "queries"
    folder.mkdir()
    _tone(folder / "q1.wav")
    _tone(folder / "q2.flac")
    app.path.value = str(folder)
    assert [p.rsplit("/", 1)[1] for p in app.query_paths()] == ["q1.wav", "q2.flac"]
    data = (folder / "q1.wav").read_bytes()
    fake_upload(app.upload, "mine.wav", data)
    (p,) = app.query_paths()
    assert p == str(tmp_path / "up" / "mine.wav") and (tmp_path / "up" / "mine.wav").read_bytes() == data


def test_identify_app_run_shows_players_and_the_cqt_pair(tmp_path, monkeypatch):
    import ipywidgets as w

    from chlib.retrieval.identify import IdentifyReport

    hp, index = _identify_fixture(tmp_path)
    query = _tone(tmp_path / "query.wav", sr=16000)
    calls = {}

    def fake_identify(paths, **kw):
        calls.update(kw, paths=paths)
        return IdentifyReport(rows=[{"query": str(query), "rank": 1, "perf": "ref_v0",
                                     "work": "reel", "distance": 0.1, "p_value": 1e-4,
                                     "verdict": "likely the same work", "error": None}])

    def fake_segments(paths, **kw):  # the query's timeline: one segment of its work
        return SegmentReport(timelines={str(query): Timeline(
            [{"start_s": 0.0, "end_s": 2.0, "work": "reel", "p_value": 0.01, "perf": "ref_v0",
              "mean_z": 3.0}], 2.0)})

    monkeypatch.setattr(identify_app, "identify", fake_identify)
    monkeypatch.setattr(identify_app, "identify_segments", fake_segments)
    app = identify_app.IdentifyApp("model", hp, index, path=str(query), top_k=3)
    app.threshold.value = 0.01
    app.run()
    assert calls["paths"] == [str(query)] and calls["top_k"] == 3
    assert calls["threshold_p"] == pytest.approx(0.01, rel=0.1)
    head, grid, label, player = app.views(str(query))
    assert isinstance(head.children[1], w.Audio)
    assert isinstance(grid.children[-1], w.Audio)  # the match's player
    assert isinstance(player, TimelinePlayer) and 'data-start="0' in player.markup
    fig = app.match_figure(app.report.best()[0])
    assert [ax.get_title() for ax in fig.axes if ax.images] == [
        "query: query.wav", "best match: ref_v0 (reel)"]


def _explorer_data(tmp_path):
    from chlib.retrieval.explore import ExplorerData

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 8))
    emb, recs = [], []
    wav = _tone(tmp_path / "x.wav")
    for i in range(9):
        v = centres[i % 3] + rng.normal(0, 0.05, 8)
        emb.append(v / np.linalg.norm(v))
        feat = tmp_path / f"f{i}.npy"
        np.save(feat, np.full((30, 12), -10.0, dtype=np.float32))
        recs.append({"perf": f"p{i}", "work": f"work{i % 3}", "wav": str(wav), "feat": str(feat),
                     "role": "query" if i < 3 else "reference", "version": f"v{i}",
                     "instrument": "fiddle" if i % 2 else "flute"})
    return ExplorerData(np.array(emb, dtype=np.float32), recs)


def test_embedding_explorer_controls_drive_the_map(tmp_path):
    from chlib.ui.report import explorer_projection

    data = _explorer_data(tmp_path)
    ex = explorer.EmbeddingExplorer(data, projection="pca", point="p4", n_neighbours=2)
    assert list(ex.colour.options) == ["work", "role", "instrument"]  # "version" is unique
    s = ex.state()
    assert s["row"] == 4 and s["k"] == 2 and s["highlight"] == []
    ex.search.value = "work1"
    ex.k.value = 3
    s = ex.state()
    assert s["highlight"] == ["work1"] and s["k"] == 3
    ax = ex.map_figure().axes[0]
    by_label = {c.get_label(): c for c in ax.collections}
    xy = explorer_projection(data, "pca", 0)
    np.testing.assert_allclose(by_label["selected"].get_offsets()[0], xy[4])
    assert len(by_label["neighbours"].get_offsets()) == 3
    ex.refresh()  # draws into its Output widgets without raising
    ex.colour.value = "instrument"
    assert ex.state()["colour_by"] == "instrument"


def test_audio_excerpt_can_be_resampled_for_a_lighter_player(tmp_path):
    path = _tone(tmp_path / "q.wav", sr=44100)
    wav = widgets.audio_excerpt_wav(path, max_seconds=1.0, sample_rate=16000)
    info = sf.info(io.BytesIO(wav))
    assert info.samplerate == 16000 and info.frames == 16000
    assert len(wav) < len(widgets.audio_excerpt_wav(path, max_seconds=1.0)) / 2
