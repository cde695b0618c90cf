"""RemoteStore and HttpSink: tracing to, and evaluating on, a team server (`mldbg serve`) over HTTP.

Selected by ``MLD_API_ENDPOINT`` + ``MLD_API_KEY`` (or ``store="https://…"``). The tracing core calls
the sink from its background worker, exactly as it calls a local ``RunWriter``, so uploads never run on
the training thread. What the sink guarantees:

- a chunk is an Arrow IPC stream (zstd) named by the SHA-256 of its bytes: a retried upload is stored
  once, and a commit lists chunk ids, so it is idempotent too;
- connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter;
- when the server stays unreachable, uploads go to a spool directory (``MLD_SPOOL_DIR``, default
  ``~/.cache/mldbg-callbacks/spool``, bounded by ``MLD_SPOOL_MAX_MB``) in order; the sink replays its
  spool before its next upload, ``wait_for_save()`` reports what is still spooled, and ``mldbg sync``
  replays a spool later (e.g. from another machine, or after the run ended);
- a 4xx answer (bad key, bad request) is not retried: it raises, naming the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pyarrow as pa

from ..errors import MLDebuggerError, NoTracesError, TraceWriteError
from .names import validate_name

ARROW_STREAM = "application/vnd.apache.arrow.stream"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
DEFAULT_SPOOL_MAX_MB = 2048


class RemoteError(MLDebuggerError):
    """The server refused a request (4xx): retrying the same request cannot succeed."""

    def __init__(self, status: int, detail: Any, what: str):
        self.status = status
        self.detail = detail
        hint = {401: " Check MLD_API_KEY (create a key with `mldbg keys create --project P`).",
                403: " The key was revoked: create a new one with `mldbg keys create --project P`.",
                413: " The server's --max-upload-mb is smaller than a trace part; raise it."}.get(status, "")
        super().__init__(f"{what}: HTTP {status}: {detail}.{hint}")


class ServerUnavailable(MLDebuggerError, ConnectionError):
    """The server did not answer (or answered 5xx / 429) after every retry."""


def encode_chunk(table: pa.Table) -> bytes:
    """A table as a compressed Arrow IPC stream (the upload format)."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode_arrow(body: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(body)).read_all()


@dataclass
class Op:
    """One request of the upload protocol, relative to ``/v1/projects/<project>/``."""

    method: str
    path: str
    json: dict | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data or b"") + len(json.dumps(self.json or {}))


class ApiClient:
    """requests with retries: one Session per thread, the key sent as a Bearer token."""

    def __init__(self, endpoint: str, api_key: str | None, *, timeout_s: float = 60.0, retries: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0):
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._local = threading.local()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"]  # sessions do not pickle (tracers are copied into DDP workers)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
        return session

    def request(self, method: str, path: str, *, what: str, retries: int | None = None, **kwargs: Any):
        """Send with retries; return the response (2xx), raise RemoteError (4xx) or ServerUnavailable."""
        import requests

        attempts = 1 + (self.retries if retries is None else retries)
        last: str = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random() / 2))  # jitter: ranks retrying together spread out
            try:
                response = self._session().request(method, self.endpoint + path, **kwargs,
                                                   timeout=(min(5.0, self.timeout_s), self.timeout_s))
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                last = f"HTTP {response.status_code}"
                continue
            if response.status_code >= 400:
                try:
                    detail = response.json().get("detail", response.text)
                except ValueError:
                    detail = response.text[:500]
                if response.status_code == 404:
                    raise NoTracesError(f"{what}: {detail}")
                raise RemoteError(response.status_code, detail, what)
            return response
        raise ServerUnavailable(f"{what}: no answer from {self.endpoint} after {attempts} attempt(s) ({last})")


class RemoteStore:
    """A project on a team server, used like a LocalStore by the tracers and the Evaluator.

    Args:
        endpoint: the server's URL (``MLD_API_ENDPOINT``).
        api_key: a key of the project (``MLD_API_KEY``); the project is the key's.
        spool_dir: where uploads wait while the server is unreachable (``MLD_SPOOL_DIR``).
        max_spool_mb: bound of the spool (``MLD_SPOOL_MAX_MB``); beyond it uploads fail (counted).
        offline_retry_s: after the server was found unreachable, uploads go straight to the spool for
            this long instead of retrying each one (so a dead server cannot slow tracing down).
        chunk_mb: largest upload request; a spilled part is sent as several chunks when bigger (and
            never more than half the server's upload limit, which the server announces).
    """

    def __init__(self, endpoint: str, api_key: str | None = None, *, spool_dir: str | os.PathLike | None = None,
                 max_spool_mb: float | None = None, retries: int = 4, backoff_s: float = 0.5,
                 timeout_s: float = 60.0, offline_retry_s: float = 30.0, chunk_mb: float = 8.0):
        api_key = api_key or os.environ.get("MLD_API_KEY")
        if not api_key:
            raise MLDebuggerError(f"the server {endpoint} needs an API key: set MLD_API_KEY (create one on the "
                                  "server with `mldbg keys create --project P`)")
        self.client = ApiClient(endpoint, api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        self.spool = Spool(spool_dir, max_spool_mb)
        self.offline_retry_s = offline_retry_s
        self.chunk_mb = chunk_mb
        self._project: str | None = None
        self._server_upload_limit: int | None = None

    @property
    def endpoint(self) -> str:
        return self.client.endpoint

    @property
    def root(self) -> str:  # what integrations print and key caches by, as for a LocalStore
        return self.endpoint

    def __repr__(self) -> str:
        return f"RemoteStore({self.endpoint!r})"

    @property
    def project(self) -> str:
        if self._project is None:
            answer = self.client.request("GET", "/v1/whoami", what="checking the API key").json()
            self._project = validate_name(answer["project"], "project")
            self._server_upload_limit = answer.get("max_upload_bytes")
        return self._project

    @property
    def chunk_bytes(self) -> int:
        """Target size of one upload: ``chunk_mb``, at most half the server's limit once it is known."""
        target = int(self.chunk_mb * (1 << 20))
        return min(target, self._server_upload_limit // 2) if self._server_upload_limit else target

    def url(self, path: str) -> str:
        return f"/v1/projects/{quote(self.project)}/{path}"

    def get(self, path: str, what: str, **kwargs: Any):
        return self.client.request("GET", self.url(path), what=what, **kwargs)

    def send(self, op: Op, retries: int | None = None):
        headers = {"Content-Type": ARROW_STREAM} if op.data is not None else None
        return self.client.request(op.method, self.url(op.path), what=f"{op.method} {op.path}", retries=retries,
                                   json=op.json, data=op.data, headers=headers)

    # -- the tracer side ------------------------------------------------------------------------
    def run(self, model_name: str, version_name: str) -> "HttpSink":
        return HttpSink(self, validate_name(model_name, "model_name"), validate_name(version_name, "version_name"))

    # -- the evaluator side (same methods as LocalStore) ----------------------------------------
    def list_models(self) -> list[str]:
        return [m["model_name"] for m in self.get("models", "listing models").json()]

    def list_versions(self, model_name: str) -> list[str]:
        path = f"models/{quote(validate_name(model_name, 'model_name'))}/versions"
        try:
            return [v["version_name"] for v in self.get(path, f"listing versions of {model_name}").json()]
        except NoTracesError:
            return []

    def _version_path(self, model_name: str, version_name: str) -> str:
        return (f"models/{quote(validate_name(model_name, 'model_name'))}/versions/"
                f"{quote(validate_name(version_name, 'version_name'))}")

    def read_meta(self, model_name: str, version_name: str) -> dict:
        return self.get(self._version_path(model_name, version_name), f"reading {model_name}/{version_name}").json()

    def partitions_frame(self, model_name: str, version_name: str):
        import pandas as pd

        partitions = self.read_meta(model_name, version_name)["partitions"]
        return pd.DataFrame(partitions, columns=["dataset_type", "n_epoch", "rows", "complete", "ranks_committed",
                                                 "world_size"])

    def read_traces(self, model_name: str, version_name: str, dataset_type: str, epochs: Any,
                    exclude_columns: Any = ()) -> pa.Table:
        """Committed rows of the given epochs, as ``LocalStore.read_traces`` (downloaded: a whole partition)."""
        path = f"{self._version_path(model_name, version_name)}/traces/{quote(validate_name(dataset_type, 'dataset_type'))}"
        body = self.get(path, f"reading the traces of {model_name}/{version_name} {dataset_type}",
                        params={"n_epoch": [int(e) for e in epochs], "exclude": list(exclude_columns)}).content
        return decode_arrow(body)

    def list_results(self, model_name: str, version_name: str) -> list[dict]:
        return self.get(self._version_path(model_name, version_name) + "/results",
                        f"listing results of {model_name}/{version_name}").json()

    def load_result(self, model_name: str, version_name: str, result_name: str) -> tuple[dict, dict]:
        base = f"{self._version_path(model_name, version_name)}/results/{quote(validate_name(result_name, 'result_name'))}"
        answer = self.get(base, f"reading result {result_name!r}").json()
        tables = {}
        for name in answer["tables"]:
            body = self.get(f"{base}/tables/{name}", f"reading table {name}", params={"format": "arrow"}).content
            tables[name] = decode_arrow(body).to_pandas()
        return answer["meta"], tables

    def request_evaluation(self, model_name: str, version_name: str, *, result_name: str | None, n_epoch: Any,
                           risk: float, progress: Callable[[str, int, int], None] | None = None,
                           poll_s: float = 0.25) -> tuple[dict, dict]:
        """Ask the server to evaluate, poll its job until done, then fetch the result."""
        body = {"result_name": result_name, "n_epoch": "all" if n_epoch is None else n_epoch, "risk": float(risk)}
        job = self.client.request("POST", self.url(self._version_path(model_name, version_name) + "/evaluations"),
                                  what=f"requesting an evaluation of {model_name}/{version_name}", json=body).json()
        while True:
            state = self.get(f"jobs/{job['job_id']}", "polling the evaluation").json()
            if state["status"] == "done":
                if progress:  # the last stage, as a local evaluation reports it (however quick the job was)
                    progress("saving", 1, 1)
                return self.load_result(model_name, version_name, state["result_name"])
            if state["status"] == "failed":
                error = state["error"] or "unknown error"
                kind = NoTracesError if error.startswith("NoTracesError") else MLDebuggerError
                raise kind(f"the server's evaluation of {model_name}/{version_name} failed: {error}")
            if progress and state["stage"]:
                progress(state["stage"], state["done"], state["total"])
            time.sleep(poll_s)
            poll_s = min(2.0, poll_s * 1.5)


@dataclass
class SpoolStatus:
    """What is waiting in a spool: ``entries`` requests holding ``bytes`` bytes, in ``directory``."""

    entries: int = 0
    bytes: int = 0
    directory: str = ""


class Spool:
    """Requests that could not be delivered, one JSON file (+ body file) each, replayed in name order.

    File names start with a nanosecond time stamp, so a sink's chunks always replay before its commit.
    A JSON file is written last (atomically): an entry without one is incomplete and ignored.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_mb: float | None = None):
        directory = directory or os.environ.get("MLD_SPOOL_DIR") or Path.home() / ".cache" / "mldbg-callbacks" / "spool"
        self.directory = Path(directory).expanduser()
        max_mb = max_mb if max_mb is not None else float(os.environ.get("MLD_SPOOL_MAX_MB", DEFAULT_SPOOL_MAX_MB))
        self.max_bytes = int(max_mb * (1 << 20))

    def status(self, entries: list[Path] | None = None) -> SpoolStatus:
        entries = self.entries() if entries is None else [e for e in entries if e.exists()]
        size = sum(e.stat().st_size + (_body(e).stat().st_size if _body(e).exists() else 0) for e in entries)
        return SpoolStatus(len(entries), size, str(self.directory))

    def entries(self) -> list[Path]:
        return sorted(self.directory.glob("*/*.json"), key=lambda p: p.name) if self.directory.is_dir() else []

    def add(self, endpoint: str, op: Op) -> Path:
        if self.status().bytes + op.size > self.max_bytes:
            raise TraceWriteError(f"the upload spool {self.directory} is full ({self.max_bytes >> 20} MB, "
                                  "MLD_SPOOL_MAX_MB): start the server and run `mldbg sync`, or raise the bound")
        target = self.directory / hashlib.sha256(endpoint.encode()).hexdigest()[:16]
        target.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        entry = {"endpoint": endpoint, "method": op.method, "path": op.path, "json": op.json,
                 "has_body": op.data is not None}
        if op.data is not None:
            _write_atomic(target / f"{stem}.arrow", op.data)
        _write_atomic(target / f"{stem}.json", json.dumps(entry).encode())
        return target / f"{stem}.json"

    @staticmethod
    def load(entry: Path) -> tuple[str, Op]:
        info = json.loads(entry.read_text())
        data = _body(entry).read_bytes() if info["has_body"] else None
        return info["endpoint"], Op(info["method"], info["path"], info["json"], data)

    @staticmethod
    def remove(entry: Path) -> None:
        _body(entry).unlink(missing_ok=True)
        entry.unlink(missing_ok=True)

    def set_aside(self, entry: Path, reason: str) -> Path:
        """Move an entry the server refused to ``failed/`` (kept for inspection, not replayed again)."""
        failed = self.directory / "failed"
        failed.mkdir(parents=True, exist_ok=True)
        if _body(entry).exists():
            os.replace(_body(entry), failed / _body(entry).name)
        os.replace(entry, failed / entry.name)
        (failed / f"{entry.stem}.reason.txt").write_text(reason)
        return failed / entry.name


def _body(entry: Path) -> Path:
    return entry.with_suffix(".arrow")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class SyncReport:
    delivered: int = 0
    remaining: int = 0
    refused: list[str] = field(default_factory=list)


def replay(store: RemoteStore, entries: list[Path], *, retries: int = 0) -> SyncReport:
    """Send spooled entries in order; stop at the first that cannot reach the server.

    Entries the server refuses (4xx) are set aside in ``failed/`` so they cannot block the others.
    """
    report = SyncReport()
    for i, entry in enumerate(entries):
        if not entry.exists():
            continue
        try:
            _endpoint, op = store.spool.load(entry)
            store.send(op, retries=retries)
        except ServerUnavailable:
            report.remaining = sum(1 for e in entries[i:] if e.exists())
            return report
        except (RemoteError, NoTracesError) as exc:
            report.refused.append(f"{entry.name}: {exc}")
            store.spool.set_aside(entry, str(exc))
            continue
        except (OSError, ValueError, KeyError) as exc:  # an unreadable entry (e.g. a truncated file)
            report.refused.append(f"{entry.name}: unreadable spool entry: {exc}")
            store.spool.set_aside(entry, str(exc))
            continue
        store.spool.remove(entry)
        report.delivered += 1
    return report


def sync_spool(store: RemoteStore) -> SyncReport:
    """``mldbg sync``: replay every entry of the spool that was meant for ``store``'s server."""
    mine = [e for e in store.spool.entries() if _entry_endpoint(e) == store.endpoint]
    return replay(store, mine, retries=store.client.retries)


def _entry_endpoint(entry: Path) -> str | None:
    try:
        return json.loads(entry.read_text())["endpoint"]
    except (OSError, ValueError, KeyError):
        return None


class HttpSink:
    """The tracing core's sink for a server: one model version, called from the core's worker thread."""

    def __init__(self, store: RemoteStore, model_name: str, version_name: str):
        self.store = store
        self.model_name = model_name
        self.version_name = version_name
        self.path = f"{store.endpoint} ({model_name}/{version_name})"
        self.failure_hint = f"Uploads to {store.endpoint} failed: fix the cause named above"
        self._base = f"models/{quote(model_name)}/versions/{quote(version_name)}"
        self._spooled: list[Path] = []
        self._offline_until = 0.0
        self._warned = False
        self._chunks: dict[str, list[str]] = {}  # part name given to the core -> its chunks, until committed

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_spooled"], state["_chunks"] = [], {}  # a copy (DDP worker) has sent nothing itself
        return state

    # -- TraceSink ------------------------------------------------------------------------------
    def write_meta(self, meta: dict) -> None:
        self._deliver(Op("PUT", f"{self._base}/meta", json=json.loads(json.dumps(meta, default=str))))

    def write_part(self, dataset_type: str, n_epoch: int, rank: int, table: pa.Table) -> str:
        """Upload a spilled part as one or more chunks (each within ``store.chunk_bytes``); the part's name
        is its first chunk's id. The split depends only on the rows, so a retry sends the same chunks."""
        rows_per_chunk = max(1, int(self.store.chunk_bytes * table.num_rows / max(table.nbytes, 1)))
        chunk_ids = []
        for start in range(0, max(table.num_rows, 1), rows_per_chunk):
            body = encode_chunk(table.slice(start, rows_per_chunk))
            chunk_id = hashlib.sha256(body).hexdigest()
            self._deliver(Op("PUT", f"{self._rank_path(dataset_type, n_epoch, rank)}/chunks/{chunk_id}", data=body))
            chunk_ids.append(chunk_id)
        self._chunks[chunk_ids[0]] = chunk_ids
        return chunk_ids[0]

    def commit(self, dataset_type: str, n_epoch: int, rank: int, parts: list[str], rows: int,
               world_size: int) -> None:
        chunk_ids = [chunk for part in parts for chunk in self._chunks.get(part, [part])]
        self._deliver(Op("POST", f"{self._rank_path(dataset_type, n_epoch, rank)}/commit",
                         json={"parts": chunk_ids, "world_size": int(world_size)}))
        for part in parts:
            self._chunks.pop(part, None)

    def pending(self) -> SpoolStatus:
        """What this sink left in the spool (delivered by its next upload or by `mldbg sync`)."""
        self._spooled = [e for e in self._spooled if e.exists()]
        return self.store.spool.status(self._spooled)

    def retry_pending(self) -> None:
        """Try to deliver this sink's spool now, even inside the offline window (a flush asks for durability)."""
        if self._spooled:
            self._offline_until = 0.0
            self._replay()

    # -- delivery -------------------------------------------------------------------------------
    def _rank_path(self, dataset_type: str, n_epoch: int, rank: int) -> str:
        return f"{self._base}/traces/{quote(validate_name(dataset_type, 'dataset_type'))}/{int(n_epoch)}/{int(rank)}"

    def _deliver(self, op: Op) -> None:
        online = time.monotonic() >= self._offline_until
        if online and self._spooled:  # earlier requests first: a commit must follow its chunks
            online = self._replay()
        if online and not self._spooled:
            try:
                self.store.send(op)
                return
            except ServerUnavailable as exc:
                self._went_offline(exc)
        self._spooled.append(self.store.spool.add(self.store.endpoint, op))

    def _replay(self) -> bool:
        """Send this sink's spooled requests in order; True when none is left."""
        report = replay(self.store, self._spooled)
        self._spooled = [e for e in self._spooled if e.exists()]
        if report.refused:
            warnings.warn(f"mldbg-callbacks: the server refused {len(report.refused)} spooled upload(s), set "
                          f"aside in {self.store.spool.directory / 'failed'}: {report.refused[0]}", stacklevel=4)
        if report.remaining:
            self._offline_until = time.monotonic() + self.store.offline_retry_s
        return not report.remaining

    def _went_offline(self, exc: Exception) -> None:
        self._offline_until = time.monotonic() + self.store.offline_retry_s
        if not self._warned:
            self._warned = True
            warnings.warn(f"mldbg-callbacks: {exc}. Uploads are spooled to {self.store.spool.directory} and sent "
                          "when the server answers again (or with `mldbg sync`); training goes on.", stacklevel=4)
