"""chlib.core.manifest: both line formats, key renames, validation with file/line, atomic writers."""

import json

import pytest
from bad_inputs import MALFORMED_MANIFEST_LINES

from chlib.core.errors import ManifestError
from chlib.core.manifest import (
    FULL_KEYS,
    MAX_LISTED_PROBLEMS,
    assign_work_ids,
    parse_line,
    read_manifest,
    read_query_in_ref,
    read_work_id_map,
    resolve_path,
    write_manifest,
    write_query_in_ref,
    write_work_id_map,
)


def test_json_and_legacy_lines_give_the_same_record(tmp_path):
    p = tmp_path / "dataset.txt"
    p.write_text(
        '{"perf": "p1", "wav": "a.wav", "dur_s": 12.5, "work": "W1", "version": "v"}\n'
        "\n   \n"
        "perf:p2\twav:b.wav\tdur_s:7.25\twork:W1\tversion:v\n",
        encoding="utf-8",
    )
    a, b = read_manifest(p)
    assert a == {"perf": "p1", "wav": "a.wav", "dur_s": 12.5, "work": "W1", "version": "v"}
    assert b == {"perf": "p2", "wav": "b.wav", "dur_s": 7.25, "work": "W1", "version": "v"}


def test_legacy_value_keeps_everything_after_the_first_colon_and_casts_len():
    rec = parse_line("utt:x1\twav:C:/music/a.wav\tsong:Work: A Tale\tlen:42")
    assert rec == {"perf": "x1", "wav": "C:/music/a.wav", "work": "Work: A Tale", "len": 42}


def test_original_key_names_are_mapped():
    rec = parse_line('{"utt": "u", "song": "S", "song_id": 3, "wav": "w.wav"}')
    assert rec == {"perf": "u", "work": "S", "work_id": 3, "wav": "w.wav"}


def test_conflicting_old_and_new_key_is_an_error():
    with pytest.raises(ValueError, match="utt"):
        parse_line('{"utt": "u", "perf": "other", "wav": "w", "work": "S"}')


@pytest.mark.parametrize("line,word", MALFORMED_MANIFEST_LINES)
def test_each_malformed_line_is_reported_with_file_line_and_reason(tmp_path, line, word):
    p = tmp_path / "dataset.txt"
    p.write_text('{"perf": "ok", "wav": "o.wav", "work": "O"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as ei:
        read_manifest(p)
    msg = str(ei.value)
    assert str(p) in msg and "line 2" in msg and word in msg


def test_all_problems_are_collected_in_one_error(tmp_path):
    p = tmp_path / "full.txt"
    good = '{"perf": "g%d", "wav": "g.wav", "work": "G"}'
    lines = [good % 0, '{"perf": "b1", "work": "B"}', good % 1, "{broken", good % 0]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as ei:
        read_manifest(p)
    msg = str(ei.value)
    assert "3 bad line(s)" in msg
    assert "line 2" in msg and "line 4" in msg and "line 5" in msg
    assert "duplicate perf 'g0' (first on line 1)" in msg


def test_error_lists_at_most_the_cap_and_counts_the_rest(tmp_path):
    p = tmp_path / "dataset.txt"
    n = MAX_LISTED_PROBLEMS + 7
    p.write_text("\n".join(json.dumps({"perf": f"x{i}"}) for i in range(n)) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as ei:
        read_manifest(p)
    msg = str(ei.value)
    assert msg.count("missing required key") == MAX_LISTED_PROBLEMS
    assert "... and 7 more" in msg


def test_non_strict_returns_good_records_and_problems(tmp_path):
    p = tmp_path / "dataset.txt"
    lines = ['{"perf": "a", "wav": "a.wav", "work": "A"}'] + [ln for ln, _ in MALFORMED_MANIFEST_LINES]
    lines.append('{"perf": "z", "wav": "z.wav", "work": "Z"}')
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recs, problems = read_manifest(p, strict=False)
    assert [r["perf"] for r in recs] == ["a", "z"]
    assert len(problems) == len(MALFORMED_MANIFEST_LINES)
    assert [pr.line for pr in problems] == list(range(2, 2 + len(MALFORMED_MANIFEST_LINES)))


def test_required_keys_are_configurable(tmp_path):
    p = tmp_path / "full.txt"
    write_manifest(p, [{"perf": "a", "work": "A", "wav": "a.wav"}])
    assert read_manifest(p)[0]["perf"] == "a"
    with pytest.raises(ManifestError, match="feat"):
        read_manifest(p, required=FULL_KEYS)


def test_duplicates_can_be_allowed(tmp_path):
    p = tmp_path / "d.txt"
    write_manifest(p, [{"perf": "a", "wav": "1", "work": "A"}, {"perf": "a", "wav": "2", "work": "A"}])
    assert [r["wav"] for r in read_manifest(p, unique_key=None)] == ["1", "2"]


def test_write_then_read_round_trips_non_ascii_and_numpy_values(tmp_path):
    import numpy as np

    recs = [{"perf": "é1", "wav": "chants/Ó Riada.wav", "work": "Sliabh na mBan", "dur_s": np.float32(3.5),
             "work_id": np.int64(2), "feat_len": 10, "feat": "x"}]
    p = tmp_path / "full.txt"
    write_manifest(p, recs)
    text = p.read_text(encoding="utf-8")
    assert "Ó Riada" in text and text.endswith("\n") and text.count("\n") == 1
    back = read_manifest(p, required=FULL_KEYS)
    assert back[0]["work_id"] == 2 and back[0]["dur_s"] == 3.5 and back[0]["perf"] == "é1"
    assert json.loads(text) == back[0]


def test_writing_an_empty_list_gives_an_empty_readable_file(tmp_path):
    p = tmp_path / "val.txt"
    write_manifest(p, [])
    assert p.read_text() == ""
    assert read_manifest(p) == []


def test_write_rejects_values_that_are_not_json(tmp_path):
    with pytest.raises(ManifestError, match="record 0"):
        write_manifest(tmp_path / "x.txt", [{"perf": "a", "obj": object()}])
    assert not (tmp_path / "x.txt").exists()


def test_missing_file_and_folder_are_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.txt")
    with pytest.raises(ManifestError, match="folder"):
        read_manifest(tmp_path)


def test_work_id_map_round_trip_in_id_order_with_spaces_in_names(tmp_path):
    p = tmp_path / "work_id.map"
    m = {"The Foggy Dew": 1, "Aililiú": 0, "Star of the County Down": 2}
    write_work_id_map(p, m)
    assert p.read_text(encoding="utf-8").splitlines() == [
        "0 Aililiú", "1 The Foggy Dew", "2 Star of the County Down"]
    assert read_work_id_map(p) == m


def test_work_id_map_rejects_bad_lines_and_duplicate_ids(tmp_path):
    p = tmp_path / "work_id.map"
    p.write_text("0 A\nB 1\n0 C\n", encoding="utf-8")
    with pytest.raises(ManifestError) as ei:
        read_work_id_map(p)
    assert "line 2" in str(ei.value) and "line 3" in str(ei.value)
    with pytest.raises(ManifestError):
        write_work_id_map(tmp_path / "w2.map", {"A": 0, "B": 0})


def test_assign_work_ids_is_sorted_and_independent_of_order():
    assert assign_work_ids(["b", "a", "c", "a"]) == {"a": 0, "b": 1, "c": 2}
    assert assign_work_ids(["c", "a", "b"]) == assign_work_ids(["a", "b", "c"])


def test_query_in_ref_round_trip_and_validation(tmp_path):
    p = tmp_path / "q.txt"
    write_query_in_ref(p, [(0, 3), (2, 1)])
    assert read_query_in_ref(p) == [(0, 3), (2, 1)]
    p.write_text('{"query_in_ref": [[0, "x"]]}\n')
    with pytest.raises(ManifestError, match="query_in_ref"):
        read_query_in_ref(p)


def test_resolve_path_prefers_the_manifest_folder_then_the_given_path(tmp_path, monkeypatch):
    ds = tmp_path / "datasets" / "d"
    (ds / "cqt_feat").mkdir(parents=True)
    (ds / "cqt_feat" / "a.npy").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("cqt_feat/a.npy", ds / "full.txt") == ds / "cqt_feat" / "a.npy"
    # the original's convention: relative to the current directory (the repository root)
    assert resolve_path("datasets/d/cqt_feat/a.npy", ds / "full.txt").resolve() == (
        ds / "cqt_feat" / "a.npy").resolve()
    assert resolve_path("/abs/x.wav", ds / "full.txt").as_posix() == "/abs/x.wav"
