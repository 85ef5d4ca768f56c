"""How performances of a tune differ (tempo, key, timbre, ornaments, swing, form, accompaniment,
tuning, room, noise, loudness), and the timed note events one of them plays. Tempi in bpm
(quarter notes per minute), event times in seconds."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from chlib.core.errors import ConfigError
from chlib.demo.tunes import Tune, scale_pcs

INSTRUMENTS: tuple[str, ...] = ("fiddle", "flute", "piano", "accordion", "plucked")
"""Melody timbres of :func:`chlib.demo.synth.render_performance`."""

FORMS: tuple[str, ...] = ("written", "once", "start_b", "drop_repeat", "extra_repeat", "twice")
"""How a performance walks through the parts (:func:`tune_form`), e.g. for AABB: ``written``
AABB, ``once`` AB, ``start_b`` BBAA, ``drop_repeat`` ABB, ``extra_repeat`` AAABB, ``twice``
AABBAABB."""

# Centre (MIDI) of each instrument's range: the octave puts the melody's mean pitch near it.
_INSTRUMENT_CENTRE = {"fiddle": 71, "flute": 76, "piano": 67, "accordion": 70, "plucked": 62}
_CHOICES = {"instrument": INSTRUMENTS, "accompaniment_instrument": INSTRUMENTS + ("drone",),
            "accompaniment": ("none", "drone", "chords"), "noise_colour": ("white", "pink")}
_RANGES = {"tempo_bpm": (10.0, 1000.0), "ornament_rate": (0.0, 1.0), "swing": (0.5, 3.0),
           "tempo_drift": (0.0, 0.49), "room_wet": (0.0, 1.0), "room_rt60_s": (0.01, 5.0),
           "duration_s": (0.1, 3600.0), "loudness_db": (-60.0, 0.0),
           "tuning_cents": (-100.0, 100.0), "timing_jitter_ms": (0.0, 1e9)}


@dataclass(frozen=True)
class DemoPerformanceParams:
    """Every knob of one rendered performance: the rendering is a pure function of (tune, these
    parameters, sample rate). Drawn by :func:`draw_performance_params`."""

    tempo_bpm: float = 120.0  # at the start; drawn within +-25 % of tune.base_bpm
    transpose: int = 0  # semitones added to every pitch (-5..+6)
    octave: int = 0  # whole octaves on top, to put the melody in the instrument's range
    tuning_cents: float = 0.0  # global detuning (+-20; A4 = 440 Hz at 0)
    instrument: str = "fiddle"  # melody timbre, one of INSTRUMENTS
    form_name: str = "written"  # one of FORMS
    form: tuple[int, ...] = ()  # indices into tune.part_passes(), looped to fill the duration
    ornament_rate: float = 0.0  # chance (0..1) of a grace note, roll or passing note per note
    swing: float = 1.0  # long/short ratio of pairs of running notes (1 = straight)
    tempo_drift: float = 0.0  # relative depth of a slow tempo wander (0.03 = +-3 %)
    timing_jitter_ms: float = 0.0  # std of random note-onset shifts
    accompaniment: str = "none"  # "none", "drone" (tonic + fifth) or "chords" (a triad per bar)
    accompaniment_instrument: str = "piano"  # its timbre
    accompaniment_gain_db: float = -14.0  # its level relative to the melody
    room_rt60_s: float = 0.3  # reverberation time: seconds to decay by 60 dB
    room_wet: float = 0.0  # reverberant share of the mix (0..1)
    snr_db: float = 60.0  # signal-to-noise ratio of the added noise
    noise_colour: str = "white"  # "white" or "pink"
    loudness_db: float = -20.0  # RMS target in dBFS (lowered so that the peak stays <= 0.9)
    lead_in_s: float = 0.0  # silence before the first note
    duration_s: float = 30.0  # length of the rendering (the form is cropped or looped to it)
    seed: int = 0  # seeds everything random in the rendering (ornaments, jitter, room, noise)

    def validate(self) -> DemoPerformanceParams:
        """Raise :class:`ConfigError` naming the first impossible value; return self."""
        bad = [f"{k} must be one of {allowed}, got {getattr(self, k)!r}"
               for k, allowed in _CHOICES.items() if getattr(self, k) not in allowed]
        bad += [f"{k} must be in [{lo}, {hi}], got {getattr(self, k)}"
                for k, (lo, hi) in _RANGES.items() if not lo <= getattr(self, k) <= hi]
        if not 0.0 <= self.lead_in_s < self.duration_s:
            bad.append(f"lead_in_s must be in [0, duration_s), got {self.lead_in_s}")
        if abs(self.transpose + 12 * self.octave) > 36:
            bad.append("transpose + 12*octave must be within +-36 semitones, got "
                       f"{self.transpose}, {self.octave}")
        if bad:
            raise ConfigError(f"DemoPerformanceParams: {bad[0]}")
        return self

    def to_json(self) -> dict:
        """Plain dict (lists for tuples), the form used in render-parameter hashes."""
        return {**asdict(self), "form": list(self.form)}


def tune_form(tune: Tune, form_name: str, rng: np.random.Generator) -> tuple[int, ...]:
    """Indices into ``tune.part_passes()`` for one of :data:`FORMS` (a single-pass tune plays
    its one pass whatever the form)."""
    labels = [p.label for p in tune.part_passes()]
    idx = list(range(len(labels)))
    if form_name not in FORMS:
        raise ConfigError(f"form_name must be one of {FORMS}, got {form_name!r}")
    if form_name == "written" or len(idx) == 1:
        return tuple(idx)
    if form_name == "twice":
        return tuple(idx + idx)
    if form_name == "once":
        return tuple(i for i in idx if labels.index(labels[i]) == i)
    if form_name == "start_b":
        k = next((i for i, lab in enumerate(labels) if lab != labels[0]), 1)
        return tuple(idx[k:] + idx[:k])
    if form_name == "drop_repeat":
        cands = [i for i in idx if labels.count(labels[i]) > 1]
        drop = cands[int(rng.integers(len(cands)))] if cands else -1
        return tuple(i for i in idx if i != drop)
    k = int(rng.integers(len(idx)))  # extra_repeat
    return tuple(idx[: k + 1] + [idx[k]] + idx[k + 1:])


def _spread(base: int, stream: int, options: Sequence, n: int) -> list:
    """``n`` of ``options``, each used before any repeats; the first do not depend on ``n``."""
    g, k = np.random.default_rng([base, stream]), len(options)
    order = np.concatenate([g.permutation(k) for _ in range(-(-n // k))])[:n]
    return [options[int(i)] for i in order]


def draw_performance_params(tune: Tune, n: int, seed: int | np.random.Generator = 0, *,
                            min_seconds: float = 25.0,
                            max_seconds: float = 40.0) -> list[DemoPerformanceParams]:
    """Draw ``n`` distinct, validated performance settings for ``tune``: instruments,
    transpositions and forms spread over the versions (without replacement where possible),
    tempi over +-25 % of ``tune.base_bpm`` (a golden-ratio sequence), the rest drawn per version,
    durations uniform in [min_seconds, max_seconds]. The first ``k`` do not depend on ``n``."""
    if n < 1 or not 0.5 <= min_seconds <= max_seconds:
        raise ConfigError(f"draw_performance_params: need n >= 1 and 0.5 <= min_seconds <= "
                          f"max_seconds, got {n}, {min_seconds}, {max_seconds}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    base = int(rng.integers(2**63))  # every draw below derives from it, per aspect and version
    instruments = _spread(base, 1, INSTRUMENTS, n)
    transposes = _spread(base, 2, range(-5, 7), n)
    forms = _spread(base, 3, FORMS, n)
    u0 = float(np.random.default_rng([base, 4]).random())
    tempo_factors = 0.75 + 0.5 * ((u0 + np.arange(n) * 0.6180339887498949) % 1.0)
    mean_pitch = float(np.mean([x.pitch for x in tune.notes]))
    m = re.match(r"^(\d+)/(\d+)$", tune.meter or "")
    compound = bool(m) and int(m.group(1)) % 3 == 0 and int(m.group(1)) > 3  # 6/8, 9/8: no swing
    out = []
    for j, inst in enumerate(instruments):
        rng = np.random.default_rng([base, 100 + j])

        def draw(lo: float, hi: float, digits: int, neutral: float | None = None,
                 rng=rng) -> float:  # uniform, rounded; with neutral: that or the draw, evenly
            x = float(rng.uniform(lo, hi))
            return round(x if neutral is None else float(rng.choice([neutral, x])), digits)

        octave = round((_INSTRUMENT_CENTRE[inst] - mean_pitch - transposes[j]) / 12.0)
        accomp = str(rng.choice(["none", "none", "drone", "chords"]))
        accomp_inst = "drone" if accomp == "drone" else (
            "plucked" if inst in ("piano", "accordion") else str(rng.choice(["piano", "accordion"])))
        form_rng = np.random.default_rng(rng.integers(2**63))
        out.append(DemoPerformanceParams(  # keyword order = draw order: keep it
            tempo_bpm=round(float(tune.base_bpm * tempo_factors[j]), 1), transpose=transposes[j],
            octave=int(np.clip(octave, -1, 1)), tuning_cents=draw(-20, 20, 1), instrument=inst,
            form_name=forms[j], form=tune_form(tune, forms[j], form_rng),
            ornament_rate=draw(0.05, 0.35, 3, neutral=0.0),
            swing=1.0 if compound else draw(1.05, 1.4, 3, neutral=1.0),
            tempo_drift=draw(0.0, 0.04, 4), timing_jitter_ms=draw(0.0, 12.0, 1),
            accompaniment=accomp, accompaniment_instrument=accomp_inst,
            accompaniment_gain_db=draw(-18.0, -10.0, 1), room_rt60_s=draw(0.15, 1.1, 3),
            room_wet=draw(0.0, 0.45, 3), snr_db=draw(15.0, 40.0, 1),
            noise_colour=str(rng.choice(["white", "pink"])), loudness_db=draw(-30.0, -16.0, 1),
            lead_in_s=draw(0.0, 0.6, 3), duration_s=draw(min_seconds, max_seconds, 2),
            seed=int(rng.integers(2**31))).validate())
    return out


def describe_performance(params: DemoPerformanceParams, tune: Tune | None = None) -> str:
    """One line, e.g. "tempo 104 bpm, key +3, fiddle, reel, AABB, drone, tuning +5 c, ..."."""
    p = params
    form = p.form_name if tune is None else "".join(tune.part_passes()[i].label for i in p.form)
    parts = [f"tempo {p.tempo_bpm:.0f} bpm", f"key {p.transpose:+d}",
             f"octave {p.octave:+d}" if p.octave else "", p.instrument,
             tune.rhythm if tune is not None else "", form or "?",
             f"ornaments {p.ornament_rate:.2f}" if p.ornament_rate > 0 else "",
             f"swing {p.swing:.2f}" if p.swing != 1.0 else "",
             {"none": "", "drone": "drone"}.get(p.accompaniment,
                                                 f"chords on {p.accompaniment_instrument}"),
             f"tuning {p.tuning_cents:+.0f} c", f"room {p.room_rt60_s:.2f} s",
             f"{p.noise_colour} noise {p.snr_db:.0f} dB SNR"]
    return ", ".join(x for x in parts if x)


class Events(NamedTuple):
    """Timed notes of one voice, arrays [n]: onset and held duration (seconds), MIDI pitch
    (float, tuning included) and linear amplitude."""

    onset: np.ndarray
    dur: np.ndarray
    midi: np.ndarray
    amp: np.ndarray


def _columns(rows: list[tuple], n: int) -> list[np.ndarray]:
    """The ``n`` columns (float arrays) of a list of ``n``-tuples, empty arrays for no rows."""
    return list(np.array(rows, dtype=float).reshape(-1, n).T)


def _scale_neighbour(pitch: int, scale: list[int], up: bool) -> int:
    """The next scale pitch above (or below) ``pitch``; ``scale`` holds pitch classes."""
    step = 1 if up else -1
    return next((pitch + step * k for k in (1, 2, 3) if (pitch + step * k) % 12 in scale),
                pitch + 2 * step)


def _laid_out_melody(tune: Tune, params: DemoPerformanceParams, max_beats: float):
    """Melody and bars along the performance's form, looped to ``max_beats``: (pitch [n] int,
    onset [n], dur [n], bar_starts [m], bar_lengths [m]), in beats."""
    passes = tune.part_passes()
    form = params.form or tuple(range(len(passes)))
    if any(not (0 <= i < len(passes)) for i in form):
        raise ConfigError(f"form index out of range in {form}: tune {tune.title!r} has "
                          f"{len(passes)} passes; draw the parameters with "
                          "draw_performance_params(tune, ...)")
    played = [passes[i] for i in form if passes[i].end > passes[i].start]
    if not tune.notes or not played:
        raise ConfigError(f"tune {tune.title!r} has no notes, or its passes have no length")
    notes = np.array([[n.pitch, n.onset, n.duration] for n in tune.notes], dtype=float)
    bars = np.array(tune.bar_list(), dtype=float)
    pieces, cursor = [], 0.0
    for p in itertools.cycle(played):
        if cursor >= max_beats:
            break
        sel = (notes[:, 1] >= p.start - 1e-9) & (notes[:, 1] < p.end - 1e-9)
        bsel = (bars[:, 0] >= p.start - 1e-9) & (bars[:, 0] < p.end - 1e-9)
        pieces.append((notes[sel, 0], notes[sel, 1] - p.start + cursor,
                       np.minimum(notes[sel, 2], p.end - notes[sel, 1]),
                       bars[bsel, 0] - p.start + cursor, bars[bsel, 1]))
        cursor += p.end - p.start
    pitch, onset, dur, bar_s, bar_n = (np.concatenate(x) for x in zip(*pieces, strict=True))
    return pitch.astype(int), onset, dur, bar_s, bar_n


def _ornament(pitch, onset, dur, tune: Tune, rate: float, rng: np.random.Generator):
    """Add rolls, passing notes and grace notes (beats). Returns (pitch, onset, dur, weight),
    ``weight`` 1 for written notes and < 1 for ornament notes."""
    step, scale = tune.typical_step, scale_pcs(tune)
    grace = min(0.35 * step, 0.25)
    out: list[tuple[int, float, float, float]] = []  # (pitch, onset, dur, weight)
    draws, kinds = rng.random(len(pitch)), rng.random(len(pitch))
    for i, (p, o, d) in enumerate(zip(pitch.tolist(), onset.tolist(), dur.tolist(), strict=True)):
        nxt = int(pitch[i + 1]) if i + 1 < len(pitch) else p
        if draws[i] >= rate or d < 0.6 * step:
            out.append((p, o, d, 1.0))
        elif d >= 1.5 * step and kinds[i] < 0.5:  # roll: note, upper, note, lower, note
            up, lo = _scale_neighbour(p, scale, True), _scale_neighbour(p, scale, False)
            t = o
            for q, f, w in zip([p, up, p, lo, p], [0.4, 0.12, 0.16, 0.12, 0.2],
                               [1.0, 0.7, 0.85, 0.7, 0.85], strict=True):
                out.append((q, t, f * d, w))
                t += f * d
        elif 3 <= abs(nxt - p) <= 4 and kinds[i] < 0.8:  # passing note in the second half
            mid = _scale_neighbour(p, scale, nxt > p)
            mid = p + (1 if nxt > p else -1) if mid == nxt else mid
            out += [(p, o, d / 2, 1.0), (mid, o + d / 2, d / 2, 0.85)]
        else:  # grace note from above, stealing time from the start of the note
            g = min(grace, 0.3 * d)
            out += [(_scale_neighbour(p, scale, True), o, g, 0.6), (p, o + g, d - g, 1.0)]
    p_, o_, d_, w_ = _columns(out, 4)
    return p_.astype(int), o_, d_, w_


def _swing_warp(beats: np.ndarray, unit: float, ratio: float) -> np.ndarray:
    """Warp beat positions so each pair of ``unit`` notes becomes long-short with ``ratio``
    (1.0 = no change); pair boundaries stay in place."""
    if ratio == 1.0 or unit <= 0:
        return beats
    pair = 2.0 * unit
    k = np.floor(beats / pair)
    r = beats - k * pair
    long = pair * ratio / (1.0 + ratio)
    return k * pair + np.where(r < unit, r * long / unit, long + (r - unit) * (pair - long) / unit)


def _chord_for_bar(bar_pcs: np.ndarray, weights: np.ndarray, tune: Tune) -> list[int]:
    """Pitch classes of the diatonic triad (I, IV, V, vi, ii; earlier wins ties) that best
    covers a bar's melody notes, weighted by duration."""
    scale = scale_pcs(tune)
    best, best_score = [tune.tonic, (tune.tonic + 4) % 12, (tune.tonic + 7) % 12], -1.0
    for deg in (0, 3, 4, 5, 1):
        triad = [scale[deg], scale[(deg + 2) % 7], scale[(deg + 4) % 7]]
        if (triad[2] - triad[0]) % 12 != 7 or (triad[1] - triad[0]) % 12 not in (3, 4):
            continue  # diminished or odd triads
        score = float(np.sum(weights[np.isin(bar_pcs, triad)])) + (0.01 if deg == 0 else 0.0)
        if score > best_score + 1e-9:
            best, best_score = triad, score
    return best


def performance_events(tune: Tune, params: DemoPerformanceParams,
                       rng: np.random.Generator) -> tuple[Events, Events]:
    """(melody, accompaniment) events cut to ``params.duration_s``; seconds from the start of
    the rendering (lead-in included)."""
    drift_period, drift_phase = float(rng.uniform(16.0, 48.0)), float(rng.uniform(0.0, 2.0 * np.pi))
    play_s = params.duration_s - params.lead_in_s
    max_beats = (play_s + 1.0) * params.tempo_bpm / 60.0 * (1.0 + params.tempo_drift) + 4.0
    written = _laid_out_melody(tune, params, max_beats)
    pitch, onset, dur, weight = _ornament(*written[:3], tune, params.ornament_rate, rng)
    unit, w = tune.typical_step, 2.0 * np.pi / drift_period

    def to_s(b: np.ndarray) -> np.ndarray:
        """Seconds at beat positions: swing, then a tempo wandering by +-tempo_drift."""
        b = _swing_warp(b, unit, params.swing)
        drift = params.tempo_drift / w * (np.cos(drift_phase) - np.cos(w * b + drift_phase))
        return params.lead_in_s + 60.0 / params.tempo_bpm * (b + drift)

    t0, t1 = to_s(onset), to_s(onset + dur)
    jitter = np.clip(rng.normal(0.0, params.timing_jitter_ms / 1000.0, len(t0)), -0.03, 0.03)
    t0 = np.maximum(t0 + jitter, 0.0)
    t1 = np.maximum(t1 + jitter, t0 + 0.01)
    on_bar = np.isin(np.round(onset, 6), np.round(written[3], 6))  # bar accents, velocity spread
    amp = weight * 10.0 ** ((np.where(on_bar, 2.0, 0.0) + rng.normal(0.0, 1.0, len(t0))) / 20.0)
    shift = params.transpose + 12 * params.octave + params.tuning_cents / 100.0
    keep = t0 < params.duration_s
    melody = Events(t0[keep], (t1 - t0)[keep], pitch[keep] + shift, amp[keep])
    return melody, _accompaniment(tune, params, written, to_s)


def _accompaniment(tune: Tune, params: DemoPerformanceParams, written: tuple, to_s) -> Events:
    """A held tonic-and-fifth drone, or one strummed triad per bar, or nothing."""
    if params.accompaniment == "none":
        return Events(*_columns([], 4))
    low = 36 + (tune.tonic + params.transpose) % 12  # accompaniment root, MIDI 36..47
    cents = params.tuning_cents / 100.0
    if params.accompaniment == "drone":
        return Events(np.full(2, params.lead_in_s), np.full(2, params.duration_s - params.lead_in_s),
                      np.array([low, low + 7.0]) + cents, np.array([1.0, 0.7]))
    pitch, onset, dur, bar_start, bar_len = written
    rows = []  # (onset s, dur s, midi, amp)
    for s, n, t_s, t_e in zip(bar_start, bar_len, to_s(bar_start), to_s(bar_start + bar_len),
                              strict=True):
        if t_s >= params.duration_s:
            break
        sel = (onset >= s - 1e-9) & (onset < s + n - 1e-9)
        triad = _chord_for_bar(pitch[sel] % 12, dur[sel], tune)
        root = low + 12 + (triad[0] - tune.tonic) % 12
        root -= 12 if root > low + 18 else 0
        for k, v in enumerate([0, (triad[1] - triad[0]) % 12, (triad[2] - triad[0]) % 12]):
            rows.append((t_s + 0.012 * k, max(t_e - t_s - 0.05, 0.1), root + v + cents,
                         0.8 if k else 1.0))
    return Events(*_columns(rows, 4))
