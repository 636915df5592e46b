"""Constants of the bench: where things are, the modes it compares, the targets it checks."""
from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
MANIFEST = BENCH_DIR / "bench-hostport.yaml"
WRK_SCRIPT = BENCH_DIR / "wrk_bounded.lua"
MARKDOWN = ROOT / "BENCHMARKS.md"
ANALYSIS_MARK = "<!-- analysis -->"

HTTP_HOST_PORT = 8000
IPERF_PORT = 5201

# The modes of every round, in the order of round 0 (later rounds rotate it). The tracer runs
# in one of three output configurations; conntrack -E is the tool people use today.
TRACER_MODES = ("record", "metrics", "json")
MODES = ("baseline",) + TRACER_MODES + ("conntrack",)
WATCHED_MODES = MODES[1:]
# Node traffic that is not hostPort: the client straight to the pods' own addresses (routed
# through the node, no DNAT). On a real node most packets are of this kind and still run the
# programs; its trials compare the node without and with the tracer.
OTHER_KINDS = ("other", "other-bulk")
OTHER_MODES = ("baseline", "record")
# The eBPF comparison: the tracer's programs and the floor (bench/ebpf_variants.py), loaded in
# the bench's own process in turn on the same lab, under each traffic, timed (BPF_ENABLE_STATS).
EBPF_TRAFFIC = ("hostport", "other", "other-bulk")
EBPF_SOURCES = ("tracer", "floor")
LABELS = {
    "baseline": "no tracer",
    "record": "trace --record FILE --format none",
    "metrics": "trace --metrics PORT --format none",
    "json": "trace --format json > file",
    "conntrack": "conntrack -E -o timestamp > file",
}

# The lab's client namespace gets a wide ephemeral port range and TIME_WAIT reuse (both are
# per-namespace sysctls of a namespace the lab created): with Linux's defaults one client
# runs out of ports after ~14k connections to one address:port within 60 s, and wrk, not the
# node, becomes the limit. connect() takes even ports first, so one client has about
# (65535 - 1024) / 2 = 32256 distinct source tuples before it reuses one.
CLIENT_PORT_RANGE = (1024, 65535)
TUPLE_BUDGET = (CLIENT_PORT_RANGE[1] - CLIENT_PORT_RANGE[0] + 1) // 2

TARGETS = {
    # conn/s median ratio to the same round's baseline: (comparison, bound)
    "conn_ratio": {"record": (">=", 0.97), "metrics": (">=", 0.99), "json": (">", 0.859)},
    # machine CPU per connection, median ratio to the same round's baseline
    "cpu_ratio": {"record": ("<=", 1.02)},
    # traffic that is not hostPort, with the tracer over without: conn/s and bulk Gbit/s
    "other_ratio": (">=", 0.995),
    # the tracer's eBPF ns per packet of that traffic over the floor's, same run
    "other_ns_per_packet_vs_floor_max": 1.2,
    "user_ns_per_flow_record_max": 1000.0,   # tracer CPU per flow with --record --format none
    "lost_flows": 0,                         # every traced mode, full rate
    "rss_attached_mb_max": 60.0,             # the tracer once attached (VmRSS)
    "peak_mb_max": 150.0,                    # the tracer with its compile child, together
    "attach_warm_s_max": 3.0,                # start to attached
}
