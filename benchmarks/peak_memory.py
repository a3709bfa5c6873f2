"""A process's own peak resident memory on Linux, for the benchmarks that measure a run in a fresh process.

``resource.getrusage(...).ru_maxrss`` is no use there: a child started by fork and exec keeps its parent's high-water
mark, so a child of a parent that once held 2 GiB reads at least 2 GiB. ``/proc/self/status``'s ``VmHWM``, reset to
the current resident memory through ``/proc/self/clear_refs``, is the process's own.
"""

from __future__ import annotations


def status_kib(field: str) -> int | None:
    """``field`` of ``/proc/self/status`` (KiB), or ``None`` where there is none."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith(field + ":")), None)
    except OSError:
        return None


def reset_peak() -> bool:
    """Reset this process's peak resident memory to its current one (Linux ≥ 4.0); ``False`` where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False
