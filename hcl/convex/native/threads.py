"""Torch threads for a CPU solve, chosen from the cores the process may use and how busy they are.

Torch's intra-op thread count is global to the process (there is no per-call setting), so a solve sets it only on the
main thread, where nothing else runs torch meanwhile, and restores it afterwards; a solve on another thread (the
training process's background worker thread) leaves the process's setting as it is. See ``docs/solvers.md#threads``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

# Native CPU solves below this n·d·P·c run on one torch thread: per-operation overhead dominates, threads add to it;
# see docs/solvers.md#auto-the-switch-points-measured
SINGLE_THREAD_BELOW = 1_000_000


def usable_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that does not exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(size: int) -> int:
    """Threads for a CPU solve of ``size = n·d·P·c``: one below ``SINGLE_THREAD_BELOW``, else the usable cores that
    are not busy (their count less the one-minute load average, rounded), at least one."""
    if size < SINGLE_THREAD_BELOW:
        return 1
    cores = usable_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average here
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


@contextlib.contextmanager
def solve_threads(device: torch.device, size: int, num_threads: int | None = None) -> Iterator[None]:
    """Run the body with ``num_threads`` (default :func:`default_threads`) torch threads on the CPU, restored
    afterwards — on the main thread only: elsewhere torch's global setting belongs to the code around the solve."""
    if torch.device(device).type != "cpu" or threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = num_threads or default_threads(size)
    previous = torch.get_num_threads()
    if wanted == previous:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
