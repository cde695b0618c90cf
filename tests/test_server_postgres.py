"""The server's metadata on a real PostgreSQL (Debian's package), started by this test in a temporary
directory: keys, chunk records and evaluation jobs go through psycopg instead of SQLite."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from server_utils import free_port, running_server
from test_server import MODEL, VERSION, _remote, _tracer, _train, digits  # noqa: F401 - digits is a fixture

from mldbg_callbacks.evaluator import Evaluator
from mldbg_callbacks.server.db import Database, engine_url

INITDB = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
pytestmark = pytest.mark.skipif(not INITDB, reason="PostgreSQL is not installed: run scripts/setup_system.sh "
                                                   "(Debian package 'postgresql')")


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server on a free loopback port, owned by the 'postgres' user when running as root
    (PostgreSQL refuses to run as root; pytest's own temporary folders are private to root)."""
    bindir = os.path.dirname(INITDB[-1])
    root = Path(tempfile.mkdtemp(prefix="mldbg-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    port = free_port()
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets}"], check=True, capture_output=True)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sa.create_engine(engine_url(url)).connect().close()
                break
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_server_on_postgresql_keeps_keys_chunks_and_jobs_there(postgres_url, tmp_path, digits):  # noqa: F811
    with running_server(tmp_path / "srv", db=postgres_url) as server:
        key = server.create_key("vision")
        other = server.create_key("other")
        tracer = _tracer(_remote(server, key, tmp_path))
        _train(tracer, digits, epochs=2)
        assert tracer.wait_for_save().rows_written == 1200
        result = Evaluator(MODEL, VERSION, store=_remote(server, key, tmp_path)).request_evaluation(result_name="pg")
        assert set(result.metrics_summary()["dataset"]) == {"train", "test"}

        url = f"{server.url}/v1/projects/vision/models/{MODEL}/versions/{VERSION}"
        assert requests.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 404
        db = Database(postgres_url)
        try:
            with db.engine.connect() as conn:
                chunks = conn.execute(sa.text("SELECT count(*), sum(rows) FROM chunks WHERE project='vision'")).one()
                jobs = conn.execute(sa.text("SELECT status, result_name FROM jobs WHERE project='vision'")).all()
                hashes = [row[0] for row in conn.execute(sa.text("SELECT key_hash FROM api_keys"))]
            assert chunks == (4, 1200)  # (train, test) x 2 epochs, one chunk each
            assert [tuple(job) for job in jobs] == [("done", "pg")]
            assert key not in hashes and len(hashes) == 2
            db.revoke_key(key.split("_")[1])
        finally:
            db.dispose()
        assert requests.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 403
