"""The team server's FastAPI application: REST API under ``/v1`` and the web UI under ``/``.

    app = create_app(ServerConfig(store="/srv/mldbg"))        # what `mldbg serve` runs with uvicorn

Every project is a LocalStore at ``<store>/<project>/`` (the same layout as a local store, so the
evaluator, the Parquet readers and ``mldbg ui`` work on it unchanged). Uploads arrive as Arrow IPC
streams named by the SHA-256 of their bytes; a part is written under that name, so a retried upload
rewrites the same file and is recorded once. Every route but ``/v1/health`` needs an API key of the
project in its path; a key of another project gets the same 404 as a project that does not exist.
``mldbg ui`` (``local=True``) needs no key on loopback; exposed (``ui_key``) it needs that one key.
"""


import collections
import hashlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import pyarrow as pa
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import InvalidNameError, MLDebuggerError, NoTracesError
from ..evaluation.result import Result
from ..store.local import LocalStore, is_local_path, store_path
from ..store.remote import encode_chunk
from ..store.names import NAME_PATTERN, validate_name
from .db import Database, KeyCheck, key_hash, key_matches
from .uploads import UploadError, read_chunk

STATIC = Path(__file__).parent / "static"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
LOCAL_PROJECT = "local"
TABLES = ("samples", "metrics", "categories", "history", "per_class", "tide", "images", "issues", "unlabelled")


@dataclass
class ServerConfig:
    """Settings of one server process.

    Args:
        store: the directory (or fsspec URL) holding one store per project.
        db: SQLAlchemy URL of the metadata (default: SQLite at ``<store>/.mldbg-server.db``; required
            when the store is a URL).
        max_chunk_bytes: largest upload body accepted (413 beyond).
        max_json_bytes: largest JSON body accepted.
        local: ``mldbg ui`` mode: one project ``local`` whose store is ``store`` itself, no API keys.
        ui_key: in ``mldbg ui`` mode, the one key every request must carry (``mldbg ui --expose``);
            None: no key (the UI then binds loopback only).
    """

    store: str | Path
    db: str | None = None
    max_chunk_bytes: int = 64 << 20
    max_json_bytes: int = 1 << 20
    local: bool = False
    ui_key: str | None = None

    def database_url(self) -> str:
        if self.db:
            return self.db
        root = store_path(self.store)
        if not is_local_path(root):
            raise MLDebuggerError(f"the store {self.store} is a URL: name the metadata database with --db "
                                   "sqlite:///path/server.db or --db postgresql://…")
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{root / '.mldbg-server.db'}"


# The store's name rule, published in the schema; checked by validate_name, whose 400 names the fix
# (a pattern checked by FastAPI would answer a bare 422).
NAME_SCHEMA = {"pattern": NAME_PATTERN}
Name = Annotated[str, PathParam(min_length=1, max_length=128, json_schema_extra=NAME_SCHEMA)]
OtherName = Annotated[str, Query(min_length=1, max_length=128, json_schema_extra=NAME_SCHEMA)]


# -- request bodies (strict: unknown fields and wrong types are 422) --------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CommitRequest(_Strict):
    parts: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(max_length=100_000)
    world_size: int = Field(default=1, ge=1, le=65536)


class EvaluationRequest(_Strict):
    result_name: str | None = Field(default=None, min_length=1, max_length=128, json_schema_extra=NAME_SCHEMA)
    n_epoch: int | Literal["latest", "all"] = "latest"
    risk: float = Field(default=0.05, gt=0, lt=1)


class ErrorDetail(BaseModel):
    """Every error answer: ``detail`` says what was wrong and, where there is one, the fix."""

    detail: str | dict[str, Any] | list[Any]


_ERROR_MEANINGS = {
    400: "an invalid name, parameter or body (the detail names it)",
    401: "a missing, malformed or unknown API key",
    403: "a revoked API key",
    404: "no such project (or not the key's), model, version, result or job",
    409: "conflicts with what is stored (the detail says what)",
    413: "the body is over the server's limit",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: the error statuses it can answer (declared, so clients and
    schema checkers know them)."""
    return {status: {"model": ErrorDetail, "description": _ERROR_MEANINGS[status]} for status in statuses}


PROJECT_ERRORS = _errors(400, 401, 403, 404)
UPLOAD_ERRORS = _errors(400, 401, 403, 404, 409, 413)


class Server:
    """State shared by the routes: the config, the database, the evaluation worker and a result cache."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.root = store_path(config.store)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = Database(config.database_url())
        self._ui_key_hash = key_hash(config.ui_key) if config.ui_key else None
        self.db.fail_unfinished_jobs()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mldbg-evaluate")
        self.progress: dict[str, tuple[str, int, int]] = {}
        self.commit_lock = threading.Lock()  # commits read-modify-write a rank's marker
        self._results: collections.OrderedDict = collections.OrderedDict()
        self._results_lock = threading.Lock()

    @property
    def needs_key(self) -> bool:
        """Whether requests need a key: always for ``mldbg serve``, for ``mldbg ui`` when exposed."""
        return not self.config.local or self._ui_key_hash is not None

    def check_key(self, key: str | None) -> KeyCheck:
        """The project ``key`` opens (a server key: its project; ``mldbg ui``: the local project), or why none."""
        if not self.config.local:
            return self.db.check_key(key)
        if self._ui_key_hash is None:
            return KeyCheck(LOCAL_PROJECT)
        if not key:
            return KeyCheck(None, "missing")
        return KeyCheck(LOCAL_PROJECT) if key_matches(key, self._ui_key_hash) else KeyCheck(None, "unknown")

    def public(self, error: Exception) -> str:
        """An error message for a client: the server's own directory is not theirs to see."""
        return str(error).replace(str(self.root), "<store>")

    def store(self, project: str) -> LocalStore:
        if self.config.local:
            if project != LOCAL_PROJECT:
                raise HTTPException(404, f"project {project!r} not found")
            return LocalStore(self.root)
        return LocalStore(self.root / project)

    def result(self, project: str, model: str, version: str, name: str) -> Result:
        """A saved result, cached by its creation time (a result saved again under the name is reloaded)."""
        store = self.store(project)
        path = store.results_dir(model, version) / validate_name(name, "result_name") / "result.json"
        if not path.is_file():
            raise HTTPException(404, f"no result {name!r} for {model}/{version}")
        key = (project, model, version, name, path.read_text())  # a result saved again under its name: reloaded
        with self._results_lock:
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
        meta, tables = store.load_result(model, version, name)
        result = Result(meta, tables)
        with self._results_lock:
            self._results[key] = result
            while len(self._results) > 8:
                self._results.popitem(last=False)
        return result


def _frame_response(frame: pd.DataFrame, **extra: Any) -> Response:
    """A DataFrame as JSON: ``{"columns": [...], "rows": [{...}], **extra}`` (NaN as null)."""
    rows = json.loads(frame.to_json(orient="records", date_format="iso", default_handler=str)) if len(frame) else []
    return JSONResponse({**extra, "columns": [str(c) for c in frame.columns], "rows": rows})


def _arrow_response(frame: pd.DataFrame | pa.Table) -> Response:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    return Response(encode_chunk(table), media_type=ARROW_STREAM)


class _BodyTooLarge(Exception):
    pass


# The one route whose body may be as large as an upload (not any path with "/chunks/" in it: a model
# or version named "chunks" would lift a JSON route's limit)
_CHUNK_PATH = re.compile(r"^/v1/projects/[^/]+/models/[^/]+/versions/[^/]+/traces/[^/]+/\d+/\d+/chunks/[0-9a-f]{64}$")


class BodyLimit:
    """ASGI middleware: 413 for a body over its route's limit, by Content-Length or while streaming."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope["method"] == "PUT" and _CHUNK_PATH.match(scope["path"])
        limit = self.config.max_chunk_bytes if is_upload else self.config.max_json_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send_json(send, 413, {"detail": f"request body larger than {limit} bytes"})
        received, overflowed, answered = 0, False, False

        async def limited_receive():
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflowed = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal answered
            if overflowed:  # whatever the app made of a body cut short (FastAPI: 400, "error parsing the body")
                if not answered:
                    answered = True
                    await _send_json(send, 413, {"detail": f"request body larger than {limit} bytes"})
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not answered:
                await _send_json(send, 413, {"detail": f"request body larger than {limit} bytes"})


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(config: ServerConfig) -> FastAPI:
    server = Server(config)
    app = FastAPI(title="mldbg-callbacks server", version=__version__, openapi_url="/v1/openapi.json",
                  docs_url="/v1/docs", redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, config=config)

    @app.exception_handler(InvalidNameError)
    async def _invalid_name(_request, exc):
        return JSONResponse({"detail": server.public(exc)}, status_code=400)

    @app.exception_handler(NoTracesError)
    async def _missing(_request, exc):
        return JSONResponse({"detail": server.public(exc)}, status_code=404)

    @app.exception_handler(MLDebuggerError)
    async def _bad_request(_request, exc):
        return JSONResponse({"detail": server.public(exc)}, status_code=400)

    if server.needs_key:
        # Declared as security schemes, so the OpenAPI schema says how to send the key
        bearer, header = HTTPBearer(auto_error=False), APIKeyHeader(name="X-API-Key", auto_error=False)

        def request_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                        api_key: Annotated[str | None, Depends(header)]) -> str | None:
            """The key sent as ``Authorization: Bearer …`` or, failing that, ``X-API-Key``."""
            return credentials.credentials if credentials is not None else api_key
    else:
        def request_key() -> None:
            return None

    RequestKey = Annotated[str | None, Depends(request_key)]
    how_to_get_a_key = ("the key `mldbg ui --expose` printed (or MLD_UI_KEY)" if config.local
                        else "create one with `mldbg keys create --project P`")

    def project_access(project: Name, key: RequestKey) -> str:
        """The project in the path, if the request's key belongs to it (health needs no key)."""
        validate_name(project, "project")
        check = server.check_key(key)
        if check.reason in ("missing", "malformed", "unknown"):
            raise HTTPException(401, "a valid API key is required: send 'Authorization: Bearer <key>' "
                                f"({how_to_get_a_key})", headers={"WWW-Authenticate": "Bearer"})
        if check.reason == "revoked":
            raise HTTPException(403, "this API key was revoked; create a new one with `mldbg keys create`")
        if check.project != project:
            raise HTTPException(404, f"project {project!r} not found")  # same answer as a missing project
        return project

    Project = Annotated[str, Depends(project_access)]

    def version_store(project: Project, model: Name, version: Name) -> tuple[LocalStore, str, str]:
        return server.store(project), validate_name(model, "model_name"), validate_name(version, "version_name")

    Version = Annotated[tuple, Depends(version_store)]
    base = "/v1/projects/{project}"
    vbase = base + "/models/{model}/versions/{version}"

    # -- service --------------------------------------------------------------------------------
    @app.get("/v1/health", tags=["service"])
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/whoami", tags=["service"], responses=_errors(401, 403))
    def whoami(key: RequestKey) -> dict:
        """The project of the request's key (clients use it to build their paths)."""
        check = server.check_key(key)
        if check.project is None:
            status = 403 if check.reason == "revoked" else 401
            raise HTTPException(status, f"API key {check.reason}", headers={"WWW-Authenticate": "Bearer"})
        # max_upload_bytes: clients split their uploads below it
        return {"project": check.project, "auth": server.needs_key, "max_upload_bytes": config.max_chunk_bytes}

    # -- listing --------------------------------------------------------------------------------
    @app.get(base + "/models", tags=["runs"], responses=PROJECT_ERRORS)
    def list_models(project: Project) -> list[dict]:
        store = server.store(project)
        return [{"model_name": m, "versions": store.list_versions(m)} for m in store.list_models()
                if store.list_versions(m)]

    @app.get(base + "/models/{model}/versions", tags=["runs"], responses=PROJECT_ERRORS)
    def list_versions(project: Project, model: Name) -> list[dict]:
        store = server.store(project)
        versions = store.list_versions(validate_name(model, "model_name"))
        if not versions:
            raise HTTPException(404, f"model {model!r} not found")
        return [_version_summary(store, model, v) for v in versions]

    @app.get(vbase, tags=["runs"], responses=PROJECT_ERRORS)
    def get_version(version: Version) -> dict:
        store, model_name, version_name = version
        summary = _version_summary(store, model_name, version_name)
        summary["partitions"] = json.loads(store.partitions_frame(model_name, version_name).to_json(orient="records"))
        summary["results"] = store.list_results(model_name, version_name)
        return summary

    @app.get(vbase + "/traces/{dataset_type}", tags=["runs"],
             responses={**PROJECT_ERRORS, 200: {"description": "the committed rows as an Arrow IPC stream",
                                                "content": {ARROW_STREAM: {}}}})
    def get_traces(version: Version, dataset_type: Name, n_epoch: Annotated[list[int], Query()],
                   exclude: Annotated[list[str], Query()] = []) -> Response:  # noqa: B006 - FastAPI's list default
        """The committed rows of ``dataset_type`` at the epochs ``n_epoch`` (repeat the parameter), without the
        columns ``exclude`` (e.g. the scores, when only features are needed: ``result.select("diversity")``)."""
        store, model_name, version_name = version
        return _arrow_response(store.read_traces(model_name, version_name, dataset_type, n_epoch, exclude))

    # -- uploads --------------------------------------------------------------------------------
    @app.put(vbase + "/meta", tags=["uploads"], responses=UPLOAD_ERRORS)
    def put_meta(version: Version, meta: dict) -> dict:
        store, model_name, version_name = version
        if len(json.dumps(meta)) > 256 << 10 or "task" not in meta:
            raise HTTPException(400, "meta must be a JSON object with a 'task' (at most 256 KB)")
        try:
            store.run(model_name, version_name).write_meta(meta)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"ok": True}

    @app.put(vbase + "/traces/{dataset_type}/{n_epoch}/{rank}/chunks/{chunk_id}", tags=["uploads"],
             responses=UPLOAD_ERRORS, openapi_extra={"requestBody": {"required": True, "content": {ARROW_STREAM: {"schema": {
                 "type": "string", "format": "binary"}}}}})
    async def put_chunk(request: Request, version: Version, dataset_type: Name,
                        n_epoch: Annotated[int, PathParam(ge=0, le=1_000_000)],
                        rank: Annotated[int, PathParam(ge=0, le=65535)],
                        chunk_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]) -> dict:
        """Store one chunk (an Arrow IPC stream; its id is the SHA-256 of the body). Idempotent."""
        store, model_name, version_name = version
        project = request.path_params["project"]
        validate_name(dataset_type, "dataset_type")
        known = server.db.chunk_rows(project, model_name, version_name, dataset_type, n_epoch, rank, [chunk_id])
        if chunk_id in known:
            return {"chunk_id": chunk_id, "stored": False, "rows": known[chunk_id]}
        body = await request.body()
        if hashlib.sha256(body).hexdigest() != chunk_id:
            raise HTTPException(400, "chunk id is not the SHA-256 of the body (corrupted in transit?)")
        try:
            # a value takes a byte or more, but a list of nulls none: its count is bounded apart
            table = read_chunk(body, max_bytes=16 * config.max_chunk_bytes, max_values=config.max_chunk_bytes)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        store.run(model_name, version_name).write_part(dataset_type, n_epoch, rank, table, name=_part_name(chunk_id))
        server.db.add_chunk(project, model_name, version_name, dataset_type, n_epoch, rank, chunk_id,
                            table.num_rows, len(body))
        return {"chunk_id": chunk_id, "stored": True, "rows": table.num_rows}

    @app.post(vbase + "/traces/{dataset_type}/{n_epoch}/{rank}/commit", tags=["uploads"], responses=UPLOAD_ERRORS)
    def commit(request: Request, version: Version, dataset_type: Name,
               n_epoch: Annotated[int, PathParam(ge=0, le=1_000_000)],
               rank: Annotated[int, PathParam(ge=0, le=65535)], body: CommitRequest) -> dict:
        """Make the listed chunks visible to readers (idempotent: committed chunks are not counted twice)."""
        store, model_name, version_name = version
        project = request.path_params["project"]
        validate_name(dataset_type, "dataset_type")
        parts = list(dict.fromkeys(body.parts))
        rows = server.db.chunk_rows(project, model_name, version_name, dataset_type, n_epoch, rank, parts)
        missing = [p for p in parts if p not in rows]
        if missing:
            raise HTTPException(409, {"message": "upload these chunks before committing them", "missing": missing})
        writer = store.run(model_name, version_name)
        with server.commit_lock:
            done = set(writer.committed_parts(dataset_type, n_epoch, rank))
            new = [p for p in parts if _part_name(p) not in done]
            writer.commit(dataset_type, n_epoch, rank, [_part_name(p) for p in new], sum(rows[p] for p in new),
                          body.world_size)
        return {"committed": len(new), "already_committed": len(parts) - len(new)}

    # -- evaluations ----------------------------------------------------------------------------
    @app.post(vbase + "/evaluations", status_code=202, tags=["evaluations"],
              responses=_errors(400, 401, 403, 404, 413))
    def request_evaluation(request: Request, version: Version, body: EvaluationRequest) -> dict:
        store, model_name, version_name = version
        project = request.path_params["project"]
        store.read_meta(model_name, version_name)  # 404 now rather than a failed job later
        if body.result_name is not None:
            validate_name(body.result_name, "result_name")
        job_id = server.db.create_job(project, model_name, version_name, body.model_dump())
        server.worker.submit(_run_job, server, job_id, store, model_name, version_name, body)
        return {"job_id": job_id, "status": "queued"}

    @app.get(base + "/jobs/{job_id}", tags=["evaluations"], responses=PROJECT_ERRORS)
    def get_job(project: Project, job_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")]) -> dict:
        job = server.db.get_job(project, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        stage, done, total = server.progress.get(job_id, ("", 0, 0))
        return {"job_id": job_id, "status": job["status"], "stage": stage, "done": done, "total": total,
                "result_name": job["result_name"], "error": job["error"], "model_name": job["model_name"],
                "version_name": job["version_name"]}

    # -- results --------------------------------------------------------------------------------
    @app.get(vbase + "/results", tags=["results"], responses=PROJECT_ERRORS)
    def list_results(version: Version) -> list[dict]:
        store, model_name, version_name = version
        store.read_meta(model_name, version_name)
        return store.list_results(model_name, version_name)

    @app.get(vbase + "/results/{result}", tags=["results"], responses=PROJECT_ERRORS)
    def get_result(project: Project, model: Name, version: Name, result: Name) -> dict:
        """The result's metadata, its small tables (metrics, categories, issues) and the labels of its units."""
        res = server.result(project, model, version, result)
        labels = sorted(res._tables["samples"]["label"].dropna().unique().tolist())
        small = {"metrics": res.metrics_summary(), "categories": res.issue_category_summary(),
                 "error_proba": res.error_proba_summary(), "issues": _issues(res)}
        for name in ("per_class", "tide"):
            if name in res._tables:
                small[name] = res._tables[name]
        return {"meta": res.meta, "tables": sorted(res._tables), "labels": labels,
                **{name: json.loads(_records(frame)) for name, frame in small.items()}}

    @app.get(vbase + "/results/{result}/tables/{table}", tags=["results"],
             responses={**PROJECT_ERRORS, 200: {"description": "a page of rows as JSON, or with format=arrow the "
                                                "whole filtered table as an Arrow IPC stream",
                                                "content": {"application/json": {}, ARROW_STREAM: {}}}})
    def get_table(project: Project, model: Name, version: Name, result: Name,
                  table: Literal[TABLES],  # type: ignore[valid-type]
                  offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                  dataset_type: str | None = None, n_epoch: int | None = None, category: str | None = None,
                  error_code: str | None = None, label: int | None = None, region: str | None = None,
                  input_id: str | None = None, correct: bool | None = None,
                  format: Literal["json", "arrow"] = "json") -> Response:
        """A result table, filtered then paged (``format=arrow``: the whole filtered table as Arrow IPC)."""
        res = server.result(project, model, version, result)
        if table == "issues":
            frame = _issues(res)
        elif table in res._tables:
            frame = res._tables[table]
        else:
            raise HTTPException(404, f"result {result!r} has no table {table!r}; it has {sorted(res._tables)}")
        filters = {"dataset_type": dataset_type, "n_epoch": n_epoch, "category": category, "error_code": error_code,
                   "label": label, "input_id": input_id, "correct": correct}
        mask = pd.Series(True, index=frame.index)
        for column, value in filters.items():
            if value is None:
                continue
            column = "dataset" if column == "dataset_type" and column not in frame and "dataset" in frame else column
            if column not in frame:
                raise HTTPException(400, f"table {table!r} has no column {column!r} to filter on")
            mask &= frame[column].astype(str) == str(value) if column != "correct" else frame[column] == value
        if region is not None:
            column = next((c for c in ("region", "slice", "size", "distance_band") if c in frame), None)
            if column is None:
                raise HTTPException(400, f"table {table!r} has no region column")
            mask &= frame[column].astype(str) == region
        selected = frame[mask.to_numpy()]
        if format == "arrow":
            return _arrow_response(selected)
        page = selected.iloc[offset:offset + limit]
        return _frame_response(page, total=int(len(selected)), offset=offset, limit=limit)

    @app.get(vbase + "/results/{result}/heatmaps", tags=["results"], responses=PROJECT_ERRORS)
    def get_heatmaps(project: Project, model: Name, version: Name, result: Name) -> list[dict]:
        """The matrices behind the report's heatmaps, limited as the report draws them (the rows and columns
        with the most units): title, row and column labels, values (null: no unit), full sizes."""
        from ..evaluation.report import heatmaps, limit_matrix

        res = server.result(project, model, version, result)
        out = []
        for title, full in heatmaps(res):
            matrix = limit_matrix(full)
            values = matrix.to_numpy(dtype=float)
            out.append({"title": title, "rows_total": len(full.index), "columns_total": len(full.columns),
                        "index_name": str(matrix.index.name or ""),
                        "columns_name": str(matrix.columns.name or ""),
                        "index": [str(i) for i in matrix.index], "columns": [str(c) for c in matrix.columns],
                        "values": [[None if v != v else float(v) for v in row] for row in values]})
        return out

    @app.get(vbase + "/results/{result}/label_tracker", tags=["results"], responses=PROJECT_ERRORS)
    def get_label_tracker(project: Project, model: Name, version: Name, result: Name, metric: str = "loss",
                          dataset_type: str = "train") -> Response:
        """LabelTracker curves: per label and epoch the mean of ``metric`` with mean ± std bounds."""
        res = server.result(project, model, version, result)
        try:
            frame = res.label_tracker(metric=metric, bounds="std", dataset_type=dataset_type)
        except (KeyError, ValueError) as exc:
            raise HTTPException(400, str(exc).strip("'\"")) from None
        return _frame_response(pd.DataFrame(frame), metric=metric, dataset_type=dataset_type)

    @app.get(vbase + "/results/{result}/compare", tags=["results"], responses=PROJECT_ERRORS)
    def compare(project: Project, model: Name, version: Name, result: Name,
                other_model: OtherName, other_version: OtherName, other_result: OtherName) -> Response:
        """Metrics and category shares of two results side by side (any two results of the project)."""
        mine = server.result(project, model, version, result)
        other = server.result(project, validate_name(other_model, "model_name"),
                              validate_name(other_version, "version_name"), other_result)
        return _frame_response(mine.compare(other))

    @app.get(vbase + "/results/{result}/report.html", tags=["results"],
             responses={**PROJECT_ERRORS, 200: {"description": "the report", "content": {"text/html": {}}}})
    def get_report(project: Project, model: Name, version: Name, result: Name) -> Response:
        """The self-contained HTML report of the result (as ``mldbg report``)."""
        from ..evaluation.report import report_html

        return Response(report_html(server.result(project, model, version, result)), media_type="text/html")

    # -- web UI ---------------------------------------------------------------------------------
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC / "index.html")

    return app


def _part_name(chunk_id: str) -> str:
    return f"part-{chunk_id[:32]}.parquet"


def _records(frame: pd.DataFrame) -> str:
    return frame.to_json(orient="records", date_format="iso", default_handler=str) if len(frame) else "[]"


def _issues(result: Result) -> pd.DataFrame:
    issues = result.get_issues() if len(result._tables["samples"]) else pd.DataFrame()
    if "examples" in issues:
        issues = issues.assign(examples=issues["examples"].map(list))
    return issues


def _version_summary(store: LocalStore, model: str, version: str) -> dict:
    meta = store.read_meta(model, version)
    partitions = store.partitions(model, version)
    epochs: dict[str, list[int]] = {}
    for p in partitions:
        if p.ranks_committed:
            epochs.setdefault(p.dataset_type, []).append(p.n_epoch)
    return {"model_name": model, "version_name": version, "task": meta.get("task"),
            "num_classes": meta.get("num_classes"), "epochs": epochs}


def _run_job(server: Server, job_id: str, store: LocalStore, model: str, version: str,
             request: EvaluationRequest) -> None:
    from ..evaluator import evaluate_and_save

    def progress(stage: str, done: int, total: int) -> None:
        server.progress[job_id] = (stage, done, total)

    server.db.update_job(job_id, status="running")
    try:
        n_epoch = None if request.n_epoch == "all" else request.n_epoch
        result = evaluate_and_save(store, model, version, result_name=request.result_name, n_epoch=n_epoch,
                                   risk=request.risk, progress=progress)
        server.db.update_job(job_id, status="done", result_name=result.result_name)
    except Exception as exc:  # noqa: BLE001 - reported to the client through the job
        server.db.update_job(job_id, status="failed", error=f"{type(exc).__name__}: {server.public(exc)}")
    finally:
        server.progress.pop(job_id, None)
