"""Tunes from music21 corpora as small note lists, cached as JSON (one file per corpus file).

A tune is a dict: {"id", "title", "corpus", "source", "beats_per_bar", "bars": [bar onsets],
"notes": [[onset, dur, midi], ...] (the melody, top voice), "voices": [[...], ...] (other parts of
a multi-part score such as a chorale; may be empty)}. Onsets and durations are in quarter notes.
"""
from __future__ import annotations

import json
import os
import random
import re
import unicodedata
import warnings
from pathlib import Path

PARSE_VERSION = 1
MIN_NOTES, MIN_BEATS = 16, 12.0
PER_FILE = 10  # at most this many tunes from one opus file (spreads works over regions/books)


def slug(text: str, n: int = 24) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n].strip("_") or "untitled"


def _line(part) -> tuple[list, list]:
    """(notes, bar onsets) of one part, repeats expanded where music21 can, ties merged."""
    try:
        part = part.expandRepeats()
    except Exception:  # noqa: BLE001 - malformed repeat marks: keep the part as written
        pass
    part = part.stripTies()
    notes = []
    for n in part.flatten().notes:
        if n.duration.isGrace or n.quarterLength <= 0:
            continue
        midi = max(p.midi for p in n.pitches)
        notes.append([round(float(n.offset), 4), round(float(n.quarterLength), 4), int(midi)])
    bars = [round(float(m.offset), 4) for m in part.getElementsByClass("Measure")]
    return notes, bars


def _tune(score, corpus: str, source: str, number) -> dict:
    parts = list(score.parts) or [score]
    notes, bars = _line(parts[0])
    voices = [_line(p)[0] for p in parts[1:]]
    ts = score.recurse().getElementsByClass("TimeSignature").first()
    title = score.metadata.title if score.metadata and score.metadata.title else ""
    return {"title": title or f"{Path(source).stem} {number or ''}".strip(), "corpus": corpus,
            "source": source, "number": number, "notes": notes, "voices": voices,
            "bars": bars or [0.0], "beats_per_bar": float(ts.barDuration.quarterLength) if ts else 4.0}


def parse_file(corpus: str, path: Path, cache_dir: Path) -> list[dict]:
    """All tunes of one corpus file (an ABC opus gives many), cached; [{"error": ...}] on failure."""
    cache = cache_dir / corpus / f"{path.name}.v{PARSE_VERSION}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from music21 import converter, stream
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = converter.parse(str(path))
        scores = list(obj.scores) if isinstance(obj, stream.Opus) else [obj]
        out = []
        for i, sc in enumerate(scores):
            try:
                out.append(_tune(sc, corpus, path.name, sc.metadata.number if sc.metadata else i))
            except Exception as e:  # noqa: BLE001 - one bad tune in an opus
                out.append({"error": f"{path.name} #{i}: {type(e).__name__}: {e}"})
    except Exception as e:  # noqa: BLE001
        out = [{"error": f"{path.name}: {type(e).__name__}: {e}"}]
    cache.parent.mkdir(parents=True, exist_ok=True)
    (tmp := cache.with_suffix(f".tmp{os.getpid()}")).write_text(json.dumps(out))
    return os.replace(tmp, cache) or out


def corpus_files(corpus: str) -> list[Path]:
    from music21 import corpus as m21corpus
    exts = (".abc", ".mxl", ".xml", ".musicxml", ".krn")
    return sorted(Path(p) for p in m21corpus.getComposer(corpus) if str(p).endswith(exts))


def problem(t: dict) -> str | None:
    if "error" in t:
        return t["error"]
    n = t["notes"]
    if len(n) < MIN_NOTES:
        return f"only {len(n)} notes"
    if n[-1][0] + n[-1][1] - n[0][0] < MIN_BEATS:
        return f"only {n[-1][0] + n[-1][1] - n[0][0]:.1f} beats"
    if max(p for _, _, p in n) - min(p for _, _, p in n) > 36:
        return "melody spans more than 3 octaves"
    return None


def _fingerprint(t: dict) -> tuple:
    """Transposition-invariant opening: the first 12 intervals (chorale melodies recur)."""
    p = [x[2] for x in t["notes"][:13]]
    return tuple(b - a for a, b in zip(p, p[1:], strict=False))


def _candidates(corpus: str, seed: int, cache_dir: Path, skipped: list):
    files = corpus_files(corpus)
    random.Random(f"{seed}:{corpus}").shuffle(files)
    for f in files:
        tunes = parse_file(corpus, f, cache_dir)
        order = list(range(len(tunes)))
        random.Random(f"{seed}:{corpus}:{f.name}").shuffle(order)
        taken = 0
        for i in order:
            why = problem(tunes[i])
            if why:
                skipped.append({"corpus": corpus, "source": f.name, "reason": why})
                continue
            yield tunes[i]
            taken += 1
            if taken >= PER_FILE:
                break


def select_tunes(corpora: list[str], n: int, seed: int, cache_dir: Path):
    """n distinct tunes, round-robin over the corpora; returns (tunes with "id", skipped list)."""
    skipped: list[dict] = []
    gens = {c: _candidates(c, seed, cache_dir, skipped) for c in corpora}
    seen: set = set()
    tunes: list[dict] = []
    while len(tunes) < n and gens:
        for c in list(gens):
            if len(tunes) >= n:
                break
            for t in gens[c]:
                if _fingerprint(t) in seen:
                    skipped.append({"corpus": c, "source": t["source"], "reason":
                                    f"same melody opening as an earlier work ({t['title']})"})
                    continue
                seen.add(_fingerprint(t))
                t = dict(t, id=f"s{len(tunes):03d}_{slug(c, 6)}_{slug(t['title'])}")
                tunes.append(t)
                break
            else:
                del gens[c]  # corpus exhausted
    return tunes, skipped
