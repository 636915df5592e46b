"""Run the real CLI against a real lab, the way a user would."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

PY = sys.executable


def cli(*args, check=True, timeout=120, env=None):
    p = subprocess.run([PY, "-m", "bpftrace_hostport", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"bpftrace-hostport {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


@contextmanager
def tracing(*args, start_timeout=60, prefix=(), python=PY):
    """Starts `trace --format json ARGS` and yields a handle; on exit SIGTERMs it and parses."""
    tmp = tempfile.mkdtemp(prefix="bhp-trace-")
    ready = os.path.join(tmp, "ready")
    out = open(os.path.join(tmp, "out.jsonl"), "w")
    err = open(os.path.join(tmp, "err.txt"), "w")
    proc = subprocess.Popen([*prefix, python, "-m", "bpftrace_hostport", "trace", "--format", "json",
                             "--ready-file", ready, *args], stdout=out, stderr=err)
    handle = TraceHandle(proc, tmp)
    try:
        deadline = time.monotonic() + start_timeout
        while not os.path.exists(ready):
            if proc.poll() is not None:
                raise AssertionError(f"trace exited {proc.returncode}: {open(err.name).read()}")
            if time.monotonic() > deadline:
                raise AssertionError("trace did not attach in time")
            time.sleep(0.05)
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()
        err.close()
        handle.load()


class TraceHandle:
    def __init__(self, proc, tmp):
        self.proc = proc
        self.tmp = tmp
        self.records = []
        self.stderr = ""

    def load(self):
        with open(os.path.join(self.tmp, "out.jsonl")) as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(self.tmp, "err.txt")) as f:
            self.stderr = f.read()
        self.returncode = self.proc.returncode

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
