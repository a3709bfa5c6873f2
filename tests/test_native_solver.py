"""hcl's native solver against an independent cvxpy formulation, its certificate, warm starts and errors."""

import dataclasses
import math
import zlib

import pytest
import torch
from _params import pairwise
from _reference import reference_value

from hcl.convex.native import Multipliers, NativeOptions, dual_certificate, remap_warm_start, solve_native
from hcl.convex.native.options import NEWTON_MAX_SAMPLES
from hcl.convex.problem import ConvexProblem
from hcl.convex.solvers import (
    AUTO_NATIVE_ABOVE,
    AUTO_NATIVE_ABOVE_UNREGULARIZED,
    available_solvers,
    choose_solver,
    problem_size,
    solve,
)


def random_problem(seed, n=24, d=4, P=5, c=1, lam=0.05, reduction="mean", bias=False, one_vs_all=False,
                   signs=False) -> ConvexProblem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, -1] = 1.0  # a folded first-layer bias
    patterns = (X @ torch.randn(d, P, generator=g, dtype=torch.float64)) >= 0
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    sign = torch.randint(-1, 2, (P,), generator=g) if signs else None
    return ConvexProblem(X, Y, patterns, weight_decay=lam, reduction=reduction, output_bias=bias, signs=sign,
                         one_vs_all=one_vs_all)


def assert_agrees(solution, problem, ref, gated, tol=1e-6):
    scale = max(abs(ref), 1e-8)
    assert solution.ok, solution.status
    assert abs(solution.value - ref) <= 1e-5 * scale
    # the certificate is a valid lower bound …
    assert solution.dual_value <= ref + 1e-8 * scale
    # … and, when the status says so, a tight one
    if solution.status == "optimal":
        assert solution.value - solution.dual_value <= 2 * tol * max(abs(solution.value), 1e-6)
    # the solution is the problem's (recomputed independently)
    assert math.isclose(float(problem.objective(solution.U, solution.V, solution.b0)), solution.value,
                        rel_tol=1e-9, abs_tol=1e-12)
    if not gated:
        assert solution.violation <= 1e-6 * float(problem.Y.abs().max())
        assert float(problem.violation(solution.U, solution.V)) <= 1e-6 * float(problem.Y.abs().max())
    else:
        assert torch.count_nonzero(solution.V) == 0


OUTPUTS = [(1, False), (3, False), (3, True)]  # scalar, shared-layer vector (Frobenius), one-vs-all


@pytest.mark.parametrize(
    "outputs,bias,reduction,lam,gated", pairwise(OUTPUTS, [False, True], ["sum", "mean"], [0.0, 0.05], [False, True])
)
def test_newton_agrees_with_cvxpy(outputs, bias, reduction, lam, gated):
    c, one_vs_all = outputs
    seed = zlib.crc32(repr((c, one_vs_all, bias, reduction, lam, gated)).encode()) % 1000
    problem = random_problem(seed, c=c, one_vs_all=one_vs_all, bias=bias, reduction=reduction, lam=lam)
    ref = reference_value(problem, gated)
    solution = solve_native(problem, gated=gated, method="newton")
    assert_agrees(solution, problem, ref, gated)
    if lam > 0:
        assert solution.status == "optimal"  # the certificate closes
    else:
        # λ = 0: the only certified bound is 0; the method stops on its optimality conditions
        assert solution.status in ("optimal", "optimal_inaccurate")
        assert solution.dual_value >= 0.0


@pytest.mark.parametrize("signs", [True])
@pytest.mark.parametrize("outputs", OUTPUTS)
def test_newton_with_sign_restricted_blocks(outputs, signs):
    c, one_vs_all = outputs
    problem = random_problem(7, c=c, one_vs_all=one_vs_all, signs=signs, bias=True)
    ref = reference_value(problem)
    solution = solve_native(problem)
    assert_agrees(solution, problem, ref, gated=False)
    forbidden_u = problem.signs < 0
    forbidden_v = problem.signs > 0
    assert torch.count_nonzero(solution.U[forbidden_u]) == 0
    assert torch.count_nonzero(solution.V[forbidden_v]) == 0


@pytest.mark.parametrize("float32_cg_iters", [0, pytest.param(20, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "outputs,bias,float32_blocks",
    [((1, False), True, False), ((1, False), True, True),
     pytest.param((3, False), False, False, marks=pytest.mark.slow),
     pytest.param((3, False), False, True, marks=pytest.mark.slow)],
)
def test_newton_float32_schur_and_its_float64_fallback_agree_with_cvxpy(
    outputs, bias, float32_cg_iters, float32_blocks, monkeypatch
):
    """The Schur matrix (and, for large d, the blocks) is built in float32 and rebuilt in float64 when conjugate
    gradients stall on it; with no float32 iterations allowed every system takes the fallback. All must reach the
    certified optimum."""
    from hcl.convex.native import newton

    # the constants are read where they are used, in hcl.convex.native.newton
    monkeypatch.setattr(newton, "FLOAT32_SCHUR_ABOVE", 0)  # float32 at this small size too
    monkeypatch.setattr(newton, "FLOAT32_BLOCKS_FROM_D_OVER_N", 0.0 if float32_blocks else 1e9)
    monkeypatch.setattr(newton, "FLOAT32_CG_ITERS", float32_cg_iters)
    rebuilt = []
    refine = newton.NewtonSystem.refine_schur
    monkeypatch.setattr(newton.NewtonSystem, "refine_schur", lambda self: rebuilt.append(1) or refine(self))
    c, one_vs_all = outputs
    problem = random_problem(11, n=60, d=5, P=12, c=c, one_vs_all=one_vs_all, bias=bias, lam=0.02)
    solution = solve_native(problem, method="newton")
    assert_agrees(solution, problem, reference_value(problem), gated=False)
    assert solution.status == "optimal"
    if float32_cg_iters == 0:
        assert rebuilt  # the fallback ran


@pytest.mark.parametrize("outputs,signs", [((1, False), True), ((3, False), False), ((3, True), False)])
def test_newton_barrier_blocks_built_block_by_block_agree_with_cvxpy(outputs, signs, monkeypatch):
    """With large ``d`` the rows ``x_j x_jᵀ`` are not kept and each block's ``Xᵀ diag(θ) X`` is its own product,
    a few blocks at a time (forced here, with blocks split over several chunks)."""
    from hcl.convex.native import workspace

    monkeypatch.setattr(workspace, "OUTER_PRODUCTS_MAX_BYTES", 0)
    c, one_vs_all = outputs
    problem = random_problem(5, n=40, d=6, P=9, c=c, one_vs_all=one_vs_all, signs=signs, bias=True, lam=0.03)
    seen = []
    outer = workspace.Workspace.sample_outer_products
    monkeypatch.setattr(
        workspace.Workspace, "sample_outer_products", lambda ws, dtype: seen.append(outer(ws, dtype)) or seen[-1]
    )
    solution = solve_native(problem, method="newton", chunk_size=1)
    assert seen and all(rows is None for rows in seen)  # the block-by-block path ran
    assert_agrees(solution, problem, reference_value(problem), gated=False)
    assert solution.status == "optimal"


@pytest.mark.parametrize(
    "outputs,gated,bias",
    [pytest.param((1, False), False, True, marks=pytest.mark.slow), ((3, False), False, False),
     ((3, True), True, True)],
)
def test_fista_agrees_with_cvxpy(outputs, gated, bias):
    c, one_vs_all = outputs
    problem = random_problem(11, n=16, d=3, P=4, c=c, one_vs_all=one_vs_all, bias=bias, lam=0.1)
    ref = reference_value(problem, gated)
    solution = solve_native(problem, gated=gated, method="fista", tol=1e-5, dtype=torch.float64)
    assert solution.status == "optimal"
    assert_agrees(solution, problem, ref, gated, tol=1e-5)
    assert isinstance(solution.multipliers, Multipliers) or gated


def test_fista_float32_by_default_and_chunks_agree():
    problem = random_problem(3, n=16, d=3, P=4, lam=0.1, bias=True)
    problem32 = ConvexProblem(problem.X.float(), problem.Y.float(), problem.patterns, 0.1, "mean", True)
    ref = reference_value(problem, gated=True)
    full = solve_native(problem32, gated=True, method="fista", tol=1e-4)
    chunked = solve_native(problem, gated=True, method="fista", chunk_size=5, tol=1e-6)
    assert full.U.dtype == torch.float32
    assert abs(full.value - ref) <= 1e-3 * ref
    assert abs(chunked.value - ref) <= 1e-5 * ref


@pytest.mark.slow
def test_fista_in_float32_goes_on_in_float64_where_rounding_stops_its_backtracking():
    # float32 rounding of the smooth part failed the sufficient-decrease test at every step length: the step fell to
    # its floor, and the solve stayed 3.6e-3 above the optimum for 20 000 iterations
    g = torch.Generator().manual_seed(2)
    X = torch.randn(200, 40, generator=g, dtype=torch.float64)
    patterns = X @ torch.randn(40, 10, generator=g, dtype=torch.float64) >= 0
    problem = ConvexProblem(X.float(), torch.sin(X[:, 0]).float(), patterns, weight_decay=1e-2, reduction="sum",
                            output_bias=True)
    # tol 1e-5 (float32 alone stays 1.4e-3 off): at 1e-6 the float64 part's bound lagged its value (optimal to 1e-12)
    # by 1.2e-6 for 20 000 iterations on an AMD EPYC, where an Intel Xeon's rounding certified it
    solution = solve_native(problem, gated=True, method="fista", max_iters=8000, tol=1e-5)
    reference = reference_value(problem, gated=True)
    assert solution.U.dtype == torch.float32 and solution.status == "optimal"
    assert abs(solution.value - reference) <= 1e-5 * reference


def test_fista_constrained_by_chunks_with_signs_agrees_with_cvxpy():
    # chunks of 5, 5, 5 and 1 samples share the first-order method's work buffers; the sign restriction removes
    # blocks, whose hinge must stay zero
    problem = random_problem(12, n=16, d=3, P=4, lam=0.1, bias=True, signs=True)
    assert not (problem.allows_u().all() and problem.allows_v().all())
    ref = reference_value(problem)
    whole = solve_native(problem, method="fista", tol=1e-5, dtype=torch.float64)
    chunked = solve_native(problem, method="fista", tol=1e-5, dtype=torch.float64, chunk_size=5)
    for solution in (whole, chunked):
        assert solution.status == "optimal"
        assert_agrees(solution, problem, ref, gated=False, tol=1e-5)
    assert torch.allclose(chunked.U, whole.U, atol=1e-6) and torch.allclose(chunked.V, whole.V, atol=1e-6)


def test_fista_with_only_an_empty_pattern():
    # a pattern that selects no sample leaves the data term flat: the penalty must still enforce the cones
    problem = random_problem(23, n=20, d=3, P=1, c=3, one_vs_all=True, lam=0.5, reduction="sum")
    problem = ConvexProblem(problem.X, problem.Y, torch.zeros_like(problem.patterns), 0.5, "sum", one_vs_all=True)
    ref = reference_value(problem)
    solution = solve_native(problem, method="fista", dtype=torch.float64)
    assert solution.status == "optimal"
    assert_agrees(solution, problem, ref, gated=False)


def test_fista_with_a_data_term_the_output_bias_makes_flat():
    # X = 1 and patterns that take all samples or none: every block output is constant, and the output bias centres
    # it away, so the data term has no curvature at all
    n = 12
    X = torch.ones(n, 1, dtype=torch.float64)
    patterns = torch.tensor([True, False, True])[None, :].expand(n, 3)
    Y = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    problem = ConvexProblem(X, Y, patterns, 0.5, "sum", output_bias=True)
    for gated in (True, False):
        ref = reference_value(problem, gated)
        solution = solve_native(problem, gated=gated, method="fista", dtype=torch.float64)
        assert solution.status == "optimal"
        assert_agrees(solution, problem, ref, gated)


def test_certificate_never_exceeds_the_optimum_at_any_point():
    for seed in range(4):
        problem = random_problem(100 + seed, c=1 + seed % 2 * 2, bias=bool(seed % 2), lam=0.05)
        ref = reference_value(problem)
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            U = torch.randn(problem.num_patterns, problem.d, problem.c, generator=g, dtype=torch.float64)
            V = torch.randn(problem.num_patterns, problem.d, problem.c, generator=g, dtype=torch.float64)
            mu = torch.rand(problem.n, 2, problem.num_patterns, problem.c, generator=g, dtype=torch.float64)
            assert dual_certificate(problem, U, V, multipliers=mu) <= ref + 1e-9 * abs(ref)
            assert dual_certificate(problem, 0.1 * U, 0.1 * V) <= ref + 1e-9 * abs(ref)
        solution = solve_native(problem)
        tight = dual_certificate(problem, solution.U, solution.V, solution.b0, solution.multipliers)
        assert ref - 1e-5 * ref <= tight <= ref + 1e-9 * abs(ref)


def test_warm_start_cuts_iterations():
    problem = random_problem(21, n=60, d=6, P=12, lam=0.02, reduction="sum")
    first = solve_native(problem)
    g = torch.Generator().manual_seed(1)
    nudged = ConvexProblem(problem.X, problem.Y + 0.01 * torch.randn(problem.Y.shape, generator=g,
                                                                      dtype=torch.float64),
                           problem.patterns, problem.weight_decay, problem.reduction)
    cold = solve_native(nudged)
    warm = solve_native(nudged, warm_start=first)
    assert warm.status == cold.status == "optimal"
    assert warm.iterations < cold.iterations
    assert abs(warm.value - cold.value) <= 1e-5 * cold.value
    # the same with a tuple carrying the multipliers
    warm_tuple = solve_native(nudged, warm_start=(first.U, first.V, first.b0, first.multipliers))
    assert warm_tuple.iterations == warm.iterations
    # first order: restarting from the solution of the same problem certifies at once
    small = random_problem(21, n=30, d=4, P=6, lam=0.1)
    gated = solve_native(small, gated=True, method="fista", dtype=torch.float64)
    again = solve_native(small, gated=True, method="fista", dtype=torch.float64, warm_start=gated)
    assert gated.status == again.status == "optimal"
    assert again.iterations < gated.iterations


def test_remap_warm_start_matches_identical_patterns():
    problem = random_problem(5, c=2, P=5)
    solution = solve_native(problem)
    old = problem.patterns
    new_column = ~old[:, :1]
    new = torch.cat([old[:, [3, 1]], new_column, old[:, [0]]], dim=1)  # reorder, drop 2 and 4, add one
    U, V, b0, mult = remap_warm_start(old, solution, new)
    assert U.shape == (4, problem.d, 2)
    assert torch.equal(U[0], solution.U[3]) and torch.equal(V[1], solution.V[1])
    assert torch.equal(U[3], solution.U[0])
    assert torch.count_nonzero(U[2]) == 0 and torch.count_nonzero(V[2]) == 0
    dense_old = solution.multipliers.cone.to_dense()
    dense_new = mult.cone.to_dense()
    assert torch.equal(dense_new[:, :, 0], dense_old[:, :, 3])
    assert torch.count_nonzero(dense_new[:, :, 2]) == 0
    # the remapped point is a valid warm start for the new problem
    next_problem = ConvexProblem(problem.X, problem.Y, new, problem.weight_decay, problem.reduction)
    warm = solve_native(next_problem, warm_start=(U, V, b0, mult))
    assert warm.status == "optimal"
    assert abs(warm.value - reference_value(next_problem)) <= 1e-5 * warm.value
    # the tuples solve() takes as a warm start: no output bias, a plain tensor of multipliers
    again = remap_warm_start(old, (solution.U, solution.V, None, solution.multipliers.cone.to_dense()), new)
    assert again[2] is None and torch.equal(again[0], U) and torch.equal(again[3].cone.to_dense(), dense_new)


def test_remap_warm_start_gives_changed_patterns_the_nearest_block():
    problem = random_problem(9, n=40, P=4)
    solution = solve_native(problem)
    old = problem.patterns
    dense_old = solution.multipliers.cone.to_dense()
    flip = int(dense_old[:, :, 1].abs().flatten(1).sum(1).argmax())  # a sample with an active constraint
    assert torch.count_nonzero(dense_old[flip, :, 1]) > 0
    near = old[:, 1].clone()
    near[flip] = ~near[flip]  # one sample changed side
    new = torch.stack([old[:, 0], near, old[:, 1], old[:, 3]], dim=1)
    U, V, _, mult = remap_warm_start(old, solution, new)
    assert torch.equal(U[0], solution.U[0]) and torch.equal(U[3], solution.U[3])
    # old block 1 is taken by two new patterns: shared, so that their predictions add up to the old block's
    assert torch.allclose(U[1], solution.U[1] / 2) and torch.allclose(U[2], solution.U[1] / 2)
    assert torch.allclose(V[1] + V[2], solution.V[1])
    dense_new = mult.cone.to_dense()
    assert torch.equal(dense_new[:, :, 2], dense_old[:, :, 1])
    # the sample that changed side has another constraint: its old multipliers are not carried to it
    others = torch.arange(problem.n) != flip
    assert torch.equal(dense_new[others, :, 1], dense_old[others, :, 1])
    assert torch.count_nonzero(dense_new[flip, :, 1]) == 0
    next_problem = ConvexProblem(problem.X, problem.Y, new, problem.weight_decay, problem.reduction)
    warm = solve_native(next_problem, warm_start=(U, V, solution.b0, mult))
    assert warm.status == "optimal"
    assert abs(warm.value - reference_value(next_problem)) <= 1e-5 * warm.value


def test_bad_inputs_raise_clear_errors():
    problem = random_problem(0)
    X, Y, D = problem.X, problem.Y, problem.patterns
    with pytest.raises(ValueError, match="NaN"):
        ConvexProblem(torch.where(X > 1, float("nan"), X), Y, D, 0.1)
    with pytest.raises(ValueError, match="shape"):
        ConvexProblem(X, Y[:-1], D, 0.1)
    with pytest.raises(ValueError, match="λ"):
        ConvexProblem(X, Y, D, -0.1)
    with pytest.raises(ValueError, match="empty"):
        ConvexProblem(X, Y, D[:, :0], 0.1)
    with pytest.raises(TypeError, match="ConvexProblem"):
        solve_native((X, Y, D))
    with pytest.raises(ValueError, match="method"):
        solve_native(problem, method="sgd")
    with pytest.raises(ValueError, match="tol"):
        solve_native(problem, tol=0.0)
    with pytest.raises(ValueError, match="penalty"):
        solve_native(problem, penalty=-1.0)
    with pytest.raises(ValueError, match="warm start U, V must have shape"):
        solve_native(problem, warm_start=(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.zeros(1)))
    bad = torch.full((problem.num_patterns, problem.d, 1), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        solve_native(problem, warm_start=(bad, bad, torch.zeros(1)))
    with pytest.raises(TypeError, match="warm_start"):
        solve_native(problem, warm_start="previous")
    with pytest.raises(TypeError, match="'tolerance'"):  # an unknown option is named, not ignored
        solve_native(problem, tolerance=1e-3)
    for bad_option in ({"max_iters": 0}, {"time_limit": 0.0}, {"chunk_size": 1.5}, {"dtype": torch.float16},
                       {"constraint_tol": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad_option))):
            solve_native(problem, **bad_option)


def test_native_options_are_checked_once_and_frozen():
    options = NativeOptions(tol=1e-4, max_iters=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tol = 1.0
    with pytest.raises(ValueError, match="method"):
        NativeOptions(method="sgd")
    small, large = random_problem(0), random_problem(0, n=NEWTON_MAX_SAMPLES + 1, d=2, P=1)
    assert NativeOptions().resolved(small).method == "newton" and NativeOptions().resolved(large).method == "fista"
    assert NativeOptions(method="fista").resolved(small).max_iters == 20000
    assert options.resolved(small).max_iters == 7 and options.resolved(small).tol == 1e-4
    assert NativeOptions().working_dtype(small) == torch.float64
    float32 = ConvexProblem(small.X.float(), small.Y.float(), small.patterns, 0.1)
    assert NativeOptions(method="fista").working_dtype(float32) == torch.float32
    assert NativeOptions(method="newton").working_dtype(float32) == torch.float64
    # numpy's integers pass wherever max_iters' did (memory_limit=np.int64(10**9) was refused), as ints
    import numpy as np

    given = NativeOptions(memory_limit=np.int64(10**9), num_threads=np.int32(1), chunk_size=np.int64(64),
                          anderson=np.int64(0))
    assert (given.memory_limit, given.num_threads, given.chunk_size, given.anderson) == (10**9, 1, 64, 0)
    assert all(type(v) is int for v in (given.memory_limit, given.num_threads, given.chunk_size, given.anderson))
    for name, bad in (("memory_limit", 0), ("num_threads", True), ("chunk_size", 2.0), ("anderson", -1)):
        with pytest.raises(ValueError, match=name):
            NativeOptions(**{name: bad})


def test_zero_targets_give_the_zero_solution():
    problem = random_problem(1)
    zero = ConvexProblem(problem.X, torch.zeros_like(problem.Y), problem.patterns, 0.1)
    solution = solve_native(zero)
    assert solution.status == "optimal" and solution.value == 0.0 and solution.dual_value == 0.0


def test_dispatcher():
    problem = random_problem(2)
    assert "native" in available_solvers() and "clarabel" in available_solvers()
    with pytest.raises(ValueError, match="available"):
        solve(problem, "gurobi-ish")
    assert choose_solver(problem) == ("clarabel" if problem.n * problem.d * problem.num_patterns
                                      <= AUTO_NATIVE_ABOVE else "native")
    big = random_problem(2, n=200, d=10, P=20)
    assert choose_solver(big) == "native"
    # between the two switch points the native solver takes a problem with λ > 0, Clarabel the same one with λ = 0
    # (whose optimum the native solver cannot certify)
    middle = random_problem(2, n=100, d=10, P=10)
    assert AUTO_NATIVE_ABOVE < problem_size(middle) <= AUTO_NATIVE_ABOVE_UNREGULARIZED
    assert choose_solver(middle) == "native"
    unregularized = random_problem(2, n=100, d=10, P=10, lam=0.0)
    assert choose_solver(unregularized) == "clarabel"
    assert choose_solver(random_problem(2, n=200, d=10, P=20, lam=0.0)) == "native"
    ref = reference_value(problem)
    for name in ("auto", "native", "clarabel", "ECOS"):
        # the callback's warm start is an option of every solver (the conic ones start cold); "auto" passes the
        # native tolerance on only to the native solver
        options = {"tol": 1e-7} if name in ("auto", "native") else {}
        solution = solve(problem, name, warm_start=problem.zeros(), **options)
        assert abs(solution.value - ref) <= 1e-5 * ref, name
    for name in ("clarabel", "ECOS"):  # a named solver refuses an option it does not take
        with pytest.raises(TypeError, match="'tol'"):
            solve(problem, name, warm_start=problem.zeros(), tol=1e-7)


def test_step_to_the_boundary():
    """``max_step``: the largest α ≤ 1 with x + α dx ≥ 0, ignoring entries fixed at zero (x = dx = 0)."""
    from hcl.convex.native.interior_point import max_step

    x = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    dx = torch.tensor([-4.0, 1.0, -0.25, 0.0, 0.0], dtype=torch.float64)
    assert max_step(x, dx) == pytest.approx(0.25)  # the first entry reaches 0 first
    assert max_step(x, dx.abs()) == 1.0
    assert max_step(x, -0.5 * x) == 1.0  # reaching half way at α = 1
    assert max_step(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)) == 0
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1000, generator=g, dtype=torch.float64) + 1e-3
    dx = torch.randn(1000, generator=g, dtype=torch.float64)
    alpha = max_step(x, dx)
    assert bool((x + alpha * dx >= -1e-12).all())
    assert alpha == 1.0 or float((x + alpha * dx).min()) <= 1e-12  # no longer step is allowed


@pytest.mark.parametrize("bias,signs,outputs", [(False, False, (1, False)), (True, True, (1, False)),
                                                (True, False, (3, True)), (False, True, (3, False))])
def test_certificate_from_the_iterations_products_equals_its_own(bias, signs, outputs):
    """The interior point hands its residual and its products with Xᵀ to the certificate instead of recomputing
    them: at any point the bound must be the one the certificate computes itself."""
    from hcl.convex.native.certificate import certificate
    from hcl.convex.native.operator import Operator

    c, one_vs_all = outputs
    problem = random_problem(9, n=30, d=4, P=6, c=c, one_vs_all=one_vs_all, bias=bias, signs=signs, lam=0.05)
    op = Operator(problem, gated=False, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(op.d, 2, op.P, op.c, generator=g, dtype=torch.float64) * op.wmask
    mu = torch.rand(op.n, 2, op.P, op.c, generator=g, dtype=torch.float64) * op.cmask
    Z = op.forward(W)
    r, _ = op.residual(Z)
    known = (r, 2.0 * op.adjoint_data(r) - op.adjoint_constraint(mu))
    own, own_worst = certificate(op, Z, mu)
    handed, handed_worst = certificate(op, Z, mu, known=known)
    assert own < 0 or own > 0  # a nonzero bound, so that the comparison means something
    assert handed == pytest.approx(own, rel=1e-12, abs=1e-14)
    assert handed_worst == pytest.approx(own_worst, rel=1e-12)
