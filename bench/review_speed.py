"""How fast and in how much memory the incident review reads captures (issue 19's targets):
`report`, `summary` and `export` run as a user runs them (a fresh process each: its peak RSS
is its own), on recordings written by the real writer.

    .venv/bin/python -m bench.review_speed [--flows N] [--big N] [--nodes K] [--rounds R] [--dir DIR]

Cases: one recording of --flows flows (default 1,000,000) and of --big flows (10,000,000);
--nodes recordings (8) of --flows each, reported together; the same --flows as JSON lines; the
Parquet dataset `export --partition` makes of the nodes' recordings, read back by `report` and
by DuckDB. Beside them, the limit: reading the file's bytes from the page cache, and iterating
its Arrow record batches without looking at them. Each case runs --rounds times, the cases
alternating; medians and ranges are printed (and with --json, written).

Targets: 1M flows `report` <= 1.5 s and <= 300 MB; 8 nodes x 1M <= 10 s and <= 600 MB; the peak
at 10M within 1.2x of the peak at 1M.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import orjson

from bpftrace_hostport.records import outcome as oc
from bpftrace_hostport.records.batch import FlowBatch
from bpftrace_hostport.records.recording import RecordingWriter
from bpftrace_hostport.records.schema import SCHEMA_VERSION

BATCH = 65_536
START_NS = 1_714_564_800 * 10**9              # 2024-05-01T12:00:00Z
PY = sys.executable


def header(node: str) -> dict:
    return {"type": "capture", "schema": SCHEMA_VERSION, "tool": "bench", "session": f"bench-{node}",
            "backend": "netfilter", "node": node, "kernel": "6.18", "netns": None,
            "started": "2024-05-01T12:00:00.000000Z", "options": {},
            "measures": {"latency": True, "packets": True, "misses": True, "drops": True}}


def synthetic(n: int, rng: np.random.Generator, t0: int, span_ns: int) -> FlowBatch:
    """n flows: 5,000 IPv4 clients and a few IPv6, 20 mappings, answered, refused, unanswered."""
    b = FlowBatch.empty(n)
    c = b.cols
    c["ts_ns"][:] = t0 + np.sort(rng.integers(0, max(span_ns, 1), n))
    m = rng.integers(0, 20, n)
    c["proto"][:] = np.where(m % 4 == 0, 17, 6)
    v6 = rng.random(n) < 0.05
    c["family"][:] = np.where(v6, 6, 4)
    c["hook"][:] = (m == 7)
    raw = np.zeros((n, 16), np.uint8)
    raw[:, 0], raw[:, 1] = 192, 168
    client = rng.integers(0, 5000, n)
    raw[:, 2], raw[:, 3] = client // 250, client % 250
    raw[v6, 0], raw[v6, 1] = 0xfd, 0x00
    c["client_addr"][:] = raw.view("V16").ravel()
    for col, base in (("node_addr", (10, 0, 0, 1)), ("pod_addr", (10, 22, 0, 0)), ("snat_addr", (10, 0, 0, 1))):
        a = np.zeros((n, 16), np.uint8)
        a[:, :4] = base
        if col == "pod_addr":
            a[:, 3] = 10 + m
        c[col][:] = a.view("V16").ravel()
    c["client_port"][:] = rng.integers(1024, 65535, n)
    c["host_port"][:] = 8000 + m
    c["pod_port"][:] = 80
    r = rng.random(n)
    out = np.where(r < 0.93, oc.ANSWERED, np.where(r < 0.97, oc.REFUSED, oc.UNANSWERED))
    c["outcome"][:] = out
    c["answered"][:] = out == oc.ANSWERED
    c["refusal"][:] = np.where(out == oc.REFUSED, 1, 0)
    c["refused_by"][:] = np.where(out == oc.REFUSED, 1, 0)
    c["refusal_us"][:] = np.where(out == oc.REFUSED, 40.0, np.nan)
    c["masqueraded"][:] = m % 5 == 0
    c["latency_us"][:] = np.where(c["answered"], rng.gamma(2.0, 300.0, n).round(1), np.nan)
    c["packets"][:] = rng.integers(2, 40, n)
    c["bytes"][:] = c["packets"] * 120
    c["pod"][:] = m
    c["drop"][:] = np.where(rng.random(n) < 0.01, 0, -1)
    b.pods = [("default", f"web-{i}", "http") for i in range(20)]
    b.drop_reasons = ["NETFILTER_DROP"]
    return b


def write_recording(path: str, node: str, n: int, seed: int, jsonl: str = None) -> None:
    rng = np.random.default_rng(seed)
    w = RecordingWriter(path, header(node))
    f = open(jsonl, "wb") if jsonl else None
    if f:
        f.write(orjson.dumps(header(node)) + b"\n")
    span = 3600 * 10**9
    for start in range(0, n, BATCH):
        k = min(BATCH, n - start)
        b = synthetic(k, rng, START_NS + start * span // max(n, 1), span * k // max(n, 1))
        w.write_flows(b)
        if f:
            f.write(b"".join(orjson.dumps(rec) + b"\n" for rec in b.to_records()))
    summary = {"type": "summary", "duration_s": 3600.0, "lost_events": 0, "flows": n,
               "backend": "netfilter", "kernel": None, "mappings": []}
    w.write_summary(summary)
    w.close()
    if f:
        f.write(orjson.dumps(summary) + b"\n")
        f.close()


# A child's peak RSS (ru_maxrss) includes the memory of the process it was forked from, up to
# its exec (the kernel keeps the old mm's high-water mark): forked from this process, which
# holds the generated captures, every child would read as big as it. So the commands are
# started by a small spawner, started before anything is generated; its own size (about 10
# MB) is the floor every figure includes (the `cat` row shows it).
SPAWNER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    argv = json.loads(line)
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    print(json.dumps({"s": dt, "mb": ru.ru_maxrss / 1024, "rc": os.waitstatus_to_exitcode(status),
                      "err": err[-500:]}), flush=True)
"""
_spawner = None


def start_spawner() -> None:
    global _spawner
    _spawner = subprocess.Popen([PY, "-c", SPAWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)


def run(argv: List[str]) -> Dict[str, float]:
    """A command in a fresh process (started by the spawner): wall seconds and peak RSS (MB)."""
    _spawner.stdin.write(json.dumps(argv) + "\n")
    _spawner.stdin.flush()
    got = json.loads(_spawner.stdout.readline())
    if got["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {got['err']}")
    return {"s": got["s"], "mb": got["mb"]}


READ_LIMIT = """
import sys, pyarrow as pa
n = 0
with pa.OSFile(sys.argv[1]) as f:
    r = pa.ipc.open_stream(f)
    for b in r:
        n += b.num_rows
"""


def cases(d: str, args) -> Dict[str, List[str]]:
    tool = [PY, "-m", "bpftrace_hostport"]
    one, big, js = (os.path.join(d, x) for x in ("one.arrow", "big.arrow", "one.jsonl"))
    nodes = [os.path.join(d, f"node-{i}.arrow") for i in range(args.nodes)]
    out = {
        f"report, 1 recording, {args.flows:,} flows": tool + ["report", one],
        f"summary, 1 recording, {args.flows:,} flows": tool + ["summary", one],
        f"report, 1 recording, {args.big:,} flows": tool + ["report", big],
        f"report, {args.nodes} nodes x {args.flows:,} flows": tool + ["report", *nodes],
        f"report, JSON lines, {args.flows:,} flows": tool + ["report", js],
        f"report, Parquet dataset of {args.nodes} nodes": tool + ["report", os.path.join(d, "fleet")],
        f"export --to parquet, {args.flows:,} flows": tool + ["export", one, "--to", "parquet", "-o",
                                                            os.path.join(d, "x.parquet")],
        f"limit: read the {args.flows:,}-flow file (page cache)": ["cat", one],
        f"limit: iterate its Arrow batches (pyarrow)": [PY, "-c", READ_LIMIT, one],
        f"limit: iterate the {args.big:,}-flow file's batches": [PY, "-c", READ_LIMIT, big],
        f"DuckDB group-by over the Parquet dataset": [PY, "-c", (
            "import duckdb,sys; print(duckdb.connect().execute(\"SELECT node, outcome, count(*), "
            "quantile_cont(latency_us, 0.99) FROM read_parquet(?, hive_partitioning=true) GROUP BY ALL\", "
            "[sys.argv[1] + '/**/*.parquet']).fetchall())"), os.path.join(d, "fleet")],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--big", type=int, default=10_000_000)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="keep the captures here (made when missing, reused when there)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="review-speed-")
    os.makedirs(d, exist_ok=True)
    start_spawner()
    try:
        t = time.perf_counter()
        if not os.path.exists(os.path.join(d, "one.arrow")):
            write_recording(os.path.join(d, "one.arrow"), "node-0", args.flows, 1, os.path.join(d, "one.jsonl"))
            write_recording(os.path.join(d, "big.arrow"), "node-0", args.big, 2)
            for i in range(args.nodes):
                write_recording(os.path.join(d, f"node-{i}.arrow"), f"node-{i}", args.flows, 10 + i)
            run([PY, "-m", "bpftrace_hostport", "export", *[os.path.join(d, f"node-{i}.arrow")
                                                           for i in range(args.nodes)],
                 "--to", "parquet", "--partition", "-o", os.path.join(d, "fleet")])
            print(f"built the captures in {time.perf_counter() - t:.0f} s in {d}")
        results: Dict[str, List[Dict[str, float]]] = {}
        todo = cases(d, args)
        for rnd in range(args.rounds):
            for name in (list(todo) if rnd % 2 == 0 else list(reversed(todo))):   # alternate
                results.setdefault(name, []).append(run(todo[name]))
        print(f"{'case':<58} {'seconds (median, range)':>26} {'peak RSS MB (median, range)':>30}")
        table = {}
        for name, rs in results.items():
            s = [r["s"] for r in rs]
            mb = [r["mb"] for r in rs]
            table[name] = {"s": statistics.median(s), "s_range": [min(s), max(s)],
                           "mb": statistics.median(mb), "mb_range": [min(mb), max(mb)], "rounds": len(rs)}
            print(f"{name:<58} {statistics.median(s):8.2f} ({min(s):.2f}-{max(s):.2f})"
                  f" {statistics.median(mb):14.0f} ({min(mb):.0f}-{max(mb):.0f})")
        sizes = {f: os.path.getsize(os.path.join(d, f)) for f in ("one.arrow", "big.arrow", "one.jsonl")}
        print("files: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sizes.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": table, "sizes": sizes, "flows": args.flows, "big": args.big,
                           "nodes": args.nodes}, f, indent=1)
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
