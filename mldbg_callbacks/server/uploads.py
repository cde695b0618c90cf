"""Checking an uploaded chunk before anything is stored: an Arrow IPC stream of trace rows.

What the tracing core writes is a flat table: an ``input_id`` string column and columns of numbers,
strings, booleans, binary, timestamps (``logged_at`` of rows traced without labels) or (nested) lists
of those. Anything else (another format, a truncated stream, a table that decompresses beyond the limit
or holds absurdly many values, odd column names) is refused with a 4xx status, before the memory it
claims is taken.
"""

from __future__ import annotations

import re
import struct

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


def read_chunk(body: bytes, max_bytes: int, max_values: int) -> pa.Table:
    """The table in ``body``; UploadError: 400, or 413 when it would decompress beyond ``max_bytes`` or
    hold more than ``max_values`` values (nested list values included).

    Both bounds are checked before the memory is taken: each record batch's decompressed size is read
    from its metadata, so a small body that inflates to gigabytes (a decompression bomb) is refused
    without inflating it, and list columns whose declared lengths are absurd (a list of nulls needs no
    buffer, whatever its length) are refused before anything iterates over them.
    """
    try:
        messages = pa.ipc.MessageReader.open_stream(pa.py_buffer(body))
        schema = pa.ipc.read_schema(messages.read_next_message())
        _check_schema(schema)
        batches, total_bytes, total_values = [], 0, 0
        for message in messages:
            if message.type != "record batch":
                raise UploadError(f"a chunk holds record batches only, not a {message.type} message")
            total_bytes += _decompressed_bytes(message)
            if total_bytes > max_bytes:
                raise UploadError(f"chunk decompresses to more than {max_bytes} bytes", 413)
            batch = pa.ipc.read_record_batch(message, schema)
            total_values += sum(_values(column) for column in batch.columns)
            if total_values > max_values:
                raise UploadError(f"chunk holds more than {max_values} values (nested lists included)", 413)
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=schema)
        table.validate(full=True)
    except UploadError:
        raise
    except (pa.ArrowException, MemoryError, ValueError, OSError, EOFError, struct.error) as exc:
        raise UploadError(f"the body is not a valid Arrow IPC stream: {exc}") from None
    return table


def _values(array: pa.Array) -> int:
    """Values in ``array`` and, for lists, in everything their children hold (used or not)."""
    if isinstance(array, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        return len(array) + _values(array.values)
    return len(array)


# Arrow IPC metadata is a flatbuffer (format/Message.fbs) that pyarrow does not expose; these are the
# field numbers read here. A table's field i is found through its vtable; struct vectors are inline.
_MESSAGE_HEADER, _BATCH_BUFFERS, _BATCH_COMPRESSION = 2, 2, 3
_UNCOMPRESSED = -1  # a compressed body's buffer prefix saying "stored as is"


def _decompressed_bytes(message: pa.ipc.Message) -> int:
    """The size of a record batch message's body once decompressed, without decompressing it: each
    buffer of a compressed body starts with its uncompressed length (int64); an uncompressed body is
    its own size. Offsets outside the metadata or the body raise (struct.error, UploadError)."""
    meta = message.metadata.to_pybytes()
    body = message.body
    body_size = body.size if body is not None else 0
    batch = _field_target(meta, _root(meta), _MESSAGE_HEADER)
    if batch is None:
        raise UploadError("a record batch message without its header")
    if _field_position(meta, batch, _BATCH_COMPRESSION) is None:
        return body_size
    buffers = _field_target(meta, batch, _BATCH_BUFFERS)
    if buffers is None:
        return body_size
    (count,) = struct.unpack_from("<I", meta, buffers)
    total = 0
    for i in range(count):
        offset, length = struct.unpack_from("<qq", meta, buffers + 4 + 16 * i)
        if length == 0:
            continue
        if offset < 0 or length < 8 or offset + length > body_size:
            raise UploadError("a record batch buffer lies outside the message body")
        (size,) = struct.unpack("<q", body[offset:offset + 8].to_pybytes())
        if size < _UNCOMPRESSED:
            raise UploadError("a record batch buffer declares a negative size")
        total += length - 8 if size == _UNCOMPRESSED else size
    return total


def _root(meta: bytes) -> int:
    return struct.unpack_from("<I", meta, 0)[0]


def _field_position(meta: bytes, table: int, field: int) -> int | None:
    """Where field ``field`` of the flatbuffer table at ``table`` is stored (None: absent, its default)."""
    vtable = table - struct.unpack_from("<i", meta, table)[0]
    (vtable_size,) = struct.unpack_from("<H", meta, vtable)
    if 4 + 2 * field >= vtable_size:
        return None
    (offset,) = struct.unpack_from("<H", meta, vtable + 4 + 2 * field)
    return table + offset if offset else None


def _field_target(meta: bytes, table: int, field: int) -> int | None:
    """The table or vector that field ``field`` (an offset) points to."""
    position = _field_position(meta, table, field)
    return None if position is None else position + struct.unpack_from("<I", meta, position)[0]


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
