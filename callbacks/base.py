r"""
Stack callback
==============

What every hcl callback shares: it watches the ``Linear → ReLU → Linear`` stack of the model, on the training data
(or a probe), with the objective's ``λ`` and reduction, every ``every_n_steps`` global steps.
"""

from __future__ import annotations

import ast
import re
import weakref
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from hcl import dashboard
from hcl.callbacks import data
from hcl.callbacks.logs import flush_loggers, mark_resumed_run, warn_if_no_logger
from hcl.callbacks.objective import (  # noqa: F401 (re-exported: where the callbacks' helpers were)
    epoch_batches,
    optimizer_lambda,
    refuse_non_squared_loss,
    resolve_objective,
)
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

# The trainer each callback last fitted with, kept out of the callback (ddp_spawn pickles the callbacks).
_FITTED_WITH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Each callback's state in the runs of the other trainers it fitted with: a trainer that fits again continues its run
_STASHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StackCallback(Callback):
    r"""Base class of the callbacks that watch a model's two-layer ReLU stack.

    It validates the common arguments, finds the stack when fitting starts (:func:`hcl.network.find_relu_stack`;
    validation, test and prediction runs are left alone), refuses a model trained with another loss than the squared
    loss (:func:`refuse_non_squared_loss`), resolves ``λ`` and the reduction when training starts
    (:func:`resolve_objective`), loads the data to evaluate the stack on and says which (:meth:`training_data`),
    decides when to act
    (:meth:`should_run`, each global step at most once, also across a resume) and keeps that in checkpoints. At the
    start of training it warns when there is no logger, writes the merged TensorBoard layout
    (:mod:`hcl.dashboard`) and marks a resumed run's restart; at each optimizer step it mirrors the model's objective
    into its chart's series run; on an exception it flushes the loggers, at the end of fitting it closes the series
    runs.

    Subclasses register their charts and check the model in ``on_fit_start``, load their data in
    ``on_train_start`` (after calling this class's), and act in a batch hook::

        step = self.due_step(trainer)
        if step is None:
            return

    Class attributes:
        needs_target: the callback evaluates an objective: ``probe`` comes with ``target``, and data without
            targets is refused.
        resolves_objective: the callback evaluates the squared-loss objective: ``setup`` refuses another loss and
            ``on_train_start`` resolves ``λ`` and the reduction (``_lambda``, ``_reduction``).
        state_key_fields: the constructor arguments that tell two instances apart in a checkpoint (the period too,
            so that Lightning lets twins reach this class's refusal; a resume with another period still finds its
            state: :meth:`on_load_checkpoint`).

    Args:
        every_n_steps: period in global steps (steps ``0, k, 2k, …``).
        probe: inputs to evaluate the stack on (default: the training data).
        target: targets of ``probe``.
        layer: qualified name of the hidden ``nn.Linear`` (see :func:`hcl.network.find_relu_stack`).
        output_layer: qualified name of the output ``nn.Linear`` for models that are not a ``Sequential``.
        max_samples: use only the first ``max_samples`` samples of the data.
        prefix: tag prefix, or ``None`` for a callback with fixed tags.
        weight_decay: ``λ``; ``None`` reads the model's, else the optimizer's weight decay (``docs/convex.md``).
        reduction: ``"sum"`` or ``"mean"``; ``None`` reads the model's.

    Raises:
        ValueError: on bad arguments; at setup, on a model without a two-layer ReLU stack, a probe of the wrong
            width, or (``resolves_objective``) a model trained with a cross-entropy, logistic or other non-squared
            loss.
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
        for name, value in (("layer", layer), ("output_layer", output_layer)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a module name (a non-empty string) or None, got {value!r}")
        if output_layer is not None and layer is None:  # it is read only beside the hidden layer it follows
            raise ValueError(f"output_layer={output_layer!r} names the Linear after layer=: give layer= too")
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
        self._checked: Tensor | None = None  # the samples the model's forward is checked on, at each due step
        self._stopped = False  # the forward no longer computes the stack's function
        self._lambda = 0.0
        self._reduction = "mean"

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): built once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(**{name: getattr(self, name) for name in self.state_key_fields})
        return self._state_key

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        # A resume with another every_n_steps: the state this callback saved under the period it had then (Lightning
        # loads states after this hook, by key). The pattern history does not depend on the period.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        mine = {name: getattr(self, name) for name in self.state_key_fields if name != "every_n_steps"}
        for key, state in list(states.items()):
            fields = _key_fields(key, type(self).__qualname__)
            if fields is not None and {k: v for k, v in fields.items() if k != "every_n_steps"} == mine:
                states[self.state_key] = state
                return

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
        return step if self.recheck(trainer, step) else None

    def recheck(self, trainer: "pl.Trainer", step: int) -> bool:
        """Whether the model still computes its stack's function, checked by a forward (which also brings a weight that
        a pre-hook computes, pruning's or weight_norm's, up to date); the callback stops when it does not."""
        if self._checked is not None and not self._stopped:
            try:  # a term of the forward that was zero when training started may not be by now
                self._stack.check_forward(trainer.lightning_module, self._checked, again=True,
                                          shaped=self.__dict__.get("_checked_shaped"))
            except ValueError as err:
                self._stop(step, err)
        return not self._stopped

    def _stop(self, step: int, err: ValueError) -> None:
        self._stopped = True
        rank_zero_warn(f"{type(self).__name__}: at step {step}, {err}. It logs nothing more in this run: its values "
                       "would describe another network")

    def training_data(self, trainer: "pl.Trainer") -> tuple[Tensor, Tensor | None]:
        """The inputs, as the hidden layer takes them, and the targets to evaluate the stack on.

        The probe, else the data module's training tensors, else one pass over the training dataloader (see
        :func:`hcl.callbacks.data.training_data`). Under DDP this is a collective: every rank must call it.

        Raises:
            ValueError: no data, data of the wrong width, no targets for a callback that needs them, or a model that
                does not compute its stack's function (:meth:`hcl.network.ReLUStack.check_forward`).
        """
        X, Y = data.training_data(trainer, self.probe, self.target, self.max_samples, type(self).__name__,
                                  in_features=self._stack.in_features)
        if self.needs_target and Y is None:
            raise ValueError(f"{type(self).__name__} needs targets: the training data has none (pass probe=, target=)")
        shaped = X[:8].detach().to(self._stack.hidden.weight)  # as the data holds them: the forward's own input
        X = self._stack.inputs(X).detach()
        # Every callback checks the model itself, whichever others run and whatever the loader's order, and again
        # at every step it acts at (due_step)
        self._checked, self._checked_shaped, self._stopped = X[:8], shaped, False
        try:  # later checks give the forward only the samples it took (a failed first try costs a forward each step)
            self._checked_shaped = self._stack.check_forward(trainer.lightning_module, X, shaped=shaped,
                                                             warn=rank_zero_warn)
        except ValueError as err:
            if self.last_step < 0:  # a new run: refused before it trains
                raise
            self._stop(trainer.global_step, err)  # a resumed run whose model had stopped being its stack: said again
        return X, Y

    # ------------------------------------------------------------------- hooks
    def reset(self) -> None:
        """Forget an earlier run: called when the callback starts fitting with another trainer than the last one (a
        resumed run's checkpoint, or the state this callback had when it last fitted with that trainer, is restored
        afterwards). Subclasses with state of their own extend it."""
        self.last_step = -1
        self._checked, self._stopped = None, False

    def warn_once(self, message: str) -> None:
        """``rank_zero_warn`` once per kind of message (its numbers aside) and fit: a condition that lasts many steps
        (non-finite weights, a solver's limit) is said once, not at every step (its status is logged at each)."""
        said = self.__dict__.setdefault("_said", set())
        # the numbers hcl writes in (the step, seconds), not an error's own (its text, where it was raised)
        kind = re.sub(r"(step|of|after|took) \d+(?:\.\d+)?(?:e[-+]?\d+)?", r"\1 #", message)
        if kind not in said:
            said.add(kind)
            rank_zero_warn(f"{message} (said once per fit)")

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return  # the callbacks watch training only
        self._said = set()  # warn_once's kinds: each fit says them again
        dashboard.wait_past_last_fit(trainer)  # before Lightning logs anything of this fit
        from hcl.convex_model import ConvexReLU  # here: the model module loads torchmetrics

        if isinstance(pl_module, ConvexReLU):
            raise ValueError(
                f"{type(self).__name__} watches a network's Linear → ReLU → Linear stack, but hcl.ConvexReLU trains "
                "the convex program itself and logs its own certificate (convex_train/*): leave the callback out "
                "(--trainer.callbacks=[] on the command line)"
            )
        self._refuse_twins(trainer)
        last = _FITTED_WITH.get(self)
        if last is not None and last() is not trainer:
            stash = _STASHED.setdefault(self, weakref.WeakKeyDictionary())
            if last() is not None:
                stash[last()] = self.state_dict()
            self.reset()  # another run: its steps start again, and nothing of the last one's history applies
            if trainer in stash:  # unless it is this trainer's, which goes on as from a checkpoint of its own
                self.load_state_dict(stash.pop(trainer))
        _FITTED_WITH[self] = weakref.ref(trainer)
        self._stack = find_relu_stack(pl_module, self.layer, self.output_layer)
        if self.probe is not None:
            self._stack.inputs(self.probe)  # width check before training
        if self.resolves_objective:
            refuse_non_squared_loss(pl_module, type(self).__name__)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.resolves_objective:
            # Here, not in setup: the optimizers (whose weight decay may be λ) exist only once the strategy set up.
            self._lambda, self._reduction = resolve_objective(pl_module, self.weight_decay, self.reduction,
                                                              type(self).__name__, trainer.optimizers, self._stack)
        self.warn_if_not_logged(trainer)
        mark_resumed_run(trainer)  # first: a marker at step 0 drops the points at step 0 written before it
        dashboard.write_layout(trainer)

    def _refuse_twins(self, trainer: "pl.Trainer") -> None:
        """Refuse another callback of this kind (this class, a subclass, its parent or a sibling: the same callback of
        hcl's underneath) that would write the same tags (same prefix, same image tag)."""
        key = (self.prefix, getattr(self, "tag", None))
        twins = [cb for cb in trainer.callbacks
                 if cb is not self and isinstance(cb, StackCallback) and _kind(cb) is _kind(self)
                 and (cb.prefix, getattr(cb, "tag", None)) == key]
        if twins:
            name = type(self).__name__
            fix = "give each its own prefix=" if self.prefix is not None else (
                "give each its own tag=" if hasattr(self, "tag") else "keep one")
            which = "" if self.prefix is None else f" (prefix {self.prefix!r})"
            raise ValueError(f"{len(twins) + 1} {name} callbacks would log under the same tags{which}, mixing their "
                             f"values: {fix}")

    def warn_if_not_logged(self, trainer: "pl.Trainer") -> None:
        """Warn when the trainer has no logger to record this callback's values (subclasses say what else is kept)."""
        warn_if_no_logger(trainer, type(self).__name__)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        # Here, not in on_train_batch_end (which subclasses override): the step's values are logged, not yet written.
        if trainer.is_global_zero and trainer._logger_connector.should_update_logs:
            logged = trainer.callback_metrics
            mirrored = {tag: logged[tag] for tag in objective_tags(pl_module) if tag in logged}
            # the model's own `step` value is the step its values are written at, else Lightning's log step
            step = int(logged["step"]) if "step" in logged else trainer.fit_loop.epoch_loop._batches_that_stepped
            # after the first batch: a `step` the model logs at the end of its training_step is in the metrics by then
            if ("step" not in logged and step != trainer.global_step and step >= 1
                    and not pl_module.automatic_optimization):
                data._say_once(trainer, "the model's self.log values are written at Lightning's batch count, the "
                               "callbacks' at trainer.global_step (the optimizer steps of manual optimization): on a "
                               "chart they are shifted; log self.log('step', float(self.global_step)) in "
                               "training_step to write both at the global step", rank_zero_warn)
            # flushed as Lightning saves its loggers at each logged step; once, by the callback that wrote
            dashboard.flush_series(trainer, dashboard.mirror_series(trainer, mirrored, step))

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        dashboard.close_series(trainer)  # after on_train_end, where the last asynchronous values are logged

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.raised_in_me(exception):  # its step cut short: another fit of this trainer takes it again
            self.last_step = min(self.last_step, self.finished_step())
        flush_loggers(trainer)  # what was logged before the failure stays on disk
        # on_fit_end, which closes them otherwise, does not run after a failure; the last stack callback closes them,
        # after the others have logged what their solves had finished
        if self is [c for c in trainer.callbacks if isinstance(c, StackCallback)][-1]:
            try:
                dashboard.close_series(trainer)
            except Exception as err:  # noqa: BLE001 - the run's own error is the one to raise (a log dir deleted)
                rank_zero_warn(f"{type(self).__name__}: could not close the chart series: {err}")

    def raised_in_me(self, exception: BaseException) -> bool:
        """Whether ``exception`` came from inside this callback's own code at a training step (a Ctrl-C in its solve,
        say), not at the end of training (whose step it has drawn or logged already)."""
        mine, frame = [], exception.__traceback__
        while frame is not None:
            if frame.tb_frame.f_locals.get("self") is self:
                mine.append(frame.tb_frame.f_code.co_name)
            frame = frame.tb_next
        return bool(mine) and "on_train_end" not in mine

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": min(self.last_step, self.finished_step())}

    def finished_step(self) -> int:
        """The last step the trainer finished: a checkpoint written inside a step (``OnExceptionCheckpoint``) records
        its step as not done, for the resumed run to take again (the callbacks act at its start)."""
        fitted = _FITTED_WITH.get(self)
        trainer = None if fitted is None else fitted()
        if trainer is None or getattr(self, "changed_weights_at", None) == self.last_step:
            return self.last_step  # it changed the model's weights at that step: taking it again would see its own
        return min(self.last_step, trainer.global_step - 1)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]


def _kind(callback: StackCallback) -> type:
    """The class just below :class:`StackCallback` in ``callback``'s: what it logs (``ConvexGapMonitor`` for every
    subclass of it)."""
    mro = type(callback).__mro__
    return mro[max(mro.index(StackCallback) - 1, 0)]


def objective_tags(pl_module: "pl.LightningModule") -> list[str]:
    """The model's own objective tag for the charts (``objective_tag``, as hcl's models declare), else none.

    A user's model that never logs ``train/objective`` would otherwise get a chart series with no data.
    """
    tag = getattr(pl_module, "objective_tag", None)
    return [tag] if isinstance(tag, str) and tag else []


def _key_fields(key: object, name: str) -> dict | None:
    """The fields of a state key ``name{...}`` (:meth:`Callback._generate_state_key`), or ``None`` for another's."""
    if not isinstance(key, str) or not key.startswith(name + "{"):
        return None
    try:
        fields = ast.literal_eval(key[len(name):])
    except (ValueError, SyntaxError):
        return None
    return fields if isinstance(fields, dict) else None
