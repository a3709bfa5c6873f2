r"""
CIFAR-10
========

CIFAR-10 from torchvision's python batches, flattened channel-first to ``(n, 3072)`` tensors.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import Tensor

from hcl.datamodules.images import _TorchvisionClassification


class CIFAR10(_TorchvisionClassification):
    r"""CIFAR-10 as whole tensors: inputs ``(n, 3072)``, targets one-hot ``(n, k)`` or class indices ``(n,)``.

    The batches are read with :class:`torchvision.datasets.CIFAR10` from ``root/cifar-10-batches-py/``
    (``data_batch_1`` … ``data_batch_5``, ``test_batch``, ``batches.meta``; torchvision checks their md5).
    Downloading happens only in :meth:`prepare_data` and only with ``download=True``; :meth:`setup` never
    touches the network.

    Each image is flattened channel by channel (all red pixels, then green, then blue), the layout of the
    original files. Pixels are scaled to ``[0, 1]`` and, with ``normalize``, standardised per channel with
    the usual means (0.4914, 0.4822, 0.4465) and standard deviations (0.2470, 0.2435, 0.2616). The test
    split is the official test set; the validation split is held out of the training set.

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        download: download the archive in :meth:`prepare_data` if the batches are missing.
        subset: keep only this many training points (after holding out the validation points).
        random_subset: take the subset at random (seeded), or the first points in file order if ``False``.
        classes: keep only these classes, relabelled ``0 … k-1`` in the order given.
        one_hot: float one-hot targets for the squared loss; ``False`` gives int64 class indices for the
            cross-entropy.
        normalize: standardise the pixels per channel after scaling them to ``[0, 1]``.
        val_size: number of training points held out (seeded) as the validation set; 0 means none.
        dtype: ``"float32"`` or ``"float64"`` for inputs and one-hot targets.
        batch_size: ``None`` for full batch, else the mini-batch size.
        shard: shard the training set by rank under DDP.
        seed: seed of the validation split, the random subset and the mini-batch order.

    Raises:
        ValueError: on bad arguments, or (in ``setup``) when ``val_size`` and ``subset`` ask for more points
            than there are.
        FileNotFoundError: in ``setup``, when the batches are missing or corrupted.

    Example::

        dm = CIFAR10(root="data", download=True, subset=5000, batch_size=256)
    """

    _dataset_class = torchvision.datasets.CIFAR10
    _expected_files = tuple(
        os.path.join(torchvision.datasets.CIFAR10.base_folder, name)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    _name = "CIFAR-10"
    _image_shape = (3, 32, 32)
    _mean = (0.4914, 0.4822, 0.4465)
    _std = (0.2470, 0.2435, 0.2616)
    _not_found = "not found or corrupted (torchvision checks the files' md5 sums)"

    def _images(self, dataset: Any) -> Tensor:
        # torchvision keeps the batches as a (n, 32, 32, 3) uint8 array.
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
