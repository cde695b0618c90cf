"""Ultralytics YOLO detectors in a custom loop: ``ObjectDetectionTracer(YOLO("yolov8n.yaml"), ...)``.

Reads: the ``DetectionModel`` (``YOLO(...).model``, or the ``DetectionModel`` itself) in eval mode returns
``(y, extras)`` with ``y`` of shape ``(batch, 4 + nc [+ extra], anchors)``: xywh boxes in input pixels and
per-class scores. ``ultralytics.utils.nms.non_max_suppression`` turns it into one ``(N, 6 + extra)`` tensor
per image: ``[x1, y1, x2, y2, score, class]`` in pixels of the input tensor (the letterboxed image the
model saw), which is what is stored; nothing is rescaled. End-to-end heads (YOLOv10/YOLO26 style) go
through the same function with ``end2end=True`` (no NMS, only the score filter and ``max_det``).

Images: an NCHW float tensor in ``[0, 1]`` (uint8 is divided by 255), already letterboxed to a multiple of
the model stride, as an Ultralytics or custom DataLoader gives. Ground truth: either format of the
product page, boxes ``[x1, y1, x2, y2]`` in pixels of the same tensor, labels = the model's class indices.

Thresholds: ``conf`` / ``iou`` / ``max_det`` from ``YOLO.overrides`` when the user set them
(``YOLO(..., ...).overrides["conf"] = 0.1`` or after ``model.train(conf=...)``), else the product's
fallbacks 0.05 / 0.5 / 300 (not Ultralytics' predict default conf=0.25: it would hide the low-score
detections the analysis looks at). NMS is per class with one label per box, as ``predict`` does.

Training mode: the caller gets the model's own training output (for its loss); the detections come from
an extra eval-mode pass without gradients (BatchNorm statistics are not updated by it).

Features: by default the output of the last backbone layer (SPPF for YOLOv8/11), averaged over space.
"""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.nms import non_max_suppression

from mldbg_callbacks.integrations.torch_model import TorchFeatureCapture
from mldbg_callbacks.training import DetectionTracer

__all__ = ["YOLOTracer"]

# Tasks whose heads predict axis-aligned boxes (segmentation and pose add extra channels after the classes).
BOX_TASKS = {"DetectionModel": "detect", "SegmentationModel": "segment", "PoseModel": "pose",
             "YOLOEModel": "detect", "WorldModel": "detect"}


class YOLOTracer(DetectionTracer):
    """DetectionTracer for Ultralytics YOLO models (``YOLO`` objects or their ``DetectionModel``)."""

    architecture = "ultralytics.YOLO"
    uses_nms = True

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, *,
                 feature_layer: Any = None, **kwargs: Any):
        self.yolo = None if isinstance(model, DetectionModel) else model  # YOLO is an nn.Module too
        self.detection_model = _detection_model(model)
        self.architecture = f"ultralytics.{type(self.detection_model).__name__}"
        self._capture = _feature_capture(self.detection_model, feature_layer)
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_image=max_detections_per_image, feature_layer=feature_layer, **kwargs)

    def model_settings(self) -> dict:
        overrides = dict(getattr(self.yolo, "overrides", None) or {})
        settings: dict[str, Any] = {}
        for key, name in (("conf", "score_thresh"), ("iou", "iou_thresh"), ("max_det", "max_detections")):
            if overrides.get(key) is not None:
                settings[name] = overrides[key]
        names = getattr(self.detection_model, "names", None)
        if names:
            names = dict(names) if isinstance(names, dict) else dict(enumerate(names))
            settings["class_names"] = {int(k): str(v) for k, v in names.items()}
        nc = getattr(self.detection_model, "nc", None) or (getattr(self.detection_model, "yaml", None) or {}).get("nc")
        settings["num_classes"] = int(nc) if nc else (len(names) if names else None)
        return settings

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        net = self.detection_model
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        self._capture.pop()
        if not net.training:
            outputs = net(x, **kwargs)
            return outputs, outputs, self._pooled_features()
        outputs = net(x, **kwargs)  # the training output the caller computes its loss from
        modes = [(m, m.training) for m in net.modules()]
        try:
            net.eval()
            with torch.no_grad():
                raw = net(x)
        finally:
            for module, training in modes:
                module.training = training
        return outputs, raw, self._pooled_features()

    def decode(self, outputs: Any, images: Any) -> list[dict]:
        prediction = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        if isinstance(prediction, dict) or not hasattr(prediction, "shape"):
            raise TypeError("YOLO output is not an inference output (the model ran in training mode?)")
        nc = self.num_classes or 0
        per_image = non_max_suppression(
            prediction.detach(), self.score_thresh, self.iou_thresh, nc=0 if self._task == "detect" else nc,
            multi_label=False, max_det=self.max_detections_per_image,
            end2end=bool(getattr(self.detection_model, "end2end", False)))
        return [{"boxes": p[:, :4], "scores": p[:, 4], "labels": p[:, 5]} for p in per_image]

    @property
    def _task(self) -> str:
        return BOX_TASKS.get(type(self.detection_model).__name__, "detect")

    def _pooled_features(self) -> Any:
        features = self._capture.pop()
        if features is not None and features.ndim == 4:
            features = features.mean(dim=(2, 3))
        return features

    def remove_hooks(self) -> None:
        self._capture.remove()


def _detection_model(model: Any) -> torch.nn.Module:
    net = model if isinstance(model, DetectionModel) else getattr(model, "model", None)
    if not isinstance(net, DetectionModel):
        task = getattr(model, "task", None)
        raise TypeError(f"ObjectDetectionTracer needs an Ultralytics detection model (YOLO task 'detect', 'segment' "
                        f"or 'pose'); got {type(net).__name__}" + (f" (task {task!r})" if task else "") +
                        ". Trace classification models with ClassificationTracer or "
                        "mldbg_callbacks.integrations.ultralytics.add_mldbg_callbacks")
    if type(net).__name__ == "OBBModel" or getattr(model, "task", None) == "obb":
        raise TypeError("oriented-box (OBB) YOLO models are not supported: stored boxes are axis-aligned "
                        "[x1, y1, x2, y2]")
    return net


def _feature_capture(net: torch.nn.Module, feature_layer: Any) -> TorchFeatureCapture:
    if feature_layer is None:
        backbone = (getattr(net, "yaml", None) or {}).get("backbone")
        layers = getattr(net, "model", None)
        if not backbone or layers is None or len(layers) < len(backbone):
            return TorchFeatureCapture(net, False)
        feature_layer = layers[len(backbone) - 1]  # last backbone layer (SPPF in YOLOv8/11)
    return TorchFeatureCapture(net, feature_layer)
