"""The netfilter backend: eBPF on the netfilter BPF link, aggregated in the kernel.

What it hands the session:
  * answered flows from the ring buffer (one record per flow): read at each batch, and by
    a thread of its own whenever the kernel wakes it, so a stalled writer cannot make the
    kernel lose records;
  * flows still in the flow table after --timeout, claimed with lookup-and-delete (deleting
    the entry is the claim, so each flow is reported exactly once);
  * miss records: deltas of the in-kernel miss counters, once a second;
  * the kernel's per-mapping, drop and loss counters for the summary.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from typing import Dict, List, Optional, Tuple

from bpftrace_hostport.records.batch import FlowBatch
from bpftrace_hostport.collect.netfilter import decode as ev
from bpftrace_hostport.records import outcome as oc

# A flow's first_ns is the kernel's clock read just before the flow goes into `flows`
# (new_flow in bpf/hostport.bpf.c). How much later than that read the insert may land, with a
# wide margin: a virtual CPU can be stopped by its host between the two.
INSERT_SLACK_NS = 1_000_000_000


class NetfilterBackend:
    name = "netfilter"
    measures = {"latency": True, "packets": True, "misses": True, "drops": True}

    def __init__(self, opts, watch: List[Tuple[str, int]], probe=None):
        """probe: one already loaded for these options (outputs.load_probe); else it loads now."""
        from bpftrace_hostport.collect.netfilter.probe import Probe, probe_options   # BTF, syscalls
        self.opts = opts
        if probe is None:
            probe = Probe(probe_options(opts, watch))
        else:
            probe.set_options(probe_options(opts, watch))
        self.probe = probe
        self.clock = ev.Clock()
        self.decoder: Optional[ev.FlowDecoder] = None
        self.finished = False
        self.drain: Optional[_RingDrain] = None
        self.miss_seen: Dict[bytes, int] = {}    # a miss counter's raw key -> its count
        self.reported = 0
        self.quiet_until_ns = 0      # no flow in the table can reach --timeout before this
        self.claiming = False        # the last walk of the table claimed flows

    def start(self, local_addrs: List[str]) -> str:
        self.probe.set_local_addrs(local_addrs)
        self.probe.attach()
        key_t, val_t, val_off = self.probe.event_layout()
        self.decoder = ev.FlowDecoder(key_t, val_t, val_off, self.clock, self.probe.drop_names)
        self.drain = _RingDrain(self.probe)
        cached = "; eBPF programs from the compile cache" if self.probe.loaded_from_cache else ""
        # Another tracer (the agent, an on-call trace) already at the first priority: both see
        # every flow, each with its own programs; say where this one went and why.
        if self.probe.priority_note:
            cached += f"; at netfilter priority {self.probe.priority}, since {self.probe.priority_note}"
        if self.probe.drops_enabled:
            return "drops via skb:kfree_skb" + cached
        return "drops not traced" + ("" if not self.opts.drops else
                                     " (tracefs is not available)") + cached

    def set_local_addrs(self, addrs: List[str]) -> None:
        self.probe.set_local_addrs(addrs)

    def watch_more(self, ports) -> None:
        self.probe.set_watch_ports(ports)

    def _decode(self, raws: List[bytes], pending_after_ns: Optional[int] = None) -> FlowBatch:
        """Chunks of flow_event records (each one or many records back to back) -> a batch."""
        batch = self.decoder.decode(raws, pending_after_ns)
        self.reported += len(batch)
        return batch

    def poll(self) -> FlowBatch:
        return self._decode(self.drain.take(rest=True))

    def expire(self) -> FlowBatch:
        """The flows past --timeout, claimed from the table.

        The table is walked (a lookup and a claim per due flow) only when a flow can be due.
        Its flows' first_ns are read first, in one batch: none of them reaches the timeout
        before the earliest, and a flow still to come began no earlier than now less the
        slack. Until the earlier of the two plus the timeout the table is not looked at: with
        traffic that is answered, and without traffic, about once per timeout instead of four
        times a second (each look scans every bucket of the table, 65,536 by default). A due
        flow is still claimed at the first batch after its timeout. While flows are being
        claimed (a stream of unanswered ones) the table is walked at every batch, without the
        read first."""
        now = ev.Clock.now_mono_ns()
        if now < self.quiet_until_ns:
            return FlowBatch.empty()
        timeout_ns = int(self.opts.timeout * 1e9)
        if not self.claiming and timeout_ns > INSERT_SLACK_NS:    # (a shorter timeout: every batch)
            earliest = self.probe.flows_earliest_ns()
            bound = now - INSERT_SLACK_NS if earliest is None else min(earliest, now - INSERT_SLACK_NS)
            if bound + timeout_ns > now:
                self.quiet_until_ns = bound + timeout_ns
                return FlowBatch.empty()
        batch = self._decode(self.probe.take_pending(now - timeout_ns))
        self.claiming = len(batch) > 0
        return batch

    def misses(self) -> List[dict]:
        """Miss records for the counters that grew since the last call. Every counter is read
        every second, but only one that grew is decoded (addresses to text): the counters are
        remembered by their raw key."""
        out = []
        for k, v in self.probe.read_misses():
            raw, count = bytes(k), int(v.count)
            seen = self.miss_seen.get(raw, 0)
            if count > seen:
                self.miss_seen[raw] = count
                out.append(ev.miss_record(ev.decode_miss(k), count - seen, int(v.last_ns) + self.clock.offset_ns))
        return out

    def finish(self) -> FlowBatch:
        """Everything still in the kernel: answered records in the ring, then every flow in the table."""
        self.drain.stop()
        raws = self.drain.take() + [self.probe.consume()]
        raws += self.probe.take_pending(None)
        self.finished = True
        # Flows with nothing back that are younger than --timeout were cut short by the end of
        # tracing: pending, not unanswered.
        return self._decode(raws, ev.Clock.now_mono_ns() - int(self.opts.timeout * 1e9))

    def counters(self) -> dict:
        """The kernel's counters: per mapping, drops, and flows lost before they were reported."""
        stats = self.probe.read_stats()
        mappings = []
        for k, c in self.probe.read_mappings():
            d = ev.decode_mapping(k)
            d.update(flows=c["flows"], packets=c["packets"], bytes=c["bytes"],
                     answered=c["answered"], latency_sum_s=c["lat_sum_ns"] / 1e9,
                     latency_hist=c["lat_hist"],
                     refusals={oc.REFUSALS[i]: n for i, n in enumerate(c["refused"]) if i and n})
            mappings.append(d)
        drops = []
        for mk, reason, count in self.probe.read_drops():
            d = ev.decode_mapping(mk)
            d.update(reason=self.probe.drop_names.get(reason, f"REASON_{reason}"), count=int(count))
            drops.append(d)
        # Every flow the kernel created must be reported once; the rest were lost (a deferred
        # flow whose tuple was reused), and so are refused inserts and counters. While
        # tracing, flows still in flight are neither: only losses already certain are counted.
        errors = stats["flow_insert_errors"] + stats["counter_full"]
        if self.finished:
            # Counters only: the flows the kernel decided itself (answered, refused) are not
            # reported, by design; the rest of the flows it created are.
            lost = max(0, stats["flows_created"] - self.reported - stats["kernel_claimed"]) + errors
        else:
            lost = stats["reuse_lost"] + errors
        # answered/latency_*: flows the kernel claimed at their first reply. With records they
        # are also among the reported flows; without, they are exactly the ones not reported.
        return {"mappings": mappings, "drops": drops, "kernel": stats, "lost": lost,
                "reported": self.reported, "answered_in_kernel_only": not self.opts.flow_records}

    def close(self) -> None:
        if self.drain is not None:
            self.drain.stop()      # before the ring's mmap goes away
        self.probe.close()


class _RingDrain:
    """Copies answered-flow records out of the ring buffer in its own thread, so that a stalled
    sink cannot make the ring overflow: it sleeps on the ring until the kernel wakes it (every
    WAKE_EVERY records per CPU, see probe.wake_every: well before the ring could fill) and
    takes one chunk of records back to back per wake-up.

    The records submitted since the last wake-up are read by the loop at each batch
    (take(rest=True)), not by a timer in this thread: a timer would wake it four times a
    second on a node without traffic. A lock keeps the two readers of the ring apart."""

    def __init__(self, probe):
        self.probe = probe
        self.buf: deque = deque()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.wake_r, self.wake_w = os.pipe()          # stop() wakes the sleeping thread
        self.thread = threading.Thread(target=self._run, name="ring-drain", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ring = self.probe.ring
        while not self.done.is_set():
            ring.wait(None, (self.wake_r,))
            if self.done.is_set():
                break
            with self.lock:
                chunk = self.probe.consume()
                if chunk:
                    self.buf.append(chunk)

    def take(self, rest: bool = False) -> List[bytes]:
        """The chunks drained so far, oldest first; rest: then whatever is in the ring now."""
        with self.lock:
            out = list(self.buf)
            self.buf.clear()
            if rest:
                chunk = self.probe.consume()
                if chunk:
                    out.append(chunk)
        return out

    def stop(self) -> None:
        self.done.set()
        if self.wake_w >= 0:
            os.write(self.wake_w, b"x")
        if self.thread.is_alive():
            self.thread.join()
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1
