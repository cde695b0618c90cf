"""The examples run end to end, offline, as the README promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_operation_logging_example(tmp_path):
    ids = tmp_path / "to_label.txt"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "operation_logging.py"), "--store",
                           str(tmp_path / "store"), "--ids", str(ids)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "normal: 597 calls, 597 logged" in done.stdout and "noisy: 597 calls, 597 logged" in done.stdout
    assert "normal: drift=False" in done.stdout and "noisy: drift=True" in done.stdout
    assert len(set(ids.read_text().splitlines())) == 50 and ids.read_text().startswith("noisy-")


def inference_snippets() -> dict[str, str]:
    """The Python blocks of docs/operation.md's "Callbacks in inference mode", by framework."""
    text = (ROOT / "docs" / "operation.md").read_text()
    section = text.split("## Callbacks in inference mode", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    return dict(zip(("lightning", "transformers", "keras"), blocks))


@pytest.mark.parametrize("framework", ["lightning", "transformers", "keras"])
def test_operation_doc_callback_snippets_run(tmp_path, framework):
    pytest.importorskip({"lightning": "lightning.pytorch", "transformers": "transformers", "keras": "keras"}[framework])
    snippet = inference_snippets()[framework]
    assert f"integrations.{framework}" in snippet  # the blocks are in the documented order
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLD_HOME": str(tmp_path / "store"), "COLUMNS": "200",
                               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KERAS_BACKEND": "torch"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "error_code" in done.stdout and "OP_" in done.stdout
