"""Flows folded per mapping, and the summary record. numpy only: no pandas in the tracer.

A mapping is (proto, family, host_port, pod_ip, pod_port). FlowAggregate folds FlowBatches
as they arrive, in O(mappings) memory plus 8 bytes per answered flow's latency (exact
percentiles); `summarize` joins it with the kernel's per-mapping counters, drop counters
and miss records into the `summary` record (records/schema.py: SUMMARY and MAPPING).
"""
from __future__ import annotations

import ipaddress
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records.batch import ADDR, AddrNames, FlowBatch, group_rows

#: Percentiles reported for answered-flow latency (numpy "linear" interpolation).
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))

Key = Tuple[str, int, int, Optional[str], Optional[int]]
PodNames = Callable[[str, str, int], Optional[Tuple[Optional[str], Optional[str], Optional[str]]]]

#: Latencies kept exactly per mapping up to this many; beyond it they fold into a log-linear
#: histogram (64 buckets per octave: percentiles within about 1 %), so a trace of hours at
#: tens of thousands of flows per second stays in bounded memory.
EXACT_LATENCIES = 200_000
_BUCKETS_PER_OCTAVE = 64
_LOG_MIN = -4.0                  # 2**-4 us: the smallest bucket's lower edge
_N_BUCKETS = int((40 - _LOG_MIN) * _BUCKETS_PER_OCTAVE)


class LatencyStore:
    """Exact latencies while few, a histogram once many; percentiles either way."""

    __slots__ = ("exact", "n_exact", "hist", "max")

    def __init__(self):
        self.exact: List[np.ndarray] = []
        self.n_exact = 0
        self.hist: Optional[np.ndarray] = None
        self.max = 0.0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        self.max = max(self.max, float(values.max()))
        if self.hist is None:
            self.exact.append(values.astype(np.float64))
            self.n_exact += len(values)
            if self.n_exact <= EXACT_LATENCIES:
                return
            values, self.exact, self.n_exact = np.concatenate(self.exact), [], 0
            self.hist = np.zeros(_N_BUCKETS, np.int64)
        self.hist += np.bincount(_bucket(values), minlength=_N_BUCKETS)

    def __len__(self) -> int:
        return self.n_exact if self.hist is None else int(self.hist.sum())

    def percentiles(self, ps) -> List[float]:
        if self.hist is None:
            values = np.concatenate(self.exact)
            self.exact = [values]             # keep one array: later folds append to it
            return [float(v) for v in np.percentile(values, ps)]
        cum = np.cumsum(self.hist)
        out = []
        for p in ps:
            i = int(np.searchsorted(cum, max(1, int(np.ceil(p / 100.0 * cum[-1])))))
            mid = 2 ** (_LOG_MIN + (i + 0.5) / _BUCKETS_PER_OCTAVE)
            out.append(min(mid, self.max))
        return out


def _bucket(values: np.ndarray) -> np.ndarray:
    logs = np.log2(np.maximum(values, 2 ** _LOG_MIN))
    return np.clip(((logs - _LOG_MIN) * _BUCKETS_PER_OCTAVE).astype(np.int64), 0, _N_BUCKETS - 1)


_KEY_DTYPE = np.dtype([("proto", "u1"), ("family", "u1"), ("host_port", "u2"),
                       ("pod_addr", ADDR), ("pod_port", "u2")])


def _new_stats() -> dict:
    return {"flows": 0, "answered": 0, "packets": None, "bytes": None, "pod_namespace": None,
            "pod_name": None, "port_name": None, "lat": LatencyStore(), "drops": {}}


class FlowAggregate:
    """Flow batches folded per mapping as they arrive."""

    def __init__(self) -> None:
        self.stats: Dict[Key, dict] = {}
        self.count = 0
        self._addr = AddrNames()

    def __len__(self) -> int:
        return self.count

    def add(self, rec: dict) -> None:
        """One JSON flow record (tests, small inputs); batches are the fast path."""
        self.add_batch(FlowBatch.from_records([rec]))

    def add_batch(self, b: FlowBatch) -> None:
        n = len(b)
        if n == 0:
            return
        self.count += n
        first, inv = group_rows(*(b[name] for name in _KEY_DTYPE.names))
        g = len(first)
        # Counters for every mapping of the batch at once; a Python step per mapping only to
        # add them up and to hand each its latencies.
        flows = np.bincount(inv, minlength=g).tolist()
        answered = b["answered"]
        n_answered = np.bincount(inv, weights=answered, minlength=g).astype(np.int64).tolist()
        sums = {}
        for name in ("packets", "bytes"):
            v = b[name]
            known = v >= 0
            if known.any():
                sums[name] = (np.bincount(inv[known], weights=v[known], minlength=g).astype(np.int64).tolist(),
                              (np.bincount(inv[known], minlength=g) > 0).tolist())
        lat = b["latency_us"]
        timed = np.flatnonzero(answered & ~np.isnan(lat))
        by_group = timed[np.argsort(inv[timed], kind="stable")]
        lat_bounds = np.searchsorted(inv[by_group], np.arange(g + 1)).tolist()
        lat_sorted = lat[by_group]
        pod, drop = b["pod"], b["drop"]
        any_drop = bool((drop >= 0).any())
        order = bounds = None         # the rows by mapping, sorted once if names or drops need them
        fam_col, proto_col, hp_col, pa_col, pp_col = (b["family"], b["proto"], b["host_port"],
                                                      b["pod_addr"], b["pod_port"])
        for j, i in enumerate(first.tolist()):
            fam = int(fam_col[i])
            key = (protomod.name(proto_col[i]), fam, int(hp_col[i]),
                   self._addr(pa_col[i].tobytes(), fam), int(pp_col[i]))
            st = self.stats.get(key)
            if st is None:
                st = self.stats[key] = _new_stats()
            st["flows"] += flows[j]
            st["answered"] += n_answered[j]
            for name, (total, seen) in sums.items():
                if seen[j]:
                    st[name] = (st[name] or 0) + total[j]
            if lat_bounds[j + 1] > lat_bounds[j]:
                st["lat"].add(lat_sorted[lat_bounds[j]:lat_bounds[j + 1]])
            if None in (st["pod_namespace"], st["pod_name"], st["port_name"]) or any_drop:
                if order is None:
                    order = np.argsort(inv, kind="stable")
                    bounds = np.searchsorted(inv[order], np.arange(g + 1)).tolist()
                self._names_and_drops(st, order[bounds[j]:bounds[j + 1]], pod, drop, b)

    @staticmethod
    def _names_and_drops(st, rows, pod, drop, b) -> None:
        if None in (st["pod_namespace"], st["pod_name"], st["port_name"]):
            for p in np.unique(pod[rows]):
                if p < 0:
                    continue
                for f, v in zip(("pod_namespace", "pod_name", "port_name"), b.pods[p]):
                    if st[f] is None and v is not None:
                        st[f] = v
        d = drop[rows]
        d = d[d >= 0]
        if len(d):
            for code, cnt in zip(*np.unique(d, return_counts=True)):
                reason = b.drop_reasons[code]
                st["drops"][reason] = st["drops"].get(reason, 0) + int(cnt)

    def flow_stats(self, latency: bool = True) -> Dict[Key, dict]:
        """Per mapping; latency=False leaves the percentiles out (None), which is what makes a
        summary cheap enough to build every second for sinks that never show them."""
        out: Dict[Key, dict] = {}
        for key, st in self.stats.items():
            lat = None
            if latency and len(st["lat"]):
                q = st["lat"].percentiles([p for _, p in PERCENTILES])
                lat = {name: round(v, 1) for (name, _), v in zip(PERCENTILES, q)}
                lat["max"] = round(st["lat"].max, 1)
            out[key] = {k: st[k] for k in ("flows", "answered", "packets", "bytes",
                                           "pod_namespace", "pod_name", "port_name")}
            out[key]["latency_us"] = lat
            out[key]["drops"] = dict(st["drops"])
        return out


def _norm_key(rec: dict) -> Key:
    pod_port = rec.get("pod_port")
    return (str(rec["proto"]).lower(), int(rec["family"]), int(rec["host_port"]),
            rec.get("pod_ip"), None if pod_port is None else int(pod_port))


def _counter_stats(counters: Iterable[dict]) -> Dict[Key, dict]:
    """Kernel per-mapping counters, summed per key (duplicates, e.g. per-CPU, add up)."""
    out: Dict[Key, dict] = {}
    for c in counters:
        st = out.setdefault(_norm_key(c), {"flows": 0, "packets": 0, "bytes": 0, "answered": 0})
        for col in st:
            st[col] += int(c.get(col) or 0)
    return out


def _drop_stats(drops: Iterable[dict]) -> Dict[Key, Dict[str, int]]:
    """Kernel drop counters -> {key: {reason: count}}."""
    out: Dict[Key, Dict[str, int]] = {}
    for d in drops:
        count = int(d.get("count") or 0)
        if count > 0:
            per = out.setdefault(_norm_key(d), {})
            reason = str(d.get("reason") or "UNKNOWN")
            per[reason] = per.get(reason, 0) + count
    return out


def _miss_stats(misses: Iterable[dict]) -> Dict[Tuple[str, int], dict]:
    """Miss records -> {(proto, host_port): {"count": total, "families": sorted families}}."""
    out: Dict[Tuple[str, int], dict] = {}
    for m in misses:
        st = out.setdefault((str(m["proto"]).lower(), int(m["host_port"])), {"count": 0, "families": set()})
        st["count"] += int(m.get("count", 1) or 0)
        if m.get("family") is not None:
            st["families"].add(int(m["family"]))
    return {k: {"count": v["count"], "families": sorted(v["families"])} for k, v in out.items()}


def _ip_sort(ip: Optional[str]) -> tuple:
    if ip is None:
        return (0, 0, "")
    try:
        addr = ipaddress.ip_address(ip)
        return (1, addr.version, int(addr))
    except ValueError:
        return (2, 0, ip)


def _sort_key(m: dict) -> tuple:
    return (m["proto"], m["host_port"], _ip_sort(m["pod_ip"]),
            m["family"] if m["family"] is not None else 0,
            m["pod_port"] if m["pod_port"] is not None else -1)


def _fill_names(key: Key, names: Tuple, pod_names: Optional[PodNames]) -> Tuple:
    proto, _, _, pod_ip, pod_port = key
    if pod_names is None or pod_ip is None or None not in names:
        return names
    found = pod_names(proto, pod_ip, pod_port)
    if not found:
        return names
    found = (tuple(found) + (None, None, None))[:3]
    return tuple(mine if mine is not None else (None if f is None else str(f))
                 for mine, f in zip(names, found))


def _mapping(key: Key, fs: Optional[dict], cs: Optional[dict], drops: Dict[str, int],
             misses: int, rate, pod_names: Optional[PodNames], kernel_answered: bool = False) -> dict:
    proto, family, host_port, pod_ip, pod_port = key
    record_flows = fs["flows"] if fs else 0
    if cs is not None:
        n_flows, packets, nbytes = max(cs["flows"], record_flows), cs["packets"], cs["bytes"]
    else:
        n_flows = record_flows
        packets, nbytes = (fs["packets"], fs["bytes"]) if fs else (0, 0)
    names = tuple(fs[f] if fs else None for f in ("pod_namespace", "pod_name", "port_name"))
    ns, name, port_name = _fill_names(key, names, pod_names)
    lat = (fs and fs["latency_us"]) or dict.fromkeys([p for p, _ in PERCENTILES] + ["max"])
    return {"proto": proto, "family": family, "host_port": host_port, "pod_ip": pod_ip,
            "pod_port": pod_port, "pod_namespace": ns, "pod_name": name, "port_name": port_name,
            "flows": int(n_flows),
            "answered": (int(fs["answered"]) if fs else 0) + (cs.get("answered", 0) if kernel_answered and cs else 0),
            "packets": packets, "bytes": nbytes, "misses": misses,
            "drops": dict(sorted(drops.items())), "latency_us": dict(lat),
            "flows_per_s": rate(int(n_flows))}


def summarize(flows: Union[FlowAggregate, List[dict]], misses: List[dict],
              counters: Optional[List[dict]], drops: Optional[List[dict]], duration_s: float,
              lost_events: int, pod_names: Optional[PodNames] = None, latency: bool = True,
              kernel_answered: bool = False) -> dict:
    """The "summary" record from folded flows, miss records and the kernel's counters.
    latency=False: without latency percentiles (a running summary for sinks that need none).
    kernel_answered: the counters' `answered` are flows that were never reported (the tracer
    ran without flow records) and add to the records' answered flows.

    * flows/packets/bytes: from `counters` when they have that mapping (flows = max of the
      counter and the number of flow records), else from the flow records;
    * answered and latency percentiles: from the flow records (answered, with a latency);
    * pod names: per field, the first non-null value from the flow records, else
      ``pod_names(proto, pod_ip, pod_port)``;
    * misses: summed per (proto, host_port), shown on every mapping of that port; a port
      with misses and no mapping gets its own row with pod_ip null (no DNAT happened);
    * drops: from `drops` when it is not None, else counted from the flow records.
    """
    if not isinstance(flows, FlowAggregate):
        agg = FlowAggregate()
        agg.add_batch(FlowBatch.from_records(flows or []))
        flows = agg
    flow_stats = flows.flow_stats(latency)
    counter_stats = _counter_stats(counters) if counters is not None else {}
    kernel_drops = _drop_stats(drops) if drops is not None else None
    miss_stats = _miss_stats(misses or [])
    keys = set(flow_stats) | set(counter_stats) | set(kernel_drops or {})

    def rate(n: int) -> Optional[float]:
        return round(n / float(duration_s), 3) if duration_s and duration_s > 0 else None

    mappings = []
    for key in keys:
        fs = flow_stats.get(key)
        d = kernel_drops.get(key, {}) if kernel_drops is not None else (fs["drops"] if fs else {})
        misses_n = miss_stats.get((key[0], key[2]), {}).get("count", 0)
        mappings.append(_mapping(key, fs, counter_stats.get(key), d, int(misses_n), rate, pod_names,
                                 kernel_answered))
    mapped = {(m["proto"], m["host_port"]) for m in mappings}
    for (proto, host_port), ms in miss_stats.items():
        if (proto, host_port) not in mapped:
            fam = ms["families"][0] if len(ms["families"]) == 1 else None   # both: no one family
            m = _mapping((proto, fam, host_port, None, None), None, None, {}, int(ms["count"]),
                         rate, None)
            m.update(packets=0, bytes=0)
            mappings.append(m)
    mappings.sort(key=_sort_key)
    return {"type": "summary", "duration_s": round(float(duration_s or 0.0), 3),
            "lost_events": int(lost_events or 0),
            "flows": int(sum(m["flows"] for m in mappings)), "mappings": mappings}


def name_mappings(summary: dict, pod_names: Optional[PodNames]) -> dict:
    """A copy of a summary record with unknown pod names filled in; no figure changes."""
    out = dict(summary)
    out["mappings"] = []
    for m in summary.get("mappings") or []:
        m = dict(m)
        if m.get("pod_ip") is not None:
            key = (m["proto"], m.get("family"), m["host_port"], m["pod_ip"], m.get("pod_port"))
            names = tuple(m.get(f) for f in ("pod_namespace", "pod_name", "port_name"))
            m["pod_namespace"], m["pod_name"], m["port_name"] = _fill_names(key, names, pod_names)
        out["mappings"].append(m)
    return out
