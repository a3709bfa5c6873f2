"""Benchmark on training trajectories: the native solver, cold and warm, against cvxpy's Clarabel and ECOS.

The instances are what a convex monitor solves during training. ``hcl.TwoLayerReLU`` (``m`` hidden neurons,
first-layer bias, no output bias, reduction ``"mean"``, weight decay ``λ``, float64) is trained by full-batch gradient
descent (plain SGD on the whole data set) on ``n`` Gaussian points in ``d − 1`` dimensions (``d`` with the bias
column) with a planted target; its weights are kept at steps ``t``, ``t + 1`` and ``t + 10``. For each kept pair
``(t, t + k)`` and each formulation (``"patterns"``, ``"neurons"``) of :func:`hcl.convex.problem_from_network`:

* the step-``t`` problem is solved cold by the native solver; its solution is carried to the step-``t + k``
  patterns with :func:`hcl.convex.native.remap_warm_start`, exactly as ``ConvexGapMonitor(warm_start="previous")``
  does (:class:`hcl.convex.snapshot.WarmStartChain`);
* the step-``t + k`` problem is solved four times in the same run, on one thread (cvxpy's solvers are
  single-threaded; the native solver gets ``torch.set_num_threads(1)``): native cold, native warm, Clarabel, ECOS.

Printed: a markdown table (times are wall times of :func:`hcl.convex.solve`, best of ``--repeats``), the relative
objective difference of both native values to the best certified cvxpy value, the ratios best cvxpy / native cold,
best cvxpy / native warm (the fastest cvxpy solve that returned a point, ``optimal_inaccurate`` included) and
warm / cold, and a summary line of median ratios. A status other than ``optimal`` is
shown in its cell; a difference is checked against 1e-6 only where both sides are certified.

Usage: ``python benchmarks/trajectories.py [--quick] [--sizes "500,20,100;1000,50,100"] [--seeds 0,1,2]
[--lams 1e-3,1e-2] [--formulations patterns,neurons] [--step 200] [--gaps 1,10] [--repeats R]
[--solvers clarabel,ecos | none] [--target teacher | noise]``. ``--quick``: the smallest size and one seed;
``--solvers none``: the native solver alone, cold against warm (fast). See ``docs/solvers.md`` (Trajectory
instances) for measured tables.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hcl.convex import problem_from_network, solve
from hcl.convex.cvxpy_solver import OWN_DEFAULTS
from hcl.convex.native import remap_warm_start
from hcl.convex.problem import ConvexProblem, ConvexSolution
from hcl.convex.solvers import get_solver
from hcl.convex.status import Status
from hcl.model import TwoLayerReLU
from hcl.patterns import pattern_keys

SIZES = [(500, 20, 100), (1000, 50, 100)]
TARGETS = ("teacher", "noise")
MAX_REL_DIFF = 1e-6  # the accuracy required where both values are certified (docs/solvers.md#trajectory-instances)


# ----------------------------------------------------------------------------- instances
@dataclass(frozen=True)
class Weights:
    """A network's weights at one step of training (detached float64 copies)."""

    step: int
    hidden_weight: Tensor
    hidden_bias: Tensor
    output_weight: Tensor


def trajectory_data(n: int, d: int, seed: int, target: str = "teacher") -> tuple[Tensor, Tensor]:
    """``n`` points ``N(0, I_{d−1})`` (the model adds the bias) and a target: ``"teacher"``, five planted ReLU
    neurons plus noise ``N(0, 0.01)``; ``"noise"``, ``N(0, 1)`` independent of ``X``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d - 1, generator=g, dtype=torch.float64)
    if target == "noise":
        return X, torch.randn(n, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, d - 1, generator=g, dtype=torch.float64)
    y = torch.relu(X @ teacher.T).sum(1) / 5 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def train_trajectory(X: Tensor, y: Tensor, m: int, lam: float, seed: int, steps: list[int],
                     lr: float = 0.05, optimizer: str = "sgd") -> list[Weights]:
    """Train ``TwoLayerReLU`` by full-batch gradient descent (``optimizer``) on ``X``'s device; its weights at each of
    ``steps`` (before that step's update, as a monitor's ``on_train_batch_start`` sees them). ``y`` is ``(n,)`` or
    ``(n, c)``."""
    torch.manual_seed(seed)
    outputs = 1 if y.ndim == 1 else y.shape[1]
    model = TwoLayerReLU(in_features=X.shape[1], hidden=m, out_features=outputs, bias=True, output_bias=False,
                         reduction="mean", weight_decay=lam, optimizer=optimizer, lr=lr).double().to(X.device)
    optimizer = model.configure_optimizers()
    kept, wanted = [], set(steps)
    for step in range(max(steps) + 1):
        if step in wanted:
            kept.append(Weights(step, model.hidden_layer.weight.detach().clone(),
                                model.hidden_layer.bias.detach().clone(), model.output_layer.weight.detach().clone()))
        if step == max(steps):
            break
        optimizer.zero_grad(set_to_none=True)
        model.objective(X, y).backward()
        optimizer.step()
    return kept


def snapshot_problem(X: Tensor, y: Tensor, weights: Weights, lam: float, formulation: str) -> ConvexProblem:
    """The problem a monitor builds from these weights (its feasible point is not needed here)."""
    problem, _ = problem_from_network(X, y, weights.hidden_weight, weights.hidden_bias, weights.output_weight, None,
                                      weight_decay=lam, reduction="mean", formulation=formulation)
    return problem


def trajectory_problems(n: int, d: int, m: int, lam: float, seed: int, formulation: str, step: int = 200,
                        gaps: tuple[int, ...] = (1, 10), target: str = "teacher") -> list[ConvexProblem]:
    """The problems at steps ``step`` and ``step + k`` for each ``k`` in ``gaps``, in that order."""
    X, y = trajectory_data(n, d, seed, target)
    kept = train_trajectory(X, y, m, lam, seed, [step] + [step + k for k in gaps])
    return [snapshot_problem(X, y, weights, lam, formulation) for weights in kept]


def new_patterns(old: Tensor, new: Tensor) -> int:
    """How many of ``new``'s columns are not among ``old``'s."""
    known = set(map(tuple, pattern_keys(old).tolist()))
    return sum(key not in known for key in map(tuple, pattern_keys(new).tolist()))


# ----------------------------------------------------------------------------- timing
def native_options() -> dict:
    """One thread for the native solver, through its own option where it has one."""
    return {"num_threads": 1} if "num_threads" in get_solver("native").options else {}


def timed(repeats: int, problem: ConvexProblem, solver: str, **options) -> tuple[ConvexSolution, float]:
    """The fastest of ``repeats`` solves and its wall time."""
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        solution = solve(problem, solver, **options)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[1]:
            best = (solution, seconds)
    return best


def certified(solution: ConvexSolution) -> bool:
    return Status.of(solution.status) is Status.OPTIMAL


@dataclass
class Row:
    cells: list[str]
    cold_ratio: float | None  # best cvxpy / native cold
    warm_ratio: float | None  # best cvxpy / native warm
    warm_over_cold: float
    gap: int
    rel_diff: float | None  # the larger of the native values' differences, where certified on both sides


def measure(before: ConvexProblem, after: ConvexProblem, label: list[str], gap: int, args) -> Row:
    opts = native_options()
    previous = solve(before, "native", **opts)
    start = remap_warm_start(before.patterns, previous, after.patterns)
    cold, t_cold = timed(args.repeats, after, "native", **opts)
    warm, t_warm = timed(args.repeats, after, "native", warm_start=start, **opts)
    # at their own default tolerances, as cvxpy ships them (hcl asks Clarabel for 1e-9 unless told)
    conic = [timed(args.repeats, after, name, **OWN_DEFAULTS.get(name.upper(), {})) for name in args.solvers]
    # the reference value from certified solves only; the reference time from any usable one (the lower ratio)
    best_value = min((s.value for s, _ in conic if certified(s)), default=None)
    best_time = min((t for s, t in conic if Status.of(s.status).solved), default=None)
    # relative to the value, floored as every relative gap of hcl is (an optimum of 0 has no relative difference)
    floor = max(after.gap_floor, 1e-300)
    diff = {id(s): abs(s.value - best_value) / max(abs(best_value), floor)
            for s in (cold, warm) if certified(s) and best_value is not None}
    rel_diff = max(diff.values()) if diff else None

    def counts(solution: ConvexSolution) -> bool:  # a speed ratio only for a certified value that agrees
        return certified(solution) and diff.get(id(solution), 0.0) <= MAX_REL_DIFF

    def native_cell(solution: ConvexSolution, seconds: float) -> str:
        status = "" if certified(solution) else f", {solution.status}"
        return f"{seconds:.3f} ({solution.iterations}{status})"

    cells = label + [f"{after.num_patterns} ({new_patterns(before.patterns, after.patterns)})",
                     native_cell(cold, t_cold), native_cell(warm, t_warm)]
    cells += [f"{t:.2f}" + ("" if certified(s) else f" ({s.status})") for s, t in conic]
    flag = "" if rel_diff is None or rel_diff <= MAX_REL_DIFF else " (> 1e-6)"
    cells.append("–" if rel_diff is None else f"{rel_diff:.1e}{flag}")
    cold_ratio = None if best_time is None or not counts(cold) else best_time / t_cold
    warm_ratio = None if best_time is None or not counts(warm) else best_time / t_warm
    cells += ["–" if r is None else f"{r:.1f}×" for r in (cold_ratio, warm_ratio)]
    cells.append(f"{t_warm / t_cold:.2f}")
    return Row(cells, cold_ratio, warm_ratio, t_warm / t_cold, gap, rel_diff)


# ----------------------------------------------------------------------------- report
def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown CPU")
    except OSError:
        model = "unknown CPU"
    return f"{model}; torch {torch.__version__}; {torch.get_num_threads()} torch thread(s)"


def median(values: list[float]) -> str:
    return "–" if not values else f"{statistics.median(values):.2f}"


def summary(rows: list[Row]) -> str:
    parts = []
    for gap in sorted({r.gap for r in rows}):
        some = [r for r in rows if r.gap == gap]
        cold = [r.cold_ratio for r in some if r.cold_ratio is not None]
        warm = [r.warm_ratio for r in some if r.warm_ratio is not None]
        ratio = [r.warm_over_cold for r in some]
        slower = sum(x > 1 for x in ratio)
        # a native solve not certified, or off the reference by more than 1e-6, has no ratio (a fast wrong answer)
        left = "" if len(cold) == len(warm) == len(some) else f" over {len(cold)} / {len(warm)} of {len(some)} rows"
        shown = [median(values) + ("×" if values else "") for values in (cold, warm)]
        parts.append(f"step +{gap}: median best cvxpy / cold {shown[0]}, best cvxpy / warm {shown[1]}"
                     f"{left}, warm / cold {median(ratio)} (warm slower than cold in {slower} of {len(some)})")
    diffs = [r.rel_diff for r in rows if r.rel_diff is not None]
    worst = "–" if not diffs else f"{max(diffs):.1e}"
    return "Summary: " + "; ".join(parts) + f"; worst relative objective difference {worst}"


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in size.split(",")) for size in text.split(";") if size.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=";".join(",".join(map(str, s)) for s in SIZES), help='"n,d,m;..."')
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lams", default="1e-3,1e-2")
    parser.add_argument("--formulations", default="patterns,neurons")
    parser.add_argument("--step", type=int, default=200, help="the step t of the first snapshot")
    parser.add_argument("--gaps", default="1,10", help="later snapshots at t + k")
    parser.add_argument("--solvers", default="clarabel,ecos",
                        help='the cvxpy solvers to compare with; "none": the native solver alone (cold against warm)')
    parser.add_argument("--target", default="teacher", choices=TARGETS, help="see trajectory_data")
    parser.add_argument("--repeats", type=int, default=1, help="every timed solve this many times, its fastest kept")
    parser.add_argument("--quick", action="store_true", help="the smallest size and one seed")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    sizes = parse_sizes(args.sizes)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        sizes, seeds = [min(sizes, key=lambda s: s[0] * s[1] * s[2])], seeds[:1]
    lams = [float(v) for v in args.lams.split(",")]
    gaps = tuple(int(k) for k in args.gaps.split(","))
    args.solvers = [] if args.solvers == "none" else args.solvers.split(",")
    torch.set_num_threads(1)  # cvxpy's solvers are single-threaded: the native solver gets one thread too
    print(f"Machine: {machine()}; target {args.target}; snapshots at t = {args.step} and t + {list(gaps)}")
    solve(trajectory_problems(40, 4, 8, 1e-3, 0, "patterns", step=2, gaps=(1,))[0], "native")  # warm-up
    print(row(["n, d, m", "λ", "seed", "formulation", "step", "P (new)", "native cold s (it)", "native warm s (it)"]
              + [f"{name.capitalize()} s" for name in args.solvers]
              + ["rel. obj. diff", "cvxpy / cold", "cvxpy / warm", "warm / cold"]))
    print(row(["---"] * (12 + len(args.solvers))))
    rows = []
    for n, d, m in sizes:
        for lam in lams:
            for seed in seeds:
                X, y = trajectory_data(n, d, seed, args.target)
                kept = train_trajectory(X, y, m, lam, seed, [args.step] + [args.step + k for k in gaps])
                for formulation in args.formulations.split(","):
                    problems = [snapshot_problem(X, y, weights, lam, formulation) for weights in kept]
                    for gap, after in zip(gaps, problems[1:]):
                        label = [f"{n}, {d}, {m}", f"{lam:g}", seed, formulation, f"t+{gap}"]
                        rows.append(measure(problems[0], after, label, gap, args))
                        print(row(rows[-1].cells), flush=True)
    print("\n" + summary(rows))


if __name__ == "__main__":
    main()
