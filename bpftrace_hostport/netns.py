"""Network namespaces: the one place that says what a namespace argument is and how to run
something in it.

A namespace is given by name (`ip netns list`, under /var/run/netns) or by path
(/proc/PID/ns/net, anything with a "/"). In-process work switches only the network namespace
(setns CLONE_NEWNET through pyroute2: `entered`) and stays in its own mount namespace:
`ip netns exec` would also give it a /sys without tracefs, and tracepoints could not be
attached (shared/KERNEL.md). Commands run in it through `command_prefix`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import socket
import sys
from typing import TYPE_CHECKING, Iterator, List, Optional


def _pyroute2_by_parts() -> None:
    """pyroute2's package __init__ imports every part of the library (NDB, IPDB, wireless,
    devlink, ...: about 7 MB resident that a tracer on every node would carry and never use).
    When nothing has imported pyroute2 yet, its package is registered without running that
    __init__; submodules import as usual, and the first use of any other name runs the
    package's own __init__ after all, so `from pyroute2 import X` keeps working everywhere."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    pkg = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):
        if not name.startswith("__"):
            if importlib.util.find_spec(f"pyroute2.{name}") is not None:
                return importlib.import_module(f"pyroute2.{name}")
            del pkg.__getattr__
            spec.loader.exec_module(pkg)          # the whole library, as `import pyroute2` would
            return getattr(pkg, name)
        raise AttributeError(name)

    pkg.__getattr__ = __getattr__
    sys.modules["pyroute2"] = pkg


# Registered now, imported on first use (entered, open_iproute): about 8 MB of pyroute2 that a
# tracer should not hold while its compile child (bcc and LLVM) runs beside it.
_pyroute2_by_parts()

from bpftrace_hostport.errors import UserError    # noqa: E402

if TYPE_CHECKING:
    from pyroute2.iproute import IPRoute

NETNS_RUN_DIR = "/var/run/netns"


def path_of(name: str) -> str:
    return name if is_path(name) else os.path.join(NETNS_RUN_DIR, name)


def is_path(name: str) -> bool:
    return "/" in name


def require(name: Optional[str]) -> None:
    """Raises UserError when a network namespace (name or path) does not exist."""
    if name is None:
        return
    if is_path(name) and not os.path.exists(name):
        raise UserError(f"Network namespace file {name} does not exist; pass a name from "
                        "`ip netns list` or an existing /proc/<pid>/ns/net path.")
    if not os.path.exists(path_of(name)):
        raise UserError(f"No network namespace named {name!r}: see `ip netns list` "
                        "(a lab's node namespace is shown by `bpftrace-hostport lab status`).")


def command_prefix(name: Optional[str]) -> List[str]:
    """The argv that runs a command in network namespace `name` ([] for None)."""
    if name is None:
        return []
    require(name)
    tool = "nsenter" if is_path(name) else "ip"
    if shutil.which(tool) is None:
        raise UserError(f"{tool} is needed to run a command in network namespace {name}; install "
                        f"{'util-linux' if tool == 'nsenter' else 'iproute2'}.")
    return ["nsenter", f"--net={name}", "--"] if is_path(name) else ["ip", "netns", "exec", name]


def command_prefix_text(name: Optional[str]) -> str:
    """The same as shell text to put before a command a user will paste ("" for None)."""
    if not name:
        return ""
    return f"nsenter --net={name} -- " if is_path(name) else f"ip netns exec {name} "


@contextlib.contextmanager
def entered(name: Optional[str]) -> Iterator[None]:
    """Runs the block in network namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    require(name)
    from pyroute2 import netns as pr_netns
    # flags=0: never create a namespace by accident (pyroute2 defaults to O_CREAT).
    saved = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        pr_netns.setns(path_of(name), flags=0)
    except PermissionError:
        os.close(saved)
        raise UserError(f"Entering network namespace {name} needs CAP_SYS_ADMIN: run as root "
                        "(in a container: add SYS_ADMIN, or run it in that namespace).") from None
    try:
        yield
    finally:
        pr_netns.setns(saved, flags=0)
        os.close(saved)


def open_iproute(name: Optional[str]) -> IPRoute:
    """An rtnetlink socket bound to namespace `name`; it stays there after we leave."""
    from pyroute2.iproute import IPRoute
    with entered(name):
        return IPRoute()


def local_addresses(ipr: IPRoute) -> List[str]:
    """Every address configured in the socket's namespace, loopback included."""
    out = ["127.0.0.1", "::1"]
    for msg in ipr.get_addr():
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if addr and addr not in out:
            out.append(addr)
    return out


# rtnetlink multicast groups of address changes (include/uapi/linux/rtnetlink.h)
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


class AddressWatch:
    """Tells whether the addresses of a namespace may have changed since the last call: a
    netlink socket in the namespace, subscribed to address notifications (RTM_NEWADDR,
    RTM_DELADDR), is read without blocking. Cheaper than dumping every address every second;
    an overflowing socket (ENOBUFS) or a socket that cannot be made counts as a change."""

    def __init__(self, name: Optional[str]):
        self.sock: Optional[socket.socket] = None
        try:
            with entered(name):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                     socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self.sock = sock
        except OSError:
            self.sock = None

    def changed(self) -> bool:
        if self.sock is None:
            return True
        seen = False
        while True:
            try:
                if not self.sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError:              # ENOBUFS: notifications were lost
                return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


#: The calling thread's network namespace (setns() moves a thread, not its whole process).
THREAD_NETNS = "/proc/thread-self/ns/net"


def current_netns_inode() -> int:
    return os.stat(THREAD_NETNS).st_ino
