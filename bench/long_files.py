"""Memory on long files: peak RSS of extraction and identification for 2- and 10-hour recordings.

Run: ``.venv/bin/python bench/long_files.py [--hours 2 10] [--stereo-hours 2] [--out DIR]``
(``make bench`` runs ``--hours 2``).

1. Writes, into ``--out`` (default: a new folder under /tmp, removed afterwards unless
   ``--keep``), one tune-like 16 kHz mono WAV per ``--hours`` value, one 44.1 kHz stereo WAV of
   ``--stereo-hours`` (0: none) and nine 30-second clips.
2. For each long file, each case in a fresh subprocess: ``extract`` (chlib.data.extract.
   extract_dataset on a tiny dataset holding the long file plus the nine clips, decoding in the
   default 2 worker processes) and ``identify`` (chlib.retrieval.identify.query_features: decode,
   peak-normalise and chlib.signal.cqt.compute_cqt_db, as identification does). ``import`` is the
   same subprocess doing nothing after its imports (the floor under every figure).
3. Prints wall time and peak RSS per case: the subprocess itself and its decoding workers, from
   ``resource.getrusage`` (RUSAGE_SELF and RUSAGE_CHILDREN ``ru_maxrss``), and the ratios to the
   targets: a 2-hour file in <= 1.5 GB peak RSS, a 10-hour file within a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_2H_GB = 1.5
MACHINE_GB = 24.0
GB = 1e9
N_CLIPS = 9


def synth_block(seconds: float, sr: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Tune-like audio ``[samples, channels]`` float32: notes with harmonics, a little noise."""
    n = int(round(seconds * sr))
    lengths = rng.choice([0.25, 0.35, 0.5], size=int(seconds / 0.25) + 2)
    starts = np.concatenate([[0], np.cumsum((lengths * sr).astype(int))])
    note = np.searchsorted(starts, np.arange(n), side="right") - 1
    freq = (110.0 * 2 ** (rng.integers(0, 24, size=len(lengths)) / 12))[note]
    t = (np.arange(n) - starts[note]) / sr
    phase = 2 * np.pi * np.cumsum(freq) / sr
    y = sum(np.sin(h * phase) / h for h in (1, 2, 3, 4)) * np.exp(-3.0 * t)
    out = 0.3 * y[:, None] * np.linspace(1.0, 0.8, channels)[None]
    out += 0.003 * rng.standard_normal((n, channels))
    return out.astype(np.float32)


def write_long_wav(path: Path, hours: float, sr: int, channels: int, seed: int = 0) -> Path:
    """Write ``hours`` of :func:`synth_block` audio as 16-bit WAV, a minute at a time."""
    rng = np.random.default_rng(seed)
    left = int(round(hours * 3600 * sr))
    with sf.SoundFile(path, "w", samplerate=sr, channels=channels, subtype="PCM_16") as f:
        while left > 0:
            block = synth_block(min(60.0, left / sr), sr, channels, rng)
            f.write(block)
            left -= len(block)
    return path


def write_dataset(folder: Path, long_wav: Path, clips: list[Path], flavour: str) -> Path:
    """A dataset folder: dataset.txt with the long file and the clips, hparams.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"perf": "long", "wav": str(long_wav), "work": "W0",
              "dur_s": round(sf.info(str(long_wav)).duration, 2)}]
    lines += [{"perf": f"clip{i}", "wav": str(c), "work": f"W{i // 2}", "dur_s": 30.0}
              for i, c in enumerate(clips)]
    (folder / "dataset.txt").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "hparams.yaml").write_text(f"cqt_flavour: {flavour}\n")
    return folder


def run_case(case: str, target: Path, flavour: str, device: str) -> dict:
    """Run one case in this process (the subprocess side); return its figures."""
    t0 = time.perf_counter()
    from types import SimpleNamespace

    from chlib.core.config import FeatureSettings
    from chlib.data.extract import extract_dataset
    from chlib.retrieval.identify import query_features

    t_import = time.perf_counter() - t0
    # children before the case: none of ours (a fork at import time may show here); after it:
    # the decoding workers, reaped when the pool closes
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    info: dict = {}
    if case == "extract":
        report = extract_dataset(target, device=device, progress=False)
        info = {"n_ok": report.n_ok, "skipped": [s["reason"] for s in report.skipped]}
    elif case == "identify":
        feat = query_features(target, SimpleNamespace(features=FeatureSettings(flavour=flavour)),
                              device=device)
        info = {"frames": int(feat.shape[0])}
    elif case != "import":
        raise SystemExit(f"unknown case {case!r}")
    kib = 1024  # ru_maxrss is in KiB on Linux
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"case": case, "seconds": time.perf_counter() - t0, "import_s": t_import,
            "rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
            "rss_workers": after * kib if after > before else 0, **info}


def measure(case: str, target: Path, flavour: str, device: str, timeout_s: float) -> dict:
    """:func:`run_case` in a fresh Python process; its JSON result (or the failure)."""
    cmd = [sys.executable, __file__, "--child", case, str(target), "--flavour", flavour,
           "--device", device]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    out["peak"] = max(out["rss_self"], out["rss_workers"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, nargs="+", default=[2.0],
                    help="lengths of the 16 kHz mono files (default: 2)")
    ap.add_argument("--stereo-hours", type=float, default=2.0,
                    help="length of the 44.1 kHz stereo file (0: none; default 2)")
    ap.add_argument("--cases", nargs="+", default=["extract", "identify"],
                    choices=["extract", "identify"])
    ap.add_argument("--flavour", default="nnaudio", choices=["nnaudio", "coverhunter"])
    ap.add_argument("--device", default="auto", help="CQT device (default: auto)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the test files")
    ap.add_argument("--keep", action="store_true", help="keep the test files")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child[0], Path(args.child[1]), args.flavour, args.device)))
        return 0

    out = args.out or Path(tempfile.mkdtemp(prefix="chlib_long_files_", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"test files in {out} (flavour {args.flavour}, device {args.device})")
    rng = np.random.default_rng(1)
    clips = []
    for i in range(N_CLIPS):
        clips.append(out / f"clip{i}.wav")
        sf.write(clips[-1], synth_block(30.0, 16000, 1, rng), 16000, subtype="PCM_16")
    files = [(h, 16000, 1) for h in args.hours]
    files += [(args.stereo_hours, 44100, 2)] if args.stereo_hours > 0 else []
    rows: list[dict] = []
    floor = measure("import", out, args.flavour, args.device, args.timeout)
    print(f"floor: python + chlib imports: {floor.get('peak', 0) / GB:.2f} GB peak RSS")
    for hours, sr, channels in files:
        name = f"long_{hours:g}h_{sr // 1000}k_{'stereo' if channels > 1 else 'mono'}"
        wav = out / f"{name}.wav"
        t0 = time.perf_counter()
        if not wav.exists():
            write_long_wav(wav, hours, sr, channels)
        print(f"\n{name}: {wav.stat().st_size / GB:.2f} GB on disk "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        for case in args.cases:
            target = wav
            if case == "extract":
                target = write_dataset(out / f"ds_{name}", wav, clips, args.flavour)
                shutil.rmtree(target / "cqt_feat", ignore_errors=True)  # no cache hits
            res = {"file": name, "hours": hours, "sample_rate": sr, "channels": channels,
                   **measure(case, target, args.flavour, args.device, args.timeout)}
            rows.append(res)
            if "error" in res:
                print(f"  {case:8s} FAILED: {res['error']}")
                continue
            limit = TARGET_2H_GB if hours <= 2 else MACHINE_GB
            res["target_gb"], res["ok"] = limit, res["peak"] / GB <= limit
            extra = (f", {res['n_ok']} items ok, {len(res['skipped'])} skipped"
                     if case == "extract" else f", {res['frames']} frames")
            workers = (f", decode workers {res['rss_workers'] / GB:.2f}" if res["rss_workers"]
                       else "")
            print(f"  {case:8s} {res['seconds']:7.1f} s   peak RSS {res['peak'] / GB:5.2f} GB "
                  f"(main {res['rss_self'] / GB:.2f}{workers})   "
                  f"{res['peak'] / GB / limit:4.2f} x the "
                  f"{limit:g} GB target: {'ok' if res['ok'] else 'MISSED'}{extra}")
    if args.json:
        args.json.write_text(json.dumps({"floor": floor, "rows": rows}, indent=1))
    if not args.keep and args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    missed = [r for r in rows if not r.get("ok")]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} cases within their targets")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
