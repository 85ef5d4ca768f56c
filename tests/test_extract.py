"""chlib.data.extract: good items extracted, bad ones reported, cached by key, resumable after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import fake_decode_job, write_audio_corpus, write_tone

from chlib.core.config import FeatureSettings, PrepConfig
from chlib.core.errors import FeatureError
from chlib.core.manifest import (
    FULL_KEYS,
    read_manifest,
    read_work_id_map,
    source_perf,
    write_manifest,
)
from chlib.data.extract import _decode_all, _Failure, _Item, expand_tempo, extract_dataset
from chlib.signal.cqt import n_frames

SECONDS = 2.0
SR = 16000


def make_dataset(root: Path, *, n_good: int = 4, seconds: float = SECONDS, bad: bool = True) -> dict:
    """dataset.txt with n_good tones over 2 works, plus (if bad) the whole bad-input corpus."""
    root.mkdir(parents=True, exist_ok=True)
    recs, expect_ok, expect_bad = [], [], {}
    for i in range(n_good):
        p = write_tone(root / "audio" / f"g{i}.wav", seconds, freqs=(200.0 + 40 * i,), seed=i)
        recs.append({"perf": f"g{i}", "wav": str(p), "work": f"W{i % 2}", "dur_s": seconds})
        expect_ok.append(f"g{i}")
    if bad:
        for e in write_audio_corpus(root / "corpus"):
            perf = ("ok_" if e.good else "bad_") + e.name
            recs.append({"perf": perf, "wav": str(e.path), "work": "W" + e.name, "dur_s": 2.0})
            if e.good:
                expect_ok.append(perf)
            else:
                expect_bad[perf] = e.path
    write_manifest(root / "dataset.txt", recs)
    return {"ok": sorted(expect_ok), "bad": expect_bad}


def cfg(**kw) -> PrepConfig:
    base = dict(aug_speed_mode=[1.0], num_workers=0, batch_size=4)
    base.update(kw)
    return PrepConfig(**base)


def run(ds: Path, config: PrepConfig, **kw):
    return extract_dataset(ds, config=config, device="cpu", progress=False, **kw)


def npy_mtimes(ds: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (ds / "cqt_feat").glob("*.npy")}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    ds = tmp_path_factory.mktemp("extract") / "ds"
    expect = make_dataset(ds)
    report = run(ds, cfg())
    return ds, expect, report


def test_good_items_are_extracted_with_true_shapes(extracted):
    ds, expect, report = extracted
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    assert [r["perf"] for r in full] == expect["ok"]  # sorted by perf, bad ones absent
    assert report.n_ok == len(expect["ok"]) == 6 and report.n_computed == 6 and report.n_cached == 0
    for r in full:
        feat = np.load(ds / r["feat"])
        assert feat.dtype == np.float32 and feat.ndim == 2 and feat.shape[1] == 96
        assert r["feat_len"] == feat.shape[0]
        assert np.isfinite(feat).all() and feat.max() == pytest.approx(0.0, abs=1e-4)
    # the 8 kHz stereo and 48 kHz 24-bit files were decoded and resampled to 16 kHz
    by_perf = {r["perf"]: r for r in full}
    assert by_perf["ok_stereo_8k"]["feat_len"] == n_frames(int(2.5 * SR), FeatureSettings())
    assert by_perf["ok_wav_48k_24bit"]["feat_len"] == n_frames(int(2.5 * SR), FeatureSettings())
    assert by_perf["g0"]["feat_len"] == n_frames(int(SECONDS * SR), FeatureSettings())


def test_every_bad_item_is_reported_with_a_reason_naming_its_file(extracted):
    ds, expect, report = extracted
    skipped = {s["perf"]: s["reason"] for s in report.skipped}
    assert set(skipped) == set(expect["bad"])
    for perf, path in expect["bad"].items():
        assert path.name in skipped[perf], (perf, skipped[perf])
    saved = json.loads((ds / "extract_report.json").read_text())
    assert {s["perf"] for s in saved["skipped"]} == set(expect["bad"])
    assert saved["n_ok"] == 6 and "timings_s" in saved
    assert "6 of 14 items ok" in str(report)


def test_work_ids_features_json_and_splits_are_written(extracted):
    ds, expect, _ = extracted
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    works = sorted({r["work"] for r in full})
    assert read_work_id_map(ds / "work_id.map") == {w: i for i, w in enumerate(works)}
    assert all(r["work_id"] == works.index(r["work"]) for r in full)
    assert json.loads((ds / "features.json").read_text()) == FeatureSettings().key()
    assert len(read_manifest(ds / "train.txt", required=FULL_KEYS)) == len(full)  # ratios 0
    assert (ds / "val.txt").read_text() == "" and (ds / "test-only-work-ids.txt").exists()


def test_second_run_recomputes_and_redecodes_nothing(extracted, monkeypatch):
    ds, expect, _ = extracted
    before = npy_mtimes(ds)
    full_before = (ds / "full.txt").read_bytes()

    def no_decoding(*a, **k):
        raise AssertionError("a cached item was decoded again")

    monkeypatch.setattr("chlib.data.extract._decode_job", no_decoding)
    report = run(ds, cfg())
    assert report.n_computed == 0 and report.n_cached == 6 and report.n_ok == 6
    assert npy_mtimes(ds) == before
    assert (ds / "full.txt").read_bytes() == full_before
    # bad files were remembered (same content, same settings), missing ones re-checked
    assert {s["perf"] for s in report.skipped} == set(expect["bad"])


def test_changing_n_bins_recomputes_everything(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=3, bad=False)
    assert run(ds, cfg()).n_computed == 3
    c = cfg()
    c.features = FeatureSettings(n_bins=84)
    report = run(ds, c)
    assert report.n_computed == 3 and report.n_cached == 0
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    assert all(np.load(ds / r["feat"]).shape[1] == 84 for r in full)
    assert json.loads((ds / "features.json").read_text())["n_bins"] == 84


def test_a_changed_audio_file_recomputes_only_that_item(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=3, bad=False)
    run(ds, cfg())
    before = npy_mtimes(ds)
    old = np.load(ds / "cqt_feat" / "g1.cqt.npy")
    time.sleep(0.01)
    write_tone(ds / "audio" / "g1.wav", 3.0, freqs=(700.0,), seed=9)  # other content, longer
    report = run(ds, cfg())
    assert report.n_computed == 1 and report.n_cached == 2
    after = npy_mtimes(ds)
    assert after["g0.cqt.npy"] == before["g0.cqt.npy"] and after["g1.cqt.npy"] != before["g1.cqt.npy"]
    new = np.load(ds / "cqt_feat" / "g1.cqt.npy")
    assert new.shape[0] == n_frames(3 * SR, FeatureSettings()) != old.shape[0]
    g1 = [r for r in read_manifest(ds / "full.txt", required=FULL_KEYS) if r["perf"] == "g1"][0]
    assert g1["feat_len"] == new.shape[0]


def test_a_corrupted_cached_array_is_recomputed(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=2, bad=False)
    run(ds, cfg())
    p = ds / "cqt_feat" / "g0.cqt.npy"
    p.write_bytes(p.read_bytes()[: 200])  # truncated (e.g. copied by hand, disk full)
    report = run(ds, cfg())
    assert report.n_computed == 1 and np.load(p).shape[1] == 96


def test_tempo_copies_are_named_grouped_and_stretched(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=4, bad=False, seconds=2.0)
    c = cfg(aug_speed_mode=[0.8, 1.0, 1.25], val_data_split=0.25, test_data_split=0.25, seed=3)
    report = run(ds, c)
    assert report.n_ok == 12
    full = {r["perf"]: r for r in read_manifest(ds / "full.txt", required=FULL_KEYS)}
    slow, fast, orig = full["sp_0.8-g0"], full["sp_1.25-g0"], full["g0"]
    assert slow["source_perf"] == "g0" and slow["tempo"] == 0.8 and slow["wav"] == orig["wav"]
    assert slow["dur_s"] == pytest.approx(2.0 / 0.8, abs=0.01)
    assert "source_perf" not in orig
    # a slower copy has about 1/0.8 as many frames, a faster one 1/1.25
    assert slow["feat_len"] == pytest.approx(orig["feat_len"] / 0.8, rel=0.03)
    assert fast["feat_len"] == pytest.approx(orig["feat_len"] / 1.25, rel=0.03)
    # no recording and its copies in different splits
    where = {}
    for name in ("train", "val", "test"):
        for r in read_manifest(ds / f"{name}.txt", required=FULL_KEYS):
            where.setdefault(source_perf(r), set()).add(name)
    assert all(len(v) == 1 for v in where.values()) and len(where) == 4


def test_expand_tempo_keeps_the_original_line_and_names_copies_like_the_original():
    rec = {"perf": "cover80_00000146_71_0", "wav": "a.wav", "work": "W", "dur_s": 100.0}
    out = expand_tempo(rec, [0.8, 1.0, 1.005, 1.2])
    assert [r["perf"] for r, _ in out] == ["sp_0.8-cover80_00000146_71_0",
                                           "cover80_00000146_71_0",
                                           "sp_1.2-cover80_00000146_71_0"]
    assert out[1][0] == rec and out[2][0]["dur_s"] == 83.33


def test_duplicate_perfs_and_malformed_lines_are_skipped_and_reported(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=2, bad=False)
    with open(ds / "dataset.txt", "a", encoding="utf-8") as f:
        f.write('{"perf": "g0", "wav": "elsewhere.wav", "work": "W0"}\n')
        f.write('{"perf": "x", "work": "W0"}\n')
        f.write('{"perf": "a/b", "wav": "x.wav", "work": "W0"}\n')
    report = run(ds, cfg())
    assert report.n_ok == 2
    reasons = [s["reason"] for s in report.skipped]
    assert any("duplicate perf 'g0'" in r for r in reasons)
    assert any("line 4" in r and "wav" in r for r in reasons)
    assert any("path separator" in r for r in reasons)
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    assert [r["wav"] for r in full if r["perf"] == "g0"][0].endswith("g0.wav")


def test_nothing_extractable_raises_after_writing_the_report(tmp_path):
    ds = tmp_path / "ds"
    write_manifest(ds / "dataset.txt", [{"perf": "a", "wav": str(tmp_path / "no.wav"), "work": "A"}])
    with pytest.raises(FeatureError, match="no item could be extracted"):
        run(ds, cfg())
    assert json.loads((ds / "extract_report.json").read_text())["n_skipped"] == 1


def test_absolute_feat_paths_option(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=2, bad=False)
    run(ds, cfg(), feat_paths="absolute")
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    assert all(Path(r["feat"]).is_absolute() and Path(r["feat"]).is_file() for r in full)


# ----------------------------------------------------------------------------- worker processes


def test_worker_pool_gives_the_same_arrays_as_in_process_decoding(extracted, tmp_path):
    src, expect, _ = extracted
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=2)
    report = run(ds, cfg(num_workers=2))
    ok = [p for p in expect["ok"] if p not in ("g2", "g3")]
    assert sorted(r["perf"] for r in read_manifest(ds / "full.txt", required=FULL_KEYS)) == ok
    assert {s["perf"] for s in report.skipped} == set(expect["bad"])
    for perf in ok:
        a = np.load(src / "cqt_feat" / f"{perf}.cqt.npy")
        b = np.load(ds / "cqt_feat" / f"{perf}.cqt.npy")
        np.testing.assert_allclose(a, b, atol=1e-4)


def _items(tmp_path: Path, names: list[str]) -> list[_Item]:
    return [_Item(index=i, record={"perf": n}, wav=tmp_path / f"{n}.wav", factor=1.0,
                  npy=tmp_path / f"{n}.npy", meta=tmp_path / f"{n}.json")
            for i, n in enumerate(names)]


@pytest.mark.slow
def test_a_hanging_file_times_out_and_the_others_finish(tmp_path):
    items = _items(tmp_path, ["a", "b_hang", "c", "d", "e"])
    t0 = time.monotonic()
    out = {it.record["perf"]: res for it, res, _ in _decode_all(
        items, num_workers=2, timeout_s=3.0, sample_rate=SR, backend="librosa",
        min_samples=8193, job=fake_decode_job)}
    assert time.monotonic() - t0 < 60
    assert set(out) == {"a", "b_hang", "c", "d", "e"}
    assert isinstance(out["b_hang"], _Failure) and "longer than 3 s" in out["b_hang"].reason
    assert "b_hang.wav" in out["b_hang"].reason
    assert all(isinstance(out[k], np.ndarray) for k in "acde")


@pytest.mark.slow
def test_a_crashing_decoder_skips_only_its_own_file(tmp_path):
    items = _items(tmp_path, ["a", "b", "c_crash", "d", "e", "f"])
    out = {it.record["perf"]: res for it, res, _ in _decode_all(
        items, num_workers=2, timeout_s=60.0, sample_rate=SR, backend="librosa",
        min_samples=8193, job=fake_decode_job)}
    assert set(out) == {"a", "b", "c_crash", "d", "e", "f"}
    assert isinstance(out["c_crash"], _Failure) and "crashed" in out["c_crash"].reason
    assert all(isinstance(out[k], np.ndarray) for k in "abdef")


KILL_SCRIPT = """
import sys
from chlib.core.config import PrepConfig
from chlib.data.extract import extract_dataset
extract_dataset(sys.argv[1], config=PrepConfig(aug_speed_mode=[1.0], num_workers=0, batch_size=1),
                device="cpu", progress=False)
"""


@pytest.mark.slow
def test_sigkilled_extraction_resumes_with_no_corrupt_arrays(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=30, bad=False, seconds=12.0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    feat_dir = ds / "cqt_feat"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if feat_dir.is_dir() and len(list(feat_dir.glob("*.cqt.npy"))) >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "extraction ended before it could be killed: " + (
        proc.stdout.read().decode(errors="replace")[-2000:])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    written = sorted(feat_dir.glob("*.cqt.npy"))
    assert 3 <= len(written) < 30 and not (ds / "full.txt").exists()
    for p in written:  # every array on disk is whole, even the one being written at the kill
        assert np.load(p).shape == (n_frames(12 * SR, FeatureSettings()), 96)
    report = run(ds, cfg(batch_size=1))
    assert report.n_ok == 30 and report.n_computed + report.n_cached == 30
    assert report.n_cached >= len(written) - 1  # at most the last array lacks its sidecar
    assert not list(feat_dir.glob(".*.tmp"))
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    for r in full:
        assert np.load(ds / r["feat"]).shape == (r["feat_len"], 96)


ORPHAN_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from bad_inputs import fake_decode_job
from chlib.data.extract import _decode_all, _Item
d = Path(sys.argv[1])
items = [_Item(index=0, record={"perf": "h"}, wav=d / "x_hang.wav", factor=1.0, npy=d / "h.npy",
               meta=d / "h.json")]
list(_decode_all(items, num_workers=1, timeout_s=600, sample_rate=16000, backend="librosa",
                 min_samples=8193, job=fake_decode_job))
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited (nobody reaped it yet)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to inspect processes")
def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path),
                             str(Path(__file__).parent)])
    pid_file = tmp_path / "x_hang.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)
    worker = int(pid_file.read_text())
    assert _alive(worker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(worker):
        os.kill(worker, signal.SIGKILL)  # clean up what this test started, then fail
        pytest.fail("the decoding worker outlived its killed parent")


def test_demo_dataset_extracts_cleanly_with_its_own_hparams(tmp_path):
    from chlib.core.config import load_prep_config
    from chlib.demo.generate import make_demo_dataset

    ds = tmp_path / "demo"
    make_demo_dataset(ds, n_works=4, perfs_per_work=3, min_seconds=3.0, max_seconds=4.0, seed=2,
                      progress=False, cache_dir=tmp_path / "cache")
    config = load_prep_config(ds / "hparams.yaml")
    report = extract_dataset(ds, device="cpu", progress=False, num_workers=0)
    assert report.skipped == [] and report.n_ok == 12 * len(config.aug_speed_mode)
    full = read_manifest(ds / "full.txt", required=FULL_KEYS)
    splits = {n: read_manifest(ds / f"{n}.txt", required=FULL_KEYS) for n in ("train", "val", "test")}
    assert sorted(r["perf"] for s in splits.values() for r in s) == sorted(r["perf"] for r in full)
    test_only = [int(x) for x in (ds / "test-only-work-ids.txt").read_text().split()]
    expected = max(1, int(4 * config.test_data_unseen)) if config.test_data_unseen > 0 else 0
    assert len(test_only) == expected
    assert {r["work_id"] for r in splits["test"]} >= set(test_only)
    assert not {r["work_id"] for r in splits["train"]} & set(test_only)


def test_temporary_files_of_a_killed_run_are_removed_and_others_kept(tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds, n_good=1, bad=False)
    (ds / "cqt_feat").mkdir()
    stale = [ds / "cqt_feat" / ".g0.cqt.npy.k2j3.tmp", ds / ".full.txt.x8f.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    mine = ds / ".my-notes.tmp"
    mine.write_text("keep")
    report = run(ds, cfg())
    assert not any(p.exists() for p in stale) and mine.exists()
    assert any("2 temporary file(s)" in n for n in report.notes)


# ----------------------------------------------------------------------------- shared helpers


def _fails_on_b(name: str) -> str:
    if name == "b":
        raise ValueError("bad item")
    return name.upper()


def test_run_jobs_in_process_reports_an_error_and_goes_on():
    from chlib.core.parallel import JobFailure, run_jobs

    out = dict(run_jobs(_fails_on_b, [("a",), ("b",), ("c",)], num_workers=0))
    assert out[0] == "A" and out[2] == "C"
    assert out[1] == JobFailure("error", "ValueError: bad item")


def test_run_jobs_raises_when_workers_cannot_start(tmp_path, monkeypatch):
    import importlib

    from chlib.core.parallel import WorkerStartError, run_jobs

    (tmp_path / "gone_module.py").write_text("def job(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    job = importlib.import_module("gone_module").job
    (tmp_path / "gone_module.py").unlink()  # a spawned worker cannot unpickle the job
    with pytest.raises(WorkerStartError, match="before doing any work"):
        list(run_jobs(job, [(1,), (2,)], num_workers=1, timeout_s=60))


def test_a_disabled_progress_bar_still_iterates_and_counts():
    from chlib.core.progress import progress

    bar = progress(total=3, enabled=False)
    bar.update(2)
    bar.set_postfix(loss="0.1")
    bar.close()
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]
