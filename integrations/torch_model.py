"""PyTorch: capture penultimate features with forward hooks, and run a module for the tracer."""

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
        if isinstance(feature_layer, str):
            try:
                layer = model.get_submodule(feature_layer)
            except AttributeError:
                names = [name for name, _ in model.named_modules() if name]
                raise ValueError(f"feature_layer={feature_layer!r} is not a submodule of "
                                 f"{type(model).__name__}; some names: {names[-8:]}") from None
        elif isinstance(feature_layer, torch.nn.Module):
            layer = feature_layer
        else:
            raise TypeError(f"feature_layer must be None, False, a module name or an nn.Module, got {feature_layer!r}")
        self._handles.append(layer.register_forward_hook(self._capture_output))

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


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else None
