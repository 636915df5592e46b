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


# One pod serving TCP 8000 -> 80 and UDP 5353 -> 53 (the outcome and screen tests' lab).
WEB_TCP_UDP = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  containers:
  - name: web
    image: web
    ports:
    - {name: http, containerPort: 80, hostPort: 8000, protocol: TCP}
    - {name: dns, containerPort: 53, hostPort: 5353, protocol: UDP}
"""


@contextmanager
def own_lab(prefix, **up):
    """A lab named PREFIX plus this run's id, built with lab.up(**up) (after removing any left
    from a crashed run of the same id), and removed whatever the test did."""
    from bpftrace_hostport.lab import build as lab
    from tests.conftest import require_kernel
    require_kernel()
    name = unique(prefix)
    lab.down(name)
    st = lab.up(name=name, **up)
    try:
        yield st
    finally:
        lab.down(name)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL after `timeout`: the process's exit status."""
    import signal
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentRun:
    """`agent --lab NAME --log-json` as its own process, its metrics on 127.0.0.1 (the agent's
    process stays in the root namespace; only its netfilter links are in the lab's), started
    and waited for (its --ready-file); stop() ends it with SIGTERM, log() is its stderr."""

    def __init__(self, lab_name: str, *args: str):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="bhp-agent-")
        self.port = free_port()
        self.err_path = os.path.join(self.dir, "err")
        self.ready = os.path.join(self.dir, "ready")
        self.argv = [PY, "-m", "bpftrace_hostport", "agent", "--lab", lab_name, "--metrics",
                     f"127.0.0.1:{self.port}", "--log-json", "--ready-file", self.ready, *args]
        self.proc = None

    def __enter__(self) -> "AgentRun":
        import time
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the agent did not start: {self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def stop(self) -> int:
        return stop_process(self.proc)

    def __exit__(self, *exc) -> None:
        import shutil
        self.stop()
        self.logged = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)
