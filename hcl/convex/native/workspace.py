"""Buffers a method keeps from one iteration to the next, apart from the problem's layout."""

from __future__ import annotations

import torch
from torch import Tensor

from hcl.convex.native.operator import Operator
from hcl.convex.native.options import OUTER_PRODUCTS_MAX_BYTES


class Workspace:
    """Scratch buffers and data conversions of one solve, owned by the method that runs it.

    Fresh memory of the size of an iteration's largest temporaries costs page faults at every iteration; these are
    allocated once and reused.
    """

    def __init__(self, op: Operator) -> None:
        self.op = op
        self._scratch: dict[str, Tensor] = {}
        self._data_in: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        self._outer: dict[torch.dtype, Tensor] = {}
        self._identity: dict[torch.dtype, Tensor] = {}

    def scratch(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat buffer of at least ``numel`` elements, reused from one call to the next (contents undefined)."""
        buffer = self._scratch.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._scratch[name] = torch.empty(numel, dtype=dtype, device=self.op.device)
        return buffer[:numel]

    def release(self, name: str) -> None:
        """Free the scratch buffer ``name`` (a later :meth:`scratch` allocates it again)."""
        self._scratch.pop(name, None)

    def data_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``X`` and the patterns (as 0/1) in ``dtype``, converted once per solve."""
        if dtype not in self._data_in:
            self._data_in[dtype] = (self.op.X.to(dtype), self.op.Dm.to(dtype))
        return self._data_in[dtype]

    def identity(self, dtype: torch.dtype) -> Tensor:
        """The ``(d, d)`` identity in ``dtype``."""
        if dtype not in self._identity:
            self._identity[dtype] = torch.eye(self.op.d, dtype=dtype, device=self.op.device)
        return self._identity[dtype]

    def sample_outer_products(self, dtype: torch.dtype) -> Tensor | None:
        """``(n, d²)`` rows ``x_j x_jᵀ`` in ``dtype``, kept between Newton systems when they take at most
        ``OUTER_PRODUCTS_MAX_BYTES``; ``None`` beyond."""
        op = self.op
        if dtype not in self._outer and op.n * op.d * op.d * op.X.element_size() <= OUTER_PRODUCTS_MAX_BYTES:
            X = self.data_in(dtype)[0]
            self._outer[dtype] = (X[:, :, None] * X[:, None, :]).reshape(op.n, op.d * op.d)
        return self._outer.get(dtype)
