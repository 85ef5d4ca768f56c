"""chlib.data.datatools: overlap/leakage between manifests, works histogram, query_in_ref."""

import shutil

import pytest
from bad_inputs import write_tone

from chlib.core.errors import ManifestError
from chlib.core.manifest import read_query_in_ref, write_manifest
from chlib.data.datatools import compare_datasets, make_query_in_ref, works_histogram


@pytest.fixture
def two_sets(tmp_path):
    """A and B share work W2, perf b1, and one recording copied under a new id (a2 == b9)."""
    audio = tmp_path / "audio"
    for i, name in enumerate(["a1", "a2", "a3", "b1", "b2"]):
        write_tone(audio / f"{name}.wav", 1.0, freqs=(200.0 + 50 * i,), seed=i)
    shutil.copy(audio / "a2.wav", audio / "b9.wav")  # same content, other name
    a = [
        {"perf": "a1", "wav": str(audio / "a1.wav"), "work": "W1"},
        {"perf": "sp_0.9-a1", "source_perf": "a1", "wav": str(audio / "a1.wav"), "work": "W1"},
        {"perf": "a2", "wav": str(audio / "a2.wav"), "work": "W2"},
        {"perf": "b1", "wav": str(audio / "b1.wav"), "work": "W3"},
        {"perf": "gone", "wav": str(audio / "nothing.wav"), "work": "W4"},
    ]
    b = [
        {"perf": "b1", "wav": str(audio / "b1.wav"), "work": "W3"},
        {"perf": "b2", "wav": str(audio / "b2.wav"), "work": "W5"},
        {"perf": "b9", "wav": str(audio / "b9.wav"), "work": "W2"},
        {"perf": "b3", "wav": str(audio / "a3.wav"), "work": "W6"},
        {"perf": "b4", "wav": str(audio / "a3.wav"), "work": "W6"},  # duplicate inside B
    ]
    write_manifest(tmp_path / "a.txt", a)
    write_manifest(tmp_path / "b.txt", b)
    return tmp_path / "a.txt", tmp_path / "b.txt"


def test_compare_finds_shared_works_perfs_and_renamed_identical_audio(two_sets):
    rep = compare_datasets(*two_sets)
    assert rep.shared_works == ["W2", "W3"]
    assert rep.shared_perfs == ["b1"]
    assert [(x["perfs_a"], x["perfs_b"]) for x in rep.same_audio_different_ids] == [(["a2"], ["b9"])]
    assert len(rep.same_audio) == 2  # b1 (same id) and a2 == b9
    assert [d["perfs"] for d in rep.duplicates_b] == [["b3", "b4"]]
    assert rep.duplicates_a == []  # the tempo copy of a1 is not a duplicate of a1
    assert rep.missing_audio_a == 1 and rep.missing_audio_b == 0
    assert rep.leaks
    text = str(rep)
    assert "LEAKAGE" in text and "a2 == B b9" in text


def test_compare_without_hashing_and_disjoint_sets(two_sets, tmp_path):
    rep = compare_datasets(*two_sets, hash_audio=False)
    assert rep.same_audio == [] and not rep.hashed and "not compared" in str(rep)
    write_manifest(tmp_path / "c.txt", [{"perf": "c1", "work": "Z"}])
    clean = compare_datasets(two_sets[0], tmp_path / "c.txt")
    assert not clean.leaks and clean.shared_works == [] and "no recording" in str(clean)


def test_works_histogram_counts_recordings_per_work(tmp_path):
    recs = ([{"perf": f"a{i}", "work": "A"} for i in range(3)]
            + [{"perf": "sp_0.8-a0", "source_perf": "a0", "work": "A"}]
            + [{"perf": f"{w}{i}", "work": w} for w in "BC" for i in range(2)]
            + [{"perf": "d0", "work": "D"}])
    counts = works_histogram(recs)
    assert counts.to_dict() == {1: 1, 2: 2, 3: 1}  # D has 1; B, C 2; A 3 (tempo copy not counted)
    assert list(counts.index) == [1, 2, 3] and counts.sum() == 4


def test_works_histogram_reads_paths_and_refuses_no_records(tmp_path):
    write_manifest(tmp_path / "d.txt", [{"perf": "x", "work": "X"}, {"perf": "y", "work": "X"}])
    assert works_histogram(tmp_path / "d.txt").to_dict() == {2: 1}
    with pytest.raises(ManifestError):
        works_histogram([])


def test_make_query_in_ref_pairs_positions_of_shared_perfs(tmp_path):
    # regression for fact sheet 13.4.5: the original looked up the ref by the query's work
    q = [{"perf": "p3", "work": "A"}, {"perf": "p9", "work": "B"}, {"perf": "p1", "work": "A"}]
    r = [{"perf": "p1", "work": "A"}, {"perf": "p2", "work": "C"}, {"perf": "p3", "work": "A"}]
    write_manifest(tmp_path / "q.txt", q)
    write_manifest(tmp_path / "r.txt", r)
    pairs = make_query_in_ref(tmp_path / "q.txt", tmp_path / "r.txt", tmp_path / "qir.txt")
    assert pairs == [(0, 2), (2, 0)]
    assert read_query_in_ref(tmp_path / "qir.txt") == pairs
