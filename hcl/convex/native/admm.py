"""``"admm"``: the alternating direction method for large ``d`` (MNIST, CIFAR-10), whose linear step is exact.

The splitting is ``W = Z`` (the group norms) and ``A W = T ≥ 0`` (the cones). Because ``(2D_i − I)² = I``, the cones'
normal matrix ``AᵀA`` is ``XᵀX`` on every block, so the ``W``-step matrix ``2MᵀΠM + ρ₁I + ρ₂XᵀX`` is a diagonal (in
``X``'s right singular vectors, which leave every group norm unchanged) plus a coupling of rank ``n``, inverted by the
Woodbury identity through one ``n × n`` matrix ``I/2 + Π (H₀ ⊙ D N Dᵀ) Π`` shared by every output, with
``H₀ = X (ρ₁I + ρ₂XᵀX)⁻¹ Xᵀ`` and ``N`` the number of blocks per pattern: no ``d × d`` block per pattern. An iteration
costs six products with ``X`` of width ``P c``; memory is ``O(n² + n P c + d P c)``. The iteration is kept in its
Douglas–Rachford form (one state ``ζ``, the proximal steps' input), over-relaxed, with ``ρ`` balanced on the
relative residuals, and ``ζ`` extrapolated by Anderson acceleration (``options.anderson``). See
``docs/solvers.md#admm``.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor

from hcl.convex.feasibility import restore_feasibility
from hcl.convex.native.anderson import Anderson
from hcl.convex.native.certificate import Convergence, bracket, converged, final_status
from hcl.convex.native.clock import Deadline
from hcl.convex.native.operator import Operator, Result
from hcl.convex.native.options import ADMM_MATRIX_CHUNK, ANDERSON_MEMORY, NativeOptions
from hcl.convex.native.warm_start import WarmPoint
from hcl.convex.status import Status, relative_gap

# Over-relaxation (Eckstein–Bertsekas) and the starting penalties, relative to the mean curvature ‖X‖²_F / d for ρ₁
# and to XᵀX for ρ₂ (dimensionless); measured on MNIST in docs/solvers.md#admm
RELAXATION = 1.6
RHO_GROUPS = 0.01
RHO_CONES = 0.03
# Residual balancing: ρ changes by RHO_FACTOR when one relative residual exceeds the other RHO_BALANCE times, at most
# every RHO_EVERY iterations (a change refactors the n × n matrix)
RHO_FACTOR = 2.0
RHO_BALANCE = 10.0
RHO_EVERY = 25
# ρ falls no further once ‖H₀‖ ≤ min(σ²_max/ρ₁, 1/ρ₂) could pass this: beyond it the n × n matrix's I/2 is lost to
# rounding and its factorisation fails (ρ fell without bound on data of scales 1e-6 and 1e8 until it did)
RHO_CONDITION = 1e10
# ρ₂ grows (by PUSH_FACTOR) instead of balancing once the gap is within tol, the violation within this many
# constraint_tol but above STRICT_VIOLATION: the bound has caught up and only feasibility is left (further out, an
# infeasible point's value says little). When the gap opens again (the value rose with feasibility, the bound lags),
# ρ₂ returns to where the push began: a large ρ₂ stalls the bound; docs/solvers.md#admm
PUSH_WITHIN = 10.0
# A push multiplies ρ₂ by this (every RHO_EVERY iterations): each change restarts the Anderson history, so fewer,
# larger steps; docs/solvers.md#the-pushs-step
PUSH_FACTOR = 3.0
# Iterations between two tests of the stopping rule (each costs a float64 product with X; three in float32)
CHECK_EVERY = 10
# Below this violation (relative to max|Y|) a push stops growing ρ₂ (the monitors' strict tolerance); a test met at
# any violation above 0 is confirmed at the point moved exactly into its cones
STRICT_VIOLATION = 1e-6
# The Anderson acceleration extrapolates this many updates of ζ at once (its passes over the history cost that much
# less per iteration); docs/solvers.md#anderson-acceleration-of-the-admm
ANDERSON_EVERY = 3
# Below float64, this many stopping tests in a row with the best bound never up by a tenth of tol and the gap above tol
# and within STALL_SPREAD of itself (frozen) end the solve as stalled (it goes on in float64 from its point): float32's
# rounding caps how close the certificate gets when λ is small beside the data term (MNIST's bound stays flat for at
# most 10 tests; slow solves' gaps swing by 20 % and more); docs/solvers.md#float32-iterations-of-the-admm
STALL_CHECKS = 20
STALL_SPREAD = 0.02


class _LinearStep:
    """``(2MᵀΠM + ρ₁I + ρ₂XᵀX)⁻¹`` on ``W``'s space, ``X`` in its right singular basis (``XᵀX = diag σ²``)."""

    def __init__(self, op: Operator, sigma2: Tensor, rho1: float, rho2: float, chunk: int = ADMM_MATRIX_CHUNK) -> None:
        self.op = op
        self.inv_diag = (1.0 / (rho1 + rho2 * sigma2.to(torch.float64))).to(op.dtype)
        X = op.X.to(torch.float64)
        Xs = X * (1.0 / (rho1 + rho2 * sigma2.to(torch.float64)))
        weighted = op.Dm.to(torch.float64) * op.wmask[0, :, :, 0].sum(0).to(torch.float64)  # D N
        Dm = op.Dm.to(torch.float64)
        K = torch.empty(op.n, op.n, dtype=torch.float64, device=op.device)
        for lo in range(0, op.n, chunk):  # H₀ ⊙ (D N Dᵀ) a block of rows at a time: one n × n buffer
            rows = slice(lo, min(op.n, lo + chunk))
            K[rows] = (Xs[rows] @ X.T).mul_(weighted[rows] @ Dm.T)
        if op.bias:  # Π K Π
            K -= K.mean(0, keepdim=True)
            K -= K.mean(1, keepdim=True)
        K.diagonal().add_(0.5)
        # factored in place: K's column-major view is LAPACK's layout, so no second n × n copy (0.75 GiB at n = 10 000)
        _, info = torch.linalg.cholesky_ex(K.mT, out=(K.mT, torch.empty((), dtype=torch.int32, device=K.device)))
        if int(info):
            raise torch.linalg.LinAlgError(f"the ADMM's n × n matrix is not positive definite at ρ = {rho1:.3g}, "
                                           f"{rho2:.3g}")
        self.upper = K  # Lᵀ (row-major view of the column-major L)
        self.Yc = op.center(op.Y.to(torch.float64))

    def solve(self, B: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``W = (2MᵀΠM + A)⁻¹ (B + 2MᵀΠY)`` and its block outputs ``X W`` (written in ``out`` when given); ``B`` is
        overwritten (it becomes ``W``).

        In the form ``W₀ + A⁻¹MᵀΠ K⁻¹ Π(Y − M W₀)``, ``W₀ = A⁻¹B``: the data enter through the residual of ``W₀``,
        not through ``A⁻¹ 2MᵀY``, which the correction cancels to a part in ``‖K‖`` (float32 stalled on that)."""
        op = self.op
        W0 = B.mul_(self.inv_diag[:, None, None, None])
        Z0 = op.forward(W0, out=out)
        q = self.Yc - op.center(op.predict(Z0)).to(torch.float64)  # Π (Y − M W₀), (n, c)
        # two triangular solves: cholesky_solve copies the n × n factor on every call
        half = torch.linalg.solve_triangular(self.upper.mT, q, upper=False)
        y = op.center(torch.linalg.solve_triangular(self.upper, half, upper=True)).to(op.dtype)
        # A⁻¹ Mᵀ Π y: ± the same block on both sides, so X of it is one product of half the width
        G = (op.X.T @ (op.Dm[:, :, None] * y[:, None, :]).reshape(op.n, -1)).reshape(op.d, op.P, op.c)
        G *= self.inv_diag[:, None, None]
        XG = (op.X @ G.reshape(op.d, -1)).reshape(op.n, op.P, op.c)
        for side, sign in ((0, 1.0), (1, -1.0)):  # in place: the block outputs are the largest tensors
            mask = None if not op.restricted else op.wmask[0, side]  # (P, 1)
            W0[:, side].add_(G if mask is None else G * mask, alpha=sign)
            Z0[:, side].add_(XG if mask is None else XG * mask, alpha=sign)
        return W0, Z0


def admm(
    op: Operator, options: NativeOptions, warm: WarmPoint | None, deadline: Deadline | None,
    precision_fallback: bool = False,
) -> Result:
    """Run the ADMM on ``op`` from ``warm`` (or from zero) until the stopping rule, the cap or ``deadline``;
    ``precision_fallback``: end as stalled where the working precision stops the certificate (the caller goes on in
    float64)."""
    original = op.X
    check_op, rotation, sigma2 = _rotated(op)
    lam, constrained = op.lam, op.constrained
    curvature = float(sigma2.sum()) / op.d
    rho1 = RHO_GROUPS * (curvature if curvature > 0 else 1.0)  # X = 0: no curvature to scale by, and any ρ₁ works
    rho2 = RHO_CONES if constrained else 0.0
    if warm is not None and warm.rho is not None:  # a solve going on from where another stopped
        rho1, rho2 = warm.rho
    step = _LinearStep(op, sigma2, rho1, rho2)
    W = op.zeros() if warm is None else _rotate(warm.W.to(op.dtype), rotation)
    XW = op.forward(W)
    # ζ = (ζ_W, ζ_T): Z = prox(ζ), scaled multipliers ζ − Z. From a warm start (W, μ): ζ_T − T = −μ/ρ₂, and
    # ζ_W − W = −g/ρ₁ with g = Mᵀν − Aᵀμ the certificate's, which stationarity puts in −2λ ∂‖W‖ (projected on its
    # groups' 2λ-balls, where that subdifferential lies, for a start that is not an optimum)
    # ζ in one flat buffer (the acceleration works on it whole): its W part, then its T part
    nW, nT = W.numel(), XW.numel() if constrained else 0
    state = torch.empty(nW + nT, dtype=op.dtype, device=op.device)
    zeta_W = state[:nW].view_as(W).copy_(W)
    zeta_T = torch.mul(op.signed_cmask, XW, out=state[nW:].view_as(XW)) if constrained else None
    # none with λ = 0, whose stopping rule waits for the splitting to settle (there, extrapolated steps kept it moving
    # and ρ fell without end; docs/solvers.md#anderson-acceleration-of-the-admm)
    memory = 0 if lam == 0 else ANDERSON_MEMORY if options.anderson is None else options.anderson
    accelerate = Anderson(memory, nW + nT, nW, op.dtype, op.device) if memory else None
    if accelerate is not None:
        accelerate.reset((rho1, rho2))
    if warm is not None:
        mu = warm.mu.to(op.dtype) * op.cmask if constrained and warm.mu is not None else torch.zeros_like(XW)
        g = op.adjoint(2.0 * op.residual(XW)[0], mu.clone())
        g *= op.expand((2.0 * lam / op.group_norms(g).clamp(min=torch.finfo(g.dtype).tiny)).clamp(max=1.0))
        zeta_W -= g / rho1
        if constrained:
            zeta_T -= mu / rho2
    status, stalled = Status.MAX_ITERATIONS, False
    last_change, it = 0, 0
    prev_Z = None
    tried = 2.0 * options.constraint_tol  # the violation at the last move into the cones
    cost = 0.0  # what the last move added to the relative gap, per unit of violation (a move costs seconds)
    best, best_point = -math.inf, None  # the best certified bound seen (every one holds) and its iterate
    watch_stall = precision_fallback and lam > 0  # λ = 0 has its own stopping rule
    progress, flat_gaps = -math.inf, []  # the bound at the last gain of a tenth of tol, and the gaps tested since
    floored = []  # the violations of the tests in a row met (the loop's gap and violation) but not confirmed
    pushing = False  # the gap is closed but for the violation: ρ₂ grows instead of balancing
    push_base = None  # ρ₂ when the push under way began (None: no push), restored when it ends
    push_above = PUSH_WITHIN * options.constraint_tol
    # the block outputs' size tensors, allocated once (a fresh one each time costs as much as the operation on it)
    outputs = [XW, torch.empty_like(XW)]  # the step writes into the one the last iteration did not use
    if constrained:
        T, prev_T, work = torch.empty_like(XW), torch.empty_like(XW), torch.empty_like(XW)
    for it in range(1, options.max_iters + 1):
        Z = op.group_soft_threshold(zeta_W, 2.0 * lam / rho1) * op.wmask
        A1 = zeta_W - Z
        B = rho1 * (Z - A1)  # the data enter the step through its residual
        if constrained:
            T, prev_T = prev_T, T
            torch.clamp(zeta_T, min=0.0, out=T)  # the cones' projection; A2 = ζ_T − T
            torch.abs(zeta_T, out=work)  # T − A2
            B += rho2 * op.adjoint_constraint(work, overwrite=True)
        W, XW = step.solve(B, out=outputs[it % 2])
        checking = it % CHECK_EVERY == 0 or it == options.max_iters
        balancing = it - last_change >= RHO_EVERY and prev_Z is not None
        mu, unpush_to = None, None
        if constrained and checking:
            mu = torch.sub(T, zeta_T).mul_(rho2) * op.cmask  # −ρ₂ A2 ≥ 0
        if balancing:  # ρ's factors, from this iteration's residuals (before ζ moves)
            f1 = _balance(_relative(W - Z, W, Z), _relative(Z - prev_Z, A1))
            f2 = _balance(*_cone_residuals(op, XW, T, prev_T, zeta_T, work)) if constrained else 1.0
        stop = None
        if checking:
            check = _check(check_op, W, mu, options, it, (rho1, rho2), best, XW if op.dtype == torch.float64 else None)
            if check.dual > best:
                best, best_point = check.dual, (W.clone(), None if mu is None else mu.clone())
            pushing = constrained and check.gap <= options.tol and STRICT_VIOLATION < check.violation <= push_above
            if not pushing and push_base is not None and rho2 > push_base:
                unpush_to = push_base
            push_base = (push_base or rho2) if pushing else None
            if check.met and check.violation == 0:
                stop = Status.OPTIMAL
            elif check.met and check.violation <= 0.5 * tried and check.gap + cost * check.violation <= options.tol:
                # met at a point outside its cones: "optimal" only at the point moved exactly into them (its value may
                # lie below the optimum), tried again once the violation has halved and the last move's cost, scaled
                # to it, leaves the gap within tol
                # W on the groups the splitting keeps (Z's): the others are rounding (1e-9–1e-6 of the largest),
                # and each violated column costs the move a factorisation; docs/solvers.md#the-moves-support
                kept = W * op.expand(op.group_norms(Z) > 0)
                moving = time.perf_counter()
                feasible, moved_gap = _feasible(op, original, kept, mu, rotation, options, best_point)
                if deadline is not None:  # a one-off move, not the iterations' pace
                    deadline.exclude(time.perf_counter() - moving)
                if feasible is not None:
                    W, stop = feasible, Status.OPTIMAL
                tried = check.violation
                cost = max(moved_gap - check.gap, 0.0) / max(check.violation, 1e-300)
            if stop is None and lam == 0 and prev_Z is not None:
                # λ = 0: no certificate beyond 0 (see interior_point); stop on feasibility and a settled splitting
                settled = max(_relative(W - Z, W, Z), _relative(Z - prev_Z, Z)) <= options.tol
                if settled and check_op.violation(XW.to(torch.float64)) <= options.constraint_tol:
                    stop = Status.OPTIMAL_INACCURATE
            if watch_stall:
                if best - progress > 0.1 * options.tol * abs(best):
                    progress, flat_gaps = best, []
                else:
                    flat_gaps = flat_gaps[1 - STALL_CHECKS:] + [check.gap]
                frozen = len(flat_gaps) == STALL_CHECKS and min(flat_gaps) > options.tol
                if stop is None and frozen and max(flat_gaps) - min(flat_gaps) <= STALL_SPREAD * max(flat_gaps):
                    stop, stalled = Status.MAX_ITERATIONS, True  # the gap frozen above tol
                # met but not confirmed, the violation not halving (float32's floor): no move will confirm it
                floored = floored[1 - STALL_CHECKS:] + [check.violation] if check.met and stop is None else []
                half = STALL_CHECKS // 2
                if len(floored) == STALL_CHECKS and min(floored[half:]) > 0.5 * min(floored[:half]):
                    stop, stalled = Status.MAX_ITERATIONS, True
        if stop is None and deadline is not None and deadline.passed():
            stop = Status.TIME_LIMIT
        if stop is not None:  # before ζ moves: the multipliers returned are the ones the stop was decided with
            status = stop
            break
        if unpush_to is not None:  # the push is over (the gap opened again): ρ₂ returns to where it began
            balancing, f1, f2 = True, 1.0, unpush_to / rho2
        elif balancing and pushing:  # the certificate has caught up: only feasibility is left, which a larger ρ₂ buys
            f2 = PUSH_FACTOR
        jumped = False  # ζ extrapolated: the next iteration's change is no plain step's, and balances no ρ
        if balancing and (f1 != 1.0 or f2 != 1.0):
            f1, f2 = _floored(f1, f2, rho1, rho2, float(sigma2.max()), constrained)
        if balancing and (f1 != 1.0 or f2 != 1.0):
            del step  # one n × n matrix at a time
            step = _factored(op, sigma2, rho1 * f1, rho2 * f2)
            if step is None:  # not factorable in the working precision: the ρ it had (factored before) stays
                step, f1, f2 = _LinearStep(op, sigma2, rho1, rho2), 1.0, 1.0
        if balancing and (f1 != 1.0 or f2 != 1.0):  # same point and multipliers, scaled ones / f
            torch.add(Z, A1, alpha=1.0 / f1, out=zeta_W)
            if constrained:  # T + A2 / f2
                zeta_T.sub_(T).div_(f2).add_(T)
            rho1, rho2 = rho1 * f1, rho2 * f2
            last_change = it
            if accelerate is not None:  # a new map
                accelerate.reset((rho1, rho2))
        else:  # the relaxed update of ζ: ζ += RELAXATION (block value − prox)
            phase = (it - last_change) % ANDERSON_EVERY  # accelerated: the map is ANDERSON_EVERY of these updates
            if accelerate is not None and (phase == 1 or ANDERSON_EVERY == 1):
                accelerate.start.copy_(state)  # ζ where the span of updates begins
            zeta_W += RELAXATION * (W - Z)
            if constrained:
                zeta_T.sub_(T, alpha=RELAXATION).addcmul_(op.signed_cmask, XW, value=RELAXATION)
            if accelerate is not None and phase == 0:  # g = F(ζ) − ζ over the span, then the accelerated step
                torch.sub(state, accelerate.start, out=accelerate.residual)
                plain = accelerate.step(state.copy_(accelerate.start))  # False: back from a rejected extrapolation
                jumped = accelerate.corrected or not plain
        prev_Z = None if jumped else Z
    if accelerate is not None and options.verbose:
        print(f"admm: {accelerate.rejected} accelerated steps rejected")
    mu = None
    if constrained:
        mu = torch.clamp(zeta_T.neg_(), min=0.0).mul_(rho2) * op.cmask
    op.X, op.d = original, original.shape[1]
    best_point = None if best_point is None else (_in_data_basis(best_point[0], rotation, op), best_point[1])
    return Result(_in_data_basis(W, rotation, op), mu, it, status, bound_point=best_point, stalled=stalled,
                  rho=(rho1, rho2 if push_base is None else push_base))


def _check(
    check_op: Operator,
    W: Tensor,
    mu: Tensor | None,
    options: NativeOptions,
    it: int,
    rho,
    best: float,
    XW: Tensor | None = None,
) -> Convergence:
    """The stopping rule in float64 at ``W`` against the larger of its certificate and ``best`` (the working
    precision's block outputs are not accurate enough for a certificate in float32; ``XW``: the float64 ones)."""
    W64 = W.to(torch.float64)
    mu64 = None if mu is None else mu.to(torch.float64)
    check = converged(check_op, W64, check_op.forward(W64) if XW is None else XW, mu64, options, best=best)
    if options.verbose:
        print(f"admm {it:6d}  rel.gap {check.gap:.2e}  violation {check.violation:.2e}  ρ {rho[0]:.2e} {rho[1]:.2e}")
    return check


def _feasible(
    op: Operator,
    original: Tensor,
    W: Tensor,
    mu: Tensor | None,
    rotation: Tensor,
    options: NativeOptions,
    best_point: tuple[Tensor, Tensor | None] | None,
) -> tuple[Tensor | None, float]:
    """``W`` moved exactly into its cones (:func:`hcl.convex.feasibility.restore_feasibility`), in the solve's basis
    and precision, when the solve's own report of it (:func:`bracket`: the point as it is returned, and the best
    certificate, both with the problem's float64 data) earns ``"optimal"`` (else ``None``), and that relative gap."""
    problem = op.problem
    U, V, _ = restore_feasibility(problem, *op.unpack(_rotate(W, rotation.T)))
    moved = _rotate(op.pack(U, V), rotation)
    plain = copy.copy(op)  # the data in their own basis
    plain.X, plain.d = original, original.shape[1]
    best = None if best_point is None else (_in_data_basis(best_point[0], rotation, op), best_point[1])
    reported = bracket(plain, _in_data_basis(moved, rotation, op), mu, best)  # as the solve's result will read
    certified = final_status(
        problem, Status.OPTIMAL, reported.value, reported.dual, reported.violation, options
    ) == Status.OPTIMAL
    gap = relative_gap(reported.value, reported.dual, problem.gap_floor) if math.isfinite(reported.value) else math.inf
    return (moved if certified else None), gap


def _in_data_basis(W: Tensor, rotation: Tensor, op: Operator) -> Tensor:
    """``W`` of the solve's basis in the data's own, as the solve returns it."""
    return _rotate(W, rotation.T) * op.wmask


def _relative(diff: Tensor, *scales: Tensor) -> float:
    return float(diff.norm()) / max(max(float(s.norm()) for s in scales), 1e-300)


def _cone_residuals(
    op: Operator, XW: Tensor, T: Tensor, prev_T: Tensor, zeta_T: Tensor, work: Tensor
) -> tuple[float, float]:
    """The cones' relative primal and dual residuals, ``‖AW − T‖ / max(‖AW‖, ‖T‖)`` and ``‖T − T_prev‖ / ‖A2‖``
    (``A2 = ζ_T − T``), computed in ``work``."""
    AW = torch.mul(XW, op.signed_cmask, out=work)
    aw = float(AW.norm())
    primal = float(AW.sub_(T).norm()) / max(aw, float(T.norm()), 1e-300)
    a2 = float(torch.sub(zeta_T, T, out=work).norm())
    dual = float(torch.sub(T, prev_T, out=work).norm()) / max(a2, 1e-300)
    return primal, dual


def _floored(
    f1: float, f2: float, rho1: float, rho2: float, sigma2_max: float, constrained: bool
) -> tuple[float, float]:
    """The factors on ρ, without the decreases that would take ``min(σ²_max/ρ₁, 1/ρ₂)`` above ``RHO_CONDITION``."""
    def bound(r1: float, r2: float) -> float:
        return min(sigma2_max / max(r1, 1e-300), 1.0 / r2 if constrained and r2 > 0 else math.inf)

    if bound(rho1 * f1, rho2 * f2) <= RHO_CONDITION:
        return f1, f2
    return max(f1, 1.0), max(f2, 1.0)  # the increases only


def _factored(op: Operator, sigma2: Tensor, rho1: float, rho2: float) -> _LinearStep | None:
    """The linear step at the new ρ, or ``None`` where its matrix does not factor in the working precision (the
    solve keeps its ρ)."""
    try:
        return _LinearStep(op, sigma2, rho1, rho2)
    except torch.linalg.LinAlgError:
        return None


def _balance(primal: float, dual: float) -> float:
    """The factor on ρ that brings the relative primal and dual residuals together (1 while within RHO_BALANCE)."""
    if primal > RHO_BALANCE * dual:
        return RHO_FACTOR
    if dual > RHO_BALANCE * primal:
        return 1.0 / RHO_FACTOR
    return 1.0


def _rotated(op: Operator) -> tuple[Operator, Tensor, Tensor]:
    """Rotate ``op.X`` to ``X V`` (``X = U Σ Vᵀ``, so ``XᵀX = Σ²``) in place, and a float64 twin for the checks.

    Returns the twin, ``V`` in the working precision and ``σ²``.
    """
    X64 = op.data64()
    _, sigma, Vh = torch.linalg.svd(X64, full_matrices=False)
    twin = Operator.__new__(Operator)
    twin.__dict__.update(op.__dict__)
    for name in ("Y", "Dm", "signed_patterns", "S", "wmask", "cmask", "signed_cmask"):
        setattr(twin, name, getattr(op, name).to(torch.float64))
    twin.dtype = torch.float64
    twin.X = X64 @ Vh.T
    twin.d = twin.X.shape[1]
    op.X = twin.X.to(op.dtype)
    op.d = twin.d
    return twin, Vh.T.to(op.dtype), sigma.square()


def _rotate(W: Tensor, V: Tensor) -> Tensor:
    """``Vᵀ W`` over the feature axis (``V`` square orthogonal, or its transpose to undo)."""
    return (V.T @ W.reshape(W.shape[0], -1)).reshape(V.shape[1], *W.shape[1:])
