"""The self-contained HTML report: `result.to_html()` and `mldbg report`."""

from __future__ import annotations

import re

import numpy as np
from sklearn.metrics import confusion_matrix
from test_cli import mldbg
from test_detection_eval import _record, _tracer, random_scene

from mldbg_callbacks.evaluation.report import heatmaps
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import ClassificationTracer


def _self_contained(text: str) -> None:
    """Nothing is fetched when the file opens: no script, no stylesheet link, no remote src / href (the
    URLs left are XML namespaces and the metadata of the inline SVGs)."""
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert not re.findall(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", text, flags=re.IGNORECASE)
    assert "<svg" in text


def test_classification_report_has_the_confusion_matrix_and_the_cli_writes_it(store_dir, rng):
    tracer = ClassificationTracer(lambda x: x, "rep", "v1", store=store_dir, feature_layer=False)
    for epoch in range(2):
        tracer(rng.normal(size=(120, 4)).astype(np.float32), rng.integers(0, 4, 120), input_ids=np.arange(120),
               n_epoch=epoch)
    tracer.wait_for_save()
    written = mldbg("report", "rep", "v1", "-o", str(store_dir / "report.html"), store=store_dir)
    assert written.returncode == 0, written.stderr + written.stdout
    assert "evaluating the newest epoch first" in written.stdout  # no saved result yet
    text = (store_dir / "report.html").read_text()
    _self_contained(text)
    assert text.count("<svg") == 3  # confusion matrix, class x error code, categories

    result = Evaluator("rep", "v1", store=store_dir).get_result(
        Evaluator("rep", "v1", store=store_dir).list_results()["result_name"].iloc[-1])
    samples = result.samples()
    confusion = dict(heatmaps(result))["Confusion matrix, train (rows: label, columns: prediction)"]
    labels = sorted(set(samples["label"]) | set(samples["pred"]))
    expected = confusion_matrix(samples["label"], samples["pred"], labels=labels)
    np.testing.assert_array_equal(confusion.reindex(index=labels, columns=labels, fill_value=0).to_numpy(), expected)
    accuracy = f"{result.metrics_summary()['accuracy'].iloc[0]:.4g}"
    assert accuracy in text  # the tables carry the API's numbers

    again = mldbg("report", "rep", "v1", "-o", str(store_dir / "again.html"), "--result", result.result_name,
                  store=store_dir)
    assert again.returncode == 0 and "evaluating" not in again.stdout


def test_detection_report_has_the_slice_heatmap_and_the_detection_tables(store_dir, rng):
    tracer = _tracer(store_dir, num_classes=4)
    _record(tracer, random_scene(rng), "val", 0)
    tracer.wait_for_save()
    result = Evaluator("det", "v1", store=store_dir).request_evaluation()
    path = result.to_html(store_dir / "det.html")
    text = path.read_text()
    _self_contained(text)
    assert "Error rate by class x size, val" in text and "TIDE error types" in text and "Per class" in text
    rate = dict(heatmaps(result))["Error rate by class x size, val"]
    units = result.samples()
    wrong = 1 - units[(units["label"] == 0) & (units["size"] == rate.columns[0])]["correct"].mean()
    assert rate.loc[0, rate.columns[0]] == round(wrong, 3)
