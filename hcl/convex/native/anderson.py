"""Anderson acceleration (type II, safeguarded) of the ADMM's Douglas–Rachford map ``ζ ← F(ζ) = ζ + g(ζ)``.

The next state is ``F(ζ_k) − ΔF γ``, where ``γ`` fits the last residual ``g_k`` by the last ``memory`` residual
differences ``ΔG`` in least squares, and ``ΔF`` are the differences of ``F``. With ``ζ_k = F(ζ_{k−1}) − c_{k−1}`` (the
last correction), ``ΔF`` at step ``k`` is ``g_k − c_{k−1}``: no copy of ``F`` is kept. The differences, the last
residuals and the correction are float32 (they only shape the correction, which is small next to ``ζ``); the state
stays in the working precision. A residual more than ``SAFEGUARD`` times the last one undoes the last correction
and clears the history. Measured on MNIST in ``docs/solvers.md#anderson-acceleration-of-the-admm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A residual this many times the last one rejects the accelerated point (back to the plain iterate)
SAFEGUARD = 10.0
# Tikhonov term of the least squares, relative to its largest diagonal entry (float32 Gram matrices)
REGULARIZATION = 1e-6


def history_bytes(memory: int, numel: int, working_itemsize: int) -> int:
    """The bytes :class:`Anderson` allocates for a state of ``numel`` elements: ``memory`` differences of ``G`` and
    of ``F``, the last two residuals and the correction in float32, the residual and the span's start in the working
    precision."""
    return (2 * memory + 3) * numel * 4 + 2 * numel * working_itemsize


class Anderson:
    """Anderson acceleration of a fixed-point iteration on a flat state split in two weighted parts.

    The caller writes ``g(ζ_k)`` into :attr:`residual` and calls :meth:`step`.

    Args:
        memory: the number of residual differences kept (≥ 1).
        numel: the state's size.
        split: where the second part begins (the least squares weighs ``‖x[:split]‖²`` by ``w₁`` and the rest by
            ``w₂``, the metric the iteration is nonexpansive in; set by :meth:`reset`).
        dtype, device: the state's.
    """

    def __init__(self, memory: int, numel: int, split: int, dtype: torch.dtype, device: torch.device) -> None:
        if memory < 1:
            raise ValueError(f"memory must be ≥ 1, got {memory}")
        self.memory, self.split = memory, split
        self.dG = torch.empty(memory, numel, dtype=torch.float32, device=device)
        self.dF = torch.empty(memory, numel, dtype=torch.float32, device=device)
        # float32 copies of the residual and the last one (mixed-precision passes are 3× slower than two of one
        # precision), and the last correction
        self.g32 = torch.empty(numel, dtype=torch.float32, device=device)
        self.prev_g32 = torch.empty(numel, dtype=torch.float32, device=device)
        self.correction = torch.zeros(numel, dtype=torch.float32, device=device)
        #: where the caller writes ``g(ζ_k)``
        self.residual = torch.empty(numel, dtype=dtype, device=device)
        #: where the caller may keep ``ζ_k`` while it applies the map
        self.start = torch.empty(numel, dtype=dtype, device=device)
        self.gram = torch.zeros(memory, memory, dtype=torch.float64)
        self.rejected = 0
        self.reset((1.0, 1.0))

    def reset(self, weights: tuple[float, float]) -> None:
        """Forget the history (the map changed: a new penalty ``ρ``, whose parts are the weights)."""
        self.weights = weights
        self.count, self.started, self.corrected = 0, False, False
        self.last_norm = math.inf

    def _dots(self, vector: Tensor) -> Tensor:
        """Weighted inner products of the kept differences of ``G`` with ``vector`` (float32), in float64 (two
        matrix-vector products are faster here than one product with two columns)."""
        s, k = self.split, min(self.count, self.memory)
        dG = self.dG[:k]
        out = self.weights[0] * (dG[:, :s] @ vector[:s]).to(torch.float64)
        if s < vector.numel():
            out += self.weights[1] * (dG[:, s:] @ vector[s:]).to(torch.float64)
        return out.cpu()

    def step(self, state: Tensor) -> bool:
        """Move ``state`` (``ζ_k``, flat, in place) to the next state given :attr:`residual` ``= F(ζ_k) − ζ_k``.

        Returns ``False`` when the residual rejected the last accelerated point: ``state`` then goes back to the
        plain iterate ``F(ζ_{k−1})`` and the residual is not used.
        """
        g, s = self.residual, self.split
        norm = math.hypot(math.sqrt(self.weights[0]) * float(torch.linalg.vector_norm(g[:s])),
                          math.sqrt(self.weights[1]) * float(torch.linalg.vector_norm(g[s:])))
        if self.corrected and norm > SAFEGUARD * self.last_norm:
            state.add_(self.correction)
            self.rejected += 1
            self.reset(self.weights)
            return False
        self.last_norm = norm
        self.g32.copy_(g)
        if self.started:  # the newest differences, in the slot of the oldest
            slot = self.count % self.memory
            torch.sub(self.g32, self.prev_g32, out=self.dG[slot])
            torch.sub(self.g32, self.correction, out=self.dF[slot])
            self.count += 1
        self.g32, self.prev_g32 = self.prev_g32, self.g32
        self.started = True
        state.add_(g)  # F(ζ_k)
        k = min(self.count, self.memory)
        self.corrected = False
        if k == 0:
            self.correction.zero_()
            return True
        slot = (self.count - 1) % self.memory
        column, rhs = self._dots(self.dG[slot]), self._dots(self.prev_g32)  # the new Gram column, and ΔGᵀ g_k
        self.gram[:k, slot] = column
        self.gram[slot, :k] = column
        gram = self.gram[:k, :k].clone()
        gram.diagonal().add_(REGULARIZATION * float(gram.diagonal().max()))
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:  # dependent differences: the plain step, and the history starts again
            self.count = 0
            self.correction.zero_()
            return True
        gamma = torch.cholesky_solve(rhs[:, None], factor)[:, 0].to(device=state.device, dtype=torch.float32)
        torch.mv(self.dF[:k].T, gamma, out=self.correction)
        state.sub_(self.correction)
        self.corrected = True
        return True
