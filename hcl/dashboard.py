"""One TensorBoard custom-scalars layout per run, merged from every hcl callback's charts.

TensorBoard reads a single layout per run, so callbacks register their charts in ``setup`` and the first of
them to reach ``on_train_start`` writes the merged layout once.
"""

from __future__ import annotations

import weakref

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

# trainer → {"charts": {category: {title: ["Multiline", [tag regexes]]}}, "written": bool}
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_charts(trainer: pl.Trainer, category: str, charts: dict[str, list[str]]) -> None:
    """Add multiline charts ``{title: [tag regex, ...]}`` under ``category`` for this trainer's run."""
    entry = _REGISTRY.setdefault(trainer, {"charts": {}, "written": False})
    section = entry["charts"].setdefault(category, {})
    for title, tags in charts.items():
        existing = section.get(title, ["Multiline", []])[1]
        section[title] = ["Multiline", existing + [t for t in tags if t not in existing]]


def write_layout(trainer: pl.Trainer) -> bool:
    """Write the merged layout to every TensorBoard logger once (rank zero only); True when written now."""
    entry = _REGISTRY.get(trainer)
    if entry is None or entry["written"] or not entry["charts"]:
        return False
    entry["written"] = True
    if not trainer.is_global_zero:
        return False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(entry["charts"])
    return True


def layout_of(trainer: pl.Trainer) -> dict:
    """The charts registered so far for ``trainer`` (for inspection and tests)."""
    entry = _REGISTRY.get(trainer)
    return {} if entry is None else entry["charts"]
