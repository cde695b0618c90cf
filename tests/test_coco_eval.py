"""coco_evaluate / match_detections / box_iou against pycocotools' COCOeval (bbox), bit for bit."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest

from mldbg_callbacks.evaluation.coco import Boxes, box_iou, coco_evaluate, match_detections
from detection_cases import random_case, xywh  # tests/ is on sys.path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def reference(dets: Boxes, gts: Boxes, n_images: int, categories: list[int] | None = None,
              max_dets: list[int] | None = None) -> COCOeval:
    """pycocotools on the same data: GT area = w * h, detections through loadRes (list of dicts)."""
    cats = sorted(set(gts.label.tolist()) | set(categories or []))
    gx, dx = xywh(gts.box), xywh(dets.box)
    dataset = {"images": [{"id": i} for i in range(n_images)], "categories": [{"id": int(c)} for c in cats],
               "annotations": [{"id": j + 1, "image_id": int(gts.image[j]), "category_id": int(gts.label[j]),
                                "bbox": gx[j].tolist(), "area": float(gx[j, 2] * gx[j, 3]), "iscrowd": 0}
                               for j in range(len(gts))]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        results = [{"image_id": int(dets.image[j]), "category_id": int(dets.label[j]), "bbox": dx[j].tolist(),
                    "score": float(dets.score[j])} for j in range(len(dets))]
        dt = gt.loadRes(results) if results else COCO()
        ev = COCOeval(gt, dt, "bbox")
        if max_dets is not None:
            ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same_as_reference(ours, ref: COCOeval) -> None:
    assert np.array_equal(ours.stats, np.asarray(ref.stats)), (ours.stats, ref.stats)
    assert np.array_equal(ours.precision, ref.eval["precision"])
    assert np.array_equal(ours.recall, ref.eval["recall"])
    assert np.array_equal(ours.scores, ref.eval["scores"])
    assert ours.categories.tolist() == list(ref.params.catIds)


CASES = [
    dict(n_images=1, n_classes=1, gt_per_image=4, dets_per_image=12),
    dict(n_images=15, n_classes=3),
    dict(n_images=25, n_classes=6, gt_per_image=1.0, dets_per_image=4),  # images without GT or dets
    dict(n_images=10, n_classes=50, gt_per_image=8, dets_per_image=30),
    dict(n_images=8, n_classes=3, tiny=True),
    dict(n_images=10, n_classes=3, boundary=True, score_decimals=1),
    dict(n_images=6, n_classes=2, crowded=150, dets_per_image=20),
    dict(n_images=6, n_classes=4, absent_classes=3),
    dict(n_images=12, n_classes=2, score_decimals=0),  # all scores 0 or 1: massive ties
    dict(n_images=4, n_classes=2, gt_per_image=20, dets_per_image=130),  # > 100 per image and category
    dict(n_images=30, n_classes=8, gt_per_image=5, dets_per_image=25, boundary=True),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_pycocotools(case: int, seed: int) -> None:
    rng = np.random.default_rng(1000 * case + seed)
    dets, gts, n_images = random_case(rng, **CASES[case])
    assert_same_as_reference(coco_evaluate(dets, gts, n_images), reference(dets, gts, n_images))


def test_medium_case_and_matching_details() -> None:
    rng = np.random.default_rng(7)
    dets, gts, n_images = random_case(rng, n_images=120, n_classes=20, gt_per_image=6, dets_per_image=60,
                                      boundary=True, crowded=140)
    ours = coco_evaluate(dets, gts, n_images)
    ref = reference(dets, gts, n_images)
    assert_same_as_reference(ours, ref)
    # per-detection matching at area "all" (evalImgs of the first area range), maxDets 100
    n_thr = len(ref.params.iouThrs)
    ref_match = np.full((n_thr, len(dets)), -1)
    ref_ignored = np.ones((n_thr, len(dets)), dtype=bool)
    evaluated = np.zeros(len(dets), dtype=bool)
    n_img = len(ref.params.imgIds)
    for k in range(len(ref.params.catIds)):
        for e in ref.evalImgs[k * len(ref.params.areaRng) * n_img:(k * len(ref.params.areaRng) + 1) * n_img]:
            if e is None:
                continue
            rows = np.asarray(e["dtIds"], dtype=np.int64) - 1
            evaluated[rows] = True
            ref_match[:, rows] = e["dtMatches"].astype(np.int64) - 1
            ref_ignored[:, rows] = e["dtIgnore"]
    assert np.array_equal(ours.det_evaluated, evaluated)
    assert np.array_equal(ours.det_match, ref_match)
    assert np.array_equal(ours.det_ignored, ref_ignored)
    t, d = np.nonzero(ours.det_match >= 0)
    assert np.array_equal(ours.gt_match[t, ours.det_match[t, d]], d)
    assert (ours.gt_match >= 0).sum() == (ours.det_match >= 0).sum()
    # match_detections at 0.5 with the maxDets cap is the first threshold of that matching
    m = match_detections(dets, gts, 0.5, max_dets=100)
    assert np.array_equal(m.det_gt, ours.det_match[0])
    assert np.array_equal(m.gt_det, ours.gt_match[0])
    hit = m.det_gt >= 0
    assert np.all(m.det_iou[hit] >= 0.5) and np.all(m.det_iou[~hit] == 0)
    assert np.all(m.det_best_iou >= m.det_iou)


def test_declared_categories_without_gt() -> None:
    rng = np.random.default_rng(3)
    dets, gts, n_images = random_case(rng, n_images=10, n_classes=3, absent_classes=2)
    declared = [0, 1, 2, 3, 4, 9]
    ours = coco_evaluate(dets, gts, n_images, categories=declared)
    ref = reference(dets, gts, n_images, categories=declared)
    assert_same_as_reference(ours, ref)
    table = ours.per_class().set_index("label")
    assert np.isnan(table.loc[9, "ap"]) and table.loc[9, "n_gt"] == 0


def test_custom_max_dets() -> None:
    rng = np.random.default_rng(4)
    dets, gts, n_images = random_case(rng, n_images=10, n_classes=3, dets_per_image=30)
    for max_dets in ([1, 5, 20], [2, 10, 100], [10, 50, 300]):
        ours = coco_evaluate(dets, gts, n_images, max_dets=max_dets)
        assert_same_as_reference(ours, reference(dets, gts, n_images, max_dets=max_dets))


def test_per_class_table() -> None:
    rng = np.random.default_rng(11)
    dets, gts, n_images = random_case(rng, n_images=20, n_classes=5)
    ours = coco_evaluate(dets, gts, n_images)
    table = ours.per_class()
    assert list(table.columns) == ["label", "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "n_gt"]
    for k, row in table.iterrows():
        s = ours.precision[:, :, k, 0, -1]
        assert row["ap"] == pytest.approx(np.mean(s[s > -1]), abs=1e-12)
        s50 = ours.precision[0, :, k, 0, -1]
        assert row["ap50"] == pytest.approx(np.mean(s50[s50 > -1]), abs=1e-12)
        assert row["n_gt"] == np.count_nonzero(gts.label == row["label"])
    # the mean of the per-class AP over classes is stats[0] when every class has GT in every setting
    assert table["ap"].mean() == pytest.approx(ours.stats[0], abs=1e-12)


def test_no_detections_and_no_gt_images() -> None:
    rng = np.random.default_rng(5)
    _, gts, n_images = random_case(rng, n_images=5, n_classes=2)
    empty = Boxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
    ours = coco_evaluate(empty, gts, n_images + 3)
    assert_same_as_reference(ours, reference(empty, gts, n_images + 3))
    assert ours.det_match.shape == (10, 0) and np.all(ours.gt_match == -1)


def test_no_gt_at_all() -> None:
    rng = np.random.default_rng(6)
    dets, _, n_images = random_case(rng, n_images=5, n_classes=2)
    no_gt = Boxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)))
    ours = coco_evaluate(dets, no_gt, n_images)
    assert_same_as_reference(ours, reference(dets, no_gt, n_images))
    assert np.all(ours.stats == -1) and ours.precision.shape[2] == 0
    ours = coco_evaluate(dets, no_gt, n_images, categories=[0, 1])
    assert_same_as_reference(ours, reference(dets, no_gt, n_images, categories=[0, 1]))


def test_box_iou_matches_mask_api() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 50, (40, 2))
    a = np.concatenate([a, a + rng.uniform(0, 30, (40, 2))], axis=1)
    b = np.concatenate([a[:10], a[10:] + rng.normal(0, 3, (30, 4)).clip(-1, 1)])
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
    ours = box_iou(a, b)
    ref = mask_utils.iou(xywh(a).tolist(), xywh(b).tolist(), [0] * len(b))
    assert ours.shape == (40, 40) and ours.dtype == np.float64
    assert np.array_equal(ours, ref)


def test_bad_inputs() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 5.0, 5.0]])
    gts = Boxes(np.array([0, 0]), np.array([1, 1]), box)
    nan_box = box.copy()
    nan_box[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        coco_evaluate(Boxes(np.array([0, 0]), np.array([1, 1]), nan_box, np.array([0.5, 0.4])), gts, 1)
    with pytest.raises(ValueError, match="same number"):
        coco_evaluate(Boxes(np.array([0, 0, 0]), np.array([1, 1]), box, np.array([0.5, 0.4])), gts, 1)
    with pytest.raises(ValueError, match="score"):
        coco_evaluate(Boxes(np.array([0, 0]), np.array([1, 1]), box, np.array([0.5])), gts, 1)
    with pytest.raises(ValueError, match="score"):
        coco_evaluate(Boxes(np.array([0, 0]), np.array([1, 1]), box, np.array([0.5, np.nan])), gts, 1)
    with pytest.raises(ValueError, match="n_images"):
        coco_evaluate(Boxes(np.array([0, 3]), np.array([1, 1]), box, np.array([0.5, 0.4])), gts, 2)
    with pytest.raises(ValueError, match="x2 >= x1"):
        coco_evaluate(Boxes(np.array([0, 0]), np.array([1, 1]), box[:, [2, 1, 0, 3]], np.array([0.5, 0.4])), gts, 1)


def test_import_pulls_no_ml_framework() -> None:
    code = ("import sys; import mldbg_callbacks.evaluation.coco, mldbg_callbacks.evaluation.tide; "
            "bad = [m for m in ('torch', 'tensorflow', 'jax', 'keras', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
