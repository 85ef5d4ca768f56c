"""Training on several processes (torch.distributed: DDP, gloo on CPU, launched by torchrun)
equals training in one: the sampler's shards, the gradient of one step (the world-size factor),
the weights after N steps, and kill -9 then resume. Tiny model, tiny features, CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_dataset, tiny_config

from chlib.__main__ import main
from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError
from chlib.core.io import folder_lock
from chlib.data.sampler import MPerClassBatchSampler
from chlib.model import CoverHunterNet
from chlib.model.checkpoint import list_checkpoints, load_generator_state, load_state_into
from chlib.train import distributed
from chlib.train.loop import read_metrics, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
EPOCHS = 4  # x 2 rounds (6 training works, 4 per global batch) = 8 steps
ATOL = 1e-5  # weights after 8 AdamW steps, DDP vs one process (sums in another order)
TIMEOUT_S = 180

# 10 works with 1..5 recordings each
LABELS = [w for w in range(10) for _ in range(1 + w % 5)]

# one training step's gradient, run under torchrun (2 ranks) and in this process (1)
GRAD_CODE = '''
import sys
import torch
from chlib.core.config import load_hparams
from chlib.model import CoverHunterNet
from chlib.train import distributed
from chlib.train.data import prepare_training_data, train_loaders


def one_step(hp_path, out):
    with distributed.session() as env:
        hp = load_hparams(hp_path)
        data = prepare_training_data(hp)
        torch.manual_seed(hp.seed)
        model = CoverHunterNet(hp.model_config(data.num_classes))
        distributed.prepare_model(model, env, hp.seed)
        (loader,), (sampler,) = train_loaders(data, hp, torch.device("cpu"), rank=env.rank,
                                              world_size=env.world_size)
        sampler.set_epoch(0)
        x, y = next(iter(loader))
        net, loss_fn = distributed.parallel_loss(model, env, torch.device("cpu"))
        net.train()
        total, parts = loss_fn(x, y)
        total.backward()
        if env.is_main:
            torch.save({"total": total.detach(), "parts": parts, "n_local": len(y),
                        "grads": {n: p.grad for n, p in model.named_parameters()
                                  if p.grad is not None},
                        "state": model.state_dict()}, out)
'''

# train with a pause after each epoch (after its checkpoint): time to kill it part-way; each
# rank writes its pid (torchrun starts the ranks in sessions of their own)
KILL_CODE = '''
import os, sys, time
from pathlib import Path
from chlib.train.loop import train
Path(f"pid.{os.environ['RANK']}").write_text(str(os.getpid()))
train(sys.argv[1], device="cpu", progress=False, callbacks=[lambda rec: time.sleep(0.7)])
'''


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("ddp_data"))


def _hp(ds: Path, **over) -> HParams:
    # dropout 0: the ranks draw their dropout masks from their own streams, not the single
    # process's (augmentation is already off in tiny_config); deterministic for exactness
    enc = {"output_dims": 32, "num_blocks": 1, "attention_dim": 32, "dropout": 0.0}
    return HParams.from_dict(tiny_config(ds, encoder=enc, deterministic=True, max_epochs=EPOCHS,
                                         every_n_epoch_to_save=1, early_stopping_patience=99,
                                         **over))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
            str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    errors = [ln for ln in proc.stderr.splitlines() if "rror" in ln]
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n" + "\n".join(errors)
    return proc


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --------------------------------------------------------------------------------------------
# the sampler's shards


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_whole_works_and_their_union_is_the_single_process_batch(world):
    one = MPerClassBatchSampler(LABELS, m=2, batch_size=12, seed=5, stream=1)
    ranks = [MPerClassBatchSampler(LABELS, m=2, batch_size=12, seed=5, stream=1, rank=r,
                                   world_size=world) for r in range(world)]
    for epoch in (0, 3):
        full = one.epoch_batches(epoch)
        shards = [s.epoch_batches(epoch) for s in ranks]
        assert all(len(sh) == len(full) == one.batches_per_epoch for sh in shards)
        for b, batch in enumerate(full):
            parts = [sh[b] for sh in shards]
            assert sum(parts, []) == batch  # same items, same per-item seeds, same order
            works = [{LABELS[i] for i, _ in p} for p in parts]
            assert all(len(p) == 12 // world for p in parts)
            assert all(len(w) == 6 // world for w in works)  # whole works, m items each
            assert sum(len(w) for w in works) == len(set().union(*works))  # disjoint works
    ranks[0].set_epoch(2, start_batch=1)  # resume mid-epoch: the shard of the same batches
    assert list(ranks[0]) == ranks[0].epoch_batches(2)[1:]


def test_works_per_batch_not_divisible_by_the_world_size_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"12 / m_per_class 4 = 3 works per batch cannot be "
                                          r"split over 2 processes.*batch_size 16"):
        MPerClassBatchSampler(LABELS, m=4, batch_size=12, seed=0, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="outside"):
        MPerClassBatchSampler(LABELS, m=2, batch_size=8, seed=0, rank=2, world_size=2)


def test_torchrun_variables_are_read_and_checked(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_from_os() == distributed.SINGLE and not distributed.SINGLE.active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="do not fit together"):
        distributed.env_from_os()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.env_from_os()
    assert (env.rank, env.world_size, env.local_rank, env.active, env.is_main) == (3, 4, 1, True,
                                                                                   False)


def test_train_command_needs_the_run_folder_once(capsys):
    for argv in (["train"], ["train", "runs/a", "--run", "runs/b"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "give the run folder once" in capsys.readouterr().err


def test_mps_has_no_distributed_backend():
    with pytest.raises(ConfigError, match="MPS has no torch.distributed"):
        distributed.rank_device(torch.device("mps"), distributed.DistEnv(0, 2, 0))
    assert distributed.rank_device(torch.device("mps"), distributed.SINGLE).type == "mps"


# --------------------------------------------------------------------------------------------
# one step's gradient: DDP's average of the ranks equals the single-process gradient


def test_one_step_gradient_under_ddp_equals_the_single_process_gradient(tiny_ds, tmp_path):
    # every loss on (center loss too) and a BatchNorm whose statistics must be global
    hp = _hp(tiny_ds, center={"weight": 0.01})
    save_hparams(hp, tmp_path / "hp.yaml")
    (tmp_path / "grad.py").write_text(GRAD_CODE + "\none_step(sys.argv[1], sys.argv[2])\n")
    _run(_torchrun("grad.py", "hp.yaml", "ddp.pt"), tmp_path)
    code: dict = {}
    exec(GRAD_CODE, code)  # the same function, in this single process
    code["one_step"](str(tmp_path / "hp.yaml"), str(tmp_path / "one.pt"))
    ddp, one = (torch.load(tmp_path / f, weights_only=True) for f in ("ddp.pt", "one.pt"))
    assert ddp["n_local"] * WORLD == one["n_local"] == hp.batch_size
    assert torch.allclose(ddp["total"], one["total"], rtol=1e-5, atol=1e-6)
    assert set(one["parts"]) == {"foc_loss", "tri_loss", "cen_loss"}
    assert ddp["grads"].keys() == one["grads"].keys()
    for name, g in one["grads"].items():  # a factor of WORLD would fail here
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-4, atol=1e-6), name
    print(f"max |grad_ddp - grad_single|: {_max_diff(ddp['grads'], one['grads']):.3g} (largest "
          f"|grad| {max(float(g.abs().max()) for g in one['grads'].values()):.3g})")
    # the BatchNorm running statistics are those of the global batch
    assert _max_diff(ddp["state"], one["state"]) < 1e-5


# --------------------------------------------------------------------------------------------
# N steps, and kill -9 then resume


@pytest.fixture(scope="module")
def runs(tiny_ds, tmp_path_factory) -> tuple[Path, HParams]:
    """A single-process run and an uninterrupted 2-rank DDP run (``-m chlib train``)."""
    root = tmp_path_factory.mktemp("ddp_runs")
    hp = _hp(tiny_ds)
    train(root / "single", hp=hp, device="cpu", progress=False)
    save_hparams(hp, root / "ddp" / "config" / "hparams.yaml")
    proc = _run(_torchrun("-m", "chlib", "train", "ddp", "--device", "cpu", "--quiet"),
                root)
    assert "world size 2, global batch 8, per-rank batch 4, lr 0.002" in proc.stdout
    return root, hp


def _trained_elements(hp: HParams, tmp: Path) -> dict[str, torch.Tensor]:
    """Per parameter, the elements whose first-step gradient is well above float noise (> 1e-5;
    the largest is ~1). The others have a zero gradient in exact arithmetic (a bias before a
    BatchNorm or a softmax, positional dims constant over a chunk: noise of ~1e-9), which AdamW
    turns into steps of up to ~lr in any two runs that sum in different orders."""
    save_hparams(hp, tmp / "hp.yaml")
    code: dict = {}
    exec(GRAD_CODE, code)
    code["one_step"](str(tmp / "hp.yaml"), str(tmp / "step1.pt"))
    return {k: g.abs() > 1e-5 for k, g in torch.load(tmp / "step1.pt")["grads"].items()}


def test_ddp_weights_after_n_steps_match_a_single_process_run(runs, tmp_path):
    root, hp = runs
    last, steps = f"g_{EPOCHS - 1:08d}", 2 * EPOCHS
    single = load_generator_state(root / "single" / "checkpoints" / last)
    ddp = load_generator_state(root / "ddp" / "checkpoints" / last)
    assert single.keys() == ddp.keys() and not any(k.startswith("module.") for k in ddp)
    load_state_into(CoverHunterNet(hp.model_config(6)), ddp)  # single-process code loads it
    diff = {k: (single[k].double() - ddp[k].double()).abs() for k in single}
    trained = _trained_elements(hp, tmp_path)
    worst = max(float(diff[k][m].max()) for k, m in trained.items() if m.any())
    print(f"max |w_ddp - w_single| after {steps} steps: {worst:.3g} over the "
          f"{sum(int(m.sum()) for m in trained.values())} trained elements; "
          f"{max(float(d.max()) for d in diff.values()):.3g} over all")
    assert worst < ATOL
    # gradient-free elements: no more than AdamW's bound of ~lr a step
    assert all(float(diff[k].max()) <= steps * hp.learning_rate for k in trained)
    # the BatchNorm statistics of the input and of the embeddings: the global batch's
    for k in single:
        if k.startswith(("_global_cmvn.", "_bottleneck.")):
            assert torch.allclose(single[k].double(), ddp[k].double(), rtol=1e-5, atol=ATOL), k
    # rank 0 logged every step, with the losses of the whole global batch
    a, b = (read_metrics(root / r, "train") for r in ("single", "ddp"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    assert all(abs(x["total"] - y["total"]) < 1e-5 for x, y in zip(a, b, strict=True))
    assert [r["epoch"] for r in read_metrics(root / "ddp", "epoch")] == list(range(EPOCHS))
    (info,) = read_metrics(root / "ddp", "distributed")
    assert info["world_size"] == 2 and info["per_rank_batch"] == 4


def test_ddp_kill_minus_9_then_resume_matches_the_uninterrupted_ddp_run(runs):
    root, hp = runs
    run = root / "killed"
    save_hparams(hp, run / "config" / "hparams.yaml")
    (root / "kill.py").write_text(KILL_CODE)
    proc = subprocess.Popen(_torchrun("kill.py", "killed"), cwd=root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = [root / f"pid.{r}" for r in range(WORLD)]
    try:
        deadline = time.time() + TIMEOUT_S
        while not ((run / "checkpoints" / "g_00000001").exists() and all(map(Path.exists, pids))):
            assert proc.poll() is None, "training ended before the kill"
            assert time.time() < deadline, f"no checkpoint within {TIMEOUT_S} s"
            time.sleep(0.02)
        for pid in [proc.pid, *(int(p.read_text()) for p in pids)]:  # kill -9 of the whole job
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with folder_lock(run, "test", wait=30):  # the ranks are gone (a dead holder holds no lock)
        pass
    killed_at = max(list_checkpoints(run / "checkpoints"))
    assert killed_at < EPOCHS - 1
    # "--" ends torchrun's options: its --run-path would take --run
    _run(_torchrun("-m", "chlib", "--", "train", "--run", "killed", "--device", "cpu", "--quiet"),
         root)
    last = f"g_{EPOCHS - 1:08d}"
    a = load_generator_state(root / "ddp" / "checkpoints" / last)
    b = load_generator_state(run / "checkpoints" / last)
    diff = _max_diff(a, b)
    print(f"killed after epoch {killed_at}, resumed: max |w - w_uninterrupted| = {diff:.3g}")
    assert diff == 0.0
