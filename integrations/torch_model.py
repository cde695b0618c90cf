"""PyTorch: capture penultimate features (classifiers) or pooled feature maps (detectors) with forward
hooks, and run a module for the tracer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch


class TorchFeatureCapture:
    """Keeps the most recent features seen by forward hooks on ``model``; the framework runs the model.

    ``feature_layer``:
        ``None`` (default): the *input* of the last ``nn.Linear`` executed in a forward pass (the
        penultimate features of a classifier head). Until ``settle()`` every Linear is watched; then
        only the last one that ran keeps its hook.
        a module name (``"backbone.avgpool"``) or an ``nn.Module``: that layer's *output*.
        ``False``: no features.
    """

    def __init__(self, model: torch.nn.Module, feature_layer: Any = None):
        self.model = model
        self._latest: Any = None
        self._last_linear: torch.nn.Module | None = None
        self._handles: list = []
        self._settled = feature_layer is not None
        if feature_layer is False:
            return
        if feature_layer is None:
            self._handles = [m.register_forward_pre_hook(self._watch_linear)
                             for m in model.modules() if isinstance(m, torch.nn.Linear)]
            return
        self._handles.append(resolve_layer(model, feature_layer).register_forward_hook(self._capture_output))

    def pop(self) -> torch.Tensor | None:
        """The features of the most recent forward pass (detached), then forget them."""
        features, self._latest = self._latest, None
        return features

    def settle(self) -> None:
        """After a first forward pass: keep watching only the last Linear that ran."""
        if self._settled:
            return
        self._settled = True
        self.remove()
        if self._last_linear is None:
            warnings.warn(f"{type(self.model).__name__} ran no nn.Linear, so no penultimate features are "
                          "captured; pass feature_layer='<module name>' to choose a layer", stacklevel=3)
            return
        self._handles.append(self._last_linear.register_forward_pre_hook(self._capture_input))

    def _watch_linear(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._last_linear = module
        self._capture_input(module, inputs)

    def _capture_input(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._latest = _detach(inputs[0]) if inputs else None

    def _capture_output(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        self._latest = _detach(output[0] if isinstance(output, (tuple, list)) else output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PooledFeatures:
    """A forward hook keeping a ``(B, C)`` image embedding: a module's output, mean-pooled over space.

    The module's output is reduced to one feature map first (``last_feature_map``); pooling happens in
    ``pop()``, so a pass whose features are discarded costs nothing but the hook call.

    Args:
        model: the detector (module names are resolved in it).
        feature_layer: ``None`` = ``default``; a module name or ``nn.Module`` = that module; ``False`` = none.
        default: the family's default module (a backbone), or ``None`` for no default features.
    """

    def __init__(self, model: torch.nn.Module, feature_layer: Any, default: torch.nn.Module | None):
        self._latest: Any = None
        self._handle: Any = None
        if feature_layer is False:
            return
        layer = default if feature_layer is None else resolve_layer(model, feature_layer)
        if layer is not None:
            self._handle = layer.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        self._latest = last_feature_map(output)

    def pop(self) -> torch.Tensor | None:
        """The pooled features of the most recent forward pass (detached), then forget them."""
        fmap, self._latest = self._latest, None
        if fmap is None or fmap.ndim < 2:
            return None
        fmap = fmap.detach()
        if fmap.ndim == 3:  # (B, tokens, dim): a transformer's sequence
            return fmap.mean(dim=1)
        return fmap.flatten(2).mean(-1) if fmap.ndim > 3 else fmap  # (B, C, H, W...) -> (B, C)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def last_feature_map(output: Any) -> torch.Tensor | None:
    """One tensor out of a backbone's output: the tensor itself; the last value of a dict (torchvision's
    FPN returns finest to coarsest, so the coarsest level); the last element of a list (a list of stages);
    the first element of a tuple (``(features, extras)``, e.g. DETR's ``Joiner`` returns ``(features,
    position encodings)``); ``.tensors`` of a DETR ``NestedTensor``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return last_feature_map(list(output.values())[-1]) if output else None
    if isinstance(output, tuple):
        return last_feature_map(output[0]) if output else None
    if isinstance(output, list):
        return last_feature_map(output[-1]) if output else None
    tensors = getattr(output, "tensors", None)
    return tensors if isinstance(tensors, torch.Tensor) else None


class TorchForward:
    """Calls ``model(*args, **kwargs)`` (a single dict argument is passed as keywords, Hugging Face
    style) and returns ``(outputs, features)``."""

    def __init__(self, model: torch.nn.Module, feature_layer: Any = None):
        self.model = model
        self.capture = TorchFeatureCapture(model, feature_layer)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if len(args) == 1 and isinstance(args[0], Mapping):
            args, kwargs = (), {**args[0], **kwargs}
        self.capture.pop()
        outputs = self.model(*args, **kwargs)
        features = self.capture.pop()
        self.capture.settle()
        return outputs, features

    def remove(self) -> None:
        self.capture.remove()


def resolve_layer(model: torch.nn.Module, feature_layer: Any) -> torch.nn.Module:
    """The module named (or given) by ``feature_layer``; a clear error for a name the model lacks."""
    if isinstance(feature_layer, torch.nn.Module):
        return feature_layer
    if not isinstance(feature_layer, str):
        raise TypeError(f"feature_layer must be None, False, a module name or an nn.Module, got {feature_layer!r}")
    try:
        return model.get_submodule(feature_layer)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        raise ValueError(f"feature_layer={feature_layer!r} is not a submodule of {type(model).__name__}; "
                         f"some names: {names[-8:]}") from None


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else None
