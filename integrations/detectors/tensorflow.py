"""TensorFlow Object Detection API models (``tf.saved_model.load(...)`` of an exported detector, or its
``signatures['serving_default']``).

Output read: ``{'detection_boxes': (B, N, 4) normalised [ymin, xmin, ymax, xmax], 'detection_scores':
(B, N), 'detection_classes': (B, N) float label-map ids, 'num_detections': (B,)}``; rows beyond
``num_detections`` are padding and dropped. Boxes become absolute ``[x1, y1, x2, y2]`` pixels:
``[xmin * W, ymin * H, xmax * W, ymax * H]`` with ``(H, W)`` of the NHWC input batch. Labels are stored
as the label-map ids, as integers (1-based: id 0 is not a class in the Object Detection API), so pass
``num_classes`` = the largest id + 1 to have labels range-checked.

Nothing here imports TensorFlow: the outputs are converted with ``mldbg_callbacks.core.arrays.to_numpy``
(eager tensors via ``.numpy()``) and decoded with NumPy. The saved model declares no thresholds that can
be read back (they live in the pipeline config), so the tracer's fallbacks apply unless given. No image
embedding is captured (``feature_layer`` must be ``None`` or ``False``).

TensorFlow is not installed in this project's environment: this path is tested with exact NumPy arrays
(``decode_tf_od_api`` directly, and the tracer on a stand-in callable whose class module is
``tensorflow.*``), not with a real TF model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mldbg_callbacks.core.arrays import to_numpy
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.training import DetectionTracer

OUTPUT_KEYS = ("detection_boxes", "detection_scores", "detection_classes")


def decode_tf_od_api(outputs: Mapping, image_sizes: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
    """TF Object Detection API outputs as per-image ``{'boxes' (xyxy pixels), 'scores', 'labels' (label-map
    ids, int64)}``; ``image_sizes`` = ``(H, W)`` per image."""
    if not (isinstance(outputs, Mapping) and all(k in outputs for k in OUTPUT_KEYS)):
        found = sorted(map(str, outputs)) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise TraceInputError(f"TF Object Detection API outputs must contain {', '.join(OUTPUT_KEYS)} and "
                              f"num_detections, got {found}; pass postprocess= for another output")
    boxes = np.asarray(to_numpy(outputs["detection_boxes"]), dtype=np.float32)
    scores = np.asarray(to_numpy(outputs["detection_scores"]), dtype=np.float32)
    classes = np.asarray(to_numpy(outputs["detection_classes"]))
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2] or classes.shape != boxes.shape[:2]:
        raise TraceInputError(f"detection_boxes must be (B, N, 4) with detection_scores and detection_classes "
                              f"(B, N), got {boxes.shape}, {scores.shape}, {classes.shape}")
    if image_sizes is None or len(image_sizes) != len(boxes):
        raise TraceInputError(f"{len(boxes)} images in the detections but image sizes "
                              f"{None if image_sizes is None else len(image_sizes)}: pass the images as an NHWC batch")
    count = outputs.get("num_detections")
    count = (np.full(len(boxes), boxes.shape[1]) if count is None
             else np.asarray(to_numpy(count)).reshape(-1).astype(np.int64))
    per_image = []
    for i, (height, width) in enumerate(image_sizes):
        n = int(count[i])
        ymin, xmin, ymax, xmax = boxes[i, :n].T
        scale = np.array([width, height, width, height], dtype=np.float32)
        per_image.append({"boxes": np.stack([xmin, ymin, xmax, ymax], axis=1) * scale,
                          "scores": scores[i, :n],
                          "labels": np.rint(classes[i, :n]).astype(np.int64)})
    return per_image


class TFObjectDetectionTracer(DetectionTracer):
    """Trace a TF Object Detection API detector (format in the module docstring).

    Args (besides ``DetectionTracer``'s):
        input_key: call ``model(**{input_key: images})`` instead of ``model(images)``; a saved model's
            ``signatures['serving_default']`` takes ``input_key="input_tensor"``.
    """

    architecture = "tf_od_api"

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, *,
                 input_key: str | None = None, **kwargs: Any):
        if kwargs.get("feature_layer") not in (None, False):
            raise ValueError("TFObjectDetectionTracer captures no features; feature_layer must be None or False "
                             "(pass features to tracer.record(..., features=...) instead)")
        self.input_key = input_key
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_image=max_detections_per_image, **kwargs)

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        outputs = self.model(**{self.input_key: images}, **kwargs) if self.input_key else self.model(images, **kwargs)
        return outputs, outputs, None

    def image_sizes(self, images: Any) -> list[tuple[int, int]] | None:
        """(H, W) of the NHWC batch."""
        shape = getattr(images, "shape", None)
        if shape is not None and len(shape) == 4:
            return [(int(shape[1]), int(shape[2]))] * int(shape[0])
        return None

    def decode(self, outputs: Any, images: Any) -> Any:
        return decode_tf_od_api(outputs, self.image_sizes(images))
