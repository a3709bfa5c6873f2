"""Runs a user makes beside the malformed ones of ``test_fuzz.py``: other loggers, ``fast_dev_run``, a full-batch
loader; every value is recorded where the user looks."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_fuzz import Net, _data, _dm, _fit, _loader, _model, two_layer
from torch.utils.data import DataLoader, TensorDataset

from hcl.callbacks import ConvexGapMonitor, PatternMonitor

pytestmark = pytest.mark.timeout(60)


def test_a_csv_logger_alone_records_every_value(tmp_path):
    callbacks = [ConvexGapMonitor(solver="clarabel"), PatternMonitor()]
    trainer = _fit(_model(), _dm(*_data()), callbacks, tmp_path, logger="csv")
    import csv

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for tag in ("convex/optimum", "convex/gap", "patterns/unique", "train/objective"):
        steps = sorted({int(r["step"]) for r in rows if r.get(tag)})
        assert steps == [0, 1, 2], tag
        assert all(math.isfinite(float(r[tag])) for r in rows if r.get(tag))


def test_fast_dev_run_with_its_dummy_logger(tmp_path):
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", precision="64-true", enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ConvexGapMonitor(solver="clarabel"), PatternMonitor()])
    trainer.fit(_model(), datamodule=_dm(*_data()))
    assert float(trainer.callback_metrics["convex/status"]) == 0.0
    assert trainer.callback_metrics["convex/optimum"] <= trainer.callback_metrics["convex/nonconvex_objective"] + 1e-9


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.slow
def test_a_full_batch_loader_is_read_row_for_row_only_when_it_is_the_data(tmp_path, shuffle):
    """A shuffled full batch holds the same points in another order each step: patterns read from the forward pass
    would change order with it and count as changed; the monitor recomputes them instead."""
    X, y = _data(n=40)
    series = {}
    for name, callbacks, loader in (
        ("probe", [PatternMonitor(probe=X)], _loader(X, y)),
        ("loader", [PatternMonitor()], DataLoader(TensorDataset(X, y), batch_size=40, shuffle=shuffle)),
    ):
        torch.manual_seed(0)
        model = Net(two_layer(m=6))
        _fit(model, loader, callbacks, tmp_path / name, max_steps=6)
        from _events import read_scalars

        series[name] = read_scalars(tmp_path / name)
    for tag in ("patterns/unique", "patterns/changed", "patterns/new", "patterns/dead"):
        assert series["loader"][tag] == series["probe"][tag], tag
