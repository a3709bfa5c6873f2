"""Statuses that mean what they say, values that belong to the returned point, and any memory layout of the data.

``"optimal"`` must mean a certified relative gap within ``tol``; the native solver checks its own result in float64
before returning it, conic solvers' solutions carry hcl's certificate, and ``ConvexProblem`` takes column-major,
transposed, strided and expanded tensors alike.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _params import pairwise
from _reference import reference_value
from test_snapshot import snapshot, spec

import hcl.convex.native.solver as native_solver
from hcl.convex import ConvexProblem, ConvexSolution, Status, solve, solve_native
from hcl.convex.native import NativeOptions
from hcl.convex.native.operator import Operator, Result, row_space_basis
from hcl.convex.native.solver import final_status
from hcl.convex.snapshot import bracket, evaluate_snapshot
from hcl.convex.status import GAP_FLOOR, relative_gap

F64 = dict(dtype=torch.float64)


def identical_rows_problem(y, lam=0.0, c_shape=None, bias=True, reduction="sum") -> ConvexProblem:
    n = y.shape[0]
    X = torch.tensor([[0.7, 1.0]] * n, **F64)
    return ConvexProblem(X=X, Y=y, patterns=torch.ones(n, 1, dtype=torch.bool), weight_decay=lam,
                         reduction=reduction, output_bias=bias)


def floor_of(problem: ConvexProblem) -> float:
    Y = problem.Y.double()
    centred = Y - Y.mean(0) if problem.output_bias else Y
    return GAP_FLOOR * problem.scale * float(centred.square().sum())


def assert_honest(solution, problem, tol=1e-6):
    """The value is the returned point's objective, the dual value a bound below it, and "optimal" certified."""
    exact = problem.in_float64()
    point = solution.U.double(), solution.V.double(), solution.b0.double()
    assert math.isclose(float(exact.objective(*point)), solution.value, rel_tol=1e-12, abs_tol=1e-300)
    assert solution.dual_value is not None and solution.dual_value <= solution.value * (1 + 1e-12) + 1e-300
    if solution.status == Status.OPTIMAL:
        assert relative_gap(solution.value, solution.dual_value, floor_of(problem)) <= tol
        assert solution.violation <= tol * float(problem.Y.abs().max())


# ------------------------------------------------------------------------- the example and its kin
def test_zero_decay_identical_rows_with_an_output_bias_returns_the_optimum_not_a_drifted_point():
    y = torch.tensor([0.3, -1.2, 0.5, 2.0, -0.4], **F64)
    problem = identical_rows_problem(y)
    solution = solve_native(problem)
    optimum = float((y - y.mean()).square().sum())  # 5.652: the output bias fits the mean, nothing else can help
    assert_honest(solution, problem)
    assert solution.status == Status.OPTIMAL_INACCURATE  # λ = 0: the only certified bound is 0
    assert solution.dual_value == 0.0
    assert abs(solution.value - optimum) <= 1e-9 * optimum
    assert float(torch.maximum(solution.U.abs().max(), solution.V.abs().max())) < 1e3
    assert abs(float(solution.b0) - float(y.mean())) < 1e-6
    assert abs(reference_value(problem) - optimum) <= 1e-8 * optimum


@pytest.mark.parametrize("lam,c,bias", pairwise([0.0, 1e-3, 0.1], [1, 3], [True, False]))
def test_random_targets_on_identical_rows(lam, c, bias):
    g = torch.Generator().manual_seed(int(lam * 1000) + 10 * c + bias)
    for scale in (1e-2, 1.0, 30.0):
        y = torch.randn(9, c, generator=g, **F64) * scale
        problem = identical_rows_problem(y.squeeze(1) if c == 1 else y, lam=lam, bias=bias)
        ref = reference_value(problem)
        solution = solve_native(problem)
        assert_honest(solution, problem)
        assert solution.status in (Status.OPTIMAL, Status.OPTIMAL_INACCURATE)
        assert abs(solution.value - ref) <= 1e-6 * max(ref, floor_of(problem))
        assert solution.dual_value <= ref + 1e-8 * max(ref, floor_of(problem))
        if lam > 0:
            assert solution.status == Status.OPTIMAL


def test_zero_decay_rank_deficient_data_without_bias_no_longer_stalls():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(60, **F64) * 10
    problem = identical_rows_problem(y, bias=False)
    solution = solve_native(problem)
    assert solution.status == Status.OPTIMAL_INACCURATE and solution.iterations < 30
    assert_honest(solution, problem)
    assert abs(solution.value - reference_value(problem)) <= 1e-9 * solution.value
    del g


# ------------------------------------------------------------------------- the final check of the native solver
def test_final_status_keeps_optimal_only_with_a_certified_gap():
    y = torch.tensor([1.0, -1.0, 2.0], **F64)
    problem = identical_rows_problem(y, lam=0.1)
    options = NativeOptions()
    floor = floor_of(problem)
    assert final_status(problem, Status.OPTIMAL, 2.0, 2.0 * (1 - 1e-7), 0.0, options) == Status.OPTIMAL
    assert final_status(problem, Status.OPTIMAL, 2.0, 1.9, 0.0, options) == Status.OPTIMAL_INACCURATE
    assert final_status(problem, Status.OPTIMAL, 2.0, 2.0, 1e-3, options) == Status.OPTIMAL_INACCURATE
    # the gap's floor: a near-zero value with a zero bound is certified
    assert final_status(problem, Status.OPTIMAL, 1e-7 * floor, 0.0, 0.0, options) == Status.OPTIMAL
    assert final_status(problem, Status.OPTIMAL, 1e-5 * floor, 0.0, 0.0, options) == Status.OPTIMAL_INACCURATE
    assert final_status(problem, Status.OPTIMAL, math.nan, 0.0, 0.0, options) == Status.FAILED
    assert final_status(problem, Status.MAX_ITERATIONS, math.inf, 0.0, 0.0, options) == Status.FAILED
    assert final_status(problem, Status.MAX_ITERATIONS, 2.0, 0.0, 0.0, options) == Status.MAX_ITERATIONS


def test_a_method_claiming_optimal_at_a_poor_point_is_downgraded(monkeypatch):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=g, **F64)
    X[:, -1] = 1.0
    problem = ConvexProblem(X, torch.randn(30, generator=g, **F64), X @ torch.randn(4, 6, generator=g, **F64) >= 0,
                            weight_decay=0.05, reduction="mean", output_bias=True)

    def claims_optimal(point):
        def method(op: Operator, options, warm, deadline):
            return Result(point(op), None, 1, Status.OPTIMAL)
        return method

    monkeypatch.setitem(native_solver._METHODS, "newton", claims_optimal(lambda op: op.zeros()))
    zero = solve_native(problem)
    assert zero.status == Status.OPTIMAL_INACCURATE  # the zero point is feasible but far from optimal
    assert_honest(zero, problem)
    monkeypatch.setitem(native_solver._METHODS, "newton", claims_optimal(lambda op: op.zeros() + math.nan))
    assert solve_native(problem).status == Status.FAILED
    monkeypatch.setitem(native_solver._METHODS, "newton", claims_optimal(lambda op: op.zeros() + 1e150))
    assert solve_native(problem).status in (Status.FAILED, Status.OPTIMAL_INACCURATE)


# ------------------------------------------------------------------------- conic solvers carry hcl's certificate
@pytest.mark.parametrize("kind", ["scalar", "bias", "vector", "one_vs_all", "signs", "gated"])
def test_conic_solutions_carry_a_certified_lower_bound(kind):
    g = torch.Generator().manual_seed(len(kind))
    n, d, P = 25, 4, 5
    X = torch.randn(n, d, generator=g, **F64)
    X[:, -1] = 1.0
    c = 3 if kind in ("vector", "one_vs_all") else 1
    problem = ConvexProblem(X, torch.randn(n, c, generator=g, **F64), X @ torch.randn(d, P, generator=g, **F64) >= 0,
                            weight_decay=0.05, reduction="mean", output_bias=kind == "bias",
                            one_vs_all=kind == "one_vs_all",
                            signs=torch.tensor([1, -1, 0, 1, -1]) if kind == "signs" else None)
    gated = kind == "gated"
    ref = reference_value(problem, gated)
    # as tight as the solver's point is accurate (ECOS's default tolerances leave up to ~3e-5 on these)
    for name, tight in (("clarabel", 1e-6), ("ecos", 1e-4)):
        solution = solve(problem, name, gated=gated)
        assert solution.dual_value is not None
        assert solution.dual_value <= ref + 1e-9 * ref
        assert solution.relative_gap <= tight
        assert math.isclose(float(problem.objective(solution.U, solution.V, solution.b0)), solution.value,
                            rel_tol=1e-12)


# ------------------------------------------------------------------------- memory layouts
def layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t``'s values in every layout a caller may hand over."""
    out = {}
    if t.ndim == 2:
        out["column-major"] = torch.tensor(np.asfortranarray(t.numpy()))
        out["transposed view"] = t.T.contiguous().T
        wide = torch.zeros(2 * t.shape[0], 3 * t.shape[1], dtype=t.dtype)
        wide[::2, ::3] = t
        out["strided slice"] = wide[::2, ::3]
    else:
        wide = torch.zeros(3 * t.shape[0], dtype=t.dtype)
        wide[::3] = t
        out["strided slice"] = wide[::3]
    out["interleaved"] = torch.stack([t, t], dim=-1)[..., 0]
    return out


@pytest.mark.parametrize("method, c", [("newton", 1), pytest.param("newton", 2, marks=pytest.mark.slow), ("fista", 1),
                                       pytest.param("fista", 2, marks=pytest.mark.slow)])
def test_every_memory_layout_gives_the_contiguous_result(method, c):
    g = torch.Generator().manual_seed(c)
    n, d, P = 28, 4, 6
    X = torch.randn(n, d, generator=g, **F64)
    X[:, -1] = 1.0
    Y = torch.randn(n, c, generator=g, **F64).squeeze(1)
    D = X @ torch.randn(d, P, generator=g, **F64) >= 0
    options = dict(method=method, dtype=torch.float64)
    # a λ at which the first-order method needs a few hundred iterations, not thousands
    kwargs = dict(weight_decay=0.05 if method == "newton" else 0.2, reduction="mean", output_bias=True,
                  signs=torch.tensor([1, -1, 0, 0, 1, -1]))
    base = solve_native(ConvexProblem(X, Y, D, **kwargs), **options)
    assert base.status == Status.OPTIMAL
    for (nx, Xl), (ny, Yl), (nd, Dl) in zip(layouts(X).items(), layouts(Y).items(), layouts(D).items()):
        assert not (Xl.is_contiguous() and Dl.is_contiguous()), (nx, nd)
        problem = ConvexProblem(Xl, Yl, Dl, **kwargs)
        solution = solve_native(problem, **options)
        assert solution.value == base.value, (nx, ny, nd)
        assert torch.equal(solution.U, base.U) and torch.equal(solution.b0, base.b0)
        # nothing downstream depends on strides: the problem's tensors replaced by strided ones after construction
        problem.X, problem.patterns = Xl, Dl
        again = solve_native(problem, **options)
        assert again.status == Status.OPTIMAL
        assert abs(again.value - base.value) <= 1e-9 * base.value, (nx, nd)


def test_expanded_tensors_are_accepted():
    g = torch.Generator().manual_seed(3)
    n, d, P = 12, 3, 4
    row = torch.randn(1, d, generator=g, **F64)
    row[0, -1] = 1.0
    X = row.expand(n, d)  # stride 0: identical rows
    Y = torch.randn(n, 1, generator=g, **F64)
    D = torch.ones(n, 1, dtype=torch.bool).expand(n, P)  # duplicated patterns
    Y2 = Y.expand(n, 2)
    for targets in (Y, Y2):
        problem = ConvexProblem(X, targets, D, weight_decay=0.01, reduction="sum", output_bias=True)
        contiguous = ConvexProblem(X.contiguous(), targets.contiguous(), D.contiguous(), weight_decay=0.01,
                                   reduction="sum", output_bias=True)
        for method in ("newton", "fista"):
            a = solve_native(problem, method=method, dtype=torch.float64)
            b = solve_native(contiguous, method=method, dtype=torch.float64)
            assert a.value == b.value and a.status == b.status == Status.OPTIMAL
        assert abs(a.value - reference_value(contiguous)) <= 1e-6 * a.value


# ------------------------------------------------------------------------- rank-deficient data
def test_row_space_basis_spans_the_rows_of_rank_deficient_data_only():
    g = torch.Generator().manual_seed(4)
    assert row_space_basis(torch.randn(20, 5, generator=g, **F64)) is None
    wide = torch.randn(4, 9, generator=g, **F64)
    basis = row_space_basis(wide)
    assert basis.shape == (9, 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4, **F64), atol=1e-12)
    assert torch.allclose(wide @ basis @ basis.T, wide, atol=1e-12)
    repeated = torch.randn(1, 3, generator=g, **F64).expand(10, 3)
    assert row_space_basis(repeated).shape == (3, 1)


def test_row_space_basis_sees_dependent_columns_of_tall_data_with_many_columns():
    """Above 64 columns the rank is read from the Gram matrix first: its Cholesky factor had succeeded on exactly
    dependent columns (rounding), so data of rank 68 had passed as full rank."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(120, 70, generator=g, **F64)
    X[:, 5] = X[:, 4]
    X[:, 6] = 2 * X[:, 4] - X[:, 7]
    basis = row_space_basis(X)
    assert basis.shape == (70, 68)
    assert torch.allclose(X @ basis @ basis.T, X, atol=1e-10)
    assert row_space_basis(torch.randn(120, 70, generator=g, **F64)) is None  # full rank: no basis


@pytest.mark.parametrize("seed", range(4))
def test_fewer_samples_than_dimensions(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, P = 5, 12, 8
    X = torch.randn(n, d, generator=g, **F64)
    X[:, -1] = 1.0
    problem = ConvexProblem(X, torch.randn(n, generator=g, **F64) * 10.0 ** (seed - 1),
                            X @ torch.randn(d, P, generator=g, **F64) >= 0, weight_decay=1e-3, reduction="sum")
    solution = solve_native(problem)
    assert solution.status == Status.OPTIMAL
    assert_honest(solution, problem)
    ref = reference_value(problem)
    assert solution.dual_value <= ref + 1e-8 * ref
    assert abs(solution.value - ref) <= 2e-6 * ref
    # a warm start in the full space is carried into the row space
    warm = solve_native(problem, warm_start=solution)
    assert warm.status == Status.OPTIMAL and warm.iterations < solution.iterations


def test_finite_weights_whose_objective_overflows_log_no_upper_bound():
    # a diverging network (finite weights, objective inf) logged upper_bound inf, and NaN once inf − inf appeared
    snap = snapshot(scale=1e120)

    def explode(problem, solver, **options):
        raise RuntimeError("solver exploded")

    outcome = evaluate_snapshot(spec(), snap, explode, quiet=True, keep_solution=False)
    assert outcome.metrics["convex/status"] == 3 and outcome.metrics["convex/nonconvex_objective"] == float("inf")
    assert "convex/upper_bound" not in outcome.metrics


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scale", [1e19, 1e20])
def test_data_whose_curvature_overflows_fails_the_first_order_method_at_once(scale):
    """float32 inputs near 1e20: ``‖X‖²`` overflows, so the step is 0 (the backtracking never ended) or subnormal
    (halved to 0, then a division by it raised); the method now stops with ``"failed"``."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 2, generator=g, dtype=torch.float64)
    D = X @ torch.randn(2, 3, generator=g, dtype=torch.float64) >= 0
    problem = ConvexProblem((X * scale).float(), torch.randn(5, generator=g).float(), D, weight_decay=0.1)
    solution = solve(problem, "native", method="fista", time_limit=5)
    assert solution.status == Status.FAILED and solution.iterations == 0


@pytest.mark.parametrize("solver,options", [("clarabel", {}), ("ecos", {}), ("native", {"method": "admm"}),
                                            ("native", {"method": "newton"}), ("native", {"method": "fista"})])
@pytest.mark.parametrize("targets,output_bias", [(0.0, False), (0.0, True), (0.1, True)])
@pytest.mark.parametrize("gated", [False, True])
def test_targets_the_zero_network_interpolates_are_solved_exactly(solver, options, targets, output_bias, gated):
    """``Y = 0``, or a constant ``Y`` with an output bias: ``p* = 0``, which the floor of the relative gap (0 there)
    cannot certify from a solver's leftover of 1e-13 (Clarabel) or 2e-18 (the ADMM); the zero network (output bias
    ``Y``'s row) is returned, optimal."""
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(12, 2, generator=g, dtype=torch.float64), torch.ones(12, 1, dtype=torch.float64)], 1)
    D = X @ torch.randn(3, 5, generator=g, dtype=torch.float64) >= 0
    problem = ConvexProblem(X, torch.full((12, 3), targets, dtype=torch.float64), D, 0.01, output_bias=output_bias)
    solution = solve(problem, solver, gated=gated, **options)
    assert solution.status == Status.OPTIMAL and solution.value == 0.0 == solution.dual_value
    assert float(problem.objective(solution.U, solution.V, solution.b0)) == 0.0
    assert solution.gated is gated and solution.U.shape == (5, 3, 3)


# ------------------------------------------------------------------------- brackets at the edges
def _claimed(problem: ConvexProblem, value: float, dual: float | None, violation: float = 0.0) -> ConvexSolution:
    zero = torch.zeros(problem.num_patterns, problem.d, problem.c, **F64)
    return ConvexSolution(value=value, U=zero, V=zero.clone(), b0=torch.zeros(problem.c, **F64), status="optimal",
                          solver="mine", solve_seconds=0.0, dual_value=dual, violation=violation,
                          gap_floor=problem.gap_floor)


def _small_problem() -> ConvexProblem:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 2, generator=g, **F64)
    D = X @ torch.randn(2, 3, generator=g, **F64) >= 0
    return ConvexProblem(X, torch.randn(10, 1, generator=g, **F64), D, weight_decay=0.01, reduction="mean")


def test_an_optimal_value_below_its_own_lower_bound_is_refuted_even_within_the_constraint_tolerance():
    """A point within the constraint tolerance (not exactly inside) does not bound p* from above, so only the check
    of its value against its own certified bound can refute the claim."""
    problem = _small_problem()
    result = bracket(problem, _claimed(problem, 1.0, 2.0, violation=1e-9))
    assert result.optimum is None
    assert "below its certified lower bound" in result.refuted


def test_a_zero_optimum_is_judged_on_the_gap_floor():
    """At an optimum of 0 every relative difference is measured against the problem's gap floor, not the value."""
    problem = _small_problem()
    floor = problem.gap_floor
    claim = _claimed(problem, 1e-13, 0.0)
    assert claim.relative_gap == pytest.approx(1e-13 / floor, rel=1e-9)
    result = bracket(problem, claim, feasible_value=0.0)  # 1e-13 above a feasible 0: rounding, not a refutation
    assert result.optimum == 1e-13 and result.refuted is None

    floors = []

    def solve_to_zero(problem, solver, **options):
        floors.append(problem.gap_floor)
        return _claimed(problem, 1e-13, 0.0)

    metrics = evaluate_snapshot(spec(solver="mine"), snapshot(), solve_to_zero, quiet=True,
                                keep_solution=False).metrics
    assert metrics["convex/duality_gap"] == pytest.approx(1e-13 / floors[0], rel=1e-9)
