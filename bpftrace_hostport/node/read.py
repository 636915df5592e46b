"""Reading a node's netfilter state, at a cost that does not grow with rules that do not concern
hostPorts: the one module that runs iptables, nft and ctnetlink for rules, check, trace and the
agent.

A node with 10,000 kube-proxy Services has about 110,000 lines of nat rules and 30,000 chains;
`iptables-save -t nat` of that takes a second or more, `nft -j list ruleset` several seconds and
hundreds of MB. None of it is needed: what hostPort traffic meets is

* in the nat table, the built-in chains and the chains reachable from them, except kube-proxy's
  per-Service trees (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, ...) and the bridge plugin's
  per-pod masquerade chains: portmap's CNI-HOSTPORT-DNAT -> CNI-DN-*, CNI-HOSTPORT-SETMARK,
  CNI-HOSTPORT-MASQ, CRI-O's KUBE-HOSTPORTS -> KUBE-HP-*, Docker's DOCKER, KUBE-MARK-MASQ,
  KUBE-POSTROUTING, KUBE-NODEPORTS;
* in the filter table, FORWARD and INPUT and what they jump to (kube-proxy's per-Service
  KUBE-SERVICES left out: its rules match ClusterIPs, never a DNATed pod address);
* nftables' own tables (portmap's cni_hostport, crio-hostports, firewalld, hand-written ones),
  each listed on its own; iptables-nft's tables and kube-proxy's nftables table are not.

iptables-nft lists one chain in a few milliseconds however big the table (`iptables -t nat -v -S
CHAIN`), so its chains are read one by one, every chain of one depth at once, each by its own
process. iptables-legacy reads a whole table at every call, so a legacy table is saved once
(`iptables-legacy-save -c -t TABLE`, only when /proc/net/ip_tables_names lists it: asking for a
table that does not exist would create it) and cut down to the same chains here. The nftables
tables are found with one netlink dump of the table list (`nft list tables` fetches every rule).
Conntrack is dumped with the kernel's own filters (CTA_FILTER, Linux >= 5.9; status filter >= 5.15):
one dump per (family, protocol, hostPort), and per node address for UDP/SCTP entries DNATed
to a port no rule names any more, so 50,000 unrelated entries are never copied to user space.

Everything runs inside the node's network namespace: the calling thread enters it (setns) and
the tools it starts inherit it, with no `ip netns exec` per call. Nothing here changes the node.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from bpftrace_hostport import netns as netns_mod, proto as protomod

__all__ = ["Netfilter", "read_netfilter", "read_conntrack", "ConntrackRead", "nft_tables"]

TIMEOUT_S = 30
MAX_CHAINS = 2000          # per table and tool: a walk that finds more stops and says so

# Targets that are not chains: never listed as one.
_TARGETS = {
    "ACCEPT", "DROP", "RETURN", "REJECT", "QUEUE", "NFQUEUE", "DNAT", "SNAT", "MASQUERADE", "REDIRECT",
    "NETMAP", "MARK", "CONNMARK", "LOG", "NFLOG", "ULOG", "TRACE", "CT", "NOTRACK", "TPROXY", "TCPMSS",
    "TOS", "TTL", "HL", "DSCP", "CLASSIFY", "CHECKSUM", "AUDIT", "SET", "SECMARK", "CONNSECMARK",
    "IDLETIMER", "LED", "RATEEST", "SYNPROXY", "TEE", "HMARK", "CLUSTERIP", "TCPOPTSTRIP",
}
# Chains whose contents never concern hostPort traffic and can be huge (one per Service or pod).
_SKIP = {
    "nat": re.compile(r"^(KUBE-SERVICES|KUBE-(SVC|SEP|EXT|FW|XLB|SVL)-.*|CNI-[0-9a-f]{24})$"),
    "filter": re.compile(r"^KUBE-SERVICES$"),
}
_SEEDS = {
    "nat": ("PREROUTING", "OUTPUT", "POSTROUTING", "CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK",
            "CNI-HOSTPORT-MASQ", "KUBE-HOSTPORTS", "CRIO-HOSTPORTS-MASQ", "DOCKER", "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING", "KUBE-NODEPORTS"),
    "filter": ("FORWARD", "INPUT"),
}
_BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
# Chains whose existence matters but not their rules (kube-proxy's NodePorts: one rule per NodePort).
_BODYLESS = {"nat": {"KUBE-NODEPORTS"}, "filter": set()}
# Tables that iptables-nft, arptables-nft and ebtables-nft manage under fixed names: read with
# iptables-nft (nft shows their DNAT targets only as opaque xt expressions). kube-proxy's
# nftables table holds one chain per Service and nothing a hostPort packet meets.
_IPTABLES_TABLES = {("ip", t) for t in ("nat", "filter", "mangle", "raw", "security")} | \
    {("ip6", t) for t in ("nat", "filter", "mangle", "raw", "security")} | \
    {("arp", "filter"), ("bridge", "filter"), ("bridge", "nat"), ("bridge", "broute")}
_SKIP_NFT_TABLES = {"kube-proxy"}


@dataclass
class Netfilter:
    """What one read found: iptables text per (source, family, table), nftables JSON items."""
    nat: List[Tuple[str, int, str]] = field(default_factory=list)      # (source, family, `-S` text)
    filter: List[Tuple[str, int, str]] = field(default_factory=list)
    nft_items: List[dict] = field(default_factory=list)                # of the native tables
    nft_tables: List[Tuple[str, str]] = field(default_factory=list)   # (family, name) of every table
    legacy_tables: Dict[int, Set[str]] = field(default_factory=dict)  # family -> legacy tables present
    native: List[Tuple[str, str]] = field(default_factory=list)       # iptables tables nft must read
    notes: List[str] = field(default_factory=list)
    sources_read: int = 0                                              # tools that answered
    sources_tried: int = 0


# --------------------------------------------------------------------------- processes


def _spawn(argvs: Sequence[Sequence[str]]) -> List[Tuple[Optional[int], str, str]]:
    """Runs the commands at once (in the calling thread's network namespace) and collects
    (exit status or None on timeout / failure to start, stdout, stderr) in order."""
    procs = []
    for argv in argvs:
        try:
            procs.append(subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL, text=True))
        except OSError as e:
            procs.append(e)
    out: List[Tuple[Optional[int], str, str]] = []
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        if isinstance(p, OSError):
            out.append((None, "", p.strerror or str(p)))
            continue
        try:
            so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            out.append((p.returncode, so, se))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out.append((None, "", f"did not answer within {TIMEOUT_S} s"))
    return out


def _first_line(s: str) -> str:
    return next((ln.strip() for ln in s.splitlines() if ln.strip() and not ln.startswith("# Warning")), "")


def _missing_chain(err: str) -> bool:
    # iptables 1.8.9 (nft) says "chain `X' in table `nat' is incompatible" for a chain that does
    # not exist; older ones "No chain/target/match by that name".
    return "No chain/target/match" in err or "is incompatible" in err or "does not exist" in err


# --------------------------------------------------------------------------- iptables chains


def _targets(lines: Iterable[str]) -> List[str]:
    out = []
    for ln in lines:
        if not ln.startswith("-A "):
            continue
        parts = ln.split()
        for i, tok in enumerate(parts[:-1]):
            if tok in ("-j", "--jump", "-g", "--goto"):
                t = parts[i + 1]
                if t not in _TARGETS and t not in out:
                    out.append(t)
    return out


def _follow(table: str, chain: str) -> bool:
    return chain not in _TARGETS and not _SKIP[table].match(chain)


def _walk(table: str, read: Callable[[List[str]], Dict[str, Optional[List[str]]]]) -> Tuple[str, bool]:
    """Chains from the seeds, depth by depth; `read` lists a batch of chains (None: no such chain).
    Returns the text (the chains' `-P`/`-N`/`-A` lines, seeds first) and whether the cap was hit."""
    got: Dict[str, Optional[List[str]]] = {}
    pending = [c for c in _SEEDS[table]]
    capped = False
    while pending:
        if len(got) + len(pending) > MAX_CHAINS:
            pending = pending[:max(0, MAX_CHAINS - len(got))]
            capped = True
        if not pending:
            break
        got.update(read(pending))
        for c in pending:
            if c in _BODYLESS[table] and got.get(c) is not None:
                got[c] = [f"-N {c}"]
        nxt: List[str] = []
        for c in pending:
            for t in _targets(got.get(c) or ()):
                if t not in got and t not in nxt and _follow(table, t):
                    nxt.append(t)
        pending = nxt
    lines: List[str] = []
    for c, body in got.items():
        if body is None:
            continue
        if c not in _BUILTIN and not any(ln.startswith("-N ") for ln in body):
            lines.append(f"-N {c}")
        lines.extend(body)
    return "\n".join(lines) + ("\n" if lines else ""), capped


def _nft_backend_reader(tool: str, table: str, notes: List[str], what: str, state: dict):
    def read(chains: List[str]) -> Dict[str, Optional[List[str]]]:
        results = _spawn([[tool, "-t", table, "-v", "-S", c] for c in chains])
        out: Dict[str, Optional[List[str]]] = {}
        for c, (rc, so, se) in zip(chains, results):
            if rc == 0:
                out[c] = [ln.strip() for ln in so.splitlines() if ln.strip() and not ln.startswith("#")]
                state["ok"] = True
            elif rc is not None and _missing_chain(se):
                out[c] = None
                if c in _BUILTIN and "incompatible" in se:
                    state.setdefault("incompatible", []).append(c)
                else:
                    state["ok"] = True
            else:
                out[c] = None
                why = _first_line(se) or (f"exit status {rc}" if rc is not None else "it could not be run")
                state.setdefault("errors", []).append(why)
        return out
    return read


def _legacy_reader(text: str):
    """A `read` over one saved table: chain -> its lines, from an iptables-legacy-save text."""
    body: Dict[str, List[str]] = {}
    policies: Dict[str, str] = {}
    declared: Set[str] = set()
    for ln in text.splitlines():
        ln = ln.strip()
        if ln.startswith(":"):
            parts = ln[1:].split()
            if parts:
                declared.add(parts[0])
                if len(parts) > 1 and parts[1] != "-":
                    policies[parts[0]] = parts[1]
            continue
        bare = ln[ln.index("]") + 1:].lstrip() if ln.startswith("[") and "]" in ln else ln
        if bare.startswith("-A "):
            chain = bare.split(" ", 2)[1]
            if ln.startswith("["):                 # [p:b] -A ... -> -A ... -c p b (as `-v -S` puts it)
                p, _, b = ln[1:ln.index("]")].partition(":")
                ln = f"{bare} -c {p} {b}"
            body.setdefault(chain, []).append(ln)

    def read(chains: List[str]) -> Dict[str, Optional[List[str]]]:
        out: Dict[str, Optional[List[str]]] = {}
        for c in chains:
            if c not in declared:
                out[c] = None
            elif c in policies:
                out[c] = [f"-P {c} {policies[c]}"] + body.get(c, [])
            else:
                out[c] = [f"-N {c}"] + body.get(c, [])
        return out
    return read


def _read_iptables(nf: Netfilter, tables: Sequence[str]) -> None:
    for fam, base in ((4, "iptables"), (6, "ip6tables")):
        v = "IPv6 " if fam == 6 else ""
        legacy = nf.legacy_tables.get(fam, set())
        for table in tables:
            # iptables-nft: chain by chain
            tool = f"{base}-nft"
            nf.sources_tried += 1
            if shutil.which(tool) is None:
                nf.notes.append(f"{tool} not found; skipped the {v}{table} table of iptables-nft.")
            else:
                state: dict = {}
                text, capped = _walk(table, _nft_backend_reader(tool, table, nf.notes, table, state))
                if state.get("errors") and not state.get("ok"):
                    nf.notes.append(f"{tool} failed ({state['errors'][0]}); skipped the {v}{table} table "
                                    "of iptables-nft.")
                else:
                    nf.sources_read += 1
                    if state.get("incompatible"):
                        nf.notes.append(f"The {v}{table} table has nftables rules iptables-nft cannot show "
                                        f"({', '.join(state['incompatible'])}); they are read with nft.")
                        state["native"] = True
                    if capped:
                        nf.notes.append(f"Read the first {MAX_CHAINS} chains of the {v}{table} table only.")
                    getattr(nf, table).append(("iptables-nft", fam, text))
                if state.get("native"):
                    nf.native.append(("ip6" if fam == 6 else "ip", table))
            # iptables-legacy: only a table that exists, saved once
            if table not in legacy:
                continue
            tool = f"{base}-legacy-save"
            nf.sources_tried += 1
            if shutil.which(tool) is None:
                nf.notes.append(f"{tool} not found; skipped the {v}{table} table of iptables-legacy.")
                continue
            ((rc, so, se),) = _spawn([[tool, "-c", "-t", table]])
            if rc != 0:
                why = _first_line(se) or (f"exit status {rc}" if rc is not None else "it could not be run")
                nf.notes.append(f"{tool} failed ({why}); skipped the {v}{table} table of iptables-legacy.")
                continue
            nf.sources_read += 1
            text, capped = _walk(table, _legacy_reader(so))
            if capped:
                nf.notes.append(f"Read the first {MAX_CHAINS} chains of the legacy {v}{table} table only.")
            getattr(nf, table).append(("iptables-legacy", fam, text))


# --------------------------------------------------------------------------- nftables


_NFPROTO = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETTABLE = 1
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3


def nft_tables() -> List[Tuple[str, str, int]]:
    """(family, name, chains) of every nftables table of the current namespace, from one netlink
    dump of the table list (NFT_MSG_GETTABLE): no rule is fetched."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    try:
        s.settimeout(5)
        s.bind((0, 0))
        msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETTABLE
        payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        s.send(struct.pack("=IHHII", 16 + len(payload), msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + payload)
        out: List[Tuple[str, str, int]] = []
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, typ, _, _, _ = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return out
                if typ == _NLMSG_DONE:
                    return out
                if typ == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return out
                fam = data[off + 16]
                name, use = None, 0
                a = off + 20
                end = off + length
                while a + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    val = data[a + 4:a + alen]
                    atype &= 0x3FFF
                    if atype == 1:
                        name = val.rstrip(b"\0").decode(errors="replace")
                    elif atype == 3 and len(val) >= 4:
                        (use,) = struct.unpack(">I", val[:4])
                    a += (alen + 3) & ~3
                if name is not None:
                    out.append((_NFPROTO.get(fam, str(fam)), name, use))
                off += (length + 3) & ~3
    finally:
        s.close()


def _read_nft(nf: Netfilter, extra: Sequence[Tuple[str, str]] = ()) -> None:
    import json
    nf.sources_tried += 1
    try:
        tables = nft_tables()
    except OSError as e:
        nf.notes.append(f"The nftables tables could not be listed ({e.strerror or e}); skipped nftables rules.")
        return
    nf.nft_tables = [(f, n) for f, n, _ in tables]
    wanted = [(f, n) for f, n, _ in tables
              if ((f, n) not in _IPTABLES_TABLES and n not in _SKIP_NFT_TABLES) or (f, n) in extra]
    nf.sources_read += 1
    if not wanted:
        return
    if shutil.which("nft") is None:
        nf.notes.append(f"nft not found; skipped the nftables tables {', '.join(f'{f} {n}' for f, n in wanted)}.")
        return
    for (f, n), (rc, so, se) in zip(wanted, _spawn([["nft", "-j", "list", "table", f, n] for f, n in wanted])):
        if rc != 0:
            why = _first_line(se) or (f"exit status {rc}" if rc is not None else "it could not be run")
            nf.notes.append(f"nft failed on table {f} {n} ({why}); skipped it.")
            continue
        try:
            doc = json.loads(so)
        except (ValueError, RecursionError):
            nf.notes.append(f"nft printed something that is not its usual JSON for table {f} {n}; skipped it.")
            continue
        items = doc.get("nftables") if isinstance(doc, dict) else None
        if isinstance(items, list):
            nf.nft_items.extend(i for i in items if isinstance(i, dict) and "metainfo" not in i)


# --------------------------------------------------------------------------- one read


def _proc_net(name: str) -> str:
    # /proc/net is the namespace of the process's main thread; this thread may have entered another.
    try:
        with open(f"/proc/thread-self/net/{name}") as f:
            return f.read()
    except OSError:
        return ""


def read_netfilter(netns: Optional[str] = None, tables: Sequence[str] = ("nat", "filter")) -> Netfilter:
    """The node's iptables chains that concern hostPorts (both backends, both families) and its
    native nftables tables, each tool run once (see the module's docstring)."""
    nf = Netfilter()
    with netns_mod.entered(netns):
        nf.legacy_tables = {4: set(_proc_net("ip_tables_names").split()),
                            6: set(_proc_net("ip6_tables_names").split())}
        _read_iptables(nf, tables)
        _read_nft(nf, nf.native)
    return nf


class _Cache:
    """The last read per namespace, for callers that ask again within a moment (a trace's start
    asks for the rules from its pod source, its watch list and its recording's snapshot)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: Dict[Tuple[Optional[str], Tuple[str, ...]], Tuple[float, Netfilter]] = {}

    def get(self, netns: Optional[str], tables: Tuple[str, ...], max_age: float) -> Netfilter:
        now = time.monotonic()
        with self.lock:
            for (ns, have), (when, nf) in self.entries.items():
                if ns == netns and set(tables) <= set(have) and max_age > 0 and now - when <= max_age:
                    return nf
        nf = read_netfilter(netns, tables)
        with self.lock:
            self.entries = {k: v for k, v in self.entries.items() if k[0] != netns}
            self.entries[(netns, tuple(tables))] = (time.monotonic(), nf)
        return nf


CACHE = _Cache()


# --------------------------------------------------------------------------- conntrack


@dataclass
class ConntrackRead:
    entries: list = field(default_factory=list)          # parse.CtEntry
    stats: Dict[str, int] = field(default_factory=dict)  # conntrack -S, summed over CPUs
    how: str = "netlink"                                 # "netlink" | "conntrack tool"
    filtered_in_kernel: bool = True
    notes: List[str] = field(default_factory=list)


_IPS_DST_NAT = 0x20


def read_conntrack(netns: Optional[str], ports: Iterable[Tuple[str, int, int]], addresses: Iterable[str] = (),
                   stats: bool = True) -> ConntrackRead:
    """Conntrack entries whose original destination port is one of `ports` ((proto, port, family),
    DNATed or not), plus UDP entries DNATed from one of the node's `addresses` (where a stale entry
    of a port that no rule names any more hides), filtered in the kernel; and the table's
    statistics. Each dump walks the whole table in the kernel (about 20 ms per 50,000 entries),
    so they run four at a time. Raises what netlink raises (the caller falls back to the tool)."""
    from concurrent.futures import ThreadPoolExecutor
    from bpftrace_hostport.node.ctnetlink import CtSocket
    specs = []
    for proto, port, fam in sorted(set(ports)):
        num = protomod.NUMBERS.get(proto.lower())
        if num:
            specs.append(dict(family=fam, proto=num, dport=port))
    addresses = list(dict.fromkeys(addresses))
    for addr in addresses:
        specs.append(dict(family=6 if ":" in addr else 4, proto=protomod.NUMBERS["udp"], daddr=addr,
                          status=_IPS_DST_NAT))
    result = ConntrackRead()
    workers = max(1, min(4, len(specs)))
    with netns_mod.entered(netns):
        socks = [CtSocket() for _ in range(workers)]     # created here, in the namespace
    try:
        def run(i: int) -> list:
            out = []
            for spec in specs[i::workers]:
                out += socks[i].dump(**spec)
            return out
        if workers == 1:
            got = run(0) if specs else []
        else:
            with ThreadPoolExecutor(workers) as pool:
                got = [e for part in pool.map(run, range(workers)) for e in part]
        if stats:
            result.stats = socks[0].stats()
    finally:
        for s in socks:
            s.close()
    seen = set()
    wanted_ports = {(p.upper(), n) for p, n, _ in ports}
    local = set(addresses)
    for e in got:
        key = (e.family, e.proto, e.orig_src, e.orig_sport, e.orig_dst, e.orig_dport)
        if key in seen:
            continue
        # A kernel that ignored the filter (older than 5.9) dumped everything: keep what was asked.
        if (e.proto, e.orig_dport) not in wanted_ports and not (
                e.dnat and e.orig_dst in local and e.proto == "UDP"):
            result.filtered_in_kernel = False
            continue
        seen.add(key)
        result.entries.append(e)
    return result


def sample_conntrack(netns: Optional[str], limit: int = 4000) -> list:
    """The first `limit` entries of an unfiltered dump (in hash order, so a fair sample of a table
    too big to read whole): who fills a full table."""
    from bpftrace_hostport.node.ctnetlink import CtSocket
    with netns_mod.entered(netns):
        sock = CtSocket()
    with sock:
        return sock.dump(0, limit=limit)
