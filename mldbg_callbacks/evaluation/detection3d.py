"""The 3D detection evaluation: the 2D pipeline (``detection.py``) with a 3D geometry.

What changes from 2D (docs/analysis.md, "3D object detection"):

- matching: nuScenes' greedy matching by BEV centre distance, class-aware, by score; units and the
  operating score use 2 m; the metrics (``map`` over 0.5 / 1 / 2 / 4 m, ATE, ASE, AOE, AVE, NDS) are
  ``nuscenes.py``'s, equal to nuscenes-devkit's;
- error types of a reported detection that is no true positive at 2 m, in this order: ``Dupe`` (a
  same-class object within 2 m already taken), ``Cls`` (an object of another class within 2 m), ``Loc``
  (matched only at 4 m), ``Bkg`` (nothing);
- what is fragile about a found object (``tp_issue``): ``FLIP`` (yaw error > 150°), ``ORIENTATION``
  (> 30°), ``SCALE`` (1 - aligned IoU of the sizes > 0.3), ``VELOCITY`` (> 1 m/s, when both sides have
  velocities);
- slices: class × BEV distance from the sensor (0–20, 20–40, > 40 m); codes ``OD3D_*``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from .coco import Boxes
from .detection import (DetectionEvaluation, EpochMatch, Geometry2D, Images, Outcomes, ReadTraces,
                        evaluate_detection, group_pairs)
from .nuscenes import Boxes3D, nuscenes_evaluate

MATCH_DISTANCE, LOC_DISTANCE = 2.0, 4.0  # metres (ANALYSIS.md: codes at 2 m, OD3D_LOC matched only at 4 m)
DUPLICATE_DISTANCE = 0.25  # two ground-truth centres of one class this close: a duplicated annotation
FLIP_DEGREES, ORIENTATION_DEGREES = 150.0, 30.0
SCALE_ERROR, VELOCITY_ERROR = 0.3, 1.0
DISTANCE_BANDS = (20.0, 40.0)
METRIC_COLUMNS = ["dataset", "counts", "n_frames", "n_gt", "n_pred", "map", "nds", "ate", "ase", "aoe", "ave",
                  "precision", "recall", "score_op", "error_proba_auroc", "error_proba_auprc"]


def bev_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Centre distance in the ground plane of row i of ``a`` and row i of ``b``."""
    return np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1])


def yaw_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute yaw difference in [0, pi]."""
    diff = np.abs(a - b) % (2 * np.pi)
    return np.minimum(diff, 2 * np.pi - diff)


def scale_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - IoU of two boxes' sizes (w, l, h) aligned at one centre and heading (nuScenes' ASE term)."""
    inter = np.prod(np.minimum(a[:, 3:6], b[:, 3:6]), axis=1)
    union = np.prod(a[:, 3:6], axis=1) + np.prod(b[:, 3:6], axis=1) - inter
    return 1.0 - np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def distance_bands(box: np.ndarray) -> np.ndarray:
    distance = np.hypot(box[:, 0], box[:, 1])
    near, far = DISTANCE_BANDS
    return np.where(distance < near, f"0-{near:g}m", np.where(distance < far, f"{near:g}-{far:g}m", f">{far:g}m"))


class Geometry3D(Geometry2D):
    """3D boxes ``[cx, cy, cz, w, l, h, yaw]``: nuScenes matching and metrics, distance-band slices."""

    task = "object_detection_3d"
    box_width = 7
    metric_columns = METRIC_COLUMNS
    quality_name = "center_distance"
    count_name = "n_frames"
    slice_name = "distance_band"
    codes_prefix = "OD3D"

    def __init__(self, meta: dict | None = None):
        names = (meta or {}).get("class_names") or {}
        self.class_names = {int(k): str(v) for k, v in names.items()}
        self._evaluations: dict[int, tuple[Images, object]] = {}

    def evaluation(self, images: Images):
        """nuScenes metrics and matchings of one epoch's traces (computed once, used for both)."""
        cached = self._evaluations.get(id(images))
        if cached is None or cached[0] is not images:
            names = None
            labels = np.union1d(images.dets.label, images.gts.label)
            if self.class_names and (not len(labels) or labels.max() < max(self.class_names) + 1):
                names = [self.class_names.get(k, str(k)) for k in range(max(self.class_names) + 1)]
            cached = (images, nuscenes_evaluate(_boxes3d(images, "dets"), _boxes3d(images, "gts"), images.n_images,
                                                dist_th_tp=MATCH_DISTANCE, class_names=names))
            self._evaluations[id(images)] = cached
        return cached[1]

    def match(self, images: Images) -> EpochMatch:
        evaluation = self.evaluation(images)
        return EpochMatch(evaluation.pred_match, evaluation.gt_match)

    def error_types(self, images: Images, match: EpochMatch, reported: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        evaluation = self.evaluation(images)
        dets, gts = images.dets, images.gts
        error = np.full(len(reported), "Bkg", dtype=object)
        target = np.full(len(reported), -1, dtype=np.int64)
        at_4m = evaluation.pred_match_all[:, int(np.searchsorted(evaluation.match_thresholds, LOC_DISTANCE))]
        matched = match.det_gt[reported]
        error[matched >= 0], target[matched >= 0] = "TP", matched[matched >= 0]
        loc = (matched < 0) & (at_4m[reported] >= 0)
        error[loc], target[loc] = "Loc", at_4m[reported][loc]
        # objects within 2 m of each unmatched detection: another class (Cls) or a taken one (Dupe)
        open_ = np.flatnonzero(matched < 0)
        i, j = group_pairs(dets.image[reported[open_]], gts.image)
        close = bev_distance(dets.box[reported[open_][i]], gts.box[j]) <= MATCH_DISTANCE
        i, j = i[close], j[close]
        same = dets.label[reported[open_][i]] == gts.label[j]
        for kind, pick in (("Cls", ~same), ("Dupe", same & (match.gt_det[j] >= 0))):  # later wins: Dupe first
            rows = open_[i[pick]]
            error[rows], target[rows] = kind, j[pick]
        return error, target

    def overlap(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - bev_distance(a, b) / MATCH_DISTANCE, 0.0, 1.0)

    def quality(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return bev_distance(a, b)

    def same_place(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return bev_distance(a, b) <= MATCH_DISTANCE

    def duplicate(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return bev_distance(a, b) <= DUPLICATE_DISTANCE

    def shape_signals(self, box: np.ndarray) -> dict[str, np.ndarray]:
        size = np.clip(box[:, 3:6], 1e-6, None)
        return {"log_volume": np.log(size.prod(axis=1)), "log_aspect": np.log(size[:, 1] / size[:, 0]),
                "range": np.hypot(box[:, 0], box[:, 1])}

    def slices(self, box: np.ndarray) -> np.ndarray:
        return distance_bands(box)

    def box_columns(self, box: np.ndarray) -> dict[str, np.ndarray]:
        return {name: box[:, k] for k, name in enumerate(("cx", "cy", "cz", "w", "l", "h", "yaw"))}

    def tp_issues(self, images: Images, out: Outcomes) -> np.ndarray:
        on = np.maximum(out.chosen, 0)
        gts, dets = images.gts.box, images.dets.box[on]
        yaw = np.degrees(yaw_error(gts[:, 6], dets[:, 6])) if len(on) else np.zeros(0)
        velocity = np.full(len(on), np.nan)
        if images.gt_velocity is not None and images.det_velocity is not None and len(on):
            velocity = np.hypot(*(images.gt_velocity - images.det_velocity[on]).T)
        issue = np.select([yaw > FLIP_DEGREES, yaw > ORIENTATION_DEGREES,
                           scale_error(gts, dets) > SCALE_ERROR if len(on) else np.zeros(0, bool),
                           velocity > VELOCITY_ERROR], ["FLIP", "ORIENTATION", "SCALE", "VELOCITY"], default="")
        return np.where(out.found, issue, "").astype(object)

    def summary(self, images: Images) -> tuple[dict, pd.DataFrame, dict[str, pd.DataFrame]]:
        evaluation = self.evaluation(images)
        self._evaluations.pop(id(images), None)  # summary is the last use of an epoch's evaluation
        metrics = {"n_frames": images.n_images, "map": evaluation.map, "nds": evaluation.nds,
                   "ate": evaluation.mate, "ase": evaluation.mase, "aoe": evaluation.maoe, "ave": evaluation.mave}
        return metrics, evaluation.per_class(), {}


def _boxes3d(images: Images, side: str) -> Boxes3D:
    boxes: Boxes = getattr(images, side)
    velocity = images.det_velocity if side == "dets" else images.gt_velocity
    return Boxes3D(frame=boxes.image, label=boxes.label, box=boxes.box, velocity=velocity, score=boxes.score)


def evaluate_detection3d(read: ReadTraces, meta: dict, epochs: dict[str, list[int]],
                         committed: dict[str, list[int]], risk: float = 0.05,
                         progress: Callable[[str, int, int], None] | None = None) -> DetectionEvaluation:
    """The 3D evaluation of the traces (arguments as ``evaluate_detection``)."""
    return evaluate_detection(read, meta, epochs, committed, risk, progress, geometry=Geometry3D(meta))
