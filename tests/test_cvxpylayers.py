"""The fixed-pattern problem as a CvxpyLayer: its solution, batching, and gradients with respect to y."""

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from hcl.convex import solve
from hcl.convex.cvxpy_solver import ConvexSolveError
from hcl.convex.layers import FixedPatternLayer
from hcl.convex.problem import ConvexProblem


def small_problem(c=2, bias=True, lam=0.05, reduction="mean", signs=None):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(14, 3, generator=g, dtype=torch.float64)
    X[:, -1] = 1.0
    patterns = (X @ torch.randn(3, 4, generator=g, dtype=torch.float64)) >= 0
    Y = torch.randn(14, c, generator=g, dtype=torch.float64)
    return ConvexProblem(X, Y, patterns, weight_decay=lam, reduction=reduction, output_bias=bias,
                         signs=signs, one_vs_all=c > 1)


def reference(problem: ConvexProblem, column: int) -> float:
    """The optimum of one output column, by cvxpy written block by block."""
    X, D = problem.X.numpy(), problem.patterns.numpy().astype(float)
    y = problem.Y[:, column].numpy()
    P = D.shape[1]
    U = [cp.Variable(X.shape[1]) for _ in range(P)]
    V = [cp.Variable(X.shape[1]) for _ in range(P)]
    prediction = sum(cp.multiply(D[:, i], X @ (U[i] - V[i])) for i in range(P))
    constraints = [c for i in range(P) for c in (cp.multiply(2 * D[:, i] - 1, X @ U[i]) >= 0,
                                                  cp.multiply(2 * D[:, i] - 1, X @ V[i]) >= 0)]
    if problem.signs is not None:
        constraints += [U[i] == 0 for i in range(P) if problem.signs[i] < 0]
        constraints += [V[i] == 0 for i in range(P) if problem.signs[i] > 0]
    residual = prediction - y
    if problem.output_bias:
        residual = residual + cp.Variable()
    penalty = sum(cp.norm(U[i]) + cp.norm(V[i]) for i in range(P))
    cvx = cp.Problem(cp.Minimize(problem.scale * cp.sum_squares(residual) + 2 * problem.weight_decay * penalty),
                     constraints)
    cvx.solve(solver="CLARABEL")
    return float(cvx.value)


def column_value(problem, U, V, b0, y):
    """The objective of one output column as a differentiable function of the layer's output and y."""
    Z = torch.einsum("nd,pd->np", problem.X, U - V)
    prediction = (Z * problem.patterns).sum(1) + b0
    penalty = U.norm(dim=1).sum() + V.norm(dim=1).sum()
    return problem.scale * (prediction - y).square().sum() + 2 * problem.weight_decay * penalty


@pytest.mark.parametrize("data_as_parameters", [False, True])
def test_layer_solves_a_batch_and_differentiates_the_optimum(data_as_parameters):
    problem = small_problem()
    layer = FixedPatternLayer.from_problem(problem, data_as_parameters=data_as_parameters)
    Y = problem.Y.T.clone().requires_grad_(True)  # one right-hand side per class
    data = (problem.X, problem.patterns) if data_as_parameters else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        U, V, b0 = layer(Y, *data)
    assert U.shape == (2, problem.num_patterns, problem.d) and b0.shape == (2,)
    values = torch.stack([column_value(problem, U[k], V[k], b0[k], Y[k]) for k in range(2)])
    for k in range(2):
        value = float(values[k].detach())
        assert abs(value - reference(problem, k)) <= 1e-5 * value
    values.sum().backward()
    # envelope theorem: d p*/d y = −2 s r* (r* the optimal residual), an independent check of the gradient
    with torch.no_grad():
        for k in range(2):
            Z = torch.einsum("nd,pd->np", problem.X, U[k] - V[k])
            residual = (Z * problem.patterns).sum(1) + b0[k] - problem.Y[:, k]
            expected = -2 * problem.scale * residual
            assert torch.allclose(Y.grad[k], expected, atol=1e-4 * float(expected.abs().max()))


def test_gradient_of_the_solution_matches_finite_differences():
    problem = small_problem(c=1, bias=False, lam=0.1, reduction="sum")
    layer = FixedPatternLayer.from_problem(problem)
    y = problem.Y[:, 0].clone().requires_grad_(True)
    direction = torch.randn(problem.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        U, V, _ = layer(y)
        readout = (U - V).sum()  # a function of the solution itself, not only of the optimal value
        (grad,) = torch.autograd.grad(readout, y)
        step = 1e-4
        plus = layer(y.detach() + step * direction)
        minus = layer(y.detach() - step * direction)
    numeric = float((plus[0] - plus[1]).sum() - (minus[0] - minus[1]).sum()) / (2 * step)
    assert abs(float(grad @ direction) - numeric) <= 2e-2 * max(1.0, abs(numeric))


def test_signs_gated_and_errors():
    problem = small_problem(c=1, signs=torch.tensor([1, -1, 0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solution = solve(problem, "cvxpylayers")
    assert abs(solution.value - reference(problem, 0)) <= 1e-5 * solution.value
    assert torch.count_nonzero(solution.V[[0, 3]]) == 0 and torch.count_nonzero(solution.U[1]) == 0
    gated = solve(problem, "cvxpylayers", gated=True)
    assert gated.gated and gated.value <= solution.value + 1e-9
    shared = ConvexProblem(problem.X, torch.randn(problem.n, 2, dtype=torch.float64), problem.patterns, 0.1)
    with pytest.raises(ValueError, match="one_vs_all"):
        FixedPatternLayer.from_problem(shared)
    layer = FixedPatternLayer.from_problem(problem)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(problem.n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((problem.n,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="constants"):
        layer(problem.Y[:, 0], problem.X, problem.patterns)
    np.testing.assert_array_equal(layer.patterns.numpy(), problem.patterns.numpy())


def test_a_layer_solve_is_optimal_only_where_certified_and_a_failed_backend_is_named():
    problem = small_problem(c=1, lam=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = solve(problem, "cvxpylayers", solver_args={"solve_method": "Clarabel", "max_iter": 2})
        solution = solve(problem, "cvxpylayers")
    optimum = reference(problem, 0)
    assert stopped.value > optimum * (1 + 1e-3)  # two iterations are far from the optimum: not "optimal"
    for result in (stopped, solution):
        assert result.dual_value <= optimum * (1 + 1e-9)  # hcl's certificate, μ = 0: valid, weak with cones
        assert result.status == "optimal_inaccurate"
    with pytest.raises(ConvexSolveError, match="cvxpylayers"):
        solve(problem, "cvxpylayers", solver_args={"solve_method": "ECOS", "max_iters": 2})


def test_at_lambda_0_no_layer_solve_is_optimal_and_tiny_targets_are_solved_in_their_own_scale():
    """λ = 0: Clarabel stopped after one iteration (or found the problem infeasible) and the point read "optimal";
    targets of scale 1e-6 were solved to the backend's absolute tolerance, 13.5 times the optimum."""
    problem = small_problem(c=1, lam=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = solve(problem, "cvxpylayers", solver_args={"solve_method": "Clarabel", "max_iter": 1})
        assert stopped.status == solve(problem, "cvxpylayers").status == "optimal_inaccurate"
        for unit in (1e-6, 1e6):
            tiny = ConvexProblem(problem.X, problem.Y * unit, problem.patterns, weight_decay=0.05 * unit,
                                 output_bias=True)
            assert solve(tiny, "cvxpylayers").value == pytest.approx(reference(tiny, 0), rel=2e-6)
    layer = FixedPatternLayer.from_problem(problem, data_as_parameters=True)
    with pytest.raises(ValueError, match="batch ≥ 1"):
        layer(torch.zeros(0, problem.n, dtype=torch.float64), problem.X, problem.patterns)
    with pytest.raises(ValueError, match="X contains NaN"):
        layer(problem.Y[:, 0], problem.X * math.nan, problem.patterns)
    with pytest.raises(ValueError, match="patterns must be 0 or 1"):
        layer(problem.Y[:, 0], problem.X, problem.patterns * 0.5)
    with pytest.raises(TypeError, match="solver_args must be a dict"):
        FixedPatternLayer.from_problem(problem, solver_args="Clarabel")
