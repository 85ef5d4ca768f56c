"""MIDI -> audio: FluidSynth (CLI) with a length cap, sox room reverb / lowpass, numpy pink noise."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SR = 16000
FONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/sounds/sf3", "/usr/share/soundfonts")


class RenderError(RuntimeError):
    pass


def find_fonts() -> list[str]:
    """Distinct General-MIDI soundfonts installed (symlinks and copies of one file counted once)."""
    env = os.environ.get("SUITE_SOUNDFONTS")  # colon-separated override
    cands = env.split(":") if env else [str(p) for d in FONT_DIRS if Path(d).is_dir()
                                        for p in sorted(Path(d).iterdir())]
    real = {os.path.realpath(c) for c in cands if c.lower().endswith((".sf2", ".sf3"))}
    fonts = [f for f in real if os.path.isfile(f)]
    return sorted(fonts, key=lambda f: Path(f).name.lower())


def tools_missing() -> list[str]:
    return [t for t in ("fluidsynth", "sox") if shutil.which(t) is None]


def fluidsynth(midi: bytes, font: str, seconds: float, timeout_s: float = 120.0) -> np.ndarray:
    """Mono float32 audio of a MIDI file, at most `seconds` long whatever the file holds."""
    cap = int((seconds + 0.5) * SR) * 2 * 4  # stereo float32 bytes; fluidsynth plays on past the
    # end of the MIDI file while voices sound (forever, with a stuck one): we stop it at the cap
    with tempfile.TemporaryDirectory(prefix="suite_") as d:
        mid, raw = Path(d) / "in.mid", Path(d) / "out.raw"
        mid.write_bytes(midi)
        cmd = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6", "-r", str(SR),
               "-o", "synth.dynamic-sample-loading=1", "-o", "synth.cpu-cores=1",
               "-T", "raw", "-O", "float", "-F", str(raw), font, str(mid)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0, rc = time.monotonic(), None
        while rc is None:
            time.sleep(0.05)
            rc = proc.poll()
            if rc is None and (time.monotonic() - t0 > timeout_s
                               or (raw.exists() and raw.stat().st_size >= cap)):
                proc.kill()
                rc = f"stopped at {raw.stat().st_size if raw.exists() else 0} bytes"
                proc.wait()
        err = proc.stderr.read().decode(errors="replace")[-400:]
        proc.stderr.close()
        if not raw.exists() or raw.stat().st_size < SR * 8:
            raise RenderError(f"fluidsynth wrote no audio (rc {rc}): {err}")
        n = min(raw.stat().st_size // 8, int(seconds * SR))
        y = np.fromfile(raw, dtype="<f4", count=2 * n).reshape(-1, 2).mean(axis=1)
    return np.pad(y, (0, int(seconds * SR) - n)).astype(np.float32)


def sox_effects(y: np.ndarray, reverb, lowpass) -> np.ndarray:
    """Room reverb (reverberance %, room scale %, wet gain dB) and a lowpass through sox."""
    fx = []
    if lowpass:
        fx += ["lowpass", str(lowpass)]
    if reverb:
        fx += ["reverb", str(reverb[0]), "50", str(reverb[1]), "100", "10", str(reverb[2])]
    if not fx:
        return y
    fmt = ["-t", "raw", "-r", str(SR), "-e", "floating-point", "-b", "32", "-c", "1"]
    res = subprocess.run(["sox", "-R", "-D", "-V1", *fmt, "-", *fmt, "-", *fx],
                         input=y.astype("<f4").tobytes(), capture_output=True, timeout=120)
    if res.returncode:
        raise RenderError(f"sox failed: {res.stderr.decode(errors='replace')[-300:]}")
    out = np.frombuffer(res.stdout, dtype="<f4")[: len(y)]
    return np.pad(out, (0, len(y) - len(out))).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec /= np.sqrt(np.maximum(f, 20.0))
    x = np.fft.irfft(spec, n)
    return (x / (np.std(x) + 1e-12)).astype(np.float32)


def finish(y: np.ndarray, p: dict) -> np.ndarray:
    """Effects, noise at p['snr_db'], a short fade-out, peak normalised to p['peak']."""
    y = sox_effects(y, p["reverb"], p["lowpass"])
    rng = np.random.default_rng(p["rng"])
    if p["snr_db"] is not None:
        sig = np.sqrt(np.mean(y[np.abs(y) > 1e-4] ** 2)) if np.any(np.abs(y) > 1e-4) else 1e-3
        y = y + pink_noise(len(y), rng) * sig * 10 ** (-p["snr_db"] / 20)
    fade = min(len(y), SR // 2)
    y[len(y) - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return (y * (p["peak"] / max(1e-6, float(np.max(np.abs(y)))))).astype(np.float32)
