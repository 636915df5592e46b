"""Flows as Parquet (`export --to parquet`), in one stable schema, and read back (`report`).

The schema is declared once (EXPORT_SCHEMA, from records/schema.py's flow fields plus `node` and
`source`): a column's type never depends on the data (a column no flow fills is still a string
column of nulls), so the exports of any captures can be read as one table by DuckDB, Spark,
Trino, pandas or pyarrow.dataset. The schema version is in each file's metadata.

A dataset directory is hive-partitioned, node=<node>/date=<UTC day of the flow>/part-N.parquet:
a query on one node or one day reads only its files. `node` and `date` then live in the paths,
not in the files (`date` is a string: 2026-12-08).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records import outcome as oc
from bpftrace_hostport.records.batch import ADDR, AddrNames, FlowBatch, group_rows, pack_addr
from bpftrace_hostport.records.schema import FLOW, SCHEMA_VERSION

EXPORT_MAGIC = "bpftrace-hostport-flows"
_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
_FIELDS = [f for f in FLOW if f.name != "type"]


def _field(f) -> pa.Field:
    if f.name == "ts":
        return pa.field("ts", pa.timestamp("ns", tz="UTC"), nullable=False)
    return pa.field(f.name, _TYPES[f.type], nullable=True)


EXPORT_SCHEMA = pa.schema([_field(f) for f in _FIELDS]
                          + [pa.field("node", pa.string()), pa.field("source", pa.string())],
                          metadata={"format": EXPORT_MAGIC, "schema": str(SCHEMA_VERSION)})
PARTITION_SCHEMA = pa.schema([pa.field("node", pa.string()), pa.field("date", pa.string())])


def _text(names: List[Optional[str]], codes: np.ndarray) -> pa.Array:
    """values[codes] as a string array (codes < 0: null), without a Python step per row."""
    dictionary = pa.array(list(names) + [None], pa.string())
    idx = np.where(codes >= 0, codes, len(names)).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(idx), dictionary).cast(pa.string())


def _addr_text(addr: AddrNames, col: np.ndarray, fam: np.ndarray, valid: Optional[np.ndarray] = None) -> pa.Array:
    if not len(col):
        return pa.array([], pa.string())
    first, inv = group_rows(col, fam)
    names = [addr(col[i].tobytes(), int(fam[i])) for i in first.tolist()]
    codes = inv.astype(np.int64)
    if valid is not None:
        codes = np.where(valid, codes, -1)
    return _text(names, codes)


def _opt(values: np.ndarray, valid: np.ndarray, typ) -> pa.Array:
    return pa.array(values, typ, mask=~valid)


def flow_table(b: FlowBatch, node: Optional[str], source: Optional[str],
               addr: Optional[AddrNames] = None) -> pa.RecordBatch:
    """A batch's flows as rows of EXPORT_SCHEMA."""
    addr = addr or AddrNames()
    c, n = b.cols, len(b)
    fam = c["family"]
    refused = c["refusal"] > 0
    icmp = c["refusal"] >= min(oc.ICMP_REFUSALS)
    pods = b.pods
    pod = c["pod"]

    def pod_field(k: int) -> pa.Array:
        vals = [p[k] for p in pods]
        codes = np.where(pod >= 0, pod, -1)
        if vals:
            known = np.array([v is not None for v in vals] + [False])
            codes = np.where(known[codes], codes, -1)
        return _text(vals, codes)

    lat, rlat = c["latency_us"], c["refusal_us"]
    cols: Dict[str, pa.Array] = {
        "ts": pa.array(c["ts_ns"], pa.timestamp("ns", tz="UTC")),
        "proto": _text([protomod.name(i) for i in range(256)], c["proto"].astype(np.int64)),
        "family": pa.array(fam.astype(np.int64)),
        "client_ip": _addr_text(addr, c["client_addr"], fam),
        "client_port": pa.array(c["client_port"].astype(np.int64)),
        "node_ip": _addr_text(addr, c["node_addr"], fam),
        "host_port": pa.array(c["host_port"].astype(np.int64)),
        "pod_ip": _addr_text(addr, c["pod_addr"], fam),
        "pod_port": pa.array(c["pod_port"].astype(np.int64)),
        "hook": _text([protomod.HOOKS.get(i) or str(i) for i in range(256)], c["hook"].astype(np.int64)),
        "answered": pa.array(c["answered"]),
        "outcome": _text(list(oc.OUTCOMES), c["outcome"].astype(np.int64)),
        "refusal": _text(list(oc.REFUSALS), np.where(refused, c["refusal"].astype(np.int64), -1)),
        "refused_by": _text(list(oc.REFUSED_BY), np.where(refused, c["refused_by"].astype(np.int64), -1)),
        "icmp_type": _opt(c["icmp_type"].astype(np.int64), icmp, pa.int64()),
        "icmp_code": _opt(c["icmp_code"].astype(np.int64), icmp, pa.int64()),
        "latency_us": _opt(np.nan_to_num(lat), ~np.isnan(lat), pa.float64()),
        "refusal_us": _opt(np.nan_to_num(rlat), ~np.isnan(rlat), pa.float64()),
        "midstream": pa.array(c["midstream"]),
        "masqueraded": _opt(c["masqueraded"], c["masq_known"], pa.bool_()),
        "snat_ip": _addr_text(addr, c["snat_addr"], fam, c["masqueraded"] & c["masq_known"]),
        "packets": _opt(c["packets"], c["packets"] >= 0, pa.int64()),
        "bytes": _opt(c["bytes"], c["bytes"] >= 0, pa.int64()),
        "pod_namespace": pod_field(0), "pod_name": pod_field(1), "port_name": pod_field(2),
        "drop_reason": _text(list(b.drop_reasons), c["drop"].astype(np.int64)),
        "node": pa.array([node] * n, pa.string()),
        "source": pa.array([source] * n, pa.string()),
    }
    return pa.RecordBatch.from_arrays([cols[f.name] for f in EXPORT_SCHEMA], schema=EXPORT_SCHEMA)


class ParquetOut:
    """Writes flow batches to one Parquet file, or to a hive-partitioned dataset directory
    (node=/date=), each file created 0600 (client addresses inside)."""

    def __init__(self, path: str, partitioned: bool):
        self.path, self.partitioned = path, partitioned
        self.writers: Dict[Tuple[str, str], Any] = {}
        self.rows = 0

    def _writer(self, key: Tuple[str, str]):
        import pyarrow.parquet as pq
        from bpftrace_hostport.files import private_file
        w = self.writers.get(key)
        if w is None:
            if self.partitioned:
                node, date = key
                d = os.path.join(self.path, f"node={_part(node)}", f"date={date}")
                os.makedirs(d, mode=0o700, exist_ok=True)
                n = 0
                while os.path.exists(os.path.join(d, f"part-{n}.parquet")):
                    n += 1
                target = os.path.join(d, f"part-{n}.parquet")
                schema = EXPORT_SCHEMA.remove(EXPORT_SCHEMA.get_field_index("node"))
            else:
                target, schema = self.path, EXPORT_SCHEMA
            w = self.writers[key] = (pq.ParquetWriter(private_file(target), schema), schema)
        return w

    def write(self, rb: pa.RecordBatch) -> None:
        if not rb.num_rows:
            return
        self.rows += rb.num_rows
        if not self.partitioned:
            w, _ = self._writer(("", ""))
            w.write_batch(rb)
            return
        import pyarrow.compute as pc
        days = pc.strftime(rb.column("ts"), format="%Y-%m-%d")
        nodes = rb.column("node").fill_null("")
        for node, day, part in _split(rb, nodes, days):
            w, schema = self._writer((node, day))
            w.write_batch(part.select(schema.names))

    def close(self) -> None:
        for w, _ in self.writers.values():
            w.close()
        self.writers = {}


def _split(rb: pa.RecordBatch, a: pa.Array, b: pa.Array):
    """(a value, b value, its rows) for each distinct pair of values in columns a and b."""
    import pyarrow.compute as pc
    sep = "\x1f"
    keys = pc.binary_join_element_wise(a, b, sep)
    distinct = keys.unique().to_pylist()
    if len(distinct) == 1:                      # the usual case: a batch of one node and file
        x, y = distinct[0].split(sep, 1)
        yield x, y, rb
        return
    for k in distinct:
        x, y = k.split(sep, 1)
        yield x, y, rb.filter(pc.equal(keys, k))


def _part(value: str) -> str:
    """A partition value as a path segment (hive escapes / and % the same way)."""
    return "".join(c if c.isalnum() or c in "-_.:" else f"%{ord(c):02X}" for c in value) or "__HIVE_DEFAULT_PARTITION__"


# ------------------------------------------------------------------------------- reading

_PACKED: Dict[str, bytes] = {}              # address text -> its 16 bytes, across batches


def _pack_column(col: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """Address text -> (16-byte rows, family), each distinct address parsed once per read."""
    enc = col.dictionary_encode()
    values = enc.dictionary.to_pylist()
    if len(_PACKED) > 1 << 20:
        _PACKED.clear()
    raw = []
    for v in values:
        b = _PACKED.get(v)
        if b is None:
            b = _PACKED[v] = pack_addr(v)
        raw.append(b)
    packed = np.frombuffer(b"".join(raw) + bytes(16), ADDR)
    fams = np.array([6 if ":" in v else 4 for v in values] + [0], np.uint8)
    idx = enc.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)
    return packed[idx], fams[idx]


def from_export(rb: pa.RecordBatch) -> FlowBatch:
    """Rows of EXPORT_SCHEMA (node and source may be partition columns) -> a FlowBatch."""
    from bpftrace_hostport.records.stream import from_arrow
    names = rb.schema.names
    col = rb.column
    cols = {}
    for text, raw in (("client_ip", "client_addr"), ("node_ip", "node_addr"), ("pod_ip", "pod_addr"),
                      ("snat_ip", "snat_addr")):
        packed, _ = _pack_column(col(text))
        cols[raw] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(packed),
                                                         [None, pa.py_buffer(packed.tobytes())])

    def codes(name: str, table) -> pa.Array:
        enc = col(name).dictionary_encode()
        lookup = np.array([table.index(v) if v in table else 255 for v in enc.dictionary.to_pylist()] + [255], np.uint8)
        idx = enc.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)
        out = lookup[idx]
        return pa.array(out, pa.uint8(), mask=out == 255)

    cols.update({
        "ts": col("ts"), "proto": codes("proto", [protomod.name(i) for i in range(256)]),
        "family": col("family").cast(pa.uint8()),
        "hook": codes("hook", [protomod.HOOKS.get(i) or str(i) for i in range(256)]),
        "client_port": col("client_port").cast(pa.uint16()), "host_port": col("host_port").cast(pa.uint16()),
        "pod_port": col("pod_port").cast(pa.uint16()),
        "answered": col("answered"), "midstream": col("midstream"), "masqueraded": col("masqueraded"),
        "outcome": codes("outcome", list(oc.OUTCOMES)), "refusal": codes("refusal", list(oc.REFUSALS)),
        "refused_by": codes("refused_by", list(oc.REFUSED_BY)),
        "icmp_type": col("icmp_type").cast(pa.uint8()), "icmp_code": col("icmp_code").cast(pa.uint8()),
        "latency_us": col("latency_us"), "refusal_us": col("refusal_us"),
        "packets": col("packets").cast(pa.uint64()), "bytes": col("bytes").cast(pa.uint64()),
        "pod_namespace": col("pod_namespace"), "pod_name": col("pod_name"), "port_name": col("port_name"),
        "drop_reason": col("drop_reason"),
    })
    names = list(cols)
    return from_arrow(pa.RecordBatch.from_arrays([cols[k] for k in names], names=names))


def parquet_items(cf) -> Iterator[Tuple[str, Any]]:
    """A Parquet export (one file, or a hive-partitioned dataset directory) as capture items:
    a header per (node, source) the rows come from, then its flows."""
    import pyarrow.dataset as ds
    from bpftrace_hostport.errors import UserError
    from bpftrace_hostport.records.stream import default_header
    path = cf.source
    if not isinstance(path, str):
        raise UserError(f"{cf.name}: a Parquet export is read from a file or directory, not from "
                        "standard input; give its path.")
    try:
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
        _check(cf.name, dataset.schema)
        # One batch and one file at a time: the default readahead holds gigabytes at once.
        batches = dataset.to_batches(batch_size=65536, batch_readahead=1, fragment_readahead=1,
                                     use_threads=False)
        current = None
        for rb in batches:
            if not rb.num_rows:
                continue
            node = rb.column("node").cast(pa.string()).fill_null("") if "node" in rb.schema.names else pa.array([""] * rb.num_rows)
            source = rb.column("source").fill_null("") if "source" in rb.schema.names else pa.array([""] * rb.num_rows)
            for n, src, part in _split(rb, node, source):
                if (n, src) != current:
                    current = (n, src)
                    h = default_header(SCHEMA_VERSION, None)
                    h.update(node=n or None, session=f"export:{n}:{src}", exported_from=src or None)
                    yield "header", h
                yield "flows", from_export(part)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"{cf.name} cannot be read as a Parquet export ({str(e).splitlines()[0]}); give "
                        "a file or directory written by `export --to parquet`.") from None


def _check(name: str, schema: pa.Schema) -> None:
    from bpftrace_hostport.errors import UserError
    need = {"ts", "proto", "family", "client_ip", "host_port", "pod_ip", "outcome"}
    if not need <= set(schema.names):
        raise UserError(f"{name} is Parquet but not an export of bpftrace-hostport flows; give a file "
                        "or directory written by `export --to parquet`.")
    meta = schema.metadata or {}
    v = meta.get(b"schema", b"0")
    if v.isdigit() and int(v) > SCHEMA_VERSION:
        raise UserError(f"{name} was exported by a newer bpftrace-hostport (schema {int(v)}; this one "
                        f"reads up to {SCHEMA_VERSION}); upgrade to read it.")
