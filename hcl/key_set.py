"""The set of 128-bit pattern keys a :class:`~hcl.patterns.PatternTracker` has seen in a run.

Kept as a few sorted runs whose sizes at least halve from one to the next (a new snapshot's keys are a run of their
own, merged with the last run while that is less than twice their size): adding ``k`` keys costs ``O(k log N)``
amortised, where inserting them into one sorted array copied all ``N`` keys at every snapshot (50 ms at 5.5 million
keys, the history of a 20-epoch run of ``configs/mnist.yaml``; docs/pattern_monitor.md#mini-batch-training). Each run
is sorted by the keys' high halves and searched as plain ``int64`` with the queries sorted (5 000 keys among 5.5
million: 4 ms, where a search of the structured records took 17 ms).
"""

from __future__ import annotations

import numpy as np

# A pattern's key as one record (the checkpoint's format): two int64 halves
KEY = np.dtype([("high", np.int64), ("low", np.int64)])


class KeySet:
    """Distinct keys, given as ``high`` and ``low`` ``int64`` arrays."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (high, low), each sorted by high

    def __len__(self) -> int:
        return sum(len(high) for high, _ in self._runs)

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Boolean mask: which of the keys ``(high, low)`` are in the set."""
        return self._locate(high, low) >= 0

    def _locate(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """Each key's position in :meth:`records`' order, ``-1`` where it is not in the set."""
        order = np.argsort(high, kind="stable")  # sorted queries: the search walks each run once
        high, low = high[order], low[order]
        where = np.full(len(high), -1, dtype=np.int64)
        offset = 0
        for run_high, run_low in self._runs:
            first = np.minimum(np.searchsorted(run_high, high), len(run_high) - 1)
            same = run_high[first] == high
            hit = same & (run_low[first] == low)
            where[hit] = offset + first[hit]
            for i in np.flatnonzero(same & ~hit):  # equal high halves (as rare as 64-bit collisions): the next keys
                stop = np.searchsorted(run_high, high[i], side="right")
                match = np.flatnonzero(run_low[first[i]:stop] == low[i])
                if len(match):
                    where[i] = offset + first[i] + match[0]
            offset += len(run_high)
        out = np.empty_like(where)
        out[order] = where
        return out

    def add(self, high: np.ndarray, low: np.ndarray) -> None:
        """Add keys that are distinct and not in the set yet."""
        if len(high) == 0:
            return
        order = np.argsort(high, kind="stable")
        self._runs.append((high[order], low[order]))
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) > len(self._runs[-2][0]):
            (h1, l1), (h2, l2) = self._runs[-2], self._runs.pop()
            high, low = np.concatenate([h1, h2]), np.concatenate([l1, l2])
            order = np.argsort(high, kind="stable")  # two sorted runs: merged in about linear time
            self._runs[-1] = (high[order], low[order])

    def records(self, without: np.ndarray | None = None) -> np.ndarray:
        """The keys as :data:`KEY` records (in no particular order), less the records ``without``."""
        out = np.empty(len(self), KEY)
        start = 0
        for high, low in self._runs:
            out["high"][start:start + len(high)] = high
            out["low"][start:start + len(high)] = low
            start += len(high)
        if without is not None and len(without):
            where = self._locate(np.ascontiguousarray(without["high"]), np.ascontiguousarray(without["low"]))
            out = np.delete(out, where[where >= 0])
        return out

    @classmethod
    def of_records(cls, records: np.ndarray, distinct: bool = False) -> KeySet:
        """The set of the records (:data:`KEY`) given; ``distinct``: they are (a checkpoint's), no pass removes
        repeats (sorting by both halves took 4.6 s at 5.5 million keys, by the high half alone 0.6 s)."""
        keys = cls()
        high, low = np.ascontiguousarray(records["high"]), np.ascontiguousarray(records["low"])
        if distinct:
            keys.add(high, low)
            return keys
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        first = np.ones(len(high), dtype=bool)  # the first of each run of equal keys
        first[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
        keys.add(high[first], low[first])
        return keys
