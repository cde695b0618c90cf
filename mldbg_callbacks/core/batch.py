"""The unit of work handed from the training thread to the tracing worker, and what a codec returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa


@dataclass
class PendingBatch:
    """References to one batch, as handed over by the training thread (not yet on the host)."""

    outputs: Any
    targets: Any
    input_ids: Any
    features: Any
    inputs: Any  # kept only when input_ids are missing and must be derived from the content
    dataset_type: str
    n_epoch: int
    logged_at: float | None = None  # seconds since the Unix epoch (UTC) when the batch was recorded


@dataclass
class RowProblem:
    """Rows of a batch that a codec refused, with a message that names the fix. ``count == 0`` is a notice:
    nothing was dropped, the user is warned once (also under ``strict=True``)."""

    reason: str
    count: int
    message: str


@dataclass
class EncodedBatch:
    """Columnar rows ready for the store. ``table`` always has a string column ``input_id``."""

    table: pa.Table
    problems: list[RowProblem] = field(default_factory=list)


class TaskCodec(Protocol):
    """Task knowledge the core needs: validate cheaply, encode on the worker, describe the run."""

    task: str

    def check(self, batch: PendingBatch) -> int:
        """Validate what metadata alone can tell (shapes, lengths); return the batch size.

        Runs on the training thread, so it must not copy data or synchronise a device.
        Raises TraceInputError for a batch that cannot be traced at all.
        """

    def encode(self, batch: PendingBatch) -> EncodedBatch:
        """Convert to host arrays, validate values, drop bad rows (reported as RowProblem)."""

    # Optional (the core encodes batch by batch without them): ``merge_key(batch) -> hashable`` from metadata
    # and ``merge(batches) -> PendingBatch``, so that the worker encodes consecutive small batches with the
    # same key as one (the fixed cost per ``encode`` call dominates batches of a few samples).

    def run_meta(self) -> dict:
        """JSON-able facts about the traces (task, number of classes, ...) stored with the run."""
