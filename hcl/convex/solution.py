"""What a solver returns: the point, its value and status, and the certified lower bound (``docs/convex.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hcl.convex.status import Status, relative_gap

if TYPE_CHECKING:
    from hcl.convex.problem import ConvexProblem


@dataclass
class ConvexSolution:
    """What a solver returns.

    Attributes:
        value: the convex objective at ``(U, V, b0)``, evaluated in float64 (the optimum, to the solver's tolerance,
            when ``status`` is ``"optimal"``; for ``c > 1`` a lower bound on every network with these patterns).
        U, V, b0: the solution, shapes ``(P, d, c)``, ``(P, d, c)``, ``(c,)``.
        status: a :class:`~hcl.convex.status.Status` (a ``str``): ``"optimal"``, ``"optimal_inaccurate"``,
            ``"max_iterations"``, ``"time_limit"`` or ``"failed"``.
        solver: the solver's name.
        solve_seconds: wall time of the solve.
        iterations: iterations used, where the solver counts them.
        dual_value: a certified lower bound on the problem's optimum (hcl's certificate, also for the conic
            solvers' solutions), where one can be had.
        violation: largest constraint violation of ``(U, V)``.
        gated: True when this solves the gated relaxation (no cone constraints).
        multipliers: solver-specific state for warm starts (``None`` when there is none).
        gap_floor: the problem's :attr:`ConvexProblem.gap_floor`, the least denominator of :attr:`relative_gap`.
    """

    value: float
    U: Tensor
    V: Tensor
    b0: Tensor
    status: str
    solver: str
    solve_seconds: float
    iterations: int | None = None
    dual_value: float | None = None
    violation: float = 0.0
    gated: bool = False
    multipliers: object | None = None
    gap_floor: float = 0.0

    @classmethod
    def zero_network(cls, problem: ConvexProblem, solver: str, gated: bool, seconds: float) -> ConvexSolution:
        """The optimum where the zero network interpolates the targets (:attr:`ConvexProblem.zero_optimum`): no
        neuron, the output bias ``Y``'s row; a solver's leftover of 1e-13 would be a relative gap of 1 (floor 0)."""
        U = problem.X.new_zeros(problem.num_patterns, problem.d, problem.c)
        b0 = problem.Y[0].clone() if problem.output_bias else U.new_zeros(problem.c)
        return cls(value=0.0, U=U, V=U.clone(), b0=b0, status=Status.OPTIMAL, solver=solver, solve_seconds=seconds,
                   iterations=0, dual_value=0.0, gated=gated, gap_floor=problem.gap_floor)

    @property
    def ok(self) -> bool:
        """A usable point: the status is optimal (or optimal to a looser tolerance) and the value is finite."""
        return Status.of(self.status).solved and math.isfinite(self.value)

    def active_neurons(self, rtol: float = 1e-6, problem: ConvexProblem | None = None) -> int:
        """Neurons of the network :meth:`ConvexProblem.to_network` maps this solution to, one per column ``U_i[:, k]``
        or ``V_i[:, k]`` with a norm above :meth:`neuron_tol` (below: a solver's leftovers). For a scalar output, the
        nonzero blocks ``U_i``, ``V_i``; for ``c`` outputs, up to ``2Pc``."""
        norms = torch.cat([self.U.norm(dim=1).flatten(), self.V.norm(dim=1).flatten()])  # (P, d, c) → per column
        return int((norms > self.neuron_tol(rtol, problem)).sum())

    def neuron_tol(self, rtol: float = 1e-6, problem: ConvexProblem | None = None) -> float:
        """The column norm up to which a column is a solver's leftover: ``rtol`` times the largest and, given the
        ``problem`` solved, ``rtol · ‖Y‖_F / ‖X‖_F`` (its outputs ``‖X u‖ ≤ ‖X‖_F ‖u‖`` move no prediction by more
        than ``rtol`` of the targets), so that the leftovers of a zero-network optimum are no neurons."""
        norms = torch.cat([self.U.norm(dim=1).flatten(), self.V.norm(dim=1).flatten()])
        tol = rtol * float(norms.max()) if norms.numel() else 0.0
        if problem is not None:
            x_norm = float(problem.X.to(torch.float64).norm())
            if x_norm > 0:
                tol = max(tol, rtol * float(problem.Y.to(torch.float64).norm()) / x_norm)
        return max(tol, 1e-30 * rtol)

    @property
    def relative_gap(self) -> float | None:
        """``(value − dual_value) / max(|value|, gap_floor)`` when a dual value is known."""
        if self.dual_value is None:
            return None
        return relative_gap(self.value, self.dual_value, self.gap_floor)
