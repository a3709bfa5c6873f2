"""Where the callbacks' data comes from (hcl.callbacks.data.training_data): probe, data module, dataloader."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, PatternMonitor
from hcl.callbacks.data import training_data
from hcl.datamodules import SyntheticRegression


def _fake_trainer(loader=None, datamodule=None, world_size=1, pending=None):
    """The parts of a trainer that training_data reads (a fitted trainer has them all).

    ``pending``: the loader the fit loop sets up on demand, when ``loader`` is not set up yet.
    """
    trainer = SimpleNamespace(datamodule=datamodule, train_dataloader=loader, world_size=world_size)

    def setup_data():
        trainer.train_dataloader = pending

    trainer.fit_loop = SimpleNamespace(setup_data=setup_data)
    return trainer


def _data(n=10, d=3):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=generator), torch.randn(n, generator=generator)


def test_the_probe_comes_first_and_max_samples_keeps_the_first_rows():
    X, y = _data()
    loader = DataLoader(TensorDataset(torch.zeros(4, 3), torch.zeros(4)), batch_size=4)
    got_X, got_y = training_data(_fake_trainer(loader), X, y)
    assert got_X is X and got_y is y  # the loader is not read
    got_X, got_y = training_data(_fake_trainer(loader), X, y, max_samples=4)
    assert torch.equal(got_X, X[:4]) and torch.equal(got_y, y[:4])
    got_X, got_y = training_data(_fake_trainer(loader), X, None)
    assert got_X is X and got_y is None


def test_a_data_module_gives_its_whole_training_set():
    dm = SyntheticRegression(kind="gaussian_linear", n=12, d=4, seed=3, batch_size=5)
    dm.setup("fit")
    X, y = training_data(_fake_trainer(datamodule=dm))
    expected_X, expected_y = dm.train_tensors()
    assert X is expected_X and y is expected_y  # not the first mini-batch: every point
    X, y = training_data(_fake_trainer(datamodule=dm), max_samples=7)
    assert torch.equal(X, expected_X[:7]) and torch.equal(y, expected_y[:7])


def test_a_dataloader_of_several_batches_is_read_once_and_stacked_in_order():
    X, y = _data(n=10)
    X_read, y_read = training_data(_fake_trainer(DataLoader(TensorDataset(X, y), batch_size=4)))
    assert torch.equal(X_read, X) and torch.equal(y_read, y)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_distributed_samplers_shard_is_read_as_the_whole_dataset_in_its_order(shuffle):
    # DDP's sampler interleaves the ranks' rows and pads with repeats: gathered, the row order depended on the number
    # of processes, and a resume in another number wiped the pattern history
    from torch.utils.data import DistributedSampler

    X, y = _data(n=11)
    dataset = TensorDataset(X, y)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=shuffle)
    trainer = _fake_trainer(DataLoader(dataset, batch_size=4, sampler=sampler), world_size=2)
    trainer.strategy = None  # nothing is gathered: a collective here would fail
    X_read, y_read = training_data(trainer)
    assert torch.equal(X_read, X) and torch.equal(y_read, y)


def _second_rank(monkeypatch, other: TensorDataset) -> None:
    """``gather_rows`` as on rank 0 of two whose rank 1 reads ``other`` whole (its rows, and its dataset's
    fingerprint)."""
    import hcl.callbacks.data as data_module

    def gather(trainer, tensor):
        if tensor.shape == (1, 3) and tensor.dtype == torch.float64:  # the datasets' fingerprints
            return torch.cat([tensor, data_module._fingerprint(other).reshape(1, 3)])
        return torch.cat([tensor, other.tensors[0 if tensor.ndim == 2 else 1]])

    monkeypatch.setattr(data_module, "gather_rows", gather)


@pytest.mark.parametrize("sampler", ["distributed", "sequential", "random"])
def test_a_dataset_sharded_beforehand_is_read_in_order_and_gathered(monkeypatch, sampler):
    # each rank holds its own part (a single-replica sampler, or none, under DDP), which the others need; it was
    # said to repeat samples (12 rows of a 6-sample dataset: this rank's own part)
    from torch.utils.data import DistributedSampler

    X, y = _data(n=12)
    dataset = TensorDataset(X[:6], y[:6])
    samplers = {"distributed": DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True),
                "sequential": None, "random": torch.utils.data.RandomSampler(dataset)}
    trainer = _fake_trainer(DataLoader(dataset, batch_size=4, sampler=samplers[sampler]), world_size=2)
    _second_rank(monkeypatch, TensorDataset(X[6:], y[6:]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X_read, y_read = training_data(trainer)
    assert torch.equal(X_read, X) and torch.equal(y_read, y)
    assert not [w for w in caught if "yields" in str(w.message)]


def test_the_same_dataset_on_every_rank_is_read_once(monkeypatch):
    """Every rank reading the whole set (use_distributed_sampler=False): it was gathered twice (n = 2 × 6) and said to
    repeat samples; the model counts it once (training_copies)."""
    from hcl.callbacks.data import training_copies

    X, y = _data(n=6)
    trainer = _fake_trainer(DataLoader(TensorDataset(X, y), batch_size=4), world_size=2)
    _second_rank(monkeypatch, TensorDataset(X.clone(), y.clone()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X_read, y_read = training_data(trainer)
    assert torch.equal(X_read, X) and torch.equal(y_read, y)
    assert not [w for w in caught if "yields" in str(w.message)]
    assert training_copies(trainer) == 2
    _second_rank(monkeypatch, TensorDataset(X + 1, y))  # another dataset of the same length: shards
    assert training_copies(trainer) == 1


def test_a_dataloader_not_set_up_yet_is_set_up_first():
    X, y = _data(n=10)
    trainer = _fake_trainer(pending=DataLoader(TensorDataset(X, y), batch_size=3))
    X_read, y_read = training_data(trainer)
    assert torch.equal(X_read, X) and torch.equal(y_read, y)


def test_a_single_full_batch_is_kept_as_it_is():
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=None, sampler=[slice(None)])  # one batch: (X, y) itself
    X_read, y_read = training_data(_fake_trainer(loader))
    assert X_read.data_ptr() == X.data_ptr() and y_read.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("batch_size", [3, 10])
def test_a_tensor_dataset_of_inputs_only_has_no_targets(batch_size):
    X, _ = _data()
    X_read, y_read = training_data(_fake_trainer(DataLoader(TensorDataset(X), batch_size=batch_size)))
    assert torch.equal(X_read, X) and y_read is None


def test_plain_tensor_batches_are_inputs():
    X, _ = _data(n=6)
    X_read, y_read = training_data(_fake_trainer([X[:2], X[2:]]))
    assert torch.equal(X_read, X) and y_read is None


def _loader(X, y, batch_size=4):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


# Each case: (X, y) -> (trainer, probe, target).
UNUSABLE = {
    "empty-loader": (lambda X, y: (_fake_trainer(_loader(X[:0], y[:0])), None, None),
                     "the training dataloader is empty"),
    "no-loader": (lambda X, y: (_fake_trainer(), None, None), "no training data found: pass probe="),
    "dict-batch": (lambda X, y: (_fake_trainer([{"x": X}]), None, None),
                   "cannot read inputs from a training batch of type dict"),
    "ragged": (lambda X, y: (_fake_trainer([X[:, :2], X]), None, None), "cannot be stacked into one data set"),
    "nan-inputs": (lambda X, y: (_fake_trainer(_loader(X.index_fill(0, torch.tensor([3]), float("nan")), y)),
                                 None, None),
                   "contains NaN or inf"),
    "inf-targets": (lambda X, y: (_fake_trainer(_loader(X, y.index_fill(0, torch.tensor([8]), float("inf")))),
                                  None, None),
                    "targets to evaluate the network on contain NaN or inf"),
    "short-target": (lambda X, y: (_fake_trainer(), X, y[:4]),
                     r"targets have shape \(4,\) but the inputs have 10 rows"),
    "empty-probe": (lambda X, y: (_fake_trainer(), X[:0], None), "the data to evaluate the network on is empty"),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_data_is_refused_with_a_message(case):
    make, message = UNUSABLE[case]
    trainer, probe, target = make(*_data())
    with pytest.raises(ValueError, match=message):
        training_data(trainer, probe, target)


def test_a_data_module_without_train_tensors_is_read_through_its_dataloader():
    X, y = _data(n=9)

    class LoaderOnly:
        def train_dataloader(self):
            return DataLoader(TensorDataset(X, y), batch_size=4)

    X_read, y_read = training_data(_fake_trainer(LoaderOnly().train_dataloader(), datamodule=LoaderOnly()))
    assert torch.equal(X_read, X) and torch.equal(y_read, y)


# ----------------------------------------------------------------- through the callbacks, in a real training run
def test_the_callbacks_read_the_training_dataloader_when_training_starts(make_trainer):
    X, y = _data(n=12)
    model = TwoLayerReLU(in_features=3, hidden=4).double()
    loader = DataLoader(TensorDataset(X.double(), y.double()), batch_size=5)
    seen = {}

    class Recording(PatternMonitor):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            seen["X"], seen["y"] = self.training_data(trainer)

    make_trainer([Recording()], max_steps=1, logger=False).fit(model, loader)
    assert torch.equal(seen["X"], X.double()) and torch.equal(seen["y"], y.double())


def test_a_monitor_that_needs_targets_refuses_inputs_only(make_trainer):
    X, _ = _data(n=8)
    model = TwoLayerReLU(in_features=3, hidden=4).double()
    loader = DataLoader(TensorDataset(X.double()), batch_size=8)
    with pytest.raises(ValueError, match="ConvexGapMonitor needs targets: the training data has none"):
        make_trainer([ConvexGapMonitor(solver="clarabel")], max_steps=1, logger=False).fit(model, loader)


def test_telling_the_ranks_datasets_apart_draws_no_random_numbers_and_sees_augmented_copies(monkeypatch):
    """Reading a randomly augmented dataset's items drew from the training run's generators, and ranks on other random
    streams saw different items: the same data set taken for parts of one (gathered twice)."""
    import hcl.callbacks.data as data_module

    X, y = _data(n=6)

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return X[i] + 0.1 * torch.randn(X.shape[1]), y[i]

    seen = []
    monkeypatch.setattr(data_module, "gather_rows", lambda trainer, t: seen.append(t) or torch.cat([t, t]))
    trainer = _fake_trainer(DataLoader(Noisy(), batch_size=4), world_size=2)
    for seed in (1, 2):  # two ranks' random streams
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        assert data_module.rank_datasets(trainer, trainer.train_dataloader) == (True, 12)
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(seen[0], seen[1])


def test_a_weighted_sampler_reads_its_dataset_and_no_sampler_or_loader_generator_moves():
    """A WeightedRandomSampler's pass was a resample (24 of 40 samples); a pass advanced a sampler's own generator,
    so that training differed from a run without the callbacks."""
    from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

    X, y = _data(n=40)
    weighted = DataLoader(TensorDataset(X, y), batch_size=8, sampler=WeightedRandomSampler(torch.rand(40), 40))
    X_read, y_read = training_data(_fake_trainer(weighted))
    assert torch.equal(X_read, X) and torch.equal(y_read, y)
    for make in (lambda g: DataLoader(TensorDataset(X, y), batch_size=8, generator=g),  # its workers' seed
                 lambda g: DataLoader(TensorDataset(X, y), batch_size=8, sampler=SubsetRandomSampler(range(40), g))):
        generator = torch.Generator().manual_seed(1)
        before = generator.get_state()
        training_data(_fake_trainer(make(generator)))
        assert torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("draws", [40, 41, 100])
def test_under_ddp_a_wrapped_weighted_sampler_reads_its_dataset_whole_on_every_rank_and_keeps_its_generator(draws):
    """Lightning wraps a user's WeightedRandomSampler in a DistributedSamplerWrapper under DDP: the pass had gathered
    the ranks' weighted draws (a resample) and advanced the sampler's generator, so that training differed without
    the callbacks. The draws' padding and drop_last are not the callbacks' samples: no warning about them."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import WeightedRandomSampler

    from hcl.callbacks.data import training_copies

    X, y = _data(n=40)
    generator = torch.Generator().manual_seed(1)
    inner = WeightedRandomSampler(torch.rand(40), draws, generator=generator)
    before = generator.get_state()
    sampler = DistributedSamplerWrapper(inner, num_replicas=2, rank=1)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, sampler=sampler, drop_last=True)
    trainer = _fake_trainer(loader, world_size=2)
    trainer.strategy = None  # nothing is gathered: a collective here would fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X_read, y_read = training_data(trainer)
    assert torch.equal(X_read, X) and torch.equal(y_read, y)
    assert not [w for w in caught if "pads" in str(w.message) or "drop_last" in str(w.message)]
    assert torch.equal(generator.get_state(), before)
    assert training_copies(trainer) == 1  # each draw trains on one rank


def test_loaders_without_automatic_batching_give_their_samples_or_batches(monkeypatch):
    """batch_size=None: a shuffled dataset of whole batches was refused ("a training batch of type list"), a dataset
    of single samples read as one row per feature (160 rows for 40 samples)."""
    X, y = _data(n=40)

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return X[10 * i:10 * (i + 1)], y[10 * i:10 * (i + 1)]

    X_read, y_read = training_data(_fake_trainer(DataLoader(Batches(), batch_size=None, shuffle=True)))
    assert torch.equal(X_read, X) and torch.equal(y_read, y)
    X_read, y_read = training_data(_fake_trainer(DataLoader(TensorDataset(X, y[:, None]), batch_size=None)))
    assert torch.equal(X_read, X) and torch.equal(y_read, y[:, None])
    # inputs only, and targets as wide as the inputs: told apart by the hidden layer's width
    X_read, _ = training_data(_fake_trainer(DataLoader(TensorDataset(X), batch_size=None)), in_features=3)
    assert torch.equal(X_read, X)
    wide = torch.randn(40, 3)
    X_read, y_read = training_data(_fake_trainer(DataLoader(TensorDataset(X, wide), batch_size=None)), in_features=3)
    assert torch.equal(X_read, X) and torch.equal(y_read, wide)
    import hcl.callbacks.data as data_module

    warned = []
    monkeypatch.setattr(data_module, "rank_zero_warn", warned.append)
    images = torch.randn(40, 1, 2, 2)  # image samples: 40 of them, not 40 batches of one row each
    X_read, _ = training_data(_fake_trainer(DataLoader(TensorDataset(images, y), batch_size=None)), in_features=4)
    assert X_read.shape == (40, 1, 2, 2) and not warned, warned


def test_gathered_rows_come_in_rank_order_whatever_their_sizes():
    """Rank 0's rows first, then rank 1's, without the padding the collective needs: `max_samples` keeps the first
    rows, which must be the same rows whatever the number of processes."""
    from hcl.callbacks.data import gather_rows

    shards = [torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[10.0], [11.0]])]

    class TwoRanks:  # what Lightning's all_gather returns on two ranks: (world, *shape)
        root_device = torch.device("cpu")

        def all_gather(self, tensor):
            if tensor.shape == (1,):
                return torch.stack([torch.tensor([len(shard)]) for shard in shards])
            out = torch.zeros(len(shards), *tensor.shape)
            for rank, shard in enumerate(shards):
                out[rank, : len(shard)] = shard
            return out

    gathered = gather_rows(SimpleNamespace(strategy=TwoRanks()), shards[0])
    assert gathered.flatten().tolist() == [0.0, 1.0, 2.0, 10.0, 11.0]


@pytest.mark.parametrize("n", [40, 41, 45])
def test_a_shuffling_loader_is_read_whole_in_order_whatever_its_last_batch(n):
    """The in-order pass over a shuffling loader's dataset ends with a full, a one-row or a partial batch."""
    X, y = _data(n=n)
    loader = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every sample is read: no partial-pass warning
        X_read, y_read = training_data(_fake_trainer(loader))
    assert torch.equal(X_read, X) and torch.equal(y_read, y)


def test_a_pass_that_drops_the_last_batch_says_how_many_samples_it_misses():
    X, y = _data(n=41)
    with pytest.warns(UserWarning, match="40 of its dataset's 41 samples"):
        X_read, _ = training_data(_fake_trainer(DataLoader(TensorDataset(X, y), batch_size=10, drop_last=True)))
    assert torch.equal(X_read, X[:40])
