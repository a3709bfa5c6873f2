"""The background worker (`hcl.worker.BackgroundWorker`), without a trainer; the solve queue is in test_solve_queue.py.

The job functions are module-level, so that a worker process imports them from this module by name. At the top it
imports only the standard library and the worker, so that such a process starts in a fraction of a second: torch, the
convex engine and the solve queue (whose package, ``hcl.callbacks``, loads Lightning) are imported where needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import hcl.worker
from hcl.worker import WORKER_KINDS, BackgroundWorker, WorkerError

pytestmark = pytest.mark.timeout(120)

_SEEN: list[int] = []


def record(i: int) -> list[int]:
    """Append ``i`` to the worker's list of jobs seen; return the list."""
    _SEEN.append(i)
    return list(_SEEN)


def span(seconds: float) -> tuple[float, float]:
    """``(start, end)`` on the machine's monotonic clock (shared by the worker process) around a short sleep."""
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def fail(text: str) -> None:
    raise ValueError(text)


@pytest.fixture(autouse=True)
def full_priority(monkeypatch):
    # The test machine is shared: a worker process at a lower priority could take long to start.
    monkeypatch.setattr(hcl.worker, "WORKER_NICENESS", 0)


@pytest.fixture
def worker():
    workers = []

    def make(kind, **kwargs):
        workers.append(BackgroundWorker(kind, **kwargs))
        return workers[-1]

    yield make
    for w in workers:
        w.close(kill=True)


def _wait_until_started(w: BackgroundWorker, future, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while w.started_at(future) is None:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)
    return w.started_at(future)


# ------------------------------------------------------------------------------------------------ BackgroundWorker
def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="worker must be one of"):
        BackgroundWorker("gpu")
    assert WORKER_KINDS == ("process", "thread")


@pytest.mark.parametrize("kind", WORKER_KINDS)
def test_jobs_run_one_at_a_time_in_submission_order(worker, kind):
    w = worker(kind)
    _SEEN.clear()
    spans = [w.submit(span, 0.02) for _ in range(3)]
    records = [w.submit(record, i) for i in range(5)]
    assert records[-1].result(timeout=60) == [0, 1, 2, 3, 4]
    assert [f.result() for f in records] == [list(range(i + 1)) for i in range(5)]
    intervals = [f.result() for f in spans]
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("kind", WORKER_KINDS)
def test_an_exception_becomes_a_worker_error_with_the_original_type_and_traceback(worker, kind):
    w = worker(kind)
    failed = w.submit(fail, "bad input")
    after = w.submit(record, 1)
    error = failed.exception(timeout=60)
    assert isinstance(error, WorkerError)
    assert str(error) == "ValueError: bad input"
    assert "in fail" in error.worker_traceback and "ValueError: bad input" in error.worker_traceback
    assert after.result(timeout=60)[-1] == 1  # the worker goes on


@pytest.mark.parametrize("kind", WORKER_KINDS)
def test_started_at_is_none_while_queued_and_the_start_time_once_running(worker, kind):
    w = worker(kind)
    first = w.submit(span, 0.3)
    second = w.submit(record, 2)
    started = _wait_until_started(w, first)
    assert started <= time.monotonic()
    assert w.started_at(second) is None
    second.result(timeout=60)
    assert w.started_at(second) >= first.result()[1] > started  # after the first job ended


def test_an_unpicklable_job_fails_alone(worker):
    w = worker("process")
    bad = w.submit(record, lambda: 0)
    good = w.submit(record, 3)
    with pytest.raises(WorkerError, match="cannot be sent to the worker process"):
        bad.result(timeout=60)
    assert good.result(timeout=60)[-1] == 3


def test_the_thread_worker_takes_any_callable(worker):
    w = worker("thread", name="hcl-test-thread")
    box = []
    assert w.submit(lambda x: box.append(x) or len(box), 5).result(timeout=10) == 1
    assert box == [5]
    thread = next(t for t in threading.enumerate() if t.name == "hcl-test-thread")
    assert thread.daemon and w.alive
    w.close()
    thread.join(5)
    assert not thread.is_alive() and not w.alive


def test_close_with_kill_ends_a_running_job(worker):
    w = worker("process")
    running = w.submit(time.sleep, 60)
    queued = w.submit(record, 1)
    _wait_until_started(w, running)
    start = time.monotonic()
    w.close(kill=True)
    assert isinstance(running.exception(timeout=10), WorkerError)
    assert queued.cancelled()
    assert time.monotonic() - start < 5
    assert not w.alive
    with pytest.raises(WorkerError, match="closed"):
        w.submit(record, 2).result(timeout=1)


def test_a_dead_worker_process_fails_its_outstanding_and_later_jobs(worker):
    w = worker("process")
    dying = w.submit(os._exit, 3)
    queued = w.submit(record, 1)
    for future in (dying, queued):
        with pytest.raises(WorkerError, match=r"exited unexpectedly \(exit code 3\)"):
            future.result(timeout=60)
    assert not w.alive
    with pytest.raises(WorkerError, match="exited unexpectedly"):
        w.submit(record, 2).result(timeout=5)  # fails at once, never waits for a worker that is gone


@pytest.mark.slow  # the worker process imports torch (and the solvers)
def test_the_worker_process_is_light_low_priority_and_single_threaded(worker):
    w = worker("process", niceness=3)
    probe = ("(__import__('os').nice(0), sorted(m for m in __import__('sys').modules if m.startswith('lightning')),"
             " __import__('torch').get_num_threads())")
    niceness, lightning, threads = w.submit(eval, probe).result(timeout=60)
    assert niceness == min(os.nice(0) + 3, 19)
    assert lightning == []
    assert threads == 1


_KILLED_PARENT_SCRIPT = """
import os, time
from hcl.worker import BackgroundWorker
w = BackgroundWorker("process", niceness=0)
print(w.submit(os.getpid).result(timeout=60), flush=True)
w.submit(time.sleep, 120)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_worker_process_ends_with_its_parent_killed_outright():
    """SIGKILL (or the OOM killer) runs no clean-up in the training process: its worker went on with its solve, up
    to the solve's time limit, as an orphan."""
    import signal

    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # the job under way
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie (reaped by init soon) has ended
    except FileNotFoundError:
        return False


_UNGUARDED_SCRIPT = """
import json, os, sys
with open(os.environ["HCL_TEST_MARKER"], "a") as f:
    f.write("ran\\n")
from hcl.worker import BackgroundWorker
w = BackgroundWorker("process", niceness=0)
child = w.submit(os.getpid).result(timeout=60)
w.close()
print(json.dumps({"child": child, "parent": os.getpid(),
                  "heavy": sorted(m for m in sys.modules if m.startswith(("lightning", "torch")))}))
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_a_script_without_a_main_guard_is_not_rerun_in_the_worker_process(tmp_path, how):
    """spawn would re-run the parent's ``__main__`` in the child: a script body runs once, ``python -m`` too."""
    (tmp_path / "unguarded_job.py").write_text(_UNGUARDED_SCRIPT)
    marker = tmp_path / "marker.txt"
    command = [sys.executable, "unguarded_job.py"] if how == "script" else [sys.executable, "-m", "unguarded_job"]
    env = dict(os.environ, HCL_TEST_MARKER=str(marker))
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert marker.read_text() == "ran\n"  # the body ran once, in the parent only
    assert result["child"] != result["parent"]
    assert result["heavy"] == []  # neither hcl.worker nor the worker's start imports Lightning or torch


EXIT_DURING_A_THREAD_JOB = """
import time, torch
from hcl.convex import ConvexProblem, solve
from hcl.worker import BackgroundWorker
def solves():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64)
    Y = torch.randn(400, 1, generator=g, dtype=torch.float64)
    D = X @ torch.randn(10, 100, generator=g, dtype=torch.float64) >= 0
    for _ in range(6):  # seconds of native code after the script's end, well within the exit's wait under load
        solve(ConvexProblem(X, Y, D, 1e-3), "native")
BackgroundWorker(kind="thread", name="exit-test").submit(solves)
time.sleep(0.3)
print("the script ends while the job runs")
"""


@pytest.mark.slow  # a process that imports torch and solves
def test_the_interpreter_exits_cleanly_while_a_thread_job_runs_in_native_code():
    # the daemon thread was stopped inside torch's code at finalisation: std::terminate, SIGABRT, exit code 134
    done = subprocess.run([sys.executable, "-c", EXIT_DURING_A_THREAD_JOB], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the script ends while the job runs" in done.stdout
    assert "hcl: waiting at most 60 s for a background solve to finish before exiting" in done.stderr  # not silent


def test_an_idle_thread_worker_lets_the_interpreter_exit_without_a_word():
    script = "from hcl.worker import BackgroundWorker\nBackgroundWorker(kind='thread').submit(print, 'done').result()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "done\n"
    assert "waiting" not in done.stderr
