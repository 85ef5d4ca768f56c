"""The demo's works: fiddle tunes of *Ryan's Mammoth Collection* (1883, 1,059 ABC files in the
``music21`` wheel), each parsed once (~0.1 s) and cached as JSON. Pitches are MIDI numbers (60 =
middle C), onsets and durations *beats* (quarter notes, music21's ``quarterLength``)."""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from chlib.core.errors import ChlibError, ConfigError
from chlib.core.io import write_json

_PARSE_VERSION = 2  # bump when the ABC -> note-list conversion changes (invalidates the cache)
_MIN_NOTES = 32  # a usable tune has this many notes (repeats expanded),
_MIN_RANGE = 7  # ... a pitch range of at least this many semitones
_MIN_PITCH_CLASSES = 5  # ... and this many distinct pitch classes
_NOTES_PER_SECOND = 6.0  # base tempo: the tune's running notes move at this rate
_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MODES = ("ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian")
_MODE_SCALES = {mode: tuple((s - _MAJOR[k]) % 12 for s in _MAJOR[k:] + _MAJOR[:k])
                for k, mode in enumerate(_MODES)}  # the church modes: rotations of the major
_MODE_SCALES.update(major=_MODE_SCALES["ionian"], minor=_MODE_SCALES["aeolian"])
PC_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


class Note(NamedTuple):
    """One melody note: MIDI ``pitch``, ``onset`` and ``duration`` in beats."""

    pitch: int
    onset: float
    duration: float


class Pass(NamedTuple):
    """One pass through a part as written: ``label`` ("A", "B" ...), ``start``/``end`` beats."""

    label: str
    start: float
    end: float


@dataclass(frozen=True)
class Tune:
    """A melody with enough structure to perform it: ``notes`` with repeats expanded, in time
    order; ``passes`` tile that time line (AABB: four passes); ``bars`` are (start, length) in
    beats. Both may be empty for a hand-made tune (one pass, 4-beat bars). ``tonic`` is a pitch
    class (0 = C), ``mode`` a key of ``_MODE_SCALES``."""

    title: str
    notes: tuple[Note, ...]
    passes: tuple[Pass, ...] = ()
    bars: tuple[tuple[float, float], ...] = ()
    tonic: int = 0
    mode: str = "major"
    meter: str = "4/4"
    rhythm: str = ""
    source: str = ""

    @property
    def length_beats(self) -> float:
        """Length of the written (repeats expanded) tune in beats."""
        ends = [p.end for p in self.passes] or [n.onset + n.duration for n in self.notes]
        return max(ends, default=0.0)

    @property
    def typical_step(self) -> float:
        """Median time between note onsets, in beats (the tune's running note value)."""
        onsets = np.unique(np.array([n.onset for n in self.notes], dtype=float))
        return float(np.median(np.diff(onsets))) if len(onsets) >= 2 else 1.0

    @property
    def base_bpm(self) -> float:
        """Tempo (quarter notes per minute) at which the running notes move at 6 notes/s."""
        return 60.0 * _NOTES_PER_SECOND * self.typical_step

    def part_passes(self) -> tuple[Pass, ...]:
        """The passes, or one pass "A" over the whole tune when none were given."""
        return self.passes or (Pass("A", 0.0, self.length_beats),)

    def bar_list(self) -> tuple[tuple[float, float], ...]:
        """The bars, or 4-beat bars over the whole tune when none were given."""
        n = max(1, math.ceil(self.length_beats / 4.0))
        return self.bars or tuple((4.0 * i, 4.0) for i in range(n))

    def to_json(self) -> dict:
        """A JSON-ready dict (the tune cache format); inverse of :meth:`from_json`."""
        d = asdict(self)
        return {**d, **{k: [list(x) for x in d[k]] for k in ("notes", "passes", "bars")}}

    @classmethod
    def from_json(cls, d: dict) -> Tune:
        rest = {k: d[k] for k in ("tonic", "mode", "meter", "rhythm", "source") if k in d}
        return cls(title=str(d["title"]), **rest,
                   notes=tuple(Note(int(p), float(o), float(u)) for p, o, u in d["notes"]),
                   passes=tuple(Pass(str(a), float(s), float(e)) for a, s, e in d.get("passes", [])),
                   bars=tuple((float(s), float(n)) for s, n in d.get("bars", [])))


def scale_pcs(tune: Tune) -> list[int]:
    """Pitch classes of the tune's scale, from the tonic up (7 values)."""
    return [(tune.tonic + s) % 12 for s in _MODE_SCALES.get(tune.mode, _MAJOR)]


def default_tune_cache_dir() -> Path:
    """``$CHLIB_CACHE_DIR/demo_tunes``, else ``$XDG_CACHE_HOME/chlib/demo_tunes``, else
    ``~/.cache/chlib/demo_tunes``. Nothing is created here."""
    if os.environ.get("CHLIB_CACHE_DIR"):
        return Path(os.environ["CHLIB_CACHE_DIR"]).expanduser() / "demo_tunes"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "chlib/demo_tunes"


def _resolve_cache_dir(cache_dir: str | os.PathLike | None, fallback: Path) -> Path:
    """``cache_dir`` (must be writable), else the default, else ``fallback`` (read-only homes)."""
    bases = [Path(cache_dir).expanduser()] if cache_dir is not None else [
        default_tune_cache_dir(), fallback]
    for base in bases:
        with contextlib.suppress(OSError):
            base.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=base).close()
            return base / f"v{_PARSE_VERSION}"
    raise ConfigError(f"tune cache folder {bases[-1]} cannot be created or written: pass a "
                      "writable cache_dir")


def _corpus_files() -> list[Path]:
    """The collection's ABC files inside the installed music21 (found without importing it)."""
    spec = importlib.util.find_spec("music21")
    where = spec.submodule_search_locations if spec else None
    files = sorted((Path(next(iter(where))) / "corpus/ryansMammoth").glob("*.abc")) if where else []
    if not files:
        raise ChlibError("the demo tunes come from music21's corpus, which is not installed: "
                         "`pip install --force-reinstall music21`")
    return files


def _abc_field(text: str, key: str) -> str:
    m = re.search(rf"^{key}:\s*(.*?)\s*$", text, flags=re.MULTILINE)
    return m.group(1) if m else ""


def _parse_abc_tune(path: Path) -> dict:
    """Parse one ABC file into the tune-cache dict, or ``{"ok": False, "reason": ...}``: the
    first part, repeats expanded (as written when music21 cannot expand them)."""
    from music21 import converter

    text = path.read_text(encoding="utf-8", errors="replace")
    title = _abc_field(text, "T").strip().rstrip(".").strip() or path.stem
    title = title.title() if title.isupper() else title
    rhythm = _abc_field(text, "R").lower().replace(" ", "")
    rhythm = {"slipjig": "slip jig", "highlandfling": "highland fling"}.get(rhythm, rhythm)
    try:
        score = converter.parse(str(path), format="abc")
    except Exception as e:  # noqa: BLE001 - any parser failure means "skip this tune"
        return {"ok": False, "reason": f"music21 could not parse it ({type(e).__name__}: {e})"}
    part = next(iter(getattr(score, "parts", [])), score)
    if len(measures := list(part.getElementsByClass("Measure"))) < 4:
        return {"ok": False, "reason": f"only {len(measures)} bars"}
    section_starts = _section_starts(measures, part)
    try:
        expanded = part.expandRepeats()
    except Exception:  # noqa: BLE001 - badly formed repeats: play it as written
        expanded = part
    notes, bars, passes = _collect_notes(expanded, section_starts)
    tonic, mode = _tune_key(part, notes)
    meter = next((ts.ratioString for ts in part.recurse().getElementsByClass("TimeSignature")), "")
    return {"ok": True, "title": title, "notes": notes, "passes": passes, "bars": bars,
            "tonic": tonic, "mode": mode, "meter": meter, "rhythm": rhythm, "source": path.name}


_DOUBLE_BARS = ("double", "final", "light-light", "light-heavy", "heavy-light", "heavy-heavy")


def _section_starts(measures: list, part: Any) -> set[int]:
    """Numbers of the bars that start a section (after a repeat sign or double bar, outside
    first/second endings). Also adds the start repeats ABC leaves implicit: music21 reads
    "A :| B :|" as AABAAB unless B has a start repeat, so a section closed by a later end repeat
    gets one (giving AABB)."""
    from music21 import bar

    def repeat_dir(barline: Any) -> str:
        return barline.direction if isinstance(barline, bar.Repeat) else ""

    in_ending = {m.number for rb in part.spannerBundle.getByClass("RepeatBracket")
                 for m in rb.getSpannedElements()}
    starts = {measures[0].number}
    for i, m in enumerate(measures):
        if repeat_dir(m.leftBarline) == "start":
            starts.add(m.number)
        double = getattr(m.rightBarline, "type", "") in _DOUBLE_BARS
        if (repeat_dir(m.rightBarline) == "end" or double) and i + 1 < len(measures):
            starts.add(measures[i + 1].number)
    starts -= in_ending
    for i, m in enumerate(measures[1:], start=1):
        if m.number not in starts or repeat_dir(m.leftBarline) == "start":
            continue
        for later in measures[i:]:
            if later is not m and repeat_dir(later.leftBarline) == "start":
                break
            if repeat_dir(later.rightBarline) == "end":
                m.leftBarline = bar.Repeat(direction="start")
                break
    return starts


def _collect_notes(expanded: Any, section_starts: set[int]) -> tuple[list, list, list]:
    """Notes [[midi, onset, dur]], bars [[start, length]] and passes [[label, start, end]]
    (beats) of a repeats-expanded part. A pass begins where bar numbers jump back (a repeat) or
    a section starts. Chords keep their top note, ties are merged, grace notes (zero length)
    dropped (the renderer adds its own), and of notes starting together the highest is kept."""
    notes, bars, passes = [], [], []  # passes: [section index, start beat, end beat]
    starts_sorted = sorted(section_starts)
    prev_number: int | None = None
    for m in expanded.getElementsByClass("Measure"):
        start, length = float(expanded.elementOffset(m)), float(m.duration.quarterLength)
        if length <= 0:
            continue
        bars.append([start, length])
        if prev_number is None or m.number <= prev_number or m.number in section_starts:
            sec = max(bisect.bisect_right(starts_sorted, m.number) - 1, 0)
            passes.append([sec, start, start + length])
        passes[-1][2] = start + length
        prev_number = m.number
        for el in m.flatten().notes:
            if (dur := float(el.duration.quarterLength)) <= 0:
                continue
            pitch, onset = max(p.midi for p in el.pitches), start + float(el.offset)
            if (getattr(el.tie, "type", None) in ("stop", "continue") and notes
                    and notes[-1][0] == pitch and abs(notes[-1][1] + notes[-1][2] - onset) < 1e-6):
                notes[-1][2] += dur
            else:
                notes.append([int(pitch), onset, dur])
    notes.sort(key=lambda n: (n[1], -n[0]))
    top = [n for i, n in enumerate(notes) if i == 0 or abs(notes[i - 1][1] - n[1]) > 1e-9]
    return top, bars, _merge_short_passes(passes, bars)


def _merge_short_passes(passes: list[list], bars: list[list[float]]) -> list[list]:
    """Merge passes under two bars (a pickup, a lone second ending) into a neighbour, then label
    the sections "A", "B" ... in order of first appearance."""
    def n_bars(p: list) -> int:
        return sum(p[1] <= b[0] < p[2] for b in bars)

    merged: list[list] = []
    for p in passes:
        if merged and n_bars(p) < 2:
            merged[-1][2] = p[2]
        else:
            merged.append(list(p))
    if len(merged) > 1 and n_bars(merged[0]) < 2:
        merged[1][1] = merged[0][1]  # a leading pickup joins the first full pass
        del merged[0]
    order = list(dict.fromkeys(p[0] for p in merged))  # sections by first appearance
    return [[chr(ord("A") + min(order.index(p[0]), 25)), p[1], p[2]] for p in merged]


def _tune_key(part: Any, notes: list[list[float]]) -> tuple[int, str]:
    """Tonic pitch class and mode from the ABC key (``K:``), else the last note, major."""
    for k in part.recurse().getElementsByClass("Key"):
        if (mode := str(k.mode or "major").lower()) in _MODE_SCALES:
            return int(k.tonic.pitchClass), mode
    return (int(notes[-1][0]) % 12 if notes else 0), "major"


def _usable(d: dict) -> str | None:
    """Why a parsed tune is not used for the demo, or None when it is fine."""
    pitches = [n[0] for n in d["notes"]]
    lo, hi = min(pitches, default=0), max(pitches, default=0)
    problems = [(len(pitches) < _MIN_NOTES, f"only {len(pitches)} notes (need {_MIN_NOTES})"),
                (hi - lo < _MIN_RANGE, f"pitch range {hi - lo} semitones (need {_MIN_RANGE})"),
                (len({p % 12 for p in pitches}) < _MIN_PITCH_CLASSES, "too few pitch classes"),
                (lo < 36 or hi > 100, f"pitches {lo}..{hi} outside 36..100")]
    return next((why for bad, why in problems if bad), None)


def _load_or_parse(path: Path, cache: Path) -> dict:
    """The cached parse of ``path`` (a dict with ``ok``), parsing and caching it if needed."""
    cached = cache / (path.stem + ".json")
    with contextlib.suppress(OSError, json.JSONDecodeError):  # missing or corrupt: parse
        d = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(d, dict) and "ok" in d:
            return d
    d = _parse_abc_tune(path)
    if d.get("ok") and (reason := _usable(d)):
        d = {"ok": False, "reason": reason, "title": d["title"]}
    write_json(cached, d, indent=None)
    return d


def _melody_signature(notes: Sequence[Sequence[float]], n: int = 24) -> tuple[int, ...]:
    """Interval sequence of the first ``n`` notes: equal for a tune filed under two names."""
    return tuple(np.diff([int(x[0]) for x in notes[: n + 1]]).tolist())


def demo_tunes(n: int, seed: int = 0, *, cache_dir: str | os.PathLike | None = None,
               fallback_dir: str | os.PathLike | None = None) -> list[Tune]:
    """``n`` distinct usable tunes, in ``seed``'s shuffled file order (so the first ``k`` do not
    depend on ``n``), parses cached under ``cache_dir`` (None: :func:`default_tune_cache_dir`,
    else ``fallback_dir``, else a temporary folder)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"demo_tunes: n must be a positive integer, got {n!r}")
    cache = _resolve_cache_dir(cache_dir, Path(fallback_dir or Path(tempfile.gettempdir())
                                               / "chlib-demo-tunes"))
    files, tunes, seen = _corpus_files(), [], set()
    for i in np.random.default_rng(int(seed)).permutation(len(files)):
        d = _load_or_parse(files[int(i)], cache)
        if d.get("ok") and (signature := _melody_signature(d["notes"])) not in seen:
            seen.add(signature)
            tunes.append(Tune.from_json(d))
            if len(tunes) == n:
                return tunes
    raise ConfigError(f"only {len(tunes)} usable tunes in Ryan's Mammoth Collection, {n} asked "
                      "for: ask for fewer works")
