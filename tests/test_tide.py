"""tide_errors against tidecv 1.0.1 (TIDE.BOX): error counts, per-detection types, AP and dAP.

tidecv 1.0.1 runs unpatched with numpy 2 here, so no monkeypatching is needed. The reference
registers every image in the GT data first (as ``tidecv.datasets.COCO`` does), so images without GT
are evaluated too.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from mldbg_callbacks.evaluation.coco import Boxes
from mldbg_callbacks.evaluation.tide import MAIN_ERRORS, SPECIAL_ERRORS, tide_errors
from detection_cases import random_case, xywh  # tests/ is on sys.path

from tidecv import TIDE, Data


def reference(dets: Boxes, gts: Boxes, n_images: int) -> dict:
    gt, pred = Data("gt"), Data("pred")
    for i in range(n_images):
        gt.add_image(i, f"image {i}")
    for i, c, b in zip(gts.image.tolist(), gts.label.tolist(), xywh(gts.box).tolist()):
        gt.add_ground_truth(i, c, b)
    for i, c, s, b in zip(dets.image.tolist(), dets.label.tolist(), dets.score.tolist(), xywh(dets.box).tolist()):
        pred.add_detection(i, c, s, b)
    with contextlib.redirect_stdout(io.StringIO()):
        tide = TIDE()
        run = tide.evaluate(gt, pred, mode=TIDE.BOX, name="run")
        try:
            main = tide.get_main_errors()["run"]
            special = tide.get_special_errors()["run"]
        except ZeroDivisionError:  # tidecv: a fix left no non-empty class (e.g. no GT and Bkg fixed)
            main = special = None
    det_error = np.full(len(dets), "", dtype="<U4")
    det_target = np.full(len(dets), -1)
    det_fixes = np.zeros(len(dets), dtype=bool)
    gt_missed = np.zeros(len(gts), dtype=bool)
    for err in run.errors:
        if err.short_name == "Miss":
            gt_missed[err.gt["_id"]] = True
            continue
        det_error[err.pred["_id"]] = err.short_name
        if hasattr(err, "gt"):
            det_target[err.pred["_id"]] = err.gt["_id"]
            det_fixes[err.pred["_id"]] = err.fixed[1] is not None
    for ann in pred.annotations:
        if ann.get("used") is True:
            det_error[ann["_id"]] = "TP"
            det_target[ann["_id"]] = ann["matched_with"]
    counts = {k.short_name: v for k, v in run.count_errors().items()}
    return dict(ap=run.ap, counts=counts, dap=main, special=special, det_error=det_error, det_target=det_target,
                det_fixes=det_fixes, gt_missed=gt_missed)


CASES = [
    dict(n_images=1, n_classes=1, gt_per_image=4, dets_per_image=12),
    dict(n_images=15, n_classes=3),
    dict(n_images=25, n_classes=6, gt_per_image=1.0, dets_per_image=4),  # images without GT or dets
    dict(n_images=10, n_classes=50, gt_per_image=8, dets_per_image=30),
    dict(n_images=6, n_classes=3, crowded=160, dets_per_image=20),
    dict(n_images=8, n_classes=4, absent_classes=3),
    dict(n_images=12, n_classes=2, score_decimals=1),  # many score ties
    dict(n_images=10, n_classes=3, score_decimals=0),  # scores 0/1 only
    dict(n_images=5, n_classes=2, gt_per_image=15, dets_per_image=60),
]


def assert_same_as_reference(ours, ref: dict) -> None:
    assert ours.counts() == ref["counts"]
    assert np.array_equal(ours.det_error, ref["det_error"])
    assert np.array_equal(ours.det_fixes_gt, ref["det_fixes"])
    loc_cls = np.isin(ours.det_error, ["TP", "Cls", "Loc"])
    assert np.array_equal(ours.det_target_gt[loc_cls], ref["det_target"][loc_cls])
    assert np.array_equal(ours.gt_error == "Miss", ref["gt_missed"])
    # same float operations in the same order: equal, not just close
    assert ours.ap == ref["ap"]
    if ref["dap"] is None:
        assert any(np.isnan(v) for v in ours.dap().values())  # where tidecv divides by zero
    else:
        assert ours.dap() == ref["dap"]
        assert ours.special_dap() == ref["special"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_tidecv(case: int, seed: int) -> None:
    rng = np.random.default_rng(500 + 1000 * case + seed)
    dets, gts, n_images = random_case(rng, exact_fraction=0.1, **CASES[case])
    assert_same_as_reference(tide_errors(dets, gts, n_images), reference(dets, gts, n_images))


def test_medium_case() -> None:
    rng = np.random.default_rng(9)
    dets, gts, n_images = random_case(rng, exact_fraction=0.1, n_images=150, n_classes=20, gt_per_image=7,
                                      dets_per_image=60, crowded=130, absent_classes=2)
    ours = tide_errors(dets, gts, n_images)
    assert_same_as_reference(ours, reference(dets, gts, n_images))
    assert set(ours.dap()) == set(MAIN_ERRORS) and set(ours.special_dap()) == set(SPECIAL_ERRORS)
    # every evaluated GT is TP, Miss or explained by a Cls/Loc error that targets it
    explained = np.flatnonzero(ours.gt_error == "")
    targeted = ours.det_target_gt[np.isin(ours.det_error, ["Cls", "Loc"])]
    assert np.all(np.isin(explained, targeted))
    assert (ours.gt_error == "TP").sum() == (ours.det_error == "TP").sum()


def test_images_without_detections_or_gt() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gts = Boxes(np.array([0, 1]), np.array([0, 0]), box)
    dets = Boxes(np.array([0, 2]), np.array([0, 0]), box, np.array([0.9, 0.8]))
    ours = tide_errors(dets, gts, 3)
    assert ours.det_error.tolist() == ["TP", "Bkg"]
    assert ours.gt_error.tolist() == ["TP", "Miss"]
    assert_same_as_reference(ours, reference(dets, gts, 3))


def test_no_gt_at_all_and_no_detections_at_all() -> None:
    rng = np.random.default_rng(1)
    dets, gts, n_images = random_case(rng, exact_fraction=0.1, n_images=6, n_classes=3)
    no_gt = Boxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)))
    ours = tide_errors(dets, no_gt, n_images)
    assert set(ours.det_error.tolist()) <= {"Bkg", ""}
    assert_same_as_reference(ours, reference(dets, no_gt, n_images))
    no_det = Boxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
    ours = tide_errors(no_det, gts, n_images)
    assert np.all(ours.gt_error == "Miss")
    assert_same_as_reference(ours, reference(no_det, gts, n_images))


def test_bad_inputs() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 5.0, 5.0]])
    gts = Boxes(np.array([0, 0]), np.array([1, 1]), box)
    nan_box = box.copy()
    nan_box[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tide_errors(Boxes(np.array([0, 0]), np.array([1, 1]), nan_box, np.array([0.5, 0.4])), gts, 1)
    with pytest.raises(ValueError, match="same number"):
        tide_errors(Boxes(np.array([0]), np.array([1, 1]), box, np.array([0.5, 0.4])), gts, 1)
    with pytest.raises(ValueError, match="score"):
        tide_errors(Boxes(np.array([0, 0]), np.array([1, 1]), box), gts, 1)
