"""Tests that need MMDetection3D: they run in the second environment (``scripts/setup_mmdet3d.sh``).

``bash scripts/test.sh`` runs them after the main suite with that environment's python; the main run
ignores this folder (``--ignore=tests/mmdet3d`` in pyproject's pytest ``addopts``). Run alone with
``source scripts/setup_mmdet3d.sh && $MLDBG_MMDET3D_PY -m pytest tests/mmdet3d``.
"""

from __future__ import annotations

import os

import pytest

try:
    import mmcv.ops  # noqa: F401 - the compiled ops (mmcv-lite has none)
    import mmdet3d  # noqa: F401
except ImportError as exc:  # a loud failure, never a silent skip
    raise pytest.UsageError(
        f"tests/mmdet3d need the mmdet3d environment ({exc}); run them with "
        "`source scripts/setup_mmdet3d.sh && $MLDBG_MMDET3D_PY -m pytest tests/mmdet3d` (bash scripts/test.sh does)"
    ) from exc

import torch  # noqa: E402

# mmengine checkpoints pickle non-tensor state: resume under torch >= 2.6 needs full unpickling
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
torch.set_num_threads(2)
