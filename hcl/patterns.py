"""Activation patterns of a two-layer ReLU network's hidden neurons.

The pattern of neuron ``i`` on data ``X`` is the boolean column ``1[X w_i (+ b_i) ≥ 0]``. **Ties count as
active** (``≥``, the convention of ``docs/convex.md`` and of the blog post's pattern counter, see
``docs/experiments.md``); scnn uses a strict ``> 0``. The two differ only for points exactly on a neuron's hyperplane.

Everything here runs on the data's device without a Python loop over neurons: columns are packed into
64-bit words, hashed to 128-bit keys with wrapping ``int64`` arithmetic and deduplicated with ``torch.unique``
on the keys (an ``(m, 2)`` tensor, whatever ``n``), which also track patterns over a run. Patterns can be
packed straight from the hidden pre-activations (:func:`pack_signs`), without the ``(n, m)`` boolean matrix.

Patterns are sampled from Gaussian gates (:func:`sample_patterns`); low-dimensional data can have all its patterns
enumerated instead (:func:`hcl.enumeration.enumerate_patterns`).
"""

from __future__ import annotations

import base64
import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hcl.key_set import KEY, KeySet

_BITS_PER_WORD = 64
# Bytes of a product with X computed at once (sampled gates' X g, hidden pre-activations): the whole (n, k) product
# at MNIST's full size is 1.2 GB for 5 000 gates, for patterns of 34 MB
SAMPLE_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- computing patterns
def activation_patterns(X: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(n, m)`` boolean ``X @ weight.T (+ bias) ≥ 0``: one column per neuron, ties active.

    Args:
        X: ``(n, d)`` data.
        weight: ``(m, d)`` first-layer weight (``nn.Linear`` layout).
        bias: ``(m,)`` first-layer bias, or ``None``.
    """
    rows = _block_rows(X, weight)
    if X.shape[0] <= rows:
        return pre_activations(X, weight, bias) >= 0
    D = torch.empty(X.shape[0], weight.shape[0], dtype=torch.bool, device=X.device)
    for lo in range(0, X.shape[0], rows):  # a block of rows at a time: the floats are 4–8× the patterns' size
        torch.ge(pre_activations(X[lo:lo + rows], weight, bias), 0, out=D[lo:lo + rows])
    return D


def _block_rows(X: Tensor, weight: Tensor) -> int:
    """Rows of ``X`` whose pre-activations take ``SAMPLE_BYTES`` (a whole number of packed words)."""
    item = torch.promote_types(X.dtype, weight.dtype).itemsize
    return max(_BITS_PER_WORD, SAMPLE_BYTES // max(1, weight.shape[0] * item) // _BITS_PER_WORD * _BITS_PER_WORD)


def pre_activations(X: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(n, m)`` hidden pre-activations ``X @ weight.T (+ bias)`` (arguments as in :func:`activation_patterns`)."""
    if X.ndim != 2 or weight.ndim != 2 or X.shape[1] != weight.shape[1]:
        raise ValueError(
            f"X must be (n, d) and weight (m, d) with the same d, got {tuple(X.shape)} and {tuple(weight.shape)}"
        )
    # in the promoted dtype: integer data with float weights must not round the weights to integers
    dtype = torch.promote_types(X.dtype, weight.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    pre = X.to(dtype) @ weight.to(X.device, dtype).T
    if bias is not None:
        if bias.numel() != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} entries, got {bias.numel()}")
        pre.add_(bias.to(pre).reshape(1, -1))  # in place: a second (n, m) matrix is what MNIST's sizes cannot spare
    return pre


def pack_hidden_signs(X: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``pack_signs(pre_activations(X, weight, bias))`` a block of rows at a time: ``(n, m)`` bits without the
    ``(n, m)`` floats (4 GB at n = 55 000, m = 5 000 in float32 for 33 MB of patterns)."""
    rows = _block_rows(X, weight)
    if X.shape[0] <= rows:
        return pack_signs(pre_activations(X, weight, bias))
    # blocks of whole words: each block's words are the whole matrix's
    return torch.cat([pack_signs(pre_activations(X[lo:lo + rows], weight, bias))
                      for lo in range(0, X.shape[0], rows)], dim=1)


def dead_neurons(D: Tensor) -> Tensor:
    """``(m,)`` boolean: neurons whose pattern is all zero (inactive on every point)."""
    _check_patterns(D)
    return ~D.any(dim=0)


def pack_patterns(D: Tensor) -> Tensor:
    """Pack the columns of a boolean ``(n, m)`` matrix into ``(m, ceil(n/64))`` ``int64`` words.

    Row ``j`` of the result encodes column ``j`` of ``D``: bytes of 8 consecutive rows (bit ``b`` of byte ``k``
    is ``D[8k + b, j]``), 8 bytes viewed as one ``int64`` word (so a word may be negative; only equality and
    hashing use it).
    """
    _check_patterns(D)
    return _pack_rows(D, _copy_bits)


def pack_signs(pre_activations: Tensor) -> Tensor:
    """``pack_patterns(pre_activations >= 0)`` without forming the ``(n, m)`` boolean matrix.

    One pass over the pre-activations, a block of rows at a time, so that the bit slices stay in cache: the
    patterns of the ``(n, m)`` hidden pre-activations (ties active) as ``(m, ceil(n/64))`` ``int64`` words.
    """
    if not isinstance(pre_activations, Tensor) or pre_activations.ndim != 2:
        raise ValueError(f"pre_activations must be a 2-D (n, m) tensor, got {getattr(pre_activations, 'shape', '')}")
    if not pre_activations.is_floating_point():
        raise TypeError(f"pre_activations must be floating point, got {pre_activations.dtype}")
    return _pack_rows(pre_activations, _sign_bits)


def _copy_bits(rows: Tensor, out: Tensor) -> None:
    out.copy_(rows)


def _sign_bits(rows: Tensor, out: Tensor) -> None:
    torch.ge(rows, 0, out=out)  # ties active; -0.0 ≥ 0 too


# Bytes per bit slice of one block: the 8 slices of a block and the byte being built stay in the L2 cache.
_BLOCK_BYTES = 1 << 18


def _pack_rows(source: Tensor, bits_of) -> Tensor:
    n, m = source.shape
    words = max(1, -(-n // _BITS_PER_WORD))
    octets = torch.zeros(words * 8, m, dtype=torch.uint8, device=source.device)
    full = n // 8  # bytes whose 8 rows all exist
    block = max(1, _BLOCK_BYTES // max(m, 1))
    scratch = torch.empty(min(block, max(full, 1)), m, dtype=torch.uint8, device=source.device)
    for start in range(0, full, block):
        stop = min(full, start + block)
        rows = source[8 * start : 8 * stop].reshape(stop - start, 8, m)
        byte, bit_slice = octets[start:stop], scratch[: stop - start]
        bits_of(rows[:, 0], byte)
        for bit in range(1, 8):
            bits_of(rows[:, bit], bit_slice)
            byte.add_(bit_slice, alpha=1 << bit)  # distinct bits: adding is OR-ing
    for bit in range(n - 8 * full):  # the last, partial byte
        bits_of(source[8 * full + bit], scratch[0])
        octets[full].add_(scratch[0], alpha=1 << bit)
    packed = torch.empty(m, words * 8, dtype=torch.uint8, device=source.device)  # fresh strides: viewable as int64
    packed.copy_(octets.T)
    return packed.view(torch.int64)


def unpack_patterns(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_patterns`: ``(m, words)`` words back to the ``(n, m)`` boolean matrix."""
    if packed.ndim != 2 or packed.dtype != torch.int64:
        raise ValueError(f"packed must be a 2-D int64 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if n > packed.shape[1] * _BITS_PER_WORD:
        raise ValueError(f"n = {n} exceeds the {packed.shape[1] * _BITS_PER_WORD} packed bits")
    octets = packed.contiguous().view(torch.uint8)  # (m, 8 · words)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (octets.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], packed.shape[1] * _BITS_PER_WORD)[:, :n].T.bool()  # m = 0 too


class UniquePatterns(NamedTuple):
    """Distinct patterns among the columns of ``D``.

    Attributes:
        patterns: ``(n, P)`` boolean, the distinct columns.
        neuron_to_pattern: ``(m,)`` long, the column of ``patterns`` each neuron has (``-1`` for a dead
            neuron when the all-zero pattern was dropped).
        counts: ``(P,)`` long, how many neurons share each pattern.
    """

    patterns: Tensor
    neuron_to_pattern: Tensor
    counts: Tensor


def unique_patterns(D: Tensor, drop_dead: bool = False) -> UniquePatterns:
    """The distinct columns of ``D`` (in the order of their keys), with the neuron → pattern map.

    Args:
        D: ``(n, m)`` boolean patterns, one column per neuron.
        drop_dead: remove the all-zero pattern; its neurons map to ``-1``.
    """
    _check_patterns(D)
    n, m = D.shape
    long = dict(dtype=torch.long, device=D.device)
    if m == 0:
        return UniquePatterns(D.clone(), torch.zeros(0, **long), torch.zeros(0, **long))
    # Deduplicate the (m, 2) 128-bit keys rather than the (m, n/64) words: same result (collisions have
    # probability ~m²·2⁻¹²⁹), a tiny sort whatever n.
    keys, inverse, counts = torch.unique(pattern_keys(D), dim=0, return_inverse=True, return_counts=True)
    # One representative neuron per distinct pattern: the first one that has it.
    first = torch.full((keys.shape[0],), m, **long).scatter_reduce(0, inverse, torch.arange(m, **long), reduce="amin")
    patterns = D[:, first]
    if drop_dead:
        live = patterns.any(dim=0)
        if not bool(live.all()):
            new_index = torch.cumsum(live.long(), 0) - 1
            new_index[~live] = -1
            inverse = new_index[inverse]
            patterns, counts = patterns[:, live], counts[live]
    return UniquePatterns(patterns, inverse, counts)


# Fixed odd 64-bit multipliers (as signed int64) and offsets of the per-word hash, two lanes.
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB
_LANE_SEEDS = (0x2545F4914F6CDD1D, 0x1B873593CC9E2D51)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser with wrapping int64 arithmetic: a bijection that spreads every input bit."""
    x = x.clone()
    shifted = torch.empty_like(x)
    for shift, multiplier in ((30, _MIX_1), (27, _MIX_2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=shifted)
        shifted.bitwise_and_((1 << (64 - shift)) - 1)  # a logical shift: drop the copies of the sign bit
        x.bitwise_xor_(shifted)
        if multiplier is not None:
            x.mul_(multiplier)
    return x


def pattern_keys(D: Tensor) -> Tensor:
    """``(m, 2)`` int64: a 128-bit hash of each column of ``D`` (two independent 64-bit lanes).

    Each packed word is salted with its position and mixed once (a bijection of 64-bit words); lane 1 sums
    the mixed words, lane 2 sums them times per-position odd multipliers, both with wrapping ``int64``
    arithmetic, so the keys are computed on the data's device in a few vectorised passes. Equal columns
    have equal keys; distinct columns collide with probability about ``2^-128`` for data unrelated to the
    hash. Keys depend on ``n`` only through the words, so compare keys of one data set.
    """
    return keys_of_packed(pack_patterns(D))


def keys_of_packed(packed: Tensor) -> Tensor:
    """:func:`pattern_keys` of columns already packed by :func:`pack_patterns` or :func:`pack_signs`."""
    if packed.ndim != 2 or packed.dtype != torch.int64:
        raise ValueError(f"packed must be a 2-D int64 tensor, got {packed.dtype} {tuple(packed.shape)}")
    positions = torch.arange(1, packed.shape[1] + 1, dtype=torch.int64, device=packed.device)
    salt = _mix64(positions * _LANE_SEEDS[0])
    multipliers = _mix64(positions * _LANE_SEEDS[1]) | 1
    mixed = _mix64(packed ^ salt)
    lanes = [mixed.sum(dim=1), mixed.mul_(multipliers).sum(dim=1)]
    return torch.stack(lanes, dim=1)


# --------------------------------------------------------------------------- tracking over a run
class PatternStats(NamedTuple):
    """Pattern counts at one snapshot.

    Attributes:
        unique: distinct patterns among the neurons, the all-zero (dead) one included.
        dead: neurons with the all-zero pattern.
        changed: neurons whose pattern differs from the previous snapshot (0 at the first).
        new: distinct patterns never seen before in the run (all of them at the first snapshot).
        unique_live: distinct patterns other than the all-zero one (the convex problem's blocks).
    """

    unique: int
    dead: int
    changed: int
    new: int
    unique_live: int


class PatternTracker:
    """Follows the neurons' patterns over a run: distinct, dead, changed and never-seen-before counts.

    Patterns are remembered by their 128-bit keys (:func:`pattern_keys`), not their ``n`` bits
    (:class:`hcl.key_set.KeySet`), and the history is saved by :meth:`state_dict` as a base64 string: a resumed run
    continues ``new`` and ``changed`` where it stopped. It grows with the distinct patterns seen, 16 bytes each in
    memory, 22 in a checkpoint (mini-batch Adam on MNIST with 500 neurons meets 500 new ones at every step: 8 MB per
    1 000 steps).
    All snapshots must be taken on the same data (the same rows of ``D``).

    Example::

        tracker = PatternTracker()
        stats = tracker.update(activation_patterns(X, W, b))
        stats.unique, stats.dead, stats.changed, stats.new
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next snapshot counts as the first)."""
        self._seen = KeySet()
        self._previous: Tensor | None = None  # (m, 2) keys of the last snapshot
        self._undo: tuple[np.ndarray, Tensor | None] = (np.empty(0, KEY), None)  # the last update's additions, previous

    @property
    def num_seen(self) -> int:
        """Distinct patterns seen so far in the run."""
        return len(self._seen)

    def update(self, D: Tensor) -> PatternStats:
        """Record the snapshot ``D`` (``(n, m)`` boolean) and return its counts."""
        return self.update_packed(pack_patterns(D))

    def update_packed(self, packed: Tensor) -> PatternStats:
        """Record a snapshot packed by :func:`pack_patterns` or :func:`pack_signs` (``(m, words)`` int64)."""
        keys = keys_of_packed(packed)
        # A dead neuron's key is the all-zero column's: no second pass over the patterns.
        zero_key = keys_of_packed(torch.zeros(1, packed.shape[1], dtype=torch.int64, device=packed.device))
        dead = (keys == zero_key).all(dim=1)
        distinct = torch.unique(keys, dim=0)
        has_dead = bool(dead.any())
        if self._previous is None:
            changed = 0
        else:
            if self._previous.shape != keys.shape:
                raise ValueError(
                    f"the number of neurons changed from {self._previous.shape[0]} to {keys.shape[0]}: "
                    "call reset() before tracking a different network"
                )
            changed = int((self._previous.to(keys.device) != keys).any(dim=1).sum())
        candidates = distinct.cpu().numpy()
        high, low = np.ascontiguousarray(candidates[:, 0]), np.ascontiguousarray(candidates[:, 1])
        new = ~self._seen.contains(high, low)
        self._seen.add(high[new], low[new])
        added = _as_keys(candidates[new])
        self._undo = (added, self._previous)
        self._previous = keys
        unique = distinct.shape[0]
        return PatternStats(
            unique=unique, dead=int(dead.sum()), changed=changed, new=len(added), unique_live=unique - int(has_dead)
        )

    def state_dict(self, drop_last: bool = False) -> dict:
        """The history as a string and lists (what ``torch.load(weights_only=True)`` reads); with ``drop_last``, as it
        was before the last snapshot (a checkpoint of a step that did not finish, which the resumed run takes again)."""
        seen = self._seen.records(without=self._undo[0] if drop_last else None)
        previous = self._undo[1] if drop_last else self._previous
        return {"seen": base64.b64encode(seen.tobytes()).decode("ascii"),
                "previous": None if previous is None else previous.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a history saved by :meth:`state_dict` (or, by earlier versions, as a list of key pairs)."""
        if not isinstance(state, dict) or "seen" not in state or "previous" not in state:
            raise ValueError("state must be a dict with keys 'seen' and 'previous' (from state_dict())")
        seen = state["seen"]
        if isinstance(seen, str):
            self._seen = KeySet.of_records(np.frombuffer(base64.b64decode(seen), dtype=KEY), distinct=True)
        else:
            self._seen = KeySet.of_records(_as_keys(np.asarray(seen, dtype=np.int64).reshape(-1, 2)))
        previous = state["previous"]
        self._previous = None if previous is None else torch.tensor(previous, dtype=torch.int64).reshape(-1, 2)
        self._undo = (np.empty(0, KEY), self._previous)  # nothing added since: the snapshot before is the loaded one


def _as_keys(pairs: np.ndarray) -> np.ndarray:
    """``(N, 2)`` int64 key pairs as ``N`` records of :data:`~hcl.key_set.KEY`."""
    return np.ascontiguousarray(pairs, dtype=np.int64).view(KEY).reshape(-1)


# --------------------------------------------------------------------------- sampling
def sample_patterns(X: Tensor, k: int, generator: torch.Generator | None = None, unique: bool = True) -> Tensor:
    """Patterns ``1[X g ≥ 0]`` of ``k`` Gaussian gates ``g ~ N(0, I)``.

    Args:
        X: ``(n, d)`` data (with its bias column if the network has a first-layer bias).
        k: number of gates.
        generator: random generator; gates are drawn on its device and moved to ``X``'s.
        unique: drop duplicate and all-zero columns, so at most ``k`` columns come back.

    Returns:
        ``(n, ≤ k)`` boolean (exactly ``k`` columns when ``unique`` is False).
    """
    if X.ndim != 2:
        raise ValueError(f"X must be (n, d), got shape {tuple(X.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # NumPy's integers too
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)
    device = generator.device if generator is not None else X.device
    dtype = X.dtype if X.is_floating_point() else torch.float32
    gates = torch.randn(X.shape[1], k, generator=generator, dtype=dtype, device=device).to(X.device)
    Xd = X.to(dtype)
    D = torch.empty(X.shape[0], k, dtype=torch.bool, device=X.device)
    step = max(1, SAMPLE_BYTES // max(1, X.shape[0] * Xd.element_size()))
    for lo in range(0, k, step):  # a block of gates at a time: X g is 4–8× the size of its patterns
        torch.ge(Xd @ gates[:, lo:lo + step], 0, out=D[:, lo:lo + step])
    if unique:
        D = unique_patterns(D, drop_dead=True).patterns
    return D


def _check_patterns(D: Tensor) -> None:
    if not isinstance(D, Tensor) or D.ndim != 2:
        raise ValueError(f"patterns must be a 2-D (n, m) tensor, got {type(D).__name__} {getattr(D, 'shape', '')}")
    if D.dtype != torch.bool:
        raise TypeError(f"patterns must be a boolean tensor, got {D.dtype}")


def __getattr__(name: str):
    """``enumerate_patterns`` and ``COLLINEAR_RTOL`` live in :mod:`hcl.enumeration`; imports from here still work."""
    if name in ("enumerate_patterns", "COLLINEAR_RTOL"):
        from hcl import enumeration

        return getattr(enumeration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
