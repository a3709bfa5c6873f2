"""The statuses every solver reports, and the numeric codes the dashboards log (``<prefix>/status``)."""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    """How a solve ended. A ``str`` subclass: ``Status.OPTIMAL == "optimal"`` holds.

    ``OPTIMAL`` promises a certified relative duality gap within the solver's tolerance (or the conic solver's own
    optimality test); anything less gets another member.
    """

    OPTIMAL = "optimal"
    OPTIMAL_INACCURATE = "optimal_inaccurate"
    MAX_ITERATIONS = "max_iterations"
    TIME_LIMIT = "time_limit"
    FAILED = "failed"
    NONFINITE = "nonfinite"  # the network's weights were not finite: nothing was solved

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> int:
        """The number logged under ``<prefix>/status``: 0 optimal, 1 inaccurate, 2 a limit, 3 failed, 4 non-finite."""
        return _CODES[self]

    @property
    def solved(self) -> bool:
        """The solver returned a usable point (optimal, or optimal to a looser tolerance)."""
        return self in (Status.OPTIMAL, Status.OPTIMAL_INACCURATE)

    @classmethod
    def of(cls, value: str) -> Status:
        """The member named ``value``; an unknown solver status reads as ``FAILED``."""
        try:
            return cls(value)
        except ValueError:
            return cls.FAILED


_CODES = {
    Status.OPTIMAL: 0,
    Status.OPTIMAL_INACCURATE: 1,
    Status.MAX_ITERATIONS: 2,
    Status.TIME_LIMIT: 2,
    Status.FAILED: 3,
    Status.NONFINITE: 4,
}

#: ``{status name: code}``, as ``<prefix>/status`` logs them.
STATUS_CODES = {status.value: status.code for status in Status}


# A relative gap's denominator is at least this fraction of the data's own scale s‖Y − Ȳ‖² (ConvexProblem.gap_floor),
# so that a zero optimum (the data interpolated) can be certified; see docs/solvers.md#tuned-constants
GAP_FLOOR = 1e-6


def relative_gap(value: float, lower_bound: float, floor: float) -> float:
    """``(value − lower_bound) / max(|value|, floor)``: the one definition of a relative duality gap in hcl.

    ``floor`` keeps the ratio meaningful near a zero optimum: :attr:`hcl.convex.ConvexProblem.gap_floor`, in the
    data's own units (a floor of 1 would turn the gap of a problem whose optimum is 0.01 into an absolute one).
    """
    return (value - lower_bound) / max(abs(value), floor, 1e-300)
