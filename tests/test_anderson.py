"""The Anderson acceleration of the ADMM's state (``hcl.convex.native.anderson``): it speeds up a slow linear
fixed-point iteration, its safeguard undoes a bad step exactly, and its history's bytes are what it allocates."""

import pytest
import torch

from hcl.convex.native.anderson import SAFEGUARD, Anderson, history_bytes


def slow_map(size, seed, rate=0.99):
    """``F(x) = M x + b`` with ``M`` symmetric, eigenvalues spread over ``[0, rate]``: plain iteration converges at
    ``rate`` per step."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(torch.linspace(0.0, rate, size, dtype=torch.float64)) @ Q.T
    b = torch.randn(size, generator=g, dtype=torch.float64)
    return M, b


def iterations_to_fixed_point(M, b, memory, weights=(1.0, 1.0), split=None, cap=3000):
    x = torch.zeros(len(b), dtype=torch.float64)
    accelerate = Anderson(memory, len(b), split or len(b) // 2, torch.float64, torch.device("cpu")) if memory else None
    if accelerate is not None:
        accelerate.reset(weights)
    first = float(b.norm())
    for it in range(1, cap + 1):
        g = M @ x + b - x
        if float(g.norm()) <= 1e-6 * first:
            return it
        if accelerate is None:
            x += g
        else:
            accelerate.residual.copy_(g)
            accelerate.step(x)
    return cap


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (30.0, 0.03)])
def test_the_acceleration_reaches_the_fixed_point_in_a_fraction_of_the_steps(seed, weights):
    M, b = slow_map(60, seed)
    plain = iterations_to_fixed_point(M, b, 0)
    accelerated = iterations_to_fixed_point(M, b, 5, weights)
    assert plain > 1000  # 0.99 per step: about 1 400 steps to 1e-6
    assert accelerated <= plain / 5


def test_a_residual_beyond_the_safeguard_restores_the_plain_iterate():
    M, b = slow_map(40, 2)
    x = torch.zeros(40, dtype=torch.float64)
    accelerate = Anderson(3, 40, 20, torch.float64, torch.device("cpu"))
    accelerate.reset((1.0, 1.0))
    for _ in range(4):  # enough steps for a correction
        before = x.clone()
        accelerate.residual.copy_(M @ x + b - x)
        accelerate.step(x)
    plain = before + (M @ before + b - before)  # F of the last state stepped from
    assert accelerate.corrected and not torch.allclose(x, plain)
    accelerate.residual.fill_(2 * SAFEGUARD * accelerate.last_norm / 40**0.5)  # a residual norm 2 × SAFEGUARD the last
    assert accelerate.step(x) is False
    assert accelerate.rejected == 1
    torch.testing.assert_close(x, plain, rtol=1e-6, atol=1e-6)  # the correction was float32


def test_history_bytes_count_what_is_allocated():
    accelerate = Anderson(4, 1000, 300, torch.float64, torch.device("cpu"))
    allocated = sum(t.numel() * t.element_size() for t in vars(accelerate).values()
                    if isinstance(t, torch.Tensor) and t is not accelerate.gram)
    assert allocated == history_bytes(4, 1000, 8)
    with pytest.raises(ValueError, match="memory"):
        Anderson(0, 10, 5, torch.float64, torch.device("cpu"))
