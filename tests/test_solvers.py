"""The solver registry: names, options, ``auto``'s choice and fallback, the native entry's threads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hcl.convex.solvers as solvers_module
from hcl.convex import (
    ConvexProblem,
    ConvexSolveError,
    Solver,
    Status,
    available_solvers,
    choose_solver,
    register_solver,
    solve,
)
from hcl.convex.solvers import AUTO_NATIVE_ABOVE, SINGLE_THREAD_BELOW, NativeSolver, get_solver, problem_size


def small_problem(n: int = 20, d: int = 3, P: int = 4, weight_decay: float = 0.1) -> ConvexProblem:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    patterns = X @ torch.randn(d, P, generator=g, dtype=torch.float64) >= 0
    return ConvexProblem(X, torch.randn(n, generator=g, dtype=torch.float64), patterns, weight_decay)


def test_an_option_the_named_solver_does_not_take_is_a_type_error():
    problem = small_problem()
    with pytest.raises(TypeError, match="solver 'clarabel' takes no option 'tol'"):
        solve(problem, "clarabel", tol=1e-8)
    with pytest.raises(TypeError, match="solver 'native' takes no option 'tol_gap_rel'"):
        solve(problem, "native", tol_gap_rel=1e-8)
    with pytest.raises(TypeError, match="solver 'cvxpylayers' takes no option 'bogus'"):
        solve(problem, "cvxpylayers", bogus=1)
    with pytest.raises(TypeError, match="solver 'auto' takes no option 'bogus'; its options: anderson, .*tol_gap_rel"):
        solve(problem, "auto", bogus=1)


def test_every_solver_takes_the_common_options():
    problem = small_problem()
    reference = solve(problem, "clarabel", tol_gap_rel=1e-10, tol_gap_abs=1e-10, tol_feas=1e-10).value
    point = problem.zeros()
    for name in ("native", "CLARABEL", "cvxpylayers"):
        solution = solve(problem, name, gated=False, warm_start=point, time_limit=60.0, verbose=False)
        assert solution.ok and solution.value == pytest.approx(reference, rel=1e-5)
    with pytest.warns(UserWarning, match="ECOS has no time limit"):
        solution = solve(problem, "ecos", gated=False, warm_start=point, time_limit=60.0, verbose=False)
    assert solution.ok and solution.value == pytest.approx(reference, rel=1e-5)


def test_an_unknown_solver_is_a_value_error_listing_the_available_ones():
    with pytest.raises(ValueError, match="unknown solver 'gurobi-9'") as error:
        solve(small_problem(), "gurobi-9")
    names = available_solvers()
    assert names[:3] == ["auto", "native", "cvxpylayers"] and "clarabel" in names
    assert all(repr(name) in str(error.value) for name in names)
    with pytest.raises(TypeError, match="solver must be a string"):
        get_solver(None)


def test_auto_passes_on_only_the_options_of_the_solver_it_chose():
    small = small_problem()
    assert choose_solver(small) == "clarabel"
    native_only = {"tol": 1e-9, "method": "newton", "max_iters": 50, "warm_start": small.zeros()}
    assert solve(small, "auto", **native_only).solver == "CLARABEL"

    large = small_problem(n=100, d=10, P=10)
    assert problem_size(large) > AUTO_NATIVE_ABOVE and choose_solver(large) == "native"
    solution = solve(large, "auto", tol_gap_rel=1e-9, max_iter=5, tol=1e-7)  # Clarabel's settings are dropped
    assert solution.solver.startswith("native") and solution.status == Status.OPTIMAL
    assert solution.relative_gap <= 1e-7


def test_auto_falls_back_to_the_native_solver_when_clarabel_fails(monkeypatch):
    received = []

    def fail(problem, **options):
        received.append(options)
        raise ConvexSolveError("CLARABEL returned no solution: status 'user_limit'")

    monkeypatch.setattr(get_solver("clarabel"), "solve", fail)
    problem = small_problem()
    with pytest.warns(UserWarning, match="clarabel failed .*user_limit.*solving with the native solver"):
        solution = solve(problem, "auto", tol=1e-9, tol_gap_rel=1e-9)
    assert received == [{"tol_gap_rel": 1e-9}]  # Clarabel had only its own setting
    assert solution.solver.startswith("native") and solution.relative_gap <= 1e-9  # the native solver its own


def test_the_native_entry_runs_small_cpu_problems_on_one_thread():
    problem = small_problem()
    assert problem_size(problem) < SINGLE_THREAD_BELOW
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with NativeSolver.cpu_threads(problem):
            inside = torch.get_num_threads()
        assert inside == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("options,message", [
    ({"tol": -1.0}, "tol must be"), ({"max_iters": 0}, "max_iters must be"),
])
def test_auto_checks_native_values_whichever_solver_it_picks(options, message):
    """The same call fails the same way at any size: Clarabel, picked for small problems, dropped them silently."""
    small = small_problem()
    assert choose_solver(small) == "clarabel"
    with pytest.raises(ValueError, match=message):
        solve(small, "auto", **options)


@pytest.mark.parametrize("solver", ["native", "clarabel", "scs", "cvxpylayers"])
@pytest.mark.parametrize("options,message", [
    ({"time_limit": "1"}, "time_limit must be a finite number > 0, got '1'"),
    ({"time_limit": float("inf")}, "time_limit must be a finite number > 0"),
    ({"time_limit": -1}, "time_limit must be"),
    ({"gated": "no"}, "gated must be a bool, got 'no'"),
    ({"verbose": "yes"}, "verbose must be a bool"),
])
def test_the_common_options_are_checked_alike_for_every_solver(solver, options, message):
    with pytest.raises(ValueError, match=message):
        solve(small_problem(), solver, **options)


def test_an_integer_verbose_reaches_the_conic_solvers_as_a_bool():
    assert solve(small_problem(), "clarabel", verbose=0).status == Status.OPTIMAL  # Clarabel refused the int


def test_a_none_or_numpy_flag_is_taken_as_a_bool():
    import numpy as np

    problem = small_problem()
    assert solve(problem, "clarabel", verbose=None).status == Status.OPTIMAL
    assert solve(problem, "native", verbose=np.False_).status == Status.OPTIMAL


class _Claims(Solver):
    """A user's solver that solves with Clarabel, then reports what ``claim`` makes of the solution."""

    options = frozenset({"gated", "warm_start", "time_limit", "verbose", "memory_limit", "tol"})

    def __init__(self, name, claim):
        self.name, self.claim = name, claim

    def solve(self, problem, *, warm_start=None, tol=None, **options):
        return self.claim(get_solver("clarabel").solve(problem, **options), problem)


def _zero_point(solution, problem):
    U = torch.zeros_like(solution.U)
    return dataclasses.replace(solution, U=U, V=U.clone(), value=0.0, dual_value=0.0, violation=0.0, multipliers=None)


@pytest.mark.parametrize("claim, status", [
    (lambda s, p: s, Status.OPTIMAL),  # Clarabel's own point and multipliers: certified again
    (lambda s, p: dataclasses.replace(s, value=s.value / 2, dual_value=s.value), Status.OPTIMAL),
    (lambda s, p: dataclasses.replace(s, multipliers=None), Status.OPTIMAL_INACCURATE),  # the bound with μ = 0
    (_zero_point, Status.OPTIMAL_INACCURATE),
    (lambda s, p: dataclasses.replace(s, U=torch.full_like(s.U, float("nan"))), Status.FAILED),
    (lambda s, p: dataclasses.replace(s, status="great"), Status.FAILED),
])
def test_another_solvers_point_is_evaluated_and_certified_by_hcl(monkeypatch, claim, status):
    """A registered solver's value, violation and bound are recomputed from its point: a claimed value or bound, or
    an "optimal" its point does not earn, is never reported."""
    problem = small_problem(P=3)
    monkeypatch.setitem(solvers_module._registry(), "claims", _Claims("claims", claim))
    solution = solve(problem, "claims")
    reference = solve(problem, "clarabel")
    assert solution.status == status
    if status != Status.FAILED:
        exact = float(problem.objective(solution.U, solution.V, solution.b0))
        assert solution.value == pytest.approx(exact, rel=1e-12) and solution.value >= reference.value * (1 - 1e-6)
        assert solution.dual_value <= reference.value * (1 + 1e-9)
    else:
        assert not solution.ok


def test_another_solvers_point_of_the_wrong_shape_or_type_and_built_in_names_are_refused(monkeypatch):
    problem = small_problem(P=3)
    monkeypatch.setitem(solvers_module._registry(), "short", _Claims("short", lambda s, p: dataclasses.replace(
        s, U=s.U[:2])))
    monkeypatch.setitem(solvers_module._registry(), "dict", _Claims("dict", lambda s, p: {"value": s.value}))
    with pytest.raises(ValueError, match=r"solver 'short' returned U of shape \(2, 3, 1\), not \(3, 3, 1\)"):
        solve(problem, "short")
    with pytest.raises(TypeError, match="solver 'dict' returned a dict, not a ConvexSolution"):
        solve(problem, "dict")
    with pytest.raises(ValueError, match="'native' is a built-in solver's name"):
        register_solver(_Claims("native", lambda s, p: s))
    loose = _Claims("loose", lambda s, p: s)
    loose.options = "gated"
    with pytest.raises(TypeError, match="options must be a set of option names"):
        register_solver(loose)
    register_solver(NativeSolver())  # the same kind again (a worker process registers what a job carries): taken


def test_a_subclass_of_a_built_in_solver_and_a_half_precision_point_are_checked(monkeypatch):
    """Being a built-in solver is its exact class, not an inherited flag; a bfloat16 point's rounding (0.4 % of each
    entry) is no licence for a loose "optimal"."""
    problem = small_problem(P=3)

    class Halves(NativeSolver):
        name = "halves"

        def solve(self, problem, **options):
            return dataclasses.replace(super().solve(problem, **options), value=0.5)

    monkeypatch.setitem(solvers_module._registry(), "halves", Halves())
    solution = solve(problem, "halves")
    assert solution.value == pytest.approx(solve(problem, "native").value, rel=1e-9)
    shrunk = _Claims("shrunk", lambda s, p: dataclasses.replace(s, U=(0.6 * s.U).bfloat16(), V=(0.6 * s.V).bfloat16(),
                                                                b0=s.b0.bfloat16()))
    monkeypatch.setitem(solvers_module._registry(), "shrunk", shrunk)
    assert solve(problem, "shrunk").status == Status.OPTIMAL_INACCURATE


def test_multipliers_of_another_shape_are_said_and_warnings_about_the_callers_input_point_at_the_caller(monkeypatch):
    """A user's solver returning its multipliers with permuted axes got a weaker bound (status optimal_inaccurate)
    without a word; the time-limit warning pointed into hcl."""
    from hcl.convex.native import Multipliers

    def permuted(solution, problem):  # (2, n, P, c): a user's bug
        cone = solution.multipliers.cone.to_dense().transpose(0, 1)
        return dataclasses.replace(solution, multipliers=Multipliers(cone))

    monkeypatch.setitem(solvers_module._registry(), "permuted", _Claims("permuted", permuted))
    problem = small_problem()
    with pytest.warns(UserWarning, match="solver 'permuted' returned multipliers hcl cannot use") as record:
        solve(problem, "permuted")
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="ECOS has no time limit") as record:
        solve(problem, "ecos", time_limit=1.0)
    assert record[0].filename == __file__
    from test_snapshot import snapshot, spec

    from hcl.convex.snapshot import evaluate_snapshot

    # a monitor, which silences solver chatter, passes it on
    outcome = evaluate_snapshot(spec(solver="permuted"), snapshot(), solve, quiet=True, keep_solution=False)
    assert any(m.startswith("Probe: solver 'permuted' returned multipliers hcl cannot use") for m in outcome.messages)


def _sized(n: int, lam: float) -> ConvexProblem:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return ConvexProblem(X, torch.randn(n, generator=g, dtype=torch.float64),
                         X @ torch.randn(5, 4, generator=g, dtype=torch.float64) >= 0, lam)


def test_auto_switches_just_above_its_switch_points_and_later_with_no_weight_decay():
    """Up to n·d·P·c = AUTO_NATIVE_ABOVE Clarabel; with λ = 0, where the native solver certifies no bound above 0,
    up to AUTO_NATIVE_ABOVE_UNREGULARIZED."""
    from hcl.convex.solvers import AUTO_NATIVE_ABOVE_UNREGULARIZED

    at = AUTO_NATIVE_ABOVE // 20  # n with d = 5, P = 4, c = 1
    assert problem_size(_sized(at, 0.1)) == AUTO_NATIVE_ABOVE
    assert choose_solver(_sized(at, 0.1)) == "clarabel" and choose_solver(_sized(at + 1, 0.1)) == "native"
    between = 2 * at  # above the first switch point, below the unregularised one
    assert AUTO_NATIVE_ABOVE < problem_size(_sized(between, 0.0)) <= AUTO_NATIVE_ABOVE_UNREGULARIZED
    assert choose_solver(_sized(between, 0.0)) == "clarabel"
    assert choose_solver(_sized(AUTO_NATIVE_ABOVE_UNREGULARIZED // 20 + 1, 0.0)) == "native"


def test_a_user_solvers_point_is_certified_at_the_tolerance_asked(monkeypatch):
    """A user's solver stopped early (a relative gap of about 2e-4) is "optimal" at tol = 1e-3, not at the default."""

    class Early(Solver):
        name = "early"
        options = solvers_module.COMMON_OPTIONS | {"tol"}

        def solve(self, problem, gated=False, tol=None, **options):
            return solve(problem, "clarabel", gated=gated, tol_gap_abs=1e-5, tol_gap_rel=1e-5, tol_feas=1e-5,
                         max_iter=7)

    monkeypatch.setattr(solvers_module, "_REGISTRY", dict(solvers_module._REGISTRY))
    register_solver(Early())
    problem = _sized(40, 0.1)
    loose, strict = solve(problem, "early", tol=1e-3), solve(problem, "early")
    assert 1e-6 < loose.relative_gap <= 1e-3
    assert Status.of(loose.status) == Status.OPTIMAL and Status.of(strict.status) == Status.OPTIMAL_INACCURATE
