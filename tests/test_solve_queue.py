"""The asynchronous solve queue (``hcl.callbacks.solve_queue.SolveQueue``), without a trainer.

The solve functions are module-level, so that a worker process imports them from this module by name. At the top it
imports only the standard library and the worker, so that such a process starts in a fraction of a second: torch, the
convex engine and the solve queue (whose package, ``hcl.callbacks``, loads Lightning) are imported where needed.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from dataclasses import replace

import pytest

import hcl.worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def full_priority(monkeypatch):
    # The test machine is shared: a worker process at a lower priority could take long to start.
    monkeypatch.setattr(hcl.worker, "WORKER_NICENESS", 0)


def scripted_solve(problem, solver, *, gated=False, warm_start=None, **options):
    """The point it starts from, or what the solver name says: ``"hang"`` for a minute, ``"die"``, ``"halve"``."""
    from hcl.convex.problem import ConvexSolution

    if solver == "hang":
        time.sleep(60)
    if solver == "die":
        os._exit(7)
    U, V, b0 = warm_start[:3]  # a chain's warm start carries the multipliers fourth
    if solver == "halve":  # half the point it starts from: a chain of solves goes on halving
        U, V = U / 2, V / 2
    return ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status="optimal",
                          solver=solver, solve_seconds=0.0, gated=gated)


@pytest.fixture
def solve_queue():
    return importlib.import_module("hcl.callbacks.solve_queue")


@pytest.fixture
def queues():
    made = []
    yield made
    for q in made:
        q.cancel()
        q.close(kill=True)


def _data(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 1, generator=g, dtype=torch.float64)


def _snapshot(step: int, X=None, Y=None):
    import torch

    from hcl.convex.snapshot import Snapshot

    g = torch.Generator().manual_seed(100 + step)
    hidden = torch.randn(4, 3, generator=g, dtype=torch.float64)
    output = torch.randn(1, 4, generator=g, dtype=torch.float64)
    return Snapshot(step, X, Y, hidden, None, output, None, None)


def _spec(solver: str, time_limit: float | None = None, gated: bool = False):
    from hcl.convex.snapshot import SolveSpec

    return SolveSpec(owner="Probe", prefix="convex", formulation="patterns",
                     solver=solver, gated=gated, weight_decay=0.01, reduction="mean", solver_options={},
                     time_limit=time_limit)


def _collect_all(q, count: int, timeout: float = 60.0) -> list:
    results, deadline = [], time.monotonic() + timeout
    while len(results) < count:
        assert time.monotonic() < deadline, f"only {len(results)} of {count} results"
        results += q.collect()
        time.sleep(0.02)
    return results


@pytest.mark.slow  # the worker process imports torch (and the solvers)
def test_the_queue_solves_in_a_process_and_returns_results_in_snapshot_order(solve_queue, queues):
    from hcl.convex.snapshot import evaluate_snapshot
    from hcl.convex.status import Status

    X, Y = _data()
    q = solve_queue.SolveQueue(owner="Probe", worker="process", max_pending=5, time_limit=None, X=X, Y=Y)
    queues.append(q)
    assert q.worker_kind == "process"
    for step in (0, 3, 6):
        assert q.submit(_spec("clarabel"), _snapshot(step))
    assert len(q) == 3
    results = _collect_all(q, 3)
    assert [step for step, _ in results] == [0, 3, 6] and len(q) == 0
    for step, outcome in results:
        # The worker had the data sent once: the same numbers as a solve here, on the full snapshot.
        expected = evaluate_snapshot(_spec("clarabel"), _snapshot(step, X, Y), solve_queue.solve, quiet=True,
                                     keep_solution=False).metrics
        assert outcome.metrics["convex/status"] == Status.OPTIMAL.code, outcome.messages
        for tag in ("convex/optimum", "convex/nonconvex_objective", "convex/gap"):
            assert outcome.metrics[tag] == pytest.approx(expected[tag], rel=1e-6, abs=1e-9), tag


def test_a_full_queue_refuses_a_snapshot_and_wait_drains_it(solve_queue, queues, monkeypatch):
    from hcl.convex.snapshot import evaluate_snapshot
    from hcl.convex.status import Status

    release = threading.Event()

    def gated_solve(problem, solver, **options):
        release.wait(10)
        return scripted_solve(problem, solver, **options)

    monkeypatch.setattr(solve_queue, "solve", gated_solve)
    X, Y = _data()
    q = solve_queue.SolveQueue(owner="Probe", worker="thread", max_pending=2, time_limit=None, X=X, Y=Y)
    queues.append(q)
    assert q.submit(_spec("fake"), _snapshot(0)) and q.submit(_spec("fake"), _snapshot(1))
    assert not q.submit(_spec("fake"), _snapshot(2))  # nothing queued: the caller counts a skip
    assert len(q) == 2 and q.collect() == []
    threading.Timer(0.2, release.set).start()
    results = q.collect(wait=True)
    assert [step for step, _ in results] == [0, 1] and len(q) == 0
    for step, outcome in results:
        # The thread worker solved with the queue's data: the numbers of a solve here, on the full snapshot.
        expected = evaluate_snapshot(_spec("fake"), _snapshot(step, X, Y), scripted_solve, quiet=True,
                                     keep_solution=False).metrics
        assert outcome.metrics["convex/status"] == Status.OPTIMAL.code
        assert outcome.metrics["convex/optimum"] == expected["convex/optimum"]
    assert q.submit(_spec("fake"), _snapshot(2))


@pytest.mark.slow
def test_a_job_its_worker_never_starts_is_abandoned_and_the_next_one_still_solved(solve_queue, queues, monkeypatch):
    """A worker stuck before its first job (a hung import) held the end of training's wait forever."""
    from concurrent.futures import Future

    from hcl.convex.status import Status

    monkeypatch.setattr(solve_queue, "solve", scripted_solve)
    monkeypatch.setattr(solve_queue, "WORKER_START_WAIT", 0.3)
    X, Y = _data()
    q = solve_queue.SolveQueue(owner="Probe", worker="thread", max_pending=5, time_limit=0.2, X=X, Y=Y)
    queues.append(q)
    monkeypatch.setattr(q._worker, "submit", lambda *args: Future())  # this worker never takes a job
    assert q.submit(_spec("fake", 0.2), _snapshot(0)) and q.submit(_spec("fake", 0.2), _snapshot(1))
    start = time.monotonic()
    (step, late), (next_step, solved) = q.collect(wait=True)
    assert (step, next_step) == (0, 1) and time.monotonic() - start < 10
    assert late.metrics["convex/status"] == Status.TIME_LIMIT.code and "convex/solve_seconds" not in late.metrics
    assert "step 0 was not started by its worker after" in late.messages[0] and "abandoned" in late.messages[0]
    assert float(late.messages[0].split(" after ")[1].split(" s ")[0]) > 0.5  # the limit and the start wait
    assert solved.metrics["convex/status"] == Status.OPTIMAL.code  # by a fresh worker


@pytest.mark.slow  # the worker process imports torch (and the solvers)
def test_an_overrunning_solve_is_abandoned_and_the_next_one_still_solved(solve_queue, queues, monkeypatch):
    from hcl.convex.status import Status

    monkeypatch.setattr(solve_queue, "solve", scripted_solve)
    X, Y = _data()
    q = solve_queue.SolveQueue(owner="Probe", worker="process", max_pending=5, time_limit=0.2, X=X, Y=Y)
    queues.append(q)
    assert q.submit(_spec("hang", 0.2), _snapshot(0)) and q.submit(_spec("fake", 0.2), _snapshot(1))
    (step, late), (next_step, solved) = _collect_all(q, 2)
    assert (step, next_step) == (0, 1)
    assert late.metrics["convex/status"] == Status.TIME_LIMIT.code and late.error is None
    assert late.metrics["convex/solve_seconds"] > 1.2  # the limit and its margin of max(1 s, half the limit)
    assert "abandoned" in late.messages[0] and "step 0" in late.messages[0]
    assert solved.metrics["convex/status"] == Status.OPTIMAL.code  # by a fresh worker, with the data sent again


@pytest.mark.slow  # the worker process imports torch (and the solvers)
def test_a_failed_worker_comes_back_as_a_failed_outcome_and_is_replaced(solve_queue, queues, monkeypatch):
    from hcl.convex.status import Status

    monkeypatch.setattr(solve_queue, "solve", scripted_solve)
    X, Y = _data()
    q = solve_queue.SolveQueue(owner="Probe", worker="process", max_pending=5, time_limit=None, X=X, Y=Y)
    queues.append(q)
    # the snapshots queued behind the one that killed its worker are solved by the next worker, not failed with it
    assert q.submit(_spec("die"), _snapshot(0)) and q.submit(_spec("fake"), _snapshot(1))
    [(step, failed), (queued_step, queued)] = q.collect(wait=True)
    assert step == 0 and failed.metrics == {"convex/status": Status.FAILED.code}
    assert "exit code 7" in failed.error and failed.messages[0].startswith("Probe: the background solve of step 0")
    assert queued_step == 1 and queued.metrics["convex/status"] == Status.OPTIMAL.code
    assert q.submit(_spec("fake"), _snapshot(2))
    [(step, solved)] = q.collect(wait=True)
    assert step == 2 and solved.metrics["convex/status"] == Status.OPTIMAL.code


def test_cancel_drops_the_queued_snapshots(solve_queue, queues, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(solve_queue, "solve", lambda problem, solver, **options: release.wait(10))
    X, Y = _data()
    q = solve_queue.SolveQueue(owner="Probe", worker="thread", max_pending=3, time_limit=None, X=X, Y=Y)
    queues.append(q)
    for step in range(3):
        q.submit(_spec("fake"), _snapshot(step))
    q.cancel()
    release.set()
    assert len(q) == 0 and q.collect(wait=True) == []


@pytest.mark.parametrize("kind", [pytest.param("process", marks=pytest.mark.slow), "thread"])
def test_a_chain_starts_each_solve_from_the_last_solution(solve_queue, queues, monkeypatch, kind):
    """Where the solves run: the thread worker uses the chain given, the process worker a chain of its own."""
    from hcl.convex.snapshot import WarmStartChain

    monkeypatch.setattr(solve_queue, "solve", scripted_solve)
    X, Y = _data()
    for chain in (None, WarmStartChain()):  # both queues at once: their workers start side by side
        queues.append(solve_queue.SolveQueue(owner="Probe", worker=kind, max_pending=3, time_limit=None, X=X, Y=Y,
                                             chain=chain))
        for step in range(3):  # one snapshot, solved three times (the gated value is the solver's own)
            queues[-1].submit(_spec("halve", gated=True), replace(_snapshot(0), step=step))
    values = {chained: [outcome.metrics["convex/gated_optimum"] for _, outcome in q.collect(wait=True)]
              for chained, q in zip((False, True), queues)}
    assert values[False][0] == values[False][1] == values[False][2]  # each from the network's point
    assert values[True][0] == values[False][0]  # the first of a chain too
    assert values[True][0] > values[True][1] > values[True][2]  # then from a point halved once more each time
