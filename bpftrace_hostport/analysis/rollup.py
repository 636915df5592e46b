"""The one roll-up: flows, misses and the kernel's counters folded per node and mapping, batch
by batch, for every output. The live summary (collect/session.py), `summary`, `report`,
`export`'s summary records and the metrics (where the kernel has no counter) all read their
figures from here, so one capture gives one set of numbers everywhere.

What is kept per (session, mapping) is bounded whatever the number of flows (analysis/dist.py):
counts by outcome and refusal, packets and bytes, masquerade and midstream counts, flows with a
drop by reason, the latency distribution of answered flows and of refusals, the top clients,
and flows per time bucket by outcome. Misses are kept per (session, proto, hostPort).

A session is one tracer run: its files (a rotated recording's) share its header. How the
kernel's counters (a session's summary record, or the live counters) and the records combine
is one rule, `_figures` below, written down in ARCHITECTURE.md ("The one roll-up").

numpy only: the tracer uses it too, without pandas.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.analysis import dist
from bpftrace_hostport.records import outcome as oc
from bpftrace_hostport.records.batch import AddrNames, FlowBatch, group_rows, unpack_addr

#: Percentiles reported (numpy "linear" while exact).
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
#: Outcome rows of the time series.
SERIES_ROWS = ("answered", "refused", "unanswered")

Key = Tuple[str, Optional[int], int, Optional[str], Optional[int]]   # proto, family, hostPort, pod IP, pod port
PodNames = Callable[[str, str, int], Optional[Tuple[Optional[str], Optional[str], Optional[str]]]]
LIVE = ("", "live")
_MAP_COLS = ("proto", "family", "host_port", "pod_addr", "pod_port")


@dataclass
class Session:
    """One tracer run as the roll-up saw it: which files of it were read and what its summary
    (the kernel's counters at its end) said."""
    node: str
    sid: str
    backend: str = "netfilter"
    measures: Dict[str, bool] = field(default_factory=lambda: dict.fromkeys(
        ("latency", "packets", "misses", "drops"), True))
    started_ns: Optional[int] = None
    ended_ns: Optional[int] = None
    files: Dict[int, str] = field(default_factory=dict)       # file index -> source name
    damaged: List[str] = field(default_factory=list)           # files read only in part
    last_index: Optional[int] = None                           # the file that holds the summary
    summary: Optional[dict] = None
    first_ns: Optional[int] = None                             # data seen
    last_ns: Optional[int] = None
    file_spans: List[Tuple[Optional[int], Optional[int]]] = field(default_factory=list)
    live: bool = False

    def whole(self) -> bool:
        """Every file of the run read, intact, and its summary among them: the kernel's counts
        then cover exactly the records read."""
        if self.live:
            return True
        if self.summary is None or self.damaged or self.last_index is None:
            return False
        return set(self.files) >= set(range(self.last_index + 1))

    def span(self) -> Tuple[Optional[int], Optional[int]]:
        """What the session's figures cover: the whole run when it is whole, else the files
        read (from their creation to their end row, or their last record)."""
        if not self.whole() and self.file_spans:
            lo = min([a for a, _ in self.file_spans if a is not None] + ([self.first_ns] if self.first_ns else []),
                     default=None)
            hi = max([b for _, b in self.file_spans if b is not None] + ([self.last_ns] if self.last_ns else []),
                     default=None)
            return lo, hi
        lo = self.started_ns if self.started_ns is not None else self.first_ns
        hi = self.ended_ns
        if self.last_ns is not None:
            hi = self.last_ns if hi is None else max(hi, self.last_ns)
        if lo is not None and self.first_ns is not None:
            lo = min(lo, self.first_ns)
        return lo, hi


class MappingAcc:
    """Everything kept for one mapping of one session (see the module's doc)."""

    __slots__ = ("flows", "outcomes", "refusals", "packets", "bytes", "counted", "masq",
                 "masq_known", "midstream", "dropped", "lat", "rlat", "clients", "series",
                 "series_grid", "names", "first_ns", "last_ns")

    def __init__(self, clients_cap: int) -> None:
        self.flows = 0
        self.outcomes = np.zeros(len(oc.OUTCOMES), np.int64)
        self.refusals: Dict[Tuple[int, int], int] = {}     # (refusal code, by code) -> flows
        self.packets = self.bytes = self.counted = 0          # records' sums, rows that had them
        self.masq = self.masq_known = self.midstream = 0
        self.dropped: Dict[str, int] = {}                      # flows with a drop, by reason
        self.lat = dist.Dist()
        self.rlat = dist.Dist()
        self.clients = dist.TopCounts(clients_cap)
        self.series: Optional[np.ndarray] = None
        self.series_grid = (0, 0, 0)
        self.names: List[Optional[str]] = [None, None, None]
        self.first_ns: Optional[int] = None
        self.last_ns: Optional[int] = None

    def merge(self, o: "MappingAcc", grid: Tuple[int, int, int]) -> None:
        self.flows += o.flows
        self.outcomes += o.outcomes
        for k, v in o.refusals.items():
            self.refusals[k] = self.refusals.get(k, 0) + v
        self.packets += o.packets
        self.bytes += o.bytes
        self.counted += o.counted
        self.masq += o.masq
        self.masq_known += o.masq_known
        self.midstream += o.midstream
        for k, v in o.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v
        self.lat.merge(o.lat)
        self.rlat.merge(o.rlat)
        self.clients.merge(o.clients)
        if o.series is not None:
            theirs = dist.rebin(o.series, o.series_grid, grid)
            mine = (dist.rebin(self.series, self.series_grid, grid) if self.series is not None
                    else np.zeros_like(theirs))
            self.series, self.series_grid = mine + theirs, grid
        for i, v in enumerate(o.names):
            if self.names[i] is None and v is not None:
                self.names[i] = v
        for t in (o.first_ns, o.last_ns):
            if t is not None:
                self.first_ns = t if self.first_ns is None else min(self.first_ns, t)
                self.last_ns = t if self.last_ns is None else max(self.last_ns, t)


class MissAcc:
    __slots__ = ("count", "families", "clients", "series", "series_grid", "last_ns")

    def __init__(self, clients_cap: int) -> None:
        self.count = 0
        self.families: set = set()
        self.clients = dist.TopCounts(clients_cap)
        self.series: Optional[np.ndarray] = None
        self.series_grid = (0, 0, 0)
        self.last_ns: Optional[int] = None


class Rollup:
    """Folds flow batches and miss records as they come; `figures()` gives the numbers.

    series: keep flows per time bucket (report); clients: keep top clients (report). The live
    summary needs neither."""

    def __init__(self, *, series: bool = True, clients: bool = True, clients_cap: int = 4096,
                 distinct_cap: int = 1 << 20) -> None:
        self.keep_series, self.keep_clients = series, clients
        self.clients_cap, self.distinct_cap = clients_cap, distinct_cap
        self.grid = dist.Grid()
        self.sessions: Dict[Tuple[str, str], Session] = {}
        self.maps: Dict[Tuple[Tuple[str, str], Key], MappingAcc] = {}
        self.misses: Dict[Tuple[Tuple[str, str], str, int], MissAcc] = {}
        self.distinct = dist.TopCounts(distinct_cap)     # every client, for the count of clients
        self.distinct_full = False
        self._addr = AddrNames()
        self.flows_seen = 0

    # -- sessions ---------------------------------------------------------------------------
    def session(self, origin: Tuple[str, str] = LIVE) -> Session:
        s = self.sessions.get(origin)
        if s is None:
            s = self.sessions[origin] = Session(node=origin[0], sid=origin[1], live=origin == LIVE)
        return s

    # -- flows ------------------------------------------------------------------------------
    def add_flows(self, b: FlowBatch, origin: Tuple[str, str] = LIVE) -> None:
        n = len(b)
        if n == 0:
            return
        self.flows_seen += n
        sess = self.session(origin)
        ts = b["ts_ns"]
        lo, hi = int(ts.min()), int(ts.max())
        sess.first_ns = lo if sess.first_ns is None else min(sess.first_ns, lo)
        sess.last_ns = hi if sess.last_ns is None else max(sess.last_ns, hi)
        if self.keep_series:
            self.grid.cover(lo, hi)
        grid = self.grid.shape()
        first, inv = group_rows(*(b[c] for c in _MAP_COLS))
        g = len(first)
        out = b["outcome"].astype(np.int64)
        nout = len(oc.OUTCOMES)
        # Every mapping's counters at once; a Python step per mapping only to add them up.
        per_out = np.bincount(inv * nout + out, minlength=g * nout).reshape(g, nout)
        known = b["packets"] >= 0
        pk = np.bincount(inv[known], weights=b["packets"][known], minlength=g)
        nb = np.bincount(inv[known], weights=b["bytes"][known], minlength=g)
        counted = np.bincount(inv[known], minlength=g)
        masq = np.bincount(inv, weights=b["masqueraded"] & b["masq_known"], minlength=g)
        masq_known = np.bincount(inv, weights=b["masq_known"], minlength=g)
        mid = np.bincount(inv, weights=b["midstream"], minlength=g)
        flows = np.bincount(inv, minlength=g)
        t_lo = np.full(g, np.iinfo(np.int64).max, np.int64)
        t_hi = np.full(g, np.iinfo(np.int64).min, np.int64)
        np.minimum.at(t_lo, inv, ts)
        np.maximum.at(t_hi, inv, ts)
        timed = (out == oc.ANSWERED) & ~b["midstream"] & ~np.isnan(b["latency_us"])
        rtimed = (out == oc.REFUSED) & ~b["midstream"] & ~np.isnan(b["refusal_us"])
        srow = np.where(out == oc.ANSWERED, 0, np.where(out == oc.REFUSED, 1, 2))
        bucket = self.grid.index(ts) if self.keep_series else None
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(g + 1)).tolist()
        if self.keep_clients:                   # distinct clients: each batch's own, once
            dfirst, _ = group_rows(b["client_addr"], b["family"])
            self.distinct.add(b["client_addr"][dfirst], b["family"][dfirst])
        proto_c, fam_c, hp_c, pa_c, pp_c = (b[c] for c in _MAP_COLS)
        pod, drop = b["pod"], b["drop"]
        any_drop = bool((drop >= 0).any())
        any_refused = bool(per_out[:, oc.REFUSED].any())
        for j, i in enumerate(first.tolist()):
            fam = int(fam_c[i])
            key = (protomod.name(proto_c[i]), fam, int(hp_c[i]),
                   self._addr(pa_c[i].tobytes(), fam), int(pp_c[i]))
            acc = self.maps.get((origin, key))
            if acc is None:
                acc = self.maps[(origin, key)] = MappingAcc(self.clients_cap)
            acc.flows += int(flows[j])
            acc.outcomes += per_out[j]
            acc.packets += int(pk[j])
            acc.bytes += int(nb[j])
            acc.counted += int(counted[j])
            acc.masq += int(masq[j])
            acc.masq_known += int(masq_known[j])
            acc.midstream += int(mid[j])
            t0, t1 = int(t_lo[j]), int(t_hi[j])
            acc.first_ns = t0 if acc.first_ns is None else min(acc.first_ns, t0)
            acc.last_ns = t1 if acc.last_ns is None else max(acc.last_ns, t1)
            rows = order[bounds[j]:bounds[j + 1]]
            acc.lat.add(b["latency_us"][rows[timed[rows]]])
            acc.rlat.add(b["refusal_us"][rows[rtimed[rows]]])
            if self.keep_clients:
                acc.clients.add(b["client_addr"][rows], b["family"][rows])
            if self.keep_series:
                cells = np.bincount(srow[rows] * grid[2] + bucket[rows],
                                    minlength=len(SERIES_ROWS) * grid[2]).reshape(len(SERIES_ROWS), grid[2])
                acc.series = cells if acc.series is None else dist.rebin(acc.series, acc.series_grid, grid) + cells
                acc.series_grid = grid
            if None in acc.names:
                for p in np.unique(pod[rows]).tolist():
                    if p >= 0:
                        for f, v in enumerate(b.pods[p]):
                            if acc.names[f] is None and v is not None:
                                acc.names[f] = v
            if any_drop:
                d = drop[rows]
                d = d[d >= 0]
                for code, cnt in zip(*np.unique(d, return_counts=True)):
                    reason = b.drop_reasons[code]
                    acc.dropped[reason] = acc.dropped.get(reason, 0) + int(cnt)
            if any_refused and per_out[j, oc.REFUSED]:
                ref = rows[out[rows] == oc.REFUSED]
                code = b["refusal"][ref].astype(np.int64) * 4 + b["refused_by"][ref]
                for c, cnt in zip(*np.unique(code, return_counts=True)):
                    k = divmod(int(c), 4)
                    acc.refusals[k] = acc.refusals.get(k, 0) + int(cnt)

    # -- misses -----------------------------------------------------------------------------
    def add_misses(self, recs: Iterable[dict], origin: Tuple[str, str] = LIVE) -> None:
        """Miss records (schema "miss": proto, family, client_ip, host_port, count, ts)."""
        from bpftrace_hostport.records.batch import iso_to_ns, pack_addr
        sess = self.session(origin)
        for r in recs:
            key = (origin, str(r["proto"]).lower(), int(r["host_port"]))
            acc = self.misses.get(key)
            if acc is None:
                acc = self.misses[key] = MissAcc(self.clients_cap)
            n = int(r.get("count", 1) or 0)
            acc.count += n
            if r.get("family") is not None:
                acc.families.add(int(r["family"]))
            t = r.get("ts_ns")
            if t is None and r.get("ts"):
                t = iso_to_ns(r["ts"])
            if t is not None:
                acc.last_ns = t if acc.last_ns is None else max(acc.last_ns, t)
                sess.first_ns = t if sess.first_ns is None else min(sess.first_ns, t)
                sess.last_ns = t if sess.last_ns is None else max(sess.last_ns, t)
                if self.keep_series:
                    self.grid.cover(t, t)
                    grid = self.grid.shape()
                    if acc.series is None:
                        acc.series, acc.series_grid = np.zeros((1, grid[2]), np.int64), grid
                    acc.series = dist.rebin(acc.series, acc.series_grid, grid)
                    acc.series_grid = grid
                    acc.series[0, int(self.grid.index(np.array([t]))[0])] += n
            if self.keep_clients and r.get("client_ip"):
                fam = int(r.get("family") or (6 if ":" in r["client_ip"] else 4))
                acc.clients.add(np.array([np.void(pack_addr(r["client_ip"]))]), np.array([fam], np.uint8),
                                np.array([n]))

    # -- the figures ------------------------------------------------------------------------
    def figures(self, *, kernel: Optional[dict] = None, pod_names: Optional[PodNames] = None,
                rows_filtered: bool = False, keep: Optional[Callable[[dict], bool]] = None,
                owner: Optional[Callable[[str, int], Optional[Tuple[str, str, Optional[str]]]]] = None,
                window: Tuple[Optional[int], Optional[int]] = (None, None), top: int = 5,
                latency: bool = True) -> "Figures":
        """The numbers, per node and mapping.

        kernel: the live session's counters (backend.counters()), for the live roll-up;
        offline, each session's summary record plays that part. rows_filtered: a time or
        client filter dropped rows, so no kernel total describes what is left. keep: which
        mappings to show (a pod or hostPort filter: whole mappings, kernel totals stay valid).
        owner(proto, host_port): the hostNetwork pod owning a port without DNAT (live).
        window: the time a filter restricts the span to. latency=False leaves the percentiles
        out (None): what makes a summary cheap enough for sinks that tick without showing them."""
        return _figures(self, kernel, pod_names, rows_filtered, keep, owner, window, top, latency)


# =================================================================================== figures

@dataclass
class Figures:
    mappings: List[dict]                 # one per (node, mapping), in report order
    nodes: Dict[str, dict]               # per node: totals, span, sessions, measures, coverage
    totals: dict
    notes: List[str]
    grid: Tuple[int, int, int]           # (t0, step, n) of the series
    clients: Optional[int]               # distinct clients (None: not kept)
    clients_capped: bool
    kernel_whole: bool                   # every count is the kernel's


def _norm_key(m: dict) -> Key:
    pod_port = m.get("pod_port")
    fam = m.get("family")
    return (str(m["proto"]).lower(), None if fam is None else int(fam), int(m["host_port"]),
            m.get("pod_ip"), None if pod_port is None else int(pod_port))


def _kernel_maps(summary: dict) -> Dict[Key, dict]:
    """A summary record's (or the live counters') per-mapping figures, summed per key."""
    out: Dict[Key, dict] = {}
    for m in summary.get("mappings") or []:
        k = _norm_key(m)
        e = out.setdefault(k, {"flows": 0, "packets": None, "bytes": None, "drops": {},
                               "answered": 0, "refusals": {}, "names": [None, None, None],
                               "latency_hist": None, "misses": None})
        e["flows"] += int(m.get("flows") or 0)
        for c in ("packets", "bytes"):
            if m.get(c) is not None:
                e[c] = (e[c] or 0) + int(m[c])
        for reason, n in (m.get("drops") or {}).items():
            e["drops"][reason] = e["drops"].get(reason, 0) + int(n)
        e["answered"] += int(m.get("answered") or 0)
        for r, n in (m.get("refusals") or {}).items():
            e["refusals"][r] = e["refusals"].get(r, 0) + int(n)
        for i, f in enumerate(("pod_namespace", "pod_name", "port_name")):
            e["names"][i] = e["names"][i] or m.get(f)
        if m.get("latency_hist") is not None:
            e["latency_hist"] = list(m["latency_hist"])
        if m.get("misses") is not None:
            e["misses"] = int(m["misses"])
    return out


def _ip_sort(ip: Optional[str]) -> tuple:
    if ip is None:
        return (0, 0, 0, "")
    try:
        a = ipaddress.ip_address(ip)
        return (1, a.version, int(a), "")
    except ValueError:
        return (2, 0, 0, ip)


def _sort_key(m: dict) -> tuple:
    return (m["node"], m["proto"], m["host_port"], _ip_sort(m["pod_ip"]),
            m["family"] if m["family"] is not None else 0,
            m["pod_port"] if m["pod_port"] is not None else -1)


def _fill_names(key: Key, names: List[Optional[str]], pod_names: Optional[PodNames]) -> List[Optional[str]]:
    proto, _, _, pod_ip, pod_port = key
    if pod_names is None or pod_ip is None or None not in names:
        return names
    found = pod_names(proto, pod_ip, pod_port)
    if not found:
        return names
    found = (tuple(found) + (None, None, None))[:3]
    return [mine if mine is not None else (None if f is None else str(f)) for mine, f in zip(names, found)]


def _latency(d: dist.Dist) -> dict:
    q = d.quantiles([p for _, p in PERCENTILES]) if len(d) else []
    out = {name: (round(v, 1) if q else None) for (name, _), v in zip(PERCENTILES, q or [None] * 3)}
    out["max"] = round(d.max, 1) if len(d) else None
    return out


def _share(part: Optional[int], whole: Optional[int]) -> Optional[float]:
    return round(part / whole, 4) if part is not None and whole else None


def _refusal_names(refusals: Dict[Tuple[int, int], int]) -> Tuple[Dict[str, int], Dict[str, int]]:
    by_kind: Dict[str, int] = {}
    by_who: Dict[str, int] = {}
    for (r, b), n in refusals.items():
        name = oc.REFUSALS[r] if 0 < r < len(oc.REFUSALS) else "unknown"
        by_kind[name] = by_kind.get(name, 0) + n
        who = oc.REFUSED_BY[b] if 0 < b < len(oc.REFUSED_BY) else "unknown"
        by_who[who] = by_who.get(who, 0) + n
    return dict(sorted(by_kind.items())), dict(sorted(by_who.items()))


def _union(spans: Sequence[Tuple[Optional[int], Optional[int]]]) -> Tuple[Optional[int], Optional[int], float]:
    """(start, end, covered seconds) of intervals (overlaps counted once)."""
    iv = sorted((lo, hi) for lo, hi in spans if lo is not None and hi is not None)
    if not iv:
        return None, None, 0.0
    covered, (cur_lo, cur_hi) = 0, iv[0]
    for lo, hi in iv[1:]:
        if lo > cur_hi:
            covered += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    covered += cur_hi - cur_lo
    return iv[0][0], max(h for _, h in iv), covered / 1e9


def _clip(span: Tuple[Optional[int], Optional[int]], window) -> Tuple[Optional[int], Optional[int]]:
    lo, hi = span
    wlo, whi = window
    if lo is not None and wlo is not None:
        lo = max(lo, wlo)
    if hi is not None and whi is not None:
        hi = min(hi, whi)
    if lo is not None and hi is not None and hi < lo:
        hi = lo
    return lo, hi


def _figures(r: Rollup, kernel: Optional[dict], pod_names, rows_filtered: bool, keep, owner,
             window, top: int, latency: bool = True) -> Figures:
    """THE RULE (ARCHITECTURE.md, "The one roll-up"): per session and mapping,

    * when the session is whole (every file of the run read, intact, with its summary; or the
      live session) and no row filter applies: flows = max(the kernel's count, the records'),
      packets, bytes and drops (packets) are the kernel's, and flows the kernel counts that no
      record carries are `in_flight` (live) or lost;
    * otherwise: every count is the records'; packets, bytes and packet drops are None (n/a:
      flow records carry them only up to the first reply), and the notes say what is covered;
    * outcomes, latency, refusals, clients, masquerade and flows with drops are always the
      records' (the kernel's answered/refused counts are added only for flows it decided
      without any record: counters-only tracing);
    * misses are always the miss records' (the kernel's counter deltas: complete);
    * a node's rate is its flows over its own sessions' covered time.
    Then per node and mapping the sessions are added up (an unknown part makes the sum unknown).
    """
    grid = r.grid.shape()
    notes: List[str] = []
    kern_by_sess: Dict[Tuple[str, str], Dict[Key, dict]] = {}
    for origin, s in r.sessions.items():
        src = kernel if s.live else s.summary
        if src is not None:
            kern_by_sess[origin] = _kernel_maps(src)
    kernel_only = bool(kernel and kernel.get("answered_in_kernel_only"))

    # per (node, key): sessions' parts
    rows: Dict[Tuple[str, Key], dict] = {}
    sess_whole = {o: s.whole() and not rows_filtered for o, s in r.sessions.items()}

    def row(node: str, key: Key) -> dict:
        e = rows.get((node, key))
        if e is None:
            e = rows[(node, key)] = {"acc": None, "kflows": 0, "packets": 0, "bytes": 0,
                                     "drops": {}, "kernel": True, "kern_names": [None, None, None],
                                     "k_answered": 0, "k_refusals": {}, "sessions": set()}
        return e

    for (origin, key), acc in r.maps.items():
        e = row(origin[0], key)
        if e["acc"] is None:
            e["acc"] = MappingAcc(r.clients_cap)
            e["acc"].series_grid = grid
        e["acc"].merge(acc, grid)
        e["sessions"].add(origin)
    for origin, km in kern_by_sess.items():
        if not sess_whole.get(origin):
            continue                         # the kernel's rows describe a whole run only
        for key, k in km.items():
            if key[3] is None:
                continue                     # a misses-only row: misses come from the records
            e = row(origin[0], key)
            e["sessions"].add(origin)
    for (node, key), e in rows.items():
        for origin in e["sessions"]:
            k = kern_by_sess.get(origin, {}).get(key)
            if not sess_whole.get(origin) or k is None:
                if sess_whole.get(origin) and k is None:
                    continue                  # the kernel saw no flow there: records only, exact
                e["kernel"] = False
                continue
            e["kflows"] += k["flows"]
            e["packets"] = None if e["packets"] is None or k["packets"] is None else e["packets"] + k["packets"]
            e["bytes"] = None if e["bytes"] is None or k["bytes"] is None else e["bytes"] + k["bytes"]
            for reason, n in k["drops"].items():
                e["drops"][reason] = e["drops"].get(reason, 0) + n
            for i, v in enumerate(k["names"]):
                e["kern_names"][i] = e["kern_names"][i] or v
            if kernel_only and r.sessions[origin].live:
                e["k_answered"] += k["answered"]
                for name, n in k["refusals"].items():
                    e["k_refusals"][name] = e["k_refusals"].get(name, 0) + n

    # misses per (node, proto, hostPort)
    misses: Dict[Tuple[str, str, int], dict] = {}
    for (origin, proto, hp), m in r.misses.items():
        e = misses.setdefault((origin[0], proto, hp), {"count": 0, "families": set(), "clients": None})
        e["count"] += m.count
        e["families"] |= m.families
        if e["clients"] is None:
            e["clients"] = dist.TopCounts(r.clients_cap)
        e["clients"].merge(m.clients)
        if m.series is not None:
            s = dist.rebin(m.series, m.series_grid, grid)
            e["series"] = e.get("series", 0) + s

    # nodes
    nodes: Dict[str, dict] = {}
    for origin, s in sorted(r.sessions.items()):
        n = nodes.setdefault(s.node, {"sessions": [], "spans": [], "backends": set(),
                                      "measures": dict.fromkeys(("latency", "packets", "misses", "drops"), True),
                                      "whole": True, "lost_events": 0, "files": []})
        n["sessions"].append(s)
        n["spans"].append(_clip(s.span(), window))
        n["backends"].add(s.backend)
        n["measures"] = {k: n["measures"][k] and s.measures.get(k, True) for k in n["measures"]}
        n["whole"] &= sess_whole[origin]
        n["files"] += [f for _, f in sorted(s.files.items())]
        src = kernel if s.live else s.summary
        if n["lost_events"] is not None:
            lost = (src or {}).get("lost_events") if sess_whole[origin] else None
            n["lost_events"] = None if lost is None else n["lost_events"] + int(lost)
    for name, n in nodes.items():
        lo, hi, covered = _union(n["spans"])
        n.update(start_ns=lo, end_ns=hi, duration_s=covered, backend="+".join(sorted(n.pop("backends"))))

    out: List[dict] = []
    for (node, key), e in rows.items():
        acc = e["acc"] or MappingAcc(r.clients_cap)
        meas = nodes.get(node, {}).get("measures", {})
        names = list(acc.names)
        for i, v in enumerate(e["kern_names"]):
            names[i] = names[i] or v
        names = _fill_names(key, names, pod_names)
        m = _mapping(key, node, acc, e, meas if latency else dict(meas, latency=False), names, top,
                     kernel_only)
        out.append(m)
    mapped = {(m["node"], m["proto"], m["host_port"]) for m in out}
    for (node, proto, hp), ms in misses.items():
        for m in out:
            if (m["node"], m["proto"], m["host_port"]) == (node, proto, hp):
                m["misses"] = ms["count"]
        if (node, proto, hp) in mapped:
            continue
        fam = next(iter(ms["families"])) if len(ms["families"]) == 1 else None
        names = [None, None, None]
        for o, km in kern_by_sess.items():           # the summary named the port's owner
            if o[0] == node:
                for key, k in km.items():
                    if key[3] is None and key[0] == proto and key[2] == hp:
                        names = [a or b for a, b in zip(names, k["names"])]
        if owner is not None and names[1] is None:
            found = owner(proto, hp)
            if found:
                names = list(found)
        m = _mapping((proto, fam, hp, None, None), node, MappingAcc(r.clients_cap),
                     {"kernel": False, "kflows": 0, "packets": 0, "bytes": 0, "drops": {},
                      "k_answered": 0, "k_refusals": {}}, nodes.get(node, {}).get("measures", {}),
                     names, top, kernel_only)
        meas = nodes.get(node, {}).get("measures", {})
        # no DNAT happened: nothing to count but the misses (where the backend counts at all)
        m.update(misses=ms["count"], packets=0 if meas.get("packets", True) else None,
                 bytes=0 if meas.get("packets", True) else None,
                 drops={} if meas.get("drops", True) else None, source_of_counts="records")
        m["top_clients"] = _top(ms["clients"], top)
        m["miss_series"] = ms.get("series")
        out.append(m)
    for m in out:
        meas = nodes.get(m["node"], {}).get("measures", {})
        if not meas.get("misses", True):
            m["misses"] = None
        dur = nodes.get(m["node"], {}).get("duration_s") or 0.0
        m["flows_per_s"] = round(m["flows"] / dur, 3) if dur > 0 else None
    if keep is not None:
        out = [m for m in out if keep(m)]
    out.sort(key=_sort_key)

    for name, n in nodes.items():
        mine = [m for m in out if m["node"] == name]
        n["totals"] = _totals(mine, n["duration_s"], _node_latency(name, out) if latency else dist.Dist())
        n["source_of_counts"] = "kernel" if n["whole"] else "records"
    totals = _totals(out, sum(n["duration_s"] for n in nodes.values()),
                     _node_latency(None, out) if latency else dist.Dist(),
                     rate=sum((n["totals"]["flows_per_s"] or 0) for n in nodes.values()) if nodes else None)
    kinds = {n["source_of_counts"] for n in nodes.values()}
    totals["source_of_counts"] = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "records")
    clients = None
    if r.keep_clients:
        clients = len(r.distinct)
        r.distinct_full = r.distinct.error > 0 or clients >= r.distinct_cap
    return Figures(mappings=out, nodes=nodes, totals=totals, notes=notes, grid=grid,
                   clients=clients, clients_capped=r.distinct_full,
                   kernel_whole=all(n["whole"] for n in nodes.values()) if nodes else False)


def _top(tc: Optional[dist.TopCounts], n: int) -> List[list]:
    if tc is None:
        return []
    return [[unpack_addr(a, f), c] for a, f, c in tc.top(n)]


def _mapping(key: Key, node: str, acc: MappingAcc, e: dict, meas: dict, names, top: int,
             kernel_only: bool) -> dict:
    proto, family, host_port, pod_ip, pod_port = key
    kernel = e["kernel"] and e.get("sessions") is not None and bool(e.get("sessions"))
    flows = max(e["kflows"], acc.flows) if kernel else acc.flows
    o = acc.outcomes
    refusals, refused_by = _refusal_names(acc.refusals)
    for name, n in e.get("k_refusals", {}).items():
        refusals[name] = refusals.get(name, 0) + n
    answered = int(o[oc.ANSWERED]) + int(e.get("k_answered", 0))
    refused = int(o[oc.REFUSED]) + sum(e.get("k_refusals", {}).values())
    unanswered, pending = int(o[oc.UNANSWERED]), int(o[oc.PENDING])
    decided = answered + refused + unanswered + pending
    packets = (e["packets"] if kernel else None) if meas.get("packets", True) else None
    nbytes = (e["bytes"] if kernel else None) if meas.get("packets", True) else None
    drops = (dict(sorted(e["drops"].items())) if kernel else None) if meas.get("drops", True) else None
    lat = _latency(acc.lat) if meas.get("latency", True) else dict.fromkeys(["p50", "p90", "p99", "max"])
    m = {
        "node": node, "proto": proto, "family": family, "host_port": host_port, "pod_ip": pod_ip,
        "pod_port": pod_port, "pod_namespace": names[0], "pod_name": names[1], "port_name": names[2],
        "flows": int(flows), "answered": answered, "refused": refused, "refusals": refusals,
        "refused_by": refused_by, "unanswered": unanswered, "pending": pending,
        "in_flight": max(0, int(flows) - decided) if kernel else 0,
        "answered_share": _share(answered, int(flows)),
        "packets": None if packets is None else int(packets),
        "bytes": None if nbytes is None else int(nbytes),
        "misses": 0, "drops": drops, "dropped_flows": dict(sorted(acc.dropped.items())),
        "latency_us": lat, "latency_exact": acc.lat.is_exact,
        "refusal_us": _latency(acc.rlat) if meas.get("latency", True) else dict.fromkeys(["p50", "p90", "p99", "max"]),
        "masqueraded_share": _share(acc.masq, acc.masq_known) if acc.masq_known else None,
        "midstream": acc.midstream,
        "top_clients": _top(acc.clients, top), "clients_error": acc.clients.error,
        "source_of_counts": "kernel" if kernel else "records",
        "series": acc.series, "lat": acc.lat,
    }
    return m


def _node_latency(node: Optional[str], shown: List[dict]) -> dist.Dist:
    """The latency distribution over the shown mappings (of one node, or all)."""
    d = dist.Dist()
    for m in shown:
        if node is None or m["node"] == node:
            d.merge(m["lat"])
    return d


def _sum_known(values: Sequence[Optional[int]]) -> Optional[int]:
    """Unknown when any part is unknown: a partial sum would read as the whole."""
    return None if any(v is None for v in values) else int(sum(values))


def _totals(mappings: List[dict], duration: float, lat: dist.Dist, rate: Optional[float] = None) -> dict:
    flows = sum(m["flows"] for m in mappings)
    out = {k: sum(m[k] for m in mappings) for k in ("answered", "refused", "unanswered", "pending", "in_flight")}
    per_port = {(m["node"], m["proto"], m["host_port"]): m["misses"] for m in mappings}
    drops: Optional[Dict[str, int]] = {}
    for m in mappings:
        if m["drops"] is None:
            drops = None
            break
        for reason, n in m["drops"].items():
            drops[reason] = drops.get(reason, 0) + n
    refusals: Dict[str, int] = {}
    dropped: Dict[str, int] = {}
    for m in mappings:
        for k, n in m["refusals"].items():
            refusals[k] = refusals.get(k, 0) + n
        for k, n in m["dropped_flows"].items():
            dropped[k] = dropped.get(k, 0) + n
    out.update({
        "mappings": len(mappings), "flows": flows, "answered_share": _share(out["answered"], flows),
        "refusals": dict(sorted(refusals.items())),
        "misses": _sum_known(list(per_port.values())),
        "drops": None if drops is None else dict(sorted(drops.items())),
        "drops_total": None if drops is None else sum(drops.values()),
        "dropped_flows": dict(sorted(dropped.items())),
        "packets": _sum_known([m["packets"] for m in mappings]),
        "bytes": _sum_known([m["bytes"] for m in mappings]),
        "latency_us": _latency(lat), "latency_exact": lat.is_exact,
        "duration_s": round(duration, 3),
        "flows_per_s": rate if rate is not None else (round(flows / duration, 3) if duration > 0 else None),
    })
    if rate is not None:
        out["flows_per_s"] = round(rate, 3)
    return out
