"""ConvexGapMonitor(asynchronous=True): snapshots solved in the background, nothing lost, training never blocked."""

from __future__ import annotations

import _thread
import dataclasses
import multiprocessing
import signal
import sys
import threading
import time

import lightning.pytorch as pl
import pytest
from _async_utils import slow_solve, small_run, steps_of
from _events import read_scalars

import hcl.callbacks.solve_queue as solve_queue_module
import hcl.convex.solvers as solvers_module
import hcl.worker
from hcl.callbacks import ConvexGapMonitor, PatternMonitor
from hcl.convex.solvers import Solver, get_solver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TAGS = ("convex/optimum", "convex/upper_bound", "convex/lower_bound", "convex/nonconvex_objective", "convex/gap",
        "convex/status")


@pytest.fixture
def run(make_trainer):
    return small_run(make_trainer)


# Module-level solvers: the worker process imports them by name.
def sleepy_solve(problem, solver, **options):
    time.sleep(3600)


def exploding_solve(problem, solver, **options):
    raise RuntimeError("solver exploded")


class ClarabelByAnotherName(Solver):
    """A user's solver, registered in the training process only (the worker process never imports this module
    until the solver object arrives with a job)."""

    name = "clarabel_renamed"
    options = frozenset({"gated", "warm_start", "time_limit", "verbose", "memory_limit"})

    def solve(self, problem, *, warm_start=None, **options):
        return dataclasses.replace(get_solver("clarabel").solve(problem, **options), solver=self.name)


@pytest.fixture
def full_priority(monkeypatch):
    # The test machine is shared: a worker process at a lower priority could take long to start.
    monkeypatch.setattr(hcl.worker, "WORKER_NICENESS", 0)


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_with_room_in_the_queue_the_async_series_is_the_sync_series(tmp_path, worker, full_priority, run):
    """Every due step is solved once, at the weights of its own step, whatever the order results arrive in."""
    sync = run(tmp_path / "sync", [ConvexGapMonitor(every_n_steps=2, solver="clarabel")])
    monitor = ConvexGapMonitor(every_n_steps=2, solver="clarabel", asynchronous=True, max_pending=100, worker=worker)
    background = run(tmp_path / "async", [monitor])
    for tag in TAGS:
        assert steps_of(background, tag) == list(range(0, 10, 2)), tag
        for (step, value), (sync_step, sync_value) in zip(background[tag], sync[tag]):
            assert step == sync_step and value == pytest.approx(sync_value, rel=1e-6, abs=1e-9), tag
    assert "convex/skipped" not in background
    assert len(background["train/objective"]) == 10


def test_a_full_queue_skips_and_counts_but_loses_nothing(tmp_path, monkeypatch, run):
    monkeypatch.setattr(solve_queue_module, "solve", slow_solve)
    monitor = ConvexGapMonitor(solver="clarabel", asynchronous=True, max_pending=1, worker="thread")
    built, snapshot = [], monitor._snapshot
    monitor._snapshot = lambda step: built.append(step) or snapshot(step)
    s = run(tmp_path, [monitor], max_steps=30)
    solved, skipped = steps_of(s, "convex/status"), steps_of(s, "convex/skipped")
    assert skipped, "a 50 ms solver at every step of a fast run must fall behind"
    assert built == solved  # a skipped step's snapshot is not built (its sampled patterns take seconds at MNIST size)
    assert len(solved) == len(set(solved))  # each solved step exactly once
    assert not set(solved) & set(skipped)
    assert sorted(solved + skipped) == list(range(30))  # every due step is either solved or counted
    assert [v for _, v in s["convex/skipped"]] == list(range(1, len(skipped) + 1))  # a running count
    assert all(v == 0 for _, v in s["convex/status"])
    assert len(s["train/objective"]) == 30


def test_solver_errors_become_warnings_and_training_goes_on(tmp_path, monkeypatch, run):
    monkeypatch.setattr(solve_queue_module, "solve", exploding_solve)
    monitor = ConvexGapMonitor(every_n_steps=2, asynchronous=True, max_pending=100, worker="thread")
    with pytest.warns(UserWarning, match="solver exploded"):
        s = run(tmp_path, [monitor], max_steps=6)
    assert s["convex/status"] == [(0, 3.0), (2, 3.0), (4, 3.0)]
    assert len(s["train/objective"]) == 6


def test_raise_worker_errors_stops_training_and_keeps_what_was_logged(tmp_path, monkeypatch, run):
    calls, inside = [], threading.Event()

    def third_call_explodes(problem, solver, **options):
        calls.append(solver)
        if len(calls) == 3:
            inside.wait(10)
            raise RuntimeError("solver exploded")
        return slow_solve(problem, solver, **options)

    class Done(pl.Callback):
        steps = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 5:  # the failure arrives inside step 5, collected at that step's end
                inside.set()
                time.sleep(0.3)

        def on_exception(self, trainer, pl_module, exception):
            Done.steps = trainer.global_step

    monkeypatch.setattr(solve_queue_module, "solve", third_call_explodes)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread", raise_worker_errors=True)
    with pytest.raises(RuntimeError, match="background solve of step 2 failed.*solver exploded"):
        run(tmp_path, [monitor, Done()], max_steps=50)
    s = read_scalars(tmp_path)  # flushed on the exception
    assert s["convex/status"][:3] == [(0, 0.0), (1, 0.0), (2, 3.0)]
    assert 2 <= len(s["train/objective"]) < 50
    # raised before a step, not after one: every step the trainer (and so a checkpoint) counts done has its values
    assert steps_of(s, "train/objective") == list(range(Done.steps))
    assert monitor._queue is None  # closed, not left running


def test_a_late_result_is_logged_with_the_time_limit_status(tmp_path, monkeypatch, run):
    monkeypatch.setattr(solve_queue_module, "solve", slow_solve)
    monitor = ConvexGapMonitor(every_n_steps=3, asynchronous=True, max_pending=100, worker="thread",
                               solve_time_limit=0.01)
    with pytest.warns(UserWarning, match="over the time limit"):
        s = run(tmp_path, [monitor], max_steps=6)
    assert s["convex/status"] == [(0, 2.0), (3, 2.0)]
    assert all(seconds > 0.01 for _, seconds in s["convex/solve_seconds"])
    assert steps_of(s, "convex/upper_bound") == [0, 3]  # the late point is still feasible: its value is kept
    assert "convex/optimum" not in s  # but the optimum is logged only with status 0


def test_a_hung_solver_never_hangs_training(tmp_path, monkeypatch, run):
    release = threading.Event()

    def hung_solve(problem, solver, **options):
        release.wait(60)
        raise RuntimeError("released")

    monkeypatch.setattr(solve_queue_module, "solve", hung_solve)
    monitor = ConvexGapMonitor(every_n_steps=2, asynchronous=True, max_pending=2, worker="thread",
                               solve_time_limit=0.1)
    start = time.monotonic()
    try:
        with pytest.warns(UserWarning, match="abandoned"):
            s = run(tmp_path, [monitor], max_steps=6)
    finally:
        release.set()
    assert time.monotonic() - start < 30
    solved, skipped = steps_of(s, "convex/status"), steps_of(s, "convex/skipped")
    assert sorted(solved + skipped) == [0, 2, 4]
    assert all(v == 2.0 for _, v in s["convex/status"])  # abandoned solves are time-limit results
    assert len(s["train/objective"]) == 6
    # what the network itself gives is logged all the same: L and its own point's value, p* ≤ upper_bound ≤ L
    assert steps_of(s, "convex/nonconvex_objective") == steps_of(s, "convex/upper_bound") == solved
    for (_, upper), (_, L) in zip(s["convex/upper_bound"], s["convex/nonconvex_objective"]):
        assert upper <= L * (1 + 1e-6)


def test_abandoned_thread_solves_count_in_max_pending(tmp_path, monkeypatch, run):
    # a thread cannot be killed: an abandoned solve keeps running, and more must not pile up beside it
    release, lock, running, most = threading.Event(), threading.Lock(), [0], [0]

    def hung_solve(problem, solver, **options):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(60)
        with lock:
            running[0] -= 1
        raise RuntimeError("released")

    class Slow(pl.Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.3)  # abandoned after 1.1 s each: several would overlap within the run

    monkeypatch.setattr(solve_queue_module, "solve", hung_solve)
    monitor = ConvexGapMonitor(every_n_steps=1, asynchronous=True, max_pending=2, worker="thread",
                               solve_time_limit=0.1)
    try:
        with pytest.warns(UserWarning, match="abandoned"):
            s = run(tmp_path, [monitor, Slow()], max_steps=14)
        assert most[0] <= 2
    finally:
        release.set()
    assert sorted(steps_of(s, "convex/status") + steps_of(s, "convex/skipped")) == list(range(14))


def test_the_worker_process_is_killed_when_a_solve_overruns(tmp_path, monkeypatch, full_priority, run):
    monkeypatch.setattr(solve_queue_module, "solve", sleepy_solve)
    monitor = ConvexGapMonitor(every_n_steps=100, asynchronous=True, worker="process", solve_time_limit=0.2)
    with pytest.warns(UserWarning, match="abandoned"):
        s = run(tmp_path, [monitor], max_steps=2)
    assert s["convex/status"] == [(0, 2.0)]
    assert monitor._queue is None
    assert not [p for p in multiprocessing.active_children() if p.name == "hcl-convex-solver"]  # killed, not left


def test_an_exception_cancels_the_queue_and_flushes(tmp_path, monkeypatch, run):
    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 8:
                time.sleep(2.0)  # the solves queued (nine of 50 ms) finish, to be collected in on_exception
                raise KeyError("crash at step 8")

    monkeypatch.setattr(solve_queue_module, "solve", slow_solve)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread")
    start = time.monotonic()
    with pytest.raises(KeyError, match="crash at step 8"):  # a stack callback before the monitor, as in the configs
        run(tmp_path, [PatternMonitor(), monitor, Crash()], max_steps=50)
    s = read_scalars(tmp_path)
    assert steps_of(s, "train/objective") == list(range(8))
    assert steps_of(s, "convex/status") == steps_of(s, "convex/optimum") == list(range(9))  # on disk, in order
    # the chart's series run got them too, also those logged after the first callback's on_exception
    series = read_scalars(next(tmp_path.rglob("series")) / "convex" / "optimum")
    assert [step for step, _ in next(iter(series.values()))] == list(range(9))
    assert monitor._queue is None  # closed
    assert time.monotonic() - start < 30


def test_the_solves_an_exception_cancels_are_counted_as_skipped(tmp_path, monkeypatch, run):
    release = threading.Event()

    def held_solve(problem, solver, **options):
        release.wait(10)
        return slow_solve(problem, solver, **options)

    class Crash(pl.Callback):
        saved: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                raise KeyError("crash at step 4")

        def on_exception(self, trainer, pl_module, exception):  # after the monitor, as OnExceptionCheckpoint
            Crash.saved = monitor.state_dict()

    monkeypatch.setattr(solve_queue_module, "solve", held_solve)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread")
    try:
        with pytest.raises(KeyError, match="crash at step 4"):
            run(tmp_path, [monitor, Crash()], max_steps=50)
    finally:
        release.set()
    s = read_scalars(tmp_path)
    # every due step logged or counted as skipped, never neither: also in the state a checkpoint written now keeps
    assert "convex/status" not in s and s["convex/skipped"] == [(step, step + 1.0) for step in range(5)]
    # step 4 did not finish: a checkpoint written now leaves it (and its cancelled solve) to the resumed run
    assert Crash.saved == {"last_step": 3, "skipped": 4}


def test_a_failed_run_whose_logs_cannot_be_written_raises_its_own_error_and_closes_the_queue(tmp_path, monkeypatch,
                                                                                               run):
    """The monitor's clean-up after a failure could not write either (a log dir deleted under the run): it raised
    from on_exception, and Lightning then skipped the rest of the clean-up, leaving the worker alive."""
    import hcl.callbacks.convex_gap as convex_gap_module

    release = threading.Event()

    def held_solve(problem, solver, **options):
        release.wait(10)
        return slow_solve(problem, solver, **options)

    def unwritable(*args, **kwargs):
        raise FileNotFoundError("the log dir is gone")

    class Gone(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                monkeypatch.setattr(convex_gap_module, "log_scalars", unwritable)
                raise KeyError("the run's own error")

    monkeypatch.setattr(solve_queue_module, "solve", held_solve)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread")
    try:
        with pytest.raises(KeyError, match="the run's own error"), pytest.warns(UserWarning, match="could not log"):
            run(tmp_path, [monitor, Gone()], max_steps=50)
    finally:
        release.set()
    assert monitor._queue is None  # closed


def test_raise_worker_errors_raises_the_first_failure_and_the_others_warn(tmp_path, monkeypatch, run):
    release = threading.Event()

    def held_then_exploding(problem, solver, **options):
        release.wait(10)
        raise RuntimeError("solver exploded")

    class Release(pl.Callback):  # the solves of steps 0, 1 and 2 fail together, collected at step 3
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                release.set()
                time.sleep(0.5)

    monkeypatch.setattr(solve_queue_module, "solve", held_then_exploding)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread", raise_worker_errors=True)
    with pytest.warns(UserWarning) as record, pytest.raises(RuntimeError, match="step 0 failed.*solver exploded") as e:
        run(tmp_path, [Release(), monitor], max_steps=10)
    warned = " ".join(str(w.message) for w in record)
    # the same failure is said once per fit; the raised one carries the solve's traceback
    assert "failed at step 1: RuntimeError: solver exploded" in warned and "failed at step 2" not in warned
    assert 'raise RuntimeError("solver exploded")' in str(e.value)


def test_a_ctrl_c_while_training_waits_for_its_solves_keeps_the_finished_ones(tmp_path, monkeypatch, run):
    """Every due step is logged or counted as skipped, never neither: the solves collected before the interruption of
    the end-of-training wait are logged, the rest skipped (the interrupt comes once step 2 is collected, 3 held)."""
    release, ended = threading.Event(), threading.Event()

    def last_one_held(problem, solver, **options):  # step 2 finishes during the wait, step 3 is still running
        if release.is_set():
            return slow_solve(problem, solver, **options)
        calls.append(solver)
        if len(calls) == 3:  # step 2: after training has ended, however slow the machine (a poll had collected it)
            ended.wait(30)
            time.sleep(0.3)
        if len(calls) == 4:
            release.wait(30)
        return slow_solve(problem, solver, **options)

    def interrupt_once_step_2_is_collected():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not release.is_set():
            queue = monitor._queue
            if queue is not None and any(step == 2 for step, _ in list(queue._ready)):
                _thread.interrupt_main()  # Ctrl-C
                return
            time.sleep(0.01)

    class CtrlC(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            ended.set()
            threading.Thread(target=interrupt_once_step_2_is_collected, daemon=True).start()

    calls = []
    monkeypatch.setattr(solve_queue_module, "solve", last_one_held)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread")
    handler = signal.getsignal(signal.SIGINT)
    # a user's Ctrl-C raises KeyboardInterrupt: whatever an earlier test in this process left as the handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C
            run(tmp_path, [CtrlC(), monitor], max_steps=4)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores a second Ctrl-C from then on
        release.set()
    s = read_scalars(tmp_path)
    assert steps_of(s, "convex/status") == [0, 1, 2]
    assert s["convex/skipped"] == [(3, 1.0)]


def test_a_users_registered_solver_is_used_by_the_worker_process(tmp_path, monkeypatch, full_priority, run):
    """docs/architecture.md's recipe for a solver: every background solve failed with "unknown solver" in a worker
    process, which starts with the built-in solvers only. One whose class cannot be pickled is refused by name."""
    monkeypatch.setitem(solvers_module._registry(), "clarabel_renamed", ClarabelByAnotherName())
    monitor = ConvexGapMonitor(every_n_steps=2, solver="clarabel_renamed", asynchronous=True, worker="process")
    s = run(tmp_path, [monitor], max_steps=4)
    assert s["convex/status"] == [(0, 0.0), (2, 0.0)] and steps_of(s, "convex/optimum") == [0, 2]

    class Local(ClarabelByAnotherName):
        name = "local"

    class Scripted(ClarabelByAnotherName):  # pickled by reference to a __main__ the worker does not have
        name = "clarabel"  # and replacing a built-in one, which "auto" calls

    Scripted.__module__, Scripted.__qualname__ = "__main__", "Scripted"
    monkeypatch.setattr(sys.modules["__main__"], "Scripted", Scripted, raising=False)
    monkeypatch.setitem(solvers_module._registry(), "local", Local())
    monkeypatch.setitem(solvers_module._registry(), "clarabel", Scripted())
    for name, reason in (("local", "Can't pickle local object"), ("auto", "a script or notebook's class")):
        with pytest.raises(ValueError, match=f"cannot be sent to the worker process \\({reason}.*worker='thread'"):
            ConvexGapMonitor(solver=name, asynchronous=True)
        ConvexGapMonitor(solver=name, asynchronous=True, worker="thread")


def test_the_end_of_training_says_what_it_waits_for(tmp_path, monkeypatch, run):
    """The bar stood at 100 % for the minutes of the last solve, with nothing said."""
    def slower(*args, **kwargs):
        time.sleep(1.0)  # still running when the one training step is over
        return slow_solve(*args, **kwargs)

    import hcl.callbacks.convex_gap as convex_gap_module

    said = []
    monkeypatch.setattr(solve_queue_module, "solve", slower)
    monkeypatch.setattr(convex_gap_module, "rank_zero_info", said.append)
    run(tmp_path, [ConvexGapMonitor(asynchronous=True, worker="thread", solve_time_limit=30)], max_steps=1)
    assert "ConvexGapMonitor: waiting for 1 background solve(s), each at most 30 s" in said
