"""hcl's own solver for the convex problem, in torch, on the data's device.

Two methods solve the fixed-pattern problem of :mod:`hcl.convex.problem` (and its gated relaxation);
both stop on a **certificate** — a relative duality gap from the dual of the project's convex note,
restricted to the problem's patterns, and the constraint violation — never on an iteration count alone.

``"newton"`` — a primal-dual interior-point method (Mehrotra predictor-corrector). The cone
constraints ``(2D_i − I) X W ≥ 0`` get slacks and multipliers; the group norms are smoothed to
``√(‖W_g‖² + ε²)`` with ``ε`` driven to zero along with the barrier parameter. Each Newton system

    (2 MᵀΠM + H̄) ΔW = R,    H̄ block-diagonal (one d×d block per pattern, side and output)

is solved exactly through the Woodbury identity: ``H̄`` is inverted block by block and the coupling
goes through one ``n × n`` matrix per output (``Π`` centres it when there is an output bias). Building
that matrix costs ``O(n² P d)`` and ``O(n²)`` memory, so this method is for ``n`` up to a few thousand;
it needs 25–50 iterations whatever the conditioning, which is what first-order methods lack here (see
``docs/solvers.md`` for the measurements). A vector output with the shared-layer (Frobenius) groups
adds one rank-one term per pattern, handled by a second, ``P × P`` Woodbury step.

``"fista"`` — matrix-free, for problems where an ``n × n`` matrix does not fit (MNIST size): an
augmented Lagrangian on the cone constraints (squared-hinge penalty ``δ/2 ‖(γ/δ − S⊙XW)₊‖²``, the
user may set ``δ``) whose subproblems are solved by FISTA with the group soft-threshold, textbook
momentum ``t₊ = (1 + √(1 + 4t²))/2``, backtracking with step growth and gradient-based restarts. The
gated relaxation is plain FISTA. Each iteration costs two products with ``X`` (``n × d`` times
``d × 2Pc``), chunked over samples; memory is ``O(n P c + d P c)`` plus ``X``.

Certificate. With residual ``r = prediction − Y`` (centred per output when there is an output bias),
``ν = 2 s r`` and cone multipliers ``μ ≥ 0`` from the solver, every ``t ≥ 0`` with
``t ‖g_k‖ ≤ 2λ`` for all groups ``k``, where ``g = ±Xᵀ D_i ν − Xᵀ (2D_i − I) μ`` (per side), gives

    p* ≥ −t ⟨ν, Y⟩ − t² ‖ν‖² / (4s),

maximised over ``t`` in closed form. This is ``dual_value``; the derivation is in ``docs/solvers.md``.

Variables are stored as ``W`` of shape ``(d, 2, P, c)`` (side 0 is ``U``, side 1 is ``V``), so that
``X @ W.reshape(d, -1)`` gives all block outputs in one product.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hcl.convex.problem import ConvexProblem, ConvexSolution

METHODS = ("auto", "newton", "fista")

# ``"auto"`` uses the interior-point method while its n × n matrices stay small.
NEWTON_MAX_SAMPLES = 6000
# n² P d c from which the interior point builds its n × n matrices in float32 (measured: 1.5× slower up to 1.6·10⁷,
# at (30, 3, 6) … (200, 10, 40); at (500, 20, 100), 5·10⁸, cold solves 1.76–1.82 s in float64 against 1.98–2.28 s;
# 2× faster per build at (1000, 50, 100), 5·10⁹)
FLOAT32_SCHUR_ABOVE = 1_000_000_000
# Conjugate-gradient iterations a float32-built preconditioner gets before it is rebuilt in float64.
FLOAT32_CG_ITERS = 20
# d/n from which the interior point's (d, d) blocks follow the Schur matrices into float32: building them costs
# K n d² against the Schur matrices' c n² P d, so from 2d ≥ n on they dominate. Measured: 3 iterations at
# (n, d, P) = (1000, 785, 20) 13.8 s → 10.3–10.5 s; at (500, 20, 100), where the Schur matrices dominate, 10 % slower.
FLOAT32_BLOCKS_FROM_D_OVER_N = 0.5
# Largest size of the rows x_j x_jᵀ the interior point keeps between iterations (beyond: products block by block).
OUTER_PRODUCTS_MAX_BYTES = 1 << 28
# Relative residual at which the conjugate gradients stop on a Newton system. With column groups the preconditioner
# is the matrix up to rounding, and 1e-6 leaves the interior point's iterations and its certified gap unchanged
# (measured from (100, 10, 20) to (1000, 50, 100), cold and warm) while needing 40 % fewer steps than 1e-10. With
# pattern groups the preconditioner lacks the norms' rank-one terms, and at 1e-6 the interior point stalled.
CG_RTOL = 1e-6
CG_RTOL_PATTERN_GROUPS = 1e-10
# Warm starts with multipliers: slacks floored at WARM_SLACK_FLOOR, and every multiplier raised to at least
# WARM_CENTRALITY / slack, so that no slack-multiplier product starts below WARM_CENTRALITY (normalised units).
# Measured on the benchmark's warm instances (iterations): (100, 10, 20) 13 → 12, (300, 20, 50) 18 → 16,
# (500, 20, 100) 22 → 19, (1000, 50, 100) 26 → 22, against a plain floor of 1e-3 on both; products of 3·10⁻⁶ and
# 3·10⁻⁵ did as well or one or two iterations worse, 10⁻⁴ and above or 10⁻⁷ and below worse; slack floors of 3·10⁻⁴
# the same.
WARM_SLACK_FLOOR = 1e-3
WARM_CENTRALITY = 1e-5


# ----------------------------------------------------------------------------- public helpers
@dataclass
class Multipliers:
    """Cone multipliers of a native solve, kept for warm starts.

    Attributes:
        cone: sparse COO tensor of shape ``(n, 2, P, c)``: ``μ ≥ 0`` of the constraint
            ``(2D_i − I) X W_{side,i}[:, o] ≥ 0`` (only nonzero entries are stored: active constraints).
        penalty: the augmented-Lagrangian penalty ``δ`` reached (``None`` for the interior-point method).
    """

    cone: Tensor
    penalty: float | None = None


def remap_warm_start(
    old_patterns: Tensor, old_solution: ConvexSolution | tuple, new_patterns: Tensor
) -> tuple[Tensor, Tensor, Tensor, Multipliers | None]:
    """Carry a solution over to a new pattern set: each new pattern takes the block of its nearest old pattern.

    Between two training steps most patterns are unchanged and a changed one differs from its neuron's previous
    pattern in a few samples, so the block of the nearest old pattern (fewest differing samples) is close to the
    new optimum's, where a zero block is not. An old block taken by several new patterns is shared equally among
    them (their predictions then add up to the old block's). A new pattern farther than ``n / 10`` samples from
    every old one starts at zero. The result may violate a few of the new cone constraints; the solvers start
    from infeasible points.

    Args:
        old_patterns: ``(n, P_old)`` boolean patterns of the solved problem.
        old_solution: a :class:`ConvexSolution` or a ``(U, V, b0[, multipliers])`` tuple for those patterns.
        new_patterns: ``(n, P_new)`` boolean patterns of the next problem (same samples).

    Returns:
        ``(U, V, b0, multipliers)`` for the new problem; multipliers follow their blocks (``None`` if there were
        none).
    """
    if old_patterns.ndim != 2 or new_patterns.ndim != 2 or old_patterns.shape[0] != new_patterns.shape[0]:
        raise ValueError(
            f"patterns must be (n, P) with the same n, got {tuple(old_patterns.shape)} and {tuple(new_patterns.shape)}"
        )
    U, V, b0, mult = _unpack_warm(old_solution)
    if U.shape[0] != old_patterns.shape[1]:
        raise ValueError(f"the solution has {U.shape[0]} blocks but old_patterns has {old_patterns.shape[1]}")
    old_index = _nearest_columns(old_patterns.bool(), new_patterns.to(old_patterns.device).bool())
    keep = old_index >= 0
    P_new = new_patterns.shape[1]
    takers = torch.bincount(old_index[keep], minlength=U.shape[0]).to(U.dtype)
    share = torch.zeros(P_new, dtype=U.dtype, device=U.device)
    share[keep] = 1.0 / takers[old_index[keep]].to(U.device)
    U_new = U.new_zeros((P_new,) + tuple(U.shape[1:]))
    V_new = V.new_zeros((P_new,) + tuple(V.shape[1:]))
    U_new[keep] = U[old_index[keep]] * share[keep, None, None]
    V_new[keep] = V[old_index[keep]] * share[keep, None, None]
    new_mult = None
    if mult is not None:
        # a block's multipliers do not scale with it (stationarity involves w / ‖w‖): copied as they are
        cone = mult.cone.to_dense() if mult.cone.is_sparse else mult.cone
        dense = cone.new_zeros(cone.shape[:2] + (P_new,) + cone.shape[3:])
        dense[:, :, keep] = cone[:, :, old_index[keep].to(cone.device)]
        new_mult = Multipliers(dense.to_sparse(), mult.penalty)
    return U_new, V_new, b0.clone(), new_mult


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
    op = _Operator(problem, gated=gated, dtype=torch.float64)
    W = op.pack(U, V)
    if multipliers is None:
        mu = None
    else:
        cone = multipliers.cone if isinstance(multipliers, Multipliers) else multipliers
        a = op.y_scale if op.y_scale > 0 else 1.0
        mu = (cone.to_dense() if cone.is_sparse else cone).to(torch.float64).clamp(min=0) * op.cmask
        mu = mu / (problem.scale * a)  # the operator works in normalised units
    b = None if b0 is None else b0.to(torch.float64)
    return op.certificate(op.forward(W), mu, b0=b)[0]


# ----------------------------------------------------------------------------- entry point
def solve_native(
    problem: ConvexProblem,
    *,
    gated: bool = False,
    warm_start: ConvexSolution | tuple | None = None,
    tol: float = 1e-6,
    constraint_tol: float = 1e-6,
    max_iters: int | None = None,
    time_limit: float | None = None,
    penalty: float | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
    verbose: bool = False,
) -> ConvexSolution:
    """Solve ``problem`` (or its gated relaxation) with hcl's native solver.

    Args:
        problem: the convex problem; the solve runs on its tensors' device.
        gated: solve the gated relaxation (free ``z_i = U_i``, ``V = 0``, no cone constraints).
        warm_start: a :class:`ConvexSolution` or a ``(U, V, b0[, multipliers])`` tuple with this problem's
            number of patterns (see :func:`remap_warm_start` when the patterns changed).
        tol: target relative duality gap ``(value − dual_value) / max(|value|, 1e-6 s‖Y‖²)``.
        constraint_tol: target constraint violation, relative to ``max |Y|``.
        max_iters: iteration cap (default 100 for ``"newton"``, 20000 for ``"fista"``).
        time_limit: wall-clock limit in seconds.
        penalty: the augmented-Lagrangian penalty ``δ`` of ``"fista"`` (default: chosen from the data's
            curvature; it still doubles when the violation stalls).
        dtype: working precision; default float64 for ``"newton"`` (the barrier's systems need it) and the
            problem's dtype (float32 when it is float32) for ``"fista"``.
        chunk_size: samples per chunk in the first-order products / patterns (or blocks) per chunk when building
            the interior-point matrices (default: all at once up to ~2²⁴ elements per temporary).
        method: ``"auto"``, ``"newton"`` or ``"fista"``; ``"auto"`` takes ``"newton"`` when
            ``n ≤ NEWTON_MAX_SAMPLES``.
        verbose: print one line per iteration (newton) or per multiplier update (fista).

    Returns:
        A :class:`ConvexSolution`: ``U, V, b0`` in the problem's dtype, ``value`` recomputed by
        ``problem.objective``, ``dual_value`` the certified lower bound, ``violation`` the largest cone
        violation (absolute, data units), ``iterations``, ``multipliers`` (a :class:`Multipliers`, for warm
        starts) and ``status`` ``"optimal"`` when the certificate is met, ``"optimal_inaccurate"`` when the
        method converged but the certificate could not be closed (e.g. ``λ = 0``, where the only
        certifiable bound is 0), ``"max_iterations"`` or ``"time_limit"`` otherwise.

    Raises:
        TypeError: ``problem`` is not a :class:`ConvexProblem`.
        ValueError: bad options or a warm start of the wrong shape.
    """
    if not isinstance(problem, ConvexProblem):
        raise TypeError(f"problem must be a ConvexProblem, got {type(problem).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("tol", tol), ("constraint_tol", constraint_tol)):
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    if penalty is not None and not (penalty > 0 and math.isfinite(penalty)):
        raise ValueError(f"penalty must be a finite number > 0, got {penalty!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if method == "auto":
        method = "newton" if problem.n <= NEWTON_MAX_SAMPLES else "fista"
    if dtype is None:
        dtype = torch.float64 if method == "newton" else problem.X.dtype
    start = time.perf_counter()
    deadline = None if time_limit is None else start + float(time_limit)

    op = _Operator(problem, gated=gated, dtype=dtype, chunk_size=chunk_size)
    warm = None if warm_start is None else op.warm(warm_start)
    if op.y_scale == 0.0:  # Y = 0: the zero point is optimal, with a zero certificate
        result = _Result(op.zeros(), None, 0, "optimal")
    elif method == "newton":
        result = _interior_point(op, warm, tol, constraint_tol, max_iters or 100, deadline, verbose)
    else:
        result = _first_order(op, warm, tol, constraint_tol, max_iters or 20000, deadline, penalty, verbose)
    return op.solution(result, time.perf_counter() - start, "native-" + method)


# ----------------------------------------------------------------------------- the operator
@dataclass
class _Result:
    W: Tensor  # (d, 2, P, c), normalised units
    mu: Tensor | None  # (n, 2, P, c) cone multipliers, normalised units
    iterations: int
    status: str
    penalty: float | None = None


class _Operator:
    """The problem in the solver's layout and normalised units (``s = 1``, ``max|Y| = 1``).

    With ``a = max|Y|`` the objective ``s‖MW − Y‖² + 2λΣ‖W_g‖`` equals ``s a² (‖MW' − Y'‖² + 2λ'Σ‖W'_g‖)``
    for ``W = a W'``, ``Y = a Y'`` and ``λ' = λ / (s a)``.
    """

    def __init__(
        self, problem: ConvexProblem, *, gated: bool, dtype: torch.dtype, chunk_size: int | None = None
    ) -> None:
        self.problem = problem
        self.gated = gated
        self.dtype = dtype
        self.device = problem.X.device
        self.chunk_size = chunk_size
        self.X = problem.X.to(dtype)
        Y = problem.Y.to(dtype)
        self.n, self.d = self.X.shape
        self.P, self.c = problem.num_patterns, problem.c
        self.bias = problem.output_bias
        self.y_scale = float(Y.abs().max()) if Y.numel() else 0.0
        a = self.y_scale if self.y_scale > 0 else 1.0
        self.Y = Y / a
        self.lam = problem.weight_decay / (problem.scale * a)
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
        self._outer: dict[torch.dtype, Tensor] = {}
        self._scratch: dict[str, Tensor] = {}
        self._data_in: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        # precision the interior point builds its Schur matrices in (see _NewtonSystem): float32 where building
        # them dominates an iteration; below, the extra conjugate-gradient steps float32 costs do
        large = self.n * self.n * self.P * self.d * self.c >= FLOAT32_SCHUR_ABOVE
        self.schur_dtype = torch.float32 if dtype == torch.float64 and large else dtype
        # the (d, d) blocks are built in that precision too where they cost more than the Schur matrices
        self.float32_blocks = self.d >= FLOAT32_BLOCKS_FROM_D_OVER_N * self.n
        # a tiny multiple of the data term's curvature scale (2‖X‖_F², normalised units)
        self.regularization = 2e-12 * float(self.X.square().sum())

    def scratch(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat buffer of at least ``numel`` elements, reused from one call to the next (contents undefined)."""
        buffer = self._scratch.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._scratch[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel]

    def data_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``X`` and the patterns (as 0/1) in ``dtype``, converted once per solve."""
        if dtype not in self._data_in:
            self._data_in[dtype] = (self.X.to(dtype), self.Dm.to(dtype))
        return self._data_in[dtype]

    def sample_outer_products(self, dtype: torch.dtype) -> Tensor | None:
        """``(n, d²)`` rows ``x_j x_jᵀ`` in ``dtype``, kept between Newton systems when they take at most
        ``OUTER_PRODUCTS_MAX_BYTES``; ``None`` beyond."""
        if dtype not in self._outer and self.n * self.d * self.d * self.X.element_size() <= OUTER_PRODUCTS_MAX_BYTES:
            X = self.data_in(dtype)[0]
            self._outer[dtype] = (X[:, :, None] * X[:, None, :]).reshape(self.n, self.d * self.d)
        return self._outer.get(dtype)

    # ---- layout
    def zeros(self) -> Tensor:
        return torch.zeros(self.d, 2, self.P, self.c, dtype=self.dtype, device=self.device)

    def pack(self, U: Tensor, V: Tensor) -> Tensor:
        """``(P, d, c)`` pair → ``(d, 2, P, c)`` in normalised units."""
        a = self.y_scale if self.y_scale > 0 else 1.0
        W = torch.stack([U, V]).to(device=self.device, dtype=self.dtype).permute(2, 0, 1, 3) / a
        if self.gated:
            W = torch.stack([W[:, 0] - W[:, 1], torch.zeros_like(W[:, 1])], dim=1)
        return W * self.wmask

    def warm(self, warm_start) -> tuple[Tensor, Tensor | None, Tensor | None]:
        U, V, b0, mult = _unpack_warm(warm_start)
        shape = (self.P, self.d, self.c)
        if tuple(U.shape) != shape or tuple(V.shape) != shape:
            raise ValueError(
                f"warm start U, V must have shape {shape} (P, d, c), got {tuple(U.shape)} and {tuple(V.shape)}"
                " (use remap_warm_start when the patterns changed)"
            )
        if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise ValueError("warm start contains NaN or inf")
        W = self.pack(U, V)
        mu = None
        if mult is not None and not self.gated:
            cone = mult.cone if isinstance(mult, Multipliers) else mult
            if tuple(cone.shape) != (self.n, 2, self.P, self.c):
                raise ValueError(f"warm-start multipliers must have shape {(self.n, 2, self.P, self.c)}")
            cone = cone.to_dense() if cone.is_sparse else cone
            a = self.y_scale if self.y_scale > 0 else 1.0
            # μ is in units of ν = 2 s r: normalised by s a
            mu = cone.to(device=self.device, dtype=self.dtype).clamp(min=0) * self.cmask / (self.problem.scale * a)
        return W, mu, (None if b0 is None else b0)

    # ---- products
    def forward(self, W: Tensor) -> Tensor:
        """``Z = X W`` block outputs, shape ``(n, 2, P, c)``."""
        return (self.X @ W.reshape(self.d, -1)).reshape(self.n, 2, self.P, self.c)

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
        """``(2D_i − I) X W`` on the constrained blocks, zero on the others."""
        return self.signed_cmask * Z

    def adjoint_constraint(self, Y: Tensor, rows: slice = slice(None)) -> Tensor:
        X = self.X[rows]
        return (X.T @ (self.signed_cmask[rows] * Y).reshape(X.shape[0], -1)).reshape(self.d, 2, self.P, self.c)

    # ---- groups
    def group_norms(self, W: Tensor) -> Tensor:
        """Per-group norms: ``(2, P, c)`` column groups or ``(P,)`` pattern groups."""
        if self.per_column:
            return W.square().sum(0).sqrt()
        return W.square().sum((0, 1, 3)).sqrt()

    def expand(self, g: Tensor) -> Tensor:
        """A per-group quantity broadcast to ``W``'s shape."""
        return g[None] if self.per_column else g[None, None, :, None]

    def penalty_value(self, W: Tensor) -> Tensor:
        norms = self.group_norms(W)
        if self.per_column:
            norms = norms * self.allowed[:, :, None]
        return 2.0 * self.lam * norms.sum()

    def objective(self, W: Tensor, Z: Tensor | None = None) -> Tensor:
        Z = self.forward(W) if Z is None else Z
        r, _ = self.residual(Z)
        return r.square().sum() + self.penalty_value(W)

    def group_soft_threshold(self, W: Tensor, threshold: float) -> Tensor:
        norms = self.expand(self.group_norms(W))
        return W * torch.clamp(1.0 - threshold / norms.clamp(min=1e-300), min=0.0)

    # ---- certificate
    def certificate(
        self, Z: Tensor, mu: Tensor | None, b0: Tensor | None = None, known: tuple[Tensor, Tensor] | None = None
    ) -> tuple[float, float]:
        """``(dual_value, max_k ‖g_k‖)``: the certified bound in the problem's units and the worst group.

        ``known``: float64 ``(r, g)`` the caller has already computed at ``Z`` and ``mu`` — the residual (centred
        with an output bias) and ``g = Mᵀν − Aᵀμ`` — to save their products.
        """
        Y = self.Y.to(torch.float64)
        if known is not None:
            r, g = known
            return self._dual_value(2.0 * r, Y, g)
        X64 = self.X.to(torch.float64)
        pred = torch.einsum("np,npc->nc", self.Dm.to(torch.float64), (Z[:, 0] - Z[:, 1]).to(torch.float64))
        r = pred - Y
        if self.bias:
            if b0 is None:
                r = r - r.mean(0)
            else:
                a = self.y_scale if self.y_scale > 0 else 1.0
                r = r + b0.to(torch.float64).to(r.device).reshape(1, -1) / a
                # ν must sum to zero per output: centre (a valid choice for any b₀)
                r = r - r.mean(0)
        nu = 2.0 * r
        Dm = self.Dm.to(torch.float64)
        G = (X64.T @ (Dm[:, :, None] * nu[:, None, :]).reshape(self.n, -1)).reshape(self.d, self.P, self.c)
        g = torch.stack([G, -G], dim=1)
        if mu is not None:
            S = self.S.to(torch.float64)
            g = g - (X64.T @ (S * mu.to(torch.float64)).reshape(self.n, -1)).reshape(self.d, 2, self.P, self.c)
        return self._dual_value(nu, Y, g * self.wmask.to(torch.float64))

    def _dual_value(self, nu: Tensor, Y: Tensor, g: Tensor) -> tuple[float, float]:
        """The certificate's bound from ``ν`` and the (masked) ``g``, maximised over the scaling ``t``."""
        if self.per_column:
            worst = float(g.square().sum(0).sqrt().amax())
        else:
            worst = float(g.square().sum((0, 1, 3)).sqrt().amax())
        nu_y = float((nu * Y).sum())
        nu_sq = float(nu.square().sum())
        if nu_sq == 0.0:
            value = 0.0
        else:
            t_max = math.inf if worst == 0.0 else 2.0 * self.lam / worst
            t = min(max(-2.0 * nu_y / nu_sq, 0.0), t_max)
            value = -t * nu_y - t * t * nu_sq / 4.0
        a = self.y_scale if self.y_scale > 0 else 1.0
        return value * self.problem.scale * a * a, worst

    # ---- output
    def unpack(self, W: Tensor) -> tuple[Tensor, Tensor]:
        a = self.y_scale if self.y_scale > 0 else 1.0
        W = (W * self.wmask * a).to(self.problem.X.dtype)
        return W[:, 0].permute(1, 0, 2).contiguous(), W[:, 1].permute(1, 0, 2).contiguous()

    def solution(self, result: _Result, seconds: float, name: str) -> ConvexSolution:
        problem = self.problem
        U, V = self.unpack(result.W)
        Z = self.forward(result.W)
        _, b0 = self.residual(Z)
        a = self.y_scale if self.y_scale > 0 else 1.0
        b0 = (
            torch.zeros(self.c, dtype=problem.X.dtype, device=self.device)
            if b0 is None
            else (b0 * a).to(problem.X.dtype)
        )
        value = float(problem.objective(U, V, b0))
        dual = self.certificate(Z, result.mu, b0=b0)[0]
        violation = 0.0 if self.gated else float(problem.violation(U, V))
        multipliers = None
        if result.mu is not None:
            cone = (result.mu * self.cmask * problem.scale * a).to(problem.X.dtype)
            multipliers = Multipliers(cone.to_sparse(), result.penalty)
        return ConvexSolution(
            value=value,
            U=U,
            V=V,
            b0=b0,
            status=result.status,
            solver=name,
            solve_seconds=seconds,
            iterations=result.iterations,
            dual_value=dual,
            violation=violation,
            gated=self.gated,
            multipliers=multipliers,
        )

    # ---- stopping rule, shared by both methods
    def converged(
        self, W: Tensor, Z: Tensor, mu: Tensor | None, tol: float, constraint_tol: float,
        known: tuple[Tensor, Tensor] | None = None,
    ) -> tuple:
        """``(met, relative_gap, relative_violation)`` at the point ``W`` (normalised units); ``known`` as in
        :meth:`certificate`."""
        a = self.y_scale if self.y_scale > 0 else 1.0
        scale = self.problem.scale * a * a
        r = self.residual(Z)[0] if known is None else known[0]
        value = float(r.to(torch.float64).square().sum() + self.penalty_value(W.to(torch.float64))) * scale
        dual = self.certificate(Z, mu, known=known)[0]
        floor = 1e-6 * scale * float(self.center(self.Y).to(torch.float64).square().sum())
        gap = (value - dual) / max(abs(value), floor, 1e-300)
        violation = 0.0 if self.gated else float(torch.relu(-self.constraint(Z)).amax())
        return gap <= tol and violation <= constraint_tol, gap, violation


def _unpack_warm(warm_start):
    if isinstance(warm_start, ConvexSolution):
        return warm_start.U, warm_start.V, warm_start.b0, warm_start.multipliers
    if isinstance(warm_start, (tuple, list)) and len(warm_start) in (3, 4):
        U, V, b0 = warm_start[:3]
        mult = warm_start[3] if len(warm_start) == 4 else None
        return U, V, b0, mult
    raise TypeError("warm_start must be a ConvexSolution or a (U, V, b0[, multipliers]) tuple")


def _nearest_columns(old: Tensor, new: Tensor) -> Tensor:
    """For each column of ``new`` the index of the column of ``old`` differing in the fewest rows (one of them on
    a tie), or -1 when even that one differs in more than a tenth of the rows."""
    if old.shape[1] == 0 or new.shape[1] == 0:
        return torch.full((new.shape[1],), -1, dtype=torch.long, device=old.device)
    n = old.shape[0]
    dtype = torch.float32 if n <= 1 << 22 else torch.float64  # integers up to 3n: exact in either
    old_f, new_f = old.to(dtype), new.to(dtype)
    # rows where both columns agree: Σ ab + (1 − a)(1 − b) = n − |a| − |b| + 2 aᵀb, one (P_new, P_old) product
    agree = 2.0 * (new_f.T @ old_f) - new_f.sum(0)[:, None] - old_f.sum(0)[None, :] + n
    best_agree, index = agree.max(dim=1)
    index[n - best_agree > n / 10] = -1
    return index


def _time_up(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


# ----------------------------------------------------------------------------- interior point
def _interior_point(op: _Operator, warm, tol, constraint_tol, max_iters, deadline, verbose) -> _Result:
    n, d, P, c = op.n, op.d, op.P, op.c
    dtype, device = op.dtype, op.device
    lam = op.lam
    cm = op.cmask
    m = max(op.num_constraints, 1)
    constrained = op.num_constraints > 0
    eye = torch.eye(d, dtype=dtype, device=device)

    W = op.zeros() if warm is None else warm[0].clone()
    Z = op.forward(W)
    if constrained:
        if warm is not None and warm[1] is not None:
            # the previous optimum has many active cones with tiny multipliers: their products would start far below
            # the others', and the first steps would stop at them (see WARM_CENTRALITY)
            Sl = torch.clamp(op.constraint(Z), min=WARM_SLACK_FLOOR) * cm + (1 - cm)
            Zd = torch.maximum(warm[1], WARM_CENTRALITY / Sl) * cm
        else:
            Sl = (torch.clamp(op.constraint(Z), min=0.0) + 1.0) * cm + (1 - cm)
            Zd = cm.expand(n, 2, P, c).clone()
    else:
        Sl = Zd = None
    # smoothing of the group norms: starts at the scale of the normalised data, shrinks with μ
    eps = 1e-3 if (warm is not None and (warm[1] is not None or not constrained)) else 1.0
    eps_min = 1e-13
    num_groups = int(op.allowed.sum()) * (c if op.per_column else 1)
    status = "max_iterations"
    it = 0
    mu = None
    for it in range(1, max_iters + 1):
        Z = op.forward(W)
        r, _ = op.residual(Z)
        # Mᵀν − Aᵀμ (ν = 2r): the data term's gradient less the cones' force, in one product with Xᵀ
        forces = op.adjoint(2.0 * r, Zd) if constrained else 2.0 * op.adjoint_data(r)
        # the certificate needs the same products: handed over where they already are in float64
        known = (r, forces) if op.dtype == torch.float64 else None
        met, gap, viol = op.converged(W, Z, Zd if constrained else None, tol, constraint_tol, known)
        if verbose:
            mu_now = float((Sl * Zd).sum()) / m if constrained else 0.0
            print(f"newton {it:3d}  rel.gap {gap:.2e}  violation {viol:.2e}  mu {mu_now:.2e}  eps {eps:.1e}")
        if met:
            status = "optimal"
            break
        if _time_up(deadline):
            status = "time_limit"
            break
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
        if lam == 0 and _kkt_met(op, r, rd, mu, m, viol, tol, constraint_tol):
            # λ = 0: the dual constraint is an equality no floating-point ν meets, so the only certified
            # bound is 0; stop on the Karush-Kuhn-Tucker residuals instead
            status = "optimal_inaccurate"
            break
        system = _NewtonSystem(op, W, theta, smooth, eye)

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
            alpha_p, alpha_d = _max_step(Sl, dSa), _max_step(Zd, dZa)
            stepped = torch.add(Sl, dSa, alpha=alpha_p).view(-1), torch.add(Zd, dZa, alpha=alpha_d).view(-1)
            mu_aff = float(torch.dot(*stepped)) / m
            sigma = min(1.0, max(mu_aff / mu, 0.0)) ** 3
            # the barrier and the smoothing need only reach a tenth of the tolerance: going further
            # makes the Newton systems needlessly ill-conditioned
            value = float(r.square().sum() + op.penalty_value(W))
            target = max(sigma * mu, 0.1 * tol * value / m)
            dW, dS, dZ = direction(torch.addcmul(products, dSa, dZa).sub_(target))
            alpha = 0.99 * min(_max_step(Sl, dS), _max_step(Zd, dZ))
            if verbose:
                print(f"           step {alpha:.3f}  sigma {sigma:.2e}  |rd| {float(rd.abs().amax()):.2e}")
            W = W + alpha * dW
            Sl = Sl.add_(dS, alpha=alpha)  # no other reference to them remains
            Zd = Zd.add_(dZ, alpha=alpha)
            if lam > 0:
                eps_floor = 0.05 * tol * value / (lam * num_groups)
                eps = max(min(eps, target * n / (2.0 * lam)), eps_floor, eps_min)
        else:
            dW = system.solve(-rd)
            value = float(r.square().sum() + op.penalty_value(W))
            eps_floor = 0.05 * tol * value / (lam * num_groups) if lam > 0 else eps_min
            W, eps = _smoothed_newton_step(op, W, dW, rd, eps, max(eps_floor, eps_min))
    else:
        if status == "max_iterations" and op.converged(W, op.forward(W), Zd, tol, constraint_tol)[0]:
            status = "optimal"
    return _Result(W * op.wmask, Zd if constrained else None, it, status)


def _kkt_met(op, r, rd, mu, m, violation, tol, constraint_tol) -> bool:
    """Stationarity, complementarity and feasibility to ``tol`` (normalised units)."""
    if violation > constraint_tol:
        return False
    data = float(r.square().sum())
    floor = 1e-6 * float(op.center(op.Y).square().sum())
    if mu is not None and mu * m > tol * max(data, floor):
        return False
    worst = float(rd.abs().amax())
    # relative to the data term's gradient, computed only when the cheaper tests pass
    return worst <= tol or worst <= tol * float(2.0 * op.adjoint_data(r).abs().amax())


def _smoothed_newton_step(op: _Operator, W: Tensor, dW: Tensor, grad: Tensor, eps: float, eps_min: float):
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


def _schur_panels(n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` panels of rows covering ``range(n)``, in which the Schur matrices are built up to their diagonal.

    Finer panels skip more of the upper triangle but make smaller products. At n = 500 the warm solve at
    (500, 20, 100) took 0.688 s with two panels, 0.640 s with four and 0.627 s with five (medians of 5, alternating;
    fastest 0.621, 0.617 and 0.591 s); at n = 1000 panels of 128 rows gained nothing over 256, and at n = 2000 they
    were slower in float32 (1.63 against 1.42 s per build).
    """
    count = max(1, round(n / min(256, max(96, n // 4))))
    edges = [round(k * n / count) for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _max_step(x: Tensor, dx: Tensor) -> float:
    """Largest ``α ≤ 1`` keeping ``x + α dx ≥ 0`` (``x ≥ 0``; entries with ``x = dx = 0`` are ignored)."""
    # one division and one reduction: the most negative dx / x, from which α = −x/dx (a masked ratio was 8× slower)
    worst = float(torch.div(dx, x).nan_to_num_(0.0, posinf=math.inf, neginf=-math.inf).amin())
    return 1.0 if worst >= -1.0 else -1.0 / worst


class _NewtonSystem:
    """``(2 MᵀΠM + H̄) ΔW = R`` solved by the Woodbury identity.

    ``H̄`` holds, per block ``(side, i, o)``, ``Xᵀ diag(θ) X`` from the barrier and the smoothed norm's
    Hessian ``ρ (I − W_g W_gᵀ / N²)`` (``ρ = 2λ/N``, ``N = √(‖W_g‖² + ε²)``). With column groups the
    norm Hessian lives inside the block; with pattern groups its rank-one part spans the pattern's blocks
    and only the exact (matrix-free) product carries it, the conjugate gradients making up for it.
    """

    def __init__(self, op: _Operator, W: Tensor, theta: Tensor | None, smooth: Tensor, eye: Tensor):
        self.op = op
        # what the exact (matrix-free) product needs: the barrier weights and the norm Hessian's pieces
        self.theta = theta
        self.rho = 2.0 * op.lam / smooth  # per group
        self.norm_direction = W
        self.smooth = smooth
        self.norm_rank_one = self.rho / smooth.square()
        self.eye = eye
        self.budget = op.chunk_size or max(1, (1 << 24) // max(op.n * op.d, 1))
        # The inverse built below is only the preconditioner of the conjugate gradients, which run on the exact
        # matrix: it is built in float32 (twice the speed of float64, half the memory traffic) until float32 stops
        # being enough, which happens as the barrier's systems grow ill-conditioned; from then on (op.schur_dtype)
        # it is built in float64.
        self.schur_dtype = op.schur_dtype
        if not self._build(self.schur_dtype):
            self._refine_schur()

    def _build(self, dtype: torch.dtype) -> bool:
        """The blocks' inverses and the Schur factor, built in ``dtype``; ``False`` when float32 rounding made one of
        the matrices indefinite (float64 failures raise)."""
        op = self.op
        n, d, P, c = op.n, op.d, op.P, op.c
        K = 2 * P * c
        # the blocks follow the Schur matrix into float32 only where building them dominates (large d)
        blocks = dtype if op.float32_blocks else op.dtype
        X = op.data_in(blocks)[0]
        eye = self.eye.to(blocks)
        # relative regularisation: negligible in float64, and below float32's rounding in float32 (1e-6 made the
        # conjugate gradients slower)
        relative = 1e-14 if blocks == torch.float64 else 1e-8
        # ----- block-diagonal part, one (d, d) block per (side, i, o), ordered like W.reshape(d, K)
        if self.theta is not None:
            theta_k = self.theta.reshape(n, K).to(blocks)
            B = torch.zeros(K, d * d, dtype=blocks, device=op.device)
            outer = op.sample_outer_products(blocks)
            if outer is not None:  # Xᵀ diag(θ_k) X for every block k as one product: θᵀ (x_j x_jᵀ)_j
                B.addmm_(theta_k.T, outer)
            else:
                # too many rows x_j x_jᵀ to keep (large d): (θ_k ⊙ X)ᵀ X block by block, a few blocks at a time, as
                # deep products (a chunk of the rows x_j x_jᵀ would give products only a few samples deep)
                B3 = B.view(K, d, d)
                for lo in range(0, K, self.budget):
                    hi = min(K, lo + self.budget)
                    weighted = theta_k[:, lo:hi].T[:, :, None] * X  # (blocks, n, d)
                    torch.matmul(weighted.transpose(1, 2), X, out=B3[lo:hi])
            B = B.reshape(K, d, d)
        else:
            B = torch.zeros(K, d, d, dtype=blocks, device=op.device)
        rho, smooth = self.rho.to(blocks), self.smooth.to(blocks)
        # the smoothed norm's Hessian, added in place (these (K, d, d) tensors are the largest of an iteration)
        if op.per_column:
            Wf = self.norm_direction.reshape(d, K).T.to(blocks)  # (K, d)
            rho_k = rho.reshape(K)
            B.diagonal(dim1=1, dim2=2).add_(rho_k[:, None])
            B.baddbmm_((-rho_k / smooth.reshape(K) ** 2)[:, None, None] * Wf[:, :, None], Wf[:, None, :])
        else:
            # with pattern groups the rank-one part −(ρ/N²) w wᵀ of a group spans its pattern's 2·c blocks; it is
            # left out of the preconditioner (which then dominates the matrix) and kept in the exact product
            rho_k = rho[None, :, None].expand(2, P, c).reshape(K)
            B.diagonal(dim1=1, dim2=2).add_(rho_k[:, None])
        # static regularisation (relative) keeps every block positive definite; the conjugate gradients on the
        # unregularised system remove its effect on the direction (an absolute floor relative to the data term's
        # curvature keeps λ = 0 and the smoothed norms' flat radial directions solvable)
        diag = B.diagonal(dim1=1, dim2=2)
        reg = torch.clamp(relative * diag.amax(1), min=op.regularization)
        diag.add_(reg[:, None])
        if op.restricted:
            excluded = ~op.wmask.expand(1, 2, P, c).reshape(K).bool()  # blocks a sign restriction removes
            B[excluded] = eye
        L = self._cholesky(B, blocks)
        if L is None:
            return False
        Binv = torch.cholesky_inverse(L)
        if op.restricted:
            Binv[excluded] = 0.0
        # ----- Schur complement per output o: I/2 + Π Σ_i D_i X G_{i,o} Xᵀ D_i Π, G = B_u⁻¹ + B_v⁻¹
        G = Binv.reshape(2, P, c, d, d).sum(0)  # (P, c, d, d)
        ridge = relative * G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp(min=1e-30)
        LG = self._cholesky(G + ridge[..., None, None] * eye, blocks)
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
        X, Dm = op.data_in(dtype)
        LG = self.LG.to(dtype)
        # S gets (D_i X L)(D_i X L)ᵀ (G = L Lᵀ), a chunk of patterns at a time; only the blocks on and below the
        # diagonal are formed (the factorisation reads the lower triangle), which saves up to half the products.
        rows = _schur_panels(n)
        # Buffers kept between Newton systems: fresh memory of this size costs page faults at every iteration.
        S = op.scratch("schur", c * n * n, dtype).view(c, n, n).zero_()
        chunk = op.scratch("schur_factors", n * min(P, self.budget) * d, dtype)
        for lo in range(0, P, self.budget):
            hi = min(P, lo + self.budget)
            for o in range(c):
                F = chunk[: n * (hi - lo) * d].view(n, (hi - lo) * d)
                torch.matmul(X, LG[lo:hi, o].permute(1, 0, 2).reshape(d, -1), out=F)
                F.view(n, hi - lo, d).mul_(Dm[:, lo:hi, None])
                for a_lo, a_hi in rows:  # one product per panel of rows, up to the diagonal
                    S[o, a_lo:a_hi, :a_hi].addmm_(F[a_lo:a_hi], F[:a_hi].T)
        if dtype != op.dtype:
            S = op.scratch("schur_working", c * n * n, op.dtype).view(c, n, n).copy_(S)
        if op.bias:  # Π S Π needs the whole matrix: mirror the blocks below the diagonal
            for a, (a_lo, a_hi) in enumerate(rows):
                for b_lo, b_hi in rows[:a]:
                    S[:, b_lo:b_hi, a_lo:a_hi] = S[:, a_lo:a_hi, b_lo:b_hi].transpose(1, 2)
            S = S - S.mean(1, keepdim=True)
            S = S - S.mean(2, keepdim=True)
        S.diagonal(dim1=1, dim2=2).add_(0.5)
        return self._cholesky(S, dtype)

    def _refine_schur(self) -> bool:
        """Rebuild the preconditioner in the working precision; ``False`` when it already was."""
        if self.schur_dtype == self.op.dtype:
            return False
        self.schur_dtype = self.op.schur_dtype = self.op.dtype
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
        norms = self.norm_direction
        if op.per_column:
            coef = (norms * V).sum(0, keepdim=True) * self.norm_rank_one[None]
            out += self.rho[None] * V - norms * coef
        else:
            coef = (norms * V).sum((0, 1, 3)) * self.norm_rank_one
            out += self.rho[None, None, :, None] * V - norms * coef[None, None, :, None]
        return out * op.wmask

    def solve(self, R: Tensor, rtol: float | None = None, max_iters: int = 50) -> Tensor:
        """Conjugate gradients on the exact matrix, preconditioned by the Woodbury inverse.

        With column groups the preconditioner is the matrix up to a tiny regularisation (and the float32
        rounding of its Schur matrix) and a few iterations suffice; with pattern groups it lacks the rank-one
        norm terms (one per pattern). When a float32 preconditioner does not reach ``rtol`` in
        ``FLOAT32_CG_ITERS`` iterations, it is rebuilt in the working precision and the solve starts again.
        """
        if rtol is None:
            rtol = CG_RTOL if self.op.per_column else CG_RTOL_PATTERN_GROUPS
        R = R * self.op.wmask
        if self.schur_dtype != self.op.dtype:
            x, iterations = self._conjugate_gradients(R, rtol, min(max_iters, FLOAT32_CG_ITERS))
            if iterations > FLOAT32_CG_ITERS // 2:  # the next systems are built in float64
                self.op.schur_dtype = self.op.dtype
            if iterations <= FLOAT32_CG_ITERS or not self._refine_schur():
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


# ----------------------------------------------------------------------------- first order
def _first_order(op: _Operator, warm, tol, constraint_tol, max_iters, deadline, penalty, verbose) -> _Result:
    """Augmented Lagrangian + FISTA (constrained) or FISTA (gated); see the module docstring."""
    n, P, c = op.n, op.P, op.c
    lam = op.lam
    constrained = op.num_constraints > 0
    W = op.zeros() if warm is None else warm[0].clone()
    gamma = None
    if constrained:
        gamma = torch.zeros(n, 2, P, c, dtype=op.dtype, device=op.device)
        if warm is not None and warm[1] is not None:
            gamma = warm[1].clone()
    # curvature of the data term (power iteration) and of the constraint map (‖X‖²)
    L_data = 2.0 * _power_norm(lambda V: op.adjoint_data(op.center(op.predict(op.forward(V)))), op.zeros(), op)
    L_cons = 0.0
    if constrained:
        L_cons = _power_norm(lambda V: op.adjoint_constraint(op.constraint(op.forward(V))), op.zeros(), op)
    if penalty is not None:
        delta = float(penalty) / op.problem.scale  # δ multiplies (data units)², as s does
    else:
        # the data term's curvature over the constraints'; floored for patterns that select no sample, where the
        # data term is flat (L_data = 0) and δ = 0 would leave the constraints unenforced
        delta = max(L_data / max(L_cons, 1e-300), 1e-6) if constrained else 0.0
    # (floored where the data term is flat, e.g. constant block outputs centred away by the output bias)
    step = 1.0 / max(L_data + delta * L_cons, op.regularization, 1e-300)
    shifted = gamma / delta if constrained else None  # γ/δ, the hinge's offset
    min_step = 1e-6 * step
    rounding = 10.0 * torch.finfo(op.dtype).eps  # the sufficient-decrease test tolerates round-off
    Z = op.forward(W)
    W_prev, Z_prev = W, Z
    t = 1.0
    inner_tol = 1e-1
    status = "max_iterations"
    last_violation = math.inf
    iters_since = 0
    it = 0

    rows_per_chunk = op.chunk_size or n

    def smooth_part(Za: Tensor, Zb: Tensor | None = None, beta: float = 0.0, want_grad: bool = False):
        """Value (and gradient) of the smooth part at ``Z = Za + β (Za − Zb)``, a chunk of samples at a time.

        Everything but the output bias's mean is row-local, so the temporaries are ``chunk × 2Pc``.
        """
        chunks = [slice(lo, min(n, lo + rows_per_chunk)) for lo in range(0, n, rows_per_chunk)]

        def block_outputs(rows: slice) -> Tensor:
            Zc = Za[rows]
            if Zb is None or beta == 0.0:
                return Zc
            out = op.scratch("extrapolated", Zc.numel(), Zc.dtype).view(Zc.shape)
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
                hinge = op.scratch("hinge", Zc.numel(), Zc.dtype).view(Zc.shape)
                torch.addcmul(shifted[rows], op.signed_cmask[rows], Zc, value=-1.0, out=hinge).relu_()
                flat = hinge.view(-1)
                value += 0.5 * delta * float(torch.dot(flat, flat))
                if want_grad:  # both terms' products with Xᵀ as one
                    grad += op.adjoint(2.0 * r, hinge.mul_(delta), rows, overwrite=True)
            elif want_grad:
                grad += 2.0 * op.adjoint_data(r, rows)
        return value, grad

    check_every = 25
    for it in range(1, max_iters + 1):
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
            step *= 0.5
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
            violation = float(torch.relu(-op.constraint(Z)).amax())
            if violation > 0.25 * last_violation and violation > constraint_tol:
                delta *= 2.0
            shifted = gamma / delta
            last_violation = violation
            inner_tol = max(inner_tol * 0.3, 1e-12)
            iters_since = 0
            t, W_prev, Z_prev = 1.0, W, Z
        if (constrained and inner_done) or (not constrained and it % check_every == 0):
            met, gap, viol = op.converged(W, Z, gamma, tol, constraint_tol)
            if verbose:
                print(f"fista {it:6d}  rel.gap {gap:.2e}  violation {viol:.2e}  delta {delta:.2e}")
            if met:
                status = "optimal"
                break
            if lam == 0 and viol <= constraint_tol and mapping <= tol * max(1.0, float(grad.abs().amax())):
                status = "optimal_inaccurate"  # λ = 0: no certificate beyond 0 (see _interior_point)
                break
        if _time_up(deadline):
            status = "time_limit"
            break
    penalty_reached = delta * op.problem.scale if constrained else None
    return _Result(W * op.wmask, gamma, it, status, penalty=penalty_reached)


def _power_norm(apply, V0: Tensor, op: _Operator, iters: int = 30) -> float:
    """Largest eigenvalue of a positive semi-definite operator (power iteration from a fixed seed)."""
    gen = torch.Generator(device=op.device).manual_seed(0)
    V = torch.randn(V0.shape, generator=gen, dtype=op.dtype, device=op.device) * op.wmask
    value = 0.0
    for _ in range(iters):
        norm = float(V.norm())
        if norm == 0.0:
            return 0.0
        V = V / norm
        AV = apply(V)
        value = float((V * AV).sum())
        V = AV
    return value * 1.05  # a margin: the power iteration approaches from below
