"""The native solver's certificate and its one stopping rule.

With residual ``r = prediction − Y`` (centred per output when there is an output bias), ``ν = 2 s r`` and cone
multipliers ``μ ≥ 0``, every ``t ≥ 0`` with ``t ‖g_k‖ ≤ 2λ`` for all groups ``k``, where
``g = ±Xᵀ D_i ν − Xᵀ (2D_i − I) μ`` (per side), gives

    p* ≥ −t ⟨ν, Y⟩ − t² ‖ν‖² / (4s),

maximised over ``t`` in closed form (:func:`hcl.convex.certificate.best_scaled_bound`). The derivation is in
``docs/solvers.md#the-certificate-derivation``. Both methods stop when the relative gap between the objective and
this bound is within ``tol`` and the cone violation within ``constraint_tol`` (:func:`converged`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hcl.convex.certificate import best_scaled_bound
from hcl.convex.native.operator import Operator
from hcl.convex.native.options import NativeOptions
from hcl.convex.native.warm_start import Multipliers, warm_point
from hcl.convex.problem import ConvexProblem
from hcl.convex.status import Status, relative_gap


class Convergence(NamedTuple):
    """The stopping rule's verdict at a point.

    Attributes:
        met: the relative gap is within ``tol`` and the violation within ``constraint_tol``.
        gap: the relative duality gap, with the data-scale floor.
        violation: the largest cone violation, relative to ``max |Y|``.
        dual: the certified bound from this point (the problem's units).
    """

    met: bool
    gap: float
    violation: float
    dual: float = -math.inf


def dual_certificate(
    problem: ConvexProblem,
    U: Tensor,
    V: Tensor,
    b0: Tensor | None = None,
    multipliers: Tensor | Multipliers | None = None,
    *,
    gated: bool = False,
) -> float:
    """A certified lower bound on the problem's optimum (or on ``g*`` when ``gated``) from a point.

    ``ν = 2s r`` from the point's residual (centred with an output bias), ``μ`` the given cone multipliers
    (dense ``(n, 2, P, c)``, sparse, or ``None`` for zero), scaled by the best feasible ``t`` — see the
    module docstring. Computed in float64. Any point and any ``μ ≥ 0`` give a valid bound; a good pair
    gives a tight one.
    """
    op = Operator(problem, gated=gated, dtype=torch.float64)
    point = warm_point(op, (U, V, b0) if multipliers is None else (U, V, b0, multipliers), "the point's")
    b = None if b0 is None else torch.as_tensor(b0).detach().to(torch.float64)
    return certificate(op, op.forward(point.W), point.mu, b0=b)[0]


def certificate(
    op: Operator, Z: Tensor, mu: Tensor | None, b0: Tensor | None = None, known: tuple[Tensor, Tensor] | None = None
) -> tuple[float, float]:
    """``(dual_value, max_k ‖g_k‖)``: the certified bound in the problem's units and the worst group.

    Args:
        op: the problem.
        Z: ``(n, 2, P, c)`` block outputs of the point.
        mu: ``(n, 2, P, c)`` cone multipliers in normalised units, or ``None`` for zero.
        b0: the point's output bias in the problem's units (default: the optimal one, which centres ``r``).
        known: float64 ``(r, g)`` the caller has already computed at ``Z`` and ``mu`` — the residual (centred
            with an output bias) and ``g = Mᵀν − Aᵀμ`` — to save their products.
    """
    Y = op.Y.to(torch.float64)
    if known is not None:
        r, g = known
        return dual_value(op, 2.0 * r, Y, g)
    X64 = op.X.to(torch.float64)
    pred = torch.einsum("np,npc->nc", op.Dm.to(torch.float64), (Z[:, 0] - Z[:, 1]).to(torch.float64))
    r = pred - Y
    if op.bias:
        if b0 is None:
            r = r - r.mean(0)
        else:
            r = r + b0.to(torch.float64).to(r.device).reshape(1, -1) / op.y_unit
            # ν must sum to zero per output: centre (a valid choice for any b₀)
            r = r - r.mean(0)
    nu = 2.0 * r
    if mu is not None and op.dtype == torch.float64:  # Mᵀν − Aᵀμ in one product
        return dual_value(op, nu, Y, op.adjoint(nu, mu.to(torch.float64)))
    Dm = op.Dm.to(torch.float64)
    G = (X64.T @ (Dm[:, :, None] * nu[:, None, :]).reshape(op.n, -1)).reshape(op.d, op.P, op.c)
    g = torch.stack([G, -G], dim=1)
    if mu is not None:
        S = op.S.to(torch.float64)
        g = g - (X64.T @ (S * mu.to(torch.float64)).reshape(op.n, -1)).reshape(op.d, 2, op.P, op.c)
    return dual_value(op, nu, Y, g * op.wmask.to(torch.float64))


def dual_value(op: Operator, nu: Tensor, Y: Tensor, g: Tensor) -> tuple[float, float]:
    """The bound from ``ν`` and the (masked) ``g`` in normalised units, maximised over the scaling ``t``, and the
    worst group norm of ``g``."""
    if op.per_column:
        worst = float(g.square().sum(0).sqrt().amax())
    else:
        worst = float(g.square().sum((0, 1, 3)).sqrt().amax())
    if not math.isfinite(worst):  # no scaling makes such a g dual feasible: no bound
        return -math.inf, worst
    t_max = math.inf if worst == 0.0 else 2.0 * op.lam / worst
    value, _ = best_scaled_bound(float((nu * Y).sum()), float(nu.square().sum()) / 4.0, t_max)
    return value * op.problem.scale * op.y_unit * op.y_unit, worst


def converged(
    op: Operator,
    W: Tensor,
    Z: Tensor,
    mu: Tensor | None,
    options: NativeOptions,
    known: tuple[Tensor, Tensor] | None = None,
    best: float = -math.inf,
) -> Convergence:
    """The stopping rule at the point ``W`` (``Z = X W``, normalised units), shared by the methods.

    The relative gap is :func:`hcl.convex.status.relative_gap` between the objective and the larger of
    :func:`certificate`'s bound and ``best`` (a bound certified earlier: every certified bound holds), with the floor
    ``ConvexProblem.gap_floor``; ``known`` as in :func:`certificate`.
    """
    scale = op.problem.scale * op.y_unit * op.y_unit
    r = op.residual(Z)[0] if known is None else known[0]
    value = float(r.to(torch.float64).square().sum() + op.penalty_value(W.to(torch.float64))) * scale
    dual = certificate(op, Z, mu, known=known)[0]
    floor = op.problem.gap_floor
    gap = relative_gap(value, max(dual, best), floor)
    violation = op.violation(Z)
    return Convergence(gap <= options.tol and violation <= options.constraint_tol, gap, violation, dual)


class Bracket(NamedTuple):
    """A method's point in the problem's units and float64, with what it certifies (:func:`bracket`)."""

    U: Tensor
    V: Tensor
    b0: Tensor
    value: float
    dual: float
    violation: float


def bracket(op: Operator, W: Tensor, mu: Tensor | None, bound_point: tuple[Tensor, Tensor | None] | None) -> Bracket:
    """The point ``W`` (``op``'s layout and precision) in the problem's units, its value and violation recomputed in
    float64 with the problem's own data, and the larger of its certificate (with ``mu``) and ``bound_point``'s: what
    a solve reports, and what a method that stops on it must check."""
    problem = op.problem
    U, V = op.unpack(W)
    Z = op.forward(W)
    _, b0 = op.residual(Z)
    dtype = problem.X.dtype
    b0 = torch.zeros(op.c, dtype=dtype, device=op.device) if b0 is None else (b0 * op.y_unit).to(dtype)
    exact = problem.in_float64()
    point = (U.to(torch.float64), V.to(torch.float64), b0.to(torch.float64))
    value = float(exact.objective(*point))
    dual = exact_certificate(op, U, V, Z, mu, b0)
    if bound_point is not None:  # an earlier iterate's certificate, if it is better
        W_best, mu_best = bound_point
        dual = max(dual, exact_certificate(op, *op.unpack(W_best), op.forward(W_best), mu_best, None))
    if not math.isfinite(dual):
        dual = 0.0  # the objective is never negative: 0 is always a certified bound
    violation = 0.0 if op.gated else float(exact.violation(point[0], point[1]))
    return Bracket(U, V, b0, value, dual, violation)


def exact_certificate(op: Operator, U: Tensor, V: Tensor, Z: Tensor, mu: Tensor | None, b0: Tensor | None) -> float:
    """The certificate of the point ``(U, V)`` (``Z`` its block outputs in ``op``) with multipliers ``mu``."""
    if op.basis is None and op.dtype == torch.float64:
        return certificate(op, Z, mu, b0=b0)[0]
    # certified with the data itself, not its row-space coordinates (whose rank was decided with a tolerance) nor its
    # float32 rounding (a bound of the rounded problem exceeded the optimum by 1e-8 of it where the optimum is small)
    full = Operator(op.problem, gated=op.gated, dtype=torch.float64)
    return certificate(full, full.forward(full.pack(U, V)), mu, b0=b0)[0]


def final_status(
    problem: ConvexProblem, status: Status, value: float, dual: float, violation: float, options: NativeOptions
) -> Status:
    """The method's ``status``, kept only where the returned point earns it.

    ``OPTIMAL`` stays only when the relative gap between the returned point's objective ``value`` (recomputed in
    float64) and the certified ``dual`` is within ``tol`` (with the stopping rule's floor) and the ``violation``
    within ``constraint_tol · max|Y|``; otherwise the point is ``OPTIMAL_INACCURATE`` (usable, not certified). A
    non-finite value is ``FAILED``, whatever the method said.
    """
    if not math.isfinite(value):
        return Status.FAILED
    if status != Status.OPTIMAL:
        return status
    floor = problem.gap_floor
    y_unit = float(problem.Y.abs().max()) or 1.0
    tol, constraint_tol = options.tolerances()
    if relative_gap(value, dual, floor) <= tol and violation <= constraint_tol * y_unit:
        return Status.OPTIMAL
    return Status.OPTIMAL_INACCURATE
