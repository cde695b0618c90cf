"""The server's metadata: API keys, uploaded chunks and evaluation jobs (SQLAlchemy Core).

SQLite (a file next to the store) by default; PostgreSQL with ``--db postgresql://user@host/db``. The
traces themselves live in the store, never in the database.

API keys look like ``mldbg_<key id>_<secret>``. Only the key id and a SHA-256 of the whole key are
stored; a request's key is looked up by its id and its hash compared with ``hmac.compare_digest``, so
neither a database dump nor response timing reveals a usable key. The secret is 256 random bits, which is
why a plain (fast) hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from ..store.names import validate_name

KEY_PREFIX = "mldbg_"
_KEY = re.compile(r"^mldbg_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_id", sa.String(12), primary_key=True),
    sa.Column("project", sa.String(128), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("label", sa.String(200), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

# One row per stored chunk: a chunk id is the SHA-256 of its bytes, so an upload retried after a lost
# response finds its row and is not stored twice; commits count rows from here, not from the client.
chunks = sa.Table(
    "chunks", metadata,
    sa.Column("project", sa.String(128), primary_key=True),
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("version_name", sa.String(128), primary_key=True),
    sa.Column("dataset_type", sa.String(128), primary_key=True),
    sa.Column("n_epoch", sa.Integer, primary_key=True),
    sa.Column("rank", sa.Integer, primary_key=True),
    sa.Column("chunk_id", sa.String(64), primary_key=True),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("project", sa.String(128), nullable=False, index=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("version_name", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # queued, running, done, failed
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("result_name", sa.String(128), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def key_hash(key: str) -> str:
    """The SHA-256 (hex) under which a key is stored: the plain key is never kept."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, in a time that does not depend on where they differ
    (``hmac.compare_digest``): every key comparison of the server goes through here."""
    return hmac.compare_digest(stored_hash.encode(), key_hash(key).encode())


def engine_url(url: str) -> str:
    """``postgresql://`` selects psycopg 3 (SQLAlchemy's default driver name is psycopg2's)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@dataclass(frozen=True)
class KeyCheck:
    """The outcome of an API key lookup: ``project`` when valid, else why not."""

    project: str | None
    reason: str = ""  # "missing", "malformed", "unknown", "revoked"


class Database:
    """Keys, chunks and jobs of one server. ``url``: an SQLAlchemy URL (``sqlite:///path``, ``postgresql://``)."""

    def __init__(self, url: str):
        self.url = url
        options = {"connect_args": {"check_same_thread": False}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.engine = sa.create_engine(engine_url(url), **options)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- keys -----------------------------------------------------------------------------------
    def create_key(self, project: str, label: str = "") -> str:
        """A new key for ``project``; the only time its plain text exists."""
        validate_name(project, "project")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(key_id=key_id, project=project, key_hash=key_hash(key),
                                                  label=label[:200], created_at=_now()))
        return key

    def revoke_key(self, key_id: str) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(api_keys.update().where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                                .values(revoked_at=_now()))
        return done.rowcount > 0

    def list_keys(self, project: str | None = None) -> list[dict]:
        query = sa.select(api_keys.c.key_id, api_keys.c.project, api_keys.c.label, api_keys.c.created_at,
                          api_keys.c.revoked_at).order_by(api_keys.c.created_at)
        if project is not None:
            query = query.where(api_keys.c.project == project)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def check_key(self, key: str | None) -> KeyCheck:
        if not key:
            return KeyCheck(None, "missing")
        match = _KEY.match(key)
        if not match:
            return KeyCheck(None, "malformed")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == match.group(1))).first()
        # compare even when the id is unknown, so both answers take the same time
        stored = row.key_hash if row is not None else "0" * 64
        if not key_matches(key, stored) or row is None:
            return KeyCheck(None, "unknown")
        if row.revoked_at is not None:
            return KeyCheck(None, "revoked")
        return KeyCheck(row.project)

    # -- chunks ---------------------------------------------------------------------------------
    def chunk_rows(self, project: str, model: str, version: str, dataset_type: str, n_epoch: int, rank: int,
                   chunk_ids: list[str]) -> dict[str, int]:
        """Rows of each listed chunk that is stored (absent ids are not in the answer)."""
        c = chunks.c
        query = sa.select(c.chunk_id, c.rows).where(
            c.project == project, c.model_name == model, c.version_name == version, c.dataset_type == dataset_type,
            c.n_epoch == n_epoch, c.rank == rank, c.chunk_id.in_(chunk_ids))
        with self.engine.connect() as conn:
            return {row.chunk_id: row.rows for row in conn.execute(query)}

    def add_chunk(self, project: str, model: str, version: str, dataset_type: str, n_epoch: int, rank: int,
                  chunk_id: str, rows: int, size: int) -> bool:
        """Record a stored chunk; False if it was already recorded (a concurrent retry won)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(chunks.insert().values(
                    project=project, model_name=model, version_name=version, dataset_type=dataset_type,
                    n_epoch=n_epoch, rank=rank, chunk_id=chunk_id, rows=rows, bytes=size, created_at=_now()))
            return True
        except sa.exc.IntegrityError:
            return False

    # -- jobs -----------------------------------------------------------------------------------
    def create_job(self, project: str, model: str, version: str, request: dict) -> str:
        job_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(job_id=job_id, project=project, model_name=model, version_name=version,
                                              status="queued", request=request, created_at=_now()))
        return job_id

    def update_job(self, job_id: str, **values) -> None:
        if values.get("status") in ("done", "failed"):
            values["finished_at"] = _now()
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(**values))

    def get_job(self, project: str, job_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id, jobs.c.project == project)).first()
        return dict(row._mapping) if row is not None else None

    def fail_unfinished_jobs(self) -> int:
        """At start-up: jobs a previous server process left queued or running will never finish."""
        with self.engine.begin() as conn:
            done = conn.execute(jobs.update().where(jobs.c.status.in_(["queued", "running"]))
                                .values(status="failed", error="the server restarted before this evaluation "
                                        "finished; request it again", finished_at=_now()))
        return done.rowcount


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the upload writer
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
