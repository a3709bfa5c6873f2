"""The convex problem of a two-layer ReLU network for fixed activation patterns.

Every constant follows ``docs/convex.md``: for patterns ``D_1 … D_P`` (columns of a boolean
``n × P`` matrix), data ``X`` (first-layer bias already folded in as a column of ones), targets ``Y``
(``n × c``) and weight decay ``λ``::

    min  s · ‖ Σ_i D_i X (U_i − V_i) + 1 b₀ᵀ − Y ‖_F²  +  2λ Σ_i pen(U_i, V_i)
    s.t. (2 D_i − I) X U_i ≥ 0,  (2 D_i − I) X V_i ≥ 0          (column-wise)

with ``s = 1`` for reduction ``"sum"`` and ``s = 1/n`` for ``"mean"``, ``pen = ‖u_i‖ + ‖v_i‖`` for a
scalar output and ``pen = ‖[U_i, V_i]‖_F`` for ``c > 1`` (a lower bound for the shared-layer network),
and an unpenalised output bias ``b₀`` when the network has one.

A block may be restricted to one sign (``signs[i] = +1``: only ``U_i``; ``-1``: only ``V_i``): this is
the per-neuron formulation, one block per neuron with the sign of its output weight fixed.

Variables are stored as tensors ``U, V`` of shape ``(P, d, c)`` and ``b0`` of shape ``(c,)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hcl.checks import REDUCTIONS, check_weight_decay
from hcl.convex.solution import ConvexSolution
from hcl.convex.status import GAP_FLOOR
from hcl.patterns import SAMPLE_BYTES

__all__ = [
    "ConvexProblem", "ConvexSolution", "as_targets", "data_scale", "fold_bias", "fold_weights", "network_objective",
]

Reduction = Literal["sum", "mean"]


def data_scale(reduction: str, n: int) -> float:
    """The factor ``s`` of the data term: 1 for ``"sum"``, ``1/n`` for ``"mean"``."""
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        return 1.0 / n
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 work on ``device``'s tensors runs: ``device``, or the CPU where it has no float64 (Apple's MPS)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def fold_bias(X: Tensor, bias: bool) -> Tensor:
    """Append the column of ones that carries the first-layer bias (``X̃ = [X, 1]``) when ``bias``."""
    if not bias:
        return X
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], dim=1)


def fold_weights(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``w̃_i = [w_i, b_i]``: the hidden layer's weight ``(m, d)`` with its bias as a last column."""
    if bias is None:
        return weight
    return torch.cat([weight, bias.reshape(-1, 1)], dim=1)


@dataclass
class ConvexProblem:
    """The convex reformulation for fixed patterns (see the module docstring).

    Args:
        X: ``(n, d)`` data, bias column already folded in.
        Y: ``(n, c)`` targets (a 1-D ``y`` is reshaped to ``(n, 1)``).
        patterns: ``(n, P)`` boolean activation patterns, one column per block.
        weight_decay: ``λ ≥ 0`` of the non-convex objective.
        reduction: ``"sum"`` or ``"mean"``.
        output_bias: whether an unpenalised output bias ``b₀`` is a variable.
        signs: optional ``(P,)`` integer tensor in ``{-1, 0, +1}``; ``None`` means all ``0`` (both signs).
        one_vs_all: for ``c > 1``, one group per (block, output column) — scnn's choice, exact for a network
            whose second layer is block-diagonal; its value is *not* a bound for a shared hidden layer.

    Any memory layout is accepted (column-major, transposed views, strided slices, expanded tensors): ``X``, ``Y``
    and ``patterns`` are stored contiguous. ``Y`` takes ``X``'s dtype; float16 and bfloat16 data are stored in float32,
    which holds them exactly.

    Raises:
        ValueError: on mismatched shapes, non-finite data, no samples, features or outputs, patterns other than
            boolean or 0/1, ``λ < 0``, an unknown reduction, signs other than −1, 0, +1, or an empty pattern set.
    """

    X: Tensor
    Y: Tensor
    patterns: Tensor
    weight_decay: float = 0.0
    reduction: str = "mean"
    output_bias: bool = False
    signs: Tensor | None = None
    one_vs_all: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.X, Tensor):  # a numpy array's shape may be right: its type is not
            raise TypeError(f"X must be a torch.Tensor (n, d), got {type(self.X).__name__}")
        if self.X.ndim != 2:
            raise ValueError(f"X must be a 2-D tensor (n, d), got shape {tuple(self.X.shape)}")
        if not self.X.is_floating_point():
            raise ValueError(f"X must be a floating-point tensor, got {self.X.dtype}")
        if self.X.dtype in (torch.float16, torch.bfloat16):  # exact in float32, the least precision a solver works in
            self.X = self.X.float()
        for name in ("Y", "patterns"):
            if not isinstance(getattr(self, name), Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(getattr(self, name)).__name__}")
        # data, not a graph: the solvers write into buffers, which autograd refuses for tensors that require grad
        self.X, self.Y = self.X.detach(), self.Y.detach()
        if self.Y.ndim == 1:
            self.Y = self.Y.reshape(-1, 1)
        if self.Y.ndim != 2 or self.Y.shape[0] != self.X.shape[0]:
            raise ValueError(
                f"Y must have shape (n,) or (n, c) with n = {self.X.shape[0]} rows of X, got {tuple(self.Y.shape)}"
            )
        # one memory layout whatever the caller's (column-major, transposed, strided, expanded): nothing downstream
        # depends on strides
        self.X = self.X.contiguous()
        self.Y = self.Y.to(dtype=self.X.dtype, device=self.X.device).contiguous()
        if self.X.shape[0] == 0:
            raise ValueError("the data is empty (n = 0)")
        if self.X.shape[1] == 0:
            raise ValueError("X has no features (d = 0)")
        if self.Y.shape[1] == 0:
            raise ValueError("Y has no outputs (c = 0)")
        if not torch.isfinite(self.X).all():
            raise ValueError("X contains NaN or inf")
        if not torch.isfinite(self.Y).all():
            raise ValueError("Y contains NaN or inf")
        if self.patterns.ndim != 2 or self.patterns.shape[0] != self.X.shape[0]:
            raise ValueError(
                f"patterns must have shape (n, P) with n = {self.X.shape[0]}, got {tuple(self.patterns.shape)}"
            )
        if self.patterns.shape[1] == 0:
            raise ValueError("the pattern set is empty (P = 0): nothing to solve")
        if self.patterns.dtype != torch.bool and not bool(((self.patterns == 0) | (self.patterns == 1)).all()):
            raise ValueError("patterns must be boolean or 0/1: a sample is on a neuron's active side or not")
        self.patterns = self.patterns.to(device=self.X.device, dtype=torch.bool).contiguous()
        self.weight_decay = check_weight_decay(self.weight_decay)
        data_scale(self.reduction, 1)  # validates the name
        for name in ("output_bias", "one_vs_all"):  # a string such as "no" would read as True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.signs is not None:
            signs = torch.as_tensor(self.signs, device=self.X.device)
            if signs.ndim != 1 or signs.numel() != self.patterns.shape[1]:
                raise ValueError(f"signs must have one entry per pattern, shape ({self.patterns.shape[1]},), got "
                                 f"{tuple(signs.shape)}")
            # checked before the int8 cast: 0.5 must not become 0, nor 256 wrap around to 0
            if not bool(((signs == -1) | (signs == 0) | (signs == 1)).all()):
                raise ValueError("signs must be -1, 0 or +1")
            self.signs = signs.to(torch.int8).contiguous()

    # ------------------------------------------------------------------ sizes
    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def c(self) -> int:
        return self.Y.shape[1]

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[1]

    @property
    def scale(self) -> float:
        """The data-term factor ``s``."""
        return data_scale(self.reduction, self.n)

    @property
    def gap_floor(self) -> float:
        """The least denominator of this problem's relative gaps: ``GAP_FLOOR · s‖Y − Ȳ‖²`` (``Y`` centred per output
        with an output bias), in the objective's units (:func:`hcl.convex.status.relative_gap`)."""
        Y = self.Y.to(torch.float64)
        centred = Y - Y.mean(0) if self.output_bias else Y
        return GAP_FLOOR * self.scale * float(centred.square().sum())

    @property
    def zero_optimum(self) -> bool:
        """``Y`` is 0, or with an output bias the same on every row: the zero network (output bias ``Y``'s first row)
        attains ``p* = 0`` exactly."""
        return not bool((self.Y - self.Y[:1] if self.output_bias else self.Y).any())

    @property
    def is_bound(self) -> bool:
        """True for shared-layer vector outputs: the value is a lower bound, not an attained optimum."""
        return self.c > 1 and not self.one_vs_all

    def allows_u(self) -> Tensor:
        """``(P,)`` boolean: may block ``i`` use its ``U`` variable."""
        if self.signs is None:
            return torch.ones(self.num_patterns, dtype=torch.bool, device=self.X.device)
        return self.signs >= 0

    def allows_v(self) -> Tensor:
        """``(P,)`` boolean: may block ``i`` use its ``V`` variable."""
        if self.signs is None:
            return torch.ones(self.num_patterns, dtype=torch.bool, device=self.X.device)
        return self.signs <= 0

    def zeros(self) -> tuple[Tensor, Tensor, Tensor]:
        """A zero point ``(U, V, b0)`` of the right shapes (always feasible)."""
        shape = (self.num_patterns, self.d, self.c)
        z = torch.zeros(shape, dtype=self.X.dtype, device=self.X.device)
        return z, z.clone(), torch.zeros(self.c, dtype=self.X.dtype, device=self.X.device)

    def in_float64(self) -> ConvexProblem:
        """This problem with its data in float64 (itself when it already is): for evaluating a point exactly."""
        if self.X.dtype == torch.float64:
            return self
        return dataclasses.replace(self, X=self.X.to(torch.float64), Y=self.Y.to(torch.float64))

    # ------------------------------------------------------------ evaluation
    def predict(self, U: Tensor, V: Tensor, b0: Tensor | None = None) -> Tensor:
        """``Σ_i D_i X (U_i − V_i) (+ b₀)``, shape ``(n, c)``."""
        W = (U - V).to(self.X.dtype)
        out = self.X.new_empty(self.n, self.c)
        for rows in self._row_blocks():
            Z = torch.einsum("nd,pdc->npc", self.X[rows], W)
            out[rows] = (Z * self.patterns[rows].unsqueeze(-1)).sum(dim=1)
        if self.output_bias and b0 is not None:
            out = out + b0.reshape(1, -1)
        return out

    def data_term(self, U: Tensor, V: Tensor, b0: Tensor | None = None) -> Tensor:
        """``s · ‖prediction − Y‖_F²``."""
        return self.scale * (self.predict(U, V, b0) - self.Y).square().sum()

    def group_norms(self, U: Tensor, V: Tensor) -> Tensor:
        """``(P,)`` the per-block penalty ``‖u_i‖ + ‖v_i‖`` (scalar) or ``‖[U_i, V_i]‖_F`` (vector).

        With ``one_vs_all`` every column is its own group: ``Σ_k ‖U_i[:, k]‖ + ‖V_i[:, k]‖``.
        """
        if self.one_vs_all:
            return U.norm(dim=1).sum(1) + V.norm(dim=1).sum(1)
        if self.c == 1:
            return U.flatten(1).norm(dim=1) + V.flatten(1).norm(dim=1)
        return torch.sqrt(U.flatten(1).square().sum(1) + V.flatten(1).square().sum(1))

    def penalty(self, U: Tensor, V: Tensor) -> Tensor:
        """``2λ Σ_i pen(U_i, V_i)``."""
        return 2.0 * self.weight_decay * self.group_norms(U, V).sum()

    def objective(self, U: Tensor, V: Tensor, b0: Tensor | None = None) -> Tensor:
        """The convex objective at ``(U, V, b0)`` (feasibility is not checked: see ``violation``)."""
        return self.data_term(U, V, b0) + self.penalty(U, V)

    def violation(self, U: Tensor, V: Tensor) -> Tensor:
        """Largest violation of the cone and sign constraints (0 when feasible), in data units."""
        worst = torch.zeros((), dtype=self.X.dtype, device=self.X.device)
        for W, allowed in ((U, self.allows_u()), (V, self.allows_v())):
            W = W.to(self.X.dtype)
            for rows in self._row_blocks():
                S = (2.0 * self.patterns[rows].to(self.X.dtype) - 1.0).unsqueeze(-1)  # (rows, P, 1)
                Z = torch.einsum("nd,pdc->npc", self.X[rows], W)
                worst = torch.maximum(worst, torch.relu(-S * Z).amax())
            if not bool(allowed.all()):
                forbidden = W[~allowed]
                if forbidden.numel():
                    worst = torch.maximum(worst, forbidden.abs().amax() * self.X.abs().amax())
        return worst

    def _row_blocks(self) -> list[slice]:
        """Blocks of samples whose ``(rows, P, c)`` block outputs take about ``SAMPLE_BYTES``: evaluating a point never
        holds all ``n P c`` of them (4.8 GB in float64 at MNIST's 60 000 images, 1 000 patterns and 10 outputs)."""
        rows = max(1, SAMPLE_BYTES // max(1, self.num_patterns * self.c * self.X.element_size()))
        return [slice(lo, min(self.n, lo + rows)) for lo in range(0, self.n, rows)]

    # --------------------------------------------------------------- mapping
    def point_from_network(
        self, hidden_weight: Tensor, output_weight: Tensor, neuron_block: Tensor, output_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Network → convex: neuron ``j`` (folded weight ``w̃_j``, output ``α_j``) joins block ``neuron_block[j]``.

        ``u = w̃ α⁺ᵀ``, ``v = w̃ α⁻ᵀ``; neurons sharing a block add up. A neuron with
        ``neuron_block[j] < 0`` (dead, dropped) is left out. The block's pattern must be the neuron's own.

        Args:
            hidden_weight: ``(m, d)`` folded first-layer weights.
            output_weight: ``(c, m)`` second-layer weight (``nn.Linear`` layout).
            neuron_block: ``(m,)`` block index of each neuron, ``-1`` to leave it out.
            output_bias: ``(c,)`` or ``None``.
        """
        W = hidden_weight.to(self.X)
        A = output_weight.to(self.X).reshape(self.c, -1).T  # (m, c)
        U, V, b0 = self.zeros()
        keep = neuron_block >= 0
        idx = neuron_block[keep].to(self.X.device)
        outer_pos = W[keep].unsqueeze(-1) * A[keep].clamp(min=0).unsqueeze(1)  # (k, d, c)
        outer_neg = W[keep].unsqueeze(-1) * (-A[keep]).clamp(min=0).unsqueeze(1)
        U.index_add_(0, idx, outer_pos)
        V.index_add_(0, idx, outer_neg)
        if self.output_bias and output_bias is not None:
            b0 = output_bias.to(self.X).reshape(-1).clone()
        return U, V, b0

    def to_network(
        self, U: Tensor, V: Tensor, b0: Tensor | None = None, tol: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Convex → network with the balanced map ``w = u/√‖u‖``, ``α = ±√‖u‖``.

        For a scalar output every nonzero ``u_i`` / ``v_i`` becomes one neuron (at most ``2P``), and the
        network's objective equals the convex objective exactly. For ``c > 1`` every nonzero column
        ``U_i[:, k]`` becomes a neuron with output ``√‖u‖ e_k`` (the one-vs-all network): its objective is
        at least the convex bound.

        Returns:
            ``(hidden_weight (k, d), output_weight (c, k), output_bias (c,) or None)``.
        """
        cols = []
        for W, sign in ((U, 1.0), (V, -1.0)):
            # (P, d, c) → one candidate neuron per (block, output) column
            vecs = W.permute(0, 2, 1).reshape(-1, self.d)  # (P*c, d)
            out_index = torch.arange(self.c, device=W.device).repeat(W.shape[0])
            norms = vecs.norm(dim=1)
            keep = norms > tol
            cols.append((vecs[keep], norms[keep], out_index[keep], sign))
        hidden, outputs = [], []
        for vecs, norms, out_index, sign in cols:
            root = norms.sqrt()
            hidden.append(vecs / root.unsqueeze(1))
            alpha = torch.zeros(self.c, vecs.shape[0], dtype=vecs.dtype, device=vecs.device)
            alpha[out_index, torch.arange(vecs.shape[0], device=vecs.device)] = sign * root
            outputs.append(alpha)
        hidden_weight = torch.cat(hidden, dim=0)
        output_weight = torch.cat(outputs, dim=1)
        bias = b0.clone() if (self.output_bias and b0 is not None) else None
        return hidden_weight, output_weight, bias


def as_targets(Y: Tensor, out_features: int, like: Tensor) -> Tensor:
    """Targets as an ``(n, c)`` tensor of ``like``'s dtype and device, checked against the ``c = out_features`` outputs.

    Integer class labels (``(n,)`` or ``(n, 1)``) of a network with ``c > 1`` outputs become one-hot rows; ``(n, c)``
    rows (integer one-hot rows too) and, for ``c = 1``, ``(n,)`` values are taken as they are.

    Raises:
        ValueError: a shape that is neither, a class label outside ``[0, c)``, or float targets with one number per
            sample for ``c > 1`` outputs (which would be broadcast against every output).
    """
    if Y.ndim > 2 or Y.ndim == 0:
        raise ValueError(f"the targets must be (n,) or (n, c), got shape {tuple(Y.shape)}")
    width = 1 if Y.ndim == 1 else Y.shape[1]
    if out_features > 1 and width == 1:
        if Y.is_floating_point():
            raise ValueError(
                f"the targets are one float per sample (shape {tuple(Y.shape)}) but the model has {out_features} "
                f"outputs: pass class labels as integers (.long()), which become one-hot rows, or (n, {out_features}) "
                "rows"
            )
        labels = Y.long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= out_features):
            raise ValueError(
                f"the class labels must lie in [0, {out_features}) for a model with {out_features} outputs, got "
                f"labels from {int(labels.min())} to {int(labels.max())}"
            )
        return F.one_hot(labels, out_features).to(like)
    if width != out_features:
        raise ValueError(f"the targets have {width} columns but the model's output layer has {out_features} outputs")
    Y = Y.detach().to(like)
    return Y.reshape(Y.shape[0], -1)


def network_objective(
    X: Tensor,
    Y: Tensor,
    hidden_weight: Tensor,
    output_weight: Tensor,
    output_bias: Tensor | None,
    weight_decay: float,
    reduction: str,
) -> Tensor:
    """The non-convex objective ``L`` (``docs/convex.md``), with ``X`` and ``hidden_weight`` already folded.

    ``L = s Σ_j ‖f(x_j) − y_j‖² + λ Σ_i (‖w̃_i‖² + ‖α_i‖²)``; the output bias is not penalised. Computed in float32
    at least: a half-precision network's ``L`` rounded to 8 bits would be no reference for the bounds beside it.
    """
    dtype = torch.promote_types(torch.promote_types(X.dtype, hidden_weight.dtype), torch.float32)
    X, Y, hidden_weight, output_weight = (t.to(dtype) for t in (X, Y, hidden_weight, output_weight))
    output_bias = None if output_bias is None else output_bias.to(dtype)
    if Y.ndim == 1:
        Y = Y.reshape(-1, 1)
    rows = max(1, SAMPLE_BYTES // max(1, hidden_weight.shape[0] * dtype.itemsize))
    total = X.new_zeros(())
    for lo in range(0, X.shape[0], rows):  # a block of rows at a time: the (n, m) hidden outputs can be GBs
        out = torch.relu(X[lo:lo + rows] @ hidden_weight.T) @ output_weight.T
        if output_bias is not None:
            out = out + output_bias.reshape(1, -1)
        total = total + (out - Y[lo:lo + rows]).square().sum()
    data = data_scale(reduction, X.shape[0]) * total
    return data + weight_decay * (hidden_weight.square().sum() + output_weight.square().sum())

