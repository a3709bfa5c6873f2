"""The global dual certificate: valid below the all-patterns optimum, tight at it."""

from __future__ import annotations

import math

import pytest
import torch

from hcl.convex.build import problem_from_network
from hcl.convex.certificate import best_scaled_bound, global_lower_bound, max_abs_relu_correlation
from hcl.convex.cvxpy_solver import solve_cvxpy
from hcl.convex.problem import ConvexProblem, fold_bias, fold_weights, network_objective
from hcl.enumeration import enumerate_patterns
from hcl.patterns import sample_patterns


def instance(seed: int, n: int = 12, d: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.cos(3 * X.sum(1)) + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def trained_network(X, y, lam, reduction, output_bias, seed, width=12, steps=200):
    g = torch.Generator().manual_seed(seed)
    params = {
        "W": torch.randn(width, X.shape[1], generator=g, dtype=torch.float64),
        "b": torch.randn(width, generator=g, dtype=torch.float64),
        "A": torch.randn(1, width, generator=g, dtype=torch.float64) * 0.3,
    }
    if output_bias:
        params["b0"] = torch.zeros(1, dtype=torch.float64)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=0.03)
    Xf = fold_bias(X, True)

    def objective():
        Wf = fold_weights(params["W"], params["b"])
        return network_objective(Xf, y, Wf, params["A"], params.get("b0"), lam, reduction)

    for _ in range(steps):
        optimizer.zero_grad()
        objective().backward()
        optimizer.step()
    with torch.no_grad():
        Wf = fold_weights(params["W"], params["b"])
        prediction = torch.relu(Xf @ Wf.T) @ params["A"].T + params.get("b0", 0.0)
        return {k: v.detach() for k, v in params.items()}, prediction.reshape(-1), float(objective())


def all_patterns_optimum(X, y, lam, reduction, output_bias):
    Xf = fold_bias(X, True)
    problem = ConvexProblem(Xf, y, enumerate_patterns(Xf), lam, reduction, output_bias)
    return problem, solve_cvxpy(problem, "CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10)


def test_exact_m_matches_a_dense_sweep_of_the_circle():
    theta = torch.linspace(0, 2 * math.pi, 200001, dtype=torch.float64)
    circle = torch.stack([theta.cos(), theta.sin()], dim=1)
    g = torch.Generator().manual_seed(0)
    for n, ties in [(3, False), (25, False), (25, True), (80, False)]:
        X = torch.randn(n, 2, generator=g, dtype=torch.float64)
        if ties:  # repeated points, opposite points and a zero row
            X[5], X[6], X[7] = X[4], -X[4], 0.0
        nu = torch.randn(n, generator=g, dtype=torch.float64)
        exact = max_abs_relu_correlation(X, nu)
        dense = float((torch.relu(circle @ X.T) @ nu).abs().max())
        assert dense <= exact + 1e-12
        assert exact <= dense * (1 + 1e-4)  # the sweep misses a kink by up to its step
    # a few points, whose maximum often lies inside an arc along −g rather than +g (or at a breakpoint)
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        n = 2 + seed % 5
        X = torch.randn(n, 2, generator=g, dtype=torch.float64)
        nu = torch.randn(n, generator=g, dtype=torch.float64)
        exact = max_abs_relu_correlation(X, nu)
        dense = float((torch.relu(circle @ X.T) @ nu).abs().max())
        assert dense <= exact + 1e-12, seed
        assert exact <= dense * (1 + 1e-4), seed


@pytest.mark.parametrize("shift", [0.5, -0.5, 0.0])
def test_the_spectral_m_bounds_the_exact_one_for_residuals_of_one_sign(shift):
    """A prediction above (below) every target gives ν ≥ 0 (≤ 0): the spectral M must still bound the exact one, and
    its bound lie below the exact bound (shift 0: the targets' own signs)."""
    X, y = instance(7, n=40)
    prediction = y + shift if shift else torch.zeros_like(y)
    args = dict(weight_decay=0.05, reduction="mean", bias=True)
    exact = global_lower_bound(X, y, prediction, method="exact", **args)
    spectral = global_lower_bound(X, y, prediction, method="spectral", **args)
    assert exact.M > 0
    assert spectral.M >= exact.M * (1 - 1e-12)
    assert spectral.lower_bound <= exact.lower_bound + 1e-12


@pytest.mark.parametrize(
    "lam, reduction, output_bias",
    [(1e-3, "mean", False), (1e-1, "mean", True), pytest.param(3e-2, "sum", False, marks=pytest.mark.slow)],
)
def test_bound_below_all_patterns_optimum_below_trained_networks(lam, reduction, output_bias):
    X, y = instance(int(lam * 1000))
    problem, optimum = all_patterns_optimum(X, y, lam, reduction, output_bias)
    p_all = optimum.value
    for seed in (0, 1):
        params, prediction, L = trained_network(X, y, lam, reduction, output_bias, seed)
        assert p_all <= L + 1e-8
        certificate = global_lower_bound(
            X, y, prediction, weight_decay=lam, reduction=reduction, bias=True, output_bias=output_bias
        )
        assert certificate.method == "exact"
        assert certificate.lower_bound <= p_all + 1e-8
        # the scaled ν is dual feasible
        assert max_abs_relu_correlation(fold_bias(X, True), certificate.nu) <= 2 * lam * (1 + 1e-9)
        if output_bias:
            assert abs(float(certificate.nu.sum())) < 1e-10
        spectral = global_lower_bound(
            X,
            y,
            prediction,
            weight_decay=lam,
            reduction=reduction,
            bias=True,
            output_bias=output_bias,
            method="spectral",
        )
        assert spectral.M >= certificate.M - 1e-12
        assert spectral.lower_bound <= certificate.lower_bound + 1e-12

    # tight at the optimum's prediction
    prediction = problem.predict(optimum.U, optimum.V, optimum.b0).reshape(-1)
    certificate = global_lower_bound(
        X, y, prediction, weight_decay=lam, reduction=reduction, bias=True, output_bias=output_bias
    )
    assert certificate.lower_bound <= p_all + 1e-8
    assert certificate.lower_bound == pytest.approx(p_all, rel=1e-3)


def test_spectral_bound_is_valid_in_higher_dimension():
    lam, reduction = 0.05, "mean"
    X, y = instance(5, n=30, d=4)
    params, prediction, L = trained_network(X, y, lam, reduction, False, 0)
    certificate = global_lower_bound(X, y, prediction, weight_decay=lam, reduction=reduction, bias=True)
    assert certificate.method == "spectral" and certificate.lower_bound > 0
    # below p* of any pattern set (each is ≥ the all-patterns optimum), hence below L
    extra = sample_patterns(fold_bias(X, True), 60, generator=torch.Generator().manual_seed(0))
    problem, _ = problem_from_network(
        X,
        y,
        params["W"],
        params["b"],
        params["A"],
        None,
        weight_decay=lam,
        reduction=reduction,
        extra_patterns=extra,
    )
    assert certificate.lower_bound <= solve_cvxpy(problem).value + 1e-8 <= L + 2e-8
    with pytest.raises(ValueError, match="2 folded columns"):
        global_lower_bound(X, y, prediction, weight_decay=lam, reduction=reduction, bias=True, method="exact")


def test_zero_weight_decay_gives_the_trivial_bound():
    X, y = instance(2)
    certificate = global_lower_bound(X, y, torch.zeros_like(y), weight_decay=0.0, reduction="mean", bias=True)
    assert certificate.lower_bound == 0.0 and bool((certificate.nu == 0).all())
    # a perfect fit gives ν = 0: the bound is 0 too, for any λ
    perfect = global_lower_bound(X, y, y, weight_decay=0.1, reduction="sum", bias=True)
    assert perfect.lower_bound == 0.0


def test_bad_arguments_are_refused():
    X, y = instance(3)
    with pytest.raises(ValueError, match="method"):
        global_lower_bound(X, y, y, weight_decay=0.1, reduction="mean", bias=True, method="sampled")
    with pytest.raises(ValueError, match="scalar output"):
        global_lower_bound(X, torch.stack([y, y], 1), y, weight_decay=0.1, reduction="mean", bias=True)
    with pytest.raises(ValueError, match="weight_decay"):
        global_lower_bound(X, y, y, weight_decay=-1.0, reduction="mean", bias=True)
    # a NaN row dropped out of the exact maximum: a "certified" bound of the other points
    spoilt = X.clone()
    spoilt[0] = float("nan")
    for args, name in (((spoilt, y, y), "X"), ((X, y, y * float("inf")), "prediction")):
        for method in ("exact", "spectral"):
            with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
                global_lower_bound(*args, weight_decay=0.1, reduction="mean", bias=True, method=method)
    with pytest.raises(ValueError, match="n ≥ 1"):  # was a ZeroDivisionError
        global_lower_bound(X[:0], y[:0], y[:0], weight_decay=0.1, reduction="mean", bias=True)
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        global_lower_bound(X.numpy(), y, y, weight_decay=0.1, reduction="mean", bias=True)
    # what ConvexProblem refuses: λ of another type (a str was a bare comparison error, True λ = 1), a bias that is
    # not a bool ("no" read as True), and targets of two columns whose entries happen to number n
    for weight_decay, error in (("0.1", TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(error, match="weight_decay"):
            global_lower_bound(X, y, y, weight_decay=weight_decay, reduction="mean", bias=True)
    with pytest.raises(ValueError, match="bias and output_bias must be bools"):
        global_lower_bound(X, y, y, weight_decay=0.1, reduction="mean", bias="no")
    with pytest.raises(ValueError, match=r"y must have shape \(12,\) or \(12, 1\)"):
        global_lower_bound(X, y.reshape(6, 2), y, weight_decay=0.1, reduction="mean", bias=True)


@pytest.mark.parametrize("signed", [False, True])
def test_best_scaled_bound_is_the_maximum_over_the_feasible_scalings(signed):
    """The closed form shared by the global bound and the native certificate, against a dense grid of t."""
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        nu_y, quadratic = float(torch.randn(1, generator=g)), float(torch.rand(1, generator=g)) + 0.1
        limit = float(torch.rand(1, generator=g)) * 3
        bound, t = best_scaled_bound(nu_y, quadratic, limit, signed=signed)
        grid = torch.linspace(-limit if signed else 0.0, limit, 20001, dtype=torch.float64)
        values = -grid * nu_y - grid.square() * quadratic
        assert (-limit if signed else 0.0) <= t <= limit
        assert bound == pytest.approx(-t * nu_y - t * t * quadratic)
        assert float(values.max()) <= bound + 1e-12
        assert bound <= float(values.max()) + 1e-6
    assert best_scaled_bound(1.0, 0.0, 1.0) == (0.0, 0.0)  # ν = 0
    assert best_scaled_bound(-1.0, 0.25, math.inf) == (pytest.approx(1.0), pytest.approx(2.0))
