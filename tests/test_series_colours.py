"""Each series of a multi-series chart is its own TensorBoard run, so TensorBoard draws it in its own colour.

The run keeps every tag; the charted values are mirrored to ``<log_dir>/series/<tag>`` under the chart's tag
``chart/<title>`` (synchronous, asynchronous and the model's own objective alike), and a resumed run marks its restart
in the series runs too.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _events import next_second
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from hcl import TwoLayerReLU, dashboard
from hcl.callbacks import ConvexGapMonitor, PatternMonitor
from hcl.datamodules import SyntheticRegression

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _data_and_model() -> tuple[SyntheticRegression, TwoLayerReLU]:
    torch.manual_seed(0)
    data = SyntheticRegression(kind="gaussian_linear", n=40, d=5, seed=0, dtype="float64")
    return data, TwoLayerReLU(in_features=5, hidden=8, init="normal", init_scale=0.5, lr=0.05)


def _callbacks() -> list:
    return [PatternMonitor(), ConvexGapMonitor(),
            ConvexGapMonitor(prefix="convex_async", asynchronous=True, worker="thread", max_pending=100)]


def _view(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of one run as TensorBoard shows them (its own event files only, restart markers honoured)."""
    acc = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def _same(points: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal up to float32 (the event files' precision)."""
    return [s for s, _ in points] == [s for s, _ in expected] and [v for _, v in points] == pytest.approx(
        [v for _, v in expected], rel=1e-6, abs=1e-12)


def _written_layout(run_dir: Path) -> dict[str, list[str]]:
    acc = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    event = acc.Tensors("custom_scalars__config__")[-1]  # TensorBoard draws the last one (a fit writes one each)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


def test_each_charted_series_is_a_run_of_its_own(tmp_path, make_trainer):
    data, model = _data_and_model()
    trainer = make_trainer(_callbacks(), max_steps=8)
    trainer.fit(model, datamodule=data)
    run_dir = tmp_path / "run" / "version_0"
    charts = {title: tags for title, (_, tags) in dashboard.layout_of(trainer)["hcl"].items()}
    several = {title: tags for title, tags in charts.items() if len(tags) > 1}
    assert {"objective vs convex optimum", "convex gap", "pattern changes"} <= set(several)
    assert "train/objective" in several["objective vs convex optimum"]
    assert "convex_async/optimum" in several["objective vs convex optimum"]

    layout = _written_layout(run_dir)
    assert set(layout) == set(charts)
    for title, tags in charts.items():
        # exact matches: TensorBoard's regexes match at the start of a tag only
        assert layout[title] == ([f"^{dashboard.chart_tag(title)}$"] if len(tags) > 1 else [f"^{tags[0]}$"]), title
    assert dashboard.chart_tag("objective vs convex optimum") == "chart/objective_vs_convex_optimum"

    main = _view(run_dir)
    series_runs = {p.parent.relative_to(run_dir / "series").as_posix()
                   for p in (run_dir / "series").rglob("events.out.tfevents.*")}
    assert series_runs == set().union(*several.values())
    for title, tags in several.items():
        for tag in tags:
            mirrored = _view(run_dir / "series" / tag)
            assert set(mirrored) >= {dashboard.chart_tag(title)}
            # the series run holds the run's own values, step for step (synchronous, asynchronous, the model's)
            assert _same(mirrored[dashboard.chart_tag(title)], main[tag]), (title, tag)
            assert [step for step, _ in main[tag]] == list(range(8)), tag
    # The run's own tags are all still there, and no chart tag leaked into it.
    assert {"train/objective", "convex/optimum", "convex_async/optimum", "patterns/unique"} <= set(main)
    assert not any(tag.startswith("chart/") for tag in main)
    assert dashboard.series_dirs(trainer) == {}  # closed at the end of fitting


def test_a_tag_in_two_charts_is_mirrored_into_both(tmp_path, make_trainer):
    """train/objective beside a monitor's optimum and beside the global optimum: the second chart had lost its line."""
    from hcl.callbacks.global_optimum import GlobalOptimumMonitor

    torch.manual_seed(0)
    data = SyntheticRegression(kind="gaussian_linear", n=20, d=2, seed=0, dtype="float64")
    model = TwoLayerReLU(in_features=2, hidden=3, bias=True, init="normal", init_scale=0.5, lr=0.05)
    trainer = make_trainer([ConvexGapMonitor(prefix="cvx2"), GlobalOptimumMonitor()], max_steps=3)
    trainer.fit(model, datamodule=data)
    charts = [title for title, (_, tags) in dashboard.layout_of(trainer)["hcl"].items()
              if len(tags) > 1 and "train/objective" in tags]
    assert len(charts) == 2, charts  # the case under test
    mirrored = _view(tmp_path / "run" / "version_0" / "series" / "train" / "objective")
    assert set(mirrored) == {dashboard.chart_tag(title) for title in charts}
    assert all([step for step, _ in points] == [0, 1, 2] for points in mirrored.values())


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_without_tensorboard_there_are_no_series_runs(tmp_path, make_trainer, logger):
    data, model = _data_and_model()
    trainer = make_trainer(_callbacks(), max_steps=3, logger=False)
    if logger == "csv":
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, precision="64-true", log_every_n_steps=1,
                             logger=CSVLogger(str(tmp_path), name="csv"), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=_callbacks())
    trainer.fit(model, datamodule=data)
    assert "convex_async/optimum" in trainer.callback_metrics
    assert dashboard.series_dirs(trainer) == {}
    assert not any(path.name == dashboard.SERIES_DIR for path in tmp_path.rglob("*"))


def test_a_resumed_run_marks_its_restart_in_the_series_runs(tmp_path):
    root = tmp_path / "logs"

    def fit(max_steps: int, ckpt_path: str | None = None) -> pl.Trainer:
        data, model = _data_and_model()
        trainer = pl.Trainer(
            max_steps=max_steps, accelerator="cpu", devices=1, precision="64-true", log_every_n_steps=1,
            logger=TensorBoardLogger(str(root), name="run", version=0), enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[*_callbacks(), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                                      save_top_k=-1)],
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    fit(6)  # steps 0 … 5 logged; the checkpoint at step 4 is the one resumed from
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4
    next_second()
    trainer = fit(9, str(checkpoint))
    # a next fit of the same trainer continues, and does not mark the resume's restart again (that hid steps 4 … 8)
    trainer.fit_loop.epoch_loop.max_steps = 12
    trainer.fit(trainer.lightning_module, datamodule=trainer.datamodule)
    run_dir = root / "run" / "version_0"
    for tag in ("train/objective", "convex/optimum", "convex_async/optimum", "patterns/new"):
        series = run_dir / "series" / tag
        restarts = [event.step for path in sorted(series.glob("events.out.tfevents.*"))
                    for event in EventFileLoader(str(path)).Load()
                    if event.HasField("session_log") and event.session_log.status == SessionLog.START]
        assert restarts == [4], tag
        (points,) = _view(series).values()
        assert [step for step, _ in points] == list(range(12)), tag  # steps 4 and 5 once: the resumed run's
        assert _same(points, _view(run_dir)[tag]), tag


def test_every_tensorboard_logger_gets_series_that_its_charts_select_and_a_second_fit_continues_them(tmp_path):
    """Two TensorBoard loggers (one with a prefix): each folder has the series runs its layout selects (the second had
    three empty charts), single-series charts select the prefixed tag, and a second fit() of the same trainer keeps
    mirroring (its series had stopped at the first fit's end)."""
    import re

    data, model = _data_and_model()
    loggers = [TensorBoardLogger(str(tmp_path), name="a"), TensorBoardLogger(str(tmp_path), name="b", prefix="exp")]
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, precision="64-true", log_every_n_steps=1,
                         logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[PatternMonitor(), ConvexGapMonitor(solver="clarabel")])
    trainer.fit(model, datamodule=data)
    trainer.fit_loop.epoch_loop.max_steps = 7
    trainer.fit(model, datamodule=data)
    for logger in loggers:
        run_dir = Path(logger.log_dir)
        main = _view(run_dir)
        for title, selects in _written_layout(run_dir).items():
            (regex,) = selects
            if regex.startswith("^chart/"):
                runs = [p.parent for p in (run_dir / "series").rglob("events.out.tfevents.*")]
                drawn = [_view(r)[regex[1:-1]] for r in runs if regex[1:-1] in _view(r)]
                assert len(drawn) >= 2, (logger.name, title)
                assert all(len(points) >= 7 for points in drawn), (logger.name, title)  # both fits
            else:
                assert [tag for tag in main if re.match(regex, tag)], (logger.name, title, regex)
        # TensorBoard reads a run's files in name order (creation second, then a counter compared as text): the
        # second fit's files are of a later second, else "….13" was read before "….3" and the first fit's points lost
        for run in {p.parent for p in run_dir.rglob("events.out.tfevents.*")}:
            seconds = [int(p.name.split(".")[3]) for p in run.glob("events.out.tfevents.*")]
            assert len(set(seconds)) == len(seconds), (run, seconds)


def test_a_fit_waits_for_the_next_second_after_an_event_file_of_its_runs_made_in_this_one(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(logger=logger, accelerator="cpu", devices=1)
    series = Path(logger.log_dir) / "series" / "a"
    series.mkdir(parents=True)
    made = time.time()
    (series / f"events.out.tfevents.{int(made)}.host.1.3").write_bytes(b"")
    dashboard.wait_past_last_fit(trainer)
    assert int(time.time()) > int(made)
    started = time.time()
    dashboard.wait_past_last_fit(trainer)  # nothing of this second: no wait
    assert time.time() - started < 0.5
