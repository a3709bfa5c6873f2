"""The dashboards in a real TensorBoard server, read through its HTTP data API, and drawn by headless Chromium.

A short run of the seed's single-neuron experiment with every hcl monitor is logged to a temporary folder;
``tensorboard --logdir`` serves it on a free loopback port. The tests read the scalars, the custom-scalars layout
and the hyper-parameters back over HTTP, compare them with the event files, and take a screenshot of the
custom-scalars page. The screenshot test is skipped only where no ``chromium`` binary is installed (``.ci/run``
installs Debian's package when it is missing).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from _events import read_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from hcl import TwoLayerReLU, dashboard
from hcl.callbacks.activation_points import ActivationPointPlot
from hcl.callbacks.convex_gap import ConvexGapMonitor
from hcl.callbacks.global_optimum import GlobalOptimumMonitor
from hcl.callbacks.pattern_monitor import PatternMonitor
from hcl.datamodules import SyntheticRegression

pytestmark = pytest.mark.slow  # a training run, a TensorBoard server and a browser

RUN = "seed_b/version_0"
HEADER_ORANGE = (245, 124, 0)  # TensorBoard's header bar
RUN_COLOUR = (255, 112, 67)  # TensorBoard's colour for the first run
# TensorBoard's run colours after the first (its grey left out: the axes are grey too)
RUN_PALETTE = [(0, 119, 187), (204, 51, 17), (51, 187, 238), (238, 51, 119), (0, 153, 136)]
STEPS = 30
CHARTS = {
    "objective vs convex optimum": {"train/objective", "convex/nonconvex_objective", "convex/optimum",
                                    "convex/upper_bound", "convex/lower_bound", "convex/global_optimum",
                                    "convex/global_upper_bound", "convex/global_lower_bound"},
    "global gap": {"convex/global_gap", "convex/global_max_gap"},
    "convex gap": {"convex/gap", "convex/max_gap"},
    "unique activation patterns": {"patterns/unique"},
    "pattern changes": {"patterns/changed", "patterns/new"},
}
# A chart of several series draws one run per series, under its chart tag (hcl.dashboard): one colour each.
SERIES_RUNS = {f"{RUN}/series/{tag}": (title, tag) for title, tags in CHARTS.items() if len(tags) > 1 for tag in tags}


def _tensorboard_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("tensorboard")
    return str(beside_python) if beside_python.exists() else shutil.which("tensorboard")


def _chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    # TensorBoard refuses POSTs without its cross-site-request header; the body must be typed as JSON.
    headers = {"X-XSRF-Protected": "1", "Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dashboards")
    data = SyntheticRegression(kind="points", x=[-0.2, 1.0], y=[0.5, 1.0], append_ones=True, dtype="float64")
    model = TwoLayerReLU(in_features=2, hidden=1, bias=False, lr=0.05, hidden_weight=[[0.3, -0.15]],
                         output_weight=[[1.0]])
    callbacks = [PatternMonitor(), ConvexGapMonitor(formulation="neurons", solver="clarabel"),
                 GlobalOptimumMonitor(), ActivationPointPlot(every_n_steps=10, figsize=(4, 3), dpi=50)]
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, precision="64-true", log_every_n_steps=1,
        logger=TensorBoardLogger(str(root), name="seed_b"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
    )
    trainer.fit(model, datamodule=data)
    return root


@pytest.fixture(scope="module")
def tensorboard(logdir):
    """The base URL of a TensorBoard server on ``logdir``, once it serves every step of the run."""
    binary = _tensorboard_binary()
    if binary is None:
        pytest.skip("no tensorboard executable beside the Python interpreter or on PATH")
    port = _free_port()
    log = open(logdir / "tensorboard.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(
        [binary, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1", "--load_fast=false",
         "--reload_interval=1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited with {server.returncode}: "
                            f"{(logdir / 'tensorboard.log').read_text(errors='replace')[-2000:]}")
            try:
                points = _get_json(f"{base}/data/plugin/scalars/scalars?run={RUN}&tag=convex/global_gap")
                if len(points) == STEPS and set(_get_json(f"{base}/data/runs")) == {RUN, *SERIES_RUNS}:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not serve the run within 90 s")
            time.sleep(0.25)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        log.close()


def test_tensorboard_serves_the_logged_scalars(tensorboard, logdir):
    runs = _get_json(f"{tensorboard}/data/runs")
    assert sorted(runs) == sorted([RUN, *SERIES_RUNS])
    tags = _get_json(f"{tensorboard}/data/plugin/scalars/tags")[RUN]
    expected = set().union(*CHARTS.values())
    assert expected <= set(tags)
    on_disk = read_scalars(logdir)
    for tag in sorted(expected):
        served = _get_json(f"{tensorboard}/data/plugin/scalars/scalars?run={RUN}&tag={tag}")
        assert [(step, value) for _, step, value in served] == [(s, pytest.approx(v, rel=1e-6, abs=1e-30))
                                                                for s, v in on_disk[tag]], tag
    objective = {step: value for _, step, value in
                 _get_json(f"{tensorboard}/data/plugin/scalars/scalars?run={RUN}&tag=train/objective")}
    optimum = _get_json(f"{tensorboard}/data/plugin/scalars/scalars?run={RUN}&tag=convex/global_optimum")
    assert len(objective) == len(optimum) == STEPS
    assert all(objective[step] >= value - 1e-7 for _, step, value in optimum)  # L ≥ p*_all as served
    lower = _get_json(f"{tensorboard}/data/plugin/scalars/scalars?run={RUN}&tag=convex/global_lower_bound")
    assert all(objective[step] >= value for _, step, value in lower)  # certified: no tolerance


def test_tensorboard_serves_one_merged_custom_scalars_layout(tensorboard):
    layout = _get_json(f"{tensorboard}/data/plugin/custom_scalars/layout")
    categories = {category["title"]: category for category in layout["category"]}
    assert set(categories) == {"hcl"}
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in categories["hcl"]["chart"]}
    assert set(charts) == set(CHARTS)
    for title, tags in CHARTS.items():
        # A chart of one series selects its tag in the run; a chart of several its chart tag in the series runs.
        expected = [f"^{tag}$" for tag in tags] if len(tags) == 1 else [f"^{dashboard.chart_tag(title)}$"]
        assert charts[title] == expected, title
    for title, tags in CHARTS.items():
        regex = urllib.parse.quote("|".join(charts[title]))
        # The custom-scalars plugin resolves each chart's regex against every run: one line per run.
        drawn = {}
        for run in [RUN, *SERIES_RUNS]:
            served = _get_json(f"{tensorboard}/data/plugin/custom_scalars/scalars?run={run}&tag={regex}")
            assert served["regex_valid"]
            drawn.update({(run, tag): events for tag, events in served["tag_to_events"].items()})
        if len(tags) == 1:
            assert set(drawn) == {(RUN, tag) for tag in tags}
        else:
            assert set(drawn) == {(run, dashboard.chart_tag(title)) for run, (chart, _) in SERIES_RUNS.items()
                                  if chart == title}
            assert len(drawn) == len(tags)
        for (run, _), events in drawn.items():
            assert len(events) == STEPS
            tag = SERIES_RUNS[run][1] if run in SERIES_RUNS else next(iter(tags))
            # each series run draws the values of the run's own tag, step for step
            own = _get_json(f"{tensorboard}/data/plugin/scalars/scalars?run={RUN}&tag={tag}")
            assert [(e[1], e[2]) for e in events] == [(step, pytest.approx(v, rel=1e-6, abs=1e-30))
                                                      for _, step, v in own], (run, tag)


def test_tensorboard_serves_the_hyperparameters_and_the_pictures(tensorboard):
    experiment = _get_json(f"{tensorboard}/data/plugin/hparams/experiment", body={})
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"lr", "hidden", "weight_decay", "init_scale", "reduction", "optimizer"} <= names
    images = _get_json(f"{tensorboard}/data/plugin/images/images?run={RUN}&tag=activation_points")
    assert [image["step"] for image in images] == [0, 10, 20, STEPS]


def test_headless_chromium_draws_the_custom_scalars_page(tensorboard, tmp_path):
    chromium = _chromium_binary()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    png = tmp_path / "custom_scalars.png"
    screenshot(chromium, f"{tensorboard}/#custom_scalars&_smoothingWeight=0", png, tmp_path / "profile")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (1000, 1400, 3)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # a drawn page: text, charts and their lines, not a blank or error screen
    # TensorBoard's orange header bar is there (the app loaded), and the charts right of the sidebar hold lines
    # in the run's colour (the data was plotted, not just empty axes) and in the colours of the series runs.
    pixels = image.astype(int)

    def near(colour, tolerance=40):
        return np.abs(pixels - np.array(colour)).sum(axis=-1) < tolerance

    assert near(HEADER_ORANGE)[:60].mean() > 0.5
    assert near(RUN_COLOUR)[120:, 380:].sum() > 300
    assert sum(near(colour)[120:, 380:].sum() > 300 for colour in RUN_PALETTE) >= 4


def screenshot(chromium: str, url: str, png: Path, profile: Path, budget_ms: int = 20000) -> None:
    """Take a ``1400 × 1000`` screenshot of ``url`` with headless Chromium (isolated profile, no network extras)."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,1000",
        f"--virtual-time-budget={budget_ms}", url,
    ]
    result = subprocess.run(command, capture_output=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]!r}"
