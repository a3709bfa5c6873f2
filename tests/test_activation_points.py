"""ActivationPointPlot: the geometry of the markers, the drawn picture, and a real run's images and GIF."""

from __future__ import annotations

import io
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator

from hcl import TwoLayerReLU
from hcl.activation_geometry import (
    ActivationPointFigure,
    Frame,
    InputLayout,
    input_layout,
    network_curve,
    neuron_markers,
    to_numpy,
)
from hcl.callbacks import ActivationPointPlot, ConvexGapMonitor
from hcl.datamodules import SyntheticRegression


def _images(log_dir, tag):
    events = []
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
        acc.Reload()
        if tag in acc.Tags()["images"]:
            events.extend(acc.Images(tag))
    return events


def test_input_layout_finds_x_and_the_ones_in_any_order():
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).reshape(-1, 1)
    ones = torch.ones_like(x)
    assert input_layout(torch.cat([x, ones], 1), has_bias=False) == InputLayout(0, (1,), 2)
    assert input_layout(torch.cat([ones, x], 1), has_bias=False) == InputLayout(1, (0,), 2)
    assert input_layout(x, has_bias=True) == InputLayout(0, (), 1)
    # two columns of ones: both weights are the neuron's offset (the second one's was left out)
    layout = input_layout(torch.cat([x, ones, ones], 1), has_bias=False)
    assert layout == InputLayout(0, (1, 2), 3)
    weight, output = torch.tensor([[1.0, 0.5, 0.5]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    assert float(neuron_markers(weight, None, output, layout).position) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="needs a bias"):
        input_layout(x, has_bias=False)
    with pytest.raises(ValueError, match="1-D data"):
        input_layout(torch.cat([x, x.square(), ones], 1), has_bias=False)


@pytest.mark.parametrize("with_bias", [True, False])
def test_markers_sit_where_each_neuron_switches_on_and_measure_its_slope(with_bias):
    generator = torch.Generator().manual_seed(0)
    m = 12
    if with_bias:
        weight = torch.randn(m, 1, generator=generator, dtype=torch.float64)
        bias = torch.randn(m, generator=generator, dtype=torch.float64)
        layout = InputLayout(0, (), 1)
    else:  # the seed's layout: a column of ones, placed first here
        weight = torch.randn(m, 2, generator=generator, dtype=torch.float64)
        bias = None
        layout = InputLayout(1, (0,), 2)
    alpha = torch.randn(1, m, generator=generator, dtype=torch.float64)
    markers = neuron_markers(weight, bias, alpha, layout)

    def neuron_outputs(points):
        pre = layout.inputs(points) @ weight.T + (0 if bias is None else bias)
        return torch.relu(pre) * alpha  # (k, m): each neuron's own contribution

    delta = 1e-3
    left = neuron_outputs(markers.position - delta)
    right = neuron_outputs(markers.position + delta)
    at = neuron_outputs(markers.position)
    eye = torch.eye(m, dtype=torch.bool)
    assert torch.allclose(at[eye], torch.zeros(m, dtype=torch.float64), atol=1e-12)  # switches at its point
    active_right = right[eye] != 0
    active_left = left[eye] != 0
    assert torch.equal(active_right, markers.right)  # the triangle points to the active side
    assert torch.equal(active_left, ~markers.right)
    slope = (right[eye] - left[eye]).abs() / delta  # only the active side contributes
    assert torch.allclose(slope, markers.height, rtol=1e-9)
    assert torch.equal(markers.positive, alpha.reshape(-1) >= 0)


def test_curve_and_frame_are_the_networks_output_and_markers():
    generator = torch.Generator().manual_seed(1)
    model = TwoLayerReLU(in_features=2, hidden=5, output_bias=True).double()
    layout = InputLayout(0, (1,), 2)  # x first, then the ones column
    grid = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64)
    weight, output_weight = model.hidden_layer.weight.detach(), model.output_layer.weight.detach()
    output_bias = model.output_layer.bias.detach() + torch.randn(1, generator=generator, dtype=torch.float64)
    curve = network_curve(grid, weight, None, output_weight, output_bias, layout)
    with torch.no_grad():
        model.output_layer.bias.copy_(output_bias)
        expected = model(torch.stack([grid, torch.ones_like(grid)], 1)).reshape(-1)
    assert torch.allclose(curve, expected, atol=1e-12)

    markers = neuron_markers(weight, None, output_weight, layout)
    frame = Frame.of(3, 0.25, markers, curve)
    assert frame.step == 3 and frame.objective == 0.25
    assert frame.right.dtype == np.bool_ and np.array_equal(frame.right, markers.right.numpy())
    assert np.array_equal(frame.positive, markers.positive.numpy())
    assert np.allclose(frame.position, markers.position.numpy(), equal_nan=True)
    assert np.allclose(frame.curve, expected.numpy(), atol=1e-12)


def _colour_pixels(image):
    r, g, b = (image[..., k].astype(int) for k in range(3))
    green = (g > r + 60) & (g > b + 60)
    red = (r > g + 80) & (r > b + 80)
    return int(green.sum()), int(red.sum())


def test_picture_colours_neurons_by_the_sign_of_their_output_weight():
    grid = np.linspace(-2, 2, 400)
    x, y = np.array([-0.5, 0.5]), np.array([0.2, 0.8])
    figure = ActivationPointFigure(grid, x, y, (-2.0, 2.0), figsize=(4, 3), dpi=60)
    # The legend shows one marker of each colour: draw without neurons first to measure it.
    empty = Frame(0, 0.1, np.array([np.nan]), np.array([0.0]), np.array([True]), np.array([True]), 0 * grid)
    legend_green, legend_red = _colour_pixels(figure.render(empty))
    positions = np.array([-1.0, 0.0, 1.0])
    for positive in (True, False):
        frame = Frame(1, 0.1, positions, np.array([0.5, 1.0, 0.7]), np.array([True, False, True]),
                       np.full(3, positive), 0.3 * grid)
        image = figure.render(frame)
        assert image.shape == (180, 240, 3)
        green, red = _colour_pixels(image)
        # Three triangles of one colour, none of the other (a few pixels of slack for anti-aliasing).
        if positive:
            assert green > legend_green + 20 and red <= legend_red + 3
        else:
            assert red > legend_red + 20 and green <= legend_green + 3


def _legend_labels(figure):
    return [text.get_text() for text in figure.data_axes.get_legend().get_texts()]


def test_the_legend_lists_only_the_kinds_of_neurons_drawn():
    grid = np.linspace(-2, 2, 400)
    figure = ActivationPointFigure(grid, np.array([-0.5, 0.5]), np.array([0.2, 0.8]), (-2.0, 2.0), figsize=(4, 3),
                                   dpi=60)
    positions = np.array([-1.0, 0.0, 1.0])

    def frame(positive, position=positions):
        return Frame(1, 0.1, position, np.array([0.5, 1.0, 0.7]), np.array([True, False, True]),
                     np.asarray(positive), 0.3 * grid)

    base = ["network output", "data"]
    image = figure.render(frame([True, True, True]))
    assert _legend_labels(figure) == base + ["neuron, α ≥ 0"]
    assert _colour_pixels(image)[1] <= 3  # no red anywhere: no α < 0 marker in the legend either
    image = figure.render(frame([False, False, False]))
    assert _legend_labels(figure) == base + ["neuron, α < 0"]
    assert _colour_pixels(image)[0] <= 3
    figure.render(frame([True, False, True]))
    assert _legend_labels(figure) == base + ["neuron, α ≥ 0", "neuron, α < 0"]
    # A negative neuron off the axis is not drawn, so not listed.
    figure.render(frame([True, False, True], np.array([-1.0, 5.0, 1.0])))
    assert _legend_labels(figure) == base + ["neuron, α ≥ 0"]
    figure.render(frame([True, False, True], np.full(3, np.nan)))
    assert _legend_labels(figure) == base


@pytest.mark.slow
def test_a_run_logs_one_picture_per_period_and_the_final_one_and_writes_the_gif(tmp_path, make_trainer):
    torch.manual_seed(0)
    data = SyntheticRegression(kind="points", x=[-0.7, -0.3, 0.7, 0.8], y=[0.28, 0.52, 1.12, 1.18],
                               append_ones=True, dtype="float64")
    model = TwoLayerReLU(in_features=2, hidden=6, lr=0.2, init="normal")
    plot = ActivationPointPlot(every_n_steps=3, gif=True, x_range=(-2.0, 2.0), figsize=(4, 3), dpi=50)
    make_trainer([plot], max_steps=7).fit(model, datamodule=data)

    events = _images(tmp_path, "activation_points")
    assert [e.step for e in events] == [0, 3, 6, 7]  # every 3 steps, plus the final weights
    first = Image.open(io.BytesIO(events[0].encoded_image_string))
    assert first.size == (200, 150)
    assert len(np.unique(np.asarray(first.convert("RGB")).reshape(-1, 3), axis=0)) > 10

    assert plot.gif_path == tmp_path / "run" / "version_0" / "activation_points.gif"
    # The final picture, as logged at the last step, also lies beside the GIF as a PNG.
    assert plot.png_path == tmp_path / "run" / "version_0" / "activation_points.png"
    final = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
    png = Image.open(plot.png_path)
    assert png.format == "PNG" and png.size == (200, 150)
    assert np.array_equal(np.asarray(png.convert("RGB")), final)
    assert not np.array_equal(np.asarray(first.convert("RGB")), final)
    gif = Image.open(plot.gif_path)
    assert gif.n_frames == 4
    # The last frame is the trained network: its curve is the model's output on the grid.
    grid = torch.linspace(-2.0, 2.0, 400, dtype=torch.float64)
    inputs = torch.stack([grid, torch.ones_like(grid)], 1)
    with torch.no_grad():
        expected = model(inputs).reshape(-1).numpy()
    assert np.allclose(plot.frames[-1].curve, expected, atol=1e-12)
    assert plot.frames[-1].step == 7
    assert plot.frames[0].objective > plot.frames[-1].objective


def test_the_final_png_is_written_without_a_gif_and_named_after_it(tmp_path, make_trainer):
    data = SyntheticRegression(kind="points", x=[-0.7, 0.7, 0.8], y=[0.3, 1.1, 1.2], append_ones=True,
                               dtype="float64")
    plot = ActivationPointPlot(every_n_steps=5, gif_name="fit.gif", figsize=(3, 2), dpi=40)
    with pytest.warns(UserWarning, match=f"no TensorBoard logger, so no picture is logged; the last one is written to "
                                         f"{tmp_path}") as said:
        make_trainer([plot], max_steps=2, logger=False).fit(TwoLayerReLU(in_features=2, hidden=3), datamodule=data)
    assert not any("callback_metrics" in str(w.message) for w in said)  # it keeps nothing there
    assert plot.png_path == tmp_path / "fit.png"  # no logger: the trainer's root folder
    assert Image.open(plot.png_path).size == (120, 80)
    assert plot.gif_path is None and not (tmp_path / "fit.gif").exists()


def test_a_fast_dev_run_writes_no_picture_and_warns_of_no_missing_logger(tmp_path):
    """Lightning's dry run replaces the loggers by its dummy and suppresses logging: no file, no warning."""
    data = SyntheticRegression(kind="points", x=[-0.7, 0.7, 0.8], y=[0.3, 1.1, 1.2], append_ones=True,
                               dtype="float64")
    plot = ActivationPointPlot(figsize=(3, 2), dpi=40)
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[plot])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(TwoLayerReLU(in_features=2, hidden=3), datamodule=data)
    assert not any("TensorBoard" in str(w.message) for w in said)
    assert plot.png_path is None and not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_unsupported_models_and_data_are_refused(make_trainer):
    data = SyntheticRegression(kind="points", x=[[0.1, 0.2], [0.3, -0.1], [0.5, 0.9]], y=[0.0, 1.0, 0.5],
                               dtype="float64")
    with pytest.raises(ValueError, match="1-D data"):
        make_trainer([ActivationPointPlot()], 1).fit(TwoLayerReLU(in_features=2, hidden=3, bias=True),
                                                           datamodule=data)
    with pytest.raises(ValueError, match="scalar output"):
        make_trainer([ActivationPointPlot()], 1).fit(
            TwoLayerReLU(in_features=2, hidden=3, out_features=2), datamodule=data)


def test_bad_arguments_are_refused_early():
    with pytest.raises(ValueError, match="every_n_steps"):
        ActivationPointPlot(every_n_steps=0)
    with pytest.raises(ValueError, match="x_range"):
        ActivationPointPlot(x_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="gif_name"):
        ActivationPointPlot(gif_name="../out.gif")
    with pytest.raises(ValueError, match="gif_fps"):
        ActivationPointPlot(gif_fps=0)
    # each accepted, then crashed after the last step (PIL: "unknown file extension", an int overflow) or at the first
    # plot (matplotlib, the allocator), or wrote a GIF for gif="false"
    for kwargs, name in [({"gif_name": ".gif"}, "gif_name"), ({"gif_fps": 1e-300}, "gif_fps"),
                         ({"gif_fps": 0.001}, "gif_fps"), ({"gif_fps": True}, "gif_fps"),
                         ({"figsize": (float("inf"), 4)}, "figsize"),
                         ({"figsize": (1e6, 1e6)}, "figsize"), ({"dpi": 10**6}, "dpi"), ({"x_range": 5}, "x_range"),
                         ({"figsize": ("a", "b")}, "figsize"), ({"gif": "false"}, "gif")]:
        with pytest.raises((ValueError, TypeError), match=name):
            ActivationPointPlot(**kwargs)
    with pytest.raises(ValueError, match="together"):
        ActivationPointPlot(probe=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="give layer= too"):  # was read only beside layer=: silently ignored
        ConvexGapMonitor(output_layer="nope")
    for prefix in ("..", " ", "a b", "convex\n", "a/b"):  # ".." wrote chart runs beside the run's own events
        with pytest.raises(ValueError, match="prefix must be a name of letters"):
            ConvexGapMonitor(prefix=prefix)


@pytest.mark.slow
def test_a_long_runs_gif_animates_evenly_spaced_frames_at_most(tmp_path, make_trainer, monkeypatch):
    """Writing the GIF holds every image at once (0.5 MB each): 601 frames took 300 MB at the end of training."""
    import hcl.callbacks.activation_points as module

    monkeypatch.setattr(module, "MAX_GIF_FRAMES", 3)
    torch.manual_seed(0)
    data = SyntheticRegression(kind="points", x=[-0.7, -0.3, 0.7, 0.8], y=[0.28, 0.52, 1.12, 1.18],
                               append_ones=True, dtype="float64")
    plot = ActivationPointPlot(every_n_steps=2, gif=True, figsize=(4, 3), dpi=50)
    make_trainer([plot], max_steps=7).fit(TwoLayerReLU(in_features=2, hidden=6, lr=0.2), datamodule=data)
    assert [frame.step for frame in plot.frames] == [0, 2, 4, 6, 7]  # every one kept as numbers
    assert Image.open(plot.gif_path).n_frames == 3  # the first, the middle and the last


@pytest.mark.slow
def test_two_pictures_write_two_files_and_each_run_draws_its_own_range(tmp_path, make_trainer):
    """Two pictures with their own tags both wrote activation_points.png, and a reused picture kept the first run's
    axis, with the second run's data outside it."""
    first = SyntheticRegression(kind="points", x=[-0.7, 0.7, 0.8], y=[0.3, 1.1, 1.2], append_ones=True, dtype="float64")
    a, b = (ActivationPointPlot(every_n_steps=5, tag=tag, figsize=(3, 2), dpi=40) for tag in ("a/ap", "b"))
    make_trainer([a, b], max_steps=2, logger=False).fit(TwoLayerReLU(in_features=2, hidden=3), datamodule=first)
    assert (a.png_path, b.png_path) == (tmp_path / "a_ap.png", tmp_path / "b.png") and a.png_path.exists()
    assert [ActivationPointPlot(tag=tag).gif_name for tag in (".", "x" * 300)] == ["activation_points.gif",
                                                                                 "x" * 100 + ".gif"]  # writable
    with pytest.raises(ValueError, match="would write the same 'x.gif' and its PNG: give each its own gif_name="):
        make_trainer([ActivationPointPlot(tag="a", gif_name="x.gif"), ActivationPointPlot(tag="b", gif_name="x.gif")],
                     max_steps=1, logger=False).fit(TwoLayerReLU(in_features=2, hidden=3), datamodule=first)
    far = SyntheticRegression(kind="points", x=[4.0, 6.0, 8.0], y=[1.0, 0.2, 1.1], append_ones=True, dtype="float64")
    make_trainer([a], max_steps=1, logger=False).fit(TwoLayerReLU(in_features=2, hidden=3), datamodule=far)
    assert a.x_range == (0.0, 12.0)  # the second run's: its span widened by itself on each side
    fixed = ActivationPointPlot(x_range=(-1.0, 1.0), figsize=(3, 2), dpi=40)
    make_trainer([fixed], max_steps=1, logger=False).fit(TwoLayerReLU(in_features=2, hidden=3), datamodule=far)
    assert fixed.x_range == (-1.0, 1.0)  # a range given is every run's



@pytest.mark.slow
def test_the_pictures_objective_is_the_models_with_an_output_bias(tmp_path):
    """The objective in each picture's numbers (and title) is the network's own, output bias included."""
    X = torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(-1, 1)
    model = TwoLayerReLU(in_features=1, hidden=4, bias=True, output_bias=True, lr=1e-12, weight_decay=1e-3).double()
    with torch.no_grad():
        model.output_layer.bias.fill_(3.0)
    plot = ActivationPointPlot(every_n_steps=1, gif=True)  # the frames' numbers are kept for the GIF
    pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path, callbacks=[plot]).fit(
        model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, X.abs() + 3.0), batch_size=20))
    with torch.no_grad():
        expected = float(model.objective(X, X.abs() + 3.0))
    assert plot.frames and plot.frames[-1].objective == pytest.approx(expected, rel=1e-6)


def test_markers_of_a_zero_output_weight_and_a_flat_neuron():
    """α = 0 counts as positive (green, ``α ≥ 0``) and a neuron flat in x (w = 0) is active to no side (``w > 0``).
    Catches: (``α ≥ 0`` → ``α > 0``) and (``w > 0`` → ``w ≥ 0``)."""
    layout = InputLayout(x_column=0, ones_columns=(1,), width=2)
    weight = torch.tensor([[1.0, 0.5], [0.0, 0.5], [-2.0, 1.0]], dtype=torch.float64)
    output = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    markers = neuron_markers(weight, None, output, layout)
    assert markers.positive.tolist() == [True, True, False]
    assert markers.right.tolist() == [True, False, False]


def test_input_layout_refuses_data_with_no_x_column():
    """Only columns of ones: not 1-D data, refused with the 1-D message. Catches: (``!= 1`` → ``> 1``: IndexError)."""
    with pytest.raises(ValueError, match="1-D data"):
        input_layout(torch.ones(5, 2, dtype=torch.float64), has_bias=True)


def test_a_neuron_on_the_edge_of_the_range_is_drawn():
    """Activation points at the ends of x_range are on the axis, not off it. Catches: (``>=``/``<=`` → ``>``/``<``)."""
    grid = np.linspace(-2, 2, 50)
    figure = ActivationPointFigure(grid, np.array([-0.5, 0.5]), np.array([0.2, 0.8]), (-2.0, 2.0), figsize=(3, 2),
                                   dpi=40)
    frame = Frame(3, 0.1, np.array([-2.0, 2.0]), np.array([0.5, 1.0]), np.array([True, True]),
                  np.array([True, True]), 0 * grid)
    figure.render(frame)
    assert "off-axis" not in figure.title.get_text()
    assert figure.markers[True, True].get_offsets().shape[0] == 2


def test_frames_hold_float64_arrays():
    """``to_numpy`` copies floating point as float64 (a float32 run's frames too). Catches: (the dtype dropped)."""
    assert to_numpy(torch.ones(3, dtype=torch.float32)).dtype == np.float64
    assert to_numpy(torch.tensor([True, False])).dtype == np.bool_
