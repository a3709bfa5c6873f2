"""Helpers shared by hcl's callbacks: where the data comes from, when to act, how values are logged."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def check_every_n_steps(every_n_steps: int) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return every_n_steps


def check_probe(probe: Tensor | None, name: str = "probe") -> Tensor | None:
    """Validate a user-given probe tensor early (in ``__init__``)."""
    if probe is None:
        return None
    if not isinstance(probe, Tensor):
        probe = torch.as_tensor(probe)
    if probe.ndim == 0 or probe.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    if probe.is_floating_point() and not torch.isfinite(probe).all():
        raise ValueError(f"{name} contains NaN or inf")
    return probe


def is_due(step: int, every_n_steps: int, last_step: int) -> bool:
    """Act at steps ``0, k, 2k, …``, once each (a repeated ``global_step`` — accumulation, resume — is skipped)."""
    return step > last_step and step % every_n_steps == 0


def training_data(
    trainer: pl.Trainer, probe: Tensor | None = None, target: Tensor | None = None, max_samples: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The inputs (and targets) a callback evaluates the network on.

    The ``probe``/``target`` the user gave, else the data module's full training set (``train_tensors()``, as in
    :mod:`hcl.datamodules`), else one pass over the training dataloader. ``max_samples`` keeps the first ones.

    Raises:
        ValueError: when no data can be found or it is empty / not finite.
    """
    if probe is not None:
        X, Y = probe, target
    else:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            X, Y = datamodule.train_tensors()
        else:
            X, Y = _collect_dataloader(trainer)
    if max_samples is not None:
        X = X[:max_samples]
        Y = None if Y is None else Y[:max_samples]
    if X.shape[0] == 0:
        raise ValueError("the data to evaluate the network on is empty")
    if X.is_floating_point() and not torch.isfinite(X).all():
        raise ValueError("the data to evaluate the network on contains NaN or inf")
    if Y is not None and Y.shape[0] != X.shape[0]:
        raise ValueError(f"the targets have {Y.shape[0]} rows but the inputs {X.shape[0]}")
    return X, Y


def _collect_dataloader(trainer: pl.Trainer) -> tuple[Tensor, Tensor | None]:
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if loader is None:
        raise ValueError("no training data found: pass probe= (and target=) to the callback")
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            xs.append(batch[0])
            ys.append(batch[1])
        elif isinstance(batch, Tensor):
            xs.append(batch)
        else:
            raise ValueError(
                f"cannot read inputs from a training batch of type {type(batch).__name__}: pass probe= to the callback"
            )
    if not xs:
        raise ValueError("the training dataloader is empty")
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger (rank zero), and expose them in ``callback_metrics``."""
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)
    for k, v in clean.items():
        trainer.callback_metrics[k] = torch.tensor(v)


def warn_if_no_logger(trainer: pl.Trainer, owner: str) -> bool:
    """Warn once that nothing will be recorded when the trainer has no logger; True if a logger exists."""
    if trainer.loggers:
        return True
    rank_zero_warn(f"{owner}: the trainer has no logger, so its values are only kept in trainer.callback_metrics")
    return False


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
