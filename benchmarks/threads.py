"""The native solver's default threads with one core busy, against one thread on an idle machine.

The case of an asynchronous solve beside training, or of two monitors: a busy process keeps one core at 100 %, and
two seconds after it started, the trajectory instance of ``benchmarks/trajectories.py`` (``TwoLayerReLU``
trained by gradient descent, patterns at step 200) is solved with the default threads, with one and with all; then,
the busy process stopped, with one thread on the idle machine. It prints the thread count the default chose and the
ratio of each time to the idle one-thread time (the target: default with one core busy ≤ 1.2×). Figures:
``docs/solvers.md#threads``.

    python benchmarks/threads.py                 # (500, 20, 100), λ = 1e-3
    python benchmarks/threads.py --size 1000 50 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from trajectories import machine, trajectory_problems  # this folder is on sys.path when run as a script

from hcl.convex import solve
from hcl.convex.native.threads import busy_cores, default_threads

BUSY = "while True: pass"


def timed(problem, repeats: int, **options) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solution = solve(problem, "native", **options)
        times.append(time.perf_counter() - start)
        assert str(solution.status) == "optimal", solution.status
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[500, 20, 100], metavar=("N", "D", "M"))
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, d, m = args.size
    problem = trajectory_problems(n, d, m, args.lam, 0, "patterns", gaps=())[0]
    size = problem.n * problem.d * problem.num_patterns * problem.c
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {machine()}; {cores} usable cores; instance (n, d, P) = ({problem.n}, {problem.d}, "
          f"{problem.num_patterns}), λ = {args.lam:g}, median of {args.repeats}")
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(2.0)
        busy_now = busy_cores()
        chosen = default_threads(size)
        rows = [(f"default ({chosen} thread(s)), one core busy, {busy_now:.2f} cores seen busy",
                 timed(problem, args.repeats)),
                ("1 thread, one core busy", timed(problem, args.repeats, num_threads=1)),
                (f"{cores} threads, one core busy", timed(problem, args.repeats, num_threads=cores))]
    finally:
        busy.kill()
        busy.wait()
    time.sleep(5.0)
    idle = timed(problem, args.repeats, num_threads=1)
    rows.append(("1 thread, idle", idle))
    print("\n| run | time s | / idle one thread |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / idle:.2f} |")


if __name__ == "__main__":
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    main()
