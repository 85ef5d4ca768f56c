#!/usr/bin/env python3
"""A second cover-song benchmark: music21 tunes played by General-MIDI soundfonts via FluidSynth.

    python bench/suite/make_suite.py --out DIR --works N --versions M --seed S \
        [--corpora essenFolksong,bach] [--workers 2] [--min-seconds 20 --max-seconds 45]

Writes DIR/dataset.txt (a chlib dataset: one JSON line {perf, wav, dur_s, work, version} per
recording, wav relative to DIR), DIR/audio/<work>/<perf>.flac (16 kHz mono) and DIR/suite_info.json.
Resumable: finished files are kept (every write is a tmp file + rename). Needs the fluidsynth
and sox binaries and a GM soundfont (apt-get install fluidsynth fluid-soundfont-gm sox).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arrange  # noqa: E402
import render  # noqa: E402
import tunes as tunelib  # noqa: E402

RENDER_VERSION = 1


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_one(job: tuple) -> dict:
    """Render (tune, version) to its FLAC unless it exists; returns the manifest record."""
    import soundfile as sf
    tune, v, seed, fonts, out, secs = job
    p = arrange.draw(tune, v, seed, fonts)
    p["seconds"] = round(secs[0] + (p["seconds"] - 20) / 25 * (secs[1] - secs[0]), 2)
    perf = f"{tune['id']}_v{v:02d}"
    wav = Path(out) / "audio" / tune["id"] / f"{perf}.flac"
    rec = {"perf": perf, "wav": str(wav.relative_to(out)), "work": tune["id"],
           "version": arrange.describe(tune, p)}
    if wav.exists():
        try:
            info = sf.info(str(wav))
            return dict(rec, dur_s=round(info.frames / info.samplerate, 2), reused=True)
        except Exception:  # noqa: BLE001 - unreadable: render again
            pass
    t0 = time.perf_counter()
    evs = arrange.events(tune, p)
    y = render.fluidsynth(arrange.midi_bytes(evs, p, p["seconds"] + 0.5), p["font"], p["seconds"])
    y = render.finish(y, p)
    wav.parent.mkdir(parents=True, exist_ok=True)
    tmp = wav.with_name(f".{wav.stem}.tmp{os.getpid()}.flac")
    sf.write(str(tmp), y, render.SR, subtype="PCM_16")
    os.replace(tmp, wav)
    return dict(rec, dur_s=round(len(y) / render.SR, 2), render_s=round(time.perf_counter() - t0, 2))


def make_suite(out, works: int, versions: int, seed: int = 0, corpora=("essenFolksong", "bach"),
               workers: int = 2, seconds=(20.0, 45.0), log=None) -> Path:
    out, log = Path(out), log or (lambda msg: print(msg, flush=True))
    missing, fonts = render.tools_missing(), render.find_fonts()
    if missing or not fonts:
        raise SystemExit(f"missing: {', '.join(missing + ([] if fonts else ['a .sf2/.sf3 soundfont']))}"
                         " (apt-get install fluidsynth fluid-soundfont-gm sox)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tunes, skipped = tunelib.select_tunes(list(corpora), works, seed, out / "tunes")
    log(f"{len(tunes)} works from {', '.join(corpora)} ({len(skipped)} tunes skipped) "
        f"in {time.time() - t0:.0f} s")
    jobs = [(t, v, seed, fonts, str(out), seconds) for t in tunes for v in range(versions)]
    records, failed = [], []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        futs = [pool.submit(render_one, j) for j in jobs] if pool else [None] * len(jobs)
        for i, (j, f) in enumerate(zip(jobs, futs, strict=True)):
            try:
                records.append(f.result() if f else render_one(j))
            except Exception as e:  # noqa: BLE001 - report, keep going
                failed.append({"work": j[0]["id"], "version": j[1], "reason": f"{type(e).__name__}: {e}"})
            if (i + 1) % max(1, len(jobs) // 20) == 0 or i + 1 == len(jobs):
                log(f"  {i + 1}/{len(jobs)} versions, {time.time() - t0:.0f} s")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    rendered = [r for r in records if "render_s" in r]
    audio_s = sum(r["dur_s"] for r in rendered)
    lines = [json.dumps({k: r[k] for k in ("perf", "wav", "dur_s", "work", "version")}) for r in records]
    _atomic_text(out / "dataset.txt", "".join(x + "\n" for x in lines))
    info = {"generator": "bench/suite (FluidSynth GM soundfonts)", "render_version": RENDER_VERSION,
            "parse_version": tunelib.PARSE_VERSION, "seed": seed, "corpora": list(corpora),
            "works": len(tunes), "versions_per_work": versions, "recordings": len(records),
            "sample_rate": render.SR, "seconds": list(seconds), "soundfonts": fonts,
            "melody_programs": len(arrange.MELODY), "total_audio_s": round(sum(r["dur_s"] for r in records), 1),
            "rendered_now": len(rendered), "reused": len(records) - len(rendered),
            "wall_s": round(time.time() - t0, 1),
            "render_s_per_audio_min": round(sum(r["render_s"] for r in rendered) / audio_s * 60, 2) if audio_s else None,
            "per_corpus": {c: sum(t["corpus"] == c for t in tunes) for c in corpora},
            "sources": {t["id"]: f"{t['corpus']}/{t['source']}#{t['number']}" for t in tunes},
            "failed": failed, "skipped_tunes": skipped}
    _atomic_text(out / "suite_info.json", json.dumps(info, indent=1))
    log(f"{len(records)} recordings ({len(failed)} failed) -> {out / 'dataset.txt'}")
    return out / "dataset.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    for name, typ, default in [("works", int, 60), ("versions", int, 6), ("seed", int, 0),
                               ("corpora", str, "essenFolksong,bach"), ("workers", int, 2),
                               ("min-seconds", float, 20.0), ("max-seconds", float, 45.0)]:
        ap.add_argument(f"--{name}", type=typ, default=default)
    a = ap.parse_args(argv)
    make_suite(a.out, a.works, a.versions, a.seed, [c for c in a.corpora.split(",") if c],
               a.workers, (a.min_seconds, a.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
