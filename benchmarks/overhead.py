"""Overhead benchmark of ClassificationTracer on a small CPU training loop.

Prints one JSON object to stdout (progress goes to stderr). Measures, in one process:

1. ``training``: the same training loop (MLP 256 -> 512 -> ReLU -> Linear(512, 100), batch 256,
   SGD with momentum, synthetic data from a seeded NumPy rng) with and without the tracer. Plain and
   traced epochs alternate (ABBA order per round, so drift hits both alike); medians of the epoch
   times and their ratio traced/plain. ``tracer.wait_for_save()`` after each traced epoch is timed
   separately, and a second ratio includes it.
2. ``training_thread``: time the training thread spends inside the tracer per batch: the cost of
   ``tracer.core.record(...)`` alone (hand-over), of the feature forward hook (``tracer._forward(x)``
   minus ``model(x)``), and the in-loop difference ``tracer(...)`` minus ``model(x)`` (which also
   contains back-pressure and contention with the worker thread).
3. ``storage``: bytes on disk per sample-epoch (Parquet file bytes / rows) and per column (sum of the
   row groups' column chunk ``total_compressed_size``), with and without features.
4. ``worker``: rows/s the background worker sustains when batches are recorded as fast as possible
   (no training), plus a single-thread breakdown of its stages (encode, duplicate check, Parquet write).

Run from the repository root::

    python benchmarks/overhead.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # CI smoke test (seconds)
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import mldbg_callbacks
from mldbg_callbacks.core.batch import PendingBatch
from mldbg_callbacks.store import local as local_store
from mldbg_callbacks.training import ClassificationTracer
from machine_load import (HookTimer, cpu_snapshot, foreign_cores, ratio_stats, wait_quiet,  # benchmarks/machine_load.py
                          work_added)

BATCH = 256
QUIET = 0.1  # an epoch counts as undisturbed when other processes used fewer cores than this
IN_DIM = 256
HIDDEN = 512
CLASSES = 100


def log(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


def median(values):
    return float(statistics.median(values)) if values else None


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def summary_us(seconds: list[float]) -> dict:
    us = [s * 1e6 for s in seconds]
    return {"n": len(us), "median_us": median(us), "mean_us": float(np.mean(us)) if us else None,
            "p90_us": pct(us, 90), "p99_us": pct(us, 99), "max_us": max(us) if us else None}


class Setup:
    def __init__(self, batches_per_epoch: int, seed: int, lr: float, optimizer: str, model: str = "mlp"):
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.n = batches_per_epoch * BATCH
        self.batches = batches_per_epoch
        x = rng.standard_normal((self.n, IN_DIM), dtype=np.float32)
        teacher = rng.standard_normal((IN_DIM, CLASSES)).astype(np.float32)
        logits = x @ teacher + 2.0 * rng.standard_normal((self.n, CLASSES)).astype(np.float32)
        self.y = torch.from_numpy(logits.argmax(axis=1).astype(np.int64))
        self.rng = rng
        if model == "cnn":  # a CIFAR-100-sized convnet: 3x32x32 inputs, 512-d penultimate features
            self.x = torch.from_numpy(np.repeat(x[:, :192], 16, axis=1).reshape(self.n, 3, 32, 32))
            self.model = torch.nn.Sequential(
                torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, HIDDEN), torch.nn.ReLU(),
                torch.nn.Linear(HIDDEN, CLASSES))
        else:  # worst case for the tracer: almost no compute per sample
            self.x = torch.from_numpy(x)
            self.model = torch.nn.Sequential(torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.ReLU(),
                                             torch.nn.Linear(HIDDEN, CLASSES))
        if optimizer == "adam":
            self.opt = torch.optim.Adam(self.model.parameters(), lr=lr / 50)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def epoch_order(self) -> np.ndarray:
        return self.rng.permutation(self.n)

    def batch(self, perm: np.ndarray, b: int):
        idx = perm[b * BATCH:(b + 1) * BATCH]
        # ids as a NumPy array, as in the tracer's docstring (indices.cpu().numpy())
        return self.x[idx], self.y[idx], idx


def run_epoch(s: Setup, tracer: ClassificationTracer | None, epoch: int, call_times: list | None = None,
              cpu_times: list | None = None, foreign: list | None = None) -> float:
    """One training epoch; returns its wall time. ``call_times`` gets the time of each model/tracer call,
    ``cpu_times`` the CPU time of the whole process during the epoch (all threads)."""
    perm = s.epoch_order()
    model, opt, loss_fn = s.model, s.opt, s.loss_fn
    model.train()
    clock = time.perf_counter
    snap = cpu_snapshot()
    cpu0 = time.process_time()
    start = clock()
    for b in range(s.batches):
        x, y, ids = s.batch(perm, b)
        t0 = clock()
        if tracer is None:
            out = model(x)
        else:
            out = tracer(x, y, input_ids=ids, dataset_type="train", n_epoch=epoch)
        t1 = clock()
        if call_times is not None:
            call_times.append(t1 - t0)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall = clock() - start
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu0)
    if foreign is not None:
        foreign.append(foreign_cores(snap, cpu_snapshot()))
    return wall


# -- 1. training loop, plain vs traced ----------------------------------------------------------
def bench_training(s: Setup, tracer: ClassificationTracer, rounds: int, epochs: int,
                   quiet_wait_s: float = 0.0) -> dict:
    plain, traced, waits, traced_with_wait = [], [], [], []
    plain_calls, traced_calls = [], []
    plain_cpu, traced_cpu, wait_cpu = [], [], []
    plain_foreign, traced_foreign = [], []
    worker_cpu, thread_s = [], []  # per traced epoch: the tracing worker's CPU, the hand-over's wall time
    timer = HookTimer()
    tracer.core.record = timer.wrap(tracer.core.record)
    epoch_no = 0
    snap0 = cpu_snapshot()
    log("warm-up: 1 plain + 1 traced epoch")
    run_epoch(s, None, 0)
    run_epoch(s, tracer, epoch_no)
    tracer.wait_for_save(n_epoch=epoch_no)
    for r in range(rounds):
        if quiet_wait_s > 0:
            wait_quiet(quiet_wait_s)
        order = ["plain", "traced"] if r % 2 == 0 else ["traced", "plain"]
        for _ in range(epochs):
            for kind in order:
                if kind == "plain":
                    dt = run_epoch(s, None, 0, plain_calls, plain_cpu, plain_foreign)
                    plain.append(dt)
                else:
                    epoch_no += 1
                    worker0, thread0 = tracer.stats.worker_cpu_s, timer.seconds
                    dt = run_epoch(s, tracer, epoch_no, traced_calls, traced_cpu, traced_foreign)
                    t0, c0 = time.perf_counter(), time.process_time()
                    tracer.wait_for_save(n_epoch=epoch_no)
                    w = time.perf_counter() - t0
                    wait_cpu.append(time.process_time() - c0)
                    worker_cpu.append(tracer.stats.worker_cpu_s - worker0)
                    thread_s.append(timer.seconds - thread0)
                    traced.append(dt)
                    waits.append(w)
                    traced_with_wait.append(dt + w)
        log(f"round {r + 1}/{rounds}: plain {median(plain):.3f}s traced {median(traced):.3f}s "
            f"wait {median(waits):.3f}s (medians so far)")
    mp, mt, mw = median(plain), median(traced), median(traced_with_wait)
    other = foreign_cores(snap0, cpu_snapshot())
    # epochs during which other processes used < QUIET cores (the machine is shared in CI/dev boxes)
    clean_p = [t for t, f in zip(plain, plain_foreign) if f is None or f < QUIET]
    clean_t = [t for t, f in zip(traced, traced_foreign) if f is None or f < QUIET]
    clean = {"threshold_cores": QUIET, "plain_epochs": len(clean_p), "traced_epochs": len(clean_t),
             "median_plain_epoch_s": median(clean_p), "median_traced_epoch_s": median(clean_t),
             "ratio_traced_over_plain": (median(clean_t) / median(clean_p)) if clean_p and clean_t else None}
    return {
        "rounds": rounds, "epochs_per_round_per_variant": epochs,
        "batches_per_epoch": s.batches, "samples_per_epoch": s.n,
        "plain_epoch_s": plain, "traced_epoch_s": traced, "wait_for_save_s": waits,
        "median_plain_epoch_s": mp, "median_traced_epoch_s": mt,
        "median_wait_for_save_s": median(waits),
        "median_traced_epoch_incl_wait_s": mw,
        "ratio_traced_over_plain": mt / mp,
        "robust": ratio_stats(plain, traced),
        "work": work_added(mp, median(plain_cpu), median(worker_cpu), median(thread_s)),
        "ratio_traced_incl_wait_over_plain": mw / mp,
        "min_ratio_traced_over_plain": min(traced) / min(plain),
        "plain_samples_per_s": s.n / mp, "traced_samples_per_s": s.n / mt,
        "process_cpu_s_per_epoch": {"plain": median(plain_cpu), "traced": median(traced_cpu),
                                    "wait_for_save": median(wait_cpu)},
        "cpu_utilisation": {"plain": median([c / w for c, w in zip(plain_cpu, plain)]),
                            "traced": median([c / w for c, w in zip(traced_cpu, traced)]),
                            "note": "process CPU s / wall s; ~cpu_count when nothing else runs"},
        "extra_cpu_us_per_sample": (median(traced_cpu) + median(wait_cpu) - median(plain_cpu)) / s.n * 1e6,
        "other_processes_avg_cores": other,
        "other_processes_cores_per_epoch": {"plain": plain_foreign, "traced": traced_foreign},
        "quiet_epochs_only": clean,
        "target_ratio": 1.05, "meets_target": mt / mp <= 1.05,
        "in_loop_model_call": summary_us(plain_calls),
        "in_loop_tracer_call": summary_us(traced_calls),
        "in_loop_tracer_minus_model_median_us": (median(traced_calls) - median(plain_calls)) * 1e6,
        "in_loop_tracer_minus_model_mean_us": (float(np.mean(traced_calls)) - float(np.mean(plain_calls))) * 1e6,
    }


# -- 2. training-thread cost ---------------------------------------------------------------------
def precomputed_batches(s: Setup, count: int):
    """``count`` batches of (x, y, outputs, features) from the model, as independent tensors."""
    forward_tracer = ClassificationTracer(s.model, "probe", "probe", store=tempfile.mkdtemp(prefix="mldbg-probe-"))
    perm = s.epoch_order()
    out = []
    with torch.no_grad():
        for b in range(count):
            x, y, ids = s.batch(perm, b % s.batches)
            outputs, features = forward_tracer._forward(x)
            out.append((x, y, outputs.clone(), features.clone()))
    forward_tracer.close()
    shutil.rmtree(forward_tracer.store.root, ignore_errors=True)
    return out


def bench_training_thread(s: Setup, store_root: Path, batches: list, reps: int) -> dict:
    # (a) hand-over: core.record() alone. A queue as large as the batch count, so put() never blocks;
    # the worker runs concurrently (as it would in training).
    tracer = ClassificationTracer(s.model, "handover", "v", store=store_root,
                                  max_pending_batches=len(batches) + 8)
    times = []
    clock = time.perf_counter
    # first call starts the worker thread; time it separately
    x, y, outputs, features = batches[0]
    t0 = clock()
    tracer.core.record(outputs, y, input_ids=np.arange(BATCH), dataset_type="train", n_epoch=0,
                       features=features, inputs=x)
    first = clock() - t0
    for i, (x, y, outputs, features) in enumerate(batches[1:], start=1):
        ids = np.arange(i * BATCH, (i + 1) * BATCH)
        t0 = clock()
        tracer.core.record(outputs, y, input_ids=ids, dataset_type="train", n_epoch=0,
                           features=features, inputs=x)
        times.append(clock() - t0)
    tracer.wait_for_save()
    tracer.close()
    record_stats = summary_us(times)
    record_stats["first_call_us"] = first * 1e6

    # (b) forward hook: tracer._forward(x) vs model(x), interleaved, grad enabled, worker idle.
    tracer = ClassificationTracer(s.model, "hook", "v", store=store_root)
    x = batches[0][0]
    tracer._forward(x)  # first call installs the hook
    plain_t, hook_t = [], []
    for _ in range(20):
        s.model(x), tracer._forward(x)
    for i in range(reps):
        if i % 2 == 0:
            t0 = clock(); s.model(x); t1 = clock(); tracer._forward(x); t2 = clock()
            plain_t.append(t1 - t0); hook_t.append(t2 - t1)
        else:
            t0 = clock(); tracer._forward(x); t1 = clock(); s.model(x); t2 = clock()
            hook_t.append(t1 - t0); plain_t.append(t2 - t1)
    tracer.close()
    return {
        "record_handover": record_stats,
        "forward_plain": summary_us(plain_t),
        "forward_with_hook": summary_us(hook_t),
        "hook_cost_median_us": (median(hook_t) - median(plain_t)) * 1e6,
        "note": "record_handover = tracer.core.record(); hook_cost = tracer._forward(x) - model(x) "
                "(medians); in-loop cost incl. back-pressure is training.in_loop_tracer_minus_model_*",
    }


# -- 3. storage --------------------------------------------------------------------------------
def parquet_bytes(version_dir: Path) -> dict:
    files = sorted(version_dir.rglob("*.parquet"))
    rows = 0
    file_bytes = 0
    columns: dict[str, dict] = {}
    for f in files:
        meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        file_bytes += f.stat().st_size
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                entry = columns.setdefault(name, {"compressed": 0, "uncompressed": 0,
                                                  "compression": col.compression,
                                                  "encodings": sorted(set(col.encodings))})
                entry["compressed"] += col.total_compressed_size
                entry["uncompressed"] += col.total_uncompressed_size
    if not rows:
        return {"rows": 0, "files": len(files)}
    per_col = {name: {"bytes_per_row": v["compressed"] / rows,
                      "uncompressed_bytes_per_row": v["uncompressed"] / rows,
                      "compression": v["compression"], "encodings": list(v["encodings"])}
               for name, v in columns.items()}
    return {
        "files": len(files), "rows": rows, "file_bytes": file_bytes,
        "bytes_per_sample_epoch": file_bytes / rows,
        "column_chunks_bytes_per_row": sum(v["compressed"] for v in columns.values()) / rows,
        "uncompressed_bytes_per_row": sum(v["uncompressed"] for v in columns.values()) / rows,
        "columns": per_col,
    }


def bench_storage_no_features(s: Setup, store_root: Path, epochs: int) -> dict:
    """Same samples, trained model, feature_layer=False: a forward-only pass per epoch."""
    tracer = ClassificationTracer(s.model, "bench_nofeat", "v", store=store_root, feature_layer=False)
    with torch.no_grad():
        for e in range(epochs):
            perm = s.epoch_order()
            for b in range(s.batches):
                x, y, ids = s.batch(perm, b)
                tracer(x, y, input_ids=ids, dataset_type="train", n_epoch=e)
    tracer.wait_for_save()
    tracer.close()
    return parquet_bytes(tracer.store.version_dir("bench_nofeat", "v"))


# -- 4. worker throughput ----------------------------------------------------------------------
def bench_worker(store_root: Path, batches: list, total_batches: int) -> dict:
    tracer = ClassificationTracer(torch.nn.Identity(), "worker", "v", store=store_root)
    clock = time.perf_counter
    put_times = []
    t0 = clock()
    for i in range(total_batches):
        x, y, outputs, features = batches[i % len(batches)]
        ids = np.arange(i * BATCH, (i + 1) * BATCH)
        t1 = clock()
        tracer.core.record(outputs, y, input_ids=ids, dataset_type="train", n_epoch=0, features=features)
        put_times.append(clock() - t1)
    t_recorded = clock()
    stats = tracer.wait_for_save()
    t_end = clock()
    tracer.close()
    rows = total_batches * BATCH
    return {
        "batches": total_batches, "rows": rows, "rows_written": stats.rows_written,
        "seconds": t_end - t0, "rows_per_s": rows / (t_end - t0),
        "record_phase_s": t_recorded - t0, "final_wait_for_save_s": t_end - t_recorded,
        "record_call_blocked_median_us": median(put_times) * 1e6,
        "record_call_mean_us": float(np.mean(put_times)) * 1e6,
    }


def bench_worker_stages(store_root: Path, batches: list, part_rows: int) -> dict:
    """Single-thread cost of each worker stage, using the package's own code paths."""
    tracer = ClassificationTracer(torch.nn.Identity(), "stages", "v", store=store_root)
    core, codec = tracer.core, tracer.core.codec
    clock = time.perf_counter
    encode_t, dedup_t, tables = [], [], []
    needed = max(1, part_rows // BATCH)
    for i in range(needed):
        x, y, outputs, features = batches[i % len(batches)]
        ids = np.arange(i * BATCH, (i + 1) * BATCH)
        pending = PendingBatch(outputs, y, ids, features, None, "train", 0)
        t0 = clock(); encoded = codec.encode(pending); t1 = clock()
        table = core._drop_duplicates(("train", 0), encoded.table); t2 = clock()
        encode_t.append(t1 - t0); dedup_t.append(t2 - t1)
        tables.append(table)
    t0 = clock(); table = pa.concat_tables(tables); concat_s = clock() - t0
    sink = tracer.store.run("stages", "v")
    t0 = clock(); sink.write_part("train", 0, 0, table); write_s = clock() - t0
    tracer.close()
    rows = table.num_rows
    enc, ded = median(encode_t), median(dedup_t)
    write_per_batch = write_s / rows * BATCH
    total = enc + ded + concat_s / rows * BATCH + write_per_batch
    return {
        "parquet_options": dict(local_store.PARQUET_OPTIONS),
        "encode_us_per_batch": enc * 1e6,
        "drop_duplicates_us_per_batch": ded * 1e6,
        "concat_us_per_batch": concat_s / rows * BATCH * 1e6,
        "write_part_us_per_batch": write_per_batch * 1e6,
        "write_part_rows": rows, "write_part_s": write_s,
        "total_us_per_batch": total * 1e6,
        "single_thread_rows_per_s": BATCH / total,
    }


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1, help="epochs per variant per round (default 1)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved plain/traced rounds (default 6)")
    p.add_argument("--batches-per-epoch", type=int, default=400,
                   help="batches of 256 per epoch (default 400: ~1.3 s per plain epoch on 2 idle cores)")
    p.add_argument("--quick", action="store_true", help="small run for a CI smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads() (default: torch's)")
    p.add_argument("--no-features", action="store_true",
                   help="trace the training loop with feature_layer=False (outputs and labels only)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                   help="mlp: Linear-ReLU-Linear, the tracer's worst case; cnn: a small CIFAR-sized convnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-batches", type=int, default=None,
                   help="batches recorded for the worker throughput test (default 2 x batches-per-epoch)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: training,thread,storage,worker")
    p.add_argument("--parquet-options", default=None,
                   help="JSON dict replacing mldbg_callbacks.store.local.PARQUET_OPTIONS for this run "
                        "(experiments), e.g. '{\"compression\": \"zstd\", \"compression_level\": 1}'")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="wait up to this many seconds for other processes to go quiet before starting, and "
                        "before each round (shared machines); see training.quiet_epochs_only")
    p.add_argument("--keep-store", action="store_true", help="do not delete the temporary store")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.batches_per_epoch = 2, 1, 24
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parquet_options:
        local_store.PARQUET_OPTIONS = json.loads(args.parquet_options)

    other_at_start = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    store_root = Path(tempfile.mkdtemp(prefix="mldbg-overhead-"))
    result: dict = {
        "benchmark": "mldbg_callbacks tracer overhead",
        "setup": {
            "batch": BATCH, "input_dim": IN_DIM, "feature_dim": HIDDEN, "classes": CLASSES,
            "model": (f"Linear({IN_DIM},{HIDDEN})-ReLU-Linear({HIDDEN},{CLASSES})" if args.model == "mlp" else
                      f"Conv(3,32)-Pool-Conv(32,64)-Pool-Linear(4096,{HIDDEN})-ReLU-Linear({HIDDEN},{CLASSES}) on 3x32x32"),
            "optimizer": args.optimizer, "batches_per_epoch": args.batches_per_epoch,
            "quick": args.quick, "seed": args.seed,
            "tracer": "ClassificationTracer(model, feature_layer=%s, other arguments default)"
                      % ("False" if args.no_features else "None (auto: input of the last Linear)"),
        },
        "env": {
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pa.__version__, "mldbg_callbacks": getattr(mldbg_callbacks, "__version__", None),
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "other_processes_cores_at_start": other_at_start,
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "parquet_options": dict(local_store.PARQUET_OPTIONS),
        },
    }
    t_start = time.perf_counter()
    try:
        s = Setup(args.batches_per_epoch, args.seed, lr=0.05, optimizer=args.optimizer, model=args.model)
        if "training" not in skip:
            tracer = ClassificationTracer(s.model, "bench", "v", store=store_root,
                                          feature_layer=False if args.no_features else None)
            result["training"] = bench_training(s, tracer, args.rounds, args.epochs, args.wait_quiet)
            result["training"]["tracer_stats"] = {
                k: v for k, v in vars(tracer.stats).items() if k != "rows_skipped"}
            result["training"]["tracer_stats"]["rows_skipped"] = dict(tracer.stats.rows_skipped)
            tracer.close()
            log(f"training: ratio {result['training']['ratio_traced_over_plain']:.3f}")
            if "storage" not in skip and not args.no_features:
                result["storage"] = {"with_features": parquet_bytes(store_root / "bench" / "v")}
        pool_size = 16 if args.quick else 64
        batches = precomputed_batches(s, pool_size)
        if "thread" not in skip:
            result["training_thread"] = bench_training_thread(
                s, store_root, batches[: (32 if args.quick else 200)], reps=100 if args.quick else 1000)
            log(f"hand-over median {result['training_thread']['record_handover']['median_us']:.0f} us")
        if "storage" not in skip:
            result.setdefault("storage", {})
            if "with_features" not in result["storage"]:
                # the training section was skipped or ran without features: a forward-only epoch
                tracer = ClassificationTracer(s.model, "bench_feat", "v", store=store_root)
                with torch.no_grad():
                    perm = s.epoch_order()
                    for b in range(s.batches):
                        x, y, ids = s.batch(perm, b)
                        tracer(x, y, input_ids=ids, dataset_type="train", n_epoch=0)
                tracer.wait_for_save()
                tracer.close()
                result["storage"]["with_features"] = parquet_bytes(store_root / "bench_feat" / "v")
            result["storage"]["without_features"] = bench_storage_no_features(s, store_root, epochs=2)
            w, wo = result["storage"]["with_features"], result["storage"]["without_features"]
            result["storage"]["features_bytes_per_sample_epoch"] = (
                w["bytes_per_sample_epoch"] - wo["bytes_per_sample_epoch"])
            log(f"storage: {w['bytes_per_sample_epoch']:.0f} B/row with features, "
                f"{wo['bytes_per_sample_epoch']:.0f} without")
        if "worker" not in skip:
            total = args.worker_batches or (32 if args.quick else 2 * args.batches_per_epoch)
            result["worker"] = bench_worker(store_root, batches, total)
            result["worker"]["stages_single_thread"] = bench_worker_stages(
                store_root, batches, part_rows=(4096 if args.quick else 65536))
            log(f"worker: {result['worker']['rows_per_s']:.0f} rows/s")
        if "training" in result and "worker" in result:
            t, st = result["training"], result["worker"]["stages_single_thread"]
            train_cpu_us = t["process_cpu_s_per_epoch"]["plain"] / t["samples_per_epoch"] * 1e6
            worker_us = st["total_us_per_batch"] / BATCH
            result["analysis"] = {
                "plain_training_cpu_us_per_sample": train_cpu_us,
                "worker_cpu_us_per_sample_single_thread": worker_us,
                # with every core busy training, the worker's CPU time can only come out of training's:
                "cpu_bound_ratio_floor": 1.0 + worker_us / train_cpu_us,
                "worker_budget_us_per_sample_for_target": 0.05 * train_cpu_us,
                "note": "cpu_bound_ratio_floor = 1 + worker CPU / training CPU per sample: the best traced/plain "
                        "ratio possible while training keeps all cores busy and the worker does its work "
                        "during the epoch; reaching target_ratio needs worker CPU <= the budget above",
            }
    finally:
        if not args.keep_store:
            shutil.rmtree(store_root, ignore_errors=True)
        else:
            result["store_root"] = str(store_root)
    result["elapsed_s"] = time.perf_counter() - t_start
    result["env"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


if __name__ == "__main__":
    out = main()
    print(json.dumps(out, indent=1, default=str))
