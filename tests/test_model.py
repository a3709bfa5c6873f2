"""TwoLayerReLU: its objective is the L of docs/convex.md, its options and its errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from _events import next_second
from torch.utils.data import DataLoader, TensorDataset

from hcl import ConvexReLU, TwoLayerReLU
from hcl.convex import fold_bias, fold_weights, network_objective
from hcl.datamodules.base import TensorDataModule


def _hand_objective(model: TwoLayerReLU, X: torch.Tensor, y: torch.Tensor, reduction: str) -> float:
    """L computed neuron by neuron, sample by sample, with plain Python floats."""
    W = model.hidden_layer.weight.tolist()
    b = model.hidden_layer.bias.tolist() if model.hidden_layer.bias is not None else [0.0] * len(W)
    A = model.output_layer.weight.tolist()
    b0 = model.output_layer.bias.tolist() if model.output_layer.bias is not None else [0.0] * len(A)
    total = 0.0
    for x, target in zip(X.tolist(), y.reshape(len(X), -1).tolist()):
        hidden = [max(0.0, sum(wi * xi for wi, xi in zip(w, x)) + bi) for w, bi in zip(W, b)]
        for k, a in enumerate(A):
            out = sum(ak * h for ak, h in zip(a, hidden)) + b0[k]
            total += (out - target[k]) ** 2
    scale = 1.0 if reduction == "sum" else 1.0 / len(X)
    squares = sum(v * v for row in W for v in row) + sum(v * v for row in A for v in row)
    if model.hidden_layer.bias is not None:
        squares += sum(v * v for v in b)
    return scale * total + model.weight_decay * squares


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias,output_bias,out_features", [(False, False, 1), (True, True, 1), (True, False, 3)])
def test_objective_matches_a_hand_computation(reduction, bias, output_bias, out_features):
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=3, hidden=4, out_features=out_features, bias=bias, output_bias=output_bias,
                         reduction=reduction, weight_decay=0.07).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, out_features, dtype=torch.float64)
    assert float(model.objective(X, y)) == pytest.approx(_hand_objective(model, X, y, reduction), rel=1e-12)
    # ... and it is the convex module's network_objective on the folded weights.
    Wf = fold_weights(model.hidden_layer.weight, model.hidden_layer.bias)
    L = network_objective(fold_bias(X, bias), y, Wf, model.output_layer.weight, model.output_layer.bias,
                          0.07, reduction)
    assert float(L) == pytest.approx(float(model.objective(X, y)), rel=1e-12)


def _single_neuron() -> tuple[TwoLayerReLU, torch.Tensor, torch.Tensor]:
    model = TwoLayerReLU(in_features=2, hidden=1, bias=False, reduction="mean", weight_decay=0.0, lr=0.5,
                         hidden_weight=[[0.3, -0.15]], output_weight=[[1.0]])
    X = torch.tensor([[-0.2, 1.0], [1.0, 1.0]])
    y = torch.tensor([0.5, 1.0])
    return model, X, y


def test_seed_single_neuron_objective_at_step_zero():
    model, X, y = _single_neuron()
    assert float(model.objective(X, y)) == pytest.approx(0.48625, abs=1e-6)


class _Recorder(pl.Callback):
    def __init__(self):
        self.objectives = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.objectives.append(float(trainer.callback_metrics["train/objective"]))


@pytest.mark.slow  # 1500 steps
def test_seed_single_neuron_reaches_zero_with_gradient_descent(tmp_path):
    model, X, y = _single_neuron()
    loader = DataLoader(TensorDataset(X, y), batch_size=2)
    recorder = _Recorder()
    trainer = pl.Trainer(max_steps=1500, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[recorder], default_root_dir=tmp_path,
                         accelerator="cpu")
    trainer.fit(model, loader)
    assert recorder.objectives[0] == pytest.approx(0.48625, abs=1e-6)
    assert float(model.objective(X, y)) < 1e-4
    # The neuron ends up active on both points (its activation point left the data).
    assert bool((model.hidden_layer(X) >= 0).all())


@pytest.mark.parametrize("precision,rel", [("32-true", 1e-6), ("bf16-mixed", 1e-2)])
def test_float64_data_trains_in_the_trainers_precision(tmp_path, precision, rel):
    # the data modules' float64 with a float32 or mixed trainer: the inputs take the parameters' precision
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    model = TwoLayerReLU(in_features=3, hidden=8, weight_decay=0.01, lr=0.01)
    start = float(_hand_objective(model, X, y, model.reduction))
    recorder = _Recorder()
    trainer = pl.Trainer(max_steps=2, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(X, y), batch_size=24))
    assert recorder.objectives[0] == pytest.approx(start, rel=rel)
    assert model.hidden_layer.weight.dtype == torch.float32


@pytest.mark.parametrize("optimizer,cls", [("sgd", torch.optim.SGD), ("momentum", torch.optim.SGD),
                                           ("adam", torch.optim.Adam), ("adagrad", torch.optim.Adagrad)])
def test_optimizers_never_get_a_weight_decay(optimizer, cls):
    model = TwoLayerReLU(weight_decay=0.3, optimizer=optimizer, lr=0.01,
                         **({"momentum": 0.5} if optimizer == "momentum" else {}))
    opt = model.configure_optimizers()
    assert isinstance(opt, cls)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0
    assert group["lr"] == 0.01
    if cls is torch.optim.SGD:
        assert group["momentum"] == (0.0 if optimizer == "sgd" else 0.5)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_adam_and_adagrad_in_float16_are_refused_by_name(tmp_path, optimizer):
    """Their eps is 0 in float16: the run was NaN from its first step, said only by a monitor's warning."""
    model = TwoLayerReLU(in_features=3, hidden=4, optimizer=optimizer, lr=1e-3)
    trainer = pl.Trainer(max_steps=1, precision="16-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         accelerator="cpu")
    with pytest.raises(ValueError, match=f"{optimizer} in float16"):
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8)), batch_size=8))


@pytest.mark.parametrize("kwargs,error,message", [
    ({"momentum": 0.5}, ValueError, "momentum applies to optimizer='momentum' only"),  # SGD ignored it (0 is taken)
    ({"optimizer": "adam", "momentum": 0.5}, ValueError, "momentum applies to"),
    ({"optimizer": "momentum", "momentum": -1.0}, ValueError, r"momentum must lie in \[0, 1\)"),  # torch's, late
    ({"bias": "no"}, TypeError, "bias must be a bool"),  # a bias was made
    ({"in_features": True}, ValueError, "in_features must be a positive integer"),
    ({"lr": "0.1"}, ValueError, "lr must be a positive number"),  # "must be real number, not str"
    ({"init_scale": None}, ValueError, "init_scale must be a positive number"),
])
def test_arguments_accepted_silently_or_refused_late_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        TwoLayerReLU(**kwargs)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e2])
@pytest.mark.parametrize("init", ["uniform", "normal", "kaiming"])
def test_init_scale_multiplies_every_weight(init, scale):
    torch.manual_seed(3)
    base = TwoLayerReLU(in_features=5, hidden=50, bias=True, init=init, init_scale=1.0)
    torch.manual_seed(3)
    scaled = TwoLayerReLU(in_features=5, hidden=50, bias=True, init=init, init_scale=scale)
    for p, q in zip(base.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p * scale, rtol=1e-5, atol=0.0)
    assert all(torch.isfinite(p).all() for p in scaled.parameters())


def test_normal_init_has_the_announced_variance():
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=100, hidden=2000, init="normal")
    std = float(model.hidden_layer.weight.std())
    assert std == pytest.approx(1 / math.sqrt(100), rel=0.05)


def test_classification_logs_accuracy_and_uses_one_hot_squared_loss():
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=4, hidden=8, out_features=3)
    X = torch.randn(10, 4)
    labels = torch.randint(0, 3, (10,))
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    # Index targets and one-hot targets give the same squared loss.
    assert float(model.objective(X, labels)) == pytest.approx(float(model.objective(X, one_hot)), rel=1e-6)
    ce = TwoLayerReLU(in_features=4, hidden=8, out_features=3, loss="cross_entropy")
    expected = torch.nn.functional.cross_entropy(ce(X), labels, reduction="mean")
    assert float(ce.objective(X, labels)) == pytest.approx(float(expected), rel=1e-6)
    assert float(ce.objective(X, one_hot)) == pytest.approx(float(expected), rel=1e-6)  # soft targets: the same mean


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulated_steps_log_the_mean_of_their_micro_batches(tmp_path, make_trainer, reduction):
    """With ``accumulate_grad_batches = 2`` a step minimises the mean of its two micro-batches' objectives; that mean
    is logged (Lightning keeps only the last value given), and the accuracy counts both micro-batches."""
    from _events import read_scalars

    torch.manual_seed(0)
    X, labels = torch.randn(16, 3), torch.randint(0, 3, (16,))
    model = TwoLayerReLU(in_features=3, hidden=4, out_features=3, weight_decay=0.01, reduction=reduction, lr=0.05)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            x, y = batch
            with torch.no_grad():
                out = module(x)
                data = module.data_loss_sum(out, y) * (4.0 if reduction == "sum" else 1.0 / x.shape[0])
                right = int((out.argmax(1) == y).sum())
            seen.append((trainer.global_step, float(data + 0.01 * module._squares()), right, x.shape[0]))

    loader = DataLoader(TensorDataset(X, labels), batch_size=4)
    make_trainer([Record()], max_steps=2, accumulate_grad_batches=2, log_every_n_steps=1).fit(model, loader)
    logged = read_scalars(tmp_path)
    for step in range(2):
        parts = [p for p in seen if p[0] == step]
        assert len(parts) == 2
        assert dict(logged["train/objective"])[step] == pytest.approx(sum(p[1] for p in parts) / 2, rel=1e-5)
        assert dict(logged["train/acc"])[step] == pytest.approx(sum(p[2] for p in parts) / sum(p[3] for p in parts))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.slow
def test_the_training_values_under_bf16_are_summed_over_every_sample(tmp_path, make_trainer, precision):
    """Under bf16 the outputs are bfloat16, which holds integers exactly only up to 256 and sums thousands of squares
    0.2 % off: the count of right answers is an integer (988 was logged for 987 of 3 001), its ratio float32 (not the
    default dtype, bf16 under bf16-true), and the objective is summed in float32 from the bf16 outputs."""
    from _events import read_scalars

    torch.manual_seed(0)
    X, labels = torch.randn(3001, 5), torch.randint(0, 3, (3001,))
    model = TwoLayerReLU(in_features=5, hidden=20, out_features=3, lr=0.05, weight_decay=0.01)
    counts, objectives = [], []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            weights = [p.detach().float() for p in module.parameters()]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                out = module(batch[0].to(module.hidden_layer.weight.dtype))
            counts.append(int((out.argmax(1) == batch[1]).sum()))
            data = (out.double() - torch.nn.functional.one_hot(batch[1], 3).double()).square().sum() / 3001
            objectives.append(float(data) + 0.01 * sum(float(w.double().square().sum()) for w in weights[:3]))

    loader = DataLoader(TensorDataset(X, labels), batch_size=3001)
    make_trainer([Record()], max_steps=3, precision=precision, log_every_n_steps=1).fit(model, loader)
    logged = read_scalars(tmp_path)
    assert [value for _, value in logged["train/acc"]] == [pytest.approx(c / 3001, abs=1e-7) for c in counts]
    assert any(count % 4 for count in counts)  # counts bfloat16 could not hold (it steps by 4 from 512 to 1 024)
    assert [value for _, value in logged["train/objective"]] == [pytest.approx(o, rel=2e-6) for o in objectives]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"hidden": 0}, "hidden"),
        ({"in_features": -1}, "in_features"),
        ({"reduction": "avg"}, "reduction"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"init": "xavier"}, "init"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"lr": -0.1}, "lr"),
        ({"loss": "cross_entropy"}, "cross_entropy"),
        ({"in_features": 2, "hidden": 1, "hidden_weight": [[1.0, 2.0, 3.0]]}, "hidden_weight"),
        ({"in_features": 2, "hidden": 1, "hidden_weight": [[float("nan"), 1.0]]}, "NaN"),
        ({"hidden_bias_init": [0.0] * 20}, "bias=False"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwoLayerReLU(**kwargs)


def test_exposes_layers_and_objective_settings():
    model = TwoLayerReLU(in_features=7, hidden=9, out_features=2, bias=True, weight_decay=0.2, reduction="sum")
    assert isinstance(model.hidden_layer, torch.nn.Linear) and model.hidden_layer.weight.shape == (9, 7)
    assert isinstance(model.output_layer, torch.nn.Linear) and model.output_layer.weight.shape == (2, 9)
    assert model.weight_decay == 0.2 and model.reduction == "sum"


def _validator(tmp_path, callbacks=(), **options):
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=list(callbacks), **options)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_validation_sums_every_batch_once_also_after_an_interrupted_validation(tmp_path, reduction):
    """An interrupted validation (Ctrl-C, an error, a batch-size finder's retry) left its partial sums to be added to
    the next one's: 7.08 where the set's sum is 3.54. The mean divides by every batch's rows, not the last one's."""
    torch.manual_seed(0)
    X, y = torch.randn(31, 3), torch.randn(31, 1)
    model = TwoLayerReLU(in_features=3, hidden=5, reduction=reduction)
    loader = DataLoader(TensorDataset(X, y), batch_size=7)

    class Interrupt(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _validator(tmp_path, [Interrupt()]).validate(model, loader, verbose=False)
    result = _validator(tmp_path).validate(model, loader, verbose=False)[0]
    with torch.no_grad():
        expected = float((model(X) - y).square().sum()) / (31 if reduction == "mean" else 1)
    assert result["val/data_loss"] == pytest.approx(expected, rel=1e-6)


def test_several_validation_sets_are_refused_by_name(tmp_path):
    class TwoSets(TwoLayerReLU):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step(batch, batch_idx)

    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(ValueError, match="TwoSets logs val/objective of one val set, got 2 dataloaders"):
        _validator(tmp_path).validate(TwoSets(in_features=3, hidden=4), [loader, loader], verbose=False)


def test_a_ranks_padding_copy_counts_in_no_validation_value(tmp_path):
    """DDP's sampler pads 31 samples to 32 by repeating the first: rank 1 evaluates samples 1, 3, …, 29 and a copy
    of sample 0, which counted in val/acc (18/152 where the set gives 18/151)."""
    from torch.utils.data import DistributedSampler

    torch.manual_seed(0)
    X, labels = torch.randn(31, 4), torch.randint(0, 3, (31,))
    dataset = TensorDataset(X, torch.nn.functional.one_hot(labels, 3).float())
    loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=2, rank=1,
                                                                          shuffle=False))
    model = TwoLayerReLU(in_features=4, hidden=6, out_features=3, reduction="sum")
    trainer = _validator(tmp_path, use_distributed_sampler=False)
    result = trainer.validate(model, loader, verbose=False)[0]
    mine = slice(1, 31, 2)
    with torch.no_grad():
        out = model(X[mine])
    assert result["val/acc"] == pytest.approx(float((out.argmax(1) == labels[mine]).float().mean()), rel=1e-6)
    assert result["val/data_loss"] == pytest.approx(float((out - dataset.tensors[1][mine]).square().sum()), rel=1e-5)


def test_a_batch_of_padding_copies_only_counts_nothing_and_breaks_nothing(tmp_path):
    """Rank 1 of 2 over 5 samples in batches of 2 takes [1, 3] then [0], a copy only: the accuracy metric was given an
    empty batch and raised (one rank died, the other hung)."""
    from torch.utils.data import DistributedSampler

    torch.manual_seed(0)
    X, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    dataset = TensorDataset(X, labels)
    loader = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, num_replicas=2, rank=1,
                                                                          shuffle=True, seed=0))
    model = TwoLayerReLU(in_features=3, hidden=4, out_features=3)
    trainer = _validator(tmp_path, use_distributed_sampler=False)
    mine = list(loader.sampler)[:2]  # the rank's real samples (the copies come last, after any shuffle)
    result = trainer.validate(model, loader, verbose=False)[0]
    with torch.no_grad():
        out = model(X[mine])
    assert result["val/acc"] == pytest.approx(float((out.argmax(1) == labels[mine]).float().mean()), rel=1e-6)


def test_a_dict_of_validation_sets_is_refused_like_a_list(tmp_path):
    class TwoSets(TwoLayerReLU):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step(batch, batch_idx)

    loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(ValueError, match="got 2 dataloaders"):
        _validator(tmp_path).validate(TwoSets(in_features=3, hidden=4), {"a": loader, "b": loader}, verbose=False)


@pytest.mark.parametrize("classes, convex", [(None, False), (3, False), (3, True)])
def test_a_resumed_run_keeps_the_validation_at_its_checkpoints_step(tmp_path, classes, convex):
    """The restart marker at the checkpoint's step dropped that step's validation, which the resumed run does not take
    again: val/* read 1, …, 5, 7, … after a resume from step 6."""
    import csv
    import glob

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    from hcl.datamodules import TensorDataModule

    torch.manual_seed(0)
    c = classes or 1
    X, Xv = torch.randn(30, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    Y, Yv = (torch.randn(30, c, dtype=torch.float64), torch.randn(11, c, dtype=torch.float64))

    def run(name, steps, ckpt=None):
        torch.manual_seed(1)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision="64-true", num_sanity_val_steps=0,
                             logger=[TensorBoardLogger(str(tmp_path / name), name="run", version=0),
                                     CSVLogger(str(tmp_path / name), name="csv")],
                             enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
        model = (ConvexReLU(in_features=4, out_features=c, num_gates=5, certify_every_n_steps=0) if convex
                 else TwoLayerReLU(in_features=4, hidden=5, out_features=c))
        trainer.fit(model, ckpt_path=ckpt,
                    datamodule=TensorDataModule(train=(X, Y), val=(Xv, Yv), num_classes=classes))
        acc = EventAccumulator(str(tmp_path / name / "run" / "version_0"), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    straight = run("straight", 8)
    run("resumed", 5)
    next_second()
    resumed = run("resumed", 8, glob.glob(str(tmp_path / "resumed/run/version_0/checkpoints/*.ckpt"))[0])
    tags = ["val/objective", "val/data_loss"] + (["val/acc"] if classes else [])
    for tag in tags:
        assert [s for s, _ in resumed[tag]] == [s for s, _ in straight[tag]] == list(range(1, 9)), tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in straight[tag]], rel=1e-6), tag
    # the CSV logger has no restart marker: its two runs' files hold each step once, none logged again
    rows = [row for path in sorted(glob.glob(str(tmp_path / "resumed/csv/version_*/metrics.csv")))
            for row in csv.DictReader(open(path))]
    assert sorted(int(row["step"]) for row in rows if row.get("val/objective")) == list(range(1, 9))

def _one_step(root) -> pl.Trainer:
    return pl.Trainer(max_steps=1, accelerator="cpu", precision="64-true", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


@pytest.mark.parametrize("model", ["convex", "network"])
@pytest.mark.parametrize("outputs", [1, 2])
def test_a_model_with_fewer_outputs_than_classes_is_refused_before_training(tmp_path, model, outputs):
    # two outputs crashed in the accuracy metric ("Class values must be smaller than num_classes"); one silently
    # regressed on the class indices
    g = torch.Generator().manual_seed(0)
    data = TensorDataModule(train=(torch.randn(20, 2, generator=g), torch.arange(20) % 3), num_classes=3)
    net = (ConvexReLU(in_features=2, out_features=outputs, num_gates=3) if model == "convex"
           else TwoLayerReLU(in_features=2, hidden=3, out_features=outputs))
    with pytest.raises(ValueError, match=rf"out_features={outputs}\) cannot fit a data set of 3 classes"):
        _one_step(tmp_path).fit(net.double(), datamodule=data)
    binary = TensorDataModule(train=(torch.randn(20, 2, generator=g), torch.arange(20) % 2), num_classes=2)
    if outputs == 1:  # one output on two classes: a regression on 0/1, as before
        _one_step(tmp_path).fit(net.double(), datamodule=binary)


def test_a_second_fit_keeps_what_was_logged_between_and_predict_takes_the_data_modules_pairs(tmp_path, make_trainer):
    """A second ``fit`` of the same trainer continues its run: no restart marker drops the ``trainer.test`` logged in
    between, and the last validation is not written twice. ``trainer.predict`` gives the outputs of the test inputs."""
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    from hcl.datamodules import SyntheticRegression

    torch.manual_seed(0)
    data = SyntheticRegression(kind="points", n=8, append_ones=True, val_n=4, test_n=4, seed=0)
    model = TwoLayerReLU(in_features=2, hidden=4, weight_decay=0.01, lr=0.05)
    trainer = make_trainer([], max_steps=3, log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    tested = trainer.test(model, datamodule=data, verbose=False)[0]["test/objective"]
    trainer.fit_loop.epoch_loop.max_steps = 5
    trainer.fit(model, datamodule=data)
    run = EventAccumulator(trainer.logger.log_dir, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    run.Reload()  # the run as TensorBoard shows it, restart markers honoured
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in run.Scalars("test/objective")] == [(3, tested)]
    assert [e.step for e in run.Scalars("val/objective")] == [1, 2, 3, 4, 5]

    predicted = torch.cat(trainer.predict(model, datamodule=data))
    with torch.no_grad():
        assert torch.equal(predicted, model(next(iter(data.test_dataloader()))[0]))
