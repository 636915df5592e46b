"""Pre-flight checks: what a trace needs that can be checked before its programs are loaded.

cli/trace.run calls them after the options are read and before anything is compiled, loaded or
attached (outputs.load_probe), so that a busy port or a hook another program holds fails, or is
explained, in a moment and with the fix, not after a compile and an attach. Each check is a
function of its own; this module imports nothing heavy (the tracer is still small then).

Metrics port: `metrics_listener` binds and listens at once and the socket is handed to the
metrics sink, so no one can take the port between the check and the serving.
Netfilter priority: `netfilter_priority` attaches a two-instruction program where the tracer's
would go (after DNAT, before the filter table) and detaches it again: it says where the tracer
will attach, who holds the priorities before it, or that the kernel has no netfilter BPF link.
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
