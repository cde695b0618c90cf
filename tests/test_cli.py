"""The `mldbg` console script, run as a user would (a subprocess of the installed entry point)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np

from mldbg_callbacks.training import ClassificationTracer


def mldbg(*args, store):
    exe = shutil.which("mldbg", path=os.path.dirname(sys.executable)) or "mldbg"
    return subprocess.run([exe, "--store", str(store), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_evaluate_results_show_and_runs(store_dir, rng):
    tracer = ClassificationTracer(lambda x: x, model_name="cli_model", version_name="v1", store=store_dir)
    for epoch in range(2):
        labels = rng.integers(0, 3, 90)
        tracer(rng.normal(size=(90, 3)), labels, input_ids=np.arange(90), dataset_type="train", n_epoch=epoch)
    tracer.wait_for_save()

    runs = mldbg("runs", store=store_dir)
    assert runs.returncode == 0, runs.stderr
    assert "cli_model" in runs.stdout and "train" in runs.stdout

    evaluated = mldbg("evaluate", "cli_model", "v1", "--n-epoch", "0", "--result-name", "first",
                      "--html", str(store_dir / "r.html"), store=store_dir)
    assert evaluated.returncode == 0, evaluated.stderr + evaluated.stdout
    assert "net_entropy_loss" in evaluated.stdout and "{'train': [0]}" in evaluated.stdout
    assert (store_dir / "r.html").is_file()

    listed = mldbg("results", "cli_model", "v1", store=store_dir)
    assert listed.returncode == 0 and "first" in listed.stdout

    shown = mldbg("show", "cli_model", "v1", "first", store=store_dir)
    assert shown.returncode == 0 and "accuracy" in shown.stdout


def test_errors_are_one_clear_line_and_exit_nonzero(store_dir):
    missing = mldbg("evaluate", "nothing", "v1", store=store_dir)
    assert missing.returncode == 1
    assert "no traces for model_name='nothing'" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr
    bad_epoch = mldbg("evaluate", "m", "v1", "--n-epoch", "soon", store=store_dir)
    assert bad_epoch.returncode == 2 and "--n-epoch must be" in bad_epoch.stderr
