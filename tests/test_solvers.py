"""The solver registry: names, options, ``auto``'s choice and fallback, the native entry's threads."""

from __future__ import annotations

import pytest
import torch

from hcl.convex import ConvexProblem, ConvexSolveError, Status, available_solvers, choose_solver, solve
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
