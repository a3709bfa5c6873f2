"""Convex reformulation of two-layer ReLU networks: the problem, its maps and its solvers."""

from hcl.convex.problem import (
    ConvexProblem,
    ConvexSolution,
    data_scale,
    fold_bias,
    fold_weights,
    network_objective,
)

__all__ = [
    "ConvexProblem",
    "ConvexSolution",
    "data_scale",
    "fold_bias",
    "fold_weights",
    "network_objective",
]
