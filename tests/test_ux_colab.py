"""Issue 11, Colab and git: the notebooks' set-up cell (clone + install + GPU + Drive on Colab,
nothing elsewhere), the nbstripout git filter of `make`, and 04_tune run from notebooks/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"


def _setup_cells() -> dict[str, str]:
    cells = {}
    for path in sorted(NB_DIR.glob("*.ipynb")):
        src = nbformat.read(str(path), as_version=4).cells[1].source
        assert src.startswith("# Set-up."), path.name
        cells[path.stem] = src
    return cells


def _python(cell: str) -> str:
    return TransformerManager().transform_cell(cell)


def test_colab_setup_cells_are_identical_and_compile_as_ipython():
    cells = _setup_cells()
    assert len(cells) >= 6
    assert len(set(cells.values())) == 1, "the set-up cells differ"
    code = _python(next(iter(cells.values())))
    compile(code, "<set-up cell>", "exec")
    assert "get_ipython().system(" in code and "run_line_magic('pip'" in code


def test_colab_setup_cell_does_nothing_outside_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    cwd = Path.cwd()
    namespace: dict = {}
    exec(_python(next(iter(_setup_cells().values()))), namespace)
    assert set(namespace) <= {"__builtins__", "sys"}
    assert Path.cwd() == cwd


class _FakeIPython:
    def __init__(self):
        self.calls: list[tuple] = []

    def system(self, cmd):
        self.calls.append(("system", cmd))

    def run_line_magic(self, name, line):
        self.calls.append((name, line))


def _run_on_fake_colab(monkeypatch, cell: str) -> tuple[_FakeIPython, list, dict]:
    """Executes the cell as if on Colab: no /content/chlib yet, folders and chdir recorded."""
    colab, output = type(sys)("google.colab"), type(sys)("google.colab.output")
    colab.output = output
    ip, dirs = _FakeIPython(), []
    output.enable_custom_widget_manager = lambda: ip.calls.append(("widgets", "custom manager"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    monkeypatch.setattr(os, "makedirs", lambda p, exist_ok=False: dirs.append(("mkdir", p)))
    monkeypatch.setattr(os, "chdir", lambda p: dirs.append(("chdir", p)))
    namespace = {"get_ipython": lambda: ip}
    exec(_python(cell), namespace)
    return ip, dirs, namespace


def test_colab_setup_cell_clones_installs_and_enters_the_project(monkeypatch, capsys):
    cell = next(iter(_setup_cells().values()))
    with pytest.raises(RuntimeError, match="CHLIB_REPO"):  # the placeholder URL is refused
        _run_on_fake_colab(monkeypatch, cell)
    url = "https://github.com/someone/chlib"
    ip, dirs, ns = _run_on_fake_colab(monkeypatch, cell.replace("https://github.com/YOUR_NAME/chlib",
                                                                url))
    assert ns["CHLIB_REPO"] == url
    assert ip.calls[0][0] == "system" and "git clone" in ip.calls[0][1]
    assert "{CHLIB_REPO} /content/chlib" in ip.calls[0][1]
    assert ip.calls[1] == ("pip", "install --quiet /content/chlib")
    assert ip.calls[2] == ("widgets", "custom manager")  # anywidget (07's map) needs it on Colab
    assert dirs == [("mkdir", "/content/chlib"), ("chdir", "/content/chlib")]
    assert "GPU:" in capsys.readouterr().out  # says whether there is one, and how to get one
    assert "USE_DRIVE = False" in cell and "/content/drive" in cell


# --------------------------------------------------------------------------------------------
# item 2: the output-stripping git filter


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def test_git_filter_from_make_commits_notebooks_without_outputs(tmp_path):
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs git and make")
    py = Path(sys.executable)
    if not (py.parent / "nbstripout").exists():
        pytest.skip("nbstripout is not installed (pip install -e '.[dev]')")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    shutil.copy(REPO / ".gitattributes", repo / ".gitattributes")
    for _ in range(2):  # idempotent
        subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "git-filter",
                        f"PY={py}"], cwd=repo, check=True)
    assert _git(repo, "config", "--get-all", "filter.nbstripout.clean").count("\n") == 1
    nb = nbformat.read(str(NB_DIR / "03_train.ipynb"), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = 3
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="epoch 1\n")]
    nbformat.write(nb, repo / "03_train.ipynb")
    _git(repo, "add", "03_train.ipynb")
    staged = json.loads(_git(repo, "show", ":03_train.ipynb"))
    code = [c for c in staged["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert [c["id"] for c in staged["cells"]] == [c.id for c in nb.cells]  # ids kept
    assert "parameters" in code[1]["metadata"]["tags"]


def test_git_filter_leaves_the_committed_notebooks_unchanged():
    """The filter's output of a clean notebook is the file itself: no spurious modifications."""
    nbstripout = Path(sys.executable).parent / "nbstripout"
    if not nbstripout.exists():
        pytest.skip("nbstripout is not installed (pip install -e '.[dev]')")
    assert "*.ipynb filter=nbstripout" in (REPO / ".gitattributes").read_text()
    for path in sorted(NB_DIR.glob("*.ipynb")):
        out = subprocess.run([str(nbstripout), "--keep-id", "-t", str(path)], check=True,
                             capture_output=True, text=True).stdout
        assert out == path.read_text(), path.name


# --------------------------------------------------------------------------------------------
# item 3: 04_tune and chlib.train.tune from notebooks/


def _project(tmp_path: Path) -> tuple[Path, dict]:
    """A project folder with notebooks/, a tiny dataset and a base config of relative paths."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import make_tiny_dataset, tiny_config

    from chlib.core.config import HParams, save_hparams

    proj = tmp_path / "proj"
    (proj / "notebooks").mkdir(parents=True)
    for name in ("01_prepare", "04_tune"):
        shutil.copy(NB_DIR / f"{name}.ipynb", proj / "notebooks")
    make_tiny_dataset(proj)
    cfg = tiny_config("tiny", max_epochs=1)
    save_hparams(HParams.from_dict(cfg), proj / "base.yaml")
    plan = {"base": {"config": "base.yaml"}, "factors": {"learning_rate": [0.004]},
            "seeds": [1], "max_epochs": 1, "early_stopping_patience": 2}
    return proj, plan


def test_tune_run_plan_resolves_paths_against_its_project_folder(tmp_path, monkeypatch):
    from chlib.core.io import append_jsonl
    from chlib.train.tune import parse_plan, run_plan

    proj, plan = _project(tmp_path)
    monkeypatch.chdir(proj / "notebooks")

    def fake_train(seed_dir: Path) -> None:
        append_jsonl(seed_dir / "metrics.jsonl", {"kind": "val", "epoch": 0, "foc_loss": 1.0})

    res = run_plan(parse_plan(plan), "runs/t", cwd=proj, train_fn=fake_train, progress=False)
    assert [r["status"] for r in res.runs] == ["ok", "ok"], res.report()
    assert (proj / "runs" / "t" / "summary.json").is_file()
    assert sorted(p.name for p in (proj / "notebooks").iterdir()) == ["01_prepare.ipynb",
                                                                      "04_tune.ipynb"]


@pytest.mark.slow
def test_tune_notebook_run_from_notebooks_folder_writes_only_in_the_project(tmp_path):
    import papermill as pm

    proj, plan = _project(tmp_path)
    pm.execute_notebook(str(proj / "notebooks" / "04_tune.ipynb"), str(tmp_path / "out.ipynb"),
                        cwd=str(proj / "notebooks"), progress_bar=False, parameters={
                            "plan": plan, "device": "cpu", "run_dir": "runs/t",
                            "dataset_dir": "tiny"})
    assert (proj / "runs" / "t" / "summary.json").is_file()
    assert sorted(p.name for p in (proj / "notebooks").iterdir()) == ["01_prepare.ipynb",
                                                                      "04_tune.ipynb"]
