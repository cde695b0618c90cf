"""2D detection evaluation end to end: traces -> Evaluator -> Result, checked against pycocotools and tidecv,
and each category / error code on a hand-built scene where the right answer is known."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from mldbg_callbacks.evaluation.issues import CATEGORIES, DETECTION_CODES
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.training import DetectionTracer

SIZE = (100, 100)


def _tracer(store_dir, version="v1", num_classes=3):
    return DetectionTracer(lambda images: images, "det", version, store=store_dir, num_classes=num_classes)


def _record(tracer, images: dict, dataset_type: str, epoch: int) -> None:
    """``images``: id -> (gt_boxes, gt_labels, det_boxes, det_scores, det_labels)."""
    ids = list(images)
    detections = [{"boxes": np.asarray(images[i][2], float).reshape(-1, 4), "scores": np.asarray(images[i][3], float),
                   "labels": np.asarray(images[i][4], int)} for i in ids]
    targets = {"boxes": [np.asarray(images[i][0], float).reshape(-1, 4) for i in ids],
               "labels": [np.asarray(images[i][1], int) for i in ids]}
    tracer.record(detections, targets, input_ids=ids, dataset_type=dataset_type, n_epoch=epoch,
                  image_sizes=[SIZE] * len(ids))


def random_scene(rng, n_images=60, num_classes=4, quality=0.6):
    """GT boxes, detections = jittered / relabelled copies plus background boxes (realistic AP ~0.3-0.6)."""
    images = {}
    for i in range(n_images):
        k = int(rng.integers(0, 6))
        xy = rng.uniform(0, 60, (k, 2))
        gt = np.c_[xy, np.minimum(xy + rng.uniform(3, 60, (k, 2)), 100)]  # small, medium and large objects
        labels = rng.integers(0, num_classes, k)
        found = np.flatnonzero(rng.random(k) < quality)
        found = np.r_[found, found[rng.random(len(found)) < 0.2]]  # some objects detected twice
        det = np.clip(gt[found] + rng.normal(0, 3, (len(found), 4)), 0, 100)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        det_labels = np.where(rng.random(len(found)) < 0.15, (labels[found] + 1) % num_classes, labels[found])
        n_bg = int(rng.integers(0, 5))
        bg_xy = rng.uniform(0, 80, (n_bg, 2))
        bg = np.c_[bg_xy, bg_xy + rng.uniform(2, 20, (n_bg, 2))]
        scores = np.r_[rng.uniform(0.3, 1.0, len(found)), rng.uniform(0.05, 0.8, n_bg)].round(2)  # ties
        images[f"img{i}"] = (gt, labels, np.r_[det, bg], scores, np.r_[det_labels, rng.integers(0, num_classes, n_bg)])
    return images


def pycocotools_stats(images: dict) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {name: k + 1 for k, name in enumerate(images)}
    annotations, results = [], []
    for name, (gt, labels, det, scores, det_labels) in images.items():
        for box, label in zip(np.asarray(gt, float).reshape(-1, 4), labels):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": ids[name], "category_id": int(label),
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, score, label in zip(np.asarray(det, float).reshape(-1, 4), scores, det_labels):
            results.append({"image_id": ids[name], "category_id": int(label), "score": float(score),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    categories = sorted({int(l) for v in images.values() for l in v[1]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO()
        gt_coco.dataset = {"images": [{"id": i} for i in ids.values()], "annotations": annotations,
                           "categories": [{"id": c} for c in categories]}
        gt_coco.createIndex()
        dt_coco = gt_coco.loadRes(results) if results else COCO()
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def tidecv_counts(images: dict) -> tuple[dict, dict]:
    from tidecv import TIDE, Data

    gt_data, pred_data = Data("gt"), Data("pred")
    for k, (gt, labels, det, scores, det_labels) in enumerate(images.values()):
        gt_data._make_default_image(k)  # images without objects are evaluated too
        for box, label in zip(np.asarray(gt, float).reshape(-1, 4), labels):
            gt_data.add_ground_truth(k, int(label), [box[0], box[1], box[2] - box[0], box[3] - box[1]])
        for box, score, label in zip(np.asarray(det, float).reshape(-1, 4), scores, det_labels):
            pred_data.add_detection(k, int(label), float(score), [box[0], box[1], box[2] - box[0], box[3] - box[1]])
    tide = TIDE()
    with contextlib.redirect_stdout(io.StringIO()):
        run = tide.evaluate(gt_data, pred_data, mode=TIDE.BOX)
    counts = {error.short_name: n for error, n in run.count_errors().items()} if hasattr(run, "count_errors") else None
    if counts is None:
        counts = {}
        for error in run.errors:
            counts[error.short_name] = counts.get(error.short_name, 0) + 1
    return counts, {k.short_name if hasattr(k, "short_name") else k: v
                    for k, v in tide.get_main_errors()["pred"].items()}


def test_metrics_and_tide_equal_the_reference_libraries(store_dir, rng):
    train, val = random_scene(rng), random_scene(rng, quality=0.4)
    tracer = _tracer(store_dir, num_classes=4)
    _record(tracer, train, "train", 0)
    _record(tracer, val, "val", 0)
    tracer.wait_for_save()
    result = Evaluator("det", "v1", store=store_dir).request_evaluation()

    metrics = result.metrics_summary().set_index("dataset")
    for name, images in (("train", train), ("val", val)):
        stats = pycocotools_stats(images)
        np.testing.assert_allclose(metrics.loc[name, ["map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"]]
                                   .to_numpy(dtype=float), stats[:6], rtol=0, atol=1e-12)
        counts, dap = tidecv_counts(images)
        ours = result.tide().query("dataset == @name").set_index("error_type")
        for error_type in ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"):
            assert ours.loc[error_type, "count"] == counts.get(error_type, 0), error_type
            assert ours.loc[error_type, "dap"] == pytest.approx(dap[error_type], abs=1e-9), error_type
        n_gt = sum(len(v[1]) for v in images.values())
        assert metrics.loc[name, "n_gt"] == n_gt
        assert metrics.loc[name, "n_images"] == len(images)

    categories = result.issue_category_summary().set_index("dataset")
    np.testing.assert_allclose(categories.sum(axis=1), 1.0)
    samples = result.samples()
    assert set(samples["category"]) <= set(CATEGORIES)
    assert set(samples["error_code"]) <= set(DETECTION_CODES)
    # units: every GT object once, plus false positives at the operating score
    gt_units = samples[samples["unit"] == "gt"]
    assert len(gt_units.query("dataset_type == 'val'")) == sum(len(v[1]) for v in val.values())
    per_class = result.per_class()
    assert {"label", "ap", "ap50", "ap75", "n_gt"} <= set(per_class.columns)

    # the result persists and loads back identically
    again = Evaluator("det", "v1", store=store_dir).get_result(result.result_name)
    pd.testing.assert_frame_equal(again.metrics_summary(), result.metrics_summary())
    pd.testing.assert_frame_equal(again.tide(), result.tide())


def _scene(epoch: int) -> dict:
    """A scene where each object / detection has one known outcome (see test_codes_on_a_known_scene)."""
    tp = 0.9  # true positives score below the errors, so the F1-optimal operating score (0.9) keeps the errors
    scene = {
        "dup": ([[10, 10, 40, 40], [10, 10, 40, 40]], [0, 0], [[10, 10, 40, 40]], [tp], [0]),
        "cls": ([[20, 20, 60, 60]], [1], [[20, 20, 60, 60]], [0.95], [2]),
        "missing": ([], [], [[50, 50, 80, 80]], [0.95], [0]),
        "bkg": ([], [], [[5, 5, 20, 20]] if epoch == 1 else [], [0.95] if epoch == 1 else [], [1] if epoch == 1 else []),
        "miss": ([[20, 20, 60, 60]], [2], [], [], []),
        "weak": ([[0, 0, 40, 40]], [0], [[0, 0, 40, 22]], [tp], [0]),
        "loc": ([[30, 30, 70, 70]], [1], [[40, 40, 80, 80]], [0.95], [1]),
        "empty": ([], [], [], [], []),
        "junk": ([], [], [[70, 70, 90, 90]], [0.1], [2]),
    }
    for k in range(5):
        scene[f"ok{k}"] = ([[10 + k, 10, 50 + k, 50]], [k % 3], [[10 + k, 10, 50 + k, 50]], [tp], [k % 3])
    return scene


def test_codes_on_a_known_scene(store_dir):
    tracer = _tracer(store_dir)
    for epoch in (0, 1):
        _record(tracer, _scene(epoch), "train", epoch)
    tracer.wait_for_save()
    result = Evaluator("det", "v1", store=store_dir).request_evaluation()
    assert result.thresholds["score_op"].iloc[0] == pytest.approx(0.9)
    samples = result.samples().set_index("object_id")
    expected = {
        "dup#1": ("aleatoric_hotspot", "OD_DUPLICATE_GT"),
        "cls#0": ("aleatoric_hotspot", "OD_LABEL_NOISE"),  # the same class error in both epochs
        "miss#0": ("hotspot", "OD_MISS"),
        "weak#0": ("recessive_hotspot", "OD_WEAK_LOC"),
        "loc#0": ("critical_hotspot", "OD_LOC"),
    }
    for object_id, (category, code) in expected.items():
        assert (samples.loc[object_id, "category"], samples.loc[object_id, "error_code"]) == (category, code), object_id
    false_positives = samples[samples["unit"] == "pred"].set_index("input_id")
    assert false_positives.loc["missing", "error_code"] == "OD_MISSING_LABEL"  # repeated where no box is drawn
    assert false_positives.loc["missing", "category"] == "aleatoric_hotspot"
    assert false_positives.loc["bkg", "error_code"] == "OD_BKG"  # only in this epoch: not a missing label
    assert false_positives.loc["bkg", "category"] == "critical_hotspot"
    # the class error is one unit (folded into the object), the junk below the operating score is none
    assert set(false_positives.index) == {"missing", "bkg"}
    assert len(samples) == 2 + 1 + 1 + 1 + 1 + 5 + 2  # objects + 2 false positives

    issues = result.get_issues()
    row = issues.set_index("error_code").loc["OD_LABEL_NOISE"]
    assert row["confused_pairs"] == "1->2 (1)"
    assert row["description"] == DETECTION_CODES["OD_LABEL_NOISE"].description
    view = result.get_view(["category", "error_code"], adjustby="category")
    assert view.groupby("category")["ratio"].sum().round(12).eq(1.0).all()
    per_image = result.images().set_index("input_id")
    assert per_image.loc["empty", ["n_gt", "n_pred", "tp", "missed", "false_positives"]].tolist() == [0, 0, 0, 0, 0]
    assert per_image.loc["dup", ["n_gt", "tp", "missed"]].tolist() == [2, 1, 1]
    assert per_image.loc["miss", "worst_category"] == "hotspot"
    slices = result.get_view(["slice"])
    assert "0:medium" in set(slices["slice"])


def test_detection_only_views_refuse_classification_results(store_dir, rng):
    from mldbg_callbacks.training import ClassificationTracer

    tracer = ClassificationTracer(lambda x: x, "cls", "v1", store=store_dir, feature_layer=False)
    tracer(rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 3, 40), input_ids=np.arange(40))
    tracer.wait_for_save()
    result = Evaluator("cls", "v1", store=store_dir).request_evaluation()
    with pytest.raises(ValueError, match="detection view"):
        result.tide()


def test_a_dataset_without_detections_at_the_operating_score(store_dir):
    """The reference (train) sets a high operating score; val has only weaker detections: every val object
    is a miss and no detection is a unit."""
    tracer = _tracer(store_dir)
    box = [[10.0, 10.0, 40.0, 40.0]]
    train = {f"t{k}": (box, [k % 3], box, [0.9], [k % 3]) for k in range(6)}
    val = {f"v{k}": (box, [k % 3], box, [0.2], [k % 3]) for k in range(4)}
    _record(tracer, train, "train", 0)
    _record(tracer, val, "val", 0)
    tracer.wait_for_save()
    result = Evaluator("det", "v1", store=store_dir).request_evaluation()
    samples = result.samples().query("dataset_type == 'val'")
    assert len(samples) == 4 and set(samples["unit"]) == {"gt"}
    assert set(samples["error_code"]) == {"OD_MISS"}
    assert result.metrics_summary().set_index("dataset").loc["val", "recall"] == 0.0
