"""The load generators, from the lab's client namespace to the lab node or, routed through it,
to the lab's pods, bounded in time and in count: wrk (one connection per request) and iperf3
(one bulk stream)."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from bench.config import IPERF_PORT, WRK_SCRIPT
from bench.procs import BenchError, Procs, nsexec

WRK_RE = {
    "requests": re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b"),
    "errors": re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
    "non2xx": re.compile(r"Non-2xx or 3xx responses: (\d+)"),
    "rps": re.compile(r"Requests/sec:\s+([\d.]+)"),
}


def parse_wrk(text: str) -> dict:
    m = WRK_RE["requests"].search(text)
    r = WRK_RE["rps"].search(text)
    if not m or not r:
        raise BenchError(f"cannot read wrk's output: {text.strip()[-300:]}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    e = WRK_RE["errors"].search(text)
    errs = dict(zip(("connect", "read", "write", "timeout"), map(int, e.groups()))) if e else \
        {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    n = WRK_RE["non2xx"].search(text)
    return {"requests": int(m.group(1)), "duration_s": float(m.group(2)) * scale,
            "rps": float(r.group(1)), "socket_errors": errs,
            "non_2xx": int(n.group(1)) if n else 0}


def _run_bounded(procs: Procs, cmd, out_path: Path, duration: float, what: str,
                 stderr=subprocess.STDOUT):
    """Runs a load generator to its end (bounded: its duration + 30 s). Returns (process, rusage)."""
    with open(out_path, "wb") as out:
        p = procs.start(cmd, stdout=out, stderr=stderr)
        ru = procs.wait(p, duration + 30)
        if ru is None:
            procs.stop(p, timeout=5)
            raise BenchError(f"{what} did not finish within {duration + 30:.0f} s")
    return p, ru


def run_wrk(lab, procs: Procs, cfg, workdir: Path, tag: str, duration: float, max_requests: int,
            url: str = "", client_ns: str = "") -> dict:
    """wrk against URL (default: the node's hostPort 8000), from CLIENT_NS (default: the lab's
    hostPort client)."""
    per_thread = -(-max_requests // cfg.threads) if max_requests else 0
    cmd = nsexec(client_ns or lab.client_ns, "wrk", "-t", str(cfg.threads), "-c", str(cfg.connections),
                 "-d", f"{duration:g}s", "--timeout", "2s", "-H", "Connection: close",
                 "-s", str(WRK_SCRIPT), url or lab.url(), "--", str(per_thread))
    out_path = workdir / f"{tag}.wrk.txt"
    p, ru = _run_bounded(procs, cmd, out_path, duration, "wrk")
    text = out_path.read_text(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"wrk failed ({p.returncode}): {text.strip()[-300:]}")
    res = parse_wrk(text)
    res["sent"] = res["requests"] + sum(res["socket_errors"].values())
    res["per_thread_cap"] = per_thread
    res["capped"] = bool(per_thread) and res["requests"] >= per_thread * cfg.threads
    res["wrk_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
    return res


def run_iperf(lab, procs: Procs, workdir: Path, tag: str, duration: float, host: str = "",
              client_ns: str = "") -> dict:
    """One iperf3 stream to HOST:5201 (default: the node's hostPort), from CLIENT_NS."""
    cmd = nsexec(client_ns or lab.client_ns, "iperf3", "-c", host or lab.node_ip, "-p", str(IPERF_PORT),
                 "-t", f"{duration:g}", "-J", "--connect-timeout", "3000")
    out_path = workdir / f"{tag}.iperf3.json"
    last_err = ""
    for _attempt in range(3):       # the server may still be resetting after the previous test
        p, _ru = _run_bounded(procs, cmd, out_path, duration, "iperf3", stderr=subprocess.DEVNULL)
        try:
            data = json.loads(out_path.read_text(errors="replace"))
        except ValueError:
            data = {"error": out_path.read_text(errors="replace")[-300:]}
        if p.returncode == 0 and "error" not in data:
            end = data["end"]
            return {"bits_per_second": end["sum_received"]["bits_per_second"],
                    "gbit_s": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
                    "bytes": end["sum_received"]["bytes"],
                    "retransmits": end.get("sum_sent", {}).get("retransmits"),
                    "seconds": end["sum_received"].get("seconds"),
                    "iperf_cpu": end.get("cpu_utilization_percent")}
        last_err = str(data.get("error", ""))[:300]
        time.sleep(1.0)
    raise BenchError(f"iperf3 failed: {last_err}")
