"""How busy the (shared) machine is, so benchmarks can wait for quiet and mark disturbed runs."""

from __future__ import annotations

import os
import sys
import time


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(machine busy CPU s, this process's CPU s, wall s), or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()


def foreign_cores(before, after) -> float | None:
    """Average number of cores other processes used between two snapshots."""
    if before is None or after is None:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2])


def wait_quiet(max_s: float, threshold: float = 0.15) -> float | None:
    """Wait (up to ``max_s``) until other processes use fewer than ``threshold`` cores over 2 s;
    returns the last load seen."""
    deadline = time.perf_counter() + max_s
    while True:
        before = cpu_snapshot()
        time.sleep(2.0)
        load = foreign_cores(before, cpu_snapshot())
        if load is None or load < threshold or time.perf_counter() > deadline:
            return load
        print(f"[benchmark] other processes use {load:.2f} cores; waiting for a quiet machine", file=sys.stderr)
