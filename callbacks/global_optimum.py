r"""
Global optimum monitor
======================

For 1-D and 2-D data with a bias, the training objective's exact global minimum, drawn beside the objective.

In low dimension every activation pattern of the data can be enumerated (``2n − 1`` at most for 1-D data,
``n² − n + 1`` for 2-D data). The convex problem over *all* of them has the global minimum ``p*_all`` of the
non-convex objective ``L`` over networks of any width as its optimum (invariant 4 of ``docs/convex.md#invariants``),
attained by every network with at least as many neurons as the solution maps to. It depends only on the
data, ``λ`` and the reduction, so it is solved once, at the start of training; then ``L(network) ≥ p*_all`` at every
step and the gap ``L − p*_all`` says whether gradient descent found the global minimum.

A solver's value is within its tolerance of ``p*_all``, on either side, so the monitor logs the certified bracket
``global_lower_bound ≤ p*_all ≤ global_upper_bound`` and the optimum only when it is certified
(``docs/dashboards.md``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.callbacks.base import StackCallback, objective_tags
from hcl.callbacks.convex_gap import ConvexGapMonitor
from hcl.callbacks.logs import log_scalars
from hcl.callbacks.monitor_options import check_for_outputs
from hcl.convex import check_solver_options, global_lower_bound, solve
from hcl.convex.build import all_patterns_problem
from hcl.convex.cvxpy_solver import ConvexSolveError
from hcl.convex.feasibility import feasible_solution
from hcl.convex.native import SolverMemoryError
from hcl.convex.problem import (
    ConvexProblem,
    ConvexSolution,
    as_targets,
    float64_device,
    fold_bias,
    fold_weights,
    network_objective,
)
from hcl.convex.snapshot import CHECK_TOL, bracket, check_tol
from hcl.convex.status import Status

# Above this many patterns the all-patterns problem is said to be large (2-D: 9 901 patterns of 100 points took 10 s
# and 1.1 GB to solve, 89 701 of 300 points 30 s to enumerate and over 3.5 GB); docs/experiments.md
MANY_PATTERNS = 20_000


class GlobalOptimumMonitor(StackCallback):
    r"""Log the exact global minimum of the training objective, for 1-D and 2-D data with a bias.

    At the start of training the monitor enumerates every activation pattern of the training data, solves the
    convex problem over all of them once (with the model's ``λ`` and reduction) and then logs, at steps
    ``0, k, 2k, …`` (``k = every_n_steps``), with the weights the training step at that global step uses:

    - ``<prefix>/global_lower_bound``: a certified lower bound on ``p*_all`` — the larger of the solver's certified
      dual value and, for a scalar output, :func:`hcl.convex.global_lower_bound` at the solution's fit. For ``c > 1``
      the group-Frobenius problem bounds every network from below but is not attained in general;
    - ``<prefix>/global_upper_bound`` (scalar output): the solver's value at a feasible point (a point left outside
      its cones, even within the solver's tolerance, is first moved into them), so ``p*_all ≤ global_upper_bound``;
    - ``<prefix>/global_optimum`` (scalar output): the solver's value, only when its status is optimal (a certified
      gap); each of these three is the same value at every step, so that it draws as a line beside
      ``train/objective``;
    - ``<prefix>/global_gap``: ``L(network) − global_optimum``, logged with it: near 0 when gradient descent has
      found a global minimum, and possibly negative by as much as the optimum's certified gap;
    - ``<prefix>/global_max_gap``: ``L(network) − global_lower_bound``, never negative: the network is at most that
      far above the global minimum.

    The number of enumerated patterns, the number of neurons of the solver's solution (its nonzero columns: an optimum
    with fewer may exist, and one with at most ``n c + 1`` does), the solve time and the solver's status are logged
    once, at the first logged step (``<prefix>/global_patterns``, ``<prefix>/global_neurons``,
    ``<prefix>/global_solve_seconds``, ``<prefix>/global_status``), and stay readable as attributes (:attr:`optimum`
    — ``None`` when not certified —, :attr:`lower_bound`, :attr:`upper_bound`, :attr:`num_patterns`,
    :attr:`num_neurons`, :attr:`problem`, :attr:`solution`). A network narrower than ``min(num_neurons, n c + 1)``
    may not reach ``p*_all`` (a warning says so when ``λ > 0``); it remains a lower bound.

    The bias is detected in both forms: the hidden layer's own bias, or a column of ones in the data. ``λ`` and
    the reduction: the callback's arguments when given, else the model's ``weight_decay`` / ``reduction`` attributes
    (as :class:`hcl.TwoLayerReLU` has), else ``λ = wd / 2`` from the optimizer's coupled ``weight_decay`` (an info
    line says so; AdamW's decoupled decay is left out with a warning), else ``λ = 0``, and ``"mean"`` with a warning;
    ``B`` times that for a model of one's own summing ``B`` mini-batches an epoch (``docs/convex.md``).

    Args:
        every_n_steps: logging period in global steps.
        solver: solver name for :func:`hcl.convex.solve` (``"auto"``, ``"clarabel"``, ...).
        weight_decay: ``λ``; ``None`` reads the model's.
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.
        probe: inputs (default: the training set); ``target`` must come with it.
        target: targets for ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        solver_options: extra keyword arguments for the solver, checked here (their names, and the native
            solver's values: :func:`hcl.convex.check_solver_options`).
        prefix: tag prefix.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack; at the start of
            training, on data with no bias or more than two input columns besides it, or a failed solve (one
            stopped at its iteration or time limit logs its bracket and status 2 instead).

    Example::

        trainer = Trainer(log_every_n_steps=1, callbacks=[GlobalOptimumMonitor(every_n_steps=1)])
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        solver: str = "auto",
        weight_decay: float | None = None,
        reduction: Literal["sum", "mean"] | None = None,
        probe: Tensor | None = None,
        target: Tensor | None = None,
        layer: str | None = None,
        output_layer: str | None = None,
        solver_options: dict[str, Any] | None = None,
        prefix: str = "convex",
    ) -> None:
        super().__init__(every_n_steps, probe=probe, target=target, layer=layer, output_layer=output_layer,
                         prefix=prefix, weight_decay=weight_decay, reduction=reduction)
        if not isinstance(solver, str) or not solver:
            raise ValueError(f"solver must be a solver name, got {solver!r}")
        if solver_options is not None and not isinstance(solver_options, Mapping):
            raise TypeError(f"solver_options must be a dict of keyword arguments, got {type(solver_options).__name__}")
        check_solver_options(solver, solver_options or {})  # the name and the options, before any solve
        self.solver = solver.lower()
        self.solver_options = dict(solver_options or {})
        self.optimum: float | None = None
        self.lower_bound: float | None = None
        self.upper_bound: float | None = None
        self.problem: ConvexProblem | None = None
        self.solution: ConvexSolution | None = None
        self.num_patterns: int | None = None
        self.num_neurons: int | None = None
        self._described_at: int | None = None  # the step the run's constants were logged at
        self._solved_for: tuple | None = None  # the (λ, reduction, biases), X and Y of the solution
        self._X: Tensor | None = None
        self._Y: Tensor | None = None

    @property
    def value_tags(self) -> list[str]:
        """The values drawn beside the objective: the optimum and its bracket (the lower bound alone for ``c > 1``)."""
        p = self.prefix
        if self._stack is not None and self._stack.output.out_features > 1:
            return [f"{p}/global_lower_bound"]
        return [f"{p}/global_optimum", f"{p}/global_upper_bound", f"{p}/global_lower_bound"]

    @override
    def reset(self) -> None:
        super().reset()  # and the last run's problem: another trainer may train on other data
        self._forget_solution()

    def _forget_solution(self) -> None:
        self.optimum = self.lower_bound = self.upper_bound = None
        self.problem = self.solution = None
        self.num_patterns = self.num_neurons = None
        self._described_at = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # a resumed run logs its constants once: again only if their step is one the resumed run takes again
        described = self._described_at is not None and self._described_at <= self.finished_step()
        return {**super().state_dict(), "described": described}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._described_at = -1 if state_dict.get("described", False) else None

    # ------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.target is not None:  # its shape and labels against the model's outputs, before training
            as_targets(self.target, self._stack.output.out_features, torch.empty(0))
        check_for_outputs(type(self).__name__, self.solver, self._stack.output.out_features)
        p = self.prefix
        # Beside a ConvexGapMonitor of the same prefix, the objective, the convex optimum and the global optimum
        # share its chart; alone, the monitor draws the objective and the global optimum on a chart of its own.
        beside_convex_gap = any(isinstance(cb, ConvexGapMonitor) and cb.prefix == p for cb in trainer.callbacks)
        title = "objective vs convex optimum" if beside_convex_gap else "objective vs global optimum"
        dashboard.register_charts(trainer, "hcl", {title: [*objective_tags(pl_module), *self.value_tags],
                                                   "global gap": [f"{p}/global_gap", f"{p}/global_max_gap"]})

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        X, Y = self.training_data(trainer)
        X, Y = (None if t is None else t.to(float64_device(X.device)) for t in (X, Y))  # solved in float64 (MPS: none)
        self._X = X
        self._Y = as_targets(Y, self._stack.output.out_features, X)
        solved_for = (self._lambda, self._reduction, self._stack.bias, self._stack.output_bias)
        before = self._solved_for
        if self.solution is not None and before is not None and not (
                before[0] == solved_for and torch.equal(before[1], X) and torch.equal(before[2], self._Y)):
            self._forget_solution()  # another fit of the same trainer, on other data or with another λ
        self._solved_for = (solved_for, X, self._Y)
        if not trainer.is_global_zero or self.solution is not None:
            return
        self._solve_once()
        width = self._stack.hidden.out_features
        # some optimum has at most n·c + 1 neurons (Carathéodory); the solver's may have more, and fewer may do
        at_most = self.problem.n * self.problem.c + 1
        certified = Status.of(self.solution.status) == Status.OPTIMAL  # else its value and width are a stopped point's
        if certified and self._lambda > 0 and width < min(self.num_neurons, at_most):
            rank_zero_warn(
                f"{type(self).__name__}: the solver's global optimum uses {self.num_neurons} neurons (some optimum has "
                f"at most {at_most}; one with fewer may exist) and the network has "
                f"{width}: p*_all ≈ {self.solution.value:.6g} is a lower bound that it may not reach"
            )

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = self.due_step(trainer)
        if step is None or not trainer.is_global_zero or self.solution is None:
            return
        L = self.network_objective()
        p = self.prefix
        metrics: dict[str, float] = {}
        if self.optimum is not None:
            metrics[f"{p}/global_optimum"] = self.optimum
        if self.upper_bound is not None:
            metrics[f"{p}/global_upper_bound"] = self.upper_bound
        if self.lower_bound is not None:
            metrics[f"{p}/global_lower_bound"] = self.lower_bound
        if self._described_at is None:
            # Constants of the run, logged once (TensorBoard shows only the first hyper-parameter record of a run,
            # which Lightning writes before any callback runs).
            self._described_at = step
            metrics.update({f"{p}/global_patterns": self.num_patterns,
                            f"{p}/global_neurons": self.num_neurons,
                            f"{p}/global_solve_seconds": self.solution.solve_seconds,
                            f"{p}/global_status": Status.of(self.solution.status).code})
        if math.isfinite(L):
            if self.optimum is not None:
                metrics[f"{p}/global_gap"] = L - self.optimum
            if self.lower_bound is not None:
                metrics[f"{p}/global_max_gap"] = L - self.lower_bound
        log_scalars(trainer, metrics, step, absent=[f"{p}/global_gap", f"{p}/global_max_gap"])

    # ---------------------------------------------------------------- helpers
    def network_objective(self) -> float:
        """``L`` of the network's current weights on the monitor's data (float64)."""
        weight, bias, output_weight, output_bias = (
            None if t is None else t.to(self._X.device, torch.float64) for t in self._stack.weights())
        X = fold_bias(self._X.double(), bias is not None)
        with torch.no_grad():
            L = network_objective(X, self._Y.double(), fold_weights(weight, bias), output_weight, output_bias,
                                  self._lambda, self._reduction)
        return float(L)

    def _solve_once(self) -> None:
        n, dims = self._X.shape[0], self._X.shape[1]
        most = 2 * n - 1 if dims == 1 else n * n - n + 1  # the patterns of n points on a line, in the plane (at most)
        if most > MANY_PATTERNS:
            rank_zero_warn(f"{type(self).__name__}: {n} points in {dims}-D have up to {most} activation patterns; "
                           "enumerating and solving them takes minutes and gigabytes (docs/experiments.md)")
        try:  # refused before enumerating when the patterns' solve could not fit
            self.problem = all_patterns_problem(
                self._X, self._Y, bias=self._stack.bias, weight_decay=self._lambda, reduction=self._reduction,
                output_bias=self._stack.output_bias, memory_limit=self.solver_options.get("memory_limit"),
            )
        except SolverMemoryError as error:
            raise ValueError(f"{type(self).__name__}: the all-patterns problem was not built: {error}") from error
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # solver chatter; a bad status raises below
            try:
                solution = solve(self.problem, self.solver, **self.solver_options)
                stopped = Status.of(solution.status) in (Status.MAX_ITERATIONS, Status.TIME_LIMIT)
                usable = (solution.ok or stopped) and math.isfinite(solution.value)
                failure = None if usable else f"status '{Status.of(solution.status).value}'"
            except (ConvexSolveError, SolverMemoryError) as error:  # a solver limit, no solution, or no room
                solution, failure = None, str(error)
        if failure is not None:
            raise ValueError(f"{type(self).__name__}: the all-patterns problem ({self.problem.num_patterns} patterns) "
                             f"was not solved: {failure}")
        solution.solve_seconds = time.perf_counter() - start
        if stopped:  # stopped early: its certified bracket still holds, logged with its status
            rank_zero_warn(f"{type(self).__name__}: the all-patterns solve stopped at its limit (status "
                           f"'{Status.of(solution.status).value}'): its bracket is logged, no optimum")
        # a point outside its cones (by any amount, as the convex gap monitor's) is moved into them: its value then
        # bounds p*_all from above, and "optimal" stays only within the solver's tol
        tol = check_tol(self.solver_options, solution.solver)
        claimed, violation = Status.of(solution.status), solution.violation
        solution = feasible_solution(self.problem, solution, tol)
        if claimed == Status.OPTIMAL and Status.of(solution.status) != Status.OPTIMAL:
            rank_zero_warn(f"{type(self).__name__}: the all-patterns solve is not certified: its point violated the "
                           f"constraints by {violation:.3g}, and moved into them it is not within tol {tol:g}")
        # the zero network is feasible: an "optimal" value above its objective is refuted
        known = bracket(self.problem, solution, float(self.problem.objective(*self.problem.zeros())), tol, CHECK_TOL)
        scalar = not self.problem.is_bound
        lower = known.lower_bound
        if scalar:
            # Lagrange duality from the solution's own fit: certified whatever the solver's dual (docs/convex.md)
            fit = self.problem.predict(solution.U, solution.V, solution.b0)
            certificate = global_lower_bound(
                self.problem.X, self.problem.Y, fit, weight_decay=self._lambda, reduction=self._reduction,
                bias=False, output_bias=self._stack.output_bias,
            ).lower_bound
            lower = certificate if lower is None else max(lower, certificate)
        if known.refuted is not None:
            rank_zero_warn(f"{type(self).__name__}: the all-patterns solve is not certified: {known.refuted}")
        self.solution = solution
        self.optimum = known.optimum if scalar and Status.of(solution.status) == Status.OPTIMAL else None
        self.upper_bound = known.upper_bound if scalar else None
        self.lower_bound = None if lower is None else lower + 0.0  # + 0.0: a bound of −0.0 reads 0
        self.num_patterns = self.problem.num_patterns
        self.num_neurons = solution.active_neurons(problem=self.problem)
