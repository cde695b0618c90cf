"""COCO bounding-box evaluation (pycocotools ``COCOeval(iouType="bbox")``), vectorised with NumPy.

Input is one flat table per side (:class:`Boxes`: image index, class id, ``[x1, y1, x2, y2]`` box,
score for detections). :func:`coco_evaluate` returns the same numbers as pycocotools'
``evaluate(); accumulate(); summarize()`` -- ``stats``, ``eval['precision']``, ``eval['recall']``,
``eval['scores']`` -- bit for bit, plus the per-detection / per-GT matching that pycocotools computes
but only keeps inside ``evalImgs``.

Algorithm, and why each step is identical to the reference
-----------------------------------------------------------
pycocotools works on one (image, category) pair at a time. Here every step is done for all pairs
("groups") at once:

1. **Box conversion and IoU.** Boxes become ``[x, y, w, h]`` with ``w = x2 - x1`` (float64), the
   representation pycocotools receives, and IoU is evaluated with the exact floating-point expression
   of maskApi's ``bbIou`` (``min(w + x, ...) - max(x, ...)``, ``i / ((da + ga) - i)``, 0 when the
   intersection width or height is ``<= 0``). Same operations in the same order give the same bits.
   Detection area is ``w * h`` as ``COCO.loadRes`` sets it; GT area is ``w * h`` too (the caller's
   GT has no separate ``area`` field).
2. **Ordering.** A stable argsort on ``-score`` followed by a stable argsort on the group key
   (image, category) reproduces ``np.argsort(-score, kind="mergesort")`` within each group (stable
   sorts keep input order on ties, and pycocotools' per-group input order is the order of the
   annotations). Detections with
   rank ``>= maxDets[-1]`` inside their group are dropped before anything else, as ``computeIoU``
   does. GT keep input order inside the group.
3. **Greedy matching** (``evaluateImg``). For one detection at IoU threshold ``t`` pycocotools walks
   the GT sorted non-ignored first and keeps the last GT whose IoU is ``>= min(t, 1 - 1e-10)`` and
   ``>=`` the best so far, stopping at the first ignored GT once it holds a non-ignored match. That
   is: among the still-free GT with IoU ``>= t``, take the non-ignored ones if any exist, otherwise
   the ignored ones, and pick the maximum IoU with ties going to the *last* GT in input order
   (``argmax`` on the reversed axis). The loop runs over the detection rank ``r`` (at most
   ``maxDets[-1]``) and is vectorised over all groups, the 10 IoU thresholds and the 4 area ranges
   (the area range changes which GT are ignored, hence the matching itself). Groups are bucketed by
   their GT count (padded on a coarse grid, at most 25% padding) so the padded arrays stay small; groups without
   GT need no matching and groups without detections only count GT.
   Ignore flags: a detection matched to an ignored GT is ignored; an unmatched detection whose area
   is outside the range is ignored (``area < lo or area > hi``, the same comparisons).
   Pairs (image, category) with neither GT nor detections, for which ``evaluateImg`` returns
   ``None``, contribute nothing to any sum or concatenation, so skipping them changes nothing.
4. **Accumulate.** pycocotools concatenates, per category, each image's first ``maxDet`` detections
   in image order and sorts them with a stable sort on ``-score``; two stable argsorts (score, then
   category) of the rows, already in (image, category, rank) order, give exactly that order for all
   categories at once. Only the TP positions of each (IoU threshold, category) curve are needed:
   between two TPs ``pr = tp / (fp + tp + eps)`` only falls (fp grows) or stays (ignored
   detection), so ``max(pr[i:])`` at a TP is a max over the TPs after it, and
   ``np.searchsorted(rc, recThrs, 'left')`` with ``rc = tp / npig`` lands, for a threshold needing
   ``c >= 1`` true positives, on the ``c``-th TP (``c`` = the smallest count whose float ratio
   ``c / npig`` reaches the threshold: division is monotone, so both searches agree), and for the
   threshold 0 on the first detection. The counts at each TP are exact integers: ``tp`` is its
   rank among the TPs, ``fp = position + 1 - tp - ignored so far`` (a cumulative count of the
   out-of-range detections corrected by the matched ones), and the same float expressions then
   give the same ``rc``/``pr`` values. The envelope at the (at most 101) search positions is
   ``np.maximum.reduceat`` over the pieces between consecutive positions followed by a reverse
   running maximum (max is exact). Categories with ``npig == 0`` stay -1.
5. **Summarize** applies the same NumPy expressions (same slicing, ``np.mean(s[s > -1])``) to the
   same arrays, so ``stats`` are identical.

Only non-crowd GT is supported (no ``iscrowd``/``ignore`` input), which is what the flat input can
express. Categories evaluated: the sorted union of the GT labels and the optional ``categories``
argument, mirroring pycocotools where ``params.catIds`` are the categories declared in the GT
dataset; detections of any other class are dropped, as ``getAnnIds(catIds=...)`` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

__all__ = ["Boxes", "CocoEvaluation", "MatchResult", "box_iou", "coco_evaluate", "match_detections",
           "IOU_THRESHOLDS", "RECALL_THRESHOLDS", "AREA_RANGES", "AREA_LABELS"]

# The exact parameter arrays of pycocotools' Params.setDetParams (linspace, not arange: the values
# must be bit-identical for summarize's ``iouThr == p.iouThrs`` look-ups and for the searchsorted).
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
AREA_RANGES = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]],
                       dtype=np.float64)
AREA_LABELS = ("all", "small", "medium", "large")
_EPS = np.spacing(1)  # the epsilon pycocotools adds to the precision denominator
_MAX_IOU_THRESHOLD = 1 - 1e-10  # evaluateImg matches at min(t, 1 - 1e-10)


@dataclass
class Boxes:
    """Boxes as flat arrays, one row per box.

    ``image`` is the image index in ``[0, n_images)``, ``label`` the class id, ``box`` the
    ``[x1, y1, x2, y2]`` pixel box and ``score`` the confidence (detections only).
    """

    image: np.ndarray
    label: np.ndarray
    box: np.ndarray
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return int(np.shape(self.image)[0])


def checked_flat_boxes(group: np.ndarray, label: np.ndarray, box: np.ndarray, score: np.ndarray | None, *,
                       width: int, layout: str, n_groups: int | None, what: str, group_name: str,
                       need_score: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Typed, contiguous copies of one row-per-box set (``group``: the image / frame index of each box)
    after checking what 2D and 3D boxes share: lengths, integer ids, finite boxes, ranges, scores.
    ValueError with the reason."""
    group, label = np.asarray(group), np.asarray(label)
    box = np.asarray(box, dtype=np.float64)
    if group.ndim != 1 or label.ndim != 1:
        raise ValueError(f"{what}: {group_name} and label must be 1-D arrays")
    n = group.shape[0]
    if box.ndim != 2 or box.shape[1] != width:
        raise ValueError(f"{what}: box must be an (N, {width}) array {layout}, got shape {box.shape}")
    if box.shape[0] != n or label.shape[0] != n:
        raise ValueError(f"{what}: {group_name} ({n}), label ({label.shape[0]}) and box ({box.shape[0]}) must "
                         "describe the same number of boxes")
    for name, values in ((group_name, group), ("label", label)):
        if n and not (np.issubdtype(values.dtype, np.integer)
                      or (np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)))):
            raise ValueError(f"{what}: {name} must hold integers")
    group, label = group.astype(np.int64), label.astype(np.int64)
    if not np.all(np.isfinite(box)):
        bad_rows = np.flatnonzero(~np.isfinite(box).all(axis=1))[:5].tolist()
        raise ValueError(f"{what}: box holds NaN or infinite values (first rows: {bad_rows})")
    if n and group.min() < 0:
        raise ValueError(f"{what}: {group_name} indices must be >= 0")
    if n and n_groups is not None and group.max() >= n_groups:
        raise ValueError(f"{what}: {group_name} indices must lie in [0, n_{group_name}s={n_groups})")
    if n and label.min() < 0:
        raise ValueError(f"{what}: labels must be non-negative")
    if need_score:
        if score is None:
            raise ValueError(f"{what}: detections need a score")
        score = np.asarray(score, dtype=np.float64)
        if score.shape != (n,):
            raise ValueError(f"{what}: score has shape {score.shape}, expected ({n},)")
        if not np.all(np.isfinite(score)):
            raise ValueError(f"{what}: score holds NaN or infinite values")
    else:
        score = None
    return np.ascontiguousarray(group), np.ascontiguousarray(label), np.ascontiguousarray(box), score


def _checked(boxes: Boxes, n_images: int, what: str, need_score: bool) -> Boxes:
    image, label, box, score = checked_flat_boxes(boxes.image, boxes.label, boxes.box, boxes.score, width=4,
                                                  layout="[x1, y1, x2, y2]", n_groups=n_images, what=what,
                                                  group_name="image", need_score=need_score)
    if np.any(box[:, 2] < box[:, 0]) or np.any(box[:, 3] < box[:, 1]):
        raise ValueError(f"{what}: boxes must be [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1")
    return Boxes(image, label, box, score)


def _xywh(box: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] -> [x, y, w, h] (float64), the form pycocotools stores and bbIou reads."""
    out = box.copy()
    out[:, 2] = box[:, 2] - box[:, 0]
    out[:, 3] = box[:, 3] - box[:, 1]
    return out


def _bb_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of broadcastable ``[..., 4]`` xywh arrays with the float expressions of maskApi's bbIou.

    Edges (``w + x``) and areas (``w * h``) are computed on the inputs before broadcasting and the
    full-size work is done in place: the same operations on the same values, fewer temporaries.
    """
    dx, dy, dw, dh = dt[..., 0], dt[..., 1], dt[..., 2], dt[..., 3]
    gx, gy, gw, gh = gt[..., 0], gt[..., 1], gt[..., 2], gt[..., 3]
    inter = np.minimum(dw + dx, gw + gx)
    inter -= np.maximum(dx, gx)  # intersection width
    overlap = inter > 0
    inter_h = np.minimum(dh + dy, gh + gy)
    inter_h -= np.maximum(dy, gy)
    overlap &= inter_h > 0
    inter *= inter_h  # i = w * h
    union = np.add(dw * dh, gw * gh)
    union -= inter  # bbIou: u = da + ga - i, evaluated left to right
    iou = np.zeros(np.broadcast_shapes(inter.shape, union.shape))
    np.divide(inter, union, out=iou, where=overlap)  # 0 where the boxes do not overlap, as bbIou
    return iou


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (float64, shape ``(len(a), len(b))``) of ``[x1, y1, x2, y2]`` boxes, as pycocotools."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return _bb_iou(_xywh(a)[:, None, :], _xywh(b)[None, :, :])


def _order_by_key_then_score(key: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices sorting by ``key`` ascending, then ``score`` descending, then position (all stable).

    Two stable argsorts are much faster than an equivalent ``np.lexsort`` on large arrays.
    """
    by_score = np.argsort(-score, kind="stable")
    return by_score[np.argsort(key[by_score], kind="stable")]


def _group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique keys, start offsets and lengths of the runs of an already sorted key array."""
    if sorted_keys.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    is_start = np.empty(sorted_keys.size, dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    lengths = np.diff(np.append(starts, sorted_keys.size))
    return sorted_keys[starts], starts, lengths


def _rank_in_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal keys (keys already sorted)."""
    _, starts, lengths = _group_bounds(sorted_keys)
    return np.arange(sorted_keys.size, dtype=np.int64) - np.repeat(starts, lengths)


def _padded_size(count: np.ndarray) -> np.ndarray:
    """Round counts up to a coarse grid (1, 2, .., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ..): padding
    costs at most 25% while keeping the number of distinct shapes (numpy calls) logarithmic."""
    count = np.maximum(np.asarray(count, dtype=np.int64), 1)
    step = np.maximum(1, 1 << np.maximum(np.floor(np.log2(np.maximum(count - 1, 1))).astype(np.int64) - 2, 0))
    return -(-count // step) * step


def _buckets_by_width(gt_count: np.ndarray, det_count: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """Split groups by padded GT count; each bucket is ordered by detection count (descending) so
    that the groups still having a detection at rank ``r`` are a prefix."""
    width = _padded_size(gt_count)
    for w in np.unique(width):
        members = np.flatnonzero(width == w)
        members = members[np.argsort(-det_count[members], kind="stable")]
        yield members, int(w)


def _buckets_2d(gt_count: np.ndarray, det_count: np.ndarray, max_pairs: int = 1 << 21
                ) -> Iterator[tuple[np.ndarray, int, int]]:
    """Split groups by (padded GT count, padded detection count), in chunks of at most ``max_pairs``
    padded (detection, GT) pairs, so a chunk is a dense (groups, depth, width) block."""
    width, depth = _padded_size(gt_count), _padded_size(det_count)
    shape_key = width * (int(depth.max(initial=1)) + 1) + depth
    for key in np.unique(shape_key):
        members = np.flatnonzero(shape_key == key)
        w, d = int(width[members[0]]), int(depth[members[0]])
        per_chunk = max(1, max_pairs // (w * d))
        for start in range(0, members.size, per_chunk):
            yield members[start:start + per_chunk], w, d


def _greedy_match(det_xywh: np.ndarray, gt_xywh: np.ndarray, gt_in_range: np.ndarray,
                  det_start: np.ndarray, det_count: np.ndarray, gt_start: np.ndarray, gt_count: np.ndarray,
                  thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pycocotools' evaluateImg matching for many groups, thresholds and area ranges at once.

    ``det_*`` rows of a group are contiguous and score-sorted, ``gt_*`` rows contiguous in input order.
    ``gt_in_range`` is ``(n_gt, A)``: False where the GT is ignored for that area range.
    Returns the matches as sparse events ``(det row, area index, threshold index, GT row)``.
    """
    n_areas, n_thr = gt_in_range.shape[1], thresholds.shape[0]
    events: list[tuple[np.ndarray, ...]] = []
    for members, width in _buckets_by_width(gt_count, det_count):
        slot = np.arange(width)
        g_start, g_count, d_start = gt_start[members], gt_count[members], det_start[members]
        slot_valid = slot[None, :] < g_count[:, None]
        slot_row = np.where(slot_valid, g_start[:, None] + slot[None, :], 0)
        slot_boxes = gt_xywh[slot_row]  # (groups, width, 4)
        # (groups, A, 1, width): whether each slot is a non-ignored GT for each area range
        slot_main = (gt_in_range[slot_row] & slot_valid[:, :, None]).transpose(0, 2, 1)[:, :, None, :]
        taken = np.zeros((members.size, n_areas, n_thr, width), dtype=bool)
        counts = det_count[members]
        n_active_by_rank = np.bincount(counts, minlength=counts.max() + 1)[::-1].cumsum()[::-1]
        for rank in range(int(counts.max())):
            n = int(n_active_by_rank[rank + 1])  # groups with more than `rank` detections
            rows = d_start[:n] + rank
            iou = _bb_iou(det_xywh[rows][:, None, :], slot_boxes[:n])
            iou[~slot_valid[:n]] = -1.0  # padding never reaches a threshold
            free = (iou[:, None, None, :] >= thresholds[None, None, :, None]) & ~taken[:n]
            main = free & slot_main[:n]
            # a non-ignored candidate wins over every ignored one (the `break` in evaluateImg)
            candidates = np.where(main.any(axis=-1, keepdims=True), main, free)
            scored = np.where(candidates, iou[:, None, None, :], -np.inf)
            # equal IoU: evaluateImg keeps the later GT (`if iou < best: continue` lets ties through)
            pick = width - 1 - np.argmax(scored[..., ::-1], axis=-1)
            gi, ai, ti = np.nonzero(candidates.any(axis=-1))
            chosen = pick[gi, ai, ti]
            taken[gi, ai, ti, chosen] = True
            events.append((rows[gi], ai, ti, g_start[gi] + chosen))
    if not events:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    return tuple(np.concatenate([e[i] for e in events]).astype(np.int64) for i in range(4))


def _min_count_reaching(thresholds: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """Smallest integer ``c`` with ``c / n`` (float64 division) ``>= threshold``, shape (S, R)."""
    guess = np.ceil(thresholds[None, :] * n_pos[:, None]).astype(np.int64)
    candidates = np.maximum(guess[..., None] + np.arange(-2, 3), 0)
    reaches = (candidates / n_pos[:, None, None]) >= thresholds[None, :, None]
    first = np.argmax(reaches, axis=-1)
    count = np.take_along_axis(candidates, first[..., None], axis=-1)[..., 0]
    return np.where(reaches.any(axis=-1), count, np.iinfo(np.int64).max // 4)


def _interpolated_precision(tp_cum: np.ndarray, fp_cum: np.ndarray, seg_len: np.ndarray, n_pos: np.ndarray,
                            rec_thrs: np.ndarray, add_eps: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCO-style interpolated precision at ``rec_thrs`` for many PR curves at once.

    ``tp_cum``/``fp_cum`` are flat int arrays holding contiguous segments (one per curve, lengths
    ``seg_len > 0``, cumulative counts restarting at each segment); ``n_pos`` the positives per curve.
    Returns ``q`` (S, R) = ``max(precision[i_r:])`` or 0 when ``i_r`` is past the end, the flat position
    ``i_r`` (clipped into the segment) and whether ``i_r`` lies inside the segment, where ``i_r =
    searchsorted(recall, rec_thrs[r], 'left')`` -- the loop of COCOeval.accumulate / tidecv get_ap.
    """
    if rec_thrs[0] != 0:
        raise ValueError("the first recall threshold must be 0")  # keeps reduceat pieces in their segment
    n_seg = seg_len.shape[0]
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]]).astype(np.int64)
    tp_f = tp_cum.astype(np.float64)
    fp_f = fp_cum.astype(np.float64)
    precision = tp_f / (fp_f + tp_f + _EPS) if add_eps else tp_f / (tp_f + fp_f)
    # first i with tp[i] / n >= thr  <=>  first i with tp[i] >= c_thr (float division is monotone)
    need = _min_count_reaching(rec_thrs, n_pos)
    big = int(tp_cum.max()) + 2
    need = np.minimum(need, big - 1)
    segment_ids = np.arange(n_seg, dtype=np.int64)
    keys = np.repeat(segment_ids * big, seg_len) + tp_cum
    found = np.searchsorted(keys, (segment_ids[:, None] * big + need).ravel(), side="left").reshape(n_seg, -1)
    local = found - seg_start[:, None]
    inside = local < seg_len[:, None]
    position = seg_start[:, None] + np.minimum(local, seg_len[:, None] - 1)
    pieces = np.maximum.reduceat(precision, position.ravel()).reshape(n_seg, -1)
    envelope = np.maximum.accumulate(pieces[:, ::-1], axis=1)[:, ::-1]
    return np.where(inside, envelope, 0.0), position, inside


def _segmented_cumsum(flags: np.ndarray, seg_len: np.ndarray) -> np.ndarray:
    """Cumulative sum along the last axis restarting at each segment (int64, exact)."""
    total = np.cumsum(flags, axis=-1, dtype=np.int64)
    seg_end = np.cumsum(seg_len)
    before = np.zeros(flags.shape[:-1] + (seg_len.shape[0],), dtype=np.int64)
    before[..., 1:] = total[..., seg_end[:-1] - 1]
    return total - np.repeat(before, seg_len, axis=-1)


@dataclass
class CocoEvaluation:
    """Result of :func:`coco_evaluate`; array layouts follow pycocotools' ``COCOeval.eval``."""

    stats: np.ndarray  # (12,) as COCOeval.stats
    precision: np.ndarray  # (T, R, K, A, M)
    recall: np.ndarray  # (T, K, A, M)
    scores: np.ndarray  # (T, R, K, A, M)
    categories: np.ndarray  # (K,) class ids
    iou_thresholds: np.ndarray
    max_dets: tuple[int, ...]
    det_match: np.ndarray  # (T, n_det) GT row matched at area "all" / maxDets[-1], -1 if none
    det_ignored: np.ndarray  # (T, n_det) ignored (also True for detections not evaluated)
    det_evaluated: np.ndarray  # (n_det,) class evaluated and within the top maxDets[-1] of its group
    gt_match: np.ndarray  # (T, n_gt) detection row matched, -1 if none
    n_gt: np.ndarray = field(repr=False)  # (K,) GT count per category

    def per_class(self) -> pd.DataFrame:
        """AP per category (AP points in [0, 1] as in ``stats``); NaN where the category has no GT."""
        thr = self.iou_thresholds
        last = len(self.max_dets) - 1

        def mean_valid(values: np.ndarray) -> np.ndarray:
            # mean over entries > -1 per category, like summarize; values shaped (..., K) after moveaxis
            flat = values.reshape(-1, values.shape[-1])
            valid = flat > -1
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(valid.any(0), np.where(valid, flat, 0.0).sum(0) / valid.sum(0), np.nan)

        p = self.precision  # T, R, K, A, M
        columns = {"label": self.categories,
                   "ap": mean_valid(p[:, :, :, 0, last]),
                   "ap50": mean_valid(p[np.flatnonzero(thr == .5)][:, :, :, 0, last]),
                   "ap75": mean_valid(p[np.flatnonzero(thr == .75)][:, :, :, 0, last]),
                   "ap_small": mean_valid(p[:, :, :, 1, last]),
                   "ap_medium": mean_valid(p[:, :, :, 2, last]),
                   "ap_large": mean_valid(p[:, :, :, 3, last]),
                   "n_gt": self.n_gt}
        return pd.DataFrame(columns)


def _summarize(precision: np.ndarray, recall: np.ndarray, max_dets: Sequence[int]) -> np.ndarray:
    """COCOeval.summarize (_summarizeDets) with the same NumPy expressions."""
    iou_thrs = IOU_THRESHOLDS

    def one(ap: int, iou_thr: float | None = None, area: str = "all", max_det: int = 100) -> float:
        aind = [i for i, label in enumerate(AREA_LABELS) if label == area]
        mind = [i for i, m in enumerate(max_dets) if m == max_det]
        if ap == 1:
            s = precision
            if iou_thr is not None:
                s = s[np.where(iou_thr == iou_thrs)[0]]
            s = s[:, :, :, aind, mind]
        else:
            s = recall
            if iou_thr is not None:
                s = s[np.where(iou_thr == iou_thrs)[0]]
            s = s[:, :, aind, mind]
        return -1.0 if len(s[s > -1]) == 0 else float(np.mean(s[s > -1]))

    m = max_dets
    return np.array([one(1), one(1, .5, max_det=m[2]), one(1, .75, max_det=m[2]),
                     one(1, area="small", max_det=m[2]), one(1, area="medium", max_det=m[2]),
                     one(1, area="large", max_det=m[2]), one(0, max_det=m[0]), one(0, max_det=m[1]),
                     one(0, max_det=m[2]), one(0, area="small", max_det=m[2]),
                     one(0, area="medium", max_det=m[2]), one(0, area="large", max_det=m[2])])


def coco_evaluate(dets: Boxes, gts: Boxes, n_images: int, max_dets: Sequence[int] = (1, 10, 100),
                  categories: Sequence[int] | None = None) -> CocoEvaluation:
    """pycocotools ``COCOeval(iouType="bbox")`` evaluate + accumulate + summarize, vectorised.

    ``categories`` adds declared class ids to the evaluated set (the sorted union with the GT
    labels); a declared class without GT gets -1 everywhere, as in pycocotools. Detections of
    classes outside that set are ignored. ``max_dets`` must hold three values (summarize reads
    ``maxDets[0..2]``).
    """
    n_images = int(n_images)
    dets = _checked(dets, n_images, "dets", need_score=True)
    gts = _checked(gts, n_images, "gts", need_score=False)
    max_dets = tuple(sorted(int(m) for m in max_dets))
    if len(max_dets) != 3 or max_dets[0] < 1:
        raise ValueError("max_dets must hold three positive ints (summarize reads maxDets[0..2])")
    cat_ids = np.unique(gts.label if categories is None
                        else np.concatenate([gts.label, np.asarray(categories, dtype=np.int64)]))
    n_cat, n_det_in, n_gt_in = cat_ids.size, len(dets), len(gts)
    iou_thrs, rec_thrs, area_rng = IOU_THRESHOLDS, RECALL_THRESHOLDS, AREA_RANGES
    n_thr, n_rec, n_area, n_m = iou_thrs.size, rec_thrs.size, area_rng.shape[0], len(max_dets)
    cap = max_dets[-1]

    # ---- detections: evaluated classes, sorted per (image, category) by score (stable), capped
    det_cat = np.searchsorted(cat_ids, dets.label)
    # getAnnIds(catIds=params.catIds) drops detections of any other class
    candidates = np.flatnonzero(np.isin(dets.label, cat_ids))
    order = candidates[_order_by_key_then_score(dets.image[candidates] * n_cat + det_cat[candidates],
                                                dets.score[candidates])]
    det_key_sorted = dets.image[order] * n_cat + det_cat[order]
    rank_sorted = _rank_in_runs(det_key_sorted)
    keep = rank_sorted < cap
    det_row = order[keep]  # input rows of the evaluated detections, in group/rank order
    d_key, d_rank = det_key_sorted[keep], rank_sorted[keep]
    d_cat, d_score = det_cat[det_row], dets.score[det_row]
    d_xywh = _xywh(dets.box[det_row])
    d_area = d_xywh[:, 2] * d_xywh[:, 3]

    # ---- ground truth: sorted per (image, category), input order inside
    gt_cat = np.searchsorted(cat_ids, gts.label)
    gt_row = np.argsort(gts.image * max(n_cat, 1) + gt_cat, kind="stable")
    g_key = gts.image[gt_row] * n_cat + gt_cat[gt_row]
    g_cat = gt_cat[gt_row]
    g_xywh = _xywh(gts.box[gt_row])
    g_area = g_xywh[:, 2] * g_xywh[:, 3]
    lo, hi = area_rng[:, 0], area_rng[:, 1]
    g_in_range = ~((g_area[:, None] < lo[None, :]) | (g_area[:, None] > hi[None, :]))  # (n_gt, A)
    d_out_range = (d_area[:, None] < lo[None, :]) | (d_area[:, None] > hi[None, :])  # (n_det, A)

    # ---- matching, only for groups holding both detections and GT
    d_keys, d_starts, d_counts = _group_bounds(d_key)
    g_keys, g_starts, g_counts = _group_bounds(g_key)
    both = np.isin(d_keys, g_keys, assume_unique=True)
    g_pos = np.searchsorted(g_keys, d_keys[both])
    ev_det, ev_area, ev_thr, ev_gt = _greedy_match(d_xywh, g_xywh, g_in_range, d_starts[both], d_counts[both],
                                                   g_starts[g_pos], g_counts[g_pos],
                                                   np.minimum(iou_thrs, _MAX_IOU_THRESHOLD))
    ev_gt_ignored = ~g_in_range[ev_gt, ev_area]  # a detection matched to an ignored GT is ignored
    ev_det_out = d_out_range[ev_det, ev_area]

    # ---- accumulate
    precision = -np.ones((n_thr, n_rec, n_cat, n_area, n_m))
    recall = -np.ones((n_thr, n_cat, n_area, n_m))
    scores = -np.ones((n_thr, n_rec, n_cat, n_area, n_m))
    npig = np.zeros((n_cat, n_area), dtype=np.int64)
    for a in range(n_area):
        npig[:, a] = np.bincount(g_cat[g_in_range[:, a]], minlength=n_cat)
    # the concatenation order of accumulate: category, then stable sort on -score over image order
    # (rows are already in (image, category, rank) order, so ties in score keep (image, rank) order)
    acc_order = _order_by_key_then_score(d_cat, d_score)
    acc_position = np.empty(d_rank.size, dtype=np.int64)
    acc_position[acc_order] = np.arange(d_rank.size)
    # matches sorted once by (area, threshold, accumulate position); a maxDets subset keeps the order
    ev_sort = np.argsort((ev_area * n_thr + ev_thr) * max(d_rank.size, 1) + acc_position[ev_det])
    ev_det, ev_area, ev_thr, ev_gt = ev_det[ev_sort], ev_area[ev_sort], ev_thr[ev_sort], ev_gt[ev_sort]
    ev_gt_ignored, ev_det_out = ev_gt_ignored[ev_sort], ev_det_out[ev_sort]
    ev_cat, ev_rank = d_cat[ev_det], d_rank[ev_det]
    area_bounds = np.searchsorted(ev_area, np.arange(n_area + 1))
    position_in_m = np.empty(d_rank.size, dtype=np.int64)
    for m, max_det in enumerate(max_dets):
        sel = acc_order[d_rank[acc_order] < max_det]
        position_in_m[sel] = np.arange(sel.size)
        per_cat = np.bincount(d_cat[sel], minlength=n_cat)
        cat_start = np.cumsum(per_cat) - per_cat
        present = per_cat > 0
        first_score = np.zeros(n_cat)
        first_score[present] = d_score[sel[cat_start[present]]]
        for a in range(n_area):
            has_gt = npig[:, a] > 0
            # every category with GT gets values (0 until a TP says otherwise); recall threshold 0
            # always lands on the category's first detection, whatever it is
            precision[:, :, has_gt, a, m] = 0.0
            recall[:, has_gt, a, m] = 0.0
            scores[:, :, has_gt, a, m] = 0.0
            scores[:, 0, has_gt & present, a, m] = first_score[has_gt & present]
            block = slice(area_bounds[a], area_bounds[a + 1])
            in_m = ev_rank[block] < max_det
            e_det, e_thr, e_cat = ev_det[block][in_m], ev_thr[block][in_m], ev_cat[block][in_m]
            if e_det.size == 0:
                continue
            # Only TP positions matter: between two TPs precision only falls (fp grows) or stays
            # (ignored), so max(pr[i:]) is a max over TPs and every searchsorted hit with c_r >= 1 is
            # the c_r-th TP; fp at a TP = position + 1 - tp - ignored-so-far.
            e_pos = position_in_m[e_det]
            e_gt_ignored = ev_gt_ignored[block][in_m]
            e_tp = ~e_gt_ignored
            # ignored so far = unmatched out-of-range ones: all out-of-range ones, minus the matched
            # out-of-range ones, plus the ones matched to an ignored GT
            e_weight = e_gt_ignored.astype(np.int64) - ev_det_out[block][in_m]
            _, _, e_len = _group_bounds(e_thr * n_cat + e_cat)
            weight_cum = _segmented_cumsum(e_weight, e_len)[e_tp]
            tp_cum = _segmented_cumsum(e_tp, e_len)[e_tp]
            t_pos, t_cat, t_thr = e_pos[e_tp], e_cat[e_tp], e_thr[e_tp]
            if t_pos.size == 0:
                continue
            out_cum = np.cumsum(d_out_range[sel, a], dtype=np.int64)
            out_before = np.where(cat_start > 0, out_cum[np.maximum(cat_start - 1, 0)], 0)
            ignored_cum = out_cum[t_pos] - out_before[t_cat] + weight_cum
            fp_cum = (t_pos - cat_start[t_cat] + 1) - tp_cum - ignored_cum
            keys, _, t_len = _group_bounds(t_thr * n_cat + t_cat)
            k_thr, k_cat = keys // n_cat, keys % n_cat
            n_pos = npig[k_cat, a]
            q, position, inside = _interpolated_precision(tp_cum, fp_cum, t_len, n_pos, rec_thrs, add_eps=True)
            score_at = np.where(inside, d_score[sel[t_pos[position]]], 0.0)
            score_at[:, 0] = first_score[k_cat]
            precision[k_thr, :, k_cat, a, m] = q
            scores[k_thr, :, k_cat, a, m] = score_at
            recall[k_thr, k_cat, a, m] = tp_cum[np.cumsum(t_len) - 1] / n_pos

    stats = _summarize(precision, recall, max_dets)

    # ---- per-detection / per-GT matching at area "all", maxDets[-1], in input row numbering
    det_match = np.full((n_thr, n_det_in), -1, dtype=np.int64)
    det_ignored = np.ones((n_thr, n_det_in), dtype=bool)
    det_evaluated = np.zeros(n_det_in, dtype=bool)
    det_evaluated[det_row] = True
    det_ignored[:, det_row] = d_out_range[None, :, 0]
    at_all = ev_area == 0
    match_thr, match_det, match_gt = ev_thr[at_all], det_row[ev_det[at_all]], gt_row[ev_gt[at_all]]
    det_match[match_thr, match_det] = match_gt
    det_ignored[match_thr, match_det] = ev_gt_ignored[at_all]
    gt_match = np.full((n_thr, n_gt_in), -1, dtype=np.int64)
    gt_match[match_thr, match_gt] = match_det
    n_gt = np.bincount(gt_cat, minlength=n_cat) if n_gt_in else np.zeros(n_cat, dtype=np.int64)
    return CocoEvaluation(stats=stats, precision=precision, recall=recall, scores=scores, categories=cat_ids,
                          iou_thresholds=iou_thrs, max_dets=max_dets, det_match=det_match,
                          det_ignored=det_ignored, det_evaluated=det_evaluated, gt_match=gt_match, n_gt=n_gt)


@dataclass
class MatchResult:
    """Class-aware COCO greedy matching at one IoU threshold (input row numbering)."""

    det_gt: np.ndarray  # (n_det,) matched GT row or -1
    det_iou: np.ndarray  # (n_det,) IoU with the matched GT, 0.0 when unmatched
    det_best_iou: np.ndarray  # (n_det,) best IoU with any same-class GT of the image (0.0 if none)
    gt_det: np.ndarray  # (n_gt,) matched detection row or -1


def match_detections(dets: Boxes, gts: Boxes, iou_threshold: float = 0.5,
                     max_dets: int | None = None) -> MatchResult:
    """COCO greedy matching (evaluateImg, area "all"): per (image, class), detections by score
    (stable), each takes the free GT with the highest IoU ``>= min(iou_threshold, 1 - 1e-10)``, ties
    to the later GT. ``max_dets`` caps the detections per (image, class) like ``maxDets[-1]``."""
    n_images = int(max(np.max(dets.image, initial=-1), np.max(gts.image, initial=-1))) + 1
    dets = _checked(dets, n_images, "dets", need_score=True)
    gts = _checked(gts, n_images, "gts", need_score=False)
    n_det, n_gt = len(dets), len(gts)
    labels = np.unique(np.concatenate([dets.label, gts.label]))
    n_lab = max(labels.size, 1)
    d_key_all = dets.image * n_lab + np.searchsorted(labels, dets.label)
    g_key_all = gts.image * n_lab + np.searchsorted(labels, gts.label)
    order = _order_by_key_then_score(d_key_all, dets.score)
    d_key = d_key_all[order]
    if max_dets is not None:
        keep = _rank_in_runs(d_key) < int(max_dets)
        order, d_key = order[keep], d_key[keep]
    g_order = np.argsort(g_key_all, kind="stable")
    g_key = g_key_all[g_order]
    d_xywh, g_xywh = _xywh(dets.box[order]), _xywh(gts.box[g_order])
    d_keys, d_starts, d_counts = _group_bounds(d_key)
    g_keys, g_starts, g_counts = _group_bounds(g_key)
    both = np.isin(d_keys, g_keys, assume_unique=True)
    g_pos = np.searchsorted(g_keys, d_keys[both])
    in_range = np.ones((n_gt, 1), dtype=bool)
    thr = np.array([min(float(iou_threshold), _MAX_IOU_THRESHOLD)])
    ev_det, _, _, ev_gt = _greedy_match(d_xywh, g_xywh, in_range, d_starts[both], d_counts[both],
                                        g_starts[g_pos], g_counts[g_pos], thr)
    det_gt = np.full(n_det, -1, dtype=np.int64)
    det_gt[order[ev_det]] = g_order[ev_gt]
    det_iou = np.zeros(n_det)
    hit = np.flatnonzero(det_gt >= 0)
    det_iou[hit] = _bb_iou(_xywh(dets.box[hit]), _xywh(gts.box[det_gt[hit]]))
    gt_det = np.full(n_gt, -1, dtype=np.int64)
    gt_det[det_gt[hit]] = hit
    # best same-class IoU per detection, over its (image, class) group, via the padded pair layout
    det_best = np.zeros(n_det)
    for members, width in _buckets_by_width(g_counts[g_pos], d_counts[both]):
        starts, counts = d_starts[both][members], d_counts[both][members]
        rows = np.repeat(starts, counts) + _rank_in_runs(np.repeat(np.arange(members.size), counts))
        group = np.repeat(np.arange(members.size), counts)
        slot_idx = np.arange(width)
        valid = slot_idx[None, :] < g_counts[g_pos][members][group][:, None]
        gt_rows = np.where(valid, g_starts[g_pos][members][group][:, None] + slot_idx[None, :], 0)
        iou = np.where(valid, _bb_iou(d_xywh[rows][:, None, :], g_xywh[gt_rows]), 0.0)
        det_best[order[rows]] = iou.max(axis=1)
    return MatchResult(det_gt=det_gt, det_iou=det_iou, det_best_iou=det_best, gt_det=gt_det)
