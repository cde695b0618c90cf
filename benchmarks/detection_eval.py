"""Benchmark: vectorised COCO bbox AP and TIDE errors against pycocotools, faster-coco-eval and tidecv.

Synthetic COCO-val-sized data (by default 5,000 images, 80 classes, ~7 GT and 100 detections per
image): GT boxes of mixed sizes; detections are jittered copies of the GT (localisation noise, class
flips, duplicates) plus random background boxes, with scores correlated with box quality, so AP is
in a realistic range. Prints one JSON object. Times cover the evaluation calls only (building the
reference libraries' in-memory datasets is not timed; their prints are silenced).

    python benchmarks/detection_eval.py --images 5000 --classes 80 --gt-per-image 7 --dets-per-image 100
    python benchmarks/detection_eval.py --sizes 1000,2500,5000 --skip-reference
    python benchmarks/detection_eval.py --evaluator     # also the whole Evaluator (categories, codes...)

``--evaluator`` also traces the same data through ``detection_core`` into a temporary store (as the
``val`` split, ``--epochs`` epochs with the detections re-jittered each epoch) and times the whole
``Evaluator.request_evaluation()`` in a fresh process: COCO AP and TIDE plus error_proba, dynamics,
categories, error codes and the saved result, with that process's peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mldbg_callbacks.evaluation.coco import Boxes, coco_evaluate  # noqa: E402
from mldbg_callbacks.evaluation.tide import tide_errors  # noqa: E402

IMAGE_W, IMAGE_H = 640.0, 480.0


def make_synthetic(n_images: int, n_classes: int, gt_per_image: float, dets_per_image: int,
                   seed: int) -> tuple[Boxes, Boxes]:
    """GT and detections (see module docstring); every image gets exactly ``dets_per_image`` detections."""
    rng = np.random.default_rng(seed)
    n_gt_img = rng.poisson(gt_per_image, n_images)
    g_image = np.repeat(np.arange(n_images), n_gt_img)
    n_gt = g_image.size
    g_label = rng.integers(0, n_classes, n_gt)
    size = np.exp(rng.uniform(np.log(6), np.log(400), (n_gt, 2)))
    center = rng.uniform([0, 0], [IMAGE_W, IMAGE_H], (n_gt, 2))
    g_box = np.concatenate([center - size / 2, center + size / 2], axis=1)

    # 1 + Poisson(1) copies per GT: the first is the "real" detection, the others duplicates
    n_copies = 1 + rng.poisson(1.0, n_gt)
    src = np.repeat(np.arange(n_gt), n_copies)
    is_dupe = np.concatenate([[False], src[1:] == src[:-1]])
    noise = rng.gamma(2.0, 0.06, src.size) * np.where(is_dupe, 2.0, 1.0)
    shift = rng.normal(0, 1, (src.size, 4)) * noise[:, None] * np.tile(size[src], 2)
    c_box = g_box[src] + shift
    c_box = np.concatenate([np.minimum(c_box[:, :2], c_box[:, 2:]), np.maximum(c_box[:, :2], c_box[:, 2:])], 1)
    c_label = np.where(rng.random(src.size) < 0.1, rng.integers(0, n_classes, src.size), g_label[src])
    c_score = np.clip(np.exp(-3 * noise) + rng.normal(0, 0.15, src.size) - 0.2 * is_dupe, 0.01, 1.0)
    c_image = g_image[src]
    # drop a few detections (misses) and cap copies at the per-image budget
    keep = rng.random(src.size) > 0.08
    c_box, c_label, c_score, c_image = c_box[keep], c_label[keep], c_score[keep], c_image[keep]
    order = np.lexsort((-c_score, c_image))
    c_box, c_label, c_score, c_image = c_box[order], c_label[order], c_score[order], c_image[order]
    per_img = np.bincount(c_image, minlength=n_images)
    rank = np.arange(c_image.size) - np.repeat(np.cumsum(per_img) - per_img, per_img)
    keep = rank < dets_per_image
    c_box, c_label, c_score, c_image = c_box[keep], c_label[keep], c_score[keep], c_image[keep]

    # background boxes fill every image up to dets_per_image
    n_bg = dets_per_image - np.bincount(c_image, minlength=n_images)
    b_image = np.repeat(np.arange(n_images), n_bg)
    b_size = np.exp(rng.uniform(np.log(4), np.log(300), (b_image.size, 2)))
    b_center = rng.uniform([0, 0], [IMAGE_W, IMAGE_H], (b_image.size, 2))
    b_box = np.concatenate([b_center - b_size / 2, b_center + b_size / 2], axis=1)
    b_label = rng.integers(0, n_classes, b_image.size)
    b_score = np.round(rng.beta(1.0, 6.0, b_image.size), 3)  # rounded: plenty of score ties

    image = np.concatenate([c_image, b_image])
    shuffle = rng.permutation(image.size)
    dets = Boxes(image[shuffle], np.concatenate([c_label, b_label])[shuffle],
                 np.concatenate([c_box, b_box])[shuffle], np.concatenate([c_score, b_score])[shuffle])
    return dets, Boxes(g_image, g_label, g_box)


def _xywh(box: np.ndarray) -> np.ndarray:
    return np.stack([box[:, 0], box[:, 1], box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], axis=1)


def _coco_dicts(dets: Boxes, gts: Boxes, n_images: int) -> tuple[dict, list]:
    gx, dx = _xywh(gts.box), _xywh(dets.box)
    dataset = {"images": [{"id": i} for i in range(n_images)],
               "categories": [{"id": int(c)} for c in np.unique(gts.label)],
               "annotations": [{"id": j + 1, "image_id": int(i), "category_id": int(c), "bbox": b,
                                "area": b[2] * b[3], "iscrowd": 0}
                               for j, (i, c, b) in enumerate(zip(gts.image, gts.label, gx.tolist()))]}
    results = [{"image_id": int(i), "category_id": int(c), "bbox": b, "score": float(s)}
               for i, c, b, s in zip(dets.image, dets.label, dx.tolist(), dets.score)]
    return dataset, results


def run_pycocotools(dataset: dict, results: list) -> tuple[float, np.ndarray]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        start = time.perf_counter()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        elapsed = time.perf_counter() - start
    return elapsed, np.asarray(ev.stats)


def run_faster_coco_eval(dataset: dict, results: list) -> tuple[float, np.ndarray]:
    from faster_coco_eval import COCO, COCOeval_faster
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        start = time.perf_counter()
        ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        elapsed = time.perf_counter() - start
    return elapsed, np.asarray(ev.stats[:12])


def run_tidecv(dets: Boxes, gts: Boxes, n_images: int) -> tuple[float, dict]:
    from tidecv import TIDE, Data
    gt, pred = Data("gt"), Data("pred")
    for i in range(n_images):
        gt.add_image(i, str(i))
    for i, c, b in zip(gts.image.tolist(), gts.label.tolist(), _xywh(gts.box).tolist()):
        gt.add_ground_truth(i, c, b)
    for i, c, s, b in zip(dets.image.tolist(), dets.label.tolist(), dets.score.tolist(), _xywh(dets.box).tolist()):
        pred.add_detection(i, c, s, b)
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        tide = TIDE()
        run = tide.evaluate(gt, pred, mode=TIDE.BOX, name="bench")
        main = tide.get_main_errors()["bench"]
        special = tide.get_special_errors()["bench"]
        elapsed = time.perf_counter() - start
    counts = {k.short_name: v for k, v in run.count_errors().items()}
    return elapsed, {"counts": counts, "dap": main, "special": special, "ap": run.ap}


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(n_images: int, n_classes: int, gt_per_image: float, dets_per_image: int, seed: int,
          reference: bool, repeat: int) -> dict:
    dets, gts = make_synthetic(n_images, n_classes, gt_per_image, dets_per_image, seed)
    ours_coco_s, ours = _timed(lambda: coco_evaluate(dets, gts, n_images), repeat)
    ours_tide_s, tide = _timed(lambda: tide_errors(dets, gts, n_images), repeat)
    out: dict = {"sizes": {"images": n_images, "classes": n_classes, "gt": len(gts), "dets": len(dets)},
                 "coco": {"ours_s": round(ours_coco_s, 3), "AP": float(ours.stats[0]), "AP50": float(ours.stats[1])},
                 "tide": {"ours_s": round(ours_tide_s, 3), "AP50": tide.ap, "counts": tide.counts()},
                 # process peak so far: data generation + our two evaluations (before any reference)
                 "peak_rss_mib_after_ours": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if reference:
        dataset, results = _coco_dicts(dets, gts, n_images)
        py_s, py_stats = run_pycocotools(dataset, results)
        fast_s, fast_stats = run_faster_coco_eval(dataset, results)
        out["coco"].update({
            "pycocotools_s": round(py_s, 3), "faster_coco_eval_s": round(fast_s, 3),
            "stats_identical_pycocotools": bool(np.array_equal(py_stats, ours.stats)),
            "max_abs_diff_pycocotools": float(np.max(np.abs(py_stats - ours.stats))),
            "max_abs_diff_faster_coco_eval": float(np.max(np.abs(fast_stats - ours.stats))),
            "ratio_pycocotools_over_ours": round(py_s / ours_coco_s, 1),
            "ratio_faster_over_ours": round(fast_s / ours_coco_s, 1)})
        tide_s, ref = run_tidecv(dets, gts, n_images)
        dap_diff = max(abs(ref["dap"][k] - v) for k, v in tide.dap().items())
        special_diff = max(abs(ref["special"][k] - v) for k, v in tide.special_dap().items())
        out["tide"].update({
            "tidecv_s": round(tide_s, 3), "counts_equal": ref["counts"] == tide.counts(),
            "ap_equal": ref["ap"] == tide.ap, "max_abs_diff_dap": max(dap_diff, special_diff),
            "ratio_tidecv_over_ours": round(tide_s / ours_tide_s, 1)})
    return out


def write_traces(root: str, dets: Boxes, gts: Boxes, n_images: int, epochs: int, seed: int) -> None:
    """The data as one user's tracer would record it: per image lists, 16 images per batch."""
    from mldbg_callbacks.training import detection_core

    rng = np.random.default_rng(seed + 1)
    gt_order = np.argsort(gts.image, kind="stable")
    gt_split = np.cumsum(np.bincount(gts.image, minlength=n_images))[:-1]
    gt_boxes = np.split(gts.box[gt_order].astype(np.float32), gt_split)
    gt_labels = np.split(gts.label[gt_order], gt_split)
    order = np.argsort(dets.image, kind="stable")
    split = np.cumsum(np.bincount(dets.image, minlength=n_images))[:-1]
    labels = np.split(dets.label[order], split)
    core = detection_core("det_bench", "v", store=root, num_classes=int(gts.label.max()) + 1,
                          score_thresh=0.0, max_detections=1000)
    for epoch in range(epochs):  # later epochs: the boxes move a little, as a model's do while it trains
        shift = np.tile(rng.normal(0, 1.0, (len(dets), 2)), 2) * (epoch > 0)  # moved, never inverted
        boxes = np.split(dets.box[order] + shift, split)
        scores = np.split(np.clip(dets.score[order] + rng.normal(0, 0.02, len(dets)) * (epoch > 0), 0, 1), split)
        for start in range(0, n_images, 16):
            sl = slice(start, min(start + 16, n_images))
            core.record({"boxes": boxes[sl], "scores": scores[sl], "labels": labels[sl],
                         "image_size": [(IMAGE_H, IMAGE_W)] * (sl.stop - sl.start)},
                        {"boxes": gt_boxes[sl], "labels": gt_labels[sl]}, input_ids=np.arange(sl.start, sl.stop),
                        dataset_type="val", n_epoch=epoch)
        core.end_epoch(epoch)
    core.wait_for_save()
    core.close()


def evaluator_child(root: str) -> dict:
    from mldbg_callbacks.evaluator import Evaluator

    start, cpu = time.perf_counter(), time.process_time()
    result = Evaluator("det_bench", "v", store=root).request_evaluation()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    summary = result.metrics_summary().iloc[0]
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "map": float(summary["map"]),
            "units": int(summary["counts"]), "n_gt": int(summary["n_gt"]), "n_pred": int(summary["n_pred"]),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_evaluator(n_images: int, n_classes: int, gt_per_image: float, dets_per_image: int, seed: int,
                    epochs: int) -> dict:
    dets, gts = make_synthetic(n_images, n_classes, gt_per_image, dets_per_image, seed)
    # ground truth inside the image, as annotations are (the codec refuses boxes overhanging it)
    box = np.clip(gts.box, 0, [IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H])
    inside = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
    gts = Boxes(gts.image[inside], gts.label[inside], box[inside])
    with tempfile.TemporaryDirectory(prefix="mldbg-det-eval-") as root:
        start = time.perf_counter()
        write_traces(root, dets, gts, n_images, epochs, seed)
        write_s = time.perf_counter() - start
        child = subprocess.run([sys.executable, __file__, "--evaluator-child", root], capture_output=True, text=True,
                               check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        out = json.loads(child.stdout.strip().splitlines()[-1])
    out.update({"images": n_images, "epochs": epochs, "detections_per_epoch": len(dets), "objects": len(gts),
                "trace_s": round(write_s, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--gt-per-image", type=float, default=7.0)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated image counts (growth)")
    parser.add_argument("--skip-reference", action="store_true", help="time only our implementation")
    parser.add_argument("--repeat", type=int, default=1, help="best of N for our timings")
    parser.add_argument("--evaluator", action="store_true", help="also time the whole Evaluator (largest size)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs traced for --evaluator")
    parser.add_argument("--evaluator-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluator_child:
        print(json.dumps(evaluator_child(args.evaluator_child)))
        return
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.images]
    runs = [bench(n, args.classes, args.gt_per_image, args.dets_per_image, args.seed, not args.skip_reference,
                  args.repeat) for n in sizes]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = runs[0] if len(runs) == 1 else {"runs": runs}
    report["peak_rss_mib"] = round(peak_mib, 1)
    if args.evaluator:
        report["evaluator"] = bench_evaluator(sizes[-1], args.classes, args.gt_per_image, args.dets_per_image,
                                              args.seed, args.epochs)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
