"""Run a Keras 3 model eagerly and capture the input of its last Dense layer (any backend)."""

from __future__ import annotations

import warnings
from typing import Any

import keras


def _walk(layer: Any):
    for child in getattr(layer, "layers", []) or []:
        yield child
        yield from _walk(child)


class KerasForward:
    """Calls ``model(x, training=False)`` and returns ``(outputs, features)``.

    ``feature_layer``: ``None`` for the input of the last Dense layer (penultimate features), a layer
    name or a layer object for that layer's *output*, ``False`` for none. The layer's ``call`` is
    wrapped on this model instance only; ``remove()`` restores it.
    """

    def __init__(self, model: keras.Model, feature_layer: Any = None):
        self.model = model
        self._features: Any = None
        self._patched: Any = None
        if feature_layer is False:
            return
        if feature_layer is None:
            dense = [layer for layer in _walk(model) if isinstance(layer, keras.layers.Dense)]
            if not dense:
                warnings.warn(f"{model.name} has no Dense layer, so no penultimate features are captured; "
                              "pass feature_layer='<layer name>'", stacklevel=3)
                return
            self._patch(dense[-1], capture="input")
            return
        if isinstance(feature_layer, str):
            matches = [layer for layer in _walk(model) if layer.name == feature_layer]
            if not matches:
                names = [layer.name for layer in _walk(model)]
                raise ValueError(f"feature_layer={feature_layer!r} is not a layer of {model.name}; layers: {names}")
            feature_layer = matches[0]
        self._patch(feature_layer, capture="output")

    def _patch(self, layer: Any, capture: str) -> None:
        original = layer.call
        own = "call" in vars(layer)  # an instance attribute already (someone else's patch) or the class method

        def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            output = original(inputs, *args, **kwargs)
            self._features = inputs if capture == "input" else output
            return output

        layer.call = call
        self._patched = (layer, original if own else None)

    def __call__(self, inputs: Any, training: bool = False, **kwargs: Any) -> tuple[Any, Any]:
        self._features = None
        outputs = self.model(inputs, training=training, **kwargs)
        return outputs, self._features

    def take_features(self) -> Any:
        """The features of the latest forward through the model (by anyone: ``model.predict`` too), then
        forget them."""
        features, self._features = self._features, None
        return features

    def remove(self) -> None:
        if self._patched is not None:
            layer, original = self._patched
            if original is None:
                del layer.call  # back to the class's call, no bound-method attribute left behind
            else:
                layer.call = original
            self._patched = None
