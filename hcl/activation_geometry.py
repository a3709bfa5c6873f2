r"""
Activation-point geometry
=========================

What a two-layer ReLU network does on 1-D data, as numbers and as a picture (no Lightning here).

With a bias (the first layer's own, or a data column of ones), neuron ``i`` computes ``relu(w_i x + c_i)``:
it is zero on one side of its *activation point* ``a_i = −c_i / w_i`` and a line of slope ``w_i α_i`` on the
other. :func:`neuron_markers` computes those points and slopes, :class:`Frame` holds one picture's numbers and
:class:`ActivationPointFigure` draws them: the data as crosses, the network's output as a line, and each neuron as a
triangle at ``a_i`` whose height is ``|w_i α_i|`` (on its own axis, on the right), pointing to the side it activates
(``>`` when ``w_i > 0``) and coloured by the sign of ``α_i`` (green ``α_i ≥ 0``, red ``α_i < 0``; the legend lists
only the colours the picture shows).
:class:`hcl.callbacks.ActivationPointPlot` logs them during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

POSITIVE_COLOUR = "#2ca02c"
NEGATIVE_COLOUR = "#d62728"


@dataclass(frozen=True)
class InputLayout:
    """Where the 1-D input sits in the hidden layer's input vector.

    Attributes:
        x_column: the column holding ``x``.
        ones_columns: the data columns of ones, which carry the bias (their weights add up); empty when only the
            first layer's own bias does.
        width: the hidden layer's ``in_features``.
    """

    x_column: int
    ones_columns: tuple[int, ...]
    width: int

    def inputs(self, x: Tensor) -> Tensor:
        """``(k, width)`` network inputs for the 1-D points ``x`` (the ones column filled in)."""
        X = torch.zeros(x.shape[0], self.width, dtype=x.dtype, device=x.device)
        X[:, self.x_column] = x
        X[:, list(self.ones_columns)] = 1.0
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
    return InputLayout(x_column=others[0], ones_columns=tuple(ones), width=X.shape[1])


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
    if layout.ones_columns:  # every column of ones adds its weight to the neuron's offset
        offset = offset + weight[:, list(layout.ones_columns)].sum(1)
    alpha = output_weight.reshape(-1).to(slope_in)
    with torch.no_grad():
        position = -offset / slope_in
    return NeuronMarkers(position=position, height=(slope_in * alpha).abs(), right=slope_in > 0,
                         positive=alpha >= 0)


def network_curve(
    grid: Tensor, weight: Tensor, bias: Tensor | None, output_weight: Tensor, output_bias: Tensor | None,
    layout: InputLayout,
) -> Tensor:
    """``(k,)`` the scalar output of the network at the 1-D points ``grid``."""
    with torch.no_grad():
        hidden = torch.relu(layout.inputs(grid) @ weight.T + (0 if bias is None else bias))
        return hidden @ output_weight.reshape(-1) + (0 if output_bias is None else output_bias.reshape(()))


@dataclass
class Frame:
    """The numbers of one activation-point picture (NumPy arrays, cheap to keep for a whole run).

    Attributes:
        step: the global step it shows.
        objective: the network's objective ``L`` at that step.
        position: ``(m,)`` activation points.
        height: ``(m,)`` slopes ``|w_i α_i|``.
        right: ``(m,)`` bool, active to the right of the point.
        positive: ``(m,)`` bool, ``α_i ≥ 0``.
        curve: ``(k,)`` the network's output on the figure's grid.
    """

    step: int
    objective: float
    position: np.ndarray
    height: np.ndarray
    right: np.ndarray
    positive: np.ndarray
    curve: np.ndarray

    @classmethod
    def of(cls, step: int, objective: float, markers: NeuronMarkers, curve: Tensor) -> Frame:
        """A frame from tensors (copied to the CPU as NumPy arrays)."""
        return cls(step=step, objective=objective, position=to_numpy(markers.position),
                   height=to_numpy(markers.height), right=to_numpy(markers.right).astype(bool),
                   positive=to_numpy(markers.positive).astype(bool), curve=to_numpy(curve))


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
        from matplotlib.lines import Line2D

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
        self.data_axes, self.height_axes = ax, heights
        # The legend lists the neurons' kinds a frame draws (see _update_legend); the data and the output always.
        self._fixed_handles = ax.get_legend_handles_labels()[0]
        self._kind_handles = {
            positive: Line2D([], [], marker=">", linestyle="none", color=colour, markersize=6, label=label)
            for positive, colour, label in ((True, POSITIVE_COLOUR, "neuron, α ≥ 0"),
                                            (False, NEGATIVE_COLOUR, "neuron, α < 0"))
        }
        self.legend_kinds: tuple[bool, ...] | None = None
        self.y = np.asarray(y, dtype=float)
        self.markers = {}
        for right, marker in ((True, ">"), (False, "<")):
            for positive, colour in ((True, POSITIVE_COLOUR), (False, NEGATIVE_COLOUR)):
                self.markers[right, positive] = heights.scatter(
                    np.empty(0), np.empty(0), marker=marker, color=colour, alpha=0.75, linewidths=0)
        self.title = ax.set_title("", fontsize=10)

    def render(
        self, frame: Frame, y_limits: tuple[float, float] | None = None, height_limit: float | None = None
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
        self._update_legend(tuple(kind for kind in (True, False) if (visible & (frame.positive == kind)).any()))
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

    def _update_legend(self, kinds: tuple[bool, ...]) -> None:
        """List the data, the output and the kinds of neurons drawn (``True``: ``α ≥ 0``), and no other kind."""
        if kinds != self.legend_kinds:
            handles = self._fixed_handles + [self._kind_handles[kind] for kind in kinds]
            self.data_axes.legend(handles=handles, loc="lower right", fontsize=8)
            self.legend_kinds = kinds


def to_numpy(t: Tensor) -> np.ndarray:
    """A CPU NumPy copy of ``t``, floating point as float64."""
    return t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype).numpy()
