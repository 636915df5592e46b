"""Captures folded into the one roll-up, file by file and batch by batch: what `summary`,
`report` and `export` read. Memory stays bounded whatever the number of flows.

Files are grouped into sessions (one tracer run): a rotated recording's files share their
run's header (its `session` id; older files: the node and the start time), so the kernel's
counts in the run's summary are attributed to the run as a whole, never to one file of it.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bpftrace_hostport.analysis.rollup import Rollup, Session
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records.batch import FlowBatch, group_rows, iso_to_ns, ns_to_iso, unpack_addr
from bpftrace_hostport.records.stream import CaptureFile

NS = 1_000_000_000


@dataclass
class Filters:
    """What a review is restricted to; empty lists and None restrict nothing.

    since/until and clients select rows (flows and misses): no kernel total describes what is
    left. host_ports, pods and namespaces select whole mappings: their kernel totals stay."""
    since: Optional[datetime] = None
    until: Optional[datetime] = None          # exclusive: adjacent windows never share a flow
    pods: List[str] = field(default_factory=list)         # "NAMESPACE/NAME"
    namespaces: List[str] = field(default_factory=list)
    host_ports: List[int] = field(default_factory=list)
    clients: List[str] = field(default_factory=list)      # CIDRs or addresses, v4 or v6

    def active(self) -> bool:
        return bool(self.rows() or self.pods or self.namespaces or self.host_ports)

    def rows(self) -> bool:
        return bool(self.since or self.until or self.clients)

    def as_dict(self) -> dict:
        iso = lambda d: None if d is None else ns_to_iso(_ns(d))[:-8] + "Z"   # noqa: E731
        return {"since": iso(self.since), "until": iso(self.until), "pods": list(self.pods),
                "namespaces": list(self.namespaces), "host_ports": [int(p) for p in self.host_ports],
                "clients": list(self.clients)}

    def networks(self) -> list:
        """The --client networks; ValueError, one sentence, on a bad --client or --pod."""
        nets = []
        for text in self.clients:
            try:
                nets.append(ipaddress.ip_network(str(text).strip(), strict=False))
            except ValueError:
                raise ValueError(f"--client {text!r} is not an address or CIDR: give e.g. "
                                 "10.0.0.0/8 or fd00::/64.") from None
        for pod in self.pods:
            if pod.count("/") != 1 or not all(pod.split("/")):
                raise ValueError(f"--pod {pod!r} is not NAMESPACE/NAME: give e.g. default/web-0.")
        return nets

    def keeps(self, m: dict) -> bool:
        """Whether a mapping (a figures row) is kept by the mapping filters."""
        if self.host_ports and m["host_port"] not in {int(p) for p in self.host_ports}:
            return False
        if self.namespaces and m.get("pod_namespace") not in self.namespaces:
            return False
        return not self.pods or f"{m.get('pod_namespace')}/{m.get('pod_name')}" in self.pods

    def window(self) -> Tuple[Optional[int], Optional[int]]:
        return (None if self.since is None else _ns(self.since),
                None if self.until is None else _ns(self.until))


def _ns(dt: datetime) -> int:
    dt = dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt
    return int(dt.timestamp()) * NS + dt.microsecond * 1000


@dataclass
class Review:
    rollup: Rollup
    files: List[str]
    notes: List[str]
    truncated: bool
    snapshots: Dict[str, Dict[str, List[Tuple[int, list]]]]     # node -> kind -> [(ts ns, items)]
    headers: List[dict]
    filters: Filters

    def latest(self, node: str, kind: str, at: Optional[int] = None) -> Optional[list]:
        """The node's last snapshot of `kind` (pods or rules) taken at or before `at` (ns)."""
        snaps = [s for s in self.snapshots.get(node, {}).get(kind, []) if at is None or s[0] <= at]
        return max(snaps, key=lambda s: s[0])[1] if snaps else None


def _origin(cf: CaptureFile, header: dict) -> Tuple[str, str]:
    node = header.get("node") or ""
    sid = header.get("session")
    if not sid:
        # Before schema 4 a run had no id; its rotated files share its header, start time too.
        sid = f"{header.get('started')}" if header.get("started") else f"file:{cf.name}"
    return node, str(sid)


def read(files: Sequence[CaptureFile], filters: Optional[Filters] = None, *, series: bool = True,
         clients: bool = True, on_flows=None, on_misses=None) -> Review:
    """Every file folded into one Rollup. on_flows(batch, origin, header) and
    on_misses(records, origin, header): also called for every kept batch of flows and misses
    (export writes them out as they go)."""
    f = filters or Filters()
    nets = f.networks()
    wlo, whi = f.window()
    r = Rollup(series=series, clients=clients)
    notes: List[str] = []
    snaps: Dict[str, Dict[str, List[Tuple[int, list]]]] = {}
    headers: List[dict] = []
    names: List[str] = []
    member_cache: Dict[bytes, bool] = {}
    rotated: Dict[Tuple[str, str], bool] = {}
    for cf in files:
        names.append(cf.name)
        origin: Optional[Tuple[str, str]] = None
        sess: Optional[Session] = None
        index = 0
        header: dict = {}
        for kind, item in cf.items():
            if kind == "header":
                header = item
                headers.append(dict(item, source=cf.name))
                origin = _origin(cf, item)
                sess = r.session(origin)
                index = int(item.get("file_index") or 0)
                sess.files[index] = cf.name
                sess.backend = item.get("backend") or sess.backend
                meas = item.get("measures")
                if meas is not None:
                    sess.measures = {k: bool(meas.get(k, True)) for k in sess.measures}
                elif sess.backend == "conntrack":
                    sess.measures = dict.fromkeys(sess.measures, False)
                if item.get("started"):
                    try:
                        sess.started_ns = iso_to_ns(item["started"])
                    except (ValueError, OverflowError):
                        pass
                # a file's span starts when it was opened; a JSON-lines capture does not say,
                # but the run's first file opened when the run started (a killed capture's rate
                # is then over the time it ran, not over its flows' span)
                opened = item.get("_opened_ns")
                if opened is None and index == 0 and sess.started_ns is not None:
                    opened = sess.started_ns
                span = [opened, None]
                sess.file_spans.append(span)
                continue
            if kind == "flows":
                b = item
                if f.rows():
                    b = b.select(_row_mask(b, wlo, whi, nets, member_cache))
                if len(b):
                    r.add_flows(b, origin)
                    if on_flows is not None:
                        on_flows(b, origin, header)
            elif kind == "misses":
                recs = [m for m in item if _miss_kept(m, wlo, whi, nets)]
                r.add_misses(recs, origin)
                if on_misses is not None and recs:
                    on_misses(recs, origin, header)
            elif kind == "summary":
                sess.summary = item
                sess.last_index = index
                if sess.started_ns is not None and item.get("duration_s") is not None:
                    sess.ended_ns = sess.started_ns + int(float(item["duration_s"]) * NS)
                if header.get("schema") == 1 and item.get("backend"):
                    # schema 1 had no header: its summary is the better witness of the backend
                    sess.backend = item["backend"]
                    sess.measures = dict.fromkeys(sess.measures, item["backend"] != "conntrack")
            elif kind == "end":
                span[1] = item.get("_closed_ns")
                rotated[origin] = rotated.get(origin, False) or bool(item.get("rotated"))
                if item.get("rotated") is False and sess.last_index is None and sess.summary is not None:
                    sess.last_index = index
            elif kind == "snapshot":
                node = origin[0] if origin else ""
                snaps.setdefault(node, {}).setdefault(item["kind"], []).append((item["ts_ns"], item["items"]))
        notes += cf.notes
        if cf.truncated and sess is not None:
            sess.damaged.append(cf.name)
    return Review(rollup=r, files=names, notes=notes, truncated=any(cf.truncated for cf in files),
                  snapshots=snaps, headers=headers, filters=f)


def _row_mask(b: FlowBatch, lo: Optional[int], hi: Optional[int], nets: list,
              cache: Dict[bytes, bool]) -> np.ndarray:
    ts = b["ts_ns"]
    mask = np.ones(len(b), bool)
    if lo is not None:
        mask &= ts >= lo
    if hi is not None:
        mask &= ts < hi
    if nets:
        first, inv = group_rows(b["client_addr"], b["family"])
        member = []
        for i in first.tolist():
            raw, fam = b["client_addr"][i].tobytes(), int(b["family"][i])
            key = raw + bytes([fam])
            got = cache.get(key)
            if got is None:
                addr = ipaddress.ip_address(unpack_addr(raw, fam))
                got = cache[key] = any(addr.version == n.version and addr in n for n in nets)
            member.append(got)
        mask &= np.array(member, bool)[inv]
    return mask


def _miss_kept(m: dict, lo: Optional[int], hi: Optional[int], nets: list) -> bool:
    t = m.get("ts_ns")
    if lo is not None and (t is None or t < lo):
        return False
    if hi is not None and (t is None or t >= hi):
        return False
    if nets:
        try:
            addr = ipaddress.ip_address(m["client_ip"])
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in nets)
    return True


def coverage_notes(review: Review) -> List[str]:
    """What each run's files cover, when the kernel's counts cannot be used as they are."""
    out: List[str] = []
    r = review.rollup
    for origin, s in sorted(r.sessions.items()):
        where = (f"node {s.node}" if s.node else "an unnamed node") + (
            f", run started {ns_to_iso(s.started_ns)[:19]}Z" if s.started_ns else "")
        files = ", ".join(name for _, name in sorted(s.files.items()))
        if review.filters.rows():
            continue                                  # one note for the filter says it
        span = " to ".join(ns_to_iso(t)[:19] + "Z" for t in s.span() if t is not None)
        if s.summary is None and (max(s.files, default=0) > 0 or s.file_spans and s.file_spans[-1][1]):
            nums = ", ".join(str(i + 1) for i in sorted(s.files))
            out.append(f"{files} {'are files' if len(s.files) > 1 else 'is file'} {nums} of a rotated "
                       f"run ({where}) and cover{'' if len(s.files) > 1 else 's'} {span or 'no flow'}; its last file, with the run's "
                       "summary, was not given: counts come from the flow records of the files "
                       "given; packets, bytes and packet drops are n/a.")
        elif s.summary is None:
            out.append(f"{files} ({where}) has no summary record (the tracer did not end, or the "
                       "files with its end were not given): counts come from the flow records; "
                       "packets, bytes and packet drops are n/a.")
        elif s.damaged:
            out.append(f"{files} ({where}): {', '.join(s.damaged)} was read only in part, so counts "
                       "come from the flow records read; packets, bytes and packet drops are n/a.")
        elif s.last_index is not None and not s.whole():
            have = sorted(s.files)
            missing = [i for i in range(s.last_index + 1) if i not in s.files]
            out.append(f"{files} {'are files' if len(have) > 1 else 'is file'} "
                       f"{', '.join(str(i + 1) for i in have)} of {s.last_index + 1} of one run ({where}) "
                       f"and cover {span or 'no flow'}; file{'s' if len(missing) > 1 else ''} "
                       f"{_ranges([i + 1 for i in missing])} "
                       f"{'were' if len(missing) > 1 else 'was'} not given (rotated away?): counts come "
                       "from the flow records of the files given; the run's kernel totals are in its "
                       "summary, for all its files.")
    if review.filters.rows():
        out.append("A time or client filter is active, so every count comes from the flow records "
                   "that pass it (no kernel total describes a part of a run); packets, bytes and "
                   "packet drops are n/a (flow records carry them only up to the first reply).")
    return out


def _ranges(nums: List[int]) -> str:
    parts, start, prev = [], None, None
    for n in nums + [None]:
        if start is None:
            start = prev = n
        elif n is not None and n == prev + 1:
            prev = n
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = n
    return ", ".join(parts)
