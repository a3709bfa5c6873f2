r"""
Convex gap monitor
==================

While a two-layer ReLU network trains, build the convex problem of its current activation patterns, solve it
and log how far the network's own objective is from the convex optimum.

For a scalar output the convex problem is exact: its optimum ``p*`` is the best objective any network with
these patterns reaches, and since the network itself is one of them, ``p* ≤ L`` (the note's invariant 1). The
monitor guarantees this for every logged value: the network's own mapped point is feasible, so the logged
optimum is never above its value even when a solver stops early.

Solves can run in the background (``asynchronous=True``): the training thread only copies the weights; a worker
solves; the results are logged at the step of their snapshot. Under DDP the monitor solves on rank zero only.
"""

from __future__ import annotations

import math
import numbers
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.convex.problem import REDUCTIONS, ConvexProblem, ConvexSolution, fold_bias
from hcl.convex.solve import available_solvers, solve
from hcl.monitoring import (
    STATUS_CODES,
    WORKER_KINDS,
    BackgroundWorker,
    Snapshot,
    SolveOutcome,
    SolveSpec,
    check_every_n_steps,
    check_prefix,
    check_probe_and_target,
    check_weight_decay,
    evaluate_snapshot,
    flush_loggers,
    is_due,
    log_scalars,
    mark_resumed_run,
    resolve_objective,
    solve_snapshot_job,
    store_worker_data,
    training_data,
    warn_if_no_logger,
)
from hcl.network import ReLUStack, find_relu_stack
from hcl.patterns import sample_patterns

FORMULATIONS = ("neurons", "patterns")
WARM_STARTS = ("network", "previous")

#: solver names besides cvxpy's installed conic solvers
GENERIC_SOLVERS = ("auto", "native", "cvxpylayers")

__all__ = ["ConvexGapMonitor", "Snapshot", "STATUS_CODES"]


@dataclass
class _Job:
    step: int
    snapshot: Snapshot
    future: Future


class ConvexGapMonitor(Callback):
    r"""Solve the convex problem of the network's current patterns and log the gap to its objective.

    Logged keys (``<prefix>`` is ``"convex"`` by default), at steps ``0, k, 2k, …`` (``k = every_n_steps``) with
    the weights the training step at that global step computes its loss with:

    - ``<prefix>/optimum`` (scalar output) or ``<prefix>/lower_bound`` (``c > 1``: the note's group-Frobenius
      problem bounds every network with these patterns from below but is not attained in general);
      ``<prefix>/gated_lower_bound`` instead when ``gated=True`` (the gated relaxation, a cheaper lower bound);
    - ``<prefix>/nonconvex_objective``: the network's ``L`` on the same data at the same scale;
    - ``<prefix>/gap``: ``L − p*`` (never negative up to solver tolerance);
    - ``<prefix>/solve_seconds``: wall time of the solve;
    - ``<prefix>/active_neurons``: neurons of the mapped convex solution (nonzero blocks);
    - ``<prefix>/duality_gap``: the solver's certified relative gap, where it gives one;
    - ``<prefix>/status``: ``0`` optimal, ``1`` inaccurate, ``2`` iteration/time limit, ``3`` failed, ``4``
      non-finite weights (no solve). A failure also raises a warning; training goes on.
    - ``<prefix>/skipped`` (asynchronous mode): how many snapshots were skipped so far because the solver fell
      behind, logged at each skipped step.

    The formulation is written to the run's hyper-parameters as ``<prefix>/formulation``.

    Two formulations:

    - ``"neurons"``: one variable per neuron, constrained to the neuron's pattern, with the sign of its output
      weight fixed — the problem the seed solved at every step: the local minimum gradient descent would reach if
      every neuron kept its pattern and its output sign.
    - ``"patterns"``: a ``(u, v)`` pair per unique pattern — the exact convex reformulation of every network with
      these patterns (much lower: with many patterns it often reaches 0).

    ``λ`` and the reduction: the callback's ``weight_decay`` / ``reduction`` arguments when given, else the
    model's ``weight_decay`` / ``reduction`` attributes (as :class:`hcl.TwoLayerReLU` has), else ``λ = 0`` and
    ``"mean"`` with a warning.

    Asynchronous solving (``asynchronous=True``): at a due step the training thread copies the weights to the CPU
    and queues the snapshot; one background worker solves the snapshots in order; finished results are logged at
    their snapshot's step from the training thread (TensorBoard accepts the out-of-order steps). When
    ``max_pending`` snapshots are already waiting, the new one is skipped and counted in ``<prefix>/skipped``. The
    queue is drained when training ends and cancelled when it fails. A checkpoint waits for the solves in flight,
    so that what it records as done has been logged (checkpoint less often than every step to keep training
    unblocked). The worker is a low-priority child process by default (``worker="process"``: no competition for the
    GIL, and an overrunning solve is killed); ``worker="thread"`` runs in this process.

    Under DDP every rank takes part in the data gathering (and, with ``load_solution``, in the broadcast of the new
    weights); rank zero alone solves and logs.

    Args:
        every_n_steps: solve period in global steps.
        formulation: ``"neurons"`` or ``"patterns"``.
        solver: ``"auto"``, ``"native"``, ``"cvxpylayers"`` or an installed cvxpy solver (``"clarabel"``, ``"ecos"``,
            ...).
        sampled_patterns: ``K`` Gaussian-gate patterns added to the network's own at each solve (drawn from ``seed``
            and the step, so a resumed or distributed run samples the same ones).
        gated: solve the gated relaxation instead (a lower bound, no cone constraints).
        weight_decay: ``λ``; ``None`` reads the model's.
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.
        probe: inputs to build the problem on (default: the training set); ``target`` must come with it.
        target: targets for ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        load_solution: after each solve, replace the network's weights by the mapped convex solution. **This
            changes training**: the network jumps to the convex optimum of its patterns. Not with ``asynchronous``.
        solver_options: extra keyword arguments for the solver.
        prefix: tag prefix, so that two monitors (e.g. both formulations) can log side by side.
        seed: seed of the sampled patterns.
        max_samples: use only the first ``max_samples`` samples.
        asynchronous: solve in a background worker instead of on the training thread.
        max_pending: asynchronous mode: most snapshots queued or being solved at once; more are skipped.
        solve_time_limit: seconds a solve may take; passed to the solver, and a later result is logged with status
            ``2``. In asynchronous mode a solve still running well past it is abandoned (its process killed).
        raise_worker_errors: asynchronous mode: re-raise a failed solve on the training thread (stopping training)
            instead of warning.
        worker: ``"process"`` or ``"thread"`` (see above).
        warm_start: where the native solver starts: ``"network"``, the network's own mapped point; or
            ``"previous"``, the last solved snapshot's solution carried over to the new patterns by
            :func:`hcl.convex.native.remap_warm_start` (each pattern takes its nearest old pattern's block, with its
            multipliers), and the network's point at the first snapshot of a run. cvxpy's solvers take no warm
            start.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack, or data of the wrong
            width; at the start of training, on a model whose output is not that of the stack.
        TypeError: on arguments of the wrong type.

    Example::

        trainer = Trainer(callbacks=[ConvexGapMonitor(every_n_steps=1, asynchronous=True, solve_time_limit=5.0)])
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        formulation: Literal["neurons", "patterns"] = "patterns",
        solver: str = "auto",
        sampled_patterns: int = 0,
        gated: bool = False,
        weight_decay: float | None = None,
        reduction: Literal["sum", "mean"] | None = None,
        probe: Tensor | None = None,
        target: Tensor | None = None,
        layer: str | None = None,
        output_layer: str | None = None,
        load_solution: bool = False,
        solver_options: dict[str, Any] | None = None,
        prefix: str = "convex",
        seed: int = 0,
        max_samples: int | None = None,
        asynchronous: bool = False,
        max_pending: int = 2,
        solve_time_limit: float | None = None,
        raise_worker_errors: bool = False,
        worker: Literal["process", "thread"] = "process",
        warm_start: Literal["network", "previous"] = "network",
    ) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        self.solver = _check_solver(solver)
        if not _is_int(sampled_patterns) or sampled_patterns < 0:
            raise ValueError(f"sampled_patterns must be an integer ≥ 0, got {sampled_patterns!r}")
        if weight_decay is not None:
            weight_decay = check_weight_decay(weight_decay)
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.probe, self.target = check_probe_and_target(probe, target)
        if max_samples is not None and (not _is_int(max_samples) or max_samples < 1):
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        check_prefix(prefix)
        if solver_options is not None and not isinstance(solver_options, Mapping):
            raise TypeError(f"solver_options must be a dict of keyword arguments, got {type(solver_options).__name__}")
        for name, flag in (("gated", gated), ("load_solution", load_solution), ("asynchronous", asynchronous),
                           ("raise_worker_errors", raise_worker_errors)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if not _is_int(max_pending) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
        if solve_time_limit is not None:
            if not isinstance(solve_time_limit, numbers.Real) or isinstance(solve_time_limit, bool):
                raise TypeError(f"solve_time_limit must be a number of seconds or None, got {solve_time_limit!r}")
            if not math.isfinite(solve_time_limit) or solve_time_limit <= 0:
                raise ValueError(f"solve_time_limit must be a positive number of seconds, got {solve_time_limit}")
        if worker not in WORKER_KINDS:
            raise ValueError(f"worker must be one of {WORKER_KINDS}, got {worker!r}")
        if asynchronous and load_solution:
            raise ValueError("load_solution cannot be used with asynchronous=True: a solution that arrives steps later "
                             "would overwrite newer weights")
        if not _is_int(seed):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {warm_start!r}")
        self.formulation = formulation
        self.sampled_patterns = sampled_patterns
        self.gated = gated
        self.weight_decay = weight_decay
        self.reduction = reduction
        self.layer = layer
        self.output_layer = output_layer
        self.load_solution = load_solution
        self.solver_options = dict(solver_options or {})
        self.prefix = prefix
        self.seed = seed
        self.max_samples = max_samples
        self.asynchronous = asynchronous
        self.max_pending = max_pending
        self.solve_time_limit = None if solve_time_limit is None else float(solve_time_limit)
        self.raise_worker_errors = raise_worker_errors
        self.worker = worker
        self.warm_start = warm_start
        self._warm_key: str | None = None  # names this run's chain of solutions where the solves run
        self._last_step = -1
        self._skipped = 0
        self._stack: ReLUStack | None = None
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        self._lambda = 0.0
        self._reduction = "mean"
        # Asynchronous state, created on rank zero when training starts (never in __init__: ddp_spawn pickles us).
        self._worker: BackgroundWorker | None = None
        self._jobs: deque[_Job] = deque()
        self._data_key: str | None = None
        self._X_cpu: Tensor | None = None
        self._Y_cpu: Tensor | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): built once.
        if getattr(self, "_state_key", None) is None:
            self._state_key = self._generate_state_key(prefix=self.prefix, every_n_steps=self.every_n_steps)
        return self._state_key

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stack = find_relu_stack(pl_module, self.layer, self.output_layer)
        if self.probe is not None:
            self._stack.inputs(self.probe)
            self._check_target_width(self.target)
        self._lambda, self._reduction = resolve_objective(pl_module, self.weight_decay, self.reduction,
                                                          type(self).__name__)
        p = self.prefix
        value_tag = self._value_tag(self._stack.output.out_features)
        dashboard.register_charts(
            trainer, "hcl", {"objective vs convex optimum": ["train/objective", f"{p}/nonconvex_objective",
                                                             value_tag],
                             "convex gap": [f"{p}/gap"]},
        )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        warn_if_no_logger(trainer, type(self).__name__)
        dashboard.write_layout(trainer)
        mark_resumed_run(trainer)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams({f"{self.prefix}/formulation": self.formulation,
                                        f"{self.prefix}/solver": self.solver})
        X, Y = training_data(trainer, self.probe, self.target, self.max_samples)
        if Y is None:
            raise ValueError(f"{type(self).__name__} needs targets: the training data has none (pass target=)")
        self._X = self._stack.inputs(X)
        _check_forward(pl_module, self._stack, self._X)
        self._check_target_width(Y)
        self._Y = _as_targets(Y, self._stack.output.out_features, self._X)
        self._trainer = trainer
        self._warm_key = uuid.uuid4().hex if self.warm_start == "previous" else None
        if self.asynchronous and trainer.is_global_zero:
            self._X_cpu = self._X.detach().to("cpu", copy=True)
            self._Y_cpu = self._Y.detach().to("cpu", copy=True)
            self._start_worker()

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self._jobs:
            self._collect(trainer)
        step = trainer.global_step
        if not is_due(step, self.every_n_steps, self._last_step):
            return
        self._last_step = step
        distributed_load = self.load_solution and trainer.world_size > 1
        if not trainer.is_global_zero:
            if distributed_load:
                self._apply(trainer.strategy.broadcast(None, src=0))  # collective: every rank, every due step
            return
        snapshot = self._snapshot(step)
        if self.asynchronous:
            self._submit(trainer, snapshot)
            return
        metrics, solved = self.evaluate(snapshot)
        log_scalars(trainer, metrics, step)
        if self.load_solution:
            weights = None if solved is None else self._mapped_weights(*solved)
            if distributed_load:
                weights = trainer.strategy.broadcast(weights, src=0)
            self._apply(weights)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._jobs:
            self._collect(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._worker is not None or self._jobs:
            self._collect(trainer, wait=True)
            self._stop_worker(kill=False)
            flush_loggers(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self._worker is not None or self._jobs:
            try:
                self._collect(trainer, raise_errors=False)  # keep what is already solved
            finally:
                self._jobs.clear()  # the rest is cancelled: a resumed run re-solves those steps
                self._stop_worker(kill=True)
        flush_loggers(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._jobs.clear()
        self._stop_worker(kill=True)
        self._trainer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._jobs and self._trainer is not None:
            # A checkpoint is a consistent cut: every step it records as done has been logged.
            self._collect(self._trainer, wait=True)
        return {"last_step": self._last_step, "skipped": self._skipped}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self._skipped = state_dict.get("skipped", 0)

    # -------------------------------------------------------------- the solve
    def evaluate(self, snap: Snapshot) -> tuple[dict[str, float], tuple[ConvexProblem, ConvexSolution] | None]:
        """Build, solve and measure one snapshot; never raises (failures become a status and a warning).

        Returns the metrics to log and, when the solve succeeded, the problem and its solution.
        """
        spec = self._spec(snap.output_weight.shape[0])
        outcome = evaluate_snapshot(spec, snap, solve, quiet=True, keep_solution=True)
        for message in outcome.messages:
            rank_zero_warn(message)
        return outcome.metrics, outcome.solved

    def _spec(self, out_features: int) -> SolveSpec:
        return SolveSpec(
            owner=type(self).__name__, prefix=self.prefix, value_tag=self._value_tag(out_features),
            formulation=self.formulation, solver=self.solver, gated=self.gated, weight_decay=self._lambda,
            reduction=self._reduction, solver_options=dict(self.solver_options), time_limit=self.solve_time_limit,
            warm_key=self._warm_key,
        )

    # ------------------------------------------------------------ asynchronous
    def _start_worker(self) -> None:
        kind = self.worker
        if kind == "process" and os.name != "posix":
            # The worker process inherits its pipes by descriptor number, which only POSIX systems offer.
            rank_zero_warn(f"{type(self).__name__}: worker='process' needs a POSIX system; solving in a thread")
            kind = self.worker = "thread"
        self._worker = BackgroundWorker(kind, name=f"hcl-{self.prefix}-solver")
        self._data_key = None
        if kind == "process":
            # The data goes to the worker process once; snapshots carry only the weights.
            self._data_key = uuid.uuid4().hex
            self._worker.submit(store_worker_data, self._data_key, self._X_cpu, self._Y_cpu)

    def _stop_worker(self, kill: bool) -> None:
        if self._worker is not None:
            self._worker.close(kill=kill)
            self._worker = None

    def _submit(self, trainer: "pl.Trainer", snapshot: Snapshot) -> None:
        if len(self._jobs) >= self.max_pending:
            self._skipped += 1
            log_scalars(trainer, {f"{self.prefix}/skipped": self._skipped}, snapshot.step)
            return
        self._jobs.append(_Job(snapshot.step, snapshot, self._send(snapshot)))

    def _send(self, snapshot: Snapshot) -> Future:
        spec = self._spec(snapshot.output_weight.shape[0])
        if self._worker is None:
            self._start_worker()
        if self._data_key is not None:
            snapshot = replace(snapshot, X=None, Y=None)
        return self._worker.submit(solve_snapshot_job, spec, snapshot, self._data_key, solve)

    def _collect(self, trainer: "pl.Trainer", wait: bool = False, raise_errors: bool = True) -> None:
        """Log the finished solves in snapshot order; with ``wait``, until none is left."""
        while self._jobs:
            job = self._jobs[0]
            if not job.future.done():
                overrun = self._overrun(job)
                if overrun is not None:
                    self._abandon(trainer, overrun)
                    continue
                if not wait:
                    return
                try:
                    job.future.result(timeout=0.2)
                except FutureTimeout:
                    continue
                except Exception:  # noqa: BLE001 - read again below
                    pass
            self._jobs.popleft()
            self._finish(trainer, job, raise_errors)

    def _finish(self, trainer: "pl.Trainer", job: _Job, raise_errors: bool) -> None:
        p = self.prefix
        try:
            outcome = job.future.result()
        except Exception as err:  # noqa: BLE001 - the worker itself failed (died, could not run the job)
            outcome = SolveOutcome({f"{p}/status": STATUS_CODES["failed"]},
                               [f"{type(self).__name__}: the background solve of step {job.step} failed: {err}"],
                               error=str(err))
        log_scalars(trainer, outcome.metrics, job.step)
        if raise_errors and self.raise_worker_errors and outcome.error is not None:
            raise RuntimeError(f"{type(self).__name__}: the background solve of step {job.step} failed: "
                               f"{outcome.error}")
        for message in outcome.messages:
            rank_zero_warn(message)

    def _overrun(self, job: _Job) -> float | None:
        """Seconds the job has been running when that is well past the time limit, else None."""
        if self.solve_time_limit is None or self._worker is None:
            return None
        started = self._worker.started_at(job.future)
        if started is None:
            return None
        elapsed = time.monotonic() - started
        # The solver is told the limit; only one that ignores it reaches this margin.
        return elapsed if elapsed > self.solve_time_limit + max(1.0, 0.5 * self.solve_time_limit) else None

    def _abandon(self, trainer: "pl.Trainer", elapsed: float) -> None:
        job = self._jobs.popleft()
        p = self.prefix
        log_scalars(trainer, {f"{p}/status": STATUS_CODES["time_limit"], f"{p}/solve_seconds": elapsed}, job.step)
        rank_zero_warn(f"{type(self).__name__}: the solve of step {job.step} was still running after {elapsed:.1f} s "
                       f"(time limit {self.solve_time_limit} s): abandoned")
        # A fresh worker (started on demand) takes the queue over; the stuck one is killed (process) or left to
        # finish alone (thread).
        self._stop_worker(kill=True)
        for queued in self._jobs:
            queued.future = self._send(queued.snapshot)

    # ---------------------------------------------------------------- helpers
    def _snapshot(self, step: int) -> Snapshot:
        hidden_weight, hidden_bias, output_weight, output_bias = self._stack.weights()
        # Asynchronous snapshots are CPU copies: the worker never touches the training device or live tensors.
        device = "cpu" if self.asynchronous else None

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device=device, copy=True)

        extra = None
        if self.sampled_patterns:
            generator = torch.Generator(device="cpu").manual_seed(_step_seed(self.seed, step))
            extra = sample_patterns(fold_bias(self._X, hidden_bias is not None).cpu(), self.sampled_patterns,
                                    generator=generator)
            extra = extra if self.asynchronous else extra.to(self._X.device)
        X, Y = (self._X_cpu, self._Y_cpu) if self.asynchronous else (self._X, self._Y)
        return Snapshot(step, X, Y, copy(hidden_weight), copy(hidden_bias), copy(output_weight), copy(output_bias),
                        extra)

    def _value_tag(self, out_features: int) -> str:
        if self.gated:
            return f"{self.prefix}/gated_lower_bound"
        return f"{self.prefix}/optimum" if out_features == 1 else f"{self.prefix}/lower_bound"

    def _check_target_width(self, Y: Tensor) -> None:
        c = self._stack.output.out_features
        if Y.is_floating_point() and Y.ndim == 2 and Y.shape[1] != c:
            raise ValueError(f"the targets have {Y.shape[1]} columns but the model's output layer has {c} outputs")
        if Y.ndim > 2:
            raise ValueError(f"the targets must be (n,) or (n, c), got shape {tuple(Y.shape)}")

    def _mapped_weights(self, problem: ConvexProblem, solution: ConvexSolution) -> tuple[Tensor, ...] | None:
        """The network weights ``(W̃, A, b₀)`` of the convex solution on the CPU, or None if they do not fit."""
        try:
            W, A, b0 = problem.to_network(solution.U, solution.V, solution.b0)
        except Exception as err:  # noqa: BLE001 - under DDP the other ranks wait for these weights: never raise
            rank_zero_warn(f"{type(self).__name__}: the convex solution could not be mapped to network weights "
                           f"({type(err).__name__}: {err}); weights not loaded")
            return None
        width = self._stack.hidden.out_features
        if W.shape[0] > width:
            rank_zero_warn(f"{type(self).__name__}: the convex solution needs {W.shape[0]} neurons but the network "
                           f"has {width}; weights not loaded")
            return None
        return W.detach().cpu(), A.detach().cpu(), None if b0 is None else b0.detach().cpu()

    @torch.no_grad()
    def _apply(self, weights: tuple[Tensor, ...] | None) -> None:
        """Replace the network's weights by mapped convex weights (zero-padded to the network's width)."""
        if weights is None:
            return
        W, A, b0 = weights
        stack, hidden = self._stack, self._stack.hidden
        k = W.shape[0]
        hidden.weight.zero_()
        stack.output.weight.zero_()
        hidden.weight[:k] = W[:, : hidden.in_features].to(hidden.weight)
        if hidden.bias is not None:
            hidden.bias.zero_()
            hidden.bias[:k] = W[:, -1].to(hidden.bias)
        stack.output.weight[:, :k] = A.to(stack.output.weight)
        if stack.output.bias is not None and b0 is not None:
            stack.output.bias.copy_(b0.to(stack.output.bias))


# ---------------------------------------------------------------------------------------------------- helpers
def _check_forward(pl_module: "pl.LightningModule", stack: ReLUStack, X: Tensor, rows: int = 8) -> None:
    """Refuse a model whose output is not ``relu(X W̃ᵀ) Aᵀ + b₀`` of its stack (deeper nets, extra layers, scaling).

    The convex problem describes the stack only; a model that computes something else would get meaningless numbers.
    A model whose forward does not take a plain input tensor cannot be checked and is let through.
    """
    sample = X[:rows]
    weight, bias, output_weight, output_bias = stack.weights()
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    try:
        with torch.no_grad():
            expected = torch.relu(F.linear(sample, weight, bias))
            expected = F.linear(expected, output_weight, output_bias)
            try:
                actual = pl_module(sample)
            except Exception:  # noqa: BLE001 - e.g. a forward that expects a dict batch: nothing to compare
                return
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not isinstance(actual, Tensor) or actual.numel() != expected.numel():
        shape = tuple(actual.shape) if isinstance(actual, Tensor) else type(actual).__name__
        raise ValueError(
            f"the model's output ({shape}) is not that of its two-layer ReLU stack {stack.name!r} "
            f"({tuple(expected.shape)}): the convex problem describes a network Linear → ReLU → Linear only"
        )
    actual = actual.reshape(expected.shape).to(expected)
    if not (torch.isfinite(expected).all() and torch.isfinite(actual).all()):
        return  # non-finite weights are reported at each solve instead
    scale = expected.abs().max().clamp_min(1e-12)
    tolerance = 1e-4 if expected.dtype == torch.float64 else 1e-3
    if float((actual - expected).abs().max() / scale) > tolerance:
        raise ValueError(
            f"the model's output differs from that of its two-layer ReLU stack {stack.name!r} (hidden layer → ReLU → "
            "output layer): a deeper network, extra layers or a scaled output? The convex problem describes a network "
            "Linear → ReLU → Linear only; name another stack with layer=/output_layer=, or use a two-layer model"
        )


def _check_solver(solver: str) -> str:
    if not isinstance(solver, str) or not solver:
        raise ValueError(f"solver must be a solver name, got {solver!r}")
    name = solver.lower()
    if name in GENERIC_SOLVERS:
        return name
    known = available_solvers()
    if name not in known:
        raise ValueError(f"unknown solver {solver!r}: use one of {known}")
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _as_targets(Y: Tensor, out_features: int, like: Tensor) -> Tensor:
    if out_features > 1 and not Y.is_floating_point():
        return F.one_hot(Y.long().reshape(-1), out_features).to(like)
    Y = Y.to(like)
    return Y.reshape(Y.shape[0], -1)
