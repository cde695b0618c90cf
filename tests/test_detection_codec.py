"""The detection codec: what is stored per image, the uniform filter, and how bad boxes are handled."""

from __future__ import annotations

import numpy as np
import pytest

from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import DetectionTracer


def _rows(store_dir, version="v1"):
    return LocalStore(store_dir).read_traces("det", version, "val", [0]).to_pylist()


def _record(tracer, detections, targets, ids, sizes=((50, 80),)):
    tracer.record(detections, targets, input_ids=ids, dataset_type="val", n_epoch=0,
                  image_sizes=list(sizes) * len(ids) if len(sizes) == 1 else list(sizes))


def test_uniform_filter_keeps_the_top_scores_above_threshold_and_clips_predictions(store_dir):
    tracer = DetectionTracer(lambda x: x, "det", "v1", store=store_dir, score_thresh=0.3,
                             max_detections_per_image=2, num_classes=5)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 90, 60], [1, 1, 2, 2], [3, 3, 4, 4], [6, 6, 2, 2]], float)
    detections = [{"boxes": boxes, "scores": np.array([0.5, 0.9, 0.2, 0.4, 0.1]), "labels": np.array([1, 2, 3, 4, 0])}]
    # a junk box below the threshold is inverted: it is filtered out, so it does not cost the image
    _record(tracer, detections, [{"boxes": np.array([[1.0, 2.0, 30.0, 40.0]]), "labels": np.array([1])}], ["a"])
    tracer.wait_for_save()
    (row,) = _rows(store_dir)
    assert row["pred_scores"] == pytest.approx([0.5, 0.9])  # top-2 above 0.3, in the model's order
    assert row["pred_labels"] == [1, 2]
    assert row["pred_boxes"] == [[0, 0, 10, 10], [5, 5, 80, 50]]  # clipped to the 80 x 50 image
    assert (row["image_h"], row["image_w"]) == (50, 80)
    assert row["gt_boxes"] == [[1.0, 2.0, 30.0, 40.0]] and row["gt_labels"] == [1]
    assert tracer.stats.total_skipped == 0


def test_empty_images_are_stored_and_bad_ground_truth_is_refused(store_dir):
    tracer = DetectionTracer(lambda x: x, "det", "v1", store=store_dir, num_classes=3)
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}
    targets = {"boxes": [np.zeros((0, 4)), np.array([[0.0, 0.0, 200.0, 10.0]]), np.array([[0.1, 0.1, 0.5, 0.5]])],
               "labels": [np.zeros(0), np.array([1]), np.array([7])]}
    with pytest.warns(UserWarning, match="ground-truth boxes lie outside the image"):
        _record(tracer, [empty] * 3, targets, ["empty", "outside", "bad-label"])
        stats = tracer.wait_for_save()
    assert [r["input_id"] for r in _rows(store_dir)] == ["empty"]
    assert _rows(store_dir)[0]["pred_boxes"] == [] and _rows(store_dir)[0]["gt_boxes"] == []
    assert stats.rows_skipped == {"ground_truth_boxes_outside_image": 1, "label_out_of_range": 1}

    strict = DetectionTracer(lambda x: x, "det", "v2", store=store_dir, num_classes=3, strict=True)
    with pytest.raises(TraceInputError, match="outside the image"):
        _record(strict, [empty], {"boxes": [targets["boxes"][1]], "labels": [targets["labels"][1]]}, ["x"])


def test_ids_default_to_content_hashes_of_each_image(store_dir):
    images = [np.zeros((3, 8, 8), np.float32), np.ones((3, 6, 9), np.float32)]
    tracer = DetectionTracer(lambda x: x, "det", "v1", store=store_dir, postprocess=lambda out: [
        {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)} for _ in out])
    for epoch in (0, 1):
        tracer(images, [{"boxes": np.zeros((0, 4)), "labels": []}] * 2, dataset_type="val", n_epoch=epoch)
    tracer.wait_for_save()
    store = LocalStore(store_dir)
    first, second = (store.read_traces("det", "v1", "val", [e]).to_pylist() for e in (0, 1))
    assert [r["input_id"] for r in first] == [r["input_id"] for r in second]
    assert len({r["input_id"] for r in first}) == 2
    assert [(r["image_h"], r["image_w"]) for r in first] == [(8, 8), (6, 9)]  # from the CHW tensors
