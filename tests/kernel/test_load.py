"""The lab's highest connection rate for 60 s with every output on: memory stays flat, the
recording rotates within its bounds, every flow is reported or counted lost, nothing blocks."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import unique

DURATION = 60


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def test_sixty_seconds_at_full_rate(tmp_path):
    require_kernel()
    from bpftrace_hostport.records.reader import load
    name = unique("load")
    lab.down(name)
    st = lab.up(name=name, scenario="basic", ipv6=False)
    client = st.clients[0]["netns"]
    for setting in ("net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"):
        subprocess.run(["ip", "netns", "exec", client, "sysctl", "-qw", setting], check=True)  # the lab's own namespace
    rec = tmp_path / "rec"
    rec.mkdir()                           # a directory: rotated trace-*.arrow files inside
    ready = tmp_path / "ready"
    err = open(tmp_path / "err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bpftrace_hostport", "trace", "--lab", name,
                             "--format", "none", "--record", str(rec), "--max-size", "2MiB",
                             "--max-files", "3", "--metrics", "0", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "err").read()
            time.sleep(0.05)
        wrk = subprocess.Popen(["ip", "netns", "exec", client, "wrk", "-t2", "-c32", f"-d{DURATION}s",
                                "-H", "Connection: close", f"http://{st.node_ip}:8000/"],
                               stdout=subprocess.PIPE, text=True)
        samples = []
        for _ in range(DURATION // 5):
            time.sleep(5)
            samples.append(rss_mb(proc.pid))
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "/pandas/" not in f.read(), "the tracer loaded pandas"
        out, _ = wrk.communicate(timeout=DURATION + 30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        lab.down(name)
    assert rc == 0, open(tmp_path / "err").read()
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    files = sorted(os.listdir(rec))
    assert 1 <= len(files) <= 3, files
    assert all(os.stat(rec / f).st_mode & 0o077 == 0 for f in files)
    # Memory: flat once warmed up (bounded maps, queues, latency store and recording).
    growth = max(samples[2:]) - samples[2]
    assert growth < 12, f"RSS grew {growth:.1f} MB over the load: {samples}"
    assert stop_s < 10, f"the tracer took {stop_s:.1f} s to stop"
    # Every flow is in the recording or counted lost (the last file holds the summary).
    cap = load([str(rec / files[-1])])
    (summary,) = cap.summaries
    kernel = summary["kernel"]
    assert requests > 10 * DURATION, out
    assert summary["flows"] >= requests
    assert kernel["flows_created"] >= requests
    errors = kernel["flow_insert_errors"] + kernel["counter_full"]
    assert summary["flows_reported"] + summary["lost_events"] - errors == kernel["flows_created"]
    print(json.dumps({"requests": requests, "rss_mb": samples, "files": files,
                      "lost_events": summary["lost_events"], "stop_s": round(stop_s, 2)}))
