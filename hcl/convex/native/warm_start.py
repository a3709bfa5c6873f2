"""Warm starts of the native solver: the multipliers kept with a solution, and carrying a solution over to new patterns.

A warm start is a :class:`~hcl.convex.solution.ConvexSolution` or a ``(U, V, b0[, multipliers])`` tuple with the
problem's number of patterns; :func:`remap_warm_start` makes one from the solution of a problem whose patterns
differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hcl.convex.problem import ConvexSolution

if TYPE_CHECKING:
    from hcl.convex.native.operator import Operator


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


@dataclass
class WarmPoint:
    """A warm start in the solver's layout and normalised units (see :class:`~hcl.convex.native.operator.Operator`).

    Attributes:
        W: ``(d, 2, P, c)`` the starting point.
        mu: ``(n, 2, P, c)`` cone multipliers (zero off the constrained blocks), or ``None``.
        rho: the ADMM's penalties ``(ρ₁, ρ₂)`` to start from (a solve going on from another's point), or ``None``.
    """

    W: Tensor
    mu: Tensor | None
    rho: tuple[float, float] | None = None


def unpack_warm_start(warm_start: ConvexSolution | tuple | list) -> tuple[Tensor, Tensor, Tensor, object]:
    """``(U, V, b0, multipliers)`` of a warm start (``multipliers`` ``None`` when it carries none).

    Raises:
        TypeError: ``warm_start`` is neither a :class:`ConvexSolution` nor a 3- or 4-tuple.
    """
    if isinstance(warm_start, ConvexSolution):
        return warm_start.U, warm_start.V, warm_start.b0, warm_start.multipliers
    if isinstance(warm_start, (tuple, list)) and len(warm_start) in (3, 4):
        U, V, b0 = warm_start[:3]
        mult = warm_start[3] if len(warm_start) == 4 else None
        return U, V, b0, mult
    raise TypeError("warm_start must be a ConvexSolution or a (U, V, b0[, multipliers]) tuple")


def warm_point(op: Operator, warm_start: ConvexSolution | tuple | list, what: str = "warm start") -> WarmPoint:
    """A warm start (``what``: how errors name it) checked against ``op``'s problem and put in its layout and units.

    Raises:
        TypeError: ``U``/``V`` or the multipliers are not tensors (nor convertible to them).
        ValueError: ``U``/``V`` or the multipliers have the wrong shape, or are not finite.
    """
    U, V, _, mult = unpack_warm_start(warm_start)
    U, V = _tensor(U, f"{what} U"), _tensor(V, f"{what} V")
    shape = (op.P, op.problem.d, op.c)
    if tuple(U.shape) != shape or tuple(V.shape) != shape:
        raise ValueError(
            f"{what} U, V must have shape {shape} (P, d, c), got {tuple(U.shape)} and {tuple(V.shape)}"
            " (use remap_warm_start when the patterns changed)"
        )
    if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
        raise ValueError(f"{what} U, V contain NaN or inf")
    W = op.pack(U, V)
    mu = None
    if mult is not None and not op.gated:
        cone = _tensor(mult.cone if isinstance(mult, Multipliers) else mult, f"{what} multipliers")
        if tuple(cone.shape) != (op.n, 2, op.P, op.c):
            raise ValueError(f"{what} multipliers must have shape (n, 2, P, c) = {(op.n, 2, op.P, op.c)}, got "
                             f"{tuple(cone.shape)} (a solution of a problem on other data?)")
        cone = cone.to_dense() if cone.is_sparse else cone
        if not torch.isfinite(cone).all():  # a NaN μ made the certificate's bound its unconstrained maximum
            raise ValueError(f"{what} multipliers contain NaN or inf")
        mu = op.normalise_multipliers(cone)
    return WarmPoint(W, mu)


def _tensor(value: object, name: str) -> Tensor:
    """``value`` as a tensor, detached (a warm start is data, not part of a graph)."""
    try:
        return torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}") from err


def remap_warm_start(
    old_patterns: Tensor, old_solution: ConvexSolution | tuple, new_patterns: Tensor
) -> tuple[Tensor, Tensor, Tensor, Multipliers | None]:
    """Carry a solution over to a new pattern set: each new pattern takes the block of its nearest old pattern.

    Between two training steps most patterns are unchanged and a changed one differs from its neuron's previous
    pattern in a few samples, so the block of the nearest old pattern (fewest differing samples) is close to the
    new optimum's, where a zero block is not. An old block taken by several new patterns is shared equally among
    them (their predictions then add up to the old block's). A new pattern farther than ``n / 10`` samples from
    every old one starts at zero. The result may violate a few of the new cone constraints; the solvers start
    from infeasible points. Multipliers follow their blocks but for the samples that changed side, whose
    constraint has changed sign: those start at zero.

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
    U, V, b0, mult = unpack_warm_start(old_solution)
    if U.shape[0] != old_patterns.shape[1]:
        raise ValueError(f"the solution has {U.shape[0]} blocks but old_patterns has {old_patterns.shape[1]}")
    # on the solution's device: the patterns may come from elsewhere (a CUDA index into a CPU tensor is refused)
    old_patterns, new_patterns = old_patterns.to(U.device), new_patterns.to(U.device)
    old_index = nearest_columns(old_patterns.bool(), new_patterns.bool())
    keep = old_index >= 0
    P_new = new_patterns.shape[1]
    takers = torch.bincount(old_index[keep], minlength=U.shape[0]).to(U.dtype)
    share = torch.zeros(P_new, dtype=U.dtype, device=U.device)
    share[keep] = 1.0 / takers[old_index[keep]]
    U_new = U.new_zeros((P_new,) + tuple(U.shape[1:]))
    V_new = V.new_zeros((P_new,) + tuple(V.shape[1:]))
    U_new[keep] = U[old_index[keep]] * share[keep, None, None]
    V_new[keep] = V[old_index[keep]] * share[keep, None, None]
    new_mult = None
    if mult is not None:
        # a block's multipliers do not scale with it (stationarity involves w / ‖w‖): copied as they are, except
        # where a sample changed side, whose constraint changed sign (docs/solvers.md, "Warm starts")
        if not isinstance(mult, Multipliers):  # a tensor, as a warm start's tuple may hold them (warm_point)
            mult = Multipliers(_tensor(mult, "the warm start's multipliers"))
        cone = (mult.cone.to_dense() if mult.cone.is_sparse else mult.cone).to(U.device)
        dense = cone.new_zeros(cone.shape[:2] + (P_new,) + cone.shape[3:])
        taken = old_index[keep]
        same_side = old_patterns.bool()[:, taken] == new_patterns.bool()[:, keep]
        dense[:, :, keep] = cone[:, :, taken] * same_side[:, None, :, None]
        new_mult = Multipliers(dense.to_sparse(), mult.penalty)
    return U_new, V_new, None if b0 is None else b0.clone(), new_mult


def nearest_columns(old: Tensor, new: Tensor) -> Tensor:
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
