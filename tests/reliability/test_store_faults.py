"""The store fails under a running training loop: a full disk, a read-only file system, a writer slower
than training.

The faults are real: the store lives on a small tmpfs mounted for the test (as root; the read-only
case falls back to permission bits otherwise), filled up with a file or remounted read-only, so the
operating system itself refuses the writes. Nothing of the package is patched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import accuracy_score
from trace_helpers import ThrottledSink
from training_child import MODEL, N_SAMPLES, VERSION, digits, trace_digits

from mldbg_callbacks.core.trace_core import TraceCore, TraceWarning
from mldbg_callbacks.core.vectors import decode_vectors
from mldbg_callbacks.errors import ResultWriteError, TraceWriteError
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.store import LocalStore
from mldbg_callbacks.tasks.classification import ClassificationCodec
from mldbg_callbacks.training import ClassificationTracer

BATCH = 50  # trace_digits' batch size


@contextlib.contextmanager
def small_tmpfs(path: Path, size_kb: int):
    """A tmpfs of ``size_kb`` mounted at ``path`` for the test (root only; skipped, saying why, otherwise)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode:
        pytest.skip("a full disk needs a small tmpfs, which only root can mount here "
                    f"({mounted.stderr.strip() if mounted else 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill_up(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC; return it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@contextlib.contextmanager
def read_only(directory: Path):
    """Make ``directory`` unwritable for this process: remount its tmpfs read-only (root), else drop the
    write permission bits (which root would ignore)."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(directory)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")] if p.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)


def stored_ids(store: LocalStore, epoch: int) -> list[str]:
    return sorted(store.read_traces(MODEL, VERSION, "train", [epoch]).column("input_id").to_pylist())


def hidden_leftovers(root: Path) -> list[Path]:
    return list(root.rglob(".tmp-*"))


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_store_fails_mid_training_training_goes_on_the_loss_is_reported_and_the_saved_epochs_evaluate(tmp_path, fault):
    root = tmp_path / "fs"
    if fault == "read_only" and os.geteuid() != 0:
        root.mkdir()  # permission bits are enough for a user without root
        filesystem = contextlib.nullcontext(root)
    else:
        filesystem = small_tmpfs(root, 4096)
    with filesystem:
        store = LocalStore(root / "store")
        tracer = ClassificationTracer(lambda x: x, MODEL, VERSION, store=store, feature_layer=False)
        tracer.core.rows_per_part = 2 * BATCH  # the retry buffer holds 4 parts' worth: later rows are dropped
        trace_digits(tracer, range(2))
        assert tracer.wait_for_save().rows_written == 2 * N_SAMPLES

        fault_context = read_only(root) if fault == "read_only" else contextlib.nullcontext()
        with fault_context, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filler = fill_up(root) if fault == "disk_full" else None
            trace_digits(tracer, range(2, 4))  # never raises: training goes on
            with pytest.raises(TraceWriteError) as failure:
                tracer.wait_for_save()
            stats = tracer.stats
            # what was saved before the fault is intact and readable meanwhile; an evaluation runs but cannot
            # save its result there, and says so
            assert [p.n_epoch for p in store.partitions(MODEL, VERSION) if p.complete] == [0, 1]
            assert stored_ids(store, 1) == sorted(digits()[2])
            with pytest.raises(ResultWriteError, match="could not be saved .* make the store writable or free space"):
                Evaluator(MODEL, VERSION, store=store).request_evaluation(result_name="during-fault", n_epoch=1)
        message = str(failure.value)
        assert ("No space left on device" if fault == "disk_full" else "Read-only file system"
                if os.geteuid() == 0 else "Permission denied") in message
        assert "writable and has free space" in message and str(store.root / MODEL / VERSION) in message
        assert len([w for w in caught if "could not write traces" in str(w.message)]) == 1
        assert any("(write_failed)" in str(w.message) for w in caught)
        assert stats.write_errors >= 1
        dropped = stats.rows_skipped["write_failed"]
        assert 0 < dropped < 2 * N_SAMPLES  # bounded retry buffer: 4 parts per epoch kept, the rest counted
        assert hidden_leftovers(root) == []  # a failed write removes its temporary file

        if filler is not None:
            filler.unlink()  # the operator frees space (the read-only case was remounted rw above)
        final = tracer.wait_for_save()  # the kept rows are written now; the dropped ones were reported above
        assert final.rows_written + final.rows_skipped["write_failed"] == 4 * N_SAMPLES
        kept = {epoch: stored_ids(store, epoch) for epoch in (2, 3)}
        assert sum(map(len, kept.values())) == final.rows_written - 2 * N_SAMPLES
        for ids in kept.values():
            assert len(ids) == len(set(ids)) and set(ids) <= set(digits()[2])  # nothing stored twice or invented

        result = Evaluator(MODEL, VERSION, store=store).request_evaluation(result_name="after-fault", n_epoch=1)
        table = store.read_traces(MODEL, VERSION, "train", [1])
        reference = accuracy_score(table.column("label").to_numpy(), decode_vectors(table, "logits").argmax(axis=1))
        assert result.metrics_summary().iloc[0]["accuracy"] == pytest.approx(reference)
        tracer.close()


def id_set_bytes(n: int) -> int:
    """What a set of n string ids costs in Python memory: the tracer keeps one per open epoch (duplicates)."""
    tracemalloc.start()
    ids = {str(i) for i in range(n)}
    size, _ = tracemalloc.get_traced_memory()  # measured while ``ids`` is alive
    tracemalloc.stop()
    assert len(ids) == n
    return size


def test_writer_slower_than_training_bounds_memory_and_loses_nothing(tmp_path, rng):
    """A store 30 ms per part behind training: record() blocks (back-pressure), memory stays within the
    queue's worth of batches (plus the epoch's id set), every row arrives."""
    max_pending, batch, classes, n_batches = 4, 256, 100, 60
    core = TraceCore(ClassificationCodec(), ThrottledSink(LocalStore(tmp_path), MODEL, VERSION),
                     max_pending_batches=max_pending, rows_per_part=batch)
    batch_bytes = batch * classes * 4
    peak_arrow, stop = [0], threading.Event()

    def watch_arrow():  # Arrow allocates outside Python's allocator (tracemalloc does not see it): sample its pool
        while not stop.is_set():
            peak_arrow[0] = max(peak_arrow[0], pa.total_allocated_bytes())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch_arrow)
    arrow_before = pa.total_allocated_bytes()
    watcher.start()
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc
    blocked_s, started = 0.0, time.monotonic()
    try:
        for b in range(n_batches):  # a fresh output array per batch, dropped after record(), as in training
            logits = rng.standard_normal((batch, classes)).astype(np.float32)
            before = time.monotonic()
            core.record(logits, rng.integers(0, classes, batch), input_ids=np.arange(b * batch, (b + 1) * batch))
            blocked_s += time.monotonic() - before
            del logits
        recording_s = time.monotonic() - started
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        stop.set()
        watcher.join()
    stats = core.wait_for_save()
    core.close()

    ids_bytes = id_set_bytes(n_batches * batch)
    queue_bytes = (max_pending + 3) * batch_bytes  # queued copies + one being encoded + one handed over + temporaries
    arrow_peak = peak_arrow[0] - arrow_before
    print(f"\nback-pressure: {n_batches} batches of {batch_bytes >> 10} KiB ({n_batches * batch_bytes >> 20} MiB) "
          f"in {recording_s:.2f} s, record() blocked {blocked_s:.2f} s; peak Python/NumPy memory "
          f"{python_peak >> 10} KiB (of which the epoch's id set {ids_bytes >> 10} KiB), Arrow peak {arrow_peak >> 10} KiB")
    assert blocked_s >= 0.5 * (n_batches - max_pending - 2) * ThrottledSink.delay  # training waited for the store
    assert python_peak < queue_bytes + 1.5 * ids_bytes  # not the 6 MiB that were recorded
    assert arrow_peak < 4 * batch_bytes  # encoded rows: the partition's buffer (one part) and the part being written
    assert stats.rows_written == n_batches * batch and stats.total_skipped == 0
    ids = LocalStore(tmp_path).read_traces(MODEL, VERSION, "train", [0]).column("input_id").to_pylist()
    assert sorted(map(int, ids)) == list(range(n_batches * batch))
