r"""
Convex gap monitor
==================

While a two-layer ReLU network trains, build the convex problem of its current activation patterns, solve it
and log how far the network's own objective is from the convex optimum.

For a scalar output the convex problem is exact: its optimum ``p*`` is the best objective any network with
these patterns reaches, and since the network itself is one of them, ``p* ≤ L`` (the note's invariant 1). The
monitor guarantees this for every logged value: the network's own mapped point is feasible, so the logged
optimum is never above its value even when a solver stops early.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.convex.build import problem_from_network
from hcl.convex.problem import REDUCTIONS, ConvexProblem, ConvexSolution, fold_bias, fold_weights, network_objective
from hcl.convex.solve import solve
from hcl.monitoring import check_every_n_steps, check_probe, is_due, log_scalars, training_data, warn_if_no_logger
from hcl.network import ReLUStack, find_relu_stack
from hcl.patterns import sample_patterns

FORMULATIONS = ("neurons", "patterns")

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

    Args:
        every_n_steps: solve period in global steps.
        formulation: ``"neurons"`` or ``"patterns"``.
        solver: ``"auto"``, ``"native"``, ``"cvxpylayers"`` or a cvxpy solver (``"clarabel"``, ``"ecos"``, ...).
        sampled_patterns: ``K`` Gaussian-gate patterns added to the network's own at each solve.
        gated: solve the gated relaxation instead (a lower bound, no cone constraints).
        weight_decay: ``λ``; ``None`` reads the model's.
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.
        probe: inputs to build the problem on (default: the training set); ``target`` must come with it.
        target: targets for ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        load_solution: after each solve, replace the network's weights by the mapped convex solution. **This
            changes training**: the network jumps to the convex optimum of its patterns.
        solver_options: extra keyword arguments for the solver.
        prefix: tag prefix, so that two monitors (e.g. both formulations) can log side by side.
        seed: seed of the sampled patterns.
        max_samples: use only the first ``max_samples`` samples.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack, or data of the wrong
            width.
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
    ) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        if not isinstance(solver, str) or not solver:
            raise ValueError(f"solver must be a solver name, got {solver!r}")
        if isinstance(sampled_patterns, bool) or not isinstance(sampled_patterns, int) or sampled_patterns < 0:
            raise ValueError(f"sampled_patterns must be an integer ≥ 0, got {sampled_patterns!r}")
        if sampled_patterns and formulation != "patterns":
            raise ValueError("sampled_patterns needs formulation='patterns' (the neurons formulation has one block "
                             "per neuron)")
        if weight_decay is not None and (not math.isfinite(weight_decay) or weight_decay < 0):
            raise ValueError(f"weight_decay (λ) must be a finite number ≥ 0, got {weight_decay}")
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.probe = check_probe(probe)
        self.target = check_probe(target, "target")
        if (self.probe is None) != (self.target is None):
            raise ValueError("probe and target go together: pass both or neither")
        if self.probe is not None and self.probe.shape[0] != self.target.shape[0]:
            raise ValueError(f"probe has {self.probe.shape[0]} samples but target {self.target.shape[0]}")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/', got {prefix!r}")
        self.formulation = formulation
        self.solver = solver.lower()
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
        self._last_step = -1
        self._stack: ReLUStack | None = None
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, every_n_steps=self.every_n_steps)

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stack = find_relu_stack(pl_module, self.layer, self.output_layer)
        if self.probe is not None:
            self._stack.inputs(self.probe)
        self._resolve_objective(pl_module)
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
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams({f"{self.prefix}/formulation": self.formulation,
                                        f"{self.prefix}/solver": self.solver})
        X, Y = training_data(trainer, self.probe, self.target, self.max_samples)
        if Y is None:
            raise ValueError(f"{type(self).__name__} needs targets: the training data has none (pass target=)")
        self._X = self._stack.inputs(X)
        self._Y = _as_targets(Y, self._stack.output.out_features, self._X)
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not is_due(step, self.every_n_steps, self._last_step):
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        metrics, solved = self.evaluate(self._snapshot(step))
        log_scalars(trainer, metrics, step)
        if self.load_solution and solved is not None:
            self._load(*solved)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]

    # -------------------------------------------------------------- the solve
    def evaluate(self, snap: Snapshot) -> tuple[dict[str, float], tuple[ConvexProblem, ConvexSolution] | None]:
        """Build, solve and measure one snapshot; never raises (failures become a status and a warning).

        Returns the metrics to log and, when the solve succeeded, the problem and its solution.
        """
        p = self.prefix
        tag = self._value_tag(snap.output_weight.shape[0])
        weights = [t for t in (snap.hidden_weight, snap.hidden_bias, snap.output_weight, snap.output_bias)
                   if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in weights):
            rank_zero_warn(f"{type(self).__name__}: non-finite network weights at step {snap.step}; no solve")
            return {f"{p}/status": STATUS_CODES["nonfinite"]}, None
        Xf = fold_bias(snap.X, snap.hidden_bias is not None)
        Wf = fold_weights(snap.hidden_weight, snap.hidden_bias)
        L = float(network_objective(Xf, snap.Y, Wf, snap.output_weight, snap.output_bias,
                                    self._lambda, self._reduction))
        metrics: dict[str, float] = {f"{p}/nonconvex_objective": L}
        start = time.perf_counter()
        try:
            problem, point = problem_from_network(
                snap.X, snap.Y, snap.hidden_weight, snap.hidden_bias, snap.output_weight, snap.output_bias,
                weight_decay=self._lambda, reduction=self._reduction, formulation=self.formulation,
                extra_patterns=snap.extra_patterns,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # solver chatter; the status is logged instead
                solution = solve(problem, self.solver, gated=self.gated, warm_start=point,
                                 **self.solver_options)
        except Exception as err:  # noqa: BLE001 - a failed solve must never stop training
            rank_zero_warn(f"{type(self).__name__}: convex solve failed at step {snap.step}: "
                           f"{type(err).__name__}: {err}")
            metrics[f"{p}/status"] = STATUS_CODES["failed"]
            metrics[f"{p}/solve_seconds"] = time.perf_counter() - start
            return metrics, None
        seconds = time.perf_counter() - start
        value = solution.value
        if not self.gated:
            # The network's own point is feasible: p* is never above its value, whatever the solver reached.
            value = min(value, float(problem.objective(*point)))
        status = solution.status if solution.status in STATUS_CODES else "failed"
        if not math.isfinite(value):
            status = "failed"
        if status != "optimal":
            rank_zero_warn(f"{type(self).__name__}: solver status {solution.status!r} at step {snap.step}")
        metrics.update({
            tag: value,
            f"{p}/gap": L - value,
            f"{p}/solve_seconds": seconds,
            f"{p}/active_neurons": _active_neurons(problem, solution),
            f"{p}/status": STATUS_CODES[status],
        })
        if solution.relative_gap is not None:
            metrics[f"{p}/duality_gap"] = solution.relative_gap
        return metrics, ((problem, solution) if solution.ok else None)

    # ---------------------------------------------------------------- helpers
    def _snapshot(self, step: int) -> Snapshot:
        hidden_weight, hidden_bias, output_weight, output_bias = self._stack.weights()

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        extra = None
        if self.sampled_patterns:
            extra = sample_patterns(fold_bias(self._X, hidden_bias is not None).cpu(), self.sampled_patterns,
                                    generator=self._generator).to(self._X.device)
        return Snapshot(step, self._X, self._Y, copy(hidden_weight), copy(hidden_bias), copy(output_weight),
                        copy(output_bias), extra)

    def _value_tag(self, out_features: int) -> str:
        if self.gated:
            return f"{self.prefix}/gated_lower_bound"
        return f"{self.prefix}/optimum" if out_features == 1 else f"{self.prefix}/lower_bound"

    def _resolve_objective(self, pl_module: "pl.LightningModule") -> None:
        lam = self.weight_decay if self.weight_decay is not None else getattr(pl_module, "weight_decay", None)
        red = self.reduction if self.reduction is not None else getattr(pl_module, "reduction", None)
        if lam is None or red is None:
            rank_zero_warn(
                f"{type(self).__name__}: the model has no `weight_decay`/`reduction` attributes and the callback was "
                "given none: using λ = 0 and reduction 'mean'"
            )
        self._lambda = float(lam or 0.0)
        self._reduction = red or "mean"
        if self._reduction not in REDUCTIONS:
            raise ValueError(f"the model's reduction must be one of {REDUCTIONS}, got {self._reduction!r}")

    @torch.no_grad()
    def _load(self, problem: ConvexProblem, solution: ConvexSolution) -> None:
        """Replace the network's weights by the mapped convex solution (zero-padded to the network's width)."""
        stack, hidden = self._stack, self._stack.hidden
        W, A, b0 = problem.to_network(solution.U, solution.V, solution.b0)
        if W.shape[0] > hidden.out_features:
            rank_zero_warn(f"{type(self).__name__}: the convex solution needs {W.shape[0]} neurons but the network "
                           f"has {hidden.out_features}; weights not loaded")
            return
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


def _active_neurons(problem, solution: ConvexSolution) -> int:
    norms = torch.cat([solution.U.flatten(1).norm(dim=1), solution.V.flatten(1).norm(dim=1)])
    scale = max(float(norms.max()), 1e-30) if norms.numel() else 1.0
    return int((norms > 1e-6 * scale).sum())


def _as_targets(Y: Tensor, out_features: int, like: Tensor) -> Tensor:
    if out_features > 1 and not Y.is_floating_point():
        return F.one_hot(Y.long().reshape(-1), out_features).to(like)
    Y = Y.to(like)
    return Y.reshape(Y.shape[0], -1)
