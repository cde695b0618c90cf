"""Per-sample prediction logging: mldbg-callbacks' tracer vs Weights & Biases (offline), same training.

Prints one JSON object to stdout (progress to stderr). The training loop of benchmarks/overhead.py
(batch 256, 100 classes; ``--model mlp`` is the tracer's worst case, ``--model cnn`` a small convnet)
runs in interleaved rounds (rotating order, so drift hits every variant alike) as:

- ``plain``: no logging;
- ``mldbg``: ``ClassificationTracer`` without features (the same content as the W&B tables: id, label,
  the 100 scores), ``wait_for_save()`` at every epoch end counted in the epoch;
- ``wandb_rows``: W&B's documented pattern for logging predictions: a ``wandb.Table`` per epoch with one
  ``add_data(id, label, prediction, *scores)`` per sample in the loop, logged with ``run.log`` at epoch
  end (https://docs.wandb.ai/guides/track/log/log-tables);
- ``wandb_bulk``: the cheapest W&B way to log the same table we found: the batches' arrays kept in the
  loop, one ``wandb.Table(columns=..., data=rows)`` built and logged at epoch end (4x faster than
  ``wandb.Table(dataframe=...)``).

Per variant: the median epoch time, the ratio to plain, and the overhead (ratio - 1); bytes on disk per
sample-epoch (W&B's offline run directory vs our Parquet store). ``wandb.Table.MAX_ROWS`` is raised to an
epoch's samples: ``run.log`` would otherwise keep only the first 10,000 rows of each table. The goal is our
overhead at most 1/10 of W&B's. W&B runs with ``mode="offline"`` (nothing leaves the machine) in a
temporary directory.

    python benchmarks/wandb_compare.py                  # a few minutes on 2 cores
    python benchmarks/wandb_compare.py --model cnn --batches-per-epoch 60
    python benchmarks/wandb_compare.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import mldbg_callbacks
from mldbg_callbacks.training import ClassificationTracer
from overhead import CLASSES, Setup, median  # benchmarks/overhead.py

SCORE_COLUMNS = [f"score_{k}" for k in range(CLASSES)]


def log(msg: str) -> None:
    print(f"[wandb] {msg}", file=sys.stderr, flush=True)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


class WandbLogger:
    """One offline W&B run; ``per_sample`` selects the add_data-per-sample pattern."""

    def __init__(self, directory: Path, per_sample: bool):
        import wandb

        self.wandb = wandb
        self.per_sample = per_sample
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="mldbg-benchmark", mode="offline", dir=str(directory), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.start_epoch()

    def start_epoch(self) -> None:
        self.table = self.wandb.Table(columns=["id", "label", "prediction", *SCORE_COLUMNS]) if self.per_sample else None
        self.arrays: list[tuple] = []

    def batch(self, ids: np.ndarray, labels: torch.Tensor, outputs: torch.Tensor) -> None:
        scores = outputs.detach().softmax(dim=1).cpu().numpy()
        labels = labels.cpu().numpy()
        if self.per_sample:
            predictions = scores.argmax(axis=1)
            for i in range(len(ids)):
                self.table.add_data(int(ids[i]), int(labels[i]), int(predictions[i]), *scores[i].tolist())
        else:
            self.arrays.append((ids, labels, scores))

    def end_epoch(self, epoch: int) -> None:
        if not self.per_sample:
            ids, labels, scores = (np.concatenate(parts) for parts in zip(*self.arrays))
            frame = pd.DataFrame(scores, columns=SCORE_COLUMNS)
            frame.insert(0, "prediction", scores.argmax(axis=1))
            frame.insert(0, "label", labels)
            frame.insert(0, "id", ids)
            self.table = self.wandb.Table(columns=list(frame.columns), data=frame.to_numpy(object).tolist())
        self.run.log({"predictions": self.table, "epoch": epoch})
        self.start_epoch()

    def finish(self) -> None:
        self.run.finish()


def run_epoch(s: Setup, variant: str, logger, epoch: int) -> float:
    """One training epoch including its end-of-epoch logging; returns the wall time."""
    perm = s.epoch_order()
    s.model.train()
    start = time.perf_counter()
    for b in range(s.batches):
        x, y, ids = s.batch(perm, b)
        if variant == "mldbg":
            out = logger(x, y, input_ids=ids, dataset_type="train", n_epoch=epoch)
        else:
            out = s.model(x)
            if logger is not None:
                logger.batch(ids, y, out)
        loss = s.loss_fn(out, y)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
    if variant == "mldbg":
        logger.wait_for_save(n_epoch=epoch)
    elif logger is not None:
        logger.end_epoch(epoch)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches-per-epoch", type=int, default=200)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches_per_epoch = 2, 8
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    work = Path(tempfile.mkdtemp(prefix="mldbg-wandb-bench-"))
    try:
        s = Setup(args.batches_per_epoch, args.seed, lr=0.05, optimizer="sgd", model=args.model)
        # run.log() truncates a Table to Table.MAX_ROWS (10,000) rows with a logged warning: raised to an
        # epoch's samples, so that W&B stores every row, as the tracer does
        wandb.Table.MAX_ROWS = max(wandb.Table.MAX_ROWS, s.n)
        loggers = {
            "plain": None,
            "mldbg": ClassificationTracer(s.model, "bench", "v1", store=work / "mldbg", feature_layer=False),
            "wandb_rows": WandbLogger(work / "wandb_rows", per_sample=True),
            "wandb_bulk": WandbLogger(work / "wandb_bulk", per_sample=False),
        }
        times: dict[str, list[float]] = {name: [] for name in loggers}
        epochs = {name: 0 for name in loggers}
        log("warm-up")
        for name, logger in loggers.items():
            run_epoch(s, name, logger, epochs[name])
            epochs[name] += 1
        variants = list(loggers)
        for r in range(args.rounds):
            for name in variants[r % len(variants):] + variants[:r % len(variants)]:
                times[name].append(run_epoch(s, name, loggers[name], epochs[name]))
                epochs[name] += 1
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {median(v):.3f}s" for k, v in times.items()))
        loggers["mldbg"].close()
        for name in ("wandb_rows", "wandb_bulk"):
            loggers[name].finish()
        plain = median(times["plain"])
        sample_epochs = {name: s.n * epochs[name] for name in loggers}
        disk = {name: tree_bytes(work / name) for name in ("mldbg", "wandb_rows", "wandb_bulk")}
        overhead = {name: median(times[name]) / plain - 1 for name in loggers if name != "plain"}
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "wandb": wandb.__version__,
                        "mldbg_callbacks": mldbg_callbacks.__version__},
            "model": args.model, "rounds": args.rounds, "samples_per_epoch": s.n, "epoch_s": times,
            "median_epoch_s": {name: median(v) for name, v in times.items()},
            "ratio_to_plain": {name: median(times[name]) / plain for name in loggers if name != "plain"},
            "overhead": overhead,
            "mldbg_overhead_over_wandb_overhead": {
                name: overhead["mldbg"] / overhead[name] if overhead[name] > 0 else None
                for name in ("wandb_rows", "wandb_bulk")},
            "bytes_per_sample_epoch": {name: disk[name] / sample_epochs[name] for name in disk},
            "what_is_logged": "per sample and epoch: id, label, prediction, 100 class scores (no features)",
            "wandb_table_max_rows": wandb.Table.MAX_ROWS,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
