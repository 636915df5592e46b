"""The netfilter BPF link: bpf(BPF_LINK_CREATE) with attach type BPF_NETFILTER.

bcc 0.26 knows no netfilter attach, so the link is created here through the raw syscall of
bpfsys.py (include/uapi/linux/bpf.h, kernel >= 6.4):

    union bpf_attr.link_create = {
        __u32 prog_fd; __u32 target_fd; __u32 attach_type; __u32 flags;
        struct { __u32 pf; __u32 hooknum; __s32 priority; __u32 flags; } netfilter;
    }

A link belongs to the network namespace of the calling thread at creation time and lives
as long as its file descriptor (see kernel net/netfilter/nf_bpf_link.c).

Two tracers on one node (the agent and an on-call trace) each attach their own programs, at
two priorities of the range below (link_at_free_priority); who holds a busy priority is found
through the kernel's link list and /proc (who_holds), so that a busy link is never explained
as an old kernel.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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


# Where the tracer may attach: after NAT's DNAT (NF_IP_PRI_NAT_DST = -100: daddr is already the
# pod's and the conntrack entry holds both tuples) and before the filter table (NF_IP_PRI_FILTER
# = 0: what FORWARD/OUTPUT filter rules drop is still seen). Netfilter refuses a BPF hook at a
# priority any other hook of that family and hook number already has (net/netfilter/core.c,
# nf_hook_entries_grow: "Restrict BPF hook type to force a unique priority", -EBUSY), so a
# second tracer (the agent and an on-call trace) takes the next free priority of this range.
NF_IP_PRI_FILTER = 0
PRIORITY_FIRST = NF_IP_PRI_NAT_DST + 1
PRIORITY_LAST = NF_IP_PRI_FILTER - 1

BPF_PROG_GET_FD_BY_ID = 13
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_TYPE_NETFILTER = 10      # enum bpf_link_type


@dataclass(frozen=True)
class LinkInfo:
    """A netfilter link of the kernel's (any network namespace: the kernel does not say which)."""
    id: int
    prog_id: int
    pf: int
    hook: int
    priority: int
    prog_name: str = ""


def _get_next_id(cmd: int, start: int) -> Optional[int]:
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<I", attr, 0, start)
    try:
        bpfsys.sys_bpf(cmd, attr)
    except bpfsys.BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise LinkError(e.errno, e.strerror) from None
    return struct.unpack_from("<I", attr, 4)[0]


def _fd_by_id(cmd: int, obj_id: int) -> int:
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<I", attr, 0, obj_id)
    return bpfsys.sys_bpf(cmd, attr)


def _info(fd: int, size: int) -> bytes:
    """BPF_OBJ_GET_INFO_BY_FD: attr {u32 bpf_fd; u32 info_len; u64 info}."""
    buf = ctypes.create_string_buffer(size)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, size, ctypes.addressof(buf))
    bpfsys.sys_bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD, attr)
    return buf.raw


def netfilter_links() -> List[LinkInfo]:
    """Every netfilter link of the kernel, through BPF_LINK_GET_NEXT_ID, BPF_LINK_GET_FD_BY_ID
    and BPF_OBJ_GET_INFO_BY_FD. struct bpf_link_info: u32 type, id, prog_id, then (at 16, the
    union's 8-byte alignment) netfilter {u32 pf; u32 hooknum; s32 priority; u32 flags}. The
    program's name is struct bpf_prog_info's (char name[16] at 64). Raises LinkError (EPERM
    without CAP_SYS_ADMIN: the kernel lists its objects to that capability only)."""
    out: List[LinkInfo] = []
    link_id = 0
    while True:
        link_id = _get_next_id(BPF_LINK_GET_NEXT_ID, link_id)
        if link_id is None:
            return out
        try:
            fd = _fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id)
        except bpfsys.BpfError as e:
            if e.errno == errno.ENOENT:
                continue                     # gone in between
            raise LinkError(e.errno, e.strerror) from None
        try:
            raw = _info(fd, 64)
        except bpfsys.BpfError:
            continue
        finally:
            os.close(fd)
        kind, lid, prog_id = struct.unpack_from("<III", raw, 0)
        if kind != BPF_LINK_TYPE_NETFILTER:
            continue
        pf, hook, prio = struct.unpack_from("<IIi", raw, 16)
        out.append(LinkInfo(lid, prog_id, pf, hook, prio, _prog_name(prog_id)))


def _prog_name(prog_id: int) -> str:
    try:
        fd = _fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
    except bpfsys.BpfError:
        return ""
    try:
        return _info(fd, 96)[64:80].split(b"\0", 1)[0].decode(errors="replace")
    except bpfsys.BpfError:
        return ""
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Holder:
    """A process holding a netfilter link, as /proc shows it."""
    pid: int
    link_id: int
    pf: int
    hook: int
    priority: int
    argv: Tuple[str, ...]
    netns: Tuple[int, ...] = ()      # the network namespaces (inodes) its links may be in


_FDINFO = re.compile(r"^link_id:\s*(\d+)\s*$.*?^pf:\s*(\d+)\s+hooknum:\s*(\d+)\s+prio:\s*(-?\d+)",
                     re.M | re.S)
_NETNS_FD = re.compile(r"^net:\[(\d+)\]$")


def parse_fdinfo(text: str) -> Optional[Tuple[int, int, int, int]]:
    """(link id, pf, hooknum, priority) of a netfilter link's /proc/PID/fdinfo/FD, else None.
    The kernel prints `link_type: netfilter`, `link_id: N`, ... and one line
    `pf: P\thooknum: H\tprio: N` (net/netfilter/nf_bpf_link.c, bpf_nf_link_show_info)."""
    if not re.search(r"^link_type:\s*netfilter\s*$", text, re.M):
        return None
    m = _FDINFO.search(text)
    return None if m is None else tuple(int(g) for g in m.groups())


def link_holders(proc: str = "/proc") -> List[Holder]:
    """Every process that holds a netfilter link, with the link's hook and priority, from
    /proc/*/fd (bpf links are `anon_inode:bpf_link`) and their fdinfo. Processes this one may
    not look into (another user's, another PID namespace's) are not seen.

    The kernel does not say which network namespace a link is in. A tracer of this project
    holds its namespace open beside its links (`net:[inode]` among its fds: Probe.attach), so
    its links are in one of those; any other process's are taken to be in its own namespace."""
    out: List[Holder] = []
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fds = os.path.join(proc, pid, "fd")
        try:
            names = os.listdir(fds)
        except OSError:
            continue
        found, spaces = [], []
        for fd in names:
            try:
                target = os.readlink(os.path.join(fds, fd))
                m = _NETNS_FD.match(target)
                if m:
                    spaces.append(int(m.group(1)))
                    continue
                if target != "anon_inode:bpf_link":
                    continue
                with open(os.path.join(proc, pid, "fdinfo", fd)) as f:
                    got = parse_fdinfo(f.read())
            except OSError:
                continue
            if got is not None:
                found.append(got)
        if not found:
            continue
        if not spaces:
            try:
                m = _NETNS_FD.match(os.readlink(os.path.join(proc, pid, "ns", "net")))
                spaces = [int(m.group(1))] if m else []
            except OSError:
                pass
        argv = _argv(os.path.join(proc, pid, "cmdline"))
        out += [Holder(int(pid), *got, argv, tuple(spaces)) for got in found]
    return out


def _argv(path: str) -> Tuple[str, ...]:
    try:
        with open(path, "rb") as f:
            return tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return ()


def describe_holder(h: Holder) -> str:
    """ "bpftrace-hostport pid 1234 (agent --lab demo)", "pid 99 (bpftool)"."""
    args = list(h.argv)
    for i, a in enumerate(args):        # python -m bpftrace_hostport agent ... or the script
        if a.endswith("bpftrace_hostport") or os.path.basename(a) == "bpftrace-hostport":
            rest = " ".join(args[i + 1:i + 4])
            return f"bpftrace-hostport pid {h.pid}" + (f" ({rest})" if rest else "")
    return f"pid {h.pid} ({os.path.basename(args[0]) if args else '?'})"


def who_holds(pf: int, hook: int, priority: int, netns: Optional[int] = None, proc: str = "/proc") -> str:
    """Who is at (pf, hook, priority) in the network namespace of inode `netns` (None: any), in
    words for a note: the processes holding a netfilter link there; else a BPF program the
    kernel lists there whose holder is not visible (a pinned link, another PID namespace's
    process); else a hook that is not BPF (an nftables chain or a kernel module registered at
    that priority: netfilter refuses a BPF hook beside any hook of the same priority)."""
    at = [h for h in link_holders(proc) if (h.pf, h.hook, h.priority) == (pf, hook, priority)]
    here = [h for h in at if netns is None or netns in h.netns]
    if here:
        names = list(dict.fromkeys(describe_holder(h) for h in here))
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more + (" is" if len(names) == 1 else " are") + \
            f" attached at priority {priority}"
    try:
        seen = {h.link_id for h in at}           # held elsewhere: other namespaces' links
        links = [link for link in netfilter_links()
                 if (link.pf, link.hook, link.priority) == (pf, hook, priority) and link.id not in seen]
    except LinkError:
        links = None
    if links:
        progs = ", ".join(f"id {link.prog_id}" + (f" ({link.prog_name})" if link.prog_name else "")
                          for link in links[:3])
        return f"BPF program {progs} (held by no process visible here) is attached at priority {priority}"
    if links is None:
        return (f"another hook uses priority {priority} (who could not be seen: listing the kernel's "
                "BPF links needs CAP_SYS_ADMIN)")
    return (f"a netfilter hook that is not BPF (an nftables chain or a kernel module) uses "
            f"priority {priority}")


def link_at_free_priority(points: Sequence[Tuple[int, int, int]], first: int = PRIORITY_FIRST,
                          last: int = PRIORITY_LAST) -> Tuple[List[NetfilterLink], int, List[Tuple[int, int, int]]]:
    """Links every (prog_fd, pf, hook) of `points` at the first priority from `first` to `last`
    where all of them can be created, in the calling thread's network namespace.
    -> (the links, their priority, the (pf, hook, priority) found busy on the way). Raises
    LinkError: EBUSY when every priority of the range is taken (its `busy` says where), another
    errno at once."""
    busy: List[Tuple[int, int, int]] = []
    for prio in range(first, last + 1):
        links: List[NetfilterLink] = []
        try:
            for prog_fd, pf, hook in points:
                links.append(link_create(prog_fd, pf, hook, prio))
        except LinkError as e:
            for link in links:
                link.close()
            if e.errno != errno.EBUSY:
                raise
            busy.append((pf, hook, prio))
            continue
        return links, prio, busy
    full = LinkError(errno.EBUSY, os.strerror(errno.EBUSY))
    full.busy = busy
    raise full
