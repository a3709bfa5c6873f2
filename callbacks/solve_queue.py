"""The asynchronous side of :class:`~hcl.callbacks.ConvexGapMonitor`: snapshots solved in a background worker.

Free of Lightning: the queue hands results back, the callback logs them and raises the warnings.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

from torch import Tensor

from hcl.convex import solve
from hcl.convex.snapshot import (
    Snapshot,
    SolveOutcome,
    SolveSpec,
    WarmStartChain,
    network_metrics,
    solve_snapshot_job,
    store_worker_data,
)
from hcl.convex.solvers import solve_registered, solvers_used
from hcl.convex.status import Status
from hcl.worker import WORKER_KINDS, BackgroundWorker

__all__ = ["SolveQueue"]

# Seconds (beyond the time limit) a job next in line may wait for its worker to start it: a process worker imports
# torch and the solvers first; one stuck before that would otherwise hold the end of training forever
WORKER_START_WAIT = 60.0


@dataclass
class _Job:
    spec: SolveSpec
    snapshot: Snapshot
    future: Future
    sent_to: BackgroundWorker | None = None  # the worker its future belongs to
    first_in_line: float | None = None  # time.monotonic() when it was first seen next in line, not yet started
    resent: bool = False  # sent again after its worker died before starting it

    @property
    def step(self) -> int:
        return self.snapshot.step


class SolveQueue:
    """Snapshots solved one at a time in a background worker; results come back in snapshot order.

    The training thread :meth:`submit`\\ s CPU snapshots of the weights and :meth:`collect`\\ s the finished
    :class:`~hcl.convex.snapshot.SolveOutcome`\\ s, each with its snapshot's step. A process worker receives the data
    once (snapshots then carry only the weights) and keeps a warm-start chain of its own; a thread worker uses the
    data and the ``chain`` given here.

    A job still running well past ``time_limit`` is abandoned: its worker is killed (a thread is left to finish alone,
    counted in ``max_pending`` until it does), the queued snapshots go to a fresh worker, and the job comes back as a
    ``TIME_LIMIT`` outcome.

    Args:
        owner: name that starts every message (the callback's class name).
        worker: ``"process"`` or ``"thread"`` (see :class:`hcl.worker.BackgroundWorker`).
        max_pending: most snapshots queued or being solved at once; :meth:`submit` refuses more.
        time_limit: seconds a solve may take (the solver is told it too), or ``None``.
        X: the inputs, a CPU copy.
        Y: the targets, a CPU copy.
        name: name of the worker thread or process.
        chain: start each solve from the previous one's solution: a thread worker uses this chain, a process worker
            (which cannot share an object with this process) starts a chain of its own. ``None``: from the network.
    """

    def __init__(
        self, *, owner: str, worker: str, max_pending: int, time_limit: float | None, X: Tensor, Y: Tensor,
        name: str = "hcl-solver", chain: WarmStartChain | None = None,
    ) -> None:
        if worker not in WORKER_KINDS:
            raise ValueError(f"worker must be one of {WORKER_KINDS}, got {worker!r}")
        if worker == "process" and os.name != "posix":
            # Elsewhere os.nice is missing and a worker process would compete with training on equal terms.
            warnings.warn(f"{owner}: worker='process' needs a POSIX system; solving in a thread", stacklevel=2)
            worker = "thread"
        self.owner = owner
        self.max_pending = max_pending
        self.time_limit = time_limit
        self.name = name
        self._kind = worker
        self._X, self._Y = X, Y
        self._chain = chain
        self._jobs: deque[_Job] = deque()
        # finished outcomes not yet handed back: kept when a wait for the next is interrupted (Ctrl-C), so that the
        # next collect still returns them
        self._ready: list[tuple[int, SolveOutcome]] = []
        self._worker: BackgroundWorker | None = None
        self._stragglers: list[BackgroundWorker] = []  # abandoned thread workers still running their job
        self._data_key: str | None = None
        self._start_worker()  # now: a process worker imports its solvers while training starts

    @property
    def worker_kind(self) -> str:
        """``"process"`` or ``"thread"``: the kind actually used."""
        return self._kind

    def __len__(self) -> int:
        """Snapshots queued, being solved, or solved and not yet collected."""
        return len(self._jobs) + len(self._ready)

    @property
    def full(self) -> bool:
        """``max_pending`` snapshots are already waiting (an abandoned thread still solving counts)."""
        self._stragglers = [worker for worker in self._stragglers if worker.running]
        return len(self._jobs) + len(self._stragglers) >= self.max_pending

    def submit(self, spec: SolveSpec, snapshot: Snapshot) -> bool:
        """Queue ``snapshot``; ``False`` (nothing queued) when the queue is :attr:`full`."""
        if self.full:
            return False
        future = self._send(spec, snapshot)
        self._jobs.append(_Job(spec, snapshot, future, self._worker))
        return True

    def collect(self, wait: bool = False) -> list[tuple[int, SolveOutcome]]:
        """``(step, outcome)`` of the finished solves in snapshot order; with ``wait``, until none is left."""
        results = self._ready
        while self._jobs:
            job = self._jobs[0]
            if not job.future.done():
                elapsed = self._overrun(job)
                if elapsed is not None:
                    results.append((job.step, self._abandon(elapsed)))
                    continue
                if not wait:
                    break
                try:
                    job.future.result(timeout=0.2)
                except FutureTimeout:
                    continue
                except Exception:  # noqa: BLE001 - read again below
                    pass
            if self._died_before_starting(job):  # a worker that died (killed for memory, say) with it still queued
                job.resent = True
                job.future, job.sent_to = self._send(job.spec, job.snapshot), self._worker
                continue
            self._jobs.popleft()
            results.append((job.step, self._outcome(job)))
        self._ready = []
        return results

    def cancel(self) -> list[int]:
        """Drop the queued snapshots (their solves, if they run, are never collected); returns their steps."""
        for job in self._jobs:
            job.future.cancel()
        steps = [job.step for job in self._jobs]
        self._jobs.clear()
        return steps

    def close(self, kill: bool = False) -> None:
        """Stop the worker: ``kill`` ends a running solve too (process worker). A later :meth:`submit` starts one."""
        if self._worker is not None:
            self._worker.close(kill=kill)
            self._worker = None

    # ------------------------------------------------------------------------------------------------ helpers
    def _start_worker(self) -> None:
        self._worker = BackgroundWorker(self._kind, name=self.name)
        self._data_key = None
        if self._kind == "process":
            # The data goes to the worker process once (with a chain of its own); snapshots carry only the weights.
            self._data_key = uuid.uuid4().hex
            self._worker.submit(store_worker_data, self._data_key, self._X, self._Y, self._chain is not None)

    def _send(self, spec: SolveSpec, snapshot: Snapshot) -> Future:
        if self._worker is None or not self._worker.alive:
            self.close(kill=True)  # a worker process that died (killed for memory, say) is replaced
            self._start_worker()
        if self._data_key is not None:  # a process: a solver registered here is unknown there until sent
            solve_fn = functools.partial(solve_registered, solvers_used(spec.solver), solve)
            return self._worker.submit(solve_snapshot_job, spec, replace(snapshot, X=None, Y=None), self._data_key,
                                       solve_fn)
        return self._worker.submit(solve_snapshot_job, spec, replace(snapshot, X=self._X, Y=self._Y), None, solve,
                                   self._chain)

    def _outcome(self, job: _Job) -> SolveOutcome:
        try:
            return job.future.result()
        except Exception as err:  # noqa: BLE001 - the worker itself failed (died, could not run the job)
            reason = str(err) or type(err).__name__
            # the network's own values, computed here: logged at every solve, also a failed one
            metrics = {**network_metrics(job.spec, job.snapshot), f"{job.spec.prefix}/status": Status.FAILED.code}
            return SolveOutcome(metrics,
                                [f"{self.owner}: the background solve of step {job.step} failed: {reason}"],
                                error=reason)

    @staticmethod
    def _died_before_starting(job: _Job) -> bool:
        """Whether ``job`` failed without its worker ever starting it (the worker died or closed), the first time:
        the next worker takes it, once (a worker that dies at start-up would otherwise take it again forever)."""
        if job.resent or job.sent_to is None or job.future.cancelled() or job.future.exception() is None:
            return False
        return job.sent_to.started_at(job.future) is None

    def _overrun(self, job: _Job) -> float | None:
        """Seconds the job has been running when that is well past the time limit, else ``None``."""
        if self.time_limit is None or self._worker is None:
            return None
        started = self._worker.started_at(job.future)
        if started is None:  # next in line: the jobs before it are collected, so the worker should take it now
            job.first_in_line = job.first_in_line or time.monotonic()
            elapsed = time.monotonic() - job.first_in_line
            return elapsed if elapsed > self.time_limit + WORKER_START_WAIT else None
        elapsed = time.monotonic() - started
        # The solver is told the limit; only one that ignores it reaches this margin.
        return elapsed if elapsed > self.time_limit + max(1.0, 0.5 * self.time_limit) else None

    def _abandon(self, elapsed: float) -> SolveOutcome:
        job = self._jobs.popleft()
        p = job.spec.prefix
        started = self._worker.started_at(job.future) is not None
        what = "still running" if started else "not started by its worker"
        # A fresh worker (started on demand) takes the queue over; the stuck one is killed (process) or left to
        # finish alone (thread).
        if started and self._kind == "thread":
            self._stragglers.append(self._worker)
        self.close(kill=True)
        for queued in self._jobs:
            queued.future, queued.sent_to = self._send(queued.spec, queued.snapshot), self._worker
        seconds = {f"{p}/solve_seconds": elapsed} if started else {}  # a job never started took no solve time
        return SolveOutcome({**network_metrics(job.spec, job.snapshot), f"{p}/status": Status.TIME_LIMIT.code,
                             **seconds},
                            [f"{self.owner}: the solve of step {job.step} was {what} after {elapsed:.1f} s "
                             f"(time limit {self.time_limit} s): abandoned"])
