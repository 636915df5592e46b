"""A trace run the way a user runs it: `bpftrace-hostport trace ...` as its own process,
started, waited for (its --ready-file), stopped with a signal, and read back.

One harness for the demo, the tests and the bench, so each of them exercises the command
exactly as it ships.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from typing import List, Optional, Sequence

from bpftrace_hostport.errors import UserError


class TraceRun:
    def __init__(self, args: Sequence[str], *, python: str = sys.executable, prefix: Sequence[str] = (),
                 workdir: Optional[str] = None, start_timeout: float = 60.0, env: Optional[dict] = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="bhp-trace-")
        if workdir is None:          # its own directory lives as long as the run (or the process)
            weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        self.ready = os.path.join(self.workdir, "ready")
        self.out_path = os.path.join(self.workdir, "out")
        self.err_path = os.path.join(self.workdir, "err")
        self.argv = [*prefix, python, "-m", "bpftrace_hostport", "trace", "--ready-file", self.ready, *args]
        self.start_timeout, self.env = start_timeout, env
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None

    def start(self) -> "TraceRun":
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self.env)
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                lines = self.stderr.strip().splitlines()
                raise UserError(f"The tracer did not start: {lines[-1] if lines else 'no output'}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode if self.proc is not None else None
        return self.returncode

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def records(self) -> List[dict]:
        """What `--format json` wrote, one dict per line."""
        with open(self.out_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def __enter__(self) -> "TraceRun":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
