"""The compile child (ebpf/compiler.py): what it imports besides bcc, in a fresh interpreter.

It runs beside the tracer while bcc and LLVM compile (about 130 MB together), so every module
it need not import is memory on the peak of a cold start.
"""
import json
import subprocess
import sys

# What the child imports itself, before and after bcc (main() and _save_cache_entry).
CHILD_MODULES = ("bpftrace_hostport.ebpf.compiler", "bpftrace_hostport.ebpf.bpfsys",
                 "bpftrace_hostport.ebpf.objcache")
NOT_IN_THE_CHILD = ("numpy", "pyarrow", "pandas", "pyroute2", "click", "yaml",
                    "bpftrace_hostport.ebpf.btf", "bpftrace_hostport.collect")


def test_compile_child_imports_nothing_heavy():
    code = (f"import importlib, json, sys\n"
            f"for m in {CHILD_MODULES!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(sys.modules)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    loaded = json.loads(p.stdout)
    assert [m for m in NOT_IN_THE_CHILD if m in loaded] == []
