"""Activation patterns: computing, packing, deduplicating, tracking, sampling and enumerating."""

from __future__ import annotations

import base64
import pickle

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from hcl.enumeration import enumerate_patterns
from hcl.patterns import (
    PatternTracker,
    activation_patterns,
    dead_neurons,
    pack_patterns,
    pack_signs,
    pattern_keys,
    pre_activations,
    sample_patterns,
    unique_patterns,
    unpack_patterns,
)


def column_set(D: torch.Tensor) -> set[tuple[bool, ...]]:
    return {tuple(col) for col in D.T.tolist()}


def with_bias(points: torch.Tensor) -> torch.Tensor:
    points = points.reshape(points.shape[0], -1).double()
    return torch.cat([points, torch.ones(points.shape[0], 1, dtype=torch.float64)], dim=1)


def sampled_patterns(X: torch.Tensor, count: int, seed: int = 0) -> set[tuple[bool, ...]]:
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(X.shape[1], count, generator=g, dtype=torch.float64)
    return column_set(unique_patterns(X @ directions >= 0, drop_dead=True).patterns)


def realisable(X: torch.Tensor, pattern: torch.Tensor) -> bool:
    """Is there a u with x_jᵀu ≥ 0 on the pattern and x_jᵀu ≤ −1 off it (an LP feasibility problem)?"""
    signs = torch.where(pattern, -1.0, 1.0).double()
    A = (signs[:, None] * X).numpy()
    b = torch.where(pattern, 0.0, -1.0).double().numpy()
    result = linprog(np.zeros(X.shape[1]), A_ub=A, b_ub=b, bounds=[(None, None)] * X.shape[1])
    return result.status == 0


# ------------------------------------------------------------------------------------------ basics
def test_activation_patterns_count_ties_as_active():
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    W = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    D = activation_patterns(X, W)
    # neuron 0 is exactly 0 on rows 0 and 2: ties are active
    assert D.tolist() == [[True, True], [True, False], [True, False]]
    D = activation_patterns(X, W, torch.tensor([-0.5, 1.0]))
    assert D.tolist() == [[False, True], [True, True], [False, True]]  # 0 on rows 1, 2: active
    with pytest.raises(ValueError, match="same d"):
        activation_patterns(X, torch.ones(3, 3))


def test_integer_data_keeps_fractional_weights():
    X = torch.tensor([[1, 1], [2, 1], [3, 1]])  # integer data: 0.5 x − 0.6 is −0.1 at x = 1
    W = torch.tensor([[0.5, -0.6]])
    assert activation_patterns(X, W).T.tolist() == [[False, True, True]]
    assert activation_patterns(X[:, :1], W[:, :1], torch.tensor([-0.6])).T.tolist() == [[False, True, True]]


@pytest.mark.parametrize("n", [1, 7, 8, 63, 64, 65, 130])
def test_packing_round_trips(n):
    g = torch.Generator().manual_seed(n)
    D = torch.rand(n, 9, generator=g) < 0.5
    D[:, 0] = True  # all bits set: the largest word value
    packed = pack_patterns(D)
    assert packed.shape == (9, -(-n // 64)) and packed.dtype == torch.int64
    assert torch.equal(unpack_patterns(packed, n), D)
    assert unpack_patterns(pack_patterns(D[:, :0]), n).shape == (n, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 130, 1001])
def test_pack_signs_matches_packing_the_boolean_patterns(n, dtype, monkeypatch):
    import hcl.patterns as patterns_module

    monkeypatch.setattr(patterns_module, "_BLOCK_BYTES", 40)  # several blocks, the last one short
    g = torch.Generator().manual_seed(n)
    pre = torch.randn(n, 11, generator=g, dtype=dtype)
    pre[0, 0], pre[-1, 1], pre[n // 2, 2] = -0.0, 0.0, float("-inf")  # ties are active, -0.0 included
    pre[:, 3] = -1.0  # a dead neuron
    packed = pack_signs(pre)
    assert torch.equal(unpack_patterns(packed, n), pre >= 0)
    assert torch.equal(packed, pack_patterns(pre >= 0))
    assert PatternTracker().update_packed(packed) == PatternTracker().update(pre >= 0)
    assert PatternTracker().update_packed(packed).dead == int((~(pre >= 0).any(0)).sum()) >= 1


def test_pack_signs_rejects_bad_input():
    with pytest.raises(TypeError, match="floating point"):
        pack_signs(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        pack_signs(torch.ones(4))


def test_unique_patterns_on_hand_made_matrix():
    a, b, z = [1, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]
    columns = [a, z, b, a, a, z, b]
    D = torch.tensor(columns, dtype=torch.bool).T
    result = unique_patterns(D)
    assert result.patterns.shape == (4, 3)
    assert column_set(result.patterns) == column_set(D)
    # each neuron maps to its own column, counts match
    assert torch.equal(result.patterns[:, result.neuron_to_pattern], D)
    assert sorted(result.counts.tolist()) == [2, 2, 3]
    assert result.counts.sum() == 7

    live = unique_patterns(D, drop_dead=True)
    assert live.patterns.shape == (4, 2) and bool(live.patterns.any(0).all())
    assert live.neuron_to_pattern[[1, 5]].tolist() == [-1, -1]
    kept = live.neuron_to_pattern >= 0
    assert torch.equal(live.patterns[:, live.neuron_to_pattern[kept]], D[:, kept])
    assert sorted(live.counts.tolist()) == [2, 3]
    assert dead_neurons(D).tolist() == [False, True, False, False, False, True, False]

    with pytest.raises(TypeError, match="boolean"):
        unique_patterns(D.float())


def test_pattern_keys_identify_columns():
    g = torch.Generator().manual_seed(1)
    D = torch.rand(200, 50, generator=g) < 0.5
    D[:, 10] = D[:, 3]
    D[5, 20] = ~D[5, 21]
    D[:, 21] = D[:, 20]
    D[5, 21] = ~D[5, 20]  # columns 20 and 21 differ in a single bit
    keys = pattern_keys(D)
    assert keys.shape == (50, 2) and keys.dtype == torch.int64
    assert torch.equal(keys[10], keys[3])
    distinct = torch.unique(keys, dim=0).shape[0]
    assert distinct == unique_patterns(D).patterns.shape[1] == 49
    # a column's key does not depend on the other columns
    assert torch.equal(pattern_keys(D[:, 20:22]), keys[20:22])


# ------------------------------------------------------------------------------------------ tracker
def test_tracker_counts_unique_dead_changed_and_new():
    a, b, c, z = [1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]

    def snapshot(*cols):
        return torch.tensor(cols, dtype=torch.bool).T

    tracker = PatternTracker()
    first = tracker.update(snapshot(a, a, b, z))
    assert (first.unique, first.dead, first.changed, first.new, first.unique_live) == (3, 1, 0, 3, 2)
    second = tracker.update(snapshot(a, c, b, z))  # neuron 1 moves to a never-seen pattern
    assert (second.unique, second.dead, second.changed, second.new) == (4, 1, 1, 1)
    third = tracker.update(snapshot(a, a, z, z))  # two neurons move back to seen patterns
    assert (third.unique, third.dead, third.changed, third.new, third.unique_live) == (2, 2, 2, 0, 1)

    # a resumed run continues from a pickled, tensor-free state
    state = pickle.loads(pickle.dumps(tracker.state_dict()))
    assert "torch" not in repr(state)
    resumed = PatternTracker()
    resumed.load_state_dict(state)
    for t in (tracker, resumed):
        fourth = t.update(snapshot(b, c, z, [1, 1, 1]))
        assert (fourth.changed, fourth.new) == (3, 1)
    assert resumed.num_seen == tracker.num_seen == 5

    tracker.reset()
    assert tracker.update(snapshot(a, a, b, z)).new == 3
    with pytest.raises(ValueError, match="number of neurons"):
        tracker.update(snapshot(a, b))


# ------------------------------------------------------------------------------------------ sampling
def test_sample_patterns_unique_and_reproducible():
    X = with_bias(torch.randn(40, 3, dtype=torch.float64))
    D = sample_patterns(X, 300, generator=torch.Generator().manual_seed(0))
    assert D.dtype == torch.bool and D.shape[0] == 40 and 0 < D.shape[1] <= 300
    assert unique_patterns(D).patterns.shape[1] == D.shape[1]  # no duplicates
    assert bool(D.any(0).all())  # no all-zero column
    again = sample_patterns(X, 300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(D, again)
    raw = sample_patterns(X, 25, generator=torch.Generator().manual_seed(0), unique=False)
    assert raw.shape == (40, 25)
    with pytest.raises(ValueError, match="positive"):
        sample_patterns(X, 0)


def test_patterns_of_many_rows_are_computed_a_block_of_rows_at_a_time(monkeypatch):
    """The (n, m) pre-activations are 4–8× the patterns' size (PatternMonitor's snapshot every step, every problem
    built): made a block of whole packed words at a time, with the same patterns, packed or not."""
    import hcl.patterns as patterns

    X, W, b = torch.randn(1000, 7), torch.randn(30, 7), torch.randn(30)
    whole = X @ W.T + b
    made = []
    pre = patterns.pre_activations
    monkeypatch.setattr(patterns, "pre_activations", lambda X, *a: made.append(X.shape[0]) or pre(X, *a))
    monkeypatch.setattr(patterns, "SAMPLE_BYTES", 30 * 4 * 64 * 3)  # 192 rows a block
    assert torch.equal(patterns.pack_hidden_signs(X, W, b), patterns.pack_signs(whole))
    assert torch.equal(patterns.activation_patterns(X, W, b), whole >= 0)
    assert made == [192] * 5 + [40] + [192] * 5 + [40]


def test_sample_patterns_in_blocks_of_gates(monkeypatch):
    """The product ``X g`` is made a block of gates at a time (its size, not the patterns', is what MNIST cannot
    hold at once); the patterns are the one-shot product's."""
    import hcl.patterns as patterns

    X = with_bias(torch.randn(50, 3, dtype=torch.float64))
    gates = torch.randn(4, 37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    monkeypatch.setattr(patterns, "SAMPLE_BYTES", 50 * 8 * 5)  # blocks of 5 gates, the last one of 2
    D = sample_patterns(X, 37, generator=torch.Generator().manual_seed(3), unique=False)
    assert torch.equal(D, X @ gates >= 0)


# ------------------------------------------------------------------------------------------ enumeration
def test_enumerate_1d_gives_all_threshold_patterns():
    x = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, -0.2], dtype=torch.float64)  # 5 distinct values, one tie
    X = with_bias(x)
    E = enumerate_patterns(X)
    assert E.shape[1] == 2 * 5 - 1
    assert bool(E.any(0).all())
    # exactly the thresholds {x ≥ t}, {x ≤ t}
    expected = {tuple((x >= t).tolist()) for t in x} | {tuple((x <= t).tolist()) for t in x}
    assert column_set(E) == expected
    assert sampled_patterns(X, 20000) <= column_set(E)


def test_enumerate_2d_general_position_count_and_completeness():
    g = torch.Generator().manual_seed(3)
    n = 14
    X = with_bias(torch.randn(n, 2, generator=g, dtype=torch.float64))
    E = enumerate_patterns(X)
    # cells of n planes in general position through the origin of R^3, minus the empty pattern
    assert E.shape[1] == n * n - n + 1
    assert unique_patterns(E).patterns.shape[1] == E.shape[1]
    assert sampled_patterns(X, 200000) <= column_set(E)


@pytest.mark.parametrize("kind", ["grid", "line", "duplicates"])
def test_enumerate_2d_degenerate_data_is_complete(kind):
    if kind == "grid":
        points = torch.cartesian_prod(torch.arange(4.0), torch.arange(4.0)) * 0.3 - 0.4
    elif kind == "line":
        t = torch.arange(-3.0, 4.0) / 4  # dyadic: exactly collinear in floating point
        points = torch.stack([t, 0.5 * t + 0.25], dim=1)
    else:
        points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.5, 1.0], [1.0, 0.0]])
    X = with_bias(points)
    E = enumerate_patterns(X)
    assert sampled_patterns(X, 100000) <= column_set(E)
    assert unique_patterns(E).patterns.shape[1] == E.shape[1]
    for column in E.T:
        assert realisable(X, column), column.int().tolist()


def test_enumeration_keeps_its_old_import_path():
    import hcl.enumeration
    import hcl.patterns

    assert hcl.patterns.enumerate_patterns is hcl.enumeration.enumerate_patterns
    assert hcl.patterns.COLLINEAR_RTOL == hcl.enumeration.COLLINEAR_RTOL
    with pytest.raises(AttributeError, match="no_such_name"):
        hcl.patterns.no_such_name  # noqa: B018


def test_enumerate_rejects_other_dimensions():
    with pytest.raises(ValueError, match="d = 4"):
        enumerate_patterns(torch.ones(10, 4))
    with pytest.raises(ValueError, match="d = 1"):
        enumerate_patterns(torch.ones(10, 1))
    with pytest.raises(ValueError, match="all ones"):
        enumerate_patterns(torch.randn(10, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_results_match_cpu():
    g = torch.Generator().manual_seed(4)
    X = with_bias(torch.randn(300, 5, generator=g, dtype=torch.float64))
    W = torch.randn(64, 6, generator=g, dtype=torch.float64)
    D = activation_patterns(X, W)
    D[:, 7] = D[:, 3]
    D[:, 9] = False
    Dc = activation_patterns(X.cuda(), W.cuda())
    Dc[:, 7], Dc[:, 9] = Dc[:, 3], False
    assert torch.equal(Dc.cpu(), D)
    assert torch.equal(pack_patterns(Dc).cpu(), pack_patterns(D))
    assert torch.equal(pattern_keys(Dc).cpu(), pattern_keys(D))
    on_cpu, on_gpu = unique_patterns(D, drop_dead=True), unique_patterns(Dc, drop_dead=True)
    for a, b in zip(on_cpu, on_gpu):
        assert torch.equal(a, b.cpu())
    assert PatternTracker().update(Dc) == PatternTracker().update(D)
    assert torch.equal(enumerate_patterns(X[:40, -3:].cuda()).cpu(), enumerate_patterns(X[:40, -3:]))


def test_sample_patterns_takes_numpy_integers():
    import numpy as np

    assert sample_patterns(torch.randn(5, 2), np.int64(3), unique=False).shape == (5, 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        sample_patterns(torch.randn(5, 2), True)


def test_the_pattern_history_is_sixteen_bytes_a_pattern_and_counts_as_a_set_would():
    """MNIST's mini-batch training meets m new patterns at every step: a Python set of key pairs took 190 bytes a
    pattern and 2.4 s a million to save. The key set counts as the set did, its state is a base64 string of 16
    bytes a pattern, a state saved as a list of key pairs (earlier checkpoints) loads, and ``drop_last`` forgets the
    last snapshot."""
    g = torch.Generator().manual_seed(0)
    tracker, seen = PatternTracker(), set()
    for step in range(30):
        D = torch.rand(70, 40, generator=g) < 0.5
        D[:, :10] = torch.rand(70, 1, generator=g) < 0.5 if step % 3 else D[:, :10]  # repeats within a snapshot
        keys = {tuple(k) for k in pattern_keys(D).tolist()}
        stats = tracker.update(D)
        assert stats.new == len(keys - seen) and tracker.num_seen == len(seen | keys)
        seen |= keys
    state = tracker.state_dict()
    assert len(base64.b64decode(state["seen"])) == 16 * len(seen)
    assert len(base64.b64decode(tracker.state_dict(drop_last=True)["seen"])) == 16 * (len(seen) - stats.new)
    for saved in (state, {**state, "seen": sorted(seen)}):
        resumed = PatternTracker()
        resumed.load_state_dict(saved)
        assert resumed.num_seen == len(seen) and resumed.update(D).new == 0


def test_a_checkpoint_inside_the_step_after_a_resume_keeps_the_loaded_snapshot():
    """Right after a load, state_dict(drop_last=True) had dropped the loaded previous snapshot: the run resumed from
    it logged patterns/changed = 0 at its first step."""
    g = torch.Generator().manual_seed(0)
    D0, D1 = (torch.rand(30, 8, generator=g) > 0.5 for _ in range(2))
    tracker = PatternTracker()
    tracker.update(D0)
    resumed = PatternTracker()
    resumed.load_state_dict(tracker.state_dict())
    again = PatternTracker()
    again.load_state_dict(resumed.state_dict(drop_last=True))  # a checkpoint before the resumed run's first snapshot
    assert again.update(D1) == tracker.update(D1)


def test_unpack_refuses_more_rows_than_the_packed_words_hold():
    """Catches: (the bound loosened by a word: unpack(…, 65) of one word returned 64 rows, not 65, silently)."""
    packed = pack_patterns(torch.ones(10, 3, dtype=torch.bool))
    assert unpack_patterns(packed, 64).shape == (64, 3)
    with pytest.raises(ValueError, match="exceeds"):
        unpack_patterns(packed, 65)


def test_pre_activations_refuse_a_bias_of_the_wrong_length():
    """A one-entry bias for three neurons must not broadcast. Catches: (``!=`` → ``>``)."""
    X, W = torch.randn(5, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="3 entries"):
        pre_activations(X, W, torch.tensor([0.5]))


def test_hidden_signs_in_blocks_that_are_not_a_whole_number_of_words(monkeypatch):
    """A byte budget that is not a multiple of 64 rows: the blocks are rounded down to whole words, so that their
    words concatenate into the whole matrix's. Catches: (the rounding dropped: blocks of 100 rows)."""
    import hcl.patterns as patterns

    g = torch.Generator().manual_seed(0)
    X, W, b = torch.randn(1000, 7, generator=g), torch.randn(30, 7, generator=g), torch.randn(30, generator=g)
    monkeypatch.setattr(patterns, "SAMPLE_BYTES", 30 * 4 * 100)  # 100 rows of float32 pre-activations
    assert torch.equal(patterns.pack_hidden_signs(X, W, b), pack_signs(X @ W.T + b))
