"""hcl's own solver for the convex problem, in torch, on the data's device.

Three methods solve the fixed-pattern problem of :mod:`hcl.convex.problem` (and its gated relaxation); each stops on a
**certificate** — a relative duality gap from the problem's dual restricted to its patterns, and the constraint
violation — never on an iteration count alone.

* ``"newton"`` (:mod:`~hcl.convex.native.interior_point`, Newton systems in :mod:`~hcl.convex.native.newton`): a
  primal-dual interior-point method, for ``n`` up to a few thousand.
* ``"admm"`` (:mod:`~hcl.convex.native.admm`): the alternating direction method with an exact linear step, for large
  ``d`` (MNIST, CIFAR-10) where its ``n × n`` matrices fit.
* ``"fista"`` (:mod:`~hcl.convex.native.first_order`): an augmented Lagrangian solved by FISTA, matrix-free, for
  problems whose ``n × n`` matrices do not fit.

The problem's layout and products are in :mod:`~hcl.convex.native.operator`, the certificate and the stopping rule
in :mod:`~hcl.convex.native.certificate`, warm starts in :mod:`~hcl.convex.native.warm_start`, the options and the
tuned constants in :mod:`~hcl.convex.native.options`, the memory plan in :mod:`~hcl.convex.native.memory`, the
threads in :mod:`~hcl.convex.native.threads`. The methods, their measurements and the certificate's
derivation are described in ``docs/solvers.md``.

Example::

    from hcl.convex.native import solve_native

    solution = solve_native(problem, tol=1e-6)
    solution.value, solution.dual_value, solution.status
"""

from hcl.convex.native.certificate import dual_certificate
from hcl.convex.native.memory import SolverMemoryError, footprint
from hcl.convex.native.options import METHODS, NativeOptions
from hcl.convex.native.solver import planned_method, solve_native
from hcl.convex.native.warm_start import Multipliers, remap_warm_start

__all__ = [
    "METHODS",
    "Multipliers",
    "NativeOptions",
    "SolverMemoryError",
    "dual_certificate",
    "footprint",
    "planned_method",
    "remap_warm_start",
    "solve_native",
]
