"""Segment identification end to end (issue 12): sets made from real demo renders (the demo's
synthesiser, joined by chlib.demo.sets), decoded against an index of those renders with a
small deterministic stand-in model; plus the batch's bad inputs."""

from __future__ import annotations

import csv
import json
from functools import partial

import numpy as np
import pytest
import soundfile as sf
from helpers import StandIn as _StandIn

import chlib.demo as dd
from chlib.core.config import HParams
from chlib.core.errors import ConfigError
from chlib.demo.sets import make_sets, read_sets
from chlib.retrieval.identify import query_features
from chlib.retrieval.index import build_index
from chlib.retrieval.segment import (
    SEGMENT_CSV_COLUMNS,
    evaluate_sets,
    feature_timeline,
    identify_segments,
    query_windows,
    refine_boundaries,
)
from chlib.signal.audio import load_audio, peak_normalise
from chlib.signal.cqt import compute_cqt_db

StandIn = partial(_StandIn, n_bins=96, dim=16, centre=True, scale=1.0)  # CQT input
SR = 16000
# The stand-in (mean and std of the CQT) tells demo tunes apart by ~0.3 z per window, a trained
# model by several: with the default switch penalty (6) its 8 s tunes would merge.
DECODER = {"hop_s": 0.5, "switch_penalty": 2.0}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """4 demo works x 2 renders of 8-10 s; an index of them (+ 60 unrelated works); 6 sets."""
    root = tmp_path_factory.mktemp("segment")
    cache = root / "tunes"
    dataset = dd.make_demo_dataset(root / "demo", n_works=4, perfs_per_work=2, min_seconds=8.0,
                                   max_seconds=10.0, seed=0, progress=False, num_workers=0,
                                   cache_dir=cache)
    records = [json.loads(x) for x in dataset.read_text().splitlines()]
    hp = HParams.from_dict({"chunk_frame": [25], "mean_size": 2})  # windows of 50 frames = 2 s
    for r in records:
        y = peak_normalise(load_audio(r["wav"], sample_rate=SR))
        r["feat"] = str(root / f"{r['perf']}.npy")
        np.save(r["feat"], compute_cqt_db(y, hp.features, device="cpu"))
    model = StandIn()
    index = build_index(model, records, hp, device="cpu", progress=False)
    rng = np.random.default_rng(0)
    extra = [{"perf": f"x{i}", "work": f"other{i // 2}"} for i in range(120)]
    index.add(extra, [rng.normal(size=(3, 16)) for _ in extra])
    sets = read_sets(make_sets(records, root / "sets", n_sets=6, min_works=2, max_works=3,
                               seed=1, gap_share=0.3))
    return {"root": root, "hp": hp, "model": model, "index": index, "records": records,
            "sets": sets}


def test_sets_of_demo_renders_are_decoded_into_their_tunes(demo):
    rep = identify_segments([s["wav"] for s in demo["sets"]], model=demo["model"],
                            hp=demo["hp"], index=demo["index"], device="cpu", **DECODER)
    assert not rep.errors and len(rep.timelines) == len(demo["sets"])
    for s in demo["sets"]:
        tl = rep.timelines[s["wav"]]
        assert tl.duration_s == pytest.approx(s["duration_s"], abs=0.05)
        assert tl.segments[0]["start_s"] == 0 and tl.segments[-1]["end_s"] == tl.duration_s
        assert all(a["end_s"] == b["start_s"] for a, b in zip(tl.segments, tl.segments[1:], strict=False))
    summary = evaluate_sets(demo["sets"], rep)
    assert summary["n_sets"] == len(demo["sets"]) and summary["n_missing"] == 0
    assert summary["recall_at_n"] >= 0.9 and summary["all_in_top10"] == 1.0
    assert summary["time_accuracy"] >= 0.8
    assert summary["median_boundary_error_s"] <= 1.5
    assert summary["false_work_share"] <= 0.1


def test_segments_csv_and_whole_file_answers(demo, tmp_path):
    s = demo["sets"][0]
    rep = identify_segments([s["wav"]], model=demo["model"], hp=demo["hp"],
                            index=demo["index"], device="cpu", **DECODER)
    path = rep.to_csv(tmp_path / "segments.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(SEGMENT_CSV_COLUMNS) and all(r["query"] == s["wav"] for r in rows)
    found = [w["work"] for w in rep.works()]
    assert set(found) == {seg["work"] for seg in s["segments"]}
    assert sum(w["seconds"] for w in rep.works()) <= s["duration_s"] + 0.05  # a CQT frame


def test_bad_queries_are_reported_and_the_batch_goes_on(demo, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt garbage")
    short = tmp_path / "short.wav"  # shorter than one 2 s window
    sf.write(short, load_audio(demo["records"][0]["wav"], sample_rate=SR)[:3 * SR // 2], SR)
    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(8 * SR, np.float32), SR)
    rep = identify_segments([corrupt, short, silent, demo["sets"][0]["wav"]],
                            model=demo["model"], hp=demo["hp"], index=demo["index"],
                            device="cpu", **DECODER)
    assert [e["query"] for e in rep.errors] == [str(corrupt), str(silent)]
    assert "corrupt" in rep.errors[0]["error"] and "silen" in rep.errors[1]["error"]
    assert len(rep.timelines) == 2
    (seg,) = rep.timelines[str(short)].segments  # one window: one segment over the file
    assert seg["start_s"] == 0 and seg["end_s"] == pytest.approx(1.5, abs=0.05)
    rows = rep.rows()
    assert [r for r in rows if r["error"]] == [{c: None for c in SEGMENT_CSV_COLUMNS} | e
                                               for e in rep.errors]


def test_query_windows_cover_the_file_every_hop(demo):
    feat = np.load(demo["records"][0]["feat"])
    wins, starts, window_s = query_windows(feat, demo["model"], demo["hp"], hop_s=0.5)
    fps = demo["hp"].features.frames_per_second
    assert window_s == pytest.approx(2.0) and len(wins) == len(starts)
    assert np.allclose(np.diff(starts)[:-1], round(0.5 * fps) / fps)  # every hop (in frames),
    assert 0 < starts[-1] - starts[-2] <= 0.5  # the last window aligned to the end
    assert starts[-1] + window_s == pytest.approx(len(feat) / fps, abs=1 / fps)


def test_refined_cuts_move_towards_the_true_change_and_keep_the_labels(demo):
    """Each set's coarse cuts between two named works are pushed 1.5 s off; refinement with
    1-s windows (the coarse ones are 2 s) must bring them back nearer the true changes."""
    before, after = [], []
    for s in demo["sets"]:
        feat = query_features(s["wav"], demo["hp"], "cpu")
        tl = feature_timeline(feat, demo["model"], demo["hp"], demo["index"], device="cpu",
                              refine_s=None, **DECODER)
        true_b = [(a["end_s"] + b["start_s"]) / 2 for a, b in zip(s["segments"],
                                                                   s["segments"][1:], strict=False)]
        segs = [dict(x) for x in tl.segments]
        for a, b in zip(segs, segs[1:], strict=False):
            if a["work"] != b["work"] and "unknown" not in (a["work"], b["work"]):
                a["end_s"] = b["start_s"] = min(a["end_s"] + 1.5, b["end_s"] - 0.1)
        pushed = type(tl)(segs, tl.duration_s, tl.labels, tl.best_z)
        refined = refine_boundaries(pushed, feat, demo["model"], demo["hp"], demo["index"],
                                    refine_s=1.0, device="cpu")
        assert [x["work"] for x in refined.segments] == [x["work"] for x in tl.segments]
        assert [x["p_value"] for x in refined.segments] == [x["p_value"] for x in tl.segments]
        for old, new in zip(segs[:-1], refined.segments[:-1], strict=False):
            if old["end_s"] != new["end_s"] and true_b:
                before.append(min(abs(old["end_s"] - t) for t in true_b))
                after.append(min(abs(new["end_s"] - t) for t in true_b))
    assert len(after) >= 3
    assert np.median(after) < np.median(before)


def test_refinement_needs_a_positive_window(demo):
    s = demo["sets"][0]
    feat = query_features(s["wav"], demo["hp"], "cpu")
    tl = feature_timeline(feat, demo["model"], demo["hp"], demo["index"], device="cpu",
                          refine_s=None, **DECODER)
    with pytest.raises(ConfigError, match="refine_s"):
        refine_boundaries(tl, feat, demo["model"], demo["hp"], demo["index"], refine_s=0.0)
