"""Captures read whole, into the DataFrames of capture.py: for small captures (tests, the
bench, converting an old capture). `report`, `summary` and `export` stream instead
(records/stream.py: a file at a time, batch by batch, into the one roll-up).

DataFrame columns: `ts` datetime64[ns, UTC]; integers int64, the nullable ones (`packets`,
`bytes`, `icmp_type`, `icmp_code`) pandas Int64; `latency_us`, `refusal_us` float64 with NaN
for null; booleans bool; strings (addresses, proto, hook, outcome, names, node, source) plain
str/None in object columns. Rows come file by file, in file order.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records import check, outcome as oc
from bpftrace_hostport.records.batch import ADDR, FlowBatch, ns_to_iso, unpack_addr
from bpftrace_hostport.records.capture import Capture
from bpftrace_hostport.records.schema import RECORDS, Field, field_names, recording_schema
from bpftrace_hostport.records.stream import CHUNK, CaptureFile, iso_column, kind_of, open_captures, opener


def load(paths: Sequence[str], *, stdin=None) -> Capture:
    """Every file of `paths` ("-": standard input; a directory: its captures) read whole."""
    parts = [_read(cf) for cf in open_captures(paths, stdin=stdin)]
    if len(parts) == 1:
        return parts[0]
    return Capture(
        flows=pd.concat([p.flows for p in parts], ignore_index=True),
        misses=pd.concat([p.misses for p in parts], ignore_index=True),
        summaries=[x for p in parts for x in p.summaries],
        headers=[x for p in parts for x in p.headers],
        snapshots=[x for p in parts for x in p.snapshots],
        notes=[n for p in parts for n in p.notes], truncated=any(p.truncated for p in parts))


def detect(path: str) -> str:
    """"recording", "jsonl" or "parquet", by the first bytes (an empty file is a UserError)."""
    with opener(path, lambda p: open(p, "rb")) as f:
        return kind_of(path, f.read(64))


def iter_flow_batches(path: str, notes: Optional[List[str]] = None) -> Iterator[pa.RecordBatch]:
    """One file's flows as record batches of recording_schema()."""
    cf = CaptureFile(path, path)
    for kind, item in cf.items():
        if kind == "flows":
            yield pa.record_batch(item.to_arrow())
    if notes is not None:
        notes += cf.notes


def _read(cf: CaptureFile) -> Capture:
    header: Optional[dict] = None
    flows: List[FlowBatch] = []
    misses: List[dict] = []
    summaries, snapshots = [], []
    for kind, item in cf.items():
        if kind == "header":
            header = header or item
        elif kind == "flows":
            flows.append(item)
        elif kind == "misses":
            misses += item
        elif kind == "summary":
            summaries.append(item)
        elif kind == "snapshot":
            snapshots.append({"kind": item["kind"], "ts": ns_to_iso(item["ts_ns"]), "items": item["items"]})
    header = header or {}
    if header.get("schema") == 1 and summaries and summaries[-1].get("backend"):
        # schema 1 had no header: its summary is the better witness of the backend
        header = dict(header, backend=summaries[-1]["backend"],
                      measures=dict.fromkeys(header["measures"], summaries[-1]["backend"] != "conntrack"))
    node = header.get("node") or ""
    batch = FlowBatch.concat(flows)
    t = pa.Table.from_batches([pa.record_batch(batch.to_arrow())]) if len(batch) else recording_schema().empty_table()
    fl = _frame("flow", _arrow_columns("flow", t))
    ms = _frame("miss", _miss_columns(misses)) if misses else _frame("miss", {})
    return Capture(flows=_with_origin(fl, node, cf.name), misses=_with_origin(ms, node, cf.name),
                   summaries=[dict(x, node=node, source=cf.name) for x in summaries],
                   headers=[dict(header, source=cf.name)],
                   snapshots=[dict(x, node=node, source=cf.name) for x in snapshots],
                   notes=list(cf.notes), truncated=cf.truncated)


def _miss_columns(misses: List[dict]) -> dict:
    fields = [f.name for f in RECORDS["miss"][1:]]
    cols = {f: [m.get(f) for m in misses] for f in fields}
    cols["ts"] = [m["ts_ns"] for m in misses]
    return cols


# ---------------------------------------------------------------------------- Arrow -> frames

def _names(table) -> np.ndarray:
    """code -> name for every uint8 code (None for the unknown ones, and for 255: null)."""
    return np.array([table[i] if i < len(table) else None for i in range(256)], dtype=object)


_NAMES = {"proto": np.array([protomod.name(i) for i in range(256)], dtype=object),
          "hook": np.array([protomod.HOOKS.get(i) or str(i) for i in range(256)], dtype=object),
          "outcome": _names(oc.OUTCOMES), "refusal": _names(oc.REFUSALS),
          "refused_by": _names(oc.REFUSED_BY)}


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

# ------------------------------------------------------------------ frames -> JSON records

def flow_records(df) -> Iterator[dict]:
    """The flow rows as JSON "flow" records (schema order), chunk by chunk."""
    fields = [f for f in field_names("flow") if f != "type"]
    for start in range(0, len(df), CHUNK):
        part = df.iloc[start:start + CHUNK]
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
