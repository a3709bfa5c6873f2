"""benchmarks/accuracy_table.py on tiny separable MNIST-format files: every method runs and is measured."""

from __future__ import annotations

import argparse
import importlib.util
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hcl.convex.problem import fold_bias

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_table.py"


@pytest.fixture(scope="module")
def at():
    # registered under its name (dataclasses and the spawned children look the module up); the benchmarks folder on
    # the path while these tests run, so that a child process imports it too
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("accuracy_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_table"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("accuracy_table", None)
    sys.path.remove(str(SCRIPT.parent))


def _write_separable_mnist(root: Path, n_train: int = 200, n_test: int = 50, test_shift: int = 0) -> None:
    """Class k lights a 4 × 4 block of its own, on noise: separable by a linear model. ``test_shift``: the test
    images are labelled ``k + test_shift`` (mod 10)."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            images[i, 4 * (k // 5) + 8: 4 * (k // 5) + 12, 4 * (k % 5) + 4: 4 * (k % 5) + 8] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = ((labels + (test_shift if prefix == "t10k" else 0)) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.fixture
def tiny_settings(at, tmp_path):
    _write_separable_mnist(tmp_path)
    return at.Settings(root=str(tmp_path), subset=120, val_size=40, width=8, epochs=2, batch_size=40,
                       convex_iters=60, grids={"convex gated ReLU": (1e-2,), "convex ReLU": (1e-2,), "Adam": (1e-2,),
                                               "SGD": (1e-1,), "Adagrad": (1e-1,)})


def test_gated_scores_are_the_sum_over_gates(at):
    torch.manual_seed(0)
    X, gates, U = fold_bias(torch.randn(7, 3), True), torch.randn(4, 5), torch.randn(5, 4, 2)
    expected = sum(((X @ gates[:, i]) >= 0).unsqueeze(1) * (X @ U[i]) for i in range(5))
    torch.testing.assert_close(at.gated_scores(X, gates, U, chunk=3), expected)


def test_the_solver_rows_solve_the_program_of_the_mini_batch_rows_gates(at):
    from hcl import ConvexReLU

    s = at.Settings(root=".", width=6, seed=3)
    model = ConvexReLU(in_features=9, out_features=10, num_gates=6, gate_seed=3, bias=True)
    torch.testing.assert_close(at.table_gates(s, 9), model.gates, rtol=0, atol=0)


@pytest.mark.slow
def test_every_method_runs_is_measured_and_the_solver_separates_the_classes(at, tiny_settings):
    rows = at.table(tiny_settings, isolate=False, log=lambda line: None)
    results = {row["result"].method: row["result"] for row in rows}
    assert list(results) == ["data only", *at.METHODS]
    assert math.isnan(results["data only"].test_acc)
    for method in at.METHODS:
        r = results[method]
        assert 0.0 <= r.test_acc <= 1.0 and 0.0 <= r.val_acc <= 1.0, (method, r)
        assert (r.lr is None) == (method in at.SOLVER_METHODS)
        assert r.seconds > 0 and r.peak_rss_mb > 0 and 0 <= r.own_rss_mb <= r.peak_rss_mb, (method, r)
    for method in at.SOLVER_METHODS:  # a full-batch solve of a linearly separable problem
        assert results[method].test_acc >= 0.9 and "60 it" in results[method].note, results[method]
    text = at.markdown(tiny_settings, rows)
    assert "| convex gated ReLU (solver) | — |" in text and "| 97.6 |" in text and "| 0.01 (0.01) |" in text
    assert len(text.splitlines()) == 2 + len(rows)


@pytest.mark.slow
def test_a_run_in_a_child_process_reports_its_own_memory(at, tiny_settings):
    held = torch.ones(2**27, dtype=torch.float64)  # 1 GiB resident in the parent: ru_maxrss had counted it
    parent_mb = at.status_kib("VmRSS") / 1024
    result = at.run_isolated(tiny_settings, "data only", None)
    del held
    assert result.method == "data only" and 50 < result.peak_rss_mb < parent_mb - 512, (result, parent_mb)
    assert 0 <= result.own_rss_mb < 50 and result.peak_gpu_mb is None  # data only: nothing after the data


def test_bad_settings_are_refused_before_any_run(at, capsys):
    for option, value in (("--epochs", "-1"), ("--epochs", "0"), ("--convex-iters", "0"), ("--width", "0"),
                          ("--batch-size", "0"), ("--weight-decay", "-1"), ("--weight-decay", "nan"),
                          ("--weight-decay", "inf"), ("--subset", "-1")):
        with pytest.raises(SystemExit) as stop:
            at.main(["--root", "absent", option, value])
        assert stop.value.code == 2
        assert f"argument {option}: must be a finite number at least" in capsys.readouterr().err


def test_settings_cpu_gpu_quick_and_overrides(at):
    args = argparse.Namespace(root="r", seed=0, quick=False, subset=None, width=None, epochs=None, batch_size=None,
                              weight_decay=None, convex_iters=None)
    cpu = at.settings_for("mnist", args, "cpu")
    assert (cpu.subset, cpu.width) == (10_000, 100)
    gpu = at.settings_for("cifar10", args, "cuda")
    assert gpu.subset is None and gpu.width == 4000
    quick = at.settings_for("mnist", argparse.Namespace(**{**vars(args), "quick": True, "width": 7}), "cpu")
    assert (quick.subset, quick.width) == (2000, 7) and all(len(grid) == 2 for grid in quick.grids.values())
    full = at.settings_for("mnist", argparse.Namespace(**{**vars(args), "subset": 0}), "cpu")
    assert full.subset is None


def test_cifar10_asked_for_without_its_files_stops_with_the_path(at, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        at.main(["--root", str(tmp_path), "--datasets", "cifar10"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"--datasets cifar10: no {tmp_path / 'cifar-10-batches-py'} (hcl.datamodules.CIFAR10" in error


def test_the_grid_s_learning_rate_is_chosen_by_validation_and_its_time_is_the_sum(at, monkeypatch):
    """Scripted runs: the learning rate with the best validation accuracy is the row's, whatever its test accuracy."""
    scripted = {1e-3: (0.90, 0.80, 2.0), 1e-2: (0.80, 0.95, 3.0), 1e-1: (float("nan"), float("nan"), 0.5)}

    def run_one(s, method, lr):
        val, test, seconds = scripted[lr] if lr is not None else (float("nan"), float("nan"), 1.0)
        return at.RunResult(method, lr, val, test, seconds, 100.0, None)

    monkeypatch.setattr(at, "run_one", run_one)
    monkeypatch.setattr(at, "SOLVER_METHODS", ())
    s = at.Settings(grids={"Adam": (1e-1, 1e-3, 1e-2)})  # a diverged run (nan) is never chosen, even first
    rows = at.table(s, isolate=False, log=lambda line: None)
    adam = rows[1]
    assert (adam["result"].lr, adam["result"].test_acc, adam["grid_seconds"]) == (1e-3, 0.80, 5.5)
    assert "| Adam | 0.1, 0.001, 0.01 (0.001) | 90.00 | 80.00 | 98.0 | 2.0 | 5.5 |" in at.markdown(s, rows)


@pytest.mark.slow  # two trainings
def test_each_accuracy_is_measured_on_its_own_split(at, tmp_path):
    """With every test image mislabelled, a model that fits the training set is right on the validation points and
    wrong on the test ones, whichever way it was trained."""
    _write_separable_mnist(tmp_path, test_shift=1)
    s = at.Settings(root=str(tmp_path), subset=120, val_size=40, width=8, epochs=2, batch_size=40, convex_iters=60)
    for method, lr in (("convex gated ReLU (solver)", None), ("Adam", 1e-2)):
        result = at.run_one(s, method, lr)
        assert result.val_acc >= 0.4 and result.test_acc <= 0.2, (method, result)  # chance: 0.1
