"""``python -m hcl.fit``: train a two-layer ReLU network from a YAML config (LightningCLI).

With no arguments it runs the embedded default (``hcl/default.yaml``): the 100 × 10 synthetic experiment (c)
of ``docs/experiments.md``, with the pattern and convex-gap monitors, in well under a minute on a CPU. Everything
else is LightningCLI: ``--config configs/<experiment>.yaml``, ``--print_config``, ``--model.hidden=50``,
``--trainer.max_steps=...``, ``--trainer.callbacks+=...``, ``--seed_everything``, plus ``--ckpt_path`` to
resume. Logs go under ``--trainer.default_root_dir``.

Resuming: a checkpoint that lies in a TensorBoard run's ``checkpoints/`` folder (where Lightning puts them) continues
that run's version directory, unless the logger's ``version`` is set explicitly; hcl's callbacks then mark the
restart, so TensorBoard shows every step once (see ``docs/reliability.md``).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from hcl.model import TwoLayerReLU

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

TRAINER_DEFAULTS: dict[str, Any] = {
    # The experiments plot every gradient step; Lightning's default (50) would drop most of them.
    "log_every_n_steps": 1,
    "enable_progress_bar": True,
}


def _data_size(attribute: str):
    # A partial of a module-level function, not a closure: ddp_spawn pickles the CLI's parser with the trainer.
    return functools.partial(_read_data_size, attribute)


def _read_data_size(attribute: str, data: pl.LightningDataModule) -> int:
    value = getattr(data, attribute, None)
    if value is None:
        raise ValueError(
            f"the data module {type(data).__name__} has no `{attribute}`: set --model.{attribute} explicitly"
            " or use an hcl.datamodules class"
        )
    return int(value)


class HCLCLI(LightningCLI):
    """LightningCLI with the model's input/output sizes taken from the data module and ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume from")
        parser.link_arguments("data", "model.in_features", compute_fn=_data_size("in_features"),
                              apply_on="instantiate")
        parser.link_arguments("data", "model.out_features", compute_fn=_data_size("out_features"),
                              apply_on="instantiate")


def main(args: ArgsType = None) -> HCLCLI:
    """Parse ``args`` (``sys.argv[1:]`` when ``None``), train, and say where the logs are."""
    if args is None:
        args = sys.argv[1:]
    if not args:
        print(f"hcl: no arguments, running the embedded default experiment ({DEFAULT_CONFIG})")
        args = ["--config", str(DEFAULT_CONFIG)]
    cli = HCLCLI(
        TwoLayerReLU,
        pl.LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        run=False,
        args=args,
    )
    _continue_logged_run(cli.trainer, cli.config.ckpt_path)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    _print_log_location(cli.trainer)
    return cli


def _continue_logged_run(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """Log a resumed run into the TensorBoard version directory its checkpoint came from.

    Lightning's default is a new ``version_<k+1>`` on every run, which splits one training run over two TensorBoard
    runs that overlap between the checkpoint and the crash. A checkpoint at ``<save_dir>/<name>/<version>/checkpoints/
    x.ckpt`` of a TensorBoard logger with the same ``save_dir`` and ``name`` and no explicit version continues
    ``<version>`` instead.
    """
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    checkpoint = Path(ckpt_path).resolve()
    if checkpoint.parent.name != "checkpoints":
        return
    version_dir = checkpoint.parent.parent
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger) or getattr(logger, "_version", 0) is not None:
            continue
        if Path(logger.root_dir).resolve() != version_dir.parent:
            continue
        match = re.fullmatch(r"version_(\d+)", version_dir.name)
        logger._version = int(match.group(1)) if match else version_dir.name
        if trainer.is_global_zero:
            print(f"hcl: resuming the run logged in {version_dir}")


def _print_log_location(trainer: pl.Trainer) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            root = Path(getattr(logger, "root_dir", log_dir)).resolve()
            print(f"hcl: logs written to {Path(log_dir).resolve()}")
            print(f"hcl: open them with: tensorboard --logdir {root}")


if __name__ == "__main__":
    main()
