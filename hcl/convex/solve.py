"""One entry point for every solver of the convex problem.

``solve(problem, solver, **options)`` dispatches to

* ``"native"``: hcl's own torch solver (:func:`hcl.convex.native.solve_native`), on the data's device;
* ``"cvxpylayers"``: the problem as a differentiable ``CvxpyLayer`` (:func:`hcl.convex.layers.solve_layer`);
* a cvxpy conic solver — ``"clarabel"``, ``"ecos"``, ``"scs"``, ``"mosek"`` — when installed
  (:func:`hcl.convex.cvxpy_solver.solve_cvxpy`);
* ``"auto"``: :func:`choose_solver`, i.e. Clarabel where it is faster (small problems) and the native
  solver otherwise. The switch point was measured (``benchmarks/solvers.py --crossover``; the table is
  in ``docs/solvers.md``) on the size ``n · d · P · c``.

Options that only one family understands are dropped for the others, so that a caller (the convex-gap
callback) can pass ``warm_start`` and native tolerances whatever the solver: cvxpy solvers ignore
``warm_start``, ``tol``, ``constraint_tol``, ``max_iters``, ``penalty``, ``dtype``, ``chunk_size`` and
``method``; the native solver ignores nothing (an unknown option is a ``TypeError``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from hcl.convex.cvxpy_solver import ConvexSolveError, installed_solvers, solve_cvxpy
from hcl.convex.native import solve_native
from hcl.convex.problem import ConvexProblem, ConvexSolution

# ``"auto"`` takes Clarabel up to this size n·d·P·c and the native solver above it, when λ > 0. Measured
# (``benchmarks/solvers.py --only crossover``, random-gate instances, λ = 0.1): Clarabel was faster up to 4 320, the
# native solver from 6 860 on (1.1× there, 1.4–1.8× near 10⁴, 2.35× at the seed's size 2·10⁴).
AUTO_NATIVE_ABOVE = 5_000
# The same switch when λ = 0. There the native solver can only stop on its optimality residuals (status
# "optimal_inaccurate", certified bound 0, which the dashboard would show as a duality gap equal to the optimum),
# so Clarabel, a few hundredths of a second per solve at these sizes, keeps the problems up to just above the seed's
# size, where every experiment of the seed has λ = 0.
AUTO_NATIVE_ABOVE_UNREGULARIZED = 25_000

_NATIVE_ONLY = ("warm_start", "tol", "constraint_tol", "max_iters", "penalty", "dtype", "chunk_size", "method")


# Below this size n·d·P·c a CPU solve is dominated by per-operation overhead, which extra torch threads only
# add to (measured: 30× slower with 2 threads than with 1 on a busy 2-core machine at the seed's size); at
# (500, 20, 100), 10⁶, two threads were faster on a quiet 2-core machine (1.99 s against 2.27 s).
SINGLE_THREAD_BELOW = 1_000_000


@contextlib.contextmanager
def _cpu_threads_for(problem: ConvexProblem) -> Iterator[None]:
    if problem.X.device.type != "cpu" or problem_size(problem) >= SINGLE_THREAD_BELOW:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _solve_native(problem: ConvexProblem, options: dict) -> ConvexSolution:
    with _cpu_threads_for(problem):
        return solve_native(problem, **options)


def available_solvers() -> list[str]:
    """Solver names :func:`solve` accepts here: ``auto``, ``native``, ``cvxpylayers`` and the installed cvxpy ones."""
    return ["auto", "native", "cvxpylayers"] + [name.lower() for name in installed_solvers()]


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


def solve(problem: ConvexProblem, solver: str = "auto", **options) -> ConvexSolution:
    """Solve ``problem`` with ``solver`` (see the module docstring); ``options`` go to that solver.

    Args:
        problem: the convex problem.
        solver: ``"auto"``, ``"native"``, ``"cvxpylayers"`` or an installed cvxpy solver name
            (case-insensitive).
        **options: e.g. ``gated``, ``warm_start``, ``tol``, ``time_limit``, ``verbose``.

    Raises:
        TypeError: ``problem`` is not a :class:`ConvexProblem` or ``solver`` is not a string.
        ValueError: an unknown solver name (the message lists the available ones).
        ConvexSolveError: a cvxpy solver failed (``"auto"`` then falls back to the native solver).
    """
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a string, got {type(solver).__name__}")
    name = solver.lower()
    if name == "auto":
        choice = choose_solver(problem)
        if choice == "native":
            return _solve_native(problem, options)
        try:
            return _solve_cvxpy(problem, choice, options)
        except ConvexSolveError as error:
            warnings.warn(f"{choice} failed ({error}); solving with the native solver", stacklevel=2)
            return _solve_native(problem, options)
    if name == "native":
        return _solve_native(problem, options)
    if name == "cvxpylayers":
        from hcl.convex.layers import solve_layer  # cvxpylayers is imported only when asked for

        return solve_layer(problem, **{k: v for k, v in options.items() if k != "warm_start"})
    if name.upper() in installed_solvers():
        return _solve_cvxpy(problem, name, options)
    raise ValueError(f"unknown solver {solver!r}; available: {available_solvers()}")


def _solve_cvxpy(problem: ConvexProblem, name: str, options: dict) -> ConvexSolution:
    kept = {k: v for k, v in options.items() if k not in _NATIVE_ONLY}
    return solve_cvxpy(problem, name.upper(), **kept)
