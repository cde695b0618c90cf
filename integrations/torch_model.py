"""Run a ``torch.nn.Module`` and capture its penultimate features with a forward hook."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch


class TorchForward:
    """Calls ``model(*args, **kwargs)`` and returns ``(outputs, features)``.

    ``feature_layer``:
        ``None`` (default): the *input* of the last ``nn.Linear`` executed in the forward pass (the
        penultimate features of a classifier head); found on the first call by watching every Linear.
        a module name (``"backbone.avgpool"``) or an ``nn.Module``: that layer's *output*.
        ``False``: no features.
    """

    def __init__(self, model: torch.nn.Module, feature_layer: Any = None):
        self.model = model
        self._features: Any = None
        self._handles: list = []
        self._auto = feature_layer is None
        if feature_layer is None or feature_layer is False:
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

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self._features = None
        if len(args) == 1 and isinstance(args[0], Mapping):  # a batch dict (Hugging Face style): keyword inputs
            args, kwargs = (), {**args[0], **kwargs}
        if self._auto:
            return self._first_call(*args, **kwargs)
        outputs = self.model(*args, **kwargs)
        return outputs, self._features

    def _first_call(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self._auto = False
        seen: list[tuple[torch.nn.Module, Any]] = []
        handles = [m.register_forward_pre_hook(lambda mod, inp: seen.append((mod, inp[0] if inp else None)))
                   for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            outputs = self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not seen:
            warnings.warn(f"{type(self.model).__name__} ran no nn.Linear, so no penultimate features are "
                          "captured; pass feature_layer='<module name>' to choose a layer", stacklevel=3)
            return outputs, None
        last_linear, features = seen[-1]
        self._handles.append(last_linear.register_forward_pre_hook(self._capture_input))
        return outputs, _detach(features)

    def _capture_input(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._features = _detach(inputs[0]) if inputs else None

    def _capture_output(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        self._features = _detach(output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else None
