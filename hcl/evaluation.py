"""Validation and test values of hcl's models over the whole evaluation set.

``<stage>/data_loss`` is ``L``'s data term over every batch of the stage (and, under DDP, every rank's shard): with
reduction ``"sum"`` their sum, not a mean of the batches' sums. The values are logged once a stage ends, at the
trainer's global step: the weights they are of are those the callbacks log at that step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler


class EvaluationLog:
    """Mixin for a ``LightningModule`` with a ``reduction`` and a :meth:`evaluation_penalty`: its evaluation steps call
    :meth:`accumulate`, and ``<stage>/data_loss``, ``<stage>/penalty`` and ``<stage>/objective`` are logged at the end
    of the validation and test epochs."""

    reduction: str

    def evaluation_penalty(self) -> Tensor:
        """The penalty of ``L`` at the current weights, as logged."""
        raise NotImplementedError

    def accumulate(self, stage: str, data_sum: Tensor, count: int) -> None:
        """Add one evaluation batch: the sum of its samples' data terms and its number of samples."""
        sums = self.__dict__.setdefault("_evaluation_sums", {})
        total, n = sums.get(stage, (0.0, 0))
        sums[stage] = (total + data_sum.detach().to(torch.float64), n + count)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    def log_evaluation(self, stage: str) -> None:
        """Log the stage's values from its accumulated batches (every rank calls it: a collective under DDP)."""
        module: pl.LightningModule = self  # type: ignore[assignment]
        total, count = self.__dict__.get("_evaluation_sums", {}).pop(stage, (None, 0))
        if total is None:
            return
        total = torch.as_tensor(total, dtype=torch.float64, device=module.device)
        count = torch.tensor(float(count), dtype=torch.float64, device=module.device)
        world = module.trainer.world_size
        if world > 1 and _sharded(module.trainer, stage):  # each rank evaluated its part of the set
            total, count = module.all_gather(total).sum(), module.all_gather(count).sum()
        data_loss = total if self.reduction == "sum" else total / count
        penalty = self.evaluation_penalty().detach().to(torch.float64)
        sync = world > 1  # the same values on every rank
        module.log(f"{stage}/data_loss", data_loss, on_step=False, on_epoch=True, sync_dist=sync)
        module.log(f"{stage}/penalty", penalty, on_step=False, on_epoch=True, sync_dist=sync)
        module.log(f"{stage}/objective", data_loss + penalty, on_step=False, on_epoch=True, prog_bar=True,
                   sync_dist=sync)
        # at the global step, not Lightning's count of the batches before it: the step of these weights
        module.log("step", float(module.global_step), on_step=False, on_epoch=True, sync_dist=sync)


def _sharded(trainer: pl.Trainer, stage: str) -> bool:
    """Whether the ranks evaluated different parts of the stage's set (Lightning's distributed sampler over a dataset of
    at least one item per rank), not the whole of it each (a dataset of one whole batch, or no distributed sampler)."""
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    sampler = getattr(loader, "sampler", None)
    return (isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1
            and len(sampler.dataset) >= sampler.num_replicas)
