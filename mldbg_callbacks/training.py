"""Tracers of the product page: ``from mldbg_callbacks.training import ClassificationTracer``.

A tracer wraps a model: ``tracer(x, y, input_ids=..., dataset_type="train", n_epoch=0)`` runs the
model, hands outputs, labels and penultimate features to the tracing core and returns the model's
output unchanged (gradients flow through it, so it can replace ``model(x)`` in a training step).
``tracer.wait_for_save()`` makes everything durable.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from .core.trace_core import TraceCore, TraceStats
from .errors import TraceInputError
from .store import LocalStore, resolve_store
from .store.names import validate_name
from .tasks.classification import ClassificationCodec
from .tasks.detection import DetectionCodec
from .tasks.detection3d import Detection3DCodec

__all__ = ["ClassificationTracer", "ObjectDetectionTracer", "DetectionTracer", "ObjectDetection3DTracer",
           "Detection3DTracer"]

# Fallbacks of the product page when neither the caller nor the model sets a detection threshold.
DEFAULT_SCORE_THRESH, DEFAULT_IOU_THRESH, DEFAULT_MAX_DETECTIONS = 0.05, 0.5, 300
DEFAULT_3D_SCORE_THRESH, DEFAULT_3D_IOU_THRESH = 0.1, 0.2


def _class_names(obj: Any) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(obj).__mro__]


def model_forward(model: Any, feature_layer: Any = None) -> Any:
    """A callable ``(inputs, **kw) -> (outputs, features)`` for a PyTorch, Keras 3 or plain model.

    The framework is recognised from the model's class hierarchy, so nothing is imported for
    frameworks the user does not use. Keras comes first: with the torch backend a Keras model is
    also an ``nn.Module``.
    """
    names = _class_names(model)
    if any(name.startswith("keras.") for name in names):
        from .integrations.keras_model import KerasForward

        return KerasForward(model, feature_layer)
    if "torch.nn.modules.module.Module" in names:
        from .integrations.torch_model import TorchForward

        return TorchForward(model, feature_layer)
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module, a keras.Model or a callable, got {type(model).__name__}")
    if feature_layer not in (None, False):
        raise ValueError("feature_layer needs a PyTorch or Keras model; for another callable pass features "
                         "with tracer.record(..., features=...)")
    return lambda inputs, **kwargs: (model(inputs, **kwargs), None)


def scores_of(outputs: Any) -> Any:
    """The class scores inside a model output: a tensor, ``.logits`` (Hugging Face), a dict's
    ``logits``, or the first element of a tuple."""
    if hasattr(outputs, "shape"):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, Mapping):
        for key in ("logits", "probs", "scores", "preds"):
            if key in outputs:
                return outputs[key]
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return outputs


def classification_core(model_name: str, version_name: str, *, store: str | os.PathLike | LocalStore | None = None,
                        flush_every: int = 1, strict: bool = False, output_kind: str = "auto",
                        max_stored_classes: int = 128, top_k: int = 32, max_feature_dim: int = 1024,
                        max_pending_batches: int = 32) -> TraceCore:
    """The tracing core of a classification run: what ClassificationTracer and the framework callbacks
    record into. Arguments as for ClassificationTracer."""
    codec = ClassificationCodec(output_kind=output_kind, max_stored_classes=max_stored_classes, top_k=top_k,
                                max_feature_dim=max_feature_dim)
    run = resolve_store(store).run(validate_name(model_name, "model_name"), validate_name(version_name, "version_name"))
    return TraceCore(codec, run, flush_every=flush_every, strict=strict, max_pending_batches=max_pending_batches)


class _Tracer:
    """What every tracer shares: its core's durability, counters and shutdown."""

    core: TraceCore

    def wait_for_save(self, n_epoch: int | None = None, timeout_s: float | None = None) -> TraceStats:
        """Block until the traces (of ``n_epoch``, or all) are durable; raise if a write failed."""
        return self.core.wait_for_save(n_epoch=n_epoch, timeout_s=timeout_s)

    @property
    def stats(self) -> TraceStats:
        """Counters: rows received, written, skipped by reason, duplicates dropped, write errors."""
        return self.core.stats

    def close(self) -> None:
        """Save what is buffered, stop the background worker and remove the tracer's hooks."""
        self.core.close()
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Remove the forward hooks the tracer put on the model (none by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ClassificationTracer(_Tracer):
    """Trace a classifier's per-sample predictions, labels and penultimate features.

    Example::

        from mldbg_callbacks.training import ClassificationTracer

        tracer = ClassificationTracer(model, model_name="resnet18", version_name="v1")
        for image, label, indices in dataloader:
            with torch.no_grad():
                _ = tracer(image, label, input_ids=indices.cpu().numpy(), dataset_type="train", n_epoch=0)
        tracer.wait_for_save(n_epoch=0)

    Args:
        model: a ``torch.nn.Module``, a ``keras.Model`` or any callable returning class scores.
        model_name, version_name: identify the run in the store (letters, digits, ``_ . - + @``).
        feature_layer: ``None`` = input of the last Linear/Dense layer; a layer name = that layer's
            output; ``False`` = no features.
        store: a directory, a ``LocalStore``, or ``None`` (MLD_API_ENDPOINT, else MLD_HOME, else ``./mldbg``).
        flush_every: make traces durable every k epochs (always on ``wait_for_save()``).
        strict: raise on bad input instead of warning once and counting skipped samples.
        output_kind: ``"auto"`` | ``"logits"`` | ``"probs"``: what the model returns.
        max_stored_classes, top_k, max_feature_dim: storage bounds, see ``docs/storage.md``.

    Without ``input_ids`` each sample's id is a content hash of its input, so the same input has the
    same id in every epoch; pass ids when inputs are randomly augmented.
    """

    def __init__(self, model: Any, model_name: str, version_name: str, *, feature_layer: Any = None,
                 store: str | os.PathLike | LocalStore | None = None, flush_every: int = 1,
                 strict: bool = False, output_kind: str = "auto", max_stored_classes: int = 128,
                 top_k: int = 32, max_feature_dim: int = 1024, max_pending_batches: int = 32):
        self.model_name = validate_name(model_name, "model_name")
        self.version_name = validate_name(version_name, "version_name")
        self.model = model
        self.store = resolve_store(store)
        self._forward = model_forward(model, feature_layer)
        self.core = classification_core(self.model_name, self.version_name, store=self.store, flush_every=flush_every,
                                        strict=strict, output_kind=output_kind, max_stored_classes=max_stored_classes,
                                        top_k=top_k, max_feature_dim=max_feature_dim,
                                        max_pending_batches=max_pending_batches)

    def forward(self, inputs: Any, **forward_kwargs: Any) -> tuple[Any, Any]:
        """Run the model without tracing: ``(its output, the penultimate features or None)``."""
        return self._forward(inputs, **forward_kwargs)

    def __call__(self, inputs: Any, labels: Any, input_ids: Any = None, dataset_type: str = "train",
                 n_epoch: int | None = None, **forward_kwargs: Any) -> Any:
        """Run the model on ``inputs``, trace the batch, return the model's output unchanged.

        ``labels=None`` traces predictions without ground truth (an unlabelled pool; for serving code see
        ``mldbg_callbacks.operation.InferenceLogger``)."""
        outputs, features = self._forward(inputs, **forward_kwargs)
        self.core.record(scores_of(outputs), labels, input_ids=input_ids, dataset_type=dataset_type,
                         n_epoch=n_epoch, features=features, inputs=inputs)
        return outputs

    def record(self, outputs: Any, labels: Any, *, input_ids: Any = None, dataset_type: str = "train",
               n_epoch: int | None = None, features: Any = None, inputs: Any = None,
               logged_at: Any = None) -> None:
        """Trace outputs computed elsewhere (the framework callbacks use this). ``logged_at``: when the
        predictions were made (seconds since the Unix epoch or an aware datetime; e.g. replayed serving
        logs), by default now for ``labels=None``."""
        self.core.record(scores_of(outputs), labels, input_ids=input_ids, dataset_type=dataset_type,
                         n_epoch=n_epoch, features=features, inputs=inputs, logged_at=logged_at)

    def remove_hooks(self) -> None:
        remove = getattr(self._forward, "remove", None)
        if remove is not None:
            remove()


def detection_core(model_name: str, version_name: str, *, store: str | os.PathLike | LocalStore | None = None,
                   num_classes: int | None = None, score_thresh: float = DEFAULT_SCORE_THRESH,
                   iou_thresh: float | None = DEFAULT_IOU_THRESH, max_detections: int = DEFAULT_MAX_DETECTIONS,
                   architecture: str = "custom", class_names: Mapping | None = None, flush_every: int = 1,
                   strict: bool = False, max_feature_dim: int = 1024, max_pending_batches: int = 32) -> TraceCore:
    """The tracing core of a 2D detection run: what the detection tracers and callbacks record into.

    ``core.record(detections, targets, input_ids=..., dataset_type=..., n_epoch=..., features=None)``
    with ``detections = {"boxes": [...], "scores": [...], "labels": [...], "image_size": [(h, w), ...]}``
    (one entry per image, boxes ``[x1, y1, x2, y2]`` pixels) and ``targets`` in either format of the
    product page.
    """
    codec = DetectionCodec(num_classes=num_classes, score_thresh=score_thresh, iou_thresh=iou_thresh,
                           max_detections=max_detections, architecture=architecture, class_names=class_names,
                           max_feature_dim=max_feature_dim)
    run = resolve_store(store).run(validate_name(model_name, "model_name"), validate_name(version_name, "version_name"))
    return TraceCore(codec, run, flush_every=flush_every, strict=strict, max_pending_batches=max_pending_batches)


def detections_per_image(detections: Any, image_sizes: Any = None) -> dict[str, Any]:
    """Per-image detections as ``{"boxes": [...], "scores": [...], "labels": [...], "image_size": ...}``.

    Accepts a list of dicts with ``boxes``/``scores``/``labels`` (torchvision's output and the
    ground-truth layout of the product page) or a dict of per-image lists.
    """
    if isinstance(detections, Mapping) and all(k in detections for k in ("boxes", "scores", "labels")):
        out = {k: list(detections[k]) for k in ("boxes", "scores", "labels")}
    elif isinstance(detections, (list, tuple)) and all(
            isinstance(d, Mapping) and all(k in d for k in ("boxes", "scores", "labels")) for d in detections):
        out = {k: [d[k] for d in detections] for k in ("boxes", "scores", "labels")}
    else:
        raise TraceInputError(
            f"detections must be a list of {{'boxes', 'scores', 'labels'}} dicts (one per image) or a dict of "
            f"per-image lists, got {type(detections).__name__}")
    out["image_size"] = image_sizes if image_sizes is not None else (
        detections.get("image_size") if isinstance(detections, Mapping) else None)
    return out


class DetectionTracer(_Tracer):
    """Trace a 2D object detector's per-image detections and ground truth (base of every family).

    ``ObjectDetectionTracer(model, ...)`` picks the subclass for the model's family; use this class
    directly with ``postprocess=`` for a model no family covers::

        tracer = DetectionTracer(model, "my_detector", "v1", postprocess=lambda outputs, images: [
            {"boxes": b, "scores": s, "labels": l} for b, s, l in zip(*my_decode(outputs))])
        _ = tracer(images, targets, input_ids=image_ids, dataset_type="val", n_epoch=epoch)
        tracer.wait_for_save()

    Args:
        model: the detector.
        model_name, version_name: identify the run in the store.
        score_thresh, iou_thresh, max_detections_per_image: ``None`` = read from the model, else
            0.05 / 0.5 / 300. Detections below ``score_thresh`` and beyond the top
            ``max_detections_per_image`` are not stored; ``iou_thresh`` is the model's NMS IoU
            (DETR-style models have no NMS and ignore it).
        postprocess: ``postprocess(outputs, images) -> detections`` (a list of
            ``{"boxes": (N, 4) xyxy pixels, "scores": (N,), "labels": (N,)}``, one per image), replacing
            the family's own decoding.
        num_classes: labels must lie in ``[0, num_classes)``; ``None`` = read from the model.
        class_names: ``{id: name}``; ``None`` = read from the model where it says.
        feature_layer: ``None`` = the family's image embedding (pooled backbone output) where it has
            one; a module name = that layer's output, mean-pooled over space; ``False`` = none.
        store, flush_every, strict, max_feature_dim, max_pending_batches: as for ClassificationTracer.
    """

    architecture = "custom"
    uses_nms = True
    default_thresholds = (DEFAULT_SCORE_THRESH, DEFAULT_IOU_THRESH, DEFAULT_MAX_DETECTIONS)

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_image: int | None = None, *,
                 postprocess: Callable | None = None, num_classes: int | None = None,
                 class_names: Mapping | None = None, feature_layer: Any = None,
                 store: str | os.PathLike | LocalStore | None = None, flush_every: int = 1, strict: bool = False,
                 max_feature_dim: int = 1024, max_pending_batches: int = 32):
        self.model = model
        self.model_name = validate_name(model_name, "model_name")
        self.version_name = validate_name(version_name, "version_name")
        self.store = resolve_store(store)
        self.strict = strict
        self._postprocess = postprocess
        self.feature_layer = feature_layer
        inferred = self.model_settings()
        if not self.uses_nms and iou_thresh is not None:
            warnings.warn(f"{self.architecture} has no NMS, so iou_thresh={iou_thresh} is ignored; filtering uses "
                          "score_thresh and max_detections_per_image", UserWarning, stacklevel=3)
            iou_thresh = None
        default_score, default_iou, default_max = self.default_thresholds
        self.score_thresh = _first(score_thresh, inferred.get("score_thresh"), default_score)
        self.iou_thresh = None if not self.uses_nms else _first(iou_thresh, inferred.get("iou_thresh"), default_iou)
        self.max_detections_per_image = int(_first(max_detections_per_image, inferred.get("max_detections"),
                                                   default_max))
        self.num_classes = _first(num_classes, inferred.get("num_classes"), None)
        self.class_names = class_names if class_names is not None else inferred.get("class_names")
        self.core = self.make_core(inferred, model_name=self.model_name, version_name=self.version_name,
                                   store=self.store, num_classes=self.num_classes, score_thresh=self.score_thresh,
                                   iou_thresh=self.iou_thresh, max_detections=self.max_detections_per_image,
                                   architecture=self.architecture, class_names=self.class_names,
                                   flush_every=flush_every, strict=strict, max_feature_dim=max_feature_dim,
                                   max_pending_batches=max_pending_batches)

    def make_core(self, inferred: dict, **options: Any) -> TraceCore:
        """The tracing core (a 2D detection core; the 3D tracer makes a 3D one)."""
        return detection_core(**options)

    # -- what a family overrides --------------------------------------------------------------
    def model_settings(self) -> dict:
        """Thresholds and classes the model itself declares: any of ``score_thresh``, ``iou_thresh``,
        ``max_detections``, ``num_classes``, ``class_names``."""
        return {}

    def forward(self, images: Any, targets: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """Run the model; return ``(what the caller gets back, what decode() reads, features or None)``.

        The two differ for models that return losses in training mode (torchvision), where the
        detections come from an extra inference pass.
        """
        outputs = self.model(images, **kwargs)
        return outputs, outputs, None

    def decode(self, outputs: Any, images: Any) -> Any:
        """The model's outputs as per-image detections (see ``detections_per_image``)."""
        raise TraceInputError(f"{type(self).__name__} cannot decode {type(outputs).__name__} outputs; "
                              "pass postprocess=")

    def image_sizes(self, images: Any) -> list[tuple[int, int]] | None:
        """(height, width) of every image the boxes refer to: NCHW tensors or a list of CHW tensors."""
        shape = getattr(images, "shape", None)
        if shape is not None and len(shape) == 4:
            return [(int(shape[-2]), int(shape[-1]))] * int(shape[0])
        if isinstance(images, (list, tuple)) and all(len(getattr(i, "shape", ())) == 3 for i in images):
            return [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        return None

    # -- tracing ------------------------------------------------------------------------------
    def __call__(self, images: Any, targets: Any, input_ids: Any = None, dataset_type: str = "train",
                 n_epoch: int | None = None, **forward_kwargs: Any) -> Any:
        """Run the model on ``images``, trace detections and ground truth, return the model's output."""
        outputs, raw, features = self.forward(images, targets, **forward_kwargs)
        try:
            detections = self.detections(raw, images)
        except Exception as exc:  # noqa: BLE001 - tracing must never break the user's loop
            if self.strict:
                raise
            self.core.skip("undecodable_output", self.count_inputs(images),
                           str(exc) if isinstance(exc, TraceInputError) else f"{type(exc).__name__}: {exc}")
            return outputs
        self.core.record(detections, self.ground_truth(targets, raw), input_ids=input_ids, dataset_type=dataset_type,
                         n_epoch=n_epoch, features=features, inputs=images)
        return outputs

    def count_inputs(self, images: Any) -> int:
        """How many images (frames) a call's input holds, for the skip counters (a family whose input is a
        dict of batch fields, e.g. mmdet3d's or OpenPCDet's, overrides)."""
        return _count(images)

    def ground_truth(self, targets: Any, raw: Any) -> Any:
        """The ground truth to store (a family whose forward converts it, e.g. from normalised boxes, overrides)."""
        return targets

    def detections(self, outputs: Any, images: Any) -> dict[str, Any]:
        """Decode ``outputs`` (through ``postprocess=`` when given) into per-image detections."""
        if self._postprocess is not None:
            decoded = (self._postprocess(outputs) if _arity(self._postprocess) == 1
                       else self._postprocess(outputs, images))
        else:
            decoded = self.decode(outputs, images)
        sizes = decoded.get("image_size") if isinstance(decoded, Mapping) else None
        return detections_per_image(decoded, sizes if sizes is not None else self.image_sizes(images))

    def record(self, detections: Any, targets: Any, *, input_ids: Any = None, dataset_type: str = "train",
               n_epoch: int | None = None, image_sizes: Any = None, features: Any = None,
               inputs: Any = None, logged_at: Any = None) -> None:
        """Trace detections computed elsewhere (per-image dicts or a dict of lists, xyxy pixels).
        ``logged_at``: when they were made (as for classification's ``record``), by default now for
        ``targets=None``."""
        try:
            detections = detections_per_image(detections, image_sizes)
        except TraceInputError:
            if self.strict:
                raise
            self.core.skip("undecodable_output", _count(detections), "detections in an unknown format")
            return
        self.core.record(detections, targets, input_ids=input_ids, dataset_type=dataset_type, n_epoch=n_epoch,
                         features=features, inputs=inputs, logged_at=logged_at)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_name={self.model_name!r}, version_name={self.version_name!r}, "
                f"score_thresh={self.score_thresh}, iou_thresh={self.iou_thresh}, "
                f"max_detections_per_image={self.max_detections_per_image}, num_classes={self.num_classes})")


def ObjectDetectionTracer(model: Any, model_name: str, version_name: str,  # noqa: N802 - the product's name
                          score_thresh: float | None = None, iou_thresh: float | None = None,
                          max_detections_per_image: int | None = None, **kwargs: Any) -> DetectionTracer:
    """Factory of the product page: recognises the detector's framework and architecture and returns
    the matching ``DetectionTracer`` subclass (the supported families are listed in
    ``mldbg_callbacks.integrations.detectors``; ``docs/detection.md`` has the table).

    Thresholds left at ``None`` are read from the model, else 0.05 / 0.5 / 300. ``postprocess=``
    (``outputs, images -> detections``) traces any other model. Other keyword arguments as for
    ``DetectionTracer``.
    """
    from .integrations.detectors import detector_class

    cls = detector_class(model, postprocess=kwargs.get("postprocess"))
    return cls(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
               max_detections_per_image=max_detections_per_image, **kwargs)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _arity(function: Callable) -> int:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 2
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return 2 if any(p.kind == p.VAR_POSITIONAL for p in parameters) else len(positional)


def _count(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 0


def detection3d_core(model_name: str, version_name: str, *, store: str | os.PathLike | LocalStore | None = None,
                     num_classes: int | None = None, score_thresh: float = DEFAULT_3D_SCORE_THRESH,
                     iou_thresh: float | None = DEFAULT_3D_IOU_THRESH,
                     max_detections: int = DEFAULT_MAX_DETECTIONS, pc_range: Any = None,
                     architecture: str = "custom", class_names: Mapping | None = None, flush_every: int = 1,
                     strict: bool = False, max_feature_dim: int = 1024, max_pending_batches: int = 32) -> TraceCore:
    """The tracing core of a 3D detection run: ``core.record(detections, targets, ...)`` with
    ``detections = {"boxes": [per frame (N, 7 or 9) [cx, cy, cz, w, l, h, yaw(, vx, vy)]], "scores": [...],
    "labels": [...]}`` and ``targets`` in either format of the product page (``tasks/detection3d.py``)."""
    codec = Detection3DCodec(num_classes=num_classes, score_thresh=score_thresh, iou_thresh=iou_thresh,
                             max_detections=max_detections, architecture=architecture, class_names=class_names,
                             max_feature_dim=max_feature_dim, pc_range=pc_range)
    run = resolve_store(store).run(validate_name(model_name, "model_name"), validate_name(version_name, "version_name"))
    return TraceCore(codec, run, flush_every=flush_every, strict=strict, max_pending_batches=max_pending_batches)


class Detection3DTracer(DetectionTracer):
    """Trace a 3D detector's per-frame boxes and ground truth (base of every 3D family).

    ``ObjectDetection3DTracer(model, ...)`` picks the subclass; use this class with ``postprocess=`` for a
    model no family covers (``postprocess(outputs, inputs) -> [{"boxes": (N, 7|9), "scores", "labels"}]``).
    Boxes are ``[cx, cy, cz, w, l, h, yaw]`` (geometric centre, metres, radians; ``l`` along the heading),
    optionally ``+ [vx, vy]``; ground truth in either format of the product page, optionally with
    ``velocities`` (M, 2).

    Args: as ``DetectionTracer``, with ``max_detections_per_frame`` and ``pc_range`` (``[x_min, y_min,
    z_min, x_max, y_max, z_max]``, read from the model when ``None``; required by families that need
    it to decode, e.g. BEVFormer). Fallbacks 0.1 / 0.2 / 300; ``iou_thresh`` only matters for NMS models.
    """

    default_thresholds = (DEFAULT_3D_SCORE_THRESH, DEFAULT_3D_IOU_THRESH, DEFAULT_MAX_DETECTIONS)
    needs_pc_range = False

    def __init__(self, model: Any, model_name: str, version_name: str, score_thresh: float | None = None,
                 iou_thresh: float | None = None, max_detections_per_frame: int | None = None, *,
                 pc_range: Any = None, **kwargs: Any):
        self._pc_range_arg = pc_range
        super().__init__(model, model_name, version_name, score_thresh, iou_thresh, max_detections_per_frame,
                         **kwargs)

    def make_core(self, inferred: dict, **options: Any) -> TraceCore:
        self.pc_range = _first(self._pc_range_arg, inferred.get("pc_range"))
        if self.pc_range is None and self.needs_pc_range:
            raise ValueError(f"{type(self).__name__} needs pc_range=[x_min, y_min, z_min, x_max, y_max, z_max] to "
                             "decode its boxes and the model does not declare it (e.g. in its bbox_coder); pass "
                             "pc_range= to ObjectDetection3DTracer")
        return detection3d_core(pc_range=self.pc_range, **options)

    @property
    def max_detections_per_frame(self) -> int:
        return self.max_detections_per_image

    def image_sizes(self, inputs: Any) -> None:
        return None  # 3D boxes are metres, not pixels of an image


def ObjectDetection3DTracer(model: Any, model_name: str, version_name: str,  # noqa: N802 - the product's name
                            score_thresh: float | None = None, iou_thresh: float | None = None,
                            max_detections_per_frame: int | None = None, pc_range: Any = None,
                            **kwargs: Any) -> Detection3DTracer:
    """Factory of the product page: recognises the 3D detector (MMDetection3D, OpenPCDet, ...) and returns
    the matching ``Detection3DTracer`` subclass (families: ``mldbg_callbacks.integrations.detectors3d``).
    Thresholds left at ``None`` are read from the model's config, else 0.1 / 0.2 / 300."""
    from .integrations.detectors3d import detector3d_class

    cls = detector3d_class(model, postprocess=kwargs.get("postprocess"))
    return cls(model, model_name, version_name, score_thresh=score_thresh, iou_thresh=iou_thresh,
               max_detections_per_frame=max_detections_per_frame, pc_range=pc_range, **kwargs)
