"""Lightning callbacks that watch a two-layer ReLU network's activation patterns and convex reformulation.

:class:`StackCallback` is their common base: subclass it for a callback of your own that watches the stack.
"""

from hcl.callbacks.activation_points import ActivationPointPlot
from hcl.callbacks.base import StackCallback
from hcl.callbacks.convex_gap import ConvexGapMonitor
from hcl.callbacks.global_optimum import GlobalOptimumMonitor
from hcl.callbacks.pattern_monitor import PatternMonitor
from hcl.callbacks.progress import StepProgressBar

__all__ = ["ActivationPointPlot", "ConvexGapMonitor", "GlobalOptimumMonitor", "PatternMonitor", "StackCallback",
           "StepProgressBar"]
