"""The labs of the kernel tests: which kinds of lab a test that builds one runs on.

A lab kind is how `lab up` makes the node's pods and their hostPort rules: the runtime
(`direct`: the CNI plugins run by hand; `containerd`: through CRI) and the portmap plugin's
backend (`iptables`; `nftables`: the plugins 1.9.1 build lab/plugins.py fetches). Tests that build
a lab take the `lab_kind` fixture (module scope: a module's lab is built once per kind, and
pytest runs the module's tests kind by kind) and pass `**lab_kind.up_kwargs()` to `lab.up`; their
ids end in the kind (`[direct]`, `[containerd]`, `[direct-nftables]`, `[containerd-nftables]`).
A kind that cannot run here skips, or fails with CI=true. A test that reads iptables itself
(the rules' own counters) asks `lab_kind.portmap` and looks at the nftables table instead.

To add a dimension: give LabKind a field with its default, return it from up_kwargs, name it in
`__str__`, say in `unavailable` what it needs, and add the combinations to LAB_KINDS.
"""
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import pytest


@dataclass(frozen=True)
class LabKind:
    runtime: str = "direct"          # lab/build.py RUNTIMES
    portmap: str = "iptables"        # lab/build.py PORTMAP_BACKENDS

    def up_kwargs(self) -> dict:
        return {"runtime": self.runtime, "portmap": self.portmap}

    def __str__(self) -> str:
        return self.runtime + ("" if self.portmap == "iptables" else f"-{self.portmap}")


LAB_KINDS = (LabKind("direct"), LabKind("containerd"), LabKind("direct", "nftables"),
             LabKind("containerd", "nftables"))
DIRECT = LAB_KINDS[0]


def unavailable(kind: LabKind) -> Optional[str]:
    """Why a kind of lab cannot be built here (None: it can)."""
    if kind.runtime == "containerd":
        missing = [t for t in ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "gcc") if not shutil.which(t)]
        if not os.access("/bin/busybox", os.X_OK):
            missing.append("busybox-static")
        try:
            import grpc  # noqa: F401
            import cri_api.v1.api_pb2  # noqa: F401
        except ImportError:
            missing.append("the Python packages grpcio and container-runtime-interface-api")
        if missing:
            return f"a containerd lab needs {', '.join(missing)} (scripts/test.sh installs them)"
    if kind.portmap == "nftables":
        from bpftrace_hostport.errors import UserError
        from bpftrace_hostport.lab.plugins import nftables_plugins
        try:
            nftables_plugins()
        except UserError as e:
            return f"a lab with the nftables portmap needs its plugins build: {e}"
    return None


def require_lab_kind(kind: LabKind) -> None:
    """Skips (fails with CI=true) when the kind cannot be built; the test's own require_kernel
    (or lighter check) says whether the rest is there."""
    reason = unavailable(kind)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and a {kind} lab cannot be built: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module", params=LAB_KINDS, ids=str)
def lab_kind(request) -> LabKind:
    require_lab_kind(request.param)
    return request.param


@pytest.fixture(scope="module")
def containerd_kind() -> LabKind:
    """For the tests that are about the containerd runtime alone."""
    kind = LabKind("containerd")
    require_lab_kind(kind)
    return kind
