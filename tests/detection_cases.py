"""Random 2D detection cases for the tests that compare with pycocotools and tidecv."""

from __future__ import annotations

import numpy as np

from mldbg_callbacks.evaluation.coco import Boxes


def xywh(box: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] -> [x, y, w, h], the form pycocotools and tidecv take."""
    return np.stack([box[:, 0], box[:, 1], box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], axis=1)


def random_case(rng: np.random.Generator, n_images: int = 12, n_classes: int = 4, gt_per_image: float = 3.0,
                dets_per_image: float = 10.0, score_decimals: int = 2, tiny: bool = False,
                boundary: bool = False, crowded: int = 0, absent_classes: int = 0,
                duplicates: bool = True, exact_fraction: float = 0.0) -> tuple[Boxes, Boxes, int]:
    """Random GT; detections = jittered GT copies (class flips, duplicates) + background boxes.

    ``boundary``: GT sizes on COCO's area-range boundaries (30% exact copies among the detections);
    ``exact_fraction``: share of detections that are exact copies of a GT box (IoU 1: TIDE's Dupe);
    ``crowded``: one image with that many detections of one class (beyond maxDets)."""
    n_gt = int(rng.poisson(gt_per_image * n_images))
    g_image = rng.integers(0, n_images, n_gt)
    g_label = rng.integers(0, n_classes, n_gt)
    lo, hi = (0.05, 3.0) if tiny else (2.0, 150.0)
    wh = np.exp(rng.uniform(np.log(lo), np.log(hi), (n_gt, 2)))
    xy = rng.uniform(0, 200, (n_gt, 2))
    if boundary and n_gt:
        # exact area-range boundaries (32^2, 96^2) and zero-size boxes, on integer coordinates
        pick = rng.random(n_gt) < 0.5
        choices = np.array([[32, 32], [16, 64], [96, 96], [48, 192], [0, 5], [31, 33], [97, 95]], dtype=float)
        wh[pick] = choices[rng.integers(0, len(choices), pick.sum())]
        xy[pick] = np.round(xy[pick])
    g_box = np.concatenate([xy, xy + wh], axis=1)

    n_copy = int(rng.poisson(dets_per_image * n_images * 0.6)) if n_gt else 0
    src = rng.integers(0, max(n_gt, 1), n_copy)
    scale = rng.uniform(0, 0.35, (n_copy, 1)) * np.tile(wh[src], 2)
    c_box = g_box[src] + rng.normal(0, 1, (n_copy, 4)) * scale
    exact = rng.random(n_copy) < (0.3 if boundary else exact_fraction)  # exact copies of GT boxes
    c_box[exact] = g_box[src[exact]]
    c_box = np.concatenate([np.minimum(c_box[:, :2], c_box[:, 2:]), np.maximum(c_box[:, :2], c_box[:, 2:])], 1)
    c_label = np.where(rng.random(n_copy) < 0.2, rng.integers(0, n_classes, n_copy), g_label[src])
    n_bg = int(rng.poisson(dets_per_image * n_images * 0.4))
    b_xy = rng.uniform(0, 200, (n_bg, 2))
    b_box = np.concatenate([b_xy, b_xy + np.exp(rng.uniform(np.log(lo), np.log(hi), (n_bg, 2)))], axis=1)
    d_box = np.concatenate([c_box, b_box])
    d_image = np.concatenate([g_image[src], rng.integers(0, n_images, n_bg)])
    d_label = np.concatenate([c_label, rng.integers(0, n_classes + absent_classes, n_bg)])
    if crowded:
        # one image with `crowded` detections of one class: more than maxDets per (image, category)
        xy_c = rng.uniform(0, 200, (crowded, 2))
        d_box = np.concatenate([d_box, np.concatenate([xy_c, xy_c + rng.uniform(5, 80, (crowded, 2))], 1)])
        d_image = np.concatenate([d_image, np.zeros(crowded, dtype=np.int64)])
        d_label = np.concatenate([d_label, np.zeros(crowded, dtype=np.int64)])
    score = np.round(rng.random(len(d_box)), score_decimals)
    if duplicates and len(d_box):
        # exact duplicates (same box, class and score) of some detections
        dup = rng.integers(0, len(d_box), len(d_box) // 10)
        d_box, d_image = np.concatenate([d_box, d_box[dup]]), np.concatenate([d_image, d_image[dup]])
        d_label, score = np.concatenate([d_label, d_label[dup]]), np.concatenate([score, score[dup]])
    perm = rng.permutation(len(d_box))
    return (Boxes(d_image[perm], d_label[perm], d_box[perm], score[perm]), Boxes(g_image, g_label, g_box),
            n_images)
