"""Parameter grids whose full product runs in the whole suite and a covering part of it in the fast subset."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest


def pairwise(*factors: Sequence) -> list:
    """Every combination of ``factors`` as a parameter; those outside a greedy pairwise cover carry ``slow``.

    The unmarked combinations take every pair of values of every two factors at least once, so the fast subset
    (``-m "not slow"``) still meets each interaction of two settings, and the whole suite meets all of them.
    """
    if len(factors) < 2:
        raise ValueError(f"pairwise needs two factors or more, got {len(factors)}")
    combos = list(itertools.product(*factors))

    def pairs(combo: tuple) -> set:  # factor positions, not values, tell pairs apart (two may share a value)
        return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(combo), 2)}

    uncovered = set().union(*(pairs(combo) for combo in combos))
    fast = set()
    while uncovered:
        best = max(range(len(combos)), key=lambda k: len(pairs(combos[k]) & uncovered))
        fast.add(best)
        uncovered -= pairs(combos[best])
    return [combo if k in fast else pytest.param(*combo, marks=pytest.mark.slow) for k, combo in enumerate(combos)]
