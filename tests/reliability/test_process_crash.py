"""Crash tests with real processes: a training process (``training_child.py``) killed with SIGKILL in the
middle of an epoch, then restarted with resume; two ranks of one run, one of which is killed.

What a reader sees is checked three ways: the package's reader (``_COMMITTED`` markers), a plain
``pyarrow.dataset`` over the trace directory (which skips the ``_pending-`` and ``.tmp-`` files a crash
leaves), and the Evaluator, whose accuracy is compared with scikit-learn's on the stored logits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from sklearn.metrics import accuracy_score

from mldbg_callbacks.core.vectors import decode_vectors
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.store import LocalStore

from training_child import MODEL, N_SAMPLES, VERSION, digits, shard_ids  # tests/reliability is on sys.path

CHILD = Path(__file__).resolve().parent / "training_child.py"


def start_child(store: Path, *args: str, rank: int = 0, world_size: int = 1) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLD_")}
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(CHILD), str(store), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_when_ready(child: subprocess.Popen, ready: Path, timeout_s: float = 120.0) -> None:
    """SIGKILL the child as soon as it signals (no handler, no atexit: a crash)."""
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"the training process exited before the crash point: {child.stdout.read()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the training process never reached the crash point")
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL


def finish(child: subprocess.Popen, timeout_s: float = 180.0) -> None:
    output, _ = child.communicate(timeout=timeout_s)
    assert child.returncode == 0, output


def plain_pyarrow_ids(store: Path) -> Counter:
    """(n_epoch, input_id) counts as any Parquet reader sees the run (hidden and ``_`` files skipped)."""
    table = ds.dataset(store / MODEL / VERSION / "traces", format="parquet", partitioning="hive").to_table(
        columns=["input_id", "n_epoch"])
    return Counter(zip(table.column("n_epoch").to_pylist(), table.column("input_id").to_pylist()))


def check_epoch(store: LocalStore, epoch: int, expected_ids: list[str]) -> None:
    """Every expected row once, readable, with finite logits whose argmax accuracy the Evaluator reproduces."""
    table = store.read_traces(MODEL, VERSION, "train", [epoch])
    assert sorted(table.column("input_id").to_pylist()) == sorted(expected_ids)
    logits = decode_vectors(table, "logits")
    assert logits.shape == (len(expected_ids), 10) and np.isfinite(logits).all()
    _, labels, ids = digits()
    by_id = dict(zip(ids, labels))
    assert table.column("label").to_pylist() == [by_id[i] for i in table.column("input_id").to_pylist()]


def test_sigkill_mid_epoch_leaves_committed_epochs_intact_and_resume_continues(tmp_path):
    store_dir = tmp_path / "store"
    ready = tmp_path / "ready"
    every_id = shard_ids(0, 1)
    kill_when_ready(start_child(store_dir, "--epochs", "4", "--crash-epoch", "2", "--ready", str(ready)), ready)

    store = LocalStore(store_dir)
    partitions = {p.n_epoch: p for p in store.partitions(MODEL, VERSION)}
    assert [e for e, p in partitions.items() if p.complete] == [0, 1]
    open_epoch = partitions[2]  # parts had been spilled before the kill: marked incomplete, never readable
    assert (open_epoch.ranks_committed, open_epoch.ranks_pending, open_epoch.complete) == ((), (0,), False)
    for epoch in (0, 1):
        check_epoch(store, epoch, every_id)
    assert plain_pyarrow_ids(store_dir) == Counter({(e, i): 1 for e in (0, 1) for i in every_id})
    before = Evaluator(MODEL, VERSION, store=store_dir).request_evaluation(result_name="after-crash")
    assert before.epochs == {"train": [1]}
    assert any("train epoch 2 is not completely saved (missing rank 0, which stopped mid-epoch" in note
               for note in before.notes), before.notes
    table = store.read_traces(MODEL, VERSION, "train", [1])
    reference = accuracy_score(table.column("label").to_numpy(), decode_vectors(table, "logits").argmax(axis=1))
    summary = before.metrics_summary().iloc[0]
    assert summary["counts"] == N_SAMPLES and summary["accuracy"] == pytest.approx(reference)

    finish(start_child(store_dir, "--epochs", "4", "--resume"))  # restarts at epoch 2 from the checkpoint
    assert [p.n_epoch for p in store.partitions(MODEL, VERSION) if p.complete] == [0, 1, 2, 3]
    for epoch in range(4):
        check_epoch(store, epoch, every_id)  # the crashed process's spilled parts of epoch 2 are not read
    assert plain_pyarrow_ids(store_dir) == Counter({(e, i): 1 for e in range(4) for i in every_id})
    after = Evaluator(MODEL, VERSION, store=store_dir).request_evaluation(n_epoch=None)
    assert after.epochs == {"train": [0, 1, 2, 3]} and not any("not completely saved" in n for n in after.notes)


def test_a_process_that_exits_without_waiting_saves_its_traces_at_exit(tmp_path):
    store_dir = tmp_path / "store"
    finish(start_child(store_dir, "--epochs", "2", "--no-wait"))  # no wait_for_save(), no close()
    store = LocalStore(store_dir)
    assert [p.n_epoch for p in store.partitions(MODEL, VERSION) if p.complete] == [0, 1]
    for epoch in (0, 1):
        check_epoch(store, epoch, shard_ids(0, 1))


def test_one_rank_killed_the_other_ranks_shard_is_committed_and_the_missing_rank_is_reported(tmp_path):
    store_dir = tmp_path / "store"
    ready = tmp_path / "ready"
    survivor = start_child(store_dir, "--epochs", "2", rank=0, world_size=2)
    crashing = start_child(store_dir, "--epochs", "2", "--crash-epoch", "1", "--ready", str(ready),
                           rank=1, world_size=2)
    try:
        kill_when_ready(crashing, ready)
        finish(survivor)
    finally:
        for child in (survivor, crashing):
            if child.poll() is None:
                child.kill()

    store = LocalStore(store_dir)
    partitions = {p.n_epoch: p for p in store.partitions(MODEL, VERSION)}
    assert partitions[0].complete and partitions[0].ranks_committed == (0, 1)
    assert (partitions[1].ranks_committed, partitions[1].world_size, partitions[1].complete) == ((0,), 2, False)
    check_epoch(store, 0, shard_ids(0, 2) + shard_ids(1, 2))
    check_epoch(store, 1, shard_ids(0, 2))  # the surviving rank's shard, whole

    evaluator = Evaluator(MODEL, VERSION, store=store_dir)
    latest = evaluator.request_evaluation(result_name="latest")
    assert latest.epochs == {"train": [0]}  # the newest complete epoch
    assert any("train epoch 1 is not completely saved (missing rank 1" in note for note in latest.notes), latest.notes
    partial = evaluator.request_evaluation(result_name="e1", n_epoch=1)
    assert partial.metrics_summary().iloc[0]["counts"] == len(shard_ids(0, 2))
    assert any("1 of 2 ranks committed (missing rank 1, which stopped mid-epoch" in note
               for note in partial.notes), partial.notes
