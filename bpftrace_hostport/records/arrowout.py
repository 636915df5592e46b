"""Record batches of the recording's columns, from numpy buffers, and the IPC stream of them.

Each column is one numpy array (and, where a value may be missing, a mask): no Python object
per row, and no array object per column either. The tracer encodes a batch's buffers straight
into an Arrow IPC record batch message (ipc_message): building a nanoarrow array per column
and letting a writer make the message cost about 0.5 ms per batch whatever its size, four
times a second. Only the stream's schema message comes from nanoarrow (Apache Arrow's small C
library: about 1 MB of memory, against about 40 MB for pyarrow once it writes), so that
`trace --record` stays as light as the other outputs. Readers use pyarrow;
`pyarrow.record_batch(batch)` takes a Batch (or a Column) as it is, through the Arrow C data
interface (nanoarrow builds the arrays then), which is how the JSON-lines reader and the tests
turn them into pyarrow batches. A column left out of a batch is all nulls.
"""
from __future__ import annotations

import functools
import struct
from typing import Dict, List, Optional, Sequence

import numpy as np

from bpftrace_hostport.records.schema import RECORDING_COLUMNS, RECORDING_MAGIC, SCHEMA_VERSION


def _na():
    import nanoarrow as na          # imported when a recording is written, not before
    return na


@functools.lru_cache(maxsize=None)
def _types() -> Dict[str, object]:
    na = _na()
    return {"string": na.string, "timestamp": lambda nullable: na.timestamp("ns", timezone="UTC", nullable=nullable),
            "uint8": na.uint8, "uint16": na.uint16, "uint64": na.uint64, "bool": na.bool_,
            "float64": na.float64, "addr": lambda nullable: na.fixed_size_binary(16, nullable=nullable)}


@functools.lru_cache(maxsize=None)
def column_types() -> Dict[str, object]:
    """Each column's type as a C schema, made once (converting it per batch costs more than
    building the column)."""
    na = _na()
    return {name: na.c_schema(_types()[kind](nullable=nullable)) for name, kind, nullable in RECORDING_COLUMNS}


@functools.lru_cache(maxsize=None)
def schema():
    """The recording's schema as nanoarrow writes it, with the format and version metadata."""
    na = _na()
    s = na.c_schema(na.struct({name: na.Schema(t) for name, t in column_types().items()}, nullable=False))
    return s.modify(metadata={"format": RECORDING_MAGIC, "schema": str(SCHEMA_VERSION)})


_KIND = {name: kind for name, kind, _ in RECORDING_COLUMNS}
_DTYPE = {"timestamp": np.int64, "uint8": np.uint8, "uint16": np.uint16, "uint64": np.uint64,
          "float64": np.float64}


def _validity(valid: Optional[np.ndarray], n: int):
    """(bitmap or None, null count) for a mask of valid rows (None: all valid)."""
    if valid is None:
        return None, 0
    nulls = n - int(np.count_nonzero(valid))
    if nulls == 0:
        return None, 0
    return np.packbits(valid, bitorder="little"), nulls


class Column:
    """One column's Arrow buffers as numpy arrays: (validity bitmap or None, data) or, for
    strings, (validity or None, int32 offsets, bytes). Nothing is built per column until a
    consumer asks: the recording encodes the buffers straight into IPC messages (ipc_message),
    and pyarrow takes a column or a batch through the Arrow C data interface (nanoarrow)."""

    __slots__ = ("name", "n", "nulls", "buffers")

    def __init__(self, name: str, n: int, nulls: int, buffers: tuple):
        self.name, self.n, self.nulls, self.buffers = name, n, nulls, buffers

    def to_nanoarrow(self):
        return _na().c_array_from_buffers(column_types()[self.name], self.n, list(self.buffers),
                                          null_count=self.nulls, validation_level="minimal")

    def __arrow_c_array__(self, requested_schema=None):
        return self.to_nanoarrow().__arrow_c_array__(requested_schema)


def column(name: str, values, valid: Optional[np.ndarray] = None) -> Column:
    """One column of `name`'s type from a numpy array (addr: 16-byte rows; string: see
    strings()); `valid` marks the rows that hold a value."""
    kind = _KIND[name]
    n = len(values[0]) - 1 if kind == "string" else len(values)
    bitmap, nulls = _validity(valid, n)
    if kind == "bool":
        data = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    elif kind == "addr":
        data = np.ascontiguousarray(values).view(np.uint8)
    elif kind == "string":
        offsets, data = values
        return Column(name, n, nulls, (bitmap, offsets, data))
    else:
        data = np.ascontiguousarray(values, dtype=_DTYPE[kind])
    return Column(name, n, nulls, (bitmap, data))


def strings(codes: np.ndarray, values: Sequence[str]) -> "tuple":
    """The string column whose row i is values[codes[i]] (codes < 0: null), built without a
    Python step per row. Returns ((offsets, bytes), valid)."""
    codes = np.asarray(codes, dtype=np.intp)
    valid = codes >= 0
    enc = np.array([v.encode("utf-8", "surrogatepass") for v in values] + [b""], dtype=object)
    lens = np.array([len(b) for b in enc], dtype=np.int32)
    c = np.where(valid, codes, len(enc) - 1)
    row_len = lens[c]
    offsets = np.zeros(len(c) + 1, dtype=np.int32)
    np.cumsum(row_len, out=offsets[1:])
    if not offsets[-1]:
        data = np.zeros(0, np.uint8)
    elif (c == c[0]).all():                       # one value throughout (the `record` kind)
        data = np.tile(np.frombuffer(enc[c[0]], dtype=np.uint8), len(c))
    else:                                          # bytes.join: one C loop over the rows
        data = np.frombuffer(b"".join(enc[c].tolist()), dtype=np.uint8)
    return (offsets, data), valid


def _nulls(name: str, n: int) -> Column:
    """A column of n nulls: a zero bitmap, and zero values (or empty strings) under it, made
    directly (through column() and strings() it costs about ten times as much: two such
    columns in every flow batch)."""
    kind = _KIND[name]
    bitmap = np.zeros((n + 7) // 8, np.uint8)
    if kind == "string":
        return Column(name, n, n, (bitmap, np.zeros(n + 1, np.int32), np.zeros(0, np.uint8)))
    size = len(bitmap) if kind == "bool" else n * (16 if kind == "addr" else np.dtype(_DTYPE[kind]).itemsize)
    return Column(name, n, n, (bitmap, np.zeros(size, np.uint8)))


class Batch:
    """n rows in the recording's columns (schema order): what StreamWriter writes, and what
    pyarrow.record_batch() takes (as a struct array, through nanoarrow)."""

    __slots__ = ("length", "columns")

    def __init__(self, length: int, columns: List[Column]):
        self.length, self.columns = length, columns

    def to_nanoarrow(self):
        return _na().c_array_from_buffers(schema(), self.length, [None],
                                          children=[c.to_nanoarrow() for c in self.columns],
                                          validation_level="none")

    def __arrow_c_array__(self, requested_schema=None):
        return self.to_nanoarrow().__arrow_c_array__(requested_schema)


def batch(kind: str, n: int, columns: Dict[str, Column]) -> Batch:
    """n rows of one record kind: the given columns (from column()), every other one null."""
    record = column("record", *strings(np.zeros(n, np.intp), [kind]))
    return Batch(n, [record] + [columns[name] if name in columns else _nulls(name, n)
                                for name, _, _ in RECORDING_COLUMNS[1:]])


# -- the IPC stream, written directly --------------------------------------------------------
# A record batch message is a small flatbuffer (Message -> RecordBatch: the row count, a
# FieldNode {length, null_count} per column, a Buffer {offset, length} per buffer) and the
# body, the buffers back to back at 8-byte boundaries. The schema is fixed, so the flatbuffer
# is always the same shape: it is laid out once (_TEMPLATE) and each batch only fills in its
# numbers, instead of building an array object per column and a writer's message per batch.
# The schema message at the start of a stream comes from nanoarrow, once.

_NODES = len(RECORDING_COLUMNS)
_BUFFERS = sum(3 if kind == "string" else 2 for _, kind, _ in RECORDING_COLUMNS)
_T_MSG, _VT_MSG, _T_RB, _VT_RB = 16, 4, 48, 36
_NODES_AT = 80                                  # the FieldNode structs (count just before)
_BUFFERS_AT = _NODES_AT + 16 * _NODES + 8       # the Buffer structs (count just before)
_META_SIZE = _BUFFERS_AT + 16 * _BUFFERS        # a multiple of 8: the body starts aligned
_PAD = bytes(8)
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _message_template() -> bytearray:
    """The encapsulated message prefix (continuation marker, metadata size) and the flatbuffer,
    with the row count, body length, nodes and buffers left zero. Offsets in a flatbuffer are
    relative: a uoffset points forward from where it is stored, a table's soffset back to its
    vtable (vtable = table - soffset)."""
    fb = bytearray(_META_SIZE)
    struct.pack_into("<I", fb, 0, _T_MSG)                                   # root: the Message
    # Message vtable: its size, the table's size, then fields version, header_type, header,
    # bodyLength at these offsets in the table.
    struct.pack_into("<6H", fb, _VT_MSG, 12, 20, 16, 18, 4, 8)
    struct.pack_into("<iI", fb, _T_MSG, _T_MSG - _VT_MSG, _T_RB - (_T_MSG + 4))
    struct.pack_into("<hB", fb, _T_MSG + 16, 4, 3)          # MetadataVersion V5, RecordBatch
    # RecordBatch vtable: fields length, nodes, buffers (no compression).
    struct.pack_into("<5H", fb, _VT_RB, 10, 24, 8, 4, 16)
    struct.pack_into("<iI", fb, _T_RB, _T_RB - _VT_RB, (_NODES_AT - 4) - (_T_RB + 4))
    struct.pack_into("<I", fb, _T_RB + 16, (_BUFFERS_AT - 4) - (_T_RB + 16))
    struct.pack_into("<I", fb, _NODES_AT - 4, _NODES)
    struct.pack_into("<I", fb, _BUFFERS_AT - 4, _BUFFERS)
    return bytearray(struct.pack("<Ii", 0xFFFFFFFF, _META_SIZE)) + fb


_TEMPLATE = _message_template()
_AT = 8                                          # where the flatbuffer starts in the message


def ipc_message(b: Batch) -> bytes:
    """The batch as one encapsulated IPC record batch message (metadata and body)."""
    msg = bytearray(_TEMPLATE)
    nodes = np.ndarray((_NODES, 2), "<i8", msg, _AT + _NODES_AT)
    bufs = np.ndarray((_BUFFERS, 2), "<i8", msg, _AT + _BUFFERS_AT)
    parts = [msg]
    at = i = 0
    for j, c in enumerate(b.columns):
        nodes[j] = (c.n, c.nulls)
        for buf in c.buffers:
            size = 0 if buf is None else buf.nbytes
            bufs[i] = (at, size)
            i += 1
            if size:
                parts.append(buf.data if buf.flags.c_contiguous else np.ascontiguousarray(buf).data)
                if size % 8:
                    parts.append(_PAD[:8 - size % 8])
                at += (size + 7) & ~7
    struct.pack_into("<q", msg, _AT + _T_RB + 8, b.length)
    struct.pack_into("<q", msg, _AT + _T_MSG + 8, at)
    return b"".join(parts)


def message_size(b: Batch) -> int:
    """How many bytes ipc_message(b) makes (the writer's --max-size keeps its bound with it)."""
    return len(_TEMPLATE) + sum(((0 if buf is None else buf.nbytes) + 7) & ~7
                                for c in b.columns for buf in c.buffers)


@functools.lru_cache(maxsize=None)
def schema_message() -> bytes:
    """The stream's first message, the schema (with its metadata), as nanoarrow writes it."""
    import io
    from nanoarrow.ipc import StreamWriter as _W
    out = io.BytesIO()
    w = _W.from_writable(out)
    w.write_array(batch("meta", 0, {}).to_nanoarrow(), write_schema=True)
    data = out.getvalue()
    if data[:4] != b"\xff\xff\xff\xff":
        raise RuntimeError("nanoarrow wrote an IPC stream without continuation markers")
    return data[:8 + struct.unpack_from("<i", data, 4)[0]]


class StreamWriter:
    """An Arrow IPC stream onto a file object: the schema, then a message per batch, each in
    one write (a torn last message is what a reader drops). A failed write raises the file's
    own OSError."""

    def __init__(self, file):
        self._file = file
        self._started = False

    def write(self, b: Batch) -> None:
        msg = ipc_message(b)
        if not self._started:
            msg = schema_message() + msg
        _write_all(self._file, msg)
        self._started = True

    def close(self) -> None:
        """The end-of-stream marker (after the schema, which a stream without a batch gets here)."""
        _write_all(self._file, (b"" if self._started else schema_message()) + EOS)
        self._started = True


def _write_all(file, data) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += file.write(view[done:]) or 0
