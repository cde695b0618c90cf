"""Overhead of the Ultralytics callbacks: the same small YOLOv8n training with and without them.

Prints one JSON object to stdout (progress goes to stderr). In one process, ``model.train()`` runs of a
YOLOv8n built from its YAML (random weights, nothing downloaded) on generated shapes with exact boxes
(``examples/ultralytics_detection.py``'s data) alternate plain / traced in ABBA order per round, so drift
and other processes on the machine hit both arms alike. The traced arm adds ``add_mldbg_callbacks`` as
users do (validation predictions of every epoch, mapped to original pixels, written by the core's
background worker; no extra pass). Each run gets a fresh model (same seed) and, when traced, a fresh
version in a temporary store.

Reported: the median whole-``train()`` time (set-up, every epoch's training and validation, the final
validation) and the median epoch time (``on_train_epoch_start`` to ``on_fit_epoch_end``: training plus
the traced validation), their ratios traced/plain (goal <= 1.03), and the load of other processes.

    python benchmarks/ultralytics_overhead.py            # a few minutes on 2 CPU cores
    python benchmarks/ultralytics_overhead.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from machine_load import (HookTimer, cpu_snapshot, foreign_cores, ratio_stats, wait_quiet,  # benchmarks/machine_load.py
                          work_added)
from ultralytics_detection import make_dataset, offline_ultralytics  # examples/ultralytics_detection.py


def log(msg: str) -> None:
    print(f"[ultralytics_overhead] {msg}", file=sys.stderr, flush=True)


def train_once(data: Path, work: Path, args, store: str | None, version: str) -> dict:
    """One ``model.train()``; returns its wall time, its epoch times and the other processes' load."""
    import torch
    from ultralytics import YOLO

    from mldbg_callbacks.integrations.ultralytics import add_mldbg_callbacks

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    epoch_s: list[float] = []
    started: list[float] = []
    model.add_callback("on_train_epoch_start", lambda trainer: started.append(time.perf_counter()))
    model.add_callback("on_fit_epoch_end", lambda trainer: epoch_s.append(time.perf_counter() - started[-1])
                       if len(started) > len(epoch_s) else None)  # (also fires for the final validation)
    timer, integration = HookTimer(), sys.modules[add_mldbg_callbacks.__module__]
    record = integration._record_detection
    if store is not None:
        add_mldbg_callbacks(model, model_name="bench", version_name=version, store=store)
        # the callbacks' steady-state work on the training thread: their hooks (the end-of-run wait apart)
        # and the per-batch recording inside validation
        for event, functions in model.callbacks.items():
            if event not in ("on_train_end", "teardown"):
                functions[:] = [timer.wrap(f) if getattr(f, "func", None) in integration.callbacks.values() else f
                                for f in functions]
        integration._record_detection = timer.wrap(record)
    snapshot = cpu_snapshot()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=0, device="cpu",
                    amp=False, plots=False, project=str(work / "runs"), name=version, exist_ok=True, verbose=False,
                    seed=0, deterministic=False, val=True)
    finally:
        integration._record_detection = record
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    states = model.trainer.__dict__.get("_mldbg_states", {}).values()
    return {"train_s": wall, "cpu_s": cpu, "epoch_s": epoch_s, "foreign": foreign_cores(snapshot, cpu_snapshot()),
            "worker_cpu_s": sum(state.stats.worker_cpu_s for state in states), "training_thread_s": timer.seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds (two runs per arm each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="wait up to this many seconds for other processes to go quiet before each round")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 epoch, few images")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.n_train, args.n_val = 1, 1, 8, 8

    work = Path(tempfile.mkdtemp(prefix="mldbg-yolo-bench-"))
    try:
        offline_ultralytics(work / "yolo_config")
        import ultralytics
        from ultralytics.utils import LOGGER

        LOGGER.setLevel(40)  # errors only: the per-epoch tables would drown the progress lines
        data = make_dataset(work / "shapes", n_train=args.n_train, n_val=args.n_val)
        store = str(work / "store")
        log("warm-up: one plain and one traced run")
        train_once(data, work, argparse.Namespace(**{**vars(args), "epochs": 1}), None, "warm-plain")
        train_once(data, work, argparse.Namespace(**{**vars(args), "epochs": 1}), store, "warm-traced")
        runs: dict[str, list[dict]] = {"plain": [], "traced": []}
        last_traced = "warm-traced"
        for r in range(args.rounds):
            if args.wait_quiet > 0:
                wait_quiet(args.wait_quiet)
            for arm in (("plain", "traced", "traced", "plain") if r % 2 == 0 else ("traced", "plain", "plain", "traced")):
                version = f"{arm}-{len(runs[arm])}"
                runs[arm].append(train_once(data, work, args, store if arm == "traced" else None, version))
                last_traced = version if arm == "traced" else last_traced
            log(f"round {r + 1}/{args.rounds}: plain {statistics.median(x['train_s'] for x in runs['plain']):.2f}s "
                f"traced {statistics.median(x['train_s'] for x in runs['traced']):.2f}s")

        def medians(arm: str) -> tuple[float, float]:
            epochs = [s for run in runs[arm] for s in run["epoch_s"][1:] or run["epoch_s"]]  # first epoch warms up
            return statistics.median(x["train_s"] for x in runs[arm]), statistics.median(epochs)

        (plain_train, plain_epoch), (traced_train, traced_epoch) = medians("plain"), medians("traced")
        foreign = [x["foreign"] for arm in runs.values() for x in arm if x["foreign"] is not None]
        from mldbg_callbacks.store import LocalStore

        rows = sum(p.rows for p in LocalStore(store).partitions("bench", last_traced))
        return {
            "benchmark": "ultralytics_overhead",
            "setup": {"model": "YOLOv8n (yolov8n.yaml, random weights)", "imgsz": args.imgsz, "batch": args.batch,
                      "epochs": args.epochs, "train_images": args.n_train, "val_images": args.n_val,
                      "rounds": args.rounds, "order": "ABBA", "ultralytics": ultralytics.__version__,
                      "cpu_count": os.cpu_count(), "python": platform.python_version(),
                      "traced": "add_mldbg_callbacks(model, ...): validation predictions every epoch"},
            "plain_train_s": {"median": plain_train, "all": [x["train_s"] for x in runs["plain"]]},
            "traced_train_s": {"median": traced_train, "all": [x["train_s"] for x in runs["traced"]]},
            "ratio_median_train": traced_train / plain_train,
            "robust_train": ratio_stats([x["train_s"] for x in runs["plain"]], [x["train_s"] for x in runs["traced"]]),
            "work": work_added(plain_train, statistics.median(x["cpu_s"] for x in runs["plain"]),
                               statistics.median(x["worker_cpu_s"] for x in runs["traced"]),
                               statistics.median(x["training_thread_s"] for x in runs["traced"])),
            "plain_epoch_s_median": plain_epoch,
            "traced_epoch_s_median": traced_epoch,
            "ratio_median_epoch": traced_epoch / plain_epoch,
            "target_ratio": 1.03,
            "rows_per_traced_run": rows,
            "other_processes_cores": {"median": statistics.median(foreign or [0.0]), "max": max(foreign or [0.0])},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
