"""``ConvexReLU``: a LightningModule that trains the convex reformulation of a two-layer network itself.

The math (patterns of fixed gates, predictions, the group prox, the certificate) lives in :mod:`hcl.convex.gated`;
this module holds the parameters, the training step, the metrics and the logging. See ``docs/convex_training.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from hcl.callbacks.data import training_data, warn_if_ddp_changes_samples
from hcl.callbacks.logs import log_scalars, mark_resumed_run
from hcl.checks import (
    cast_to_checkpoint,
    check_classes,
    check_reduction,
    check_seed,
    check_weight_decay,
    is_int,
    warn_about_training_setup,
    warn_if_schedulers_idle,
)
from hcl.convex.gated import (
    CHUNK_BYTES,
    VARIANTS,
    block_outputs,
    certify,
    distributed_reduce,
    gate_mask,
    gate_weights,
    gates_from_weights,
    group_norms,
    group_soft_threshold_,
    sample_gates,
)
from hcl.convex.native.memory import DEFAULT_MEMORY_FRACTION, free_memory
from hcl.convex.problem import float64_device, fold_bias
from hcl.evaluation import STEPS_DONE, EvaluationLog, at_least_float32, run_key

OPTIMIZERS = ("sgd", "adam")
# The certificate's accumulators (a few float64 copies of d̃ × P × c) above this, or above half the free memory, are
# not built; see docs/convex_training.md#the-certificate
MAX_CERTIFICATE_BYTES = 8 * 2**30
# A training objective this many times its first value says the run diverges; looked at every GROWTH_EVERY steps
GROWTH = 1e3
GROWTH_EVERY = 10


class ConvexReLU(EvaluationLog, pl.LightningModule):
    """The convex program of a two-layer (gated) ReLU network on ``P`` fixed gates, trained by proximal steps.

    Gates ``g_i`` (columns of a ``(d̃, P)`` buffer, ``d̃ = d + 1`` with ``bias``) are sampled ``N(0, I)`` from
    ``gate_seed`` or taken from a network (``gates``); a sample's patterns are ``D_i(x) = 1[x̃·g_i ≥ 0]``, computed
    on each batch, so mini-batches and DDP sharding need nothing precomputed. The objective (``docs/convex.md``)::

        "gated":  s Σ_j ‖Σ_i D_i(x_j) x̃_j·Z_i + b₀ − y_j‖² + 2λ Σ_i ‖Z_i‖_F
        "relu":   s Σ_j ‖Σ_i D_i(x_j) x̃_j·(U_i − V_i) + b₀ − y_j‖² + 2λ Σ_i (‖U_i‖_F + ‖V_i‖_F)
                  s.t. (2D_i − I) X̃ U_i ≥ 0, (2D_i − I) X̃ V_i ≥ 0

    with ``s = 1/n`` (``"mean"``) or ``1`` (``"sum"``) and one-hot targets for classification (the squared loss of
    ``TwoLayerReLU``). The ReLU variant's cones are enforced by the penalty ``ρ s Σ ‖relu(−(2D_i − I) X̃ U_i)‖²``
    (and the same for ``V``) added to the smooth part; the penalty's gradient gives the certificate's multipliers.

    **The step** (one solver iteration per training step, manual optimisation): the gradient of the smooth part on
    the batch by autograd, a step of the torch optimizer (``"sgd"``: proximal gradient, with optional momentum;
    ``"adam"``: Adam's step), then the group soft-threshold prox with threshold ``lr · 2λ`` on every ``Z_i``
    (``U_i``, ``V_i``). With ``"sgd"``, no momentum, the full batch and ``lr ≤ 1/L`` this is the proximal gradient
    method and converges to the optimum; with Adam the prox is applied in the plain metric, a heuristic that works
    well on mini-batches. The output bias is not penalised. Under DDP each rank differentiates
    ``world · s · (its data sum)`` so that DDP's averaged gradient is the gradient of the global objective (``n`` is
    summed over ranks), and every rank applies the same prox: two processes follow the one-process path.

    **What predicts** is the mapped network of ``docs/convex.md#maps``: the gated network itself for ``"gated"``,
    the ReLU network ``Σ_i relu(x̃·U_i) − relu(x̃·V_i)`` for ``"relu"`` (equal to the convex prediction where the
    cones hold).

    **Logged keys**: every training step ``train/data_loss`` (``s Σ‖f(x) − y‖²`` of the mapped network on the
    batch), ``train/penalty`` (``2λ Σ`` group norms), ``train/objective`` (their sum), ``train/acc`` for
    classification, and ``train/cone_violation`` (``"relu"``: the largest violation on the batch); validation and
    test log the first four under ``val/`` and ``test/`` (global values under DDP, as ``TwoLayerReLU``). Every
    ``certify_every_n_steps`` steps (before the step's update) and at the end of training, on the full training set:
    ``convex_train/objective`` (the convex objective), ``convex_train/lower_bound`` (a certified lower bound on the
    problem's optimum), ``convex_train/duality_gap`` (``hcl.convex.status.relative_gap`` of the two, relative to the
    objective) and ``convex_train/violation`` (``"relu"``; the gap certifies the point only when it is 0). Once the
    objective or its variables are not finite (a diverged run), a warning says so and no certificate is logged.

    Args:
        in_features: input dimension ``d`` (inputs are flattened).
        out_features: ``1`` for regression, ``c`` for ``c``-class classification (one-hot squared loss).
        num_gates: ``P``, the number of sampled gates (ignored when ``gates`` is given).
        variant: ``"gated"`` or ``"relu"``.
        bias: fold a first-layer bias (a column of ones) into the data and the gates.
        output_bias: an unpenalised output bias ``b₀``.
        reduction: ``"sum"`` (``s = 1``) or ``"mean"`` (``s = 1/n``).
        weight_decay: ``λ ≥ 0`` of the network's objective (the group penalty is ``2λ``).
        optimizer: ``"sgd"`` or ``"adam"`` for the smooth part.
        lr: learning rate (the prox's step).
        momentum: heavy-ball momentum of ``"sgd"``.
        cone_penalty: ``ρ > 0`` of the ReLU variant's cone penalty.
        gates: ``None`` (sample), a ``(P, d)`` or ``(P, d̃)`` tensor or nested list of gates in ``nn.Linear`` layout
            (a hidden layer's weights, with its bias as a last column), or the path of a ``TwoLayerReLU`` checkpoint
            whose hidden layer gives the gates.
        gate_seed: seed of the sampled gates.
        certify_every_n_steps: certify every this many steps (and at the end of training); ``None`` or ``0`` never.

    Raises:
        ValueError: on a non-positive size, an unknown option, ``λ < 0``, a non-positive ``lr`` or ``cone_penalty``,
            a momentum outside ``[0, 1)`` or with ``"adam"``, or gates of the wrong width.
        FileNotFoundError: when ``gates`` names a missing checkpoint.
    """

    #: the tag of the objective it logs, which the callbacks' charts draw beside the convex values
    objective_tag = "train/objective"

    def __init__(
        self,
        in_features: int = 10,
        out_features: int = 1,
        num_gates: int = 100,
        variant: Literal["gated", "relu"] = "gated",
        bias: bool = True,
        output_bias: bool = False,
        reduction: Literal["sum", "mean"] = "mean",
        weight_decay: float = 1e-3,
        optimizer: Literal["sgd", "adam"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        cone_penalty: float = 10.0,
        gates: str | list[list[float]] | None = None,
        gate_seed: int = 0,
        certify_every_n_steps: int | None = 100,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_gates", num_gates)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value, choices in (("variant", variant, VARIANTS), ("optimizer", optimizer, OPTIMIZERS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        check_reduction(reduction)
        check_weight_decay(weight_decay)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(bias, bool) and isinstance(output_bias, bool)):  # "no" would read as True
            raise ValueError(f"bias and output_bias must be bools, got {bias!r} and {output_bias!r}")
        check_seed(gate_seed, "gate_seed")
        if not is_int(gate_seed):  # saved in the checkpoint's hparams, where numpy's integer is unloadable
            raise TypeError(f"gate_seed must be an integer, got {gate_seed!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if momentum and optimizer != "sgd":  # Adam would silently ignore it
            raise ValueError(f"momentum applies to optimizer='sgd' only, got momentum={momentum!r} with {optimizer!r}")
        if (isinstance(cone_penalty, bool) or not isinstance(cone_penalty, (int, float))
                or not math.isfinite(cone_penalty) or cone_penalty <= 0):
            raise ValueError(f"cone_penalty must be a positive number, got {cone_penalty!r}")
        if certify_every_n_steps is not None and (not is_int(certify_every_n_steps) or certify_every_n_steps < 0):
            raise ValueError(f"certify_every_n_steps must be None or an integer ≥ 0, got {certify_every_n_steps!r}")
        folded = in_features + int(bias)
        if gates is None:
            gate_matrix = sample_gates(folded, num_gates, gate_seed)
        else:
            gate_matrix = gates_from_weights(*gate_weights(gates), folded).to(torch.float32)
        # The gates are the model's state, not its hyperparameters: a checkpoint restores them as a buffer.
        self.save_hyperparameters(ignore=["gates"])
        self.save_hyperparameters({"num_gates": gate_matrix.shape[1]})  # the gates' count, in what the loggers record
        self.automatic_optimization = False
        self.register_buffer("gates", gate_matrix)
        shape = (folded, gate_matrix.shape[1], out_features)
        self.U = nn.Parameter(torch.zeros(shape))
        self.V = nn.Parameter(torch.zeros(shape)) if variant == "relu" else None
        self.b0 = nn.Parameter(torch.zeros(out_features)) if output_bias else None
        self.weight_decay = float(weight_decay)
        self.reduction = reduction
        self._train_data: tuple | None = None  # (the fit's run_key, X, Y)
        self._certified_step, self._first_objective = None, None  # (also for an on_train_start without super())
        self._warned_nonfinite = self._warned_outside = self._warned_growth = self._warned_skipped = False
        if out_features > 1:
            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)
            self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)

    # ----------------------------------------------------------------- model
    def fold(self, x: Tensor) -> Tensor:
        """``X̃``: flattened inputs with the bias column when ``bias``, in the parameters' dtype."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.hparams.in_features:
            raise ValueError(f"ConvexReLU(in_features={self.hparams.in_features}) got inputs of {flat.shape[1]} "
                             "features: set in_features to the data's")
        return fold_bias(flat.to(self.U.dtype), self.hparams.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The mapped network's output ``(n, c)`` (the gated network, or the ReLU network of ``U``, ``V``)."""
        return self._outputs(self.fold(x))[1]

    def penalty(self) -> Tensor:
        """``2λ Σ_i ‖Z_i‖_F`` (``2λ Σ_i (‖U_i‖_F + ‖V_i‖_F)``); the output bias is not penalised."""
        norms = group_norms(at_least_float32(self.U)).sum()
        if self.V is not None:
            norms = norms + group_norms(at_least_float32(self.V)).sum()
        return 2.0 * self.weight_decay * norms

    def _outputs(self, Xf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(convex prediction, mapped network's prediction, cone violations (n, P, c) or an empty tensor)``."""
        D = gate_mask(Xf, self.gates)
        mask = D.to(Xf.dtype).unsqueeze(-1)
        blocks_u = block_outputs(Xf, self.U)
        if self.V is None:
            convex = mapped = (blocks_u * mask).sum(1)
            violation = Xf.new_zeros(0)
        else:
            blocks_v = block_outputs(Xf, self.V)
            convex = ((blocks_u - blocks_v) * mask).sum(1)
            mapped = torch.relu(blocks_u).sum(1) - torch.relu(blocks_v).sum(1)
            sign = 2.0 * mask - 1.0
            violation = torch.cat([torch.relu(-sign * blocks_u), torch.relu(-sign * blocks_v)], dim=1)
        if self.b0 is not None:
            convex, mapped = convex + self.b0, mapped + self.b0
        return convex, mapped, violation

    # -------------------------------------------------------------- training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # λ lives in the prox; the optimizers never get a weight_decay of their own.
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        if self.U.dtype == torch.float16:  # its eps = 1e-8 is 0 in float16: 0/0 at every coordinate without gradient
            raise ValueError("ConvexReLU: Adam in float16 (precision 16-true) gives NaN from its first step; use "
                             "precision 16-mixed or bf16-true, or optimizer sgd")
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        step = self.global_step
        Xf = self.fold(x)
        Y = self._as_output(y, Xf)
        convex, mapped, violation = self._outputs(Xf)
        local_sum = (convex - Y).square().sum()
        if self.V is not None:
            local_sum = local_sum + self.hparams.cone_penalty * violation.square().sum()
        world = self.trainer.world_size
        local_n = torch.tensor(float(x.shape[0]), dtype=torch.promote_types(torch.float32, Xf.dtype), device=Xf.device)
        n_total = self.all_gather(local_n).sum() if world > 1 else local_n
        # the batch's estimate of the full objective's data term: its mean for "mean"; for "sum", its sum times n/B
        # (the batch's own sum is B/n of the full one, and the prox's full lr·2λ then solved a problem whose
        # penalty was n/B times too strong)
        scale = 1.0 / n_total
        if self.reduction == "sum":
            scale = self._training_set()[0].shape[0] / n_total
        penalty = self.penalty().detach()
        mapped_sum = (at_least_float32(mapped.detach()) - Y).square().sum()  # a bf16 sum of thousands is off by 0.2 %
        correct = None
        if self.hparams.out_features > 1:
            correct = (mapped.detach().argmax(dim=1) == self._class_index(y)).sum()  # an integer: bf16 counts to 256
        if world > 1:
            # DDP averages the ranks' gradients: each differentiates world · s · (its sum), whose average is the
            # global objective's gradient (docs/convex_training.md#the-step); the logged values are the global ones.
            mapped_sum = self.all_gather(mapped_sum).sum()
            correct = None if correct is None else self.all_gather(correct).sum()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(world * scale * local_sum)
        optimizer.step()
        # the prox of the step each parameter just took: its group's lr (a subclass's optimizer, a scheduler)
        groups = getattr(optimizer, "optimizer", optimizer).param_groups
        for param in (self.U, self.V):
            if param is not None:
                lr = next((g["lr"] for g in groups if any(p is param for p in g["params"])), self.hparams.lr)
                group_soft_threshold_(param.data, float(lr) * 2.0 * self.weight_decay)

        data_loss = scale * mapped_sum
        self.log("step", float(step), on_step=True, on_epoch=False)
        self.log(STEPS_DONE, step + 1.0, on_step=True, on_epoch=False, logger=False)  # hcl.fit carries it back
        self.log("epoch", float(self.current_epoch), on_step=True, on_epoch=False)  # carried back after ddp_spawn
        self.log("train/data_loss", data_loss, on_step=True, on_epoch=False)
        self.log("train/penalty", penalty, on_step=True, on_epoch=False)
        self.log("train/objective", data_loss + penalty, on_step=True, on_epoch=False, prog_bar=True)
        if self.V is not None:
            worst = violation.detach().amax() if violation.numel() else Xf.new_zeros(())
            if world > 1:
                worst = self.all_gather(worst).amax()
            self.log("train/cone_violation", worst + 0.0, on_step=True, on_epoch=False)
        if correct is not None:
            self.log("train/acc", correct / n_total, on_step=True, on_epoch=False)
        return (data_loss + penalty).detach()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int) -> None:
        x, y = batch
        Xf = self.fold(x)
        out = self._outputs(Xf)[1]
        rows = self.evaluation_rows(stage, batch_idx, x.shape[0])  # over the whole set (hcl.evaluation)
        self.accumulate(stage, (at_least_float32(out) - self._as_output(y, Xf))[:rows].square().sum(), rows)
        if self.hparams.out_features > 1:
            metric = getattr(self, f"{stage}_acc")
            if rows:  # DDP's padding copies left out (a batch of copies only: nothing to count)
                metric(out[:rows], self._class_index(y)[:rows])
            self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)

    # ----------------------------------------------------------- certificate
    def on_train_start(self) -> None:
        # a resumed run certifies (and logs) its first step again: the restart marker keeps each step once
        mark_resumed_run(self.trainer)
        self.relog_evaluation()  # the checkpoint step's validation, which the restart marker dropped
        warn_if_ddp_changes_samples(self.trainer)  # DDP repeating or dropping samples: said
        check_classes(self.trainer, self)
        self._train_data = None
        self._certified_step, self._first_objective = None, None
        self._warned_nonfinite = self._warned_growth = self._warned_outside = self._warned_skipped = False
        warn_about_training_setup(self.trainer, self.reduction)  # a subclass's optimizer, reloaded loaders

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None:  # a resume: a float64 run's weights load exactly (load_from_checkpoint: as ever)
            cast_to_checkpoint(self, checkpoint)
        self.restore_evaluation(checkpoint)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step % GROWTH_EVERY == 1:  # (a device sync: not every step)
            self._watch_growth()
        every = self.hparams.certify_every_n_steps
        if every and self.global_step % every == 0:
            self.certify_and_log()

    def on_train_end(self) -> None:
        warn_if_schedulers_idle(self.trainer)
        # the final point, unless this step was just certified (training stopped before updating it)
        if self.hparams.certify_every_n_steps and self._certified_step != self.global_step:
            self.certify_and_log()
        else:
            self._finite()  # a diverged run is said even without certificates

    def _watch_growth(self) -> None:
        """Warn once when the training objective has grown ``GROWTH`` times past its first value: a step too large
        diverges through finite values for a while (1.2 → 1.9e9 in ten steps), which :meth:`_finite` does not see."""
        value = self.trainer.callback_metrics.get("train/objective")
        if value is None or self._warned_growth or self._warned_nonfinite:
            return
        value = float(value)
        if self._first_objective is None:
            self._first_objective = value
        elif value > GROWTH * max(self._first_objective, 1e-12):
            self._warned_growth = True
            rank_zero_warn(f"ConvexReLU: the training objective grew from {self._first_objective:.4g} to {value:.4g} "
                           f"by step {self.global_step}: training is diverging (optimizer {self.hparams.optimizer!r}, "
                           f"lr {self.hparams.lr:g}; a smaller lr)")

    def _finite(self, *values: float) -> bool:
        """Whether the program's variables (and ``values`` computed from them) are finite; the first time they are
        not, a warning says so."""
        variables = (t for t in (self.U, self.V, self.b0) if t is not None)
        # a value past float32's range is logged (TensorBoard stores float32) as inf
        largest = torch.finfo(torch.float32).max
        if all(abs(v) <= largest for v in values) and all(bool(torch.isfinite(t).all()) for t in variables):
            return True
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(f"ConvexReLU: the objective or its variables are not finite at step {self.global_step}: "
                           f"training diverged (optimizer {self.hparams.optimizer!r}, lr {self.hparams.lr:g}; a "
                           "smaller lr, or more than 16-bit precision); no certificate is logged from here on")
        return False

    def _training_set(self) -> tuple[Tensor, Tensor]:
        """The full training set (read once per fit, as the callbacks read it: a collective under DDP)."""
        if self._train_data is None or self._train_data[0] != run_key(self.trainer):  # (also without on_train_start)
            name = type(self).__name__
            X, Y = training_data(self.trainer, owner=name, reader=f"{name}'s certificates")
            if Y is None:
                raise ValueError("the certificate needs the training targets; the training data has none")
            self._train_data = (run_key(self.trainer), X, Y)
        return self._train_data[1:]

    def certify_and_log(self) -> dict[str, float] | None:
        """Certify the current point on the full training set and log it at the current step (every rank calls it).

        Returns the logged values, or ``None`` when the certificate was skipped (with a warning): for its size, or
        because the objective or its variables are not finite.
        """
        if not self._finite():  # the same on every rank: DDP keeps the variables equal
            return None
        X, Y = self._training_set()
        d, P, c = self.U.shape
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = len(X[rank::world])  # the accumulators, a chunk's buffers and this rank's rows on the device
        needed = 8 * d * P * c * (4 if self.V is not None else 2) + min(CHUNK_BYTES, 32 * rows * P * c)
        where = float64_device(self.device)  # the certificate is float64: on the CPU where the device has none (MPS)
        needed += 0 if X.device == where else X.element_size() * rows * (X[0].numel() + Y[0].numel())
        free = free_memory(where)
        limit = min(MAX_CERTIFICATE_BYTES, int(DEFAULT_MEMORY_FRACTION * free) if free is not None else math.inf)
        skip = needed > limit
        if world > 1:  # one decision for every rank: the certificate's sums are collectives
            skip = bool(self.all_gather(torch.tensor(float(skip), device=self.device)).max())
        if skip:
            if not self._warned_skipped:  # said once per fit (the sizes stay; the free memory moves)
                self._warned_skipped = True
                warnings.warn(f"ConvexReLU: the certificate of d̃ = {d}, P = {P}, c = {c} needs {needed / 2**30:.2f} "
                              f"GiB (limit {limit / 2**30:.2f} GiB: {MAX_CERTIFICATE_BYTES / 2**30:.0f} GiB, or half "
                              "the free memory): skipped (said once per fit)", stacklevel=2)
            return None
        reduce = distributed_reduce if world > 1 and dist.is_available() and dist.is_initialized() else None
        try:
            with torch.no_grad():
                result = certify(
                    X[rank::world].to(where), Y[rank::world].to(where),
                    *(None if t is None else t.to(where) for t in (self.gates, self.U, self.V, self.b0)),
                    weight_decay=self.weight_decay, reduction=self.reduction, bias=self.hparams.bias,
                    cone_penalty=self.hparams.cone_penalty, all_reduce=reduce,
                )
        except (torch.OutOfMemoryError, RuntimeError) as error:  # no room after all: the training goes on
            if world > 1 or "memory" not in str(error).lower():  # under DDP the other ranks wait in its sums
                raise
            if not self._warned_skipped:
                self._warned_skipped = True
                warnings.warn(f"ConvexReLU: the certificate ran out of memory ({error}): skipped (said once per fit)",
                              stacklevel=2)
            return None
        if not self._finite(result.objective, result.lower_bound, result.gap, result.violation):  # overflowed
            return None
        values = {  # + 0.0: a bound of −0.0 reads 0
            "convex_train/objective": result.objective,
            "convex_train/lower_bound": result.lower_bound + 0.0,
        }
        if self.V is None or result.violation == 0.0:  # a point outside its cones may lie below the optimum
            values["convex_train/duality_gap"] = result.gap
        else:  # nor an earlier point's beside this one's values
            self.trainer.callback_metrics.pop("convex_train/duality_gap", None)
        if "convex_train/duality_gap" not in values and not self._warned_outside:
            self._warned_outside = True
            warnings.warn(f"ConvexReLU: the point is outside its cones (largest violation {result.violation:.3g}): "
                          "its objective bounds nothing, so convex_train/duality_gap is logged only at a point inside "
                          "them; convex_train/lower_bound holds", stacklevel=2)
        if self.V is not None:
            values["convex_train/violation"] = result.violation + 0.0
        if self.trainer.is_global_zero:
            log_scalars(self.trainer, values, step=self.global_step)
        self._certified_step = self.global_step
        return values

