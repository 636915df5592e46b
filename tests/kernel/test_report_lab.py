"""The incident report of a real lab capture says what the kernel did: its figures equal the
tracer's own summary and what `conntrack -E` saw, whether read from the recording or from the
JSON lines written beside it."""
import json
import signal
import subprocess
import sys

from bpftrace_hostport.lab import build as lab
from bpftrace_hostport.lab.harness import TraceRun
from tests.conftest import require_kernel
from tests.kernel.helpers import unique
from tests.kernel.test_trace import MANIFEST


def report(*args) -> dict:
    p = subprocess.run([sys.executable, "-m", "bpftrace_hostport", "report", *args, "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def by_port(rep: dict, port: int) -> dict:
    (m,) = [m for m in rep["mappings"] if m["host_port"] == port and m["pod_ip"]]
    return m


def test_report_equals_the_tracer_and_conntrack(tmp_path):
    require_kernel()
    name = unique("rep")
    lab.down(name)
    st = lab.up(name=name, manifest_text=MANIFEST, ipv6=False)     # nginx (tcp 8000) and dns (udp 5353)
    events = subprocess.Popen(["ip", "netns", "exec", st.node_netns, "conntrack", "-E", "-e", "NEW",
                               "-o", "extended"], stdout=subprocess.PIPE, text=True)
    rec = str(tmp_path / "rec.arrow")
    try:
        run = TraceRun(["--lab", name, "--format", "json", "--record", rec, "--timeout", "1"],
                       workdir=str(tmp_path)).start()
        with run:
            assert lab.traffic(name, to=8000, count=30, concurrency=3)["answered"] == 30
            assert lab.traffic(name, to=5353, proto="udp", count=6)["answered"] == 6
    finally:
        events.send_signal(signal.SIGTERM)
        out, _ = events.communicate(timeout=10)
        lab.down(name)
    summary = run.records()[-1]
    assert summary["type"] == "summary"
    new_8000 = [ln for ln in out.splitlines() if "dport=8000" in ln and "tcp" in ln]
    new_5353 = [ln for ln in out.splitlines() if "dport=5353" in ln and "udp" in ln]
    from_recording = report(rec)
    from_jsonl = report(run.out_path)
    for port, seen in ((8000, new_8000), (5353, new_5353)):
        kernel = next(m for m in summary["mappings"] if m["host_port"] == port)
        for rep in (from_recording, from_jsonl):
            m = by_port(rep, port)
            assert m["flows"] == kernel["flows"] == len(seen), (port, m["flows"], kernel["flows"], len(seen))
            assert m["answered"] == kernel["answered"] == len(seen)
            assert m["packets"] == kernel["packets"] and m["bytes"] == kernel["bytes"]
            assert m["latency_us"]["p50"] is not None and m["source_of_counts"] == "kernel"
    assert from_recording["truncated"] is False and from_recording["lost_events"] == 0
    assert {k: v for k, v in from_recording["totals"].items()} == \
        {k: v for k, v in from_jsonl["totals"].items()}
