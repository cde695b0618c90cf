"""Content hashes that identify a sample when the user passes no input_ids."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import TraceInputError
from .arrays import to_numpy


def row_hashes(inputs: np.ndarray) -> np.ndarray:
    """One 128-bit hex digest per row of ``inputs`` (shape and dtype included, so 1.0 != 1).

    The same bytes give the same id in every epoch and on every rank, so un-shuffled or shuffled
    passes over the same data line up without ids. Inputs that are augmented randomly per epoch get
    a new id each time: pass ``input_ids`` for those.
    """
    rows = np.ascontiguousarray(inputs).reshape(len(inputs), -1)
    header = f"{inputs.dtype.str}{inputs.shape[1:]}".encode()
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):  # one C-level digest per sample; batch-sized loop
        digest = hashlib.blake2b(header, digest_size=16)
        digest.update(row.data)
        out[i] = digest.hexdigest()
    return out


def batch_ids(input_ids: Any, inputs: Any, size: int) -> np.ndarray:
    """The string id of every sample of a batch: ``input_ids`` as strings, else content hashes of ``inputs``
    (one array, or a list of differently sized arrays such as a detector's images)."""
    if input_ids is None:
        if isinstance(inputs, (list, tuple)):
            return np.array([row_hashes(to_numpy(x)[None])[0] for x in inputs], dtype=object)
        return row_hashes(to_numpy(inputs))
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(i, str) for i in input_ids):
        input_ids = np.array(input_ids, dtype=object)  # NumPy's str dtype drops trailing NULs: "a\0" became "a"
    ids = to_numpy(input_ids)
    if ids.ndim != 1:
        raise TraceInputError(f"input_ids must be one id per sample (1-D), got shape {ids.shape}")
    if ids.dtype.kind == "S":
        ids = np.char.decode(ids, "utf-8")
    elif ids.dtype.kind == "f":
        if not np.all(ids == np.round(ids)):
            raise TraceInputError("input_ids are non-integer floats; pass ints or strings")
        ids = ids.astype(np.int64)
    if ids.dtype.kind in "iu":  # Arrow's cast is ~6x faster than NumPy's int -> str
        return pa.array(ids).cast(pa.string()).to_numpy(zero_copy_only=False)
    if ids.dtype.kind == "O":  # strings as given (astype(str) would drop trailing NULs); anything else below
        try:
            strings = pa.array(ids, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            strings = None
        if strings is not None and not strings.null_count:  # None ids stay "None", as before
            return strings.to_numpy(zero_copy_only=False)
    return ids.astype(str).astype(object)
