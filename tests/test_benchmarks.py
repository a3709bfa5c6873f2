"""benchmarks/trajectories.py's instance builder on a tiny network (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hcl.convex import solve
from hcl.convex.native import remap_warm_start
from hcl.convex.problem import fold_bias, fold_weights, network_objective
from hcl.convex.snapshot import WarmStartChain
from hcl.patterns import activation_patterns

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trajectories.py"
N, D, M, LAM, SEED = 40, 4, 8, 1e-2, 3


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("trajectories", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trajectories"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("trajectories", None)


def test_trajectory_is_full_batch_gradient_descent(tr):
    X, y = tr.trajectory_data(N, D, SEED)
    assert X.shape == (N, D - 1) and y.shape == (N,) and X.dtype == torch.float64
    kept = tr.train_trajectory(X, y, M, LAM, SEED, [0, 1, 5])
    assert [w.step for w in kept] == [0, 1, 5]
    again = tr.train_trajectory(X, y, M, LAM, SEED, [5])
    assert torch.equal(again[0].hidden_weight, kept[2].hidden_weight)  # deterministic for a seed

    def objective(w):
        Xf, Wf = fold_bias(X, True), fold_weights(w.hidden_weight, w.hidden_bias)
        return network_objective(Xf, y, Wf, w.output_weight, None, LAM, "mean")

    # step 0 → 1 is one plain gradient step of the mean objective with the penalty, lr 0.05
    params = [kept[0].hidden_weight.clone().requires_grad_(True), kept[0].hidden_bias.clone().requires_grad_(True),
              kept[0].output_weight.clone().requires_grad_(True)]
    loss = (torch.relu(X @ params[0].T + params[1]) @ params[2].T - y[:, None]).square().mean()
    loss = loss + LAM * sum(p.square().sum() for p in params)
    grads = torch.autograd.grad(loss, params)
    expected = [p.detach() - 0.05 * g for p, g in zip(params, grads)]
    for got, want in zip((kept[1].hidden_weight, kept[1].hidden_bias, kept[1].output_weight), expected):
        torch.testing.assert_close(got, want)
    assert objective(kept[2]) < objective(kept[1]) < objective(kept[0])


@pytest.mark.parametrize("formulation", ["patterns", "neurons"])
def test_trajectory_problems_are_the_networks_patterns(tr, formulation):
    problems = tr.trajectory_problems(N, D, M, LAM, SEED, formulation, step=4, gaps=(1, 3))
    assert len(problems) == 3
    X, y = tr.trajectory_data(N, D, SEED)
    kept = tr.train_trajectory(X, y, M, LAM, SEED, [4, 5, 7])
    for problem, weights in zip(problems, kept):
        assert (problem.n, problem.d, problem.c) == (N, D, 1)  # the bias column folded in
        assert problem.reduction == "mean" and problem.weight_decay == LAM
        D_net = activation_patterns(fold_bias(X, True), fold_weights(weights.hidden_weight, weights.hidden_bias))
        live = D_net[:, D_net.any(dim=0)]
        if formulation == "neurons":
            assert torch.equal(problem.patterns, live)
            assert problem.signs is not None
        else:
            assert problem.num_patterns == len({tuple(col.tolist()) for col in live.T})
    assert tr.new_patterns(problems[0].patterns, problems[0].patterns) == 0


def test_warm_start_is_the_monitors_chain(tr):
    before, after = tr.trajectory_problems(N, D, M, LAM, SEED, "patterns", step=4, gaps=(10,))
    previous = solve(before, "native")
    chain = WarmStartChain()
    chain.keep(before, previous)
    from_chain = chain.start_for(after, gated=False)
    ours = remap_warm_start(before.patterns, previous, after.patterns)
    for a, b in zip(from_chain[:3], ours[:3]):
        assert torch.equal(a, b)
    assert ours[0].shape[0] == after.num_patterns


@pytest.mark.slow  # two solves, each in a fresh process
def test_the_mnist_monitor_benchmark_runs_end_to_end(tmp_path):
    """On tiny files in MNIST's format: every row a certified bracket from its own fresh process."""
    import math
    import struct
    import subprocess

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 200), ("t10k", 10)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8).numpy().tobytes()
        labels = (torch.arange(n) % 10).to(torch.uint8).numpy().tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_monitor.py"
    # one snapshot (each solve starts a process of its own, a few seconds each)
    args = [sys.executable, str(script), "--root", str(tmp_path), "--sizes", "150", "--seeds", "0", "--steps", "2",
            "--time-limit", "2", "--threads", "1"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 150 ")]
    assert [(r[2].strip(), r[4].strip()) for r in rows] == [("2", "admm"), ("2", "fista")]
    for r in rows:
        lower, value, violation = float(r[6]), float(r[7]), float(r[9])
        assert lower >= 0.0 and math.isfinite(value)
        if violation <= 1e-6:  # a feasible point: its value bounds the optimum from above
            assert lower <= value


@pytest.mark.slow  # a fresh process
def test_the_mnist_monitor_benchmark_reports_its_child_processs_own_memory(monkeypatch):
    """A spawned child keeps its parent's ru_maxrss: with 1 GiB once held by the parent, a tiny solve read 1.8 GiB."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from hcl.convex import ConvexProblem

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the child imports the script and its neighbours by name
    import mnist_monitor

    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y, gates = torch.randn(30, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    problem = ConvexProblem(X, y, X @ gates >= 0, weight_decay=1e-2)
    held = torch.ones(2**27, dtype=torch.float64)  # 1 GiB resident in the parent
    parent_gib = mnist_monitor.status_kib("VmRSS") / 2**20
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        row = pool.submit(mnist_monitor.measure, problem, "admm", {"tol": 1e-4}).result()
    del held
    assert row["status"] == "optimal"
    assert 0.05 < row["start_gib"] <= row["peak_gib"] < parent_gib - 0.5, (row, parent_gib)
