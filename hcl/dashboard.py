"""One TensorBoard custom-scalars layout per run, merged from every hcl callback's charts.

TensorBoard reads a single layout per run, so callbacks register their charts in ``setup`` and the first of
them to reach ``on_train_start`` writes the merged layout once.

TensorBoard colours lines by run, not by tag: the lines of a chart that selects several tags of one run share the
run's colour. So each series of a chart with several series is also written to a run of its own,
``<log_dir>/series/<tag>``, under the chart's tag ``chart/<title>``, and the layout's chart selects that tag: one line
per series, each in its own colour and named by its tag. The run's own tags stay as they are.
"""

from __future__ import annotations

import math
import os
import re
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

# trainer → {"charts": {category: {title: ["Multiline", [tags]]}}, "written": bool,
#            "writers": {tag: [SummaryWriter per TensorBoard logger]}, "routes": {tag: [chart tag]},
#            "restart": int | None, "last": {tag: step}}
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SERIES_DIR = "series"


def register_charts(trainer: pl.Trainer, category: str, charts: dict[str, list[str]]) -> None:
    """Add multiline charts ``{title: [tag, ...]}`` under ``category`` for this trainer's run."""
    entry = _entry(trainer)
    section = entry["charts"].setdefault(category, {})
    for title, tags in charts.items():
        existing = section.get(title, ["Multiline", []])[1]
        section[title] = ["Multiline", existing + [t for t in tags if t not in existing]]


def chart_tag(title: str) -> str:
    """The tag under which the series runs write the chart ``title`` (``chart/<title>``, spaces as ``_``)."""
    return "chart/" + re.sub(r"[^A-Za-z0-9_.\-/]", "_", title)


def written_layout(charts: Mapping[str, Mapping[str, list]], prefix: str = "") -> dict:
    """The layout as written: a chart of several series selects its chart tag, a chart of one series its tag (as the
    logger writes it, with its ``prefix``), each as the exact match TensorBoard's regexes need."""

    def select(title: str, tags: list[str]) -> list[str]:
        if len(tags) > 1:
            return [f"^{re.escape(chart_tag(title))}$"]
        return [f"^{re.escape(prefix + tag)}$" for tag in tags]

    return {category: {title: ["Multiline", select(title, tags)] for title, (_, tags) in section.items()}
            for category, section in charts.items()}


def write_layout(trainer: pl.Trainer) -> bool:
    """Write the merged layout to every TensorBoard logger once per fit (rank zero only); True when written now.

    It also opens the series runs of the charts with several series, under every TensorBoard logger's directory.
    """
    entry = _REGISTRY.get(trainer)
    if entry is None or entry["written"] or not entry["charts"]:
        return False
    entry["written"] = True
    if not trainer.is_global_zero:
        return False
    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    for logger in loggers:
        # Lightning writes a prefixed logger's tags as "<prefix>-<tag>"
        prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""
        logger.experiment.add_custom_scalars(written_layout(entry["charts"], prefix))
    _open_series(entry, [logger.log_dir for logger in loggers])
    if entry["restart"] is not None:
        _mark_restart(entry, entry["restart"])
    return True


def _open_series(entry: dict, log_dirs: list[str]) -> None:
    if not log_dirs:
        return
    from torch.utils.tensorboard import SummaryWriter  # here: only a run with a TensorBoard logger needs it

    entry["routes"] = {}
    for section in entry["charts"].values():
        for title, (_, tags) in section.items():
            if len(tags) < 2:
                continue
            for tag in tags:
                entry["routes"].setdefault(tag, []).append(chart_tag(title))
                if tag not in entry["writers"]:
                    entry["writers"][tag] = [SummaryWriter(os.path.join(log_dir, SERIES_DIR, *tag.split("/")))
                                             for log_dir in log_dirs]


def mirror_series(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> list[str]:
    """Write the charted values of ``metrics`` at ``step`` to their series runs (no-op where none are open).

    A value is written at most once per tag and step, whichever callbacks pass it on. Returns the tags written.
    """
    entry = _REGISTRY.get(trainer)
    if entry is None or not entry["writers"]:
        return []
    written = []
    for tag, value in metrics.items():
        if tag not in entry["writers"] or entry["last"].get(tag) == step:
            continue
        entry["last"][tag] = step
        written.append(tag)
        for chart in entry["routes"][tag]:
            for writer in entry["writers"][tag]:
                writer.add_scalar(chart, float(value), global_step=step)
    return written


def mark_series_restart(trainer: pl.Trainer, step: int) -> None:
    """Give every series run the restart marker at ``step`` (also those opened later for this trainer)."""
    entry = _entry(trainer)
    entry["restart"] = step
    _mark_restart(entry, step)


def _mark_restart(entry: dict, step: int) -> None:
    # TensorBoard's restart marker, as callbacks/logs.py `mark_resumed_run` writes to the run itself
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    for writers in entry["writers"].values():
        for writer in writers:
            file_writer = writer._get_file_writer()
            file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            file_writer.flush()


def flush_series(trainer: pl.Trainer, tags: list[str] | None = None) -> None:
    """Write what the series runs hold to disk (only those of ``tags`` when given)."""
    entry = _REGISTRY.get(trainer)
    writers = {} if entry is None else entry["writers"]
    for tag in writers if tags is None else tags:
        for writer in writers.get(tag, []):
            writer.flush()


def wait_past_last_fit(trainer: pl.Trainer) -> None:
    """Before a fit writes anything: wait for the next second when an event file of its TensorBoard runs was made in
    this one. TensorBoard reads a run's event files in name order, a name is its creation second then a process-wide
    counter compared as text ("….13" before "….3"), and a file read first drops the steps before its own: a second
    fit's series points, or a resumed run's whole first step, were lost to files made in the same second."""
    if not trainer.is_global_zero:
        return
    now = time.time()
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and os.path.isdir(logger.log_dir):
            stamps = (path.name.split(".")[3] for path in Path(logger.log_dir).rglob("events.out.tfevents.*"))
            if any(stamp.isdigit() and int(stamp) >= math.floor(now) for stamp in stamps):
                time.sleep(max(0.0, math.floor(now) + 1.0 - now))
                return


def close_series(trainer: pl.Trainer) -> None:
    """Flush and close the series runs at the end of a fit; a later fit of the same trainer writes the layout and
    opens them again."""
    entry = _REGISTRY.get(trainer)
    if entry is None:
        return
    writers, entry["writers"] = entry["writers"], {}
    entry["written"], entry["restart"] = False, None  # a later fit marks its own start, if past step 0
    for runs in writers.values():
        for writer in runs:
            writer.close()


def series_dirs(trainer: pl.Trainer) -> dict[str, str]:
    """``{tag: directory}`` of the open series runs under the first TensorBoard logger (for inspection and tests)."""
    entry = _REGISTRY.get(trainer)
    return {} if entry is None else {tag: runs[0].log_dir for tag, runs in entry["writers"].items()}


def layout_of(trainer: pl.Trainer) -> dict:
    """The charts registered so far for ``trainer`` (for inspection and tests)."""
    entry = _REGISTRY.get(trainer)
    return {} if entry is None else entry["charts"]


def _entry(trainer: pl.Trainer) -> dict:
    return _REGISTRY.setdefault(trainer, {"charts": {}, "written": False, "writers": {}, "routes": {},
                                          "restart": None, "last": {}})
