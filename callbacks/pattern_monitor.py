r"""
Pattern monitor
===============

Counts the activation patterns of a two-layer ReLU network's hidden neurons while it trains.

The pattern of neuron ``i`` on data ``X`` is ``1[X w̃_i ≥ 0]`` (ties active). Every ``every_n_steps`` global
steps the monitor snapshots the patterns of all neurons and logs how many are distinct, how many neurons are
dead, how many neurons changed pattern since the previous snapshot and how many patterns were never seen before
in the run.

Under DDP every rank computes the same patterns (on the same rows, in the same order, whatever the number of
processes: :func:`hcl.callbacks.data.training_data`) and rank zero logs them; the pattern history is part of the
checkpoint, so a resumed run continues ``patterns/new`` and ``patterns/changed`` where it stopped.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.callbacks.base import StackCallback
from hcl.callbacks.logs import log_scalars
from hcl.patterns import PatternTracker, pack_hidden_signs, pack_signs


class PatternMonitor(StackCallback):
    r"""Log the hidden layer's activation-pattern counts at the trainer's global step.

    Logged keys (at steps ``0, k, 2k, …`` with ``k = every_n_steps``, using the weights the training step at that
    global step computes its loss with):

    - ``patterns/unique``: number of distinct patterns among the neurons (the all-zero pattern included);
    - ``patterns/dead``: neurons active on no sample;
    - ``patterns/changed``: neurons whose pattern differs from the previous snapshot (0 at the first);
    - ``patterns/new``: distinct patterns never seen before in the run (all of them at the first snapshot).

    Snapshots of non-finite weights are not counted (a warning says so once).

    The snapshot is taken during the training step's forward pass (a forward hook on the hidden layer), so it sees
    the weights the loss is computed with even when another callback changed them at the start of the step; when the
    hidden layer is not called as a module in training mode, just before the backward pass, still before the
    optimizer steps. When no
    ``probe`` is given and the hidden layer's input is the monitored training set itself (full-batch training on a
    data module's tensors, not augmented), the patterns are the sign of the hidden layer's output, at no extra matrix
    product; otherwise they are recomputed on the probe (or the training set) with the current weights.

    Args:
        every_n_steps: snapshot period in global steps.
        probe: inputs to compute patterns on; default: the training data (``datamodule.train_tensors()``, or one
            pass over the training dataloader).
        layer: qualified name of the hidden ``nn.Linear`` when the model's stack is not found automatically
            (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear``, for models that are not a ``Sequential``.
        max_samples: use only the first ``max_samples`` samples of the data.

    Raises:
        ValueError: on a non-positive ``every_n_steps`` or ``max_samples``, an empty or non-finite probe, and, at
            setup, when the model holds no (or several) two-layer ReLU stack.

    Example::

        trainer = Trainer(callbacks=[PatternMonitor(every_n_steps=1)])
    """

    needs_target = False
    resolves_objective = False
    state_key_fields = ("every_n_steps", "layer")

    def __init__(
        self,
        every_n_steps: int = 1,
        probe: Tensor | None = None,
        layer: str | None = None,
        output_layer: str | None = None,
        max_samples: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, probe=probe, layer=layer, output_layer=output_layer, max_samples=max_samples)
        self._tracker = PatternTracker()
        self._tracked_step: int | None = None  # the step of the tracker's last snapshot
        self._tracked_width: int | None = None  # the hidden width it tracks
        self._data: Tensor | None = None
        self._hook = None
        self._pending: int | None = None  # the due step whose patterns the next training forward pass records
        self._trainer: pl.Trainer | None = None

    @override
    def reset(self) -> None:
        super().reset()
        self._tracker = PatternTracker()
        self._tracked_step = None

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        dashboard.register_charts(trainer, "hcl", {"unique activation patterns": ["patterns/unique"],
                                                   "pattern changes": ["patterns/changed", "patterns/new"]})

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        data, before = self.training_data(trainer)[0], self._data
        width = self._stack.hidden.out_features
        if self._tracked_step is not None and (self._tracked_width != width or before is None or not (
                before.shape == data.shape and torch.equal(before, data))):
            # another fit of the same trainer on another network or other data: no pattern of the last one applies
            rank_zero_info("PatternMonitor: another network or data than the last fit's: the pattern history starts "
                           "again (patterns/changed compares with this fit's own steps only)")
            self._tracker, self._tracked_step = PatternTracker(), None
        self._data, self._tracked_width = data, width
        self._trainer = trainer
        self._pending = None
        # Patterns are taken in the training step's own forward pass: of exactly the weights its loss uses, even when
        # another callback changed them earlier in the step (ConvexGapMonitor(load_solution=True)).
        # run as it is under torch.compile (its NumPy packing is no graph to trace: dynamo failed on it)
        self._hook = self._stack.hidden.register_forward_hook(torch.compiler.disable(self._from_forward))

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = self.due_step(trainer)
        if step is None:
            return
        self._pending = step

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self._pending is not None:  # the forward never ran the hidden layer as a module in training mode: the
            self._snapshot(trainer, None)  # weights the loss used are still there (the optimizer steps after this)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:  # no backward either (the step was skipped): the weights did not move
            self._snapshot(trainer, None)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hook()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_hook()
        if self._pending is not None:  # its step's forward never came: another fit of this trainer takes it again
            self.last_step, self._pending = min(self.last_step, self._pending - 1), None
        super().on_exception(trainer, pl_module, exception)

    @override
    def state_dict(self) -> dict[str, Any]:
        # a step cut short (its checkpoint taken inside it) leaves the history as before it: the resumed run retakes it
        unfinished = self._tracked_step is not None and self._tracked_step > self.finished_step()
        return {**super().state_dict(), "tracker": self._tracker.state_dict(drop_last=unfinished)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._tracker.load_state_dict(state_dict["tracker"])
        self._tracked_step = None  # the loaded history's last snapshot is a finished step's (an earlier fit's is gone)

    # ------------------------------------------------------------------ helpers
    def _from_forward(self, module, inputs, output: Tensor) -> None:
        if self._pending is not None and module.training and self._trainer is not None:
            # The layer's input is the monitored data itself (full-batch training on the data module's tensors, not
            # augmented): the patterns are the sign of its output, at no extra matrix product.
            whole = self.probe is None and self.max_samples is None and _same_rows(inputs[0], self._data)
            # under mixed precision the output is rounded (bf16 flips signs near 0): recomputed in the weights' dtype,
            # autocast off, like the convex monitors' patterns
            whole = whole and output.dtype == module.weight.dtype
            with torch.autocast(output.device.type, enabled=False):
                self._snapshot(self._trainer, output.detach() if whole else None)

    def _snapshot(self, trainer: "pl.Trainer", output: Tensor | None) -> None:
        step, self._pending = self._pending, None
        weight, bias, _, _ = self._stack.weights()
        # The data were checked once; finite weights then mean a finite output (an m × d check, not n × m).
        if not self._finite(weight, bias, step):
            return
        # Packed straight from the pre-activations: no (n, m) boolean matrix.
        packed = pack_hidden_signs(self._data, weight, bias) if output is None else pack_signs(output)
        self._record(trainer, packed, step)

    def _record(self, trainer: "pl.Trainer", packed: Tensor, step: int) -> None:
        stats = self._tracker.update_packed(packed)
        self._tracked_step = step
        if trainer.is_global_zero:
            log_scalars(
                trainer,
                {"patterns/unique": stats.unique, "patterns/dead": stats.dead,
                 "patterns/changed": stats.changed, "patterns/new": stats.new},
                step,
            )

    def _finite(self, values: Tensor, bias: Tensor | None, step: int) -> bool:
        # NaN compares false: non-finite weights would be counted as dead neurons, which they are not.
        if bool(torch.isfinite(values).all()) and (bias is None or bool(torch.isfinite(bias).all())):
            return True
        self.warn_once(f"{type(self).__name__}: non-finite hidden-layer weights at step {step}; patterns are not "
                       "counted while they last")
        return False

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _same_rows(inputs: Any, data: Tensor) -> bool:
    """Whether the hidden layer's ``inputs`` are ``data`` itself, row for row (output row ``j`` is sample ``j``).

    The same memory answers at once; otherwise equal values do (a collated full batch, not shuffled), checked at a
    cost of ``n · d`` against the ``n · d · m`` of recomputing the patterns.
    """
    if not isinstance(inputs, Tensor) or inputs.shape != data.shape:
        return False
    if inputs.dtype != data.dtype or inputs.device != data.device:
        return False
    return inputs.data_ptr() == data.data_ptr() or bool(torch.equal(inputs, data))
