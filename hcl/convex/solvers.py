"""The solvers of the convex problem, registered by name, and the one entry point :func:`solve`.

Each solver is a small object with a ``name``, the keyword ``options`` it accepts and a ``solve`` method, modelled
on cvxpy's solver interfaces. Registered here:

* ``"native"``: hcl's own torch solver (:func:`hcl.convex.native.solve_native`), on the data's device;
* ``"cvxpylayers"``: the problem as a differentiable ``CvxpyLayer`` (:func:`hcl.convex.layers.solve_layer`);
* each installed cvxpy conic solver — ``"clarabel"``, ``"ecos"``, ``"scs"``, ``"mosek"`` —
  (:func:`hcl.convex.cvxpy_solver.solve_cvxpy`);
* ``"auto"``: :func:`choose_solver`, i.e. Clarabel where it is faster (small problems) and the native solver
  otherwise (``docs/solvers.md`` has the measurements).

Every solver accepts ``gated``, ``warm_start``, ``time_limit``, ``verbose`` and ``memory_limit``; a solver that
cannot use a warm start or a time limit ignores it, as cvxpy's solvers ignore ``warm_start``. An option a named
solver does not accept is a ``TypeError``; ``"auto"`` passes on only the options of the solver it chose.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import math
import numbers
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from hcl.checks import caller_stacklevel
from hcl.convex.cvxpy_solver import (
    _SOCP_SOLVERS,
    ConvexSolveError,
    certified_status,
    installed_solvers,
    solve_cvxpy,
    solver_settings,
)
from hcl.convex.native import Multipliers, NativeOptions, SolverMemoryError, dual_certificate, solve_native
from hcl.convex.native.options import DEFAULT_TOL
from hcl.convex.native.threads import SINGLE_THREAD_BELOW, solve_threads  # noqa: F401 (the switch, re-exported)
from hcl.convex.problem import ConvexProblem, ConvexSolution
from hcl.convex.status import Status

# "auto" with λ > 0: Clarabel up to this n·d·P·c, where the two solvers' times cross, the native solver above;
# see docs/solvers.md#auto-the-switch-points-measured
AUTO_NATIVE_ABOVE = 5_000
# "auto" with λ = 0, where the native solver certifies no bound above 0: Clarabel keeps the small experiments;
# see docs/solvers.md#auto-the-switch-points-measured
AUTO_NATIVE_ABOVE_UNREGULARIZED = 25_000

#: The options every solver accepts (a solver that cannot use a warm start or a time limit ignores it).
COMMON_OPTIONS = frozenset({"gated", "warm_start", "time_limit", "verbose", "memory_limit"})


class Solver(abc.ABC):
    """A solver of :class:`ConvexProblem`, registered under :attr:`name`.

    Subclasses set :attr:`name` and :attr:`options` (the keyword options :meth:`solve` accepts) and implement
    :meth:`solve`.
    """

    name: str = ""
    options: frozenset[str] = COMMON_OPTIONS

    @abc.abstractmethod
    def solve(self, problem: ConvexProblem, **options: Any) -> ConvexSolution:
        """Solve ``problem``; ``options`` are among :attr:`options` (:func:`solve` checks them first)."""

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` naming the first option this solver does not accept."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.options, n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            # every name, also where they are many (a conic solver's own settings): a command line cannot look them up
            raise TypeError(f"solver {self.name!r} takes no option {unknown[0]!r}{hint}; its options: "
                            f"{', '.join(sorted(self.options))}")

    def accepted(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``options`` this solver accepts."""
        return {key: value for key, value in options.items() if key in self.options}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NativeSolver(Solver):
    """hcl's own solver (:func:`~hcl.convex.native.solve_native`): the fields of its ``NativeOptions``."""

    name = "native"
    options = COMMON_OPTIONS | set(NativeOptions.names())

    def solve(self, problem: ConvexProblem, **options: Any) -> ConvexSolution:
        return solve_native(problem, **options)  # it chooses its threads (option num_threads)

    @staticmethod
    @contextlib.contextmanager
    def cpu_threads(problem: ConvexProblem, num_threads: int | None = None) -> Iterator[None]:
        """The torch threads a native solve of ``problem`` runs on (:func:`~hcl.convex.native.threads.solve_threads`):
        ``num_threads``, or one below ``SINGLE_THREAD_BELOW`` and else the usable idle cores; set and restored on
        the main thread only."""
        with solve_threads(problem.X.device, problem_size(problem), num_threads):
            yield


class LayerSolver(Solver):
    """The differentiable layer (:func:`~hcl.convex.layers.solve_layer`); it starts cold and has no time limit."""

    name = "cvxpylayers"
    options = COMMON_OPTIONS | {"solver_args"}

    def solve(self, problem: ConvexProblem, *, warm_start: Any = None, time_limit: float | None = None,
              **options: Any) -> ConvexSolution:
        from hcl.convex.layers import solve_layer  # cvxpylayers is imported only when asked for

        return solve_layer(problem, **options)


class ConicSolver(Solver):
    """An installed cvxpy conic solver (:func:`~hcl.convex.cvxpy_solver.solve_cvxpy`), which starts cold.

    Its options are the common ones and the solver's own settings (:func:`~hcl.convex.cvxpy_solver.solver_settings`,
    e.g. ``tol_gap_rel`` for Clarabel), which go to cvxpy.
    """

    def __init__(self, cvxpy_name: str) -> None:
        self.cvxpy_name = cvxpy_name.upper()
        self.name = cvxpy_name.lower()
        self.options = COMMON_OPTIONS | solver_settings(self.cvxpy_name)

    def solve(self, problem: ConvexProblem, *, warm_start: Any = None, **options: Any) -> ConvexSolution:
        return solve_cvxpy(problem, self.cvxpy_name, **options)


class AutoSolver(Solver):
    """``"auto"``: the solver :func:`choose_solver` picks, given only the options that solver accepts.

    So one set of options can carry a warm start and native tolerances whatever the choice: Clarabel ignores what it
    does not take. An option that neither candidate accepts is still a ``TypeError``. When the chosen conic solver
    fails (:class:`ConvexSolveError`) or does not fit the memory budget, the native solver solves instead, with a
    warning; one stopped at a limit returns its point and status.
    """

    name = "auto"

    @property
    def options(self) -> frozenset[str]:  # type: ignore[override]
        candidates = [get_solver("native")]
        if "CLARABEL" in installed_solvers():
            candidates.append(get_solver("clarabel"))
        return frozenset().union(*(solver.options for solver in candidates))

    def solve(self, problem: ConvexProblem, **options: Any) -> ConvexSolution:
        chosen = get_solver(choose_solver(problem))
        if chosen.name == "native":
            return chosen.solve(problem, **chosen.accepted(options))
        try:
            return chosen.solve(problem, **chosen.accepted(options))
        except (ConvexSolveError, SolverMemoryError) as error:  # the native solver needs less memory
            warnings.warn(f"{chosen.name} failed ({error}); solving with the native solver", stacklevel=3)
            native = get_solver("native")
            return native.solve(problem, **native.accepted(options))


_REGISTRY: dict[str, Solver] = {}
_REGISTRY_LOCK = threading.Lock()  # a worker thread may make the first solve while training validates a name


class SolverOutputWarning(UserWarning):
    """What hcl set aside of a solver's result (multipliers of another shape): said even where solver chatter is not
    (the monitors pass it on as a message)."""


def register_solver(solver: Solver) -> None:
    """Make ``solver`` available to :func:`solve` under ``solver.name`` (case-insensitive).

    Raises:
        TypeError: ``solver`` is not a named :class:`Solver`, or its ``options`` are not a set of names.
        ValueError: the name is a built-in solver's (``"auto"``, ``"native"``, ``"cvxpylayers"``, an installed cvxpy
            solver) and ``solver`` is not one of that kind.
    """
    if not isinstance(solver, Solver) or not isinstance(solver.name, str) or not solver.name:
        raise TypeError(f"solver must be a named Solver, got {solver!r}")
    options = solver.options
    if not isinstance(options, (set, frozenset)) or not all(isinstance(option, str) for option in options):
        raise TypeError(f"solver {solver.name!r}: options must be a set of option names, got {options!r}")
    registry = _registry()
    with _REGISTRY_LOCK:
        known = registry.get(solver.name.lower())
        if known is not None and built_in(known) and type(known) is not type(solver):
            raise ValueError(f"{solver.name!r} is a built-in solver's name: register {type(solver).__name__} under "
                             "another name")
        registry[solver.name.lower()] = solver


def solvers_used(name: str) -> tuple[Solver, ...]:
    """The registered solvers a solve by ``name`` may call: that one, and for ``"auto"`` its candidates."""
    names = [name.lower()] + (["native", "clarabel"] if name.lower() == "auto" else [])
    return tuple(get_solver(each) for each in names if each in _registry())


def solve_registered(
    solvers: tuple[Solver, ...], solve_fn: Callable[..., ConvexSolution], problem: ConvexProblem, name: str,
    **options: Any,
) -> ConvexSolution:
    """``solve_fn(problem, name, **options)`` (:func:`solve`) with ``solvers`` (:func:`solvers_used`) registered
    first: a worker process starts with the built-in solvers only, so a user's travel with its job (pickled: their
    classes must be importable there)."""
    for solver in solvers:
        register_solver(solver)
    return solve_fn(problem, name, **options)


def _registry() -> dict[str, Solver]:
    # Filled on first use: finding the installed conic solvers solves a tiny problem with each.
    with _REGISTRY_LOCK:
        if not _REGISTRY:
            solvers: dict[str, Solver] = {"auto": AutoSolver(), "native": NativeSolver(), "cvxpylayers": LayerSolver()}
            for name in installed_solvers():
                solvers.setdefault(name.lower(), ConicSolver(name))
            _REGISTRY.update(solvers)
    return _REGISTRY


def get_solver(name: str) -> Solver:
    """The solver registered as ``name`` (case-insensitive).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: no solver has that name (the message lists :func:`available_solvers`).
    """
    if not isinstance(name, str):
        raise TypeError(f"solver must be a string, got {type(name).__name__}")
    solver = _registry().get(name.lower())
    if solver is None:
        raise ValueError(unknown_solver(name))
    return solver


def unknown_solver(name: str) -> str:
    """Why ``name`` is no solver here: one of the cvxpy cone solvers hcl takes that is not installed, one of cvxpy's
    others, or no name at all; with the names that are."""
    import cvxpy.settings

    if name.upper() in cvxpy.settings.SOLVERS and name.upper() not in _SOCP_SOLVERS:
        return (f"solver {name!r} is cvxpy's {name.upper()}, not one hcl solves the convex problem (its second-order "
                f"cones) with: use one of {available_solvers()}")
    if name.upper() in _SOCP_SOLVERS:
        return (f"solver {name!r} is cvxpy's {name.upper()}, which is not installed here (install its package, "
                f"which cvxpy's docs name); available: {available_solvers()}")
    return f"unknown solver {name!r}; available: {available_solvers()}"


def check_solver_options(solver: str, options: Mapping[str, Any]) -> None:
    """Check ``options`` for ``solver`` before any solve: their names (as :func:`solve` does) and, for the native
    solver's (``"auto"`` included), their values.

    Raises:
        TypeError: an option the solver does not accept.
        ValueError: an unknown solver, or a native option's value out of its range (the message names the option).
    """
    entry = get_solver(solver)
    entry.check_options(options)
    # every solver's common options, refused here rather than differently (or not at all) by each solver
    limits = {key: options[key] for key in ("memory_limit", "time_limit") if options.get(key) is not None}
    NativeOptions(**limits)
    for key in ("gated", "verbose"):
        value = options.get(key, False)
        if value is None or isinstance(value, np.bool_):  # None: the default; NumPy's bool
            continue
        if not isinstance(value, (bool, numbers.Integral)) or (key == "gated" and not isinstance(value, bool)):
            raise ValueError(f"{key} must be a bool, got {value!r}")
    if entry.name in ("native", "auto"):
        native = {key: value for key, value in options.items() if key in NativeOptions.names()}
        NativeOptions(**native)  # validates on construction


def available_solvers() -> list[str]:
    """Solver names :func:`solve` accepts here: ``auto``, ``native``, ``cvxpylayers`` and the installed cvxpy ones."""
    return list(_registry())


def problem_size(problem: ConvexProblem) -> int:
    """``n · d · P · c``, the size :func:`choose_solver` compares with its switch points."""
    return problem.n * problem.d * problem.num_patterns * problem.c


def choose_solver(problem: ConvexProblem) -> str:
    """The solver ``"auto"`` uses for ``problem``: ``"clarabel"`` for small problems on the CPU, else ``"native"``.

    Small means ``n·d·P·c`` up to ``AUTO_NATIVE_ABOVE`` (``AUTO_NATIVE_ABOVE_UNREGULARIZED`` when ``λ = 0``). Data on
    an accelerator always goes to the native solver (no copy to the CPU and back).
    """
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    switch = AUTO_NATIVE_ABOVE if problem.weight_decay > 0 else AUTO_NATIVE_ABOVE_UNREGULARIZED
    small = problem_size(problem) <= switch
    if small and problem.X.device.type == "cpu" and "CLARABEL" in installed_solvers():
        return "clarabel"
    return "native"


def solve(problem: ConvexProblem, solver: str = "auto", **options: Any) -> ConvexSolution:
    """Solve ``problem`` with the solver registered as ``solver``; ``options`` go to that solver.

    Args:
        problem: the convex problem.
        solver: ``"auto"``, ``"native"``, ``"cvxpylayers"`` or an installed cvxpy solver name
            (case-insensitive; see :func:`available_solvers`).
        **options: the solver's options: ``gated``, ``warm_start``, ``time_limit``, ``verbose`` and ``memory_limit``
            for every solver; ``tol``, ``method``, … for ``"native"``; ``solver_args`` for ``"cvxpylayers"``; a conic
            solver's own settings. ``"auto"`` passes on only those of the solver it chose.

    Raises:
        TypeError: ``problem`` is not a :class:`ConvexProblem`, ``solver`` is not a string, or an option the solver
            does not accept (the message names both).
        ValueError: an unknown solver name (the message lists the available ones).
        ConvexSolveError: a cvxpy solver failed (``"auto"`` then falls back to the native solver).
    """
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    check_solver_options(solver, options)  # the values too: "auto" would otherwise drop those Clarabel does not take
    entry = get_solver(solver)
    solution = entry.solve(problem, **options)
    return solution if built_in(entry) else checked_solution(problem, solution, entry.name, **options)


def built_in(solver: Solver) -> bool:
    """One of hcl's own solvers (not a subclass): they evaluate the point they return in float64 and certify its bound
    themselves; another solver's value, violation, bound and status are recomputed from its point by :func:`solve`."""
    return type(solver) in (AutoSolver, NativeSolver, LayerSolver, ConicSolver)


def checked_solution(problem: ConvexProblem, solution: Any, name: str, **options: Any) -> ConvexSolution:
    """Another solver's solution as hcl's solvers report theirs: its point checked (type, shapes, finite), its value
    and violation evaluated in float64, its bound hcl's certificate (with the solver's cone multipliers when they are
    :class:`~hcl.convex.native.Multipliers`) and ``"optimal"`` kept only where that certificate closes the gap within
    the ``tol`` option (at least ``DEFAULT_TOL``, and 100 float32 ulp for a point below float64). A non-finite point is
    ``"failed"``; ``b0 = None`` is zero for a problem without an output bias.

    Raises:
        TypeError: the solver returned something else than a :class:`ConvexSolution`.
        ValueError: ``U``, ``V`` or ``b0`` has not the problem's shape.
    """
    if not isinstance(solution, ConvexSolution):
        raise TypeError(f"solver {name!r} returned a {type(solution).__name__}, not a ConvexSolution")
    gated = bool(options.get("gated", False))
    shapes = {"U": (problem.num_patterns, problem.d, problem.c), "V": (problem.num_patterns, problem.d, problem.c),
              "b0": (problem.c,)}
    point = {}
    for field, shape in shapes.items():
        value = getattr(solution, field)
        if field == "b0" and value is None and not problem.output_bias:
            value = problem.X.new_zeros(problem.c)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"solver {name!r} returned {field} of shape {got}, not {shape}")
        point[field] = value.detach().to(dtype=torch.float64, device=problem.X.device)
    if not all(bool(torch.isfinite(t).all()) for t in point.values()):
        return dataclasses.replace(solution, value=math.nan, status=Status.FAILED, dual_value=None)
    exact = problem.in_float64()
    b0 = point["b0"] if problem.output_bias else None
    value = float(exact.objective(point["U"], point["V"], b0))
    violation = 0.0 if gated else float(exact.violation(point["U"], point["V"]))
    dual = dual_certificate(problem, point["U"], point["V"], b0, gated=gated)  # with μ = 0: always a bound
    if isinstance(solution.multipliers, Multipliers):
        try:
            dual = max(dual, dual_certificate(problem, point["U"], point["V"], b0, solution.multipliers, gated=gated))
        except (ValueError, RuntimeError) as error:  # multipliers of another shape: the bound without them, said
            warnings.warn(f"solver {name!r} returned multipliers hcl cannot use ({error}): its bound is the one with "
                          "μ = 0", SolverOutputWarning, stacklevel=caller_stacklevel())
    status = Status.of(solution.status)
    if status.solved:
        # a float32 point's own rounding moves its value by ~1e-7 of it (1.2e-6 measured on a tiny one); a point in a
        # half precision is allowed no more (its rounding is 0.2–0.8 % of every entry: it is rarely optimal)
        rounding = 0.0 if solution.U.dtype == torch.float64 else 100.0 * torch.finfo(torch.float32).eps
        tol = max(DEFAULT_TOL, float(options.get("tol") or 0.0), rounding)
        status = certified_status(problem, status, value, dual, violation, tol=tol)
    return dataclasses.replace(solution, value=value, violation=violation, dual_value=dual, status=status,
                               gated=gated, gap_floor=problem.gap_floor)
