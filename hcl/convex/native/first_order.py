"""``"fista"``: a matrix-free method, for problems where an ``n × n`` matrix does not fit (full MNIST).

An augmented Lagrangian on the cone constraints (squared-hinge penalty ``δ/2 ‖(γ/δ − S⊙XW)₊‖²``, the user may set
``δ``) whose subproblems are solved by FISTA with the group soft-threshold, textbook momentum
``t₊ = (1 + √(1 + 4t²))/2``, backtracking with step growth and gradient-based restarts. The gated relaxation is plain
FISTA. Each iteration costs two products with ``X`` (``n × d`` times ``d × 2Pc``), chunked over samples; memory is
``O(n P c + d P c)`` plus ``X``. See ``docs/solvers.md#the-native-solver-hclconvexnativesolve_native``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hcl.convex.native.certificate import converged
from hcl.convex.native.clock import Deadline
from hcl.convex.native.operator import Operator, Result
from hcl.convex.native.options import NativeOptions
from hcl.convex.native.warm_start import WarmPoint
from hcl.convex.native.workspace import Workspace
from hcl.convex.status import Status

# Iterations between two tests of the stopping rule in the gated relaxation (the constrained problem tests at each
# multiplier update): each test computes the certificate, in float64.
CHECK_EVERY = 25


def first_order(
    op: Operator, options: NativeOptions, warm: WarmPoint | None, deadline: Deadline | None,
    precision_fallback: bool = False,
) -> Result:
    """Run the augmented Lagrangian + FISTA (constrained) or FISTA (gated) on ``op`` from ``warm`` (or from zero)
    until the stopping rule, the iteration cap or ``deadline``;
    ``precision_fallback``: end as stalled where rounding stops the backtracking (the caller goes on in float64)."""
    n, P, c = op.n, op.P, op.c
    lam = op.lam
    constrained = op.constrained
    workspace = Workspace(op)
    W = op.zeros() if warm is None else warm.W.clone()
    gamma = None
    if constrained:
        gamma = torch.zeros(n, 2, P, c, dtype=op.dtype, device=op.device)
        if warm is not None and warm.mu is not None:
            gamma = warm.mu.clone()
    # curvature of the data term (power iteration) and of the constraint map (‖X‖²)
    L_data = 2.0 * _power_norm(lambda V: op.adjoint_data(op.center(op.predict(op.forward(V)))), op, deadline)
    L_cons = 0.0
    if constrained:
        L_cons = _power_norm(lambda V: op.adjoint_constraint(op.constraint(op.forward(V))), op, deadline)
    if options.penalty is not None:
        delta = float(options.penalty) / op.problem.scale  # δ multiplies (data units)², as s does
    else:
        # the data term's curvature over the constraints'; floored for patterns that select no sample, where the
        # data term is flat (L_data = 0) and δ = 0 would leave the constraints unenforced
        delta = max(L_data / max(L_cons, 1e-300), 1e-6) if constrained else 0.0
    # (floored where the data term is flat, e.g. constant block outputs centred away by the output bias)
    step = 1.0 / max(L_data + delta * L_cons, op.regularization, 1e-300)
    if not step > 0.0 or not math.isfinite(step):  # the curvature overflows the working precision (data near its
        return Result(W, gamma, 0, Status.FAILED)  # largest values): no step to take
    shifted = gamma / delta if constrained else None  # γ/δ, the hinge's offset
    min_step = 1e-6 * step
    rounding = 10.0 * torch.finfo(op.dtype).eps  # the sufficient-decrease test tolerates round-off
    Z = op.forward(W)
    W_prev, Z_prev = W, Z
    t = 1.0
    inner_tol = 1e-1
    status, stalled = Status.MAX_ITERATIONS, False
    last_violation = math.inf
    iters_since = 0
    it = 0

    rows_per_chunk = options.chunk_size or n
    chunks = [slice(lo, min(n, lo + rows_per_chunk)) for lo in range(0, n, rows_per_chunk)]

    def smooth_part(Za: Tensor, Zb: Tensor | None = None, beta: float = 0.0, want_grad: bool = False):
        """Value (and gradient) of the smooth part at ``Z = Za + β (Za − Zb)``, a chunk of samples at a time.

        Everything but the output bias's mean is row-local, so the temporaries are ``chunk × 2Pc``.
        """

        def block_outputs(rows: slice) -> Tensor:
            Zc = Za[rows]
            if Zb is None or beta == 0.0:
                return Zc
            out = workspace.scratch("extrapolated", Zc.numel(), Zc.dtype).view(Zc.shape)
            return torch.lerp(Zb[rows], Zc, 1.0 + beta, out=out)  # Zc + β (Zc − Zb)

        shift = 0.0
        if op.bias:  # the optimal output bias centres the residual: its mean needs every row first
            shift = sum((op.predict(block_outputs(rows), rows) - op.Y[rows]).sum(0) for rows in chunks) / n
        value = 0.0
        grad = torch.zeros_like(W) if want_grad else None
        for rows in chunks:
            Zc = block_outputs(rows)
            r = op.predict(Zc, rows) - op.Y[rows] - shift
            value += float(r.square().sum())
            if constrained:
                # (γ/δ − S ⊙ XW)₊, zero on the blocks without cones (γ/δ and the signs are zero there); fused ops:
                # these (rows, 2, P, c) temporaries are an iteration's largest
                hinge = workspace.scratch("hinge", Zc.numel(), Zc.dtype).view(Zc.shape)
                torch.addcmul(shifted[rows], op.signed_cmask[rows], Zc, value=-1.0, out=hinge).relu_()
                flat = hinge.view(-1)
                value += 0.5 * delta * float(torch.dot(flat, flat))
                if want_grad:  # both terms' products with Xᵀ as one
                    grad += op.adjoint(2.0 * r, hinge.mul_(delta), rows, overwrite=True)
            elif want_grad:
                grad += 2.0 * op.adjoint_data(r, rows)
        return value, grad

    for it in range(1, options.max_iters + 1):
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        Wy = W + beta * (W - W_prev)
        # X is linear: the extrapolated point's X W_y is Z + β (Z − Z_prev), no product needed
        fy, grad = smooth_part(Z, Z_prev, beta, want_grad=True)
        while True:
            W_new = op.group_soft_threshold(Wy - step * grad, 2.0 * lam * step) * op.wmask
            Z_new = op.forward(W_new)
            f_new = smooth_part(Z_new)[0]
            diff = W_new - Wy
            bound = fy + float((grad * diff).sum()) + float(diff.square().sum()) / (2.0 * step)
            if f_new <= bound + rounding * abs(fy) or step < min_step:
                break
            late = deadline is not None and deadline.reached()
            if late or not (math.isfinite(f_new) or math.isfinite(fy)):
                break  # out of time, or nothing finite to decrease (overflow): the tests below say which
            step *= 0.5
        if step < min_step and precision_fallback:  # the decrease test fails on rounding alone: go on in float64
            W, Z, status, stalled = W_new, Z_new, Status.MAX_ITERATIONS, True
            break
        # gradient-based restart (O'Donoghue & Candès): drop momentum when it points uphill
        if float(((Wy - W_new) * (W_new - W)).sum()) > 0:
            t, W_prev, Z_prev = 1.0, W_new, Z_new
        else:
            t, W_prev, Z_prev = t_next, W, Z
        W, Z = W_new, Z_new
        step *= 1.05
        iters_since += 1
        mapping = float(diff.norm()) / step
        inner_done = mapping < inner_tol or iters_since >= 2000
        if constrained and inner_done:
            gamma = torch.addcmul(gamma, op.signed_cmask, Z, value=-delta).relu_()  # zero off the cones
            violation = op.violation(Z)
            if violation > 0.25 * last_violation and violation > options.constraint_tol:
                delta *= 2.0
            shifted = gamma / delta
            last_violation = violation
            inner_tol = max(inner_tol * 0.3, 1e-12)
            iters_since = 0
            t, W_prev, Z_prev = 1.0, W, Z
        # the stopping tests: the certificate at each multiplier update (every CHECK_EVERY iterations when gated)
        if (constrained and inner_done) or (not constrained and it % CHECK_EVERY == 0):
            check = converged(op, W, Z, gamma, options)
            if options.verbose:
                print(f"fista {it:6d}  rel.gap {check.gap:.2e}  violation {check.violation:.2e}  delta {delta:.2e}")
            if check.met:
                status = Status.OPTIMAL
                break
            if (
                lam == 0
                and check.violation <= options.constraint_tol
                and mapping <= options.tol * max(1.0, float(grad.abs().amax()))
            ):
                status = Status.OPTIMAL_INACCURATE  # λ = 0: no certificate beyond 0 (see interior_point)
                break
        if deadline is not None and deadline.passed():
            status = Status.TIME_LIMIT
            break
    penalty_reached = delta * op.problem.scale if constrained else None
    return Result(W * op.wmask, gamma, it, status, penalty=penalty_reached, stalled=stalled)


def _power_norm(
    apply: Callable[[Tensor], Tensor], op: Operator, deadline: Deadline | None = None, iters: int = 30
) -> float:
    """Largest eigenvalue of a positive semi-definite operator on ``W``'s space (power iteration from a fixed seed).

    Stops once the estimate moves by less than 10⁻³ or at ``deadline``: an estimate short of the eigenvalue only makes
    the first steps too long, which the backtracking corrects; 30 products at MNIST's largest sizes took minutes.
    """
    gen = torch.Generator(device=op.device).manual_seed(0)
    V = torch.randn(op.d, 2, op.P, op.c, generator=gen, dtype=op.dtype, device=op.device) * op.wmask
    value = 0.0
    for _ in range(iters):
        norm = float(V.norm())
        if norm == 0.0:
            return 0.0
        V = V / norm
        AV = apply(V)
        previous, value = value, float((V * AV).sum())
        V = AV
        if abs(value - previous) <= 1e-3 * value or (deadline is not None and deadline.reached()):
            break
    return value * 1.05  # a margin: the power iteration approaches from below
