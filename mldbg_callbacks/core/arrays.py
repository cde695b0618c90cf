"""Framework-neutral handling of tensors: hand-over on the training thread, conversion on the worker.

Nothing here imports a framework; tensors are recognised by duck typing (``detach``/``cpu`` for
PyTorch, ``numpy()`` for TensorFlow eager tensors, ``__array__`` for JAX and everything else).
"""

from __future__ import annotations

from typing import Any

import sys

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)


def hand_over(value: Any) -> Any:
    """What the training thread keeps of ``value`` until the worker converts it.

    Cheap by design: a detached reference for framework tensors (no device sync, no copy; detaching
    also drops the autograd graph so it is not kept alive by the queue) and a copy for NumPy arrays,
    because data pipelines often reuse their NumPy buffers for the next batch.
    """
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value.copy()
    detach = getattr(value, "detach", None)
    if callable(detach):
        return detach()
    if isinstance(value, (list, tuple)):
        return [hand_over(v) for v in value]
    if isinstance(value, dict):
        return {k: hand_over(v) for k, v in value.items()}
    return value


def to_numpy(value: Any) -> np.ndarray | None:
    """Convert a tensor, array, scalar or sequence of those to a NumPy array on the host.

    Half-precision framework tensors (fp16, bf16) are widened to float32 first: NumPy has no
    bfloat16, and float16 arithmetic in the analysis would lose precision.
    """
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        tensor = value.detach()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        return tensor.cpu().numpy()
    if isinstance(value, (list, tuple)):
        if len(value) and not np.isscalar(value[0]) and not isinstance(value[0], (str, bytes)):
            return np.stack([to_numpy(v) for v in value])
        return np.asarray(value)
    numpy_method = getattr(value, "numpy", None)
    if callable(numpy_method):  # tf.Tensor (eager)
        array = np.asarray(numpy_method())
    else:  # jax.Array and anything implementing __array__
        array = np.asarray(value)
    if array.dtype.kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    elif array.dtype.kind == "V":  # e.g. ml_dtypes.bfloat16 seen as void by old NumPy
        array = np.asarray(value, dtype=np.float32)
    return array


def leading_dim(value: Any) -> int | None:
    """Batch size of ``value`` read from metadata only (no device sync, no copy); None if unknown."""
    if value is None:
        return None
    shape = getattr(value, "shape", None)
    if shape is not None:
        if len(shape) == 0:
            return None
        first = shape[0]
        return None if first is None else int(first)
    try:
        return len(value)
    except TypeError:
        return None


def to_float16(matrix: np.ndarray) -> np.ndarray:
    """Clip to float16's range and convert a 2-D float array to float16.

    NumPy converts float32 to float16 one value at a time (~0.7 ms for 256x512); PyTorch's kernel uses
    the CPU's F16C instructions (~20 us). When the training process already imported torch it is used,
    in row chunks below ATen's parallel grain size so the conversion stays on this (worker) thread and
    never wakes an OpenMP team that would compete with training. Output is bit-identical.
    """
    clipped = np.ascontiguousarray(np.clip(matrix, -FLOAT16_MAX, FLOAT16_MAX), dtype=np.float32)
    torch = sys.modules.get("torch")  # never imported here: only used when the user's process has it
    if torch is None or clipped.ndim != 2 or not clipped.size:
        return clipped.astype(np.float16)
    out = np.empty(clipped.shape, dtype=np.float16)
    source, target = torch.from_numpy(clipped), torch.from_numpy(out)
    rows = max(1, 16384 // clipped.shape[1])
    for start in range(0, len(clipped), rows):
        target[start:start + rows].copy_(source[start:start + rows])
    return out
