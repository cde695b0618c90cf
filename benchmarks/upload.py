"""Remote tracing vs the local store: upload throughput and the training-thread overhead of the HttpSink.

Prints one JSON object to stdout (progress to stderr). In one process, against a real `mldbg serve`
subprocess on loopback (SQLite metadata, its store in a temporary directory):

1. ``throughput``: batches of 256 samples (100-class outputs + 512-d penultimate features) recorded as
   fast as possible, then ``wait_for_save()``; rows/s and MB/s (Parquet bytes written for the local
   store, Arrow IPC bytes uploaded for the server) for each sink, and the ratio remote / local.
2. ``training``: the MLP training loop of benchmarks/overhead.py, epochs interleaved in rotating order:
   plain, traced into the local store, traced to the server. Median epoch times, the ratios traced /
   plain for both sinks, and remote / local (uploads run on the tracing worker, off the training thread,
   so the remote ratio should equal the local one), plus ``wait_for_save()`` per epoch. CPU seconds per
   epoch of the training thread (the hot path), of the whole training process (client side: training
   plus the tracing worker) and of the server process: on one machine the loopback server's work
   (decoding, Parquet writing) competes with training for the same cores, which a real deployment,
   with the server elsewhere, does not.

    python benchmarks/upload.py            # a few minutes on 2 cores
    python benchmarks/upload.py --model cnn --batches-per-epoch 100   # a small convnet instead
    python benchmarks/upload.py --quick    # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

import mldbg_callbacks
from mldbg_callbacks.server.app import ServerConfig
from mldbg_callbacks.server.db import Database
from mldbg_callbacks.store import RemoteStore
from mldbg_callbacks.training import ClassificationTracer
from overhead import BATCH, Setup, median, precomputed_batches, run_epoch  # benchmarks/overhead.py


def log(msg: str) -> None:
    print(f"[upload] {msg}", file=sys.stderr, flush=True)


def start_server(root: Path) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = Database(ServerConfig(store=root).database_url())
    key = db.create_key("bench")
    db.dispose()
    process = subprocess.Popen([sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(root), "serve",
                                "--port", str(port)], stdout=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/v1/health", timeout=1).ok:
                return process, url, key
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def uploaded_bytes(root: Path) -> int:
    db = Database(ServerConfig(store=root).database_url())
    try:
        with db.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT coalesce(sum(bytes), 0) FROM chunks").scalar())
    finally:
        db.dispose()


def parquet_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def bench_throughput(batches: list, total_batches: int, sinks: dict, server_root: Path) -> dict:
    out = {}
    for name, store in sinks.items():
        tracer = ClassificationTracer(torch.nn.Identity(), "throughput", "v", store=store)
        before = uploaded_bytes(server_root) if name == "remote" else 0
        start = time.perf_counter()
        for i in range(total_batches):
            x, y, outputs, features = batches[i % len(batches)]
            tracer.core.record(outputs, y, input_ids=np.arange(i * BATCH, (i + 1) * BATCH), dataset_type="train",
                               n_epoch=0, features=features)
        stats = tracer.wait_for_save()
        seconds = time.perf_counter() - start
        tracer.close()
        size = uploaded_bytes(server_root) - before if name == "remote" else parquet_bytes(Path(store))
        out[name] = {"rows": stats.rows_written, "seconds": seconds, "rows_per_s": stats.rows_written / seconds,
                     "bytes": size, "mb_per_s": size / seconds / 1e6, "bytes_per_row": size / stats.rows_written,
                     "pending_uploads": stats.pending_uploads}
        log(f"throughput {name}: {out[name]['rows_per_s']:.0f} rows/s, {out[name]['mb_per_s']:.1f} MB/s")
    out["ratio_remote_over_local_rows_per_s"] = out["remote"]["rows_per_s"] / out["local"]["rows_per_s"]
    out["what_bytes_are"] = {"local": "Parquet written", "remote": "Arrow IPC (zstd) uploaded"}
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_training(s: Setup, sinks: dict, rounds: int, server_pid: int) -> dict:
    tracers = {name: ClassificationTracer(s.model, "training", name, store=store) for name, store in sinks.items()}
    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in tracers}}
    waits: dict[str, list[float]] = {name: [] for name in tracers}
    # CPU seconds per epoch (epoch + wait_for_save): the training thread alone (the hot path), the whole
    # training process (training + tracing worker: the client side), and the server process
    cpu: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in ("plain", *tracers)} for kind in ("training_thread", "training_process", "server")}
    epoch = {name: 0 for name in tracers}
    log("warm-up")
    run_epoch(s, None, 0)
    for name, tracer in tracers.items():
        run_epoch(s, tracer, 0)
        tracer.wait_for_save()
    variants = ["plain", *tracers]
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: drift hits all alike
        for kind in order:
            thread0, process0, server0 = time.thread_time(), time.process_time(), process_cpu_s(server_pid)
            if kind != "plain":
                epoch[kind] += 1
            times[kind].append(run_epoch(s, tracers.get(kind), epoch.get(kind, 0)))
            thread_cpu = time.thread_time() - thread0  # the epoch only: wait_for_save is not training
            if kind != "plain":
                start = time.perf_counter()
                tracers[kind].wait_for_save(n_epoch=epoch[kind])
                waits[kind].append(time.perf_counter() - start)
            cpu["training_thread"][kind].append(thread_cpu)
            cpu["training_process"][kind].append(time.process_time() - process0)
            cpu["server"][kind].append(process_cpu_s(server_pid) - server0)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {median(v):.3f}s" for k, v in times.items()))
    pending = {name: tracer.wait_for_save().pending_uploads for name, tracer in tracers.items()}
    for tracer in tracers.values():
        tracer.close()
    plain = median(times["plain"])
    return {
        "rounds": rounds, "batches_per_epoch": s.batches, "samples_per_epoch": s.n,
        "epoch_s": times, "wait_for_save_s": waits,
        "median_epoch_s": {k: median(v) for k, v in times.items()},
        "median_wait_for_save_s": {k: median(v) for k, v in waits.items()},
        "ratio_local_over_plain": median(times["local"]) / plain,
        "ratio_remote_over_plain": median(times["remote"]) / plain,
        "ratio_remote_over_local": median(times["remote"]) / median(times["local"]),
        "median_cpu_s": {kind: {k: median(v) for k, v in per.items()} for kind, per in cpu.items()},
        "training_thread_cpu_ratio_remote_over_local":
            median(cpu["training_thread"]["remote"]) / median(cpu["training_thread"]["local"]),
        "training_process_cpu_ratio_remote_over_local":
            median(cpu["training_process"]["remote"]) / median(cpu["training_process"]["local"]),
        "pending_uploads_at_end": pending,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches-per-epoch", type=int, default=400)
    parser.add_argument("--throughput-batches", type=int, default=400)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                        help="mlp: the tracer's worst case (almost no compute per sample); cnn: a small convnet")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches_per_epoch, args.throughput_batches = 2, 24, 24
    work = Path(tempfile.mkdtemp(prefix="mldbg-upload-bench-"))
    process, url, key = start_server(work / "server")
    try:
        def sinks(tag: str) -> dict:
            return {"local": str(work / f"local-{tag}"),
                    "remote": RemoteStore(url, key, spool_dir=work / f"spool-{tag}")}

        s = Setup(args.batches_per_epoch, args.seed, lr=0.05, optimizer="sgd", model=args.model)
        batches = precomputed_batches(s, min(64, args.throughput_batches))
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "mldbg_callbacks": mldbg_callbacks.__version__},
            "server": {"url": url, "metadata": "sqlite", "transport": "HTTP/1.1 on loopback, requests + uvicorn"},
            "throughput": bench_throughput(batches, args.throughput_batches, sinks("throughput"), work / "server"),
            "training": {"model": args.model, **bench_training(s, sinks("training"), args.rounds, process.pid)},
        }
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
