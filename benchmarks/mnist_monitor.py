"""The convex monitor's solve at MNIST size: the native methods on the patterns of a trained network.

The instances are what the README's MNIST run hands the monitor: real MNIST (``n`` training images, the folded bias
column, ``d = 785``), one-hot targets (``c = 10``), λ = 1e-3 with the mean reduction, and the patterns of
``hcl.TwoLayerReLU`` (100 hidden neurons) trained by full-batch Adam, snapshotted at ``--steps``, several seeds.
Each solve runs in a fresh process (its peak resident memory is its own) with the same time limit and tolerances,
and the table gives its bracket: the certified lower bound, the value, and their relative gap (``(value − bound) /
value``, the native stopping rule's). Measured figures: ``docs/solvers.md#admm``.

    python benchmarks/mnist_monitor.py --root ../shared/data                    # n = 2000, seeds 0 1, steps 0 100
    python benchmarks/mnist_monitor.py --root ../shared/data --sizes 10000 --seeds 0 --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from peak_memory import reset_peak, status_kib  # this folder is on sys.path when run as a script
from trajectories import snapshot_problem, train_trajectory  # this folder is on sys.path when run as a script

from hcl.convex import solve
from hcl.convex.native.memory import SolverMemoryError
from hcl.convex.problem import ConvexProblem
from hcl.datamodules import MNIST


def snapshots(root: str, n: int, seed: int, steps: list[int], hidden: int, lam: float,
              device: str = "cpu") -> list[ConvexProblem]:
    """The monitor's problems at ``steps`` of a ``TwoLayerReLU`` trained by full-batch Adam on ``n`` MNIST images
    (on ``device``; the problems are handed back on the CPU, each solve moves its own to the device)."""
    data = MNIST(root=root, subset=n, seed=seed)
    data.setup("fit")
    X, Y = data.train_tensors()
    X = X.reshape(len(X), -1).to(device=device, dtype=torch.float64)
    Y = Y.to(device=device, dtype=torch.float64)
    kept = train_trajectory(X, Y, hidden, lam, seed, steps, lr=1e-3, optimizer="adam")
    problems = [snapshot_problem(X, Y, weights, lam, "patterns") for weights in kept]
    return [dataclasses.replace(p, X=p.X.cpu()) for p in problems]  # the rest follows X's device


def measure(problem: ConvexProblem, method: str, options: dict, device: str = "cpu") -> dict:
    """One solve on ``device`` in this (fresh) process: its bracket, iterations, time and peak memory (on the CPU this
    process's own peak resident memory during the solve, and its resident memory at the start, the problem loaded;
    the GPU's peak allocation, from zero, on CUDA)."""
    problem = dataclasses.replace(problem, X=problem.X.to(device))  # the rest follows X's device
    gpu = problem.X.is_cuda
    # ru_maxrss would also count the parent's high-water mark, which a spawned child keeps: benchmarks/peak_memory.py
    before = 0 if gpu else status_kib("VmRSS") if reset_peak() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        solution = solve(problem, "native", method=method, **options)
    except SolverMemoryError as error:  # the plan's refusal, before anything is allocated: a row of its own
        nan = float("nan")
        return dict(status=f"refused: {error}", value=nan, bound=nan, violation=nan, iterations=0,
                    seconds=time.perf_counter() - start, peak_gib=nan, start_gib=nan)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**10 if gpu else (
        status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return dict(status=str(solution.status), value=solution.value, bound=solution.dual_value,
                violation=solution.violation / float(problem.Y.abs().max()), iterations=solution.iterations,
                seconds=seconds, peak_gib=peak / 2**20, start_gib=before / 2**20)


def machine(device: str = "cpu") -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown CPU")
    gpu = f"; {torch.cuda.get_device_name(device)}" if torch.device(device).type == "cuda" else ""
    return f"{model}{gpu}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data", help="folder holding MNIST/raw/")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000], help="training images n")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100], help="snapshot steps of the training")
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--methods", nargs="+", default=["admm", "fista"], choices=["admm", "fista", "newton"])
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--constraint-tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per solve (default: the solver's)")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="GiB a solve may take (default: the solver's share of the free memory)")
    parser.add_argument("--anderson", type=int, default=None,
                        help="the ADMM's Anderson memory (0: none; default: the solver's)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="working precision (default: the solver's; float32 for the ADMM at tol ≥ 1e-3)")
    parser.add_argument("--device", default="cpu", help="where the network trains and the solves run (cpu, cuda)")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    options = dict(tol=args.tol, constraint_tol=args.constraint_tol, time_limit=args.time_limit)
    if args.threads is not None:
        options["num_threads"] = args.threads
    if args.memory_limit is not None:
        options["memory_limit"] = int(args.memory_limit * 2**30)
    if args.anderson is not None:
        options["anderson"] = args.anderson
    if args.dtype is not None:
        options["dtype"] = getattr(torch, args.dtype)
    print(f"machine: {machine(args.device)}; device {args.device}; time limit {args.time_limit:g} s, tol {args.tol:g}, "
          f"constraint_tol {args.constraint_tol:g}, λ {args.weight_decay:g}, mean, {args.hidden} hidden neurons, "
          f"Anderson memory {'default' if args.anderson is None else args.anderson}, "
          f"working precision {args.dtype or 'default'}\n")
    print("| n | seed | step | P | method | status | lower bound | value | rel. gap | violation | iterations | "
          "time s | peak GiB (start) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for seed in args.seeds:
            problems = snapshots(args.root, n, seed, sorted(args.steps), args.hidden, args.weight_decay, args.device)
            for step, problem in zip(sorted(args.steps), problems, strict=True):
                for method in args.methods:
                    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                        r = pool.submit(measure, problem, method, options, args.device).result()
                    gap = (r["value"] - r["bound"]) / abs(r["value"]) if r["value"] else float("nan")
                    print(f"| {n} | {seed} | {step} | {problem.num_patterns} | {method} | {r['status']} | "
                          f"{r['bound']:.6g} | {r['value']:.6g} | {gap:.2e} | {r['violation']:.1e} | "
                          f"{r['iterations']} | {r['seconds']:.1f} | {r['peak_gib']:.2f} ({r['start_gib']:.2f}) |",
                          flush=True)


if __name__ == "__main__":
    main()
