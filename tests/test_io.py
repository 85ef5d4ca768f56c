"""chlib.core.io: atomic writes leave either the old file or the new one, never a torn file."""

import numpy as np
import pytest

from chlib.core.io import (
    append_jsonl,
    atomic_open,
    atomic_save_npy,
    atomic_write_text,
    file_sha256,
    read_jsonl,
    stable_hash,
)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert len(list(tmp_path.iterdir())) == 1


def test_npy_round_trip_without_pickle(tmp_path):
    a = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    atomic_save_npy(tmp_path / "x.npy", a)
    b = np.load(tmp_path / "x.npy", allow_pickle=False)
    assert b.dtype == np.float32 and np.array_equal(a, b)


def test_jsonl_skips_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"a": 1})
    append_jsonl(p, {"a": 2})
    with open(p, "a") as f:
        f.write('{"a": ')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_hashes_change_with_content(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    h1 = file_sha256(p)
    p.write_bytes(b"abd")
    assert file_sha256(p) != h1
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_atomic_write_follows_the_umask_not_mkstemps_0600(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
