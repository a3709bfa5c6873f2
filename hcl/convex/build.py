"""Build the convex problem of a two-layer ReLU network from its current weights, or over every pattern of its data.

The patterns are the neurons' own (``1[X̃ w̃_j ≥ 0]``, ties active); the network maps to a feasible point
of the problem (the network → convex map of ``docs/convex.md``), so the problem's optimum is at most
the network's objective ``L`` — the invariant the callbacks log.

Two formulations:

* ``"patterns"`` (the exact reformulation restricted to the network's patterns): one ``(u, v)`` block per
  distinct live pattern, neurons sharing a pattern added up in the same block, plus optional extra
  patterns (e.g. sampled or enumerated ones), deduplicated against them.
* ``"neurons"`` (the per-neuron formulation of ``docs/experiments.md``): one block per live neuron. For a scalar
  output the block keeps the sign of the neuron's output weight (``signs = sign(α_j)``, ``α_j = 0`` counts as
  ``+1``); for ``c > 1`` an output weight is a vector with no single sign, so each block gets both
  ``U`` and ``V``. Duplicate patterns are kept (one block per neuron).

Dead neurons (all-zero pattern) output zero on the data and are dropped: leaving out their penalty
only lowers the feasible point's value, so ``p* ≤ L`` still holds.

:func:`all_patterns_problem` builds the problem over *every* activation pattern of 1-D or 2-D data with a bias,
whose optimum is the global minimum of ``L`` over networks of any width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hcl.convex.native.memory import SolverMemoryError, footprint, memory_budget
from hcl.convex.native.options import NativeOptions
from hcl.convex.problem import ConvexProblem, fold_bias, fold_weights
from hcl.enumeration import enumerate_patterns
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
        objective has the network's data term and a penalty at most the network's (not with ``one_vs_all``, whose
        penalty ``2λ‖w̃‖‖α‖₁`` may exceed it: that problem is another network's, ``docs/convex.md``).

    Raises:
        ValueError: on mismatched shapes, an unknown formulation, extra patterns with the neurons
            formulation, or when every neuron is dead and no extra pattern is given.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    named = {"X": X, "Y": Y, "hidden_weight": hidden_weight, "hidden_bias": hidden_bias,
             "output_weight": output_weight, "output_bias": output_bias}
    for name, tensor in named.items():  # before the patterns, which NaN would turn into "every neuron is dead"
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or inf")
    X = X.detach()
    if X.dtype in (torch.float16, torch.bfloat16):  # as ConvexProblem stores it: exactly, in float32 (and so Y, W)
        X = X.float()
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
    if hidden_bias is not None and hidden_bias.numel() != m:
        raise ValueError(f"hidden_bias must have one entry per neuron ({m}), got shape {tuple(hidden_bias.shape)}")
    if output_bias is not None and output_bias.numel() != output_weight.shape[0]:
        raise ValueError(f"output_bias must have one entry per output ({output_weight.shape[0]}), got shape "
                         f"{tuple(output_bias.shape)}")

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


def all_patterns_problem(
    X: Tensor,
    Y: Tensor,
    *,
    bias: bool,
    weight_decay: float,
    reduction: str,
    output_bias: bool = False,
    memory_limit: int | None = None,
) -> ConvexProblem:
    """The convex problem over every activation pattern of 1-D or 2-D data with a bias.

    The bias is the first layer's own (``bias=True``: a column of ones is appended) or a column of ones already
    in ``X``, or both; columns of ones after the first add no pattern. The problem is built in float64.

    Args:
        X: ``(n, k)`` inputs of the hidden layer.
        Y: ``(n,)`` or ``(n, c)`` targets.
        bias: whether the hidden layer has its own bias.
        weight_decay: ``λ ≥ 0``.
        reduction: ``"sum"`` or ``"mean"``.
        output_bias: whether the network has an unpenalised output bias.
        memory_limit: bytes the problem's solve may take (as the solvers' option; default: a share of the free memory).

    Raises:
        ValueError: when there is no bias (no first-layer bias and no column of ones), or when the data has more
            than two columns besides the ones (patterns are enumerated for 1-D and 2-D data only).
        SolverMemoryError: before enumerating, when the patterns the distinct points may have (``2n − 1`` on a line,
            ``n² − n + 1`` in the plane; as many in general position) would not fit the least the native solver
            needs for them (the enumeration's own output is ``n`` bytes a pattern).
    """
    if X.ndim != 2:
        raise ValueError(f"X must be (n, features), got shape {tuple(X.shape)}")
    Xf = fold_bias(X.detach().to("cpu", torch.float64), bias)
    is_ones = (Xf == 1).all(dim=0)
    if not bool(is_ones.any()):
        raise ValueError(
            "the global optimum needs a bias: a first-layer bias (bias=True) or a data column of ones (e.g. "
            "SyntheticRegression(append_ones=True)); without one the patterns of this data are not enumerated"
        )
    keep = ~is_ones
    if not bool(keep.any()):  # every column is ones (all points at x = 1): one of them is the data, the rest the bias
        keep[0] = True
    features = Xf[:, keep]
    if features.shape[1] not in (1, 2):
        raise ValueError(
            f"the global optimum is computed for 1-D or 2-D data with a bias; this data has {features.shape[1]} "
            "input columns besides the bias (too many patterns to enumerate: use ConvexGapMonitor instead)"
        )
    # The patterns {1[X̃u ≥ 0]} depend only on the span of the columns: one ones column, placed last, suffices.
    # Enumerated in the data's own precision: float32 points on a line up to its rounding are collinear there
    native = fold_bias(X.detach().cpu(), bias)[:, keep] if X.is_floating_point() else features
    ones = torch.ones(native.shape[0], 1, dtype=native.dtype)
    _check_room(native, Xf.shape[1], Y, memory_limit)
    patterns = enumerate_patterns(torch.cat([native, ones], dim=1))
    return ConvexProblem(X=Xf, Y=Y.detach().to("cpu", torch.float64), patterns=patterns,
                         weight_decay=weight_decay, reduction=reduction, output_bias=output_bias)


def _check_room(points: Tensor, d: int, Y: Tensor, memory_limit: int | None) -> None:
    """Refuse, before it runs, an enumeration whose patterns' solve could not fit: the least of the native solver's
    own estimates (the first-order method a sample at a time in float64, the ADMM in float32 without its history) at
    the most patterns the points can have, as many in general position (``docs/solvers.md#memory``)."""
    NativeOptions(memory_limit=memory_limit)  # checked as every solver's option
    n, distinct = points.shape[0], torch.unique(points, dim=0).shape[0]
    most = 2 * distinct - 1 if points.shape[1] == 1 else distinct * distinct - distinct + 1
    c = 1 if Y.ndim == 1 else Y.shape[1]
    budget, why = memory_budget("cpu", memory_limit)
    least = min(footprint("fista", n, d, most, c, torch.float64, 1).total,
                footprint("admm", n, d, most, c, torch.float32, anderson=0).total)
    needed = max(least, n * most)  # and the enumeration's own output
    if budget is not None and needed > budget:
        raise SolverMemoryError("the all-patterns problem", (n, d, most, c), needed, budget, why)
