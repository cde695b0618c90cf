"""A real training process for the crash tests (run as a script, killed with SIGKILL by the test).

It trains a softmax regression on scikit-learn's digits with plain NumPy SGD and traces every batch
through the real ``ClassificationTracer`` into a LocalStore, one epoch after another: record the
epoch's batches, ``wait_for_save(n_epoch)``, then save a checkpoint (weights + next epoch). With
``--resume`` it continues from the checkpoint, as a restarted training job would; with ``--no-wait`` it
never waits for its traces and simply exits (the tracer's exit handler must save them).

The process is rank-aware through ``RANK`` / ``WORLD_SIZE`` (as torchrun sets them): it trains on its
shard ``ids[rank::world_size]`` only.

In ``--crash-epoch`` it records ``--ready-after`` batches, writes the ``--ready`` file (the test's signal
to kill it), then goes on recording the rest of the epoch slowly and never finishes it, so the kill lands
while parts of the open epoch are being spilled.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from mldbg_callbacks.training import ClassificationTracer

MODEL, VERSION = "digits", "crash"
N_SAMPLES, BATCH, CLASSES = 600, 25, 10


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first 600 digits (pixels scaled to [0, 1]), labels and the ids every test compares against."""
    x, y = load_digits(return_X_y=True)
    return (x[:N_SAMPLES] / 16.0).astype(np.float32), y[:N_SAMPLES], np.array([f"d{i:04d}" for i in range(N_SAMPLES)])


def trace_digits(tracer: ClassificationTracer, epochs: range, dataset_types: tuple[str, ...] = ("train",),
                 batch: int = 50) -> None:
    """Trace the digits with a fixed random linear model, batch by batch, as a training loop would (in-process
    tests: the same rows every time, so a faulty run can be compared with a clean one)."""
    x, y, ids = digits()
    weights = np.random.default_rng(0).standard_normal((x.shape[1], CLASSES)).astype(np.float32)
    for epoch in epochs:
        for dataset_type in dataset_types:
            for start in range(0, N_SAMPLES, batch):
                rows = slice(start, start + batch)
                tracer.record(x[rows] @ weights, y[rows], input_ids=ids[rows], dataset_type=dataset_type,
                              n_epoch=epoch)


def shard_ids(rank: int, world_size: int) -> list[str]:
    return digits()[2][rank::world_size].tolist()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def wait_for_a_spilled_part(store: Path, epoch: int, rank: int, timeout_s: float = 60.0) -> None:
    """Block until the open epoch has a part on disk, so the kill finds uncommitted data to leave behind."""
    rank_dir = store / MODEL / VERSION / "traces" / "dataset_type=train" / f"n_epoch={epoch}" / f"rank={rank}"
    deadline = time.monotonic() + timeout_s
    while not any(rank_dir.glob("_pending-*.parquet")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no part of epoch {epoch} was spilled to {rank_dir}")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--crash-epoch", type=int, default=-1)
    parser.add_argument("--ready-after", type=int, default=4, help="batches of the crash epoch before --ready")
    parser.add_argument("--ready", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-wait", action="store_true", help="never call wait_for_save() or close(): exit as is")
    args = parser.parse_args()

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    x, y, ids = digits()
    x, y, ids = x[rank::world_size], y[rank::world_size], ids[rank::world_size]
    checkpoint = Path(args.store) / f"checkpoint-rank{rank}.npz"
    weights, start_epoch = np.zeros((x.shape[1], CLASSES), np.float32), 0
    if args.resume and checkpoint.exists():
        saved = np.load(checkpoint)
        weights, start_epoch = saved["weights"], int(saved["next_epoch"])

    tracer = ClassificationTracer(lambda batch: batch @ weights, MODEL, VERSION, store=args.store, feature_layer=False)
    tracer.core.rows_per_part = 2 * BATCH  # spill parts often: the kill lands between (or inside) part writes
    order = np.random.default_rng(rank).permutation(len(x))
    for epoch in range(start_epoch, args.epochs):
        for step, start in enumerate(range(0, len(x), BATCH)):
            rows = order[start:start + BATCH]
            logits = tracer(x[rows], y[rows], input_ids=ids[rows], n_epoch=epoch)
            gradient = softmax(logits)
            gradient[np.arange(len(rows)), y[rows]] -= 1.0
            weights -= 0.5 * x[rows].T @ gradient / len(rows)  # in place: the traced forward sees it
            if epoch == args.crash_epoch:
                if step + 1 == args.ready_after:
                    wait_for_a_spilled_part(Path(args.store), epoch, rank)
                    Path(args.ready).write_text(str(os.getpid()))
                time.sleep(0.02)
        if epoch == args.crash_epoch:
            time.sleep(3600)  # never finishes the epoch: the test kills the process
        if args.no_wait:
            continue
        tracer.wait_for_save(n_epoch=epoch)
        tmp = checkpoint.with_suffix(".tmp.npz")
        np.savez(tmp, weights=weights, next_epoch=epoch + 1)
        os.replace(tmp, checkpoint)
    if not args.no_wait:
        tracer.close()


if __name__ == "__main__":
    main()
