"""A global lower bound on the training objective from any fit (scalar output).

Lagrange duality for the all-patterns convex problem (``docs/convex.md#certificates``) gives, for every ``ν``
with ``M(ν) = max_{‖u‖≤1} |νᵀ relu(X̃ u)| ≤ 2λ`` (and ``1ᵀν = 0`` when the network has an unpenalised output
bias), the bound

    min_network L  ≥  −νᵀy − ‖ν‖² / (4s).

From a fit ``ŷ`` (any network's prediction) the candidate is ``ν = 2s(ŷ − y)`` (centred when there is an
output bias); it is scaled by the ``t`` that maximises the concave quadratic ``−t νᵀy − t² ‖ν‖²/(4s)``
over the feasible range ``|t| ≤ 2λ / M(ν)`` (:func:`best_scaled_bound`). At the global optimum's prediction
``t = 1`` and the bound is tight (when ``M`` is exact).

``M(ν)`` is computed

* ``"exact"``: when the folded data has two columns (1-D data with a bias, or 2-D data without one), by
  sweeping the unit circle: between consecutive breakpoints (directions orthogonal to a data point) the
  pattern is fixed, the function is ``gᵀu`` and its largest modulus on the arc is ``‖g‖`` if ``±g`` points
  into the arc, else at an endpoint. ``O(n log n)``.
* ``"spectral"``: in any dimension, the valid upper bound
  ``|νᵀ relu(X̃u)| ≤ max(‖ν⁺‖, ‖ν⁻‖) · ‖X̃u‖ ≤ max(‖ν⁺‖, ‖ν⁻‖) · ‖X̃‖₂`` (``relu(z)`` is non-negative and
  ``‖relu(z)‖ ≤ ‖z‖``). Looser, so the bound is smaller but still valid.

With ``λ = 0`` only ``t = 0`` is feasible (unless ``M(ν) = 0``) and the bound is the trivial ``0``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hcl.checks import check_weight_decay
from hcl.convex.problem import data_scale, fold_bias

METHODS = ("auto", "exact", "spectral")


class CertificateResult(NamedTuple):
    """A certified lower bound on the global minimum of the training objective.

    Attributes:
        lower_bound: ``−νᵀy − ‖ν‖²/(4s)`` at the scaled ``ν`` (a float).
        nu: ``(n,)`` the dual-feasible ``ν`` used (after centring and scaling).
        M: ``M(ν)`` (or its upper bound) for the unscaled candidate ``ν``.
        method: ``"exact"`` or ``"spectral"``.
    """

    lower_bound: float
    nu: Tensor
    M: float
    method: str


def global_lower_bound(
    X: Tensor,
    y: Tensor,
    prediction: Tensor,
    *,
    weight_decay: float,
    reduction: str,
    bias: bool,
    output_bias: bool = False,
    method: str = "auto",
) -> CertificateResult:
    """A lower bound on ``min L`` over all two-layer ReLU networks (any width), from the fit ``prediction``.

    Args:
        X: ``(n, d)`` raw data (a column of ones is appended when ``bias``).
        y: ``(n,)`` or ``(n, 1)`` targets.
        prediction: ``(n,)`` or ``(n, 1)`` a fit ``ŷ`` (e.g. the current network's output).
        weight_decay: ``λ ≥ 0``.
        reduction: ``"sum"`` or ``"mean"``.
        bias: whether the networks have a first-layer bias.
        output_bias: whether they have an unpenalised output bias (then ``ν`` is centred).
        method: ``"auto"`` (exact when the folded data has 2 columns, else spectral), ``"exact"`` or
            ``"spectral"``.

    Raises:
        ValueError: on mismatched shapes, a vector output, ``λ < 0``, an unknown method, or ``"exact"``
            with more than 2 folded columns.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, tensor in (("X", X), ("y", y), ("prediction", prediction)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be (n, d) with n ≥ 1, got shape {tuple(X.shape)}")
    n = X.shape[0]
    for name, tensor in (("y", y), ("prediction", prediction)):
        if tensor.shape not in ((n,), (n, 1)):  # (5, 2) for n = 10 was flattened into a scalar output
            raise ValueError(f"{name} must have shape ({n},) or ({n}, 1) for X's {n} rows (the certificate is for "
                             f"a scalar output), got {tuple(tensor.shape)}")
    weight_decay = check_weight_decay(weight_decay)
    if not (isinstance(bias, bool) and isinstance(output_bias, bool)):  # "no" would read as True
        raise ValueError(f"bias and output_bias must be bools, got {bias!r} and {output_bias!r}")
    for name, tensor in (("X", X), ("y", y), ("prediction", prediction)):
        # NaN would drop out of the exact maximum (a "certified" bound of the other points) or fail inside an SVD
        if not bool(torch.isfinite(tensor.detach().to(torch.float64)).all()):
            raise ValueError(f"{name} contains NaN or inf: no certificate")
    s = data_scale(reduction, n)
    Xf = fold_bias(X.detach().to(torch.float64), bias)  # the bound is computed in float64
    y = y.detach().to(Xf).reshape(-1)
    nu = 2.0 * s * (prediction.detach().to(Xf).reshape(-1) - y)
    if output_bias:
        nu = nu - nu.mean()

    if method == "auto":
        method = "exact" if Xf.shape[1] == 2 else "spectral"
    if method == "exact":
        if Xf.shape[1] != 2:
            raise ValueError(
                f"the exact M(ν) needs 2 folded columns (1-D data with a bias), got {Xf.shape[1]}: use 'spectral'"
            )
        M = _max_over_circle(Xf, nu)
    else:
        M = _spectral_bound(Xf, nu)

    limit = 2.0 * float(weight_decay) / M if M > 0 else math.inf
    # M bounds |νᵀ relu(X̃u)|, so ν and −ν are both feasible: t takes either sign
    bound, t = best_scaled_bound(float(nu @ y), float(nu @ nu) / (4.0 * s), limit, signed=True)
    return CertificateResult(float(bound), t * nu, M, method)


def best_scaled_bound(nu_y: float, quadratic: float, limit: float, *, signed: bool = False) -> tuple[float, float]:
    """The dual bound ``−t νᵀy − t² ‖ν‖²/(4s)`` maximised over the scaling ``t`` of a candidate ``ν``, in closed form.

    The bound is a concave quadratic in ``t``; its unconstrained maximiser ``−νᵀy / (2q)`` is clipped to the
    feasible range ``0 ≤ t ≤ limit`` (``|t| ≤ limit`` when ``signed``: the dual constraint is symmetric in ``ν``).
    Both :func:`global_lower_bound` and the native solver's certificate (``hcl.convex.native.certificate``) use it.

    Args:
        nu_y: ``νᵀy`` (``⟨ν, Y⟩`` for a vector output).
        quadratic: ``q = ‖ν‖² / (4s)``.
        limit: the largest feasible ``t`` (``math.inf`` when every dual constraint holds for any ``t``).
        signed: whether negative ``t`` are feasible too.

    Returns:
        ``(bound, t)``; ``(0.0, 0.0)`` when ``ν = 0``.
    """
    if quadratic == 0.0:
        return 0.0, 0.0
    t = -nu_y / (2.0 * quadratic)
    t = min(max(t, -limit if signed else 0.0), limit)
    return -t * nu_y - t * t * quadratic, t


def max_abs_relu_correlation(X: Tensor, nu: Tensor) -> float:
    """Exact ``max_{‖u‖≤1} |νᵀ relu(X u)|`` for ``(n, 2)`` data ``X``, by sweeping the unit circle."""
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(f"X must be (n, 2), got shape {tuple(X.shape)}")
    return _max_over_circle(X.to(torch.float64), nu.to(torch.float64).reshape(-1))


def _spectral_bound(X: Tensor, nu: Tensor) -> float:
    larger_side = max(float(nu.clamp(min=0).norm()), float(nu.clamp(max=0).norm()))
    return larger_side * float(torch.linalg.matrix_norm(X, ord=2))


def _max_over_circle(X: Tensor, nu: Tensor) -> float:
    keep = X.norm(dim=1) > 0  # zero rows never contribute
    X, nu = X[keep], nu[keep]
    if X.shape[0] == 0:
        return 0.0
    # Point j is active (x_jᵀu ≥ 0) on a half circle: it enters at angle θ_in (u = x_j rotated by −90°)
    # and leaves at θ_in + π.
    enter = torch.atan2(-X[:, 0], X[:, 1]) % (2 * math.pi)
    leave = (enter + math.pi) % (2 * math.pi)
    angles = torch.cat([enter, leave])
    contribution = nu[:, None] * X  # (n, 2)
    delta = torch.cat([contribution, -contribution])
    order = torch.argsort(angles)
    angles, delta = angles[order], delta[order]

    def h(theta: Tensor) -> Tensor:
        u = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)
        return (torch.relu(u @ X.T) @ nu).abs()

    best = h(angles).max()  # every breakpoint (the arcs' endpoints)
    # Arc k runs from angles[k] to the next breakpoint. g on arc k follows from g on a reference arc by
    # the cumulative toggles (they sum to zero over the circle, so the wrap-around needs no correction).
    # The reference is the longest arc, whose midpoint is far from every breakpoint.
    ends = torch.cat([angles[1:], angles[:1] + 2 * math.pi])
    ref = int(torch.argmax(ends - angles))
    mid = (angles[ref] + ends[ref]) / 2
    u_ref = torch.stack([torch.cos(mid), torch.sin(mid)])
    g_ref = ((X @ u_ref >= 0).to(X) * nu) @ X
    cumulative = torch.cumsum(delta, 0)
    g = g_ref + cumulative - cumulative[ref]
    for direction in (g, -g):
        phi = torch.atan2(direction[:, 1], direction[:, 0])
        offset = (phi - angles) % (2 * math.pi)
        inside = offset <= ends - angles
        if bool(inside.any()):
            best = torch.maximum(best, direction[inside].norm(dim=1).max())
    return float(best)
