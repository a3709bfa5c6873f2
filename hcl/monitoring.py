"""Helpers shared by hcl's callbacks: where the data comes from, when to act, how values are logged, and a
background worker for solves that must not stall training.

Distributed training: :func:`training_data` gathers the ranks' shards of a plain dataloader with a collective, so
every rank must call it (as the callbacks do, in ``on_train_start``); everything else here is local.
"""

from __future__ import annotations

import atexit
import itertools
import math
import numbers
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hcl.convex.build import problem_from_network
from hcl.convex.native import remap_warm_start
from hcl.convex.problem import (
    REDUCTIONS,
    ConvexProblem,
    ConvexSolution,
    fold_bias,
    fold_weights,
    network_objective,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

WORKER_KINDS = ("process", "thread")

#: ``nice`` increment of worker processes: on a busy machine the monitor yields the CPU to training and falls behind
#: (skipping snapshots) rather than slowing training down. 0 makes it compete on equal terms.
WORKER_NICENESS = 10


def check_every_n_steps(every_n_steps: int) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return every_n_steps


def check_probe(probe: Tensor | None, name: str = "probe") -> Tensor | None:
    """Validate a user-given probe tensor early (in ``__init__``)."""
    if probe is None:
        return None
    if not isinstance(probe, Tensor):
        try:
            probe = torch.as_tensor(probe)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor (or convertible to one), got {type(probe).__name__}") from err
    if probe.ndim == 0:
        raise ValueError(f"{name} must have a leading sample dimension, got a 0-dimensional tensor")
    if probe.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    if probe.is_complex() or probe.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got {probe.dtype}")
    if probe.is_floating_point() and not torch.isfinite(probe).all():
        raise ValueError(f"{name} contains NaN or inf")
    return probe


def check_probe_and_target(probe: Tensor | None, target: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Validate a ``probe``/``target`` pair early: each as :func:`check_probe`, both or neither, same length."""
    probe, target = check_probe(probe), check_probe(target, "target")
    if (probe is None) != (target is None):
        raise ValueError("probe and target go together: pass both or neither")
    if probe is not None and probe.shape[0] != target.shape[0]:
        raise ValueError(f"probe has {probe.shape[0]} samples but target {target.shape[0]}")
    return probe, target


def check_prefix(prefix: str) -> str:
    """A tag prefix: a non-empty name without ``/``."""
    if not isinstance(prefix, str) or not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
    return prefix


def check_weight_decay(value: Any, name: str = "weight_decay (λ)") -> float:
    """``λ``: a real number, finite and ``≥ 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    return float(value)


def resolve_objective(
    pl_module: "pl.LightningModule", weight_decay: float | None, reduction: str | None, owner: str
) -> tuple[float, str]:
    """``(λ, reduction)``: the callback's own values when given, else the model's ``weight_decay`` / ``reduction``
    attributes, else ``λ = 0`` and ``"mean"`` with a warning."""
    lam = weight_decay if weight_decay is not None else getattr(pl_module, "weight_decay", None)
    red = reduction if reduction is not None else getattr(pl_module, "reduction", None)
    if lam is None or red is None:
        from lightning.pytorch.utilities import rank_zero_warn  # Lightning stays out of the worker process

        rank_zero_warn(
            f"{owner}: the model has no `weight_decay`/`reduction` attributes and the callback was given none: "
            "using λ = 0 and reduction 'mean'"
        )
    lam = check_weight_decay(lam or 0.0, "the model's weight_decay (λ)")
    red = red or "mean"
    if red not in REDUCTIONS:
        raise ValueError(f"the model's reduction must be one of {REDUCTIONS}, got {red!r}")
    return lam, red


def is_due(step: int, every_n_steps: int, last_step: int) -> bool:
    """Act at steps ``0, k, 2k, …``, once each (a repeated ``global_step`` — accumulation, resume — is skipped)."""
    return step > last_step and step % every_n_steps == 0


def training_data(
    trainer: pl.Trainer, probe: Tensor | None = None, target: Tensor | None = None, max_samples: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The inputs (and targets) a callback evaluates the network on.

    The ``probe``/``target`` the user gave, else the data module's full training set (``train_tensors()``, as in
    :mod:`hcl.datamodules`), else one pass over the training dataloader. Under DDP a dataloader only yields this
    rank's shard, so the shards are gathered from all ranks (a collective: call this on every rank). ``max_samples``
    keeps the first ones.

    Raises:
        ValueError: when no data can be found or it is empty / not finite, or targets do not match the inputs.
    """
    if probe is not None:
        X, Y = probe, target
    else:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            X, Y = datamodule.train_tensors()
        else:
            X, Y = _collect_dataloader(trainer)
            if trainer.world_size > 1:
                X = gather_rows(trainer, X)
                Y = None if Y is None else gather_rows(trainer, Y)
    if max_samples is not None:
        X = X[:max_samples]
        Y = None if Y is None else Y[:max_samples]
    if X.shape[0] == 0:
        raise ValueError("the data to evaluate the network on is empty")
    if X.is_floating_point() and not torch.isfinite(X).all():
        raise ValueError("the data to evaluate the network on contains NaN or inf")
    if Y is not None:
        if Y.ndim == 0 or Y.shape[0] != X.shape[0]:
            raise ValueError(f"the targets have shape {tuple(Y.shape)} but the inputs have {X.shape[0]} rows")
        if Y.is_floating_point() and not torch.isfinite(Y).all():
            raise ValueError("the targets to evaluate the network on contain NaN or inf")
    return X, Y


def gather_rows(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Concatenate the ranks' tensors along the first dimension (rank 0's rows first); sizes may differ.

    A collective: every rank must call it. The result is on this rank's original device.
    """
    strategy = trainer.strategy
    device = strategy.root_device
    local = tensor.detach().to(device)
    sizes = strategy.all_gather(torch.tensor([local.shape[0]], device=device)).reshape(-1).tolist()
    longest = max(int(s) for s in sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    everything = strategy.all_gather(padded)  # (world, longest, ...)
    parts = [everything[rank, : int(size)] for rank, size in enumerate(sizes)]
    return torch.cat(parts).to(tensor.device)


def _collect_dataloader(trainer: pl.Trainer) -> tuple[Tensor, Tensor | None]:
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if loader is None:
        raise ValueError("no training data found: pass probe= (and target=) to the callback")
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2]):
            xs.append(batch[0])
            ys.append(batch[1])
        elif isinstance(batch, Tensor):
            xs.append(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
            xs.append(batch[0])  # TensorDataset(X): inputs only
        else:
            raise ValueError(
                f"cannot read inputs from a training batch of type {type(batch).__name__}: pass probe= to the callback"
            )
    if not xs:
        raise ValueError("the training dataloader is empty")
    if len(xs) == 1:
        # One batch (full-batch training): keep its tensors, so that a callback can recognise them in a training step.
        return xs[0], (ys[0] if ys else None)
    try:
        return torch.cat(xs), (torch.cat(ys) if ys else None)
    except RuntimeError as err:
        raise ValueError(f"the training batches cannot be stacked into one data set ({err}): pass probe=") from err


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger (rank zero), and expose them in ``callback_metrics``."""
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)
    for k, v in clean.items():
        trainer.callback_metrics[k] = torch.tensor(v)


def flush_loggers(trainer: pl.Trainer) -> None:
    """Write what the loggers hold to disk (rank zero); a logger that fails to save only warns."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        try:
            logger.save()
        except Exception as err:  # noqa: BLE001 - flushing is best effort, it must not mask the real error
            warnings.warn(f"could not flush the logger {type(logger).__name__}: {err}", stacklevel=2)


_RESTART_MARKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark_resumed_run(trainer: pl.Trainer) -> bool:
    """After a resume, tell TensorBoard that the run restarts at ``trainer.global_step``.

    A run that continues in the same TensorBoard directory after a crash re-runs the steps between its checkpoint and
    the crash. The restart marker (TensorBoard's ``SessionLog.START``, what ``SummaryWriter(purge_step=...)`` writes)
    makes TensorBoard drop the points the interrupted run logged at or after that step, so every series has each
    step exactly once. Written once per trainer, on rank zero, only when training starts past step 0. Returns True
    when written.
    """
    step = trainer.global_step
    if step <= 0 or not trainer.is_global_zero or _RESTART_MARKED.get(trainer) == step:
        return False
    _RESTART_MARKED[trainer] = step
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            file_writer = logger.experiment._get_file_writer()
            file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            file_writer.flush()
            written = True
    return written


def warn_if_no_logger(trainer: pl.Trainer, owner: str) -> bool:
    """Warn once that nothing will be recorded when the trainer has no logger; True if a logger exists."""
    if trainer.loggers:
        return True
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"{owner}: the trainer has no logger, so its values are only kept in trainer.callback_metrics")
    return False


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------------------------- one convex solve
# The solve of one snapshot lives here, importable without Lightning, so that a worker process starts quickly.

#: numeric codes of ``<prefix>/status``
STATUS_CODES = {
    "optimal": 0,
    "optimal_inaccurate": 1,
    "max_iterations": 2,
    "time_limit": 2,
    "failed": 3,
    "nonfinite": 4,
}


@dataclass
class Snapshot:
    """Everything a solve needs, copied on the training thread (safe to hand to another thread)."""

    step: int
    X: Tensor
    Y: Tensor
    hidden_weight: Tensor
    hidden_bias: Tensor | None
    output_weight: Tensor
    output_bias: Tensor | None
    extra_patterns: Tensor | None


@dataclass(frozen=True)
class SolveSpec:
    """How to solve, independent of the callback object (picklable, sent to the worker process)."""

    owner: str
    prefix: str
    value_tag: str
    formulation: str
    solver: str
    gated: bool
    weight_decay: float
    reduction: str
    solver_options: dict[str, Any]
    time_limit: float | None
    warm_key: str | None = None  # warm-start from the last solution stored under this key (see evaluate_snapshot)


@dataclass
class SolveOutcome:
    """The result of one solve: what to log, what to warn about, and the solution when it is to be kept."""

    metrics: dict[str, float]
    messages: list[str] = field(default_factory=list)
    solved: tuple[ConvexProblem, ConvexSolution] | None = None
    error: str | None = None  # the solver's exception, when it raised


def evaluate_snapshot(
    spec: SolveSpec, snap: Snapshot, solve_fn: Callable[..., ConvexSolution], quiet: bool, keep_solution: bool
) -> SolveOutcome:
    """Build, solve and measure one snapshot. Never raises: failures become a status and a message."""
    p = spec.prefix
    owner = spec.owner
    weights = [t for t in (snap.hidden_weight, snap.hidden_bias, snap.output_weight, snap.output_bias)
               if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in weights):
        return SolveOutcome({f"{p}/status": STATUS_CODES["nonfinite"]},
                            [f"{owner}: non-finite network weights at step {snap.step}; no solve"])
    metrics: dict[str, float] = {}
    options = dict(spec.solver_options)
    if spec.time_limit is not None:
        options.setdefault("time_limit", spec.time_limit)
    start = time.perf_counter()
    try:
        Xf = fold_bias(snap.X, snap.hidden_bias is not None)
        Wf = fold_weights(snap.hidden_weight, snap.hidden_bias)
        L = float(network_objective(Xf, snap.Y, Wf, snap.output_weight, snap.output_bias, spec.weight_decay,
                                    spec.reduction))
        metrics[f"{p}/nonconvex_objective"] = L
        problem, point = problem_from_network(
            snap.X, snap.Y, snap.hidden_weight, snap.hidden_bias, snap.output_weight, snap.output_bias,
            weight_decay=spec.weight_decay, reduction=spec.reduction, formulation=spec.formulation,
            extra_patterns=snap.extra_patterns,
        )
        warm = _previous_solution(spec, problem) or point
        if quiet:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # solver chatter; the status is logged instead
                solution = solve_fn(problem, spec.solver, gated=spec.gated, warm_start=warm, **options)
        else:
            solution = solve_fn(problem, spec.solver, gated=spec.gated, warm_start=warm, **options)
        if not isinstance(solution, ConvexSolution):
            raise TypeError(f"the solver returned {type(solution).__name__}, not a ConvexSolution")
        _keep_solution(spec, problem, solution)
        seconds = time.perf_counter() - start
        return _measure(spec, snap, problem, point, solution, L, seconds, metrics, keep_solution)
    except Exception as err:  # noqa: BLE001 - a failed solve must never stop training
        seconds = time.perf_counter() - start
        late = spec.time_limit is not None and seconds >= spec.time_limit
        metrics[f"{p}/status"] = STATUS_CODES["time_limit" if late else "failed"]
        metrics[f"{p}/solve_seconds"] = seconds
        reason = f" after {seconds:.2f} s (time limit {spec.time_limit} s)" if late else ""
        description = f"{type(err).__name__}: {err}"
        return SolveOutcome(metrics, [f"{owner}: convex solve failed at step {snap.step}{reason}: {description}"],
                            error=description)


# The last solution of each chain of solves (SolveSpec.warm_key), in the process that solves: the training process
# or the worker. A few chains at most are kept; an evicted chain starts again from the network's point.
_PREVIOUS_SOLUTIONS: OrderedDict[str, tuple[ConvexProblem, ConvexSolution]] = OrderedDict()
_MAX_CHAINS = 8


def _previous_solution(spec: SolveSpec, problem: ConvexProblem) -> tuple | None:
    """The last solution of ``spec``'s chain carried over to ``problem``'s patterns, or ``None``."""
    previous = _PREVIOUS_SOLUTIONS.get(spec.warm_key) if spec.warm_key is not None else None
    if previous is None:
        return None
    old_problem, old_solution = previous
    if old_problem.X.shape != problem.X.shape or old_problem.c != problem.c or old_solution.gated != spec.gated:
        return None
    return remap_warm_start(old_problem.patterns, old_solution, problem.patterns)


def _keep_solution(spec: SolveSpec, problem: ConvexProblem, solution: ConvexSolution) -> None:
    if spec.warm_key is None or not solution.ok or solution.U is None:
        return
    _PREVIOUS_SOLUTIONS[spec.warm_key] = (problem, solution)
    _PREVIOUS_SOLUTIONS.move_to_end(spec.warm_key)
    while len(_PREVIOUS_SOLUTIONS) > _MAX_CHAINS:
        _PREVIOUS_SOLUTIONS.popitem(last=False)


def _measure(
    spec: SolveSpec, snap: Snapshot, problem: ConvexProblem, point: tuple, solution: ConvexSolution, L: float,
    seconds: float, metrics: dict[str, float], keep_solution: bool,
) -> SolveOutcome:
    p, owner = spec.prefix, spec.owner
    value = solution.value
    if not spec.gated:
        # The network's own point is feasible: p* is never above its value, whatever the solver reached.
        value = min(value, float(problem.objective(*point)))
    status = solution.status if solution.status in STATUS_CODES else "failed"
    if not math.isfinite(value):
        status = "failed"
    messages = []
    if spec.time_limit is not None and seconds > spec.time_limit and status != "failed":
        status = "time_limit"
        messages.append(f"{owner}: the solve of step {snap.step} took {seconds:.2f} s, over the time limit of "
                        f"{spec.time_limit} s")
    elif status != "optimal":
        messages.append(f"{owner}: solver status {solution.status!r} at step {snap.step}")
    metrics.update({
        spec.value_tag: value,
        f"{p}/gap": L - value,
        f"{p}/solve_seconds": seconds,
        f"{p}/active_neurons": active_neurons(problem, solution),
        f"{p}/status": STATUS_CODES[status],
    })
    if solution.relative_gap is not None:
        metrics[f"{p}/duality_gap"] = solution.relative_gap
    solved = (problem, solution) if keep_solution and solution.ok else None
    return SolveOutcome(metrics, messages, solved)


# Data sent once to the worker process, by key (several monitors may share one process's module).
_WORKER_DATA: dict[str, tuple[Tensor, Tensor]] = {}


def store_worker_data(key: str, X: Tensor, Y: Tensor) -> None:
    _WORKER_DATA.clear()  # one training run per worker process
    _WORKER_DATA[key] = (X, Y)


def solve_snapshot_job(
    spec: SolveSpec, snap: Snapshot, data_key: str | None, solve_fn: Callable[..., Any]
) -> SolveOutcome:
    """The worker's job: the snapshot's data is either in it (thread) or stored in the worker process."""
    if data_key is not None:
        X, Y = _WORKER_DATA[data_key]
        snap = replace(snap, X=X, Y=Y)
    # No warnings filter here: it is process-global and would hide the training thread's warnings too.
    return evaluate_snapshot(spec, snap, solve_fn, quiet=False, keep_solution=False)


def active_neurons(problem, solution: ConvexSolution) -> int:
    norms = torch.cat([solution.U.flatten(1).norm(dim=1), solution.V.flatten(1).norm(dim=1)])
    scale = max(float(norms.max()), 1e-30) if norms.numel() else 1.0
    return int((norms > 1e-6 * scale).sum())


# ----------------------------------------------------------------------------------------------- background worker
class WorkerError(RuntimeError):
    """A job failed in the background worker, or the worker went away; the message names the original error."""


class BackgroundWorker:
    """Runs jobs ``fn(*args)`` one at a time, in submission order, away from the training thread.

    Two kinds:

    - ``"process"`` (default): a child Python process started with ``subprocess`` (independent of the user's
      ``__main__``, unlike ``multiprocessing``'s spawn) at a lower CPU priority. It holds its own GIL, so a
      Python-heavy job (building a cvxpy problem) does not slow the training thread down, and it can be killed when a
      job overruns. ``fn`` must be a module-level function and ``args`` picklable; the child starts with the parent's
      ``sys.path``.
    - ``"thread"``: a daemon thread; jobs may be any callable (a monkeypatched function too), but they compete with
      training for the GIL and cannot be killed (an overrunning job is abandoned with its thread).

    Both are daemonic: a stuck job never keeps the interpreter alive at exit. Jobs return :class:`Future` objects; a
    job's exception, or the worker's death, sets a :class:`WorkerError` on its future.
    """

    def __init__(self, kind: str = "process", name: str = "hcl-worker", niceness: int | None = None) -> None:
        if kind not in WORKER_KINDS:
            raise ValueError(f"worker must be one of {WORKER_KINDS}, got {kind!r}")
        self.kind = kind
        self.name = name
        self._niceness = WORKER_NICENESS if niceness is None else niceness
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # future → start time
        self._closed = False
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count()
        if kind == "thread":
            self._thread = threading.Thread(target=self._thread_loop, name=name, daemon=True)
            self._thread.start()
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
                job_id = next(self._ids)
                self._futures[job_id] = future
            self._jobs.put((job_id, fn, args))
        return future

    def started_at(self, future: Future) -> float | None:
        """``time.monotonic()`` when the worker began ``future``'s job, ``None`` while it waits in the queue."""
        return self._started.get(future)

    @property
    def alive(self) -> bool:
        if self._closed:
            return False
        if self.kind == "thread":
            return self._thread.is_alive()
        return self._process is not None and self._process.poll() is None

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
            self._fail_outstanding(WorkerError(f"{self.name}: the worker was closed"), running_too=kill)

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
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        code = _WORKER_BOOTSTRAP.format(niceness=int(self._niceness), job_fd=job_read, result_fd=result_write)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(job_read, result_write), stdin=subprocess.DEVNULL, env=env,
                close_fds=True,
            )
        finally:
            os.close(job_read)
            os.close(result_write)
        _LIVE_PROCESSES.add(self._process)
        self._job_pipe = os.fdopen(job_write, "wb")
        self._result_pipe = os.fdopen(result_read, "rb")
        config = {"sys_path": list(sys.path), "niceness": self._niceness}
        self._jobs.put(("config", config))
        threading.Thread(target=self._writer_loop, name=f"{self.name}-writer", daemon=True).start()
        threading.Thread(target=self._reader_loop, name=f"{self.name}-reader", daemon=True).start()

    def _writer_loop(self) -> None:
        # Pickling and writing happen here, not on the training thread: a full pipe must never block training.
        pipe = self._job_pipe
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    pickle.dump(None, pipe)
                    pipe.flush()
                    return
                if item[0] == "config":
                    pickle.dump(item[1], pipe)
                    pipe.flush()
                    continue
                job_id, fn, args = item
                future = self._futures.get(job_id)
                if future is None or future.cancelled():
                    continue
                try:
                    job = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
                    payload = pickle.dumps((job_id, job), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as err:  # noqa: BLE001 - an unpicklable job fails alone
                    self._pop(job_id)
                    _set_exception(future, WorkerError(
                        f"{self.name}: the job cannot be sent to the worker process ({type(err).__name__}: {err}); "
                        "use module-level functions and picklable arguments, or worker='thread'"))
                    continue
                pipe.write(payload)
                pipe.flush()
        except (OSError, ValueError):
            return  # the child is gone; the reader fails the outstanding futures
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def _reader_loop(self) -> None:
        pipe = self._result_pipe
        try:
            while True:
                try:
                    message = pickle.load(pipe)
                except (EOFError, OSError, pickle.UnpicklingError):
                    break
                kind, job_id = message[0], message[1]
                future = self._futures.get(job_id)
                if future is None:
                    continue
                if kind == "started":
                    if future.set_running_or_notify_cancel():
                        self._started[future] = time.monotonic()
                    continue
                self._pop(job_id)
                if kind == "done":
                    _set_result(future, message[2])
                else:
                    type_name, text, trace = message[2]
                    error = WorkerError(f"{type_name}: {text}")
                    error.worker_traceback = trace
                    _set_exception(future, error)
        finally:
            code = None if self._process is None else self._process.poll()
            reason = "was closed" if self._closed else f"exited unexpectedly (exit code {code})"
            self._fail_outstanding(WorkerError(f"{self.name}: the worker process {reason}"), running_too=True)
            try:
                pipe.close()
            except OSError:
                pass

    def _pop(self, job_id: int) -> None:
        with self._lock:
            self._futures.pop(job_id, None)

    def _fail_outstanding(self, error: Exception, running_too: bool) -> None:
        with self._lock:
            outstanding = list(self._futures.items())
        for job_id, future in outstanding:
            if future.running() and not running_too:
                continue
            self._pop(job_id)
            if not future.cancel():
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


# The worker process's first lines. It lowers its priority before anything else (importing torch and the solvers is
# its heaviest moment), and registers ``hcl`` without running ``hcl/__init__.py``, which imports Lightning: the worker
# only needs ``hcl.convex`` and this module, and starts in half the time. The package's own attributes load on first
# use (a job function defined in a module that does ``from hcl import TwoLayerReLU``).
_WORKER_BOOTSTRAP = """
import importlib.util, os, sys
try:
    os.nice({niceness})
except (AttributeError, OSError):
    pass
spec = importlib.util.find_spec("hcl")
if spec is not None and spec.loader is not None and spec.submodule_search_locations:
    package = importlib.util.module_from_spec(spec)
    def _load_package(name, package=package, spec=spec):
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)
        return getattr(package, name)
    package.__getattr__ = _load_package
    sys.modules["hcl"] = package
from hcl.monitoring import _worker_process_main
_worker_process_main({job_fd}, {result_fd})
"""

_LIVE_PROCESSES: weakref.WeakSet = weakref.WeakSet()


def _terminate(process: subprocess.Popen, grace: float = 2.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _reap(process: subprocess.Popen, timeout: float) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _terminate(process)


@atexit.register
def _kill_live_processes() -> None:
    for process in list(_LIVE_PROCESSES):
        _terminate(process, grace=0.5)


def _worker_process_main(job_fd: int, result_fd: int) -> None:
    """Entry point of the worker process: run the jobs read from ``job_fd``, answer on ``result_fd``."""
    jobs = os.fdopen(job_fd, "rb")
    results = os.fdopen(result_fd, "wb")

    def send(message: tuple) -> None:
        results.write(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        results.flush()

    config = pickle.load(jobs)
    sys.path[:] = config["sys_path"]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # solver chatter; statuses are reported instead
    while True:
        try:
            item = pickle.load(jobs)
        except EOFError:
            return
        if item is None:
            return
        job_id, job = item
        send(("started", job_id))
        try:
            fn, args = pickle.loads(job)  # here, so that a job whose function cannot be imported fails alone
            value = fn(*args)
            payload = pickle.dumps(("done", job_id, value), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            payload = pickle.dumps(("error", job_id, (type(err).__name__, str(err), traceback.format_exc())))
        results.write(payload)
        results.flush()
