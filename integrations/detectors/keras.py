"""Keras 3 detectors (KerasHub ``ObjectDetector``s, KerasCV ``YOLOV8Detector`` / ``RetinaNet``, any
``keras.Model`` returning the same decoded dict).

Output read: ``{'boxes': (B, N, 4), 'confidence': (B, N), 'classes': (B, N), 'num_detections': (B,)}``
(KerasHub names the classes ``labels``),
what these models' ``predict()`` / ``decode_predictions()`` return after their non-max suppression. Rows
beyond ``num_detections`` and rows with class ``-1`` are padding and dropped. Boxes are in the model's
``bounding_box_format`` attribute (or ``bounding_box_format=`` given to the tracer) and converted to
absolute ``[x1, y1, x2, y2]`` pixels: ``xyxy``, ``yxyx``, ``xywh`` (top-left corner + size),
``center_xywh``, ``center_yxhw`` and their ``rel_`` variants (fractions of the image width/height). Images
are NHWC (Keras' layout); the image size is ``(H, W)`` of the input batch. Labels are the ``classes``
values as given.

Calling one of these models directly returns raw head outputs (box regressions and class logits); the
tracer then calls the model's ``decode_predictions(outputs, images)`` when it has one, and otherwise
refuses the output with an error naming ``predict``/``decode_predictions`` and ``postprocess=``.

Thresholds (``model_settings``): ``prediction_decoder.confidence_threshold`` / ``.iou_threshold`` /
``.max_detections`` (the NMS layer of KerasCV and KerasHub detectors) and the model's ``num_classes``.

Features (``feature_layer=None``): the output of ``model.backbone`` when the model has one (a tensor,
or the last value of a dict of pyramid levels), mean-pooled over the spatial axes (channels last).

Tested with a real KerasHub ``RetinaNetObjectDetector`` (random weights, torch backend; ``keras-hub`` is
installed without its TensorFlow-only dependencies, see ``scripts/setup.sh``) and with ``keras.Model``
subclasses returning exact constant dicts for every box format. KerasCV is not installable here (it needs
TensorFlow); its decoded dict is the same apart from the ``classes`` key, covered by the exact-array tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from mldbg_callbacks.core.arrays import to_numpy
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.integrations.keras_model import KerasForward
from mldbg_callbacks.training import DetectionTracer

# coordinate order of each base format; "rel_" prefixes mean fractions of the image size
BOX_FORMATS = ("xyxy", "yxyx", "xywh", "center_xywh", "center_yxhw")
DECODED_KEYS = ("boxes", "confidence")
CLASS_KEYS = ("classes", "labels")  # KerasCV names them classes, KerasHub labels


def parse_box_format(box_format: str) -> tuple[str, bool]:
    """``(base format, relative)`` of a Keras bounding box format name."""
    name = str(box_format).lower()
    relative = name.startswith("rel_")
    base = name[4:] if relative else name
    if base not in BOX_FORMATS:
        accepted = ", ".join(BOX_FORMATS + tuple(f"rel_{f}" for f in BOX_FORMATS))
        raise ValueError(f"unknown bounding_box_format {box_format!r}; accepted: {accepted}")
    return base, relative


def boxes_to_xyxy(boxes: np.ndarray, box_format: str, image_size: tuple[int, int]) -> np.ndarray:
    """(N, 4) boxes in a Keras ``bounding_box_format`` -> absolute ``[x1, y1, x2, y2]`` pixels (float32)."""
    base, relative = parse_box_format(box_format)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if base == "xyxy":
        x1, y1, x2, y2 = b.T
    elif base == "yxyx":
        y1, x1, y2, x2 = b.T
    elif base == "xywh":
        x1, y1 = b[:, 0], b[:, 1]
        x2, y2 = x1 + b[:, 2], y1 + b[:, 3]
    elif base == "center_xywh":
        cx, cy, w, h = b.T
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:  # center_yxhw
        cy, cx, h, w = b.T
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    xyxy = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    if relative:
        height, width = image_size
        xyxy *= np.array([width, height, width, height], dtype=np.float32)
    return xyxy


def is_decoded(outputs: Any) -> bool:
    if not (isinstance(outputs, Mapping) and all(k in outputs for k in DECODED_KEYS)
            and any(k in outputs for k in CLASS_KEYS)):
        return False
    shape = getattr(outputs["boxes"], "shape", None)
    return shape is None or int(shape[-1]) == 4


def decode_keras_detections(outputs: Mapping, box_format: str,
                            image_sizes: list[tuple[int, int]] | None) -> list[dict[str, np.ndarray]]:
    """A decoded Keras detection dict as per-image ``{'boxes' (xyxy pixels), 'scores', 'labels'}``."""
    boxes = to_numpy(outputs["boxes"])
    scores = to_numpy(outputs["confidence"])
    classes = to_numpy(outputs["classes"] if "classes" in outputs else outputs["labels"])
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2] or classes.shape != boxes.shape[:2]:
        raise TraceInputError(f"Keras detections must be boxes (B, N, 4), confidence (B, N), classes (B, N), got "
                              f"{boxes.shape}, {scores.shape}, {classes.shape}")
    count = outputs.get("num_detections")
    count = None if count is None else to_numpy(count).reshape(-1).astype(np.int64)
    _, relative = parse_box_format(box_format)
    if image_sizes is None or len(image_sizes) != len(boxes):
        if relative:
            raise TraceInputError(f"bounding_box_format {box_format!r} is relative and the image sizes are unknown: "
                                  "pass the images as an NHWC batch")
        image_sizes = [(0, 0)] * len(boxes)
    per_image = []
    for i in range(len(boxes)):
        valid = classes[i] >= 0  # KerasCV/KerasHub pad with class -1
        if count is not None:
            valid &= np.arange(boxes.shape[1]) < count[i]
        per_image.append({"boxes": boxes_to_xyxy(boxes[i][valid], box_format, image_sizes[i]),
                          "scores": scores[i][valid], "labels": classes[i][valid]})
    return per_image


def pool_channels_last(value: Any) -> Any:
    """``(B, ..., C)`` -> ``(B, C)``: mean over every axis between batch and channels."""
    if isinstance(value, Mapping):
        value = list(value.values())[-1] if value else None
    elif isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return keras.ops.mean(value, axis=tuple(range(1, len(shape) - 1))) if len(shape) > 2 else value


class KerasDetectionTracer(DetectionTracer):
    """Trace a Keras 3 detector (format in the module docstring).

    Args (besides ``DetectionTracer``'s):
        bounding_box_format: the format of the model's output boxes; ``None`` = the model's
            ``bounding_box_format`` attribute (``"xyxy"`` with a warning when it has none).

    The tracer calls ``model(images, training=False)`` (pass ``training=True`` to the tracer call to
    change that) and returns what the model returned.
    """

    def __init__(self, model: keras.Model, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, *,
                 bounding_box_format: str | None = None, **kwargs: Any):
        box_format = bounding_box_format or getattr(model, "bounding_box_format", None)
        if box_format is None:
            warnings.warn(f"{type(model).__name__} has no bounding_box_format attribute; its boxes are taken as "
                          "absolute xyxy pixels (pass bounding_box_format= otherwise)", UserWarning, stacklevel=3)
            box_format = "xyxy"
        parse_box_format(box_format)
        self.bounding_box_format = str(box_format).lower()
        self.architecture = f"keras.{type(model).__name__}"
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_image=max_detections_per_image, **kwargs)
        layer = self.feature_layer
        if layer is None:
            backbone = getattr(model, "backbone", None)
            layer = backbone if isinstance(backbone, keras.layers.Layer) else False
        self._forward = KerasForward(model, layer)

    def model_settings(self) -> dict:
        decoder = getattr(self.model, "prediction_decoder", None)
        settings = {"score_thresh": getattr(decoder, "confidence_threshold", None),
                    "iou_thresh": getattr(decoder, "iou_threshold", None),
                    "max_detections": getattr(decoder, "max_detections", None)}
        num_classes = getattr(self.model, "num_classes", None)
        if isinstance(num_classes, int):
            settings["num_classes"] = num_classes
        return settings

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        outputs, features = self._forward(images, **kwargs)
        return outputs, outputs, pool_channels_last(features)

    def image_sizes(self, images: Any) -> list[tuple[int, int]] | None:
        """(H, W) of an NHWC batch or of each HWC image of a list."""
        shape = getattr(images, "shape", None)
        if shape is not None and len(shape) == 4:
            return [(int(shape[1]), int(shape[2]))] * int(shape[0])
        if isinstance(images, (list, tuple)) and all(len(getattr(i, "shape", ())) == 3 for i in images):
            return [(int(i.shape[0]), int(i.shape[1])) for i in images]
        return None

    def decode(self, outputs: Any, images: Any) -> Any:
        if not is_decoded(outputs):
            decode_predictions = getattr(self.model, "decode_predictions", None)
            if not callable(decode_predictions):
                keys = sorted(map(str, outputs)) if isinstance(outputs, Mapping) else type(outputs).__name__
                raise TraceInputError(
                    f"{type(self.model).__name__} returned raw (not decoded) outputs ({keys}) and has no "
                    "decode_predictions(); the tracer reads the decoded dict {'boxes', 'confidence', 'classes', "
                    "'num_detections'} that model.predict() / model.decode_predictions(outputs, images) return. "
                    "Pass postprocess=, a function (outputs, images) -> [{'boxes': (N, 4) [x1, y1, x2, y2] "
                    "pixels, 'scores': (N,), 'labels': (N,)}, ...], for any other output")
            outputs = decode_predictions(outputs, images)
            if not is_decoded(outputs):
                raise TraceInputError(
                    f"{type(self.model).__name__}.decode_predictions() did not return {{'boxes', 'confidence', "
                    "'classes', 'num_detections'}; pass postprocess=")
        return decode_keras_detections(outputs, self.bounding_box_format, self.image_sizes(images))

    def remove_hooks(self) -> None:
        self._forward.remove()
