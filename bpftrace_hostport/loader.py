"""Compile, load, attach, read and detach the kernel side. The only module that imports bcc.

Struct offsets come from BTF (btf.py) and are handed to the compile as -D constants; the
kernel headers bcc needs are used only for its own helper definitions, never for a layout.
Everything this module returns is raw (bcc ctypes records); events.py gives them meaning.
"""
from __future__ import annotations

import contextlib
import importlib.util
import ctypes
import ipaddress
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from . import nflink, netns as netns_mod
from .btf import BTF, BTFError
from .errors import KernelFeatureMissing, UserError

PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
PROTO_MASK_BITS = {"tcp": 1, "udp": 2, "sctp": 4}

TRACEFS = "/sys/kernel/tracing"
KFREE_SKB_FORMAT = TRACEFS + "/events/skb/kfree_skb/format"

# Attach points. Priorities relative to netfilter's own (include/uapi/linux/netfilter_ipv4.h):
# NAT_DST + 1 = -99 runs just after DNAT, so the packet's daddr is already the pod's and the
# conntrack entry holds both tuples; NAT_SRC + 1 = 101 runs just after masquerade.
ATTACH_POINTS = (
    ("nf_prerouting_post_dnat", nflink.NF_INET_PRE_ROUTING, nflink.NF_IP_PRI_NAT_DST + 1),
    ("nf_output_post_dnat", nflink.NF_INET_LOCAL_OUT, nflink.NF_IP_PRI_NAT_DST + 1),
    ("nf_postrouting_post_snat", nflink.NF_INET_POST_ROUTING, nflink.NF_IP_PRI_NAT_SRC + 1),
)

# name -> (struct, member path) or ("sizeof", type); resolved from BTF at load time.
OFFSETS = {
    "NF_CTX_SKB": ("bpf_nf_ctx", "skb"),
    "SKB_NFCT": ("sk_buff", "_nfct"),
    "SKB_LEN": ("sk_buff", "len"),
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

STAT_NAMES = ("ringbuf_lost", "flows_created", "pending_full", "flow_insert_errors",
              "reply_without_flow", "drops_seen", "counter_full")


def bpf_source_dir() -> Path:
    """bpf/ at the top of the source tree (the package is installed editable)."""
    for cand in (Path(__file__).resolve().parent.parent / "bpf",
                 Path(sys.prefix) / "share" / "bpftrace-hostport" / "bpf"):
        if (cand / "hostport.bpf.c").exists():
            return cand
    raise UserError("The eBPF sources (bpf/hostport.bpf.c) are missing: reinstall with scripts/setup.sh.")


@dataclass
class ProbeOptions:
    netns: Optional[str] = None                  # named netns; None = the current one
    watch_ports: Sequence[Tuple[str, int]] = ()  # (proto, port); empty = every DNAT to a local address
    protos: Sequence[str] = ()                   # empty = all
    client_cidrs: Sequence[str] = ()
    flow_table_size: int = 65536
    pending_size: int = 16384
    map_size: int = 4096
    ringbuf_pages: int = 256                     # 1 MiB with 4 KiB pages
    drops: bool = True
    debug_print_program: bool = False


def _tuple_len(family: int) -> int:
    return 4 if family == 4 else 16


def preflight() -> None:
    """Checks that need no compile; each failure is one sentence with the fix."""
    if os.geteuid() != 0:
        raise UserError("bpftrace-hostport needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): "
                        "run it with sudo.")
    missing = missing_capabilities()
    if missing:
        raise UserError(f"This process lacks {', '.join(missing)}: run as root with all capabilities "
                        "(in a container: --privileged, or --cap-add BPF,PERFMON,NET_ADMIN,SYS_ADMIN).")
    if importlib.util.find_spec("bcc") is None:
        raise UserError("The bcc Python module is missing: install Debian's python3-bpfcc and run "
                        "from a virtualenv made with --system-site-packages (scripts/setup.sh does both).")
    kver = platform.release()
    build = Path("/lib/modules") / kver / "build"
    if not build.exists():
        raise UserError(f"No kernel headers for {kver} at {build}: install linux-headers-{kver} "
                        "(or run scripts/setup.sh, which links Debian's generic headers as a fallback).")


# include/uapi/linux/capability.h
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def missing_capabilities(status_path: str = "/proc/self/status") -> List[str]:
    """CAP_NET_ADMIN, plus CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN, which implies both)."""
    try:
        eff = next(int(line.split()[1], 16) for line in Path(status_path).read_text().splitlines()
                   if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return []
    has = {name: bool(eff >> bit & 1) for name, bit in CAPS.items()}
    missing = [] if has["CAP_NET_ADMIN"] else ["CAP_NET_ADMIN"]
    if not has["CAP_SYS_ADMIN"]:
        missing += [c for c in ("CAP_BPF", "CAP_PERFMON") if not has[c]]
    return missing


def ensure_tracefs() -> bool:
    """skb:kfree_skb needs tracefs; mount it if it is missing (a mount, not a network change)."""
    if os.path.exists(KFREE_SKB_FORMAT):
        return True
    with contextlib.suppress(Exception):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, timeout=10)
    return os.path.exists(KFREE_SKB_FORMAT)


def tracepoint_field_offsets(fmt_path: str = KFREE_SKB_FORMAT) -> dict:
    """Offsets of skbaddr and reason in the skb:kfree_skb record, from its format file (stable ABI)."""
    text = Path(fmt_path).read_text()
    offs = {}
    for m in re.finditer(r"field:[^;]*?\b(\w+);\s*offset:(\d+);\s*size:(\d+);", text):
        offs[m.group(1)] = int(m.group(2))
    if "skbaddr" not in offs or "reason" not in offs:
        raise UserError(f"{fmt_path} has no skbaddr/reason fields: this kernel's skb:kfree_skb "
                        "lacks drop reasons (needs Linux >= 5.17); rerun with --no-drops.")
    return {"TP_SKBADDR": offs["skbaddr"], "TP_REASON": offs["reason"]}


def drop_reason_names(btf: BTF) -> dict:
    """enum skb_drop_reason from BTF: value -> short name (NETFILTER_DROP)."""
    try:
        values = btf.enum_values("skb_drop_reason")
    except BTFError:
        return {}
    names = {}
    for name, val in values.items():
        short = name
        for prefix in ("SKB_DROP_REASON_", "SKB_"):
            if short.startswith(prefix):
                short = short[len(prefix):]
                break
        names.setdefault(val, short)
    return names


@contextlib.contextmanager
def _stderr_to(path: str):
    """clang prints straight to fd 2; keep it out of the user's terminal unless asked."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Probe:
    """The loaded kernel side. Use as a context manager; close() detaches everything."""

    def __init__(self, opts: ProbeOptions):
        self.opts = opts
        self.links: List[nflink.NetfilterLink] = []
        self.bpf = None
        self.drops_enabled = False
        self._events: list = []
        preflight()
        try:
            self.btf = BTF.load()
        except BTFError as e:
            raise UserError(str(e)) from None
        self.drop_names = drop_reason_names(self.btf)
        self._compile()

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
        defs.update({"FLOW_TABLE_SIZE": o.flow_table_size, "PENDING_SIZE": o.pending_size,
                     "MAP_SIZE": o.map_size, "RINGBUF_PAGES": o.ringbuf_pages})
        self.defines = defs
        return [f"-D{k}={v}" for k, v in sorted(defs.items())] + ["-I" + str(bpf_source_dir())]

    def program_text(self) -> str:
        return (bpf_source_dir() / "hostport.bpf.c").read_text()

    def _compile(self) -> None:
        from bcc import BPF
        cflags = self.cflags()
        text = self.program_text()
        if self.opts.debug_print_program:
            print("\n".join(f"#define {k} {v}" for k, v in sorted(self.defines.items())))
            print(text)
        with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
            try:
                with _stderr_to(log.name):
                    self.bpf = BPF(text=text, cflags=cflags)
            except Exception as e:
                out = Path(log.name).read_text()
                if "file not found" in out:
                    missing = re.search(r"'([^']+)' file not found", out)
                    raise UserError(
                        f"bcc could not compile the tracer: kernel header {missing.group(1) if missing else ''} "
                        f"is missing; install linux-headers-{platform.release()} or run scripts/setup.sh."
                    ) from None
                tail = " | ".join(out.strip().splitlines()[-3:])
                raise UserError(f"bcc could not compile the tracer ({e}): {tail}") from None
        try:
            self.fns = {name: self.bpf.load_func(name, nflink.BPF_PROG_TYPE_NETFILTER,
                                                 attach_type=nflink.BPF_NETFILTER)
                        for name, _, _ in ATTACH_POINTS}
        except Exception as e:
            raise KernelFeatureMissing(f"The kernel refused the netfilter BPF programs ({e}); "
                            "the full tracer needs Linux >= 6.4 (BPF_PROG_TYPE_NETFILTER); "
                            "use --backend conntrack on older kernels.") from None

    # -- attach ------------------------------------------------------------------------------
    def attach(self) -> None:
        self.configure()
        with netns_mod.entered(self.opts.netns):
            for name, hook, prio in ATTACH_POINTS:
                for pf in (nflink.NFPROTO_IPV4, nflink.NFPROTO_IPV6):
                    try:
                        self.links.append(nflink.link_create(self.fns[name].fd, pf, hook, prio))
                    except nflink.LinkError as e:
                        self.close()
                        raise KernelFeatureMissing(
                            f"Could not create the netfilter BPF link at {nflink.HOOK_NAMES[hook]} "
                            f"({e.strerror}); it needs Linux >= 6.4 with CONFIG_NETFILTER_BPF_LINK; "
                            "use --backend conntrack on older kernels.") from None
        if self.drops_enabled:
            self.bpf.attach_tracepoint(tp="skb:kfree_skb", fn_name="tp_kfree_skb")
        fk, fv = self.bpf["flows"].Key, self.bpf["flows"].Leaf
        self._key_size, self._val_size = ctypes.sizeof(fk), ctypes.sizeof(fv)
        align = ctypes.alignment(fv)
        self._val_off = (self._key_size + align - 1) // align * align
        self.bpf["events"].open_ring_buffer(self._on_event)

    def configure(self) -> None:
        cfg = self.bpf["config"]
        c = cfg.Leaf()
        c.watch_all = 0 if self.opts.watch_ports else 1
        c.client_filter = 1 if self.opts.client_cidrs else 0
        mask = 0
        for p in self.opts.protos:
            mask |= PROTO_MASK_BITS[p]
        c.proto_mask = mask
        cfg[ctypes.c_int(0)] = c
        self.set_watch_ports(self.opts.watch_ports)
        cl = self.bpf["client_cidrs"]
        for cidr in self.opts.client_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            k = cl.Key()
            k.prefixlen = 8 + net.prefixlen
            k.family = net.version
            packed = net.network_address.packed
            for i, b in enumerate(packed):
                k.addr[i] = b
            cl[k] = ctypes.c_uint8(1)

    def set_watch_ports(self, ports: Iterable[Tuple[str, int]]) -> None:
        wp = self.bpf["watch_ports"]
        for proto, port in ports:
            k = wp.Key()
            k.port = socket.htons(int(port))
            k.proto = PROTO_NUMBERS[proto]
            wp[k] = ctypes.c_uint8(1)

    def set_local_addrs(self, addrs: Iterable[str]) -> None:
        la = self.bpf["local_addrs"]
        want = set()
        for a in addrs:
            ip = ipaddress.ip_address(a.split("%")[0])
            want.add((ip.version, ip.packed))
        have = set()
        for k in list(la.keys()):
            have.add((k.family, bytes(k.addr)[:_tuple_len(k.family)]))
        for fam, packed in want - have:
            k = la.Key()
            k.family = fam
            for i, b in enumerate(packed):
                k.addr[i] = b
            la[k] = ctypes.c_uint8(1)
        for fam, packed in have - want:
            k = la.Key()
            k.family = fam
            for i, b in enumerate(packed):
                k.addr[i] = b
            with contextlib.suppress(KeyError):
                del la[k]

    # -- reading -------------------------------------------------------------------------------
    def _on_event(self, ctx, data, size):
        # struct flow_event is {flow_key; flow_val}: the flows map's own Key and Leaf types
        # (built by bcc from events.h) decode it. Copy now: the ring memory is reused.
        self._events.append(ctypes.string_at(data, size))

    def event_layout(self):
        """(flow_key ctypes class, flow_val ctypes class, offset of val in flow_event)."""
        return self.bpf["flows"].Key, self.bpf["flows"].Leaf, self._val_off

    def consume(self) -> List[bytes]:
        """Answered-flow records waiting in the ring buffer, as raw flow_event bytes.

        The kernel submits them without a wakeup (BPF_RB_NO_WAKEUP): reading them in batches
        on a timer costs one syscall per batch instead of a wakeup per flow.
        """
        self.bpf.ring_buffer_consume()
        out, self._events = self._events, []
        return out

    def _raw_event(self, k, v) -> bytes:
        return bytes(k) + bytes(self._val_off - self._key_size) + bytes(v)

    def take_pending(self, older_than_ns: Optional[int]) -> List[Optional[bytes]]:
        """Claims unanswered flows queued before `older_than_ns` (None: all of them).

        Deleting the pending entry is the claim: the kernel reports a flow as answered only
        if it can still delete that entry, so each flow is reported exactly once.
        """
        pending, flows = self.bpf["pending"], self.bpf["flows"]
        out = []
        for k, v in list(pending.items()):
            if older_than_ns is not None and v.value > older_than_ns:
                continue
            try:
                del pending[k]
            except KeyError:
                continue          # answered meanwhile: the kernel reported it
            try:
                out.append(self._raw_event(k, flows[k]))
            except KeyError:
                out.append(None)  # evicted from the flow table before its timeout
        return out

    def pending_count(self) -> int:
        return len(list(self.bpf["pending"].keys()))

    def read_misses(self):
        return list(self.bpf["misses"].items())

    def read_mappings(self):
        """(mapping_key, flows, packets, bytes) summed over CPUs."""
        out = []
        table = self.bpf["mappings"]
        for k, per_cpu in table.items():
            out.append((k, sum(v.flows for v in per_cpu), sum(v.packets for v in per_cpu),
                        sum(v.bytes for v in per_cpu)))
        return out

    def read_drops(self):
        return [(k.mapping, k.reason, v.value) for k, v in self.bpf["drops"].items()]

    def read_stats(self) -> dict:
        st = self.bpf["stats"]
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(st[ctypes.c_int(i)]))
        return out

    def flow_table_len(self) -> int:
        return len(list(self.bpf["flows"].keys()))

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links = []
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self.bpf.cleanup()
            self.bpf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
