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


def ratio_stats(plain: list[float], traced: list[float], seed: int = 0) -> dict:
    """Traced/plain time ratios that hold up on a machine whose speed drifts between runs.

    Runs are taken in ABBA order, so ``plain[i]`` and ``traced[i]`` ran next to each other; the median of
    these paired ratios is less sensitive to drift than a ratio of medians. Also: the ratio of the fastest
    runs (noise only ever adds time), a bootstrap 95% interval of the paired median, and the run-to-run
    spread of the plain runs (coefficient of variation), which says what a ratio can resolve.
    """
    import numpy as np

    pairs = np.asarray(traced[:len(plain)], dtype=float) / np.asarray(plain[:len(traced)], dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(pairs, size=(2000, len(pairs)), replace=True), axis=1)
    return {"paired_median_ratio": round(float(np.median(pairs)), 4),
            "paired_ratio_95ci": [round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)],
            "min_ratio": round(min(traced) / min(plain), 4),
            "plain_cv": round(float(np.std(plain) / np.mean(plain)), 4), "pairs": len(pairs)}


class HookTimer:
    """Adds up the wall time spent in the callables it wraps: a callback's work on the training thread.
    A wrapped callable called from another one (a hook that records) is counted once, by the outer call."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def wrap(self, function):
        import functools

        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.seconds += time.perf_counter() - start
        return timed


def work_added(plain_wall_s: float, plain_cpu_s: float, worker_cpu_s: float, training_thread_s: float) -> dict:
    """What tracing adds to one plain run, as work instead of wall time: a machine whose speed drifts by
    +-20% between runs cannot resolve a 3% wall-clock ratio, but it can count the work.

    ``training_thread_s`` (time inside the callback on the training thread, hand-over included) adds to
    the wall time directly. ``worker_cpu_s`` (the tracing worker's CPU time) adds at most all of itself
    (``ceiling``: each time slice it takes stalls every training thread at the next barrier), and
    ``worker/cores_busy`` where training's threads share it evenly (``shared``; less again where the
    worker only takes what threads spinning at a barrier would have wasted, or works during the wait for
    durability at epoch end, which a traced epoch's time leaves out).
    """
    busy = max(1.0, plain_cpu_s / plain_wall_s)
    return {"worker_cpu_s": round(worker_cpu_s, 4), "training_thread_s": round(training_thread_s, 4),
            "plain_wall_s": round(plain_wall_s, 4), "cores_busy_plain": round(busy, 2),
            "shared": round(1 + (training_thread_s + worker_cpu_s / busy) / plain_wall_s, 4),
            "ceiling": round(1 + (training_thread_s + worker_cpu_s) / plain_wall_s, 4)}
