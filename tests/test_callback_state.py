"""The callbacks' step bookkeeping: each due step acted on once, and the state a checkpoint keeps and a resume finds."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from _events import read_scalars
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer.call import _call_callbacks_load_state_dict, _call_callbacks_on_load_checkpoint
from torch.utils.data import DataLoader, TensorDataset

from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, PatternMonitor


def test_a_step_is_acted_at_once_and_that_is_saved():
    """A repeated global step (gradient accumulation, a resume) is not acted at twice; last_step survives a
    checkpoint; two instances with different arguments have different checkpoint keys."""
    monitor = ConvexGapMonitor(every_n_steps=3)
    due = [monitor.due_step(SimpleNamespace(global_step=step)) for step in (0, 0, 1, 2, 3, 3, 5, 6)]
    assert due == [0, None, None, None, 3, None, None, 6]
    assert monitor.last_step == 6

    restored = ConvexGapMonitor(every_n_steps=3)
    restored.load_state_dict(monitor.state_dict())
    assert restored.due_step(SimpleNamespace(global_step=6)) is None
    assert restored.due_step(SimpleNamespace(global_step=9)) == 9

    instances = [ConvexGapMonitor(), ConvexGapMonitor(prefix="other"), ConvexGapMonitor(every_n_steps=2),
                 PatternMonitor(), PatternMonitor(layer="net.0")]
    assert len({cb.state_key for cb in instances}) == len(instances)
    assert ConvexGapMonitor().state_key == "ConvexGapMonitor{'prefix': 'convex', 'every_n_steps': 1}"


def test_a_new_period_at_a_resume_keeps_the_state():
    """A resume with another every_n_steps finds the state saved under the old period's key (the pattern history was
    dropped); another prefix's or layer's state is not taken."""
    def resume(callback, states):
        trainer = SimpleNamespace(callbacks=[callback], lightning_module=None, profiler=PassThroughProfiler())
        checkpoint = {"callbacks": states, "pytorch-lightning_version": "2.5.0"}
        _call_callbacks_on_load_checkpoint(trainer, checkpoint)
        _call_callbacks_load_state_dict(trainer, checkpoint)

    for old, new, other in (
        (PatternMonitor(every_n_steps=1), PatternMonitor(every_n_steps=2), PatternMonitor(layer="net.0")),
        (ConvexGapMonitor(every_n_steps=1), ConvexGapMonitor(every_n_steps=5), ConvexGapMonitor(prefix="other")),
    ):
        old.last_step = 7
        resume(new, {old.state_key: old.state_dict()})
        assert new.last_step == 7
        resume(other, {old.state_key: old.state_dict()})
        assert other.last_step != 7


def test_a_reset_forgets_the_step_whose_weights_were_replaced():
    monitor = ConvexGapMonitor(load_solution=True)
    assert monitor.changed_weights_at is None
    monitor.changed_weights_at = monitor.last_step = 10  # a solution loaded at step 10, then a resume from step 5
    monitor.reset()
    assert monitor.changed_weights_at is None


@pytest.mark.slow
def test_a_step_whose_training_step_raised_is_counted_when_the_same_trainer_fits_again(tmp_path):
    """The exception came before the hidden layer's forward: that step's patterns were never counted, so the next fit,
    which takes the step again, counts them."""
    class FailsOnce(TwoLayerReLU):
        failed = False

        def training_step(self, batch, batch_idx):
            if self.global_step == 2 and not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("once")
            return super().training_step(batch, batch_idx)

    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randn(30, 3, generator=g), torch.randn(30, 1, generator=g)), batch_size=30)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", callbacks=[PatternMonitor()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         log_every_n_steps=1)
    model = FailsOnce(in_features=3, hidden=6, lr=1e-12)
    with pytest.raises(RuntimeError, match="once"):
        trainer.fit(model, loader)
    trainer.fit(model, loader)
    steps = [step for step, _ in read_scalars(tmp_path)["patterns/unique"]]
    assert steps == [0, 1, 2, 3, 4]
