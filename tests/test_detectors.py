"""Detector families: torchvision (real models, random weights), generic PyTorch (DETR dicts, CenterNet
heatmaps), Keras 3 and the TF Object Detection API (exact synthetic outputs), and the shared checks
of bad input through them."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mldbg_callbacks.core.vectors import decode_vectors
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.training import DetectionTracer, ObjectDetectionTracer

torchvision_detection = pytest.importorskip("torchvision.models.detection")
tv = pytest.importorskip("mldbg_callbacks.integrations.detectors.torchvision")
generic = pytest.importorskip("mldbg_callbacks.integrations.detectors.torch_generic")
tf_od = pytest.importorskip("mldbg_callbacks.integrations.detectors.tensorflow")


def read_rows(store_dir, model="det", version="v1", dataset_type="val", epoch=0):
    table = LocalStore(store_dir).read_traces(model, version, dataset_type, [epoch])
    rows = sorted(table.to_pylist(), key=lambda row: row["input_id"])
    return table, rows


def as_f32(rows, column):
    return [np.asarray(row[column], dtype=np.float32).reshape(-1, 4) if column.endswith("boxes")
            else np.asarray(row[column]) for row in rows]


def expected_filter(detection: dict, score_thresh: float, max_detections: int) -> dict:
    """What the codec keeps of one image's model output: score >= thresh, the top max_detections, model order."""
    scores = detection["scores"].detach().numpy()
    keep = np.flatnonzero(scores >= np.float32(score_thresh))
    keep = np.sort(keep[np.argsort(-scores[keep], kind="stable")][:max_detections])
    return {"boxes": detection["boxes"].detach().numpy()[keep].astype(np.float32),
            "scores": scores[keep].astype(np.float32),
            "labels": detection["labels"].detach().numpy()[keep]}


# -- torchvision ------------------------------------------------------------------------------------
def build(family: str) -> nn.Module:
    """A fresh copy of the family's tiny random-weight model (built once per test session: initialising
    a ResNet-50 costs more than copying it)."""
    return copy.deepcopy(_build(family))


@functools.lru_cache(maxsize=None)
def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    small = {"min_size": 64, "max_size": 64}
    if family == "faster_rcnn":
        return torchvision_detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=3, **small)
    if family == "ssd":
        model = torchvision_detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
        model.transform.fixed_size = (128, 128)  # instead of 320x320: cheaper, anchors follow the feature maps
        return model
    if family == "retinanet":
        return torchvision_detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **small)
    return torchvision_detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **small)


TRACER_OF = {"faster_rcnn": "FasterRCNNTracer", "ssd": "SSDTracer", "retinanet": "RetinaNetTracer",
             "fcos": "FCOSTracer"}


def threshold_owner(model: nn.Module) -> object:
    return model.roi_heads if hasattr(model, "roi_heads") else model


def set_model_thresholds(model: nn.Module, score: float, nms: float, max_det: int) -> None:
    owner = threshold_owner(model)
    owner.score_thresh, owner.nms_thresh, owner.detections_per_img = score, nms, max_det


def tiny_images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 64, generator=generator), torch.rand(3, 48, 64, generator=generator)]


def tiny_targets() -> list[dict]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 10.0, 20.0, 25.0]]), "labels": torch.tensor([1, 2])},
            {"boxes": torch.tensor([[0.0, 0.0, 63.0, 47.0]]), "labels": torch.tensor([2])}]


def dict_of_lists(targets: list[dict]) -> dict:
    return {"boxes": [t["boxes"] for t in targets], "labels": [t["labels"] for t in targets]}


def test_torchvision_module_does_not_shadow_the_package():
    import torchvision

    assert torchvision.__file__ != tv.__file__
    assert hasattr(torchvision, "models")


@pytest.mark.parametrize("family", list(TRACER_OF))
def test_torchvision_factory_reads_thresholds_and_explicit_args_win(family, store_dir):
    model = build(family)
    set_model_thresholds(model, 0.3, 0.4, 7)
    tracer = ObjectDetectionTracer(model, "det", "v1")
    assert type(tracer).__name__ == TRACER_OF[family]
    assert isinstance(tracer, tv.TorchvisionDetectionTracer)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_image, tracer.num_classes) == (
        0.3, 0.4, 7, 3)
    assert tracer.architecture == f"torchvision.{type(model).__name__}"
    tracer.close()
    explicit = ObjectDetectionTracer(model, "det", "v2", score_thresh=0.6, iou_thresh=0.7,
                                     max_detections_per_image=5, num_classes=9)
    assert (explicit.score_thresh, explicit.iou_thresh, explicit.max_detections_per_image, explicit.num_classes) == (
        0.6, 0.7, 5, 9)
    explicit.close()


@pytest.mark.parametrize("family", list(TRACER_OF))
def test_torchvision_eval_trace_equals_model_output(family, store_dir):
    model = build(family).eval()
    if family != "faster_rcnn":  # random heads score ~0.01: let the model keep low scores
        set_model_thresholds(model, 0.001, 0.5, 50)
    images, targets = tiny_images(), tiny_targets()
    with torch.no_grad():
        reference = model(images)
    assert len(reference[0]["scores"]) > 3, "the random model must produce detections for this test to mean much"
    # a tracer threshold inside the model's score range, so the uniform filter really cuts
    score_thresh = float(reference[0]["scores"][len(reference[0]["scores"]) // 2])
    tracer = ObjectDetectionTracer(model, "det", "v1", score_thresh=score_thresh, max_detections_per_image=4)
    with torch.no_grad():
        returned = tracer(images, targets, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    assert isinstance(returned, list) and len(returned) == 2
    tracer.wait_for_save()
    table, rows = read_rows(store_dir)
    assert [(r["image_h"], r["image_w"]) for r in rows] == [(64, 64), (48, 64)]
    for row, detection, target in zip(rows, reference, targets):
        expected = expected_filter(detection, score_thresh, 4)
        np.testing.assert_array_equal(np.asarray(row["pred_boxes"], np.float32).reshape(-1, 4), expected["boxes"])
        np.testing.assert_array_equal(np.asarray(row["pred_scores"], np.float32), expected["scores"])
        np.testing.assert_array_equal(row["pred_labels"], expected["labels"])
        np.testing.assert_array_equal(np.asarray(row["gt_boxes"], np.float32), target["boxes"].numpy())
        assert row["gt_labels"] == target["labels"].tolist()
    assert len(rows[0]["pred_scores"]) >= 1
    features = decode_vectors(table, "features")
    assert features.shape[0] == 2 and np.isfinite(features).all()
    meta = LocalStore(store_dir).read_meta("det", "v1")
    assert meta["architecture"] == f"torchvision.{type(model).__name__}"
    assert meta["num_classes"] == 3


def test_torchvision_train_mode_returns_losses_and_traces_an_inference_pass(store_dir):
    # the training path is shared by every torchvision family (TorchvisionDetectionTracer.forward)
    model = build("faster_rcnn").train()
    model.backbone.body.eval()  # a module kept in eval mode on purpose: its flag must survive the extra pass
    flags = {name: m.training for name, m in model.named_modules()}
    images, targets = tiny_images(), tiny_targets()
    tracer = ObjectDetectionTracer(model, "det", "v1", score_thresh=0.0, max_detections_per_image=1000)
    losses = tracer(images, dict_of_lists(targets), input_ids=["a", "b"], dataset_type="train", n_epoch=0)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.is_tensor(v) and v.ndim == 0 and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == flags
    tracer.wait_for_save()
    with torch.no_grad():
        reference = model.eval()(images)  # what the tracer's inference pass saw (BN statistics included)
    table, rows = read_rows(store_dir, dataset_type="train")
    assert len(rows) == 2 and decode_vectors(table, "features").shape == (2, model.backbone.out_channels)
    for row, detection, target in zip(rows, reference, targets):
        expected = expected_filter(detection, 0.0, 1000)
        np.testing.assert_array_equal(row["pred_labels"], expected["labels"])
        np.testing.assert_array_equal(np.asarray(row["pred_boxes"], np.float32).reshape(-1, 4), expected["boxes"])
        np.testing.assert_array_equal(np.asarray(row["pred_scores"], np.float32), expected["scores"])
        np.testing.assert_array_equal(np.asarray(row["gt_boxes"], np.float32), target["boxes"].numpy())
    assert sum(len(r["pred_scores"]) for r in rows) > 0


def test_torchvision_targets_converts_both_ground_truth_formats():
    masks = [torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(0, 8, 8, dtype=torch.uint8)]
    converted = tv.torchvision_targets({"boxes": [np.array([[1, 2, 3, 4], [2, 3, 4, 5]]), np.zeros((0, 4))],
                                        "labels": [[1, 2], []], "masks": masks}, 2)
    assert converted[0]["boxes"].dtype == torch.float32 and converted[0]["labels"].dtype == torch.int64
    assert converted[0]["boxes"].tolist() == [[1, 2, 3, 4], [2, 3, 4, 5]]
    assert converted[1]["boxes"].shape == (0, 4) and converted[1]["labels"].shape == (0,)
    assert converted[0]["masks"] is masks[0]
    given = tiny_targets()
    passed = tv.torchvision_targets(given, 2)
    assert passed[0]["boxes"] is given[0]["boxes"]  # tensors are not copied
    with pytest.raises(TraceInputError, match=r"List\[Dict\].*Dict\[str, List\]"):
        tv.torchvision_targets([(torch.zeros(1, 4), torch.zeros(1))], 1)


def test_torchvision_ground_truth_labels_beyond_num_classes_are_refused(store_dir):
    model = build("faster_rcnn").eval()
    tracer = ObjectDetectionTracer(model, "det", "v1")
    targets = tiny_targets()
    targets[1]["labels"] = torch.tensor([7])  # the model has 3 classes
    with torch.no_grad():
        tracer(tiny_images(), targets, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    stats = tracer.wait_for_save()
    assert stats.rows_skipped["label_out_of_range"] == 1
    _, rows = read_rows(store_dir)
    assert [r["input_id"] for r in rows] == ["a"]


# -- generic PyTorch -------------------------------------------------------------------------------
class FixedOutput(nn.Module):
    """Returns a given output whatever the input; runs a real 1x1 conv backbone for the features."""

    def __init__(self, output):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, kernel_size=1)
        self.output = output

    def forward(self, images):
        self.backbone(images if torch.is_tensor(images) else torch.stack(images))
        return self.output


class DETR(FixedOutput):  # the facebookresearch class name
    def __init__(self, output, num_classes=2, num_queries=3):
        super().__init__(output)
        self.class_embed = nn.Linear(8, num_classes + 1)
        self.num_queries = num_queries


class DeformableDETR(FixedOutput):
    def __init__(self, output, num_classes=2):
        super().__init__(output)
        self.class_embed = nn.ModuleList([nn.Linear(8, num_classes) for _ in range(2)])


def detr_logits(probabilities) -> torch.Tensor:
    return torch.log(torch.tensor(probabilities, dtype=torch.float32))


def logit(p) -> torch.Tensor:
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def two_image_gt():
    return [{"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_generic_torchvision_style_output_is_stored_as_given(store_dir):
    per_image = [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [3.0, 3.0, 9.0, 9.5]]),
                  "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([2, 0])},
                 {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    model = FixedOutput(per_image)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tracer = ObjectDetectionTracer(model, "det", "v1")
    assert isinstance(tracer, generic.TorchDetectionTracer) and tracer.uses_nms
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_image) == (0.05, 0.5, 300)
    tracer(images, two_image_gt(), input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    table, rows = read_rows(store_dir)
    assert rows[0]["pred_boxes"] == [[1.0, 2.0, 5.0, 6.0], [3.0, 3.0, 9.0, 9.5]]
    assert rows[0]["pred_labels"] == [2, 0] and np.allclose(rows[0]["pred_scores"], [0.9, 0.4])
    # an image with no ground truth and no predictions is a row of empty lists, not skipped
    assert rows[1]["pred_boxes"] == [] and rows[1]["gt_boxes"] == [] and rows[1]["gt_labels"] == []
    with torch.no_grad():
        expected_features = model.backbone(images).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(decode_vectors(table, "features").astype(np.float32), expected_features, atol=2e-3)


def test_generic_detr_softmax_decoding_matches_postprocess(store_dir):
    logits = detr_logits([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.02, 0.03, 0.95]],
                          [[0.25, 0.5, 0.25], [0.01, 0.01, 0.98], [0.02, 0.02, 0.96]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.5], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
                          [[0.75, 0.5, 0.5, 1.0], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]])
    model = DETR({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []})
    with pytest.warns(UserWarning, match="no NMS"):
        tracer = ObjectDetectionTracer(model, "det", "v1", iou_thresh=0.5, score_thresh=0.05)
    assert isinstance(tracer, generic.TorchDetectionTracer)
    assert tracer.uses_nms is False and tracer.iou_thresh is None
    assert (tracer.num_classes, tracer.max_detections_per_image) == (2, 3)  # class_embed - 1, num_queries
    images = torch.zeros(2, 3, 32, 64)  # H=32, W=64
    tracer(images, two_image_gt(), input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    assert rows[0]["pred_boxes"] == [[24.0, 8.0, 40.0, 24.0], [0.0, 0.0, 32.0, 16.0]]  # query 2 scores 0.03
    np.testing.assert_allclose(rows[0]["pred_scores"], [0.7, 0.6], rtol=1e-6)
    assert rows[0]["pred_labels"] == [0, 1]
    assert rows[1]["pred_boxes"] == [[32.0, 0.0, 64.0, 32.0]]
    np.testing.assert_allclose(rows[1]["pred_scores"], [0.5], rtol=1e-6)
    assert rows[1]["pred_labels"] == [1]
    meta = LocalStore(store_dir).read_meta("det", "v1")
    assert meta.get("iou_thresh") is None and meta["architecture"] == "detr.DETR"  # None is not written


def test_generic_detr_target_sizes_scale_the_boxes(store_dir):
    logits = detr_logits([[[0.7, 0.2, 0.1]], [[0.2, 0.7, 0.1]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.5]], [[0.5, 0.5, 0.5, 0.5]]])
    tracer = ObjectDetectionTracer(DETR({"pred_logits": logits, "pred_boxes": boxes}, num_queries=1), "det", "v1")
    tracer(torch.zeros(2, 3, 32, 32), two_image_gt(), input_ids=["a", "b"], dataset_type="val", n_epoch=0,
           target_sizes=torch.tensor([[100, 200], [40, 80]]))
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    assert [(r["image_h"], r["image_w"]) for r in rows] == [(100, 200), (40, 80)]
    assert rows[0]["pred_boxes"] == [[75.0, 25.0, 125.0, 75.0]]
    assert rows[1]["pred_boxes"] == [[20.0, 10.0, 60.0, 30.0]]


def test_generic_detr_nested_tensor_uses_the_unpadded_sizes(store_dir):
    class NestedTensor:  # facebookresearch util.misc.NestedTensor: padded batch + mask (True on padding)
        def __init__(self, tensors, mask):
            self.tensors, self.mask = tensors, mask

    class NestedDETR(DETR):
        def forward(self, samples):
            return super().forward(samples.tensors)

    mask = torch.ones(2, 32, 64, dtype=torch.bool)
    mask[0, :32, :64] = False
    mask[1, :16, :32] = False  # image 1 is 16 x 32, padded
    logits = detr_logits([[[0.7, 0.2, 0.1]], [[0.2, 0.7, 0.1]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5, 0.5]]])
    tracer = ObjectDetectionTracer(NestedDETR({"pred_logits": logits, "pred_boxes": boxes}, num_queries=1), "det", "v1")
    tracer(NestedTensor(torch.zeros(2, 3, 32, 64), mask), two_image_gt(), input_ids=["a", "b"], dataset_type="val",
           n_epoch=0)
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    assert [(r["image_h"], r["image_w"]) for r in rows] == [(32, 64), (16, 32)]
    assert rows[0]["pred_boxes"] == [[16.0, 8.0, 48.0, 24.0]] and rows[1]["pred_boxes"] == [[8.0, 4.0, 24.0, 12.0]]


def test_generic_deformable_detr_sigmoid_top_k(store_dir):
    logits = torch.stack([logit([[0.9, 0.2], [0.6, 0.1]]), logit([[0.1, 0.1], [0.3, 0.8]])])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]],
                          [[0.5, 0.5, 1.0, 1.0], [0.75, 0.75, 0.5, 0.5]]])
    model = DeformableDETR({"pred_logits": logits, "pred_boxes": boxes})
    tracer = ObjectDetectionTracer(model, "det", "v1", score_thresh=0.15, max_detections_per_image=3)
    assert tracer.uses_nms is False and tracer.num_classes == 2
    tracer(torch.zeros(2, 3, 16, 16), two_image_gt(), input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    # image 0: top 3 of the 4 (query, class) pairs: (0, 0) 0.9, (1, 0) 0.6, (0, 1) 0.2
    assert rows[0]["pred_boxes"] == [[4.0, 4.0, 12.0, 12.0], [0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 12.0]]
    np.testing.assert_allclose(rows[0]["pred_scores"], [0.9, 0.6, 0.2], rtol=1e-6)
    assert rows[0]["pred_labels"] == [0, 0, 1]
    # image 1: (1, 1) 0.8, (1, 0) 0.3, then 0.1 (below score_thresh)
    assert rows[1]["pred_boxes"] == [[8.0, 8.0, 16.0, 16.0], [8.0, 8.0, 16.0, 16.0]]
    np.testing.assert_allclose(rows[1]["pred_scores"], [0.8, 0.3], rtol=1e-6)
    assert rows[1]["pred_labels"] == [1, 0]


def test_generic_detr_output_found_at_first_call_drops_iou_thresh(store_dir):
    logits = detr_logits([[[0.7, 0.2, 0.1]]])
    model = FixedOutput({"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])})
    tracer = ObjectDetectionTracer(model, "det", "v1", iou_thresh=0.6)
    assert tracer.uses_nms and tracer.iou_thresh == 0.6
    with pytest.warns(UserWarning, match="iou_thresh=0.6 is ignored"):
        tracer(torch.zeros(1, 3, 16, 16), two_image_gt()[:1], input_ids=["a"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    assert tracer.uses_nms is False and tracer.iou_thresh is None
    assert LocalStore(store_dir).read_meta("det", "v1").get("iou_thresh") is None
    _, rows = read_rows(store_dir)
    assert rows[0]["pred_boxes"] == [[4.0, 4.0, 12.0, 12.0]]


def centernet_head(heat_key="hm", offset_key="reg") -> dict:
    """C=2 classes on an 8x8 heatmap. Class 0 peaks at (y=2, x=3) with 0.75 and has a 0.25 neighbour at
    (2, 4) that the 3x3 max-pool NMS removes; class 1 peaks at (5, 6) with 0.5."""
    heat = torch.full((1, 2, 8, 8), -20.0)
    heat[0, 0, 2, 3] = math.log(3.0)
    heat[0, 0, 2, 4] = math.log(1.0 / 3.0)
    heat[0, 1, 5, 6] = 0.0
    wh = torch.zeros(1, 2, 8, 8)
    wh[0, :, 2, 3] = torch.tensor([4.0, 2.0])
    wh[0, :, 2, 4] = torch.tensor([8.0, 8.0])
    wh[0, :, 5, 6] = torch.tensor([2.0, 2.0])
    offset = torch.zeros(1, 2, 8, 8)
    offset[0, :, 2, 3] = torch.tensor([0.5, 0.25])
    return {heat_key: heat, "wh": wh, offset_key: offset}


@pytest.mark.parametrize("keys", [("hm", "reg"), ("heatmap", "offset")])
@pytest.mark.parametrize("stacked", [False, True])
def test_generic_centernet_decoding(keys, stacked, store_dir):
    head = centernet_head(*keys)
    garbage = {keys[0]: torch.zeros(1, 2, 8, 8), "wh": torch.ones(1, 2, 8, 8), keys[1]: torch.zeros(1, 2, 8, 8)}
    model = FixedOutput([garbage, head] if stacked else head)
    tracer = ObjectDetectionTracer(model, "det", "v1", score_thresh=0.05)
    # image 32 (H) x 48 (W) for an 8x8 heatmap: stride 4 vertically, 6 horizontally
    tracer(torch.zeros(1, 3, 32, 48), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], input_ids=["a"],
           dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    # class 0: centre (3 + 0.5, 2 + 0.25) cells, size 4 x 2 cells; class 1: centre (6, 5), 2 x 2, no offset there
    assert rows[0]["pred_boxes"] == [[9.0, 5.0, 33.0, 13.0], [30.0, 16.0, 42.0, 24.0]]
    np.testing.assert_allclose(rows[0]["pred_scores"], [0.75, 0.5], rtol=1e-6)
    assert rows[0]["pred_labels"] == [0, 1]


def test_generic_detr_boxes_past_the_border_are_stored_clipped(store_dir):
    logits = detr_logits([[[0.7, 0.2, 0.1]]])
    boxes = torch.tensor([[[0.875, 0.5, 0.5, 0.5]]])  # x from 0.625 to 1.125 of the width
    decoded = generic.decode_detr(logits, boxes, [(32, 64)])
    np.testing.assert_array_equal(decoded[0]["boxes"].numpy(), [[40.0, 8.0, 72.0, 24.0]])  # as DETR's PostProcess
    tracer = DetectionTracer(lambda x: x, "det", "v1", postprocess=lambda out, images: decoded)
    tracer(torch.zeros(1, 3, 32, 64), [{"boxes": np.zeros((0, 4)), "labels": []}], input_ids=["a"])
    tracer.wait_for_save()
    assert LocalStore(store_dir).read_traces("det", "v1", "train", [0]).to_pylist()[0]["pred_boxes"] == [
        [40.0, 8.0, 64.0, 24.0]]


def test_generic_centernet_without_offset_head_uses_cell_centres():
    head = centernet_head()
    del head["reg"]
    decoded = generic.decode_centernet(head, [(32, 32)], top_k=2)
    np.testing.assert_array_equal(decoded[0]["boxes"].numpy(), [[6.0, 6.0, 22.0, 14.0], [22.0, 18.0, 30.0, 26.0]])
    np.testing.assert_array_equal(decoded[0]["labels"].numpy(), [0, 1])


def test_generic_unknown_output_names_the_formats_and_postprocess(store_dir):
    model = FixedOutput(torch.zeros(2, 5))
    strict = ObjectDetectionTracer(model, "det", "v1", strict=True)
    with pytest.raises(TraceInputError) as error:
        strict(torch.zeros(2, 3, 8, 8), two_image_gt(), input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    for expected in ("'boxes'", "pred_logits", "'hm'", "postprocess="):
        assert expected in str(error.value)
    lenient = ObjectDetectionTracer(model, "det", "v2")
    with pytest.warns(UserWarning, match="undecodable_output"):
        returned = lenient(torch.zeros(2, 3, 8, 8), two_image_gt(), input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    assert returned is model.output
    assert lenient.stats.rows_skipped["undecodable_output"] == 2


# -- factory ----------------------------------------------------------------------------------------
def test_unknown_model_lists_the_families_and_postprocess():
    with pytest.raises(TypeError) as error:
        ObjectDetectionTracer(object(), "det", "v1")
    message = str(error.value)
    for family in ("torchvision Faster R-CNN", "Ultralytics", "Keras", "TensorFlow Object Detection API",
                   "facebookresearch DETR", "postprocess="):
        assert family in message


def test_postprocess_traces_an_arbitrary_callable(store_dir):
    def model(images):  # e.g. an ONNX session wrapper: (boxes, scores, classes) arrays for the batch
        return (np.array([[[1, 1, 5, 5], [2, 2, 4, 4]]], np.float32), np.array([[0.9, 0.01]], np.float32),
                np.array([[1, 0]]))

    def postprocess(outputs, images):
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(*outputs)]

    tracer = ObjectDetectionTracer(model, "det", "v1", postprocess=postprocess)
    assert type(tracer) is DetectionTracer
    tracer(np.zeros((1, 3, 8, 8), np.float32), {"boxes": [np.zeros((0, 4))], "labels": [np.zeros(0)]},
           input_ids=[7], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    assert rows[0]["input_id"] == "7" and rows[0]["pred_boxes"] == [[1.0, 1.0, 5.0, 5.0]]
    assert (rows[0]["image_h"], rows[0]["image_w"]) == (8, 8)


# -- bad input, through the generic family -----------------------------------------------------------
def fixed_tracer(per_image, version="v1", **kwargs):
    return ObjectDetectionTracer(FixedOutput(per_image), "det", version, **kwargs)


def one_detection(box=(1.0, 1.0, 5.0, 5.0), score=0.9, label=1) -> dict:
    return {"boxes": torch.tensor([box]), "scores": torch.tensor([score]), "labels": torch.tensor([label])}


def test_inverted_ground_truth_boxes_are_skipped_and_counted_or_raise_in_strict_mode(store_dir):
    outputs = [one_detection(), one_detection()]
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[6.0, 1.0, 2.0, 5.0]]), "labels": torch.tensor([1])}]  # x2 < x1
    tracer = fixed_tracer(outputs)
    with pytest.warns(UserWarning, match="x2 < x1"):  # warned by the background worker, once: maybe before the wait
        tracer(torch.zeros(2, 3, 8, 8), targets, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
        stats = tracer.wait_for_save()
    assert stats.rows_skipped["invalid_ground_truth_boxes"] == 1
    assert [r["input_id"] for r in read_rows(store_dir)[1]] == ["a"]
    strict = fixed_tracer(outputs, "v2", strict=True)
    with pytest.raises(TraceInputError, match="x2 < x1"):
        strict(torch.zeros(2, 3, 8, 8), targets, input_ids=["a", "b"], dataset_type="val", n_epoch=0)


def test_nan_scores_and_labels_beyond_num_classes_are_skipped(store_dir):
    outputs = [one_detection(score=float("nan")), one_detection(label=5), one_detection(label=2)]
    tracer = fixed_tracer(outputs, num_classes=3)
    gt = {"boxes": [torch.zeros(0, 4)] * 3, "labels": [torch.zeros(0)] * 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracer(torch.zeros(3, 3, 8, 8), gt, input_ids=["a", "b", "c"], dataset_type="val", n_epoch=0)
    stats = tracer.wait_for_save()
    assert stats.rows_skipped["non_finite_predictions"] == 1
    assert stats.rows_skipped["label_out_of_range"] == 1
    _, rows = read_rows(store_dir)
    assert [r["input_id"] for r in rows] == ["c"] and rows[0]["pred_labels"] == [2]


def test_mismatched_image_counts_name_the_counts(store_dir):
    outputs = [one_detection(), one_detection()]
    one_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    strict = fixed_tracer(outputs, strict=True)
    with pytest.raises(TraceInputError, match="predicted boxes: 2.*ground-truth boxes: 1"):
        strict(torch.zeros(2, 3, 8, 8), one_gt, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    with pytest.raises(TraceInputError, match="input_ids: 3"):
        strict(torch.zeros(2, 3, 8, 8), one_gt * 2, input_ids=["a", "b", "c"], dataset_type="val", n_epoch=0)
    lenient = fixed_tracer(outputs, "v2")
    with pytest.warns(UserWarning, match="different numbers of images"):
        lenient(torch.zeros(2, 3, 8, 8), one_gt, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    assert lenient.stats.rows_skipped["invalid_batch"] == 2


def test_ground_truth_in_an_unknown_format_shows_both_formats(store_dir):
    strict = fixed_tracer([one_detection()], strict=True)
    with pytest.raises(TraceInputError, match=r"List\[Dict\].*Dict\[str, List\]"):
        strict(torch.zeros(1, 3, 8, 8), [(torch.zeros(1, 4), torch.zeros(1))], input_ids=["a"], dataset_type="val",
               n_epoch=0)


# -- Keras ------------------------------------------------------------------------------------------
keras = pytest.importorskip("keras")
kd = pytest.importorskip("mldbg_callbacks.integrations.detectors.keras")

# one box, [x1, y1, x2, y2] = [8, 4, 24, 20] in a 32 (H) x 64 (W) image, in every Keras format
SAME_BOX = {"xyxy": [8, 4, 24, 20], "yxyx": [4, 8, 20, 24], "xywh": [8, 4, 16, 16], "center_xywh": [16, 12, 16, 16],
            "center_yxhw": [12, 16, 16, 16], "rel_xyxy": [0.125, 0.125, 0.375, 0.625],
            "rel_yxyx": [0.125, 0.125, 0.625, 0.375], "rel_xywh": [0.125, 0.125, 0.25, 0.5],
            "rel_center_xywh": [0.25, 0.375, 0.25, 0.5], "rel_center_yxhw": [0.375, 0.25, 0.5, 0.25]}


@pytest.mark.parametrize("box_format", list(SAME_BOX))
def test_keras_box_formats_become_absolute_xyxy(box_format):
    converted = kd.boxes_to_xyxy(np.array([SAME_BOX[box_format]], np.float32), box_format, (32, 64))
    np.testing.assert_array_equal(converted, np.array([[8, 4, 24, 20]], np.float32))
    with pytest.raises(ValueError, match="rel_yxyx"):
        kd.parse_box_format("yolo")


class ConstantKerasDetector(keras.Model):
    """A real Keras model (torch backend) whose call returns a decoded KerasCV/KerasHub-style dict of
    exact constants; its 1x1 conv backbone runs on the images for the features."""

    def __init__(self, outputs, bounding_box_format="rel_yxyx", **kwargs):
        super().__init__(**kwargs)
        self.backbone = keras.layers.Conv2D(4, 1)
        self.bounding_box_format = bounding_box_format
        self.num_classes = 3
        self.prediction_decoder = SimpleNamespace(confidence_threshold=0.2, iou_threshold=0.45, max_detections=10)
        self.constant_outputs = {key: np.asarray(value) for key, value in outputs.items()}

    def call(self, images, training=False):
        self.backbone(images)
        return {key: keras.ops.convert_to_tensor(value) for key, value in self.constant_outputs.items()}


class RawKerasDetector(ConstantKerasDetector):
    def call(self, images, training=False):
        self.backbone(images)
        return {"box_regression": keras.ops.zeros((2, 5, 64)), "cls_logits": keras.ops.zeros((2, 5, 3))}


class DecodingKerasDetector(RawKerasDetector):
    def decode_predictions(self, predictions, images):
        assert set(predictions) == {"box_regression", "cls_logits"}
        return {key: keras.ops.convert_to_tensor(value) for key, value in self.constant_outputs.items()}


KERAS_OUTPUTS = {  # rel_yxyx boxes; image 0 has 2 detections + padding, image 1 one (row 2 beyond num_detections)
    "boxes": np.array([[[0.125, 0.125, 0.625, 0.375], [0.0, 0.0, 0.5, 0.5], [-1, -1, -1, -1]],
                       [[0.25, 0.5, 0.75, 1.0], [-1, -1, -1, -1], [0.0, 0.0, 1.0, 1.0]]], np.float32),
    "confidence": np.array([[0.9, 0.3, -1.0], [0.8, -1.0, 0.7]], np.float32),
    "classes": np.array([[2, 0, -1], [1, -1, 2]], np.int32),
    "num_detections": np.array([2, 1], np.int32),
}
KERAS_IMAGES = np.zeros((2, 32, 64, 3), np.float32)


def check_keras_rows(store_dir):
    table, rows = read_rows(store_dir)
    assert [(r["image_h"], r["image_w"]) for r in rows] == [(32, 64), (32, 64)]
    assert rows[0]["pred_boxes"] == [[8.0, 4.0, 24.0, 20.0], [0.0, 0.0, 32.0, 16.0]]
    np.testing.assert_allclose(rows[0]["pred_scores"], [0.9, 0.3], rtol=1e-7)
    assert rows[0]["pred_labels"] == [2, 0]
    assert rows[1]["pred_boxes"] == [[32.0, 8.0, 64.0, 24.0]] and rows[1]["pred_labels"] == [1]
    return table


def test_keras_detector_traced_with_its_box_format_and_settings(store_dir):
    model = ConstantKerasDetector(KERAS_OUTPUTS)
    tracer = ObjectDetectionTracer(model, "det", "v1")
    assert isinstance(tracer, kd.KerasDetectionTracer)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_image, tracer.num_classes) == (
        0.2, 0.45, 10, 3)
    explicit = ObjectDetectionTracer(model, "det", "v2", score_thresh=0.5, iou_thresh=0.6,
                                     max_detections_per_image=4, bounding_box_format="xyxy")
    assert (explicit.score_thresh, explicit.iou_thresh, explicit.max_detections_per_image,
            explicit.bounding_box_format) == (0.5, 0.6, 4, "xyxy")
    explicit.close()
    outputs = tracer(KERAS_IMAGES, {"boxes": [np.zeros((0, 4))] * 2, "labels": [np.zeros(0)] * 2},
                     input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    assert set(outputs) == set(KERAS_OUTPUTS)
    tracer.wait_for_save()
    table = check_keras_rows(store_dir)
    assert decode_vectors(table, "features").shape == (2, 4)
    assert LocalStore(store_dir).read_meta("det", "v1")["architecture"] == "keras.ConstantKerasDetector"


def test_keras_raw_outputs_use_decode_predictions_or_say_what_to_do(store_dir):
    tracer = ObjectDetectionTracer(DecodingKerasDetector(KERAS_OUTPUTS), "det", "v1", feature_layer=False)
    tracer(KERAS_IMAGES, [{"boxes": np.zeros((0, 4)), "labels": []}] * 2, input_ids=["a", "b"], dataset_type="val",
           n_epoch=0)
    tracer.wait_for_save()
    table = check_keras_rows(store_dir)
    assert "features" not in table.column_names
    strict = ObjectDetectionTracer(RawKerasDetector(KERAS_OUTPUTS), "det", "v2", strict=True)
    with pytest.raises(TraceInputError) as error:
        strict(KERAS_IMAGES, [{"boxes": np.zeros((0, 4)), "labels": []}] * 2, input_ids=["a", "b"],
               dataset_type="val", n_epoch=0)
    for expected in ("decode_predictions", "predict()", "postprocess="):
        assert expected in str(error.value)


def test_real_keras_hub_retinanet_is_traced_from_its_decoded_predictions(store_dir):
    """A real KerasHub RetinaNetObjectDetector (random weights, torch backend): the tracer calls the model,
    decodes through the model's own decode_predictions (its NMS) and stores exactly those detections."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=4, use_p5=False,
                                                  image_shape=(64, 64, 3))
    # a high class prior so that random weights give detections above the decoder's 0.5 threshold
    model = keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=3, bounding_box_format="yxyx",
                                                     pre_logits_num_conv_layers=1,
                                                     classification_head_prior_probability=0.7)
    images = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    tracer = ObjectDetectionTracer(model, "kerashub", "v1")
    assert isinstance(tracer, kd.KerasDetectionTracer)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_image, tracer.num_classes) == (
        0.5, 0.5, 100, 3)
    raw = tracer(images, [{"boxes": np.array([[4.0, 4.0, 30.0, 40.0]]), "labels": np.array([2])}] * 2,
                 input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    expected = {k: keras.ops.convert_to_numpy(v) for k, v in model.decode_predictions(raw, images).items()}
    table = LocalStore(store_dir).read_traces("kerashub", "v1", "val", [0])
    for i, row in enumerate(table.to_pylist()):
        n = int(expected["num_detections"][i])
        xyxy = np.clip(expected["boxes"][i, :n][:, [1, 0, 3, 2]], 0, 64)  # stored boxes are clipped to the image
        assert len(row["pred_boxes"]) == n > 0
        np.testing.assert_array_equal(np.asarray(row["pred_boxes"], np.float32), xyxy)
        np.testing.assert_array_equal(np.asarray(row["pred_scores"], np.float32), expected["confidence"][i, :n])
        np.testing.assert_array_equal(row["pred_labels"], expected["labels"][i, :n])
        assert row["gt_boxes"] == [[4.0, 4.0, 30.0, 40.0]]
    assert decode_vectors(table, "features").shape[0] == 2


# -- TensorFlow Object Detection API (exact arrays; TensorFlow is not installed) ---------------------
TF_OUTPUTS = {  # normalised [ymin, xmin, ymax, xmax]; image 0 keeps 2 rows, image 1 one
    "detection_boxes": np.array([[[0.25, 0.125, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
                                 [[0.5, 0.5, 1.0, 0.75], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]], np.float32),
    "detection_scores": np.array([[0.9, 0.6, 0.0], [0.7, 0.65, 0.0]], np.float32),
    "detection_classes": np.array([[1.0, 3.0, 0.0], [2.0, 1.0, 0.0]], np.float32),
    "num_detections": np.array([2.0, 1.0], np.float32),
}


def test_tf_od_api_decoding_exact():
    decoded = tf_od.decode_tf_od_api(TF_OUTPUTS, [(40, 80), (40, 80)])
    np.testing.assert_array_equal(decoded[0]["boxes"], np.array([[10, 10, 60, 20], [0, 0, 80, 40]], np.float32))
    np.testing.assert_array_equal(decoded[0]["labels"], [1, 3])
    assert decoded[0]["labels"].dtype == np.int64
    np.testing.assert_array_equal(decoded[1]["boxes"], np.array([[40, 20, 60, 40]], np.float32))
    np.testing.assert_array_equal(decoded[1]["scores"], np.array([0.7], np.float32))
    with pytest.raises(TraceInputError, match="detection_boxes"):
        tf_od.decode_tf_od_api({"boxes": np.zeros((1, 1, 4))}, [(8, 8)])


class ServingSignatureStandIn:
    """Stands in for a loaded saved model's serving signature (keyword-only input, dict of outputs)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, *, input_tensor):
        assert input_tensor.shape[-1] == 3
        return self.outputs


ServingSignatureStandIn.__module__ = "tensorflow.python.saved_model.load"


def test_tf_od_api_tracer_through_the_registry(store_dir):
    model = ServingSignatureStandIn(TF_OUTPUTS)
    tracer = ObjectDetectionTracer(model, "det", "v1", input_key="input_tensor", num_classes=4)
    assert isinstance(tracer, tf_od.TFObjectDetectionTracer)
    assert (tracer.score_thresh, tracer.iou_thresh, tracer.max_detections_per_image) == (0.05, 0.5, 300)
    gt = [{"boxes": np.array([[10, 10, 60, 20]], np.float32), "labels": np.array([1])},
          {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0)}]
    tracer(np.zeros((2, 40, 80, 3), np.uint8), gt, input_ids=["a", "b"], dataset_type="val", n_epoch=0)
    tracer.wait_for_save()
    _, rows = read_rows(store_dir)
    assert rows[0]["pred_boxes"] == [[10.0, 10.0, 60.0, 20.0], [0.0, 0.0, 80.0, 40.0]]
    assert rows[0]["pred_labels"] == [1, 3] and rows[1]["pred_labels"] == [2]
    assert (rows[0]["image_h"], rows[0]["image_w"]) == (40, 80)
    assert LocalStore(store_dir).read_meta("det", "v1")["architecture"] == "tf_od_api"
    with pytest.raises(ValueError, match="feature_layer"):
        ObjectDetectionTracer(model, "det", "v2", feature_layer="backbone")
