"""Where the eBPF time of a connection goes: the kernel programs, instrumented section by
section, under the bench's load.

    sudo .venv/bin/python -m bench.ebpf_sections [--seconds S] [--lab-name NAME]
    sudo .venv/bin/python -m bench.ebpf_sections --variant floor --rounds 3

BPF_ENABLE_STATS gives a program's run time as a whole; this splits it. A copy of bpf/ is
made with a clock read after each section of on_post_dnat (the anchors below), the copy is
loaded the way the tracer loads its programs (collect/netfilter/probe.py, compile cache off,
records on), attached to a bench lab's node and loaded with wrk (one connection per request,
the bench's client settings), and each section's total time and count are read from a per-CPU
array. Every clock read costs about 20-30 ns, which each section's figure includes: the
sections add up to more than the plain program's run time. An anchor that no longer matches
the source fails loudly: the tool measures the source as it is.

With --variant, the source and a rewrite of it (bench/ebpf_variants.py: the floor any program
on these hooks pays, the cost of a clock read, another design) are loaded in turn on the same
lab, --rounds times each, and only their run times are compared: medians and ranges.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.ebpf_variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]

HELPER = """
BPF_PERCPU_ARRAY(prof, u64, 64);
static __always_inline void prof_add(u32 i, u64 *t)
{
    u64 n = bpf_ktime_get_ns();
    u32 k = i;
    u64 *p = prof.lookup(&k);
    if (p)
        *p += n - *t;
    k = i + 32;
    p = prof.lookup(&k);
    if (p)
        *p += 1;
    *t = n;
}
"""
HELPER_AFTER = "BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);\n"
START = "    void *skb = *(void **)((char *)ctx + NF_CTX_SKB);\n"

# (section, what it covers, anchor in hostport.bpf.c, marker placed "before" or "after" it)
SECTIONS = [
    (0, "known flow's packet: cache lookup + counters (hot path)",
     "        if (count_known(ctkey, len)) {\n            return 1;\n        }\n        /* Or of a connection", "mid"),
    (17, "not ours: the ignored entry's lookup (not hostPort traffic)",
     "        if (ct_ignored(ctkey))\n            return 1;\n    }\n\n    /* Everything else", "mid"),
    (1, "not known: the cache lookup that missed",
     "    /* Everything else needs the entry's tuples and status: one read. */\n", "before"),
    (15, "conntrack entry read: both tuples and status (one read)",
     "    /* The first packet of a new conntrack entry (not yet confirmed). */\n    int fresh", "before"),
    (2, "first packet: its address's stale cache slot marked",
     "            ct_forget(ctkey);\n", "after"),
    (3, "config, flow key",
     "    struct flow_val nv = {};\n    int built = 0;", "before"),
    (5, "new flow: checks, value, mapping_id",
     "        built = 1;\n        int rc = flows.insert(&k, &nv);", "before"),
    (8, "new flow: flows.insert (no lookup first)",
     "        if (rc == 0) {\n            flow_created(&nv, len);", "before"),
    (9, "new flow: mapping counters",
     "            flow_created(&nv, len);\n            return 1;", "mid"),
    (4, "flows.lookup (40-byte key)",
     "    struct flow_val *v = flows.lookup(&k);\n    if (!v && related)", "mid"),
    (10, "first reply: counters, atomics, masquerade",
     "    u8 outcome = judge_reply(", "before"),
    (16, "first reply: the packet read, its outcome judged",
     "    v->reply_ns = bpf_ktime_get_ns();\n", "before"),
    (11, "first reply: clock, outcome",
     "    if (cfg->no_records) {\n", "before"),
    (12, "first reply: ring-buffer record, flows.delete (the claim)",
     "    int rc = report_flow(&k, v);\n", "after"),
    (13, "first reply: outcome counts, latency histogram",
     "        count_outcome(mid, flags, outcome, refusal, lat);\n    if (rc == 0)\n", "mid"),
    (14, "first reply: cache slot (its own, or the stalest of the set)",
     "        remember(ctkey, mid);\n    return 1;\n}\n", "mid"),
]


def instrument(text: str) -> str:
    """The source with the section markers; SystemExit when an anchor is missing or ambiguous."""
    def place(text: str, anchor: str, marker: str, where: str) -> str:
        n = text.count(anchor)
        if n != 1:
            raise SystemExit(f"bench.ebpf_sections: anchor found {n} times, expected once "
                             f"(the source changed; update SECTIONS): {anchor.strip()[:70]!r}")
        if where == "before":
            return text.replace(anchor, marker + anchor)
        if where == "after":
            return text.replace(anchor, anchor + marker)
        first, _, rest = anchor.partition("\n")            # "mid": after the anchor's first line
        return text.replace(anchor, first + "\n" + marker + rest)

    text = place(text, HELPER_AFTER, HELPER, "after")
    text = place(text, START, "    u64 _t = bpf_ktime_get_ns();\n", "before")
    for i, _label, anchor, where in SECTIONS:
        if text.count(anchor) == 0 and os.environ.get("SECTIONS_SKIP_MISSING"):
            continue                                   # a variant without this section
        ref = anchor.split("\n")[1 if where == "mid" else 0]
        indent = ref[:len(ref) - len(ref.lstrip())]
        text = place(text, anchor, f"{indent}prof_add({i}, &_t);\n", where)
    return text


def client_sysctls(ns: str) -> None:
    from bench.config import CLIENT_PORT_RANGE
    lo, hi = CLIENT_PORT_RANGE
    for kv in (f"net.ipv4.ip_local_port_range={lo} {hi}", "net.ipv4.tcp_tw_reuse=1"):
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", kv], check=True)


def trial(text: str, events_h: Path, plain: bool, node_netns: str, node_ip: str, client: str,
          seconds: float) -> dict:
    """One load of a source text on the lab: {rate, conns, runs: {program: (ns, count)}, vals}."""
    from bench.config import HTTP_HOST_PORT
    from bench.procfs import bpf_run_time_stats
    from bpftrace_hostport import netns as netns_mod
    from bpftrace_hostport.collect.netfilter import probe as P

    src = Path(tempfile.mkdtemp(prefix="bhp-sections-"))
    base_maps = P.MAPS
    try:
        shutil.copy(events_h, src / "events.h")
        (src / "hostport.bpf.c").write_text(text if plain else instrument(text))
        P.bpf_source_dir = lambda: src
        if not plain:
            P.MAPS = base_maps + ("prof",)
        with P.Probe(P.ProbeOptions(netns=node_netns, watch_ports=[("tcp", HTTP_HOST_PORT)])) as pr:
            ipr = netns_mod.open_iproute(node_netns)
            pr.set_local_addrs(netns_mod.local_addresses(ipr))
            ipr.close()
            pr.attach()
            stats = bpf_run_time_stats()
            stats.__enter__()
            wrk = subprocess.Popen(["ip", "netns", "exec", client, "wrk", "-t2", "-c64", f"-d{seconds:g}s",
                                    "-H", "Connection: close", f"http://{node_ip}:{HTTP_HOST_PORT}/"],
                                   stdout=subprocess.PIPE, text=True)
            while wrk.poll() is None:
                pr.consume()                         # the ring must not fill: records as in the tracer
                time.sleep(0.05)
            rate = next((ln.split()[-1] for ln in wrk.stdout.read().splitlines() if "Requests/sec" in ln), "?")
            runs = {name: _run_time(fd) for name, fd in pr.prog_fds.items()}
            stats.__exit__(None, None, None)
            created = pr.read_stats()["flows_created"]
            vals = ([0] * 64 if plain else
                    [sum(x.value for x in pr.maps["prof"].lookup(ctypes.c_uint32(i))) for i in range(64)])
    finally:
        P.MAPS = base_maps
        shutil.rmtree(src, ignore_errors=True)
    return {"rate": rate, "conns": created or 1, "runs": runs, "vals": vals}


def per_connection(t: dict) -> float:
    """ns of eBPF per connection, all programs."""
    return sum(ns for ns, _ in t["runs"].values()) / t["conns"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="wrk duration (default 4)")
    ap.add_argument("--lab-name", default=f"sect-{secrets.token_hex(2)}")
    ap.add_argument("--source", type=Path, default=ROOT / "bpf",
                    help="the folder with hostport.bpf.c (default bpf/): to measure a variant")
    ap.add_argument("--plain", action="store_true",
                    help="no section markers: only each program's run time (BPF_ENABLE_STATS) per connection")
    ap.add_argument("--variant", choices=sorted(VARIANTS),
                    help="alternate the source with this rewrite of it (bench/ebpf_variants.py), run time only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="trials of each source (alternating with --variant), medians at the end (default 1)")
    args = ap.parse_args(argv)
    os.environ["BPFTRACE_HOSTPORT_CACHE_DIR"] = "off"
    from bench.config import MANIFEST
    from bpftrace_hostport.lab import build as lab

    text = (args.source / "hostport.bpf.c").read_text()
    sources = [("source", text)]
    if args.variant:
        sources.append((args.variant, VARIANTS[args.variant](text)))
    plain = args.plain or bool(args.variant)
    st = lab.up([str(MANIFEST)], name=args.lab_name, ipv6=False)
    results: dict = {name: [] for name, _ in sources}
    try:
        client = st.clients[0]["netns"]
        client_sysctls(client)
        for _ in range(max(1, args.rounds)):
            for name, src_text in sources:       # alternating: the VM's speed drifts
                t = trial(src_text, args.source / "events.h", plain, st.node_netns, st.node_ip, client, args.seconds)
                results[name].append(t)
                _print_trial(name if len(sources) > 1 else None, t, plain)
    finally:
        lab.down(args.lab_name)
    if len(sources) > 1 or args.rounds > 1:
        print("eBPF ns per connection, all programs: median (min-max) over the trials")
        for name, ts in results.items():
            v = sorted(per_connection(t) for t in ts)
            print(f"  {name:8} {statistics.median(v):8.1f} ({v[0]:.1f}-{v[-1]:.1f}), {len(v)} trials")
    return 0


def _print_trial(label, t: dict, plain: bool) -> None:
    conns = t["conns"]
    print(f"{label + ': ' if label else ''}{t['rate']} connections/s; {conns} new flows")
    for name, (ns, cnt) in t["runs"].items():
        if cnt:
            print(f"  {name}: {cnt / conns:.2f} runs per connection, {ns / cnt:.1f} ns per run, "
                  f"{ns / conns:.1f} ns per connection" + ("" if plain else " (with the markers' clock reads)"))
    if plain:
        return
    vals = t["vals"]
    print("per section (each includes one clock read):")
    print(f"{'#':>2} {'section':52} {'runs':>9} {'ns/run':>8} {'ns/conn':>8}")
    for i, label_, _a, _w in SECTIONS:
        n = vals[32 + i]
        if n:
            print(f"{i:2d} {label_:52} {n:9d} {vals[i] / n:8.1f} {vals[i] / conns:8.1f}")
    total = sum(vals[i] for i, *_ in SECTIONS)
    print(f"   {'all sections':52} {'':9} {'':8} {total / conns:8.1f}")


def _run_time(fd: int):
    """(run_time_ns, run_cnt) of one of our program fds, from /proc/self/fdinfo."""
    info = dict(line.split(":", 1) for line in open(f"/proc/self/fdinfo/{fd}").read().splitlines() if ":" in line)
    return int(info.get("run_time_ns", "0")), int(info.get("run_cnt", "0"))


if __name__ == "__main__":
    sys.exit(main())
