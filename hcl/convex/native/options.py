"""The native solver's options (one frozen dataclass, validated in one place) and its tuned constants.

The constants' reasons and measurements are in ``docs/solvers.md#tuned-constants``. The modules that use a constant
import it by name: a test that changes one patches it there (e.g. ``hcl.convex.native.newton.FLOAT32_CG_ITERS``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from hcl.convex.problem import ConvexProblem

METHODS = ("auto", "newton", "fista", "admm")

# Iteration caps when ``max_iters`` is not given: the interior point took 12–68 iterations on the benchmark's
# instances, the first-order method takes thousands; see docs/solvers.md#tuned-constants
DEFAULT_MAX_ITERS = {"newton": 100, "fista": 20000, "admm": 5000}
# Residual differences the ADMM's Anderson acceleration keeps by default (fewer where the memory budget is short);
# measured on MNIST in docs/solvers.md#anderson-acceleration-of-the-admm
ANDERSON_MEMORY = 10
# Rows of the ADMM's n × n matrix built at once (two float64 blocks of this many rows beside it)
ADMM_MATRIX_CHUNK = 1024
# The ADMM works in float32 by default from this tol on: its gap stalled near 1e-4 in float32 on MNIST (the
# certificate is float64 whatever the working precision); docs/solvers.md#float32-iterations-of-the-admm
ADMM_FLOAT32_TOL = 1e-3
# tol and constraint_tol when none is given: the second-order method's, and the ADMM's (a first-order method, taken
# where the interior point does not fit: 1e-3 in 350-500 iterations on MNIST's n = 2 000, where 444 iterations towards
# 1e-6 left the point outside its cones); docs/solvers.md#the-native-solver-hclconvexnativesolve_native
DEFAULT_TOL = 1e-6
# Below a mebibyte no solve fits (the interpreter's own tensors alone are more): a smaller memory_limit is a unit slip
MEMORY_LIMIT_LEAST = 2**20
ADMM_DEFAULT_TOL = 1e-3

# "auto" takes the interior point while its n × n matrices stay small; see docs/solvers.md#tuned-constants
NEWTON_MAX_SAMPLES = 6000
# n² P d c from which the Schur matrices are built in float32 (cheaper than the CG steps it costs only from there on);
# see docs/solvers.md#tuned-constants
FLOAT32_SCHUR_ABOVE = 200_000_000
# CG iterations a float32-built preconditioner gets before it is rebuilt in float64; see docs/solvers.md#tuned-constants
FLOAT32_CG_ITERS = 20
# d/n from which the (d, d) blocks follow the Schur matrices into float32 (building them then dominates);
# see docs/solvers.md#tuned-constants
FLOAT32_BLOCKS_FROM_D_OVER_N = 0.5
# Largest size of the rows x_j x_jᵀ kept between Newton systems (beyond: products block by block);
# see docs/solvers.md#tuned-constants
OUTER_PRODUCTS_MAX_BYTES = 1 << 28
# CG stopping residual: with column groups the preconditioner is the matrix up to rounding, with pattern groups it
# lacks the norms' rank-one terms and the interior point stalls at the looser one; see docs/solvers.md#tuned-constants
CG_RTOL = 1e-6
CG_RTOL_PATTERN_GROUPS = 1e-10
# Rows per panel of the Schur matrices' lower triangle (n/4 within these bounds): finer panels skip more of the upper
# triangle but make smaller products; see docs/solvers.md#tuned-constants
SCHUR_PANEL_ROWS_MIN = 96
SCHUR_PANEL_ROWS_MAX = 256
# A cold start's slacks and cone multipliers (normalised units): below 1, nearer the optimum's scale on training
# trajectories; see docs/solvers.md#tuned-constants
START_SLACK = 0.3
START_MULTIPLIER = 0.1
# The interior point's smoothing ε of the group norms at its start (normalised units), cold or warm, but for the gated
# relaxation's cold start (1): below 1 the neurons formulation's solves took 10-20 % fewer iterations;
# see docs/solvers.md#tuned-constants
SMOOTHING_START = 1e-3
# Warm starts with multipliers: slacks floored at WARM_SLACK_FLOOR and no slack-multiplier product below
# WARM_CENTRALITY (normalised units), so that the first steps are not stopped by tiny multipliers;
# see docs/solvers.md#tuned-constants
WARM_SLACK_FLOOR = 5e-3
WARM_CENTRALITY = 1e-4
# Interior-point iterations without halving the best certified gap after which a point within √tol is returned as
# optimal_inaccurate (the certificate has stopped closing); see docs/solvers.md#tuned-constants
STALL_ITERATIONS = 10


@dataclass(frozen=True)
class NativeOptions:
    """The options of :func:`~hcl.convex.native.solve_native`, checked on construction.

    Args:
        method: ``"auto"``, ``"newton"``, ``"admm"`` or ``"fista"``; ``"auto"`` takes ``"newton"`` when
            ``n ≤ NEWTON_MAX_SAMPLES`` and it fits the memory, else ``"admm"`` (exact linear steps through one ``n × n``
            matrix: large ``d``) when it fits, else ``"fista"`` (``docs/solvers.md#memory``).
        tol: target relative duality gap ``(value − dual_value) / max(|value|, 1e-6 s‖Y − Ȳ‖²)`` (default
            ``DEFAULT_TOL`` = 1e-6; ``ADMM_DEFAULT_TOL`` = 1e-3 for ``"admm"``, chosen or planned, which does not reach
            1e-6 in reasonable time at the sizes it is planned for).
        constraint_tol: target constraint violation, relative to ``max |Y|`` (default as ``tol``); ``"admm"``
            confirms a test met at a point outside its cones at that point moved exactly into them
            (``docs/solvers.md#admm``).
        max_iters: iteration cap (default ``DEFAULT_MAX_ITERS``: 100 for ``"newton"``, 5000 for ``"admm"``, 20000
            for ``"fista"``).
        time_limit: wall-clock limit in seconds for the whole solve, its final certificate included (the iterations
            stop where the next one and the certificate, at the pace measured, would pass it;
            docs/solvers.md#time-limits).
        penalty: the augmented-Lagrangian penalty ``δ`` of ``"fista"`` (default: chosen from the data's curvature;
            it still doubles when the violation stalls).
        dtype: working precision; default float64 for ``"newton"`` (the barrier's systems need it), for ``"admm"``
            float32 when ``tol ≥ ADMM_FLOAT32_TOL`` (1e-3; its gap stalled near 1e-4 in float32), else float64, and the
            problem's dtype (float32 when it is float32) for ``"fista"``. Certificates are float64 in every case.
        chunk_size: samples per chunk in the first-order products / patterns (or blocks) per chunk when building
            the interior-point matrices (default: all at once up to ~2²⁴ elements per temporary).
        memory_limit: bytes the solve may take (default: ``DEFAULT_MEMORY_FRACTION`` of the device's free memory);
            ``"auto"`` picks the method and chunk size that fit, an explicit method that does not fit raises
            :class:`~hcl.convex.native.memory.SolverMemoryError` before allocating (``docs/solvers.md#memory``).
        anderson: residual differences the ``"admm"``'s Anderson acceleration keeps (0: none; default
            ``ANDERSON_MEMORY``, or as many as the memory budget leaves room for; its float32 history takes about
            ``8 · anderson`` bytes per element of the variables and block outputs, ``docs/solvers.md#memory``).
        num_threads: torch threads of a CPU solve, at most the cores this process may use (a larger count is taken
            as that: more only compete; default: one for small problems, else the usable cores that are not busy).
            Torch's thread count is global to the process: it is set for the solve and restored only on the main thread;
            from another thread the process's setting is left as it is (``docs/solvers.md#threads``).
        verbose: print one line per iteration (newton), per stopping test (admm) or per multiplier update (fista).

    Raises:
        ValueError: a value out of its range (the message names the option).
    """

    method: str = "auto"
    tol: float | None = None
    constraint_tol: float | None = None
    max_iters: int | None = None
    time_limit: float | None = None
    penalty: float | None = None
    dtype: torch.dtype | None = None
    chunk_size: int | None = None
    memory_limit: int | None = None
    anderson: int | None = None
    num_threads: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        # numbers of any kind (NumPy's too) but bool, stored as Python's; a tolerance is relative, below 1
        for name, kind, upper in (("tol", numbers.Real, 1.0), ("constraint_tol", numbers.Real, 1.0),
                                  ("max_iters", numbers.Integral, math.inf), ("time_limit", numbers.Real, math.inf),
                                  ("penalty", numbers.Real, math.inf)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < upper:
                what = ("a positive integer" if kind is numbers.Integral else
                        "a relative tolerance in (0, 1)" if upper == 1.0 else "a finite number > 0")
                raise ValueError(f"{name} must be {what}, got {value!r}")
            object.__setattr__(self, name, int(value) if kind is numbers.Integral else float(value))
        for name, least in (("chunk_size", 1), ("memory_limit", 1), ("num_threads", 1), ("anderson", 0)):
            value = getattr(self, name)  # any integer type (numpy's too), as max_iters
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be " + ("a positive integer" if least else "an integer ≥ 0")
                                 + f", got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.memory_limit is not None and self.memory_limit < MEMORY_LIMIT_LEAST:
            raise ValueError(f"memory_limit is in bytes: {self.memory_limit} bytes fit no solve (the least is 1 MiB, "
                             f"{MEMORY_LIMIT_LEAST})")
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")
        if self.method == "newton" and self.dtype == torch.float32:
            raise ValueError("dtype float32 with method 'newton': the interior point's barrier systems need float64 "
                             "(Cholesky failed on them); float32 is for 'admm' and 'fista'")

    def tolerances(self, method: str | None = None) -> tuple[float, float]:
        """``(tol, constraint_tol)``, each the one given or the default (:func:`default_tol`) of ``method`` (these
        options' own when ``None``)."""
        tol = default_tol(method or self.method)
        return (tol if self.tol is None else self.tol,
                tol if self.constraint_tol is None else self.constraint_tol)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def resolved(self, problem: ConvexProblem) -> NativeOptions:
        """These options with ``method``, ``max_iters`` and the tolerances chosen for ``problem`` where left open."""
        method = self.method
        if method == "auto":
            method = "newton" if problem.n <= NEWTON_MAX_SAMPLES else "fista"
        tol, constraint_tol = self.tolerances(method)
        return dataclasses.replace(self, method=method, max_iters=self.max_iters or DEFAULT_MAX_ITERS[method],
                                   tol=tol, constraint_tol=constraint_tol)

    def working_dtype(self, problem: ConvexProblem, method: str | None = None) -> torch.dtype:
        """``dtype``, or the default of ``method`` (these options' own when ``None``) for ``problem``: float64 for
        ``"newton"``, float32 for ``"admm"`` from ``tol = ADMM_FLOAT32_TOL`` on (else float64), the data's for
        ``"fista"``."""
        if self.dtype is not None:
            return self.dtype
        method = method or self.resolved(problem).method
        if method == "admm":
            tol = self.tolerances(method)[0]
            return torch.float32 if tol >= ADMM_FLOAT32_TOL else torch.float64
        return torch.float64 if method == "newton" else problem.X.dtype


def default_tol(method: str) -> float:
    """``tol`` and ``constraint_tol`` of ``method`` when none is given (``"auto"`` is the interior point's until the
    memory plan chooses)."""
    return ADMM_DEFAULT_TOL if method == "admm" else DEFAULT_TOL
