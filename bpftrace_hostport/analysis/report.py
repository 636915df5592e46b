"""The incident report: a Capture -> one JSON-serialisable dict (`build_report`), two reports
-> their comparison (`compare_reports`). Rendering is report_render.py, charts plots.py.

Where the kernel counted something (the summary records' per-mapping totals) the report shows
the kernel's number: flow records undercount (lost events, flows still open at exit). The
flow rows give what only they know: answered, latency, clients, masquerading, time. A filter
makes the kernel's whole-capture totals wrong for the subset, so then every count comes from
the rows and the report says so. What a backend does not measure is None ("unknown"), never 0.

Everything is computed with numpy/pandas over whole columns: strings are factorized once into
integer codes, mappings become integer ids, and per-mapping figures are bincounts, sorted
quantiles and groupbys; Python loops only run over mappings, never over rows.
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

if TYPE_CHECKING:                      # only a type: the records package is being reorganised
    from bpftrace_hostport.records.capture import Capture

KEY = ("proto", "family", "host_port", "pod_ip", "pod_port")
NAMES = ("pod_namespace", "pod_name", "port_name")
MEASURES = ("latency", "packets", "misses", "drops")
PERCENTILES = (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
QUANTILES = np.linspace(0.0, 1.0, 101)          # every percentile: p50..max and the ECDF chart
BUCKETS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200, 86400)
MAX_BUCKETS = 10_000
NS = 1_000_000_000
NAT = np.iinfo(np.int64).min                    # pandas' NaT as int64


# ----------------------------------------------------------------------------------- filters

@dataclass
class Filters:
    """What the report is restricted to; empty lists and None restrict nothing."""
    since: Optional[datetime] = None
    until: Optional[datetime] = None          # exclusive: adjacent windows never share a flow
    pods: List[str] = field(default_factory=list)         # "NAMESPACE/NAME"
    namespaces: List[str] = field(default_factory=list)
    host_ports: List[int] = field(default_factory=list)
    clients: List[str] = field(default_factory=list)      # CIDRs or addresses, v4 or v6

    def active(self) -> bool:
        return bool(self.since or self.until or self.pods or self.namespaces or self.host_ports
                    or self.clients)

    def as_dict(self) -> dict:
        return {"since": _iso_dt(self.since), "until": _iso_dt(self.until), "pods": list(self.pods),
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

    def pod_matches(self, ns: Optional[str], name: Optional[str]) -> bool:
        if self.namespaces and ns not in self.namespaces:
            return False
        return not self.pods or f"{ns}/{name}" in self.pods


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (naive means UTC) or how long before `now` ("90s", "15m", "2h", "1d")."""
    m = _RELATIVE.match(text or "")
    if m:
        return _utc(now) - timedelta(seconds=float(m[1]) * _UNIT_S[m[2].lower()])
    try:
        return _utc(datetime.fromisoformat(str(text).strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give an ISO 8601 time such as "
                         "2024-05-01T12:00:00Z (UTC unless it says otherwise) or how long ago, "
                         "such as 90s, 15m, 2h or 1d.") from None


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _ts_ns(value: Any) -> int:
    """A datetime or ISO text (naive means UTC) -> ns since the epoch."""
    ts = pd.Timestamp(value)
    if pd.isna(ts):
        raise ValueError(f"{value!r} is not a time")
    return int((ts.tz_localize("UTC") if ts.tzinfo is None else ts).value)


def _iso_dt(dt: Optional[datetime]) -> Optional[str]:
    return None if dt is None else iso_ns(_ts_ns(dt))


def iso_ns(ns: int) -> str:
    """Nanoseconds since the epoch -> "2024-05-01T12:00:00Z" (".250Z" when not whole seconds)."""
    ts = pd.Timestamp(int(ns), unit="ns", tz="UTC")
    ms = (int(ns) // 1_000_000) % 1000
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms:03d}" if ms else "") + "Z"


# ------------------------------------------------------------------------- plain conversions

def _py(value: Any) -> Any:
    """numpy/pandas scalar -> plain Python; NaN/NA/NaT -> None (the report never holds NaN)."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def _norm_key(rec: dict) -> tuple:
    def opt_int(v):
        v = _py(v)
        return None if v is None else int(v)
    pod_ip = _py(rec.get("pod_ip"))
    return (str(rec["proto"]).lower(), opt_int(rec.get("family")), int(rec["host_port"]),
            None if pod_ip is None else str(pod_ip), opt_int(rec.get("pod_port")))


def _share(part: Optional[int], whole: Optional[int]) -> Optional[float]:
    return round(part / whole, 4) if part is not None and whole else None


def _col(df: Optional[pd.DataFrame], name: str) -> pd.Series:
    """A column, or all-missing when the reader had none (an empty capture has no columns)."""
    if df is not None and name in df.columns:
        return df[name]
    n = 0 if df is None else len(df)
    return pd.Series([None] * n, dtype=object)


def _ns(series: pd.Series) -> np.ndarray:
    if len(series) == 0:
        return np.zeros(0, dtype=np.int64)
    return pd.to_datetime(series, utc=True).dt.as_unit("ns").array.asi8


def _bools(series: pd.Series) -> np.ndarray:
    return series.fillna(False).to_numpy(dtype=bool)


def _floats(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _group_ids(columns: Sequence[pd.Series]) -> Tuple[np.ndarray, np.ndarray]:
    """Row -> group id over several columns (missing values are a value), and each group's
    first row. Factorizing column by column is several times faster than a groupby on strings."""
    n = len(columns[0])
    code = np.zeros(n, dtype=np.int64)
    for col in columns:
        codes, uniques = pd.factorize(col, use_na_sentinel=False)
        code = pd.factorize(code * (len(uniques) + 1) + codes)[0]
    first = np.full(int(code.max()) + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, code, np.arange(n))
    return code, first


def _first_non_null(ids: np.ndarray, series: pd.Series, n_groups: int) -> List[Any]:
    """Per group, the first non-null value in row order (pod names may be missing on some rows)."""
    out: List[Any] = [None] * n_groups
    rows = np.flatnonzero(series.notna().to_numpy())
    groups, pos = np.unique(ids[rows], return_index=True)
    for g, row in zip(groups, rows[pos]):
        out[int(g)] = _py(series.iat[int(row)])
    return out


def group_quantiles(ids: np.ndarray, values: np.ndarray, n_groups: int,
                    qs: np.ndarray = QUANTILES) -> np.ndarray:
    """(n_groups, len(qs)) quantiles with numpy's "linear" method, NaN for empty groups, from
    one sort instead of one np.quantile per group."""
    order = np.argsort(values)
    # then a stable sort by group, which keeps each group's values sorted: with 16-bit ids
    # numpy radix-sorts, ~10x faster than a lexsort of (values, ids)
    small = ids[order].astype(np.int16) if n_groups < 2 ** 15 else ids[order]
    v = values[order[np.argsort(small, kind="stable")]]
    counts = np.bincount(ids, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = starts[:, None] + (np.maximum(counts, 1)[:, None] - 1) * qs[None, :]
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, starts[:, None] + np.maximum(counts, 1)[:, None] - 1)
    if not len(v):
        return np.full((n_groups, len(qs)), np.nan)
    lo, hi = np.clip(lo, 0, len(v) - 1), np.clip(hi, 0, len(v) - 1)
    out = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    out[counts == 0] = np.nan
    return out


def _latency(row: Optional[np.ndarray]) -> Optional[dict]:
    if row is None or np.isnan(row[0]):
        return None
    return {name: round(float(row[p]), 1) for name, p in PERCENTILES}


def top_items(groups: np.ndarray, items: pd.Series, weights: Optional[np.ndarray],
              top: int) -> Dict[int, list]:
    """Per group, the `top` items by weight (row count when None), ties by name: {g: [[item, n]]}."""
    df = pd.DataFrame({"g": groups, "item": items.to_numpy(),
                       "w": np.ones(len(groups), dtype=np.int64) if weights is None else weights})
    df = df[df["item"].notna()]
    if df.empty or top <= 0:
        return {}
    s = df.groupby(["g", "item"], sort=False)["w"].sum().reset_index()
    s = s.sort_values(["g", "w", "item"], ascending=[True, False, True]).groupby("g").head(top)
    out: Dict[int, list] = {}
    for g, item, w in zip(s["g"].tolist(), s["item"].tolist(), s["w"].tolist()):
        out.setdefault(int(g), []).append([str(item), int(w)])
    return out


# -------------------------------------------------------------------------------- the inputs

@dataclass
class _Flows:
    """The flow rows as arrays: `mid` (mapping id) indexes `keys`, one per (node, KEY)."""
    keys: List[dict]
    mid: np.ndarray
    t: np.ndarray
    answered: np.ndarray
    midstream: np.ndarray
    masq: np.ndarray
    lat: np.ndarray
    packets: np.ndarray
    nbytes: np.ndarray
    client: pd.Series
    drop: pd.Series

    def take(self, mask: np.ndarray) -> "_Flows":
        return _Flows(self.keys, *(getattr(self, a)[mask] for a in (
            "mid", "t", "answered", "midstream", "masq", "lat", "packets", "nbytes")),
            self.client[mask].reset_index(drop=True), self.drop[mask].reset_index(drop=True))


def _flows(df: Optional[pd.DataFrame], kern: Dict[tuple, dict]) -> _Flows:
    node = _col(df, "node").fillna("").astype(object)
    cols = [node] + [_col(df, c) for c in KEY]
    mid, first = _group_ids(cols)
    keys = []
    for i, row in enumerate(first):
        key = _norm_key({c: cols[j + 1].iat[int(row)] for j, c in enumerate(KEY)})
        keys.append({"node": str(node.iat[int(row)]), "key": key})
    for name in NAMES:
        for k, value in zip(keys, _first_non_null(mid, _col(df, name), len(keys))):
            # names the rows lack come from the summary (resolved at exit): same mapping either way
            k[name] = value if value is not None else kern.get((k["node"],) + k["key"], {}).get(name)
    return _Flows(keys, mid, _ns(_col(df, "ts")), _bools(_col(df, "answered")),
                  _bools(_col(df, "midstream")), _bools(_col(df, "masqueraded")),
                  _floats(_col(df, "latency_us")), _floats(_col(df, "packets")),
                  _floats(_col(df, "bytes")), _col(df, "client_ip").reset_index(drop=True),
                  _col(df, "drop_reason").reset_index(drop=True))


def _misses(df: Optional[pd.DataFrame]) -> pd.DataFrame:
    out = pd.DataFrame({c: _col(df, c).to_numpy() for c in ("proto", "family", "client_ip")})
    out["node"] = _col(df, "node").fillna("").astype(object).to_numpy()
    out["host_port"] = pd.to_numeric(_col(df, "host_port")).to_numpy()
    out["count"] = _floats(_col(df, "count"))
    out["count"] = np.nan_to_num(out["count"].to_numpy(), nan=1.0).astype(np.int64)
    out["t"] = _ns(_col(df, "ts"))
    return out


def _kernel_counts(summaries: Sequence[dict]) -> Dict[tuple, dict]:
    """The summaries' per-mapping counters, keyed (node,) + KEY, summed over a node's files."""
    out: Dict[tuple, dict] = {}
    for s in summaries:
        for m in s.get("mappings") or []:
            e = out.setdefault(((s.get("node") or ""),) + _norm_key(m),
                               {"flows": 0, "packets": 0, "bytes": 0, "misses": 0, "drops": {}})
            for c in ("flows", "packets", "bytes", "misses"):
                e[c] += int(m.get(c) or 0)
            for reason, n in (m.get("drops") or {}).items():
                e["drops"][reason] = e["drops"].get(reason, 0) + int(n)
            for c in NAMES:
                e[c] = e.get(c) or m.get(c)
    return out


def _source_measures(header: dict, summary: dict) -> Tuple[str, Dict[str, bool]]:
    """(backend, measures) of one file. Schema 1 headers (no "measures") are synthesized:
    the summary's backend is the better witness there, and conntrack measures none."""
    declared = header.get("measures")
    first, second = (header, summary) if declared is not None else (summary, header)
    backend = first.get("backend") or second.get("backend") or "netfilter"
    default = backend != "conntrack"
    return backend, {k: bool((declared or {}).get(k, default)) for k in MEASURES}


def _nodes(cap: "Capture", pairs: List[Tuple[str, str]], filtered: bool) -> Dict[str, dict]:
    """Per node: files, backend(s), measures, lost events and where its counts come from."""
    headers = {h.get("source"): h for h in cap.headers}
    summaries: Dict[Any, List[dict]] = {}
    for s in cap.summaries:
        summaries.setdefault(s.get("source"), []).append(s)
    pairs = ([((h.get("node") or ""), h.get("source")) for h in cap.headers]
             + [((s.get("node") or ""), s.get("source")) for s in cap.summaries] + pairs)
    nodes: Dict[str, dict] = {}
    for node, source in dict.fromkeys(pairs):
        n = nodes.setdefault(node, {"files": [], "backends": [], "lost_events": None,
                                    "measures": dict.fromkeys(MEASURES, True), "summarized": True})
        n["files"].append(source)
        backend, meas = _source_measures(headers.get(source) or {}, (summaries.get(source) or [{}])[0])
        n["backends"].append(backend)
        n["measures"] = {k: n["measures"][k] and meas[k] for k in MEASURES}
        n["summarized"] &= source in summaries
        for s in summaries.get(source) or []:
            n["lost_events"] = (n["lost_events"] or 0) + int(s.get("lost_events") or 0)
    for n in nodes.values():
        n["backend"] = "+".join(sorted(set(n.pop("backends"))))
        n["source_of_counts"] = "kernel" if n["summarized"] and not filtered else "records"
    return dict(sorted(nodes.items()))


def _pairs(frames: Sequence[Optional[pd.DataFrame]]) -> List[Tuple[str, str]]:
    """The distinct (node, source) of the rows, in order of appearance."""
    out: List[Tuple[str, str]] = []
    for df in frames:
        if df is None or not len(df):
            continue
        node, source = _col(df, "node").fillna("").astype(object), _col(df, "source")
        _, first = _group_ids([node, source])
        out += [(str(node.iat[int(i)]), _py(source.iat[int(i)])) for i in sorted(first)]
    return out


# ------------------------------------------------------------------------ filters and time

def _filter(flows: _Flows, misses: pd.DataFrame, kern: Dict[tuple, dict], f: Filters,
            nets: list) -> Tuple[_Flows, pd.DataFrame]:
    """Rows the filters keep. Pod and port filters select whole mappings (by the mapping's
    names, so rows missing a name are kept with their mapping); time and client select rows."""
    ports = {int(p) for p in f.host_ports}
    keep_mid = np.array([(not ports or k["key"][2] in ports)
                         and f.pod_matches(k["pod_namespace"], k["pod_name"]) for k in flows.keys],
                        dtype=bool)
    mask = keep_mid[flows.mid] & _time_mask(flows.t, f) & _client_mask(flows.client, nets)
    mmask = _time_mask(misses["t"].to_numpy(), f) & _client_mask(misses["client_ip"], nets)
    if ports:
        mmask &= misses["host_port"].isin(ports).to_numpy()
    if f.pods or f.namespaces:
        # a miss belongs to the hostPort of a kept mapping, or to the hostNetwork pod owning it
        kept = {(k["node"], k["key"][0], k["key"][2]) for k, ok in zip(flows.keys, keep_mid) if ok}
        kept |= {(k[0], k[1], k[3]) for k, e in kern.items()
                 if f.pod_matches(e.get("pod_namespace"), e.get("pod_name"))}
        port_of = pd.MultiIndex.from_arrays([misses["node"], misses["proto"].astype(str).str.lower(),
                                             misses["host_port"]])
        mmask &= port_of.isin(list(kept)) if kept else np.zeros(len(misses), dtype=bool)
    return flows.take(mask), misses[mmask].reset_index(drop=True)


def _time_mask(t: np.ndarray, f: Filters) -> np.ndarray:
    mask = np.ones(len(t), dtype=bool)
    if f.since is not None:
        mask &= t >= _ts_ns(f.since)
    if f.until is not None:
        mask &= (t < _ts_ns(f.until)) & (t != NAT)
    return mask


def _client_mask(clients: pd.Series, nets: list) -> np.ndarray:
    if not nets:
        return np.ones(len(clients), dtype=bool)
    codes, uniques = pd.factorize(clients)          # each distinct address is parsed once

    def inside(ip) -> bool:
        try:
            addr = ipaddress.ip_address(str(ip))
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in nets)
    member = np.array([inside(ip) for ip in uniques] + [False], dtype=bool)
    return member[codes]                             # code -1 (no address) -> the last, False


def _span(cap: "Capture", times: Sequence[np.ndarray], f: Filters) -> Tuple[Optional[int], Optional[int]]:
    """The window the report covers (ns): the files' start to their end, data included,
    clipped to --since/--until."""
    started = {}
    for h in cap.headers:
        try:
            started[h.get("source")] = _ts_ns(h["started"])
        except (KeyError, ValueError, TypeError):
            pass                          # no start known: the data bound the span
    lows, highs = list(started.values()), []
    for s in cap.summaries:
        if s.get("source") in started and s.get("duration_s") is not None:
            highs.append(started[s["source"]] + int(float(s["duration_s"]) * NS))
    for t in times:
        t = t[t != NAT]
        if len(t):
            lows.append(int(t.min()))
            highs.append(int(t.max()))
    if not lows and not highs:
        return None, None
    start, end = min(lows + highs), max(lows + highs)
    if f.since is not None:
        start = max(start, _ts_ns(f.since))
    if f.until is not None:
        end = min(end, _ts_ns(f.until))
    return start, max(start, end)


@dataclass
class _Grid:
    """Time buckets of `step` ns from t0 (a multiple of step, so charts get round times)."""
    t0: int
    step: int
    n: int

    def index(self, t: np.ndarray) -> np.ndarray:
        return np.clip((t - self.t0) // self.step, 0, self.n - 1)

    def times(self) -> List[str]:
        return [iso_ns(self.t0 + i * self.step) for i in range(self.n)]


def default_bucket_s(duration_s: float) -> int:
    """About 60 buckets over the span, on a round step (1 s, 5 s ... 1 d)."""
    want = max(duration_s, 0.0) / 60.0
    return next((b for b in BUCKETS_S if b >= want), int(math.ceil(want / 86400.0)) * 86400)


def _grid(start: Optional[int], end: Optional[int], bucket_s: Optional[float]) -> _Grid:
    start = 0 if start is None else start
    end = start if end is None else end
    step = int(round(float(bucket_s or default_bucket_s((end - start) / NS)) * NS))
    if step <= 0:
        raise ValueError("The time bucket must be longer than 0 s.")
    t0 = start // step * step
    n = max(1, -(-(end - t0) // step))
    if n > MAX_BUCKETS:
        raise ValueError(f"A {step / NS:g} s bucket makes {n} time buckets over this capture "
                         f"(at most {MAX_BUCKETS}): give a longer bucket.")
    return _Grid(t0, step, n)


# ----------------------------------------------------------------------------- aggregation

def _flow_stats(rows: _Flows, grid: _Grid, top: int) -> dict:
    """Per mapping id: row counts, sums, latency percentiles, drops, top clients, rates."""
    n = len(rows.keys)
    mid = rows.mid
    stats = {"flows": np.bincount(mid, minlength=n),
             "answered": np.bincount(mid, weights=rows.answered, minlength=n),
             "masq": np.bincount(mid, weights=rows.masq, minlength=n)}
    for name, values in (("packets", rows.packets), ("bytes", rows.nbytes)):
        known = ~np.isnan(values)
        stats[name] = np.bincount(mid[known], weights=values[known], minlength=n)
        stats[name + "_known"] = np.bincount(mid[known], minlength=n)
    # latency: answered flows that began while tracing (a midstream flow's first packet is unknown)
    lat = rows.answered & ~rows.midstream & ~np.isnan(rows.lat)
    stats["lat_rows"] = (mid[lat], rows.lat[lat])
    stats["quantiles"] = group_quantiles(mid[lat], rows.lat[lat], n)
    stats["midstream"] = int(rows.midstream.sum())
    stats["drops"] = top_items(mid, rows.drop, None, 1 << 30)
    stats["top"] = top_items(mid, rows.client, None, top)
    bucket = grid.index(rows.t)
    stats["rate"] = np.bincount(mid * grid.n + bucket, minlength=n * grid.n).reshape(n, grid.n)
    has_drop = rows.drop.notna().to_numpy()
    stats["drop_series"] = _series(rows.drop[has_drop], bucket[has_drop], None, grid)
    stats["clients"] = int(rows.client.nunique())
    return stats


def _series(labels: pd.Series, bucket: np.ndarray, weights: Optional[np.ndarray], grid: _Grid) -> dict:
    """{label: [count per bucket]} for the misses/drops chart."""
    codes, uniques = pd.factorize(labels)
    flat = np.bincount(codes * grid.n + bucket, weights=weights, minlength=len(uniques) * grid.n)
    per = flat.reshape(len(uniques), grid.n).astype(np.int64)
    return {str(u): per[i].tolist() for i, u in sorted(enumerate(uniques), key=lambda x: str(x[1]))}


def _miss_stats(misses: pd.DataFrame, grid: _Grid, top: int) -> dict:
    """Per (node, proto, host_port): misses, families, top clients; and misses over time."""
    proto = misses["proto"].astype(str).str.lower()
    ids, first = _group_ids([misses["node"], proto, misses["host_port"]])
    ports = [(str(misses["node"].iat[i]), str(proto.iat[i]), int(misses["host_port"].iat[i]))
             for i in first]
    counts = np.bincount(ids, weights=misses["count"].to_numpy(), minlength=len(ports))
    fams = misses.assign(g=ids).dropna(subset=["family"]).groupby("g")["family"].unique()
    top_by = top_items(ids, misses["client_ip"], misses["count"].to_numpy(), top)
    label = proto + "/" + misses["host_port"].astype("Int64").astype(str)
    series = _series(label, grid.index(misses["t"].to_numpy()), misses["count"].to_numpy(), grid)
    return {"ports": {p: {"misses": int(counts[i]), "top": top_by.get(i, []),
                          "families": sorted(int(x) for x in fams.get(i, []))}
                      for i, p in enumerate(ports)},
            "series": series}


# ------------------------------------------------------------------------------- mappings

@dataclass
class _Ctx:
    keys: List[dict]
    kern: Dict[tuple, dict]
    nodes: Dict[str, dict]
    fs: dict
    ms: dict
    grid: _Grid
    duration: float

    def owner(self, node: str, proto: str, host_port: int) -> dict:
        """The names the summary gave a misses-only row (the hostNetwork pod owning the port)."""
        return next((e for k, e in self.kern.items()
                     if k[0] == node and k[1] == proto and k[3] == host_port and k[4] is None), {})


def _mappings(c: _Ctx) -> List[dict]:
    """One dict per (node, mapping): the kernel's rows and the flow rows' mappings, plus, when
    counting from records, a misses-only row per hostPort missed with no mapping."""
    by_node: Dict[str, Dict[tuple, int]] = {}
    for mid, k in enumerate(c.keys):
        if c.fs["flows"][mid] > 0:
            by_node.setdefault(k["node"], {})[k["key"]] = mid
    out = []
    for node, info in c.nodes.items():
        flow_keys = by_node.get(node, {})
        kernel = info["source_of_counts"] == "kernel"
        kern = {k[1:]: e for k, e in c.kern.items() if k[0] == node} if kernel else {}
        keys = list(flow_keys) + [k for k in kern if k not in flow_keys]
        if not kernel:
            mapped = {(k[0], k[2]) for k in keys}
            keys += [(p[1], m["families"][0] if len(m["families"]) == 1 else None, p[2], None, None)
                     for p, m in c.ms["ports"].items() if p[0] == node and (p[1], p[2]) not in mapped]
        out += [_mapping(c, node, key, flow_keys.get(key), kern.get(key)) for key in keys]
    return sorted(out, key=_sort_key)


def _mapping(c: _Ctx, node: str, key: tuple, mid: Optional[int], kern: Optional[dict]) -> dict:
    proto, family, host_port, pod_ip, pod_port = key
    meas, fs = c.nodes[node]["measures"], c.fs
    port = c.ms["ports"].get((node, proto, host_port), {})
    names = c.keys[mid] if mid is not None else (kern or c.owner(node, proto, host_port))
    rows = int(fs["flows"][mid]) if mid is not None else 0
    counts = kern if kern is not None else {
        "flows": rows, "packets": _known_sum(fs, "packets", mid), "bytes": _known_sum(fs, "bytes", mid),
        "misses": port.get("misses", 0), "drops": dict(fs["drops"].get(mid, []))}
    answered = int(fs["answered"][mid]) if mid is not None else 0
    quantiles = fs["quantiles"][mid] if mid is not None and meas["latency"] else None
    rate = fs["rate"][mid] if mid is not None else np.zeros(c.grid.n)
    step_s = c.grid.step / NS
    return {
        "node": node, **dict(zip(KEY, key)), **{n: names.get(n) for n in NAMES},
        "flows": int(counts["flows"]), "answered": answered,
        "answered_share": _share(answered, int(counts["flows"])),
        "misses": int(counts["misses"]) if meas["misses"] else None,
        "drops": dict(sorted(counts["drops"].items())) if meas["drops"] else None,
        "latency_us": _latency(quantiles) or dict.fromkeys(p for p, _ in PERCENTILES),
        "packets": _opt_int(counts["packets"]) if meas["packets"] else None,
        "bytes": _opt_int(counts["bytes"]) if meas["packets"] else None,
        "masqueraded_share": _share(int(fs["masq"][mid]), rows) if mid is not None else None,
        # a misses-only row's clients are the ones that missed: who to ask in an incident
        "top_clients": fs["top"].get(mid, []) if mid is not None else
        (port.get("top", []) if pod_ip is None else []),
        "rate_series": [[t, round(float(v) / step_s, 4)] for t, v in zip(c.grid.times(), rate)],
        "source_of_counts": "kernel" if kern is not None else "records",
        "flows_per_s": round(int(counts["flows"]) / c.duration, 3) if c.duration > 0 else None,
        "latency_quantiles_us": None if _latency(quantiles) is None
        else [round(float(x), 1) for x in quantiles],
    }


def _known_sum(fs: dict, name: str, mid: Optional[int]) -> Optional[int]:
    """Sum of a per-flow counter; None when flows exist and none of them carried it."""
    if mid is None:
        return 0
    if fs[name + "_known"][mid] == 0 and fs["flows"][mid] > 0:
        return None
    return int(fs[name][mid])


def _opt_int(v: Any) -> Optional[int]:
    return None if v is None else int(v)


def _ip_sort(ip: Optional[str]) -> tuple:
    try:
        addr = ipaddress.ip_address(ip) if ip is not None else None
    except ValueError:
        return (2, 0, 0, ip)
    return (0, 0, 0, "") if addr is None else (1, addr.version, int(addr), "")


def _sort_key(m: dict) -> tuple:
    return (m["node"], m["proto"], m["host_port"], _ip_sort(m["pod_ip"]),
            m["family"] or 0, m["pod_port"] if m["pod_port"] is not None else -1)


# ---------------------------------------------------------------------------------- totals

def _sum_known(values: Sequence[Optional[int]]) -> Optional[int]:
    """Unknown when any part is unknown: a partial sum would read as the whole."""
    return None if any(v is None for v in values) else int(sum(values))


def _totals(mappings: List[dict], latency: Optional[dict], duration: float) -> dict:
    flows = sum(m["flows"] for m in mappings)
    answered = sum(m["answered"] for m in mappings)
    # a hostPort's misses are on each of its mappings (v4 and v6): count them once
    per_port = {(m["node"], m["proto"], m["host_port"]): m["misses"] for m in mappings}
    drops: Optional[Dict[str, int]] = {}
    for m in mappings:
        if m["drops"] is None:
            drops = None
            break
        for reason, n in m["drops"].items():
            drops[reason] = drops.get(reason, 0) + n
    return {"mappings": len(mappings), "flows": flows, "answered": answered,
            "answered_share": _share(answered, flows),
            "misses": _sum_known(list(per_port.values())),
            "drops": None if drops is None else dict(sorted(drops.items())),
            "drops_total": None if drops is None else sum(drops.values()),
            "packets": _sum_known([m["packets"] for m in mappings]),
            "bytes": _sum_known([m["bytes"] for m in mappings]),
            "latency_us": latency or dict.fromkeys(p for p, _ in PERCENTILES),
            "flows_per_s": round(flows / duration, 3) if duration > 0 else None}


def _overall(c: _Ctx, mappings: List[dict]) -> Tuple[dict, List[dict]]:
    """The report's totals and, per node, the same figures plus what the node's files say."""
    mids, values = c.fs["lat_rows"]
    names = list(c.nodes)
    node_of = np.array([names.index(k["node"]) for k in c.keys] or [0], dtype=np.int64)
    per_q = group_quantiles(node_of[mids], values, len(names))
    any_latency = any(n["measures"]["latency"] for n in c.nodes.values())
    total_q = group_quantiles(np.zeros(len(values), dtype=np.int64), values, 1)[0]
    totals = _totals(mappings, _latency(total_q) if any_latency else None, c.duration)
    kinds = {n["source_of_counts"] for n in c.nodes.values()}
    totals["source_of_counts"] = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "records")
    totals.update(clients=c.fs["clients"], midstream=c.fs["midstream"])
    per_node = []
    for i, (node, info) in enumerate(c.nodes.items()):
        lat = _latency(per_q[i]) if info["measures"]["latency"] else None
        per_node.append({"node": node, "backend": info["backend"], "files": info["files"],
                         "measures": info["measures"], "source_of_counts": info["source_of_counts"],
                         "lost_events": info["lost_events"],
                         **_totals([m for m in mappings if m["node"] == node], lat, c.duration)})
    return totals, per_node


def plural(n: Optional[int], word: str, many: Optional[str] = None) -> str:
    """1 flow, 2 flows, 1 miss, 2 misses; None -> "unknown flows"."""
    many = many or word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    return f"unknown {many}" if n is None else f"{n:,} {word if n == 1 else many}"


# ----------------------------------------------------------------------------------- notes

def _notes(cap: "Capture", c: _Ctx, f: Filters, mappings: List[dict], lost: Optional[int]) -> List[str]:
    notes = list(cap.notes)
    multi = len(c.nodes) > 1
    if f.active():
        notes.append("A filter is active, so every count comes from the flow records, not from "
                     "the kernel's counters (those cover the whole capture): lost flows are "
                     "missing and drops count flows with a drop reason.")
    missing: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    for node, n in c.nodes.items():
        where = (f"node {node} ({', '.join(map(str, n['files']))})" if multi
                 else ", ".join(map(str, n["files"])) or "the capture")
        if not n["summarized"] and not f.active():
            notes.append(f"No summary record in {where} (the tracer did not end cleanly): its "
                         "counts come from the flow records and may be low.")
        lacks = tuple(k for k in MEASURES if not n["measures"][k])
        if lacks:
            missing.setdefault((n["backend"], lacks), []).append(node)
    for (backend, lacks), nodes in missing.items():
        on = f" (node {', '.join(nodes)})" if multi else ""
        notes.append(f"The {backend} backend{on} does not measure {_join(lacks)}: they show as "
                     "unknown (n/a), not 0.")
    if lost:
        notes.append(f"{plural(lost, 'event')} lost: the kernel counted flows the tracer never "
                     "reported; kernel counts include them, answered, latency and clients do not.")
    if c.fs["midstream"]:
        notes.append(f"Flows that began before tracing started (midstream) have no latency: "
                     f"{plural(c.fs['midstream'], 'flow')}.")
    for m in mappings:
        if m["pod_ip"] is None and m["misses"]:
            owner = (f"the hostNetwork pod {m['pod_namespace']}/{m['pod_name']} owns it"
                     if m["pod_name"] else "no DNAT rule, or a hostNetwork pod?")
            on = f" on node {m['node']}" if multi else ""
            notes.append(f"hostPort {m['host_port']}/{m['proto']}{on}: {plural(m['misses'], 'connection')} "
                         f"reached the node without DNAT ({owner}).")
    hint = _check_hint(c, mappings)
    if hint:
        notes.append(hint)
    return notes


def _check_hint(c: _Ctx, mappings: List[dict]) -> Optional[str]:
    """Where the capture shows trouble (misses, drops, unanswered flows), the command that says
    why and how to fix it, to run on the node while the trouble lasts."""
    trouble = [m for m in mappings if m.get("misses") or m.get("drops")
               or (m.get("flows") and m.get("answered") is not None and m["answered"] < m["flows"])]
    if not trouble:
        return None
    nodes = sorted({m.get("node") or "" for m in trouble} - {""}) or sorted(c.nodes)
    on = f" on {_join(nodes)}" if nodes and nodes != [""] else " on the node"
    return (f"Misses, drops or unanswered flows: for the diagnosis and the exact fix, run{on}: "
            "sudo bpftrace-hostport check")


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# ------------------------------------------------------------------------------ the report

def build_report(cap: "Capture", filters: Optional[Filters] = None, top: int = 5,
                 bucket_s: Optional[float] = None) -> dict:
    """The incident report of a capture: plain JSON types only, never NaN (see module doc)."""
    f = filters or Filters()
    nets = f.networks()
    kern = _kernel_counts(cap.summaries)
    flows, misses = _flows(cap.flows, kern), _misses(cap.misses)
    nodes = _nodes(cap, _pairs([cap.flows, cap.misses]), f.active())
    flows, misses = _filter(flows, misses, kern, f, nets)
    start, end = _span(cap, [flows.t, misses["t"].to_numpy()], f)
    grid = _grid(start, end, bucket_s)
    duration = (end - start) / NS if start is not None else 0.0
    ms = _miss_stats(misses, grid, top)
    c = _Ctx(flows.keys, kern, nodes, _flow_stats(flows, grid, top), ms, grid, duration)
    mappings = _mappings(c)
    totals, per_node = _overall(c, mappings)
    lost = _sum_known([n["lost_events"] for n in nodes.values()]) if cap.summaries else None
    report = {
        "kind": "report",
        "files": list(dict.fromkeys(s for n in nodes.values() for s in n["files"] if s is not None)),
        "nodes": list(nodes),
        "span": {"start": None if start is None else iso_ns(start),
                 "end": None if end is None else iso_ns(end), "duration_s": round(duration, 3)},
        "truncated": bool(cap.truncated),
        "notes": _notes(cap, c, f, mappings, lost),
        "filters": f.as_dict(),
        "lost_events": lost,
        "measures": {k: all(n["measures"][k] for n in nodes.values()) for k in MEASURES},
        "totals": totals,
        "mappings": mappings,
        "timeline": {"bucket_s": grid.step / NS, "times": grid.times(), "misses": ms["series"],
                     "drops": c.fs["drop_series"]},
    }
    if len(nodes) > 1:
        report["per_node"] = per_node
    else:
        for m in mappings:
            del m["node"]          # one node: it is in report["nodes"], not on every row
    return report


# ------------------------------------------------------------------------------ comparison

#: Compared figures: name -> how to read it from a mapping (or totals) dict.
COMPARED = {
    "flows": lambda m: m["flows"],
    "flows_per_s": lambda m: m["flows_per_s"],
    "answered_share": lambda m: m["answered_share"],
    "p50_us": lambda m: m["latency_us"]["p50"],
    "p99_us": lambda m: m["latency_us"]["p99"],
    "misses": lambda m: m["misses"],
    "drops": lambda m: None if m["drops"] is None else sum(m["drops"].values()),
}


def _change(before: Optional[dict], after: Optional[dict]) -> dict:
    out = {}
    for name, get in COMPARED.items():
        b = get(before) if before is not None else None
        a = get(after) if after is not None else None
        delta = None if a is None or b is None else round(a - b, 4)
        out[name] = {"before": b, "after": a, "delta": delta}
    return out


def compare_reports(before: dict, after: dict) -> dict:
    """Per mapping (matched on node, when either report has several, and the mapping key):
    before, after and after - before of flows, rate, answered share, p50/p99, misses, drops.
    A mapping on one side only has None on the other ("new" / "gone")."""
    multi = len(before["nodes"]) > 1 or len(after["nodes"]) > 1

    def keyed(report: dict) -> Dict[tuple, dict]:
        node = (report["nodes"] or [""])[0]        # a one-node report's rows carry no node
        return {((m.get("node", node) if multi else ""),) + tuple(m[k] for k in KEY): m
                for m in report["mappings"]}
    b, a = keyed(before), keyed(after)
    rows = []
    for k in list(a) + [k for k in b if k not in a]:
        base = a.get(k) or b[k]
        row = {"node": k[0]} if multi else {}
        row.update({f: base[f] for f in KEY + NAMES})
        row["status"] = "both" if k in a and k in b else ("new" if k in a else "gone")
        row.update(_change(b.get(k), a.get(k)))
        rows.append(row)
    side = ("files", "nodes", "span", "truncated", "filters", "lost_events", "measures")
    notes = []
    if before["span"]["duration_s"] != after["span"]["duration_s"]:
        notes.append(f"The captures cover {before['span']['duration_s']:g} s and "
                     f"{after['span']['duration_s']:g} s: compare rates (flows/s), not counts.")
    if before["truncated"] or after["truncated"]:
        notes.append("A truncated capture is compared: its figures cover only what was read.")
    return {"kind": "comparison", "before": {s: before[s] for s in side},
            "after": {s: after[s] for s in side}, "totals": _change(before["totals"], after["totals"]),
            "mappings": rows, "notes": notes}
