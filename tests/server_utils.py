"""Real `mldbg serve` / `mldbg ui` processes on loopback for the server, UI and remote-tracing tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from mldbg_callbacks.server.app import ServerConfig
from mldbg_callbacks.server.db import Database


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A server subprocess; ``stop()`` / ``kill()`` / ``start()`` again on the same port and store."""

    store: Path | str  # a directory, or an fsspec URL (then ``db`` is required)
    port: int
    command: str = "serve"
    db: str | None = None
    extra: tuple = ()
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        args = [sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(self.store), self.command,
                "--port", str(self.port), *self.extra]
        if self.db and self.command == "serve":
            args += ["--db", self.db]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLD_")}
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/v1/health", timeout=1).ok:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs (a crash)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def database(self) -> Database:
        return Database(ServerConfig(store=self.store, db=self.db).database_url())

    def create_key(self, project: str) -> str:
        db = self.database()
        try:
            return db.create_key(project)
        finally:
            db.dispose()


@contextlib.contextmanager
def running_server(store: Path | str, *, command: str = "serve", db: str | None = None, extra: tuple = ()):
    server = ServerProcess(store, free_port(), command=command, db=db, extra=extra).start()
    try:
        yield server
    finally:
        server.stop()
