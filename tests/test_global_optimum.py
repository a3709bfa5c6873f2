"""GlobalOptimumMonitor: the all-patterns optimum against an independent formulation, and L ≥ p*_all in training."""

from __future__ import annotations

import dataclasses
import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from _events import read_scalars
from _reference import reference_solve

from hcl import TwoLayerReLU, dashboard
from hcl.callbacks.convex_gap import ConvexGapMonitor
from hcl.callbacks.global_optimum import GlobalOptimumMonitor
from hcl.convex import Status, solve
from hcl.convex.build import all_patterns_problem
from hcl.convex.problem import fold_bias, network_objective
from hcl.datamodules import SyntheticRegression


def _sampled_patterns(Xf: np.ndarray, rng: np.random.Generator, draws: int = 200_000) -> np.ndarray:
    """Every nonzero pattern 1[X̃u ≥ 0] of generic data, found by brute force over random directions u."""
    U = rng.standard_normal((Xf.shape[1], draws))
    D = Xf @ U >= 0
    D = np.unique(D.T, axis=0).T
    return D[:, D.any(axis=0)]


def _independent_optimum(Xf: np.ndarray, y: np.ndarray, D: np.ndarray, lam: float, reduction: str) -> float:
    """The all-patterns problem of docs/convex.md written out pattern by pattern in cvxpy."""
    n, d = Xf.shape
    s = 1.0 if reduction == "sum" else 1.0 / n
    us = [cp.Variable(d) for _ in range(D.shape[1])]
    vs = [cp.Variable(d) for _ in range(D.shape[1])]
    prediction, constraints, penalty = 0, [], 0
    for i in range(D.shape[1]):
        Di = D[:, i].astype(float)
        prediction = prediction + cp.multiply(Di, Xf @ (us[i] - vs[i]))
        sign = 2 * Di - 1
        constraints += [cp.multiply(sign, Xf @ us[i]) >= 0, cp.multiply(sign, Xf @ vs[i]) >= 0]
        penalty = penalty + cp.norm(us[i], 2) + cp.norm(vs[i], 2)
    problem = cp.Problem(cp.Minimize(s * cp.sum_squares(prediction - y) + 2 * lam * penalty), constraints)
    problem.solve(solver="CLARABEL")
    return float(problem.value)


@pytest.mark.parametrize("lam,reduction,dim,n", [
    (0.05, "mean", 1, 7), (0.01, "sum", 2, 6),
    pytest.param(0.0, "mean", 1, 7, marks=pytest.mark.slow), pytest.param(0.05, "mean", 2, 6, marks=pytest.mark.slow),
    pytest.param(0.01, "sum", 1, 7, marks=pytest.mark.slow), pytest.param(0.0, "mean", 2, 6, marks=pytest.mark.slow),
])
def test_all_patterns_optimum_matches_an_independent_formulation(dim, n, lam, reduction):
    rng = np.random.default_rng(10 * dim + n)
    X = rng.uniform(-1, 1, size=(n, dim))
    y = rng.standard_normal(n)
    problem = all_patterns_problem(torch.from_numpy(X), torch.from_numpy(y), bias=True, weight_decay=lam,
                                   reduction=reduction)
    D = _sampled_patterns(fold_bias(torch.from_numpy(X), True).numpy(), rng)
    # Generic data: 2n − 1 nonzero patterns in 1-D, n² − n + 1 in 2-D; brute force and enumeration agree.
    expected = 2 * n - 1 if dim == 1 else n * n - n + 1
    assert problem.num_patterns == D.shape[1] == expected
    mine = {tuple(col) for col in problem.patterns.T.tolist()}
    assert mine == {tuple(col) for col in D.T.tolist()}

    value = solve(problem, "clarabel").value
    reference = _independent_optimum(problem.X.numpy(), y, D, lam, reduction)
    assert value == pytest.approx(reference, rel=1e-5, abs=1e-7)


def test_no_network_beats_the_global_optimum_and_the_mapped_solution_attains_it():
    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.uniform(-1, 1, size=(8, 2)))
    y = torch.from_numpy(np.sin(3 * X[:, 0].numpy()) + X[:, 1].numpy() ** 2)
    lam = 0.02
    problem = all_patterns_problem(X, y, bias=True, weight_decay=lam, reduction="mean")
    solution = solve(problem, "clarabel")
    p_star = solution.value
    assert p_star > 0.01  # λ > 0 and a nonlinear target: a meaningful bound

    Xf = fold_bias(X, True)
    W, A, _ = problem.to_network(solution.U, solution.V)
    optimum = float(network_objective(Xf, y, W, A, None, lam, "mean"))
    assert optimum == pytest.approx(p_star, rel=1e-6)  # invariant 2 of docs/convex.md
    generator = torch.Generator().manual_seed(0)
    for width in (1, 3, 10, 40):
        for scale in (0.1, 0.5, 1.5):
            W = scale * torch.randn(width, 3, generator=generator, dtype=torch.float64)
            A = scale * torch.randn(1, width, generator=generator, dtype=torch.float64)
            assert float(network_objective(Xf, y, W, A, None, lam, "mean")) >= p_star * (1 - 1e-7)
    # Small moves around the mapped optimum never go below it either.
    W0, A0, _ = problem.to_network(solution.U, solution.V)
    for _ in range(20):
        W = W0 + 1e-3 * torch.randn(W0.shape, generator=generator, dtype=torch.float64)
        A = A0 + 1e-3 * torch.randn(A0.shape, generator=generator, dtype=torch.float64)
        assert float(network_objective(Xf, y, W, A, None, lam, "mean")) >= p_star * (1 - 1e-7)


def test_first_layer_bias_and_data_column_of_ones_give_the_same_optimum():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(6, 1)))
    y = torch.from_numpy(rng.standard_normal(6))
    ones = torch.ones(6, 1, dtype=torch.float64)
    values = []
    for X, bias in ((x, True), (torch.cat([x, ones], 1), False), (torch.cat([ones, x], 1), False)):
        problem = all_patterns_problem(X, y, bias=bias, weight_decay=0.03, reduction="mean")
        assert problem.num_patterns == 11
        values.append(solve(problem, "clarabel").value)
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    assert values[2] == pytest.approx(values[0], rel=1e-6)


@pytest.mark.parametrize("columns, bias", [(1, True), (2, True), (2, False)])
def test_points_that_are_all_ones_have_the_one_pattern_of_identical_points(columns, bias):
    # such a column was all taken for the bias, leaving "0 input columns" and a refusal; points at x = 2 were solved
    y = torch.tensor([0.3, -0.5, 1.2], dtype=torch.float64)
    problem = all_patterns_problem(torch.ones(3, columns, dtype=torch.float64), y, bias=bias, weight_decay=0.1,
                                   reduction="sum")
    assert problem.patterns.shape == (3, 1) and bool(problem.patterns.all())
    assert solve(problem, "clarabel").value == pytest.approx(reference_solve(problem).value, rel=1e-6)


def test_data_without_bias_or_in_three_dimensions_is_refused():
    X = torch.randn(5, 2, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a bias"):
        all_patterns_problem(X, y, bias=False, weight_decay=0.0, reduction="mean")
    with pytest.raises(ValueError, match="1-D or 2-D data.*3 input columns"):
        all_patterns_problem(torch.randn(5, 3, dtype=torch.float64), y, bias=True, weight_decay=0.0,
                             reduction="mean")


def _points_data(n=6, seed=0, append_ones=True):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-1, 1, n))
    y = np.abs(x) + 0.3 * x  # a kink: one neuron is not enough
    return SyntheticRegression(kind="points", x=x.tolist(), y=y.tolist(), append_ones=append_ones, dtype="float64")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.slow
def test_objective_never_goes_below_the_global_optimum_during_training(tmp_path, make_trainer, bias):
    """Invariant 4 in a real run, read back from the event file; λ > 0 so that p*_all > 0."""
    torch.manual_seed(0)
    data = _points_data(append_ones=not bias)
    model = TwoLayerReLU(in_features=1 if bias else 2, hidden=20, bias=bias, weight_decay=1e-3, lr=0.3,
                         init="normal", init_scale=0.5)
    monitor = GlobalOptimumMonitor(every_n_steps=2)
    make_trainer([monitor], max_steps=40).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    p_star = monitor.optimum
    assert p_star > 1e-4
    assert monitor.num_patterns == 11
    for tag in ("global_optimum", "global_lower_bound", "global_upper_bound", "global_gap", "global_max_gap"):
        assert [step for step, _ in s[f"convex/{tag}"]] == list(range(0, 40, 2)), tag
    assert all(v == pytest.approx(p_star, rel=1e-6) for _, v in s["convex/global_optimum"])
    lower, upper = monitor.lower_bound, monitor.upper_bound  # (event files store float32)
    assert s["convex/global_lower_bound"][0][1] == pytest.approx(lower, rel=1e-6)
    assert s["convex/global_upper_bound"][0][1] == pytest.approx(upper, rel=1e-6)
    assert lower <= p_star <= upper and upper - lower <= 1e-6 * p_star  # a certified, tight bracket
    train, gap, max_gap = dict(s["train/objective"]), dict(s["convex/global_gap"]), dict(s["convex/global_max_gap"])
    assert len(train) == 40
    assert all(L >= lower for L in train.values())
    for step, g in gap.items():
        # The monitor measures the weights the training step uses: its gap is the model's own L − p*.
        assert g == pytest.approx(train[step] - p_star, rel=1e-5, abs=1e-9)
        assert max_gap[step] == pytest.approx(train[step] - lower, rel=1e-5, abs=1e-9) and max_gap[step] >= 0
    assert train[39] < train[0]  # training made progress, so the check covered a range of L


def test_an_all_patterns_problem_that_does_not_fit_in_memory_stops_with_one_message(make_trainer):
    model = TwoLayerReLU(in_features=2, hidden=4, bias=False, weight_decay=1e-3)
    # a budget the native solver's least estimate fits (so the patterns are enumerated) and Clarabel's does not
    monitor = GlobalOptimumMonitor(solver="clarabel", solver_options={"memory_limit": 67_300_000})
    with pytest.raises(ValueError, match=r"GlobalOptimumMonitor: the all-patterns problem \(11 patterns\) was not "
                                         r"solved: clarabel needs about 64.* more than the memory budget of 64.2 MiB"):
        make_trainer([monitor], max_steps=1, logger=False).fit(model, datamodule=_points_data())


def test_patterns_whose_solve_cannot_fit_are_not_enumerated(make_trainer, monkeypatch):
    # 400 points in the plane have up to 159 601 patterns: their enumeration took 16 s and 450 MiB before the solve
    # was refused, and its output alone grows as n³ bytes (8 GB at 2 000 points)
    import hcl.convex.build as build

    monkeypatch.setattr(build, "enumerate_patterns", lambda X: pytest.fail("enumerated"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 2, generator=g, dtype=torch.float64)
    data = SyntheticRegression(kind="points", x=x.tolist(), y=x.sum(1).tolist(), dtype="float64")
    model = TwoLayerReLU(in_features=2, hidden=4, bias=True, weight_decay=1e-3)
    # 4 GiB: room for the block outputs (1.1 GB, the least this refusal once counted), not for the native solver's
    # least estimate (12.6 GiB): the solve was refused after the enumeration
    monitor = GlobalOptimumMonitor(solver="native", solver_options={"memory_limit": 4 << 30})
    with pytest.raises(ValueError, match=r"GlobalOptimumMonitor: the all-patterns problem was not built: the "
                                         r"all-patterns problem needs about 12.6 GiB .* P=159601, .* budget of 4 GiB"):
        make_trainer([monitor], max_steps=1, logger=False).fit(model, datamodule=data)


@pytest.mark.slow
def test_gradient_descent_reaches_the_global_optimum_of_the_seed_single_neuron(tmp_path, make_trainer):
    """Experiment (b) of docs/experiments.md: one neuron, two points, λ = 0: p*_all = 0 and the gap closes."""
    data = SyntheticRegression(kind="points", x=[-0.2, 1.0], y=[0.5, 1.0], append_ones=True, dtype="float64")
    model = TwoLayerReLU(in_features=2, hidden=1, bias=False, lr=0.2, hidden_weight=[[0.3, -0.15]],
                         output_weight=[[1.0]])
    monitor = GlobalOptimumMonitor(every_n_steps=5)
    make_trainer([monitor], max_steps=80).fit(model, datamodule=data)
    assert monitor.num_patterns == 3  # {x1}, {x2}, {x1, x2}
    assert abs(monitor.optimum) < 1e-8
    gaps = read_scalars(tmp_path)["convex/global_gap"]
    assert gaps[0] == (0, pytest.approx(0.48625, rel=1e-6))  # 0.4862 at step 0 in docs/experiments.md (b)
    assert gaps[-1][1] < 1e-6
    described = read_scalars(tmp_path)
    assert described["convex/global_patterns"] == [(0, 3.0)]  # constants of the run: logged once
    assert described["convex/global_neurons"] == [(0, float(monitor.num_neurons))]


@pytest.mark.slow
def test_charts_alone_and_beside_the_convex_gap_monitor(tmp_path, make_trainer):
    data = _points_data()
    alone = make_trainer([GlobalOptimumMonitor()], max_steps=1, root=tmp_path / "alone")
    alone.fit(TwoLayerReLU(in_features=2, hidden=4, lr=0.1), datamodule=data)
    charts = dashboard.layout_of(alone)["hcl"]
    assert charts == {"objective vs global optimum": ["Multiline", ["train/objective", "convex/global_optimum",
                                                                   "convex/global_upper_bound",
                                                                   "convex/global_lower_bound"]],
                      "global gap": ["Multiline", ["convex/global_gap", "convex/global_max_gap"]]}

    both = make_trainer([GlobalOptimumMonitor(), ConvexGapMonitor(solver="clarabel")], max_steps=1,
                        root=tmp_path / "both")
    both.fit(TwoLayerReLU(in_features=2, hidden=4, lr=0.1), datamodule=data)
    charts = dashboard.layout_of(both)["hcl"]
    assert "objective vs global optimum" not in charts  # one chart with all three lines
    assert set(charts["objective vs convex optimum"][1]) == {
        "train/objective", "convex/nonconvex_objective", "convex/optimum", "convex/upper_bound", "convex/lower_bound",
        "convex/global_optimum", "convex/global_upper_bound", "convex/global_lower_bound"}


def _seven_points(lam: float):
    """Seven 1-D points, their all-patterns problem (no hidden bias, mean) and its optimum to 1e-10."""
    data = _points_data(n=7, seed=2)
    data.setup("fit")
    X, y = data.train_tensors()
    problem = all_patterns_problem(X, y, bias=False, weight_decay=lam, reduction="mean")
    return data, y, problem, solve(problem, "clarabel", tol_gap_rel=1e-10, tol_gap_abs=1e-10, tol_feas=1e-10).value


@pytest.mark.parametrize("lam", [0.0, 1e-3])
@pytest.mark.slow
def test_the_global_bracket_holds_the_true_optimum_and_the_optimum_needs_a_certificate(
    tmp_path, make_trainer, monkeypatch, lam
):
    """The solver's value may sit above p*_all (so L − value can be negative at a global minimum): the lower bound is
    certified, the upper bound feasible; a solve without a certified gap logs its bracket and no optimum."""
    import hcl.callbacks.global_optimum as module

    data, y, problem, p_star = _seven_points(lam)

    def uncertified(problem, solver, **options):  # the same point, without the certificate's promise
        return dataclasses.replace(solve(problem, solver, **options), status=Status.OPTIMAL_INACCURATE)

    for solver, certified in (("clarabel", True), ("native", True), ("uncertified", False)):
        if not certified:
            monkeypatch.setattr(module, "solve", uncertified)
        monitor = GlobalOptimumMonitor(solver="native" if solver == "uncertified" else solver)
        model = TwoLayerReLU(in_features=2, hidden=6, bias=False, weight_decay=lam, lr=0.1)
        make_trainer([monitor], max_steps=2, root=tmp_path / solver).fit(model, datamodule=data)
        s = read_scalars(tmp_path / solver)
        assert 0 <= monitor.lower_bound <= p_star * (1 + 1e-9) + 1e-12
        assert monitor.upper_bound >= p_star * (1 - 1e-9) - 1e-12
        # (event files store float32)
        assert s["convex/global_lower_bound"][0][1] == pytest.approx(monitor.lower_bound, rel=1e-6, abs=1e-30)
        assert s["convex/global_upper_bound"][0][1] == pytest.approx(monitor.upper_bound, rel=1e-6, abs=1e-30)
        assert all(v >= 0 for _, v in s["convex/global_max_gap"])
        assert ("convex/global_optimum" in s) == ("convex/global_gap" in s) == certified, solver
        assert s["convex/global_status"] == [(0, 0.0 if certified else 1.0)]
        assert (monitor.optimum is None) == (not certified)


@pytest.mark.slow
def test_a_loose_solve_is_moved_into_its_cones_before_it_bounds_the_global_optimum(tmp_path, make_trainer):
    """A solve allowed to leave its cones by 1e-2 (the first-order method at a loose tolerance): its value may lie below
    p*_all, so its point is moved into the cones first; the upper bound is then a feasible value, near p*_all, not
    the zero network's."""
    lam = 1e-2
    data, y, problem, p_star = _seven_points(lam)
    options = {"method": "fista", "tol": 1e-2, "constraint_tol": 1e-2}
    loose = solve(problem, "native", **options)
    assert loose.violation > 1e-6 * float(y.abs().max())  # the case under test: the raw point is outside its cones
    monitor = GlobalOptimumMonitor(solver="native", solver_options=options)
    model = TwoLayerReLU(in_features=2, hidden=6, bias=False, weight_decay=lam, lr=0.1)
    make_trainer([monitor], max_steps=1, root=tmp_path).fit(model, datamodule=data)
    zero_network = float(problem.objective(*problem.zeros()))
    assert monitor.solution.violation <= 1e-6 * float(y.abs().max())
    assert p_star * (1 - 1e-9) <= monitor.upper_bound < zero_network
    assert monitor.upper_bound == pytest.approx(float(problem.objective(monitor.solution.U, monitor.solution.V,
                                                                         monitor.solution.b0)), rel=1e-12)
    assert monitor.lower_bound <= p_star * (1 + 1e-9)


@pytest.mark.slow
def test_an_optimal_claim_above_the_zero_network_is_refused(tmp_path, make_trainer, monkeypatch):
    import hcl.callbacks.global_optimum as module

    def too_high(problem, solver, **options):
        optimum = solve(problem, "clarabel")
        U, V, b0 = 100.0 * optimum.U, 100.0 * optimum.V, optimum.b0  # in the cones, far above the zero network
        value = float(problem.objective(U, V, b0))
        return type(optimum)(value=value, U=U, V=V, b0=b0, status="optimal", solver="stub", solve_seconds=0.0,
                             violation=float(problem.violation(U, V)))

    monkeypatch.setattr(module, "solve", too_high)
    monitor = GlobalOptimumMonitor()
    with pytest.warns(UserWarning, match="not certified"):
        make_trainer([monitor], max_steps=1).fit(TwoLayerReLU(in_features=2, hidden=4, lr=0.1),
                                                 datamodule=_points_data())
    s = read_scalars(tmp_path)
    assert monitor.optimum is None and "convex/global_optimum" not in s and "convex/global_gap" not in s


@pytest.mark.slow
def test_training_on_unsupported_data_fails_before_the_first_step(tmp_path, make_trainer):
    data = SyntheticRegression(kind="gaussian_linear", n=10, d=3, dtype="float64")
    model = TwoLayerReLU(in_features=3, hidden=4, bias=True)
    with pytest.raises(ValueError, match="1-D or 2-D data"):
        make_trainer([GlobalOptimumMonitor()], max_steps=2).fit(model, datamodule=data)
    assert model.trainer.global_step == 0
    data = _points_data(append_ones=False)
    with pytest.raises(ValueError, match="needs a bias"):
        make_trainer([GlobalOptimumMonitor()], max_steps=2).fit(TwoLayerReLU(in_features=1, hidden=2),
                                                                      datamodule=data)


def test_bad_arguments_are_refused_early():
    with pytest.raises(ValueError, match="every_n_steps"):
        GlobalOptimumMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="weight_decay"):
        GlobalOptimumMonitor(weight_decay=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        GlobalOptimumMonitor(weight_decay=math.inf)
    with pytest.raises(ValueError, match="reduction"):
        GlobalOptimumMonitor(reduction="max")
    with pytest.raises(ValueError, match="prefix"):
        GlobalOptimumMonitor(prefix="a/b")
    with pytest.raises(ValueError, match="together"):
        GlobalOptimumMonitor(probe=torch.zeros(3, 2))


def test_the_width_warning_counts_the_neurons_some_optimum_needs_at_most(make_trainer):
    """The solver's optimum spreads over more blocks than an optimum needs (n + 1 neurons always suffice): a network of
    n + 1 neurons is not warned about, one narrower than both counts is."""
    import warnings

    from hcl.datamodules.base import TensorDataModule

    torch.manual_seed(0)
    n = 8
    X, y = torch.randn(n, 1), torch.randn(n, 1)
    said = {}
    for width in (n + 1, 2):
        model = TwoLayerReLU(in_features=1, hidden=width, bias=True, weight_decay=0.01, lr=0.02)
        monitor = GlobalOptimumMonitor(every_n_steps=10, solver="clarabel")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([monitor], max_steps=1, logger=False).fit(model, datamodule=TensorDataModule(train=(X, y)))
        said[width] = [str(w.message) for w in caught if "neurons" in str(w.message)]
    assert monitor.num_neurons > n + 1  # the solver's solution has more blocks than an optimum needs
    assert said[n + 1] == []
    assert len(said[2]) == 1 and f"at most {n + 1}" in said[2][0]


@pytest.mark.slow
def test_a_global_solve_stopped_at_its_limit_logs_its_bracket_and_training_goes_on(tmp_path, make_trainer):
    """A limit is not a failure: the run stopped before its first step ("the all-patterns problem was not solved:
    status <Status.MAX_ITERATIONS: ...>"), though the point's certified bracket holds."""
    lam = 1e-2
    data, y, problem, p_star = _seven_points(lam)
    monitor = GlobalOptimumMonitor(solver="native", solver_options={"method": "admm", "max_iters": 5})
    model = TwoLayerReLU(in_features=2, hidden=6, bias=False, weight_decay=lam, lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=2, root=tmp_path).fit(model, datamodule=data)
    messages = [str(w.message) for w in caught]
    assert any("stopped at its limit (status 'max_iterations')" in m for m in messages)
    assert not any("is a lower bound" in m for m in messages)  # a stopped point's value is no bound on anything
    s = read_scalars(tmp_path)
    assert s["convex/global_status"] == [(0, 2.0)] and [step for step, _ in s["train/objective"]] == [0, 1]
    assert "convex/global_optimum" not in s and monitor.optimum is None
    assert monitor.lower_bound <= p_star * (1 + 1e-9) <= monitor.upper_bound * (1 + 2e-9)


@pytest.mark.slow
def test_a_large_enumeration_is_announced_before_it_starts(tmp_path, make_trainer, monkeypatch):
    import hcl.callbacks.global_optimum as global_module

    monkeypatch.setattr(global_module, "MANY_PATTERNS", 40)  # seven points in the plane: up to 43 patterns
    data, *_ = _seven_points(1e-2)
    model = TwoLayerReLU(in_features=2, hidden=6, bias=False, weight_decay=1e-2, lr=0.1)
    with pytest.warns(UserWarning, match="7 points in 2-D have up to 43 activation patterns"):
        make_trainer([GlobalOptimumMonitor()], max_steps=1, root=tmp_path).fit(model, datamodule=data)


@pytest.mark.slow
def test_another_fit_of_the_same_trainer_with_another_lambda_solves_again(make_trainer):
    """A second fit of the same trainer (a notebook's next cell) with another λ kept the first λ's optimum: 0.0173
    logged as certified where p*_all is 0.1009."""
    torch.manual_seed(0)
    data = _points_data(append_ones=False)
    model = TwoLayerReLU(in_features=1, hidden=6, bias=True, weight_decay=1e-2, lr=0.1)
    monitor = GlobalOptimumMonitor(every_n_steps=1)
    trainer = make_trainer([monitor], max_steps=2)
    trainer.fit(model, datamodule=data)
    first = monitor.optimum
    model.weight_decay = 0.1
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(model, datamodule=data)
    fresh = GlobalOptimumMonitor(every_n_steps=1)
    other = TwoLayerReLU(in_features=1, hidden=6, bias=True, weight_decay=0.1)
    make_trainer([fresh], max_steps=1, logger=False).fit(other, datamodule=_points_data(append_ones=False))
    assert monitor.optimum == pytest.approx(fresh.optimum, rel=1e-9) and monitor.optimum > 2 * first


@pytest.mark.slow
def test_an_uncertified_bracket_logs_the_largest_gap_from_its_lower_bound(tmp_path, make_trainer):
    """SCS stopped after 20 iterations leaves a wide bracket: `global_max_gap` is L minus its certified lower end, the
    most the network can be above the optimum, not L minus the upper end."""
    from torch.utils.data import DataLoader, TensorDataset

    X = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    monitor = GlobalOptimumMonitor(solver="scs", solver_options={"max_iters": 20})
    model = TwoLayerReLU(in_features=1, hidden=6, bias=True, weight_decay=0.01, lr=1e-9).double()
    make_trainer([monitor], max_steps=1).fit(model, DataLoader(TensorDataset(X, torch.sin(3 * X)), batch_size=8))
    s = read_scalars(tmp_path)
    assert monitor.optimum is None and "convex/global_optimum" not in s
    assert monitor.upper_bound - monitor.lower_bound > 1e-2 * monitor.upper_bound  # the case under test
    L = monitor.network_objective()  # the step-0 network's (learning rate 1e-9)
    assert s["convex/global_lower_bound"][0][1] == pytest.approx(monitor.lower_bound, rel=1e-6)
    assert s["convex/global_max_gap"][0][1] == pytest.approx(L - monitor.lower_bound, rel=1e-5)
