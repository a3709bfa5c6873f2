"""Lightning callbacks that watch a two-layer ReLU network's activation patterns and convex reformulation."""

from hcl.callbacks.convex_gap import ConvexGapMonitor
from hcl.callbacks.pattern_monitor import PatternMonitor

__all__ = ["ConvexGapMonitor", "PatternMonitor"]
