"""The team server (`mldbg serve`) and remote tracing: a real server process on loopback, real HTTP.

Covers the REST API (auth, project scoping, uploads, commits, evaluations, results), the HttpSink
(idempotent chunks, retries, spool, `mldbg sync`), and faults: bad keys, oversized or corrupt bodies,
a server killed mid-upload, a server that never answers. Attacks (traversal through every name field,
other projects' keys, bombs, fuzzing of the schema) are in tests/security.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
from server_utils import MODEL, VERSION, ServerProcess, digits_arrays, free_port, running_server
from server_utils import digits_tracer as _tracer, train_digits as _train
from sklearn.linear_model import SGDClassifier

from mldbg_callbacks.errors import NoTracesError
from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.store import LocalStore, RemoteStore
from mldbg_callbacks.store.remote import encode_chunk
from mldbg_callbacks.training import ClassificationTracer

@pytest.fixture(scope="module")
def digits():
    return digits_arrays()


def _remote(server: ServerProcess, key: str, tmp_path, **kwargs) -> RemoteStore:
    options = {"retries": 2, "backoff_s": 0.05, "offline_retry_s": 0.5, **kwargs}
    return RemoteStore(server.url, key, spool_dir=tmp_path / "spool", **options)


def _rows(store: LocalStore, dataset: str, epoch: int) -> pd.DataFrame:
    table = store.read_traces(MODEL, VERSION, dataset, [epoch])
    return table.to_pandas().drop(columns=["rank"]).sort_values("input_id").reset_index(drop=True)


@pytest.fixture()
def server(tmp_path):
    with running_server(tmp_path / "server") as process:
        yield process


# -- remote tracing and evaluation ------------------------------------------------------------------
def test_traces_sent_to_a_server_equal_the_local_store_and_the_evaluator_runs_there(server, tmp_path, digits):
    key = server.create_key("vision")
    remote = _tracer(_remote(server, key, tmp_path))
    _train(remote, digits)
    stats = remote.wait_for_save()
    assert stats.rows_written == 3 * 600 and stats.pending_uploads == 0 and stats.write_errors == 0
    local = _tracer(tmp_path / "local")
    _train(local, digits)
    local.wait_for_save()

    served = LocalStore(server.store / "vision")  # the server writes the local store layout, per project
    for dataset in ("train", "test"):
        for epoch in range(3):
            pd.testing.assert_frame_equal(_rows(served, dataset, epoch), _rows(LocalStore(tmp_path / "local"), dataset, epoch))
    assert served.read_meta(MODEL, VERSION)["task"] == "classification"

    # The seed's evaluator code, unchanged, against the server (MLD_API_ENDPOINT + MLD_API_KEY)
    env = {"MLD_API_ENDPOINT": server.url, "MLD_API_KEY": key}
    os.environ.update(env)
    try:
        evaluator = Evaluator(model_name=MODEL, version_name=VERSION)
        seen = []
        result = evaluator.request_evaluation(result_name="remote", progress=lambda *a: seen.append(a))
    finally:
        for name in env:
            os.environ.pop(name)
    expected = Evaluator(MODEL, VERSION, store=tmp_path / "local").request_evaluation(result_name="remote")
    pd.testing.assert_frame_equal(result.metrics_summary(), expected.metrics_summary())
    pd.testing.assert_frame_equal(result.issue_category_summary(), expected.issue_category_summary())
    pd.testing.assert_frame_equal(result.samples().sort_values(["dataset_type", "input_id"]).reset_index(drop=True),
                                  expected.samples().sort_values(["dataset_type", "input_id"]).reset_index(drop=True),
                                  check_like=True)
    assert seen[-1] == ("saving", 1, 1)  # progress came through the job's polling, ending as a local one
    store = _remote(server, key, tmp_path)
    assert Evaluator(MODEL, VERSION, store=store).list_results()["result_name"].tolist() == ["remote"]
    again = Evaluator(MODEL, VERSION, store=store).get_result("remote")
    pd.testing.assert_frame_equal(again.metrics_summary(), result.metrics_summary())
    assert store.list_models() == [MODEL] and store.list_versions(MODEL) == [VERSION]

    # per-unit tables with paging and filters
    headers = {"Authorization": f"Bearer {key}"}
    base = f"{server.url}/v1/projects/vision/models/{MODEL}/versions/{VERSION}/results/remote/tables/samples"
    samples = result.samples()
    page = requests.get(base, params={"dataset_type": "test", "correct": "false", "limit": 7, "offset": 3},
                        headers=headers).json()
    wrong = samples[(samples["dataset_type"] == "test") & ~samples["correct"]]
    assert page["total"] == len(wrong) and len(page["rows"]) == min(7, len(wrong) - 3)
    assert [r["input_id"] for r in page["rows"]] == wrong["input_id"].tolist()[3:10]
    category = samples["category"].iloc[0]
    by_category = requests.get(base, params={"category": category, "limit": 1}, headers=headers).json()
    assert by_category["total"] == int((samples["category"] == category).sum())

    with pytest.raises(NoTracesError, match="nothing"):
        Evaluator("nothing", "v1", store=store).request_evaluation()


def test_diversity_selection_reads_features_from_the_server(server, tmp_path, digits):
    """A result evaluated by the server selects a pool by k-center greedy on features it downloads
    (GET .../traces/{dataset_type}): the same picks as from a local store with the same traces."""
    x, y, ids = digits
    key = server.create_key("vision")
    picks = {}
    for name, store in (("remote", _remote(server, key, tmp_path)), ("local", tmp_path / "local")):
        tracer = _tracer(store)
        model = SGDClassifier(loss="log_loss", random_state=0).fit(x[:400], y[:400])
        tracer.record(model.predict_proba(x[:400]), y[:400], input_ids=ids[:400], features=x[:400])
        tracer.record(model.predict_proba(x[400:]), None, input_ids=ids[400:], features=x[400:], dataset_type="pool")
        tracer.wait_for_save()
        result = Evaluator(MODEL, VERSION, store=store).request_evaluation()
        picks[name] = result.select(20, "diversity")
        if name == "remote":
            downloaded = store.read_traces(MODEL, VERSION, "pool", [0], exclude_columns=["probs", "logged_at"])
    pd.testing.assert_frame_equal(picks["remote"], picks["local"])
    assert len(picks["remote"]) == 20 and set(picks["remote"]["input_id"]) <= set(ids[400:])
    stored = LocalStore(tmp_path / "local").read_traces(MODEL, VERSION, "pool", [0], exclude_columns=["probs", "logged_at"])
    assert {"probs", "logged_at"}.isdisjoint(downloaded.column_names) and downloaded.sort_by("input_id").equals(stored.sort_by("input_id"))


def test_failed_evaluation_is_reported_through_the_job(server, tmp_path, digits):
    key = server.create_key("vision")
    tracer = _tracer(_remote(server, key, tmp_path))
    _train(tracer, digits, epochs=1)
    tracer.wait_for_save()
    with pytest.raises(NoTracesError, match="n_epoch=7|epoch 7|7"):
        Evaluator(MODEL, VERSION, store=_remote(server, key, tmp_path)).request_evaluation(n_epoch=7)


# -- auth and project scoping -----------------------------------------------------------------------
def test_keys_are_required_hashed_scoped_and_revocable(server, tmp_path, digits):
    key_a, key_b = server.create_key("alpha"), server.create_key("beta")
    tracer = _tracer(_remote(server, key_a, tmp_path))
    _train(tracer, digits, epochs=1)
    tracer.wait_for_save()
    models = f"{server.url}/v1/projects/alpha/models"
    version = f"{server.url}/v1/projects/alpha/models/{MODEL}/versions/{VERSION}"

    assert requests.get(f"{server.url}/v1/health").json()["status"] == "ok"  # the one route without a key
    assert requests.get(models).status_code == 401
    assert requests.get(models, headers={"Authorization": "Bearer mldbg_nope"}).status_code == 401
    forged = key_a[:-4] + ("AAAA" if not key_a.endswith("AAAA") else "BBBB")
    assert requests.get(models, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert requests.get(models, headers={"X-API-Key": key_a}).json() == [{"model_name": MODEL, "versions": [VERSION]}]

    # project B's key on project A: the same 404 as a project that does not exist, nothing leaks
    as_b = requests.get(version, headers={"Authorization": f"Bearer {key_b}"})
    missing = requests.get(f"{server.url}/v1/projects/gamma/models/{MODEL}/versions/{VERSION}",
                           headers={"Authorization": f"Bearer {key_b}"})
    assert as_b.status_code == missing.status_code == 404
    assert MODEL not in as_b.text and "alpha" in as_b.text  # names the asked project only
    assert requests.get(f"{server.url}/v1/projects/beta/models", headers={"Authorization": f"Bearer {key_b}"}).json() == []

    # the database holds a hash, never the key
    with sqlite3.connect(server.store / ".mldbg-server.db") as conn:
        stored = [str(value) for row in conn.execute("SELECT * FROM api_keys") for value in row]
    assert not any(key_a in value or key_a.split("_", 2)[2] in value for value in stored)
    assert hashlib.sha256(key_a.encode()).hexdigest() in stored

    # revoke through the CLI: 403 from then on, and the tracer's writes fail with the fix named
    key_id = key_a.split("_")[1]
    revoked = subprocess.run([sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(server.store), "keys",
                              "revoke", key_id], capture_output=True, text=True)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert requests.get(models, headers={"Authorization": f"Bearer {key_a}"}).status_code == 403
    listed = subprocess.run([sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(server.store), "keys", "list"],
                            capture_output=True, text=True).stdout
    assert f"{key_id}  alpha  revoked" in listed and key_a not in listed
    tracer2 = _tracer(_remote(server, key_a, tmp_path), version_name="v2")
    _train(tracer2, digits, epochs=1)
    with pytest.raises(Exception, match="403.*revoked"):
        tracer2.wait_for_save()
    assert tracer2.stats.pending_uploads == 0  # a refusal is not spooled: it could never succeed as is


def test_keys_create_cli_prints_a_working_key(tmp_path):
    created = subprocess.run([sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(tmp_path / "s"), "keys",
                              "create", "--project", "team"], capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("mldbg_")
    with running_server(tmp_path / "s") as server:
        answer = requests.get(f"{server.url}/v1/whoami", headers={"Authorization": f"Bearer {key}"})
        assert answer.json() == {"project": "team", "auth": True, "max_upload_bytes": 64 << 20}
    bad = subprocess.run([sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(tmp_path / "s"), "keys",
                          "create", "--project", "../x"], capture_output=True, text=True)
    assert bad.returncode == 1 and ".." in bad.stdout


def test_a_part_larger_than_the_servers_limit_is_sent_in_chunks_below_it(tmp_path):
    """The server announces its upload limit; a spilled part above it arrives whole, in several chunks."""
    rng = np.random.default_rng(0)
    n, limit = 3000, 1 << 20
    with running_server(tmp_path / "srv", extra=("--max-upload-mb", "1")) as server:
        key = server.create_key("p")
        tracer = ClassificationTracer(lambda x: x, MODEL, VERSION, store=_remote(server, key, tmp_path),
                                      feature_layer=False, strict=True)
        probs = rng.dirichlet(np.ones(10), n).astype(np.float32)
        features = rng.normal(size=(n, 512)).astype(np.float32)  # ~1 KB per row: ~3 MB in one part
        for start in range(0, n, 500):
            tracer.record(probs[start:start + 500], rng.integers(0, 10, 500), input_ids=np.arange(start, start + 500),
                          n_epoch=0, features=features[start:start + 500])
        stats = tracer.wait_for_save()
        assert stats.rows_written == n and stats.write_errors == 0 and stats.pending_uploads == 0
        stored = LocalStore(server.store / "p").read_traces(MODEL, VERSION, "train", [0])
        assert sorted(stored.column("input_id").to_pylist()) == sorted(str(i) for i in range(n))
        database = server.database()
        with database.engine.connect() as connection:
            sizes = [row[0] for row in connection.exec_driver_sql("SELECT bytes FROM chunks")]
        database.dispose()
        assert len(sizes) >= 3 and max(sizes) <= limit


# -- uploads: bad input -----------------------------------------------------------------------------
def _chunk(rows: int = 5) -> bytes:
    return encode_chunk(pa.table({"input_id": [f"i{k}" for k in range(rows)], "label": list(range(rows))}))


def test_bad_uploads_are_refused_and_nothing_is_stored(tmp_path):
    with running_server(tmp_path / "srv", extra=("--max-upload-mb", "0.05")) as server:
        key = server.create_key("p")
        headers = {"Authorization": f"Bearer {key}"}
        arrow = {**headers, "Content-Type": "application/vnd.apache.arrow.stream"}
        base = f"{server.url}/v1/projects/p/models/m/versions/v"
        traces = base + "/traces/train/0/0"

        def put(body: bytes, chunk_id: str | None = None, url: str = traces):
            return requests.put(f"{url}/chunks/{chunk_id or hashlib.sha256(body).hexdigest()}", data=body,
                                headers=arrow)

        big = encode_chunk(pa.table({"input_id": [f"{k:08d}" for k in range(20000)],
                                     "x": np.random.default_rng(0).normal(size=20000)}))
        assert len(big) > 0.05 * (1 << 20)
        assert put(big).status_code == 413
        streamed = requests.put(f"{traces}/chunks/{hashlib.sha256(big).hexdigest()}", headers=arrow,
                                data=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]))  # no Content-Length
        assert streamed.status_code == 413
        assert put(b"not arrow at all").status_code == 400
        assert put(_chunk()[:-20]).status_code == 400  # truncated stream
        good = _chunk()
        assert put(good, chunk_id="0" * 64).status_code == 400  # id is not the body's hash
        no_id = encode_chunk(pa.table({"label": [1, 2]}))
        assert "input_id" in put(no_id).json()["detail"]
        odd = encode_chunk(pa.table({"input_id": ["a"], "x": pa.array([{"k": 1}])}))
        assert put(odd).status_code == 400
        assert not list((server.store / "p").rglob("*.parquet")) if (server.store / "p").exists() else True

        # the same chunk twice: stored once; commit twice: counted once
        first, second = put(good), put(good)
        assert first.json()["stored"] is True and second.json()["stored"] is False
        chunk_id = hashlib.sha256(good).hexdigest()
        missing = requests.post(f"{traces}/commit", json={"parts": ["f" * 64]}, headers=headers)
        assert missing.status_code == 409 and "f" * 64 in missing.text, missing.text
        for _ in range(2):
            assert requests.post(f"{traces}/commit", json={"parts": [chunk_id], "world_size": 1},
                                 headers=headers).ok
        assert requests.put(base + "/meta", json={"task": "classification", "num_classes": 10}, headers=headers).ok
        store = LocalStore(server.store / "p")
        assert store.read_traces("m", "v", "train", [0]).num_rows == 5
        assert store.partitions("m", "v")[0].rows == 5
        assert len(list((server.store / "p").rglob("*.parquet"))) == 1

        # strict JSON bodies: unknown fields, wrong types
        assert requests.post(f"{traces}/commit", json={"parts": [chunk_id], "extra": 1}, headers=headers).status_code == 422
        assert requests.post(f"{traces}/commit", json={"parts": chunk_id}, headers=headers).status_code == 422
        assert requests.post(base + "/evaluations", json={"n_epoch": "soon"}, headers=headers).status_code == 422
        assert requests.put(base + "/meta", json={"task": "object_detection"}, headers=headers).status_code == 409
        assert requests.put(base + "/meta", json={"no": "task"}, headers=headers).status_code == 400
        assert requests.post(f"{traces}/commit", data="x" * 2_000_000, headers=headers).status_code == 413


def test_openapi_schema_is_published_and_lists_the_api(server):
    schema = requests.get(f"{server.url}/v1/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/health", "/v1/projects/{project}/models/{model}/versions/{version}/evaluations",
                 "/v1/projects/{project}/models/{model}/versions/{version}/traces/{dataset_type}/{n_epoch}/{rank}/chunks/{chunk_id}",
                 "/v1/projects/{project}/models/{model}/versions/{version}/results/{result}/tables/{table}"):
        assert path in paths
    assert "CommitRequest" in schema["components"]["schemas"]


# -- faults: the server goes away -------------------------------------------------------------------
def test_server_killed_mid_upload_then_restarted_nothing_lost_or_duplicated(tmp_path, digits):
    server = ServerProcess(tmp_path / "srv", free_port()).start()
    try:
        key = server.create_key("vision")
        store = _remote(server, key, tmp_path)
        tracer = _tracer(store)
        tracer.core.rows_per_part = 40  # many chunks per epoch: the kill lands between uploads
        x, y, ids = digits
        model = SGDClassifier(loss="log_loss", random_state=0).partial_fit(x, y, classes=np.arange(10))
        tracer.model = model.predict_proba
        for epoch in range(3):
            for start in range(0, 600, 50):
                if epoch == 1 and start == 300:
                    server.kill()  # SIGKILL in the middle of epoch 1's uploads
                tracer(x[start:start + 50], y[start:start + 50], input_ids=ids[start:start + 50], n_epoch=epoch)
            if epoch == 1:
                with pytest.warns(UserWarning, match="spool"):
                    pending = tracer.wait_for_save(n_epoch=1)
                assert pending.pending_uploads > 0
                server.start()  # same port, same store
        stats = tracer.wait_for_save()
        assert stats.pending_uploads == 0 and stats.rows_written == 1800 and stats.write_errors == 0
        served = LocalStore(server.store / "vision")
        for epoch in range(3):
            rows = served.read_traces(MODEL, VERSION, "train", [epoch]).column("input_id").to_pylist()
            assert sorted(rows) == sorted(ids.tolist())  # every row once
            assert served.partitions(MODEL, VERSION)[epoch].rows == 600
        assert not list(store.spool.directory.rglob("*.json"))
    finally:
        server.stop()


def test_server_unreachable_for_the_whole_run_spools_then_mldbg_sync_delivers(tmp_path, digits):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    key_holder = ServerProcess(tmp_path / "srv", port)
    key = key_holder.create_key("vision")
    store = RemoteStore(url, key, spool_dir=spool, retries=1, backoff_s=0.05)
    tracer = _tracer(store)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="spool"):
        _train(tracer, digits)
        stats = tracer.wait_for_save()
    assert time.monotonic() - started < 60  # one failed attempt, then straight to the spool
    assert stats.pending_uploads >= 3 * 2 * 2 and stats.write_errors == 0  # chunk + commit per partition
    env = {**os.environ, "MLD_API_KEY": key, "MLD_SPOOL_DIR": str(spool)}
    cli = [sys.executable, "-m", "mldbg_callbacks.cli", "sync", "--endpoint", url]
    down = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert down.returncode == 1 and "still waiting" in down.stdout

    key_holder.start()
    try:
        synced = subprocess.run(cli, env=env, capture_output=True, text=True)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert not list(spool.rglob("*.json"))
        served = LocalStore(key_holder.store / "vision")
        local = _tracer(tmp_path / "local")
        _train(local, digits)
        local.wait_for_save()
        for dataset in ("train", "test"):
            for epoch in range(3):
                pd.testing.assert_frame_equal(_rows(served, dataset, epoch),
                                              _rows(LocalStore(tmp_path / "local"), dataset, epoch))
        again = subprocess.run(cli, env=env, capture_output=True, text=True)  # nothing left: a no-op
        assert again.returncode == 0 and "sent 0" in again.stdout
    finally:
        key_holder.stop()


def test_spool_is_bounded(tmp_path, digits):
    store = RemoteStore(f"http://127.0.0.1:{free_port()}", "mldbg_x", spool_dir=tmp_path / "spool", retries=0,
                        max_spool_mb=0.01)
    tracer = _tracer(store)
    with pytest.warns(UserWarning):
        _train(tracer, digits, epochs=2)
        with pytest.raises(Exception, match="spool .* is full"):
            tracer.wait_for_save()
    size = sum(p.stat().st_size for p in (tmp_path / "spool").rglob("*") if p.is_file())
    assert size <= 0.01 * (1 << 20)


def test_remote_store_pickles_for_ddp_workers(tmp_path):
    import copy
    import pickle

    store = RemoteStore("http://127.0.0.1:9", "mldbg_x", spool_dir=tmp_path)
    tracer = _tracer(store)
    clone = pickle.loads(pickle.dumps(tracer.core.sink))
    assert clone.store.endpoint == store.endpoint and clone.pending().entries == 0
    assert copy.deepcopy(store).client.api_key == "mldbg_x"


def test_ui_serves_a_local_store_without_keys(tmp_path, digits):
    tracer = _tracer(tmp_path / "store")
    _train(tracer, digits, epochs=1)
    tracer.wait_for_save()
    with running_server(tmp_path / "store", command="ui") as ui:
        assert requests.get(f"{ui.url}/v1/whoami").json() == {"project": "local", "auth": False, "max_upload_bytes": 64 << 20}
        versions = requests.get(f"{ui.url}/v1/projects/local/models/{MODEL}/versions").json()
        assert versions[0]["epochs"] == {"test": [0], "train": [0]}
        assert requests.get(f"{ui.url}/v1/projects/other/models").status_code == 404
        job = requests.post(f"{ui.url}/v1/projects/local/models/{MODEL}/versions/{VERSION}/evaluations",
                            json={"result_name": "r1"}).json()
        for _ in range(200):
            state = requests.get(f"{ui.url}/v1/projects/local/jobs/{job['job_id']}").json()
            if state["status"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert state["status"] == "done", state
    result = Evaluator(MODEL, VERSION, store=tmp_path / "store").get_result("r1")
    assert len(result.metrics_summary()) == 2  # saved in the local store itself


def test_lightning_callback_sends_its_traces_to_the_server_named_by_the_environment(server, tmp_path, monkeypatch):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning_ddp_script import MODEL as L_MODEL, VERSION as L_VERSION, DigitsMLP, digits_arrays, digits_loaders

    from mldbg_callbacks.core.trace_core import TraceWarning
    from mldbg_callbacks.integrations.lightning import MLDebuggerCallback

    key = server.create_key("team")
    monkeypatch.chdir(tmp_path)
    for name, value in {"MLD_API_ENDPOINT": server.url, "MLD_API_KEY": key, "MLD_SPOOL_DIR": str(tmp_path / "spool")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLD_HOME", raising=False)
    callback = MLDebuggerCallback(L_MODEL, L_VERSION)
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=1, max_epochs=2, enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)
        trainer.fit(DigitsMLP(), *digits_loaders(batch_size=64, val_batch_size=100))
    served = LocalStore(server.store / "team")
    data = digits_arrays()
    for dataset in ("train", "val"):
        for epoch in range(2):
            ids = served.read_traces(L_MODEL, L_VERSION, dataset, [epoch]).column("input_id").to_pylist()
            assert sorted(ids) == sorted(str(i) for i in data[dataset][2])
    assert callback.stats.pending_uploads == 0
    assert not (tmp_path / "mldbg").exists() and not list((tmp_path / "spool").rglob("*.json"))


def test_tracer_evaluator_and_server_on_an_fsspec_url_equal_the_local_directory(tmp_path, digits):
    """The store may be any fsspec URL (here ``memory://``): the same traces and the same evaluation."""
    url = f"memory://mldbg-test-{os.getpid()}-{tmp_path.name}"
    on_url = _tracer(url)
    _train(on_url, digits, epochs=2)
    assert on_url.wait_for_save().rows_written == 2 * 600
    local = _tracer(tmp_path / "local")
    _train(local, digits, epochs=2)
    local.wait_for_save()
    for dataset in ("train", "test"):
        for epoch in range(2):
            pd.testing.assert_frame_equal(_rows(LocalStore(url), dataset, epoch),
                                          _rows(LocalStore(tmp_path / "local"), dataset, epoch))
    expected = Evaluator(MODEL, VERSION, store=tmp_path / "local").request_evaluation(result_name="r")
    result = Evaluator(MODEL, VERSION, store=url).request_evaluation(result_name="r")
    pd.testing.assert_frame_equal(result.metrics_summary(), expected.metrics_summary())
    again = Evaluator(MODEL, VERSION, store=url).get_result("r")
    pd.testing.assert_frame_equal(again.issue_category_summary(), expected.issue_category_summary())

    # a server whose store is a URL (the metadata database must then be named)
    with pytest.raises(RuntimeError, match="--db"):
        ServerProcess("memory://no-db", free_port()).start()
    with running_server("memory://served", db=f"sqlite:///{tmp_path / 'server.db'}") as server:
        key = server.create_key("vision")
        remote = _tracer(_remote(server, key, tmp_path))
        _train(remote, digits, epochs=2)
        assert remote.wait_for_save().pending_uploads == 0
        served = Evaluator(MODEL, VERSION, store=_remote(server, key, tmp_path)).request_evaluation(result_name="r")
    pd.testing.assert_frame_equal(served.metrics_summary(), expected.metrics_summary())
