"""Restoring exact feasibility: an honest upper bound from a loose solve."""

import pytest
import torch
from _reference import reference_solve

from hcl.convex import global_lower_bound, solve
from hcl.convex.build import all_patterns_problem, problem_from_network
from hcl.convex.feasibility import feasible_solution, restore_feasibility
from hcl.convex.native import solve_native
from hcl.convex.snapshot import CHECK_TOL, bracket


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


def test_a_point_outside_its_cones_by_less_than_a_tolerance_is_moved_in_before_it_bounds_from_above():
    # data of scale 1000: Clarabel's point violates its cones by 4e-6, within 1e-6 · max|Y|, and its value was 4e-10
    # below the certified lower bound, so that the logged "upper bound" was under it
    g = torch.Generator().manual_seed(0)
    X, Y = 1000 * torch.randn(8, 1, generator=g), 1000 * torch.randn(8, 1, generator=g)
    problem = all_patterns_problem(X, Y, bias=True, weight_decay=0.5, reduction="sum", output_bias=True)
    solution = solve(problem, "clarabel")
    assert solution.violation > 0
    moved = feasible_solution(problem, solution, CHECK_TOL)
    assert moved.violation == 0.0
    fit = problem.predict(moved.U, moved.V, moved.b0)
    lower = global_lower_bound(problem.X, problem.Y, fit, weight_decay=0.5, reduction="sum", bias=False,
                               output_bias=True).lower_bound
    known = bracket(problem, moved, None)
    assert known.upper_bound == moved.value >= max(lower, moved.dual_value)
    assert bracket(problem, solution, None).upper_bound is None  # the unmoved point's value bounds nothing


@pytest.mark.parametrize("c", [1, 3])
def test_directions_in_the_cones_move_the_columns_at_once(c, monkeypatch):
    import hcl.convex.feasibility as feasibility

    problem, point = network_problem(c, 0)
    loose = solve_native(problem, method="admm", tol=1e-9, constraint_tol=1e-9, max_iters=250, anderson=0)
    steps = []
    original = feasibility._multipliers
    monkeypatch.setattr(feasibility, "_multipliers", lambda *args: steps.append(1) or original(*args))
    directions = (point[0] + point[1]).sum(-1).T  # the network's neurons: points of their patterns' cones
    directions[:, 0] = 0.0  # a pattern without a known point: its columns take the per-column steps
    restored = restore_feasibility(problem, loose.U, loose.V, directions)
    shifted_steps = len(steps)
    steps.clear()
    restore_feasibility(problem, loose.U, loose.V)
    assert shifted_steps < len(steps)
    exact = problem.in_float64()
    assert float(exact.violation(*restored[:2])) == 0.0
    value = float(exact.objective(*restored))
    assert reference_solve(problem).value * (1 - 1e-8) <= value <= loose.value + 0.05 * abs(loose.value)


def test_columns_far_outside_their_cones_on_repeated_rows_are_moved_in_or_zeroed():
    # on data whose every sample is repeated (the active rows' matrices singular, the ridge keeps them factorable):
    # a column violated on more distinct samples than unknowns can only become zero, and every column must end
    # inside its cone (repeated rows as many as the unknowns: test_repeated_points_on_the_boundary_keep_their_columns)
    problem, (U, V, _) = network_problem(2, 4, n=30, d=3)
    problem = problem.__class__(**{**problem.__dict__, "X": problem.X.repeat(2, 1), "Y": problem.Y.repeat(2, 1),
                                   "patterns": problem.patterns.repeat(2, 1)})
    g = torch.Generator().manual_seed(5)
    U = U + 0.01 * torch.randn(U.shape, generator=g, dtype=torch.float64) * U.abs().amax()
    V = V + 0.01 * torch.randn(V.shape, generator=g, dtype=torch.float64) * V.abs().amax()
    exact = problem.in_float64()
    U2, V2, b0 = restore_feasibility(problem, U, V)
    assert float(exact.violation(U2, V2)) == 0.0
    signs = exact.patterns.double() * 2 - 1
    stepped = []
    d = problem.X.shape[1]
    for before, after in ((U, U2), (V, V2)):
        violated = (signs.T[:, :, None] * (exact.X @ before) < 0).sum(1)  # (P, c): violated samples per column
        distinct = violated // 2  # both copies of a sample are violated together
        moved = after.abs().sum(1) > 0
        assert not (moved & (distinct > d)).any()  # more independent equations than unknowns: zero
        stepped.append(moved & (violated > 0))
    assert torch.stack(stepped).any()  # some columns outside their cones were moved in, not zeroed
    assert torch.isfinite(exact.objective(U2, V2, b0))


def test_a_column_as_small_as_its_violation_is_zeroed_without_a_factorisation(monkeypatch):
    # rounding columns (10⁻⁷ at 2 000 MNIST images, violated on half the samples) took 97 % of a move's flops, each
    # factorising hundreds of active rows, to end near zero anyway
    import hcl.convex.feasibility as feasibility

    problem, (U, V, _) = network_problem(2, 0)
    U, V = U.clone(), V.clone()
    g = torch.Generator().manual_seed(1)
    U[1, :, 0] = 1e-7 * torch.randn(U.shape[1], generator=g, dtype=torch.float64)  # random signs: violated on many
    steps = []
    original = feasibility._multipliers
    monkeypatch.setattr(feasibility, "_multipliers", lambda *args: steps.append(1) or original(*args))
    exact = problem.in_float64()
    assert float(exact.violation(U, V)) > 0  # the case
    U2, V2, _ = restore_feasibility(problem, U, V)
    assert not steps and float(exact.violation(U2, V2)) == 0.0
    assert float(U2[1, :, 0].abs().max()) == 0.0 and torch.equal(U2[2:], U[2:]) and torch.equal(V2, V)
    # a column outside by far less than its size is moved, not zeroed
    U[1, :, 0] = 0.0
    i, j = divmod(int(U.norm(dim=1).argmax()), U.shape[2])  # the largest column
    signs = exact.patterns[:, i].double() * 2 - 1
    outputs = signs * (exact.X @ U[i, :, j])
    k = int(torch.where(outputs > 0, outputs, torch.inf).argmin())  # its output nearest the boundary
    U[i, :, j] -= 1.01 * outputs[k] * signs[k] * exact.X[k] / exact.X[k].square().sum()  # just across it there
    assert float(exact.violation(U, V)) > 0
    U2, V2, _ = restore_feasibility(problem, U, V)
    assert steps and float(exact.violation(U2, V2)) == 0.0
    assert 0 < float((U2[i, :, j] - U[i, :, j]).norm()) < 0.1 * float(U[i, :, j].norm())


def test_repeated_points_on_the_boundary_keep_their_columns():
    # the all-patterns problem of 1-D data with repeated points: the conic solver's point is 3e-10 outside its cones
    # on two copies of a point, as many rows as unknowns; moved in by zeroing those columns, its value was the zero
    # network's (2.28 against an optimum of 1.518) and the global monitor logged no optimum
    x = [0.0, 0.0, 1.0, 1.0, 2.0]
    X = torch.tensor(x, dtype=torch.float64)[:, None]
    y = torch.linspace(-1, 1, len(x), dtype=torch.float64).sin() + torch.tensor(x, dtype=torch.float64).cos()
    problem = all_patterns_problem(X, y, bias=True, weight_decay=0.1, reduction="sum")
    solution = solve(problem, "clarabel")
    assert solution.violation > 0  # the case: outside its cones by rounding, on the repeated point's two rows
    restored = feasible_solution(problem, solution, 1e-6)
    assert restored.violation == 0.0 and restored.status == "optimal"
    assert restored.value == pytest.approx(reference_solve(problem).value, rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_a_cone_without_interior_keeps_the_optimum_on_its_boundary(lam):
    # a neuron without bias tied at 0 on x and −x (both active): its cone is the subspace x·u = 0, which no step puts
    # "inside"; the column was zeroed, the value rose 25 % above the optimum, and no optimum was logged
    X = torch.tensor([[1., 0], [-1, 0], [2, 0], [-2, 0], [1, 1], [-1, 2], [2, -1], [.5, -2], [1, 3], [-2, -1]],
                     dtype=torch.float64)
    Y = torch.tensor([1., 2, 3, 1, 2, 5, -1, 0, 4, 1], dtype=torch.float64)[:, None]
    W, A = torch.tensor([[0., 1.], [1., 1.]], dtype=torch.float64), torch.tensor([[1., 1.]], dtype=torch.float64)
    problem, _ = problem_from_network(X, Y, W, None, A, None, weight_decay=lam, reduction="mean")
    solution = solve(problem, "clarabel")
    assert solution.violation > 0  # the case: the conic solver's point is outside by rounding
    restored = feasible_solution(problem, solution, 1e-6)
    assert restored.status == "optimal" and restored.violation <= 1e-12
    assert restored.value == pytest.approx(reference_solve(problem).value, rel=1e-6)


def test_a_neuron_of_zeros_without_bias_keeps_a_lambda_0_optimum():
    # its all-ones pattern's cone on Gaussian data is {0}: the solver's 4e-10 left there was zeroed at no cost, yet with
    # λ = 0 (no certificate beyond 0) the moved point lost its "optimal"
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(30, 1, generator=g, dtype=torch.float64)
    W, A = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g, dtype=torch.float64)
    W[0] = 0.0
    problem, _ = problem_from_network(X, Y, W, None, A, None, weight_decay=0.0, reduction="mean")
    solution = solve(problem, "clarabel")
    assert solution.violation > 0
    restored = feasible_solution(problem, solution, 1e-6)
    assert restored.status == "optimal" and restored.violation == 0.0
    assert restored.value == pytest.approx(reference_solve(problem).value, rel=1e-6)


def test_a_boundary_column_that_is_rounding_itself_is_zeroed_so_the_point_bounds_the_optimum():
    # at 500 MNIST images and 10 outputs, 13 columns of norm 1e-7 stayed on their cones' boundary, outside by 6e-22: the
    # moved point bounded nothing, and the monitor logged status 0 beside the network's own gap (0.9995 for 9.4e-4)
    X = torch.tensor([[1., 0], [-1, 0], [2, 0], [-2, 0], [1, 1], [-1, 2], [2, -1], [.5, -2], [1, 3], [-2, -1]],
                     dtype=torch.float64)
    Y = torch.tensor([1., 2, 3, 1, 2, 5, -1, 0, 4, 1], dtype=torch.float64)[:, None]
    W, A = torch.tensor([[0., 1.], [1., 1.]], dtype=torch.float64), torch.tensor([[1., 1.]], dtype=torch.float64)
    problem, _ = problem_from_network(X, Y, W, None, A, None, weight_decay=0.01, reduction="mean")
    solution = solve(problem, "clarabel")
    U, V, b0 = restore_feasibility(problem, solution.U, solution.V)
    outside = [(name, i) for name, Z in (("U", U), ("V", V)) for i in range(problem.num_patterns)
               if bool((((problem.patterns[:, i].double() * 2 - 1)[:, None] * (X @ Z[i])) < 0).any())]
    assert outside  # the case: a column on its boundary, outside by rounding
    for name, i in outside:  # those columns made as small as rounding: the fit no longer needs them
        getattr(solution, name)[i] *= 1e-9
    U, V, b0 = restore_feasibility(problem, solution.U, solution.V)
    assert float(problem.violation(U, V)) == 0.0
    assert all(float({"U": U, "V": V}[name][i].abs().max()) == 0.0 for name, i in outside)


def test_a_point_moved_into_its_cones_without_a_dual_value_is_not_optimal():
    """A user's solver may say "optimal" with no dual value: once its point has moved (its value changed), nothing
    certifies it."""
    from hcl.convex import ConvexProblem, ConvexSolution, Status

    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=g, dtype=torch.float64)
    problem = ConvexProblem(X, torch.randn(20, 1, generator=g, dtype=torch.float64),
                            X @ torch.randn(2, 4, generator=g, dtype=torch.float64) >= 0, weight_decay=0.01)
    U, V = (torch.randn(4, 2, 1, generator=g, dtype=torch.float64) for _ in range(2))
    b0 = torch.zeros(1, dtype=torch.float64)
    claim = ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status="optimal", solver="mine",
                           solve_seconds=0.0, dual_value=None, violation=float(problem.violation(U, V)))
    assert claim.violation > 0
    moved = feasible_solution(problem, claim, tol=1e-6)
    assert moved.violation == 0.0
    assert Status.of(moved.status) == Status.OPTIMAL_INACCURATE


def test_with_no_weight_decay_a_move_that_lowers_the_claimed_value_ends_the_claim():
    """At λ = 0 nothing certifies a bound, so a moved point keeps "optimal" only where the move left the value where it
    was. A move that lowers it found a feasible point below the claimed optimum, which was then none (such a point,
    moved from 104 to 0.76 where p* = 0.26, stayed "optimal" when only a raised value counted)."""
    from hcl.convex import ConvexProblem, ConvexSolution, Status

    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    patterns = X @ torch.randn(3, 4, generator=g, dtype=torch.float64) >= 0
    problem = ConvexProblem(X, torch.randn(20, generator=g, dtype=torch.float64), patterns, weight_decay=0.0)
    U, V = (3.0 * torch.randn(4, 3, 1, generator=g, dtype=torch.float64) for _ in range(2))
    b0 = torch.zeros(1, dtype=torch.float64)
    claim = ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status="optimal", solver="mine",
                           solve_seconds=0.0, dual_value=0.0, violation=float(problem.violation(U, V)))
    moved = feasible_solution(problem, claim, tol=1e-6)
    assert moved.violation == 0.0 and moved.value < 0.5 * claim.value  # the case: the move lowered the value
    assert Status.of(moved.status) == Status.OPTIMAL_INACCURATE
