"""Helpers shared by the data modules' tests: the real MNIST's location and a stand-in trainer."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The shared data folder sits beside the checkout; HCL_MNIST_ROOT points elsewhere.
_MNIST_ROOTS = [os.environ.get("HCL_MNIST_ROOT", ""), Path(__file__).resolve().parents[2] / "shared" / "data"]
REAL_MNIST_ROOT = next(
    (
        Path(root)
        for root in _MNIST_ROOTS
        if root and all((Path(root) / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES)
    ),
    None,
)


def _attach(dm: pl.LightningDataModule, device: str = "cpu", world_size: int = 1, rank: int = 0) -> None:
    """Attach the parts of a trainer the data module reads."""
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)), world_size=world_size, global_rank=rank
    )


def _all_splits(dm: pl.LightningDataModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    dm.setup("fit")
    return dict(dm._splits)


def _pair(n=4, d=3, c=1, dtype=torch.float32):
    """A random (inputs, targets) pair."""
    return torch.randn(n, d, dtype=dtype), torch.randn(n, c, dtype=dtype)
