"""Where the eBPF time of a connection goes: the kernel programs, instrumented section by
section, under the bench's load.

    sudo .venv/bin/python -m bench.ebpf_sections [--seconds S] [--lab-name NAME]
    sudo .venv/bin/python -m bench.ebpf_sections --variant floor --rounds 3
    sudo .venv/bin/python -m bench.ebpf_sections --variant floor --traffic other --rounds 3

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
--traffic other loads the node with traffic that is not hostPort (wrk to the pod's own address,
routed through the node without DNAT; other-bulk: one iperf3 stream): the cost per packet of
what most packets on a real node are. bench/run.py uses trial() for its eBPF comparison.
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
     "        if (count_known_in(cs, ctkey, len)) {\n            return 1;\n        }\n        /* or of a connection", "mid"),
    (17, "not ours: the ignored ways of the same line (not hostPort traffic)",
     "        if (ign_has(cs, ctkey)) {\n            return 1;\n        }\n    }\n\n    /* Everything else", "mid"),
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


def load_command(traffic: str, lab, seconds: float) -> list:
    """The load of a trial, from the lab's client namespace: wrk through the node's hostPort
    (hostport), wrk to the http pod's own address (other: routed through the node, no DNAT),
    or one iperf3 stream to the iperf pod's own address (other-bulk); the last two from the
    lab's client for them (bench/lab.py says why)."""
    ns = lab.client_for(traffic)
    if traffic == "other-bulk":
        from bench.config import IPERF_PORT
        return ["ip", "netns", "exec", ns, "iperf3", "-c", lab.iperf_pod.ips[0], "-p", str(IPERF_PORT),
                "-t", f"{seconds:g}", "--connect-timeout", "3000"]
    url = lab.pod_url() if traffic == "other" else lab.url()
    return ["ip", "netns", "exec", ns, "wrk", "-t2", "-c64", f"-d{seconds:g}s",
            "-H", "Connection: close", url]


def _ip_in_receives(ns: str) -> int:
    """Packets the node took in (Ip InReceives): every packet of traffic routed through it."""
    from bench.procfs import netns_snmp
    return netns_snmp(ns, "Ip").get("InReceives", 0)


def trial(text: str, events_h: Path, plain: bool, lab, seconds: float, traffic: str = "hostport",
          flow_table: int = 0) -> dict:
    """One load of a source text on the lab: {rate, conns, packets, runs: {program: (ns, count)},
    vals}. conns: the connections the target pod accepted; packets: those the node took in.
    flow_table: the tracer's --flow-table (0: its default), which also sizes the cache of
    conntrack entries every packet looks up: how far apart in memory its lines are."""
    from bench.config import HTTP_HOST_PORT
    from bench.procfs import bpf_run_time_stats, netns_snmp
    from bpftrace_hostport import netns as netns_mod
    from bpftrace_hostport.collect.netfilter import probe as P

    src = Path(tempfile.mkdtemp(prefix="bhp-sections-"))
    base_maps, base_dir = P.MAPS, P.bpf_source_dir
    pod_ns = lab.iperf_pod.netns if traffic == "other-bulk" else lab.http_pod.netns
    try:
        shutil.copy(events_h, src / "events.h")
        (src / "hostport.bpf.c").write_text(text if plain else instrument(text))
        P.bpf_source_dir = lambda: src
        if not plain:
            P.MAPS = base_maps + ("prof",)
        sized = {"flow_table_size": flow_table} if flow_table else {}
        with P.Probe(P.ProbeOptions(netns=lab.node_ns, watch_ports=[("tcp", HTTP_HOST_PORT)], **sized)) as pr:
            ipr = netns_mod.open_iproute(lab.node_ns)
            pr.set_local_addrs(netns_mod.local_addresses(ipr))
            ipr.close()
            pr.attach()
            with bpf_run_time_stats():
                opens0, pk0 = netns_snmp(pod_ns).get("PassiveOpens", 0), _ip_in_receives(lab.node_ns)
                load = subprocess.Popen(load_command(traffic, lab, seconds), stdout=subprocess.PIPE, text=True,
                                        stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + seconds + 30
                while load.poll() is None:
                    pr.consume()                     # the ring must not fill: records as in the tracer
                    if time.monotonic() > deadline:
                        load.kill()
                        raise SystemExit(f"bench.ebpf_sections: the {traffic} load did not end in time")
                    time.sleep(0.05)
                out = load.stdout.read()
                runs = {name: _run_time(fd) for name, fd in pr.prog_fds.items()}
                opens1, pk1 = netns_snmp(pod_ns).get("PassiveOpens", 0), _ip_in_receives(lab.node_ns)
            if load.returncode != 0:
                raise SystemExit(f"bench.ebpf_sections: the {traffic} load failed ({load.returncode}): "
                                 f"{out.strip()[-200:]}")
            rate = next((ln.split()[-1] for ln in out.splitlines() if "Requests/sec" in ln), None)
            if traffic == "other-bulk":
                rate = next((" ".join(ln.split()[-3:-1]) for ln in reversed(out.splitlines()) if "receiver" in ln), "?")
            vals = ([0] * 64 if plain else
                    [sum(x.value for x in pr.maps["prof"].lookup(ctypes.c_uint32(i))) for i in range(64)])
    finally:
        P.MAPS, P.bpf_source_dir = base_maps, base_dir
        shutil.rmtree(src, ignore_errors=True)
    return {"traffic": traffic, "rate": rate or "?", "conns": max(1, opens1 - opens0),
            "packets": max(1, pk1 - pk0), "runs": runs, "vals": vals}


def per_connection(t: dict) -> float:
    """ns of eBPF per connection, all programs."""
    return sum(ns for ns, _ in t["runs"].values()) / t["conns"]


def per_packet(t: dict) -> float:
    """ns of eBPF per packet the node took in, all programs."""
    return sum(ns for ns, _ in t["runs"].values()) / t["packets"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="load duration (default 4)")
    ap.add_argument("--lab-name", default=f"sect-{secrets.token_hex(2)}")
    ap.add_argument("--source", type=Path, default=ROOT / "bpf",
                    help="the folder with hostport.bpf.c (default bpf/): to measure a variant")
    ap.add_argument("--plain", action="store_true",
                    help="no section markers: only each program's run time (BPF_ENABLE_STATS) per connection")
    ap.add_argument("--variant", choices=sorted(VARIANTS),
                    help="alternate the source with this rewrite of it (bench/ebpf_variants.py), run time only")
    ap.add_argument("--traffic", choices=("hostport", "other", "other-bulk"), default="hostport",
                    help="the load: wrk through hostPort 8000 (default), wrk to the pod's own address "
                         "(not hostPort: routed through the node without DNAT), or one iperf3 stream to a pod")
    ap.add_argument("--flow-table", type=int, default=0,
                    help="the tracer's --flow-table (default: its default), which sizes the conntrack cache too")
    ap.add_argument("--rounds", type=int, default=1,
                    help="trials of each source (alternating with --variant), medians at the end (default 1)")
    args = ap.parse_args(argv)
    os.environ["BPFTRACE_HOSTPORT_CACHE_DIR"] = "off"
    from bench.lab import BenchLab
    from bench.procs import Procs

    text = (args.source / "hostport.bpf.c").read_text()
    sources = [("source", text)]
    if args.variant:
        sources.append((args.variant, VARIANTS[args.variant](text)))
    plain = args.plain or bool(args.variant)
    procs, workdir = Procs(), Path(tempfile.mkdtemp(prefix="bhp-sections-lab-"))
    lab = BenchLab(args.lab_name, procs, workdir)
    results: dict = {name: [] for name, _ in sources}
    try:
        lab.up()
        for _ in range(max(1, args.rounds)):
            for name, src_text in sources:       # alternating: the VM's speed drifts
                t = trial(src_text, args.source / "events.h", plain, lab, args.seconds, args.traffic, args.flow_table)
                results[name].append(t)
                _print_trial(name if len(sources) > 1 else None, t, plain)
    finally:
        procs.stop_all()
        lab.down()
        shutil.rmtree(workdir, ignore_errors=True)
    if len(sources) > 1 or args.rounds > 1:
        print("eBPF ns per connection and per packet, all programs: median (min-max) over the trials")
        for name, ts in results.items():
            for what, fn in (("conn", per_connection), ("packet", per_packet)):
                v = sorted(fn(t) for t in ts)
                print(f"  {name:8} per {what:6} {statistics.median(v):8.1f} ({v[0]:.1f}-{v[-1]:.1f}), {len(v)} trials")
    return 0


def _print_trial(label, t: dict, plain: bool) -> None:
    conns = t["conns"]
    rate = f"{t['rate']} connections/s" if t["traffic"] != "other-bulk" else t["rate"]
    print(f"{label + ': ' if label else ''}{t['traffic']}: {rate}; {conns} connections accepted, "
          f"{t['packets']} packets into the node, {per_packet(t):.1f} ns per packet")
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
