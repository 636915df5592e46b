"""A tracing session: attach, read the kernel's aggregates, write records, summarize, detach.

Loop (all reads are of in-kernel aggregates, never one event per packet):
  * ring buffer: one record per flow when it is first answered;
  * every 0.25 s: unanswered flows older than --timeout are claimed from `pending`;
  * every 1 s: miss counters (deltas become "miss" records), local addresses refreshed.
At the end every flow still pending is reported unanswered, and the summary compares what
the kernel counted (flows created, per-mapping packets/bytes/drops) with what was reported:
any difference is reported as lost_events, never silently dropped.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import orjson

from . import events as ev
from . import netns as netns_mod
from .errors import UserError
from .pods.index import PodIndex
from .rules import read_node_rules
from .summary import FlowAggregate, render_summary, summarize


@dataclass
class TraceOptions:
    netns: Optional[str] = None
    duration: Optional[float] = None
    host_ports: Sequence[Tuple[str, int]] = ()     # explicit watch list (restricts)
    protos: Sequence[str] = ()
    client_cidrs: Sequence[str] = ()
    timeout: float = 5.0                           # no-answer timeout, seconds
    fmt: str = "json"                              # json | table
    ready_file: Optional[str] = None
    flow_table_size: int = 65536
    ringbuf_pages: int = 1024
    drops: bool = True
    use_rules: bool = True
    debug_print_program: bool = False


class _Stop:
    def __init__(self):
        self.flag = False

    def __call__(self, *_):
        self.flag = True


@dataclass
class TraceResult:
    agg: FlowAggregate = field(default_factory=FlowAggregate)   # flows, folded per mapping
    misses: List[dict] = field(default_factory=list)
    summary: Optional[dict] = None
    notes: List[str] = field(default_factory=list)


def watch_list(opts: TraceOptions, index: PodIndex) -> Tuple[List[Tuple[str, int]], List[str]]:
    """The hostPorts to watch: --host-port if given, else the pods' and the nat rules' ports."""
    notes: List[str] = []
    if opts.host_ports:
        return sorted(set(opts.host_ports)), notes
    ports = set(index.host_ports())
    if opts.use_rules:
        try:
            rules, _skipped = read_node_rules(opts.netns)
            ports |= {(r.proto.lower(), r.host_port) for r in rules}
        except UserError as e:
            notes.append(f"nat rules not read: {e}")
    return sorted(ports), notes


def run_trace(opts: TraceOptions, index: PodIndex, out: TextIO = sys.stdout,
              err: TextIO = sys.stderr) -> TraceResult:
    from .loader import Probe, ProbeOptions   # the BTF reader and syscalls, only when tracing

    netns_mod.require(opts.netns)
    watch, notes = watch_list(opts, index)
    for n in notes:
        print(f"note: {n}", file=err)
    probe = Probe(ProbeOptions(
        netns=opts.netns, watch_ports=watch, protos=opts.protos, client_cidrs=opts.client_cidrs,
        flow_table_size=opts.flow_table_size, ringbuf_pages=opts.ringbuf_pages, drops=opts.drops,
        debug_print_program=opts.debug_print_program))
    res = TraceResult(notes=notes)
    stop = _Stop()
    old_term = signal.signal(signal.SIGTERM, stop)
    old_int = signal.signal(signal.SIGINT, stop)
    ipr = netns_mod.open_iproute(opts.netns)
    clock = ev.Clock()
    names = index.names
    live = None
    drain = None
    try:
        probe.set_local_addrs(netns_mod.local_addresses(ipr))
        probe.attach()
        where = f"network namespace {opts.netns}" if opts.netns else "this network namespace"
        what = (", ".join(f"{p}/{proto}" for proto, p in watch) if watch
                else "every DNAT to a local address")
        print(f"Tracing hostPort DNAT in {where} ({what}); "
              f"{'drops via skb:kfree_skb; ' if probe.drops_enabled else 'drops not traced; '}"
              f"Ctrl-C to end.", file=err, flush=True)
        if not probe.drops_enabled and opts.drops:
            print("note: tracefs is not available, so drops are not traced.", file=err)
        if opts.ready_file:
            with open(opts.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        if opts.fmt == "table" and out.isatty():
            live = _LiveTable(out)

        recent = deque(maxlen=8)
        key_t, val_t, val_off = probe.event_layout()
        encoder = ev.FlowEncoder(key_t, val_t, val_off, clock, probe.drop_names, names)
        binary = getattr(out, "buffer", None) if opts.fmt == "json" else None

        def emit_flows(raws):
            lines = []
            for raw in raws:
                rec = encoder.record(raw)
                res.agg.add(rec)
                if opts.fmt == "json":
                    lines.append(orjson.dumps(rec))
                elif live is None:
                    out.write(_flow_line(rec) + "\n")
                else:
                    recent.append(_flow_line(rec))
            if lines:
                lines.append(b"")
                if binary is not None:
                    out.flush()
                    binary.write(b"\n".join(lines))
                else:
                    out.write(b"\n".join(lines).decode())

        miss_seen: Dict[ev.MissKey, int] = {}

        def poll_misses():
            for k, v in probe.read_misses():
                mk = ev.decode_miss(k)
                delta = int(v.count) - miss_seen.get(mk, 0)
                if delta <= 0:
                    continue
                miss_seen[mk] = int(v.count)
                rec = ev.miss_record(mk, delta, clock.wall(int(v.last_ns)))
                res.misses.append(rec)
                if opts.fmt == "json":
                    out.write(json.dumps(rec) + "\n")
                elif live is None:
                    out.write(f"MISS {rec['proto']} {rec['client_ip']} -> {rec['node_ip']}:"
                              f"{rec['host_port']} x{delta} (no DNAT)\n")

        watched = set(watch)
        drain = _RingDrain(probe)
        start = time.monotonic()
        next_pending = next_slow = start
        timeout_ns = int(opts.timeout * 1e9)
        while not stop.flag:
            now = time.monotonic()
            if opts.duration is not None and now - start >= opts.duration:
                break
            time.sleep(0.05)
            emit_flows(drain.take())
            now = time.monotonic()
            if now >= next_pending:
                next_pending = now + 0.25
                pend = probe.take_pending(ev.Clock.now_mono_ns() - timeout_ns)
                emit_flows([raw for raw in pend if raw is not None])   # None: evicted, counted lost
            if now >= next_slow:
                next_slow = now + 1.0
                poll_misses()
                encoder.forget_names()
                probe.set_local_addrs(netns_mod.local_addresses(ipr))
                if watch and not opts.host_ports:
                    # pods come and go (API watch, CRI): watch the hostPorts of new ones too
                    new = set(index.host_ports()) - watched
                    if new:
                        probe.set_watch_ports(sorted(new))
                        watched |= new
                if live is not None:
                    live.update(_summary(probe, res, time.monotonic() - start, index), recent)
            # Flush each round (<= 0.05 s of records): a capture killed with -9 keeps what was written.
            out.flush()
            if binary is not None:
                binary.flush()
        # Drain: answered records still in the ring, then every flow still unanswered.
        drain.stop()
        emit_flows(drain.take() + probe.consume())
        emit_flows([raw for raw in probe.take_pending(None) if raw is not None])
        poll_misses()
        res.summary = _summary(probe, res, time.monotonic() - start, index)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if live is not None:
            live.stop()
        if drain is not None:
            drain.stop()      # before the ring's mmap goes away
        probe.close()
        ipr.close()
    if opts.fmt == "json":
        out.write(json.dumps(res.summary) + "\n")
    else:
        out.write(render_summary(res.summary) + "\n")
    out.flush()
    return res


class _RingDrain:
    """Copies answered-flow records out of the ring buffer every 10 ms, in its own thread.

    The main loop encodes and writes them; when it stalls (a slow disk, a summary, a pause),
    the ring keeps draining into memory instead of filling up and losing records.
    """

    def __init__(self, probe):
        self.probe = probe
        self.buf: deque = deque()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ring-drain", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.01):
            recs = self.probe.consume()
            if recs:
                self.buf.extend(recs)

    def take(self) -> List[bytes]:
        out = []
        pop = self.buf.popleft
        try:
            for _ in range(len(self.buf)):
                out.append(pop())
        except IndexError:
            pass
        return out

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _summary(probe, res: TraceResult, duration: float, index) -> dict:
    stats = probe.read_stats()
    counters = []
    for k, flows, packets, nbytes in probe.read_mappings():
        d = ev.decode_mapping(k)
        d.update(flows=flows, packets=packets, bytes=nbytes)
        counters.append(d)
    drops = []
    for mk, reason, count in probe.read_drops():
        d = ev.decode_mapping(mk)
        d.update(reason=probe.drop_names.get(reason, f"REASON_{reason}"), count=int(count))
        drops.append(d)
    # Every flow the kernel created must have been reported once; the rest were lost
    # (ring buffer full, pending queue full, evicted from the flow table before reported).
    # Flows the table refused and counters that could not be created are lost too.
    lost = (max(0, stats["flows_created"] - len(res.agg)) + stats["flow_insert_errors"]
            + stats["counter_full"])
    s = summarize(res.agg, res.misses, counters, drops, duration, lost, pod_names=index.names)
    for m in s["mappings"]:
        if m["pod_ip"] is None:
            # misses only: no DNAT happened; name the hostNetwork pod that owns the port, if one does
            owner = index.host_network_owner(m["proto"], m["host_port"])
            if owner is not None:
                port = next((p for p in owner.ports if p.host_port == m["host_port"]), None)
                m.update(pod_namespace=owner.namespace, pod_name=owner.name,
                         port_name=port.name if port else None)
    s["kernel"] = stats
    return s


def _flow_line(r: dict) -> str:
    pod = f"{r['pod_namespace']}/{r['pod_name']}" if r["pod_name"] else "?"
    lat = f"{r['latency_us'] / 1000:.2f}ms" if r["latency_us"] is not None else "UNANSWERED"
    extra = []
    if r["masqueraded"]:
        extra.append(f"masq {r['snat_ip']}")
    if r["drop_reason"]:
        extra.append(f"drop {r['drop_reason']}")
    return (f"{r['ts'][11:23]} {r['proto']} {r['client_ip']}:{r['client_port']} -> "
            f"{r['node_ip']}:{r['host_port']} => {r['pod_ip']}:{r['pod_port']} {pod}"
            f"{' (' + r['port_name'] + ')' if r['port_name'] else ''} [{r['hook']}] {lat}"
            f"{' ' + ', '.join(extra) if extra else ''}")


class _LiveTable:
    """A rich Live view: the running summary and the latest flows, refreshed once a second."""

    def __init__(self, out: TextIO):
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text
        self._Text = Text
        self.console = Console(file=out)
        self.live = Live(Text("waiting for hostPort traffic..."), console=self.console,
                         auto_refresh=False, transient=True)
        self.live.start()

    def update(self, summary: dict, recent) -> None:
        text = render_summary(summary, width=self.console.width)
        if recent:
            text += "\n\nlatest flows:\n" + "\n".join(recent)
        self.live.update(self._Text(text), refresh=True)

    def stop(self) -> None:
        self.live.stop()
