"""Tests of hcl.datamodules: generated data, loaders, sharding and validation (the image data sets are in
test_image_datamodules.py)."""

from __future__ import annotations

import pytest
import torch
from _datamodule_utils import _all_splits, _pair

from hcl.datamodules import CIFAR10, MNIST, SyntheticRegression, TensorDataModule, validate_split


# --------------------------------------------------------------------------- synthetic data
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="gaussian_linear", n=30, d=4, noise=0.1, val_n=5, test_n=6),
        dict(kind="points", n=12, val_n=3, test_n=3),
        dict(kind="orthogonal", n=5, d=8),
    ],
)
def test_synthetic_same_seed_same_data_other_seed_other_data(kwargs):
    first = _all_splits(SyntheticRegression(seed=3, **kwargs))
    again = _all_splits(SyntheticRegression(seed=3, **kwargs))
    other = _all_splits(SyntheticRegression(seed=4, **kwargs))
    assert first.keys() == again.keys() == other.keys()
    for split in first:
        for a, b, c in zip(first[split], again[split], other[split]):
            assert torch.equal(a, b)
            assert not torch.allclose(a, c)


def test_synthetic_training_points_do_not_depend_on_extra_splits():
    alone = SyntheticRegression(n=20, d=3, seed=1).train_tensors()
    with_extra = SyntheticRegression(n=20, d=3, seed=1, val_n=7, test_n=2).train_tensors()
    assert torch.equal(alone[0], with_extra[0]) and torch.equal(alone[1], with_extra[1])


def test_gaussian_linear_unit_beta_and_exact_linear_labels():
    dm = SyntheticRegression(n=50, d=7, dtype="float64", val_n=10, seed=5)
    beta = dm.beta
    assert beta.shape == (7, 1)
    assert torch.linalg.norm(beta).item() == pytest.approx(1.0, abs=1e-12)
    for split in ("train", "val"):
        X, y = dm._splits[split]
        assert X.dtype == y.dtype == torch.float64
        torch.testing.assert_close(y, X @ beta, rtol=0, atol=1e-12)


def test_gaussian_linear_noise_has_the_requested_scale_and_keeps_inputs():
    clean = SyntheticRegression(n=4000, d=3, dtype="float64", seed=2)
    noisy = SyntheticRegression(n=4000, d=3, dtype="float64", noise=0.5, seed=2)
    X, (Xn, yn) = clean.train_tensors()[0], noisy.train_tensors()
    assert torch.equal(X, Xn)
    residual = yn - Xn @ noisy.beta
    assert residual.std().item() == pytest.approx(0.5, rel=0.05)
    assert X.std().item() == pytest.approx(1.0, rel=0.05)


def test_float32_data_round_the_float64_draw():
    X32, y32 = SyntheticRegression(n=10, d=3, seed=0).train_tensors()
    X64, y64 = SyntheticRegression(n=10, d=3, seed=0, dtype="float64").train_tensors()
    assert X32.dtype == torch.float32 and X64.dtype == torch.float64
    assert torch.equal(X32, X64.float()) and torch.equal(y32, y64.float())


def test_orthogonal_rows_are_orthonormal():
    dm = SyntheticRegression(kind="orthogonal", n=6, d=9, dtype="float64", seed=0)
    X, y = dm.train_tensors()
    assert X.shape == (6, 9) and y.shape == (6, 1)
    torch.testing.assert_close(X @ X.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    square = SyntheticRegression(kind="orthogonal", dtype="float64").train_tensors()[0]
    torch.testing.assert_close(square @ square.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)


def test_explicit_points_with_ones_column_single_neuron_example():
    dm = SyntheticRegression(kind="points", x=[-0.2, 1.0], y=[0.5, 1.0], append_ones=True, dtype="float64")
    assert (dm.in_features, dm.out_features, dm.task, dm.num_classes) == (2, 1, "regression", None)
    X, y = dm.train_tensors()
    assert torch.equal(X, torch.tensor([[-0.2, 1.0], [1.0, 1.0]], dtype=torch.float64))
    assert torch.equal(y, torch.tensor([[0.5], [1.0]], dtype=torch.float64))


def test_explicit_multidimensional_points():
    dm = SyntheticRegression(kind="points", x=[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], y=[[1.0, 2.0], [3.0, 4.0]])
    assert (dm.in_features, dm.out_features) == (3, 2)
    X, y = dm.train_tensors()
    assert X.shape == (2, 3) and y.shape == (2, 2)


def test_generated_points_lie_on_the_line_in_the_unit_interval():
    dm = SyntheticRegression(kind="points", n=200, append_ones=True, dtype="float64", test_n=100, seed=9)
    assert dm.in_features == 2
    for X, y in (dm.train_tensors(), dm._splits["test"]):
        x = X[:, 0]
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
        assert torch.equal(X[:, 1], torch.ones_like(x))
        torch.testing.assert_close(y[:, 0], 0.6 * x + 0.7, rtol=0, atol=1e-12)
    other = SyntheticRegression(kind="points", n=50, slope=-2.0, intercept=0.0, dtype="float64").train_tensors()
    torch.testing.assert_close(other[1], -2.0 * other[0], rtol=0, atol=1e-12)


def test_features_are_known_before_setup():
    cases = [
        (SyntheticRegression(), 10, 1),
        (SyntheticRegression(d=4, append_ones=True), 5, 1),
        (SyntheticRegression(kind="points", n=4, append_ones=True), 2, 1),
        (MNIST(root="does-not-exist"), 784, 10),
        (MNIST(root="does-not-exist", classes=[1, 7]), 784, 2),
        (CIFAR10(root="does-not-exist", classes=[0, 1, 2], one_hot=False), 3072, 3),
    ]
    for dm, in_features, out_features in cases:
        assert (dm.in_features, dm.out_features) == (in_features, out_features)
        assert dm._splits is None
    assert MNIST(root="x").task == "classification" and MNIST(root="x", classes=[2, 3]).num_classes == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="spiral"), "unknown kind 'spiral'"),
        (dict(kind="orthogonal", n=11, d=10), "n <= d"),
        (dict(kind="orthogonal", n=3, d=5, val_n=2), "val_n"),
        (dict(kind="points", x=[0.0, 1.0]), "needs both x and y"),
        (dict(kind="points", x=[[0.0, 1.0], [2.0]], y=[1.0, 2.0]), "equal-length lists"),
        (dict(kind="points", x=[0.0, 1.0], y=[1.0, 2.0], n=3), "n=3 but x holds 2 points"),
        (dict(kind="points", x=[0.0, 1.0], y=[1.0, 2.0], val_n=1), "no law"),
        (dict(kind="points", d=2), "1-D inputs"),
        (dict(kind="gaussian_linear", x=[1.0], y=[1.0]), "kind='points'"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(noise=-1.0), "noise"),
        (dict(noise=True), "noise must be a finite standard deviation"),
        (dict(append_ones="false"), "append_ones must be a bool, got 'false'"),  # a string counted as true
        (dict(dtype="float16"), "dtype"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_synthetic_bad_arguments_raise_early(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SyntheticRegression(**kwargs)


@pytest.mark.parametrize(
    "x, y, message",
    [
        ([float("nan"), 1.0], [0.5, 1.0], "training inputs contain NaN"),
        ([0.0, 1.0], [0.5, float("inf")], "training targets contain inf"),
        ([0.0, 1.0, 2.0], [0.5, 1.0], "different numbers of points: 3 inputs vs 2 targets"),
        ([], [], "training set is empty"),
    ],
)
def test_bad_explicit_points_raise_in_setup(x, y, message):
    dm = SyntheticRegression(kind="points", x=x, y=y)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


# --------------------------------------------------------------------------- validation of tensors
@pytest.mark.parametrize(
    "make, num_classes, error, message",
    [
        (lambda X, y: (X.index_fill(0, torch.tensor([1]), float("nan")), y), None, ValueError, "inputs contain NaN"),
        (lambda X, y: (X, y.index_fill(0, torch.tensor([0]), float("nan"))), None, ValueError, "targets contain NaN"),
        (lambda X, y: (X.index_fill(0, torch.tensor([2]), float("-inf")), y), None, ValueError, "inputs contain inf"),
        (lambda X, y: (X, y.index_fill(0, torch.tensor([3]), float("inf"))), None, ValueError, "targets contain inf"),
        (lambda X, y: (X[:0], y[:0]), None, ValueError, "set is empty"),
        (lambda X, y: (X[:, :0], y), None, ValueError, "no features"),
        (lambda X, y: (X, y[:3]), None, ValueError, "different numbers of points: 4 inputs vs 3 targets"),
        (lambda X, y: (X[:, 0], y), None, ValueError, r"inputs must be a 2-D tensor \(n, d\), got shape \(4,\)"),
        (lambda X, y: (X, y[:, 0]), None, ValueError, r"targets must be a 2-D tensor \(n, c\)"),
        (lambda X, y: (X, y.double()), None, TypeError, "targets have dtype torch.float64"),
        (lambda X, y: (X.long(), y), None, TypeError, "inputs must be floating point"),
        (lambda X, y: (X, torch.zeros(4, dtype=torch.int64)), None, TypeError, "floating point for regression"),
        (lambda X, y: (X, torch.tensor([0, 1, 2, 3])), 3, ValueError, r"class indices outside \[0, 3\)"),
        (lambda X, y: (X, torch.tensor([[0], [1], [2], [1]])), 3, ValueError, "class indices must be 1-D"),
        (lambda X, y: (X, torch.zeros(4, 2)), 3, ValueError, "2 columns but there are 3 classes"),
        (lambda X, y: (X.numpy(), y), None, TypeError, "must be a torch.Tensor"),
    ],
)
def test_validate_split_names_the_problem_and_the_split(make, num_classes, error, message):
    inputs, targets = make(*_pair())
    for split, name in (("train", "training"), ("val", "validation"), ("test", "test")):
        with pytest.raises(error, match=message) as caught:
            validate_split(inputs, targets, split, num_classes)
        assert str(caught.value).startswith(name)


def test_valid_splits_pass_validation():
    X, y = _pair()
    validate_split(X, y, "train")
    validate_split(X, torch.tensor([0, 2, 1, 2]), "train", num_classes=3)
    validate_split(X, torch.eye(3)[[0, 2, 1, 2]], "train", num_classes=3)


def test_setup_validates_every_split_and_the_feature_counts():
    X, y = _pair()
    bad_val = (X.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="validation inputs contain NaN"):
        TensorDataModule(train=(X, y), val=bad_val).setup("fit")
    with pytest.raises(ValueError, match="test inputs have 2 features but in_features is 3"):
        TensorDataModule(train=(X, y), test=_pair(d=2)).setup("test")
    with pytest.raises(ValueError, match="needs a training set"):
        TensorDataModule()


@pytest.mark.parametrize("options,message", [
    ({"slope": 5.0}, "slope shape the line of kind='points' without x and y, not kind='gaussian_linear'"),
    ({"kind": "orthogonal", "intercept": 3.0}, "intercept shape the line"),
    ({"kind": "points", "x": [1.0, 2.0], "y": [1.0, 2.0], "slope": 3.0}, "not explicit points"),
])
def test_a_line_option_the_kind_does_not_use_is_refused(options, message):
    """--data.slope=5 on the default kind ran the same data as without it."""
    with pytest.raises(ValueError, match=message):
        SyntheticRegression(**options)


def test_a_config_saved_with_the_lines_defaults_still_loads():
    SyntheticRegression(kind="gaussian_linear", slope=0.6, intercept=0.7)  # what earlier runs' config.yaml holds


def test_the_line_of_generated_points_takes_its_slope_and_intercept():
    module = SyntheticRegression(kind="points", n=20, slope=2.0, intercept=-1.0)
    X, y = _all_splits(module)["train"]
    assert torch.allclose(y, 2.0 * X - 1.0, atol=1e-6)


def test_setup_refuses_a_split_whose_targets_have_other_columns_than_the_training_set():
    """Catches: (no target-width check in _check_width)."""
    with pytest.raises(ValueError, match="validation targets have 2 columns but out_features is 1"):
        TensorDataModule(train=_pair(c=1), val=_pair(c=2)).setup("fit")
    with pytest.raises(ValueError, match="test targets have 3 columns but out_features is 1"):
        TensorDataModule(train=_pair(c=1), test=_pair(c=3)).setup("test")


def test_targets_without_columns_are_an_empty_set():
    """Catches: (only inputs checked for emptiness): targets (n, 0) passed validation and gave out_features 0."""
    X, _ = _pair()
    with pytest.raises(ValueError, match="training set is empty"):
        validate_split(X, torch.empty(4, 0), "train")
    with pytest.raises(ValueError, match="set is empty"):
        TensorDataModule(train=(X, torch.empty(4, 0))).setup("fit")


def test_negative_class_indices_are_refused():
    """Catches: (no targets.min() < 0 check)."""
    X, _ = _pair()
    with pytest.raises(ValueError, match=r"class indices outside \[0, 3\): min -1, max 2"):
        validate_split(X, torch.tensor([0, -1, 1, 2]), "val", num_classes=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="points", x=[0.0, 1.0], y=[1.0, 2.0], test_n=1), "no law"),
    (dict(kind="points", x=[0.0, 1.0], y=[1.0, 2.0], noise=0.1), "no law"),
    (dict(kind="orthogonal", n=3, d=5, noise=0.1), "noise, val_n and test_n must be 0"),
    (dict(kind="orthogonal", n=3, d=5, test_n=2), "noise, val_n and test_n must be 0"),
    (dict(kind="points", x=[0.0, 1.0], y=[1.0, 2.0], d=2), "d=2 but the points of x have 1 coordinates"),
    (dict(noise=float("inf")), "noise must be a finite standard deviation"),
    (dict(noise=float("nan")), "noise must be a finite standard deviation"),
])
def test_synthetic_options_the_data_cannot_honour_are_refused_early(kwargs, message):
    """Options that would be silently ignored (explicit points with test_n or noise, orthogonal rows with noise or
    test_n), explicit points of another dimension than d, and a noise that is not finite are refused at construction."""
    with pytest.raises(ValueError, match=message):
        SyntheticRegression(**kwargs)


def test_noisy_and_clean_sets_share_the_inputs_of_every_split():
    """Catches: (no noise drawn at noise=0): the validation and test inputs then moved with the noise level."""
    clean = SyntheticRegression(n=20, d=3, val_n=5, test_n=4, dtype="float64", seed=7)
    noisy = SyntheticRegression(n=20, d=3, val_n=5, test_n=4, dtype="float64", noise=0.3, seed=7)
    for split in ("train", "val", "test"):
        assert torch.equal(clean.split_tensors(split)[0], noisy.split_tensors(split)[0]), split
    points = SyntheticRegression(kind="points", n=10, test_n=6, dtype="float64", seed=2)
    noisy_points = SyntheticRegression(kind="points", n=10, test_n=6, noise=0.2, dtype="float64", seed=2)
    assert torch.equal(points.split_tensors("test")[0], noisy_points.split_tensors("test")[0])
