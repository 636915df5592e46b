"""From trials to results: per-round ratios to the same round's baseline, medians and spreads,
the accounting of every flow, the tracer's resources, eBPF run time, and the targets.

Every ratio is taken within a round (the mode's trial against the baseline trial a few seconds
away), then summarised over rounds: median, min, max, quartiles. That cancels the slow drift
of a shared machine; what remains in the spread is trial-to-trial noise.
"""
from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Optional

from bench.config import (EBPF_SOURCES, EBPF_TRAFFIC, MODES, OTHER_KINDS, OTHER_MODES, TARGETS, TRACER_MODES,
                          TUPLE_BUDGET, WATCHED_MODES)


# -- numbers -----------------------------------------------------------------------------------
def rnd(x: Optional[float], n: int = 3) -> Optional[float]:
    return None if x is None else round(float(x), n)


def median(xs: Iterable[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs: Iterable[Optional[float]], nd: int = 4) -> dict:
    """Median, min, max, quartiles and the spread relative to the median of xs (Nones left out)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None,
                "iqr": None, "rel_iqr": None, "rel_range": None, "values": []}
    q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[::2] if len(xs) > 1 else (xs[0], xs[0]))
    med = statistics.median(xs)
    rel = lambda w: rnd(w / abs(med), 4) if med else None  # noqa: E731
    return {"n": len(xs), "median": rnd(med, nd), "min": rnd(xs[0], nd), "max": rnd(xs[-1], nd),
            "q1": rnd(q1, nd), "q3": rnd(q3, nd), "iqr": rnd(q3 - q1, nd),
            "rel_iqr": rel(q3 - q1), "rel_range": rel(xs[-1] - xs[0]), "values": [rnd(x, nd) for x in xs]}


def per(num: Optional[float], den: Optional[float], scale: float = 1.0) -> Optional[float]:
    return None if num is None or not den else scale * num / den


# -- per trial, per round ------------------------------------------------------------------------
def by(trials: List[dict], kind: str, mode: str) -> List[dict]:
    return sorted((t for t in trials if t["kind"] == kind and t["mode"] == mode), key=lambda t: t["round"])


def conn_costs(t: dict) -> dict:
    """A conn/s trial's rate and CPU per completed connection (µs): the machine's, the watcher's."""
    n = t["wrk"]["requests"]
    return {"rps": t["wrk"]["rps"], "conns": n,
            "busy_us": per(t["machine_busy_cpu_s"], n, 1e6),
            "watcher_us": per(t["monitor"].get("cpu_load_s"), n, 1e6)}


def round_ratios(trials: List[dict]) -> Dict[str, Dict[str, list]]:
    """For each watched mode, per round: conn/s, busy CPU per connection and the watcher's CPU
    per connection, each divided by the same round's baseline figure; and the bulk ratio."""
    out = {m: {"ratio": [], "cpu_ratio": [], "watcher_share": [], "bulk_ratio": []} for m in WATCHED_MODES}
    base = {t["round"]: conn_costs(t) for t in by(trials, "conn", "baseline")}
    bulk_base = {t["round"]: t["iperf3"]["gbit_s"] for t in by(trials, "bulk", "baseline")}
    for mode in WATCHED_MODES:
        for t in by(trials, "conn", mode):
            b, c = base.get(t["round"]), conn_costs(t)
            if b is None:
                continue
            out[mode]["ratio"].append(per(c["rps"], b["rps"]))
            out[mode]["cpu_ratio"].append(per(c["busy_us"], b["busy_us"]))
            out[mode]["watcher_share"].append(per(c["watcher_us"], b["busy_us"]))
        for t in by(trials, "bulk", mode):
            if t["round"] in bulk_base:
                out[mode]["bulk_ratio"].append(per(t["iperf3"]["gbit_s"], bulk_base[t["round"]]))
    return out


def _pct_of_core(t: dict, seconds: Optional[float]) -> Optional[float]:
    return per(seconds, t["wall_s"], 100.0)


def other_cpu_s(t: dict) -> Optional[float]:
    """CPU seconds of everything but the load's own work in a conn/s trial: the machine's busy
    time less irq + softirq (the packets), the lab server, wrk and the watcher. What is left is
    other work on the machine (and the bench's own reads)."""
    pct = t["system_cpu_pct"]
    busy_pct = sum(pct.get(k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
    if not busy_pct or t.get("labserver_cpu_s") is None:
        return None
    irq_s = t["machine_busy_cpu_s"] * (pct.get("irq", 0.0) + pct.get("softirq", 0.0)) / busy_pct
    own = t["labserver_cpu_s"] + t["wrk"]["wrk_cpu_s"] + (t["monitor"].get("cpu_load_s") or 0.0)
    return max(0.0, t["machine_busy_cpu_s"] - irq_s - own)


def conn_table(trials: List[dict]) -> Dict[str, dict]:
    """Per mode: conn/s, CPU per connection, the per-round ratios, where the CPU went."""
    ratios = round_ratios(trials)
    out = {}
    for mode in MODES:
        ts = by(trials, "conn", mode)
        costs = [conn_costs(t) for t in ts]
        row = {
            "conn_s": spread([c["rps"] for c in costs], 1),
            "busy_us_per_conn": spread([c["busy_us"] for c in costs], 2),
            "watcher_us_per_conn": spread([c["watcher_us"] for c in costs], 2),
            "system_idle_pct_median": rnd(median(t["system_cpu_pct"]["idle"] for t in ts), 1),
            "system_softirq_pct_median": rnd(median(t["system_cpu_pct"]["softirq"] for t in ts), 1),
            "system_steal_pct_median": rnd(median(t["system_cpu_pct"]["steal"] for t in ts), 1),
            "labserver_cpu_pct_median": rnd(median(_pct_of_core(t, t.get("labserver_cpu_s")) for t in ts), 1),
            "wrk_cpu_pct_median": rnd(median(_pct_of_core(t, t["wrk"]["wrk_cpu_s"]) for t in ts), 1),
            "watcher_cpu_pct_median": rnd(median(t["monitor"].get("cpu_load_pct_of_core") for t in ts), 1),
            "other_cpu_pct_median": rnd(median(_pct_of_core(t, other_cpu_s(t)) for t in ts), 1),
        }
        if mode in ratios:
            row.update({k: spread(v) for k, v in ratios[mode].items() if k != "bulk_ratio"})
        out[mode] = row
    return out


def bulk_table(trials: List[dict]) -> Dict[str, dict]:
    ratios = round_ratios(trials)
    return {mode: {"gbit_s": spread([t["iperf3"]["gbit_s"] for t in by(trials, "bulk", mode)], 3),
                   "ratio": spread(ratios[mode]["bulk_ratio"]) if mode in ratios else None,
                   "watcher_cpu_pct_median": rnd(median(t["monitor"].get("cpu_load_pct_of_core")
                                                        for t in by(trials, "bulk", mode)), 1)}
            for mode in MODES}


def stability(conn: Dict[str, dict], tracer: Dict[str, dict], bpf: dict) -> dict:
    """How much the throughput ratio and the CPU-per-connection ratio move from round to round
    (IQR and full range, relative to their medians), per traced mode; the same for the raw
    baseline figures they divide by, and for the costs measured on the tracer itself."""
    out: dict = {"direct": {m: {"ebpf_ns_per_conn_rel_iqr": bpf[m]["ns_per_conn_trials"]["rel_iqr"],
                                "ebpf_ns_per_conn_rel_range": bpf[m]["ns_per_conn_trials"]["rel_range"],
                                "tracer_us_per_flow_rel_iqr": tracer[m]["us_per_flow"]["rel_iqr"],
                                "tracer_us_per_flow_rel_range": tracer[m]["us_per_flow"]["rel_range"]}
                            for m in TRACER_MODES}}
    for mode in WATCHED_MODES:
        r, c = conn[mode]["ratio"], conn[mode]["cpu_ratio"]
        out[mode] = {"ratio_rel_iqr": r["rel_iqr"], "cpu_ratio_rel_iqr": c["rel_iqr"],
                     "ratio_rel_range": r["rel_range"], "cpu_ratio_rel_range": c["rel_range"]}
    b = conn["baseline"]
    out["baseline_raw"] = {"conn_s_rel_iqr": b["conn_s"]["rel_iqr"],
                           "busy_us_per_conn_rel_iqr": b["busy_us_per_conn"]["rel_iqr"],
                           "conn_s_rel_range": b["conn_s"]["rel_range"],
                           "busy_us_per_conn_rel_range": b["busy_us_per_conn"]["rel_range"]}
    modes = [out[m] for m in WATCHED_MODES if m in out]
    out["median_over_modes"] = {k: rnd(median(m[k] for m in modes), 4) for k in modes[0]} if modes else {}
    return out


# -- flows lost or unaccounted -------------------------------------------------------------------
def accounting(t: dict) -> dict:
    """Flows one tracer trial lost or did not account for."""
    s = t["monitor"]["summary"]
    k = s.get("kernel") or {}
    w = t["wrk"]
    got = s["http_delivered"]
    # lost_events (the final summary) already holds the flows a full table refused
    # (flow_insert_errors) and every flow created but never reported.
    kernel_lost = int(s.get("lost_events") or 0)
    # wrk counts completed requests (+ errors); connections still open when it stops are not
    # counted, so the tracer may see up to `connections` more flows than that: never fewer.
    # The pod's kernel (TcpPassiveOpens) is the other witness: every connection it accepted
    # went through the DNAT and must be one of the tracer's flows.
    vs_wrk, vs_server = max(0, w["sent"] - got), max(0, t["pod_passive_opens"] - got)
    return {
        "round": t["round"], "kind": t["kind"], "mode": t["mode"],
        "conn_per_s": w["rps"],
        "tracer_seen_conn_per_s": rnd(got / s["http_span_s"], 0) if s.get("http_span_s") else None,
        "wrk_requests": w["requests"], "wrk_socket_errors": sum(w["socket_errors"].values()),
        "wrk_sent": w["sent"], "server_accepted": t["pod_passive_opens"],
        "client_connects": t["client_active_opens"],
        "tracer_flows": got, "tracer_counted": s["http_counted"], "tracer_answered": s["http_answered"],
        "lost_events": s.get("lost_events"),
        "lost_events_exported": s.get("lost_events_exported"),
        "kernel_flows_created": k.get("flows_created"),
        "kernel_ringbuf_deferred": k.get("ringbuf_deferred"),
        "kernel_flow_insert_errors": k.get("flow_insert_errors"),
        "unaccounted_vs_wrk": vs_wrk, "unaccounted_vs_server": vs_server,
        "unaccounted": max(vs_wrk, vs_server),
        "lost_flows": kernel_lost + max(vs_wrk, vs_server),
    }


def _totals(acc: List[dict]) -> dict:
    keys = ("wrk_sent", "server_accepted", "tracer_flows", "unaccounted", "lost_flows")
    out = {k: sum(int(a[k] or 0) for a in acc) for k in keys}
    for k in ("lost_events", "lost_events_exported", "kernel_ringbuf_deferred"):   # None: not in this output
        vals = [a[k] for a in acc if a[k] is not None]
        out[k] = sum(vals) if vals else None
    out["lost_flows_max_trial"] = max((a["lost_flows"] for a in acc), default=None)
    return out


def accounting_table(trials: List[dict]) -> dict:
    out = {"tuple_budget": TUPLE_BUDGET}
    for mode in TRACER_MODES:
        conn = [accounting(t) for t in by(trials, "conn", mode)]
        burst = [accounting(t) for t in by(trials, "burst", mode)]
        out[mode] = {"trials": conn, **_totals(conn), "burst_trials": burst,
                     "burst": _totals(burst) if burst else None}
    everything = [a for m in TRACER_MODES for a in out[m]["trials"] + out[m]["burst_trials"]]
    out["lost_flows"] = sum(a["lost_flows"] for a in everything)
    out["wrk_sent"] = sum(a["wrk_sent"] for a in everything)
    return out


def conntrack_events(trials: List[dict]) -> dict:
    ct = [{"round": t["round"], "wrk_sent": t["wrk"]["sent"],
           "new_events": t["monitor"]["conntrack"]["http_new_events"],
           "events": t["monitor"]["conntrack"]["events"],
           "enobufs_warnings": t["monitor"]["conntrack"]["enobufs_warnings"],
           "missing_new_events": max(0, t["wrk"]["sent"] - t["monitor"]["conntrack"]["http_new_events"])}
          for t in by(trials, "conn", "conntrack")]
    return {"trials": ct, "missing_new_events": sum(c["missing_new_events"] for c in ct),
            "wrk_sent": sum(c["wrk_sent"] for c in ct)}


# -- the tracer's resources ------------------------------------------------------------------------
def _mb(kb: Optional[float]) -> Optional[float]:
    return None if kb is None else kb / 1024.0


def _max(xs: Iterable[Optional[float]], nd: int = 1) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return rnd(max(xs), nd) if xs else None


def _med(xs: Iterable[Optional[float]], nd: int = 3) -> Optional[float]:
    return rnd(median(xs), nd)


def attach_times(trials: List[dict], mode: str) -> dict:
    """Start to attached; the run's first tracer start is the cold one and is left out of warm."""
    starts = [t for t in trials if t["mode"] in TRACER_MODES]
    first = starts[0] if starts else None
    warm = [t["monitor"]["attach_s"] for t in starts if t["mode"] == mode and t is not first]
    return {"attach_first_s": first["monitor"]["attach_s"] if first else None,
            "attach_warm_median_s": _med(warm), "attach_warm_max_s": _max(warm, 3), "attach_all_s": warm}


def tracer_memory(trials: List[dict], mode: str) -> dict:
    """RSS once attached and at the end of the load; peaks: the tracer alone (VmHWM), wait4's
    ru_maxrss (the larger of the tracer and its compile child) and the two together (PSS)."""
    every = [t["monitor"] for t in trials if t["mode"] == mode]
    mi = [t["monitor"] for t in by(trials, "conn", mode)]
    growth = [per((m.get("rss_anon_end_of_load_kb") or 0) - (m.get("rss_anon_at_ready_kb") or 0),
                  m["summary"]["http_delivered"], 1000.0) for m in mi]
    # The run's first tracer start compiles (bcc child) and fills the run's own compile cache;
    # every later start loads from it: peaks are given for both.
    starts = [t for t in trials if t["mode"] in TRACER_MODES]
    cold = starts[0]["monitor"] if starts else None

    def together_kb(m: dict) -> int:
        return max(m.get("startup_tree_pss_peak_kb") or 0, m.get("hwm_end_of_load_kb") or 0)
    warm = [m for m in every if m is not cold]
    return {
        "rss_at_ready_mb": spread([_mb(m.get("rss_at_ready_kb")) for m in every], 1),
        "rss_anon_at_ready_mb_max": _max(_mb(m.get("rss_anon_at_ready_kb")) for m in every),
        "rss_file_at_ready_mb_max": _max(_mb(m.get("rss_file_at_ready_kb")) for m in every),
        "rss_end_of_load_mb_max": _max(_mb(m.get("rss_end_of_load_kb")) for m in mi),
        "rss_growth_kb_per_1k_flows_median": _med(growth, 0),
        "own_peak_mb": _max(_mb(m.get("hwm_end_of_load_kb")) for m in every),
        "maxrss_wait4_mb": _max(_mb(m.get("maxrss_kb")) for m in every),
        "startup_tree_pss_peak_mb": _max(_mb(m.get("startup_tree_pss_peak_kb")) for m in every),
        "peak_mb": _max(_mb(together_kb(m)) for m in warm),
        "peak_cold_mb": _mb(together_kb(cold)) if cold is not None else None,
        "cold_compiled": bool(cold.get("compiled")) if cold is not None else None,
        "warm_compiled": sum(1 for m in warm if m.get("compiled")),
    }


def fixed_and_marginal(trials: List[dict]) -> dict:
    """The tracer's CPU over the load as a fixed cost per second plus a cost per flow:
    least squares of cpu_load_s = a * wall_s + b * flows over the trials (no intercept)."""
    import numpy as np
    rows = [(t["wall_s"], t["monitor"]["summary"]["http_delivered"], t["monitor"]["cpu_load_s"]) for t in trials
            if t["monitor"].get("cpu_load_s") is not None]
    if len(rows) < 3:
        return {"fixed_ms_per_s": None, "marginal_us_per_flow": None, "r2": None}
    x, y = np.array([r[:2] for r in rows], float), np.array([r[2] for r in rows], float)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ np.array([a, b])
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum()) if len(set(y)) > 1 else None
    return {"fixed_ms_per_s": rnd(a * 1e3, 1), "marginal_us_per_flow": rnd(b * 1e6, 2), "r2": rnd(r2, 3)}


def tracer_cpu(trials: List[dict], mode: str) -> dict:
    """The tracer's CPU across the conn/s load, per flow it delivered (µs), and around it."""
    mi = [t["monitor"] for t in by(trials, "conn", mode)]
    flows = [m["summary"]["http_delivered"] for m in mi]
    return {
        "us_per_flow": spread([per(m["cpu_load_s"], f, 1e6) for m, f in zip(mi, flows)], 3),
        "us_per_flow_runtime": spread([per(m.get("runtime_load_s"), f, 1e6) for m, f in zip(mi, flows)], 3),
        "cpu_load_s_median": _med(m["cpu_load_s"] for m in mi),
        "cpu_load_pct_of_core_median": _med((m["cpu_load_pct_of_core"] for m in mi), 1),
        "wakeups_per_1k_flows_median": _med((per(m["wakeups_during_load"], f, 1000.0) for m, f in zip(mi, flows)), 0),
        "cpu_attach_s_median": _med(m["cpu_at_ready_s"] for m in mi),
        "cpu_total_s_median": _med(m.get("cpu_total_s") for m in mi),
        "stop_s_median": _med(m.get("stop_s") for m in mi),
        "bulk_cpu_load_pct_of_core_median": _med((t["monitor"]["cpu_load_pct_of_core"]
                                                  for t in by(trials, "bulk", mode)), 1),
        "recording_bytes_per_flow_median": _med((per(m.get("recording_bytes"), f) for m, f in zip(mi, flows)), 1),
        # conn/s and burst trials: the same load at different rates separates the two costs
        "cpu_fit": fixed_and_marginal([t for k in ("conn", "burst") for t in by(trials, k, mode)]),
    }


def tracer_table(trials: List[dict]) -> Dict[str, dict]:
    return {mode: {**tracer_cpu(trials, mode), **tracer_memory(trials, mode), **attach_times(trials, mode)}
            for mode in TRACER_MODES}


# -- eBPF run time -------------------------------------------------------------------------------
def sum_progs(trials: List[dict]) -> Dict[str, dict]:
    tot: Dict[str, dict] = {}
    for t in trials:
        for name, v in (t["monitor"].get("progs") or {}).items():
            a = tot.setdefault(name, {"run_time_ns": 0, "run_cnt": 0})
            a["run_time_ns"] += v["run_time_ns"]
            a["run_cnt"] += v["run_cnt"]
    for v in tot.values():
        v["ns_per_run"] = rnd(per(v["run_time_ns"], v["run_cnt"]), 1)
    return tot


def _prog_ns(t: dict) -> int:
    return sum(v["run_time_ns"] for v in (t["monitor"].get("progs") or {}).values())


def bpf_table(trials: List[dict]) -> dict:
    """Per program: ns per run, runs and ns per connection (connections: accepted by the pod),
    in the trials timed with run-time statistics (burst trials when the run has them, else the
    conn/s trials) of each tracer mode and of all of them; bulk trials apart."""
    out: dict = {}
    kind = "burst" if any(t["kind"] == "burst" for t in trials) else "conn"
    out["kind"] = kind
    groups = {m: by(trials, kind, m) for m in TRACER_MODES}
    groups["all"] = [t for m in TRACER_MODES for t in groups[m]]
    for name, ts in groups.items():
        conns = sum(t["pod_passive_opens"] for t in ts)
        progs = sum_progs(ts)
        for v in progs.values():
            v["runs_per_conn"] = rnd(per(v["run_cnt"], conns), 2)
            v["ns_per_conn"] = rnd(per(v["run_time_ns"], conns), 1)
        out[name] = {"progs": progs, "connections": conns,
                     "ns_per_conn": rnd(per(sum(v["run_time_ns"] for v in progs.values()), conns), 1),
                     "ns_per_conn_trials": spread([per(_prog_ns(t), t["pod_passive_opens"]) for t in ts], 1)}
    out["bulk"] = {"progs": sum_progs([t for m in TRACER_MODES for t in by(trials, "bulk", m)])}
    return out


# -- traffic that is not hostPort ------------------------------------------------------------------
def other_table(trials: List[dict]) -> dict:
    """The node's traffic that is not hostPort (the client to the pods' own addresses), without
    and with the tracer: conn/s (wrk) and Gbit/s (iperf3), the per-round ratio of record over
    baseline, the machine's CPU per connection; and what the tracer made of it (nothing: no
    flow may come of traffic that was never DNATed)."""
    out: dict = {}
    for kind in OTHER_KINDS:
        rate = (lambda t: t["wrk"]["rps"]) if kind == "other" else (lambda t: t["iperf3"]["gbit_s"])  # noqa: E731
        base = {t["round"]: t for t in by(trials, kind, "baseline")}
        rec = by(trials, kind, "record")
        if not base and not rec:
            continue
        row: dict = {m: {"rate": spread([rate(t) for t in by(trials, kind, m)], 3)} for m in OTHER_MODES}
        row["ratio"] = spread([per(rate(t), rate(base[t["round"]])) for t in rec if t["round"] in base])
        if kind == "other":
            cost = lambda t: per(t["machine_busy_cpu_s"], t["wrk"]["requests"], 1e6)  # noqa: E731
            for m in OTHER_MODES:
                row[m]["busy_us_per_conn"] = spread([cost(t) for t in by(trials, kind, m)], 2)
            row["cpu_ratio"] = spread([per(cost(t), cost(base[t["round"]])) for t in rec if t["round"] in base])
        row["tracer_flows"] = sum(int((t["monitor"].get("summary") or {}).get("http_delivered") or 0) for t in rec)
        row["tracer_cpu_pct_of_core_median"] = rnd(median(t["monitor"].get("cpu_load_pct_of_core") for t in rec), 1)
        out[kind] = row
    return out


def ebpf_table(trials: List[dict]) -> dict:
    """The eBPF comparison: per traffic, the tracer's programs and the floor's, ns per packet the
    node took in and per connection the pod accepted (all programs), per trial then medians;
    and the ratio tracer / floor within each round."""
    ts = [t for t in trials if t["kind"] == "ebpf"]
    out: dict = {}
    for traffic in EBPF_TRAFFIC:
        row: dict = {}
        for src in EBPF_SOURCES:
            mine = sorted((t for t in ts if t["traffic"] == traffic and t["mode"] == src), key=lambda t: t["round"])
            if not mine:
                continue
            row[src] = {"ns_per_packet": spread([per(t["run_time_ns"], t["packets"]) for t in mine], 1),
                        "ns_per_conn": spread([per(t["run_time_ns"], t["connections"]) for t in mine], 1),
                        "runs_per_packet": rnd(median(per(t["run_cnt"], t["packets"]) for t in mine), 2),
                        "packets": sum(t["packets"] for t in mine), "connections": sum(t["connections"] for t in mine)}
        if len(row) < len(EBPF_SOURCES):
            continue
        pairs = {}
        for t in ts:
            if t["traffic"] == traffic:
                pairs.setdefault(t["round"], {})[t["mode"]] = t
        ratio = lambda key: spread([per(per(p["tracer"]["run_time_ns"], p["tracer"][key]),  # noqa: E731
                                        per(p["floor"]["run_time_ns"], p["floor"][key]))
                                    for p in pairs.values() if "tracer" in p and "floor" in p])
        row["vs_floor_per_packet"] = ratio("packets")
        row["vs_floor_per_conn"] = ratio("connections")
        out[traffic] = row
    return out


# -- targets ---------------------------------------------------------------------------------------
def _cmp(value, op: str, bound) -> bool:
    if value is None:
        return False
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "==": value == bound}[op]


def _ns(us: Optional[float]) -> Optional[float]:
    return None if us is None else rnd(us * 1000.0, 0)


def checks(conn: dict, acc: dict, tracer: dict, bpf: dict, other: dict, ebpf: dict) -> Dict[str, dict]:
    T = TARGETS
    out = {}
    for mode, (op, bound) in T["conn_ratio"].items():
        v = conn[mode]["ratio"]["median"]
        out[f"conn_ratio_{mode}"] = {"value": v, "target": f"{op} {bound}", "met": _cmp(v, op, bound)}
    for mode, (op, bound) in T["cpu_ratio"].items():
        v = conn[mode]["cpu_ratio"]["median"]
        out[f"cpu_ratio_{mode}"] = {"value": v, "target": f"{op} {bound}", "met": _cmp(v, op, bound)}
    op, bound = T["other_ratio"]
    for kind, row in other.items():
        v = row["ratio"]["median"]
        out[f"{kind.replace('-', '_')}_ratio"] = {"value": v, "target": f"{op} {bound}", "met": _cmp(v, op, bound)}
    for traffic in ("other", "other-bulk"):
        if traffic in ebpf:
            v = ebpf[traffic]["vs_floor_per_packet"]["median"]
            out[f"ebpf_{traffic.replace('-', '_')}_vs_floor"] = {
                "value": v, "target": f"<= {T['other_ns_per_packet_vs_floor_max']:g}",
                "met": _cmp(v, "<=", T["other_ns_per_packet_vs_floor_max"])}
    items = {
        "user_ns_per_flow_record": (_ns(tracer["record"]["us_per_flow"]["median"]), "<=",
                                    T["user_ns_per_flow_record_max"]),
        "lost_flows": (acc["lost_flows"], "==", T["lost_flows"]),
        "rss_attached_mb": (_max(tracer[m]["rss_at_ready_mb"]["max"] for m in TRACER_MODES), "<=",
                            T["rss_attached_mb_max"]),
        "peak_mb": (_max(tracer[m]["peak_mb"] for m in TRACER_MODES), "<=", T["peak_mb_max"]),
        "attach_warm_s": (_max((tracer[m]["attach_warm_max_s"] for m in TRACER_MODES), 3), "<=",
                          T["attach_warm_s_max"]),
    }
    for key, (v, op, bound) in items.items():
        out[key] = {"value": v, "target": f"{op} {bound:g}", "met": _cmp(v, op, bound)}
    j, c = conn["json"]["ratio"]["median"], conn["conntrack"]["ratio"]["median"]
    out["json_beats_conntrack"] = {"value": [j, c], "target": "json ratio > conntrack -E ratio",
                                   "met": None not in (j, c) and j > c}
    return out


def code_versions(trials: List[dict]) -> List[dict]:
    """The (eBPF, hot-path Python) digests the tracer starts ran with, in order of first use, with
    the number of whole-package Python versions seen under each."""
    seen: Dict[tuple, dict] = {}
    for t in trials:
        code = (t.get("monitor") or {}).get("code")
        if code:
            key = (code["bpf"], code.get("hot_path"))
            v = seen.setdefault(key, {"bpf": code["bpf"], "hot_path": code.get("hot_path"), "trials": 0,
                                      "first_round": t["round"], "python": set()})
            v["trials"] += 1
            v["python"].add(code["python"])
    return [dict(v, python=len(v["python"])) for v in seen.values()]


def analyse(trials: List[dict]) -> dict:
    conn = conn_table(trials)
    acc = accounting_table(trials)
    tracer = tracer_table(trials)
    bpf = bpf_table(trials)
    other, ebpf = other_table(trials), ebpf_table(trials)
    return {"conn": conn, "bulk": bulk_table(trials), "stability": stability(conn, tracer, bpf),
            "accounting": acc, "conntrack_events": conntrack_events(trials),
            "tracer": tracer, "bpf_prog": bpf, "other": other, "ebpf": ebpf,
            "checks": checks(conn, acc, tracer, bpf, other, ebpf),
            "code_versions": code_versions(trials)}
