"""hcl's callbacks beside Lightning's features that change the model or read the logged values: torch.compile,
ModelPruning, ModelCheckpoint and EarlyStopping monitoring hcl's tags."""

from __future__ import annotations

import dataclasses
import warnings

import lightning.pytorch as pl
import pytest
import torch
from _events import read_scalars
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning

import hcl.callbacks.convex_gap as convex_gap_module
from hcl import TwoLayerReLU
from hcl.callbacks import ActivationPointPlot, ConvexGapMonitor, PatternMonitor
from hcl.convex import Status
from hcl.convex.problem import fold_bias, fold_weights, network_objective
from hcl.datamodules import SyntheticRegression


def _data(d: int = 2) -> SyntheticRegression:
    return SyntheticRegression(n=30, d=d, seed=0, noise=0.1, dtype="float64")


def _model(d: int = 2, **kwargs) -> TwoLayerReLU:
    torch.manual_seed(0)
    return TwoLayerReLU(in_features=d, hidden=6, bias=True, weight_decay=1e-2, **kwargs).double()


def _trainer(tmp_path, callbacks, steps: int = 4, **kwargs) -> pl.Trainer:
    arguments = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, callbacks=callbacks)
    return pl.Trainer(**{**arguments, **kwargs})


@pytest.mark.slow  # compiling takes seconds
def test_pattern_counts_of_a_compiled_model_are_the_eager_ones(tmp_path):
    # dynamo traced the monitor's forward hook into its NumPy packing and failed: "data type 'void' not understood"
    counts = {}
    for compiled in (False, True):
        model = _model()
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name=f"compiled{compiled}", version=0)
        _trainer(tmp_path, [PatternMonitor()], logger=logger, log_every_n_steps=1).fit(
            torch.compile(model, backend="eager") if compiled else model, datamodule=_data())
        counts[compiled] = read_scalars(logger.log_dir)["patterns/unique"]
    assert counts[True] == counts[False] and len(counts[True]) == 4


def test_the_last_picture_of_a_pruned_network_is_of_its_final_weights(tmp_path):
    """ModelPruning's weight is recomputed by its forward pre-hook: drawn after the last update without a forward, the
    final frame showed the weights of the step before (objective 0.6142 against 0.6103)."""
    data = _data(d=1)
    data.setup("fit")
    X, Y = data.train_tensors()
    model = _model(d=1)
    pruning = ModelPruning("l1_unstructured", parameters_to_prune=[(model.hidden_layer, "weight")], amount=0.3,
                           apply_pruning=lambda epoch: epoch == 0, make_pruning_permanent=False, verbose=0)
    plot = ActivationPointPlot()
    _trainer(tmp_path, [plot, pruning]).fit(model, datamodule=data)
    hidden = model.hidden_layer
    weight = (hidden.weight_orig * hidden.weight_mask).detach()
    expected = network_objective(fold_bias(X, True), Y.reshape(-1, 1), fold_weights(weight, hidden.bias.detach()),
                                 model.output_layer.weight.detach(), None, 1e-2, "mean")
    assert plot._last_frame.step == 4
    assert plot._last_frame.objective == pytest.approx(float(expected), rel=1e-12)


def test_a_checkpoint_is_scored_only_by_its_own_steps_certified_gap(tmp_path, monkeypatch):
    """A tag a step's solve does not prove stayed in callback_metrics from an earlier step: ModelCheckpoint scored the
    uncertified steps by it (files 1-0.686139, 2-0.686139 beside 0-0.686139)."""
    real, calls = convex_gap_module.solve, []

    def every_other(problem, solver, **options):  # certified at steps 0, 2, 4; stopped early at 1 and 3
        calls.append(solver)
        solution = real(problem, solver, **options)
        return solution if len(calls) % 2 else dataclasses.replace(solution, status="max_iterations")

    monkeypatch.setattr(convex_gap_module, "solve", every_other)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="convex/gap", mode="min", save_top_k=-1,
                                 every_n_train_steps=1, filename="{step}")
    trainer = _trainer(tmp_path, [ConvexGapMonitor(solver="clarabel"), checkpoint], steps=4,
                       enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncertified steps' status warnings
        trainer.fit(_model(), datamodule=_data())
    # saved at steps 0 and 2 only: never scored by an earlier step's gap
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=0.ckpt", "step=2.ckpt"]
    assert "convex/gap" not in trainer.callback_metrics  # the last solve (step 3) proved none
    assert trainer.callback_metrics["convex/status"].dtype == torch.float64  # as the loggers have it


@pytest.mark.parametrize("asynchronous", [False, True])
def test_no_tag_of_an_earlier_step_stays_in_the_metrics_a_later_solve_proves_nothing_of(tmp_path, monkeypatch,
                                                                                        asynchronous):
    """A solve that proves no bound left step 0's convex/max_gap (and, in the background, its optimum, lower_bound and
    duality_gap) in callback_metrics, where ModelCheckpoint and EarlyStopping read them as the last step's."""
    import hcl.callbacks.solve_queue as solve_queue_module

    real, calls = convex_gap_module.solve, []

    def first_only(problem, solver, **options):  # step 0 certified; later steps stopped early without a dual value
        calls.append(solver)
        solution = real(problem, solver, **options)
        return solution if len(calls) == 1 else dataclasses.replace(solution, status="max_iterations", dual_value=None)

    monkeypatch.setattr(convex_gap_module, "solve", first_only)
    monkeypatch.setattr(solve_queue_module, "solve", first_only)
    monitor = ConvexGapMonitor(solver="clarabel", asynchronous=asynchronous, worker="thread")
    trainer = _trainer(tmp_path, [monitor], steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncertified steps' status warnings
        trainer.fit(_model(), datamodule=_data())
    assert len(calls) >= 2  # in the background a snapshot may be skipped while one is solved
    # (the last solve's point is feasible: its upper bound is its own)
    proved = ("optimum", "gap", "lower_bound", "max_gap", "duality_gap")
    stale = [tag for tag in proved if f"convex/{tag}" in trainer.callback_metrics]
    assert not stale, stale
    assert float(trainer.callback_metrics["convex/status"]) == Status.MAX_ITERATIONS.code


@pytest.mark.parametrize("asynchronous,callback,warned", [
    (True, ModelCheckpoint(monitor="convex/max_gap"), "arrive steps after their snapshot"),
    (True, EarlyStopping(monitor="convex/nonconvex_objective"), "arrive steps after their snapshot"),
    (False, EarlyStopping(monitor="convex/gap"), "pass strict=False"),
    (False, EarlyStopping(monitor="convex/gap", strict=False), None),
    (False, EarlyStopping(monitor="convex/nonconvex_objective"), None),  # logged at every solve
    (False, ModelCheckpoint(monitor="convex/gap"), None),  # an uncertified step is not saved
])
def test_callbacks_that_cannot_read_a_steps_own_value_are_said(asynchronous, callback, warned):
    """Monitoring an asynchronous tag left every checkpoint unsaved, or scored by an older step's value, silently;
    EarlyStopping on the first one raised Lightning's generic "metric not available"."""
    from types import SimpleNamespace

    from hcl.callbacks.monitor_options import warn_about_monitored_tags

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_about_monitored_tags(SimpleNamespace(callbacks=[callback]), "ConvexGapMonitor", "convex", asynchronous)
    said = [str(w.message) for w in caught]
    assert (warned is None) == (not said), said
    if warned:
        assert warned in said[0]


def test_an_asynchronous_monitor_says_so_when_training_starts(tmp_path):
    monitor = ConvexGapMonitor(solver="clarabel", asynchronous=True, worker="thread")
    trainer = _trainer(tmp_path, [monitor, ModelCheckpoint(monitor="convex/max_gap")], steps=1,
                       enable_checkpointing=True)
    with pytest.warns(UserWarning, match="arrive steps after their snapshot"):
        trainer.fit(_model(), datamodule=_data())


def test_the_global_monitors_tags_under_the_same_prefix_are_not_the_asynchronous_ones():
    from types import SimpleNamespace

    from hcl.callbacks.monitor_options import warn_about_monitored_tags

    trainer = SimpleNamespace(callbacks=[ModelCheckpoint(monitor="convex/global_gap")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_about_monitored_tags(trainer, "ConvexGapMonitor", "convex", asynchronous=True)
    assert not caught



class _Stream(torch.utils.data.IterableDataset):
    """Batches of 10 rows of a fixed set of 40, once (``endless=False``) or for ever."""

    def __init__(self, endless: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(40, 3, generator=g, dtype=torch.float64)
        self.y = torch.sin(self.X.sum(1, keepdim=True))
        self.endless = endless

    def __iter__(self):
        while True:
            for lo in range(0, 40, 10):
                yield self.X[lo:lo + 10], self.y[lo:lo + 10]
            if not self.endless:
                return


def test_an_endless_loader_is_refused_before_it_fills_the_memory(monkeypatch):
    """One pass over an endless iterable loader never ended: no step was taken while the memory grew by 70 MB/s."""
    from types import SimpleNamespace

    import hcl.callbacks.data as data_module

    monkeypatch.setattr(data_module, "free_memory", lambda device: 2**20)  # a pass may take 0.5 MiB
    trainer = SimpleNamespace(datamodule=None, world_size=1, reload_dataloaders_every_n_epochs=0,
                              train_dataloader=torch.utils.data.DataLoader(_Stream(endless=True), batch_size=None))
    with pytest.raises(ValueError, match="which has no length, read .* without ending"):
        data_module.training_data(trainer)
    trainer.train_dataloader = torch.utils.data.DataLoader(_Stream(endless=False), batch_size=None)
    assert data_module.training_data(trainer)[0].shape == (40, 3)  # a finite one is read whole


def test_data_that_training_reloads_or_cannot_count_is_said(tmp_path):
    """A loader reloaded every epoch may hold other data than the callbacks read at the start; a summed loss over an
    iterable loader's batches was one batch's sum (7.23 against L = 35.57), silently."""
    stream = torch.utils.data.DataLoader(_Stream(endless=False), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [PatternMonitor()], steps=2, reload_dataloaders_every_n_epochs=1).fit(
            TwoLayerReLU(in_features=3, hidden=4, reduction="sum").double(), stream)
    said = [str(w.message) for w in caught]
    assert any("reloads the training dataloader every 1 epoch(s)" in m for m in said), said
    assert any("TwoLayerReLU(reduction='sum'): the training loader does not tell its batches" in m for m in said)
