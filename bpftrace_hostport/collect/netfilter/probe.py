"""Compile, load, attach, read and detach the kernel side.

Struct offsets come from BTF (ebpf/btf.py) and are handed to the compile as -D constants; the
kernel headers bcc needs are used only for its own helper definitions, never for a layout.
bcc itself runs in a child process (ebpf/compiler.py, the only module that imports it); this
module keeps the descriptors it hands over. A start whose compile is already in the compile
cache (ebpf/objcache.py) runs no child: the same descriptors come from the cached instructions. Everything it returns is raw (ctypes records with
bcc's layouts); decode.py gives them meaning. What is checked before a compile (privileges,
headers, tracefs) is preflight.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import gc
import ipaddress
import json
import mmap
import os
import platform
import re
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from bpftrace_hostport.ebpf import bpfsys
from bpftrace_hostport.ebpf import nflink
from bpftrace_hostport.ebpf import objcache
from bpftrace_hostport import netns as netns_mod, proto as protomod
from bpftrace_hostport.collect.netfilter.preflight import (drop_reason_names, ensure_tracefs, preflight,
                                                         preflight_compile, tracepoint_field_offsets)
from bpftrace_hostport.ebpf.btf import BTF, BTFError
from bpftrace_hostport.errors import KernelFeatureMissing, UserError

# Attach points. Priorities relative to netfilter's own (include/uapi/linux/netfilter_ipv4.h):
# NAT_DST + 1 = -99 runs just after DNAT, so the packet's daddr is already the pod's and the
# conntrack entry holds both tuples. It is the first one tried: where another hook holds it
# (another tracer), the next free one up to -1 serves as well (nflink.PRIORITY_FIRST/LAST).
# Nothing runs at POST_ROUTING: masquerade is read from the reply tuple by the first reply
# (or the flow's next packet), not on every packet.
ATTACH_POINTS = (
    ("nf_prerouting_post_dnat", nflink.NF_INET_PRE_ROUTING, nflink.PRIORITY_FIRST),
    ("nf_output_post_dnat", nflink.NF_INET_LOCAL_OUT, nflink.PRIORITY_FIRST),
)
FAMILIES = (nflink.NFPROTO_IPV4, nflink.NFPROTO_IPV6)


def attach_points(prog_fds) -> List[Tuple[int, int, int]]:
    """(prog fd, pf, hook) of every link the tracer makes; prog_fds: name -> fd, or one fd for all."""
    return [(prog_fds if isinstance(prog_fds, int) else prog_fds[name], pf, hook)
            for name, hook, _ in ATTACH_POINTS for pf in FAMILIES]


def link_all(points: List[Tuple[int, int, int]]) -> Tuple[List[nflink.NetfilterLink], int, str]:
    """The links of `points` at the first free priority after DNAT, in the current network
    namespace -> (links, priority, what took the earlier ones: "" when none). A busy range is a
    UserError that names who holds it, never a missing kernel feature: only an attach type the
    kernel does not know is that."""
    try:
        links, prio, busy = nflink.link_at_free_priority(points, ATTACH_POINTS[0][2])
    except nflink.LinkError as e:
        if e.errno == errno.EBUSY:
            pf, hook, prio = e.busy[0]
            who = nflink.who_holds(pf, hook, prio, netns_mod.current_netns_inode())
            raise UserError(f"Every netfilter priority from {nflink.PRIORITY_FIRST} to "
                            f"{nflink.PRIORITY_LAST} at {nflink.HOOK_NAMES[hook]} is taken "
                            f"({who}); stop one of the tracers there.") from None
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, 524):
            raise KernelFeatureMissing(
                f"Could not create a netfilter BPF link ({e.strerror}); it needs Linux >= 6.4 with "
                "CONFIG_NETFILTER_BPF_LINK; use --backend conntrack on older kernels.") from None
        raise UserError(f"Could not create a netfilter BPF link ({e.strerror}).") from None
    why = ""
    if busy:
        pf, hook, first = busy[0]
        why = nflink.who_holds(pf, hook, first, netns_mod.current_netns_inode())
    return links, prio, why

# name -> (struct, member path) or ("sizeof", type); resolved from BTF at load time.
OFFSETS = {
    "NF_CTX_SKB": ("bpf_nf_ctx", "skb"),
    "SKB_NFCT": ("sk_buff", "_nfct"),
    "SKB_LEN": ("sk_buff", "len"),
    "SKB_HEAD": ("sk_buff", "head"),
    "SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "CT_STATUS": ("nf_conn", "status"),
    "CT_TUPLE_ORIG": ("nf_conn", "tuplehash[0].tuple"),
    "CT_TUPLE_REPLY": ("nf_conn", "tuplehash[1].tuple"),
    "TUPLE_SIZE": ("sizeof", "nf_conntrack_tuple"),
    "TUP_SRC_U3": ("nf_conntrack_tuple", "src.u3"),
    "TUP_SRC_PORT": ("nf_conntrack_tuple", "src.u"),
    "TUP_L3NUM": ("nf_conntrack_tuple", "src.l3num"),
    "TUP_DST_U3": ("nf_conntrack_tuple", "dst.u3"),
    "TUP_DST_PORT": ("nf_conntrack_tuple", "dst.u"),
    "TUP_PROTONUM": ("nf_conntrack_tuple", "dst.protonum"),
}

STAT_NAMES = ("ringbuf_deferred", "flows_created", "flow_insert_errors",
              "reply_without_flow", "drops_seen", "counter_full", "reuse_lost", "flow_retries",
              "kernel_claimed")


def bpf_source_dir() -> Path:
    """The eBPF sources, shipped inside the package as `bpftrace_hostport.bpf` (the top-level
    bpf/ folder of the source tree, mapped in pyproject.toml)."""
    from importlib import resources
    tree = Path(__file__).resolve().parents[3] / "bpf"   # a source tree (or a git worktree of it)
    if (tree / "hostport.bpf.c").exists() and (tree.parent / "pyproject.toml").exists():
        return tree
    try:
        cand = Path(str(resources.files("bpftrace_hostport.bpf")))
    except (ModuleNotFoundError, TypeError):
        cand = None
    if cand is not None and (cand / "hostport.bpf.c").exists():
        return cand
    raise UserError("The eBPF sources (bpftrace_hostport/bpf/hostport.bpf.c) are missing from the "
                    "installed package: reinstall it (pip install . or scripts/setup.sh).")


@dataclass
class ProbeOptions:
    netns: Optional[str] = None                  # named netns; None = the current one
    watch_ports: Sequence[Tuple[str, int]] = ()  # (proto, port); empty = every DNAT to a local address
    protos: Sequence[str] = ()                   # empty = all
    client_cidrs: Sequence[str] = ()
    flow_table_size: int = 65536
    map_size: int = 4096
    ringbuf_pages: int = 512                     # 2 MiB with 4 KiB pages: 0.5 s of records at 20k flows/s
    drops: bool = True
    records: bool = True                         # False: no ring-buffer record per answered flow
    debug_print_program: bool = False


def probe_options(opts, watch_ports: Sequence[Tuple[str, int]] = ()) -> ProbeOptions:
    """A tracing session's options (collect/options.py TraceOptions) as the probe's."""
    return ProbeOptions(netns=opts.netns, watch_ports=list(watch_ports), protos=opts.protos,
                        client_cidrs=opts.client_cidrs, flow_table_size=opts.flow_table_size,
                        ringbuf_pages=opts.ringbuf_pages, drops=opts.drops, records=opts.flow_records,
                        debug_print_program=opts.debug_print_program)


# Options that take effect when the probe attaches (configure()), not when it is compiled and
# loaded: a probe loaded before the pod sources and rules were read gets them afterwards.
ATTACH_TIME_OPTIONS = ("watch_ports", "records")


# A ring-buffer record: struct flow_event (about 160 bytes) and its 8-byte header, rounded up.
RECORD_BYTES_MAX = 192


def wake_every(ringbuf_pages: int, cpus: int) -> int:
    """Records each CPU submits between wake-ups of the reader: all CPUs together wake it by
    the time an eighth of the ring is used, and no more often than every 1024 records per CPU
    (a wake-up is a context switch; at a rate that fills less in a batch's 250 ms, the
    session's loop reads them at its next batch and nothing wakes the reader)."""
    capacity = ringbuf_pages * mmap.PAGESIZE // RECORD_BYTES_MAX
    return max(1, min(1024, capacity // (8 * max(1, cpus))))


def ct_set_bits(flow_table_size: int) -> int:
    """log2 of the sets of the kernel's cache of reported flows (`ctcache`, four ways a set):
    at least as many slots as the flow table holds flows."""
    return max(1, (max(4, flow_table_size) - 1).bit_length() - 2)


def _tuple_len(family: int) -> int:
    return 4 if family == 4 else 16


WATCH_WORDS = 1024                      # bpf/hostport.bpf.c: watch_ports, 64 ports a word
WATCH_SLOTS = {"tcp": 0, "udp": 1, "sctp": 2}

MAPS = ("flows", "claimed", "mapping_ids", "free_ids", "mappings", "mapping_lat", "drops", "misses", "watch_ports", "local_addrs",
        "client_cidrs", "config", "stats", "events")


class Probe:
    """The loaded kernel side. Use as a context manager; close() detaches everything.

    bcc compiles and loads in a child process (compiler.py); this object holds the program,
    map and perf-event descriptors it handed over, and works the maps through bpfsys.py.
    With the compile in the cache, the same descriptors come from objcache.instantiate and no
    child runs: `loaded_from_cache` says which; `cache` is "hit", "miss" or "off".
    """

    def __init__(self, opts: ProbeOptions):
        self.opts = opts
        self.links: List[nflink.NetfilterLink] = []
        self.priority: Optional[int] = None
        self.priority_note = ""
        self.netns_fd = -1
        self.fds: List[int] = []
        self.maps = {}
        self.ring = None
        self.drops_enabled = False
        self.loaded_from_cache = False
        self.cache = "off"
        preflight()
        try:
            self.btf = BTF.load()
        except BTFError as e:
            raise UserError(str(e)) from None
        try:
            self.drop_names = drop_reason_names(self.btf)
            cflags = self.cflags()
        finally:
            # The kernel's type index (about 10 MB here) is needed only for the offsets, and every
            # offset it gave is in self.defines now: it goes before a compile child (bcc and LLVM,
            # about 130 MB) runs beside this process.
            self.btf = None
            gc.collect()
        try:
            self._load(cflags)
        except BaseException:
            self.close()
            raise

    # -- compile & load -------------------------------------------------------------------
    def cflags(self) -> List[str]:
        defs = {}
        try:
            for name, (a, b) in OFFSETS.items():
                defs[name] = self.btf.sizeof(b) if a == "sizeof" else self.btf.offsetof(a, b)
        except BTFError as e:
            raise UserError(f"This kernel's BTF lacks a layout the tracer needs ({e}); "
                            "is nf_conntrack built in or loaded (modprobe nf_conntrack)?") from None
        if defs["TUPLE_SIZE"] > 64:
            raise UserError("struct nf_conntrack_tuple is larger than this build expects (64 bytes); "
                            "please report the kernel version.")
        self.drops_enabled = False
        if self.opts.drops and ensure_tracefs():
            defs.update(tracepoint_field_offsets())
            self.drops_enabled = True
        else:
            defs.update({"TP_SKBADDR": 8, "TP_REASON": 36})   # program compiled but not attached
        o = self.opts
        defs.update({"FLOW_TABLE_SIZE": o.flow_table_size, "CT_SET_BITS": ct_set_bits(o.flow_table_size),
                     "MAP_SIZE": o.map_size, "RINGBUF_PAGES": o.ringbuf_pages,
                     "WAKE_EVERY": wake_every(o.ringbuf_pages, bpfsys.possible_cpus())})
        self.defines = defs
        return [f"-D{k}={v}" for k, v in sorted(defs.items())] + ["-I" + str(bpf_source_dir())]

    def program_text(self) -> str:
        return (bpf_source_dir() / "hostport.bpf.c").read_text()

    def _load(self, cflags: List[str]) -> None:
        text = self.program_text()
        if self.opts.debug_print_program:
            print("\n".join(f"#define {k} {v}" for k, v in sorted(self.defines.items())))
            print(text)
        request = {"text": text, "cflags": cflags, "netfilter": [n for n, _, _ in ATTACH_POINTS],
                   "prog_type": nflink.BPF_PROG_TYPE_NETFILTER, "attach_type": nflink.BPF_NETFILTER,
                   "maps": list(MAPS),
                   "tracepoint": {"tp": "skb:kfree_skb", "fn": "tp_kfree_skb"} if self.drops_enabled else None}
        reply = self._load_cached(request)
        if reply is not None:
            try:
                self._adopt(reply)
                return
            except (ValueError, KeyError, TypeError, StopIteration, OSError):
                self._release()                        # a damaged entry: compile as usual
                objcache.discard(request["cache"]["dir"], request["cache"]["key"])
                self.loaded_from_cache, self.cache = False, "miss"
        self._adopt(self._compile(request))

    def _adopt(self, reply: dict) -> None:
        """Takes over the descriptors in self.fds, in the reply's order: programs, maps, perf event."""
        it = iter(self.fds)
        self.prog_fds = {name: next(it) for name in reply["progs"]}
        for m in reply["maps"]:
            self.maps[m["name"]] = bpfsys.BpfMap(m["name"], next(it),
                                                 None if m["key"] is None else
                                                 bpfsys.ctype_from_desc(m["key"], m["name"] + "_key"),
                                                 bpfsys.ctype_from_desc(m["leaf"], m["name"] + "_val"))
        self.drops_enabled = bool(reply["tracepoint"])
        ev = self.maps["events"]
        self.ring = bpfsys.RingBuffer(ev.fd, ev.max_entries)
        fk = self.maps["flows"].Key
        self._key_size = ctypes.sizeof(fk)
        # struct flow_event {flow_key key; flow_val val;}: val starts at flow_val's alignment
        # (its first member is a u64).
        self._val_off = (self._key_size + 7) // 8 * 8
        self.event_size = self._val_off + ctypes.sizeof(self.maps["flows"].Leaf)

    def _load_cached(self, request: dict) -> Optional[dict]:
        """The reply and descriptors from the compile cache (no child, no bcc), or None: a miss,
        the cache off or untrusted, or an entry the kernel refuses. Never an error: a cache
        problem only means compiling as usual. On a miss `request` gains where the child stores
        its entry."""
        directory = objcache.usable_dir(objcache.cache_dir())
        if directory is None:
            self.cache = "off"
            return None
        self.cache = "miss"
        try:
            key = objcache.cache_key(request)
        except (OSError, KeyError, TypeError, ValueError):
            return None
        request["cache"] = {"dir": directory, "key": key}
        entry = objcache.load(directory, key)
        if entry is None:
            return None
        try:
            got = objcache.instantiate(entry)
        except (bpfsys.ProgLoadError, objcache.CacheError, ValueError, KeyError, TypeError):
            objcache.discard(directory, key)       # stale (a kernel update) or damaged: recompile
            return None
        except OSError:
            return None                            # not the entry's fault: compile as usual
        self.fds = got.fds
        self.cache = "hit"
        self.loaded_from_cache = True
        return got.reply

    def _compile(self, request: dict) -> dict:
        """bcc in a child process (compiler.py): the reply and, in self.fds, its descriptors."""
        preflight_compile()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # its own session: a Ctrl-C at the terminal goes to the tracer, which finishes the
            # load and stops cleanly, not to the compile, whose death would be an error
            proc = subprocess.Popen([sys.executable, "-m", "bpftrace_hostport.ebpf.compiler", str(child.fileno())],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, pass_fds=(child.fileno(),),
                                    start_new_session=True)
            child.close()
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
            parent.settimeout(300)
            try:
                msg, fds, _flags, _addr = bpfsys.recv_fds(parent)
            except socket.timeout:
                proc.kill()
                raise UserError("Compiling the eBPF programs took more than 300 s; is the machine overloaded?") from None
            self.fds = list(fds)
            if msg:
                with contextlib.suppress(OSError):
                    parent.send(b"k")
            err = proc.stderr.read().decode(errors="replace")
            proc.wait(timeout=60)
        finally:
            parent.close()
            child.close()
        if not msg:
            tail = " | ".join(err.strip().splitlines()[-2:]) or f"exit status {proc.returncode}"
            raise UserError(f"The eBPF compiler process failed ({tail}); is python3-bpfcc installed?")
        reply = json.loads(msg)
        if not reply["ok"]:
            self._explain(reply)
        return reply

    def _explain(self, reply: dict) -> None:
        out = reply.get("log", "")
        if reply["kind"] == "compile":
            if "file not found" in out:
                missing = re.search(r"'([^']+)' file not found", out)
                raise UserError(
                    f"bcc could not compile the tracer: kernel header {missing.group(1) if missing else ''} "
                    f"is missing; install linux-headers-{platform.release()} or run scripts/setup.sh.")
            tail = " | ".join(out.strip().splitlines()[-3:])
            raise UserError(f"bcc could not compile the tracer ({reply['message']}): {tail}")
        if reply["kind"] == "load":
            raise KernelFeatureMissing(f"The kernel refused the netfilter BPF programs ({reply['message']}); "
                                       "the full tracer needs Linux >= 6.4 (BPF_PROG_TYPE_NETFILTER); "
                                       "use --backend conntrack on older kernels.")
        raise UserError(f"Could not attach skb:kfree_skb ({reply['message']}); rerun with --no-drops.")

    def set_options(self, opts: ProbeOptions) -> None:
        """The options it will attach with: the same as it was loaded with but for
        ATTACH_TIME_OPTIONS (what to watch, known once the pods and rules are read)."""
        same = {f: getattr(self.opts, f) for f in ATTACH_TIME_OPTIONS}
        if dataclasses.replace(opts, **same) != self.opts:
            raise ValueError("the probe was loaded with other sizes or options")
        self.opts = opts

    # -- attach ------------------------------------------------------------------------------
    def attach(self) -> None:
        """Configures the maps and creates the netfilter links (`priority`: where they went;
        `priority_note`: why not at the first one, or "")."""
        self.configure()
        with netns_mod.entered(self.opts.netns):
            try:
                self.links, self.priority, self.priority_note = link_all(attach_points(self.prog_fds))
                # Held as long as the links: the kernel does not say which namespace a link is
                # in, and another tracer finding this one at its priority reads it here
                # (nflink.link_holders).
                self.netns_fd = os.open(netns_mod.THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
            except UserError:
                self.close()
                raise

    def configure(self) -> None:
        cfg = self.maps["config"]
        c = cfg.Leaf()
        c.watch_all = 0 if self.opts.watch_ports else 1
        c.client_filter = 1 if self.opts.client_cidrs else 0
        mask = 0
        for p in self.opts.protos:
            mask |= protomod.MASK_BITS[p]
        c.proto_mask = mask
        c.no_records = 0 if self.opts.records else 1
        cfg.update(ctypes.c_uint32(0), c)
        ids = self.maps["free_ids"]
        for i in range(ids.max_entries):
            ids.push(ctypes.c_uint32(i))
        self.set_watch_ports(self.opts.watch_ports)
        cl = self.maps["client_cidrs"]
        for cidr in self.opts.client_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            k = cl.Key()
            k.prefixlen = 8 + net.prefixlen
            k.family = net.version
            ctypes.memmove(k.addr, net.network_address.packed, len(net.network_address.packed))
            cl.update(k, ctypes.c_uint8(1))

    def set_watch_ports(self, ports: Iterable[Tuple[str, int]]) -> None:
        """Sets each port's bit in `watch_ports` (a bitmap per protocol, WATCH_WORDS words each)."""
        wp = self.maps["watch_ports"]
        for proto, port in ports:
            port = int(port)
            i = WATCH_SLOTS[proto] * WATCH_WORDS + (port >> 6)
            k = ctypes.c_uint32(i)
            word = wp.lookup(k)
            wp.update(k, ctypes.c_uint64((word.value if word is not None else 0) | (1 << (port & 63))))

    def _addr_key(self, fam: int, packed: bytes):
        k = self.maps["local_addrs"].Key()
        k.family = fam
        ctypes.memmove(k.addr, packed, len(packed))
        return k

    def set_local_addrs(self, addrs: Iterable[str]) -> None:
        la = self.maps["local_addrs"]
        want = set()
        for a in addrs:
            ip = ipaddress.ip_address(a.split("%")[0])
            want.add((ip.version, ip.packed))
        have = {(k.family, bytes(k.addr)[:_tuple_len(k.family)]) for k in la.keys()}
        for fam, packed in want - have:
            la.update(self._addr_key(fam, packed), ctypes.c_uint8(1))
        for fam, packed in have - want:
            la.delete(self._addr_key(fam, packed))

    # -- reading -------------------------------------------------------------------------------
    def event_layout(self):
        """(flow_key ctypes class, flow_val ctypes class, offset of val in flow_event)."""
        return self.maps["flows"].Key, self.maps["flows"].Leaf, self._val_off

    def consume(self) -> bytes:
        """Answered-flow records waiting in the ring buffer: flow_event records back to back.

        The kernel submits them without a wakeup (BPF_RB_NO_WAKEUP): reading them in batches
        on a timer costs a few memory reads per batch instead of a wakeup per flow.
        """
        return self.ring.consume_fixed(self.event_size)

    def _raw_event(self, k, v) -> bytes:
        return bytes(k) + bytes(self._val_off - self._key_size) + bytes(v)

    def take_pending(self, older_than_ns: Optional[int]) -> List[bytes]:
        """Claims the flows still in `flows` that began before `older_than_ns` (None: all of
        them): unanswered ones, and answered ones whose ring-buffer record was deferred.

        Deleting a flow's entry is the claim: the kernel reports a flow as answered only if it
        can still delete that entry, so each flow is reported exactly once; the value comes
        back with the delete (BPF_MAP_LOOKUP_AND_DELETE_ELEM), as it was at the claim. The
        flow goes to `claimed` first (its conntrack entry, ports and mapping), so that its later
        packets (a late reply, a retransmission) add to its mapping's counters and do not start
        a flow again.
        """
        import numpy as np                  # only once tracing: the probe loads before numpy
        flows, later = self.maps["flows"], self.maps["claimed"]
        ks, vs = flows.key_size, flows.value_size
        due = []
        for n, keys, values, first in self._flow_chunks():   # one read, not two calls a flow
            for i in (range(n) if older_than_ns is None else np.flatnonzero(first <= older_than_ns).tolist()):
                due.append((flows.Key.from_buffer_copy(keys, i * ks), flows.Leaf.from_buffer_copy(values, i * vs)))
        out = []
        for k, v in due:
            later.update(ctypes.c_uint64(v.ct), later.Leaf(client_port=k.client_port, host_port=k.host_port,
                                                           mapping_id=v.mapping_id))
            claimed = flows.lookup_and_delete(k)
            if claimed is not None:       # None: the kernel reported it meanwhile
                out.append(self._raw_event(k, claimed))
        return out

    def flows_earliest_ns(self) -> Optional[int]:
        """The earliest first_ns of the flows in `flows` (None: there is none), read in one
        batch (a read only: nothing is claimed) rather than a lookup per flow."""
        earliest = None
        for _n, _keys, _values, first in self._flow_chunks():
            lo = int(first.min())
            earliest = lo if earliest is None else min(earliest, lo)
        return earliest

    def _flow_chunks(self):
        """The flow table in batch reads: (n, keys, values, the n flows' first_ns as a numpy
        view of the values), empty chunks left out."""
        import numpy as np                  # only once tracing: the probe loads before numpy
        fl = self.maps["flows"]
        off, vs = fl.Leaf.first_ns.offset, fl.value_size
        for n, keys, values in fl.chunks():
            if n:
                yield n, keys, values, np.ndarray((n,), "<u8", values, off, (vs,))

    def read_misses(self):
        return self.maps["misses"].items()

    def read_mappings(self) -> List[Tuple[object, dict]]:
        """(mapping_key, counters) per mapping: each mapping's id, then its slot of the per-CPU
        counters (flows, packets, bytes: summed over CPUs) and of the outcome array (answered,
        lat_sum_ns, lat_hist: a list of LAT_BUCKETS counts, refused: a list of REFUSALS counts
        by events.h's REFUSAL_* index).

        Read once a second with metrics: the ids in one batch, then each array over the ids'
        range in one call (ids are handed out from 0 upwards), not two lookups per mapping."""
        counts, lats = self.maps["mappings"], self.maps["mapping_lat"]
        ids = [(k, mid.value) for k, mid in self.maps["mapping_ids"].items()
               if mid.value < min(counts.max_entries, lats.max_entries)]
        slots = [mid for _, mid in ids]
        out = []
        for (k, _), per_cpu, lat in zip(ids, counts.values_at(slots), lats.values_at(slots)):
            c = {f: sum(getattr(v, f) for v in per_cpu) for f in ("flows", "packets", "bytes")}
            c.update(answered=int(lat.answered), lat_sum_ns=int(lat.lat_sum_ns), lat_hist=list(lat.lat_hist),
                     refused=list(lat.refused))
            out.append((k, c))
        return out

    def read_drops(self):
        return [(k.mapping, k.reason, v.value) for k, v in self.maps["drops"].items()]

    def read_stats(self) -> dict:
        """The kernel's counters (STAT_NAMES), summed over CPUs: the per-CPU array in one call."""
        cpus = bpfsys.possible_cpus()
        raw = self.maps["stats"].values_raw(0, len(STAT_NAMES))
        per_cpu = struct.unpack(f"<{len(STAT_NAMES) * cpus}Q", raw)
        return {name: sum(per_cpu[i * cpus:(i + 1) * cpus]) for i, name in enumerate(STAT_NAMES)}

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links = []
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1
        self._release()

    def _release(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        self.maps = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
