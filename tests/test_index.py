"""Tests of chlib.retrieval.index: round trips, refusals, incremental updates, calibration, centroids,
search."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import StandIn

from chlib.core.config import FeatureSettings, HParams
from chlib.core.errors import IndexMismatchError
from chlib.retrieval.embed import window_settings
from chlib.retrieval.index import (
    Calibration,
    ReferenceIndex,
    build_index,
    calibrate_distances,
    compute_centroids,
    ecdf_probabilities,
    index_from_windows,
    sample_cross_work_pairs,
)
from chlib.retrieval.protocol import track_distances

FP = "0123456789abcdef"
WSET = window_settings(30, 3)


def synthetic(n_works=12, per_work=3, dim=16, seed=0, max_windows=3, noise=0.3):
    """Records and raw window embeddings clustered by work."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_works, dim))
    records, windows = [], []
    for w in range(n_works):
        for v in range(per_work):
            n_win = int(rng.integers(1, max_windows + 1))
            windows.append(centres[w] + noise * rng.normal(size=(n_win, dim)))
            records.append({"perf": f"work{w:03d}_v{v}", "work": f"W{w}", "work_id": w,
                            "wav": f"/audio/{w}_{v}.wav", "feat": f"/f/{w}_{v}.npy",
                            "dur_s": 100.0 + v})
    return records, windows


def make_index(records, windows, **kw):
    kw.setdefault("model_fingerprint", FP)
    kw.setdefault("feature_settings", FeatureSettings())
    kw.setdefault("window_settings", WSET)
    return index_from_windows(records, windows, **kw)


def assert_same_index(a: ReferenceIndex, b: ReferenceIndex):
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.records == b.records
    assert a.model_fingerprint == b.model_fingerprint
    assert a.feature_settings == b.feature_settings
    assert a.window_settings == b.window_settings and a.rule == b.rule
    if a.windows is None:
        assert b.windows is None
    else:
        np.testing.assert_array_equal(a.windows, b.windows)
        np.testing.assert_array_equal(a.window_owner, b.window_owner)
    assert (a.calibration is None) == (b.calibration is None)
    if a.calibration is not None:
        assert a.calibration.mu == pytest.approx(b.calibration.mu, abs=1e-12)
        assert a.calibration.sigma == pytest.approx(b.calibration.sigma, abs=1e-12)
        np.testing.assert_array_equal(a.calibration.quantiles, b.calibration.quantiles)
        assert a.calibration.n_pairs == b.calibration.n_pairs
    assert a.centroids.works == b.centroids.works
    np.testing.assert_allclose(a.centroids.vectors, b.centroids.vectors, atol=1e-7)
    np.testing.assert_allclose(a.centroids.coherence, b.centroids.coherence, atol=1e-12)
    np.testing.assert_allclose(a.centroids.radius, b.centroids.radius, atol=1e-12)
    np.testing.assert_array_equal(a.centroids.n_members, b.centroids.n_members)


# --------------------------------------------------------------------------------------------
# storage


@pytest.mark.parametrize("rule", ["mean", "min"])
def test_index_save_load_round_trip_is_exact(tmp_path, rule):
    records, windows = synthetic()
    idx = make_index(records, windows, rule=rule)
    idx.save(tmp_path / "index")
    back = ReferenceIndex.load(tmp_path / "index", expect_fingerprint=FP,
                               expect_features=FeatureSettings())
    assert_same_index(idx, back)
    q = windows[4]
    assert idx.search([q], k=5) == back.search([q], k=5)


def test_index_files_hold_no_pickles(tmp_path):
    records, windows = synthetic()
    make_index(records, windows).save(tmp_path / "index")
    names = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert names == ["centroids.npy", "embeddings.npy", "meta.json", "records.jsonl",
                     "window_owner.npy", "windows.npy"]
    for p in (tmp_path / "index").glob("*.npy"):
        arr = np.load(p, allow_pickle=False)  # would raise on an object (pickled) array
        assert arr.dtype != object
        assert not p.read_bytes().startswith(b"\x80")  # not a raw pickle stream


def test_index_load_refuses_another_models_fingerprint(tmp_path):
    records, windows = synthetic()
    make_index(records, windows).save(tmp_path / "index")
    with pytest.raises(IndexMismatchError) as e:
        ReferenceIndex.load(tmp_path / "index", expect_fingerprint="fedcba9876543210")
    msg = str(e.value)
    assert FP in msg and "fedcba9876543210" in msg and "rebuild" in msg


def test_index_load_refuses_other_feature_settings(tmp_path):
    records, windows = synthetic()
    make_index(records, windows).save(tmp_path / "index")
    other = FeatureSettings(fmin=40.0)
    with pytest.raises(IndexMismatchError, match="fmin") as e:
        ReferenceIndex.load(tmp_path / "index", expect_features=other)
    assert "Rebuild" in str(e.value)


def test_index_load_detects_a_changed_file(tmp_path):
    records, windows = synthetic()
    make_index(records, windows).save(tmp_path / "index")
    emb = np.load(tmp_path / "index" / "embeddings.npy")
    np.save(tmp_path / "index" / "embeddings.npy", emb[::-1].copy())
    with pytest.raises(IndexMismatchError, match="embeddings.npy"):
        ReferenceIndex.load(tmp_path / "index")


def test_index_load_of_a_folder_without_an_index_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexMismatchError, match="build_index"):
        ReferenceIndex.load(tmp_path)


# --------------------------------------------------------------------------------------------
# incremental updates


@pytest.mark.parametrize("rule", ["mean", "min"])
def test_index_incremental_add_equals_a_rebuild(rule):
    records, windows = synthetic(seed=1)
    full = make_index(records, windows, rule=rule)
    part = make_index(records[:20], windows[:20], rule=rule)
    part.add(records[20:], windows[20:])
    assert_same_index(full, part)


@pytest.mark.parametrize("rule", ["mean", "min"])
def test_index_incremental_remove_equals_a_rebuild(rule):
    records, windows = synthetic(seed=2)
    full = make_index(records, windows, rule=rule)
    gone_perfs = {records[1]["perf"], records[7]["perf"]}
    gone_work = "W5"
    removed = full.remove(perfs=sorted(gone_perfs), works=[gone_work])
    keep = [i for i, r in enumerate(records) if r["perf"] not in gone_perfs and r["work"] != gone_work]
    assert removed == len(records) - len(keep)
    rebuilt = make_index([records[i] for i in keep], [windows[i] for i in keep], rule=rule)
    assert_same_index(full, rebuilt)
    assert "W5" not in full.centroids.works


def test_index_add_refuses_a_known_perf():
    records, windows = synthetic()
    idx = make_index(records, windows)
    with pytest.raises(Exception, match="already in the index"):
        idx.add(records[:1], windows[:1])


# --------------------------------------------------------------------------------------------
# calibration


def test_index_ecdf_anchors_are_the_originals_1001_probabilities():
    p = ecdf_probabilities()
    assert p.size == 1001 and p[0] == pytest.approx(1e-6) and p[500] == 0.5
    assert np.all(np.diff(p) > 0)
    np.testing.assert_allclose(p[:500] + p[::-1][:500], 1.0)


def test_index_cross_work_pairs_are_distinct_and_cross_work():
    works = np.repeat(np.arange(30), 5)
    for limit in (10**9, 10):  # enumeration path and rejection-sampling path
        i, j, method = sample_cross_work_pairs(works, 2000, 3, enumerate_limit=limit)
        assert method == "sampled" and i.size == 2000
        assert np.all(i < j) and np.all(works[i] != works[j])
        assert np.unique(i * 1000 + j).size == 2000
    i, j, method = sample_cross_work_pairs(np.repeat([0, 1, 2], 2), 100, 3)
    assert method == "all" and i.size == 12  # 15 pairs - 3 same-work pairs


def test_index_calibration_of_random_unit_vectors_matches_theory():
    # independent random unit vectors in D dims: 1 - cos has mean 1 and sd ~ 1/sqrt(D)
    rng = np.random.default_rng(11)
    dim, n = 64, 400
    x = rng.normal(size=(n, dim))
    records = [{"perf": f"p{i}", "work": f"w{i // 10}"} for i in range(n)]
    idx = make_index(records, [row[None] for row in x])
    cal = idx.calibration
    assert cal.n_pairs == 50_000 and cal.method == "sampled"
    assert cal.mu == pytest.approx(1.0, abs=0.01)
    assert cal.sigma == pytest.approx(1 / np.sqrt(dim), rel=0.08)
    # p-values against the empirical truth over *all* cross-work pairs
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - u @ u.T
    works = np.arange(n) // 10
    iu = np.triu_indices(n, 1)
    cross = d[iu][works[iu[0]] != works[iu[1]]]
    for q in (0.7, 0.8, 0.9, 1.0, 1.1):
        assert cal.p_value(q) == pytest.approx(np.mean(cross <= q), abs=0.005)
    assert cal.z_score(1.0 - 2 / np.sqrt(dim)) == pytest.approx(-2.0, abs=0.2)
    assert cal.p_value(-1.0) == pytest.approx(1 / 50_001)  # the floor
    assert cal.p_value(3.0) == 1.0


def test_index_calibration_is_seeded_and_uses_the_work_column():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 8))
    # perf ids without dots: the original's perf.split('.') would make every perf its own work
    records = [{"perf": f"cover{i}", "work": f"w{i // 2}"} for i in range(60)]
    a = make_index(records, [r[None] for r in x], n_pairs=500)
    b = make_index(records, [r[None] for r in x], n_pairs=500)
    assert a.calibration.mu == b.calibration.mu
    assert a.calibration.n_pairs == 500
    # make same-work pairs identical: if they were sampled, distances of 0 would appear
    x2 = np.repeat(rng.normal(size=(30, 8)), 2, axis=0)
    c = make_index(records, [r[None] for r in x2], n_pairs=10_000)
    assert c.calibration.n_pairs == 60 * 59 // 2 - 30  # all cross-work pairs
    assert c.calibration.quantiles.min() > 1e-3


def test_calibrate_distances_of_a_known_sample():
    d = np.linspace(0.0, 1.0, 10001)
    cal = calibrate_distances(d)
    assert cal.mu == pytest.approx(0.5) and cal.sigma == pytest.approx(d.std(ddof=1))
    assert cal.p_value(0.25) == pytest.approx(0.25, abs=1e-3)
    assert cal.p_value(0.001) == pytest.approx(0.001, abs=2e-4)
    assert isinstance(Calibration.from_json(cal.to_json()).p_value(0.5), float)


# --------------------------------------------------------------------------------------------
# centroids


def test_index_centroid_coherence_and_radius_on_constructed_clusters():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    emb = np.stack([e1, e1, e2, e3, e1]).astype(np.float32)
    works = ["A", "A", "B", "B", "C"]
    c = compute_centroids(emb, works)
    assert c.works == ["A", "B", "C"]
    a, b, cc = (c.row(w) for w in "ABC")
    assert c.coherence[a] == pytest.approx(1.0) and c.radius[a] == pytest.approx(0.0, abs=1e-7)
    assert c.coherence[b] == pytest.approx(1 / np.sqrt(2))
    np.testing.assert_allclose(c.vectors[b], (e2 + e3) / np.sqrt(2), atol=1e-7)
    assert c.radius[b] == pytest.approx(1 - 1 / np.sqrt(2))  # both members at that distance
    assert c.n_members.tolist() == [2, 2, 1]
    # three members: distances 1 - cos to the centroid, radius = mean + 1.5 std
    v = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0]], dtype=np.float32)
    c3 = compute_centroids(v, ["X"] * 3)
    m = v.mean(axis=0)
    cen = m / np.linalg.norm(m)
    dist = 1 - v @ cen
    assert c3.coherence[0] == pytest.approx(np.linalg.norm(m), rel=1e-6)
    assert c3.radius[0] == pytest.approx(dist.mean() + 1.5 * dist.std(), rel=1e-5)


def test_index_centroids_group_by_the_work_column_not_the_perf_id():
    records, windows = synthetic(n_works=4, per_work=3)
    idx = make_index(records, windows)
    assert idx.centroids.works == ["W0", "W1", "W2", "W3"]
    assert idx.centroids.n_members.tolist() == [3, 3, 3, 3]
    assert np.all(idx.centroids.coherence < 1.0)


# --------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("rule", ["mean", "min"])
def test_index_search_top_k_equals_brute_force(rule):
    records, windows = synthetic(n_works=40, seed=3)
    idx = make_index(records, windows, rule=rule)
    rng = np.random.default_rng(4)
    queries = [rng.normal(size=(int(rng.integers(1, 4)), 16)) for _ in range(7)]
    res = idx.search(queries, k=10)
    for q, rows in zip(queries, res, strict=True):
        if rule == "min":
            d = track_distances([q], windows, rule="min")[0]
        else:
            qe = q / np.linalg.norm(q, axis=1, keepdims=True)
            qe = qe.mean(0) / np.linalg.norm(qe.mean(0))
            e = np.stack([(w / np.linalg.norm(w, axis=1, keepdims=True)).mean(0) for w in windows])
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            d = 1 - e @ qe
        order = np.argsort(d, kind="stable")[:10]
        assert [r["perf"] for r in rows] == [records[i]["perf"] for i in order]
        np.testing.assert_allclose([r["distance"] for r in rows], d[order], atol=1e-5)
        assert [r["rank"] for r in rows] == list(range(1, 11))
        assert all(np.isfinite(r["z"]) and 0 < r["p_value"] <= 1 for r in rows)


def test_index_search_vectors_and_batch_shapes():
    records, windows = synthetic(seed=5)
    idx = make_index(records, windows)
    one = idx.search(idx.embeddings[3], k=3)
    assert len(one) == 1 and one[0][0]["perf"] == records[3]["perf"]
    assert one[0][0]["distance"] == pytest.approx(0.0, abs=1e-6)
    many = idx.search(idx.embeddings[:5], k=2)
    assert [r[0]["perf"] for r in many] == [r["perf"] for r in records[:5]]
    assert len(idx.search(idx.embeddings[0], k=1000)[0]) == len(idx)


def test_index_search_by_work_ranks_works_by_their_closest_recording():
    records, windows = synthetic(n_works=10, seed=6)
    idx = make_index(records, windows)
    q = windows[7]
    rows = idx.search([q], k=4, by="work")[0]
    per_perf = idx.search([q], k=len(idx))[0]
    best_per_work: dict[str, dict] = {}
    for r in per_perf:
        best_per_work.setdefault(r["work"], r)
    expected = list(best_per_work.values())[:4]
    assert [r["work"] for r in rows] == [r["work"] for r in expected]
    assert [r["perf"] for r in rows] == [r["perf"] for r in expected]
    assert len({r["work"] for r in rows}) == 4
    for r, e in zip(rows, expected, strict=True):
        m = r["n_work_recordings"]
        assert r["p_value"] == pytest.approx(1 - (1 - e["p_value"]) ** m)


# --------------------------------------------------------------------------------------------
# build from a model


def test_build_index_from_a_model_and_feature_files(tmp_path):
    rng = np.random.default_rng(7)
    hp = HParams.from_dict({"chunk_frame": [15], "mean_size": 2, "n_bins": 12, "input_dim": 12})
    records = []
    for w in range(4):
        base = rng.random((80, 12)).astype(np.float32) * -60
        for v in range(2):
            p = tmp_path / f"w{w}v{v}.npy"
            np.save(p, base + rng.normal(scale=1.0, size=base.shape).astype(np.float32))
            records.append({"perf": f"w{w}v{v}", "work": f"w{w}", "work_id": w, "feat": str(p)})
    records.append({"perf": "sp_0.9-w0v0", "work": "w0", "work_id": 0, "feat": str(tmp_path / "x"),
                    "source_perf": "w0v0"})
    records.append({"perf": "broken", "work": "w9", "work_id": 9, "feat": str(tmp_path / "no.npy")})
    model = StandIn()
    idx = build_index(model, records, hp, rule="mean", progress=False)
    assert len(idx) == 8  # tempo copy dropped, broken file skipped
    assert [s["perf"] for s in idx.skipped] == ["broken"]
    from chlib.model.checkpoint import model_fingerprint

    assert idx.model_fingerprint == model_fingerprint(model.state_dict())
    assert idx.feature_settings == hp.features.key()
    res = idx.search(idx.embeddings[2], k=1)[0][0]
    assert res["perf"] == "w1v0"
    # add_tracks refuses another model
    with pytest.raises(IndexMismatchError):
        idx.add_tracks(StandIn(seed=1), records[:1], hp, progress=False)
