"""nuScenes-style 3D detection metrics (mAP over centre distances, TP errors, NDS), vectorised with NumPy.

Equal to nuscenes-devkit 1.2 (``nuscenes.eval.detection.algo.accumulate / calc_ap / calc_tp`` and
``DetectionMetrics``) on the same boxes: the arrays of :class:`MetricData` are bit-identical to the
devkit's ``DetectionMetricData`` (``precision``, ``recall``, ``confidence``, ``trans_err``,
``vel_err``, ``scale_err``, ``orient_err``), and AP, TP errors, mAP and NDS are the same floats.

Input is one flat table per side (:class:`Boxes3D`): frame index, class id, box
``[cx, cy, cz, w, l, h, yaw]`` (geometric centre, ``w`` across / ``l`` along the heading, yaw about
+z), optional ``(vx, vy)`` velocity, score for detections. The devkit equivalent of a row is
``DetectionBox(sample_token=<frame>, translation=(cx, cy, cz), size=(w, l, h),
rotation=Quaternion(axis=[0, 0, 1], angle=yaw).elements, velocity=(vx, vy), detection_score=score)``
with the frames inserted into ``EvalBoxes`` in ascending frame order and the boxes of a frame in
their row order (that order decides score ties, see below).

Algorithm, and why each step is identical to the reference
-----------------------------------------------------------
1. **Order.** The devkit lists a class's predictions frame by frame (``EvalBoxes.all``) and sorts
   ``(score, position)`` pairs ascending, then reverses: score descending, and on equal scores the
   *later* prediction (higher position) first. Here: a stable sort by frame gives the positions,
   ``np.lexsort((-position, -score))`` the same order.
2. **Greedy matching.** Each prediction, in that order, takes the closest still-free GT of its frame
   and class (first minimum in GT row order, as the strict ``<`` of the devkit's loop), and is a TP
   iff that distance is ``< dist_th``. A prediction only competes with the predictions of its own
   frame, and inside a frame the devkit's global order is the frame's own score order, so the loop
   runs over the *rank of a prediction inside its frame* (at most the largest per-frame count),
   processing the prediction of that rank of every frame at once, for all distance thresholds at
   once. Frames are bucketed by GT count (padded on a coarse grid, <= 25% padding) so each step is
   a dense ``(thresholds, frames, GT)`` array operation.
3. **Floating point.** The devkit computes distances with ``np.linalg.norm`` of a 2-vector, that is
   ``sqrt(x.dot(x))``: a BLAS ``ddot``, which may fuse multiply-adds (it does on FMA CPUs), so
   ``sqrt(dx*dx + dy*dy)`` is *not* always the same float. Here the same BLAS routine is called for
   all pairs at once through ``np.matmul`` on stacked ``(1, 2) @ (2, 1)`` vectors (numpy's matmul
   dispatches each vector-vector product to the same ``cblas_ddot``), so centre distances,
   ``trans_err`` and ``vel_err`` carry the same bits on any machine. The devkit's yaw goes through
   pyquaternion (``math.cos/sin`` of ``yaw / 2``, a 4x4 BLAS ``dgemm`` for the rotation matrix,
   ``arctan2``); the same calls are made here in batch (``math`` per box for the trig, ``np.matmul``
   on stacked 4x4 matrices, which dispatches to the same ``cblas_dgemm``). ``scale_iou`` and
   ``angle_diff`` are plain float expressions evaluated in the devkit's order.
4. **Curves.** tp/fp cumulative sums, ``np.interp`` of precision and confidence at the 101 recall
   points, the NaN-aware cumulative means of the match errors and their ``np.interp`` onto the
   confidence grid are the devkit's expressions on the same arrays (one ``np.interp`` per class and
   threshold over all its predictions; no Python loop over boxes or frames).

Differences from the devkit's full ``DetectionEval`` (deliberate, documented)
------------------------------------------------------------------------------
- No attributes: ``attr_err`` is NaN (the devkit, given attribute-less boxes, has ones there) and
  attribute error does not enter NDS.
- NDS is ``(5 * mAP + sum_m max(0, 1 - mean_m)) / (5 + n_metrics)`` over the TP metrics
  ``trans_err, scale_err, orient_err`` and, only when both predictions and GT carry velocities,
  ``vel_err`` (``nds_metrics`` lists the ones used). This is the devkit's ``DetectionMetrics.nd_score``
  with ``TP_METRICS`` set to those metrics. ``ave`` is NaN ("not available") without velocities.
- As the devkit does, per-class TP errors that are undefined by class are NaN when the class is
  named like the nuScenes class: ``traffic_cone`` (orientation, velocity) and ``barrier``
  (velocity); ``barrier`` orientation is taken with period pi. Class-mean TP errors use ``nanmean``.
- No ``class_range`` (ego-distance) filtering and no ``max_boxes_per_sample`` check: filter the
  boxes before calling if needed.
- ``dist="bev_iou"`` is an extra matching mode (rotated bird's-eye-view IoU ``>= threshold``,
  largest IoU first, KITTI-style), not in the devkit; everything after the matching is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .coco import checked_flat_boxes

__all__ = ["Boxes3D", "MetricData", "NuScenesEvaluation", "accumulate", "bev_iou", "calc_ap", "calc_tp",
           "nuscenes_evaluate", "BEV_IOU_THRESHOLDS", "DIST_THRESHOLDS", "TP_METRIC_NAMES", "NELEM"]

NELEM = 101  # DetectionMetricData.nelem
DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
BEV_IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # dist="bev_iou" defaults
TP_METRIC_NAMES = ("trans_err", "scale_err", "orient_err", "vel_err")  # devkit TP_METRICS minus attr_err
_SHORT = {"trans_err": "ate", "scale_err": "ase", "orient_err": "aoe", "vel_err": "ave"}
_REC_INTERP = np.linspace(0, 1, NELEM)
# per-class TP errors the devkit sets to NaN (DetectionEval.evaluate) and the barrier's pi period
_UNDEFINED_TP = {"traffic_cone": ("vel_err", "orient_err"), "barrier": ("vel_err",)}
_PI_PERIOD_CLASSES = ("barrier",)


@dataclass
class Boxes3D:
    """3D boxes as flat arrays, one row per box.

    ``frame`` is the frame index in ``[0, n_frames)``, ``label`` the class id, ``box`` the
    ``[cx, cy, cz, w, l, h, yaw]`` box (metres, radians), ``velocity`` the ``(vx, vy)`` velocity
    (m/s; NaN entries allowed, as in nuScenes GT) or None, ``score`` the confidence (detections only).
    """

    frame: np.ndarray
    label: np.ndarray
    box: np.ndarray
    velocity: np.ndarray | None = None
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return int(np.shape(self.frame)[0])

    @classmethod
    def from_frames(cls, boxes: Sequence, labels: Sequence, scores: Sequence | None = None,
                    velocities: Sequence | None = None) -> "Boxes3D":
        """Flatten per-frame lists (frame ``i`` = ``boxes[i]``). Boxes may have 9 columns
        ``[.., yaw, vx, vy]``; the last two become the velocity unless ``velocities`` is given."""
        n_frames = len(boxes)
        arrays = [np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1] if np.size(b) else 7)
                  for b in boxes]
        widths = {a.shape[1] for a in arrays if a.shape[0]}
        if len(widths) > 1 or widths - {7, 9}:
            raise ValueError(f"boxes must be (N, 7) or (N, 9) arrays in every frame, got widths {sorted(widths)}")
        width = widths.pop() if widths else 7
        arrays = [a if a.shape[0] else np.zeros((0, width)) for a in arrays]
        counts = np.array([a.shape[0] for a in arrays], dtype=np.int64)
        flat = np.concatenate(arrays, axis=0) if n_frames else np.zeros((0, width))
        frame = np.repeat(np.arange(n_frames, dtype=np.int64), counts)
        label = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in labels]) if n_frames \
            else np.zeros(0, np.int64)
        velocity = None
        if velocities is not None:
            velocity = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1, 2) for v in velocities]) \
                if n_frames else np.zeros((0, 2))
        elif width == 9:
            velocity = flat[:, 7:9].copy()
        score = None
        if scores is not None:
            score = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]) \
                if n_frames else np.zeros(0)
        return cls(frame, label, np.ascontiguousarray(flat[:, :7]), velocity, score)


def _checked(boxes: Boxes3D, n_frames: int | None, what: str, need_score: bool) -> Boxes3D:
    """Typed, contiguous copies after checking shapes and values (ValueError with the reason)."""
    box = np.asarray(boxes.box)
    if box.ndim == 2 and box.shape[1] == 9:
        raise ValueError(f"{what}: box must be an (N, 7) array [cx, cy, cz, w, l, h, yaw], got shape {box.shape} "
                         "(pass velocities separately as `velocity`)")
    frame, label, box, score = checked_flat_boxes(boxes.frame, boxes.label, box, boxes.score, width=7,
                                                  layout="[cx, cy, cz, w, l, h, yaw]", n_groups=n_frames,
                                                  what=what, group_name="frame", need_score=need_score)
    if np.any(box[:, 3:6] <= 0):
        bad = np.flatnonzero((box[:, 3:6] <= 0).any(axis=1))[:5].tolist()
        raise ValueError(f"{what}: box sizes (w, l, h) must be > 0 (first bad rows: {bad})")
    velocity = None
    if boxes.velocity is not None:
        velocity = np.asarray(boxes.velocity, dtype=np.float64)
        if velocity.shape != (len(frame), 2):
            raise ValueError(f"{what}: velocity has shape {velocity.shape}, expected ({len(frame)}, 2)")
        if np.any(np.isinf(velocity)):
            raise ValueError(f"{what}: velocity holds infinite values")
        velocity = np.ascontiguousarray(velocity)
    return Boxes3D(frame, label, box, velocity, score)


# ----------------------------------------------------------------------------------------------------
# Metric data, calc_ap, calc_tp
# ----------------------------------------------------------------------------------------------------

@dataclass
class MetricData:
    """The devkit's ``DetectionMetricData``: 101-point curves over recall ``linspace(0, 1, 101)``."""

    recall: np.ndarray
    precision: np.ndarray
    confidence: np.ndarray
    trans_err: np.ndarray
    vel_err: np.ndarray
    scale_err: np.ndarray
    orient_err: np.ndarray
    attr_err: np.ndarray  # always NaN here (no attributes)

    @property
    def max_recall_ind(self) -> int:
        """Index of the max achieved recall: the last non-zero confidence (0 if none)."""
        non_zero = np.nonzero(self.confidence)[0]
        return 0 if len(non_zero) == 0 else int(non_zero[-1])

    @property
    def max_recall(self) -> float:
        return float(self.recall[self.max_recall_ind])

    @classmethod
    def no_predictions(cls) -> "MetricData":
        """``DetectionMetricData.no_predictions()`` (class without GT, or without any TP)."""
        return cls(recall=np.linspace(0, 1, NELEM), precision=np.zeros(NELEM), confidence=np.zeros(NELEM),
                   trans_err=np.ones(NELEM), vel_err=np.ones(NELEM), scale_err=np.ones(NELEM),
                   orient_err=np.ones(NELEM), attr_err=np.full(NELEM, np.nan))


def calc_ap(md: MetricData, min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    """Average precision (the devkit's ``calc_ap``): mean precision above ``min_recall`` after
    subtracting ``min_precision`` (clipped at 0), normalised by ``1 - min_precision``."""
    if not 0 <= min_precision < 1:
        raise ValueError("min_precision must lie in [0, 1)")
    if not 0 <= min_recall <= 1:
        raise ValueError("min_recall must lie in [0, 1]")
    prec = np.copy(md.precision)
    prec = prec[round(100 * min_recall) + 1:]
    prec -= min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def calc_tp(md: MetricData, min_recall: float = 0.1, metric_name: str = "trans_err") -> float:
    """True-positive error (the devkit's ``calc_tp``): mean of the curve between ``min_recall``
    (exclusive) and the max achieved recall (inclusive); 1.0 when the max recall is below it."""
    first_ind = round(100 * min_recall) + 1
    last_ind = md.max_recall_ind
    if last_ind < first_ind:
        return 1.0
    return float(np.mean(getattr(md, metric_name)[first_ind: last_ind + 1]))


# ----------------------------------------------------------------------------------------------------
# Devkit-exact elementary computations, batched
# ----------------------------------------------------------------------------------------------------

def _norm2(d: np.ndarray) -> np.ndarray:
    """``np.linalg.norm`` of each 2-vector ``d[..., :]`` with the devkit's bits: sqrt of a BLAS dot."""
    d = np.ascontiguousarray(d, dtype=np.float64)
    if d.size == 0:
        return np.zeros(d.shape[:-1])
    sq = np.matmul(d[..., None, :], d[..., :, None])[..., 0, 0]
    return np.sqrt(sq)


def _devkit_yaw(yaw: np.ndarray) -> np.ndarray:
    """``quaternion_yaw(Quaternion(Quaternion(axis=[0, 0, 1], angle=yaw).elements))`` per box, with
    pyquaternion's exact operations (math.cos/sin, BLAS dot/gemm), batched."""
    yaw = np.asarray(yaw, dtype=np.float64)
    if yaw.size == 0:
        return np.zeros(0)
    theta = [float(y) / 2.0 for y in yaw.tolist()]
    r = np.array([math.cos(t) for t in theta])
    s = np.array([math.sin(t) for t in theta])
    axis = np.array([0.0, 0.0, 1.0])  # unit already: pyquaternion does not rescale it
    q = np.stack([r, axis[0] * s, axis[1] * s, axis[2] * s], axis=1)
    # Quaternion._normalise: rescale if |1 - q.q| >= 1e-14 (q.q a BLAS dot)
    ss = np.matmul(q[:, None, :], q[:, :, None])[:, 0, 0]
    rescale = ~(np.abs(1.0 - ss) < 1e-14)
    if rescale.any():
        norm = np.sqrt(ss[rescale])
        q[rescale] = q[rescale] / norm[:, None]
    q0, q1, q2, q3 = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    q_mat = np.stack([np.stack([q0, -q1, -q2, -q3], 1), np.stack([q1, q0, -q3, q2], 1),
                      np.stack([q2, q3, q0, -q1], 1), np.stack([q3, -q2, q1, q0], 1)], 1)
    q_bar = np.stack([np.stack([q0, -q1, -q2, -q3], 1), np.stack([q1, q0, q3, -q2], 1),
                      np.stack([q2, -q3, q0, q1], 1), np.stack([q3, q2, -q1, q0], 1)], 1)
    rot = np.matmul(q_mat, q_bar.conj().transpose(0, 2, 1))[:, 1:, 1:]
    v = np.matmul(rot, np.array([1, 0, 0]).astype(np.float64))
    return np.arctan2(v[:, 1], v[:, 0])


def _angle_diff_abs(x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """``abs(angle_diff(x, y, period))`` of the devkit."""
    diff = (x - y + period / 2) % period - period / 2
    diff = np.where(diff > np.pi, diff - (2 * np.pi), diff)
    return np.abs(diff)


def _scale_err(gt_wlh: np.ndarray, pred_wlh: np.ndarray) -> np.ndarray:
    """``1 - scale_iou``: aligned 3D IoU of the sizes, in the devkit's operation order."""
    mn = np.minimum(gt_wlh, pred_wlh)
    inter = mn[:, 0] * mn[:, 1] * mn[:, 2]
    vol_gt = gt_wlh[:, 0] * gt_wlh[:, 1] * gt_wlh[:, 2]
    vol_pred = pred_wlh[:, 0] * pred_wlh[:, 1] * pred_wlh[:, 2]
    return 1 - inter / (vol_gt + vol_pred - inter)


def _cummean(x: np.ndarray) -> np.ndarray:
    """The devkit's NaN-aware cumulative mean (all NaN -> ones)."""
    nan = np.isnan(x)
    if nan.all():
        return np.ones(len(x))
    sum_vals = np.nancumsum(x.astype(float))
    count_vals = np.cumsum(~nan)
    return np.divide(sum_vals, count_vals, out=np.zeros_like(sum_vals), where=count_vals != 0)


# ----------------------------------------------------------------------------------------------------
# Rotated bird's-eye-view IoU
# ----------------------------------------------------------------------------------------------------

def _bev_corners(box: np.ndarray) -> np.ndarray:
    """(N, 4, 2) BEV corners, counter-clockwise, of ``[cx, cy, cz, w, l, h, yaw]`` boxes (l along yaw)."""
    half_l, half_w = box[:, 4] / 2, box[:, 3] / 2
    local = np.stack([np.stack([half_l, half_w], 1), np.stack([-half_l, half_w], 1),
                      np.stack([-half_l, -half_w], 1), np.stack([half_l, -half_w], 1)], 1)
    c, s = np.cos(box[:, 6])[:, None], np.sin(box[:, 6])[:, None]
    x = box[:, None, 0] + local[..., 0] * c - local[..., 1] * s
    y = box[:, None, 1] + local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y], axis=2)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: np.ndarray, box: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """(P, K) whether each of K points per pair lies in the pair's box (in its local frame)."""
    d = points - box[:, None, :2]
    c, s = np.cos(box[:, 6])[:, None], np.sin(box[:, 6])[:, None]
    along = d[..., 0] * c + d[..., 1] * s
    across = -d[..., 0] * s + d[..., 1] * c
    return (np.abs(along) <= box[:, None, 4] / 2 + eps) & (np.abs(across) <= box[:, None, 3] / 2 + eps)


def _bev_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection area of the BEV rectangles of aligned box pairs ``a[i]``, ``b[i]`` (N, 7).

    The intersection of two convex polygons is the convex hull of the corners of each inside the
    other and of the edge-edge crossings; those (at most 24) points are ordered by angle around
    their mean and the shoelace formula gives the area (padding repeats the last point: zero area).
    """
    n = a.shape[0]
    if n == 0:
        return np.zeros(0)
    ca, cb = _bev_corners(a), _bev_corners(b)
    scale = np.maximum(np.maximum(a[:, 3], a[:, 4]), np.maximum(b[:, 3], b[:, 4]))
    eps = (1e-9 * scale)[:, None]
    in_b = _inside(ca, b, eps)
    in_a = _inside(cb, a, eps)
    r = (np.roll(ca, -1, axis=1) - ca)[:, :, None, :]  # edges of a (N, 4, 1, 2)
    e = (np.roll(cb, -1, axis=1) - cb)[:, None, :, :]  # edges of b (N, 1, 4, 2)
    q = cb[:, None, :, :] - ca[:, :, None, :]  # (N, 4, 4, 2)
    denom = _cross(r, e)
    parallel = np.abs(denom) <= 1e-12 * (scale * scale)[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = _cross(q, e) / denom
        u = _cross(q, r) / denom
    cross_ok = ~parallel & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    crossings = ca[:, :, None, :] + np.where(cross_ok, t, 0.0)[..., None] * r
    pts = np.concatenate([ca, cb, crossings.reshape(n, 16, 2)], axis=1)  # (N, 24, 2)
    ok = np.concatenate([in_b, in_a, cross_ok.reshape(n, 16)], axis=1)
    count = ok.sum(axis=1)
    centre = np.where(ok[..., None], pts, 0.0).sum(axis=1) / np.maximum(count, 1)[:, None]
    angle = np.where(ok, np.arctan2(pts[..., 1] - centre[:, None, 1], pts[..., 0] - centre[:, None, 0]), np.inf)
    order = np.argsort(angle, axis=1)
    pts = np.take_along_axis(pts, order[..., None], axis=1)
    last = np.take_along_axis(pts, np.maximum(count - 1, 0)[:, None, None].repeat(2, axis=2), axis=1)
    pts = np.where((np.arange(24)[None, :] < count[:, None])[..., None], pts, last)
    nxt = np.roll(pts, -1, axis=1)
    area = 0.5 * np.abs(_cross(pts, nxt).sum(axis=1))
    return np.where(count >= 3, area, 0.0)


def bev_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotated bird's-eye-view IoU of aligned pairs of ``[cx, cy, cz, w, l, h, yaw]`` boxes:
    ``a`` and ``b`` (N, 7) -> (N,). Pairs whose circumscribed circles do not meet are 0 without
    any polygon work."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 7)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 7)
    if a.shape != b.shape:
        raise ValueError(f"bev_iou needs aligned (N, 7) arrays, got {a.shape} and {b.shape}")
    area_a, area_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    reach = (np.hypot(a[:, 3], a[:, 4]) + np.hypot(b[:, 3], b[:, 4])) / 2
    near = np.flatnonzero(np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]) < reach)
    iou = np.zeros(a.shape[0])
    step = 1 << 17
    for lo in range(0, near.size, step):
        idx = near[lo:lo + step]
        inter = np.minimum(_bev_intersection(a[idx], b[idx]), np.minimum(area_a[idx], area_b[idx]))
        iou[idx] = inter / (area_a[idx] + area_b[idx] - inter)
    return iou


# ----------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------

def _padded_size(count: np.ndarray) -> np.ndarray:
    """Round counts up to a coarse grid (1..8, 10, 12, 14, 16, 20, ..): <= 25% padding."""
    count = np.maximum(np.asarray(count, dtype=np.int64), 1)
    step = np.maximum(1, 1 << np.maximum(np.floor(np.log2(np.maximum(count - 1, 1))).astype(np.int64) - 2, 0))
    return -(-count // step) * step


@dataclass
class _ClassMatch:
    order: np.ndarray  # (n_p,) pred rows (input indexing) in the devkit's processing order
    match: np.ndarray  # (T, n_p) matched GT row (input indexing) or -1, aligned with ``order``
    dist: np.ndarray  # (T, n_p) centre distance to the matched GT (NaN if none)
    n_gt: int
    iou: np.ndarray | None = None  # (T, n_p) BEV IoU with the matched GT (dist="bev_iou" only)


def _match_class(dets: Boxes3D, gts: Boxes3D, label: int, thresholds: np.ndarray, dist_mode: str = "center",
                 max_pairs: int = 1 << 22) -> _ClassMatch:
    """Greedy matching of one class for all thresholds (see module docstring).

    ``center``: closest free GT, match iff centre distance ``< th``. ``bev_iou``: free GT of largest
    BEV IoU (first on ties), match iff IoU ``>= th``; the cost minimised is then ``-IoU``.
    """
    n_t = thresholds.size
    bev = dist_mode == "bev_iou"
    psel = np.flatnonzero(dets.label == label)
    psel = psel[np.argsort(dets.frame[psel], kind="stable")]  # the devkit's pred_boxes_list order
    order = psel[np.lexsort((-np.arange(psel.size), -dets.score[psel]))]  # score desc, later first on ties
    gsel = np.flatnonzero(gts.label == label)
    gsel = gsel[np.argsort(gts.frame[gsel], kind="stable")]
    n_p, n_g = order.size, gsel.size
    match = np.full((n_t, n_p), -1, dtype=np.int64)
    dist = np.full((n_t, n_p), np.nan)
    iou = np.full((n_t, n_p), np.nan) if bev else None
    if n_p == 0 or n_g == 0:
        return _ClassMatch(order, match, dist, n_g, iou)

    g_frame = gts.frame[gsel]
    frames, g_start, g_count = np.unique(g_frame, return_index=True, return_counts=True)
    p_frame = dets.frame[order]
    slot = np.searchsorted(frames, p_frame)  # index into ``frames`` (valid where has_gt)
    slot_c = np.minimum(slot, frames.size - 1)
    has_gt = frames[slot_c] == p_frame
    cand = np.flatnonzero(has_gt)  # positions in ``order`` of predictions whose frame has GT
    if cand.size == 0:
        return _ClassMatch(order, match, dist, n_g, iou)
    c_slot = slot_c[cand]
    # rank of each candidate inside its frame, in processing order
    by_frame = np.argsort(c_slot, kind="stable")
    sorted_slot = c_slot[by_frame]
    run_start = np.flatnonzero(np.r_[True, sorted_slot[1:] != sorted_slot[:-1]])
    run_len = np.diff(np.r_[run_start, sorted_slot.size])
    rank = np.empty(cand.size, dtype=np.int64)
    rank[by_frame] = np.arange(cand.size) - np.repeat(run_start, run_len)

    p_xy = dets.box[order[cand], :2]
    g_xy = gts.box[gsel, :2]
    width = _padded_size(g_count)
    thr = (-thresholds if bev else thresholds)[:, None]
    for w in np.unique(width):
        w = int(w)
        bucket_frames = np.flatnonzero(width == w)  # slots
        local = np.full(frames.size, -1, dtype=np.int64)
        local[bucket_frames] = np.arange(bucket_frames.size)
        in_b = np.flatnonzero(local[c_slot] >= 0)  # indices into cand
        if in_b.size == 0:  # these frames have GT of the class but no prediction of it
            continue
        b_local = local[c_slot[in_b]]
        b_rank = rank[in_b]
        # distances to the frame's (padded) GT, devkit bits
        cols = np.arange(w)
        valid = cols[None, :] < g_count[c_slot[in_b]][:, None]
        gidx = np.minimum(g_start[c_slot[in_b]][:, None] + cols[None, :], n_g - 1)
        d = np.empty((in_b.size, w))
        step = max(1, max_pairs // w)
        for lo in range(0, in_b.size, step):
            hi = lo + step
            if bev:
                pb = np.repeat(dets.box[order[cand[in_b[lo:hi]]]], w, axis=0)
                d[lo:hi] = -bev_iou(pb, gts.box[gsel[gidx[lo:hi]]].reshape(-1, 7)).reshape(-1, w)
            else:
                d[lo:hi] = _norm2(p_xy[in_b[lo:hi], None, :] - g_xy[gidx[lo:hi]])
        d[~valid] = np.inf
        taken = np.zeros((n_t, bucket_frames.size, w), dtype=bool)
        by_rank = np.argsort(b_rank, kind="stable")
        bounds = np.searchsorted(b_rank[by_rank], np.arange(b_rank.max() + 2))
        for r in range(b_rank.max() + 1):
            rows = by_rank[bounds[r]:bounds[r + 1]]  # one prediction per frame
            lf = b_local[rows]
            dm = np.where(taken[:, lf, :], np.inf, d[rows][None, :, :])  # (T, n_r, w)
            j = dm.argmin(axis=2)
            dmin = np.take_along_axis(dm, j[:, :, None], axis=2)[:, :, 0]
            ok = (dmin <= thr) if bev else (dmin < thr)
            tt, rr = np.nonzero(ok)
            jj = j[tt, rr]
            taken[tt, lf[rr], jj] = True
            pos = cand[in_b[rows[rr]]]
            match[tt, pos] = gsel[g_start[c_slot[in_b[rows[rr]]]] + jj]
            if bev:
                iou[tt, pos] = -dmin[tt, rr]
            else:
                dist[tt, pos] = dmin[tt, rr]
    if bev:  # centre distances of the matched pairs (trans_err), devkit bits
        tt, pos = np.nonzero(match >= 0)
        dist[tt, pos] = _norm2(dets.box[order[pos], :2] - gts.box[match[tt, pos], :2])
    return _ClassMatch(order, match, dist, n_g, iou)


# ----------------------------------------------------------------------------------------------------
# Accumulate
# ----------------------------------------------------------------------------------------------------

def _metric_data(dets: Boxes3D, gts: Boxes3D, cm: _ClassMatch, t: int, period: float,
                 yaw_cache: dict[str, np.ndarray]) -> MetricData:
    """The devkit's accumulate tail for threshold index ``t`` of an already matched class."""
    if cm.n_gt == 0:
        return MetricData.no_predictions()
    match = cm.match[t]
    is_tp = match >= 0
    if not is_tp.any():
        return MetricData.no_predictions()
    tp = np.cumsum(is_tp.astype(np.int64)).astype(float)
    fp = np.cumsum((~is_tp).astype(np.int64)).astype(float)
    conf = dets.score[cm.order]
    prec = tp / (fp + tp)
    rec = tp / float(cm.n_gt)
    prec = np.interp(_REC_INTERP, rec, prec, right=0)
    conf = np.interp(_REC_INTERP, rec, conf, right=0)

    p_rows = cm.order[is_tp]
    g_rows = match[is_tp]
    m_conf = dets.score[p_rows]
    errors = {"trans_err": cm.dist[t][is_tp]}
    if dets.velocity is not None and gts.velocity is not None:
        errors["vel_err"] = _norm2(dets.velocity[p_rows] - gts.velocity[g_rows])
    else:  # the devkit sees NaN velocities: velocity_l2 is NaN, cummean turns all-NaN into ones
        errors["vel_err"] = np.full(p_rows.size, np.nan)
    errors["scale_err"] = _scale_err(gts.box[g_rows, 3:6], dets.box[p_rows, 3:6])
    errors["orient_err"] = _angle_diff_abs(_yaw_of(gts, g_rows, yaw_cache, "gt"),
                                           _yaw_of(dets, p_rows, yaw_cache, "pred"), period)
    curves = {}
    for key, values in errors.items():
        tmp = _cummean(values)
        curves[key] = np.interp(conf[::-1], m_conf[::-1], tmp[::-1])[::-1]
    return MetricData(recall=_REC_INTERP.copy(), precision=prec, confidence=conf, attr_err=np.full(NELEM, np.nan),
                      **curves)


def _yaw_of(boxes: Boxes3D, rows: np.ndarray, cache: dict[str, np.ndarray], side: str) -> np.ndarray:
    """Devkit yaw of ``rows``, computed once per box (NaN marks not yet computed)."""
    values = cache.get(side)
    if values is None:
        values = cache[side] = np.full(len(boxes), np.nan)
    todo = rows[np.isnan(values[rows])]
    if todo.size:
        todo = np.unique(todo)
        values[todo] = _devkit_yaw(boxes.box[todo, 6])
    return values[rows]


def _period_for(class_name: str | None, orientation_period: float | None) -> float:
    if orientation_period is not None:
        return float(orientation_period)
    return np.pi if class_name in _PI_PERIOD_CLASSES else 2 * np.pi


def _check_dist(dist: str, thresholds: Iterable[float]) -> None:
    if dist not in ("center", "bev_iou"):
        raise ValueError(f"dist must be 'center' or 'bev_iou', got {dist!r}")
    th = np.asarray(list(thresholds), dtype=np.float64)
    if th.size == 0 or np.any(th <= 0) or not np.all(np.isfinite(th)):
        raise ValueError("thresholds must be a non-empty sequence of positive numbers")
    if dist == "bev_iou" and np.any(th > 1):
        raise ValueError("bev_iou thresholds are IoUs in (0, 1]")


def accumulate(dets: Boxes3D, gts: Boxes3D, label: int, dist_th: float, dist: str = "center",
               orientation_period: float | None = None, class_name: str | None = None) -> MetricData:
    """The devkit's ``accumulate`` for class ``label`` at centre-distance threshold ``dist_th``.

    ``orientation_period`` defaults to 2*pi (pi when ``class_name == "barrier"``, as the devkit).
    ``dist="bev_iou"`` matches on rotated BEV IoU ``>= dist_th`` instead (not a devkit mode; the
    curves are then built the same way from that matching).
    """
    _check_dist(dist, [dist_th])
    dets = _checked(dets, None, "dets", need_score=True)
    gts = _checked(gts, None, "gts", need_score=False)
    cm = _match_class(dets, gts, int(label), np.array([float(dist_th)]), dist)
    return _metric_data(dets, gts, cm, 0, _period_for(class_name, orientation_period), {})


# ----------------------------------------------------------------------------------------------------
# Full evaluation
# ----------------------------------------------------------------------------------------------------

@dataclass
class NuScenesEvaluation:
    """Result of :func:`nuscenes_evaluate`. Class axis K follows ``class_ids``; threshold axis T
    follows ``dist_ths``; the matching arrays are per input row (predictions / GT)."""

    class_ids: np.ndarray  # (K,)
    class_names: list[str]
    dist_ths: np.ndarray  # (T,)
    dist_th_tp: float
    ap: np.ndarray  # (K, T) AP per class and distance threshold
    map: float  # mean over classes of the mean over thresholds
    ate: np.ndarray  # (K,) per-class TP errors at dist_th_tp (NaN where undefined / not available)
    ase: np.ndarray
    aoe: np.ndarray
    ave: np.ndarray
    tp_errors: dict[str, float]  # class-mean TP errors (nanmean), keys TP_METRIC_NAMES
    tp_scores: dict[str, float]  # max(0, 1 - error) for the metrics in NDS
    nds: float
    nds_metrics: tuple[str, ...]  # TP metrics entering NDS
    velocity_available: bool
    n_gt: np.ndarray  # (K,)
    n_pred: np.ndarray  # (K,)
    metric_data: dict[tuple[int, float], MetricData] = field(repr=False)  # (class id, threshold)
    match_thresholds: np.ndarray = field(repr=False)  # (M,) sorted union of dist_ths and dist_th_tp
    pred_match_all: np.ndarray = field(repr=False)  # (n_pred, M) matched GT row or -1
    gt_match_all: np.ndarray = field(repr=False)  # (n_gt, M) matched prediction row or -1
    pred_match: np.ndarray = field(repr=False)  # (n_pred,) at dist_th_tp
    pred_dist: np.ndarray = field(repr=False)  # (n_pred,) centre distance to that GT (NaN if none)
    gt_match: np.ndarray = field(repr=False)  # (n_gt,) at dist_th_tp
    gt_dist: np.ndarray = field(repr=False)
    dist: str = "center"  # matching criterion: "center" (distances in m) or "bev_iou" (IoU thresholds)
    pred_iou: np.ndarray | None = field(default=None, repr=False)  # (n_pred,) BEV IoU at dist_th_tp (bev_iou)

    @property
    def mate(self) -> float:
        return self.tp_errors["trans_err"]

    @property
    def mase(self) -> float:
        return self.tp_errors["scale_err"]

    @property
    def maoe(self) -> float:
        return self.tp_errors["orient_err"]

    @property
    def mave(self) -> float:
        return self.tp_errors["vel_err"]

    def per_class(self) -> pd.DataFrame:
        columns = {"label": self.class_ids, "name": self.class_names, "n_gt": self.n_gt, "n_pred": self.n_pred}
        for i, th in enumerate(self.dist_ths):
            columns[f"ap@{th:g}"] = self.ap[:, i]
        columns["ap"] = np.array([np.mean(row) for row in self.ap]) if len(self.ap) else np.zeros(0)
        columns.update(ate=self.ate, ase=self.ase, aoe=self.aoe, ave=self.ave)
        return pd.DataFrame(columns)

    def summary(self) -> dict:
        return {"map": self.map, "nds": self.nds, "mate": self.mate, "mase": self.mase, "maoe": self.maoe,
                "mave": self.mave, "nds_metrics": list(self.nds_metrics),
                "velocity_available": self.velocity_available}


def nuscenes_evaluate(dets: Boxes3D, gts: Boxes3D, n_frames: int,
                      dist_ths: Sequence[float] | None = None, dist_th_tp: float | None = None,
                      class_names: Sequence[str] | None = None, min_recall: float = 0.1,
                      min_precision: float = 0.1, mean_ap_weight: float = 5.0,
                      orientation_periods: dict[int, float] | None = None,
                      dist: str = "center") -> NuScenesEvaluation:
    """nuScenes detection metrics (the devkit's ``DetectionEval.evaluate`` without attributes and
    ego-distance filtering; see the module docstring).

    Classes: ``range(len(class_names))`` when ``class_names`` is given (labels must lie in it; a
    class without GT has AP 0 and TP errors 1, as in the devkit), otherwise the sorted union of the
    labels of ``gts`` and ``dets``. ``orientation_periods`` overrides the yaw period per class id.

    ``dist="center"`` (default): ``dist_ths`` default (0.5, 1, 2, 4) m, ``dist_th_tp`` 2 m.
    ``dist="bev_iou"`` (KITTI-style, not a devkit mode): a prediction takes the free GT of largest
    rotated BEV IoU and matches iff IoU ``>= th``; ``dist_ths`` default (0.3, 0.5, 0.7),
    ``dist_th_tp`` 0.5; the TP errors are computed on those matches as in centre mode.
    """
    if dist_ths is None:
        dist_ths = BEV_IOU_THRESHOLDS if dist == "bev_iou" else DIST_THRESHOLDS
    if dist_th_tp is None:
        dist_th_tp = 0.5 if dist == "bev_iou" else 2.0
    _check_dist(dist, list(dist_ths) + [dist_th_tp])
    dets = _checked(dets, n_frames, "dets", need_score=True)
    gts = _checked(gts, n_frames, "gts", need_score=False)
    dist_ths = np.asarray([float(x) for x in dist_ths])
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        k = len(class_names)
        for what, b in (("dets", dets), ("gts", gts)):
            if len(b) and b.label.max() >= k:
                raise ValueError(f"{what}: label {int(b.label.max())} outside the {k} class_names")
        class_ids = np.arange(k, dtype=np.int64)
    else:
        class_ids = np.union1d(gts.label, dets.label).astype(np.int64)
        class_names = [str(c) for c in class_ids]
    thresholds = np.union1d(dist_ths, [float(dist_th_tp)])
    t_tp = int(np.searchsorted(thresholds, float(dist_th_tp)))
    velocity_available = dets.velocity is not None and gts.velocity is not None
    periods = orientation_periods or {}

    n_t = dist_ths.size
    ap = np.zeros((class_ids.size, n_t))
    tp_err = {m: np.full(class_ids.size, np.nan) for m in TP_METRIC_NAMES}
    n_gt = np.zeros(class_ids.size, dtype=np.int64)
    n_pred = np.zeros(class_ids.size, dtype=np.int64)
    pred_match_all = np.full((len(dets), thresholds.size), -1, dtype=np.int64)
    pred_dist_all = np.full((len(dets), thresholds.size), np.nan)
    pred_iou_all = np.full((len(dets), thresholds.size), np.nan) if dist == "bev_iou" else None
    metric_data: dict[tuple[int, float], MetricData] = {}
    yaw_cache: dict[str, np.ndarray] = {}
    for k, (cid, name) in enumerate(zip(class_ids.tolist(), class_names)):
        cm = _match_class(dets, gts, cid, thresholds, dist)
        n_gt[k], n_pred[k] = cm.n_gt, cm.order.size
        pred_match_all[cm.order] = cm.match.T
        pred_dist_all[cm.order] = cm.dist.T
        if pred_iou_all is not None:
            pred_iou_all[cm.order] = cm.iou.T
        period = _period_for(name, periods.get(cid))
        mds = {}
        for t, th in enumerate(thresholds.tolist()):
            if th in dist_ths or t == t_tp:
                mds[th] = _metric_data(dets, gts, cm, t, period, yaw_cache)
                metric_data[(cid, th)] = mds[th]
        for i, th in enumerate(dist_ths.tolist()):
            ap[k, i] = calc_ap(mds[th], min_recall, min_precision)
        md_tp = mds[float(thresholds[t_tp])]
        for m in TP_METRIC_NAMES:
            if m in _UNDEFINED_TP.get(name, ()) or (m == "vel_err" and not velocity_available):
                continue
            tp_err[m][k] = calc_tp(md_tp, min_recall, m)

    # DetectionMetrics: mean_ap, tp_errors, tp_scores, nd_score with the same expressions
    mean_dist_aps = [np.mean(list(row)) for row in ap]
    mean_ap = float(np.mean(mean_dist_aps)) if mean_dist_aps else float("nan")
    nds_metrics = tuple(m for m in TP_METRIC_NAMES if m != "vel_err" or velocity_available)
    tp_errors = {}
    for m in TP_METRIC_NAMES:
        vals = tp_err[m]
        tp_errors[m] = float(np.nanmean(vals)) if vals.size and not np.isnan(vals).all() else float("nan")
    tp_scores = {m: max(0.0, 1.0 - tp_errors[m]) for m in nds_metrics}
    nds = float(mean_ap_weight * mean_ap + np.sum(list(tp_scores.values())))
    nds = nds / float(mean_ap_weight + len(tp_scores.keys()))

    gt_match_all = np.full((len(gts), thresholds.size), -1, dtype=np.int64)
    gt_dist_all = np.full((len(gts), thresholds.size), np.nan)
    rows, cols = np.nonzero(pred_match_all >= 0)
    gt_match_all[pred_match_all[rows, cols], cols] = rows
    gt_dist_all[pred_match_all[rows, cols], cols] = pred_dist_all[rows, cols]
    return NuScenesEvaluation(
        class_ids=class_ids, class_names=list(class_names), dist_ths=dist_ths, dist_th_tp=float(dist_th_tp),
        ap=ap, map=mean_ap, ate=tp_err["trans_err"], ase=tp_err["scale_err"], aoe=tp_err["orient_err"],
        ave=tp_err["vel_err"], tp_errors=tp_errors, tp_scores=tp_scores, nds=nds, nds_metrics=nds_metrics,
        velocity_available=velocity_available, n_gt=n_gt, n_pred=n_pred, metric_data=metric_data,
        match_thresholds=thresholds, pred_match_all=pred_match_all, gt_match_all=gt_match_all,
        pred_match=pred_match_all[:, t_tp].copy(), pred_dist=pred_dist_all[:, t_tp].copy(),
        gt_match=gt_match_all[:, t_tp].copy(), gt_dist=gt_dist_all[:, t_tp].copy(), dist=dist,
        pred_iou=None if pred_iou_all is None else pred_iou_all[:, t_tp].copy())
