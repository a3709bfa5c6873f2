"""Solve the convex reformulation with a conic solver through cvxpy.

The problem is rebuilt with constant data at every call: the project's solver measurements found a
constant-data rebuild faster than any parametrised (DPP) formulation at the sizes where interior-point
methods are usable (``n`` up to a few hundred, ``P`` up to ~100). The formulation is vectorised — one
variable matrix per sign, no Python loop over patterns:

* ``U`` is a ``(d·c, P_u)`` variable whose column ``i`` is ``vec(U_i)`` (column-major), for the blocks
  allowed a positive part (``signs ≥ 0``); ``V`` likewise for ``signs ≤ 0``;
* the prediction of output ``k`` is ``M @ vec(U[k])`` with ``M = [D_1 X, …, D_P X]`` precomputed as a
  sparse matrix;
* the cone constraints are ``(2D − 1) ⊙ (X U[k]) ≥ 0`` element-wise.

The gated relaxation (``gated=True``) has one free ``z_i`` per pattern and no cone constraints; its
solution is returned as ``U = z``, ``V = 0`` with ``ConvexSolution.gated = True`` (then
``problem.objective(U, 0, b0)`` is exactly the gated objective ``s‖Σ D_i X z_i − Y‖² + 2λ Σ ‖z_i‖``).
Sign restrictions do not apply to the gated relaxation (it has no cones, so a sign would only shrink it
below ``g*``); its value is a lower bound on the exact problem with or without them.

Interior-point solutions satisfy the cone constraints only to the solver's tolerance: the returned
``violation`` reports the largest violation as is (nothing is projected away), and ``value`` is the
objective recomputed in the problem's dtype at the returned point.
"""

from __future__ import annotations

import functools
import time
import warnings

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from hcl.convex.problem import ConvexProblem, ConvexSolution

# Conic solvers that take second-order cones, in order of preference.
_SOCP_SOLVERS = ("CLARABEL", "ECOS", "SCS", "MOSEK")

# How each solver spells a wall-clock limit (ECOS has none).
_TIME_LIMIT_OPTION = {
    "CLARABEL": lambda t: {"time_limit": float(t)},
    "SCS": lambda t: {"time_limit_secs": float(t)},
    "MOSEK": lambda t: {"mosek_params": {"MSK_DPAR_OPTIMIZER_MAX_TIME": float(t)}},
}

_STATUS = {
    cp.OPTIMAL: "optimal",
    cp.OPTIMAL_INACCURATE: "optimal_inaccurate",
}


class ConvexSolveError(RuntimeError):
    """A conic solver failed, or returned no solution (infeasible, unbounded, a limit reached)."""


@functools.lru_cache(maxsize=1)
def installed_solvers() -> list[str]:
    """cvxpy's installed conic solvers able to take this SOCP, in order of preference.

    A solver counts only if a tiny second-order cone program actually solves with it, so a commercial
    solver without a licence (MOSEK) is left out.
    """
    available = set(cp.installed_solvers())
    usable = []
    for name in _SOCP_SOLVERS:
        if name in available and _solver_works(name):
            usable.append(name)
    return usable


def _solver_works(name: str) -> bool:
    x = cp.Variable(2)
    probe = cp.Problem(cp.Minimize(cp.sum_squares(x - 1.0) + cp.norm(x, 2)), [x >= 0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.solve(solver=name)
    except Exception:  # noqa: BLE001 - any failure (licence, import, crash) means "not usable"
        return False
    return probe.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)


def _check_solver(solver: str) -> str:
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a string, got {type(solver).__name__}")
    name = solver.upper()
    usable = installed_solvers()
    if name not in usable:
        raise ValueError(f"solver {solver!r} is not an installed SOCP solver; installed: {usable}")
    return name


def solve_cvxpy(
    problem: ConvexProblem,
    solver: str = "CLARABEL",
    *,
    gated: bool = False,
    time_limit: float | None = None,
    verbose: bool = False,
    **solver_options,
) -> ConvexSolution:
    """Solve ``problem`` (or its gated relaxation) with a cvxpy conic solver.

    Args:
        problem: the convex problem; its data is copied to CPU float64.
        solver: ``"CLARABEL"``, ``"ECOS"``, ``"SCS"`` or ``"MOSEK"`` (case-insensitive; see
            :func:`installed_solvers`).
        gated: solve the gated relaxation ``g*`` instead (free ``z_i``, no cone constraints).
        time_limit: wall-clock limit in seconds passed to the solver (ignored with a warning by ECOS,
            which has none).
        verbose: print the solver's log.
        **solver_options: passed to ``cvxpy.Problem.solve`` (e.g. ``tol_gap_rel`` for Clarabel).

    Returns:
        A :class:`ConvexSolution` with ``U, V`` of shape ``(P, d, c)`` and ``b0`` ``(c,)`` in the
        problem's dtype and device, ``value`` recomputed by ``problem.objective``, ``violation`` of the
        cone and sign constraints (0 for the gated relaxation), and ``solve_seconds`` covering the
        build and the solve.

    Raises:
        ValueError: for an unknown or uninstalled solver, or a bad ``time_limit``.
        ConvexSolveError: when the solver raises or returns no solution (infeasible, unbounded, a time
            or iteration limit): the message names the solver and its status.
    """
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    name = _check_solver(solver)
    options = dict(solver_options)
    if time_limit is not None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        if name in _TIME_LIMIT_OPTION:
            options.update(_TIME_LIMIT_OPTION[name](time_limit))
        else:
            warnings.warn(f"{name} has no time limit; time_limit={time_limit} is ignored", stacklevel=2)

    start = time.perf_counter()
    cvx_problem, read_solution = _build(problem, gated)
    try:
        with warnings.catch_warnings():
            # the status ("optimal_inaccurate") already says so; keep training logs free of it
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            cvx_problem.solve(solver=name, verbose=verbose, **options)
    except cp.error.SolverError as error:
        raise ConvexSolveError(f"{name} failed: {error}") from error
    status = cvx_problem.status
    if status not in _STATUS:
        raise ConvexSolveError(f"{name} returned no solution: status {status!r}")
    try:
        U, V, b0 = read_solution()
    except _NoValue as error:
        raise ConvexSolveError(f"{name} returned status {status!r} without a solution") from error
    seconds = time.perf_counter() - start

    value = float(problem.objective(U, V, b0))
    violation = 0.0 if gated else float(problem.violation(U, V))
    return ConvexSolution(
        value=value,
        U=U,
        V=V,
        b0=b0,
        status=_STATUS[status],
        solver=name,
        solve_seconds=seconds,
        iterations=cvx_problem.solver_stats.num_iters if cvx_problem.solver_stats else None,
        dual_value=None,
        violation=violation,
        gated=gated,
    )


class _NoValue(Exception):
    pass


def _build(problem: ConvexProblem, gated: bool):
    """The cvxpy problem and a function reading its solution back as ``(U, V, b0)`` tensors."""
    X = problem.X.detach().to("cpu", torch.float64).numpy()
    Y = problem.Y.detach().to("cpu", torch.float64).numpy()
    D = problem.patterns.detach().cpu().numpy()
    n, d = X.shape
    c, P = Y.shape[1], D.shape[1]
    lam, scale = problem.weight_decay, problem.scale
    # Column-wise groups (scalar output, one-vs-all) or one Frobenius group per block (shared c > 1).
    per_column = c == 1 or problem.one_vs_all

    # M = [D_1 X, …, D_P X]: column i·d + r holds D_i X[:, r].
    DX = (D[:, :, None] * X[:, None, :]).reshape(n, P * d)
    signs = 2.0 * D - 1.0

    def block_columns(blocks: np.ndarray) -> sp.csr_matrix:
        cols = (blocks[:, None] * d + np.arange(d)[None, :]).reshape(-1)
        return sp.csr_matrix(DX[:, cols])

    def predict(W: cp.Variable, M: sp.csr_matrix) -> list:
        return [M @ cp.vec(W[k * d : (k + 1) * d, :], order="F") for k in range(c)]

    def column_norms(W: cp.Variable, count: int):
        # (d·c, count) → (d, c·count): one column per (block, output) pair.
        return cp.sum(cp.norm(cp.reshape(W, (d, c * count), order="F"), 2, axis=0))

    b0 = cp.Variable(c) if problem.output_bias else None
    constraints = []
    if gated:
        all_blocks = np.arange(P)
        Z = cp.Variable((d * c, P))
        parts = [(Z, all_blocks, 1.0)]
        if per_column:
            group_sum = column_norms(Z, P)
        else:
            group_sum = cp.sum(cp.norm(Z, 2, axis=0))
    else:
        allow_u = problem.allows_u().cpu().numpy()
        allow_v = problem.allows_v().cpu().numpy()
        parts = []
        for allowed, sign in ((allow_u, 1.0), (allow_v, -1.0)):
            blocks = np.flatnonzero(allowed)
            if blocks.size:
                W = cp.Variable((d * c, blocks.size))
                parts.append((W, blocks, sign))
                S = signs[:, blocks]
                constraints += [cp.multiply(S, X @ W[k * d : (k + 1) * d, :]) >= 0 for k in range(c)]
        if per_column:
            group_sum = sum(column_norms(W, blocks.size) for W, blocks, _ in parts)
        else:
            # Align U and V blocks (a block may have only one of them) before the joint Frobenius norm.
            stacked = []
            for W, blocks, _ in parts:
                select = sp.csr_matrix((np.ones(blocks.size), (np.arange(blocks.size), blocks)), (blocks.size, P))
                stacked.append(W @ select)
            group_sum = cp.sum(cp.norm(cp.vstack(stacked), 2, axis=0))

    prediction = [0.0] * c
    for W, blocks, sign in parts:
        for k, term in enumerate(predict(W, block_columns(blocks))):
            prediction[k] = prediction[k] + sign * term
    residuals = []
    for k in range(c):
        r = prediction[k] - Y[:, k]
        if b0 is not None:
            r = r + b0[k]
        residuals.append(r)
    objective = scale * sum(cp.sum_squares(r) for r in residuals)
    if lam > 0:
        objective = objective + 2.0 * lam * group_sum
    cvx_problem = cp.Problem(cp.Minimize(objective), constraints)

    def read_solution():
        U, V, b = problem.zeros()
        targets = {1.0: U, -1.0: V}
        for W, blocks, sign in parts:
            if W.value is None:
                raise _NoValue
            # column i = vec(W_i) column-major → (count, d, c)
            value = W.value.T.reshape(blocks.size, c, d).transpose(0, 2, 1)
            targets[sign][torch.as_tensor(blocks, device=U.device)] = torch.as_tensor(
                value, dtype=U.dtype, device=U.device
            )
        if b0 is not None:
            if b0.value is None:
                raise _NoValue
            b = torch.as_tensor(np.asarray(b0.value).reshape(c), dtype=U.dtype, device=U.device)
        return U, V, b

    return cvx_problem, read_solution
