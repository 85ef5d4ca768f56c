"""bench/gpu_check.py, the CUDA path check (issue 14, "The CUDA path, checked"), by its CPU dry
run (``--device cpu --quick``): it completes and passes, every check prints its line, a broken
comparison is caught, and a device that is not there is refused with a clear message."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

# one torch thread: on shared cores, spinning OpenMP threads make the run many times slower
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
CHECK_NAMES = ("cqt coverhunter", "cqt nnaudio", "train bf16 vs fp32", "train compile vs eager",
               "train deterministic")
TIMING_NAMES = ("extraction nnaudio", "extraction coverhunter", "training fp32", "identification")


@pytest.fixture(scope="module")
def gpu_check():
    name = "gpu_check_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def quick_hp(gpu_check):
    return gpu_check._hparams(gpu_check.QUICK)


def test_cpu_quick_run_passes_and_prints_every_check(gpu_check, capsys, tmp_path):
    out_json = tmp_path / "out.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name, status in zip(CHECK_NAMES, ("PASS", "PASS", "PASS", "SKIP", "PASS"), strict=True):
        assert f"{status}  {name}: " in out, f"no {status} line for {name!r}:\n{out}"
    for name in TIMING_NAMES:
        assert name in out.split("timings (")[1], f"no timing line for {name!r}:\n{out}"
    assert "summary" in out and "0 check(s) failed" in out
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    assert doc["device"] == "cpu" and doc["quick"] is True
    assert [c["name"] for c in doc["checks"]] == list(CHECK_NAMES)
    # the CQT check compared two different computations (float32 batched vs float64 alone):
    # an exact 0 would mean one side was compared with itself
    for c in doc["checks"][:2]:
        assert 0 < c["figures"]["max_abs_db"] <= c["figures"]["tol_db"]
    assert {t["name"] for t in doc["timings"]} == set(TIMING_NAMES)
    assert all(t["device"] > 0 and t["cpu"] > 0 for t in doc["timings"])


def test_broken_cqt_comparison_fails_with_exit_1(gpu_check, monkeypatch, capsys):
    real = gpu_check.compute_cqt_db_batch

    def off_by_a_tenth(*args, **kwargs):  # the device side 0.1 dB off: above the 0.05 tolerance
        return [db + 0.1 for db in real(*args, **kwargs)]

    monkeypatch.setattr(gpu_check, "compute_cqt_db_batch", off_by_a_tenth)
    rc = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--no-timings"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL  cqt coverhunter: " in out and "FAIL  cqt nnaudio: " in out
    assert "PASS  train bf16 vs fp32: " in out  # the other checks still ran
    assert "2 check(s) failed: cqt coverhunter, cqt nnaudio" in out


def test_broken_bf16_comparison_fails(gpu_check, quick_hp, monkeypatch):
    real = gpu_check._loss_and_grad

    def loss_off_in_bf16(*args, bf16=False, **kwargs):
        loss, grad = real(*args, bf16=bf16, **kwargs)
        return (loss * 1.1, grad) if bf16 else (loss, grad)  # 10 % > the 5 % tolerance

    monkeypatch.setattr(gpu_check, "_loss_and_grad", loss_off_in_bf16)
    check = gpu_check.check_bf16(quick_hp, torch.device("cpu"), gpu_check.QUICK)
    assert check.passed is False and check.figures["rel_loss"] > gpu_check.BF16_REL_TOL
    assert check.line().startswith("FAIL  train bf16 vs fp32: ")


def test_broken_determinism_is_seen(gpu_check, quick_hp, monkeypatch):
    real, calls = gpu_check._three_steps, []

    def second_run_nudged(*args, **kwargs):
        weights = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second run: one weight 1e-6 off
            key = next(k for k, v in weights.items() if v.is_floating_point())
            weights[key] = weights[key] + 1e-6
        return weights

    monkeypatch.setattr(gpu_check, "_three_steps", second_run_nudged)
    check = gpu_check.check_deterministic(quick_hp, torch.device("cpu"), gpu_check.QUICK)
    assert check.passed is False and len(check.figures["differing"]) == 1
    assert check.line().startswith("FAIL  train deterministic: ")


def test_cuda_asked_for_where_none_is_refused_clearly(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = gpu_check.main(["--device", "cuda", "--quick"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "--device cuda cannot be used" in err and "CUDA is not available" in err
    assert "found: cpu" in err and "--device cpu --quick" in err


def test_a_stage_that_raises_is_a_failed_check_and_the_rest_still_run(gpu_check, monkeypatch,
                                                                      capsys):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "check_deterministic", out_of_memory)
    rc = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--no-timings"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL  train deterministic: raised RuntimeError: CUDA out of memory" in out
    assert "PASS  cqt coverhunter: " in out and "summary" in out
