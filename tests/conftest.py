"""Shared test helpers. Kernel tests need root, bcc, the netfilter BPF link and the CNI plugins.

When CI=true a kernel test that cannot run FAILS instead of skipping: CI must prove the real
kernel path every time.
"""
import os
import shutil
import tempfile

import pytest

# The compile cache (bpftrace_hostport/ebpf/objcache.py): one empty directory per test session
# unless the caller chose one (e.g. BPFTRACE_HOSTPORT_CACHE_DIR=/var/cache/bpftrace-hostport to
# reuse the machine's). The session's first trace compiles, later ones load from the cache;
# tests/kernel/test_objcache.py covers both paths with directories of its own.
_SESSION_CACHE = None
if "BPFTRACE_HOSTPORT_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="bhp-objcache-")
    os.environ["BPFTRACE_HOSTPORT_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def kernel_unavailable_reason():
    if os.geteuid() != 0:
        return "kernel tests need root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (python3-bpfcc) is not importable"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "no kernel BTF"
    for p in ("bridge", "host-local", "portmap"):
        if not os.access(os.path.join(os.environ.get("CNI_PATH", "/usr/lib/cni"), p), os.X_OK):
            return f"CNI plugin {p} missing"
    for tool in ("ip", "iptables", "conntrack"):
        if not shutil.which(tool):
            return f"{tool} missing"
    return None


def require_kernel():
    reason = kernel_unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and a kernel test cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture
def kernel():
    require_kernel()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/kernel" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.kernel)
