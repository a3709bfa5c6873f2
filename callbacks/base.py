r"""
Stack callback
==============

What every hcl callback shares: it watches the ``Linear → ReLU → Linear`` stack of the model, on the training data
(or a probe), with the objective's ``λ`` and reduction, every ``every_n_steps`` global steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.callbacks import data
from hcl.callbacks.logs import flush_loggers, mark_resumed_run, warn_if_no_logger
from hcl.checks import (
    check_every_n_steps,
    check_prefix,
    check_probe,
    check_probe_and_target,
    check_reduction,
    check_weight_decay,
    is_int,
)
from hcl.network import ReLUStack, find_relu_stack


class StackCallback(Callback):
    r"""Base class of the callbacks that watch a model's two-layer ReLU stack.

    It validates the common arguments, finds the stack when fitting starts (:func:`hcl.network.find_relu_stack`;
    validation, test and prediction runs are left alone), resolves ``λ`` and the reduction
    (:func:`resolve_objective`), loads the data to evaluate the stack on (:meth:`training_data`), decides when to act
    (:meth:`should_run`, each global step at most once, also across a resume) and keeps that in checkpoints. At the
    start of training it warns when there is no logger, writes the merged TensorBoard layout
    (:mod:`hcl.dashboard`) and marks a resumed run's restart; on an exception it flushes the loggers.

    Subclasses register their charts and check the model in ``on_fit_start``, load their data in
    ``on_train_start`` (after calling this class's), and act in a batch hook::

        step = self.due_step(trainer)
        if step is None:
            return

    Class attributes:
        needs_target: the callback evaluates an objective: ``probe`` comes with ``target``, and data without
            targets is refused.
        resolves_objective: ``setup`` resolves ``λ`` and the reduction (``_lambda``, ``_reduction``).
        state_key_fields: the constructor arguments that tell two instances apart in a checkpoint.

    Args:
        every_n_steps: period in global steps (steps ``0, k, 2k, …``).
        probe: inputs to evaluate the stack on (default: the training data).
        target: targets of ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        max_samples: use only the first ``max_samples`` samples of the data.
        prefix: tag prefix, or ``None`` for a callback with fixed tags.
        weight_decay: ``λ``; ``None`` reads the model's.
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack or a probe of the wrong
            width.
        TypeError: on arguments of the wrong type.
    """

    needs_target: ClassVar[bool] = True
    resolves_objective: ClassVar[bool] = True
    state_key_fields: ClassVar[tuple[str, ...]] = ("prefix", "every_n_steps")

    def __init__(
        self,
        every_n_steps: int = 1,
        *,
        probe: Tensor | None = None,
        target: Tensor | None = None,
        layer: str | None = None,
        output_layer: str | None = None,
        max_samples: int | None = None,
        prefix: str | None = None,
        weight_decay: float | None = None,
        reduction: str | None = None,
    ) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if self.needs_target:
            self.probe, self.target = check_probe_and_target(probe, target)
        else:
            self.probe, self.target = check_probe(probe), None
        if max_samples is not None and (not is_int(max_samples) or max_samples < 1):
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        self.layer = layer
        self.output_layer = output_layer
        self.max_samples = max_samples
        self.prefix = None if prefix is None else check_prefix(prefix)
        self.weight_decay = None if weight_decay is None else check_weight_decay(weight_decay)
        self.reduction = None if reduction is None else check_reduction(reduction)
        #: the last global step the callback acted at (−1 before the first); saved in checkpoints
        self.last_step = -1
        self._state_key: str | None = None
        # Found when fitting starts.
        self._stack: ReLUStack | None = None
        self._lambda = 0.0
        self._reduction = "mean"

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): built once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(**{name: getattr(self, name) for name in self.state_key_fields})
        return self._state_key

    def should_run(self, step: int) -> bool:
        """Whether to act at global step ``step``: by default every ``every_n_steps`` steps from step 0.

        Override for another schedule. It is asked only about steps past :attr:`last_step`, so a step repeated by
        gradient accumulation or a resume is never acted at twice.
        """
        return step % self.every_n_steps == 0

    def due_step(self, trainer: "pl.Trainer") -> int | None:
        """``trainer.global_step`` when the callback acts at it now (recorded as :attr:`last_step`), else ``None``."""
        step = trainer.global_step
        if step <= self.last_step or not self.should_run(step):
            return None
        self.last_step = step
        return step

    def training_data(self, trainer: "pl.Trainer") -> tuple[Tensor, Tensor | None]:
        """The inputs, as the hidden layer takes them, and the targets to evaluate the stack on.

        The probe, else the data module's training tensors, else one pass over the training dataloader (see
        :func:`hcl.callbacks.data.training_data`). Under DDP this is a collective: every rank must call it.

        Raises:
            ValueError: no data, data of the wrong width, or no targets for a callback that needs them.
        """
        X, Y = data.training_data(trainer, self.probe, self.target, self.max_samples)
        if self.needs_target and Y is None:
            raise ValueError(f"{type(self).__name__} needs targets: the training data has none (pass target=)")
        return self._stack.inputs(X).detach(), Y

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return  # the callbacks watch training only
        self._stack = find_relu_stack(pl_module, self.layer, self.output_layer)
        if self.probe is not None:
            self._stack.inputs(self.probe)  # width check before training
        if self.resolves_objective:
            self._lambda, self._reduction = resolve_objective(pl_module, self.weight_decay, self.reduction,
                                                              type(self).__name__)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        warn_if_no_logger(trainer, type(self).__name__)
        dashboard.write_layout(trainer)
        mark_resumed_run(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        flush_loggers(trainer)  # what was logged before the failure stays on disk

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]


def resolve_objective(
    pl_module: "pl.LightningModule", weight_decay: float | None, reduction: str | None, owner: str
) -> tuple[float, str]:
    """``(λ, reduction)``: the callback's own values when given, else the model's ``weight_decay`` / ``reduction``
    attributes, else ``λ = 0`` and ``"mean"`` with a warning.

    Raises:
        ValueError: the model's values are not a valid ``λ`` or reduction.
    """
    lam = weight_decay if weight_decay is not None else getattr(pl_module, "weight_decay", None)
    red = reduction if reduction is not None else getattr(pl_module, "reduction", None)
    if lam is None or red is None:
        rank_zero_warn(
            f"{owner}: the model has no `weight_decay`/`reduction` attributes and the callback was given none: "
            "using λ = 0 and reduction 'mean'"
        )
    lam = check_weight_decay(lam or 0.0, "the model's weight_decay (λ)")
    red = check_reduction(red or "mean", "the model's reduction")
    return lam, red
