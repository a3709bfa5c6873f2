"""Torch threads for a CPU solve, chosen from the cores the process may use and how busy they are.

Torch's intra-op thread count is global to the process (there is no per-call setting), so a solve sets it only on the
main thread, where nothing else runs torch meanwhile, and restores it afterwards; a solve on another thread (the
training process's background worker thread) leaves the process's setting as it is. See ``docs/solvers.md#threads``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch

# Native CPU solves below this n·d·P·c run on one torch thread: per-operation overhead dominates, threads add to it;
# see docs/solvers.md#auto-the-switch-points-measured
SINGLE_THREAD_BELOW = 1_000_000
# How long the cores' busy time is sampled before a solve (ten ticks of Linux's 100 Hz clock); docs/solvers.md#threads
SAMPLE_SECONDS = 0.1


def usable_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that does not exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (busy ticks, all ticks)}`` for ``cpus`` from ``/proc/stat``, or ``None`` where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(fields) >= 5:
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times or None


def busy_cores() -> float:
    """How many of this process's usable cores are busy now: their busy time over ``SAMPLE_SECONDS``
    (``/proc/stat``), or the one-minute load average where there is no ``/proc/stat`` (0 where neither exists).

    Sampled, not averaged over a minute: a training loop that has just handed the main thread to a synchronous solve
    leaves its cores free, and a competing process that has just started already counts.
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average here
            return 0.0
    time.sleep(SAMPLE_SECONDS)
    after = _cpu_times(cpus) or before
    busy = 0.0
    for cpu, (busy0, all0) in before.items():
        busy1, all1 = after.get(cpu, (busy0, all0))
        if all1 > all0:
            busy += (busy1 - busy0) / (all1 - all0)
    return busy


def default_threads(size: int) -> int:
    """Threads for a CPU solve of ``size = n·d·P·c``: one below ``SINGLE_THREAD_BELOW``, else the usable cores that
    are not busy (their count less :func:`busy_cores`, rounded), at least one."""
    if size < SINGLE_THREAD_BELOW:
        return 1
    cores = usable_cores()
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


@contextlib.contextmanager
def solve_threads(device: torch.device, size: int, num_threads: int | None = None) -> Iterator[None]:
    """Run the body with ``num_threads`` (at most :func:`usable_cores`; default :func:`default_threads`) torch
    threads on the CPU, restored afterwards — on the main thread only: elsewhere torch's global setting belongs to the
    code around the solve."""
    if torch.device(device).type != "cpu" or threading.current_thread() is not threading.main_thread():
        yield
        return
    # at most the usable cores: more only compete, and a huge count made OpenMP exit the process (no memory for them)
    wanted = min(num_threads, usable_cores()) if num_threads else default_threads(size)
    previous = torch.get_num_threads()
    if wanted == previous:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
