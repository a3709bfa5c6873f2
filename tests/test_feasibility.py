"""Restoring exact feasibility: an honest upper bound from a loose solve."""

import pytest
import torch
from _reference import reference_solve

from hcl.convex.build import problem_from_network
from hcl.convex.feasibility import restore_feasibility
from hcl.convex.native import solve_native


def network_problem(c: int, seed: int, n: int = 60, d: int = 4, m: int = 8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    W1, b1 = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    W2 = torch.randn(c, m, generator=g, dtype=torch.float64)
    return problem_from_network(X, Y, W1, b1, W2, None, weight_decay=0.05, reduction="mean")


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("seed", [0, 1] + [pytest.param(s, marks=pytest.mark.slow) for s in (2, 3)])
def test_a_loose_solution_restored_is_feasible_and_bounds_the_optimum(c, seed):
    problem, point = network_problem(c, seed)
    # a tol it cannot reach within 250 iterations: the iterate there, outside its cones
    loose = solve_native(problem, method="admm", tol=1e-9, constraint_tol=1e-9, max_iters=250, anderson=0)
    assert loose.violation > 1e-8  # a point outside its cones: its value is no upper bound
    restored = restore_feasibility(problem, loose.U, loose.V)
    exact = problem.in_float64()
    assert float(exact.violation(*restored[:2])) == 0.0
    value = float(exact.objective(*restored))
    p_star = reference_solve(problem).value
    assert value >= p_star * (1 - 1e-8)
    # the move is of the size of the violation: the restored value stays near the loose one
    assert value <= loose.value + 0.05 * abs(loose.value)


def test_a_feasible_point_is_left_as_it_is():
    problem, point = network_problem(2, 0)
    U, V, _ = point
    restored = restore_feasibility(problem, U, V)
    assert torch.equal(restored[0], U.double()) and torch.equal(restored[1], V.double())
