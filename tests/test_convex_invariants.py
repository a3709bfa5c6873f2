"""The invariants 1–5 of docs/convex.md on random instances, checked against an independent formulation.

The reference below is written independently of ``hcl.convex.cvxpy_solver``: one cvxpy variable per
(pattern, sign) and explicit diagonal matrices, looping over patterns.
"""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import pytest
import torch

from hcl.convex.build import problem_from_network
from hcl.convex.cvxpy_solver import solve_cvxpy
from hcl.convex.problem import ConvexProblem, fold_bias, fold_weights, network_objective
from hcl.enumeration import enumerate_patterns
from hcl.patterns import activation_patterns, sample_patterns


def reference_optimum(problem: ConvexProblem) -> float:
    """``p*`` of the scalar-output problem of docs/convex.md (signs, output bias), by a loop over patterns."""
    assert problem.c == 1
    X, y = problem.X.numpy(), problem.Y.numpy()[:, 0]
    n = X.shape[0]
    signs = [0] * problem.num_patterns if problem.signs is None else problem.signs.tolist()
    fit, norms, constraints = np.zeros(n), [], []
    for i, pattern in enumerate(problem.patterns.T.numpy()):
        for sign, allowed in ((1, signs[i] >= 0), (-1, signs[i] <= 0)):
            if allowed:
                w = cp.Variable(X.shape[1])
                constraints.append(np.diag(2.0 * pattern - 1.0) @ X @ w >= 0)
                fit = fit + sign * (np.diag(pattern * 1.0) @ X @ w)
                norms.append(cp.norm(w, 2))
    if problem.output_bias:
        fit = fit + cp.Variable()
    objective = problem.scale * cp.sum_squares(fit - y) + 2 * problem.weight_decay * sum(norms)
    reference = cp.Problem(cp.Minimize(objective), constraints)
    reference.solve(solver="CLARABEL")
    assert reference.status == cp.OPTIMAL
    return float(reference.value)


def random_network(seed, n, d, m, c=1, hidden_bias=True, output_bias=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64) + 0.3
    W = scale * torch.randn(m, d, generator=g, dtype=torch.float64)
    b = scale * torch.randn(m, generator=g, dtype=torch.float64) if hidden_bias else None
    A = scale * torch.randn(c, m, generator=g, dtype=torch.float64)
    b0 = torch.randn(c, generator=g, dtype=torch.float64) if output_bias else None
    return X, Y, W, b, A, b0


def objective_of(X, Y, W, b, A, b0, lam, reduction):
    Xf = fold_bias(X, b is not None)
    return float(network_objective(Xf, Y, fold_weights(W, b), A, b0, lam, reduction))


def train(X, Y, W, b, A, b0, lam, reduction, steps=200, lr=0.03):
    """A few hundred Adam steps on the network's own objective ``L``; returns the trained weights."""
    params = [t.clone().requires_grad_(True) for t in (W, b, A, b0) if t is not None]
    names = [k for k, t in zip("W b A b0".split(), (W, b, A, b0)) if t is not None]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        p = dict(zip(names, params))
        Xf = fold_bias(X, "b" in p)
        loss = network_objective(Xf, Y, fold_weights(p["W"], p.get("b")), p["A"], p.get("b0"), lam, reduction)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    p = {k: v.detach() for k, v in zip(names, params)}
    return p["W"], p.get("b"), p["A"], p.get("b0")


# Random instances: λ ∈ {0, 1e-3, 1e-1}, both reductions, with and without each bias.
SETTINGS = [
    (lam, reduction, hidden_bias, output_bias)
    for (lam, reduction), (hidden_bias, output_bias) in zip(
        itertools.product([0.0, 1e-3, 1e-1], ["mean", "sum"]),
        itertools.cycle([(True, False), (False, True), (True, True), (False, False)]),
    )
]


# ------------------------------------------------------------------------------------------ invariant 1
@pytest.mark.parametrize("lam, reduction, hidden_bias, output_bias", SETTINGS)
def test_network_point_is_feasible_and_bounds_the_optimum(lam, reduction, hidden_bias, output_bias):
    X, Y, W, b, A, b0 = random_network(int(lam * 1e3) + len(reduction), 40, 5, 8, 1, hidden_bias, output_bias)
    L = objective_of(X, Y, W, b, A, b0, lam, reduction)
    problem, (U, V, c0) = problem_from_network(X, Y, W, b, A, b0, weight_decay=lam, reduction=reduction)
    assert problem.d == 5 + hidden_bias and problem.output_bias == output_bias
    assert float(problem.violation(U, V)) <= 1e-12
    Xf = fold_bias(X, hidden_bias)
    output = torch.relu(Xf @ fold_weights(W, b).T) @ A.T + (0 if b0 is None else b0)
    assert torch.allclose(problem.predict(U, V, c0), output, rtol=1e-12, atol=1e-12)
    network_penalty = lam * (fold_weights(W, b).square().sum() + A.square().sum())
    assert float(problem.penalty(U, V)) <= float(network_penalty) + 1e-12
    assert float(problem.objective(U, V, c0)) <= L + 1e-12

    p_star = solve_cvxpy(problem).value
    assert p_star == pytest.approx(reference_optimum(problem), rel=1e-5, abs=1e-8)
    assert p_star <= L + 1e-8
    # the per-neuron formulation (one signed block per neuron) lies between p*(patterns) and L
    per_neuron, point = problem_from_network(
        X, Y, W, b, A, b0, weight_decay=lam, reduction=reduction, formulation="neurons"
    )
    assert float(per_neuron.objective(*point)) == pytest.approx(float(problem.objective(U, V, c0)), abs=1e-12)
    p_neurons = solve_cvxpy(per_neuron).value
    assert p_neurons == pytest.approx(reference_optimum(per_neuron), rel=1e-5, abs=1e-8)
    assert p_star - 1e-8 <= p_neurons <= L + 1e-8


# ------------------------------------------------------------------------------------------ invariant 2
@pytest.mark.parametrize("lam, reduction, hidden_bias, output_bias", SETTINGS[1::2])
def test_convex_to_network_reproduces_the_objective(lam, reduction, hidden_bias, output_bias):
    X, Y, W, b, A, b0 = random_network(11, 30, 4, 6, 1, hidden_bias, output_bias)
    extra = sample_patterns(fold_bias(X, hidden_bias), 10, generator=torch.Generator().manual_seed(0))
    problem, (U, V, c0) = problem_from_network(
        X, Y, W, b, A, b0, weight_decay=lam, reduction=reduction, extra_patterns=extra
    )
    g = torch.Generator().manual_seed(1)
    scales = torch.rand(problem.num_patterns, 1, 1, generator=g, dtype=torch.float64) * 3
    optimum = solve_cvxpy(problem, "ECOS")
    for point in [(U, V, c0), (U * scales, V, c0), (optimum.U, optimum.V, optimum.b0)]:
        hidden, output, bias = problem.to_network(*point)
        mapped = network_objective(problem.X, problem.Y, hidden, output, bias, lam, reduction)
        tolerance = 1e-10 if point[0] is not optimum.U else 1e-6  # the optimum is feasible to ~1e-9 only
        assert float(mapped) == pytest.approx(float(problem.objective(*point)), rel=tolerance, abs=tolerance)
        assert hidden.shape[0] <= 2 * problem.num_patterns


@pytest.mark.parametrize("one_vs_all", [True, False])
def test_vector_output_maps_and_bounds(one_vs_all):
    lam, reduction = 0.05, "mean"
    X, Y, W, b, A, b0 = random_network(5, 30, 3, 6, c=3, output_bias=True)
    W, b, A, b0 = train(X, Y, W, b, A, b0, lam, reduction)
    L = objective_of(X, Y, W, b, A, b0, lam, reduction)
    problem, point = problem_from_network(
        X, Y, W, b, A, b0, weight_decay=lam, reduction=reduction, one_vs_all=one_vs_all
    )
    assert problem.is_bound != one_vs_all
    solution = solve_cvxpy(problem)
    mapped = network_objective(
        problem.X, problem.Y, *problem.to_network(solution.U, solution.V, solution.b0), lam, reduction
    )
    if one_vs_all:
        # exact for the block-diagonal (one-vs-all) network it maps to
        assert float(mapped) == pytest.approx(solution.value, rel=1e-6)
    else:
        # a lower bound on every shared-layer network with these patterns, the network itself included
        assert float(problem.objective(*point)) <= L + 1e-12
        assert solution.value <= L + 1e-8
        assert float(mapped) >= solution.value - 1e-8
        ova = ConvexProblem(problem.X, problem.Y, problem.patterns, lam, reduction, True, one_vs_all=True)
        assert solution.value <= solve_cvxpy(ova).value + 1e-8


# ------------------------------------------------------------------------------------------ invariant 3
@pytest.mark.parametrize("lam, reduction, hidden_bias, output_bias", SETTINGS[::3])
def test_adding_patterns_never_increases_the_optimum(lam, reduction, hidden_bias, output_bias):
    X, Y, W, b, A, b0 = random_network(21, 40, 4, 5, 1, hidden_bias, output_bias)
    Xf = fold_bias(X, hidden_bias)
    generator = torch.Generator().manual_seed(2)
    extra = torch.zeros(40, 0, dtype=torch.bool)
    values = []
    for _ in range(3):
        problem, _ = problem_from_network(
            X, Y, W, b, A, b0, weight_decay=lam, reduction=reduction, extra_patterns=extra
        )
        values.append(solve_cvxpy(problem).value)
        extra = torch.cat([extra, sample_patterns(Xf, 6, generator=generator)], dim=1)
    assert problem.num_patterns > 5
    assert values[-1] == pytest.approx(reference_optimum(problem), rel=1e-5, abs=1e-8)
    assert all(later <= earlier + 1e-8 for earlier, later in itertools.pairwise(values))


# ------------------------------------------------------------------------------------------ invariant 4
@pytest.mark.parametrize(
    "dim, lam, reduction, output_bias",
    [(1, 1e-3, "mean", False), (1, 1e-1, "sum", True), pytest.param(2, 1e-2, "mean", True, marks=pytest.mark.slow),
     pytest.param(2, 1e-1, "sum", False, marks=pytest.mark.slow)],
)
def test_all_patterns_give_the_global_minimum(dim, lam, reduction, output_bias):
    n = 10 if dim == 1 else 9
    g = torch.Generator().manual_seed(dim * 7 + output_bias)
    X = torch.rand(n, dim, generator=g, dtype=torch.float64) * 2 - 1
    Y = torch.sin(3 * X.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    patterns = enumerate_patterns(fold_bias(X, True))
    problem = ConvexProblem(fold_bias(X, True), Y, patterns, lam, reduction, output_bias)
    p_all = solve_cvxpy(problem).value
    assert p_all == pytest.approx(reference_optimum(problem), rel=1e-5, abs=1e-8)
    # the optimum is attained by a network (at most 2P neurons)
    optimum = solve_cvxpy(problem, "ECOS")
    mapped = network_objective(
        problem.X, problem.Y, *problem.to_network(optimum.U, optimum.V, optimum.b0), lam, reduction
    )
    assert float(mapped) == pytest.approx(p_all, rel=1e-5, abs=1e-8)
    for seed, width in [(0, 4), (1, 24)]:
        _, _, W, b, A, b0 = random_network(seed, n, dim, width, output_bias=output_bias, scale=0.7)
        W, b, A, b0 = train(X, Y, W, b, A, b0, lam, reduction)
        L = objective_of(X, Y, W, b, A, b0, lam, reduction)
        assert L >= p_all - 1e-8
        # and the network's own patterns give a value in between
        own, _ = problem_from_network(X, Y, W, b, A, b0, weight_decay=lam, reduction=reduction)
        assert p_all - 1e-8 <= solve_cvxpy(own).value <= L + 1e-8


# ------------------------------------------------------------------------------------------ invariant 5
@pytest.mark.parametrize("second_sign", [1.0, -1.0])
def test_merging_neurons_with_one_pattern_keeps_output_and_lowers_penalty(second_sign):
    lam = 0.1
    X, Y, W, b, A, _ = random_network(31, 30, 4, 3, 1)
    Xf, Wf = fold_bias(X, True), fold_weights(W, b)
    # neuron 1 := neuron 0 moved inside its cone (same pattern, different direction)
    r = torch.randn(Wf.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    epsilon = 0.5 * float((Xf @ Wf[0]).abs().min() / (Xf @ r).abs().max())
    Wf = Wf.clone()
    Wf[1] = 2.0 * Wf[0] + epsilon * r
    A = A.clone()
    A[0, 1] = second_sign * A[0, 0].abs() * 1.5
    A[0, 0] = A[0, 0].abs()
    W, b = Wf[:, :-1], Wf[:, -1]
    D = activation_patterns(Xf, Wf)
    assert torch.equal(D[:, 0], D[:, 1]) and not torch.allclose(Wf[0] / Wf[0].norm(), Wf[1] / Wf[1].norm())

    merged, merged_point = problem_from_network(X, Y, W, b, A, None, weight_decay=lam, reduction="mean")
    separate, separate_point = problem_from_network(
        X, Y, W, b, A, None, weight_decay=lam, reduction="mean", formulation="neurons"
    )
    assert merged.num_patterns == 2 and separate.num_patterns == 3
    output = torch.relu(Xf @ Wf.T) @ A.T
    assert torch.allclose(merged.predict(*merged_point), output, atol=1e-12)
    assert torch.allclose(separate.predict(*separate_point), output, atol=1e-12)
    assert float(merged.penalty(*merged_point[:2])) <= float(separate.penalty(*separate_point[:2])) + 1e-12
    if second_sign > 0:  # two non-parallel vectors of one sign: the triangle inequality is strict
        assert float(merged.penalty(*merged_point[:2])) < float(separate.penalty(*separate_point[:2])) - 1e-10
    # the merged point maps back to a network with the same output and objective
    hidden, out_weight, _ = merged.to_network(*merged_point)
    assert torch.allclose(torch.relu(Xf @ hidden.T) @ out_weight.T, output, atol=1e-12)
    assert float(network_objective(Xf, Y, hidden, out_weight, None, lam, "mean")) == pytest.approx(
        float(merged.objective(*merged_point)), rel=1e-12
    )


# ---------------------------------------------------------------------- experiment (c) of docs/experiments.md
def test_seed_experiment_c_setting_at_step_zero():
    """Experiment (c) of docs/experiments.md: the per-neuron problem gives ≈ 0.10 at step 0, the exact one ≈ 0."""
    torch.manual_seed(0)
    n, d, m, init = 100, 10, 20, 1e-3
    X = torch.randn(n, d, dtype=torch.float64)
    beta = torch.randn(d, dtype=torch.float64)
    y = X @ (beta / beta.norm())
    W = torch.randn(m, d, dtype=torch.float64) / d**0.5 * init
    A = torch.randn(1, m, dtype=torch.float64) / m**0.5 * init
    assert float(network_objective(X, y, W, A, None, 0.0, "mean")) == pytest.approx(1.256, abs=1e-3)
    per_neuron, _ = problem_from_network(
        X, y, W, None, A, None, weight_decay=0.0, reduction="mean", formulation="neurons"
    )
    exact, _ = problem_from_network(X, y, W, None, A, None, weight_decay=0.0, reduction="mean")
    assert per_neuron.num_patterns == exact.num_patterns == 20
    assert solve_cvxpy(per_neuron).value == pytest.approx(0.1012, abs=5e-4)
    assert solve_cvxpy(exact).value < 1e-6


def test_the_network_objective_is_summed_a_block_of_rows_at_a_time(monkeypatch):
    """``L`` is taken over blocks of rows (the ``(n, m)`` hidden outputs of a large set are GBs), with the value of the
    whole product and its gradient."""
    import hcl.convex.problem as problem_module

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 2, generator=g, dtype=torch.float64)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    A, b = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    whole = 0.1 * (W.square().sum() + A.square().sum()) + (torch.relu(X @ W.T) @ A.T + b - Y).square().sum() / 50
    monkeypatch.setattr(problem_module, "SAMPLE_BYTES", 6 * 8 * 7)  # blocks of 7 rows
    blocks = network_objective(X, Y, W, A, b, 0.1, "mean")
    assert float(blocks) == pytest.approx(float(whole), rel=1e-14)
    assert torch.allclose(torch.autograd.grad(blocks, W)[0], torch.autograd.grad(whole, W)[0], rtol=1e-12)


def test_a_point_is_evaluated_a_block_of_rows_at_a_time(monkeypatch):
    """Prediction and violation are taken over blocks of samples (the ``(n, P, c)`` block outputs of a large set are
    GBs), with the values of the whole products, signed blocks included."""
    import hcl.convex.problem as problem_module

    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(53, 4, generator=g, dtype=torch.float64), torch.randn(53, 3, generator=g, dtype=torch.float64)
    problem = ConvexProblem(X=X, Y=Y, patterns=torch.rand(53, 5, generator=g) > 0.5, weight_decay=0.1,
                            reduction="mean", output_bias=True, signs=torch.tensor([1, -1, 0, 1, 0]))
    U, V = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64)
    b0 = torch.randn(3, generator=g, dtype=torch.float64)
    Z = torch.einsum("nd,pdc->npc", X, U - V)
    whole = (Z * problem.patterns.unsqueeze(-1)).sum(1) + b0
    S = (2.0 * problem.patterns.double() - 1.0).unsqueeze(-1)
    cones = max(float(torch.relu(-S * torch.einsum("nd,pdc->npc", X, W)).amax()) for W in (U, V))
    signs = max(float(U[1].abs().amax()), float(V[0].abs().amax()), float(V[3].abs().amax())) * float(X.abs().amax())
    monkeypatch.setattr(problem_module, "SAMPLE_BYTES", 5 * 3 * 8 * 7)  # blocks of 7 samples, the last one of 4
    assert len(problem._row_blocks()) == 8
    assert torch.allclose(problem.predict(U, V, b0), whole, rtol=1e-14, atol=1e-14)
    assert float(problem.violation(U, V)) == pytest.approx(max(cones, signs), rel=1e-14)


def test_the_built_problem_keeps_every_live_pattern_and_new_extra_pattern_and_no_dead_one():
    """One block per distinct live pattern plus every extra pattern not among them; a dead neuron (all-zero pattern)
    has none; in the per-neuron formulation an output weight of exactly 0 counts as +1."""
    X = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([2.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    W = torch.tensor([[-1.0], [1.0], [-1.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, -10.0], dtype=torch.float64)  # neuron 2 is dead on this data
    alpha = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)  # neuron 0's output weight is exactly 0
    args = dict(weight_decay=1e-3, reduction="mean")
    problem, _ = problem_from_network(X, y, W, b, alpha, None, **args)
    assert problem.num_patterns == 2 and bool(problem.patterns.any(0).all())
    neurons, _ = problem_from_network(X, y, W, b, alpha, None, formulation="neurons", **args)
    assert neurons.signs.tolist() == [1, 1]
    extra = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)  # the second is neuron 1's own
    extended, _ = problem_from_network(X, y, W[1:2], b[1:2], alpha[:, 1:2], None, extra_patterns=extra, **args)
    columns = set(map(tuple, extended.patterns.T.tolist()))
    assert columns == {(True, True, False, False), (False, False, True, True)}
