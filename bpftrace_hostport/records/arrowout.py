"""Record batches of the recording's columns, built from numpy buffers with nanoarrow.

The tracer writes its recording with nanoarrow (Apache Arrow's small C library: about 1 MB of
memory) rather than pyarrow (about 40 MB once it writes), so that `trace --record` stays as
light as the other outputs. Readers use pyarrow; `pyarrow.record_batch(batch)` takes these
batches as they are (the Arrow C data interface), which is how the JSON-lines reader and the
tests turn them into pyarrow batches.

Each column is made from one numpy array (and, where a value may be missing, a mask): no
Python object per row. A column left out of a batch is all nulls.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

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


def column(name: str, values, valid: Optional[np.ndarray] = None):
    """One column of `name`'s type from a numpy array (addr: 16-byte rows; string: see
    strings()); `valid` marks the rows that hold a value."""
    na = _na()
    kind = _KIND[name]
    n = len(values[0]) - 1 if kind == "string" else len(values)
    bitmap, nulls = _validity(valid, n)
    typ = column_types()[name]
    if kind == "bool":
        data = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    elif kind == "addr":
        data = np.ascontiguousarray(values).view(np.uint8)
    elif kind == "string":
        offsets, data = values
        return na.c_array_from_buffers(typ, n, [bitmap, offsets, data],
                                       null_count=nulls, validation_level="minimal")
    else:
        data = np.ascontiguousarray(values, dtype=_DTYPE[kind])
    return na.c_array_from_buffers(typ, n, [bitmap, data], null_count=nulls,
                                   validation_level="minimal")


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


def _nulls(name: str, n: int):
    """A column of n nulls."""
    kind = _KIND[name]
    if kind == "string":
        return column(name, *strings(np.full(n, -1), ()))
    dtype = {"bool": bool, "addr": "V16"}.get(kind) or _DTYPE[kind]
    return column(name, np.zeros(n, dtype), np.zeros(n, bool))


def batch(kind: str, n: int, columns: Dict[str, object]):
    """n rows of one record kind: the given columns (from column()), every other one null."""
    na = _na()
    record = column("record", *strings(np.zeros(n, np.intp), [kind]))
    children = [record] + [columns[name] if name in columns else _nulls(name, n)
                           for name, _, _ in RECORDING_COLUMNS[1:]]
    return na.c_array_from_buffers(schema(), n, [None], children=children, validation_level="none")


class StreamWriter:
    """An Arrow IPC stream onto a file object. A failed write raises the file's own OSError
    (nanoarrow reports it as its own exception; the file keeps the original)."""

    def __init__(self, file):
        from nanoarrow.ipc import StreamWriter as _W
        self._file = _Writes(file)
        self._w = _W.from_writable(self._file)
        self._started = False

    def write(self, rb) -> None:
        try:
            self._w.write_array(rb, write_schema=not self._started)
        except Exception:
            self._file.reraise()
            raise
        self._started = True

    def close(self) -> None:
        """The end-of-stream marker (after at least one batch: the first one carries the schema)."""
        try:
            self._w.close()
        except Exception:
            self._file.reraise()
            raise


class _Writes:
    """write() that writes everything or keeps the OSError for StreamWriter to raise."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                done += self.file.write(view[done:]) or 0
        except OSError as e:
            self.error = e
            raise
        return len(view)

    def reraise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e
