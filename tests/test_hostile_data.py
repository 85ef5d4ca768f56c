"""Issue 10, data side: hostile input to extraction, manifests and chlib.core.io.

Each test is named after the item of the issue it checks (item1 ... item10)."""

import json
import math
import os
import subprocess
import sys
import threading
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import (
    CONTROL_CHAR_WORK_NAMES,
    LOOKALIKE_WORK_PAIRS,
    NEAR_DUPLICATE_WORK_PAIRS,
    make_unreadable_file,
    write_bom_manifest,
    write_object_npy,
    write_pickle_as_npy,
    write_tone,
    write_torn_jsonl,
)

import chlib.data.datatools as datatools_mod
import chlib.data.extract as extract_mod
from chlib.core.config import PrepConfig
from chlib.core.errors import FeatureError, FolderLockedError, ManifestError
from chlib.core.io import (
    append_jsonl,
    folder_lock,
    load_npy,
    read_jsonl,
    write_json,
)
from chlib.core.manifest import (
    FULL_KEYS,
    read_manifest,
    read_work_id_map,
    write_manifest,
)
from chlib.data.datatools import compare_datasets
from chlib.data.extract import extract_dataset
from chlib.data.features import load_feature
from chlib.ui.runner import notebook_parameters

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def make_tones(ds: Path, n: int = 4, seconds: float = 2.0, works=None) -> list[dict]:
    recs = []
    for i in range(n):
        p = write_tone(ds / "audio" / f"g{i}.wav", seconds, freqs=(200.0 + 40 * i,), seed=i)
        work = works[i] if works else f"W{i % 2}"
        recs.append({"perf": f"g{i}", "wav": str(p), "work": work, "dur_s": seconds})
    write_manifest(ds / "dataset.txt", recs)
    return recs


def cfg(**kw) -> PrepConfig:
    return PrepConfig(**{"aug_speed_mode": [1.0], "num_workers": 0, "batch_size": 4, **kw})


def run(ds: Path, config: PrepConfig | None = None, **kw):
    return extract_dataset(ds, config=config or cfg(), device="cpu", progress=False, **kw)


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ item 1: unreadable audio


def test_item1_unreadable_audio_is_skipped_and_named_the_rest_extracted(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    make_tones(ds)
    locked = make_unreadable_file(ds / "audio" / "g1.wav")
    if os.access(locked, os.R_OK):  # root reads anything: make the read fail as for a user
        real_open = open

        def guarded_open(file, *args, **kwargs):
            if Path(os.fsdecode(file)).name == locked.name:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", guarded_open)
    try:
        report = run(ds)
    finally:
        locked.chmod(0o644)
    assert report.n_ok == 3
    [skip] = report.skipped
    assert skip["perf"] == "g1"
    assert "g1.wav" in skip["reason"] and "Permission" in skip["reason"]
    assert [r["perf"] for r in read_manifest(ds / "full.txt", FULL_KEYS)] == ["g0", "g2", "g3"]


# ------------------------------------------------------------------ item 2: one job per folder

HOLDER = """
import sys, time
from chlib.core.io import folder_lock
with folder_lock(sys.argv[1], "first extraction"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_item2_folder_lock_names_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    proc = _hold_lock(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError) as e, folder_lock(tmp_path, "second", wait=0.5):
            pass
        assert time.monotonic() - t0 >= 0.4
        msg = str(e.value)
        assert str(proc.pid) in msg and "first extraction" in msg and ".chlib.lock" in msg
        assert "wait" in msg
    finally:
        proc.kill()  # SIGKILL: no clean-up runs; the OS drops the lock
        proc.wait()
    with folder_lock(tmp_path, "after the crash") as lock:
        info = json.loads(Path(lock).read_text())
        assert info["pid"] == os.getpid() and info["what"] == "after the crash"
        assert {"host", "started"} <= set(info)


def test_item2_folder_lock_waits_for_the_holder_to_finish(tmp_path):
    order = []

    def first():
        with folder_lock(tmp_path, "first"):
            order.append("first in")
            time.sleep(0.6)
            order.append("first out")

    t = threading.Thread(target=first, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not order and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["first in"]
    with pytest.raises(FolderLockedError):  # wait=False: stop at once
        with folder_lock(tmp_path, "impatient"):
            pass
    with folder_lock(tmp_path, "second", wait=True):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def test_item2_second_extraction_stops_and_keeps_the_first_ones_temp_files(tmp_path):
    ds = tmp_path / "ds"
    make_tones(ds, n=2)
    (ds / "cqt_feat").mkdir()
    tmp = ds / "cqt_feat" / ".g0.cqt.npy.k2j3.tmp"  # being written by the first extraction
    tmp.write_bytes(b"in progress")
    proc = _hold_lock(ds)
    try:
        with pytest.raises(FolderLockedError, match=str(proc.pid)):
            run(ds)
    finally:
        proc.kill()
        proc.wait()
    assert tmp.read_bytes() == b"in progress"
    assert not (ds / "full.txt").exists()
    assert run(ds).n_ok == 2  # the lock died with its holder


# ------------------------------------------------------------------ item 3: no silent shrinking


OUTPUTS = ("full.txt", "work_id.map", "train.txt", "val.txt", "test.txt", "extract_report.json")


def _snapshot(ds: Path) -> dict[str, bytes]:
    return {n: (ds / n).read_bytes() for n in OUTPUTS}


def test_item3_empty_dataset_txt_does_not_replace_earlier_outputs(tmp_path):
    ds = tmp_path / "ds"
    make_tones(ds)
    run(ds)
    before = _snapshot(ds)
    (ds / "dataset.txt").write_text("")
    with pytest.raises(FeatureError, match="allow_shrink=True") as e:
        run(ds)
    assert "full.txt" in str(e.value) and "4" in str(e.value)
    assert _snapshot(ds) == before
    with pytest.raises(FeatureError, match="no item could be extracted"):
        run(ds, allow_shrink=True)  # asked for: replaced
    assert (ds / "full.txt").read_text() == ""


def test_item3_missing_audio_folder_does_not_replace_earlier_outputs(tmp_path):
    ds = tmp_path / "ds"
    make_tones(ds)
    run(ds)
    before = _snapshot(ds)
    (ds / "audio").rename(tmp_path / "unmounted")
    with pytest.raises(FeatureError, match="allow_shrink") as e:
        run(ds)
    assert "not found" in str(e.value)  # says why the items were lost
    assert _snapshot(ds) == before
    (tmp_path / "unmounted").rename(ds / "audio")
    write_manifest(ds / "dataset.txt", read_manifest(ds / "dataset.txt")[:3])
    assert run(ds).n_ok == 3  # a small shrink (4 -> 3) is allowed


def test_item3_notebook_02_passes_allow_shrink():
    nb = REPO / "notebooks" / "02_extract.ipynb"
    assert notebook_parameters(nb)["allow_shrink"] is False
    assert "allow_shrink=allow_shrink" in nb.read_text()


# ------------------------------------------------------------------ item 4: byte-order mark


def test_item4_manifest_with_a_bom_reads_its_first_line(tmp_path):
    recs = [{"perf": "a", "wav": "a.wav", "work": "A"}, {"perf": "b", "wav": "b.wav", "work": "B"}]
    p = write_bom_manifest(tmp_path / "dataset.txt", recs)
    assert read_manifest(p) == recs
    m = tmp_path / "work_id.map"
    m.write_bytes(b"\xef\xbb\xbf0 A\n1 B\n")
    assert read_work_id_map(m) == {"A": 0, "B": 1}


# ------------------------------------------------------------------ item 5: control characters


@pytest.mark.parametrize("name", CONTROL_CHAR_WORK_NAMES)
def test_item5_control_characters_in_work_names_are_refused_with_line(tmp_path, name):
    p = tmp_path / "dataset.txt"
    write_manifest(p, [{"perf": "a", "wav": "a.wav", "work": "A"},
                       {"perf": "b", "wav": "b.wav", "work": name}])
    with pytest.raises(ManifestError, match="line 2") as e:
        read_manifest(p)
    assert "work" in str(e.value) and "control" in str(e.value)


def test_item5_extraction_skips_a_bad_work_name_before_decoding(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    make_tones(ds, n=3, works=["A", "B\nC", "A"])
    decoded = []
    real = extract_mod._decode_job

    def counting(wav, *a):
        decoded.append(Path(wav).name)
        return real(wav, *a)

    monkeypatch.setattr(extract_mod, "_decode_job", counting)
    report = run(ds)
    assert report.n_ok == 2 and "g1.wav" not in decoded
    assert any("line 2" in s["reason"] and "control" in s["reason"] for s in report.skipped)


# ------------------------------------------------------------------ item 6: look-alike names


def test_item6_lookalike_work_names_are_normalised_to_one_work(tmp_path):
    p = tmp_path / "dataset.txt"
    recs = [{"perf": f"p{i}{j}", "wav": "x.wav", "work": w}
            for i, pair in enumerate(LOOKALIKE_WORK_PAIRS) for j, w in enumerate(pair)]
    write_manifest(p, recs)
    works = [r["work"] for r in read_manifest(p)]
    assert works == [unicodedata.normalize("NFC", a.strip()) for a, _ in LOOKALIKE_WORK_PAIRS
                     for _ in range(2)]


def test_item6_near_duplicate_work_names_warn_naming_both(tmp_path):
    p = tmp_path / "dataset.txt"
    write_manifest(p, [{"perf": f"p{i}{j}", "wav": "x.wav", "work": w}
                       for i, pair in enumerate(NEAR_DUPLICATE_WORK_PAIRS)
                       for j, w in enumerate(pair)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = read_manifest(p)
    assert len({r["work"] for r in recs}) == 4  # still different works
    text = "\n".join(str(w.message) for w in caught)
    for a, b in NEAR_DUPLICATE_WORK_PAIRS:
        assert repr(a) in text and repr(b) in text
    assert str(p) in text


def test_item6_extraction_merges_lookalikes_and_notes_near_duplicates(tmp_path):
    ds = tmp_path / "ds"
    make_tones(ds, works=["Caf\u00e9", "Cafe\u0301", "Song", "song"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run(ds)
    assert read_work_id_map(ds / "work_id.map") == {"Caf\u00e9": 0, "Song": 1, "song": 2}
    assert any("'Song'" in n and "'song'" in n for n in report.notes)


# ------------------------------------------------------------------ item 7: torn JSON lines


def test_item7_append_after_a_torn_last_line_keeps_the_log_readable(tmp_path):
    p = write_torn_jsonl(tmp_path / "metrics.jsonl", [{"epoch": 1}, {"epoch": 2}])
    assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}]
    append_jsonl(p, {"epoch": 3})
    append_jsonl(p, {"epoch": 4})
    assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}, {"epoch": 4}]
    # a complete record that only lacks its newline is kept
    q = tmp_path / "b.jsonl"
    q.write_text('{"a": 1}\n{"a": 2}')
    append_jsonl(q, {"a": 3})
    assert read_jsonl(q) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_item7_a_bad_line_in_the_middle_names_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"a": 1}\n{"a": 2, oops\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2"):
        read_jsonl(p)


# ------------------------------------------------------------------ item 8: NaN is not JSON


def test_item8_json_writers_write_null_for_nan_and_inf(tmp_path):
    obj = {"mAP": math.nan, "ci": [-math.inf, 0.5, math.inf], "np": np.float32("nan"),
           "arr": np.array([1.0, np.nan]), "n": np.int64(3)}
    write_json(tmp_path / "identify_summary.json", obj)
    want = {"mAP": None, "ci": [None, 0.5, None], "np": None, "arr": [1.0, None], "n": 3}
    assert strict_json((tmp_path / "identify_summary.json").read_text()) == want
    append_jsonl(tmp_path / "m.jsonl", {"loss": math.nan})
    assert strict_json((tmp_path / "m.jsonl").read_text()) == {"loss": None}
    write_manifest(tmp_path / "full.txt", [{"perf": "a", "x": math.inf}])
    assert strict_json((tmp_path / "full.txt").read_text()) == {"perf": "a", "x": None}


# ------------------------------------------------------------------ item 9: no unsafe advice


@pytest.mark.parametrize("writer", [write_object_npy, write_pickle_as_npy])
def test_item9_pickled_npy_gives_our_message_not_numpys_allow_pickle(tmp_path, writer):
    p = writer(tmp_path / "g0.cqt.npy")
    for load in (load_feature, load_npy, lambda f: load_npy(f, mmap_mode="r")):
        with pytest.raises(FeatureError) as e:
            load(p)
        msg = str(e.value)
        assert "g0.cqt.npy" in msg and "re-extract it" in msg
        assert "allow_pickle" not in msg and "unsafe" not in msg


# ------------------------------------------------------------------ item 10: batches by samples


def _record_batches(monkeypatch) -> list[list[int]]:
    batches: list[list[int]] = []
    real = extract_mod.compute_cqt_db_batch

    def recording(signals, *a, **k):
        batches.append([len(y) for y in signals])
        return real(signals, *a, **k)

    monkeypatch.setattr(extract_mod, "compute_cqt_db_batch", recording)
    return batches


def test_item10_batches_are_bounded_by_samples_and_a_long_file_goes_alone(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    recs = make_tones(ds)  # g0..g3, 2 s each
    long = write_tone(ds / "audio" / "long.wav", 6.0, freqs=(300.0,))
    write_manifest(ds / "dataset.txt", [*recs, {"perf": "g1_long", "wav": str(long), "work": "L"}])
    monkeypatch.setattr(extract_mod, "BATCH_MAX_SECONDS", 8.0)
    batches = _record_batches(monkeypatch)
    assert run(ds).n_ok == 5
    assert all(len(b) * max(b) <= 8 * SR for b in batches if len(b) > 1), batches
    assert [6 * SR] in batches and sum(map(len, batches)) == 5
    # the same arrays as a run that batches by count only
    ref = tmp_path / "ref"
    make_tones(ref)
    monkeypatch.setattr(extract_mod, "BATCH_MAX_SECONDS", 1e9)
    run(ref)
    for i in range(4):
        a, b = (np.load(d / "cqt_feat" / f"g{i}.cqt.npy") for d in (ds, ref))
        assert np.array_equal(a, b)


def test_item10_ordinary_files_are_batched_by_count_as_before(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    make_tones(ds, n=6)
    batches = _record_batches(monkeypatch)
    run(ds)
    assert [len(b) for b in batches] == [4, 2]


def test_item1_compare_datasets_goes_on_past_an_unreadable_file(tmp_path, monkeypatch):
    a = make_tones(tmp_path / "a", n=2)
    write_manifest(tmp_path / "b" / "full.txt", a)
    real = datatools_mod.file_sha256

    def refuse_g1(path, *args):
        if Path(path).name == "g1.wav":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(datatools_mod, "file_sha256", refuse_g1)
    out = compare_datasets(tmp_path / "a" / "dataset.txt", tmp_path / "b" / "full.txt")
    assert out.missing_audio_a == out.missing_audio_b == 1
    assert [x["perfs_a"] for x in out.same_audio] == [["g0"]]
    assert "not found or unreadable" in str(out)
