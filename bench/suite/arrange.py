"""One version of a tune: drawn settings, the note events they give, and a Standard MIDI File.

Times in events are seconds; the MIDI file runs at a fixed 120 bpm, 480 ticks per quarter, so a
tick is 1/960 s and the tune's own tempo lives in the event times.
"""
from __future__ import annotations

import random
import struct

# name:GM program:lowest:highest MIDI note of the instrument's natural register
MELODY = [(n, int(p), int(lo), int(hi)) for n, p, lo, hi in (x.split(":") for x in (
    "acoustic grand:0:48:84, bright piano:1:48:84, electric piano:4:48:84, harpsichord:6:48:84, "
    "celesta:8:60:96, glockenspiel:9:72:100, music box:10:60:96, vibraphone:11:53:89, "
    "marimba:12:48:84, xylophone:13:65:96, drawbar organ:16:48:84, church organ:19:48:84, "
    "accordion:21:53:89, harmonica:22:60:84, nylon guitar:24:40:76, steel guitar:25:40:76, "
    "jazz guitar:26:40:76, overdrive guitar:29:40:76, fingered bass:33:28:55, "
    "fretless bass:35:28:55, violin:40:55:91, viola:41:48:81, cello:42:36:69, "
    "contrabass:43:28:55, pizzicato strings:45:36:84, harp:46:36:91, string ensemble:48:43:84, "
    "choir aahs:52:48:79, trumpet:56:55:82, trombone:57:40:72, tuba:58:28:55, "
    "french horn:60:41:77, soprano sax:64:56:87, alto sax:65:49:80, tenor sax:66:44:75, "
    "baritone sax:67:36:68, oboe:68:58:91, english horn:69:52:81, bassoon:70:34:72, "
    "clarinet:71:50:91, piccolo:72:74:102, flute:73:60:96, recorder:74:60:91, "
    "pan flute:75:60:91, ocarina:79:60:88, square lead:80:48:84, sitar:104:48:79, "
    "banjo:105:48:79, shamisen:106:50:79, kalimba:108:55:84, fiddle:110:55:88, "
    "steel drums:114:55:84").split(", "))]
ACCOMP = [(n, int(p)) for n, p in (x.split(":") for x in (
    "acoustic grand:0, electric piano:4, harpsichord:6, reed organ:20, nylon guitar:24, "
    "steel guitar:25, string ensemble:48, slow strings:49, synth pad:88, church organ:19, "
    "harp:46, accordion:21").split(", "))]
BASS = [(n, int(p)) for n, p in (x.split(":") for x in (
    "acoustic bass:32, fingered bass:33, contrabass:43, tuba:58, bassoon:70, synth bass:38, "
    "cello:42").split(", "))]
BASE_BPM = {"bach": 72.0, "essenFolksong": 104.0, "ryansMammoth": 112.0, "oneills1850": 112.0}


def _sections(tune: dict) -> list[tuple[float, float]]:
    """The tune cut at bar lines into 2-4 roughly equal sections (beats)."""
    end = max(o + d for o, d, _ in tune["notes"])
    bars = [b for b in tune["bars"] if 0 < b < end - 1e-6]
    k = 2 if len(bars) < 8 else (3 if len(bars) < 16 else 4)
    cuts = [min(bars, key=lambda b, i=i: abs(b - end * i / k)) for i in range(1, k)] if bars else []
    cuts = sorted(set(cuts))
    edges = [0.0] + cuts + [end]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def draw(tune: dict, version: int, seed: int, fonts: list[str]) -> dict:
    """The settings of one version, from a generator seeded by (seed, work, version)."""
    r = random.Random(f"{seed}|{tune['id']}|{version}")
    name, prog, lo, hi = r.choice(MELODY)
    key = r.randint(-7, 7)
    pitches = sorted(p for _, _, p in tune["notes"])
    mid = pitches[len(pitches) // 2] + key
    octave = round(((lo + hi) / 2 - mid) / 12)
    n_sec = len(_sections(tune))
    form = r.choice(["written"] * 3 + ["twice", "repeat", "cut"])
    p = {"font": r.choice(fonts), "program": prog, "instrument": name, "key": key, "octave": octave,
         "tempo": round(r.uniform(0.75, 1.3), 3), "form": form, "section": r.randrange(n_sec),
         "ornaments": round(r.uniform(0.05, 0.3), 2) if r.random() < 0.5 else 0.0,
         "velocity": r.randint(60, 110), "jitter_ms": r.choice([0, 5, 12, 20]),
         "accomp": r.choice(["none", "none", "bass", "chords"] + (["voices"] * 2 if tune["voices"] else [])),
         "accomp_program": r.choice(ACCOMP), "bass_program": r.choice(BASS),
         "reverb": [r.randint(10, 90), r.randint(20, 100), r.randint(-6, 0)] if r.random() < 0.7 else None,
         "lowpass": r.choice([3000, 4500, 6000]) if r.random() < 0.2 else None,
         "snr_db": round(r.uniform(12, 40), 1) if r.random() < 0.7 else None,
         "peak": round(r.uniform(0.3, 0.9), 2), "seconds": round(r.uniform(20, 45), 2),
         "rng": r.getrandbits(32)}
    return p


def describe(t: dict, p: dict) -> str:
    sec = f"section {p['section'] + 1}"
    form = {"written": "as written", "twice": "played twice", "repeat": f"{sec} repeated",
            "cut": f"{sec} cut"}[p["form"]]
    acc = {"none": "solo", "bass": f"bass on {p['bass_program'][0]}",
           "chords": f"bass+chords on {p['accomp_program'][0]}",
           "voices": f"written lower voices on {p['accomp_program'][0]}"}[p["accomp"]]
    bits = [f"{p['instrument']} ({p['font'].rsplit('/', 1)[-1].split('.')[0]})",
            f"key {p['key']:+d}, octave {p['octave']:+d}", f"tempo x{p['tempo']:.2f}", form, acc]
    for key, fmt in [("ornaments", "ornaments {:.2f}"), ("reverb", "reverb {0[0]}%"),
                     ("lowpass", "lowpass {} Hz"), ("snr_db", "pink noise {:.0f} dB SNR")]:
        if p[key]:
            bits.append(fmt.format(p[key]))
    return ", ".join(bits)


def _order(tune: dict, p: dict) -> list[tuple[float, float]]:
    secs = _sections(tune)
    s = p["section"] % len(secs)
    if p["form"] == "twice":
        return secs + secs
    if p["form"] == "repeat":
        return secs[:s + 1] + [secs[s]] + secs[s + 1:]
    if p["form"] == "cut" and len(secs) > 1:
        return secs[:s] + secs[s + 1:]
    return secs


def _chord_of(notes: list, a: float, b: float) -> list[int]:
    """The major or minor triad (pitch classes) that best covers the melody in [a, b)."""
    w = [0.0] * 12
    for o, d, pi in notes:
        ov = min(o + d, b) - max(o, a)
        if ov > 0:
            w[pi % 12] += ov
    best = max(((root, q) for root in range(12) for q in (4, 3)),
                key=lambda rq: w[rq[0]] * 1.2 + w[(rq[0] + rq[1]) % 12] + w[(rq[0] + 7) % 12])
    return [best[0], (best[0] + best[1]) % 12, (best[0] + 7) % 12]


def events(tune: dict, p: dict) -> list[tuple[float, float, int, int, int]]:
    """(start s, duration s, channel, midi, velocity) of the whole version, cut at p['seconds']."""
    r = random.Random(p["rng"])
    spb = 60.0 / (BASE_BPM.get(tune["corpus"], 96.0) * p["tempo"])
    shift = p["key"] + 12 * p["octave"]
    order, out, t0 = _order(tune, p), [], 0.0
    bpb = tune["beats_per_bar"] if tune["beats_per_bar"] > 0 else 4.0
    while t0 < p["seconds"]:
        for a, b in order:
            sec = [n for n in tune["notes"] if a <= n[0] < b]
            for i, (o, d, pi) in enumerate(sec):
                start, dur, pitch = t0 + (o - a) * spb, d * spb, pi + shift
                start += r.uniform(-1, 1) * p["jitter_ms"] / 1000 if start > 0 else 0
                vel = max(20, min(127, p["velocity"] + r.randint(-12, 12)))
                if p["ornaments"] and dur > 0.25 and r.random() < p["ornaments"]:
                    g = min(0.07, dur / 3)  # grace note from the neighbour above or below
                    out.append((start, g, 0, pitch + r.choice([1, 2, -1, -2]), vel - 10))
                    start, dur = start + g, dur - g
                elif p["ornaments"] and i + 1 < len(sec) and abs(sec[i + 1][2] - pi) in (3, 4) \
                        and dur > 0.3 and r.random() < p["ornaments"]:
                    half = dur / 2  # passing note filling a third
                    out.append((start, half, 0, pitch, vel))
                    start, dur, pitch = start + half, half, pitch + (2 if sec[i + 1][2] > pi else -2)
                out.append((start, dur * 0.95, 0, pitch, vel))
            if p["accomp"] == "voices":
                for v in tune["voices"]:
                    out += [(t0 + (o - a) * spb, d * spb * 0.95, 1, pi + p["key"], p["velocity"] - 25)
                            for o, d, pi in v if a <= o < b]
            elif p["accomp"] in ("bass", "chords"):
                bar = a
                while bar < b - 1e-6:
                    e = min(bar + bpb, b)
                    root, third, fifth = _chord_of(tune["notes"], bar, e)
                    t, dur = t0 + (bar - a) * spb, (e - bar) * spb
                    k = p["key"]
                    out.append((t, dur * 0.9, 2, 36 + (root + k) % 12, p["velocity"] - 15))
                    if p["accomp"] == "chords":  # close triad in the octave above C3
                        out += [(t, dur * 0.9, 1, 48 + (pc + k) % 12, p["velocity"] - 30)
                                for pc in (root, third, fifth)]
                    bar = e
            t0 += (b - a) * spb
            if t0 >= p["seconds"]:
                break
    return [(s, d, c, m, v) for s, d, c, m, v in out if s < p["seconds"] - 0.2 and 0 <= m <= 127]


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def midi_bytes(evs: list, p: dict, end_s: float) -> bytes:
    """A format-0 MIDI file: program changes, the notes, an end-of-track at end_s."""
    tps = 960  # ticks per second at 120 bpm, 480 ppq
    msgs = [(0, 0, bytes([0xC0, p["program"]])), (0, 0, bytes([0xC1, p["accomp_program"][1]])),
            (0, 0, bytes([0xC2, p["bass_program"][1]]))]
    msgs += [(0, 0, bytes([0xB0 | c, 91, 0])) for c in range(3)]  # reverb send off: sox adds the room
    for s, d, c, m, v in evs:
        on, off = max(0, round(s * tps)), max(1, round((s + max(d, 0.02)) * tps))
        msgs.append((on, 1, bytes([0x90 | c, m, max(1, min(127, v))])))
        msgs.append((off, 0, bytes([0x80 | c, m, 0])))
    msgs.sort(key=lambda x: (x[0], x[1]))  # note-offs before note-ons at the same tick
    data, now = b"", 0
    for tick, _, msg in msgs:
        data += _vlq(tick - now) + msg
        now = tick
    data += _vlq(max(0, round(end_s * tps) - now)) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(data)) + data
