"""ctnetlink, spoken directly: filtered dumps of the conntrack table and its statistics.

A socket of the netlink family NETLINK_NETFILTER, opened in the calling thread's network
namespace. Dumps carry the kernel's own filters (Linux >= 5.9 filters on the original tuple,
CTA_FILTER; >= 5.15 on status bits, CTA_STATUS / CTA_STATUS_MASK), so only the entries asked for
cross into user space; an older kernel ignores the filter attributes and sends every entry (the
caller filters again). Messages are decoded with struct: pyroute2's generic decoder costs about
a millisecond per entry, this about ten microseconds.

Attribute numbers from include/uapi/linux/netfilter/nfnetlink_conntrack.h.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Dict, Iterator, List, Optional, Tuple

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.node.parse import TCP_STATES, CtEntry, status_names

__all__ = ["CtSocket", "STAT_NAMES"]

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_CTNETLINK = 1
_MSG_GET, _MSG_GET_STATS_CPU = 1, 4
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLA_F_NESTED = 0x8000

# enum ctattr_type
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_STATUS, _CTA_PROTOINFO, _CTA_TIMEOUT = 1, 2, 3, 4, 7
_CTA_FILTER, _CTA_STATUS_MASK = 25, 26
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto, ctattr_filter
_CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 2
_CTA_IP_V4_SRC, _CTA_IP_V4_DST, _CTA_IP_V6_SRC, _CTA_IP_V6_DST = 1, 2, 3, 4
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3
_CTA_FILTER_ORIG_FLAGS = 1
# CTA_FILTER_F_* (net/netfilter/nf_conntrack_netlink.c)
_F_IP_SRC, _F_IP_DST, _F_PROTO_NUM, _F_PROTO_SRC_PORT, _F_PROTO_DST_PORT = 1 << 0, 1 << 1, 1 << 3, 1 << 4, 1 << 5
_CTA_PROTOINFO_TCP, _CTA_PROTOINFO_TCP_STATE = 1, 1

#: enum ctattr_stats_cpu -> the names `conntrack -S` prints
STAT_NAMES = {2: "found", 4: "invalid", 8: "insert", 9: "insert_failed", 10: "drop", 11: "early_drop", 12: "error",
              13: "search_restart", 14: "clash_resolve", 15: "chaintoolong"}


def _attr(typ: int, payload: bytes, nested: bool = False) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), typ | (_NLA_F_NESTED if nested else 0)) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes, off: int, end: int) -> Dict[int, Tuple[int, int]]:
    """type -> (start, end) of each attribute's payload."""
    out: Dict[int, Tuple[int, int]] = {}
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        out[atype & 0x3FFF] = (off + 4, off + alen)
        off += (alen + 3) & ~3
    return out


def _tuple(data: bytes, start: int, end: int) -> Optional[Tuple[str, str, int, int, int, int]]:
    a = _attrs(data, start, end)
    if _CTA_TUPLE_IP not in a or _CTA_TUPLE_PROTO not in a:
        return None
    ip = _attrs(data, *a[_CTA_TUPLE_IP])
    pr = _attrs(data, *a[_CTA_TUPLE_PROTO])
    if _CTA_IP_V4_SRC in ip and _CTA_IP_V4_DST in ip:
        fam, s, d = 4, ip[_CTA_IP_V4_SRC], ip[_CTA_IP_V4_DST]
        src, dst = socket.inet_ntop(socket.AF_INET, data[s[0]:s[1]]), socket.inet_ntop(socket.AF_INET, data[d[0]:d[1]])
    elif _CTA_IP_V6_SRC in ip and _CTA_IP_V6_DST in ip:
        fam, s, d = 6, ip[_CTA_IP_V6_SRC], ip[_CTA_IP_V6_DST]
        src = str(ipaddress.IPv6Address(data[s[0]:s[1]]))
        dst = str(ipaddress.IPv6Address(data[d[0]:d[1]]))
    else:
        return None
    num = data[pr[_CTA_PROTO_NUM][0]] if _CTA_PROTO_NUM in pr else 0
    sport = struct.unpack_from(">H", data, pr[_CTA_PROTO_SRC_PORT][0])[0] if _CTA_PROTO_SRC_PORT in pr else 0
    dport = struct.unpack_from(">H", data, pr[_CTA_PROTO_DST_PORT][0])[0] if _CTA_PROTO_DST_PORT in pr else 0
    return src, dst, num, sport, dport, fam


def _entry(data: bytes, start: int, end: int) -> Optional[CtEntry]:
    a = _attrs(data, start, end)
    if _CTA_TUPLE_ORIG not in a or _CTA_TUPLE_REPLY not in a:
        return None
    o, r = _tuple(data, *a[_CTA_TUPLE_ORIG]), _tuple(data, *a[_CTA_TUPLE_REPLY])
    if not o or not r:
        return None
    proto = protomod.k8s(o[2])
    if proto is None:
        return None
    status = struct.unpack_from(">I", data, a[_CTA_STATUS][0])[0] if _CTA_STATUS in a else 0
    timeout = struct.unpack_from(">I", data, a[_CTA_TIMEOUT][0])[0] if _CTA_TIMEOUT in a else None
    state = None
    if _CTA_PROTOINFO in a:
        pi = _attrs(data, *a[_CTA_PROTOINFO])
        if _CTA_PROTOINFO_TCP in pi:
            tcp = _attrs(data, *pi[_CTA_PROTOINFO_TCP])
            if _CTA_PROTOINFO_TCP_STATE in tcp:
                state = TCP_STATES.get(data[tcp[_CTA_PROTOINFO_TCP_STATE][0]])
    names = status_names(status) + (() if status & 0x2 else ("UNREPLIED",))
    return CtEntry(proto=proto, orig_src=o[0], orig_dst=o[1], orig_sport=o[3], orig_dport=o[4],
                   reply_src=r[0], reply_dst=r[1], reply_sport=r[3], reply_dport=r[4],
                   family=o[5], status=names, timeout=timeout, state=state)


class CtSocket:
    """A ctnetlink socket in the calling thread's network namespace (enter it first)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.settimeout(10)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "CtSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, msg: int, family: int, payload: bytes) -> Iterator[Tuple[bytes, int, int]]:
        """Sends a dump request; yields (buffer, start, end) of each answer's attributes."""
        self.seq += 1
        body = struct.pack("=BBH", family, 0, 0) + payload
        self.sock.send(struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_CTNETLINK << 8) | msg,
                                   _NLM_F_REQUEST | _NLM_F_DUMP, self.seq, 0) + body)
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, typ, _, _, _ = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return
                if typ == _NLMSG_DONE:
                    return
                if typ == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise OSError(-err, f"ctnetlink: {os.strerror(-err)}")
                    return
                yield data, off + 20, off + length
                off += (length + 3) & ~3

    def dump(self, family: int, proto: Optional[int] = None, dport: Optional[int] = None,
             daddr: Optional[str] = None, status: Optional[int] = None, limit: Optional[int] = None) -> List[CtEntry]:
        """Entries of `family` (4, 6, or 0 for both) whose original tuple has this protocol, destination port and
        destination address (any of them None: not filtered), and with these status bits set."""
        af = {4: socket.AF_INET, 6: socket.AF_INET6, 0: socket.AF_UNSPEC}[family]
        payload = b""
        ip = b""
        l4 = b""
        flags = 0
        if daddr is not None:
            ip += _attr(_CTA_IP_V6_DST if family == 6 else _CTA_IP_V4_DST, socket.inet_pton(af, daddr))
            flags |= _F_IP_DST
        if proto is not None:
            l4 += _attr(_CTA_PROTO_NUM, struct.pack("=B", proto))
            flags |= _F_PROTO_NUM
        if dport is not None:
            l4 += _attr(_CTA_PROTO_DST_PORT, struct.pack(">H", dport))
            flags |= _F_PROTO_DST_PORT
        if flags:
            tup = (_attr(_CTA_TUPLE_IP, ip, nested=True) if ip else b"") + \
                  (_attr(_CTA_TUPLE_PROTO, l4, nested=True) if l4 else b"")
            payload += _attr(_CTA_TUPLE_ORIG, tup, nested=True)
            payload += _attr(_CTA_FILTER, _attr(_CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flags)), nested=True)
        if status is not None:
            payload += _attr(_CTA_STATUS, struct.pack(">I", status)) + _attr(_CTA_STATUS_MASK, struct.pack(">I", status))
        out: List[CtEntry] = []
        for data, start, end in self._request(_MSG_GET, af, payload):
            e = _entry(data, start, end)
            if e is not None:
                out.append(e)
                if limit is not None and len(out) >= limit:
                    break                     # the rest of the dump goes with the socket
        return out

    def stats(self) -> Dict[str, int]:
        """`conntrack -S`: the namespace's counters, summed over CPUs."""
        total: Dict[str, int] = {}
        for data, start, end in self._request(_MSG_GET_STATS_CPU, socket.AF_UNSPEC, b""):
            for typ, (s, e) in _attrs(data, start, end).items():
                if typ in STAT_NAMES and e - s >= 4:
                    total[STAT_NAMES[typ]] = total.get(STAT_NAMES[typ], 0) + struct.unpack_from(">I", data, s)[0]
        return total
