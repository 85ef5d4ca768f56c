"""Key readings (``key_variants``): each window embedded at the estimated key and at other
readings of it, compared reading against estimate both ways (chlib.retrieval.protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import StandIn

from chlib.core.config import FeatureSettings, HParams
from chlib.core.errors import ConfigError
from chlib.data.features import prepare_window
from chlib.retrieval import timeline as tl
from chlib.retrieval.embed import embed_windows, hp_window_settings, window_settings
from chlib.retrieval.index import index_from_windows
from chlib.retrieval.protocol import pair_distances, reading_rows, track_distances, unit_rows
from chlib.signal.chroma import chroma_from_cqt, key_rotation, keyed_chroma_db

R = 2  # readings per window in these tests


def tracks(seed: int = 0, n: int = 6, dim: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((R * int(rng.integers(1, 4)), dim)).astype(np.float32)
            for _ in range(n)]


def brute(a: np.ndarray, b: np.ndarray, rule: str) -> float:
    """Pairs of readings where at least one side is the estimate (reading 0), by hand."""
    a, b = unit_rows(a), unit_rows(b)
    if rule == "min":
        return 1.0 - max(float(a[x] @ b[y]) for x in range(len(a)) for y in range(len(b))
                         if x % R == 0 or y % R == 0)

    def vec(t, k):
        m = unit_rows(t[k::R]).mean(0)
        return m / np.linalg.norm(m)
    return 1.0 - max(float(vec(a, x) @ vec(b, y)) for x in range(R) for y in range(R)
                     if x == 0 or y == 0)


@pytest.mark.parametrize("rule", ["min", "mean"])
def test_readings_compare_each_reading_with_the_estimate_never_two_rereadings(rule):
    ts = tracks()
    d = track_distances(ts, ts, rule=rule, readings=R)
    want = np.array([[brute(a, b, rule) for b in ts] for a in ts])
    np.testing.assert_allclose(d, want, atol=1e-5)
    np.testing.assert_allclose(d, d.T, atol=1e-5)  # both ways: symmetric
    one = track_distances([t[0::R] for t in ts], [t[0::R] for t in ts], rule=rule)
    assert (d <= one + 1e-6).all()  # a second reading can only bring tracks closer


def test_two_rereadings_alone_do_not_make_a_match():
    # rows [estimate, re-read]: the re-read rows are identical, the estimates opposite
    a = np.array([[1, 0, 0], [0, 0, 1]], np.float32)
    b = np.array([[-1, 0, 0], [0, 0, 1]], np.float32)
    assert track_distances([a], [b], rule="min", readings=2)[0, 0] == pytest.approx(1.0)
    assert track_distances([a], [b], rule="min")[0, 0] == pytest.approx(0.0)  # as plain windows


@pytest.mark.parametrize("rule", ["min", "mean"])
def test_pair_distances_with_readings_equal_track_distances(rule):
    ts = tracks(seed=1, n=7)
    i, j = np.array([0, 1, 2, 3, 6]), np.array([4, 0, 5, 6, 2])
    full = track_distances(ts, ts, rule=rule, readings=R)
    got = pair_distances([unit_rows(t) for t in ts], np.zeros((0, 8)), i, j, rule=rule, readings=R)
    np.testing.assert_allclose(got, full[i, j], atol=1e-5)


def test_reading_rows_refuse_a_track_that_cannot_hold_the_readings():
    with pytest.raises(ConfigError, match="cannot hold 2 key readings"):
        reading_rows(np.zeros((3, 4)), 2)
    np.testing.assert_array_equal(reading_rows(np.arange(6)[:, None], 2, 1)[:, 0], [1, 3, 5])


def test_keyed_chroma_key_shift_rotates_the_estimated_key():
    rng = np.random.default_rng(3)
    feat = (rng.random((50, 96)) * -60).astype(np.float32)
    base = keyed_chroma_db(feat)
    k = key_rotation(chroma_from_cqt(feat))
    for shift in (0, 5, 7):
        want = 20 * np.log10(np.roll(chroma_from_cqt(feat), -((k + shift) % 12), axis=1) + 1e-3)
        np.testing.assert_allclose(keyed_chroma_db(feat, key_shift=shift), want, atol=1e-5)
    np.testing.assert_allclose(keyed_chroma_db(feat, key_shift=7), np.roll(base, -7, axis=1),
                               atol=1e-5)


def test_embedding_gives_each_window_its_readings_in_order():
    rng = np.random.default_rng(4)
    feat = (rng.random((95, 96)) * -60).astype(np.float32)
    model = StandIn(n_bins=12)
    (rows,) = embed_windows(model, [feat], window=30, mean_size=3, transform="keyed_chroma",
                            key_variants=[0, 7], progress=False)
    (plain,) = embed_windows(model, [feat], window=30, mean_size=3, transform="keyed_chroma",
                             progress=False)
    assert rows.shape == (2 * len(plain), 8)
    np.testing.assert_allclose(rows[0::2], plain, rtol=1e-5)
    w = prepare_window(feat, 30, 30, 3, transform="keyed_chroma", key_shift=7)
    with torch.no_grad():
        np.testing.assert_allclose(rows[3], model(torch.from_numpy(w[None])).numpy()[0],
                                   rtol=1e-5)


def test_window_settings_keep_old_keys_and_refuse_readings_of_an_unkeyed_input():
    assert "key_variants" not in window_settings(30, 3, transform="keyed_chroma")
    assert window_settings(30, 3, transform="keyed_chroma",
                           key_variants=[0, 7])["key_variants"] == [0, 7]
    with pytest.raises(ConfigError, match="keyed input transform"):
        window_settings(30, 3, key_variants=[0, 7])
    with pytest.raises(ConfigError, match="key_shift 7 needs a keyed"):
        prepare_window(np.zeros((30, 12), np.float32), 0, 30, 3, key_shift=7)


@pytest.mark.parametrize(("variants", "transform", "match"), [
    ([7, 0], "keyed_chroma", "must start with 0"),
    ([0, 7, 7], "keyed_chroma", "not repeat"),
    ([0, 12], "keyed_chroma", "key_variants"),
    ([0, 7], "none", "need a keyed input_transform"),
])
def test_config_refuses_impossible_key_variants(variants, transform, match):
    with pytest.raises(ConfigError, match=match):
        HParams.from_dict({"key_variants": variants, "input_transform": transform})


def test_config_key_variants_reach_the_window_settings():
    hp = HParams.from_dict({"key_variants": [0, 7], "input_transform": "keyed_chroma"})
    assert hp_window_settings(hp)["key_variants"] == [0, 7]


@pytest.mark.parametrize("rule", ["min", "mean"])
def test_index_with_readings_searches_and_calibrates_as_the_protocol_compares(rule):
    ts = tracks(seed=5, n=12)
    recs = [{"perf": f"p{i}", "work": f"W{i // 2}", "work_id": i // 2} for i in range(len(ts))]
    wset = window_settings(30, 3, transform="keyed_chroma", key_variants=[0, 7])
    idx = index_from_windows(recs, ts, model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(), window_settings=wset, rule=rule)
    assert idx.readings == 2
    assert [r["n_windows"] for r in idx.records] == [len(t) // 2 for t in ts]
    queries = tracks(seed=6, n=3)
    d = track_distances(queries, ts, rule=rule, readings=2)
    for row, hits in zip(d, idx.search(queries, k=4), strict=True):
        order = np.argsort(row, kind="stable")[:4]
        assert [h["perf"] for h in hits] == [recs[i]["perf"] for i in order]
        np.testing.assert_allclose([h["distance"] for h in hits], row[order], atol=1e-5)
    with pytest.raises(ConfigError, match="one key reading"):
        idx.search(queries, k=2, use_faiss=True)
    with pytest.raises(ConfigError, match="cannot hold 2 key readings"):
        idx.search([np.ones((3, 8), np.float32)], k=2)  # embedded without the readings


def test_a_timeline_reads_its_windows_the_indexs_way_and_searches_each_run_with_them():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(12, 16))
    recs, sets = [], []
    for w in range(12):
        for v in range(2):
            est = centres[w] + 0.3 * rng.normal(size=(4, 16))
            sets.append(np.stack([est, rng.normal(size=(4, 16))], 1).reshape(8, 16))
            recs.append({"perf": f"w{w}_v{v}", "work": f"W{w}", "work_id": w})
    wset = window_settings(30, 3, transform="keyed_chroma", key_variants=[0, 7])
    idx = index_from_windows(recs, sets, model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(), window_settings=wset,
                             n_pairs=500)
    # a set: work 3 then work 8, each window with its estimate and a random re-reading
    est = [centres[w] + 0.3 * rng.normal(size=16) for w in [3] * 6 + [8] * 6]
    q = np.stack([np.stack([e, rng.normal(size=16)]) for e in est]).reshape(24, 16)
    res = tl.timeline(idx, q, np.arange(12) * 2.0, 6.0, 30.0, min_segment_z=0.0)
    assert [s["work"] for s in res.segments] == ["W3", "W8"]
    assert all(np.isfinite(s["p_value"]) for s in res.segments)
    with pytest.raises(ConfigError, match="key readings"):
        tl.timeline(idx, q[:23], np.arange(12) * 2.0, 6.0, 30.0)
