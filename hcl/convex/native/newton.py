"""The interior point's Newton systems ``(2 MᵀΠM + H̄) ΔW = R``, solved by conjugate gradients preconditioned by the
Woodbury identity.

``H̄`` is block-diagonal (one ``d × d`` block per pattern, side and output); the coupling goes through one ``n × n``
Schur matrix per output (``Π`` centres it when there is an output bias). Building it costs ``O(n² P d)``; it is only
the preconditioner, so it may be built in float32 (:class:`SchurPrecision`) while the conjugate gradients run on the
exact float64 matrix. See ``docs/solvers.md#the-native-solver-hclconvexnativesolve_native``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcl.convex.native.operator import Operator
from hcl.convex.native.options import (
    CG_RTOL,
    CG_RTOL_PATTERN_GROUPS,
    FLOAT32_BLOCKS_FROM_D_OVER_N,
    FLOAT32_CG_ITERS,
    FLOAT32_SCHUR_ABOVE,
    SCHUR_PANEL_ROWS_MAX,
    SCHUR_PANEL_ROWS_MIN,
)
from hcl.convex.native.workspace import Workspace


class SchurPrecision:
    """The precision the Newton systems' preconditioner is built in: state of one interior-point solve.

    Float32 products are twice as fast as float64 on a CPU (far faster on GPUs), and the conjugate gradients on the
    exact matrix remove the rounding; as the barrier's systems grow ill-conditioned float32 stops being enough, and
    from then on the preconditioner is built in the working precision. Float32 is used only where building the Schur
    matrices dominates an iteration (``n² P d c ≥ FLOAT32_SCHUR_ABOVE``); the ``(d, d)`` blocks follow it where they
    cost more than the Schur matrices (``d ≥ FLOAT32_BLOCKS_FROM_D_OVER_N · n``).

    Attributes:
        working: the working precision (the operator's).
        dtype: the precision the next preconditioner is built in.
        float32_blocks: whether the ``(d, d)`` blocks are built in ``dtype`` too (else in ``working``).
    """

    def __init__(self, op: Operator) -> None:
        self.working = op.dtype
        large = op.n * op.n * op.P * op.d * op.c >= FLOAT32_SCHUR_ABOVE
        self.dtype = torch.float32 if op.dtype == torch.float64 and large else op.dtype
        self.float32_blocks = op.d >= FLOAT32_BLOCKS_FROM_D_OVER_N * op.n

    def settle(self) -> None:
        """Build every later preconditioner in the working precision."""
        self.dtype = self.working


def schur_panels(n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` panels of rows covering ``range(n)``, in which the Schur matrices are built up to their diagonal:
    ``n/4`` rows each, within ``[SCHUR_PANEL_ROWS_MIN, SCHUR_PANEL_ROWS_MAX]``."""
    count = max(1, round(n / min(SCHUR_PANEL_ROWS_MAX, max(SCHUR_PANEL_ROWS_MIN, n // 4))))
    edges = [round(k * n / count) for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


class NewtonSystem:
    """``(2 MᵀΠM + H̄) ΔW = R`` solved by the Woodbury identity.

    ``H̄`` holds, per block ``(side, i, o)``, ``Xᵀ diag(θ) X`` from the barrier and the smoothed norm's
    primal-dual Hessian ``ρ I − (ζ_g W_gᵀ + W_g ζ_gᵀ) / (2N²)`` (``ρ = 2λ/N``, ``N = √(‖W_g‖² + ε²)``, ``ζ`` the
    penalty's dual variable: with ``ζ = ρ W`` the primal Hessian ``ρ (I − W_g W_gᵀ / N²)``). With column groups the
    norm Hessian lives inside the block; with pattern groups its low-rank part spans the pattern's blocks
    and only the exact (matrix-free) product carries it, the conjugate gradients making up for it.

    Args:
        op: the problem.
        W: ``(d, 2, P, c)`` the current point (the direction of the norms' rank-one terms).
        theta: ``(n, 2, P, c)`` the barrier weights ``μ/s`` (``None`` without cones).
        smooth: per-group smoothed norms ``N``.
        lam: the weight decay (normalised units) the system is built with (default the problem's).
        dual: ``(d, 2, P, c)`` the penalty's dual variable ``ζ`` (default ``ρ W``, the primal Hessian).
        workspace: the solve's buffers.
        precision: the solve's :class:`SchurPrecision`, which this system may lower to the working precision.
        budget: patterns (or blocks) per chunk when building the preconditioner.
    """

    def __init__(
        self,
        op: Operator,
        W: Tensor,
        theta: Tensor | None,
        smooth: Tensor,
        *,
        workspace: Workspace,
        precision: SchurPrecision,
        budget: int,
        lam: float | None = None,
        dual: Tensor | None = None,
    ) -> None:
        self.op = op
        self.workspace = workspace
        self.precision = precision
        # what the exact (matrix-free) product needs: the barrier weights and the norm Hessian's pieces
        self.theta = theta
        self.rho = 2.0 * (op.lam if lam is None else lam) / smooth  # per group
        self.norm_direction = W
        # the penalty's dual variable ζ (the norms' gradient 2λ W / N on the smoothed path)
        self.norm_dual = op.expand(self.rho) * W if dual is None else dual
        self.smooth = smooth
        self.half_inverse_square = 0.5 / smooth.square()
        self.budget = budget
        # the precision this system's preconditioner is built in (the solve's may fall to float64 meanwhile)
        self.schur_dtype = precision.dtype
        if not self._build(self.schur_dtype):
            self.refine_schur()

    def _build(self, dtype: torch.dtype) -> bool:
        """The blocks' inverses and the Schur factor, built in ``dtype``; ``False`` when float32 rounding made one of
        the matrices indefinite (float64 failures raise)."""
        op = self.op
        n, d, P, c = op.n, op.d, op.P, op.c
        K = 2 * P * c
        # the blocks follow the Schur matrix into float32 only where building them dominates (large d)
        blocks = dtype if self.precision.float32_blocks else op.dtype
        X = self.workspace.data_in(blocks)[0]
        eye = self.workspace.identity(blocks)
        # relative regularisation: negligible in float64, and below float32's rounding in float32 (1e-6 made the
        # conjugate gradients slower)
        relative = 1e-14 if blocks == torch.float64 else 1e-8
        # ----- block-diagonal part, one (d, d) block per (side, i, o), ordered like W.reshape(d, K); only the blocks
        # that exist are formed (a sign restriction removes half of them), the others' inverses are 0
        kept = op.wmask.expand(1, 2, P, c).reshape(K).bool() if op.restricted else None
        Kk = K if kept is None else int(kept.sum())

        def existing(T: Tensor) -> Tensor:  # the rows of a (K, …) tensor that belong to existing blocks
            return T if kept is None else T[kept]

        if self.theta is not None:
            theta_k = existing(self.theta.reshape(n, K).T).to(blocks)  # (Kk, n)
            B = torch.zeros(Kk, d * d, dtype=blocks, device=op.device)
            outer = self.workspace.sample_outer_products(blocks)
            if outer is not None:  # Xᵀ diag(θ_k) X for every block k as one product: θᵀ (x_j x_jᵀ)_j
                B.addmm_(theta_k, outer)
            else:
                # too many rows x_j x_jᵀ to keep (large d): (θ_k ⊙ X)ᵀ X block by block, a few blocks at a time, as
                # deep products (a chunk of the rows x_j x_jᵀ would give products only a few samples deep)
                B3 = B.view(Kk, d, d)
                for lo in range(0, Kk, self.budget):
                    hi = min(Kk, lo + self.budget)
                    weighted = theta_k[lo:hi, :, None] * X  # (blocks, n, d)
                    torch.matmul(weighted.transpose(1, 2), X, out=B3[lo:hi])
                    del weighted  # not kept beside the blocks once they are built
                del B3  # a view of B: B is freed below, once its inverse exists
            B = B.reshape(Kk, d, d)
        else:
            B = torch.zeros(Kk, d, d, dtype=blocks, device=op.device)
        rho, smooth = self.rho.to(blocks), self.smooth.to(blocks)
        # the smoothed norm's Hessian, added in place (these (K, d, d) tensors are the largest of an iteration)
        if op.per_column:
            Wf = existing(self.norm_direction.reshape(d, K).T).to(blocks)  # (Kk, d)
            Zf = existing(self.norm_dual.reshape(d, K).T).to(blocks)
            B.diagonal(dim1=1, dim2=2).add_(existing(rho.reshape(K))[:, None])
            coef = existing(-0.5 / smooth.reshape(K) ** 2)[:, None, None]
            B.baddbmm_(coef * Zf[:, :, None], Wf[:, None, :])
            B.baddbmm_(coef * Wf[:, :, None], Zf[:, None, :])
        else:
            # with pattern groups the rank-one part −(ρ/N²) w wᵀ of a group spans its pattern's 2·c blocks; it is
            # left out of the preconditioner (which then dominates the matrix) and kept in the exact product
            rho_k = rho[None, :, None].expand(2, P, c).reshape(K)
            B.diagonal(dim1=1, dim2=2).add_(existing(rho_k)[:, None])
        # static regularisation (relative) keeps every block positive definite; the conjugate gradients on the
        # unregularised system remove its effect on the direction (an absolute floor relative to the data term's
        # curvature keeps λ = 0 and the smoothed norms' flat radial directions solvable)
        diag = B.diagonal(dim1=1, dim2=2)
        reg = torch.clamp(relative * diag.amax(1), min=op.regularization)
        diag.add_(reg[:, None])
        L = self._cholesky(B, blocks)
        if L is None:
            return False
        if kept is None:
            Binv = torch.cholesky_inverse(L)
        else:
            Binv = torch.zeros(K, d, d, dtype=blocks, device=op.device)
            Binv[kept] = torch.cholesky_inverse(L)
        del B, L, diag  # freed before G and its factor are formed (memory.py counts the stacks alive at once)
        # ----- Schur complement per output o: I/2 + Π Σ_i D_i X G_{i,o} Xᵀ D_i Π, G = B_u⁻¹ + B_v⁻¹
        G = Binv.reshape(2, P, c, d, d).sum(0)  # (P, c, d, d)
        ridge = relative * G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp(min=1e-30)
        LG = self._cholesky(G + ridge[..., None, None] * eye, blocks)
        del G
        if LG is None:
            return False
        self.Binv, self.LG = Binv, LG
        LS = self._factor_schur(dtype)
        if LS is None:
            return False
        self.LS = LS
        return True

    def _cholesky(self, A: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Cholesky factor of ``A``; ``None`` when it is not positive definite in float32 (raises in float64)."""
        L, info = torch.linalg.cholesky_ex(A)
        if not bool((info > 0).any()):
            return L
        if dtype != self.op.dtype:
            return None
        return torch.linalg.cholesky(A)  # raises, naming the failure

    def _factor_schur(self, dtype: torch.dtype) -> Tensor | None:
        """Cholesky factor (in the working precision) of the Schur matrices, built in ``dtype``; ``None`` when
        rounding made one of them indefinite."""
        op = self.op
        n, d, P, c = op.n, op.d, op.P, op.c
        X, Dm = self.workspace.data_in(dtype)
        LG = self.LG.to(dtype)
        # S gets (D_i X L)(D_i X L)ᵀ (G = L Lᵀ), a chunk of patterns at a time; only the blocks on and below the
        # diagonal are formed (the factorisation reads the lower triangle), which saves up to half the products.
        rows = schur_panels(n)
        if dtype == op.dtype:  # float32 builds are over: their working copy, kept beside this build, broke the estimate
            self.workspace.release("schur_working")
        S = self.workspace.scratch("schur", c * n * n, dtype).view(c, n, n).zero_()
        chunk = self.workspace.scratch("schur_factors", n * min(P, self.budget) * d, dtype)
        for lo in range(0, P, self.budget):
            hi = min(P, lo + self.budget)
            for o in range(c):
                F = chunk[: n * (hi - lo) * d].view(n, (hi - lo) * d)
                torch.matmul(X, LG[lo:hi, o].permute(1, 0, 2).reshape(d, -1), out=F)
                F.view(n, hi - lo, d).mul_(Dm[:, lo:hi, None])
                for a_lo, a_hi in rows:  # one product per panel of rows, up to the diagonal
                    S[o, a_lo:a_hi, :a_hi].addmm_(F[a_lo:a_hi], F[:a_hi].T)
        if dtype != op.dtype:
            S = self.workspace.scratch("schur_working", c * n * n, op.dtype).view(c, n, n).copy_(S)
        if op.bias:  # Π S Π needs the whole matrix: mirror the blocks below the diagonal
            for a, (a_lo, a_hi) in enumerate(rows):
                for b_lo, b_hi in rows[:a]:
                    S[:, b_lo:b_hi, a_lo:a_hi] = S[:, a_lo:a_hi, b_lo:b_hi].transpose(1, 2)
            S = S - S.mean(1, keepdim=True)
            S = S - S.mean(2, keepdim=True)
        S.diagonal(dim1=1, dim2=2).add_(0.5)
        return self._cholesky(S, dtype)

    def refine_schur(self) -> bool:
        """Rebuild the preconditioner in the working precision, for this system and the solve's later ones;
        ``False`` when it already was in that precision."""
        if self.schur_dtype == self.op.dtype:
            return False
        self.precision.settle()
        self.schur_dtype = self.precision.dtype
        self.Binv = self.LG = self.LS = None  # not beside the new ones: the (K, d, d) stacks are a solve's largest
        self._build(self.op.dtype)
        return True

    def _block_inverse(self, R: Tensor) -> Tensor:
        op = self.op
        K = 2 * op.P * op.c
        out = torch.einsum("kde,ek->dk", self.Binv, R.reshape(op.d, K).to(self.Binv.dtype))
        return out.reshape(R.shape).to(R.dtype)

    def _schur_solve(self, t: Tensor) -> Tensor:
        """Solve ``S τ = t`` for ``t`` of shape ``(n, c)``."""
        # two triangular solves: several times faster here than cholesky_solve, which copies the factor
        half = torch.linalg.solve_triangular(self.LS, t.T[:, :, None], upper=False)
        return torch.linalg.solve_triangular(self.LS.mT, half, upper=True)[:, :, 0].T  # (n, c)

    def _apply_inverse(self, R: Tensor) -> Tensor:
        op = self.op
        g0 = self._block_inverse(R)
        t = op.center(op.predict_difference(g0[:, 0] - g0[:, 1]))
        tau = op.center(self._schur_solve(t))
        return g0 - self._block_inverse(op.adjoint_data(tau))

    def _apply(self, V: Tensor) -> Tensor:
        """The exact (unregularised) matrix times ``V``, matrix-free: one product with ``X`` and one with ``Xᵀ``."""
        op = self.op
        Z = op.forward(V)
        data = 2.0 * op.center(op.predict(Z))  # 2 Π M V, (n, c)
        # Xᵀ [θ ⊙ X V  (the barrier: S² = 1 on the constrained blocks) + 2 D_i Π M V on side u, minus it on side v]
        weighted = Z.mul_(self.theta) if self.theta is not None else Z.zero_()
        spread = op.Dm[:, :, None] * data[:, None, :]  # (n, P, c)
        weighted[:, 0] += spread
        weighted[:, 1] -= spread
        out = (op.X.T @ weighted.reshape(op.n, -1)).reshape(V.shape)
        # ρ V − ½ (ζ wᵀ + w ζᵀ) V / N² per group
        along_w = op.expand(op.group_sum(self.norm_direction * V) * self.half_inverse_square)
        along_dual = op.expand(op.group_sum(self.norm_dual * V) * self.half_inverse_square)
        out += op.expand(self.rho) * V - self.norm_dual * along_w - self.norm_direction * along_dual
        return out * op.wmask

    def solve(self, R: Tensor, rtol: float | None = None, max_iters: int = 50) -> Tensor:
        """Conjugate gradients on the exact matrix, preconditioned by the Woodbury inverse.

        With column groups the preconditioner is the matrix up to a tiny regularisation (and the float32
        rounding of its Schur matrix) and a few iterations suffice; with pattern groups it lacks the rank-one
        norm terms (one per pattern). When a float32 preconditioner does not reach ``rtol`` in
        ``FLOAT32_CG_ITERS`` iterations, it is rebuilt in the working precision and the solve starts again; when
        it needs more than half of them, the solve's later systems are built in the working precision.
        """
        if rtol is None:
            rtol = CG_RTOL if self.op.per_column else CG_RTOL_PATTERN_GROUPS
        R = R * self.op.wmask
        if self.schur_dtype != self.op.dtype:
            x, iterations = self._conjugate_gradients(R, rtol, min(max_iters, FLOAT32_CG_ITERS))
            if iterations > FLOAT32_CG_ITERS // 2:  # the next systems are built in float64
                self.precision.settle()
            if iterations <= FLOAT32_CG_ITERS or not self.refine_schur():
                return x
        return self._conjugate_gradients(R, rtol, max_iters)[0]

    def _conjugate_gradients(self, R: Tensor, rtol: float, max_iters: int) -> tuple[Tensor, int]:
        """The solution and the iterations it took (``max_iters + 1`` when ``rtol`` was not reached)."""
        x = torch.zeros_like(R)
        res = R.clone()
        z = self._apply_inverse(res) * self.op.wmask
        p = z.clone()
        rz = float((res * z).sum())
        target = rtol * float(R.norm())
        iterations = max_iters + 1
        for it in range(1, max_iters + 1):
            Ap = self._apply(p)
            curvature = float((p * Ap).sum())
            if curvature <= 0.0:
                break
            alpha = rz / curvature
            x = x + alpha * p
            res = res - alpha * Ap
            if float(res.norm()) <= target:
                iterations = it
                break
            z = self._apply_inverse(res) * self.op.wmask
            rz_next = float((res * z).sum())
            p = z + (rz_next / rz) * p
            rz = rz_next
        return x * self.op.wmask, iterations
