"""Every activation pattern of low-dimensional data: 1-D and 2-D data with a bias column.

Each returned pattern is realised at an explicit witness ``u`` (``1[X u ≥ 0]`` computed there), so no rounding
error invents a pattern no hyperplane gives (``docs/solvers.md#collinear-data``). Higher-dimensional data has too
many patterns to list: :func:`hcl.patterns.sample_patterns` draws them from Gaussian gates instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hcl.patterns import unique_patterns

__all__ = ["COLLINEAR_RTOL", "enumerate_patterns"]

# Points within this fraction of the side computation's scale (the point's, the pair's) from a line count as on it: a
# few hundred float64 rounding errors, far below any real offset; see docs/solvers.md#collinear-data
COLLINEAR_RTOL = 1e-13


def enumerate_patterns(X: Tensor) -> Tensor:
    """All nonzero patterns ``{1[X u ≥ 0] : u ∈ R^d}`` of 1-D or 2-D data with a bias column.

    ``X`` must be ``(n, 2)`` or ``(n, 3)`` with an all-ones last column. The all-zero pattern is left out:
    it contributes nothing to the convex problem. Every returned pattern is *realised*: it is computed as
    ``X u ≥ 0`` at an explicit witness ``u``.

    * ``d = 2`` (1-D data): the patterns are thresholds ``{x ≥ t}`` and ``{x ≤ t}``, at most ``2n − 1``.
    * ``d = 3`` (2-D data): at most ``n² − n + 1``. Every pattern is that of a cell of the arrangement of
      the planes ``x̃_jᵀu = 0`` (a point on a face can be pushed into a cell by adding ``ε e_last``, which
      makes every tied point strictly active), and every cell touches a vertex ``u ⟂ x̃_i, x̃_j`` for two
      distinct points. Around that vertex the points off the line through ``x_i, x_j`` keep their side, and
      the points on it split by a threshold along the line; the witness is the line's affine function plus a
      small multiple of a threshold function along it. Points within rounding of the line (``COLLINEAR_RTOL``, or 64
      units of the data's own precision, of the scale of the point and the pair) count as on it, so that collinear data,
      collinear in floating point only up to rounding, has the 1-D data's ``2n − 1`` patterns and none of the spurious
      ones a rounding error makes (``docs/solvers.md#collinear-data``). ``O(n²)`` columns: for ``n`` up to a few
      hundred.

    Raises:
        ValueError: for any other shape, non-finite entries, or a last column that is not all ones.
    """
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.ndim != 2 or X.shape[1] not in (2, 3):
        raise ValueError(
            f"enumerate_patterns needs (n, d) data with d = 2 or 3 including the bias column (1-D or 2-D "
            f"data); got d = {X.shape[-1] if X.ndim else X.ndim}. In higher dimension use sample_patterns."
        )
    if X.shape[0] == 0:
        raise ValueError("X is empty (n = 0)")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X has NaN or inf entries: patterns are enumerated for finite data only")
    if not bool((X[:, -1] == 1).all()):
        raise ValueError("the last column of X must be all ones (the folded first-layer bias)")
    precision = torch.finfo(X.dtype).eps if X.is_floating_point() else 0.0
    X = X.to(torch.float64) if X.is_floating_point() else X.double()
    if X.shape[1] == 2:
        return _enumerate_1d(X[:, 0])
    return _enumerate_2d(X[:, :2], max(COLLINEAR_RTOL, 64.0 * precision))


def _threshold_sets(t: Tensor, values: Tensor) -> Tensor:
    """``(n, 2k)`` boolean: ``t ≥ v`` and ``t ≤ v`` for each ``v`` in ``values``."""
    return torch.cat([t[:, None] >= values[None, :], t[:, None] <= values[None, :]], dim=1)


def _enumerate_1d(x: Tensor) -> Tensor:
    D = _threshold_sets(x, torch.unique(x))
    return unique_patterns(D, drop_dead=True).patterns


def _enumerate_2d(points: Tensor, rtol: float, chunk: int = 2048) -> Tensor:
    n = points.shape[0]
    distinct = torch.unique(points, dim=0)
    ones = torch.ones(n, 1, dtype=torch.bool, device=points.device)  # u = e_last
    if distinct.shape[0] == 1:
        return ones
    i, j = torch.triu_indices(distinct.shape[0], distinct.shape[0], offset=1, device=points.device)
    found = [ones]
    for start in range(0, i.numel(), chunk):
        a, b = distinct[i[start : start + chunk]], distinct[j[start : start + chunk]]
        found.append(unique_patterns(_vertex_patterns(points, a, b, rtol), drop_dead=True).patterns)
    return unique_patterns(torch.cat(found, dim=1), drop_dead=True).patterns


def _vertex_patterns(points: Tensor, a: Tensor, b: Tensor, rtol: float) -> Tensor:
    """``(n, 12 B)`` the patterns of the cells around the vertices ``u ⟂ x̃_a, x̃_b`` of ``B`` pairs of points.

    With ``ℓ(x) = νᵀ(x − a)`` the side of the line through ``a`` and ``b`` (``ν ⟂ b − a``) and ``g`` a threshold
    function along it (or a constant), each witness is ``±ℓ + δ g``: ``δ`` small enough that the points off the
    line (``|ℓ|`` above ``rtol`` times the size of its rounding errors) keep their side, large enough that ``g``
    decides the points on it.
    """
    direction = b - a  # (B, 2)
    normal = torch.stack([-direction[:, 1], direction[:, 0]], dim=1)
    # affine functions as (B, 3) coefficients (w, c): f(x) = wᵀx + c
    line = torch.cat([normal, -(normal * a).sum(1, keepdim=True)], dim=1)

    def at(f: Tensor) -> Tensor:  # (B, 3) affine functions at every point: (B, n)
        return f[:, None, :2].mul(points[None]).sum(-1) + f[:, 2:]

    side = at(line)
    # the band around the line, per point, in units of ℓ: its rounding, from x and a (through ν x and ν a) and from ν
    # (through b − a); one band for all the points, from the farthest one's scale, merged a pair's near points
    size = lambda v: v.abs().amax(-1)  # noqa: E731 - the max norm, per point
    reach = (points[None] - a[:, None]).abs().amax(-1)  # (B, n)
    band = rtol * (size(normal)[:, None] * (size(points)[None] + size(a)[:, None])
                   + (size(a) + size(b))[:, None] * reach)
    on_line = side.abs() <= band
    thresholds = []
    # thresholds at a and at b, both ways, each tie active, half way to the next point on the line beyond them; the
    # position along the line is measured from the anchor itself, so that the anchor's is exactly 0
    for anchor in (a, b):
        along_fn = torch.cat([direction, -(direction * anchor).sum(1, keepdim=True)], dim=1)
        along = at(along_fn)
        below = torch.where(on_line & (along < 0), along, -torch.inf).amax(1, keepdim=True)
        above = torch.where(on_line & (along > 0), along, torch.inf).amin(1, keepdim=True)
        reach = direction.square().sum(1, keepdim=True)  # any positive shift where no point lies beyond
        thresholds.append(along_fn + F.pad(torch.where(torch.isfinite(below), -0.5 * below, reach), (2, 0)))  # ≥ 0
        thresholds.append(-along_fn + F.pad(torch.where(torch.isfinite(above), 0.5 * above, reach), (2, 0)))  # ≤ 0
    constant = F.pad(torch.ones_like(side[:, :1]), (2, 0))  # f(x) = 1
    witnesses = []
    for g in (-constant, constant, *thresholds):
        g_at = at(g).abs()
        # δ below every off-line point's |ℓ|/|g|, and above the band's width over every on-line point's |g| (its
        # measured ℓ is rounding, as large as the band; a is on the line, so the lower limit is positive)
        upper = torch.where(on_line, torch.inf, side.abs() / g_at).amin(1, keepdim=True)
        lower = torch.where(on_line, band / g_at, 0.0).amax(1, keepdim=True)
        delta = torch.where(torch.isfinite(upper), torch.sqrt(lower * upper), 2.0 * lower)
        for sign in (1.0, -1.0):
            witnesses.append(sign * line + delta * g)
    u = torch.stack(witnesses, dim=1)  # (B, 12, 3)
    values = points @ u[..., :2].transpose(1, 2) + u[..., 2][:, None, :]  # (B, n, 12): x̃ᵀu
    return (values >= 0).permute(1, 0, 2).reshape(points.shape[0], -1)
