"""Solve the convex reformulation with a conic solver through cvxpy.

The problem is rebuilt with constant data at every call: the project's solver measurements found a
constant-data rebuild faster than any parametrised (DPP) formulation at the sizes where interior-point
methods are usable (``n`` up to a few hundred, ``P`` up to ~100). The formulation (:func:`formulate`, shared with
:mod:`hcl.convex.layers`) is vectorised — one variable matrix per sign, no Python loop over patterns:

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
objective recomputed in float64 at the returned point. ``dual_value`` is hcl's own certified lower bound
(:func:`hcl.convex.native.dual_certificate`) at the solver's point and cone multipliers: it does not rest on the
solver's tolerances, and is as tight as its point is accurate (``docs/solvers.md#honest-statuses``).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from hcl.checks import caller_stacklevel
from hcl.convex.native.certificate import dual_certificate
from hcl.convex.native.memory import check_conic_memory
from hcl.convex.native.options import DEFAULT_TOL
from hcl.convex.native.warm_start import Multipliers
from hcl.convex.problem import ConvexProblem, ConvexSolution
from hcl.convex.status import Status, relative_gap

# Conic solvers that take second-order cones, in order of preference.
_SOCP_SOLVERS = ("CLARABEL", "ECOS", "SCS", "MOSEK")

# How each solver spells a wall-clock limit (ECOS has none).
_TIME_LIMIT_OPTION = {
    "CLARABEL": lambda t: {"time_limit": float(t)},
    "SCS": lambda t: {"time_limit_secs": float(t)},
    "MOSEK": lambda t: {"mosek_params": {"MSK_DPAR_OPTIMIZER_MAX_TIME": float(t)}},
}

# The settings cvxpy passes on to each solver, as the solvers document them (Clarabel's are read from the solver).
_SETTINGS = {
    "ECOS": ("feastol", "abstol", "reltol", "feastol_inacc", "abstol_inacc", "reltol_inacc", "max_iters", "nitref"),
    "SCS": ("max_iters", "eps", "eps_abs", "eps_rel", "eps_infeas", "alpha", "scale", "adaptive_scale", "normalize",
            "rho_x", "acceleration_lookback", "acceleration_interval", "time_limit_secs", "use_indirect",
            "linear_solver", "write_data_filename", "log_csv_filename"),
    "MOSEK": ("mosek_params", "save_file", "bfs", "eps", "accept_unknown"),
}

# Settings used unless the caller gives them. Clarabel's default 1e-8 (in the units of Y / max|Y|) left hcl's
# certificate above 1e-6 on 9 of 72 random instances, 1e-9 on 1 of 72 for 10 % more time (1e-10 ends in its own
# "inaccurate" more often); docs/solvers.md#honest-statuses
_DEFAULT_SETTINGS = {"CLARABEL": {"tol_gap_abs": 1e-9, "tol_gap_rel": 1e-9, "tol_feas": 1e-9}}
#: The solvers' own values of those settings, for timing a solver as cvxpy ships it (the benchmarks).
OWN_DEFAULTS = {"CLARABEL": {"tol_gap_abs": 1e-8, "tol_gap_rel": 1e-8, "tol_feas": 1e-8}}

# cvxpy's statuses that come with a solution; any other raises ConvexSolveError.
STATUS_MAP = {
    cp.OPTIMAL: Status.OPTIMAL,
    cp.OPTIMAL_INACCURATE: Status.OPTIMAL_INACCURATE,
    cp.USER_LIMIT: Status.MAX_ITERATIONS,  # or TIME_LIMIT: _limit_status tells
}


class ConvexSolveError(RuntimeError):
    """A conic solver failed, or returned no solution (infeasible, unbounded, a limit reached before any point)."""


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


@functools.cache
def solver_settings(solver: str) -> frozenset[str]:
    """The settings of the conic solver ``solver`` itself that :func:`solve_cvxpy` passes on to cvxpy.

    ``verbose`` and ``time_limit`` are :func:`solve_cvxpy`'s own arguments and are not listed.
    """
    name = solver.upper()
    if name == "CLARABEL":
        import clarabel

        names = {key for key in dir(clarabel.DefaultSettings()) if not key.startswith("_")} - {"default"}
    else:
        names = set(_SETTINGS.get(name, ()))
    return frozenset(names - {"verbose", "time_limit"})


def _solver_works(name: str) -> bool:
    x = cp.Variable(2)
    probe = cp.Problem(cp.Minimize(cp.sum_squares(x - 1.0) + cp.norm(x, 2)), [x >= 0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.solve(solver=name)
    except Exception:  # noqa: BLE001 - any failure (licence, import, crash) means "not usable"
        return False
    return probe.status in STATUS_MAP


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
    memory_limit: int | None = None,
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
        memory_limit: bytes the solve may take (default: ``DEFAULT_MEMORY_FRACTION`` of the free memory); a larger
            estimate (:func:`hcl.convex.native.memory.check_conic_memory`) is refused before cvxpy builds anything.
        **solver_options: the solver's own settings, passed to ``cvxpy.Problem.solve`` (e.g. ``tol_gap_rel``
            for Clarabel; see :func:`solver_settings`). With ``λ > 0`` Clarabel's ``tol_gap_abs``, ``tol_gap_rel`` and
            ``tol_feas`` default to ``1e-9`` here (its own ``1e-8`` often left hcl's certificate above ``1e-6``).

    Returns:
        A :class:`ConvexSolution` with ``U, V`` of shape ``(P, d, c)`` and ``b0`` ``(c,)`` in the
        problem's dtype and device, ``value`` recomputed by ``problem.objective`` in float64, ``dual_value`` hcl's
        certified lower bound (value, bound and violation those of the solver's float64 point), ``violation`` of the
        cone and sign constraints (0 for the gated relaxation), and ``solve_seconds`` covering the build, the solve
        and the certificate.

    Raises:
        ValueError: for an unknown or uninstalled solver, or a bad ``time_limit`` or ``memory_limit``.
        SolverMemoryError: the solve would not fit the memory budget.
        TypeError: a setting the solver does not know (the message names the solver).
        ConvexSolveError: when the solver raises or returns no solution (infeasible, unbounded, a limit reached
            before any point): the message names the solver and its status. A limit reached with a point returns
            it, with status ``max_iterations`` or ``time_limit`` and hcl's certified bound.
    """
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    name = _check_solver(solver)
    # where hcl's certificate decides the status (λ > 0); at λ = 0 the solver's own status stands, at its own tolerance
    defaults = _DEFAULT_SETTINGS.get(name, {}) if problem.weight_decay > 0 else {}
    options = {**defaults, **solver_options}
    if time_limit is not None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
        if name in _TIME_LIMIT_OPTION:
            options.update(_TIME_LIMIT_OPTION[name](time_limit))
        else:
            warnings.warn(f"{name} has no time limit; time_limit={time_limit} is ignored",
                          stacklevel=caller_stacklevel())

    check_conic_memory(problem, name.lower(), memory_limit)
    start = time.perf_counter()
    if problem.zero_optimum:  # known exactly: a conic solver's 1e-13 left over would be a relative gap of 1
        return ConvexSolution.zero_network(problem, name, gated, time.perf_counter() - start)
    cvx_problem, read_solution = _build(problem, gated)
    try:
        with warnings.catch_warnings():
            # the status ("optimal_inaccurate") already says so; keep training logs free of it
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            cvx_problem.solve(solver=name, verbose=bool(verbose), **options)
    except cp.error.SolverError as error:
        raise ConvexSolveError(f"{name} failed: {error}") from error
    except TypeError as error:  # an unknown setting: name the solver, which ECOS and SCS do not
        if name.lower() in str(error).lower():
            raise
        raise TypeError(f"{name}: {error}") from error
    status = cvx_problem.status
    if status not in STATUS_MAP:
        raise ConvexSolveError(f"{name} returned no solution: status {status!r}")
    try:
        U, V, b0, cone = read_solution()
    except _NoValue as error:
        raise ConvexSolveError(f"{name} returned status {status!r} without a solution") from error
    seconds = time.perf_counter() - start

    exact = problem.in_float64()
    point = (U, V, b0)
    value = float(exact.objective(*point))
    violation = 0.0 if gated else float(exact.violation(point[0], point[1]))
    # hcl's own certificate at the solver's point and multipliers: a lower bound that does not rest on the solver's
    # tolerances (one product with X and one with Xᵀ)
    dual_value, multipliers = -math.inf, None  # no point (a solver stopped before its first iterate), no bound
    if bool(torch.isfinite(U).all() and torch.isfinite(V).all()):  # any μ ≥ 0 bounds: a multiplier it left NaN, 0
        finite = None if cone is None else torch.nan_to_num(cone, nan=0.0, posinf=0.0, neginf=0.0)
        dual_value = dual_certificate(exact, U, V, b0, finite, gated=gated)
        # kept with the solution: the certificate again from them (a user's solver that wraps this one is re-checked)
        multipliers = None if finite is None else Multipliers(finite.to_sparse())
    U, V, b0 = (t.to(problem.X.dtype) for t in point)  # returned in the problem's dtype
    return ConvexSolution(
        value=value,
        U=U,
        V=V,
        b0=b0,
        status=certified_status(problem, STATUS_MAP[status], value, dual_value, violation,
                                _limit_status(cvx_problem, time_limit if name in _TIME_LIMIT_OPTION else None)),
        solver=name,
        solve_seconds=seconds,
        iterations=cvx_problem.solver_stats.num_iters if cvx_problem.solver_stats else None,
        dual_value=dual_value,
        violation=violation,
        gated=gated,
        multipliers=multipliers,
        gap_floor=problem.gap_floor,
    )


def certified_status(
    problem: ConvexProblem, status: Status, value: float, dual: float, violation: float, limit: Status | None = None,
    tol: float = DEFAULT_TOL,
) -> Status:
    """hcl's certificate decides between ``OPTIMAL`` and ``OPTIMAL_INACCURATE`` where it exists (``λ > 0``): a relative
    gap to ``dual`` within ``DEFAULT_TOL`` and a violation within ``DEFAULT_TOL · max|Y|`` is ``OPTIMAL`` whatever the
    solver said (its own tests are on its internal scaling), anything else ``OPTIMAL_INACCURATE`` (ECOS's multipliers
    certify about 5e-3, and SCS called points outside their cones optimal), or the ``limit`` the solver stopped at
    (``MAX_ITERATIONS``, ``TIME_LIMIT``: stopped early, as the native solver says). At ``λ = 0`` no certificate exists
    beyond 0: the solver's ``OPTIMAL`` stands if its point is feasible to that tolerance. No finite value: ``FAILED``
    (or the limit). ``tol``: a looser tolerance for both tests."""
    if not math.isfinite(value):  # no point at all (ECOS stopped before its first iterate: NaN)
        return limit or Status.FAILED
    y_unit = float(problem.Y.abs().max()) or 1.0
    feasible = violation <= tol * y_unit
    if problem.weight_decay > 0:
        certified = feasible and relative_gap(value, dual, problem.gap_floor) <= tol
        return Status.OPTIMAL if certified else limit or Status.OPTIMAL_INACCURATE
    if limit is not None:
        return limit
    return status if feasible else Status.OPTIMAL_INACCURATE


def _limit_status(cvx_problem: cp.Problem, time_limit: float | None) -> Status | None:
    """``MAX_ITERATIONS`` or ``TIME_LIMIT`` when the solver stopped at a limit — cvxpy's ``"user_limit"``, or SCS's
    ``"optimal_inaccurate"`` whose own status says so ("solved (inaccurate - reached max_iters)") — else ``None``."""
    extra = getattr(cvx_problem.solver_stats, "extra_stats", None)
    info = extra.get("info") if isinstance(extra, dict) else None
    text = str(info.get("status", "")) if isinstance(info, dict) else ""
    if "max_iters" in text:
        return Status.MAX_ITERATIONS
    if "time_limit" in text:
        return Status.TIME_LIMIT
    if cvx_problem.status == cp.USER_LIMIT:  # the solver's own time (not the build's): past the limit it was set
        solved_for = getattr(cvx_problem.solver_stats, "solve_time", None) or 0.0
        return Status.TIME_LIMIT if time_limit is not None and solved_for >= 0.9 * time_limit else Status.MAX_ITERATIONS
    return None


class _NoValue(Exception):
    pass


def _cone_multipliers(form: Formulation, n: int, P: int, c: int) -> torch.Tensor | None:
    """The solver's cone multipliers as hcl's dense ``(n, 2, P, c)`` float64 tensor (``μ ≥ 0`` of
    ``(2D_i − I) X W ≥ 0``, in the objective's units), or ``None`` without cones or without duals."""
    if not form.constraints:
        return None
    cone = torch.zeros(n, 2, P, c, dtype=torch.float64)
    constraints = iter(form.constraints)
    for _, blocks, sign in form.parts:  # formulate appends one constraint per output, part by part
        side = 0 if sign > 0 else 1
        for k in range(c):
            dual = next(constraints).dual_value
            if dual is None:
                return None
            values = torch.as_tensor(np.asarray(dual, dtype=np.float64).reshape(n, blocks.size)).clamp(min=0)
            cone[:, side, torch.as_tensor(blocks), k] = values
    return cone


@dataclass
class Formulation:
    """The cvxpy expressions of the fixed-pattern problem with constant data (see the module docstring).

    Attributes:
        parts: ``(W, blocks, sign)`` per variable matrix: ``W`` is ``(d·c, len(blocks))``, its column ``i`` is
            ``vec`` (column-major) of block ``blocks[i]``'s ``U`` (``sign = +1``) or ``V`` (``sign = −1``).
        predictions: ``Σ_i D_i X (U_i − V_i)`` for each output column (without the output bias).
        constraints: the cone constraints (none for the gated relaxation).
        group_sum: ``Σ_i pen(U_i, V_i)``, the penalty before its factor ``2λ``.
    """

    parts: list[tuple[cp.Variable, np.ndarray, float]]
    predictions: list[cp.Expression]
    constraints: list[cp.Constraint]
    group_sum: cp.Expression


def formulate(
    X: np.ndarray, patterns: np.ndarray, blocks_u: np.ndarray, blocks_v: np.ndarray, c: int, *, cones: bool,
    per_column: bool,
) -> Formulation:
    """The variables, predictions, cone constraints and group penalty of the problem, for cvxpy.

    Args:
        X: ``(n, d)`` data (float64, bias column folded in).
        patterns: ``(n, P)`` patterns (boolean or 0/1).
        blocks_u, blocks_v: the blocks that have a ``U`` (``V``) variable.
        c: number of outputs.
        cones: add the cone constraints ``(2D_i − I) X U_i ≥ 0`` (``False`` for the gated relaxation).
        per_column: one group per (block, output column) (scalar output, one-vs-all); else one Frobenius group
            per block over its ``U`` and ``V`` together (shared layer, ``c > 1``).
    """
    n, d = X.shape
    P = patterns.shape[1]
    # M = [D_1 X, …, D_P X]: column i·d + r holds D_i X[:, r].
    DX = (patterns[:, :, None] * X[:, None, :]).reshape(n, P * d)
    signs = 2.0 * patterns - 1.0
    parts: list[tuple[cp.Variable, np.ndarray, float]] = []
    constraints: list[cp.Constraint] = []
    predictions: list = [0.0] * c
    for blocks, sign in ((blocks_u, 1.0), (blocks_v, -1.0)):
        if not blocks.size:
            continue
        W = cp.Variable((d * c, blocks.size))
        parts.append((W, blocks, sign))
        M = sp.csr_matrix(DX[:, (blocks[:, None] * d + np.arange(d)[None, :]).reshape(-1)])
        for k in range(c):
            predictions[k] = predictions[k] + sign * (M @ cp.vec(W[k * d : (k + 1) * d, :], order="F"))
            if cones:
                constraints.append(cp.multiply(signs[:, blocks], X @ W[k * d : (k + 1) * d, :]) >= 0)
    if per_column:
        # (d·c, count) → (d, c·count): one column per (block, output) pair.
        group_sum = sum(cp.sum(cp.norm(cp.reshape(W, (d, c * blocks.size), order="F"), 2, axis=0))
                        for W, blocks, _ in parts)
    elif len(parts) == 1 and np.array_equal(parts[0][1], np.arange(P)):
        group_sum = cp.sum(cp.norm(parts[0][0], 2, axis=0))
    else:
        # Align U and V blocks (a block may have only one of them) before the joint Frobenius norm.
        stacked = []
        for W, blocks, _ in parts:
            select = sp.csr_matrix((np.ones(blocks.size), (np.arange(blocks.size), blocks)), (blocks.size, P))
            stacked.append(W @ select)
        group_sum = cp.sum(cp.norm(cp.vstack(stacked), 2, axis=0))
    return Formulation(parts, predictions, constraints, group_sum)


def _build(problem: ConvexProblem, gated: bool):
    """The cvxpy problem and a function reading its solution back as ``(U, V, b0)`` tensors."""
    X = problem.X.detach().to("cpu", torch.float64).numpy()
    # solved for Y / a and λ / a (its solution is the original's / a, its objective / a²): the conic solvers' absolute
    # tolerances (1e-8) then mean the same in every unit; for targets of size 1e-6 Clarabel's "optimal" was 2 % off
    unit = float(problem.Y.detach().abs().max()) or 1.0
    Y = problem.Y.detach().to("cpu", torch.float64).numpy() / unit
    D = problem.patterns.detach().cpu().numpy()
    c, P = Y.shape[1], D.shape[1]
    if gated:
        blocks_u, blocks_v = np.arange(P), np.arange(0)
    else:
        blocks_u = np.flatnonzero(problem.allows_u().cpu().numpy())
        blocks_v = np.flatnonzero(problem.allows_v().cpu().numpy())
    # Column-wise groups (scalar output, one-vs-all) or one Frobenius group per block (shared c > 1).
    form = formulate(X, D, blocks_u, blocks_v, c, cones=not gated, per_column=c == 1 or problem.one_vs_all)

    b0 = cp.Variable(c) if problem.output_bias else None
    residuals = []
    for k in range(c):
        r = form.predictions[k] - Y[:, k]
        if b0 is not None:
            r = r + b0[k]
        residuals.append(r)
    objective = problem.scale * sum(cp.sum_squares(r) for r in residuals)
    if problem.weight_decay > 0:
        objective = objective + 2.0 * (problem.weight_decay / unit) * form.group_sum
    cvx_problem = cp.Problem(cp.Minimize(objective), form.constraints)

    def read_solution():
        # in float64, as the solver solved: the certificate of a point rounded to a float32 problem's dtype fell short
        # of 1e-6 (the residual of a good fit is small beside the rounding of the predictions)
        U, V, b = (t.to(torch.float64) for t in problem.zeros())
        targets = {1.0: U, -1.0: V}
        for W, blocks, sign in form.parts:
            if W.value is None:
                raise _NoValue
            # column i = vec(W_i) column-major → (count, d, c)
            value = unit * W.value.T.reshape(blocks.size, c, problem.d).transpose(0, 2, 1)
            targets[sign][torch.as_tensor(blocks, device=U.device)] = torch.as_tensor(
                value, dtype=U.dtype, device=U.device
            )
        if b0 is not None:
            if b0.value is None:
                raise _NoValue
            b = torch.as_tensor(unit * np.asarray(b0.value).reshape(c), dtype=U.dtype, device=U.device)
        cone = _cone_multipliers(form, problem.n, P, c)  # the Lagrangian scales by a², the constraints by a
        return U, V, b, None if cone is None else unit * cone.to(U.device)  # with the point, on the problem's device

    return cvx_problem, read_solution
