"""The callbacks in a user's own runs: targets of every shape, shuffled and augmented training, callbacks reused."""

from __future__ import annotations

import random
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _events import next_second, read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hcl.callbacks import ConvexGapMonitor, GlobalOptimumMonitor, PatternMonitor
from hcl.callbacks.data import training_data
from hcl.convex.problem import as_targets, fold_bias, fold_weights, network_objective


class Net(pl.LightningModule):
    """``nn.Sequential(Linear, ReLU, Linear)``, mean squared loss on one-hot or regression targets, plain SGD."""

    def __init__(self, d=3, c=1, m=8, lr=0.05, noise=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c)).double()
        self.lr, self.noise, self.reduction, self.weight_decay = lr, noise, "mean", 0.01

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.noise:  # input augmentation: the network trains on noisy copies of the data
            x = x + self.noise * torch.randn_like(x)
        out = self(x)
        target = as_targets(y, out.shape[1], out)
        return (out - target).square().sum(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n=30, d=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64), generator


# ------------------------------------------------------------------------------------------------------ targets
def test_targets_of_every_shape_are_taken_or_refused_by_name():
    like = torch.empty(0, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 3)
    assert torch.equal(as_targets(labels, 3, like), one_hot.double())
    assert torch.equal(as_targets(labels[:, None], 3, like), one_hot.double())
    assert torch.equal(as_targets(one_hot, 3, like), one_hot.double())  # integer one-hot rows, not labels again
    assert as_targets(torch.ones(4), 1, like).shape == (4, 1)
    with pytest.raises(ValueError, match=r"one float per sample \(shape \(4,\)\) but the model has 3 outputs"):
        as_targets(labels.double(), 3, like)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from 0 to 3"):
        as_targets(torch.tensor([0, 3]), 3, like)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from -1 to 1"):
        as_targets(torch.tensor([-1, 1]), 3, like)
    with pytest.raises(ValueError, match="the targets have 2 columns but the model's output layer has 3 outputs"):
        as_targets(torch.ones(4, 2), 3, like)
    with pytest.raises(ValueError, match=r"must be \(n,\) or \(n, c\)"):
        as_targets(torch.ones(4, 3, 1), 3, like)


@pytest.mark.parametrize("monitor", [lambda: ConvexGapMonitor(solver="clarabel"), lambda: GlobalOptimumMonitor()],
                         ids=["ConvexGapMonitor", "GlobalOptimumMonitor"])
def test_float_labels_for_several_outputs_stop_training_before_the_first_step(monitor, make_trainer):
    X, generator = _data()
    labels = torch.randint(0, 3, (30,), generator=generator).double()
    model = Net(c=3)
    before = model.net[0].weight.detach().clone()
    with pytest.raises(ValueError, match="one float per sample"):
        make_trainer([monitor()], max_steps=2, logger=False).fit(model, DataLoader(TensorDataset(X, labels),
                                                                                  batch_size=30))
    assert torch.equal(model.net[0].weight, before)


@pytest.mark.slow
def test_integer_one_hot_targets_give_the_objective_of_float_ones(make_trainer, tmp_path):
    X, generator = _data()
    labels = torch.randint(0, 3, (30,), generator=generator)
    values = []
    for name, Y in (("int", torch.nn.functional.one_hot(labels, 3)), ("float", torch.nn.functional.one_hot(labels, 3)
                                                                        .double())):
        torch.manual_seed(0)
        monitor = ConvexGapMonitor(solver="clarabel", every_n_steps=2)
        make_trainer([monitor], max_steps=3, root=tmp_path / name).fit(Net(c=3), DataLoader(TensorDataset(X, Y),
                                                                                           batch_size=30))
        scalars = read_scalars(tmp_path / name)
        assert [status for _, status in scalars["convex/status"]] == [0.0, 0.0]
        values.append(scalars["convex/nonconvex_objective"])
    assert values[0] == values[1]


# --------------------------------------------------------------------------------------------- shuffled loaders
def test_a_shuffled_loader_is_read_in_its_datasets_order_without_drawing_random_numbers():
    X, generator = _data(n=25)
    y = torch.randn(25, generator=generator, dtype=torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=7, shuffle=True, drop_last=True)
    trainer = SimpleNamespace(datamodule=None, train_dataloader=loader, world_size=1)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    X_read, y_read = training_data(trainer)
    assert torch.equal(X_read, X) and torch.equal(y_read, y)  # every sample once, in order, none dropped
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def test_the_callbacks_leave_a_shuffled_training_run_as_it_would_be_without_them(make_trainer):
    X, generator = _data(n=40)
    y = torch.randn(40, generator=generator, dtype=torch.float64)

    def trained(callbacks):
        pl.seed_everything(0, verbose=False)
        model = Net()
        loader = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True)
        make_trainer(callbacks, max_steps=8, logger=False).fit(model, loader)
        return model.net[0].weight.detach()

    assert torch.equal(trained([]), trained([PatternMonitor(every_n_steps=1000)]))


# --------------------------------------------------------------------------------------------- augmented inputs
@pytest.mark.slow
def test_patterns_are_those_of_the_data_not_of_an_augmented_batch(make_trainer, tmp_path):
    X, generator = _data(n=40)
    y = torch.randn(40, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = Net(m=30, lr=0.0, noise=3.0)  # the weights never move: no neuron changes pattern on the data
    make_trainer([PatternMonitor()], max_steps=4).fit(model, DataLoader(TensorDataset(X, y), batch_size=40))
    scalars = read_scalars(tmp_path)
    assert [value for _, value in scalars["patterns/changed"]] == [0.0] * 4
    signs = (X @ model.net[0].weight.detach().T + model.net[0].bias.detach()) >= 0
    unique = len({tuple(column.tolist()) for column in signs.T})
    assert [value for _, value in scalars["patterns/unique"]] == [float(unique)] * 4


# ------------------------------------------------------------------------------------------------ reused callbacks
@pytest.mark.slow
def test_callbacks_reused_in_a_new_trainer_start_a_new_run(make_trainer, tmp_path):
    X, generator = _data(n=30)
    y = torch.randn(30, generator=generator, dtype=torch.float64)
    callbacks = [PatternMonitor(), ConvexGapMonitor(solver="clarabel", every_n_steps=2)]
    for run in ("first", "second"):
        torch.manual_seed(0 if run == "first" else 1)
        model = Net()
        make_trainer(callbacks, max_steps=4, root=tmp_path / run).fit(model, DataLoader(TensorDataset(X, y),
                                                                                        batch_size=30))
        scalars = read_scalars(tmp_path / run)
        assert [step for step, _ in scalars["patterns/unique"]] == [0, 1, 2, 3], run
        assert [step for step, _ in scalars["convex/status"]] == [0, 2], run
        # the first snapshot of each run: every pattern new, none changed (no history of the other network)
        assert scalars["patterns/new"][0][1] == scalars["patterns/unique"][0][1]
        assert scalars["patterns/changed"][0][1] == 0



@pytest.mark.slow
def test_a_trainer_that_fits_again_after_another_continues_its_own_run(make_trainer, tmp_path):
    """Callbacks shared by two trainers in turn: the first trainer's next fit goes on with its own run's history."""
    X, generator = _data(n=30)
    loader = DataLoader(TensorDataset(X, torch.randn(30, generator=generator, dtype=torch.float64)), batch_size=30)

    def run(root, interleave):
        callbacks = [PatternMonitor(), ConvexGapMonitor(solver="clarabel", every_n_steps=2)]
        torch.manual_seed(0)
        model, trainer = Net(lr=0.5), make_trainer(callbacks, max_steps=4, root=root / "a")
        trainer.fit(model, loader)
        if interleave:
            torch.manual_seed(1)
            make_trainer(callbacks, max_steps=3, root=root / "b").fit(Net(lr=0.5), loader)
        trainer.fit_loop.epoch_loop.max_steps = 8
        trainer.fit(model, loader)
        return read_scalars(root / "a")

    alone, shared = run(tmp_path / "alone", False), run(tmp_path / "shared", True)
    assert [step for step, _ in shared["convex/status"]] == [0, 2, 4, 6]
    assert sum(value for _, value in alone["patterns/changed"]) > 0  # the run has history to lose
    for tag in ("patterns/new", "patterns/changed", "patterns/unique"):
        assert shared[tag] == alone[tag], tag

# ---------------------------------------------------------------------------------------------- half precision
def test_the_objective_of_a_half_precision_network_is_not_rounded_to_its_precision():
    X, generator = _data(n=50, d=4)
    y = torch.randn(50, generator=generator, dtype=torch.float64).bfloat16()
    W = torch.randn(6, 4, generator=generator, dtype=torch.float64).bfloat16()
    b = torch.randn(6, generator=generator, dtype=torch.float64).bfloat16()
    A = torch.randn(1, 6, generator=generator, dtype=torch.float64).bfloat16()
    Xf, Wf = fold_bias(X.bfloat16(), True), fold_weights(W, b)
    exact = float(network_objective(Xf.double(), y.double(), Wf.double(), A.double(), None, 0.01, "mean"))
    got = network_objective(Xf, y, Wf, A, None, 0.01, "mean")
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(("make", "said"), [
    (lambda: [ConvexGapMonitor(solver="clarabel", every_n_steps=1), ConvexGapMonitor(solver="clarabel",
                                                                                    every_n_steps=3)],
     r"2 ConvexGapMonitor callbacks would log under the same tags \(prefix 'convex'\).*own prefix="),
    (lambda: [PatternMonitor(every_n_steps=1), PatternMonitor(every_n_steps=2)],
     "2 PatternMonitor callbacks would log under the same tags, mixing their values: keep one"),
    (lambda: [ConvexGapMonitor(solver="clarabel"), type("Mine", (ConvexGapMonitor,), {})(solver="clarabel",
                                                                                         every_n_steps=2)],
     r"2 \w+ callbacks would log under the same tags \(prefix 'convex'\)"),  # a user's subclass beside the class
    (lambda: [type("A", (ConvexGapMonitor,), {})(solver="clarabel"), type("B", (ConvexGapMonitor,), {})(
        solver="clarabel", formulation="neurons")],
     r"2 A callbacks would log under the same tags \(prefix 'convex'\)"),  # two siblings: mixed series before
], ids=["ConvexGapMonitor", "PatternMonitor", "subclass", "siblings"])
def test_two_callbacks_writing_the_same_tags_are_refused_at_setup(make, said, make_trainer):
    X, generator = _data()
    y = torch.randn(30, generator=generator, dtype=torch.float64)
    with pytest.raises(ValueError, match=said):
        make_trainer(make(), max_steps=2, logger=False).fit(Net(), DataLoader(TensorDataset(X, y), batch_size=30))
    monitors = [ConvexGapMonitor(solver="clarabel"), ConvexGapMonitor(solver="clarabel", prefix="again",
                                                                      every_n_steps=2)]
    make_trainer(monitors, max_steps=2, logger=False).fit(Net(), DataLoader(TensorDataset(X, y), batch_size=30))


# ------------------------------------------------------------------------------------------- charts and failures
@pytest.mark.slow
def test_a_failed_fit_closes_its_chart_series(make_trainer):
    from hcl import dashboard

    class Failing(Net):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    X, generator = _data()
    y = torch.randn(30, generator=generator, dtype=torch.float64)
    trainer = make_trainer([ConvexGapMonitor(solver="clarabel")], max_steps=5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(), DataLoader(TensorDataset(X, y), batch_size=30))
    assert dashboard.series_dirs(trainer) == {}  # their writer threads were left running, one set per failed fit


@pytest.mark.parametrize(("gated", "c"), [(True, 1), (False, 3)])
@pytest.mark.slow
def test_the_gap_chart_lists_gap_only_where_it_is_logged(gated, c, make_trainer, tmp_path):
    from hcl import dashboard

    X, generator = _data()
    y = torch.randint(0, c, (30,), generator=generator) if c > 1 else torch.randn(30, generator=generator,
                                                                                  dtype=torch.float64)
    trainer = make_trainer([ConvexGapMonitor(solver="clarabel", gated=gated)], max_steps=2)
    trainer.fit(Net(c=c), DataLoader(TensorDataset(X, y), batch_size=30))
    _, listed = dashboard.layout_of(trainer)["hcl"]["convex gap"]  # (kind, tags)
    logged = set(read_scalars(tmp_path))
    assert "convex/gap" not in listed and "convex/max_gap" in listed
    assert all(tag in logged for tag in listed), (listed, logged)


@pytest.mark.slow
def test_the_global_monitors_constants_are_logged_once_across_a_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    from hcl import TwoLayerReLU
    from hcl.datamodules import SyntheticRegression

    def run(max_steps, ckpt_path=None):
        torch.manual_seed(0)
        data = SyntheticRegression(kind="points", x=[-0.7, -0.2, 0.4, 0.9], y=[0.6, 0.1, 0.5, 1.2], append_ones=True,
                                   dtype="float64")
        model = TwoLayerReLU(in_features=2, hidden=6, weight_decay=1e-3, lr=0.1, init="normal", init_scale=0.5)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        pl.Trainer(max_steps=max_steps, accelerator="cpu", precision="64-true", log_every_n_steps=1,
                   logger=TensorBoardLogger(str(tmp_path), name="run", version=0), callbacks=[
                       GlobalOptimumMonitor(every_n_steps=1), saver], enable_progress_bar=False,
                   enable_model_summary=False).fit(model, datamodule=data, ckpt_path=ckpt_path)

    run(3)
    next_second()
    run(6, ckpt_path=next((tmp_path / "ckpt").glob("*.ckpt")))
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    events.Reload()
    assert [event.step for event in events.Scalars("convex/global_patterns")] == [0]  # constants of the run
    assert [event.step for event in events.Scalars("convex/global_gap")] == list(range(6))


def test_arguments_that_would_do_nothing_are_said_and_a_time_limit_given_twice_is_refused():
    with pytest.warns(UserWarning, match="raise_worker_errors=True has no effect without asynchronous=True") as said:
        ConvexGapMonitor(raise_worker_errors=True)
    with pytest.warns(UserWarning, match="warm_start='previous' has no effect with solver='clarabel'") as also:
        ConvexGapMonitor(solver="clarabel", warm_start="previous")
    assert said[0].filename == also[0].filename == __file__  # the user's line, not hcl's
    with pytest.raises(ValueError, match="give the time limit once"):
        ConvexGapMonitor(solve_time_limit=1.0, solver_options={"time_limit": 3.0})


@pytest.mark.slow
def test_the_monitors_setup_is_a_text_tensorboard_shows(make_trainer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    X, generator = _data()
    y = torch.randn(30, generator=generator, dtype=torch.float64)
    make_trainer([ConvexGapMonitor(solver="clarabel", formulation="neurons")], max_steps=1).fit(
        Net(), DataLoader(TensorDataset(X, y), batch_size=30))
    (events,) = [path.parent for path in tmp_path.rglob("events.out.tfevents.*") if "series" not in path.parts]
    run = EventAccumulator(str(events), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    run.Reload()
    # as hyper-parameters it was a second record, which TensorBoard drops: only a run's first (Lightning's) is shown
    (text,) = run.Tensors("convex/setup/text_summary")
    assert text.tensor_proto.string_val[0].decode() == "formulation: neurons, solver: clarabel"


@pytest.mark.slow
def test_a_users_solver_claiming_optimal_for_a_point_that_is_not_finite_is_logged_failed(make_trainer, tmp_path,
                                                                                         monkeypatch):
    """Its value and bound were taken as given: status 0 and an optimum were logged, and load_solution loaded zeros."""
    import dataclasses

    import hcl.convex.solvers as solvers_module
    from hcl.convex import Solver
    from hcl.convex.solvers import get_solver

    class NaNPoint(Solver):
        name = "nan_point"

        def solve(self, problem, *, warm_start=None, **options):
            solution = get_solver("clarabel").solve(problem, **options)
            return dataclasses.replace(solution, U=torch.full_like(solution.U, float("nan")))

    monkeypatch.setitem(solvers_module._registry(), "nan_point", NaNPoint())
    X, generator = _data()
    loader = DataLoader(TensorDataset(X, torch.randn(30, generator=generator, dtype=torch.float64)), batch_size=30)
    with pytest.warns(UserWarning, match=r"solver status 'failed' at step 0 \(said once per fit\)$"):
        make_trainer([ConvexGapMonitor(solver="nan_point")], max_steps=1).fit(Net(), loader)
    scalars = read_scalars(tmp_path)
    assert scalars["convex/status"] == [(0, 3.0)] and "convex/optimum" not in scalars


def test_warn_once_says_a_kind_once_but_errors_that_differ_in_their_own_numbers_each(monkeypatch):
    import hcl.callbacks.base

    said = []
    monkeypatch.setattr(hcl.callbacks.base, "rank_zero_warn", said.append)
    monitor = PatternMonitor()
    for step, index, line in ((1, 7, 12), (2, 7, 12), (3, 9, 14)):
        monitor.warn_once(f"M: convex solve failed at step {step} after 0.{step} s: IndexError: index {index} is out "
                          f"of bounds (raised at f.py:{line} in g)")
    assert [m.split(": ", 2)[1] for m in said] == ["convex solve failed at step 1 after 0.1 s", "convex solve failed "
                                                   "at step 3 after 0.3 s"], said

