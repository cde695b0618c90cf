"""Tracing-core throughput: how many samples per second the background writer sustains, where its time
goes, and how close that is to the physical limit of writing the same data.

Prints one JSON object to stdout (progress to stderr). Two workloads, NumPy arrays as a framework hands
them over (no model, no training: the core alone, recording as fast as it accepts):

- ``classification``: batches of 256 samples, 100 logits (float32) + 512-d features (float32), labels
  and integer ids, through ``classification_core`` (what ClassificationTracer records into);
- ``detection``: batches of 16 images, 100 detections per image (boxes, scores, labels) and 7 ground-truth
  boxes, through ``detection_core``.

For each, at every size of ``--sizes`` (growth):

- ``core``: ``record()`` every batch, then ``wait_for_save()``: samples/s end to end (encode, duplicate
  check, Parquet write, commit), the training thread's time per ``record()`` call, bytes on disk;
- ``tofile``: the same arrays written with ``numpy.ndarray.tofile`` into one file per 65,536 samples, then
  fsync: the raw I/O floor for these bytes;
- ``plain_parquet``: the same arrays as a plain pyarrow table (fixed-size lists for vectors, nested lists
  for boxes) written with ``pyarrow.parquet.write_table`` (pyarrow's defaults) per 65,536 samples: what a
  hand-written Parquet logger would cost.

``profile`` runs the worker's stages single-threaded on the calling thread (the package's own code:
``codec.encode`` of staged batches merged as the worker merges them, the duplicate check,
``concat_tables`` and the store's ``write_part``) under cProfile and reports each stage's share and the
top functions by own time.

    python benchmarks/core_throughput.py                   # about a minute on 2 cores
    python benchmarks/core_throughput.py --quick           # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mldbg_callbacks.core.batch import PendingBatch
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import classification_core, detection_core
from machine_load import cpu_snapshot, foreign_cores  # benchmarks/machine_load.py

PART_ROWS = 65536  # TraceCore's default rows_per_part: the same file granularity for every writer
CLS_BATCH, CLASSES, FEATURES = 256, 100, 512
DET_BATCH, DETS, GTS, DET_CLASSES = 16, 100, 7, 80


def log(msg: str) -> None:
    print(f"[core_throughput] {msg}", file=sys.stderr, flush=True)


# -- workloads: a pool of distinct batches, reused with fresh ids ------------------------------------
def classification_pool(rng: np.random.Generator, count: int) -> list[dict]:
    pool = []
    for _ in range(count):
        logits = rng.standard_normal((CLS_BATCH, CLASSES), dtype=np.float32)
        pool.append({"outputs": logits, "targets": rng.integers(0, CLASSES, CLS_BATCH),
                     "features": np.abs(rng.standard_normal((CLS_BATCH, FEATURES), dtype=np.float32))})
    return pool


def detection_pool(rng: np.random.Generator, count: int) -> list[dict]:
    def boxes(n: int) -> np.ndarray:
        xy = rng.uniform(0, 560, (n, 2)).astype(np.float32)
        return np.concatenate([xy, xy + rng.uniform(4, 80, (n, 2)).astype(np.float32)], axis=1)

    pool = []
    for _ in range(count):
        pool.append({
            "outputs": {"boxes": [boxes(DETS) for _ in range(DET_BATCH)],
                        "scores": [rng.uniform(0.05, 1, DETS).astype(np.float32) for _ in range(DET_BATCH)],
                        "labels": [rng.integers(0, DET_CLASSES, DETS) for _ in range(DET_BATCH)],
                        "image_size": [(640, 640)] * DET_BATCH},
            "targets": {"boxes": [boxes(GTS) for _ in range(DET_BATCH)],
                        "labels": [rng.integers(0, DET_CLASSES, GTS) for _ in range(DET_BATCH)]},
            "features": None})
    return pool


WORKLOADS = {
    "classification": {"batch": CLS_BATCH, "pool": classification_pool,
                       "core": lambda store: classification_core("bench", "v", store=store)},
    "detection": {"batch": DET_BATCH, "pool": detection_pool,
                  "core": lambda store: detection_core("bench", "v", store=store, num_classes=DET_CLASSES)},
}


def flat_arrays(item: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The batch's arrays as a plain logger would have them (detections concatenated, with per-image counts)."""
    if isinstance(item["outputs"], dict):
        out, gt = item["outputs"], item["targets"]
        return {"input_id": ids, "pred_boxes": np.concatenate(out["boxes"]), "pred_scores": np.concatenate(out["scores"]),
                "pred_labels": np.concatenate(out["labels"]), "pred_counts": np.array([len(b) for b in out["boxes"]]),
                "gt_boxes": np.concatenate(gt["boxes"]), "gt_labels": np.concatenate(gt["labels"]),
                "gt_counts": np.array([len(b) for b in gt["boxes"]])}
    return {"input_id": ids, "logits": item["outputs"], "label": item["targets"], "features": item["features"]}


def plain_table(item: dict, ids: np.ndarray) -> pa.Table:
    """The batch as a plain pyarrow table, one row per sample (image)."""
    def fixed(matrix: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])

    if isinstance(item["outputs"], dict):
        out, gt = item["outputs"], item["targets"]

        def nested(per_image: list[np.ndarray]) -> pa.Array:
            flat = np.concatenate(per_image)
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in per_image])]).astype(np.int32)
            values = fixed(flat) if flat.ndim == 2 else pa.array(flat)
            return pa.ListArray.from_arrays(pa.array(offsets), values)

        return pa.table({"input_id": ids, "pred_boxes": nested(out["boxes"]), "pred_scores": nested(out["scores"]),
                         "pred_labels": nested(out["labels"]), "gt_boxes": nested(gt["boxes"]),
                         "gt_labels": nested(gt["labels"])})
    return pa.table({"input_id": ids, "label": item["targets"], "logits": fixed(item["outputs"]),
                     "features": fixed(item["features"])})


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def fsync_tree(root: Path) -> None:
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# -- the three writers ---------------------------------------------------------------------------------
def run_core(work: dict, pool: list[dict], batches: int, root: Path) -> dict:
    core = work["core"](str(root))
    size = work["batch"]
    record_s = []
    snap = cpu_snapshot()
    start = time.perf_counter()
    for b in range(batches):
        item = pool[b % len(pool)]
        ids = np.arange(b * size, (b + 1) * size)
        t0 = time.perf_counter()
        core.record(item["outputs"], item["targets"], input_ids=ids, dataset_type="train", n_epoch=0,
                    features=item["features"])
        record_s.append(time.perf_counter() - t0)
    recorded = time.perf_counter() - start
    stats = core.wait_for_save()
    seconds = time.perf_counter() - start
    core.close()
    rows = batches * size
    assert stats.rows_written == rows and not stats.total_skipped, vars(stats)
    disk = tree_bytes(root)
    return {"samples": rows, "seconds": seconds, "samples_per_s": rows / seconds, "bytes_on_disk": disk,
            "bytes_per_sample": disk / rows, "MB_per_s": disk / seconds / 1e6,
            "record_phase_s": recorded, "record_call_median_us": float(np.median(record_s)) * 1e6,
            "other_processes_cores": foreign_cores(snap, cpu_snapshot())}


def run_tofile(work: dict, pool: list[dict], batches: int, root: Path) -> dict:
    size = work["batch"]
    root.mkdir(parents=True)
    start = time.perf_counter()
    handle, part = None, -1
    for b in range(batches):
        if (b * size) // PART_ROWS != part:
            if handle:
                handle.close()
            part = (b * size) // PART_ROWS
            handle = open(root / f"part-{part:05d}.bin", "wb")
        for array in flat_arrays(pool[b % len(pool)], np.arange(b * size, (b + 1) * size)).values():
            np.ascontiguousarray(array).tofile(handle)
    handle.close()
    fsync_tree(root)
    seconds = time.perf_counter() - start
    rows, disk = batches * size, tree_bytes(root)
    return {"samples": rows, "seconds": seconds, "samples_per_s": rows / seconds, "bytes_on_disk": disk,
            "bytes_per_sample": disk / rows, "MB_per_s": disk / seconds / 1e6}


def run_plain_parquet(work: dict, pool: list[dict], batches: int, root: Path) -> dict:
    size = work["batch"]
    root.mkdir(parents=True)
    start = time.perf_counter()
    tables, rows_in_part, part = [], 0, 0
    for b in range(batches):
        tables.append(plain_table(pool[b % len(pool)], np.arange(b * size, (b + 1) * size)))
        rows_in_part += size
        if rows_in_part >= PART_ROWS or b == batches - 1:
            pq.write_table(pa.concat_tables(tables), root / f"part-{part:05d}.parquet")
            tables, rows_in_part, part = [], 0, part + 1
    fsync_tree(root)
    seconds = time.perf_counter() - start
    rows, disk = batches * size, tree_bytes(root)
    return {"samples": rows, "seconds": seconds, "samples_per_s": rows / seconds, "bytes_on_disk": disk,
            "bytes_per_sample": disk / rows, "MB_per_s": disk / seconds / 1e6}


def profile_worker(work: dict, pool: list[dict], batches: int, root: Path, top: int = 12) -> dict:
    """The worker's stages on this thread, with the package's own code, under cProfile."""
    core = work["core"](str(root))
    codec, sink, size = core.codec, core.sink, work["batch"]
    stage_s = {"encode": 0.0, "drop_duplicates": 0.0, "concat": 0.0, "write_part": 0.0}
    profiler = cProfile.Profile()
    clock = time.perf_counter
    profiler.enable()
    tables, staged = [], []
    for b in range(batches):
        item = pool[b % len(pool)]
        ids = np.arange(b * size, (b + 1) * size)
        pending = PendingBatch(item["outputs"], item["targets"], ids, item["features"], None, "train", 0)
        codec.check(pending)
        staged.append(pending)
        if len(staged) * size < core.stage_rows and b < batches - 1:  # staged and merged as the worker does
            continue
        t0 = clock(); encoded = codec.encode(codec.merge(staged) if len(staged) > 1 else staged[0]); t1 = clock()
        table = core._drop_duplicates(("train", 0), encoded.table); t2 = clock()
        stage_s["encode"] += t1 - t0
        stage_s["drop_duplicates"] += t2 - t1
        tables.append(table)
        staged = []
    t0 = clock(); table = pa.concat_tables(tables); t1 = clock()
    sink.write_part("train", 0, 0, table); t2 = clock()
    profiler.disable()
    stage_s["concat"], stage_s["write_part"] = t1 - t0, t2 - t1
    core.close()
    total = sum(stage_s.values())
    stats = pstats.Stats(profiler, stream=io.StringIO()).sort_stats("tottime")
    functions = []
    for (filename, line, name), (_, calls, own, cumulative, _) in sorted(
            stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = filename.split("site-packages/")[-1].split("/work/")[-1] if filename != "~" else "builtin"
        functions.append({"function": f"{where}:{line}({name})", "calls": calls, "own_s": own,
                          "own_share": own / total if total else None})
    rows = batches * size
    return {"samples": rows, "single_thread_samples_per_s": rows / total,
            "stage_share": {k: v / total for k, v in stage_s.items()},
            "stage_us_per_sample": {k: v / rows * 1e6 for k, v in stage_s.items()},
            "top_functions_by_own_time": functions}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="65536,131072,262144",
                        help="classification samples per run (growth); detection runs 1/16 of each as images")
    parser.add_argument("--repeat", type=int, default=2, help="best of N per writer and size")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.repeat = [4096, 8192], 1
    rng = np.random.default_rng(0)
    result: dict = {"benchmark": "core_throughput", "setup": {
        "classification": f"batch {CLS_BATCH}, {CLASSES} float32 logits + {FEATURES}-d float32 features, labels, int ids",
        "detection": f"batch {DET_BATCH} images, {DETS} detections + {GTS} ground-truth boxes per image, {DET_CLASSES} classes",
        "part_rows": PART_ROWS, "repeat": args.repeat, "pyarrow": pa.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count()}}
    tmp = Path(tempfile.mkdtemp(prefix="mldbg-throughput-"))
    try:
        for name, work in WORKLOADS.items():
            pool = work["pool"](rng, 16)
            runs = []
            for samples in sizes:
                if name == "detection":
                    samples //= 16  # images: each carries ~16x a classification sample's bytes
                batches = max(1, samples // work["batch"])
                row = {"samples": batches * work["batch"]}
                for writer, fn in (("core", run_core), ("tofile", run_tofile), ("plain_parquet", run_plain_parquet)):
                    best = None
                    for r in range(args.repeat):
                        out = fn(work, pool, batches, tmp / f"{name}-{writer}-{samples}-{r}")
                        shutil.rmtree(tmp / f"{name}-{writer}-{samples}-{r}", ignore_errors=True)
                        best = out if best is None or out["seconds"] < best["seconds"] else best
                    row[writer] = best
                row["core_over_tofile_speed"] = row["core"]["samples_per_s"] / row["tofile"]["samples_per_s"]
                row["core_over_plain_parquet_speed"] = (row["core"]["samples_per_s"]
                                                        / row["plain_parquet"]["samples_per_s"])
                log(f"{name} {row['samples']}: core {row['core']['samples_per_s']:.0f}/s, "
                    f"tofile {row['tofile']['samples_per_s']:.0f}/s, "
                    f"plain Parquet {row['plain_parquet']['samples_per_s']:.0f}/s")
                runs.append(row)
            profile_batches = max(1, min(sizes[0], PART_ROWS) // (16 if name == "detection" else 1) // work["batch"])
            result[name] = {"runs": runs, "profile": profile_worker(work, pool, profile_batches, tmp / f"{name}-profile")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
