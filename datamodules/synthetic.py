r"""
Synthetic regression
====================

The small data sets of the experiments in ``docs/experiments.md``, generated deterministically from a seed:
Gaussian inputs with linear labels, a few explicit (or uniform) points on a line, and orthonormal inputs with
Gaussian labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hcl.checks import as_int, check_bool, is_int
from hcl.datamodules.base import TensorDataModule, resolve_dtype

KINDS = ("gaussian_linear", "points", "orthogonal")


class SyntheticRegression(TensorDataModule):
    r"""A generated regression set with targets of shape ``(n, 1)`` (or ``(n, c)`` for explicit points).

    Kinds (each a function of ``seed`` only; data are drawn in float64 and then cast to ``dtype``):

    * ``"gaussian_linear"`` (default): ``X ~ N(0, I)`` of shape ``(n, d)`` (defaults 100 and 10),
      ``y = X β + noise · ε`` with ``β ~ N(0, I)`` normalised to ``‖β‖ = 1`` (see :attr:`beta`).
    * ``"points"``: explicit points ``x`` (a list of floats for 1-D inputs, a list of lists otherwise) and
      targets ``y``; without them, ``n`` (default 100) points uniform in ``[-1, 1]`` with
      ``y = slope · x + intercept + noise · ε``.
    * ``"orthogonal"``: ``n ≤ d`` orthonormal rows (``d`` defaults to 10, ``n`` to ``d``) and
      ``y ~ N(0, I)``, a set every network with enough neurons can interpolate.

    ``append_ones`` adds a last column of ones to the inputs (a bias column), so ``in_features``
    is then ``d + 1``. The single-neuron example (b) of ``docs/experiments.md``, ``x1 = (−0.2, 1), x2 = (1, 1)``, is
    ``SyntheticRegression(kind="points", x=[-0.2, 1.0], y=[0.5, 1.0], append_ones=True)``.

    ``val_n`` / ``test_n`` extra points come from the same law as the training points (same ``β``, same
    line); the training points do not depend on them.

    Args:
        kind: one of ``"gaussian_linear"``, ``"points"``, ``"orthogonal"``.
        n: number of training points (default depends on ``kind``; inferred from explicit ``x``).
        d: input dimension before the ones column (default 10; ``kind="points"`` generates 1-D inputs).
        noise: standard deviation of Gaussian noise added to generated targets.
        x: explicit inputs for ``kind="points"``.
        y: explicit targets for ``kind="points"`` (a list of floats, or of lists for several outputs).
        slope: slope of the line of generated points (``kind="points"`` without ``x``; default 0.6).
        intercept: intercept of the line of generated points (likewise; default 0.7).
        append_ones: append a column of ones to the inputs.
        dtype: ``"float32"`` or ``"float64"``.
        val_n: number of validation points (0: no validation loop).
        test_n: number of test points (0: no test batches).
        batch_size: ``None`` for full batch, else the mini-batch size.
        shard: shard the training set by rank under DDP.
        seed: seed of the generated data and of the mini-batch order.

    Raises:
        ValueError: on an unknown ``kind``, ``n > d`` for ``"orthogonal"``, inconsistent ``x`` / ``y`` /
            ``n`` / ``d``, options that the kind cannot honour, and (in ``setup``) NaN, inf or a different
            number of explicit inputs and targets.

    Example::

        dm = SyntheticRegression(n=100, d=10, seed=0)      # experiment (c)
        dm = SyntheticRegression(kind="points", n=4, append_ones=True, seed=1)   # experiment (d)
    """

    def __init__(
        self,
        kind: str = "gaussian_linear",
        n: int | None = None,
        d: int | None = None,
        noise: float = 0.0,
        x: list[float] | list[list[float]] | None = None,
        y: list[float] | list[list[float]] | None = None,
        slope: float | None = None,
        intercept: float | None = None,
        append_ones: bool = False,
        dtype: str = "float32",
        val_n: int = 0,
        test_n: int = 0,
        batch_size: int | None = None,
        shard: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, shard=shard, seed=seed)
        n, d, val_n, test_n = as_int(n), as_int(d), as_int(val_n), as_int(test_n)
        append_ones = check_bool(append_ones, "append_ones")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        for name, value, smallest in (("n", n, 1), ("d", d, 1), ("val_n", val_n, 0), ("test_n", test_n, 0)):
            if value is not None and (not is_int(value) or value < smallest):
                raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")
        if isinstance(noise, bool) or not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise!r}")
        if kind != "points" and (x is not None or y is not None):
            raise ValueError(f"x and y are the explicit data of kind='points', not of kind={kind!r}")
        # the line's defaults as given (a config saved before they became None) choose nothing
        line = [name for name, value, default in (("slope", slope, 0.6), ("intercept", intercept, 0.7))
                if value is not None and value != default]
        if line and (kind != "points" or x is not None or y is not None):  # else silently unused
            raise ValueError(f"{' and '.join(line)} shape the line of kind='points' without x and y, not "
                             f"{'explicit points' if kind == 'points' else f'kind={kind!r}'}")
        self.kind = kind
        self.noise = float(noise)
        self.slope = 0.6 if slope is None else float(slope)
        self.intercept = 0.7 if intercept is None else float(intercept)
        self.append_ones = append_ones
        self.dtype = resolve_dtype(dtype)
        self.val_n = val_n
        self.test_n = test_n
        self._points: tuple[Tensor, Tensor] | None = None
        self._beta: Tensor | None = None

        if kind == "points" and (x is not None or y is not None):
            self._points = _explicit_points(x, y)
            n_given, d_given = self._points[0].shape
            if n is not None and n != n_given:
                raise ValueError(f"n={n} but x holds {n_given} points")
            if d is not None and d != d_given:
                raise ValueError(f"d={d} but the points of x have {d_given} coordinates")
            if self.noise > 0 or val_n > 0 or test_n > 0:
                raise ValueError("explicit points have no law to draw noise, val_n or test_n points from")
            n, d = n_given, d_given
        elif kind == "points":
            if d not in (None, 1):
                raise ValueError(f"kind='points' generates 1-D inputs, got d={d}; pass x for d > 1")
            n, d = n or 100, 1
        elif kind == "orthogonal":
            d = d or 10
            n = n or d
            if n > d:
                raise ValueError(f"kind='orthogonal' needs n <= d to have orthonormal rows, got n={n}, d={d}")
            if self.noise > 0 or val_n > 0 or test_n > 0:
                raise ValueError(
                    "kind='orthogonal' has Gaussian targets unrelated to the inputs: noise, val_n and test_n must be 0"
                )
        else:
            n, d = n or 100, d or 10
        self.n = n
        self.d = d

    @property
    def in_features(self) -> int:
        return self.d + int(self.append_ones)

    @property
    def out_features(self) -> int:
        return 1 if self._points is None else self._points[1].shape[1]

    @property
    def beta(self) -> Tensor | None:
        """The unit-norm coefficients ``β`` (float64, shape ``(d, 1)``) of ``"gaussian_linear"``, else ``None``."""
        self._split("train")
        return self._beta

    def _load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        if self._points is not None:
            splits = {"train": self._points}
        elif self.kind == "orthogonal":
            q, _ = torch.linalg.qr(torch.randn(self.d, self.n, generator=generator, dtype=torch.float64))
            splits = {"train": (q.T, torch.randn(self.n, 1, generator=generator, dtype=torch.float64))}
        else:
            if self.kind == "gaussian_linear":
                beta = torch.randn(self.d, 1, generator=generator, dtype=torch.float64)
                self._beta = beta / beta.norm()
            sizes = {"train": self.n, "val": self.val_n, "test": self.test_n}
            # Train first, so the training points do not depend on val_n / test_n.
            splits = {split: self._draw(size, generator) for split, size in sizes.items() if size > 0}
        return {split: self._finish(inputs, targets) for split, (inputs, targets) in splits.items()}

    def _draw(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.kind == "gaussian_linear":
            inputs = torch.randn(size, self.d, generator=generator, dtype=torch.float64)
            clean = inputs @ self._beta
        else:
            inputs = 2 * torch.rand(size, 1, generator=generator, dtype=torch.float64) - 1
            clean = self.slope * inputs + self.intercept
        # The noise is drawn even when its scale is 0, so noisy and clean sets share their inputs.
        noise = torch.randn(size, 1, generator=generator, dtype=torch.float64)
        return inputs, clean + self.noise * noise

    def _finish(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.append_ones:
            inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], dim=1)
        return inputs.to(self.dtype), targets.to(self.dtype)


def _explicit_points(x: list | None, y: list | None) -> tuple[Tensor, Tensor]:
    if x is None or y is None:
        raise ValueError("kind='points' needs both x and y, or neither (to generate points on a line)")
    tensors = []
    for name, values in (("x", x), ("y", y)):
        try:
            tensor = torch.tensor(values, dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a list of numbers or a list of equal-length lists: {error}") from None
        if tensor.ndim == 1:
            tensor = tensor.unsqueeze(1)
        if tensor.ndim != 2:
            raise ValueError(f"{name} must be a list of numbers or a list of lists, got shape {tuple(tensor.shape)}")
        tensors.append(tensor)
    return tensors[0], tensors[1]
