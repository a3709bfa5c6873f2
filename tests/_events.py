"""Reading TensorBoard event files back in tests."""

from __future__ import annotations

import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from every event file below ``log_dir`` (sorted by step)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def tensor_tags(log_dir: str | Path) -> set[str]:
    """Tags of tensor summaries (e.g. the custom-scalars layout) below ``log_dir``."""
    tags: set[str] = set()
    for path in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        acc.Reload()
        tags.update(acc.Tags()["tensors"])
    return tags


def next_second() -> None:
    """Wait for the wall clock's next whole second, before a resume in the same process. TensorBoard reads a run's event
    files in their names' order, as text: the time in whole seconds, then a per-process counter ("….10" before "….9"),
    so a resume made within its run's second could be read first; a real resume comes seconds later."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
