"""The ADMM (``method="admm"``): its exact linear step, its certified optimum against Clarabel, warm starts, and its
place in the memory plan."""

import numpy as np
import pytest
import torch
from _reference import reference_solve

from hcl.convex.build import problem_from_network
from hcl.convex.native import NativeOptions, solve_native
from hcl.convex.native.admm import _LinearStep, _rotated
from hcl.convex.native.memory import SolverMemoryError, footprint, plan
from hcl.convex.native.operator import Operator
from hcl.convex.native.options import ADMM_FLOAT32_TOL, ANDERSON_MEMORY
from hcl.convex.problem import ConvexProblem
from hcl.convex.status import GAP_FLOOR


def instance(n=40, d=6, P=8, c=1, lam=0.05, bias=True, seed=0, signs=False, one_vs_all=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, -1] = 1.0
    patterns = X @ torch.randn(d, P, generator=g, dtype=torch.float64) >= 0
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    sign = torch.randint(-1, 2, (P,), generator=g) if signs else None
    return ConvexProblem(X.to(dtype), Y.to(dtype), patterns, weight_decay=lam, reduction="mean", output_bias=bias,
                         signs=sign, one_vs_all=one_vs_all)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rows", [40, 4])  # n < d: the row space's basis
def test_the_linear_step_solves_its_system(bias, gated, rows):
    problem = instance(n=rows, d=6, P=5, c=2, bias=bias, seed=rows)
    op = Operator(problem, gated=gated, dtype=torch.float64, row_space=True)
    twin, _, sigma2 = _rotated(op)
    rho1, rho2 = 0.7, (0.0 if gated else 1.3)
    step = _LinearStep(op, sigma2, rho1, rho2)
    B = torch.randn(op.d, 2, op.P, op.c, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * op.wmask
    W, XW = step.solve(B.clone())
    # the system applied with the operator's own products: 2 MᵀΠM W + ρ₁ W + ρ₂ XᵀX W = B + 2 MᵀΠY
    applied = 2.0 * op.adjoint_data(op.center(op.predict(op.forward(W)))) + rho1 * W
    applied += rho2 * (op.X.T @ op.forward(W).reshape(op.n, -1)).reshape(W.shape) * op.wmask
    rhs = B + 2.0 * op.adjoint_data(op.center(op.Y))
    assert torch.allclose(applied * op.wmask, rhs, atol=1e-9 * float(rhs.abs().max()))
    assert torch.allclose(XW, op.forward(W), atol=1e-10)
    assert torch.allclose(sigma2, torch.linalg.svdvals(op.X).square(), rtol=1e-10)


def image_like(n=300, d=60, P=30, c=3, lam=1e-3, seed=1, decay=2.0):
    """Features whose scales decay like images' singular values, targets of a planted ReLU layer: ``‖K‖`` is large."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.arange(1, d + 1, dtype=torch.float64) ** -decay
    X[:, -1] = 1.0
    patterns = X @ torch.randn(d, P, generator=g, dtype=torch.float64) >= 0
    Y = torch.relu(X @ torch.randn(d, c, generator=g, dtype=torch.float64))
    Y += 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return ConvexProblem(X, Y, patterns, weight_decay=lam, reduction="mean", output_bias=True)


def test_the_linear_step_in_float32_is_as_accurate_as_its_precision():
    # the data enter through W₀'s residual: solving with A⁻¹ 2MᵀY inside B, which the correction cancels to a part
    # in ‖K‖, was 10× less accurate here (8.7e-7) and stalled float32 solves on MNIST
    problem = image_like()
    steps = {}
    for dtype in (torch.float32, torch.float64):
        op = Operator(problem, gated=False, dtype=dtype, row_space=True)
        _, _, sigma2 = _rotated(op)
        step = _LinearStep(op, sigma2, 0.01 * float(sigma2.sum()) / op.d, 0.03)  # the solver's starting penalties
        B = torch.randn(op.d, 2, op.P, op.c, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        steps[dtype] = step.solve(B.to(dtype) * op.wmask)[0].to(torch.float64)
    exact = steps[torch.float64]
    assert float((steps[torch.float32] - exact).norm() / exact.norm()) <= 3e-7


@pytest.mark.slow  # about 3-5 s; the step's own float32 accuracy is tested in the fast subset above
def test_float32_iterations_certify_the_optimum_in_as_many_iterations():
    problem = image_like()
    runs = {dtype: solve_native(problem, method="admm", tol=1e-3, constraint_tol=1e-3, dtype=dtype, max_iters=5000)
            for dtype in (torch.float32, torch.float64)}
    single, double = runs[torch.float32], runs[torch.float64]
    assert single.status == double.status == "optimal"
    assert single.dual_value <= double.value and double.dual_value <= single.value  # the same optimum in both brackets
    assert single.iterations <= 1.1 * double.iterations  # 2 020 against 1 290 before the step took the residual form


def _summed_small_lambda() -> ConvexProblem:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 50))
    y = np.tanh(X[:, :3].sum(1)) + 0.1 * rng.standard_normal(300)
    patterns = X @ np.random.default_rng(10).standard_normal((50, 12)) >= 0
    return ConvexProblem(torch.tensor(X), torch.tensor(y), torch.tensor(patterns), weight_decay=1e-3,
                         reduction="sum")


@pytest.mark.slow
def test_where_float32_stops_closing_the_gap_the_solve_goes_on_in_float64():
    # λ small beside the data term (a sum): float32's iterates held the gap at 5.4e-3, then 3.8e-3, for thousands of
    # iterations; the solve now carries its point, multipliers and penalties over to float64 and certifies
    problem = _summed_small_lambda()
    assert NativeOptions(method="admm").working_dtype(problem) == torch.float32
    solution = solve_native(problem, method="admm", max_iters=3000)
    reference = reference_solve(problem)
    assert solution.status == "optimal" and solution.iterations < 3000
    assert solution.dual_value <= reference.value * (1 + 1e-9) <= solution.value * (1 + 1e-9)
    assert solution.value - solution.dual_value <= 1e-3 * solution.value


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.slow
def test_where_float32_meets_the_test_only_short_of_its_cones_the_solve_goes_on_in_float64(seed):
    # n < d, correlated float32 inputs, p* 1e-4 of the data term's scale: float32's iterates met the test with the
    # violation at 1e-7 of max|Y|, its floor, where moving them into the cones cost more than tol (max_iterations);
    # and the test's float64 data had been the float32 row-space coordinates, whose rounding moved the bound by 1e-3
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(40, 5, generator=g) @ torch.randn(5, 500, generator=g) + 0.3 * torch.randn(40, 500, generator=g))
    Y = torch.eye(10)[torch.randint(0, 10, (40,), generator=g)]
    weights = torch.randn(8, 500, generator=g) / 500**0.5, 0.1 * torch.randn(8, generator=g)
    problem, _ = problem_from_network(X.float(), Y, *weights, torch.randn(10, 8, generator=g), None,
                                      weight_decay=1e-4, reduction="mean")
    assert NativeOptions(method="admm", tol=1e-3).working_dtype(problem) == torch.float32
    solution = solve_native(problem, method="admm", tol=1e-3, constraint_tol=1e-3, max_iters=1500)
    assert solution.status == "optimal" and solution.iterations < 1500


@pytest.mark.slow
def test_a_precision_asked_for_or_a_float64_that_does_not_fit_is_kept_to_the_end():
    problem = _summed_small_lambda()
    asked = solve_native(problem, method="admm", max_iters=1500, dtype=torch.float32)
    sizes = (problem.n, problem.d, problem.num_patterns, problem.c)
    budget = footprint("admm", *sizes, torch.float32, output_bias=problem.output_bias, anderson=0).total  # no float64
    tight = solve_native(problem, method="admm", max_iters=1500, memory_limit=budget)
    for solution in (asked, tight):  # never claims the cap before reaching it
        assert solution.status == "max_iterations" and solution.iterations == 1500


def test_the_admm_works_in_float32_from_its_float32_tol_on():
    problem = instance(dtype=torch.float64)
    assert NativeOptions(method="admm", tol=ADMM_FLOAT32_TOL).working_dtype(problem) == torch.float32
    assert NativeOptions(method="admm", tol=ADMM_FLOAT32_TOL / 2).working_dtype(problem) == torch.float64
    assert NativeOptions(method="admm", tol=1e-2, dtype=torch.float64).working_dtype(problem) == torch.float64
    assert NativeOptions(tol=1e-2).working_dtype(problem, "newton") == torch.float64
    # the memory plan counts the precision the solve will run in
    sizes = (problem.n, problem.d, problem.num_patterns, problem.c)
    single = footprint("admm", *sizes, torch.float32, output_bias=problem.output_bias).total
    assert single < footprint("admm", *sizes, torch.float64, output_bias=problem.output_bias).total
    options = dict(method="admm", anderson=ANDERSON_MEMORY, memory_limit=single)
    assert plan(problem, NativeOptions(tol=ADMM_FLOAT32_TOL, **options)).method == "admm"
    with pytest.raises(SolverMemoryError, match="'admm'"):
        plan(problem, NativeOptions(tol=ADMM_FLOAT32_TOL / 2, **options))


CASES = {
    "scalar": dict(),
    "no bias, sum-like λ": dict(bias=False, lam=0.2),
    "vector, shared layer": dict(c=3, seed=1),
    "vector, one-vs-all": dict(c=2, one_vs_all=True),
    "signs": dict(signs=True, seed=3),
    "n < d": dict(n=5, d=9, seed=2),
    "one pattern": dict(P=1, seed=4),
    "float32 data": dict(dtype=torch.float32, seed=5),
}


@pytest.mark.parametrize("case,gated", [
    # the fast subset: every case exact, and the gated relaxation once
    pytest.param(case, gated, marks=pytest.mark.slow) if case == "vector, shared layer" or (gated and case != "scalar")
    else (case, gated)
    for gated in (False, True) for case in CASES
])
def test_admm_certifies_the_optimum_clarabel_finds(case, gated):
    problem = instance(**CASES[case])
    solution = solve_native(problem, gated=gated, method="admm", tol=1e-5, constraint_tol=1e-6, max_iters=20000)
    reference = reference_solve(problem, gated)
    exact = problem.in_float64()
    centred = exact.Y - exact.Y.mean(0) if exact.output_bias else exact.Y
    scale = max(reference.value, GAP_FLOOR * exact.scale * float(centred.square().sum()))
    uncertainty = reference.value - reference.lower_bound  # Clarabel's own certified gap at its point
    assert uncertainty <= 1e-6 * scale
    assert solution.status == "optimal", (solution.status, solution.iterations)
    assert solution.dual_value <= reference.value + 1e-8 * scale
    assert abs(solution.value - reference.value) <= 1.2e-5 * scale + uncertainty
    assert solution.violation <= 1e-6 * float(problem.Y.abs().max())


def test_an_early_stop_still_brackets_the_optimum():
    problem = instance(n=60, d=8, P=12, c=2, seed=7)
    solution = solve_native(problem, method="admm", max_iters=15)
    reference = reference_solve(problem)
    assert solution.status == "max_iterations"
    assert solution.dual_value <= reference.value
    # the point is not yet feasible: its value is no upper bound, and the bracket's upper end is left out for it
    assert solution.violation > 1e-6 * float(problem.Y.abs().max())


@pytest.mark.slow
def test_a_warm_start_from_the_optimum_takes_a_fraction_of_the_iterations():
    problem = instance(n=60, d=8, P=12, c=1, seed=8)
    for anderson, fraction in ((0, 10), (None, 5)):  # the acceleration shortens the cold solve more than the warm one
        cold = solve_native(problem, method="admm", tol=1e-6, anderson=anderson)
        warm = solve_native(problem, method="admm", tol=1e-6, warm_start=cold, anderson=anderson)
        assert cold.status == warm.status == "optimal"
        assert warm.iterations <= cold.iterations / fraction  # the point and both multipliers are restored


def test_auto_takes_admm_where_the_interior_point_does_not_fit():
    problem = instance(n=300, d=40, P=20, c=3, dtype=torch.float32)
    newton = footprint("newton", 300, 40, 20, 3, output_bias=True).total
    # float32: the ADMM's default tol (1e-3) runs it in float32
    admm = footprint("admm", 300, 40, 20, 3, torch.float32, output_bias=True).total
    bare = footprint("admm", 300, 40, 20, 3, torch.float32, output_bias=True, anderson=0).total  # no acceleration
    assert bare < admm < newton
    assert plan(problem, NativeOptions(memory_limit=newton)).method == "newton"
    chosen = plan(problem, NativeOptions(memory_limit=newton - 1))
    assert chosen.method == "admm" and chosen.anderson == ANDERSON_MEMORY
    # a budget short of the default history: as many differences as fit, then none, then the first-order method
    fewer = plan(problem, NativeOptions(memory_limit=admm - 1))
    assert fewer.method == "admm" and 0 < fewer.anderson < ANDERSON_MEMORY
    assert footprint("admm", 300, 40, 20, 3, torch.float32, output_bias=True, anderson=fewer.anderson).total <= admm - 1
    assert plan(problem, NativeOptions(memory_limit=bare)).anderson == 0
    assert plan(problem, NativeOptions(memory_limit=bare - 1)).method == "fista"
    with pytest.raises(SolverMemoryError, match="'admm'.*n=300, d=40, P=20, c=3"):
        plan(problem, NativeOptions(method="admm", memory_limit=bare - 1))
    with pytest.raises(SolverMemoryError, match="'admm'"):  # an explicit history is not shortened
        plan(problem, NativeOptions(method="admm", anderson=ANDERSON_MEMORY, memory_limit=admm - 1))
    # MNIST's monitor: the n × n matrices, not the (d, d) blocks
    assert footprint("admm", 2000, 785, 100, 10).total < 2 << 30 < footprint("newton", 2000, 785, 100, 10).total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [1, pytest.param(3, marks=pytest.mark.slow)])  # c = 3 takes 0.4–1.7 s a seed
def test_at_a_loose_constraint_tol_optimal_is_claimed_only_at_a_feasible_point(seed, c):
    problem = instance(n=80, d=6, P=10, c=c, seed=seed)
    solution = solve_native(problem, method="admm", tol=1e-3, constraint_tol=1e-2, max_iters=3000)
    reference = reference_solve(problem)
    assert solution.status == "optimal"
    assert solution.violation <= 1e-6 * float(problem.Y.abs().max())
    assert solution.value >= reference.value * (1 - 1e-9)  # a feasible value: above the optimum
    assert solution.dual_value <= reference.value + 1e-9
    assert solution.value - solution.dual_value <= 1e-3 * solution.value


@pytest.mark.parametrize("seed", range(3))
def test_the_reported_bound_is_the_best_one_certified_along_the_way(seed, monkeypatch):
    import hcl.convex.native.admm as admm_module

    seen = []
    check = admm_module._check

    def recording(*args):
        result = check(*args)
        seen.append(result.dual)
        return result

    monkeypatch.setattr(admm_module, "_check", recording)
    problem = instance(n=60, d=8, P=12, c=2, seed=10 + seed)
    solution = solve_native(problem, method="admm", max_iters=200, tol=1e-9, constraint_tol=1e-9)
    reference = reference_solve(problem)
    assert len(seen) == 20
    assert solution.dual_value >= max(seen) - 1e-9 * reference.value  # not just the last point's
    assert solution.dual_value <= reference.value + 1e-9


def test_once_only_feasibility_is_left_the_cone_penalty_grows(monkeypatch):
    import hcl.convex.native.admm as admm_module

    checks = []
    check = admm_module._check

    def recording(check_op, W, mu, options, it, rho, *args):
        result = check(check_op, W, mu, options, it, rho, *args)
        checks.append((it, result.gap, result.violation, rho[1]))
        return result

    monkeypatch.setattr(admm_module, "_check", recording)
    tol, constraint_tol = 1e-2, 1e-3
    solve_native(instance(n=80, d=6, P=10, c=1, seed=1), method="admm", tol=tol, constraint_tol=constraint_tol,
                 max_iters=3000)
    window = admm_module.PUSH_WITHIN * constraint_tol
    pushed = [k for k, (_, gap, violation, _) in enumerate(checks)
              if gap <= tol and admm_module.STRICT_VIOLATION < violation <= window]
    assert pushed, "the gap never closed ahead of the violation on this instance"
    first = pushed[0]
    later = [rho2 for it, *_, rho2 in checks[first + 1:] if it <= checks[first][0] + admm_module.RHO_EVERY + 10]
    assert later and max(later) >= admm_module.RHO_FACTOR * checks[first][3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["admm", "newton"])
def test_each_method_on_the_gpu_certifies_what_it_certifies_on_the_cpu(method):
    problem = instance(n=80, d=7, P=10, c=3, seed=9)
    on_gpu = ConvexProblem(problem.X.cuda(), problem.Y.cuda(), problem.patterns.cuda(), weight_decay=0.05,
                           reduction="mean", output_bias=True)
    options = dict(method=method, tol=1e-5, constraint_tol=1e-6, max_iters=20000)
    cpu, gpu = solve_native(problem, **options), solve_native(on_gpu, **options)
    assert gpu.U.is_cuda and gpu.status == cpu.status == "optimal", (gpu.status, cpu.status)
    reference = reference_solve(problem)
    assert gpu.dual_value <= reference.value + 1e-8 * reference.value
    assert gpu.value == pytest.approx(cpu.value, rel=2e-5)


def _recorded(monkeypatch, problem, tol, constraint_tol):
    """Solve with the ADMM, recording each stopping test's ``(iteration, gap, violation, ρ₂)`` and each move into the
    cones' ``(iteration, moved point's gap)``."""
    import hcl.convex.native.admm as admm_module

    checks, moves = [], []
    check, feasible = admm_module._check, admm_module._feasible

    def recording_check(check_op, W, mu, options, it, rho, *args):
        result = check(check_op, W, mu, options, it, rho, *args)
        checks.append((it, result.gap, result.violation, rho[1]))
        return result

    def recording_move(*args):
        point, gap = feasible(*args)
        moves.append((checks[-1][0], gap))
        return point, gap

    monkeypatch.setattr(admm_module, "_check", recording_check)
    monkeypatch.setattr(admm_module, "_feasible", recording_move)
    solution = solve_native(problem, method="admm", tol=tol, constraint_tol=constraint_tol, max_iters=3000)
    return solution, checks, moves


@pytest.mark.parametrize("seed", [12, 25])  # instances where the gap opens again once the push made the point feasible
def test_when_the_gap_opens_again_the_cone_penalty_returns_to_where_the_push_began(seed, monkeypatch):
    import hcl.convex.native.admm as admm_module

    tol = constraint_tol = 1e-3
    solution, checks, _ = _recorded(monkeypatch, instance(n=80, d=6, P=10, c=1, seed=seed), tol, constraint_tol)
    window = admm_module.PUSH_WITHIN * constraint_tol
    pushing = [gap <= tol and admm_module.STRICT_VIOLATION < violation <= window for _, gap, violation, _ in checks]
    ended = [k for k in range(1, len(checks) - 1) if pushing[k - 1] and not pushing[k] and checks[k][1] > tol]
    assert ended, "no push ended with the gap open on this instance"
    for k in ended:
        start = max(j for j in range(k) if pushing[j] and (j == 0 or not pushing[j - 1]))
        base, pushed = checks[start][3], checks[k][3]
        assert pushed > base  # the push raised ρ₂ ...
        assert checks[k + 1][3] == pytest.approx(base)  # ... and it is back where the push began
    assert solution.status == "optimal"
    assert solution.dual_value <= reference_solve(instance(n=80, d=6, P=10, c=1, seed=seed)).value + 1e-9


@pytest.mark.parametrize("seed", [3, 5, 6, 9, 10])
def test_a_failed_move_into_the_cones_is_retried_only_where_its_cost_leaves_the_gap_within_tol(seed, monkeypatch):
    tol = constraint_tol = 1e-3
    solution, checks, moves = _recorded(monkeypatch, instance(n=80, d=6, P=10, c=1, seed=seed), tol, constraint_tol)
    at = {it: (gap, violation) for it, gap, violation, _ in checks}
    assert moves and solution.status == "optimal" and moves[-1][1] <= tol  # the last move is the certified point
    for (it_before, moved_gap), (it, _) in zip(moves, moves[1:]):
        gap_before, violation_before = at[it_before]
        cost = max(moved_gap - gap_before, 0.0) / violation_before
        gap, violation = at[it]
        assert moved_gap > tol and violation <= 0.5 * violation_before
        assert gap + cost * violation <= tol


@pytest.mark.parametrize("case", [
    dict(n=80, d=6, P=10, c=1, seed=1),
    dict(n=60, d=8, P=12, c=2, seed=7),
    pytest.param(dict(n=100, d=5, P=15, c=3, seed=3, signs=True), marks=pytest.mark.slow),
    pytest.param(dict(n=50, d=10, P=8, c=1, seed=4, bias=False), marks=pytest.mark.slow),
])
def test_the_anderson_acceleration_certifies_the_same_optimum_in_fewer_iterations(case):
    problem = instance(**case)
    plain = solve_native(problem, method="admm", tol=1e-5, constraint_tol=1e-6, max_iters=20000, anderson=0)
    accelerated = solve_native(problem, method="admm", tol=1e-5, constraint_tol=1e-6, max_iters=20000)
    assert plain.status == accelerated.status == "optimal"
    # each certified bound lies below the other's feasible value: the two brackets hold the same optimum
    assert accelerated.dual_value <= plain.value and plain.dual_value <= accelerated.value
    assert accelerated.iterations <= 0.95 * plain.iterations


@pytest.mark.parametrize("method", ["admm", "fista"])
def test_lambda_zero_in_float32_keeps_zero_groups_finite(method):
    # the group prox at threshold 0 divided a zero group's norm, clamped at 1e-300 (0 in float32): NaN from the start
    problem = instance(n=60, d=6, P=6, c=2, lam=0.0, seed=11)
    solution = solve_native(problem, method=method, tol=1e-3, constraint_tol=1e-3, dtype=torch.float32, max_iters=300)
    assert solution.status != "failed"
    assert torch.isfinite(solution.U).all() and torch.isfinite(solution.V).all()
    assert 0.0 <= solution.dual_value <= solution.value < float("inf")


@pytest.mark.slow
def test_on_badly_scaled_data_the_penalties_stop_where_the_step_still_factors(monkeypatch):
    """Inputs of scale 1e-6 beside a bias column, targets of scale 1e8: residual balancing lowered ρ until the
    ``n × n`` matrix lost its ``I/2`` to rounding and its factorisation raised. ρ now stops falling there, and a ρ
    whose matrix does not factor is not taken; the solve ends with a status, its bound below the optimum."""
    import hcl.convex.native.admm as admm_module

    g = torch.Generator().manual_seed(2)
    X = torch.randn(12, 2, generator=g, dtype=torch.float64)
    Y = torch.cat([torch.sin(X.sum(1, keepdim=True) + k) for k in range(3)], 1)
    Y = 1e8 * (Y + 0.1 * torch.randn(12, 3, generator=g, dtype=torch.float64))
    Xf = torch.cat([1e-6 * X, torch.ones(12, 1, dtype=torch.float64)], 1)
    D = torch.unique((Xf @ torch.randn(3, 20, generator=g, dtype=torch.float64) >= 0).T, dim=0)[:5].T.contiguous()
    problem = ConvexProblem(Xf, Y, D, weight_decay=0.01, reduction="sum", output_bias=True)
    optimum = solve_native(problem, method="newton").value
    tried = []
    factored = admm_module._factored
    monkeypatch.setattr(admm_module, "_factored", lambda op, sigma2, r1, r2: tried.append((r1, r2)) or factored(
        op, sigma2, r1, r2))
    solution = solve_native(problem, method="admm")
    assert solution.status in ("optimal", "max_iterations") and solution.dual_value <= optimum * (1 + 1e-9)
    sigma2_max = float(torch.linalg.matrix_norm(Xf, ord=2)) ** 2
    assert tried and all(min(sigma2_max / r1, 1 / r2) <= admm_module.RHO_CONDITION * (1 + 1e-9) for r1, r2 in tried)


@pytest.mark.parametrize("bias", [False, True])
def test_all_zero_inputs_give_the_constant_fits_optimum(bias):
    # ρ₁ was scaled by the data's mean curvature, 0 here: the n × n matrix did not factor (LinAlgError)
    g = torch.Generator().manual_seed(0)
    problem = ConvexProblem(X=torch.zeros(10, 1, dtype=torch.float64), Y=torch.randn(10, 1, generator=g,
                            dtype=torch.float64), patterns=torch.rand(10, 3, generator=g) > 0.5, weight_decay=0.05,
                            reduction="sum", output_bias=bias)
    solution = solve_native(problem, method="admm")
    Y = problem.Y - problem.Y.mean() if bias else problem.Y
    assert solution.status == "optimal"
    assert solution.value == pytest.approx(float(Y.square().sum()), rel=1e-9)


@pytest.mark.slow
def test_a_solve_that_goes_on_in_float64_keeps_its_iteration_cap_and_the_float32_parts_bound():
    # stalled in float32 at iteration 1060: 5 iterations are left to float64, whose own bound, that early, is below
    # the float32 part's (which holds as well and is reported), and the total stays within max_iters
    problem = _summed_small_lambda()
    solution = solve_native(problem, method="admm", max_iters=1065)
    float32_part = solve_native(problem, method="admm", max_iters=1060, dtype=torch.float32)
    assert solution.iterations <= 1065
    assert solution.dual_value >= float32_part.dual_value
    assert solution.dual_value <= reference_solve(problem).value * (1 + 1e-9)
    assert solution.status == "optimal"
