"""What each watcher wrote, read back into the figures the accounting needs.

Every tracer output gives the same dict:
    http_delivered   flows for hostPort 8000 that reached the output: flow records (JSON lines,
                     a recording); with metrics (no per-flow output) the answered-flows counter,
                     which counts the flows the sink received (answered ones only: conservative)
    http_counted     the summary's flows for hostPort 8000 (the kernel's count; the flows counter)
    http_answered    answered flows for hostPort 8000
    lost_events      flows the kernel created that were never reported, from the final summary
                     (None with metrics: the exported lost_events_total is lost_events_exported;
                     while tracing it also counts flows still on their way, see metrics())
    kernel           the kernel's counters from the summary ({} when the output has none)
    http_span_s      first packet of the first flow to that of the last (None without records)
"""
from __future__ import annotations

import datetime as dt
import json
import re
import urllib.request
from pathlib import Path
from typing import Optional

from bench.config import HTTP_HOST_PORT
from bench.procs import BenchError


def _from_summary(summary: dict, delivered: int, span_s: Optional[float]) -> dict:
    http = [m for m in summary.get("mappings", []) if m.get("host_port") == HTTP_HOST_PORT]
    return {
        "http_delivered": delivered,
        "http_counted": sum(m.get("flows", 0) for m in http),
        "http_answered": sum(m.get("answered", 0) for m in http),
        "http_packets": sum(m.get("packets", 0) for m in http),
        "lost_events": int(summary.get("lost_events") or 0),
        "kernel": summary.get("kernel", {}),
        "flows": summary.get("flows"),
        "duration_s": summary.get("duration_s"),
        "http_span_s": span_s,
    }


def _span_s(first: Optional[str], last: Optional[str]) -> Optional[float]:
    if not first or not last:
        return None
    parse = lambda s: dt.datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return round((parse(last) - parse(first)).total_seconds(), 3)


def json_lines(path: Path) -> Optional[dict]:
    """`trace --format json`: flow lines for hostPort 8000 and the last line, the summary."""
    summary, n = None, 0
    first = last = None
    # json.dumps or orjson spacing alike
    ts_re = re.compile(rb'"ts":\s*"([^"]+)"')
    summary_re = re.compile(rb'^\{"type":\s*"summary"')
    flow_re = re.compile(rb'"type":\s*"flow"')
    port_re = re.compile(rb'"host_port":\s*%d\b' % HTTP_HOST_PORT)
    with open(path, "rb") as f:
        for line in f:
            if summary_re.match(line):
                summary = json.loads(line)
            elif flow_re.search(line) and port_re.search(line):
                n += 1
                m = ts_re.search(line)
                if m:   # ISO 8601 UTC with a fixed width: strings compare as times
                    ts = m.group(1).decode()
                    first = ts if first is None or ts < first else first
                    last = ts if last is None or ts > last else last
    return None if summary is None else _from_summary(summary, n, _span_s(first, last))


def recording(path: Path) -> Optional[dict]:
    """`trace --record`: the Arrow IPC stream's flow rows for hostPort 8000 and its summary row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    summary, n = None, 0
    first = last = None
    with pa.OSFile(str(path)) as f:
        for rb in pa.ipc.open_stream(f):
            col = rb.column("record")            # dictionary-encoded up to schema 2
            kind = col.dictionary_decode() if pa.types.is_dictionary(col.type) else col
            flows = pc.and_(pc.equal(kind, "flow"), pc.equal(rb.column("host_port"), HTTP_HOST_PORT))
            k = pc.sum(flows).as_py() or 0
            if k:
                ts = pc.filter(rb.column("ts"), flows).cast(pa.int64())
                lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
                n += k
                first = lo if first is None else min(first, lo)
                last = hi if last is None else max(last, hi)
            payload = pc.filter(rb.column("payload"), pc.equal(kind, "summary")).to_pylist()
            if payload:
                summary = json.loads(payload[-1])
    span = round((last - first) / 1e9, 3) if first is not None else None
    return None if summary is None else _from_summary(summary, n, span)


def scrape(port: int, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def metrics(text: str) -> dict:
    """`trace --metrics`: the flows, answered flows and lost-events counters of one scrape.

    bpftrace_hostport_lost_events_total is the running summary's lost_events kept as a counter
    (never lower than before). While tracing, that figure is flows created minus flows reported
    so far, flows still in the ring buffer or waiting for an answer included, so the counter
    keeps the largest number of flows in flight seen at a tick. It is reported apart
    (lost_events_exported), not as flows lost.
    """
    from prometheus_client.parser import text_string_to_metric_families
    flows = answered = packets = lost = 0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            http = s.labels.get("host_port") == str(HTTP_HOST_PORT)
            if s.name == "bpftrace_hostport_flows_total" and http:
                flows += int(s.value)
            elif s.name == "bpftrace_hostport_answered_flows_total" and http:
                answered += int(s.value)
            elif s.name == "bpftrace_hostport_packets_total" and http:
                packets += int(s.value)
            elif s.name == "bpftrace_hostport_lost_events_total":
                lost += int(s.value)
    return {"http_delivered": answered, "http_counted": flows, "http_answered": answered,
            "http_packets": packets, "lost_events": None, "lost_events_exported": lost, "kernel": {},
            "flows": None, "duration_s": None, "http_span_s": None}


def conntrack_lines(out_path: Path, err_path: Path) -> dict:
    """`conntrack -E`: event lines, [NEW] events for hostPort 8000, ENOBUFS warnings."""
    new = events = 0
    needle = f"dport={HTTP_HOST_PORT} ".encode()
    with open(out_path, "rb") as f:
        for line in f:
            events += 1
            if b"[NEW]" in line and needle in line:
                new += 1
    enobufs = err_path.read_text(errors="replace").count("ENOBUFS")
    return {"events": events, "http_new_events": new, "enobufs_warnings": enobufs}


def tracer_output(mode: str, out_path: Path, err_path: Path, scraped: Optional[str]) -> dict:
    """The figures of one tracer trial, from the output its mode wrote."""
    if mode == "metrics":
        if scraped is None:
            raise BenchError("no metrics scrape of the tracer succeeded")
        return metrics(scraped)
    res = json_lines(out_path) if mode == "json" else recording(out_path)
    if res is None:
        raise BenchError(f"the tracer wrote no summary ({mode}): "
                         f"{err_path.read_text(errors='replace')[-400:]}")
    return res
