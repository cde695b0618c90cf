"""3D detection evaluation end to end: traces -> Evaluator -> Result, checked against nuscenes-devkit, and
each 3D error code on a hand-built scene."""

from __future__ import annotations

import numpy as np
import pytest
from nuscenes.eval.common.utils import center_distance
from nuscenes.eval.detection import algo as devkit
from nuscenes.eval.detection.constants import DETECTION_NAMES
from nuscenes_reference import to_devkit

from mldbg_callbacks.evaluation.issues import CATEGORIES, DETECTION3D_CODES
from mldbg_callbacks.evaluation.nuscenes import Boxes3D
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import Detection3DTracer

CLASSES = {k: name for k, name in enumerate(DETECTION_NAMES[:4])}  # car, truck, bus, trailer


def _tracer(store_dir, version="v1"):
    return Detection3DTracer(lambda frames: frames, "d3", version, store=store_dir, num_classes=len(CLASSES),
                             class_names=CLASSES)


def random_frames(rng, n=40, velocities=True):
    detections, targets = [], []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        gt = np.c_[rng.uniform(-45, 45, (k, 2)), rng.uniform(-1, 1, (k, 1)), rng.uniform(0.5, 5, (k, 3)),
                   rng.uniform(-np.pi, np.pi, (k, 1))]
        labels = rng.integers(0, len(CLASSES), k)
        velocity = rng.normal(0, 2, (k, 2))
        found = rng.random(k) < 0.7
        pred = gt[found] + np.c_[rng.normal(0, 1.0, (found.sum(), 3)), rng.normal(0, 0.2, (found.sum(), 3)),
                                 rng.normal(0, 0.3, (found.sum(), 1))]
        pred[:, 3:6] = np.abs(pred[:, 3:6])
        n_bg = int(rng.integers(0, 3))
        bg = np.c_[rng.uniform(-45, 45, (n_bg, 2)), np.zeros((n_bg, 1)), rng.uniform(1, 4, (n_bg, 3)),
                   np.zeros((n_bg, 1))]
        boxes = np.r_[pred, bg]
        if velocities:
            boxes = np.c_[boxes, np.r_[velocity[found] + rng.normal(0, 0.5, (found.sum(), 2)), np.zeros((n_bg, 2))]]
        pred_labels = np.r_[np.where(rng.random(found.sum()) < 0.1, (labels[found] + 1) % len(CLASSES),
                                     labels[found]), rng.integers(0, len(CLASSES), n_bg)]
        detections.append({"boxes": boxes, "scores": rng.uniform(0.1, 1, len(boxes)).round(2),
                           "labels": pred_labels})
        targets.append({"boxes": gt, "labels": labels, **({"velocities": velocity} if velocities else {})})
    return detections, targets


def _stored(store_dir, dataset_type, epoch):
    """The traced frames as Boxes3D (the float32 values the evaluation reads)."""
    rows = LocalStore(store_dir).read_traces("d3", "v1", dataset_type, [epoch]).to_pylist()
    def side(prefix, scores):
        velocities = [np.asarray(r[f"{prefix}_velocities"], float).reshape(-1, 2) for r in rows] \
            if f"{prefix}_velocities" in rows[0] else None
        return Boxes3D.from_frames([np.asarray(r[f"{prefix}_boxes"], float).reshape(-1, 7) for r in rows],
                                   [r[f"{prefix}_labels"] for r in rows],
                                   [r["pred_scores"] for r in rows] if scores else None, velocities)
    return side("pred", True), side("gt", False), len(rows)


def test_metrics_equal_nuscenes_devkit(store_dir, rng):
    tracer = _tracer(store_dir)
    for dataset_type in ("train", "val"):
        detections, targets = random_frames(rng)
        tracer.record(detections, targets, input_ids=list(range(len(targets))), dataset_type=dataset_type)
    tracer.wait_for_save()
    result = Evaluator("d3", "v1", store=store_dir).request_evaluation()
    per_class = result.per_class().set_index(["dataset", "label"])
    metrics = result.metrics_summary().set_index("dataset")
    for dataset_type in ("train", "val"):
        dets, gts, n_frames = _stored(store_dir, dataset_type, 0)
        pred_boxes, gt_boxes = to_devkit(dets, n_frames), to_devkit(gts, n_frames)
        aps = []
        for label, name in CLASSES.items():
            for threshold in (0.5, 1.0, 2.0, 4.0):
                md = devkit.accumulate(gt_boxes, pred_boxes, name, center_distance, threshold)
                ap = devkit.calc_ap(md, 0.1, 0.1)
                aps.append(ap)
                assert per_class.loc[(dataset_type, label), f"ap@{threshold:g}"] == ap
            md = devkit.accumulate(gt_boxes, pred_boxes, name, center_distance, 2.0)
            for ours, metric in (("ate", "trans_err"), ("ase", "scale_err"), ("aoe", "orient_err"),
                                 ("ave", "vel_err")):
                assert per_class.loc[(dataset_type, label), ours] == pytest.approx(
                    devkit.calc_tp(md, 0.1, metric), abs=0, nan_ok=True)
        assert metrics.loc[dataset_type, "map"] == pytest.approx(np.mean(aps), abs=1e-15)
        assert metrics.loc[dataset_type, "n_gt"] == len(gts)
    categories = result.issue_category_summary().set_index("dataset")
    np.testing.assert_allclose(categories.sum(axis=1), 1.0)
    samples = result.samples()
    assert set(samples["category"]) <= set(CATEGORIES) and set(samples["error_code"]) <= set(DETECTION3D_CODES)
    assert set(samples["distance_band"]) <= {"0-20m", "20-40m", ">40m"}


def test_velocities_only_in_predictions_leave_ave_not_available(store_dir, rng):
    detections, targets = random_frames(rng, velocities=True)
    for target in targets:
        del target["velocities"]
    tracer = _tracer(store_dir)
    tracer.record(detections, targets, input_ids=list(range(len(targets))), dataset_type="val")
    tracer.wait_for_save()
    result = Evaluator("d3", "v1", store=store_dir).request_evaluation()
    assert np.isnan(result.metrics_summary()["ave"].iloc[0])  # not available, not 0
    assert result.per_class()["ave"].isna().all()


def _box(cx, cy, yaw=0.0, size=(2.0, 4.0, 1.5), velocity=None):
    box = [cx, cy, 0.0, *size, yaw]
    return box + list(velocity) if velocity is not None else box + [np.nan, np.nan]


def test_codes_on_a_known_scene(store_dir):
    """Each frame holds one situation; scores put the errors above the true positives (see the 2D test)."""
    tp, err = 0.9, 0.95
    v0 = (1.0, 0.0)
    scene = {  # frame: (gt boxes, gt labels, gt velocities, pred boxes (with velocity), scores, labels)
        "flip": ([_box(10, 0)], [0], [v0], [_box(10, 0, yaw=np.pi, velocity=v0)], [tp], [0]),
        "orient": ([_box(0, 10)], [0], [v0], [_box(0, 10, yaw=np.radians(60), velocity=v0)], [tp], [0]),
        "scale": ([_box(-10, 0)], [0], [v0], [_box(-10, 0, size=(1.0, 2.0, 1.0), velocity=v0)], [tp], [0]),
        "velocity": ([_box(0, -10)], [0], [v0], [_box(0, -10, velocity=(4.0, 0.0))], [tp], [0]),
        "loc": ([_box(30, 0)], [1], [v0], [_box(33, 0, velocity=v0)], [err], [1]),
        "cls": ([_box(0, 30)], [1], [v0], [_box(0, 30, velocity=v0)], [err], [2]),
        "dupe": ([_box(-30, 0)], [0], [v0], [_box(-30, 0, velocity=v0), _box(-30.5, 0, velocity=v0)], [tp, err], [0, 0]),
        "miss": ([_box(0, -30)], [2], [v0], [], [], []),
        "bkg": ([], [], [], [_box(50, 50, velocity=v0)], [err], [3]),
    }
    for k in range(6):
        scene[f"ok{k}"] = ([_box(5 + k, 5)], [k % 2], [v0], [_box(5 + k, 5, velocity=v0)], [tp], [k % 2])
    ids = list(scene)
    detections = [{"boxes": np.asarray(scene[i][3], float).reshape(-1, 9), "scores": scene[i][4],
                   "labels": scene[i][5]} for i in ids]
    targets = [{"boxes": np.asarray(scene[i][0], float).reshape(-1, 9)[:, :7], "labels": scene[i][1],
                "velocities": np.asarray(scene[i][2], float).reshape(-1, 2)} for i in ids]
    tracer = _tracer(store_dir)
    tracer.record(detections, targets, input_ids=ids, dataset_type="train")
    tracer.wait_for_save()
    result = Evaluator("d3", "v1", store=store_dir).request_evaluation()
    assert result.thresholds["score_op"].iloc[0] == pytest.approx(tp)
    samples = result.samples()
    objects = samples[samples["unit"] == "gt"].set_index("input_id")
    expected = {"flip": "OD3D_FLIP", "orient": "OD3D_ORIENTATION", "scale": "OD3D_SCALE",
                "velocity": "OD3D_VELOCITY", "loc": "OD3D_LOC", "cls": "OD3D_CLS", "miss": "OD3D_MISS"}
    for frame, code in expected.items():
        assert objects.loc[frame, "error_code"] == code, frame
    assert objects.loc["flip", "category"] == "recessive_hotspot"
    assert objects.loc["cls", "category"] == "critical_hotspot"
    assert objects.loc["miss", "category"] == "hotspot"
    assert objects.loc["loc", "center_distance"] == pytest.approx(3.0)
    false_positives = samples[samples["unit"] == "pred"].set_index("input_id")["error_code"].to_dict()
    assert false_positives == {"dupe": "OD3D_DUPE", "bkg": "OD3D_BKG"}
    assert result.images().set_index("input_id").loc["dupe", ["n_gt", "tp", "false_positives"]].tolist() == [1, 1, 1]
