"""The tracker's set of pattern keys against a Python set, equal high halves included."""

from __future__ import annotations

import numpy as np

from hcl.key_set import KEY, KeySet


def _keys(rng, k, highs=None):
    high = rng.integers(-2**63, 2**63 - 1, k, dtype=np.int64) if highs is None else rng.choice(highs, k)
    return high, rng.integers(-2**63, 2**63 - 1, k, dtype=np.int64)


def test_membership_sizes_and_records_match_a_python_set():
    rng = np.random.default_rng(0)
    keys, reference = KeySet(), set()
    shared = np.array([7, -3], dtype=np.int64)  # keys that differ in their low half only
    for step in range(60):
        high, low = _keys(rng, int(rng.integers(0, 300)))
        if step % 3 == 0:  # some colliding high halves, and some keys seen before
            h2, l2 = _keys(rng, 20, shared)
            old = list(reference)[:15]
            high = np.concatenate([high, h2, [h for h, _ in old]]).astype(np.int64)
            low = np.concatenate([low, l2, [lo for _, lo in old]]).astype(np.int64)
        pairs = list(dict.fromkeys(zip(high.tolist(), low.tolist())))  # distinct, as a snapshot's keys are
        high = np.array([h for h, _ in pairs], dtype=np.int64)
        low = np.array([lo for _, lo in pairs], dtype=np.int64)
        found = keys.contains(high, low)
        assert found.tolist() == [p in reference for p in pairs]
        keys.add(high[~found], low[~found])
        reference.update(pairs)
        assert len(keys) == len(reference)
        sizes = [len(h) for h, _ in keys._runs]
        assert all(2 * b <= a for a, b in zip(sizes, sizes[1:]))  # the runs at least halve
    records = keys.records()
    assert set(zip(records["high"].tolist(), records["low"].tolist())) == reference
    without = records[::7]
    rest = keys.records(without=without)
    assert set(zip(rest["high"].tolist(), rest["low"].tolist())) == reference - set(
        zip(without["high"].tolist(), without["low"].tolist()))
    again = KeySet.of_records(np.concatenate([records, records[:10]]))
    assert len(again) == len(reference) and again.contains(records["high"].copy(), records["low"].copy()).all()


def test_an_empty_set():
    keys = KeySet()
    assert len(keys) == 0 and keys.records().dtype == KEY and len(keys.records()) == 0
    assert not keys.contains(np.array([1], dtype=np.int64), np.array([2], dtype=np.int64)).any()
    keys.add(np.empty(0, np.int64), np.empty(0, np.int64))
    assert keys._runs == []
