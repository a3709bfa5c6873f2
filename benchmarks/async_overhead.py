"""How much a convex-gap monitor solving at every step slows training down, synchronous or in the background.

Full-batch gradient descent on the seed's experiment (c) (100 Gaussian points in 10-D, 20 neurons, float64). Runs
alternate (baseline, asynchronous, baseline, ...) so that a busy machine affects them alike; the printed ratios are
medians over the repetitions:

- "cpu": CPU time of the training thread over the training steps: the work the monitor adds to training itself
  (snapshot copies, polling, logging), independent of what else runs on the machine;
- "steps": wall time of the training steps (first step start to last step end), which also feels the competition
  for CPU cores (the worker process runs at a lower priority) and, on a shared machine, everyone else's load;
- "median step": the median duration of one step, less sensitive to bursts of load from elsewhere;
- "fit": the whole ``fit``, with the final drain of the queue (the solves still in flight when training ends and,
  for a short run, the start of the worker process).

    python benchmarks/async_overhead.py                     # process worker, 600 steps, 3 repetitions
    python benchmarks/async_overhead.py --niceness 0                        # worker at training's priority
    python benchmarks/async_overhead.py --worker thread --sync --steps 300
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

import hcl.worker
from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor
from hcl.datamodules import SyntheticRegression


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.durations: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()
        if not self.wall:
            self.wall.append(self._start)
            self.cpu.append(time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.durations.append(now - self._start)
        self.wall[1:] = [now]
        self.cpu[1:] = [time.thread_time()]


def run(steps: int, monitor: ConvexGapMonitor | None) -> dict[str, float]:
    torch.manual_seed(0)
    data = SyntheticRegression(kind="gaussian_linear", n=100, d=10, seed=0, dtype="float64")
    model = TwoLayerReLU(in_features=10, hidden=20, init="normal", init_scale=1e-3, lr=0.05)
    timer = StepTimer()
    callbacks = [timer] + ([monitor] if monitor is not None else [])
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit = time.perf_counter() - start
    metrics = trainer.callback_metrics
    return {"cpu": timer.cpu[1] - timer.cpu[0], "steps": timer.wall[1] - timer.wall[0],
            "median step": statistics.median(timer.durations), "fit": fit,
            "skipped": float(metrics.get("convex/skipped", 0.0))}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["process", "thread"], default="process")
    parser.add_argument("--max-pending", type=int, default=2)
    parser.add_argument("--niceness", type=int, default=None,
                        help="nice increment of the worker process (default: hcl.worker.WORKER_NICENESS)")
    parser.add_argument("--sync", action="store_true", help="also time the synchronous monitor (slow)")
    args = parser.parse_args()
    if args.niceness is not None:
        hcl.worker.WORKER_NICENESS = args.niceness
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    def asynchronous() -> ConvexGapMonitor:
        return ConvexGapMonitor(every_n_steps=1, formulation="neurons", solver="clarabel", asynchronous=True,
                                worker=args.worker, max_pending=args.max_pending)

    run(20, None)  # imports and first-call costs out of the way
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "async": [], "sync": []}
    for _ in range(args.repeats):
        results["baseline"].append(run(args.steps, None))
        results["async"].append(run(args.steps, asynchronous()))
        if args.sync:
            results["sync"].append(run(args.steps, ConvexGapMonitor(every_n_steps=1, formulation="neurons",
                                                                     solver="clarabel")))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores (load average {load}), 1 torch thread; {args.steps} "
          f"full-batch steps, {args.repeats} repetitions; worker={args.worker}, max_pending={args.max_pending}, "
          f"niceness={hcl.worker.WORKER_NICENESS}")
    base = results["baseline"]
    medians = {key: statistics.median(r[key] for r in base) for key in KEYS}
    print(f"baseline: cpu {medians['cpu']:.2f} s, steps {medians['steps']:.2f} s, "
          f"median step {1000 * medians['median step']:.2f} ms, fit {medians['fit']:.2f} s")
    for name in ("async", "sync"):
        if not results[name]:
            continue
        ratios = {key: statistics.median(r[key] / b[key] for r, b in zip(results[name], base)) for key in KEYS}
        solved = statistics.median(args.steps - r["skipped"] for r in results[name])
        print(f"{name:>8}: ratio to baseline " + ", ".join(f"{key} {value:.3f}" for key, value in ratios.items())
              + f"; snapshots solved by the end of fit (the rest skipped) {solved:.0f} of {args.steps}")


KEYS = ("cpu", "steps", "median step", "fit")


if __name__ == "__main__":
    main()
