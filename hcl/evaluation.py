"""Validation and test values of hcl's models over the whole evaluation set.

``<stage>/data_loss`` is ``L``'s data term over every batch of the stage (and, under DDP, every rank's shard): with
reduction ``"sum"`` their sum, not a mean of the batches' sums. The values are logged once a stage ends, at the
trainer's global step: the weights they are of are those the callbacks log at that step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler

#: The training steps done, which hcl's models keep in ``trainer.callback_metrics`` (not in the logs): what ``hcl.fit``
#: carries back after ``ddp_spawn`` (the last ``step`` logged may be a validation's, already past the last step)
STEPS_DONE = "hcl/steps_done"


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 when it is in a half precision (float64 stays): for sums over many samples."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def run_key(trainer: pl.Trainer) -> tuple[int, ...]:
    """A fit of ``trainer``: ids, not references (a model stays picklable); each fit makes its own optimizers."""
    return (id(trainer), *map(id, trainer.optimizers))


class EvaluationLog:
    """Mixin for a ``LightningModule`` with a ``reduction`` and a ``penalty()`` (or :meth:`evaluation_penalty`): its
    evaluation steps ask :meth:`evaluation_rows` which rows of the batch count and :meth:`accumulate` their data sum,
    and ``<stage>/data_loss``, ``<stage>/penalty`` and ``<stage>/objective`` are logged at the end of the validation and
    test epochs (a subclass that overrides ``on_validation_epoch_end`` or ``on_test_epoch_end`` calls ``super()``). The
    targets' two forms (class labels, rows) are read here for both of hcl's models."""

    reduction: str

    def _as_output(self, target: Tensor, like: Tensor) -> Tensor:
        """Targets as ``(n, c)`` rows in ``like``'s dtype: class labels one-hot when the model has ``c > 1`` outputs."""
        c = self.hparams.out_features  # type: ignore[attr-defined]
        if c > 1 and not target.is_floating_point():
            return F.one_hot(target.long().reshape(-1), c).to(like.dtype)
        return target.reshape(target.shape[0], c).to(like.dtype)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The outputs on a batch of inputs, or on the inputs of the ``(inputs, targets)`` pairs hcl's data modules
        yield (Lightning's default would call the model on the pair)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)  # type: ignore[operator]

    @staticmethod
    def _class_index(target: Tensor) -> Tensor:
        """Class indices of one-hot (or score) rows or of integer labels, for the accuracy metrics."""
        if target.is_floating_point() and target.ndim == 2:
            return target.argmax(dim=1)
        return target.long().reshape(-1)

    def evaluation_penalty(self) -> Tensor:
        """The penalty of ``L`` at the current weights, as logged (default: the model's ``penalty()``)."""
        return self.penalty()  # type: ignore[attr-defined]

    def evaluation_rows(self, stage: str, batch_idx: int, rows: int) -> int:
        """How many of this evaluation batch's first rows count: all but the copies DDP's sampler pads the set with.
        The first batch of a stage starts its sums afresh (an interrupted stage leaves none behind).

        Raises:
            ValueError: several dataloaders for the stage (its values are those of one set).
        """
        module: pl.LightningModule = self  # type: ignore[assignment]
        sums = self.__dict__.setdefault("_evaluation_sums", {})
        if batch_idx == 0 or stage not in sums:
            loaders = _loaders(module.trainer, stage)
            if len(loaders) > 1:
                raise ValueError(f"{type(self).__name__} logs {stage}/objective of one {stage} set, got "
                                 f"{len(loaders)} dataloaders: evaluate each with its own trainer.validate/test")
            exact = torch.float32 if module.device.type == "mps" else torch.float64  # MPS has no float64
            sums[stage] = [torch.zeros((), dtype=exact, device=module.device), 0, 0,
                           _real_rows(loaders[0] if loaders else None)]
        entry = sums[stage]
        keep = rows if entry[3] is None else max(0, min(rows, entry[3] - entry[2]))
        entry[2] += rows
        return keep

    def accumulate(self, stage: str, data_sum: Tensor, count: int) -> None:
        """Add the data sum of an evaluation batch's ``count`` rows that count (:meth:`evaluation_rows`)."""
        entry = self.__dict__["_evaluation_sums"][stage]
        entry[0] = entry[0] + data_sum.detach().to(entry[0].dtype)
        entry[1] += count

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the validation at the checkpoint's step: the restart marker of a run resumed from it drops it from the logs
        saved = self.__dict__.get("_last_validation")
        if saved is not None:
            accuracy = self.trainer.callback_metrics.get("val/acc")  # the metric's, logged by the step
            values = saved["values"] if accuracy is None else {**saved["values"], "val/acc": float(accuracy)}
            checkpoint["hcl_last_validation"] = {**saved, "values": values}

    def restore_evaluation(self, checkpoint: dict) -> None:
        """Keep a checkpoint's last validation values for :meth:`relog_evaluation` (from ``on_load_checkpoint``)."""
        self._last_validation = checkpoint.get("hcl_last_validation")

    def relog_evaluation(self) -> None:
        """Log again, after a resume's restart marker at its step, the validation values of the checkpoint's step (the
        resumed run does not validate there again; call from ``on_train_start``). Not at a second ``fit`` of the same
        trainer, which writes no restart marker."""
        module: pl.LightningModule = self  # type: ignore[assignment]
        saved = self.__dict__.get("_last_validation")
        resumed = module.trainer.ckpt_path is not None
        if saved and resumed and saved["step"] == module.trainer.global_step > 0 and module.trainer.is_global_zero:
            from lightning.pytorch.loggers import TensorBoardLogger

            from hcl.callbacks.logs import log_scalars  # not at import: the callbacks load the models late

            # TensorBoard's only: the other loggers have them from the run that saved the checkpoint
            tensorboard = [logger for logger in module.trainer.loggers if isinstance(logger, TensorBoardLogger)]
            log_scalars(module.trainer, saved["values"], saved["step"], loggers=tensorboard)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    def log_evaluation(self, stage: str) -> None:
        """Log the stage's values from its accumulated batches (every rank calls it: a collective under DDP)."""
        module: pl.LightningModule = self  # type: ignore[assignment]
        entry = self.__dict__.get("_evaluation_sums", {}).pop(stage, None)
        if entry is None:
            return
        total = entry[0].to(module.device)
        count = torch.tensor(float(entry[1]), dtype=total.dtype, device=module.device)
        world = module.trainer.world_size
        loaders = _loaders(module.trainer, stage)
        if world > 1 and loaders and _own_parts(module.trainer, loaders[0]):  # each rank evaluated its part of the set
            total, count = module.all_gather(total).sum(), module.all_gather(count).sum()
        data_loss = total if self.reduction == "sum" else total / count
        penalty = self.evaluation_penalty().detach().to(total.dtype)
        sync = world > 1  # the same values on every rank
        module.log(f"{stage}/data_loss", data_loss, on_step=False, on_epoch=True, sync_dist=sync)
        module.log(f"{stage}/penalty", penalty, on_step=False, on_epoch=True, sync_dist=sync)
        module.log(f"{stage}/objective", data_loss + penalty, on_step=False, on_epoch=True, prog_bar=True,
                   sync_dist=sync)
        # at the global step, not Lightning's count of the batches before it: the step of these weights
        module.log("step", float(module.global_step), on_step=False, on_epoch=True, sync_dist=sync)
        if stage == "val" and not module.trainer.sanity_checking:
            values = {"val/data_loss": data_loss, "val/penalty": penalty, "val/objective": data_loss + penalty}
            self._last_validation = {"step": int(module.global_step),
                                     "values": {k: float(v) for k, v in values.items()}}


def _loaders(trainer: pl.Trainer, stage: str) -> list:
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    if isinstance(loaders, Mapping):  # a dict of named sets
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [] if loaders is None else [loaders]


def _sharded(loader: object) -> bool:
    """Whether the ranks evaluated different parts of the set (Lightning's distributed sampler over a dataset of at
    least one item per rank), not the whole of it each (a dataset of one whole batch, or no distributed sampler)."""
    sampler = getattr(loader, "sampler", None)
    return (isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1
            and len(sampler.dataset) >= sampler.num_replicas)


def _own_parts(trainer: pl.Trainer, loader: object) -> bool:
    """Whether the ranks evaluated different parts of the set: Lightning's sampler split it (:func:`_sharded`), or
    each rank read a dataset of its own (``use_distributed_sampler=False``: told apart from the same dataset on every
    rank by :func:`hcl.callbacks.data.rank_datasets`, a collective)."""
    if _sharded(loader):
        return True
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):  # Lightning's over a set of one whole batch
        return False
    from hcl.callbacks.data import rank_datasets  # not at import: the callbacks load the models late

    copies, total = rank_datasets(trainer, loader)
    return not copies and total is not None


def _real_rows(loader: object) -> int | None:
    """The samples of its set this rank evaluates, where DDP's sampler pads the set by repeating some (``None``: no
    padding to leave out)."""
    sampler = getattr(loader, "sampler", None)
    # (padded after any shuffle: a rank's last ones are the copies)
    if not _sharded(loader) or sampler.drop_last or getattr(loader, "batch_size", None) is None:
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
