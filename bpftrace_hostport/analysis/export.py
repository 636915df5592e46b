"""`export`: captures to Parquet (a file, or a hive-partitioned dataset), CSV, JSON lines,
pcapng or a recording, streamed batch by batch: memory does not grow with the number of flows.

Parquet and CSV get one row per flow with every field of the flow record plus `node` and
`source`, in one stable schema (records/parquet.py). JSON lines and recordings get the
documented records, with a summary the one roll-up computes for what was exported (the same as
`summary` and `report` say). pcapng gets synthesised packets (analysis/pcapng.py). Every file
is created 0600: it holds client addresses.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import orjson

from bpftrace_hostport.analysis.review import Filters, read
from bpftrace_hostport.analysis.summary import summary_record
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.files import private_file
from bpftrace_hostport.records import anonymize
from bpftrace_hostport.records.batch import AddrNames, FlowBatch
from bpftrace_hostport.records.schema import SCHEMA_VERSION

FORMATS = ("parquet", "csv", "jsonl", "pcapng", "recording")


def export_captures(files: Sequence, to: str, out: str, *, partition: bool = False,
                    filters: Optional[Filters] = None, anonymize_key: Optional[bytes] = None) -> int:
    """Writes the flows of `files` (CaptureFiles) to `out`; returns how many flows it wrote."""
    if partition and to != "parquet":
        raise UserError("--partition makes a Parquet dataset: use it with --to parquet.")
    anon = None
    if anonymize_key is not None:
        from bpftrace_hostport.records.anonymize import Anonymizer
        anon = Anonymizer(anonymize_key)
    state = {"n": 0, "header": None, "origins": set()}
    addr = AddrNames()

    def clean(b: FlowBatch) -> FlowBatch:
        return anonymize.batch(anon, b)

    if to in ("parquet", "csv"):
        from bpftrace_hostport.records.parquet import ParquetOut, flow_table
        writer = ParquetOut(out, partition) if to == "parquet" else _CsvOut(out)

        def on_flows(b, origin, header):
            state["n"] += len(b)
            writer.write(flow_table(clean(b), header.get("node"), header.get("source") or origin[1], addr))
        try:
            read(files, filters, series=False, clients=False, on_flows=on_flows)
        finally:
            writer.close()
        return state["n"]

    if to == "pcapng":
        from bpftrace_hostport.analysis.pcapng import iso_to_ns, write_pcapng
        flows: List[dict] = []
        misses: List[dict] = []

        def on_flows(b, origin, header):
            flows.extend(clean(b).to_records(addr))

        def on_misses(recs, origin, header):
            misses.extend(anonymize.misses(anon, [{k: v for k, v in r.items() if k != "ts_ns"} for r in recs]))
        read(files, filters, series=False, clients=False, on_flows=on_flows, on_misses=on_misses)
        # pcapng wants frames in time order: the flows (and misses) of an incident are few enough
        # to sort; write_pcapng keeps each reply back until its time
        flows.sort(key=lambda r: iso_to_ns(r["ts"]))
        misses.sort(key=lambda r: iso_to_ns(r["ts"]))
        with private_file(out) as f:
            write_pcapng(flows, f, misses)
        return len(flows)

    # jsonl, recording: one capture, so one run (a rotated run's files are one)
    sink = _JsonlOut(out) if to == "jsonl" else _RecordingOut(out)
    pending: List[FlowBatch] = []

    def on_flows(b, origin, header):
        state["origins"].add(origin)
        if len(state["origins"]) > 1:
            raise UserError(f"A {to} capture holds one tracer run, and these files hold several "
                            "(other nodes or runs): export each run on its own, or use --to parquet.")
        if state["header"] is None:
            state["header"] = header
            sink.start(header, anon)
        state["n"] += len(b)
        sink.flows(clean(b))

    def on_misses(recs, origin, header):
        if state["header"] is None:
            state["header"] = header
            sink.start(header, anon)
        sink.misses(anonymize.misses(anon, [{k: v for k, v in r.items() if k != "ts_ns"} for r in recs]))

    try:
        review = read(files, filters, series=False, clients=False, on_flows=on_flows,
                      on_misses=on_misses)
        if state["header"] is None:                     # no flow at all: the first header still
            h = review.headers[0] if review.headers else {"type": "capture"}
            sink.start({k: v for k, v in h.items() if k != "source"}, anon)
        fig = review.rollup.figures(rows_filtered=review.filters.rows())
        lost = next(iter(fig.nodes.values()))["lost_events"] if fig.nodes else 0
        dur = next(iter(fig.nodes.values()))["duration_s"] if fig.nodes else 0.0
        sink.summary(summary_record(fig, dur, lost))
    finally:
        sink.close()
    return state["n"]


class _CsvOut:
    """The Parquet rows as CSV: times ISO 8601 (µs), booleans true/false, unknown empty."""

    def __init__(self, path: str):
        self.f = private_file(path)
        self.w = None

    def write(self, rb) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pcsv
        # a recording keeps nanoseconds: truncated to the microseconds CSV shows, not refused
        ts = pc.strftime(rb.column("ts").cast(pa.timestamp("us", tz="UTC"), safe=False), format="%Y-%m-%dT%H:%M:%SZ")
        rb = rb.set_column(rb.schema.get_field_index("ts"), "ts", ts)
        if self.w is None:
            self.w = pcsv.CSVWriter(self.f, rb.schema)
        self.w.write_batch(rb)

    def close(self) -> None:
        if self.w is None:
            import pyarrow.csv as pcsv
            from bpftrace_hostport.records.parquet import EXPORT_SCHEMA
            self.w = pcsv.CSVWriter(self.f, EXPORT_SCHEMA)
        self.w.close()
        self.f.close()


class _JsonlOut:
    def __init__(self, path: str):
        self.f = private_file(path)
        self.addr = AddrNames()

    def start(self, header: dict, anon) -> None:
        h = {k: v for k, v in header.items() if k not in ("source", "file_index")}
        h["schema"] = SCHEMA_VERSION
        self.f.write(orjson.dumps(anonymize.header(anon, h)) + b"\n")

    def flows(self, b: FlowBatch) -> None:
        self.f.write(b"".join(orjson.dumps(r) + b"\n" for r in b.to_records(self.addr)))

    def misses(self, recs: List[dict]) -> None:
        self.f.write(b"".join(orjson.dumps(r) + b"\n" for r in recs))

    def summary(self, s: dict) -> None:
        self.f.write(orjson.dumps(s) + b"\n")

    def close(self) -> None:
        self.f.close()


class _RecordingOut:
    def __init__(self, path: str):
        self.path = path
        self.w = None

    def start(self, header: dict, anon) -> None:
        from bpftrace_hostport.records.recording import RecordingWriter
        h = {k: v for k, v in header.items() if k not in ("source", "file_index")}
        h["schema"] = SCHEMA_VERSION
        self.w = RecordingWriter(self.path, anonymize.header(anon, h))

    def flows(self, b: FlowBatch) -> None:
        self.w.write_flows(b)

    def misses(self, recs: List[dict]) -> None:
        self.w.write_misses(recs)

    def summary(self, s: dict) -> None:
        self.w.write_summary(s)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
