"""Convex reformulation of two-layer ReLU networks: the problem, its maps, its solvers and certificates."""

from hcl.convex.build import problem_from_network
from hcl.convex.certificate import CertificateResult, global_lower_bound, max_abs_relu_correlation
from hcl.convex.cvxpy_solver import ConvexSolveError, installed_solvers, solve_cvxpy
from hcl.convex.native import Multipliers, dual_certificate, remap_warm_start, solve_native
from hcl.convex.problem import (
    ConvexProblem,
    ConvexSolution,
    data_scale,
    fold_bias,
    fold_weights,
    network_objective,
)
from hcl.convex.solve import available_solvers, choose_solver, solve

__all__ = [
    "Multipliers",
    "available_solvers",
    "choose_solver",
    "dual_certificate",
    "remap_warm_start",
    "solve",
    "solve_native",
    "CertificateResult",
    "ConvexProblem",
    "ConvexSolution",
    "ConvexSolveError",
    "data_scale",
    "fold_bias",
    "fold_weights",
    "global_lower_bound",
    "installed_solvers",
    "max_abs_relu_correlation",
    "network_objective",
    "problem_from_network",
    "solve_cvxpy",
]
