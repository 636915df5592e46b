"""What a run measured: the machine, and the code under test (read-only git, file digests)."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Dict

from bench.config import ROOT
from bench.procs import run

WATCHED_TREES = ("bpf", "bpftrace_hostport")
# What a tracing session runs per flow: the session loop, decode, sinks, the recording writer,
# the roll-up. Edits elsewhere in the package (lab, node, cli, report) do not change a trial.
HOT_PATH = ("bpftrace_hostport/collect", "bpftrace_hostport/ebpf", "bpftrace_hostport/records",
            "bpftrace_hostport/analysis/rollup.py", "bpftrace_hostport/analysis/dist.py",
            "bpftrace_hostport/analysis/summary.py")


def digest(*trees: str) -> str:
    """sha256 over the .c, .h and .py files under the given folders of the tree (names and bytes)."""
    h = hashlib.sha256()
    for tree in trees:
        top = ROOT / tree
        for p in sorted(top.rglob("*")) if top.is_dir() else [top]:
            if p.suffix in (".c", ".h", ".py") and p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode() + b"\0")
                with contextlib.suppress(OSError):
                    h.update(p.read_bytes())
    return h.hexdigest()


def code_digests() -> Dict[str, str]:
    """What the tracer compiles (bpf/), runs per flow (HOT_PATH) and imports at all
    (bpftrace_hostport/) right now: a trial records them when it starts the tracer, so edits
    made during a run show up."""
    return {"bpf": digest("bpf")[:16], "hot_path": digest(*HOT_PATH)[:16],
            "python": digest("bpftrace_hostport")[:16]}


def source_state() -> dict:
    """The commit under test and the tracer's files modified in the working tree."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    out = {"commit": None, "modified": [], **code_digests(),
           "bpf_sha256": hashlib.sha256((ROOT / "bpf" / "hostport.bpf.c").read_bytes()).hexdigest()}
    with contextlib.suppress(Exception):
        out["commit"] = run(git + ["rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
        st = run(git + ["status", "--porcelain", "--", *WATCHED_TREES], timeout=10).stdout
        out["modified"] = sorted(line[3:] for line in st.splitlines() if line.strip())
    return out


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?"),
        "python": sys.version.split()[0],
    }
