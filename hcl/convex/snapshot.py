"""The solve of one snapshot of a network: build its convex problem, solve it, measure the gap.

Importable without Lightning, so that a worker process starts quickly. A chain of solves (one training run) carries
each solution to the next snapshot through a :class:`WarmStartChain`; in a worker process the chain lives in the
process's store beside the run's data (:func:`store_worker_data`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hcl.convex.build import problem_from_network
from hcl.convex.native import remap_warm_start
from hcl.convex.problem import ConvexProblem, ConvexSolution, fold_bias, fold_weights, network_objective
from hcl.convex.status import STATUS_CODES, Status

__all__ = [
    "STATUS_CODES",
    "Snapshot",
    "SolveOutcome",
    "SolveSpec",
    "WarmStartChain",
    "active_neurons",
    "evaluate_snapshot",
    "solve_snapshot_job",
    "store_worker_data",
]


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


@dataclass
class SolveOutcome:
    """The result of one solve: what to log, what to warn about, and the solution when it is to be kept."""

    metrics: dict[str, float]
    messages: list[str] = field(default_factory=list)
    solved: tuple[ConvexProblem, ConvexSolution] | None = None
    error: str | None = None  # the solver's exception, when it raised


class WarmStartChain:
    """The last solution of one chain of solves, to start the next solve from.

    :meth:`start_for` carries it over to a new problem's patterns with
    :func:`~hcl.convex.native.remap_warm_start` (each new pattern takes its nearest old pattern's block, with its
    multipliers); a problem of another shape (samples, features, outputs) or of the other kind (gated or not) gets
    ``None``. Not thread-safe: one chain belongs to one sequence of solves.
    """

    def __init__(self) -> None:
        self._last: tuple[ConvexProblem, ConvexSolution] | None = None

    def start_for(self, problem: ConvexProblem, gated: bool) -> tuple | None:
        """The last kept solution remapped to ``problem``'s patterns, or ``None`` when there is none that fits."""
        if self._last is None:
            return None
        old_problem, old_solution = self._last
        if old_problem.X.shape != problem.X.shape or old_problem.c != problem.c or old_solution.gated != gated:
            return None
        return remap_warm_start(old_problem.patterns, old_solution, problem.patterns)

    def keep(self, problem: ConvexProblem, solution: ConvexSolution) -> None:
        """Keep ``solution`` of ``problem`` for the next solve, if it is usable (``solution.ok``)."""
        if solution.ok and solution.U is not None:
            self._last = (problem, solution)


def evaluate_snapshot(
    spec: SolveSpec,
    snap: Snapshot,
    solve_fn: Callable[..., ConvexSolution],
    quiet: bool,
    keep_solution: bool,
    chain: WarmStartChain | None = None,
) -> SolveOutcome:
    """Build, solve and measure one snapshot. Never raises: failures become a status and a message.

    Args:
        spec: how to solve and where to log.
        snap: the network's weights and the data.
        solve_fn: called as ``solve_fn(problem, spec.solver, gated=..., warm_start=..., **options)``, like
            :func:`hcl.convex.solve`; ``options`` are ``spec.solver_options`` and ``time_limit`` when the spec has one.
        quiet: silence the solver's warnings (the status is logged instead).
        keep_solution: return the problem and its solution in :attr:`SolveOutcome.solved` when the solve succeeded.
        chain: start from the chain's last solution (remapped to the new patterns) instead of the network's own point,
            when it has one that fits, and keep this solve's solution in it. ``None``: always the network's point.

    Returns:
        The metrics to log (``<prefix>/status`` always, a :class:`~hcl.convex.status.Status` code), the messages to
        warn with, and the solution if asked for.
    """
    p = spec.prefix
    owner = spec.owner
    weights = [t for t in (snap.hidden_weight, snap.hidden_bias, snap.output_weight, snap.output_bias)
               if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in weights):
        return SolveOutcome({f"{p}/status": Status.NONFINITE.code},
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
        warm = (chain.start_for(problem, spec.gated) if chain is not None else None) or point
        if quiet:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # solver chatter; the status is logged instead
                solution = solve_fn(problem, spec.solver, gated=spec.gated, warm_start=warm, **options)
        else:
            solution = solve_fn(problem, spec.solver, gated=spec.gated, warm_start=warm, **options)
        if not isinstance(solution, ConvexSolution):
            raise TypeError(f"the solver returned {type(solution).__name__}, not a ConvexSolution")
        if chain is not None:
            chain.keep(problem, solution)
        seconds = time.perf_counter() - start
        return _measure(spec, snap, problem, point, solution, L, seconds, metrics, keep_solution)
    except Exception as err:  # noqa: BLE001 - a failed solve must never stop training
        seconds = time.perf_counter() - start
        late = spec.time_limit is not None and seconds >= spec.time_limit
        metrics[f"{p}/status"] = (Status.TIME_LIMIT if late else Status.FAILED).code
        metrics[f"{p}/solve_seconds"] = seconds
        reason = f" after {seconds:.2f} s (time limit {spec.time_limit} s)" if late else ""
        description = f"{type(err).__name__}: {err}"
        return SolveOutcome(metrics, [f"{owner}: convex solve failed at step {snap.step}{reason}: {description}"],
                            error=description)


def _measure(
    spec: SolveSpec, snap: Snapshot, problem: ConvexProblem, point: tuple, solution: ConvexSolution, L: float,
    seconds: float, metrics: dict[str, float], keep_solution: bool,
) -> SolveOutcome:
    p, owner = spec.prefix, spec.owner
    value = solution.value
    if not spec.gated:
        # The network's own point is feasible: p* is never above its value, whatever the solver reached.
        value = min(value, float(problem.objective(*point)))
    status = Status.of(solution.status)
    if not math.isfinite(value):
        status = Status.FAILED
    messages = []
    if spec.time_limit is not None and seconds > spec.time_limit and status != Status.FAILED:
        status = Status.TIME_LIMIT
        messages.append(f"{owner}: the solve of step {snap.step} took {seconds:.2f} s, over the time limit of "
                        f"{spec.time_limit} s")
    elif status != Status.OPTIMAL:
        messages.append(f"{owner}: solver status {solution.status!r} at step {snap.step}")
    metrics.update({
        spec.value_tag: value,
        f"{p}/gap": L - value,
        f"{p}/solve_seconds": seconds,
        f"{p}/active_neurons": active_neurons(problem, solution),
        f"{p}/status": status.code,
    })
    if solution.relative_gap is not None:
        metrics[f"{p}/duality_gap"] = solution.relative_gap
    solved = (problem, solution) if keep_solution and solution.ok else None
    return SolveOutcome(metrics, messages, solved)


def active_neurons(problem: ConvexProblem, solution: ConvexSolution) -> int:
    """Neurons of the mapped convex solution: its nonzero blocks (:meth:`ConvexSolution.active_blocks`)."""
    return solution.active_blocks()


@dataclass
class _WorkerRun:
    """What a worker process keeps of one training run: its data, sent once, and its warm-start chain."""

    X: Tensor
    Y: Tensor
    chain: WarmStartChain | None


# One training run per worker process, under the key its monitor sent the data with.
_WORKER_RUNS: dict[str, _WorkerRun] = {}


def store_worker_data(key: str, X: Tensor, Y: Tensor, chained: bool = False) -> None:
    """Keep a run's data in this (worker) process under ``key``, replacing any earlier run's.

    Args:
        key: the name :func:`solve_snapshot_job` finds the data under.
        X, Y: the run's data (CPU tensors).
        chained: give the run a :class:`WarmStartChain`, so that each of its solves starts from the previous one.
    """
    _WORKER_RUNS.clear()
    _WORKER_RUNS[key] = _WorkerRun(X, Y, WarmStartChain() if chained else None)


def solve_snapshot_job(
    spec: SolveSpec,
    snap: Snapshot,
    data_key: str | None,
    solve_fn: Callable[..., Any],
    chain: WarmStartChain | None = None,
) -> SolveOutcome:
    """The background worker's job: :func:`evaluate_snapshot` of ``snap``, without the solution.

    Args:
        spec, snap, solve_fn: as for :func:`evaluate_snapshot`.
        data_key: in a worker process, the key :func:`store_worker_data` stored the run's data (and chain) under;
            ``snap`` then carries no data. ``None`` in a worker thread, where ``snap`` carries the data.
        chain: in a worker thread, the run's warm-start chain (or ``None``). In a worker process the stored chain is
            used and ``chain`` must be ``None`` (an object sent to another process would be a copy).

    Raises:
        ValueError: both ``data_key`` and ``chain`` are given.
        KeyError: no data is stored under ``data_key`` in this process.
    """
    if data_key is not None:
        if chain is not None:
            raise ValueError("a worker process uses its stored chain: pass chain=None with a data_key")
        run = _WORKER_RUNS[data_key]
        snap = replace(snap, X=run.X, Y=run.Y)
        chain = run.chain
    # No warnings filter here: it is process-global and would hide the training thread's warnings too.
    return evaluate_snapshot(spec, snap, solve_fn, quiet=False, keep_solution=False, chain=chain)
