"""The convex engine's builders and certificates at their edges (``hcl.convex.build``, ``gated``, ``solution``,
``certificate``): extra patterns that repeat the network's, refusals of mismatched inputs, a coordinate equal to 1
that is no bias, gates through the origin, cone violations of either sign, a certificate summed over processes,
leftover columns at the tolerance, and the exact ``M`` on repeated points."""

from __future__ import annotations

import math

import pytest
import torch

from hcl.convex.build import problem_from_network


def _line_network():
    """1-D data with a bias: two live neurons with the patterns {x ≤ 0} and {x ≥ 0}."""
    X = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([2.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    W = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0], dtype=torch.float64)
    alpha = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    return X, y, W, b, alpha


ARGS = dict(weight_decay=1e-3, reduction="mean")


def test_extra_patterns_equal_to_the_networks_own_add_no_block():
    """Extra patterns that are the network's own patterns are duplicates: no block is added (not even for the last
    of the network's patterns)."""
    X, y, W, b, alpha = _line_network()
    plain, _ = problem_from_network(X, y, W, b, alpha, None, **ARGS)
    assert plain.num_patterns == 2
    extended, _ = problem_from_network(X, y, W, b, alpha, None, extra_patterns=plain.patterns.clone(), **ARGS)
    assert extended.num_patterns == 2
    assert torch.equal(extended.patterns, plain.patterns)
    new = torch.tensor([[1], [1], [1], [0]], dtype=torch.bool)
    more, _ = problem_from_network(X, y, W, b, alpha, None, extra_patterns=torch.cat([plain.patterns, new], 1), **ARGS)
    assert more.num_patterns == 3 and torch.equal(more.patterns[:, 2:], new)


def test_extra_patterns_are_refused_with_the_neurons_formulation():
    X, y, W, b, alpha = _line_network()
    extra = torch.tensor([[1], [1], [1], [0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="extra_patterns is only supported with formulation='patterns'"):
        problem_from_network(X, y, W, b, alpha, None, formulation="neurons", extra_patterns=extra, **ARGS)


def test_extra_patterns_must_be_boolean():
    X, y, W, b, alpha = _line_network()
    extra = torch.tensor([[1], [1], [1], [0]], dtype=torch.int64)
    with pytest.raises(TypeError, match="extra_patterns must be boolean"):
        problem_from_network(X, y, W, b, alpha, None, extra_patterns=extra, **ARGS)


def test_targets_with_more_columns_than_the_network_has_outputs_are_refused():
    X, y, W, b, alpha = _line_network()
    Y = torch.stack([y, -y], dim=1)  # two outputs for a one-output network
    with pytest.raises(ValueError, match="Y has 2 columns but output_weight has 1 rows"):
        problem_from_network(X, Y, W, b, alpha, None, **ARGS)


def test_a_data_column_holding_a_one_is_not_taken_for_the_bias_column():
    """Only a column of ones throughout is a bias: 5 points in general position in the plane have n² − n + 1 = 21
    patterns, whether or not one coordinate happens to be exactly 1."""
    from hcl.convex.build import all_patterns_problem

    x = torch.tensor([[1.0, 0.3], [-0.7, 0.2], [0.4, -1.3], [-0.2, -0.6], [0.9, 0.8]], dtype=torch.float64)
    y = torch.tensor([0.5, -0.2, 0.1, 0.3, -0.4], dtype=torch.float64)
    with_one = all_patterns_problem(x, y, bias=True, weight_decay=0.1, reduction="mean")
    scaled = all_patterns_problem(2 * x, y, bias=True, weight_decay=0.1, reduction="mean")
    assert with_one.num_patterns == scaled.num_patterns == 21


@pytest.mark.parametrize("points, expected", [
    (torch.arange(6, dtype=torch.float64).reshape(-1, 1), "n=6, d=2, P=11, c=1"),  # 2n − 1 on a line
    (torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5], [1.5, 1.5], [2.0, 3.0]] * 2, dtype=torch.float64),
     "n=10, d=3, P=21, c=1"),  # n² − n + 1 over the 5 distinct points in the plane
])
def test_the_memory_refusal_counts_the_most_patterns_the_distinct_points_can_have(points, expected):
    from hcl.convex.build import all_patterns_problem
    from hcl.convex.native.memory import SolverMemoryError

    with pytest.raises(SolverMemoryError, match=expected):
        all_patterns_problem(points, torch.zeros(points.shape[0], dtype=torch.float64), bias=True, weight_decay=0.1,
                             reduction="mean", memory_limit=1 << 20)


# --- hcl/convex/gated.py ---------------------------------------------------------------------------------------------

def _gated_instance(seed=0, n=12, d=2, P=4, c=1):
    from hcl.convex.gated import sample_gates

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    gates = sample_gates(d + 1, P, seed=seed, dtype=torch.float64)
    return X, Y, gates


def test_points_inside_the_cones_have_no_violation_and_points_outside_do():
    """U_i = a_i g_i (a_i > 0) lies in its cone (2D_i − I)X̃U_i ≥ 0 by construction; −g_i does not."""
    from hcl.convex.gated import certify, cone_violations, gate_mask
    from hcl.convex.problem import fold_bias

    X, Y, gates = _gated_instance()
    Xf = fold_bias(X, True)
    D = gate_mask(Xf, gates)
    inside = (gates * torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=torch.float64)).unsqueeze(-1)  # (d̃, P, 1)
    assert float(cone_violations(Xf, D, inside).max()) == 0.0
    assert float(cone_violations(Xf, D, -inside).max()) > 0.0
    args = dict(weight_decay=0.05, reduction="mean", bias=True)
    assert certify(X, Y, gates, inside, 0.5 * inside, **args).violation == 0.0
    assert certify(X, Y, gates, inside, -inside, **args).violation > 0.0


def test_gates_of_a_layer_without_a_bias_pass_through_the_origin():
    from hcl.convex.gated import gate_mask, gates_from_weights
    from hcl.convex.problem import fold_bias
    from hcl.patterns import activation_patterns

    X, _, _ = _gated_instance()
    W = torch.tensor([[1.0, -0.5], [0.2, 0.7], [-1.0, -1.0]], dtype=torch.float64)
    gates = gates_from_weights(W, None, folded_features=3)
    assert gates.shape == (3, 3) and torch.equal(gates[-1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(gate_mask(fold_bias(X, True), gates), activation_patterns(X, W, None))


def test_the_relu_certificates_objective_counts_both_sides_and_its_point_is_the_mapped_network():
    """The objective is the engine's (penalty of U and V), and inside the cones the mapped ReLU network predicts what
    the convex model does."""
    from hcl.convex import ConvexProblem
    from hcl.convex.gated import certify, gate_mask, relu_network_predict
    from hcl.convex.problem import fold_bias

    X, Y, gates = _gated_instance(seed=1)
    Xf = fold_bias(X, True)
    D = gate_mask(Xf, gates)
    U = (gates * torch.tensor([0.5, 1.0, 0.0, 0.3], dtype=torch.float64)).unsqueeze(-1)
    V = (gates * torch.tensor([0.0, 0.4, 0.8, 0.1], dtype=torch.float64)).unsqueeze(-1)
    problem = ConvexProblem(Xf, Y, D, weight_decay=0.05, reduction="mean")
    result = certify(X, Y, gates, U, V, weight_decay=0.05, reduction="mean", bias=True)
    Up, Vp = U.permute(1, 0, 2), V.permute(1, 0, 2)
    assert result.objective == pytest.approx(float(problem.objective(Up, Vp, None)), rel=1e-12)
    assert torch.allclose(relu_network_predict(Xf, U, V), problem.predict(Up, Vp, None), rtol=1e-12, atol=1e-12)


def test_a_certificate_over_processes_is_that_of_their_data_together():
    """Two processes holding the same data: the sums double, the largest violation does not."""
    from hcl.convex.gated import certify

    X, Y, gates = _gated_instance(seed=2)
    g = torch.Generator().manual_seed(3)
    U, V = (0.3 * torch.randn(3, 4, 1, generator=g, dtype=torch.float64) for _ in range(2))
    b0 = torch.tensor([0.2], dtype=torch.float64)
    args = dict(weight_decay=0.05, reduction="mean", bias=True, cone_penalty=0.5)
    together = certify(torch.cat([X, X]), torch.cat([Y, Y]), gates, U, V, b0, **args)
    reduced = certify(X, Y, gates, U, V, b0, all_reduce=lambda t, op: 2 * t if op == "sum" else t, **args)
    assert together.violation > 0 and reduced.violation == pytest.approx(together.violation, rel=1e-12)
    assert reduced.n == together.n == 2 * X.shape[0]
    assert reduced.objective == pytest.approx(together.objective, rel=1e-12)
    assert reduced.lower_bound == pytest.approx(together.lower_bound, rel=1e-10, abs=1e-14)


# --- hcl/convex/solution.py ------------------------------------------------------------------------------------------

def _solution(U, V, value=1.0, status="optimal", dual_value=None, gap_floor=0.0):
    from hcl.convex.solution import ConvexSolution

    return ConvexSolution(value=value, U=U, V=V, b0=torch.zeros(1, dtype=torch.float64), status=status,
                          solver="test", solve_seconds=0.0, dual_value=dual_value, gap_floor=gap_floor)


def test_a_column_at_the_tolerance_is_a_leftover_and_the_tolerance_is_relative_to_the_largest_column():
    """Neurons are the columns with a norm *above* rtol × the largest one."""
    U = torch.zeros(3, 2, 1, dtype=torch.float64)
    U[0, :, 0] = torch.tensor([2.0, 0.0])    # norm 2: the largest
    U[1, :, 0] = torch.tensor([0.0, 1.0])    # norm 1: exactly at rtol × 2 for rtol = 0.5
    U[2, :, 0] = torch.tensor([0.0, 0.25])   # norm 0.25
    solution = _solution(U, torch.zeros_like(U))
    assert solution.neuron_tol(0.5) == 1.0
    assert solution.active_neurons(rtol=0.5) == 1
    assert solution.active_neurons(rtol=0.1) == 3  # tol 0.2 < 0.25 < 1 < 2
    assert solution.neuron_tol(0.1) == pytest.approx(0.2)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_an_optimal_status_with_a_non_finite_value_is_not_ok(value):
    U = torch.zeros(1, 2, 1, dtype=torch.float64)
    assert _solution(U, U, value=1.0).ok
    assert not _solution(U, U, value=value).ok


# --- hcl/convex/certificate.py ---------------------------------------------------------------------------------------

def test_exact_m_with_repeated_points_matches_a_dense_sweep():
    """Repeated points share their breakpoints, so some arcs have zero length: g must still be carried from an arc
    of positive length (a reference arc of length 0 gave an M 8% too small: an invalid certificate)."""
    from hcl.convex.certificate import max_abs_relu_correlation

    theta = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    u = torch.stack([theta.cos(), theta.sin()], dim=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(6, 1, generator=g, dtype=torch.float64)
        X = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], dim=1)
        X = torch.cat([X, X])  # every point twice, with its own ν
        nu = torch.randn(12, generator=g, dtype=torch.float64)
        swept = float((torch.relu(u @ X.T) @ nu).abs().max())
        exact = max_abs_relu_correlation(X, nu)
        assert swept <= exact * (1 + 1e-12)
        assert exact == pytest.approx(swept, rel=1e-6)


@pytest.mark.parametrize("method", ["exact", "spectral"])
def test_an_overshooting_fit_certifies_as_much_as_its_mirror_image(method):
    """M bounds |νᵀ relu(X̃u)|, so −ν is as feasible as ν: the prediction 2y (ν = 2s·y) and 0 (ν = −2s·y) give the
    same, positive, bound (t < 0 for the first)."""
    from hcl.convex.certificate import global_lower_bound

    x = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64).reshape(-1, 1)
    y = torch.tensor([0.5, -0.3, 0.8, 0.1, -0.6, 0.4, 0.2], dtype=torch.float64)
    args = dict(weight_decay=0.5, reduction="mean", bias=True, method=method)
    below = global_lower_bound(x, y, torch.zeros_like(y), **args)
    above = global_lower_bound(x, y, 2 * y, **args)
    assert below.lower_bound > 0
    assert above.lower_bound == pytest.approx(below.lower_bound, rel=1e-12)
    assert torch.allclose(above.nu, below.nu, rtol=1e-12, atol=0)
