"""Tests for chlib.demo: real tunes, synthesised performances, the dataset on disk.

Timing figures (tune cache, tiny dataset build) live in bench/bench_demo.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import chlib.demo as dd
from chlib.core.config import load_prep_config
from chlib.core.errors import ConfigError
from chlib.demo import tunes as demo_tunes_mod

TINY = dict(n_works=4, perfs_per_work=3, min_seconds=8.0, max_seconds=10.0, seed=0,
            progress=False, num_workers=0)


@pytest.fixture(scope="module")
def tune_cache(tmp_path_factory) -> Path:
    """A tune cache shared by this module's tests (parsing happens once)."""
    cache = tmp_path_factory.mktemp("tune_cache")
    dd.demo_tunes(6, seed=0, cache_dir=cache)
    dd.demo_tunes(2, seed=1, cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tune_cache) -> dict:
    """A 4 works x 3 versions x 8-10 s dataset, built once."""
    out = tmp_path_factory.mktemp("demo") / "tiny"
    dataset = dd.make_demo_dataset(out, cache_dir=tune_cache, **TINY)
    records = [json.loads(x) for x in dataset.read_text().splitlines()]
    return {"out": out, "dataset": dataset, "records": records}


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _audio_files(out: Path) -> list[Path]:
    return sorted((out / "audio").rglob("*.flac"))


# --------------------------------------------------------------------------------------------
# tunes


def test_demo_tunes_are_deterministic_distinct_and_well_formed(tune_cache):
    a = dd.demo_tunes(6, seed=0, cache_dir=tune_cache)
    b = dd.demo_tunes(3, seed=0, cache_dir=tune_cache)
    assert [t.title for t in a[:3]] == [t.title for t in b]  # prefix does not depend on n
    assert len({t.source for t in a}) == 6
    other = dd.demo_tunes(2, seed=1, cache_dir=tune_cache)
    assert [t.source for t in other] != [t.source for t in a[:2]]
    for t in a:
        onsets = [n.onset for n in t.notes]
        assert len(t.notes) >= 32 and onsets == sorted(onsets)
        assert all(n.duration > 0 and 36 <= n.pitch <= 100 for n in t.notes)
        assert t.passes[0].start == 0.0 and t.passes[-1].end == pytest.approx(t.length_beats)
        for p, q in zip(t.passes, t.passes[1:], strict=False):
            assert p.end == pytest.approx(q.start)  # passes tile the time line
        assert 0 <= t.tonic < 12 and t.mode in demo_tunes_mod._MODE_SCALES


def test_tune_cache_serves_second_call_and_json_roundtrips(tune_cache, monkeypatch):
    cached = list((tune_cache / f"v{demo_tunes_mod._PARSE_VERSION}").glob("*.json"))
    assert len(cached) >= 6

    def no_parse(path):
        raise AssertionError(f"{path} parsed again despite the cache")

    monkeypatch.setattr(demo_tunes_mod, "_parse_abc_tune", no_parse)
    six = dd.demo_tunes(6, seed=0, cache_dir=tune_cache)
    assert dd.Tune.from_json(six[0].to_json()) == six[0]
    assert dd.Tune.from_json(json.loads(json.dumps(six[1].to_json()))) == six[1]


def test_default_cache_dir_follows_chlib_cache_dir(monkeypatch, tmp_path, tune_cache):
    monkeypatch.setenv("CHLIB_CACHE_DIR", str(tmp_path / "cache"))
    assert dd.default_tune_cache_dir() == tmp_path / "cache" / "demo_tunes"
    # seed the default location with the shared cache's files so no parsing is needed
    target = tmp_path / "cache" / "demo_tunes" / f"v{demo_tunes_mod._PARSE_VERSION}"
    target.mkdir(parents=True)
    for f in (tune_cache / f"v{demo_tunes_mod._PARSE_VERSION}").glob("*.json"):
        (target / f.name).write_bytes(f.read_bytes())
    tunes = dd.demo_tunes(2, seed=0)
    assert [t.title for t in tunes] == [t.title for t in dd.demo_tunes(2, 0, cache_dir=tune_cache)]


def test_demo_tunes_rejects_bad_n():
    with pytest.raises(ConfigError, match="positive integer"):
        dd.demo_tunes(0)


# --------------------------------------------------------------------------------------------
# rendering


def _one_note_tune(pitch: int = 69, beats: float = 8.0) -> dd.Tune:
    return dd.Tune(title="one note", notes=(dd.Note(pitch, 0.0, beats),))


@pytest.mark.parametrize(("transpose", "octave", "cents"), [(0, 0, 0.0), (3, 0, 15.0),
                                                            (-5, 1, -20.0)])
def test_rendered_pitch_follows_transpose_octave_and_tuning(transpose, octave, cents):
    params = dd.DemoPerformanceParams(tempo_bpm=60.0, transpose=transpose, octave=octave,
                                      tuning_cents=cents, instrument="accordion", snr_db=80.0,
                                      duration_s=4.0)
    sr = 16000
    y = dd.render_performance(_one_note_tune(69), params, sr)
    seg = y[sr // 2: 3 * sr].astype(float)  # 2.5 s of steady tone: 0.4 Hz bins
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 8 * len(seg)))
    freqs = np.fft.rfftfreq(8 * len(seg), 1 / sr)
    expected = 440.0 * 2 ** ((transpose + 12 * octave + cents / 100) / 12)
    band = (freqs > expected / 1.5) & (freqs < expected * 1.5)
    peak = freqs[band][np.argmax(spec[band])]
    assert abs(1200 * np.log2(peak / expected)) < 3.0  # within 3 cents


def test_render_is_bounded_finite_and_exact_length():
    tune = dd.Tune(title="scale", notes=tuple(dd.Note(60 + s, 0.5 * i, 0.5) for i, s in
                                              enumerate([0, 2, 4, 5, 7, 9, 11, 12] * 4)))
    for loud in (-40.0, 0.0):  # 0 dBFS RMS forces the peak limiter
        p = dd.DemoPerformanceParams(loudness_db=loud, room_wet=0.4, accompaniment="chords",
                                     snr_db=15.0, duration_s=3.3, lead_in_s=0.2)
        y = dd.render_performance(tune, p, 16000)
        assert y.dtype == np.float32 and y.shape == (round(3.3 * 16000),)
        assert np.all(np.isfinite(y)) and np.max(np.abs(y)) <= 0.9 + 1e-6
        assert np.sqrt(np.mean(y ** 2)) > 1e-3


def test_render_is_a_pure_function_of_its_parameters(tune_cache):
    tune = dd.demo_tunes(1, 0, cache_dir=tune_cache)[0]
    p = dd.draw_performance_params(tune, 1, seed=5, min_seconds=3.0, max_seconds=4.0)[0]
    a = dd.render_performance(tune, p, 16000)
    assert np.array_equal(a, dd.render_performance(tune, p, 16000))
    b = dd.render_performance(tune, dataclasses.replace(p, seed=p.seed + 1), 16000)
    assert not np.array_equal(a, b)  # the seed drives noise, room and ornaments


def test_invalid_parameters_raise_config_error(tune_cache):
    tune = dd.demo_tunes(1, 0, cache_dir=tune_cache)[0]
    with pytest.raises(ConfigError, match="instrument"):
        dd.render_performance(tune, dd.DemoPerformanceParams(instrument="theremin"), 16000)
    with pytest.raises(ConfigError, match="form index"):
        dd.render_performance(tune, dd.DemoPerformanceParams(form=(99,), duration_s=2.0), 16000)
    with pytest.raises(ConfigError, match="sample_rate"):
        dd.render_performance(tune, dd.DemoPerformanceParams(duration_s=2.0), 100)


def test_versions_of_a_work_differ_in_tempo_key_timbre_and_duration(tune_cache):
    tune = dd.demo_tunes(1, 0, cache_dir=tune_cache)[0]
    ps = dd.draw_performance_params(tune, 6, seed=0)
    assert len({p.instrument for p in ps}) == 5  # all five timbres before any repeats
    assert len({p.transpose for p in ps}) == 6
    assert len({p.duration_s for p in ps}) == 6
    assert len({p.form_name for p in ps}) == 6
    tempi = sorted(p.tempo_bpm / tune.base_bpm for p in ps)
    assert 0.75 <= tempi[0] and tempi[-1] <= 1.25 and tempi[-1] - tempi[0] > 0.2
    assert all(-5 <= p.transpose <= 6 and abs(p.tuning_cents) <= 20 for p in ps)
    assert all(15 <= p.snr_db <= 40 and 25 <= p.duration_s <= 40 for p in ps)


def test_forms_reorder_parts_as_named():
    notes = tuple(dd.Note(60 + (i % 8), float(i), 1.0) for i in range(32))
    tune = dd.Tune("aabb", notes, passes=(dd.Pass("A", 0, 8), dd.Pass("A", 8, 16),
                                          dd.Pass("B", 16, 24), dd.Pass("B", 24, 32)))
    rng = np.random.default_rng(0)
    assert dd.tune_form(tune, "written", rng) == (0, 1, 2, 3)
    assert dd.tune_form(tune, "once", rng) == (0, 2)
    assert dd.tune_form(tune, "start_b", rng) == (2, 3, 0, 1)
    assert len(dd.tune_form(tune, "drop_repeat", rng)) == 3
    assert len(dd.tune_form(tune, "extra_repeat", rng)) == 5
    assert dd.tune_form(tune, "twice", rng) == (0, 1, 2, 3) * 2


def _chroma(y: np.ndarray, sr: int, n_frames: int = 128) -> np.ndarray:
    """Chroma [12, n_frames], time-normalised to n_frames, unit-norm columns."""
    import librosa

    c = librosa.feature.chroma_stft(y=y, sr=sr, n_fft=2048, hop_length=512)
    grid = np.linspace(0, c.shape[1] - 1, n_frames)
    c = np.stack([np.interp(grid, np.arange(c.shape[1]), row) for row in c])
    return c / (np.linalg.norm(c, axis=0, keepdims=True) + 1e-9)


def test_versions_share_the_melody_more_than_other_works(tune_cache):
    """Key-aligned chroma of the same 64 running notes: versions of one work (other tempo, key,
    timbre, room, noise) match each other better than versions of other works."""
    sr = 16000
    feats: list[tuple[int, np.ndarray]] = []
    for wi, tune in enumerate(dd.demo_tunes(4, 0, cache_dir=tune_cache)):
        for p in dd.draw_performance_params(tune, 2, seed=wi):
            # play the written form from the top so that both excerpts hold the same notes
            excerpt_s = 64 * tune.typical_step * 60.0 / p.tempo_bpm
            p = dataclasses.replace(p, form_name="written", form=(),
                                    duration_s=p.lead_in_s + excerpt_s + 1.0)
            y = dd.render_performance(tune, p, sr)
            a = int(p.lead_in_s * sr)
            feats.append((wi, _chroma(y[a: a + int(excerpt_s * sr)], sr)))

    def sim(x: np.ndarray, z: np.ndarray) -> float:
        return max(float(np.mean(np.sum(np.roll(x, k, axis=0) * z, axis=0))) for k in range(12))

    same, diff, nearest_ok = [], [], 0
    for i, (wi, fi) in enumerate(feats):
        scores = [(sim(fi, fj), wj) for j, (wj, fj) in enumerate(feats) if j != i]
        nearest_ok += max(scores)[1] == wi
        for s, wj in scores:
            (same if wj == wi else diff).append(s)
    assert np.mean(same) > np.mean(diff) + 0.15
    assert nearest_ok >= 0.75 * len(feats)  # the nearest version is of the same work


# --------------------------------------------------------------------------------------------
# the dataset on disk


def test_dataset_txt_has_one_valid_line_per_performance(tiny):
    records = tiny["records"]
    assert len(records) == 4 * 3
    assert all(set(r) == {"perf", "wav", "dur_s", "work", "version"} for r in records)
    assert len({r["perf"] for r in records}) == 12
    works = {r["work"] for r in records}
    assert len(works) == 4 and all(w.startswith("w0") for w in works)
    assert all(sum(r["work"] == w for r in records) == 3 for w in works)
    for r in records:
        path = Path(r["wav"])
        assert path.is_absolute() or Path.cwd().joinpath(path).exists()
        info = sf.info(str(path))
        assert info.samplerate == 16000 and info.channels == 1
        assert r["dur_s"] == pytest.approx(info.frames / 16000, abs=1e-3)
        assert 8.0 <= r["dur_s"] <= 10.0
        assert r["version"].startswith("tempo ") and "key " in r["version"]


def test_labels_csv_holds_each_performances_tune_labels_and_lead_instrument(tiny):
    import csv
    import re

    from chlib.demo.generate import DEMO_LABEL_COLUMNS, write_demo_labels
    from chlib.demo.tunes import PC_NAMES

    out = tiny["out"]
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == DEMO_LABEL_COLUMNS
    assert [r["perf"] for r in rows] == [r["perf"] for r in tiny["records"]]
    works = {w["work"]: w for w in json.loads((out / "demo_info.json").read_text())["works"]}
    for row, rec in zip(rows, tiny["records"], strict=True):
        work = works[rec["work"]]
        assert (row["rhythm"], row["meter"]) == (work["rhythm"], work["meter"])
        assert row["instrument"] in dd.INSTRUMENTS and f", {row['instrument']}," in rec["version"]
        shift = int(re.search(r"key ([+-]\d+)", rec["version"]).group(1))
        tonic, mode = work["key"].split(" ", 1)
        assert row["key"] == f"{PC_NAMES[(PC_NAMES.index(tonic) + shift) % 12]} {mode}"
        assert row["mode"] == mode
    others = {f: _sha(f) for f in out.rglob("*") if f.is_file() and f.name != "labels.csv"}
    before = (out / "labels.csv").read_bytes()
    (out / "labels.csv").unlink()  # a dataset generated before labels existed gets them back
    assert write_demo_labels(out).read_bytes() == before
    assert {f: _sha(f) for f in others} == others  # nothing else was touched


def test_audio_files_are_finite_unclipped_and_not_silent(tiny):
    files = _audio_files(tiny["out"])
    assert len(files) == 12
    for f in files:
        y, sr = sf.read(f, dtype="float32")
        assert sr == 16000 and np.all(np.isfinite(y))
        assert np.max(np.abs(y)) <= 0.9 + 1 / 32768
        assert np.sqrt(np.mean(y ** 2)) > 0.005


def test_hparams_yaml_is_a_valid_prep_config(tiny):
    cfg = load_prep_config(tiny["out"] / "hparams.yaml")
    assert cfg.aug_speed_mode == [1.0]
    assert (cfg.val_data_split, cfg.val_unseen) == (0.1, 0.05)
    assert (cfg.test_data_split, cfg.test_data_unseen) == (0.1, 0.1)
    info = json.loads((tiny["out"] / "demo_info.json").read_text())
    assert len(info["works"]) == 4 and info["failed"] == []


def test_same_arguments_give_identical_files(tiny, tmp_path, tune_cache):
    other = dd.make_demo_dataset(tmp_path / "again", cache_dir=tune_cache, **TINY)
    a = {f.name: _sha(f) for f in _audio_files(tiny["out"])}
    b = {f.name: _sha(f) for f in _audio_files(tmp_path / "again")}
    assert a == b
    strip = [{k: v for k, v in r.items() if k != "wav"} for r in tiny["records"]]
    again = [json.loads(x) for x in other.read_text().splitlines()]
    assert strip == [{k: v for k, v in r.items() if k != "wav"} for r in again]


def test_different_seed_gives_different_works_and_audio(tiny, tmp_path, tune_cache):
    args = dict(TINY, seed=1, n_works=2, perfs_per_work=2)
    dd.make_demo_dataset(tmp_path / "seed1", cache_dir=tune_cache, **args)
    theirs = {_sha(f) for f in _audio_files(tmp_path / "seed1")}
    ours = {_sha(f) for f in _audio_files(tiny["out"])}
    assert len(theirs) == 4 and not theirs & ours
    works1 = {f.parent.name for f in _audio_files(tmp_path / "seed1")}
    assert not works1 & {f.parent.name for f in _audio_files(tiny["out"])}


def test_parallel_rendering_matches_serial(tiny, tmp_path, tune_cache):
    args = dict(TINY, n_works=2, perfs_per_work=2, num_workers=2)
    dd.make_demo_dataset(tmp_path / "par", cache_dir=tune_cache, **args)
    par = {f.name: _sha(f) for f in _audio_files(tmp_path / "par")}
    ser = {f.name: _sha(f) for f in _audio_files(tiny["out"]) if f.name in par}
    assert len(par) == 4 and par == ser  # first 2 works x 2 versions are the same in both


def test_second_call_renders_nothing_and_resumes_missing_files(tmp_path, tune_cache):
    args = dict(TINY, n_works=2, perfs_per_work=2)
    out = tmp_path / "resume"
    dd.make_demo_dataset(out, cache_dir=tune_cache, **args)
    files = _audio_files(out)

    def stamp(f: Path) -> tuple[int, int]:
        st = f.stat()
        return st.st_ino, st.st_mtime_ns

    before = {f: stamp(f) for f in files}
    content = {f: _sha(f) for f in files}
    dd.make_demo_dataset(out, cache_dir=tune_cache, **args)
    assert {f: stamp(f) for f in files} == before  # nothing rewritten

    files[0].unlink()  # a lost file and a damaged one are rendered again, the rest kept
    files[1].write_bytes(b"not audio")
    dd.make_demo_dataset(out, cache_dir=tune_cache, **args)
    assert all(stamp(f) == before[f] for f in files[2:])
    assert all(_sha(f) == content[f] for f in files)
    assert len((out / "dataset.txt").read_text().splitlines()) == 4
    assert not list(out.rglob("*.tmp"))


def test_existing_hparams_yaml_is_kept(tmp_path, tune_cache):
    out = tmp_path / "edited"
    out.mkdir()
    (out / "hparams.yaml").write_text("aug_speed_mode: [0.9, 1.0, 1.1]\n")
    dd.make_demo_dataset(out, cache_dir=tune_cache, **dict(TINY, n_works=1, perfs_per_work=2))
    assert load_prep_config(out / "hparams.yaml").aug_speed_mode == [0.9, 1.0, 1.1]


def test_changed_settings_rerender_affected_files(tmp_path, tune_cache):
    out = tmp_path / "changed"
    args = dict(TINY, n_works=1, perfs_per_work=2)
    dd.make_demo_dataset(out, cache_dir=tune_cache, **args)
    before = {f.name: _sha(f) for f in _audio_files(out)}
    dd.make_demo_dataset(out, cache_dir=tune_cache, **dict(args, max_seconds=11.0))
    after = {f.name: _sha(f) for f in _audio_files(out)}
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)


def test_bad_dataset_arguments_raise_config_error(tmp_path, tune_cache):
    with pytest.raises(ConfigError, match="audio_format"):
        dd.make_demo_dataset(tmp_path, audio_format="ogg", cache_dir=tune_cache)
    with pytest.raises(ConfigError, match="min_seconds"):
        dd.make_demo_dataset(tmp_path, min_seconds=20, max_seconds=10, cache_dir=tune_cache)
    with pytest.raises(ConfigError, match="n_works"):
        dd.make_demo_dataset(tmp_path, n_works=0, cache_dir=tune_cache)


def test_wav_paths_are_relative_under_cwd_else_absolute(tmp_path, monkeypatch, tune_cache):
    args = dict(TINY, n_works=1, perfs_per_work=2)
    monkeypatch.chdir(tmp_path)
    rel = dd.make_demo_dataset("inside", cache_dir=tune_cache, **args)
    wav = json.loads(rel.read_text().splitlines()[0])["wav"]
    assert wav.startswith("inside/audio/") and Path(wav).exists()
    monkeypatch.chdir(tmp_path / "inside" / "audio")
    out = dd.make_demo_dataset(tmp_path / "outside", cache_dir=tune_cache, **args)
    wav = json.loads(out.read_text().splitlines()[0])["wav"]
    assert Path(wav).is_absolute() and Path(wav).exists()


def test_import_does_no_heavy_work():
    import subprocess
    import sys

    code = ("import sys, chlib.demo, chlib.demo.generate; "
            "print(all(m not in sys.modules for m in ('music21', 'soundfile', 'librosa')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
