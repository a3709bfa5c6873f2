"""StepProgressBar: one bar over the optimizer steps, its total, its time estimate and the convex values it shows."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, PatternMonitor, StepProgressBar
from hcl.callbacks.progress import postfix_text
from hcl.convex.status import Status
from hcl.datamodules import SyntheticRegression


def _renders(text: str) -> list[str]:
    """The bar's successive drawings in captured output (tqdm redraws in place after a carriage return)."""
    return [part.strip() for part in re.split(r"[\r\n]", text) if "step/s" in part]


@pytest.mark.slow
def test_a_full_batch_run_draws_one_bar_over_max_steps_with_the_convex_values(make_trainer, capsys):
    torch.manual_seed(0)
    data = SyntheticRegression(n=20, d=4, dtype="float64")
    bar = StepProgressBar()
    monitors = [PatternMonitor(every_n_steps=1), ConvexGapMonitor(every_n_steps=3, formulation="neurons")]
    trainer = make_trainer([*monitors, bar], max_steps=7, enable_progress_bar=True)
    trainer.fit(TwoLayerReLU(in_features=4, hidden=5), datamodule=data)
    out = capsys.readouterr().out

    assert trainer.current_epoch == 7  # one batch per epoch: every step is an epoch
    tqdm_bar = bar.train_progress_bar
    assert (tqdm_bar.total, tqdm_bar.n) == (7, 7)
    renders = _renders(out)
    assert len(renders) >= 7
    counts = [re.search(r"\| *(\d+)/(\d+) \[", r).groups() for r in renders]
    assert {total for _, total in counts} == {"7"}  # one bar: the same total throughout, never Lightning's 1/1
    assert [int(n) for n, _ in counts] == sorted(int(n) for n, _ in counts)
    assert {str(k) for k in range(1, 8)} <= {n for n, _ in counts}
    assert "Epoch" not in out
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d,", renders[-1])  # elapsed < remaining: a time estimate

    metrics = trainer.callback_metrics
    assert int(metrics["convex/status"]) == Status.OPTIMAL.code
    expected = (f"L={float(metrics['train/objective']):.4g}, opt={float(metrics['convex/optimum']):.4g}, "
                f"lb={float(metrics['convex/lower_bound']):.4g}, gap={float(metrics['convex/gap']):.4g}, "
                f"patterns={int(metrics['patterns/unique'])}")
    assert tqdm_bar.postfix == expected
    assert renders[-1].endswith(expected + "]")


def test_without_max_steps_the_total_is_epochs_times_steps_per_epoch(make_trainer, capsys):
    data = SyntheticRegression(n=12, d=3, dtype="float64", batch_size=5)  # 3 mini-batches per epoch
    bar = StepProgressBar()
    trainer = make_trainer([bar], max_steps=-1, max_epochs=2, enable_progress_bar=True)
    trainer.fit(TwoLayerReLU(in_features=3, hidden=4), datamodule=data)
    out = capsys.readouterr().out
    assert trainer.global_step == 6
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (6, 6)
    assert {re.search(r"\| *\d+/(\d+) \[", r).group(1) for r in _renders(out)} == {"6"}
    assert "Epoch 1" in out  # several steps per epoch: the epoch is named
    assert bar.train_progress_bar.postfix.startswith("L=")


def test_a_resumed_run_starts_the_bar_at_its_step(tmp_path, make_trainer):
    data = SyntheticRegression(n=10, d=3, dtype="float64")
    model = TwoLayerReLU(in_features=3, hidden=4)
    make_trainer([], max_steps=3, enable_checkpointing=True).fit(model, datamodule=data)
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    bar = StepProgressBar()
    trainer = make_trainer([bar], max_steps=5, enable_progress_bar=True)
    trainer.fit(TwoLayerReLU(in_features=3, hidden=4), datamodule=data, ckpt_path=str(checkpoint))
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 5, 5)


def _trainer(callback_metrics, progress_bar_metrics=None):
    return SimpleNamespace(callback_metrics=callback_metrics, progress_bar_metrics=progress_bar_metrics or {},
                           loggers=[])


def test_the_postfix_shows_only_the_values_of_the_last_solve():
    bar = StepProgressBar()
    metrics = {"train/objective": torch.tensor(0.5), "patterns/unique": torch.tensor(9.0)}
    trainer = _trainer(metrics, {"train/objective": 0.5, "v_num": 0, "val/acc": 0.75})
    metrics.update({"convex/status": torch.tensor(0.0), "convex/optimum": torch.tensor(0.25),
                    "convex/upper_bound": torch.tensor(0.25), "convex/lower_bound": torch.tensor(0.2499),
                    "convex/gap": torch.tensor(0.25), "convex/max_gap": torch.tensor(0.2501)})
    assert postfix_text(bar.get_metrics(trainer, None)) == (
        "L=0.5, opt=0.25, lb=0.2499, gap=0.25, patterns=9, v_num=0, val/acc=0.75")

    # The next solve fails: it logs its status and objective only; the optimum above belongs to an older step.
    metrics.update({"convex/status": torch.tensor(float(Status.FAILED.code)),
                    "convex/nonconvex_objective": torch.tensor(0.4)})
    items = bar.get_metrics(trainer, None)
    assert not {"opt", "ub", "lb", "gap", "max_gap"} & items.keys()
    assert items["status"] == "failed"

    # A solve that is not certified: the feasible value as an upper bound, the lower bound's gap, its status.
    metrics.update({"convex/status": torch.tensor(float(Status.OPTIMAL_INACCURATE.code)),
                    "convex/upper_bound": torch.tensor(0.3), "convex/lower_bound": torch.tensor(0.1),
                    "convex/max_gap": torch.tensor(0.3)})
    items = bar.get_metrics(trainer, None)
    assert (items["ub"], items["lb"], items["max_gap"], items["status"]) == ("0.3", "0.1", "0.3", "inaccurate")
    assert "opt" not in items and "gap" not in items


def test_the_postfix_names_other_prefixes_and_the_global_optimum():
    bar = StepProgressBar()
    metrics = {"exact/status": torch.tensor(0.0), "exact/optimum": torch.tensor(1.5),
               "convex/global_lower_bound": torch.tensor(0.1), "convex/global_optimum": torch.tensor(0.1),
               "convex/global_gap": torch.tensor(0.02), "my/gap": torch.tensor(3.0)}
    items = bar.get_metrics(_trainer(metrics), None)
    assert items == {"exact.opt": "1.5", "g_opt": "0.1", "g_lb": "0.1", "g_gap": "0.02"}  # my/gap is no monitor's


def test_a_zero_bound_reads_zero_whatever_its_sign():
    from hcl.callbacks.progress import _number

    assert _number(-0.0) == _number(torch.tensor(-0.0)) == "0"
    assert _number(-1.5e-7) == "-1.5e-07"
