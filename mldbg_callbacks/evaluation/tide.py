"""TIDE error analysis for bounding boxes (tidecv 1.0.1, ``TIDE.BOX`` mode), vectorised with NumPy.

:func:`tide_errors` gives every detection its tidecv error type (TP, Cls, Loc, Both, Dupe, Bkg) and
every GT whether it was found (TP), missed (Miss) or explained by a Cls/Loc error (""), and computes
tidecv's base AP50 and the dAP of each error type the way tidecv does: fix the errors of one type,
recompute AP with tidecv's AP routine, ``dAP = max(fixed AP - AP, 0)``; plus the special FalsePos
and FalseNeg dAPs. Counts and dAPs equal tidecv's (``TIDE.evaluate`` + ``get_main_errors`` /
``get_special_errors``) for data loaded with every image registered in order, as
``tidecv.datasets.COCO`` does.

Algorithm, and why each step is identical to tidecv
---------------------------------------------------
Per image (``TIDEExample``), all classes together:

1. Detections sorted by score, stable (Python's ``list.sort`` keeps insertion order on ties), and cut
   to the first ``max_dets`` (100, ``Data.max_dets``) per image. IoU is maskApi's ``bbIou`` on the
   ``[x, y, w, h]`` boxes (shared with :mod:`.coco`, same float expressions).
2. Matching: each detection in score order takes, among the same-class GT not yet used, the first GT
   (``np.argmax``: ties to the *first*) of maximal IoU if that IoU is ``>= pos_threshold``. Looped
   over the detection rank (<= 100) and vectorised over images; images are bucketed by GT count
   (padded to a power of two; padding IoU is -1 so it never wins an ``argmax``).
3. Error type of each unmatched detection, in tidecv's order: no GT in the image -> Bkg; best
   same-class IoU (over all GT, used or not) in ``[bg, pos]`` -> Loc (target: that GT); best
   other-class IoU ``>= pos`` -> Cls (target: that GT); best IoU with a *used* same-class GT ``>= pos``
   -> Dupe; best IoU with any GT ``<= bg`` -> Bkg; else Both. ``argmax`` picks the first maximum, as
   tidecv does on the same matrices (multiplying by 0/1 masks is exact, so ``np.where`` is equal).
4. ``BestGTMatch``: among the Loc and Cls errors pointing at an *unused* GT, the one with the highest
   score (first in rank order) is the one that fixing turns into a TP; the others are suppressed.
   Such a GT is "usable"; a GT neither used nor usable is a Miss.
5. AP (``APDataObject.get_ap``): per class, points sorted by ``-score`` (stable), ``precision =
   tp / (tp + fp)``, ``recall = tp / n_gt``, envelope, value at ``searchsorted(recall, x / 100)``,
   ``sum(y) / 101 * 100``; mAP = mean over non-empty classes (a class with detections but no GT
   counts as 0). All 9 curve families (base, six fixes, FalsePos, FalseNeg) are sorted with one
   ``lexsort`` and interpolated together (:func:`.coco._interpolated_precision`). Ties in score are
   broken in tidecv's insertion order: base points by (image, rank); in ``fix_errors`` the error
   points are pushed first and the correct ones after, so their tie order is (is_correct, image,
   rank). The 101-term sums and the class means use Python's ``sum`` over the values in tidecv's
   order (class order: first touch in the base data; errors first for the fixed data), so the floats
   match bit for bit.

Not supported (the flat input cannot express them): ignore regions / crowd GT, mask mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coco import Boxes, _bb_iou, _buckets_2d, _checked, _group_bounds, _interpolated_precision, \
    _rank_in_runs, _xywh

__all__ = ["ERROR_TYPES", "MAIN_ERRORS", "SPECIAL_ERRORS", "TideEvaluation", "tide_errors"]

# det_error codes: index into ERROR_TYPES ("" = detection not evaluated: beyond max_dets in its image)
ERROR_TYPES = ("TP", "Cls", "Loc", "Both", "Dupe", "Bkg")
_TP, _CLS, _LOC, _BOTH, _DUPE, _BKG = range(6)
MAIN_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")  # tidecv's TIDE._error_types order
SPECIAL_ERRORS = ("FalsePos", "FalseNeg")
# tidecv's x_range: Python divisions, not np.linspace (the bits differ for some thresholds)
_TIDE_RECALLS = np.array([x / 100 for x in range(101)])


@dataclass
class TideEvaluation:
    """Result of :func:`tide_errors` (input row numbering for detections and GT)."""

    det_error: np.ndarray  # (n_det,) str: TP, Cls, Loc, Both, Dupe, Bkg; "" when not evaluated
    det_target_gt: np.ndarray  # (n_det,) GT row: matched GT (TP), error target (Cls/Loc/Dupe), else -1
    det_fixes_gt: np.ndarray  # (n_det,) True for the Cls/Loc error that fixing turns into a TP
    gt_error: np.ndarray  # (n_gt,) str: "TP", "Miss", or "" when a Cls/Loc error explains the GT
    ap: float  # tidecv's base AP at pos_threshold, in AP points (0-100)
    main_dap: dict[str, float]  # see dap()
    special_errors_dap: dict[str, float]  # see special_dap()

    def counts(self) -> dict[str, int]:
        """Number of errors per type, as tidecv's ``count_errors`` (no TP entry)."""
        out = {name: int(np.count_nonzero(self.det_error == name)) for name in MAIN_ERRORS[:-1]}
        out["Miss"] = int(np.count_nonzero(self.gt_error == "Miss"))
        return out

    def dap(self) -> dict[str, float]:
        """dAP per main error type in AP points, as tidecv's ``get_main_errors``."""
        return dict(self.main_dap)

    def special_dap(self) -> dict[str, float]:
        """FalsePos / FalseNeg dAP in AP points, as tidecv's ``get_special_errors``."""
        return dict(self.special_errors_dap)


def _first_max(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.argmax`` (first maximum) along the last axis, and the maximum."""
    idx = np.argmax(values, axis=-1)
    return idx, np.take_along_axis(values, idx[..., None], axis=-1)[..., 0]


def tide_errors(dets: Boxes, gts: Boxes, n_images: int, pos_threshold: float = 0.5,
                background_threshold: float = 0.1, max_dets: int = 100) -> TideEvaluation:
    """tidecv's bbox error analysis (``TIDE().evaluate(gt, preds, mode=TIDE.BOX)``), vectorised.

    All ``n_images`` images are evaluated (tidecv evaluates the images registered in the GT data;
    ``tidecv.datasets.COCO`` registers every image of the annotation file, in file order). Only the
    first ``max_dets`` detections by score of each image are evaluated (``Data.max_dets``); the
    others get ``det_error == ""``. An AP over no non-empty class (where tidecv raises
    ``ZeroDivisionError``, e.g. fixing Bkg when there is no GT at all) is NaN.
    """
    n_images = int(n_images)
    dets = _checked(dets, n_images, "dets", need_score=True)
    gts = _checked(gts, n_images, "gts", need_score=False)
    pos, bg = float(pos_threshold), float(background_threshold)
    n_det_in, n_gt_in = len(dets), len(gts)

    # ---- per image: detections by score (stable), first max_dets; GT in input order
    by_score = np.argsort(-dets.score, kind="stable")
    order = by_score[np.argsort(dets.image[by_score], kind="stable")]
    # dense descending score rank (equal scores share a rank), reused for the AP sort keys
    sorted_scores = dets.score[by_score]
    score_rank_all = np.empty(n_det_in, dtype=np.int64)
    score_rank_all[by_score] = np.cumsum(np.concatenate([[False], sorted_scores[1:] != sorted_scores[:-1]]))
    rank_all = _rank_in_runs(dets.image[order])
    det_row = order[rank_all < max_dets]  # evaluated detections in (image, rank) order
    d_image, d_label, d_score_rank = dets.image[det_row], dets.label[det_row], score_rank_all[det_row]
    d_xywh = _xywh(dets.box[det_row])
    gt_row = np.argsort(gts.image, kind="stable")
    g_image, g_label = gts.image[gt_row], gts.label[gt_row]
    g_xywh = _xywh(gts.box[gt_row])
    n_det, n_gt = det_row.size, gt_row.size

    d_keys, d_starts, d_counts = _group_bounds(d_image)
    g_keys, g_starts, g_counts = _group_bounds(g_image)
    both = np.isin(d_keys, g_keys, assume_unique=True)
    g_pos = np.searchsorted(g_keys, d_keys[both])
    grp_d_start, grp_d_count = d_starts[both], d_counts[both]
    grp_g_start, grp_g_count = g_starts[g_pos], g_counts[g_pos]

    error = np.full(n_det, _BKG, dtype=np.int8)  # images without GT: every detection is Bkg
    target = np.full(n_det, -1, dtype=np.int64)  # sorted-GT index
    gt_used = np.zeros(n_gt, dtype=bool)
    for members, width, depth in _buckets_2d(grp_g_count, grp_d_count):
        # dense (images, depth, width) block: detection ranks x GT slots, padding masked
        g_valid = np.arange(width)[None, :] < grp_g_count[members][:, None]
        d_valid = np.arange(depth)[None, :] < grp_d_count[members][:, None]
        g_rows = np.where(g_valid, grp_g_start[members][:, None] + np.arange(width)[None, :], 0)
        d_rows = np.where(d_valid, grp_d_start[members][:, None] + np.arange(depth)[None, :], 0)
        iou = _bb_iou(d_xywh[d_rows][:, :, None, :], g_xywh[g_rows][:, None, :, :])
        same = d_label[d_rows][:, :, None] == g_label[g_rows][:, None, :]
        slot_ok = g_valid[:, None, :]
        cls_iou = np.where(slot_ok, np.where(same, iou, 0.0), -1.0)  # tidecv's gt_cls_iou; padding -1

        # greedy matching by rank, all images of the chunk at once
        taken = np.zeros((members.size, width), dtype=bool)
        det_used = np.zeros((members.size, depth), dtype=bool)
        det_slot = np.zeros((members.size, depth), dtype=np.int64)
        for rank in range(int(grp_d_count[members].max())):
            buffer = np.where(taken, 0.0, cls_iou[:, rank, :])  # iou_buffer[:, used] = 0
            best, best_iou = _first_max(buffer)
            hit = np.flatnonzero((best_iou >= pos) & d_valid[:, rank])
            taken[hit, best[hit]] = True
            det_used[hit, rank] = True
            det_slot[hit, rank] = best[hit]
        gt_used[g_rows[taken]] = True

        # error types of the unmatched detections, first test that applies wins
        loc_idx, loc_iou = _first_max(cls_iou)
        cls_idx, cls_max = _first_max(np.where(slot_ok, np.where(same, 0.0, iou), -1.0))
        dupe_idx, dupe_max = _first_max(np.where(slot_ok, np.where(same & taken[:, None, :], iou, 0.0), -1.0))
        any_max = np.where(slot_ok, iou, -1.0).max(axis=-1)
        is_loc = (bg <= loc_iou) & (loc_iou <= pos)
        is_cls = ~is_loc & (cls_max >= pos)
        is_dupe = ~is_loc & ~is_cls & (dupe_max >= pos)
        is_bkg = ~is_loc & ~is_cls & ~is_dupe & (any_max <= bg)
        code = np.select([det_used, is_loc, is_cls, is_dupe, is_bkg], [_TP, _LOC, _CLS, _DUPE, _BKG], _BOTH)
        slot = np.select([det_used, is_loc, is_cls, is_dupe], [det_slot, loc_idx, cls_idx, dupe_idx], -1)
        slot_gt = np.where(slot >= 0, np.take_along_axis(g_rows, np.maximum(slot, 0), axis=1), -1)
        error[d_rows[d_valid]] = code[d_valid]
        target[d_rows[d_valid]] = slot_gt[d_valid]

    # ---- BestGTMatch: the first (highest-score) Cls/Loc error on each unused GT is the fixable one
    fix_candidate = np.flatnonzero(((error == _CLS) | (error == _LOC)) & (target >= 0))
    fix_candidate = fix_candidate[~gt_used[target[fix_candidate]]]
    gt_usable = np.zeros(n_gt, dtype=bool)
    gt_usable[target[fix_candidate]] = True
    first_on_gt = np.full(n_gt, n_det, dtype=np.int64)
    np.minimum.at(first_on_gt, target[fix_candidate], fix_candidate)  # rows are in (image, rank) order
    fixes = np.zeros(n_det, dtype=bool)
    fixes[fix_candidate] = first_on_gt[target[fix_candidate]] == fix_candidate
    gt_missed = ~gt_used & ~gt_usable

    ap, dap, special = _tide_aps(d_image, d_label, d_score_rank, error, target, fixes, g_image, g_label,
                                 gt_used, gt_missed)

    det_error = np.full(n_det_in, "", dtype="<U4")
    det_error[det_row] = np.asarray(ERROR_TYPES)[error]
    det_target_gt = np.full(n_det_in, -1, dtype=np.int64)
    det_target_gt[det_row[target >= 0]] = gt_row[target[target >= 0]]
    det_fixes_gt = np.zeros(n_det_in, dtype=bool)
    det_fixes_gt[det_row] = fixes
    gt_error = np.full(n_gt_in, "", dtype="<U4")
    gt_error[gt_row[gt_used]] = "TP"
    gt_error[gt_row[gt_missed]] = "Miss"
    return TideEvaluation(det_error=det_error, det_target_gt=det_target_gt, det_fixes_gt=det_fixes_gt,
                          gt_error=gt_error, ap=ap, main_dap=dap, special_errors_dap=special)


def _tide_aps(d_image: np.ndarray, d_label: np.ndarray, score_rank: np.ndarray,
              error: np.ndarray, target: np.ndarray, fixes: np.ndarray, g_image: np.ndarray,
              g_label: np.ndarray, gt_used: np.ndarray, gt_missed: np.ndarray
              ) -> tuple[float, dict[str, float], dict[str, float]]:
    """Base AP, main dAPs and special dAPs with tidecv's ``fix_errors`` / ``get_ap`` semantics.

    Detection rows arrive in (image, rank) order, which is both tidecv's ``ap_data`` insertion order
    and its ``errors`` list order, so the row index breaks score ties the way tidecv does. Only the
    true points of each curve are materialised: between two true points precision only falls, so
    ``max(precision[i:])`` is a max over true points and each ``searchsorted`` hit with a positive
    count is a true point; the false points before a true point are counted with ``searchsorted``.
    """
    names = ("base",) + MAIN_ERRORS + SPECIAL_ERRORS  # curve families: base, six fixes, two specials
    n_sc = len(names)
    classes = np.unique(np.concatenate([g_label, d_label]))
    n_cls = classes.size
    if n_cls == 0:
        nan = float("nan")
        return nan, {k: nan for k in MAIN_ERRORS}, {k: nan for k in SPECIAL_ERRORS}
    d_cls = np.searchsorted(classes, d_label)
    g_cls = np.searchsorted(classes, g_label)
    n_det = d_label.size
    is_tp = error == _TP
    gt_per_class = np.bincount(g_cls, minlength=n_cls)
    fixed_class = d_cls.copy()  # a fixed Cls error moves to its target GT's class
    cls_rows = np.flatnonzero((error == _CLS) & (target >= 0))
    fixed_class[cls_rows] = np.searchsorted(classes, g_label[target[cls_rows]])

    # base class order = first touch in ap_data: per image its GT (add_gt_positives) then its detections
    ev_image = np.concatenate([g_image, d_image])
    ev_kind = np.concatenate([np.zeros(g_image.size, np.int64), np.ones(n_det, np.int64)])
    ev_cls = np.concatenate([g_cls, d_cls])
    first_event = np.full(n_cls, ev_cls.size, dtype=np.int64)
    # both parts are already in (image, position) order: a stable sort on (image, kind) merges them
    np.minimum.at(first_event, ev_cls[np.argsort(ev_image * 2 + ev_kind, kind="stable")], np.arange(ev_cls.size))
    base_rank = np.empty(n_cls, dtype=np.int64)
    base_rank[np.argsort(first_event, kind="stable")] = np.arange(n_cls)

    # scores as dense descending ranks (0 = highest), so (class, score, row) fits one int64 sort key
    n_ranks = int(score_rank.max(initial=0)) + 1
    stride = n_det + 1

    def key(cls: np.ndarray, rank: np.ndarray, row_or_after: np.ndarray) -> np.ndarray:
        return (cls * n_ranks + rank) * stride + row_or_after

    # false points of the base curve (every non-TP detection), sorted, overall and per error type
    # (filtering a sorted array keeps it sorted)
    false_rows = np.flatnonzero(~is_tp)
    false_keys = np.sort(key(d_cls[false_rows], score_rank[false_rows], false_rows))
    false_type = error[false_keys % stride]
    false_by_type = {code: false_keys[false_type == code] for code in (_CLS, _LOC, _BOTH, _DUPE, _BKG)}
    removed_by_name = {"Cls": _CLS, "Loc": _LOC, "Both": _BOTH, "Dupe": _DUPE, "Bkg": _BKG}
    class_first_key = key(np.arange(n_cls), np.zeros(n_cls, np.int64), np.zeros(n_cls, np.int64))

    def false_before(sorted_keys: np.ndarray, cls: np.ndarray, rank: np.ndarray, rows: np.ndarray,
                     after_ties: np.ndarray) -> np.ndarray:
        """False points of the same class preceding each true point: higher score, or equal score and
        earlier row -- or every equal score when the true point comes after the ties (a correct point
        re-pushed after the errors in fix_errors)."""
        query = key(cls, rank, np.where(after_ties, n_det, rows))
        query_order = np.argsort(query)  # sorted queries make the binary searches cache-friendly
        before = np.empty(query.size, dtype=np.int64)
        before[query_order] = np.searchsorted(sorted_keys, query[query_order])
        return before - np.searchsorted(sorted_keys, class_first_key)[cls]

    n_gt_pos = np.tile(gt_per_class, (n_sc, 1))
    n_false = np.tile(np.bincount(d_cls[false_rows], minlength=n_cls), (n_sc, 1))
    first_error_row = np.full((n_sc, n_cls), np.iinfo(np.int64).max, dtype=np.int64)
    min_row_by_type = {}
    for code, rows_of in ((c, false_rows[error[false_rows] == c]) for c in (_CLS, _LOC, _BOTH, _DUPE, _BKG)):
        min_row_by_type[code] = np.full(n_cls, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(min_row_by_type[code], d_cls[rows_of], rows_of)
    tp_rows = np.flatnonzero(is_tp)
    sc_parts, cls_parts, rank_parts, phase_parts, row_parts, fp_parts = [], [], [], [], [], []
    for s, name in enumerate(names):
        rows, cls, phase = tp_rows, d_cls[tp_rows], np.full(tp_rows.size, int(s > 0))
        removed = removed_by_name.get(name)
        if name in ("Cls", "Loc"):
            fixed_rows = np.flatnonzero(fixes & (error == removed))
            rows = np.concatenate([rows, fixed_rows])
            cls = np.concatenate([cls, fixed_class[fixed_rows]])
            phase = np.concatenate([phase, np.zeros(fixed_rows.size, np.int64)])  # pushed with the errors
            np.minimum.at(first_error_row[s], fixed_class[fixed_rows], fixed_rows)
        if name == "Miss":
            n_gt_pos[s] -= np.bincount(g_cls[gt_missed], minlength=n_cls)
        if name == "FalseNeg":
            n_gt_pos[s] -= np.bincount(g_cls[~gt_used], minlength=n_cls)
        if s > 0:
            for code, min_rows in min_row_by_type.items():
                if code != removed:
                    first_error_row[s] = np.minimum(first_error_row[s], min_rows)
        rank = score_rank[rows]
        if name == "FalsePos":
            # scores become 1 (correct) / 0 (errors): every true point precedes every false point
            fp = np.zeros(rows.size, dtype=np.int64)
            rank = np.zeros(rows.size, dtype=np.int64)
        else:
            fp = false_before(false_keys, cls, rank, rows, phase == 1)
            if removed is not None:
                fp = fp - false_before(false_by_type[removed], cls, rank, rows, phase == 1)
                n_false[s] -= np.bincount(d_cls[false_rows[error[false_rows] == removed]], minlength=n_cls)
        sc_parts.append(np.full(rows.size, s, dtype=np.int64))
        cls_parts.append(cls)
        rank_parts.append(rank)
        phase_parts.append(phase)
        row_parts.append(rows)
        fp_parts.append(fp)
    p_sc, p_cls = np.concatenate(sc_parts), np.concatenate(cls_parts)
    p_rank, p_phase = np.concatenate(rank_parts), np.concatenate(phase_parts)
    p_row, p_fp = np.concatenate(row_parts), np.concatenate(fp_parts)
    # true points in curve order: (family, class, -score, pushed-after-errors, row)
    srt = np.argsort(((((p_sc * n_cls + p_cls) * n_ranks + p_rank) * 2 + p_phase) * stride + p_row))
    p_sc, p_cls, p_fp = p_sc[srt], p_cls[srt], p_fp[srt]
    n_true = np.bincount(p_sc * n_cls + p_cls, minlength=n_sc * n_cls).reshape(n_sc, n_cls)
    n_points = n_true + n_false

    ap_table = np.zeros((n_sc, n_cls))  # AP 0 for classes without GT positives or true points
    with_gt = n_gt_pos[p_sc, p_cls] > 0
    keys, _, seg_len = _group_bounds((p_sc * n_cls + p_cls)[with_gt])
    if keys.size:
        tp_cum = _rank_in_runs(np.repeat(keys, seg_len)) + 1
        seg_sc, seg_cls = keys // n_cls, keys % n_cls
        q, _, _ = _interpolated_precision(tp_cum, p_fp[with_gt], seg_len, n_gt_pos[seg_sc, seg_cls],
                                          _TIDE_RECALLS, add_eps=False)
        # Python's sum over the 101 values, in order, as get_ap does
        ap_table[seg_sc, seg_cls] = [sum(values) / len(values) * 100 for values in q.tolist()]

    # each family's class order in ap_data, then the mean over non-empty classes in that order:
    # fix_errors pushes error points first (error-list order), then correct points and GT counts
    # class by class in base order
    has_correct = np.bincount(d_cls[tp_rows], minlength=n_cls) > 0
    maps = []
    for s in range(n_sc):
        if s == 0:
            class_order = np.argsort(base_rank)
        else:
            has_error_point = first_error_row[s] < np.iinfo(np.int64).max
            group = np.where(has_error_point, 0, np.where(has_correct, 1, 2))
            class_order = np.lexsort((base_rank, np.where(has_error_point, first_error_row[s], 0), group))
        non_empty = (n_points[s] > 0) | (n_gt_pos[s] > 0)
        values = [float(ap_table[s, c]) for c in class_order if non_empty[c]]
        maps.append(sum(values) / len(values) if values else float("nan"))
    base = maps[0]
    dap = {name: max(maps[1 + i] - base, 0) for i, name in enumerate(MAIN_ERRORS)}
    special = {name: maps[1 + len(MAIN_ERRORS) + i] - base for i, name in enumerate(SPECIAL_ERRORS)}
    return base, dap, special
