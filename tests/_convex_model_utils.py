"""Helpers of the ConvexReLU tests (test_convex_model.py, test_convex_model_runs.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

LAM = 0.02


class Recorder(pl.Callback):
    """The logged training objective of every step."""

    def __init__(self) -> None:
        self.objectives: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.objectives.append(float(trainer.callback_metrics["train/objective"]))


def _data(n: int = 30, d: int = 3, c: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.sin(X @ torch.randn(d, c, generator=g, dtype=torch.float64)) + 0.1 * X[:, :1]
    return X, Y


def _trainer(tmp_path, max_steps: int, callbacks=(), **overrides) -> pl.Trainer:
    arguments = dict(
        max_steps=max_steps, accelerator="cpu", devices=1, precision="64-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks), default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    arguments.update(overrides)
    return pl.Trainer(**arguments)
