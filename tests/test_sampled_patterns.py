"""ConvexGapMonitor(sampled_patterns=K) in training: K Gaussian-gate patterns join the network's at every solve, drawn
from the seed and the step (a resumed or distributed run draws the same), and the logged optimum is that of the
network's patterns and the drawn ones together."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor
from hcl.convex import solve
from hcl.convex.build import problem_from_network
from hcl.datamodules import SyntheticRegression


class _Recorded(ConvexGapMonitor):
    """Keeps every snapshot it solves."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots = {}

    def evaluate(self, snap):
        self.snapshots[snap.step] = snap
        return super().evaluate(snap)


def _run(tmp_path, seed: int, steps: int = 3, d: int = 3) -> tuple[_Recorded, pl.Trainer]:
    torch.manual_seed(0)
    model = TwoLayerReLU(in_features=d, hidden=3, bias=True, weight_decay=1e-2, lr=0.2).double()
    monitor = _Recorded(solver="clarabel", sampled_patterns=30, seed=seed)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[monitor])
    trainer.fit(model, datamodule=SyntheticRegression(kind="gaussian_linear", n=40, d=d, seed=0, dtype="float64"))
    return monitor, trainer


def test_the_drawn_patterns_change_with_the_step_and_repeat_with_the_seed(tmp_path):
    (first, _), (again, _), (other, _) = (_run(tmp_path / name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    drawn = {step: snap.extra_patterns for step, snap in first.snapshots.items()}
    assert sorted(drawn) == [0, 1, 2]
    assert all(D.shape[0] == 40 and 20 <= D.shape[1] <= 30 for D in drawn.values())  # the distinct ones of 30
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])  # the same gates every step
    assert all(torch.equal(drawn[step], again.snapshots[step].extra_patterns) for step in drawn)
    assert not torch.equal(drawn[1], other.snapshots[1].extra_patterns)


def test_the_logged_optimum_is_that_of_the_network_and_the_drawn_patterns(tmp_path):
    monitor, trainer = _run(tmp_path, seed=7, steps=2)
    snap = monitor.snapshots[1]
    args = (snap.X, snap.Y, snap.hidden_weight, snap.hidden_bias, snap.output_weight, snap.output_bias)
    options = dict(weight_decay=1e-2, reduction="mean", formulation="patterns")
    with_drawn, _ = problem_from_network(*args, **options, extra_patterns=snap.extra_patterns)
    alone, _ = problem_from_network(*args, **options)
    expected, network_only = solve(with_drawn, "clarabel").value, solve(alone, "clarabel").value
    assert expected < network_only * (1 - 1e-3)  # the drawn patterns matter on this instance
    assert float(trainer.callback_metrics["convex/optimum"]) == pytest.approx(expected, rel=1e-6)


def test_the_gates_have_a_bias_as_the_network_does(tmp_path):
    """In 1-D, gates through the origin give two patterns (x ≥ 0, x ≤ 0); with the bias column, thresholds anywhere."""
    monitor, _ = _run(tmp_path, seed=7, steps=1, d=1)
    drawn = monitor.snapshots[0].extra_patterns
    assert drawn.shape[1] > 4
