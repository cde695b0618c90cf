"""Overhead of the Keras callback (MLDebuggerCallback) on a small real fit, CPU, torch backend.

Prints one JSON object to stdout (progress goes to stderr). In one process:

1. ``fit``: the same ``model.fit`` (MLP 64 -> 128 -> 64 -> 10 on scikit-learn's digits, 1,347 train
   samples, batch 64, Adam) with and without the callback (``data`` = train + val arrays, 1,797 samples
   predicted per traced epoch). Repetitions alternate plain/traced in ABBA order so drift hits both
   alike; every repetition builds a fresh model with the same seed. Epoch time is measured by two
   timer callbacks, the first and the last in the list, so the traced epoch includes the callback's
   ``on_epoch_end`` (the extra prediction pass and the hand-over to the writer). Reported: median epoch
   times and their ratio, the whole ``fit`` wall time and its ratio (includes ``wait_for_save`` and the
   LabelTracker PNG at train end), ``train_end_s``: the callback's ``on_train_end`` alone, and
   ``label_tracker_png_s``: drawing that PNG again from the store (the rest of ``train_end_s`` is
   ``wait_for_save``).
2. ``prediction_pass``: the callback's own timer of the extra pass (``callback.pass_seconds``): median
   seconds per epoch and microseconds per sample. Keras gives callbacks no predictions, so this pass is
   the price of tracing with Keras and is reported separately, as the issue asks.
3. ``prediction_method``: one pass over the same 1,797 samples (batch 256) with the sub-model called
   directly under ``torch.no_grad()`` (what the callback does on the torch backend), with
   ``predict_on_batch`` (what it does on jax/tensorflow), and with ``model.predict`` on the arrays.

Shared machines: every epoch also records how many cores other processes used meanwhile;
``fit.quiet_epochs_only`` repeats the epoch medians over the undisturbed epochs, ``--wait-quiet S`` waits
up to S seconds before each round for a quiet machine, and torch runs one intra-op thread by default
(``--threads``), which keeps the timings stable when other processes compete for the cores.

Run from the repository root::

    python benchmarks/keras_overhead.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/keras_overhead.py --quick    # smoke test (seconds)
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before importing keras

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from mldbg_callbacks.evaluation.label_tracker import save_label_tracker_plot  # noqa: E402
from mldbg_callbacks.integrations.keras import MLDebuggerCallback  # noqa: E402
from machine_load import cpu_snapshot, foreign_cores, wait_quiet  # benchmarks/machine_load.py

BATCH = 64
QUIET = 0.25  # an epoch counts as undisturbed when other processes used fewer cores than this


def log(msg: str) -> None:
    print(f"[keras_overhead] {msg}", file=sys.stderr, flush=True)


def median(values) -> float | None:
    return float(statistics.median(values)) if values else None


class EpochStart(keras.callbacks.Callback):
    def __init__(self, clock: dict):
        super().__init__()
        self.clock = clock

    def on_epoch_begin(self, epoch, logs=None):
        self.clock["snapshot"] = cpu_snapshot()
        self.clock["start"] = time.perf_counter()


class EpochEnd(keras.callbacks.Callback):
    def __init__(self, clock: dict, times: list):
        super().__init__()
        self.clock, self.times = clock, times

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.clock["start"]
        self.times.append((epoch, seconds, foreign_cores(self.clock["snapshot"], cpu_snapshot())))


class TrainEndTimer(keras.callbacks.Callback):
    """Wraps the traced callback's on_train_end to time it alone."""

    def __init__(self, callback: MLDebuggerCallback, sink: list):
        super().__init__()
        original = callback.on_train_end

        def timed(logs=None):
            start = time.perf_counter()
            original(logs)
            sink.append(time.perf_counter() - start)

        callback.on_train_end = timed


def digits() -> tuple:
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cut = 1347
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def build_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def one_fit(traced: bool, data: tuple, epochs: int, store: str, run: int) -> dict:
    x_tr, y_tr, x_va, y_va = data
    model = build_model()
    clock: dict = {}
    times: list = []
    train_end: list = []
    callbacks: list = [EpochStart(clock)]
    callback = None
    if traced:
        callback = MLDebuggerCallback("bench", f"run{run}", store=store,
                                      data={"train": (x_tr, y_tr), "val": (x_va, y_va)})
        TrainEndTimer(callback, train_end)
        callbacks.append(callback)
    callbacks.append(EpochEnd(clock, times))
    start = time.perf_counter()
    model.fit(x_tr, y_tr, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    fit_s = time.perf_counter() - start
    result = {"epoch_s": [t for epoch, t, _ in times if epoch > 0], "fit_s": fit_s,  # epoch 0 warms up
              "quiet_epoch_s": [t for epoch, t, f in times if epoch > 0 and (f is None or f < QUIET)],
              "train_end_s": train_end[0] if train_end else None}
    if callback is not None:
        result["pass_s"] = [t for epoch, t in sorted(callback.pass_seconds.items()) if epoch > 0]
        result["rows"] = callback.stats.rows_written
        callback.close()
        start = time.perf_counter()  # the same graph again: what on_train_end spends on the PNG
        save_label_tracker_plot(store, "bench", f"run{run}", path=os.path.join(store, f"redraw{run}.png"))
        result["png_s"] = time.perf_counter() - start
    return result


def measure_fit(data: tuple, rounds: int, epochs: int, quiet_wait_s: float) -> dict:
    store = tempfile.mkdtemp(prefix="mldbg-keras-bench-")
    plain: dict = {"epoch_s": [], "fit_s": [], "quiet_epoch_s": []}
    traced: dict = {"epoch_s": [], "fit_s": [], "quiet_epoch_s": [], "pass_s": [], "train_end_s": [], "png_s": []}
    run = 0
    try:
        one_fit(True, data, 2, store, run)  # warm-up: first sub-model build, imports, matplotlib
        one_fit(False, data, 2, store, run)
        for r in range(rounds):
            if quiet_wait_s > 0:
                wait_quiet(quiet_wait_s, QUIET)
            order = (False, True, True, False) if r % 2 == 0 else (True, False, False, True)
            for is_traced in order:
                run += 1
                result = one_fit(is_traced, data, epochs, store, run)
                target = traced if is_traced else plain
                target["epoch_s"] += result["epoch_s"]
                target["quiet_epoch_s"] += result["quiet_epoch_s"]
                target["fit_s"].append(result["fit_s"])
                if is_traced:
                    target["pass_s"] += result["pass_s"]
                    target["train_end_s"].append(result["train_end_s"])
                    target["png_s"].append(result["png_s"])
            log(f"round {r + 1}/{rounds}: plain epoch {median(plain['epoch_s']):.4f} s, "
                f"traced epoch {median(traced['epoch_s']):.4f} s")
    finally:
        shutil.rmtree(store, ignore_errors=True)
    samples = len(data[1]) + len(data[3])
    pass_s = median(traced["pass_s"])
    return {
        "fit": {
            "epochs_per_fit": epochs, "rounds": rounds, "fits_per_arm": 2 * rounds,
            "epochs_measured_per_arm": len(plain["epoch_s"]),
            "median_epoch_s_plain": median(plain["epoch_s"]),
            "median_epoch_s_traced": median(traced["epoch_s"]),
            "epoch_ratio_traced_over_plain": median(traced["epoch_s"]) / median(plain["epoch_s"]),
            "median_fit_s_plain": median(plain["fit_s"]),
            "median_fit_s_traced": median(traced["fit_s"]),
            "fit_ratio_traced_over_plain": median(traced["fit_s"]) / median(plain["fit_s"]),
            "median_train_end_s": median(traced["train_end_s"]),
            "median_label_tracker_png_s": median(traced["png_s"]),
            "quiet_epochs_only": {
                "threshold_cores": QUIET, "plain_epochs": len(plain["quiet_epoch_s"]),
                "traced_epochs": len(traced["quiet_epoch_s"]),
                "median_epoch_s_plain": median(plain["quiet_epoch_s"]),
                "median_epoch_s_traced": median(traced["quiet_epoch_s"]),
                "epoch_ratio_traced_over_plain": (median(traced["quiet_epoch_s"]) / median(plain["quiet_epoch_s"])
                                                  if plain["quiet_epoch_s"] and traced["quiet_epoch_s"] else None),
            },
        },
        "prediction_pass": {
            "samples_per_pass": samples,
            "median_pass_s_per_epoch": pass_s,
            "median_pass_us_per_sample": None if pass_s is None else 1e6 * pass_s / samples,
            "pass_share_of_traced_epoch": None if pass_s is None else pass_s / median(traced["epoch_s"]),
        },
    }


def measure_prediction_methods(data: tuple, repeats: int) -> dict:
    x = np.concatenate([data[0], data[2]])
    model = build_model()
    model.fit(data[0], data[1], batch_size=BATCH, epochs=1, verbose=0)
    sub_model = keras.Model(model.inputs[0], [model.outputs[0], model.layers[-1].input])
    step = 256

    def direct():
        with torch.no_grad():
            return [sub_model(x[i:i + step], training=False) for i in range(0, len(x), step)]

    def on_batch():
        return [sub_model.predict_on_batch(x[i:i + step]) for i in range(0, len(x), step)]

    def predict():
        return sub_model.predict(x, batch_size=step, verbose=0)

    methods = {"direct_call_no_grad": direct, "predict_on_batch": on_batch, "model_predict": predict}
    times: dict = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {name: {"median_s": median(t), "us_per_sample": 1e6 * median(t) / len(x)} for name, t in times.items()}
    result["samples"] = len(x)
    result["batch_size"] = step
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (CI smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="ABBA rounds (4 fits each)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable timings on a shared small machine)")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="wait up to this many seconds before each round for other processes to go quiet")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 6)
    epochs = args.epochs or (3 if args.quick else 6)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(args.threads)
    data = digits()
    log(f"fit: {rounds} ABBA rounds x {epochs} epochs")
    start = cpu_snapshot()
    time.sleep(1.0)
    other_at_start = foreign_cores(start, cpu_snapshot())
    report = {
        "benchmark": "keras_overhead",
        "keras": keras.__version__, "backend": keras.backend.backend(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "other_processes_cores_at_start": other_at_start,
        "model": "Sequential Dense 64-128-64-10, digits 1347 train + 450 val, batch 64, Adam",
        **measure_fit(data, rounds, epochs, args.wait_quiet),
        "prediction_method": measure_prediction_methods(data, 5 if args.quick else 30),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
