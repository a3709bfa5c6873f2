"""GlobalOptimumMonitor's bracket: its lower end is the best certified value it has, its upper end exists only where
the all-patterns problem is the exact one (one output), and a fit on other inputs solves again."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hcl import TwoLayerReLU
from hcl.callbacks.global_optimum import GlobalOptimumMonitor
from hcl.convex import global_lower_bound

X = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]


def _loader(X: torch.Tensor, Y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=len(X))


def test_the_lower_bound_is_the_larger_of_the_solvers_dual_value_and_the_fits_certificate(make_trainer):
    monitor = GlobalOptimumMonitor(solver="scs", solver_options={"max_iters": 20})
    model = TwoLayerReLU(in_features=1, hidden=6, bias=True, weight_decay=0.01, lr=1e-9).double()
    make_trainer([monitor], max_steps=1, logger=False).fit(model, _loader(X, torch.sin(3 * X)))
    problem, solution = monitor.problem, monitor.solution
    certificate = global_lower_bound(problem.X, problem.Y, problem.predict(solution.U, solution.V, solution.b0),
                                     weight_decay=0.01, reduction="mean", bias=False, output_bias=False).lower_bound
    assert solution.dual_value is not None and abs(solution.dual_value - certificate) > 1e-3  # the case under test
    assert monitor.lower_bound == pytest.approx(max(solution.dual_value, certificate), rel=1e-12)


def test_with_two_outputs_no_upper_bound_is_logged(make_trainer):
    """The all-patterns problem of c > 1 outputs is a relaxation: its value bounds the networks from below only."""
    X2 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.2], [0.3, 0.9]], dtype=torch.float64)
    Y2 = torch.stack([X2.sum(1), X2[:, 0] - X2[:, 1]], 1)
    monitor = GlobalOptimumMonitor()
    model = TwoLayerReLU(in_features=2, hidden=6, out_features=2, bias=True, weight_decay=0.01, lr=0.1).double()
    trainer = make_trainer([monitor], max_steps=1, logger=False)
    trainer.fit(model, _loader(X2, Y2))
    logged = {tag for tag in trainer.callback_metrics if tag.startswith("convex/global")}
    assert "convex/global_lower_bound" in logged and monitor.lower_bound is not None
    assert not logged & {"convex/global_upper_bound", "convex/global_optimum", "convex/global_gap"}, logged
    assert monitor.upper_bound is None and monitor.optimum is None


def test_another_fit_of_the_same_trainer_on_other_inputs_solves_again(make_trainer):
    """Other inputs with the same targets and λ kept the first data's optimum (0.154668 where p*_all is 0.151126)."""
    Y = torch.sin(3 * X)
    monitor = GlobalOptimumMonitor(every_n_steps=1)
    model = TwoLayerReLU(in_features=1, hidden=6, bias=True, weight_decay=0.01, lr=0.1).double()
    trainer = make_trainer([monitor], max_steps=2, logger=False)
    trainer.fit(model, _loader(X, Y))
    first = monitor.optimum
    trainer.fit_loop.epoch_loop.max_steps = 4
    other = torch.linspace(-2, 0.5, 8, dtype=torch.float64)[:, None]
    trainer.fit(model, _loader(other, Y))
    fresh = GlobalOptimumMonitor(every_n_steps=1)
    new_model = TwoLayerReLU(in_features=1, hidden=6, bias=True, weight_decay=0.01).double()
    make_trainer([fresh], max_steps=1, logger=False).fit(new_model, _loader(other, Y))
    assert fresh.optimum is not None and abs(fresh.optimum - first) > 1e-3 * first  # the case under test
    assert monitor.optimum == pytest.approx(fresh.optimum, rel=1e-9)
