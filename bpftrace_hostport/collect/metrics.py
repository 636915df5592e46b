"""MetricsSink: the session's figures as Prometheus metrics, served over HTTP.

The tracer thread writes (tick, flows, misses, snapshot, set_findings); the HTTP thread reads on
each scrape. Both take one lock, briefly: a scrape copies the state under it and builds the
exposition outside it. Values are kept here, not in prometheus_client metric objects, because
the figures arrive as running totals to be set, not increments; a custom collector turns the
state into metric families on each scrape.

Where each figure comes from, so that the metrics and the summary cannot disagree:
* flows, answered, refused (by kind), unanswered, packets, bytes and drops: the running summary
  the session ticks the sinks with (the roll-up's figures, analysis/rollup.py, by its one rule:
  the records' outcome counts, plus the kernel's only for flows it decided without a record);
* the latency histogram, which the summary does not carry in Prometheus' buckets: the answered
  flows' records (batches), and the kernel's per-mapping histograms (kernel_counters);
* misses: the miss records (the kernel's counter deltas), by the hostPort's owner.

A mapping series is keyed by (proto, host_port, pod_ip, pod_port); its pod labels are filled
in as they become known (first known value per label wins, so a named series keeps its name).

The socket is made by the pre-flight checks (collect/preflight.py listen_socket) before the
programs are loaded, and served from once the session starts the sink.

Mappings known before any traffic (the pods' hostPorts and the node's DNAT rules, from the
session's snapshots) are exported at 0 from the start, with the refusal a closed port gives
(reset, port-unreachable, abort) and the miss series of their hostPort: Prometheus reads
`increase()` and `rate()` from the difference between samples, so a series that first appears
already holding its count hides that count (on 2.42 `increase(...[1m])` read 0 after a new
mapping's first 200 flows). A mapping no pod or rule announced still appears with its first
count; the shipped alerts count such a series' first value themselves (deploy/prometheusrule.yaml).

Label sets stay bounded:
* a mapping series that is no longer known (its pod and rule are gone) and whose figures have
  not grown for grace_s is retired: the running summary repeats every mapping ever seen, so
  "present in a tick" cannot mean "alive". A retired series keeps its values (hidden, up to
  max_series of them) so that if its mapping comes back its counters continue, not restart;
* at most max_series live mapping series; the flows of a mapping that cannot get one are
  counted in bpftrace_hostport_series_overflow_total;
* miss series neither known nor updated for grace_s, and findings at 0 for grace_s, are removed.
"""
from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections import Counter, OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records.batch import ADDR, AddrNames, FlowBatch, group_rows
from bpftrace_hostport.collect.preflight import listen_socket, parse_listen, where
from bpftrace_hostport.collect.sinks import Sink

PREFIX = "bpftrace_hostport_"
EXPORTED_METRICS: Tuple[str, ...] = tuple(PREFIX + n for n in (
    "flows_total", "answered_flows_total", "refused_flows_total", "unanswered_flows_total",
    "packets_total", "bytes_total", "latency_seconds",
    "misses_total", "drops_total", "lost_events_total", "check_findings",
    "series_overflow_total", "up"))

FLOW_LABELS = ("node", "proto", "host_port", "pod_ip", "pod_port", "namespace", "pod", "port_name")
MISS_LABELS = ("node", "proto", "host_port", "namespace", "pod")
# Bucket upper bounds in µs (the batch's unit): exact integers, so a latency equal to a bound
# lands in that bucket (Prometheus buckets are "less than or equal").
LATENCY_BOUNDS_US = np.array([10, 25, 50, 100, 250, 500, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4,
                              1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, np.inf])
LATENCY_BUCKETS = tuple(floatToGoString(b / 1e6) for b in LATENCY_BOUNDS_US)
NB = len(LATENCY_BOUNDS_US)
#: What a closed port answers, per protocol (nothing listens on the containerPort): the refusal
#: series a known mapping is exported with at 0, so that a first refusal is seen by increase().
CLOSED_PORT_REFUSAL = {"tcp": "reset", "udp": "port-unreachable", "sctp": "abort"}

_KEY_DTYPE = np.dtype([("proto", "u1"), ("family", "u1"), ("host_port", "u2"),
                       ("pod_addr", ADDR), ("pod_port", "u2")])

Key = Tuple[str, str, str, str]          # proto, host_port, pod_ip, pod_port (label text)
MissKey = Tuple[str, str, str, str]      # proto, host_port, owner namespace, owner pod
Names = Tuple[Optional[str], Optional[str], Optional[str]]     # namespace, pod, port name


class _Series:
    """One mapping's figures: running totals from the summary, the latency histogram from the
    records."""
    __slots__ = ("names", "flows", "answered", "refused", "unanswered", "packets", "bytes",
                 "drops", "buckets", "lat_sum", "last")

    def __init__(self):
        self.names = ["", "", ""]
        self.flows = self.answered = self.unanswered = self.packets = self.bytes = 0
        self.refused: Dict[str, int] = {}
        self.drops: Dict[str, int] = {}
        self.buckets = np.zeros(NB, np.int64)
        self.lat_sum = 0.0
        self.last = 0.0

    def fill(self, names) -> None:
        for i, v in enumerate(names):
            if not self.names[i] and v:
                self.names[i] = str(v)

    def absorb(self, m: dict) -> bool:
        """A summary mapping's running totals; True when one grew. Counters never go down:
        a total lower than what was exported keeps the exported value."""
        before = self.total()
        for f in ("flows", "answered", "unanswered", "packets", "bytes"):
            setattr(self, f, max(getattr(self, f), int(m.get(f) or 0)))
        for table, src in ((self.refused, m.get("refusals")), (self.drops, m.get("drops"))):
            for name, n in (src or {}).items():
                table[name] = max(table.get(name, 0), int(n))
        return self.total() != before

    def total(self) -> tuple:
        return (self.flows, self.answered, self.unanswered, self.packets, self.bytes,
                sum(self.refused.values()), sum(self.drops.values()))


def _series_key(m: dict) -> Key:
    """The series of a summary's (or the kernel's) mapping record."""
    return (str(m["proto"]).lower(), str(int(m["host_port"])), str(m["pod_ip"]),
            str(int(m.get("pod_port") or 0)))


def known_mappings(kind: str, items: Iterable[dict], pods: Iterable[dict] = (), node: Optional[str] = None
                   ) -> Tuple[Dict[Key, Names], Set[MissKey]]:
    """What a pods or rules snapshot announces: the mapping series (with their names) and the
    miss series of their hostPorts, keyed as the traffic's will be. A hostNetwork pod's port has
    no mapping (no DNAT) and its misses carry the pod as owner; every other hostPort's misses
    have no owner. `pods` names the targets of rules; a pod bound to another node than `node`
    (a cluster's whole pod list given as --pods) announces nothing here."""
    series: Dict[Key, Names] = {}
    misses: Set[MissKey] = set()
    if kind == "pods":
        for p in items:
            if node and p.get("node") and p["node"] != node:
                continue
            for cp in p.get("ports") or ():
                if not cp.get("host_port"):
                    continue
                proto, hp = str(cp.get("protocol") or "TCP").lower(), str(int(cp["host_port"]))
                if p.get("host_network"):
                    misses.add((proto, hp, p.get("namespace") or "", p.get("name") or ""))
                    continue
                misses.add((proto, hp, "", ""))
                for ip in p.get("ips") or ():
                    series[(proto, hp, str(ip), str(int(cp["container_port"])))] = (
                        p.get("namespace"), p.get("name"), cp.get("name"))
    elif kind == "rules":
        by_target = {}
        for p in pods:
            if p.get("host_network"):
                continue
            for cp in p.get("ports") or ():
                for ip in p.get("ips") or ():
                    by_target[(str(cp.get("protocol") or "TCP").lower(), str(ip),
                               int(cp["container_port"]))] = (p.get("namespace"), p.get("name"), cp.get("name"))
        for r in items:
            proto, hp = str(r["proto"]).lower(), str(int(r["host_port"]))
            misses.add((proto, hp, "", ""))
            series[(proto, hp, str(r["target_ip"]), str(int(r["target_port"])))] = by_target.get(
                (proto, str(r["target_ip"]), int(r["target_port"])), (None, None, None))
    return series, misses


class MetricsSink(Sink):
    needs = "counters"        # the kernel's counters and the running summary, no record per flow
    tick_latency = False      # latency comes from histograms (kernel, batches), not the summary

    def __init__(self, node: str, listen: str = "127.0.0.1:9469", *, grace_s: float = 300.0,
                 max_series: int = 10000, clock=time.monotonic,
                 sock: Optional[socket.socket] = None):
        """sock: a socket already listening (listen_socket), served from instead of binding."""
        self.node, self.grace_s, self.max_series, self.clock = node, grace_s, max_series, clock
        self.listen = parse_listen(listen)
        self.sock = sock
        self.lock = threading.Lock()
        self.series: Dict[Key, _Series] = {}
        self.retired: "OrderedDict[Key, _Series]" = OrderedDict()
        self.miss_counts: Dict[MissKey, list] = {}          # key -> [count, last update]
        self.findings: Dict[Tuple[str, str], list] = {}    # key -> [count, last nonzero]
        self.overflow = self.lost = 0
        self.overflow_seen: Dict[Key, int] = {}            # flows of mappings without a series
        # What the pods and rules snapshots announce (known_mappings), by snapshot kind.
        self.snapshots: Dict[str, list] = {"pods": [], "rules": []}
        self.known: Dict[Key, Names] = {}
        self.known_misses: Set[MissKey] = set()
        # latency counted in the kernel, per series key: (bucket counts, latency sum in s);
        # `additive`: they are flows never reported (no flow records)
        self.kernel: Dict[Key, Tuple[np.ndarray, float]] = {}
        self.additive = False
        self.ready = False
        self.measures = {"latency": True, "packets": True, "misses": True, "drops": True}
        self.addr = AddrNames()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.server: Optional[_Server] = None
        self.thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        return tuple(self.server.server_address[:2]) if self.server else self.listen

    # -- the server --------------------------------------------------------------------------
    def start(self, header: dict) -> None:
        with self.lock:
            self.measures.update(header.get("measures") or {})
        if self.server is not None:
            return
        sock, self.sock = self.sock, None
        if sock is None:
            sock = listen_socket(where(*self.listen))
        self.server = _Server(sock, self)
        self.thread = threading.Thread(target=self.server.serve, name="metrics-http", daemon=True)
        self.thread.start()
        self.set_ready(True)          # the session starts sinks once the backend is attached

    def close(self, summary: Optional[dict]) -> None:
        if summary is not None:
            self.tick(summary)
        self.set_ready(False)
        if self.server is not None:
            self.server.stop()
            self.thread.join(5)
            self.server.server_close()
            self.server = None
        if self.sock is not None:          # never started: the pre-flight's socket
            self.sock.close()
            self.sock = None

    def set_ready(self, ready: bool) -> None:
        with self.lock:
            self.ready = bool(ready)

    # -- the figures -------------------------------------------------------------------------
    def _place(self, key: Key, s: _Series, now: float) -> bool:
        """Makes s the live series of key unless the cap is reached."""
        if key not in self.series:
            if len(self.series) >= self.max_series:
                return False
            self.retired.pop(key, None)
            self.series[key] = s
        s.last = now
        return True

    def _get(self, key: Key) -> _Series:
        return self.series.get(key) or self.retired.get(key) or _Series()

    def snapshot(self, kind: str, items: List[dict]) -> None:
        """The pods and the node's rules as the session snapshots them (at the start and when
        they change): their mappings are exported at 0 until traffic comes."""
        if kind not in self.snapshots:
            return
        self.snapshots[kind] = list(items)
        known: Dict[Key, Names] = {}
        misses: Set[MissKey] = set()
        for k in ("rules", "pods"):          # the pods' own names win over a rule's lookup
            s, m = known_mappings(k, self.snapshots[k], self.snapshots["pods"], self.node)
            known.update(s)
            misses |= m
        with self.lock:
            now = self.clock()
            self.known, self.known_misses = known, misses
            for key, names in known.items():
                s = self._get(key)
                if self._place(key, s, now):
                    s.fill(names)
                    s.refused.setdefault(CLOSED_PORT_REFUSAL.get(key[0], "reset"), 0)
            for key in misses:
                self.miss_counts.setdefault(key, [0, now])

    def flows(self, batch: FlowBatch) -> None:
        """The latency histogram of the batch's answered flows (every count is the summary's)."""
        lat = batch["latency_us"]
        rows = np.flatnonzero(batch["answered"] & ~batch["midstream"] & ~np.isnan(lat))
        if len(rows) == 0:
            return
        first, inv = group_rows(*(batch[name][rows] for name in _KEY_DTYPE.names))
        g = len(first)
        lat = lat[rows]
        idx = np.searchsorted(LATENCY_BOUNDS_US, lat, side="left")
        hist = np.bincount(inv * NB + idx, minlength=g * NB).reshape(g, NB)
        lat_sum = np.bincount(inv, weights=lat, minlength=g) / 1e6
        pod = batch["pod"][rows]
        group_pod = np.full(g, -1, np.int64)
        group_pod[inv[pod >= 0]] = pod[pod >= 0]       # any named flow names its mapping
        firsts = rows[first]
        with self.lock:
            now = self.clock()
            for j, i in enumerate(firsts.tolist()):
                key = (protomod.name(batch["proto"][i]), str(int(batch["host_port"][i])),
                       self.addr(batch["pod_addr"][i].tobytes(), int(batch["family"][i])),
                       str(int(batch["pod_port"][i])))
                s = self._get(key)
                if not self._place(key, s, now):
                    continue                       # its flows count as overflow at the tick
                if group_pod[j] >= 0:
                    s.fill(batch.pods[group_pod[j]])
                s.buckets += hist[j]
                s.lat_sum += float(lat_sum[j])

    def misses(self, recs: List[dict]) -> None:
        with self.lock:
            now = self.clock()
            for r in recs:
                key = (protomod.name(protomod.number(r["proto"])), str(int(r["host_port"])),
                       r.get("pod_namespace") or "", r.get("pod_name") or "")
                entry = self.miss_counts.setdefault(key, [0, now])
                entry[0] += int(r.get("count") or 0)
                entry[1] = now

    def tick(self, summary: dict) -> None:
        with self.lock:
            now = self.clock()
            for m in summary.get("mappings") or ():
                if m.get("pod_ip") is None:          # misses only: no DNAT, no flow series
                    continue
                key = _series_key(m)
                s = self._get(key)
                # an unchanged total is the summary repeating itself, not a sign of life;
                # over the cap a new mapping's flows are counted as overflow
                if s.absorb(m):
                    if self._place(key, s, now):
                        s.fill((m.get("pod_namespace"), m.get("pod_name"), m.get("port_name")))
                    else:
                        flows = int(m.get("flows") or 0)
                        self.overflow += max(0, flows - self.overflow_seen.get(key, 0))
                        self.overflow_seen[key] = flows
            self.lost = max(self.lost, int(summary.get("lost_events") or 0))
            self._expire(now)

    def kernel_counters(self, counters: dict) -> None:
        """The kernel's per-mapping latency histograms (netfilter backend). With flow records
        they count flows the records also carry (the larger figure wins); without, flows no
        record carries (they add up)."""
        fresh = {}
        for m in counters.get("mappings") or ():
            hist = m.get("latency_hist")
            if hist is None or m.get("pod_ip") is None:
                continue
            fresh[_series_key(m)] = (np.asarray(hist, np.int64), float(m.get("latency_sum_s") or 0.0))
        with self.lock:
            self.additive = bool(counters.get("answered_in_kernel_only"))
            self.kernel.update(fresh)

    def _latency(self, key: Key, s: _Series) -> Tuple[np.ndarray, float]:
        """Bucket counts and latency sum: the records' and the kernel's together (the one rule
        of analysis/rollup.py: added when the kernel decided flows no record carries, else the
        one that has seen more)."""
        k = self.kernel.get(key)
        if k is None:
            return s.buckets.copy(), s.lat_sum
        if self.additive:
            return s.buckets + k[0], s.lat_sum + k[1]
        # The same flows counted twice: one source as a whole (bucket by bucket they may
        # differ at a bound: records carry latency rounded to 0.1 µs).
        return (k[0].copy(), k[1]) if k[0].sum() >= s.buckets.sum() else (s.buckets.copy(), s.lat_sum)

    def set_findings(self, findings: List[dict]) -> None:
        counts = Counter((str(f["code"]), str(f["severity"])) for f in findings)
        with self.lock:
            now = self.clock()
            for key, entry in self.findings.items():
                if key not in counts:
                    entry[0] = 0
            for key, n in counts.items():
                self.findings[key] = [n, now]
            self._expire(now)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self.series.items()
                    if now - s.last >= self.grace_s and k not in self.known]:
            self.retired[key] = self.series.pop(key)
        while len(self.retired) > self.max_series:
            self.retired.popitem(last=False)
        for key in [k for k, (v, t) in self.miss_counts.items()
                    if now - t >= self.grace_s and k not in self.known_misses]:
            del self.miss_counts[key]
        for key in [k for k, (v, t) in self.findings.items() if now - t >= self.grace_s and not v]:
            del self.findings[key]

    # -- exposition --------------------------------------------------------------------------
    def collect(self):
        with self.lock:
            rows = [((self.node,) + k + tuple(s.names), s, *self._latency(k, s))
                    for k, s in self.series.items()]
            rows = [(labels, s.flows, s.packets, s.bytes, dict(s.drops), s.answered, hist, lat_sum,
                     dict(s.refused), s.unanswered) for labels, s, hist, lat_sum in rows]
            misses = [((self.node,) + k, v[0]) for k, v in self.miss_counts.items()]
            findings = [((self.node,) + k, v[0]) for k, v in self.findings.items()]
            overflow, lost, ready, measures = self.overflow, self.lost, self.ready, dict(self.measures)
        yield from _flow_families(rows, measures)
        yield _family(CounterMetricFamily, "misses", "New connections to a watched hostPort that "
                      "were not DNATed (owner: the hostNetwork pod holding the port).", MISS_LABELS, misses)
        yield _family(CounterMetricFamily, "lost_events", "Flows (connections) the kernel could not "
                      "track: a full flow table (--flow-table).", ("node",), [((self.node,), lost)])
        yield _family(GaugeMetricFamily, "check_findings", "Node check findings by code and severity.",
                      ("node", "code", "severity"), findings)
        yield _family(CounterMetricFamily, "series_overflow", "Flows whose mapping got no series "
                      "because of the series cap.", ("node",), [((self.node,), overflow)])
        yield _family(GaugeMetricFamily, "up", "1 while the tracer is attached and ready.", ("node",),
                      [((self.node,), int(ready))])


def _family(cls, name: str, doc: str, labels, samples):
    fam = cls(PREFIX + name, doc, labels=labels)
    for values, v in samples:
        fam.add_metric(list(values), v)
    return fam


def _flow_families(rows, measures: dict):
    """Per-mapping families; what the backend does not measure is absent, never 0."""
    yield _family(CounterMetricFamily, "flows", "Flows DNATed to a hostPort mapping.", FLOW_LABELS,
                  [(r[0], r[1]) for r in rows])
    yield _family(CounterMetricFamily, "answered_flows", "Flows that got a real answer (a reset or "
                  "an ICMP error is a refusal, not an answer).", FLOW_LABELS, [(r[0], r[5]) for r in rows])
    yield _family(CounterMetricFamily, "refused_flows", "Flows refused: a TCP reset, an SCTP ABORT or an "
                  "ICMP error came back, by what refused them.", FLOW_LABELS + ("refusal",),
                  [(r[0] + (kind,), n) for r in rows for kind, n in sorted(r[8].items())])
    yield _family(CounterMetricFamily, "unanswered_flows", "Flows with nothing back within --timeout.",
                  FLOW_LABELS, [(r[0], r[9]) for r in rows])
    if measures.get("packets"):
        yield _family(CounterMetricFamily, "packets", "Packets of the mapping's flows, both "
                      "directions.", FLOW_LABELS, [(r[0], r[2]) for r in rows])
        yield _family(CounterMetricFamily, "bytes", "Bytes of the mapping's flows, both directions.",
                      FLOW_LABELS, [(r[0], r[3]) for r in rows])
    if measures.get("drops"):
        yield _family(CounterMetricFamily, "drops", "Translated packets dropped, by kernel drop "
                      "reason.", FLOW_LABELS + ("reason",),
                      [(r[0] + (reason,), n) for r in rows for reason, n in sorted(r[4].items())])
    if measures.get("latency"):
        hist = HistogramMetricFamily(PREFIX + "latency_seconds", "First packet to first reply of "
                                     "answered flows (not midstream).", labels=FLOW_LABELS,
                                     unit="seconds")
        for r in rows:
            cum = np.cumsum(r[6]).tolist()
            hist.add_metric(list(r[0]), list(zip(LATENCY_BUCKETS, cum)), r[7])
        yield hist


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    timeout = 0                # handle_request() takes the connection serve() saw, or returns

    def __init__(self, sock: socket.socket, sink: MetricsSink):
        """Serves from `sock`, already bound and listening (listen_socket)."""
        self.address_family = sock.family  # read by TCPServer.__init__ when it makes its socket
        self.sink = sink
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe()
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()                # the one TCPServer made: ours is bound already
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def serve(self) -> None:
        """Serves requests until stop(), sleeping on the listening socket and on a pipe that
        stop() writes to. serve_forever() would wake every poll_interval to see whether it
        should stop: ten times a second, for a scrape every few seconds."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            sel.register(self.wake_r, selectors.EVENT_READ)
            while not self.stopping:
                for key, _ in sel.select():
                    if key.fileobj is self.socket and not self.stopping:
                        self.handle_request()

    def stop(self) -> None:
        self.stopping = True
        os.write(self.wake_w, b"x")

    def server_close(self) -> None:
        super().server_close()
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        sink = self.server.sink
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, ctype = choose_encoder(self.headers.get("Accept"))
            self._send(200, ctype, encoder(sink.registry))
        elif path == "/healthz":
            ready = sink.ready
            self._send(200 if ready else 503, "text/plain; charset=utf-8",
                       b"ok\n" if ready else b"not ready\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass                               # a scrape every few seconds must not fill stderr
