"""The callbacks check a user's model when training starts and at every step they act at: a layer before the hidden
one, or a forward that stops computing the stack's function, is refused or ends the callback's logs, never silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from _events import read_scalars
from test_user_models import Between, UserNet, _data, _fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hcl.callbacks import ConvexGapMonitor, PatternMonitor


class Before(Between):
    """A user's layer before the hidden layer: ``net = Sequential(middle, Linear, ReLU, Linear)``."""

    def __init__(self, middle: nn.Module):
        super().__init__(nn.Identity())
        self.net = nn.Sequential(middle, nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.mark.parametrize("kind", ["patterns", "gap"])
@pytest.mark.slow
def test_a_normalisation_before_the_hidden_layer_is_refused(kind, make_trainer):
    # a fresh BatchNorm1d is the identity in eval mode: the callbacks logged L 1.22 where the network's was 0.67
    X, y = _data(n=64)
    X = X * torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64) + 4.0
    loader = DataLoader(TensorDataset(X, y), batch_size=64)
    stack = {"layer": "net.1", "output_layer": "net.3"}
    callback = (PatternMonitor(**stack) if kind == "patterns"
                else ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel", **stack))
    with pytest.raises(ValueError, match=r"'net.0' \(BatchNorm1d\) runs before the hidden layer 'net.1'"):
        _fit(make_trainer, Before(nn.BatchNorm1d(3, affine=False).double()), loader, [callback])
    _fit(make_trainer, Before(nn.Flatten()), loader, [callback])  # no weights, no statistics: let through


class GrowingSide(UserNet):
    """A linear side term beside the stack, zero when training starts: the stack's function only at step 0."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(3, 1, bias=False).double()
        nn.init.zeros_(self.side.weight)

    def forward(self, x):
        return self.net(x) + self.side(x)


@pytest.mark.slow
def test_a_forward_that_stops_computing_the_stack_ends_the_callbacks_logs_with_a_warning(make_trainer, tmp_path):
    # the check at the start of training passed, and the values of every later step were the stack's alone
    X, y = _data(n=40)
    loader = DataLoader(TensorDataset(X, y), batch_size=40)
    callbacks = [ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel"), PatternMonitor()]
    said = _fit(make_trainer, GrowingSide(), loader, callbacks, steps=4)
    assert sum("at step 1, the model's output differs from that of its two-layer ReLU stack" in message
               and "logs nothing more in this run" in message for message in said) == 2
    logged = read_scalars(tmp_path)
    assert [step for step, _ in logged["convex/nonconvex_objective"]] == [0]
    assert [step for step, _ in logged["patterns/unique"]] == [0]


@pytest.mark.slow
def test_a_run_resumed_after_its_callback_stopped_goes_on_and_says_so_again(make_trainer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    X, y = _data(n=40)
    loader = DataLoader(TensorDataset(X, y), batch_size=40)
    def trainer(steps):
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        return make_trainer([PatternMonitor(), saver], max_steps=steps, enable_checkpointing=True)

    torch.manual_seed(0)
    trainer(3).fit(GrowingSide(), loader)
    with warnings.catch_warnings(record=True) as caught:  # the resumed fit was refused at its start
        warnings.simplefilter("always")
        trainer(5).fit(GrowingSide(), loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert any("PatternMonitor: at step 3, the model's output differs" in str(w.message) for w in caught)


@pytest.mark.slow
def test_an_activation_plot_draws_no_frame_after_it_stopped(make_trainer):
    # the final weights were drawn at the end of training, after the warning that nothing more would be
    from hcl.callbacks import ActivationPointPlot

    class OneInput(GrowingSide):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 1)).double()
            self.side = nn.Linear(1, 1, bias=False).double()
            nn.init.zeros_(self.side.weight)

    X, y = _data(n=40)
    plot = ActivationPointPlot(every_n_steps=2, gif=True, figsize=(3, 2), dpi=30)
    said = _fit(make_trainer, OneInput(), DataLoader(TensorDataset(X[:, :1], y), batch_size=40), [plot], steps=5)
    assert any("ActivationPointPlot: at step 2" in message for message in said)
    assert [frame.step for frame in plot.frames] == [0]


@pytest.mark.slow
def test_dropout_is_said_once_though_the_forward_is_checked_at_every_step(make_trainer):
    X, y = _data(n=64)
    loader = DataLoader(TensorDataset(X, y), batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([PatternMonitor(every_n_steps=1)], max_steps=5).fit(Between(nn.Dropout(0.2)), loader)
    assert sum("between the layers" in str(w.message) for w in caught) == 1


class Pruned(UserNet):
    """A hidden layer whose weight a forward pre-hook computes (torch.nn.utils.prune): the attribute is the last
    forward's until the next one."""

    def __init__(self):
        super().__init__(d=3, m=8)
        torch.nn.utils.prune.l1_unstructured(self.net[0], "weight", amount=0.25)


@pytest.mark.slow
def test_a_weight_computed_by_a_pre_hook_is_compared_at_its_current_value(make_trainer, tmp_path):
    # the check compared the output with the previous step's weight and stopped the callbacks at step 1
    X, y = _data(n=64)
    said = _fit(make_trainer, Pruned(), DataLoader(TensorDataset(X, y), batch_size=64),
                [PatternMonitor(), ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel")], steps=4)
    assert not [message for message in said if "logs nothing more" in message]
    logged = read_scalars(tmp_path)
    assert [step for step, _ in logged["convex/nonconvex_objective"]] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_frozen_layer_before_the_hidden_one_is_left_to_the_comparison_of_outputs(make_trainer):
    X, y = _data(n=64)
    loader = DataLoader(TensorDataset(X, y), batch_size=64)
    stack = {"layer": "net.1", "output_layer": "net.3"}
    frozen = nn.Linear(3, 3, bias=False).double().requires_grad_(False)
    nn.init.eye_(frozen.weight)  # the identity: the model is its stack
    _fit(make_trainer, Before(frozen), loader, [PatternMonitor(**stack)])
    scaled = nn.Linear(3, 3, bias=False).double().requires_grad_(False)
    nn.init.eye_(scaled.weight)
    scaled.weight.mul_(2.0)  # not the identity: another network
    with pytest.raises(ValueError, match="the model's output differs"):
        _fit(make_trainer, Before(scaled), loader, [PatternMonitor(**stack)])


class Images(UserNet):
    """Images ``(n, 1, 2, 2)`` that the forward transforms, then flattens, before the stack."""

    def __init__(self, transform):
        super().__init__(d=4)
        self.transform = transform

    def forward(self, x):
        return self.net(self.transform(x).flatten(1))


@pytest.mark.slow
def test_a_forward_is_checked_on_the_samples_as_the_data_holds_them(make_trainer):
    """A forward that transforms images (a transpose, a per-channel normalisation) raised on the flattened samples
    the check gave it, and the model was let through: the callbacks logged the numbers of another network."""
    X = torch.randn(32, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(X, X.flatten(1).sum(1)), batch_size=32)
    with pytest.raises(ValueError, match="the model's output differs from that of its two-layer ReLU stack"):
        _fit(make_trainer, Images(lambda x: x.transpose(-1, -2)), loader, [PatternMonitor()])
    assert not [m for m in _fit(make_trainer, Images(nn.Identity()), loader, [PatternMonitor()]) if "forward" in m]

    class Keyed(UserNet):  # a forward of the user's own convention: nothing the callbacks can run it on
        def forward(self, x):
            return self.net(x["x"]) if isinstance(x, dict) else self.net(x[:, :0])

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sub(batch[1][:, None]).square().mean()

    messages = _fit(make_trainer, Keyed(), DataLoader(TensorDataset(*_data()), batch_size=40), [PatternMonitor()])
    assert any("the model's forward does not take the callbacks' samples" in m for m in messages), messages
