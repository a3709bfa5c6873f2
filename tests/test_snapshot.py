"""The solve of one snapshot: statuses, failures, the bracket and the warm-start chain."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import hcl.convex.snapshot as snapshot_module
from hcl.convex import ConvexProblem, ConvexSolution, Status, solve
from hcl.convex.build import problem_from_network
from hcl.convex.native import remap_warm_start
from hcl.convex.native.options import ADMM_DEFAULT_TOL
from hcl.convex.problem import fold_bias, fold_weights, network_objective
from hcl.convex.snapshot import (
    CHECK_TOL,
    STATUS_CODES,
    Snapshot,
    SolveSpec,
    WarmStartChain,
    evaluate_snapshot,
    kept_pattern_share,
    runs_first_order,
    solve_snapshot_job,
    store_worker_data,
)


def snapshot(step: int = 0, n: int = 30, d: int = 3, m: int = 6, seed: int = 0, scale: float = 1.0,
             c: int = 1) -> Snapshot:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.cat([torch.sin(X.sum(dim=1, keepdim=True) + k) for k in range(c)], dim=1)
    return Snapshot(
        step=step, X=X, Y=Y,
        hidden_weight=scale * torch.randn(m, d, generator=g, dtype=torch.float64),
        hidden_bias=scale * torch.randn(m, generator=g, dtype=torch.float64),
        output_weight=scale * torch.randn(c, m, generator=g, dtype=torch.float64),
        output_bias=None, extra_patterns=None,
    )


def spec(solver: str = "native", time_limit: float | None = None, gated: bool = False, weight_decay: float = 0.01,
         reduction: str = "mean", **options) -> SolveSpec:
    return SolveSpec(owner="Probe", prefix="convex", formulation="patterns", solver=solver, gated=gated,
                     weight_decay=weight_decay, reduction=reduction, solver_options=options, time_limit=time_limit)


class Recorder:
    """``solve`` that records the warm start it was given and the solution it returned."""

    def __init__(self) -> None:
        self.calls: list[tuple[ConvexProblem, tuple, ConvexSolution]] = []

    def __call__(self, problem, solver, **options):
        solution = solve(problem, solver, **options)
        self.calls.append((problem, options["warm_start"], solution))
        return solution


# ------------------------------------------------------------------------------------------------ statuses
def test_status_codes_are_the_logged_numbers():
    assert STATUS_CODES == {"optimal": 0, "optimal_inaccurate": 1, "max_iterations": 2, "time_limit": 2,
                            "failed": 3, "nonfinite": 4}
    assert Status.of("solver_error") is Status.FAILED and Status.OPTIMAL == "optimal"


def test_non_finite_weights_are_reported_with_code_4_and_not_solved():
    snap = snapshot()
    snap.output_weight[0, 1] = float("nan")
    recorder = Recorder()
    outcome = evaluate_snapshot(spec(), snap, recorder, quiet=True, keep_solution=True)
    assert outcome.metrics == {"convex/status": 4}
    assert "non-finite network weights at step 0" in outcome.messages[0]
    assert recorder.calls == [] and outcome.solved is None


def test_a_solver_that_raises_gives_status_3_and_a_message():
    def explode(problem, solver, **options):
        raise RuntimeError("solver exploded")

    outcome = evaluate_snapshot(spec(), snapshot(step=7), explode, quiet=True, keep_solution=True)
    assert outcome.metrics["convex/status"] == Status.FAILED.code == 3
    assert outcome.metrics["convex/nonconvex_objective"] > 0 and outcome.metrics["convex/solve_seconds"] >= 0
    assert outcome.metrics["convex/upper_bound"] <= outcome.metrics["convex/nonconvex_objective"]  # the network's
    assert "convex/optimum" not in outcome.metrics and "convex/lower_bound" not in outcome.metrics
    where = f"{explode.__code__.co_filename}:{explode.__code__.co_firstlineno + 1} in explode"  # the raising line
    assert outcome.error == f"RuntimeError: solver exploded (raised at {where})"
    assert outcome.messages == [f"Probe: convex solve failed at step 7: {outcome.error}"]
    assert 'raise RuntimeError("solver exploded")' in outcome.traceback and outcome.solved is None


def test_a_solver_that_raises_after_the_time_limit_is_a_time_limit():
    def slow_then_explode(problem, solver, **options):
        assert options["time_limit"] == 0.01  # the spec's limit reaches the solver
        time.sleep(0.03)
        raise RuntimeError("gave up")

    outcome = evaluate_snapshot(spec(time_limit=0.01), snapshot(), slow_then_explode, quiet=True, keep_solution=False)
    assert outcome.metrics["convex/status"] == Status.TIME_LIMIT.code == 2
    assert "time limit 0.01 s" in outcome.messages[0]


def test_a_solved_snapshot_logs_the_gap_and_keeps_the_solution_when_asked():
    outcome = evaluate_snapshot(spec(), snapshot(), solve, quiet=True, keep_solution=True)
    m = outcome.metrics
    assert m["convex/status"] == 0 and outcome.messages == []
    assert m["convex/gap"] == pytest.approx(m["convex/nonconvex_objective"] - m["convex/optimum"])
    assert m["convex/gap"] >= -1e-9  # p* ≤ L (docs/convex.md, invariant 1)
    problem, solution = outcome.solved
    assert m["convex/active_neurons"] == solution.active_neurons() > 0
    assert evaluate_snapshot(spec(), snapshot(), solve, quiet=True, keep_solution=False).solved is None


# ------------------------------------------------------------------------- every tag is what its name says
def problem_of(snap: Snapshot, weight_decay: float = 0.01, reduction: str = "mean"):
    """The snapshot's convex problem and the network's own point in it, as the monitor builds them."""
    return problem_from_network(snap.X, snap.Y, snap.hidden_weight, snap.hidden_bias, snap.output_weight,
                                snap.output_bias, weight_decay=weight_decay, reduction=reduction,
                                formulation="patterns")


def true_optimum(problem: ConvexProblem, gated: bool = False) -> float:
    return solve(problem, "clarabel", gated=gated, tol_gap_rel=1e-10, tol_gap_abs=1e-10, tol_feas=1e-10).value


def same_pattern_objectives(snap: Snapshot, weight_decay: float = 0.01, count: int = 20) -> list[float]:
    """``L`` of networks with the snapshot's patterns: its hidden layer, other output weights."""
    g = torch.Generator().manual_seed(7)
    Xf = fold_bias(snap.X, True)
    Wf = fold_weights(snap.hidden_weight, snap.hidden_bias)
    outputs = [snap.output_weight] + [torch.randn(snap.output_weight.shape, generator=g, dtype=torch.float64)
                                      * 10 ** float(torch.empty(()).uniform_(-2, 0, generator=g))
                                      for _ in range(count)]
    return [float(network_objective(Xf, snap.Y, Wf, A, None, weight_decay, "mean")) for A in outputs]


def test_an_optimal_claim_above_a_known_feasible_value_logs_no_optimum():
    """A solver that says "optimal" with a wrong, too high value and a dual value far below: the network's own
    point refutes it. (Capped at the network's value, it used to be logged as the optimum with status 0.)"""
    snap = snapshot()
    problem, point = problem_of(snap)
    feasible = float(problem.objective(*point))

    def wrong(problem, solver, *, warm_start, **options):
        U, V, b0 = warm_start[:3]
        return ConvexSolution(value=float(problem.objective(3 * U, 3 * V, b0)), U=3 * U, V=3 * V, b0=b0,
                              status=Status.OPTIMAL, solver="wrong", solve_seconds=0.0, dual_value=0.01 * feasible)

    outcome = evaluate_snapshot(spec(), snap, wrong, quiet=True, keep_solution=False)
    m = outcome.metrics
    assert "convex/optimum" not in m and "convex/gap" not in m
    assert m["convex/status"] == Status.OPTIMAL_INACCURATE.code
    assert "not certified" in outcome.messages[0] and "above the feasible value" in outcome.messages[0]
    assert m["convex/upper_bound"] == pytest.approx(feasible, rel=1e-12)  # the network's point, not the claim
    assert m["convex/lower_bound"] == 0.01 * feasible
    assert m["convex/max_gap"] == pytest.approx(m["convex/nonconvex_objective"] - 0.01 * feasible)


def test_a_dual_value_above_a_feasible_value_is_not_logged_as_a_lower_bound():
    snap = snapshot()

    def bad_dual(problem, solver, *, warm_start, **options):
        U, V, b0 = warm_start[:3]
        value = float(problem.objective(U, V, b0))
        return ConvexSolution(value=value, U=U, V=V, b0=b0, status=Status.OPTIMAL, solver="bad", solve_seconds=0.0,
                              dual_value=2 * value)

    outcome = evaluate_snapshot(spec(), snap, bad_dual, quiet=True, keep_solution=False)
    assert "convex/lower_bound" not in outcome.metrics and "convex/optimum" not in outcome.metrics
    assert "lower bound" in outcome.messages[0]


@pytest.mark.parametrize("options", [{"method": "newton", "max_iters": 2}, {"method": "fista", "max_iters": 3},
                                     {"method": "admm", "max_iters": 3}])
def test_a_solve_stopped_early_logs_its_bracket_and_no_optimum(options):
    snap = snapshot()
    recorder = Recorder()
    m = evaluate_snapshot(spec(**options), snap, recorder, quiet=True, keep_solution=False).metrics
    (problem, _, solution), = recorder.calls
    p_star = true_optimum(problem)
    assert m["convex/status"] == Status.MAX_ITERATIONS.code
    assert "convex/optimum" not in m and "convex/gap" not in m
    assert p_star <= m["convex/upper_bound"] <= m["convex/nonconvex_objective"]
    assert m["convex/lower_bound"] == solution.dual_value <= p_star * (1 + 1e-9) + 1e-12


def test_a_vector_solve_stopped_early_logs_its_dual_value_as_the_lower_bound():
    """c > 1, the first-order method stopped after 3 iterations: the lower bound is the certified dual value, below
    every network with these patterns, never the primal value (which need not bound anything)."""
    snap = snapshot(c=2, scale=2.0)
    recorder = Recorder()
    m = evaluate_snapshot(spec(method="fista", max_iters=3), snap, recorder, quiet=True, keep_solution=False).metrics
    (problem, _, solution), = recorder.calls
    assert solution.status == Status.MAX_ITERATIONS and solution.dual_value != solution.value
    assert m["convex/lower_bound"] == solution.dual_value
    assert all(m["convex/lower_bound"] <= L for L in same_pattern_objectives(snap))
    assert m["convex/lower_bound"] <= true_optimum(problem) * (1 + 1e-9) + 1e-12
    for tag in ("convex/optimum", "convex/upper_bound", "convex/gap"):  # the Frobenius problem is not attained
        assert tag not in m


@pytest.mark.parametrize("solver,options", [
    ("native", {}), ("clarabel", {}), ("native", {"tol": 1e-3}),
    pytest.param("native", {"method": "admm", "tol": 1e-3, "constraint_tol": 1e-3}, marks=pytest.mark.slow),
])
def test_the_bracket_holds_the_true_optimum(solver, options):
    for seed in range(4):
        snap = snapshot(seed=seed)
        recorder = Recorder()
        m = evaluate_snapshot(spec(solver, **options), snap, recorder, quiet=True, keep_solution=False).metrics
        p_star = true_optimum(recorder.calls[0][0])
        assert m["convex/upper_bound"] >= p_star * (1 - 1e-9) - 1e-12
        assert m["convex/lower_bound"] <= p_star * (1 + 1e-9) + 1e-12
        if m["convex/status"] == Status.OPTIMAL.code:
            tol = options.get("tol", 1e-6)
            assert abs(m["convex/optimum"] - p_star) <= 10 * tol * max(1.0, p_star)


def test_the_admm_at_its_default_tol_is_logged_certified_at_that_tol():
    """method="admm" without a tol stops at ADMM_DEFAULT_TOL (1e-3), at a point moved exactly into its cones: the
    monitor logs it as status 0 with a gap only that tolerance certifies, and an optimum within 1e-3 of p*."""
    snap = snapshot(seed=0, n=60)
    recorder = Recorder()
    m = evaluate_snapshot(spec(method="admm"), snap, recorder, quiet=True, keep_solution=False).metrics
    (problem, _, solution), = recorder.calls
    assert solution.solver == "native-admm" and Status.of(solution.status) is Status.OPTIMAL
    assert m["convex/status"] == Status.OPTIMAL.code
    assert CHECK_TOL < m["convex/duality_gap"] <= ADMM_DEFAULT_TOL  # a gap only the looser tolerance certifies
    p_star = true_optimum(problem)
    assert p_star * (1 - 1e-9) <= m["convex/optimum"] <= p_star * (1 + ADMM_DEFAULT_TOL)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("options", [
    pytest.param(dict(method="fista", tol=1e-3, constraint_tol=1e-3), marks=pytest.mark.slow),
    dict(method="admm", max_iters=40),
])
def test_a_loose_solution_is_moved_into_its_cones_before_it_is_measured(seed, options):
    """A solver allowed violations of 1e-3 (or stopped early): its raw value may lie below p*; the logged upper bound
    and optimum are the values of its point moved into the cones, so above p*, and the optimum is within the solver's
    tol of it."""
    snap = snapshot(seed=seed, n=60)
    recorder = Recorder()
    m = evaluate_snapshot(spec(**options), snap, recorder, quiet=True, keep_solution=False).metrics
    (problem, point, raw), = recorder.calls
    y_unit = float(problem.Y.abs().max())
    assert raw.violation > CHECK_TOL * y_unit  # the solver's own point is outside its cones
    p_star = true_optimum(problem)
    assert p_star * (1 - 1e-9) <= m["convex/upper_bound"] < float(problem.objective(*point))
    if m["convex/status"] == Status.OPTIMAL.code:
        assert m["convex/optimum"] == m["convex/upper_bound"]
        assert m["convex/optimum"] - p_star <= 1e-3 * p_star
    else:
        assert "convex/optimum" not in m


@pytest.mark.parametrize("c", [1, 2])
def test_the_gated_bound_is_below_every_network_with_the_patterns(c):
    for seed in range(5):
        snap = snapshot(seed=seed, c=c, scale=1.5)
        m = evaluate_snapshot(spec(gated=True), snap, solve, quiet=True, keep_solution=False).metrics
        assert "convex/lower_bound" not in m and "convex/optimum" not in m and "convex/upper_bound" not in m
        bound = m["convex/gated_network_bound"]
        assert all(bound <= L for L in same_pattern_objectives(snap))
        assert m["convex/max_gap"] == pytest.approx(m["convex/nonconvex_objective"] - bound)
        if m["convex/status"] == Status.OPTIMAL.code:
            assert bound <= m["convex/gated_optimum"] <= m["convex/nonconvex_objective"]


def test_the_gated_bound_is_not_a_bound_on_the_exact_vector_problem():
    """x = linspace(1, 2, 8) with a bias, Y = [x − 1.5, −(x − 1.5)], one all-ones pattern, λ = 0.1, sum: the exact
    problem's p* = 0.347170 lies below the gated value 0.471121 — which still bounds every network with the
    pattern (every neuron active on every point)."""
    x = torch.linspace(1, 2, 8, dtype=torch.float64)
    Y = torch.stack([x - 1.5, -(x - 1.5)], dim=1)
    problem = ConvexProblem(torch.stack([x, torch.ones_like(x)], dim=1), Y, torch.ones(8, 1, dtype=torch.bool),
                            weight_decay=0.1, reduction="sum")
    assert true_optimum(problem) == pytest.approx(0.347170, abs=1e-6)
    assert true_optimum(problem, gated=True) == pytest.approx(0.471121, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # networks whose neurons are active on all of [1, 2]
        m = 3
        hidden = torch.rand(m, 1, generator=g, dtype=torch.float64) + 0.1
        snap = Snapshot(0, x.reshape(-1, 1), Y, hidden, torch.rand(m, generator=g, dtype=torch.float64),
                        torch.randn(2, m, generator=g, dtype=torch.float64), None, None)
        m_ = evaluate_snapshot(spec(gated=True, weight_decay=0.1, reduction="sum"), snap, solve, quiet=True,
                               keep_solution=False).metrics
        assert m_["convex/gated_network_bound"] == pytest.approx(0.471121, abs=1e-5)
        assert m_["convex/gated_network_bound"] <= m_["convex/nonconvex_objective"]


# ------------------------------------------------------------------------------------------ warm-start chain
def test_the_chain_carries_each_solution_to_the_next_snapshot(monkeypatch):
    monkeypatch.setattr(snapshot_module, "WARM_MIN_KEPT_PATTERNS", 0.0)  # carry whatever share of patterns is kept
    chain = WarmStartChain()
    recorder = Recorder()
    for step in range(3):  # the weights move a little: the patterns change between snapshots
        snap = snapshot(step=step, seed=0)
        snap.hidden_weight += 0.05 * step
        outcome = evaluate_snapshot(spec(), snap, recorder, quiet=True, keep_solution=False, chain=chain)
        assert outcome.metrics["convex/status"] == 0
    first, second, third = recorder.calls
    assert len(first[1]) == 3  # the network's own point: the chain was empty
    for (old, _, old_solution), (new, warm, _) in ((first, second), (second, third)):
        expected = remap_warm_start(old.patterns, old_solution, new.patterns)
        assert len(warm) == 4 and warm[3] is not None  # the multipliers come along
        assert torch.equal(warm[0], expected[0]) and torch.equal(warm[1], expected[1])


def test_without_a_chain_every_solve_starts_from_the_network():
    recorder = Recorder()
    for step in range(2):
        evaluate_snapshot(spec(), snapshot(step=step), recorder, quiet=True, keep_solution=False)
    assert [len(warm) for _, warm, _ in recorder.calls] == [3, 3]


def test_the_chain_starts_again_for_another_shape_or_kind():
    chain = WarmStartChain()
    recorder = Recorder()
    evaluate_snapshot(spec(), snapshot(n=30), recorder, quiet=True, keep_solution=False, chain=chain)
    evaluate_snapshot(spec(), snapshot(n=20), recorder, quiet=True, keep_solution=False, chain=chain)
    assert len(recorder.calls[1][1]) == 3  # another number of samples: the network's point
    problem, _, solution = recorder.calls[1]
    assert chain.start_for(problem, gated=False) is not None  # the new shape's solution was kept
    assert chain.start_for(problem, gated=True) is None  # but it is no start for the gated relaxation


def test_the_chain_keeps_only_usable_solutions():
    chain = WarmStartChain()
    outcome = evaluate_snapshot(spec(), snapshot(), solve, quiet=True, keep_solution=True)
    problem, solution = outcome.solved
    failed = ConvexSolution(value=float("nan"), U=solution.U, V=solution.V, b0=solution.b0, status=Status.FAILED,
                            solver="probe", solve_seconds=0.0)
    chain.keep(problem, failed)
    assert chain.start_for(problem, gated=False) is None
    chain.keep(problem, solution)
    U, V, _, _ = chain.start_for(problem, gated=False)
    assert torch.equal(U, solution.U) and torch.equal(V, solution.V)


def test_the_worker_store_holds_the_data_and_the_chain_of_its_run():
    snap = snapshot()
    recorder = Recorder()
    store_worker_data("run", snap.X, snap.Y, chained=True)
    bare = Snapshot(**{**snap.__dict__, "X": None, "Y": None})
    for _ in range(2):
        outcome = solve_snapshot_job(spec(), bare, "run", recorder)
        assert outcome.metrics["convex/status"] == 0 and outcome.solved is None
    assert [len(warm) for _, warm, _ in recorder.calls] == [3, 4]  # the second solve started from the first
    with pytest.raises(ValueError, match="stored chain"):
        solve_snapshot_job(spec(), bare, "run", recorder, chain=WarmStartChain())
    store_worker_data("next", snap.X, snap.Y)  # a new run replaces the old one, without a chain
    with pytest.raises(KeyError):
        solve_snapshot_job(spec(), bare, "run", recorder)
    solve_snapshot_job(spec(), bare, "next", recorder)
    assert len(recorder.calls[-1][1]) == 3


def test_a_thread_job_uses_the_chain_it_is_given():
    chain = WarmStartChain()
    recorder = Recorder()
    for _ in range(2):
        solve_snapshot_job(spec(), snapshot(), None, recorder, chain=chain)
    assert [len(warm) for _, warm, _ in recorder.calls] == [3, 4]


def test_the_chain_starts_cold_when_most_patterns_are_new():
    chain = WarmStartChain()
    recorder = Recorder()
    first = snapshot(step=0, seed=0)
    evaluate_snapshot(spec(), first, recorder, quiet=True, keep_solution=False, chain=chain)
    problem = recorder.calls[-1][0]
    assert chain.start_for(problem, gated=False) is not None  # the same patterns: warm
    flipped = ConvexProblem(X=problem.X, Y=problem.Y, patterns=~problem.patterns, weight_decay=problem.weight_decay,
                            reduction=problem.reduction)
    assert kept_pattern_share(problem.patterns, flipped.patterns) == 0.0
    assert chain.start_for(flipped, gated=False) is None  # every pattern new: cold


def test_a_first_order_method_keeps_its_warm_start_when_every_pattern_moved_a_little():
    chain = WarmStartChain()
    recorder = Recorder()
    evaluate_snapshot(spec(method="admm", tol=1e-4, constraint_tol=1e-4), snapshot(step=0, seed=0), recorder,
                      quiet=True, keep_solution=False, chain=chain)
    problem, _, solution = recorder.calls[-1]
    assert solution.ok
    moved = problem.patterns.clone()
    moved[torch.arange(problem.num_patterns) % problem.n, torch.arange(problem.num_patterns)] ^= True  # one sample each
    nearby = ConvexProblem(X=problem.X, Y=problem.Y, patterns=moved, weight_decay=problem.weight_decay,
                           reduction=problem.reduction)
    assert kept_pattern_share(problem.patterns, moved) == 0.0
    assert chain.start_for(nearby, gated=False) is None  # the interior point starts cold
    U, V, _, _ = chain.start_for(nearby, gated=False, first_order=True)
    torch.testing.assert_close(U, solution.U)  # each pattern's block is its old neighbour's
    torch.testing.assert_close(V, solution.V)


def test_the_snapshot_asks_the_plan_which_method_runs():
    problem, _ = problem_of(snapshot())
    assert runs_first_order(problem, "native", {"method": "admm", "tol": 1e-3})
    assert runs_first_order(problem, "NATIVE", {"method": "fista", "time_limit": 5.0})
    assert not runs_first_order(problem, "native", {"method": "newton"})
    assert not runs_first_order(problem, "native", {})  # "auto" takes the interior point at this size
    assert not runs_first_order(problem, "clarabel", {"method": "admm"})
    assert not runs_first_order(problem, "auto", {})  # Clarabel at this size
    assert not runs_first_order(problem, "native", {"method": "simplex"})  # refused by the solve itself


def test_the_duality_gap_is_the_brackets_relative_width_at_any_scale():
    # objectives near 1e-4: a floor of 1 would log the bracket's absolute width under a relative gap's name
    small = dataclasses.replace(snapshot(seed=3), Y=1e-2 * snapshot(seed=3).Y)
    outcome = evaluate_snapshot(spec(max_iters=3, weight_decay=1e-4), small, solve, quiet=True, keep_solution=False)
    m = outcome.metrics
    upper, lower = m["convex/upper_bound"], m["convex/lower_bound"]
    assert 0 < lower < upper < 1  # where a floor of 1 would count
    assert m["convex/duality_gap"] == pytest.approx((upper - lower) / upper, rel=1e-12)
    problem = ConvexProblem(small.X, small.Y, small.X @ small.hidden_weight.T >= 0, weight_decay=1e-4)
    solution = solve(problem, "native", max_iters=3)
    assert solution.relative_gap == pytest.approx((solution.value - solution.dual_value) / solution.value)


def test_active_neurons_counts_the_mapped_networks_neurons_for_several_outputs():
    """One neuron per nonzero column of a block (to_network's map), not per block; a solver's leftovers aside."""
    X = torch.randn(6, 3, dtype=torch.float64)
    problem = ConvexProblem(X, torch.randn(6, 2, dtype=torch.float64), X[:, :2] >= 0, weight_decay=0.1)
    U, V, b0 = problem.zeros()  # (P, d, c) = (2, 3, 2)
    U[0, :, 0], U[1, :, :] = 1.0, 0.5  # three nonzero columns in two blocks
    V[0, :, 1] = 1e-9  # a leftover
    solution = ConvexSolution(value=1.0, U=U, V=V, b0=b0, status="optimal", solver="test", solve_seconds=0.0)
    assert solution.active_neurons() == 3
    hidden, _, _ = problem.to_network(U, V, b0, tol=1e-6 * float(U.norm(dim=1).max()))
    assert hidden.shape[0] == 3


@pytest.mark.parametrize("solver", ["clarabel", "native"])
def test_a_zero_network_optimum_has_no_active_neurons(solver):
    """λ large enough that the optimum is the zero network: the solver's leftovers (1e-14 to 1e-9) are all its blocks
    hold, and no neuron of the mapped network."""
    torch.manual_seed(0)
    X, Y = torch.randn(25, 3, dtype=torch.float64), torch.randn(25, dtype=torch.float64)
    problem = ConvexProblem(X, Y, X @ torch.randn(3, 6, dtype=torch.float64) >= 0, weight_decay=10.0,
                            output_bias=True)
    solution = solve(problem, solver)
    assert solution.value == pytest.approx(float((Y - Y.mean()).square().mean()), rel=1e-6)
    leftover = float(torch.cat([solution.U.flatten(), solution.V.flatten()]).abs().max())
    assert leftover < 1e-6
    assert solution.active_neurons(problem=problem) == 0
    if solver == "clarabel":  # an interior point's leftovers: relative to its own largest only, they would count
        assert leftover > 0 and solution.active_neurons() > 0
