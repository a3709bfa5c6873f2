"""`python -m hcl.fit`: the embedded default, configs, overrides and printing the config."""

from __future__ import annotations

import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _events import read_scalars

from hcl.fit import DEFAULT_CONFIG, main

pytestmark = pytest.mark.slow  # every test builds the LightningCLI parser, and one trains in a new process

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_default_run_from_another_folder_writes_tensorboard_logs(tmp_path):
    """No arguments, from an unrelated folder: the embedded default trains and says where its logs are."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "hcl.fit"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorboard --logdir" in result.stdout
    scalars = read_scalars(tmp_path / "lightning_logs")
    steps = [s for s, _ in scalars["train/objective"]]
    assert steps == list(range(len(steps))) and len(steps) == yaml.safe_load(DEFAULT_CONFIG.read_text())[
        "trainer"]["max_steps"]
    assert scalars["train/objective"][-1][1] < scalars["train/objective"][0][1]
    assert "patterns/unique" in scalars and "convex/optimum" in scalars


def test_config_overrides_and_default_root_dir(tmp_path, capsys):
    cli = main(["--config", str(DEFAULT_CONFIG), "--model.hidden=7", "--trainer.max_steps=3",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.model.hidden_layer.out_features == 7
    assert cli.model.hidden_layer.in_features == 10  # linked from the data module
    assert cli.trainer.global_step == 3
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/objective"]] == [0, 1, 2]
    assert "hp_metric" not in scalars  # Lightning's placeholder
    capsys.readouterr()
    csv = tmp_path / "csv"
    main(["--config", str(DEFAULT_CONFIG), "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={csv}"])
    printed = capsys.readouterr().out
    assert f"logs written to {csv.resolve()}" in printed and "tensorboard" not in printed  # no TensorBoard files there


def test_print_config_prints_the_resolved_yaml(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEFAULT_CONFIG), "--model.hidden=13", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "hcl.TwoLayerReLU"
    assert printed["model"]["init_args"]["hidden"] == 13
    assert printed["data"]["class_path"] == "hcl.datamodules.SyntheticRegression"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["log_every_n_steps"] == 1
    # Configs never hard-code a log folder: logs follow --trainer.default_root_dir.
    assert printed["trainer"].get("default_root_dir") in (None, ".")


@pytest.mark.parametrize("source", ["command line", "config"])
def test_another_model_class_takes_its_own_defaults_not_the_default_models(source, tmp_path, capsys):
    from hcl import ConvexReLU

    if source == "command line":
        args = ["--data=hcl.datamodules.SyntheticRegression", "--model=hcl.ConvexReLU", "--model.num_gates=7"]
    else:
        config = tmp_path / "convex.yaml"
        config.write_text("model:\n  class_path: hcl.ConvexReLU\n  init_args: {num_gates: 7}\n"
                          "data: hcl.datamodules.SyntheticRegression\n")
        args = ["--config", str(config)]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert printed["class_path"] == "hcl.ConvexReLU" and printed["init_args"]["num_gates"] == 7
    own = {name: parameter.default for name, parameter in inspect.signature(ConvexReLU).parameters.items()}
    for name in ("bias", "weight_decay", "optimizer", "lr", "momentum"):  # TwoLayerReLU's differ
        assert printed["init_args"][name] == own[name], name


def test_one_callback_not_in_a_list_runs_and_a_key_beside_class_path_is_named(tmp_path, capsys):
    # one callback, as Trainer takes it, stopped the run with "'PatternMonitor' object is not iterable"
    cli = main(["--trainer.callbacks=hcl.callbacks.PatternMonitor", "--trainer.max_steps=2",
                f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    config = tmp_path / "misplaced.yaml"  # the error named only the Union of classes it failed
    config.write_text("model:\n  class_path: hcl.TwoLayerReLU\n  init_args: {hidden: 3}\n  max_steps: 10\n"
                      "data: hcl.datamodules.SyntheticRegression\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert "model: 'max_steps' given beside class_path and init_args" in capsys.readouterr().err


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEFAULT_CONFIG), "--model.hiden=3"])
    assert exit_info.value.code != 0
    assert "hiden" in capsys.readouterr().err


def test_options_without_a_config_override_the_embedded_default(tmp_path, capsys):
    """`python -m hcl.fit --trainer.max_steps=3`: the default experiment with three steps, not 'data is required'."""
    cli = main(["--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false"])
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert cli.trainer.global_step == 3
    assert type(cli.datamodule).__name__ == "SyntheticRegression"
    assert cli.model.hidden_layer.out_features == default["model"]["hidden"]
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__module__.startswith("hcl.callbacks")] == [
        "PatternMonitor", "ConvexGapMonitor"]  # (and the CLI's own LoggedRuns)
    assert "embedded default" in capsys.readouterr().err


def test_print_config_alone_prints_the_config_that_runs_without_lightnings_args_warning(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="default")
    result = subprocess.run([sys.executable, "-m", "hcl.fit", "--print_config", "--model.hidden=9"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert printed["data"]["class_path"] == default["data"]["class_path"]
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        c["class_path"] for c in default["trainer"]["callbacks"]]
    assert printed["model"]["init_args"]["hidden"] == 9
    assert printed["trainer"]["max_steps"] == default["trainer"]["max_steps"]
    assert "args parameter" not in result.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_help_names_the_command_hcls_data_modules_and_the_links(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m hcl.fit ")
    for name in ("hcl.datamodules.SyntheticRegression", "hcl.datamodules.MNIST", "hcl.datamodules.CIFAR10"):
        assert name in text
    assert "functools.partial" not in text
    assert "data_in_features(data) --> model.init_args.in_features" in text


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.hidden=-3"], "TwoLayerReLU: hidden must be a positive integer, got -3"),
    (["--data.kind=gausian_linear"], "SyntheticRegression: unknown kind 'gausian_linear'"),
    (["--trainer.callbacks+=hcl.callbacks.PatternMonitor", "--trainer.callbacks.every_n_step=3"],
     "hcl.callbacks.PatternMonitor: Option 'every_n_step' is not accepted; did you mean 'every_n_steps'?"),
    (["--data=hcl.datamodules.MNIST", "--data.root=missing_root"], "MNIST not found under root"),
    (["--model.reduction=max"],
     "hcl.TwoLayerReLU: reduction: Expected a typing.Literal['sum', 'mean']. Got value: max"),
    (["--model=hcl.ConvexReLU"], "PatternMonitor watches a network's Linear → ReLU → Linear stack, but "
     "hcl.ConvexReLU trains the convex program itself"),
    (["--data=hcl.datamodules.SyntheticRegression", "--model=hcl.ConvexReLU", "--lr_scheduler=torch.optim."
      "lr_scheduler.StepLR", "--lr_scheduler.step_size=2"], "hcl.ConvexReLU takes its step from --model.optimizer"),
    (["validate"], "python -m hcl.fit has no subcommands ('validate')"),
    (["--trainer.callbacks=[{class_path:hcl.callbacks.PatternMonitor}]"],  # YAML without the space after ':'
     "Option 'class_path:hcl.callbacks.PatternMonitor' is not accepted (Callback takes no options)"),
    (["--trainer.max_epochs=-5"], "error: Trainer: `max_epochs` must be"),
    # linked from the data module, which silently replaced it
    (["--model.in_features=100"], "--model.in_features is taken from the data module"),
    # an option before its class: it read "lightning.LightningDataModule: Option 'root' is not accepted (accepted: )"
    (["--data.root=../data", "--data=hcl.datamodules.MNIST"],
     "--data.root is given before any data class is chosen: put --data=<class> or --config first"),
    # a prefix of a trainer option ran as the option (--trainer.max_step=20 trained 20 steps)
    (["--trainer.max_step=20"], "unrecognized arguments: --trainer.max_step=20"),
], ids=["hidden", "data-kind", "callback-option", "mnist-root", "literal-value", "convex-model-with-monitors",
        "convex-model-scheduler", "subcommand", "no-options", "private-class", "linked-size", "option-before-class",
        "abbreviation"])
def test_a_wrong_value_is_one_line_on_stderr_and_leaves_no_empty_run(args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("python -m hcl.fit: error: "), errors
    assert expected in errors[0]
    assert not (tmp_path / "lightning_logs").exists()  # no empty version_0


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_before_training(tmp_path, capsys):
    from hcl import TwoLayerReLU

    garbage = tmp_path / "notes.ckpt"
    garbage.write_text("not a checkpoint")
    other_class = tmp_path / "convex.ckpt"
    torch.save({"state_dict": {"U": torch.zeros(2, 3, 1), "gates": torch.zeros(3, 2)}}, other_class)
    other_size = tmp_path / "small.ckpt"
    torch.save({"state_dict": TwoLayerReLU(in_features=10, hidden=7).state_dict()}, other_size)
    for path, expected in ((garbage, "is not a checkpoint torch can read"),
                           (other_class, "the checkpoint is not of a TwoLayerReLU (missing ['hidden_layer.weight'"),
                           (other_size, "hidden_layer.weight has shape (7, 10) in the checkpoint but (20, 10)")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--trainer.max_steps=2", f"--ckpt_path={path}", f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.enable_progress_bar=false"])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "error: --ckpt_path: " in errors[0] and expected in errors[0], errors
    assert not (tmp_path / "lightning_logs").exists()


def test_ckpt_path_last_without_any_checkpoint_is_one_line(tmp_path, capsys):
    # Lightning looked in the new run's empty folder only, and trained from step 0 after a misleading hint
    with pytest.raises(SystemExit) as exit_info:
        main(["--trainer.max_steps=2", "--ckpt_path=last", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--ckpt_path=last: no checkpoint (*.ckpt) in" in errors[0], errors


def test_hcl_traceback_shows_the_original_error(monkeypatch):
    monkeypatch.setenv("HCL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        main(["--model.hidden=-3", "--trainer.max_steps=2"])


def _readme_commands() -> list[list[str]]:
    """The arguments of every `python -m hcl.fit` command in README.md, in code blocks and inline."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    lines = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`(python -m hcl\.fit(?: [^`]*)?)`", text)
    commands = []
    for line in "\n".join(lines).splitlines():
        if "python -m hcl.fit" in line:
            commands.append(shlex.split(line.split("python -m hcl.fit", 1)[1]))
    return commands


def test_every_cli_example_of_the_readme_runs_as_written(tmp_path, monkeypatch):
    commands = _readme_commands()
    assert len(commands) >= 4 and [] in commands and ["--trainer.max_steps=20"] in commands
    monkeypatch.chdir(REPO)  # the MNIST example reads ../shared/data beside the checkout
    for args in commands:
        if any("../shared/data" in a for a in args) and not (REPO.parent / "shared" / "data" / "MNIST").is_dir():
            continue
        extra = ["--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.enable_progress_bar=false"]
        if any("mnist" in a.lower() for a in args):
            extra.append("--data.subset=200")
        if "configs/mnist.yaml" in args:
            extra.append("--trainer.callbacks.solve_time_limit=2")  # its last callback: the asynchronous monitor
        try:
            cli = main([*args, *extra])
        except SystemExit as stop:
            assert stop.code in (0, None) and "--print_config" in args, args
        else:
            assert cli.trainer.global_step == 2, args


def test_ckpt_path_last_includes_the_exception_checkpoint(tmp_path):
    """An OnExceptionCheckpoint writes where it is told, outside the logger's runs: --ckpt_path=last said there was no
    checkpoint, where Lightning's own "last" takes it."""
    import time
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from hcl.fit import _last_checkpoint

    logger = TensorBoardLogger(str(tmp_path / "logs"))
    older = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"")
    time.sleep(0.01)
    on_exception = OnExceptionCheckpoint(dirpath=str(tmp_path / "crash"))
    Path(on_exception.ckpt_path).parent.mkdir()
    Path(on_exception.ckpt_path).write_bytes(b"")
    trainer = SimpleNamespace(loggers=[logger], callbacks=[on_exception], checkpoint_callbacks=[], is_global_zero=True)
    assert _last_checkpoint(trainer) == on_exception.ckpt_path


@pytest.mark.parametrize("logger", ["lightning.pytorch.loggers.CSVLogger", "false"])
def test_ckpt_path_last_finds_the_checkpoints_of_other_loggers(tmp_path, logger, capsys):
    """A CSV logger's runs hold their checkpoints as TensorBoard's do, and without a logger they are in
    <default_root_dir>/checkpoints: --ckpt_path=last said there were none. (A folder named like a glob pattern.)"""
    tmp_path = tmp_path / "runs[1]"
    args = [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger={logger}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if logger != "false":
        args.append(f"--trainer.logger.save_dir={tmp_path}")
    main([*args, "--trainer.max_steps=2"])
    capsys.readouterr()
    cli = main([*args, "--trainer.max_steps=3", "--ckpt_path=last"])
    assert "--ckpt_path=last is" in capsys.readouterr().err
    assert cli.trainer.global_step == 3 and cli.trainer.ckpt_path is not None  # resumed at step 2, one step more


def test_a_user_error_a_spawned_process_raised_is_taken_from_its_traceback():
    """ddp_spawn hands a child's error back as the text of its traceback: a setup refusal came out as a raw
    ProcessRaisedException (exit 1, an empty run left) instead of the one-line message."""
    from torch.multiprocessing.spawn import ProcessRaisedException

    import hcl.callbacks
    from hcl.cli_errors import spawned_user_error

    base = Path(hcl.callbacks.__file__).parent / "base.py"
    trace = ('\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n'
             f'  File "{base}", line 1, in setup\n    raise ValueError(\nValueError: PatternMonitor watches a network: '
             'leave it out\n')
    error = spawned_user_error(ProcessRaisedException(trace, 0, 123))
    assert type(error) is ValueError and str(error) == "PatternMonitor watches a network: leave it out"
    other = trace.replace("ValueError: PatternMonitor", "ZeroDivisionError: division")
    assert spawned_user_error(ProcessRaisedException(other, 0, 123)) is None  # a bug keeps its traceback
    assert spawned_user_error(ValueError("not spawned")) is None
    mine = trace.replace(str(base), "/home/me/my_model.py")  # raised in a user's own code: a bug, with its traceback
    assert spawned_user_error(ProcessRaisedException(mine, 0, 123)) is None


def test_the_hcl_fit_command_exits_with_0_after_a_run_and_names_itself(tmp_path, monkeypatch, capsys):
    """The console script exits with what its function returns: main's CLI object made every good run exit 1."""
    from importlib.metadata import entry_points

    import hcl.fit

    (command,) = entry_points(group="console_scripts", name="hcl-fit")
    monkeypatch.setattr(hcl.fit, "PROG", hcl.fit.PROG)  # restored after the test
    args = ["hcl-fit", "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    monkeypatch.setattr(sys, "argv", args)
    assert command.load()() is None  # sys.exit(None): status 0
    monkeypatch.setattr(sys, "argv", [*args, "--trainer.max_steps=-3"])
    with pytest.raises(SystemExit) as exit_info:
        command.load()()
    assert exit_info.value.code == 2 and "\nhcl-fit: error: " in capsys.readouterr().err


class BuggyStep(__import__("hcl").TwoLayerReLU):
    """A user's model with a bug in its training step (read by ``--model=test_fit.BuggyStep``)."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            len(self.hparams.lr)  # TypeError: a float has no len()
        return super().training_step(batch, batch_idx)


def test_a_bug_in_a_users_code_during_training_keeps_its_traceback_and_a_refusal_stays_one_line(tmp_path, capsys):
    """A TypeError raised in a user's training_step was reported as a one-line usage error (exit 2), naming no file."""
    common = [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.max_steps=3"]
    with pytest.raises(TypeError, match="has no len") as raised:
        main(["--model=test_fit.BuggyStep", *common])
    assert raised.traceback[-1].name == "training_step"  # the user's line, as Python shows it
    with pytest.raises(SystemExit) as refused:  # hcl's own refusal during fit: still its one line
        main(["--model=hcl.ConvexReLU", *common])  # the default config's callbacks watch a network
    assert refused.value.code == 2 and "PatternMonitor watches a network's" in capsys.readouterr().err


def test_every_spelling_of_a_config_or_a_data_module_replaces_the_embedded_default():
    from hcl.fit import _names_config_or_data

    for args in (["--data=hcl.datamodules.MNIST"], ["--data", "hcl.datamodules.MNIST"],
                 ["--data.class_path=hcl.datamodules.SyntheticRegression"], ["--data.class_path", "x"],
                 ["-c", "run.yaml"], ["-crun.yaml"], ["--config=run.yaml"], ["--model.hidden=3", "--config", "r"]):
        assert _names_config_or_data(args), args
    for args in ([], ["--model.hidden=3"], ["--data.init_args.n=30"], ["--trainer.max_steps=5"]):
        assert not _names_config_or_data(args), args
