"""Run every benchmark of this folder, each at the sizes that show how its cost grows, and publish the
figures: one JSON file per benchmark and a summary (JSON + markdown table) in ``benchmarks/results/``.

Each benchmark runs in its own process (one at a time, so they do not disturb each other) and prints
one JSON object; this script keeps those objects, pulls the headline figures out of them, checks each
against its goal (issue 8 in the tracker; README "Performance"), and fits the growth exponent ``k`` of
time ~ size^k between the smallest and the largest size (k ~ 1: linear).

    bash scripts/bench.sh                          # = set up (incl. the [bench] extra) + this script
    python benchmarks/run_all.py                   # about 40 minutes on 2 cores
    python benchmarks/run_all.py --quick           # every benchmark once at toy size (a few minutes)
    python benchmarks/run_all.py --only core_throughput,wandb   # a subset (names: --list)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent


@dataclass
class Bench:
    name: str
    script: str
    runs: list[list[str]]          # one argument list per size (growth), full mode
    quick: list[str]               # one run, smoke-test mode
    rows: Callable[[list[dict]], list[dict]]  # JSON outputs -> summary rows
    timeout_s: int = 1800
    env: dict = field(default_factory=dict)


def row(area: str, what: str, measured: str, goal: str = "", met: bool | str | None = None) -> dict:
    return {"area": area, "what": what, "measured": measured, "goal": goal,
            "met": "" if met is None else met if isinstance(met, str) else ("yes" if met else "no")}


def robust_text(stats: dict | None) -> str:
    """The noise-robust view of an overhead ratio (``machine_load.ratio_stats``), for the table."""
    if not stats:
        return ""
    low, high = stats["paired_ratio_95ci"]
    return (f"; paired runs: median {stats['paired_median_ratio']:.3f} (95% CI {low:.3f}-{high:.3f}, "
            f"{stats['pairs']} pairs), fastest runs {stats['min_ratio']:.3f}; run-to-run spread of plain runs "
            f"{100 * stats['plain_cv']:.0f}%")


def work_text(work: dict | None) -> str:
    """The work tracing added (``machine_load.work_added``), for the table."""
    if not work:
        return ""
    return (f"; work added per run: worker {work['worker_cpu_s']:.3f} s CPU + training thread "
            f"{work['training_thread_s']:.3f} s on {work['plain_wall_s']:.2f} s: ratio {work['shared']:.3f} shared, "
            f"{work['ceiling']:.3f} at most")


def overhead_met(stats: dict | None, ratio: float, goal: float = 1.03, work: dict | None = None) -> bool | str:
    """Met when the paired ratio's 95% interval lies at or below the goal, missed when it lies above it.
    An interval across the goal (the machine's noise cannot decide) is settled by the work tracing added
    where it was counted: its ceiling at or below the goal is met, otherwise reported as within noise."""
    if not stats:
        return ratio <= goal
    low, high = stats["paired_ratio_95ci"]
    if high <= goal:
        return True
    if low > goal:
        return False
    if work and work["ceiling"] <= goal:
        return "yes (by the work added; wall clock within noise)"
    return "within noise" if stats["paired_median_ratio"] <= goal else "no (within noise)"


def growth_exponent(sizes: list[float], seconds: list[float]) -> float | None:
    """k in seconds ~ size^k, from the smallest and the largest size."""
    if len(sizes) < 2 or min(seconds) <= 0 or sizes[0] == sizes[-1]:
        return None
    return math.log(seconds[-1] / seconds[0]) / math.log(sizes[-1] / sizes[0])


def growth_text(sizes: list, seconds: list[float], unit: str = "s") -> str:
    k = growth_exponent(sizes, seconds)
    points = " / ".join(f"{t:.3g}" for t in seconds)
    return f"{points} {unit} at {' / '.join(f'{s:,}' for s in sizes)} (k = {k:.2f})" if k is not None else points


# -- per-benchmark summary rows -----------------------------------------------------------------------
def overhead_rows(outs: list[dict]) -> list[dict]:
    ratios = [o["training"]["ratio_traced_over_plain"] for o in outs]
    sizes = [o["training"]["samples_per_epoch"] for o in outs]
    model = outs[0]["setup"]["model"]
    rows = [row("training overhead", f"ClassificationTracer, {model}, 512-d features",
                "traced/plain " + " / ".join(f"{r:.3f}" for r in ratios)
                + f" at {' / '.join(f'{s:,}' for s in sizes)} samples per epoch"
                + (robust_text(outs[-1]["training"].get("robust")) + work_text(outs[-1]["training"].get("work"))
                   if "Conv" in model else ""),
                "<= 1.03" if "Conv" in model else "worst case: no goal",
                overhead_met(outs[-1]["training"].get("robust"), max(ratios), work=outs[-1]["training"].get("work"))
                if "Conv" in model else None)]
    last = outs[-1]
    if "analysis" in last:
        rows[0]["measured"] += (f"; CPU-bound floor {last['analysis']['cpu_bound_ratio_floor']:.2f} "
                                f"(worker {last['analysis']['worker_cpu_us_per_sample_single_thread']:.1f} µs vs "
                                f"training {last['analysis']['plain_training_cpu_us_per_sample']:.1f} µs CPU per sample)")
    if "storage" in last:
        st = last["storage"]
        rows.append(row("storage", "bytes on disk per sample-epoch (100 logits + 512-d features)",
                        f"{st['with_features']['bytes_per_sample_epoch']:.0f} B "
                        f"({st['without_features']['bytes_per_sample_epoch']:.0f} B without features)"))
    return rows


def lightning_rows(outs: list[dict]) -> list[dict]:
    o = outs[0]
    cnn = "Conv" in o["setup"]["model"]
    return [row("training overhead", f"Lightning MLDebuggerCallback, {o['setup']['model']}",
                f"traced/plain fit {o['ratio_median_fit']:.3f} (callback alone, no writing: "
                f"{o['ratio_median_fit_adapter_only']:.3f}); process CPU {o['process_cpu_s']['ratio_traced']:.3f}"
                + robust_text(o.get("robust_fit")) + work_text(o.get("work")),
                "<= 1.03" if cnn else "worst case: no goal",
                overhead_met(o.get("robust_fit"), o["ratio_median_fit"], work=o.get("work")) if cnn else None)]


def hf_rows(outs: list[dict]) -> list[dict]:
    o = outs[0]
    return [row("training overhead", f"Hugging Face Trainer callback, {o['workload']['model']}",
                f"traced/plain {o['ratio']:.3f} ({o['ratio_without_train_end']:.3f} without the end-of-run flush); "
                f"extra forward passes: {'none' if o['no_extra_forward'] else 'YES'}; end of run {o['train_end_s']:.2f} s"
                + robust_text(o.get("robust")) + work_text(o.get("work"))
                + (f" ({o['work_with_end']['ceiling']:.3f} with the end of run)" if "work_with_end" in o else ""),
                "<= 1.03", overhead_met(o.get("robust"), o["ratio"], work=o.get("work_with_end")))]


def keras_rows(outs: list[dict]) -> list[dict]:
    o = outs[0]
    fit = o.get("fit", o)
    ratio = fit.get("epoch_ratio_traced_over_plain")
    return [row("training overhead", f"Keras 3 callback (torch backend), {o['model']}",
                f"traced/plain epoch {ratio:.3f}: an extra prediction pass per traced epoch (Keras gives callbacks "
                "no predictions)", "extra pass: no goal")]


def ultralytics_rows(outs: list[dict]) -> list[dict]:
    o = outs[0]
    return [row("training overhead", f"Ultralytics callbacks, YOLOv8n {o['setup']['imgsz']} px, "
                f"{o['setup']['train_images']}+{o['setup']['val_images']} images",
                f"traced/plain train() {o['ratio_median_train']:.3f}, epoch {o['ratio_median_epoch']:.3f}"
                + robust_text(o.get("robust_train")) + work_text(o.get("work")), "<= 1.03",
                overhead_met(o.get("robust_train"), o["ratio_median_train"], work=o.get("work")))]


def wandb_rows(outs: list[dict]) -> list[dict]:
    sizes = [o["samples_per_epoch"] for o in outs]
    ours = [o["overhead"]["mldbg"] for o in outs]
    rows_ = [o["overhead"]["wandb_rows"] for o in outs]
    bulk = [o["overhead"]["wandb_bulk"] for o in outs]
    share = [o["overhead"]["mldbg"] / o["overhead"]["wandb_rows"] for o in outs]
    last = outs[-1]
    pct = lambda xs: " / ".join(f"{100 * x:+.1f}%" for x in xs)  # noqa: E731
    return [
        row("vs W&B", f"training overhead, per-sample predictions (id, label, 100 scores), {last['model']} "
            f"at {' / '.join(f'{s:,}' for s in sizes)} samples per epoch",
            f"ours {pct(ours)}; W&B table.add_data {pct(rows_)}; W&B bulk Table {pct(bulk)}",
            "ours <= 1/10 of W&B's", all(s <= 0.1 for s in share)),
        row("vs W&B", "bytes on disk per sample-epoch",
            f"ours {last['bytes_per_sample_epoch']['mldbg']:.0f} B; W&B {last['bytes_per_sample_epoch']['wandb_rows']:.0f} B "
            f"(add_data), {last['bytes_per_sample_epoch']['wandb_bulk']:.0f} B (bulk)"),
    ]


def throughput_rows(outs: list[dict]) -> list[dict]:
    o, rows_ = outs[0], []
    for task in ("classification", "detection"):
        runs = o[task]["runs"]
        last = runs[-1]
        stages = o[task]["profile"]["stage_share"]
        rows_.append(row("tracing core", f"background writer, {task} ({o['setup'][task]})",
                         f"{last['core']['samples_per_s']:,.0f} samples/s ({last['core']['MB_per_s']:.0f} MB/s on disk, "
                         f"{last['core']['bytes_per_sample']:.0f} B/sample); plain Parquet "
                         f"{last['plain_parquet']['samples_per_s']:,.0f}/s "
                         f"({last['core_over_plain_parquet_speed']:.2f}x of it), numpy.tofile "
                         f"{last['tofile']['samples_per_s']:,.0f}/s ({last['core_over_tofile_speed']:.2f}x); "
                         "worker time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in stages.items())))
        rows_.append(row("growth", f"tracing core, {task}",
                         growth_text([r["samples"] for r in runs], [r["core"]["seconds"] for r in runs])))
    return rows_


def evaluation_rows(outs: list[dict]) -> list[dict]:
    runs = outs[0]["runs"]
    million = [r for r in runs if r["sample_epochs"] >= 1_000_000]
    big = million[0] if million else runs[-1]
    return [row("evaluation", f"classification Evaluator, {big['sample_epochs']:,} sample-epochs "
                f"({outs[0]['classes']} classes, {outs[0]['dim']}-d features)",
                f"{big['seconds']:.1f} s, peak RSS {big['peak_rss_mb']:.0f} MB", "<= 30 s at 1M",
                big["seconds"] <= 30 if million else None),
            row("growth", "classification Evaluator",
                growth_text([r["sample_epochs"] for r in runs], [r["seconds"] for r in runs])
                + "; peak RSS " + " / ".join(f"{r['peak_rss_mb']:.0f}" for r in runs) + " MB")]


def detection_rows(outs: list[dict]) -> list[dict]:
    runs = outs[0]["runs"] if "runs" in outs[0] else [outs[0]]
    big = runs[-1]
    coco, tide = big["coco"], big["tide"]
    size = f"{big['sizes']['images']:,} images, {big['sizes']['classes']} classes, {big['sizes']['gt']:,} objects, " \
           f"{big['sizes']['dets']:,} detections"
    rows_ = [row("evaluation", f"COCO AP, {size}",
                 f"{coco['ours_s']:.2f} s; pycocotools {coco['pycocotools_s']:.1f} s "
                 f"({coco['ratio_pycocotools_over_ours']}x), faster-coco-eval {coco['faster_coco_eval_s']:.1f} s "
                 f"({coco['ratio_faster_over_ours']}x); 12 stats identical: {coco['stats_identical_pycocotools']}",
                 "<= faster-coco-eval's time, >= 9x pycocotools, identical",
                 coco["ours_s"] <= coco["faster_coco_eval_s"] and coco["ratio_pycocotools_over_ours"] >= 9
                 and coco["stats_identical_pycocotools"]),
             row("evaluation", "TIDE on the same data",
                 f"{tide['ours_s']:.2f} s; tidecv {tide['tidecv_s']:.1f} s ({tide['ratio_tidecv_over_ours']}x); "
                 f"counts equal: {tide['counts_equal']}, max |dAP diff| {tide['max_abs_diff_dap']:.1e}",
                 ">= 10x tidecv, equal", tide["ratio_tidecv_over_ours"] >= 10 and tide["counts_equal"])]
    if len(runs) > 1:
        images = [r["sizes"]["images"] for r in runs]
        for key, ref in (("coco", "pycocotools_s"), ("tide", "tidecv_s")):
            text = "ours " + growth_text(images, [r[key]["ours_s"] for r in runs])
            if all(ref in r[key] for r in runs):
                text += f"; {ref[:-2]} " + growth_text(images, [r[key][ref] for r in runs], "s")
            rows_.append(row("growth", "COCO AP" if key == "coco" else "TIDE", text))
    if "evaluator" in outs[0]:
        e = outs[0]["evaluator"]
        rows_.append(row("evaluation", f"2D detection Evaluator end to end (AP, TIDE, error_proba, categories, codes), "
                         f"{e['images']:,} images, {e['detections_per_epoch']:,} detections, {e['epochs']} epochs",
                         f"{e['seconds']:.1f} s ({e['units']:,} units), peak RSS {e['peak_rss_mib']:.0f} MiB"))
    return rows_


def detection3d_rows(outs: list[dict]) -> list[dict]:
    runs = outs[0].get("growth", [outs[0]])
    big = runs[-1]
    dev = big.get("devkit", {})
    size = f"{big['sizes']['frames']:,} frames, {big['sizes']['classes']} classes, {big['sizes']['gt']:,} objects, " \
           f"{big['sizes']['dets']:,} predictions"
    rows_ = [row("evaluation", f"nuScenes metrics, {size}",
                 f"{big['ours_s']:.2f} s; nuscenes-devkit {dev.get('ms_per_frame')} ms/frame = {dev.get('full_size_s')} s "
                 f"({big.get('ratio_devkit_over_ours')}x; devkit measured on {dev.get('frames_measured')} frames); "
                 f"bit-identical: {dev.get('bit_identical')}", ">= 10x the devkit, equal",
                 (big.get("ratio_devkit_over_ours") or 0) >= 10 and bool(dev.get("bit_identical")))]
    if len(runs) > 1:
        rows_.append(row("growth", "nuScenes metrics",
                         "ours " + growth_text([r["sizes"]["frames"] for r in runs], [r["ours_s"] for r in runs])
                         + "; peak RSS " + " / ".join(f"{r['peak_rss_mib_after_ours']:.0f}" for r in runs) + " MiB"))
    return rows_


SUITE = [
    Bench("overhead_cnn", "overhead.py", [["--model", "cnn", "--batches-per-epoch", "40", "--rounds", "10",
                                           "--skip", "thread,worker,storage"]],
          ["--quick", "--model", "cnn", "--skip", "thread,worker,storage"], overhead_rows),
    Bench("overhead_mlp", "overhead.py", [["--batches-per-epoch", str(n), "--rounds", "4", "--skip", "thread,worker"]
                                          for n in (100, 200, 400)],
          ["--quick", "--skip", "thread,worker"], overhead_rows),
    Bench("lightning_cnn", "lightning_overhead.py", [["--model", "cnn", "--rounds", "6", "--epochs", "2",
                                                      "--train-batches", "15", "--val-batches", "5"]],
          ["--quick", "--model", "cnn"], lightning_rows),
    Bench("hf", "hf_overhead.py", [["--rounds", "8"]], ["--quick"], hf_rows),
    Bench("keras", "keras_overhead.py", [["--rounds", "3"]], ["--quick"], keras_rows, env={"KERAS_BACKEND": "torch"}),
    Bench("ultralytics", "ultralytics_overhead.py", [["--rounds", "6"]], ["--quick"], ultralytics_rows),
    Bench("wandb", "wandb_compare.py", [["--batches-per-epoch", str(n), "--rounds", "3"] for n in (50, 100, 200)],
          ["--quick"], wandb_rows),
    Bench("core_throughput", "core_throughput.py", [[]], ["--quick"], throughput_rows),
    Bench("evaluation", "evaluation.py", [["--sizes", "25000,50000,100000"]], ["--sizes", "3000", "--epochs", "3"],
          evaluation_rows),
    Bench("detection_eval", "detection_eval.py", [["--sizes", "1250,2500,5000", "--evaluator"]],
          ["--images", "200", "--classes", "10", "--evaluator"], detection_rows, timeout_s=3600),
    Bench("detection3d_eval", "detection3d_eval.py", [["--sizes", "1500,3000,6000", "--reference-frames", "1500"]],
          ["--frames", "150", "--reference-frames", "150"], detection3d_rows, timeout_s=3600),
]


def run_one(bench: Bench, args: list[str], timeout_s: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "WANDB_SILENT": "true", "WANDB_MODE": "offline", **bench.env}
    done = subprocess.run([sys.executable, str(HERE / bench.script), *args], cwd=HERE, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{bench.script} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    text = done.stdout
    return json.loads(text[text.index("{"):])  # (a library may print a line before the JSON)


def markdown(rows: list[dict]) -> str:
    lines = ["| area | what | measured | goal | met |", "|---|---|---|---|---|"]
    lines += [f"| {r['area']} | {r['what']} | {r['measured']} | {r['goal']} | {r['met']} |" for r in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark once at toy size")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--summarize-only", action="store_true",
                        help="rebuild summary.json/.md from the JSON files already in --out (e.g. after rerunning "
                             "some benchmarks with --only into another folder and copying their files in)")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{b.name}: {b.script}" for b in SUITE))
        return 0
    only = {s for s in args.only.split(",") if s}
    unknown = only - {b.name for b in SUITE}
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; --list shows the names")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    if args.summarize_only and (out / "summary.json").exists():  # the figures keep the date they were measured on
        summary["machine"] = json.loads((out / "summary.json").read_text())["machine"]
    failures = 0
    for bench in SUITE:
        if only and bench.name not in only:
            continue
        runs = [bench.quick] if args.quick else bench.runs
        if not args.summarize_only:
                print(f"[run_all] {bench.name}: {len(runs)} run(s) of {bench.script}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            if args.summarize_only:
                if not (out / f"{bench.name}.json").exists():
                    continue
                raw = json.loads((out / f"{bench.name}.json").read_text())
                outs, measured = raw["outputs"], raw.get("measured")
            else:
                outs = [run_one(bench, run_args, bench.timeout_s) for run_args in runs]
                measured = summary["machine"]["date"]
                (out / f"{bench.name}.json").write_text(json.dumps({"args": runs, "outputs": outs, "measured": measured},
                                                                   indent=1))
            rows = bench.rows(outs)
            summary["benchmarks"][bench.name] = {"seconds": round(time.perf_counter() - start, 1), "measured": measured,
                                                 "rows": rows}
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other benchmarks
            failures += 1
            summary["benchmarks"][bench.name] = {"error": str(exc)}
            print(f"[run_all] {bench.name} FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        for r in rows:
            print(f"[run_all]   {r['what']}: {r['measured']}" + (f" (goal {r['goal']}: {r['met']})" if r["met"] else ""),
                  file=sys.stderr, flush=True)
    rows = [r for b in summary["benchmarks"].values() for r in b.get("rows", [])]
    rows.sort(key=lambda r: ["training overhead", "vs W&B", "storage", "tracing core", "evaluation", "growth"].index(r["area"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    m = summary["machine"]
    days = sorted({b["measured"][:10] for b in summary["benchmarks"].values() if b.get("measured")} or {m["date"][:10]})
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]} (each benchmark's date: summary.json)"
    table = (f"Measured {when} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}"
             f"{' (quick: toy sizes)' if args.quick else ''}. Reproduce: `bash scripts/bench.sh`.\n\n" + markdown(rows))
    (out / "summary.md").write_text(table)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
