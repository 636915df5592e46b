"""The incident report: captures -> one JSON-serialisable dict (`build_report`), two reports ->
their comparison (`compare_reports`). Rendering is report_render.py, charts plots.py.

Every figure comes from the one roll-up (analysis/rollup.py) the captures are folded into,
batch by batch (analysis/review.py), so `report`, `summary`, `export` and the live trace give
the same numbers for one capture, and memory does not grow with the number of flows. How the
kernel's counts (a run's summary record) and the flow records combine is the roll-up's rule.
What a backend does not measure, or a part of a run cannot say, is None ("n/a"), never 0.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional, Sequence

import numpy as np

from bpftrace_hostport.analysis import dist
from bpftrace_hostport.analysis.diagnosis import diagnose
from bpftrace_hostport.analysis.review import Filters, Review, coverage_notes
from bpftrace_hostport.records.batch import ns_to_iso

__all__ = ["Filters", "build_report", "compare_reports", "parse_time", "iso_ns", "plural"]

KEY = ("proto", "family", "host_port", "pod_ip", "pod_port")
NAMES = ("pod_namespace", "pod_name", "port_name")
MEASURES = ("latency", "packets", "misses", "drops")
QUANTILES = np.linspace(0.0, 1.0, 101)          # every percentile: the ECDF chart
BUCKETS_S = dist.LADDER_S
NS = 1_000_000_000


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


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def iso_ns(ns: int) -> str:
    """Nanoseconds since the epoch -> "2024-05-01T12:00:00Z" (".250Z" when not whole seconds)."""
    text = ns_to_iso(int(ns))            # ...:SS.ffffffZ
    ms = (int(ns) // 1_000_000) % 1000
    return text[:19] + (f".{ms:03d}" if ms else "") + "Z"


def default_bucket_s(duration_s: float) -> int:
    """About 60 buckets over the span, on a round step of the ladder (1 s, 5 s ... 1 d)."""
    want = max(duration_s, 0.0) / 60.0
    return next((b for b in BUCKETS_S if b >= want), int(math.ceil(want / 86400.0)) * 86400)


def plural(n: Optional[int], word: str, many: Optional[str] = None) -> str:
    """1 flow, 2 flows, 1 miss, 2 misses; None -> "unknown flows"."""
    many = many or word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
    return f"unknown {many}" if n is None else f"{n:,} {word if n == 1 else many}"


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _shown_step(grid, bucket_s: Optional[float], duration_s: float) -> int:
    """The chart's bucket (ns): the one asked for, else about 60 over the span; always a whole
    multiple of the roll-up's grid, so that every count lands in exactly one bucket."""
    fine = grid[1] or NS
    want = int(round(float(bucket_s) * NS)) if bucket_s else default_bucket_s(duration_s) * NS
    if want <= 0:
        raise ValueError("The time bucket must be longer than 0 s.")
    if want % fine:
        if bucket_s:
            raise ValueError(f"A {bucket_s:g} s bucket does not divide into this capture's "
                             f"{fine / NS:g} s steps: give a multiple of {fine / NS:g} s.")
        want = -(-want // fine) * fine
    return max(want, fine)


def build_report(review: Review, top: int = 5, bucket_s: Optional[float] = None) -> dict:
    """The incident report of what `review` read: plain JSON types only, never NaN."""
    f = review.filters
    r = review.rollup
    fig = r.figures(rows_filtered=f.rows(), keep=f.keeps if f.active() else None,
                    window=f.window(), top=top)
    nodes = fig.nodes
    lo = min((n["start_ns"] for n in nodes.values() if n["start_ns"] is not None), default=None)
    hi = max((n["end_ns"] for n in nodes.values() if n["end_ns"] is not None), default=None)
    wlo, whi = f.window()
    if lo is not None and wlo is not None:
        lo = max(lo, wlo)
    if hi is not None and whi is not None:
        hi = min(hi, whi)
    duration = max(0.0, (hi - lo) / NS) if lo is not None and hi is not None else 0.0
    step = _shown_step(fig.grid, bucket_s, duration)
    t0, n_buckets, times = _buckets(fig.grid, step, lo, hi)
    step_s = step / NS
    mappings = []
    miss_series: Dict[str, List[int]] = {}
    drop_series: Dict[str, List[int]] = {}
    for m in fig.mappings:
        series = m.pop("series")
        lat = m.pop("lat")
        counts = _on(series, fig.grid, step, t0, n_buckets, 3)
        m["rate_series"] = [[t, round(float(v) / step_s, 4)] for t, v in zip(times, counts.sum(axis=0))]
        m["outcome_series"] = {"answered": counts[0].tolist(), "refused": counts[1].tolist(),
                               "unanswered": counts[2].tolist()}
        m["latency_quantiles_us"] = ([round(float(x), 1) for x in lat.quantiles(QUANTILES)]
                                     if len(lat) and nodes[m["node"]]["measures"]["latency"] else None)
        ms = m.pop("miss_series", None)
        if ms is not None:
            label = f"{m['proto']}/{m['host_port']}"
            row = _on(ms, fig.grid, step, t0, n_buckets, 1)[0]
            prev = miss_series.get(label)
            miss_series[label] = (row if prev is None else np.array(prev) + row).tolist()
        mappings.append(m)
    lost = _lost(nodes)
    per_node = []
    for name, n in nodes.items():
        t = n["totals"]
        per_node.append({"node": name, "backend": n["backend"], "files": n["files"],
                         "measures": n["measures"], "source_of_counts": n["source_of_counts"],
                         "lost_events": n["lost_events"], "duration_s": round(n["duration_s"], 3),
                         **{k: v for k, v in t.items() if k != "duration_s"}})
    totals = dict(fig.totals)
    totals.update(clients=fig.clients, clients_capped=fig.clients_capped,
                  midstream=sum(m["midstream"] for m in mappings))
    report = {
        "kind": "report",
        "files": list(review.files),
        "nodes": [name or None for name in nodes],
        "span": {"start": None if lo is None else iso_ns(lo), "end": None if hi is None else iso_ns(hi),
                 "duration_s": round(duration, 3)},
        "truncated": bool(review.truncated),
        "notes": [],
        "findings": [],
        "filters": f.as_dict(),
        "lost_events": lost,
        "measures": {k: all(n["measures"][k] for n in nodes.values()) for k in MEASURES} if nodes
        else dict.fromkeys(MEASURES, True),
        "latency_method": ("exact" if all(m["latency_exact"] for m in mappings) else
                           f"log histogram, 64 buckets per octave: percentiles within "
                           f"{dist.REL_ERROR * 100:.2f} %"),
        "totals": totals,
        "mappings": mappings,
        "timeline": {"bucket_s": step_s, "times": times, "misses": miss_series,
                     "drops": drop_series},
    }
    report["findings"] = _findings(review, mappings, nodes, lost)
    report["notes"] = _notes(review, report, mappings)
    if len(nodes) > 1:
        report["per_node"] = per_node
    else:
        for m in mappings:
            del m["node"]          # one node: it is in report["nodes"], not on every row
    return report


def _lost(nodes: Dict[str, dict]) -> Optional[int]:
    values = [n["lost_events"] for n in nodes.values()]
    if not values or any(v is None for v in values):
        return None
    return int(sum(values))


def _buckets(grid, step: int, lo: Optional[int], hi: Optional[int]):
    if lo is None or hi is None:
        return 0, 1, [iso_ns(0 if lo is None else lo)]
    t0 = lo // step * step
    n = max(1, int((hi - t0) // step) + 1)
    if n > 10_000:
        raise ValueError(f"A {step / NS:g} s bucket makes {n} time buckets over this capture "
                         "(at most 10000): give a longer bucket.")
    return t0, n, [iso_ns(t0 + i * step) for i in range(n)]


def _on(series: Optional[np.ndarray], grid, step: int, t0: int, n: int, rows: int) -> np.ndarray:
    """A series on the roll-up's grid, shown on the report's buckets (t0, step, n)."""
    if series is None or not series.size:
        return np.zeros((rows, n), np.int64)
    return dist.rebin(series, grid, (t0, step, n)).astype(np.int64)


def _findings(review: Review, mappings: List[dict], nodes: Dict[str, dict], lost: Optional[int]) -> List[dict]:
    """What the live trace would have said, from what the recording carries: per node, its
    mappings with the pods and rules snapshots of the time."""
    out = []
    for name in nodes:
        mine = [m for m in mappings if m.get("node", name) == name]
        at = nodes[name]["end_ns"]
        pods = review.latest(name, "pods", at)
        rules = review.latest(name, "rules", at)
        for fd in diagnose(mine, pods, rules, nodes[name]["lost_events"] or 0):
            out.append({"node": name or None, "severity": fd.severity, "text": fd.text,
                        "check": fd.code, "mapping": fd.mapping})
    return out


def _notes(review: Review, report: dict, mappings: List[dict]) -> List[str]:
    notes = list(review.notes) + coverage_notes(review)
    f = review.filters
    if f.active() and not f.rows():
        notes.append("A pod or hostPort filter is active: whole mappings are shown, with their "
                     "kernel counts.")
    missing: Dict[tuple, List[str]] = {}
    for origin, s in review.rollup.sessions.items():
        lacks = tuple(k for k in MEASURES if not s.measures.get(k, True))
        if lacks:
            missing.setdefault((s.backend, lacks), []).append(s.node)
    multi = len(report["nodes"]) > 1
    for (backend, lacks), who in missing.items():
        on = f" (node {', '.join(sorted(set(who)))})" if multi else ""
        notes.append(f"The {backend} backend{on} does not measure {_join(list(lacks))}: they show as "
                     "unknown (n/a), not 0.")
    t = report["totals"]
    if t.get("midstream"):
        notes.append(f"Flows that began before tracing started (midstream) have no latency: "
                     f"{plural(t['midstream'], 'flow')}.")
    if t.get("pending"):
        notes.append(f"{plural(t['pending'], 'flow was', 'flows were')} still waiting for an answer when "
                     "tracing ended (younger than --timeout): neither answered nor unanswered.")
    if any(m.get("clients_error") for m in mappings):
        notes.append("Top clients are counted in a bounded summary (Misra-Gries): a count shown is at "
                     "most its mapping's clients_error below the truth.")
    if t.get("clients_capped"):
        notes.append(f"More than {t['clients']:,} distinct clients: the count of clients stops there.")
    if report["latency_method"] != "exact":
        notes.append(f"Latency percentiles: {report['latency_method']}.")
    problems = [x for x in report["findings"] if x["severity"] != "expected"]
    if problems:
        where = sorted({x["node"] for x in problems if x["node"]})
        on = f" on {_join(where)}" if where else " on the node"
        notes.append(f"For the diagnosis and the exact fix, run{on} while the trouble lasts: "
                     "sudo bpftrace-hostport check")
    return notes


def anonymized(report: dict, key: bytes) -> dict:
    """The report with pseudonyms (records/anonymize.py, keyed Crypto-PAn) for every client
    address it holds: the top clients of each mapping and the --client networks of its filter.
    Pod and node addresses stay (they are the node's own, not the clients')."""
    from bpftrace_hostport.records.anonymize import Anonymizer
    anon = Anonymizer(key)
    out = dict(report, mappings=[dict(m, top_clients=[[anon.map_text(ip), n] for ip, n in m["top_clients"]])
                                 for m in report["mappings"]],
               filters=dict(report["filters"], clients=[anon.map_cidr(c) for c in report["filters"]["clients"]]),
               anonymized=True)
    return out


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
