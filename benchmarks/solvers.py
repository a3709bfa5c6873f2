"""Benchmark of the convex solvers: hcl's native solver against cvxpy's Clarabel and ECOS.

Prints markdown tables (this is a measurement, not a test):

* **cold** — a random instance (Gaussian data with a bias column, Gaussian gates, Gaussian targets,
  reduction ``"sum"``, ``λ = 0.1``) solved from zero at ``(n, d, P)`` = (100, 10, 20), (500, 20, 100),
  (1000, 50, 100), (2000, 100, 400), plus an MNIST-size instance when a GPU is present;
* **warm** — the callback's real use: a network of ``P`` neurons trained by full-batch gradient descent on
  ``n`` points in ``d`` dimensions (a planted teacher plus noise, reduction ``"mean"``); the problem of its
  patterns at one step is solved, then the next step's problem, warm-started from the previous solution
  (patterns matched by :func:`hcl.convex.native.remap_warm_start`) and from the network's own point. The
  instances of ``hcl.TwoLayerReLU`` itself, over seeds, sizes, ``λ`` and both formulations, one and ten steps
  apart, are ``benchmarks/trajectories.py``'s;
* **per iteration** — the native solver's time per iteration (best of two solves) against the time of the dense
  products one iteration needs, measured with ``torch.matmul`` in the same run (best of three), up to
  (2000, 100, 400);
* **first order** — what the matrix-free method reaches at (500, 20, 100) in a fixed time;
* ``counts`` (not in the default ``--only``) — iterations of the interior point against Clarabel's and ECOS's;
* ``schur`` (not in the default ``--only``) — the interior point with its Schur matrices built in float64 against
  float32 (``FLOAT32_SCHUR_ABOVE``'s switch point), on trajectory instances and random ones, best of ``max(2, R)``;
* ``mnist`` (not in the default ``--only``) — large ``d``: both native methods on 1000 real MNIST images
  (``d = 785``, 20 Gaussian gates, digit parity as the target), read from ``--mnist-root``;
* ``--crossover`` — native against Clarabel on small sizes (the ``"auto"`` switch point).

Each cvxpy solve runs in a child process and is stopped past ``--time-limit`` seconds ("skipped (> N s)").
Relative objective differences are against the best (lowest) cvxpy value; the violation is relative to
``max |Y|``; the gap is the native certificate's ``(value − dual) / value``.

Usage: ``python benchmarks/solvers.py [--time-limit 120] [--only crossover,cold,warm,iter,first]
[--cold-sizes "500,20,100;1000,50,100"] [--warm-sizes "500,20,100"] [--iter-sizes "1000,50,100"] [--repeats R]
[--threads N]`` (default: torch's threads, all cores). With ``--repeats R`` every cold and warm solve, native and
cvxpy, runs ``R`` times and its fastest run is reported: the machines are noisy. The per-iteration section takes
the best of ``max(2, R)`` solves and ``max(3, R)`` runs of its matmuls.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import subprocess
import time

import torch

from hcl.convex import Status, choose_solver, solve
from hcl.convex.build import problem_from_network
from hcl.convex.cvxpy_solver import OWN_DEFAULTS, solve_cvxpy
from hcl.convex.native import newton, remap_warm_start, solve_native
from hcl.convex.native.newton import FLOAT32_SCHUR_ABOVE, schur_panels
from hcl.convex.problem import ConvexProblem, fold_bias
from hcl.convex.solvers import NativeSolver
from hcl.patterns import pattern_keys

COLD_SIZES = [(100, 10, 20), (500, 20, 100), (1000, 50, 100), (2000, 100, 400)]
WARM_SIZES = [(100, 10, 20), (500, 20, 100), (1000, 50, 100)]
COUNT_SIZES = [(200, 10, 40), (300, 20, 50), (500, 20, 100)]
ITER_SIZES = [(100, 10, 20), (500, 20, 100), (1000, 50, 100), (2000, 100, 400)]
SCHUR_SIZES = [(200, 10, 40), (300, 15, 60), (400, 20, 80), (500, 20, 100)]
CROSSOVER_SIZES = [(30, 3, 6), (50, 5, 10), (60, 6, 12), (70, 7, 14), (80, 8, 16), (100, 10, 10), (100, 10, 20),
                   (200, 10, 40)]


# ----------------------------------------------------------------------------- instances
def cold_instance(n: int, d: int, P: int, seed: int = 0, device: str = "cpu") -> ConvexProblem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d - 1, generator=g, dtype=torch.float64)
    X = fold_bias(X, True)
    gates = torch.randn(d, P, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return ConvexProblem(X.to(device), y.to(device), (X @ gates >= 0).to(device), weight_decay=0.1, reduction="sum")


def trained_snapshots(n: int, d: int, P: int, steps: int = 300, seed: int = 0):
    """Two consecutive full-batch GD steps of a P-neuron network: ``[(problem, point), (problem, point)]``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d - 1, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, d - 1, generator=g, dtype=torch.float64)
    y = torch.relu(X @ teacher.T).sum(1) / 5 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    W1 = (torch.randn(P, d - 1, generator=g, dtype=torch.float64) / (d - 1) ** 0.5).requires_grad_(True)
    b1 = (0.1 * torch.randn(P, generator=g, dtype=torch.float64)).requires_grad_(True)
    W2 = (torch.randn(1, P, generator=g, dtype=torch.float64) / P**0.5).requires_grad_(True)
    lam, lr = 1e-3, 0.05
    snapshots = []
    for step in range(steps + 1):
        if step >= steps - 1:
            snapshots.append(problem_from_network(X, y, W1.detach(), b1.detach(), W2.detach(), None,
                                                  weight_decay=lam, reduction="mean"))
        loss = (torch.relu(X @ W1.T + b1) @ W2.T - y[:, None]).square().mean()
        loss = loss + lam * (W1.square().sum() + b1.square().sum() + W2.square().sum())
        grads = torch.autograd.grad(loss, [W1, b1, W2])
        with torch.no_grad():
            for param, grad in zip([W1, b1, W2], grads):
                param -= lr * grad
    return snapshots


# ----------------------------------------------------------------------------- cvxpy in a child process
def _child(problem, name, pipe):
    torch.set_num_threads(1)
    try:
        solution = solve_cvxpy(problem, name, **OWN_DEFAULTS.get(name, {}))  # as cvxpy ships it
        pipe.send((solution.value, solution.solve_seconds, solution.status))
    except Exception as error:  # noqa: BLE001 - reported in the table
        pipe.send((None, None, f"failed: {type(error).__name__}"))


def run_cvxpy(problem: ConvexProblem, name: str, time_limit: float):
    """``(value, seconds, status)``, or ``(None, None, "skipped (> N s)")`` past the limit."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(problem, name, child))
    process.start()
    if parent.poll(time_limit):
        result = parent.recv()
        process.join()
        return result
    process.terminate()
    process.join()
    return None, None, f"skipped (> {time_limit:.0f} s)"


def fastest_cvxpy(problem: ConvexProblem, name: str, time_limit: float, repeats: int):
    """:func:`run_cvxpy` ``repeats`` times (fewer once a run is skipped); the fastest run."""
    results = []
    for _ in range(repeats):
        results.append(run_cvxpy(problem, name, time_limit))
        if results[-1][0] is None:
            break
    finished = [result for result in results if result[0] is not None]
    return min(finished, key=lambda result: result[1]) if finished else results[-1]


def fastest(repeats: int, problem: ConvexProblem, **options):
    """The fastest of ``repeats`` native solves through ``solve()`` (its thread policy)."""
    return min((solve(problem, "native", **options) for _ in range(repeats)), key=lambda s: s.solve_seconds)


# ----------------------------------------------------------------------------- helpers
def fmt_time(seconds) -> str:
    return "–" if seconds is None else (f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}")


def best_cvxpy(results):
    """The reference value, from certified (``"optimal"``) solves only, and the reference time, from any solve that
    returned a point (``optimal_inaccurate`` included, which lowers the speed-up); ``None`` where there is none."""
    values = [v for v, _, s in results if v is not None and Status.of(s) is Status.OPTIMAL]
    times = [t for v, t, _ in results if v is not None]
    return min(values, default=None), min(times, default=None)


def cvxpy_cell(value, seconds, status) -> str:
    """A cvxpy solve's time, with its status when it is not ``"optimal"``; the reason when it returned nothing."""
    if value is None:
        return status
    return fmt_time(seconds) + ("" if Status.of(status) is Status.OPTIMAL else f" ({Status.of(status).value})")


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def matmul_seconds(problem: ConvexProblem, method: str, repeats: int = 3) -> float:
    """Time of the dense products one iteration of ``method`` needs, with random data of the right shapes (the
    best of ``repeats``)."""
    n, d, P, c = problem.n, problem.d, problem.num_patterns, problem.c
    dt, dev = torch.float64 if method == "newton" else problem.X.dtype, problem.X.device
    X = torch.randn(n, d, dtype=dt, device=dev)
    W = torch.randn(d, 2 * P * c, dtype=dt, device=dev)
    G = torch.randn(n, 2 * P * c, dtype=dt, device=dev)
    if method == "newton":
        # the Schur matrix, built in float32 from FLOAT32_SCHUR_ABOVE on (hcl.convex.native), its blocks on and below
        # the diagonal
        schur = torch.float32 if n * n * P * d * c >= FLOAT32_SCHUR_ABOVE else torch.float64
        F = torch.randn(n, P * d, dtype=schur, device=dev)
        S = torch.zeros(n, n, dtype=schur, device=dev)
        X32, LG = X.to(schur), torch.randn(d, P * d, dtype=schur, device=dev)
        blocks = schur_panels(n)
        theta = torch.randn(n, 2 * P * c, dtype=dt, device=dev)
        outer = torch.randn(n, d * d, dtype=dt, device=dev)

    def once():
        if method == "newton":
            for _ in range(c):
                torch.matmul(X32, LG)  # D_i X L_i for every pattern
                for a_lo, a_hi in blocks:  # the n × n Schur matrix, on and below the diagonal, by panels of rows
                    S[a_lo:a_hi, :a_hi].addmm_(F[a_lo:a_hi], F[:a_hi].T)
            torch.matmul(theta.T, outer)  # the per-block Xᵀ diag(θ) X
            for _ in range(6):  # products with X and Xᵀ (predictor, corrector, one CG step each)
                torch.matmul(X, W)
                torch.matmul(X.T, G)
        else:
            torch.matmul(X, W)
            torch.matmul(X.T, G)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    once()
    return min(_timed(once) for _ in range(repeats))


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), platform.processor())
    except OSError:
        model = platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); {gpu}"


# ----------------------------------------------------------------------------- sections
def cold(args) -> None:
    print("\n### Cold start (random instance, reduction sum, λ = 0.1)\n")
    print(row(["n, d, P", "native s (iters)", "Clarabel s", "ECOS s", "rel. obj. diff", "violation", "gap",
               "speed-up"]))
    print(row(["---"] * 8))
    for n, d, P in COLD_SIZES:
        problem = cold_instance(n, d, P)
        native = fastest(args.repeats, problem, time_limit=args.native_limit)
        results = [fastest_cvxpy(problem, name, args.time_limit, args.repeats) for name in ("CLARABEL", "ECOS")]
        ref, t_best = best_cvxpy(results)
        diff = "–" if ref is None else f"{(native.value - ref) / abs(ref):.1e}"
        if t_best is not None:
            speed = f"{t_best / native.solve_seconds:.1f}×"
        elif native.solve_seconds < args.time_limit:  # a lower bound, which says something only then
            speed = f"> {args.time_limit / native.solve_seconds:.1f}×"
        else:
            speed = "–"
        cells = [f"{n}, {d}, {P}", f"{fmt_time(native.solve_seconds)} ({native.iterations}, {native.status})"]
        cells += [cvxpy_cell(*result) for result in results]
        cells += [diff, f"{native.violation / float(problem.Y.abs().max()):.1e}", f"{native.relative_gap:.1e}",
                  speed]
        print(row(cells), flush=True)
    if torch.cuda.is_available():
        mnist_size(args)
    else:
        print("\nMNIST-size instance (n = 60000, d = 785, P = 1000): skipped (no GPU in this run).")


def mnist_size(args) -> None:
    problem = cold_instance(60000, 785, 1000, device="cuda")
    problem = ConvexProblem(problem.X.float(), problem.Y.float(), problem.patterns, weight_decay=0.1 / 60000,
                            reduction="mean")
    start = time.perf_counter()
    solution = solve_native(problem, time_limit=args.native_limit)
    print(f"\nMNIST-size (60000, 785, 1000) on {torch.cuda.get_device_name(0)}: {solution.status} after "
          f"{solution.iterations} iterations, {time.perf_counter() - start:.1f} s, gap {solution.relative_gap:.1e}, "
          f"violation {solution.violation:.1e}, {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def warm(args) -> None:
    print("\n### Warm start (consecutive GD steps of a trained network, reduction mean, λ = 1e-3)\n")
    print(row(["n, d, P", "patterns (new)", "native cold s (it)", "warm: previous s (it)", "warm: network s (it)",
               "Clarabel s", "ECOS s", "rel. obj. diff", "gap", "speed-up (previous)"]))
    print(row(["---"] * 10))
    for n, d, P in WARM_SIZES:
        (first, _), (second, point) = trained_snapshots(n, d, P)
        previous = solve(first, "native")
        old = first.patterns
        new = second.patterns
        remapped = remap_warm_start(old, previous, new)
        old_keys = set(map(tuple, pattern_keys(old).tolist()))
        fresh = sum(key not in old_keys for key in map(tuple, pattern_keys(new).tolist()))  # patterns new to it
        cold_solution = fastest(args.repeats, second)
        from_previous = fastest(args.repeats, second, warm_start=remapped)
        from_network = fastest(args.repeats, second, warm_start=point)
        results = [fastest_cvxpy(second, name, args.time_limit, args.repeats) for name in ("CLARABEL", "ECOS")]
        ref, t_best = best_cvxpy(results)
        diff = "–" if ref is None else f"{(from_previous.value - ref) / abs(ref):.1e}"
        speed = ("–" if t_best is None else f"{t_best / from_previous.solve_seconds:.1f}×")
        cells = [f"{n}, {d}, {P}", f"{new.shape[1]} ({fresh})"]
        cells += [f"{fmt_time(s.solve_seconds)} ({s.iterations})" for s in (cold_solution, from_previous, from_network)]
        cells += [cvxpy_cell(*result) for result in results]
        cells += [diff, f"{from_previous.relative_gap:.1e}", speed]
        print(row(cells), flush=True)


def per_iteration(args) -> None:
    print("\n### Native time per iteration against the dense products an iteration needs (torch.matmul)\n")
    print(row(["n, d, P", "method", "s / iteration", "matmuls s", "ratio"]))
    print(row(["---"] * 5))
    for n, d, P in ITER_SIZES:
        problem = cold_instance(n, d, P)
        for method in ("newton", "fista"):
            # a few Newton iterations where each takes seconds; the best of two solves and of three runs of the
            # matmuls at least (of --repeats each when more)
            iterations = (10 if n * n * P * d < 10**10 else 3) if method == "newton" else 200
            solution = fastest(max(2, args.repeats), problem, method=method, max_iters=iterations, dtype=torch.float64)
            per_it = solution.solve_seconds / solution.iterations
            with NativeSolver.cpu_threads(problem):  # the threads solve() gave the solver
                mm = matmul_seconds(problem, method, repeats=max(3, args.repeats))
            print(row([f"{n}, {d}, {P}", method, f"{per_it * 1e3:.2f} ms", f"{mm * 1e3:.2f} ms",
                       f"{per_it / mm:.2f}"]), flush=True)


def first_order(args) -> None:
    n, d, P = 500, 20, 100
    problem = cold_instance(n, d, P)
    ref = solve_native(problem)
    print(f"\n### First-order method alone at ({n}, {d}, {P})\n")
    print(row(["time limit s", "iterations", "rel. obj. diff", "violation", "gap"]))
    print(row(["---"] * 5))
    for limit in (5.0, 30.0):
        solution = solve_native(problem, method="fista", dtype=torch.float64, time_limit=limit)
        print(row([f"{limit:.0f}", solution.iterations, f"{(solution.value - ref.value) / ref.value:.1e}",
                   f"{solution.violation / float(problem.Y.abs().max()):.1e}", f"{solution.relative_gap:.1e}"]),
              flush=True)


def mnist_subsample(args) -> None:
    """Large ``d``: the interior point against the first-order method on real MNIST pixels."""
    from torchvision.datasets import MNIST

    n, P = 1000, 20
    try:
        data = MNIST(args.mnist_root, train=True, download=False)
    except RuntimeError as error:
        print(f"\nMNIST subsample: skipped ({error})")
        return
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(len(data), generator=g)[:n]
    X = data.data[index].reshape(n, -1).double() / 255
    X = fold_bias(X, True)
    y = (data.targets[index] % 2).double() * 2 - 1  # digit parity as ±1
    gates = torch.randn(X.shape[1], P, generator=g, dtype=torch.float64)
    problem = ConvexProblem(X, y, X @ gates >= 0, weight_decay=1e-3, reduction="mean")
    print(f"\n### MNIST subsample (n = {n}, d = {X.shape[1]}, P = {P}, parity target, λ = 1e-3, reduction mean)\n")
    print(row(["method", "s", "iterations", "status", "gap", "value"]))
    print(row(["---"] * 6))
    for method in ("newton", "fista"):
        solution = solve(problem, "native", method=method, time_limit=args.mnist_limit)
        print(row([method, fmt_time(solution.solve_seconds), solution.iterations, solution.status,
                   f"{solution.relative_gap:.1e}", f"{solution.value:.6e}"]), flush=True)


def iteration_counts(args) -> None:
    """Iterations of the native interior point against Clarabel's and ECOS's (each to its default tolerance)."""
    print("\n### Iterations to convergence, cold instances\n")
    print(row(["n, d, P", "native (tol 1e-6)", "Clarabel", "ECOS"]))
    print(row(["---"] * 4))
    for n, d, P in COUNT_SIZES:
        problem = cold_instance(n, d, P)
        counts = [solve_native(problem, method="newton").iterations]
        # each at its own default tolerance (hcl asks Clarabel for 1e-9 unless told)
        counts += [solve_cvxpy(problem, name, **OWN_DEFAULTS.get(name, {})).iterations for name in ("CLARABEL", "ECOS")]
        print(row([f"{n}, {d}, {P}", *counts]), flush=True)


def schur_precision(args) -> None:
    """Float64 against float32 Schur matrices, on ``benchmarks/trajectories.py``'s instances (t + 1, λ = 1e-3) and
    random cold ones (``c`` = 1 and 3), at sizes around the switch point."""
    from trajectories import trajectory_problems  # the sibling script: the monitor's instances

    print("\n### Schur matrices in float32 against float64 (best of max(2, R))\n")
    print(row(["instance", "n, d, P, c", "n² P d c", "float64 s (it)", "float32 s (it)", "float32 / float64"]))
    print(row(["---"] * 6))
    cases = []
    for n, d, P in SCHUR_SIZES:
        for form in ("patterns", "neurons"):
            cases.append((f"trajectory, {form}", trajectory_problems(n, d, P, 1e-3, 0, form, gaps=(1,))[1]))
        for c in (1, 3):
            base = cold_instance(n, d, P, seed=1)
            Y = base.Y if c == 1 else torch.randn(n, c, generator=torch.Generator().manual_seed(2), dtype=base.X.dtype)
            cases.append(("random", ConvexProblem(base.X, Y, base.patterns, weight_decay=0.1, reduction="sum")))
    for label, problem in cases:
        n, d, P, c = problem.n, problem.d, problem.num_patterns, problem.c
        timings = []
        for threshold in (float("inf"), 0):  # float64 always, float32 always
            newton.FLOAT32_SCHUR_ABOVE = threshold
            timings.append(fastest(max(2, args.repeats), problem, method="newton", num_threads=args.threads))
        newton.FLOAT32_SCHUR_ABOVE = FLOAT32_SCHUR_ABOVE
        f64, f32 = timings
        print(row([label, f"{n}, {d}, {P}, {c}", f"{n * n * P * d * c:.1e}",
                   f"{f64.solve_seconds:.3f} ({f64.iterations})", f"{f32.solve_seconds:.3f} ({f32.iterations})",
                   f"{f32.solve_seconds / f64.solve_seconds:.2f}"]), flush=True)


def crossover(args) -> None:
    print("\n### Crossover: native against Clarabel on small sizes (best of 3)\n")
    print(row(["λ", "n, d, P", "n·d·P", "native s (status)", "Clarabel s", "Clarabel / native", "auto picks"]))
    print(row(["---"] * 7))
    for lam in (0.1, 0.0):  # "auto" has one switch point for λ > 0 and one for λ = 0
        for n, d, P in CROSSOVER_SIZES:
            base = cold_instance(n, d, P)
            problem = ConvexProblem(base.X, base.Y, base.patterns, weight_decay=lam, reduction="sum")
            native = fastest(3, problem)
            own = OWN_DEFAULTS["CLARABEL"]
            t_clarabel = min(solve_cvxpy(problem, "CLARABEL", **own).solve_seconds for _ in range(3))
            t_auto = min(_timed(lambda p=problem: solve(p, "auto")) for _ in range(3))
            print(row([lam, f"{n}, {d}, {P}", n * d * P, f"{native.solve_seconds:.3f} ({native.status})",
                       f"{t_clarabel:.3f}", f"{t_clarabel / native.solve_seconds:.2f}",
                       f"{choose_solver(problem)} ({t_auto:.3f} s)"]), flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per cvxpy solve")
    parser.add_argument("--native-limit", type=float, default=900.0, help="seconds per native solve")
    parser.add_argument("--only", default="crossover,cold,warm,iter,first",
                        help="comma-separated sections: crossover, cold, warm, iter, first, mnist, counts, schur")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the native solver (default: all cores; cvxpy's solvers use one)")
    parser.add_argument("--cold-sizes", default=None, help='e.g. "500,20,100;1000,50,100"')
    parser.add_argument("--warm-sizes", default=None, help='e.g. "500,20,100"')
    parser.add_argument("--repeats", type=int, default=1,
                        help="every solve this many times, its fastest run reported (per iteration: at least 2 "
                             "solves and 3 runs of the matmuls)")
    parser.add_argument("--mnist-root", default="../shared/data", help="torchvision MNIST root (mnist section)")
    parser.add_argument("--mnist-limit", type=float, default=300.0, help="seconds per solve (mnist section)")
    parser.add_argument("--iter-sizes", default=None, help='sizes of the per-iteration section, e.g. "1000,50,100"')
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    for sizes, option in ((COLD_SIZES, args.cold_sizes), (WARM_SIZES, args.warm_sizes), (ITER_SIZES, args.iter_sizes)):
        if option:
            sizes[:] = [tuple(int(v) for v in size.split(",")) for size in option.split(";")]
    torch.set_num_threads(args.threads)
    print(f"Machine: {machine()}")
    solve_native(cold_instance(40, 4, 8))  # first-call overheads (lazy initialisation) out of the timings
    sections = {"crossover": crossover, "cold": cold, "warm": warm, "iter": per_iteration, "first": first_order,
                "mnist": mnist_subsample, "counts": iteration_counts,
                "schur": schur_precision}
    unknown = [name for name in args.only.split(",") if name not in sections]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose among {sorted(sections)}")
    for name in args.only.split(","):
        sections[name](args)


if __name__ == "__main__":
    main()
