"""chlib.ui.runner: papermill batch runs into runs/<name>/notebooks/, parameters checked."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import soundfile as sf
from helpers import make_tiny_dataset, tiny_config, tone

from chlib.__main__ import main
from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError
from chlib.train.loop import train
from chlib.ui.runner import notebook_parameters, parse_cli_value, run_notebooks


def _write_nb(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body_src)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture
def fake_repo(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _write_nb(
        nbs / "01_prepare.ipynb",
        'run_dir: str = "runs/x"  # where outputs go\nn: int = 2  # how many',
        "import json, pathlib\n"
        "pathlib.Path(run_dir).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(run_dir, 'out.json').write_text(json.dumps({'n': n}))",
    )
    _write_nb(nbs / "02_extract.ipynb", "fail: bool = False", "assert not fail, 'asked to fail'")
    return tmp_path


def test_parameters_are_read_from_the_tagged_cell(fake_repo):
    assert notebook_parameters(fake_repo / "notebooks/01_prepare.ipynb") == {"run_dir": "runs/x", "n": 2}


def test_run_executes_into_the_run_folder_with_parameters(fake_repo):
    rec = run_notebooks(["01"], run="r1", runs_root=fake_repo / "runs", parameters={"n": 5},
                        cwd=fake_repo, progress=False)
    assert rec.ok, rec.summary()
    run_dir = fake_repo / "runs" / "r1"
    assert json.loads((run_dir / "out.json").read_text()) == {"n": 5}
    assert (run_dir / "notebooks" / "01_prepare.ipynb").exists()


def test_unknown_parameter_is_rejected_before_running(fake_repo):
    with pytest.raises(ConfigError, match="nn"):
        run_notebooks(["01"], run="r2", runs_root=fake_repo / "runs", parameters={"nn": 5},
                      cwd=fake_repo, progress=False)
    assert not (fake_repo / "runs" / "r2").exists()


def test_a_failing_notebook_is_reported_and_stops_the_chain(fake_repo):
    rec = run_notebooks(["02", "01"], run="r3", runs_root=fake_repo / "runs",
                        parameters={"fail": True}, cwd=fake_repo, progress=False)
    assert not rec.ok
    assert len(rec.executed) == 1 and "asked to fail" in rec.executed[0]["error"]


def test_unknown_notebook_name_is_a_clear_error(fake_repo):
    with pytest.raises(ConfigError, match="unknown notebook"):
        run_notebooks(["09_fly"], run="r4", runs_root=fake_repo / "runs", cwd=fake_repo)


@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("true", True), ("None", None),
                                         ("[1, 2]", [1, 2]), ("datasets/demo", "datasets/demo")])
def test_cli_values_are_parsed_as_literals(text, value):
    assert parse_cli_value(text) == value


def test_chlib_console_script_is_installed_and_lists_parameters():
    """``pip install`` puts a ``chlib`` command beside the interpreter ([project.scripts])."""
    script = Path(sys.executable).with_name("chlib")
    assert script.exists(), f"no console script at {script}: reinstall with pip install -e ."
    out = subprocess.run([str(script), "params", "01_prepare"], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "dataset_dir" in out.stdout and "source" in out.stdout


def test_chlib_identify_prints_the_best_match_of_each_file(tmp_path, capsys, one_torch_thread):
    """``chlib identify FILE... --run``: one line per query; unreadable files named, rc 1 if
    nothing could be read."""
    ds = make_tiny_dataset(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    save_hparams(HParams.from_dict(tiny_config(ds, max_epochs=1)), run_dir / "config" / "hparams.yaml")
    train(run_dir, device="cpu", max_epochs=1, progress=False)
    good, bad = tmp_path / "query.wav", tmp_path / "broken.wav"
    sf.write(good, tone(6.0), 16000)
    bad.write_bytes(b"not audio at all")
    csv_path = tmp_path / "out.csv"
    rc = main(["identify", str(good), str(bad), "--run", str(run_dir), "--device", "cpu",
               "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"^query\.wav: \S+  p=", out, re.M), out
    assert re.search(r"^broken\.wav: not identified: ", out, re.M), out
    assert csv_path.exists()
    seg_csv = tmp_path / "segments.csv"  # --segments: each file's timeline, printed and saved
    assert main(["identify", str(good), str(bad), "--run", str(run_dir), "--device", "cpu",
                 "--segments", str(seg_csv)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^query\.wav: 0-6 s \S+", out, re.M), out
    rows = seg_csv.read_text().splitlines()
    assert rows[0].startswith("query,start_s,end_s,work,p_value,perf")
    assert sum("broken.wav" in r for r in rows[1:]) == 1  # its error row
    assert main(["identify", str(bad), "--run", str(run_dir), "--device", "cpu"]) == 2
    assert "no query could be read" in capsys.readouterr().err


def test_chlib_serve_starts_the_service_on_this_computer_only(tmp_path, one_torch_thread):
    """``chlib serve --run``: the run's service answers /health on 127.0.0.1 and says where."""
    ds = make_tiny_dataset(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    save_hparams(HParams.from_dict(tiny_config(ds, max_epochs=1)), run_dir / "config" / "hparams.yaml")
    train(run_dir, device="cpu", max_epochs=1, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).with_name("chlib")
    proc = subprocess.Popen([str(script), "serve", "--run", str(run_dir), "--port", str(port),
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        health = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        assert health and health["status"] == "ok" and health["run"] == "tiny"
        assert health["can_edit"] is False  # no token configured: the library is read-only
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert f"open http://127.0.0.1:{port}/" in err
