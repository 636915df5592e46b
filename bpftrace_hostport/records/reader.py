"""Reading captures, recordings (records/recording.py) and JSON lines alike -> Capture.

`load` reads whole files into the DataFrames of capture.py; `iter_flow_batches` streams one
file's flows as Arrow record batches in the recording's columns, for files too big for that.

DataFrame columns: `ts` datetime64[ns, UTC]; integers int64, the nullable ones (`packets`,
`bytes`) pandas Int64; `latency_us` float64 with NaN for null; booleans bool; strings
(addresses, proto, hook, names, node, source) plain str/None in object columns, not
categoricals (report.py factorizes what it groups). Rows come file by file, in file order.

A file that ended badly is read up to what is whole, with one note and `truncated` set: a
torn last batch or a cut last line (the tracer was killed or the disk filled), a recording
without its `end` row or whose counts disagree, a JSON-lines capture without a summary.
Anything else wrong is a UserError naming the file (and line), never a traceback.
"""
from __future__ import annotations

import glob
import math
import io
import os
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records.batch import ADDR, FlowBatch, ns_to_iso, unpack_addr
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records import check
from bpftrace_hostport.records.capture import Capture
from bpftrace_hostport.records.schema import (
    CAPTURE, RECORDING_MAGIC, RECORDS, SCHEMA_VERSION, Field, field_names, recording_schema)

STREAM_MAGIC = b"\xff\xff\xff\xff"        # an Arrow IPC stream's first message continuation
STDIN_NAME = "<stdin>"
MEASURES = ("latency", "packets", "misses", "drops")
_CHUNK = 65536                            # JSON records typed per step: bounds memory


# -------------------------------------------------------------------------------- entry points

def load(paths: Sequence[str], *, stdin=None) -> Capture:
    """Every file of `paths` ("-": standard input, bytes; a directory: its *.arrow and *.jsonl
    files sorted by name) read and put together."""
    if not paths:
        raise UserError("No capture given; pass a recording or a JSON-lines capture.")
    parts = []
    for path in paths:
        if path == "-":
            data = (stdin if stdin is not None else sys.stdin.buffer).read()
            parts.append(_read_source(STDIN_NAME, data))
        else:
            parts += [_read_source(p, p) for p in _expand(path)]
    return _combine(parts)


def iter_flow_batches(path: str, notes: Optional[List[str]] = None) -> Iterator[pa.RecordBatch]:
    """One file's flows as record batches of recording_schema() (JSON lines are converted
    chunk by chunk). A torn end stops the batches; its sentence goes to `notes` if given."""
    notes = notes if notes is not None else []
    if detect(path) == "recording":
        with _open(path, pa.OSFile) as src:
            for batch in _stream(path, src, notes):
                yield from (b for kind, b in _kinds(batch) if kind == "flow")
        return
    with _open(path, lambda p: open(p, "rb")) as f:
        lines = _JsonLines(path, f, notes)
        for kind, recs, nums in lines.chunks():
            if kind == "flow":
                lines.columns(kind, recs, nums)           # validated before conversion
                try:
                    yield pa.record_batch(FlowBatch.from_records(recs).to_arrow())
                except (ValueError, OSError):             # an address that is not one
                    raise UserError(f"{path} holds a flow that cannot be converted between lines "
                                    f"{nums[0]} and {nums[-1]}; {check.FIX}.") from None


def detect(path: str) -> str:
    """"recording" or "jsonl", by the first bytes (an empty file counts as JSON lines)."""
    with _open(path, lambda p: open(p, "rb")) as f:
        return _kind(path, f.read(64))


# ------------------------------------------------------------------------------------ files

def _expand(path: str) -> List[str]:
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist; check the path and try again.")
        return [path]
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.arrow"))
                   + glob.glob(os.path.join(glob.escape(path), "*.jsonl")))
    if not files:
        raise UserError(f"{path} holds no .arrow or .jsonl files; give a capture file or the "
                        "directory of a recording.")
    return files


def _open(path: str, opener: Callable):
    try:
        return opener(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path and try again.") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); fix its permissions or run as "
                        "a user who can read it.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); check the path and try again.") from None


def _kind(name: str, head: bytes) -> str:
    if head.startswith(STREAM_MAGIC):
        return "recording"
    if not head.strip() or head.lstrip().startswith(b"{"):
        return "jsonl"
    raise UserError(f"{name} is neither a recording nor a JSON-lines capture; give a file written "
                    "by `trace --record` or `trace --format json`.")


def _read_source(name: str, source) -> Capture:
    """One file (`source` its path, or the bytes of standard input)."""
    is_path = isinstance(source, str)
    if is_path:
        head = detect(source)
        empty = os.path.getsize(source) == 0
    else:
        head, empty = _kind(name, source[:64]), not source
    if empty:
        return _part(name, _header(1, None), [], _frame("flow", {}), _frame("miss", {}),
                     [f"{name} is empty (the tracer stopped before writing anything)."])
    if head == "recording":       # read, not mapped: a file cut while mapped would be SIGBUS
        with (_open(source, pa.OSFile) if is_path else pa.BufferReader(source)) as src:
            return _read_recording(name, src)
    with (_open(source, lambda p: open(p, "rb")) if is_path else io.BytesIO(source)) as f:
        return _read_jsonl(name, f)


def _part(name, header, summaries, flows, misses, notes, snapshots=()) -> Capture:
    """One file's Capture: rows, summaries and snapshots get the file's node and source."""
    node = header.get("node") or ""
    return Capture(
        flows=_with_origin(flows, node, name), misses=_with_origin(misses, node, name),
        summaries=[dict(s, node=node, source=name) for s in summaries],
        headers=[dict(header, source=name)],
        snapshots=[dict(s, node=node, source=name) for s in snapshots],
        notes=list(notes), truncated=bool(notes))


def _combine(parts: List[Capture]) -> Capture:
    if len(parts) == 1:
        return parts[0]
    return Capture(
        flows=pd.concat([p.flows for p in parts], ignore_index=True),
        misses=pd.concat([p.misses for p in parts], ignore_index=True),
        summaries=[s for p in parts for s in p.summaries],
        headers=[h for p in parts for h in p.headers],
        snapshots=[s for p in parts for s in p.snapshots],
        notes=[n for p in parts for n in p.notes],
        truncated=any(p.truncated for p in parts))


def _header(schema: int, backend: Optional[str]) -> dict:
    """The header of a file that has none (schema 1 JSON lines; a recording torn before it)."""
    backend = backend or "netfilter"
    return {"type": "capture", "schema": schema, "tool": None, "backend": backend, "node": None,
            "kernel": None, "netns": None, "started": None, "options": {},
            "measures": dict.fromkeys(MEASURES, backend != "conntrack")}


# ------------------------------------------------------------------------------- recordings

def _read_recording(name: str, src) -> Capture:
    notes: List[str] = []
    tables: Dict[str, List[pa.RecordBatch]] = {"flow": [], "miss": []}
    rows: Dict[str, list] = {}                # payload kind -> [(ts ns, object)]
    for batch in _stream(name, src, notes):
        for kind, b in _kinds(batch):
            if kind in tables:
                tables[kind].append(b)
            else:
                rows.setdefault(kind, []).extend(_payloads(name, kind, b))
    try:
        return _recording_capture(name, notes, tables, rows)
    except (pa.ArrowException, ValueError, IndexError, OverflowError, TypeError, KeyError):
        raise UserError(f"{name} holds values no tracer writes (the file was changed after it was "
                        "written); it cannot be read.") from None


def _recording_capture(name: str, notes: List[str], tables: dict, rows: dict) -> Capture:
    metas = rows.get("meta") or [(None, _header(SCHEMA_VERSION, None))]
    header = metas[0][1]                      # with the writer's file_index
    if not notes:
        notes += _end_notes(name, rows, tables)
    flows, misses = (_frame(k, _arrow_columns(k, pa.Table.from_batches(tables[k]) if tables[k]
                                              else recording_schema().empty_table()))
                     for k in ("flow", "miss"))
    snapshots = [{"kind": kind, "ts": ns_to_iso(ts), "items": obj.get("items", [])}
                 for kind in ("pods", "rules") for ts, obj in rows.get(kind, [])]
    return _part(name, header, [obj for _, obj in rows.get("summary", [])], flows, misses, notes,
                 snapshots)


def _stream(name: str, src, notes: List[str]) -> Iterator[pa.RecordBatch]:
    """The record batches, in order; a torn tail ends them with one note."""
    read = 0
    try:
        reader = pa.ipc.open_stream(src)
        _check_schema(name, reader.schema)
        while True:
            batch = reader.read_next_batch()
            # Every offset, index and UTF-8 string checked before anything reads it: a batch
            # damaged on disk must end the file here, never crash the reader (or the process).
            batch.validate(full=True)
            read += batch.num_rows
            yield _plain(batch)
    except StopIteration:
        return
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError, IndexError, OverflowError):
        notes.append(f"{name} ends in a torn or damaged batch after {read} rows (the tracer was "
                     "killed, the disk filled, or the file was changed); the report covers what "
                     "was written before it.")


def _check_schema(name: str, schema: pa.Schema) -> None:
    meta = schema.metadata or {}
    if meta.get(b"format") != RECORDING_MAGIC.encode() or not set(recording_schema().names) <= set(schema.names):
        raise UserError(f"{name} is an Arrow stream but not a bpftrace-hostport recording; give a "
                        "file written by `trace --record`.")
    version = int(meta.get(b"schema", b"0")) if meta.get(b"schema", b"").isdigit() else 0
    if version > SCHEMA_VERSION:
        raise UserError(f"{name} was written by a newer bpftrace-hostport (recording schema {version}; "
                        f"this one reads up to {SCHEMA_VERSION}); upgrade to read it.")


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Schema 2 wrote the strings dictionary-encoded: decoded here, every batch has the plain
    strings of schema 3."""
    if not any(pa.types.is_dictionary(f.type) for f in batch.schema):
        return batch
    cols = [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in batch.columns]
    schema = pa.schema([f.with_type(c.type) for f, c in zip(batch.schema, cols)],
                       metadata=batch.schema.metadata)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _kinds(batch: pa.RecordBatch) -> List[Tuple[str, pa.RecordBatch]]:
    """(kind, rows of that kind): the writer makes one kind per batch; others are split."""
    col = batch.column(0)
    enc = col.dictionary_encode()
    kinds = enc.dictionary.to_pylist()
    if len(kinds) == 1 and col.null_count == 0:
        return [(kinds[0], batch)]
    idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    return [(k, batch.filter(pa.array(idx == i))) for i, k in enumerate(kinds) if (idx == i).any()]


def _payloads(name: str, kind: str, b: pa.RecordBatch) -> List[Tuple[int, dict]]:
    ts = b.column("ts").cast(pa.int64()).fill_null(0).to_pylist()
    try:
        out = [(t, orjson.loads(p or "{}")) for t, p in zip(ts, b.column("payload").to_pylist())]
    except orjson.JSONDecodeError:
        out = None
    if out is None or not all(isinstance(obj, dict) for _, obj in out):
        raise UserError(f"{name} holds a damaged {kind} row; the file was changed after it was "
                        "written.") from None
    return out


def _end_notes(name: str, rows: Dict[str, list], tables: dict) -> List[str]:
    """The stream ended cleanly: does it end with an end row whose counts match what was read?"""
    got = {"flows": sum(b.num_rows for b in tables["flow"]),
           "misses": sum(b.num_rows for b in tables["miss"])}
    got["rows"] = got["flows"] + got["misses"] + sum(len(v) for k, v in rows.items() if k != "end")
    if not rows.get("end"):
        return [f"{name} has no end marker (the tracer was killed or the disk filled); the report "
                f"covers the {got['flows']} flows written before."]
    end = rows["end"][0][1]
    said = {k: end.get(k) if type(end.get(k)) is int else None for k in got}   # only numbers shown
    if said != got:
        return [f"{name} says it holds {said['rows']} rows ({said['flows']} flows) but "
                f"{got['rows']} ({got['flows']} flows) were read; the report covers what was read."]
    return []


# ---------------------------------------------------------------------------- Arrow -> frames

_NAMES = {"proto": np.array([protomod.name(i) for i in range(256)], dtype=object),
          "hook": np.array([protomod.HOOKS.get(i) or str(i) for i in range(256)], dtype=object)}


def _arrow_columns(kind: str, t: pa.Table) -> dict:
    """A table of flow or miss rows -> the record's fields as numpy/pandas columns."""
    fam = t["family"].fill_null(0).to_numpy()
    cols = {}
    for f in RECORDS[kind][1:]:
        col = t[f.name[:-3] + "_addr" if f.name.endswith("_ip") else f.name]
        if f.name in _NAMES:
            cols[f.name] = _NAMES[f.name][col.fill_null(255).to_numpy()]
        elif pa.types.is_timestamp(col.type):
            cols[f.name] = col.cast(pa.int64()).fill_null(0).to_numpy()
        elif pa.types.is_fixed_size_binary(col.type):
            cols[f.name] = _addr_text(_v16(col), fam)
        elif pa.types.is_string(col.type):
            cols[f.name] = col.to_numpy(zero_copy_only=False).astype(object)
        elif pa.types.is_integer(col.type) and f.nullable:
            values = col.fill_null(0).cast(pa.int64(), safe=False).to_numpy()
            cols[f.name] = pd.arrays.IntegerArray(values, col.is_null().to_numpy(zero_copy_only=False))
        else:                                 # bool, int, float (null -> NaN)
            cols[f.name] = col.to_numpy()
    if kind == "flow":                        # a flow not masqueraded has no SNAT address
        cols["snat_ip"] = np.where(cols["masqueraded"], cols["snat_ip"], None)
    return cols


def _v16(col: pa.ChunkedArray) -> np.ndarray:
    parts = [np.frombuffer(c.buffers()[1], ADDR, count=len(c), offset=c.offset * 16)
             if c.buffers()[1] is not None else np.zeros(len(c), ADDR) for c in col.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, ADDR)


def _addr_text(addrs: np.ndarray, fams: np.ndarray) -> np.ndarray:
    """16-byte addresses -> text, each distinct address converted once."""
    uniq, inv = distinct_addrs(addrs, fams)
    return np.array([unpack_addr(raw, fam) for raw, fam in uniq] + [None], dtype=object)[inv]


def distinct_addrs(addrs: np.ndarray, families: np.ndarray) -> Tuple[List[Tuple[bytes, int]], np.ndarray]:
    """The distinct (16 address bytes, family) pairs of a column and each row's index into them.
    Arrow's hash kernel does it (50x faster than numpy's sort-based unique on 1M rows); used by
    the reader, which turns each distinct address into text once."""
    n = len(addrs)
    keys = np.empty(n, dtype=[("a", ADDR), ("f", "u1")])      # 17 packed bytes per row
    keys["a"], keys["f"] = addrs, families
    enc = pc.dictionary_encode(pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(17), n, [None, pa.py_buffer(keys.tobytes())]))
    uniq = [(v[:16], v[16]) for v in enc.dictionary.to_pylist()]
    return uniq, enc.indices.to_numpy(zero_copy_only=False).astype(np.intp, copy=False)


def _frame(kind: str, cols: dict) -> pd.DataFrame:
    """Columns of a record's fields (ts as int64 ns) -> the DataFrame of capture.py's contract."""
    fields = RECORDS[kind][1:]
    if not cols:
        cols = {f.name: [] for f in fields}
    # copy=False: no consolidation into 2-D blocks, which would copy every column once more
    return pd.DataFrame({f.name: _typed(f, cols[f.name]) for f in fields}, copy=False)


def _typed(f: Field, values):
    if f.name == "ts":
        return pd.Series(np.asarray(values, dtype=np.int64).view("datetime64[ns]")).dt.tz_localize("UTC")
    if f.type == "string":
        return pd.Series(np.asarray(values, dtype=object), dtype=object, copy=False)
    if f.type == "integer":
        return pd.array(values, dtype="Int64") if f.nullable else np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=float if f.type == "number" else bool)


def _with_origin(df: pd.DataFrame, node: str, source: str) -> pd.DataFrame:
    n = len(df)
    for col, value in (("node", node), ("source", source)):
        df[col] = pd.Series(np.full(n, value, dtype=object), dtype=object, index=df.index, copy=False)
    return df


# ------------------------------------------------------------------------------- JSON lines

def _read_jsonl(name: str, f) -> Capture:
    notes: List[str] = []
    lines = _JsonLines(name, f, notes)
    frames: Dict[str, List[pd.DataFrame]] = {"flow": [], "miss": []}
    for kind, recs, nums in lines.chunks():
        cols = lines.columns(kind, recs, nums)
        try:
            frames[kind].append(_frame(kind, cols))
        except (OverflowError, TypeError):          # beyond int64 (types were checked)
            raise UserError(f"{name} holds an integer too large for a {kind} field near line "
                            f"{nums[0]}; {check.FIX}.") from None
    flows, misses = (pd.concat(frames[k], ignore_index=True) if frames[k] else _frame(k, {})
                     for k in ("flow", "miss"))
    header = lines.header or _header(1, (lines.summary or {}).get("backend"))
    return _part(name, header, [lines.summary] if lines.summary else [], flows, misses, notes)


class _JsonLines:
    """One JSON-lines capture, record by record: flows and misses come out in chunks (memory
    stays bounded), the header (first line) and the last summary are kept, checked."""

    def __init__(self, name: str, lines: Iterable[bytes], notes: List[str]):
        self.name, self.lines, self.notes = name, lines, notes
        self.header: Optional[dict] = None
        self.summary: Optional[dict] = None

    def chunks(self) -> Iterator[Tuple[str, List[dict], List[int]]]:
        pending: Dict[str, Tuple[List[dict], List[int]]] = {"flow": ([], []), "miss": ([], [])}
        first = True
        for lineno, rec in self._records():
            kind = rec.get("type") if isinstance(rec.get("type"), str) else None
            if kind == "capture" and first:
                self.header = check.check_record(CAPTURE, rec, f"{self.name} line {lineno}",
                                                 required=("schema",))
                self._check_version()
            elif kind == "summary":
                self.summary = check.check_summary(rec, f"{self.name} line {lineno}")
            elif kind in pending:
                pending[kind][0].append(rec)
                pending[kind][1].append(lineno)
                if len(pending[kind][0]) >= _CHUNK:
                    yield (kind,) + pending[kind]
                    pending[kind] = ([], [])
            first = False
        yield from ((k, recs, nums) for k, (recs, nums) in pending.items() if recs)
        if self.summary is None and not self.notes:
            self.notes.append(f"{self.name} has no summary record (the tracer was stopped before it "
                              "finished); figures come from its flow records.")

    def columns(self, kind: str, recs: List[dict], nums: List[int]) -> Dict[str, list]:
        """The chunk's fields as checked columns, `ts` parsed to int64 ns."""
        defaults = check.v1_defaults((self.header or {}).get("schema", 1))
        where = lambda i: f"{self.name} line {nums[i]}"          # noqa: E731
        cols = check.check_columns(RECORDS[kind], recs, where, defaults)
        cols["ts"] = _iso_ns(cols["ts"], where)
        return cols

    def _check_version(self) -> None:
        if self.header["schema"] > SCHEMA_VERSION:
            raise UserError(f"{self.name} was written by a newer bpftrace-hostport (schema "
                            f"{self.header['schema']}; this one reads up to {SCHEMA_VERSION}); "
                            "upgrade to read it.")

    def _records(self) -> Iterator[Tuple[int, dict]]:
        for lineno, line in enumerate(self.lines, start=1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                if not line.endswith(b"\n"):      # only the last line can lack one: cut by a kill
                    self.notes.append(f"{self.name} ends in a cut line {lineno} (the capture was "
                                      "interrupted); it was skipped.")
                    return
                raise UserError(f"{self.name} line {lineno} is not JSON; {check.FIX}.") from None
            if not isinstance(rec, dict):
                raise UserError(f"{self.name} line {lineno} is not a JSON object; {check.FIX}.")
            yield lineno, rec


def _iso_ns(values: list, where: Callable[[int], str]) -> np.ndarray:
    """ISO 8601 strings with their zone -> int64 ns (UTC), parsed as one column; a bad one (an
    empty one, which pandas would take for "no time", or one without a zone) is named."""
    zoned = all(v[-1:] == "Z" or v[-6:-5] in ("+", "-") for v in values)
    try:
        ns = pd.to_datetime(values, utc=True, format="ISO8601").as_unit("ns").asi8 if zoned else None
    except (ValueError, OverflowError, TypeError):
        ns = None
    if ns is not None and not (ns == np.iinfo(np.int64).min).any():
        return ns
    for i, v in enumerate(values):
        if not check.is_time(v):
            raise UserError(f"{where(i)}: field ts should be {check.TIME}, not {check.shown(v)}; "
                            f"{check.FIX}.")
    raise UserError(f"{where(0)}: the ts fields cannot be read as times; {check.FIX}.")


# ------------------------------------------------------------------ frames -> JSON records

def flow_records(df) -> Iterator[dict]:
    """The flow rows as JSON "flow" records (schema order), chunk by chunk."""
    fields = [f for f in field_names("flow") if f != "type"]
    for start in range(0, len(df), _CHUNK):
        part = df.iloc[start:start + _CHUNK]
        ts = part["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").tolist()
        cols = {f: part[f].astype(object).tolist() for f in fields if f != "ts"}
        for i in range(len(part)):
            rec = {"type": "flow", "ts": ts[i]}
            for f in fields[1:]:
                v = cols[f][i]
                rec[f] = None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v
            yield rec


def miss_records(df) -> Iterator[dict]:
    """The miss rows as JSON "miss" records."""
    if df is None or len(df) == 0:
        return
    fields = [f for f in field_names("miss") if f != "type"]
    ts = df["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").tolist()
    cols = {f: df[f].astype(object).tolist() for f in fields if f != "ts" and f in df.columns}
    for i in range(len(df)):
        rec = {"type": "miss", "ts": ts[i]}
        rec.update({f: (None if cols[f][i] is pd.NA else cols[f][i]) for f in cols})
        yield rec
