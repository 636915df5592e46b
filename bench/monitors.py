"""What watches the traffic in each mode, started before a load and stopped after it:
nothing (baseline), the tracer with one of its outputs, or conntrack -E.

A watcher measures itself: CPU (utime + stime, and time on a CPU from schedstat) across the
load, memory once attached, at the end of the load and at its peak, and for the tracer the
eBPF programs' run time across the load (fdinfo of its program descriptors).
"""
from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from bench import readers
from bench.config import ROOT
from bench.meta import code_digests
from bench.procfs import (perf_prog_ids, proc_cpu_s, proc_mem_kb, proc_runtime_s, prog_delta,
                          prog_fd_stats, prog_id_stats, prog_names, tree_pss_kb)
from bench.procs import BenchError, Procs, log, nsexec

TRACE_TIMEOUT_S = 5.0          # the tracer's default --timeout: unanswered flows wait this long
ATTACH_LIMIT_S = 120.0


class Watcher:
    """The baseline: nothing watching. The interface every mode implements."""

    def __init__(self, mode: str, lab, procs: Procs, workdir: Path, tag: str):
        self.mode, self.lab, self.procs, self.workdir, self.tag = mode, lab, procs, workdir, tag
        self.p = None
        self.info: dict = {"mode": mode}

    def start(self) -> None:
        pass

    def load_begins(self) -> None:
        pass

    def load_ends(self, wall_s: float) -> None:
        pass

    def settle(self, expected: int = 0) -> None:
        """After the load, before stop: let the watcher's figures catch up (expected: the
        connections the pod accepted)."""

    def stop(self) -> None:
        pass


class ProcessWatcher(Watcher):
    """A watcher process writing to a file; subclasses say how to start it and read it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.out_path = self.workdir / f"{self.tag}.out"
        self.err_path = self.workdir / f"{self.tag}.err"

    def command(self) -> list:
        raise NotImplementedError

    def wait_attached(self, t0: float) -> None:
        raise NotImplementedError

    def read_output(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        t0 = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.p = self.procs.start(self.command(), stdout=out, stderr=err, cwd=str(ROOT))
        self.wait_attached(t0)

    def err_tail(self, n: int = 400) -> str:
        return self.err_path.read_text(errors="replace").strip()[-n:]

    def load_begins(self) -> None:
        self.cpu0, self.rt0 = proc_cpu_s(self.p.pid), proc_runtime_s(self.p.pid)

    def load_ends(self, wall_s: float) -> None:
        cpu = proc_cpu_s(self.p.pid) - self.cpu0
        rt1 = proc_runtime_s(self.p.pid)
        self.info.update({
            "cpu_load_s": round(cpu, 3),
            "runtime_load_s": round(rt1 - self.rt0, 4) if None not in (rt1, self.rt0) else None,
            "cpu_load_pct_of_core": round(100.0 * cpu / wall_s, 1) if wall_s else None,
        })

    def stop(self) -> None:
        if self.p is None:
            return
        t0 = time.monotonic()
        ru = self.procs.stop(self.p, timeout=180.0)
        self.info["stop_s"] = round(time.monotonic() - t0, 3)
        self.info["exit_code"] = self.p.returncode
        if ru is not None:
            self.info["cpu_total_s"] = round(ru.ru_utime + ru.ru_stime, 3)
            # wait4 reports the largest of the process and its reaped children, not their sum
            self.info["maxrss_kb"] = int(ru.ru_maxrss)
        self.read_output()
        self.out_path.unlink(missing_ok=True)     # read: a full run would keep GBs of output


class ConntrackWatcher(ProcessWatcher):
    def command(self) -> list:
        return nsexec(self.lab.node_ns, "conntrack", "-E", "-o", "timestamp")

    def wait_attached(self, t0: float) -> None:
        time.sleep(0.5)       # no ready signal: its netlink socket is bound within a moment
        if self.p.poll() is not None:
            raise BenchError(f"conntrack -E exited: {self.err_tail(300)}")

    def read_output(self) -> None:
        self.info["conntrack"] = readers.conntrack_lines(self.out_path, self.err_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TracerWatcher(ProcessWatcher):
    """`bpftrace-hostport trace --lab NAME` with the output of its mode:
    json      --format json, stdout to a file
    record    --record FILE --format none
    metrics   --metrics 127.0.0.1:PORT --format none (scraped once the load is over)
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.ready_path = self.workdir / f"{self.tag}.ready"
        self.rec_path = self.workdir / f"{self.tag}.arrow"
        self.port: Optional[int] = None
        self.scraped: Optional[str] = None

    def start(self) -> None:
        self.info["code"] = code_digests()      # what this start compiles and runs
        super().start()

    def command(self) -> list:
        cmd = [sys.executable, "-m", "bpftrace_hostport", "trace", "--lab", self.lab.name,
               "--ready-file", str(self.ready_path)]
        if self.mode == "json":
            return cmd + ["--format", "json"]
        if self.mode == "record":
            return cmd + ["--format", "none", "--record", str(self.rec_path)]
        self.port = free_port()
        return cmd + ["--format", "none", "--metrics", f"127.0.0.1:{self.port}"]

    def _ready(self) -> bool:
        with contextlib.suppress(OSError):
            return self.ready_path.read_text().endswith("\n")
        return False

    def wait_attached(self, t0: float) -> None:
        """Until the ready file is written; meanwhile the memory of the tracer and its children
        (the compile child) together, sampled every 10 ms."""
        peak = 0
        while not self._ready():
            if self.p.poll() is not None:
                raise BenchError(f"the tracer exited ({self.p.returncode}) before it was attached: "
                                 f"{self.err_tail()}")
            if time.monotonic() - t0 > ATTACH_LIMIT_S:
                raise BenchError(f"the tracer was not attached within {ATTACH_LIMIT_S:.0f} s")
            peak = max(peak, tree_pss_kb(self.p.pid))
            time.sleep(0.01)
        mem = proc_mem_kb(self.p.pid)
        self.perf_ids = perf_prog_ids(self.p.pid)
        self.names = prog_names(set(prog_fd_stats(self.p.pid)) | set(self.perf_ids))
        self.info.update({
            # the startup line says when the programs came from the compile cache
            "compiled": "from the compile cache" not in self.err_path.read_text(errors="replace"),
            "attach_s": round(time.monotonic() - t0, 3),
            "cpu_at_ready_s": proc_cpu_s(self.p.pid),
            "startup_tree_pss_peak_kb": peak,
            "rss_at_ready_kb": mem.get("VmRSS"),
            "rss_anon_at_ready_kb": mem.get("RssAnon"),
            "rss_file_at_ready_kb": mem.get("RssFile"),
        })

    def _progs(self) -> dict:
        """Run statistics of the tracer's programs: those it holds fds of, and its tracepoint's."""
        return {**prog_fd_stats(self.p.pid), **prog_id_stats(self.perf_ids)}

    def load_begins(self) -> None:
        super().load_begins()
        self.progs0 = self._progs()
        self.vcsw0 = proc_mem_kb(self.p.pid).get("voluntary_ctxt_switches", 0)

    def load_ends(self, wall_s: float) -> None:
        super().load_ends(wall_s)
        progs1 = self._progs()
        mem = proc_mem_kb(self.p.pid)
        self.info.update({
            "rss_end_of_load_kb": mem.get("VmRSS"),
            "rss_anon_end_of_load_kb": mem.get("RssAnon"),
            "hwm_end_of_load_kb": mem.get("VmHWM"),          # the tracer's own peak so far
            # each one is a sleep in epoll_wait that a ring-buffer wakeup (or the timeout) ended
            "wakeups_during_load": mem.get("voluntary_ctxt_switches", 0) - self.vcsw0,
            "progs": prog_delta(self.progs0, progs1, self.names),
        })

    def settle(self, expected: int = 0) -> None:
        """metrics: scrape until the sink has received the `expected` flows (those the pod
        accepted) and its counters held still over a tick, at most the flow timeout + 3 s
        (a flow the ring buffer deferred is reported at the timeout)."""
        if self.mode != "metrics":
            return
        t0 = time.monotonic()
        history = []
        while time.monotonic() - t0 < TRACE_TIMEOUT_S + 3.0:
            with contextlib.suppress(OSError):
                self.scraped = readers.scrape(self.port)
                m = readers.metrics(self.scraped)
                now = time.monotonic()
                history.append((now, m["http_delivered"], m["http_counted"]))
                stable = any(now - t >= 1.1 and (d, c) == (m["http_delivered"], m["http_counted"])
                             for t, d, c in history)
                if stable and m["http_delivered"] >= expected:
                    break
            time.sleep(0.25)
        self.info["settle_s"] = round(time.monotonic() - t0, 2)
        if self.scraped is None:
            log(f"{self.tag}: no metrics scrape succeeded: {self.err_tail(200)}")

    def read_output(self) -> None:
        path = self.out_path if self.mode == "json" else self.rec_path
        self.info["summary"] = readers.tracer_output(self.mode, path, self.err_path, self.scraped)
        if self.mode == "record":
            self.info["recording_bytes"] = self.rec_path.stat().st_size
            self.rec_path.unlink()


def watcher(mode: str, lab, procs: Procs, workdir: Path, tag: str) -> Watcher:
    if mode == "baseline":
        return Watcher(mode, lab, procs, workdir, tag)
    if mode == "conntrack":
        return ConntrackWatcher(mode, lab, procs, workdir, tag)
    return TracerWatcher(mode, lab, procs, workdir, tag)
