"""The benchmark suite at a tiny size: `python -m bench.run --quick` (one round of 1 s trials).

Checks that one run produces every metric of the JSON report, that the tracer lost no flow,
and that the bench removed everything it created. Nothing here asserts on a time or a rate:
the numbers belong in BENCHMARKS.md, not in a pass/fail.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_kernel
from tests.kernel.helpers import unique

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
TRACER_MODES = ("record", "metrics", "json")
MODES = ("baseline",) + TRACER_MODES + ("conntrack",)


def require_bench_tools():
    require_kernel()   # root, bcc, BTF, CNI plugins; with CI=true a missing one fails
    missing = [t for t in ("wrk", "iperf3", "conntrack") if not shutil.which(t)]
    if missing:
        reason = f"the benchmark needs {', '.join(missing)} (apt-get install {' '.join(missing)})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the bench smoke test cannot run: {reason}")
        pytest.skip(reason)


def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@pytest.mark.timeout(900)
def test_bench_quick(tmp_path):
    require_bench_tools()
    name = unique("bq")
    out = tmp_path / "out"
    stats_before = BPF_STATS.read_text().strip()
    # timeout: a bound on a hung run, not a measurement.
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--lab-name", name],
                       capture_output=True, text=True, timeout=800, cwd=str(ROOT))
    assert p.returncode == 0, f"python -m bench.run --quick failed:\n{p.stderr[-4000:]}"
    files = sorted(out.glob("bench-*.json"))
    assert len(files) == 1 and (out / "latest.json").exists()
    data = json.loads((out / "latest.json").read_text())
    assert "error" not in data
    meta, res = data["meta"], data["results"]

    # Cleanup: no namespace of this lab, no process of ours; kernel.bpf_stats_enabled untouched (the
    # bench turns the statistics on through a bpf(BPF_ENABLE_STATS) descriptor, not the sysctl).
    assert meta["cleanup"]["namespaces_left"] == []
    assert meta["cleanup"]["processes_left"] == []
    if os.path.isdir("/var/run/netns"):
        assert not [ns for ns in os.listdir("/var/run/netns") if ns.startswith(f"bhp-{name}-")]
    assert BPF_STATS.read_text().strip() == stats_before
    assert meta["kernel"] and meta["date"] and meta["command"]

    # 1. new connections/s, CPU per connection and 2. bulk throughput: every mode, a median; every
    # watched mode, per-round ratios to the baseline with their spread.
    for mode in MODES:
        conn, bulk = res["conn"][mode], res["bulk"][mode]
        assert number(conn["conn_s"]["median"]) and conn["conn_s"]["median"] > 0
        assert number(conn["busy_us_per_conn"]["median"]) and conn["busy_us_per_conn"]["median"] > 0
        assert number(bulk["gbit_s"]["median"]) and bulk["gbit_s"]["median"] > 0
        if mode == "baseline":
            continue
        for key in ("ratio", "cpu_ratio", "watcher_share"):
            for part in ("median", "min", "max", "iqr"):
                assert number(conn[key][part]), (mode, key, part)
        assert number(bulk["ratio"]["median"])
        assert number(res["stability"][mode]["ratio_rel_iqr"])
    kinds = {(t["kind"], t["mode"]) for t in data["trials"]}
    assert kinds == ({(k, m) for k in ("conn", "bulk") for m in MODES}
                     | {(k, m) for k in ("other", "other-bulk") for m in ("baseline", "record")}
                     | {("ebpf", s) for s in ("tracer", "floor")})

    # 2b. traffic that is not hostPort: with and without the tracer, and the tracer makes no flow of it;
    # the eBPF comparison: the tracer's programs and the floor, per packet, under every load.
    for kind in ("other", "other-bulk"):
        o = res["other"][kind]
        assert number(o["ratio"]["median"]) and o["ratio"]["median"] > 0
        assert o["tracer_flows"] == 0, f"{kind}: the tracer made flows of traffic that was never DNATed"
    for traffic in ("hostport", "other", "other-bulk"):
        e = res["ebpf"][traffic]
        for src in ("tracer", "floor"):
            assert number(e[src]["ns_per_packet"]["median"]) and e[src]["ns_per_packet"]["median"] > 0
        assert number(e["vs_floor_per_packet"]["median"])
    assert res["ebpf"]["hostport"]["tracer"]["connections"] > 0

    # 3. flows lost or unaccounted, per tracer output: the tracer against wrk and the pod's kernel.
    acc = res["accounting"]
    for mode in TRACER_MODES:
        assert acc[mode]["trials"], f"no {mode} trial was accounted"
        for t in acc[mode]["trials"]:
            for key in ("wrk_sent", "server_accepted", "tracer_flows", "tracer_answered", "unaccounted",
                        "lost_flows"):
                assert number(t[key]), (mode, key)
            assert t["wrk_sent"] > 0 and t["tracer_flows"] > 0
            if mode != "metrics":       # a final summary: the kernel's own figures
                assert number(t["lost_events"]) and number(t["kernel_flows_created"])
        assert acc[mode]["lost_flows"] == 0, f"{mode}: the tracer lost or did not account for flows: {acc[mode]}"
        assert acc[mode]["unaccounted"] == 0
    assert acc["lost_flows"] == 0
    assert number(res["conntrack_events"]["missing_new_events"])

    # 4. tracer CPU per flow, RSS (attached, peaks) and time to attached, per output.
    for mode in TRACER_MODES:
        tr = res["tracer"][mode]
        # metrics alone has no per-flow work: a 1 s trial may use less than one 10 ms CPU tick
        assert number(tr["us_per_flow"]["median"]) and tr["us_per_flow"]["median"] >= (0 if mode == "metrics" else 1e-9), mode
        for key in ("cpu_load_pct_of_core_median", "cpu_attach_s_median", "cpu_total_s_median",
                    "rss_end_of_load_mb_max", "own_peak_mb", "maxrss_wait4_mb", "startup_tree_pss_peak_mb",
                    "peak_mb", "attach_first_s"):
            assert number(tr[key]), (mode, key)
        assert number(tr["rss_at_ready_mb"]["max"]) and tr["rss_at_ready_mb"]["max"] > 0
        assert tr["peak_mb"] >= tr["rss_at_ready_mb"]["max"]

    # 5. eBPF run time per program, from the tracer's own program fds.
    progs = res["bpf_prog"]["all"]["progs"]
    pre = [v for n, v in progs.items() if "prerouting" in n]
    assert pre and pre[0]["run_cnt"] > 0 and number(pre[0]["ns_per_run"]) and number(pre[0]["ns_per_conn"])
    assert number(res["bpf_prog"]["all"]["ns_per_conn"])

    # The targets are evaluated (met or not: that is the report's business, not this test's).
    assert set(res["checks"]) == {"conn_ratio_record", "conn_ratio_metrics", "conn_ratio_json", "cpu_ratio_record",
                                  "other_ratio", "other_bulk_ratio", "ebpf_other_vs_floor",
                                  "ebpf_other_bulk_vs_floor", "user_ns_per_flow_record", "lost_flows",
                                  "rss_attached_mb", "peak_mb", "attach_warm_s", "json_beats_conntrack"}
    assert all(isinstance(c["met"], bool) for c in res["checks"].values())
