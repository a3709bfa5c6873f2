"""Finding the ``Linear → ReLU → Linear`` stack of a module, and reading its weights.

The callbacks work with :class:`hcl.TwoLayerReLU` and with any module that holds one two-layer ReLU stack:

- a module with ``hidden_layer`` and ``output_layer`` ``nn.Linear`` attributes (``TwoLayerReLU``);
- otherwise an ``nn.Sequential`` whose children are exactly ``Linear, ReLU, Linear`` (optionally after a
  leading ``Flatten``), found automatically when there is exactly one;
- otherwise the stack named by ``layer``: the qualified name of its hidden ``nn.Linear`` (e.g. ``"net.0"``),
  the output layer being the next ``nn.Linear`` after a ``ReLU`` in the same ``Sequential``, or named by
  ``output_layer`` for modules that are not a ``Sequential``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
                f"{self.in_features}"
            )
        w = self.hidden.weight
        return X.to(device=w.device, dtype=w.dtype)

    def finite(self) -> bool:
        """Whether every weight of the stack is finite."""
        return all(bool(torch.isfinite(t).all()) for t in self.weights() if t is not None)


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
        ReLUStack(children[-3], children[-1], f"{name}.{len(children) - 3}" if name else str(len(children) - 3))
        for name, sub in named.items()
        if isinstance(sub, nn.Sequential) and _is_stack(children := list(sub.children()))
    ]
    if len(stacks) == 1:
        return stacks[0]
    linears = [name for name, sub in named.items() if isinstance(sub, nn.Linear)]
    if not stacks:
        raise ValueError(
            f"no two-layer ReLU stack (nn.Sequential of exactly Linear, ReLU, Linear) found in "
            f"{type(module).__name__}; Linear layers found: {linears or 'none'}. Name the hidden layer with "
            "layer='<name>' (and output_layer='<name>' if it is not in a Sequential)."
        )
    raise ValueError(
        f"{len(stacks)} two-layer ReLU stacks found in {type(module).__name__} (hidden layers "
        f"{[s.name for s in stacks]}): name one with layer='<name>'"
    )


def _is_stack(children: list[nn.Module]) -> bool:
    if children and isinstance(children[0], nn.Flatten):
        children = children[1:]
    return (
        len(children) == 3
        and isinstance(children[0], nn.Linear)
        and isinstance(children[1], nn.ReLU)
        and isinstance(children[2], nn.Linear)
    )


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
        if not (0 <= i and i + 2 < len(children) and isinstance(children[i + 1], nn.ReLU)
                and isinstance(children[i + 2], nn.Linear)):
            raise ValueError(
                f"layer={layer!r} is not followed by ReLU and Linear in an nn.Sequential: name the output layer "
                f"with output_layer='<name>'; Linear layers found: {linears}"
            )
        output = children[i + 2]
    if output.in_features != hidden.out_features:
        raise ValueError(
            f"output layer takes {output.in_features} inputs but the hidden layer {layer!r} has "
            f"{hidden.out_features} neurons"
        )
    return ReLUStack(hidden, output, layer)
