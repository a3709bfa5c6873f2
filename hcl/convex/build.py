"""Build the convex problem of a two-layer ReLU network from its current weights.

The patterns are the neurons' own (``1[X̃ w̃_j ≥ 0]``, ties active); the network maps to a feasible point
of the problem (network → convex map of the project's convex note), so the problem's optimum is at most
the network's objective ``L`` — the invariant the callbacks log.

Two formulations:

* ``"patterns"`` (the exact reformulation restricted to the network's patterns): one ``(u, v)`` block per
  distinct live pattern, neurons sharing a pattern added up in the same block, plus optional extra
  patterns (e.g. sampled or enumerated ones), deduplicated against them.
* ``"neurons"`` (the seed notebook's formulation): one block per live neuron. For a scalar output the
  block keeps the sign of the neuron's output weight (``signs = sign(α_j)``, ``α_j = 0`` counts as
  ``+1``); for ``c > 1`` an output weight is a vector with no single sign, so each block gets both
  ``U`` and ``V``. Duplicate patterns are kept (one block per neuron).

Dead neurons (all-zero pattern) output zero on the data and are dropped: leaving out their penalty
only lowers the feasible point's value, so ``p* ≤ L`` still holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcl.convex.problem import ConvexProblem, fold_bias, fold_weights
from hcl.patterns import activation_patterns, unique_patterns

FORMULATIONS = ("patterns", "neurons")


def problem_from_network(
    X: Tensor,
    Y: Tensor,
    hidden_weight: Tensor,
    hidden_bias: Tensor | None,
    output_weight: Tensor,
    output_bias: Tensor | None,
    *,
    weight_decay: float,
    reduction: str,
    formulation: str = "patterns",
    extra_patterns: Tensor | None = None,
    one_vs_all: bool = False,
) -> tuple[ConvexProblem, tuple[Tensor, Tensor, Tensor]]:
    """The convex problem for the network's activation patterns and the network's point in it.

    Args:
        X: ``(n, d)`` raw data (the bias column is added here when ``hidden_bias`` is given).
        Y: ``(n,)`` or ``(n, c)`` targets.
        hidden_weight: ``(m, d)`` first-layer weight.
        hidden_bias: ``(m,)`` first-layer bias or ``None``.
        output_weight: ``(c, m)`` second-layer weight (a ``(m,)`` vector is read as ``c = 1``).
        output_bias: ``(c,)`` unpenalised output bias or ``None``.
        weight_decay: ``λ`` of the network's objective.
        reduction: ``"sum"`` or ``"mean"``.
        formulation: ``"patterns"`` or ``"neurons"`` (see the module docstring).
        extra_patterns: ``(n, k)`` boolean patterns added to the ``"patterns"`` formulation (duplicates
            and the all-zero pattern are dropped). Only with ``formulation="patterns"``.
        one_vs_all: per-output groups for ``c > 1`` (see :class:`ConvexProblem`).

    Returns:
        ``(problem, (U, V, b0))`` where ``(U, V, b0)`` is the network's feasible point: its convex
        objective has the network's data term and a penalty at most the network's.

    Raises:
        ValueError: on mismatched shapes, an unknown formulation, extra patterns with the neurons
            formulation, or when every neuron is dead and no extra pattern is given.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if X.ndim != 2:
        raise ValueError(f"X must be (n, d), got shape {tuple(X.shape)}")
    if hidden_weight.ndim != 2 or hidden_weight.shape[1] != X.shape[1]:
        raise ValueError(f"hidden_weight must be (m, {X.shape[1]}), got {tuple(hidden_weight.shape)}")
    m = hidden_weight.shape[0]
    if output_weight.ndim == 1:
        output_weight = output_weight.reshape(1, -1)
    if output_weight.ndim != 2 or output_weight.shape[1] != m:
        raise ValueError(f"output_weight must be (c, {m}), got {tuple(output_weight.shape)}")
    if extra_patterns is not None and formulation != "patterns":
        raise ValueError("extra_patterns is only supported with formulation='patterns'")

    dtype = X.dtype
    Xf = fold_bias(X, hidden_bias is not None)
    Wf = fold_weights(hidden_weight.detach().to(Xf), None if hidden_bias is None else hidden_bias.detach().to(Xf))
    A = output_weight.detach().to(Xf)
    b_out = None if output_bias is None else output_bias.detach().to(Xf).reshape(-1)
    D = activation_patterns(Xf, Wf)
    c = A.shape[0]

    signs = None
    if formulation == "patterns":
        unique = unique_patterns(D, drop_dead=True)
        patterns, neuron_block = unique.patterns, unique.neuron_to_pattern
        if extra_patterns is not None:
            patterns = _append_new(patterns, extra_patterns.to(device=D.device))
    else:
        live = D.any(dim=0)
        patterns = D[:, live]
        neuron_block = torch.full((m,), -1, dtype=torch.long, device=D.device)
        neuron_block[live] = torch.arange(int(live.sum()), device=D.device)
        if c == 1:
            signs = torch.where(A[0, live] < 0, -1, 1).to(torch.int8)
    if patterns.shape[1] == 0:
        raise ValueError(f"all {m} neurons are dead on this data and no extra pattern is given: nothing to solve")

    problem = ConvexProblem(
        X=Xf,
        Y=Y.to(dtype=dtype, device=X.device),
        patterns=patterns,
        weight_decay=weight_decay,
        reduction=reduction,
        output_bias=output_bias is not None,
        signs=signs,
        one_vs_all=one_vs_all,
    )
    if problem.c != c:
        raise ValueError(f"Y has {problem.c} columns but output_weight has {c} rows")
    point = problem.point_from_network(Wf, A, neuron_block, b_out)
    return problem, point


def _append_new(patterns: Tensor, extra: Tensor) -> Tensor:
    """``patterns`` followed by the distinct nonzero columns of ``extra`` not already in it."""
    if extra.ndim != 2 or extra.shape[0] != patterns.shape[0]:
        raise ValueError(f"extra_patterns must be (n, k) with n = {patterns.shape[0]}, got {tuple(extra.shape)}")
    if extra.dtype != torch.bool:
        raise TypeError(f"extra_patterns must be boolean, got {extra.dtype}")
    both = torch.cat([patterns, extra], dim=1)
    unique = unique_patterns(both, drop_dead=True)
    known = torch.zeros(unique.patterns.shape[1], dtype=torch.bool, device=both.device)
    known[unique.neuron_to_pattern[: patterns.shape[1]]] = True
    return torch.cat([patterns, unique.patterns[:, ~known]], dim=1)
