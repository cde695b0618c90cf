"""Evaluation cost: seconds and peak memory of a full classification evaluation on synthetic traces.

Traces of N samples x E epochs (C classes, D-dim features) are written straight into a LocalStore
(clustered features, logits that sharpen over epochs, a share of flipped labels), then one fresh
process runs ``Evaluator.request_evaluation()`` (latest epoch, dynamics over all E epochs) and reports
wall time and peak RSS. Prints one JSON object.

    python benchmarks/evaluation.py                     # N = 25k, 50k, 100k, 200k; E=10, C=10, D=128
    python benchmarks/evaluation.py --sizes 5000 --epochs 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa


def write_traces(root: str, n: int, epochs: int, classes: int, dim: int, seed: int = 0) -> float:
    from mldbg_callbacks.store import LocalStore
    from mldbg_callbacks.core.vectors import vector_table

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 0.3  # overlapping classes: real errors
    truth = rng.integers(0, classes, n)
    labels = truth.copy()
    flipped = rng.random(n) < 0.05
    labels[flipped] = (truth[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    base = centers[truth] + rng.normal(size=(n, dim)).astype(np.float32)
    ids = pa.array(np.arange(n).astype(str))
    writer = LocalStore(root).run("bench", f"n{n}")
    started = time.perf_counter()
    for epoch in range(epochs):
        features = base + 0.1 * rng.normal(size=(n, dim)).astype(np.float32)
        logits = (features @ centers.T) * (0.2 + 0.1 * epoch) + 0.3 * rng.normal(size=(n, classes)).astype(np.float32)
        table = vector_table({"input_id": ids, "label": pa.array(labels, pa.int64()),
                              "logits": logits.astype(np.float32), "features": features.astype(np.float16)})
        part = writer.write_part("train", epoch, 0, table)
        writer.commit("train", epoch, 0, [part], n, 1)
    writer.write_meta({"task": "classification", "num_classes": classes, "output_kind": "logits",
                       "feature_dim": dim, "score_storage": "dense"})
    return time.perf_counter() - started


def evaluate_once(root: str, n: int) -> dict:
    """Runs in a fresh process so that peak RSS belongs to this evaluation alone."""
    from mldbg_callbacks.evaluator import Evaluator

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu_started = time.perf_counter(), time.process_time()
    result = Evaluator("bench", f"n{n}", store=root).request_evaluation()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    summary = result.metrics_summary().iloc[0]
    # cpu_seconds (both cores summed) is less distorted than wall time when other processes share the machine
    with open("/proc/loadavg") as handle:
        load = float(handle.read().split()[0])
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "load_average_1min": load, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mb": round(before / 1024, 1), "units": int(summary["counts"]),
            "error_proba_auroc": round(float(summary["error_proba_auroc"]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="25000,50000,100000,200000")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(evaluate_once(args.child[0], int(args.child[1]))))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="mldbg-eval-bench-") as root:
        for n in (int(s) for s in args.sizes.split(",")):
            write_s = write_traces(root, n, args.epochs, args.classes, args.dim)
            child = subprocess.run([sys.executable, __file__, "--child", root, str(n)], capture_output=True, text=True,
                                   check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            run = json.loads(child.stdout.strip().splitlines()[-1])
            run.update({"n": n, "sample_epochs": n * args.epochs, "write_traces_s": round(write_s, 2)})
            run["sample_epochs_per_s"] = round(run["sample_epochs"] / run["seconds"])
            runs.append(run)
    print(json.dumps({"epochs": args.epochs, "classes": args.classes, "dim": args.dim, "cpu_count": os.cpu_count(),
                      "goal": "1M sample-epochs (N=100k, E=10) in <= 30 s", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
