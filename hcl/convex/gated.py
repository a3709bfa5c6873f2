"""Convex training on fixed gates: patterns, predictions, the group prox and a chunked certificate (Lightning-free).

The variables of ``P`` gates ``g_i`` (columns of a ``(d̃, P)`` matrix, ``d̃ = d + 1`` with a folded bias) are stored as
``(d̃, P, c)`` tensors, so that every block output ``X̃ W_i`` of a batch comes from one product
``X̃ @ W.reshape(d̃, P·c)``. The pattern of a sample is ``D_i(x) = 1[x̃·g_i ≥ 0]`` (ties active, as ``hcl.patterns``).

* ``"gated"``: ``f(x) = Σ_i D_i(x) x̃·Z_i``, the gated relaxation of ``docs/convex.md#the-gated-relaxation``, penalty
  ``2λ Σ_i ‖Z_i‖_F``.
* ``"relu"``: ``Σ_i D_i(x) x̃·(U_i − V_i)`` with the cones ``(2D_i − I) X̃ U_i ≥ 0`` (column-wise, same for ``V_i``),
  penalty ``2λ Σ_i (‖U_i‖_F + ‖V_i‖_F)``. Where the cones hold it equals the mapped ReLU network
  ``Σ_i relu(x̃·U_i) − relu(x̃·V_i)`` (:func:`relu_network_predict`).

:func:`certify` gives a certified lower bound on the optimum of either problem on a data set of any size, one chunk
of samples at a time (see ``docs/convex_training.md#the-certificate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hcl.checks import read_checkpoint
from hcl.convex.certificate import best_scaled_bound
from hcl.convex.problem import as_targets, data_scale, fold_bias
from hcl.convex.status import relative_gap

VARIANTS = ("gated", "relu")

# Bytes of the per-chunk float64 buffers (n_chunk × P × c, a few copies): bounds the certificate's working memory.
CHUNK_BYTES = 256 * 2**20


def sample_gates(in_features: int, num_gates: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(in_features, num_gates)`` i.i.d. ``N(0, 1)`` gates from a CPU generator seeded with ``seed``.

    The same seed gives the same gates on every machine and rank.
    """
    if not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
    if not isinstance(num_gates, int) or num_gates < 1:
        raise ValueError(f"num_gates must be a positive integer, got {num_gates!r}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(in_features, num_gates, generator=generator, dtype=torch.float64).to(dtype)


def gate_weights(gates: str | Path | Tensor | list) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of the gates: a tensor or nested list as given, or a ``TwoLayerReLU`` checkpoint's hidden
    layer."""
    if isinstance(gates, (str, Path)):
        path = Path(gates)
        state = read_checkpoint(path, "gates")
        state = state.get("state_dict", state)
        if "hidden_layer.weight" not in state:
            raise ValueError(f"gates: {path} holds no hidden_layer.weight (not a TwoLayerReLU checkpoint)")
        return state["hidden_layer.weight"], state.get("hidden_layer.bias")
    return torch.as_tensor(gates), None


def gates_from_weights(weight: Tensor, bias: Tensor | None, folded_features: int) -> Tensor:
    """Gates ``(d̃, m)`` from a hidden layer's ``weight`` ``(m, d)`` and ``bias`` ``(m,)`` (``nn.Linear`` layout).

    ``weight`` may already hold the bias as its last column (``(m, d̃)``, as :func:`hcl.convex.fold_weights` gives).
    A layer without a bias gives gates through the origin (a zero bias entry) when ``folded_features = d + 1``.

    Raises:
        ValueError: when the widths do not match ``folded_features`` or the weights are not finite.
    """
    weight = torch.as_tensor(weight).detach().to(torch.float64)
    if weight.ndim != 2:
        raise ValueError(f"gates must be a 2-D (num_gates, features) tensor, got shape {tuple(weight.shape)}")
    if bias is not None:
        weight = torch.cat([weight, torch.as_tensor(bias).detach().to(weight).reshape(-1, 1)], dim=1)
    if weight.shape[1] == folded_features - 1 and bias is None:
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], dim=1)
    if weight.shape[1] != folded_features:
        raise ValueError(
            f"gates have {weight.shape[1]} features but the data has {folded_features} as the model sees it (its "
            "bias column included when it has one)"
        )
    if weight.shape[0] == 0 or not torch.isfinite(weight).all():
        raise ValueError("gates must be non-empty and finite")
    return weight.T.contiguous()


def gate_mask(Xf: Tensor, gates: Tensor) -> Tensor:
    """``(n, P)`` boolean ``1[x̃_j·g_i ≥ 0]`` (ties active), in ``Xf``'s precision: never autocast's bf16, whose
    rounding flips signs near a gate's hyperplane (the certificate's patterns are float64)."""
    with torch.autocast(Xf.device.type, enabled=False):
        return Xf @ gates.to(Xf) >= 0


def block_outputs(Xf: Tensor, W: Tensor) -> Tensor:
    """``(n, P, c)``: ``X̃ W_i`` for every block, one product."""
    d, P, c = W.shape
    return (Xf @ W.reshape(d, P * c)).reshape(Xf.shape[0], P, c)


def group_norms(W: Tensor) -> Tensor:
    """``(P,)``: ``‖W_i‖_F`` of the blocks of a ``(d̃, P, c)`` tensor."""
    return W.square().sum(dim=(0, 2)).sqrt()


@torch.no_grad()
def group_soft_threshold_(W: Tensor, threshold: float) -> Tensor:
    """In place: the prox of ``threshold · Σ_i ‖W_i‖_F``, ``W_i ← max(0, 1 − threshold/‖W_i‖) W_i``."""
    if threshold > 0:
        norms = group_norms(W)
        W.mul_((1.0 - threshold / norms.clamp(min=1e-300)).clamp(min=0.0).reshape(1, -1, 1))
    return W


def relu_network_predict(Xf: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``(n, c)``: the mapped ReLU network's output ``Σ_i relu(X̃ U_i) − relu(X̃ V_i)`` (``docs/convex.md#maps``)."""
    return torch.relu(block_outputs(Xf, U)).sum(1) - torch.relu(block_outputs(Xf, V)).sum(1)


def cone_violations(Xf: Tensor, D: Tensor, W: Tensor) -> Tensor:
    """``(n, P, c)``: ``relu(−(2D_i − I) X̃ W_i)``, zero where the cones hold."""
    sign = 2.0 * D.to(Xf.dtype).unsqueeze(-1) - 1.0
    return torch.relu(-sign * block_outputs(Xf, W))


@dataclass
class Certificate:
    """A certified lower bound on the convex training problem's optimum, and the point's value, on a data set.

    Attributes:
        objective: the convex objective at the point (``s‖prediction − Y‖² + 2λ Σ group norms``).
        lower_bound: a certified lower bound on the problem's optimum (valid for any point).
        gap: ``(objective − lower_bound) / |objective|`` (:func:`hcl.convex.status.relative_gap`, no floor: the
            objective of a regularised problem is never 0 but at the zero network). It certifies the point when
            ``violation`` is 0 (always for ``"gated"``).
        violation: the largest cone violation ``max relu(−(2D_i − I) X̃ W_i)`` (0 for ``"gated"``).
        n: the number of samples.
    """

    objective: float
    lower_bound: float
    gap: float
    violation: float
    n: int


def distributed_reduce(tensor: Tensor, op: str) -> Tensor:
    """``certify``'s ``all_reduce`` under ``torch.distributed``: a sum or a max over the processes."""
    tensor, ops = tensor.clone(), torch.distributed.ReduceOp
    torch.distributed.all_reduce(tensor, op=ops.SUM if op == "sum" else ops.MAX)
    return tensor


def certify(
    X: Tensor,
    Y: Tensor,
    gates: Tensor,
    U: Tensor,
    V: Tensor | None = None,
    b0: Tensor | None = None,
    *,
    weight_decay: float,
    reduction: str,
    bias: bool,
    cone_penalty: float = 0.0,
    all_reduce: Callable[[Tensor, str], Tensor] | None = None,
    chunk_size: int | None = None,
) -> Certificate:
    """The certificate of the point ``(U, V, b0)`` on ``(X, Y)`` (``V = None``: the gated problem), in float64.

    With the residual ``r = prediction + b₀ − Y`` (centred per output when there is an output bias), ``ν = 2s r``
    and, for ``"relu"``, the multipliers ``μ = 2ρs · cone_violations`` the cone penalty's gradient implies, every
    ``t ≥ 0`` with ``t‖g_k‖_F ≤ 2λ`` for all groups, ``g = ±X̃ᵀD_iν − X̃ᵀ(2D_i − I)μ`` (``μ = 0`` when gated), gives
    ``p* ≥ −t⟨ν, Y⟩ − t²‖ν‖²/(4s)``, maximised over ``t`` (``hcl.convex.certificate.best_scaled_bound``). Every
    quantity is a sum over samples: the data is read in chunks of ``chunk_size`` rows, and ``all_reduce`` (a sum over
    processes, e.g. each holding a disjoint part of the data) combines the partial sums before the bound is formed.

    Args:
        X: ``(n, d)`` raw inputs (the bias column is appended per chunk when ``bias``).
        Y: ``(n, c)`` targets, or ``(n,)`` class indices (one-hot) when ``U`` has ``c > 1`` outputs.
        gates: ``(d̃, P)``.
        U, V: ``(d̃, P, c)`` variables (``Z = U`` for the gated problem).
        b0: ``(c,)`` output bias or ``None``.
        weight_decay: ``λ ≥ 0``; reduction: ``"sum"`` or ``"mean"``; bias: fold a column of ones.
        cone_penalty: ``ρ`` of the penalty whose gradient gives ``μ`` (any ``ρ ≥ 0`` gives a valid bound).
        all_reduce: ``all_reduce(tensor, op)`` with ``op`` ``"sum"`` or ``"max"`` over processes; ``None`` on one.
        chunk_size: rows per chunk; default from :data:`CHUNK_BYTES`.
    """
    data_scale(reduction, 1)
    d, P, c = U.shape
    f64 = dict(dtype=torch.float64, device=U.device)
    relu = V is not None
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (8 * 4 * P * c))
    Gd = torch.zeros(d, P, c, **f64)  # X̃ᵀ(D ⊙ r)
    Bd = torch.zeros(d, P, **f64)  # X̃ᵀD 1 (for centring)
    Mu = torch.zeros(2 if relu else 0, d, P, c, **f64)  # X̃ᵀ(S ⊙ violation) per side
    scalars = torch.zeros(4, **f64)  # n, Σ‖r‖², Σ⟨r, Y⟩, largest violation (maximum, reduced separately)
    sums_r = torch.zeros(c, **f64)
    sums_y = torch.zeros(c, **f64)
    g64, U64 = gates.to(**f64), U.detach().to(**f64)
    V64 = None if V is None else V.detach().to(**f64)
    for start in range(0, X.shape[0], chunk_size):
        Xc = fold_bias(X[start:start + chunk_size].to(**f64), bias)
        Yc = as_targets(Y[start:start + chunk_size].to(U.device), c, Xc)
        D = gate_mask(Xc, g64)
        Dm = D.to(torch.float64)
        blocks = block_outputs(Xc, U64)
        if relu:
            blocks = blocks - block_outputs(Xc, V64)
        r = (blocks * Dm.unsqueeze(-1)).sum(1) - Yc
        if b0 is not None:
            r = r + b0.detach().to(**f64).reshape(1, -1)
        Gd += (Xc.T @ (Dm.unsqueeze(-1) * r.unsqueeze(1)).reshape(Xc.shape[0], P * c)).reshape(d, P, c)
        Bd += Xc.T @ Dm
        if relu:
            sign = (2.0 * Dm - 1.0).unsqueeze(-1)
            for side, W in enumerate((U64, V64)):
                viol = cone_violations(Xc, D, W)
                scalars[3] = torch.maximum(scalars[3], viol.amax())
                Mu[side] += (Xc.T @ (sign * viol).reshape(Xc.shape[0], P * c)).reshape(d, P, c)
        scalars[0] += Xc.shape[0]
        scalars[1] += r.square().sum()
        scalars[2] += (r * Yc).sum()
        sums_r += r.sum(0)
        sums_y += Yc.sum(0)
    if all_reduce is not None:
        largest = all_reduce(scalars[3:].clone(), "max")
        Gd, Bd, Mu, scalars, sums_r, sums_y = (all_reduce(t, "sum") for t in (Gd, Bd, Mu, scalars, sums_r, sums_y))
        scalars[3] = largest[0]
    n = float(scalars[0])
    s = data_scale(reduction, int(n))
    lam = float(weight_decay)
    data_sum, r_dot_y = float(scalars[1]), float(scalars[2])
    if b0 is not None:
        # ν must sum to zero per output (the output bias is free): centre r; the sums follow in closed form
        mean_r = sums_r / n
        Gd = Gd - Bd.unsqueeze(-1) * mean_r.reshape(1, 1, -1)
        r_dot_y -= float(mean_r @ sums_y)
        centred_sq = data_sum - n * float(mean_r @ mean_r)
    else:
        centred_sq = data_sum
    G = 2.0 * s * Gd  # X̃ᵀD_iν
    if relu:
        mu_scale = 2.0 * cone_penalty * s
        sides = torch.stack([G - mu_scale * Mu[0], -G - mu_scale * Mu[1]])
        worst = max(float(group_norms(sides[0]).amax()), float(group_norms(sides[1]).amax()))
        penalty = group_norms(U64).sum() + group_norms(V64).sum()
    else:
        worst = float(group_norms(G).amax())
        penalty = group_norms(U64).sum()
    limit = math.inf if worst == 0.0 else 2.0 * lam / worst
    nu_y = 2.0 * s * r_dot_y
    quadratic = (2.0 * s) ** 2 * centred_sq / (4.0 * s)
    lower, _ = best_scaled_bound(nu_y, quadratic, limit)
    objective = s * data_sum + 2.0 * lam * float(penalty)
    return Certificate(objective, lower, relative_gap(objective, lower, 0.0), float(scalars[3]), int(n))

