"""The fallback backend: conntrack netlink events (pyroute2), for kernels without the
netfilter BPF link (< 6.4) or when asked with `--backend conntrack`.

Conntrack reports each connection's NAT once it is set up, so the same flow records can be
written, minus what only the packet path knows: latency, packets/bytes (null unless
nf_conntrack_acct is on), misses and drops (not seen: unknown, never 0). Events come per network namespace,
so the socket is opened inside the node's namespace. A netlink overrun (ENOBUFS) loses
events: each one is counted in lost_events.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

from bpftrace_hostport import netns as netns_mod, proto as protomod
from bpftrace_hostport.records.batch import FlowBatch, ns_to_iso
from bpftrace_hostport.errors import UserError

IPS_SEEN_REPLY = 0x2
IPS_SRC_NAT = 0x10
IPS_DST_NAT = 0x20
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_DELETE = 2
GROUPS = (1 << 0) | (1 << 1) | (1 << 2)   # NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY


def _tuple(t) -> Optional[Tuple[str, str, int, int, int]]:
    if t is None:
        return None
    ip = t.get_attr("CTA_TUPLE_IP")
    pr = t.get_attr("CTA_TUPLE_PROTO")
    if ip is None or pr is None:
        return None
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    return (src, dst, pr.get_attr("CTA_PROTO_NUM"), pr.get_attr("CTA_PROTO_SRC_PORT") or 0,
            pr.get_attr("CTA_PROTO_DST_PORT") or 0)


def _counters(msg) -> Tuple[Optional[int], Optional[int]]:
    """Packets and bytes of both directions; (None, None) without nf_conntrack_acct."""
    pk = by = None
    for name in ("CTA_COUNTERS_ORIG", "CTA_COUNTERS_REPLY"):
        c = msg.get_attr(name)
        if c is not None:
            pk = (pk or 0) + (c.get_attr("CTA_COUNTERS_PACKETS") or 0)
            by = (by or 0) + (c.get_attr("CTA_COUNTERS_BYTES") or 0)
    return pk, by


TCP_CONNTRACK_CLOSE = 8      # enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)


def _tcp_state(msg) -> Optional[int]:
    pi = msg.get_attr("CTA_PROTOINFO")
    tcp = pi.get_attr("CTA_PROTOINFO_TCP") if pi is not None else None
    return tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None


def flow_from_conntrack(orig, reply, status: int, local: set, ts: datetime, answered: bool,
                        packets: Optional[int] = None, nbytes: Optional[int] = None,
                        names=None, outcome: Optional[str] = None) -> dict:
    """A trace "flow" record from a conntrack entry's two tuples (pure; unit-tested).

    outcome: "answered", "refused" (a TCP entry that went straight to CLOSE at its first reply:
    a reset) or "unanswered"; by default what `answered` says. Events carry no ICMP error, so an
    unreachable UDP pod reads as unanswered here; who sent a reset is not known either."""
    csrc, cdst, proto, cport, hport = orig
    psrc, pdst, _, pport, pdport = reply
    masq = bool(status & IPS_SRC_NAT) or pdst != csrc or pdport != cport
    ns = name = port_name = None
    pname = protomod.name(proto)
    if names is not None:
        found = names(pname, psrc, pport)
        if found:
            ns, name, port_name = found
    return {
        "type": "flow", "ts": ns_to_iso(int(ts.timestamp() * 1e6) * 1000), "proto": pname, "family": 6 if ":" in csrc else 4,
        "client_ip": csrc, "client_port": cport, "node_ip": cdst, "host_port": hport,
        "pod_ip": psrc, "pod_port": pport,
        "hook": "output" if csrc in local else "prerouting",
        "answered": outcome == "answered" if outcome else answered,
        "outcome": outcome or ("answered" if answered else "unanswered"),
        "refusal": "reset" if outcome == "refused" else None, "refused_by": None,
        "icmp_type": None, "icmp_code": None, "refusal_us": None,
        "latency_us": None, "midstream": False, "masqueraded": masq,
        "snat_ip": pdst if masq else None, "packets": packets, "bytes": nbytes,
        "pod_namespace": ns, "pod_name": name, "port_name": port_name, "drop_reason": None,
    }


class ConntrackBackend:
    """Conntrack NEW/UPDATE/DESTROY events, read by a thread in the node's namespace.

    A flow is reported when its first reply is seen (or it is destroyed), or after
    --timeout without one: the same records as the netfilter backend, minus what only the
    packet path knows (latency, misses, drops: declared in `measures`, never shown as 0).
    """
    name = "conntrack"
    measures = {"latency": False, "packets": False, "misses": False, "drops": False}

    def __init__(self, opts, watch: List[Tuple[str, int]]):
        self.opts = opts
        self.watch = set(watch)
        self.local: set = set()
        self.pending: Dict[tuple, Tuple[float, tuple, tuple, int]] = {}
        self.ready: List[dict] = []
        self.lock = threading.Lock()
        self.lost = 0
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._thread, name="conntrack-events", daemon=True)

    def start(self, local_addrs: List[str]) -> str:
        self.local = set(local_addrs)
        self.thread.start()
        self.started.wait(10)
        if self.error is not None:
            if isinstance(self.error, PermissionError):
                raise UserError("Reading conntrack events needs root (CAP_NET_ADMIN): run it with sudo.")
            raise UserError(f"Could not subscribe to conntrack events: {self.error}.")
        return "no latency, misses or drops (conntrack events)"

    def set_local_addrs(self, addrs: List[str]) -> None:
        self.local = set(addrs)

    def watch_more(self, ports) -> None:
        self.watch |= set(ports)

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:          # reported to the session by start()
            self.error = e
            self.started.set()

    async def _main(self) -> None:
        from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket
        with netns_mod.entered(self.opts.netns):
            sock = AsyncNFCTSocket(nfgen_family=socket.AF_UNSPEC)
            await sock.setup_endpoint()
            await sock.bind(groups=GROUPS)
        self.started.set()
        task = asyncio.ensure_future(self._read(sock))
        while not self.done.is_set():
            await asyncio.sleep(0.05)
        task.cancel()
        sock.close()

    async def _read(self, sock) -> None:
        while True:
            try:
                async for msg in sock.get():
                    self._handle(msg)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.lost += 1   # the kernel dropped events for us: at least one flow unseen

    def _handle(self, msg) -> None:
        kind = msg["header"]["type"] & 0xFF
        status = msg.get_attr("CTA_STATUS") or 0
        if not status & IPS_DST_NAT:
            return
        orig, reply = _tuple(msg.get_attr("CTA_TUPLE_ORIG")), _tuple(msg.get_attr("CTA_TUPLE_REPLY"))
        if not orig or not reply or orig[1] not in self.local:
            return
        pname = protomod.NAMES.get(orig[2])
        if pname is None or (self.opts.protos and pname not in self.opts.protos):
            return
        if self.watch and (pname, orig[4]) not in self.watch:
            return
        with self.lock:
            if kind == IPCTNL_MSG_CT_NEW and orig not in self.pending and not status & IPS_SEEN_REPLY:
                self.pending[orig] = (time.time(), orig, reply, status)
            elif orig in self.pending and (status & IPS_SEEN_REPLY or kind == IPCTNL_MSG_CT_DELETE):
                t0, _, _, _ = self.pending.pop(orig)
                pk, by = _counters(msg)
                replied = bool(status & IPS_SEEN_REPLY)
                # A TCP entry whose first reply closed it got a reset, not an answer.
                reset = replied and pname == "tcp" and _tcp_state(msg) == TCP_CONNTRACK_CLOSE
                self.ready.append(flow_from_conntrack(
                    orig, reply, status, self.local, datetime.fromtimestamp(t0, timezone.utc),
                    replied, pk, by,
                    outcome="refused" if reset else ("answered" if replied else "unanswered")))
            # else: an update of a flow already reported

    def _unanswered(self, cutoff: Optional[float]) -> List[dict]:
        out = []
        with self.lock:
            for key in [k for k, v in self.pending.items() if cutoff is None or v[0] < cutoff]:
                t0, orig, reply, status = self.pending.pop(key)
                out.append(flow_from_conntrack(orig, reply, status, self.local,
                                               datetime.fromtimestamp(t0, timezone.utc), False))
        return out

    def poll(self) -> FlowBatch:
        with self.lock:
            recs, self.ready = self.ready, []
        return FlowBatch.from_records(recs)

    def expire(self) -> FlowBatch:
        return FlowBatch.from_records(self._unanswered(time.time() - self.opts.timeout))

    def misses(self) -> List[dict]:
        return []

    def finish(self) -> FlowBatch:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(5)
        return FlowBatch.concat([self.poll(), FlowBatch.from_records(self._unanswered(None))])

    def counters(self) -> dict:
        return {"mappings": None, "drops": None, "kernel": None, "lost": self.lost, "reported": None}

    def close(self) -> None:
        self.done.set()
