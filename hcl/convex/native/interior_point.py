"""``"newton"``: a primal-dual interior-point method (Mehrotra predictor-corrector) for the fixed-pattern problem.

The cone constraints ``(2D_i − I) X W ≥ 0`` get slacks and multipliers; the group norms are smoothed to
``√(‖W_g‖² + ε²)`` with ``ε`` driven to zero along with the barrier parameter, and their gradient is carried as a dual
variable of its own (:func:`dual_step`). Each Newton system is solved by
:class:`~hcl.convex.native.newton.NewtonSystem`. The method needs 25–50 iterations whatever the conditioning, which
is what first-order methods lack here; building the ``n × n`` matrices costs ``O(n² P d)`` and ``O(n²)`` memory, so
it is for ``n`` up to a few thousand. See ``docs/solvers.md#the-native-solver-hclconvexnativesolve_native``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hcl.convex.native.certificate import converged
from hcl.convex.native.clock import Deadline
from hcl.convex.native.newton import NewtonSystem, SchurPrecision
from hcl.convex.native.operator import Operator, Result
from hcl.convex.native.options import (
    SMOOTHING_START,
    STALL_ITERATIONS,
    START_MULTIPLIER,
    START_SLACK,
    WARM_CENTRALITY,
    WARM_SLACK_FLOOR,
    NativeOptions,
)
from hcl.convex.native.warm_start import WarmPoint
from hcl.convex.native.workspace import Workspace
from hcl.convex.status import GAP_FLOOR, Status


def interior_point(op: Operator, options: NativeOptions, warm: WarmPoint | None, deadline: Deadline | None) -> Result:
    """Run the interior-point method on ``op`` from ``warm`` (or from zero) until the stopping rule, the iteration
    cap or ``deadline``."""
    n, P, c = op.n, op.P, op.c
    cm = op.cmask
    m = max(op.num_constraints, 1)
    constrained = op.constrained
    tol = options.tol
    workspace = Workspace(op)
    precision = SchurPrecision(op)
    budget = options.chunk_size or max(1, (1 << 24) // max(op.n * op.d, 1))

    W = op.zeros() if warm is None else warm.W.clone()
    Z = op.forward(W)
    if constrained:
        if warm is not None and warm.mu is not None:
            # the previous optimum has many active cones with tiny multipliers: their products would start far below
            # the others', and the first steps would stop at them (see WARM_CENTRALITY)
            Sl = torch.clamp(op.constraint(Z), min=WARM_SLACK_FLOOR) * cm + (1 - cm)
            Zd = torch.maximum(warm.mu, WARM_CENTRALITY / Sl) * cm
        else:
            Sl = (torch.clamp(op.constraint(Z), min=0.0) + START_SLACK) * cm + (1 - cm)
            Zd = cm.expand(n, 2, P, c) * START_MULTIPLIER
    else:
        Sl = Zd = None
    # smoothing of the group norms, shrinking with μ: from SMOOTHING_START, but for the gated relaxation's cold start
    # (a line search, not the barrier), which starts at the scale of the normalised data
    eps = eps_start = SMOOTHING_START if (constrained or warm is not None) else 1.0
    eps_min = 1e-13
    # λ = 0: a stand-in weight decay that vanishes with the barrier parameter (or the smoothing); see zero_decay_scale
    stand_in = zero_decay_scale(op, tol) if op.lam == 0 else 0.0
    lam = stand_in if stand_in else op.lam
    mu_start = 0.0
    zeta = None  # the penalty's dual variable (see dual_step)
    status = Status.MAX_ITERATIONS
    it = 0
    mu = None
    best_gap, best_at = math.inf, 0
    for it in range(1, options.max_iters + 1):
        Z = op.forward(W)
        r, _ = op.residual(Z)
        # Mᵀν − Aᵀμ (ν = 2r): the data term's gradient less the cones' force, in one product with Xᵀ
        forces = op.adjoint(2.0 * r, Zd) if constrained else 2.0 * op.adjoint_data(r)
        if constrained:
            rp = op.constraint(Z).sub_(Sl)
            if op.restricted:  # the slacks of blocks without cones are 1, their constraints 0
                rp *= cm
            products = Sl * Zd  # the slack-multiplier products
            mu = float(products.sum()) / m
            theta = Zd / Sl  # zero on blocks without cones, whose multipliers are 0
        else:
            theta = None
        if stand_in:
            if constrained:
                mu_start = mu_start or max(mu, 1e-300)
                shrunk = stand_in * mu / mu_start
            else:
                shrunk = stand_in * eps / eps_start
            zeta = None if zeta is None else zeta * (shrunk / lam)
            lam = shrunk
        norms = op.group_norms(W)
        smooth = torch.sqrt(norms.square() + eps * eps)
        if zeta is None:  # starts on the smoothed path
            zeta = 2.0 * lam * W / op.expand(smooth) * op.wmask
        rd = (forces + 2.0 * lam * W / op.expand(smooth)) * op.wmask  # the dual residual
        # the certificate needs the same products: handed over where they already are in float64
        known = (r, forces) if op.dtype == torch.float64 else None
        check = converged(op, W, Z, Zd if constrained else None, options, known)
        if options.verbose:
            print(
                f"newton {it:3d}  rel.gap {check.gap:.2e}  violation {check.violation:.2e}"
                f"  mu {mu if constrained else 0.0:.2e}  eps {eps:.1e}"
            )
        # the stopping tests
        if check.met:
            status = Status.OPTIMAL
            break
        if deadline is not None and deadline.passed():
            status = Status.TIME_LIMIT
            break
        if op.lam == 0 and _kkt_met(op, r, rd, mu, m, check.violation, options):
            # λ = 0: the dual constraint is an equality no floating-point ν meets, so the only certified
            # bound is 0; stop on the Karush-Kuhn-Tucker residuals instead
            status = Status.OPTIMAL_INACCURATE
            break
        if check.gap < 0.5 * best_gap:
            best_gap, best_at = check.gap, it
        elif (
            it - best_at >= STALL_ITERATIONS and check.gap <= math.sqrt(tol)
            and check.violation <= options.constraint_tol
        ):
            # the certificate has stopped closing, within √tol: a usable point, not certified (a tiny λ in the data's
            # units needs the dual residual to a precision float64 does not give; see STALL_ITERATIONS)
            status = Status.OPTIMAL_INACCURATE
            break

        system = NewtonSystem(
            op, W, theta, smooth, workspace=workspace, precision=precision, budget=budget, lam=lam, dual=zeta
        )
        if constrained:
            # fused element-wise operations: the (n, 2, P, c) temporaries are the iteration's largest after the
            # Newton system's
            def direction(rc: Tensor, rd=rd, rp=rp, Sl=Sl, Zd=Zd, system=system) -> tuple:
                R = -rd - op.adjoint_constraint(torch.addcmul(rc, Zd, rp).div_(Sl))
                dW = system.solve(R)
                dS = torch.addcmul(rp, op.signed_cmask, op.forward(dW))  # A dW + rp
                dZ = torch.addcmul(rc, Zd, dS).div_(Sl).neg_()
                if op.restricted:
                    dZ *= cm
                # dS and dZ are 0 on blocks without cones: their slacks stay 1 and their multipliers 0
                return dW, dS, dZ

            dWa, dSa, dZa = direction(products)
            alpha_p, alpha_d = max_step(Sl, dSa), max_step(Zd, dZa)
            stepped = torch.add(Sl, dSa, alpha=alpha_p).reshape(-1), torch.add(Zd, dZa, alpha=alpha_d).reshape(-1)
            mu_aff = float(torch.dot(*stepped)) / m
            sigma = min(1.0, max(mu_aff / mu, 0.0)) ** 3
            # the barrier and the smoothing need only reach a tenth of the tolerance: going further
            # makes the Newton systems needlessly ill-conditioned
            value = float(r.square().sum() + op.penalty_value(W))
            target = max(sigma * mu, 0.1 * tol * value / m)
            dW, dS, dZ = direction(torch.addcmul(products, dSa, dZa).sub_(target))
            # separate primal and dual steps far from the optimum: fewer iterations (docs/solvers.md#tuned-constants)
            alpha_p, alpha_d = 0.99 * max_step(Sl, dS), 0.99 * max_step(Zd, dZ)
            # λ = 0 stops on the KKT residuals, which only a common step reduces in proportion; within √tol the
            # certificate must settle, and separate steps made it jump (docs/solvers.md#tuned-constants)
            if stand_in or check.gap < math.sqrt(tol):
                alpha_p = alpha_d = min(alpha_p, alpha_d)
            if options.verbose:
                residual = float(rd.abs().amax())
                print(f"           steps {alpha_p:.3f} {alpha_d:.3f}  sigma {sigma:.2e}  |rd| {residual:.2e}")
            zeta = dual_step(op, W, dW, zeta, smooth, lam, alpha_d)
            W = W + alpha_p * dW
            Sl = Sl.add_(dS, alpha=alpha_p)  # no other reference to them remains
            Zd = Zd.add_(dZ, alpha=alpha_d)
            if lam > 0:
                eps_floor = 0.05 * tol * value / (lam * op.num_groups)
                eps = max(min(eps, target * n / (2.0 * lam)), eps_floor, eps_min)
        else:
            dW = system.solve(-rd)
            value = float(r.square().sum() + op.penalty_value(W))
            eps_floor = 0.05 * tol * value / (op.lam * op.num_groups) if op.lam > 0 else eps_min
            step = _line_search(op, W, dW, rd, eps, lam)
            zeta = dual_step(op, W, dW, zeta, smooth, lam, step)
            W = W + step * dW
            eps = max(eps * (0.2 if step == 1.0 else 0.7), eps_floor, eps_min)
    else:
        # the last step's point has not been tested yet
        if status == Status.MAX_ITERATIONS and converged(op, W, op.forward(W), Zd, options).met:
            status = Status.OPTIMAL
    return Result(W * op.wmask, Zd if constrained else None, it, status)


def zero_decay_scale(op: Operator, tol: float) -> float:
    """The stand-in weight decay's starting value for ``λ = 0`` (normalised units).

    With ``λ = 0`` the optimal set is unbounded (``U_i`` and ``V_i`` can grow together; with an output bias or
    rank-deficient data whole directions are invisible to the data term) and the Newton matrix is singular along it:
    the barrier pushes the iterates out along these directions until rounding swamps the residual. The method
    solves instead with ``λ' = tol · ‖ΠY‖ ‖X‖_F / G`` (``G`` groups) scaled by ``μ/μ₀`` (``μ₀`` the first barrier
    parameter; in the gated relaxation by ``ε/ε₀``), which bounds them and vanishes along with the barrier. The value
    and the stopping rule are the ``λ = 0`` problem's. See ``docs/solvers.md#honest-statuses``.
    """
    return tol * float(op.center(op.Y).norm()) * float(op.X.norm()) / max(op.num_groups, 1)


def dual_step(op: Operator, W: Tensor, dW: Tensor, zeta: Tensor, smooth: Tensor, lam: float, alpha: float) -> Tensor:
    """The penalty's dual variable ``ζ`` after the step ``α dW``.

    On the smoothed path ``ζ_g = 2λ W_g / N_g``; carried as a variable of its own, with the Newton step of
    ``ζ_g N_g = 2λ W_g`` linearised at ``W`` and kept in the ball ``‖ζ_g‖ ≤ 2λ``, it enters the Newton matrix in place
    of the norm's Hessian (:class:`~hcl.convex.native.newton.NewtonSystem`). That is the primal-dual treatment of a
    smoothed norm (Chan, Golub and Mulet's for total variation): ``W_g / N_g`` swings when a group nears zero or
    ``ε`` shrinks, and Newton steps on it alone overshoot and stall (``docs/solvers.md#honest-statuses``).
    """
    N = op.expand(smooth)
    along = op.expand(op.group_sum(W * dW)) / N
    d_zeta = (2.0 * lam * (W + dW) - zeta * (N + along)) / N  # dζ = (2λ (w + dw) − ζ (N + wᵀdw / N)) / N
    zeta = (zeta + alpha * d_zeta) * op.wmask
    norms = op.group_norms(zeta)
    return zeta * op.expand(torch.clamp(2.0 * lam / norms.clamp(min=torch.finfo(norms.dtype).tiny), max=1.0))


def max_step(x: Tensor, dx: Tensor) -> float:
    """Largest ``α ≤ 1`` keeping ``x + α dx ≥ 0`` (``x ≥ 0``; entries with ``x = dx = 0`` are ignored)."""
    # one division and one reduction: the most negative dx / x, from which α = −x/dx (a masked ratio was 8× slower)
    worst = float(torch.div(dx, x).nan_to_num_(0.0, posinf=math.inf, neginf=-math.inf).amin())
    return 1.0 if worst >= -1.0 else -1.0 / worst


def _kkt_met(
    op: Operator, r: Tensor, rd: Tensor, mu: float | None, m: int, violation: float, options: NativeOptions
) -> bool:
    """Stationarity, complementarity and feasibility to ``tol`` (normalised units)."""
    tol = options.tol
    if violation > options.constraint_tol:
        return False
    data = float(r.square().sum())
    floor = GAP_FLOOR * float(op.center(op.Y).square().sum())
    if mu is not None and mu * m > tol * max(data, floor):
        return False
    worst = float(rd.abs().amax())
    # relative to the data term's gradient, computed only when the cheaper tests pass
    return worst <= tol or worst <= tol * float(2.0 * op.adjoint_data(r).abs().amax())


def _line_search(op: Operator, W: Tensor, dW: Tensor, grad: Tensor, eps: float, lam: float) -> float:
    """Gated relaxation: the step along ``dW`` with sufficient decrease of the smoothed objective (Armijo)."""

    def smoothed(V: Tensor) -> float:
        r, _ = op.residual(op.forward(V))
        norms = op.group_norms(V)
        if op.per_column:
            norms = norms * op.allowed[:, :, None]
        return float(r.square().sum() + 2.0 * lam * torch.sqrt(norms.square() + eps * eps).sum())

    f0 = smoothed(W)
    slope = float((grad * dW).sum())
    step = 1.0
    while step > 1e-8:
        if smoothed(W + step * dW) <= f0 + 1e-4 * step * slope:
            break
        step *= 0.5
    return step
