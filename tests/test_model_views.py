"""``ConvexReLU`` and ``TwoLayerReLU`` where their convex and mapped views differ: the ReLU variant off its cones, an
output bias, the certificate's cone-penalty multipliers, validation of the mapped network, the growth warning's
threshold; and the networks' initialisations and an optimizer's coupled weight decay in every penalty."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from _convex_model_utils import LAM, _data, _trainer

from hcl import ConvexReLU, TwoLayerReLU
from hcl.convex.gated import certify, gate_mask
from hcl.datamodules.base import TensorDataModule


def _outside_cones(model: ConvexReLU, seed: int = 1, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.U.copy_(scale * torch.randn(model.U.shape, generator=g, dtype=model.U.dtype))
        model.V.copy_(scale * torch.randn(model.V.shape, generator=g, dtype=model.V.dtype))


# --------------------------------------------------------------------------------------------- ConvexReLU
def test_relu_cone_violations_are_the_relu_of_minus_2D_minus_I_times_the_blocks():
    X, _ = _data(n=20)
    model = ConvexReLU(in_features=3, num_gates=5, variant="relu").double()
    _outside_cones(model)
    Xf = model.fold(X)
    with torch.no_grad():
        _, _, violation = model._outputs(Xf)
    sign = 2.0 * gate_mask(Xf, model.gates).to(Xf).unsqueeze(-1) - 1.0
    blocks_u = torch.einsum("nd,dpc->npc", Xf, model.U.detach())
    blocks_v = torch.einsum("nd,dpc->npc", Xf, model.V.detach())
    expected = torch.cat([torch.relu(-sign * blocks_u), torch.relu(-sign * blocks_v)], dim=1)
    assert bool((expected[:, :, 0] * (sign[:, :, 0].repeat(1, 2) < 0)).sum() > 0)  # inactive-side violations exist
    torch.testing.assert_close(violation, expected, rtol=1e-12, atol=1e-14)


def test_relu_penalty_counts_both_U_and_V():
    model = ConvexReLU(in_features=3, num_gates=5, variant="relu", weight_decay=0.3).double()
    _outside_cones(model)
    U, V = model.U.detach(), model.V.detach()
    expected = 2 * 0.3 * (U.norm(dim=(0, 2)).sum() + V.norm(dim=(0, 2)).sum())
    assert float(model.penalty()) == pytest.approx(float(expected), rel=1e-12)


class _BeforeStep(pl.Callback):
    """What the module's own forward says on the batch before the step's update, and what the step logged."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            out = module(x)
            Y = torch.nn.functional.one_hot(y, out.shape[1]).to(out) if out.shape[1] > 1 else y.reshape(out.shape)
            _, _, violation = module._outputs(module.fold(x))
        self.before = (float((out - Y).square().sum() / x.shape[0]),
                       float((out.argmax(1) == y).double().mean()) if out.shape[1] > 1 else None,
                       float(violation.max()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.seen.append((self.before, float(m["train/data_loss"]),
                          float(m["train/acc"]) if "train/acc" in m else None, float(m["train/cone_violation"])))


def test_relu_training_logs_the_mapped_networks_loss_accuracy_and_largest_violation(tmp_path):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=g)
    model = ConvexReLU(in_features=3, out_features=3, num_gates=6, variant="relu", optimizer="sgd", lr=1e-3,
                       certify_every_n_steps=0).double()
    _outside_cones(model)
    with torch.no_grad():  # the case under test: the convex prediction is not the mapped network's
        convex, mapped, _ = model._outputs(model.fold(X))
    assert not torch.allclose(convex, mapped)
    assert int((convex.argmax(1) == labels).sum()) != int((mapped.argmax(1) == labels).sum())
    recorder = _BeforeStep()
    _trainer(tmp_path, 2, [recorder]).fit(model, datamodule=TensorDataModule(train=(X, labels), num_classes=3))
    assert len(recorder.seen) == 2
    for (data, acc, worst), logged_data, logged_acc, logged_worst in recorder.seen:
        assert logged_data == pytest.approx(data, rel=1e-12)
        assert logged_acc == pytest.approx(acc, abs=1e-12)
        assert logged_worst == pytest.approx(worst, rel=1e-12)


def test_sgd_momentum_reaches_the_optimizer():
    model = ConvexReLU(in_features=3, num_gates=4, optimizer="sgd", lr=0.1, momentum=0.5)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.5 and optimizer.param_groups[0]["weight_decay"] == 0


@pytest.mark.parametrize("variant", ["gated", "relu"])
def test_the_output_bias_is_in_the_prediction(variant):
    X, _ = _data(n=7)
    model = ConvexReLU(in_features=3, out_features=2, num_gates=4, variant=variant, output_bias=True).double()
    with torch.no_grad():
        model.b0.copy_(torch.tensor([3.0, -2.0], dtype=torch.float64))  # U (and V) zero: the prediction is b0
    torch.testing.assert_close(model(X).detach(), torch.tensor([[3.0, -2.0]] * 7, dtype=torch.float64))


def test_the_relu_certificate_logged_takes_the_cone_penalty_multipliers(tmp_path):
    X, Y = _data(n=20)
    rho = 5.0
    model = ConvexReLU(in_features=3, num_gates=5, variant="relu", weight_decay=LAM, optimizer="sgd", lr=1e-3,
                       cone_penalty=rho, certify_every_n_steps=0).double()
    _trainer(tmp_path, 1).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    _outside_cones(model, scale=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = model.certify_and_log()
    with_mu = certify(X, Y, model.gates, model.U.detach(), model.V.detach(), weight_decay=LAM, reduction="mean",
                      bias=True, cone_penalty=rho)
    without = certify(X, Y, model.gates, model.U.detach(), model.V.detach(), weight_decay=LAM, reduction="mean",
                      bias=True)
    assert with_mu.violation > 0 and with_mu.lower_bound > 0  # the case under test
    assert with_mu.lower_bound != pytest.approx(without.lower_bound, rel=1e-6)
    assert logged["convex_train/lower_bound"] == pytest.approx(with_mu.lower_bound, rel=1e-10, abs=1e-14)
    assert logged["convex_train/objective"] == pytest.approx(with_mu.objective, rel=1e-10)


def test_growth_is_said_past_a_thousand_times_the_first_objective_not_before(tmp_path):
    model = ConvexReLU(in_features=3, num_gates=4, optimizer="sgd", lr=0.1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    model.trainer = trainer
    metrics = trainer.callback_metrics
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in (1.0, 999.0):
            metrics["train/objective"] = torch.tensor(value)
            model._watch_growth()
        assert not [w for w in caught if "training is diverging" in str(w.message)]
        metrics["train/objective"] = torch.tensor(5e3)
        model._watch_growth()
    assert [w for w in caught if "training is diverging" in str(w.message)]


def test_validation_of_a_relu_point_outside_its_cones_is_the_mapped_networks(tmp_path):
    X, Y = _data(n=20)
    model = ConvexReLU(in_features=3, num_gates=5, variant="relu", weight_decay=LAM).double()
    _outside_cones(model)
    trainer = _trainer(tmp_path, 1)
    trainer.validate(model, datamodule=TensorDataModule(train=(X, Y), val=(X, Y)), verbose=False)
    with torch.no_grad():
        convex, mapped, _ = model._outputs(model.fold(X))
        expected = float((mapped - Y).square().mean())
    assert not torch.allclose(convex, mapped)
    assert float(trainer.callback_metrics["val/data_loss"]) == pytest.approx(expected, rel=1e-12)


# -------------------------------------------------------------------------------------------- TwoLayerReLU
def test_normal_init_gives_the_hidden_bias_std_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=100, hidden=4000, bias=True, init="normal")
    assert float(model.hidden_layer.bias.std()) == pytest.approx(0.1, rel=0.06)


def test_kaiming_init_is_he_normal_then_n_0_1_over_m_with_zero_biases():
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=50, hidden=4000, bias=True, output_bias=True, init="kaiming")
    assert float(model.hidden_layer.weight.std()) == pytest.approx(math.sqrt(2 / 50), rel=0.03)
    assert float(model.output_layer.weight.std()) == pytest.approx(1 / math.sqrt(4000), rel=0.06)
    assert not model.hidden_layer.bias.any() and not model.output_layer.bias.any()


def test_a_coupled_decay_in_the_optimizer_counts_in_the_penalty_the_objective_and_the_logs(tmp_path):
    class Decayed(TwoLayerReLU):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=0.2)

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, generator=g), torch.randn(16, generator=g)
    model = Decayed(in_features=3, hidden=5, weight_decay=0.05)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(float(module._squares()))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/penalty"]))

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                         default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16))
    assert model.optimizer_decay == pytest.approx(0.1)  # wd / 2
    squares_before, logged = seen
    assert logged == pytest.approx(0.15 * squares_before, rel=1e-6)
    with torch.no_grad():
        squares = float(model._squares())
        data = float((model(X).reshape(-1) - y).square().mean())
        assert float(model.evaluation_penalty()) == pytest.approx(0.15 * squares, rel=1e-6)
        assert float(model.objective(X, y)) == pytest.approx(data + 0.15 * squares, rel=1e-6)
