"""A solve's time limit as a method's loop sees it: the whole solve, its final certificate included, ends within it."""

from __future__ import annotations

from time import perf_counter

# The final certificate (the point's value, violation and bound recomputed in float64 with the data itself) costs about
# this many of the method's iterations: 0.6–6.4 for the ADMM, 2–3.4 for the first-order method, at most 0.24 for the
# interior point (docs/solvers.md#time-limits)
WRAP_UP_ITERATIONS = {"admm": 5.0, "fista": 4.0, "newton": 0.5}


class Deadline:
    """``limit`` seconds from ``start`` (``perf_counter()`` values) for a method whose final certificate costs
    ``wrap_up`` of its iterations.

    :meth:`passed`, asked once an iteration, stops the loop where another iteration and the certificate, at the pace
    measured between its calls, would end past the limit; :meth:`reached` is the limit itself (within an iteration).
    """

    def __init__(self, start: float, limit: float, wrap_up: float) -> None:
        self.at = start + limit
        self.wrap_up = wrap_up
        self._last: float | None = None
        self._pace = 0.0

    def restart(self) -> None:
        """Forget the pace: another loop (the float64 one after a float32 stall) measures its own."""
        self._last, self._pace = None, 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of one-off work (a move into the cones) out of the pace the next call measures."""
        if self._last is not None:
            self._last += seconds

    def reached(self) -> bool:
        return perf_counter() > self.at

    def passed(self) -> bool:
        now = perf_counter()
        if self._last is not None:
            self._pace = now - self._last
        self._last = now
        return now + self._pace * (1.0 + self.wrap_up) > self.at
