"""hcl: train two-layer ReLU networks while watching their hidden convex reformulation."""

__version__ = "0.1.0"
