"""Pattern enumeration returns only patterns a hyperplane produces: collinear 2-D data has the 1-D arrangement's
patterns, checked against linear-programming feasibility and dense sampling of directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from hcl.convex import ConvexProblem, solve_native
from hcl.convex.build import all_patterns_problem
from hcl.enumeration import enumerate_patterns
from hcl.patterns import unique_patterns

F64 = dict(dtype=torch.float64)


def with_bias(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([points, torch.ones(points.shape[0], 1, dtype=points.dtype)], dim=1)


def columns(D: torch.Tensor) -> set[tuple[bool, ...]]:
    return {tuple(column) for column in D.T.tolist()}


def margin(X: torch.Tensor, pattern: torch.Tensor) -> float:
    """Largest ``t`` with ``x̃_jᵀu ≥ t`` on the pattern and ``≤ −t`` off it, over ``‖u‖_∞ ≤ 1`` (a linear program).

    Ties count as active, but every pattern of data with a bias column is also that of an open cell (``u + ε e_last``
    makes tied points strictly active), so a realised pattern has ``t > 0``.
    """
    signs = np.where(pattern.numpy(), 1.0, -1.0)
    k = X.shape[1]
    # variables (u, t): maximise t subject to t − s_j x̃_jᵀu ≤ 0
    A = np.hstack([-(signs[:, None] * X.double().numpy()), np.ones((X.shape[0], 1))])
    result = linprog(np.r_[np.zeros(k), -1.0], A_ub=A, b_ub=np.zeros(X.shape[0]), bounds=[(-1, 1)] * k + [(None, 1)])
    assert result.status == 0
    return -result.fun


def sampled(X: torch.Tensor, count: int, seed: int = 0) -> set[tuple[bool, ...]]:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(X.shape[1], count, generator=g, **F64)
    return columns(unique_patterns(X.double() @ directions >= 0, drop_dead=True).patterns)


def line(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """``n`` distinct points on one line, made in floating point (collinear only up to rounding unless dyadic)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, **F64) * 4.0 - 2.0
    if kind == "dyadic":
        t = torch.round(t * 64) / 64
        t = torch.unique(t)
        return torch.stack([t, 0.5 * t + 0.25], dim=1)
    drawn = float(torch.randn(1, generator=g)), float(torch.randn(1, generator=g))
    slope, offset = {"rounded": (0.3, -0.7), "steep": (2.0, 1.0), "random": drawn}[kind]
    return torch.stack([t, slope * t + offset], dim=1)


@pytest.mark.parametrize("kind", ["dyadic", "rounded", "steep", "random"])
@pytest.mark.parametrize("n", [6, 12, pytest.param(25, marks=pytest.mark.slow)])
def test_collinear_points_have_the_one_dimensional_threshold_patterns(kind, n):
    points = line(n, kind, seed=n)
    X = with_bias(points)
    E = enumerate_patterns(X)
    distinct = torch.unique(points, dim=0).shape[0]
    assert E.shape[1] == 2 * distinct - 1  # the thresholds {t ≥ t_k}, {t ≤ t_k} along the line
    # exactly the thresholds along the line
    t = points[:, 0]
    thresholds = {tuple((t >= v).tolist()) for v in t} | {tuple((t <= v).tolist()) for v in t}
    assert columns(E) == thresholds
    # every returned pattern is realised with a margin, and dense sampling finds no other
    for column in E.T:
        assert margin(X, column) > 1e-9
    assert sampled(X, 50000) <= columns(E)


def test_float32_collinear_points():
    t = torch.linspace(-1.0, 1.0, 15)
    X = torch.stack([t, 0.3 * t - 0.7, torch.ones(15)], dim=1)  # float32, collinear up to float32 rounding
    assert enumerate_patterns(X).shape[1] == 2 * 15 - 1
    # the global problem enumerates in the data's own precision too (in float64 it had 59 patterns here)
    problem = all_patterns_problem(X[:, :2], torch.ones(15), bias=True, weight_decay=0.1, reduction="mean")
    assert problem.num_patterns == 2 * 15 - 1 and problem.X.dtype == torch.float64


def test_non_finite_or_non_tensor_data_is_refused():
    X = torch.tensor([[float("nan"), 1.0], [1.0, 1.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="NaN or inf"):
        enumerate_patterns(X)
    with pytest.raises(TypeError, match="torch.Tensor"):
        enumerate_patterns(X.numpy())


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_general_position_and_degenerate_data_return_only_realised_patterns(seed):
    g = torch.Generator().manual_seed(seed)
    general = torch.randn(16, 2, generator=g, **F64)
    assert enumerate_patterns(with_bias(general)).shape[1] == 16 * 16 - 16 + 1
    # a grid (many collinear triples), a line with a point off it, duplicates
    grid = torch.cartesian_prod(torch.arange(4.0, **F64), torch.arange(4.0, **F64)) * 0.3 - 0.4
    off_line = torch.cat([line(8, "rounded", seed), torch.tensor([[0.1, 2.0]], **F64)])
    duplicates = torch.cat([general[:6], general[:3]])
    for points in (grid, off_line, duplicates):
        X = with_bias(points)
        E = enumerate_patterns(X)
        assert unique_patterns(E).patterns.shape[1] == E.shape[1]
        for column in E.T:
            assert margin(X, column) > 1e-9, column.int().tolist()
        assert sampled(X, 100000, seed) <= columns(E)


def test_collinear_global_problem_is_small_and_the_solver_converges():
    g = torch.Generator().manual_seed(7)
    for case in range(6):
        n = 10 + 2 * case
        points = line(n, "random", seed=case)
        y = torch.sin(2 * points[:, 0]) + 0.1 * torch.randn(n, generator=g, **F64)
        lam = [1e-3, 1e-2, 0.1][case % 3]
        problem = all_patterns_problem(points, y, bias=True, weight_decay=lam, reduction="mean",
                                       output_bias=bool(case % 2))
        assert problem.num_patterns == 2 * n - 1
        solution = solve_native(problem)
        assert solution.status == "optimal", (case, solution.iterations)
        # the 1-D data's own enumeration gives the same problem: the line is all that matters
        along = ConvexProblem(with_bias(points[:, :1]), y, enumerate_patterns(with_bias(points[:, :1])),
                              weight_decay=lam, reduction="mean", output_bias=bool(case % 2))
        assert columns(along.patterns) == columns(problem.patterns)


@pytest.mark.parametrize("points", [[[0, 0], [1, 0], [0.5, 1e-4], [1e9, 3e8]],
                                    [[0, 0], [1, 0], [0.5, 1e-8], [1e6, 3e5]]])
def test_a_far_point_does_not_merge_near_points_onto_a_line(points):
    # the band was one for all the points, from the farthest one's scale: 1e-4 off a unit segment counted as on it
    # beside a point at 1e9, and two of the 13 patterns of these 4 points in general position went missing
    X = with_bias(torch.tensor(points, **F64))
    E = enumerate_patterns(X)
    assert E.shape[1] == 4 * 4 - 4 + 1 and unique_patterns(E).patterns.shape[1] == E.shape[1]


def test_a_point_a_real_distance_off_a_line_is_not_counted_on_it():
    """1e-10 off a unit segment is a million float64 rounding errors: four points in general position, n² − n + 1
    patterns. Catches: (COLLINEAR_RTOL 1e-13 → 1e-9, which merged it onto the line: 11 patterns)."""
    X = with_bias(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 1e-10], [0.3, 3.0]], **F64))
    E = enumerate_patterns(X)
    assert E.shape[1] == 4 * 4 - 4 + 1


@pytest.mark.parametrize("d", [2, 3])
def test_enumeration_refuses_empty_data(d):
    """Catches: (the n = 0 check dropped: an empty (0, 0) result came back without a word)."""
    with pytest.raises(ValueError, match="empty"):
        enumerate_patterns(torch.ones(0, d, **F64))


@pytest.mark.parametrize("points", [[[0.0, 0.0], [1.0, 2.0]], [[0.0, 0.0], [1.0, 0.0], [0.2, 1.0]],
                                    [[0.0, 0.0], [1.0, 0.0], [0.2, 1.0], [0.7, -0.4]]])
def test_few_points_in_the_plane_have_every_cell(points):
    """Two, three and four points: n² − n + 1 patterns, every one of them (the vertices of pairs of neighbours in the
    sorted order count too). Catches: (``triu_indices(offset=2)``: neighbouring pairs skipped)."""
    X = with_bias(torch.tensor(points, **F64))
    n = X.shape[0]
    E = enumerate_patterns(X)
    assert E.shape[1] == n * n - n + 1
    dirs = torch.randn(3, 20000, generator=torch.Generator().manual_seed(0), **F64)
    sampled = {tuple(c) for c in (X @ dirs >= 0).T.tolist() if any(c)}
    assert sampled == {tuple(c) for c in E.T.tolist()}
