"""The convex gap monitor's arguments: each value checked, and the combinations that cannot work refused, before
training (rather than found out from a dashboard of failed solves)."""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from hcl.checks import caller_stacklevel, check_seconds, check_seed, is_int
from hcl.convex import available_solvers, check_solver_options
from hcl.convex.solvers import solvers_used, unknown_solver
from hcl.worker import WORKER_KINDS

FORMULATIONS = ("neurons", "patterns")
WARM_STARTS = ("network", "previous")


def check_monitor_arguments(
    *, formulation: str, solver: str, sampled_patterns: int, gated: bool, load_solution: bool,
    solver_options: Mapping[str, Any] | None, seed: int, asynchronous: bool, max_pending: int,
    solve_time_limit: float | None, raise_worker_errors: bool, worker: str, warm_start: str,
) -> tuple[str, float | None]:
    """Raise on a value or a combination :class:`~hcl.callbacks.ConvexGapMonitor` cannot use, warn on one that would
    do nothing; returns ``solver`` (lower case) and ``solve_time_limit``, checked."""
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    solver = _check_solver(solver)
    if not is_int(sampled_patterns) or sampled_patterns < 0:
        raise ValueError(f"sampled_patterns must be an integer ≥ 0, got {sampled_patterns!r}")
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a dict of keyword arguments, got {type(solver_options).__name__}")
    check_solver_options(solver, solver_options or {})  # here, not at the first solve steps later
    for name, flag in (("gated", gated), ("load_solution", load_solution), ("asynchronous", asynchronous),
                       ("raise_worker_errors", raise_worker_errors)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not is_int(max_pending) or max_pending < 1:
        raise ValueError(f"max_pending must be a positive integer, got {max_pending!r}")
    solve_time_limit = check_seconds(solve_time_limit, "solve_time_limit")
    if worker not in WORKER_KINDS:
        raise ValueError(f"worker must be one of {WORKER_KINDS}, got {worker!r}")
    if asynchronous and worker == "process":
        _check_sendable(solver)
    if asynchronous and load_solution:
        raise ValueError("load_solution cannot be used with asynchronous=True: a solution that arrives steps later "
                         "would overwrite newer weights")
    if gated and load_solution:
        raise ValueError("load_solution cannot be used with gated=True: the gated relaxation's blocks have no cone "
                         "constraints, so the network they map to has other patterns and none of the logged values")
    if sampled_patterns and formulation != "patterns":
        raise ValueError("sampled_patterns needs formulation='patterns': the 'neurons' formulation has one block per "
                         "neuron of the network, none for other patterns")
    for name in ("gated", "warm_start"):
        if name in (solver_options or {}):
            raise ValueError(f"give {name} as the monitor's own {name}= argument, not in solver_options (the monitor "
                             "sets it for every solve)")
    check_seed(seed)
    if warm_start not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {warm_start!r}")
    if solve_time_limit is not None and "time_limit" in (solver_options or {}):
        raise ValueError("give the time limit once, as solve_time_limit (the monitor tells the solver), not also "
                         "as solver_options['time_limit']")
    # accepted, but they would do nothing: said now rather than found out from the dashboard
    if raise_worker_errors and not asynchronous:
        rank_zero_warn("ConvexGapMonitor: raise_worker_errors=True has no effect without asynchronous=True (a "
                       "synchronous solve's failure is a warning and a status)", stacklevel=_past_rank_zero_warn())
    if warm_start == "previous" and solver not in ("native", "auto"):
        rank_zero_warn(f"ConvexGapMonitor: warm_start='previous' has no effect with solver={solver!r}: "
                       "only the native solver takes a warm start", stacklevel=_past_rank_zero_warn())
    return solver, solve_time_limit


def _check_solver(solver: str) -> str:
    if not isinstance(solver, str) or not solver:
        raise ValueError(f"solver must be a solver name, got {solver!r}")
    name = solver.lower()
    known = available_solvers()
    if name not in known:
        raise ValueError(unknown_solver(solver))
    return name


def _past_rank_zero_warn() -> int:
    """The user's line for ``rank_zero_warn`` (three frames of its own) from the function that calls this one."""
    return 2 + caller_stacklevel()


def check_for_outputs(owner: str, solver: str, out_features: int, load_solution: bool = False) -> None:
    """Refuse before training what cannot work with the network's outputs: the cvxpylayers layer takes problems of
    one output (or one-vs-all ones, which the monitors do not build), so with several every solve would fail."""
    if solver == "cvxpylayers" and out_features > 1:
        raise ValueError(f"{owner}: solver='cvxpylayers' solves problems of one output and the network has "
                         f"{out_features}: use 'auto', 'native' or a cvxpy solver")
    if load_solution and out_features > 1:
        raise ValueError("load_solution needs a network with one output: with several, the solution maps to a "
                         "neuron per nonzero column of its blocks (up to 2Pc), more than any network's width")


def _check_sendable(solver: str) -> None:
    """A worker process gets the solver objects with each job (it knows only the built-in ones): refuse now, not at
    every solve, one that cannot be pickled or whose class lives in ``__main__`` (the worker's is empty)."""
    for entry in solvers_used(solver):
        module = type(entry).__module__
        try:
            pickle.dumps(entry)
            reason = "a script or notebook's class" if module == "__main__" else None
        except Exception as error:  # noqa: BLE001 - pickling raises several types
            reason = str(error)
        if reason is not None:
            raise ValueError(f"solver {entry.name!r} ({type(entry).__qualname__} of {module}) cannot be sent to the "
                             f"worker process ({reason}): define its class at the top level of an importable module, "
                             "or use worker='thread'")


def warn_if_checkpoints_wait(trainer: Any, owner: str, every_n_steps: int) -> None:
    """Warn when a ``ModelCheckpoint`` saves at least as often as an asynchronous monitor solves: a checkpoint waits
    for the solves in flight (it is a consistent cut), so training would wait for nearly every solve."""
    if getattr(trainer, "fast_dev_run", False):  # Lightning saves no checkpoint there
        return
    batches = trainer.num_training_batches
    # an epoch's last, partial accumulation is a step too
    steps_per_epoch = math.ceil(batches / max(trainer.accumulate_grad_batches, 1)) if math.isfinite(batches) else 0
    for checkpoint in trainer.checkpoint_callbacks:
        every_steps = getattr(checkpoint, "_every_n_train_steps", 0) or 0
        every_epochs = getattr(checkpoint, "_every_n_epochs", 0) or 0
        if not every_steps and every_epochs and steps_per_epoch:
            on_train_epoch_end = getattr(checkpoint, "_should_save_on_train_epoch_end", None)
            if callable(on_train_epoch_end) and not on_train_epoch_end(trainer):  # saved after validation only
                every_epochs = math.lcm(every_epochs, max(int(trainer.check_val_every_n_epoch or 1), 1))
            every_steps = every_epochs * max(steps_per_epoch, 1)
        if every_steps and every_steps <= every_n_steps:
            rank_zero_warn(
                f"{owner}: a checkpoint is saved every {every_steps} step(s) and waits for the background solves in "
                f"flight (it records every step it counts as done), so with a solve every {every_n_steps} step(s) "
                "training waits for nearly every solve; save less often (ModelCheckpoint(every_n_train_steps=…) or "
                "--trainer.enable_checkpointing=false) to keep the solves in the background"
            )
            return


# What a solve logs only when it proves it (docs/dashboards.md): absent at a step whose solve does not
PROVED_TAGS = ("optimum", "gap", "gated_optimum", "upper_bound", "lower_bound", "gated_network_bound", "max_gap",
               "duality_gap")


def proved_tags(prefix: str) -> list[str]:
    """The tags under ``prefix`` that a solve logs only when it proves them."""
    return [f"{prefix}/{tag}" for tag in PROVED_TAGS]


def warn_about_monitored_tags(trainer: Any, owner: str, prefix: str, asynchronous: bool) -> None:
    """Warn when a ``ModelCheckpoint`` or ``EarlyStopping`` monitors one of the monitor's tags where it cannot read the
    step's own value: an asynchronous solve's result arrives steps later (the callback then reads an earlier step's
    value, or none: ``EarlyStopping`` stops with an error, ``ModelCheckpoint`` saves nothing), and a tag the step's
    solve did not prove is absent (``EarlyStopping(strict=True)`` then stops training with an error)."""
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        # (GlobalOptimumMonitor's tags, under the same default prefix, are global_*: synchronous, and not this one's)
        if not isinstance(monitor, str) or not monitor.startswith(f"{prefix}/") or "/global_" in monitor:
            continue
        kind = type(callback).__name__
        if asynchronous and isinstance(callback, (ModelCheckpoint, EarlyStopping)):
            rank_zero_warn(f"{owner}: {kind}(monitor={monitor!r}) reads the asynchronous solves' values, which arrive "
                           "steps after their snapshot: it scores a step by an earlier step's value, or finds none "
                           "(EarlyStopping then stops with an error, ModelCheckpoint saves nothing); monitor a "
                           "synchronous ConvexGapMonitor's tag (asynchronous=False)")
        elif isinstance(callback, EarlyStopping) and callback.strict and monitor in proved_tags(prefix):
            rank_zero_warn(f"{owner}: {monitor!r} is logged only at a step whose solve proves it, so "
                           f"EarlyStopping(monitor={monitor!r}, strict=True) stops training with an error at the first "
                           "solve that does not: pass strict=False to skip those steps")
