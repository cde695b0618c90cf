"""The detection codec: what is stored per image, the uniform filter, and how bad boxes are handled."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mldbg_callbacks.core.hashing import row_hashes
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


# -- staged encoding (batches of a partition encoded together) -----------------------------------------
def _encoded_one_by_one_and_merged(tmp_path, codec_class, batches, **codec_options):
    """Record ``batches`` (kwargs of ``core.record``) with ``encode_rows`` 1 and 2048; the stored rows of
    each, sorted by id, and the number of images each encode call got."""
    from mldbg_callbacks.core.trace_core import TraceCore

    stored, calls = {}, {}
    for encode_rows in (1, 2048):
        codec = codec_class(**codec_options)
        calls[encode_rows] = []
        codec.encode = lambda batch, encode=codec.encode, seen=calls[encode_rows]: (
            seen.append(len(batch.outputs["boxes"])) or encode(batch))
        root = tmp_path / str(encode_rows)
        core = TraceCore(codec, LocalStore(root).run("det", "v1"), encode_rows=encode_rows)
        for batch in batches:
            core.record(**batch)
        assert core.wait_for_save().total_skipped == 0
        stored[encode_rows] = sorted(LocalStore(root).read_traces("det", "v1", "val", [0]).to_pylist(),
                                     key=lambda row: row["input_id"])
    return stored, calls


def test_2d_batches_encoded_together_store_what_one_by_one_stores(tmp_path, rng):
    import torch

    from mldbg_callbacks.tasks.detection import DetectionCodec
    from test_detection_eval import random_scene

    images = list(random_scene(rng, 64).items())
    batches = []
    for b in range(16):
        part = images[4 * b:4 * b + 4]
        as_tensor = torch.as_tensor if b % 3 == 0 else np.asarray  # torch and NumPy per image
        detections = {"boxes": [as_tensor(det) for _, (_, _, det, _, _) in part],
                      "scores": [as_tensor(scores) for _, (_, _, _, scores, _) in part],
                      "labels": [as_tensor(labels) for _, (_, _, _, _, labels) in part],
                      "image_size": [(100, 120)] * 4}
        targets = [{"boxes": gt, "labels": labels} for _, (gt, labels, _, _, _) in part]
        pixels = [rng.random((3, 8, 8)).astype(np.float32) for _ in part]
        ids = None if b % 4 == 1 else [name for name, _ in part]  # content hashes of the images, or names
        batches.append({"outputs": detections, "targets": targets, "input_ids": ids, "inputs": pixels,
                        "features": rng.standard_normal((4, 8)).astype(np.float32), "dataset_type": "val",
                        "n_epoch": 0})
    stored, calls = _encoded_one_by_one_and_merged(tmp_path, DetectionCodec, batches, num_classes=4)
    assert calls == {1: [4] * 16, 2048: [64]}
    assert len(stored[1]) == 64 and stored[1] == stored[2048]


def test_3d_frames_with_velocities_encoded_together_store_what_one_by_one_stores(tmp_path, rng):
    from mldbg_callbacks.tasks.detection3d import Detection3DCodec
    from test_detection3d_eval import CLASSES, random_frames

    detections, targets = random_frames(rng, 40)
    batches = [{"outputs": {k: [d[k] for d in detections[i:i + 5]] for k in ("boxes", "scores", "labels")},
                "targets": targets[i:i + 5], "input_ids": list(range(i, i + 5)), "dataset_type": "val", "n_epoch": 0}
               for i in range(0, 40, 5)]
    stored, calls = _encoded_one_by_one_and_merged(tmp_path, Detection3DCodec, batches, num_classes=len(CLASSES))
    assert calls == {1: [5] * 8, 2048: [40]}
    assert len(stored[1]) == 40 and stored[1] == stored[2048] and "gt_velocities" in stored[1][0]


def test_a_staged_batch_keeps_the_ids_of_its_images_not_the_images(tmp_path, rng):
    from mldbg_callbacks.core.trace_core import TraceCore
    from mldbg_callbacks.tasks.detection import DetectionCodec

    core = TraceCore(DetectionCodec(), LocalStore(tmp_path).run("det", "v1"))
    images = [rng.random((3, 64, 64)).astype(np.float32) for _ in range(2)]
    empty = {"boxes": [np.zeros((0, 4))] * 2, "scores": [np.zeros(0)] * 2, "labels": [np.zeros(0)] * 2}
    core.record(empty, None, inputs=images, dataset_type="val", n_epoch=0)
    deadline = time.monotonic() + 10
    while not core._staged and time.monotonic() < deadline:  # the worker takes the batch
        time.sleep(0.01)
    (staged,) = [batch for batches in core._staged.values() for batch, _ in batches]
    assert staged.inputs is None and len(staged.input_ids) == 2
    core.wait_for_save()
    stored = LocalStore(tmp_path).read_traces("det", "v1", "val", [0]).column("input_id").to_pylist()
    assert sorted(stored) == sorted(row_hashes(image[None])[0] for image in images)
