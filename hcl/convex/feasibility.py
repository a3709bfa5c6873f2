"""A feasible point near a nearly feasible one, so that its objective bounds ``p*`` from above.

A solver stopped at a loose ``constraint_tol`` returns block columns ``u`` slightly outside their cones
``(2D_i − I) X u ≥ 0``; their objective may then lie below ``p*``. Each violated column is moved by the least step
that puts its outputs a hair inside the cone on the violated samples ``A``, least in the metric ``Q = XᵀX + r I`` (the
data term's curvature, so that the outputs on the other samples move little): ``δ = Q⁻¹X_Aᵀ (X_A Q⁻¹X_Aᵀ)⁻¹ (ε − X_A
u)``, ``A`` growing with any sample a step pushes out, for a few rounds; a column that does not settle becomes zero
(inside every cone), as does at once a column hardly larger than its violation. A cone without interior is reached
on its boundary, up to the products' rounding (``ROUNDING``). See ``docs/convex.md#feasibility``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from hcl.convex.native.certificate import final_status
from hcl.convex.native.options import NativeOptions
from hcl.convex.problem import ConvexProblem, ConvexSolution
from hcl.convex.status import Status, relative_gap

# Rounds of growing the active set before a column is given up (and set to zero)
ROUNDS = 8
# Relative ridge on the active rows' Gram matrix (rows that are nearly dependent)
RIDGE = 1e-12
# With at least as many active samples as unknowns, a step is kept only when it meets its targets to this fraction
CONSISTENT = 1e-6
# Up to this n the n × n matrix X Q⁻¹ Xᵀ (128 MiB) is formed once; beyond, each step forms its active rows' own
GRAM_MAX_SAMPLES = 4096
# The ridge r of the steps' metric Q, relative to the mean curvature ‖X‖²_F / d; docs/convex.md#feasibility
METRIC_RIDGE = 1e-2
# How far inside the cone the active samples' outputs are put, relative to the column's largest output
INSIDE = 1e-9
# A move along a given direction is taken when it changes no output by more than this many times the violation
SHIFT_MAX = 100.0
# A violated column whose outputs are at most this many times its violation is zeroed, not stepped: any move into its
# cone changes them by at least the violation (rounding, violated on many samples); docs/convex.md#feasibility
ZERO_WITHIN = 10.0
# Columns whose steps are formed by one product: a few n-vectors each, not a second copy of the outputs X W
STEP_COLUMNS = 256
# A column whose active samples no step puts inside (a cone without interior: x and −x both tied at 0) is moved onto
# the boundary instead, where its outputs are 0 up to this fraction of its largest one (the products' rounding)
ROUNDING = 1e-12
# Boundary columns left outside by rounding are zeroed when that raises the point's value by at most this fraction
ZEROED_COST = 1e-9


def restore_feasibility(
    problem: ConvexProblem, U: Tensor, V: Tensor, directions: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U', V', b0')`` in float64: ``(U, V)`` with every column moved into its cone (columns already inside are left
    as they are; a column the steps do not bring inside within ``ROUNDS`` becomes zero, which every cone holds, as
    does one whose outputs are at most ``ZERO_WITHIN`` times its violation, before any step; one whose cone has no
    interior is put on its boundary, outside by at most ``ROUNDING`` of its largest output before the move) and the
    optimal output bias. Where exactly feasible (violation 0), its objective is an upper bound on ``p*``.

    ``directions``: ``(d, P)`` a point of each pattern's cone (e.g. the network's own neuron, ``0`` where none is
    known). A column is first moved along its pattern's one by the least step that puts it inside, for every column at
    once (:func:`_shift_inside`); the columns that step cannot settle take the least-distance steps below.
    """
    exact = problem.in_float64()
    X = exact.X
    P, d, c = U.shape
    S = exact.patterns.to(torch.float64) * 2.0 - 1.0  # (n, P)
    # every column of both sides as one (d, 2Pc) matrix, with its pattern's signs
    W = torch.stack([U.to(torch.float64), V.to(torch.float64)]).permute(2, 0, 1, 3).reshape(d, -1).clone()
    signs = S[:, None, :, None].expand(-1, 2, -1, c).reshape(X.shape[0], -1)
    XW = X @ W  # one product for every column, once per round
    inside = INSIDE * XW.abs().amax(0)  # how far inside the active samples are put, per column
    if directions is not None and bool((signs * XW < 0).any()):
        pattern = torch.arange(P, device=X.device)[None, :, None].expand(2, -1, c).reshape(-1)
        H = directions.to(X.device, torch.float64)[:, pattern]
        W = _shift_inside(W, XW, H, X @ H, signs, inside)
        XW = X @ W  # recomputed: the steps below see the moved columns' rounding too
    Q = X.T @ X
    Q.diagonal().add_(METRIC_RIDGE * float(Q.diagonal().sum()) / X.shape[1] or 1.0)  # X = 0: the plain norm
    XQ = torch.cholesky_solve(X.T, torch.linalg.cholesky(Q)).T  # X Q⁻¹
    gram = XQ @ X.T if X.shape[0] <= GRAM_MAX_SAMPLES else None  # the active rows' matrices are its blocks
    active = torch.zeros_like(signs, dtype=torch.bool)
    rounding = ROUNDING * XW.abs().amax(0)  # of the outputs before the move (0 for a column of zeros)
    boundary = torch.zeros(W.shape[1], dtype=torch.bool, device=X.device)  # columns put on their cones' boundary
    for _ in range(ROUNDS):
        slack = signs * XW
        violated = (slack < 0) & ~(boundary & (slack >= -rounding))
        shortfall = torch.where(violated, inside - slack, 0.0).norm(dim=0)
        small = violated.any(0) & (XW.norm(dim=0) <= ZERO_WITHIN * shortfall)
        W[:, small], XW[:, small] = 0.0, 0.0
        violated &= ~small
        todo = violated.any(0).nonzero().flatten()
        if len(todo) == 0:
            break
        active |= violated
        for cols in todo.split(STEP_COLUMNS):
            # each column's multipliers on its active rows, then the steps Q⁻¹X_Aᵀα of these columns in one product
            alpha = torch.zeros(X.shape[0], len(cols), dtype=torch.float64, device=X.device)
            settles = torch.ones(len(cols), dtype=torch.bool, device=X.device)
            target = inside[cols] * signs[:, cols] - XW[:, cols]  # the outputs are XW's: no product per column
            for k, j in enumerate(cols.tolist()):
                settles[k] = _multipliers(X, XQ, gram, active[:, j], target[:, k], alpha[:, k])
                if not settles[k]:  # no interior to reach: the outputs on the active samples to 0 instead
                    settles[k] = boundary[j] = _multipliers(X, XQ, gram, active[:, j], -XW[:, j], alpha[:, k])
            W[:, cols] = torch.where(settles, W[:, cols] + XQ.T @ alpha, 0.0)  # no step: zero, inside every cone
            XW[:, cols] = X @ W[:, cols]
    # the columns that did not settle (on the boundary: beyond the products' rounding), and those on a boundary that
    # is only 0 (the cone {0}: a neuron of zeros without bias on data on every side) exactly there
    W[:, ((signs * XW < 0) & ~(boundary & (signs * XW >= -rounding))).any(0)] = 0.0
    W[:, boundary & (XW.abs() <= rounding).all(0)] = 0.0
    point = _point(exact, W, (d, P, c))
    # boundary columns still outside by rounding keep the point from bounding p*: zeroed where that costs nothing
    # measurable (columns that are rounding themselves: 13 of norm 1e-7 at 500 MNIST images and 10 outputs), kept where
    # the value would rise (a cone without interior, whose column carries the fit)
    stray = boundary & (signs * XW < 0).any(0)
    if bool(stray.any()):
        zeroed = _point(exact, torch.where(stray, 0.0, W), (d, P, c))
        if float(exact.objective(*zeroed)) <= float(exact.objective(*point)) * (1.0 + ZEROED_COST):
            point = zeroed
    return point


def _point(exact: ConvexProblem, W: Tensor, sizes: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, V, b0)`` of the ``(d, 2Pc)`` columns ``W``, with the optimal output bias."""
    d, P, c = sizes
    W = W.reshape(d, 2, P, c).permute(1, 2, 0, 3)
    U2, V2 = W[0].contiguous(), W[1].contiguous()
    b0 = torch.zeros(exact.c, dtype=torch.float64, device=W.device)
    if exact.output_bias:
        b0 = (exact.Y - exact.predict(U2, V2)).mean(0)
    return U2, V2, b0


def _shift_inside(W: Tensor, XW: Tensor, H: Tensor, XH: Tensor, signs: Tensor, inside: Tensor) -> Tensor:
    """``W`` with each violated column ``u`` moved to ``u + t h`` (``h`` its column of ``H``), ``t ≥ 0`` the least
    that puts its violated samples ``inside`` the cone while the others stay in it, where such a ``t`` exists: one
    vectorised step where the loop of :func:`_multipliers` costs a factorisation per column (33 s at 500 MNIST
    images)."""
    slack, margin = signs * XW, signs * XH
    violated = slack < 0
    rises = margin > 0
    need = torch.where(violated & rises, (inside - slack) / torch.where(rises, margin, 1.0), 0.0).amax(0)
    falls = (margin < 0) & ~violated
    room = torch.where(falls, slack / torch.where(falls, -margin, 1.0), math.inf).amin(0)
    movable = violated.any(0) & ~(violated & ~rises).any(0) & (need <= room)
    # only a small move: a direction nearly parallel to the violated samples' boundary moves the outputs far
    movable &= need * XH.abs().amax(0) <= SHIFT_MAX * (inside - slack).amax(0)
    return W + H * torch.where(movable, need, 0.0)


def _multipliers(X: Tensor, XQ: Tensor, gram: Tensor | None, active: Tensor, target: Tensor, out: Tensor) -> bool:
    """Write in ``out`` (zero off the ``active`` samples) the ``α`` of the least step in ``Q`` (``XQ = X Q⁻¹``),
    ``Q⁻¹Xᵀα``, that moves the outputs on the ``active`` samples by ``target``; ``False`` when no step does.

    Dependent rows (duplicated or collinear points: as many active samples as unknowns or more) are no reason to
    refuse: the system is then solved with the ridge and kept where the step meets its targets."""
    index = active.nonzero().flatten()
    G = gram[index[:, None], index] if gram is not None else XQ[index] @ X[index].T  # one gather, |A|² entries
    dependent = len(index) >= X.shape[1]
    exact = G.clone() if dependent else None
    G.diagonal().add_(RIDGE * float(G.diagonal().max()))
    factor, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return False
    alpha = torch.cholesky_solve(target[index, None], factor).squeeze(1)
    # with dependent rows only a consistent system has a step (one that misses is the ridge's, possibly huge)
    if dependent and float((exact @ alpha - target[index]).norm()) > CONSISTENT * float(target[index].norm()):
        return False
    out[index] = alpha
    return True


def feasible_solution(
    problem: ConvexProblem, solution: ConvexSolution, tol: float, directions: Tensor | None = None
) -> ConvexSolution:
    """``solution`` when its point is feasible (violation 0); otherwise the solution at its restored point
    (:func:`restore_feasibility`): that point's value and violation, and ``"optimal"`` kept only when the relative gap
    from the restored value to the certified dual value is within ``tol`` (with the native stopping rule's floor; with
    ``λ = 0``, which certifies nothing above 0, when the move changed the solver's value by at most ``tol``: a move
    that lowers it found a feasible point below the claimed optimum, which was then none).
    Even a violation within a solver's tolerance is moved away: such a point's value can lie below ``p*``, under the
    certified lower bound, and would not bound ``p*`` from above. ``directions`` as in :func:`restore_feasibility`."""
    if solution.gated or not math.isfinite(solution.value) or solution.violation <= 0.0:
        return solution
    U, V, b0 = restore_feasibility(problem, solution.U, solution.V, directions)
    exact = problem.in_float64()
    value, violation = float(exact.objective(U, V, b0)), float(exact.violation(U, V))
    status = Status.of(solution.status)
    if status == Status.OPTIMAL:
        if exact.weight_decay == 0:  # no certificate beyond 0: the solver's own test stands where the move cost nothing
            moved = abs(relative_gap(value, float(solution.value), exact.gap_floor))
            y_unit = float(exact.Y.abs().max()) or 1.0
            status = status if moved <= tol and violation <= tol * y_unit else Status.OPTIMAL_INACCURATE
        elif solution.dual_value is None:
            status = Status.OPTIMAL_INACCURATE
        else:
            status = final_status(exact, status, value, float(solution.dual_value), violation, NativeOptions(tol=tol))
    dtype = solution.U.dtype
    return replace(solution, U=U.to(dtype), V=V.to(dtype), b0=b0.to(dtype), value=value, violation=violation,
                   status=status)
