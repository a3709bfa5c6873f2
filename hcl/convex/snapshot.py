"""The solve of one snapshot of a network: build its convex problem, solve it, measure the gap.

Importable without Lightning, so that a worker process starts quickly. A chain of solves (one training run) carries
each solution to the next snapshot through a :class:`WarmStartChain`; in a worker process the chain lives in the
process's store beside the run's data (:func:`store_worker_data`).

What a solve proves is a :class:`Bracket` (:func:`bracket`): the optimum only when the solver certified it and nothing
known contradicts it, a feasible value above ``p*`` and a certified dual value below it. No value is ever capped: the
tags, and when each is certified, are in ``docs/dashboards.md``.
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hcl.convex.build import problem_from_network
from hcl.convex.feasibility import feasible_solution
from hcl.convex.native import NativeOptions, planned_method, remap_warm_start
from hcl.convex.native.options import default_tol
from hcl.convex.problem import ConvexProblem, ConvexSolution, fold_bias, fold_weights, network_objective
from hcl.convex.solvers import SolverOutputWarning, choose_solver, get_solver
from hcl.convex.status import STATUS_CODES, Status, relative_gap
from hcl.patterns import pattern_keys

# An "optimal" value further than this (relative, floor ConvexProblem.gap_floor) above a known feasible value, or a
# point off its cones by more than this times max |Y|, is not believed (docs/dashboards.md#when-a-value-is-certified)
CHECK_TOL = 1e-6

__all__ = ["CHECK_TOL", "STATUS_CODES", "Bracket", "Snapshot", "SolveOutcome", "SolveSpec", "WarmStartChain", "bracket",
           "check_tol", "evaluate_snapshot", "solve_snapshot_job", "store_worker_data"]


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
    traceback: str | None = None  # and its traceback


# Share of the new patterns that must be among the old ones for the interior point's warm start: below it the remapped
# start was sometimes slower than a cold one (docs/solvers.md#tuned-constants). The first-order methods take it
# whatever the share (docs/solvers.md#warm-starts-of-the-admm)
WARM_MIN_KEPT_PATTERNS = 0.2
FIRST_ORDER_METHODS = ("admm", "fista")


def kept_pattern_share(old: Tensor, new: Tensor) -> float:
    """The share of ``new``'s pattern columns that are also columns of ``old`` (both ``(n, ·)`` boolean)."""
    if new.shape[1] == 0:
        return 1.0
    old_keys = {tuple(key) for key in pattern_keys(old.to(torch.bool)).tolist()}
    return sum(tuple(key) in old_keys for key in pattern_keys(new.to(torch.bool)).tolist()) / new.shape[1]


def runs_first_order(problem: ConvexProblem, solver: str, options: dict[str, Any]) -> bool:
    """Whether ``solve(problem, solver, **options)`` runs one of the native first-order methods (the memory plan's
    choice for ``method="auto"``); ``False`` for an unknown solver or options the native solver would refuse (the
    solve reports them)."""
    try:
        chosen = get_solver(solver)
        if chosen.name == "auto":
            chosen = get_solver(choose_solver(problem))
        if chosen.name != "native":
            return False
        native = {key: value for key, value in options.items() if key in NativeOptions.names()}
        return planned_method(problem, **native) in FIRST_ORDER_METHODS
    except (TypeError, ValueError):
        return False


class WarmStartChain:
    """The last solution of one chain of solves, to start the next solve from.

    :meth:`start_for` carries it over to a new problem's patterns with
    :func:`~hcl.convex.native.remap_warm_start` (each new pattern takes its nearest old pattern's block, with its
    multipliers); a problem of another shape (samples, features, outputs) or of the other kind (gated or not) gets
    ``None``: a cold start. So does, for the interior point, one whose patterns are mostly new (fewer than
    ``WARM_MIN_KEPT_PATTERNS`` of them kept): it re-centres for about 20 iterations even from the optimum, and a start
    far from it costs more. A first-order method (``first_order``) gains from any nearby start, and between two
    training steps nearly every new pattern differs from an old one in a few samples. Not thread-safe: one chain
    belongs to one sequence of solves.
    """

    def __init__(self) -> None:
        self._last: tuple[ConvexProblem, ConvexSolution] | None = None

    def start_for(self, problem: ConvexProblem, gated: bool, first_order: bool = False) -> tuple | None:
        """The last kept solution remapped to ``problem``'s patterns, or ``None`` when there is none that fits
        (``first_order``: the solve runs the ADMM or FISTA, which take it however many patterns are new)."""
        if self._last is None:
            return None
        old_problem, old_solution = self._last
        if old_problem.X.shape != problem.X.shape or old_problem.c != problem.c or old_solution.gated != gated:
            return None
        if not first_order and kept_pattern_share(old_problem.patterns, problem.patterns) < WARM_MIN_KEPT_PATTERNS:
            return None  # most blocks would start from another pattern's: a cold start is faster there
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
        The metrics to log (``<prefix>/status`` always, a :class:`~hcl.convex.status.Status` code; the other tags and
        when each is certified in ``docs/dashboards.md``), the messages to warn with, and the solution if asked for.
        An optimal status that the :func:`bracket` refutes is logged as ``OPTIMAL_INACCURATE`` with a message.
    """
    p = spec.prefix
    owner = spec.owner
    if not _finite_weights(snap):
        return SolveOutcome({f"{p}/status": Status.NONFINITE.code},
                            [f"{owner}: non-finite network weights at step {snap.step}; no solve"])
    metrics: dict[str, float] = {}
    options = dict(spec.solver_options)
    if spec.time_limit is not None:
        options.setdefault("time_limit", spec.time_limit)
    start = time.perf_counter()
    try:
        L, problem, point = _network_point(spec, snap, metrics)
        first_order = chain is not None and runs_first_order(problem, spec.solver, options)
        warm = (chain.start_for(problem, spec.gated, first_order=first_order) if chain is not None else None) or point
        caught: list = []
        if quiet:  # solver chatter (the status is logged instead), but what hcl set aside of a solver's result
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("ignore")
                warnings.simplefilter("always", SolverOutputWarning)
                solution = solve_fn(problem, spec.solver, gated=spec.gated, warm_start=warm, **options)
        else:  # no filter in a worker thread: the state is process-global, and restored late it clobbers the training's
            solution = solve_fn(problem, spec.solver, gated=spec.gated, warm_start=warm, **options)
        notes = [f"{owner}: {w.message}" for w in caught if issubclass(w.category, SolverOutputWarning)]
        if not isinstance(solution, ConvexSolution):
            raise TypeError(f"the solver returned {type(solution).__name__}, not a ConvexSolution")
        seconds = time.perf_counter() - start  # the solve's own time, against its limit
        if chain is not None:  # the solver's own point and multipliers start the next solve
            chain.keep(problem, solution)
        # a point outside its cones by any amount (its value can be below p*) is moved in, along the network's own
        # neurons (points of their cones), unless its solve stopped at its limit (a move takes seconds at MNIST's sizes)
        directions = (point[0] + point[1]).sum(-1).T if not spec.gated else None
        stopped = Status.of(solution.status) == Status.TIME_LIMIT
        if not stopped and (spec.time_limit is None or seconds < spec.time_limit):
            solution = feasible_solution(problem, solution, check_tol(spec.solver_options, solution.solver), directions)
        elif solution.violation > 0:  # bounded by its dual value only
            solution = replace(solution, status=Status.TIME_LIMIT.value)
        outcome = _measure(spec, snap, problem, point, solution, L, seconds, metrics, keep_solution)
        return replace(outcome, messages=notes + outcome.messages)
    except Exception as err:  # noqa: BLE001 - a failed solve must never stop training
        seconds = time.perf_counter() - start
        late = spec.time_limit is not None and seconds >= spec.time_limit
        metrics[f"{p}/status"] = (Status.TIME_LIMIT if late else Status.FAILED).code
        metrics[f"{p}/solve_seconds"] = seconds
        reason = f" after {seconds:.2f} s (time limit {spec.time_limit} s)" if late else ""
        # where it was raised: a bug in a solver of one's own is found from the warning alone
        frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ is not None else None
        error = f"{type(err).__name__}: {err}" + ("" if frame is None else
                                                   f" (raised at {frame.filename}:{frame.lineno} in {frame.name})")
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return SolveOutcome(metrics, [f"{owner}: convex solve failed at step {snap.step}{reason}: {error}"],
                            error=error, traceback=trace)


def _finite_weights(snap: Snapshot) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (snap.hidden_weight, snap.hidden_bias, snap.output_weight,
                                                        snap.output_bias) if t is not None)


def _network_point(spec: SolveSpec, snap: Snapshot, metrics: dict[str, float]) -> tuple[float, ConvexProblem, tuple]:
    """``L``, the snapshot's problem and the network's own point in it; ``metrics`` gets ``<p>/nonconvex_objective``
    and (exact problem) ``<p>/upper_bound``, the network point's value, as each is known."""
    p = spec.prefix
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
    if not spec.gated and not problem.is_bound:  # the network's own point: an upper bound even if the solve fails
        if math.isfinite(value := float(problem.objective(*point))):  # not once the network diverges (inf, NaN)
            metrics[f"{p}/upper_bound"] = value
    return L, problem, point


def network_metrics(spec: SolveSpec, snap: Snapshot) -> dict[str, float]:
    """What a snapshot tells without a solver, for a solve that never returned (abandoned, its worker died):
    ``<p>/nonconvex_objective`` and, for the exact problem, ``<p>/upper_bound`` at the network's own point. Never
    raises: as much as could be computed."""
    metrics: dict[str, float] = {}
    if _finite_weights(snap):
        try:
            _network_point(spec, snap, metrics)
        except Exception:  # noqa: BLE001 - what the solve would have reported as its failure
            pass
    return metrics


@dataclass(frozen=True)
class Bracket:
    """What one solve proves about the optimum ``p*`` of the problem it solved (the gated one when gated).

    Attributes:
        optimum: the solver's value, only when its status is optimal (a certified gap) and no known value
            contradicts it; ``None`` otherwise.
        upper_bound: the smallest feasible value known: the solver's value when its point is feasible (violation
            0; the monitors first move a point into its cones) and the given feasible value; ``p* ≤ upper_bound``.
            ``None`` when neither is known.
        lower_bound: the solver's certified dual value, ``≤ p*``; ``None`` when it gives none. Never the primal value.
        refuted: why the solver's claim (an optimal status, or its dual value) was not believed; ``None`` when
            nothing contradicted it.
    """

    optimum: float | None
    upper_bound: float | None
    lower_bound: float | None
    refuted: str | None = None


def bracket(
    problem: ConvexProblem,
    solution: ConvexSolution,
    feasible_value: float | None = None,
    tol: float = CHECK_TOL,
    constraint_tol: float = CHECK_TOL,
) -> Bracket:
    """The certified bracket ``lower_bound ≤ p* ≤ upper_bound`` of one solve, and its optimum when certified.

    Args:
        problem: the problem solved.
        solution: the solver's solution (of the gated relaxation when ``solution.gated``).
        feasible_value: the objective at a point known to be feasible (e.g. the network's own mapped point), so
            ``≥ p*``; ``None`` when there is none.
        tol: relative slack (floor ``problem.gap_floor``) in the consistency checks: an optimal value above
            ``feasible_value`` or below the dual value by more is refuted, as is a dual value above a feasible value.
        constraint_tol: the solver's point counts as feasible when its violation is at most this times ``max |Y|``.
    """
    value = float(solution.value)
    y_unit = float(problem.Y.abs().max()) or 1.0
    feasible = math.isfinite(value) and solution.violation <= constraint_tol * y_unit

    def slack(v: float) -> float:
        return tol * max(problem.gap_floor, abs(v))

    # only an exactly feasible point's value bounds p* from above (within a tolerance it can lie below p*)
    inside = feasible and solution.violation <= 0.0
    known = [v for v in (value if inside else None, feasible_value) if v is not None and math.isfinite(v)]
    upper = min(known) if known else None
    dual = solution.dual_value
    lower = float(dual) if dual is not None and math.isfinite(dual) else None
    refuted = None
    if lower is not None and upper is not None and lower > upper + slack(upper):
        refuted = f"its certified lower bound {lower:.9g} is above the feasible value {upper:.9g}"
        lower = None
    optimum = None
    if Status.of(solution.status) == Status.OPTIMAL and refuted is None and math.isfinite(value):
        if not feasible:
            refuted = f"its point violates the constraints by {solution.violation:.3g}"
        elif feasible_value is not None and value > feasible_value + slack(feasible_value):
            refuted = f"its value {value:.9g} is above the feasible value {feasible_value:.9g}"
        elif lower is not None and value < lower - slack(lower):
            refuted = f"its value {value:.9g} is below its certified lower bound {lower:.9g}"
        else:
            optimum = value
    return Bracket(optimum, upper, lower, refuted)


def _measure(
    spec: SolveSpec, snap: Snapshot, problem: ConvexProblem, point: tuple, solution: ConvexSolution, L: float,
    seconds: float, metrics: dict[str, float], keep_solution: bool,
) -> SolveOutcome:
    p, owner = spec.prefix, spec.owner
    tol = check_tol(spec.solver_options, solution.solver)
    # The network's own mapped point is feasible (for the gated relaxation too): its value is ≥ p*. The solver's point
    # counts as feasible only at the strict tolerance, whatever it was allowed: a looser one lets its value dip below
    # p*, so that it neither bounds p* from above nor is certified as the optimum
    known = bracket(problem, solution, float(problem.objective(*point)), tol, CHECK_TOL)
    status = Status.of(solution.status)
    if not math.isfinite(solution.value):
        status = Status.FAILED
    messages = []
    if known.refuted is not None:
        status = Status.OPTIMAL_INACCURATE if status == Status.OPTIMAL else status
        messages.append(f"{owner}: the {solution.solver} result at step {snap.step} is not certified: {known.refuted}")
    if spec.time_limit is not None and seconds > spec.time_limit and status != Status.FAILED:
        status = Status.TIME_LIMIT
        messages.append(f"{owner}: the solve of step {snap.step} took {seconds:.3g} s, over the time limit of "
                        f"{spec.time_limit} s")
    elif status != Status.OPTIMAL and known.refuted is None:
        why = ("; with weight_decay = 0 no bound above 0 is certified, so the native solver claims no optimum "
               "(a conic solver's own test does: solver='clarabel')"
               if problem.weight_decay == 0 and solution.solver.startswith("native")
               and Status.of(solution.status) == Status.OPTIMAL_INACCURATE else "")
        said = "" if str(solution.status) == status.value else f" (the solver said {str(solution.status)!r})"
        messages.append(f"{owner}: solver status '{status.value}' at step {snap.step}{said}{why}")
    exact = not spec.gated and not problem.is_bound  # the problem's optimum is the best network's objective
    metrics.update({
        f"{p}/solve_seconds": seconds,
        f"{p}/active_neurons": solution.active_neurons(problem=problem),
        f"{p}/status": status.code,
    })
    if status == Status.OPTIMAL and known.optimum is not None:
        if spec.gated:
            metrics[f"{p}/gated_optimum"] = known.optimum
        elif exact:
            metrics[f"{p}/optimum"] = known.optimum
            metrics[f"{p}/gap"] = L - known.optimum
    if exact and known.upper_bound is not None:
        metrics[f"{p}/upper_bound"] = known.upper_bound
    if known.lower_bound is not None:
        # Below every network with these patterns: the exact problem's dual for c = 1, the Frobenius problem's for
        # c > 1, the gated relaxation's (a gated network with the network's patterns as gates) when gated.
        metrics[f"{p}/gated_network_bound" if spec.gated else f"{p}/lower_bound"] = known.lower_bound + 0.0  # not −0
        metrics[f"{p}/max_gap"] = L - known.lower_bound
    if known.lower_bound is not None and known.upper_bound is not None:  # the bracket's width, both ends certified
        metrics[f"{p}/duality_gap"] = relative_gap(known.upper_bound, known.lower_bound, problem.gap_floor)
    # a refuted solution is not handed on (load_solution would move the network to it)
    solved = (problem, solution) if keep_solution and solution.ok and known.refuted is None else None
    return SolveOutcome(metrics, messages, solved)


def check_tol(solver_options: dict, solver: str | None = None) -> float:
    """The relative slack of the consistency checks: ``CHECK_TOL``, or the solver's ``tol`` when it is looser — the
    one given, else the default of the native method that ran (``solver``, e.g. ``"native-admm"``)."""
    tol = solver_options.get("tol")
    if tol is None and solver is not None and solver.startswith("native-"):
        tol = default_tol(solver.removeprefix("native-"))
    return max(CHECK_TOL, float(tol or 0.0))


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
