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
from typing import Callable, Dict, Optional, Tuple

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
class Flow:
    ts: datetime                  # first packet
    proto: str
    family: int
    client_ip: str
    client_port: int
    node_ip: str
    host_port: int
    pod_ip: str
    pod_port: int
    hook: str
    answered: bool
    latency_us: Optional[float]
    midstream: bool
    masqueraded: bool
    snat_ip: Optional[str]
    packets: int
    bytes: int
    drops: int
    drop_reason: Optional[str]
    drop_reason_raw: int


def decode_flow(key, val, clock: Clock, drop_names: Dict[int, str]) -> Flow:
    fam = int(key.family)
    answered = bool(val.flags & FLOW_ANSWERED) and val.reply_ns > 0
    midstream = bool(val.flags & FLOW_MIDSTREAM)
    masq = bool(val.flags & FLOW_MASQUERADED)
    reason = int(val.drop_reason)
    return Flow(
        ts=clock.wall(int(val.first_ns)),
        proto=PROTO_NAMES.get(int(key.proto), str(int(key.proto))),
        family=fam,
        client_ip=addr(key.client_addr, fam),
        client_port=port(key.client_port),
        node_ip=addr(key.node_addr, fam),
        host_port=port(key.host_port),
        pod_ip=addr(val.pod_addr, fam),
        pod_port=port(val.pod_port),
        hook=HOOK_NAMES.get(int(val.hook), str(int(val.hook))),
        answered=answered,
        latency_us=(round((val.reply_ns - val.first_ns) / 1000.0, 1)
                    if answered and not midstream else None),
        midstream=midstream,
        masqueraded=masq,
        snat_ip=addr(val.snat_addr, fam) if masq else None,
        packets=int(val.packets_orig + val.packets_reply),
        bytes=int(val.bytes_orig + val.bytes_reply),
        drops=int(val.drops),
        drop_reason=(drop_names.get(reason, f"REASON_{reason}") if reason else None),
        drop_reason_raw=reason,
    )


def flow_record(f: Flow, pod_names: Optional[PodNames] = None) -> dict:
    ns = name = port_name = None
    if pod_names is not None:
        found = pod_names(f.proto, f.pod_ip, f.pod_port)
        if found:
            ns, name, port_name = found
    return {
        "type": "flow", "ts": iso(f.ts), "proto": f.proto, "family": f.family,
        "client_ip": f.client_ip, "client_port": f.client_port,
        "node_ip": f.node_ip, "host_port": f.host_port,
        "pod_ip": f.pod_ip, "pod_port": f.pod_port, "hook": f.hook,
        "answered": f.answered, "latency_us": f.latency_us, "midstream": f.midstream,
        "masqueraded": f.masqueraded, "snat_ip": f.snat_ip,
        "packets": f.packets, "bytes": f.bytes,
        "pod_namespace": ns, "pod_name": name, "port_name": port_name,
        "drop_reason": f.drop_reason,
    }


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
