"""``python -m hcl.fit``: train a two-layer ReLU network from a YAML config (LightningCLI).

With no arguments it runs the embedded default (``hcl/default.yaml``): the seed's 100 × 10 synthetic
experiment, with the pattern and convex-gap monitors, in well under a minute on a CPU. Everything else is
LightningCLI: ``--config configs/<experiment>.yaml``, ``--print_config``, ``--model.hidden=50``,
``--trainer.max_steps=...``, ``--trainer.callbacks+=...``, ``--seed_everything``, plus ``--ckpt_path`` to
resume. Logs go under ``--trainer.default_root_dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningCLI

from hcl.model import TwoLayerReLU

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

TRAINER_DEFAULTS: dict[str, Any] = {
    # The seed logs every gradient step; Lightning's default (50) would drop most of them.
    "log_every_n_steps": 1,
    "enable_progress_bar": True,
}


def _data_size(attribute: str):
    def compute(data: pl.LightningDataModule) -> int:
        value = getattr(data, attribute, None)
        if value is None:
            raise ValueError(
                f"the data module {type(data).__name__} has no `{attribute}`: set --model.{attribute} explicitly"
                " or use an hcl.datamodules class"
            )
        return int(value)

    return compute


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
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    _print_log_location(cli.trainer)
    return cli


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
