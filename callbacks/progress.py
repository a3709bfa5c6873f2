r"""
Step progress bar
=================

One tqdm bar over the run's optimizer steps, with a time estimate and the convex values in its postfix.

Lightning's bar counts the batches of an epoch; in full-batch training one step is one epoch, so it reads ``1/1`` at
every step and never estimates the time left. This bar counts ``trainer.global_step`` up to ``trainer.max_steps``
(``max_epochs × ⌈batches / accumulate_grad_batches⌉`` when ``max_steps`` is not set, whichever ends training first
when both are) and shows, when they are in ``trainer.callback_metrics``, the values the monitors log.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

from hcl.checks import is_int
from hcl.convex.status import Status

#: ``(tag suffix, label)`` of one monitor's values, in postfix order; the first present of each group is shown.
CONVEX_FIELDS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("optimum", "opt"), ("upper_bound", "ub")),
    (("lower_bound", "lb"),),
    (("gap", "gap"), ("max_gap", "max_gap")),
)
GLOBAL_FIELDS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("global_optimum", "g_opt"), ("global_upper_bound", "g_ub")),
    (("global_lower_bound", "g_lb"),),
    (("global_gap", "g_gap"), ("global_max_gap", "g_max_gap")),
)
OBJECTIVE_TAG = "train/objective"
PATTERNS_TAG = "patterns/unique"
DEFAULT_PREFIX = "convex"
# Codes 2 (iteration and time limits) share one name, as they share one code.
_STATUS_NAMES = {Status.OPTIMAL.code: "optimal", Status.OPTIMAL_INACCURATE.code: "inaccurate",
                 Status.TIME_LIMIT.code: "limit", Status.FAILED.code: "failed", Status.NONFINITE.code: "nonfinite"}


class StepProgressBar(TQDMProgressBar):
    r"""A single progress bar over the optimizer steps, with the objective and the convex values.

    The bar's total is the number of steps training will take (``trainer.max_steps``, or ``max_epochs`` times the
    optimizer steps of an epoch when ``max_steps`` is ``-1``; no total when training is unbounded); it starts at the
    resumed step after a resume, so its time estimate counts only the steps still to run. Its postfix shows, in this
    order and only when present in ``trainer.callback_metrics``:

    - ``L``: ``train/objective``;
    - per :class:`~hcl.callbacks.ConvexGapMonitor` prefix (``<prefix>.`` before the label unless the prefix is
      ``convex``): ``opt`` (``<prefix>/optimum``, else ``ub``: ``<prefix>/upper_bound``), ``lb``
      (``<prefix>/lower_bound``), ``gap`` (``<prefix>/gap``, else ``max_gap``: ``<prefix>/max_gap``), and ``status``
      when the last solve was not optimal. Only the values of the last solve are shown: a value that an earlier solve
      logged and the last one did not (an optimum before a failed solve) is left out;
    - per :class:`~hcl.callbacks.GlobalOptimumMonitor` prefix: ``g_opt`` (else ``g_ub``), ``g_lb``, ``g_gap`` (else
      ``g_max_gap``);
    - ``patterns``: ``patterns/unique``;
    - the model's other ``prog_bar=True`` values, under their own names.

    Args:
        refresh_rate: redraw every ``refresh_rate`` steps (and at the last); ``0`` disables the bar.
        process_position: offset of the bar in lines, for several bars on one terminal.

    Example::

        trainer = Trainer(max_steps=300, callbacks=[PatternMonitor(), ConvexGapMonitor(every_n_steps=5),
                                                    StepProgressBar()])
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        for name, value in (("refresh_rate", refresh_rate), ("process_position", process_position)):
            if not is_int(value) or value < 0:  # Lightning's bar takes anything, and fails or hides itself later
                raise ValueError(f"{name} must be an integer ≥ 0, got {value!r}")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self._held: dict[str, Any] = {}  # the metric objects seen last: a new object is a newly logged value
        self._solve_status: dict[str, Any] = {}  # per prefix, the status object of its last solve
        self._solve_tags: dict[str, set[str]] = {}  # per prefix, the tags that solve logged

    @property
    def total_steps(self) -> int | None:
        """The optimizer steps training will take, or ``None`` when unbounded or unknown."""
        trainer = self.trainer
        try:
            total = trainer.estimated_stepping_batches
        except MisconfigurationException:  # the accumulation changes between epochs
            total = trainer.max_steps
        if total is None or total < 0 or math.isinf(total) or math.isnan(total):
            return None
        return int(total)

    @override
    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.train_description,
            total=self.total_steps,
            initial=self.trainer.global_step,
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    @override
    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.sanity_check_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
            delay=1.0,  # shown only when the check lasts: without validation data it would be an empty "0/?" bar
        )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._held, self._solve_status, self._solve_tags = {}, {}, {}
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", *_: Any) -> None:
        # One bar for the whole run: it is not reset per epoch; the epoch is named only when it has several steps.
        if self.total_train_batches != 1:
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._follow_solves(trainer.callback_metrics)  # every batch, so that no solve's values are missed
        bar = self._train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix_str(postfix_text(self.get_metrics(trainer, pl_module)))

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        pass  # the postfix is drawn per step

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            # The monitors may log once more when training ends (a last solve): show the final values.
            self._follow_solves(trainer.callback_metrics)
            text = postfix_text(self.get_metrics(trainer, pl_module))
            if text != bar.postfix or bar.n != trainer.global_step:
                bar.n = trainer.global_step
                bar.set_postfix_str(text)
        super().on_train_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix_str(postfix_text(self.get_metrics(trainer, pl_module)))

    @override
    def get_metrics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, int | str | float]:
        metrics = trainer.callback_metrics
        self._follow_solves(metrics)
        items: dict[str, int | str | float] = {}
        if OBJECTIVE_TAG in metrics:
            items["L"] = _number(metrics[OBJECTIVE_TAG])
        for prefix in _prefixes(metrics, "status"):
            label = "" if prefix == DEFAULT_PREFIX else f"{prefix}."
            tags = self._solve_tags.get(prefix, set())
            items.update(_fields(metrics, prefix, label, CONVEX_FIELDS, tags))
            code = int(_value(metrics[f"{prefix}/status"]))
            if code != Status.OPTIMAL.code:
                items[f"{label}status"] = _STATUS_NAMES.get(code, str(code))
        for prefix in _prefixes(metrics, "global_lower_bound"):
            label = "" if prefix == DEFAULT_PREFIX else f"{prefix}."
            items.update(_fields(metrics, prefix, label, GLOBAL_FIELDS, None))
        if PATTERNS_TAG in metrics:
            items["patterns"] = int(_value(metrics[PATTERNS_TAG]))
        for name, value in trainer.progress_bar_metrics.items():
            if name != OBJECTIVE_TAG and name not in items:
                items[name] = _number(value)
        return items

    def _follow_solves(self, metrics: dict[str, Any]) -> None:
        """Note, per prefix, which tags the last solve logged (a solve always logs ``<prefix>/status``)."""
        for prefix in _prefixes(metrics, "status"):
            status = metrics[f"{prefix}/status"]
            if status is not self._solve_status.get(prefix):
                self._solve_status[prefix] = status
                self._solve_tags[prefix] = {
                    tag for tag, value in metrics.items()
                    if tag.startswith(f"{prefix}/") and value is not self._held.get(tag)
                }
        self._held = dict(metrics)


def postfix_text(items: dict[str, Any]) -> str:
    """``"L=0.1234, opt=0.1, patterns=12"``: the values as given (tqdm's own formatting would pad them)."""
    return ", ".join(f"{name}={value}" for name, value in items.items())


def _prefixes(metrics: dict[str, Any], suffix: str) -> list[str]:
    """The prefixes ``p`` with a ``p/<suffix>`` tag, in the order logged."""
    return [tag[: -len(suffix) - 1] for tag in metrics if tag.endswith(f"/{suffix}") and tag != f"/{suffix}"]


def _fields(
    metrics: dict[str, Any], prefix: str, label: str, groups: tuple[tuple[tuple[str, str], ...], ...],
    fresh: set[str] | None,
) -> dict[str, float | str]:
    """The first tag present in each group, as ``{label: value}``; only tags in ``fresh`` when it is given."""
    items: dict[str, float | str] = {}
    for group in groups:
        for suffix, short in group:
            tag = f"{prefix}/{suffix}"
            if tag in metrics and (fresh is None or tag in fresh):
                items[label + short] = _number(metrics[tag])
                break
    return items


def _value(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _number(value: Any) -> float | str:
    """A value for the postfix: four significant digits (tqdm would show three)."""
    try:
        number = _value(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values, or a string
        return str(value)
    return f"{number + 0.0:.4g}"  # + 0.0: a bound of −0.0 (a zero certificate) reads "0", not "-0"
