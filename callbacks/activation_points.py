r"""
Activation-point plot
=====================

Draws what a two-layer ReLU network does on 1-D data, the way the seed's animations do.

With a bias (the first layer's own, or a data column of ones), neuron ``i`` computes ``relu(w_i x + c_i)``:
it is zero on one side of its *activation point* ``a_i = −c_i / w_i`` and a line of slope ``w_i α_i`` on the
other. The picture shows the data as crosses, the network's output as a line, and each neuron as a triangle
at ``a_i`` whose height is ``|w_i α_i|`` (on its own axis, on the right), pointing to the side it activates
(``>`` when ``w_i > 0``) and coloured by the sign of ``α_i`` (green ``+``, red ``−``). Every ``every_n_steps``
steps the picture is logged as a TensorBoard image; with ``gif=True`` the whole run is also written as an
animated GIF in the log folder at the end of training, with the output axis fixed over the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl.convex.problem import REDUCTIONS, fold_bias, fold_weights, network_objective
from hcl.monitoring import check_every_n_steps, check_probe, is_due, training_data, warn_if_no_logger
from hcl.network import ReLUStack, find_relu_stack

POSITIVE_COLOUR = "#2ca02c"
NEGATIVE_COLOUR = "#d62728"


@dataclass(frozen=True)
class InputLayout:
    """Where the 1-D input sits in the hidden layer's input vector.

    Attributes:
        x_column: the column holding ``x``.
        ones_column: the data column of ones that carries the bias, or ``None`` when only the first layer's own
            bias does.
        width: the hidden layer's ``in_features``.
    """

    x_column: int
    ones_column: int | None
    width: int

    def inputs(self, x: Tensor) -> Tensor:
        """``(k, width)`` network inputs for the 1-D points ``x`` (the ones column filled in)."""
        X = torch.zeros(x.shape[0], self.width, dtype=x.dtype, device=x.device)
        X[:, self.x_column] = x
        if self.ones_column is not None:
            X[:, self.ones_column] = 1.0
        return X


@dataclass(frozen=True)
class NeuronMarkers:
    """One triangle per neuron.

    Attributes:
        position: ``(m,)`` activation points ``−c_i / w_i`` (``±inf`` or ``nan`` where ``w_i = 0``).
        height: ``(m,)`` slopes ``|w_i α_i|`` of the neurons' outputs on their active side.
        right: ``(m,)`` True when the neuron is active to the right of its point (``w_i > 0``).
        positive: ``(m,)`` True when ``α_i ≥ 0``.
    """

    position: Tensor
    height: Tensor
    right: Tensor
    positive: Tensor


def input_layout(X: Tensor, has_bias: bool) -> InputLayout:
    """Find the ``x`` column and the ones column of 1-D data.

    Args:
        X: ``(n, in_features)`` inputs of the hidden layer.
        has_bias: whether the hidden layer has its own bias.

    Raises:
        ValueError: when the data is not 1-D (one non-constant column besides columns of ones), or when there is
            no bias at all (no first-layer bias and no column of ones).
    """
    if X.ndim != 2:
        raise ValueError(f"the inputs must be (n, features), got shape {tuple(X.shape)}")
    ones = [j for j in range(X.shape[1]) if bool((X[:, j] == 1).all())]
    others = [j for j in range(X.shape[1]) if j not in ones]
    if len(others) != 1:
        raise ValueError(
            f"the activation-point picture needs 1-D data (one input column besides a column of ones); the inputs "
            f"have {X.shape[1]} columns of which {len(others)} are not all ones"
        )
    if not has_bias and not ones:
        raise ValueError(
            "the activation-point picture needs a bias: a first-layer bias (bias=True) or a data column of ones "
            "(e.g. SyntheticRegression(append_ones=True)); without one every activation point is 0"
        )
    return InputLayout(x_column=others[0], ones_column=ones[0] if ones else None, width=X.shape[1])


def neuron_markers(
    weight: Tensor, bias: Tensor | None, output_weight: Tensor, layout: InputLayout
) -> NeuronMarkers:
    """Activation points, heights, directions and signs of the neurons.

    Args:
        weight: ``(m, in_features)`` hidden weight.
        bias: ``(m,)`` hidden bias or ``None``.
        output_weight: ``(1, m)`` output weight.
        layout: where ``x`` and the ones are (:func:`input_layout`).
    """
    slope_in = weight[:, layout.x_column]
    offset = torch.zeros_like(slope_in)
    if bias is not None:
        offset = offset + bias.to(slope_in)
    if layout.ones_column is not None:
        offset = offset + weight[:, layout.ones_column]
    alpha = output_weight.reshape(-1).to(slope_in)
    with torch.no_grad():
        position = -offset / slope_in
    return NeuronMarkers(position=position, height=(slope_in * alpha).abs(), right=slope_in > 0,
                         positive=alpha >= 0)


class ActivationPointPlot(Callback):
    r"""Log the seed's activation-point picture of a network trained on 1-D data with a bias.

    The picture (see the module docstring) is logged as the TensorBoard image ``tag`` at steps ``0, k, 2k, …``
    (``k = every_n_steps``) with the weights the training step at that global step uses, and once more at the
    end of training with the final weights. Its title gives the step and the network's objective ``L`` (``λ``
    and the reduction read from the model, as :class:`hcl.callbacks.ConvexGapMonitor` does).

    The 1-D input is found in the data: the hidden layer takes either ``x`` alone with its own bias, or ``x``
    and a column of ones (the seed's layout), in any order.

    Args:
        every_n_steps: period in global steps.
        tag: TensorBoard image tag.
        gif: also write the run as an animated GIF (``gif_name`` in the logger's folder) at the end of training.
            Frames are kept as numbers, not images, until then (a few kB per frame for a thousand neurons). A
            resumed run animates the steps after the resume only.
        gif_name: file name of the GIF.
        gif_fps: frames per second of the GIF.
        x_range: ``(low, high)`` of the horizontal axis; default: the data's range widened by its length on
            each side. Neurons whose activation point falls outside are counted in the title.
        probe: 1-D inputs to draw (default: the training data); ``target`` must come with it.
        target: targets of ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        figsize: figure size in inches.
        dpi: figure resolution.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack or with several outputs;
            at the start of training, on data that is not 1-D or has no bias.

    Example::

        trainer = Trainer(callbacks=[ActivationPointPlot(every_n_steps=10, gif=True)])
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        tag: str = "activation_points",
        gif: bool = False,
        gif_name: str = "activation_points.gif",
        gif_fps: float = 10.0,
        x_range: tuple[float, float] | None = None,
        probe: Tensor | None = None,
        target: Tensor | None = None,
        layer: str | None = None,
        output_layer: str | None = None,
        figsize: tuple[float, float] = (6.4, 4.0),
        dpi: int = 100,
    ) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be a non-empty string, got {tag!r}")
        if not isinstance(gif_name, str) or not gif_name.endswith(".gif") or Path(gif_name).name != gif_name:
            raise ValueError(f"gif_name must be a file name ending in .gif, got {gif_name!r}")
        if not (isinstance(gif_fps, (int, float)) and math.isfinite(gif_fps) and gif_fps > 0):
            raise ValueError(f"gif_fps must be a positive number, got {gif_fps!r}")
        if x_range is not None:
            if len(x_range) != 2 or not all(math.isfinite(float(v)) for v in x_range) or not x_range[0] < x_range[1]:
                raise ValueError(f"x_range must be (low, high) with finite low < high, got {x_range!r}")
            x_range = (float(x_range[0]), float(x_range[1]))
        if len(figsize) != 2 or not all(float(v) > 0 for v in figsize):
            raise ValueError(f"figsize must be (width, height) in inches, got {figsize!r}")
        if not isinstance(dpi, int) or dpi < 10:
            raise ValueError(f"dpi must be an integer ≥ 10, got {dpi!r}")
        self.probe = check_probe(probe)
        self.target = check_probe(target, "target")
        if (self.probe is None) != (self.target is None):
            raise ValueError("probe and target go together: pass both or neither")
        self.tag = tag
        self.gif = gif
        self.gif_name = gif_name
        self.gif_fps = float(gif_fps)
        self.x_range = x_range
        self.layer = layer
        self.output_layer = output_layer
        self.figsize = (float(figsize[0]), float(figsize[1]))
        self.dpi = dpi
        self.frames: list[_Frame] = []
        self.gif_path: Path | None = None
        self._last_step = -1
        self._stack: ReLUStack | None = None
        self._layout: InputLayout | None = None
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        self._grid: Tensor | None = None
        self._figure: ActivationPointFigure | None = None
        self._lambda = 0.0
        self._reduction = "mean"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tag=self.tag, every_n_steps=self.every_n_steps)

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._stack = find_relu_stack(pl_module, self.layer, self.output_layer)
        if self._stack.output.out_features != 1:
            raise ValueError(
                f"the activation-point picture needs a scalar output; the model has "
                f"{self._stack.output.out_features} outputs"
            )
        if self.probe is not None:
            input_layout(self._stack.inputs(self.probe), self._stack.bias)
        lam = getattr(pl_module, "weight_decay", 0.0)
        reduction = getattr(pl_module, "reduction", "mean")
        self._lambda = float(lam) if isinstance(lam, (int, float)) else 0.0
        self._reduction = reduction if reduction in REDUCTIONS else "mean"

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        warn_if_no_logger(trainer, type(self).__name__)
        X, Y = training_data(trainer, self.probe, self.target)
        if Y is None:
            raise ValueError(f"{type(self).__name__} needs targets: the training data has none (pass target=)")
        self._X = self._stack.inputs(X).detach()
        self._layout = input_layout(self._X, self._stack.bias)
        self._Y = Y.detach().to(self._X).reshape(-1)
        if self._Y.shape[0] != self._X.shape[0]:
            raise ValueError(f"the activation-point picture needs one target per point, got {tuple(Y.shape)}")
        if self.x_range is None:
            x = self._X[:, self._layout.x_column]
            low, high = float(x.min()), float(x.max())
            span = max(high - low, 1e-3 * max(abs(low), 1.0), 1e-6)
            self.x_range = (low - span, high + span)
        self._grid = torch.linspace(*self.x_range, 400, dtype=self._X.dtype, device=self._X.device)
        self._figure = None
        self.frames = []

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not is_due(step, self.every_n_steps, self._last_step):
            return
        self._last_step = step
        if trainer.is_global_zero:
            self._draw(trainer, step)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._X is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step > self._last_step:
            self._last_step = step
            self._draw(trainer, step)
        if self.gif and self.frames:
            self.gif_path = self._write_gif(trainer)
        self._figure = None  # free the figure

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]

    # ------------------------------------------------------------- drawing
    def snapshot(self, step: int) -> _Frame:
        """The numbers of one picture for the network's current weights."""
        weight, bias, output_weight, output_bias = self._stack.weights()
        markers = neuron_markers(weight, bias, output_weight, self._layout)
        with torch.no_grad():
            hidden = torch.relu(self._layout.inputs(self._grid) @ weight.T + (0 if bias is None else bias))
            curve = hidden @ output_weight.reshape(-1) + (0 if output_bias is None else output_bias.reshape(()))
            L = float(network_objective(fold_bias(self._X, bias is not None), self._Y.reshape(-1, 1),
                                        fold_weights(weight, bias), output_weight, output_bias, self._lambda,
                                        self._reduction))
        return _Frame(
            step=step,
            objective=L,
            position=_numpy(markers.position),
            height=_numpy(markers.height),
            right=_numpy(markers.right).astype(bool),
            positive=_numpy(markers.positive).astype(bool),
            curve=_numpy(curve),
        )

    def render(
        self, frame: _Frame, y_limits: tuple[float, float] | None = None, height_limit: float | None = None
    ) -> np.ndarray:
        """The picture of ``frame`` as an ``(H, W, 3)`` uint8 array (see :meth:`ActivationPointFigure.render`)."""
        if self._figure is None:
            self._figure = ActivationPointFigure(_numpy(self._grid), _numpy(self._X[:, self._layout.x_column]),
                                                 _numpy(self._Y), self.x_range, self.figsize, self.dpi)
        return self._figure.render(frame, y_limits, height_limit)

    def _draw(self, trainer: "pl.Trainer", step: int) -> None:
        if not self._stack.finite():
            rank_zero_warn(f"{type(self).__name__}: non-finite weights at step {step}; no picture")
            return
        frame = self.snapshot(step)
        if self.gif:
            self.frames.append(frame)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        image = self.render(frame)
        for logger in loggers:
            logger.experiment.add_image(self.tag, image, step, dataformats="HWC")

    def _write_gif(self, trainer: "pl.Trainer") -> Path:
        from PIL import Image

        # The output axis is fixed over the run, so that the animation shows the fit moving; the slope axis is
        # scaled per frame (as in the seed's animations), so that the neurons' relative sizes stay visible while
        # they are all tiny (small initialisation).
        y = _numpy(self._Y)
        low, high = float(y.min()), float(y.max())
        for frame in self.frames:
            finite = frame.curve[np.isfinite(frame.curve)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        pad = 0.08 * max(high - low, 1e-6)
        limits = (low - pad, high + pad)
        images = [
            Image.fromarray(self.render(frame, limits)).quantize(colors=255, method=Image.Quantize.FASTOCTREE)
            for frame in self.frames
        ]
        folder = Path(_log_folder(trainer))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.gif_name
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / self.gif_fps), loop=0)
        return path


@dataclass
class _Frame:
    step: int
    objective: float
    position: np.ndarray
    height: np.ndarray
    right: np.ndarray
    positive: np.ndarray
    curve: np.ndarray


class ActivationPointFigure:
    """The activation-point picture, drawn with matplotlib (Agg, no pyplot state) and redrawn frame by frame.

    The figure and its artists are made once; each :meth:`render` only replaces their data, which is several
    times faster than building a new figure per frame.

    Args:
        grid: ``(k,)`` the horizontal positions where the network's output is drawn.
        x: ``(n,)`` the data's inputs.
        y: ``(n,)`` the data's targets.
        x_range: ``(low, high)`` of the horizontal axis.
        figsize: figure size in inches.
        dpi: resolution.
    """

    def __init__(
        self,
        grid: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        x_range: tuple[float, float],
        figsize: tuple[float, float] = (6.4, 4.0),
        dpi: int = 100,
    ) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.grid = np.asarray(grid, dtype=float)
        self.x_range = x_range
        self.figure = Figure(figsize=figsize, dpi=dpi)
        self.canvas = FigureCanvasAgg(self.figure)
        self.figure.subplots_adjust(left=0.11, right=0.86, bottom=0.13, top=0.9)
        ax = self.figure.add_subplot()
        heights = ax.twinx()
        (self.curve,) = ax.plot(self.grid, np.zeros_like(self.grid), color="#1f77b4", linewidth=1.8,
                                label="network output", zorder=3)
        ax.scatter(x, y, marker="x", color="black", s=60, linewidths=2, label="data", zorder=4)
        ax.set_xlim(*x_range)
        ax.set_xlabel("x")
        ax.set_ylabel("output")
        heights.set_ylabel("neuron slope |w α|")
        # The data and the output above the triangles: the data axes in front, with a transparent background.
        ax.set_zorder(heights.get_zorder() + 1)
        ax.patch.set_visible(False)
        for colour, label in ((POSITIVE_COLOUR, "neuron, α > 0"), (NEGATIVE_COLOUR, "neuron, α < 0")):
            ax.scatter([], [], marker=">", color=colour, s=36, linewidths=0, label=label)
        ax.legend(loc="lower right", fontsize=8)
        self.data_axes, self.height_axes = ax, heights
        self.y = np.asarray(y, dtype=float)
        self.markers = {}
        for right, marker in ((True, ">"), (False, "<")):
            for positive, colour in ((True, POSITIVE_COLOUR), (False, NEGATIVE_COLOUR)):
                self.markers[right, positive] = heights.scatter(
                    np.empty(0), np.empty(0), marker=marker, color=colour, alpha=0.75, linewidths=0)
        self.title = ax.set_title("", fontsize=10)

    def render(
        self, frame: _Frame, y_limits: tuple[float, float] | None = None, height_limit: float | None = None
    ) -> np.ndarray:
        """Draw ``frame`` and return its ``(H, W, 3)`` uint8 pixels.

        ``y_limits`` and ``height_limit`` fix the output axis and the top of the slope axis (for animations); by
        default the output axis spans the data and the output, and the slope axis the tallest visible neuron.
        """
        self.curve.set_ydata(frame.curve)
        if y_limits is None:
            finite = frame.curve[np.isfinite(frame.curve)]
            low = min(float(self.y.min()), float(finite.min()) if finite.size else math.inf)
            high = max(float(self.y.max()), float(finite.max()) if finite.size else -math.inf)
            pad = 0.08 * max(high - low, 1e-6)
            y_limits = (low - pad, high + pad)
        self.data_axes.set_ylim(*y_limits)

        low, high = self.x_range
        visible = np.isfinite(frame.position) & (frame.position >= low) & (frame.position <= high)
        size = 80.0 if frame.position.size <= 10 else 36.0 if frame.position.size <= 50 else 14.0
        for (right, positive), artist in self.markers.items():
            chosen = visible & (frame.right == right) & (frame.positive == positive)
            artist.set_offsets(np.column_stack([frame.position[chosen], frame.height[chosen]]))
            artist.set_sizes([size])
        if height_limit is None:
            top = float(frame.height[visible].max()) if visible.any() else 0.0
            height_limit = top * 1.1 if top > 0 else 1.0
        self.height_axes.set_ylim(0.0, height_limit)

        outside = int((~visible).sum())
        title = f"step {frame.step}   objective {frame.objective:.4g}"
        if outside:
            title += f"   ({outside} neuron{'s' if outside > 1 else ''} off-axis)"
        self.title.set_text(title)
        self.canvas.draw()
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype).numpy()


def _log_folder(trainer: "pl.Trainer") -> str:
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return logger.log_dir
    return trainer.default_root_dir
