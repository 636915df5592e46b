"""A built wheel, installed into a fresh virtualenv (not editable), traces a real lab.

The eBPF sources ship inside the package (bpftrace_hostport.bpf); before they did, a
non-editable install could not trace at all.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import tracing, unique

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_installs_and_traces(tmp_path):
    require_kernel()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("bpftrace_hostport-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("bpftrace_hostport/bpf/hostport.bpf.c", "bpftrace_hostport/bpf/events.h",
              "bpftrace_hostport/lab/data/nginx-hostport.yaml"):
        assert f in names, f"{f} is not in the wheel"
    venv = tmp_path / "venv"
    # Debian's bcc is seen through the system site-packages, as in scripts/setup.sh.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=600)
    where = subprocess.run([py, "-c", "import bpftrace_hostport as b; print(b.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), f"the wheel's package was not the one imported: {where}"
    name = unique("whl")
    lab.down(name)
    lab.up(name=name, scenario="basic")
    try:
        env_cwd = os.getcwd()
        os.chdir(tmp_path)            # so `python -m` cannot pick the source tree up
        try:
            with tracing("--lab", name, "--timeout", "1", python=py) as t:
                res = lab.traffic(name, to=8000, count=5)
        finally:
            os.chdir(env_cwd)
    finally:
        lab.down(name)
    assert res["answered"] == 5
    assert t.returncode == 0, t.stderr
    assert len([f for f in t.flows if f["host_port"] == 8000 and f["answered"]]) == 5
    assert t.records[0]["type"] == "capture" and t.records[0]["schema"] >= 2
