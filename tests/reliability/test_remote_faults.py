"""Remote delivery under faults: a real server process, the unmodified HttpSink and `mldbg sync`, and a
fault-injecting proxy (``fault_proxy.py``) for answers a healthy server never gives.

Every case ends the same way: each traced row is stored on the server exactly once, bit-identical to the
same rows traced into a local store (compared frame by frame), after the client's own retries or, where
the server was away when the run ended, after `mldbg sync`. The case of a server SIGKILLed mid-epoch and
restarted during the run is ``tests/test_server.py::test_server_killed_mid_upload_then_restarted_nothing_lost_or_duplicated``;
a server unreachable for the whole run is ``test_server_unreachable_for_the_whole_run_spools_then_mldbg_sync_delivers``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
from fault_proxy import FaultProxy
from server_utils import ServerProcess, free_port
from training_child import MODEL, trace_digits

from mldbg_callbacks.core.trace_core import TraceWarning
from mldbg_callbacks.store import LocalStore, RemoteStore
from mldbg_callbacks.training import ClassificationTracer

PROJECT, EPOCHS = "vision", range(3)


def tracer_for(store, version: str) -> ClassificationTracer:
    tracer = ClassificationTracer(lambda x: x, MODEL, version, store=store, feature_layer=False)
    tracer.core.rows_per_part = 200  # three chunks and a commit per epoch: faults hit both kinds of request
    return tracer


def remote(url: str, key: str, spool, **options) -> RemoteStore:
    settings = {"retries": 3, "backoff_s": 0.05, "offline_retry_s": 0.5, **options}
    return RemoteStore(url, key, spool_dir=spool, **settings)


def rows(store: LocalStore, version: str, epoch: int) -> pd.DataFrame:
    table = store.read_traces(MODEL, version, "train", [epoch])
    return table.to_pandas().drop(columns=["rank"]).sort_values("input_id").reset_index(drop=True)


def assert_stored_exactly_once(server: ServerProcess, version: str, reference: LocalStore) -> None:
    served = LocalStore(server.store / PROJECT)
    for epoch in EPOCHS:
        got, expected = rows(served, version, epoch), rows(reference, "reference", epoch)
        assert not got["input_id"].duplicated().any()
        pd.testing.assert_frame_equal(got, expected)
        assert next(p for p in served.partitions(MODEL, version) if p.n_epoch == epoch).rows == len(expected)


def mldbg_sync(url: str, key: str, spool) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLD_API_KEY": key, "MLD_SPOOL_DIR": str(spool)}
    return subprocess.run([sys.executable, "-m", "mldbg_callbacks.cli", "sync", "--endpoint", url], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> LocalStore:
    """The rows every faulty run must end up with: the same tracing into a local store."""
    root = tmp_path_factory.mktemp("reference")
    tracer = tracer_for(root, "reference")
    trace_digits(tracer, EPOCHS)
    tracer.close()
    return LocalStore(root)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server"), free_port()).start()
    process.key = process.create_key(PROJECT)
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize("fault", ["error_500", "error_503", "slow", "drop_before", "drop_after"])
def test_failed_requests_are_retried_and_every_row_is_stored_once(server, reference, tmp_path, fault):
    with FaultProxy(server.url, slow_s=1.5) as proxy:
        proxy.inject(*[fault, "pass"] * 4)  # every other upload request of the first two epochs, chunks and commits
        store = remote(proxy.url, server.key, tmp_path / "spool", timeout_s=1.0)  # "slow" answers time out
        tracer = tracer_for(store, f"v-{fault}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", TraceWarning)  # nothing is skipped or left in the spool
            trace_digits(tracer, EPOCHS)
            stats = tracer.wait_for_save()
        tracer.close()
    assert proxy.applied[fault] == 4 and proxy.pending_faults() == 0  # the faults really happened
    assert (stats.pending_uploads, stats.write_errors, stats.total_skipped) == (0, 0, 0)
    assert_stored_exactly_once(server, f"v-{fault}", reference)


def test_server_answering_500s_longer_than_the_retries_spools_then_delivers(server, reference, tmp_path):
    spool = tmp_path / "spool"
    with FaultProxy(server.url) as proxy:
        proxy.inject(*["error_500"] * 12)  # more than a request's retries: the sink goes offline and spools
        store = remote(proxy.url, server.key, spool)
        tracer = tracer_for(store, "v-500-burst")
        with pytest.warns(UserWarning, match="spool"):
            trace_digits(tracer, EPOCHS)
            tracer.wait_for_save()
        assert proxy.applied["error_500"] > store.client.retries  # one request failed for good
        proxy.recover()  # the server is healthy again
        stats = tracer.wait_for_save()  # replays the spool first (the client's own retry)
        tracer.close()
        synced = mldbg_sync(proxy.url, server.key, spool)  # a no-op when the client delivered everything
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert stats.pending_uploads == 0 and stats.write_errors == 0
    assert not list(spool.rglob("*.json"))
    assert_stored_exactly_once(server, "v-500-burst", reference)


def test_server_down_at_start_then_up_the_client_delivers_the_spool_itself(reference, tmp_path):
    server = ServerProcess(tmp_path / "srv", free_port())
    key = server.create_key(PROJECT)
    spool = tmp_path / "spool"
    tracer = tracer_for(remote(server.url, key, spool, retries=1), "v-down-at-start")
    try:
        with pytest.warns(UserWarning, match="spool"):
            trace_digits(tracer, EPOCHS[:1])  # the server is not running yet
            assert tracer.wait_for_save().pending_uploads > 0
        server.start()
        trace_digits(tracer, EPOCHS[1:])
        stats = tracer.wait_for_save()
        tracer.close()
        assert stats.pending_uploads == 0 and stats.write_errors == 0
        assert not list(spool.rglob("*.json"))
        assert_stored_exactly_once(server, "v-down-at-start", reference)
    finally:
        server.stop()


def test_server_down_mid_run_until_after_the_run_then_mldbg_sync_delivers(reference, tmp_path):
    server = ServerProcess(tmp_path / "srv", free_port()).start()
    key = server.create_key(PROJECT)
    spool = tmp_path / "spool"
    tracer = tracer_for(remote(server.url, key, spool, retries=1), "v-down-mid-run")
    try:
        trace_digits(tracer, EPOCHS[:1])
        assert tracer.wait_for_save().pending_uploads == 0
        server.kill()  # SIGKILL between epochs; it stays down until the run has ended
        with pytest.warns(UserWarning, match="spool"):
            trace_digits(tracer, EPOCHS[1:])
            pending = tracer.wait_for_save().pending_uploads
        tracer.close()
        assert pending >= 2 * 2  # chunks + a commit per remaining epoch
        server.start()
        synced = mldbg_sync(server.url, key, spool)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert not list(spool.rglob("*.json"))
        assert_stored_exactly_once(server, "v-down-mid-run", reference)
    finally:
        server.stop()
