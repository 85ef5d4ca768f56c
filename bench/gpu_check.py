"""The CUDA path, checked (issue 14): chlib's numbers on a GPU agree with the CPU, and how fast.

Run: ``.venv/bin/python bench/gpu_check.py [--device cuda] [--quick] [--json out.json]``
(``make gpu-check``). ``--device cpu --quick`` is the dry run the tests use: the same code path
with tiny sizes, so the script cannot rot on machines without a GPU.

Checks (each one line, PASS / FAIL / SKIP with its numbers; exit status 1 if any FAILs):

1. **CQT, device vs CPU**, both flavours, on seconds of synthetic tune-like audio
   (``bench_extract.synth_tune``): two signals of different lengths, batched and zero-padded on
   the device by :func:`compute_cqt_db_batch` (float32), against each signal alone on the CPU by
   :func:`compute_cqt_db` in float64 (``nnaudio``: nnAudio's kernels cast to float64). Max
   |difference| over cells above -60 dB must be <= 0.05 dB: the agreement the golden fixtures
   are held to (``bench_extract.py``); float32 rounding gives ~0.001 dB, a wrong padding, kernel
   or dtype path gives tenths of a dB or more.
2. **Training step** of ``CoverHunterNet`` at the laptop recipe's sizes (model block, batch
   ``batch_size`` = works x ``m_per_class``, chunks of ``chunk_frame[0]`` frames of
   ``input_dim`` bins), loss + backward as :func:`chlib.train.loop._train_step` makes them:

   * **bf16 autocast vs fp32**: total loss and global gradient norm within 5e-2 relative, and
     gradient cosine >= 0.99. bf16 keeps 8 significant bits (relative rounding 4e-3 per
     operation); on the CPU's bf16 kernels the recipe's step differs by ~1e-5..1e-4 in the loss,
     ~4e-4 in the gradient norm, cosine 0.998. The bounds leave room for other kernels' bf16
     accumulation and still fail a real fault (a loss or softmax left in bf16, a wrong cast).
   * **torch.compile vs eager fp32**: the first step's loss within 1e-4 relative (fused kernels
     reorder float32 sums: ~1e-6; a wrong graph is off by far more). On CUDA by default; on
     cpu/mps only with ``--compile`` (it needs a C++ compiler and minutes).
   * **deterministic mode**: two runs of 3 AdamW steps (dropout on, grad clip, the recipe's
     chunk lengths in turn) from the same seed inside the loop's own ``deterministic: true``
     context must give bit-identical weights; operations that have no deterministic kernel
     (the loop's flags only warn) are named in the line.

   Dropout is off in the first two (its random masks depend on the kernel that draws them, so
   they would differ for reasons that are not numerics); matmuls run at "highest" float32
   precision (no TF32) on both sides.
3. **Timings**, each printed with the same figure measured on the CPU in this run (on less
   work) and their ratio: extraction in seconds per audio-hour end to end from decoded audio
   (16 kHz mono arrays in memory -> device -> CQT in dB -> back in host memory; decoding and
   resampling are CPU stages, timed by ``bench_extract.py``), target <= 0.45 s per audio-hour;
   training chunks/s on pre-made batches at the recipe's chunk lengths in turn (fp32, and bf16
   on CUDA), target >= 300; identification queries/s through :func:`identify` (WAV files ->
   decode -> CQT -> keyed chroma windows -> embeddings -> search of a reference index). Targets
   are judged at full sizes only and reported MET / NOT MET; they change the exit status only
   with ``--strict``.

A stage that raises (out of memory, a driver error) is a FAIL line naming the error; the other
stages still run. ``--threads N`` sets torch's CPU threads (the tests use 1: on shared cores
spinning OpenMP threads slow everything down many times).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_extract import synth_tune  # noqa: E402

from chlib.core.config import FeatureSettings, HParams  # noqa: E402
from chlib.core.device import pick_device, synchronize  # noqa: E402
from chlib.core.errors import ConfigError  # noqa: E402
from chlib.model import CoverHunterNet  # noqa: E402
from chlib.model.checkpoint import model_fingerprint  # noqa: E402
from chlib.retrieval.embed import hp_window_settings  # noqa: E402
from chlib.retrieval.identify import identify  # noqa: E402
from chlib.retrieval.index import index_from_windows  # noqa: E402
from chlib.signal.audio import to_mono  # noqa: E402
from chlib.signal.cqt import (  # noqa: E402
    CQTExtractor,
    amplitude_to_db,
    compute_cqt_db,
    compute_cqt_db_batch,
)
from chlib.train.loop import _deterministic  # noqa: E402  (the loop's own deterministic flags)
from chlib.train.runs import load_recipe  # noqa: E402

SR = 16000
CQT_TOL_DB = 0.05  # max |dB difference| over cells above -60 dB (the golden fixtures' bound)
CQT_FLOOR_DB = -60.0
BF16_REL_TOL = 5e-2  # loss and gradient norm, bf16 autocast vs fp32
BF16_MIN_COSINE = 0.99  # gradient direction, bf16 autocast vs fp32
COMPILE_REL_TOL = 1e-4  # first step's loss, torch.compile vs eager fp32
DETERMINISTIC_STEPS = 3
TARGET_EXTRACT_S_PER_HOUR = 0.45  # one modern GPU
TARGET_TRAIN_CHUNKS_PER_S = 300.0
N_WORKS = 200  # focal-head classes: the recipe's benchmark trains 200 works


@dataclass(frozen=True)
class Sizes:
    """How much work each part does (device side, and the CPU reference of the timings)."""

    cqt_seconds: tuple[float, float]  # the two signals of the CQT check
    chunk_frame: list[int] | None  # None: the recipe's
    batch_size: int | None  # None: the recipe's
    n_works: int  # focal-head classes
    extract_tracks: int  # tracks x seconds for the extraction timing, on the device
    extract_track_s: float
    cpu_extract_tracks: int  # ... and on the CPU
    cpu_extract_track_s: float
    train_steps: int  # timed training steps, on the device
    cpu_train_steps: int  # ... and on the CPU
    n_queries: int  # identification queries, on the device
    cpu_n_queries: int  # ... and on the CPU
    query_s: float  # seconds per query
    n_refs: int  # recordings in the reference index


FULL = Sizes(cqt_seconds=(8.0, 5.3), chunk_frame=None, batch_size=None, n_works=N_WORKS,
             extract_tracks=12, extract_track_s=300.0, cpu_extract_tracks=1,
             cpu_extract_track_s=120.0, train_steps=30, cpu_train_steps=3, n_queries=32,
             cpu_n_queries=4, query_s=120.0, n_refs=2000)
QUICK = Sizes(cqt_seconds=(3.0, 2.1), chunk_frame=[40, 30], batch_size=8, n_works=8,
              extract_tracks=2, extract_track_s=6.0, cpu_extract_tracks=1,
              cpu_extract_track_s=6.0, train_steps=2, cpu_train_steps=1, n_queries=2,
              cpu_n_queries=1, query_s=8.0, n_refs=40)


@dataclass
class Check:
    """One comparison: ``passed`` None = skipped (``detail`` says why)."""

    name: str
    passed: bool | None
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        return f"{self.status}  {self.name}: {self.detail}"


@dataclass
class Timing:
    """One speed figure on the device and on the CPU; ``higher_better`` for rates."""

    name: str
    unit: str
    device: float
    cpu: float
    target: float | None = None
    higher_better: bool = True

    @property
    def speedup(self) -> float:
        """How many times faster the device is than the CPU."""
        if self.higher_better:
            return self.device / self.cpu if self.cpu > 0 else math.inf
        return self.cpu / self.device if self.device > 0 else math.inf

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.device >= self.target if self.higher_better else self.device <= self.target

    def line(self, device: str) -> str:
        target = "" if self.target is None else (
            f"   target {'>=' if self.higher_better else '<='} {self.target:g}: "
            f"{'MET' if self.met else 'NOT MET'}")
        return (f"{self.name:34s} {device} {self.device:10.3f}  cpu {self.cpu:10.3f} {self.unit}"
                f"   x{self.speedup:.1f} the CPU{target}")


# ------------------------------------------------------------------------------ set-up


def _refuse_message(name: str, error: Exception) -> str:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    found = ["cpu"] + (["mps"] if mps else []) + (
        [f"cuda ({torch.cuda.device_count()} device(s))"] if torch.cuda.is_available() else [])
    return (f"gpu_check: --device {name} cannot be used: {error}\n"
            f"found: {', '.join(found)}; torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}.\n"
            "Run it on a machine with that device, or do the dry run: --device cpu --quick")


def _hparams(sizes: Sizes) -> HParams:
    """The laptop recipe (its model, batch and chunk lengths), shrunk by ``sizes`` for --quick."""
    recipe = load_recipe("laptop")
    # no data here, so no test sets: early stopping on mAP needs one (irrelevant to one step)
    recipe.update(early_stop_metric="val_loss", map_stopping_testsets=[])
    hp = HParams.from_dict(recipe, where="recipe laptop")
    over: dict[str, Any] = {}
    if sizes.chunk_frame is not None:
        over["chunk_frame"] = list(sizes.chunk_frame)
    if sizes.batch_size is not None:
        over["batch_size"] = sizes.batch_size
    return hp.updated(over) if over else hp


def _signals(seconds: list[float], seed: int) -> list[np.ndarray]:
    """Tune-like mono 16 kHz float32 signals (notes, harmonics, vibrato, a little noise)."""
    rng = np.random.default_rng(seed)
    return [to_mono(synth_tune(s, SR, rng)) for s in seconds]


def _model(hp: HParams, n_works: int, device: torch.device, *, seed: int,
           dropout: float | None = None) -> CoverHunterNet:
    torch.manual_seed(seed)
    cfg = hp.model_config(n_works)
    if dropout is not None:
        cfg = replace(cfg, dropout=dropout)
    return CoverHunterNet(cfg).to(device).train()


def _batch(hp: HParams, frames: int, n_works: int, device: torch.device,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input ``x [batch, frames, input_dim]`` (dB-like values) and labels ``[batch]``,
    ``m_per_class`` chunks per work, as the sampler makes them."""
    bsz, m = hp.batch_size, hp.m_per_class
    x = torch.randn(bsz, frames, hp.model.input_dim, generator=gen) * 12.0 - 30.0
    y = (torch.arange(bsz) // m) % n_works
    return x.to(device), y.to(device)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _loss_and_grad(model: CoverHunterNet, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                   *, bf16: bool = False) -> tuple[float, torch.Tensor]:
    """Total loss of one forward pass and the flat float32 gradient of every parameter (zeros
    where a parameter gets none)."""
    model.zero_grad(set_to_none=True)
    with _autocast(x.device, bf16):
        total, _ = loss_fn(x, y)
    total.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                      for p in model.parameters()])
    return float(total.detach()), grad.detach()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ------------------------------------------------------------------------------ 1. CQT


def _nnaudio_float64_db(y: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """The ``nnaudio`` flavour of one signal in float64 arithmetic on the CPU (nnAudio's own
    kernels, cast up; chlib's path is float32 only): the reference for the device's float32."""
    impl = CQTExtractor(settings, device="cpu").impl.double()  # a private copy, not the cache's
    with torch.no_grad():
        padded = impl.pad_one(torch.from_numpy(np.asarray(y, dtype=np.float64)))[None]
        mag = impl.cqt(padded).transpose(1, 2)[0]  # [frames, bins]
    return amplitude_to_db(mag.numpy())


def check_cqt(device: torch.device, sizes: Sizes) -> list[Check]:
    """Both flavours: batched float32 on ``device`` vs each signal alone in float64 on the CPU."""
    signals = _signals(list(sizes.cqt_seconds), seed=1)
    checks = []
    for flavour in ("coverhunter", "nnaudio"):
        settings = FeatureSettings(flavour=flavour)
        refs = [compute_cqt_db(y, settings, device="cpu", dtype=torch.float64)
                if flavour == "coverhunter" else _nnaudio_float64_db(y, settings)
                for y in signals]
        tested = compute_cqt_db_batch(signals, settings, device=device, batch_size=len(signals))
        worst, cells = 0.0, 0
        for ref, got in zip(refs, tested, strict=True):
            if ref.shape != got.shape:
                worst = math.inf
                break
            mask = ref > CQT_FLOOR_DB
            cells += int(mask.sum())
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref)[mask].max()))
        checks.append(Check(
            f"cqt {flavour}", worst <= CQT_TOL_DB,
            f"{device.type} batched float32 vs cpu float64 per signal: max |diff| "
            f"{worst:.4f} dB over {cells} cells above {CQT_FLOOR_DB:g} dB (tolerance "
            f"{CQT_TOL_DB} dB)", {"max_abs_db": worst, "cells": cells, "tol_db": CQT_TOL_DB}))
    return checks


# ------------------------------------------------------------------------------ 2. training


def check_bf16(hp: HParams, device: torch.device, sizes: Sizes) -> Check:
    if device.type == "mps":
        return Check("train bf16 vs fp32", None, "the loop uses bf16 autocast on CUDA only")
    gen = torch.Generator().manual_seed(2)
    x, y = _batch(hp, hp.chunk_frame[0], sizes.n_works, device, gen)
    model = _model(hp, sizes.n_works, device, seed=3, dropout=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss32, g32 = _loss_and_grad(model, model.compute_loss, x, y)
    model.load_state_dict(state)  # BatchNorm running stats as before the fp32 pass
    loss16, g16 = _loss_and_grad(model, model.compute_loss, x, y, bf16=True)
    n32, n16 = float(g32.norm()), float(g16.norm())
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    r_loss, r_norm = _rel(loss16, loss32), _rel(n16, n32)
    ok = r_loss <= BF16_REL_TOL and r_norm <= BF16_REL_TOL and cos >= BF16_MIN_COSINE
    return Check("train bf16 vs fp32", ok,
                 f"loss {loss32:.5f} vs {loss16:.5f} (rel {r_loss:.2e}), grad norm {n32:.4f} vs "
                 f"{n16:.4f} (rel {r_norm:.2e}), grad cosine {cos:.5f} (tolerance rel "
                 f"{BF16_REL_TOL:g}, cosine >= {BF16_MIN_COSINE})",
                 {"loss_fp32": loss32, "loss_bf16": loss16, "rel_loss": r_loss,
                  "grad_norm_fp32": n32, "grad_norm_bf16": n16, "rel_grad_norm": r_norm,
                  "grad_cosine": cos})


def check_compile(hp: HParams, device: torch.device, sizes: Sizes, wanted: bool) -> Check:
    if not wanted:
        return Check("train compile vs eager", None,
                     f"torch.compile not requested on {device.type} (--compile runs it)")
    gen = torch.Generator().manual_seed(4)
    x, y = _batch(hp, hp.chunk_frame[0], sizes.n_works, device, gen)
    eager = _model(hp, sizes.n_works, device, seed=5, dropout=0.0)
    compiled = _model(hp, sizes.n_works, device, seed=5, dropout=0.0)
    loss_e, g_e = _loss_and_grad(eager, eager.compute_loss, x, y)
    t0 = time.perf_counter()
    try:
        loss_c, g_c = _loss_and_grad(compiled, torch.compile(compiled.compute_loss), x, y)
    except Exception as e:  # a compiler that cannot build is a failed check, with its reason
        return Check("train compile vs eager", False,
                     f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    took = time.perf_counter() - t0
    r_loss = _rel(loss_c, loss_e)
    r_grad = float((g_c - g_e).norm() / g_e.norm().clamp(min=1e-12))
    return Check("train compile vs eager", r_loss <= COMPILE_REL_TOL,
                 f"first-step loss {loss_e:.7f} eager vs {loss_c:.7f} compiled (rel "
                 f"{r_loss:.2e}, tolerance {COMPILE_REL_TOL:g}); gradient rel diff {r_grad:.2e} "
                 f"(for information); compile + first step {took:.1f} s",
                 {"loss_eager": loss_e, "loss_compiled": loss_c, "rel_loss": r_loss,
                  "rel_grad": r_grad, "compile_s": took})


def _three_steps(hp: HParams, device: torch.device, sizes: Sizes) -> dict[str, torch.Tensor]:
    model = _model(hp, sizes.n_works, device, seed=hp.seed)  # dropout as configured
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=hp.learning_rate, betas=(hp.adam_b1, hp.adam_b2),
                            weight_decay=hp.weight_decay)
    gen = torch.Generator().manual_seed(hp.seed)
    for step in range(DETERMINISTIC_STEPS):
        x, y = _batch(hp, hp.chunk_frame[step % len(hp.chunk_frame)], sizes.n_works, device, gen)
        opt.zero_grad(set_to_none=True)
        total, _ = model.compute_loss(x, y)
        total.backward()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
    synchronize(device)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def check_deterministic(hp: HParams, device: torch.device, sizes: Sizes) -> Check:
    # the loop's flags warn (warn_only) for an operation without a deterministic kernel: those
    # warnings name the culprit when the weights differ
    with warnings.catch_warnings(record=True) as caught, _deterministic(True, device):
        warnings.simplefilter("always")
        a = _three_steps(hp, device, sizes)
        b = _three_steps(hp, device, sizes)
    nondet = sorted({str(w.message).split(" does not have a deterministic")[0][:80]
                     for w in caught if "deterministic" in str(w.message)})
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in differ), default=0.0)
    return Check("train deterministic", not differ,
                 f"two runs of {DETERMINISTIC_STEPS} steps from seed {hp.seed}: "
                 f"{len(a) - len(differ)}/{len(a)} tensors identical"
                 + (f", max |diff| {worst:.3e} (first: {differ[0]})" if differ else "")
                 + (f"; without a deterministic kernel: {', '.join(nondet)}" if nondet else ""),
                 {"tensors": len(a), "differing": differ, "max_abs_diff": worst,
                  "nondeterministic_ops": nondet})


# ------------------------------------------------------------------------------ 3. timings


def time_extraction(signals: list[np.ndarray], flavour: str, device: torch.device) -> float:
    """Seconds per audio-hour: host arrays -> ``device`` -> CQT dB -> host arrays (warmed up)."""
    settings = FeatureSettings(flavour=flavour)
    compute_cqt_db_batch([signals[0][: 10 * SR]], settings, device=device)  # kernels, cuFFT plans
    synchronize(device)
    t0 = time.perf_counter()
    compute_cqt_db_batch(signals, settings, device=device, batch_size=16)
    synchronize(device)
    hours = sum(len(y) for y in signals) / SR / 3600
    return (time.perf_counter() - t0) / hours


def time_training(hp: HParams, device: torch.device, sizes: Sizes, steps: int, *,
                  bf16: bool = False) -> float:
    """Chunks per second of training steps on pre-made batches, the recipe's chunk lengths in
    turn (one untimed warm-up step per length)."""
    model = _model(hp, sizes.n_works, device, seed=6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=hp.learning_rate, betas=(hp.adam_b1, hp.adam_b2),
                            weight_decay=hp.weight_decay)
    gen = torch.Generator().manual_seed(7)
    batches = [_batch(hp, frames, sizes.n_works, device, gen) for frames in hp.chunk_frame]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            total, _ = model.compute_loss(x, y)
        total.backward()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()

    for x, y in batches:
        step(x, y)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    synchronize(device)
    return steps * hp.batch_size / (time.perf_counter() - t0)


def time_identification(hp: HParams, device: torch.device, sizes: Sizes, wavs: list[Path]
                        ) -> float:
    """Queries per second of :func:`identify` over ``wavs`` against a reference index of
    ``sizes.n_refs`` recordings (random unit windows: the search costs the same)."""
    model = _model(hp, sizes.n_works, device, seed=8).eval()
    rng = np.random.default_rng(9)
    dim = model.cfg.embed_dim
    windows = [rng.standard_normal((4, dim)).astype(np.float32) for _ in range(sizes.n_refs)]
    records = [{"perf": f"ref{i}", "work": f"work{i // 4}", "work_id": i // 4}
               for i in range(sizes.n_refs)]
    index = index_from_windows(records, windows, model_fingerprint=model_fingerprint(
        model.state_dict()), feature_settings=hp.features, window_settings=hp_window_settings(hp),
        rule=hp.distance_rule, n_pairs=min(20_000, 10 * sizes.n_refs))
    identify(wavs[:1], model=model, hp=hp, index=index, device=device)  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    report = identify(wavs, model=model, hp=hp, index=index, device=device)
    synchronize(device)
    if report.errors:
        raise ConfigError(f"identification failed on synthetic queries: {report.errors[0]}")
    return len(wavs) / (time.perf_counter() - t0)


def _write_queries(folder: Path, n: int, seconds: float, seed: int) -> list[Path]:
    paths = []
    for i, y in enumerate(_signals([seconds] * n, seed)):
        p = folder / f"query{i:03d}.wav"
        sf.write(str(p), y, SR, subtype="PCM_16")
        paths.append(p)
    return paths


def run_timings(hp: HParams, device: torch.device, sizes: Sizes) -> list[Timing]:
    """Extraction, training and identification speed on ``device`` and on the CPU; the targets
    are judged at full sizes only (--quick chunks and batches are far from the recipe's)."""
    cpu = torch.device("cpu")
    extract_target, train_target = ((None, None) if sizes is QUICK else
                                    (TARGET_EXTRACT_S_PER_HOUR, TARGET_TRAIN_CHUNKS_PER_S))
    dev_audio = _signals([sizes.extract_track_s] * sizes.extract_tracks, seed=10)
    cpu_audio = _signals([sizes.cpu_extract_track_s] * sizes.cpu_extract_tracks, seed=11)
    out = []
    for flavour in ("nnaudio", "coverhunter"):
        out.append(Timing(f"extraction {flavour}", "s/audio-hour",
                          time_extraction(dev_audio, flavour, device),
                          time_extraction(cpu_audio, flavour, cpu),
                          extract_target, higher_better=False))
    cpu_train = time_training(hp, cpu, sizes, sizes.cpu_train_steps)
    out.append(Timing("training fp32", "chunks/s",
                      time_training(hp, device, sizes, sizes.train_steps), cpu_train,
                      train_target))
    if device.type == "cuda":
        out.append(Timing("training bf16 autocast", "chunks/s",
                          time_training(hp, device, sizes, sizes.train_steps, bf16=True),
                          cpu_train, train_target))
    with tempfile.TemporaryDirectory(prefix="chlib-gpucheck-") as tmp:
        wavs = _write_queries(Path(tmp), max(sizes.n_queries, sizes.cpu_n_queries),
                              sizes.query_s, seed=12)
        out.append(Timing("identification", "queries/s",
                          time_identification(hp, device, sizes, wavs[: sizes.n_queries]),
                          time_identification(hp, cpu, sizes, wavs[: sizes.cpu_n_queries])))
    return out


# ------------------------------------------------------------------------------ main


def _guarded(label: str, make: Callable[[], list[Check]]) -> list[Check]:
    """``make()``, or one failed check naming the error it raised (so one broken stage on a
    device, e.g. out of memory, does not hide the others)."""
    try:
        return make()
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:300]
        return [Check(label, False, f"raised {type(e).__name__}: {first}")]


def _summary(checks: list[Check], timings: list[Timing], device: torch.device) -> str:
    rows = [f"{'check':26s} {'result':6s}"] + [f"{c.name:26s} {c.status:6s}" for c in checks]
    if timings:
        rows += ["", f"{'timing':26s} {device.type:>12s} {'cpu':>12s} {'x cpu':>8s}  target"]
    for t in timings:
        target = "-" if t.target is None else (
            f"{'>=' if t.higher_better else '<='} {t.target:g} "
            f"{'MET' if t.met else 'NOT MET'}")
        rows.append(f"{t.name:26s} {t.device:12.3f} {t.cpu:12.3f} {t.speedup:8.1f}  {target}"
                    f"  ({t.unit})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, mps or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the tests' dry run)")
    ap.add_argument("--compile", action="store_true",
                    help="also check torch.compile off CUDA (on CUDA it always runs)")
    ap.add_argument("--no-timings", action="store_true", help="only the agreement checks")
    ap.add_argument("--strict", action="store_true", help="a missed timing target fails too")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ConfigError as e:
        print(_refuse_message(args.device, e), file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    """The checks, the timings and the summary; the exit status."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    sizes = QUICK if args.quick else FULL
    hp = _hparams(sizes)
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the agreement checks
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"chlib GPU check on {device} ({name or device.type}); torch {torch.__version__}, "
          f"{'quick' if args.quick else 'full'} sizes: batch {hp.batch_size} x chunks "
          f"{hp.chunk_frame} frames x {hp.model.input_dim} bins, {hp.model.num_blocks} blocks; "
          f"{torch.get_num_threads()} CPU thread(s)",
          flush=True)
    t_start = time.perf_counter()
    checks: list[Check] = []
    try:
        stages: list[tuple[str, Callable[[], list[Check]]]] = [
            ("cqt", lambda: check_cqt(device, sizes)),
            ("train bf16 vs fp32", lambda: [check_bf16(hp, device, sizes)]),
            ("train compile vs eager", lambda: [check_compile(
                hp, device, sizes, args.compile or device.type == "cuda")]),
            ("train deterministic", lambda: [check_deterministic(hp, device, sizes)])]
        for label, make in stages:
            for c in _guarded(label, make):
                checks.append(c)
                print(c.line(), flush=True)
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    timings: list[Timing] = []
    if not args.no_timings:
        try:
            timings = run_timings(hp, device, sizes)
        except Exception as e:  # out of memory, a driver error: reported, the summary still comes
            checks.append(Check("timings", False, f"raised {type(e).__name__}: {e}"))
            print(checks[-1].line(), flush=True)
    if timings:
        print("\ntimings (the CPU on less work, in the same run"
              + ("; no targets at --quick sizes" if args.quick else "") + "):")
        for t in timings:
            print(t.line(device.type), flush=True)
    failed = [c.name for c in checks if c.passed is False]
    missed = [t.name for t in timings if t.met is False]
    print("\nsummary\n" + _summary(checks, timings, device))
    print(f"\n{len(failed)} check(s) failed" + (f": {', '.join(failed)}" if failed else "")
          + f"; {len(missed)} timing target(s) not met"
          + (" (fail with --strict)" if missed and not args.strict else "")
          + f"; {time.perf_counter() - t_start:.1f} s")
    if args.json:
        doc = {"device": str(device), "device_name": name, "torch": torch.__version__,
               "quick": args.quick,
               "checks": [{"name": c.name, "status": c.status, "detail": c.detail,
                           "figures": c.figures} for c in checks],
               "timings": [{"name": t.name, "unit": t.unit, "device": t.device, "cpu": t.cpu,
                            "speedup": t.speedup, "target": t.target, "met": t.met}
                           for t in timings]}
        args.json.write_text(json.dumps(doc, indent=2, default=float) + "\n", encoding="utf-8")
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
