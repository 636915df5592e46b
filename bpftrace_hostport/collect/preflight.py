"""Pre-flight checks: what a trace needs that can be checked before its programs are loaded.

cli/trace.run calls them after the options are read and before anything is compiled, loaded or
attached (outputs.load_probe), so that a bad option, a busy port or a hook another program holds
fails, or is explained, in a moment: one sentence with the fix and exit 2, not a banner, a
capture header and then the error. Each check is a function of its own; this module imports
nothing heavy (the tracer is still small then).

Outputs: the recording's and the ready file's paths can be written (tried for real), and
--anonymize is not combined with an output it cannot reach.
Metrics port: `metrics_listener` binds and listens at once and the socket is handed to the
metrics sink, so no one can take the port between the check and the serving.
Netfilter priority: `netfilter_priority` attaches a two-instruction program where the tracer's
would go (after DNAT, before the filter table) and detaches it again: it says where the tracer
will attach, who holds the priorities before it, or that the kernel has no netfilter BPF link.
The kernel side's own checks (headers, BTF, root) are collect/netfilter/preflight.py.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from typing import Optional, Tuple

from bpftrace_hostport.errors import KernelFeatureMissing, UserError

_LISTEN = re.compile(r"(?:(?:\[(?P<v6>[0-9A-Fa-f:.]+(?:%\w+)?)\]|(?P<host>[A-Za-z0-9.\-]+)):)?"
                     r"(?P<port>\d{1,5})")


# -- outputs: paths, permissions, anonymization --------------------------------------------

def _writable_dir(d: str, what: str, fix: str) -> None:
    """A file can be created in directory `d`: tried for real (a read-only filesystem, a full
    quota or a permission passes os.access as root), and removed at once."""
    if not os.path.isdir(d):
        raise UserError(f"Cannot write {what}: the directory {d} does not exist; {fix}.")
    probe = os.path.join(d, f".bpftrace-hostport-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return
        raise UserError(f"Cannot write {what} in {d} ({e.strerror or e}); {fix}.") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def record_path(path: Optional[str]) -> None:
    """--record PATH / --record-dir DIR: a file that can be created, or a directory to create
    files in (--max-size's own bound is cli/options.parse_size's)."""
    if not path:
        return
    fix = "give a path in a directory that exists and that you can write"
    if os.path.isdir(path):
        _writable_dir(path, "the recording", "give a directory you can write")
        return
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file; give a file name or a directory for --record.")
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise UserError(f"Cannot write the recording {path} (permission denied); {fix}.")
    _writable_dir(os.path.dirname(os.path.abspath(path)), f"the recording {path}", fix)


def ready_file(path: Optional[str]) -> None:
    """--ready-file: written once attached, so its directory must take it."""
    if path:
        _writable_dir(os.path.dirname(os.path.abspath(path)), f"the ready file {path}",
                      "give a path in a writable directory")


def anonymize(anonymized: bool, print_program: bool) -> None:
    """--anonymize applies to every output of a trace (the session replaces the clients before
    any sink sees them); the one output it cannot reach is the eBPF program --print-program
    shows, whose constants hold the real --client networks."""
    if anonymized and print_program:
        raise UserError("--print-program shows the real --client networks in the program's constants, "
                        "which --anonymize must not reveal; leave out one of the two.")


def outputs(*, record: Optional[str], ready: Optional[str], anonymized: bool,
            print_program: bool) -> None:
    """Every check of what a trace writes, in the order a user would fix them."""
    record_path(record)
    ready_file(ready)
    anonymize(anonymized, print_program)


# -- the metrics port ---------------------------------------------------------------------------

def parse_listen(value: str) -> Tuple[str, int]:
    """[ADDR:]PORT -> (host, port): 127.0.0.1 when only a port is given, IPv6 in brackets."""
    m = _LISTEN.fullmatch(str(value).strip())
    ok = m is not None and int(m["port"]) <= 65535
    if ok and m["v6"]:
        try:
            ipaddress.IPv6Address(m["v6"].split("%")[0])
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"Bad metrics listen address {value!r}: give PORT, ADDR:PORT or "
                         "[IPv6]:PORT with a port from 0 to 65535.")
    return m["v6"] or m["host"] or "127.0.0.1", int(m["port"])


def where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(listen: str) -> socket.socket:
    """A socket listening on [ADDR:]PORT, as the metrics server serves from it; UserError (one
    sentence with the fix) when the address is in use, not this node's, or not allowed."""
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as e:
        raise UserError(f"Cannot listen on {where(host, port)}: {(e.strerror or str(e)).lower()}; "
                        "give an address of this node, or a port alone (127.0.0.1).") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as http.server does
        sock.bind((host, port))
        sock.listen(16)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"Cannot listen on {where(host, port)}: address in use; "
                            "choose another --metrics port.") from None
        raise UserError(f"Cannot listen on {where(host, port)}: "
                        f"{(e.strerror or str(e)).lower()}.") from None
    return sock


def metrics_listener(listen: Optional[str]) -> Optional[socket.socket]:
    """The --metrics socket, listening (connections wait in its backlog until the sink serves
    them, once attached), or None without --metrics."""
    return None if not listen else listen_socket(listen)


# -- the netfilter priority ----------------------------------------------------------------------

# r0 = NF_ACCEPT (1); exit: a netfilter program that lets every packet through
_ACCEPT = struct.pack("<BBhi", 0xb7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def netfilter_priority(netns: Optional[str]) -> Tuple[int, str]:
    """Where the tracer's netfilter links will go in `netns`: (priority, why not the first one,
    or ""). Raises KernelFeatureMissing when the kernel has no netfilter BPF programs or links
    (`--backend auto` then falls back, saying so), UserError when every priority is taken."""
    from bpftrace_hostport import netns as netns_mod
    from bpftrace_hostport.collect.netfilter.preflight import preflight
    from bpftrace_hostport.collect.netfilter.probe import attach_points, link_all
    from bpftrace_hostport.ebpf import bpfsys, nflink
    preflight()                                   # root and capabilities, each said with its fix
    try:
        fd = bpfsys.prog_load(nflink.BPF_PROG_TYPE_NETFILTER, _ACCEPT, name="bhp_preflight",
                              expected_attach_type=nflink.BPF_NETFILTER)
    except bpfsys.BpfError as e:
        raise KernelFeatureMissing(f"The kernel refused a netfilter BPF program ({e.strerror}); the "
                                   "full tracer needs Linux >= 6.4 (BPF_PROG_TYPE_NETFILTER); use "
                                   "--backend conntrack on older kernels.") from None
    try:
        with netns_mod.entered(netns):
            links, prio, why = link_all(attach_points(fd))
        for link in links:
            link.close()
        return prio, why
    finally:
        os.close(fd)
