"""Finding the ``Linear → ReLU → Linear`` stack of a module, and reading its weights.

The callbacks work with :class:`hcl.TwoLayerReLU` and with any module that holds one two-layer ReLU stack:

- a module with ``hidden_layer`` and ``output_layer`` ``nn.Linear`` attributes (``TwoLayerReLU``);
- otherwise an ``nn.Sequential`` whose children are exactly ``Linear, ReLU, Linear`` (optionally after a
  leading ``Flatten``, with dropout layers anywhere after the first ``Linear``), found automatically when there is
  exactly one;
- otherwise the stack named by ``layer``: the qualified name of its hidden ``nn.Linear`` (e.g. ``"net.0"``),
  the output layer being the next ``nn.Linear`` after a ``ReLU`` in the same ``Sequential`` (dropout skipped), or
  named by ``output_layer`` for modules that are not a ``Sequential``.

:class:`ReLUStack` also checks that a module computes what its stack does, and writes a convex solution's weights
into the stack.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from hcl.convex.problem import ConvexProblem, ConvexSolution


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class ReLUStack:
    """The two layers of a two-layer ReLU network inside some module."""

    hidden: nn.Linear
    output: nn.Linear
    name: str

    @property
    def bias(self) -> bool:
        return self.hidden.bias is not None

    @property
    def output_bias(self) -> bool:
        return self.output.bias is not None

    @property
    def in_features(self) -> int:
        return self.hidden.in_features

    def weights(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Detached ``(hidden weight, hidden bias, output weight, output bias)``."""
        def detach(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return (detach(self.hidden.weight), detach(self.hidden.bias), detach(self.output.weight),
                detach(self.output.bias))

    def inputs(self, X: Tensor) -> Tensor:
        """``X`` flattened to ``(n, in_features)`` in the hidden layer's dtype and device."""
        X = X.reshape(X.shape[0], -1)
        if X.shape[1] != self.in_features:
            raise ValueError(
                f"the data has {X.shape[1]} features per sample but the hidden layer {self.name!r} expects "
                f"{self.in_features} (a batch's first item is read as the inputs, its second as the targets: pass "
                "probe=/target= for another layout)"
            )
        w = self.hidden.weight
        return X.to(device=w.device, dtype=w.dtype)

    def finite(self) -> bool:
        """Whether every weight of the stack is finite."""
        return all(bool(torch.isfinite(t).all()) for t in self.weights() if t is not None)

    def check_forward(
        self, module: nn.Module, X: Tensor, rows: int = 8, again: bool = False, shaped: Tensor | None = None,
        warn: Callable[[str], object] = warnings.warn,
    ) -> Tensor | None:
        """Refuse a ``module`` whose output is not ``relu(X W̃ᵀ) Aᵀ + b₀`` of this stack.

        The convex problem describes the stack only; a module that computes something else (a deeper network, extra
        layers, a scaled output) would get meaningless numbers. The first ``rows`` samples of ``X`` (inputs as the
        hidden layer takes them) are run through ``module`` in eval mode; its modes are restored afterwards. A module
        whose forward takes neither the samples as the data holds them (``shaped``, e.g. images a forward flattens or
        normalises) nor flattened cannot be checked: it is let through with a warning, and so are non-finite weights
        (reported elsewhere). Returns the samples the forward took (a later check passes them as ``shaped``), or
        ``None`` when it took neither.

        The layers the forward runs between the hidden and the output layer are also checked by name, whatever their
        current effect: a normalisation there (``BatchNorm1d`` is close to the identity at initialisation, and not
        later) is refused; ``Dropout`` is accepted, and the callbacks then compute the network without dropout (its
        eval-mode function), which they say once. A layer with trained weights or statistics that runs before the
        hidden layer is refused too. ``again``: a later check of a module that passed, its output only (its layers'
        order was checked the first time; hooks on every layer cost ~20 µs a module).

        Raises:
            ValueError: the module's output has another size, or other values, than the stack's, or a layer runs
                between the stack's layers or before them.
        """
        sample = X[:rows]
        given = [sample] if shaped is None or shaped.shape[1:] == sample.shape[1:] else [shaped[:rows], sample]
        failure: Exception | None = None
        modes = {sub: sub.training for sub in module.modules()}
        called: list[nn.Module] = []
        hooks = [] if again else [sub.register_forward_hook(lambda m, args, out: called.append(m))
                                  for sub in module.modules() if not any(True for _ in sub.children())]
        module.eval()
        try:
            with torch.no_grad():
                for inputs in given:  # as the data holds them first: a forward may transform them before flattening
                    called.clear()
                    try:
                        actual = module(inputs)
                        break
                    except Exception as error:  # noqa: BLE001 - e.g. a forward that expects a dict batch
                        failure = error if inputs is given[0] else failure  # the data's own shape's says most
                else:
                    if not again:
                        warn(f"the model's forward does not take the callbacks' samples ({type(failure).__name__}: "
                             f"{failure}): they cannot check that it computes its stack {self.name!r} (Linear → ReLU "
                             "→ Linear)")
                    return None
                # after the forward: a weight a pre-hook computes (pruning, weight_norm) is the current one only then
                weight, bias, output_weight, output_bias = self.weights()
                expected = F.linear(torch.relu(F.linear(sample, weight, bias)), output_weight, output_bias)
        finally:
            for hook in hooks:
                hook.remove()
            for sub, mode in modes.items():
                sub.training = mode
        if not again:
            self._check_between(module, called)
        if not isinstance(actual, Tensor) or actual.numel() != expected.numel():
            shape = tuple(actual.shape) if isinstance(actual, Tensor) else type(actual).__name__
            raise ValueError(
                f"the model's output ({shape}) is not that of its two-layer ReLU stack {self.name!r} "
                f"({tuple(expected.shape)}): the convex problem describes a network Linear → ReLU → Linear only"
            )
        actual = actual.reshape(expected.shape).to(expected)
        if not (torch.isfinite(expected).all() and torch.isfinite(actual).all()):
            return inputs
        scale = expected.abs().max().clamp_min(1e-12)
        # float32 forwards round at ~1e-7 relative per operation; a different network differs by far more.
        tolerance = 1e-4 if expected.dtype == torch.float64 else 1e-3
        if float((actual - expected).abs().max() / scale) > tolerance:
            raise ValueError(
                f"the model's output differs from that of its two-layer ReLU stack {self.name!r} (hidden layer → "
                "ReLU → output layer): a deeper network, extra layers, a scaled output, or inputs transformed inside "
                "forward (normalised, scaled: the callbacks give the hidden layer the data as it is — transform it in "
                "the data instead)? The convex problem describes a network Linear → ReLU → Linear only; name another "
                "stack with layer=/output_layer=, or use a two-layer model"
            )
        return inputs

    def _check_between(self, module: nn.Module, called: list[nn.Module]) -> None:
        """Refuse the layers a forward ran between the hidden and the output layer, except ReLU, Dropout, Identity,
        and the layers with trained weights or statistics it ran before the hidden layer (a normalisation there is
        close to the identity in eval mode at initialisation, and not in training; a frozen layer is left to the
        comparison of outputs)."""
        if self.hidden not in called or self.output not in called:
            return  # the forward bypassed the stack's modules: the value comparison decides
        start = called.index(self.hidden)
        names = {sub: name for name, sub in module.named_modules()}
        for layer in called[:start]:
            if any(p.requires_grad for p in layer.parameters(recurse=False)) or any(
                    True for _ in layer.buffers(recurse=False)):
                raise ValueError(
                    f"the layer {names.get(layer, '?')!r} ({type(layer).__name__}) runs before the hidden layer "
                    f"{self.name!r}: the callbacks give the hidden layer the data as it is, so the convex problem "
                    "would describe another network; transform the data instead, or use a two-layer model"
                )
        end = start + called[start:].index(self.output) if self.output in called[start:] else start
        dropouts = [names.get(layer, type(layer).__name__) for layer in called[:start] if isinstance(layer, _DROPOUTS)]
        for layer in called[start + 1 : end]:
            if isinstance(layer, (nn.ReLU, nn.Identity)):
                continue
            if isinstance(layer, _DROPOUTS):
                dropouts.append(names.get(layer, type(layer).__name__))
                continue
            raise ValueError(
                f"the layer {names.get(layer, '?')!r} ({type(layer).__name__}) runs between the hidden layer "
                f"{self.name!r} and the output layer: it changes the network's function, so the convex problem "
                "(Linear → ReLU → Linear) would describe another network; remove it or use a two-layer model"
            )
        if dropouts:
            warnings.warn(
                f"Dropout {', '.join(map(repr, dropouts))} before or between the layers of {self.name!r}: the "
                "callbacks compute the network without dropout (its eval-mode function)", stacklevel=3,
            )

    def mapped_weights(
        self, problem: ConvexProblem, solution: ConvexSolution
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The network weights ``(W̃, A, b₀)`` of a convex solution, on the CPU, ready for :meth:`load_weights`.

        ``W̃`` holds the hidden bias as its last column when the stack has one (``problem`` was built so).

        Raises:
            ValueError: the solution cannot be mapped to network weights, or needs more neurons than the stack has.
        """
        try:
            # a solver's leftovers (norms near rounding) are no neurons: the rule of solution.active_neurons
            W, A, b0 = problem.to_network(solution.U, solution.V, solution.b0, tol=solution.neuron_tol(problem=problem))
        except Exception as err:  # noqa: BLE001 - one error type for the caller, whatever the mapping raised
            raise ValueError(f"the convex solution could not be mapped to network weights ({type(err).__name__}: "
                             f"{err})") from err
        width = self.hidden.out_features
        if W.shape[0] > width:
            raise ValueError(f"the convex solution needs {W.shape[0]} neurons but the network has {width}")
        return W.detach().cpu(), A.detach().cpu(), None if b0 is None else b0.detach().cpu()

    @torch.no_grad()
    def load_weights(self, W: Tensor, A: Tensor, b0: Tensor | None = None) -> None:
        """Replace the stack's weights by ``(W̃, A, b₀)``, zero-padded to the stack's width.

        Args:
            W: ``(k, in_features)``, or ``(k, in_features + 1)`` with the hidden bias as last column; ``k`` at most
                the width. Neurons ``k`` and beyond get zero weights (they then add nothing to the output).
            A: ``(out_features, k)`` output weight.
            b0: ``(out_features,)`` output bias, loaded when the stack has one.

        Raises:
            ValueError: ``W`` has more rows than the stack has neurons.
        """
        hidden, output = self.hidden, self.output
        k = W.shape[0]
        if k > hidden.out_features:
            raise ValueError(f"{k} neurons do not fit in the hidden layer {self.name!r} of {hidden.out_features}")
        hidden.weight.zero_()
        output.weight.zero_()
        hidden.weight[:k] = W[:, : hidden.in_features].to(hidden.weight)
        if hidden.bias is not None:
            hidden.bias.zero_()
            hidden.bias[:k] = W[:, -1].to(hidden.bias)
        output.weight[:, :k] = A.to(output.weight)
        if output.bias is not None and b0 is not None:
            output.bias.copy_(b0.to(output.bias))


def find_relu_stack(module: nn.Module, layer: str | None = None, output_layer: str | None = None) -> ReLUStack:
    """Locate the two-layer ReLU stack of ``module`` (see the module docstring for the rules).

    Raises:
        ValueError: no stack, several stacks and no ``layer``, or a ``layer`` that names no suitable ``Linear``;
            the message lists what was found.
    """
    named = dict(module.named_modules())
    if layer is not None:
        return _named_stack(named, layer, output_layer)
    hidden, output = getattr(module, "hidden_layer", None), getattr(module, "output_layer", None)
    if isinstance(hidden, nn.Linear) and isinstance(output, nn.Linear):
        return ReLUStack(hidden, output, "hidden_layer")
    stacks = [
        ReLUStack(children[i], children[-1], f"{name}.{i}" if name else str(i))
        for name, sub in named.items()
        if isinstance(sub, nn.Sequential) and (i := _stack_index(children := list(sub.children()))) is not None
    ]
    if len(stacks) == 1:
        return stacks[0]
    linears = [name for name, sub in named.items() if isinstance(sub, nn.Linear)]
    if not stacks:
        raise ValueError(
            f"no two-layer ReLU stack (nn.Sequential of exactly Linear, ReLU, Linear, dropout allowed) found in "
            f"{type(module).__name__}; Linear layers found: {linears or 'none'}. Name the hidden layer with "
            "layer='<name>' (and output_layer='<name>' if it is not in a Sequential)."
        )
    raise ValueError(
        f"{len(stacks)} two-layer ReLU stacks found in {type(module).__name__} (hidden layers "
        f"{[s.name for s in stacks]}): name one with layer='<name>'"
    )


def _stack_index(children: list[nn.Module]) -> int | None:
    """The hidden layer's index when ``children`` are ``[Flatten,] Linear, ReLU, Linear`` with dropout layers between
    them (the identity in eval mode, the function the callbacks evaluate), else ``None``."""
    start = 1 if children and isinstance(children[0], nn.Flatten) else 0
    kept = [child for child in children[start + 1:] if not isinstance(child, _DROPOUTS)]
    if (len(children) > start and isinstance(children[start], nn.Linear) and len(kept) == 2
            and isinstance(kept[0], nn.ReLU) and isinstance(kept[1], nn.Linear) and children[-1] is kept[1]):
        return start
    return None


def _named_stack(named: dict[str, nn.Module], layer: str, output_layer: str | None) -> ReLUStack:
    linears = [name for name, sub in named.items() if isinstance(sub, nn.Linear)]
    hidden = named.get(layer)
    if not isinstance(hidden, nn.Linear):
        raise ValueError(f"layer={layer!r} is not an nn.Linear of the model; Linear layers found: {linears}")
    if output_layer is not None:
        output = named.get(output_layer)
        if not isinstance(output, nn.Linear):
            raise ValueError(
                f"output_layer={output_layer!r} is not an nn.Linear of the model; Linear layers found: {linears}"
            )
    else:
        parent_name, _, index = layer.rpartition(".")
        parent = named.get(parent_name)
        children = list(parent.children()) if isinstance(parent, nn.Sequential) else []
        i = int(index) if index.isdigit() else -1
        # the layers after it, dropout skipped (the identity in eval mode)
        after = [child for child in children[i + 1:] if not isinstance(child, _DROPOUTS)]
        if not (0 <= i < len(children) and len(after) >= 2 and isinstance(after[0], nn.ReLU)
                and isinstance(after[1], nn.Linear)):
            raise ValueError(
                f"layer={layer!r} is not followed by ReLU and Linear in an nn.Sequential: name the output layer "
                f"with output_layer='<name>'; Linear layers found: {linears}"
            )
        output = after[1]
    if output.in_features != hidden.out_features:
        raise ValueError(
            f"output layer takes {output.in_features} inputs but the hidden layer {layer!r} has "
            f"{hidden.out_features} neurons"
        )
    return ReLUStack(hidden, output, layer)


# Losses the squared-loss convex problem describes; every other torch loss is refused by the convex monitors.
_SQUARED_NAMES = frozenset({"squared", "square", "mse", "l2", "squarederror", "meansquarederror", "sumofsquares"})
_LOSS_NAMES = {
    "crossentropy": "cross-entropy", "ce": "cross-entropy", "softmax": "cross-entropy", "nll": "cross-entropy (NLL)",
    "negativeloglikelihood": "cross-entropy (NLL)", "logistic": "logistic", "bce": "logistic (binary cross-entropy)",
    "binarycrossentropy": "logistic (binary cross-entropy)", "bcewithlogits": "logistic (binary cross-entropy)",
    "binarycrossentropywithlogits": "logistic (binary cross-entropy)", "hinge": "hinge", "l1": "absolute (L1)",
    "mae": "absolute (L1)", "huber": "Huber", "smoothl1": "smooth L1", "kldiv": "KL divergence",
}
_LOSS_ATTRIBUTES = ("loss", "criterion", "loss_fn", "loss_func", "loss_function")


def non_squared_loss(module: nn.Module) -> str | None:
    """What tells that ``module`` trains with a loss other than the squared loss, or ``None`` when nothing does.

    Looked for: a torch loss module among its submodules other than ``nn.MSELoss`` (``nn.CrossEntropyLoss``,
    ``nn.BCEWithLogitsLoss``, ``nn.NLLLoss``, …), and a ``loss``/``criterion``/``loss_fn`` attribute or
    hyperparameter that names a loss (``"cross_entropy"``, as :class:`hcl.TwoLayerReLU` holds it) or is a
    ``torch.nn.functional`` loss other than ``mse_loss``. A loss computed inline in ``training_step`` cannot be seen.

    Returns:
        e.g. ``"a cross-entropy loss (its `criterion` is nn.CrossEntropyLoss)"``.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.loss._Loss) and not isinstance(sub, nn.MSELoss):
            kind = _loss_kind(type(sub).__name__) or "non-squared"
            return f"{_article(kind)} {kind} loss (its `{name}` is nn.{type(sub).__name__})"
    hparams = getattr(module, "hparams", None)
    for attribute in _LOSS_ATTRIBUTES:
        for where, value in (("", getattr(module, attribute, None)),
                             ("hyperparameter ", hparams.get(attribute) if isinstance(hparams, dict) else None)):
            value = value.func if isinstance(value, functools.partial) else value  # partial(F.cross_entropy, …)
            if isinstance(value, str):
                label = repr(value)
            elif callable(value) and getattr(value, "__module__", "") == "torch.nn.functional":
                label, value = f"F.{value.__name__}", value.__name__
            else:
                continue
            kind = _loss_kind(value)
            if kind is not None:
                return f"{_article(kind)} {kind} loss (its {where}`{attribute}` is {label})"
    return None


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _loss_kind(name: str) -> str | None:
    """The kind of loss a name says, ``None`` for the squared loss or a name that says nothing known."""
    key = name.lower().replace("nn.", "").replace("_", "").replace("-", "").replace(" ", "")
    key = key.removesuffix("loss").removeprefix("loss") or key
    if key in _SQUARED_NAMES:
        return None
    return _LOSS_NAMES.get(key)
