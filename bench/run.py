#!/usr/bin/env python3
"""The benchmark suite: what does tracing hostPort DNAT cost, and does it lose flows?

    sudo .venv/bin/python bench/run.py            # full run: 5 rounds, 5 s trials, BENCHMARKS.md
    sudo .venv/bin/python bench/run.py --quick    # 1 round, 1 s trials (the smoke test's size)

One run builds its own lab (bench/bench-hostport.yaml: the nginx-hostport pod with hostPorts
8000->80 and 44300->443, plus an iperf pod with hostPort 5201->5201), then alternates, round
after round and in a rotating order, three modes on the same lab and the same servers:

    baseline    nothing watching
    trace       `python -m bpftrace_hostport trace --lab NAME --format json` writing to a file
    conntrack   `ip netns exec NODE conntrack -E -o timestamp` writing to a file

and measures, for each mode:
  * new connections/s through hostPort 8000: wrk from the lab's client namespace with
    `Connection: close` (one connection per request), bounded in time and in count;
  * bulk throughput through hostPort 5201: one iperf3 stream into the iperf pod;
and, for the tracer: flows lost or unaccounted (its summary against what wrk sent and what the
pod's kernel accepted), CPU seconds, peak RSS, time to attached, and each eBPF program's run
time per invocation (kernel.bpf_stats_enabled, on for the bench only, restored at the end).

Results: medians and ratios to the same run's baseline median, raw JSON in bench/out/ (or
--out), and, for a full run, BENCHMARKS.md at the top of the tree (the text below its
"<!-- analysis -->" line is kept when the file is regenerated).

Everything happens inside the lab's network namespaces: the load generators target only the
lab node's address, and every process, namespace and sysctl the bench touches is removed or
restored in finally blocks, also on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MANIFEST = BENCH_DIR / "bench-hostport.yaml"
WRK_SCRIPT = BENCH_DIR / "wrk_bounded.lua"
MARKDOWN = ROOT / "BENCHMARKS.md"
ANALYSIS_MARK = "<!-- analysis -->"
MODES = ("baseline", "trace", "conntrack")
HTTP_HOST_PORT = 8000
IPERF_PORT = 5201
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The lab's client namespace gets a wide ephemeral port range and TIME_WAIT reuse (both are
# per-namespace sysctls of a namespace the lab created): with Linux's defaults one client
# runs out of ports after ~14k connections to one address:port within 60 s, and wrk, not the
# node, becomes the limit. connect() takes even ports first, so one client has about
# (65535 - 1024) / 2 = 32256 distinct source tuples before it reuses one.
CLIENT_PORT_RANGE = (1024, 65535)
TUPLE_BUDGET = (CLIENT_PORT_RANGE[1] - CLIENT_PORT_RANGE[0] + 1) // 2

TARGETS = {
    "conn_ratio_trace_min": 0.97,        # trace's conn/s >= 0.97 x baseline
    "trace_beats_conntrack": True,       # and better than conntrack -E's ratio
    "lost_flows": 0,
    "peak_rss_mb_max": 150.0,
    "attach_warm_s_max": 3.0,
}


class BenchError(RuntimeError):
    pass


# -- small helpers -------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:400]}")
    return p


def nsexec(ns: str, *cmd: str) -> List[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x: Optional[float], n: int = 3) -> Optional[float]:
    return None if x is None else round(float(x), n)


def proc_cpu_s(pid: int) -> Optional[float]:
    """utime + stime of a live process, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_kb(pid: int) -> Dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "voluntary_ctxt_switches"):
                out[k] = int(v.split()[0])
    return out


def system_cpu() -> List[int]:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def cpu_share(before: List[int], after: List[int]) -> Dict[str, float]:
    d = [a - b for a, b in zip(after, before)]
    total = sum(d) or 1
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: round(100.0 * v / total, 1) for n, v in zip(names, d)}


def netns_snmp(ns: str) -> Dict[str, int]:
    """Tcp counters of a namespace (/proc/net/snmp read from inside it)."""
    p = run(nsexec(ns, "cat", "/proc/net/snmp"), timeout=10)
    lines = [l.split() for l in p.stdout.splitlines() if l.startswith("Tcp:")]
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


# -- processes: every one we start is registered and ended in finally ------------------------
class Procs:
    def __init__(self) -> None:
        self.live: List[subprocess.Popen] = []

    def start(self, cmd: Sequence[str], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
              cwd: Optional[str] = None) -> subprocess.Popen:
        p = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             start_new_session=True, cwd=cwd)
        self.live.append(p)
        return p

    def wait(self, p: subprocess.Popen, timeout: float):
        """Waits for p with wait4, so its rusage (peak RSS, CPU) is ours to read. None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            except ChildProcessError:       # already reaped (by Popen.poll)
                if p.returncode is None:
                    p.returncode = -1
                self._forget(p)
                return None
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                self._forget(p)
                return ru
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def stop(self, p: subprocess.Popen, timeout: float = 10.0, sig=signal.SIGTERM):
        """Signals p's process group, waits; SIGKILL if it lingers. Returns its rusage."""
        if p.returncode is not None:
            self._forget(p)
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        ru = self.wait(p, timeout)
        if ru is None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            ru = self.wait(p, 5.0)
        return ru

    def _forget(self, p) -> None:
        with contextlib.suppress(ValueError):
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(self.live):
            with contextlib.suppress(Exception):
                self.stop(p, timeout=5.0)


# -- eBPF program statistics -----------------------------------------------------------------
def prog_fd_stats(pid: int) -> Dict[int, dict]:
    """run_time_ns / run_cnt of every BPF program the process holds an fd of (fdinfo)."""
    out: Dict[int, dict] = {}
    fddir = Path(f"/proc/{pid}/fdinfo")
    with contextlib.suppress(OSError):
        for f in fddir.iterdir():
            try:
                text = f.read_text()
            except OSError:
                continue
            if "prog_tag:" not in text or "run_cnt:" not in text:
                continue        # maps, links (a link's fdinfo names its prog_id too), files
            kv = {}
            for line in text.splitlines():
                k, _, v = line.partition(":")
                kv[k.strip()] = v.strip()
            pid_ = int(kv["prog_id"])
            out[pid_] = {"prog_type": int(kv.get("prog_type", -1)),
                         "run_time_ns": int(kv.get("run_time_ns", 0)),
                         "run_cnt": int(kv.get("run_cnt", 0))}
    return out


def prog_names(ids) -> Dict[int, str]:
    names = {}
    if shutil.which("bpftool"):
        for i in ids:
            p = run(["bpftool", "prog", "show", "id", str(i), "-j"], timeout=10, check=False)
            with contextlib.suppress(ValueError, KeyError):
                names[i] = json.loads(p.stdout)["name"]
    return names


def prog_delta(before: Dict[int, dict], after: Dict[int, dict], names: Dict[int, str]) -> Dict[str, dict]:
    out = {}
    for pid_, a in sorted(after.items()):
        b = before.get(pid_, {"run_time_ns": 0, "run_cnt": 0})
        name = names.get(pid_, f"prog{pid_}_type{a['prog_type']}")
        out[name] = {"run_time_ns": a["run_time_ns"] - b["run_time_ns"],
                     "run_cnt": a["run_cnt"] - b["run_cnt"]}
    return out


@contextlib.contextmanager
def bpf_stats_enabled():
    """kernel.bpf_stats_enabled=1 for the bench only; the old value is restored on the way out.

    It is a global sysctl, but a statistics toggle (the kernel then times each BPF program
    run to fill run_time_ns/run_cnt), not a network setting; it changes no packet's fate.
    """
    old = BPF_STATS_SYSCTL.read_text().strip()
    BPF_STATS_SYSCTL.write_text("1\n")
    try:
        yield old
    finally:
        BPF_STATS_SYSCTL.write_text(old + "\n")


# -- the lab -------------------------------------------------------------------------------
class BenchLab:
    def __init__(self, name: str, procs: Procs, workdir: Path):
        self.name = name
        self.procs = procs
        self.workdir = workdir
        self.st = None
        self.iperf_server: Optional[subprocess.Popen] = None

    def up(self) -> None:
        from bpftrace_hostport.lab import build as lab
        log(f"lab up {self.name} ({MANIFEST.name})")
        self.st = lab.up([str(MANIFEST)], name=self.name, ipv6=False)
        st = self.st
        self.node_ns = st.node_netns
        self.node_ip = st.node_ip
        self.client_ns = st.clients[0]["netns"]
        self.http_pod = next(p for p in st.pods if any(m.get("host_port") == HTTP_HOST_PORT for m in p.ports))
        self.iperf_pod = next(p for p in st.pods if any(m.get("host_port") == IPERF_PORT for m in p.ports))
        lo, hi = CLIENT_PORT_RANGE
        run(nsexec(self.client_ns, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={lo} {hi}"))
        run(nsexec(self.client_ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"))
        # The iperf pod's lab server holds containerPort 5201: iperf3 takes its place.
        if self.iperf_pod.server_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.iperf_pod.server_pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(self.iperf_pod.server_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        self.iperf_server = self.procs.start(
            nsexec(self.iperf_pod.netns, "iperf3", "-s", "-p", str(IPERF_PORT)),
            stdout=open(self.workdir / "iperf3-server.log", "wb"), stderr=subprocess.STDOUT)
        for _ in range(100):
            p = run(nsexec(self.iperf_pod.netns, "ss", "-Hltn", f"sport = :{IPERF_PORT}"), check=False)
            if p.stdout.strip():
                break
            if self.iperf_server.poll() is not None:
                raise BenchError("iperf3 -s exited at once: see iperf3-server.log")
            time.sleep(0.05)
        else:
            raise BenchError("iperf3 -s did not listen within 5 s")

    def url(self) -> str:
        return f"http://{self.node_ip}:{HTTP_HOST_PORT}/"

    def down(self) -> List[str]:
        from bpftrace_hostport.lab import build as lab
        if self.iperf_server is not None:
            self.procs.stop(self.iperf_server)
        log(f"lab down {self.name}")
        return lab.down(self.name)


# -- monitors: the thing under test in each mode -------------------------------------------------
class Monitor:
    """Nothing (baseline), the tracer, or conntrack -E; started before and stopped after a load."""

    def __init__(self, mode: str, lab: BenchLab, procs: Procs, workdir: Path, tag: str):
        self.mode, self.lab, self.procs, self.tag = mode, lab, procs, tag
        self.p: Optional[subprocess.Popen] = None
        self.out_path = workdir / f"{tag}.{'jsonl' if mode == 'trace' else 'txt'}"
        self.err_path = workdir / f"{tag}.err"
        self.ready_path = workdir / f"{tag}.ready"
        self.info: dict = {"mode": mode}

    def start(self) -> None:
        if self.mode == "baseline":
            return
        out, err = open(self.out_path, "wb"), open(self.err_path, "wb")
        t0 = time.monotonic()
        try:
            if self.mode == "trace":
                cmd = [sys.executable, "-m", "bpftrace_hostport", "trace", "--lab", self.lab.name,
                       "--format", "json", "--ready-file", str(self.ready_path)]
                self.p = self.procs.start(cmd, stdout=out, stderr=err, cwd=str(ROOT))
                deadline = t0 + 120
                while time.monotonic() < deadline:
                    with contextlib.suppress(OSError):
                        if self.ready_path.read_text().endswith("\n"):
                            break
                    if self.p.poll() is not None:
                        raise BenchError(f"the tracer exited ({self.p.returncode}) before it was attached: "
                                         f"{self.err_path.read_text(errors='replace').strip()[-400:]}")
                    time.sleep(0.01)
                else:
                    raise BenchError("the tracer was not attached within 120 s")
                self.info["attach_s"] = round(time.monotonic() - t0, 3)
                self.info["cpu_at_ready_s"] = proc_cpu_s(self.p.pid)
                mem = proc_mem_kb(self.p.pid)
                self.info["rss_at_ready_kb"] = mem.get("VmRSS")
                self.info["rss_anon_at_ready_kb"] = mem.get("RssAnon")
                self.info["rss_file_at_ready_kb"] = mem.get("RssFile")
                self.prog_ids = prog_fd_stats(self.p.pid)
                self.names = prog_names(self.prog_ids)
            else:
                cmd = nsexec(self.lab.node_ns, "conntrack", "-E", "-o", "timestamp")
                self.p = self.procs.start(cmd, stdout=out, stderr=err)
                # conntrack has no ready signal: its netlink socket is bound within a moment.
                time.sleep(0.5)
                if self.p.poll() is not None:
                    raise BenchError(f"conntrack -E exited: {self.err_path.read_text(errors='replace')[-300:]}")
        finally:
            out.close()
            err.close()

    def load_begins(self) -> None:
        if self.mode == "trace":
            self.cpu0 = proc_cpu_s(self.p.pid)
            self.progs0 = prog_fd_stats(self.p.pid)
            self.vcsw0 = proc_mem_kb(self.p.pid).get("voluntary_ctxt_switches", 0)

    def load_ends(self, wall_s: float) -> None:
        if self.mode != "trace":
            return
        cpu1 = proc_cpu_s(self.p.pid)
        progs1 = prog_fd_stats(self.p.pid)
        mem = proc_mem_kb(self.p.pid)
        self.info.update({
            "cpu_load_s": rnd(cpu1 - self.cpu0, 3),
            "cpu_load_pct_of_core": rnd(100.0 * (cpu1 - self.cpu0) / wall_s, 1) if wall_s else None,
            "rss_end_of_load_kb": mem.get("VmRSS"),
            "rss_anon_end_of_load_kb": mem.get("RssAnon"),
            # each one is a sleep in epoll_wait that a ring-buffer wakeup (or the timeout) ended
            "wakeups_during_load": mem.get("voluntary_ctxt_switches", 0) - self.vcsw0,
            "rss_file_end_of_load_kb": mem.get("RssFile"),
            "hwm_end_of_load_kb": mem.get("VmHWM"),
            "progs": prog_delta(self.progs0, progs1, self.names),
        })

    def stop(self) -> None:
        if self.p is None:
            return
        t0 = time.monotonic()
        ru = self.procs.stop(self.p, timeout=180.0)
        self.info["stop_s"] = round(time.monotonic() - t0, 3)
        self.info["exit_code"] = self.p.returncode
        if ru is not None:
            self.info["cpu_total_s"] = rnd(ru.ru_utime + ru.ru_stime, 3)
            self.info["peak_rss_kb"] = int(ru.ru_maxrss)       # lifetime peak, from wait4
        if self.mode == "trace":
            self.info["summary"] = self._trace_summary()
        else:
            self.info["conntrack"] = self._conntrack_counts()

    def _trace_summary(self) -> Optional[dict]:
        last = None
        flows_8000 = 0
        first_ts = last_ts = None
        # json.dumps or orjson spacing alike
        ts_re = re.compile(rb'"ts":\s*"([^"]+)"')
        summary_re = re.compile(rb'^\{"type":\s*"summary"')
        flow_re = re.compile(rb'"type":\s*"flow"')
        port_re = re.compile(rb'"host_port":\s*%d\b' % HTTP_HOST_PORT)
        with open(self.out_path, "rb") as f:
            for line in f:
                if summary_re.match(line):
                    last = json.loads(line)
                elif flow_re.search(line) and port_re.search(line):
                    flows_8000 += 1
                    m = ts_re.search(line)
                    if m:   # ISO 8601 UTC with a fixed width: strings compare as times
                        ts = m.group(1)
                        first_ts = ts if first_ts is None or ts < first_ts else first_ts
                        last_ts = ts if last_ts is None or ts > last_ts else last_ts
        if last is None:
            raise BenchError(f"the tracer wrote no summary: {self.err_path.read_text(errors='replace')[-400:]}")
        http = [m for m in last.get("mappings", []) if m.get("host_port") == HTTP_HOST_PORT]
        return {
            "flows": last.get("flows"),
            "lost_events": last.get("lost_events"),
            "kernel": last.get("kernel", {}),
            "http_flows": sum(m.get("flows", 0) for m in http),
            "http_answered": sum(m.get("answered", 0) for m in http),
            "http_packets": sum(m.get("packets", 0) for m in http),
            "http_flow_records": flows_8000,
            # first packet of the first flow to first packet of the last one: the span of the
            # load as the tracer saw it (wrk's own rate divides by its full -d duration)
            "http_span_s": _span_s(first_ts, last_ts),
            "duration_s": last.get("duration_s"),
        }

    def _conntrack_counts(self) -> dict:
        new = events = 0
        needle = f"dport={HTTP_HOST_PORT} ".encode()
        with open(self.out_path, "rb") as f:
            for line in f:
                events += 1
                if b"[NEW]" in line and needle in line:
                    new += 1
        enobufs = self.err_path.read_text(errors="replace").count("ENOBUFS")
        return {"events": events, "http_new_events": new, "enobufs_warnings": enobufs}


def _span_s(first: Optional[bytes], last: Optional[bytes]) -> Optional[float]:
    if not first or not last:
        return None
    parse = lambda b: dt.datetime.fromisoformat(b.decode().replace("Z", "+00:00"))  # noqa: E731
    return round((parse(last) - parse(first)).total_seconds(), 3)


# -- load generators ---------------------------------------------------------------------------
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


def run_wrk(lab: BenchLab, procs: Procs, cfg, workdir: Path, tag: str, duration: float,
            max_requests: int) -> dict:
    per_thread = -(-max_requests // cfg.threads) if max_requests else 0
    cmd = nsexec(lab.client_ns, "wrk", "-t", str(cfg.threads), "-c", str(cfg.connections),
                 "-d", f"{duration:g}s", "--timeout", "2s", "-H", "Connection: close",
                 "-s", str(WRK_SCRIPT), lab.url(), "--", str(per_thread))
    out_path = workdir / f"{tag}.wrk.txt"
    with open(out_path, "wb") as out:
        p = procs.start(cmd, stdout=out, stderr=subprocess.STDOUT)
        ru = procs.wait(p, duration + 30)
        if ru is None:
            procs.stop(p, timeout=5)
            raise BenchError(f"wrk did not finish within {duration + 30:.0f} s")
    text = out_path.read_text(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"wrk failed ({p.returncode}): {text.strip()[-300:]}")
    res = parse_wrk(text)
    res["sent"] = res["requests"] + sum(res["socket_errors"].values())
    res["per_thread_cap"] = per_thread
    res["capped"] = bool(per_thread) and res["requests"] >= per_thread * cfg.threads
    res["wrk_cpu_s"] = rnd(ru.ru_utime + ru.ru_stime, 3)
    return res


def run_iperf(lab: BenchLab, procs: Procs, workdir: Path, tag: str, duration: float) -> dict:
    cmd = nsexec(lab.client_ns, "iperf3", "-c", lab.node_ip, "-p", str(IPERF_PORT),
                 "-t", f"{duration:g}", "-J", "--connect-timeout", "3000")
    out_path = workdir / f"{tag}.iperf3.json"
    last_err = ""
    for attempt in range(3):       # the server may still be resetting after the previous test
        with open(out_path, "wb") as out:
            p = procs.start(cmd, stdout=out, stderr=subprocess.DEVNULL)
            ru = procs.wait(p, duration + 30)
            if ru is None:
                procs.stop(p, timeout=5)
                raise BenchError(f"iperf3 did not finish within {duration + 30:.0f} s")
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


# -- one trial ---------------------------------------------------------------------------------
def trial(kind: str, mode: str, rnd_i: int, lab: BenchLab, procs: Procs, cfg, workdir: Path,
          duration: float, max_requests: int = 0, profiler: Optional[str] = None) -> dict:
    tag = f"r{rnd_i}-{kind}-{mode}"
    mon = Monitor(mode, lab, procs, workdir, tag)
    res: dict = {"kind": kind, "mode": mode, "round": rnd_i}
    spy = None
    try:
        mon.start()
        if profiler and mon.p is not None:
            spy_out = workdir / f"{tag}.pyspy.txt"
            spy = procs.start([profiler, "record", "-p", str(mon.p.pid), "-d", f"{duration + 1:g}",
                               "-r", "200", "--native", "-f", "raw", "-o", str(spy_out)],
                              stdout=subprocess.DEVNULL, stderr=open(workdir / f"{tag}.pyspy.log", "wb"))
            time.sleep(0.5)
        pod0, cli0 = netns_snmp(lab.http_pod.netns), netns_snmp(lab.client_ns)
        sys0 = system_cpu()
        srv0 = proc_cpu_s(lab.http_pod.server_pid) if kind != "bulk" else None
        t0 = time.monotonic()
        mon.load_begins()
        if kind in ("conn", "burst", "profile"):
            res["wrk"] = run_wrk(lab, procs, cfg, workdir, tag, duration, max_requests)
        else:
            res["iperf3"] = run_iperf(lab, procs, workdir, tag, duration)
        wall = time.monotonic() - t0
        mon.load_ends(wall)
        sys1 = system_cpu()
        if srv0 is not None:
            res["labserver_cpu_s"] = rnd(proc_cpu_s(lab.http_pod.server_pid) - srv0, 3)
        pod1, cli1 = netns_snmp(lab.http_pod.netns), netns_snmp(lab.client_ns)
        res["wall_s"] = round(wall, 3)
        res["system_cpu_pct"] = cpu_share(sys0, sys1)
        res["pod_passive_opens"] = pod1.get("PassiveOpens", 0) - pod0.get("PassiveOpens", 0)
        res["client_active_opens"] = cli1.get("ActiveOpens", 0) - cli0.get("ActiveOpens", 0)
        res["client_attempt_fails"] = cli1.get("AttemptFails", 0) - cli0.get("AttemptFails", 0)
        if spy is not None:
            if procs.wait(spy, duration + 30) is None:
                procs.stop(spy)
            res["profile"] = pyspy_summary(workdir / f"{tag}.pyspy.txt")
    finally:
        if spy is not None:
            procs.stop(spy)
        mon.stop()
    res["monitor"] = mon.info
    if kind in ("conn", "burst", "profile"):
        log(f"{tag}: {res['wrk']['rps']:.0f} conn/s ({res['wrk']['requests']} requests)"
            + (f", tracer flows {mon.info['summary']['http_flows']}" if mode == "trace" else ""))
    else:
        log(f"{tag}: {res['iperf3']['gbit_s']:.2f} Gbit/s")
    return res


IDLE_FRAMES = {"epoll_wait", "epoll_pwait", "clock_nanosleep", "nanosleep", "select", "pselect6",
               "poll", "ppoll"}


def pyspy_summary(path: Path, top: int = 20) -> Optional[dict]:
    """py-spy's raw (collapsed) stacks -> where the tracer's busy samples go, self and inclusive.

    A sample whose innermost frame is a sleep (epoll_wait, clock_nanosleep, ...) is the tracer
    waiting for records: counted as idle and left out of the percentages. Unsymbolized native frames (0x...) are
    dropped from the stacks.
    """
    if not path.exists():
        return None
    incl: Dict[str, int] = {}
    self_: Dict[str, int] = {}
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        names = []
        for fr in stack.split(";"):
            m = re.match(r"(.+?) \((?:.*/)?([^/:]+?)(?::\d+)?\)$", fr)
            name, where = (m.group(1), m.group(2)) if m else (fr, "")
            if name.startswith("0x"):
                continue
            names.append(f"{name} ({where})" if where else name)
        if not names:
            continue
        if names[-1].split(" (")[0] in IDLE_FRAMES:
            idle += n
            continue
        for name in set(names):
            incl[name] = incl.get(name, 0) + n
        self_[names[-1]] = self_.get(names[-1], 0) + n
    busy = max(1, total - idle)
    pct = lambda d: [{"function": k, "pct": round(100.0 * v / busy, 1)}  # noqa: E731
                     for k, v in sorted(d.items(), key=lambda kv: -kv[1])]
    # Frames in every busy sample (the module, click, run_trace...) say nothing: leave them out.
    inclusive = [x for x in pct(incl) if x["pct"] < 97.0][:top]
    return {"samples": total, "idle_samples": idle, "busy_samples": total - idle,
            "self": pct(self_)[:top], "inclusive": inclusive}


# -- analysis ----------------------------------------------------------------------------------
def accounting(t: dict) -> dict:
    """Flows the tracer lost or did not account for, in one trace trial."""
    s = t["monitor"]["summary"]
    k = s.get("kernel", {})
    w = t["wrk"]
    kernel_lost = int(s.get("lost_events") or 0) + int(k.get("pending_full", 0)) + \
        int(k.get("flow_insert_errors", 0))
    # wrk counts completed requests (+ errors); connections still open when it stops are not
    # counted, so the tracer may see up to `connections` more flows than that: never fewer.
    # The pod's kernel (TcpPassiveOpens) is the other witness: every connection it accepted
    # went through the DNAT and must be one of the tracer's flows.
    unaccounted = max(0, w["sent"] - s["http_flows"], t["pod_passive_opens"] - s["http_flows"])
    return {
        "round": t["round"], "kind": t["kind"],
        "conn_per_s": w["rps"],
        "tracer_seen_conn_per_s": rnd(s["http_flows"] / s["http_span_s"], 0) if s.get("http_span_s") else None,
        "wrk_requests": w["requests"], "wrk_socket_errors": sum(w["socket_errors"].values()),
        "wrk_sent": w["sent"],
        "server_accepted": t["pod_passive_opens"],
        "client_connects": t["client_active_opens"],
        "tracer_flows": s["http_flows"], "tracer_answered": s["http_answered"],
        "tracer_flow_records": s["http_flow_records"],
        "lost_events": int(s.get("lost_events") or 0),
        "kernel_flows_created": k.get("flows_created"),
        "kernel_ringbuf_deferred": k.get("ringbuf_deferred"),
        "kernel_pending_full": k.get("pending_full"),
        "kernel_flow_insert_errors": k.get("flow_insert_errors"),
        "unaccounted_vs_wrk": max(0, w["sent"] - s["http_flows"]),
        "unaccounted_vs_server": max(0, t["pod_passive_opens"] - s["http_flows"]),
        "unaccounted": unaccounted,
        "lost_flows": kernel_lost + unaccounted,
    }


def sum_progs(trials: List[dict]) -> Dict[str, dict]:
    tot: Dict[str, dict] = {}
    for t in trials:
        for name, v in (t["monitor"].get("progs") or {}).items():
            a = tot.setdefault(name, {"run_time_ns": 0, "run_cnt": 0})
            a["run_time_ns"] += v["run_time_ns"]
            a["run_cnt"] += v["run_cnt"]
    for v in tot.values():
        v["ns_per_run"] = round(v["run_time_ns"] / v["run_cnt"], 1) if v["run_cnt"] else None
    return tot


def analyse(trials: List[dict], cfg) -> dict:
    by = lambda kind, mode: [t for t in trials if t["kind"] == kind and t["mode"] == mode]  # noqa: E731
    conn, bulk = {}, {}
    for mode in MODES:
        xs = [t["wrk"]["rps"] for t in by("conn", mode)]
        ts = by("conn", mode)
        conn[mode] = {"median": rnd(median(xs), 1), "min": rnd(min(xs), 1) if xs else None,
                      "max": rnd(max(xs), 1) if xs else None, "trials": xs,
                      # where the CPU went: the machine's idle share, the server and wrk (% of a core)
                      "system_idle_pct_median": rnd(median([t["system_cpu_pct"]["idle"] for t in ts]), 1),
                      "system_softirq_pct_median": rnd(median([t["system_cpu_pct"]["softirq"] for t in ts]), 1),
                      "labserver_cpu_pct_median": rnd(median([100 * t["labserver_cpu_s"] / t["wall_s"] for t in ts]), 1),
                      "wrk_cpu_pct_median": rnd(median([100 * t["wrk"]["wrk_cpu_s"] / t["wall_s"] for t in ts]), 1),
                      "watcher_cpu_pct_median": rnd(median([100 * (t["monitor"].get("cpu_total_s") or 0) / t["wall_s"]
                                                            for t in ts]), 1) if mode == "conntrack" else None}
        gs = [t["iperf3"]["gbit_s"] for t in by("bulk", mode)]
        bulk[mode] = {"median_gbit_s": rnd(median(gs), 3), "min": min(gs) if gs else None,
                      "max": max(gs) if gs else None, "trials": gs}
    for d, key in ((conn, "median"), (bulk, "median_gbit_s")):
        base = d["baseline"][key]
        for mode in MODES:
            d[mode]["ratio"] = rnd(d[mode][key] / base, 3) if base and d[mode][key] is not None else None

    trace_conn = by("conn", "trace")
    acc = [accounting(t) for t in trace_conn]
    burst = [accounting(t) for t in by("burst", "trace")]
    ct = [{"round": t["round"], "wrk_sent": t["wrk"]["sent"],
           "new_events": t["monitor"]["conntrack"]["http_new_events"],
           "events": t["monitor"]["conntrack"]["events"],
           "enobufs_warnings": t["monitor"]["conntrack"]["enobufs_warnings"],
           "missing_new_events": max(0, t["wrk"]["sent"] - t["monitor"]["conntrack"]["http_new_events"])}
          for t in by("conn", "conntrack")]

    traces = [t for t in trials if t["mode"] == "trace"]
    attach = [t["monitor"]["attach_s"] for t in traces]
    mi = [t["monitor"] for t in trace_conn]
    tracer = {
        "attach_first_s": attach[0] if attach else None,
        "attach_warm_median_s": rnd(median(attach[1:]), 3) if len(attach) > 1 else None,
        "attach_warm_max_s": max(attach[1:]) if len(attach) > 1 else None,
        "attach_all_s": attach,
        "cpu_load_s_median": rnd(median([m["cpu_load_s"] for m in mi]), 3),
        "cpu_load_pct_of_core_median": rnd(median([m["cpu_load_pct_of_core"] for m in mi]), 1),
        "cpu_per_1k_flows_ms_median": rnd(median([1000.0 * m["cpu_load_s"] / max(1, a["tracer_flows"]) * 1000
                                                 for m, a in zip(mi, acc)]), 2),
        "wakeups_per_1k_flows_median": rnd(median([1000.0 * m["wakeups_during_load"] / max(1, a["tracer_flows"])
                                                  for m, a in zip(mi, acc)]), 0),
        "cpu_attach_s_median": rnd(median([m["cpu_at_ready_s"] for m in mi]), 3),
        "cpu_total_s_median": rnd(median([m.get("cpu_total_s") for m in mi]), 3),
        "stop_s_median": rnd(median([m.get("stop_s") for m in mi]), 3),
        "rss_at_ready_mb_max": rnd(max((m["rss_at_ready_kb"] or 0) for m in mi) / 1024, 1) if mi else None,
        "rss_end_of_load_mb_max": rnd(max((m["rss_end_of_load_kb"] or 0) for m in mi) / 1024, 1) if mi else None,
        "rss_anon_at_ready_mb_max": rnd(max((m.get("rss_anon_at_ready_kb") or 0) for m in mi) / 1024, 1) if mi else None,
        "rss_file_at_ready_mb_max": rnd(max((m.get("rss_file_at_ready_kb") or 0) for m in mi) / 1024, 1) if mi else None,
        "rss_anon_end_of_load_mb_max": rnd(max((m.get("rss_anon_end_of_load_kb") or 0) for m in mi) / 1024, 1) if mi else None,
        "peak_rss_mb": rnd(max(t["monitor"].get("peak_rss_kb", 0) for t in traces) / 1024, 1) if traces else None,
        "rss_growth_kb_per_1k_flows_median": rnd(median([
            1000.0 * ((m.get("rss_anon_end_of_load_kb") or 0) - (m.get("rss_anon_at_ready_kb") or 0)) / a["tracer_flows"]
            for m, a in zip(mi, acc) if a["tracer_flows"]]), 0),
        "bulk_cpu_load_pct_of_core_median": rnd(median([t["monitor"]["cpu_load_pct_of_core"]
                                                       for t in by("bulk", "trace")]), 1),
    }
    conns = sum(a["server_accepted"] for a in acc) or 1
    progs_conn = sum_progs(trace_conn)
    progs_bulk = sum_progs(by("bulk", "trace"))
    bulk_pkts = sum(v["run_cnt"] for n, v in progs_bulk.items() if "prerouting" in n) or None
    bpf = {
        "conn": progs_conn,
        "conn_ns_per_connection": rnd(sum(v["run_time_ns"] for v in progs_conn.values()) / conns, 1),
        "bulk": progs_bulk,
        "bulk_bytes": sum(t["iperf3"]["bytes"] for t in by("bulk", "trace")),
        "bulk_prerouting_runs": bulk_pkts,
    }
    lost_total = sum(a["lost_flows"] for a in acc)
    conn_trace_ratio = conn["trace"]["ratio"]
    checks = {
        "conn_ratio_trace": {"value": conn_trace_ratio, "target": f">= {TARGETS['conn_ratio_trace_min']}",
                             "met": conn_trace_ratio is not None and conn_trace_ratio >= TARGETS["conn_ratio_trace_min"]},
        "trace_beats_conntrack": {"value": [conn_trace_ratio, conn["conntrack"]["ratio"]],
                                  "target": "trace ratio > conntrack -E ratio",
                                  "met": None not in (conn_trace_ratio, conn["conntrack"]["ratio"]) and
                                  conn_trace_ratio > conn["conntrack"]["ratio"]},
        "lost_flows": {"value": lost_total, "target": "0", "met": lost_total == 0},
        "peak_rss_mb": {"value": tracer["peak_rss_mb"], "target": f"<= {TARGETS['peak_rss_mb_max']:g}",
                        "met": tracer["peak_rss_mb"] is not None and tracer["peak_rss_mb"] <= TARGETS["peak_rss_mb_max"]},
        "attach_warm_s": {"value": tracer["attach_warm_median_s"], "target": f"<= {TARGETS['attach_warm_s_max']:g}",
                          "met": tracer["attach_warm_median_s"] is not None and
                          tracer["attach_warm_max_s"] <= TARGETS["attach_warm_s_max"]},
    }
    return {
        "conn": conn, "bulk": bulk,
        "accounting": {
            "trials": acc,
            "lost_flows": lost_total,
            "lost_flows_max_trial": max((a["lost_flows"] for a in acc), default=None),
            "wrk_sent": sum(a["wrk_sent"] for a in acc),
            "tracer_flows": sum(a["tracer_flows"] for a in acc),
            "server_accepted": sum(a["server_accepted"] for a in acc),
            "lost_events": sum(a["lost_events"] for a in acc),
            "kernel_ringbuf_deferred": sum(int(a["kernel_ringbuf_deferred"] or 0) for a in acc),
            "unaccounted": sum(a["unaccounted"] for a in acc),
            "unaccounted_vs_wrk": sum(a["unaccounted_vs_wrk"] for a in acc),
            "unaccounted_vs_server": sum(a["unaccounted_vs_server"] for a in acc),
            "tuple_budget": TUPLE_BUDGET,
            "burst_trials": burst,
            "burst_lost_flows": sum(a["lost_flows"] for a in burst) if burst else None,
        },
        "conntrack_events": {"trials": ct,
                             "missing_new_events": sum(c["missing_new_events"] for c in ct),
                             "wrk_sent": sum(c["wrk_sent"] for c in ct)},
        "tracer": tracer,
        "bpf_prog": bpf,
        "checks": checks,
    }


# -- markdown ----------------------------------------------------------------------------------
def _f(x, nd=2, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    return f"{x:,}{unit}"


def markdown(res: dict) -> str:
    m, a = res["meta"], res["results"]
    c, b, acc, tr, bpf, ck = a["conn"], a["bulk"], a["accounting"], a["tracer"], a["bpf_prog"], a["checks"]
    ok = lambda v: "met" if v else "**missed**"  # noqa: E731
    L = []
    L.append("# Benchmarks")
    L.append("")
    L.append(f"Generated by `{m['command']}` on {m['date']} (kernel {m['kernel']}, {m['cpus']} CPUs, "
             f"{m['cpu_model']}); raw JSON: `{m['json']}` (bench/out/ is gitignored).")
    L.append("")
    src0, src1 = m.get("source_at_start", {}), m.get("source_at_end", {})
    mod = sorted(set(src0.get("modified", [])) | set(src1.get("modified", [])))
    L.append(f"Code under test: commit `{src0.get('commit')}`"
             + (f" (at the end: `{src1.get('commit')}`)" if src1.get("commit") != src0.get("commit") else "")
             + (f", with uncommitted changes to {', '.join(f'`{x}`' for x in mod)}." if mod
                else ", no uncommitted change to bpf/ or bpftrace_hostport/."))
    L.append("")
    L.append(f"Lab `{m['lab']['name']}` from `bench/bench-hostport.yaml`; {m['rounds']} rounds, each running "
             f"baseline / trace / conntrack -E in a rotating order; conn/s trials of {m['duration_s']:g} s "
             f"(`wrk -t{m['wrk']['threads']} -c{m['wrk']['connections']} -H 'Connection: close'`, capped at "
             f"{m['wrk']['max_requests']:,} requests), bulk trials of {m['iperf_duration_s']:g} s (one iperf3 stream "
             f"through hostPort {IPERF_PORT}). Medians; ratios are to the same run's baseline median.")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | value | result |")
    L.append("|---|---|---|")
    L.append(f"| conn/s with trace >= 0.97 x baseline | {_f(ck['conn_ratio_trace']['value'], 3)} | {ok(ck['conn_ratio_trace']['met'])} |")
    L.append(f"| trace's ratio better than conntrack -E's | {_f(c['trace']['ratio'], 3)} vs {_f(c['conntrack']['ratio'], 3)} | {ok(ck['trace_beats_conntrack']['met'])} |")
    L.append(f"| zero lost or unaccounted flows at the highest rate | {_f(acc['lost_flows'])} of {_f(acc['wrk_sent'])} sent | {ok(ck['lost_flows']['met'])} |")
    L.append(f"| tracer peak RSS <= 150 MB | {_f(tr['peak_rss_mb'], 1, ' MB')} | {ok(ck['peak_rss_mb']['met'])} |")
    L.append(f"| attached <= 3 s (warm) | {_f(tr['attach_warm_median_s'], 2, ' s')} median, {_f(tr['attach_warm_max_s'], 2, ' s')} max | {ok(ck['attach_warm_s']['met'])} |")
    L.append("")
    L.append("## New connections per second through hostPort 8000")
    L.append("")
    L.append("| mode | median conn/s | min | max | ratio |")
    L.append("|---|---:|---:|---:|---:|")
    for mode, label in (("baseline", "no tracer"), ("trace", "trace --format json > file"),
                        ("conntrack", "conntrack -E -o timestamp > file")):
        L.append(f"| {label} | {_f(c[mode]['median'], 0)} | {_f(c[mode]['min'], 0)} | {_f(c[mode]['max'], 0)} | {_f(c[mode]['ratio'], 3)} |")
    L.append("")
    L.append("Where the CPU went during the conn/s trials (medians; % of one core, the machine has "
             f"{m['cpus']}): ")
    L.append("")
    L.append("| mode | machine idle % | softirq % of machine | lab server | wrk | watcher |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        w = tr["cpu_load_pct_of_core_median"] if mode == "trace" else c[mode]["watcher_cpu_pct_median"]
        L.append(f"| {mode} | {_f(c[mode]['system_idle_pct_median'], 1)} | {_f(c[mode]['system_softirq_pct_median'], 1)} | "
                 f"{_f(c[mode]['labserver_cpu_pct_median'], 1)} | {_f(c[mode]['wrk_cpu_pct_median'], 1)} | {_f(w, 1)} |")
    L.append("")
    L.append("## Bulk throughput through hostPort 5201 (iperf3, one stream)")
    L.append("")
    L.append("| mode | median Gbit/s | min | max | ratio |")
    L.append("|---|---:|---:|---:|---:|")
    for mode, label in (("baseline", "no tracer"), ("trace", "trace"), ("conntrack", "conntrack -E")):
        L.append(f"| {label} | {_f(b[mode]['median_gbit_s'], 2)} | {_f(b[mode]['min'], 2)} | {_f(b[mode]['max'], 2)} | {_f(b[mode]['ratio'], 3)} |")
    L.append("")
    L.append("## Flows lost or unaccounted (trace trials of the conn/s test, full rate)")
    L.append("")
    L.append("| round | conn/s | wrk sent | server accepted | tracer flows | answered | lost_events | ringbuf deferred | unaccounted |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in acc["trials"]:
        L.append(f"| {t['round']} | {_f(t['conn_per_s'], 0)} | {_f(t['wrk_sent'])} | {_f(t['server_accepted'])} | "
                 f"{_f(t['tracer_flows'])} | {_f(t['tracer_answered'])} | {_f(t['lost_events'])} | "
                 f"{_f(t['kernel_ringbuf_deferred'])} | {_f(t['unaccounted'])} |")
    if acc["burst_trials"]:
        L.append("")
        L.append(f"Burst trials (same full rate, capped below the client's {TUPLE_BUDGET:,} distinct source "
                 f"tuples so no tuple is reused within a trace): lost or unaccounted "
                 f"{_f(acc['burst_lost_flows'])} of {_f(sum(t['wrk_sent'] for t in acc['burst_trials']))} sent.")
        L.append("")
        L.append("| round | conn/s (flows / their time span) | wrk sent | server accepted | tracer flows | lost_events | unaccounted |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for t in acc["burst_trials"]:
            L.append(f"| {t['round']} | {_f(t['tracer_seen_conn_per_s'], 0)} | {_f(t['wrk_sent'])} | {_f(t['server_accepted'])} | "
                     f"{_f(t['tracer_flows'])} | {_f(t['lost_events'])} | {_f(t['unaccounted'])} |")
    ce = a["conntrack_events"]
    L.append("")
    L.append(f"For comparison, conntrack -E printed no [NEW] event for {_f(ce['missing_new_events'])} of "
             f"{_f(ce['wrk_sent'])} connections (ENOBUFS).")
    L.append("")
    L.append("## Tracer resources (conn/s trials)")
    L.append("")
    L.append("| metric | value |")
    L.append("|---|---:|")
    L.append(f"| CPU during the load (median per trial) | {_f(tr['cpu_load_s_median'], 2, ' s')} = {_f(tr['cpu_load_pct_of_core_median'], 1)} % of one core |")
    L.append(f"| CPU per 1000 flows | {_f(tr['cpu_per_1k_flows_ms_median'], 1, ' ms')} |")
    L.append(f"| tracer wake-ups (voluntary context switches) per 1000 flows | {_f(tr['wakeups_per_1k_flows_median'], 0)} |")
    L.append(f"| CPU to compile and attach | {_f(tr['cpu_attach_s_median'], 2, ' s')} |")
    L.append(f"| CPU over the tracer's life (compile, load, final summary) | {_f(tr['cpu_total_s_median'], 2, ' s')} |")
    L.append(f"| time from SIGTERM to exit (drain + summary) | {_f(tr['stop_s_median'], 2, ' s')} |")
    L.append(f"| RSS once attached (anonymous / file-backed) | {_f(tr['rss_at_ready_mb_max'], 1, ' MB')} "
             f"({_f(tr['rss_anon_at_ready_mb_max'], 1)} / {_f(tr['rss_file_at_ready_mb_max'], 1)}) |")
    L.append(f"| RSS at the end of the load | {_f(tr['rss_end_of_load_mb_max'], 1, ' MB')} |")
    L.append(f"| anonymous RSS growth per 1000 flows during the load | {_f(tr['rss_growth_kb_per_1k_flows_median'], 0, ' KB')} |")
    L.append(f"| peak RSS over its life (wait4 ru_maxrss) | {_f(tr['peak_rss_mb'], 1, ' MB')} |")
    L.append(f"| start to attached, first start of the run (bcc compiles at every start) | {_f(tr['attach_first_s'], 2, ' s')} |")
    L.append(f"| start to attached, later starts (median / max) | {_f(tr['attach_warm_median_s'], 2, ' s')} / {_f(tr['attach_warm_max_s'], 2, ' s')} |")
    L.append(f"| CPU during bulk trials | {_f(tr['bulk_cpu_load_pct_of_core_median'], 1)} % of one core |")
    L.append("")
    L.append("## eBPF program run time (kernel.bpf_stats_enabled)")
    L.append("")
    L.append("| program | conn/s runs | ns per run | bulk runs | ns per run |")
    L.append("|---|---:|---:|---:|---:|")
    for name in sorted(set(bpf["conn"]) | set(bpf["bulk"])):
        cv, bv = bpf["conn"].get(name, {}), bpf["bulk"].get(name, {})
        L.append(f"| {name} | {_f(cv.get('run_cnt'))} | {_f(cv.get('ns_per_run'), 1)} | "
                 f"{_f(bv.get('run_cnt'))} | {_f(bv.get('ns_per_run'), 1)} |")
    L.append("")
    L.append(f"All programs together: {_f(bpf['conn_ns_per_connection'], 0)} ns of eBPF per connection in the "
             "conn/s trials. One run is one packet at one hook (prerouting and postrouting see both directions); "
             "tp_kfree_skb runs for every freed skb with a drop reason on the machine.")
    L.append("")
    prof = a.get("profile")
    if prof and prof.get("samples"):
        L.append("## Where the tracer's CPU goes (py-spy --native, one extra trial, not in the medians)")
        L.append("")
        L.append(f"{prof['busy_samples']:,} busy samples (and {prof['idle_samples']:,} asleep) at "
                 f"{_f(prof['conn_per_s'], 0)} conn/s; py-spy stops the tracer 200 times a second, so this trial "
                 "runs slower than the others. Shares of the busy samples:")
        L.append("")
        L.append("| function | inclusive % | | function (self) | self % |")
        L.append("|---|---:|---|---|---:|")
        for i in range(min(15, max(len(prof["inclusive"]), len(prof["self"])))):
            inc = prof["inclusive"][i] if i < len(prof["inclusive"]) else {"function": "", "pct": None}
            slf = prof["self"][i] if i < len(prof["self"]) else {"function": "", "pct": None}
            L.append(f"| `{inc['function']}` | {_f(inc['pct'], 1)} | | `{slf['function']}` | {_f(slf['pct'], 1)} |")
        L.append("")
    L.append("## Method")
    L.append("")
    L.append("* Each trial starts the mode's watcher, waits until it is attached (the tracer's ready file; "
             "0.5 s for conntrack -E), runs the load, then stops the watcher with SIGTERM and reads its output. "
             "The same lab, lab server and iperf3 server serve every mode.")
    L.append(f"* The lab's client namespace uses ports {CLIENT_PORT_RANGE[0]}-{CLIENT_PORT_RANGE[1]} and "
             "tcp_tw_reuse=1 (sysctls of that namespace only), or wrk would run out of source ports.")
    L.append("* wrk sent = completed requests + socket errors; server accepted = TcpPassiveOpens in the pod's "
             "namespace. Unaccounted = the larger of (wrk sent - the tracer's flows for hostPort 8000) and "
             "(server accepted - those flows), never negative (wrk does not count the connections still open "
             "when it stops; the tracer also counts SYNs that never completed). Lost = lost_events + pending_full + "
             "flow_insert_errors + unaccounted.")
    L.append("* Tracer CPU = utime + stime from /proc/<pid>/stat across the load; peak RSS from wait4; "
             "eBPF run time from run_time_ns/run_cnt in /proc/<tracer>/fdinfo of its program fds, names from "
             "`bpftool prog show`.")
    L.append("* The machine is shared: other work on it shows up as noise, which the alternating order and "
             "medians spread over all modes.")
    L.append("")
    return "\n".join(L)


def write_markdown(path: Path, text: str) -> None:
    tail = ""
    if path.exists():
        old = path.read_text()
        if ANALYSIS_MARK in old:
            tail = old[old.index(ANALYSIS_MARK):]
    if not tail:
        tail = ANALYSIS_MARK + "\n## Analysis\n\n(Written by hand after a run; bench/run.py keeps this part.)\n"
    path.write_text(text + "\n" + tail)


def source_state() -> dict:
    """The commit under test and the tracer's files modified in the working tree (read-only git)."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    out = {"commit": None, "modified": []}
    with contextlib.suppress(Exception):
        out["commit"] = run(git + ["rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
        st = run(git + ["status", "--porcelain", "--", "bpf", "bpftrace_hostport"], timeout=10).stdout
        out["modified"] = sorted(line[3:] for line in st.splitlines() if line.strip())
    return out


# -- main --------------------------------------------------------------------------------------
def _sigterm(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="bpftrace-hostport benchmarks (see BENCHMARKS.md)")
    ap.add_argument("--quick", action="store_true", help="one round of 1 s trials (smoke-test size)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per conn/s trial (default 5, quick 1)")
    ap.add_argument("--iperf-duration", type=float, help="seconds per bulk trial (default 5, quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--max-rate", type=int, default=60000,
                    help="count bound of a conn/s trial, per second of its duration (default 60000)")
    ap.add_argument("--no-burst", action="store_true", help="skip the burst (no tuple reuse) trials")
    ap.add_argument("--py-spy", action="store_true", help="add one extra trace trial (not in the medians) "
                    "with py-spy attached to the tracer, and report where its CPU goes")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="directory for the JSON (default bench/out)")
    ap.add_argument("--markdown", type=Path, help="write the markdown report here "
                    "(default: BENCHMARKS.md for a full run, none with --quick)")
    ap.add_argument("--lab-name", help="lab name (default bench-<random>)")
    args = ap.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (1.0 if args.quick else 5.0)
    iperf_duration = args.iperf_duration or (1.0 if args.quick else 5.0)
    max_requests = int(args.max_rate * duration)
    if args.quick:
        # A quick run stays below one client's distinct source tuples (TUPLE_BUDGET): no tuple
        # is reused inside one trace, so the smoke test's accounting does not depend on how the
        # tracer handles reuse; the full run's sustained trials go well past it.
        max_requests = min(max_requests, int(TUPLE_BUDGET * 0.75))
    burst_requests = int(TUPLE_BUDGET * 0.75)
    settle = 0.3 if args.quick else 1.0
    md_path = args.markdown if args.markdown else (None if args.quick else MARKDOWN)

    if os.geteuid() != 0:
        print("bench/run.py needs root (network namespaces, eBPF): run it with sudo.", file=sys.stderr)
        return 2
    missing = [t for t in ("wrk", "iperf3", "conntrack", "ip") if not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install {' '.join(missing)})", file=sys.stderr)
        return 2

    name = args.lab_name or f"bench-{secrets.token_hex(2)}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bhp-bench-"))
    procs = Procs()
    lab = BenchLab(name, procs, workdir)
    trials: List[dict] = []
    result: dict = {}
    error = None
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    cmd_line = "sudo .venv/bin/python bench/run.py" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu_model": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                           if l.startswith("model name")), "?"),
        "command": cmd_line, "quick": args.quick, "rounds": rounds,
        "duration_s": duration, "iperf_duration_s": iperf_duration,
        "wrk": {"threads": args.threads, "connections": args.connections, "max_requests": max_requests,
                "burst_requests": burst_requests},
        "lab": {"name": name, "manifest": str(MANIFEST.relative_to(ROOT)),
                "client_port_range": list(CLIENT_PORT_RANGE), "tuple_budget": TUPLE_BUDGET},
        "targets": TARGETS, "python": sys.version.split()[0], "workdir": str(workdir),
        "source_at_start": source_state(),
    }
    try:
        with bpf_stats_enabled() as old_stats:
            meta["bpf_stats_enabled_before"] = old_stats
            lab.up()
            meta["lab"].update({"node_netns": lab.node_ns, "node_ip": lab.node_ip,
                                "client_netns": lab.client_ns, "http_pod_netns": lab.http_pod.netns,
                                "iperf_pod_netns": lab.iperf_pod.netns})
            # Warm-up (not recorded): caches, the server's first connections, the ARP entries.
            run_wrk(lab, procs, args, workdir, "warmup", 1.0, int(args.max_rate))
            run_iperf(lab, procs, workdir, "warmup", 1.0)
            for r in range(rounds):
                order = MODES[r % 3:] + MODES[:r % 3]
                log(f"round {r + 1}/{rounds}: {' -> '.join(order)}")
                for kind in ("conn", "bulk"):
                    for mode in order:
                        time.sleep(settle)
                        trials.append(trial(kind, mode, r, lab, procs, args, workdir,
                                            duration if kind == "conn" else iperf_duration, max_requests))
                if not args.quick and not args.no_burst:
                    time.sleep(settle)
                    trials.append(trial("burst", "trace", r, lab, procs, args, workdir, duration, burst_requests))
            if args.py_spy:
                spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                if os.access(spy, os.X_OK):
                    time.sleep(settle)
                    trials.append(trial("profile", "trace", rounds, lab, procs, args, workdir, duration,
                                        max_requests, profiler=spy))
                else:
                    log("py-spy not found (pip install py-spy): no profile")
            result = analyse(trials, args)
            prof = [t for t in trials if t["kind"] == "profile"]
            result["profile"] = ({"conn_per_s": prof[0]["wrk"]["rps"], **(prof[0].get("profile") or {})}
                                 if prof else None)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:   # recorded in the JSON, then re-raised below
        error = f"{type(e).__name__}: {e}"
    finally:
        procs.stop_all()
        removed = []
        with contextlib.suppress(Exception):
            removed = lab.down()
        signal.signal(signal.SIGTERM, old_term)
        leftovers = [ns for ns in os.listdir("/var/run/netns") if ns.startswith(f"bhp-{name}-")] \
            if os.path.isdir("/var/run/netns") else []
        meta["source_at_end"] = source_state()
        meta["cleanup"] = {"namespaces_removed": removed, "namespaces_left": leftovers,
                           "processes_left": [p.pid for p in procs.live if p.poll() is None],
                           "bpf_stats_enabled_after": BPF_STATS_SYSCTL.read_text().strip()}
        shutil.rmtree(workdir, ignore_errors=True)

    out = {"meta": meta, "results": result, "trials": trials}
    if error:
        out["error"] = error
    json_path = args.out / f"bench-{stamp}.json"
    meta["json"] = str(json_path.relative_to(ROOT)) if json_path.resolve().is_relative_to(ROOT) else str(json_path)
    text = json.dumps(out, indent=1, default=str)
    json_path.write_text(text)
    (args.out / "latest.json").write_text(text)
    log(f"wrote {json_path}")
    if error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    if md_path:
        write_markdown(md_path, markdown(out))
        log(f"wrote {md_path}")
    for k, v in result["checks"].items():
        log(f"{k}: {v['value']} (target {v['target']}): {'met' if v['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
