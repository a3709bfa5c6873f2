"""The benchmark scripts: trajectories.py's instance builder on a tiny network and its table on scripted solves,
mnist_monitor.py end to end and its memory reading (no timing is asserted)."""

from __future__ import annotations

import dataclasses
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
        lower, value, gap, violation = float(r[6]), float(r[7]), float(r[8]), float(r[9])
        assert lower >= 0.0 and math.isfinite(value)
        # the stopping rule's gap, printed to three digits
        assert gap == pytest.approx((value - lower) / abs(value), rel=5e-3, abs=1e-6)
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


def test_the_trajectory_table_s_ratios_differences_and_medians(tr, monkeypatch):
    """On a scripted clock and scripted solves (no solver runs): the reference value comes from certified cvxpy solves
    only, its time from any usable one; the larger native difference is reported and a native value off the reference
    by more than 1e-6 gets no ratio; each solve's time is its fastest repeat; medians are per step gap."""
    from types import SimpleNamespace

    from hcl.convex import ConvexProblem
    from hcl.convex.solution import ConvexSolution

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 2, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    before = ConvexProblem(X, y, X @ torch.randn(2, 3, generator=g, dtype=torch.float64) >= 0, weight_decay=0.1)
    now, script = [0.0], {}

    def scripted_solve(problem, solver, warm_start=None, **options):
        kind = "previous" if problem is before else "warm" if warm_start is not None else solver
        seconds, value, status, iterations = script[kind].pop(0) if kind != "previous" else (0.0, 10.0, "optimal", 1)
        now[0] += seconds
        zero = torch.zeros(1)
        return ConvexSolution(value, zero, zero, zero, status, solver, seconds, iterations)

    monkeypatch.setattr(tr, "solve", scripted_solve)
    monkeypatch.setattr(tr, "remap_warm_start", lambda *args: "start")
    monkeypatch.setattr(tr, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    args = SimpleNamespace(repeats=2, solvers=["clarabel", "ecos"])
    ecos = [(2.0, 9.99, "optimal_inaccurate", 9)] * 2  # fastest, uncertified and 0.1 % low: a time, not a value
    rows = []
    # step + 1: cold 10 (1 + 1e-7) in 1 s (5 s on its first repeat), warm 10 (1 + 2e-7) in 0.5 s
    script.update(clarabel=[(3.0, 10.0, "optimal", 9)] * 2, ecos=list(ecos),
                  native=[(5.0, 10.000001, "optimal", 30), (1.0, 10.000001, "optimal", 30)],
                  warm=[(0.5, 10.000002, "optimal", 7)] * 2)
    rows.append(tr.measure(before, _later(before), ["a"], 1, args))
    # step + 10: cold in 0.5 s, warm 1e-4 off the reference and slower (2 s)
    script.update(clarabel=[(3.0, 10.0, "optimal", 9)] * 2, ecos=list(ecos),
                  native=[(0.5, 10.0, "optimal", 30)] * 2, warm=[(2.0, 10.001, "optimal", 7)] * 2)
    rows.append(tr.measure(before, _later(before), ["b"], 10, args))

    first, second = rows
    assert first.rel_diff == pytest.approx(2e-7, rel=1e-6)  # relative, the larger of the two
    assert (first.cold_ratio, first.warm_ratio, first.warm_over_cold) == pytest.approx((2.0, 4.0, 0.5))
    assert first.cells[-3:] == ["2.0×", "4.0×", "0.50"] and first.cells[-6:-4] == ["3.00", "2.00 (optimal_inaccurate)"]
    assert second.rel_diff == pytest.approx(1e-4, rel=1e-6) and "(> 1e-6)" in second.cells[-4]
    assert (second.cold_ratio, second.warm_ratio) == (pytest.approx(4.0), None)
    assert tr.summary(rows) == (
        "Summary: step +1: median best cvxpy / cold 2.00×, best cvxpy / warm 4.00×, warm / cold 0.50 (warm slower than "
        "cold in 0 of 1); step +10: median best cvxpy / cold 4.00×, best cvxpy / warm – over 1 / 0 of 1 rows, "
        "warm / cold 4.00 (warm slower than cold in 1 of 1); worst relative objective difference 1.0e-04")


def _later(problem):
    """Another problem object with the same data: the later snapshot, as measure sees it."""
    return dataclasses.replace(problem)


def _script(file: str):
    """A benchmark script loaded as a module of its own (not run)."""
    spec = importlib.util.spec_from_file_location(f"{Path(file).stem}_benchmark", SCRIPT.parent / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cold_solver_table_s_reference_and_speed_up(monkeypatch, capsys):
    """benchmarks/solvers.py on scripted solves: the reference value is a certified cvxpy one, the time any usable
    one's, and the speed-up is that time over the native one's."""
    from types import SimpleNamespace

    sv = _script("solvers.py")
    scripted = {"CLARABEL": (10.0, 3.0, "optimal"), "ECOS": (9.99, 1.0, "optimal_inaccurate")}
    native = SimpleNamespace(value=10.000001, solve_seconds=0.5, iterations=20, status="optimal", violation=0.0,
                             relative_gap=1e-8)
    monkeypatch.setattr(sv, "COLD_SIZES", [(12, 2, 3)])
    monkeypatch.setattr(sv, "fastest", lambda repeats, problem, **options: native)
    monkeypatch.setattr(sv, "fastest_cvxpy", lambda problem, name, limit, repeats: scripted[name])
    monkeypatch.setattr(sv.torch.cuda, "is_available", lambda: False)
    assert sv.best_cvxpy([*scripted.values(), (None, None, "skipped (> 60 s)")]) == (10.0, 1.0)
    sv.cold(SimpleNamespace(repeats=1, native_limit=None, time_limit=60.0))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 12, 2, 3 |"))
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[4] == "1.0e-07" and cells[-1] == "2.0×", cells  # 1 s (ECOS, inaccurate but usable) over 0.5 s


def test_the_pattern_monitor_benchmark_times_the_steps_after_the_first_and_keeps_the_fastest_run(monkeypatch, capsys):
    """benchmarks/pattern_monitor.py on a scripted clock (one second per reading): each fit times its steps 1 … N
    (step 0 carries the set-up); the ratio and the per-step figures come from the fastest run of each kind."""
    from types import SimpleNamespace

    pm = _script("pattern_monitor.py")
    clock = [0.0]

    def tick() -> float:
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(pm, "time", SimpleNamespace(perf_counter=tick))
    X, Y = torch.randn(30, 4), torch.randn(30, 2)
    assert pm._fit_seconds(X, Y, 3, 3, [], "cpu", None) == 3.0  # three timed steps of one tick each

    fits = iter([0.30, 0.33, 0.20, 0.22, 0.25, 0.40])  # (without, with) × 3 repeats: the fastest are 0.20 and 0.22
    monkeypatch.setattr(pm, "_fit_seconds", lambda *args, **kwargs: next(fits))
    monkeypatch.setattr(sys, "argv", ["pattern_monitor.py", "--n", "30", "--d", "4", "--hidden", "3", "--steps", "2",
                                      "--mnist-root", "absent"])
    pm.main()
    out = capsys.readouterr().out
    assert "without monitor :     100.0 ms" in out and "with monitor    :     110.0 ms" in out
    assert "ratio with / without          :     1.100" in out
    assert "500.0 ms = 5.000 of a step" in out  # one tick (1 s) over the two snapshots, against a step of 0.1 s


def test_the_async_overhead_benchmark_s_timer_and_ratios(monkeypatch, capsys):
    """benchmarks/async_overhead.py on scripted clocks and runs: the timer spans the first step's start to the last
    step's end, in wall time and the training thread's CPU time; each monitored run is divided by the baseline run
    of its own repetition, and the median of those ratios is printed."""
    from types import SimpleNamespace

    ao = _script("async_overhead.py")
    clock = {"wall": 0.0, "thread": 0.0, "process": 100.0}
    monkeypatch.setattr(ao, "time", SimpleNamespace(perf_counter=lambda: clock["wall"],
                                                    thread_time=lambda: clock["thread"],
                                                    process_time=lambda: clock["process"]))
    timer = ao.StepTimer()
    for i in range(3):  # steps of 1 s (0.5 s of the thread's CPU), 0.25 s (0.1 s) between them
        timer.on_train_batch_start(None, None, None, i)
        clock["wall"] += 1.0
        clock["thread"] += 0.5
        clock["process"] += 2.0
        timer.on_train_batch_end(None, None, None, None, i)
        clock["wall"] += 0.25
        clock["thread"] += 0.1
    assert timer.wall[1] - timer.wall[0] == pytest.approx(3.5)
    assert timer.cpu[1] - timer.cpu[0] == pytest.approx(1.7) and timer.durations == [1.0, 1.0, 1.0]

    base, factor, calls = [1.0, 10.0, 100.0], [1.1, 1.2, 1.3], {"base": 0, "async": 0}

    def scripted_run(steps, monitor):
        kind = "base" if monitor is None else "async"
        if steps == 20:  # the warm-up run
            return {}
        k = calls[kind]
        calls[kind] += 1
        value = base[k] * (1.0 if monitor is None else factor[k])
        return {"cpu": value, "steps": value, "median step": value, "fit": value,
                "skipped": 0.0 if monitor is None else 5.0}

    monkeypatch.setattr(ao, "run", scripted_run)
    monkeypatch.setattr(sys, "argv", ["async_overhead.py", "--steps", "50", "--repeats", "3", "--worker", "thread"])
    ao.main()
    out = capsys.readouterr().out
    assert "async: ratio to baseline cpu 1.200, steps 1.200, median step 1.200, fit 1.200" in out, out
    assert "(the rest skipped) 45 of 50" in out


def test_the_threads_benchmark_times_each_case_against_one_idle_thread(monkeypatch, capsys):
    """benchmarks/threads.py on scripted solves: the default, one and all threads are timed while a process keeps a
    core busy, one thread once it is stopped; each time is printed over that idle one, with the count the default
    chose for the instance's size."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports trajectories.py by name
    th = _script("threads.py")
    busy = {"alive": False}

    class Busy:  # the busy process: alive from its start to its kill
        def __init__(self, args):
            assert args[-1] == th.BUSY
            busy["alive"] = True

        def kill(self):
            busy["alive"] = False

        def wait(self):
            pass

    seconds = {(True, None): 2.2, (True, 1): 3.0, (True, 2): 6.0, (False, 1): 2.0}
    sizes = []
    monkeypatch.setattr(th, "trajectory_problems", lambda *a, **k: [SimpleNamespace(n=5, d=3, num_patterns=4, c=2)])
    monkeypatch.setattr(th.subprocess, "Popen", Busy)
    monkeypatch.setattr(th.time, "sleep", lambda s: None)
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(th, "busy_cores", lambda: 1.0)
    monkeypatch.setattr(th, "default_threads", lambda size: sizes.append(size) or 1)
    monkeypatch.setattr(th, "machine", lambda: "test machine")
    monkeypatch.setattr(th, "timed", lambda problem, repeats, num_threads=None: seconds[busy["alive"], num_threads])
    monkeypatch.setattr(sys, "argv", ["threads.py", "--repeats", "1"])
    th.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "time s" not in line]
    assert rows == ["| default (1 thread(s)), one core busy, 1.00 cores seen busy | 2.20 | 1.10 |",
                    "| 1 thread, one core busy | 3.00 | 1.50 |", "| 2 threads, one core busy | 6.00 | 3.00 |",
                    "| 1 thread, idle | 2.00 | 1.00 |"], rows
    assert sizes == [5 * 3 * 4 * 2] and not busy["alive"]


def test_the_threads_benchmark_takes_the_median_of_certified_solves(monkeypatch):
    """Its timer: the median of the repeats' wall times, and a solve that is not certified stops the benchmark."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    th = _script("threads.py")
    clock, spans, statuses = [0.0], iter([5.0, 1.0, 2.0]), iter(["optimal"] * 3 + ["time_limit"])

    def scripted_solve(problem, solver, **options):
        clock[0] += next(spans)
        return SimpleNamespace(status=next(statuses))

    monkeypatch.setattr(th, "solve", scripted_solve)
    monkeypatch.setattr(th.time, "perf_counter", lambda: clock[0])
    assert th.timed(None, 3, num_threads=1) == 2.0
    spans = iter([1.0])
    with pytest.raises(AssertionError, match="time_limit"):
        th.timed(None, 1)


def test_the_seed_reproduction_reads_every_event_file_and_reports_on_the_certified_values(tmp_path, capsys):
    """benchmarks/reproduce_seed.py's reading: the scalars of every event file under the run (a resumed run writes a
    second one), the last value of a tag or why there is none, the first step (in step order) meeting a condition, and
    experiment (c)'s report, whose step-0 reference is the certified optimum or, without one, the upper bound."""
    from types import SimpleNamespace

    from torch.utils.tensorboard import SummaryWriter

    rs = _script("reproduce_seed.py")
    for version, values in (("version_0", {0: 4.0, 1: 3.0, 2: 2.5}), ("version_1", {2: 2.0, 3: 0.5})):
        with SummaryWriter(str(tmp_path / version)) as writer:
            for step, value in values.items():
                writer.add_scalar("train/objective", value, step)
    s = rs.read_scalars(tmp_path)
    assert s["train/objective"] == {0: 4.0, 1: 3.0, 2: 2.0, 3: 0.5}
    assert rs.at(s, "train/objective") == "0.5" and rs.at(s, "train/objective", 1) == "3"
    assert rs.at(s, "convex/optimum") == "not logged (not certified)"
    assert rs.first_step({5: 0.1, 1: 0.9, 3: 0.2}, lambda v: v < 0.5) == 3

    s.update({"patterns/unique": {0: 7.0, 3: 9.0}, "convex/upper_bound": {0: 0.8, 3: 0.3},
              "convex/status": {0: 1.0, 3: 0.0}, "convex/optimum": {3: 0.25}})
    rs.report_c(SimpleNamespace(), s)
    out = capsys.readouterr().out
    assert "GD beats the step-0 convex optimum at step: 3" in out  # 0.5 < 0.8, the step-0 upper bound
    assert "per-neuron convex optimum at step 0: not logged (not certified)" in out
    assert "certified at 1 of 2 solves" in out and "loss leaves its plateau (< 0.95 x step 0) at step: 1" in out
    s["convex/optimum"][0] = 2.5  # certified at step 0: the reference is the optimum itself
    rs.report_c(SimpleNamespace(), s)
    assert "GD beats the step-0 convex optimum at step: 2" in capsys.readouterr().out
