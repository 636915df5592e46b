"""Run the real CLI against a real lab, the way a user would."""
import os
import subprocess
import sys
from contextlib import contextmanager

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.lab.harness import TraceRun

PY = sys.executable


def cli(*args, check=True, timeout=120, env=None):
    p = subprocess.run([PY, "-m", "bpftrace_hostport", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"bpftrace-hostport {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


@contextmanager
def tracing(*args, start_timeout=60, prefix=(), python=PY, env=None):
    """Runs `trace --format json ARGS` (lab/harness.py, as the demo and the bench do) and yields a
    handle; on exit SIGTERMs it and parses what it wrote."""
    run = TraceRun(["--format", "json", *args], python=python, prefix=prefix, start_timeout=start_timeout,
                   env=env)
    try:
        run.start()
    except UserError as e:
        raise AssertionError(f"trace did not attach: {e}") from None
    handle = TraceHandle(run)
    try:
        yield handle
    finally:
        run.stop()
        handle.load()


class TraceHandle:
    def __init__(self, run):
        self.run = run
        self.proc = run.proc
        self.records = []
        self.stderr = ""

    def load(self):
        self.records = self.run.records()
        self.stderr = self.run.stderr
        self.returncode = self.run.returncode

    @property
    def flows(self):
        return [r for r in self.records if r["type"] == "flow"]

    @property
    def misses(self):
        return [r for r in self.records if r["type"] == "miss"]

    @property
    def summary(self):
        s = [r for r in self.records if r["type"] == "summary"]
        return s[-1] if s else None


def unique(prefix):
    return f"{prefix}{os.getpid() % 10000:04d}"[:12]
