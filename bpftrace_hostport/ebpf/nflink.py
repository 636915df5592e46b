"""The netfilter BPF link: bpf(BPF_LINK_CREATE) with attach type BPF_NETFILTER.

bcc 0.26 knows no netfilter attach, so the link is created here through the raw syscall of
bpfsys.py (include/uapi/linux/bpf.h, kernel >= 6.4):

    union bpf_attr.link_create = {
        __u32 prog_fd; __u32 target_fd; __u32 attach_type; __u32 flags;
        struct { __u32 pf; __u32 hooknum; __s32 priority; __u32 flags; } netfilter;
    }

A link belongs to the network namespace of the calling thread at creation time and lives
as long as its file descriptor (see kernel net/netfilter/nf_bpf_link.c).
"""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from bpftrace_hostport.ebpf import bpfsys

BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45            # enum bpf_attach_type
BPF_LINK_CREATE = 28          # enum bpf_cmd

NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

# enum nf_inet_hooks
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4

HOOK_NAMES = {
    NF_INET_PRE_ROUTING: "PRE_ROUTING",
    NF_INET_LOCAL_IN: "LOCAL_IN",
    NF_INET_FORWARD: "FORWARD",
    NF_INET_LOCAL_OUT: "LOCAL_OUT",
    NF_INET_POST_ROUTING: "POST_ROUTING",
}

# include/uapi/linux/netfilter_ipv4.h: enum nf_ip_hook_priorities (same values for IPv6)
NF_IP_PRI_CONNTRACK = -200
NF_IP_PRI_NAT_DST = -100
NF_IP_PRI_NAT_SRC = 100

class LinkError(OSError):
    pass


@dataclass
class NetfilterLink:
    fd: int
    pf: int
    hook: int
    priority: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        fam = "ipv4" if self.pf == NFPROTO_IPV4 else "ipv6"
        return f"{fam} {HOOK_NAMES.get(self.hook, self.hook)} priority {self.priority:+d}"


def link_create(prog_fd: int, pf: int, hook: int, priority: int) -> NetfilterLink:
    """Attach a loaded BPF_PROG_TYPE_NETFILTER program; raises LinkError with errno."""
    attr = ctypes.create_string_buffer(64)   # zero-filled: unused bpf_attr bytes must be 0
    struct.pack_into("<IIIIIIiI", attr, 0, prog_fd, 0, BPF_NETFILTER, 0, pf, hook, priority, 0)
    try:
        fd = bpfsys.sys_bpf(BPF_LINK_CREATE, attr)
    except bpfsys.BpfError as e:
        raise LinkError(e.errno, e.strerror) from None
    return NetfilterLink(fd, pf, hook, priority)
