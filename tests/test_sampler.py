"""m-per-class batch sampler: batch composition, epochs, seeds, small sets."""

from __future__ import annotations

from collections import Counter

import pytest

from chlib.core.errors import ConfigError
from chlib.data.sampler import MPerClassBatchSampler, grouped_batches

# 10 works with 1..5 recordings each
LABELS = [w for w in range(10) for _ in range(1 + w % 5)]


def _works(batch):
    return Counter(LABELS[i] for i, _ in batch)


def test_every_batch_is_k_works_times_m_items():
    s = MPerClassBatchSampler(LABELS, m=4, batch_size=12, seed=0)
    batches = s.epoch_batches(0)
    assert len(batches) == s.batches_per_epoch == 4  # ceil(10 works / 3 per batch)
    for b in batches:
        assert len(b) == 12
        counts = _works(b)
        assert len(counts) == 3 and set(counts.values()) == {4}


def test_an_epoch_visits_every_work():
    s = MPerClassBatchSampler(LABELS, m=2, batch_size=8, seed=3)
    for epoch in range(3):
        seen = set().union(*(_works(b) for b in s.epoch_batches(epoch)))
        assert seen == set(LABELS)


def test_works_with_few_recordings_use_all_then_repeat():
    s = MPerClassBatchSampler(LABELS, m=4, batch_size=8, seed=1)
    for b in s.epoch_batches(0):
        by_work: dict[int, list[int]] = {}
        for i, _ in b:
            by_work.setdefault(LABELS[i], []).append(i)
        for w, idx in by_work.items():
            own = [i for i, lab in enumerate(LABELS) if lab == w]
            assert set(idx) <= set(own)
            if len(own) <= 4:
                assert set(idx) == set(own)  # each recording at least once
            else:
                assert len(set(idx)) == 4  # without replacement when there are enough


def test_same_seed_same_batches_other_seed_or_epoch_differs():
    a = MPerClassBatchSampler(LABELS, m=2, batch_size=6, seed=7)
    b = MPerClassBatchSampler(LABELS, m=2, batch_size=6, seed=7)
    c = MPerClassBatchSampler(LABELS, m=2, batch_size=6, seed=8)
    assert a.epoch_batches(2) == b.epoch_batches(2)
    assert a.epoch_batches(2) != c.epoch_batches(2)
    assert a.epoch_batches(2) != a.epoch_batches(3)
    # item seeds are distinct within an epoch (each crop gets its own stream)
    seeds = [sd for batch in a.epoch_batches(0) for _, sd in batch]
    assert len(set(seeds)) == len(seeds)


def test_start_batch_resumes_mid_epoch():
    s = MPerClassBatchSampler(LABELS, m=2, batch_size=6, seed=0)
    full = s.epoch_batches(5)
    s.set_epoch(5, start_batch=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2
    state = s.state_dict()
    t = MPerClassBatchSampler(LABELS, m=2, batch_size=6, seed=0)
    t.load_state_dict(state)
    assert list(t) == full[2:]
    with pytest.raises(ConfigError, match="seed"):
        MPerClassBatchSampler(LABELS, m=2, batch_size=6, seed=1).load_state_dict(state)


def test_fewer_works_than_a_batch_needs_fills_with_real_items():
    labels = [0, 0, 1]  # 2 works, batch wants 4 works x 2
    s = MPerClassBatchSampler(labels, m=2, batch_size=8, seed=0)
    (batch,) = s.epoch_batches(0)
    assert len(batch) == 8
    assert set(_idx for _idx, _ in batch) == {0, 1, 2}  # no index-0 padding: every item used


def test_bad_arguments():
    with pytest.raises(ConfigError, match="multiple"):
        MPerClassBatchSampler(LABELS, m=3, batch_size=8, seed=0)
    with pytest.raises(ConfigError, match="empty"):
        MPerClassBatchSampler([], m=2, batch_size=8, seed=0)


def test_grouped_batches_cover_every_item_once_sorted_by_work():
    labels = [3, 1, 3, 0, 1, 2, 0]
    batches = grouped_batches(labels, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(labels)))
    assert [labels[i] for i in flat] == sorted(labels)
    assert [len(b) for b in batches] == [3, 3, 1]
