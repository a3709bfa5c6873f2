"""The memory plan, the threads and the options at their boundaries: sizes that fit exactly, the refusals' advice,
cgroup limits of either version, ``/proc/stat`` samples with I/O wait, guest time or a core gone, and each method's
own iteration cap. No solve runs."""

from __future__ import annotations

import pytest
import torch
from test_memory import problem_of, proc_stat

import hcl.convex.native.memory as memory
from hcl.convex.native import NativeOptions
from hcl.convex.native import threads as native_threads
from hcl.convex.native.memory import (
    BASE_BYTES,
    CONIC_BYTES_PER_ENTRY,
    FISTA_OUTPUT_COPIES,
    SolverMemoryError,
    _cgroup_room,
    check_conic_memory,
    footprint,
    free_memory,
    plan,
)
from hcl.convex.native.options import DEFAULT_MAX_ITERS, NEWTON_MAX_SAMPLES

GIB = 1 << 30


# ---- memory.py: the plan


def test_auto_considers_the_interior_point_at_exactly_newton_max_samples():
    """Catches: (plan: n <= NEWTON_MAX_SAMPLES -> n < ...)."""
    problem = problem_of(NEWTON_MAX_SAMPLES, 2, 1, 1, torch.float64)
    assert plan(problem, NativeOptions(memory_limit=1 << 40)).method == "newton"
    over = problem_of(NEWTON_MAX_SAMPLES + 1, 2, 1, 1, torch.float64)
    assert plan(over, NativeOptions(memory_limit=1 << 40)).method != "newton"


def test_an_explicit_chunk_larger_than_n_costs_what_the_whole_costs():
    """Catches: (footprint: rows = min(n, chunk_size or n) -> chunk_size or n)."""
    n, d, P, c = 200, 10, 8, 2
    problem = problem_of(n, d, P, c)
    whole = footprint("fista", n, d, P, c, torch.float32, None, False).total
    assert footprint("fista", n, d, P, c, torch.float32, 10 * n, False).total == whole
    chosen = plan(problem, NativeOptions(method="fista", chunk_size=10 * n, memory_limit=whole))
    assert chosen.method == "fista" and chosen.chunk_size == 10 * n


def test_the_anderson_history_counts_the_variables_as_well_as_the_outputs():
    """Catches: (history counted over the block outputs (n, 2, P, c) only, not the variables (d, 2, P, c)).

    NativeOptions' docstring: the float32 history takes about 8 · anderson bytes per element of the variables and
    block outputs."""
    n, d, P, c = 50, 500, 4, 1  # d ≫ n: the variables dominate the state
    K = 2 * P * c
    with_history = footprint("admm", n, d, P, c, torch.float32, anderson=10).total
    without = footprint("admm", n, d, P, c, torch.float32, anderson=0).total
    assert with_history - without >= 8 * 10 * (n + d) * K


def test_a_refusal_advises_auto_where_its_last_resort_fits_exactly():
    """Catches: (auto_advice: estimate("fista", 1) <= budget -> < budget)."""
    problem = problem_of(300, 40, 20, 3)
    one_row = footprint("fista", 300, 40, 20, 3, torch.float32, 1, False).total
    assert footprint("newton", 300, 40, 20, 3, output_bias=False).total > one_row  # refused
    assert plan(problem, NativeOptions(memory_limit=one_row)).method == "fista"  # what auto does with this budget
    with pytest.raises(SolverMemoryError, match="method='auto', which takes a method that fits"):
        plan(problem, NativeOptions(method="newton", memory_limit=one_row))


def test_the_first_order_method_that_fits_exactly_is_not_chunked():
    """Catches: (plan: whole <= budget -> whole < budget: a chunk_size of n is set where the whole fits)."""
    problem = problem_of(200, 10, 8, 2)
    whole = footprint("fista", 200, 10, 8, 2, torch.float32, None, False).total
    assert plan(problem, NativeOptions(method="fista", memory_limit=whole)).chunk_size is None
    assert plan(problem, NativeOptions(method="fista", memory_limit=whole - 1)).chunk_size < 200


def test_a_float64_first_order_solve_counts_no_extra_float64_certificate_copies():
    """Catches: (the certificate's float64 copies counted in float64 too, where they are the method's own)."""
    n, d, P, c = 100, 10, 8, 2
    K = 2 * P * c
    assert footprint("fista", n, d, P, c, torch.float64).outputs == FISTA_OUTPUT_COPIES * n * K * 8
    assert footprint("fista", n, d, P, c, torch.float32).outputs == FISTA_OUTPUT_COPIES * n * K * 4 + 3 * n * K * 8


def test_a_refusal_without_memory_limit_says_to_set_one_and_where_the_budget_came_from(monkeypatch):
    """Catches: (the advice always says 'raise memory_limit', also where none was given)."""
    problem = problem_of(300, 40, 20, 3)
    needed = footprint("newton", 300, 40, 20, 3, output_bias=False).total
    monkeypatch.setattr(memory, "free_memory", lambda device: needed)  # half of it is the budget
    advice = r"\(0\.5 of the [\d.]+ MiB free on cpu\).*or set memory_limit \(bytes\)"
    with pytest.raises(SolverMemoryError, match=advice):
        plan(problem, NativeOptions(method="newton"))


# ---- memory.py: conic solvers


def test_a_conic_solve_that_fits_exactly_is_not_refused():
    """Catches: (check_conic_memory: needed > budget -> needed >= budget)."""
    small = problem_of(20, 3, 2, 1, torch.float64)
    needed = CONIC_BYTES_PER_ENTRY * 20 * 3 * 2 * 1 + BASE_BYTES
    check_conic_memory(small, "clarabel", memory_limit=needed)  # no refusal
    with pytest.raises(SolverMemoryError):
        check_conic_memory(small, "clarabel", memory_limit=needed - 1)


def test_check_conic_memory_checks_the_limit_as_a_value_first():
    """Catches: (check_conic_memory without NativeOptions' check: a unit slip read as a refusal, 0.5 as 0 bytes)."""
    small = problem_of(20, 3, 2, 1, torch.float64)
    with pytest.raises(ValueError, match="memory_limit is in bytes"):
        check_conic_memory(small, "clarabel", memory_limit=1000)
    with pytest.raises(ValueError, match="memory_limit must be a positive integer"):
        check_conic_memory(small, "clarabel", memory_limit=0.5)


# ---- memory.py: free memory and cgroups


def test_a_cgroup_over_its_limit_has_no_room_not_negative_room(tmp_path):
    """Catches: (_cgroup_room: max(limit - usage, 0) -> limit - usage)."""
    limit, usage = tmp_path / "max", tmp_path / "current"
    limit.write_text("1000000\n")
    usage.write_text("1200000\n")
    assert _cgroup_room(((str(limit), str(usage)),)) == 0


def test_cgroup_v1s_no_limit_number_reads_as_no_limit(tmp_path):
    """Catches: (_cgroup_room: the v1 'no limit' huge number taken as a limit)."""
    limit, usage = tmp_path / "limit_in_bytes", tmp_path / "usage_in_bytes"
    limit.write_text("9223372036854771712\n")
    usage.write_text("250000\n")
    assert _cgroup_room(((str(limit), str(usage)),)) is None


def test_cgroup_v1_is_read_where_there_is_no_v2(tmp_path):
    """Catches: (_cgroup_room gives up at the first pair of files it cannot read)."""
    limit, usage = tmp_path / "limit_in_bytes", tmp_path / "usage_in_bytes"
    limit.write_text("1000000\n")
    usage.write_text("250000\n")
    files = ((str(tmp_path / "absent.max"), str(tmp_path / "absent.current")), (str(limit), str(usage)))
    assert _cgroup_room(files) == 750000


def test_the_cpus_free_memory_is_the_smaller_of_the_machines_and_the_cgroups(monkeypatch):
    """Catches: (free_memory: min(free, room) -> max)."""
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8 * GIB)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 1 * GIB)
    assert free_memory("cpu") == 1 * GIB
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 16 * GIB)
    assert free_memory("cpu") == 8 * GIB
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert free_memory("cpu") == 8 * GIB


# ---- threads.py


def _busy(monkeypatch, samples, cpus=(0, 1)):
    """busy_cores() on these /proc/stat samples, one per reading; the seconds it slept between them."""
    slept = []

    monkeypatch.setattr(native_threads.os, "sched_getaffinity", lambda pid: set(cpus), raising=False)
    monkeypatch.setattr(native_threads, "open", proc_stat(iter(samples)), raising=False)
    monkeypatch.setattr(native_threads.time, "sleep", slept.append)
    return native_threads.busy_cores(), slept


def test_threads_from_exactly_the_single_thread_size_on(monkeypatch):
    """Catches: (default_threads: size < SINGLE_THREAD_BELOW -> <=)."""
    monkeypatch.setattr(native_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(native_threads, "busy_cores", lambda: 0.0)
    assert native_threads.default_threads(native_threads.SINGLE_THREAD_BELOW) == 4
    assert native_threads.default_threads(native_threads.SINGLE_THREAD_BELOW - 1) == 1


def test_a_core_waiting_on_io_is_idle(monkeypatch):
    """Catches: (iowait counted as busy time)."""
    busy, _ = _busy(monkeypatch, ["cpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0",
                                  "cpu0 100 0 0 900 100 0 0 0\ncpu1 150 0 0 950 0 0 0 0"])
    assert busy == pytest.approx(0.5)  # cpu0 waited on I/O throughout, cpu1 was busy half the time


def test_guest_time_is_not_counted_twice(monkeypatch):
    """Catches: (all of /proc/stat's fields summed: guest and guest_nice are already inside user and nice)."""
    busy, _ = _busy(monkeypatch, ["cpu0 100 0 0 900 0 0 0 0 50 0", "cpu0 150 0 0 950 0 0 0 0 100 0"], cpus=(0,))
    assert busy == pytest.approx(0.5)


def test_a_core_gone_between_the_samples_counts_as_idle(monkeypatch):
    """Catches: (the all1 > all0 guard dropped: a CPU missing from the second sample divided by zero)."""
    busy, _ = _busy(monkeypatch, ["cpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0",
                                  "cpu0 200 0 0 900 0 0 0 0"])
    assert busy == pytest.approx(1.0)


def test_busy_cores_are_sampled_over_the_sample_seconds(monkeypatch):
    """Catches: (no sleep between the two reads: busy time over no time, always 0)."""
    busy, slept = _busy(monkeypatch, ["cpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0",
                                      "cpu0 110 0 0 900 0 0 0 0\ncpu1 100 0 0 910 0 0 0 0"])
    assert slept == [native_threads.SAMPLE_SECONDS] and busy == pytest.approx(1.0)


# ---- options.py


def test_resolved_auto_at_exactly_newton_max_samples_is_the_interior_point():
    """Catches: (resolved: n <= NEWTON_MAX_SAMPLES -> <)."""
    problem = problem_of(NEWTON_MAX_SAMPLES, 2, 1, 1, torch.float64)
    assert NativeOptions().resolved(problem).method == "newton"


def test_resolved_iteration_caps_are_each_methods_own():
    """Catches: (resolved: every method given the first-order method's cap)."""
    problem = problem_of(30, 3, 2, 1, torch.float64)
    caps = {method: NativeOptions(method=method).resolved(problem).max_iters for method in ("newton", "fista", "admm")}
    assert caps == DEFAULT_MAX_ITERS
    assert NativeOptions().resolved(problem).max_iters == DEFAULT_MAX_ITERS["newton"]  # auto: the interior point here
