r"""
Torchvision image data modules
==============================

What MNIST and CIFAR-10 share: a torchvision classification dataset loaded once as flat tensors (a
:class:`~hcl.datamodules.base.TensorDataModule`), a class subset, a validation split, standardisation, and
downloading only in ``prepare_data`` and only when asked.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from hcl.checks import as_int, check_bool, is_int
from hcl.datamodules.base import TensorDataModule, resolve_dtype


class _TorchvisionClassification(TensorDataModule):
    """Shared loading of a torchvision image-classification dataset as flat tensors.

    Subclasses set the class attributes below and implement :meth:`_images`.
    """

    _dataset_class: type  # the torchvision dataset
    _expected_files: tuple[str, ...]  # relative to root, for the missing-file message
    _name: str
    _image_shape: tuple[int, int, int]  # (channels, height, width)
    _total_classes: int = 10
    _mean: tuple[float, ...]
    _std: tuple[float, ...]
    _not_found: str = "not found"  # what torchvision checks, for the error message

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        subset: int | None = None,
        random_subset: bool = True,
        classes: list[int] | None = None,
        one_hot: bool = True,
        normalize: bool = True,
        val_size: int = 0,
        dtype: str = "float32",
        batch_size: int | None = None,
        shard: bool = True,
        seed: int = 0,
    ) -> None:
        subset, val_size = as_int(subset), as_int(val_size)
        download, random_subset = check_bool(download, "download"), check_bool(random_subset, "random_subset")
        one_hot, normalize = check_bool(one_hot, "one_hot"), check_bool(normalize, "normalize")
        if subset is not None and (not is_int(subset) or subset < 1):
            raise ValueError(f"subset must be None (whole training set) or a positive integer, got {subset!r}")
        if not is_int(val_size) or val_size < 0:
            raise ValueError(f"val_size must be a non-negative integer, got {val_size!r}")
        if classes is not None:
            classes = [as_int(c) for c in classes]
            if len(classes) < 2:
                raise ValueError(f"classes must list at least two classes, got {classes}")
            if any(not is_int(c) or not 0 <= c < self._total_classes for c in classes):
                raise ValueError(f"classes must be integers in [0, {self._total_classes}), got {classes}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes must not repeat a class, got {classes}")
        self._dtype = resolve_dtype(dtype)
        num_classes = self._total_classes if classes is None else len(classes)
        super().__init__(num_classes=num_classes, batch_size=batch_size, shard=shard, seed=seed)
        self.root = os.fspath(root)
        self.download = download
        self.subset = subset
        self.random_subset = random_subset
        self.classes = classes
        self.one_hot = one_hot
        self.normalize = normalize
        self.val_size = val_size

    @property
    def in_features(self) -> int:
        channels, height, width = self._image_shape
        return channels * height * width

    def _images(self, dataset: Any) -> Tensor:
        """The dataset's images as a uint8 tensor ``(n, channels, height, width)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        """Download the dataset with torchvision when ``download=True`` (once, on one process).

        Raises:
            ConnectionError: the download failed (no network, a refused or broken transfer); the folders it created
                are removed again.
        """
        if not self.download:
            return
        root = os.path.abspath(self.root)
        existed = {path for path, _, _ in os.walk(root)}
        try:
            # torchvision's download fetches both splits; opening the small test split triggers it.
            self._dataset_class(self.root, train=False, download=True)
        except (OSError, RuntimeError) as error:
            for path, _, _ in sorted(os.walk(root), reverse=True):  # the empty folders it left, deepest first
                if path not in existed and not os.listdir(path):
                    os.rmdir(path)
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ConnectionError(
                f"could not download {self._name} into {root!r} ({reason}); without a network, put its files there "
                "in torchvision's layout and leave download off"
            ) from error

    def _open(self, train: bool) -> Any:
        try:
            return self._dataset_class(self.root, train=train, download=False)
        except (RuntimeError, ValueError, AssertionError, EOFError) as error:
            root = os.path.abspath(self.root)
            if "not found" not in str(error):  # a truncated or damaged file: torchvision's message names no file
                reason = str(error) or type(error).__name__
                # torchvision downloads only files that are missing: the damaged ones must go first
                raise RuntimeError(
                    f"could not read {self._name} under root {root!r} ({reason}); its files may be truncated or "
                    "damaged: delete them and download again (download=True), or replace them"
                ) from error
            files = "\n  ".join(os.path.join(root, name) + ("" if os.path.exists(os.path.join(root, name)) else
                                                              " (missing)") for name in self._expected_files)
            raise FileNotFoundError(
                f"{self._name} {self._not_found} under root {root!r}; "
                f"expected the files:\n  {files}\n"
                "Pass download=True (--data.download=true) to download it, or point root at the folder that holds "
                f"{self._expected_files[0].split(os.sep)[0]}/."
            ) from error

    def _load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        train, test = self._open(train=True), self._open(train=False)
        images, labels = self._select_classes(self._images(train), self._labels(train, "training"))
        test_images, test_labels = self._select_classes(self._images(test), self._labels(test, "test"))

        n = labels.shape[0]
        needed = self.val_size + (self.subset or 1)
        if needed > n:
            raise ValueError(
                f"{self._name} has {n} training points (after the class selection) but val_size="
                f"{self.val_size} and subset={self.subset} need {needed}"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_index, pool = order[: self.val_size].sort().values, order[self.val_size :]
        if self.subset is not None:
            pool = pool[: self.subset] if self.random_subset else pool.sort().values[: self.subset]
        train_index = pool.sort().values

        splits = {
            "train": self._tensors(images[train_index], labels[train_index]),
            "test": self._tensors(test_images, test_labels),
        }
        if self.val_size > 0:
            splits["val"] = self._tensors(images[val_index], labels[val_index])
        return splits

    def _labels(self, dataset: Any, split: str) -> Tensor:
        """The class indices, checked here: a damaged label file otherwise fails later in a torch call."""
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self._total_classes):
            raise RuntimeError(
                f"{self._name}'s {split} labels under root {os.path.abspath(self.root)!r} hold classes outside "
                f"[0, {self._total_classes}) (min {int(labels.min())}, max {int(labels.max())}); the label file may be "
                "damaged: delete it and download again (download=True), or replace it")
        return labels

    def _select_classes(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.classes is None:
            return images, labels
        keep = torch.isin(labels, torch.tensor(self.classes))
        remap = torch.full((self._total_classes,), -1, dtype=torch.int64)
        remap[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        return images[keep], remap[labels[keep]]

    def _tensors(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        inputs = images.to(self._dtype) / 255.0
        if self.normalize:
            mean = torch.tensor(self._mean, dtype=self._dtype).view(1, -1, 1, 1)
            std = torch.tensor(self._std, dtype=self._dtype).view(1, -1, 1, 1)
            inputs = (inputs - mean) / std
        inputs = inputs.reshape(inputs.shape[0], -1)
        if not self.one_hot:
            return inputs, labels
        return inputs, torch.nn.functional.one_hot(labels, self.num_classes).to(self._dtype)


