"""`python -m hcl.fit`: the embedded default, configs, overrides and printing the config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_config_overrides_and_default_root_dir(tmp_path):
    cli = main(["--config", str(DEFAULT_CONFIG), "--model.hidden=7", "--trainer.max_steps=3",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.model.hidden_layer.out_features == 7
    assert cli.model.hidden_layer.in_features == 10  # linked from the data module
    assert cli.trainer.global_step == 3
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/objective"]] == [0, 1, 2]


def test_print_config_prints_the_resolved_yaml(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEFAULT_CONFIG), "--model.hidden=13", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["hidden"] == 13
    assert printed["data"]["class_path"] == "hcl.datamodules.SyntheticRegression"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["log_every_n_steps"] == 1
    # Configs never hard-code a log folder: logs follow --trainer.default_root_dir.
    assert printed["trainer"].get("default_root_dir") in (None, ".")


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEFAULT_CONFIG), "--model.hiden=3"])
    assert exit_info.value.code != 0
    assert "hiden" in capsys.readouterr().err
