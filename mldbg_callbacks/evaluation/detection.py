"""The 2D detection evaluation, end to end: traces -> COCO/TIDE metrics, per-unit table, categories.

Units (docs/analysis.md): every ground-truth object, and every false positive the model would report
at its operating score threshold. A detection that explains a missed object (a class or localisation
error on it) is folded into that object's unit, so one mistake is counted once.

Order of work for one evaluated (dataset_type, epoch):

1. load the images (one row per image; duplicates across ranks removed), flatten boxes;
2. the *reference set* (the ``train`` traces of the same epoch, else the dataset itself) gives the
   operating score threshold ``score_op`` (the F1-optimal score at IoU 0.5: the point a user would
   deploy), the cross-fitted error_proba models (P(false positive) per detection, P(missed) per
   ground-truth object) and the acceptance thresholds of the ground-truth units;
3. COCO AP (``coco.py``, identical to pycocotools), TIDE error types (``tide.py``, as tidecv), and the
   units with their TIDE type at the operating threshold, slices (class x COCO size), training
   dynamics of each object across the saved epochs, categories and error codes (``issues.py``).

Images traced without ground truth (``targets=None``: operation logs, an unlabelled pool) are evaluated
apart, into the ``unlabelled`` table, one row per image (the unit that is selected and labelled), with
what needs no ground truth: each detection's P(false positive) from the reference's estimator, the
image accepted when every reported detection is below the reference's detection threshold, the
reference's class x size (3D: distance) slices and their hotspots (``label_free_images``). The same
columns are added to the ``images`` table of labelled datasets: they are the monitoring baseline.

Ground-truth objects are identified across epochs by (image id, position in the image's GT list):
the data pipeline must give an image's objects in the same order every epoch (every common loader does).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core.vectors import decode_vectors
from ..errors import NoReferenceError
from .classification import _binary_scores
from .coco import Boxes, coco_evaluate, match_detections
from .dynamics import training_dynamics
from .error_proba import ErrorProbaEstimator, operating_threshold
from .issues import CATEGORIES, WEAK_LOC_IOU, assign_detection, assign_unlabelled
from .neighbors import NeighborIndex, hotspot_regions, neighbor_signals
from .pipeline import category_summary
from .selection import reference_key
from .tide import tide_errors

ReadTraces = Callable[[str, int, bool], pa.Table]
MATCH_IOU = 0.5
SMALL_AREA, LARGE_AREA = 32.0 ** 2, 96.0 ** 2  # COCO's size ranges
DUPLICATE_GT_IOU = 0.9  # a ground-truth box repeating an earlier one of its class and image this closely
METRIC_COLUMNS = ["dataset", "counts", "n_images", "n_gt", "n_pred", "map", "ap50", "ap75", "ap_small",
                  "ap_medium", "ap_large", "precision", "recall", "score_op", "error_proba_auroc",
                  "error_proba_auprc"]


@dataclass
class Images:
    """The traces of one dataset and epoch, flattened: one entry per image, detection and GT object."""

    input_id: np.ndarray  # (n_images,) str
    image_size: np.ndarray | None  # (n_images, 2) float64 (h, w), NaN when unknown; None for 3D frames
    dets: Boxes  # box: (N, 4) xyxy for 2D, (N, 7) [cx, cy, cz, w, l, h, yaw] for 3D
    gts: Boxes
    gt_position: np.ndarray  # index of each GT object within its image's list
    det_velocity: np.ndarray | None = None  # 3D: (N, 2), NaN where unknown
    gt_velocity: np.ndarray | None = None
    features: np.ndarray | None = None  # (n_images, D) image-level embedding, when traced
    logged_at: np.ndarray | None = None  # datetime64[us] (UTC) of images traced with a time

    @property
    def n_images(self) -> int:
        return len(self.input_id)


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten()
    if pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False), lengths


def load_images(table: pa.Table, box_width: int = 4) -> tuple[Images, int]:
    """Images of one epoch, keeping one row per input_id: the lowest rank's, and within a rank the newest
    (as for classification). Returns the images and the number of duplicate rows removed."""
    frame = pd.DataFrame({"input_id": table.column("input_id").to_numpy(zero_copy_only=False),
                          "rank": table.column("rank").to_numpy() if "rank" in table.column_names else 0})
    order = np.lexsort((-np.arange(len(frame)), frame["rank"].to_numpy()))
    keep = np.sort(order[~frame.iloc[order].duplicated("input_id").to_numpy()])
    duplicates = len(frame) - len(keep)
    if duplicates:
        table = table.take(pa.array(keep))
    n = table.num_rows
    boxes, det_counts = _list_column(table, "pred_boxes")
    scores, _ = _list_column(table, "pred_scores")
    labels, _ = _list_column(table, "pred_labels")
    gt_boxes, gt_counts = _list_column(table, "gt_boxes")
    gt_labels, _ = _list_column(table, "gt_labels")
    size = (np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in ("image_h", "image_w")], axis=1)
            if "image_h" in table.column_names else None)
    det_image = np.repeat(np.arange(n), det_counts)
    gt_image = np.repeat(np.arange(n), gt_counts)
    gt_starts = np.concatenate([[0], np.cumsum(gt_counts)[:-1]]) if n else np.zeros(0, np.int64)
    images = Images(
        input_id=table.column("input_id").to_numpy(zero_copy_only=False).astype(object),
        image_size=None if size is None else np.asarray(size, dtype=np.float64),
        dets=Boxes(image=det_image, label=labels.astype(np.int64),
                   box=boxes.reshape(-1, box_width).astype(np.float64), score=scores.astype(np.float64)),
        gts=Boxes(image=gt_image, label=gt_labels.astype(np.int64),
                  box=gt_boxes.reshape(-1, box_width).astype(np.float64)),
        gt_position=np.arange(len(gt_image)) - np.repeat(gt_starts, gt_counts),
        det_velocity=_velocities(table, "pred_velocities", len(det_image)),
        gt_velocity=_velocities(table, "gt_velocities", len(gt_image)),
        features=_image_features(table),
        logged_at=(table.column("logged_at").cast(pa.timestamp("us")).to_numpy()
                   if "logged_at" in table.column_names else None),
    )
    return images, duplicates


def _image_features(table: pa.Table) -> np.ndarray | None:
    """The image-level embedding, if traced in one width (parts of different widths: not used)."""
    if "features" not in table.column_names:
        return None
    try:
        return decode_vectors(table, "features").astype(np.float32)
    except ValueError:
        return None


def _velocities(table: pa.Table, name: str, n: int) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    values, _ = _list_column(table, name)
    return values.reshape(n, 2).astype(np.float64)


# -- geometry helpers (vectorised over pairs of boxes in the same group) ------------------------------
def group_pairs(group_a: np.ndarray, group_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j) with ``group_a[i] == group_b[j]``, without a Python loop."""
    order = np.argsort(group_b, kind="stable")
    sorted_b = group_b[order]
    start = np.searchsorted(sorted_b, group_a, "left")
    counts = np.searchsorted(sorted_b, group_a, "right") - start
    i = np.repeat(np.arange(len(group_a)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return i, order[np.repeat(start, counts) + within]


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row i of ``a`` with row i of ``b`` (xyxy)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = _area(a) + _area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(box: np.ndarray) -> np.ndarray:
    return np.clip(box[:, 2] - box[:, 0], 0, None) * np.clip(box[:, 3] - box[:, 1], 0, None)


def size_names(box: np.ndarray) -> np.ndarray:
    area = _area(box)
    return np.where(area < SMALL_AREA, "small", np.where(area < LARGE_AREA, "medium", "large"))


def _group_max(values: np.ndarray, group: np.ndarray, n_groups: int, fill: float = 0.0) -> np.ndarray:
    out = np.full(n_groups, -np.inf)
    np.maximum.at(out, group, values)
    out[np.isneginf(out)] = fill
    return out


# -- per-epoch analysis -------------------------------------------------------------------------------
@dataclass
class EpochMatch:
    """Matching of one epoch's detections against its ground truth (greedy by score, class-aware): at
    IoU 0.5 in 2D, at 2 m BEV centre distance in 3D."""

    det_gt: np.ndarray  # matched GT index per detection, -1 for a false positive
    gt_det: np.ndarray  # matching detection per GT, -1 for a miss


def f1_optimal_score(images: Images, match: EpochMatch) -> float:
    """The score threshold with the best F1 of the matching (greedy matching is prefix-stable in score, so
    the matches of the detections above any threshold are those of the full matching)."""
    n_gt = len(images.gts.label)
    if not len(images.dets.score) or not n_gt:
        return float("inf") if not len(images.dets.score) else float(images.dets.score.max())
    order = np.argsort(-images.dets.score, kind="stable")
    tp = np.cumsum(match.det_gt[order] >= 0)
    count = np.arange(1, len(order) + 1)
    f1 = 2 * tp / (count + n_gt)
    scores = images.dets.score[order]
    last_of_value = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps every tie
    best = np.flatnonzero(last_of_value)[np.argmax(f1[last_of_value])]
    return float(scores[best])


def detection_signals(images: Images, geometry: "Geometry2D") -> pd.DataFrame:
    """Label-free signals of every detection (the inputs of its error_proba)."""
    dets = images.dets
    n = len(dets.score)
    order = np.lexsort((-dets.score, dets.image))
    rank = np.empty(n, dtype=np.int64)
    counts = np.bincount(dets.image, minlength=images.n_images)
    starts = np.cumsum(counts) - counts
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    # overlap with a higher-scoring detection of the same class (duplicates NMS let through)
    key = dets.image * (int(dets.label.max(initial=0)) + 1) + dets.label
    i, j = group_pairs(key, key)
    higher = dets.score[j] > dets.score[i]
    overlap = np.zeros(n)
    if higher.any():
        np.maximum.at(overlap, i[higher], geometry.overlap(dets.box[i[higher]], dets.box[j[higher]]))
    return pd.DataFrame({
        "score": dets.score, "msp": dets.score, "score_rank": rank, **geometry.shape_signals(dets.box),
        "label": dets.label, "same_class_overlap": overlap,
        "image_detections": counts[dets.image], "image_max_score": _group_max(dets.score, dets.image,
                                                                              images.n_images)[dets.image],
    })


def gt_signals(images: Images, geometry: "Geometry2D") -> pd.DataFrame:
    """Signals of every ground-truth object: its geometry and the strongest detection on it (any class)."""
    gts, dets = images.gts, images.dets
    i, j = group_pairs(gts.image, dets.image)
    overlapping = geometry.same_place(gts.box[i], dets.box[j])
    best = np.zeros(len(gts.label))
    if overlapping.any():
        np.maximum.at(best, i[overlapping], dets.score[j[overlapping]])
    return pd.DataFrame({
        **geometry.shape_signals(gts.box), "label": gts.label, "best_overlap_score": best, "msp": best,
        "image_objects": np.bincount(gts.image, minlength=images.n_images)[gts.image],
    })


def duplicate_gt(images: Images, geometry: "Geometry2D") -> np.ndarray:
    """Ground-truth boxes that repeat an earlier box of the same class in the same image."""
    gts = images.gts
    key = gts.image * (int(gts.label.max(initial=0)) + 1) + gts.label
    i, j = group_pairs(key, key)
    earlier = j < i
    flagged = np.zeros(len(gts.label), dtype=bool)
    hit = earlier & geometry.duplicate(gts.box[i], gts.box[j]) if earlier.any() else earlier
    flagged[i[hit]] = True
    return flagged


@dataclass
class Outcomes:
    """What happened to every object and reported detection of one epoch at the operating score."""

    op_index: np.ndarray  # indices of the detections at or above the operating score
    det_error: np.ndarray  # error type of each of them: TP, Cls, Loc, Both (2D), Dupe, Bkg
    det_target: np.ndarray  # the object a detection's error refers to (-1: none)
    folded: np.ndarray  # the detection explains a missed object and is counted in that object's unit
    found: np.ndarray  # per object: matched by a reported detection
    gt_type: np.ndarray  # per object: TP, Miss, or the type of the error that explains the miss
    chosen: np.ndarray  # per object: the matched or explaining detection (-1: none)


def outcomes_at(images: Images, match: EpochMatch, score_op: float, geometry: "Geometry2D") -> Outcomes:
    dets = images.dets
    op_index = np.flatnonzero(dets.score >= score_op)
    det_error, target = geometry.error_types(images, match, op_index)
    found = _found_at(match, images, score_op)
    # a missed object explained by a class / localisation error on it: the strongest such detection
    explains = np.isin(det_error, ["Cls", "Loc", "Both"]) & (target >= 0)
    explains[explains] &= ~found[target[explains]]
    explaining = np.full(len(images.gts.label), -1)
    if explains.any():
        candidates = np.flatnonzero(explains)
        order = candidates[np.lexsort((-dets.score[op_index[candidates]], target[candidates]))]
        first = np.r_[True, target[order][1:] != target[order][:-1]]
        explaining[target[order[first]]] = order[first]
    has_explanation = explaining >= 0
    gt_type = np.where(found, "TP", "Miss").astype(object)
    gt_type[has_explanation] = det_error[explaining[has_explanation]]
    folded = np.zeros(len(op_index), dtype=bool)
    folded[explaining[has_explanation]] = True
    explained_by = op_index[np.maximum(explaining, 0)] if len(op_index) else np.full(len(explaining), -1)
    chosen = np.where(found, match.gt_det, np.where(has_explanation, explained_by, -1))
    return Outcomes(op_index, det_error, target, folded, found, gt_type, chosen)


@dataclass
class Reference:
    """Built once per reference set: the operating point and the error_proba models."""

    name: str
    score_op: float
    det_estimator: ErrorProbaEstimator
    gt_estimator: ErrorProbaEstimator
    det_scores: np.ndarray
    gt_scores: np.ndarray
    tau_op: float
    tau_stable: float
    det_tau_op: float  # on the reported detections' P(false positive): accepted below it, at the risk
    slice_error_rate: pd.Series  # per slice of the reference's reported detections: their false-positive rate
    hotspot_slices: np.ndarray
    image_index: NeighborIndex | None = None  # the reference images' features (when traced): density
    image_mean_distance: np.ndarray | None = None  # their own sorted mean neighbour distances

    def density(self, images: Images, is_reference: bool = False) -> np.ndarray:
        """Percentile of each image's mean cosine distance to its 10 nearest reference images among the
        reference images' own (100: sparser than every one of them); NaN without comparable features."""
        if (self.image_index is None or images.features is None
                or images.features.shape[1] != self.image_index.base.shape[1]):
            return np.full(images.n_images, np.nan)
        neighbors, distances = self.image_index.query(images.features,
                                                      input_id=images.input_id if is_reference else None)
        pred = np.zeros(images.n_images, dtype=np.int64)
        return neighbor_signals(self.image_index, neighbors, distances, pred, pred,
                                self.image_mean_distance)["density"]


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of a detection score read as the probability that the object is there."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def label_free_images(images: Images, det_proba: np.ndarray, reference: Reference,
                      geometry: "Geometry2D", is_reference: bool = False) -> pd.DataFrame:
    """One row per image of what needs no ground truth (docs/operation.md, "Detection"):

    - ``n_pred``: detections reported (score >= the reference's ``score_op``); ``pred``: the class of the
      highest-scoring one (-1: none); ``max_score``: the highest score of any detection (0: none);
    - ``error_proba``: the largest P(false positive) of a reported detection (0: none), ``expected_errors``:
      their sum (the expected number of false positives); misses cannot be estimated without ground truth;
    - ``entropy``: the largest binary entropy of a detection score; ``top2_gap``: the smallest distance of a
      detection score to ``score_op`` (NaN: no detection) — uncertainty at the operating point;
    - ``region``: the slice (class:size, 3D class:distance band) of the most doubtful reported detection,
      ``region_error_rate`` its false-positive rate on the reference, ``in_hotspot_region``: a reported
      detection is in a hotspot slice of the reference; ``density``: ``Reference.density`` of the image-level
      features (NaN when not traced).
    """
    dets, n = images.dets, images.n_images
    reported = np.flatnonzero(dets.score >= reference.score_op)
    image, proba = dets.image[reported], det_proba[reported]
    slices = _slice_keys(dets.label[reported], geometry.slices(dets.box[reported]))
    # per image: the top-scoring reported detection, and the most doubtful one
    top = reported[np.lexsort((-dets.score[reported], image))]
    top_first = np.r_[True, dets.image[top][1:] != dets.image[top][:-1]] if len(top) else np.zeros(0, bool)
    pred = np.full(n, -1, dtype=np.int64)
    pred[dets.image[top[top_first]]] = dets.label[top[top_first]]
    doubtful = np.lexsort((-proba, image))
    doubt_first = np.r_[True, image[doubtful][1:] != image[doubtful][:-1]] if len(doubtful) else np.zeros(0, bool)
    region = np.full(n, "", dtype=object)
    region[image[doubtful[doubt_first]]] = slices[doubtful[doubt_first]]
    hot = np.zeros(n, dtype=bool)
    hot[image[np.isin(slices, reference.hotspot_slices)]] = True
    gap = np.full(n, np.inf)
    np.minimum.at(gap, dets.image, np.abs(dets.score - reference.score_op))
    gap[np.isinf(gap)] = np.nan  # no detection (NaN, not inf: result tables also travel as JSON)
    return pd.DataFrame({
        "input_id": images.input_id, "n_pred": np.bincount(image, minlength=n), "pred": pred,
        "max_score": _group_max(dets.score, dets.image, n),
        "entropy": _group_max(binary_entropy(dets.score), dets.image, n), "top2_gap": gap,
        "error_proba": _group_max(proba, image, n), "expected_errors": np.bincount(image, weights=proba, minlength=n),
        "region": region, "region_error_rate": reference.slice_error_rate.reindex(region).to_numpy(dtype=float),
        "in_hotspot_region": hot, "density": reference.density(images, is_reference),
    })


def _slice_keys(label: np.ndarray, slices: np.ndarray) -> np.ndarray:
    return (pd.Series(label).astype(str) + ":" + pd.Series(slices, dtype=object)).to_numpy(dtype=object)


class Geometry2D:
    """What is specific to 2D boxes: IoU matching at 0.5 (COCO greedy), TIDE's error types, COCO AP,
    slices by COCO size. The 3D evaluation (``detection3d.py``) provides the same methods for BEV centre
    distances, nuScenes metrics and distance bands."""

    task = "object_detection"
    box_width = 4
    metric_columns = METRIC_COLUMNS
    quality_name = "iou"  # per-unit column: IoU of an object with its matched / explaining detection
    count_name = "n_images"  # metrics column: how many images (3D: frames)
    slice_name = "size"
    codes_prefix = "OD"

    def match(self, images: Images) -> EpochMatch:
        matched = match_detections(images.dets, images.gts, MATCH_IOU)
        return EpochMatch(matched.det_gt, matched.gt_det)

    def error_types(self, images: Images, match: EpochMatch, reported: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """TIDE's type and target object of every reported detection (indices ``reported``; no cap per
        image: each is a unit)."""
        reported = _subset(images.dets, reported)
        per_image = np.bincount(reported.image, minlength=1)
        tide = tide_errors(reported, images.gts, images.n_images, pos_threshold=MATCH_IOU,
                           max_dets=max(int(per_image.max()), 1))
        return np.asarray(tide.det_error, dtype=object), np.asarray(tide.det_target_gt, dtype=np.int64)

    def overlap(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return pair_iou(a, b)

    def quality(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return pair_iou(a, b)

    def same_place(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return pair_iou(a, b) >= MATCH_IOU

    def duplicate(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return pair_iou(a, b) >= DUPLICATE_GT_IOU

    def shape_signals(self, box: np.ndarray) -> dict[str, np.ndarray]:
        width = np.clip(box[:, 2] - box[:, 0], 1e-6, None)
        height = np.clip(box[:, 3] - box[:, 1], 1e-6, None)
        return {"log_area": np.log(width * height), "log_aspect": np.log(width / height)}

    def slices(self, box: np.ndarray) -> np.ndarray:
        return size_names(box)

    def box_columns(self, box: np.ndarray) -> dict[str, np.ndarray]:
        return {name: box[:, k] for k, name in enumerate(("x1", "y1", "x2", "y2"))}

    def tp_issues(self, images: Images, out: "Outcomes") -> np.ndarray:
        """Per object: what is fragile about a found object ("" = nothing): a barely matched box."""
        on = np.maximum(out.chosen, 0)
        iou = pair_iou(images.gts.box, images.dets.box[on]) if len(on) else np.zeros(0)
        return np.where(out.found & (iou < WEAK_LOC_IOU), "WEAK_LOC", "").astype(object)

    def summary(self, images: Images) -> tuple[dict, pd.DataFrame, dict[str, pd.DataFrame]]:
        """Metrics of the whole dataset: COCO AP (pycocotools' numbers), per class, and TIDE's table."""
        coco = coco_evaluate(images.dets, images.gts, images.n_images)
        stats = coco.stats
        tide = tide_errors(images.dets, images.gts, images.n_images, pos_threshold=MATCH_IOU)
        counts, dap = tide.counts(), {**tide.dap(), **tide.special_dap()}
        errors = pd.DataFrame({"error_type": list(dap), "count": [counts.get(t, np.nan) for t in dap],
                               "dap": list(dap.values())})
        metrics = {"n_images": images.n_images, "map": stats[0], "ap50": stats[1], "ap75": stats[2],
                   "ap_small": stats[3], "ap_medium": stats[4], "ap_large": stats[5], "ar100": stats[8]}
        return metrics, coco.per_class(), {"tide": errors}

    def assign(self, samples: pd.DataFrame, tau_op: float, tau_stable: float) -> pd.DataFrame:
        return assign_detection(samples, tau_op, tau_stable, prefix=self.codes_prefix)


@dataclass
class DetectionEvaluation:
    samples: pd.DataFrame
    metrics: pd.DataFrame
    categories: pd.DataFrame
    history: pd.DataFrame
    per_class: pd.DataFrame
    images: pd.DataFrame
    thresholds: list[dict]
    notes: list[str]
    tide: pd.DataFrame | None = None  # 2D only
    unlabelled: pd.DataFrame | None = None  # one row per image traced without ground truth


def evaluate_detection(read: ReadTraces, meta: dict, epochs: dict[str, list[int]],
                       committed: dict[str, list[int]], risk: float = 0.05,
                       progress: Callable[[str, int, int], None] | None = None,
                       geometry: Geometry2D | None = None) -> DetectionEvaluation:
    """``epochs``: evaluated epochs per dataset_type; ``committed``: every readable epoch per dataset_type."""
    if not 0.0 < risk < 1.0:
        raise ValueError(f"risk must be in (0, 1), got {risk!r}")
    run = _Run(read, committed, risk, geometry or Geometry2D())
    parts: dict[str, list] = collections.defaultdict(list)
    thresholds = []
    jobs = [(d, e) for d, es in epochs.items() for e in es]
    for done, (dataset_type, epoch) in enumerate(jobs):
        if progress:
            progress(f"{dataset_type} epoch {epoch}", done, len(jobs))
        labelled = run.images(dataset_type, epoch).n_images > 0
        if labelled:
            out, reference = run.evaluate(dataset_type, epoch)
            for key, table in out.items():
                parts[key].append(table)
        unlabelled = run.unlabelled_images(dataset_type, epoch)
        if unlabelled.n_images:
            frame, reference = run.evaluate_unlabelled(dataset_type, epoch)
            parts["unlabelled"].append(frame)
            if not labelled:  # counts only: the metrics need ground truth
                parts["metrics"].append(pd.DataFrame([{
                    "dataset": dataset_type, "n_epoch": epoch, "counts": len(frame),
                    run.geometry.count_name: len(frame), "n_pred": len(unlabelled.dets.score),
                    "score_op": reference.score_op}]))
        thresholds.append({"dataset": dataset_type, "n_epoch": epoch, "reference": reference.name,
                           "score_op": reference.score_op, "tau_op": reference.tau_op,
                           "tau_stable": reference.tau_stable, "det_tau_op": reference.det_tau_op, "risk": risk})
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    return DetectionEvaluation(tables["samples"], tables["metrics"], category_summary(tables["samples"]),
                               tables["history"], tables["per_class"], tables["images"], thresholds, run.notes,
                               tide=tables.get("tide"), unlabelled=tables.get("unlabelled"))


class _Run:
    def __init__(self, read: ReadTraces, committed: dict[str, list[int]], risk: float, geometry: Geometry2D):
        self.read, self.committed, self.risk, self.geometry = read, committed, risk, geometry
        self.notes: list[str] = []
        self._images: dict[tuple[str, int], Images] = {}
        self._unlabelled: dict[tuple[str, int], Images] = {}
        self._matches: dict[tuple[str, int], EpochMatch] = {}
        self._references: dict[tuple[str, int], Reference] = {}
        self._outcomes: dict[tuple[str, int, float], Outcomes] = {}

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def images(self, dataset_type: str, epoch: int) -> Images:
        key = (dataset_type, epoch)
        if key not in self._images:
            table = self.read(dataset_type, epoch, True)
            # images traced without ground truth (null gt_boxes: not "no objects") go to the label-free path
            images = self._load(table.filter(pc.is_valid(table.column("gt_boxes"))), dataset_type, epoch)
            self._unlabelled[key] = self._load(table.filter(pc.is_null(table.column("gt_boxes"))), dataset_type, epoch)
            self._images[key] = images
            self._matches[key] = self.geometry.match(images)
        return self._images[key]

    def _load(self, table: pa.Table, dataset_type: str, epoch: int) -> Images:
        images, duplicates = load_images(table, self.geometry.box_width)
        if duplicates:
            self.note(f"{dataset_type} epoch {epoch}: {duplicates} duplicate input id(s) across ranks removed")
        return images

    def unlabelled_images(self, dataset_type: str, epoch: int) -> Images:
        """The images of a dataset and epoch traced without ground truth."""
        self.images(dataset_type, epoch)
        return self._unlabelled[(dataset_type, epoch)]

    def match(self, dataset_type: str, epoch: int) -> EpochMatch:
        self.images(dataset_type, epoch)
        return self._matches[(dataset_type, epoch)]

    def reference_key(self, dataset_type: str, epoch: int) -> tuple[str, int]:
        return reference_key(self.committed, dataset_type, epoch, self.note)

    def reference(self, key: tuple[str, int]) -> Reference:
        if key in self._references:
            return self._references[key]
        images, match = self.images(*key), self.match(*key)
        score_op = f1_optimal_score(images, match)
        det_estimator = ErrorProbaEstimator(inputs=self.detection_inputs)
        det_scores = det_estimator.fit_predict(detection_signals(images, self.geometry), match.det_gt < 0)
        gt_missed = ~_found_at(match, images, score_op)
        gt_estimator = ErrorProbaEstimator(inputs=self.object_inputs)
        gt_scores = gt_estimator.fit_predict(gt_signals(images, self.geometry), gt_missed)
        for estimator, what in ((det_estimator, "detections"), (gt_estimator, "objects")):
            if estimator.note:
                self.note(f"{key[0]}@{key[1]} ({what}): {estimator.note}")
        reported = images.dets.score >= score_op
        false_positive = match.det_gt[reported] < 0
        slices = _slice_keys(images.dets.label[reported], self.geometry.slices(images.dets.box[reported]))
        rate, hot = hotspot_regions(slices, false_positive)
        reference = Reference(f"{key[0]}@{key[1]}", score_op, det_estimator, gt_estimator, det_scores, gt_scores,
                              operating_threshold(gt_scores, gt_missed, self.risk),
                              operating_threshold(gt_scores, gt_missed, self.risk / 5),
                              operating_threshold(det_scores[reported], false_positive, self.risk),
                              pd.Series(rate, index=slices).groupby(level=0).first(), np.unique(slices[hot]))
        if images.features is not None:
            wrong_image = np.zeros(images.n_images, dtype=bool)
            wrong_image[images.dets.image[reported][false_positive]] = True
            index = NeighborIndex.build(images.features, images.input_id, np.zeros(images.n_images, np.int64),
                                        wrong_image)
            neighbors, distances = index.query(images.features, input_id=images.input_id)
            reference.image_index = index
            reference.image_mean_distance = np.sort(distances.mean(axis=1).astype(np.float64))
        self._references[key] = reference
        return reference

    @property
    def detection_inputs(self) -> list[str]:
        shape = list(self.geometry.shape_signals(np.zeros((0, self.geometry.box_width))))
        return ["score", "score_rank", *shape, "label", "same_class_overlap", "image_detections", "image_max_score"]

    @property
    def object_inputs(self) -> list[str]:
        shape = list(self.geometry.shape_signals(np.zeros((0, self.geometry.box_width))))
        return [*shape, "label", "best_overlap_score", "image_objects"]

    def outcomes(self, dataset_type: str, epoch: int, score_op: float) -> Outcomes:
        key = (dataset_type, epoch, score_op)
        if key not in self._outcomes:
            self._outcomes[key] = outcomes_at(self.images(dataset_type, epoch), self.match(dataset_type, epoch),
                                              score_op, self.geometry)
        return self._outcomes[key]

    def history(self, dataset_type: str, upto: int, score_op: float) -> tuple[pd.DataFrame, dict]:
        """Per object and saved epoch <= upto, at ``score_op``: found, its outcome type, the class and score of
        the detection on it; plus, per epoch, the background false positives (for repeated missing labels)."""
        rows, background = [], {}
        for epoch in [e for e in self.committed.get(dataset_type, []) if e <= upto]:
            images = self.images(dataset_type, epoch)
            out = self.outcomes(dataset_type, epoch, score_op)
            on_object = np.maximum(out.chosen, 0)
            rows.append(pd.DataFrame({
                "dataset_type": dataset_type, "n_epoch": epoch, "input_id": _object_ids(images),
                "label": images.gts.label, "correct": out.found, "outcome": out.gt_type,
                "pred": np.where(out.chosen >= 0, images.dets.label[on_object], -1),
                "p_label": np.where(out.found, images.dets.score[on_object], 0.0), "logit_margin": np.nan}))
            index = out.op_index[out.det_error == "Bkg"]
            background[epoch] = (images.input_id[images.dets.image[index]], images.dets.label[index],
                                 images.dets.box[index])
        return pd.concat(rows, ignore_index=True), background

    # -- one dataset and epoch ----------------------------------------------------------------
    def evaluate(self, dataset_type: str, epoch: int) -> tuple[dict[str, pd.DataFrame], Reference]:
        images, match = self.images(dataset_type, epoch), self.match(dataset_type, epoch)
        ref_key = self.reference_key(dataset_type, epoch)
        reference = self.reference(ref_key)
        op = reference.score_op
        if ref_key == (dataset_type, epoch):
            det_proba, gt_proba = reference.det_scores, reference.gt_scores
        else:
            det_proba = reference.det_estimator.predict(detection_signals(images, self.geometry))
            gt_proba = reference.gt_estimator.predict(gt_signals(images, self.geometry))
        out = self.outcomes(dataset_type, epoch, op)
        history, background = self.history(dataset_type, epoch, op)
        dynamics = training_dynamics(history)
        if dynamics["variability"].isna().all():
            self.note(f"{dataset_type} epoch {epoch}: fewer than two saved epochs, so no training dynamics")
        samples = _units(images, out, det_proba, gt_proba, dynamics, history, background, epoch, self.geometry)
        samples = self.geometry.assign(samples, reference.tau_op, reference.tau_stable)
        samples.insert(0, "n_epoch", epoch)
        samples.insert(0, "dataset_type", dataset_type)

        accepted = images.dets.score >= op
        n_acc = int(accepted.sum())
        fp_all = match.det_gt < 0
        ep_auroc, ep_auprc = _binary_scores(fp_all, det_proba)
        base_auroc, base_auprc = _binary_scores(fp_all, 1.0 - images.dets.score)
        dataset_metrics, per_class, extra = self.geometry.summary(images)
        metrics = {
            "dataset": dataset_type, "n_epoch": epoch, "counts": len(samples), **dataset_metrics,
            "n_gt": len(images.gts.label), "n_pred": len(images.dets.score),
            "precision": float((match.det_gt[accepted] >= 0).sum() / n_acc) if n_acc else float("nan"),
            "recall": float(out.found.mean()) if len(out.found) else float("nan"), "score_op": op,
            "error_proba_auroc": ep_auroc, "error_proba_auprc": ep_auprc,
            "baseline_error_proba_auroc": base_auroc, "baseline_error_proba_auprc": base_auprc,
        }
        label_free = label_free_images(images, det_proba, reference, self.geometry,
                                       is_reference=ref_key == (dataset_type, epoch))
        label_free = label_free.drop(columns=["input_id", "n_pred"])  # the image view has both
        tables = {"samples": samples, "metrics": pd.DataFrame([metrics]), "per_class": per_class,
                  "images": pd.concat([_image_view(samples, images, accepted), label_free], axis=1),
                  "history": history, **extra}
        for name in ("per_class", "images", *extra):
            tables[name].insert(0, "n_epoch", epoch)
            tables[name].insert(0, "dataset" if name != "images" else "dataset_type", dataset_type)
        return tables, reference


    def evaluate_unlabelled(self, dataset_type: str, epoch: int) -> tuple[pd.DataFrame, Reference]:
        """The label-free image table of the images of a dataset and epoch traced without ground truth,
        against a labelled reference set (NoReferenceError when there is none)."""
        images = self.unlabelled_images(dataset_type, epoch)
        ref_key = self.reference_key(dataset_type, epoch)
        if ref_key == (dataset_type, epoch) and not self.images(dataset_type, epoch).n_images:
            raise NoReferenceError(
                f"{dataset_type} epoch {epoch} was traced without ground truth and has no labelled train traces to be "
                "compared with: the operating score, P(false positive) and the hotspot slices are learnt on labelled "
                "data. Trace the training data (with targets, dataset_type='train') under the same "
                "model_name/version_name, then evaluate again")
        reference = self.reference(ref_key)
        det_proba = reference.det_estimator.predict(detection_signals(images, self.geometry))
        frame = label_free_images(images, det_proba, reference, self.geometry)
        # an image without a reported detection reports nothing that could be wrong: accepted whatever the
        # threshold (det_tau_op is -inf when the reference reported nothing)
        frame = assign_unlabelled(frame, np.where(frame["n_pred"] > 0, reference.det_tau_op, np.inf))
        if images.logged_at is not None:
            frame["logged_at"] = pd.to_datetime(images.logged_at).tz_localize("UTC")
        frame.insert(0, "n_epoch", epoch)
        frame.insert(0, "dataset_type", dataset_type)
        return frame, reference


def _subset(boxes: Boxes, mask: np.ndarray) -> Boxes:
    return Boxes(image=boxes.image[mask], label=boxes.label[mask], box=boxes.box[mask],
                 score=None if boxes.score is None else boxes.score[mask])


def _found_at(match: EpochMatch, images: Images, score_op: float) -> np.ndarray:
    """Per GT object: matched by a detection scoring at least ``score_op``."""
    return (match.gt_det >= 0) & (images.dets.score[np.maximum(match.gt_det, 0)] >= score_op)


def _object_ids(images: Images) -> np.ndarray:
    return (pd.Series(images.input_id[images.gts.image]).astype(str) + "#" +
            pd.Series(images.gt_position).astype(str)).to_numpy(dtype=object)


def _repeated_background(image_id: np.ndarray, label: np.ndarray, box: np.ndarray, background: dict, epoch: int,
                         geometry: Geometry2D) -> np.ndarray:
    """For each background detection: in how many other saved epochs a background detection of the same
    class covers the same place."""
    repeats = np.zeros(len(label), dtype=np.int64)
    for other_epoch, (other_id, other_label, other_box) in background.items():
        if other_epoch == epoch or not len(other_label) or not len(label):
            continue
        keys = pd.factorize(np.concatenate([pd.Series(image_id).astype(str) + "|" + pd.Series(label).astype(str),
                                            pd.Series(other_id).astype(str) + "|" + pd.Series(other_label).astype(str)]))[0]
        i, j = group_pairs(keys[:len(label)], keys[len(label):])
        if not len(i):
            continue
        same_place = np.zeros(len(label), dtype=bool)
        same_place[i[geometry.same_place(box[i], other_box[j])]] = True
        repeats += same_place
    return repeats


def _units(images: Images, out: Outcomes, det_proba: np.ndarray, gt_proba: np.ndarray, dynamics: pd.DataFrame,
           history: pd.DataFrame, background: dict, epoch: int, geometry: Geometry2D) -> pd.DataFrame:
    """The per-unit table: one row per GT object, one per unexplained false positive at the operating point."""
    gts, dets = images.gts, images.dets
    on_object = np.maximum(out.chosen, 0)
    found, gt_type = out.found, out.gt_type
    gt_units = pd.DataFrame({
        "input_id": images.input_id[gts.image], "unit": "gt", "object_id": _object_ids(images),
        "label": gts.label, "pred": np.where(out.chosen >= 0, dets.label[on_object], -1),
        "score": np.where(out.chosen >= 0, dets.score[on_object], np.nan),
        geometry.quality_name: np.where(out.chosen >= 0, geometry.quality(gts.box, dets.box[on_object]), np.nan),
        **geometry.box_columns(gts.box), geometry.slice_name: geometry.slices(gts.box),
        "correct": found, "error_type": gt_type, "tp_issue": geometry.tp_issues(images, out),
        "error_proba": gt_proba, "duplicate_gt": duplicate_gt(images, geometry),
    })
    gt_units = gt_units.join(dynamics, on="object_id")
    # in how many other saved epochs this object had the same class error (a suspicious label)
    same_error = history[(history["outcome"] == "Cls") & (history["n_epoch"] != epoch)].groupby(
        ["input_id", "pred"]).size()
    keys = pd.MultiIndex.from_arrays([gt_units["object_id"], gt_units["pred"]])
    gt_units["repeated_errors"] = np.where(gt_type == "Cls", same_error.reindex(keys).fillna(0).to_numpy(), 0)

    # unexplained false positives at the operating point
    fp = (out.det_error != "TP") & (out.det_error != "") & ~out.folded
    fp_index, target = out.op_index[fp], out.det_target[fp]
    det_box = dets.box[fp_index]
    image_id = images.input_id[dets.image[fp_index]]
    has_target = (target >= 0) & (len(gts.label) > 0)
    fp_units = pd.DataFrame({
        "input_id": image_id, "unit": "pred",
        "object_id": pd.Series(image_id).astype(str).to_numpy(dtype=object) + "#p"
        + pd.Series(fp_index).astype(str).to_numpy(dtype=object),
        "label": dets.label[fp_index], "pred": dets.label[fp_index], "score": dets.score[fp_index],
        geometry.quality_name: np.where(has_target, geometry.quality(det_box, gts.box[np.maximum(target, 0)])
                                        if len(gts.label) else 0.0, np.nan),
        **geometry.box_columns(det_box), geometry.slice_name: geometry.slices(det_box),
        "correct": False, "error_type": out.det_error[fp], "tp_issue": "",
        "error_proba": det_proba[fp_index], "duplicate_gt": False,
    })
    bkg = fp_units["error_type"].to_numpy() == "Bkg"
    repeats = np.zeros(len(fp_units), dtype=np.int64)
    if bkg.any():
        repeats[bkg] = _repeated_background(image_id[bkg], dets.label[fp_index][bkg], det_box[bkg], background,
                                            epoch, geometry)
    fp_units["repeated_errors"] = repeats
    units = pd.concat([gt_units, fp_units], ignore_index=True)
    units["slice"] = units["label"].astype(str) + ":" + units[geometry.slice_name]
    wrong = ~units["correct"].to_numpy(dtype=bool)
    units["slice_error_rate"], units["in_hotspot_slice"] = hotspot_regions(units["slice"].to_numpy(), wrong)
    units["severity"] = np.where(units["correct"], units["error_proba"],
                                 1.0 + units["score"].fillna(0.0).to_numpy(dtype=float))
    return units


def _image_view(samples: pd.DataFrame, images: Images, accepted: np.ndarray) -> pd.DataFrame:
    """One row per image: objects, detections at the operating point, TP / FP / missed, worst category."""
    per_image = samples.groupby("input_id")
    frame = pd.DataFrame({"input_id": images.input_id})
    frame["n_gt"] = np.bincount(images.gts.image, minlength=images.n_images)
    frame["n_pred"] = np.bincount(images.dets.image[accepted], minlength=images.n_images)
    frame["tp"] = frame["input_id"].map(per_image["correct"].sum()).fillna(0).astype(int)
    is_gt = samples["unit"] == "gt"
    frame["missed"] = frame["input_id"].map(samples[is_gt & ~samples["correct"]].groupby("input_id").size()
                                            ).fillna(0).astype(int)
    frame["false_positives"] = frame["input_id"].map(samples[~is_gt].groupby("input_id").size()).fillna(0).astype(int)
    rank = {c: i for i, c in enumerate(CATEGORIES)}  # precedence order: the worst first
    worst = samples.assign(_r=samples["category"].map(rank)).groupby("input_id")["_r"].min()
    frame["worst_category"] = frame["input_id"].map(worst).map(dict(enumerate(CATEGORIES))).astype(object).fillna("")
    frame["error_codes"] = frame["input_id"].map(
        samples[~samples["correct"]].groupby("input_id")["error_code"].agg(lambda s: ", ".join(sorted(set(s))))
    ).astype(object).fillna("")
    return frame


__all__ = ["METRIC_COLUMNS", "evaluate_detection", "load_images", "Images"]
