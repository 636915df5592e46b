"""FlowBatch: flows as columns, the unit that travels from a backend to every sink.

A backend decodes what the kernel (or conntrack) handed over into one FlowBatch per drain:
numpy columns, no Python object per flow. Enrichment (collect/enrich.py) fills the `pod`
column once per batch; sinks turn a batch into what they write (Arrow record batch, JSON
lines, text, metrics) without going through per-flow dicts unless they print per-flow text.

Columns (all of length n):
  ts_ns        int64    wall-clock ns (UTC) of the flow's first packet
  proto        uint8    IPPROTO_* number (proto.NAMES)
  family       uint8    4 or 6
  hook         uint8    0 prerouting, 1 output (proto.HOOKS)
  client_addr, node_addr, pod_addr, snat_addr   V16: 16 raw bytes, IPv4 in the first 4
  client_port, host_port, pod_port              uint16, host byte order
  answered, midstream, masqueraded              bool (answered: outcome is "answered")
  masq_known   bool     False: whether it was masqueraded is unknown (one unanswered packet)
  outcome      uint8    records/outcome.py OUTCOMES: 0 unanswered, 1 answered, 2 refused, 3 pending
  refusal, refused_by  uint8  records/outcome.py REFUSALS / REFUSED_BY codes, 0 = not refused
  icmp_type, icmp_code uint8  the ICMP error's, meaningful where refusal is an ICMP one
  latency_us   float64  NaN = none (not answered, midstream, or not measured)
  refusal_us   float64  first packet to the refusal, NaN = none
  packets, bytes int64  -1 = not measured (conntrack events without accounting)
  drop         int32    index into `drop_reasons`, -1 = none
  pod          int32    index into `pods` ((namespace, name, port_name)), -1 = unknown
"""
from __future__ import annotations

import socket
from datetime import datetime, timezone
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records import outcome as oc

ADDR = np.dtype("V16")
COLUMNS: Dict[str, np.dtype] = {
    "ts_ns": np.dtype("int64"), "proto": np.dtype("uint8"), "family": np.dtype("uint8"),
    "hook": np.dtype("uint8"),
    "client_addr": ADDR, "client_port": np.dtype("uint16"),
    "node_addr": ADDR, "host_port": np.dtype("uint16"),
    "pod_addr": ADDR, "pod_port": np.dtype("uint16"), "snat_addr": ADDR,
    "answered": np.dtype("bool"), "midstream": np.dtype("bool"), "masqueraded": np.dtype("bool"),
    "masq_known": np.dtype("bool"),
    "outcome": np.dtype("uint8"), "refusal": np.dtype("uint8"), "refused_by": np.dtype("uint8"),
    "icmp_type": np.dtype("uint8"), "icmp_code": np.dtype("uint8"),
    "latency_us": np.dtype("float64"), "refusal_us": np.dtype("float64"), "packets": np.dtype("int64"), "bytes": np.dtype("int64"),
    "drop": np.dtype("int32"), "pod": np.dtype("int32"),
}

PodName = Tuple[Optional[str], Optional[str], Optional[str]]
_EMPTY_COLUMNS: Dict[str, np.ndarray] = {k: np.zeros(0, dtype=t) for k, t in COLUMNS.items()}


def pack_addr(ip: Optional[str]) -> bytes:
    """'10.0.0.1' -> 16 bytes, IPv4 in the first 4 (as the kernel's nf_inet_addr)."""
    if not ip:
        return bytes(16)
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_pton(fam, ip.split("%")[0]).ljust(16, b"\0")


def unpack_addr(raw: bytes, family: int) -> str:
    return (socket.inet_ntop(socket.AF_INET, raw[:4]) if family == 4
            else socket.inet_ntop(socket.AF_INET6, raw[:16]))


_MIX = np.uint64(0x100000001B3)


def _words(col: np.ndarray) -> List[np.ndarray]:
    if col.dtype == ADDR:
        w = np.ascontiguousarray(col).view(np.uint64).reshape(len(col), 2)
        return [w[:, 0], w[:, 1]]
    return [col.astype(np.uint64)]


def group_rows(*cols: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(index of each group's first row, group of every row) for rows equal in every column.

    Sorting 64-bit hashes is an order of magnitude faster than sorting structured rows; the
    grouping is then checked against the columns themselves and redone exactly on a collision.
    """
    n = len(cols[0])
    h = np.zeros(n, np.uint64)
    for c in cols:
        for w in _words(c):
            h = (h ^ w) * _MIX
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.ravel()
    if all(np.array_equal(c[first][inv], c) for c in cols):
        return first, inv
    keys = np.empty(n, dtype=[(f"f{i}", c.dtype) for i, c in enumerate(cols)])
    for i, c in enumerate(cols):
        keys[f"f{i}"] = c
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    return first, inv.ravel()


class AddrNames:
    """Address bytes -> text, cached (a node sees few distinct addresses)."""

    def __init__(self, limit: int = 100_000):
        self.cache: Dict[Tuple[bytes, int], str] = {}
        self.limit = limit

    def __call__(self, raw: bytes, family: int) -> str:
        key = (raw, family)
        s = self.cache.get(key)
        if s is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            s = self.cache[key] = unpack_addr(raw, family)
        return s

    def column(self, addrs: np.ndarray, families: np.ndarray) -> List[str]:
        """A column of addresses as text, converting each distinct value once."""
        if len(addrs) == 0:
            return []
        first, inv = group_rows(addrs, families)
        text = [self(addrs[i].tobytes(), int(families[i])) for i in first.tolist()]
        return [text[i] for i in inv.tolist()]


class FlowBatch:
    __slots__ = ("cols", "pods", "drop_reasons")

    def __init__(self, cols: Dict[str, np.ndarray], pods: Optional[List[PodName]] = None,
                 drop_reasons: Optional[List[str]] = None):
        self.cols = cols
        self.pods: List[PodName] = pods if pods is not None else []
        self.drop_reasons: List[str] = drop_reasons if drop_reasons is not None else []

    def __len__(self) -> int:
        return len(self.cols["ts_ns"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    @classmethod
    def empty(cls, n: int = 0) -> "FlowBatch":
        if n == 0:
            # The loop asks for an empty batch several times a tick when nothing happened: its
            # columns, of length 0, can be shared (there is nothing in them to change).
            return cls(dict(_EMPTY_COLUMNS))
        cols = {k: np.zeros(n, dtype=t) for k, t in COLUMNS.items()}
        cols["drop"][:] = -1
        cols["pod"][:] = -1
        cols["latency_us"][:] = np.nan
        cols["refusal_us"][:] = np.nan
        cols["masq_known"][:] = True
        return cls(cols)

    @classmethod
    def concat(cls, batches: Sequence["FlowBatch"]) -> "FlowBatch":
        """One batch from several (pods and drop reasons re-indexed)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        if len(batches) == 1:
            return batches[0]
        out = cls({k: np.concatenate([b.cols[k] for b in batches]) for k in COLUMNS})
        pos = 0
        for b in batches:
            n = len(b)
            for col, table, mine in (("pod", b.pods, out.pods), ("drop", b.drop_reasons, out.drop_reasons)):
                if not table:
                    continue
                remap = np.array([_intern(mine, v) for v in table] + [-1], dtype=np.int32)
                seg = out.cols[col][pos:pos + n]
                seg[:] = remap[seg]          # -1 indexes the trailing -1
            pos += n
        return out

    def select(self, mask: np.ndarray) -> "FlowBatch":
        return FlowBatch({k: v[mask] for k, v in self.cols.items()}, self.pods, self.drop_reasons)

    # -- conversions --------------------------------------------------------------------------
    @classmethod
    def from_records(cls, recs: Iterable[dict]) -> "FlowBatch":
        """JSON flow records (schema "flow") -> a batch. For the conntrack backend, old captures
        and tests; values are validated by the reader before they get here."""
        recs = list(recs)
        b = cls.empty(len(recs))
        c = b.cols
        pods: Dict[PodName, int] = {}
        drops: Dict[str, int] = {}
        for i, r in enumerate(recs):
            c["ts_ns"][i] = r["ts_ns"] if "ts_ns" in r else iso_to_ns(r["ts"]) if r.get("ts") else 0
            c["proto"][i] = protomod.number(r["proto"])
            c["family"][i] = r["family"]
            c["hook"][i] = protomod.hook_number(r.get("hook") or "prerouting")
            for a in ("client", "node", "pod", "snat"):
                c[a + "_addr"][i] = np.void(pack_addr(r.get(a + "_ip")))
            c["client_port"][i] = r.get("client_port") or 0
            c["host_port"][i] = r["host_port"]
            c["pod_port"][i] = r.get("pod_port") or 0
            out = r.get("outcome")
            if out is None:              # written before outcomes (schema < 4): answered says it
                out = "answered" if r.get("answered") else "unanswered"
            c["outcome"][i] = oc.OUTCOMES.index(out)
            c["answered"][i] = out == "answered"
            c["refusal"][i] = oc.code_of(oc.REFUSALS, r.get("refusal"))
            c["refused_by"][i] = oc.code_of(oc.REFUSED_BY, r.get("refused_by"))
            c["icmp_type"][i] = r.get("icmp_type") or 0
            c["icmp_code"][i] = r.get("icmp_code") or 0
            rt = r.get("refusal_us")
            c["refusal_us"][i] = np.nan if rt is None else float(rt)
            c["midstream"][i] = bool(r.get("midstream"))
            c["masqueraded"][i] = bool(r.get("masqueraded"))
            c["masq_known"][i] = r.get("masqueraded") is not None
            lat = r.get("latency_us")
            c["latency_us"][i] = np.nan if lat is None else float(lat)
            c["packets"][i] = -1 if r.get("packets") is None else int(r["packets"])
            c["bytes"][i] = -1 if r.get("bytes") is None else int(r["bytes"])
            if r.get("drop_reason"):
                c["drop"][i] = drops.setdefault(r["drop_reason"], len(drops))
            name = (r.get("pod_namespace"), r.get("pod_name"), r.get("port_name"))
            if any(v is not None for v in name):
                c["pod"][i] = pods.setdefault(name, len(pods))
        b.pods = list(pods)
        b.drop_reasons = list(drops)
        return b

    def to_records(self, addr: Optional[AddrNames] = None) -> List[dict]:
        """The batch as JSON "flow" records (schema order). Per-flow Python: for text sinks."""
        addr = addr or AddrNames()
        c = self.cols
        n = len(self)
        if n == 0:
            return []
        fam = c["family"]
        client, node, pod = (addr.column(c[k], fam) for k in ("client_addr", "node_addr", "pod_addr"))
        snat = addr.column(c["snat_addr"], fam)
        ts = ns_to_iso_column(c["ts_ns"])
        lat, rlat = c["latency_us"].tolist(), c["refusal_us"].tolist()
        pk, by = c["packets"].tolist(), c["bytes"].tolist()
        cols = {k: c[k].tolist() for k in ("proto", "family", "hook", "client_port", "host_port",
                                          "pod_port", "answered", "midstream", "masqueraded",
                                          "masq_known", "drop", "pod", "outcome", "refusal",
                                          "refused_by", "icmp_type", "icmp_code")}
        pnames, hnames = protomod.NAMES, protomod.HOOKS
        none3 = (None, None, None)
        out = []
        for i in range(n):
            p = cols["pod"][i]
            ns, name, port_name = self.pods[p] if p >= 0 else none3
            d = cols["drop"][i]
            masq = cols["masqueraded"][i] if cols["masq_known"][i] else None
            lt, rt = lat[i], rlat[i]
            rf = cols["refusal"][i]
            icmp = rf in oc.ICMP_REFUSALS
            out.append({
                "type": "flow", "ts": ts[i],
                "proto": pnames.get(cols["proto"][i]) or str(cols["proto"][i]),
                "family": cols["family"][i],
                "client_ip": client[i], "client_port": cols["client_port"][i],
                "node_ip": node[i], "host_port": cols["host_port"][i],
                "pod_ip": pod[i], "pod_port": cols["pod_port"][i],
                "hook": hnames.get(cols["hook"][i]) or str(cols["hook"][i]),
                "answered": cols["answered"][i],
                "outcome": oc.OUTCOMES[cols["outcome"][i]],
                "refusal": oc.REFUSALS[rf] if rf < len(oc.REFUSALS) else None,
                "refused_by": oc.REFUSED_BY[cols["refused_by"][i]] if rf else None,
                "icmp_type": cols["icmp_type"][i] if icmp else None,
                "icmp_code": cols["icmp_code"][i] if icmp else None,
                "latency_us": None if lt != lt else lt,
                "refusal_us": None if rt != rt else rt,
                "midstream": cols["midstream"][i], "masqueraded": masq,
                "snat_ip": snat[i] if masq else None,
                "packets": None if pk[i] < 0 else pk[i], "bytes": None if by[i] < 0 else by[i],
                "pod_namespace": ns, "pod_name": name, "port_name": port_name,
                "drop_reason": self.drop_reasons[d] if d >= 0 else None,
            })
        return out

    def to_arrow(self):
        """The batch as rows of kind "flow" in the recording's columns (records/arrowout.Batch:
        numpy buffers); pyarrow.record_batch() takes it as it is."""
        from bpftrace_hostport.records import arrowout as ao
        c = self.cols
        pods = self.pods

        def opt_int(name):
            v = c[name]
            return ao.column(name, np.where(v < 0, 0, v).astype(np.uint64), v >= 0)

        def text(name, codes, values):
            return ao.column(name, *ao.strings(codes, values))

        cols = {name: ao.column(name, c[name]) for name in (
            "proto", "family", "hook", "client_addr", "client_port", "node_addr", "host_port",
            "pod_addr", "pod_port", "answered", "midstream", "snat_addr", "outcome")}
        refused = c["refusal"] > 0
        icmp = c["refusal"] >= min(oc.ICMP_REFUSALS)
        cols.update({
            "ts": ao.column("ts", c["ts_ns"]),
            "masqueraded": ao.column("masqueraded", c["masqueraded"], c["masq_known"]),
            "latency_us": ao.column("latency_us", c["latency_us"], ~np.isnan(c["latency_us"])),
            "refusal": ao.column("refusal", c["refusal"], refused),
            "refused_by": ao.column("refused_by", c["refused_by"], refused),
            "icmp_type": ao.column("icmp_type", c["icmp_type"], icmp),
            "icmp_code": ao.column("icmp_code", c["icmp_code"], icmp),
            "refusal_us": ao.column("refusal_us", c["refusal_us"], ~np.isnan(c["refusal_us"])),
            "packets": opt_int("packets"), "bytes": opt_int("bytes"),
            "pod_namespace": text("pod_namespace", _pod_field(c["pod"], pods, 0), _values(pods, 0)),
            "pod_name": text("pod_name", _pod_field(c["pod"], pods, 1), _values(pods, 1)),
            "port_name": text("port_name", _pod_field(c["pod"], pods, 2), _values(pods, 2)),
            "drop_reason": text("drop_reason", c["drop"], self.drop_reasons),
        })
        return ao.batch("flow", len(self), cols)


def _intern(table: list, value) -> int:
    try:
        return table.index(value)
    except ValueError:
        table.append(value)
        return len(table) - 1


def _values(pods: List[PodName], k: int) -> List[str]:
    return [p[k] if p[k] is not None else "" for p in pods]


def _pod_field(pod_idx: np.ndarray, pods: List[PodName], k: int) -> np.ndarray:
    """Indexes into _values(pods, k), -1 where the pod or that field is unknown."""
    if not pods:
        return np.full(len(pod_idx), -1, np.int32)
    known = np.array([p[k] is not None for p in pods] + [False])
    idx = np.where(known[pod_idx], pod_idx, -1)
    return idx.astype(np.int32)


def iso_to_ns(ts: str) -> int:
    dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def ns_to_iso(ns: int) -> str:
    sec, rem = divmod(int(ns), 1_000_000_000)
    return datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{rem // 1000:06d}Z"


def ns_to_iso_column(ts_ns: np.ndarray) -> List[str]:
    """ISO 8601 strings for a column of ns timestamps, formatting each second once."""
    import time
    secs, rems = np.divmod(ts_ns, 1_000_000_000)
    out, last, prefix = [], None, ""
    for s, r in zip(secs.tolist(), (rems // 1000).tolist()):
        if s != last:
            last, prefix = s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
        out.append(f"{prefix}.{r:06d}Z")
    return out
