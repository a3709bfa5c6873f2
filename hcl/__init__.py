"""hcl: train two-layer ReLU networks while watching their hidden convex reformulation.

The convex engine (``hcl.convex``, ``hcl.patterns``) imports without Lightning; ``TwoLayerReLU`` and ``ConvexReLU`` load
it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hcl.convex_model import ConvexReLU
    from hcl.model import TwoLayerReLU

__version__ = "0.1.0"
__all__ = ["ConvexReLU", "TwoLayerReLU"]


def __getattr__(name: str) -> Any:
    if name == "TwoLayerReLU":
        from hcl.model import TwoLayerReLU

        return TwoLayerReLU
    if name == "ConvexReLU":
        from hcl.convex_model import ConvexReLU

        return ConvexReLU
    raise AttributeError(f"module 'hcl' has no attribute {name!r}")
