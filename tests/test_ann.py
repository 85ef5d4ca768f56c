"""chlib.retrieval.ann: FAISS search over large reference libraries (issue 14, "Search at
10^6-10^7"). Small N (<= 20k) so the file runs in seconds; the bench covers 10^6."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from chlib.core.errors import ConfigError, IndexMismatchError  # noqa: E402
from chlib.retrieval.ann import AnnIndex, default_params, recall_at  # noqa: E402

D = 128  # the demo model's embed_dim


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int, m: int, noise: float, seed: int = 0):
    """n random unit references and m queries, noisy copies of m of them (cosine ~0.9 at
    noise 0.05: a cover, not a copy; random pairs sit at 0 +- 1/sqrt(D))."""
    rng = np.random.default_rng(seed)
    refs = unit(rng.standard_normal((n, D)))
    truth = rng.choice(n, m, replace=False)
    q = unit(refs[truth] + noise * rng.standard_normal((m, D)).astype(np.float32))
    return refs, q, truth


def brute(refs, q, k):
    s = q @ refs.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


FAST = {"pq_nbits": 6, "threads": 1}  # 64-centroid codebooks train ~4x faster than 256


@pytest.fixture(scope="module")
def data():
    return planted(20_000, 200, 0.05)


@pytest.fixture(scope="module")
def ivf(data):
    return AnnIndex.build(data[0], kind="ivfpq", seed=0, **FAST)


def test_default_params_follow_n():
    assert default_params(10_000, D).kind == "flat"
    p = default_params(1_000_000, D)
    assert (p.kind, p.nlist, p.pq_m, p.pq_nbits) == ("ivfpq", 4000, 32, 8)
    assert 16 <= p.nprobe <= 256 and p.train_size == 160_000
    assert default_params(1_000_000, D, nprobe=7).nprobe == 7
    assert default_params(10_000, D, kind="hnsw").hnsw_m == 32
    with pytest.raises(ConfigError, match="unknown index parameter"):
        default_params(1000, D, nprobes=3)
    with pytest.raises(ConfigError, match="pq_m must divide D"):
        default_params(1_000_000, D, pq_m=30)


def test_exact_kind_equals_numpy(data):
    refs, q, _ = data
    ann = AnnIndex.build(refs, threads=1)
    assert ann.kind == "flat" and len(ann) == len(refs) and ann.dim == D
    idx, sim = ann.search(q, 10)
    want_idx, want_sim = brute(refs, q, 10)
    assert idx.dtype == np.int64 and sim.dtype == np.float32 and idx.shape == (len(q), 10)
    np.testing.assert_array_equal(idx, want_idx)  # random data: no ties at float32
    np.testing.assert_allclose(sim, want_sim, atol=1e-5)


@pytest.mark.parametrize("kind, params", [
    ("ivfpq", None),  # the shared fixture: re-ranked
    ("ivfpq", {"refine_factor": 0, **FAST}),  # PQ codes alone still find the planted copy
    ("hnsw", {"threads": 1}),
])
def test_approximate_kind_finds_planted_copies(data, ivf, kind, params):
    refs, q, truth = data
    ann = ivf if params is None else AnnIndex.build(refs, kind=kind, seed=0, **params)
    idx, sim = ann.search(q, 10)
    assert recall_at(10, truth, idx) >= 0.95
    assert recall_at(10, brute(refs, q, 1)[0], idx) >= 0.95
    if params is None:  # re-ranked: the similarities are exact
        exact_sim = np.einsum("md,md->m", q, refs[idx[:, 0]])
        np.testing.assert_allclose(sim[:, 0], exact_sim, atol=1e-5)


def test_float16_storage_same_top1(data, ivf):
    refs, q, truth = data
    for kind in ("flat", "ivfpq"):
        ann32 = ivf if kind == "ivfpq" else AnnIndex.build(refs, kind=kind)
        i32, s32 = ann32.search(q, 1)
        kw = FAST if kind == "ivfpq" else {}
        i16, s16 = AnnIndex.build(refs, kind=kind, float16=True, seed=0, **kw).search(q, 1)
        np.testing.assert_array_equal(i16, i32)
        np.testing.assert_allclose(s16, s32, atol=2e-3)
        assert recall_at(1, truth, i16) >= 0.95


def test_fewer_rows_than_k_gives_minus_one():
    refs, q, _ = planted(5, 2, 0.05)
    idx, sim = AnnIndex.build(refs).search(q, 8)
    assert (idx[:, 5:] == -1).all() and np.isneginf(sim[:, 5:]).all()
    assert sorted(idx[0, :5]) == list(range(5))


def test_recall_at_counts_exact_top1():
    exact = np.array([[3, 1], [4, 2]])
    found = np.array([[1, 3, 9], [0, 1, 2]])
    assert recall_at(2, exact, found) == 0.5 and recall_at(1, exact, found) == 0.0
    with pytest.raises(ConfigError):
        recall_at(5, exact, found)


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_round_trip(tmp_path, data, ivf, kind):
    refs, q, _ = data
    ann = ivf if kind == "ivfpq" else AnnIndex.build(refs, kind=kind)
    ann.save(tmp_path)
    back = AnnIndex.load(tmp_path, dim=D, n=len(refs))
    assert back.params == ann.params and len(back) == len(refs)
    for a, b in zip(ann.search(q, 10), back.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((tmp_path / "ann.json").read_text())
    assert (meta["n"], meta["dim"], meta["index_kind"]) == (len(refs), D, kind)


def test_tampered_or_mismatched_file_refused(tmp_path):
    refs, _, _ = planted(500, 1, 0.05)
    AnnIndex.build(refs).save(tmp_path)
    with pytest.raises(IndexMismatchError, match="D=128.*D=64.*rebuild"):
        AnnIndex.load(tmp_path, dim=64)
    with pytest.raises(IndexMismatchError, match="N=500"):
        AnnIndex.load(tmp_path, n=501)
    path = tmp_path / "index.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexMismatchError, match=r"index\.faiss: SHA-256.*rebuild"):
        AnnIndex.load(tmp_path)
    # a file of the right checksum but another shape (meta.json edited too) is refused
    AnnIndex.build(refs[:, :64] / np.linalg.norm(refs[:, :64], axis=1, keepdims=True)
                   ).save(tmp_path / "other")
    meta = json.loads((tmp_path / "other" / "ann.json").read_text())
    meta["dim"] = D
    (tmp_path / "other" / "ann.json").write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match=r"holds \[500, 64\]"):
        AnnIndex.load(tmp_path / "other")
    with pytest.raises(IndexMismatchError, match="no ann.json"):
        AnnIndex.load(tmp_path / "nowhere")


def test_bad_arguments_are_config_errors(data):
    refs, q, _ = data
    ann = AnnIndex.build(refs[:1000])
    for k in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="k="):
            ann.search(q, k)
    with pytest.raises(ConfigError, match=r"expected \[M, 128\]"):
        ann.search(q[:, :64], 5)
    with pytest.raises(ConfigError, match="expected"):
        ann.search(q[0], 5)  # one vector needs q[None, :]
    with pytest.raises(ConfigError, match="unit vectors"):
        ann.search(2 * q, 5)
    with pytest.raises(ConfigError, match="NaN"):
        AnnIndex.build(np.full((3, D), np.nan, np.float32))
    with pytest.raises(ConfigError, match="kind="):
        AnnIndex.build(refs[:10], kind="lsh")
    with pytest.raises(ConfigError, match="threads"):
        AnnIndex.build(refs[:10], threads=0)


# ------------------------------------------------ the reference index searched through FAISS

def reference_index(n_works: int = 400, per_work: int = 3, seed: int = 0):
    """A ReferenceIndex of n_works x per_work one-window recordings around each work's centre,
    and one query per work (another noisy copy of its centre)."""
    from chlib.core.config import FeatureSettings
    from chlib.retrieval.embed import window_settings
    from chlib.retrieval.index import index_from_windows

    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_works, D)))
    recs, sets = [], []
    for w in range(n_works):
        for v in range(per_work):
            recs.append({"perf": f"w{w}_v{v}", "work": f"W{w}", "work_id": w})
            sets.append(centres[w] + 0.08 * rng.standard_normal((1, D)))
    idx = index_from_windows(recs, sets, model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(),
                             window_settings=window_settings(30, 3), n_pairs=2000)
    return idx, unit(centres + 0.08 * rng.standard_normal((n_works, D)))


@pytest.mark.parametrize("by", ["perf", "work"])
def test_reference_index_through_exact_faiss_equals_its_numpy_search(by):
    idx, q = reference_index()
    numpy_rows = idx.search(q[:50], k=10, by=by, use_faiss=False)
    faiss_rows = idx.search(q[:50], k=10, by=by, use_faiss=True)
    assert idx.ann().kind == "flat"
    for a, b in zip(numpy_rows, faiss_rows, strict=True):
        assert [r["perf"] for r in a] == [r["perf"] for r in b]
        assert [r["work"] for r in a] == [r["work"] for r in b]
        np.testing.assert_allclose([r["distance"] for r in a], [r["distance"] for r in b],
                                   atol=1e-5)
        np.testing.assert_allclose([r["p_value"] for r in a], [r["p_value"] for r in b],
                                   atol=1e-4)


def test_reference_index_through_ivfpq_finds_the_works_and_survives_save_and_load(tmp_path):
    idx, q = reference_index()
    idx.ann(kind="ivfpq", nlist=16, nprobe=8)  # kept for the searches below
    top = [rows[0]["work"] for rows in idx.search(q, k=5, by="work", use_faiss=True)]
    assert np.mean([w == f"W{i}" for i, w in enumerate(top)]) >= 0.99
    idx.save(tmp_path / "index")
    back = type(idx).load(tmp_path / "index")
    assert back._ann is not None and back._ann.kind == "ivfpq"
    assert [r[0]["work"] for r in back.search(q, k=5, by="work", use_faiss=True)] == top
    (tmp_path / "index" / "ann" / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(IndexMismatchError, match="SHA-256"):
        type(idx).load(tmp_path / "index")


def test_changed_rows_drop_the_faiss_index_and_its_saved_copy(tmp_path):
    idx, q = reference_index(n_works=100)
    idx.ann(kind="ivfpq", nlist=8, nprobe=8)
    idx.save(tmp_path / "index")
    assert (tmp_path / "index" / "ann" / "ann.json").is_file()
    idx.remove(works=["W3"])
    assert idx._ann is None
    assert all(r["work"] != "W3" for rows in idx.search(q[:10], k=5, by="work", use_faiss=True)
               for r in rows)
    assert idx._ann.kind == "flat"  # rebuilt for the rows there are now (few: exact)
    idx.save(tmp_path / "index")
    assert not (tmp_path / "index" / "ann" / "ann.json").exists()


def test_by_work_falls_back_to_exact_when_the_candidates_hold_too_few_works():
    """One work with 600 recordings around the query fills every FAISS candidate: the other
    works must still be ranked, as the exact search ranks them."""
    from chlib.core.config import FeatureSettings
    from chlib.retrieval.embed import window_settings
    from chlib.retrieval.index import index_from_windows

    rng = np.random.default_rng(1)
    c = unit(rng.standard_normal((1, D)))
    recs = [{"perf": f"big{i}", "work": "BIG"} for i in range(600)]
    recs += [{"perf": f"o{i}", "work": f"O{i}"} for i in range(50)]
    sets = [c + 0.01 * rng.standard_normal((1, D)) for _ in range(600)]
    sets += [rng.standard_normal((1, D)) for _ in range(50)]
    idx = index_from_windows(recs, sets, model_fingerprint="f" * 16,
                             feature_settings=FeatureSettings(),
                             window_settings=window_settings(30, 3), n_pairs=2000)
    exact = idx.search(c, k=5, by="work", use_faiss=False)
    through = idx.search(c, k=5, by="work", use_faiss=True)
    assert len(through[0]) == 5 and [r["work"] for r in through[0]] == [r["work"] for r in exact[0]]
