"""An independent reference optimum for the convex problem: cvxpy + Clarabel at tight tolerances, written block by
block from docs/convex.md (no code shared with hcl's formulation; its lower bound is hcl's certificate)."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import torch

from hcl.convex.native import dual_certificate
from hcl.convex.problem import ConvexProblem


class Reference(NamedTuple):
    """Clarabel's optimum, its status, and a certified lower bound at its point and multipliers (hcl's certificate,
    ``docs/solvers.md#the-certificate-derivation``): ``value − lower_bound`` is the reference's own uncertainty."""

    value: float
    status: str
    lower_bound: float


def reference_solve(problem: ConvexProblem, gated: bool = False) -> Reference:
    """The optimum of ``problem`` (or of its gated relaxation) by Clarabel at 1e-10 tolerances.

    Solved with ``Y`` scaled to ``max|Y| = 1`` (and ``λ`` with it), so that Clarabel's absolute tolerances are relative
    to the data: the optimum for ``(aY, aλ)`` is ``a²`` times the optimum for ``(Y, λ)``.
    """
    X = problem.X.double().numpy()
    Y = problem.Y.double().numpy()
    unit = float(np.abs(Y).max()) or 1.0
    Y = Y / unit
    D = problem.patterns.numpy().astype(float)
    n, d = X.shape
    P, c = D.shape[1], Y.shape[1]
    signs = np.zeros(P) if problem.signs is None else problem.signs.numpy()
    prediction, constraints, penalty, blocks = 0, [], 0, []
    for i in range(P):
        Di = D[:, i : i + 1]
        if gated:
            Z = cp.Variable((d, c))
            prediction = prediction + cp.multiply(Di, X @ Z)
            if c == 1 or problem.one_vs_all:
                penalty = penalty + sum(cp.norm(Z[:, k]) for k in range(c))
            else:
                penalty = penalty + cp.norm(Z, "fro")
            blocks.append((Z, None, []))
            continue
        U, V = cp.Variable((d, c)), cp.Variable((d, c))
        prediction = prediction + cp.multiply(Di, X @ (U - V))
        cones = [cp.multiply(2 * Di - 1, X @ U) >= 0, cp.multiply(2 * Di - 1, X @ V) >= 0]
        constraints += cones
        blocks.append((U, V, cones))
        if signs[i] > 0:
            constraints.append(V == 0)
        if signs[i] < 0:
            constraints.append(U == 0)
        if c == 1 or problem.one_vs_all:
            penalty = penalty + sum(cp.norm(U[:, k]) + cp.norm(V[:, k]) for k in range(c))
        else:
            penalty = penalty + cp.norm(cp.hstack([U, V]), "fro")
    residual = prediction - Y
    b = None
    if problem.output_bias:
        b = cp.Variable((1, c))
        residual = residual + np.ones((n, 1)) @ b
    objective = problem.scale * cp.sum_squares(residual) + 2 * (problem.weight_decay / unit) * penalty
    cvx = cp.Problem(cp.Minimize(objective), constraints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "may be inaccurate" at these very tight tolerances
        cvx.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    if cvx.status not in ("optimal", "optimal_inaccurate"):
        return Reference(math.nan, cvx.status, 0.0)
    U, V, b0 = _point(problem, blocks, b, unit)
    mu = None
    if not gated:
        mu = torch.zeros(n, 2, P, c, dtype=torch.float64)
        for i, (_, _, cones) in enumerate(blocks):
            for side, cone in enumerate(cones):
                mu[:, side, i, :] = torch.as_tensor(np.asarray(cone.dual_value).reshape(n, c)).clamp(min=0) * unit
    lower = dual_certificate(problem, U, V, b0, mu, gated=gated)
    return Reference(float(cvx.value) * unit * unit, cvx.status, lower)


def _point(problem: ConvexProblem, blocks: list, b, unit: float):
    """The reference's ``(U, V, b0)`` in the problem's units, float64."""
    P, d, c = problem.num_patterns, problem.d, problem.c
    U = torch.zeros(P, d, c, dtype=torch.float64)
    V = torch.zeros(P, d, c, dtype=torch.float64)
    for i, block in enumerate(blocks):
        U[i] = torch.as_tensor(block[0].value) * unit
        if block[1] is not None:
            V[i] = torch.as_tensor(block[1].value) * unit
    b0 = torch.zeros(c, dtype=torch.float64) if b is None else torch.as_tensor(b.value).reshape(c) * unit
    return U, V, b0


def reference_value(problem: ConvexProblem, gated: bool = False) -> float:
    """The optimum of :func:`reference_solve`."""
    return reference_solve(problem, gated).value
