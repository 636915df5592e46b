"""Sinks: where a session's records go. One small interface; a new output is a new sink.

Every sink gets, in order: start(header) once; flows(batch) and misses(records) as they
come; tick(summary) about once a second with the running summary; close(summary) once.
"""
from __future__ import annotations

import sys
from collections import deque
from typing import List, Optional, TextIO

import orjson

from bpftrace_hostport.collect.batch import AddrNames, FlowBatch


class Sink:
    def start(self, header: dict) -> None:
        pass

    def flows(self, batch: FlowBatch) -> None:
        pass

    def misses(self, recs: List[dict]) -> None:
        pass

    def snapshot(self, kind: str, items: List[dict]) -> None:
        pass

    def tick(self, summary: dict) -> None:
        pass

    def close(self, summary: dict) -> None:
        pass


def _dump(rec: dict) -> bytes:
    return orjson.dumps(rec) + b"\n"


class JsonLinesSink(Sink):
    """`--format json`: the capture header, one object per flow and miss, the summary last."""

    def __init__(self, out: TextIO):
        self.out = out
        self.binary = getattr(out, "buffer", None)
        self.addr = AddrNames()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self.binary is not None:
            self.binary.write(data)
            self.binary.flush()          # each batch: a capture killed with -9 keeps it
        else:
            self.out.write(data.decode())
            self.out.flush()

    def start(self, header: dict) -> None:
        self._write(_dump(header))

    def flows(self, batch: FlowBatch) -> None:
        self._write(b"".join(_dump(r) for r in batch.to_records(self.addr)))

    def misses(self, recs: List[dict]) -> None:
        self._write(b"".join(_dump(r) for r in recs))

    def close(self, summary: dict) -> None:
        self._write(_dump(summary))


def host_port(ip: Optional[str], port) -> str:
    """ip:port, with IPv6 in brackets so the port can be told from the address."""
    if ip is None:
        return "-"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def flow_line(r: dict) -> str:
    """One flow record as a line of text (the text sink and the live view)."""
    pod = f"{r['pod_namespace']}/{r['pod_name']}" if r["pod_name"] else "?"
    lat = (f"{r['latency_us'] / 1000:.2f}ms" if r["latency_us"] is not None
           else "answered" if r["answered"] else "UNANSWERED")
    extra = []
    if r["masqueraded"]:
        extra.append(f"masq {r['snat_ip']}")
    if r["drop_reason"]:
        extra.append(f"drop {r['drop_reason']}")
    return (f"{r['ts'][11:23]} {r['proto']} {host_port(r['client_ip'], r['client_port'])} -> "
            f"{host_port(r['node_ip'], r['host_port'])} => {host_port(r['pod_ip'], r['pod_port'])} "
            f"{pod}{' (' + r['port_name'] + ')' if r['port_name'] else ''} [{r['hook']}] {lat}"
            f"{' ' + ', '.join(extra) if extra else ''}")


def miss_line(r: dict) -> str:
    owner = f" hostNetwork pod {r['pod_namespace']}/{r['pod_name']}" if r.get("pod_name") else ""
    return (f"{r['ts'][11:23]} MISS {r['proto']} {r['client_ip']} -> "
            f"{host_port(r['node_ip'], r['host_port'])} x{r['count']} (no DNAT){owner}")


class TextSink(Sink):
    """`--format table` on a pipe: a line per flow and miss, the summary table at the end."""

    def __init__(self, out: TextIO):
        self.out = out
        self.addr = AddrNames()

    def flows(self, batch: FlowBatch) -> None:
        for r in batch.to_records(self.addr):
            self.out.write(flow_line(r) + "\n")
        self.out.flush()

    def misses(self, recs: List[dict]) -> None:
        for r in recs:
            self.out.write(miss_line(r) + "\n")
        self.out.flush()

    def close(self, summary: dict) -> None:
        from bpftrace_hostport.analysis.render import render_summary
        self.out.write(render_summary(summary, width=_width(self.out)) + "\n")
        self.out.flush()


def _width(out: TextIO) -> int:
    from rich.console import Console
    return Console(file=out).width if out.isatty() else 120


class LiveSink(Sink):
    """`--format table` on a terminal: the running summary and the latest flows, once a second."""

    def __init__(self, out: TextIO):
        self.out = out
        self.recent: deque = deque(maxlen=8)
        self.addr = AddrNames()
        self.live = None

    def start(self, header: dict) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text
        self.console = Console(file=self.out)
        self.live = Live(Text("waiting for hostPort traffic..."), console=self.console,
                         auto_refresh=False, transient=True)
        self.live.start()

    def flows(self, batch: FlowBatch) -> None:
        tail = batch.select(slice(max(0, len(batch) - self.recent.maxlen), None))
        self.recent.extend(flow_line(r) for r in tail.to_records(self.addr))

    def misses(self, recs: List[dict]) -> None:
        self.recent.extend(miss_line(r) for r in recs[-self.recent.maxlen:])

    def tick(self, summary: dict) -> None:
        from rich.text import Text
        from bpftrace_hostport.analysis.render import render_summary
        text = render_summary(summary, width=self.console.width)
        if self.recent:
            text += "\n\nlatest flows:\n" + "\n".join(self.recent)
        self.live.update(Text(text), refresh=True)

    def close(self, summary: dict) -> None:
        from bpftrace_hostport.analysis.render import render_summary
        if self.live is not None:
            self.live.stop()
        self.out.write(render_summary(summary, width=self.console.width) + "\n")
        if self.recent:
            self.out.write("latest flows:\n" + "\n".join(self.recent) + "\n")
        self.out.flush()


def output_sink(fmt: str, out: TextIO = sys.stdout) -> Sink:
    """The sink for --format: json lines, or a table (live on a terminal, text on a pipe)."""
    if fmt == "json":
        return JsonLinesSink(out)
    return LiveSink(out) if out.isatty() else TextSink(out)


class RecordingSink(Sink):
    """`--record PATH`: everything the session sees, in a crash-safe Arrow IPC stream."""

    def __init__(self, path: str, max_size: Optional[int] = None, max_files: Optional[int] = None,
                 anonymize_key: Optional[bytes] = None):
        self.path, self.max_size, self.max_files, self.key = path, max_size, max_files, anonymize_key
        self.writer = None

    def start(self, header: dict) -> None:
        from bpftrace_hostport.records.recording import RecordingWriter
        self.writer = RecordingWriter(self.path, header, max_size=self.max_size,
                                      max_files=self.max_files, anonymize_key=self.key)

    def flows(self, batch: FlowBatch) -> None:
        self.writer.write_flows(batch)

    def misses(self, recs: List[dict]) -> None:
        self.writer.write_misses(recs)

    def snapshot(self, kind: str, items: List[dict]) -> None:
        self.writer.write_snapshot(kind, items)

    def close(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.write_summary(summary)
            self.writer.close()
