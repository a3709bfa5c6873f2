"""Where the callbacks' data comes from: the user's probe, the data module's tensors or one pass over the loader.

Distributed training: :func:`training_data` gathers the ranks' shards of a plain dataloader with a collective, so
every rank must call it (as the callbacks do, in ``on_train_start``).

When training starts, one info line per trainer says which data the callbacks use (``n`` and the source); a pass
over the loader that misses samples (``drop_last=True``, a sampler covering part of the dataset) or repeats some
warns. A loader that shuffles (``shuffle=True``: a ``RandomSampler``) is read in its dataset's order, every sample
once, and no pass draws from the random generators: the rows line up from one run (or resume) to the next, and the
training run is the one it would be without the callbacks.
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import (
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from hcl.convex.native.memory import free_memory

# The data descriptions already said, per trainer: several callbacks on the same data say it once.
_SAID: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# A pass over a loader without a length (an iterable dataset, perhaps endless) stops with an error past this share of
# the free memory (or these bytes where it is unknown): an endless stream filled the memory at 70 MB/s, silently
ENDLESS_PASS_FRACTION = 0.5
ENDLESS_PASS_BYTES = 8 * 2**30


def training_data(
    trainer: pl.Trainer,
    probe: Tensor | None = None,
    target: Tensor | None = None,
    max_samples: int | None = None,
    owner: str | None = None,
    reader: str = "the callbacks",
    in_features: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The inputs (and targets) a callback evaluates the network on.

    The ``probe``/``target`` the user gave, else the data module's full training set (``train_tensors()``, as in
    :mod:`hcl.datamodules`), else one pass over the training dataloader. A shuffling sampler's or DDP's own
    sampler's dataset is read whole, in its own order, on every rank; under DDP another sampler's pass is read once
    where every rank reads the same dataset whole (:func:`rank_datasets`), else its shard from every rank is gathered
    (a collective: call this on every rank). ``max_samples``
    keeps the first ones. Says which (once per trainer and source, naming ``owner`` for a probe and ``reader`` as
    what evaluates it).

    Raises:
        ValueError: when no data can be found or it is empty / not finite, or targets do not match the inputs.
    """
    if probe is not None:
        X, Y = probe, target
        source = f"{owner or 'the callback'}'s probe"
    else:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_tensors"):
            X, Y = datamodule.train_tensors()
            source = f"the full training set of the data module {type(datamodule).__name__}"
        else:
            X, Y, loader, whole = _collect_dataloader(trainer, in_features)
            source = "one pass over the training dataloader"
            weighted = type(_drawing(loader)) is WeightedRandomSampler
            if weighted:  # its draws are a resample, not the training set
                source += "'s dataset, each sample once (its WeightedRandomSampler's weights not applied)"
            datasets = None  # the samples of the ranks' own datasets together (None: this rank's dataset's length)
            copies = False  # the same dataset read whole on every rank: one pass of one rank's
            if not whole and trainer.world_size > 1:
                copies, datasets = rank_datasets(trainer, loader)
            if whole or copies:
                source += ", whole on every rank" if weighted else "'s dataset, whole on every rank"
                datasets = None
            elif trainer.world_size > 1:
                X = gather_rows(trainer, X)
                Y = None if Y is None else gather_rows(trainer, Y)
                source += f", gathered from {trainer.world_size} ranks"
            _warn_if_partial(trainer, loader, X.shape[0], 1 if copies else trainer.world_size, datasets, in_features)
            warn_if_ddp_changes_samples(trainer)
            reload = getattr(trainer, "reload_dataloaders_every_n_epochs", 0)
            if reload:  # a new loader may hold other data: these stay the first one's
                _say_once(trainer, f"the trainer reloads the training dataloader every {reload} epoch(s) "
                          f"(reload_dataloaders_every_n_epochs) while {reader} evaluate the network on the data of the "
                          "pass read when training started: pass probe=/target= to name the data", rank_zero_warn)
            source += (" (each batch's first item as the inputs, its second as the targets)" if Y is not None else
                       " (each batch as the inputs, without targets)")
    total = X.shape[0]
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
    first = f" (the first max_samples={max_samples} of {total})" if X.shape[0] < total else ""
    _say_once(trainer, f"hcl: {reader} evaluate the network on n = {X.shape[0]} samples{first}: {source}")
    overfit, limit = getattr(trainer, "overfit_batches", 0), getattr(trainer, "limit_train_batches", 1.0)
    # overfit_batches sets limit_train_batches; an int limit counts batches (1 is one batch)
    limits = [f"overfit_batches={overfit}"] if overfit else [f"limit_train_batches={limit}"] * (
        isinstance(limit, int) or limit != 1.0)
    trained, loader = getattr(trainer, "num_training_batches", None), getattr(trainer, "train_dataloader", None)
    try:
        partial = trained is not None and loader is not None and trained < len(loader)
    except TypeError:  # a loader of unknown length
        partial = False
    if probe is None and partial and limits and not getattr(trainer, "fast_dev_run", False):  # the trainer leaves out
        _say_once(trainer, f"the trainer trains on part of each epoch ({', '.join(limits)}) while {reader} evaluate "
                  "the network on every training sample: pass probe=/target= to evaluate it on those trained on",
                  rank_zero_warn)
    return X, Y


def _say_once(trainer: pl.Trainer, message: str, say=None) -> None:
    """``say(message)`` (default: an info line) the first time for this trainer: several callbacks say it once."""
    try:
        said = _SAID.setdefault(trainer, set())
    except TypeError:  # an object without weak references (a test's stand-in): say it every time
        said = set()
    if message not in said:
        said.add(message)
        (say or rank_zero_info)(message)


def _warn_if_partial(
    trainer: pl.Trainer, loader: object, rows: int, world_size: int, total: int | None = None,
    in_features: int | None = None,
) -> None:
    """Warn (once per trainer) when one pass over ``loader`` (all ranks together) yields another number of samples
    than its dataset (``total``: the ranks' datasets together, where each rank has a part of its own)."""
    try:
        total = len(loader.dataset) if total is None else total  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return  # no dataset of known length (an iterable dataset, a list of batches)
    if _unbatched(loader):
        # no collation: each item is a sample, or a batch of its own (a dataset of whole batches) of as many rows as
        # the first
        item = loader.dataset[0]  # type: ignore[attr-defined]
        pair = isinstance(item, (tuple, list))
        first, target = (item[0] if pair else item), (item[1] if pair and len(item) > 1 else None)
        if isinstance(first, Tensor) and first.ndim >= 1 and not _items_are_samples(first, target, in_features):
            total *= first.shape[0]
    if rows == total:
        return
    if rows < total:
        batch_size = getattr(loader, "batch_size", None)
        reason = ("drop_last=True drops the last incomplete batch" if getattr(loader, "drop_last", False)
                  and batch_size and (total // world_size) % batch_size else
                  "its sampler covers fewer samples than the dataset")
        _say_once(trainer, f"one pass over the training dataloader yields {rows} of its dataset's {total} samples "
                  f"({reason}): the callbacks evaluate the network on those {rows} only; pass probe=/target= to "
                  "the callbacks to use every sample", rank_zero_warn)
    else:
        _say_once(trainer, f"one pass over the training dataloader yields {rows} rows for a dataset of {total} "
                  "samples (its sampler repeats samples, e.g. a distributed sampler's padding): the repeated samples "
                  "count more than once in the callbacks' values", rank_zero_warn)


def warn_if_ddp_changes_samples(trainer: pl.Trainer) -> None:
    """Warn (once per trainer) when DDP's distributed sampler pads the training set to a multiple of the ranks by
    repeating samples (training then counts those twice an epoch, while the callbacks count every sample once), or
    when the loader's ``drop_last`` leaves out the end of each rank's shard (training leaves those out, the callbacks,
    which read the dataset whole, count them)."""
    loader = getattr(trainer, "train_dataloader", None)
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.num_replicas < 2:
        return
    if _wrapped_over_ranks(loader, sampler.num_replicas):
        return  # a weighted sampler's draws: a resample, not the samples the callbacks read (its dataset, once)
    batch_size = getattr(loader, "batch_size", 1)
    if batch_size is None and getattr(loader, "batch_sampler", None) is None:
        return  # a dataset of whole batches, not of samples (an hcl data module's full batch: each rank's own shard)
    try:
        n = len(sampler.dataset)
    except TypeError:
        return
    left = sampler.num_samples % batch_size if getattr(loader, "drop_last", False) and batch_size else 0
    if left:
        _say_once(trainer, f"drop_last=True under DDP leaves out the last {left} of each rank's {sampler.num_samples} "
                  f"samples every epoch ({left * sampler.num_replicas} of the {n}; which ones changes when the sampler "
                  f"shuffles): training does not use them, while the callbacks evaluate the network on all {n}",
                  rank_zero_warn)
    if n % sampler.num_replicas and not sampler.drop_last:
        _say_once(trainer, f"DDP's distributed sampler pads the {n} training samples to {sampler.total_size} by "
                  f"repeating {sampler.total_size - n} of them every epoch: training counts those twice, the callbacks "
                  f"(and one process) once; use a number of samples divisible by {sampler.num_replicas}, or an hcl "
                  "data module (its shards repeat none)", rank_zero_warn)


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


def _collect_dataloader(
    trainer: pl.Trainer, in_features: int | None = None
) -> tuple[Tensor, Tensor | None, object, bool]:
    """The loader's inputs and targets, the loader, and whether they are its whole dataset read in order
    on every rank (:func:`_whole_on_every_rank`: then nothing is gathered)."""
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if loader is None:
        raise ValueError("no training data found: pass probe= (and target=) to the callback")
    if isinstance(loader, dict) or isinstance(loader, (list, tuple)) and loader and all(
            hasattr(item, "dataset") for item in loader):  # training loaders that Lightning combines
        raise ValueError(f"the training data is a {type(loader).__name__} of {len(loader)} dataloader"
                         f"{'s' * (len(loader) != 1)}: the callbacks evaluate the network on one data set: pass probe= "
                         "(and target=) to the callback")
    xs, ys = [], []
    try:
        len(loader)  # type: ignore[arg-type]
        most = math.inf  # a pass over a loader of known length ends
    except TypeError:  # an iterable loader may never end: a pass takes at most a share of the free memory
        free = free_memory("cpu")
        most = ENDLESS_PASS_FRACTION * free if free is not None else ENDLESS_PASS_BYTES
    held = 0
    for batch in _batches(loader):
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2]):
            xs.append(batch[0])
            ys.append(batch[1])
        elif isinstance(batch, Tensor):
            xs.append(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
            xs.append(batch[0])  # TensorDataset(X): inputs only
        else:
            raise ValueError(
                f"cannot read inputs from a training batch of type {type(batch).__name__}: pass probe= (and "
                "target=, for the convex monitors) to the callback"
            )
        held += sum(t[-1].element_size() * t[-1].nelement() for t in (xs, ys) if t)
        if held > most:
            raise ValueError(f"one pass over the training dataloader, which has no length, read {held / 2**30:.2f} GiB "
                             "without ending (an endless stream?): the callbacks need the whole training set: pass "
                             "probe= (and target=) to the callback")
    if not xs:
        raise ValueError("the training dataloader is empty")
    if _unbatched(loader) and _items_are_samples(xs[0], ys[0] if ys else None, in_features):
        xs, ys = [torch.stack(xs)], [torch.stack(ys)] if ys else []
    whole = _whole_on_every_rank(loader, trainer.world_size)
    if len(xs) == 1:
        # One batch (full-batch training): keep its tensors, so that a callback can recognise them in a training step.
        return xs[0], (ys[0] if ys else None), loader, whole
    try:
        return torch.cat(xs), (torch.cat(ys) if ys else None), loader, whole
    except RuntimeError as err:
        raise ValueError(f"the training batches cannot be stacked into one data set ({err}): pass probe=") from err


def rank_datasets(trainer: pl.Trainer, loader: object) -> tuple[bool, int | None]:
    """Under DDP without DDP's own sampler (``use_distributed_sampler=False``): whether every rank's loader reads the
    same dataset whole (copies: nothing to gather, and training counts each sample once per rank), and the samples of
    the ranks' datasets together where every rank reads its dataset whole (``None`` where one does not, or cannot be
    told). A collective: every rank calls it. The datasets are compared by their lengths and checksums of their first,
    middle and last items, read with the random generators seeded alike (a random augmentation draws the same numbers
    on every rank) and restored: own parts that agree there would be taken for copies."""
    sampler = _sampler(loader)
    dataset = getattr(loader, "dataset", None)
    if type(sampler) in (RandomSampler, WeightedRandomSampler):  # _batches reads their dataset whole, each sample once
        reads_whole = _reads_dataset(loader)
    else:  # (a distributed sampler over one replica: a dataset sharded beforehand)
        reads_whole = type(sampler) is SequentialSampler or type(sampler) is DistributedSampler and (
            sampler.num_replicas == 1 and not sampler.drop_last)
    with _generators_kept():
        torch.random.default_generator.manual_seed(0)  # the CPU's only: the state kept and restored
        random.seed(0)
        np.random.seed(0)
        mine = _fingerprint(dataset) if reads_whole else None
    local = torch.full((1, 3), math.nan, dtype=torch.float64) if mine is None else mine.reshape(1, 3)
    every = gather_rows(trainer, local)
    if bool(torch.isnan(every).any()):  # a rank's sampler or dataset that cannot be told
        return False, None
    return bool((every == every[0]).all()), int(every[:, 0].sum())


def training_copies(trainer: pl.Trainer) -> int:
    """The ranks that hold each training sample under DDP: all of them with an hcl data module's ``shard=False`` or
    a loader that reads the same dataset whole on every rank (:func:`rank_datasets`), else one (sharded, as
    DDP's own sampler shards a plain dataloader). A collective where the loader does not tell: every rank calls it."""
    if trainer.world_size < 2:
        return 1
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "shard"):
        return trainer.world_size if datamodule.shard is False else 1
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None or _whole_on_every_rank(loader, trainer.world_size):
        return 1
    return trainer.world_size if rank_datasets(trainer, loader)[0] else 1


def _fingerprint(dataset: object) -> Tensor | None:
    """``dataset``'s length and two checksums of its first, middle and last items (``None``: no length, or an item
    that is not numbers)."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
        sums = [0.0, 0.0]
        for i in sorted({0, n // 2, n - 1}) if n else []:
            item = dataset[i]  # type: ignore[index]
            for part in item if isinstance(item, (tuple, list)) else (item,):
                values = torch.as_tensor(part).detach().to("cpu", torch.float64).reshape(-1)
                sums[0] += float(values.sum())
                sums[1] += float((values * torch.arange(1, values.numel() + 1, dtype=torch.float64)).sum())
    except Exception:  # noqa: BLE001 (a dataset whose items cannot be read as numbers this way: not told apart)
        return None
    return torch.tensor([float(n), *sums], dtype=torch.float64)


def _sampler(loader: object) -> object:
    batch_sampler = getattr(loader, "batch_sampler", None)
    return getattr(batch_sampler, "sampler", getattr(loader, "sampler", None))


def _drawing(loader: object) -> object:
    """The sampler that draws the indices: the loader's, or the one Lightning's ``DistributedSamplerWrapper`` holds
    under DDP (a user's sampler, e.g. a ``WeightedRandomSampler``, whose draws it shards over the ranks)."""
    sampler = _sampler(loader)
    if isinstance(sampler, DistributedSamplerWrapper):
        return getattr(sampler.dataset, "_sampler", sampler)
    return sampler


def _wrapped_over_ranks(loader: object, world_size: int) -> bool:
    """A sampler that Lightning's wrapper shards over the ``world_size > 1`` ranks and whose dataset
    :func:`_reads_dataset` reads (a weighted one: Lightning replaces a shuffling one by its own): each rank's loader
    holds the whole dataset."""
    sampler = _sampler(loader)
    return isinstance(sampler, DistributedSamplerWrapper) and sampler.num_replicas == world_size > 1 and _reads_dataset(
        loader)


def _reads_dataset(loader: object) -> bool:
    """Whether :func:`_batches` reads ``loader``'s dataset itself, in its own order: for a shuffling or weighted
    sampler (a row order that changes with the epoch would make every pattern look changed; a weighted one's pass is a
    resample) and for a distributed one (rank-interleaved, padded with repeats: an order that changes with the number
    of processes)."""
    # exact types: a subclass (Lightning's wrapper of a custom sampler) may cover part of the dataset; a weighted one's
    # draws with replacement are a resample of it (24 of 40 samples in one pass)
    return type(_drawing(loader)) in (RandomSampler, DistributedSampler, WeightedRandomSampler) and not isinstance(
        getattr(loader, "dataset", None), IterableDataset)


def _whole_on_every_rank(loader: object, world_size: int) -> bool:
    """Whether that read gives every rank the whole dataset: DDP's own sampler, which shards the dataset over the
    ranks (one over a single replica is a dataset sharded beforehand, whose ranks' parts are gathered), or Lightning's
    wrapper of a weighted sampler."""
    sampler = _sampler(loader)
    return _reads_dataset(loader) and (type(sampler) is DistributedSampler and sampler.num_replicas == world_size > 1
                                       or _wrapped_over_ranks(loader, world_size))


def _batches(loader: object) -> Iterator[object]:
    """One pass over ``loader``'s batches, with the random generators left as they were; the dataset in its own order
    instead where :func:`_reads_dataset` (its batches collated as the loader collates them)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    dataset = getattr(loader, "dataset", None)
    with _generators_kept(loader):
        if _reads_dataset(loader) and _unbatched(loader):  # each item is collated alone (a sample, or a whole batch)
            for i in range(len(dataset)):
                yield loader.collate_fn(dataset[i])
        elif _reads_dataset(loader):
            size = getattr(loader, "batch_size", None) or getattr(batch_sampler, "batch_size", None) or 1
            total = len(dataset)
            for lo in range(0, total, size):
                yield loader.collate_fn([dataset[i] for i in range(lo, min(lo + size, total))])
        else:
            yield from loader


def _items_are_samples(x: Tensor, y: object, in_features: int | None) -> bool:
    """Whether the items of a loader without automatic batching are samples (one row each), not whole batches: by the
    hidden layer's width where it is known, else by rows that the targets do not share."""
    y = y if isinstance(y, Tensor) else None
    one_row = y is not None and y.ndim >= 1 and x.ndim >= 2 and x.shape[0] == y.shape[0] == 1  # a batch of one
    if in_features is not None:
        return x.numel() == in_features and not one_row
    return y is not None and (y.ndim == 0 or x.ndim == 0 or x.shape[0] != y.shape[0])


def _unbatched(loader: object) -> bool:
    """A loader without automatic batching (``batch_size=None``): each dataset item is collated alone."""
    return getattr(loader, "batch_size", 1) is None and getattr(loader, "batch_sampler", None) is None


@contextmanager
def _generators_kept(loader: object = None) -> Iterator[None]:
    """torch's (CPU), Python's and NumPy's global random states restored on exit, and the generators of ``loader``
    and of its sampler: a sampler seeded from them, or a random transform, would otherwise change the training run."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    own = {id(g): g for g in (getattr(loader, "generator", None), getattr(_sampler(loader), "generator", None),
                              getattr(_drawing(loader), "generator", None)) if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in own.values()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            for generator, state in states:
                generator.set_state(state)
