"""The convex problem in the native solver's layout and normalised units, and its products.

Variables are stored as ``W`` of shape ``(d, 2, P, c)`` (side 0 is ``U``, side 1 is ``V``), so that
``X @ W.reshape(d, -1)`` gives all block outputs ``Z`` of shape ``(n, 2, P, c)`` in one product. Cone multipliers
``μ`` have ``Z``'s shape. The operator holds no solver state: the methods keep their buffers in a
:class:`~hcl.convex.native.workspace.Workspace` and their precision in their own objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hcl.convex.problem import ConvexProblem
from hcl.convex.status import Status


@dataclass
class Result:
    """What a method returns, in the operator's layout and normalised units.

    Attributes:
        W: ``(d, 2, P, c)`` the point reached.
        mu: ``(n, 2, P, c)`` cone multipliers, or ``None`` (gated relaxation, no cones).
        iterations: iterations done.
        status: how the method stopped.
        penalty: the augmented-Lagrangian penalty reached, in the problem's units (first-order method only).
        bound_point: ``(W, mu)`` of an earlier iterate whose certificate was the best seen, or ``None`` (ADMM only;
            its bound holds as well as the returned point's, and the larger one is reported).
        stalled: the certificate stopped closing in a precision below float64 (ADMM only): go on in float64.
        rho: the penalties ``(ρ₁, ρ₂)`` reached (ADMM only).
    """

    W: Tensor
    mu: Tensor | None
    iterations: int
    status: Status
    penalty: float | None = None
    bound_point: tuple[Tensor, Tensor | None] | None = None
    stalled: bool = False
    rho: tuple[float, float] | None = None


def row_space_basis(X: Tensor) -> Tensor | None:
    """``(d, r)`` orthonormal basis (float64) of the row space of a rank-deficient ``X`` (numerical rank ``r < d``,
    as ``numpy.linalg.matrix_rank`` counts it), or ``None`` when ``X`` has full column rank."""
    n, d = X.shape
    eps = torch.finfo(torch.float64).eps
    X64 = X.to(torch.float64)
    if n >= d and d > 64:  # a tall matrix with many columns: its Gram matrix first, O(n d²), cheaper than the SVD
        eigenvalues = torch.linalg.eigvalsh(X64.T @ X64)
        # full rank only far above the Gram matrix's rounding (a Cholesky factor succeeded on exactly dependent
        # columns); nearer, the SVD decides
        if eigenvalues[0] > 100 * max(n, d) * eps * eigenvalues[-1]:
            return None
    _, sigma, Vh = torch.linalg.svd(X64, full_matrices=False)
    rank = max(1, int((sigma > sigma[0] * max(n, d) * eps).sum()))
    if rank == d:
        return None
    return Vh[:rank].T.contiguous()


class Operator:
    """The problem in the solver's layout and normalised units (``s = 1``, ``max|Y| = 1``).

    With ``a = max|Y|`` the objective ``s‖MW − Y‖² + 2λΣ‖W_g‖`` equals ``s a² (‖MW' − Y'‖² + 2λ'Σ‖W'_g‖)``
    for ``W = a W'``, ``Y = a Y'`` and ``λ' = λ / (s a)``; ``M`` maps ``W`` to the prediction
    ``Σ_i D_i X (U_i − V_i)`` and ``A`` to the cone constraints ``(2D_i − I) X W``.

    With ``row_space``, rank-deficient data (``n < d``, identical rows) is replaced by its coordinates ``X Q`` in an
    orthonormal basis ``Q`` of its row space, and ``W`` by ``Qᵀ W``: the directions ``X`` does not see change neither
    the data term nor the cones, only the penalty, so every optimum has no component along them, and they are
    dropped (``pack`` and ``unpack`` map between the two).

    Args:
        problem: the convex problem.
        gated: the gated relaxation (free ``z_i = U_i``, ``V = 0``, no cone constraints).
        dtype: the working precision.
        row_space: work in ``X``'s row space when ``X`` is rank-deficient.
    """

    def __init__(self, problem: ConvexProblem, *, gated: bool, dtype: torch.dtype, row_space: bool = False) -> None:
        self.problem = problem
        self.gated = gated
        self.dtype = dtype
        self.device = problem.X.device
        #: ``(d, r)`` orthonormal basis of the row space the variables live in (float64), or ``None`` (all of ``R^d``)
        self.basis64 = row_space_basis(problem.X) if row_space else None
        self.basis = None if self.basis64 is None else self.basis64.to(dtype)
        self.X = problem.X.to(dtype) if self.basis64 is None else self.data64().to(dtype)
        Y = problem.Y.to(dtype)
        self.n, self.d = self.X.shape
        self.P, self.c = problem.num_patterns, problem.c
        self.bias = problem.output_bias
        self.y_scale = float(Y.abs().max()) if Y.numel() else 0.0
        self.Y = Y / self.y_unit
        self.lam = problem.weight_decay / (problem.scale * self.y_unit)
        self.Dm = problem.patterns.to(dtype)  # (n, P)
        # [D, −D] as (n, 1, 2P): the prediction Σ_i D_i (X U_i − X V_i) as one batched product with the block outputs
        self.signed_patterns = torch.cat([self.Dm, -self.Dm], dim=1)[:, None, :]
        self.S = (2.0 * self.Dm - 1.0)[:, None, :, None]  # (n, 1, P, 1)
        if gated:
            allowed = torch.zeros(2, self.P, dtype=torch.bool, device=self.device)
            allowed[0] = True
        else:
            allowed = torch.stack([problem.allows_u(), problem.allows_v()])
        self.allowed = allowed.to(self.device)
        self.restricted = not bool(self.allowed.all())  # some blocks are fixed at zero
        self.wmask = self.allowed[None, :, :, None].to(dtype)  # (1, 2, P, 1) on W
        self.cmask = self.wmask if not gated else torch.zeros_like(self.wmask)  # constrained blocks
        self.signed_cmask = self.S * self.cmask  # (n, 2, P, 1): the cones' signs on the constrained blocks
        # groups: one per (side, pattern, output) column, or one per pattern (shared-layer bound)
        self.per_column = self.c == 1 or problem.one_vs_all
        self.num_constraints = int(self.cmask.sum()) * self.n * self.c
        self.num_groups = int(self.allowed.sum()) * (self.c if self.per_column else 1)
        # a tiny multiple of the data term's curvature scale (2‖X‖_F², normalised units)
        self.regularization = 2e-12 * float(self.X.square().sum())

    def data64(self) -> Tensor:
        """``X`` in float64, in the row space's coordinates where the variables live there: computed from the data
        themselves, not rounded to the working precision first (a certificate from float32 coordinates was 1e-3 off
        where the optimum is 1e-5 of the data term's scale)."""
        X = self.problem.X.to(torch.float64)
        return X if self.basis64 is None else X @ self.basis64

    @property
    def y_unit(self) -> float:
        """The unit of the normalised variables: ``max |Y|``, or 1 when ``Y = 0``."""
        return self.y_scale if self.y_scale > 0 else 1.0

    @property
    def constrained(self) -> bool:
        """Whether any cone constraint is left (not in the gated relaxation, nor with every block removed)."""
        return self.num_constraints > 0

    # ---- layout and units
    def zeros(self) -> Tensor:
        return torch.zeros(self.d, 2, self.P, self.c, dtype=self.dtype, device=self.device)

    def pack(self, U: Tensor, V: Tensor) -> Tensor:
        """``(P, d, c)`` pair → ``(d, 2, P, c)`` in normalised units (``(r, 2, P, c)`` in the row space's basis)."""
        W = torch.stack([U, V]).to(device=self.device, dtype=self.dtype).permute(2, 0, 1, 3) / self.y_unit
        if self.basis is not None:
            W = (self.basis.T @ W.reshape(W.shape[0], -1)).reshape(self.d, *W.shape[1:])
        if self.gated:
            W = torch.stack([W[:, 0] - W[:, 1], torch.zeros_like(W[:, 1])], dim=1)
        return W * self.wmask

    def unpack(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, 2, P, c)`` in normalised units → ``(U, V)`` of shape ``(P, d, c)`` in the problem's units and dtype."""
        W = W * self.wmask * self.y_unit
        if self.basis is not None:
            W = (self.basis @ W.reshape(self.d, -1)).reshape(self.basis.shape[0], *W.shape[1:])
        W = W.to(self.problem.X.dtype)
        return W[:, 0].permute(1, 0, 2).contiguous(), W[:, 1].permute(1, 0, 2).contiguous()

    def normalise_multipliers(self, cone: Tensor) -> Tensor:
        """Dense cone multipliers in the problem's units → normalised units (``μ`` is in units of ``ν = 2 s r``),
        clamped at 0 and zero off the constrained blocks."""
        mu = cone.to(device=self.device, dtype=self.dtype).clamp(min=0) * self.cmask
        return mu / (self.problem.scale * self.y_unit)

    def multipliers_in_data_units(self, mu: Tensor) -> Tensor:
        """The inverse of :meth:`normalise_multipliers`, in the problem's dtype."""
        return (mu * self.cmask * self.problem.scale * self.y_unit).to(self.problem.X.dtype)

    # ---- products
    def forward(self, W: Tensor, out: Tensor | None = None) -> Tensor:
        """``Z = X W`` block outputs, shape ``(n, 2, P, c)`` (written in ``out`` when given)."""
        if out is None:
            return (self.X @ W.reshape(self.d, -1)).reshape(self.n, 2, self.P, self.c)
        torch.matmul(self.X, W.reshape(self.d, -1), out=out.view(self.n, -1))
        return out

    def predict(self, Z: Tensor, rows: slice = slice(None)) -> Tensor:
        """``Σ_i D_i X (U_i − V_i)``, shape ``(n, c)`` (or the rows ``rows`` of it, given their ``Z``)."""
        k = Z.shape[0]
        return torch.bmm(self.signed_patterns[rows], Z.reshape(k, 2 * self.P, self.c)).reshape(k, self.c)

    def predict_difference(self, W_diff: Tensor) -> Tensor:
        """``Σ_i D_i X (U_i − V_i)`` from ``U − V`` of shape ``(d, P, c)``: one product half the width of
        :meth:`forward`'s."""
        Z = (self.X @ W_diff.reshape(self.d, -1)).reshape(self.n, self.P, self.c)
        return (Z.mul_(self.Dm[:, :, None])).sum(1)

    def residual(self, Z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``r = prediction + b₀ − Y`` with the optimal output bias (``r`` centred) when there is one."""
        r = self.predict(Z) - self.Y
        if not self.bias:
            return r, None
        mean = r.mean(0)
        return r - mean, -mean

    def center(self, r: Tensor) -> Tensor:
        """``Π r``: ``r`` centred per output when there is an output bias, else ``r``."""
        return r - r.mean(0) if self.bias else r

    def adjoint_data(self, r: Tensor, rows: slice = slice(None)) -> Tensor:
        """``Mᵀ r``: block ``(side, i, o)`` gets ``± Xᵀ D_i r_o``; shape ``(d, 2, P, c)`` (``r`` on ``rows``)."""
        X, Dm = self.X[rows], self.Dm[rows]
        G = (X.T @ (Dm[:, :, None] * r[:, None, :]).reshape(X.shape[0], -1)).reshape(self.d, self.P, self.c)
        return torch.stack([G, -G], dim=1) * self.wmask

    def adjoint(self, r: Tensor, cone: Tensor, rows: slice = slice(None), overwrite: bool = False) -> Tensor:
        """``Mᵀ r − Aᵀ cone`` (:meth:`adjoint_data` minus :meth:`adjoint_constraint`) in one product with ``Xᵀ``;
        ``overwrite``: ``cone`` may serve as the workspace."""
        X, Dm = self.X[rows], self.Dm[rows]
        weighted = cone.mul_(self.signed_cmask[rows]) if overwrite else self.signed_cmask[rows] * cone
        spread = Dm[:, :, None] * r[:, None, :]  # (rows, P, c)
        weighted[:, 0] -= spread
        weighted[:, 1] += spread
        out = (X.T @ weighted.reshape(X.shape[0], -1)).reshape(self.d, 2, self.P, self.c)
        return out.neg_() * self.wmask

    def constraint(self, Z: Tensor) -> Tensor:
        """``A W = (2D_i − I) X W`` on the constrained blocks, zero on the others."""
        return self.signed_cmask * Z

    def adjoint_constraint(self, Y: Tensor, rows: slice = slice(None), overwrite: bool = False) -> Tensor:
        """``Aᵀ Y``, shape ``(d, 2, P, c)`` (``Y`` on ``rows``); ``overwrite``: ``Y`` may serve as the workspace."""
        X = self.X[rows]
        weighted = Y.mul_(self.signed_cmask[rows]) if overwrite else self.signed_cmask[rows] * Y
        return (X.T @ weighted.reshape(X.shape[0], -1)).reshape(self.d, 2, self.P, self.c)

    def violation(self, Z: Tensor) -> float:
        """The largest cone violation at block outputs ``Z`` (normalised units; 0 in the gated relaxation)."""
        return 0.0 if self.gated else float(torch.relu(-self.constraint(Z)).amax())

    # ---- groups
    def group_norms(self, W: Tensor) -> Tensor:
        """Per-group norms: ``(2, P, c)`` column groups or ``(P,)`` pattern groups."""
        if self.per_column:
            return W.square().sum(0).sqrt()
        return W.square().sum((0, 1, 3)).sqrt()

    def group_sum(self, T: Tensor) -> Tensor:
        """Per-group sums of a tensor of ``W``'s shape: ``(2, P, c)`` or ``(P,)``."""
        return T.sum(0) if self.per_column else T.sum((0, 1, 3))

    def expand(self, g: Tensor) -> Tensor:
        """A per-group quantity broadcast to ``W``'s shape."""
        return g[None] if self.per_column else g[None, None, :, None]

    def penalty_value(self, W: Tensor) -> Tensor:
        """``2λ Σ_g ‖W_g‖`` over the groups of the blocks that exist."""
        norms = self.group_norms(W)
        if self.per_column:
            norms = norms * self.allowed[:, :, None]
        return 2.0 * self.lam * norms.sum()

    def group_soft_threshold(self, W: Tensor, threshold: float) -> Tensor:
        """The proximal map of ``threshold · Σ_g ‖W_g‖``."""
        norms = self.expand(self.group_norms(W))
        # a zero group stays zero (1e-300 is 0 in float32: 0/0 at threshold 0 was NaN there)
        return W * torch.clamp(1.0 - threshold / norms.clamp(min=torch.finfo(norms.dtype).tiny), min=0.0)
