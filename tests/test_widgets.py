"""chlib.widgets: session detection, tables, forms (value round trip), players, monitor."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from chlib import widgets
from chlib.errors import AudioError, ConfigError


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


def test_table_text_and_html():
    rows = [{"metric": "mAP", "value": 0.51234, "n": 3}, {"metric": "MR1", "value": None}]
    t = widgets.table(rows, floatfmt=".2f")
    text = str(t).splitlines()
    assert text[0].split() == ["metric", "value", "n"]
    assert set(text[1]) <= {"-", " "}
    assert text[2].split() == ["mAP", "0.51", "3"]
    assert text[3].split() == ["MR1"]
    h = t._repr_html_()
    assert h.count("<tr>") == 3 and "<th>value</th>" in h and "<td>0.51</td>" in h


def test_table_escapes_html_and_truncates():
    rows = [{"name": f"<b>{i}</b>"} for i in range(5)]
    t = widgets.table(rows, max_rows=2)
    assert "&lt;b&gt;0&lt;/b&gt;" in t.to_html() and "<b>0</b>" not in t.to_html()
    assert "3 more rows" in t.to_text()
    assert len(t) == 5


def test_table_to_csv_writes_every_row(tmp_path):
    import csv

    rows = [{"a": i, "b": i / 2} for i in range(40)]
    path = widgets.table(rows, max_rows=3).to_csv(tmp_path / "t.csv")
    back = list(csv.DictReader(path.open()))
    assert len(back) == 40 and back[-1] == {"a": "39", "b": "19.5"}


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
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), sr)
    return path


def test_audio_excerpt_is_a_short_mono_wav(tmp_path):
    import io

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
