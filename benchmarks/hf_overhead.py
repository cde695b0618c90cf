"""Overhead of MLDebuggerCallback on a small Hugging Face ``Trainer.train()`` (CPU).

Prints one JSON object to stdout (progress goes to stderr). In one process, the same training (tiny BERT
built from a config, generated reviews, word-level tokenizer trained in memory, eval every epoch) runs
with and without the callback, alternating ABBA per round so drift hits both alike. Reported:

- ``median_s`` / ``ratio``: median wall time of ``trainer.train()`` per arm and traced/plain; the traced
  time includes everything the callback does, also ``on_train_end`` (waiting until the traces are
  durable and drawing the LabelTracker PNG), which is timed separately (``train_end_s``);
  ``ratio_without_train_end`` leaves that fixed end-of-run cost out.
- ``quiet_runs_only``: the same ratio over runs during which other processes used fewer than
  ``--quiet-cores`` cores (development and CI machines are shared; ``--wait-quiet`` waits for a quiet
  machine before each run), and ``cpu_ratio``: this process's CPU seconds (all threads, the tracing
  worker included) traced/plain, which depends less on other processes than wall time.
- ``forward_calls``: forward calls per arm (train / eval mode), counted by a hook of the benchmark's own:
  equal counts show that the callback adds no forward pass.
- ``rows_written`` per traced run, which must equal epochs x (train + eval samples).

Run from the repository root::

    python benchmarks/hf_overhead.py                # 4 rounds (8 runs per arm), a few minutes on 2 cores
    python benchmarks/hf_overhead.py --quick        # smoke test
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the example's data and tokenizer

import torch  # noqa: E402
import transformers  # noqa: E402
from hf_text_classification import Rows, reviews, tokenizer_for  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, DataCollatorWithPadding, Trainer,  # noqa: E402
                          TrainingArguments)
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import mldbg_callbacks  # noqa: E402
from mldbg_callbacks.integrations.transformers import MLDebuggerCallback  # noqa: E402
from machine_load import (HookTimer, cpu_snapshot, foreign_cores, ratio_stats, wait_quiet,  # benchmarks/machine_load.py
                          work_added)


def log(message: str) -> None:
    print(f"[hf_overhead] {message}", file=sys.stderr, flush=True)


class ForwardCounter:
    def __init__(self, model: torch.nn.Module):
        self.counts = {"train": 0, "eval": 0}
        model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.counts["train" if module.training else "eval"] += 1


def run_once(traced: bool, data: tuple, options: argparse.Namespace, scratch: Path, index: int) -> dict:
    tokenizer, train, evaluation = data
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=options.hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * options.hidden, max_position_embeddings=64, num_labels=3, pad_token_id=0))
    counter = ForwardCounter(model)
    args = TrainingArguments(output_dir=str(scratch / "out"), num_train_epochs=options.epochs, eval_strategy="epoch",
                             save_strategy="no", logging_strategy="no", per_device_train_batch_size=options.batch,
                             per_device_eval_batch_size=options.batch, learning_rate=3e-3, use_cpu=True,
                             report_to="none", disable_tqdm=True, seed=0)
    callbacks, end_times = [], []
    if traced:
        callback = MLDebuggerCallback("bench", f"run{index}", store=scratch / "store")
        original = callback.on_train_end

        def timed_train_end(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                end_times.append(time.perf_counter() - start)

        callback.on_train_end = timed_train_end
        # the callback's steady-state work on the training thread: its hooks (the end-of-run flush apart,
        # timed above) and the collator's id column
        timer = HookTimer()
        for name in [n for n in dir(callback) if n.startswith("on_") and n != "on_train_end"] + [
                "_before_forward", "_after_forward"]:
            setattr(callback, name, timer.wrap(getattr(callback, name)))
        integration = sys.modules[MLDebuggerCallback.__module__]
        id_batch = integration._id_batch
        integration._id_batch = timer.wrap(id_batch)
        callbacks.append(callback)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # keeps stdout for the JSON report
    if options.wait_quiet > 0:
        wait_quiet(options.wait_quiet, options.quiet_cores)
    before = cpu_snapshot()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        trainer.train()
    finally:
        if traced:
            integration._id_batch = id_batch
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = {"seconds": elapsed, "cpu_s": cpu, "foreign_cores": foreign_cores(before, cpu_snapshot()),
              "forward_calls": dict(counter.counts),
              "eval_loss": [round(e["eval_loss"], 6) for e in trainer.state.log_history if "eval_loss" in e]}
    if traced:
        result["train_end_s"] = end_times[0]
        result["rows_written"] = callbacks[0].stats.rows_written
        result["rows_skipped"] = callbacks[0].stats.total_skipped
        result["worker_cpu_s"] = callbacks[0].stats.worker_cpu_s
        result["training_thread_s"] = timer.seconds
        callbacks[0].close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds: 2 runs per arm each")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=960)
    parser.add_argument("--n-eval", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--wait-quiet", type=float, default=30.0,
                        help="before each run, wait up to this many seconds for other processes to go quiet")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="a run is quiet when other processes used fewer cores than this")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared machine spinning OpenMP threads make run "
                             "times swing several-fold; the CPU ratio still counts the tracing worker's work)")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 epoch, small data")
    options = parser.parse_args(argv)
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    if options.quick:
        options.rounds, options.epochs, options.n_train, options.n_eval, options.wait_quiet = 1, 1, 64, 32, 0

    transformers.logging.set_verbosity_error()
    texts, labels = reviews(options.n_train + options.n_eval)
    tokenizer = tokenizer_for(texts)
    data = (tokenizer, Rows(tokenizer, texts[:options.n_train], labels[:options.n_train]),
            Rows(tokenizer, texts[options.n_train:], labels[options.n_train:]))

    scratch = Path(tempfile.mkdtemp(prefix="mldbg-hf-overhead-"))
    runs: dict = {"plain": [], "traced": []}
    try:
        run_once(False, data, options, scratch, -2)  # warm-up of both arms (imports incl. matplotlib,
        run_once(True, data, options, scratch, -1)   # allocator, thread pools): not timed
        index = 0
        for round_ in range(options.rounds):
            for traced in (False, True, True, False):
                arm = "traced" if traced else "plain"
                runs[arm].append(run_once(traced, data, options, scratch, index))
                index += 1
                last = runs[arm][-1]
                log(f"round {round_ + 1}/{options.rounds} {arm}: {last['seconds']:.2f} s wall, "
                    f"{last['cpu_s']:.2f} s CPU, "
                    f"other processes {last['foreign_cores'] or 0:.2f} cores")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    plain = statistics.median(r["seconds"] for r in runs["plain"])
    traced = statistics.median(r["seconds"] for r in runs["traced"])
    train_end = statistics.median(r["train_end_s"] for r in runs["traced"])
    traced_without_end = statistics.median(r["seconds"] - r["train_end_s"] for r in runs["traced"])
    expected_rows = options.epochs * (options.n_train + options.n_eval)
    plain_cpu = statistics.median(r["cpu_s"] for r in runs["plain"])
    worker_cpu = statistics.median(r["worker_cpu_s"] for r in runs["traced"])
    quiet = {arm: [r for r in values if r["foreign_cores"] is not None and r["foreign_cores"] < options.quiet_cores]
             for arm, values in runs.items()}
    quiet_ratio = (statistics.median(r["seconds"] for r in quiet["traced"]) /
                   statistics.median(r["seconds"] for r in quiet["plain"])) if all(quiet.values()) else None
    report = {
        "benchmark": "hf_overhead",
        "workload": {"model": f"BertForSequenceClassification(hidden={options.hidden}, layers=2)",
                     "epochs": options.epochs, "n_train": options.n_train, "n_eval": options.n_eval,
                     "batch": options.batch, "eval_strategy": "epoch", "runs_per_arm": len(runs["plain"])},
        "median_s": {"plain": round(plain, 4), "traced": round(traced, 4)},
        "ratio": round(traced / plain, 4),
        "ratio_without_train_end": round(traced_without_end / plain, 4),
        "robust": ratio_stats([r["seconds"] for r in runs["plain"]], [r["seconds"] for r in runs["traced"]]),
        "train_end_s": round(train_end, 4),
        "work": work_added(plain, plain_cpu, worker_cpu,
                           statistics.median(r["training_thread_s"] for r in runs["traced"])),
        # the end of run on the training thread too (the plot, and the wait for the last writes, whose
        # worker CPU is then counted twice): a fixed cost per run, whatever its length
        "work_with_end": work_added(plain, plain_cpu, worker_cpu, statistics.median(
            r["training_thread_s"] + r["train_end_s"] for r in runs["traced"])),
        "quiet_runs_only": {"threshold_cores": options.quiet_cores, "plain_runs": len(quiet["plain"]),
                            "traced_runs": len(quiet["traced"]),
                            "ratio": None if quiet_ratio is None else round(quiet_ratio, 4)},
        "cpu_ratio": round(statistics.median(r["cpu_s"] for r in runs["traced"]) / plain_cpu, 4),
        "target_ratio": 1.05,
        "forward_calls": {"plain": runs["plain"][0]["forward_calls"], "traced": runs["traced"][0]["forward_calls"]},
        "no_extra_forward": all(r["forward_calls"] == runs["plain"][0]["forward_calls"]
                                for r in runs["plain"] + runs["traced"]),
        "same_eval_loss": all(r["eval_loss"] == runs["plain"][0]["eval_loss"] for r in runs["plain"] + runs["traced"]),
        "rows_written": sorted({r["rows_written"] for r in runs["traced"]}),
        "rows_expected": expected_rows,
        "seconds": {arm: [round(r["seconds"], 3) for r in values] for arm, values in runs.items()},
        "cpu_seconds": {arm: [round(r["cpu_s"], 3) for r in values] for arm, values in runs.items()},
        "other_processes_cores": {arm: [None if r["foreign_cores"] is None else round(r["foreign_cores"], 2)
                                        for r in values] for arm, values in runs.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "mldbg_callbacks": mldbg_callbacks.__version__,
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_1m": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
