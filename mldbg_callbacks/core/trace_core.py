"""TraceCore: the one place that knows about epochs, buffering, flushing, ranks and failures.

Modelled on torchmetrics' ``Metric``: all state is declared in ``__init__``; ``record()`` is the cheap
per-batch update (no I/O, no device sync: it validates shapes and hands references to a bounded
queue); flushing is one explicit step per epoch (``wait_for_save()``, or automatically every
``flush_every`` epochs). A single background worker converts to NumPy, validates values, encodes
Arrow batches, removes duplicate ids and writes Parquet through the sink. The worker stages small
batches of a partition and encodes them together (``encode_rows``): encoding has a fixed cost per call
(~1 ms of building Arrow columns) that would otherwise dominate batches of a few samples.

Failure policy: with ``strict=False`` (the default) nothing raised by tracing reaches the training
loop; each kind of problem is warned about once and the skipped rows are counted in ``stats``.
``wait_for_save()`` still raises if data could not be written, because the caller asked for
durability. With ``strict=True`` bad input raises at the ``record()`` call that caused it (values are
then validated on the calling thread).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import numbers
import os
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ..errors import EpochNotRecordedError, TraceInputError, TraceWriteError
from ..store.names import validate_name
from .arrays import hand_over, leading_dim
from .batch import EncodedBatch, PendingBatch, TaskCodec
from .distributed import rank_and_world_size
from .hashing import batch_ids

log = logging.getLogger("mldbg_callbacks")

PartitionKey = tuple  # (dataset_type: str, n_epoch: int)


class TraceWarning(UserWarning):
    """Tracing skipped something but training goes on (strict=False)."""


class TraceSink(Protocol):
    """Where encoded rows go: a LocalStore ``RunWriter`` or a server's ``HttpSink``.

    A sink may also have ``pending() -> SpoolStatus`` (what it holds for later delivery)."""

    def write_meta(self, meta: dict) -> None: ...

    def write_part(self, dataset_type: str, n_epoch: int, rank: int, table: pa.Table) -> str: ...

    def commit(self, dataset_type: str, n_epoch: int, rank: int, parts: list[str], rows: int,
               world_size: int) -> None: ...


@dataclass
class TraceStats:
    """Counters of one tracer; a copy is returned by ``wait_for_save()``."""

    batches: int = 0
    rows_received: int = 0
    rows_written: int = 0
    duplicates_dropped: int = 0
    rows_skipped: dict = field(default_factory=collections.Counter)
    write_errors: int = 0
    pending_uploads: int = 0  # remote sink: requests spooled on disk, not yet delivered to the server
    pending_bytes: int = 0
    # CPU seconds the tracing worker thread spent (validating, encoding, writing): the work tracing adds
    # besides the hand-over on the training thread, measurable on a machine too noisy to time epochs
    worker_cpu_s: float = 0.0

    def copy(self) -> "TraceStats":
        return dataclasses.replace(self, rows_skipped=collections.Counter(self.rows_skipped))

    @property
    def total_skipped(self) -> int:
        return int(sum(self.rows_skipped.values()))


class TraceCore:
    """Buffers, validates and persists per-sample traces of one model version.

    Args:
        codec: task knowledge (see ``tasks/``): validation and Arrow encoding of one batch.
        sink: where rows and commit markers go (``LocalStore.run(model, version)``).
        flush_every: commit every k epochs; data of finished epochs stays buffered until then.
        max_pending_batches: bound of the hand-over queue; ``record()`` blocks when it is full
            (back-pressure instead of unbounded memory).
        rows_per_part: a partition's buffer is spilled to a Parquet part (not yet visible to
            readers) once it holds this many rows, which bounds memory per open epoch.
        strict: raise on bad input and tracing errors instead of warning and counting.
        encode_rows: batches of one partition are staged (references as handed over; inputs kept for
            content-hash ids are hashed first and let go) and encoded
            together once they hold this many rows, or when the partition is flushed; ``1`` encodes
            every batch on arrival. Only for codecs with ``merge`` (classification, 2D and 3D detection).
        block_when_full: ``False`` for serving code (``InferenceLogger``): when the hand-over queue is
            full, ``record()`` drops the batch and counts it (``rows_skipped["queue_full"]``) instead of
            waiting for the worker, so the request path never blocks.
    """

    def __init__(self, codec: TaskCodec, sink: TraceSink, *, flush_every: int = 1,
                 max_pending_batches: int = 32, rows_per_part: int = 65536, strict: bool = False,
                 block_when_full: bool = True, encode_rows: int = 2048):
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        self.codec = codec
        self.sink = sink
        self.flush_every = flush_every
        self.max_pending_batches = max_pending_batches
        self.rows_per_part = rows_per_part
        self.strict = strict
        self.block_when_full = block_when_full
        self.encode_rows = encode_rows
        self._init_runtime_state()

    # -- state --------------------------------------------------------------------------------
    def _init_runtime_state(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=self.max_pending_batches)
        self._worker: threading.Thread | None = None
        self._rank: int | None = None
        self._world_size = 1
        # caller-thread state
        self._recorded: set[PartitionKey] = set()
        self._valid_dataset_types: set[str] = set()
        self._warned: set[str] = set()
        # worker-thread state
        self._staged: dict[PartitionKey, list[tuple[PendingBatch, int]]] = collections.defaultdict(list)
        self._staged_rows: collections.Counter = collections.Counter()
        self._buffers: dict[PartitionKey, list[pa.Table]] = collections.defaultdict(list)
        self._buffer_rows: collections.Counter = collections.Counter()
        self._seen_ids: dict[PartitionKey, set] = collections.defaultdict(set)
        self._spilled_parts: dict[PartitionKey, list[str]] = collections.defaultdict(list)
        self._written_rows: collections.Counter = collections.Counter()
        self._closed: set[PartitionKey] = set()
        self._latest_epoch: dict[str, int] = {}
        # shared (guarded by _lock)
        self._stats = TraceStats()
        self._write_failures: list[tuple[PartitionKey, BaseException]] = []

    def __getstate__(self) -> dict:
        # Threads and queues do not pickle (spawned DDP workers copy callbacks); traces recorded so far
        # stay with the original process, the copy starts empty.
        state = self.__dict__.copy()
        for name in list(state):
            if name.startswith("_"):
                del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime_state()

    @property
    def stats(self) -> TraceStats:
        with self._lock:
            return self._stats.copy()

    @property
    def rank(self) -> int:
        if self._rank is None:
            self._rank, self._world_size = rank_and_world_size()
        return self._rank

    # -- training thread ----------------------------------------------------------------------
    def record(self, outputs: Any, targets: Any, *, input_ids: Any = None, dataset_type: str = "train",
               n_epoch: int | None = None, features: Any = None, inputs: Any = None,
               logged_at: float | None = None) -> None:
        """Hand one batch over for tracing. Cheap: shape checks and references only.

        ``input_ids`` identify samples across epochs; without them a content hash of ``inputs``
        is the id. ``n_epoch=None`` records into epoch 0. ``targets=None`` traces predictions without
        ground truth (operation-time logging, an unlabelled pool); such rows get a ``logged_at`` column
        (UTC), the time of this call unless ``logged_at`` (seconds since the Unix epoch) is given; a
        labelled batch gets the column only when ``logged_at`` is given, so existing stores are unchanged.
        """
        if dataset_type not in self._valid_dataset_types:  # validated once per name, not per batch
            self._valid_dataset_types.add(validate_name(dataset_type, "dataset_type"))
        try:
            epoch = _validate_epoch(n_epoch)
            self._recorded.add((dataset_type, epoch))  # also when the batch is skipped below
            if input_ids is None and inputs is None:
                raise TraceInputError("input_ids is None and no inputs were given to hash: pass input_ids=")
            if logged_at is None and targets is None:
                logged_at = time.time()
            batch = PendingBatch(outputs, targets, input_ids, features,
                                 inputs if input_ids is None else None, dataset_type, epoch,
                                 None if logged_at is None else _validate_time(logged_at))
            size = self.codec.check(batch)
        except Exception as exc:  # noqa: BLE001 - user tensors can fail in any way; never break training
            if self.strict:
                raise
            message = str(exc) if isinstance(exc, TraceInputError) else f"{type(exc).__name__}: {exc}"
            self.skip("invalid_batch", _safe_len(outputs), message)
            return
        if size == 0:
            return
        item: PendingBatch | EncodedBatch
        if self.strict:
            item = self.codec.encode(_handed_over(batch))
            refused = [p for p in item.problems if p.count]  # count 0: a notice, nothing was dropped
            if refused:
                raise TraceInputError("; ".join(p.message for p in refused))
            item = _Encoded(item, batch.dataset_type, batch.n_epoch, size, batch.logged_at)
        else:
            item = _handed_over(batch)
        self._ensure_worker()
        if self.block_when_full:
            self._put(("batch", item, size))
            return
        try:
            self._queue.put_nowait(("batch", item, size))
        except queue.Full:
            self.skip("queue_full", size, "the tracing worker is behind (the hand-over queue is full), so this "
                      "batch was dropped instead of blocking the caller; sample fewer requests or raise "
                      "max_pending_batches")

    def request_flush(self) -> None:
        """Ask the worker to make everything recorded so far durable, without waiting for it (serving code
        calls this periodically; ``wait_for_save()`` is the blocking form). A full queue skips the request."""
        if self._worker is None or not self._worker.is_alive():
            return
        try:
            self._queue.put_nowait(("flush", None, threading.Event()))
        except queue.Full:
            pass

    def end_epoch(self, n_epoch: int) -> None:
        """Declare epoch ``n_epoch`` (and every earlier one) finished for every dataset type."""
        self._ensure_worker()
        self._put(("end_epoch", _validate_epoch(n_epoch), None))

    def wait_for_save(self, n_epoch: int | None = None, timeout_s: float | None = None) -> TraceStats:
        """Block until everything recorded (for ``n_epoch``, or all epochs) is written and committed.

        Raises EpochNotRecordedError for an epoch no ``record()`` call used and TraceWriteError if
        any write for the requested epochs failed. Returns the tracer's counters.
        """
        epoch = None if n_epoch is None else _validate_epoch(n_epoch)
        if epoch is not None and not any(e == epoch for _, e in self._recorded):
            recorded = sorted({e for _, e in self._recorded})
            raise EpochNotRecordedError(
                f"n_epoch={epoch} was never recorded; recorded epochs: {recorded or 'none'}. "
                "Pass the same n_epoch to wait_for_save() as to the tracer calls."
            )
        if self._worker is not None:
            done = threading.Event()
            self._put(("flush", epoch, done))
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not done.wait(0.1):
                if not self._worker.is_alive():
                    raise TraceWriteError("the tracing worker stopped unexpectedly; see the log above")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"traces not saved within {timeout_s} s")
        pending = self.sink.pending() if hasattr(self.sink, "pending") else None
        with self._lock:
            failures = [(k, e) for k, e in self._write_failures if epoch is None or k[1] == epoch]
            self._write_failures = [(k, e) for k, e in self._write_failures if (k, e) not in failures]
            if pending is not None:
                self._stats.pending_uploads, self._stats.pending_bytes = pending.entries, pending.bytes
            stats = self._stats.copy()
        if pending is not None and pending.entries and "pending_uploads" not in self._warned:
            self._warned.add("pending_uploads")
            warnings.warn(f"mldbg-callbacks: {pending.entries} upload(s) ({pending.bytes} bytes) wait in the spool "
                          f"{pending.directory} because the server did not answer; they are sent with the next "
                          "upload, or run `mldbg sync` once the server is back (tracer.stats.pending_uploads)",
                          TraceWarning, stacklevel=2)
        if failures:
            raise TraceWriteError(self._failure_message(failures))
        return stats

    def _failure_message(self, failures: list[tuple[PartitionKey, BaseException]]) -> str:
        """What failed (the store's own errors first, not the drops they caused), the fix, and what was lost."""
        errors = [(k, e) for k, e in failures if not isinstance(e, _RowsDropped)]
        drops = [(k, e) for k, e in failures if isinstance(e, _RowsDropped)]
        causes = errors or [(k, e.cause) for k, e in drops]  # a drop remembers the error that caused it
        details = "; ".join(dict.fromkeys(f"{k[0]}{'' if k[1] is None else f' epoch {k[1]}'}: {e}"
                                          for k, e in causes[:5]))
        fix = getattr(self.sink, "failure_hint", None) or (
            f"Check that the store directory {getattr(self.sink, 'path', self.sink)} (MLD_HOME or store=) is "
            "writable and has free space")
        message = (f"{len(errors) or len(drops)} trace write(s) failed ({details}). {fix}; the rows still held in "
                   "memory are written by the next wait_for_save().")
        if drops:
            rows = sum(e.rows for _, e in drops)
            message += (f" {rows} row(s) were dropped for good: the store kept failing while the retry buffer "
                        "(4 parts per epoch) was full (tracer.stats.rows_skipped['write_failed']).")
        return message

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Save everything still buffered and stop the worker."""
        if self._worker is None or not self._worker.is_alive():
            return
        try:
            self.wait_for_save(timeout_s=timeout_s)
        finally:
            self._put(("stop", None, None))
            self._worker.join(timeout_s)
            self._worker = None

    # -- helpers (caller thread) -------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        self.rank  # noqa: B018 - resolve rank on the caller thread, where DDP is initialised
        self._worker = threading.Thread(target=self._run, name="mldbg-trace-writer", daemon=True)
        self._worker.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (core := ref()) is not None and core._close_at_exit())

    def _close_at_exit(self) -> None:
        try:
            self.close(timeout_s=30.0)
        except Exception as exc:  # noqa: BLE001 - exit path: report, never raise
            log.warning("mldbg-callbacks: traces not saved at exit: %s", exc)

    def _put(self, item: tuple) -> None:
        while True:  # blocks while the queue is full, but never forever on a dead worker
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if self._worker is None or not self._worker.is_alive():
                    raise TraceWriteError("the tracing worker is not running; traces cannot be saved")

    def skip(self, reason: str, rows: int, message: str) -> None:
        """Count ``rows`` skipped for ``reason`` (adapters use this for what they refuse themselves);
        the first time a reason occurs it is warned about, with ``message`` naming the fix."""
        with self._lock:
            self._stats.rows_skipped[reason] += rows
            first = reason not in self._warned
            self._warned.add(reason)
        if first:
            warnings.warn(f"mldbg-callbacks skipped {rows} row(s) ({reason}): {message}. Training goes on; "
                          "further rows skipped for this reason are counted in tracer.stats without a "
                          "warning. Pass strict=True to raise instead.", TraceWarning, stacklevel=3)

    # -- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        _lower_thread_priority()
        while True:
            kind, payload, extra = self._queue.get()
            if kind == "stop":
                return
            started = time.thread_time()
            try:
                if kind == "batch":
                    self._handle_batch(payload, extra)
                elif kind == "end_epoch":
                    self._close_partitions(lambda key: key[1] <= payload)
                    self._maybe_flush()
                elif kind == "flush":
                    self._flush(lambda key: payload is None or key[1] == payload)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                log.exception("mldbg-callbacks: tracing worker error")
                self.skip("internal_error", 0, f"{type(exc).__name__}: {exc}")
                if kind == "flush":  # rows may be left unwritten: the caller asked for durability, so it is told
                    self._record_write_failure(("tracing worker", payload), exc)
            with self._lock:  # before a flush is reported done, so wait_for_save's stats include it
                self._stats.worker_cpu_s += time.thread_time() - started
            if kind == "flush":
                extra.set()

    def _handle_batch(self, item: PendingBatch | "_Encoded", size: int) -> None:
        dataset_type, epoch = item.dataset_type, item.n_epoch
        key = (dataset_type, epoch)
        latest = self._latest_epoch.get(dataset_type)
        if latest is None or epoch > latest:
            self._latest_epoch[dataset_type] = epoch
            if latest is not None:  # a newer epoch started: the older ones of this dataset are done
                self._close_partitions(lambda k: k[0] == dataset_type and k[1] < epoch)
        with self._lock:
            self._stats.batches += 1
            self._stats.rows_received += size
        if isinstance(item, _Encoded):
            self._add_encoded(key, item.encoded, item.logged_at)
        elif self.encode_rows > 1 and hasattr(self.codec, "merge"):
            if self._drop_inputs(item, size):
                self._staged[key].append((item, size))
                self._staged_rows[key] += size
                if self._staged_rows[key] >= self.stage_rows:
                    self._encode_staged(key)
        else:
            self._encode_batches(key, [(item, size)])
        self._maybe_flush()

    @property
    def stage_rows(self) -> int:
        """A partition's staged batches are encoded together once they hold this many rows."""
        return min(self.encode_rows, self.rows_per_part)

    def _drop_inputs(self, batch: PendingBatch, size: int) -> bool:
        """Replace the inputs kept for content-hash ids by the ids, so that a staged batch does not hold its
        images until the partition is encoded; False (skipped and counted) when they cannot be hashed."""
        if batch.input_ids is not None or batch.inputs is None:
            return True
        try:
            batch.input_ids, batch.inputs = batch_ids(None, batch.inputs, size), None
        except Exception as exc:  # noqa: BLE001
            self._skip_invalid(size, exc)
            return False
        return True

    def _skip_invalid(self, rows: int, exc: Exception) -> None:
        self.skip("invalid_batch", rows, str(exc) if isinstance(exc, TraceInputError) else f"{type(exc).__name__}: {exc}")

    def _encode_staged(self, key: PartitionKey) -> None:
        batches = self._staged.pop(key, [])
        self._staged_rows.pop(key, None)
        start = 0
        while start < len(batches):  # runs of consecutive batches the codec can merge into one
            signature = self.codec.merge_key(batches[start][0])
            end = start + 1
            while end < len(batches) and self.codec.merge_key(batches[end][0]) == signature:
                end += 1
            self._encode_batches(key, batches[start:end])
            start = end

    def _encode_batches(self, key: PartitionKey, batches: list[tuple[PendingBatch, int]]) -> None:
        """Encode batches of one partition as one (``codec.merge``) and buffer the rows; when that fails,
        encode them one by one, so that only a bad batch is skipped."""
        if len(batches) > 1:
            try:
                merged = self.codec.merge([batch for batch, _ in batches])
                encoded = self.codec.encode(merged)
            except Exception:  # noqa: BLE001 - the batch-by-batch pass below reports what was wrong
                pass
            else:
                return self._add_encoded(key, encoded, merged.logged_at)
        for batch, size in batches:
            try:
                encoded = self.codec.encode(batch)
            except Exception as exc:  # noqa: BLE001
                self._skip_invalid(size, exc)
                continue
            self._add_encoded(key, encoded, batch.logged_at)

    def _add_encoded(self, key: PartitionKey, encoded: EncodedBatch, logged_at: float | None) -> None:
        for problem in encoded.problems:
            self.skip(problem.reason, problem.count, problem.message)
        table = encoded.table
        if logged_at is not None:
            stamp = pa.timestamp("us", tz="UTC")
            table = table.append_column(pa.field("logged_at", stamp), pa.array(
                np.full(table.num_rows, round(logged_at * 1e6), dtype=np.int64), type=stamp))
        table = self._drop_duplicates(key, table)
        if table.num_rows:
            self._buffers[key].append(table)
            self._buffer_rows[key] += table.num_rows
            if self._buffer_rows[key] >= self.rows_per_part and not self._write_buffer(key):
                self._bound_failed_buffer(key)

    def _drop_duplicates(self, key: PartitionKey, table: pa.Table) -> pa.Table:
        ids = table.column("input_id").to_pylist()
        seen = self._seen_ids[key]
        unique = set(ids)
        if len(unique) == len(ids) and seen.isdisjoint(unique):  # the usual case, decided in C
            seen |= unique
            return table
        keep = np.ones(len(ids), dtype=bool)
        for i, input_id in enumerate(ids):  # batch-sized loop over a hash set
            if input_id in seen:
                keep[i] = False
            else:
                seen.add(input_id)
        dropped = int((~keep).sum())
        if dropped:
            with self._lock:
                self._stats.duplicates_dropped += dropped
            if "duplicate_ids" not in self._warned:
                self._warned.add("duplicate_ids")
                warnings.warn(f"mldbg-callbacks: {dropped} input_id(s) of {key[0]} epoch {key[1]} were "
                              "already recorded in this epoch; the first occurrence is kept (counted in "
                              "tracer.stats.duplicates_dropped)", TraceWarning, stacklevel=2)
            table = table.filter(pa.array(keep))
        return table

    def _open_keys(self) -> set[PartitionKey]:
        return set(self._staged) | set(self._buffers) | set(self._spilled_parts)

    def _close_partitions(self, predicate) -> None:
        for key in self._open_keys():
            if predicate(key):
                self._closed.add(key)

    def _maybe_flush(self) -> None:
        closed_epochs = {epoch for _, epoch in self._closed}
        if len(closed_epochs) >= self.flush_every:
            self._flush(lambda key: key in self._closed)

    def _flush(self, predicate) -> None:
        keys = [k for k in self._open_keys() if predicate(k)]
        if hasattr(self.sink, "retry_pending"):  # a remote sink: deliver what it spooled while the server was away
            try:
                self.sink.retry_pending()
            except Exception as exc:  # noqa: BLE001 - reported by pending() in wait_for_save
                log.warning("mldbg-callbacks: spooled uploads not delivered yet: %s", exc)
        if not keys:
            return
        for key in keys:  # before the run's metadata, which the codec learns while encoding
            if self._staged.get(key):
                self._encode_staged(key)
        try:
            self.sink.write_meta(self.codec.run_meta())
        except Exception as exc:  # noqa: BLE001
            self._record_write_failure(keys[0], exc)
            return
        for key in sorted(keys):
            if self._buffers.get(key) and not self._write_buffer(key):
                continue
            parts = self._spilled_parts.get(key, [])
            try:
                self.sink.commit(key[0], key[1], self.rank, list(parts), self._written_rows[key],
                                 self._world_size)
            except Exception as exc:  # noqa: BLE001
                self._record_write_failure(key, exc)
                continue
            self._spilled_parts.pop(key, None)
            self._written_rows.pop(key, None)
            if key in self._closed:  # a newer epoch started: no more rows (and duplicates) expected here
                self._closed.discard(key)
                self._seen_ids.pop(key, None)
            with self._lock:  # a retry made the partition durable: earlier failures of it are moot
                self._write_failures = [(k, e) for k, e in self._write_failures
                                        if k != key or isinstance(e, _RowsDropped)]

    def _write_buffer(self, key: PartitionKey) -> bool:
        tables = self._buffers.get(key)
        while tables:
            # One part per run of batches with the same columns: a batch given features= next to one without
            # cannot share a Parquet file with it (readers combine the parts).
            same = 1
            while same < len(tables) and tables[same].schema.equals(tables[0].schema):
                same += 1
            table = pa.concat_tables(tables[:same])
            try:
                part = self.sink.write_part(key[0], key[1], self.rank, table)
            except Exception as exc:  # noqa: BLE001
                self._record_write_failure(key, exc)
                return False
            self._spilled_parts[key].append(part)
            self._written_rows[key] += table.num_rows
            self._buffer_rows[key] -= table.num_rows
            del tables[:same]
            with self._lock:
                self._stats.rows_written += table.num_rows
        self._buffers.pop(key, None)
        self._buffer_rows.pop(key, None)
        return True

    def _bound_failed_buffer(self, key: PartitionKey) -> None:
        # The store keeps failing: hold at most a few parts' worth of rows for a retry, drop the oldest.
        while self._buffer_rows[key] > 4 * self.rows_per_part and len(self._buffers[key]) > 1:
            dropped = self._buffers[key].pop(0)
            self._buffer_rows[key] -= dropped.num_rows
            self.skip("write_failed", dropped.num_rows, "the store kept failing and the retry buffer is full")
            with self._lock:  # lost for good: reported by wait_for_save() even after the store recovers
                cause = next((e for k, e in reversed(self._write_failures)
                              if k == key and not isinstance(e, _RowsDropped)), None)
                self._write_failures.append((key, _RowsDropped(dropped.num_rows, cause)))

    def _record_write_failure(self, key: PartitionKey, exc: BaseException) -> None:
        with self._lock:
            self._stats.write_errors += 1
            # one pending failure per partition (the latest): retries on every batch must not pile up
            self._write_failures = [(k, e) for k, e in self._write_failures
                                    if k != key or isinstance(e, _RowsDropped)]
            self._write_failures.append((key, exc))
            # its own key: the rows later dropped for it ("write_failed") get their own warning
            first = "write_error" not in self._warned
            self._warned.add("write_error")
        if first:
            warnings.warn(f"mldbg-callbacks could not write traces ({exc}); training goes on and "
                          "wait_for_save() will report it", TraceWarning, stacklevel=2)


class _RowsDropped(Exception):
    """A write failure whose rows were given up (not cleared by a later successful commit); ``cause`` is the
    store's error that made the buffer overflow."""

    def __init__(self, rows: int, cause: BaseException | None):
        super().__init__(f"{rows} row(s) dropped because the store kept failing ({cause})")
        self.rows = rows
        self.cause = cause


@dataclass
class _Encoded:
    """A batch already encoded on the calling thread (strict mode)."""

    encoded: EncodedBatch
    dataset_type: str
    n_epoch: int
    size: int
    logged_at: float | None = None


def _lower_thread_priority(niceness: int = 10) -> None:
    """Give the worker thread a lower CPU priority than training (Linux: per-thread nice value).

    On a machine whose cores training keeps busy, the worker then runs in the gaps (data loading,
    Python overhead, barrier waits) instead of preempting a training thread in the middle of a parallel
    region, which would stall its sibling threads. When the worker falls behind, the bounded queue
    blocks ``record()`` and the worker gets the CPU, so traces are never lost.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _handed_over(batch: PendingBatch) -> PendingBatch:
    return PendingBatch(hand_over(batch.outputs), hand_over(batch.targets), hand_over(batch.input_ids),
                        hand_over(batch.features), hand_over(batch.inputs), batch.dataset_type,
                        batch.n_epoch, batch.logged_at)


def _validate_epoch(n_epoch: Any) -> int:
    if n_epoch is None:
        return 0
    if isinstance(n_epoch, bool) or not isinstance(n_epoch, numbers.Integral) or int(n_epoch) < 0:
        raise TraceInputError(f"n_epoch must be a non-negative int or None, got {n_epoch!r}")
    return int(n_epoch)


def _validate_time(logged_at: Any) -> float:
    """Seconds since the Unix epoch from a number or a timezone-aware ``datetime``."""
    if hasattr(logged_at, "timestamp"):
        if getattr(logged_at, "tzinfo", None) is None:
            raise TraceInputError("logged_at is a naive datetime; pass a timezone-aware one (e.g. "
                                  "datetime.now(timezone.utc)) or seconds since the Unix epoch")
        return float(logged_at.timestamp())
    if isinstance(logged_at, bool) or not isinstance(logged_at, numbers.Real) or not np.isfinite(logged_at):
        raise TraceInputError(f"logged_at must be seconds since the Unix epoch or an aware datetime, got {logged_at!r}")
    return float(logged_at)


def _safe_len(value: Any) -> int:
    try:
        if isinstance(value, dict) and value:  # a dict of per-row columns (detection): rows, not keys
            value = next(iter(value.values()))
        return leading_dim(value) or 0
    except Exception:  # noqa: BLE001
        return 0
