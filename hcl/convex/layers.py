"""The fixed-pattern convex problem as a differentiable layer (cvxpylayers).

:class:`FixedPatternLayer` maps right-hand sides ``y`` (a batch of them: e.g. the classes of a one-vs-all
problem, which share ``X`` and the patterns) to the optimal ``(U, V, b₀)`` of the scalar-output problem

    min  s ‖Σ_i D_i X (u_i − v_i) + b₀ − y‖² + 2λ Σ_i (‖u_i‖ + ‖v_i‖)   s.t. (2D_i − I) X u_i, v_i ≥ 0,

and is differentiable with respect to ``y`` (implicit differentiation of the conic program by diffcp).
Two DPP forms:

* ``data_as_parameters=False`` (default): ``X`` and the patterns are constants of the layer (``M = [D_1 X …
  D_P X]`` precomputed); only ``y`` is a parameter. Fastest; one layer per pattern set.
* ``data_as_parameters=True``: ``X``, the patterns ``D`` and ``y`` are parameters, with auxiliary
  variables ``Z_u = X U``, ``Z_v = X V`` so that every product is parameter × variable (the products
  ``D ⊙ (X U)`` are not DPP otherwise). One layer then serves every snapshot of the same ``(n, d, P)``;
  it pays ``2nP`` extra variables.

What it is good for: gradients of the convex optimum (or of the solution) with respect to the targets —
e.g. the sensitivity of the global-optimum bound to each label, or training something upstream of
``y`` through the convex problem. What it is not for: speed. It runs diffcp on the CPU in float64 and
is slower than cvxpy's plain solve; ``docs/solvers.md`` has the measured times. By the envelope theorem
the gradient of the optimal *value* is simply ``−2s r*`` (``r*`` the optimal residual), which the native
solver gives for free; the layer is needed for gradients of the *solution*.
"""

from __future__ import annotations

import dataclasses
import math
import time

import cvxpy as cp
import diffcp
import numpy as np
import torch
from torch import Tensor

from hcl.convex.cvxpy_solver import _DEFAULT_SETTINGS, ConvexSolveError, certified_status, formulate
from hcl.convex.native.certificate import dual_certificate
from hcl.convex.native.memory import check_conic_memory
from hcl.convex.problem import ConvexProblem, ConvexSolution, data_scale
from hcl.convex.status import Status

DEFAULT_SOLVER_ARGS = {"solve_method": "Clarabel"}


class FixedPatternLayer(torch.nn.Module):
    """Optimal ``(U, V, b₀)`` of the fixed-pattern problem as a function of ``y`` (scalar output per item).

    Args:
        X: ``(n, d)`` data with the bias column folded in.
        patterns: ``(n, P)`` boolean patterns.
        weight_decay: ``λ ≥ 0``.
        reduction: ``"sum"`` or ``"mean"``.
        output_bias: whether an unpenalised output bias is a variable.
        signs: optional ``(P,)`` in ``{-1, 0, +1}`` restricting blocks to ``U`` or ``V``.
        gated: the gated relaxation (free ``z_i`` returned as ``U``, ``V = 0``, no cones).
        data_as_parameters: make ``X`` and the patterns parameters too (see the module docstring); then
            :meth:`forward` takes them as arguments.
        solver_args: arguments for the diffcp backend (default ``{"solve_method": "Clarabel"}``).
        verbose: print the backend's log at every solve.

    Raises:
        ValueError: mismatched shapes, non-finite data, ``λ < 0`` or an empty pattern set.
        TypeError: ``solver_args`` that is not a dict.
    """

    def __init__(
        self,
        X: Tensor,
        patterns: Tensor,
        *,
        weight_decay: float,
        reduction: str = "mean",
        output_bias: bool = False,
        signs: Tensor | None = None,
        gated: bool = False,
        data_as_parameters: bool = False,
        solver_args: dict | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        from cvxpylayers.torch import CvxpyLayer

        # ConvexProblem validates shapes, finiteness, λ and the pattern set
        check = ConvexProblem(X, torch.zeros(X.shape[0], dtype=X.dtype), patterns, weight_decay, reduction,
                              output_bias, signs)
        self.n, self.d = check.X.shape
        self.P = check.num_patterns
        self.gated = gated
        self.output_bias = output_bias
        self.data_as_parameters = data_as_parameters
        if solver_args is not None and not isinstance(solver_args, dict):
            raise TypeError(f"solver_args must be a dict of the backend's settings, e.g. {DEFAULT_SOLVER_ARGS}, got "
                            f"{solver_args!r}")
        self.solver_args = dict(DEFAULT_SOLVER_ARGS if solver_args is None else solver_args)
        self.register_buffer("X", check.X.detach().to(torch.float64))
        self.register_buffer("patterns", check.patterns.detach().clone())
        allow_u = np.ones(self.P, bool) if gated else check.allows_u().cpu().numpy()
        allow_v = np.zeros(self.P, bool) if gated else check.allows_v().cpu().numpy()
        self._blocks = (np.flatnonzero(allow_u), np.flatnonzero(allow_v))
        problem, parameters, variables = self._build(check.weight_decay, data_scale(reduction, self.n))
        self.layer = CvxpyLayer(problem, parameters=parameters, variables=variables, verbose=verbose)

    def _build(self, lam: float, scale: float):
        y = cp.Parameter(self.n)
        b = cp.Variable() if self.output_bias else None
        if self.data_as_parameters:
            parameters, parts, prediction, constraints = self._parametrised(y)
            group_sum = sum(cp.sum(cp.norm(W, 2, axis=0)) for W, _, _ in parts)
        else:
            X = self.X.cpu().numpy()
            D = self.patterns.cpu().numpy().astype(np.float64)
            form = formulate(X, D, *self._blocks, 1, cones=not self.gated, per_column=True)
            parameters, parts, prediction = [y], form.parts, form.predictions[0]
            constraints, group_sum = form.constraints, form.group_sum
        residual = prediction - y if b is None else prediction + b - y
        objective = scale * cp.sum_squares(residual)
        if lam > 0:
            objective = objective + 2.0 * lam * group_sum
        problem = cp.Problem(cp.Minimize(objective), constraints)
        variables = [W for W, _, _ in parts] + ([b] if b is not None else [])
        return problem, parameters, variables

    def _parametrised(self, y: cp.Parameter):
        """``X`` and the patterns as parameters, with ``Z_w = X W`` so that every product is DPP."""
        n, d = self.n, self.d
        Xp = cp.Parameter((n, d))
        Dp = cp.Parameter((n, self.P))
        parts, constraints = [], []
        prediction = 0
        for blocks, sign in zip(self._blocks, (1.0, -1.0)):
            if not blocks.size:
                continue
            W = cp.Variable((d, blocks.size))
            parts.append((W, blocks, sign))
            Zw = cp.Variable((n, blocks.size))
            Db = Dp[:, blocks]
            constraints.append(Zw == Xp @ W)
            if not self.gated:
                constraints.append(cp.multiply(2 * Db - 1, Zw) >= 0)
            prediction = prediction + sign * cp.sum(cp.multiply(Db, Zw), axis=1)
        return [Xp, Dp, y], parts, prediction, constraints

    def forward(self, Y: Tensor, X: Tensor | None = None, patterns: Tensor | None = None) -> tuple[Tensor, ...]:
        """Solve for each right-hand side.

        Args:
            Y: ``(n,)`` or ``(batch, n)`` targets.
            X, patterns: the data, only (and always) with ``data_as_parameters=True``.

        Returns:
            ``U, V`` of shape ``(batch, P, d)`` (``(P, d)`` for a 1-D ``Y``) and ``b0`` of shape ``(batch,)``
            (zeros without an output bias), differentiable with respect to ``Y`` (and ``X``).
        """
        single = Y.ndim == 1
        Yb = Y.reshape(1, -1) if single else Y
        if Yb.ndim != 2 or Yb.shape[1] != self.n or Yb.shape[0] == 0:
            raise ValueError(f"Y must have shape (n,) or (batch, n) with n = {self.n} and batch ≥ 1, got "
                             f"{tuple(Y.shape)}")
        if not torch.isfinite(Yb).all():
            raise ValueError("Y contains NaN or inf")
        Yb = Yb.to(torch.float64)
        args: list[Tensor] = [Yb]
        if self.data_as_parameters:
            if X is None or patterns is None:
                raise ValueError("this layer takes X and patterns as arguments (data_as_parameters=True)")
            if tuple(X.shape) != (self.n, self.d) or tuple(patterns.shape) != (self.n, self.P):
                raise ValueError(f"X and patterns must have shapes {(self.n, self.d)} and {(self.n, self.P)}")
            if not torch.isfinite(X).all():
                raise ValueError("X contains NaN or inf")
            if not ((patterns == 0) | (patterns == 1)).all():  # 2D − I of a 0.5 is 0: its cone constraints vanish
                raise ValueError("patterns must be 0 or 1 (boolean activation patterns)")
            args = [X.to(torch.float64), patterns.to(torch.float64), Yb]
        elif X is not None or patterns is not None:
            raise ValueError("X and patterns are constants of this layer (data_as_parameters=False)")
        outputs = list(self.layer(*args, solver_args=self.solver_args))
        batch = Yb.shape[0]
        blocks_u, blocks_v = self._blocks
        U = Yb.new_zeros(batch, self.P, self.d)
        V = Yb.new_zeros(batch, self.P, self.d)
        for blocks, target in ((blocks_u, "U"), (blocks_v, "V")):
            if blocks.size == 0:
                continue
            value = outputs.pop(0).reshape(batch, self.d, blocks.size).transpose(1, 2)
            index = torch.as_tensor(blocks, device=value.device)
            if target == "U":
                U = U.index_copy(1, index, value)
            else:
                V = V.index_copy(1, index, value)
        b0 = outputs.pop(0).reshape(batch) if self.output_bias else Yb.new_zeros(batch)
        if single:
            return U[0], V[0], b0[0]
        return U, V, b0

    @classmethod
    def from_problem(cls, problem: ConvexProblem, *, gated: bool = False, **kwargs) -> FixedPatternLayer:
        """A layer for ``problem``'s data, patterns, λ, reduction, output bias and signs."""
        if problem.c > 1 and not problem.one_vs_all:
            raise ValueError(
                "the layer solves scalar-output problems (a batch of them): use one_vs_all=True for c > 1; "
                "the shared-layer Frobenius bound couples the outputs"
            )
        return cls(problem.X, problem.patterns, weight_decay=problem.weight_decay, reduction=problem.reduction,
                   output_bias=problem.output_bias, signs=problem.signs, gated=gated, **kwargs)


def solve_layer(
    problem: ConvexProblem,
    *,
    gated: bool = False,
    solver_args: dict | None = None,
    verbose: bool = False,
    memory_limit: int | None = None,
) -> ConvexSolution:
    """Solve ``problem`` through :class:`FixedPatternLayer`, one batch item per output column.

    What ``solve(problem, "cvxpylayers")`` runs. The returned tensors are detached; use the layer itself for
    gradients.

    Args:
        problem: a scalar-output or one-vs-all problem (see :meth:`FixedPatternLayer.from_problem`).
        gated: solve the gated relaxation.
        solver_args: arguments for the diffcp backend (default ``{"solve_method": "Clarabel"}``).
        verbose: print the backend's log.
        memory_limit: bytes the solve may take, as for the conic solvers (:func:`hcl.convex.cvxpy_solver.solve_cvxpy`).

    The status is ``"optimal"`` only where hcl's certificate confirms it (:func:`hcl.convex.cvxpy_solver.
    certified_status`): the layer returns no cone multipliers, so exact-problem solutions read
    ``"optimal_inaccurate"`` with the weak bound of ``μ = 0``; use ``"clarabel"`` for a certified value.

    Raises:
        ConvexSolveError: when the backend stops without a solution.
    """
    check_conic_memory(problem, "cvxpylayers", memory_limit)
    start = time.perf_counter()
    # solved for Y / max|Y| (λ / max|Y|, the point scaled back), as the conic path is: the backend's tolerances are
    # absolute (at max|Y| = 1e-6 its value was 13.5 times the optimum)
    unit = float(problem.Y.abs().max()) or 1.0
    scaled = dataclasses.replace(problem, Y=problem.Y / unit, weight_decay=problem.weight_decay / unit)
    if solver_args is None:  # Clarabel to the conic path's tolerances (its own 1e-8 moved large targets' values 7e-5)
        solver_args = {**DEFAULT_SOLVER_ARGS, **_DEFAULT_SETTINGS["CLARABEL"]}
    layer = FixedPatternLayer.from_problem(scaled, gated=gated, solver_args=solver_args, verbose=verbose)
    try:
        with torch.no_grad():
            U, V, b0 = (unit * t for t in layer(scaled.Y.T.contiguous()))
    except diffcp.SolverError as error:  # a backend that stops without a solution
        raise ConvexSolveError(f"cvxpylayers ({layer.solver_args.get('solve_method', 'Clarabel')}): {error}") from error
    dtype, device = problem.X.dtype, problem.X.device
    # evaluated in float64 like every solver's point (ConvexSolution.value), then returned in the problem's dtype
    U = U.permute(1, 2, 0).to(dtype=torch.float64, device=device).contiguous()  # (P, d, c)
    V = V.permute(1, 2, 0).to(dtype=torch.float64, device=device).contiguous()
    b0 = b0.to(dtype=torch.float64, device=device) if problem.output_bias else U.new_zeros(problem.c)
    exact = problem.in_float64()
    value = float(exact.objective(U, V, b0))
    violation = 0.0 if gated else float(exact.violation(U, V))
    # the layer gives no cone multipliers: the bound is hcl's certificate with μ = 0, exact for the gated relaxation
    # (no cones) and weak for the exact problem, whose status then says "optimal_inaccurate" (diffcp reports none)
    finite = bool(torch.isfinite(U).all() and torch.isfinite(V).all())  # a failed layer solve: no point, no bound
    dual_value = dual_certificate(problem, U, V, b0, gated=gated) if finite else -math.inf
    return ConvexSolution(
        value=value,
        U=U.to(dtype),
        V=V.to(dtype),
        b0=b0.to(dtype),
        # the backend's own status does not come back (diffcp maps it, and raises for some backends only): at λ = 0,
        # where no certificate decides, the point is not called optimal (Clarabel stopped at 1 iteration, or found
        # the problem infeasible, and it read "optimal")
        status=certified_status(problem, Status.OPTIMAL_INACCURATE, value, dual_value, violation),
        solver="cvxpylayers",
        solve_seconds=time.perf_counter() - start,
        dual_value=dual_value,
        violation=violation,
        gated=gated,
        gap_floor=problem.gap_floor,
    )
