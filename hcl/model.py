"""The two-layer ReLU network whose training hcl watches.

``f(x) = Σ_i relu(w_i·x + b_i) α_i (+ b₀)``, trained on the objective of ``docs/convex.md``::

    L(W, α) = s · Σ_j ‖f(x_j) − y_j‖² + λ Σ_i (‖w̃_i‖² + ‖α_i‖²)

``s = 1`` for reduction ``"sum"`` and ``1/n`` for ``"mean"``; ``w̃_i = [w_i, b_i]`` when the first layer
has a bias; the output bias ``b₀`` is not penalised. ``λ`` (``weight_decay``) is added to the loss
explicitly, never through the optimizer it configures; a coupled weight decay given to another optimizer
(``hcl.fit --optimizer.weight_decay``) adds the ``λ`` it amounts to (``docs/convex.md``) to the logged penalty, so the
logged ``train/objective`` is exactly the ``L`` trained, the one the callbacks evaluate. With ``"sum"`` on mini-batches
a batch's data sum weighs the number of batches of an epoch: a step's loss estimates ``L``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from hcl.callbacks.logs import mark_resumed_run
from hcl.checks import cast_to_checkpoint, check_bool, check_classes, check_reduction, check_weight_decay, is_int
from hcl.convex.problem import data_scale
from hcl.evaluation import STEPS_DONE, EvaluationLog, at_least_float32, run_key
from hcl.network import ReLUStack

OPTIMIZERS = ("sgd", "momentum", "adam", "adagrad")
MOMENTUM = 0.9  # the default of optimizer="momentum"
INITS = ("uniform", "normal", "kaiming")
LOSSES = ("squared", "cross_entropy")


class TwoLayerReLU(EvaluationLog, pl.LightningModule):
    """A two-layer ReLU network ``Linear → ReLU → Linear`` trained on the objective ``L`` of ``docs/convex.md``.

    Logged keys (every training step): ``train/data_loss`` (``s Σ‖f(x) − y‖²``, or ``s Σ`` cross-entropy),
    ``train/penalty`` (``λ Σ (‖w̃‖² + ‖α‖²)``), ``train/objective`` (their sum), and ``train/acc`` for
    classification. Validation and test steps log the same under ``val/`` and ``test/``.

    Under DDP with sharded training data the loss each rank differentiates is scaled so that the averaged
    gradient is the gradient of the global objective (``n`` and the data sum are summed over ranks), and the
    logged training values are the global ones: full-batch gradient descent on two processes follows the same
    path as on one, for both reductions; also with unsharded training data (an hcl data module's ``shard=False``),
    where the union of the ranks' batches holds every point once per rank and is weighted accordingly.
    Validation and test values are over the whole set, every rank's part once (:mod:`hcl.evaluation`).

    Args:
        in_features: input dimension ``d`` (inputs are flattened).
        hidden: number of hidden neurons ``m``.
        out_features: ``1`` for regression, ``c`` for ``c``-class classification.
        bias: first-layer bias (a column of ones in the folded data), part of the penalty.
        output_bias: unpenalised output bias.
        reduction: ``"sum"`` (``s = 1``) or ``"mean"`` (``s = 1/n``).
        weight_decay: ``λ ≥ 0``.
        loss: ``"squared"`` (on one-hot targets for classification: the convex formulation's loss) or
            ``"cross_entropy"`` (classification only).
        optimizer: ``"sgd"`` (plain gradient descent, the default), ``"momentum"``, ``"adam"`` or ``"adagrad"`` (the
            last two are refused in float16, ``precision="16-true"``, where their ``eps`` is 0).
        lr: learning rate.
        momentum: momentum of ``"momentum"``.
        init: ``"uniform"`` (torch's default), ``"normal"`` (``N(0, 1/fan_in)`` for both layers) or
            ``"kaiming"`` (He normal for the hidden layer, ``N(0, 1/m)`` for the output layer).
        init_scale: factor applied to every initial weight and bias (``1e-6`` to ``1e2`` and beyond).
        hidden_weight: optional explicit initial hidden weight, ``m × in_features`` (``init_scale`` not applied).
        hidden_bias_init: optional explicit initial hidden bias, length ``m``.
        output_weight: optional explicit initial output weight, ``out_features × m``.

    Raises:
        ValueError: on a non-positive size, an unknown option, ``λ < 0``, a non-positive learning rate or
            init scale, or explicit weights of the wrong shape.
    """

    #: the tag of the objective it logs, which the callbacks' charts draw beside the convex values
    objective_tag = "train/objective"

    def __init__(
        self,
        in_features: int = 10,
        hidden: int = 20,
        out_features: int = 1,
        bias: bool = False,
        output_bias: bool = False,
        reduction: Literal["sum", "mean"] = "mean",
        weight_decay: float = 0.0,
        loss: Literal["squared", "cross_entropy"] = "squared",
        optimizer: Literal["sgd", "momentum", "adam", "adagrad"] = "sgd",
        lr: float = 0.05,
        momentum: float = MOMENTUM,
        init: Literal["uniform", "normal", "kaiming"] = "uniform",
        init_scale: float = 1.0,
        hidden_weight: list[list[float]] | None = None,
        hidden_bias_init: list[float] | None = None,
        output_weight: list[list[float]] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden", hidden), ("out_features", out_features)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_bool(bias, "bias")
        check_bool(output_bias, "output_bias")
        check_reduction(reduction)
        _check_choice("loss", loss, LOSSES)
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("init", init, INITS)
        check_weight_decay(weight_decay)
        for name, value in (("lr", lr), ("init_scale", init_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        # the others would silently ignore it (0: none; the default: saved by every earlier checkpoint)
        if momentum not in (0, MOMENTUM) and optimizer != "momentum":
            raise ValueError(f"momentum applies to optimizer='momentum' only, got momentum={momentum!r} with "
                             f"{optimizer!r}")
        if loss == "cross_entropy" and out_features < 2:
            raise ValueError("loss='cross_entropy' needs out_features ≥ 2 (classification)")
        self.save_hyperparameters()

        self.hidden_layer = nn.Linear(in_features, hidden, bias=bias)
        self.output_layer = nn.Linear(hidden, out_features, bias=output_bias)
        self.weight_decay = float(weight_decay)
        self.optimizer_decay = 0.0  # the λ of its optimizer's own weight decay, found when training starts
        self._window = None  # the training values of the optimizer step under way, summed over its micro-batches
        self._started_for: tuple | None = None  # the run _start_training began (hcl.evaluation.run_key)
        self._own_loss_ran, self._told_own_loss = False, False  # a subclass's training_step may compute another
        # the ranks holding each training point: all with the same data read whole on each, else one (sharded);
        # set when training starts (hcl.callbacks.data.training_copies)
        self._data_copies = 1
        self.reduction = reduction
        self._initialise(init, init_scale, hidden_weight, hidden_bias_init, output_weight)
        if out_features > 1:
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)
            self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)

    # ----------------------------------------------------------------- model
    def forward(self, x: Tensor) -> Tensor:
        # inputs in the parameters' precision (as ConvexReLU): float64 data with --trainer.precision=32-true or a
        # mixed precision would otherwise stop at a dtype mismatch inside the first layer
        x = x.reshape(x.shape[0], -1).to(self.hidden_layer.weight.dtype)
        return self.output_layer(torch.relu(self.hidden_layer(x)))

    def penalty(self) -> Tensor:
        """``λ Σ_i (‖w̃_i‖² + ‖α_i‖²)``, the ``λ`` the loss adds (``weight_decay``); the output bias is not penalised.
        What the loss and the callbacks use, not a hook: they compute it from ``weight_decay`` themselves (the convex
        reformulation holds for this penalty only)."""
        return self.weight_decay * self._squares()

    def evaluation_penalty(self) -> Tensor:
        """The penalty logged with the validation and test values: the loss's ``λ`` and an optimizer's decay."""
        return (self.weight_decay + self.optimizer_decay) * self._squares()

    def _squares(self) -> Tensor:
        squares = at_least_float32(self.hidden_layer.weight).square().sum()
        squares = squares + at_least_float32(self.output_layer.weight).square().sum()
        if self.hidden_layer.bias is not None:
            squares = squares + at_least_float32(self.hidden_layer.bias).square().sum()
        return squares

    def data_loss_sum(self, output: Tensor, target: Tensor) -> Tensor:
        """``Σ_j ‖f(x_j) − y_j‖²`` (or the summed cross-entropy), before the scale ``s``; summed in float32 at least (a
        half-precision sum of thousands of terms is off by 0.2 % and more)."""
        output = at_least_float32(output)
        if self.hparams.loss == "cross_entropy":
            if target.is_floating_point() and target.ndim == 2:
                return F.cross_entropy(output, target, reduction="sum")
            return F.cross_entropy(output, target.long().reshape(-1), reduction="sum")
        return (output - self._as_output(target, output)).square().sum()

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        """``L`` on ``(x, y)`` on this process (no cross-rank reduction)."""
        out = self(x)
        lam = self.weight_decay + self.optimizer_decay
        return data_scale(self.reduction, x.shape[0]) * self.data_loss_sum(out, y) + lam * self._squares()

    # -------------------------------------------------------------- training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", batch_idx)

    def on_train_start(self) -> None:
        self._start_training()

    def _start_training(self) -> None:
        """hcl's start of a training run (from ``on_train_start``, or at the first training step of a subclass whose
        ``on_train_start`` does not call ``super()``)."""
        self._started_for = run_key(self.trainer)
        self._own_loss_ran = False
        self._window = None
        # a resumed run re-logs the steps after its checkpoint: the restart marker keeps each step once in TensorBoard
        mark_resumed_run(self.trainer)
        self.relog_evaluation()  # the checkpoint step's validation, which the restart marker dropped
        # a weight decay given to the optimizer (hcl.fit --optimizer.weight_decay) is part of the objective trained:
        # logged in L as the callbacks count it (docs/convex.md#weight-decay-in-the-optimizer); none it cannot name
        from hcl.callbacks.base import optimizer_lambda  # not at import: hcl.callbacks.base loads late
        from hcl.callbacks.data import training_copies, warn_if_ddp_changes_samples

        warn_if_ddp_changes_samples(self.trainer)  # DDP repeating samples (L would count them twice) or dropping some
        if self.reduction == "sum":  # (a collective, on every rank; a mean counts the copies in n too)
            self._data_copies = training_copies(self.trainer)
            if training_batches(self.trainer) is None:
                rank_zero_warn("TwoLayerReLU(reduction='sum'): the training loader does not tell its batches an "
                               "epoch (no length): with several, each batch's sum is not scaled to the whole set, so "
                               "train/objective is one batch's and each step weighs λ against one batch; use a dataset "
                               "with a length, or reduction='mean'")
        check_classes(self.trainer, self)

        stack = ReLUStack(self.hidden_layer, self.output_layer, "hidden_layer")
        self.optimizer_decay = optimizer_lambda(self.trainer.optimizers, stack)[0] or 0.0  # the loss estimates L

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # a subclass's training_step of its own, told at the first batch it trained on ({} or None: one skipped)
        skipped = outputs is None or (isinstance(outputs, dict) and not outputs)
        if not skipped and not self._own_loss_ran and not self._told_own_loss:
            self._told_own_loss = True
            rank_zero_warn(f"{type(self).__name__}'s training step does not compute TwoLayerReLU's loss: the callbacks "
                           "evaluate TwoLayerReLU's objective all the same (its reduction and weight_decay); with a "
                           "loss of your own summed over each of B mini-batches that adds the penalty at every step, "
                           "pass weight_decay=B·λ to them (docs/convex.md#weight-decay-in-the-optimizer)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None:  # a resume: a float64 run's weights load exactly (load_from_checkpoint: as ever)
            cast_to_checkpoint(self, checkpoint)
        self.restore_evaluation(checkpoint)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # λ lives in the loss; the optimizers never get a weight_decay of their own.
        name, lr = self.hparams.optimizer, self.hparams.lr
        if name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.0)
        if name == "momentum":
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=self.hparams.momentum)
        if self.hidden_layer.weight.dtype == torch.float16:  # their eps (1e-8, 1e-10) is 0 in float16: 0/0 at step 1
            raise ValueError(f"TwoLayerReLU: {name} in float16 (precision 16-true) gives NaN from its first step; use "
                             "precision 16-mixed or bf16-true, or optimizer sgd or momentum")
        if name == "adam":
            return torch.optim.Adam(self.parameters(), lr=lr)
        return torch.optim.Adagrad(self.parameters(), lr=lr)

    # --------------------------------------------------------------- helpers
    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int = 0) -> Tensor:
        trainer = self._trainer  # (None when a step is called by hand)
        if stage == "train" and trainer is not None and self._started_for != run_key(trainer):
            self._start_training()  # a subclass's on_train_start without super(): the optimizer's decay, the checks
        self._own_loss_ran = self._own_loss_ran or stage == "train"
        x, y = batch
        out = self(x)
        local_sum = self.data_loss_sum(out, y)
        squares = self._squares()
        penalty = self.weight_decay * squares  # the loss's; the logged one adds the optimizer's decay
        logged_penalty = (self.weight_decay + self.optimizer_decay) * squares.detach()
        world = self.trainer.world_size if self._trainer is not None else 1
        on_step = stage == "train"
        counts = None  # training: the samples classified right and counted, over every rank
        if world > 1 and stage == "train":
            # Each rank holds a disjoint shard of the training set. L is taken over all of them: n and the data sum
            # are summed over ranks, and since DDP averages the ranks' gradients, each rank differentiates
            # `world · s · (its data sum) + penalty`, whose average is the gradient of L (the penalty's gradient is
            # the same on every rank). Every rank logs the same global values. (Unsharded, "mean" needs nothing more:
            # n counts each point once per rank too; "sum" divides by the copies.)
            n_total = self.all_gather(torch.tensor(float(x.shape[0]), dtype=_counts_dtype(out), device=out.device))
            n_total = n_total.sum()
            scale = self._summed_batches() / self._data_copies if self.reduction == "sum" else 1.0 / n_total
            data_loss = scale * self.all_gather(local_sum.detach()).sum()
            loss = world * scale * local_sum + penalty
            if self.hparams.out_features > 1:
                counts = (self.all_gather(self._correct(out, y)).sum(), n_total)
        else:
            weight = self._summed_batches() if stage == "train" and self.reduction == "sum" else 1.0
            data_loss = weight * data_scale(self.reduction, x.shape[0]) * local_sum
            loss = data_loss + penalty
            if on_step and self.hparams.out_features > 1:
                counts = (self._correct(out, y), torch.tensor(x.shape[0], device=out.device))
        rows = x.shape[0]
        if not on_step:  # validation and test: over the whole set, logged at the stage's end (hcl.evaluation)
            rows = self.evaluation_rows(stage, batch_idx, x.shape[0])
            part = local_sum if rows == x.shape[0] else self.data_loss_sum(out[:rows], y[:rows])
            self.accumulate(stage, part, rows)
        else:
            # Training values are logged at the global step, like hcl's callbacks. Lightning's own log step is one
            # ahead after resuming from an end-of-epoch checkpoint (every checkpoint of full-batch training), which
            # would leave a hole in the series and shift it against the callbacks'.
            self.log("step", float(self.global_step), on_step=True, on_epoch=False)
            self.log(STEPS_DONE, self.global_step + 1.0, on_step=True, on_epoch=False, logger=False)  # hcl.fit's
            self.log("epoch", float(self.current_epoch), on_step=True, on_epoch=False)  # carried back after ddp_spawn
            data_loss, logged_penalty, counts = self._step_means(data_loss.detach(), logged_penalty, counts)
            self.log(f"{stage}/data_loss", data_loss, on_step=True, on_epoch=False)
            self.log(f"{stage}/penalty", logged_penalty, on_step=True, on_epoch=False)
            self.log(f"{stage}/objective", data_loss.detach() + logged_penalty, on_step=True, on_epoch=False,
                     prog_bar=True)
        if counts is not None:
            self.log(f"{stage}/acc", counts[0].to(_counts_dtype(out)) / counts[1], on_step=True, on_epoch=False)
        elif self.hparams.out_features > 1:
            metric = getattr(self, f"{stage}_acc")
            if rows:  # DDP's padding copies left out (a batch of copies only: nothing to count)
                metric(out.detach()[:rows], self._class_index(y)[:rows])
            self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _correct(self, out: Tensor, y: Tensor) -> Tensor:
        return (out.detach().argmax(dim=1) == self._class_index(y)).sum()  # an integer: bf16 counts only to 256

    def _step_means(
        self, data_loss: Tensor, penalty: Tensor, counts: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """The training values of the optimizer step so far: with ``accumulate_grad_batches = k`` the step minimises
        the mean of its ``k`` micro-batches' objectives, and Lightning logs only the last value given."""
        if self._window is None or self._window[0] != self.global_step:  # the step's first micro-batch
            self._window = (self.global_step, 0, 0.0, 0.0, 0, 0)
        _, k, data, pen, correct, rows = self._window
        k, data, pen = k + 1, data + data_loss, pen + penalty
        if counts is not None:
            counts = correct, rows = correct + counts[0], rows + counts[1]
        self._window = (self.global_step, k, data, pen, correct, rows)
        return data / k, pen / k, counts

    def _summed_batches(self) -> float:
        """The weight of a summed mini-batch in the training loss: the batches of an epoch, so that the loss of a
        step estimates ``L`` and the penalty it adds at every step keeps its ``λ`` (1 for full batches)."""
        return float(training_batches(self._trainer) or 1)

    @torch.no_grad()
    def _initialise(
        self,
        init: str,
        scale: float,
        hidden_weight: list[list[float]] | None,
        hidden_bias_init: list[float] | None,
        output_weight: list[list[float]] | None,
    ) -> None:
        layers = (self.hidden_layer, self.output_layer)
        if init == "normal":
            for layer in layers:
                nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
                if layer.bias is not None:
                    nn.init.normal_(layer.bias, std=1.0 / math.sqrt(layer.in_features))
        elif init == "kaiming":
            nn.init.kaiming_normal_(self.hidden_layer.weight, nonlinearity="relu")
            nn.init.normal_(self.output_layer.weight, std=1.0 / math.sqrt(self.output_layer.in_features))
            for layer in layers:
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        # "uniform" keeps torch's default initialisation.
        for p in self.parameters():
            p.mul_(scale)
        _set_explicit(self.hidden_layer.weight, hidden_weight, "hidden_weight")
        if hidden_bias_init is not None:
            if self.hidden_layer.bias is None:
                raise ValueError("hidden_bias_init given but the model has bias=False")
            _set_explicit(self.hidden_layer.bias, hidden_bias_init, "hidden_bias_init")
        _set_explicit(self.output_layer.weight, output_weight, "output_weight")


def training_batches(trainer: "pl.Trainer | None") -> int | None:
    """The training batches of an epoch; ``None`` when unknown (no trainer, or an endless loader)."""
    batches = getattr(trainer, "num_training_batches", None) if trainer is not None else None
    return int(batches) if isinstance(batches, (int, float)) and math.isfinite(batches) and batches >= 1 else None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _set_explicit(param: Tensor, values: list | None, name: str) -> None:
    if values is None:
        return
    tensor = torch.as_tensor(values, dtype=param.dtype)
    if tensor.shape != param.shape:
        raise ValueError(f"{name} must have shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf")
    param.copy_(tensor)


def _counts_dtype(like: Tensor) -> torch.dtype:
    """Float32 at least for sample counts and their ratios: an integer ratio takes the default dtype, bfloat16 under
    precision bf16-true, where counts above 256 round; float64 in a float64 run."""
    return torch.promote_types(torch.float32, like.dtype)
