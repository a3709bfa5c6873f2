"""Tests of hcl.datamodules' loaders: full and mini-batches, devices, sharding across ranks, and resuming an epoch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _datamodule_utils import _attach, _pair
from torch import nn

from hcl.datamodules import SyntheticRegression, TensorDataModule, shard


# --------------------------------------------------------------------------- loaders and devices
def _indexed_module(n: int, **kwargs) -> TensorDataModule:
    """Inputs whose first column is the point's index, so coverage can be read off a batch."""
    X = torch.stack([torch.arange(n, dtype=torch.float32), torch.randn(n)], dim=1)
    return TensorDataModule(train=(X, 2 * X[:, :1]), **kwargs)


def test_full_batch_loader_yields_one_batch_with_every_point():
    dm = SyntheticRegression(n=37, d=5, val_n=4, test_n=3, seed=0)
    dm.setup("fit")
    for loader, (X, y) in (
        (dm.train_dataloader(), dm.train_tensors()),
        (dm.val_dataloader(), dm._splits["val"]),
        (dm.test_dataloader(), dm._splits["test"]),
    ):
        batches = list(loader)
        assert len(loader) == 1 and len(batches) == 1
        inputs, targets = batches[0]
        assert torch.equal(inputs, X) and torch.equal(targets, y)
    assert dm.train_tensors()[0].shape == (37, 5)


def test_setup_moves_every_split_to_the_root_device():
    dm = SyntheticRegression(n=8, d=2, val_n=2, test_n=2)
    _attach(dm, device="meta")
    dm.setup("fit")
    assert all(t.device.type == "meta" for pair in dm._splits.values() for t in pair)
    ((inputs, targets),) = list(dm.train_dataloader())
    assert inputs.device.type == "meta" and inputs.shape == (8, 2) and targets.shape == (8, 1)


def test_train_tensors_sets_up_lazily():
    dm = SyntheticRegression(n=6, d=2)
    assert dm._splits is None
    X, y = dm.train_tensors()
    assert X.shape == (6, 2) and y.shape == (6, 1)


def test_minibatch_loader_covers_every_point_once_per_epoch_in_a_seeded_order():
    def epoch_order(dm, epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(len(b[0]) <= 8 for b in batches) and len(batches) == 4
        for inputs, targets in batches:
            assert torch.equal(targets, 2 * inputs[:, :1])
        return torch.cat([inputs[:, 0] for inputs, _ in batches]).long()

    dm = _indexed_module(27, batch_size=8, seed=1)
    first = epoch_order(dm, 0)
    assert torch.equal(first.sort().values, torch.arange(27))
    assert not torch.equal(first, torch.arange(27))
    assert torch.equal(first, epoch_order(_indexed_module(27, batch_size=8, seed=1), 0))
    assert not torch.equal(first, epoch_order(dm, 1))
    assert not torch.equal(first, epoch_order(_indexed_module(27, batch_size=8, seed=2), 0))
    val = TensorDataModule(train=_pair(), val=_pair(n=10), batch_size=4).val_dataloader()
    assert [len(b[0]) for b in val] == [4, 4, 2]


def test_split_tensors_gives_every_split_whole_and_names_a_missing_one():
    test = _pair(n=3)
    dm = TensorDataModule(train=_pair(n=5), test=test, batch_size=2)
    X, y = dm.split_tensors("test")
    assert torch.equal(X, test[0]) and torch.equal(y, test[1])
    assert dm.split_tensors("train")[0].shape == (5, 3)
    with pytest.raises(KeyError, match="no validation set"):
        dm.split_tensors("val")


def test_missing_val_and_test_give_no_loader():
    dm = SyntheticRegression(n=5, d=2)
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


class _BatchRecorder(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch[0].shape[0], batch[0].device.type))


class _Regressor(pl.LightningModule):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)

    def training_step(self, batch, batch_idx):
        X, y = batch
        return (self.layer(X) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm, accelerator="cpu", epochs=3):
    recorder = _BatchRecorder()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(_Regressor(dm.in_features, dm.out_features), datamodule=dm)
    return trainer, recorder.batches


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_full_batch_is_one_step_per_epoch_without_val_loader():
    dm = SyntheticRegression(n=25, d=3)
    trainer, batches = _fit(dm)
    assert trainer.global_step == 3
    assert batches == [(0, 25, "cpu"), (1, 25, "cpu"), (2, 25, "cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check the move to the GPU")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_full_batch_lives_on_the_gpu():
    dm = SyntheticRegression(n=25, d=3, val_n=5)
    trainer, batches = _fit(dm, accelerator="gpu", epochs=2)
    assert batches == [(0, 25, "cuda"), (1, 25, "cuda")]
    assert all(t.is_cuda for pair in dm._splits.values() for t in pair)


# --------------------------------------------------------------------------- DDP sharding
@pytest.mark.parametrize("n, world_size", [(10, 3), (9, 3), (7, 2), (5, 5)])
def test_shards_are_disjoint_and_cover_every_point(n, world_size):
    X = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    shards = [shard(X, -X, rank, world_size) for rank in range(world_size)]
    indices = torch.cat([inputs[:, 0] for inputs, _ in shards]).long()
    assert torch.equal(indices.sort().values, torch.arange(n))
    assert max(len(s[0]) for s in shards) - min(len(s[0]) for s in shards) <= 1
    for inputs, targets in shards:
        assert torch.equal(targets, -inputs)


def test_shard_rejects_bad_ranks_and_too_few_points():
    X = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="rank must lie"):
        shard(X, X, 2, 2)
    with pytest.raises(ValueError, match="cannot shard 3 training points over 4 ranks"):
        shard(X, X, 0, 4)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_train_loader_is_sharded_by_rank_while_train_tensors_stay_whole(batch_size):
    seen = []
    for rank in range(3):
        dm = _indexed_module(11, batch_size=batch_size)
        _attach(dm, world_size=3, rank=rank)
        dm.setup("fit")
        indices = torch.cat([inputs[:, 0] for inputs, _ in dm.train_dataloader()]).long()
        assert torch.equal(indices.sort().values, torch.arange(rank, 11, 3))
        assert dm.train_tensors()[0].shape[0] == 11
        seen.append(indices)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(11))

    dm = _indexed_module(11, batch_size=batch_size, shard=False)
    _attach(dm, world_size=3, rank=1)
    indices = torch.cat([inputs[:, 0] for inputs, _ in dm.train_dataloader()]).long()
    assert torch.equal(indices.sort().values, torch.arange(11))



def test_tensor_module_rejects_non_tensor_pairs_early():
    with pytest.raises(TypeError, match="train must be an"):
        TensorDataModule(train=([[1.0]], [[1.0]]))
    with pytest.raises(TypeError, match="val must be an"):
        TensorDataModule(train=_pair(), val=_pair()[0])


def test_a_mid_epoch_checkpoint_resumes_with_the_batches_the_epoch_had_left(make_trainer, tmp_path):
    """Lightning replays a plain loader's epoch from its first batch; the data modules' loader skips the batches
    training took, so the resumed run is the uninterrupted one. Also from the checkpoint written where ``max_steps``
    ended an epoch early, which Lightning counts as processed: it set the sampler one epoch ahead from then on."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hcl import TwoLayerReLU

    def run(max_steps, root, ckpt_path=None, checkpoint=None, **overrides):
        torch.manual_seed(0)
        data = SyntheticRegression(kind="gaussian_linear", n=40, d=3, seed=1, batch_size=10)  # 4 batches an epoch
        model = TwoLayerReLU(in_features=3, hidden=5, lr=0.1)
        callbacks = [] if checkpoint is None else list(checkpoint)
        trainer = make_trainer(callbacks, max_steps=max_steps, root=root, logger=False,
                               enable_checkpointing=checkpoint is not None, **overrides)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model

    every_three = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "epochs", every_n_epochs=1, save_top_k=-1)
    reference = run(14, tmp_path / "a", checkpoint=[every_three, every_epoch])
    # after 6 steps, 2 into epoch 1 (named after the last logged step, 5: docs/reliability.md)
    mid_epoch = tmp_path / "ckpt" / "epoch=1-step=5.ckpt"
    assert torch.load(mid_epoch, weights_only=False)["global_step"] == 6
    run(6, tmp_path / "c", checkpoint=[ModelCheckpoint(dirpath=tmp_path / "end")])  # stopped 2 into epoch 1
    # the last step of epoch 2, and epoch 1's end (Lightning takes it up again without a validation loop, and starts
    # the next one with one)
    ends = (tmp_path / "ckpt" / "epoch=2-step=11.ckpt", tmp_path / "epochs" / "epoch=1-step=7.ckpt")
    for checkpoint, limit in [(mid_epoch, None), (next((tmp_path / "end").glob("*.ckpt")), None),
                              *((end, None) for end in ends), (ends[1], 0)]:
        resumed = run(14, tmp_path / "b", ckpt_path=str(checkpoint), limit_val_batches=limit)
        for name, value in reference.state_dict().items():  # (the replayed batches moved them by 8e-2)
            assert torch.equal(resumed.state_dict()[name], value), (checkpoint.name, name)


@pytest.mark.parametrize("n,world_size,batch_size", [(101, 2, 10), (33, 2, 4), (103, 4, 16), (200, 3, 50), (13, 3, 3)])
def test_every_rank_takes_the_same_number_of_mini_batches(n, world_size, batch_size):
    """Shards of different sizes (101 points over 2 ranks: 51 and 50) took 6 and 5 batches of 10: the rank with the
    sixth waited in its all-gather for a rank that had finished, and the run died ("Connection closed by peer")."""
    X = torch.randn(n, 3, dtype=torch.float64)
    module = TensorDataModule(train=(X, X[:, :1].clone()), batch_size=batch_size)
    counts, seen = set(), []
    for rank in range(world_size):
        _attach(module, world_size=world_size, rank=rank)
        batches = list(module.train_dataloader())
        counts.add(len(batches))
        assert max(b[0].shape[0] for b in batches) <= batch_size
        seen.extend(x for b in batches for x in b[0][:, 0].tolist())
    assert len(counts) == 1  # the same number of steps on every rank
    assert sorted(seen) == sorted(X[:, 0].tolist())  # every point once


def test_shards_that_cannot_take_the_same_number_of_batches_are_refused_by_name():
    module = TensorDataModule(train=(torch.randn(9, 2), torch.randn(9, 1)), batch_size=1)
    _attach(module, world_size=2, rank=1)
    with pytest.raises(ValueError, match="batch_size=1 with 9 training points over 2 ranks"):
        module.train_dataloader()
