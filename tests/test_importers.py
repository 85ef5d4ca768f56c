"""chlib.data.importers: covers80's covers32k/<work>/<recording>.mp3 tree and generic folder trees."""

import pytest
from bad_inputs import write_corrupt_mp3, write_tone

from chlib.core.errors import ConfigError, ManifestError
from chlib.core.manifest import read_manifest
from chlib.data.importers import (
    PREP_DEFAULTS,
    default_prep_config,
    import_covers80,
    import_folder_tree,
)


@pytest.fixture(scope="module")
def covers_tree(tmp_path_factory):
    """A miniature covers80 download: 3 works, 2 + 1 + 2 recordings (+ one corrupt, one text)."""
    root = tmp_path_factory.mktemp("covers80")
    c = root / "covers32k"
    write_tone(c / "Yesterday" / "beatles+Help+13-Yesterday.mp3", 1.5, sample_rate=32000, seed=1)
    write_tone(c / "Yesterday" / "en_vogue+Funky_Divas+09-Yesterday.mp3", 2.0, sample_rate=32000,
               seed=2)
    write_tone(c / "Abraham_Martin_And_John" / "dion+Dion+03-Abraham.mp3", 1.25, sample_rate=32000)
    write_tone(c / "Caroline_No" / "beach_boys+Pet_Sounds+13-Caroline_No.mp3", 1.5,
               sample_rate=32000)
    write_corrupt_mp3(c / "Caroline_No", "zzz_broken.mp3")
    (c / "Caroline_No" / "readme.txt").write_text("not audio")
    (c / "Caroline_No" / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def test_covers80_tree_gives_original_style_ids_works_versions_and_durations(covers_tree, tmp_path):
    out = import_covers80(covers_tree, tmp_path / "ds")
    assert out == tmp_path / "ds" / "dataset.txt"
    recs = read_manifest(out)
    assert [r["perf"] for r in recs] == [
        "cover80_00000000_0_0",  # Abraham_Martin_And_John / dion
        "cover80_00000001_1_0",  # Caroline_No / beach_boys
        "cover80_00000003_2_0",  # Yesterday / beatles (2 = the corrupt Caroline_No mp3)
        "cover80_00000004_2_1",  # Yesterday / en_vogue
    ]
    assert [r["work"] for r in recs] == ["Abraham_Martin_And_John", "Caroline_No", "Yesterday",
                                         "Yesterday"]
    assert recs[2]["version"] == "beatles+Help+13-Yesterday.mp3"
    # mp3 encoders add padding: the decoded length is close to, not exactly, the written one
    assert recs[3]["dur_s"] == pytest.approx(2.0, abs=0.1)
    assert recs[0]["dur_s"] == pytest.approx(1.25, abs=0.1)
    from pathlib import Path

    assert all(Path(r["wav"]).is_absolute() and Path(r["wav"]).is_file() for r in recs)


def test_covers80_skips_and_reports_unreadable_and_non_audio_files(covers_tree, tmp_path):
    report = import_covers80(covers_tree, tmp_path / "ds", return_report=True)
    assert report.n_records == 4 and report.n_works == 3
    reasons = {s["wav"].split("/")[-1]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"zzz_broken.mp3", "readme.txt"}
    assert "zzz_broken.mp3" in reasons["zzz_broken.mp3"]
    assert "not an audio file" in reasons["readme.txt"]
    assert (tmp_path / "ds" / "import_report.json").is_file()
    assert "skipped 2" in str(report)


def test_covers80_accepts_the_covers32k_folder_itself_and_relative_paths(covers_tree, tmp_path):
    a = read_manifest(import_covers80(covers_tree, tmp_path / "a"))
    b = read_manifest(import_covers80(covers_tree / "covers32k", tmp_path / "b",
                                      relative_to=covers_tree))
    assert [r["perf"] for r in a] == [r["perf"] for r in b]
    assert b[0]["wav"] == "covers32k/Abraham_Martin_And_John/dion+Dion+03-Abraham.mp3"


def test_generic_folder_tree_with_mixed_formats(tmp_path):
    root = tmp_path / "My Tunes"
    write_tone(root / "The Foggy Dew" / "singer1.wav", 1.5)
    write_tone(root / "The Foggy Dew" / "singer2.flac", 1.5, sample_rate=22050)
    write_tone(root / "Sliabh na mBan" / "piper.ogg", 1.5)
    write_tone(root / "Sliabh na mBan" / "fiddle.mp3", 1.5, sample_rate=44100)
    (root / "loose.wav").write_bytes(b"")  # not in a work folder: not matched by */*.*
    recs = read_manifest(import_folder_tree(root, tmp_path / "ds"))
    assert len(recs) == 4
    assert {r["work"] for r in recs} == {"The Foggy Dew", "Sliabh na mBan"}
    assert all(r["perf"].startswith("My_Tunes_") for r in recs)
    assert recs[0]["perf"] == "My_Tunes_00000000_0_0" and recs[0]["version"] == "fiddle.mp3"
    assert all(r["dur_s"] == pytest.approx(1.5, abs=0.1) for r in recs)


def test_generic_tree_pattern_and_prefix(tmp_path):
    root = tmp_path / "coll"
    write_tone(root / "A" / "x.wav", 1.2)
    write_tone(root / "A" / "y.flac", 1.2)
    recs = read_manifest(import_folder_tree(root, tmp_path / "ds", "*/*.wav", perf_prefix="fs"))
    assert [r["perf"] for r in recs] == ["fs_00000000_0_0"]


def test_empty_tree_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "empty" / "work").mkdir(parents=True)
    with pytest.raises(ManifestError, match="no audio files"):
        import_folder_tree(tmp_path / "empty", tmp_path / "ds")
    with pytest.raises(ManifestError, match="not found"):
        import_covers80(tmp_path / "nowhere", tmp_path / "ds")


def test_each_source_kind_has_its_own_valid_prep_defaults():
    from chlib.demo import DEMO_PREP_CONFIG

    assert PREP_DEFAULTS["demo"] == DEMO_PREP_CONFIG
    covers, folder = default_prep_config("covers80"), default_prep_config("folder", n_works=50)
    assert covers.test_data_unseen > 0 and covers.test_data_split == 0  # ~2 recordings a work
    assert covers.to_dict() != default_prep_config("demo").to_dict() != folder.to_dict()
    small = default_prep_config("folder", n_works=4)
    assert small.test_data_unseen == 0 and small.test_data_split > 0
    with pytest.raises(ConfigError, match="kind must be one of"):
        default_prep_config("mp3s")
