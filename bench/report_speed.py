"""How long `build_report` takes on a synthetic capture (default 1,000,000 flows, 2 nodes,
20 mappings, 5,000 clients, one hour), unfiltered (kernel counts) and filtered (records).

    .venv/bin/python bench/report_speed.py [--flows N] [--repeat R]

The target: well under 3 s for 1,000,000 flows.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from bpftrace_hostport.analysis.report import Filters, build_report
from bpftrace_hostport.analysis.report_render import render
from bpftrace_hostport.records.capture import Capture

START = pd.Timestamp("2024-05-01T12:00:00Z")
MAPPINGS = 20


def synthetic(n: int, seed: int = 1) -> Capture:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, MAPPINGS, n)
    pick = lambda values: np.array(values, dtype=object)[m]          # noqa: E731 - per mapping
    clients = np.array([f"192.168.{i // 250}.{i % 250}" for i in range(5000)], dtype=object)
    flows = pd.DataFrame({
        "ts": START + pd.to_timedelta(np.sort(rng.integers(0, 3600 * 10**9, n)), unit="ns"),
        "proto": pick(["udp" if i % 5 == 0 else "tcp" for i in range(MAPPINGS)]),
        "family": np.full(n, 4), "client_ip": clients[rng.integers(0, len(clients), n)],
        "client_port": rng.integers(1024, 65535, n), "node_ip": "10.0.0.1",
        "host_port": 8000 + m, "pod_ip": pick([f"10.244.{i % 2}.{i + 2}" for i in range(MAPPINGS)]),
        "pod_port": pd.array(80 + m, dtype="Int64"), "hook": "prerouting",
        "answered": rng.random(n) < 0.95, "latency_us": rng.lognormal(7, 1, n),
        "midstream": rng.random(n) < 0.01, "masqueraded": rng.random(n) < 0.1, "snat_ip": None,
        "packets": pd.array(rng.integers(1, 100, n), dtype="Int64"),
        "bytes": pd.array(rng.integers(60, 10000, n), dtype="Int64"),
        "pod_namespace": "shop", "pod_name": pick([f"web-{i}" for i in range(MAPPINGS)]),
        "port_name": "http",
        "drop_reason": np.where(rng.random(n) < 0.001, "NETFILTER_DROP", None).astype(object),
        "node": pick([f"node-{i % 2}" for i in range(MAPPINGS)]),
        "source": pick([f"node-{i % 2}.jsonl" for i in range(MAPPINGS)]),
    })
    flows.loc[~flows["answered"], "latency_us"] = np.nan
    k = max(n // 100, 1)
    misses = pd.DataFrame({
        "ts": START + pd.to_timedelta(rng.integers(0, 3600, k), unit="s"), "proto": "tcp",
        "family": 4, "client_ip": clients[rng.integers(0, len(clients), k)], "node_ip": "10.0.0.1",
        "host_port": 9090, "hook": "prerouting", "count": rng.integers(1, 5, k),
        "node": "node-0", "source": "node-0.jsonl"})
    return Capture(flows=flows, misses=misses, summaries=_summaries(flows, misses),
                   headers=[{"schema": 2, "backend": "netfilter", "node": f"node-{i}",
                             "started": START.isoformat(), "source": f"node-{i}.jsonl",
                             "measures": dict.fromkeys(("latency", "packets", "misses", "drops"), True)}
                            for i in range(2)])


def _summaries(flows: pd.DataFrame, misses: pd.DataFrame) -> list:
    """What the kernel would have counted: the rows plus 1% lost flows."""
    g = flows.groupby(["node", "proto", "family", "host_port", "pod_ip", "pod_port"])
    agg = g.agg(flows=("answered", "size"), packets=("packets", "sum"), bytes=("bytes", "sum"))
    out = {}
    for (node, proto, fam, hp, ip, pp), row in agg.iterrows():
        s = out.setdefault(node, {"type": "summary", "duration_s": 3600.0, "lost_events": 0,
                                  "backend": "netfilter", "node": node, "source": f"{node}.jsonl",
                                  "mappings": []})
        s["mappings"].append({"proto": proto, "family": int(fam), "host_port": int(hp), "pod_ip": ip,
                              "pod_port": int(pp), "flows": int(row["flows"] * 1.01),
                              "packets": int(row["packets"]), "bytes": int(row["bytes"]),
                              "misses": 0, "drops": {}})
    out["node-0"]["mappings"].append({"proto": "tcp", "family": 4, "host_port": 9090, "pod_ip": None,
                                      "pod_port": None, "flows": 0, "packets": 0, "bytes": 0,
                                      "misses": int(misses["count"].sum()), "drops": {}})
    return list(out.values())


def timed(label: str, fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    print(f"{label:<44} {best:7.3f} s (best of {repeat})")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cap = timed(f"synthetic capture ({args.flows:,} flows)", lambda: synthetic(args.flows), 1)
    report = timed("build_report, no filter (kernel counts)", lambda: build_report(cap), args.repeat)
    since = START + pd.Timedelta(minutes=10)
    f = Filters(since=since.to_pydatetime(), clients=["192.168.0.0/20"], namespaces=["shop"])
    timed("build_report, since + client CIDR + namespace", lambda: build_report(cap, f), args.repeat)
    timed("render table (width 120)", lambda: render(report, "table", 120), args.repeat)
    timed("render html (4 charts)", lambda: render(report, "html"), args.repeat)
    print(f"{report['totals']['flows']:,} flows over {len(report['mappings'])} mappings")


if __name__ == "__main__":
    main()
