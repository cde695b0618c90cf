"""torchvision detectors: Faster R-CNN (and Mask/Keypoint R-CNN), SSD / SSDlite, RetinaNet, FCOS.

Output read: in eval mode a torchvision detector returns one dict per image, ``{'boxes': (N, 4) float
[x1, y1, x2, y2], 'scores': (N,), 'labels': (N,) int64}`` (plus masks/keypoints, not traced). Its
transform resizes the images internally and maps the boxes back, so the boxes are already pixels of the
input images and are stored as given; the image size is each input tensor's ``(H, W)``. Labels are the
model's class indices as given: Faster R-CNN and SSD reserve class 0 for the background (labels
``1 .. num_classes - 1``), RetinaNet and FCOS do not.

The model applies its own thresholds before the tracer sees anything (``roi_heads.score_thresh`` for
Faster R-CNN, ``model.score_thresh`` for the others): a tracer ``score_thresh`` below the model's
cannot bring back what the model dropped. Left at ``None`` the tracer's thresholds are the model's.

Training mode: with ``model.training`` torchvision returns the loss dict instead of detections. The
tracer then returns that loss dict (``loss = sum(tracer(images, targets, ...).values())``) and gets the
detections from an extra inference pass under ``torch.no_grad()`` with every module in eval mode (each
module's own ``training`` flag is restored afterwards). That pass costs about one inference forward per
traced batch (roughly a third to a half of a training step); trace every k-th batch, or trace in
evaluation, where there is one pass only. Targets are handed to the model in torchvision's
``List[Dict]`` layout even when given as ``Dict[str, List]``; ground truth in neither format raises
``TraceInputError`` in training mode whatever ``strict`` says, since the model cannot compute its
losses without it.

Features (``feature_layer=None``): the output of ``model.backbone`` (an ``OrderedDict`` of feature maps:
its last level, ``'pool'`` for Faster R-CNN's FPN), mean-pooled over space into one vector per image.
The pooled map covers the model's resized and padded batch.

This module is ``mldbg_callbacks.integrations.detectors.torchvision``; with absolute imports (Python 3)
``import torchvision`` anywhere still resolves to the real package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mldbg_callbacks.integrations.torch_model import PooledFeatures
from mldbg_callbacks.tasks.detection import ground_truth_lists
from mldbg_callbacks.training import DetectionTracer


@contextlib.contextmanager
def inference_mode_pass(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode and no autograd, then each module's own ``training`` flag back (a model
    in training may keep some modules, e.g. frozen BatchNorm, in eval mode on purpose)."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def torchvision_targets(targets: Any, n_images: int, device: torch.device | None = None) -> list[dict]:
    """Ground truth as torchvision's training wants it: one dict per image with ``boxes`` (float) and
    ``labels`` (int64) tensors. A ``List[Dict]`` of tensors is passed through untouched (masks and other
    keys included); a ``Dict[str, List]`` is regrouped per image, keeping every per-image key."""
    lists = ground_truth_lists(targets, n_images)  # raises TraceInputError naming both formats
    if isinstance(targets, Mapping):
        extra = {key: list(values) for key, values in targets.items() if key not in ("boxes", "labels")
                 and isinstance(values, Sequence) and not isinstance(values, str) and len(values) == n_images}
        per_image = [{"boxes": b, "labels": l, **{k: v[i] for k, v in extra.items()}}
                     for i, (b, l) in enumerate(zip(lists["boxes"], lists["labels"]))]
    else:
        per_image = [dict(t) for t in targets]
    for target in per_image:
        if not isinstance(target["boxes"], torch.Tensor):
            target["boxes"] = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        if not isinstance(target["labels"], torch.Tensor):
            target["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64, device=device).reshape(-1)
    return per_image


def _device(images: Any) -> torch.device | None:
    if isinstance(images, torch.Tensor):
        return images.device
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
        return images[0].device
    return None


def _count(images: Any) -> int:
    return int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)


class TorchvisionDetectionTracer(DetectionTracer):
    """What every torchvision family shares: train/eval handling, decoding, backbone features.

    ``architecture`` is ``"torchvision.<ModelClass>"`` (``FasterRCNN``, ``MaskRCNN``, ``SSD``...)."""

    def __init__(self, model: torch.nn.Module, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, **kwargs: Any):
        self.architecture = f"torchvision.{type(model).__name__}"
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_image=max_detections_per_image, **kwargs)
        backbone = getattr(model, "backbone", None)
        self._features = PooledFeatures(model, self.feature_layer,
                                        backbone if isinstance(backbone, torch.nn.Module) else None)

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Eval mode: one pass, detections returned. Training mode: the loss pass (returned to the
        caller) and an inference pass for the detections (see the module docstring)."""
        self._features.pop()
        if not self.model.training:
            detections = self.model(images, **kwargs)
            return detections, detections, self._features.pop()
        losses = self.model(images, torchvision_targets(targets, _count(images), _device(images)), **kwargs)
        self._features.pop()  # the training pass's features: the inference pass's are traced
        with inference_mode_pass(self.model):
            detections = self.model(images, **kwargs)
        return losses, detections, self._features.pop()

    def decode(self, outputs: Any, images: Any) -> Any:
        # a scripted model returns (losses, detections) in every mode
        if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], list):
            outputs = outputs[1]
        return outputs

    def remove_hooks(self) -> None:
        self._features.remove()


class FasterRCNNTracer(TorchvisionDetectionTracer):
    """torchvision Faster R-CNN, Mask R-CNN, Keypoint R-CNN (any ``GeneralizedRCNN`` with ``RoIHeads``).

    ``model_settings``: ``roi_heads.score_thresh``, ``roi_heads.nms_thresh``, ``roi_heads.detections_per_img``;
    ``num_classes`` = ``roi_heads.box_predictor.cls_score.out_features`` (background included)."""

    def model_settings(self) -> dict:
        heads = getattr(self.model, "roi_heads", None)
        if heads is None:
            return {}
        settings = {"score_thresh": getattr(heads, "score_thresh", None),
                    "iou_thresh": getattr(heads, "nms_thresh", None),
                    "max_detections": getattr(heads, "detections_per_img", None)}
        cls_score = getattr(getattr(heads, "box_predictor", None), "cls_score", None)
        if isinstance(cls_score, torch.nn.Linear):
            settings["num_classes"] = cls_score.out_features
        return settings


class _SingleStageTracer(TorchvisionDetectionTracer):
    """SSD, RetinaNet and FCOS keep their thresholds on the model itself."""

    def model_settings(self) -> dict:
        settings = {"score_thresh": getattr(self.model, "score_thresh", None),
                    "iou_thresh": getattr(self.model, "nms_thresh", None),
                    "max_detections": getattr(self.model, "detections_per_img", None)}
        num_classes = self.head_num_classes(getattr(getattr(self.model, "head", None), "classification_head", None))
        if num_classes is not None:
            settings["num_classes"] = num_classes
        return settings

    @staticmethod
    def head_num_classes(head: Any) -> int | None:
        value = getattr(head, "num_classes", None)
        return int(value) if isinstance(value, int) else None


class SSDTracer(_SingleStageTracer):
    """torchvision SSD300 / SSDlite. ``model_settings``: ``score_thresh``, ``nms_thresh``,
    ``detections_per_img``; ``num_classes`` = ``head.classification_head.num_columns`` (background
    included)."""

    @staticmethod
    def head_num_classes(head: Any) -> int | None:
        value = getattr(head, "num_columns", None)  # SSDClassificationHead: columns per anchor = classes
        return int(value) if isinstance(value, int) else None


class RetinaNetTracer(_SingleStageTracer):
    """torchvision RetinaNet. ``model_settings``: ``score_thresh``, ``nms_thresh``, ``detections_per_img``;
    ``num_classes`` = ``head.classification_head.num_classes`` (no background class)."""


class FCOSTracer(_SingleStageTracer):
    """torchvision FCOS. ``model_settings``: ``score_thresh``, ``nms_thresh``, ``detections_per_img``;
    ``num_classes`` = ``head.classification_head.num_classes`` (no background class)."""
