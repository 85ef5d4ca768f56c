"""Feature-extraction benchmark: decode, resample and CQT (both flavours) vs the original's loop.

Run: ``.venv/bin/python bench/bench_extract.py [--minutes 4] [--threads 2]`` (``make bench``).

1. Writes ``--minutes`` of a synthetic tune-like signal (harmonic notes with vibrato over a soft
   noise floor, 44.1 kHz stereo) as 60-second MP3 files into a temporary folder.
2. Times, on the CPU: (a) decoding (soundfile), (b) mono mix + resampling to 16 kHz
   (torchaudio), (c) the CQT in dB of each flavour (chlib.signal.cqt, batched), and (d) the baseline:
   the original CoverHunter algorithm written plainly below (per-frame 16384-point NumPy FFT and
   a scipy.sparse kernel, float64, one frame at a time).
3. Prints seconds per audio-hour per stage, end-to-end totals per flavour, the baseline / ours
   ratio, whether the targets are met (end to end <= 20 s per audio-hour; coverhunter CQT >= 5x
   the baseline) and the agreement with the golden fixture (max |diff| in dB over cells above
   -60 dB).

Wall-clock times on a shared machine vary; CPU seconds (all threads) are printed beside them.
The baseline runs in one process; the original spread files over processes, so on N cores its
throughput is at most N times the figure shown (the "per-core" ratio accounts for that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chlib.core.config import FeatureSettings  # noqa: E402
from chlib.signal.audio import iter_load_audio, peak_normalise, resample, to_mono  # noqa: E402
from chlib.signal.cqt import compute_cqt_db, compute_cqt_db_batch, get_extractor  # noqa: E402

SR_IN = 44100
SR = 16000
TARGET_S_PER_HOUR = 20.0
TARGET_RATIO = 5.0


# ------------------------------------------------------------------------------ test audio


def synth_tune(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A tune-like stereo signal ``[samples, 2]`` float32: notes, harmonics, vibrato, noise."""
    n = int(seconds * sr)
    scale = np.array([0, 2, 4, 5, 7, 9, 11, 12, 14, 16])
    freqs = np.empty(n)
    env = np.empty(n)
    pos = 0
    base = 110.0 * 2 ** rng.integers(0, 3)
    while pos < n:
        dur = int(sr * rng.choice([0.2, 0.3, 0.45, 0.6]))
        end = min(n, pos + dur)
        freqs[pos:end] = base * 2 ** (rng.choice(scale) / 12)
        t = np.arange(end - pos) / sr
        env[pos:end] = np.minimum(1.0, t / 0.02) * np.exp(-2.5 * t)
        pos = end
    t = np.arange(n) / sr
    inst = freqs * (1 + 0.006 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(inst) / sr
    y = np.zeros(n)
    for h in range(1, 7):
        y += np.sin(h * phase) / h * (inst * h < sr / 2)
    y *= env
    bass = 0.4 * np.sin(phase / 2) * env
    noise = rng.standard_normal((n, 2)) * 0.003
    stereo = np.stack([y + bass, 0.8 * y + bass], axis=1) + noise
    return (0.5 * stereo / np.abs(stereo).max()).astype(np.float32)


def write_mp3(path: Path, data: np.ndarray, sr: int, block: int = 1 << 18) -> None:
    """Write MP3 in blocks (libsndfile; one huge write call has crashed for OGG)."""
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=data.shape[1], format="MP3") as f:
        for i in range(0, len(data), block):
            f.write(data[i:i + block])


# ------------------------------------------------------------------------------ baseline


def baseline_kernel(sr: int, fmin: float, n_bins: int, bpo: int) -> scipy.sparse.csc_matrix:
    """The original's spectral kernel, written plainly (sparse, conjugated, / n_fft)."""
    q = 1 / (2 ** (1 / bpo) - 1)
    n_fft = int(2 ** math.ceil(math.log2(q * sr / fmin)))
    rows = np.zeros((n_bins, n_fft), dtype=complex)
    for k in range(n_bins):
        f = fmin * 2 ** (k / bpo)
        length = 2 * round(q * sr / f / 2) + 1
        n = np.arange(-(length - 1) / 2, (length - 1) / 2 + 1)
        left = int((n_fft - length + 1) / 2)
        rows[k, left:left + length] = np.hamming(length) * np.exp(2j * np.pi * q * n / length) / length
    spec = np.fft.fft(rows, axis=1)
    spec[np.abs(spec) < 0.01] = 0
    return scipy.sparse.csc_matrix(np.conjugate(spec) / n_fft)


def baseline_cqt_db(y: np.ndarray, kernel: scipy.sparse.csc_matrix, hop: int) -> np.ndarray:
    """One frame at a time: |kernel x FFT(frame)|, then dB re the track max. [frames, bins]."""
    n_fft = kernel.shape[1]
    frames = len(y) // hop
    padded = np.pad(y.astype(np.float64), (math.ceil((n_fft - hop) / 2), (n_fft - hop) // 2))
    out = np.zeros((kernel.shape[0], frames))
    for j in range(frames):
        out[:, j] = np.abs(kernel @ np.fft.fft(padded[j * hop:j * hop + n_fft]))
    db = 20 * np.log10(out + 1e-9)
    return (db - db.max()).T


# ------------------------------------------------------------------------------ timing


class Timer:
    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def golden_agreement() -> dict[str, float] | None:
    """Max |diff| (dB) over golden cells above -60 dB, per flavour; None if fixtures absent."""
    for shared in (REPO.parent / "shared", REPO / "shared"):
        npz = shared / "fixtures" / "cqt_golden" / "cqt_golden.npz"
        if npz.exists():
            break
    else:
        return None
    from chlib.signal.audio import load_audio

    with np.load(npz) as z:
        gold = {k: z[k] for k in z.files}
    y = peak_normalise(load_audio(npz.parent / "tune.wav", sample_rate=SR))
    out = {}
    for flavour, key in (("coverhunter", "coverhunter"), ("nnaudio", "nnaudio_cqt1992v2")):
        db = compute_cqt_db(y, FeatureSettings(flavour=flavour), device="cpu")
        mask = gold[key] > -60
        out[flavour] = float(np.abs(db - gold[key])[mask].max())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="minutes of test audio (default 4)")
    ap.add_argument("--file-seconds", type=float, default=60.0, help="length of each file")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--batch-size", type=int, default=16, help="tracks per CQT batch")
    ap.add_argument("--decode-workers", type=int, default=2, help="decoding threads (pipeline)")
    ap.add_argument("--repeats", type=int, default=2, help="CQT runs per flavour; the best counts")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n_files = max(1, round(args.minutes * 60 / args.file_seconds))
    lengths = [args.file_seconds] * n_files

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chlib-bench-") as tmp:
        paths = []
        for i, sec in enumerate(lengths):
            p = Path(tmp) / f"tune{i:02d}.mp3"
            write_mp3(p, synth_tune(sec, SR_IN, rng), SR_IN)
            paths.append(p)
        t_made = time.perf_counter() - t_start

        # one-time costs (library initialisation, kernels, resampling plan), not timed below
        warm = Timer()
        with warm:
            data, sr = sf.read(str(paths[0]), dtype="float32", always_2d=True)
            short = peak_normalise(resample(to_mono(data[: 5 * sr]), sr, SR))
            for flavour in ("coverhunter", "nnaudio"):
                compute_cqt_db(short, FeatureSettings(flavour=flavour), device="cpu")
        signals: list[np.ndarray] = []
        decode = resamp = None
        for _ in range(max(1, args.repeats)):
            d_t, r_t, sigs = Timer(), Timer(), []
            for p in paths:
                with d_t:
                    data, sr = sf.read(str(p), dtype="float32", always_2d=True)
                with r_t:
                    sigs.append(peak_normalise(resample(to_mono(data), sr, SR)))
            decode = d_t if decode is None or d_t.wall < decode.wall else decode
            resamp = r_t if resamp is None or r_t.wall < resamp.wall else resamp
            signals = sigs
        get_extractor(FeatureSettings(flavour="coverhunter"), "cpu")
        # the whole path as an extraction job would run it: files decoded by a thread pool
        # (chlib.signal.audio.iter_load_audio) while the CQT runs, batch by batch
        pipeline = Timer()
        with pipeline:
            loaded = [y for _, y, _ in iter_load_audio(paths, sample_rate=SR, normalise=True,
                                                       num_workers=args.decode_workers)]
            compute_cqt_db_batch(loaded, FeatureSettings(flavour="coverhunter"), device="cpu",
                                 batch_size=args.batch_size)
    hours = sum(len(s) for s in signals) / SR / 3600

    res: dict[str, dict] = {"audio_hours": hours, "threads": args.threads, "files": n_files,
                            "warm_up_wall": warm.wall}
    res["decode"] = {"wall": decode.wall, "cpu": decode.cpu}
    res["resample"] = {"wall": resamp.wall, "cpu": resamp.cpu}
    res["pipeline_coverhunter"] = {"wall": pipeline.wall, "cpu": pipeline.cpu}
    ours = {}
    for flavour in ("coverhunter", "nnaudio"):
        settings = FeatureSettings(flavour=flavour)
        best = None
        for _ in range(max(1, args.repeats)):
            t = Timer()
            with t:
                feats = compute_cqt_db_batch(signals, settings, device="cpu",
                                             batch_size=args.batch_size)
            best = t if best is None or t.wall < best.wall else best
        ours[flavour] = feats
        res[f"cqt_{flavour}"] = {"wall": best.wall, "cpu": best.cpu}

    kernel = baseline_kernel(SR, 32.0, 96, 12)
    base = Timer()
    with base:
        base_feats = [baseline_cqt_db(y, kernel, 640) for y in signals]
    res["baseline_cqt"] = {"wall": base.wall, "cpu": base.cpu}
    diffs = [np.abs(a - b)[b > -60].max() for a, b in zip(ours["coverhunter"], base_feats, strict=True)]
    res["coverhunter_vs_baseline_max_db"] = float(max(diffs))
    res["golden_max_db_above_-60"] = golden_agreement()

    # ----------------------------------------------------------------------- report
    def per_hour(sec: float) -> float:
        return sec / hours

    print(f"\nchlib feature-extraction benchmark: {n_files} x {args.file_seconds:.0f} s MP3 "
          f"(44.1 kHz stereo) = {hours * 60:.1f} audio-minutes; torch threads {args.threads}; "
          f"test audio written in {t_made:.1f} s")
    cores = os.cpu_count() or 1
    res["load_average_1min_at_start"] = load0
    print(f"machine: {cores} cores, 1-minute load average {load0:.2f} before the run"
          + ("  [BUSY: other processes compete for the cores; multi-threaded timings suffer most]"
             if load0 > 0.5 else ""))
    print(f"\n{'stage':34s} {'wall s':>8s} {'s/audio-h':>10s} {'cpu s/audio-h':>14s}")
    rows = [("(a) decode mp3 (soundfile)", res["decode"]),
            ("(b) mono + resample 44.1->16 kHz", res["resample"]),
            ("(c) CQT coverhunter (ours, torch)", res["cqt_coverhunter"]),
            ("(c) CQT nnaudio (CQT1992v2)", res["cqt_nnaudio"]),
            ("(d) CQT baseline (NumPy loop)", res["baseline_cqt"])]
    for name, r in rows:
        print(f"{name:34s} {r['wall']:8.2f} {per_hour(r['wall']):10.2f} {per_hour(r['cpu']):14.2f}")
    print(f"one-time start-up per process (library init, CQT kernels, resampling plan): "
          f"{warm.wall:.2f} s, not included above; best of {args.repeats} runs per stage")

    front = res["decode"]["wall"] + res["resample"]["wall"]
    met_all = True
    print("\nend to end from MP3 (decode + resample + CQT), target <= "
          f"{TARGET_S_PER_HOUR:.0f} s per audio-hour:")
    for flavour in ("coverhunter", "nnaudio"):
        total = per_hour(front + res[f"cqt_{flavour}"]["wall"])
        ok = total <= TARGET_S_PER_HOUR
        met_all &= ok
        res[f"end_to_end_{flavour}_s_per_hour"] = total
        print(f"  {flavour:12s} {total:7.2f} s/audio-hour   {'MET' if ok else 'NOT MET'}"
              "   (sum of the stages, one file at a time)")
    pipe = per_hour(res["pipeline_coverhunter"]["wall"])
    print(f"  coverhunter  {pipe:7.2f} s/audio-hour   (measured: iter_load_audio with "
          f"{args.decode_workers} decoding threads + compute_cqt_db_batch)")
    print(f"\nCQT speed-up over the baseline (baseline / ours), target >= {TARGET_RATIO:.0f}x:")
    for flavour in ("coverhunter", "nnaudio"):
        ratio = res["baseline_cqt"]["wall"] / res[f"cqt_{flavour}"]["wall"]
        per_core = ratio / args.threads
        res[f"ratio_{flavour}"] = ratio
        ok = ratio >= TARGET_RATIO
        if flavour == "coverhunter":
            met_all &= ok
        print(f"  {flavour:12s} {ratio:6.1f}x  (vs the baseline on {args.threads} processes: "
              f"{per_core:.1f}x)   {'MET' if ok else 'NOT MET'}"
              + ("" if flavour == "coverhunter" else "   [other algorithm: for scale only]"))
    print(f"\nagreement: ours (coverhunter, float32) vs baseline (float64) on the bench audio: "
          f"max |diff| {res['coverhunter_vs_baseline_max_db']:.4f} dB on cells above -60 dB")
    gold = res["golden_max_db_above_-60"]
    if gold is None:
        print("golden fixture not found (../shared/fixtures/cqt_golden): agreement not checked")
    else:
        print("golden fixture, max |diff| on cells above -60 dB: "
              + ", ".join(f"{k} {v:.4f} dB" for k, v in gold.items())
              + f"   {'OK' if gold['coverhunter'] < 0.05 and gold['nnaudio'] < 0.05 else 'FAIL'}")
    print(f"\nbenchmark run time {time.perf_counter() - t_start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 1 if (args.strict and not met_all) else 0


if __name__ == "__main__":
    raise SystemExit(main())
