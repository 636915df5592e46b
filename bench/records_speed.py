"""How fast `records.reader.load` reads a big capture: a recording and the same flows as JSON
lines (default 1,000,000 flows, written in session-sized batches of 10,000), each loaded in a
fresh process so its peak RSS is the reader's own.

    .venv/bin/python bench/records_speed.py [--flows N] [--dir DIR] [--keep]

Targets: the recording in <= 3 s and <= 1 GB RSS; the JSON lines in <= 15 s.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson

from bpftrace_hostport.records.batch import FlowBatch
from bpftrace_hostport.records.recording import RecordingWriter

BATCH = 10_000
START_NS = 1_714_564_800 * 10**9              # 2024-05-01T12:00:00Z
HEADER = {"type": "capture", "schema": 2, "tool": "bench", "backend": "netfilter", "node": "n1",
          "kernel": "6.8", "netns": None, "started": "2024-05-01T12:00:00.000000Z",
          "options": {}, "measures": {"latency": True, "packets": True, "misses": True, "drops": True}}


def synthetic(n: int, rng: np.random.Generator, t0: int) -> FlowBatch:
    """n valid flows: 5,000 IPv4 clients and a few IPv6, 20 mappings, an hour."""
    b = FlowBatch.empty(n)
    c = b.cols
    c["ts_ns"][:] = t0 + np.sort(rng.integers(0, 3600 * 10**9 // 100, n))
    m = rng.integers(0, 20, n)
    c["proto"][:] = np.where(m % 4 == 0, 17, 6)
    v6 = rng.random(n) < 0.05
    c["family"][:] = np.where(v6, 6, 4)
    c["hook"][:] = (m == 7)
    raw = np.zeros((n, 16), np.uint8)
    raw[:, 0], raw[:, 1] = 192, 168
    client = rng.integers(0, 5000, n)
    raw[:, 2], raw[:, 3] = client // 250, client % 250
    raw[v6, 0], raw[v6, 1] = 0xfd, 0x00                  # fd00::/8 for the IPv6 ones
    c["client_addr"][:] = raw.view("V16").ravel()
    for col, base in (("node_addr", (10, 0, 0, 1)), ("pod_addr", (10, 22, 0, 0)),
                      ("snat_addr", (10, 0, 0, 1))):
        a = np.zeros((n, 16), np.uint8)
        a[:, :4] = base
        if col == "pod_addr":
            a[:, 3] = 10 + m
        c[col][:] = a.view("V16").ravel()
    c["client_port"][:] = rng.integers(1024, 65535, n)
    c["host_port"][:] = 8000 + m
    c["pod_port"][:] = 80
    c["answered"][:] = rng.random(n) < 0.95
    c["masqueraded"][:] = m % 5 == 0
    c["latency_us"][:] = np.where(c["answered"], rng.gamma(2.0, 300.0, n).round(1), np.nan)
    c["packets"][:] = rng.integers(2, 40, n)
    c["bytes"][:] = c["packets"] * 120
    c["pod"][:] = m
    c["drop"][:] = np.where(rng.random(n) < 0.01, 0, -1)
    b.pods = [("default", f"web-{i}", "http") for i in range(20)]
    b.drop_reasons = ["NETFILTER_DROP"]
    return b


def build(n: int, directory: str):
    """The recording and the JSON-lines capture of the same n flows."""
    rng = np.random.default_rng(1)
    rec, jsonl = os.path.join(directory, "bench.arrow"), os.path.join(directory, "bench.jsonl")
    w = RecordingWriter(rec, HEADER)
    with open(jsonl, "wb") as f:
        f.write(orjson.dumps(HEADER) + b"\n")
        for start in range(0, n, BATCH):
            b = synthetic(min(BATCH, n - start), rng, START_NS + start * 3600 * 10**9 // max(n, 1))
            w.write_flows(b)
            f.write(b"".join(orjson.dumps(r) + b"\n" for r in b.to_records()))
        summary = {"type": "summary", "duration_s": 3600.0, "lost_events": 0, "flows": n,
                   "backend": "netfilter", "kernel": None, "mappings": []}
        f.write(orjson.dumps(summary) + b"\n")
    w.write_summary(summary)
    w.close()
    return rec, jsonl


def measure(path: str) -> None:
    """In the child: load once, print seconds, peak RSS (MB) and rows."""
    from bpftrace_hostport.records.reader import load
    t = time.perf_counter()
    cap = load([path])
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{dt:.2f} {peak:.0f} {len(cap.flows)} {len(cap.notes)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--dir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure)
    directory = args.dir or tempfile.mkdtemp(prefix="records-speed-")
    try:
        t = time.perf_counter()
        paths = build(args.flows, directory)
        print(f"built {args.flows:,} flows in {time.perf_counter() - t:.1f} s")
        for path in paths:
            out = subprocess.run([sys.executable, __file__, "--measure", path], check=True,
                                 capture_output=True, text=True).stdout.split()
            print(f"{os.path.basename(path):12} {os.path.getsize(path) / 2**20:8.1f} MiB  "
                  f"load {out[0]} s  peak RSS {out[1]} MB  {int(out[2]):,} flows  notes {out[3]}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(directory)


if __name__ == "__main__":
    main()
