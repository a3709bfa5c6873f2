"""Cost of PatternMonitor at every step, as a fraction of a training step.

Trains the same TwoLayerReLU with full-batch gradient descent twice — without and with
``PatternMonitor(every_n_steps=1)`` — and prints the ratio of the wall times (target: ≤ 1.10), plus the cost of
the monitor's own work (pattern packing, unique patterns, history) measured directly against one step. With
``--batch-size``, on mini-batches: the monitor then computes the whole training set's pre-activations at each step.

    python benchmarks/pattern_monitor.py                       # n=60000, d=785, m=1000 (MNIST-sized)
    python benchmarks/pattern_monitor.py --n 20000 --steps 3    # scaled down
    python benchmarks/pattern_monitor.py --n 5000 --batch-size 100 --steps 20   # mini-batches

Uses the real MNIST training set when ``--mnist-root`` holds it (default ``../shared/data``), else Gaussian data
of the same shape. Runs on CUDA when available.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hcl import TwoLayerReLU
from hcl.callbacks import PatternMonitor
from hcl.patterns import PatternTracker, pack_signs


class _FullBatch(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.X, self.y


def _data(n: int, d: int, root: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if d == 785 and images.exists():
        from hcl.datamodules import MNIST

        dm = MNIST(root=str(root), subset=n, val_size=0)
        dm.setup("fit")
        X, Y = dm.train_tensors()
        X = torch.cat([X, torch.ones(X.shape[0], 1)], dim=1)  # the bias column makes d = 785
        source = "MNIST"
    else:
        g = torch.Generator().manual_seed(0)
        X, Y = torch.randn(n, d, generator=g), torch.randn(n, 10, generator=g)
        source = "Gaussian"
    return X.to(device), Y.to(device), source


def _fit_seconds(X, Y, hidden: int, steps: int, callbacks, accelerator: str, batch_size: int | None) -> float:
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=X.shape[1], hidden=hidden, out_features=Y.shape[1], lr=0.01)
    trainer = pl.Trainer(max_steps=steps + 1, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    timer = _StepTimer()
    trainer.callbacks.append(timer)
    loader = (DataLoader(_FullBatch(X, Y), batch_size=None) if batch_size is None else
              DataLoader(TensorDataset(X, Y), batch_size=batch_size))
    trainer.fit(model, loader)
    return timer.seconds


class _StepTimer(pl.Callback):
    """Wall time of steps 1…N (step 0 carries one-off set-up costs)."""

    def __init__(self):
        self.seconds = 0.0
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= 1:
            _sync()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            _sync()
            self.seconds += time.perf_counter() - self._start
            self._start = None


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--d", type=int, default=785)
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="mini-batches of this size (default: full batch)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest counts")
    parser.add_argument("--mnist-root", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    X, Y, source = _data(args.n, args.d, args.mnist_root, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    batches = "full batch" if args.batch_size is None else f"batches of {args.batch_size}"
    print(f"data: {source} n={X.shape[0]} d={X.shape[1]} m={args.hidden}, {batches}, {args.steps} timed steps, {name}")

    # Alternate the two runs and keep the fastest of each: a busy machine slows whichever run it overlaps.
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for monitored in (False, True):
            callbacks = [PatternMonitor(every_n_steps=1)] if monitored else []
            times[monitored].append(_fit_seconds(X, Y, args.hidden, args.steps, callbacks, accelerator,
                                                 args.batch_size))
    without, with_monitor = min(times[False]), min(times[True])
    print(f"training step without monitor : {1e3 * without / args.steps:9.1f} ms")
    print(f"training step with monitor    : {1e3 * with_monitor / args.steps:9.1f} ms")
    print(f"ratio with / without          : {with_monitor / without:9.3f}   (target <= 1.10)")

    # The monitor's own work on one snapshot, beyond the pre-activations (full batch: the forward pass's own).
    torch.manual_seed(1)
    pre = X @ torch.randn(args.hidden, X.shape[1], device=device).T
    tracker = PatternTracker()
    tracker.update_packed(pack_signs(pre))
    _sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        tracker.update_packed(pack_signs(pre))
    _sync()
    own = (time.perf_counter() - start) / args.steps
    print(f"monitor work per snapshot     : {1e3 * own:9.1f} ms = {own / (without / args.steps):.3f} of a step")


if __name__ == "__main__":
    main()
