"""One trial: start the mode's watcher, run one load, read the machine's counters around it,
stop the watcher and read what it wrote."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

from bench.load import run_iperf, run_wrk
from bench.monitors import watcher
from bench.procfs import busy_cpu_s, cpu_share, netns_snmp, proc_cpu_s, system_cpu
from bench.procs import Procs, log
from bench.pyspy import pyspy_summary

WRK_KINDS = ("conn", "burst", "profile", "other")   # kinds whose load is wrk; "bulk", "other-bulk": iperf3


def _counters(lab, kind: str) -> dict:
    """What the trial compares before and after the load."""
    return {"pod": netns_snmp(lab.http_pod.netns), "client": netns_snmp(lab.client_for(kind)),
            "cpu": system_cpu(), "t": time.monotonic(),
            "server_cpu": proc_cpu_s(lab.http_pod.server_pid) if kind in WRK_KINDS else None}


def _deltas(a: dict, b: dict) -> dict:
    tcp = lambda ns, k: b[ns].get(k, 0) - a[ns].get(k, 0)  # noqa: E731
    out = {
        "system_cpu_pct": cpu_share(a["cpu"], b["cpu"]),
        "machine_busy_cpu_s": round(busy_cpu_s(a["cpu"], b["cpu"]), 3),
        "pod_passive_opens": tcp("pod", "PassiveOpens"),
        "client_active_opens": tcp("client", "ActiveOpens"),
        "client_attempt_fails": tcp("client", "AttemptFails"),
    }
    if a["server_cpu"] is not None and b["server_cpu"] is not None:
        out["labserver_cpu_s"] = round(b["server_cpu"] - a["server_cpu"], 3)
    return out


def _start_profiler(profiler: str, pid: int, procs: Procs, workdir: Path, tag: str, duration: float):
    spy = procs.start([profiler, "record", "-p", str(pid), "-d", f"{duration + 1:g}", "-r", "200",
                       "--native", "-f", "raw", "-o", str(workdir / f"{tag}.pyspy.txt")],
                      stdout=subprocess.DEVNULL, stderr=open(workdir / f"{tag}.pyspy.log", "wb"))
    time.sleep(0.5)
    return spy


def trial(kind: str, mode: str, round_i: int, lab, procs: Procs, cfg, workdir: Path,
          duration: float, max_requests: int = 0, profiler: Optional[str] = None) -> dict:
    tag = f"r{round_i}-{kind}-{mode}"
    mon = watcher(mode, lab, procs, workdir, tag)
    res: dict = {"kind": kind, "mode": mode, "round": round_i}
    spy = None
    try:
        mon.start()
        if profiler and mon.p is not None:
            spy = _start_profiler(profiler, mon.p.pid, procs, workdir, tag, duration)
        before = _counters(lab, kind)
        mon.load_begins()
        url, host = lab.target(kind)
        if kind in WRK_KINDS:
            res["wrk"] = run_wrk(lab, procs, cfg, workdir, tag, duration, max_requests, url,
                                 client_ns=lab.client_for(kind))
        else:
            res["iperf3"] = run_iperf(lab, procs, workdir, tag, duration, host, client_ns=lab.client_for(kind))
        mon.load_ends(time.monotonic() - before["t"])
        after = _counters(lab, kind)
        res["wall_s"] = round(after["t"] - before["t"], 3)
        res.update(_deltas(before, after))
        mon.settle(res["pod_passive_opens"])
        if spy is not None:
            if procs.wait(spy, duration + 30) is None:
                procs.stop(spy)
            res["profile"] = pyspy_summary(workdir / f"{tag}.pyspy.txt")
    finally:
        if spy is not None:
            procs.stop(spy)
        mon.stop()
    res["monitor"] = mon.info
    _log(tag, res)
    return res


def _log(tag: str, res: dict) -> None:
    s = res["monitor"].get("summary")
    if "wrk" in res:
        log(f"{tag}: {res['wrk']['rps']:.0f} conn/s ({res['wrk']['requests']} requests), machine busy "
            f"{res['machine_busy_cpu_s']:.2f} CPU s" + (f", tracer flows {s['http_delivered']}" if s else ""))
    else:
        log(f"{tag}: {res['iperf3']['gbit_s']:.2f} Gbit/s" + (f", tracer flows {s['http_delivered']}" if s else ""))
