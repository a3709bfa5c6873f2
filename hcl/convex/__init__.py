"""Convex reformulation of two-layer ReLU networks: the problem, its maps, its solvers and certificates.

Lightning-free. ``FixedPatternLayer`` (:mod:`hcl.convex.layers`) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hcl.convex.build import problem_from_network
from hcl.convex.certificate import CertificateResult, global_lower_bound
from hcl.convex.cvxpy_solver import ConvexSolveError
from hcl.convex.native import dual_certificate, solve_native
from hcl.convex.problem import ConvexProblem, ConvexSolution, fold_bias, fold_weights, network_objective
from hcl.convex.solvers import Solver, available_solvers, check_solver_options, choose_solver, register_solver, solve
from hcl.convex.status import Status

if TYPE_CHECKING:
    from hcl.convex.layers import FixedPatternLayer

__all__ = [
    "CertificateResult",
    "ConvexProblem",
    "ConvexSolution",
    "ConvexSolveError",
    "FixedPatternLayer",
    "Solver",
    "Status",
    "available_solvers",
    "check_solver_options",
    "choose_solver",
    "dual_certificate",
    "fold_bias",
    "fold_weights",
    "global_lower_bound",
    "network_objective",
    "problem_from_network",
    "register_solver",
    "solve",
    "solve_native",
]


def __getattr__(name: str) -> Any:
    if name == "FixedPatternLayer":
        from hcl.convex.layers import FixedPatternLayer

        return FixedPatternLayer
    raise AttributeError(f"module 'hcl.convex' has no attribute {name!r}")
