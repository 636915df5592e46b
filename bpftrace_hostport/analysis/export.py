"""`export`: a Capture to Parquet, CSV, JSON lines, pcapng or a recording.

Parquet and CSV get one row per flow with every field of the schema (plus `node` and
`source`); JSON lines and recordings get the documented records; pcapng gets synthesised
packets (analysis/pcapng.py).
"""
from __future__ import annotations

from typing import List

import orjson

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records.reader import flow_records, miss_records
from bpftrace_hostport.records.schema import SCHEMA_VERSION, field_names

CHUNK = 50_000             # flows per recording batch when converting


def _columns(df) -> List[str]:
    fields = [f for f in field_names("flow") if f != "type"]
    return fields + [c for c in ("node", "source") if c in df.columns]


def _header(cap) -> dict:
    if cap.headers:
        h = {k: v for k, v in cap.headers[0].items() if k != "source"}
        h["schema"] = SCHEMA_VERSION
        return h
    return {"type": "capture", "schema": SCHEMA_VERSION, "backend": "netfilter"}


def _write(out: str, mode: str):
    try:
        return open(out, mode)
    except OSError as e:
        raise UserError(f"Cannot write {out}: {e.strerror}; choose another path with -o.") from None


def export_capture(cap, to: str, out: str) -> int:
    df = cap.flows
    if to in ("parquet", "csv"):
        table = df[_columns(df)]
        if to == "csv":
            table = table.assign(ts=table["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            with _write(out, "w") as f:
                table.to_csv(f, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out)
        return len(df)
    if to == "pcapng":
        from bpftrace_hostport.analysis.pcapng import write_pcapng
        with _write(out, "wb") as f:
            write_pcapng(flow_records(df), f)
        return len(df)
    if to == "jsonl":
        with _write(out, "wb") as f:
            f.write(orjson.dumps(_header(cap)) + b"\n")
            for rec in flow_records(df):
                f.write(orjson.dumps(rec) + b"\n")
            for rec in miss_records(cap.misses):
                f.write(orjson.dumps(rec) + b"\n")
            for s in cap.summaries:
                f.write(orjson.dumps({k: v for k, v in s.items() if k not in ("node", "source")}) + b"\n")
        return len(df)
    return _to_recording(cap, out)


def _to_recording(cap, out: str) -> int:
    from bpftrace_hostport.records.batch import FlowBatch
    from bpftrace_hostport.records.recording import RecordingWriter
    w = RecordingWriter(out, _header(cap))
    chunk: List[dict] = []
    for rec in flow_records(cap.flows):
        chunk.append(rec)
        if len(chunk) >= CHUNK:
            w.write_flows(FlowBatch.from_records(chunk))
            chunk = []
    w.write_flows(FlowBatch.from_records(chunk))
    w.write_misses(list(miss_records(cap.misses)))
    for snap in cap.snapshots:
        w.write_snapshot(snap["kind"], snap.get("items", []))
    for s in cap.summaries:
        w.write_summary({k: v for k, v in s.items() if k not in ("node", "source")})
    w.close()
    return len(cap.flows)
