"""How the callbacks resolve the objective ``L`` they evaluate: its loss (the squared loss only), ``λ`` (the callback's
argument, the model's attribute, an optimizer's coupled decay, scaled on summed mini-batches) and its reduction
(``docs/convex.md#weight-decay-in-the-optimizer``)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from hcl.checks import check_reduction, check_weight_decay
from hcl.network import ReLUStack, non_squared_loss


def refuse_non_squared_loss(pl_module: "pl.LightningModule", owner: str) -> None:
    """Refuse a model that trains with another loss than the squared loss (:func:`hcl.network.non_squared_loss`).

    The convex problem is that of the squared loss ``s Σ‖f(x) − y‖²``: for a model trained with cross-entropy or
    the logistic loss its values would describe another training than the one running.

    Raises:
        ValueError: naming the loss found.
    """
    loss = non_squared_loss(pl_module)
    if loss is not None:
        raise ValueError(
            f"{owner}: the model trains with {loss}, but the convex problem is that of the squared loss "
            "s·Σ‖f(x) − y‖² (docs/convex.md): its values would not describe this training. Train with the squared "
            "loss (TwoLayerReLU(loss='squared'), nn.MSELoss) to use the convex monitors; PatternMonitor and "
            "ActivationPointPlot work with any loss"
        )


# torch optimizers whose `weight_decay` adds `weight_decay · θ` to the gradient (coupled L2), unless the group says
# `decoupled_weight_decay` (Adam, NAdam, RAdam) or the optimizer is AdamW.
_COUPLED_DECAY = frozenset({"SGD", "Adam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam", "ASGD"})


def optimizer_lambda(
    optimizers: Sequence[torch.optim.Optimizer], stack: ReLUStack, batches: int = 1
) -> tuple[float | None, str]:
    """The ``λ`` equivalent to the optimizers' weight decay on the stack's penalised parameters, and what it comes from.

    Coupled L2 decay ``weight_decay = wd`` (SGD, Adam, …) adds ``wd · θ`` to the gradient of a loss of scale ``s``:
    the training minimises ``s · data + (wd / 2)‖θ‖²``, the objective with ``λ = wd / 2``. With the sum reduction
    over mini-batches, ``batches`` per epoch, each step's loss sums one batch while the decay comes at every step:
    an epoch follows ``data + batches · (wd / 2)‖θ‖²``, so ``λ = batches · wd / 2``. Decoupled decay (AdamW,
    ``decoupled_weight_decay=True``) shrinks the weights outside the gradient and no ``λ`` is equivalent; nor is one
    when the hidden and output weights decay differently. See ``docs/convex.md#weight-decay-in-the-optimizer``.

    Returns:
        ``(0.0, "")`` without decay; ``(wd / 2, description)``; ``(None, why no λ is equivalent)``.
    """
    penalised = {"hidden weight": stack.hidden.weight, "output weight": stack.output.weight}
    if stack.hidden.bias is not None:
        penalised["hidden bias"] = stack.hidden.bias
    decays: dict[str, tuple[str, float, bool]] = {}
    for name, param in penalised.items():
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    decoupled = bool(group.get("decoupled_weight_decay")) or isinstance(optimizer, torch.optim.AdamW)
                    decays[name] = (type(optimizer).__name__, float(group.get("weight_decay") or 0.0), decoupled)
    if all(wd == 0.0 for _, wd, _ in decays.values()):
        return 0.0, ""
    if len(set(decays.values())) > 1:
        parts = ", ".join(f"{name} {cls}(weight_decay={wd})" for name, (cls, wd, _) in decays.items())
        return None, f"the optimizer decays the stack's parameters differently ({parts}), which no single λ matches"
    cls, wd, decoupled = next(iter(decays.values()))
    if decoupled:
        return None, (f"{cls}'s decoupled weight_decay={wd:g} shrinks the weights outside the gradient, which no λ "
                      "of the objective matches")
    if cls not in _COUPLED_DECAY:
        return None, f"{cls}'s weight_decay={wd:g} is not a decay hcl can translate into λ"
    if batches > 1:
        return batches * wd / 2, (f"{cls}'s weight_decay={wd:g} (coupled L2 at each of {batches} steps an epoch on "
                                  "summed batches: λ = steps · weight_decay / 2)")
    return wd / 2, f"{cls}'s weight_decay={wd:g} (coupled L2: λ = weight_decay / 2)"


def epoch_batches(pl_module: "pl.LightningModule") -> int:
    """How many times a penalty added at each step outweighs the data sum over an epoch of summed mini-batch losses:
    the training batches of an epoch, times the processes under DDP, which averages the ranks' gradients; 1 for
    :class:`hcl.TwoLayerReLU`, whose loss weighs each summed batch so that it estimates ``L``, and when unknown (no
    trainer, or an endless loader)."""
    from hcl.model import TwoLayerReLU, training_batches  # here: the model module loads torchmetrics

    trainer = getattr(pl_module, "_trainer", None)
    batches = training_batches(trainer)
    if isinstance(pl_module, TwoLayerReLU) or batches is None:
        return 1
    return batches * int(getattr(trainer, "world_size", 1) or 1)


def resolve_objective(
    pl_module: "pl.LightningModule",
    weight_decay: float | None,
    reduction: str | None,
    owner: str,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    stack: ReLUStack | None = None,
) -> tuple[float, str]:
    """``(λ, reduction)`` of the objective the callbacks evaluate (``docs/convex.md``).

    ``λ``: the callback's ``weight_decay``; else the model's ``weight_decay`` attribute (the ``λ`` its loss adds,
    plus for :class:`hcl.TwoLayerReLU` the ``λ`` of a weight decay given to its optimizer); else the ``λ``
    equivalent to the weight decay of ``optimizers`` on the ``stack`` (:func:`optimizer_lambda`); else ``0``. The
    reduction: the callback's, else the model's ``reduction`` attribute, else ``"mean"``. Whatever is assumed, or a
    decay no ``λ`` matches, is said in one warning; a ``λ`` read from the optimizer in one info line.

    Raises:
        ValueError: the model's values are not a valid ``λ`` or reduction.
    """
    from hcl.model import TwoLayerReLU, training_batches  # here: the model module loads torchmetrics

    model_lam = getattr(pl_module, "weight_decay", None)
    model_red = getattr(pl_module, "reduction", None)
    # a summed loss on mini-batches: a penalty added at every step weighs `steps` times an epoch's data sum
    steps = epoch_batches(pl_module) if (reduction if reduction is not None else model_red) == "sum" else 1
    opt_lam, opt_text = (0.0, "") if optimizers is None or stack is None else optimizer_lambda(
        optimizers, stack, steps)
    said: list[str] = []  # what the warning says
    if weight_decay is not None:
        lam = weight_decay
    elif model_lam is not None:
        lam = check_weight_decay(model_lam, "the model's weight_decay (λ)") * steps
        if steps > 1 and lam > 0:
            rank_zero_info(f"{owner}: λ = {lam:g}: the model's weight_decay {model_lam:g}, added at each of {steps} "
                           "steps an epoch on summed mini-batches (docs/convex.md#weight-decay-in-the-optimizer)")
        if opt_text and opt_lam is not None and isinstance(pl_module, TwoLayerReLU):
            lam += opt_lam
            rank_zero_info(f"{owner}: λ = {lam:g}: the model's weight_decay {model_lam:g} plus {opt_text}")
        elif opt_lam is None and opt_text:
            hint = "" if isinstance(pl_module, TwoLayerReLU) else (  # whose loss adds its weight_decay
                " (pass weight_decay=0 to the callback if the model's `weight_decay` is that decay, not a λ its loss "
                "adds)")
            said.append(f"{opt_text}: the convex values use the model's λ = {lam:g} and leave that decay out{hint}")
        elif opt_text:
            said.append(f"the model's `weight_decay` = {lam:g} is used as λ, and {opt_text}: pass weight_decay= to "
                        f"the callback, {opt_lam:g} if the model's `weight_decay` is the optimizer's, "
                        f"{lam + opt_lam:g} if its loss also adds λ = {lam:g}")
    elif opt_lam is not None and opt_text:
        lam = opt_lam
        rank_zero_info(f"{owner}: λ = {lam:g}, from {opt_text}")
    else:
        lam = 0.0
        why = (f"{opt_text}: the convex values leave it out" if opt_text
               else "its optimizer applies no weight decay" if optimizers is not None else "no λ given")
        said.append(f"using λ = 0 ({why})")
    red = reduction if reduction is not None else model_red
    if (red == "sum" and weight_decay is None and lam > 0 and not isinstance(pl_module, TwoLayerReLU)
            and training_batches(getattr(pl_module, "_trainer", None)) is None):
        said.append(f"λ = {lam:g} is not scaled by the batches of an epoch, which an iterable or endless loader does "
                    "not tell: with a loss summed over each of B batches an epoch, pass weight_decay=B·λ")
    outputs = 1 if stack is None else stack.output.out_features
    if (reduction is None and red == "mean" and outputs > 1
            and any(isinstance(sub, nn.MSELoss) and sub.reduction == "mean" for sub in pl_module.modules())):
        said.append(f"the model's nn.MSELoss() also divides by its {outputs} outputs, where reduction 'mean' (s = "
                    f"1/n) sums their squares: the data term is {outputs}× its loss's (with weight_decay={outputs}·λ "
                    f"given to the callback, every value is {outputs}× its own)")
    if red is None:
        said.append("using reduction 'mean' (s = 1/n)" if outputs == 1 else
                    f"using reduction 'mean' (s = 1/n, the squares summed over the {outputs} outputs: nn.MSELoss()'s "
                    f"mean also divides by {outputs}, which λ = {outputs}× yours and reduction='mean' match, with "
                    f"values {outputs}× yours)")
    missing = [name for name, mine, model in (("weight_decay", weight_decay, model_lam), ("reduction", reduction,
               model_red)) if mine is None and model is None and not (name == "weight_decay" and lam > 0)]
    if said:
        head = (f"the model has no `{'`/`'.join(missing)}` attribute{'s' if len(missing) > 1 else ''} and the "
                "callback was given none: " if missing else "")
        rank_zero_warn(f"{owner}: {head}{' and '.join(said)} (see docs/convex.md)")
    lam = check_weight_decay(lam, "the model's weight_decay (λ)")
    red = check_reduction(red or "mean", "the model's reduction")
    return lam, red
