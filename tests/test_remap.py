"""``remap_warm_start``: a solution carried to new patterns. The warm-start chain's own tests compare against this
function, so its cut-off, its outputs and its refusals are checked here."""

from __future__ import annotations

import pytest
import torch

from hcl.convex.native import Multipliers, remap_warm_start

F64 = dict(dtype=torch.float64)


def _two_block_solution(n: int = 20, d: int = 3, c: int = 1):
    """Old patterns: the first half of the samples, and the second half; blocks of distinct, nonzero values."""
    old = torch.zeros(n, 2, dtype=torch.bool)
    old[: n // 2, 0] = True
    old[n // 2 :, 1] = True
    U = torch.arange(1.0, 1.0 + 2 * d * c, **F64).reshape(2, d, c)
    V = -U - 0.5
    return old, U, V


def test_remap_keeps_a_pattern_exactly_a_tenth_of_the_samples_away_and_drops_one_farther():
    """'A new pattern farther than n / 10 samples from every old one starts at zero': exactly n / 10 is not farther.
    Catches: (``>`` → ``>=``) and (``n / 10`` → ``n / 5``)."""
    old, U, V = _two_block_solution(n=20)
    at_tenth = old[:, 0].clone()
    at_tenth[[0, 1]] = ~at_tenth[[0, 1]]  # 2 = n / 10 samples from old pattern 0 (18 from pattern 1)
    farther = old[:, 1].clone()
    farther[[10, 11, 12]] = ~farther[[10, 11, 12]]  # 3 > n / 10 samples from old pattern 1 (17 from pattern 0)
    new = torch.stack([at_tenth, farther], dim=1)
    U_new, V_new, _, _ = remap_warm_start(old, (U, V, None), new)
    assert torch.equal(U_new[0], U[0]) and torch.equal(V_new[0], V[0])
    assert torch.count_nonzero(U_new[1]) == 0 and torch.count_nonzero(V_new[1]) == 0


def test_remap_returns_the_output_bias():
    """The output bias does not depend on the patterns: it comes back (a copy) with the remapped blocks."""
    old, U, V = _two_block_solution()
    b0 = torch.tensor([0.75], **F64)
    _, _, b0_new, _ = remap_warm_start(old, (U, V, b0), old.flip(1))
    assert b0_new is not None and torch.equal(b0_new, b0)
    assert b0_new.data_ptr() != b0.data_ptr()  # a copy: the new solve may not write into the old solution


def test_remap_keeps_the_multipliers_penalty():
    """The augmented-Lagrangian penalty reached travels with the multipliers, which stay a sparse COO tensor (their
    documented layout: only active constraints stored). Catches: (penalty dropped) and (a dense cone)."""
    old, U, V = _two_block_solution()
    n, c = old.shape[0], U.shape[2]
    cone = torch.zeros(n, 2, 2, c, **F64)
    cone[3, 0, 0, 0] = 0.25
    _, _, _, mult = remap_warm_start(old, (U, V, None, Multipliers(cone.to_sparse(), penalty=2.5)), old)
    assert mult.penalty == 2.5
    assert mult.cone.is_sparse
    assert torch.equal(mult.cone.to_dense(), cone)


def test_remap_from_a_solution_without_patterns_starts_every_block_at_zero():
    """A solved problem with no pattern (every neuron dead) still carries over: no block is near, all start at 0.
    Catches: (the early return only for an empty new set: the (P_new, 0) max raised)."""
    n, d, c = 12, 3, 1
    old = torch.zeros(n, 0, dtype=torch.bool)
    new = torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    U = torch.zeros(0, d, c, **F64)
    U_new, V_new, _, _ = remap_warm_start(old, (U, U.clone(), None), new)
    assert U_new.shape == V_new.shape == (3, d, c)
    assert torch.count_nonzero(U_new) == 0 and torch.count_nonzero(V_new) == 0


def test_remap_refuses_patterns_of_other_samples_and_a_solution_of_other_patterns():
    """Catches: (the same-n check dropped: a RuntimeError from the product) and (a solution with more blocks
    than old patterns accepted)."""
    old, U, V = _two_block_solution(n=20)
    with pytest.raises(ValueError, match="same n"):
        remap_warm_start(old, (U, V, None), torch.ones(21, 2, dtype=torch.bool))
    three = torch.cat([U, U[:1]])
    with pytest.raises(ValueError, match="blocks"):
        remap_warm_start(old, (three, three.clone(), None), old)
