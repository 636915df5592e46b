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


class _Libc:
    """ctypes.CDLL(None) as the compile child sees it: glibc's malloc_trim, or none (musl)."""

    def __init__(self, calls=None):
        if calls is not None:
            def malloc_trim(pad):
                calls.append(pad)
                return 1
            self.malloc_trim = malloc_trim


def test_heap_is_trimmed_while_the_compile_runs_and_the_thread_ends_with_it(monkeypatch):
    import threading
    import time

    from bpftrace_hostport.ebpf import compiler
    calls = []
    monkeypatch.setattr(compiler.ctypes, "CDLL", lambda name: _Libc(calls))
    before = threading.active_count()
    with compiler._heap_trimmed(period_s=0.001):
        assert threading.active_count() == before + 1
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert len(calls) >= 4 and set(calls) == {0}      # while it ran, and once more at the end
    assert threading.active_count() == before
    n = len(calls)
    time.sleep(0.01)
    assert len(calls) == n


def test_without_malloc_trim_the_compile_runs_as_before(monkeypatch):
    import threading

    from bpftrace_hostport.ebpf import compiler
    monkeypatch.setattr(compiler.ctypes, "CDLL", lambda name: _Libc())
    before = threading.active_count()
    with compiler._heap_trimmed(period_s=0.001):
        assert threading.active_count() == before
