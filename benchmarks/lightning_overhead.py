"""Overhead of MLDebuggerCallback: the same small Lightning fit with and without the callback.

Prints one JSON object to stdout (progress goes to stderr). In one process, fits of an MLP
256 -> 512 -> ReLU -> Linear(512, 100) (batch 256, Adam, synthetic data from a seeded NumPy rng, a
validation loader as well) alternate in ABC-CBA order per round, so drift and other processes on the
machine hit every arm alike:

- ``plain``: no callback;
- ``traced``: MLDebuggerCallback as users run it (features on), the timed span including its wait for
  durable traces at the end of training;
- ``adapter_only``: the callback with a core that discards every batch: the callback's own work
  (hooks, reading outputs and batches) without the core's background encoding and Parquet writes.

Each fit gets a fresh model (same seed) and, when traced, a fresh version in a temporary store.
Reported: median fit times and their ratios to ``plain`` (target <= 1.05), per-step medians, the
process's CPU seconds per fit (all threads: the total work tracing adds), the training thread's time
inside the callback per step, the CPU load of other processes during the fits (the machine may be
shared), and the one-off LabelTracker PNG (switched off in the timed fits: a fixed cost per run).

    python benchmarks/lightning_overhead.py            # about two minutes on 2 CPU cores
    python benchmarks/lightning_overhead.py --quick    # smoke test
    python benchmarks/lightning_overhead.py --wait-quiet 60   # on a shared machine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from mldbg_callbacks.integrations.lightning import MLDebuggerCallback
from machine_load import (HookTimer, cpu_snapshot, foreign_cores, ratio_stats, wait_quiet,  # benchmarks/machine_load.py
                          work_added)

BATCH, IN_DIM, HIDDEN, CLASSES = 256, 256, 512, 100
MODEL = "mlp"  # set from --model


def log(msg: str) -> None:
    print(f"[lightning_overhead] {msg}", file=sys.stderr, flush=True)


class MLP(pl.LightningModule):
    """The tracer's worst case (almost no compute per sample); ``cnn=True``: a small CIFAR-sized convnet
    on 3x32x32 inputs with the same 512-d penultimate features and 100 classes."""

    def __init__(self, seed: int = 0, cnn: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        body = [torch.nn.Linear(IN_DIM, HIDDEN)] if not cnn else [
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, HIDDEN)]
        self.cnn = cnn
        self.net = torch.nn.Sequential(*body, torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))

    def forward(self, x):
        if self.cnn:  # the synthetic rows, tiled into 3x32x32 images
            x = x[:, :192].repeat_interleave(16, dim=1).reshape(len(x), 3, 32, 32)
        return self.net(x)

    def training_step(self, batch, batch_idx):  # returns only the loss: the callback reads the forward
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def synthetic(n: int, rng: np.random.Generator, teacher: np.ndarray, offset: int) -> TensorDataset:
    x = rng.standard_normal((n, IN_DIM), dtype=np.float32)
    y = (x @ teacher + 2.0 * rng.standard_normal((n, CLASSES)).astype(np.float32)).argmax(axis=1)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)),
                         torch.arange(offset, offset + n))


def timed_callback(timer: HookTimer, *args, **kwargs) -> MLDebuggerCallback:
    """The callback, with what it does on the training thread per batch (hand-over included) timed."""
    callback = MLDebuggerCallback(*args, **kwargs)
    for name in ("_trace", "_forget_latest"):
        setattr(callback, name, timer.wrap(getattr(callback, name)))
    return callback


class DiscardingCore:
    """Stands in for the TraceCore in the ``adapter_only`` arm: takes every batch and keeps nothing, so
    that arm measures the callback's own work (hooks, reading outputs and batches) without the core's
    background encoding and Parquet writing."""

    rank = 0

    def record(self, *args, **kwargs) -> None:
        pass

    def end_epoch(self, n_epoch: int) -> None:
        pass

    def wait_for_save(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def stats(self):
        from mldbg_callbacks.core.trace_core import TraceStats

        return TraceStats()


def fit_once(train: TensorDataset, val: TensorDataset, epochs: int, callback: MLDebuggerCallback | None,
             foreign: list | None = None, cpu: list | None = None) -> float:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback] if callback is not None else [])
    loaders = (DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)),
               DataLoader(val, batch_size=BATCH))
    model = MLP(cnn=MODEL == "cnn")
    snapshot = cpu_snapshot()
    cpu_start, start = time.process_time(), time.perf_counter()
    trainer.fit(model, *loaders)
    wall = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.process_time() - cpu_start)
    if foreign is not None:
        foreign.append(foreign_cores(snapshot, cpu_snapshot()))
    return wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6, help="ABBA rounds (each: one plain and one traced fit)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-batches", type=int, default=60)
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each round wait up to this many seconds for other processes to go quiet")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads (0: torch's default, every core)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    args = parser.parse_args(argv)
    global MODEL
    MODEL = args.model
    if args.quick:
        args.rounds, args.epochs, args.train_batches, args.val_batches = 1, 1, 8, 2

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((IN_DIM, CLASSES)).astype(np.float32)
    n_train, n_val = args.train_batches * BATCH, args.val_batches * BATCH
    train, val = synthetic(n_train, rng, teacher, 0), synthetic(n_val, rng, teacher, n_train)
    store = tempfile.mkdtemp(prefix="mldbg-lightning-bench-")
    try:
        log("warm-up: one plain and one traced fit")
        fit_once(train, val, 1, None)
        fit_once(train, val, 1, MLDebuggerCallback("bench", "warmup", store=store, label_tracker_plot=False))
        plain, traced, adapter, foreign, plain_cpu, traced_cpu, adapter_cpu = [], [], [], [], [], [], []
        stats, worker_cpu = None, []
        timers = {"traced": HookTimer(), "adapter_only": HookTimer()}  # the callback's time on the training thread
        for r in range(args.rounds):
            if args.wait_quiet > 0:
                wait_quiet(args.wait_quiet)
            kinds = ("plain", "traced", "adapter_only")
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                if kind == "adapter_only":
                    callback = timed_callback(timers["adapter_only"], "bench", f"a{r}", store=store,
                                              label_tracker_plot=False)
                    callback.core = DiscardingCore()
                    adapter.append(fit_once(train, val, args.epochs, callback, foreign, adapter_cpu))
                elif kind == "plain":
                    plain.append(fit_once(train, val, args.epochs, None, foreign, plain_cpu))
                else:
                    callback = timed_callback(timers["traced"], "bench", f"r{r}", store=store, label_tracker_plot=False)
                    traced.append(fit_once(train, val, args.epochs, callback, foreign, traced_cpu))
                    stats = callback.stats
                    worker_cpu.append(stats.worker_cpu_s)
            log(f"round {r + 1}/{args.rounds}: plain {statistics.median(plain):.3f}s "
                f"traced {statistics.median(traced):.3f}s adapter only {statistics.median(adapter):.3f}s")

        from mldbg_callbacks.evaluation.label_tracker import save_label_tracker_plot

        start = time.perf_counter()
        save_label_tracker_plot(store, "bench", f"r{args.rounds - 1}")
        plot_s = time.perf_counter() - start
        steps = args.epochs * (args.train_batches + args.val_batches)
        median_plain, median_traced = statistics.median(plain), statistics.median(traced)
        print(json.dumps({
            "benchmark": "lightning_overhead",
            "setup": {"model": (f"MLP {IN_DIM}->{HIDDEN}->ReLU->{CLASSES}" if MODEL == "mlp" else
                                f"Conv(3,32)-Pool-Conv(32,64)-Pool-Linear(4096,{HIDDEN})-ReLU-Linear({HIDDEN},{CLASSES}) on 3x32x32"), "batch": BATCH, "epochs": args.epochs,
                      "train_samples": n_train, "val_samples": n_val, "rounds": args.rounds, "order": "ABC-CBA",
                      "torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads(),
                      "cpu_count": os.cpu_count(), "python": platform.python_version()},
            "plain_fit_s": {"median": median_plain, "all": plain},
            "traced_fit_s": {"median": median_traced, "all": traced},
            "ratio_median_fit": median_traced / median_plain,
            "robust_fit": ratio_stats(plain, traced),
            "work": work_added(median_plain, statistics.median(plain_cpu), statistics.median(worker_cpu),
                               timers["traced"].seconds / len(traced)),
            "adapter_only_fit_s": {"median": statistics.median(adapter), "all": adapter},
            "ratio_median_fit_adapter_only": statistics.median(adapter) / median_plain,
            "target_ratio": 1.05,
            "per_step_ms": {"plain": 1e3 * median_plain / steps, "traced": 1e3 * median_traced / steps},
            "callback_training_thread_ms_per_step": {
                arm: 1e3 * timer.seconds / (steps * len(traced)) for arm, timer in timers.items()},
            "process_cpu_s": {"plain_median": statistics.median(plain_cpu),
                              "traced_median": statistics.median(traced_cpu),
                              "adapter_only_median": statistics.median(adapter_cpu),
                              "ratio_traced": statistics.median(traced_cpu) / statistics.median(plain_cpu),
                              "ratio_adapter_only": statistics.median(adapter_cpu) / statistics.median(plain_cpu)},
            "rows_written_per_traced_fit": stats.rows_written if stats else None,
            "label_tracker_png_s": plot_s,
            "other_processes_cores": {"median": statistics.median([f for f in foreign if f is not None] or [0.0]),
                                      "max": max([f for f in foreign if f is not None] or [0.0])},
        }, indent=1))
    finally:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
