r"""
Tensor data modules
===================

Data held as whole tensors in memory, served either as one full batch per step (the convex reformulation
and plain gradient descent see every point at once) or as shuffled mini-batches.

The training set is moved once to ``trainer.strategy.root_device`` in :meth:`TensorDataModule.setup`, so a
full-batch step costs no host-to-device copy. Under DDP each rank trains on ``X[rank::world_size]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from hcl.checks import as_int, check_bool, check_seed, is_int

# A data module without a validation or test split returns [] (no loop) on purpose: Lightning's "zero length" warning
# about that list was printed at the start of every run
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")

_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _FullBatch(Dataset):
    """A length-1 dataset whose only item is the whole ``(inputs, targets)`` pair: one step is one epoch."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if index != 0:
            raise IndexError(f"a full-batch dataset has the single index 0, got {index}")
        return self.inputs, self.targets


class _EpochSampler(DistributedSampler):
    """The shuffling sampler of a training loader, which can take up a checkpoint's epoch where it stopped."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0
        self.offset = 0  # the run's epoch less Lightning's count of it (see _ResumableLoader)
        self.counted = 0  # the epoch Lightning last set
        self.resume: tuple | None = None  # a checkpoint's epoch, batches, ... (_take_up), read at the next pass

    def set_epoch(self, epoch: int) -> None:
        self.counted = epoch
        super().set_epoch(epoch + self.offset)

    def __iter__(self):
        if self.resume is not None:
            self._take_up(*self.resume)
            self.resume = None
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def _take_up(self, epoch: int, batches: int, done: Callable[[], int], per_epoch: int, batch_size: int) -> None:
        """The first pass after a resume: Lightning takes the checkpoint's epoch up again where it counts batches of it
        done (mid-epoch; at its end with no validation), else starts the next one (a finished epoch validated, or
        one ended by its last batch's checkpoint); which one it counts it as depends on where the checkpoint was
        written, so the order is the epoch's own and every later one keeps that offset."""
        taken = done()
        if taken:
            self.skip = min(taken, per_epoch) * batch_size
        else:
            epoch += batches >= per_epoch
        self.offset = epoch - self.counted
        super().set_epoch(epoch)


class _ResumableLoader(DataLoader):
    """A training loader Lightning resumes inside an epoch (``state_dict``/``load_state_dict``): without one it replays
    the epoch from its first batch, and the resumed run trains on other batches than the uninterrupted one.

    Its state is the number of batches training took in the epoch (``taken``, from the trainer: the loader's own
    iterator runs a batch ahead) and the epoch whose order it was drawing; the sampler takes them up at its next pass
    (:meth:`_EpochSampler._take_up`).
    """

    def __init__(self, *args, taken, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.taken = taken

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.taken(), "epoch": self.sampler.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" in state:
            self.sampler.resume = (int(state["epoch"]), int(state["batches"]), self.taken, len(self), self.batch_size)
        else:  # an earlier checkpoint's state: an epoch it finished had nothing to skip
            self.sampler.skip = int(state.get("batches", 0)) % len(self) * self.batch_size


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map ``"float32"`` / ``"float64"`` to the torch dtype, with a clear error for anything else."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def validate_split(inputs: Tensor, targets: Tensor, split: str, num_classes: int | None = None) -> None:
    """Check one split and raise an error that names the problem and the split.

    Inputs must be a floating ``(n, d)`` tensor. Targets are either floating ``(n, c)`` (regression, or
    one-hot classes when ``num_classes`` is given, then ``c == num_classes``) or, for classification only,
    integer class indices of shape ``(n,)`` in ``[0, num_classes)``.

    Args:
        inputs: the split's inputs.
        targets: the split's targets.
        split: ``"train"``, ``"val"`` or ``"test"`` (used in the messages).
        num_classes: number of classes for classification, ``None`` for regression.

    Raises:
        TypeError: if either is not a tensor or has the wrong kind of dtype.
        ValueError: on empty data, wrong shapes, different numbers of points, NaN or inf values, or class
            indices out of range.
    """
    name = _SPLIT_NAMES.get(split, split)
    for what, tensor in (("inputs", inputs), ("targets", targets)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} {what} must be a torch.Tensor, got {type(tensor).__name__}")
    if inputs.ndim != 2:
        raise ValueError(f"{name} inputs must be a 2-D tensor (n, d), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"{name} inputs must be floating point, got {inputs.dtype}")
    if inputs.shape[0] == 0 or targets.numel() == 0:
        raise ValueError(
            f"{name} set is empty: inputs of shape {tuple(inputs.shape)}, targets of shape {tuple(targets.shape)}"
        )
    if inputs.shape[1] == 0:
        raise ValueError(f"{name} inputs have no features: shape {tuple(inputs.shape)}")

    class_indices = not targets.is_floating_point()
    if class_indices:
        if num_classes is None:
            raise TypeError(f"{name} targets must be floating point for regression, got {targets.dtype}")
        if targets.ndim != 1:
            raise ValueError(f"{name} targets holding class indices must be 1-D (n,), got shape {tuple(targets.shape)}")
    else:
        if targets.ndim != 2:
            raise ValueError(f"{name} targets must be a 2-D tensor (n, c), got shape {tuple(targets.shape)}")
        if num_classes is not None and targets.shape[1] != num_classes:
            raise ValueError(f"{name} targets have {targets.shape[1]} columns but there are {num_classes} classes")
        if targets.dtype != inputs.dtype:
            raise TypeError(f"{name} targets have dtype {targets.dtype} but the inputs have {inputs.dtype}")
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{name} inputs and targets hold different numbers of points: "
            f"{inputs.shape[0]} inputs vs {targets.shape[0]} targets"
        )

    for what, tensor in (("inputs", inputs), ("targets", targets)):
        if not tensor.is_floating_point():
            continue
        if torch.isnan(tensor).any():
            raise ValueError(f"{name} {what} contain NaN")
        if torch.isinf(tensor).any():
            raise ValueError(f"{name} {what} contain inf")
    if class_indices and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"{name} targets hold class indices outside [0, {num_classes}): "
            f"min {int(targets.min())}, max {int(targets.max())}"
        )


def shard(inputs: Tensor, targets: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """The points ``rank, rank + world_size, …`` of a split: disjoint across ranks and covering every point.

    Raises:
        ValueError: on a rank outside ``[0, world_size)`` or when a rank would get no point.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    if inputs.shape[0] < world_size:
        raise ValueError(
            f"cannot shard {inputs.shape[0]} training points over {world_size} ranks: some rank would get "
            "no point (pass shard=False to give every rank the whole set)"
        )
    return inputs[rank::world_size].contiguous(), targets[rank::world_size].contiguous()


def even_batch_sizes(n: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Batch sizes for the larger and the smaller shards of ``n`` points over ``world_size`` ranks (sizes
    ``⌈n/w⌉`` and ``⌊n/w⌋``) that give every rank the same number of batches, as close to ``batch_size`` (and not above
    it) as can be: the ranks take every step together (a rank out of batches left the others waiting in their
    collectives until the connection closed). The larger shards keep ``batch_size`` where the smaller ones can match
    them; else both take the largest size that does not divide the smaller shard's.

    Raises:
        ValueError: no batch size does (``batch_size`` 1 or 2, say, with shards of different sizes).
    """
    large, small = -(-n // world_size), n // world_size
    steps = -(-large // batch_size)
    if -(-small // batch_size) == steps:
        return batch_size, batch_size
    fitting = (small - 1) // (steps - 1)  # steps > 1 here: the smaller shard's largest size that still takes `steps`
    if fitting >= 1 and -(-small // fitting) == steps:
        return batch_size, fitting
    common = next((b for b in range(batch_size - 1, 1, -1) if small % b), None)  # then ⌈small/b⌉ = ⌈large/b⌉
    if common is None:
        raise ValueError(f"batch_size={batch_size} with {n} training points over {world_size} ranks: the shards of "
                         f"{large} and {small} points cannot take the same number of steps; use a larger batch_size, "
                         f"a number of points divisible by {world_size}, or shard=False")
    return common, common


class TensorDataModule(pl.LightningDataModule):
    r"""In-memory tensors served as one full batch or as shuffled mini-batches.

    Use it directly with tensors, or subclass it and override :meth:`_load_splits` together with
    ``in_features`` / ``out_features`` (and ``num_classes`` for classification), which must be known
    right after ``__init__`` so that a CLI can link them into the model.

    Args:
        train: ``(inputs, targets)`` of the training set; required unless a subclass loads its own data.
        val: optional ``(inputs, targets)`` of a validation set.
        test: optional ``(inputs, targets)`` of a test set.
        num_classes: number of classes for classification; ``None`` (default) means regression.
        batch_size: ``None`` (default) for full-batch training, where one step is one epoch; an integer for
            shuffled mini-batches (reshuffled every epoch, deterministically from ``seed`` and the epoch).
        shard: under DDP, give rank ``r`` of ``w`` the training points ``r, r + w, …`` (default). With
            ``False`` every rank trains on the whole set.
        seed: seed of every random choice the module makes (data generation and splits in subclasses,
            mini-batch order).

    Raises:
        ValueError: on a non-positive ``batch_size`` or ``num_classes``, or a missing training set.
        TypeError: on arguments of the wrong type.

    Example::

        X = torch.randn(100, 10)
        dm = TensorDataModule(train=(X, X @ torch.ones(10, 1)))
        trainer.fit(model, datamodule=dm)    # one step = one full-batch epoch
    """

    def __init__(
        self,
        train: tuple[Tensor, Tensor] | None = None,
        val: tuple[Tensor, Tensor] | None = None,
        test: tuple[Tensor, Tensor] | None = None,
        num_classes: int | None = None,
        batch_size: int | None = None,
        shard: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        batch_size, num_classes, seed = as_int(batch_size), as_int(num_classes), as_int(seed)
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise ValueError(f"batch_size must be None (full batch) or a positive integer, got {batch_size!r}")
        if num_classes is not None and (not is_int(num_classes) or num_classes < 1):
            raise ValueError(f"num_classes must be None (regression) or a positive integer, got {num_classes!r}")
        shard = check_bool(shard, "shard")
        seed = check_seed(seed)
        given = {"train": train, "val": val, "test": test}
        for split, pair in given.items():
            if pair is not None and (
                not isinstance(pair, Sequence) or len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair)
            ):
                raise TypeError(f"{split} must be an (inputs, targets) pair of tensors, got {pair!r:.80}")
        # A subclass loads its own data; a direct use needs at least a training set.
        if type(self)._load_splits is TensorDataModule._load_splits and train is None:
            raise ValueError("TensorDataModule needs a training set: pass train=(inputs, targets)")
        self._given = {split: tuple(pair) for split, pair in given.items() if pair is not None}
        self._num_classes = num_classes
        self.batch_size = batch_size
        self.shard = shard
        self.seed = seed
        self._splits: dict[str, tuple[Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------ description (known before setup)
    @property
    def in_features(self) -> int:
        """Number of input features ``d`` (bias column included when the data carry one)."""
        return self._given["train"][0].shape[-1]

    @property
    def out_features(self) -> int:
        """Number of outputs: the number of classes, or the number of target columns for regression."""
        if self.num_classes is not None:
            return self.num_classes
        targets = self._given["train"][1]
        return targets.shape[1] if targets.ndim == 2 else 1

    @property
    def num_classes(self) -> int | None:
        """Number of classes for classification, ``None`` for regression."""
        return self._num_classes

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "regression" if self.num_classes is None else "classification"

    # ------------------------------------------------------------------ loading
    def _load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Return ``{"train": (X, y), "val": …, "test": …}`` on the CPU; ``val``/``test`` may be absent.

        Subclasses override this; it is called once, on the first :meth:`setup`.
        """
        return dict(self._given)

    def setup(self, stage: str | None = None) -> None:
        """Load and validate every split once, then move them to the trainer's root device."""
        if self._splits is None:
            splits = self._load_splits()
            if "train" not in splits:
                raise RuntimeError(f"{type(self).__name__} loaded no training set")
            for split, (inputs, targets) in splits.items():
                validate_split(inputs, targets, split, self.num_classes)
                self._check_width(inputs, targets, split)
            self._splits = splits
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self._splits = {split: (X.to(device), y.to(device)) for split, (X, y) in self._splits.items()}

    def _check_width(self, inputs: Tensor, targets: Tensor, split: str) -> None:
        # The model was built from in_features / out_features before the data were loaded.
        name = _SPLIT_NAMES[split]
        if inputs.shape[1] != self.in_features:
            raise ValueError(f"{name} inputs have {inputs.shape[1]} features but in_features is {self.in_features}")
        if targets.ndim == 2 and targets.shape[1] != self.out_features:
            raise ValueError(f"{name} targets have {targets.shape[1]} columns but out_features is {self.out_features}")

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if self._splits is None:
            self.setup("fit")
        return self._splits[split]

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """The full, unsharded training inputs and targets (set up lazily if needed).

        They live on the trainer's root device once the trainer has called :meth:`setup`, else on the CPU.
        """
        return self._split("train")

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole inputs and targets of ``"train"``, ``"val"`` or ``"test"`` (set up lazily if needed).

        Raises:
            KeyError: when the module has no such split (e.g. no validation set).
        """
        self._split("train")  # sets up lazily
        if split not in self._splits:
            raise KeyError(f"{type(self).__name__} has no {_SPLIT_NAMES.get(split, split)} set; it has "
                           f"{sorted(self._splits)}")
        return self._splits[split]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        """One full batch per epoch, or shuffled mini-batches; sharded by rank under DDP when ``shard``."""
        inputs, targets = self._split("train")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        batch_size = self.batch_size
        if self.shard and world_size > 1:
            n = inputs.shape[0]
            inputs, targets = shard(inputs, targets, self.trainer.global_rank, world_size)
            if batch_size is not None:  # the same number of batches on every rank, whatever its shard's size
                larger, smaller = even_batch_sizes(n, world_size, batch_size)
                batch_size = larger if inputs.shape[0] == -(-n // world_size) else smaller
        return self._loader(inputs, targets, shuffle=True, batch_size=batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """The validation set like the training set, unsharded; an empty list (no validation) if absent."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """The test set like the training set, unsharded; an empty list (no test batches) if absent."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        """The test set's batches, for ``trainer.predict`` (hcl's models predict the inputs of each pair)."""
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader | list:
        self._split("train")  # sets up lazily
        if split not in self._splits:
            # Lightning runs no loop over an empty list of loaders: no validation set, no validation.
            return []
        return self._loader(*self._splits[split], shuffle=False)

    def _loader(self, inputs: Tensor, targets: Tensor, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        if self.batch_size is None:
            return DataLoader(_FullBatch(inputs, targets), batch_size=None)
        batch_size = batch_size or self.batch_size
        dataset = TensorDataset(inputs, targets)
        if not shuffle:
            return DataLoader(dataset, batch_size=batch_size)
        # A single-replica DistributedSampler: Lightning leaves it in place under DDP (any other sampler
        # would be wrapped and shard the already sharded data again) and calls its set_epoch, so the
        # order depends only on the seed and the epoch, also after resuming from a checkpoint (inside an epoch too:
        # the loader's state is the batches training took, which the resumed epoch skips).
        sampler = _EpochSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=self.seed)
        return _ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, taken=self._batches_taken)

    def _batches_taken(self) -> int:
        """The training batches of the current epoch the fit loop has trained on (not the ones fetched ahead, nor one
        whose step failed: a checkpoint written then, ``OnExceptionCheckpoint``, leaves it to the resumed run)."""
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
