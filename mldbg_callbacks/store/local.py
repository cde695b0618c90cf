"""LocalStore: the embedded default store, a directory of Hive-partitioned Parquet files.

The directory is a local path or any fsspec URL (``s3://bucket/runs``, ``gs://…``, ``memory://…``; the
URL's fsspec driver, e.g. s3fs, must be installed), so many training nodes can write to one run.

Layout (Parquet is the contract: DuckDB, pandas, Spark and Polars read a run without this package)::

    <root>/<model>/<version>/_meta.json                       task, classes, ... of the traces
    <root>/<model>/<version>/traces/dataset_type=<t>/n_epoch=<e>/rank=<r>/part-<k>-<uid>.parquet
    <root>/<model>/<version>/traces/dataset_type=<t>/n_epoch=<e>/rank=<r>/_COMMITTED
    <root>/<model>/<version>/results/<result_name>/{result.json, samples.parquet, ...}

Every local file is written under a temporary name, fsync'ed and renamed (an object store publishes an
object only once it is complete), so a reader never sees half a file. Parts spilled before their epoch
commits carry a ``_pending-`` prefix, which Parquet readers skip; committing renames them and writes
``_COMMITTED`` (JSON): the parts a rank made durable and the world size it ran with. This package's
reader uses only listed parts, so parts of an epoch still running (or of a crashed run) stay invisible.
An epoch is *complete* when as many ranks committed as the largest world size recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NoTracesError
from .names import validate_name

COMMIT_MARKER = "_COMMITTED"
PENDING_PREFIX = "_pending-"
META_FILE = "_meta.json"
# The tracing worker shares the machine with training: zstd level 1, a dictionary only for labels
# (ids are unique per epoch) and statistics only on scalar columns (min/max of 1 KB vectors are useless)
# cost a fraction of the CPU of the defaults at the same size (benchmarks/overhead.py).
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1, "use_dictionary": ["label"],
                   "write_statistics": ["input_id", "label"]}


def store_path(root: str | os.PathLike) -> Path:
    """A local directory as an absolute ``Path``; any other fsspec URL (``s3://``, ``gs://``, ``memory://``…)
    as a ``UPath`` (universal_pathlib), which has the same API over the URL's file system."""
    if not is_local_path(root):  # already a UPath
        return root
    text = os.fspath(root)
    if "://" in text and not text.startswith("file://"):
        from upath import UPath

        return UPath(text)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def is_local_path(path: str | os.PathLike) -> bool:
    """False for a UPath on an object store or any other non-local fsspec file system."""
    return getattr(path, "protocol", "") in ("", "file", "local")


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(target)`` so that no reader sees half a file. Locally: a temporary name in the
    same directory, fsync, rename. Object stores make a single object visible only once it is complete,
    so there ``write`` gets the object's binary handle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_local_path(path):
        with path.open("wb") as handle:
            write(handle)
        return
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, default=str).encode("utf-8")

    def write(target: Any) -> None:
        if isinstance(target, str):
            with open(target, "wb") as handle:
                handle.write(text)
        else:
            target.write(text)

    _atomic_write(path, write)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_parquet(path: Path, **kwargs: Any) -> pa.Table:
    # partitioning=None: some pyarrow versions add the hive keys of the path as columns
    if is_local_path(path):
        return pq.read_table(path, partitioning=None, **kwargs)
    return pq.read_table(path.path, filesystem=path.fs, partitioning=None, **kwargs)


def _parquet_columns(path: Path) -> list[str]:
    return (pq.read_schema(path) if is_local_path(path) else pq.read_schema(path.path, filesystem=path.fs)).names


def _rename(source: Path, target: Path) -> None:
    if is_local_path(source):
        os.replace(source, target)
    else:
        source.rename(target)


def _remove_tree(path: Path) -> None:
    if is_local_path(path):
        shutil.rmtree(path)
    else:
        path.fs.rm(path.path, recursive=True)


@dataclass(frozen=True)
class Partition:
    """One (dataset_type, n_epoch) of a run as a reader sees it."""

    dataset_type: str
    n_epoch: int
    ranks_committed: tuple[int, ...]
    ranks_pending: tuple[int, ...]  # rank folders with files but no commit marker
    world_size: int
    rows: int

    @property
    def complete(self) -> bool:
        return len(self.ranks_committed) >= self.world_size and not self.ranks_pending


class LocalStore:
    """A store rooted at a local directory. ``LocalStore(root).run(model, version)`` is a trace sink."""

    def __init__(self, root: str | os.PathLike):
        self.root = store_path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def run(self, model_name: str, version_name: str) -> "RunWriter":
        return RunWriter(self, model_name, version_name)

    def version_dir(self, model_name: str, version_name: str) -> Path:
        return self.root / validate_name(model_name, "model_name") / validate_name(version_name, "version_name")

    # -- listing --------------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list_versions(self, model_name: str) -> list[str]:
        model_dir = self.root / validate_name(model_name, "model_name")
        if not model_dir.is_dir():
            return []
        return sorted(p.name for p in model_dir.iterdir() if (p / META_FILE).is_file())

    def read_meta(self, model_name: str, version_name: str) -> dict:
        path = self.version_dir(model_name, version_name) / META_FILE
        if not path.is_file():
            raise NoTracesError(self._missing_message(model_name, version_name))
        return _read_json(path)

    def partitions(self, model_name: str, version_name: str) -> list[Partition]:
        """Every (dataset_type, n_epoch) with at least one rank folder, sorted."""
        traces = self.version_dir(model_name, version_name) / "traces"
        found = []
        for dataset_dir in sorted(traces.glob("dataset_type=*")):
            for epoch_dir in dataset_dir.glob("n_epoch=*"):
                committed, pending, world, rows = [], [], 1, 0
                for rank_dir in epoch_dir.glob("rank=*"):
                    rank = int(rank_dir.name.split("=", 1)[1])
                    marker = rank_dir / COMMIT_MARKER
                    if marker.is_file():
                        info = _read_json(marker)
                        committed.append(rank)
                        world = max(world, int(info.get("world_size", 1)))
                        rows += int(info.get("rows", 0))
                    elif any(rank_dir.glob("*.parquet")):  # pending parts of an unfinished epoch
                        pending.append(rank)
                found.append(Partition(dataset_dir.name.split("=", 1)[1], int(epoch_dir.name.split("=", 1)[1]),
                                       tuple(sorted(committed)), tuple(sorted(pending)), world, rows))
        return sorted(found, key=lambda p: (p.dataset_type, p.n_epoch))

    def partitions_frame(self, model_name: str, version_name: str) -> pd.DataFrame:
        rows = [dict(dataset_type=p.dataset_type, n_epoch=p.n_epoch, rows=p.rows, complete=p.complete,
                     ranks_committed=len(p.ranks_committed), world_size=p.world_size)
                for p in self.partitions(model_name, version_name)]
        return pd.DataFrame(rows, columns=["dataset_type", "n_epoch", "rows", "complete", "ranks_committed",
                                           "world_size"])

    # -- reading --------------------------------------------------------------------------------
    def read_traces(self, model_name: str, version_name: str, dataset_type: str,
                    epochs: Iterable[int], exclude_columns: Iterable[str] = ()) -> pa.Table:
        """Committed rows of the given epochs, with ``n_epoch`` and ``rank`` columns added.

        ``exclude_columns`` are not read at all (e.g. ``features`` when only scores are needed).
        """
        exclude = set(exclude_columns)
        base = self.version_dir(model_name, version_name) / "traces" / f"dataset_type={validate_name(dataset_type, 'dataset_type')}"
        tables = []
        for epoch in epochs:
            for rank_dir in sorted((base / f"n_epoch={int(epoch)}").glob("rank=*")):
                marker = rank_dir / COMMIT_MARKER
                if not marker.is_file():
                    continue
                rank = int(rank_dir.name.split("=", 1)[1])
                for part in _read_json(marker)["parts"]:
                    path = rank_dir / part
                    columns = [c for c in _parquet_columns(path) if c not in exclude] if exclude else None
                    table = _read_parquet(path, columns=columns)
                    table = table.append_column("n_epoch", pa.array([int(epoch)] * table.num_rows, pa.int64()))
                    tables.append(table.append_column("rank", pa.array([rank] * table.num_rows, pa.int64())))
        if not tables:
            raise NoTracesError(f"no committed traces for {model_name}/{version_name} dataset_type={dataset_type} "
                                f"epochs={list(epochs)}")
        return pa.concat_tables(tables, promote_options="permissive")

    def _missing_message(self, model_name: str, version_name: str) -> str:
        models = self.list_models()
        if model_name not in models:
            return (f"no traces for model_name={model_name!r} in {self.root}; models there: "
                    f"{models or 'none'}. Check MLD_HOME / store= and the names given to the tracer.")
        return (f"no traces for version_name={version_name!r} of model {model_name!r} in {self.root}; "
                f"versions there: {self.list_versions(model_name) or 'none'}")

    # -- results --------------------------------------------------------------------------------
    def results_dir(self, model_name: str, version_name: str) -> Path:
        return self.version_dir(model_name, version_name) / "results"

    def save_result(self, model_name: str, version_name: str, result_name: str, meta: dict,
                    tables: dict[str, pd.DataFrame]) -> Path:
        """Persist a result: each table as Parquet, then ``result.json`` last (its presence = complete)."""
        target = self.results_dir(model_name, version_name) / validate_name(result_name, "result_name")
        target.mkdir(parents=True, exist_ok=True)
        for name, frame in tables.items():
            table = pa.Table.from_pandas(frame, preserve_index=False)
            _atomic_write(target / f"{name}.parquet", lambda tmp, t=table: pq.write_table(t, tmp, **PARQUET_OPTIONS))
        _write_json(target / "result.json", {**meta, "tables": sorted(tables)})
        return target

    def list_results(self, model_name: str, version_name: str) -> list[dict]:
        base = self.results_dir(model_name, version_name)
        if not base.is_dir():
            return []
        found = [_read_json(p / "result.json") for p in base.iterdir() if (p / "result.json").is_file()]
        return sorted(found, key=lambda meta: (meta.get("created_at", ""), meta.get("result_name", "")))

    def load_result(self, model_name: str, version_name: str, result_name: str) -> tuple[dict, dict[str, pd.DataFrame]]:
        target = self.results_dir(model_name, version_name) / validate_name(result_name, "result_name")
        if not (target / "result.json").is_file():
            names = [m["result_name"] for m in self.list_results(model_name, version_name)]
            raise NoTracesError(f"no result named {result_name!r} for {model_name}/{version_name}; "
                                f"results there: {names or 'none'}")
        meta = _read_json(target / "result.json")
        tables = {name: _read_parquet(target / f"{name}.parquet").to_pandas() for name in meta["tables"]}
        return meta, tables

    def delete_result(self, model_name: str, version_name: str, result_name: str) -> None:
        _remove_tree(self.results_dir(model_name, version_name) / validate_name(result_name, "result_name"))


class RunWriter:
    """The write side of one model version: a TraceCore sink."""

    def __init__(self, store: LocalStore, model_name: str, version_name: str):
        self.store = store
        self.model_name = model_name
        self.version_name = version_name
        self.path = store.version_dir(model_name, version_name)
        self._part_seq = 0
        self._writer_id = uuid.uuid4().hex[:8]

    def __setstate__(self, state: dict) -> None:
        # A pickled/deep-copied writer (e.g. a tracer copied into a spawned worker) must never name its
        # parts like the original's, or one would overwrite the other's files in the same rank folder.
        self.__dict__.update(state)
        self._writer_id = uuid.uuid4().hex[:8]

    def write_meta(self, meta: dict) -> None:
        path = self.path / META_FILE
        existing = _read_json(path) if path.is_file() else {}
        if existing.get("task") not in (None, meta.get("task")):
            raise ValueError(f"{self.model_name}/{self.version_name} already holds {existing['task']} traces; "
                             f"use another version_name for {meta.get('task')} traces")
        merged = {**existing, **{k: v for k, v in meta.items() if v is not None},
                  "model_name": self.model_name, "version_name": self.version_name}
        if merged != existing:
            _write_json(path, merged)

    def _rank_dir(self, dataset_type: str, n_epoch: int, rank: int) -> Path:
        return (self.path / "traces" / f"dataset_type={validate_name(dataset_type, 'dataset_type')}"
                / f"n_epoch={int(n_epoch)}" / f"rank={int(rank)}")

    def write_part(self, dataset_type: str, n_epoch: int, rank: int, table: pa.Table, name: str | None = None) -> str:
        """Write a part under a hidden name (``_pending-…``): Parquet readers that do not look at
        ``_COMMITTED`` (pyarrow.dataset, DuckDB, Spark skip ``_``-prefixed files) never see an
        uncommitted part. ``commit`` renames it to its final name. ``name``: a fixed part name (the
        server names parts by chunk id, so an upload retried writes the same file)."""
        if name is None:
            self._part_seq += 1
            name = f"part-{self._part_seq:05d}-{self._writer_id}.parquet"
        _atomic_write(self._rank_dir(dataset_type, n_epoch, rank) / f"{PENDING_PREFIX}{name}",
                      lambda tmp: pq.write_table(table, tmp, **PARQUET_OPTIONS))
        return name

    def committed_parts(self, dataset_type: str, n_epoch: int, rank: int) -> list[str]:
        marker = self._rank_dir(dataset_type, n_epoch, rank) / COMMIT_MARKER
        return _read_json(marker)["parts"] if marker.is_file() else []

    def commit(self, dataset_type: str, n_epoch: int, rank: int, parts: list[str], rows: int,
               world_size: int) -> None:
        rank_dir = self._rank_dir(dataset_type, n_epoch, rank)
        for part in parts:
            pending = rank_dir / f"{PENDING_PREFIX}{part}"
            if pending.exists():  # absent when a previous commit of the same parts got this far
                _rename(pending, rank_dir / part)
        marker = rank_dir / COMMIT_MARKER
        rank_dir.mkdir(parents=True, exist_ok=True)
        previous = _read_json(marker) if marker.is_file() else {"parts": [], "rows": 0}
        new_parts = [p for p in parts if p not in previous["parts"]]
        _write_json(marker, {"parts": previous["parts"] + new_parts,
                             "rows": int(previous["rows"]) + int(rows),
                             "world_size": max(int(world_size), int(previous.get("world_size", 1)))})
