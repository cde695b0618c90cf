"""Checking an uploaded chunk before anything is stored: an Arrow IPC stream of trace rows.

What the tracing core writes is a flat table: an ``input_id`` string column and columns of numbers,
strings, booleans, binary, timestamps (``logged_at`` of rows traced without labels) or (nested) lists
of those. Anything else (another format, a truncated
stream, a table that decompresses beyond the limit, odd column names) is refused with a 4xx status.
"""

from __future__ import annotations

import re

import pyarrow as pa

_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_COLUMNS = 256


class UploadError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _allowed(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _allowed(kind.value_type)
    return (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) or pa.types.is_null(kind)
            or pa.types.is_timestamp(kind))


def read_chunk(body: bytes, max_bytes: int) -> pa.Table:
    """The table in ``body``; UploadError (400, or 413 when it decompresses beyond ``max_bytes``)."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        schema = reader.schema
        _check_schema(schema)
        batches, total = [], 0
        for batch in reader:  # one batch at a time, so a decompression bomb stops at the first that is too big
            total += batch.nbytes
            if total > max_bytes:
                raise UploadError(f"chunk decompresses to more than {max_bytes} bytes", 413)
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=schema)
        table.validate(full=True)
    except UploadError:
        raise
    except (pa.ArrowException, MemoryError, ValueError, OSError) as exc:
        raise UploadError(f"the body is not a valid Arrow IPC stream: {exc}") from None
    return table


def _check_schema(schema: pa.Schema) -> None:
    names = schema.names
    if len(names) > MAX_COLUMNS:
        raise UploadError(f"a chunk has at most {MAX_COLUMNS} columns, this one {len(names)}")
    if len(set(names)) != len(names):
        raise UploadError("duplicate column names in chunk")
    bad = [n for n in names if not _COLUMN.match(n)]
    if bad:
        raise UploadError(f"invalid column name(s) {bad[:5]}: use letters, digits and '_'")
    if "input_id" not in names or not pa.types.is_string(schema.field("input_id").type):
        raise UploadError("a chunk needs an 'input_id' string column")
    unsupported = [f"{f.name}: {f.type}" for f in schema if not _allowed(f.type)]
    if unsupported:
        raise UploadError(f"unsupported column type(s) {unsupported[:5]}")
