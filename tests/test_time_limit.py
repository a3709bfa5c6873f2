"""Time limits: the native solver's covers its final certificate (a method stops where its next iteration and the
certificate would end past it, ``hcl.convex.native.clock``) and what it returns is still a certified bracket; a
snapshot whose solve stopped at its limit is not moved into its cones after it."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from _reference import reference_solve
from test_snapshot import snapshot, spec

import hcl.convex.native.clock as clock
import hcl.convex.snapshot as snapshot_module
from hcl.convex import ConvexProblem, Status, solve
from hcl.convex.native.clock import WRAP_UP_ITERATIONS, Deadline
from hcl.convex.snapshot import evaluate_snapshot


def test_a_deadline_leaves_room_for_the_next_iteration_and_the_certificate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(clock, "perf_counter", lambda: now[0])
    deadline = Deadline(100.0, 10.0, wrap_up=3.0)
    now[0] = 101.0
    assert not deadline.passed()  # no pace measured yet: the limit itself only
    now[0] = 102.0
    assert not deadline.passed()  # an iteration of 1 s: 102 + 4 · 1 ≤ 110
    now[0] = 105.0
    assert deadline.passed() and not deadline.reached()  # one of 3 s: 105 + 4 · 3 > 110, stop with 5 s left
    now[0] = 110.5
    assert deadline.reached()
    # the certificate of a method whose iterations are cheap beside it is what the room is for
    assert WRAP_UP_ITERATIONS["admm"] > WRAP_UP_ITERATIONS["newton"]


def test_the_last_iteration_before_the_limit_is_taken_at_a_steady_pace(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(clock, "perf_counter", lambda: now[0])
    deadline, iterations = Deadline(0.0, 10.0, wrap_up=1.0), 0
    while not deadline.passed():
        now[0] += 1.0
        iterations += 1
    assert iterations == 9 and now[0] + 1.0 <= 10.0  # stopped at 9 s, leaving the certificate its 1 s


@pytest.fixture(scope="module")
def unreachable():
    """A problem and its optimum (Clarabel): a tolerance of 1e-15 no method reaches, so the limit stops it."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 20, generator=g, dtype=torch.float64)
    problem = ConvexProblem(X=X, Y=torch.randn(200, generator=g, dtype=torch.float64),
                            patterns=X @ torch.randn(20, 40, generator=g, dtype=torch.float64) >= 0,
                            weight_decay=1e-3, reduction="mean")
    return problem, reference_solve(problem).value


@pytest.mark.parametrize("method", ["newton", "fista", "admm"])
@pytest.mark.slow
def test_a_solve_stopped_by_its_time_limit_returns_a_certified_bound(method, unreachable):
    problem, optimum = unreachable
    solution = solve(problem, "native", method=method, tol=1e-15, constraint_tol=1e-15, max_iters=10**6,
                     time_limit=0.3)
    assert solution.status == Status.TIME_LIMIT
    assert 0.0 <= solution.dual_value <= optimum * (1 + 1e-7)  # a lower bound, stopped or not
    assert solution.value == pytest.approx(float(problem.objective(solution.U, solution.V, solution.b0)), rel=1e-12)


@pytest.mark.parametrize("late", [False, True, "stopped"])
def test_a_point_outside_its_cones_is_moved_in_unless_its_time_is_up(monkeypatch, late):
    """The move into the cones took 8 s after a 2 s limit at 1 000 MNIST images: the asynchronous monitor abandoned
    a solve that had stopped, and its certified bound was lost."""
    moved = []
    monkeypatch.setattr(snapshot_module, "feasible_solution", lambda problem, solution, *a: moved.append(1) or solution)

    def outside(problem, solver, **options):
        solution = solve(problem, "clarabel")
        time.sleep(0.06 if late is True else 0.0)  # past the limit, or stopped by it just before (the native solver)
        return dataclasses.replace(solution, violation=1e-3, status="time_limit" if late == "stopped" else "optimal")

    outcome = evaluate_snapshot(spec(time_limit=0.05 if late is True else 60.0), snapshot(), outside, quiet=True,
                                keep_solution=False)
    assert bool(moved) is not bool(late)
    if late:  # not moved: its status says the time ran out, and its certified dual value still bounds p*
        assert outcome.metrics["convex/status"] == Status.TIME_LIMIT.code and "convex/optimum" not in outcome.metrics
        assert "convex/lower_bound" in outcome.metrics


def test_one_off_work_and_another_loop_are_left_out_of_the_pace(monkeypatch):
    """A move into the cones of 1 s between iterations of 0.1 s entered the pace: the solve stopped with most of its
    limit unused."""
    now = [0.0]
    monkeypatch.setattr(clock, "perf_counter", lambda: now[0])
    deadline = Deadline(0.0, 6.0, wrap_up=5.0)
    now[0] = 1.0
    assert not deadline.passed()
    now[0] = 2.1
    deadline.exclude(1.0)  # 1 s of the last 1.1 s was the move
    assert not deadline.passed()  # the pace is 0.1 s: 2.1 + 6 · 0.1 ≤ 6 (1.1 s would stop it)
    now[0] = 4.0
    deadline.restart()  # the float64 loop after a float32 stall: its first call measures no pace
    assert not deadline.passed()  # a 1.9 s "iteration" would end past the limit: 4 + 6 · 1.9 > 6
    now[0] = 4.5
    assert deadline.passed()  # its own pace: 4.5 + 6 · 0.5 > 6


@pytest.fixture
def now(monkeypatch):
    t = [0.0]
    monkeypatch.setattr(clock, "perf_counter", lambda: t[0])
    return t


def test_a_restart_forgets_the_pace_of_the_loop_before(now):
    """Catches: (restart resets _last but keeps _pace)."""
    deadline = Deadline(0.0, 10.0, wrap_up=1.0)
    now[0] = 1.0
    assert not deadline.passed()
    now[0] = 5.0
    assert deadline.passed()  # a 4 s iteration: 5 + 2 · 4 > 10
    deadline.restart()
    now[0] = 5.5
    assert not deadline.passed()  # the new loop's first call measures no pace: the limit itself only


def test_the_pace_is_the_last_iterations_not_the_slowest(now):
    """Catches: (the pace kept as the largest seen)."""
    deadline = Deadline(0.0, 10.0, wrap_up=1.0)
    now[0] = 1.0
    assert not deadline.passed()
    now[0] = 4.0
    assert not deadline.passed()  # 4 + 2 · 3 = 10: not past
    now[0] = 4.5
    assert not deadline.passed()  # 4.5 + 2 · 0.5 ≤ 10 (3 s would stop it)


def test_reached_is_the_limit_itself_whatever_the_pace(now):
    """Catches: (reached() adding the pace)."""
    deadline = Deadline(0.0, 10.0, wrap_up=1.0)
    now[0] = 1.0
    deadline.passed()
    now[0] = 5.0
    assert deadline.passed()  # pace 4 s
    now[0] = 9.0
    assert not deadline.reached()
    now[0] = 10.5
    assert deadline.reached()
