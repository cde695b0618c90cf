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

import numpy as np
import requests

from mldbg_callbacks.server.app import ServerConfig
from mldbg_callbacks.server.db import Database
from mldbg_callbacks.training import ClassificationTracer

MODEL, VERSION = "digits", "v1"


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
    env: dict | None = None  # added to the environment (which is cleared of MLD_* variables)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        args = [sys.executable, "-m", "mldbg_callbacks.cli", "--store", str(self.store), self.command,
                "--port", str(self.port), *self.extra]
        if self.db and self.command == "serve":
            args += ["--db", self.db]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLD_")}, **(self.env or {})}
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
def running_server(store: Path | str, *, command: str = "serve", db: str | None = None, extra: tuple = (),
                   env: dict | None = None):
    server = ServerProcess(store, free_port(), command=command, db=db, extra=extra, env=env).start()
    try:
        yield server
    finally:
        server.stop()


# -- a real run to serve: SGD on scikit-learn's digits ----------------------------------------------
def digits_arrays(n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and input ids of the first ``n`` digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[:n].astype(np.float32), y[:n], np.array([f"d{i:04d}" for i in range(n)])


def train_digits(tracer, digits, epochs: int = 3, seed: int = 0) -> None:
    """Real SGD training on digits (the first 3/4 train, the rest test), traced on both every epoch."""
    from sklearn.linear_model import SGDClassifier

    x, y, ids = digits
    split = len(y) * 3 // 4
    model = SGDClassifier(loss="log_loss", random_state=seed)
    for epoch in range(epochs):
        model.partial_fit(x[:split], y[:split], classes=np.arange(10))
        for dataset, part in (("train", slice(0, split)), ("test", slice(split, len(y)))):
            for start in range(part.start, part.stop, 64):
                stop = min(start + 64, part.stop)
                tracer.record(model.predict_proba(x[start:stop]), y[start:stop], input_ids=ids[start:stop],
                              dataset_type=dataset, n_epoch=epoch)


def digits_tracer(store, **kwargs) -> ClassificationTracer:
    """A tracer of MODEL/VERSION (or ``model_name`` / ``version_name``) writing to ``store``."""
    return ClassificationTracer(lambda x: x, kwargs.pop("model_name", MODEL), kwargs.pop("version_name", VERSION),
                                store=store, feature_layer=False, **kwargs)
