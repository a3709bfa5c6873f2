"""The ADMM's stall rules below float64, on scripted stopping tests: a float32 solve whose certificate stops moving
ends as stalled and goes on in float64 from its point; one that still moves does not. The real stalls these rules
catch take thousands of iterations (``tests/test_admm.py``'s slow tests); here each rule is driven directly."""

from __future__ import annotations

import pytest
import torch
from test_admm import instance

import hcl.convex.native.admm as admm_module
from hcl.convex.native import solve_native
from hcl.convex.native.certificate import Convergence

TOL = 1e-3  # float32 iterations by default from here, with the float64 fallback


def _precisions(monkeypatch, verdict, max_iters=400):
    """Solve with ``verdict(k)`` as the ``k``-th float32 stopping test (float64 ones stop at once); the
    ``(iteration, precision)`` of every test."""
    seen = []

    def scripted(check_op, W, mu, options, it, rho, best, XW=None):
        seen.append((it, W.dtype))
        if W.dtype == torch.float64:
            return Convergence(met=True, gap=0.0, violation=0.0, dual=1.0)
        return verdict(sum(dtype == torch.float32 for _, dtype in seen))

    monkeypatch.setattr(admm_module, "_check", scripted)
    monkeypatch.setattr(admm_module, "_feasible", lambda *args: (None, 1.0))  # no move into the cones confirms
    solve_native(instance(n=40, d=5, P=6, c=1, seed=2), method="admm", tol=TOL, constraint_tol=TOL,
                 max_iters=max_iters)
    return seen


def _float32_tests(seen):
    return [it for it, dtype in seen if dtype == torch.float32]


@pytest.mark.parametrize(
    "case, verdict, stalls_at",
    [
        # the bound set by the first test, then 20 tests with the gap within 2 % of itself: stalled at the 21st
        ("frozen", lambda k: Convergence(False, 0.5 * (1 + 0.005 * (k % 3)), 0.0, 1.0), 210),
        # the gap swinging by 20 %: a slow solve, not a stall
        ("swinging", lambda k: Convergence(False, 0.5 * (1 + 0.2 * (k % 2)), 0.0, 1.0), None),
        # swinging up to the fifth test, then frozen: the last 20 tests decide (stalled at the 25th)
        ("swinging, then frozen", lambda k: Convergence(False, 0.5 * (1 + 0.2 * (k % 2) * (k <= 6)), 0.0, 1.0), 250),
        # the bound gaining more than a tenth of tol each test: still moving
        ("rising bound", lambda k: Convergence(False, 0.5, 0.0, 1.0 + 2e-4 * k), None),
        # the gap frozen below tol (only the violation is left): not this rule's
        ("closed gap", lambda k: Convergence(False, 0.5 * TOL, 2 * TOL, 1.0), None),
        # met 20 tests in a row at a violation that no longer halves (float32's floor): stalled at the 20th
        ("floored violation", lambda k: Convergence(True, 1e-4, 1e-4 * (1 + 0.01 * (k % 2)), 1.0), 200),
        # met, the violation halving every five tests: still moving
        ("falling violation", lambda k: Convergence(True, 1e-4, 1e-4 * 0.5 ** (k / 5), 1.0), None),
    ],
)
def test_the_float32_part_ends_as_stalled_only_where_the_certificate_stopped_moving(monkeypatch, case, verdict,
                                                                                     stalls_at):
    seen = _precisions(monkeypatch, verdict)
    float32 = _float32_tests(seen)
    if stalls_at is None:
        assert float32[-1] == 400 and len(seen) == len(float32), case  # the cap, in float32 throughout
    else:
        assert float32[-1] == stalls_at, case
        assert seen[len(float32)][1] == torch.float64, case  # and the solve went on in float64
