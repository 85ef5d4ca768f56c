"""Issue 11, forms: edits survive Run All, choices and help from the parameter comments, the
identify app's query source and busy state."""

from __future__ import annotations

import json

import ipywidgets as w
import pytest
from helpers import fake_upload, write_tone

from chlib.core.errors import ConfigError
from chlib.ui import identify_app, widgets

PARAMS = '''max_epochs: int = 40  # train at most this many epochs
device: str = "auto"  # "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" or "mps"
recipe: str = "laptop"  # "laptop", "coverhunter" or the path of a recipe .yaml
note: str = "a # b"  # free text; "": none
overrides: dict = {}  # settings merged over the recipe
'''


def _namespace(nb_path, **kw):
    ns = {"max_epochs": 40, "device": "auto", "recipe": "laptop", "note": "a # b",
          "overrides": {}, "In": ["", PARAMS, "form = ..."]}
    if nb_path is not None:
        ns["__session__"] = str(nb_path)
    return dict(ns, **kw)


@pytest.fixture
def interactive(monkeypatch):
    monkeypatch.setenv(widgets.INTERACTIVE_ENV, "1")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.setattr(widgets, "in_papermill", lambda: False)


NAMES = ["max_epochs", "device", "recipe", "overrides"]


def test_form_edits_survive_a_rerun_of_the_parameters_cell(tmp_path, interactive, capsys):
    nb = tmp_path / "nbs" / "03_train.ipynb"
    nb.parent.mkdir()
    ns = _namespace(nb)
    form = widgets.edit_parameters(ns, NAMES)
    form.inputs["max_epochs"].value = 3
    form.inputs["overrides"].value = "{'batch_size': 8}"
    saved = nb.parent / ".03_train.form.json"
    assert json.loads(saved.read_text()) == {"max_epochs": 3, "overrides": {"batch_size": 8}}
    capsys.readouterr()
    ns = _namespace(nb)  # Run All: the parameters cell resets the defaults
    form = widgets.edit_parameters(ns, NAMES)
    assert ns["max_epochs"] == 3 and ns["overrides"] == {"batch_size": 8}
    assert form.values()["max_epochs"] == 3 and ns["device"] == "auto"
    out = capsys.readouterr().out
    assert "max_epochs = 3" in out and "saved form" in out and "reset" in out
    form.reset_button.click()  # back to the notebook's defaults, file gone
    assert not saved.exists() and ns["max_epochs"] == 40 and ns["overrides"] == {}
    ns = _namespace(nb)
    widgets.edit_parameters(ns, NAMES)
    assert ns["max_epochs"] == 40


def test_saved_form_ignores_values_of_the_wrong_type(tmp_path, interactive):
    nb = tmp_path / "03_train.ipynb"
    (tmp_path / ".03_train.form.json").write_text('{"max_epochs": "x", "device": "cpu"}')
    ns = _namespace(nb)
    widgets.edit_parameters(ns, NAMES)
    assert ns["max_epochs"] == 40 and ns["device"] == "cpu"


def test_unknown_notebook_keeps_edits_in_memory_and_says_so(tmp_path, interactive, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(widgets, "_MEMORY_FORMS", {})
    form = widgets.edit_parameters(_namespace(None), NAMES)
    assert "memory" in capsys.readouterr().out
    form.inputs["max_epochs"].value = 5
    ns = _namespace(None)
    widgets.edit_parameters(ns, NAMES)
    assert ns["max_epochs"] == 5 and list(tmp_path.iterdir()) == []


def test_session_name_from_the_environment(tmp_path, interactive, monkeypatch):
    nb = tmp_path / "05_evaluate.ipynb"
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))
    form = widgets.edit_parameters(_namespace(None), NAMES)
    form.inputs["max_epochs"].value = 2
    assert json.loads((tmp_path / ".05_evaluate.form.json").read_text()) == {"max_epochs": 2}


def test_papermill_reads_and_writes_nothing(tmp_path, monkeypatch):
    nb = tmp_path / "03_train.ipynb"
    saved = tmp_path / ".03_train.form.json"
    saved.write_text('{"max_epochs": 3}')
    monkeypatch.setattr(widgets, "in_papermill", lambda: True)
    ns = _namespace(nb)
    assert widgets.edit_parameters(ns, NAMES) is None and ns["max_epochs"] == 40
    form = widgets.edit_parameters(ns, NAMES, force=True)  # CHLIB_INTERACTIVE=1 under papermill
    assert ns["max_epochs"] == 40
    form.inputs["max_epochs"].value = 7
    assert json.loads(saved.read_text()) == {"max_epochs": 3}


def test_gitignore_names_the_saved_forms():
    from pathlib import Path

    lines = (Path(__file__).parents[1] / ".gitignore").read_text().splitlines()
    assert ".*.form.json" in lines


def test_parameter_comments_and_quoted_choices():
    comments = widgets.parameter_comments(PARAMS)
    assert comments["note"] == 'free text; "": none'  # a "#" inside the value is not a comment
    assert comments["max_epochs"] == "train at most this many epochs"
    assert widgets.quoted_choices(comments["device"]) == (["auto", "cpu", "cuda", "mps"], True)
    assert widgets.quoted_choices(comments["recipe"]) == (["laptop", "coverhunter"], False)
    assert widgets.quoted_choices('"best", "latest" or an epoch number such as "12"') == (
        ["best", "latest"], False)
    assert widgets.quoted_choices('"": as in hparams.yaml; "nnaudio" or "coverhunter"') == (
        ["", "nnaudio", "coverhunter"], True)
    assert widgets.quoted_choices(comments["note"]) == ([], True)  # one quoted value: no list


def test_form_uses_dropdowns_help_text_and_aligned_labels(tmp_path, interactive):
    form = widgets.edit_parameters(_namespace(tmp_path / "03_train.ipynb"), NAMES)
    device, recipe = form.inputs["device"], form.inputs["recipe"]
    assert isinstance(device, w.Dropdown) and list(device.options) == ["auto", "cpu", "cuda", "mps"]
    assert isinstance(recipe, w.Combobox) and list(recipe.options) == ["laptop", "coverhunter"]
    recipe.value = "my/recipe.yaml"  # still free text
    assert form.values()["recipe"] == "my/recipe.yaml"
    assert "at most this many epochs" in getattr(form.inputs["max_epochs"], widgets.TOOLTIP)
    rows = [c for c in form.widget.children if isinstance(c, w.HBox)]
    assert any("at most this many epochs" in c.value
               for r in rows for c in r.children if isinstance(c, w.HTML))
    widths = {box.style.description_width for box in form.inputs.values()}
    assert len(widths) == 1 and widths != {"initial"}


def test_explicit_choices_still_win_and_still_check_the_default():
    form = widgets.parameter_form({"source": "demo"}, choices={"source": ["demo", "folder"]},
                                  help={"source": 'anything "a", "b"'})
    assert list(form.inputs["source"].options) == ["demo", "folder"]
    with pytest.raises(ConfigError, match="not among"):
        widgets.parameter_form({"source": "x"}, choices={"source": ["demo"]})


def _app(tmp_path):
    from chlib.core.config import HParams

    class FakeIndex:
        records = []

    return identify_app.IdentifyApp(None, HParams.from_dict({"n_bins": 24}), FakeIndex(),
                               upload_dir=tmp_path / "up")


def _upload(app, name="mine.wav", data=b"RIFF"):
    fake_upload(app.upload, name, data)


def test_identify_app_uses_what_was_touched_last_and_can_clear_the_upload(tmp_path):
    typed = write_tone(tmp_path / "typed.wav", 1.0, sample_rate=8000, freqs=(440.0,))
    app = _app(tmp_path)
    _upload(app)
    assert app.query_paths() == [str(tmp_path / "up" / "mine.wav")]
    assert "mine.wav" in app.source_note.value
    app.path.value = str(typed)  # typed after the upload: the path wins
    assert app.query_paths() == [str(typed)] and "typed" in app.source_note.value
    _upload(app, "other.wav")
    assert app.query_paths() == [str(tmp_path / "up" / "other.wav")]
    app.clear_button.click()
    assert not app.upload.value and app.query_paths() == [str(typed)]


def test_identify_button_is_busy_while_running_and_recovers_from_errors(tmp_path, monkeypatch):
    from chlib.retrieval.identify import IdentifyReport

    typed = write_tone(tmp_path / "typed.wav", 1.0, sample_rate=8000, freqs=(440.0,))
    app = _app(tmp_path)
    app.path.value = str(typed)
    seen = []

    def fake_identify(paths, **kw):
        seen.append((app.button.disabled, app.button.description))
        return IdentifyReport(rows=[])

    monkeypatch.setattr(identify_app, "identify", fake_identify)
    monkeypatch.setattr(identify_app, "identify_segments", lambda paths, **kw: None)
    app.button.click()
    assert seen and seen[0][0] is True and seen[0][1] != "Identify"
    assert not app.button.disabled and app.button.description == "Identify"

    def broken(paths, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(identify_app, "identify", broken)
    with pytest.raises(RuntimeError):
        app.run()
    assert not app.button.disabled and app.button.description == "Identify"
