"""chlib.data.splits: no leakage of recordings across splits, reproducible, fractions and holdouts."""

import random
from collections import Counter

import pytest

from chlib.core.errors import ConfigError, ManifestError
from chlib.core.manifest import read_manifest, source_perf
from chlib.data.splits import kfold_groups, split_by_work, write_splits

FACTORS = (0.8, 0.9, 1.1, 1.2)


def make_records(n_works: int, sizes, *, tempo: bool = True, seed: int = 0) -> list[dict]:
    """full.txt-like records: work w has sizes[w % len(sizes)] recordings (+ 4 tempo copies each)."""
    recs = []
    for w in range(n_works):
        for v in range(sizes[w % len(sizes)]):
            perf = f"p_{w:04d}_{v}"
            recs.append({"perf": perf, "work": f"work{w:04d}", "work_id": w, "feat_len": 100})
            if tempo:
                for f in FACTORS:
                    recs.append({"perf": f"sp_{f}-{perf}", "source_perf": perf,
                                 "work": f"work{w:04d}", "work_id": w, "tempo": f})
    random.Random(seed).shuffle(recs)
    return recs


def split_of(splits) -> dict[str, set[str]]:
    """recording -> set of split names its records are in."""
    out: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for r in getattr(splits, name):
            out.setdefault(source_perf(r), set()).add(name)
    return out


ARGS = dict(val_data_split=0.1, val_unseen=0.05, test_data_split=0.15, test_data_unseen=0.1)


def test_a_recording_and_its_tempo_copies_never_sit_in_different_splits():
    recs = make_records(60, [2, 3, 5, 8])
    s = split_by_work(recs, seed=3, **ARGS)
    where = split_of(s)
    assert all(len(v) == 1 for v in where.values()), "a recording leaked across splits"
    assert len(s.train) + len(s.val) + len(s.test) == len(recs)
    assert sorted(r["perf"] for r in s.train + s.val + s.test) == sorted(r["perf"] for r in recs)


def test_same_seed_same_splits_regardless_of_input_order_and_other_seed_differs():
    a = split_by_work(make_records(50, [3, 6], seed=1), seed=7, **ARGS)
    b = split_by_work(make_records(50, [3, 6], seed=2), seed=7, **ARGS)
    c = split_by_work(make_records(50, [3, 6], seed=1), seed=8, **ARGS)
    perfs = lambda s: {n: sorted(r["perf"] for r in getattr(s, n)) for n in ("train", "val", "test")}  # noqa: E731
    assert perfs(a) == perfs(b)
    assert a.test_only_work_ids == b.test_only_work_ids
    assert perfs(a) != perfs(c)


def test_lists_keep_the_input_record_order():
    recs = make_records(20, [4])
    s = split_by_work(recs, seed=1, **ARGS)
    pos = {r["perf"]: i for i, r in enumerate(recs)}
    for part in (s.train, s.val, s.test):
        idx = [pos[r["perf"]] for r in part]
        assert idx == sorted(idx)


def test_unseen_works_are_fully_held_out():
    recs = make_records(100, [3, 4, 6])
    s = split_by_work(recs, seed=5, **ARGS)
    assert len(s.test_only_work_ids) == 10 and len(s.val_only_work_ids) == 5
    assert not set(s.test_only_work_ids) & set(s.val_only_work_ids)
    train_ids = {r["work_id"] for r in s.train}
    val_ids = {r["work_id"] for r in s.val}
    test_ids = {r["work_id"] for r in s.test}
    assert not set(s.test_only_work_ids) & (train_ids | val_ids)
    assert not set(s.val_only_work_ids) & (train_ids | test_ids)
    for wid in s.test_only_work_ids:  # every record of a test-only work is in test
        assert sum(r["work_id"] == wid for r in s.test) == sum(r["work_id"] == wid for r in recs)


def test_fractions_of_seen_recordings_are_about_right_on_a_larger_set():
    recs = make_records(400, [2, 3, 4, 5, 7, 10], tempo=False)
    s = split_by_work(recs, seed=11, val_data_split=0.1, test_data_split=0.2)
    n = len(recs)
    assert abs(len(s.val) / n - 0.1) < 0.01
    assert abs(len(s.test) / n - 0.2) < 0.01
    # with tempo copies the fractions count recordings, so records scale by 5
    recs5 = make_records(400, [2, 3, 4, 5, 7, 10])
    s5 = split_by_work(recs5, seed=11, val_data_split=0.1, test_data_split=0.2)
    assert abs(len(s5.test) / len(recs5) - 0.2) < 0.01


def test_every_seen_work_keeps_a_training_recording_and_singletons_stay_in_train():
    recs = make_records(80, [1, 2, 3])
    s = split_by_work(recs, seed=2, val_data_split=0.3, test_data_split=0.3)
    train_works = {r["work"] for r in s.train}
    assert train_works == {r["work"] for r in recs}
    singles = {r["work"] for r in recs if r["work_id"] % 3 == 0}
    assert not singles & {r["work"] for r in s.val + s.test}


def test_zero_val_split_gives_no_forced_val_records():
    # the original put one line of every work in val even with val_data_split = 0
    s = split_by_work(make_records(30, [4, 6]), seed=1, test_data_split=0.2)
    assert s.val == [] and len(s.test) > 0


def test_all_zero_ratios_put_everything_in_train():
    recs = make_records(10, [3])
    s = split_by_work(recs, seed=1)
    assert len(s.train) == len(recs) and s.val == s.test == [] and s.test_only_work_ids == []


def test_test_unseen_works_without_test_data_split():
    s = split_by_work(make_records(20, [3]), seed=1, test_data_unseen=0.1)
    assert len(s.test_only_work_ids) == 2 and s.test


def test_holdouts_never_take_every_work():
    s = split_by_work(make_records(2, [3]), seed=1, test_data_unseen=0.5, val_unseen=0.5)
    assert {r["work"] for r in s.train}, "no work left for training"
    assert len(s.test_only_work_ids) + len(s.val_only_work_ids) == 1
    assert any("held out instead" in n for n in s.notes)


def test_work_ids_from_sorted_names_when_records_have_none():
    recs = [{"perf": f"{w}{i}", "work": w} for w in ("b", "a", "c", "d") for i in range(3)]
    s = split_by_work(recs, seed=4, test_data_unseen=0.5)
    names = sorted({r["work"] for r in s.test})
    assert [{"a": 0, "b": 1, "c": 2, "d": 3}[n] for n in names] == s.test_only_work_ids


@pytest.mark.parametrize("bad", [dict(val_data_split=1.0), dict(test_data_unseen=-0.1),
                                 dict(val_data_split=0.5, test_data_split=0.5)])
def test_impossible_fractions_are_config_errors(bad):
    with pytest.raises(ConfigError):
        split_by_work(make_records(5, [3]), seed=1, **bad)


def test_tempo_copy_with_another_work_is_rejected():
    recs = [{"perf": "a", "work": "A"}, {"perf": "sp_0.8-a", "source_perf": "a", "work": "B"}]
    with pytest.raises(ManifestError, match="two works"):
        split_by_work(recs, seed=1)


def test_write_splits_writes_every_file_even_empty(tmp_path):
    recs = make_records(20, [3, 4])
    s = split_by_work(recs, seed=1, test_data_split=0.2, test_data_unseen=0.1)
    paths = write_splits(tmp_path, s)
    assert len(read_manifest(paths["train"], required=())) == len(s.train)
    assert read_manifest(paths["val"], required=()) == []
    ids = [int(x) for x in (tmp_path / "test-only-work-ids.txt").read_text().split()]
    assert ids == s.test_only_work_ids and len(ids) == 2
    assert (tmp_path / "val-only-work-ids.txt").read_text() == ""


def test_kfold_groups_partition_by_recording_and_stratify_by_work():
    recs = make_records(40, [5, 10])
    k = 5
    folds = kfold_groups(recs, k, seed=3)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(len(recs)))
    fold_of_rec: dict[str, set[int]] = {}
    for j, f in enumerate(folds):
        for i in f:
            fold_of_rec.setdefault(source_perf(recs[i]), set()).add(j)
    assert all(len(v) == 1 for v in fold_of_rec.values())
    for w in {r["work"] for r in recs}:  # each work is spread evenly over the folds
        per_fold = Counter(next(iter(fold_of_rec[source_perf(r)]))
                           for r in recs if r["work"] == w and "source_perf" not in r)
        assert max(per_fold.values()) - min(per_fold.get(j, 0) for j in range(k)) <= 1
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 5  # one recording (5 records) at most
    assert kfold_groups(recs, k, seed=3) == folds and kfold_groups(recs, k, seed=4) != folds


def test_kfold_needs_two_folds():
    with pytest.raises(ConfigError):
        kfold_groups(make_records(3, [2]), 1)
