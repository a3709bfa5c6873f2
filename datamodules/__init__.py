"""Data modules: whole-tensor data served as one full batch or as mini-batches."""

from hcl.datamodules.base import TensorDataModule, shard, validate_split
from hcl.datamodules.cifar10 import CIFAR10
from hcl.datamodules.mnist import MNIST
from hcl.datamodules.synthetic import SyntheticRegression

__all__ = ["CIFAR10", "MNIST", "SyntheticRegression", "TensorDataModule", "shard", "validate_split"]
