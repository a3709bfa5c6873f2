"""How the callbacks write: scalars to every logger, flushes, and the restart marker of a resumed run."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn

from hcl import dashboard


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int, absent: Iterable[str] = (),
                loggers: Iterable[Logger] | None = None) -> None:
    """Write ``metrics`` at ``step`` to every logger (or to ``loggers``; rank zero), and expose them in
    ``callback_metrics``.

    The values charted with others are also written to their series runs (:func:`hcl.dashboard.mirror_series`).
    ``absent``: tags this step proves nothing about when not in ``metrics`` (a bound its solve did not certify); an
    earlier step's value of them leaves ``callback_metrics``, where ``ModelCheckpoint`` or ``EarlyStopping`` would read
    it as this step's.
    """
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers if loggers is None else loggers:
        logger.log_metrics(clean, step=step)
    if trainer.is_global_zero:
        dashboard.mirror_series(trainer, clean, step)
    for k in absent:
        if k not in clean:
            trainer.callback_metrics.pop(k, None)
    for k, v in clean.items():
        trainer.callback_metrics[k] = torch.tensor(v, dtype=torch.float64)  # as the loggers have it


def flush_loggers(trainer: pl.Trainer) -> None:
    """Write what the loggers and the series runs hold to disk (rank zero); a logger that fails to save only warns."""
    if not trainer.is_global_zero:
        return
    try:
        dashboard.flush_series(trainer)
    except Exception as err:  # noqa: BLE001 - flushing is best effort, it must not mask the real error
        warnings.warn(f"could not flush the chart series: {err}", stacklevel=2)
    for logger in trainer.loggers:
        try:
            logger.save()
        except Exception as err:  # noqa: BLE001 - flushing is best effort, it must not mask the real error
            warnings.warn(f"could not flush the logger {type(logger).__name__}: {err}", stacklevel=2)


_RESTART_MARKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark_resumed_run(trainer: pl.Trainer) -> bool:
    """After a resume, tell TensorBoard that the run restarts at ``trainer.global_step``.

    A run that continues in the same TensorBoard directory after a crash re-runs the steps between its checkpoint and
    the crash. The restart marker (TensorBoard's ``SessionLog.START``, what ``SummaryWriter(purge_step=...)`` writes)
    makes TensorBoard drop the points the interrupted run logged at or after that step, so every series has each
    step exactly once. Written once per trainer, on rank zero, only when training resumes from a checkpoint (which
    may be of step 0: one written at an exception in the first step; a second ``fit`` of the same trainer continues
    past its last step and re-logs nothing, so it writes none: a marker would drop the values logged at that step in
    between, a ``trainer.test`` for one), to the TensorBoard loggers and to the series runs (:mod:`hcl.dashboard`).
    Returns True when written.
    """
    step = trainer.global_step
    if trainer.ckpt_path is None or not trainer.is_global_zero or _RESTART_MARKED.get(trainer) == step:
        return False
    _RESTART_MARKED[trainer] = step
    dashboard.mark_series_restart(trainer, step)
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            file_writer = logger.experiment._get_file_writer()
            file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            file_writer.flush()
            written = True
    return written


def warn_if_no_logger(trainer: pl.Trainer, owner: str) -> bool:
    """Warn once that nothing will be recorded when the trainer has no logger; True if a logger exists."""
    if trainer.loggers:
        return True

    rank_zero_warn(f"{owner}: the trainer has no logger, so its values are only kept in trainer.callback_metrics")
    return False

