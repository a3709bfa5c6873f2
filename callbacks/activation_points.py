r"""
Activation-point plot
=====================

Draws what a two-layer ReLU network does on 1-D data: the data as crosses, the network's output as a line, and
each neuron as a triangle at its *activation point* ``a_i = −c_i / w_i``, its height the neuron's slope
``|w_i α_i|``, pointing to the side it activates and coloured by the sign of ``α_i`` (the geometry and the figure are
in :mod:`hcl.activation_geometry`). Every ``every_n_steps`` steps the picture is logged as a TensorBoard image; the
final picture is also written as a PNG in the log folder, and with ``gif=True`` the whole run as an animated GIF beside
it, with the output axis fixed over the run.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl.activation_geometry import (
    ActivationPointFigure,
    Frame,
    InputLayout,
    input_layout,
    network_curve,
    neuron_markers,
    to_numpy,
)
from hcl.callbacks.base import StackCallback, resolve_objective
from hcl.checks import REDUCTIONS, check_bool
from hcl.convex.problem import fold_bias, fold_weights, network_objective

# Frames a GIF animates at most: writing it holds every image at once, about 0.5 MB each (640 × 400, quantized)
MAX_GIF_FRAMES = 300


class ActivationPointPlot(StackCallback):
    r"""Log the activation-point picture of a network trained on 1-D data with a bias.

    The picture (see :mod:`hcl.activation_geometry`) is logged as the TensorBoard image ``tag`` at steps ``0, k, 2k, …``
    (``k = every_n_steps``) with the weights the training step at that global step uses, and once more at the
    end of training with the final weights; that final picture is also written as a PNG in the logger's folder,
    named after the GIF (the tag's, cleaned as ``gif_name`` says: ``activation_points.png`` by default;
    :attr:`png_path`). Its title gives the step and the network's objective ``L`` (``λ`` and the reduction read from
    the model, with its optimizer's coupled weight decay, as :class:`hcl.callbacks.ConvexGapMonitor` does).

    The 1-D input is found in the data: the hidden layer takes either ``x`` alone with its own bias, or ``x``
    and a column of ones, in any order.

    Args:
        every_n_steps: period in global steps.
        tag: TensorBoard image tag.
        gif: also write the run as an animated GIF (``gif_name`` in the logger's folder) at the end of training.
            Frames are kept as numbers, not images, until then (about 21 kB per frame for a thousand neurons);
            writing holds the images at once (0.5 MB and 80 ms each), so at most ``MAX_GIF_FRAMES`` evenly spaced
            frames are animated. A resumed run, or a second ``fit()``, animates its own steps only.
        gif_name: file name of the GIF (default: the tag's, ``<tag>.gif`` with any character but ASCII letters, digits,
            ``-`` and ``.`` as ``_``); the final PNG takes its name with the suffix ``.png``. Two pictures of a run
            need two names.
        gif_fps: frames per second of the GIF.
        x_range: ``(low, high)`` of the horizontal axis; default: each run's data's range widened by its length on
            each side. Neurons whose activation point falls outside are counted in the title.
        probe: 1-D inputs to draw (default: the training data); ``target`` must come with it.
        target: targets of ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        figsize: figure size in inches.
        dpi: figure resolution.

    Raises:
        ValueError: on bad arguments; when fitting starts, on a model without a two-layer ReLU stack or with several
            outputs; at the start of training, on data that is not 1-D or has no bias.

    Example::

        trainer = Trainer(callbacks=[ActivationPointPlot(every_n_steps=10, gif=True)])
    """

    resolves_objective = False  # read leniently from the model: a picture needs no exact objective
    state_key_fields = ("tag", "every_n_steps")

    def __init__(
        self,
        every_n_steps: int = 10,
        tag: str = "activation_points",
        gif: bool = False,
        gif_name: str | None = None,
        gif_fps: float = 10.0,
        x_range: tuple[float, float] | None = None,
        probe: Tensor | None = None,
        target: Tensor | None = None,
        layer: str | None = None,
        output_layer: str | None = None,
        figsize: tuple[float, float] = (6.4, 4.0),
        dpi: int = 100,
    ) -> None:
        super().__init__(every_n_steps, probe=probe, target=target, layer=layer, output_layer=output_layer)
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be a non-empty string, got {tag!r}")
        if gif_name is None and isinstance(tag, str):
            gif_name = (re.sub(r"[^A-Za-z0-9.-]", "_", tag)[:100].strip(".") or "activation_points") + ".gif"
        if (not isinstance(gif_name, str) or Path(gif_name).suffix != ".gif" or Path(gif_name).name != gif_name
                or not Path(gif_name).stem):
            raise ValueError(f"gif_name must be a file name ending in .gif, got {gif_name!r}")
        # a frame lasts round(1000 / fps) ms: from 1 ms to 500 s (a GIF holds at most 655.35 s a frame)
        if not (_is_real(gif_fps) and 0.002 <= gif_fps <= 1000):
            raise ValueError(f"gif_fps must be a number of frames per second in [0.002, 1000], got {gif_fps!r}")
        if x_range is not None:
            if (not _pair_of_reals(x_range) or not all(math.isfinite(v) for v in x_range)
                    or not x_range[0] < x_range[1]):
                raise ValueError(f"x_range must be (low, high) with finite low < high, got {x_range!r}")
            x_range = (float(x_range[0]), float(x_range[1]))
        if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 1000:
            raise ValueError(f"dpi must be an integer in [10, 1000], got {dpi!r}")
        # matplotlib draws at most 2¹⁶ pixels a side
        if not _pair_of_reals(figsize) or not all(0 < v and v * dpi < 2**16 for v in figsize):
            raise ValueError(f"figsize must be (width, height) in inches, positive and under {2**16 / dpi:.4g} at dpi "
                             f"{dpi}, got {figsize!r}")
        self.tag = tag
        self.gif = check_bool(gif, "gif")
        self.gif_name = gif_name
        self.gif_fps = float(gif_fps)
        self.x_range = self._x_range_given = x_range  # x_range: the run's (each run's data's, when not given)
        self.figsize = (float(figsize[0]), float(figsize[1]))
        self.dpi = dpi
        self.frames: list[Frame] = []
        self.gif_path: Path | None = None
        self.png_path: Path | None = None
        self._last_frame: Frame | None = None
        self._layout: InputLayout | None = None
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        self._grid: Tensor | None = None
        self._figure: ActivationPointFigure | None = None

    @override
    def _refuse_twins(self, trainer: "pl.Trainer") -> None:
        super()._refuse_twins(trainer)  # and two pictures written to one file (each tag its own, by default)
        if any(cb is not self and isinstance(cb, ActivationPointPlot) and cb.gif_name == self.gif_name
               for cb in trainer.callbacks):
            raise ValueError(f"2 ActivationPointPlot callbacks would write the same {self.gif_name!r} and its PNG: "
                             "give each its own gif_name=")

    # ------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
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
        super().on_train_start(trainer, pl_module)
        try:  # the objective the convex monitors evaluate (with the optimizer's decay); else read leniently
            self._lambda, self._reduction = resolve_objective(pl_module, None, None, type(self).__name__,
                                                              trainer.optimizers, self._stack)
        except ValueError:
            pass
        X, Y = self.training_data(trainer)
        self._X = X
        self._layout = input_layout(X, self._stack.bias)
        self._Y = Y.detach().to(X).reshape(-1)
        if self._Y.shape[0] != X.shape[0]:
            raise ValueError(f"the activation-point picture needs one target per point, got {tuple(Y.shape)}")
        self.x_range = self._x_range_given
        if self.x_range is None:
            x = X[:, self._layout.x_column]
            low, high = float(x.min()), float(x.max())
            span = max(high - low, 1e-3 * max(abs(low), 1.0), 1e-6)
            self.x_range = (low - span, high + span)
        self._grid = torch.linspace(*self.x_range, 400, dtype=X.dtype, device=X.device)
        self._figure = None
        self._last_frame = None
        self.frames = []

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = self.due_step(trainer)
        if step is not None and trainer.is_global_zero:
            self._draw(trainer, step)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._X is None or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step > self.last_step and not self._stopped:  # a model no longer its stack is drawn no more
            self.last_step = step
            if self.recheck(trainer, step):  # after the last step's update (a pruned weight: after its forward)
                self._draw(trainer, step)
        writes = not trainer.fast_dev_run  # Lightning's dry run logs and writes nothing
        if writes and self._last_frame is not None:
            self.png_path = self._write_png(trainer, self._last_frame)
        if writes and self.gif and self.frames:
            self.gif_path = self._write_gif(trainer)
        self._figure = None  # free the figure

    @override
    def warn_if_not_logged(self, trainer: "pl.Trainer") -> None:
        if trainer.fast_dev_run:  # its loggers are Lightning's dummy on purpose, and no file is written either
            return
        if not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            folder = _output_folder(trainer)
            gif = f" and the whole run as {self.gif_name}" if self.gif else ""
            rank_zero_warn(f"{type(self).__name__}: the trainer has no TensorBoard logger, so no picture is logged; "
                           f"the last one is written to {folder}{gif} when training ends")

    # ------------------------------------------------------------- drawing
    def snapshot(self, step: int) -> Frame:
        """The numbers of one picture for the network's current weights."""
        weight, bias, output_weight, output_bias = self._stack.weights()
        markers = neuron_markers(weight, bias, output_weight, self._layout)
        curve = network_curve(self._grid, weight, bias, output_weight, output_bias, self._layout)
        with torch.no_grad():
            L = float(network_objective(fold_bias(self._X, bias is not None), self._Y.reshape(-1, 1),
                                        fold_weights(weight, bias), output_weight, output_bias, self._lambda,
                                        self._reduction))
        return Frame.of(step, L, markers, curve)

    def render(
        self, frame: Frame, y_limits: tuple[float, float] | None = None, height_limit: float | None = None
    ) -> np.ndarray:
        """The picture of ``frame`` as an ``(H, W, 3)`` uint8 array (see :meth:`ActivationPointFigure.render`)."""
        if self._figure is None:
            self._figure = ActivationPointFigure(to_numpy(self._grid), to_numpy(self._X[:, self._layout.x_column]),
                                                 to_numpy(self._Y), self.x_range, self.figsize, self.dpi)
        return self._figure.render(frame, y_limits, height_limit)

    def _draw(self, trainer: "pl.Trainer", step: int) -> None:
        if not self._stack.finite():
            self.warn_once(f"{type(self).__name__}: non-finite weights at step {step}; no picture")
            return
        frame = self.snapshot(step)
        self._last_frame = frame
        if self.gif:
            self.frames.append(frame)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        image = self.render(frame)
        for logger in loggers:
            logger.experiment.add_image(self.tag, image, step, dataformats="HWC")

    def _write_png(self, trainer: "pl.Trainer", frame: Frame) -> Path:
        from PIL import Image

        path = _output_path(trainer, Path(self.gif_name).with_suffix(".png").name)
        Image.fromarray(self.render(frame)).save(path)
        return path

    def _write_gif(self, trainer: "pl.Trainer") -> Path:
        from PIL import Image

        # The output axis is fixed over the run, so that the animation shows the fit moving; the slope axis is
        # scaled per frame, so that the neurons' relative sizes stay visible while they are all tiny (small
        # initialisation).
        y = to_numpy(self._Y)
        low, high = float(y.min()), float(y.max())
        for frame in self.frames:
            finite = frame.curve[np.isfinite(frame.curve)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        pad = 0.08 * max(high - low, 1e-6)
        limits = (low - pad, high + pad)
        frames = self.frames
        if len(frames) > MAX_GIF_FRAMES:  # evenly spaced, first and last kept: the images are held at once
            keep = np.unique(np.linspace(0, len(frames) - 1, MAX_GIF_FRAMES).round().astype(int))
            rank_zero_info(f"{type(self).__name__}: the GIF shows {len(keep)} of the run's {len(frames)} frames, "
                           "evenly spaced (the TensorBoard images are every one)")
            frames = [frames[i] for i in keep]
        images = [
            Image.fromarray(self.render(frame, limits)).quantize(colors=255, method=Image.Quantize.FASTOCTREE)
            for frame in frames
        ]
        path = _output_path(trainer, self.gif_name)
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / self.gif_fps), loop=0)
        return path


def _output_folder(trainer: "pl.Trainer") -> Path:
    """The first logger's folder (the trainer's root folder without a logger)."""
    return next((Path(lg.log_dir) for lg in trainer.loggers if getattr(lg, "log_dir", None)),
                Path(trainer.default_root_dir))


def _output_path(trainer: "pl.Trainer", name: str) -> Path:
    """``name`` in :func:`_output_folder`, the folder created."""
    folder = _output_folder(trainer)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _pair_of_reals(value: object) -> bool:
    return (isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2
            and all(_is_real(v) for v in list(value)))
