r"""
MNIST
=====

The MNIST digits from torchvision's raw IDX files, flattened to ``(n, 784)`` tensors.
"""

from __future__ import annotations

import os
from typing import Any

import torchvision
from torch import Tensor

from hcl.datamodules.images import _TorchvisionClassification


class MNIST(_TorchvisionClassification):
    r"""MNIST as whole tensors: inputs ``(n, 784)``, targets one-hot ``(n, k)`` or class indices ``(n,)``.

    The files are read with :class:`torchvision.datasets.MNIST` from ``root/MNIST/raw/`` (the four
    uncompressed IDX files). Downloading happens only in :meth:`prepare_data` and only with
    ``download=True``; :meth:`setup` never touches the network.

    Pixels are scaled to ``[0, 1]`` and, with ``normalize``, standardised with MNIST's usual mean 0.1307
    and standard deviation 0.3081. The test split is the official test set; the validation split is held
    out of the training set.

    Args:
        root: folder holding ``MNIST/raw/``.
        download: download the files in :meth:`prepare_data` if they are missing.
        subset: keep only this many training points (after holding out the validation points).
        random_subset: take the subset at random (seeded), or the first points in file order if ``False``.
        classes: keep only these digits, relabelled ``0 … k-1`` in the order given.
        one_hot: float one-hot targets for the squared loss; ``False`` gives int64 class indices for the
            cross-entropy.
        normalize: standardise the pixels after scaling them to ``[0, 1]``.
        val_size: number of training points held out (seeded) as the validation set; 0 means none.
        dtype: ``"float32"`` or ``"float64"`` for inputs and one-hot targets.
        batch_size: ``None`` for full batch, else the mini-batch size.
        shard: shard the training set by rank under DDP.
        seed: seed of the validation split, the random subset and the mini-batch order.

    Raises:
        ValueError: on bad arguments, or (in ``setup``) when ``val_size`` and ``subset`` ask for more points
            than there are.
        FileNotFoundError: in ``setup``, when the files are missing.

    Example::

        dm = MNIST(root="data", subset=1000, classes=[0, 1])   # 1000 zeros and ones, full batch
    """

    _dataset_class = torchvision.datasets.MNIST
    _expected_files = tuple(
        os.path.join("MNIST", "raw", f"{split}-{kind}-ubyte")
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )
    _name = "MNIST"
    _image_shape = (1, 28, 28)
    _mean = (0.1307,)
    _std = (0.3081,)

    def _images(self, dataset: Any) -> Tensor:
        return dataset.data.unsqueeze(1)
