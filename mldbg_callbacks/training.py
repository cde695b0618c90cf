"""Tracers of the product page: ``from mldbg_callbacks.training import ClassificationTracer``.

A tracer wraps a model: ``tracer(x, y, input_ids=..., dataset_type="train", n_epoch=0)`` runs the
model, hands outputs, labels and penultimate features to the tracing core and returns the model's
output unchanged (gradients flow through it, so it can replace ``model(x)`` in a training step).
``tracer.wait_for_save()`` makes everything durable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .core.trace_core import TraceCore, TraceStats
from .store import LocalStore, resolve_store
from .store.names import validate_name
from .tasks.classification import ClassificationCodec

__all__ = ["ClassificationTracer", "ObjectDetectionTracer", "ObjectDetection3DTracer"]


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


class ClassificationTracer:
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

    def __call__(self, inputs: Any, labels: Any, input_ids: Any = None, dataset_type: str = "train",
                 n_epoch: int | None = None, **forward_kwargs: Any) -> Any:
        """Run the model on ``inputs``, trace the batch, return the model's output unchanged."""
        outputs, features = self._forward(inputs, **forward_kwargs)
        self.core.record(scores_of(outputs), labels, input_ids=input_ids, dataset_type=dataset_type,
                         n_epoch=n_epoch, features=features, inputs=inputs)
        return outputs

    def record(self, outputs: Any, labels: Any, *, input_ids: Any = None, dataset_type: str = "train",
               n_epoch: int | None = None, features: Any = None, inputs: Any = None) -> None:
        """Trace outputs computed elsewhere (the framework callbacks use this)."""
        self.core.record(scores_of(outputs), labels, input_ids=input_ids, dataset_type=dataset_type,
                         n_epoch=n_epoch, features=features, inputs=inputs)

    def wait_for_save(self, n_epoch: int | None = None, timeout_s: float | None = None) -> TraceStats:
        """Block until the traces (of ``n_epoch``, or all) are durable; raise if a write failed."""
        return self.core.wait_for_save(n_epoch=n_epoch, timeout_s=timeout_s)

    @property
    def stats(self) -> TraceStats:
        """Counters: rows received, written, skipped by reason, duplicates dropped, write errors."""
        return self.core.stats

    def close(self) -> None:
        """Save what is buffered, stop the background worker and remove the feature hook."""
        self.core.close()
        remove = getattr(self._forward, "remove", None)
        if remove is not None:
            remove()

    def __enter__(self) -> "ClassificationTracer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ObjectDetectionTracer(model: Any, model_name: str, version_name: str, **kwargs: Any) -> Any:  # noqa: N802
    """2D object detection tracer factory of the product page (not part of this version yet)."""
    raise NotImplementedError("ObjectDetectionTracer (2D object detection) is not available in this version "
                              "yet; ClassificationTracer is")


def ObjectDetection3DTracer(model: Any, model_name: str, version_name: str, **kwargs: Any) -> Any:  # noqa: N802
    """3D object detection tracer factory of the product page (not part of this version yet)."""
    raise NotImplementedError("ObjectDetection3DTracer (3D object detection) is not available in this version "
                              "yet; ClassificationTracer is")
