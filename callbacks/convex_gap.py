r"""
Convex gap monitor
==================

While a two-layer ReLU network trains, build the convex problem of its current activation patterns, solve it
and log how far the network's own objective is from the convex optimum.

For a scalar output the convex problem is exact: its optimum ``p*`` is the best objective any network with
these patterns reaches, and since the network itself is one of them, ``p* ≤ L`` (invariant 1 of
``docs/convex.md#invariants``). The monitor logs what the solve proves and nothing more: the optimum only when the
solver certified it, otherwise the bracket ``lower_bound ≤ p* ≤ upper_bound`` and the status. No value is capped
(``docs/dashboards.md`` says what each tag means and when it is certified).

Solves can run in the background (``asynchronous=True``): the training thread only copies the weights (and draws
the ``sampled_patterns``, for the snapshots the queue takes); a worker
solves (:class:`hcl.callbacks.solve_queue.SolveQueue`); the results are logged at the step of their snapshot. Under
DDP the monitor solves on rank zero only.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.callbacks.base import StackCallback, objective_tags
from hcl.callbacks.logs import flush_loggers, log_scalars
from hcl.callbacks.monitor_options import (
    check_for_outputs,
    check_monitor_arguments,
    proved_tags,
    warn_about_monitored_tags,
    warn_if_checkpoints_wait,
)
from hcl.callbacks.solve_queue import SolveQueue
from hcl.checks import check_seed
from hcl.convex import solve
from hcl.convex.problem import ConvexProblem, ConvexSolution, as_targets, float64_device, fold_bias
from hcl.convex.snapshot import Snapshot, SolveSpec, WarmStartChain, evaluate_snapshot
from hcl.patterns import sample_patterns

__all__ = ["ConvexGapMonitor"]


class ConvexGapMonitor(StackCallback):
    r"""Solve the convex problem of the network's current patterns and log the gap to its objective.

    Logged keys (``<prefix>`` is ``"convex"`` by default), at steps ``0, k, 2k, …`` (``k = every_n_steps``) with
    the weights the training step at that global step computes its loss with:

    - ``<prefix>/nonconvex_objective``: the network's ``L`` on the same data at the same scale;
    - ``<prefix>/optimum`` (scalar output, not gated): the solver's value, only when the status is optimal (a
      certified gap) and no known value contradicts it; ``<prefix>/gap``: ``L − optimum``, logged with it;
    - ``<prefix>/upper_bound`` (scalar output, not gated): the best feasible value known — the solver's value when its
      point is feasible, or the convex objective at the network's own mapped point — so ``p* ≤ upper_bound ≤ L``;
    - ``<prefix>/lower_bound`` (not gated): the solver's certified dual value, when it gives one (never its primal
      value): below every network with these patterns (for ``c > 1`` through the group-Frobenius problem of
      ``docs/convex.md``, which bounds them but is not attained in general);
    - ``<prefix>/gated_optimum`` and ``<prefix>/gated_network_bound`` when ``gated=True``: the gated relaxation's
      certified optimum and its certified dual value. Both are lower bounds on every ReLU network with these
      patterns (such a network is a gated network with its patterns as gates); for ``c > 1`` they are **not** lower
      bounds on the exact convex problem's optimum;
    - ``<prefix>/max_gap``: ``L − lower_bound`` (or ``L − gated_network_bound``): the network is at most that far
      above the best network with its patterns;
    - ``<prefix>/solve_seconds``: wall time of the solve;
    - ``<prefix>/active_neurons``: neurons of the network the convex solution maps to — one per nonzero column of a
      ``u`` or ``v`` block, up to ``2Pc``, so it can exceed the trained network's width;
    - ``<prefix>/duality_gap``: the bracket's certified relative width ``(upper − lower) / max(|upper|, floor)``
      (floor ``ConvexProblem.gap_floor``, in the data's units), with both ends;
    - ``<prefix>/status``: ``0`` optimal, ``1`` inaccurate (or an optimal claim that a known value refutes, with a
      warning), ``2`` iteration/time limit, ``3`` failed, ``4`` non-finite weights (no solve). A failure also raises
      a warning; training goes on.
    - ``<prefix>/skipped`` (asynchronous mode): how many snapshots were skipped so far because the solver fell
      behind (or the run failed before they were solved), logged at each skipped step.

    The formulation and the solver are written once, as TensorBoard's text ``<prefix>/setup`` (as hyper-parameters
    ``<prefix>/formulation`` and ``<prefix>/solver`` for other loggers).

    Two formulations:

    - ``"neurons"``: one variable per neuron, constrained to the neuron's pattern, with the sign of its output
      weight fixed: the local minimum gradient descent would reach if every neuron kept its pattern and its
      output sign.
    - ``"patterns"``: a ``(u, v)`` pair per unique pattern — the exact convex reformulation of every network with
      these patterns (much lower: with many patterns it often reaches 0).

    ``λ`` and the reduction: the callback's ``weight_decay`` / ``reduction`` arguments when given, else the
    model's ``weight_decay`` / ``reduction`` attributes (as :class:`hcl.TwoLayerReLU` has), else ``λ = wd / 2`` from
    the optimizer's coupled ``weight_decay`` (an info line; AdamW's is left out, warned), else 0 (``"mean"``, warned);
    ``B`` times that for a model of one's own summing ``B`` mini-batches an epoch (``docs/convex.md``).

    Asynchronous solving (``asynchronous=True``): at a due step the training thread copies the weights to the CPU
    and queues the snapshot; one background worker solves the snapshots in order; finished results are logged at
    their snapshot's step from the training thread (TensorBoard accepts the out-of-order steps). When
    ``max_pending`` snapshots are already waiting, the new one is skipped and counted in ``<prefix>/skipped``. The
    queue is drained when training ends and cancelled (counted as skipped) when it fails. A checkpoint waits for the
    solves in flight, so that what it records as done has been logged (checkpoint less often than every step to keep
    training unblocked). The worker is a low-priority child process by default (``worker="process"``: no competition
    for the GIL, and an overrunning solve is killed); ``worker="thread"`` runs in this process.

    Under DDP every rank takes part in the data gathering (and, with ``load_solution``, in the broadcast of the new
    weights); rank zero alone solves and logs.

    Args:
        every_n_steps: solve period in global steps.
        formulation: ``"neurons"`` or ``"patterns"``.
        solver: ``"auto"``, ``"native"``, ``"cvxpylayers"`` or an installed cvxpy solver (``"clarabel"``, ``"ecos"``,
            ...).
        sampled_patterns: ``K`` Gaussian-gate patterns added to the network's own at each solve (drawn from ``seed``
            and the step, so a resumed or distributed run samples the same ones).
        gated: solve the gated relaxation instead (no cone constraints; a lower bound on the networks with these
            patterns, not on the exact problem for ``c > 1``).
        weight_decay: ``λ``; ``None`` reads the model's.
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.
        probe: inputs to build the problem on (default: the training set); ``target`` must come with it.
        target: targets for ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        load_solution: after each solve, replace the network's weights by the mapped convex solution
            (:meth:`hcl.network.ReLUStack.load_weights`). **This changes training**: the network jumps to the convex
            optimum of its patterns. Not with ``asynchronous`` nor ``gated``, and for one output only.
        solver_options: extra keyword arguments for the solver, checked here (their names, and the native
            solver's values: :func:`hcl.convex.check_solver_options`).
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
            multipliers), and the network's point at the first snapshot of a run or, for the interior point, when
            most patterns are new (the ADMM keeps it: 310 iterations instead of 1 110 one MNIST step apart,
            ``docs/solvers.md#warm-starts-of-the-admm``). cvxpy's solvers take no warm start.

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
        super().__init__(every_n_steps, probe=probe, target=target, layer=layer, output_layer=output_layer,
                         max_samples=max_samples, prefix=prefix, weight_decay=weight_decay, reduction=reduction)
        self.solver, solve_time_limit = check_monitor_arguments(
            formulation=formulation, solver=solver, sampled_patterns=sampled_patterns, gated=gated,
            load_solution=load_solution, solver_options=solver_options, seed=seed, asynchronous=asynchronous,
            max_pending=max_pending, solve_time_limit=solve_time_limit, raise_worker_errors=raise_worker_errors,
            worker=worker, warm_start=warm_start)
        self.formulation = formulation
        self.sampled_patterns = sampled_patterns
        self.gated = gated
        self.load_solution = load_solution
        self.solver_options = dict(solver_options or {})
        self.seed = check_seed(seed)  # a numpy integer as an int (it seeds torch's generator)
        self.asynchronous = asynchronous
        self.max_pending = max_pending
        self.solve_time_limit = solve_time_limit
        self.raise_worker_errors = raise_worker_errors
        self.worker = worker
        self.warm_start = warm_start
        self._skipped = self._retaken = 0  # cancelled snapshots; of them, at steps a resume takes again
        self.changed_weights_at: int | None = None  # the step load_solution last replaced the weights at
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        # Run state, created when training starts (never in __init__: ddp_spawn pickles the callbacks).
        self._chain: WarmStartChain | None = None  # this run's chain of solutions, with warm_start="previous"
        self._queue: SolveQueue | None = None  # asynchronous mode, rank zero
        self._failure: str | None = None  # raise_worker_errors: a failure collected, raised before the next step
        self._X_cpu: Tensor | None = None
        self._Y_cpu: Tensor | None = None
        self._trainer: pl.Trainer | None = None

    @override
    def reset(self) -> None:
        super().reset()
        self._skipped = self._retaken = 0
        self.changed_weights_at = None

    # ------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.target is not None:  # its shape and labels against the model's outputs, before training
            as_targets(self.target, self._stack.output.out_features, torch.empty(0))
        check_for_outputs(type(self).__name__, self.solver, self._stack.output.out_features, self.load_solution)
        p = self.prefix
        dashboard.register_charts(
            trainer, "hcl",
            {"objective vs convex optimum": [*objective_tags(pl_module), f"{p}/nonconvex_objective",
                                             *self._value_tags()],
             # <p>/gap comes with <p>/optimum: of the exact problem with one output only
             "convex gap": [*([f"{p}/gap"] if f"{p}/optimum" in self._value_tags() else []), f"{p}/max_gap"]},
        )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:
            setup = {f"{self.prefix}/formulation": self.formulation, f"{self.prefix}/solver": self.solver}
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # a text, not hyper-parameters: TensorBoard shows only a run's first hyper-parameter record,
                    # Lightning's own
                    text = ", ".join(f"{key.split('/')[1]}: {value}" for key, value in setup.items())
                    logger.experiment.add_text(f"{self.prefix}/setup", text, global_step=trainer.global_step)
                else:
                    logger.log_hyperparams(setup)
        X, Y = self.training_data(trainer)
        where = float64_device(X.device)  # solves need float64 (MPS has none)
        self._X, self._Y = X.to(where), as_targets(Y, self._stack.output.out_features, X).to(where)
        self._trainer, self._failure = trainer, None
        self._chain = WarmStartChain() if self.warm_start == "previous" else None
        warn_about_monitored_tags(trainer, type(self).__name__, self.prefix, self.asynchronous)
        if self.asynchronous and trainer.is_global_zero:
            warn_if_checkpoints_wait(trainer, self._owner, self.every_n_steps)
            self._X_cpu, self._Y_cpu = (t.detach().to("cpu", copy=True) for t in (self._X, self._Y))
            self._queue = SolveQueue(owner=self._owner, worker=self.worker, max_pending=self.max_pending,
                                     time_limit=self.solve_time_limit, X=self._X_cpu, Y=self._Y_cpu,
                                     name=f"hcl-{self.prefix}-solver", chain=self._chain)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._collect(trainer)
        self._raise_failure()  # here, not at a batch's end: the step it stops at is not done, and a resume takes it
        step = self.due_step(trainer)
        if step is None:
            return
        distributed_load = self.load_solution and trainer.world_size > 1
        if not trainer.is_global_zero:
            if distributed_load:
                self._apply(trainer.strategy.broadcast(None, src=0))  # collective: every rank, every due step
            return
        if self._queue is not None:  # a full queue skips before the snapshot: sampling patterns takes seconds
            if self._queue.full or not self._queue.submit(self._spec(), self._snapshot(step)):
                self._skipped += 1
                log_scalars(trainer, {f"{self.prefix}/skipped": self._skipped}, step)
            return
        snapshot = self._snapshot(step)
        metrics, solved = self.evaluate(snapshot)
        log_scalars(trainer, metrics, step, proved_tags(self.prefix))
        if self.load_solution:
            weights = self._solution_weights(solved)
            if distributed_load:
                weights = trainer.strategy.broadcast(weights, src=0)
            self._apply(weights)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collect(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._queue is not None:
            if len(self._queue):  # training is over and the bar stands still: say what it waits for
                limit = "" if self.solve_time_limit is None else f", each at most {self.solve_time_limit:g} s"
                rank_zero_info(f"{self._owner}: waiting for {len(self._queue)} background solve(s){limit}")
            self._collect(trainer, wait=True)
            self._close_queue(kill=False)
            flush_loggers(trainer)
        self._raise_failure()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self._queue is not None:
            # Nothing here may raise: the run's own error is the one to raise, and Lightning skips the rest of its
            # clean-up (the other callbacks, the loggers, teardown) after an on_exception that raises
            unlogged = None
            try:
                try:
                    self._collect(trainer, raise_errors=False)  # keep what is already solved
                except Exception as err:  # noqa: BLE001 - a log dir deleted under the run, say
                    unlogged = err
                if self._failure is not None:  # collected for raise_worker_errors, but another error came first
                    rank_zero_warn(self._failure)
                    self._failure = None
            finally:  # also after a second Ctrl-C
                # the rest is dropped and counted as skipped: a checkpoint written now (OnExceptionCheckpoint) has
                # passed their steps, and one written before them leaves them to the resumed run
                for step in self._queue.cancel():
                    self._skipped += 1
                    self._retaken += step > self.finished_step()  # a checkpoint now leaves it to the resumed run
                    try:
                        log_scalars(trainer, {f"{self.prefix}/skipped": self._skipped}, step)
                    except Exception as err:  # noqa: BLE001
                        unlogged = err
                self._close_queue(kill=True)
            if unlogged is not None:  # Lightning wraps a logger's error: its cause says what happened
                rank_zero_warn(f"{self._owner}: could not log every solve of the failed run: "
                               f"{unlogged.__cause__ or unlogged}")
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._queue is not None:
            self._queue.cancel()
            self._close_queue(kill=True)
        self._trainer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._queue is not None and len(self._queue) and self._trainer is not None:
            # A checkpoint is a consistent cut: every step it records as done has been logged.
            self._collect(self._trainer, wait=True)
        return {**super().state_dict(), "skipped": self._skipped - self._retaken}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._skipped, self._retaken = state_dict.get("skipped", 0), 0

    # -------------------------------------------------------------- the solve
    def evaluate(self, snap: Snapshot) -> tuple[dict[str, float], tuple[ConvexProblem, ConvexSolution] | None]:
        """Build, solve and measure one snapshot; never raises (failures become a status and a warning).

        Returns the metrics to log and, when the solve succeeded, the problem and its solution. The synchronous mode's
        solve: the asynchronous worker (a thread or a process, without this callback) calls the engine's
        :func:`~hcl.convex.snapshot.evaluate_snapshot` itself, so a subclass that overrides this runs synchronously.
        """
        outcome = evaluate_snapshot(self._spec(), snap, solve, quiet=True, keep_solution=True, chain=self._chain)
        for message in outcome.messages:
            self.warn_once(message)
        return outcome.metrics, outcome.solved

    # in messages: which monitor, where two run with their own prefixes
    _owner = property(lambda self: type(self).__name__ + ("" if self.prefix == "convex" else f" ({self.prefix!r})"))

    def _spec(self) -> SolveSpec:
        return SolveSpec(
            owner=self._owner, prefix=self.prefix, formulation=self.formulation,
            solver=self.solver, gated=self.gated, weight_decay=self._lambda, reduction=self._reduction,
            solver_options=dict(self.solver_options), time_limit=self.solve_time_limit,
        )

    # ------------------------------------------------------------ asynchronous
    def _collect(self, trainer: "pl.Trainer", wait: bool = False, raise_errors: bool = True) -> None:
        """Log the finished background solves in snapshot order; with ``wait``, until none is left. With
        ``raise_worker_errors``, the first failure is kept for :meth:`_raise_failure` (the other failures warn)."""
        if self._queue is None or not len(self._queue):
            return
        for step, outcome in self._queue.collect(wait=wait):
            log_scalars(trainer, outcome.metrics, step, proved_tags(self.prefix))
            if raise_errors and self.raise_worker_errors and outcome.error is not None and self._failure is None:
                self._failure = (f"{self._owner}: the background solve of step {step} failed: {outcome.error}"
                                 + (f"\n\nThe solve's traceback:\n{outcome.traceback}" if outcome.traceback else ""))
                continue
            for message in outcome.messages:
                self.warn_once(message)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise RuntimeError(failure)

    def _close_queue(self, kill: bool) -> None:
        if self._queue is not None:
            self._queue.close(kill=kill)
            self._queue = None

    # ---------------------------------------------------------------- helpers
    def _snapshot(self, step: int) -> Snapshot:
        hidden_weight, hidden_bias, output_weight, output_bias = self._stack.weights()
        # Asynchronous snapshots are CPU copies: the worker never touches the training device or live tensors.
        device = "cpu" if self.asynchronous else self._X.device

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

    def _value_tags(self) -> list[str]:
        """The values drawn beside ``L``: the optimum and its bracket (those of the gated relaxation when gated)."""
        p = self.prefix
        if self.gated:
            return [f"{p}/gated_optimum", f"{p}/gated_network_bound"]
        if self._stack.output.out_features == 1:
            return [f"{p}/optimum", f"{p}/upper_bound", f"{p}/lower_bound"]
        return [f"{p}/lower_bound"]

    def _solution_weights(
        self, solved: tuple[ConvexProblem, ConvexSolution] | None
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The mapped weights of a solved snapshot on the CPU, or None (with a warning) when they do not fit."""
        if solved is None:
            rank_zero_warn(f"{type(self).__name__}: no usable solution (its status above); weights not loaded")
            return None
        try:
            return self._stack.mapped_weights(*solved)
        except Exception as err:  # noqa: BLE001 - under DDP the other ranks wait for these weights: never raise
            rank_zero_warn(f"{type(self).__name__}: {err}; weights not loaded")
            return None

    def _apply(self, weights: tuple[Tensor, Tensor, Tensor | None] | None) -> None:
        if weights is not None:
            self._stack.load_weights(*weights)
            self.changed_weights_at = self.last_step  # a checkpoint inside this step holds them: the step is done


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)
