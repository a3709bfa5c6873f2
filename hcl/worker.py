"""A background worker that runs jobs one at a time, in order, away from the training thread.

Importable without torch or Lightning: the worker process starts light and loads what its jobs need.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import sys
import threading
import time
import traceback
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["WORKER_KINDS", "WORKER_NICENESS", "BackgroundWorker", "WorkerError"]

WORKER_KINDS = ("process", "thread")

#: ``nice`` increment of worker processes: on a busy machine the monitor yields the CPU to training and falls behind
#: (skipping snapshots) rather than slowing training down. 0 makes it compete on equal terms.
WORKER_NICENESS = 10

# Read by OpenMP, MKL and OpenBLAS (and so by torch) when they load: the worker process computes on one core.
_SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_SPAWN = multiprocessing.get_context("spawn")


class WorkerError(RuntimeError):
    """A job failed in the background worker, or the worker went away; the message names the original error.

    ``worker_traceback`` holds the job's traceback as formatted where it ran (``None`` when the worker itself failed).
    """

    worker_traceback: str | None = None


class BackgroundWorker:
    """Runs jobs ``fn(*args)`` one at a time, in submission order, away from the training thread.

    Two kinds:

    - ``"process"`` (default): a child Python process started by :mod:`multiprocessing`'s ``spawn`` method, at a
      lower CPU priority (``niceness``) and on one core. It holds its own GIL, so a Python-heavy job (building a
      cvxpy problem) does not slow the training thread down, and it can be killed when a job overruns. ``fn`` must be
      a module-level function and ``args`` picklable; the child has the parent's ``sys.path`` but never runs the
      parent's ``__main__`` (a script without an ``if __name__ == "__main__":`` guard is not re-run).
    - ``"thread"``: a daemon thread; jobs may be any callable (a monkeypatched function too), but they compete with
      training for the GIL and cannot be killed (an overrunning job is abandoned with its thread).

    Both are daemonic: a stuck job never keeps the interpreter alive for long at exit (a thread's running job is
    waited for, ``THREAD_EXIT_WAIT`` seconds at most, with a line on stderr saying so). :meth:`submit` returns a
    :class:`concurrent.futures.Future`; a job's exception, or the worker's death, sets a :class:`WorkerError` on it
    (a process worker that died fails the later jobs at once).

    The process, its pipes and the futures are the standard library's; the job loop is written here because its
    executors can neither tell when a job starts, kill a running one, nice the child before its imports, nor let exit
    go on past a stuck thread.
    """

    def __init__(self, kind: str = "process", name: str = "hcl-worker", niceness: int | None = None) -> None:
        if kind not in WORKER_KINDS:
            raise ValueError(f"worker must be one of {WORKER_KINDS}, got {kind!r}")
        self.kind = kind
        self.name = name
        self._niceness = WORKER_NICENESS if niceness is None else int(niceness)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # future → start time
        self._closed = False
        self._failure: WorkerError | None = None  # why the worker process ended, when it ended by itself
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._futures: dict[int, Future] = {}  # process kind: the jobs sent and not yet answered, by id
        self._ids = itertools.count()
        if kind == "thread":
            self._thread = threading.Thread(target=self._thread_loop, name=name, daemon=True)
            self._thread.start()
            _LIVE_THREAD_WORKERS.add(self)
        else:
            self._start_process()

    # -------------------------------------------------------------------------------------------- public
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its future is set when it finishes (or fails)."""
        future: Future = Future()
        if self._closed:
            future.set_exception(WorkerError(f"{self.name}: the worker is closed"))
            return future
        if self.kind == "thread":
            self._jobs.put((future, fn, args))
        else:
            with self._lock:
                if self._failure is not None:
                    future.set_exception(self._failure)
                    return future
                job_id = next(self._ids)
                self._futures[job_id] = future
            self._jobs.put((job_id, fn, args))
        return future

    def started_at(self, future: Future) -> float | None:
        """``time.monotonic()`` when the worker began ``future``'s job, ``None`` while it waits in the queue."""
        return self._started.get(future)

    @property
    def alive(self) -> bool:
        """Whether it still takes jobs: not closed, and its thread or process runs."""
        return not self._closed and self.running

    @property
    def running(self) -> bool:
        """Whether its thread or process still runs: a closed thread worker finishes the job it holds alone."""
        if self.kind == "thread":
            return self._thread.is_alive()
        return self._process is not None and self._process.is_alive()

    def close(self, kill: bool = False) -> None:
        """Stop taking jobs. Queued jobs are cancelled; ``kill`` also ends a running job (process worker only)."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if self.kind == "process" and self._process is not None:
            if kill:
                _terminate(self._process)
            else:
                # The child finishes its current job, reads the stop marker and exits; never wait on it forever.
                threading.Thread(target=_reap, args=(self._process, 30.0), daemon=True).start()
            self._fail_outstanding(WorkerError(f"{self.name}: the worker was closed"), running_too=kill, cancel=True)

    # ----------------------------------------------------------------------------------------------- thread
    def _thread_loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, fn, args = item
            if self._closed or not future.set_running_or_notify_cancel():
                if not future.done():
                    future.cancel()
                continue
            self._started[future] = time.monotonic()
            try:
                result = fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                future.set_exception(_as_worker_error(err, traceback.format_exc()))
            else:
                future.set_result(result)

    # ---------------------------------------------------------------------------------------------- process
    def _start_process(self) -> None:
        job_reader, job_writer = _SPAWN.Pipe(duplex=False)
        result_reader, result_writer = _SPAWN.Pipe(duplex=False)
        process = _SPAWN.Process(target=_worker_process_main, args=(self._niceness, job_reader, result_writer),
                                 name=self.name, daemon=True)
        with _main_hidden():
            process.start()
        # The child's ends are closed here, so that each side reads EOF as soon as the other one is gone.
        job_reader.close()
        result_writer.close()
        self._process = process
        _LIVE_PROCESSES.add(process)
        self._job_pipe = job_writer
        self._result_pipe = result_reader
        threading.Thread(target=self._writer_loop, name=f"{self.name}-writer", daemon=True).start()
        threading.Thread(target=self._reader_loop, name=f"{self.name}-reader", daemon=True).start()

    def _writer_loop(self) -> None:
        # Pickling and writing happen here, not on the training thread: a full pipe must never block training.
        # Plain pickle, not multiprocessing's: tensors travel as bytes, not as shared-memory handles.
        pipe = self._job_pipe
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    pipe.send_bytes(pickle.dumps(None))
                    return
                job_id, fn, args = item
                future = self._futures.get(job_id)
                if future is None or future.cancelled():
                    continue
                try:
                    job = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as err:  # noqa: BLE001 - an unpicklable job fails alone
                    self._pop(job_id)
                    _set_exception(future, WorkerError(
                        f"{self.name}: the job cannot be sent to the worker process ({type(err).__name__}: {err}); "
                        "use module-level functions and picklable arguments, or worker='thread'"))
                    continue
                pipe.send_bytes(pickle.dumps(job_id))
                pipe.send_bytes(job)
        except (OSError, ValueError):
            return  # the child is gone; the reader fails the outstanding futures
        finally:
            pipe.close()

    def _reader_loop(self) -> None:
        pipe = self._result_pipe
        try:
            while True:
                try:
                    kind, job_id = pickle.loads(pipe.recv_bytes())
                    body = None if kind == "started" else pipe.recv_bytes()
                except (EOFError, OSError, pickle.UnpicklingError):
                    break
                future = self._futures.get(job_id)
                if future is None:
                    continue
                if kind == "started":
                    if future.set_running_or_notify_cancel():
                        self._started[future] = time.monotonic()
                    continue
                self._pop(job_id)
                try:
                    value = pickle.loads(body)
                except Exception as err:  # noqa: BLE001 - a result that cannot be read fails its job alone
                    _set_exception(future, WorkerError(
                        f"{self.name}: the job's result cannot be read ({type(err).__name__}: {err})"))
                    continue
                if kind == "done":
                    _set_result(future, value)
                else:
                    type_name, text, trace = value
                    error = WorkerError(f"{type_name}: {text}")
                    error.worker_traceback = trace
                    _set_exception(future, error)
        finally:
            if self._closed:
                error = WorkerError(f"{self.name}: the worker process was closed")
            else:
                self._process.join(1.0)  # the pipe closes just before the process ends: read its exit code
                error = WorkerError(f"{self.name}: the worker process exited unexpectedly (exit code "
                                    f"{self._process.exitcode})")
                with self._lock:
                    self._failure = error  # later jobs fail at once instead of waiting forever
            self._fail_outstanding(error, running_too=True, cancel=self._closed)
            pipe.close()

    def _pop(self, job_id: int) -> None:
        with self._lock:
            self._futures.pop(job_id, None)

    def _fail_outstanding(self, error: Exception, running_too: bool, cancel: bool) -> None:
        """Set ``error`` on the unanswered jobs (``cancel``: cancel the queued ones instead)."""
        with self._lock:
            outstanding = list(self._futures.items())
        for job_id, future in outstanding:
            if future.running() and not running_too:
                continue
            self._pop(job_id)
            if not (cancel and future.cancel()):
                _set_exception(future, error)


def _set_result(future: Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: Future, error: BaseException) -> None:
    if future.cancelled() or future.done():
        return
    if future.running() or future.set_running_or_notify_cancel():
        future.set_exception(error)


def _as_worker_error(err: BaseException, trace: str) -> WorkerError:
    error = WorkerError(f"{type(err).__name__}: {err}")
    error.worker_traceback = trace
    return error


_START_LOCK = threading.Lock()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start a spawned process as from an interactive session, whose ``__main__`` has no ``__file__`` or spec."""
    # spawn re-runs a __main__ with a file or spec in the child (see multiprocessing.spawn.get_preparation_data)
    with _START_LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is None:
                del sys.modules["__main__"]
            else:
                sys.modules["__main__"] = main


_LIVE_PROCESSES: weakref.WeakSet = weakref.WeakSet()
_LIVE_THREAD_WORKERS: weakref.WeakSet = weakref.WeakSet()
# How long the interpreter's exit waits for thread workers' running jobs, in all
THREAD_EXIT_WAIT = 60.0


@atexit.register
def _finish_live_threads() -> None:
    """Let thread workers finish their running job before the interpreter exits (their queued ones are cancelled).

    A daemon thread still inside torch's or a solver's native code when the interpreter finalises is stopped by a
    forced unwind that C++ turns into ``std::terminate``: the process aborted (SIGABRT, exit code 134) after a
    training run that raised, or that abandoned a solve. Waits at most ``THREAD_EXIT_WAIT`` seconds in all.
    """
    deadline = time.monotonic() + THREAD_EXIT_WAIT
    workers = [w for w in list(_LIVE_THREAD_WORKERS) if w._thread.is_alive()]
    for worker in workers:
        worker.close()
    for worker in workers:  # an idle one ends at once
        worker._thread.join(0.1)
    busy = [w for w in workers if w._thread.is_alive()]
    if busy:  # a silent wait looks like a hang
        print(f"hcl: waiting at most {THREAD_EXIT_WAIT:.0f} s for a background solve to finish before exiting "
              "(worker='process' ends at once)", file=sys.stderr, flush=True)
    for worker in busy:
        worker._thread.join(max(0.0, deadline - time.monotonic()))


def _terminate(process: multiprocessing.process.BaseProcess, grace: float = 2.0) -> None:
    if process.exitcode is not None:
        return
    process.terminate()
    process.join(grace)
    if process.exitcode is None:
        process.kill()
        process.join()


def _reap(process: multiprocessing.process.BaseProcess, timeout: float) -> None:
    process.join(timeout)
    _terminate(process)


# Registered after multiprocessing's own exit handler, so it runs first: a worker that ignores SIGTERM is killed
# instead of being joined forever.
@atexit.register
def _kill_live_processes() -> None:
    for process in list(_LIVE_PROCESSES):
        _terminate(process, grace=0.5)


def _worker_process_main(niceness: int, jobs: Connection, results: Connection) -> None:
    """Entry point of the worker process: run the jobs read from ``jobs``, answer on ``results``."""
    # Before the first job imports anything: the heavy imports (torch, the solvers) already run at low priority.
    try:
        os.nice(niceness)
    except (AttributeError, OSError):
        pass
    for variable in _SINGLE_THREAD_ENV:
        os.environ[variable] = "1"
    warnings.simplefilter("ignore")  # solver chatter; statuses are reported instead
    parent = multiprocessing.parent_process()
    if parent is not None:  # a parent killed outright (SIGKILL, the OOM killer) is noticed now, not after the solve
        threading.Thread(target=_exit_with, args=(parent,), name="hcl-parent-watch", daemon=True).start()

    try:
        while True:
            job_id = pickle.loads(jobs.recv_bytes())
            if job_id is None:
                return
            job = jobs.recv_bytes()
            results.send_bytes(pickle.dumps(("started", job_id)))
            kind, body = _run(job)
            results.send_bytes(pickle.dumps((kind, job_id)))
            results.send_bytes(body)
    except (EOFError, OSError):
        return  # the parent is gone


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    """End this worker process when ``parent`` ends (its sentinel becomes ready)."""
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def _run(job: bytes) -> tuple[str, bytes]:
    """``("done", pickled result)`` or ``("error", pickled (type name, message, traceback))``."""
    try:
        fn, args = pickle.loads(job)  # here, so that a job whose function cannot be imported fails alone
        return "done", pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        return "error", pickle.dumps((type(err).__name__, str(err), traceback.format_exc()))
