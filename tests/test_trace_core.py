"""TraceCore and the classification codec: duplicates, epochs, write failures, flushing,
back-pressure, ranks, content ids, dtypes, output kinds, top-k storage, feature projection, pickling.

Stored rows are read back with plain pyarrow (parts listed in ``_COMMITTED``) and compared with
NumPy / SciPy references.
"""

from __future__ import annotations

import copy
import json
import pickle
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.special

from mldbg_callbacks.core.trace_core import TraceCore, TraceWarning
from mldbg_callbacks.errors import EpochNotRecordedError, TraceInputError, TraceWriteError
from mldbg_callbacks.store import LocalStore, RunWriter
from mldbg_callbacks.tasks.classification import ClassificationCodec
from mldbg_callbacks.training import ClassificationTracer
from mldbg_callbacks.core.vectors import decode_vectors, decoded_rows

from trace_helpers import ThrottledSink, barrier, failing_part_writes

MODEL, VERSION = "m", "v1"
C = 3  # classes of the default batches


# -- helpers ---------------------------------------------------------------------------------------
def identity(x):
    return x


def make_tracer(store, **kwargs) -> ClassificationTracer:
    kwargs.setdefault("feature_layer", False)
    return ClassificationTracer(identity, MODEL, VERSION, store=store, **kwargs)


def committed_rows(root, dataset_type="train", n_epoch=None) -> dict:
    """{(dataset_type, n_epoch, rank, input_id): row} of every part listed in a _COMMITTED marker."""
    rows = {}
    traces = Path(root) / MODEL / VERSION / "traces"
    for marker in traces.glob("dataset_type=*/n_epoch=*/rank=*/_COMMITTED"):
        rank_dir = marker.parent
        d = rank_dir.parent.parent.name.split("=", 1)[1]
        e = int(rank_dir.parent.name.split("=", 1)[1])
        r = int(rank_dir.name.split("=", 1)[1])
        if (dataset_type is not None and d != dataset_type) or (n_epoch is not None and e != n_epoch):
            continue
        for part in json.loads(marker.read_text())["parts"]:
            for row in decoded_rows(pq.read_table(rank_dir / part)):
                key = (d, e, r, row["input_id"])
                assert key not in rows, f"row stored twice: {key}"
                rows[key] = row
    return rows


def ids_of(rows: dict) -> set:
    return {key[3] for key in rows}


def committed_epochs(root, dataset_type="train") -> set:
    traces = Path(root) / MODEL / VERSION / "traces" / f"dataset_type={dataset_type}"
    return {int(m.parent.parent.name.split("=")[1]) for m in traces.glob("n_epoch=*/rank=*/_COMMITTED")}


def trace_warnings(caught, fragment: str) -> list:
    return [w for w in caught if issubclass(w.category, TraceWarning) and fragment in str(w.message)]


def good_batch(rng, ids, num_classes=C):
    logits = rng.standard_normal((len(ids), num_classes)).astype(np.float32)
    return logits, rng.integers(0, num_classes, len(ids)), np.asarray(ids)


# -- bad input (the full matrix of bad inputs per task: tests/reliability/test_bad_input_matrix.py) ------
def _mismatch_labels(rng, off):
    logits, labels, ids = good_batch(rng, range(off, off + 8))
    return dict(outputs=logits, labels=labels[:7], ids=ids)


def _record(tracer, batch, **kwargs):
    tracer.record(batch["outputs"], batch["labels"], input_ids=batch["ids"], features=batch.get("features"),
                  **kwargs)


def test_epoch_whose_batches_were_all_skipped_can_still_be_waited_for(tmp_path, rng):
    tracer = make_tracer(tmp_path)
    batch = _mismatch_labels(rng, 0)
    with pytest.warns(TraceWarning, match="invalid_batch"):
        _record(tracer, batch, n_epoch=3)
    stats = tracer.wait_for_save(n_epoch=3)  # the epoch was recorded; all its rows were refused
    assert stats.rows_skipped == {"invalid_batch": 8}


@pytest.mark.parametrize("strict", [False, True])
def test_one_hot_labels_are_accepted(tmp_path, rng, strict):
    import torch

    tracer = make_tracer(tmp_path, strict=strict)
    logits, labels, ids = good_batch(rng, range(8))
    one_hot = np.eye(C, dtype=np.float32)[labels]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        tracer.record(logits, one_hot, input_ids=ids)
        tracer.record(torch.from_numpy(logits), torch.nn.functional.one_hot(torch.from_numpy(labels), C),
                      input_ids=ids + 8)
        stats = tracer.wait_for_save()
    rows = committed_rows(tmp_path)
    assert {i: rows[("train", 0, 0, str(i))]["label"] for i in range(16)} == \
        {i: int(labels[i % 8]) for i in range(16)}
    assert stats.total_skipped == 0


@pytest.mark.parametrize("strict", [False, True])
def test_empty_batch_is_accepted_and_records_nothing(tmp_path, strict):
    import torch

    tracer = make_tracer(tmp_path, strict=strict)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracer.record(np.zeros((0, C), np.float32), np.zeros(0, np.int64), input_ids=np.zeros(0, np.int64))
        tracer.record(torch.zeros(0, C), torch.zeros(0, dtype=torch.long), input_ids=[])
        out = tracer(torch.zeros(0, C), torch.zeros(0, dtype=torch.long))  # content ids of no rows
        assert out.shape == (0, C)
        stats = tracer.wait_for_save(n_epoch=0)
    assert (stats.rows_received, stats.rows_written, stats.total_skipped) == (0, 0, 0)
    assert not list(Path(tmp_path).rglob("*.parquet"))
    assert LocalStore(tmp_path).partitions(MODEL, VERSION) == []


# -- duplicates ------------------------------------------------------------------------------------
def test_duplicate_ids_within_an_epoch_are_kept_once(tmp_path, rng):
    tracer = make_tracer(tmp_path)
    a_logits, a_labels, _ = good_batch(rng, range(4))
    b_logits, b_labels, _ = good_batch(rng, range(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer.record(a_logits, a_labels, input_ids=np.array([0, 1, 2, 2]))  # duplicate inside a batch
        tracer.record(b_logits, b_labels, input_ids=np.array([1, 5]))  # 1 again, in a later batch
        tracer.record(a_logits[:2], a_labels[:2], input_ids=np.array([0, 1]), n_epoch=1)  # new epoch: not dupes
        tracer.record(a_logits[:2], a_labels[:2], input_ids=np.array([0, 1]), dataset_type="val")
        stats = tracer.wait_for_save()
    assert stats.duplicates_dropped == 2
    assert stats.total_skipped == 0
    assert len(trace_warnings(caught, "already recorded")) == 1

    epoch0 = committed_rows(tmp_path, n_epoch=0)
    assert ids_of(epoch0) == {"0", "1", "2", "5"}
    # the first occurrence is the one kept
    np.testing.assert_array_equal(epoch0[("train", 0, 0, "2")]["logits"], a_logits[2])
    np.testing.assert_array_equal(epoch0[("train", 0, 0, "1")]["logits"], a_logits[1])
    assert ids_of(committed_rows(tmp_path, n_epoch=1)) == {"0", "1"}
    assert ids_of(committed_rows(tmp_path, dataset_type="val")) == {"0", "1"}
    assert stats.rows_written == 8


# -- epochs ----------------------------------------------------------------------------------------
def test_wait_for_an_epoch_never_recorded(tmp_path, rng):
    tracer = make_tracer(tmp_path)
    with pytest.raises(EpochNotRecordedError, match="recorded epochs: none"):
        tracer.wait_for_save(n_epoch=0)
    for epoch in (0, 2):
        tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=epoch)
    with pytest.raises(EpochNotRecordedError) as info:
        tracer.wait_for_save(n_epoch=7)
    message = str(info.value)
    assert "n_epoch=7" in message and "[0, 2]" in message and "same n_epoch" in message
    assert isinstance(info.value, KeyError)
    tracer.wait_for_save(n_epoch=2)
    assert committed_epochs(tmp_path) == {0, 2}  # epoch 0 was closed (and flushed) when epoch 2 began


def test_wait_for_one_epoch_commits_only_that_epoch(tmp_path, rng):
    tracer = make_tracer(tmp_path, flush_every=100)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=0)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=1)
    tracer.wait_for_save(n_epoch=1)
    assert committed_epochs(tmp_path) == {1}
    tracer.wait_for_save()
    assert committed_epochs(tmp_path) == {0, 1}


@pytest.mark.parametrize("bad_epoch", [-1, 1.5, "latest", True])
def test_invalid_epoch_is_refused(tmp_path, rng, bad_epoch):
    tracer = make_tracer(tmp_path, strict=True)
    with pytest.raises(TraceInputError, match="n_epoch must be a non-negative int"):
        tracer.record(*good_batch(rng, range(2))[:2], input_ids=[0, 1], n_epoch=bad_epoch)


def test_flush_every_two_commits_after_every_second_finished_epoch(tmp_path, rng):
    tracer = make_tracer(tmp_path, flush_every=2)
    history = []
    for epoch in range(5):
        for start in (0, 4):
            logits, labels, ids = good_batch(rng, range(start, start + 4))
            tracer.record(logits, labels, input_ids=ids, n_epoch=epoch)
        barrier(tracer.core)
        history.append(committed_epochs(tmp_path))
    # epoch e is finished when epoch e+1 starts; commits happen once two finished epochs are pending
    assert history == [set(), set(), {0, 1}, {0, 1}, {0, 1, 2, 3}]
    assert not list((Path(tmp_path) / MODEL / VERSION / "traces/dataset_type=train/n_epoch=4").glob("rank=*/*"))
    tracer.wait_for_save()
    assert committed_epochs(tmp_path) == {0, 1, 2, 3, 4}
    for epoch in range(5):
        assert ids_of(committed_rows(tmp_path, n_epoch=epoch)) == {str(i) for i in range(8)}


def test_end_epoch_closes_every_dataset_type(tmp_path, rng):
    tracer = make_tracer(tmp_path, flush_every=1)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=0)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=0, dataset_type="val")
    barrier(tracer.core)
    assert committed_epochs(tmp_path) == set()
    tracer.core.end_epoch(0)
    barrier(tracer.core)
    assert committed_epochs(tmp_path, "train") == {0} and committed_epochs(tmp_path, "val") == {0}


# -- write failures --------------------------------------------------------------------------------
def test_store_under_a_regular_file_fails_loudly_then_recovers(tmp_path, rng):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    store = blocker / "store"
    tracer = make_tracer(store)
    expected = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(3):  # auto-flush of finished epochs fails on the worker: record() must not raise
            for start in (0, 5):
                logits, labels, ids = good_batch(rng, range(start, start + 5))
                tracer.record(logits, labels, input_ids=ids, n_epoch=epoch)
                expected |= {(epoch, str(i)) for i in ids}
        with pytest.raises(TraceWriteError) as info:
            tracer.wait_for_save()
    assert str(store) in str(info.value)
    assert "writable" in str(info.value)
    assert isinstance(info.value, OSError)
    assert len(trace_warnings(caught, "could not write traces")) == 1
    assert tracer.stats.write_errors >= 1

    blocker.unlink()  # the fault goes away
    stats = tracer.wait_for_save()
    assert stats.rows_written == len(expected) == 30
    rows = committed_rows(store, dataset_type="train")
    assert {(k[1], k[3]) for k in rows} == expected  # nothing lost


def test_write_part_failure_names_the_store_and_keeps_the_rows(tmp_path, rng, monkeypatch):
    calls = []

    def failing_write_part(self, *args, **kwargs):
        calls.append(args[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunWriter, "write_part", failing_write_part)
    tracer = make_tracer(tmp_path)
    logits, labels, ids = good_batch(rng, range(6))
    with pytest.warns(TraceWarning, match="could not write traces"):
        tracer.record(logits, labels, input_ids=ids, n_epoch=0)
        with pytest.raises(TraceWriteError) as info:
            tracer.wait_for_save(n_epoch=0)
    assert calls and str(tmp_path) in str(info.value) and "No space left" in str(info.value)
    assert committed_rows(tmp_path) == {}

    monkeypatch.undo()
    stats = tracer.wait_for_save(n_epoch=0)
    assert stats.rows_written == 6
    rows = committed_rows(tmp_path)
    assert ids_of(rows) == {str(i) for i in ids}
    for i in range(6):
        np.testing.assert_array_equal(rows[("train", 0, 0, str(ids[i]))]["logits"], logits[i])


def test_transient_failure_during_training_does_not_fail_a_later_successful_save(tmp_path, rng, monkeypatch):
    """A write that failed during training but succeeded on retry is durable: wait_for_save must not raise."""
    state = failing_part_writes(monkeypatch)
    tracer = make_tracer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        for epoch in range(3):
            tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=epoch)
        barrier(tracer.core)
        assert tracer.stats.write_errors >= 1  # the auto-flush of epochs 0 and 1 failed
        state["fail"] = False
        stats = tracer.wait_for_save()
    assert stats.rows_written == 12
    assert committed_epochs(tmp_path) == {0, 1, 2}


def test_rows_dropped_while_the_store_kept_failing_are_reported(tmp_path, rng, monkeypatch):
    state = failing_part_writes(monkeypatch)
    store = LocalStore(tmp_path)
    core = TraceCore(ClassificationCodec(), store.run(MODEL, VERSION), rows_per_part=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        for start in range(0, 40, 4):  # spills fail; the retry buffer holds at most 4 parts' worth
            core.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(start, start + 4))
        barrier(core)
        state["fail"] = False
        with pytest.raises(TraceWriteError):  # rows were lost: a save cannot claim success
            core.wait_for_save()
    stats = core.stats
    assert stats.rows_skipped["write_failed"] > 0
    assert stats.rows_written + stats.rows_skipped["write_failed"] == 40
    assert len(committed_rows(tmp_path)) == stats.rows_written


def test_an_internal_error_while_saving_is_reported_by_wait_for_save(tmp_path, rng, monkeypatch):
    """Not only counted: rows that may be unwritten make the save fail, and a retry without the fault saves them."""
    tracer = make_tracer(tmp_path)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4))
    barrier(tracer.core)

    def broken_concat(*args, **kwargs):
        raise pa.ArrowInvalid("injected")

    monkeypatch.setattr(pa, "concat_tables", broken_concat)  # a library failure on the worker, not our code
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TraceWriteError, match="injected"):
        warnings.simplefilter("always")
        tracer.wait_for_save()
    monkeypatch.undo()
    assert len(trace_warnings(caught, "(internal_error)")) == 1 and trace_warnings(caught, "could not write traces")
    assert tracer.wait_for_save().rows_written == 4
    assert ids_of(committed_rows(tmp_path)) == {str(i) for i in range(4)}


# -- back-pressure ---------------------------------------------------------------------------------
def test_record_blocks_when_the_queue_is_full(tmp_path, rng):
    core = TraceCore(ClassificationCodec(), ThrottledSink(LocalStore(tmp_path), MODEL, VERSION),
                     max_pending_batches=2, rows_per_part=1)
    sizes, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            sizes.append(core._queue.qsize())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    n_batches = 14
    started = time.monotonic()
    try:
        for b in range(n_batches):
            core.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4 * b, 4 * b + 4))
            sizes.append(core._queue.qsize())
        recording_s = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
    assert max(sizes) <= 2
    # the worker needs >= delay per batch; with 2 slots + 1 in hand, the rest had to wait for it
    assert recording_s >= (n_batches - 3) * ThrottledSink.delay * 0.8
    stats = core.wait_for_save()
    assert stats.rows_written == 4 * n_batches



def _spin(seconds: float) -> None:
    """Burn ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_worker_cpu_time_counts_the_worker_thread_only(tmp_path, rng):
    class BusySink(RunWriter):  # part writes cost the worker 40 ms of CPU each
        def write_part(self, *args, **kwargs):
            _spin(0.04)
            return super().write_part(*args, **kwargs)

    core = TraceCore(ClassificationCodec(), BusySink(LocalStore(tmp_path), MODEL, VERSION), rows_per_part=4)
    for b in range(5):
        core.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4 * b, 4 * b + 4))
    _spin(0.5)  # the training thread's own work is not the tracer's
    stats = core.wait_for_save()
    assert stats.rows_written == 20
    assert 5 * 0.04 <= stats.worker_cpu_s < 0.5, stats.worker_cpu_s
    assert stats.copy().worker_cpu_s == stats.worker_cpu_s

# -- ranks -----------------------------------------------------------------------------------------
def test_rank_and_world_size_from_the_environment(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    tracer = make_tracer(tmp_path)
    logits, labels, ids = good_batch(rng, range(5))
    tracer.record(logits, labels, input_ids=ids)
    tracer.wait_for_save()
    traces = Path(tmp_path) / MODEL / VERSION / "traces/dataset_type=train/n_epoch=0"
    assert [p.name for p in traces.iterdir()] == ["rank=1"]
    marker = json.loads((traces / "rank=1/_COMMITTED").read_text())
    assert marker["world_size"] == 2 and marker["rows"] == 5
    assert {k[2] for k in committed_rows(tmp_path)} == {1}
    (partition,) = LocalStore(tmp_path).partitions(MODEL, VERSION)
    assert partition.ranks_committed == (1,) and not partition.complete


# -- ids derived from content ----------------------------------------------------------------------
def test_content_hash_ids_are_stable_across_epochs(tmp_path, rng):
    tracer = make_tracer(tmp_path)
    inputs = rng.standard_normal((6, C)).astype(np.float32)
    labels = rng.integers(0, C, 6)
    tracer(inputs, labels, n_epoch=0)
    perm = rng.permutation(6)
    tracer(inputs[perm], labels[perm], n_epoch=1)  # shuffled: same samples, other order
    other = inputs + 1.0
    tracer(other, labels, n_epoch=2)
    tracer(inputs.astype(np.float64), labels, n_epoch=3)  # same values, another dtype
    tracer.wait_for_save()

    def id_by_logits(epoch):
        return {tuple(np.array(r["logits"], np.float32)): k[3] for k, r in committed_rows(tmp_path, n_epoch=epoch).items()}

    e0, e1 = id_by_logits(0), id_by_logits(1)
    assert len(e0) == 6 and len(set(e0.values())) == 6
    assert e0 == e1
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in e0.values())
    assert not set(id_by_logits(2).values()) & set(e0.values())
    assert not set(id_by_logits(3).values()) & set(e0.values())


def test_identical_inputs_share_an_id(tmp_path, rng):
    tracer = make_tracer(tmp_path)
    inputs = rng.standard_normal((4, C)).astype(np.float32)
    inputs[3] = inputs[0]
    with pytest.warns(TraceWarning, match="already recorded"):
        tracer(inputs, np.array([0, 1, 2, 0]))
        stats = tracer.wait_for_save()
    assert stats.duplicates_dropped == 1 and stats.rows_written == 3


def test_missing_ids_and_inputs(tmp_path, rng):
    tracer = make_tracer(tmp_path, strict=True)
    with pytest.raises(TraceInputError, match="pass input_ids="):
        tracer.record(*good_batch(rng, range(2))[:2])


# -- dtypes and output kinds -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_torch_outputs(tmp_path, rng, dtype):
    import torch

    torch_dtype = getattr(torch, dtype)
    logits = torch.from_numpy(rng.standard_normal((8, 5)).astype(np.float32) * 4).to(torch_dtype)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((8, 5)).astype(np.float32) * 3), 1).to(torch_dtype)
    features = torch.from_numpy(rng.standard_normal((8, 6)).astype(np.float32)).to(torch_dtype)
    labels = torch.from_numpy(rng.integers(0, 5, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        for version, outputs in (("logits", logits), ("probs", probs)):
            tracer = ClassificationTracer(identity, MODEL, version, store=tmp_path, feature_layer=False, strict=True)
            tracer.record(outputs, labels, input_ids=np.arange(8), features=features)
            tracer.wait_for_save()
            (part,) = (Path(tmp_path) / MODEL / version).rglob("*.parquet")
            table = pq.read_table(part)
            assert version in table.column_names, f"{dtype} {version} stored as {table.column_names}"
            stored = decode_vectors(table, version)
            np.testing.assert_array_equal(stored, outputs.float().numpy())
            np.testing.assert_array_equal(decode_vectors(table, "features"),
                                          features.float().numpy().astype(np.float16))


def test_binary_outputs(tmp_path, rng):
    z = rng.standard_normal(6).astype(np.float32) * 3
    p = scipy.special.expit(z).astype(np.float32)
    labels = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], np.float32)  # BCE-style float targets
    cases = {"logits_b": (z, "logits", np.stack([np.zeros_like(z), z], 1)),
             "logits_b1": (z[:, None], "logits", np.stack([np.zeros_like(z), z], 1)),
             "probs_b": (p, "probs", np.stack([1 - p, p], 1)),
             "probs_b1": (p[:, None], "probs", np.stack([1 - p, p], 1))}
    for version, (outputs, kind, expected) in cases.items():
        tracer = ClassificationTracer(identity, MODEL, version, store=tmp_path, feature_layer=False, strict=True)
        tracer.record(outputs, labels[:, None] if version.endswith("b1") else labels, input_ids=np.arange(6))
        tracer.wait_for_save()
        (part,) = (Path(tmp_path) / MODEL / version).rglob("*.parquet")
        table = pq.read_table(part).sort_by("input_id")
        assert kind in table.column_names, version
        np.testing.assert_allclose(decode_vectors(table, kind), expected, atol=1e-6)
        np.testing.assert_array_equal(table.column("label").to_numpy(), labels.astype(np.int64))
        if kind == "logits":  # the stored pair encodes the same probability as the sigmoid
            stored = decode_vectors(table, kind)
            np.testing.assert_allclose(scipy.special.softmax(stored, axis=1)[:, 1], p, rtol=1e-5)
        meta = json.loads((Path(tmp_path) / MODEL / version / "_meta.json").read_text())
        assert meta["num_classes"] == 2 and meta["output_kind"] == kind


@pytest.mark.parametrize("kind, make, output_kind", [
    ("probs", lambda z: scipy.special.softmax(z, axis=1), "auto"),
    ("logits", lambda z: z, "auto"),
    ("logits", lambda z: np.full_like(z, 0.1), "auto"),  # inside [0, 1] but rows do not sum to 1
    ("logits", lambda z: scipy.special.softmax(z, axis=1), "logits"),  # explicit wins
    ("probs", lambda z: scipy.special.softmax(z, axis=1), "probs"),
])
def test_output_kind_detection(tmp_path, rng, kind, make, output_kind):
    z = rng.standard_normal((10, 4)).astype(np.float32) * 2
    outputs = make(z).astype(np.float32)
    tracer = make_tracer(tmp_path, output_kind=output_kind)
    tracer.record(outputs, rng.integers(0, 4, 10), input_ids=np.arange(10))
    tracer.wait_for_save()
    (part,) = Path(tmp_path).rglob("*.parquet")
    table = pq.read_table(part).sort_by("input_id")
    assert set(table.column_names) == {"input_id", "label", kind}
    np.testing.assert_array_equal(decode_vectors(table, kind), outputs)


def test_output_kind_is_fixed_by_the_first_batch(tmp_path, rng):
    tracer = make_tracer(tmp_path)
    z = rng.standard_normal((4, 3)).astype(np.float32)
    tracer.record(scipy.special.softmax(z, axis=1).astype(np.float32), np.arange(4) % 3, input_ids=np.arange(4))
    tracer.record(z * 5, np.arange(4) % 3, input_ids=np.arange(4, 8))  # a later batch cannot switch kinds
    tracer.wait_for_save()
    for part in Path(tmp_path).rglob("*.parquet"):
        assert "probs" in pq.read_table(part).column_names


# -- bounded storage -------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [5, 32])  # 32 > the number of classes: every class is kept
def test_top_k_storage_above_max_stored_classes(tmp_path, rng, top_k):
    num_classes, n = 20, 12
    z = (rng.standard_normal((n, num_classes)) * 3).astype(np.float32)
    labels = rng.integers(0, num_classes, n)
    tracer = make_tracer(tmp_path, max_stored_classes=8, top_k=top_k, strict=True)
    tracer.record(z, labels, input_ids=np.arange(n))
    tracer.wait_for_save()
    (part,) = Path(tmp_path).rglob("*.parquet")
    table = pq.read_table(part).sort_by("input_id")
    order = np.argsort([str(i) for i in range(n)])
    z, labels = z[order], labels[order]
    assert set(table.column_names) == {"input_id", "label", "topk_index", "topk_prob", "label_prob", "logit_margin"}

    reference = scipy.special.softmax(z.astype(np.float64), axis=1)
    k = min(top_k, num_classes)
    index = decode_vectors(table, "topk_index")
    prob = decode_vectors(table, "topk_prob")
    assert index.shape == prob.shape == (n, k)
    for i in range(n):
        assert set(index[i]) == set(np.argsort(-reference[i])[:k])
        np.testing.assert_allclose(prob[i], reference[i, index[i]], rtol=1e-5)
    np.testing.assert_allclose(table.column("label_prob").to_numpy(), reference[np.arange(n), labels], rtol=1e-5)
    others = np.where(np.eye(num_classes, dtype=bool)[labels], -np.inf, z)
    np.testing.assert_allclose(table.column("logit_margin").to_numpy(), z[np.arange(n), labels] - others.max(1),
                               rtol=1e-6)
    meta = json.loads((Path(tmp_path) / MODEL / VERSION / "_meta.json").read_text())
    assert meta["score_storage"] == "topk" and meta["top_k"] == k and meta["num_classes"] == num_classes


def test_top_k_storage_of_probabilities(tmp_path, rng):
    num_classes, n = 16, 6
    probs = scipy.special.softmax(rng.standard_normal((n, num_classes)) * 2, axis=1).astype(np.float32)
    labels = rng.integers(0, num_classes, n)
    tracer = make_tracer(tmp_path, max_stored_classes=10, top_k=3)
    tracer.record(probs, labels, input_ids=np.arange(n))
    tracer.wait_for_save()
    (part,) = Path(tmp_path).rglob("*.parquet")
    table = pq.read_table(part).sort_by("input_id")
    assert set(table.column_names) == {"input_id", "label", "topk_index", "topk_prob", "label_prob"}
    np.testing.assert_array_equal(table.column("label_prob").to_numpy(), probs[np.arange(n), labels])
    index = decode_vectors(table, "topk_index")
    for i in range(n):
        assert set(index[i]) == set(np.argsort(-probs[i])[:3])


def test_wide_features_are_projected(tmp_path, rng):
    width, target, n = 300, 32, 40
    base = rng.standard_normal((n, width)).astype(np.float32)
    features = np.concatenate([base, base[:5] + base[5:10], 3 * base[:5]])  # linear relations to check
    z = rng.standard_normal((len(features), C)).astype(np.float32)
    tracer = make_tracer(tmp_path, max_feature_dim=target)
    tracer.record(z, np.arange(len(features)) % C, input_ids=np.arange(len(features)), features=features)
    tracer.wait_for_save()
    rows = committed_rows(tmp_path)
    stored = np.stack([np.array(rows[("train", 0, 0, str(i))]["features"], np.float32) for i in range(len(features))])
    assert stored.shape == (len(features), target)
    (part,) = Path(tmp_path).rglob("*.parquet")
    assert int(pq.read_table(part).schema.field("features").metadata[b"mldbg.width"]) == target
    # a linear map: sums and scalings are preserved (up to float16 rounding)
    np.testing.assert_allclose(stored[n:n + 5], stored[:5] + stored[5:10], atol=0.05 * np.abs(stored).max())
    np.testing.assert_allclose(stored[n + 5:], 3 * stored[:5], atol=0.05 * np.abs(stored).max())
    # a Johnson-Lindenstrauss projection roughly preserves norms
    ratio = np.linalg.norm(stored[:n], axis=1) / np.linalg.norm(base, axis=1)
    assert 0.6 < ratio.mean() < 1.4
    meta = json.loads((Path(tmp_path) / MODEL / VERSION / "_meta.json").read_text())
    assert meta["feature_dim"] == width and meta["stored_feature_dim"] == target


def test_narrow_features_are_stored_as_float16(tmp_path, rng):
    features = rng.standard_normal((5, 8)).astype(np.float32) * 10
    features[0, 0] = 1e6  # beyond float16: clipped, not inf
    tracer = make_tracer(tmp_path, max_feature_dim=8)
    tracer.record(rng.standard_normal((5, C)).astype(np.float32), np.arange(5) % C, input_ids=np.arange(5),
                  features=features)
    tracer.wait_for_save()
    rows = committed_rows(tmp_path)
    stored = np.stack([np.array(rows[("train", 0, 0, str(i))]["features"], np.float16) for i in range(5)])
    expected = np.clip(features, -65504, 65504).astype(np.float16)
    assert expected[0, 0] == np.finfo(np.float16).max
    np.testing.assert_array_equal(stored, expected)


def test_batches_with_and_without_features_in_one_epoch_are_all_stored(tmp_path, rng):
    """Their columns differ, so they cannot share a part; once every row of such an epoch was silently
    left unwritten (an internal error on the worker, and wait_for_save() returned)."""
    tracer = make_tracer(tmp_path)
    features = rng.standard_normal((4, 6)).astype(np.float32)
    batches = [good_batch(rng, range(start, start + 4)) for start in (0, 4, 8)]
    for (logits, labels, ids), with_features in zip(batches, (False, True, False)):
        tracer.record(logits, labels, input_ids=ids, features=features if with_features else None)
    stats = tracer.wait_for_save()
    assert stats.rows_written == 12 and stats.rows_skipped == {}
    rows = committed_rows(tmp_path)
    assert ids_of(rows) == {str(i) for i in range(12)}
    np.testing.assert_array_equal(np.stack([rows[("train", 0, 0, str(i))]["features"] for i in range(4, 8)]),
                                  features.astype(np.float16))
    assert all("features" not in rows[("train", 0, 0, str(i))] for i in (0, 1, 2, 3, 8, 9, 10, 11))


# -- pickling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copied_core_starts_empty_and_works(tmp_path, rng, how):
    tracer = make_tracer(tmp_path, flush_every=100)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=0)
    tracer.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4), n_epoch=1)
    barrier(tracer.core)
    tracer.core.wait_for_save(n_epoch=0)  # the original has written a part already

    clone = pickle.loads(pickle.dumps(tracer.core)) if how == "pickle" else copy.deepcopy(tracer.core)
    assert clone._worker is None and clone._recorded == set() and clone._queue.qsize() == 0
    assert clone.stats.rows_received == 0 and clone.stats.rows_written == 0
    assert clone.flush_every == 100 and clone.codec.num_classes == C
    with pytest.raises(EpochNotRecordedError):
        clone.wait_for_save(n_epoch=1)
    assert clone.wait_for_save().rows_written == 0  # nothing of the original is flushed by the copy

    clone.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(10, 14), n_epoch=1)
    assert clone.wait_for_save().rows_written == 4
    assert tracer.wait_for_save().rows_written == 8
    assert ids_of(committed_rows(tmp_path, n_epoch=0)) == {"0", "1", "2", "3"}
    assert ids_of(committed_rows(tmp_path, n_epoch=1)) == {"0", "1", "2", "3", "10", "11", "12", "13"}
    clone.close()
    tracer.close()


# -- staged encoding (small batches encoded together) ----------------------------------------------
def test_small_batches_encoded_together_store_what_one_by_one_stores(tmp_path, rng):
    import torch

    batches = []
    for start in range(0, 64, 4):  # torch and NumPy, int and string ids, labelled, with features
        logits = rng.standard_normal((4, C)).astype(np.float32)
        feats = rng.standard_normal((4, 8)).astype(np.float32)
        labels = rng.integers(0, C, 4)
        ids = np.arange(start, start + 4) if start % 8 else [f"s{i}" for i in range(start, start + 4)]
        batches.append((torch.from_numpy(logits) if start % 16 else logits, labels, ids, feats))
    stored = {}
    for encode_rows in (1, 2048):
        root = tmp_path / f"encode_rows={encode_rows}"
        codec = ClassificationCodec()
        calls = []
        codec.encode = lambda batch, encode=codec.encode: calls.append(len(batch.outputs)) or encode(batch)
        core = TraceCore(codec, LocalStore(root).run(MODEL, VERSION), encode_rows=encode_rows)
        for logits, labels, ids, feats in batches:
            core.record(logits, labels, input_ids=ids, features=feats)
        core.wait_for_save()
        assert calls == ([4] * 16 if encode_rows == 1 else [64])
        stored[encode_rows] = committed_rows(root)
        parts = list(root.rglob("*.parquet"))
        assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 64
    one_by_one, merged = stored[1], stored[2048]
    assert one_by_one.keys() == merged.keys() and len(merged) == 64
    for key, row in one_by_one.items():
        for column, value in row.items():
            np.testing.assert_array_equal(np.asarray(merged[key][column]), np.asarray(value), err_msg=column)


def test_a_bad_batch_among_staged_ones_is_the_only_one_skipped(tmp_path, rng):
    core = TraceCore(ClassificationCodec(), LocalStore(tmp_path).run(MODEL, VERSION))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        core.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(4))
        # same shapes (so it is staged with the others), but string labels: refused when encoded
        core.record(rng.standard_normal((4, C)).astype(np.float32), np.array(list("abcd")), input_ids=np.arange(4, 8))
        core.record(*good_batch(rng, range(4))[:2], input_ids=np.arange(8, 12))
        stats = core.wait_for_save()
    assert ids_of(committed_rows(tmp_path)) == {str(i) for i in (*range(4), *range(8, 12))}
    assert stats.rows_skipped == {"invalid_batch": 4} and stats.rows_received == 12
    assert trace_warnings(caught, "labels must be integer class indices")
