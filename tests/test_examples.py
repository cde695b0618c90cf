"""The examples run end to end, offline, as the README promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_classification_sdk_example(tmp_path):
    report = tmp_path / "report.html"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "classification_sdk.py"), "--epochs", "3",
                           "--store", str(tmp_path / "store"), "--report", str(report)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = lines[0].split()
    assert header == ["dataset", "counts", "accuracy", "auroc", "auprc", "net_entropy_loss", "net_entropy",
                      "error_proba_auroc", "error_proba_auprc"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["train"][1] == "1347" and rows["val"][1] == "450"  # digits split 75/25, each sample once
    assert float(rows["val"][2]) > 0.8  # three epochs of an MLP on digits learn something
    assert report.is_file() and "error_proba_auroc" in report.read_text()


def test_ultralytics_detection_example(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "ultralytics_detection.py"), "--epochs", "2",
                           "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    partitions = [line.split() for line in done.stdout.splitlines() if line.startswith("  val ")]
    assert partitions == [["val", "0", "12"], ["val", "1", "12"]]  # one row per val image, no extra epoch
    assert "stable_coverage_ratio" in done.stdout and "error_type" in done.stdout
