"""mldbg-callbacks: see why your model fails, sample by sample.

Importing this package imports no deep-learning framework; the tracers and evaluator are loaded on
first use::

    from mldbg_callbacks.training import ClassificationTracer
    from mldbg_callbacks.evaluator import Evaluator
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ClassificationTracer": "mldbg_callbacks.training",
    "ObjectDetectionTracer": "mldbg_callbacks.training",
    "ObjectDetection3DTracer": "mldbg_callbacks.training",
    "InferenceLogger": "mldbg_callbacks.operation",
    "Evaluator": "mldbg_callbacks.evaluator",
    "Result": "mldbg_callbacks.evaluator",
    "LocalStore": "mldbg_callbacks.store",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mldbg_callbacks' has no attribute {name!r}")
