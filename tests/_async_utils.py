"""What the asynchronous monitor's tests share: a small training run and a solver that takes its time."""

from __future__ import annotations

import time

import torch
from _events import read_scalars

from hcl import TwoLayerReLU
from hcl.convex.problem import ConvexSolution
from hcl.datamodules import SyntheticRegression


def small_run(make_trainer):
    """``run(root, callbacks, max_steps=10, checkpoint=False)``: train a small network, return the logged scalars."""

    def run(root, callbacks, max_steps=10, checkpoint=False):
        torch.manual_seed(0)
        data = SyntheticRegression(kind="gaussian_linear", n=40, d=5, seed=0, dtype="float64")
        model = TwoLayerReLU(in_features=5, hidden=8, init="normal", init_scale=0.5, lr=0.05)
        make_trainer(callbacks, max_steps, root=root, enable_checkpointing=checkpoint).fit(model, datamodule=data)
        return read_scalars(root)

    return run


def steps_of(series, tag):
    return [step for step, _ in series.get(tag, [])]


# Module-level solvers: the worker process imports them by name. The thread-worker tests use solvers that stay out
# of cvxpy, whose warnings.catch_warnings (process-global state) would race with pytest.warns on the main thread.
def slow_solve(problem, solver, *, gated=False, warm_start=None, **options):
    """The network's own feasible point, returned after 50 ms (value = L: a valid, if poor, upper bound)."""
    time.sleep(0.05)
    U, V, b0 = warm_start
    return ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status="optimal",
                          solver="slow", solve_seconds=0.05)
