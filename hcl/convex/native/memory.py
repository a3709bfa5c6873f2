"""Memory: what each native method allocates, what the device has free, and the plan that fits the two.

A solve that does not fit is refused before it allocates anything (:class:`SolverMemoryError`), and ``method="auto"``
takes the interior point only when it fits the budget, else the first-order method with a chunk size chosen from
the budget. The estimates count the tensors each method holds at its peak (see ``docs/solvers.md#memory``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hcl.convex.native.anderson import history_bytes
from hcl.convex.native.options import (
    ADMM_MATRIX_CHUNK,
    ANDERSON_MEMORY,
    FLOAT32_BLOCKS_FROM_D_OVER_N,
    FLOAT32_SCHUR_ABOVE,
    METHODS,
    NEWTON_MAX_SAMPLES,
    OUTER_PRODUCTS_MAX_BYTES,
    NativeOptions,
)
from hcl.convex.problem import ConvexProblem

# Fraction of the free memory a solve may take when no memory_limit is given: the training loop, its data and other
# monitors share the rest; see docs/solvers.md#memory
DEFAULT_MEMORY_FRACTION = 0.5
# Tensors of the block outputs' size (n, 2, P, c) alive at once at a method's peak, counted in interior_point.py /
# first_order.py / admm.py (with the multipliers of its best certificate) and certificate.py; see docs/solvers.md#memory
NEWTON_OUTPUT_COPIES = 20
FISTA_OUTPUT_COPIES = 10
ADMM_OUTPUT_COPIES = 10
# Tensors of the variables' size (d, 2, P, c) alive at once, and the (K, d, d) blocks: two Newton systems overlap
# while the next one is built (its B, L and B⁻¹, then B⁻¹, G, G + ridge and L_G; the previous B⁻¹ and L_G), and the
# whole solves where the blocks dominate (d near n) peaked above six: docs/solvers.md#memory
VARIABLE_COPIES = 24
BLOCK_COPIES = 8
# Fixed allowance for the interpreter's and the libraries' own working memory during a solve (LAPACK buffers, thread
# pools); see docs/solvers.md#memory
BASE_BYTES = 64 << 20


class SolverMemoryError(MemoryError):
    """A solve does not fit the memory budget; raised before it allocates anything.

    Attributes:
        method: the method refused (a native method, or the conic solver's name).
        sizes: ``(n, d, P, c)``.
        estimate: the method's footprint in bytes.
        budget: the budget in bytes.
    """

    def __init__(self, method: str, sizes: tuple[int, int, int, int], estimate: int, budget: int, why: str,
                 advice: str = "", considered: dict[str, int] | None = None) -> None:
        self.method, self.sizes, self.estimate, self.budget = method, sizes, estimate, budget
        n, d, P, c = sizes
        who = f"native method {method!r}" if method in METHODS else method
        also = " and ".join(f"{name!r} at {_gib(size)}" for name, size in (considered or {}).items())
        limit = "raise memory_limit (bytes)" if why == "memory_limit" else "set memory_limit (bytes)"
        super().__init__(
            f"{who} needs about {_gib(estimate)} for n={n}, d={d}, P={P}, c={c}, more than the memory budget of "
            f"{_gib(budget)} ({why}){'; method=auto found ' + also + ' too large as well' if also else ''}; solve a "
            f"smaller problem (fewer samples or patterns){advice}, or {limit}"
        )


# cvxpy's canonical form and the conic solver's own matrices: 550–1 030 bytes per entry of n·d·P·c measured with
# Clarabel and ECOS, up to 1 660 with SCS (many patterns of few dimensions); docs/solvers.md#memory
CONIC_BYTES_PER_ENTRY = 2048


def check_conic_memory(problem: ConvexProblem, solver: str, memory_limit: int | None = None) -> None:
    """Refuse a cvxpy solve (``solver``) of ``problem`` that would not fit the CPU's budget, before it builds."""
    NativeOptions(memory_limit=memory_limit)  # the native solver's check of the value
    sizes = (problem.n, problem.d, problem.num_patterns, problem.c)
    needed = CONIC_BYTES_PER_ENTRY * sizes[0] * sizes[1] * sizes[2] * sizes[3] + BASE_BYTES
    budget, why = memory_budget("cpu", memory_limit)  # cvxpy works on a CPU copy
    if budget is not None and needed > budget:
        raise SolverMemoryError(solver, sizes, needed, budget, why, CONIC)


# what a refusal advises beyond a smaller problem or another budget
CONIC = ", or solver='native', which needs less memory"
OTHER_METHOD = ", or method='auto', which takes a method that fits"
SMALLER_CHUNK = ", or a smaller chunk_size"


def _gib(size: float) -> str:
    """Bytes in GiB, or in MiB below 1 GiB, with three significant digits: two sizes that differ read differently."""
    mib = size / 2**20
    if mib < 999.5:  # what rounds to 1 000 MiB or more reads in GiB
        return f"{mib:.3g} MiB"
    gib = mib / 1024
    return f"{gib:.3g} GiB" if gib < 999.5 else f"{gib:,.0f} GiB"


@dataclass(frozen=True)
class Footprint:
    """A method's footprint in bytes, by part."""

    fixed: int  # the data's copies and the variables
    outputs: int  # tensors of the block outputs' size (n, 2, P, c)
    blocks: int  # the interior point's (d, d) blocks and the rows x_j x_jᵀ
    schur: int  # the interior point's n × n matrices
    chunks: int  # per-chunk temporaries

    @property
    def total(self) -> int:
        return self.fixed + self.outputs + self.blocks + self.schur + self.chunks + BASE_BYTES


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def footprint(
    method: str,
    n: int,
    d: int,
    P: int,
    c: int,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
    output_bias: bool = True,
    anderson: int | None = None,
) -> Footprint:
    """The peak memory of the native ``method`` (``"newton"``, ``"fista"`` or ``"admm"``) on a problem of these sizes.

    Args:
        method: ``"newton"``, ``"fista"`` or ``"admm"``.
        n, d, P, c: samples, features, patterns, outputs.
        dtype: the working precision (the interior point's blocks and Schur matrices may be float32 within it).
        chunk_size: as in :class:`~hcl.convex.native.NativeOptions` (``None``: the method's default).
        output_bias: the interior point's Schur matrices are centred with an output bias (two more ``n × n``).
        anderson: the ADMM's Anderson memory (``None``: ``ANDERSON_MEMORY``), whose history counts with the outputs.

    The count is the same on every device: the tensors are the same.
    """
    w = _itemsize(dtype)
    K = 2 * P * c
    outputs_elems = n * K
    # the operator's copies of X and the patterns ([D, −D], 2D − 1, its cone mask), the final check's float64 copy
    # of the problem and the certificate's float64 copies of X, the patterns and its (d, 2, P, c) terms
    fixed = n * (d + 6 * P) * w + n * (d + P + c) * 8 + n * (d + P) * 8 + VARIABLE_COPIES * d * K * max(w, 8)
    # rank test or row-space basis: the Gram matrix (tall X) or an SVD (wide X)
    fixed += (d * d + n * d) * 8 if n >= d else 2 * (n * d + n * n) * 8
    if method == "newton":
        large = n * n * P * d * c >= FLOAT32_SCHUR_ABOVE and dtype == torch.float64
        schur_w = 4 if large else w
        budget = chunk_size or max(1, (1 << 24) // max(n * d, 1))
        # blocks: up to BLOCK_COPIES (K, d, d) tensors; a float32 build is followed by a working-precision rebuild
        blocks = BLOCK_COPIES * K * d * d * w
        float32_blocks = large and d >= FLOAT32_BLOCKS_FROM_D_OVER_N * n
        if n * d * d * w <= OUTER_PRODUCTS_MAX_BYTES:  # the rows x_j x_jᵀ, kept (in each precision used)
            blocks += n * d * d * (w + (4 if float32_blocks else 0))
        else:  # the weighted rows of a chunk of blocks
            blocks += min(budget, K) * n * d * w
        # Schur matrices: the build buffer, its working-precision copy, the centring's temporaries, the new and the
        # previous factor; and the chunk of factors D_i X L_i
        schur = c * n * n * (schur_w + w * (1 if schur_w != w else 0) + w * (2 if output_bias else 0) + 2 * w)
        schur += n * min(P, budget) * d * schur_w
        return Footprint(fixed, NEWTON_OUTPUT_COPIES * outputs_elems * w, blocks, schur, 0)
    if method == "fista":
        rows = min(n, chunk_size or n)
        # the certificate's float64 copies of the multipliers and block outputs (three of them) on top of the method's
        certificate = 3 * outputs_elems * 8 if w < 8 else 0
        # per chunk: the hinge, the extrapolated outputs, the adjoint's weighted copy and the residual spread
        chunks = 4 * rows * K * w
        return Footprint(fixed, FISTA_OUTPUT_COPIES * outputs_elems * w + certificate, 0, 0, chunks)
    if method == "admm":
        # the float64 twin of X and the patterns for the checks, and the check's float64 block outputs, multipliers
        # and the certificate's products (four of the outputs' size)
        checks = n * d * 8 + 3 * n * P * 8 + 4 * outputs_elems * 8
        # the n × n matrix, factored in place (float64), and the row blocks it is built from
        memory = ANDERSON_MEMORY if anderson is None else anderson
        history = history_bytes(memory, (n + d) * K, w) if memory else 0  # ζ is (d, 2, P, c) and (n, 2, P, c)
        matrix = n * n * 8 + 2 * min(n, ADMM_MATRIX_CHUNK) * n * 8
        return Footprint(fixed + checks, ADMM_OUTPUT_COPIES * outputs_elems * w + history, 0, matrix, 0)
    raise ValueError(f"method must be 'newton', 'fista' or 'admm', got {method!r}")


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device``: on CUDA ``torch.cuda.mem_get_info`` plus what torch's cache holds unused (free to
    torch, not to the driver); on the CPU ``MemAvailable`` of ``/proc/meminfo`` (``psutil`` where there is no
    ``/proc``), within the cgroup's limit when one is set; ``None`` where unknown (a driver that cannot say)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free = int(torch.cuda.mem_get_info(device)[0])
            return free + int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
        except (RuntimeError, AssertionError, ValueError):  # no driver, or a device it cannot query
            return None
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    room = _cgroup_room()
    if room is not None:
        free = room if free is None else min(free, room)
    return free


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # optional: where there is no /proc
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)


def _cgroup_room(files: tuple[tuple[str, str], ...] = CGROUP_FILES) -> int | None:
    """The cgroup's memory limit less its usage (cgroup v2, else v1), or ``None`` without a limit."""
    for limit_file, usage_file in files:
        try:
            with open(limit_file) as handle:
                limit = handle.read().strip()
            with open(usage_file) as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def memory_budget(device: torch.device | str, memory_limit: int | None = None) -> tuple[int | None, str]:
    """The bytes a solve on ``device`` may take, and how they were set: ``memory_limit`` when given, else
    ``DEFAULT_MEMORY_FRACTION`` of :func:`free_memory` (``None`` where that is unknown)."""
    if memory_limit is not None:
        return int(memory_limit), "memory_limit"
    free = free_memory(device)
    if free is None:
        return None, "free memory unknown"
    device_name = torch.device(device).type
    return int(DEFAULT_MEMORY_FRACTION * free), f"{DEFAULT_MEMORY_FRACTION:g} of the {_gib(free)} free on {device_name}"


def plan(problem: ConvexProblem, options: NativeOptions) -> NativeOptions:
    """``options`` with ``method`` (and, for the first-order method, ``chunk_size``) chosen to fit the budget.

    ``"auto"`` takes the interior point when ``n ≤ NEWTON_MAX_SAMPLES`` and it fits, else the ADMM when its ``n × n``
    matrices fit, else the first-order method with the largest chunk of samples that fits. An explicit method keeps
    its ``chunk_size`` (``"fista"`` gets one chosen from the budget when it has none and the whole does not fit). The
    ADMM's Anderson history, unless ``anderson`` is given, is ``ANDERSON_MEMORY`` differences or as many as fit
    (none when not one does).

    Raises:
        SolverMemoryError: the method asked for (or, for ``"auto"``, the first-order method even chunked) does not fit.
    """
    n, d, P, c = problem.n, problem.d, problem.num_patterns, problem.c
    sizes = (n, d, P, c)
    budget, why = memory_budget(problem.X.device, options.memory_limit)

    def estimate(method: str, chunk_size: int | None, anderson: int | None = None) -> int:
        dtype = options.working_dtype(problem, method)
        return footprint(method, n, d, P, c, dtype, chunk_size, problem.output_bias, anderson).total

    method = options.method
    if budget is None:
        return options
    considered: dict[str, int] = {}  # with "auto": the methods that did not fit, for the refusal

    def auto_advice() -> str:  # "auto" helps where its last resort, one sample per chunk, fits
        return OTHER_METHOD if estimate("fista", 1) <= budget else ""
    # "auto" with float32 asked for: a first-order method (the interior point works in float64 only)
    if method == "newton" or (method == "auto" and n <= NEWTON_MAX_SAMPLES and options.dtype != torch.float32):
        needed = estimate("newton", options.chunk_size)
        if needed <= budget:
            return dataclasses.replace(options, method="newton") if method == "auto" else options
        if method == "newton":
            raise SolverMemoryError("newton", sizes, needed, budget, why, auto_advice())
        considered["newton"] = needed
    if method in ("admm", "auto"):
        anderson = options.anderson
        if anderson is None:  # the default memory, or as much of it as fits (none at all if not one difference)
            anderson = next((m for m in range(ANDERSON_MEMORY, 0, -1) if estimate("admm", None, m) <= budget), 0)
        needed = estimate("admm", None, anderson)
        if needed <= budget:
            return dataclasses.replace(options, method="admm", anderson=anderson)
        if method == "admm":
            raise SolverMemoryError("admm", sizes, needed, budget, why, auto_advice())
        considered["admm"] = needed
    # the first-order method: whole if it fits, else the largest chunk of samples that does
    if options.chunk_size is not None:
        needed = estimate("fista", options.chunk_size)
        if needed > budget:
            smaller = estimate("fista", 1) <= budget
            raise SolverMemoryError("fista", sizes, needed, budget, why, SMALLER_CHUNK if smaller else "", considered)
        return dataclasses.replace(options, method="fista")
    whole = estimate("fista", None)
    if whole <= budget:
        return dataclasses.replace(options, method="fista")
    # the footprint grows linearly with the chunk's rows: the fixed part, then as many rows as the rest allows
    per_row = estimate("fista", 2) - estimate("fista", 1)
    rows = (budget - (estimate("fista", 1) - per_row)) // max(per_row, 1)
    if rows < 1:  # not even one sample per chunk
        raise SolverMemoryError("fista", sizes, estimate("fista", 1), budget, why, considered=considered)
    return dataclasses.replace(options, method="fista", chunk_size=int(min(rows, n)))
