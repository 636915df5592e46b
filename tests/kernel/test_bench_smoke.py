"""The benchmark suite at a tiny size: `bench/run.py --quick` (one round of 1 s trials).

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
BENCH = ROOT / "bench" / "run.py"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
MODES = ("baseline", "trace", "conntrack")


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
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out), "--lab-name", name],
                       capture_output=True, text=True, timeout=800, cwd=str(ROOT))
    assert p.returncode == 0, f"bench/run.py --quick failed:\n{p.stderr[-4000:]}"
    files = sorted(out.glob("bench-*.json"))
    assert len(files) == 1 and (out / "latest.json").exists()
    data = json.loads((out / "latest.json").read_text())
    assert "error" not in data
    meta, res = data["meta"], data["results"]

    # Cleanup: no namespace of this lab, no process of ours, the stats sysctl as it was.
    assert meta["cleanup"]["namespaces_left"] == []
    assert meta["cleanup"]["processes_left"] == []
    if os.path.isdir("/var/run/netns"):
        assert not [ns for ns in os.listdir("/var/run/netns") if ns.startswith(f"bhp-{name}-")]
    assert BPF_STATS.read_text().strip() == stats_before
    assert meta["kernel"] and meta["date"] and meta["command"]

    # 1. new connections/s and 2. bulk throughput: every mode, a median and a ratio.
    for mode in MODES:
        assert number(res["conn"][mode]["median"]) and res["conn"][mode]["median"] > 0
        assert number(res["conn"][mode]["ratio"])
        assert number(res["bulk"][mode]["median_gbit_s"]) and res["bulk"][mode]["median_gbit_s"] > 0
        assert number(res["bulk"][mode]["ratio"])
    kinds = {(t["kind"], t["mode"]) for t in data["trials"]}
    assert kinds == {(k, m) for k in ("conn", "bulk") for m in MODES}

    # 3. flows lost or unaccounted: the tracer's summary against wrk and the pod's kernel.
    acc = res["accounting"]
    assert acc["trials"], "no trace trial was accounted"
    for t in acc["trials"]:
        for key in ("wrk_sent", "server_accepted", "tracer_flows", "tracer_answered", "lost_events",
                    "kernel_flows_created", "kernel_ringbuf_deferred", "unaccounted", "lost_flows"):
            assert number(t[key]), key
        assert t["wrk_sent"] > 0 and t["tracer_flows"] > 0
    assert acc["lost_flows"] == 0, f"the tracer lost or did not account for flows: {acc['trials']}"
    assert acc["lost_events"] == 0 and acc["unaccounted"] == 0
    assert number(res["conntrack_events"]["missing_new_events"])

    # 4. tracer CPU, RSS and time to attached.
    tr = res["tracer"]
    for key in ("cpu_load_s_median", "cpu_load_pct_of_core_median", "cpu_attach_s_median",
                "cpu_total_s_median", "peak_rss_mb", "rss_at_ready_mb_max", "rss_end_of_load_mb_max",
                "attach_first_s", "attach_warm_median_s"):
        assert number(tr[key]), key
    assert tr["peak_rss_mb"] > 0

    # 5. eBPF run time per program, from the tracer's own program fds.
    conn_progs = res["bpf_prog"]["conn"]
    pre = [v for n, v in conn_progs.items() if "prerouting" in n]
    assert pre and pre[0]["run_cnt"] > 0 and number(pre[0]["ns_per_run"])
    assert number(res["bpf_prog"]["conn_ns_per_connection"])

    # The targets are evaluated (met or not: that is the report's business, not this test's).
    assert set(res["checks"]) == {"conn_ratio_trace", "trace_beats_conntrack", "lost_flows",
                                  "peak_rss_mb", "attach_warm_s"}
    assert all(isinstance(c["met"], bool) for c in res["checks"].values())
