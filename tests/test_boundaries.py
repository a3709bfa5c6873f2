"""Checks of arguments, checkpoints, user code and errors (``hcl.checks``, ``hcl.evaluation``, ``hcl.network``,
``hcl.cli_errors``) at their boundaries, and the small adapters built on them: the progress bar and the logged values
(``hcl.callbacks.progress``, ``hcl.callbacks.logs``)."""

from __future__ import annotations

import glob
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn


def _trainer(root, **overrides) -> pl.Trainer:
    options = dict(max_steps=1, accelerator="cpu", precision="64-true", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                   num_sanity_val_steps=0)
    options.update(overrides)
    return pl.Trainer(**options)


# ------------------------------------------------------------------------------------------------------ network.py
def test_a_trailing_dropout_is_never_taken_as_the_output_layer():
    # catches: _stack_index without `children[-1] is kept[1]` made the Dropout the stack's output layer
    from hcl.network import find_relu_stack

    sequential = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1), nn.Dropout(0.1))
    with pytest.raises(ValueError, match="no two-layer ReLU stack"):
        find_relu_stack(sequential)


def test_check_forward_refuses_an_output_scaled_by_a_tenth_of_a_percent_in_float64():
    # catches: the float64 tolerance 1e-4 loosened to 1e-2 let a 1.001× output pass as the stack's
    from hcl.network import find_relu_stack

    torch.manual_seed(0)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)).double()

        def forward(self, x):
            return 1.001 * self.net(x)

    X = torch.randn(20, 3, dtype=torch.float64)
    scaled = Scaled()
    with pytest.raises(ValueError, match="differs from that of its two-layer ReLU stack"):
        find_relu_stack(scaled).check_forward(scaled, X)


def test_a_loss_name_with_a_loss_prefix_is_recognised():
    # catches: _loss_kind without removeprefix("loss"): "loss_l1" read as nothing known, the L1 loss let through
    from hcl.network import non_squared_loss

    class Net(nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
            self.loss = loss

    said = non_squared_loss(Net("loss_l1"))
    assert said is not None and "absolute (L1)" in said
    assert non_squared_loss(Net("loss_mse")) is None


# --------------------------------------------------------------------------------------- checks.py, evaluation.py
def test_the_validation_objective_is_the_data_loss_plus_the_penalty(tmp_path):
    # catches: <stage>/objective logged as the data loss alone (only an order-dependent resume test caught it)
    from hcl import TwoLayerReLU
    from hcl.datamodules import TensorDataModule

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 1, generator=g, dtype=torch.float64)
    model = TwoLayerReLU(in_features=3, hidden=4, weight_decay=0.1)
    trainer = _trainer(tmp_path)
    trainer.validate(model.double(), datamodule=TensorDataModule(train=(X, Y), val=(X, Y)), verbose=False)
    metrics = trainer.callback_metrics
    assert float(metrics["val/penalty"]) > 0
    assert float(metrics["val/objective"]) == pytest.approx(
        float(metrics["val/data_loss"]) + float(metrics["val/penalty"]), rel=1e-12)


def test_a_bfloat16_models_penalty_is_summed_in_float32():
    # catches: at_least_float32 leaves bfloat16 as it is (a bf16 sum of many squares is off by 0.2 % and more)
    from hcl import TwoLayerReLU
    from hcl.evaluation import at_least_float32

    assert at_least_float32(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.float32
    model = TwoLayerReLU(in_features=3, hidden=4, weight_decay=0.1).to(torch.bfloat16)
    assert model.penalty().dtype == torch.float32


def test_a_seed_of_2_to_the_63_is_refused_at_construction():
    # catches: check_seed's bound `< 2**63` as `<= 2**63`: torch's generator then fails later ("Overflow ...")
    from hcl.callbacks import ConvexGapMonitor
    from hcl.checks import check_seed

    with pytest.raises(ValueError, match=r"\[-2\*\*63, 2\*\*63\)"):
        ConvexGapMonitor(seed=2**63)
    assert check_seed(2**63 - 1) == 2**63 - 1


def test_more_outputs_than_two_classes_are_refused(tmp_path):
    # catches: check_classes without `outputs > 1`: out_features=3 on 2 classes was let through
    from hcl import TwoLayerReLU
    from hcl.datamodules import TensorDataModule

    g = torch.Generator().manual_seed(0)
    binary = TensorDataModule(train=(torch.randn(20, 2, generator=g), torch.arange(20) % 2), num_classes=2)
    with pytest.raises(ValueError, match=r"out_features=3\) cannot fit a data set of 2 classes"):
        _trainer(tmp_path).fit(TwoLayerReLU(in_features=2, hidden=3, out_features=3).double(), datamodule=binary)


def test_a_checkpoint_of_mixed_float_dtypes_leaves_the_modules_dtype():
    # catches: cast_to_checkpoint with `len(dtypes) >= 1` cast the module to an arbitrary one of several dtypes
    from hcl.checks import cast_to_checkpoint

    for order in ((torch.float16, torch.float64), (torch.float64, torch.float16)):
        module = nn.Linear(2, 2)
        checkpoint = {"state_dict": {"weight": torch.zeros(2, 2, dtype=order[0]),
                                     "bias": torch.zeros(2, dtype=order[1])}}
        cast_to_checkpoint(module, checkpoint)
        assert module.weight.dtype == torch.float32 and module.bias.dtype == torch.float32


def test_a_checkpoint_with_extra_weights_is_refused_in_one_line():
    # catches: check_resumable raised on missing keys only; a checkpoint with extra ones went on to Lightning's
    # strict load_state_dict (a RuntimeError with a traceback)
    from hcl import TwoLayerReLU
    from hcl.checks import check_resumable

    model = TwoLayerReLU(in_features=3, hidden=4)  # no output bias
    state = {**TwoLayerReLU(in_features=3, hidden=4, output_bias=True).state_dict()}
    with pytest.raises(ValueError, match=r"not of a TwoLayerReLU .*unexpected \['output_layer.bias'\]"):
        check_resumable({"state_dict": state}, model, "--ckpt_path")


def test_numpy_booleans_are_flags():
    # catches: check_bool without np.bool_: TwoLayerReLU(bias=np.True_) (a flag from numpy) refused
    from hcl import TwoLayerReLU

    model = TwoLayerReLU(in_features=3, hidden=4, bias=np.True_, output_bias=np.False_)
    assert model.hidden_layer.bias is not None and model.output_layer.bias is None


def test_a_spawned_error_is_judged_by_its_innermost_frame():
    # catches: spawned_user_error read the outermost frame (files[0]): a bug in a user's code called from hcl's
    # became a one-line usage error, its traceback lost; an hcl refusal called from a user's code kept a traceback
    from pathlib import Path

    from torch.multiprocessing.spawn import ProcessRaisedException

    import hcl.callbacks
    from hcl.cli_errors import spawned_user_error

    base = Path(hcl.callbacks.__file__).parent / "base.py"
    user = "/home/me/my_model.py"

    def trace(outer, inner):
        return ('\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n'
                f'  File "{outer}", line 1, in setup\n    x()\n  File "{inner}", line 2, in x\n    raise ValueError(\n'
                'ValueError: bad value\n')

    assert spawned_user_error(ProcessRaisedException(trace(base, user), 0, 1)) is None  # a user's bug
    error = spawned_user_error(ProcessRaisedException(trace(user, base), 0, 1))  # hcl's refusal
    assert type(error) is ValueError and str(error) == "bad value"


def test_a_misspelt_option_gets_a_suggestion():
    # catches: difflib's cutoff raised (0.6 → 0.95): "hiden" got no "did you mean 'hidden'"
    from hcl.cli_errors import _suggestion

    assert _suggestion("hcl.TwoLayerReLU", "hiden").startswith("; did you mean 'hidden'?")


# ------------------------------------------------------------------------------------------ callbacks/progress.py
def test_no_total_when_the_steps_cannot_be_estimated_and_max_steps_is_unset():
    # catches: total_steps without `total < 0`: max_steps=-1 (the fallback when the accumulation changes between
    # epochs) became a total of -1 steps
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from hcl.callbacks import StepProgressBar

    class Trainer:
        max_steps = -1

        @property
        def estimated_stepping_batches(self):
            raise MisconfigurationException("the accumulation changes between epochs")

    bar = StepProgressBar()
    bar._trainer = Trainer()
    assert bar.total_steps is None


def test_the_epoch_is_named_with_two_steps_per_epoch(tmp_path, capsys):
    # catches: `total_train_batches != 1` as `> 2`: a run of two batches an epoch never named its epoch
    from hcl import TwoLayerReLU
    from hcl.callbacks import StepProgressBar
    from hcl.datamodules import SyntheticRegression

    data = SyntheticRegression(n=10, d=3, dtype="float64", batch_size=5)  # 2 mini-batches per epoch
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=2, enable_progress_bar=True, callbacks=[StepProgressBar()])
    trainer.fit(TwoLayerReLU(in_features=3, hidden=4), datamodule=data)
    assert "Epoch 1" in capsys.readouterr().out


def test_a_tag_named_status_alone_is_no_monitors():
    # catches: _prefixes without `tag != "/<suffix>"`: a metric "/status" was read as a monitor of prefix ""
    from hcl.callbacks import StepProgressBar

    trainer = SimpleNamespace(callback_metrics={"/status": torch.tensor(3.0)}, progress_bar_metrics={}, loggers=[])
    assert StepProgressBar().get_metrics(trainer, None) == {}


def test_the_bar_ends_at_the_last_step_when_its_postfix_did_not_change(tmp_path):
    # catches: on_train_end redrew only on a new postfix: a run stopped between two refreshes ended its bar short
    from hcl.callbacks import StepProgressBar

    class Quiet(pl.LightningModule):  # logs nothing: the postfix stays empty
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                trainer.should_stop = True

    X = torch.randn(4, 2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=4)
    bar = StepProgressBar(refresh_rate=3)
    trainer = _trainer(tmp_path, max_steps=10, enable_progress_bar=True, callbacks=[bar, StopAt()])
    trainer.fit(Quiet(), loader)
    assert trainer.global_step == 4
    assert bar.train_progress_bar.n == 4


# ---------------------------------------------------------------------------------------------- callbacks/logs.py
def test_logged_values_reach_callback_metrics_in_float64():
    # catches: callback_metrics kept float32 copies: 0.1 read back as 0.10000000149…, not what the loggers have
    from hcl.callbacks.logs import log_scalars

    trainer = SimpleNamespace(loggers=[], is_global_zero=False, callback_metrics={})
    log_scalars(trainer, {"convex/optimum": 0.1}, step=3)
    assert trainer.callback_metrics["convex/optimum"].item() == 0.1


def test_a_resumed_run_writes_one_restart_marker_on_disk(tmp_path):
    # catches: mark_resumed_run without its once-per-trainer guard: the monitors' on_train_start and the model's
    # each wrote one (2 on disk by the first resumed step here): a marker more per monitor
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from hcl import TwoLayerReLU
    from hcl.callbacks import PatternMonitor
    from hcl.datamodules import SyntheticRegression

    def markers():
        # the run's own event files (its chart series runs get a marker of their own)
        return sum(1 for path in glob.glob(str(tmp_path / "tb" / "run" / "version_0" / "events.out.tfevents.*"))
                   for event in EventFileLoader(path).Load() if event.HasField("session_log"))

    class CountAtFirstStep(pl.Callback):
        seen = None

        def on_train_batch_start(self, trainer, *args):
            if self.seen is None:
                self.seen = markers()

    data = SyntheticRegression(n=10, d=3, dtype="float64")

    def run(steps, ckpt=None, callbacks=()):
        torch.manual_seed(0)
        trainer = _trainer(tmp_path, max_steps=steps, enable_checkpointing=True,
                           logger=TensorBoardLogger(str(tmp_path / "tb"), name="run", version=0),
                           callbacks=[PatternMonitor(), *callbacks])
        trainer.fit(TwoLayerReLU(in_features=3, hidden=4), datamodule=data, ckpt_path=ckpt)

    run(2)
    (checkpoint,) = glob.glob(str(tmp_path / "tb" / "run" / "version_0" / "checkpoints" / "*.ckpt"))
    counter = CountAtFirstStep()
    run(4, checkpoint, [counter])
    assert counter.seen == 1  # on disk when training resumes, and only one
    assert markers() == 1
