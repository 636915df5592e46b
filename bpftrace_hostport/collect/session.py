"""A tracing session: one loop for every backend, feeding every sink.

    backend (netfilter eBPF | conntrack events)
      -> FlowBatch (columns)  -> Enricher (pod names, once per batch)
      -> Rollup (analysis/rollup.py: the running figures)  and  every sink (json, text, live,
         recording, metrics)

The loop sleeps until something is due (a signal cuts the sleep short), hands answered flows
and the flows that timed out over as one batch every 250 ms, and every second reads misses and the kernel's
counters, re-reads the node's addresses when the kernel announces a change, refreshes the hostPorts to watch, and ticks the sinks
with the running summary.
At the end every flow still in the kernel is reported, and the summary compares what the
kernel counted with what was reported: the difference is lost_events, never silent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import select
import platform
import signal
import socket
import sys
import time
from typing import Dict, List, Optional, TextIO, Tuple

from bpftrace_hostport import __version__, netns as netns_mod
from bpftrace_hostport.analysis.rollup import Rollup
from bpftrace_hostport.analysis.summary import summary_record
from bpftrace_hostport.records import anonymize
from bpftrace_hostport.records.batch import FlowBatch, ns_to_iso
from bpftrace_hostport.collect import logline
from bpftrace_hostport.collect.enrich import Enricher
from bpftrace_hostport.collect.options import Stop, TraceOptions
from bpftrace_hostport.collect.sinks import Sink
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records.schema import SCHEMA_VERSION


BATCH_PERIOD_S = 0.25     # answered and timed-out flows go to the sinks this often
SNAPSHOT_PODS_S = 5.0     # how often the pods are compared with the last snapshot
SNAPSHOT_RULES_S = 30.0   # the same for the node's hostPort rules (a read of the nat rules)
SLOW_PERIOD_S = 1.0       # misses, the node's addresses, new hostPorts, the sinks' tick


def batch_due(due: float, now: float) -> float:
    """When the batch after the one due at `due` is due, seen at `now`: batches keep to a grid
    of BATCH_PERIOD_S, so that every fourth one is also the once-a-second turn, unless the
    loop fell a whole period behind (a slow sink): then the next one is a period from now,
    never a burst of batches to catch up."""
    nxt = due + BATCH_PERIOD_S
    return nxt if nxt > now else now + BATCH_PERIOD_S


def node_name(opts: TraceOptions) -> str:
    return opts.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def watch_list(opts: TraceOptions, index) -> Tuple[List[Tuple[str, int]], List[str]]:
    """The hostPorts to watch: --host-port if given, else the pods' and the nat rules' ports."""
    from bpftrace_hostport.node.rules import read_node_rules
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


def kernel_view(c: dict) -> Optional[dict]:
    """A backend's counters (backend.counters()) as the roll-up takes a session's kernel side:
    per mapping its flows, packets, bytes, answered and refusals, with the drop counters
    joined onto their mapping. None when the backend counts nothing per mapping."""
    if c.get("mappings") is None:
        return None
    maps = {}
    for m in c["mappings"]:
        key = (m["proto"], m["family"], m["host_port"], m["pod_ip"], m["pod_port"])
        maps[key] = dict(m, drops={})
    for d in c.get("drops") or []:
        key = (d["proto"], d["family"], d["host_port"], d["pod_ip"], d["pod_port"])
        m = maps.setdefault(key, {k: d[k] for k in ("proto", "family", "host_port", "pod_ip", "pod_port")}
                            | {"flows": 0, "packets": 0, "bytes": 0, "drops": {}})
        m["drops"][d["reason"]] = m["drops"].get(d["reason"], 0) + int(d["count"])
    return {"mappings": list(maps.values()), "lost_events": c.get("lost"),
            "answered_in_kernel_only": bool(c.get("answered_in_kernel_only"))}


def capture_header(opts: TraceOptions, backend, started_ns: int) -> dict:
    """The first record of every capture (schema CAPTURE)."""
    return {"type": "capture", "schema": SCHEMA_VERSION, "tool": f"bpftrace-hostport {__version__}",
            "session": os.urandom(8).hex(), "backend": backend.name, "node": node_name(opts), "kernel": platform.release(),
            "netns": opts.netns, "started": ns_to_iso(started_ns),
            "options": {"host_ports": [f"{p}/{proto}" for proto, p in opts.host_ports],
                        "protos": list(opts.protos), "clients": list(opts.client_cidrs),
                        "timeout_s": opts.timeout},
            "measures": dict(backend.measures)}


def check_ready_file(path: Optional[str]) -> None:
    """Fails before attaching when the ready file could not be written."""
    if path is None:
        return
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UserError(f"Cannot write the ready file {path}: its directory {d} does not exist "
                        "or is not writable; give a path in a writable directory.")


class _SignalWake:
    """Sleeps that a signal cuts short: the signal module writes a byte to a pipe on every
    signal (signal.set_wakeup_fd), and the sleep is a select on that pipe."""

    def __enter__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.old = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        return self

    def sleep(self, seconds: float) -> None:
        try:
            ready, _, _ = select.select([self.r], [], [], seconds)
        except InterruptedError:
            return
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.r, 512)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.old)
        os.close(self.r)
        os.close(self.w)


_Stop = Stop


class Session:
    def __init__(self, opts: TraceOptions, index, backend, sinks: List[Sink], watch,
                 err: Optional[TextIO] = None, stop: Optional[Stop] = None,
                 anonymize_key: Optional[bytes] = None):
        self.opts, self.index, self.backend, self.sinks = opts, index, backend, sinks
        self._err = err
        self.watch = list(watch)
        # --anonymize: the clients are replaced here, once, before any sink sees them, so every
        # output (JSON lines, text, the live view, the recording) holds the same pseudonyms
        self.anon = None
        if anonymize_key is not None:
            from bpftrace_hostport.records.anonymize import Anonymizer
            self.anon = Anonymizer(anonymize_key)
        self.agg = Rollup(series=False, clients=False)
        self.enrich = Enricher(index)
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.snap_due = {"pods": 0.0, "rules": 0.0}        # when the next look at each is due
        self.snap_last: Dict[str, tuple] = {}
        self.stop = stop if stop is not None else Stop()
        self.failure: Optional[UserError] = None     # a sink that failed (e.g. a full disk)
        self.addrs_due = 0.0                         # when the node's addresses are re-read anyway
        self.ended: Optional[str] = None             # why tracing ended by itself

    @property
    def err(self) -> TextIO:
        """Where notes go: sys.stderr as it is now (the live view routes it above its frame)."""
        return self._err if self._err is not None else sys.stderr

    # -- the pipeline ------------------------------------------------------------------------
    def _flows(self, batch) -> None:
        if len(batch) == 0:
            return
        if self.anon is not None:
            batch = anonymize.batch(self.anon, batch)
        self.enrich.flows(batch)
        self.agg.add_flows(batch)
        self._each("flows", batch)

    def _owner(self, proto: str, host_port: int):
        """The hostNetwork pod owning a hostPort without DNAT: (namespace, name, port name)."""
        owner = self.index.host_network_owner(proto, host_port)
        if owner is None:
            return None
        port = next((p for p in owner.ports if p.host_port == host_port), None)
        return owner.namespace, owner.name, port.name if port else None

    def _misses(self, recs: List[dict]) -> None:
        if not recs:
            return
        if self.anon is not None:
            recs = anonymize.misses(self.anon, recs)
        self.enrich.misses(recs)
        self.agg.add_misses(recs)
        self._each("misses", recs)

    def _each(self, method: str, *args) -> None:
        """Calls every sink; one that fails with a UserError (a full disk, a port in use) is
        dropped, tracing stops, and the others still get the summary."""
        for s in list(self.sinks):
            try:
                getattr(s, method)(*args)
            except UserError as e:
                self.sinks.remove(s)
                self.failure = self.failure or e
                self.stop.flag = True

    def summary(self, latency: bool = True) -> dict:
        """The running (or final) summary, from the kernel's counters read now; the sinks get
        those raw counters first (kernel_counters)."""
        c = self.backend.counters()
        self._each("kernel_counters", c)
        duration = time.monotonic() - self.started
        sess = self.agg.session()
        sess.backend, sess.measures = self.backend.name, dict(self.backend.measures)
        sess.started_ns = self.started_ns
        sess.ended_ns = self.started_ns + int(duration * 1e9)
        fig = self.agg.figures(kernel=kernel_view(c), pod_names=self.index.names,
                               owner=self._owner, latency=latency)
        s = summary_record(fig, duration, c["lost"])
        s["flows_reported"] = c.get("reported")
        s["backend"] = self.backend.name
        if c.get("kernel") is not None:
            s["kernel"] = c["kernel"]
        return s

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        """Attach, trace until --duration, a signal or a failing sink, detach, and give every sink
        the summary. Ctrl-C or SIGTERM at any moment only sets the stop flag (the handlers stay
        until the sinks are closed): before the programs are attached nothing is attached and
        None is returned; after, tracing ends at once and every sink is closed with what was
        seen (a recording always gets its end row)."""
        opts, backend = self.opts, self.backend
        check_ready_file(opts.ready_file)
        old = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        started = False
        try:
            if self.stop.flag:
                backend.close()
                logline.note("stopped before tracing started: nothing was traced.", self.err)
                return None
            ipr = netns_mod.open_iproute(opts.netns)
            self.addr_watch = netns_mod.AddressWatch(opts.netns)
            try:
                how = backend.start(netns_mod.local_addresses(ipr))
                self.started = time.monotonic()
                self.started_ns = time.time_ns()
                header = anonymize.header(self.anon, capture_header(opts, backend, self.started_ns))
                started = True
                self._each("start", header)
                self._snapshots()
                self._announce(how)
                # Everything made so far (modules, pod index, sinks) lives as long as the session:
                # frozen out of the garbage collector's sweeps, which then see only what the loop
                # makes (a full sweep of ~10^5 startup objects costs milliseconds, again and again).
                gc.collect()
                gc.freeze()
                self._loop(ipr)
                self._flows(backend.finish())
                self._misses(backend.misses())
                summary = self.summary()
            except BaseException:
                if started:              # the sinks still get what was seen: an end row, the terminal back
                    self._close_after_failure()
                raise
            finally:
                backend.close()
                ipr.close()
                self.addr_watch.close()
            if self.ended:
                logline.note(self.ended, self.err)
            self._each("close", summary)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if self.failure is not None:
            raise self.failure
        return summary

    def _close_after_failure(self) -> None:
        """Closes every sink after the loop failed, with the best summary there is."""
        try:
            summary = self.summary()
        except Exception:                                     # the backend is what failed
            fig = self.agg.figures(pod_names=self.index.names)
            summary = summary_record(fig, time.monotonic() - self.started, None)
        for s in list(self.sinks):
            try:
                s.close(summary)
            except Exception:
                pass

    def _announce(self, how: str) -> None:
        """The start banner: shown by a sink that shows it (the live view, above its frame),
        else on stderr, wrapped at spaces to stderr's terminal."""
        opts = self.opts
        where = f"network namespace {opts.netns}" if opts.netns else "this network namespace"
        what = (", ".join(f"{p}/{proto}" for proto, p in self.watch) if self.watch
                else "every DNAT to a local address")
        text = (f"Tracing hostPort DNAT in {where} ({what}) with the {self.backend.name} backend; "
                f"{how}; Ctrl-C to end." + (" Client addresses are pseudonyms (--anonymize)."
                                           if self.anon is not None else ""))
        if logline.json_lines():
            logline.emit("tracing", text, err=self.err, netns=opts.netns,
                         host_ports=[f"{p}/{proto}" for proto, p in self.watch], backend=self.backend.name)
        elif not any(getattr(s, "shows_banner", False) for s in self.sinks):
            from bpftrace_hostport.analysis.render import paragraph, terminal_width
            tty = getattr(self.err, "isatty", lambda: False)()
            print("\n".join(paragraph(text, terminal_width(self.err) if tty else None)), file=self.err,
                  flush=True)
        self._each("announce", text)
        if opts.ready_file:
            with open(opts.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")

    def _loop(self, ipr) -> None:
        """Wakes when a batch is due (every 250 ms), at the end of --duration, or on a signal;
        nothing else runs in between. The once-a-second work runs at every fourth batch."""
        opts = self.opts
        due = next_slow = time.monotonic()
        end = None if opts.duration is None else self.started + opts.duration
        with _SignalWake() as wake:
            while not self.stop.flag:
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                wake.sleep(max(0.0, min(due, end if end is not None else due) - now))
                if self.stop.flag:
                    break
                now = time.monotonic()
                if now < due:
                    continue                  # a signal, or the end of --duration
                tick, due = due, batch_due(due, now)
                # Answered and timed-out flows go to the sinks four times a second, as one
                # batch: every sink's cost per batch (an Arrow record batch, a flush) is spread
                # over more flows. The drain thread keeps the ring buffer empty meanwhile.
                self._flows(FlowBatch.concat([self.backend.poll(), self.backend.expire()]))
                # The once-a-second work rides on a batch's wake-up rather than a wake-up of
                # its own (each costs the sleeping process a cold start of the loop).
                if tick >= next_slow - BATCH_PERIOD_S / 2:
                    next_slow = tick + SLOW_PERIOD_S
                    self._slow(ipr)

    def _slow(self, ipr) -> None:
        if self.opts.netns and not os.path.exists(netns_mod.path_of(self.opts.netns)):
            # Its hooks went with it: nothing more can be seen. End cleanly, with the summary.
            self.ended = (f"network namespace {self.opts.netns} was deleted: tracing ended.")
            self.stop.flag = True
            return
        self._misses(self.backend.misses())
        self.enrich.forget()
        # The node's addresses: re-read when the kernel announces a change (and every 30 s in
        # any case), not dumped every second.
        now = time.monotonic()
        if self.addr_watch.changed() or now >= self.addrs_due:
            self.addrs_due = now + 30.0
            self.backend.set_local_addrs(netns_mod.local_addresses(ipr))
        if self.watch and not self.opts.host_ports:
            # pods come and go (API watch, CRI): watch the hostPorts of new ones too
            new = set(self.index.host_ports()) - set(self.watch)
            if new:
                self.backend.watch_more(sorted(new))
                self.watch += sorted(new)
        self._snapshots(now)
        ticking = [s for s in self.sinks if type(s).tick is not Sink.tick]
        if ticking:
            self._each("tick", self.summary(latency=any(s.tick_latency for s in ticking)))

    def _snapshots(self, now: Optional[float] = None) -> None:
        """What a review needs once the node is gone: the pods and the node's hostPort rules, at
        the start and again whenever they change (looked at every SNAPSHOT_PODS_S and
        SNAPSHOT_RULES_S seconds), so that a review later explains a flow with the pods and
        rules of its time."""
        wants = [s for s in self.sinks if type(s).snapshot is not Sink.snapshot]
        if not wants:
            return
        now = time.monotonic() if now is None else now
        if now >= self.snap_due["pods"]:
            self.snap_due["pods"] = now + SNAPSHOT_PODS_S
            pods = tuple(_pods(self.index))
            if pods != self.snap_last.get("pods"):
                self.snap_last["pods"] = pods
                self._each("snapshot", "pods", [dataclasses.asdict(p) for p in pods])
        if now >= self.snap_due["rules"]:
            self.snap_due["rules"] = now + SNAPSHOT_RULES_S
            rules: tuple = ()
            if self.opts.use_rules:
                from bpftrace_hostport.node.rules import read_node_rules
                try:
                    rules = tuple(read_node_rules(self.opts.netns)[0])
                except UserError:
                    rules = self.snap_last.get("rules", ())
            if rules != self.snap_last.get("rules"):
                self.snap_last["rules"] = rules
                self._each("snapshot", "rules", [dataclasses.asdict(r) for r in rules])


def _pods(index) -> list:
    pods = getattr(index, "pods", None)
    return list(pods() if callable(pods) else (pods or []))
