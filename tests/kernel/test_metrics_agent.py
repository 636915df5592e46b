"""Prometheus metrics scraped during real lab traffic; the agent's check findings as metrics."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpftrace_hostport.collect.metrics import EXPORTED_METRICS
from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import tracing, unique


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of one scrape."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def wait_for(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


@pytest.mark.parametrize("fmt", ["json", "none"])
def test_metrics_during_real_traffic(fmt):
    """With flow records (json) and without (--format none: the kernel counts answered flows
    and their latency per mapping, no record per flow), the same figures."""
    require_kernel()
    name = unique("met")
    lab.down(name)
    st = lab.up(name=name, scenario="hostnetwork")
    port = free_port()
    try:
        with tracing("--lab", name, "--timeout", "1", "--metrics", str(port), "--format", fmt) as t:
            sent = lab.traffic(name, to=8000, count=20, concurrency=2)
            lab.traffic(name, to=9000, count=4)
            # the loop ticks the sinks once a second with the kernel's counters
            s = wait_for(lambda: (lambda x: x if total(x, "bpftrace_hostport_misses_total",
                                                       host_port="9000") >= 4
                                  and total(x, "bpftrace_hostport_flows_total", host_port="8000") >= 20
                                  else None)(scrape(port)))
            with socket.socket() as other:       # bound to loopback only, by default
                other.settimeout(1)
                assert other.connect_ex((st.node_ip, port)) != 0 or st.node_ip.startswith("127.")
            health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
    finally:
        lab.down(name)
    assert sent["answered"] == 20 and health == 200
    assert s, "the metrics never showed the traffic"
    assert total(s, "bpftrace_hostport_flows_total", host_port="8000") == 20
    assert total(s, "bpftrace_hostport_answered_flows_total", host_port="8000") == 20
    assert total(s, "bpftrace_hostport_latency_seconds_count", host_port="8000") == 20
    assert total(s, "bpftrace_hostport_misses_total", host_port="9000", pod="hostnet-web") == 4
    assert total(s, "bpftrace_hostport_up") == 1
    assert total(s, "bpftrace_hostport_lost_events_total") == 0
    names = {n for n, _ in s}
    assert names <= {m + sfx for m in EXPORTED_METRICS for sfx in ("", "_bucket", "_sum", "_count", "_created")}
    assert t.returncode == 0


def _agent_findings(scenario: str) -> dict:
    name = unique("ag" + scenario[:3])
    lab.down(name)
    lab.up(name=name, scenario=scenario, ipv6=False)
    port = free_port()
    err = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    rec = tempfile.mkdtemp(prefix="bhp-agent-")
    proc = subprocess.Popen([sys.executable, "-m", "bpftrace_hostport", "agent", "--lab", name,
                             "--metrics", f"127.0.0.1:{port}", "--check-interval", "1", "--log-json",
                             "--record-dir", rec, "--max-size", "1MiB", "--max-files", "2"],
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        def ready():
            try:
                s = scrape(port)
            except OSError:
                return None
            return s if any(n == "bpftrace_hostport_check_findings" for n, _ in s) or \
                time.monotonic() - t0 > 8 else None
        t0 = time.monotonic()
        s = wait_for(ready, 40) or {}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        lab.down(name)
    log = open(err.name).read()
    os.unlink(err.name)
    files = {f: os.stat(os.path.join(rec, f)).st_mode for f in os.listdir(rec)}
    shutil.rmtree(rec, ignore_errors=True)
    return {"samples": s, "rc": proc.returncode, "log": log, "files": files}


def test_agent_exports_the_stale_conntrack_finding_and_not_on_a_healthy_lab():
    require_kernel()
    stale = _agent_findings("stale-udp")
    assert stale["rc"] == 0, stale["log"]
    assert total(stale["samples"], "bpftrace_hostport_check_findings", code="stale-conntrack") >= 1, stale["log"]
    assert '"event": "started"' in stale["log"] and '"event": "finding"' in stale["log"]
    assert stale["files"] and all(mode & 0o077 == 0 for mode in stale["files"].values())
    healthy = _agent_findings("basic")
    assert healthy["rc"] == 0, healthy["log"]
    assert total(healthy["samples"], "bpftrace_hostport_check_findings", code="stale-conntrack") == 0
