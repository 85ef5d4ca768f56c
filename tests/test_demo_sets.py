"""chlib.demo.sets (issue 12, part B): sets of recordings joined back to back, with the ground
truth of which tune plays where. Inputs are short sine tones, one frequency per recording, so
the dominant frequency tells which recording sounds at any moment."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chlib.core.errors import ConfigError, ManifestError
from chlib.core.manifest import write_manifest
from chlib.demo import sets as demo_sets
from chlib.demo.sets import PART_PEAK, make_demo_sets, make_sets, read_sets, sets_for

SR = 8000
WIN = 0.1  # s: analysis window (10 Hz resolution; tones are >= 100 Hz apart)


def _freq(k: int) -> float:
    return 300.0 + 100.0 * k


def _write_records(root: Path, n_works: int = 6, per_work: int = 1) -> list[dict]:
    """``n_works * per_work`` tone recordings (2-3 s, various levels); the second one is stereo
    at 16 kHz, so it is resampled and mixed down."""
    recs = []
    for k in range(n_works * per_work):
        w, sr, secs = k // per_work, 16000 if k == 1 else SR, 2.0 + 0.25 * (k % 5)
        t = np.arange(int(secs * sr)) / sr
        y = (0.2 + 0.1 * (k % 6)) * np.sin(2 * np.pi * _freq(k) * t)
        path = root / "in" / f"r{k:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.stack([y, y], axis=1) if k == 1 else y, sr)
        recs.append({"perf": f"r{k:02d}", "work": f"w{w}", "wav": str(path)})
    return recs


def _dominant(y: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec)) * SR / len(y)


def _rms(y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))


def test_segments_match_the_audio(tmp_path: Path) -> None:
    recs = _write_records(tmp_path)
    freq = {r["perf"]: _freq(k) for k, r in enumerate(recs)}
    secs = {r["perf"]: sf.info(r["wav"]).duration for r in recs}
    sets = read_sets(make_sets(recs, tmp_path / "sets", n_sets=12, gap_share=0.34))
    assert {j["kind"] for s in sets for j in s["joins"]} == {"crossfade", "cut", "gap"}
    w = int(WIN * SR)
    for s in sets:
        y, sr = sf.read(s["wav"], dtype="float32")
        info = sf.info(s["wav"])
        assert (sr, info.channels, info.subtype) == (SR, 1, "PCM_16") == (s["sample_rate"], 1,
                                                                          "PCM_16")
        assert s["duration_s"] == pytest.approx(len(y) / SR, abs=1e-6)
        assert np.abs(y).max() <= 1.0
        segs = s["segments"]
        for j, seg in enumerate(segs):
            a, b = round(seg["start_s"] * SR), round(seg["end_s"] * SR)
            f = freq[seg["perf"]]
            for part in (y[a:b], y[a:a + w], y[b - w:b]):  # whole, first and last 0.1 s
                assert _dominant(part) == pytest.approx(f, abs=15), (s["set"], j)
            # similar levels: each part alone (outside crossfades) has peak PART_PEAK
            solo = y[round(s["joins"][j - 1]["end_s"] * SR) if j else 0:
                     round(s["joins"][j]["start_s"] * SR) if j < len(segs) - 1 else len(y)]
            assert np.abs(solo).max() == pytest.approx(PART_PEAK, rel=0.02)
            if j == len(segs) - 1:
                assert seg["end_s"] == pytest.approx(s["duration_s"], abs=1e-3)
                continue
            join, nxt = s["joins"][j], segs[j + 1]
            after = y[b:b + w]
            if join["kind"] == "gap":  # silence or quiet noise, in no segment
                assert (seg["end_s"], nxt["start_s"]) == (join["start_s"], join["end_s"])
                assert 0.5 - 1e-3 <= join["end_s"] - join["start_s"] <= 3.0 + 1e-3
                gap = y[b:round(nxt["start_s"] * SR)]
                assert _rms(gap) < 0.01
            else:
                assert _dominant(after) == pytest.approx(freq[nxt["perf"]], abs=15)
                assert nxt["start_s"] == seg["end_s"]
                # 1.5 s, but at most half of either part
                expect = (min(1.5, secs[seg["perf"]] / 2, secs[nxt["perf"]] / 2)
                          if join["kind"] == "crossfade" else 0.0)
                assert join["end_s"] - join["start_s"] == pytest.approx(expect, abs=1e-3)
                assert seg["end_s"] == pytest.approx((join["start_s"] + join["end_s"]) / 2,
                                                     abs=1e-3)
        assert segs[0]["start_s"] == 0.0


def test_distinct_works_spread_and_coverage(tmp_path: Path) -> None:
    recs = _write_records(tmp_path, n_works=5, per_work=2)
    sets = read_sets(make_sets(recs, tmp_path / "sets", n_sets=40, gap_share=0.0))
    assert len(sets) == 40
    for s in sets:
        works = [seg["work"] for seg in s["segments"]]
        assert len(works) == len(set(works)), s["set"]
    assert sorted(Counter(len(s["segments"]) for s in sets).items()) == [(2, 14), (3, 13), (4, 13)]
    # few sets: every recording still used at least once (12 parts for 10 recordings)
    few = read_sets(make_sets(recs, tmp_path / "few", n_sets=4, min_works=3, max_works=3))
    assert {seg["perf"] for s in few for seg in s["segments"]} == {r["perf"] for r in recs}


def test_deterministic_by_seed(tmp_path: Path) -> None:
    recs = _write_records(tmp_path)
    a, b, c = (make_sets(recs, tmp_path / name, n_sets=6, seed=seed)
               for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert a.read_text() == b.read_text()
    assert [p.read_bytes() for p in sorted(a.parent.glob("*.wav"))] == \
           [p.read_bytes() for p in sorted(b.parent.glob("*.wav"))]
    assert [s["segments"] for s in read_sets(a)] != [s["segments"] for s in read_sets(c)]


def test_resume_skips_written_sets_and_leaves_no_half_files(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    recs = _write_records(tmp_path)
    reference = make_sets(recs, tmp_path / "ref", n_sets=6).read_text()
    encode, calls, kill_at = demo_sets._wav_bytes, [], [3]

    def failing(y: np.ndarray, sr: int) -> bytes:
        calls.append(1)
        if len(calls) == kill_at[0]:
            raise RuntimeError("killed")
        return encode(y, sr)

    monkeypatch.setattr(demo_sets, "_wav_bytes", failing)
    out = tmp_path / "sets"
    with pytest.raises(RuntimeError, match="killed"):
        make_sets(recs, out, n_sets=6)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert len(list(out.glob("*.wav"))) == 2
    calls.clear()
    kill_at[0] = 0
    assert make_sets(recs, out, n_sets=6).read_text() == reference
    assert len(calls) == 4  # the two finished sets were kept
    calls.clear()
    (out / "set_004.wav").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")}
    assert make_sets(recs, out, n_sets=6).read_text() == reference
    assert len(calls) == 1
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.glob("*.wav")
               if p.name != "set_004.wav")


def test_unreadable_recording_is_reported_and_the_rest_are_made(tmp_path: Path) -> None:
    recs = _write_records(tmp_path)
    bad = Path(recs[2]["wav"])
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(64))
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        sets = read_sets(make_sets(recs, tmp_path / "sets", n_sets=8))
    assert len(sets) == 8
    assert recs[2]["perf"] not in {seg["perf"] for s in sets for seg in s["segments"]}
    info = json.loads((tmp_path / "sets" / "sets_info.json").read_text())
    assert [s["perf"] for s in info["skipped"]] == [recs[2]["perf"]]


def test_make_demo_sets_uses_test_recordings_of_reference_works(tmp_path: Path) -> None:
    recs = _write_records(tmp_path, n_works=5, per_work=2)
    ds = tmp_path / "ds"
    write_manifest(ds / "train.txt", recs[0:6:2])  # one recording of works w0-w2
    write_manifest(ds / "val.txt", recs[6:7])  # w3
    write_manifest(ds / "test.txt", recs[1:8:2] + recs[8:10])  # w0-w3 and test-only w4
    path = make_demo_sets(ds, n_sets=5)
    assert path == ds / "sets" / "sets.jsonl"
    used = {seg["perf"] for s in read_sets(path) for seg in s["segments"]}
    assert used == {r["perf"] for r in recs[1:8:2]}
    assert sets_for(ds, "auto") == (path, f"sets made from the held-out recordings of {ds}: {path}")
    assert sets_for(ds, "") == (None, "no sets (sets_path is empty)")
    assert sets_for(ds, "mine/sets.jsonl")[0] == Path("mine/sets.jsonl")
    bare = tmp_path / "bare"  # no held-out recordings: 06 says why and goes on
    write_manifest(bare / "train.txt", recs[:4])
    none, why = sets_for(bare, "auto")
    assert none is None and "no sets made from" in why and "test.txt" in why


VALID = {"set": "s", "wav": "s.wav", "duration_s": 10.0,
         "segments": [{"start_s": 0.0, "end_s": 4.0, "work": "a", "perf": "a1"},
                      {"start_s": 5.0, "end_s": 10.0, "work": "b", "perf": "b1"}]}


@pytest.mark.parametrize(("line", "why"), [
    ('{"set": "s", "wav": ', "not a JSON record"),
    (json.dumps({k: v for k, v in VALID.items() if k != "duration_s"}), "missing key.*duration_s"),
    (json.dumps({**VALID, "segments": VALID["segments"][::-1]}), "time order"),
    (json.dumps({**VALID, "duration_s": 9.0}), "beyond duration_s"),
    (json.dumps({**VALID, "segments": [{"start_s": 0.0, "end_s": 1.0}]}), "missing key.*work"),
])
def test_read_sets_names_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "sets.jsonl"
    path.write_text(json.dumps(VALID) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=re.escape(f"{path} line 2: ") + ".*" + why):
        read_sets(path)
    path.write_text(json.dumps(VALID) + "\n")
    assert read_sets(tmp_path)[0]["wav"] == str((tmp_path / "s.wav").resolve())


@pytest.mark.parametrize("kw", [{"min_works": 3, "max_works": 2}, {"gap_share": 1.5},
                                {"n_sets": 0}, {"seed": -1}, {"min_works": 7, "max_works": 7}])
def test_bad_arguments_raise(tmp_path: Path, kw: dict) -> None:
    recs = _write_records(tmp_path)
    with pytest.raises(ConfigError):
        make_sets(recs, tmp_path / "sets", **kw)
