"""Export flow records as a pcapng file that Wireshark/tshark can open.

Per flow record we synthesise the packets the tracer saw, so a person can look at hostPort
DNAT in Wireshark:

1. ``original``: the client's first packet as it arrived (client -> node_ip:host_port), on an
   interface named after the hook ("prerouting" or "output");
2. ``dnat``: the same packet after DNAT (client or SNAT address -> pod_ip:pod_port), on
   "<hook>-dnat";
3. ``reply``: what came back first, on "<hook>-dnat": for an answered flow whose latency is
   known the pod's first reply at ts + latency; for a refused flow the refusal at ts + the time
   to it: a TCP RST, an SCTP ABORT, or the ICMP/ICMPv6 error (its type and code) from its
   sender (the pod's address, else the node's). An unanswered flow has no reply.

Misses (connections to a watched hostPort that got no DNAT) are frames too: the client's first
packet to node_ip:host_port, on the hook's interface, with no DNAT step (a miss record has no
client port: 0), one per miss record, its comment giving the count and the owner when known.

TCP is a SYN / SYN-ACK (an ACK / ACK pair for midstream flows, whose first packet was not a
SYN), UDP an empty datagram, SCTP an INIT / INIT-ACK with a CRC32c checksum (SCTP flows are
written, not skipped).  Every packet carries a comment (tshark field ``frame.comment``) with
the pod, mapping, hook, the flow's outcome (refused: what refused it and who sent it), latency
and step.

Frames are written in time order (capinfos: strict time order), whatever the interleaving of
flows and their replies: the flows and misses come in time order and a reply waits in a small
heap until every frame before it is out.  The blocks are written with :mod:`struct` rather
than dpkt's ``pcapng.Writer``: the Writer builds a dpkt object per packet (slow) and only writes
microsecond timestamps, while the reply time (ts + a fractional-microsecond latency) wants
nanoseconds.

Public API: :func:`write_pcapng`.
"""
from __future__ import annotations

import calendar
import heapq
import re
import socket
import struct
from functools import lru_cache
from typing import BinaryIO, Dict, Iterable, Iterator, List, Optional, Tuple

from bpftrace_hostport.addr import endpoint

__all__ = ["write_pcapng", "LINKTYPE_RAW"]

#: Raw IP, no link header: one interface carries IPv4 and IPv6 (tshark 4.0 reads the version
#: nibble), and no MAC addresses have to be made up.
LINKTYPE_RAW = 101
USERAPPL = "bpftrace-hostport"

_TTL = 64
_TCP_WINDOW = 64240
_MSS_OPT = b"\x02\x04\x05\xb4"          # MSS 1460: real SYNs carry one
_MSS_SUM = 0x0204 + 0x05B4              # its 16-bit words, for the checksum
_SYN, _RST, _ACK = 0x02, 0x04, 0x10
_SCTP_RWND, _SCTP_STREAMS = 106496, 10
_PROTO = {"tcp": 6, "udp": 17, "sctp": 132}

_EPB_HDR = struct.Struct("<IIIIIII")    # type, len, iface, ts_hi, ts_lo, caplen, origlen
_OPT_HDR = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_SCTP_INIT = struct.Struct("!HHII" "BBHIIHHI")   # common header + INIT/INIT-ACK chunk
_SCTP_COOKIE = struct.Struct("!HHI")             # State Cookie parameter (INIT-ACK needs one)
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")          # indexed by len % 4
_END_OF_OPTS = b"\0\0\0\0"


# --------------------------------------------------------------------------------------------
# Checksums.  2**16 == 1 (mod 0xffff), so an even-length byte string read as one big integer
# is congruent to the sum of its 16-bit words: the ones'-complement sum is then a single `%`,
# and the sums of addresses can be cached and added to the header fields arithmetically.
# --------------------------------------------------------------------------------------------

def _csum(word_sum: int) -> int:
    """Internet checksum from a (not yet folded) sum of 16-bit words."""
    r = word_sum % 0xFFFF
    return 0xFFFF - r if r else 0


@lru_cache(maxsize=65536)   # bounded: addresses repeat (node, pods, SNAT), clients may not
def _addr(ip: str) -> Tuple[bytes, int]:
    """IP string -> (packed bytes, sum of its 16-bit words)."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    return packed, int.from_bytes(packed, "big")


def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A); SCTP is rare here."""
    c, t = 0xFFFFFFFF, _CRC32C
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Packets
# --------------------------------------------------------------------------------------------

def _ip(src: str, dst: str, proto: int, l4: bytes, ident: int) -> bytes:
    """IPv4 or IPv6 header + payload; IPv4 gets DF and a valid header checksum."""
    s, ssum = _addr(src)
    d, dsum = _addr(dst)
    if len(s) == 16:
        return _IP6.pack(0x60000000, len(l4), proto, _TTL, s, d) + l4
    total = 20 + len(l4)
    c = _csum(0x4500 + total + ident + 0x4000 + (_TTL << 8) + proto + ssum + dsum)
    return _IP4.pack(0x45, 0, total, ident, 0x4000, _TTL, proto, c, s, d) + l4


def _tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
         ident: int) -> bytes:
    syn = flags & _SYN
    hlen = 24 if syn else 20            # the MSS option only on SYNs, as a stack sends it
    off = (hlen // 4) << 4
    words = (sport + dport + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
             + (off << 8) + flags + _TCP_WINDOW + (_MSS_SUM if syn else 0))
    c = _csum(_addr(src)[1] + _addr(dst)[1] + 6 + hlen + words)
    seg = _TCP.pack(sport, dport, seq, ack, off, flags, _TCP_WINDOW, c, 0)
    return _ip(src, dst, 6, seg + _MSS_OPT if syn else seg, ident)


def _udp(src: str, dst: str, sport: int, dport: int, ident: int) -> bytes:
    c = _csum(_addr(src)[1] + _addr(dst)[1] + 17 + 8 + sport + dport + 8) or 0xFFFF
    return _ip(src, dst, 17, _UDP.pack(sport, dport, 8, c), ident)


def _sctp(src: str, dst: str, sport: int, dport: int, tag: int, peer_tag: int,
          reply: bool, ident: int) -> bytes:
    """INIT (vtag 0) from the client, INIT-ACK (vtag = the client's tag) from the pod."""
    if reply:
        chunk = _SCTP_INIT.pack(sport, dport, peer_tag, 0, 2, 0, 28, tag, _SCTP_RWND,
                                _SCTP_STREAMS, _SCTP_STREAMS, tag)
        chunk += _SCTP_COOKIE.pack(7, 8, tag)
    else:
        chunk = _SCTP_INIT.pack(sport, dport, 0, 0, 1, 0, 20, tag, _SCTP_RWND,
                                _SCTP_STREAMS, _SCTP_STREAMS, tag)
    # the kernel stores the CRC little-endian (sctp_compute_cksum returns cpu_to_le32)
    chunk = chunk[:8] + _U32.pack(crc32c(chunk)) + chunk[12:]
    return _ip(src, dst, 132, chunk, ident)


def _sctp_abort(src: str, dst: str, sport: int, dport: int, tag: int, ident: int) -> bytes:
    """An ABORT (chunk type 6) with the client's verification tag."""
    chunk = struct.pack("!HHII", sport, dport, tag, 0) + struct.pack("!BBH", 6, 0, 4)
    chunk = chunk[:8] + _U32.pack(crc32c(chunk)) + chunk[12:]
    return _ip(src, dst, 132, chunk, ident)


def _icmp(src: str, dst: str, icmp_type: int, icmp_code: int, invoking: bytes, ident: int) -> bytes:
    """An ICMP (IPv4: the invoking header + 8 bytes) or ICMPv6 (as much of the invoking packet
    as a minimal MTU takes) error about `invoking`, with a valid checksum."""
    if ":" in src:
        body = struct.pack("!BBHI", icmp_type, icmp_code, 0, 0) + invoking[:1232]
        s, ssum = _addr(src)
        d, dsum = _addr(dst)
        c = _csum(ssum + dsum + len(body) + 58 + int.from_bytes(body + b"\0" * (len(body) % 2), "big"))
        return _IP6.pack(0x60000000, len(body), 58, _TTL, s, d) + body[:2] + struct.pack("!H", c) + body[4:]
    body = struct.pack("!BBHI", icmp_type, icmp_code, 0, 0) + invoking[:28]
    c = _csum(int.from_bytes(body + b"\0" * (len(body) % 2), "big"))
    return _ip(src, dst, 1, body[:2] + struct.pack("!H", c) + body[4:], ident)


def _outcome(f: dict) -> str:
    """A record's outcome; captures before schema 4 have only `answered`."""
    return f.get("outcome") or ("answered" if f.get("answered") else "unanswered")


def _packets(f: dict, n: int) -> Tuple[bytes, bytes, Optional[bytes], Optional[float]]:
    """(original, dnat, reply or None, µs from the first packet to the reply) of flow number n."""
    proto, client, cport = f["proto"], f["client_ip"], int(f["client_port"])
    hport, pod, pport = int(f["host_port"]), f["pod_ip"], int(f["pod_port"])
    src = (f.get("snat_ip") or client) if f.get("masqueraded") else client
    outcome = _outcome(f)
    answered = outcome == "answered" and f.get("latency_us") is not None
    refused = outcome == "refused" and f.get("refusal_us") is not None
    ident = n & 0xFFFF
    rid = (ident + 1) & 0xFFFF
    # deterministic per-flow sequence numbers / tags, spread over the 32-bit space
    isn, risn = (n * 2654435761) & 0xFFFFFFFF, (n * 40503 + 0x5EED) & 0xFFFFFFFF
    reply = None
    if proto == "tcp":
        fl, rfl = (_ACK, _ACK) if f.get("midstream") else (_SYN, _SYN | _ACK)
        ack = 0 if fl == _SYN else risn
        orig = _tcp(client, f["node_ip"], cport, hport, isn, ack, fl, ident)
        dnat = _tcp(src, pod, cport, pport, isn, ack, fl, ident)
        if answered:
            reply = _tcp(pod, src, pport, cport, risn, (isn + 1) & 0xFFFFFFFF, rfl, rid)
    elif proto == "udp":
        orig = _udp(client, f["node_ip"], cport, hport, ident)
        dnat = _udp(src, pod, cport, pport, ident)
        if answered:
            reply = _udp(pod, src, pport, cport, rid)
    elif proto == "sctp":
        tag = isn or 1                  # an INIT's initiate tag must not be 0
        orig = _sctp(client, f["node_ip"], cport, hport, tag, 0, False, ident)
        dnat = _sctp(src, pod, cport, pport, tag, 0, False, ident)
        if answered:
            reply = _sctp(pod, src, pport, cport, risn or 1, tag, True, rid)
    else:
        raise ValueError(f"flow {n}: unknown proto {proto!r}")
    if refused:
        refusal = f.get("refusal")
        if f.get("icmp_type") is not None:
            sender = pod if f.get("refused_by") == "pod" else f["node_ip"]
            reply = _icmp(sender, src, int(f["icmp_type"]), int(f.get("icmp_code") or 0), dnat, rid)
        elif refusal == "reset" and proto == "tcp":
            reply = _tcp(pod, src, pport, cport, 0, (isn + 1) & 0xFFFFFFFF, _RST | _ACK, rid)
        elif refusal == "abort" and proto == "sctp":
            reply = _sctp_abort(pod, src, pport, cport, isn or 1, rid)
        return orig, dnat, reply, (float(f["refusal_us"]) if reply is not None else None)
    return orig, dnat, reply, (float(f["latency_us"]) if reply is not None else None)


def _miss_packet(m: dict, n: int) -> bytes:
    """A miss: the client's first packet to node_ip:host_port (no client port is recorded: 0)."""
    proto, client, node, hport = m["proto"], m["client_ip"], m["node_ip"], int(m["host_port"])
    ident = n & 0xFFFF
    if proto == "tcp":
        return _tcp(client, node, 0, hport, (n * 2654435761) & 0xFFFFFFFF, 0, _SYN, ident)
    if proto == "udp":
        return _udp(client, node, 0, hport, ident)
    if proto == "sctp":
        return _sctp(client, node, 0, hport, ((n * 2654435761) & 0xFFFFFFFF) or 1, 0, False, ident)
    raise ValueError(f"miss {n}: unknown proto {proto!r}")


# --------------------------------------------------------------------------------------------
# Times and comments
# --------------------------------------------------------------------------------------------

_TS_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d):(\d\d)(?:[.,](\d+))?(Z|[+-]\d\d:?\d\d)?$")


@lru_cache(maxsize=4096)    # flows come in time order: the minute prefix repeats
def _minute_epoch(prefix: str) -> int:
    return calendar.timegm((int(prefix[:4]), int(prefix[5:7]), int(prefix[8:10]),
                            int(prefix[11:13]), int(prefix[14:16]), 0, 0, 0, 0))


def iso_to_ns(ts: str) -> int:
    """ISO 8601 time ("2026-11-29T07:45:22.123456Z", no zone = UTC) -> Unix nanoseconds."""
    m = _TS_RE.match(ts)
    if m is None:
        raise ValueError(f"bad timestamp {ts!r}")
    prefix, sec, frac, zone = m.groups()
    ns = (_minute_epoch(prefix) + int(sec)) * 1_000_000_000
    if frac:
        ns += int(frac[:9].ljust(9, "0"))
    if zone and zone != "Z":
        sign = -1 if zone[0] == "+" else 1      # 10:00+02:00 is 08:00 UTC
        ns += sign * (int(zone[1:3]) * 3600 + int(zone[-2:]) * 60) * 1_000_000_000
    return ns


def _comment(f: dict, n: int) -> str:
    """Comment shared by a flow's packets; the step is appended per packet."""
    ns, name = f.get("pod_namespace"), f.get("pod_name")
    pod = f"{ns}/{name}" if ns and name else (name or "-")
    lat = f.get("latency_us")
    outcome = _outcome(f)
    parts = [f"pod={pod}", f"port={f.get('port_name') or '-'}",
             f"mapping={f['proto']} {f['host_port']}->{endpoint(f['pod_ip'], f['pod_port'])}",
             f"hook={f['hook']}", f"outcome={outcome}"]
    if outcome == "refused":
        parts.append(f"refusal={f.get('refusal') or '-'} refused_by={f.get('refused_by') or '-'}")
        if f.get("icmp_type") is not None:
            parts.append(f"icmp={f['icmp_type']}/{f.get('icmp_code')}")
        if f.get("refusal_us") is not None:
            parts.append(f"refusal_us={round(f['refusal_us'], 3)}")
    parts += [f"latency_us={'-' if lat is None else round(lat, 3)}",
              f"answered={'yes' if outcome == 'answered' else 'no'}",
              f"masq={'yes' if f.get('masqueraded') else 'no'}"]
    if f.get("masqueraded") and f.get("snat_ip"):
        parts.append(f"snat={f['snat_ip']}")
    if f.get("midstream"):
        parts.append("midstream=yes")
    if f.get("drop_reason"):
        parts.append(f"drop={f['drop_reason']}")
    parts.append(f"packets={_none_dash(f.get('packets'))} bytes={_none_dash(f.get('bytes'))}")
    parts.append(f"flow={n}")
    return " ".join(parts)


def _miss_comment(m: dict, n: int) -> str:
    count = int(m.get("count") or 1)
    owner = (f"hostNetwork pod {m['pod_namespace']}/{m['pod_name']} owns the port" if m.get("pod_name")
             else "no DNAT rule matched")
    return (f"miss: {count} connection{'' if count == 1 else 's'} to {endpoint(m['node_ip'], m['host_port'])}"
            f"/{m['proto']} not DNATed ({owner}) hook={m.get('hook') or 'prerouting'} outcome=miss "
            f"count={count} client_port=unknown miss={n} step=miss")


def _none_dash(v) -> str:
    return "-" if v is None else str(v)


# --------------------------------------------------------------------------------------------
# pcapng blocks (little-endian; the SHB's byte-order magic tells readers so)
# --------------------------------------------------------------------------------------------

def _opt(code: int, value: bytes) -> bytes:
    return _OPT_HDR.pack(code, len(value)) + value + _PAD[len(value) % 4]


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return _U32.pack(btype) + _U32.pack(n) + body + _U32.pack(n)


def _shb() -> bytes:
    # magic, version 1.0, section length -1 (unknown: we stream), shb_userappl
    body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    return _block(0x0A0D0D0A, body + _opt(4, USERAPPL.encode()) + _END_OF_OPTS)


def _idb(name: str) -> bytes:
    # snaplen 0 = unlimited; if_name; if_tsresol 9 = nanoseconds
    body = struct.pack("<HHI", LINKTYPE_RAW, 0, 0)
    return _block(1, body + _opt(2, name.encode()) + _opt(9, b"\x09") + _END_OF_OPTS)


def _epb(iface: int, ts_ns: int, pkt: bytes, comment: bytes) -> bytes:
    n = len(pkt)
    opt = _OPT_HDR.pack(1, len(comment)) + comment + _PAD[len(comment) % 4]
    total = 32 + n + len(_PAD[n % 4]) + len(opt) + 4
    return b"".join((_EPB_HDR.pack(6, total, iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, n, n),
                     pkt, _PAD[n % 4], opt, _END_OF_OPTS, _U32.pack(total)))


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

_STEPS = (" step=original", " step=dnat", " step=reply")


def _events(flows: Iterable[dict], misses: Iterable[dict]) -> Iterator[Tuple[int, int, int, dict]]:
    """(ns, kind: 0 flow / 1 miss, number, record) in time order, both inputs being so."""
    fl = ((iso_to_ns(f["ts"]), 0, n, f) for n, f in enumerate(flows, 1))
    ms = ((iso_to_ns(m["ts"]), 1, n, m) for n, m in enumerate(misses, 1))
    return heapq.merge(fl, ms, key=lambda e: (e[0], e[1], e[2]))


def write_pcapng(flows: Iterable[dict], out: BinaryIO, misses: Iterable[dict] = ()) -> int:
    """Write flow records (and miss records) as pcapng packets to ``out``, in time order;
    return the number of packets written. Both come in time order (by their "ts"), as a
    capture holds them; the replies, later than their flow's first packet, are held until
    their time comes.

    One section; an Interface Description Block is written the first time each interface
    name is used (pcapng allows IDBs anywhere in a section, and tshark 4.0 reads them), so
    only the interfaces that carry packets appear.
    """
    out.write(_shb())
    ifaces: Dict[str, int] = {}
    later: List[Tuple[int, int, bytes]] = []         # (ns, order, block): replies not due yet
    count = seq = 0

    def iface(name: str) -> Tuple[int, bytes]:
        if name in ifaces:
            return ifaces[name], b""
        ifaces[name] = len(ifaces)
        return ifaces[name], _idb(name)

    for ts, kind, n, rec in _events(flows, misses):
        blocks: List[bytes] = []
        while later and later[0][0] <= ts:
            blocks.append(heapq.heappop(later)[2])
        hook = rec.get("hook") or "prerouting"
        if kind == 1:
            i, idb = iface(hook)
            blocks += [idb, _epb(i, ts, _miss_packet(rec, n), _miss_comment(rec, n).encode())]
            count += 1
        else:
            orig, dnat, reply, after_us = _packets(rec, n)
            base = _comment(rec, n)
            i, idb = iface(hook)
            j, idb2 = iface(hook + "-dnat")
            blocks += [idb, _epb(i, ts, orig, (base + _STEPS[0]).encode()),
                       idb2, _epb(j, ts, dnat, (base + _STEPS[1]).encode())]
            count += 2
            if reply is not None:
                rts = ts + round(after_us * 1000)
                seq += 1
                heapq.heappush(later, (rts, seq, _epb(j, rts, reply, (base + _STEPS[2]).encode())))
                count += 1
        out.write(b"".join(blocks))
    out.write(b"".join(b for _, _, b in sorted(later)))
    return count
