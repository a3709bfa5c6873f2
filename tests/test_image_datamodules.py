"""Tests of hcl.datamodules' image data sets: MNIST and CIFAR-10 read from tiny files in the real formats, the real
MNIST where it is present, and the full-size configs run on tiny files."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from _datamodule_utils import MNIST_FILES, REAL_MNIST_ROOT

from hcl.datamodules import CIFAR10, MNIST, SyntheticRegression


# --------------------------------------------------------------------------- MNIST on tiny IDX files
def _write_mnist(raw: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        n = len(labels[prefix])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images[prefix].tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels[prefix].tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    images = {p: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for p, n in (("train", 40), ("t10k", 12))}
    labels = {"train": np.arange(40, dtype=np.uint8) % 10, "t10k": np.arange(12, dtype=np.uint8) % 10}
    _write_mnist(tmp_path / "MNIST" / "raw", images, labels)
    return tmp_path, images, labels


def test_mnist_pixels_targets_and_test_split(tiny_mnist):
    root, images, labels = tiny_mnist
    raw = torch.from_numpy(images["train"].reshape(40, 784).astype(np.float64)) / 255
    X, y = MNIST(root=root, normalize=False, dtype="float64").train_tensors()
    assert X.shape == (40, 784) and X.dtype == torch.float64
    torch.testing.assert_close(X, raw, rtol=0, atol=1e-12)
    assert torch.equal(y, torch.eye(10, dtype=torch.float64)[torch.from_numpy(labels["train"]).long()])

    dm = MNIST(root=root)
    X, y = dm.train_tensors()
    assert X.dtype == y.dtype == torch.float32
    torch.testing.assert_close(X, ((raw - 0.1307) / 0.3081).float())

    Xt, yt = dm._splits["test"]
    assert Xt.shape == (12, 784)
    assert torch.equal(yt.argmax(1), torch.from_numpy(labels["t10k"]).long())

    _, indices = MNIST(root=root, one_hot=False).train_tensors()
    assert indices.dtype == torch.int64 and torch.equal(indices, torch.from_numpy(labels["train"]).long())


def test_mnist_class_subset_is_remapped_in_the_given_order(tiny_mnist):
    root, images, labels = tiny_mnist
    dm = MNIST(root=root, classes=[7, 3], normalize=False)
    assert dm.out_features == dm.num_classes == 2
    X, y = dm.train_tensors()
    keep = np.flatnonzero(np.isin(labels["train"], [7, 3]))
    assert X.shape == (len(keep), 784) and y.shape == (len(keep), 2)
    torch.testing.assert_close(X, torch.from_numpy(images["train"][keep].reshape(-1, 784)).float() / 255)
    expected = torch.from_numpy((labels["train"][keep] == 3).astype(np.int64))  # 7 -> 0, 3 -> 1
    assert torch.equal(y.argmax(1), expected) and torch.equal(y.sum(1), torch.ones(len(keep)))
    assert set(dm._splits["test"][1].argmax(1).tolist()) == {0, 1}


def test_mnist_validation_split_and_subset(tiny_mnist):
    root, images, _ = tiny_mnist

    def rows(X):
        return {tuple((x * 255).round().long().tolist()) for x in X}

    dm = MNIST(root=root, normalize=False, val_size=8, subset=20, seed=3)
    X, _ = dm.train_tensors()
    Xv, _ = dm._splits["val"]
    assert X.shape[0] == 20 and Xv.shape[0] == 8
    assert not rows(X) & rows(Xv)
    assert rows(X) | rows(Xv) <= rows(torch.from_numpy(images["train"].reshape(40, 784)).float() / 255)

    again = MNIST(root=root, normalize=False, val_size=8, subset=20, seed=3)
    assert torch.equal(again.train_tensors()[0], X) and torch.equal(again._splits["val"][0], Xv)
    assert not torch.equal(MNIST(root=root, normalize=False, val_size=8, subset=20, seed=4).train_tensors()[0], X)

    first = MNIST(root=root, normalize=False, subset=5, random_subset=False).train_tensors()[0]
    torch.testing.assert_close(first, torch.from_numpy(images["train"][:5].reshape(5, 784)).float() / 255)

    with pytest.raises(ValueError, match="has 40 training points"):
        MNIST(root=root, val_size=30, subset=20).setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=[3]), "at least two classes"),
        (dict(classes=[3, 3]), "must not repeat"),
        (dict(classes=[1, 10]), r"integers in \[0, 10\)"),
        (dict(subset=0), "subset"),
        (dict(val_size=-1), "val_size"),
        (dict(dtype="int8"), "dtype"),
    ],
)
def test_image_modules_reject_bad_arguments(kwargs, message):
    for module in (MNIST, CIFAR10):
        with pytest.raises(ValueError, match=message):
            module(root="data", **kwargs)


@pytest.mark.parametrize("flag", ["download", "random_subset", "one_hot", "normalize", "shard"])
def test_image_modules_refuse_a_flag_that_is_not_a_bool(flag):
    for module in (MNIST, CIFAR10):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'false'"):  # a string counted as true
            module(root="data", **{flag: "false"})


def test_numpy_integers_are_integers(tiny_mnist):  # and the synthetic module's
    root, _, _ = tiny_mnist
    dm = MNIST(root=root, subset=np.int64(6), val_size=np.int32(5), batch_size=np.int64(4), seed=np.int64(1),
               classes=np.array([0, 1, 2]))
    dm.setup("fit")
    X, Y = dm.train_tensors()
    assert X.shape[0] == 6 and Y.shape[1] == 3 and dm._split("val")[0].shape[0] == 5
    synthetic = SyntheticRegression(n=np.int64(10), d=np.int32(3), val_n=np.int64(2), seed=np.int64(4))
    synthetic.setup("fit")
    assert synthetic.train_tensors()[0].shape == (10, 3) and synthetic.in_features == 3


def test_mnist_missing_files_raise_file_not_found_naming_root_and_files(tmp_path):
    dm = MNIST(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message and "download=True" in message
    assert all(os.path.join("MNIST", "raw", name) in message for name in MNIST_FILES)


def test_a_truncated_mnist_file_is_named_as_such(tmp_path):
    rng = np.random.default_rng(0)
    images = {split: rng.integers(0, 256, (4, 28, 28), dtype=np.uint8) for split in ("train", "t10k")}
    labels = {split: rng.integers(0, 10, 4, dtype=np.uint8) for split in ("train", "t10k")}
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw, images, labels)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])  # a download cut short
    with pytest.raises(RuntimeError, match="truncated or damaged") as caught:
        MNIST(root=tmp_path).setup("fit")
    assert str(tmp_path) in str(caught.value)
    path.write_bytes(b"\x00\x00\x05\x09" + path.read_bytes()[4:])  # a damaged header: a bare assertion inside
    with pytest.raises(RuntimeError, match="truncated or damaged"):
        MNIST(root=tmp_path).setup("fit")


@pytest.mark.parametrize("one_hot", [True, False])
def test_a_damaged_mnist_label_is_named_as_such(tiny_mnist, one_hot):
    root, _, _ = tiny_mnist
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[13] = 200  # the sixth label: no class
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"training labels .* outside \[0, 10\) \(min 0, max 200\).*damaged"):
        MNIST(root=root, one_hot=one_hot, subset=2).setup("fit")  # whichever points the subset draws


def test_mnist_download_goes_through_torchvision_only_in_prepare_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    images = {
        "train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    }
    labels = {"train": np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8), "t10k": np.array([6, 7, 8], dtype=np.uint8)}
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append(filename)
        if len(calls) == 4:  # the last archive: write what the four would have unpacked to
            _write_mnist(Path(download_root), images, labels)

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fake_download)
    MNIST(root=tmp_path).prepare_data()
    assert calls == []
    dm = MNIST(root=tmp_path, download=True, normalize=False)
    dm.prepare_data()
    assert sorted(calls) == sorted(f"{name}.gz" for name in MNIST_FILES)
    X, _ = dm.train_tensors()
    torch.testing.assert_close(X, torch.from_numpy(images["train"].reshape(6, 784)).float() / 255)
    dm.prepare_data()  # the files are there now: nothing is downloaded again
    assert len(calls) == 4


def test_a_failed_download_is_a_connection_error_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    def offline(url, download_root, filename=None, md5=None, **kwargs):
        os.makedirs(download_root, exist_ok=True)
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConnectionError, match=r"could not download MNIST into .*data'.*Name or service not known"):
        MNIST(root=tmp_path / "data", download=True).prepare_data()
    assert list((tmp_path / "data").iterdir()) == []  # its own folder kept, the empty MNIST/raw removed


@pytest.mark.skipif(
    REAL_MNIST_ROOT is None, reason="the real MNIST is neither at ../shared/data/MNIST/raw nor at $HCL_MNIST_ROOT"
)
def test_real_mnist_small_subset_matches_the_raw_files():
    dm = MNIST(root=REAL_MNIST_ROOT, subset=64, random_subset=False, normalize=False)
    X, y = dm.train_tensors()
    raw = REAL_MNIST_ROOT / "MNIST" / "raw"
    with open(raw / "train-images-idx3-ubyte", "rb") as f:
        assert struct.unpack(">IIII", f.read(16)) == (2051, 60000, 28, 28)
        pixels = np.frombuffer(f.read(64 * 784), dtype=np.uint8).reshape(64, 784)
    with open(raw / "train-labels-idx1-ubyte", "rb") as f:
        assert struct.unpack(">II", f.read(8)) == (2049, 60000)
        digits = np.frombuffer(f.read(64), dtype=np.uint8)
    assert X.shape == (64, 784) and y.shape == (64, 10)
    torch.testing.assert_close(X, torch.from_numpy(pixels.astype(np.float32)) / 255)
    assert torch.equal(y.argmax(1), torch.from_numpy(digits.astype(np.int64)))
    assert dm._splits["test"][0].shape == (10000, 784)
    normalized = MNIST(root=REAL_MNIST_ROOT, subset=2000, classes=[0, 1]).train_tensors()[0]
    assert normalized.shape == (2000, 784)
    assert abs(normalized.mean().item()) < 0.3 and 0.7 < normalized.std().item() < 1.3


# --------------------------------------------------------------------------- CIFAR-10 on tiny pickled batches
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _write_cifar(folder: Path, per_batch: int = 4, test_n: int = 6, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in CIFAR_BATCHES:
        n = test_n if name == "test_batch" else per_batch
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        batches[name] = entry
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return batches


@pytest.fixture
def no_md5_check(monkeypatch):
    """Fake batches have other checksums: check only that the files exist, as torchvision's own tests do."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar_flattens_channel_first_and_standardises_per_channel(tmp_path, no_md5_check):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    rows = np.concatenate([batches[name]["data"] for name in CIFAR_BATCHES[:5]])
    labels = torch.tensor(sum((batches[name]["labels"] for name in CIFAR_BATCHES[:5]), []))
    raw = torch.from_numpy(rows.astype(np.float64)) / 255

    X, y = CIFAR10(root=tmp_path, normalize=False, dtype="float64").train_tensors()
    assert X.shape == (20, 3072)
    torch.testing.assert_close(X, raw, rtol=0, atol=1e-12)  # the files' own layout: R plane, G plane, B plane
    assert torch.equal(y.argmax(1), labels) and torch.equal(y.sum(1), torch.ones(20, dtype=torch.float64))

    dm = CIFAR10(root=tmp_path, dtype="float64", one_hot=False)
    X, y = dm.train_tensors()
    for channel, (mean, std) in enumerate(zip((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))):
        plane = slice(1024 * channel, 1024 * (channel + 1))
        torch.testing.assert_close(X[:, plane], (raw[:, plane] - mean) / std)
    assert y.dtype == torch.int64 and torch.equal(y, labels)
    Xt, yt = dm._splits["test"]
    assert Xt.shape == (6, 3072) and torch.equal(yt, torch.tensor(batches["test_batch"]["labels"]))


def test_cifar_class_subset_and_validation(tmp_path, no_md5_check):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", per_batch=30, seed=1)
    labels = np.array(sum((batches[name]["labels"] for name in CIFAR_BATCHES[:5]), []))
    kept = int(np.isin(labels, [2, 5, 9]).sum())
    dm = CIFAR10(root=tmp_path, classes=[2, 5, 9], val_size=5, one_hot=False)
    X, y = dm.train_tensors()
    Xv, yv = dm._splits["val"]
    assert X.shape == (kept - 5, 3072) and Xv.shape == (5, 3072)
    assert set(torch.cat([y, yv]).tolist()) == {0, 1, 2}
    counts = torch.bincount(torch.cat([y, yv]), minlength=3)
    assert counts.tolist() == [int((labels == c).sum()) for c in (2, 5, 9)]


def test_cifar_missing_or_corrupt_batches_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as caught:
        CIFAR10(root=tmp_path).setup("fit")
    assert all(name in str(caught.value) for name in CIFAR_BATCHES + ["batches.meta"])
    assert str(caught.value).count("(missing)") == len(CIFAR_BATCHES) + 1
    _write_cifar(tmp_path / "cifar-10-batches-py")  # right names, wrong md5 without the patch
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="corrupted") as caught:
        CIFAR10(root=tmp_path).setup("fit")
    assert str(caught.value).count("(missing)") == 1 and "data_batch_3 (missing)" in str(caught.value)


def test_cifar_download_goes_through_torchvision_only_in_prepare_data(tmp_path, monkeypatch, no_md5_check):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, os.fspath(download_root), filename))
        _write_cifar(Path(download_root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    CIFAR10(root=tmp_path).prepare_data()
    assert calls == []
    dm = CIFAR10(root=tmp_path, download=True)
    dm.prepare_data()
    assert calls == [(torchvision.datasets.CIFAR10.url, os.fspath(tmp_path), "cifar-10-python.tar.gz")]
    assert dm.train_tensors()[0].shape == (20, 3072)


# --------------------------------------------------------------------------- the full-size configs on tiny files
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _run_config(config: str, root: Path, logs: Path, *extra: str) -> dict[str, list[tuple[int, float]]]:
    from _events import read_scalars

    from hcl.fit import main

    main(["--config", str(CONFIGS / config), f"--data.root={root}", f"--trainer.default_root_dir={logs}",
          "--trainer.accelerator=cpu", "--model.hidden=6", "--trainer.enable_progress_bar=false",
          # the last callback of the list is the convex monitor: a short limit keeps the test's end-of-training drain
          "--trainer.callbacks.solve_time_limit=5", *extra])
    return read_scalars(logs)


@pytest.mark.slow
def test_mnist_config_trains_on_mini_batches_and_logs_patterns_validation_and_the_convex_gap(tiny_mnist, tmp_path):
    root, _, _ = tiny_mnist
    scalars = _run_config("mnist.yaml", root, tmp_path / "logs", "--data.val_size=10", "--data.batch_size=10",
                          "--trainer.max_epochs=2")
    assert [step for step, _ in scalars["patterns/unique"]] == [0, 1, 2, 3, 4, 5]  # 30 images, batches of 10
    assert len(scalars["val/acc"]) == 2 and scalars["convex/status"][0][0] == 0
    assert all(value > 0 for _, value in scalars["train/penalty"])  # weight decay > 0


@pytest.mark.slow
def test_cifar10_config_runs_on_tiny_batches(tmp_path, no_md5_check):
    _write_cifar(tmp_path / "cifar-10-batches-py", per_batch=6)
    scalars = _run_config("cifar10.yaml", tmp_path, tmp_path / "logs", "--data.val_size=10", "--data.batch_size=10",
                          "--trainer.max_epochs=1")
    assert [step for step, _ in scalars["patterns/unique"]] == [0, 1] and "val/acc" in scalars
    assert scalars["convex/status"][0][0] == 0 and "convex/solve_seconds" in scalars


def test_mnist_val_size_taking_every_point_names_the_shortage(tiny_mnist):
    """Catches: (needed = val_size + (subset or 0)): holding out all 40 points leaves no training set."""
    root, _, _ = tiny_mnist
    with pytest.raises(ValueError, match=r"has 40 training points .* val_size=40 and subset=None need 41"):
        MNIST(root=root, val_size=40).setup("fit")


def test_mnist_val_size_plus_subset_may_use_every_point(tiny_mnist):
    """Catches: (needed >= n): val_size + subset == n is allowed and uses each point once."""
    root, _, _ = tiny_mnist
    dm = MNIST(root=root, normalize=False, val_size=8, subset=32)
    X, _ = dm.train_tensors()
    Xv, _ = dm.split_tensors("val")
    assert X.shape == (32, 784) and Xv.shape == (8, 784)


def test_mnist_validation_points_keep_the_files_order(tiny_mnist):
    """Catches: (val_index not sorted): the held-out points come in file order, like the training points."""
    root, images, _ = tiny_mnist
    flat = torch.from_numpy(images["train"].reshape(40, 784).astype(np.int64))
    dm = MNIST(root=root, normalize=False, dtype="float64", val_size=10, seed=3)
    for split in ("train", "val"):
        X = (dm.split_tensors(split)[0] * 255).round().long()
        index = [int(torch.nonzero((flat == row).all(1))[0]) for row in X]
        assert index == sorted(index) and len(set(index)) == len(index), split


@pytest.mark.parametrize("one_hot", [True, False])
def test_an_mnist_label_just_past_the_last_class_is_named_as_damaged(tiny_mnist, one_hot):
    """Catches: (labels.max() > 10): the label 10 is the first out of range."""
    root, _, _ = tiny_mnist
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[8 + 5] = 10
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"training labels .* outside \[0, 10\) \(min 0, max 10\).*damaged"):
        MNIST(root=root, one_hot=one_hot).setup("fit")


@pytest.mark.parametrize("one_hot", [True, False])
def test_a_negative_cifar_label_is_named_as_damaged(tmp_path, no_md5_check, one_hot):
    """Catches: (no labels.min() < 0 check): CIFAR's labels are a pickled list and can hold -1."""
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "data_batch_2", "rb") as f:
        entry = pickle.load(f)
    entry["labels"][1] = -1
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(RuntimeError, match=r"training labels .* outside \[0, 10\) \(min -1, .*damaged"):
        CIFAR10(root=tmp_path, one_hot=one_hot).setup("fit")


def test_mnist_setup_never_downloads_even_with_download_true(tmp_path, monkeypatch):
    """Catches: (_open passes download=self.download): only prepare_data may touch the network."""
    calls = []
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive",
                        lambda url, download_root, filename=None, md5=None, **kwargs: calls.append(filename))
    dm = MNIST(root=tmp_path, download=True)
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")  # prepare_data not called: the files are missing
    assert calls == []
