"""The callbacks on a user's own Lightning module: which loss, which λ, which data, said or refused, never silent."""

from __future__ import annotations

import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch
from _events import read_scalars
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import hcl.callbacks.data as data_module
import hcl.callbacks.objective as objective_module
from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, GlobalOptimumMonitor, PatternMonitor
from hcl.callbacks.base import optimizer_lambda
from hcl.network import find_relu_stack, non_squared_loss


class UserNet(pl.LightningModule):
    """A user's module: ``nn.Sequential(Linear, ReLU, Linear)``, an optimizer of the user's choice, mean MSE."""

    def __init__(self, d=3, m=6, c=1, optimizer=torch.optim.SGD, criterion=None, **optimizer_args):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c)).double()
        self.optimizer, self.optimizer_args = optimizer, {"lr": 0.05, **optimizer_args}
        if criterion is not None:
            self.criterion = criterion

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).reshape(y.shape), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), **self.optimizer_args)


def _data(n=40, d=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return X, X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3


def _fit(make_trainer, model, loader, callbacks, steps=2):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks, max_steps=steps).fit(model, loader)
    return [str(w.message) for w in caught]


# --------------------------------------------------------------------------------------------------- which loss
@pytest.mark.parametrize(("make_model", "said"), [
    (lambda: UserNet(c=3, criterion=nn.CrossEntropyLoss()), "cross-entropy loss (its `criterion` is nn."),
    (lambda: UserNet(criterion=nn.BCEWithLogitsLoss()), "logistic (binary cross-entropy) loss"),
    (lambda: UserNet(c=3, criterion=nn.NLLLoss()), "cross-entropy (NLL) loss"),
    (lambda: UserNet(c=3, criterion=nn.functional.cross_entropy), "(its `criterion` is F.cross_entropy)"),
    (lambda: UserNet(c=3, criterion=functools.partial(nn.functional.cross_entropy, reduction="sum")),
     "(its `criterion` is F.cross_entropy)"),
    (lambda: UserNet(criterion=nn.L1Loss()), "an absolute (L1) loss"),
    (lambda: TwoLayerReLU(in_features=3, hidden=6, out_features=3, loss="cross_entropy").double(),
     "(its hyperparameter `loss` is 'cross_entropy')"),
], ids=["CrossEntropyLoss", "BCEWithLogitsLoss", "NLLLoss", "F.cross_entropy", "partial", "L1Loss",
        "TwoLayerReLU-cross-entropy"])
@pytest.mark.parametrize("monitor", [lambda: ConvexGapMonitor(solver="clarabel"), lambda: GlobalOptimumMonitor()],
                         ids=["ConvexGapMonitor", "GlobalOptimumMonitor"])
def test_a_model_trained_with_another_loss_is_refused_at_setup(make_model, said, monitor, make_trainer):
    X, _ = _data(n=12)
    labels = torch.arange(12) % 3
    loader = DataLoader(TensorDataset(X, labels), batch_size=12)
    with pytest.raises(ValueError, match="the convex problem is that of the squared loss") as refused:
        make_trainer([monitor()], max_steps=1, logger=False).fit(make_model(), loader)
    assert said in str(refused.value)


def test_the_squared_loss_is_accepted_and_the_pattern_monitor_takes_any_loss(make_trainer):
    assert non_squared_loss(UserNet(criterion=nn.MSELoss())) is None
    assert non_squared_loss(TwoLayerReLU(in_features=3, out_features=3, loss="squared")) is None
    assert non_squared_loss(UserNet(criterion="mse")) is None
    X, _ = _data(n=12)
    loader = DataLoader(TensorDataset(X, torch.arange(12) % 3), batch_size=12)
    model = TwoLayerReLU(in_features=3, hidden=6, out_features=3, loss="cross_entropy").double()
    make_trainer([PatternMonitor()], max_steps=2, logger=False).fit(model, loader)


# ------------------------------------------------------------------------------------------------------ which λ
def _stack_squares(model):
    net = model.net
    return float(net[0].weight.square().sum() + net[0].bias.square().sum() + net[2].weight.square().sum())


@pytest.mark.slow
def test_lambda_is_read_from_coupled_weight_decay_in_the_optimizer(make_trainer, tmp_path, monkeypatch):
    """SGD with weight_decay = wd on a mean MSE minimises mean MSE + (wd/2)‖θ‖²: the monitor uses λ = wd/2."""
    said = []
    monkeypatch.setattr(objective_module, "rank_zero_info", said.append)
    X, y = _data()
    model = UserNet(weight_decay=0.2)
    initial = UserNet(weight_decay=0.2)
    initial.load_state_dict(model.state_dict())
    monitor = ConvexGapMonitor(solver="clarabel", reduction="mean")
    messages = _fit(make_trainer, model, DataLoader(TensorDataset(X, y), batch_size=40), [monitor], steps=1)
    assert monitor._lambda == pytest.approx(0.1)
    assert any("λ = 0.1, from SGD's weight_decay=0.2 (coupled L2" in m for m in said), said
    assert not any("λ = 0" in m for m in messages), messages
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(initial(X).reshape(y.shape), y)) + 0.1 * _stack_squares(initial)
    logged = read_scalars(tmp_path)["convex/nonconvex_objective"][0][1]
    assert logged == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32


@pytest.mark.parametrize(("optimizer", "args"), [(torch.optim.AdamW, {"weight_decay": 1e-3}),
                                                 (torch.optim.Adam, {"weight_decay": 1e-3,
                                                                     "decoupled_weight_decay": True})],
                         ids=["AdamW", "Adam-decoupled"])
@pytest.mark.slow
def test_decoupled_weight_decay_is_said_precisely(optimizer, args, make_trainer):
    X, y = _data()
    monitor = ConvexGapMonitor(solver="clarabel", reduction="mean")
    messages = _fit(make_trainer, UserNet(optimizer=optimizer, **args), DataLoader(TensorDataset(X, y), batch_size=8),
                    [monitor], steps=1)
    assert monitor._lambda == 0.0
    decoupled = [m for m in messages if "decoupled weight_decay=0.001" in m]
    assert decoupled and "using λ = 0" in decoupled[0] and "no λ of the objective matches" in decoupled[0], messages


@pytest.mark.slow
def test_a_lambda_given_to_the_callback_is_never_reported_as_zero(make_trainer):
    X, y = _data()
    monitor = ConvexGapMonitor(solver="clarabel", weight_decay=1e-3)
    messages = _fit(make_trainer, UserNet(), DataLoader(TensorDataset(X, y), batch_size=40), [monitor], steps=1)
    assert monitor._lambda == 1e-3 and monitor._reduction == "mean"
    objective = [m for m in messages if "reduction 'mean'" in m]
    assert objective and "the model has no `reduction` attribute" in objective[0], messages
    assert not any("λ = 0" in m for m in messages), messages


@pytest.mark.slow
def test_two_layer_relu_adds_its_optimizers_weight_decay_to_its_own(make_trainer):
    class Decayed(TwoLayerReLU):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=0.02)

    X, y = _data()
    model = Decayed(in_features=3, hidden=6, weight_decay=0.01).double()
    monitor = ConvexGapMonitor(solver="clarabel")
    _fit(make_trainer, model, DataLoader(TensorDataset(X, y), batch_size=40), [monitor], steps=1)
    assert monitor._lambda == pytest.approx(0.02)


@pytest.mark.slow
def test_two_layer_relu_under_adamw_keeps_its_own_lambda_and_says_the_decay_is_left_out(make_trainer):
    class Decoupled(TwoLayerReLU):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=1e-3)

    X, y = _data()
    monitor = ConvexGapMonitor(solver="clarabel")
    messages = _fit(make_trainer, Decoupled(in_features=3, hidden=6, weight_decay=0.01).double(),
                    DataLoader(TensorDataset(X, y), batch_size=40), [monitor], steps=1)
    assert monitor._lambda == pytest.approx(0.01)
    assert any("AdamW's decoupled weight_decay=0.001" in m and "use the model's λ = 0.01 and leave that decay out"
               in m for m in messages), messages


@pytest.mark.slow
def test_a_user_models_weight_decay_beside_the_optimizers_is_said_with_both_choices(make_trainer):
    X, y = _data()
    model = UserNet(weight_decay=0.2)
    model.weight_decay = 0.2  # e.g. the hyperparameter the user also gave the optimizer
    monitor = ConvexGapMonitor(solver="clarabel", reduction="mean")
    messages = _fit(make_trainer, model, DataLoader(TensorDataset(X, y), batch_size=40), [monitor], steps=1)
    assert monitor._lambda == pytest.approx(0.2)
    assert any("pass weight_decay= to the callback, 0.1 if the model's `weight_decay` is the optimizer's, 0.3 if"
               in m for m in messages), messages


@pytest.mark.slow
def test_a_user_models_weight_decay_beside_adamws_says_how_to_leave_it_out(make_trainer):
    X, y = _data()
    model = UserNet(optimizer=torch.optim.AdamW, weight_decay=0.02)
    model.weight_decay = 0.02  # the optimizer's decay, kept where hcl reads the loss's λ
    messages = _fit(make_trainer, model, DataLoader(TensorDataset(X, y), batch_size=40),
                    [ConvexGapMonitor(solver="clarabel", reduction="mean")], steps=1)
    assert any("leave that decay out (pass weight_decay=0 to the callback if the model's `weight_decay` is that decay"
               in m for m in messages), messages


@pytest.mark.slow
def test_a_mean_mse_over_several_outputs_is_said_beside_a_mean_reduction_attribute(make_trainer):
    # the attribute says "mean", and the values were silently 3× the loss nn.MSELoss() computes
    X, y = _data()
    model = UserNet(c=3, criterion=nn.MSELoss())
    model.reduction = "mean"
    monitor = ConvexGapMonitor(solver="clarabel", weight_decay=1e-3)
    messages = _fit(make_trainer, model, DataLoader(TensorDataset(X, y[:, None].repeat(1, 3)), batch_size=40),
                    [monitor], steps=1)
    assert any("nn.MSELoss() also divides by its 3 outputs" in m for m in messages), messages


def test_optimizer_lambda_for_each_kind_of_decay():
    model = UserNet()
    stack = find_relu_stack(model)
    params = list(model.parameters())
    assert optimizer_lambda([torch.optim.SGD(params, lr=0.1)], stack) == (0.0, "")
    for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam):
        lam, text = optimizer_lambda([optimizer(params, lr=0.1, weight_decay=0.3)], stack)
        assert lam == pytest.approx(0.15) and f"{optimizer.__name__}'s weight_decay=0.3" in text
    lam, text = optimizer_lambda([torch.optim.AdamW(params, lr=0.1, weight_decay=0.3)], stack)
    assert lam is None and "decoupled" in text
    hidden, output = list(model.net[0].parameters()), list(model.net[2].parameters())
    groups = [{"params": hidden, "weight_decay": 0.1}, {"params": output, "weight_decay": 0.0}]
    lam, text = optimizer_lambda([torch.optim.SGD(groups, lr=0.1)], stack)
    assert lam is None and "differently" in text
    # The output bias is not penalised in the objective: its decay does not count.
    groups = [{"params": [*hidden, model.net[2].weight], "weight_decay": 0.1}, {"params": [model.net[2].bias]}]
    assert optimizer_lambda([torch.optim.SGD(groups, lr=0.1)], stack)[0] == pytest.approx(0.05)

    class Lion(torch.optim.SGD):
        pass

    lam, text = optimizer_lambda([Lion(params, lr=0.1, weight_decay=0.3)], stack)
    assert lam is None and "Lion" in text


@pytest.mark.slow
def test_the_cli_optimizer_weight_decay_reaches_lambda(tmp_path, monkeypatch):
    from hcl.fit import main

    said = []
    monkeypatch.setattr(objective_module, "rank_zero_info", said.append)
    cli = main(["--optimizer=SGD", "--optimizer.lr=0.05", "--optimizer.weight_decay=0.004", "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, ConvexGapMonitor))
    assert monitor._lambda == pytest.approx(0.002)  # the model's λ = 0 plus the optimizer's 0.004 / 2
    assert any("plus SGD's weight_decay=0.004" in m for m in said), said


# --------------------------------------------------------------------------------------------------- which data
@pytest.mark.slow
def test_the_data_is_said_once_and_a_loader_that_drops_samples_warns(make_trainer, monkeypatch):
    said = []
    monkeypatch.setattr(data_module, "rank_zero_info", said.append)
    X, y = _data(n=40)
    loader = DataLoader(TensorDataset(X, y), batch_size=16, drop_last=True)
    callbacks = [PatternMonitor(), ConvexGapMonitor(solver="clarabel", reduction="mean")]
    messages = _fit(make_trainer, UserNet(), loader, callbacks, steps=1)
    assert said == ["hcl: the callbacks evaluate the network on n = 32 samples: one pass over the training "
                    "dataloader (each batch's first item as the inputs, its second as the targets)"]
    # said once for the trainer, not once per callback
    assert sum("yields 32 of its dataset's 40 samples (drop_last=True" in m for m in messages) == 1, messages


@pytest.mark.slow
def test_a_sampler_covering_part_of_the_dataset_warns(make_trainer):
    X, y = _data(n=40)
    loader = DataLoader(TensorDataset(X, y), batch_size=10, sampler=SubsetRandomSampler(range(30)))
    messages = _fit(make_trainer, UserNet(), loader, [ConvexGapMonitor(solver="clarabel", reduction="mean")], steps=1)
    assert any("yields 30 of its dataset's 40 samples (its sampler covers fewer" in m for m in messages), messages


@pytest.mark.slow
def test_a_sampler_that_repeats_samples_warns_and_a_dataset_of_whole_batches_does_not(make_trainer):
    X, y = _data(n=40)
    repeating = DataLoader(TensorDataset(X, y), batch_size=20, sampler=list(range(40)) + list(range(20)))
    messages = _fit(make_trainer, UserNet(), repeating, [ConvexGapMonitor(solver="clarabel", reduction="mean")], 1)
    assert any("yields 60 rows for a dataset of 40 samples (its sampler repeats" in m for m in messages), messages
    batches = DataLoader(TensorDataset(X, y), batch_sampler=[range(20), range(20, 40), range(20)])
    messages = _fit(make_trainer, UserNet(), batches, [ConvexGapMonitor(solver="clarabel", reduction="mean")], 1)
    assert any("yields 60 rows for a dataset of 40 samples (its sampler repeats" in m for m in messages), messages
    whole = DataLoader(TensorDataset(X[None], y[None]), batch_size=None)  # one item: the full batch of 40 rows
    messages = _fit(make_trainer, UserNet(), whole, [ConvexGapMonitor(solver="clarabel", reduction="mean")], 1)
    assert not any("dataloader yields" in m for m in messages), messages


@pytest.mark.slow
def test_a_full_pass_and_a_probe_are_said_without_a_warning(make_trainer, monkeypatch):
    said = []
    monkeypatch.setattr(data_module, "rank_zero_info", said.append)
    X, y = _data(n=40)
    probe = ConvexGapMonitor(solver="clarabel", reduction="mean", probe=X[:10], target=y[:10], prefix="probe",
                             max_samples=8)
    callbacks = [ConvexGapMonitor(solver="clarabel", reduction="mean"), probe]
    messages = _fit(make_trainer, UserNet(), DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True),
                    callbacks, steps=1)
    assert said == ["hcl: the callbacks evaluate the network on n = 40 samples: one pass over the training dataloader "
                    "(each batch's first item as the inputs, its second as the targets)",
                    "hcl: the callbacks evaluate the network on n = 8 samples (the first max_samples=8 of 10): "
                    "ConvexGapMonitor's probe"]
    assert not any("dataloader yields" in m for m in messages), messages


class Between(pl.LightningModule):
    """``Linear → <middle> → ReLU → Linear`` trained with Adam on shuffled mini-batches."""

    def __init__(self, middle: nn.Module):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), middle, nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x).squeeze(-1) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _between_callbacks(kind):
    stack = {"layer": "net.0", "output_layer": "net.3"}
    if kind == "patterns":
        return [PatternMonitor(**stack)]
    if kind == "gap":
        return [ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel", **stack)]
    return [PatternMonitor(**stack), ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel", **stack)]


@pytest.mark.parametrize("kind", ["patterns", "gap", "both"])
@pytest.mark.slow
def test_batch_norm_between_the_layers_is_refused_by_every_callback_on_a_shuffled_loader(kind, make_trainer):
    # At initialisation BatchNorm1d in eval mode is nearly the identity: only the layer itself can give it away.
    X, y = _data(n=64)
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match=r"'net.1' \(BatchNorm1d\) runs between"):
        _fit(make_trainer, Between(nn.BatchNorm1d(8)), loader, _between_callbacks(kind))


@pytest.mark.slow
def test_dropout_between_the_layers_is_accepted_and_said(make_trainer):
    X, y = _data(n=64)
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    said = _fit(make_trainer, Between(nn.Dropout(0.2)), loader, _between_callbacks("both"))
    assert any("'net.1' before or between the layers" in message and "without dropout" in message for message in said)


@pytest.mark.slow
def test_dropout_on_the_inputs_is_said_as_between_the_layers(make_trainer):
    class Before(Between):
        def forward(self, x):
            return self.net(self.drop(x))

    X, y = _data(n=64)
    model = Before(nn.Identity())
    model.drop = nn.Dropout(0.2)
    said = _fit(make_trainer, model, DataLoader(TensorDataset(X, y), batch_size=16), _between_callbacks("both"))
    assert any("'drop' before or between the layers" in message and "without dropout" in message for message in said)


@pytest.mark.slow
def test_dropout_between_the_layers_is_found_without_naming_the_layers(make_trainer):
    X, y = _data(n=64)
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    said = _fit(make_trainer, Between(nn.Dropout(0.2)), loader,
                [PatternMonitor(), ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel")])
    assert any("'net.1' before or between the layers" in message and "without dropout" in message for message in said)
    model = Between(nn.Dropout(0.2))
    assert find_relu_stack(model, "net.0").output is model.net[3]  # the hidden layer alone names the stack


def test_the_stack_check_names_the_layer_and_lets_an_identity_through():
    model = Between(nn.LayerNorm(8))
    stack = find_relu_stack(model, "net.0", "net.3")
    with pytest.raises(ValueError, match=r"'net.1' \(LayerNorm\)"):
        stack.check_forward(model, torch.randn(8, 3))
    plain = Between(nn.Identity())
    find_relu_stack(plain, "net.0", "net.3").check_forward(plain, torch.randn(8, 3))


@pytest.mark.slow
def test_the_chart_lists_the_objective_only_for_a_model_that_logs_it(make_trainer):
    from hcl import dashboard

    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=40)
    user = make_trainer([ConvexGapMonitor(weight_decay=1e-3, reduction="mean", solver="clarabel")], max_steps=1)
    user.fit(UserNet(), loader)
    series = dashboard.layout_of(user)["hcl"]["objective vs convex optimum"][1]
    assert "train/objective" not in series and "convex/nonconvex_objective" in series

    ours = make_trainer([ConvexGapMonitor(solver="clarabel")], max_steps=1)
    ours.fit(TwoLayerReLU(in_features=3, hidden=4).double(), loader)
    assert "train/objective" in dashboard.layout_of(ours)["hcl"]["objective vs convex optimum"][1]

