"""2D detector families: which ``DetectionTracer`` subclass traces a given model.

Models are recognised by the names in their class hierarchy, so nothing is imported for frameworks the
user does not use. Each family lives in its own module of this package and only knows its framework's
output format; the codec (``mldbg_callbacks/tasks/detection.py``) does everything else.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Callable

TORCHVISION = "torchvision.models.detection."


def _has(*names: str) -> Callable[[list[str], Any], bool]:
    return lambda mro, model: any(n in mro for n in names)


def _prefix(prefix: str, suffix: str = "") -> Callable[[list[str], Any], bool]:
    return lambda mro, model: any(n.startswith(prefix) and n.endswith(suffix) for n in mro)


# (how the family is recognised, "module:Class", what users call it) -- first match wins.
FAMILIES: list[tuple[Callable[[list[str], Any], bool], str, str]] = [
    (_has(TORCHVISION + "faster_rcnn.FasterRCNN"), "torchvision:FasterRCNNTracer",
     "torchvision Faster R-CNN (and Mask/Keypoint R-CNN)"),
    (_has(TORCHVISION + "generalized_rcnn.GeneralizedRCNN"), "torchvision:FasterRCNNTracer",
     "torchvision GeneralizedRCNN subclasses"),
    (_has(TORCHVISION + "ssd.SSD"), "torchvision:SSDTracer", "torchvision SSD / SSDlite"),
    (_has(TORCHVISION + "retinanet.RetinaNet"), "torchvision:RetinaNetTracer", "torchvision RetinaNet"),
    (_has(TORCHVISION + "fcos.FCOS"), "torchvision:FCOSTracer", "torchvision FCOS"),
    (_has("ultralytics.engine.model.Model", "ultralytics.nn.tasks.DetectionModel"), "ultralytics:YOLOTracer",
     "Ultralytics YOLO (YOLO('yolov8n.yaml') or its DetectionModel)"),
    (_prefix("transformers.models.", "ForObjectDetection"), "hf_detr:HFDetrTracer",
     "Hugging Face DETR, Conditional DETR, Deformable DETR (and other *ForObjectDetection with logits/pred_boxes)"),
    (_prefix("keras."), "keras:KerasDetectionTracer",
     "Keras 3 / KerasHub / KerasCV detectors returning {'boxes', 'confidence', 'classes', 'num_detections'}"),
    (_prefix("tensorflow."), "tensorflow:TFObjectDetectionTracer",
     "TensorFlow Object Detection API models returning {'detection_boxes', 'detection_scores', ...}"),
    (_has("torch.nn.modules.module.Module"), "torch_generic:TorchDetectionTracer",
     "other PyTorch modules whose output is torchvision-style per-image dicts, facebookresearch DETR "
     "{'pred_logits', 'pred_boxes'} or CenterNet heatmaps {'hm', 'wh', 'reg'}"),
]


def describe(outputs: Any) -> str:
    """Type, keys and shapes of a model output, for error messages."""
    if isinstance(outputs, Mapping):
        parts = [f"{k}: {tuple(v.shape) if hasattr(v, 'shape') else type(v).__name__}" for k, v in outputs.items()]
        return f"{type(outputs).__name__} {{{', '.join(parts)}}}"
    if isinstance(outputs, (list, tuple)):
        return f"{type(outputs).__name__} of {len(outputs)}" + (f", first: {describe(outputs[0])}" if outputs else "")
    shape = getattr(outputs, "shape", None)
    return type(outputs).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "")


def class_names(model: Any) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(model).__mro__]


def resolve_family(model: Any, families: list, package: str, postprocess: Callable | None, fallback: str,
                   factory: str, output: str) -> type:
    """The first family class whose rule matches ``model`` (imported from ``package.module`` only then);
    the tracer base ``fallback`` (a ``mldbg_callbacks.training`` name) when ``postprocess`` is given; else a
    TypeError listing the families and how to write ``postprocess=`` (``output`` describes its result)."""
    names = class_names(model)
    for matches, target, _ in families:
        if matches(names, model):
            module, cls = target.split(":")
            return getattr(importlib.import_module(f"{package}.{module}"), cls)
    if postprocess is not None:
        from mldbg_callbacks import training

        return getattr(training, fallback)
    supported = "\n".join(f"  - {name}" for _, _, name in families)
    raise TypeError(
        f"{factory} does not recognise {type(model).__module__}.{type(model).__qualname__}. Supported "
        f"families:\n{supported}\nFor any other detector pass postprocess=, a function {output}.")


def detector_class(model: Any, postprocess: Callable | None = None) -> type:
    """The DetectionTracer subclass for ``model``; ``DetectionTracer`` itself when ``postprocess`` is given
    for a model no family recognises. Raises TypeError listing the families otherwise."""
    return resolve_family(model, FAMILIES, __name__, postprocess, "DetectionTracer", "ObjectDetectionTracer",
                          "(outputs, images) -> [{'boxes': (N, 4) [x1, y1, x2, y2] pixels, 'scores': (N,), "
                          "'labels': (N,)}, ...] with one dict per image")
