"""Shared test helpers. Kernel tests need root, bcc, the netfilter BPF link and the CNI plugins.

When CI=true a kernel test that cannot run FAILS instead of skipping: CI must prove the real
kernel path every time.
"""
import os
import shutil

import pytest


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
