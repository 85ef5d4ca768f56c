"""Issue 11, the runner and training as a terminal shows them: live per-epoch lines through
``chlib run``, a readable failure summary, and one TensorBoard log folder per run."""

from __future__ import annotations

import re

import nbformat
import pytest
from helpers import make_tiny_dataset, tiny_config

from chlib.__main__ import main
from chlib.core.config import HParams, save_hparams
from chlib.train.loop import train
from chlib.ui.runner import run_notebooks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_nb(path, params_src, *bodies):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(b) for b in bodies)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture
def tiny_run(tmp_path):
    """A project folder whose 03_train notebook trains a tiny model on the CPU for 2 epochs."""
    (tmp_path / "notebooks").mkdir()
    _write_nb(tmp_path / "notebooks" / "01_prepare.ipynb", "n: int = 1", "pass")
    _write_nb(tmp_path / "notebooks" / "03_train.ipynb",
              'run_dir: str = "runs/x"\nfail: bool = False',
              "import torch\ntorch.set_num_threads(1)\nfrom chlib.train.loop import train",
              "def boom():\n    raise ValueError('asked to fail')\nassert not fail, boom()",
              "result = train(run_dir, device='cpu', max_epochs=2)")
    ds = make_tiny_dataset(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    save_hparams(HParams.from_dict(tiny_config(ds, max_epochs=2)),
                 run_dir / "config" / "hparams.yaml")
    return tmp_path, run_dir


def test_chlib_run_prints_the_notebook_its_live_copy_and_one_line_per_epoch(tiny_run, capsys):
    root, run_dir = tiny_run
    rec = run_notebooks(["03"], run_dir=run_dir, cwd=root, progress=True)
    assert rec.ok, rec.summary()
    out = capsys.readouterr().out
    live = run_dir / "notebooks" / "03_train.ipynb"
    assert re.search(rf"03_train.*{re.escape(str(live))}", out), out
    epochs = [line for line in out.splitlines() if re.match(r"\s*03_train: epoch \d+:", line)]
    assert len(epochs) == 2, out
    for line in epochs:  # epoch, loss, validation mAP, epoch time, ETA
        assert "train_total" in line and "mAP/tiny" in line, line
        assert re.search(r"\d+(\.\d+)? s\b", line) and "ETA" in line, line
    assert "ETA 0 s" in epochs[-1]


def test_a_failed_notebook_is_summarised_with_its_cell_and_that_rerunning_resumes(
        tiny_run, capsys, monkeypatch):
    root, run_dir = tiny_run
    monkeypatch.chdir(root)
    code = main(["run", "01", "03", "--run", "tiny", "-p", "fail", "True"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    (line,) = [s for s in out.splitlines() if "FAILED" in s]
    assert "03_train" in line and "ValueError: asked to fail" in line
    assert "cell 4" in line and "assert not fail" in line, line  # the cell: number and code
    assert "re-run" in line and "resumes" in line, line


def test_a_resumed_run_appends_to_the_same_tensorboard_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    hp = HParams.from_dict(tiny_config(make_tiny_dataset(tmp_path), max_epochs=2))
    run_dir = tmp_path / "run"
    first = train(run_dir, hp=hp, device="cpu", progress=False)
    for name in ("g_00000001", "do_00000001"):  # as if killed before epoch 1 was saved
        (run_dir / "checkpoints" / name).unlink()
    again = train(run_dir, device="cpu", progress=False)  # redoes epoch 1 and logs it again
    assert again.epochs_done == 2 and again.steps == first.steps
    logs = list((run_dir / "logs").iterdir())
    assert len(logs) == 1, logs
    acc = EventAccumulator(str(logs[0]))
    acc.Reload()
    assert {"csi/total", "csi/lr", "csi_val/foc_loss", "mAP/tiny"} <= set(acc.Tags()["scalars"])
    steps = [e.step for e in acc.Scalars("csi/total")]
    assert steps == sorted(set(steps)) and steps[-1] == again.steps  # both calls, once each
    purges = [e.step for f in sorted(logs[0].iterdir()) for e in EventFileLoader(str(f)).Load()
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges == [first.history[0]["step"] + 1]  # the second call hides what it redoes
    # epoch-indexed tags (the original's x axis) show a re-done epoch twice: purge_step is by step
    assert {e.step for e in acc.Scalars("mAP/tiny")} == {0, 1}


def test_ctrl_c_is_summarised_not_a_traceback(tiny_run, capsys, monkeypatch):
    import papermill

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    root, _ = tiny_run
    monkeypatch.chdir(root)
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    assert main(["run", "01", "03", "--run", "tiny", "--keep-going"]) == 1
    out = capsys.readouterr().out
    assert "01_prepare" in out and "interrupted" in out and "resumes" in out
    assert "03_train" not in out  # Ctrl-C stops the chain even with --keep-going


def test_validation_after_each_epoch_shows_progress(tmp_path, monkeypatch):
    """The wait after an epoch (validation loss, then the test sets) has its own bars."""
    from chlib.train import loop

    seen = []

    def spy(iterable=None, **kw):
        seen.append((kw.get("desc", ""), kw.get("enabled", True)))
        return real(iterable, **kw)

    real = loop.progress_bar
    monkeypatch.setattr(loop, "progress_bar", spy)
    hp = HParams.from_dict(tiny_config(make_tiny_dataset(tmp_path), max_epochs=1))
    train(tmp_path / "run", hp=hp, device="cpu", progress=True)
    assert ("epoch 0: validation loss", True) in seen and ("epoch 0: test sets", True) in seen
    seen.clear()
    train(tmp_path / "run2", hp=hp, device="cpu", progress=False)  # headless callers: no bars
    assert not any(on for desc, on in seen if "validation" in desc or "test sets" in desc)
