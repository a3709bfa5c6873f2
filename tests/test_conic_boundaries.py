"""The conic solvers' paths and the solver registry at their edges (``hcl.convex.cvxpy_solver``, ``layers``,
``feasibility``, ``solvers``): feasibility in the targets' unit, limits at λ = 0, NaN or negative multipliers, solvers
cvxpy lists but cannot run, the layer's own violation and tolerances, columns no round settles, the restored output
bias, shifts that would push another sample out, zero data, and what ``solve`` checks of a user's solver."""

from __future__ import annotations

import dataclasses
import math
import types
import warnings

import cvxpy as cp
import pytest
import torch

import hcl.convex.cvxpy_solver as cvxpy_solver
import hcl.convex.feasibility as feasibility
import hcl.convex.layers as layers
import hcl.convex.solvers as solvers_module
from hcl.convex import ConvexProblem, Solver, Status, choose_solver, solve
from hcl.convex.cvxpy_solver import certified_status, installed_solvers, solve_cvxpy
from hcl.convex.feasibility import feasible_solution, restore_feasibility
from hcl.convex.solvers import get_solver, solvers_used


def _problem(n=20, d=3, P=4, lam=0.1, seed=1, c=None, output_bias=False, y_scale=1.0, y_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    patterns = X @ torch.randn(d, P, generator=g, dtype=torch.float64) >= 0
    shape = (n,) if c is None else (n, c)
    Y = y_scale * torch.randn(*shape, generator=g, dtype=torch.float64) + y_shift
    return ConvexProblem(X, Y, patterns, lam, output_bias=output_bias)


class _Passes(Solver):
    """A user's solver: Clarabel's solution, then what ``claim`` makes of it (checked by ``solve``)."""

    options = frozenset({"gated", "warm_start", "time_limit", "verbose", "memory_limit"})

    def __init__(self, name, claim):
        self.name, self.claim = name, claim

    def solve(self, problem, *, warm_start=None, **options):
        return self.claim(get_solver("clarabel").solve(problem, **options))


# ---------------------------------------------------------------- cvxpy_solver.py

def test_feasibility_of_a_point_is_measured_in_the_targets_unit():
    """A point's violation is judged in the targets' unit (``tol · max|Y|``), not in absolute terms."""
    big = _problem(lam=0.1, y_scale=1000.0)
    y_unit = float(big.Y.abs().max())
    # a violation of 1e-7 of the targets' scale is within tol; far above 1e-6 in absolute terms
    assert certified_status(big, Status.OPTIMAL, 1.0, 1.0, 1e-7 * y_unit) == Status.OPTIMAL
    small = _problem(lam=0.1, y_scale=1e-3)
    # 1e-8 is tiny in absolute terms but 1e-5 of targets of size 1e-3: not feasible to 1e-6
    assert certified_status(small, Status.OPTIMAL, 1.0, 1.0, 1e-5 * float(small.Y.abs().max())) == \
        Status.OPTIMAL_INACCURATE


def test_with_no_weight_decay_a_limit_is_still_reported():
    """At λ = 0 too, a solve stopped at a limit says so: it is not "optimal"."""
    free = _problem(lam=0.0)
    for limit in (Status.MAX_ITERATIONS, Status.TIME_LIMIT):
        assert certified_status(free, Status.OPTIMAL, 1.0, 0.0, 0.0, limit) == limit
        assert certified_status(free, Status.OPTIMAL_INACCURATE, 1.0, 0.0, 0.0, limit) == limit


def test_a_user_limit_near_the_time_limit_is_a_time_limit():
    """A solver that stopped at its time limit, its own clock just past (or 5 % short of) it, says ``time_limit``; well
    short of it, ``max_iterations``."""
    def stopped(solve_time):
        stats = types.SimpleNamespace(extra_stats=None, solve_time=solve_time)
        return types.SimpleNamespace(status=cp.USER_LIMIT, solver_stats=stats)

    limit_status = cvxpy_solver._limit_status
    assert limit_status(stopped(1.001), 1.0) == Status.TIME_LIMIT
    assert limit_status(stopped(0.95), 1.0) == Status.TIME_LIMIT
    assert limit_status(stopped(0.5), 1.0) == Status.MAX_ITERATIONS
    assert limit_status(stopped(5.0), None) == Status.MAX_ITERATIONS


@pytest.mark.skipif("ECOS" not in installed_solvers(), reason="ECOS")
def test_an_unknown_setting_of_ecos_names_the_solver():
    """An unknown setting is named with the solver's name (ECOS's own error does not name it)."""
    with pytest.raises(TypeError, match="ECOS"):
        solve_cvxpy(_problem(), "ECOS", bogus=1)


def test_multipliers_a_solver_left_nan_still_give_a_bound(monkeypatch):
    """A multiplier a solver left NaN counts as 0: the bound still holds, nothing crashes."""
    original = cvxpy_solver._cone_multipliers

    def with_nan(*args):
        cone = original(*args)
        cone[0, 0, 0, 0] = math.nan
        return cone

    problem = _problem(P=3)
    optimum = solve_cvxpy(problem, "CLARABEL").value
    monkeypatch.setattr(cvxpy_solver, "_cone_multipliers", with_nan)
    solution = solve_cvxpy(problem, "CLARABEL")
    assert math.isfinite(solution.dual_value) and solution.dual_value <= optimum * (1 + 1e-9)
    assert bool(torch.isfinite(solution.multipliers.cone.to_dense()).all())


def test_a_solver_that_cvxpy_lists_but_that_cannot_solve_is_not_installed(monkeypatch):
    """A solver cvxpy lists but cannot run (MOSEK without a licence; here not installed at all) is left out."""
    listed = ["CLARABEL", "MOSEK"]
    if "MOSEK" in cp.installed_solvers():
        pytest.skip("MOSEK is installed here")
    monkeypatch.setattr(cp, "installed_solvers", lambda: listed)
    installed_solvers.cache_clear()
    try:
        assert installed_solvers() == ["CLARABEL"]
    finally:
        monkeypatch.undo()
        installed_solvers.cache_clear()


@pytest.mark.skipif("SCS" not in installed_solvers(), reason="SCS")
def test_the_multipliers_kept_with_a_solution_are_non_negative():
    """SCS's duals of ``≥ 0`` constraints come back as small as -1e-20; the multipliers kept with the solution (a later
    warm start, a user's re-check) are μ ≥ 0."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    problem = ConvexProblem(X, torch.randn(30, generator=g, dtype=torch.float64),
                            X @ torch.randn(3, 6, generator=g, dtype=torch.float64) >= 0, 0.05)
    solution = solve_cvxpy(problem, "SCS")
    assert float(solution.multipliers.cone.to_dense().min()) >= 0.0


# ---------------------------------------------------------------- layers.py

def test_a_layer_solves_violation_is_the_points():
    """Clarabel stopped after one iteration returns a point outside its cones, and the layer's violation says so."""
    problem = _problem(n=14, P=4, lam=1e-3, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = solve(problem, "cvxpylayers", solver_args={"solve_method": "Clarabel", "max_iter": 1})
    measured = float(problem.violation(stopped.U, stopped.V))
    assert measured > 1e-3
    assert stopped.violation == pytest.approx(measured, rel=1e-9)


def test_the_layer_solves_to_the_conic_paths_tolerances_by_default(monkeypatch):
    """The layer solves to the conic path's Clarabel tolerances (1e-9) unless told otherwise."""
    seen = {}
    original = layers.FixedPatternLayer.from_problem

    def spy(problem, **kwargs):
        seen.update(kwargs["solver_args"])
        return original(problem, **kwargs)

    monkeypatch.setattr(layers.FixedPatternLayer, "from_problem", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solve(_problem(n=10, P=2), "cvxpylayers")
    assert seen["solve_method"] == "Clarabel"
    assert seen["tol_gap_abs"] == seen["tol_gap_rel"] == seen["tol_feas"] == 1e-9


# ---------------------------------------------------------------- feasibility.py

def _loose(problem, seed=0, size=0.3):
    """Clarabel's optimum, perturbed: a point outside its cones."""
    solution = solve(problem, "clarabel")
    g = torch.Generator().manual_seed(seed)
    U = solution.U + size * torch.randn(solution.U.shape, generator=g, dtype=torch.float64)
    V = solution.V + size * torch.randn(solution.V.shape, generator=g, dtype=torch.float64)
    return U, V


def test_columns_the_steps_do_not_settle_are_zeroed_whatever_the_rounds(monkeypatch):
    """Columns the rounds did not bring inside end zero, however few the rounds."""
    problem = _problem(n=30, d=3, P=6, lam=0.05, seed=2)
    U, V = _loose(problem)
    assert float(problem.violation(U, V)) > 0
    monkeypatch.setattr(feasibility, "ROUNDS", 0)  # no round: every violated column must end zero
    U2, V2, _ = restore_feasibility(problem, U, V)
    assert float(problem.violation(U2, V2)) == 0.0
    monkeypatch.setattr(feasibility, "ROUNDS", 1)
    U2, V2, _ = restore_feasibility(problem, U, V)
    assert float(problem.violation(U2, V2)) == 0.0


def test_the_restored_point_has_the_optimal_output_bias():
    """The restored point carries the output bias that is optimal for it."""
    problem = _problem(n=30, d=3, P=6, lam=0.05, seed=3, c=2, output_bias=True, y_shift=3.0)
    U, V = _loose(problem, size=0.05)
    U2, V2, b0 = restore_feasibility(problem, U, V)
    assert float(problem.violation(U2, V2)) == 0.0
    expected = (problem.Y - problem.predict(U2, V2)).mean(0)
    torch.testing.assert_close(b0, expected, rtol=1e-12, atol=1e-12)
    assert float(b0.abs().min()) > 1.0  # the targets' offset of 3 is in it


def test_a_shift_along_a_direction_never_pushes_another_sample_out():
    """A shift that would put the violated sample inside only by pushing another one out is not taken."""
    X = torch.eye(2, dtype=torch.float64)  # samples x1 = e1, x2 = e2; the column's pattern is active on both
    W = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # outputs (-1, 1): sample 1 violated
    H = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)  # rises on sample 1, falls on sample 2 by as much
    signs = torch.ones(2, 1, dtype=torch.float64)
    XW = X @ W
    inside = feasibility.INSIDE * XW.abs().amax(0)
    moved = feasibility._shift_inside(W, XW, H, X @ H, signs, inside)
    assert torch.equal(moved, W)  # any t putting sample 1 inside puts sample 2 outside
    # a direction with room enough is taken, and ends inside on both samples
    H2 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    moved = feasibility._shift_inside(W, XW, H2, X @ H2, signs, inside)
    assert not torch.equal(moved, W) and bool((signs * (X @ moved) >= 0).all())


def test_with_no_weight_decay_a_moved_point_that_changed_its_value_is_not_optimal():
    """At λ = 0, a move that raised the value ends an "optimal" claim: the gated relaxation's
    point claimed "optimal" for the exact problem (its value g* = p* here, its z outside the cones) is moved in at a
    value ten times higher, which is no optimum."""
    problem = _problem(n=20, d=2, P=4, lam=0.0, seed=0)
    gated = solve(problem, "clarabel", gated=True)
    claim = dataclasses.replace(gated, gated=False, status="optimal",
                                violation=float(problem.violation(gated.U, gated.V)))
    assert claim.violation > 0
    moved = feasible_solution(problem, claim, tol=1e-6)
    assert moved.violation == 0.0
    assert moved.value > 2 * claim.value  # the case: the move raised the value
    assert Status.of(moved.status) == Status.OPTIMAL_INACCURATE


def test_data_of_zeros_is_restored_with_the_plain_norm():
    """Data of zeros: the metric falls back to the plain norm (its matrix would be 0 and not factor)."""
    problem = ConvexProblem(torch.zeros(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64),
                            torch.ones(6, 2, dtype=torch.bool), 0.1)
    U = torch.randn(2, 2, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U2, V2, _ = restore_feasibility(problem, U, -U)
    assert torch.equal(U2, U) and torch.equal(V2, -U)


# ---------------------------------------------------------------- solvers.py

def test_auto_takes_the_native_solver_for_data_off_the_cpu():
    """The problem's data on another device (``meta`` here, standing in for an accelerator) go to the native solver."""
    problem = _problem()
    assert choose_solver(problem) == "clarabel"
    object.__setattr__(problem, "X", problem.X.to("meta"))  # bypasses validation: only the device is read
    assert choose_solver(problem) == "native"


def test_an_integer_gated_is_refused():
    """``gated`` is a flag: an integer is refused."""
    for name in ("native", "clarabel"):
        with pytest.raises(ValueError, match="gated must be a bool, got 1"):
            solve(_problem(), name, gated=1)


def test_a_float32_point_is_allowed_its_own_rounding(monkeypatch):
    """Clarabel's optimum rounded to float32 has a relative gap of 2.6e-6 here, within 100 float32 ulp: still
    "optimal"."""
    problem = _problem(n=8, d=3, P=6, lam=1e-3, seed=3)
    rounded = _Passes("rounded", lambda s: dataclasses.replace(s, U=s.U.float(), V=s.V.float(), b0=s.b0.float()))
    monkeypatch.setitem(solvers_module._registry(), "rounded", rounded)
    solution = solve(problem, "rounded")
    assert 1e-6 < solution.relative_gap <= 100 * torch.finfo(torch.float32).eps  # the case
    assert solution.status == Status.OPTIMAL


def test_a_cvxpy_solver_without_cones_is_named_as_such():
    """A cvxpy solver that takes no cones is named as such."""
    with pytest.raises(ValueError, match="is cvxpy's OSQP, not one hcl solves the convex problem"):
        solve(_problem(), "osqp")


def test_auto_travels_with_its_candidates():
    """``"auto"`` travels with the solvers it may choose (the native solver and Clarabel)."""
    names = [solver.name for solver in solvers_used("auto")]
    assert names[:2] == ["auto", "native"]
    if "CLARABEL" in installed_solvers():
        assert names == ["auto", "native", "clarabel"]
    assert [solver.name for solver in solvers_used("Native")] == ["native"]


def test_a_user_solver_without_an_output_bias_for_a_problem_with_one_is_refused(monkeypatch):
    """A user's solver that returns no output bias for a problem with one is refused."""
    problem = _problem(output_bias=True)
    monkeypatch.setitem(solvers_module._registry(), "nobias",
                        _Passes("nobias", lambda s: dataclasses.replace(s, b0=None)))
    with pytest.raises(ValueError, match="returned b0 of shape NoneType"):
        solve(problem, "nobias")


def test_a_user_solvers_gated_point_has_no_violation(monkeypatch):
    """A gated relaxation's point has no cone to violate: its violation is 0."""
    problem = _problem(P=4, lam=0.01)
    monkeypatch.setitem(solvers_module._registry(), "mine", _Passes("mine", lambda s: s))
    gated = solve(problem, "mine", gated=True)
    assert float(problem.violation(gated.U, gated.V)) > 0  # the case: z outside the cones
    assert gated.gated and gated.violation == 0.0
    assert gated.status == Status.OPTIMAL
