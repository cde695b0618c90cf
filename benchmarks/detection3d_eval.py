"""Benchmark: vectorised nuScenes detection metrics against nuscenes-devkit's accumulate/calc_ap/calc_tp.

Synthetic nuScenes-val-sized data (by default 6,000 frames, 10 classes, ~40 GT and 300 predictions
per frame): GT boxes scattered around the ego vehicle (+-50 m) with class-typical sizes and random
velocities; predictions are jittered copies of the GT (centre noise growing with distance, size,
yaw noise with some 180-degree flips, velocity noise, class flips, duplicates) plus background boxes,
with scores correlated with the centre error, so mAP/NDS are in a realistic range. Prints one JSON
object.

Timed work, per side: for every class, ``accumulate`` at each of the 4 distance thresholds, then
``calc_ap`` for each and ``calc_tp`` for the 4 TP metrics at 2 m (the devkit's ``DetectionEval``
reuses the 2 m metric data, so 40 ``accumulate`` calls). Ours is one ``nuscenes_evaluate`` call,
which also produces mAP, NDS and the per-box matching. Building the devkit's ``EvalBoxes`` (one
``DetectionBox`` and pyquaternion ``Quaternion`` per box) is not timed.

If the devkit would take too long at full size, it runs on the first ``--reference-frames`` frames
and its time is extrapolated linearly in the number of frames (its cost is linear: every prediction
loops over the GT of its own frame); the JSON says so. The numbers are compared (max abs diff over
all 101-point curves, APs and TP errors) on the frames the devkit ran on, with our implementation
evaluated on exactly those frames.

    python benchmarks/detection3d_eval.py --frames 6000 --classes 10 --gt-per-frame 40 --dets-per-frame 300
    python benchmarks/detection3d_eval.py --sizes 1500,3000,6000 --skip-reference
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mldbg_callbacks.evaluation.nuscenes import (Boxes3D, DIST_THRESHOLDS, TP_METRIC_NAMES,  # noqa: E402
                                                 nuscenes_evaluate)

NUSCENES_NAMES = ["car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle",
                  "bicycle", "traffic_cone", "barrier"]
# typical (w, l, h) per nuScenes class, cycled for more classes
TYPICAL_WLH = np.array([[1.9, 4.6, 1.7], [2.5, 6.9, 2.8], [2.9, 11.0, 3.5], [2.9, 12.3, 3.9], [2.8, 6.4, 3.2],
                        [0.7, 0.7, 1.8], [0.8, 2.1, 1.5], [0.6, 1.7, 1.3], [0.4, 0.4, 1.1], [2.5, 0.5, 1.0]])
CURVES = ("precision", "recall", "confidence", "trans_err", "vel_err", "scale_err", "orient_err")


def make_synthetic(n_frames: int, n_classes: int, gt_per_frame: float, dets_per_frame: int,
                   seed: int) -> tuple[Boxes3D, Boxes3D]:
    """GT and predictions (see module docstring); every frame gets exactly ``dets_per_frame`` predictions."""
    rng = np.random.default_rng(seed)
    n_gt_f = rng.poisson(gt_per_frame, n_frames)
    g_frame = np.repeat(np.arange(n_frames), n_gt_f)
    n_gt = g_frame.size
    g_label = rng.integers(0, n_classes, n_gt)
    g_wlh = TYPICAL_WLH[g_label % len(TYPICAL_WLH)] * rng.uniform(0.8, 1.25, (n_gt, 3))
    g_xy = rng.uniform(-50, 50, (n_gt, 2))
    g_z = rng.normal(-0.5, 0.5, n_gt)
    g_yaw = rng.uniform(-np.pi, np.pi, n_gt)
    g_vel = rng.normal(0, 3, (n_gt, 2)) * (rng.random((n_gt, 1)) < 0.5)
    g_box = np.column_stack([g_xy, g_z, g_wlh, g_yaw])

    n_copies = 1 + rng.poisson(0.8, n_gt)  # first copy the "real" detection, the others duplicates
    src = np.repeat(np.arange(n_gt), n_copies)
    is_dupe = np.concatenate([[False], src[1:] == src[:-1]])
    rng_m = np.hypot(g_xy[src, 0], g_xy[src, 1])
    sigma = (0.15 + 0.02 * rng_m) * rng.gamma(2.0, 0.5, src.size) * np.where(is_dupe, 2.0, 1.0)
    c_xy = g_xy[src] + rng.normal(0, 1, (src.size, 2)) * sigma[:, None]
    c_wlh = g_wlh[src] * np.exp(rng.normal(0, 0.1, (src.size, 3)))
    c_yaw = g_yaw[src] + rng.normal(0, 0.15, src.size) + np.pi * (rng.random(src.size) < 0.05)
    c_yaw = (c_yaw + np.pi) % (2 * np.pi) - np.pi
    c_vel = g_vel[src] + rng.normal(0, 0.5, (src.size, 2))
    c_label = np.where(rng.random(src.size) < 0.08, rng.integers(0, n_classes, src.size), g_label[src])
    err = np.hypot(*(c_xy - g_xy[src]).T)
    c_score = np.clip(np.exp(-err / 2) + rng.normal(0, 0.1, src.size) - 0.25 * is_dupe, 0.01, 1.0)
    c_box = np.column_stack([c_xy, g_z[src] + rng.normal(0, 0.1, src.size), c_wlh, c_yaw])
    c_frame = g_frame[src]
    keep = rng.random(src.size) > 0.1  # misses
    c_box, c_label, c_score, c_frame, c_vel = c_box[keep], c_label[keep], c_score[keep], c_frame[keep], c_vel[keep]
    order = np.lexsort((-c_score, c_frame))
    c_box, c_label, c_score, c_frame, c_vel = c_box[order], c_label[order], c_score[order], c_frame[order], c_vel[order]
    per_frame = np.bincount(c_frame, minlength=n_frames)
    rank = np.arange(c_frame.size) - np.repeat(np.cumsum(per_frame) - per_frame, per_frame)
    keep = rank < dets_per_frame
    c_box, c_label, c_score, c_frame, c_vel = c_box[keep], c_label[keep], c_score[keep], c_frame[keep], c_vel[keep]

    n_bg = dets_per_frame - np.bincount(c_frame, minlength=n_frames)
    b_frame = np.repeat(np.arange(n_frames), n_bg)
    nb = b_frame.size
    b_label = rng.integers(0, n_classes, nb)
    b_box = np.column_stack([rng.uniform(-50, 50, (nb, 2)), rng.normal(-0.5, 0.5, nb),
                             TYPICAL_WLH[b_label % len(TYPICAL_WLH)] * rng.uniform(0.7, 1.3, (nb, 3)),
                             rng.uniform(-np.pi, np.pi, nb)])
    b_score = np.round(rng.beta(1.0, 8.0, nb), 3)  # rounded: plenty of score ties
    b_vel = rng.normal(0, 2, (nb, 2))

    frame = np.concatenate([c_frame, b_frame])
    shuffle = rng.permutation(frame.size)
    dets = Boxes3D(frame[shuffle], np.concatenate([c_label, b_label])[shuffle],
                   np.concatenate([c_box, b_box])[shuffle], np.concatenate([c_vel, b_vel])[shuffle],
                   np.concatenate([c_score, b_score])[shuffle])
    return dets, Boxes3D(g_frame, g_label, g_box, g_vel)


def subset(b: Boxes3D, n_frames: int) -> Boxes3D:
    keep = b.frame < n_frames
    return Boxes3D(b.frame[keep], b.label[keep], b.box[keep],
                   None if b.velocity is None else b.velocity[keep], None if b.score is None else b.score[keep])


def to_eval_boxes(b: Boxes3D, n_frames: int, names: list[str]):
    """The devkit's EvalBoxes: frames in ascending order, boxes of a frame in row order."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionBox
    from pyquaternion import Quaternion

    eb = EvalBoxes()
    order = np.argsort(b.frame, kind="stable")
    counts = np.bincount(b.frame, minlength=n_frames)
    starts = np.concatenate([[0], np.cumsum(counts)])
    box, label = b.box[order].tolist(), b.label[order].tolist()
    vel = b.velocity[order].tolist() if b.velocity is not None else None
    score = b.score[order].tolist() if b.score is not None else None
    for f in range(n_frames):
        token = f"f{f}"
        eb.add_boxes(token, [DetectionBox(
            sample_token=token, translation=tuple(box[i][:3]), size=tuple(box[i][3:6]),
            rotation=tuple(Quaternion(axis=[0, 0, 1], angle=box[i][6]).elements),
            velocity=tuple(vel[i]) if vel is not None else (np.nan, np.nan),
            detection_name=names[label[i]], detection_score=score[i] if score is not None else -1.0)
            for i in range(starts[f], starts[f + 1])])
    return eb


def run_devkit(gt_eb, pred_eb, names: list[str]) -> tuple[float, dict]:
    from nuscenes.eval.common.utils import center_distance
    from nuscenes.eval.detection.algo import accumulate, calc_ap, calc_tp

    out = {}
    start = time.perf_counter()
    for name in names:
        for th in DIST_THRESHOLDS:
            md = accumulate(gt_eb, pred_eb, name, center_distance, th)
            out[(name, th)] = md
            out[(name, th, "ap")] = calc_ap(md, 0.1, 0.1)
            if th == 2.0:
                for m in TP_METRIC_NAMES:
                    out[(name, m)] = calc_tp(md, 0.1, m)
    return time.perf_counter() - start, out


def compare(ours, ref: dict, names: list[str]) -> dict:
    """Max abs differences between our evaluation and the devkit's outputs (NaN-aware: NaN == NaN)."""
    def diff(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf")
        m = ~np.isnan(a)
        return float(np.max(np.abs(a[m] - b[m]), initial=0.0))

    curves, aps, tps, identical = 0.0, 0.0, 0.0, True
    for k, name in enumerate(names):
        for i, th in enumerate(DIST_THRESHOLDS):
            md_ref, md = ref[(name, th)], ours.metric_data[(k, th)]
            for c in CURVES:
                curves = max(curves, diff(getattr(md, c), getattr(md_ref, c)))
                identical &= np.array_equal(getattr(md, c), getattr(md_ref, c))
            aps = max(aps, diff(ours.ap[k, i], ref[(name, th, "ap")]))
            identical &= ours.ap[k, i] == ref[(name, th, "ap")]
        for m in TP_METRIC_NAMES:
            # ours reports NaN where the devkit's DetectionEval does (traffic_cone/barrier): compare
            # with calc_tp on our own curves there, i.e. the raw per-class value
            from mldbg_callbacks.evaluation.nuscenes import calc_tp
            ours_tp = calc_tp(ours.metric_data[(k, 2.0)], 0.1, m)
            tps = max(tps, diff(ours_tp, ref[(name, m)]))
            identical &= ours_tp == ref[(name, m)]
    return {"max_abs_diff_curves": curves, "max_abs_diff_ap": aps, "max_abs_diff_tp": tps,
            "bit_identical": bool(identical)}


def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def bench(n_frames: int, n_classes: int, gt_per_frame: float, dets_per_frame: int, seed: int,
          reference: bool, reference_frames: int, repeat: int, dist: str = "center") -> dict:
    dets, gts = make_synthetic(n_frames, n_classes, gt_per_frame, dets_per_frame, seed)
    names = [NUSCENES_NAMES[i % 10] + ("" if i < 10 else f"_{i}") for i in range(n_classes)]
    best, ev = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        ev = nuscenes_evaluate(dets, gts, n_frames, class_names=names, dist=dist)
        best = min(best, time.perf_counter() - start)
    out: dict = {"sizes": {"frames": n_frames, "classes": n_classes, "gt": len(gts), "dets": len(dets)},
                 "dist": dist, "ours_s": round(best, 3), "map": ev.map, "nds": ev.nds,
                 "tp_errors": {k: round(v, 4) for k, v in ev.tp_errors.items()},
                 "peak_rss_mib_after_ours": _rss_mib()}
    if reference and dist != "center":
        out["devkit"] = {"note": "the devkit has no bev_iou matching: reference not run"}
    elif reference:
        if n_classes > 10:
            raise SystemExit("the devkit knows 10 class names: use --classes <= 10 with the reference")
        ref_frames = min(n_frames, reference_frames)
        d_sub, g_sub = (dets, gts) if ref_frames == n_frames else (subset(dets, ref_frames), subset(gts, ref_frames))
        ours_sub_s = time.perf_counter()
        ev_sub = ev if ref_frames == n_frames else nuscenes_evaluate(d_sub, g_sub, ref_frames, class_names=names)
        ours_sub_s = time.perf_counter() - ours_sub_s
        gt_eb, pred_eb = to_eval_boxes(g_sub, ref_frames, names), to_eval_boxes(d_sub, ref_frames, names)
        ref_s, ref = run_devkit(gt_eb, pred_eb, names)
        est = ref_s * n_frames / ref_frames
        out["devkit"] = {
            "frames_measured": ref_frames, "measured_s": round(ref_s, 3),
            "ms_per_frame": round(1000 * ref_s / ref_frames, 2),
            "full_size_s": round(est, 1), "extrapolated": ref_frames != n_frames,
            "note": ("devkit run on the first %d frames; full-size time extrapolated linearly in frames"
                     % ref_frames) if ref_frames != n_frames else "devkit run at full size",
            **compare(ev_sub, ref, names)}
        if ref_frames != n_frames:
            out["devkit"]["ours_on_same_frames_s"] = round(ours_sub_s, 3)
        out["ratio_devkit_over_ours"] = round(est / best, 1)
        out["peak_rss_mib_total"] = _rss_mib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--gt-per-frame", type=float, default=40.0)
    parser.add_argument("--dets-per-frame", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated frame counts (growth)")
    parser.add_argument("--skip-reference", action="store_true", help="time only our implementation")
    parser.add_argument("--reference-frames", type=int, default=1500,
                        help="frames the devkit runs on (time extrapolated to --frames when smaller)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dist", choices=("center", "bev_iou"), default="center",
                        help="matching criterion of ours (the devkit reference needs 'center')")
    args = parser.parse_args()
    if args.sizes:
        result = {"growth": [bench(int(n), args.classes, args.gt_per_frame, args.dets_per_frame, args.seed,
                                   not args.skip_reference, args.reference_frames, args.repeat, args.dist)
                             for n in args.sizes.split(",")]}
    else:
        result = bench(args.frames, args.classes, args.gt_per_frame, args.dets_per_frame, args.seed,
                       not args.skip_reference, args.reference_frames, args.repeat, args.dist)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
