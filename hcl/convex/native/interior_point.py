"""``"newton"``: a primal-dual interior-point method (Mehrotra predictor-corrector) for the fixed-pattern problem.

The cone constraints ``(2D_i − I) X W ≥ 0`` get slacks and multipliers; the group norms are smoothed to
``√(‖W_g‖² + ε²)`` with ``ε`` driven to zero along with the barrier parameter. Each Newton system is solved by
:class:`~hcl.convex.native.newton.NewtonSystem`. The method needs 25–50 iterations whatever the conditioning, which
is what first-order methods lack here; building the ``n × n`` matrices costs ``O(n² P d)`` and ``O(n²)`` memory, so
it is for ``n`` up to a few thousand. See ``docs/solvers.md#the-native-solver-hclconvexnativesolve_native``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from hcl.convex.native.certificate import GAP_FLOOR, converged
from hcl.convex.native.newton import NewtonSystem, SchurPrecision
from hcl.convex.native.operator import Operator, Result
from hcl.convex.native.options import WARM_CENTRALITY, WARM_SLACK_FLOOR, NativeOptions
from hcl.convex.native.warm_start import WarmPoint
from hcl.convex.native.workspace import Workspace
from hcl.convex.status import Status


def interior_point(op: Operator, options: NativeOptions, warm: WarmPoint | None, deadline: float | None) -> Result:
    """Run the interior-point method on ``op`` from ``warm`` (or from zero) until the stopping rule, the iteration
    cap or ``deadline`` (a ``time.perf_counter()`` value)."""
    n, P, c = op.n, op.P, op.c
    lam = op.lam
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
            Sl = (torch.clamp(op.constraint(Z), min=0.0) + 1.0) * cm + (1 - cm)
            Zd = cm.expand(n, 2, P, c).clone()
    else:
        Sl = Zd = None
    # smoothing of the group norms: starts at the scale of the normalised data, shrinks with μ
    eps = 1e-3 if (warm is not None and (warm.mu is not None or not constrained)) else 1.0
    eps_min = 1e-13
    status = Status.MAX_ITERATIONS
    it = 0
    mu = None
    for it in range(1, options.max_iters + 1):
        Z = op.forward(W)
        r, _ = op.residual(Z)
        # Mᵀν − Aᵀμ (ν = 2r): the data term's gradient less the cones' force, in one product with Xᵀ
        forces = op.adjoint(2.0 * r, Zd) if constrained else 2.0 * op.adjoint_data(r)
        norms = op.group_norms(W)
        smooth = torch.sqrt(norms.square() + eps * eps)
        rd = (forces + 2.0 * lam * W / op.expand(smooth)) * op.wmask  # the dual residual
        if constrained:
            rp = op.constraint(Z).sub_(Sl)
            if op.restricted:  # the slacks of blocks without cones are 1, their constraints 0
                rp *= cm
            products = Sl * Zd  # the slack-multiplier products
            mu = float(products.sum()) / m
            theta = Zd / Sl  # zero on blocks without cones, whose multipliers are 0
        else:
            theta = None
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
        if deadline is not None and time.perf_counter() > deadline:
            status = Status.TIME_LIMIT
            break
        if lam == 0 and _kkt_met(op, r, rd, mu, m, check.violation, options):
            # λ = 0: the dual constraint is an equality no floating-point ν meets, so the only certified
            # bound is 0; stop on the Karush-Kuhn-Tucker residuals instead
            status = Status.OPTIMAL_INACCURATE
            break

        system = NewtonSystem(op, W, theta, smooth, workspace=workspace, precision=precision, budget=budget)
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
            stepped = torch.add(Sl, dSa, alpha=alpha_p).view(-1), torch.add(Zd, dZa, alpha=alpha_d).view(-1)
            mu_aff = float(torch.dot(*stepped)) / m
            sigma = min(1.0, max(mu_aff / mu, 0.0)) ** 3
            # the barrier and the smoothing need only reach a tenth of the tolerance: going further
            # makes the Newton systems needlessly ill-conditioned
            value = float(r.square().sum() + op.penalty_value(W))
            target = max(sigma * mu, 0.1 * tol * value / m)
            dW, dS, dZ = direction(torch.addcmul(products, dSa, dZa).sub_(target))
            alpha = 0.99 * min(max_step(Sl, dS), max_step(Zd, dZ))
            if options.verbose:
                print(f"           step {alpha:.3f}  sigma {sigma:.2e}  |rd| {float(rd.abs().amax()):.2e}")
            W = W + alpha * dW
            Sl = Sl.add_(dS, alpha=alpha)  # no other reference to them remains
            Zd = Zd.add_(dZ, alpha=alpha)
            if lam > 0:
                eps_floor = 0.05 * tol * value / (lam * op.num_groups)
                eps = max(min(eps, target * n / (2.0 * lam)), eps_floor, eps_min)
        else:
            dW = system.solve(-rd)
            value = float(r.square().sum() + op.penalty_value(W))
            eps_floor = 0.05 * tol * value / (lam * op.num_groups) if lam > 0 else eps_min
            W, eps = _smoothed_newton_step(op, W, dW, rd, eps, max(eps_floor, eps_min))
    else:
        # the last step's point has not been tested yet
        if status == Status.MAX_ITERATIONS and converged(op, W, op.forward(W), Zd, options).met:
            status = Status.OPTIMAL
    return Result(W * op.wmask, Zd if constrained else None, it, status)


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


def _smoothed_newton_step(op: Operator, W: Tensor, dW: Tensor, grad: Tensor, eps: float, eps_min: float):
    """Gated relaxation: a damped Newton step on the smoothed objective, then a smaller ``ε``."""

    def smoothed(V: Tensor) -> float:
        r, _ = op.residual(op.forward(V))
        norms = op.group_norms(V)
        if op.per_column:
            norms = norms * op.allowed[:, :, None]
        return float(r.square().sum() + 2.0 * op.lam * torch.sqrt(norms.square() + eps * eps).sum())

    f0 = smoothed(W)
    slope = float((grad * dW).sum())
    step = 1.0
    while step > 1e-8:
        if smoothed(W + step * dW) <= f0 + 1e-4 * step * slope:
            break
        step *= 0.5
    W = W + step * dW
    eps = max(eps * (0.2 if step == 1.0 else 0.7), eps_min)
    return W, eps
