"""The callbacks under Lightning's training setups that change what a step, its weights or its loss are: mixed
precision, manual optimization, partial epochs, several loaders, a weight decay in the optimizer."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from _events import read_scalars
from test_user_models import UserNet, _data, _fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, PatternMonitor


@pytest.mark.slow
def test_mixed_precision_patterns_are_those_of_the_weights_not_of_the_rounded_forward(tmp_path, make_trainer):
    """Under bf16-mixed the hidden layer's output is rounded to bf16, which flips signs near 0: the patterns are
    counted in the weights' own precision, as the convex monitors build their problems."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 2, generator=g)
    y = torch.sin(X.sum(1))
    torch.manual_seed(0)
    model = UserNet(d=2, m=100, lr=0.5).float()
    patterns = {}

    class Weights(pl.Callback):  # the float32 patterns of the weights each step trains with
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            hidden = pl_module.net[0]
            patterns[trainer.global_step] = (X @ hidden.weight.detach().T + hidden.bias.detach() >= 0).T

    loader = DataLoader(TensorDataset(X, y), batch_size=100)  # full batch: the forward pass is the data itself
    make_trainer([Weights(), PatternMonitor()], max_steps=7, precision="bf16-mixed").fit(model, loader)
    logged = [value for _, value in read_scalars(tmp_path)["patterns/unique"]]
    assert logged == [float(len(set(map(tuple, patterns[step].tolist())))) for step in sorted(patterns)]


class DecayedByItsOptimizer(TwoLayerReLU):
    """What ``hcl.fit --optimizer=SGD --optimizer.weight_decay=0.2`` trains: λ in the optimizer, none in the loss."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.slow
def test_an_optimizers_weight_decay_is_in_the_models_objective_the_monitors_and_the_picture(
        tmp_path, make_trainer, reduction):
    """The model's train/objective, the monitors' L and the activation-point picture's L are one objective, with
    λ = wd / 2: on summed mini-batches too, where each batch's sum weighs the B batches of an epoch (the step's loss
    estimates L)."""
    from hcl.callbacks import ActivationPointPlot
    from hcl.datamodules import SyntheticRegression

    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 12, dtype=torch.float64)
    data = SyntheticRegression(kind="points", x=x.tolist(), y=torch.sin(3 * x).tolist(), dtype="float64",
                               batch_size=3 if reduction == "sum" else None)
    model = DecayedByItsOptimizer(in_features=1, hidden=8, bias=True, reduction=reduction, lr=0.1)
    if reduction == "sum":
        model.hparams.lr = 1e-300  # the weights stay put over the epoch: its four batches' estimates average to L
    monitor, picture = ConvexGapMonitor(every_n_steps=2, solver="clarabel"), ActivationPointPlot(every_n_steps=2)
    make_trainer([monitor, picture], max_steps=4 if reduction == "sum" else 6).fit(model, datamodule=data)
    assert monitor._lambda == model.optimizer_decay == picture._lambda == pytest.approx(0.1)
    s = read_scalars(tmp_path)
    logged, monitored = dict(s["train/objective"]), dict(s["convex/nonconvex_objective"])
    if reduction == "mean":  # full batch: the step's objective is the monitors' L
        assert all(monitored[step] == pytest.approx(logged[step], rel=1e-6) for step in monitored)
    else:  # 12 points in batches of 3: each step's objective weighs its batch 4 times
        assert sum(logged.values()) / 4 == pytest.approx(monitored[0], rel=1e-6)
    assert float(model.objective(x[:, None], torch.sin(3 * x)[:, None])) == pytest.approx(
        picture._last_frame.objective, rel=1e-9)


@pytest.mark.parametrize(("limit", "partial"), [
    ({"overfit_batches": 1}, True), ({"limit_train_batches": 2}, True), ({"limit_train_batches": 1}, True),
    ({"limit_train_batches": 0.5}, True), ({"limit_train_batches": 100}, False)])
@pytest.mark.slow
def test_a_trainer_that_trains_on_part_of_the_data_says_so(make_trainer, limit, partial):
    X, y = _data(n=40)
    loader = DataLoader(TensorDataset(X, y), batch_size=10)  # four batches: an int limit counts batches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([PatternMonitor()], max_steps=2, **limit).fit(UserNet(), loader)
    name, value = next(iter(limit.items()))
    said = [str(w.message) for w in caught if "the trainer trains on part of each epoch" in str(w.message)]
    assert said == ([f"the trainer trains on part of each epoch ({name}={value}) while the callbacks evaluate the "
                     "network on every training sample: pass probe=/target= to evaluate it on those trained on"]
                    if partial else []), said


@pytest.mark.parametrize("logs_step", [False, True])
@pytest.mark.slow
def test_manual_optimization_whose_global_step_is_not_the_batch_count_says_how_to_align_the_charts(make_trainer,
                                                                                                    logs_step):
    class TwoOptimizers(UserNet):  # each batch steps two optimizers: trainer.global_step moves by two
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x).reshape(y.shape), y)
            self.log("train_loss", loss)
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer in self.optimizers():
                optimizer.step()
            if logs_step:  # the advice, at the end of the step
                self.log("step", float(self.global_step))

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.SGD(self.net[2].parameters(),
                                                                                        lr=0.05)]

    X, y = _data(n=20)
    messages = _fit(make_trainer, TwoOptimizers(), DataLoader(TensorDataset(X, y), batch_size=20), [PatternMonitor()],
                    steps=4)
    assert sum("the model's self.log values are written at Lightning's batch count" in m and
               "self.log('step', float(self.global_step))" in m for m in messages) == (0 if logs_step else 1), messages


def test_several_training_loaders_are_refused_with_a_message_that_names_them(make_trainer):
    class TwoLoaders(UserNet):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["a"], batch_idx)

    X, y = _data(n=20)
    loaders = {name: DataLoader(TensorDataset(X, y), batch_size=20) for name in ("a", "b")}
    with pytest.raises(ValueError, match=r"the training data is a dict of 2 dataloaders: .*pass probe="):
        make_trainer([PatternMonitor()], max_steps=1, logger=False).fit(TwoLoaders(), loaders)


def test_a_summed_losss_decay_counts_the_steps_of_an_epoch_and_the_ranks_ddp_averages():
    from types import SimpleNamespace

    from hcl.callbacks.base import epoch_batches, resolve_objective

    user, ours = UserNet(), TwoLayerReLU(in_features=3)
    for module in (user, ours):
        module._trainer = SimpleNamespace(num_training_batches=3, world_size=2)
    # DDP averages the ranks' gradients of a user's summed loss: a penalty weighs world · batches times one step's
    assert epoch_batches(user) == 6 and epoch_batches(ours) == 1  # TwoLayerReLU's step loss estimates L
    user.weight_decay, user.reduction = 0.01, "sum"  # a penalty its summed loss adds at each of six steps
    assert resolve_objective(user, None, None, "Probe")[0] == pytest.approx(0.06)
    user._trainer = SimpleNamespace(num_training_batches=float("inf"), world_size=1)
    assert epoch_batches(user) == 1


def test_an_optimizers_decay_on_a_summed_loss_counts_the_steps_and_a_bare_model_is_taken_as_mean():
    """The optimizer's λ = wd/2 per step of a summed loss weighs B batches an epoch (B·wd/2); a model with neither
    `weight_decay` nor `reduction` is evaluated with the mean its loss most likely takes."""
    from types import SimpleNamespace

    from hcl.callbacks.base import resolve_objective
    from hcl.network import find_relu_stack

    user = UserNet(weight_decay=0.1)
    user.reduction = "sum"
    user._trainer = SimpleNamespace(num_training_batches=4, world_size=1)
    optimizers = [user.configure_optimizers()]
    stack = find_relu_stack(user)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_objective(user, None, None, "Probe", optimizers, stack) == (pytest.approx(4 * 0.1 / 2), "sum")
        bare = UserNet()
        bare._trainer = SimpleNamespace(num_training_batches=4, world_size=1)
        assert resolve_objective(bare, None, None, "Probe", [bare.configure_optimizers()],
                                 find_relu_stack(bare)) == (0.0, "mean")


def test_a_two_layer_relu_subclass_with_a_loss_of_its_own_is_told_what_the_callbacks_evaluate(make_trainer):
    """A subclass whose training_step sums its batches' losses and adds the penalty at each (no super()) was taken
    for TwoLayerReLU's weighted loss without a word: λ = 0.01 where its loss adds 4 · 0.01 over an epoch."""
    class OwnSum(TwoLayerReLU):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return (self(x) - y).square().sum() + self.penalty()

    class Logs(TwoLayerReLU):
        def training_step(self, batch, batch_idx):
            loss = TwoLayerReLU.training_step(self, batch, batch_idx)  # the base one, by name
            self.log("mine", 1.0)
            return loss

    class SkipsFirst(TwoLayerReLU):
        def training_step(self, batch, batch_idx):  # Lightning's "skip this batch": decided at the next one
            return None if self.global_step == 0 and batch_idx == 0 else super().training_step(batch, batch_idx)

    X, y = _data(n=20)
    loader = DataLoader(TensorDataset(X, y.reshape(-1, 1)), batch_size=5)
    for cls, told in ((OwnSum, 1), (Logs, 0), (TwoLayerReLU, 0), (SkipsFirst, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([], max_steps=3, logger=False).fit(cls(in_features=3, weight_decay=0.01, reduction="sum"),
                                                            loader)
        said = [w for w in caught if "does not compute TwoLayerReLU's loss" in str(w.message)]
        assert len(said) == told and (not told or "pass weight_decay=B·λ" in str(said[0].message)), cls


@pytest.mark.parametrize("n,drop_last,warned", [(101, False, True), (100, False, False), (101, True, False)])
def test_ddp_samplers_padding_is_said(n, drop_last, warned):
    """Lightning's distributed sampler pads 101 samples to 102 on two ranks by repeating one: training counted it twice
    (train/objective 222.9246 against the monitors' 222.8920 at the same weights), silently."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from hcl.callbacks.data import warn_if_ddp_changes_samples

    dataset = TensorDataset(torch.randn(n, 2))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, drop_last=drop_last)
    trainer = SimpleNamespace(train_dataloader=DataLoader(dataset, sampler=sampler, batch_size=10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_ddp_changes_samples(trainer)
    said = [str(w.message) for w in caught if "pads the" in str(w.message)]
    assert bool(said) == warned
    if warned:
        assert "pads the 101 training samples to 102 by repeating 1" in said[0]


@pytest.mark.parametrize("n,batch_size,left", [(21, 4, 3), (21, 11, 0), (20, 5, 0)])
def test_a_loaders_drop_last_under_ddp_is_said(n, batch_size, left):
    """Lightning's distributed sampler reads the set whole for the callbacks, while the loader's drop_last left out the
    end of each rank's shard from training: one process said so, two said nothing (optimum 0.4442 against 0.4542)."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from hcl.callbacks.data import warn_if_ddp_changes_samples

    dataset = TensorDataset(torch.randn(n, 2))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0)
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, drop_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_ddp_changes_samples(SimpleNamespace(train_dataloader=loader))
    said = [str(w.message) for w in caught if "drop_last" in str(w.message)]
    assert len(said) == bool(left)
    if left:
        assert f"leaves out the last {left} of each rank's 11 samples every epoch ({2 * left} of the {n}" in said[0]


def test_a_full_batch_of_each_ranks_shard_is_no_padding():
    """An hcl data module's full batch is a dataset of one item per rank (its own shard), which Lightning's sampler
    "pads" to one per rank: no sample repeats, and nothing is said (every full-batch DDP run warned)."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from hcl.callbacks.data import warn_if_ddp_changes_samples
    from hcl.datamodules.base import _FullBatch

    dataset = _FullBatch(torch.randn(6, 2), torch.randn(6, 1))
    loader = DataLoader(dataset, batch_size=None, sampler=DistributedSampler(dataset, num_replicas=2, rank=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_ddp_changes_samples(SimpleNamespace(train_dataloader=loader))
    assert not [w for w in caught if "pads the" in str(w.message)]


def test_an_unknown_number_of_batches_for_a_summed_loss_is_said():
    """An iterable loader's epoch has no known number of batches: λ was silently not scaled by it."""
    from types import SimpleNamespace

    from hcl.callbacks.base import resolve_objective

    user = UserNet()
    user.weight_decay, user.reduction = 0.01, "sum"
    user._trainer = SimpleNamespace(num_training_batches=float("inf"), world_size=1)
    with pytest.warns(UserWarning, match="not scaled by the batches of an epoch.*weight_decay=B·λ"):
        assert resolve_objective(user, None, None, "Probe")[0] == pytest.approx(0.01)


def test_a_subclass_whose_on_train_start_skips_super_still_counts_its_optimizers_decay(make_trainer):
    """Lightning's on_train_start is a no-op, so a subclass need not call super(): train/objective then left out the
    optimizer's decay that the monitors' L counts (0.87137 against 0.90632)."""
    from hcl.callbacks import ConvexGapMonitor

    class Quiet(TwoLayerReLU):
        def on_train_start(self):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=0.02)

    X, y = _data(n=20)
    model = Quiet(in_features=3, hidden=4, weight_decay=0.01)
    monitor = ConvexGapMonitor(solver="clarabel")
    trainer = make_trainer([monitor], max_steps=1, logger=False)
    trainer.fit(model, DataLoader(TensorDataset(X, y.reshape(-1, 1)), batch_size=20))
    assert model.optimizer_decay == pytest.approx(0.01)  # wd / 2
    assert float(trainer.callback_metrics["train/objective"]) == pytest.approx(
        float(trainer.callback_metrics["convex/nonconvex_objective"]), rel=1e-6)


def test_another_fit_of_the_trainer_on_another_network_starts_the_pattern_history_again(make_trainer, monkeypatch):
    """A narrower network in the same trainer's next fit stopped mid-step with the tracker's internal "call reset()";
    other data of the same shape was compared with the last fit's patterns."""
    import hcl.callbacks.pattern_monitor as pattern_monitor_module
    from hcl.callbacks import PatternMonitor

    said = []
    monkeypatch.setattr(pattern_monitor_module, "rank_zero_info", said.append)

    X, y = _data(n=20)
    loader = DataLoader(TensorDataset(X, y.reshape(-1, 1)), batch_size=20)
    monitor = PatternMonitor()
    trainer = make_trainer([monitor], max_steps=2, logger=False)
    trainer.fit(TwoLayerReLU(in_features=3, hidden=8), loader)
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(TwoLayerReLU(in_features=3, hidden=4), loader)
    assert any("the pattern history starts again" in message for message in said)
    assert float(trainer.callback_metrics["patterns/unique"]) <= 4 and monitor._tracker.num_seen <= 3 * 4
