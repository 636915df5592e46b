"""Raw kernel records -> domain records. The only module that knows the maps' byte layouts.

Inputs are the ctypes records bcc builds from bpf/events.h as compiled (flow_key, flow_val,
miss_key, mapping_key): any object with those attribute names works, which keeps this module
testable without bcc or root. Outputs are frozen dataclasses and the JSON records of the
`trace --format json` schema (README: "JSON output").
"""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}
HOOK_NAMES = {0: "prerouting", 1: "output"}
FLOW_ANSWERED = 1
FLOW_MASQUERADED = 2
FLOW_MIDSTREAM = 4

PodNames = Callable[[str, str, int], Optional[Tuple[Optional[str], Optional[str], Optional[str]]]]


class Clock:
    """Converts bpf_ktime_get_ns() (CLOCK_MONOTONIC) to wall-clock time."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> datetime:
        return datetime.fromtimestamp((mono_ns + self.offset_ns) / 1e9, tz=timezone.utc)

    @staticmethod
    def now_mono_ns() -> int:
        return time.monotonic_ns()


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def addr(raw, family: int) -> str:
    b = bytes(raw)
    return str(ipaddress.IPv4Address(b[:4]) if family == 4 else ipaddress.IPv6Address(b[:16]))


def port(raw_be: int) -> int:
    """Ports are kept in network byte order by conntrack (and so by our maps)."""
    return socket.ntohs(int(raw_be))


@dataclass(frozen=True)
class MissKey:
    proto: str
    family: int
    client_ip: str
    node_ip: str
    host_port: int
    hook: str


def decode_miss(key) -> MissKey:
    fam = int(key.family)
    return MissKey(PROTO_NAMES.get(int(key.proto), str(int(key.proto))), fam,
                   addr(key.client_addr, fam), addr(key.node_addr, fam), port(key.host_port),
                   HOOK_NAMES.get(int(key.hook), str(int(key.hook))))


def miss_record(k: MissKey, count: int, ts: datetime) -> dict:
    return {"type": "miss", "ts": iso(ts), "proto": k.proto, "family": k.family,
            "client_ip": k.client_ip, "node_ip": k.node_ip, "host_port": k.host_port,
            "hook": k.hook, "count": count}


def decode_mapping(key) -> dict:
    fam = int(key.family)
    return {"proto": PROTO_NAMES.get(int(key.proto), str(int(key.proto))), "family": fam,
            "host_port": port(key.host_port), "pod_ip": addr(key.pod_addr, fam),
            "pod_port": port(key.pod_port)}


# -- the fast path -------------------------------------------------------------------------
# At tens of thousands of flows per second every microsecond of Python per flow is CPU taken
# from the node. The fast path unpacks a raw ring-buffer record with one struct.Struct built
# from the compiled layout (bcc's ctypes classes for flow_key/flow_val: names, offsets and
# sizes as the compiler laid them out), caches address strings and pod names, formats the
# timestamp from a cached per-second prefix and serialises with orjson.

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def struct_format(ctype, base: int = 0, prefix: str = "") -> Tuple[List[Tuple[int, str, str]], int]:
    """[(offset, struct code, dotted name)] for every field of a ctypes Structure, recursively."""
    import ctypes
    out = []
    for name, ftype, *_ in ctype._fields_:
        desc = getattr(ctype, name)
        off = base + desc.offset
        full = prefix + name
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            sub, _ = struct_format(ftype, off, full + ".")
            out += sub
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
            out.append((off, f"{ctypes.sizeof(ftype)}s", full))
        else:
            size = ctypes.sizeof(ftype)
            if size not in _CODES:
                raise ValueError(f"unsupported field {full} of {size} bytes")
            out.append((off, _CODES[size], full))
    return out, ctypes.sizeof(ctype)


def build_struct(fields: List[Tuple[int, str, str]], total: int):
    """A little-endian struct.Struct with pad bytes where the compiler left gaps."""
    import struct
    fmt, pos, names = "<", 0, []
    for off, code, name in sorted(fields):
        if name.rsplit(".", 1)[-1].startswith("_"):   # _pad, and bcc's own __pad_N
            continue
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        pos = off + struct.calcsize("<" + code)
        names.append(name)
    if total > pos:
        fmt += f"{total - pos}x"
    return struct.Struct(fmt), names


class FlowEncoder:
    """Raw flow_event bytes -> the JSON "flow" record (dict and serialised line)."""

    def __init__(self, key_type, val_type, val_offset: int, clock: Clock,
                 drop_names: Dict[int, str], pod_names: Optional[PodNames] = None):
        kf, ksize = struct_format(key_type)
        vf, vsize = struct_format(val_type, val_offset)
        self.struct, names = build_struct(kf + [(o, c, "v." + n) for o, c, n in vf], val_offset + vsize)
        self.ix = {n: i for i, n in enumerate(names)}
        self.clock = clock
        self.drop_names = drop_names
        self.pod_names = pod_names
        self._addr: Dict[bytes, str] = {}
        self._names: Dict[tuple, Optional[tuple]] = {}
        self._sec = -1
        self._prefix = ""
        self._ix: Optional[tuple] = None

    def forget_names(self) -> None:
        """Pods change: drop the cached lookups (called once a second)."""
        self._names.clear()
        if len(self._addr) > 100_000:
            self._addr.clear()

    def _ip(self, raw: bytes, fam: int) -> str:
        s = self._addr.get(raw)
        if s is None:
            s = (socket.inet_ntop(socket.AF_INET, raw[:4]) if fam == 4
                 else socket.inet_ntop(socket.AF_INET6, raw))
            self._addr[raw] = s
        return s

    def _ts(self, mono_ns: int) -> str:
        ns = mono_ns + self.clock.offset_ns
        sec, rem = divmod(ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{rem // 1000:06d}Z"

    def record(self, raw: bytes) -> dict:
        ix = self._ix
        if ix is None:
            ix = self._ix = tuple(self.ix[n] for n in _FIELDS)
        (i_fam, i_proto, i_flags, i_reply, i_first, i_pod, i_pport, i_reason, i_client, i_cport,
         i_node, i_hport, i_hook, i_snat, i_po, i_pr, i_bo, i_br) = ix
        t = self.struct.unpack_from(raw)
        fam = t[i_fam]
        proto = PROTO_NAMES.get(t[i_proto]) or str(t[i_proto])
        flags = t[i_flags]
        reply_ns, first_ns = t[i_reply], t[i_first]
        answered = bool(flags & FLOW_ANSWERED) and reply_ns > 0
        midstream = bool(flags & FLOW_MIDSTREAM)
        masq = bool(flags & FLOW_MASQUERADED)
        pod_ip = self._ip(t[i_pod], fam)
        pod_port = socket.ntohs(t[i_pport])
        names = None
        if self.pod_names is not None:
            nk = (proto, pod_ip, pod_port)
            if nk in self._names:
                names = self._names[nk]
            else:
                names = self._names[nk] = self.pod_names(proto, pod_ip, pod_port)
        ns, name, port_name = names if names else (None, None, None)
        reason = t[i_reason]
        hook = t[i_hook]
        return {
            "type": "flow", "ts": self._ts(first_ns), "proto": proto, "family": fam,
            "client_ip": self._ip(t[i_client], fam),
            "client_port": socket.ntohs(t[i_cport]),
            "node_ip": self._ip(t[i_node], fam),
            "host_port": socket.ntohs(t[i_hport]),
            "pod_ip": pod_ip, "pod_port": pod_port,
            "hook": HOOK_NAMES.get(hook) or str(hook),
            "answered": answered,
            "latency_us": round((reply_ns - first_ns) / 1000.0, 1) if answered and not midstream else None,
            "midstream": midstream, "masqueraded": masq,
            "snat_ip": self._ip(t[i_snat], fam) if masq else None,
            "packets": t[i_po] + t[i_pr],
            "bytes": t[i_bo] + t[i_br],
            "pod_namespace": ns, "pod_name": name, "port_name": port_name,
            "drop_reason": (self.drop_names.get(reason, f"REASON_{reason}") if reason else None),
        }


# The fields FlowEncoder.record reads, in the order of its index tuple.
_FIELDS = ("family", "proto", "v.flags", "v.reply_ns", "v.first_ns", "v.pod_addr", "v.pod_port",
           "v.drop_reason", "client_addr", "client_port", "node_addr", "host_port", "v.hook",
           "v.snat_addr", "v.packets_orig", "v.packets_reply", "v.bytes_orig", "v.bytes_reply")
