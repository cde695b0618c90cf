"""Any other PyTorch detector: torchvision-style dicts, facebookresearch DETR dicts, CenterNet heatmaps.

``TorchDetectionTracer`` runs ``model(images, **kwargs)`` and recognises the output by its structure:

(a) torchvision-style: a list with one ``{'boxes': (N, 4) [x1, y1, x2, y2] pixels, 'scores': (N,),
    'labels': (N,)}`` dict per image -- stored as given.
(b) facebookresearch DETR (``models/detr.py``): ``{'pred_logits': (B, Q, C + 1), 'pred_boxes': (B, Q, 4)}``
    with boxes normalised ``[cx, cy, w, h]`` -- decoded exactly as DETR's ``PostProcess``: softmax over the
    classes, the last ("no object") class dropped, score = the highest remaining probability, label = its
    index, boxes converted to ``[x1, y1, x2, y2]`` and multiplied by ``(w, h, w, h)`` of each image.
    Deformable DETR and Conditional DETR (whose classifiers are trained with a sigmoid focal loss and have
    no "no object" class) are decoded like their ``PostProcess``: sigmoid scores, top-k over all
    ``Q * C`` (query, class) pairs with k = ``max_detections_per_image``. The sigmoid path is chosen from
    the model's class name (``DeformableDETR``, ``ConditionalDETR``) or ``score_activation="sigmoid"``.
    DETR models have no NMS: a model whose class is ``DETR``/``DeformableDETR``/``ConditionalDETR`` is
    recognised at construction (``uses_nms=False``, ``iou_thresh`` ignored); one recognised only from
    its first output gets ``iou_thresh=None`` then (with a warning if ``iou_thresh`` was passed).
    The image size is the input tensor's (each image of a list of CHW tensors, or the unpadded part of
    a DETR ``NestedTensor``, which is how DETR normalises its targets), or ``target_sizes=`` / ``orig_target_sizes=`` ((B, 2) ``(h, w)``) passed to
    the tracer call -- those are consumed by the tracer, not passed to the model, and become the stored
    image size.
(c) CenterNet (``xingyizhou/CenterNet`` ``ctdet``): ``{'hm' or 'heatmap': (B, C, H/s, W/s) logits,
    'wh': (B, 2, H/s, W/s), 'reg' or 'offset': (B, 2, H/s, W/s)}``, or a list of such dicts (one per
    stack of an hourglass; the last one is read) -- decoded like CenterNet's ``ctdet_decode``: sigmoid,
    3x3 max-pool NMS (a peak survives only where it equals its neighbourhood maximum), top-k over
    ``C * H * W`` with k = ``max_detections_per_image``, centre = peak cell + offset (+0.5 without an
    offset head), box = centre -/+ wh / 2, multiplied by the output stride (image size / heatmap size,
    per axis). Class-specific wh heads (``cat_spec_wh``) are not supported: pass ``postprocess=``.

Boxes are decoded exactly as the models' own post-processing does (which does not clip); the codec clips
every family's stored predictions to the image.

Anything else raises ``TraceInputError`` naming these formats and ``postprocess=``. The facebookresearch
repositories are not pip packages and are not installed here: the tests use real ``nn.Module``s with
those class names returning exactly constructed tensors of these formats.

Features (``feature_layer=None``): the output of ``model.backbone`` when the model has one, its last
feature map mean-pooled over space (see ``PooledFeatures``); no features otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from mldbg_callbacks.core.arrays import to_numpy
from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.integrations.detectors import describe
from mldbg_callbacks.integrations.torch_model import PooledFeatures
from mldbg_callbacks.training import DetectionTracer

# facebookresearch class names -> how their classifier is turned into scores (see the module docstring)
DETR_SCORE_ACTIVATION = {"DETR": "softmax", "DeformableDETR": "sigmoid", "ConditionalDETR": "sigmoid"}

OUTPUT_FORMATS = (
    "(1) torchvision-style: a list of {'boxes': (N, 4) [x1, y1, x2, y2] pixels, 'scores': (N,), 'labels': (N,)} "
    "dicts, one per image; (2) facebookresearch DETR: {'pred_logits': (B, Q, C+1), 'pred_boxes': (B, Q, 4) "
    "normalised [cx, cy, w, h]}; (3) CenterNet: {'hm' or 'heatmap': (B, C, H/4, W/4) logits, 'wh': (B, 2, H/4, "
    "W/4), 'reg' or 'offset': (B, 2, H/4, W/4)} or a list of those (one per stack)")


def detr_score_activation(model: Any) -> str | None:
    """``"softmax"``/``"sigmoid"`` for facebookresearch DETR-family classes (by class name), else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in DETR_SCORE_ACTIVATION:
            return DETR_SCORE_ACTIVATION[cls.__name__]
    return None


def output_format(outputs: Any) -> str | None:
    """``"per_image"``, ``"detr"``, ``"centernet"`` or None (unknown)."""
    if isinstance(outputs, Mapping):
        if "pred_logits" in outputs and "pred_boxes" in outputs:
            return "detr"
        if ("hm" in outputs or "heatmap" in outputs) and "wh" in outputs:
            return "centernet"
        return None
    if isinstance(outputs, (list, tuple)) and outputs:
        if all(isinstance(d, Mapping) and all(k in d for k in ("boxes", "scores", "labels")) for d in outputs):
            return "per_image"
        if output_format(outputs[-1]) == "centernet":
            return "centernet"
    return None


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _scale(image_sizes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(B, 4) ``[w, h, w, h]`` per image."""
    return torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32, device=device)


def decode_detr(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, image_sizes: list[tuple[int, int]] | None,
                score_activation: str = "softmax", top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """facebookresearch DETR outputs as per-image ``{'boxes' (xyxy pixels), 'scores', 'labels'}``.

    ``softmax``: DETR's ``PostProcess`` (one detection per query, "no object" class dropped).
    ``sigmoid``: Deformable/Conditional DETR's ``PostProcess`` (top ``top_k`` of all query-class pairs).
    """
    if image_sizes is None:
        raise TraceInputError("DETR boxes are normalised to [0, 1] and the image sizes are unknown: pass images "
                              "as an NCHW tensor or a list of CHW tensors, or target_sizes=[(h, w), ...]")
    logits, boxes = pred_logits.detach().float(), pred_boxes.detach().float()
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        raise TraceInputError(f"DETR outputs must be pred_logits (B, Q, C) and pred_boxes (B, Q, 4), got "
                              f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
    if len(image_sizes) != logits.shape[0]:
        raise TraceInputError(f"{logits.shape[0]} images in the DETR output but {len(image_sizes)} image sizes")
    if score_activation == "softmax":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    elif score_activation == "sigmoid":
        batch, queries, classes = logits.shape
        scores, index = logits.sigmoid().reshape(batch, -1).topk(min(int(top_k), queries * classes), dim=1)
        labels = index % classes
        boxes = boxes.gather(1, (index // classes).unsqueeze(-1).expand(-1, -1, 4))
    else:
        raise ValueError(f"score_activation must be 'softmax' or 'sigmoid', got {score_activation!r}")
    xyxy = cxcywh_to_xyxy(boxes) * _scale(image_sizes, boxes.device)[:, None, :]
    return [{"boxes": xyxy[i], "scores": scores[i], "labels": labels[i]} for i in range(len(xyxy))]


def decode_centernet(head: Mapping, image_sizes: list[tuple[int, int]] | None,
                     top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """CenterNet ``ctdet`` heads as per-image ``{'boxes' (xyxy pixels), 'scores', 'labels'}`` (see the
    module docstring; the same steps as CenterNet's ``ctdet_decode``, boxes scaled by the stride)."""
    heat = head["hm"] if "hm" in head else head["heatmap"]
    offset = head["reg"] if "reg" in head else head.get("offset")
    heat, wh = heat.detach().float(), head["wh"].detach().float()
    if heat.ndim != 4 or wh.shape != (heat.shape[0], 2, *heat.shape[2:]):
        raise TraceInputError(f"CenterNet heads must be hm (B, C, H, W) and wh (B, 2, H, W) (class-specific wh "
                              f"needs postprocess=), got {tuple(heat.shape)} and {tuple(wh.shape)}")
    if image_sizes is None or len(image_sizes) != heat.shape[0]:
        raise TraceInputError("CenterNet boxes are in heatmap cells and the image sizes are unknown: pass images as "
                              "an NCHW tensor or a list of CHW tensors, or target_sizes=[(h, w), ...]")
    batch, classes, height, width = heat.shape
    heat = heat.sigmoid()
    peaks = heat * (F.max_pool2d(heat, kernel_size=3, stride=1, padding=1) == heat)
    scores, index = peaks.reshape(batch, -1).topk(min(int(top_k), classes * height * width), dim=1)
    labels = index // (height * width)
    cell = index % (height * width)
    ys, xs = (cell // width).float(), (cell % width).float()

    def at_peaks(values: torch.Tensor) -> torch.Tensor:  # (B, 2, H, W) -> (B, 2, K)
        return values.reshape(batch, 2, -1).gather(2, cell.unsqueeze(1).expand(-1, 2, -1))

    if offset is not None:
        shift = at_peaks(offset.detach().float())
        xs, ys = xs + shift[:, 0], ys + shift[:, 1]
    else:
        xs, ys = xs + 0.5, ys + 0.5
    size = at_peaks(wh)
    boxes = torch.stack([xs - size[:, 0] / 2, ys - size[:, 1] / 2, xs + size[:, 0] / 2, ys + size[:, 1] / 2], dim=-1)
    stride = torch.tensor([[w / width, h / height, w / width, h / height] for h, w in image_sizes],
                          dtype=torch.float32, device=boxes.device)
    boxes = boxes * stride[:, None, :]
    return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(batch)]


class TorchDetectionTracer(DetectionTracer):
    """Trace a PyTorch detector that is not a torchvision model (formats in the module docstring).

    Args (besides ``DetectionTracer``'s):
        score_activation: ``"softmax"`` or ``"sigmoid"`` for DETR-style ``pred_logits``; ``None`` = from
            the class name (``DeformableDETR``/``ConditionalDETR`` sigmoid, otherwise softmax).

    Call-time keyword ``target_sizes=`` (or ``orig_target_sizes=``): ``(h, w)`` per image to scale
    normalised/heatmap boxes to, instead of the input tensor's size; not passed to the model.
    """

    def __init__(self, model: torch.nn.Module, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, *,
                 score_activation: str | None = None, **kwargs: Any):
        if score_activation not in (None, "softmax", "sigmoid"):
            raise ValueError(f"score_activation must be None, 'softmax' or 'sigmoid', got {score_activation!r}")
        self.detr_activation = detr_score_activation(model)
        self.score_activation = score_activation
        self.architecture = f"{'detr' if self.detr_activation else 'torch'}.{type(model).__name__}"
        if self.detr_activation is not None:
            self.uses_nms = False  # instance attribute: read by DetectionTracer.__init__
        self._iou_thresh_given = iou_thresh is not None
        self._target_sizes: Any = None
        super().__init__(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
                         max_detections_per_image=max_detections_per_image, **kwargs)
        backbone = getattr(model, "backbone", None)
        self._features = PooledFeatures(model, self.feature_layer,
                                        backbone if isinstance(backbone, torch.nn.Module) else None)

    def model_settings(self) -> dict:
        """DETR family: ``num_classes`` from ``class_embed`` (minus the "no object" class for softmax DETR)
        and ``max_detections`` = ``num_queries`` (softmax) or 100 (the sigmoid ``PostProcess``'s top-k)."""
        if self.detr_activation is None:
            return {}
        settings: dict = {}
        class_embed = getattr(self.model, "class_embed", None)
        if isinstance(class_embed, (torch.nn.ModuleList, torch.nn.Sequential)) and len(class_embed):
            class_embed = class_embed[-1]  # Deformable DETR: one classifier per decoder layer
        if isinstance(class_embed, torch.nn.Linear):
            settings["num_classes"] = class_embed.out_features - (self.detr_activation == "softmax")
        if self.detr_activation == "softmax" and isinstance(getattr(self.model, "num_queries", None), int):
            settings["max_detections"] = self.model.num_queries
        elif self.detr_activation == "sigmoid":
            settings["max_detections"] = 100
        return settings

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        sizes = kwargs.pop("target_sizes", None)
        orig_sizes = kwargs.pop("orig_target_sizes", None)
        self._target_sizes = sizes if sizes is not None else orig_sizes
        self._features.pop()
        outputs = self.model(images, **kwargs)
        return outputs, outputs, self._features.pop()

    def image_sizes(self, images: Any) -> list[tuple[int, int]] | None:
        """``target_sizes=`` when given; the unpadded size of each image of a DETR ``NestedTensor``
        (``mask`` is True on padding); else the input tensors' sizes."""
        if self._target_sizes is not None:
            return [(int(h), int(w)) for h, w in to_numpy(self._target_sizes).reshape(-1, 2)]
        mask = getattr(images, "mask", None)
        if isinstance(getattr(images, "tensors", None), torch.Tensor) and isinstance(mask, torch.Tensor):
            heights, widths = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
            return [(int(h), int(w)) for h, w in zip(heights.tolist(), widths.tolist())]
        return super().image_sizes(images)

    def decode(self, outputs: Any, images: Any) -> Any:
        kind = output_format(outputs)
        if kind == "per_image":
            return list(outputs)
        if kind == "detr":
            if self.uses_nms:
                self._found_detr()
            activation = self.score_activation or self.detr_activation or "softmax"
            return decode_detr(outputs["pred_logits"], outputs["pred_boxes"], self.image_sizes(images), activation,
                               self.max_detections_per_image)
        if kind == "centernet":
            head = outputs if isinstance(outputs, Mapping) else outputs[-1]
            return decode_centernet(head, self.image_sizes(images), self.max_detections_per_image)
        raise TraceInputError(f"TorchDetectionTracer cannot read the output of {type(self.model).__name__} "
                              f"({describe(outputs)}). Recognised formats: {OUTPUT_FORMATS}. For any other output "
                              "pass postprocess=, a function (outputs, images) -> [{'boxes': (N, 4) [x1, y1, x2, "
                              "y2] pixels, 'scores': (N,), 'labels': (N,)}, ...] with one dict per image")

    def _found_detr(self) -> None:
        """A DETR-style output from a model not recognised by its class name: it has no NMS."""
        if self._iou_thresh_given:
            warnings.warn(f"{type(self.model).__name__} returns DETR outputs (pred_logits/pred_boxes), which have no "
                          f"NMS, so iou_thresh={self.iou_thresh} is ignored; filtering uses score_thresh and "
                          "max_detections_per_image", UserWarning, stacklevel=4)
        self.uses_nms = False
        self.iou_thresh = None
        self.core.codec.iou_thresh = None  # the run metadata is written at the first flush, after this

    def remove_hooks(self) -> None:
        self._features.remove()
