"""Processes: every one a run starts is registered here and ended in a finally block."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:400]}")
    return p


def nsexec(ns: str, *cmd: str) -> List[str]:
    """argv running cmd in one of the bench lab's namespaces (the tool's netns.py says how)."""
    from bpftrace_hostport.netns import command_prefix
    return command_prefix(ns) + list(cmd)


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
