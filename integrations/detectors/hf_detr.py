"""Hugging Face ``*ForObjectDetection`` models of the DETR family: DETR, Conditional DETR, Deformable DETR,
Table Transformer, YOLOS, RT-DETR (and other set-prediction detectors returning ``logits`` + ``pred_boxes``).

What is read: the model's ``ModelOutput`` -- ``logits`` ``(batch, queries, classes[+1])`` and
``pred_boxes`` ``(batch, queries, 4)``, normalised ``[cx, cy, w, h]`` in ``[0, 1]``. Decoding is done by
the model family's own image processor, ``post_process_object_detection(outputs, threshold=score_thresh,
target_sizes=..., top_k=...)``, built offline with its defaults (nothing is downloaded): the processor
registered for ``config.model_type`` (DETR and Table Transformer: softmax, the last "no object" class
dropped, one detection per query; Conditional/Deformable DETR: sigmoid, the top ``k`` over queries x
classes, ``k`` = ``max_detections_per_image``, 100 by default as in Hugging Face; RT-DETR: sigmoid, top
``queries`` when ``config.use_focal_loss``). A model type without a registered processor is decoded by
the processor of the loss it trains with: ``use_focal_loss`` -> RT-DETR's, ``focal_alpha`` ->
Deformable DETR's, else DETR's.

How boxes become pixels: the processor scales the normalised boxes by a ``(height, width)`` per image --
by default the ``pixel_values`` canvas, i.e. pixels of the image the model saw. Hugging Face's
processors normalise the labels of a padded batch by the *padded* size (``labels[i]["size"]`` is the
padded size, padding goes right and bottom), so predictions refer to the same canvas; with
``pixel_mask`` the recorded image size is each image's unpadded size (rows/columns holding a valid pixel)
while the scale stays the canvas. ``target_sizes=`` (alias ``image_sizes=``), e.g. original image sizes,
replaces both, as in Hugging Face's pipelines. The codec clips the stored predictions to the image (a
sigmoid ``cx +- w/2`` may reach past the border).

Ground truth: the product's formats (``[x1, y1, x2, y2]`` pixels of the same images) or Hugging Face's
labels (a list of dicts with ``class_labels`` and normalised ``[cx, cy, w, h]`` ``boxes``, as the image
processors produce them), converted to pixels with the same sizes as the predictions (their ``size`` /
``orig_size`` entries are not read: the model learns boxes normalised as its labels are, so one scale
serves both). Labels are the
model's class indices (``config.id2label``). The forward pass gets ``labels=`` in Hugging Face's format
(pixel boxes converted) so that ``outputs.loss`` is computed; pass ``labels=None`` to skip the loss.

Features: by default the mean over queries of ``outputs.last_hidden_state`` (the decoder's output for
DETR-style models, already computed, detached); a module name = that module's output mean-pooled over
its spatial or token dimensions; ``False`` = none.

Text-conditioned detectors (OWL-ViT, OWLv2, Grounding DINO, OmDet-Turbo) score boxes against text
queries, not a fixed class set: they are refused unless ``postprocess=`` is given.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from mldbg_callbacks.errors import TraceInputError
from mldbg_callbacks.tasks.detection import ground_truth_lists
from mldbg_callbacks.training import DetectionTracer, detections_per_image

from ..torch_model import TorchFeatureCapture

__all__ = ["HFDetrTracer", "DetrDecoder", "ImageSizes", "canvas_sizes", "ground_truth_xyxy", "hf_labels",
           "is_hf_labels", "pooled_features", "query_mean", "detr_settings", "is_hf_detector",
           "refuse_text_conditioned"]

# model types whose processor the auto mapping does not name (their hub configs name these classes)
_PROCESSOR_OVERRIDES = {"rt_detr_v2": "RTDetrImageProcessor", "d_fine": "RTDetrImageProcessor",
                        "deimv2": "RTDetrImageProcessor", "dab-detr": "ConditionalDetrImageProcessor"}
_TEXT_CONDITIONED = ("owlvit", "owlv2", "grounding-dino", "mm-grounding-dino", "omdet-turbo", "llmdet")
# Hugging Face's post_process_object_detection default top_k for processors that take one
HF_TOP_K = 100


def is_hf_detector(model: Any) -> bool:
    """A ``transformers`` ``*ForObjectDetection`` model (recognised by name, as the detector registry does)."""
    return any(cls.__module__.startswith("transformers.models.") and cls.__name__.endswith("ForObjectDetection")
               for cls in type(model).__mro__)


def refuse_text_conditioned(model: Any) -> None:
    """TypeError for open-vocabulary detectors, whose scores refer to text queries, not to a class set."""
    if getattr(getattr(model, "config", None), "model_type", None) in _TEXT_CONDITIONED:
        raise TypeError(f"{type(model).__name__} is a text-conditioned detector (its scores refer to text "
                        "queries, not a fixed class set); its detections cannot be decoded without them: use "
                        "ObjectDetectionTracer(..., postprocess=) with the queries in your own loop")


def _processor_class(config: Any) -> type:
    model_type = getattr(config, "model_type", "")
    name = _PROCESSOR_OVERRIDES.get(model_type)
    if name is None:
        try:
            from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

            entry = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
        except ImportError:  # a transformers version that moved the mapping: decide by the loss below
            entry = None
        if isinstance(entry, Mapping):
            name = entry.get("torchvision") or entry.get("pil")
        elif isinstance(entry, (tuple, list)):  # transformers 4.x: (slow, fast)
            name = next((n for n in entry if n), None)
        elif isinstance(entry, str):
            name = entry
    if name is None or getattr(transformers, name, None) is None:
        if getattr(config, "use_focal_loss", False):
            name = "RTDetrImageProcessor"
        elif getattr(config, "focal_alpha", None) is not None:
            name = "DeformableDetrImageProcessor"
        else:
            name = "DetrImageProcessor"
    cls = getattr(transformers, name, None) or getattr(transformers, name + "Pil", None)
    if cls is None or not hasattr(cls, "post_process_object_detection"):
        raise TypeError(f"transformers has no {name} with post_process_object_detection for model type "
                        f"{model_type!r}; pass postprocess=")
    return cls


@functools.lru_cache(maxsize=None)
def _processor(cls: type) -> Any:
    return cls()  # defaults only: post-processing needs no preprocessor_config.json


class DetrDecoder:
    """The model family's ``post_process_object_detection`` bound to its settings.

    ``decoder(outputs, sizes)`` -> ``{"boxes", "scores", "labels", "image_size"}`` (lists per image,
    boxes ``[x1, y1, x2, y2]`` pixels of ``sizes.scale``, recorded with ``sizes.image``). ``top_k`` goes to
    processors that take it (sigmoid top-k over queries x classes); RT-DETR's gets ``use_focal_loss``
    from the config.
    """

    def __init__(self, config: Any, score_thresh: float, top_k: int):
        self.processor_class = _processor_class(config)
        self.processor = _processor(self.processor_class)
        self.score_thresh = float(score_thresh)
        accepted = inspect.signature(self.processor.post_process_object_detection).parameters
        self.extra: dict = {}
        if "top_k" in accepted:
            self.extra["top_k"] = int(top_k)
        if "use_focal_loss" in accepted:
            self.extra["use_focal_loss"] = bool(getattr(config, "use_focal_loss", True))

    def __call__(self, outputs: Any, sizes: "ImageSizes") -> dict[str, Any]:
        logits, boxes = _get(outputs, "logits"), _get(outputs, "pred_boxes")
        if not (isinstance(logits, torch.Tensor) and isinstance(boxes, torch.Tensor) and logits.ndim == 3
                and boxes.ndim == 3 and boxes.shape[-1] == 4):
            raise TraceInputError(f"{type(outputs).__name__} has no 'logits' (batch, queries, classes) and "
                                  "'pred_boxes' (batch, queries, 4): not a DETR-style output; pass postprocess=")
        # detached and widened (bf16/fp16 training): decoding must not join the autograd graph
        raw = _Outputs(logits.detach().float(), boxes.detach().float())
        with torch.no_grad():
            results = self.processor.post_process_object_detection(
                raw, threshold=self.score_thresh, target_sizes=sizes.scale.to(boxes.device), **self.extra)
        return {"boxes": [r["boxes"] for r in results], "scores": [r["scores"] for r in results],
                "labels": [r["labels"] for r in results], "image_size": sizes.image}


@dataclass
class _Outputs:
    """What post_process_object_detection reads (attribute access, like a ModelOutput)."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor


@dataclass
class ImageSizes:
    """Per image (batch, 2) int64 ``(height, width)``: ``scale`` multiplies the normalised boxes (predicted
    and Hugging Face labels), ``image`` is what is recorded (and what the codec clips predictions to)."""

    scale: torch.Tensor
    image: torch.Tensor


def canvas_sizes(pixel_values: Any, pixel_mask: Any = None, target_sizes: Any = None) -> ImageSizes:
    """The sizes boxes refer to: ``target_sizes`` when given (both scale and image), else the
    ``pixel_values`` canvas, with each image's unpadded extent (``pixel_mask``) as its recorded size."""
    if target_sizes is not None:
        sizes = torch.as_tensor(target_sizes).detach().to("cpu", torch.int64).reshape(-1, 2)
        return ImageSizes(sizes, sizes)
    shape = getattr(pixel_values, "shape", None)
    if shape is None or len(shape) != 4:
        raise TraceInputError("pixel_values must be a (batch, channels, height, width) tensor; got "
                              f"{type(pixel_values).__name__} of shape {shape}")
    batch, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
    scale = torch.tensor([[height, width]], dtype=torch.int64).repeat(batch, 1)
    if pixel_mask is None:
        return ImageSizes(scale, scale)
    mask = torch.as_tensor(pixel_mask).detach().bool()
    if tuple(mask.shape) != (batch, height, width):
        raise TraceInputError(f"pixel_mask must be (batch, height, width) = {(batch, height, width)}, got "
                              f"{tuple(mask.shape)}")
    unpadded = torch.stack([mask.any(dim=2).sum(dim=1), mask.any(dim=1).sum(dim=1)], dim=1).to("cpu", torch.int64)
    return ImageSizes(scale, unpadded)


def is_hf_labels(targets: Any) -> bool:
    """Hugging Face's detection labels: per image a dict with ``class_labels`` and normalised ``boxes``."""
    return (isinstance(targets, Sequence) and not isinstance(targets, (str, bytes)) and len(targets) > 0
            and all(isinstance(t, Mapping) and "class_labels" in t and "boxes" in t for t in targets))


def ground_truth_xyxy(targets: Any, scale: torch.Tensor) -> Any:
    """Ground truth as ``[{"boxes": (N, 4) xyxy pixels, "labels": (N,)}]``: Hugging Face labels are converted
    (normalised cxcywh times ``scale``); the product's formats are returned unchanged."""
    if not is_hf_labels(targets):
        return targets
    if len(targets) != len(scale):
        raise TraceInputError(f"{len(targets)} label dicts for {len(scale)} images")
    converted = []
    for target, (height, width) in zip(targets, scale.tolist()):
        boxes = torch.as_tensor(target["boxes"]).detach().float().reshape(-1, 4)
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        xyxy = xyxy * torch.tensor([width, height, width, height], dtype=torch.float32, device=xyxy.device)
        converted.append({"boxes": xyxy, "labels": torch.as_tensor(target["class_labels"]).detach().reshape(-1)})
    return converted


def hf_labels(targets: Any, scale: torch.Tensor, device: Any = None) -> list[dict[str, torch.Tensor]]:
    """The product's ground truth (xyxy pixels) as Hugging Face labels for the forward pass:
    ``[{"class_labels": int64 (N,), "boxes": float32 (N, 4) normalised cxcywh}]``."""
    lists = ground_truth_lists(targets, len(scale))
    if len(lists["boxes"]) != len(scale):
        raise TraceInputError(f"ground truth for {len(lists['boxes'])} images, pixel_values has {len(scale)}")
    labels = []
    for boxes, classes, (height, width) in zip(lists["boxes"], lists["labels"], scale.tolist()):
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        x1, y1, x2, y2 = boxes.unbind(-1)
        cxcywh = torch.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width,
                              (y2 - y1) / height], dim=-1)
        labels.append({"class_labels": torch.as_tensor(classes, device=device).reshape(-1).long(),
                       "boxes": cxcywh})
    return labels


def pooled_features(value: Any) -> Any:
    """An image-level embedding: (B, C, H, W) averaged over space, (B, L, C) over tokens, (B, C) as is."""
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        return None
    value = value.detach()
    if value.ndim == 4:
        return value.mean(dim=(2, 3))
    if value.ndim == 3:
        return value.mean(dim=1)
    return value.reshape(len(value), -1)


def query_mean(outputs: Any) -> Any:
    """The default embedding: ``last_hidden_state`` (decoder output) averaged over queries."""
    return pooled_features(_get(outputs, "last_hidden_state"))


def detr_settings(model: Any) -> dict:
    """What the model's config declares: classes and names; ``max_detections`` where its processor keeps
    a fixed number (top-k processors: 100; RT-DETR: the number of queries). No score threshold exists in
    the configs (the factory's fallback applies)."""
    config = model.config
    settings: dict = {"num_classes": int(config.num_labels)}
    id2label = getattr(config, "id2label", None)
    if id2label:
        settings["class_names"] = {int(k): str(v) for k, v in id2label.items()}
    accepted = inspect.signature(_processor_class(config).post_process_object_detection).parameters
    if "top_k" in accepted:
        settings["max_detections"] = HF_TOP_K
    elif "use_focal_loss" in accepted and getattr(config, "num_queries", None):
        settings["max_detections"] = int(config.num_queries)
    return settings


@dataclass
class DetrForward:
    """What HFDetrTracer.forward hands to decoding: the output, the sizes and the ground truth in pixels."""

    outputs: Any
    sizes: ImageSizes
    targets: Any


class HFDetrTracer(DetectionTracer):
    """Trace a Hugging Face DETR-family detector (see the module docstring for formats and conversions).

    ``tracer(pixel_values, targets, input_ids=..., dataset_type=..., n_epoch=..., pixel_mask=None,
    target_sizes=None)`` runs ``model(pixel_values=..., pixel_mask=..., labels=...)`` and returns its
    ``ModelOutput`` (with ``.loss``: ``labels`` are built from ``targets`` unless passed, in eval mode too,
    where the loss costs one Hungarian matching; ``labels=None`` skips it). ``image_sizes=`` is an alias of
    ``target_sizes=``; other keywords go to the model.
    """

    architecture = "hf.ForObjectDetection"
    uses_nms = False

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, *,
                 feature_layer: Any = None, postprocess: Any = None, **kwargs: Any):
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"{type(model).__name__} has no .config; HFDetrTracer traces transformers models")
        if postprocess is None:
            refuse_text_conditioned(model)
        self.architecture = f"hf.{type(model).__name__}"
        super().__init__(model, model_name, version_name, score_thresh, iou_thresh, max_detections_per_image,
                         feature_layer=feature_layer, postprocess=postprocess, **kwargs)
        self.decoder = None if postprocess is not None else DetrDecoder(
            config, self.score_thresh, self.max_detections_per_image)
        self._capture = (TorchFeatureCapture(model, feature_layer) if isinstance(feature_layer, (str, torch.nn.Module))
                         else None)

    def model_settings(self) -> dict:
        return detr_settings(self.model)

    # -- tracing -------------------------------------------------------------------------------
    def ground_truth(self, targets: Any, raw: "DetrForward") -> Any:
        return raw.targets  # converted by forward() (Hugging Face labels become xyxy pixels)

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, DetrForward, Any]:
        target_sizes = kwargs.pop("target_sizes", None)
        image_sizes = kwargs.pop("image_sizes", None)
        sizes = canvas_sizes(images, kwargs.get("pixel_mask"), target_sizes if target_sizes is not None
                             else image_sizes)
        gt = targets
        try:
            gt = ground_truth_xyxy(targets, sizes.scale)
            if "labels" not in kwargs and targets is not None:
                kwargs["labels"] = (_to_device(targets, images.device) if is_hf_labels(targets)
                                    else hf_labels(targets, sizes.scale, images.device))
        except (TraceInputError, TypeError, ValueError, KeyError, RuntimeError) as exc:
            if self.strict:
                raise TraceInputError(f"ground truth could not be converted: {exc}") from exc
            # the core reports the ground truth when recording; the model runs without labels (no loss)
            warnings.warn(f"mldbg-callbacks: ground truth not converted to Hugging Face labels ({exc}); the "
                          "model runs without labels=", UserWarning, stacklevel=3)
        if self._capture is not None:
            self._capture.pop()
        outputs = self.model(pixel_values=images, **kwargs)
        if self.feature_layer is False:
            features = None
        elif self._capture is not None:
            features = pooled_features(self._capture.pop())
        else:
            features = query_mean(outputs)
        return outputs, DetrForward(outputs, sizes, gt), features

    def detections(self, outputs: Any, images: Any) -> dict[str, Any]:
        raw = outputs if isinstance(outputs, DetrForward) else DetrForward(outputs, canvas_sizes(images), None)
        if self._postprocess is not None:
            return super().detections(raw.outputs, images)
        return detections_per_image(self.decode(raw, images))

    def decode(self, outputs: Any, images: Any) -> dict[str, Any]:
        raw = outputs if isinstance(outputs, DetrForward) else DetrForward(outputs, canvas_sizes(images), None)
        return self.decoder(raw.outputs, raw.sizes)

    def remove_hooks(self) -> None:
        if self._capture is not None:
            self._capture.remove()


def _to_device(targets: Sequence[Mapping], device: Any) -> list[dict]:
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


def _get(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)
