"""Captures read as a stream: one file at a time, batch by batch, never every flow at once.

`open_captures(paths)` gives a CaptureFile per file (a recording, a JSON-lines capture, or a
Parquet file or hive-partitioned directory that `export --to parquet` wrote); its `items()`
yields, in file order:

    ("header", dict)          the capture header (schema CAPTURE, with the writer's file_index
                              for recordings; synthesized for schema 1 JSON lines)
    ("flows", FlowBatch)      flows, tens of thousands at a time
    ("misses", [dict])        miss records (schema MISS), with "ts_ns"
    ("snapshot", dict)        {"kind": "pods"|"rules", "ts_ns": int, "items": [...]}
    ("summary", dict)         the summary record (schema SUMMARY)
    ("end", dict)             a recording's end row: its own counts

Afterwards `notes` holds one sentence per thing that ended badly (a torn last batch, a cut last
line, no end marker, counts that disagree) and `truncated` says whether the file was read only
in part. What cannot be read at all (a file that is empty, foreign, garbage, or damaged from
its first message) is a UserError naming the file, never an empty capture.
"""
from __future__ import annotations

import glob
import io
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records import check, outcome as oc
from bpftrace_hostport.records.batch import ADDR, COLUMNS, FlowBatch, group_rows, ns_to_iso
from bpftrace_hostport.records.schema import (
    CAPTURE, RECORDING_COLUMNS_SINCE_4, RECORDING_MAGIC, RECORDS, SCHEMA_VERSION, recording_schema)

STREAM_MAGIC = b"\xff\xff\xff\xff"        # an Arrow IPC stream's first message continuation
PARQUET_MAGIC = b"PAR1"
STDIN_NAME = "<stdin>"
MEASURES = ("latency", "packets", "misses", "drops")
CHUNK = 65536                             # rows handed on per step: bounds memory
_JSON_TYPES = ("capture", "flow", "miss", "summary")


# ---------------------------------------------------------------------------- entry points

def open_captures(paths: Sequence[str], *, stdin=None) -> List["CaptureFile"]:
    """A CaptureFile per file of `paths` ("-": standard input; a directory: its *.arrow and
    *.jsonl files by name, or the Parquet dataset it holds)."""
    if not paths:
        raise UserError("No capture given; pass a recording or a JSON-lines capture.")
    out: List[CaptureFile] = []
    for path in paths:
        if path == "-":
            data = (stdin if stdin is not None else sys.stdin.buffer).read()
            out.append(CaptureFile(STDIN_NAME, data))
        else:
            out += [CaptureFile(p, p) for p in expand(path)]
    return out


def expand(path: str) -> List[str]:
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist; check the path and try again.")
        return [path]
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.arrow"))
                   + glob.glob(os.path.join(glob.escape(path), "*.jsonl")))
    if files:
        return files
    if glob.glob(os.path.join(glob.escape(path), "**", "*.parquet"), recursive=True):
        return [path]                     # a Parquet dataset: read as one
    raise UserError(f"{path} holds no .arrow, .jsonl or .parquet files; give a capture file or the "
                    "directory of a recording or of an export.")


def opener(path: str, how: Callable):
    try:
        return how(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path and try again.") from None
    except PermissionError:
        who = "root" if os.path.exists(path) and os.stat(path).st_uid == 0 else "its owner"
        raise UserError(f"{path} cannot be read (permission denied): it belongs to {who}; run the "
                        "command with sudo, or copy the file and make it yours "
                        f"(sudo install -m 600 -o $USER {path} .).") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a capture file.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); check the path and try again.") from None


def kind_of(name: str, head: bytes, is_dir: bool = False) -> str:
    """"recording", "jsonl" or "parquet", by the first bytes; anything else is a UserError."""
    if is_dir:
        return "parquet"
    if not head:
        raise UserError(f"{name} is empty (the tracer wrote nothing); give a capture that holds "
                        "at least its header.")
    if head.startswith(STREAM_MAGIC):
        return "recording"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    raise UserError(f"{name} is neither a recording nor a JSON-lines capture; give a file written "
                    "by `trace --record`, `trace --format json` or `export`.")


def default_header(schema: int, backend: Optional[str]) -> dict:
    """The header of a file that has none (schema 1 JSON lines)."""
    backend = backend or "netfilter"
    return {"type": "capture", "schema": schema, "tool": None, "session": None, "backend": backend,
            "node": None, "kernel": None, "netns": None, "started": None, "options": {},
            "measures": dict.fromkeys(MEASURES, backend != "conntrack")}


class CaptureFile:
    """One capture file, read on demand (see the module's doc)."""

    def __init__(self, name: str, source):
        self.name = name
        self.source = source              # a path, or the bytes of standard input
        self.notes: List[str] = []
        self.truncated = False
        if isinstance(source, str):
            is_dir = os.path.isdir(source)
            head = b""
            if not is_dir:
                with opener(source, lambda p: open(p, "rb")) as f:
                    head = f.read(64)
            self.kind = kind_of(name, head, is_dir)
        else:
            self.kind = kind_of(name, source[:64])

    def items(self) -> Iterator[Tuple[str, Any]]:
        if self.kind == "recording":
            yield from _recording_items(self)
        elif self.kind == "jsonl":
            yield from _jsonl_items(self)
        else:
            from bpftrace_hostport.records.parquet import parquet_items
            yield from parquet_items(self)

    def note(self, text: str, truncated: bool = True) -> None:
        self.notes.append(text)
        self.truncated = self.truncated or truncated


# ------------------------------------------------------------------------------- recordings

def _recording_items(cf: CaptureFile) -> Iterator[Tuple[str, Any]]:
    name = cf.name
    src = opener(cf.source, pa.OSFile) if isinstance(cf.source, str) else pa.BufferReader(cf.source)
    counts = {"rows": 0, "flows": 0, "misses": 0}
    end: Optional[dict] = None
    seen_header = False
    with src:
        for batch in _stream(cf, src):
            for kind, b in _kinds(batch):
                counts["rows"] += b.num_rows
                try:
                    if kind == "flow":
                        counts["flows"] += b.num_rows
                        yield "flows", from_arrow(b)
                        continue
                    if kind == "miss":
                        counts["misses"] += b.num_rows
                        yield "misses", _miss_dicts(b)
                        continue
                except (pa.ArrowException, ValueError, IndexError, OverflowError, TypeError, KeyError):
                    raise UserError(f"{name} holds values no tracer writes (the file was changed "
                                    "after it was written); it cannot be read.") from None
                for ts, obj in _payloads(name, kind, b):
                    if kind == "meta":
                        if not seen_header:
                            seen_header = True
                            yield "header", dict(obj, _opened_ns=ts)   # when this file began
                    elif kind in ("pods", "rules"):
                        yield "snapshot", {"kind": kind, "ts_ns": ts, "items": obj.get("items", [])}
                    elif kind == "summary":
                        yield "summary", check.check_summary(obj, f"{name}, its summary")
                    elif kind == "end":
                        end = obj
                        counts["rows"] -= 1
                        yield "end", dict(obj, _closed_ns=ts)
    if not seen_header:
        raise UserError(f"{name} is a recording without its header row (damaged from the start); "
                        "it cannot be read.")
    if cf.truncated:
        return
    if end is None:
        cf.note(f"{name} has no end marker (the tracer was killed or the disk filled); the figures "
                f"cover the {counts['flows']:,} flows written before.")
        return
    said = {k: end.get(k) if type(end.get(k)) is int else None for k in counts}
    if said != counts:
        cf.note(f"{name} says it holds {said['rows']} rows ({said['flows']} flows) but "
                f"{counts['rows']} ({counts['flows']} flows) were read; the figures cover what was read.")


def _stream(cf: CaptureFile, src) -> Iterator[pa.RecordBatch]:
    """The record batches, in order; a torn tail ends them with one note. A stream that cannot
    even be opened, or whose first batch is damaged, is a UserError."""
    name, read = cf.name, 0
    try:
        reader = pa.ipc.open_stream(src)
        names = reader.schema.names                     # a damaged schema fails here too
    except (pa.ArrowException, OSError, ValueError, IndexError, OverflowError, UnicodeDecodeError):
        raise UserError(f"{name} starts like an Arrow stream but its schema cannot be read (the file "
                        "is damaged, or not a recording); it cannot be read.") from None
    _check_schema(name, reader.schema, names)
    batches = 0
    try:
        while True:
            batch = reader.read_next_batch()
            # Every offset, index and UTF-8 string checked before anything reads it: a batch
            # damaged on disk must end the file here, never crash the reader (or the process).
            batch.validate(full=True)
            read += batch.num_rows
            batches += 1
            yield _plain(batch)
    except StopIteration:
        return
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError, IndexError, OverflowError):
        if batches == 0:
            raise UserError(f"{name} is a recording damaged from its first batch; it cannot be "
                            "read.") from None
        cf.note(f"{name} ends in a torn or damaged batch after {read:,} rows (the tracer was "
                "killed, the disk filled, or the file was changed); the figures cover what was "
                "written before it.")


def _check_schema(name: str, schema: pa.Schema, names: List[str]) -> None:
    meta = schema.metadata or {}
    required = set(recording_schema().names) - set(RECORDING_COLUMNS_SINCE_4)
    if meta.get(b"format") != RECORDING_MAGIC.encode() or not required <= set(names):
        raise UserError(f"{name} is an Arrow stream but not a bpftrace-hostport recording; give a "
                        "file written by `trace --record`.")
    version = int(meta.get(b"schema", b"0")) if meta.get(b"schema", b"").isdigit() else 0
    if version > SCHEMA_VERSION:
        raise UserError(f"{name} was written by a newer bpftrace-hostport (recording schema {version}; "
                        f"this one reads up to {SCHEMA_VERSION}); upgrade to read it.")


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Every batch in the columns of this version: schema 2 wrote the strings
    dictionary-encoded (decoded here); recordings before schema 4 have no outcome columns (a
    flow's outcome is then what `answered` says: answered or unanswered; the rest null)."""
    if "outcome" not in batch.schema.names:
        answered = batch.column("answered")
        out = pc.if_else(answered, pa.scalar(oc.ANSWERED, pa.uint8()), pa.scalar(oc.UNANSWERED, pa.uint8()))
        want = recording_schema()
        cols = [out if f.name == "outcome" else pa.nulls(batch.num_rows, f.type)
                if f.name in RECORDING_COLUMNS_SINCE_4 else batch.column(f.name) for f in want]
        batch = pa.RecordBatch.from_arrays(cols, schema=pa.schema(
            [batch.schema.field(f.name) if f.name in batch.schema.names else f for f in want],
            metadata=batch.schema.metadata))
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


# --------------------------------------------------------------------- Arrow -> FlowBatch

def _v16(col) -> np.ndarray:
    """A fixed_size_binary(16) column as 16-byte rows (zero copy; nulls as zero bytes)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    buf = col.buffers()[1]
    if buf is None:
        return np.zeros(len(col), ADDR)
    out = np.frombuffer(buf, ADDR, count=len(col), offset=col.offset * 16)
    if col.null_count:
        out = out.copy()
        out[col.is_null().to_numpy(zero_copy_only=False)] = np.void(bytes(16))
    return out


def _num(col, dtype, null=0) -> np.ndarray:
    if col.null_count:
        col = col.fill_null(null)
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _codes(cols: Sequence[pa.Array]) -> Tuple[np.ndarray, List[tuple]]:
    """Rows of several string columns -> (index of each row's combination, the combinations);
    -1 where every one of them is null."""
    encs = [c.dictionary_encode() for c in cols]
    idx = [e.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) for e in encs]
    values = [e.dictionary.to_pylist() for e in encs]
    n = len(idx[0])
    if n == 0:
        return np.zeros(0, np.int32), []
    first, inv = group_rows(*idx)
    combos = [tuple(values[k][idx[k][i]] if idx[k][i] >= 0 else None for k in range(len(cols)))
              for i in first.tolist()]
    empty = [j for j, c in enumerate(combos) if all(v is None for v in c)]
    remap = np.arange(len(combos), dtype=np.int64)
    kept = []
    for j, c in enumerate(combos):
        if j in empty:
            remap[j] = -1
        else:
            remap[j] = len(kept)
            kept.append(c)
    return remap[inv].astype(np.int32), kept


def from_arrow(b) -> FlowBatch:
    """Rows of kind "flow" in the recording's columns (a RecordBatch or Table, or an export's
    Parquet rows in the same columns) -> a FlowBatch, column by column."""
    if isinstance(b, pa.Table):
        b = b.combine_chunks()
        b = b.to_batches()[0] if b.num_rows else pa.RecordBatch.from_pylist([], schema=b.schema)
    col = b.column
    n = b.num_rows
    ts = col("ts")
    cols: Dict[str, np.ndarray] = {
        "ts_ns": _num(ts.cast(pa.int64()), np.int64),
        "proto": _num(col("proto"), np.uint8), "family": _num(col("family"), np.uint8),
        "hook": _num(col("hook"), np.uint8),
        "client_addr": _v16(col("client_addr")), "node_addr": _v16(col("node_addr")),
        "pod_addr": _v16(col("pod_addr")), "snat_addr": _v16(col("snat_addr")),
        "client_port": _num(col("client_port"), np.uint16), "host_port": _num(col("host_port"), np.uint16),
        "pod_port": _num(col("pod_port"), np.uint16),
        "answered": _num(col("answered"), bool, False), "midstream": _num(col("midstream"), bool, False),
        "masqueraded": _num(col("masqueraded"), bool, False),
        "masq_known": ~col("masqueraded").is_null().to_numpy(zero_copy_only=False),
        "outcome": _num(col("outcome"), np.uint8), "refusal": _num(col("refusal"), np.uint8),
        "refused_by": _num(col("refused_by"), np.uint8), "icmp_type": _num(col("icmp_type"), np.uint8),
        "icmp_code": _num(col("icmp_code"), np.uint8),
        "latency_us": _num(col("latency_us"), np.float64, np.nan),
        "refusal_us": _num(col("refusal_us"), np.float64, np.nan),
        "packets": _opt_int(col("packets")), "bytes": _opt_int(col("bytes")),
    }
    cols["pod"], pods = _codes([col("pod_namespace"), col("pod_name"), col("port_name")])
    drop, reasons = _codes([col("drop_reason")])
    cols["drop"] = drop
    batch = FlowBatch({k: cols[k] for k in COLUMNS}, pods=pods, drop_reasons=[r[0] for r in reasons])
    assert len(batch) == n
    return batch


def _opt_int(col) -> np.ndarray:
    vals = col.fill_null(0).cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)
    if col.null_count:
        vals = np.where(col.is_null().to_numpy(zero_copy_only=False), -1, vals)
    return vals.astype(np.int64, copy=False)


def _miss_dicts(b) -> List[dict]:
    """Miss rows -> miss records (schema MISS) with "ts_ns"."""
    from bpftrace_hostport import proto as protomod
    from bpftrace_hostport.records.batch import unpack_addr
    fam = _num(b.column("family"), np.uint8).tolist()
    client, node = _v16(b.column("client_addr")), _v16(b.column("node_addr"))
    ts = _num(b.column("ts").cast(pa.int64()), np.int64).tolist()
    proto = _num(b.column("proto"), np.uint8).tolist()
    hook = _num(b.column("hook"), np.uint8).tolist()
    port = _num(b.column("host_port"), np.uint16).tolist()
    count = _num(b.column("count"), np.int64, 1).tolist()
    return [{"type": "miss", "ts": ns_to_iso(ts[i]), "ts_ns": ts[i], "proto": protomod.name(proto[i]),
             "family": fam[i], "client_ip": unpack_addr(client[i].tobytes(), fam[i]),
             "node_ip": unpack_addr(node[i].tobytes(), fam[i]), "host_port": port[i],
             "hook": protomod.HOOKS.get(hook[i]) or str(hook[i]), "count": count[i]}
            for i in range(len(ts))]


# ------------------------------------------------------------------------------- JSON lines

def _jsonl_items(cf: CaptureFile) -> Iterator[Tuple[str, Any]]:
    name = cf.name
    f = opener(cf.source, lambda p: open(p, "rb")) if isinstance(cf.source, str) else io.BytesIO(cf.source)
    with f:
        lines = _JsonLines(cf, f)
        header_sent = False
        for kind, recs, nums in lines.chunks():
            if not header_sent:
                header_sent = True
                yield "header", lines.header or default_header(1, None)
            if kind == "summary":
                yield "summary", recs
                continue
            cols = lines.columns(kind, recs, nums)
            if kind == "flow":
                for r, t in zip(recs, cols["ts"]):
                    r["ts_ns"] = int(t)
                try:
                    yield "flows", FlowBatch.from_records(recs)
                except (ValueError, OSError, OverflowError):
                    raise UserError(f"{name} holds a flow that cannot be converted between lines "
                                    f"{nums[0]} and {nums[-1]}; {check.FIX}.") from None
            else:
                # the checked columns, defaults of older schemas filled in
                names = list(cols)
                recs = [dict(zip(names, row), type="miss") for row in zip(*(cols[k] for k in names))]
                for r in recs:
                    r["ts_ns"] = int(r["ts"])
                    r["ts"] = ns_to_iso(r["ts_ns"])
                yield "misses", recs
        if not header_sent:
            if lines.header is None:
                raise UserError(f"{name} holds no bpftrace-hostport record; give a file written by "
                                "`trace --format json` or `export --to jsonl`.")
            yield "header", lines.header


class _JsonLines:
    """One JSON-lines capture, record by record: flows and misses come out in chunks (memory
    stays bounded), the summary as soon as it is read; every record is checked."""

    def __init__(self, cf: CaptureFile, lines):
        self.cf, self.name, self.lines = cf, cf.name, lines
        self.header: Optional[dict] = None
        self.summary: Optional[dict] = None

    def chunks(self) -> Iterator[Tuple[str, Any, List[int]]]:
        pending: Dict[str, Tuple[List[dict], List[int]]] = {"flow": ([], []), "miss": ([], [])}
        first = True
        for lineno, rec in self._records():
            kind = rec.get("type") if isinstance(rec.get("type"), str) else None
            where = f"{self.name} line {lineno}"
            if kind == "capture" and first:
                self.header = check.check_record(CAPTURE, rec, where, required=("schema",))
                if self.header["schema"] > SCHEMA_VERSION:
                    raise UserError(f"{self.name} was written by a newer bpftrace-hostport (schema "
                                    f"{self.header['schema']}; this one reads up to {SCHEMA_VERSION}); "
                                    "upgrade to read it.")
            elif kind == "summary":
                yield from ((k, recs, nums) for k, (recs, nums) in pending.items() if recs)
                pending = {"flow": ([], []), "miss": ([], [])}
                self.summary = check.check_summary(rec, where)
                yield "summary", self.summary, [lineno]
            elif kind in pending:
                pending[kind][0].append(rec)
                pending[kind][1].append(lineno)
                if len(pending[kind][0]) >= CHUNK:
                    yield (kind,) + pending[kind]
                    pending[kind] = ([], [])
            else:
                what = f"type {check.shown(rec.get('type'))}" if "type" in rec else "no type"
                raise UserError(f"{where} is not a bpftrace-hostport record ({what}; expected one of "
                                f"{', '.join(_JSON_TYPES)}); {check.FIX}.")
            first = False
        yield from ((k, recs, nums) for k, (recs, nums) in pending.items() if recs)
        if self.summary is None and not self.cf.truncated:
            self.cf.note(f"{self.name} has no summary record (the tracer was stopped before it "
                         "finished); figures come from its flow records.")

    def columns(self, kind: str, recs: List[dict], nums: List[int]) -> Dict[str, list]:
        """The chunk's fields as checked columns, `ts` parsed to int64 ns."""
        defaults = check.v1_defaults((self.header or {}).get("schema", 1))
        where = lambda i: f"{self.name} line {nums[i]}"          # noqa: E731
        cols = check.check_columns(RECORDS[kind], recs, where, defaults)
        cols["ts"] = iso_column(cols["ts"], where)
        return cols

    def _records(self) -> Iterator[Tuple[int, dict]]:
        for lineno, line in enumerate(self.lines, start=1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                if not line.endswith(b"\n"):      # only the last line can lack one: cut by a kill
                    self.cf.note(f"{self.name} ends in a cut line {lineno} (the capture was "
                                 "interrupted); it was skipped.")
                    return
                raise UserError(f"{self.name} line {lineno} is not JSON; {check.FIX}.") from None
            if not isinstance(rec, dict):
                raise UserError(f"{self.name} line {lineno} is not a JSON object; {check.FIX}.")
            yield lineno, rec


def iso_column(values: list, where: Callable[[int], str]) -> np.ndarray:
    """ISO 8601 strings with their zone -> int64 ns (UTC), parsed as one column (numpy, no
    pandas); a bad one (empty, or without a zone) is named."""
    # numpy's datetime64[ns] holds years 1678 to 2261 and wraps silently beyond: those years only
    if all(isinstance(v, str) and v[-1:] == "Z" and "1678" <= v[:4] <= "2261" and v[4:5] == "-"
           for v in values):
        try:
            ns = np.array([v[:-1] for v in values], dtype="datetime64[ns]").astype(np.int64)
            if not (ns == np.iinfo(np.int64).min).any() and all("T" in v for v in values[:1]):
                return ns
        except (ValueError, OverflowError):
            pass
    from bpftrace_hostport.records.batch import iso_to_ns
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        if not check.is_time(v):
            raise UserError(f"{where(i)}: field ts should be {check.TIME}, not {check.shown(v)}; "
                            f"{check.FIX}.")
        out[i] = iso_to_ns(v)
    return out
