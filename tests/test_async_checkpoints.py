"""The asynchronous monitor and checkpoints: what a checkpoint records has been logged, and the warning about
checkpoints that wait for the solves counts steps as Lightning saves them."""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from _async_utils import slow_solve, small_run, steps_of
from lightning.pytorch.callbacks import ModelCheckpoint

import hcl.callbacks.solve_queue as solve_queue_module
from hcl.callbacks import ConvexGapMonitor
from hcl.callbacks.monitor_options import warn_if_checkpoints_wait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def run(make_trainer):
    return small_run(make_trainer)


def test_a_checkpoint_waits_for_the_solves_in_flight(tmp_path, monkeypatch, run):
    """Whatever a checkpoint records as done has been logged: a resumed run neither repeats nor misses a step."""

    class Inspect(pl.Callback):
        seen: list[tuple[int, int]] = []

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            state = checkpoint["callbacks"][monitor.state_key]
            self.seen.append((state["last_step"], len(monitor._queue)))

    monkeypatch.setattr(solve_queue_module, "solve", slow_solve)
    monitor = ConvexGapMonitor(asynchronous=True, max_pending=100, worker="thread")
    with pytest.warns(UserWarning, match="training waits for nearly every solve"):  # said, since it costs
        s = run(tmp_path, [monitor, Inspect()], max_steps=5, checkpoint=True)
    # One checkpoint per full-batch epoch; each was written with an empty queue, after its steps were logged.
    assert Inspect.seen == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]
    assert steps_of(s, "convex/status") == list(range(5))


def test_checkpoints_saved_less_often_than_the_solves_are_not_warned_about(tmp_path, monkeypatch, run):
    monkeypatch.setattr(solve_queue_module, "solve", slow_solve)
    monitor = ConvexGapMonitor(every_n_steps=2, asynchronous=True, max_pending=100, worker="thread")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path, [monitor, ModelCheckpoint(every_n_train_steps=3, every_n_epochs=None)], max_steps=4,
            checkpoint=True)
    assert not [w for w in caught if "waits for nearly every solve" in str(w.message)]


@pytest.mark.parametrize("batches, accumulate, check_val, every_n_steps, fast_dev_run, warned", [
    (1, 1, 1, 1, 0, True),  # full batch, a checkpoint each epoch: each step
    (1, 1, 1, 1, 3, False),  # Lightning saves no checkpoint in a fast_dev_run
    (1, 1, 5, 1, 0, False),  # saved after validation, every fifth epoch
    (4, 3, 1, 1, 0, False),  # two steps an epoch (the last accumulation is partial)
    (4, 3, 1, 2, 0, True),
])
def test_the_checkpoint_warning_counts_steps_as_lightning_saves(batches, accumulate, check_val, every_n_steps,
                                                                fast_dev_run, warned):
    trainer = SimpleNamespace(num_training_batches=batches, accumulate_grad_batches=accumulate,
                              check_val_every_n_epoch=check_val, num_val_batches=[2], val_check_interval=1.0,
                              fast_dev_run=fast_dev_run, checkpoint_callbacks=[ModelCheckpoint()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_checkpoints_wait(trainer, "ConvexGapMonitor", every_n_steps)
    assert bool([w for w in caught if "waits for nearly every solve" in str(w.message)]) == warned


def test_the_async_monitor_is_picklable_before_and_after_training(tmp_path, run):
    monitor = ConvexGapMonitor(asynchronous=True, worker="thread")
    pickle.dumps(monitor)  # ddp_spawn pickles the callbacks before training
    run(tmp_path, [monitor], max_steps=2)
    pickle.dumps(monitor)
