"""benchmarks/run_all.py: one command runs the benchmarks and publishes JSON + a markdown table.

The full run takes most of an hour (scripts/bench.sh); here the cheapest benchmark runs at toy size, so
that the runner, the scripts it calls and the summary it writes cannot silently rot."""

from __future__ import annotations

import json
import math
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import run_all  # noqa: E402  benchmarks/run_all.py


def test_run_all_quick_writes_json_and_a_markdown_table(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--only", "core_throughput",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads((tmp_path / "core_throughput.json").read_text())
    out = raw["outputs"][0]
    for task in ("classification", "detection"):
        for run in out[task]["runs"]:
            # the three writers wrote the same samples; tofile's file is exactly the arrays' bytes
            assert run["core"]["samples"] == run["tofile"]["samples"] == run["plain_parquet"]["samples"]
            assert run["core"]["samples_per_s"] > 0 and run["core"]["bytes_on_disk"] > 0
        shares = out[task]["profile"]["stage_share"]
        assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
    classification = out["classification"]["runs"][0]
    samples = classification["samples"]
    # input_id int64 + 100 float32 logits + int64 label + 512 float32 features per sample
    assert classification["tofile"]["bytes_on_disk"] == samples * (8 + 100 * 4 + 8 + 512 * 4)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] is True and summary["machine"]["cores"] >= 1
    rows = summary["benchmarks"]["core_throughput"]["rows"]
    assert {r["area"] for r in rows} == {"tracing core", "growth"}
    table = (tmp_path / "summary.md").read_text()
    assert "| area | what | measured | goal | met |" in table
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    assert "bash scripts/bench.sh" in table


def test_run_all_refuses_an_unknown_benchmark_name(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--only", "no_such_bench",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--list" in done.stderr


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.3, 2.0])
def test_growth_exponent_matches_a_log_log_fit(exponent):
    sizes = [1000, 4000, 16000]
    seconds = [0.2 * (n / 1000) ** exponent for n in sizes]
    slope = np.polyfit(np.log(sizes), np.log(seconds), 1)[0]
    assert run_all.growth_exponent(sizes, seconds) == pytest.approx(slope)
    assert run_all.growth_exponent([10], [1.0]) is None


def test_every_benchmark_in_the_suite_exists_and_declares_the_options_the_suite_passes():
    names = [b.name for b in run_all.SUITE]
    assert len(names) == len(set(names))
    for bench in run_all.SUITE:
        source = (BENCHMARKS / bench.script).read_text()
        for flag in {a for run in [*bench.runs, bench.quick] for a in run if a.startswith("--")}:
            assert f'"{flag}"' in source, f"{bench.script} has no option {flag} (run_all.py passes it)"


def test_work_added_bounds_the_ratio_between_shared_and_stalling_cores():
    from machine_load import HookTimer, work_added

    timer = HookTimer()
    nap = timer.wrap(time.sleep)
    nap(0.02), nap(0.03)
    assert 0.05 <= timer.seconds < 0.5
    before = timer.seconds
    timer.wrap(lambda: nap(0.1))()  # a timed hook calling a timed function: its time counted once
    assert 0.1 <= timer.seconds - before < 0.19
    # training keeps 2 cores busy for 10 s; the worker's 1 CPU-s costs 0.5 s shared, 1 s if it stalls both
    work = work_added(plain_wall_s=10.0, plain_cpu_s=20.0, worker_cpu_s=1.0, training_thread_s=0.2)
    assert (work["shared"], work["ceiling"]) == (pytest.approx(1.07), pytest.approx(1.12))
    # one busy core (a single-threaded training): the worker's CPU is all added either way
    assert work_added(10.0, 9.0, 1.0, 0.2)["shared"] == pytest.approx(1.12)


@pytest.mark.parametrize("interval, ceiling, verdict", [
    ((0.98, 1.02), None, True), ((1.05, 1.20), 1.01, False), ((0.95, 1.10), None, "within noise"),
    ((0.95, 1.10), 1.02, "yes (by the work added; wall clock within noise)"), ((0.95, 1.10), 1.05, "within noise")])
def test_a_wall_clock_interval_across_the_goal_is_settled_by_the_work_added(interval, ceiling, verdict):
    stats = {"paired_ratio_95ci": list(interval), "paired_median_ratio": 1.0}
    work = None if ceiling is None else {"ceiling": ceiling}
    assert run_all.overhead_met(stats, 1.0, work=work) == verdict
