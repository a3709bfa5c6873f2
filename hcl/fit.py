"""``python -m hcl.fit``: train a two-layer ReLU network from a YAML config (LightningCLI).

Unless a config (``--config``) or a data module (``--data=<class>``) is given, it runs the embedded default
(``hcl/default.yaml``): the 100 × 10 synthetic experiment (c) of ``docs/experiments.md``, with the pattern and
convex-gap monitors, in well under a minute on a CPU; options override it (``--trainer.max_steps=20``), and
``--print_config`` prints the config that would run. Everything else is LightningCLI: ``--config
configs/<experiment>.yaml``, ``--model.hidden=50``, ``--trainer.callbacks+=...``, ``--seed_everything``, plus
``--ckpt_path`` to resume. Logs go under ``--trainer.default_root_dir``.

A wrong option or value ends the run with one line on stderr (``python -m hcl.fit: error: ...``) and exit code 2;
``HCL_TRACEBACK=1`` shows the full traceback instead.

Resuming: every TensorBoard logger continues the version directory it wrote to in the checkpoint's run (recorded in
the checkpoint by :class:`LoggedRuns`; for an older checkpoint, the run whose ``checkpoints/`` folder holds it),
unless the logger's ``version`` is set explicitly; hcl's callbacks then mark the restart, so TensorBoard shows every
step once (see ``docs/reliability.md``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

import hcl.convex_model  # noqa: F401 - imported so that `--model` lists hcl's models
import hcl.datamodules  # noqa: F401 - imported so that `--data` lists hcl's data modules
import hcl.model  # noqa: F401
from hcl.callbacks import StepProgressBar
from hcl.checks import check_resumable, read_checkpoint
from hcl.cli_errors import USER_ERRORS, one_line_error, raised_by_checks, spawned_user_error
from hcl.evaluation import STEPS_DONE

PROG = "python -m hcl.fit"
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
# Given as the first argument, not as a parser default: another --model class (a config's, the command line's) would
# otherwise keep the default class's signature defaults for every argument the two share (jsonargparse issue 460).
DEFAULT_MODEL = "hcl.TwoLayerReLU"

TRAINER_DEFAULTS: dict[str, Any] = {
    # The experiments plot every gradient step; Lightning's default (50) would drop most of them.
    "log_every_n_steps": 1,
    "enable_progress_bar": True,
    # A two-layer network's summary table says nothing the config does not; it made the start banner long.
    "enable_model_summary": False,
}


def data_in_features(data: pl.LightningDataModule) -> int:
    """The model's ``in_features``: the data module's."""
    return _read_data_size(data, "in_features")


def data_out_features(data: pl.LightningDataModule) -> int:
    """The model's ``out_features``: the data module's."""
    return _read_data_size(data, "out_features")


def _read_data_size(data: pl.LightningDataModule, attribute: str) -> int:
    value = getattr(data, attribute, None)
    if value is None:
        raise ValueError(
            f"the data module {type(data).__name__} has no `{attribute}`: {PROG} takes the model's sizes from its "
            "data module; give it `in_features` and `out_features` attributes, or use an hcl.datamodules class"
        )
    return int(value)


class HCLCLI(LightningCLI):
    """LightningCLI with the model's input/output sizes taken from the data module and ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume from")
        # Module-level functions (ddp_spawn pickles the parser with the trainer), named as the help prints them.
        # The model is any LightningModule (DEFAULT_MODEL unless named, hcl.ConvexReLU for convex training).
        parser.link_arguments("data", "model.init_args.in_features", compute_fn=data_in_features,
                              apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.out_features", compute_fn=data_out_features,
                              apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # One bar over the steps (a full-batch step is an epoch), unless the config gives its own or disables it.
        config = self.config_init.get("trainer") or {}
        callbacks = config.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, pl.Callback) else list(callbacks)  # one, as Trainer takes it
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks = [*callbacks, StepProgressBar()]
        kwargs["callbacks"] = [*callbacks, LoggedRuns()]
        trainer = super().instantiate_trainer(**kwargs)
        if config.get("logger") in (None, True):
            # Lightning's default TensorBoard logger writes hp_metric = −1 at step 0 at every fit and test: a tag
            # that says nothing, and one more record at step 0 per resume
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger) and hasattr(logger, "_default_hp_metric"):
                    logger._default_hp_metric = False
        return trainer


class LoggedRuns(pl.Callback):
    """Writes into each checkpoint the version folder of every TensorBoard logger, so that a resume continues each of
    them (the checkpoint's own folder names one logger's only)."""

    KEY = "hcl_tensorboard_versions"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # by folder, and by name for a log folder moved since (its loggers' names stay)
        checkpoint[self.KEY] = [{"root": str(Path(logger.root_dir).resolve()), "name": logger.name,
                                 "version": logger.version}
                                for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def main(args: ArgsType = None) -> HCLCLI:
    """Parse ``args`` (the command line when ``None``), train, and say where the logs are.

    Raises:
        SystemExit: code 2 after one line on stderr when an option, a value or the data is wrong (the traceback
            with ``HCL_TRACEBACK=1``); code 0 after ``--help`` or ``--print_config``.
    """
    given = sys.argv[1:] if args is None else args
    if isinstance(given, (list, tuple)) and given and given[0] in ("fit", "validate", "test", "predict"):
        _fail(ValueError(f"{PROG} has no subcommands ({given[0]!r}): it fits, then tests when the data has a test "
                         "split; drop the word"))
    sizes = [str(a) for a in given if re.match(r"--model\.(init_args\.)?(in|out)_features(=|$)", str(a))] if (
        isinstance(given, (list, tuple))) else []
    if sizes:  # linked from the data module at instantiation, which would silently replace them
        _fail(ValueError(f"{sizes[0].split('=')[0]} is taken from the data module (its in_features and "
                         "out_features): drop it"))
    # no abbreviations: --trainer.max_step ran as --trainer.max_steps, where --model.hid is refused
    parser_kwargs: dict[str, Any] = {"prog": PROG, "exit_on_error": False, "allow_abbrev": False}
    if isinstance(given, (list, tuple)):
        # Parsed left to right: the default model first, so that a config's `model:` without a class_path sets its
        # arguments, then the embedded default's config when no other is named, then the user's arguments.
        embedded = not _names_config_or_data(given)
        helps = any(a in ("-h", "--help") or re.match(r"--(print_config|\S+\.help)", str(a)) for a in given)
        if embedded and not helps:
            print(f"hcl: no --config or --data given: running the embedded default experiment ({DEFAULT_CONFIG})",
                  file=sys.stderr)
        args = [f"--model={DEFAULT_MODEL}", *(["--config", str(DEFAULT_CONFIG)] if embedded else []), *given]
    elif isinstance(given, dict) and "model" not in given:
        args = {"model": {"class_path": DEFAULT_MODEL}, **given}
    try:
        with warnings.catch_warnings():
            # the command line itself with the defaults in front (LightningCLI warns when args and sys.argv are set)
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = _build_cli(args, parser_kwargs)
    except Exception as error:  # noqa: BLE001 - parsing, or instantiating the model, data or callbacks
        _fail(error, constructing=True)
    if isinstance(cli.model, hcl.convex_model.ConvexReLU) and (cli.config.get("optimizer") or
                                                              cli.config.get("lr_scheduler")):
        # its step is the optimizer's step then the group prox at lr·2λ, and it steps no scheduler (manual)
        _fail(ValueError("hcl.ConvexReLU takes its step from --model.optimizer and --model.lr, which its proximal "
                         "step shares: --optimizer and --lr_scheduler would not be the step it takes"))
    if cli.config.get("optimizer") is not None and cli.trainer.is_global_zero:
        print(f"hcl: --optimizer replaces the model's own: model.optimizer={cli.model.hparams.optimizer!r} and "
              "model.lr are not used", file=sys.stderr)
    if cli.config.ckpt_path == "last":
        cli.config.ckpt_path = _last_checkpoint(cli.trainer)
    recorded = []  # the checkpoint's TensorBoard versions (the checkpoint itself is not kept while training)
    if cli.config.ckpt_path is not None and Path(cli.config.ckpt_path).is_file():  # Lightning names a missing one
        try:
            checkpoint = read_checkpoint(cli.config.ckpt_path, "--ckpt_path")
            check_resumable(checkpoint, cli.model, "--ckpt_path")
            recorded = checkpoint.get(LoggedRuns.KEY) or []
            del checkpoint
        except ValueError as error:
            _fail(error)
    _continue_logged_run(cli.trainer, cli.config.ckpt_path, recorded)
    new_dirs = _new_log_dirs(cli.trainer)
    try:
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
        except Exception as error:
            spawned = spawned_user_error(error)
            if spawned is None:
                raise
            raise spawned from error
    except USER_ERRORS as error:
        if not raised_by_checks(error):
            raise  # a bug in a user's own code (a model's step, a data module): its traceback says where
        if cli.trainer.global_step == 0:
            _remove_log_dirs(new_dirs)  # nothing was trained: no empty run in TensorBoard
        _fail(error)
    if _has_test_set(cli.datamodule) and not cli.trainer.interrupted:
        # The test accuracy the configs promise, on the weights training ended with, at the step training ended at.
        _carry_spawned_step(cli.trainer)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=cli.trainer.is_global_zero)
    _print_log_location(cli.trainer)
    return cli



def console_main() -> None:
    """The ``hcl-fit`` command: :func:`main` on the command line, exit status 0 after a run (a console script exits
    with what its function returns, and the CLI object is not a status); its messages name the command."""
    global PROG
    PROG = "hcl-fit"
    main()


def _build_cli(args: ArgsType, parser_kwargs: dict[str, Any]) -> HCLCLI:
    return HCLCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        run=False,
        args=args,
    )


def _carry_spawned_step(trainer: pl.Trainer) -> None:
    """After training in spawned processes (``ddp_spawn``), set this process's log step to where they stopped.

    Lightning brings the weights and the logged values back, not the loops' counters: the test would log at step 0
    and epoch 0. The models log ``step`` and ``epoch`` at every training step: the last ones, plus one (the global
    step too, which the models' test values are logged at).
    """
    metrics = trainer.callback_metrics
    step, epoch = metrics.get("step"), metrics.get("epoch")
    # the steps done, as hcl's models keep them (a validation's `step` is already past the last training step)
    done = metrics.get(STEPS_DONE, None if step is None else step + 1)
    if trainer.global_step == 0 and done is not None:
        loop = trainer.fit_loop.epoch_loop
        loop._batches_that_stepped = int(done)
        loop.automatic_optimization.optim_progress.optimizer.step.total.completed = int(done)
        loop.manual_optimization.optim_step_progress.total.completed = int(done)
        if epoch is not None and trainer.current_epoch == 0:
            trainer.fit_loop.epoch_progress.current.completed = int(epoch) + 1


def _has_test_set(datamodule: pl.LightningDataModule | None) -> bool:
    """Whether an hcl data module holds test data (others are left to the user's own ``trainer.test``)."""
    if not hasattr(datamodule, "split_tensors"):
        return False
    try:
        datamodule.split_tensors("test")
    except KeyError:
        return False
    return True


def _names_config_or_data(args: list[str] | tuple[str, ...]) -> bool:
    """Whether the arguments name a config file or a data module (then the embedded default does not apply)."""
    for arg in args:
        name = str(arg).split("=", 1)[0]
        if name in ("-c", "--config", "--data", "--data.class_path") or (name.startswith("-c") and len(name) > 2):
            return True
    return False


def _fail(error: BaseException, constructing: bool = False) -> None:
    if os.environ.get("HCL_TRACEBACK"):
        raise error
    print(f"{PROG}: error: {one_line_error(error, constructing)} (HCL_TRACEBACK=1 shows the traceback)",
          file=sys.stderr)
    raise SystemExit(2) from None


def _new_log_dirs(trainer: pl.Trainer) -> list[Path]:
    """The loggers' run folders (and their parents) that do not exist yet: this run creates them."""
    if not trainer.is_global_zero:
        return []
    new = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            for folder in (Path(log_dir), Path(log_dir).parent):
                if not folder.exists():
                    new.append(folder)
    return new


def _remove_log_dirs(folders: list[Path]) -> None:
    """Remove the log folders of a run that failed before its first step (its config and an empty event file)."""
    for folder in folders:  # the run folder before its parent
        if folder.is_dir() and (folder.name.startswith("version_") or not any(folder.iterdir())):
            shutil.rmtree(folder, ignore_errors=True)


def _last_checkpoint(trainer: pl.Trainer) -> str:
    """``--ckpt_path=last``: the newest checkpoint where this run's ``ModelCheckpoint`` would have written one in an
    earlier run (the loggers' runs, ``<root>/<version>/checkpoints/``; ``<default_root_dir>/checkpoints/`` without a
    logger; a ``dirpath`` given to it) and of the run's ``OnExceptionCheckpoint``.

    Lightning looks in the new run's own folder only, which is empty, and trains from step 0 with a warning.
    """
    # TensorBoard's and CSV's runs alike (Lightning puts the checkpoints in the first logger's run folder)
    # (folder, its subfolders' pattern): a folder's own name may hold glob's special characters, "[" say
    places = [(Path(logger.root_dir), "*/checkpoints") for logger in trainer.loggers
              if isinstance(getattr(logger, "root_dir", None), (str, os.PathLike))]
    if not trainer.loggers:
        places.append((Path(trainer.default_root_dir), "checkpoints"))
    places += [(Path(cb.dirpath), "") for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    found = [Path(name) for folder, below in places
             for name in glob.glob(os.path.join(glob.escape(str(folder)), below, "*.ckpt")) if Path(name).is_file()]
    # and those Lightning's OnExceptionCheckpoint writes where it is told (a crash's or Ctrl-C's), as Lightning's "last"
    found += [Path(cb.ckpt_path) for cb in trainer.callbacks
              if isinstance(cb, OnExceptionCheckpoint) and Path(cb.ckpt_path).is_file()]
    if not found:
        searched = ", ".join(f"{os.path.join(folder, below, '')}" for folder, below in places) or "(no folder)"
        _fail(FileNotFoundError(f"--ckpt_path=last: no checkpoint (*.ckpt) in {searched}: name one, or train first"))
    newest = max(found, key=lambda path: path.stat().st_mtime)
    if trainer.is_global_zero:
        print(f"hcl: --ckpt_path=last is {newest}", file=sys.stderr)
    return str(newest)


def _continue_logged_run(trainer: pl.Trainer, ckpt_path: str | None, recorded: list[dict[str, Any]]) -> None:
    """Log a resumed run into the TensorBoard version directories its checkpoint's run wrote to.

    Lightning's default is a new ``version_<k+1>`` on every run, which splits one training run over two TensorBoard
    runs that overlap between the checkpoint and the crash. Each TensorBoard logger without an explicit version
    continues the version its root folder (else its name, when one recorded logger has it: a log folder moved) had in
    the checkpoint's run (``recorded``: :class:`LoggedRuns`); for a checkpoint at
    ``<save_dir>/<name>/<version>/checkpoints/x.ckpt`` the logger of that ``save_dir`` and ``name`` continues
    ``<version>`` first.
    """
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    checkpoint = Path(ckpt_path).resolve()
    roots = {entry.get("root"): entry.get("version") for entry in recorded}
    names = [entry.get("name") for entry in recorded]
    if checkpoint.parent.name == "checkpoints":  # its own folder's logger, where it is now
        version_dir = checkpoint.parent.parent
        match = re.fullmatch(r"version_(\d+)", version_dir.name)
        roots[str(version_dir.parent)] = int(match.group(1)) if match else version_dir.name
    for logger in trainer.loggers:
        # (not a CSV logger: Lightning's would delete the earlier metrics.csv of that version; it starts a new one)
        if not isinstance(logger, TensorBoardLogger) or getattr(logger, "_version", 0) is not None:
            continue
        version = roots.get(str(Path(logger.root_dir).resolve()))
        if version is None and names.count(logger.name) == 1:
            version = recorded[names.index(logger.name)].get("version")
        if version is None:
            continue
        logger._version = version
        if trainer.is_global_zero:
            print(f"hcl: resuming the run logged in {Path(logger.root_dir) / _version_name(version)}")


def _version_name(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _print_log_location(trainer: pl.Trainer) -> None:
    if not trainer.is_global_zero:
        return
    printed = set()
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and Path(log_dir).resolve() not in printed:  # loggers sharing a save_dir share a run folder
            printed.add(Path(log_dir).resolve())
            print(f"hcl: logs written to {Path(log_dir).resolve()}")
            if isinstance(logger, TensorBoardLogger):  # a CSV folder holds nothing TensorBoard reads
                print(f"hcl: open them with: tensorboard --logdir {Path(logger.root_dir).resolve()}")


if __name__ == "__main__":
    main()
