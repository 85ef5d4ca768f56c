"""An offline demo dataset: real fiddle tunes, synthesised performances.

Real cover-song datasets cannot be downloaded everywhere, and a newcomer should see the kit work
before they bring their own data. This module builds a small cover-song dataset from nothing but
what is installed:

* **Works** are real tunes from *Ryan's Mammoth Collection* (1883), 1,059 Irish, Scottish and
  American fiddle tunes in ABC notation that ship inside the ``music21`` wheel. Each tune is
  parsed once (repeats expanded, ~0.1 s) into a list of notes and cached as JSON.
* **Performances** ("versions") of a work are rendered with a small NumPy additive synthesiser.
  Versions of one work share the melody but differ in tempo, key, timbre (fiddle, flute, piano,
  accordion, plucked), ornamentation (grace notes, rolls, passing notes), swing, form (AABB,
  AB, starting on the B part, a dropped or an extra repeat), accompaniment (none, a drone,
  chords), tuning, room, noise and loudness - the variations a cover-song model must see past.

Everything is deterministic: the same arguments give bit-identical audio files, and a second
call re-renders nothing (a manifest records a hash of each file's render parameters and the
file's content hash).

Building blocks, usable on their own::

    tunes = demo_tunes(3, seed=0)                       # list[Tune]
    params = draw_performance_params(tunes[0], 4, seed=0)  # list[DemoPerformanceParams]
    y = render_performance(tunes[0], params[0], 16000)  # float32 [samples], peak <= 0.9

and the whole dataset::

    dataset_txt = make_demo_dataset("datasets/demo")

Units: pitches are MIDI note numbers (60 = middle C); note onsets and durations are in *beats*,
one beat being a quarter note (music21's ``quarterLength``); tempi are quarter notes per minute
("bpm"); times in the rendered audio are seconds.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from chlib.core.errors import ChlibError, ConfigError

__all__ = [
    "Note",
    "Pass",
    "Tune",
    "DemoPerformanceParams",
    "INSTRUMENTS",
    "FORMS",
    "demo_tunes",
    "default_tune_cache_dir",
    "draw_performance_params",
    "tune_form",
    "render_performance",
    "describe_performance",
    "make_demo_dataset",
    "DEMO_PREP_CONFIG",
]

# Bump when the ABC -> note-list conversion changes (invalidates the tune cache).
_PARSE_VERSION = 2
# Bump when the synthesiser changes (invalidates rendered files through the manifest).
_RENDER_VERSION = 1

INSTRUMENTS: tuple[str, ...] = ("fiddle", "flute", "piano", "accordion", "plucked")
"""Melody timbres of :func:`render_performance`."""

FORMS: tuple[str, ...] = ("written", "once", "start_b", "drop_repeat", "extra_repeat", "twice")
"""How a performance walks through the parts of a tune (see :func:`tune_form`):
``written`` as notated with repeats (e.g. AABB); ``once`` each part once (AB); ``start_b`` the
written form rotated to start on the second part (BBAA); ``drop_repeat`` one repeat left out
(ABB); ``extra_repeat`` one part played once more (AAABB); ``twice`` the written form twice."""

DEMO_PREP_CONFIG: dict[str, Any] = {
    # No tempo augmentation: every work already comes at tempi spread over +-25 % of its base
    # tempo, and a list of three factors would triple feature extraction time and disk use for
    # little gain on a demo. Set [0.9, 1.0, 1.1] to try augmentation.
    "aug_speed_mode": [1.0],
    # 40 works x 6 versions: 4 works held out entirely for test and 2 for val (unseen works),
    # and one version of every other work in val and one in test (seen works).
    "val_data_split": 0.1,
    "val_unseen": 0.05,
    "test_data_split": 0.1,
    "test_data_unseen": 0.1,
}
"""Data-prep settings written to the demo's ``hparams.yaml`` (merged over PrepConfig defaults)."""

_MIN_NOTES = 32  # a tune needs this many notes (repeats expanded) to be used
_MIN_RANGE = 7  # ... a pitch range of at least this many semitones
_MIN_PITCH_CLASSES = 5  # ... and this many distinct pitch classes
_NOTES_PER_SECOND = 6.0  # base tempo: the tune's typical note moves at this rate
_MODE_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
    "aeolian": (0, 2, 3, 5, 7, 8, 10),
    "ionian": (0, 2, 4, 5, 7, 9, 11),
    "locrian": (0, 1, 3, 5, 6, 8, 10),
}
_AUDIO_FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


# ============================================================================================
# tunes


class Note(NamedTuple):
    """One melody note: MIDI ``pitch``, ``onset`` and ``duration`` in beats (quarter notes)."""

    pitch: int
    onset: float
    duration: float


class Pass(NamedTuple):
    """One pass through a part of the tune as written: part ``label`` ("A", "B" ...) and its
    ``start`` and ``end`` in beats on the tune's (repeats expanded) time line."""

    label: str
    start: float
    end: float


@dataclass(frozen=True)
class Tune:
    """A melody with enough structure to perform it.

    ``notes`` are the melody as written with repeats expanded, in time order, onsets and
    durations in beats. ``passes`` split that time line into passes through the parts (AABB has
    four passes, labelled A, A, B, B); ``bars`` gives (start, length) of each bar in beats. Both
    may be left empty for a hand-made tune: one pass and 4-beat bars are then assumed. ``tonic``
    is a pitch class (0 = C) and ``mode`` a key of :data:`_MODE_SCALES` ("major", "minor",
    "dorian" ...); they drive the grace notes and chords.
    """

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
        if self.passes:
            return max(p.end for p in self.passes)
        return max(n.onset + n.duration for n in self.notes) if self.notes else 0.0

    @property
    def typical_step(self) -> float:
        """Median time between note onsets, in beats (the tune's running note value)."""
        onsets = np.unique(np.array([n.onset for n in self.notes], dtype=float))
        if len(onsets) < 2:
            return 1.0
        return float(np.median(np.diff(onsets)))

    @property
    def base_bpm(self) -> float:
        """Base tempo (quarter notes per minute) at which the running notes move at
        ``_NOTES_PER_SECOND`` notes per second."""
        return 60.0 * _NOTES_PER_SECOND * self.typical_step

    def part_passes(self) -> tuple[Pass, ...]:
        """The passes, or one pass "A" over the whole tune when none were given."""
        return self.passes or (Pass("A", 0.0, self.length_beats),)

    def bar_list(self) -> tuple[tuple[float, float], ...]:
        """The bars, or 4-beat bars over the whole tune when none were given."""
        if self.bars:
            return self.bars
        n = max(1, math.ceil(self.length_beats / 4.0))
        return tuple((4.0 * i, 4.0) for i in range(n))

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the tune cache format); inverse of :meth:`from_json`."""
        return {
            "title": self.title,
            "notes": [[n.pitch, n.onset, n.duration] for n in self.notes],
            "passes": [list(p) for p in self.passes],
            "bars": [list(b) for b in self.bars],
            "tonic": self.tonic,
            "mode": self.mode,
            "meter": self.meter,
            "rhythm": self.rhythm,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict) -> Tune:
        return cls(
            title=str(d["title"]),
            notes=tuple(Note(int(p), float(o), float(u)) for p, o, u in d["notes"]),
            passes=tuple(Pass(str(a), float(s), float(e)) for a, s, e in d.get("passes", [])),
            bars=tuple((float(s), float(n)) for s, n in d.get("bars", [])),
            tonic=int(d.get("tonic", 0)),
            mode=str(d.get("mode", "major")),
            meter=str(d.get("meter", "4/4")),
            rhythm=str(d.get("rhythm", "")),
            source=str(d.get("source", "")),
        )


def default_tune_cache_dir() -> Path:
    """Where parsed tunes are cached: ``$CHLIB_CACHE_DIR/demo_tunes``, else
    ``$XDG_CACHE_HOME/chlib/demo_tunes``, else ``~/.cache/chlib/demo_tunes``.

    Nothing is created here; callers fall back to a folder of their own when this one cannot be
    written (read-only home directories in some CI and cluster set-ups).
    """
    if os.environ.get("CHLIB_CACHE_DIR"):
        return Path(os.environ["CHLIB_CACHE_DIR"]).expanduser() / "demo_tunes"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "chlib" / "demo_tunes"
    return Path.home() / ".cache" / "chlib" / "demo_tunes"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def _resolve_cache_dir(cache_dir: str | os.PathLike | None, fallback: Path) -> Path:
    """The versioned tune cache folder: ``cache_dir`` if given, else the default, else
    ``fallback`` when the default cannot be written."""
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
        if not _writable_dir(base):
            raise ConfigError(
                f"tune cache folder {base} cannot be created or written: pass a writable "
                "cache_dir, or None for the default"
            )
    else:
        base = default_tune_cache_dir()
        if not _writable_dir(base):
            base = fallback
            base.mkdir(parents=True, exist_ok=True)
    return base / f"v{_PARSE_VERSION}"


def _corpus_files() -> list[Path]:
    """The ABC files of Ryan's Mammoth Collection inside the installed music21, sorted by name.

    Found without importing music21 (its import costs a second or two), so that a run whose
    tunes are all cached never imports it.
    """
    import importlib.util

    spec = importlib.util.find_spec("music21")
    if spec is None or not spec.submodule_search_locations:
        raise ChlibError(
            "music21 is not installed: the demo tunes come from its corpus. "
            "Install it with `pip install music21`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "corpus" / "ryansMammoth"
    files = sorted(folder.glob("*.abc"))
    if not files:
        raise ChlibError(
            f"{folder}: no ABC files found; this music21 install lacks its corpus. "
            "Reinstall music21 from the wheel (`pip install --force-reinstall music21`)."
        )
    return files


def _abc_field(text: str, key: str) -> str:
    m = re.search(rf"^{key}:\s*(.*?)\s*$", text, flags=re.MULTILINE)
    return m.group(1) if m else ""


def _clean_title(title: str, fallback: str) -> str:
    title = title.strip().rstrip(".").strip() or fallback
    if title.isupper():
        title = title.title()
    return title


def _parse_abc_tune(path: Path) -> dict:
    """Parse one ABC file with music21 into the tune-cache dict, or ``{"ok": False, reason}``.

    The first part is used; chords keep their top note; ties are merged; grace notes (zero
    duration) are dropped (the renderer adds its own ornaments). Repeats are expanded; a tune
    whose repeats music21 cannot expand is used as written.
    """
    from music21 import converter

    text = path.read_text(encoding="utf-8", errors="replace")
    title = _clean_title(_abc_field(text, "T"), path.stem)
    rhythm = _abc_field(text, "R").lower().replace(" ", "")
    rhythm = {"slipjig": "slip jig", "highlandfling": "highland fling"}.get(rhythm, rhythm)
    try:
        score = converter.parse(str(path), format="abc")
    except Exception as e:  # noqa: BLE001 - any parser failure means "skip this tune"
        return {"ok": False, "reason": f"music21 could not parse it ({type(e).__name__}: {e})"}
    parts = list(getattr(score, "parts", []))
    part = parts[0] if parts else score
    measures = list(part.getElementsByClass("Measure"))
    if len(measures) < 4:
        return {"ok": False, "reason": f"only {len(measures)} bars"}
    section_starts = _section_starts(measures, part)
    try:
        expanded = part.expandRepeats()
        ex_measures = list(expanded.getElementsByClass("Measure"))
    except Exception:  # noqa: BLE001 - badly formed repeats: play it as written
        expanded, ex_measures = part, measures
    if not ex_measures:
        return {"ok": False, "reason": "no bars after expanding repeats"}
    notes, bars, passes = _collect_notes(expanded, ex_measures, section_starts)
    tonic, mode = _tune_key(part, notes)
    meter = ""
    ts = list(part.recurse().getElementsByClass("TimeSignature"))
    if ts:
        meter = ts[0].ratioString
    return {
        "ok": True,
        "title": title,
        "notes": notes,
        "passes": passes,
        "bars": bars,
        "tonic": tonic,
        "mode": mode,
        "meter": meter,
        "rhythm": rhythm,
        "source": path.name,
    }


def _section_starts(measures: list, part: Any) -> set[int]:
    """Numbers of the bars that start a section (after a repeat sign or double bar, not inside
    a first/second ending). Also writes the start repeats that ABC leaves implicit: "A :| B :|"
    means AABB, but music21 reads the second repeat as "back to the top" (AABAAB) unless the
    B section has a start repeat, so a section closed by a later end repeat gets one."""
    from music21 import bar

    def repeat_dir(barline: Any) -> str:
        return barline.direction if isinstance(barline, bar.Repeat) else ""

    in_ending = {m.number for rb in part.spannerBundle.getByClass("RepeatBracket")
                 for m in rb.getSpannedElements()}
    starts = {measures[0].number}
    for i, m in enumerate(measures):
        if repeat_dir(m.leftBarline) == "start":
            starts.add(m.number)
        double = m.rightBarline is not None and getattr(m.rightBarline, "type", "") in (
            "double", "final", "light-light", "light-heavy", "heavy-light", "heavy-heavy")
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


def _collect_notes(expanded: Any, ex_measures: list, section_starts: set[int]):
    """Notes [[midi, onset, dur]], bars [[start, length]] and labelled passes
    [[label, start, end]] (beats) of a repeats-expanded part.

    A new pass begins where the bar numbers jump back (a repeat) or a section starts. Chords
    keep their top note, tied notes are merged, grace notes (zero length) dropped, and of notes
    starting together only the highest is kept.
    """
    notes: list[list] = []
    bars: list[list[float]] = []
    passes: list[list] = []  # [section index, start beat, end beat]
    starts_sorted = sorted(section_starts)
    prev_number: int | None = None
    for m in ex_measures:
        start = float(expanded.elementOffset(m))
        length = float(m.duration.quarterLength)
        if length <= 0:
            continue
        bars.append([start, length])
        number = m.number
        if prev_number is None or number <= prev_number or number in section_starts:
            sec = max([i for i, s in enumerate(starts_sorted) if s <= number], default=0)
            passes.append([sec, start, start + length])
        passes[-1][2] = start + length
        prev_number = number
        for el in m.flatten().notes:
            dur = float(el.duration.quarterLength)
            if dur <= 0:
                continue  # grace note
            pitch = max(p.midi for p in el.pitches) if el.isChord else el.pitch.midi
            onset = start + float(el.offset)
            tie = el.tie.type if el.tie is not None else None
            if (tie in ("stop", "continue") and notes and notes[-1][0] == pitch
                    and abs(notes[-1][1] + notes[-1][2] - onset) < 1e-6):
                notes[-1][2] += dur
            else:
                notes.append([int(pitch), onset, dur])
    notes.sort(key=lambda n: (n[1], -n[0]))
    top = [n for i, n in enumerate(notes) if i == 0 or abs(notes[i - 1][1] - n[1]) > 1e-9]
    return top, bars, _merge_short_passes(passes, bars)


def _merge_short_passes(passes: list[list], bars: list[list[float]]) -> list[list]:
    """Merge passes under two bars (a pickup, a lone second ending) into a neighbour, then label
    the sections "A", "B" ... in order of first appearance."""
    merged: list[list] = []
    for p in passes:
        n_bars = sum(1 for b in bars if p[1] <= b[0] < p[2])
        if merged and n_bars < 2:
            merged[-1][2] = p[2]
        else:
            merged.append(list(p))
    if len(merged) > 1 and sum(1 for b in bars if merged[0][1] <= b[0] < merged[0][2]) < 2:
        merged[1][1] = merged[0][1]  # a leading pickup joins the first full pass
        merged.pop(0)
    names: dict[int, str] = {}
    for p in merged:
        names.setdefault(p[0], chr(ord("A") + min(len(names), 25)))
    return [[names[p[0]], p[1], p[2]] for p in merged]


def _tune_key(part: Any, notes: list[list[float]]) -> tuple[int, str]:
    """Tonic pitch class and mode from the ABC key (``K:``), else from the last note."""
    for k in part.recurse().getElementsByClass("Key"):
        mode = str(k.mode or "major").lower()
        if mode in _MODE_SCALES:
            return int(k.tonic.pitchClass), mode
    if notes:
        return int(notes[-1][0]) % 12, "major"
    return 0, "major"


def _usable(d: dict) -> str | None:
    """Why a parsed tune is not used for the demo, or None when it is fine."""
    notes = d["notes"]
    if len(notes) < _MIN_NOTES:
        return f"only {len(notes)} notes (need {_MIN_NOTES})"
    pitches = [n[0] for n in notes]
    if max(pitches) - min(pitches) < _MIN_RANGE:
        return f"pitch range {max(pitches) - min(pitches)} semitones (need {_MIN_RANGE})"
    if len({p % 12 for p in pitches}) < _MIN_PITCH_CLASSES:
        return "too few pitch classes"
    if min(pitches) < 36 or max(pitches) > 100:
        return f"pitches {min(pitches)}..{max(pitches)} outside 36..100"
    return None


def _load_or_parse(path: Path, cache: Path) -> dict:
    """The cached parse of ``path`` (a dict with ``ok``), parsing and caching it if needed."""
    from chlib.core.io import write_json

    cached = cache / (path.stem + ".json")
    if cached.exists():
        try:
            d = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(d, dict) and "ok" in d:
                return d
        except (OSError, json.JSONDecodeError):
            pass  # corrupt cache entry: parse again
    d = _parse_abc_tune(path)
    if d.get("ok"):
        reason = _usable(d)
        if reason:
            d = {"ok": False, "reason": reason, "title": d["title"]}
    write_json(cached, d, indent=None)
    return d


def _melody_signature(notes: Sequence[Sequence[float]], n: int = 24) -> tuple[int, ...]:
    """Interval sequence of the first ``n`` notes: equal for a tune filed under two names."""
    p = [int(x[0]) for x in notes[: n + 1]]
    return tuple(b - a for a, b in zip(p, p[1:], strict=False))


def demo_tunes(
    n: int,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[Tune]:
    """``n`` distinct tunes from Ryan's Mammoth Collection, chosen deterministically by ``seed``.

    The 1,059 files are shuffled with ``seed`` and taken in that order, skipping tunes that
    music21 cannot parse, that have fewer than 32 notes, a range under 7 semitones or fewer than
    5 pitch classes, and tunes whose opening melody repeats one already chosen. The first ``k``
    tunes for a seed do not depend on ``n``.

    Caches: every parsed file is stored as JSON under ``cache_dir`` (default
    :func:`default_tune_cache_dir`, or a temporary folder if that cannot be written), so a
    second call takes milliseconds and does not import music21.

    Returns
    -------
    list[Tune], length ``n``; notes in beats (quarter notes), pitches in MIDI.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"demo_tunes: n must be a positive integer, got {n!r}")
    import tempfile

    cache = _resolve_cache_dir(cache_dir, Path(tempfile.gettempdir()) / "chlib-demo-tunes")
    return _select_tunes(int(n), int(seed), cache)


def _select_tunes(n: int, seed: int, cache: Path) -> list[Tune]:
    files = _corpus_files()
    order = np.random.default_rng(seed).permutation(len(files))
    tunes: list[Tune] = []
    seen: set[tuple[int, ...]] = set()
    for i in order:
        d = _load_or_parse(files[int(i)], cache)
        if not d.get("ok"):
            continue
        sig = _melody_signature(d["notes"])
        if sig in seen:
            continue
        seen.add(sig)
        tunes.append(Tune.from_json(d))
        if len(tunes) == n:
            return tunes
    raise ConfigError(
        f"only {len(tunes)} usable tunes in Ryan's Mammoth Collection, {n} asked for: "
        "ask for fewer works"
    )


# ============================================================================================
# performance parameters


@dataclass(frozen=True)
class DemoPerformanceParams:
    """Every knob of one rendered performance; :func:`render_performance` is a pure function of
    (tune, these parameters, sample rate).

    Musical choices
        ``tempo_bpm``: quarter notes per minute at the start (the tune's base tempo makes its
        running notes move at 6 notes/s; versions are drawn within +-25 % of it).
        ``transpose``: semitones added to every pitch (-5..+6). ``octave``: whole octaves added on
        top, chosen to put the melody in the instrument's range. ``tuning_cents``: a global
        detuning in cents (+-20; A4 = 440 Hz at 0).
        ``instrument``: melody timbre, one of :data:`INSTRUMENTS`.
        ``form_name`` / ``form``: how the parts are walked through (one of :data:`FORMS`) and the
        resulting sequence of indices into ``tune.part_passes()``; the form loops until the
        duration is filled.
        ``ornament_rate``: chance (0..1) that a note gets an ornament (grace note, roll or
        passing note). ``swing``: long/short ratio of pairs of running notes (1.0 = straight).
        ``tempo_drift``: relative depth of a slow tempo wander (0.03 = +-3 %).
        ``timing_jitter_ms``: standard deviation of random note-onset shifts.
        ``accompaniment``: "none", "drone" (tonic and fifth held) or "chords" (a triad per bar,
        chosen from the bar's melody notes); ``accompaniment_instrument`` its timbre and
        ``accompaniment_gain_db`` its level relative to the melody.

    Recording choices
        ``room_rt60_s``: reverberation time of the synthetic room (seconds to decay by 60 dB);
        ``room_wet``: reverberant share of the mix (0..1). ``snr_db``: signal-to-noise ratio of
        added ``noise_colour`` ("white" or "pink") noise. ``loudness_db``: target RMS level in
        dBFS (lowered if the peak would exceed 0.9). ``lead_in_s``: silence before the first
        note. ``duration_s``: length of the rendering (seconds; the performance is cropped or
        looped to it). ``seed``: seeds everything random inside the rendering (ornament choices,
        timing jitter, room, noise).
    """

    tempo_bpm: float = 120.0
    transpose: int = 0
    octave: int = 0
    tuning_cents: float = 0.0
    instrument: str = "fiddle"
    form_name: str = "written"
    form: tuple[int, ...] = ()
    ornament_rate: float = 0.0
    swing: float = 1.0
    tempo_drift: float = 0.0
    timing_jitter_ms: float = 0.0
    accompaniment: str = "none"
    accompaniment_instrument: str = "piano"
    accompaniment_gain_db: float = -14.0
    room_rt60_s: float = 0.3
    room_wet: float = 0.0
    snr_db: float = 60.0
    noise_colour: str = "white"
    loudness_db: float = -20.0
    lead_in_s: float = 0.0
    duration_s: float = 30.0
    seed: int = 0

    def validate(self, where: str = "DemoPerformanceParams") -> DemoPerformanceParams:
        """Raise :class:`ConfigError` naming the first impossible value."""
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{where}: {msg}")

        if not (10.0 <= self.tempo_bpm <= 1000.0):
            raise bad(f"tempo_bpm must be in [10, 1000], got {self.tempo_bpm}")
        if self.instrument not in INSTRUMENTS:
            raise bad(f"instrument must be one of {INSTRUMENTS}, got {self.instrument!r}")
        if self.accompaniment_instrument not in INSTRUMENTS + ("drone",):
            raise bad(f"accompaniment_instrument must be one of {INSTRUMENTS + ('drone',)}, "
                      f"got {self.accompaniment_instrument!r}")
        if self.accompaniment not in ("none", "drone", "chords"):
            raise bad(f"accompaniment must be none, drone or chords, got {self.accompaniment!r}")
        if self.noise_colour not in ("white", "pink"):
            raise bad(f"noise_colour must be white or pink, got {self.noise_colour!r}")
        if not (0.0 <= self.ornament_rate <= 1.0):
            raise bad(f"ornament_rate must be in [0, 1], got {self.ornament_rate}")
        if not (0.5 <= self.swing <= 3.0):
            raise bad(f"swing must be in [0.5, 3], got {self.swing}")
        if not (0.0 <= self.tempo_drift < 0.5):
            raise bad(f"tempo_drift must be in [0, 0.5), got {self.tempo_drift}")
        if not (0.0 <= self.room_wet <= 1.0) or not (0.01 <= self.room_rt60_s <= 5.0):
            raise bad(f"room_wet must be in [0, 1] and room_rt60_s in [0.01, 5], got "
                      f"{self.room_wet}, {self.room_rt60_s}")
        if not (0.1 <= self.duration_s <= 3600.0):
            raise bad(f"duration_s must be in [0.1, 3600] seconds, got {self.duration_s}")
        if not (0.0 <= self.lead_in_s < self.duration_s):
            raise bad(f"lead_in_s must be in [0, duration_s), got {self.lead_in_s}")
        if not (-60.0 <= self.loudness_db <= 0.0):
            raise bad(f"loudness_db must be in [-60, 0] dBFS, got {self.loudness_db}")
        if abs(self.transpose + 12 * self.octave) > 36 or abs(self.tuning_cents) > 100:
            raise bad("transpose + 12*octave must be within +-36 semitones and tuning_cents "
                      f"within +-100, got {self.transpose}, {self.octave}, {self.tuning_cents}")
        if self.timing_jitter_ms < 0:
            raise bad(f"timing_jitter_ms must be >= 0, got {self.timing_jitter_ms}")
        return self

    def to_json(self) -> dict:
        """Plain dict (lists for tuples), the form used in render-parameter hashes."""
        d = asdict(self)
        d["form"] = list(self.form)
        return d


# Centre of each instrument's comfortable range (MIDI): the octave is chosen to put the
# melody's mean pitch near it.
_INSTRUMENT_CENTRE = {"fiddle": 71, "flute": 76, "piano": 67, "accordion": 70, "plucked": 62}


def tune_form(tune: Tune, form_name: str, rng: np.random.Generator) -> tuple[int, ...]:
    """Indices into ``tune.part_passes()`` for one of :data:`FORMS`.

    A tune with a single pass is treated as two halves (split at the bar nearest its middle) only
    by forms that need two parts ("start_b"); the others then play the single pass.
    """
    passes = tune.part_passes()
    idx = list(range(len(passes)))
    labels = [p.label for p in passes]
    if form_name == "written" or len(idx) == 1:
        return tuple(idx)
    if form_name == "twice":
        return tuple(idx + idx)
    if form_name == "once":
        seen: set[str] = set()
        out = []
        for i, lab in zip(idx, labels, strict=True):
            if lab not in seen:
                seen.add(lab)
                out.append(i)
        return tuple(out)
    if form_name == "start_b":
        first_other = next((i for i, lab in enumerate(labels) if lab != labels[0]), None)
        if first_other is None:
            return tuple(idx[1:] + idx[:1])
        return tuple(idx[first_other:] + idx[:first_other])
    if form_name == "drop_repeat":
        counts = {lab: labels.count(lab) for lab in labels}
        cands = [i for i in idx if counts[labels[i]] > 1]
        if not cands:
            return tuple(idx)
        drop = cands[int(rng.integers(len(cands)))]
        return tuple(i for i in idx if i != drop)
    if form_name == "extra_repeat":
        k = int(rng.integers(len(idx)))
        return tuple(idx[: k + 1] + [idx[k]] + idx[k + 1:])
    raise ConfigError(f"form_name must be one of {FORMS}, got {form_name!r}")


def draw_performance_params(
    tune: Tune,
    n: int,
    seed: int | np.random.Generator = 0,
    *,
    min_seconds: float = 25.0,
    max_seconds: float = 40.0,
) -> list[DemoPerformanceParams]:
    """Draw ``n`` distinct performance settings for ``tune``.

    Instruments, transpositions and forms are spread over the versions (drawn without
    replacement where possible) and tempi over +-25 % of ``tune.base_bpm`` (a golden-ratio
    sequence), so that versions of one work differ audibly; the rest is drawn independently per
    version. Durations are uniform in [min_seconds, max_seconds]. The first ``k`` versions do
    not depend on ``n``: asking for more versions later keeps the existing ones.

    Returns
    -------
    list of ``n`` validated :class:`DemoPerformanceParams`.
    """
    if n < 1:
        raise ConfigError(f"draw_performance_params: n must be >= 1, got {n}")
    if not (0.5 <= min_seconds <= max_seconds):
        raise ConfigError(
            f"min_seconds ({min_seconds}) must be >= 0.5 and <= max_seconds ({max_seconds})"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    base = int(rng.integers(2**63))  # every draw below derives from it, per aspect and version
    instruments = [INSTRUMENTS[int(i)] for i in _spread(base, 1, len(INSTRUMENTS), n)]
    transposes = [int(t) - 5 for t in _spread(base, 2, 12, n)]
    forms = [FORMS[int(i)] for i in _spread(base, 3, len(FORMS), n)]
    # tempo factors in [0.75, 1.25] from a golden-ratio sequence: evenly spread for any n
    u0 = float(np.random.default_rng([base, 4]).random())
    tempo_factors = 0.75 + 0.5 * ((u0 + np.arange(n) * 0.6180339887498949) % 1.0)
    mean_pitch = float(np.mean([x.pitch for x in tune.notes]))
    compound = _is_compound(tune.meter)
    out = []
    for j in range(n):
        rng = np.random.default_rng([base, 100 + j])
        inst = instruments[j]
        shifted = mean_pitch + transposes[j]
        octave = int(np.clip(round((_INSTRUMENT_CENTRE[inst] - shifted) / 12.0), -1, 1))
        accomp = str(rng.choice(["none", "none", "drone", "chords"]))
        accomp_inst = "drone" if accomp == "drone" else (
            "plucked" if inst in ("piano", "accordion") else str(rng.choice(["piano", "accordion"]))
        )
        form_rng = np.random.default_rng(rng.integers(2**63))
        p = DemoPerformanceParams(
            tempo_bpm=round(float(tune.base_bpm * tempo_factors[j]), 1),
            transpose=transposes[j],
            octave=octave,
            tuning_cents=round(float(rng.uniform(-20, 20)), 1),
            instrument=inst,
            form_name=forms[j],
            form=tune_form(tune, forms[j], form_rng),
            ornament_rate=round(float(rng.choice([0.0, rng.uniform(0.05, 0.35)])), 3),
            swing=1.0 if compound else round(float(rng.choice([1.0, rng.uniform(1.05, 1.4)])), 3),
            tempo_drift=round(float(rng.uniform(0.0, 0.04)), 4),
            timing_jitter_ms=round(float(rng.uniform(0.0, 12.0)), 1),
            accompaniment=accomp,
            accompaniment_instrument=accomp_inst,
            accompaniment_gain_db=round(float(rng.uniform(-18.0, -10.0)), 1),
            room_rt60_s=round(float(rng.uniform(0.15, 1.1)), 3),
            room_wet=round(float(rng.uniform(0.0, 0.45)), 3),
            snr_db=round(float(rng.uniform(15.0, 40.0)), 1),
            noise_colour=str(rng.choice(["white", "pink"])),
            loudness_db=round(float(rng.uniform(-30.0, -16.0)), 1),
            lead_in_s=round(float(rng.uniform(0.0, 0.6)), 3),
            duration_s=round(float(rng.uniform(min_seconds, max_seconds)), 2),
            seed=int(rng.integers(2**31)),
        )
        out.append(p.validate())
    return out


def _spread(base: int, stream: int, k: int, n: int) -> np.ndarray:
    """``n`` values from range(k), each used before any repeats (concatenated permutations
    drawn from the generator seeded by ``[base, stream]``, so the first values do not
    depend on ``n``)."""
    g = np.random.default_rng([base, stream])
    reps = -(-n // k)
    return np.concatenate([g.permutation(k) for _ in range(reps)])[:n]


def _is_compound(meter: str) -> bool:
    m = re.match(r"^(\d+)/(\d+)$", meter or "")
    return bool(m) and int(m.group(1)) % 3 == 0 and int(m.group(1)) > 3


def describe_performance(params: DemoPerformanceParams, tune: Tune | None = None) -> str:
    """A one-line description, e.g. "tempo 104 bpm, key +3, fiddle, reel, AABB, drone, ..."."""
    parts = [f"tempo {params.tempo_bpm:.0f} bpm", f"key {params.transpose:+d}"]
    if params.octave:
        parts.append(f"octave {params.octave:+d}")
    parts.append(params.instrument)
    if tune is not None and tune.rhythm:
        parts.append(tune.rhythm)
    if tune is not None:
        passes = tune.part_passes()
        parts.append("".join(passes[i].label for i in params.form) or "?")
    else:
        parts.append(params.form_name)
    if params.ornament_rate > 0:
        parts.append(f"ornaments {params.ornament_rate:.2f}")
    if params.swing != 1.0:
        parts.append(f"swing {params.swing:.2f}")
    if params.accompaniment != "none":
        acc = "drone" if params.accompaniment == "drone" else (
            f"chords on {params.accompaniment_instrument}")
        parts.append(acc)
    parts.append(f"tuning {params.tuning_cents:+.0f} c")
    parts.append(f"room {params.room_rt60_s:.2f} s")
    parts.append(f"{params.noise_colour} noise {params.snr_db:.0f} dB SNR")
    return ", ".join(parts)


# ============================================================================================
# score -> timed note events


class _Events(NamedTuple):
    """Timed note events of one voice: onset and held duration in seconds, MIDI pitch (float,
    tuning included) and linear amplitude; arrays of equal length."""

    onset: np.ndarray
    dur: np.ndarray
    midi: np.ndarray
    amp: np.ndarray


def _scale_pcs(tune: Tune) -> np.ndarray:
    steps = _MODE_SCALES.get(tune.mode, _MODE_SCALES["major"])
    return np.array(sorted((tune.tonic + s) % 12 for s in steps))


def _scale_neighbour(pitch: int, scale: np.ndarray, up: bool) -> int:
    """The next pitch above (or below) ``pitch`` in the scale (pitch classes ``scale``)."""
    step = 1 if up else -1
    for k in range(1, 4):
        q = pitch + step * k
        if q % 12 in scale:
            return q
    return pitch + 2 * step


def _laid_out_melody(tune: Tune, params: DemoPerformanceParams, max_beats: float):
    """Melody notes and bar starts along the performance's form, looped to ``max_beats``.

    Returns (pitch [n] int, onset [n] beats, dur [n] beats, bar_starts [m] beats,
    bar_lengths [m] beats).
    """
    passes = tune.part_passes()
    form = params.form or tuple(range(len(passes)))
    for i in form:
        if not (0 <= i < len(passes)):
            raise ConfigError(
                f"form index {i} out of range: tune {tune.title!r} has {len(passes)} passes; "
                "draw the parameters with draw_performance_params(tune, ...)"
            )
    notes = np.array([[n.pitch, n.onset, n.duration] for n in tune.notes], dtype=float)
    if len(notes) == 0:
        raise ConfigError(f"tune {tune.title!r} has no notes")
    bars = np.array(tune.bar_list(), dtype=float)
    pitch_l, onset_l, dur_l, bar_s, bar_n = [], [], [], [], []
    cursor = 0.0
    while cursor < max_beats:
        progressed = False
        for i in form:
            p = passes[i]
            span = p.end - p.start
            if span <= 0:
                continue
            sel = (notes[:, 1] >= p.start - 1e-9) & (notes[:, 1] < p.end - 1e-9)
            pitch_l.append(notes[sel, 0])
            onset_l.append(notes[sel, 1] - p.start + cursor)
            dur_l.append(np.minimum(notes[sel, 2], p.end - notes[sel, 1]))
            bsel = (bars[:, 0] >= p.start - 1e-9) & (bars[:, 0] < p.end - 1e-9)
            bar_s.append(bars[bsel, 0] - p.start + cursor)
            bar_n.append(bars[bsel, 1])
            cursor += span
            progressed = True
            if cursor >= max_beats:
                break
        if not progressed:
            raise ConfigError(f"tune {tune.title!r}: its passes have no length")
    return (np.concatenate(pitch_l).astype(int), np.concatenate(onset_l), np.concatenate(dur_l),
            np.concatenate(bar_s), np.concatenate(bar_n))


def _ornament(pitch, onset, dur, tune: Tune, rate: float, rng: np.random.Generator):
    """Add grace notes, rolls and passing notes (in beats). Returns (pitch, onset, dur, weight)
    with ``weight`` 1 for written notes and < 1 for ornament notes."""
    n = len(pitch)
    step = tune.typical_step
    scale = _scale_pcs(tune)
    grace = min(0.35 * step, 0.25)
    out_p, out_o, out_d, out_w = [], [], [], []
    draws = rng.random(n)
    kinds = rng.random(n)
    for i in range(n):
        p, o, d = int(pitch[i]), float(onset[i]), float(dur[i])
        if draws[i] >= rate or d < 0.6 * step:
            out_p.append(p), out_o.append(o), out_d.append(d), out_w.append(1.0)
            continue
        nxt = int(pitch[i + 1]) if i + 1 < n else p
        if d >= 1.5 * step and kinds[i] < 0.5:
            # roll: note, upper neighbour, note, lower neighbour, note
            up, lo = _scale_neighbour(p, scale, True), _scale_neighbour(p, scale, False)
            fr = np.array([0.4, 0.12, 0.16, 0.12, 0.2]) * d
            ps = [p, up, p, lo, p]
            ws = [1.0, 0.7, 0.85, 0.7, 0.85]
            t = o
            for q, f, w in zip(ps, fr, ws, strict=True):
                out_p.append(q), out_o.append(t), out_d.append(float(f)), out_w.append(w)
                t += float(f)
        elif 3 <= abs(nxt - p) <= 4 and kinds[i] < 0.8:
            # passing note in the second half, on the scale step between p and nxt
            mid = _scale_neighbour(p, scale, nxt > p)
            if mid == nxt:
                mid = p + (1 if nxt > p else -1)
            out_p += [p, mid]
            out_o += [o, o + d / 2]
            out_d += [d / 2, d / 2]
            out_w += [1.0, 0.85]
        else:
            # grace note from above, stealing time from the start of the note
            g = min(grace, 0.3 * d)
            out_p += [_scale_neighbour(p, scale, True), p]
            out_o += [o, o + g]
            out_d += [g, d - g]
            out_w += [0.6, 1.0]
    return (np.array(out_p, dtype=int), np.array(out_o), np.array(out_d),
            np.array(out_w))


def _swing_warp(beats: np.ndarray, unit: float, ratio: float) -> np.ndarray:
    """Time-warp positions in beats so that each pair of ``unit`` notes becomes long-short with
    the given ratio (1.0 = no change). Pair boundaries stay in place."""
    if ratio == 1.0 or unit <= 0:
        return beats
    pair = 2.0 * unit
    k = np.floor(beats / pair)
    r = beats - k * pair
    long = pair * ratio / (1.0 + ratio)
    warped = np.where(r < unit, r * long / unit, long + (r - unit) * (pair - long) / unit)
    return k * pair + warped


def _beats_to_seconds(beats: np.ndarray, bpm: float, drift: float, period: float,
                      phase: float) -> np.ndarray:
    """Seconds at each beat position for a tempo wandering sinusoidally by +-``drift``
    (relative) with ``period`` beats: the integral of the local seconds per beat."""
    spb = 60.0 / bpm
    w = 2.0 * np.pi / period
    return spb * (beats + drift / w * (np.cos(phase) - np.cos(w * beats + phase)))


def _chord_for_bar(bar_pcs: np.ndarray, weights: np.ndarray, tune: Tune) -> list[int]:
    """Pitch classes of the diatonic triad that best covers a bar's melody notes."""
    scale = list(_scale_pcs_ordered(tune))
    best, best_score = None, -1.0
    for deg in (0, 3, 4, 5, 1):  # I, IV, V, vi, ii: earlier wins ties
        triad = [scale[deg], scale[(deg + 2) % 7], scale[(deg + 4) % 7]]
        third = (triad[1] - triad[0]) % 12
        fifth = (triad[2] - triad[0]) % 12
        if fifth != 7 or third not in (3, 4):
            continue  # skip diminished / odd triads
        score = float(np.sum(weights[np.isin(bar_pcs, triad)])) + (0.01 if deg == 0 else 0.0)
        if score > best_score + 1e-9:
            best, best_score = triad, score
    return best or [tune.tonic, (tune.tonic + 4) % 12, (tune.tonic + 7) % 12]


def _scale_pcs_ordered(tune: Tune) -> list[int]:
    steps = _MODE_SCALES.get(tune.mode, _MODE_SCALES["major"])
    return [(tune.tonic + s) % 12 for s in steps]


def _performance_events(tune: Tune, params: DemoPerformanceParams, rng: np.random.Generator):
    """Timed events of the melody and the accompaniment, cut to ``params.duration_s``.

    Returns (melody: _Events, accompaniment: _Events); times in seconds from the start of the
    rendering (lead-in included).
    """
    drift_period = float(rng.uniform(16.0, 48.0))  # beats
    drift_phase = float(rng.uniform(0.0, 2.0 * np.pi))
    play_s = params.duration_s - params.lead_in_s
    max_beats = (play_s + 1.0) * params.tempo_bpm / 60.0 * (1.0 + params.tempo_drift) + 4.0
    pitch, onset, dur, bar_start, bar_len = _laid_out_melody(tune, params, max_beats)
    written_pitch, written_onset, written_dur = pitch, onset, dur
    pitch, onset, dur, weight = _ornament(pitch, onset, dur, tune, params.ornament_rate, rng)
    # swing and tempo: map note starts and ends through the same warps
    unit = tune.typical_step
    start_b = _swing_warp(onset, unit, params.swing)
    end_b = _swing_warp(onset + dur, unit, params.swing)

    def to_s(b: np.ndarray) -> np.ndarray:
        return params.lead_in_s + _beats_to_seconds(
            b, params.tempo_bpm, params.tempo_drift, drift_period, drift_phase)

    t0, t1 = to_s(start_b), to_s(end_b)
    jitter = np.clip(rng.normal(0.0, params.timing_jitter_ms / 1000.0, len(t0)),
                     -0.03, 0.03)
    t0 = np.maximum(t0 + jitter, 0.0)
    t1 = np.maximum(t1 + jitter, t0 + 0.01)
    # accents: a little louder on the first note of each bar, random velocity spread
    on_bar = np.isin(np.round(onset, 6), np.round(bar_start, 6))
    amp_db = np.where(on_bar, 2.0, 0.0) + rng.normal(0.0, 1.0, len(t0))
    amp = weight * 10.0 ** (amp_db / 20.0)
    shift = params.transpose + 12 * params.octave + params.tuning_cents / 100.0
    keep = t0 < params.duration_s
    melody = _Events(t0[keep], (t1 - t0)[keep], pitch[keep] + shift, amp[keep])

    # accompaniment
    if params.accompaniment == "none":
        empty = np.zeros(0)
        return melody, _Events(empty, empty, empty, empty)
    low = 36 + (tune.tonic + params.transpose) % 12  # accompaniment root, MIDI 36..47
    if params.accompaniment == "drone":
        length = params.duration_s - params.lead_in_s
        pitches = np.array([low, low + 7], dtype=float) + params.tuning_cents / 100.0
        return melody, _Events(np.full(2, params.lead_in_s), np.full(2, length), pitches,
                               np.array([1.0, 0.7]))
    # chords: one triad per bar, on the bar line, voiced near the drone register + an octave
    b0 = to_s(_swing_warp(bar_start, unit, params.swing))
    b1 = to_s(_swing_warp(bar_start + bar_len, unit, params.swing))
    c_on, c_dur, c_midi, c_amp = [], [], [], []
    for s, n, t_s, t_e in zip(bar_start, bar_len, b0, b1, strict=True):
        if t_s >= params.duration_s:
            break
        sel = (written_onset >= s - 1e-9) & (written_onset < s + n - 1e-9)
        pcs = written_pitch[sel] % 12
        triad = _chord_for_bar(pcs, written_dur[sel], tune)
        root = low + 12 + ((triad[0] - tune.tonic) % 12)
        if root > low + 12 + 6:
            root -= 12
        voicing = [root, root + (triad[1] - triad[0]) % 12, root + (triad[2] - triad[0]) % 12]
        for k, v in enumerate(voicing):
            c_on.append(t_s + 0.012 * k)  # a light strum
            c_dur.append(max(t_e - t_s - 0.05, 0.1))
            c_midi.append(v + params.tuning_cents / 100.0)
            c_amp.append(0.8 if k else 1.0)
    accomp = _Events(np.array(c_on), np.array(c_dur), np.array(c_midi, dtype=float),
                     np.array(c_amp))
    return melody, accomp


# ============================================================================================
# synthesis


class _Timbre(NamedTuple):
    bright: tuple[float, ...]  # harmonic amplitudes at the attack, h = 1..40
    dull: tuple[float, ...]  # ... after ``brightness_decay_s`` (equal to bright if static)
    attack_s: float
    decay_s: float  # exponential decay time constant of the body (0 = sustained)
    release_s: float
    ring_s: float  # how long a struck/plucked note rings past its written end
    vibrato_cents: float
    vibrato_hz: float
    brightness_decay_s: float
    detune_cents: float  # a second, detuned voice (accordion reeds); 0 = none
    articulation: float  # held fraction of the written duration for sustained timbres


_N_HARM = 40


def _profile(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    h = np.arange(1, _N_HARM + 1, dtype=float)
    if kind == "fiddle":
        body = 1.0 + 0.6 * np.exp(-0.5 * ((h - 4.0) / 1.5) ** 2) + 0.4 * np.exp(
            -0.5 * ((h - 9.0) / 2.0) ** 2)
        bright = body / h ** 0.95
        dull = bright
    elif kind == "flute":
        bright = np.where(h == 1, 1.0, 0.35 / h ** 1.6)
        bright[1] = 0.4
        dull = bright
    elif kind == "piano":
        bright = 1.0 / h ** 1.2
        dull = 1.0 / h ** 2.6
    elif kind == "accordion":
        bright = np.where(h <= 12, 1.0 / h ** 0.6, 1.0 / h ** 1.4) * (1.0 + 0.3 * (h % 2))
        dull = bright
    elif kind == "plucked":
        pluck = np.abs(np.sin(np.pi * h * 0.18)) + 0.05
        bright = pluck / h ** 0.9
        dull = pluck / h ** 2.4
    elif kind == "drone":
        bright = np.where(h % 2 == 1, 1.0 / h, 0.35 / h)
        dull = bright
    else:  # pragma: no cover - guarded by validate()
        raise ConfigError(f"unknown timbre {kind!r}")
    return tuple(float(x) for x in bright), tuple(float(x) for x in dull)


_TIMBRES: dict[str, dict[str, float]] = {
    "fiddle": dict(attack_s=0.05, decay_s=0.0, release_s=0.06, ring_s=0.0, vibrato_cents=18.0,
                   vibrato_hz=5.6, brightness_decay_s=0.0, detune_cents=0.0, articulation=0.97),
    "flute": dict(attack_s=0.04, decay_s=0.0, release_s=0.05, ring_s=0.0, vibrato_cents=10.0,
                  vibrato_hz=5.0, brightness_decay_s=0.0, detune_cents=0.0, articulation=0.9),
    "piano": dict(attack_s=0.004, decay_s=0.7, release_s=0.12, ring_s=0.05, vibrato_cents=0.0,
                  vibrato_hz=0.0, brightness_decay_s=0.25, detune_cents=0.0, articulation=1.0),
    "accordion": dict(attack_s=0.02, decay_s=0.0, release_s=0.04, ring_s=0.0, vibrato_cents=0.0,
                      vibrato_hz=0.0, brightness_decay_s=0.0, detune_cents=7.0,
                      articulation=0.95),
    "plucked": dict(attack_s=0.002, decay_s=0.35, release_s=0.08, ring_s=0.3, vibrato_cents=0.0,
                    vibrato_hz=0.0, brightness_decay_s=0.12, detune_cents=0.0, articulation=1.0),
    "drone": dict(attack_s=0.6, decay_s=0.0, release_s=0.5, ring_s=0.0, vibrato_cents=0.0,
                  vibrato_hz=0.0, brightness_decay_s=0.0, detune_cents=4.0, articulation=1.0),
}


@lru_cache(maxsize=16)
def _timbre(kind: str) -> _Timbre:
    bright, dull = _profile(kind)
    return _Timbre(bright=bright, dull=dull, **_TIMBRES[kind])


_TABLE_SIZE = 4096


@lru_cache(maxsize=1024)
def _wavetable(kind: str, which: str, n_harm: int) -> np.ndarray:
    """One period of a band-limited waveform: [_TABLE_SIZE + 1] float64 (last = first, for
    interpolation), peak-normalised over the bright table's level."""
    bright, dull = _profile(kind)
    amps = np.array(bright if which == "bright" else dull)[:n_harm]
    norm = float(np.sum(np.array(bright)[:n_harm]))
    # fixed per-harmonic phases (not random): a deterministic, non-peaky waveform
    h = np.arange(1, n_harm + 1)
    phases = np.pi * h * (h - 1) / n_harm  # Schroeder-like phases
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)  # sum of sines via one FFT
    spectrum[h] = 0.5 * _TABLE_SIZE * amps * np.exp(1j * (phases - 0.5 * np.pi))
    table = np.fft.irfft(spectrum, _TABLE_SIZE) / max(norm, 1e-9)
    return np.append(table, table[0])


def _lookup(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Linear-interpolated wavetable read at ``phase`` (cycles)."""
    pos = (phase - np.floor(phase)) * _TABLE_SIZE
    i0 = pos.astype(np.int64)
    frac = pos - i0
    a = table[i0]
    return a + frac * (table[i0 + 1] - a)


def _render_voice(out: np.ndarray, ev: _Events, kind: str, sample_rate: int,
                  rng: np.random.Generator) -> None:
    """Add the notes of one voice into ``out`` [samples] in place."""
    tb = _timbre(kind)
    n_out = len(out)
    nyquist = sample_rate / 2.0
    vib_phases = rng.uniform(0.0, 2.0 * np.pi, len(ev.onset))
    osc_phases = rng.random(len(ev.onset))
    for k in range(len(ev.onset)):
        f0 = 440.0 * 2.0 ** ((float(ev.midi[k]) - 69.0) / 12.0)
        held = float(ev.dur[k]) * tb.articulation
        if tb.decay_s > 0:
            held += tb.ring_s
        total = held + tb.release_s
        start = int(round(float(ev.onset[k]) * sample_rate))
        if start >= n_out:
            continue
        length = min(int(total * sample_rate), n_out - start)
        if length <= 2:
            continue
        t = np.arange(length) / sample_rate
        # envelope: linear attack, sustained or exponentially decaying body, exponential release
        env = np.minimum(1.0, t / tb.attack_s)
        if tb.decay_s > 0:
            env = env * np.exp(-t / (tb.decay_s * (1.0 + 200.0 / max(f0, 50.0) * 0.3)))
        rel = t > held
        if np.any(rel):
            env[rel] *= np.exp(-(t[rel] - held) / (tb.release_s / 4.0))
        f_top = f0 * (1.0 + tb.vibrato_cents / 1200.0) * (1.0 + tb.detune_cents / 1200.0)
        n_harm = int(max(1, min(_N_HARM, (0.92 * nyquist) // f_top)))
        # phase in cycles, with delayed vibrato for bowed/blown timbres
        if tb.vibrato_cents > 0:
            depth = tb.vibrato_cents / 1200.0 * np.log(2.0) * np.minimum(1.0, t / 0.25)
            inst_f = f0 * (1.0 + depth * np.sin(2 * np.pi * tb.vibrato_hz * t + vib_phases[k]))
            phase = np.cumsum(inst_f) / sample_rate + osc_phases[k]
        else:
            phase = f0 * t + osc_phases[k]
        bright = _wavetable(kind, "bright", n_harm)
        y = _lookup(bright, phase)
        if tb.brightness_decay_s > 0:
            dull = _lookup(_wavetable(kind, "dull", n_harm), phase)
            y = dull + (y - dull) * np.exp(-t / tb.brightness_decay_s)
        if tb.detune_cents > 0:
            y = 0.5 * (y + _lookup(bright, phase * 2.0 ** (tb.detune_cents / 1200.0)))
        if kind == "flute":  # a little breath noise, following the envelope
            y = y + 0.03 * rng.standard_normal(length)
        out[start:start + length] += float(ev.amp[k]) * env * y


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _room(y: np.ndarray, rt60: float, wet: float, sample_rate: int,
          rng: np.random.Generator) -> np.ndarray:
    """Mix ``y`` with its convolution by an exponentially decaying noise impulse response."""
    if wet <= 0:
        return y
    n_ir = max(16, int(min(rt60 * 1.2, 2.0) * sample_rate))
    t = np.arange(n_ir) / sample_rate
    ir = rng.standard_normal(n_ir) * np.exp(-6.91 * t / rt60)
    ir = np.convolve(ir, np.array([0.25, 0.5, 0.25]), mode="same")  # a little darker
    predelay = int(0.008 * sample_rate)
    ir[:predelay] = 0.0
    ir /= np.sqrt(np.sum(ir ** 2)) + 1e-12
    n_fft = _fast_len(len(y) + n_ir - 1)
    rev = np.fft.irfft(np.fft.rfft(y, n_fft) * np.fft.rfft(ir, n_fft), n_fft)[: len(y)]
    return (1.0 - wet) * y + wet * rev


def _noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white or pink (1/f power) noise [n]."""
    x = rng.standard_normal(n)
    if colour == "pink":
        n_fft = _fast_len(n)
        spec = np.fft.rfft(x, n_fft)
        f = np.arange(len(spec), dtype=float)
        f[0] = 1.0
        x = np.fft.irfft(spec / np.sqrt(f), n_fft)[:n]
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def render_performance(
    tune: Tune, params: DemoPerformanceParams, sample_rate: int = 16000
) -> np.ndarray:
    """Render one performance of ``tune`` with NumPy additive (wavetable) synthesis.

    Parameters
    ----------
    tune : Tune
        The melody (notes in beats). ``params.form`` indexes ``tune.part_passes()``.
    params : DemoPerformanceParams
        Every choice of the rendering, including its random seed: the output is a pure function
        of (tune, params, sample_rate), bit-identical across calls on the same platform.
    sample_rate : int > 0
        Hz. Harmonics are kept below 0.92 x Nyquist (no aliasing).

    Returns
    -------
    np.ndarray float32 [round(params.duration_s * sample_rate)] in [-0.9, 0.9], finite, with a
    10 ms fade-in and 50 ms fade-out.
    """
    params.validate()
    if not isinstance(sample_rate, (int, np.integer)) or not (4000 <= sample_rate <= 192000):
        raise ConfigError(f"sample_rate must be an integer in [4000, 192000] Hz, got {sample_rate}")
    sample_rate = int(sample_rate)
    rng = np.random.default_rng(params.seed)
    n = int(round(params.duration_s * sample_rate))
    melody, accomp = _performance_events(tune, params, rng)

    voice = np.zeros(n)
    _render_voice(voice, melody, params.instrument, sample_rate, rng)
    if len(accomp.onset):
        acc = np.zeros(n)
        kind = "drone" if params.accompaniment == "drone" else params.accompaniment_instrument
        _render_voice(acc, accomp, kind, sample_rate, rng)
        rms_v = np.sqrt(np.mean(voice ** 2)) + 1e-12
        rms_a = np.sqrt(np.mean(acc ** 2)) + 1e-12
        voice = voice + acc * (rms_v / rms_a) * 10.0 ** (params.accompaniment_gain_db / 20.0)

    y = _room(voice, params.room_rt60_s, params.room_wet, sample_rate, rng)
    rms = np.sqrt(np.mean(y ** 2))
    if not np.isfinite(rms) or rms <= 0:
        raise ChlibError(
            f"render_performance: tune {tune.title!r} rendered silent or non-finite with "
            f"{params}; report this with the parameters"
        )
    y = y / rms
    y = y + _noise(n, params.noise_colour, rng) * 10.0 ** (-params.snr_db / 20.0)
    y = y * (10.0 ** (params.loudness_db / 20.0) / np.sqrt(np.mean(y ** 2)))
    fade_in, fade_out = min(n, int(0.01 * sample_rate)), min(n, int(0.05 * sample_rate))
    y[:fade_in] *= np.linspace(0.0, 1.0, fade_in)
    y[n - fade_out:] *= np.linspace(1.0, 0.0, fade_out)
    peak = float(np.max(np.abs(y)))
    if peak > 0.9:
        y = y * (0.9 / peak)
    return y.astype(np.float32)


# ============================================================================================
# the dataset


def _slug(text: str, max_len: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    return s[:max_len].rstrip("_") or "tune"


def _manifest_path(path: Path) -> str:
    """``path`` relative to the current directory when it lies under it, else absolute."""
    path = path.resolve()
    cwd = Path.cwd().resolve()
    try:
        return path.relative_to(cwd).as_posix()
    except ValueError:
        return path.as_posix()


@dataclass
class _Job:
    perf: str
    work: str
    tune: Tune
    params: DemoPerformanceParams
    path: Path
    key: str
    version: str = ""


def _encode(y: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    import soundfile as sf

    fmt, subtype = _AUDIO_FORMATS[audio_format]
    buf = io.BytesIO()
    sf.write(buf, y, sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _render_to_file(tune: Tune, params: DemoPerformanceParams, sample_rate: int,
                    path: str, audio_format: str) -> tuple[str, int]:
    """Render and write atomically; returns (sha256 of the file, samples). Runs in workers."""
    import hashlib

    from chlib.core.io import atomic_write_bytes

    y = render_performance(tune, params, sample_rate)
    data = _encode(y, sample_rate, audio_format)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest(), len(y)


def _read_render_manifest(path: Path) -> dict[str, dict]:
    from chlib.core.io import read_jsonl

    out: dict[str, dict] = {}
    try:
        for rec in read_jsonl(path):
            if isinstance(rec, dict) and "perf" in rec:
                out[str(rec["perf"])] = rec
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable manifest: everything is re-rendered
    return out


def _is_current(job: _Job, rec: dict | None) -> bool:
    """True when ``job.path`` holds exactly what the manifest says was rendered for ``job.key``."""
    from chlib.core.io import file_sha256

    if rec is None or rec.get("key") != job.key or not job.path.exists():
        return False
    try:
        return file_sha256(job.path) == rec.get("sha256")
    except OSError:
        return False


def make_demo_dataset(
    out_dir: str | os.PathLike,
    *,
    n_works: int = 40,
    perfs_per_work: int = 6,
    min_seconds: float = 25.0,
    max_seconds: float = 40.0,
    sample_rate: int = 16000,
    seed: int = 0,
    audio_format: str = "flac",
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> Path:
    """Write a synthetic cover-song dataset of real fiddle tunes; return its ``dataset.txt``.

    Layout under ``out_dir``::

        audio/<work>/<perf>.flac   one performance, mono, 16-bit
        dataset.txt                JSON lines {perf, wav, dur_s, work, version}
        hparams.yaml               PrepConfig for the demo (DEMO_PREP_CONFIG; only if absent)
        demo_info.json             the arguments, each work's title/source/key and failures
        render_manifest.jsonl      per file: render-parameter hash and content hash

    ``work`` ids are ``w<index>_<slug of the title>`` (e.g. ``w017_the_silver_spear``), ``perf``
    ids ``<work>_v<index>``; ``version`` describes the rendering ("tempo 104 bpm, key +3,
    fiddle, reel, AABB, ..."). ``wav`` paths are relative to the current working directory when
    ``out_dir`` lies under it (run later steps from the same directory, as CoverHunter's
    repo-root-relative paths expect), else absolute.

    Deterministic: the same arguments give bit-identical files. Idempotent and resumable: a file
    whose render-parameter hash and content hash match the manifest is not rendered again, each
    finished file is recorded at once, and every write is atomic. ``dataset.txt`` is written last.
    A performance that fails to render is skipped, reported in ``demo_info.json`` and warned
    about. The tunes are taken from :func:`demo_tunes` (parsed once, cached under ``cache_dir``).

    Parameters
    ----------
    n_works, perfs_per_work : int >= 1 (perfs_per_work >= 2 for a cover-song task).
    min_seconds, max_seconds : duration range of each performance, seconds.
    sample_rate : Hz of the written audio.
    seed : selects the tunes and every performance parameter.
    audio_format : "flac" (default, ~4x smaller) or "wav".
    progress : show a tqdm progress bar.
    num_workers : processes for rendering; None = up to the CPU count when there are at least 8
        files to render, 0 or 1 = render in this process.

    Cost: about 0.09 CPU-seconds per 32 s file, so the default 240 files (2.2 h of audio,
    ~175 MB of FLAC) take ~21 CPU-seconds (~11 s wall on 2 idle cores), plus ~5 s to parse
    the 40 tunes the first time.
    """
    from chlib.core.io import append_jsonl, atomic_write_text, write_json

    if audio_format not in _AUDIO_FORMATS:
        raise ConfigError(
            f"audio_format must be one of {sorted(_AUDIO_FORMATS)}, got {audio_format!r} "
            "(ogg and mp3 encoders are not bit-reproducible)"
        )
    for name, v in (("n_works", n_works), ("perfs_per_work", perfs_per_work)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"make_demo_dataset: {name} must be a positive integer, got {v!r}")
    if not (0.5 <= min_seconds <= max_seconds <= 3600):
        raise ConfigError(
            f"make_demo_dataset: need 0.5 <= min_seconds <= max_seconds <= 3600, got "
            f"{min_seconds}, {max_seconds}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = _resolve_cache_dir(cache_dir, out_dir / ".cache" / "demo_tunes")
    tunes = _select_tunes(int(n_works), int(seed), cache)

    jobs: list[_Job] = []
    works_info = []
    for wi, tune in enumerate(tunes):
        work = f"w{wi:03d}_{_slug(tune.title)}"
        works_info.append({"work": work, "title": tune.title, "source": tune.source,
                           "rhythm": tune.rhythm, "meter": tune.meter,
                           "key": f"{_PC_NAMES[tune.tonic]} {tune.mode}",
                           "base_bpm": round(tune.base_bpm, 1)})
        rng = np.random.default_rng([int(seed), wi])
        plist = draw_performance_params(tune, int(perfs_per_work), rng,
                                        min_seconds=min_seconds, max_seconds=max_seconds)
        for pj, params in enumerate(plist):
            perf = f"{work}_v{pj:02d}"
            key = _render_key(tune, params, sample_rate, audio_format)
            path = out_dir / "audio" / work / f"{perf}.{audio_format}"
            jobs.append(_Job(perf, work, tune, params, path, key,
                             version=describe_performance(params, tune)))

    manifest_file = out_dir / "render_manifest.jsonl"
    manifest = _read_render_manifest(manifest_file)
    todo = [j for j in jobs if not _is_current(j, manifest.get(j.perf))]
    todo_ids = {j.perf for j in todo}
    failures: list[dict] = []
    done: dict[str, dict] = {j.perf: manifest[j.perf] for j in jobs if j.perf not in todo_ids}

    def record(job: _Job, sha: str, samples: int) -> None:
        rec = {"perf": job.perf, "file": job.path.relative_to(out_dir).as_posix(),
               "key": job.key, "sha256": sha, "samples": samples, "sample_rate": sample_rate}
        done[job.perf] = rec
        append_jsonl(manifest_file, rec)

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="rendering demo performances", unit="file")
    workers = _n_workers(num_workers, len(todo))
    try:
        def render_here(jobs: list) -> None:
            for job in jobs:
                try:
                    sha, samples = _render_to_file(job.tune, job.params, sample_rate,
                                                   str(job.path), audio_format)
                    record(job, sha, samples)
                except Exception as e:  # noqa: BLE001 - batch job: report and go on
                    failures.append({"perf": job.perf, "reason": f"{type(e).__name__}: {e}"})
                if bar is not None:
                    bar.update(1)

        if workers <= 1:
            render_here(todo)
        else:
            _render_pool(todo, workers, sample_rate, audio_format, record, failures, bar)
            failed = {f["perf"] for f in failures}
            # only when the pool could not start (see _render_pool)
            render_here([j for j in todo if j.perf not in done and j.perf not in failed])
    finally:
        if bar is not None:
            bar.close()

    # compact manifest (entries of other settings' files are kept: they stay reusable), info,
    # hparams, then dataset.txt last
    kept = {**manifest, **done}
    atomic_write_text(manifest_file, "".join(json.dumps(kept[k], ensure_ascii=False) + "\n"
                                             for k in sorted(kept)))
    hparams = out_dir / "hparams.yaml"
    if not hparams.exists():
        atomic_write_text(hparams, _demo_hparams_yaml(seed))
    write_json(out_dir / "demo_info.json", {
        "generator": "chlib.demo.generate.make_demo_dataset",
        "args": {"n_works": int(n_works), "perfs_per_work": int(perfs_per_work),
                 "min_seconds": min_seconds, "max_seconds": max_seconds,
                 "sample_rate": sample_rate, "seed": int(seed), "audio_format": audio_format},
        "render_version": _RENDER_VERSION,
        "corpus": "music21 ryansMammoth (Ryan's Mammoth Collection, 1883)",
        "works": works_info,
        "failed": failures,
    })
    records = []
    for job in jobs:
        rec = done.get(job.perf)
        if rec is None:
            continue
        records.append({"perf": job.perf, "wav": _manifest_path(job.path),
                        "dur_s": round(rec["samples"] / sample_rate, 3), "work": job.work,
                        "version": job.version})
    dataset = out_dir / "dataset.txt"
    atomic_write_text(dataset, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in records))
    if failures:
        warnings.warn(
            f"make_demo_dataset: {len(failures)} of {len(jobs)} performances failed to render "
            f"and were left out of {dataset}; see {out_dir / 'demo_info.json'}",
            stacklevel=2,
        )
    return dataset


_PC_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def _render_key(tune: Tune, params: DemoPerformanceParams, sample_rate: int,
                audio_format: str) -> str:
    from chlib.core.io import stable_hash

    return stable_hash({"render_version": _RENDER_VERSION, "tune": tune.to_json(),
                        "params": params.to_json(), "sample_rate": sample_rate,
                        "format": audio_format}, n_chars=20)


def _n_workers(num_workers: int | None, n_jobs: int) -> int:
    if num_workers is not None:
        return max(0, int(num_workers))
    if n_jobs < 8:
        return 0
    return max(1, min(os.cpu_count() or 1, 8, n_jobs // 4))


def _render_pool(todo, workers, sample_rate, audio_format, record, failures, bar) -> None:
    """Render ``todo`` in a spawn-started process pool (safe beside torch/OpenMP threads).

    If the pool breaks (a script without an ``if __name__ == "__main__":`` guard cannot spawn
    workers), a warning is given and the caller renders what is left in this process.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_render_to_file, j.tune, j.params, sample_rate, str(j.path),
                                   audio_format): j for j in todo}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    sha, samples = fut.result()
                    record(job, sha, samples)
                except BrokenProcessPool:
                    raise
                except Exception as e:  # noqa: BLE001 - batch job: report and go on
                    failures.append({"perf": job.perf, "reason": f"{type(e).__name__}: {e}"})
                if bar is not None:
                    bar.update(1)
    except (BrokenProcessPool, RuntimeError, OSError) as e:
        if _in_worker_bootstrap():
            raise  # inside a worker that re-ran an unguarded script: do not render here
        warnings.warn(
            f"make_demo_dataset: worker processes failed ({type(e).__name__}: {e}); rendering "
            "the rest in this process. Pass num_workers=0 to skip the pool, or call "
            "make_demo_dataset under `if __name__ == \"__main__\":` in scripts.",
            stacklevel=3,
        )


def _in_worker_bootstrap() -> bool:
    """True inside a spawned worker (also while it re-imports the main script)."""
    import multiprocessing
    import sys

    main = sys.modules.get("__main__")
    return (multiprocessing.parent_process() is not None
            or bool(getattr(multiprocessing.current_process(), "_inheriting", False))
            or getattr(main, "__name__", "") == "__mp_main__")


def _demo_hparams_yaml(seed: int) -> str:
    import yaml

    from chlib.core.config import PrepConfig

    cfg = PrepConfig.from_dict({**DEMO_PREP_CONFIG, "seed": int(seed)}, where="demo hparams")
    header = (
        "# Data-prep settings for the chlib demo dataset (chlib.demo.generate.make_demo_dataset).\n"
        "# aug_speed_mode [1.0]: the versions already span +-25 % tempo; [0.9, 1.0, 1.1] turns\n"
        "# on tempo augmentation (three times the extraction time and disk).\n"
        "# Splits: 10 % of works test-only, 5 % val-only, one val and one test version per\n"
        "# remaining work.\n"
    )
    return header + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
