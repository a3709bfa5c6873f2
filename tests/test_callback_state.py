"""The callbacks' step bookkeeping: each due step acted on once, and the state a checkpoint keeps and a resume finds."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.trainer.call import _call_callbacks_load_state_dict, _call_callbacks_on_load_checkpoint

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
