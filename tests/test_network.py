"""hcl.network: finding the two-layer ReLU stack of a module, checking its forward pass, loading convex weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hcl import TwoLayerReLU
from hcl.convex import ConvexProblem, ConvexSolution, problem_from_network
from hcl.network import ReLUStack, find_relu_stack


class _Wrapped(nn.Module):
    def __init__(self, *stacks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(stacks)

    def forward(self, x):
        return self.blocks[0](x)


class _TwoLinears(nn.Module):
    """Not a Sequential: the layers must be named."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 5)
        self.second = nn.Linear(5, 2)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _stack(d=3, m=5, c=1, bias=True, output_bias=True) -> ReLUStack:
    torch.manual_seed(0)
    return ReLUStack(nn.Linear(d, m, bias=bias).double(), nn.Linear(m, c, bias=output_bias).double(), "test")


# ------------------------------------------------------------------------------------------------ find_relu_stack
def test_found_in_a_two_layer_relu_and_in_a_plain_sequential():
    model = TwoLayerReLU(in_features=4, hidden=6)
    stack = find_relu_stack(model)
    assert stack.hidden is model.hidden_layer and stack.output is model.output_layer
    assert stack.name == "hidden_layer" and stack.in_features == 4

    sequential = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    stack = find_relu_stack(sequential)
    assert stack.hidden is sequential[1] and stack.output is sequential[3] and stack.name == "1"

    wrapped = _Wrapped(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert find_relu_stack(wrapped).name == "blocks.0.0"


def test_named_stacks_are_found_by_layer_and_output_layer():
    two = _Wrapped(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)),
                   nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)))
    stack = find_relu_stack(two, layer="blocks.1.0")
    assert stack.hidden is two.blocks[1][0] and stack.output is two.blocks[1][2]

    module = _TwoLinears()
    stack = find_relu_stack(module, layer="first", output_layer="second")
    assert stack.hidden is module.first and stack.output is module.second and stack.name == "first"


@pytest.mark.parametrize(
    "module, layer, output_layer, message",
    [
        (nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)), None, None,
         r"no two-layer ReLU stack.*Linear layers found: \['0', '2', '4'\]"),
        (_Wrapped(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)),
                  nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))), None, None,
         r"2 two-layer ReLU stacks found.*blocks.0.0.*blocks.1.0.*name one with layer="),
        (_TwoLinears(), "third", None, r"layer='third' is not an nn.Linear.*\['first', 'second'\]"),
        (_TwoLinears(), "first", None, r"not followed by ReLU and Linear in an nn.Sequential"),
        (_TwoLinears(), "first", "nothing", r"output_layer='nothing' is not an nn.Linear"),
        (nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(4, 1)), "0", None, r"takes 4 inputs.*has 5 neurons"),
    ],
    ids=["deeper", "two-stacks", "unknown-layer", "no-sequential", "unknown-output", "widths"],
)
def test_refused_with_a_message_that_says_what_was_found(module, layer, output_layer, message):
    with pytest.raises(ValueError, match=message):
        find_relu_stack(module, layer, output_layer)


def test_inputs_are_flattened_and_checked_against_the_hidden_width():
    stack = _stack(d=6)
    X = stack.inputs(torch.randn(4, 2, 3))
    assert X.shape == (4, 6) and X.dtype == torch.float64
    with pytest.raises(ValueError, match="5 features per sample but the hidden layer 'test' expects 6"):
        stack.inputs(torch.randn(4, 5))


# -------------------------------------------------------------------------------------------------- check_forward
def test_check_forward_accepts_the_stack_and_a_model_that_computes_it():
    X = torch.randn(20, 3, dtype=torch.float64)
    model = TwoLayerReLU(in_features=3, hidden=5, bias=True, output_bias=True).double()
    model.train()
    stack = find_relu_stack(model)
    stack.check_forward(model, X)
    assert model.training and all(m.training for m in model.modules())  # modes restored

    sequential = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    find_relu_stack(sequential).check_forward(sequential, X)


def test_check_forward_refuses_a_model_that_computes_something_else():
    X = torch.randn(20, 3, dtype=torch.float64)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)).double()

        def forward(self, x):
            return 2.0 * self.net(x)

    scaled = Scaled()
    with pytest.raises(ValueError, match="differs from that of its two-layer ReLU stack"):
        find_relu_stack(scaled).check_forward(scaled, X)

    class TwoHeads(Scaled):
        def forward(self, x):
            return torch.cat([self.net(x), self.net(x)], dim=1)

    two_heads = TwoHeads()
    with pytest.raises(ValueError, match=r"output \(\(8, 2\)\) is not that of its two-layer ReLU stack"):
        find_relu_stack(two_heads).check_forward(two_heads, X)


def test_check_forward_lets_through_what_it_cannot_compare():
    class DictInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))

        def forward(self, batch: dict):
            if not isinstance(batch, dict):
                raise TypeError(f"expected a dict batch, got {type(batch).__name__}")
            return self.net(batch["x"])

    model = DictInput()
    model.train()
    find_relu_stack(model).check_forward(model, torch.randn(4, 3))
    assert model.training


# ---------------------------------------------------------------------------------- mapped_weights / load_weights
def _solved(stack: ReLUStack, X: torch.Tensor, Y: torch.Tensor) -> tuple[ConvexProblem, ConvexSolution]:
    """The network's own point as a convex solution: mapping it back must reproduce the network's output."""
    weight, bias, output_weight, output_bias = stack.weights()
    problem, (U, V, b0) = problem_from_network(X, Y, weight, bias, output_weight, output_bias, weight_decay=0.0,
                                               reduction="mean", formulation="neurons")
    return problem, ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status="optimal",
                                   solver="test", solve_seconds=0.0)


@pytest.mark.parametrize("bias,output_bias", [(True, True), (False, False)])
def test_mapped_weights_loaded_into_the_stack_keep_its_output(bias, output_bias):
    stack = _stack(bias=bias, output_bias=output_bias)
    X = torch.randn(30, 3, dtype=torch.float64)
    Y = torch.randn(30, 1, dtype=torch.float64)
    with torch.no_grad():
        before = stack.output(torch.relu(stack.hidden(X)))
    W, A, b0 = stack.mapped_weights(*_solved(stack, X, Y))
    assert W.device.type == "cpu" and W.shape[1] == 3 + bias and A.shape == (1, W.shape[0])
    assert W.shape[0] <= 5

    with torch.no_grad():
        stack.hidden.weight.normal_()  # something else, overwritten below
    stack.load_weights(W, A, b0)
    with torch.no_grad():
        after = stack.output(torch.relu(stack.hidden(X)))
    assert torch.allclose(after, before, atol=1e-10)
    unused = stack.hidden.weight[W.shape[0]:]
    assert torch.equal(unused, torch.zeros_like(unused))  # padding neurons are zero
    assert torch.equal(stack.output.weight[:, W.shape[0]:], torch.zeros(1, 5 - W.shape[0], dtype=torch.float64))


def test_a_solution_wider_than_the_stack_is_refused():
    stack = _stack(m=5)
    X = torch.randn(30, 3, dtype=torch.float64)
    problem, solution = _solved(stack, X, torch.randn(30, 1, dtype=torch.float64))
    narrow = ReLUStack(nn.Linear(3, 1).double(), nn.Linear(1, 1).double(), "narrow")
    needed = solution.active_neurons()
    assert needed > 1
    with pytest.raises(ValueError, match=f"needs {needed} neurons but the network has 1"):
        narrow.mapped_weights(problem, solution)
    W, A, b0 = stack.mapped_weights(problem, solution)
    with pytest.raises(ValueError, match="do not fit in the hidden layer 'narrow' of 1"):
        narrow.load_weights(W, A, b0)


def test_a_solution_that_cannot_be_mapped_is_a_value_error():
    stack = _stack()
    X = torch.randn(10, 3, dtype=torch.float64)
    problem, solution = _solved(stack, X, torch.randn(10, 1, dtype=torch.float64))
    solution.U = None  # a failed solve carries no point
    with pytest.raises(ValueError, match="could not be mapped to network weights"):
        stack.mapped_weights(problem, solution)


def test_a_solvers_optimum_maps_without_its_leftovers():
    """A solver leaves columns at rounding level (1e-12) that are no neurons: they neither make the solution too wide
    for the network nor change its objective."""
    from hcl.convex import solve

    torch.manual_seed(0)
    X, Y = torch.randn(30, 2, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 1)).double()
    stack = find_relu_stack(net)
    problem, _ = problem_from_network(X, Y, *stack.weights(), weight_decay=0.05, reduction="mean")
    solution = solve(problem, "clarabel")
    columns = torch.cat([solution.U.norm(dim=1).flatten(), solution.V.norm(dim=1).flatten()])
    assert int((columns > 0).sum()) > 10 >= solution.active_neurons(problem=problem)  # leftovers would not fit
    W, A, b0 = stack.mapped_weights(problem, solution)
    assert W.shape[0] == solution.active_neurons(problem=problem)
    stack.load_weights(W, A, b0)
    with torch.no_grad():
        out = net(X).reshape(-1)
        L = (out - Y).square().mean() + 0.05 * (net[0].weight.square().sum() + net[0].bias.square().sum()
                                                + net[2].weight.square().sum())
    assert float(L) == pytest.approx(solution.value, rel=1e-7)
