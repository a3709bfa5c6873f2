"""Suite-wide settings and the trainer every callback test runs.

Tiny tensors run fastest on one thread (two cores are shared by the whole suite). Tests that take more than about a
second carry the ``slow`` marker, and so do the parameters of a grid beyond a part that covers it (every case once,
or every pair of settings: ``tests/_params.py``): ``python -m pytest -m "not slow" -n 2`` runs the rest in under a
minute, one test process per core (pytest-xdist; each test on one thread).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def quiet_trainer(root: str | Path, callbacks: list, max_steps: int = 12, logger: bool = True, **overrides: Any):
    """A one-CPU float64 trainer that logs every step to TensorBoard in ``root/run`` and nothing else.

    No checkpoints, progress bar or model summary; ``overrides`` replace any of the trainer's arguments.
    """
    import lightning.pytorch as pl  # here, not at the top: the engine's tests never load Lightning
    from lightning.pytorch.loggers import TensorBoardLogger

    arguments = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, precision="64-true", log_every_n_steps=1,
        logger=TensorBoardLogger(str(root), name="run") if logger else False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
    )
    arguments.update(overrides)
    return pl.Trainer(**arguments)


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., Any]:
    """``make_trainer(callbacks, max_steps=12, root=tmp_path, logger=True, **overrides)``: a :func:`quiet_trainer`."""

    def make(callbacks: list, max_steps: int = 12, root: str | Path | None = None, logger: bool = True,
             **overrides: Any):
        return quiet_trainer(tmp_path if root is None else root, callbacks, max_steps, logger, **overrides)

    return make
