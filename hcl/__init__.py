"""hcl: train two-layer ReLU networks while watching their hidden convex reformulation."""

from hcl.model import TwoLayerReLU

__version__ = "0.1.0"
__all__ = ["TwoLayerReLU"]
