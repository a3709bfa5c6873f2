"""Two-process DDP on the CPU (ddp_spawn, gloo): the same objective, the same convex optimum, each point logged once.

Each spawn costs seconds on a small machine, so there are two runs only: one through the CLI (hcl's data module,
reduction "sum", load_solution broadcast), one with a plain dataloader (shards gathered, reduction "mean", an
asynchronous monitor on rank zero).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, PatternMonitor
from hcl.fit import main

# A collective called on one rank only would hang: the timeout fails the test instead.
# one DDP run at a time under pytest-xdist (--dist loadgroup): two process groups at once on two cores failed
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.xdist_group("ddp")]

CONFIG = """
seed_everything: 0
trainer:
  max_steps: 6
  precision: 64-true
  accelerator: cpu
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: hcl.callbacks.PatternMonitor
    - class_path: hcl.callbacks.ConvexGapMonitor
      init_args: {formulation: neurons, solver: clarabel, every_n_steps: 2, load_solution: true}
    - class_path: hcl.callbacks.ConvexGapMonitor
      init_args: {formulation: neurons, solver: clarabel, prefix: convex_every_step}
model: {hidden: 12, reduction: sum, lr: 0.002, init: normal, init_scale: 0.5, weight_decay: 0.01}
data:
  class_path: hcl.datamodules.SyntheticRegression
  init_args: {kind: gaussian_linear, n: 51, d: 6, seed: 0, dtype: float64, val_n: 7, test_n: 9}
"""


def _series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_same_run(one: dict, two: dict, tags: tuple[str, ...], steps: list[int], optimum_tag: str) -> None:
    for tag in tags:
        # Rank zero alone logs: each step once, not once per process.
        assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]], tag
    assert [s for s, _ in two["train/objective"]] == steps
    # Full-batch gradient descent on two shards follows the one-process path.
    for (_, single), (_, double) in zip(one["train/objective"], two["train/objective"]):
        assert double == pytest.approx(single, rel=1e-4)
    assert two[optimum_tag][0][1] == pytest.approx(one[optimum_tag][0][1], rel=1e-6)
    assert two[optimum_tag][-1][1] == pytest.approx(one[optimum_tag][-1][1], rel=1e-4)
    for tag in ("patterns/unique", "patterns/new", "patterns/changed", "patterns/dead"):
        assert two[tag] == one[tag], tag


def test_cli_ddp_spawn_matches_one_process_with_reduction_sum(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    runs = {}
    for devices, shard in ((1, True), (2, True), (2, False)):
        root = tmp_path / f"devices{devices}{shard}"
        args = ["--config", str(config), f"--trainer.default_root_dir={root}", f"--trainer.devices={devices}",
                "--trainer.accelerator=cpu", f"--data.init_args.shard={str(shard).lower()}"]
        if devices == 2:
            args.append("--trainer.strategy=ddp_spawn")
        main(args)
        runs[devices, shard] = _series(root / "lightning_logs" / "version_0")
    one, two = runs[1, True], runs[2, True]
    # every rank with the whole set: the union of the ranks' batches holds each point twice, and counts it once
    for (_, single), (_, unsharded) in zip(one["train/objective"], runs[2, False]["train/objective"], strict=True):
        assert unsharded == pytest.approx(single, rel=1e-6)
    _assert_same_run(one, two, ("convex/optimum", "convex_every_step/optimum", "patterns/unique"), list(range(6)),
                     "convex_every_step/optimum")
    assert [s for s, _ in two["convex/optimum"]] == [0, 2, 4]
    # the test after training, at the step it ended at: the spawned processes' step, not the main process's 0
    assert [s for s, _ in two["test/objective"]] == [s for s, _ in one["test/objective"]] == [6]
    assert two["epoch"] == one["epoch"]  # the spawned processes' epoch too, at every step and at the test
    assert two["test/objective"][0][1] == pytest.approx(one["test/objective"][0][1], rel=1e-4)
    # load_solution: every rank loaded the broadcast solution, or the gathered objective would drift from one process.
    loaded_step = dict(two["train/objective"])[2]
    assert loaded_step == pytest.approx(dict(two["convex/optimum"])[2], rel=1e-5)


def _plain_run(tmp_path: Path, devices: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64)
    y = (X @ torch.linspace(-1, 1, 5, dtype=torch.float64)).unsqueeze(1)
    model = TwoLayerReLU(in_features=5, hidden=10, reduction="mean", init="normal", init_scale=0.5, lr=0.1)
    callbacks = [
        PatternMonitor(),
        ConvexGapMonitor(formulation="neurons", solver="clarabel"),
        ConvexGapMonitor(formulation="neurons", solver="clarabel", prefix="convex_async", asynchronous=True,
                         worker="thread", max_pending=100),
    ]
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true", log_every_n_steps=1, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    # One batch of all 40 points; under DDP Lightning's distributed sampler gives each rank 20 of them.
    trainer.fit(model, DataLoader(TensorDataset(X, y), batch_size=40))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return _series(tmp_path / "run" / "version_0"), metrics


def test_plain_dataloader_shards_are_gathered_with_reduction_mean(tmp_path):
    one, one_metrics = _plain_run(tmp_path / "one", devices=1)
    two, two_metrics = _plain_run(tmp_path / "two", devices=2)
    _assert_same_run(one, two, ("convex/optimum", "convex_async/optimum", "patterns/unique"), list(range(5)),
                     "convex/optimum")
    # The asynchronous monitor solved every step on rank zero, at the same weights as the synchronous one.
    assert [s for s, _ in two["convex_async/optimum"]] == list(range(5))
    for (_, sync), (_, background) in zip(two["convex/optimum"], two["convex_async/optimum"]):
        assert background == pytest.approx(sync, rel=1e-6)
    # What rank zero logged comes back from the spawned processes.
    assert two_metrics["convex/optimum"] == pytest.approx(one_metrics["convex/optimum"], rel=1e-4)


def _validated_run(tmp_path: Path, devices: int, reduction: str = "sum", outputs: int = 1) -> tuple[dict, TwoLayerReLU]:
    torch.manual_seed(0)
    X, Xv = torch.randn(40, 4, dtype=torch.float64), torch.randn(31, 4, dtype=torch.float64)
    w = torch.linspace(-1, 1, 4, dtype=torch.float64)
    if outputs > 1:
        w = torch.stack([w, w.flip(0)], 1)[:, :outputs]
    model = TwoLayerReLU(in_features=4, hidden=6, out_features=outputs, reduction=reduction, lr=0.01,
                         weight_decay=0.01)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true", log_every_n_steps=1, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    # validation in batches of 7: several per rank, and under DDP each rank evaluates its half (31 points: Lightning's
    # sampler pads them to 32 by repeating the first, which must not count twice)
    y, yv = (X @ w).reshape(len(X), -1), (Xv @ w).reshape(len(Xv), -1)
    trainer.fit(model, DataLoader(TensorDataset(X, y), batch_size=40), DataLoader(TensorDataset(Xv, yv), batch_size=7))
    return _series(tmp_path / "run" / "version_0"), (Xv, yv)


def test_validation_with_reduction_sum_sums_over_every_batch_and_rank(tmp_path):
    """val/data_loss is the validation set's sum: it was a mean of the batches' sums, and under DDP the mean of the
    two ranks' half sums (half the one-process value), then counted the sampler's padding copy."""
    one, (Xv, yv) = _validated_run(tmp_path / "one", devices=1)
    two, _ = _validated_run(tmp_path / "two", devices=2)
    # at the step of the weights it is of: after the epoch's one step, the callbacks' step 1 and 2
    assert [s for s, _ in one["val/data_loss"]] == [s for s, _ in two["val/data_loss"]] == [1, 2]
    for (_, single), (_, double) in zip(one["val/data_loss"], two["val/data_loss"]):
        assert double == pytest.approx(single, rel=1e-6)
    # the first value against the weights after one step, recomputed: train/objective at step 1 is of them too
    torch.manual_seed(0)
    X, _ = torch.randn(40, 4, dtype=torch.float64), torch.randn(31, 4, dtype=torch.float64)
    model = TwoLayerReLU(in_features=4, hidden=6, reduction="sum", lr=0.01, weight_decay=0.01).double()
    y = (X @ torch.linspace(-1, 1, 4, dtype=torch.float64)).unsqueeze(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = (model(X) - y).square().sum() + model.penalty()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        expected = float((model(Xv) - yv).square().sum())
    assert one["val/data_loss"][0][1] == pytest.approx(expected, rel=1e-6)


def test_validation_with_reduction_mean_and_the_accuracy_of_two_outputs_match_one_process(tmp_path):
    """val/data_loss with "mean" divides the gathered sum by the gathered count (it was the local count, twice the
    value); train/acc counts the correct predictions of every rank."""
    one, _ = _validated_run(tmp_path / "one", devices=1, reduction="mean", outputs=2)
    two, _ = _validated_run(tmp_path / "two", devices=2, reduction="mean", outputs=2)
    for tag in ("val/data_loss", "val/acc", "train/acc", "train/objective"):
        assert [s for s, _ in one[tag]] == [s for s, _ in two[tag]] and one[tag], tag
        for (_, single), (_, double) in zip(one[tag], two[tag]):
            assert double == pytest.approx(single, rel=1e-6), tag


class _RankData(pl.LightningDataModule):
    """The 21 points on every rank (``copies``), or rank ``r`` of ``w`` holding the points ``r, r + w, …`` of its own
    (``shards``), read by a plain loader under ``use_distributed_sampler=False``."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, kind: str) -> None:
        super().__init__()
        self.X, self.y, self.kind = X, y, kind

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.X, self.y)

    def val_dataloader(self) -> DataLoader:  # the training set again, in batches of 4
        return self._loader(self.X, self.y, 4)

    def _loader(self, X: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        part = slice(None) if self.kind == "copies" else slice(rank, None, world)
        return DataLoader(TensorDataset(X[part], y[part]), batch_size=batch_size or len(X))


def _own_sampler_run(tmp_path: Path, devices: int, kind: str) -> dict:
    torch.manual_seed(0)
    X = torch.randn(21, 3, dtype=torch.float64)
    y = (X @ torch.linspace(-1, 1, 3, dtype=torch.float64)).unsqueeze(1)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        precision="64-true", log_every_n_steps=1, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0,
        callbacks=[PatternMonitor(), ConvexGapMonitor(formulation="neurons", solver="clarabel")],
    )
    trainer.fit(TwoLayerReLU(in_features=3, hidden=8, reduction="sum", lr=0.05, weight_decay=0.01),
                _RankData(X, y, kind))
    return _series(tmp_path / "run" / "version_0")


def test_each_ranks_own_loader_counts_every_point_once_with_reduction_sum(tmp_path):
    """Without DDP's sampler, every rank reading the whole set logged twice the objective and trained on twice the
    gradient, and the monitors solved a problem of every point twice (n = 42); shards of the ranks' own are gathered."""
    one = _own_sampler_run(tmp_path / "one", 1, "copies")
    for kind in ("copies", "shards"):
        two = _own_sampler_run(tmp_path / kind, 2, kind)
        # validated after each epoch's step: each rank's part of the set gathered, the same set on every rank once
        assert [s for s, _ in two["val/data_loss"]] == [s for s, _ in one["val/data_loss"]] == [1, 2, 3], kind
        for (_, single), (_, double) in zip(one["val/data_loss"], two["val/data_loss"]):
            assert double == pytest.approx(single, rel=1e-5), kind
        for tag in ("train/objective", "convex/optimum", "convex/nonconvex_objective"):
            assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]] == [0, 1, 2], (kind, tag)
            for (_, single), (_, double) in zip(one[tag], two[tag]):
                assert double == pytest.approx(single, rel=1e-5), (kind, tag)
        assert two["patterns/unique"] == one["patterns/unique"], kind
