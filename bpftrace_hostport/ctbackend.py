"""The fallback backend: conntrack netlink events (pyroute2), for kernels without the
netfilter BPF link (< 6.4) or when asked with `--backend conntrack`.

Conntrack reports each connection's NAT once it is set up, so the same flow records can be
written, minus what only the packet path knows: latency (null), packets/bytes (0 unless
nf_conntrack_acct is on), misses and drops (not seen). Events come per network namespace,
so the socket is opened inside the node's namespace. A netlink overrun (ENOBUFS) loses
events: each one is counted in lost_events.
"""
from __future__ import annotations

import asyncio
import errno
import json
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Dict, Optional, TextIO, Tuple

from . import netns as netns_mod
from .errors import UserError
from .events import iso
from .summary import render_summary, summarize

IPS_SEEN_REPLY = 0x2
IPS_SRC_NAT = 0x10
IPS_DST_NAT = 0x20
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_DELETE = 2
GROUPS = (1 << 0) | (1 << 1) | (1 << 2)   # NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY
PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}


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


def _counters(msg) -> Tuple[int, int]:
    pk = by = 0
    for name in ("CTA_COUNTERS_ORIG", "CTA_COUNTERS_REPLY"):
        c = msg.get_attr(name)
        if c is not None:
            pk += c.get_attr("CTA_COUNTERS_PACKETS") or 0
            by += c.get_attr("CTA_COUNTERS_BYTES") or 0
    return pk, by


def flow_from_conntrack(orig, reply, status: int, local: set, ts: datetime, answered: bool,
                        packets: int = 0, nbytes: int = 0, names=None) -> dict:
    """A trace "flow" record from a conntrack entry's two tuples (pure; unit-tested)."""
    csrc, cdst, proto, cport, hport = orig
    psrc, pdst, _, pport, pdport = reply
    masq = bool(status & IPS_SRC_NAT) or pdst != csrc or pdport != cport
    ns = name = port_name = None
    pname = PROTO_NAMES.get(proto, str(proto))
    if names is not None:
        found = names(pname, psrc, pport)
        if found:
            ns, name, port_name = found
    return {
        "type": "flow", "ts": iso(ts), "proto": pname, "family": 6 if ":" in csrc else 4,
        "client_ip": csrc, "client_port": cport, "node_ip": cdst, "host_port": hport,
        "pod_ip": psrc, "pod_port": pport,
        "hook": "output" if csrc in local else "prerouting",
        "answered": answered, "latency_us": None, "midstream": False, "masqueraded": masq,
        "snat_ip": pdst if masq else None, "packets": packets, "bytes": nbytes,
        "pod_namespace": ns, "pod_name": name, "port_name": port_name, "drop_reason": None,
    }


def run_conntrack_trace(opts, index, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> dict:
    from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket

    netns_mod.require(opts.netns)
    watch = {(p, port) for p, port in opts.host_ports} or {(p, port) for p, port in index.host_ports()}
    ipr = netns_mod.open_iproute(opts.netns)
    local = set(netns_mod.local_addresses(ipr))
    ipr.close()
    flows, lost = [], 0
    pending: Dict[tuple, Tuple[float, tuple, tuple, int]] = {}
    stop = {"flag": False}

    def emit(rec):
        flows.append(rec)
        if opts.fmt == "json":
            out.write(json.dumps(rec) + "\n")
        else:
            out.write(f"{rec['proto']} {rec['client_ip']}:{rec['client_port']} -> {rec['node_ip']}:"
                      f"{rec['host_port']} => {rec['pod_ip']}:{rec['pod_port']} "
                      f"{'answered' if rec['answered'] else 'UNANSWERED'}\n")
        out.flush()

    def handle(msg):
        kind = msg["header"]["type"] & 0xFF
        status = msg.get_attr("CTA_STATUS") or 0
        if not status & IPS_DST_NAT:
            return
        orig, reply = _tuple(msg.get_attr("CTA_TUPLE_ORIG")), _tuple(msg.get_attr("CTA_TUPLE_REPLY"))
        if not orig or not reply or orig[1] not in local:
            return
        pname = PROTO_NAMES.get(orig[2])
        if pname is None or (opts.protos and pname not in opts.protos):
            return
        if watch and (pname, orig[4]) not in watch:
            return
        key = orig
        if kind == IPCTNL_MSG_CT_NEW and key not in pending and not status & IPS_SEEN_REPLY:
            pending[key] = (time.time(), orig, reply, status)
            return
        if key in pending and (status & IPS_SEEN_REPLY or kind == IPCTNL_MSG_CT_DELETE):
            t0, _, _, _ = pending.pop(key)
            pk, by = _counters(msg)
            emit(flow_from_conntrack(orig, reply, status, local,
                                     datetime.fromtimestamp(t0, timezone.utc),
                                     bool(status & IPS_SEEN_REPLY), pk, by, index.names))
        elif key not in pending and kind == IPCTNL_MSG_CT_NEW and status & IPS_SEEN_REPLY:
            pass   # an update of a flow already reported

    async def main():
        with netns_mod.entered(opts.netns):
            sock = AsyncNFCTSocket(nfgen_family=socket.AF_UNSPEC)
            await sock.setup_endpoint()
            await sock.bind(groups=GROUPS)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.update(flag=True))
        print("Tracing hostPort DNAT through conntrack events (no latency, misses or drops); "
              "Ctrl-C to end.", file=err, flush=True)
        if opts.ready_file:
            with open(opts.ready_file, "w") as f:
                f.write("conntrack\n")
        start = time.monotonic()

        async def reader():
            nonlocal lost
            while True:
                try:
                    async for msg in sock.get():
                        handle(msg)
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    lost += 1   # the kernel dropped events for us: at least one flow unseen

        task = asyncio.ensure_future(reader())
        try:
            while not stop["flag"]:
                if opts.duration is not None and time.monotonic() - start >= opts.duration:
                    break
                await asyncio.sleep(0.2)
                cutoff = time.time() - opts.timeout
                for key in [k for k, v in pending.items() if v[0] < cutoff]:
                    t0, orig, reply, status = pending.pop(key)
                    emit(flow_from_conntrack(orig, reply, status, local,
                                             datetime.fromtimestamp(t0, timezone.utc), False,
                                             names=index.names))
        finally:
            task.cancel()
            sock.close()
        for key in list(pending):
            t0, orig, reply, status = pending.pop(key)
            emit(flow_from_conntrack(orig, reply, status, local,
                                     datetime.fromtimestamp(t0, timezone.utc), False, names=index.names))
        return time.monotonic() - start

    try:
        duration = asyncio.run(main())
    except PermissionError:
        raise UserError("Reading conntrack events needs root (CAP_NET_ADMIN): run it with sudo.") from None
    s = summarize(flows, [], None, None, duration, lost, pod_names=index.names)
    s["backend"] = "conntrack"
    out.write((json.dumps(s) if opts.fmt == "json" else render_summary(s)) + "\n")
    out.flush()
    return s
