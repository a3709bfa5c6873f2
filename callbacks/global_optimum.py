r"""
Global optimum monitor
======================

For 1-D and 2-D data with a bias, the training objective's exact global minimum, drawn beside the objective.

In low dimension every activation pattern of the data can be enumerated (``2n − 1`` at most for 1-D data,
``n² − n + 1`` for 2-D data). The convex problem over *all* of them has the global minimum ``p*_all`` of the
non-convex objective ``L`` over networks of any width as its optimum (the convex note's invariant 4), attained
by every network with at least as many neurons as the solution has nonzero blocks. It depends only on the data,
``λ`` and the reduction, so it is solved once, at the start of training; then ``L(network) ≥ p*_all`` at every
step and the gap ``L − p*_all`` says whether gradient descent found the global minimum.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.convex.problem import REDUCTIONS, ConvexProblem, ConvexSolution, fold_bias, fold_weights, network_objective
from hcl.monitoring import (
    check_every_n_steps,
    check_prefix,
    check_probe_and_target,
    is_due,
    log_scalars,
    resolve_objective,
    training_data,
    warn_if_no_logger,
)
from hcl.network import ReLUStack, find_relu_stack
from hcl.patterns import enumerate_patterns


def all_patterns_problem(
    X: Tensor,
    Y: Tensor,
    *,
    bias: bool,
    weight_decay: float,
    reduction: str,
    output_bias: bool = False,
) -> ConvexProblem:
    """The convex problem over every activation pattern of 1-D or 2-D data with a bias.

    The bias is the first layer's own (``bias=True``: a column of ones is appended) or a column of ones already
    in ``X``, or both; columns of ones after the first add no pattern. The problem is built in float64.

    Args:
        X: ``(n, k)`` inputs of the hidden layer.
        Y: ``(n,)`` or ``(n, c)`` targets.
        bias: whether the hidden layer has its own bias.
        weight_decay: ``λ ≥ 0``.
        reduction: ``"sum"`` or ``"mean"``.
        output_bias: whether the network has an unpenalised output bias.

    Raises:
        ValueError: when there is no bias (no first-layer bias and no column of ones), or when the data has more
            than two columns besides the ones (patterns are enumerated for 1-D and 2-D data only).
    """
    if X.ndim != 2:
        raise ValueError(f"X must be (n, features), got shape {tuple(X.shape)}")
    Xf = fold_bias(X.detach().to("cpu", torch.float64), bias)
    is_ones = (Xf == 1).all(dim=0)
    if not bool(is_ones.any()):
        raise ValueError(
            "the global optimum needs a bias: a first-layer bias (bias=True) or a data column of ones (e.g. "
            "SyntheticRegression(append_ones=True)); without one the patterns of this data are not enumerated"
        )
    features = Xf[:, ~is_ones]
    if features.shape[1] not in (1, 2):
        raise ValueError(
            f"the global optimum is computed for 1-D or 2-D data with a bias; this data has {features.shape[1]} "
            "input columns besides the bias (too many patterns to enumerate: use ConvexGapMonitor instead)"
        )
    # The patterns {1[X̃u ≥ 0]} depend only on the span of the columns: one ones column, placed last, suffices.
    ones = torch.ones(Xf.shape[0], 1, dtype=Xf.dtype)
    patterns = enumerate_patterns(torch.cat([features, ones], dim=1))
    return ConvexProblem(X=Xf, Y=Y.detach().to("cpu", torch.float64), patterns=patterns,
                         weight_decay=weight_decay, reduction=reduction, output_bias=output_bias)


class GlobalOptimumMonitor(Callback):
    r"""Log the exact global minimum of the training objective, for 1-D and 2-D data with a bias.

    At the start of training the monitor enumerates every activation pattern of the training data, solves the
    convex problem over all of them once (with the model's ``λ`` and reduction) and then logs, at steps
    ``0, k, 2k, …`` (``k = every_n_steps``), with the weights the training step at that global step uses:

    - ``<prefix>/global_optimum``: ``p*_all``, the same value at every step so that it draws as a line beside
      ``train/objective`` (for ``c > 1`` outputs ``<prefix>/global_lower_bound`` instead: the group-Frobenius
      problem bounds every network from below but is not attained in general);
    - ``<prefix>/global_gap``: ``L(network) − p*_all``, never negative beyond the solver's tolerance; near 0 when
      gradient descent has found a global minimum.

    The number of enumerated patterns, the number of neurons the optimum needs (its nonzero blocks) and the
    solve time are logged once, at the first logged step (``<prefix>/global_patterns``, ``<prefix>/global_neurons``,
    ``<prefix>/global_solve_seconds``), and stay readable as attributes (:attr:`optimum`, :attr:`num_patterns`,
    :attr:`num_neurons`, :attr:`problem`, :attr:`solution`). A network narrower than ``num_neurons`` cannot
    reach ``p*_all`` (a warning says so when ``λ > 0``); it remains a lower bound. With ``λ = 0`` the optimum is
    usually not unique and ``num_neurons`` counts the blocks of the solver's solution, not the fewest needed.

    The bias is detected in both forms: the hidden layer's own bias, or a column of ones in the data (the seed's
    layout). ``λ`` and the reduction: the callback's arguments when given, else the model's ``weight_decay`` /
    ``reduction`` attributes (as :class:`hcl.TwoLayerReLU` has), else ``λ = 0`` and ``"mean"`` with a warning.

    Args:
        every_n_steps: logging period in global steps.
        solver: solver name for :func:`hcl.convex.solve.solve` (``"auto"``, ``"clarabel"``, ...).
        weight_decay: ``λ``; ``None`` reads the model's.
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.
        probe: inputs (default: the training set); ``target`` must come with it.
        target: targets for ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        solver_options: extra keyword arguments for the solver.
        prefix: tag prefix.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack; at the start of
            training, on data with no bias or more than two input columns besides it, or a failed solve.

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
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if not isinstance(solver, str) or not solver:
            raise ValueError(f"solver must be a solver name, got {solver!r}")
        if weight_decay is not None and (not math.isfinite(weight_decay) or weight_decay < 0):
            raise ValueError(f"weight_decay (λ) must be a finite number ≥ 0, got {weight_decay}")
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.probe, self.target = check_probe_and_target(probe, target)
        check_prefix(prefix)
        self.solver = solver.lower()
        self.weight_decay = weight_decay
        self.reduction = reduction
        self.layer = layer
        self.output_layer = output_layer
        self.solver_options = dict(solver_options or {})
        self.prefix = prefix
        self.optimum: float | None = None
        self.problem: ConvexProblem | None = None
        self.solution: ConvexSolution | None = None
        self.num_patterns: int | None = None
        self.num_neurons: int | None = None
        self._last_step = -1
        self._described = False
        self._stack: ReLUStack | None = None
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        self._lambda = 0.0
        self._reduction = "mean"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, every_n_steps=self.every_n_steps)

    @property
    def value_tag(self) -> str:
        """``<prefix>/global_optimum``, or ``<prefix>/global_lower_bound`` for several outputs."""
        if self._stack is not None and self._stack.output.out_features > 1:
            return f"{self.prefix}/global_lower_bound"
        return f"{self.prefix}/global_optimum"

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stack = find_relu_stack(pl_module, self.layer, self.output_layer)
        if self.probe is not None:
            self._stack.inputs(self.probe)
        self._lambda, self._reduction = resolve_objective(pl_module, self.weight_decay, self.reduction,
                                                          type(self).__name__)
        p = self.prefix
        # Beside a ConvexGapMonitor of the same prefix, the objective, the convex optimum and the global optimum
        # share its chart; alone, the monitor draws the objective and the global optimum on a chart of its own.
        beside_convex_gap = any(type(cb).__name__ == "ConvexGapMonitor" and getattr(cb, "prefix", None) == p
                                for cb in trainer.callbacks)
        title = "objective vs convex optimum" if beside_convex_gap else "objective vs global optimum"
        dashboard.register_charts(trainer, "hcl", {title: ["train/objective", self.value_tag],
                                                   "global gap": [f"{p}/global_gap"]})

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        warn_if_no_logger(trainer, type(self).__name__)
        dashboard.write_layout(trainer)
        X, Y = training_data(trainer, self.probe, self.target)
        if Y is None:
            raise ValueError(f"{type(self).__name__} needs targets: the training data has none (pass target=)")
        self._X = self._stack.inputs(X).detach()
        self._Y = _as_targets(Y, self._stack.output.out_features, self._X)
        if not trainer.is_global_zero or self.optimum is not None:
            return
        self._solve_once()
        width = self._stack.hidden.out_features
        if self._lambda > 0 and width < self.num_neurons:
            rank_zero_warn(
                f"{type(self).__name__}: the global optimum needs {self.num_neurons} neurons but the network has "
                f"{width}; p*_all = {self.optimum:.6g} is then a lower bound that it may not reach"
            )

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not is_due(step, self.every_n_steps, self._last_step):
            return
        self._last_step = step
        if not trainer.is_global_zero or self.optimum is None:
            return
        L = self.network_objective()
        metrics = {self.value_tag: self.optimum}
        if not self._described:
            # Constants of the run, logged once (TensorBoard shows only the first hyper-parameter record of a run,
            # which Lightning writes before any callback runs).
            self._described = True
            metrics.update({f"{self.prefix}/global_patterns": self.num_patterns,
                            f"{self.prefix}/global_neurons": self.num_neurons,
                            f"{self.prefix}/global_solve_seconds": self.solution.solve_seconds})
        if math.isfinite(L):
            metrics[f"{self.prefix}/global_gap"] = L - self.optimum
        log_scalars(trainer, metrics, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]

    # ---------------------------------------------------------------- helpers
    def network_objective(self) -> float:
        """``L`` of the network's current weights on the monitor's data (float64)."""
        weight, bias, output_weight, output_bias = self._stack.weights()
        X = fold_bias(self._X.double(), bias is not None)
        W = fold_weights(weight.double(), None if bias is None else bias.double())
        with torch.no_grad():
            L = network_objective(X, self._Y.double(), W, output_weight.double(),
                                  None if output_bias is None else output_bias.double(), self._lambda,
                                  self._reduction)
        return float(L)

    def _solve_once(self) -> None:
        from hcl.convex.solve import solve

        self.problem = all_patterns_problem(
            self._X, self._Y, bias=self._stack.bias, weight_decay=self._lambda, reduction=self._reduction,
            output_bias=self._stack.output_bias,
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # solver chatter; a bad status raises below
            solution = solve(self.problem, self.solver, **self.solver_options)
        solution.solve_seconds = time.perf_counter() - start
        if not solution.ok:
            raise ValueError(
                f"{type(self).__name__}: the all-patterns problem ({self.problem.num_patterns} patterns) was not "
                f"solved: status {solution.status!r}"
            )
        self.solution = solution
        self.optimum = float(solution.value)
        self.num_patterns = self.problem.num_patterns
        self.num_neurons = _nonzero_blocks(solution)


def _nonzero_blocks(solution: ConvexSolution) -> int:
    """Neurons of the mapped solution: nonzero ``u_i`` and ``v_i`` (relative to the largest)."""
    norms = torch.cat([solution.U.flatten(1).norm(dim=1), solution.V.flatten(1).norm(dim=1)])
    scale = max(float(norms.max()), 1e-30) if norms.numel() else 1.0
    return int((norms > 1e-6 * scale).sum())


def _as_targets(Y: Tensor, out_features: int, like: Tensor) -> Tensor:
    if out_features > 1 and not Y.is_floating_point():
        return F.one_hot(Y.long().reshape(-1), out_features).to(like)
    Y = Y.detach().to(like)
    return Y.reshape(Y.shape[0], -1)
