"""The accuracy table: test accuracy, wall time and peak memory of convex and non-convex training, beside the paper's.

Methods, all at the same width ``m`` and the same objective (mean squared error on one-hot targets plus weight
decay ``λ``, ``docs/convex.md``), the learning rate of each chosen by validation accuracy over ``GRIDS``:

- convex gated ReLU and convex ReLU: :class:`hcl.ConvexReLU` on ``m`` Gaussian gates trained on mini-batches (Adam
  step and group prox, the mapped network evaluated);
- the same two programs solved on the full batch by the native solver's first-order method (``solver`` rows: FISTA,
  its step found by backtracking, so nothing to tune; the ReLU program mapped to a network by
  ``ConvexProblem.to_network``), stopped at ``--convex-iters`` iterations;
- Adam, SGD (momentum 0.9) and Adagrad: :class:`hcl.TwoLayerReLU` of ``m`` hidden neurons (torch's default
  initialisation) trained on mini-batches.

Every run is a fresh child process: its wall time (training and evaluation, data loading excluded) and its peak
resident memory (``VmHWM``: the interpreter, torch, the data and the method together) are its own, and so is the
method's share of it (``own MB``: the peak while it runs above the resident memory it started from, the data
loaded); on a GPU also ``torch.cuda.max_memory_allocated``. Settings and results: ``docs/accuracy.md``.

    python benchmarks/accuracy_table.py --root ../shared/data           # CPU: 10 000 MNIST images, width 100
    python benchmarks/accuracy_table.py --root ../shared/data --quick   # 2 000 images, width 50, a few epochs
    python benchmarks/accuracy_table.py --root data                     # GPU: full sets, the paper's widths

CIFAR-10 is added when ``<root>/cifar-10-batches-py`` exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import resource
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
from peak_memory import reset_peak, status_kib  # this folder is on sys.path when run as a script
from torch import Tensor

# The paper's test accuracies (%), Mishkin, Sahiner & Pilanci, ICML 2022, Table 4 (its convex model: gated ReLU).
PAPER = {
    "mnist": {"convex gated ReLU": 97.6, "Adam": 98.0, "SGD": 97.2, "Adagrad": 97.5},
    "cifar10": {"convex gated ReLU": 56.4, "Adam": 50.1, "SGD": 54.3, "Adagrad": 54.2},
}
# The paper's widths: 5 000 sampled gates on MNIST, 4 000 on CIFAR-10.
PAPER_WIDTH = {"mnist": 5000, "cifar10": 4000}
# Learning-rate grids: decades around each optimizer's usual rate; --quick keeps two of each (the upper two for Adam
# and the convex models, the lower two for SGD and Adagrad).
GRIDS = {
    "convex gated ReLU": (1e-4, 1e-3, 1e-2),
    "convex ReLU": (1e-4, 1e-3, 1e-2),
    "Adam": (1e-4, 1e-3, 1e-2),
    "SGD": (1e-2, 1e-1, 1.0),
    "Adagrad": (1e-2, 1e-1, 1.0),
}
SOLVER_METHODS = ("convex gated ReLU (solver)", "convex ReLU (solver)")
METHODS = (*GRIDS, *SOLVER_METHODS)
# TwoLayerReLU's optimizer names
OPTIMIZERS = {"Adam": "adam", "SGD": "momentum", "Adagrad": "adagrad"}
Splits = dict[str, tuple[Tensor, Tensor]]


@dataclass
class Settings:
    """One table's settings. ``subset=None``: the whole training set (less the validation points)."""

    dataset: str = "mnist"
    root: str = "data"
    subset: int | None = 10_000
    val_size: int = 2_000
    width: int = 100
    epochs: int = 50
    batch_size: int = 500
    weight_decay: float = 1e-4
    convex_iters: int = 300
    convex_time_limit: float = 600.0
    device: str = "cpu"
    seed: int = 0
    grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(GRIDS))


@dataclass
class RunResult:
    method: str
    lr: float | None
    val_acc: float
    test_acc: float
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    note: str = ""
    own_rss_mb: float = math.nan  # the peak while the method ran above the resident memory it started from


# --------------------------------------------------------------------------- data
def data_module(s: Settings):
    """The data module of ``s`` (mini-batches of ``s.batch_size``); it loads its files on first use."""
    from hcl.datamodules import CIFAR10, MNIST

    cls = {"mnist": MNIST, "cifar10": CIFAR10}[s.dataset]
    return cls(root=s.root, subset=s.subset, val_size=s.val_size, batch_size=s.batch_size, dtype="float32",
               seed=s.seed)


def load_splits(s: Settings, dm) -> Splits:
    """The train, validation and test tensors of ``dm`` on ``s.device`` (one-hot float targets)."""
    return {split: tuple(t.to(s.device) for t in dm.split_tensors(split)) for split in ("train", "val", "test")}


def accuracy(scores: Tensor, targets: Tensor) -> float:
    return float((scores.argmax(1) == targets.argmax(1)).float().mean())


# --------------------------------------------------------------------------- methods
def gated_scores(X: Tensor, gates: Tensor, U: Tensor, chunk: int = 2048) -> Tensor:
    """``Σ_i 1[x·g_i ≥ 0] x U_i`` for every row ``x`` of ``X`` (bias column folded), chunked over rows."""
    P, d, c = U.shape
    flat = U.permute(1, 0, 2).reshape(d, P * c)
    out = []
    for rows in X.split(chunk):
        mask = (rows @ gates >= 0).to(rows.dtype)
        out.append(((rows @ flat).reshape(-1, P, c) * mask.unsqueeze(2)).sum(1))
    return torch.cat(out)


def table_gates(s: Settings, in_features: int) -> Tensor:
    """The ``s.width`` Gaussian gates of the bias-folded inputs: ConvexReLU's of ``gate_seed = s.seed``."""
    from hcl.convex.gated import sample_gates

    return sample_gates(in_features + 1, s.width, s.seed)


def run_solver(s: Settings, gated: bool, splits: Splits) -> tuple[float, float, str]:
    """Solve the (gated) convex problem of ``s.width`` Gaussian gates; return (val acc, test acc, status)."""
    from hcl.convex import solve
    from hcl.convex.problem import ConvexProblem, fold_bias

    X, Y = splits["train"]
    Xf = fold_bias(X, True)
    gates = table_gates(s, X.shape[1]).to(Xf)
    problem = ConvexProblem(Xf, Y, Xf @ gates >= 0, weight_decay=s.weight_decay, reduction="mean")
    solution = solve(problem, "native", gated=gated, method="fista", tol=1e-4, max_iters=s.convex_iters,
                     time_limit=s.convex_time_limit)
    accs = []
    for split in ("val", "test"):
        Xs, Ys = splits[split]
        Xs = fold_bias(Xs, True)
        if gated:
            scores = gated_scores(Xs, gates, solution.U)
        else:
            hidden, output, _ = problem.to_network(solution.U, solution.V, solution.b0)
            scores = torch.relu(Xs @ hidden.T) @ output.T
        accs.append(accuracy(scores, Ys))
    return accs[0], accs[1], f"{solution.status}, {solution.iterations} it"


def run_lightning(s: Settings, method: str, lr: float, splits: Splits, dm) -> tuple[float, float]:
    """Train :class:`hcl.TwoLayerReLU` or :class:`hcl.ConvexReLU` on mini-batches; return (val acc, test acc)."""
    import lightning.pytorch as pl

    from hcl import ConvexReLU, TwoLayerReLU

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the per-run device banner
    pl.seed_everything(s.seed, verbose=False)
    common = {"in_features": dm.in_features, "out_features": dm.out_features, "bias": True, "reduction": "mean",
              "weight_decay": s.weight_decay, "lr": lr}
    if method in OPTIMIZERS:
        model = TwoLayerReLU(hidden=s.width, loss="squared", optimizer=OPTIMIZERS[method], momentum=0.9,
                             init="uniform", **common)
    else:
        # no certificate during training: the table times the training alone
        model = ConvexReLU(num_gates=s.width, variant="gated" if method == "convex gated ReLU" else "relu",
                           optimizer="adam", gate_seed=s.seed, certify_every_n_steps=None, **common)
    device = torch.device(s.device)
    devices = [device.index] if device.type == "cuda" and device.index is not None else 1  # cuda:1 is not GPU 0
    trainer = pl.Trainer(max_epochs=s.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=devices,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals, not the result
        trainer.fit(model, datamodule=dm)
    model = model.to(s.device).eval()
    with torch.no_grad():
        return tuple(accuracy(model(splits[split][0]), splits[split][1]) for split in ("val", "test"))


def run_one(s: Settings, method: str, lr: float | None) -> RunResult:
    """One method at one learning rate, measured in this process (meant to be a fresh child)."""
    if s.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(s.device)
    dm = data_module(s)  # loaded once, before the clock starts: the Lightning runs train from the same module
    splits = load_splits(s, dm)
    before = status_kib("VmRSS") if reset_peak() else None  # the loading's transient peak is not the method's
    start = time.perf_counter()
    note = ""
    if method == "data only":
        val_acc = test_acc = math.nan
    elif method in SOLVER_METHODS:
        val_acc, test_acc, note = run_solver(s, method == "convex gated ReLU (solver)", splits)
    else:
        val_acc, test_acc = run_lightning(s, method, lr, splits, dm)
    if s.device.startswith("cuda"):
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated(s.device) / 2**20 if s.device.startswith("cuda") else None
    peak = status_kib("VmHWM")  # this process's own: ru_maxrss also counts the parent's memory at the fork
    rss = (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    own = math.nan if before is None or peak is None else (peak - before) / 1024
    return RunResult(method, lr, val_acc, test_acc, seconds, rss, gpu, note, own)


def run_isolated(s: Settings, method: str, lr: float | None) -> RunResult:
    """:func:`run_one` in a fresh spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_one, s, method, lr).result()


# --------------------------------------------------------------------------- the table
def table(s: Settings, isolate: bool = True, log=print) -> list[dict]:
    """Every method (the learning rate chosen by validation accuracy); one row per method with its grid's time."""
    run = run_isolated if isolate else run_one
    rows = []
    floor = run(s, "data only", None)
    rows.append({"result": floor, "grid": "", "grid_seconds": 0.0})
    for method, grid in s.grids.items():
        results = []
        for lr in grid:
            results.append(run(s, method, lr))
            log(f"  {method} lr={lr:g}: val {100 * results[-1].val_acc:.2f}%, "
                f"test {100 * results[-1].test_acc:.2f}% in {results[-1].seconds:.1f} s")
        best = max(results, key=lambda r: r.val_acc if math.isfinite(r.val_acc) else -1.0)
        rows.append({"result": best, "grid": ", ".join(f"{lr:g}" for lr in grid),
                     "grid_seconds": sum(r.seconds for r in results)})
    for method in SOLVER_METHODS:
        result = run(s, method, None)
        log(f"  {method}: val {100 * result.val_acc:.2f}%, test {100 * result.test_acc:.2f}% in "
            f"{result.seconds:.1f} s ({result.note})")
        rows.append({"result": result, "grid": "—", "grid_seconds": result.seconds})
    return rows


def markdown(s: Settings, rows: list[dict]) -> str:
    paper = PAPER[s.dataset]
    gpu = s.device.startswith("cuda")
    head = ["method", "lr grid (chosen)", "val acc %", "test acc %", "paper %", "time s", "grid time s",
            "peak RSS MB", "own MB"] + (["peak GPU MB"] if gpu else []) + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = row["result"]
        grid = row["grid"] if r.lr is None else f"{row['grid']} ({r.lr:g})"
        cells = [r.method, grid, _pct(r.val_acc), _pct(r.test_acc),
                 _paper(paper, r.method), f"{r.seconds:.1f}",
                 f"{row['grid_seconds']:.1f}", f"{r.peak_rss_mb:.0f}",
                 "—" if not math.isfinite(r.own_rss_mb) else f"{r.own_rss_mb:.0f}"]
        cells += [f"{r.peak_gpu_mb:.0f}"] if gpu else []
        lines.append("| " + " | ".join(cells + [r.note]) + " |")
    return "\n".join(lines)


def describe(s: Settings) -> str:
    n = "all" if s.subset is None else f"{s.subset}"
    gpu = s.device.startswith("cuda")
    machine = torch.cuda.get_device_name(torch.device(s.device)) if gpu else f"{os.cpu_count()} CPU cores"
    return (f"{s.dataset}: {n} training images ({s.val_size} more held out for validation), all test images; "
            f"width {s.width}; λ = {s.weight_decay:g} (mean reduction); {s.epochs} epoch{'s' * (s.epochs != 1)} of "
            f"batches of {s.batch_size}; convex: at most {s.convex_iters} iterations or {s.convex_time_limit:g} s; "
            f"{machine}, {platform.processor() or platform.machine()}, torch {torch.__version__}")


def _paper(paper: dict[str, float], method: str) -> str:
    """The paper's number of a method; its convex model is gated ReLU solved on the full batch (R-FISTA)."""
    value = paper.get(method.removesuffix(" (solver)"))
    return "—" if value is None else f"{value:.1f}"


def _pct(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{100 * value:.2f}"


def settings_for(dataset: str, args: argparse.Namespace, device: str) -> Settings:
    """The CPU setting (a subset at a small width), the GPU one (full sets at the paper's width), or ``--quick``."""
    gpu = device.startswith("cuda")
    s = Settings(dataset=dataset, root=args.root, device=device, seed=args.seed)
    if gpu:
        s = dataclasses.replace(s, subset=None, val_size=5000, width=PAPER_WIDTH[dataset], epochs=20, batch_size=1000,
                                convex_iters=500)
    if args.quick:
        s = dataclasses.replace(s, subset=2000, val_size=1000, width=50, epochs=8, batch_size=200, convex_iters=100,
                                grids={k: v[1:] if k in ("Adam", "convex gated ReLU", "convex ReLU") else v[:2]
                                       for k, v in GRIDS.items()})
    overrides = {"subset": args.subset, "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
                 "weight_decay": args.weight_decay, "convex_iters": args.convex_iters}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if args.subset == 0:
        s = dataclasses.replace(s, subset=None)
    return s


def _at_least(low: float, kind: type):
    """An argparse type: ``kind`` of the argument, refused below ``low`` (before any run, not in a child at the end)."""
    def parse(text: str):
        value = kind(text)  # ValueError: argparse's "invalid int value"
        if not low <= value < math.inf:  # NaN and inf too
            raise argparse.ArgumentTypeError(f"must be a finite number at least {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data", help="folder holding MNIST/raw/ (and cifar-10-batches-py/)")
    parser.add_argument("--quick", action="store_true", help="2 000 images, width 50, 8 epochs, two rates each")
    parser.add_argument("--subset", type=_at_least(0, int), help="training images (0: all)")
    parser.add_argument("--width", type=_at_least(1, int), help="hidden neurons / gates")
    parser.add_argument("--epochs", type=_at_least(1, int))
    parser.add_argument("--batch-size", type=_at_least(1, int))
    parser.add_argument("--weight-decay", type=_at_least(0, float))
    parser.add_argument("--convex-iters", type=_at_least(1, int), help="iteration cap of the convex solves")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", choices=sorted(PAPER),
                        help="default: mnist, and cifar10 where its files are present")
    args = parser.parse_args(argv)
    cifar = os.path.join(args.root, "cifar-10-batches-py")
    if args.datasets and "cifar10" in args.datasets and not os.path.isdir(cifar):
        parser.error(f"--datasets cifar10: no {cifar} (hcl.datamodules.CIFAR10(root, download=True) fetches it)")
    print("python " + " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))))
    for dataset in args.datasets or list(PAPER):
        if dataset == "cifar10" and not os.path.isdir(cifar):
            print(f"\ncifar10: no {cifar}, skipped")
            continue
        s = settings_for(dataset, args, args.device)
        print(f"\n{describe(s)}")
        start = time.perf_counter()
        rows = table(s)
        print(f"\n{markdown(s, rows)}\n\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
