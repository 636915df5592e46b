"""Raw kernel records -> domain records, for the netfilter backend.

The byte layouts have one source, bpf/events.h as compiled: bcc hands its ctypes classes
for the maps' keys and values over from the compile child (ebpf/compiler.py), and this
module builds from them a numpy dtype for whole ring-buffer batches (FlowDecoder) and reads
the small per-mapping maps through their attribute names (decode_miss, decode_mapping).
Nothing here talks to the kernel, so it is tested without bcc or root.
"""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records import outcome as oc
from bpftrace_hostport.records.batch import ADDR, FlowBatch, ns_to_iso

FLOW_ANSWERED = 1
FLOW_MASQUERADED = 2
FLOW_MIDSTREAM = 4
# flow_val.outcome (events.h OUTCOME_*)
OUTCOME_NONE, OUTCOME_ANSWERED, OUTCOME_REFUSED = 0, 1, 2

class Clock:
    """Converts bpf_ktime_get_ns() (CLOCK_MONOTONIC) to wall-clock time."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    @staticmethod
    def now_mono_ns() -> int:
        return time.monotonic_ns()


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
    return MissKey(protomod.name(key.proto), fam,
                   addr(key.client_addr, fam), addr(key.node_addr, fam), port(key.host_port),
                   protomod.HOOKS.get(int(key.hook)) or str(int(key.hook)))


def miss_record(k: MissKey, count: int, ts_ns: int) -> dict:
    """A "miss" record (schema MISS) at wall-clock ts_ns."""
    return {"type": "miss", "ts": ns_to_iso(ts_ns), "proto": k.proto, "family": k.family,
            "client_ip": k.client_ip, "node_ip": k.node_ip, "host_port": k.host_port,
            "hook": k.hook, "count": count}


def decode_mapping(key) -> dict:
    fam = int(key.family)
    return {"proto": protomod.name(key.proto), "family": fam,
            "host_port": port(key.host_port), "pod_ip": addr(key.pod_addr, fam),
            "pod_port": port(key.pod_port)}


# -- the fast path -------------------------------------------------------------------------
# At tens of thousands of flows per second every microsecond of Python per flow is CPU taken
# from the node: a drained batch of flow_event records becomes one numpy array with a dtype
# built from the compiled layout, and every column is computed for the whole batch at once.

_NUMPY_CODES = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}


def layout_fields(ctype, base: int = 0, prefix: str = "") -> List[Tuple[str, str, int]]:
    """[(dotted name, numpy type, offset)] of a ctypes Structure, recursively; pads skipped."""
    import ctypes
    out = []
    for name, ftype, *_ in ctype._fields_:
        off = base + getattr(ctype, name).offset
        if name.startswith("_"):                      # _pad, and bcc's own __pad_N
            continue
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            out += layout_fields(ftype, off, prefix + name + ".")
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
            out.append((prefix + name, f"V{ctypes.sizeof(ftype)}", off))
        else:
            size = ctypes.sizeof(ftype)
            if size not in _NUMPY_CODES:
                raise ValueError(f"unsupported field {prefix + name} of {size} bytes")
            out.append((prefix + name, "<" + _NUMPY_CODES[size], off))
    return out


def event_dtype(key_type, val_type, val_offset: int) -> np.dtype:
    """The numpy dtype of one flow_event (flow_key, then flow_val at val_offset)."""
    import ctypes
    fields = layout_fields(key_type) + layout_fields(val_type, val_offset, "v.")
    return np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                     "offsets": [f[2] for f in fields],
                     "itemsize": val_offset + ctypes.sizeof(val_type)})


def _host_order(be: np.ndarray) -> np.ndarray:
    """Ports are kept in network byte order by conntrack (and so by our maps)."""
    return be.byteswap() if np.little_endian else be.copy()


class FlowDecoder:
    """flow_event records (raw bytes, as drained) -> one FlowBatch."""

    def __init__(self, key_type, val_type, val_offset: int, clock: "Clock",
                 drop_names: Dict[int, str]):
        self.dtype = event_dtype(key_type, val_type, val_offset)
        self.clock = clock
        self.drop_names = drop_names

    def decode(self, raws: List[bytes], pending_after_ns: Optional[int] = None) -> FlowBatch:
        """Chunks of records back to back (as drained, or one per claimed flow) -> a batch.

        A flow with nothing back is unanswered (it was claimed after --timeout), or pending when
        it began after `pending_after_ns` (CLOCK_MONOTONIC ns: the flows tracing ended before
        their timeout, claimed at the end)."""
        data = b"".join(raws)
        if not data:
            return FlowBatch.empty()
        a = np.frombuffer(data, dtype=self.dtype)
        flags, first, reply = a["v.flags"], a["v.first_ns"], a["v.reply_ns"]
        kernel_outcome = a["v.outcome"]
        answered = (kernel_outcome == OUTCOME_ANSWERED) & (reply > 0)
        refused = (kernel_outcome == OUTCOME_REFUSED) & (reply > 0)
        midstream = flags & FLOW_MIDSTREAM != 0
        outcome = np.where(answered, oc.ANSWERED, np.where(refused, oc.REFUSED, oc.UNANSWERED))
        if pending_after_ns is not None:
            outcome[(outcome == oc.UNANSWERED) & (first > pending_after_ns)] = oc.PENDING
        lat = np.full(len(a), np.nan)
        timed = answered & ~midstream
        lat[timed] = np.round((reply[timed] - first[timed]) / 1000.0, 1)
        rlat = np.full(len(a), np.nan)
        timed = refused & ~midstream
        rlat[timed] = np.round((reply[timed] - first[timed]) / 1000.0, 1)
        refusal = np.where(refused, a["v.refusal"], 0).astype(np.uint8)
        cols = {
            "ts_ns": first.astype(np.int64) + self.clock.offset_ns,
            "proto": a["proto"].copy(), "family": a["family"].copy(), "hook": a["v.hook"].copy(),
            "client_addr": a["client_addr"].astype(ADDR), "client_port": _host_order(a["client_port"]),
            "node_addr": a["node_addr"].astype(ADDR), "host_port": _host_order(a["host_port"]),
            "pod_addr": a["v.pod_addr"].astype(ADDR), "pod_port": _host_order(a["v.pod_port"]),
            "snat_addr": a["v.snat_addr"].astype(ADDR),
            "answered": answered, "midstream": midstream,
            "outcome": outcome.astype(np.uint8), "refusal": refusal,
            "refused_by": np.where(refused, a["v.refused_by"], 0).astype(np.uint8),
            "icmp_type": a["v.icmp_type"].copy(), "icmp_code": a["v.icmp_code"].copy(),
            "refusal_us": rlat,
            "masqueraded": flags & FLOW_MASQUERADED != 0,
            # Masquerade is read after source NAT, i.e. from a reply or a second packet: an
            # unanswered flow of one packet cannot say (collect/netfilter: no POST_ROUTING hook).
            "masq_known": answered | refused | midstream | (flags & FLOW_MASQUERADED != 0) | (a["v.packets_orig"] > 1),
            "latency_us": lat,
            "packets": (a["v.packets_orig"] + a["v.packets_reply"]).astype(np.int64),
            "bytes": (a["v.bytes_orig"] + a["v.bytes_reply"]).astype(np.int64),
            "pod": np.full(len(a), -1, np.int32),
        }
        reasons = a["v.drop_reason"]
        codes = np.unique(reasons[reasons != 0]).tolist() if reasons.any() else []
        names = [self.drop_names.get(c, f"REASON_{c}") for c in codes]
        drop = np.full(len(a), -1, np.int32)
        for i, c in enumerate(codes):
            drop[reasons == c] = i
        cols["drop"] = drop
        return FlowBatch(cols, drop_reasons=names)
