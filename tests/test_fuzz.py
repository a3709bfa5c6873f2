"""Malformed input, generated case by case: a clear error before training, or a warning and training goes on.

Never a hang (pytest-timeout), never a traceback that ends deep inside cvxpy or torch: errors are raised by hcl's own
checks, with a message that names the problem.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hcl.callbacks.convex_gap as convex_gap_module
import hcl.callbacks.solve_queue as solve_queue_module
from hcl import ConvexReLU, TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, GlobalOptimumMonitor, PatternMonitor, StepProgressBar
from hcl.convex import ConvexSolution, Status
from hcl.datamodules import TensorDataModule

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
OWN_CODE = tuple(str(REPO / part) for part in ("hcl", "callbacks", "datamodules"))
NAN, INF = float("nan"), float("inf")


def _data(n=12, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, X @ torch.linspace(-1, 1, d, dtype=torch.float64).unsqueeze(1)


def _with(tensor, row, col, value):
    tensor = tensor.clone()
    tensor[row, col] = value
    return tensor


class Net(pl.LightningModule):
    """A user's module around any ``nn.Module``, with optional objective attributes and output scale."""

    def __init__(self, net: nn.Module, scale: float = 1.0, **attributes):
        super().__init__()
        self.net = net.double()
        self.scale = scale
        for name, value in attributes.items():
            setattr(self, name, value)

    def forward(self, x):
        return self.scale * self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).reshape(y.shape), y)
        self.log("train/objective", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def two_layer(d=3, m=4, c=1):
    return nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c))


class StepCounter(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def _fit(model, data, callbacks, tmp_path, logger="tb", max_steps=3):
    if logger == "tb":
        logger = TensorBoardLogger(str(tmp_path), name="run")
    elif logger == "csv":
        logger = CSVLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, precision="64-true", log_every_n_steps=1, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(model, datamodule=data)
    else:
        trainer.fit(model, data)
    return trainer


def _loader(X, y=None, batch_size=None):
    dataset = TensorDataset(X) if y is None else TensorDataset(X, y)
    return DataLoader(dataset, batch_size=batch_size or X.shape[0])


def _assert_raised_by_hcl(excinfo) -> None:
    where = str(excinfo.traceback[-1].path)
    assert where.startswith(OWN_CODE), f"the error comes from {where}, not from hcl's own checks"


# ---------------------------------------------------------------------------------------- errors at construction
X0, Y0 = _data()
CONSTRUCTION = [
    (lambda: ConvexGapMonitor(every_n_steps=0), ValueError, "every_n_steps"),
    (lambda: ConvexGapMonitor(every_n_steps=-2), ValueError, "every_n_steps"),
    (lambda: ConvexGapMonitor(every_n_steps=1.5), ValueError, "every_n_steps"),
    (lambda: ConvexGapMonitor(every_n_steps=True), ValueError, "every_n_steps"),
    (lambda: ConvexGapMonitor(formulation="layers"), ValueError, "formulation"),
    (lambda: ConvexGapMonitor(solver="gurobi-9"), ValueError, "unknown solver 'gurobi-9'"),
    (lambda: ConvexGapMonitor(solver="mosek"), ValueError, "cvxpy's MOSEK, which is not installed here"),
    (lambda: ConvexGapMonitor(solver="osqp"), ValueError, "cvxpy's OSQP, not one hcl solves"),
    (lambda: ConvexGapMonitor(solver=""), ValueError, "solver must be a solver name"),
    (lambda: ConvexGapMonitor(solver=None), ValueError, "solver must be a solver name"),
    (lambda: ConvexGapMonitor(sampled_patterns=-1), ValueError, "sampled_patterns"),
    (lambda: ConvexGapMonitor(weight_decay=-0.1), ValueError, "weight_decay.*≥ 0"),
    (lambda: ConvexGapMonitor(weight_decay=NAN), ValueError, "weight_decay.*finite"),
    (lambda: ConvexGapMonitor(weight_decay=INF), ValueError, "weight_decay.*finite"),
    (lambda: ConvexGapMonitor(weight_decay="0.1"), TypeError, "weight_decay.*number"),
    (lambda: ConvexGapMonitor(reduction="median"), ValueError, "reduction"),
    (lambda: ConvexGapMonitor(probe=_with(X0, 0, 0, NAN), target=Y0), ValueError, "probe contains NaN"),
    (lambda: ConvexGapMonitor(probe=_with(X0, 1, 2, INF), target=Y0), ValueError, "probe contains NaN or inf"),
    (lambda: ConvexGapMonitor(probe=X0, target=_with(Y0, 0, 0, NAN)), ValueError, "target contains NaN"),
    (lambda: ConvexGapMonitor(probe=torch.zeros(0, 3), target=torch.zeros(0, 1)), ValueError, "probe is empty"),
    (lambda: ConvexGapMonitor(probe=X0), ValueError, "probe and target go together"),
    (lambda: ConvexGapMonitor(target=Y0), ValueError, "probe and target go together"),
    (lambda: ConvexGapMonitor(probe=X0, target=Y0[:5]), ValueError, "12 samples but target 5"),
    (lambda: ConvexGapMonitor(probe=torch.tensor(1.0), target=Y0), ValueError, "sample dimension"),
    (lambda: ConvexGapMonitor(probe=X0 > 0, target=Y0), TypeError, "real numbers"),
    (lambda: ConvexGapMonitor(probe=object(), target=Y0), TypeError, "probe must be a tensor"),
    (lambda: ConvexGapMonitor(max_samples=0), ValueError, "max_samples"),
    (lambda: ConvexGapMonitor(prefix="a/b"), ValueError, "prefix"),
    (lambda: ConvexGapMonitor(prefix=""), ValueError, "prefix"),
    (lambda: ConvexGapMonitor(solver_options=[1]), TypeError, "solver_options"),
    (lambda: ConvexGapMonitor(solver_options={"bogus": 1}), TypeError, "takes no option 'bogus'"),
    (lambda: ConvexGapMonitor(solver="clarabel", solver_options={"method": "admm"}), TypeError, "no option 'method'"),
    (lambda: ConvexGapMonitor(solver_options={"method": "bogus"}), ValueError, "method must be one of"),
    (lambda: ConvexGapMonitor(solver="native", solver_options={"tol": -1}), ValueError, "tol must be"),
    (lambda: GlobalOptimumMonitor(solver="nope"), ValueError, "unknown solver 'nope'"),
    (lambda: GlobalOptimumMonitor(solver_options={"tol": 0}), ValueError, "tol must be"),
    (lambda: GlobalOptimumMonitor(solver_options=[1]), TypeError, "solver_options"),
    (lambda: ConvexGapMonitor(max_pending=0), ValueError, "max_pending"),
    (lambda: ConvexGapMonitor(solve_time_limit=0), ValueError, "solve_time_limit"),
    (lambda: ConvexGapMonitor(solve_time_limit=-1.0), ValueError, "solve_time_limit"),
    (lambda: ConvexGapMonitor(solve_time_limit=NAN), ValueError, "solve_time_limit"),
    (lambda: ConvexGapMonitor(solve_time_limit="5"), TypeError, "solve_time_limit"),
    (lambda: ConvexGapMonitor(worker="gpu"), ValueError, "worker"),
    (lambda: ConvexGapMonitor(asynchronous=True, load_solution=True), ValueError, "load_solution"),
    # combinations that solved nothing (every step status 3) or made training worse, accepted before
    (lambda: ConvexGapMonitor(gated=True, load_solution=True), ValueError, "load_solution cannot be used with gated"),
    (lambda: ConvexGapMonitor(formulation="neurons", sampled_patterns=5), ValueError,
     "sampled_patterns needs formulation='patterns'"),
    (lambda: ConvexGapMonitor(solver_options={"gated": True}), ValueError, "give gated as the monitor's own"),
    (lambda: ConvexGapMonitor(solver="native", solver_options={"warm_start": None}), ValueError,
     "give warm_start as the monitor's own"),
    (lambda: ConvexGapMonitor(asynchronous="yes"), TypeError, "asynchronous must be a bool"),
    (lambda: ConvexGapMonitor(seed=0.5), TypeError, "seed"),
    # seeds torch's generators cannot take: "Overflow when unpacking long long" in setup, naming nothing
    (lambda: ConvexGapMonitor(seed=2**80), ValueError, r"seed must lie in \[-2\*\*63, 2\*\*63\)"),
    (lambda: TensorDataModule(train=(X0, Y0), seed=2**80), ValueError, "seed must lie in"),
    (lambda: ConvexReLU(gate_seed=2**80), ValueError, "gate_seed must lie in"),
    (lambda: ConvexReLU(gate_seed=np.int64(2)), TypeError, "gate_seed must be an integer"),  # its checkpoint unloadable
    (lambda: PatternMonitor(every_n_steps=0), ValueError, "every_n_steps"),
    (lambda: StepProgressBar(refresh_rate="1"), ValueError, "refresh_rate must be an integer"),  # failed at fit start
    (lambda: StepProgressBar(refresh_rate=-1), ValueError, "refresh_rate"),  # hid the bar
    (lambda: PatternMonitor(probe=_with(X0, 3, 1, NAN)), ValueError, "NaN"),
    (lambda: PatternMonitor(probe=torch.zeros(0, 3)), ValueError, "empty"),
    (lambda: PatternMonitor(max_samples=-1), ValueError, "max_samples"),
    (lambda: TwoLayerReLU(weight_decay=-1.0), ValueError, "weight_decay"),
    (lambda: TwoLayerReLU(hidden=0), ValueError, "hidden"),
    (lambda: TwoLayerReLU(reduction="median"), ValueError, "reduction"),
    (lambda: TwoLayerReLU(in_features=3, hidden=2, hidden_weight=[[NAN, 0, 0], [0, 0, 0]]), ValueError, "NaN or inf"),
    (lambda: TwoLayerReLU(in_features=3, hidden=2, hidden_weight=[[1.0, 0.0]]), ValueError, "shape"),
    (lambda: TensorDataModule(train=(X0, Y0, Y0)), TypeError, "pair of tensors"),
    (lambda: TensorDataModule(train=(X0, Y0), batch_size=0), ValueError, "batch_size"),
]


@pytest.mark.parametrize("make,error,message", CONSTRUCTION, ids=[f"init{i}" for i in range(len(CONSTRUCTION))])
def test_bad_arguments_fail_at_construction(make, error, message):
    with pytest.raises(error, match=message) as excinfo:
        make()
    _assert_raised_by_hcl(excinfo)


# --------------------------------------------------------------------------------- errors before the first step
def _dm(X, y):
    return TensorDataModule(train=(X, y))


class TwoStacks(Net):
    def __init__(self):
        super().__init__(nn.Identity())
        self.a = two_layer().double()
        self.b = two_layer().double()

    def forward(self, x):
        return self.a(x) + self.b(x)


class Residual(Net):
    def forward(self, x):
        return self.net(x) + x[:, :1]


def _three_layer():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))


BEFORE_TRAINING = [
    # (model, data, callbacks, error, message)
    (lambda: Net(nn.Linear(3, 1)), lambda: _loader(*_data()), lambda: [ConvexGapMonitor()], ValueError,
     "no two-layer ReLU stack"),
    (lambda: Net(nn.Linear(3, 1)), lambda: _loader(*_data()), lambda: [PatternMonitor()], ValueError,
     "no two-layer ReLU stack"),
    (lambda: Net(_three_layer()), lambda: _loader(*_data()), lambda: [ConvexGapMonitor()], ValueError,
     "no two-layer ReLU stack"),
    (lambda: Net(_three_layer()), lambda: _loader(*_data()), lambda: [ConvexGapMonitor(layer="net.0")], ValueError,
     r"output \(\(8, 1\)\) is not that of its two-layer ReLU stack 'net.0' \(\(8, 4\)\)"),
    (lambda: Residual(two_layer()), lambda: _loader(*_data()), lambda: [ConvexGapMonitor()], ValueError,
     "differs from that of its two-layer ReLU stack 'net.0'"),
    (lambda: TwoStacks(), lambda: _loader(*_data()), lambda: [ConvexGapMonitor()], ValueError,
     "2 two-layer ReLU stacks"),
    (lambda: Net(two_layer()), lambda: _loader(*_data()), lambda: [ConvexGapMonitor(layer="missing")], ValueError,
     "layer='missing' is not an nn.Linear"),
    (lambda: Net(two_layer()), lambda: _loader(*_data()), lambda: [PatternMonitor(layer="net.1")], ValueError,
     "layer='net.1' is not an nn.Linear"),
    (lambda: Net(two_layer(), scale=2.0), lambda: _loader(*_data()), lambda: [ConvexGapMonitor()], ValueError,
     "scaled output"),
    (lambda: Net(two_layer()), lambda: _loader(*_data()),
     lambda: [ConvexGapMonitor(probe=torch.randn(5, 4), target=torch.randn(5, 1))], ValueError,
     "4 features per sample but the hidden layer 'net.0' expects 3"),
    (lambda: Net(two_layer()), lambda: _loader(*_data()), lambda: [PatternMonitor(probe=torch.randn(5, 2))],
     ValueError, "2 features per sample"),
    (lambda: Net(two_layer()), lambda: _loader(*_data()),
     lambda: [ConvexGapMonitor(probe=torch.randn(5, 3), target=torch.randn(5, 2))], ValueError,
     "2 columns but the model's output layer has 1"),
    (lambda: Net(two_layer(d=4)), lambda: _loader(*_data(d=3)), lambda: [ConvexGapMonitor()], ValueError,
     "3 features per sample but the hidden layer 'net.0' expects 4"),
    (lambda: Net(two_layer(d=4)), lambda: _loader(*_data(d=3)), lambda: [PatternMonitor()], ValueError,
     "3 features per sample"),
    (lambda: Net(two_layer()), lambda: _loader(_with(_data()[0], 2, 1, NAN), _data()[1]),
     lambda: [PatternMonitor()], ValueError, "contains NaN or inf"),
    (lambda: Net(two_layer()), lambda: _loader(_data()[0], _with(_data()[1], 0, 0, INF)),
     lambda: [ConvexGapMonitor()], ValueError, "targets .* contain NaN or inf"),
    (lambda: Net(two_layer()), lambda: _loader(_data()[0]), lambda: [ConvexGapMonitor()], ValueError,
     "needs targets"),
    (lambda: Net(two_layer(c=2)), lambda: _loader(*_data()), lambda: [ConvexGapMonitor()], ValueError,
     r"one float per sample \(shape \(12, 1\)\) but the model has 2 outputs"),
    (lambda: Net(two_layer(), weight_decay=-1.0, reduction="mean"), lambda: _loader(*_data()),
     lambda: [ConvexGapMonitor()], ValueError, "the model's weight_decay"),
    (lambda: Net(two_layer(), weight_decay=0.0, reduction="median"), lambda: _loader(*_data()),
     lambda: [ConvexGapMonitor()], ValueError, "the model's reduction"),
    (lambda: Net(two_layer(), weight_decay="none", reduction="mean"), lambda: _loader(*_data()),
     lambda: [ConvexGapMonitor()], TypeError, "the model's weight_decay"),
    (lambda: TwoLayerReLU(in_features=3, hidden=4), lambda: _dm(_with(_data()[0], 0, 0, NAN), _data()[1]),
     lambda: [ConvexGapMonitor()], ValueError, "training inputs contain NaN"),
    (lambda: TwoLayerReLU(in_features=3, hidden=4), lambda: _dm(_data()[0], _with(_data()[1], 0, 0, -INF)),
     lambda: [PatternMonitor()], ValueError, "training targets contain inf"),
    (lambda: TwoLayerReLU(in_features=3, hidden=4), lambda: _dm(_data()[0], _data()[1][:7]),
     lambda: [ConvexGapMonitor()], ValueError, "different numbers of points"),
    (lambda: TwoLayerReLU(in_features=3, hidden=4), lambda: _dm(_data()[0][:, 0], _data()[1]),
     lambda: [PatternMonitor()], ValueError, "must be a 2-D tensor"),
]


@pytest.mark.parametrize("make_model,make_data,make_callbacks,error,message", BEFORE_TRAINING,
                         ids=[f"setup{i}" for i in range(len(BEFORE_TRAINING))])
def test_malformed_runs_fail_before_the_first_step(tmp_path, make_model, make_data, make_callbacks, error, message):
    torch.manual_seed(0)
    counter = StepCounter()
    with pytest.raises(error, match=message) as excinfo:
        _fit(make_model(), make_data(), [*make_callbacks(), counter], tmp_path, logger=False)
    assert counter.steps == 0
    _assert_raised_by_hcl(excinfo)


# ------------------------------------------------------------------------- warnings, and training goes on
def solve_raises(problem, solver, **options):
    raise RuntimeError("solver exploded")


def solve_returns_garbage(problem, solver, **options):
    return {"value": 0.0}


def solve_returns_nan(problem, solver, *, gated=False, warm_start=None, **options):
    U, V, b0 = warm_start
    return ConvexSolution(value=NAN, U=U * NAN, V=V, b0=b0, status=Status.OPTIMAL, solver="nan", solve_seconds=0.0)


def solve_slowly(problem, solver, *, gated=False, warm_start=None, **options):
    time.sleep(0.3)
    U, V, b0 = warm_start
    return ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status=Status.OPTIMAL,
                          solver="slow", solve_seconds=0.3)


_RELEASE = threading.Event()


def solve_hangs(problem, solver, **options):
    _RELEASE.wait(30)
    raise RuntimeError("released")


class SpoilWeights(pl.Callback):
    """Sets a hidden weight to NaN at the start of step 1 (a diverged run)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            with torch.no_grad():
                pl_module.hidden_layer.weight[0, 0] = NAN


def _model(**kwargs):
    torch.manual_seed(0)
    return TwoLayerReLU(in_features=3, hidden=4, init="normal", **kwargs)


def _nan_model():
    model = _model()
    with torch.no_grad():
        model.hidden_layer.weight[1, 1] = NAN
        model.output_layer.weight[0, 0] = INF
    return model


def _dead_model():
    model = _model(bias=True)
    with torch.no_grad():
        model.hidden_layer.weight.zero_()
        model.hidden_layer.bias.fill_(-1.0)
    return model


CONTINUES = [
    # (id, model, callbacks, logger, solver patch, warning, (tag, expected values at steps 0..2 or None))
    ("nan_weights", _nan_model, lambda: [ConvexGapMonitor()], "tb", None, "non-finite network weights",
     ("convex/status", [4.0, 4.0, 4.0])),
    ("nan_weights_patterns", _nan_model, lambda: [PatternMonitor()], "tb", None, "non-finite hidden-layer weights",
     ("patterns/unique", [])),
    ("diverged_midway", _model, lambda: [SpoilWeights(), ConvexGapMonitor(solver="clarabel")], "tb", None,
     "non-finite network weights", ("convex/status", [0.0, 4.0, 4.0])),
    ("diverged_midway_patterns", _model, lambda: [SpoilWeights(), PatternMonitor()], "tb", None,
     "non-finite hidden-layer weights", ("patterns/dead", None)),
    ("all_neurons_dead", _dead_model, lambda: [ConvexGapMonitor(solver="clarabel")], "tb", None,
     "neurons are dead", ("convex/status", [3.0, 3.0, 3.0])),
    ("all_neurons_dead_patterns", _dead_model, lambda: [PatternMonitor()], "tb", None, None,
     ("patterns/dead", [4.0, 4.0, 4.0])),
    ("no_logger", _model, lambda: [ConvexGapMonitor(solver="clarabel"), PatternMonitor()], False, None,
     "no logger", None),
    ("solver_raises", _model, lambda: [ConvexGapMonitor()], "tb", solve_raises, "solver exploded",
     ("convex/status", [3.0, 3.0, 3.0])),
    ("solver_raises_async", _model, lambda: [ConvexGapMonitor(asynchronous=True, worker="thread", max_pending=9)],
     "tb", solve_raises, "solver exploded", ("convex/status", [3.0, 3.0, 3.0])),
    ("solver_returns_garbage", _model, lambda: [ConvexGapMonitor()], "tb", solve_returns_garbage,
     "not a ConvexSolution", ("convex/status", [3.0, 3.0, 3.0])),
    ("solver_returns_nan", _model, lambda: [ConvexGapMonitor()], "tb", solve_returns_nan, "solver status",
     ("convex/status", None)),
    ("solver_times_out", _model, lambda: [ConvexGapMonitor(solve_time_limit=0.05)], "tb", solve_slowly,
     "over the time limit", ("convex/status", [2.0, 2.0, 2.0])),
    ("solver_hangs_async", _model,
     lambda: [ConvexGapMonitor(asynchronous=True, worker="thread", solve_time_limit=0.05, max_pending=1)], "tb",
     solve_hangs, "abandoned", ("convex/status", None)),
    # a value only the solver itself refuses, at the solve (names and the native values are checked at construction)
    ("bad_solver_option", _model, lambda: [ConvexGapMonitor(solver="clarabel", solver_options={"max_iter": "abc"})],
     "tb", None, "convex solve failed", ("convex/status", [3.0, 3.0, 3.0])),
    ("user_module_without_lambda", lambda: Net(two_layer()), lambda: [ConvexGapMonitor(solver="clarabel")], "tb",
     None, "no `weight_decay`/`reduction` attributes", ("convex/status", [0.0, 0.0, 0.0])),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c[0] == "solver_hangs_async" else c for c in CONTINUES],
    ids=[c[0] for c in CONTINUES],
)
def test_problems_during_training_warn_and_training_goes_on(tmp_path, monkeypatch, case):
    _, make_model, make_callbacks, logger, patch, warning, expected = case
    if patch is not None:
        monkeypatch.setattr(convex_gap_module, "solve", patch)
        monkeypatch.setattr(solve_queue_module, "solve", patch)
    _RELEASE.clear()
    model = make_model()
    callbacks = make_callbacks()
    data = _loader(*_data()) if isinstance(model, Net) else _dm(*_data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = _fit(model, data, callbacks, tmp_path, logger=logger)
        finally:
            _RELEASE.set()
    messages = [str(w.message) for w in caught]
    if warning is not None:
        assert any(warning in m for m in messages), messages
    assert trainer.global_step == 3  # training went on to the end
    if logger is False:
        assert "convex/optimum" in trainer.callback_metrics and "patterns/unique" in trainer.callback_metrics
        return
    from _events import read_scalars

    s = read_scalars(tmp_path)
    assert len(s["train/objective"]) == 3
    if expected is not None:
        tag, values = expected
        logged = [v for _, v in s.get(tag, [])]
        if values is None:
            assert logged, tag
        else:
            assert logged == values, tag
