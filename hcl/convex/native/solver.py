"""The native solver's entry point: :func:`solve_native`."""

from __future__ import annotations

import dataclasses
import time

import torch

from hcl.convex.native.admm import admm
from hcl.convex.native.certificate import bracket, final_status
from hcl.convex.native.clock import WRAP_UP_ITERATIONS, Deadline
from hcl.convex.native.first_order import first_order
from hcl.convex.native.interior_point import interior_point
from hcl.convex.native.memory import plan
from hcl.convex.native.operator import Operator, Result
from hcl.convex.native.options import NativeOptions
from hcl.convex.native.threads import solve_threads
from hcl.convex.native.warm_start import Multipliers, warm_point
from hcl.convex.problem import ConvexProblem, ConvexSolution

_METHODS = {"newton": interior_point, "fista": first_order, "admm": admm}


def solve_native(
    problem: ConvexProblem,
    *,
    gated: bool = False,
    warm_start: ConvexSolution | tuple | None = None,
    **options,
) -> ConvexSolution:
    """Solve ``problem`` (or its gated relaxation) with hcl's native solver.

    Args:
        problem: the convex problem; the solve runs on its tensors' device.
        gated: solve the gated relaxation (free ``z_i = U_i``, ``V = 0``, no cone constraints).
        warm_start: a :class:`ConvexSolution` or a ``(U, V, b0[, multipliers])`` tuple with this problem's
            number of patterns (see :func:`~hcl.convex.native.remap_warm_start` when the patterns changed).
        **options: the fields of :class:`~hcl.convex.native.NativeOptions` — ``method="auto"``, ``tol=None`` and
            ``constraint_tol=None`` (1e-6, or 1e-3 for the ADMM), ``max_iters=None``, ``time_limit=None``,
            ``penalty=None``, ``dtype=None``, ``chunk_size=None``, ``memory_limit=None``, ``num_threads=None``,
            ``verbose=False``.

    Returns:
        A :class:`ConvexSolution`: ``U, V, b0`` in the problem's dtype, ``value`` the objective of exactly that point
        (recomputed in float64), ``dual_value`` the certified lower bound, ``violation`` the largest cone violation
        (absolute, data units), ``iterations``, ``multipliers`` (a :class:`Multipliers`, for warm starts) and
        ``status``: ``OPTIMAL`` only when the returned point's relative gap to ``dual_value`` is within ``tol`` and its
        violation within ``constraint_tol`` (checked again here, see :func:`final_status`); ``OPTIMAL_INACCURATE``
        for a usable point whose gap could not be closed (``λ = 0``, where the only certifiable bound is 0, or a
        certificate that stopped closing within ``√tol``); ``MAX_ITERATIONS`` or ``TIME_LIMIT`` when stopped early
        (``value`` and ``dual_value`` still bracket the optimum); ``FAILED`` for a non-finite value.

    Raises:
        TypeError: ``problem`` is not a :class:`ConvexProblem`, or an unknown option.
        ValueError: bad options or a warm start of the wrong shape.
        SolverMemoryError: (a ``MemoryError``) the method asked for does not fit the memory budget, or with
            ``method="auto"`` not even the first-order method chunked does; raised before anything is allocated.
    """
    unknown = [name for name in options if name not in NativeOptions.names()]
    if unknown:
        raise TypeError(f"solve_native() got an unexpected keyword argument {unknown[0]!r}")
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    start = time.perf_counter()  # the time limit counts from here (the threads' sample below takes 0.1 s)
    asked = NativeOptions(**options)
    chosen = plan(problem, asked)  # the method that fits the memory, before allocating
    dtype = chosen.working_dtype(problem)
    chosen = chosen.resolved(problem)
    size = problem.n * problem.d * problem.num_patterns * problem.c
    with solve_threads(problem.X.device, size, chosen.num_threads):
        return _run(problem, chosen, dtype, gated, warm_start, asked, start)


def planned_method(problem: ConvexProblem, **options) -> str | None:
    """The method :func:`solve_native` would run on ``problem`` with ``options`` (the memory plan's choice for
    ``method="auto"``), or ``None`` when none fits; nothing is allocated."""
    try:
        return plan(problem, NativeOptions(**options)).resolved(problem).method
    except MemoryError:
        return None


def _run(problem: ConvexProblem, chosen: NativeOptions, dtype: torch.dtype, gated: bool, warm_start,
         asked: NativeOptions, start: float) -> ConvexSolution:
    deadline = (None if chosen.time_limit is None else
                Deadline(start, float(chosen.time_limit), WRAP_UP_ITERATIONS[chosen.method]))

    op = Operator(problem, gated=gated, dtype=dtype, row_space=True)
    warm = None if warm_start is None else warm_point(op, warm_start)
    if problem.zero_optimum:  # Y = 0, or constant with an output bias: the zero network, p* = 0
        return ConvexSolution.zero_network(problem, "native-" + chosen.method, gated, time.perf_counter() - start)
    # a precision chosen by default, below float64: where it stalls, the solve goes on in float64 if that fits
    wider = None
    if chosen.method in _FALLBACK and dtype != torch.float64 and asked.dtype is None:
        wider = _float64_plan(problem, chosen, asked)
    if wider is not None:
        result = _METHODS[chosen.method](op, chosen, warm, deadline, precision_fallback=True)
    else:
        result = _METHODS[chosen.method](op, chosen, warm, deadline)
    reached = None
    if result.stalled and result.iterations < chosen.max_iters and (deadline is None or not deadline.reached()):
        if chosen.verbose:
            print(f"{chosen.method}: stalled in {dtype} after {result.iterations} iterations; going on in float64")
        reached = _solution(op, result, time.perf_counter() - start, "native-" + chosen.method, chosen)
        op = Operator(problem, gated=gated, dtype=torch.float64, row_space=True)
        rest = dataclasses.replace(wider, max_iters=chosen.max_iters - result.iterations,
                                   penalty=chosen.penalty if result.penalty is None else result.penalty)
        warm = dataclasses.replace(warm_point(op, reached), rho=result.rho)
        done = result.iterations
        if deadline is not None:
            deadline.restart()
        result = _METHODS[chosen.method](op, rest, warm, deadline)
        result.iterations += done
    solution = _solution(op, result, time.perf_counter() - start, "native-" + chosen.method, chosen)
    if reached is not None and reached.dual_value > solution.dual_value:  # the float32 part's bound holds as well
        status = final_status(problem, result.status, solution.value, reached.dual_value, solution.violation, chosen)
        solution = dataclasses.replace(solution, dual_value=reached.dual_value, status=status)
    return solution


_FALLBACK = ("admm", "fista")  # the methods that work below float64 and go on in float64 where that stalls


def _float64_plan(problem: ConvexProblem, chosen: NativeOptions, asked: NativeOptions) -> NativeOptions | None:
    """``chosen``'s method planned in float64 (its own chunk size and history from the budget), or ``None`` when it
    does not fit there."""
    try:
        wider = plan(problem, dataclasses.replace(asked, method=chosen.method, dtype=torch.float64))
    except MemoryError:
        return None
    return dataclasses.replace(wider.resolved(problem), max_iters=chosen.max_iters)


def _solution(op: Operator, result: Result, seconds: float, name: str, options: NativeOptions) -> ConvexSolution:
    """The method's result in the problem's units, with its value recomputed, its certificate and its final status."""
    U, V, b0, value, dual, violation = bracket(op, result.W, result.mu, result.bound_point)
    status = final_status(op.problem, result.status, value, dual, violation, options)
    multipliers = None
    if result.mu is not None:
        multipliers = Multipliers(op.multipliers_in_data_units(result.mu).to_sparse(), result.penalty)
    return ConvexSolution(
        value=value,
        U=U,
        V=V,
        b0=b0,
        status=status,
        solver=name,
        solve_seconds=seconds,
        iterations=result.iterations,
        dual_value=dual,
        violation=violation,
        gated=op.gated,
        multipliers=multipliers,
        gap_floor=op.problem.gap_floor,
    )
