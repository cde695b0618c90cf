"""MLDebuggerHook with a 2D MMDetection model: a tiny RetinaNet (ResNet-18 at 1/8 width) trained by a real
Runner on generated COCO-format images, validated with MMDetection's own CocoMetric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image, ImageDraw

from mldbg_callbacks.store import LocalStore

CLASSES = ("rect", "ellipse")
N_TRAIN, N_VAL, SIZE, SCALE = 6, 4, 64, 96


def make_coco(root: Path, seed: int = 0) -> dict:
    """Images of filled shapes and COCO files; returns {split: {image_id: (boxes xyxy, labels)}}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    truth: dict = {}
    for split, n, first in (("train", N_TRAIN, 1), ("val", N_VAL, 101)):
        images, annotations, truth[split] = [], [], {}
        for image_id in range(first, first + n):
            img = Image.new("RGB", (SIZE, SIZE), (20, 20, 20))
            draw = ImageDraw.Draw(img)
            boxes, labels = [], []
            for _ in range(int(rng.integers(1, 3))):
                w, h = rng.integers(12, 28, 2)
                x0, y0 = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
                label = int(rng.integers(0, 2))
                (draw.rectangle if label == 0 else draw.ellipse)([x0, y0, x0 + w, y0 + h], fill=(230, 200, 40))
                boxes.append([float(x0), float(y0), float(x0 + w), float(y0 + h)])
                labels.append(label)
                annotations.append({"id": len(annotations) + 1 + 1000 * first, "image_id": image_id,
                                    "category_id": label + 1, "bbox": [float(x0), float(y0), float(w), float(h)],
                                    "area": float(w * h), "iscrowd": 0})
            name = f"{image_id:04d}.png"
            img.save(root / "images" / name)
            images.append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
            truth[split][image_id] = (np.array(boxes), np.array(labels))
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}
        (root / f"{split}.json").write_text(json.dumps(coco))
    return truth


def tiny_retinanet() -> dict:
    return dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_size_divisor=32),
        backbone=dict(type="ResNet", depth=18, base_channels=8, num_stages=4, out_indices=(1, 2, 3),
                      norm_cfg=dict(type="BN", requires_grad=True), style="pytorch"),
        neck=dict(type="FPN", in_channels=[16, 32, 64], out_channels=16, start_level=0, add_extra_convs="on_input",
                  num_outs=5),
        bbox_head=dict(type="RetinaHead", num_classes=2, in_channels=16, stacked_convs=1, feat_channels=16,
                       anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                             ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                       loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                       loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                     ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.0, nms=dict(type="nms", iou_threshold=0.45),
                      max_per_img=10))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retinanet")
    truth = make_coco(tmp / "data")
    meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")
    # annotations loaded before the resize in training (boxes follow the image), after it in validation
    # (boxes stay in original pixels, like the predictions, which are rescaled back)
    train_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                      dict(type="Resize", scale=(SCALE, SCALE), keep_ratio=True),
                      dict(type="PackDetInputs", meta_keys=meta_keys)]
    val_pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=(SCALE, SCALE), keep_ratio=True),
                    dict(type="LoadAnnotations", with_bbox=True), dict(type="PackDetInputs", meta_keys=meta_keys)]

    def loader(split: str, pipeline: list, test_mode: bool) -> dict:
        return dict(batch_size=2, num_workers=0, persistent_workers=False,
                    sampler=dict(type="DefaultSampler", shuffle=not test_mode),
                    dataset=dict(type="CocoDataset", data_root=str(tmp / "data"), ann_file=f"{split}.json",
                                 data_prefix=dict(img="images/"), metainfo=dict(classes=CLASSES),
                                 filter_cfg=dict(filter_empty_gt=False), pipeline=pipeline, test_mode=test_mode))

    store = tmp / "store"
    cfg = dict(
        default_scope="mmdet", work_dir=str(tmp / "work"), model=tiny_retinanet(),
        train_dataloader=loader("train", train_pipeline, False), val_dataloader=loader("val", val_pipeline, True),
        val_evaluator=dict(type="CocoMetric", ann_file=str(tmp / "data" / "val.json"), metric="bbox"),
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=2, val_interval=1), val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9)),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=1), checkpoint=dict(type="CheckpointHook", interval=0)),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")), log_level="WARNING",
        randomness=dict(seed=0),
        custom_imports=dict(imports=["mldbg_callbacks.integrations.mmengine"], allow_failed_imports=False),
        custom_hooks=[dict(type="MLDebuggerHook", model_name="retinanet", version_name="v1", store=str(store),
                           trace_train=True)])
    Config(cfg).dump(str(tmp / "config.py"))
    runner = Runner.from_cfg(Config.fromfile(str(tmp / "config.py")))
    runner.train()
    return dict(runner=runner, truth=truth, store=LocalStore(store))


def test_2d_detector_traced_into_the_2d_task(trained):
    store, truth = trained["store"], trained["truth"]
    parts = [(p.dataset_type, p.n_epoch, p.rows) for p in store.partitions("retinanet", "v1")]
    assert parts == [("train", 0, N_TRAIN), ("train", 1, N_TRAIN), ("val", 0, N_VAL), ("val", 1, N_VAL)]
    meta = store.read_meta("retinanet", "v1")
    assert meta["task"] == "object_detection" and meta["architecture"] == "mmdet.RetinaNet"
    assert meta["class_names"] == {"0": "rect", "1": "ellipse"}
    assert meta["score_thresh"] == 0.0 and meta["iou_thresh"] == pytest.approx(0.45)
    assert meta["max_detections_per_image"] == 10
    val = {r["input_id"]: r for r in store.read_traces("retinanet", "v1", "val", [1]).to_pylist()}
    train = {r["input_id"]: r for r in store.read_traces("retinanet", "v1", "train", [1]).to_pylist()}
    for image_id, (boxes, labels) in truth["val"].items():  # original pixels (ids: COCO image ids)
        row = val[str(image_id)]
        np.testing.assert_allclose(np.array(row["gt_boxes"]).reshape(-1, 4), boxes, atol=1e-4)
        assert row["gt_labels"] == labels.tolist()
        assert (row["image_h"], row["image_w"]) == (SIZE, SIZE)  # ori_shape
        assert 0 < len(row["pred_scores"]) <= 10
    for image_id, (boxes, labels) in truth["train"].items():  # the train pass: network-input pixels (x 1.5)
        row = train[str(image_id)]
        np.testing.assert_allclose(np.array(row["gt_boxes"]).reshape(-1, 4), boxes * SCALE / SIZE, atol=1e-3)
        assert (row["image_h"], row["image_w"]) == (SCALE, SCALE)  # img_shape: the frame of the predictions
    hook = next(h for h in trained["runner"].hooks if type(h).__name__ == "MLDebuggerHook")
    assert not hook.errors and hook.stats.total_skipped == 0
