"""Operation-time logging: ``InferenceLogger`` wraps a model in serving code and traces a sample of its
predictions without labels, into the same store (local or a server) as the training traces.

    from mldbg_callbacks.operation import InferenceLogger

    logger = InferenceLogger(model, "resnet18", "v1", sample_rate=0.05)
    outputs = logger(batch)              # in the request handler: the model's output, unchanged
    ...
    logger.close()                       # at shutdown: what was sampled is made durable

Evaluate as usual (``Evaluator(...).request_evaluation()``); the logged rows appear in
``result.unlabelled()``, ``result.monitoring(window="h")`` summarises them per hour with drift flags,
and ``result.select(budget, ...)`` picks the ones to label (docs/operation.md).

The request path never waits on tracing and never fails because of it: a sampled call hands references
to the tracing core's bounded queue without blocking (a full queue drops the batch, counted in
``stats.rows_skipped["queue_full"]``), everything tracing raises is swallowed and counted in
``stats.logging_errors``, and durability is requested every ``flush_interval_s`` without waiting. Only
errors of the model itself reach the caller.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .core.arrays import leading_dim
from .core.trace_core import TraceStats
from .store import LocalStore
from .store.names import validate_name
from .training import ClassificationTracer, ObjectDetection3DTracer, ObjectDetectionTracer

log = logging.getLogger("mldbg_callbacks")

TRACERS = {"classification": ClassificationTracer, "object_detection": ObjectDetectionTracer,
           "object_detection_3d": ObjectDetection3DTracer}


class UniqueIds:
    """Ids for rows that come without any: ``<12 hex>-<n>``, unique across calls and processes, so identical
    inputs logged twice are two rows, not duplicates (content hashes would merge them)."""

    def __init__(self):
        self.prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count()  # next() on a count is atomic under the GIL

    def take(self, size: int) -> list[str]:
        return [f"{self.prefix}-{next(self._counter)}" for _ in range(size)]


@dataclass
class LoggerStats:
    """Counters of an InferenceLogger: calls seen, calls sampled for logging, tracing errors swallowed,
    and the tracing core's own counters (rows written, rows skipped by reason, e.g. ``queue_full``)."""

    calls: int
    sampled_calls: int
    logging_errors: int
    trace: TraceStats


class InferenceLogger:
    """Wrap a model for serving: return its outputs, trace a random ``sample_rate`` of the calls without labels.

    Args:
        model: as for the task's tracer (a classifier, a 2D or a 3D detector).
        model_name, version_name: the names of the training traces the logs are compared with.
        task: ``"classification"``, ``"object_detection"`` or ``"object_detection_3d"``.
        sample_rate: share of calls traced (each call independently; 1.0 = every call).
        dataset_type: the dataset the logs go to (default ``"operation"``).
        n_epoch: the partition the logs go to (e.g. one per deployment); a day's logs need no new epoch,
            every row carries its ``logged_at`` time.
        flush_interval_s: how often what was sampled is made durable (asked without waiting).
        seed: of the sampling (``None``: unseeded).
        max_pending_batches: the hand-over queue's bound; beyond it sampled batches are dropped.
        **tracer_options: passed to the task's tracer (``feature_layer``, ``store``, ``num_classes``, ...).
    """

    def __init__(self, model: Any, model_name: str, version_name: str, *, task: str = "classification",
                 sample_rate: float = 0.1, dataset_type: str = "operation", n_epoch: int = 0,
                 flush_interval_s: float = 30.0, seed: int | None = None,
                 store: str | os.PathLike | LocalStore | None = None, max_pending_batches: int = 32,
                 **tracer_options: Any):
        if task not in TRACERS:
            raise ValueError(f"task must be one of {sorted(TRACERS)}, got {task!r}")
        if not 0.0 <= float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be a share of calls in [0, 1], got {sample_rate!r}")
        if tracer_options.get("strict"):
            raise ValueError("InferenceLogger never raises into the request path; strict=True is for training")
        self.task = task
        self.sample_rate = float(sample_rate)
        self.dataset_type = validate_name(dataset_type, "dataset_type")
        self.n_epoch = n_epoch
        self.flush_interval_s = flush_interval_s
        self.tracer = TRACERS[task](model, model_name, version_name, store=store,
                                    max_pending_batches=max_pending_batches, **tracer_options)
        self.tracer.core.block_when_full = False  # drop and count rather than block a request
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._unique_ids = UniqueIds()
        self._calls = self._sampled = self._errors = 0
        self._last_flush = time.monotonic()
        self._warned = False

    @property
    def model(self) -> Any:
        return self.tracer.model

    def __call__(self, inputs: Any, input_ids: Any = None, **forward_kwargs: Any) -> Any:
        """Run the model on ``inputs`` and return its output; trace the call if it is sampled.

        ``input_ids``: your request ids (one per sample), else unique ids are generated.
        """
        with self._lock:
            self._calls += 1
            sampled = self._random.random() < self.sample_rate
            self._sampled += sampled
        if not sampled:
            return self.tracer.model(inputs, **forward_kwargs)
        if self.task == "classification":
            outputs, features = self.tracer.forward(inputs, **forward_kwargs)  # model errors reach the caller
            self._log(lambda: self.tracer.record(outputs, None, input_ids=self._ids(input_ids, outputs),
                                                 dataset_type=self.dataset_type, n_epoch=self.n_epoch,
                                                 features=features))
            return outputs
        outputs, raw, features = self.tracer.forward(inputs, None, **forward_kwargs)
        self._log(lambda: self.tracer.core.record(
            detections := self.tracer.detections(raw, inputs), None,
            input_ids=self._ids(input_ids, detections["boxes"]), dataset_type=self.dataset_type,
            n_epoch=self.n_epoch, features=features))
        return outputs

    def log(self, outputs: Any, *, input_ids: Any = None, features: Any = None) -> None:
        """Trace outputs computed elsewhere (classification: class scores; detection: per-image
        detections as for the tracers' ``record``), subject to the same sampling; never raises."""
        with self._lock:
            self._calls += 1
            sampled = self._random.random() < self.sample_rate
            self._sampled += sampled
        if sampled:
            self._log(lambda: self.tracer.record(outputs, None, input_ids=self._ids(input_ids, outputs),
                                                 dataset_type=self.dataset_type, n_epoch=self.n_epoch,
                                                 features=features))

    def _ids(self, input_ids: Any, outputs: Any) -> Any:
        if input_ids is not None:
            return input_ids
        if isinstance(outputs, dict) and "boxes" in outputs:
            outputs = outputs["boxes"]
        size = leading_dim(outputs) or 0
        return self._unique_ids.take(size)

    def _log(self, record: Any) -> None:
        try:
            record()
            if time.monotonic() - self._last_flush >= self.flush_interval_s:
                self._last_flush = time.monotonic()
                self.tracer.core.request_flush()
        except Exception as exc:  # noqa: BLE001 - logging must never break a request
            with self._lock:
                self._errors += 1
                first, self._warned = not self._warned, True
            if first:
                log.warning("mldbg-callbacks: InferenceLogger could not log a call (%s: %s); requests go on, "
                            "further errors are counted in logger.stats.logging_errors", type(exc).__name__, exc)

    @property
    def stats(self) -> LoggerStats:
        """Calls, sampled calls, swallowed errors and the tracing core's counters."""
        with self._lock:
            return LoggerStats(self._calls, self._sampled, self._errors, self.tracer.stats)

    def wait_for_save(self, timeout_s: float | None = None) -> TraceStats:
        """Block until everything logged so far is durable (not for the request path)."""
        return self.tracer.wait_for_save(timeout_s=timeout_s)

    def close(self) -> None:
        """Make what was logged durable and stop the tracing worker (at shutdown)."""
        self.tracer.close()

    def __enter__(self) -> "InferenceLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
