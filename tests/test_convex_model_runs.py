"""ConvexReLU in unusual runs: precisions, divergence, points outside their cones, subclasses' optimizers."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from _convex_model_utils import LAM, _data, _trainer
from _events import read_scalars
from lightning.pytorch.loggers import TensorBoardLogger

from hcl import ConvexReLU
from hcl.convex.gated import gate_mask
from hcl.convex.problem import fold_bias
from hcl.datamodules.base import TensorDataModule


def test_adam_in_float16_and_inputs_of_another_width_are_refused_by_name(tmp_path):
    X, Y = _data(n=12)
    data = TensorDataModule(train=(X.float(), Y.float()))
    half = ConvexReLU(in_features=3, num_gates=4, optimizer="adam", lr=1e-4, certify_every_n_steps=0)
    with pytest.raises(ValueError, match="Adam in float16"):  # was NaN from step 1, "diverged: a smaller lr"
        _trainer(tmp_path, 1, precision="16-true").fit(half, datamodule=data)
    wide = ConvexReLU(in_features=5, num_gates=4, certify_every_n_steps=0)
    with pytest.raises(ValueError, match=r"in_features=5\) got inputs of 3 features"):  # was a raw matmul error
        _trainer(tmp_path, 1, precision="32-true").fit(wide, datamodule=data)


def test_the_training_accuracy_under_bf16_true_is_the_exact_ratio(tmp_path):
    """The right answers are counted as an integer and divided in float32: bf16 (the default dtype under bf16-true)
    logged 0.050048828125 for 0.05, and counts above 256 rounded."""
    from _events import read_scalars

    g = torch.Generator().manual_seed(0)
    X, labels = torch.randn(1001, 3, generator=g), torch.randint(0, 3, (1001,), generator=g)
    model = ConvexReLU(in_features=3, out_features=3, num_gates=6, optimizer="sgd", lr=1e-3, gate_seed=0,
                       certify_every_n_steps=0)
    counts = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            with torch.no_grad():
                mapped = module._outputs(module.fold(batch[0].to(module.U.dtype)))[1]
            counts.append(int((mapped.argmax(1) == batch[1]).sum()))

    data = TensorDataModule(train=(X, labels), num_classes=3)
    _trainer(tmp_path, 3, [Record()], precision="bf16-true", logger=True, log_every_n_steps=1).fit(model,
                                                                                                 datamodule=data)
    logged = [value for _, value in read_scalars(tmp_path)["train/acc"]]
    assert logged == [pytest.approx(c / 1001, abs=1e-7) for c in counts]


def test_a_float64_runs_logged_objective_is_exact_to_float64(tmp_path):
    """The batch's size scales the data term in the run's precision: counted in float32, 1/30 moved the logged value
    (and the step) by 5e-8 of itself."""
    X, Y = _data(n=30)
    model = ConvexReLU(in_features=3, num_gates=6, optimizer="sgd", lr=1e-2, gate_seed=0, certify_every_n_steps=0,
                       weight_decay=1e-3).double()
    logged = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            with torch.no_grad():
                mapped = module._outputs(module.fold(batch[0]))[1]
            logged.append(float((mapped - batch[1]).square().sum()) / 30)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/data_loss"]))

    _trainer(tmp_path, 2, [Record()]).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    assert logged[1] == pytest.approx(logged[0], rel=1e-15) and logged[3] == pytest.approx(logged[2], rel=1e-15)


def test_a_run_diverging_through_finite_values_is_said(tmp_path):
    X, Y = _data(n=30)
    data = TensorDataModule(train=(X, Y))
    model = ConvexReLU(in_features=3, num_gates=40, optimizer="sgd", lr=5.0, certify_every_n_steps=0).double()
    with pytest.warns(UserWarning, match="training is diverging"):  # (it said nothing until inf)
        _trainer(tmp_path, 12).fit(model, datamodule=data)
    assert torch.isfinite(model.U).all()  # still finite: the non-finite check alone would not have seen it


def test_the_data_line_names_the_certificates_not_callbacks(tmp_path, monkeypatch):
    import hcl.callbacks.data as data_module

    said = []
    monkeypatch.setattr(data_module, "rank_zero_info", said.append)
    X, Y = _data(n=12)
    model = ConvexReLU(in_features=3, num_gates=4, certify_every_n_steps=1).double()
    _trainer(tmp_path, 1).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    assert said and all(line.startswith("hcl: ConvexReLU's certificates evaluate") for line in said), said


def test_a_relu_point_outside_its_cones_logs_its_bound_but_no_duality_gap(tmp_path):
    """Outside its cones the penalised point's objective can lie below the optimum: a "gap" there read negative."""
    X, Y = _data(n=20, c=1)
    model = ConvexReLU(in_features=3, num_gates=6, weight_decay=LAM, variant="relu", optimizer="sgd", lr=0.02,
                       certify_every_n_steps=10).double()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    with pytest.warns(UserWarning, match=r"ConvexReLU: the point is outside its cones \(largest violation .*\): its "
                                         r"objective bounds nothing, so convex_train/duality_gap is logged only"):
        _trainer(tmp_path, 40, logger=logger, log_every_n_steps=1).fit(model,
                                                                      datamodule=TensorDataModule(train=(X, Y)))
    s = read_scalars(logger.log_dir)
    violation = dict(s["convex_train/violation"])
    assert sum(value > 0 for value in violation.values()) >= 3 and len(s["convex_train/lower_bound"]) == 5
    inside = [step for step, value in violation.items() if value == 0]  # the start, zero
    assert [step for step, _ in s.get("convex_train/duality_gap", [])] == inside


def test_a_weight_decay_in_a_subclasss_optimizer_is_said(tmp_path):
    class Decayed(ConvexReLU):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=0.1)

    X, Y = _data(n=20, c=1)
    with pytest.warns(UserWarning, match=r"the optimizer's weight_decay=0.1 adds a ridge .* set λ with weight_decay="):
        _trainer(tmp_path, 2).fit(Decayed(in_features=3, num_gates=4).double(),
                                  datamodule=TensorDataModule(train=(X, Y)))


def test_the_proximal_step_follows_the_optimizers_lr(tmp_path):
    """A subclass's SGD at a quarter of hparams.lr took the prox of hparams.lr: it settled at the optimum of 4λ (its
    duality gap stuck at 0.5) without a word."""
    class Quarter(ConvexReLU):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr / 4)

    X, Y = _data(n=20, c=1)
    points = []
    for model in (Quarter(in_features=3, num_gates=4, weight_decay=0.1, optimizer="sgd", lr=0.04),
                  ConvexReLU(in_features=3, num_gates=4, weight_decay=0.1, optimizer="sgd", lr=0.01)):
        _trainer(tmp_path, 3).fit(model.double(), datamodule=TensorDataModule(train=(X, Y)))
        points.append(model.U.detach().clone())
    assert points[1].abs().sum() > 0 and torch.allclose(points[0], points[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps_it, plateau", [(False, False), (True, False), (False, True)])
def test_a_scheduler_lightning_does_not_step_is_said_unless_the_subclass_does(tmp_path, steps_it, plateau):
    class Scheduled(ConvexReLU):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
            if plateau:  # no _step_count of its own
                scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train/objective"}}
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)]

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if steps_it:
                self.lr_schedulers().step()
            return loss

    X, Y = _data(n=20, c=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, 2).fit(Scheduled(in_features=3, num_gates=4).double(),
                                  datamodule=TensorDataModule(train=(X, Y)))
    said = [w for w in caught if "was never stepped: under manual optimization Lightning steps none" in str(w.message)]
    assert len(said) == (0 if steps_it else 1)


def test_a_decoupled_decay_in_a_subclasss_optimizer_is_said(tmp_path):
    class Decoupled(ConvexReLU):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)  # its default weight_decay: 0.01

    X, Y = _data(n=20, c=1)
    with pytest.warns(UserWarning, match=r"decoupled weight_decay=0.01 shrinks U outside the gradient"):
        _trainer(tmp_path, 2).fit(Decoupled(in_features=3, num_gates=4).double(),
                                  datamodule=TensorDataModule(train=(X, Y)))


def test_a_subclass_without_super_on_train_start_certifies_each_fit_on_its_own_data(tmp_path):
    class NoSuper(ConvexReLU):
        def on_train_start(self):
            pass

    model = NoSuper(in_features=3, num_gates=4, certify_every_n_steps=1).double()
    for n in (16, 40):  # the second fit's certificates were computed on the first fit's 16 rows
        X, Y = _data(n=n, c=1, seed=n)
        _trainer(tmp_path, 2).fit(model, datamodule=TensorDataModule(train=(X, Y)))
        assert model._train_data[1].shape[0] == n


def test_the_gates_patterns_are_never_autocasts_bf16():
    g = torch.Generator().manual_seed(0)
    Xf, gates = fold_bias(torch.randn(2000, 8, generator=g), True), torch.randn(9, 50, generator=g)
    exact = Xf.double() @ gates.double() >= 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gate_mask(Xf, gates), exact)


def test_no_earlier_duality_gap_stays_beside_a_later_point_outside_its_cones():
    """callback_metrics kept the step-0 gap (0.917) beside the final objective and bound of a point whose gap is not
    logged (outside its cones)."""
    import warnings

    import lightning.pytorch as pl

    from hcl import ConvexReLU
    from hcl.datamodules import TensorDataModule

    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=g, dtype=torch.float64)
    model = ConvexReLU(in_features=3, num_gates=5, variant="relu", weight_decay=0.02, optimizer="sgd", lr=0.05,
                       certify_every_n_steps=5).double()
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=TensorDataModule(train=(X, torch.sin(X.sum(1, keepdim=True)))))
    metrics = trainer.callback_metrics
    assert float(metrics["convex_train/violation"]) > 0  # the case under test
    assert "convex_train/duality_gap" not in metrics


def test_a_summed_objective_over_reloaded_loaders_is_said(tmp_path):
    """Each batch is scaled by the n read when training started: a loader reloaded with more data trained 20/30 of the
    summed objective, silently."""
    X, Y = _data(n=12)
    model = ConvexReLU(in_features=3, num_gates=4, reduction="sum", certify_every_n_steps=0).double()
    with pytest.warns(UserWarning, match=r"ConvexReLU\(reduction='sum'\) scales each batch by the n"):
        _trainer(tmp_path, 1, reload_dataloaders_every_n_epochs=1).fit(model, datamodule=TensorDataModule(train=(X, Y)))


@pytest.mark.slow
def test_each_step_logs_the_accuracy_and_penalty_of_the_point_it_evaluated(tmp_path):
    """Outside its cones the ReLU variant's own prediction is not its network's: `train/acc` is the mapped network's
    (the model's forward) on the batch, and `train/penalty` the penalty at the step's point, before its update, so
    that `train/objective` = `train/data_loss` + `train/penalty`."""
    torch.manual_seed(0)
    X = torch.randn(60, 3, dtype=torch.float64)
    labels = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    Y = torch.nn.functional.one_hot(labels, 3).double()
    seen = []

    class Before(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                self.acc = float((pl_module(batch[0]).argmax(1) == batch[1].argmax(1)).double().mean())
                self.penalty = float(pl_module.penalty())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append((self.acc, float(m["train/acc"]), self.penalty, float(m["train/penalty"]),
                         float(m["train/objective"]) - float(m["train/data_loss"])))

    model = ConvexReLU(in_features=3, out_features=3, num_gates=8, variant="relu", optimizer="sgd", lr=0.5,
                       cone_penalty=0.01, weight_decay=1e-2, certify_every_n_steps=0).double()
    _trainer(tmp_path, 8, callbacks=[Before()]).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    assert len(seen) == 8
    for acc, logged_acc, penalty, logged_penalty, difference in seen:
        assert logged_acc == pytest.approx(acc, abs=1e-12)
        assert logged_penalty == pytest.approx(penalty, rel=1e-9)
        assert difference == pytest.approx(logged_penalty, rel=1e-6, abs=1e-12)
