"""The native solver's memory plan (estimates, free memory, budget, refusal before allocating) and its threads."""

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import hcl.convex.native.solver as native_solver
from hcl.convex.native import NativeOptions, planned_method, solve_native
from hcl.convex.native import threads as native_threads
from hcl.convex.native.memory import (
    BASE_BYTES,
    CONIC_BYTES_PER_ENTRY,
    DEFAULT_MEMORY_FRACTION,
    SolverMemoryError,
    _cgroup_room,
    footprint,
    free_memory,
    memory_budget,
    plan,
)
from hcl.convex.problem import ConvexProblem
from hcl.convex.solvers import check_solver_options, solve

GIB = 1 << 30


def problem_of(n, d, P, c, dtype=torch.float32, seed=0, lam=1e-3, bias=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    X[:, -1] = 1.0
    patterns = (X @ torch.randn(d, P, generator=g, dtype=dtype)) >= 0
    Y = torch.randn(n, c, generator=g, dtype=dtype)
    return ConvexProblem(X, Y, patterns, weight_decay=lam, reduction="mean", output_bias=bias)


@pytest.fixture(scope="module")
def mnist_shaped():
    return problem_of(2000, 785, 100, 10)  # the README's MNIST monitor: 6 MB of data, tens of GB for the interior point


def test_the_interior_point_at_mnist_size_is_far_beyond_any_budget_here(mnist_shaped):
    estimate = footprint("newton", 2000, 785, 100, 10).total
    assert estimate > 40 * GIB  # its (d, d) blocks: 6 · 2000 · 785² float64
    assert footprint("fista", 2000, 785, 100, 10, torch.float32).total < GIB


@pytest.mark.parametrize("limit", [None, 8 * GIB, "admm", "fista", "chunked"])
def test_auto_never_picks_the_interior_point_when_it_does_not_fit(mnist_shaped, limit):
    # its least: no acceleration, float32 (its default tol, 1e-3, runs it in float32)
    admm = footprint("admm", 2000, 785, 100, 10, torch.float32, anderson=0).total
    expected = "admm"
    if limit == "admm":  # exactly the ADMM's least estimate
        limit = admm
    elif limit == "fista":  # just short of it: the first-order method, whole
        limit, expected = admm - 1, "fista"
    elif limit == "chunked":  # room for the first-order method with 500 samples per chunk, not with all 2000
        limit, expected = footprint("fista", 2000, 785, 100, 10, torch.float32, 500).total, "fista"
    chosen = plan(mnist_shaped, NativeOptions(memory_limit=limit))
    assert chosen.method == expected
    budget = memory_budget("cpu", limit)[0]
    estimate = footprint(expected, 2000, 785, 100, 10, torch.float32, chosen.chunk_size, anderson=chosen.anderson).total
    assert estimate <= budget
    if expected == "fista" and chosen.chunk_size is not None:  # in the largest chunk that fits
        assert chosen.chunk_size == 500
        larger = footprint("fista", 2000, 785, 100, 10, torch.float32, chosen.chunk_size + 1).total
        assert larger > budget


def test_auto_keeps_the_interior_point_where_it_fits():
    problem = problem_of(200, 10, 20, 1, torch.float64)
    assert plan(problem, NativeOptions()).method == "newton"
    needed = footprint("newton", 200, 10, 20, 1, output_bias=False).total
    assert plan(problem, NativeOptions(memory_limit=needed)).method == "newton"
    assert plan(problem, NativeOptions(memory_limit=needed - 1)).method == "admm"


def test_an_explicit_method_that_does_not_fit_raises_before_allocating(mnist_shaped, monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("the solve started allocating")

    monkeypatch.setattr(native_solver, "Operator", no_allocation)
    with pytest.raises(SolverMemoryError, match=r"'newton' needs about 75.7 GiB for n=2000, d=785, P=100, c=10, more "
                       r"than the memory budget of 4 GiB \(memory_limit\).*method='auto', which takes a method that "
                       r"fits, or raise memory_limit") as info:
        solve(mnist_shaped, "native", method="newton", memory_limit=4 * GIB)
    assert isinstance(info.value, MemoryError)
    assert info.value.sizes == (2000, 785, 100, 10) and info.value.budget == 4 * GIB
    assert info.value.estimate == footprint("newton", 2000, 785, 100, 10, output_bias=False).total
    one_row = footprint("fista", 2000, 785, 100, 10, torch.float32, chunk_size=1, output_bias=False).total
    with pytest.raises(SolverMemoryError, match="'fista'.*or a smaller chunk_size"):
        solve_native(mnist_shaped, method="fista", chunk_size=2000, memory_limit=one_row)
    with pytest.raises(SolverMemoryError, match=r"'fista'.*\(memory_limit\); solve a smaller problem \(fewer samples "
                       r"or patterns\), or raise"):  # a smaller chunk would not fit either: not advised
        solve_native(mnist_shaped, method="fista", chunk_size=2000, memory_limit=one_row - 1)
    # auto: not even the first-order method, chunked; the refusal names what else it tried
    with pytest.raises(SolverMemoryError, match=r"'fista' needs about.*budget of 64 MiB \(memory_limit\); "
                       r"method=auto found 'newton' at 75.7 GiB and 'admm' at [\d.]+ MiB too large as well"):
        solve_native(mnist_shaped, memory_limit=BASE_BYTES)


@pytest.mark.parametrize("solver", ["clarabel", "ecos", "cvxpylayers"])
def test_a_cvxpy_solve_that_does_not_fit_is_refused_before_it_builds(mnist_shaped, monkeypatch, solver):
    """cvxpy's canonical form of the README's MNIST monitor would take about 1.6 TB: the kernel would end training."""
    import hcl.convex.cvxpy_solver as cvxpy_solver
    import hcl.convex.layers as layers

    def no_build(*args, **kwargs):
        raise AssertionError("cvxpy started building")

    monkeypatch.setattr(cvxpy_solver, "_build", no_build)
    monkeypatch.setattr(layers.FixedPatternLayer, "from_problem", no_build)
    with pytest.raises(SolverMemoryError, match=rf"^{solver} needs about 2,995 GiB for n=2000, d=785, P=100, c=10, "
                       r"more than the memory budget of .*solver='native', which needs less memory") as info:
        solve(mnist_shaped, solver, memory_limit=4 * GIB)
    assert info.value.estimate == CONIC_BYTES_PER_ENTRY * 2000 * 785 * 100 * 10 + BASE_BYTES
    small = ConvexProblem(mnist_shaped.X[:20, :3], mnist_shaped.Y[:20, :1], mnist_shaped.patterns[:20, :2], 1e-3)
    with pytest.raises(SolverMemoryError, match=r"needs about 64.2 MiB .* budget of 1 MiB"):
        solve(small, solver, memory_limit=1 << 20)
    with pytest.raises(ValueError, match="memory_limit must be a positive integer, got 0.5"):
        solve(small, solver, memory_limit=0.5)
    with pytest.raises(ValueError, match=r"memory_limit is in bytes: 1000 bytes fit no solve"):  # was a refusal a solve
        check_solver_options(solver, {"memory_limit": 1000})


def test_the_planned_method_is_the_plans_choice_and_nothing_runs(mnist_shaped, monkeypatch):
    monkeypatch.setattr(native_solver, "Operator", None)  # any solve would fail here
    admm = footprint("admm", 2000, 785, 100, 10, torch.float32, anderson=0).total  # float32 at its default tol
    assert planned_method(mnist_shaped, memory_limit=admm) == "admm"
    assert planned_method(mnist_shaped, memory_limit=admm - 1) == "fista"
    assert planned_method(mnist_shaped, method="admm", tol=1e-3) == "admm"
    assert planned_method(mnist_shaped, method="newton", memory_limit=4 * GIB) is None  # refused: nothing fits
    assert planned_method(problem_of(200, 10, 20, 1, torch.float64)) == "newton"
    with pytest.raises(TypeError):
        planned_method(mnist_shaped, bogus=1)


@pytest.mark.slow
def test_a_chunk_chosen_from_the_budget_solves_the_same_problem():
    problem = problem_of(120, 5, 8, 2, torch.float64, lam=0.1)
    limit = footprint("fista", 120, 5, 8, 2, torch.float64, 30).total
    chosen = plan(problem, NativeOptions(method="fista", memory_limit=limit))
    assert chosen.chunk_size == 30
    whole = solve_native(problem, method="fista", max_iters=3000)
    chunked = solve_native(problem, method="fista", max_iters=3000, memory_limit=limit)
    assert chunked.status == whole.status
    assert abs(chunked.value - whole.value) <= 1e-6 * abs(whole.value)


def test_free_memory_and_the_default_budget():
    free = free_memory("cpu")
    assert free is not None and 0 < free
    with open("/proc/meminfo") as handle:
        total = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1]) * 1024
    assert free <= total
    budget, why = memory_budget("cpu")
    assert abs(budget - DEFAULT_MEMORY_FRACTION * free) <= 0.05 * free and "free on cpu" in why
    assert memory_budget("cpu", 123456) == (123456, "memory_limit")


def test_free_memory_on_cuda_counts_the_cache_and_is_unknown_where_the_driver_cannot_say(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 70 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 << 30)
    assert free_memory("cuda:1") == 80 << 30  # 20 free to the driver, 60 in torch's cache unused
    assert memory_budget("cuda:1")[0] == int(DEFAULT_MEMORY_FRACTION * (80 << 30))

    def fails(device=None):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "mem_get_info", fails)
    assert free_memory("cuda") is None
    assert memory_budget("cuda", 123456) == (123456, "memory_limit")
    assert memory_budget("cuda") == (None, "free memory unknown")


def test_float64_work_runs_on_the_cpu_only_for_a_device_without_float64():
    from hcl.convex.problem import float64_device

    assert float64_device("mps") == torch.device("cpu")  # Apple's GPUs have no float64
    assert float64_device("cuda:1") == torch.device("cuda:1") and float64_device("cpu") == torch.device("cpu")


def test_a_cgroup_limit_bounds_the_free_memory(tmp_path):
    limit, usage = tmp_path / "max", tmp_path / "current"
    limit.write_text("1000000\n")
    usage.write_text("250000\n")
    assert _cgroup_room(((str(limit), str(usage)),)) == 750000
    limit.write_text("max\n")
    assert _cgroup_room(((str(limit), str(usage)),)) is None
    assert _cgroup_room(((str(tmp_path / "absent"), str(usage)),)) is None


def test_memory_options_are_checked():
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="memory_limit"):
            NativeOptions(memory_limit=bad)
        with pytest.raises(ValueError, match="num_threads"):
            NativeOptions(num_threads=bad)


# the child measures its resident memory's peak over one solve, after a small solve loaded the libraries' code
PROBE = r"""
import gc, json, resource, sys, torch
torch.set_num_threads(1)
from hcl.convex.native import solve_native
from hcl.convex.problem import ConvexProblem
method, n, d, P, c, bias = sys.argv[1], *map(int, sys.argv[2:6]), bool(int(sys.argv[6]))
def problem(n, P):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, -1] = 1.0
    D = (X @ torch.randn(d, P, generator=g, dtype=torch.float64)) >= 0
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    return ConvexProblem(X, Y, D, weight_decay=0.01, output_bias=bias)
iters = {"newton": 2, "admm": 12}.get(method, 30)
solve_native(problem(40, 3), method=method, max_iters=iters)
p = problem(n, P)
gc.collect()
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * resource.getpagesize()
# reset the peak (VmHWM) to now: an earlier transient peak (imports, the warm-up) must not count
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
solve_native(p, method=method, max_iters=iters)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps(peak - base))
"""


@pytest.mark.slow  # a subprocess per shape
@pytest.mark.parametrize(
    "method,n,d,P,c,bias",
    [
        ("newton", 400, 100, 30, 3, 1),  # the (d, d) blocks dominate
        ("newton", 600, 40, 60, 2, 0),  # the n × n matrices and the block outputs
        ("newton", 300, 200, 20, 1, 1),  # the rows x_j x_jᵀ
        ("newton", 300, 200, 40, 2, 0),  # the blocks again, d near n: 3-16 % above a count of 6 block stacks
        ("fista", 3000, 50, 100, 3, 1),  # the block outputs
        ("admm", 3000, 50, 100, 3, 1),  # the block outputs and the n × n matrices
    ],
)
def test_the_estimate_bounds_the_measured_peak(method, n, d, P, c, bias):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", PROBE, method, *map(str, (n, d, P, c, bias))]
    measured = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout)
    estimate = footprint(method, n, d, P, c, torch.float64, None, bool(bias)).total
    assert measured > 50 << 20  # large enough to mean something beside the interpreter's noise
    # an upper bound, and not a loose one: within the factor docs/solvers.md#memory states
    assert measured <= estimate <= 5 * measured


# ---- threads


def test_default_threads_follow_the_usable_idle_cores(monkeypatch):
    monkeypatch.setattr(native_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(native_threads, "busy_cores", lambda: 1.2)
    assert native_threads.default_threads(10**7) == 3
    monkeypatch.setattr(native_threads, "busy_cores", lambda: 9.0)
    assert native_threads.default_threads(10**7) == 1
    assert native_threads.default_threads(native_threads.SINGLE_THREAD_BELOW - 1) == 1


def proc_stat(samples):
    """A stand-in for ``open`` on ``/proc/stat``: each opening reads the next of ``samples`` (an iterator)."""

    class Stat:
        def __init__(self, *args):
            self.text = next(samples)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.text

    return Stat


def test_busy_cores_are_sampled_now_on_the_usable_cores(monkeypatch):
    # cpu1 busy all the time, cpu0 idle, cpu2 busy but not ours; a one-minute load average of 2 is not consulted
    samples = itertools.cycle([
        "cpu  1 0 0 1 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0\ncpu1 900 0 0 100 0 0 0 0\ncpu2 5 0 0 5 0 0 0 0",
        "cpu  1 0 0 1 0 0 0 0\ncpu0 100 0 0 910 0 0 0 0\ncpu1 905 0 5 100 0 0 0 0\ncpu2 15 0 0 5 0 0 0 0",
    ])

    monkeypatch.setattr(native_threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(native_threads.os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(native_threads, "open", proc_stat(samples), raising=False)
    monkeypatch.setattr(native_threads.time, "sleep", lambda seconds: None)
    assert native_threads.busy_cores() == pytest.approx(1.0)
    assert native_threads.default_threads(10**7) == 1


def test_busy_cores_reads_this_machine():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    assert 0.0 <= native_threads.busy_cores() <= native_threads.usable_cores() + 0.5


def test_num_threads_applies_on_the_main_thread_and_is_restored(monkeypatch):
    problem = problem_of(60, 5, 6, 1, torch.float64, lam=0.1)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(native_solver, "_run", lambda *args: seen.append(torch.get_num_threads()) or "done")
    previous = torch.get_num_threads()
    real(2)
    try:
        assert solve_native(problem, num_threads=1) == "done" and seen == [1]
        assert torch.get_num_threads() == 2
        # at most the usable cores: 10⁹ threads made OpenMP exit the process, training and all
        monkeypatch.setattr(native_threads, "usable_cores", lambda: 3)
        assert solve_native(problem, num_threads=10**9) == "done" and seen == [1, 3]
        assert torch.get_num_threads() == 2
    finally:
        real(previous)


def test_a_solve_off_the_main_thread_leaves_the_global_thread_count(monkeypatch):
    problem = problem_of(400, 50, 50, 1, torch.float64, lam=0.1)  # n·d·P·c = 10⁶: would get the idle cores
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: calls.append(k) or real(k))
    before = torch.get_num_threads()
    seen, results = [], []

    def work():
        for threads in (None, 2):
            results.append(solve(problem, "native", max_iters=2, num_threads=threads))
            seen.append(torch.get_num_threads())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert len(results) == 2 and calls == [] and seen == [before, before]
    assert torch.get_num_threads() == before


def test_once_the_schur_matrices_are_built_in_float64_the_float32_builds_buffer_is_freed(monkeypatch):
    """The float32 build's float64 working copy, kept beside the later float64 builds, took a converged interior point
    7 % past its estimate."""
    import hcl.convex.native.newton as newton

    monkeypatch.setattr(newton, "FLOAT32_SCHUR_ABOVE", 0)  # float32 Schur matrices from the first system
    monkeypatch.setattr(newton, "FLOAT32_CG_ITERS", 1)  # and float64 ones from the first conjugate gradients on
    builds = []
    factor = newton.NewtonSystem._factor_schur

    def recorded(self, dtype):
        out = factor(self, dtype)
        builds.append((dtype, sorted(self.workspace._scratch)))
        return out

    monkeypatch.setattr(newton.NewtonSystem, "_factor_schur", recorded)
    solution = solve_native(problem_of(60, 4, 6, 2, dtype=torch.float64), method="newton")
    assert solution.status == "optimal"
    dtypes = [dtype for dtype, _ in builds]
    assert dtypes[0] == torch.float32 and torch.float64 in dtypes
    assert builds[0][1] == ["schur", "schur_factors", "schur_working"]
    assert all(names == ["schur", "schur_factors"] for dtype, names in builds if dtype == torch.float64)


def test_auto_takes_the_native_solver_when_clarabel_does_not_fit_and_limits_are_checked_early():
    from hcl.convex import check_solver_options

    problem = problem_of(250, 10, 10, 1, dtype=torch.float64, lam=0.0)  # λ = 0: auto chooses Clarabel here
    with pytest.warns(UserWarning, match=r"clarabel failed \(clarabel needs about .* solving with the native solver"):
        solution = solve(problem, "auto", memory_limit=80 << 20)
    assert solution.solver.startswith("native")
    with pytest.raises(ValueError, match="memory_limit must be a positive integer, got 0.5"):
        check_solver_options("clarabel", {"memory_limit": 0.5})


def test_refusals_read_sizes_without_exponents_and_advise_auto_only_where_it_fits(mnist_shaped):
    from hcl.convex.native.memory import _gib

    assert [_gib(size) for size in (999 << 20, 1000 << 20, 1 << 30, 1600 << 30)] == [
        "999 MiB", "0.977 GiB", "1 GiB", "1,600 GiB"]
    with pytest.raises(SolverMemoryError) as refused:
        solve_native(mnist_shaped, method="newton", memory_limit=1 << 20)
    assert "method='auto'" not in str(refused.value)  # auto would be refused too
    with pytest.raises(SolverMemoryError, match="method='auto', which takes a method that fits"):
        solve_native(mnist_shaped, method="newton", memory_limit=2 * GIB)


@pytest.mark.parametrize("short", ["free memory", "allocation"])
def test_a_certificate_without_room_is_skipped_and_training_goes_on(tmp_path, monkeypatch, short):
    # it was held to 8 GiB whatever the machine had free, and an allocation failing inside it stopped training
    from _events import read_scalars
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_convex_model import LAM, _data, _trainer

    import hcl.convex_model as convex_model
    from hcl import ConvexReLU
    from hcl.datamodules.base import TensorDataModule

    if short == "free memory":
        monkeypatch.setattr(convex_model, "free_memory", lambda device: 1 << 10)  # a few KiB are needed
    else:
        def no_room(*args, **kwargs):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory")

        monkeypatch.setattr(convex_model, "certify", no_room)
    X, Y = _data(n=20, c=1)
    model = ConvexReLU(in_features=3, num_gates=4, weight_decay=LAM, optimizer="sgd", lr=0.05,
                       certify_every_n_steps=2).double()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    with pytest.warns(UserWarning, match="skipped"):
        _trainer(tmp_path, 4, logger=logger, log_every_n_steps=1).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    scalars = read_scalars(logger.log_dir)
    assert "convex_train/lower_bound" not in scalars
    assert [step for step, _ in scalars["train/objective"]] == list(range(4))
