"""Run the seed's experiments (b), (c), (d) from their configs and print the numbers docs/experiments.md records.

    python benchmarks/reproduce_seed.py                       # all four runs, logs under logs/reproduce/
    python benchmarks/reproduce_seed.py --only b d_small      # some of them
    python benchmarks/reproduce_seed.py --screenshots docs/img  # also a custom-scalars screenshot per run

Each run is ``python -m hcl.fit --config configs/<experiment>.yaml --trainer.default_root_dir <root>/<name>``
(in-process); the numbers come from the run's TensorBoard event file and its callbacks. Screenshots start
``tensorboard`` on the run's folder and take a headless-Chromium picture of the *Custom Scalars* page (smoothing
off, outliers shown, log y-axis on the loss charts, set through the DevTools protocol); the activation-point GIF
and its last frame are copied beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator

from hcl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "b": "configs/seed_b_single_neuron.yaml",
    "c": "configs/seed_c_100x10.yaml",
    "d_small": "configs/seed_d_small_init.yaml",
    "d_large": "configs/seed_d_large_init.yaml",
}


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def at(s: dict[str, dict[int, float]], tag: str, step: int | None = None) -> str:
    """The value of ``tag`` at ``step`` (default: its last), or why there is none: an optimum is logged only when the
    solver certified it (docs/dashboards.md)."""
    values = s.get(tag, {})
    step = max(values, default=None) if step is None else step
    if step not in values:  # an uncertified solve logs no optimum at its step
        return "not logged (not certified)"
    return f"{values[step]:.4g}"


def global_bracket(s: dict[str, dict[int, float]]) -> str:
    return (f"global optimum p*_all = {at(s, 'convex/global_optimum', 0)} in the certified bracket "
            f"[{at(s, 'convex/global_lower_bound', 0)}, {at(s, 'convex/global_upper_bound', 0)}] "
            f"({s['convex/global_patterns'][0]:.0f} patterns); final gap {at(s, 'convex/global_gap')}, at most "
            f"{at(s, 'convex/global_max_gap')}")


def first_step(values: dict[int, float], condition) -> int | None:
    return next((step for step in sorted(values) if condition(values[step])), None)


def callback(cli, name: str):
    return next((cb for cb in cli.trainer.callbacks if type(cb).__name__ == name), None)


def report_b(cli, s) -> None:
    loss = s["train/objective"]
    print("  loss at the seed's printed steps:", {k: round(loss[k], 4) for k in (0, 35, 105, 210, 399) if k in loss})
    changed = s["patterns/changed"]
    print("  x1 activated (pattern change) at step:", first_step(changed, lambda v: v > 0))
    print("  first step with loss < 5e-5:", first_step(loss, lambda v: v < 5e-5))
    print(f"  final logged loss: {loss[max(loss)]:.3g} (step {max(loss)})")
    print(f"  convex optimum of the current pattern: {at(s, 'convex/optimum', 0)} at step 0, "
          f"{at(s, 'convex/optimum')} at the end (upper bound {at(s, 'convex/upper_bound')}, lower bound "
          f"{at(s, 'convex/lower_bound')})")
    print("  " + global_bracket(s))
    w = cli.model.hidden_layer.weight.detach()[0]
    alpha = float(cli.model.output_layer.weight.detach()[0, 0])
    print(f"  final neuron: w = ({w[0]:.4f}, {w[1]:.4f}), alpha = {alpha:.4f}, activation point "
          f"{-w[1] / w[0]:.4f}; fit y = {w[0] * alpha:.4f} x + {w[1] * alpha:.4f}")


def report_c(cli, s) -> None:
    unique = s["patterns/unique"]
    print("  unique patterns:", {k: int(unique[k]) for k in (0, 50, 100, 150, 200, 250, 300, max(unique))
                                 if k in unique})
    loss = s["train/objective"]
    # the step-0 value GD has to beat: the certified optimum, else the best feasible value (an upper bound on it)
    optimum0 = s.get("convex/optimum", s["convex/upper_bound"]).get(0, s["convex/upper_bound"][0])
    print(f"  loss at step 0: {loss[0]:.4f}; per-neuron convex optimum at step 0: {at(s, 'convex/optimum', 0)}; "
          f"patterns formulation at step 0: {at(s, 'convex_patterns/optimum', 0)}")
    print("  loss leaves its plateau (< 0.95 x step 0) at step:", first_step(loss, lambda v: v < 0.95 * loss[0]))
    print("  GD beats the step-0 convex optimum at step:", first_step(loss, lambda v: v < optimum0))
    optima = s.get("convex/optimum", {})
    print(f"  final loss {loss[max(loss)]:.3g} (step {max(loss)}); per-neuron convex optimum "
          f"min {min(optima.values(), default=float('nan')):.3g}, final {at(s, 'convex/optimum')} "
          f"(certified at {len(optima)} of {len(s['convex/status'])} solves)")


def report_d(cli, s) -> None:
    loss = s["train/objective"]
    print(f"  loss at step 0: {loss[0]:.4f}")
    for threshold in (0.7, 1e-2, 1e-4, 1e-6):
        print(f"  first step with loss < {threshold:g}:", first_step(loss, lambda v, t=threshold: v < t))
    print(f"  final loss {loss[max(loss)]:.3g} (step {max(loss)})")
    print("  " + global_bracket(s))
    unique = s["patterns/unique"]
    print("  unique patterns:", {k: int(unique[k]) for k in sorted(unique)[:: max(1, len(unique) // 6)]},
          "final", int(unique[max(unique)]))
    print("  neurons that changed pattern, summed over steps:", int(sum(s["patterns/changed"].values())))
    plot = callback(cli, "ActivationPointPlot")
    first, last = plot.frames[0], plot.frames[-1]
    moved = np.abs(last.position - first.position)
    print(f"  activation points: median move {np.nanmedian(moved):.3g} over the run")
    # The steepest neurons at the end of the plateau (last picture with the loss above 90% of its start) and at
    # the end of training.
    plateau = [frame for frame in plot.frames if frame.objective > 0.9 * first.objective]
    for label, frame in (("end of the plateau", plateau[-1] if len(plateau) > 1 else None), ("end", last)):
        if frame is None:
            continue
        strong = frame.height >= np.quantile(frame.height, 0.95)
        share = strong & frame.right & frame.positive
        points = frame.position[strong]
        print(f"  {label} (step {frame.step}): of the 5% steepest neurons {share.sum() / strong.sum():.0%} activate "
              f"to the right with alpha > 0; their activation points: median {np.median(points):.3f}, quartiles "
              f"{np.quantile(points, 0.25):.3f} .. {np.quantile(points, 0.75):.3f}")
    grid = plot._grid.cpu().numpy()
    data_x = plot._X[:, plot._layout.x_column].cpu().numpy()
    inside = (grid >= data_x.min()) & (grid <= data_x.max())
    line = np.polyfit(data_x, plot._Y.cpu().numpy(), 1)
    print(f"  final output vs the data's least-squares line y = {line[0]:.3f} x + {line[1]:.3f}: largest gap "
          f"between the points {np.abs(last.curve[inside] - np.polyval(line, grid[inside])).max():.3g}")
    fraction = np.mean(last.height / max(last.height.max(), 1e-300) > 0.1)
    print(f"  neurons with a slope above 10% of the steepest: {fraction:.1%}")


REPORTS = {"b": report_b, "c": report_c, "d_small": report_d, "d_large": report_d}
# Charts drawn with a log y-axis in the screenshots (regex on the chart title), as the seed's loss plots are.
LOG_CHARTS = {"b": "objective|gap", "c": "objective|gap", "d_small": "objective|gap", "d_large": "objective|gap"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Finds the custom-scalars chart cards (inside shadow roots) and switches the matching ones to a log y-axis.
_LOG_SCALE_JS = r"""
(() => {
  const pattern = new RegExp(%s);
  const cards = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName.toLowerCase() === 'tf-custom-scalar-multi-line-chart-card') cards.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  let toggled = 0;
  for (const card of cards) {
    const button = (card.shadowRoot || card).querySelector('paper-icon-button[title="Toggle y-axis log scale"]');
    if (button && pattern.test(card.title || '')) { button.click(); toggled += 1; }
  }
  return toggled;
})()
"""


async def _devtools_screenshot(chromium: str, url: str, png: Path, log_charts: str, profile: Path) -> None:
    """Screenshot through the DevTools protocol: outliers shown, log y-axis on the charts matching ``log_charts``."""
    import aiohttp

    port = _free_port()
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                        targets = await response.json()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.25)
            socket_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(socket_url, max_msg_size=0) as ws:
                counter = 0

                async def call(method: str, **params):
                    nonlocal counter
                    counter += 1
                    await ws.send_json({"id": counter, "method": method, "params": params})
                    async for message in ws:
                        data = json.loads(message.data)
                        if data.get("id") == counter:
                            return data.get("result", {})
                    raise RuntimeError("the browser closed the DevTools connection")

                await call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1,
                           mobile=False)
                await call("Page.navigate", url=url)
                await asyncio.sleep(5)
                # TensorBoard keeps "ignore outliers" in localStorage only: set it, then reload.
                await call("Runtime.evaluate", expression="localStorage.setItem('_ignoreYOutliers', 'false')")
                await call("Page.reload")
                await asyncio.sleep(10)
                await call("Runtime.evaluate", expression=_LOG_SCALE_JS % json.dumps(log_charts))
                await asyncio.sleep(3)
                shot = await call("Page.captureScreenshot", format="png")
                png.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.terminate()
        browser.wait(timeout=30)


def screenshot(log_dir: Path, png: Path, log_charts: str) -> None:
    """Serve ``log_dir`` with TensorBoard and photograph its custom-scalars page with headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    tensorboard = Path(sys.executable).with_name("tensorboard")
    if chromium is None or not tensorboard.exists():
        print("  (no chromium or tensorboard: no screenshot)")
        return
    port = _free_port()
    server = subprocess.Popen([str(tensorboard), "--logdir", str(log_dir), "--port", str(port), "--host",
                               "127.0.0.1", "--load_fast=false"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    profile = png.parent / f".chromium-{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as response:
                    if response.read() not in (b"[]", b""):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(2)
        url = f"http://127.0.0.1:{port}/#custom_scalars&_smoothingWeight=0"
        try:
            import aiohttp  # noqa: F401 - the DevTools client; without it, a plain screenshot (linear axes)
        except ImportError:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,1000",
                            "--virtual-time-budget=30000", url], capture_output=True, timeout=180, check=False)
        else:
            asyncio.run(_devtools_screenshot(chromium, url, png, log_charts, profile))
        print(f"  screenshot: {png}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--root", type=Path, default=ROOT / "logs" / "reproduce")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for the pictures (e.g. docs/img)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}")
    for name in args.only:
        config = ROOT / EXPERIMENTS[name]
        print(f"\n== ({name}) {config.relative_to(ROOT)}")
        start = time.perf_counter()
        cli = fit_main(["--config", str(config), "--trainer.default_root_dir", str(args.root / name),
                        "--trainer.enable_progress_bar=false"])
        print(f"  wall time {time.perf_counter() - start:.0f} s")
        log_dir = Path(cli.trainer.logger.log_dir)
        REPORTS[name](cli, read_scalars(log_dir))
        if args.screenshots is not None:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            screenshot(log_dir.parent, args.screenshots / f"seed_{name}_custom_scalars.png", LOG_CHARTS[name])
            plot = callback(cli, "ActivationPointPlot")
            if plot is not None and plot.gif_path is not None:
                shutil.copy(plot.gif_path, args.screenshots / f"seed_{name}_activation_points.gif")
                from PIL import Image

                Image.fromarray(plot.render(plot.frames[-1])).save(
                    args.screenshots / f"seed_{name}_activation_points_final.png")


if __name__ == "__main__":
    main()
