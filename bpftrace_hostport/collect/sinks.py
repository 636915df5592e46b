"""Sinks: where a session's records go. One small interface; a new output is a new sink.

Every sink gets, in order: start(header) once; flows(batch) and misses(records) as they
come; tick(summary) about once a second with the running summary; close(summary) once.
"""
from __future__ import annotations

import sys
from collections import deque
from typing import List, Optional, TextIO

import orjson

from bpftrace_hostport.records.batch import AddrNames, FlowBatch


class Sink:
    """The interface. A subclass declares `needs`: "records" (the kernel sends a record per
    flow) or "counters" (its figures come from the kernel's per-mapping counters and the
    running summary; only flows nobody answered still come as records). collect/outputs.py
    refuses a sink that declares neither."""
    tick_latency = True       # tick() is given latency percentiles (False: a cheaper summary)

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

    def kernel_counters(self, counters: dict) -> None:
        """The backend's raw counters, before each tick (netfilter: per-mapping answered flows
        and latency histograms counted in the kernel)."""

    def close(self, summary: dict) -> None:
        pass


def _dump(rec: dict) -> bytes:
    return orjson.dumps(rec) + b"\n"


class JsonLinesSink(Sink):
    """`--format json`: the capture header, one object per flow and miss, the summary last."""
    needs = "records"

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
    """One flow record as a line of text (the text sink and the live view); the time is UTC."""
    pod = f"{r['pod_namespace']}/{r['pod_name']}" if r["pod_name"] else "pod?"
    lat = (f"{r['latency_us'] / 1000:.2f} ms" if r["latency_us"] is not None
           else "answered" if r["answered"] else "UNANSWERED")
    extra = []
    if r["masqueraded"]:
        extra.append(f"masq {r['snat_ip']}")
    if r["drop_reason"]:
        extra.append(f"drop {r['drop_reason']}")
    return (f"{r['ts'][11:23]} {r['proto']} {host_port(r['client_ip'], r['client_port'])} -> "
            f"{host_port(r['node_ip'], r['host_port'])} => {host_port(r['pod_ip'], r['pod_port'])} "
            f"{pod}{' (' + r['port_name'] + ')' if r['port_name'] else ''} [{r['hook']}] {lat}"
            f"{', ' + ', '.join(extra) if extra else ''}")


def miss_line(r: dict) -> str:
    """A miss record as a line of text: connections to a watched hostPort that got no DNAT."""
    n = int(r["count"])
    owner = (f", hostNetwork pod {r['pod_namespace']}/{r['pod_name']}" if r.get("pod_name")
             else ", no rule or pod known")
    return (f"{r['ts'][11:23]} MISS {r['proto']} {r['client_ip']} -> "
            f"{host_port(r['node_ip'], r['host_port'])}: {n} connection{'' if n == 1 else 's'} "
            f"not DNATed{owner}")


_TEXT_HEADER = ("# trace: a line per flow (time UTC, client -> node:hostPort => pod:containerPort, pod, "
                "[hook], first-reply latency) and per miss (not DNATed); the summary at the end\n")


class TextSink(Sink):
    """`--format table` on a pipe: a line per flow and miss, the summary table at the end.

    `check_hint`: the `check` command line the summary suggests when something looks wrong;
    `pods`: the node's pods (PodInfo, or a callable returning them) for the summary's notes.
    """
    needs = "records"

    def __init__(self, out: TextIO, check_hint: Optional[str] = None, pods=None):
        self.out = out
        self.addr = AddrNames()
        self.check_hint, self.pods = check_hint, pods

    def start(self, header: dict) -> None:
        self.out.write(_TEXT_HEADER)
        self.out.flush()

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
        self.out.write("\n" + render_summary(summary, width=_width(self.out), check_hint=self.check_hint,
                                             pods=self.pods))
        self.out.flush()


def _width(out: TextIO) -> Optional[int]:
    """The width tables fit on `out`: $COLUMNS, else the terminal's; None (no limit) on a pipe."""
    from bpftrace_hostport.analysis.render import terminal_width
    return terminal_width(out)


class LiveSink(Sink):
    """`--format table` on a terminal: a frame that fits the terminal, redrawn once a second.

    The frame: the headline with the current rate, per mapping the flows, the rate of the last
    few seconds (NOW) beside the average, latency, misses and drops, a hint when something looks
    wrong, then the latest flows and misses (the latest misses always among them). After Ctrl-C
    the frame goes and the full summary and the latest events are printed, and stay.
    """
    needs = "records"

    RATE_WINDOW_S = 5.0

    def __init__(self, out: TextIO, check_hint: Optional[str] = None, pods=None):
        self.out = out
        self.recent_flows: deque = deque(maxlen=40)
        self.recent_misses: deque = deque(maxlen=8)
        self.samples: deque = deque()
        self.addr = AddrNames()
        self.live = None
        self.console = None
        self.check_hint, self.pods = check_hint, pods

    def start(self, header: dict) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text
        self.console = Console(file=self.out)
        self.live = Live(Text("waiting for hostPort traffic..."), console=self.console,
                         auto_refresh=False, transient=True, vertical_overflow="crop")
        self.live.start()

    def flows(self, batch: FlowBatch) -> None:
        tail = batch.select(slice(max(0, len(batch) - self.recent_flows.maxlen), None))
        self.recent_flows.extend((r["ts"], flow_line(r)) for r in tail.to_records(self.addr))

    def misses(self, recs: List[dict]) -> None:
        self.recent_misses.extend((r["ts"], miss_line(r)) for r in recs[-self.recent_misses.maxlen:])

    def events(self, n: int) -> List[str]:
        """The latest `n` events in time order: up to 2 latest misses, the rest the latest flows."""
        misses = list(self.recent_misses)[-2:]
        flows = list(self.recent_flows)[-max(n - len(misses), 0):] if n > len(misses) else []
        return [text for _, text in sorted(flows + misses, key=lambda e: e[0])][-n:]

    def current(self, summary: dict, now: Optional[float] = None) -> Optional[dict]:
        """Flows per second per mapping over the last RATE_WINDOW_S seconds (None: too early)."""
        import time
        from bpftrace_hostport.analysis.render import mapping_key
        now = time.monotonic() if now is None else now
        counts = {mapping_key(m): int(m.get("flows") or 0) for m in summary.get("mappings") or []}
        self.samples.append((now, counts))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW_S:
            self.samples.popleft()
        then, old = self.samples[0]
        if now - then < 0.5:
            return None
        return {k: max(v - old.get(k, 0), 0) / (now - then) for k, v in counts.items()}

    def tick(self, summary: dict) -> None:
        from rich.text import Text
        from bpftrace_hostport.analysis.render import render_live
        if self.live is None:
            return
        frame = render_live(summary, self.console.width, self.console.height, self.events(12),
                            current=self.current(summary), check_hint=self.check_hint, pods=self.pods)
        self.live.update(Text(frame, no_wrap=True, overflow="crop"), refresh=True)

    def close(self, summary: dict) -> None:
        from bpftrace_hostport.analysis.render import render_summary, wrap
        if self.live is not None:
            self.live.stop()
        width = self.console.width if self.console is not None else _width(self.out)
        self.out.write(render_summary(summary, width=width, check_hint=self.check_hint, pods=self.pods))
        events = self.events(8)
        if events:
            self.out.write("\nlatest events (times UTC):\n"
                           + "\n".join(ln for ev in events for ln in wrap(ev, width, "    ")) + "\n")
        self.out.flush()


def output_sink(fmt: str, out: TextIO = sys.stdout, check_hint: Optional[str] = None,
                pods=None) -> Sink:
    """The sink for --format: json lines, or a table (live on a terminal, text on a pipe)."""
    if fmt == "json":
        return JsonLinesSink(out)
    table = LiveSink if out.isatty() else TextSink
    return table(out, check_hint=check_hint, pods=pods)


class RecordingSink(Sink):
    """`--record PATH`: everything the session sees, in a crash-safe Arrow IPC stream."""
    needs = "records"

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
