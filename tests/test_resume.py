"""Killing a run and resuming it with ``--ckpt_path``: every series has each step once, with the values of a run that
was never interrupted."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _events import next_second, read_scalars
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator

import hcl.callbacks.solve_queue as solve_queue_module
from hcl.convex.problem import ConvexSolution
from hcl.fit import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STEPS = 10
KILL_AT = 6
TAGS = ("train/objective", "patterns/unique", "patterns/new", "patterns/changed", "convex/optimum",
        "convex/nonconvex_objective", "convex_async/optimum", "convex_async/status")


class KillAtStep(pl.Callback):
    """Raises at the end of step ``step``, after the monitors have logged it and before its checkpoint."""

    def __init__(self, step: int = KILL_AT) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:  # the optimizer has stepped: global_step counts step `step` done
            raise RuntimeError(f"killed at step {self.step}")


def _tensorboard_view(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The series as TensorBoard shows them: every event file of the run directory read in order, restart markers
    honoured (unlike ``_events.read_scalars``, which reads each file on its own)."""
    acc = EventAccumulator(str(run_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def _cli(root: Path, *extra: str) -> None:
    main([
        "--config", str(Path(__file__).parents[1] / "configs" / "seed_c_100x10.yaml"),
        f"--trainer.max_steps={STEPS}", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.init_scale=0.5", "--model.lr=0.1",
        "--trainer.callbacks+=hcl.callbacks.ConvexGapMonitor", "--trainer.callbacks.prefix=convex_async",
        "--trainer.callbacks.asynchronous=true", "--trainer.callbacks.worker=thread",
        "--trainer.callbacks.max_pending=100", "--trainer.callbacks.solver=clarabel", *extra,
    ])


def test_a_killed_run_resumed_through_the_cli_has_every_step_once(tmp_path):
    _cli(tmp_path / "reference")
    reference = _tensorboard_view(tmp_path / "reference" / "lightning_logs" / "version_0")

    root = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match=f"killed at step {KILL_AT}"):
        _cli(root, "--trainer.callbacks+=test_resume.KillAtStep")
    run_dir = root / "lightning_logs" / "version_0"
    crashed = read_scalars(run_dir)  # what the killed run left on disk: flushed on the exception
    for tag in ("patterns/unique", "convex/optimum"):
        assert [s for s, _ in crashed[tag]] == list(range(KILL_AT + 1)), tag
    assert [s for s, _ in crashed["train/objective"]] == list(range(KILL_AT))

    checkpoints = sorted(run_dir.glob("checkpoints/*.ckpt"))
    assert len(checkpoints) == 1
    assert torch.load(checkpoints[0], weights_only=False)["global_step"] == KILL_AT  # the last full step
    next_second()
    _cli(root, "--ckpt_path=last")  # the newest checkpoint of the logger's runs: the one above

    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]  # the same run continues
    raw = read_scalars(run_dir)
    assert "hp_metric" not in raw  # Lightning's placeholder, written again at step 0 by every fit
    assert [s for s, _ in raw["patterns/unique"]].count(KILL_AT) == 2  # step 6 was logged by both runs ...
    resumed = _tensorboard_view(run_dir)  # ... and TensorBoard keeps the resumed run's only
    for tag in TAGS:
        assert [s for s, _ in resumed[tag]] == list(range(STEPS)), tag
        for (step, value), (_, expected) in zip(resumed[tag], reference[tag]):
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-12), (tag, step)


class RaiseInStep(pl.Callback):
    """Raises inside step ``step``, after the monitors acted at its start and before its optimizer step: the
    exception's checkpoint (OnExceptionCheckpoint, also on Ctrl-C) is written in the middle of that step."""

    def __init__(self, step: int = KILL_AT) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            raise RuntimeError(f"raised in step {self.step}")


def test_a_run_resumed_from_its_exception_checkpoint_takes_the_failed_step_again(tmp_path):
    """The step the exception cut short is neither lost (its callbacks' values, the pattern history, the skipped count)
    nor trained on another batch (the loader's state counted the failed batch as taken)."""
    mini_batches = ["--data.init_args.batch_size=10", "--model.optimizer=momentum"]
    _cli(tmp_path / "reference", *mini_batches)
    reference = _tensorboard_view(tmp_path / "reference" / "lightning_logs" / "version_0")

    root = tmp_path / "resumed"
    checkpoints = root / "lightning_logs" / "version_0" / "checkpoints"  # the run's own: the resume continues it
    with pytest.raises(RuntimeError, match=f"raised in step {KILL_AT}"):
        _cli(root, *mini_batches, "--trainer.callbacks+=lightning.pytorch.callbacks.OnExceptionCheckpoint",
             f"--trainer.callbacks.dirpath={checkpoints}", "--trainer.callbacks+=test_resume.RaiseInStep")
    saved = torch.load(checkpoints / "on_exception.ckpt", weights_only=False)
    assert saved["global_step"] == KILL_AT
    assert all(state["last_step"] == KILL_AT - 1 for state in saved["callbacks"].values() if "last_step" in state)
    next_second()
    _cli(root, *mini_batches, f"--ckpt_path={checkpoints / 'on_exception.ckpt'}")

    resumed = _tensorboard_view(root / "lightning_logs" / "version_0")
    for tag in (*TAGS, "epoch"):
        assert [s for s, _ in resumed[tag]] == list(range(STEPS)), tag
        for (step, value), (_, expected) in zip(resumed[tag], reference[tag]):
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-12), (tag, step)
    assert not resumed.get("convex_async/skipped")  # the step cancelled by the exception was solved by the resumed run


def slow_point_solve(problem, solver, *, gated=False, warm_start=None, **options):
    time.sleep(0.03)
    U, V, b0 = warm_start
    return ConvexSolution(value=float(problem.objective(U, V, b0)), U=U, V=V, b0=b0, status="optimal",
                          solver="slow", solve_seconds=0.03)


def test_continuing_after_max_steps_keeps_counting(tmp_path, monkeypatch):
    """The pattern history and the skipped-snapshot count carry over; the checkpointed state is plain and small."""
    monkeypatch.setattr(solve_queue_module, "solve", slow_point_solve)  # the background solves
    # A checkpoint waits for the solves in flight: checkpoint every 5 steps so that the queue can fill up.
    common = ["--trainer.callbacks=[]", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.every_n_epochs=5", "--trainer.callbacks+=hcl.callbacks.PatternMonitor",
              "--trainer.callbacks+=hcl.callbacks.ConvexGapMonitor", "--trainer.callbacks.asynchronous=true",
              "--trainer.callbacks.worker=thread", "--trainer.callbacks.max_pending=1"]
    config = ["--config", str(Path(__file__).parents[1] / "configs" / "seed_c_100x10.yaml"),
              "--trainer.enable_progress_bar=false", "--model.init_scale=0.5", "--model.lr=0.1", *common]
    main([*config, "--trainer.max_steps=30", f"--trainer.default_root_dir={tmp_path / 'reference'}"])
    reference = _tensorboard_view(tmp_path / "reference" / "lightning_logs" / "version_0")

    root = tmp_path / "run"
    main([*config, "--trainer.max_steps=15", f"--trainer.default_root_dir={root}"])
    checkpoint = next(root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    states = torch.load(checkpoint, weights_only=False)["callbacks"]
    gap_state = next(v for k, v in states.items() if k.startswith("ConvexGapMonitor"))
    pattern_state = next(v for k, v in states.items() if k.startswith("PatternMonitor"))
    assert gap_state["last_step"] == 14 and gap_state["skipped"] > 0
    assert pattern_state["last_step"] == 14 and pattern_state["tracker"]["seen"]
    for state in (gap_state, pattern_state):
        _assert_plain(state)

    next_second()
    main([*config, "--trainer.max_steps=30", f"--trainer.default_root_dir={root}", f"--ckpt_path={checkpoint}"])
    s = _tensorboard_view(root / "lightning_logs" / "version_0")
    for tag in ("patterns/new", "patterns/changed", "patterns/unique"):
        # A forgotten history would count the patterns of step 15 as new and none as changed.
        assert s[tag] == reference[tag], tag
    assert sum(v for _, v in s["patterns/changed"][15:]) > 0  # patterns do move after the resume
    skipped = [v for _, v in s["convex/skipped"]]
    assert skipped == list(range(1, len(skipped) + 1))  # one running count across both runs
    assert min(step for step, _ in s["convex/skipped"] if step >= 15) >= 15
    solved = [step for step, _ in s["convex/status"]]
    assert sorted(solved + [step for step, _ in s["convex/skipped"]]) == list(range(30))


def _assert_plain(value) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _assert_plain(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _assert_plain(item)
    elif isinstance(value, torch.Tensor):
        assert value.device.type == "cpu"
    else:
        assert value is None or isinstance(value, (int, float, str, bool)), type(value)


def test_a_run_resumed_from_an_exception_in_its_first_step_has_step_0_once(tmp_path, make_trainer):
    """A checkpoint written at step 0 is a resume too: the restart marker drops the interrupted run's step-0 points
    (what TensorBoard shows: checked against its server, which reads the markers as this accumulator does)."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from hcl import TwoLayerReLU
    from hcl.callbacks import ConvexGapMonitor, GlobalOptimumMonitor, PatternMonitor
    from hcl.datamodules import SyntheticRegression

    def fit(callbacks, ckpt_path=None):
        torch.manual_seed(0)
        x = torch.linspace(-1, 1, 12, dtype=torch.float64)
        data = SyntheticRegression(kind="points", x=x.tolist(), y=(x.abs() + 0.3 * x).tolist(), dtype="float64")
        model = TwoLayerReLU(in_features=1, hidden=8, bias=True, init="normal", init_scale=0.5, lr=0.05,
                             weight_decay=1e-3)
        monitors = [PatternMonitor(), ConvexGapMonitor(solver="clarabel"), GlobalOptimumMonitor(solver="clarabel")]
        trainer = make_trainer([*monitors, *callbacks], max_steps=4, enable_checkpointing=True)
        trainer.loggers = [TensorBoardLogger(str(tmp_path), name="run", version=0)]  # the resume continues it
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)

    with pytest.raises(RuntimeError, match="raised in step 0"):
        fit([RaiseInStep(0), OnExceptionCheckpoint(dirpath=tmp_path / "checkpoints")])
    next_second()
    fit([], ckpt_path=tmp_path / "checkpoints" / "on_exception.ckpt")

    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    for tag in ("convex/status", "convex/lower_bound", "patterns/unique", "train/objective", "convex/global_gap"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 1, 2, 3], tag
    # the global monitor's constants, logged once at step 0: logged again by the resumed run, whose marker dropped them
    assert [e.step for e in acc.Scalars("convex/global_patterns")] == [0]


class _Stop(BaseException):
    """An interruption nothing catches, as a Ctrl-C."""


@pytest.mark.parametrize("where", ["solve", "model"])
def test_the_next_fit_of_an_interrupted_trainer_takes_a_step_cut_short_in_a_callback_again(tmp_path, make_trainer,
                                                                                           monkeypatch, where):
    """A notebook cell interrupted inside the convex solve of step 2, then run again: the callbacks had counted step 2
    as done, and logged nothing at it (the solve's monitor, and the pattern monitor, whose forward never came). An
    interruption in the model's own step, after the callbacks had logged it, keeps their step once."""
    import hcl.callbacks.convex_gap as convex_gap_module
    from hcl import TwoLayerReLU
    from hcl.callbacks import ConvexGapMonitor, PatternMonitor
    from hcl.datamodules import SyntheticRegression

    solves, stopped = [], []
    original = convex_gap_module.evaluate_snapshot

    def interrupted(*args, **kwargs):
        solves.append(1)
        if where == "solve" and len(solves) == 3:
            raise _Stop
        return original(*args, **kwargs)

    class StopInStep(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if where == "model" and trainer.global_step == 2 and not stopped:
                stopped.append(1)
                raise _Stop

    monkeypatch.setattr(convex_gap_module, "evaluate_snapshot", interrupted)
    torch.manual_seed(0)
    data = SyntheticRegression(kind="gaussian_linear", n=30, d=3, seed=0, dtype="float64")
    model = TwoLayerReLU(in_features=3, hidden=6, bias=True, weight_decay=1e-3, lr=0.05)
    trainer = make_trainer([PatternMonitor(), ConvexGapMonitor(solver="clarabel"), StopInStep()], max_steps=4)
    with pytest.raises(_Stop):
        trainer.fit(model, datamodule=data)
    trainer.fit(model, datamodule=data)  # the next cell
    s = read_scalars(tmp_path)
    for tag in ("patterns/unique", "convex/status", "convex/nonconvex_objective"):
        assert [step for step, _ in s[tag]] == [0, 1, 2, 3], tag


def test_a_resume_continues_every_tensorboard_loggers_run(tmp_path):
    """A second TensorBoard logger (its own folder, a prefix) started a new version on resume: its steps between the
    checkpoint and the end of the first run were shown twice."""
    config = tmp_path / "two.yaml"
    config.write_text(f"""
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.TensorBoardLogger
      init_args: {{save_dir: {tmp_path}, name: plain}}
    - class_path: lightning.pytorch.loggers.TensorBoardLogger
      init_args: {{save_dir: {tmp_path}, name: prefixed, prefix: exp}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 4, save_top_k: -1}}
data:
  class_path: hcl.datamodules.SyntheticRegression
  init_args: {{kind: gaussian_linear, n: 40, d: 3, seed: 0}}
""")
    common = ["--config", str(config), "--trainer.enable_progress_bar=false", "--model.hidden=5"]
    main([*common, "--trainer.max_steps=8"])
    checkpoint = min((tmp_path / "plain" / "version_0" / "checkpoints").glob("*.ckpt"))  # after 4 steps
    next_second()
    main([*common, "--trainer.max_steps=10", f"--ckpt_path={checkpoint}"])
    assert sorted(p.name for p in (tmp_path / "prefixed").iterdir()) == ["version_0"]
    for run, tag in (("plain", "train/objective"), ("prefixed", "exp-train/objective")):
        steps = [step for step, _ in _tensorboard_view(tmp_path / run / "version_0")[tag]]
        assert steps == list(range(10)), (run, steps)
    moved = tmp_path / "moved"  # the log folder moved: the loggers are found by their names
    moved.mkdir()
    for run in ("plain", "prefixed"):
        shutil.copytree(tmp_path / run, moved / run)
    config.write_text(config.read_text().replace(f"save_dir: {tmp_path}", f"save_dir: {moved}"))
    main([*common, "--trainer.max_steps=12", f"--ckpt_path={moved / checkpoint.relative_to(tmp_path)}"])
    assert sorted(p.name for p in (moved / "prefixed").iterdir()) == ["version_0"]
