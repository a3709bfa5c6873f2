"""Where the callbacks' data comes from: the user's probe, the data module's tensors or one pass over the loader.

Distributed training: :func:`training_data` gathers the ranks' shards of a plain dataloader with a collective, so
every rank must call it (as the callbacks do, in ``on_train_start``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor


def training_data(
    trainer: pl.Trainer, probe: Tensor | None = None, target: Tensor | None = None, max_samples: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The inputs (and targets) a callback evaluates the network on.

    The ``probe``/``target`` the user gave, else the data module's full training set (``train_tensors()``, as in
    :mod:`hcl.datamodules`), else one pass over the training dataloader. Under DDP a dataloader only yields this
    rank's shard, so the shards are gathered from all ranks (a collective: call this on every rank). ``max_samples``
    keeps the first ones.

    Raises:
        ValueError: when no data can be found or it is empty / not finite, or targets do not match the inputs.
    """
    if probe is not None:
        X, Y = probe, target
    else:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            X, Y = datamodule.train_tensors()
        else:
            X, Y = _collect_dataloader(trainer)
            if trainer.world_size > 1:
                X = gather_rows(trainer, X)
                Y = None if Y is None else gather_rows(trainer, Y)
    if max_samples is not None:
        X = X[:max_samples]
        Y = None if Y is None else Y[:max_samples]
    if X.shape[0] == 0:
        raise ValueError("the data to evaluate the network on is empty")
    if X.is_floating_point() and not torch.isfinite(X).all():
        raise ValueError("the data to evaluate the network on contains NaN or inf")
    if Y is not None:
        if Y.ndim == 0 or Y.shape[0] != X.shape[0]:
            raise ValueError(f"the targets have shape {tuple(Y.shape)} but the inputs have {X.shape[0]} rows")
        if Y.is_floating_point() and not torch.isfinite(Y).all():
            raise ValueError("the targets to evaluate the network on contain NaN or inf")
    return X, Y


def gather_rows(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Concatenate the ranks' tensors along the first dimension (rank 0's rows first); sizes may differ.

    A collective: every rank must call it. The result is on this rank's original device.
    """
    strategy = trainer.strategy
    device = strategy.root_device
    local = tensor.detach().to(device)
    sizes = strategy.all_gather(torch.tensor([local.shape[0]], device=device)).reshape(-1).tolist()
    longest = max(int(s) for s in sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    everything = strategy.all_gather(padded)  # (world, longest, ...)
    parts = [everything[rank, : int(size)] for rank, size in enumerate(sizes)]
    return torch.cat(parts).to(tensor.device)


def _collect_dataloader(trainer: pl.Trainer) -> tuple[Tensor, Tensor | None]:
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if loader is None:
        raise ValueError("no training data found: pass probe= (and target=) to the callback")
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2]):
            xs.append(batch[0])
            ys.append(batch[1])
        elif isinstance(batch, Tensor):
            xs.append(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
            xs.append(batch[0])  # TensorDataset(X): inputs only
        else:
            raise ValueError(
                f"cannot read inputs from a training batch of type {type(batch).__name__}: pass probe= to the callback"
            )
    if not xs:
        raise ValueError("the training dataloader is empty")
    if len(xs) == 1:
        # One batch (full-batch training): keep its tensors, so that a callback can recognise them in a training step.
        return xs[0], (ys[0] if ys else None)
    try:
        return torch.cat(xs), (torch.cat(ys) if ys else None)
    except RuntimeError as err:
        raise ValueError(f"the training batches cannot be stacked into one data set ({err}): pass probe=") from err

