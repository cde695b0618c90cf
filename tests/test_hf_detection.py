"""Hugging Face DETR-family detectors: ``HFDetrTracer`` and detection tracing in ``MLDebuggerCallback``.

Real models built from tiny configs (random weights, CPU, offline): DETR, Conditional DETR, Deformable
DETR, Table Transformer, YOLOS, RT-DETR. Decoded detections are compared with the model family's own
image processor (``post_process_object_detection``, constructed here by its class, independently of the
tracer's lookup); ground truth with rectangles drawn at known pixel positions.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_data import DictDataset, training_args  # noqa: E402
from transformers import (ConditionalDetrConfig, ConditionalDetrForObjectDetection,  # noqa: E402
                          ConditionalDetrImageProcessor, DeformableDetrConfig, DeformableDetrForObjectDetection,
                          DeformableDetrImageProcessor, DetrConfig, DetrForObjectDetection, DetrImageProcessor,
                          ResNetConfig, RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor,
                          RTDetrResNetConfig, TableTransformerConfig, TableTransformerForObjectDetection, Trainer,
                          YolosConfig, YolosForObjectDetection, YolosImageProcessor)
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput  # noqa: E402

from mldbg_callbacks.core.trace_core import TraceWarning  # noqa: E402
from mldbg_callbacks.core.vectors import decode_vectors  # noqa: E402
from mldbg_callbacks.integrations.detectors.hf_detr import HFDetrTracer  # noqa: E402
from mldbg_callbacks.integrations.transformers import MLDebuggerCallback  # noqa: E402
from mldbg_callbacks.store import LocalStore  # noqa: E402
from mldbg_callbacks.training import ObjectDetectionTracer  # noqa: E402

NAMES = {0: "square", 1: "bar", 2: "dot"}
SIZE = 64
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def resnet(*stages: str) -> ResNetConfig:
    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                        out_features=list(stages))


def detr_kwargs(d_model: int = 16, decoder_layers: int = 1) -> dict:
    return dict(use_timm_backbone=False, use_pretrained_backbone=False, d_model=d_model, encoder_layers=1,
                decoder_layers=decoder_layers, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=6, num_labels=3, id2label=NAMES, **NO_DROPOUT)


def detr():
    torch.manual_seed(0)
    return DetrForObjectDetection(DetrConfig(backbone_config=resnet("stage2"), **detr_kwargs()))


def conditional_detr():
    torch.manual_seed(0)
    return ConditionalDetrForObjectDetection(ConditionalDetrConfig(backbone_config=resnet("stage2"), **detr_kwargs()))


def deformable_detr():
    # d_model a multiple of 32 (GroupNorm(32, d_model)); 2 decoder layers: with 1, transformers 5.23 fails in
    # post_init (its tied-weights regex bbox_embed.(?![0])\d+ finds nothing to tie). Multi-scale deformable
    # attention runs in its pure-PyTorch path on CPU.
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(DeformableDetrConfig(
        backbone_config=resnet("stage1", "stage2"), num_feature_levels=2, encoder_n_points=2, decoder_n_points=2,
        **detr_kwargs(d_model=32, decoder_layers=2)))


def table_transformer():
    torch.manual_seed(0)
    return TableTransformerForObjectDetection(TableTransformerConfig(backbone_config=resnet("stage2"),
                                                                     **detr_kwargs()))


def yolos():
    torch.manual_seed(0)
    return YolosForObjectDetection(YolosConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=[SIZE, SIZE],
        patch_size=16, num_detection_tokens=6, num_labels=3, id2label=NAMES))


def rt_detr():
    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], layer_type="basic",
                                  out_features=["stage1", "stage2", "stage3"])
    return RTDetrForObjectDetection(RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=16, encoder_in_channels=[8, 16, 32],
        feat_strides=[4, 8, 16], d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=6, num_labels=3,
        num_denoising=0, decoder_in_channels=[16, 16, 16], decoder_n_points=2, hidden_expansion=0.5, id2label=NAMES))


# model builder, the processor its family documents, what the processor takes beyond threshold/target_sizes,
# and how many detections that processor keeps per image (None: one per query, no cap of its own)
FAMILIES = {
    "detr": (detr, DetrImageProcessor, {}, None),
    "conditional_detr": (conditional_detr, ConditionalDetrImageProcessor, {"top_k": 100}, 100),
    "deformable_detr": (deformable_detr, DeformableDetrImageProcessor, {"top_k": 100}, 100),
    "table_transformer": (table_transformer, DetrImageProcessor, {}, None),
    "yolos": (yolos, YolosImageProcessor, {}, None),
    "rt_detr": (rt_detr, RTDetrImageProcessor, {"use_focal_loss": True}, 6),
}


def rectangles(n: int, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """``n`` images with one or two filled rectangles each; exact integer xyxy boxes and their classes."""
    gen = np.random.default_rng(seed)
    images = np.full((n, 3, SIZE, SIZE), 0.1, dtype=np.float32)
    targets = []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(1 + i % 2):
            x1, y1 = gen.integers(0, SIZE - 24, size=2)
            w, h = gen.integers(8, 24, size=2)
            label = int(gen.integers(0, 3))
            images[i, label, y1:y1 + h, x1:x1 + w] = 1.0  # the class is the channel that lights up
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return torch.from_numpy(images), targets


def hf_format(targets: list[dict], height: int = SIZE, width: int = SIZE) -> list[dict]:
    """Hugging Face labels of pixel xyxy targets: normalised cxcywh (computed here, not by the tracer)."""
    out = []
    for t in targets:
        b = t["boxes"]
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / width, (b[:, 1] + b[:, 3]) / 2 / height,
                              (b[:, 2] - b[:, 0]) / width, (b[:, 3] - b[:, 1]) / height], dim=1)
        out.append({"class_labels": t["labels"], "boxes": cxcywh})
    return out


def read(store_dir, model: str, dataset_type: str, epoch: int, version: str = "v1") -> dict:
    """Stored rows by input id."""
    table = LocalStore(store_dir).read_traces(model, version, dataset_type, [epoch])
    rows = table.drop_columns(["features"]).to_pylist() if "features" in table.column_names else table.to_pylist()
    return {row["input_id"]: row for row in rows}


# -- HFDetrTracer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_factory_returns_hf_detr_tracer_with_the_config_settings(family, store_dir):
    build, processor_class, _, kept = FAMILIES[family]
    model = build()
    tracer = ObjectDetectionTracer(model, family, "v1")
    assert type(tracer) is HFDetrTracer and tracer.architecture == f"hf.{type(model).__name__}"
    assert tracer.uses_nms is False and tracer.iou_thresh is None
    assert tracer.num_classes == 3 and tracer.class_names == NAMES
    assert tracer.score_thresh == 0.05  # no config declares one: the product's fallback
    assert tracer.max_detections_per_image == (300 if kept is None else kept)
    assert tracer.decoder.processor_class is processor_class

    caller = ObjectDetectionTracer(model, family, "v2", score_thresh=0.3, max_detections_per_image=7,
                                   class_names={0: "a", 1: "b", 2: "c"})
    assert (caller.score_thresh, caller.max_detections_per_image, caller.class_names[2]) == (0.3, 7, "c")
    images, targets = rectangles(2)
    model.eval()
    with torch.no_grad():
        caller(images, targets, input_ids=[0, 1], dataset_type="val", n_epoch=0)
    caller.wait_for_save()
    meta = LocalStore(store_dir).read_meta(family, "v2")
    assert meta["architecture"] == f"hf.{type(model).__name__}" and meta["num_classes"] == 3
    assert (meta["score_thresh"], meta.get("iou_thresh"), meta["max_detections_per_image"]) == (0.3, None, 7)
    assert meta["class_names"] == {"0": "a", "1": "b", "2": "c"}
    tracer.close()
    caller.close()


def test_iou_thresh_warns_and_is_ignored(store_dir):
    with pytest.warns(UserWarning, match="no NMS, so iou_thresh=0.6 is ignored"):
        tracer = ObjectDetectionTracer(detr(), "detr", "v1", iou_thresh=0.6)
    assert tracer.iou_thresh is None


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_equals_the_families_image_processor(family, store_dir):
    build, processor_class, extra, _ = FAMILIES[family]
    model = build().eval()
    images, _ = rectangles(2)
    with torch.no_grad():
        outputs = model(pixel_values=images)
    tracer = ObjectDetectionTracer(model, family, "v1", score_thresh=0.02)
    decoded = tracer.decode(outputs, images)
    expected = processor_class().post_process_object_detection(outputs, threshold=0.02,
                                                               target_sizes=[(SIZE, SIZE)] * 2, **extra)
    assert sum(len(e["scores"]) for e in expected) > 0
    for i, reference in enumerate(expected):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(decoded[key][i], reference[key]), (key, i)
    assert decoded["image_size"].tolist() == [[SIZE, SIZE]] * 2


def test_boxes_are_pixels_of_the_canvas(store_dir):
    """Synthetic outputs with known boxes: [cx, cy, w, h] normalised -> xyxy pixels (canvas 32 x 64)."""
    logits = torch.full((1, 2, 4), -10.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0  # query 0 -> class 1, query 1 -> class 2; column 3 = no object
    boxes = torch.tensor([[[0.5, 0.25, 0.5, 0.25], [0.875, 0.5, 0.5, 0.25]]])  # the second crosses the right edge
    outputs = DetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)
    tracer = ObjectDetectionTracer(detr(), "detr", "v1")
    decoded = tracer.decode(outputs, torch.zeros(1, 3, 32, 64))
    assert decoded["labels"][0].tolist() == [1, 2]
    assert decoded["boxes"][0].tolist() == [[16.0, 4.0, 48.0, 12.0], [40.0, 12.0, 72.0, 20.0]]  # stored clipped
    sizes = tracer.decode(outputs, torch.zeros(1, 3, 32, 64))["image_size"].tolist()
    assert sizes == [[32, 64]]


def test_ground_truth_formats_are_stored_as_the_same_pixel_boxes(store_dir):
    model = detr().eval()
    images, targets = rectangles(4)
    tracer = ObjectDetectionTracer(model, "detr", "v1")
    as_dict_of_lists = {"boxes": [t["boxes"] for t in targets], "labels": [t["labels"] for t in targets]}
    with torch.no_grad():
        for epoch, gt in enumerate((targets, as_dict_of_lists, hf_format(targets))):
            tracer(images, gt, input_ids=[10, 11, 12, 13], dataset_type="val", n_epoch=epoch)
        outputs = model(pixel_values=images)
    tracer.wait_for_save()
    expected = DetrImageProcessor().post_process_object_detection(outputs, threshold=0.05,
                                                                  target_sizes=[(SIZE, SIZE)] * 4)
    for epoch in range(3):
        rows = read(store_dir, "detr", "val", epoch)
        assert sorted(rows) == ["10", "11", "12", "13"]
        for i, target in enumerate(targets):
            row = rows[str(10 + i)]
            assert (row["image_h"], row["image_w"]) == (SIZE, SIZE)
            np.testing.assert_allclose(row["gt_boxes"], target["boxes"].numpy(), atol=1e-5)
            assert row["gt_labels"] == target["labels"].tolist()
            np.testing.assert_allclose(row["pred_scores"], expected[i]["scores"].numpy(), rtol=1e-6)
            np.testing.assert_allclose(row["pred_boxes"], expected[i]["boxes"].clamp(0, SIZE).numpy(), atol=1e-4)
            assert row["pred_labels"] == expected[i]["labels"].tolist()
    assert tracer.stats.total_skipped == 0
    table = LocalStore(store_dir).read_traces("detr", "v1", "val", [0])
    features = decode_vectors(table, "features")
    with torch.no_grad():
        expected_features = model(pixel_values=images).last_hidden_state.mean(dim=1)  # decoder output over queries
    order = [int(i) - 10 for i in table.column("input_id").to_pylist()]
    np.testing.assert_allclose(features, expected_features[order].numpy(), atol=2e-3)


def test_pixel_mask_and_target_sizes_with_the_processors_own_labels(store_dir):
    """The image processor pads a 32x32 image to the 32x64 canvas and normalises its labels by the canvas:
    boxes are scaled by the canvas, the recorded size is the unpadded image."""
    processor = DetrImageProcessor(do_resize=False, do_normalize=False, do_convert_annotations=True)
    pictures = [np.zeros((32, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]
    coco = [{"image_id": i, "annotations": [{"bbox": [8, 8, 16, 8], "category_id": 1 + i, "area": 128,
                                             "iscrowd": 0}]} for i in range(2)]
    batch = processor(images=pictures, annotations=coco, return_tensors="pt")
    assert batch["labels"][1]["size"].tolist() == [32, 64]  # normalised by the padded canvas
    model = detr().eval()
    tracer = ObjectDetectionTracer(model, "detr", "v1")
    with torch.no_grad():
        tracer(batch["pixel_values"], batch["labels"], input_ids=["a", "b"], pixel_mask=batch["pixel_mask"],
               n_epoch=0)
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    tracer.wait_for_save()
    rows = read(store_dir, "detr", "train", 0)
    assert [(rows[k]["image_h"], rows[k]["image_w"]) for k in "ab"] == [(32, 64), (32, 32)]
    assert [rows[k]["gt_boxes"] for k in "ab"] == [[[8.0, 8.0, 24.0, 16.0]]] * 2
    assert [rows[k]["gt_labels"] for k in "ab"] == [[1], [2]]
    expected = DetrImageProcessor().post_process_object_detection(outputs, threshold=0.05,
                                                                  target_sizes=[(32, 64), (32, 64)])
    np.testing.assert_allclose(rows["b"]["pred_boxes"], expected[1]["boxes"].clamp(0, 32).numpy(), atol=1e-4)

    # original sizes (here twice the canvas; both images unpadded) replace the canvas for boxes and sizes
    same = processor(images=[pictures[0]] * 2, annotations=coco, return_tensors="pt")
    with torch.no_grad():
        tracer(same["pixel_values"], same["labels"], input_ids=["a", "b"], target_sizes=[(64, 128)] * 2, n_epoch=1)
        outputs = model(pixel_values=same["pixel_values"])
    tracer.wait_for_save()
    rows = read(store_dir, "detr", "train", 1)
    assert [(rows[k]["image_h"], rows[k]["image_w"]) for k in "ab"] == [(64, 128)] * 2
    assert rows["a"]["gt_boxes"] == [[16.0, 16.0, 48.0, 32.0]]
    expected = DetrImageProcessor().post_process_object_detection(outputs, threshold=0.05,
                                                                  target_sizes=[(64, 128)] * 2)
    np.testing.assert_allclose(rows["a"]["pred_boxes"], expected[0]["boxes"].numpy().clip(0, [128, 64, 128, 64]),
                               atol=1e-4)


@pytest.mark.parametrize("family", ["detr", "deformable_detr"])
def test_training_mode_returns_the_loss_of_converted_labels_and_traces(family, store_dir):
    model = FAMILIES[family][0]().train()
    images, targets = rectangles(2)
    tracer = ObjectDetectionTracer(model, family, "v1")
    outputs = tracer(images, targets, input_ids=[0, 1], dataset_type="train", n_epoch=0)
    torch.manual_seed(0)
    reference = model(pixel_values=images, labels=hf_format(targets)).loss  # labels converted here, not by the tracer
    assert outputs.loss.requires_grad and torch.allclose(outputs.loss, reference, rtol=1e-5)
    outputs.loss.backward()
    assert tracer(images, hf_format(targets), input_ids=[0, 1], n_epoch=1).loss.item() == pytest.approx(
        reference.item(), rel=1e-5)
    assert tracer(images, targets, input_ids=[0, 1], n_epoch=2, labels=None).loss is None
    tracer.wait_for_save()
    for epoch in range(3):
        rows = read(store_dir, family, "train", epoch)
        assert sorted(rows) == ["0", "1"]
        np.testing.assert_allclose(rows["1"]["gt_boxes"], targets[1]["boxes"].numpy(), atol=1e-4)


def test_text_conditioned_detectors_are_refused():
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    config = OwlViTConfig(text_config={"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "vocab_size": 32, "max_position_embeddings": 8},
                          vision_config={"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                          projection_dim=8)
    with pytest.raises(TypeError, match="text-conditioned"):
        ObjectDetectionTracer(OwlViTForObjectDetection(config), "owl", "v1")


# -- Trainer ----------------------------------------------------------------------------------------
def detection_rows(n: int, first_id: int, seed: int) -> tuple[list[dict], dict]:
    images, targets = rectangles(n, seed)
    rows = [{"id": first_id + i, "pixel_values": images[i], "labels": hf_format([targets[i]])[0]} for i in range(n)]
    return rows, {first_id + i: targets[i] for i in range(n)}


def detr_collate(features: list[dict]) -> dict:
    return {"pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": [f["labels"] for f in features]}


def test_trainer_traces_detection_train_and_eval_per_epoch(tmp_path, store_dir):
    train_rows, train_truth = detection_rows(16, 0, seed=1)
    eval_rows, eval_truth = detection_rows(8, 100, seed=2)
    model = detr()
    callback = MLDebuggerCallback("detr-trainer", "v1")
    args = training_args(tmp_path / "out", num_train_epochs=2, per_device_train_batch_size=4,
                         per_device_eval_batch_size=4, remove_unused_columns=False, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=DictDataset(train_rows),
                      eval_dataset=DictDataset(eval_rows), data_collator=detr_collate, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=TraceWarning)  # nothing skipped, nothing refused
        trainer.train()
    assert callback.task == "detection" and callback.stats.total_skipped == 0
    copy = pickle.loads(pickle.dumps(callback))  # what spawned DDP workers receive
    assert copy.task == "detection" and copy.detection_settings == callback.detection_settings

    for dataset_type, truth in (("train", train_truth), ("eval", eval_truth)):
        for epoch in (0, 1):
            rows = read(store_dir, "detr-trainer", dataset_type, epoch)
            assert sorted(map(int, rows)) == sorted(truth), (dataset_type, epoch)  # one row per image
            for sample_id, target in truth.items():
                row = rows[str(sample_id)]
                assert (row["image_h"], row["image_w"]) == (SIZE, SIZE)
                np.testing.assert_allclose(row["gt_boxes"], target["boxes"].numpy(), atol=1e-4)
                assert row["gt_labels"] == target["labels"].tolist()
    meta = LocalStore(store_dir).read_meta("detr-trainer", "v1")
    assert (meta["task"], meta["architecture"], meta["num_classes"]) == ("object_detection",
                                                                         "hf.DetrForObjectDetection", 3)
    assert meta.get("iou_thresh") is None and meta["max_detections_per_image"] == 300
    assert not list((store_dir / "detr-trainer" / "v1").glob("label_tracker_*.png"))

    # the last evaluation ran with the final weights: its stored detections are the processor's decoding
    model.eval()
    images = torch.stack([row["pixel_values"] for row in eval_rows])
    with torch.no_grad():
        outputs = model(pixel_values=images)
    expected = DetrImageProcessor().post_process_object_detection(outputs, threshold=0.05,
                                                                  target_sizes=[(SIZE, SIZE)] * len(eval_rows))
    rows = read(store_dir, "detr-trainer", "eval", 1)
    for row, reference in zip(eval_rows, expected):
        stored = rows[str(row["id"])]
        np.testing.assert_allclose(stored["pred_scores"], reference["scores"].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stored["pred_boxes"], reference["boxes"].clamp(0, SIZE).numpy(), atol=1e-3)
        assert stored["pred_labels"] == reference["labels"].tolist()
    table = LocalStore(store_dir).read_traces("detr-trainer", "v1", "eval", [1])
    assert decode_vectors(table, "features").shape == (8, 16)  # d_model: decoder output averaged over queries
