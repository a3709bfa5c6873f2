"""``ConvexProblem`` names bad input when it is built, and keeps the problem it was given exactly."""

from __future__ import annotations

import pytest
import torch
from test_native_solver import random_problem

from hcl.convex import solve
from hcl.convex.native import dual_certificate, solve_native
from hcl.convex.problem import ConvexProblem, fold_bias
from hcl.convex.status import Status


def _data(n: int = 30, d: int = 4, P: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return dict(X=X, Y=torch.randn(n, generator=g, dtype=torch.float64),
                patterns=X @ torch.randn(d, P, generator=g, dtype=torch.float64) > 0, weight_decay=0.01)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k: {"X": k["X"][:, :0]}, r"no features \(d = 0\)"),
        (lambda k: {"Y": k["Y"].reshape(-1, 1)[:, :0]}, r"no outputs \(c = 0\)"),
        (lambda k: {"patterns": torch.full(k["patterns"].shape, 0.5)}, "boolean or 0/1"),
        (lambda k: {"patterns": torch.full(k["patterns"].shape, float("nan"))}, "boolean or 0/1"),
        (lambda k: {"patterns": k["patterns"].int() * 2}, "boolean or 0/1"),
        (lambda k: {"signs": torch.tensor([0.5, 0.0, 1.0, -1.0, 0.0])}, r"-1, 0 or \+1"),
        (lambda k: {"signs": torch.tensor([float("nan"), 0.0, 1.0, -1.0, 0.0])}, r"-1, 0 or \+1"),
        (lambda k: {"signs": torch.tensor([2, 0, 1, -1, 0])}, r"-1, 0 or \+1"),
        (lambda k: {"signs": torch.tensor([256, 0, 1, -1, 0])}, r"-1, 0 or \+1"),  # int8 would wrap it to 0
        (lambda k: {"Y": k["Y"].numpy()}, "Y must be a tensor, got ndarray"),
        (lambda k: {"patterns": k["patterns"].numpy()}, "patterns must be a tensor, got ndarray"),
        (lambda k: {"weight_decay": 1e308}, "too large: the convex program's weight 2λ overflows"),
    ],
    ids=["d=0", "c=0", "pattern 0.5", "pattern nan", "pattern 2", "sign 0.5", "sign nan", "sign 2", "sign 256",
         "numpy Y", "numpy patterns", "λ 1e308"],
)
def test_bad_input_is_named_when_the_problem_is_built(change, message):
    kwargs = _data()
    kwargs.update(change(kwargs))
    with pytest.raises(ValueError, match=message):
        ConvexProblem(**kwargs)


@pytest.mark.parametrize("weight_decay", ["0.1", True, None])
def test_a_weight_decay_that_is_not_a_number_is_named(weight_decay):
    with pytest.raises(TypeError, match=r"weight_decay \(λ\) must be a number"):
        ConvexProblem(**{**_data(), "weight_decay": weight_decay})


def test_data_of_another_array_type_is_named_as_such():
    X = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="X must be a torch.Tensor \\(n, d\\), got ndarray"):  # "got shape (6, 2)"
        ConvexProblem(X.numpy(), torch.ones(6), torch.ones(6, 1, dtype=torch.bool), weight_decay=0.1)


def test_data_that_requires_grad_is_solved_as_plain_data():
    kwargs = _data()
    plain = solve(ConvexProblem(**kwargs), "native")
    graph = {**kwargs, "X": kwargs["X"].clone().requires_grad_(), "Y": kwargs["Y"].clone().requires_grad_()}
    solution = solve(ConvexProblem(**graph), "native")  # the interior point writes into buffers: it raised
    assert solution.value == pytest.approx(plain.value, rel=1e-12)


def test_zero_one_patterns_and_integral_float_signs_are_the_boolean_and_integer_ones():
    kwargs = _data()
    plain = ConvexProblem(**kwargs, signs=torch.tensor([1, 0, -1, 0, 1]))
    other = ConvexProblem(**{**kwargs, "patterns": kwargs["patterns"].double()}, signs=[1.0, 0.0, -1.0, 0.0, 1.0])
    assert torch.equal(plain.patterns, other.patterns) and torch.equal(plain.signs, other.signs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_data_is_solved_as_the_float32_problem_it_exactly_is(dtype):
    kwargs = _data()
    half = {**kwargs, "X": kwargs["X"].to(dtype), "Y": kwargs["Y"].to(dtype)}
    problem = ConvexProblem(**half)
    assert problem.X.dtype == problem.Y.dtype == torch.float32
    # the same numbers: half precision's values are float32's
    assert torch.equal(problem.X, half["X"].float()) and torch.equal(problem.Y, half["Y"].float().reshape(-1, 1))
    solution = solve(problem, "native")
    reference = solve(ConvexProblem(**{**kwargs, "X": half["X"].double(), "Y": half["Y"].double()}), "clarabel")
    # certified, where half-precision storage of the solution made it "optimal_inaccurate" before
    assert Status.of(solution.status) is Status.OPTIMAL
    assert solution.value == pytest.approx(reference.value, rel=1e-5)


def test_float32_asked_of_the_native_solver_is_refused_for_newton_and_auto_takes_a_first_order_method():
    problem = ConvexProblem(**_data(n=40, P=6))
    with pytest.raises(ValueError, match="dtype float32 with method 'newton'"):
        solve(problem, "native", method="newton", dtype=torch.float32)
    solution = solve(problem, "native", dtype=torch.float32)  # Cholesky of float32 barrier systems failed here
    reference = solve(problem, "clarabel")
    assert Status.of(solution.status) is Status.OPTIMAL
    assert solution.dual_value <= reference.value * (1 + 1e-9) and solution.value >= reference.value * (1 - 1e-9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_weight": lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))}, "hidden_weight contains NaN"),
        ({"X": lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))}, "X contains NaN or inf"),
        ({"output_weight": lambda t: t * float("inf")}, "output_weight contains NaN or inf"),
        ({"output_bias": lambda t: torch.zeros(3, dtype=torch.float64)}, r"output_bias must have one entry per "
                                                                          r"output \(1\)"),
        ({"hidden_bias": lambda t: torch.zeros(5, dtype=torch.float64)}, r"one entry per neuron \(4\)"),
        ({"X": lambda t: t.numpy()}, "X must be a tensor, got ndarray"),
    ],
    ids=["nan hidden weight", "nan X", "inf output weight", "output bias of 3 for c=1", "hidden bias of 5", "numpy X"],
)
def test_a_network_given_to_problem_from_network_is_checked_by_name(change, message):
    from hcl.convex import problem_from_network

    g = torch.Generator().manual_seed(0)
    network = {"X": torch.randn(20, 3, generator=g, dtype=torch.float64),
               "Y": torch.randn(20, generator=g, dtype=torch.float64),
               "hidden_weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
               "hidden_bias": torch.randn(4, generator=g, dtype=torch.float64),
               "output_weight": torch.randn(1, 4, generator=g, dtype=torch.float64),
               "output_bias": torch.zeros(1, dtype=torch.float64)}
    (name, edit), = change.items()
    network[name] = edit(network[name])
    with pytest.raises(ValueError, match=message):
        problem_from_network(*network.values(), weight_decay=0.01, reduction="mean")


def test_native_options_take_numpy_numbers_and_refuse_bools_strings_and_tolerances_of_one_or_more():
    import numpy as np

    from hcl.convex.native.options import NativeOptions

    options = NativeOptions(tol=np.float32(1e-4), max_iters=np.int64(3))
    assert isinstance(options.tol, float) and options.tol == pytest.approx(1e-4) and options.max_iters == 3
    for bad, message in (({"tol": True}, "tol must be a relative tolerance in"), ({"tol": 2}, r"in \(0, 1\)"),
                         ({"max_iters": True}, "max_iters must be a positive integer"),
                         ({"time_limit": "5"}, "time_limit must be a finite number > 0"),
                         ({"penalty": "a"}, "penalty must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            NativeOptions(**bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_networks_problem_on_half_precision_data_keeps_its_targets_and_weights(dtype):
    """problem_from_network on half-precision X builds the float32 problem ConvexProblem would: float32 targets and
    weights are not rounded to half precision on the way (targets near 1000 moved by up to 0.5)."""
    from hcl.convex import problem_from_network

    torch.manual_seed(0)
    X = torch.randn(50, 3).to(dtype)
    Y = torch.randn(50) * 100 + 1000
    W, b, A = torch.randn(6, 3), torch.randn(6), torch.randn(1, 6)
    half, (U, V, _) = problem_from_network(X, Y, W, b, A, torch.zeros(1), weight_decay=0.1, reduction="mean")
    full, (U32, V32, _) = problem_from_network(X.float(), Y, W, b, A, torch.zeros(1), weight_decay=0.1,
                                               reduction="mean")
    assert half.X.dtype == torch.float32
    assert torch.equal(half.Y, full.Y) and torch.equal(half.patterns, full.patterns)
    assert torch.equal(U, U32) and torch.equal(V, V32)


@pytest.mark.parametrize("options,message", [
    ({"output_bias": "no"}, "output_bias must be a bool, got 'no'"),
    ({"one_vs_all": 1}, "one_vs_all must be a bool"),
    ({"signs": torch.ones(2, 2)}, r"signs must have one entry per pattern, shape \(4,\), got \(2, 2\)"),
])
def test_flags_and_signs_of_the_wrong_kind_are_refused(options, message):
    """"no" read as True (an output bias added), and a (2, 2) sign matrix was taken as four signs."""
    X = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        ConvexProblem(X, torch.randn(6, dtype=torch.float64), X @ torch.randn(2, 4, dtype=torch.float64) >= 0,
                      weight_decay=0.1, **options)


def test_multipliers_that_are_not_finite_are_refused_not_turned_into_a_bound():
    # a NaN μ made the bound the unconstrained maximum, above p*, and a warm start from it "optimal" after one step
    problem = random_problem(104, lam=0.05)
    solution = solve_native(problem)
    cone = solution.multipliers.cone.to_dense()
    for bad in (cone * float("nan"), cone + float("inf")):
        with pytest.raises(ValueError, match="the point's multipliers contain NaN or inf"):
            dual_certificate(problem, solution.U, solution.V, solution.b0, bad)
        with pytest.raises(ValueError, match="warm start multipliers contain NaN or inf"):
            solve_native(problem, warm_start=(solution.U, solution.V, solution.b0, bad))
    with pytest.raises(ValueError, match=r"the point's U, V must have shape"):  # was torch's size mismatch
        dual_certificate(problem, solution.U[:1], solution.V[:1])


def test_a_warm_start_is_data_of_any_array_type_and_garbage_is_named():
    problem = random_problem(105, lam=0.05)
    solution = solve_native(problem)
    for start in ((solution.U.clone().requires_grad_(), solution.V, solution.b0),  # was a matmul out= error
                  (solution.U.numpy(), solution.V.numpy(), solution.b0.numpy())):  # was isfinite's TypeError
        assert solve_native(problem, warm_start=start).status == "optimal"
    with pytest.raises(TypeError, match="warm start U must be a tensor, got str"):
        solve_native(problem, warm_start=("a", "b", "c"))
    with pytest.raises(TypeError, match="warm start multipliers must be a tensor, got str"):
        solve_native(problem, warm_start=(solution.U, solution.V, solution.b0, "x"))


def test_a_forbidden_signs_violation_is_in_data_units_and_the_gap_floor_ignores_a_constant_with_an_output_bias():
    """A block its sign forbids counts by the largest prediction it could make (it scales with X); with an output
    bias a constant added to every target changes neither the optimum nor the least denominator of relative gaps."""
    F64 = dict(dtype=torch.float64)
    X = torch.tensor([[1000.0, 1.0]] * 3 + [[-1000.0, 1.0]] * 3, **F64)
    for scale in (1.0, 1e-3):
        problem = ConvexProblem(X * scale, torch.ones(6, 1, **F64), X[:, :1] >= 0, signs=torch.tensor([1]))
        U, V, _ = problem.zeros()
        V[0, 0, 0] = 1e-3  # inside V's cone, but V is forbidden
        change = float((problem.X @ V[0]).abs().max())
        assert float(problem.violation(U, V)) >= change > 0
    g = torch.Generator().manual_seed(0)
    Xf = fold_bias(torch.randn(40, 2, generator=g, **F64), True)
    Y = 0.01 * torch.randn(40, 1, generator=g, **F64)
    D = torch.rand(40, 5, generator=g) < 0.5
    floors = [ConvexProblem(Xf, Y + shift, D, weight_decay=1e-3, output_bias=True).gap_floor for shift in (0.0, 100.0)]
    assert floors[1] == pytest.approx(floors[0], rel=1e-9)
