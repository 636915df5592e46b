"""What a node looks like to a hostPort packet, gathered once as plain data.

`gather(netns, resolver_or_index)` reads, inside the node's network namespace (None: the current one):

* the hostPort DNAT mappings (`rules.read_node_rules`) and, from the nat tables, the facts around
  them that the mappings alone do not show: the order in which CNI-HOSTPORT-DNAT / KUBE-HOSTPORTS
  jump to the per-pod chains (the first match wins), whether PREROUTING / OUTPUT reach those
  chains, and whether portmap's hairpin pieces (CNI-HOSTPORT-SETMARK / -MASQ) are all there;
* the conntrack entries that were DNATed (pyroute2's ctnetlink dump, opened inside the namespace;
  `conntrack -L -o extended` when that fails);
* the sysctls that decide whether DNATed packets can move at all (ip_forward, IPv6 forwarding,
  route_localnet on the bridge and on "all", bridge-nf-call-iptables when br_netfilter is loaded);
* the filter tables' FORWARD chains (iptables-nft, ip6tables-nft, the legacy ones only when
  /proc/net/ip_tables_names already lists filter, nftables' own forward base chains);
* the routes to pod IPs, local addresses and listening sockets.

Nothing here changes the node: no legacy table is ever instantiated (`iptables-legacy-save -t X`
would create table X), no sysctl is written. Every source that cannot be read is skipped and
named in `notes`. The parsing helpers (`nat_summary`, `filter_table`, `parse_conntrack_text`,
`parse_sysctl_text`, `nft_forward_chains`) are pure, so the checks can be tested on captured text.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from bpftrace_hostport import netns as netns_mod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.node import rules as rules_mod

__all__ = [
    "NodeView", "CtEntry", "NatSummary", "FilterTable", "NftForwardChain",
    "gather", "mappings", "rule_rank", "rule_conflicts", "live_pods", "local_pods", "this_node", "pod_index", "is_synthetic", "pod_label",
    "nat_summary", "filter_table", "parse_conntrack_text", "parse_sysctl_text",
    "nft_forward_chains", "parse_rule_line",
]

_TIMEOUT_S = 30
_ROUTE_LOOKUPS_MAX = 5000
LIVE_PHASES = (None, "Running", "Pending")

# ctnetlink status bits (include/uapi/linux/netfilter/nf_conntrack_common.h)
_IPS_BITS = {0x1: "EXPECTED", 0x2: "SEEN_REPLY", 0x4: "ASSURED", 0x8: "CONFIRMED", 0x10: "SRC_NAT",
             0x20: "DST_NAT", 0x200: "DYING"}
_IPS_DST_NAT = 0x20
_PROTO_BY_NUM = {6: "TCP", 17: "UDP", 132: "SCTP"}
_TCP_STATES = {0: "NONE", 1: "SYN_SENT", 2: "SYN_RECV", 3: "ESTABLISHED", 4: "FIN_WAIT", 5: "CLOSE_WAIT",
               6: "LAST_ACK", 7: "TIME_WAIT", 8: "CLOSE", 9: "SYN_SENT2"}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CtEntry:
    """One DNATed conntrack entry: the client's tuple and the pod's answer tuple."""
    proto: str                      # "TCP" | "UDP" | "SCTP"
    orig_src: str
    orig_dst: str                   # the address the client called (a node IP, 127.0.0.1, ...)
    orig_sport: int
    orig_dport: int                 # the hostPort
    reply_src: str                  # the pod the entry is DNATed to
    reply_dst: str                  # the client, or the masquerade address
    reply_sport: int                # the containerPort
    reply_dport: int
    family: int = 4
    status: Tuple[str, ...] = ()    # "ASSURED", "SEEN_REPLY", "DST_NAT", ...; "UNREPLIED" from text
    timeout: Optional[int] = None   # seconds left
    state: Optional[str] = None     # TCP state name


@dataclass(frozen=True)
class NatSummary:
    """The hostPort plumbing of one nat table (one tool, one family), beyond the DNAT rules."""
    source: str                     # "iptables-nft" | "iptables-legacy"
    family: int
    chains: Tuple[str, ...] = ()
    # Jumps from CNI-HOSTPORT-DNAT and KUBE-HOSTPORTS, in evaluation order: (target, proto, ports)
    # with ports None when the jump does not filter on ports.
    dnat_jumps: Tuple[Tuple[str, Optional[str], Optional[Tuple[int, ...]]], ...] = ()
    hooked_from: Tuple[str, ...] = ()      # built-in chains that jump to CNI-HOSTPORT-DNAT
    setmark_sources: Tuple[str, ...] = ()  # -s of the jumps to CNI-HOSTPORT-SETMARK
    setmark_marks: bool = False            # CNI-HOSTPORT-SETMARK sets a mark
    masq_rule: bool = False                # CNI-HOSTPORT-MASQ masquerades
    postrouting_to_masq: bool = False      # POSTROUTING jumps to CNI-HOSTPORT-MASQ


@dataclass(frozen=True)
class FilterTable:
    """A filter table as `iptables-save -t filter` prints it."""
    source: str                     # "iptables-nft" | "iptables-legacy"
    family: int
    policies: Dict[str, str] = field(default_factory=dict)   # built-in chain -> ACCEPT | DROP
    rules: Tuple[str, ...] = ()                               # the `-A CHAIN ...` lines


@dataclass(frozen=True)
class NftForwardChain:
    """A native nftables base chain on the forward hook (iptables-nft's FORWARD excluded)."""
    family: str                     # "ip" | "ip6" | "inet" | ...
    table: str
    chain: str
    policy: str                     # "accept" | "drop"
    verdicts: Tuple[str, ...] = ()  # "accept", "drop", "jump NAME", ... of its rules


@dataclass
class NodeView:
    netns: Optional[str] = None
    node_name: Optional[str] = None
    rules: List[HostPortRule] = field(default_factory=list)
    rules_read: bool = True                  # False: no rule source could be read at all
    pods: List[PodInfo] = field(default_factory=list)
    pods_known: bool = False                 # False: no pod metadata at all (not even an empty list)
    conntrack: List[CtEntry] = field(default_factory=list)
    conntrack_read: bool = False
    sysctls: Dict[str, str] = field(default_factory=dict)    # "net.ipv4.ip_forward" -> "1"; absent = no such file
    nat: List[NatSummary] = field(default_factory=list)
    filters: List[FilterTable] = field(default_factory=list)
    nft_forward: List[NftForwardChain] = field(default_factory=list)
    local_addresses: List[str] = field(default_factory=list)
    address_ifaces: Dict[str, str] = field(default_factory=dict)              # local address -> its link
    bridges: List[str] = field(default_factory=list)
    interfaces: List[str] = field(default_factory=list)                       # every link's name
    routes: Dict[str, Dict[str, Optional[str]]] = field(default_factory=dict)  # ip -> {ifname, gateway, type}
    listening: List[Tuple[str, str, int]] = field(default_factory=list)        # (proto, addr, port)
    sockets_read: bool = False
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- iptables-save text


@dataclass
class IptRule:
    chain: str
    args: List[Tuple[bool, str, List[str]]]
    text: str

    def get(self, *names: str) -> Optional[Tuple[bool, List[str]]]:
        for neg, opt, values in self.args:
            if opt in names:
                return neg, values
        return None

    def value(self, *names: str) -> Optional[str]:
        got = self.get(*names)
        return got[1][0] if got and not got[0] and got[1] else None

    @property
    def target(self) -> Optional[str]:
        return self.value("-j", "--jump") or self.value("-g", "--goto")


def parse_rule_line(line: str) -> Optional[IptRule]:
    """`[p:b] -A CHAIN args...` -> IptRule (options with their values and `!`), else None."""
    body = line.strip()
    if body.startswith("[") and "]" in body:
        body = body[body.index("]") + 1:].strip()
    r = rules_mod.parse_rule_line(line.strip())
    return IptRule(chain=r.chain, args=r.args, text=body) if r is not None else None


def _table_lines(text: str, table: str) -> Tuple[List[str], Dict[str, str], List[str]]:
    """(chain names, built-in policies, rule lines) of `table` in an iptables-save text.

    A text without any `*table` line (e.g. `iptables -S`) is taken as that table.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    has_tables = any(ln.startswith("*") for ln in lines)
    current = None if has_tables else table
    chains: List[str] = []
    policies: Dict[str, str] = {}
    rules: List[str] = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("*"):
            current = ln[1:].strip()
            continue
        if ln == "COMMIT":
            current = None if has_tables else table
            continue
        if current != table:
            continue
        if ln.startswith(":"):
            parts = ln[1:].split()
            if parts:
                chains.append(parts[0])
                if len(parts) > 1 and parts[1] != "-":
                    policies[parts[0]] = parts[1]
        elif ln.startswith("-P "):                       # `iptables -S` spelling of a policy
            parts = ln.split()
            if len(parts) >= 3:
                chains.append(parts[1])
                policies[parts[1]] = parts[2]
        elif ln.startswith("-N "):
            parts = ln.split()
            if len(parts) >= 2:
                chains.append(parts[1])
        else:
            body = ln[ln.index("]") + 1:].strip() if ln.startswith("[") and "]" in ln else ln
            if body.startswith(("-A ", "-I ")):
                rules.append(ln)
    return chains, policies, rules


def _proto(value: Optional[str]) -> Optional[str]:
    return {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "6": "TCP", "17": "UDP", "132": "SCTP"}.get(
        (value or "").lower())


def _ports(value: Optional[str]) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    out: List[int] = []
    for part in value.split(","):
        if ":" in part:
            lo, _, hi = part.partition(":")
            if lo.isdigit() and hi.isdigit() and int(hi) - int(lo) <= 65535:
                out.extend(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(int(part))
    return tuple(out)


def nat_summary(text: str, source: str = "iptables-nft", family: int = 4) -> NatSummary:
    """The hostPort plumbing found in an iptables-save text's nat table (see NatSummary)."""
    chains, _, lines = _table_lines(text, "nat")
    rules = [r for r in (parse_rule_line(ln) for ln in lines) if r is not None]
    jumps = []
    hooked = []
    setmark_sources = []
    marks = masq = post = False
    for r in rules:
        t = r.target
        if r.chain in ("CNI-HOSTPORT-DNAT", "KUBE-HOSTPORTS") and t and t not in ("RETURN", "ACCEPT"):
            got = r.get("--dports", "--destination-ports", "--dport", "--destination-port")
            ports = _ports(got[1][0]) if got and not got[0] and got[1] else None
            p = r.get("-p", "--protocol")
            jumps.append((t, _proto(p[1][0]) if p and not p[0] and p[1] else None, ports))
        if t == "CNI-HOSTPORT-DNAT" and r.chain in ("PREROUTING", "OUTPUT"):
            hooked.append(r.chain)
        if t == "CNI-HOSTPORT-SETMARK":
            src = r.value("-s", "--source")
            if src and src not in setmark_sources:
                setmark_sources.append(src)
        if r.chain == "CNI-HOSTPORT-SETMARK" and t == "MARK":
            marks = True
        if r.chain == "CNI-HOSTPORT-MASQ" and t in ("MASQUERADE", "SNAT"):
            masq = True
        if r.chain == "POSTROUTING" and t == "CNI-HOSTPORT-MASQ":
            post = True
    return NatSummary(source=source, family=family, chains=tuple(chains), dnat_jumps=tuple(jumps),
                      hooked_from=tuple(dict.fromkeys(hooked)), setmark_sources=tuple(setmark_sources),
                      setmark_marks=marks, masq_rule=masq, postrouting_to_masq=post)


def filter_table(text: str, source: str = "iptables-nft", family: int = 4) -> FilterTable:
    """The filter table of an iptables-save text (or `iptables -S` output)."""
    _, policies, lines = _table_lines(text, "filter")
    return FilterTable(source=source, family=family, policies=policies, rules=tuple(lines))


def nft_forward_chains(doc: Any) -> List[NftForwardChain]:
    """Native forward-hook base chains in `nft -j list ruleset` (a parsed dict or its text)."""
    import json
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            return []
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return []
    chains: Dict[Tuple[str, str, str], dict] = {}
    verdicts: Dict[Tuple[str, str, str], List[str]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        c = item.get("chain")
        if isinstance(c, dict) and c.get("hook") == "forward" and c.get("type", "filter") == "filter":
            if c.get("family") in ("ip", "ip6") and c.get("table") == "filter" and c.get("name") == "FORWARD":
                continue   # iptables-nft's own chain: read with iptables-nft-save
            chains[(c.get("family"), c.get("table"), c.get("name"))] = c
        r = item.get("rule")
        if isinstance(r, dict):
            key = (r.get("family"), r.get("table"), r.get("chain"))
            for expr in r.get("expr") or []:
                if not isinstance(expr, dict):
                    continue
                for verdict in ("accept", "drop", "reject", "return", "continue"):
                    if verdict in expr:
                        verdicts.setdefault(key, []).append(verdict)
                for verdict in ("jump", "goto"):
                    if isinstance(expr.get(verdict), dict):
                        verdicts.setdefault(key, []).append(f"{verdict} {expr[verdict].get('target')}")
    return [NftForwardChain(family=str(k[0]), table=str(k[1]), chain=str(k[2]),
                            policy=str(c.get("policy", "accept")), verdicts=tuple(verdicts.get(k, ())))
            for k, c in chains.items()]


# --------------------------------------------------------------------------- conntrack, sysctl text


def _status_names(bits: int) -> Tuple[str, ...]:
    return tuple(name for bit, name in _IPS_BITS.items() if bits & bit)


def parse_conntrack_text(text: str) -> List[CtEntry]:
    """DNATed entries from `conntrack -L -o extended` (or plain `conntrack -L`) output.

    The text has no NAT flag, so an entry counts as DNATed when its reply source differs from
    the original destination.
    """
    out: List[CtEntry] = []
    for line in text.splitlines():
        toks = line.split()
        if len(toks) < 4 or "=" not in line:
            continue
        if toks[0] in ("ipv4", "ipv6"):   # the family: the addresses tell it below
            toks = toks[2:]
        proto = _proto(toks[0])
        if proto is None:
            continue
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses; u32 seconds at most
        timeout = (int(toks[2]) if len(toks) > 2 and toks[2].isascii() and toks[2].isdigit()
                   and len(toks[2]) <= 9 else None)
        state = None
        tuples: List[Dict[str, str]] = [{}]
        flags: List[str] = []
        for t in toks[3:]:
            if t.startswith("[") and t.endswith("]"):
                flags.append(t[1:-1])
            elif "=" in t:
                k, _, v = t.partition("=")
                if k in ("src", "dst", "sport", "dport"):
                    if k in tuples[-1]:
                        tuples.append({})
                    tuples[-1][k] = v
            elif t.isupper() and state is None and not tuples[0]:
                state = t
        if len(tuples) < 2:
            continue
        o, r = tuples[0], tuples[1]

        def port(v: str) -> int:          # ValueError for "²", "1_0", -1, 70000, 5000 digits
            if not (v.isascii() and v.isdigit() and len(v) <= 5 and int(v) <= 65535):
                raise ValueError(v)
            return int(v)

        try:
            addrs = [ipaddress.ip_address(t[k]) for t in (o, r) for k in ("src", "dst")]
            entry = CtEntry(proto=proto, orig_src=str(addrs[0]), orig_dst=str(addrs[1]),
                            orig_sport=port(o["sport"]), orig_dport=port(o["dport"]),
                            reply_src=str(addrs[2]), reply_dst=str(addrs[3]),
                            reply_sport=port(r["sport"]), reply_dport=port(r["dport"]),
                            family=addrs[0].version, status=tuple(flags), timeout=timeout, state=state)
        except (KeyError, ValueError):
            continue                      # not a whole entry (a cut or damaged line): skipped
        if entry.reply_src != entry.orig_dst:
            out.append(entry)
    return out


def parse_sysctl_text(text: str) -> Dict[str, str]:
    """`sysctl -a` style lines (`key = value`) -> dict."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------- pods


def _pods_of(source: Any) -> Tuple[List[PodInfo], bool]:
    """PodInfos from a Resolver (`.pods()`), a PodIndex (`.pods`), a list, or None."""
    if source is None:
        return [], False
    if isinstance(source, (list, tuple)):
        return list(source), True
    if callable(getattr(source, "refresh", None)):
        source.refresh()
    pods = getattr(source, "pods", None)
    if callable(pods):
        pods = pods()
    return list(pods or []), True


def is_synthetic(pod: PodInfo) -> bool:
    """A pod pieced together from CNI state (pods.sources' CNIStateSource): `cni-<id>`, no namespace."""
    return not pod.namespace and pod.name.startswith("cni-")


def _drop_synthetic_duplicates(pods: List[PodInfo]) -> List[PodInfo]:
    """CNI-state pods that stand for a pod another source already names are dropped."""
    real_ips = {ip for p in pods if not is_synthetic(p) for ip in p.ips}
    return [p for p in pods if not (is_synthetic(p) and set(p.ips) & real_ips)]


def pod_label(namespace: Optional[str], name: Optional[str]) -> str:
    return f"{namespace}/{name}" if namespace else str(name)


def live_pods(view: NodeView) -> List[PodInfo]:
    """Pods that still exist and may hold rules: Running, Pending or without a phase."""
    return [p for p in view.pods if p.phase in LIVE_PHASES]


def _onlink(view: NodeView, ip: str) -> Optional[bool]:
    r = view.routes.get(ip)
    if not r:
        return None
    return r.get("type") in (None, "unicast", "local") and not r.get("gateway") and bool(r.get("ifname"))


def this_node(view: NodeView) -> Optional[str]:
    """The node's name: given, or told from a cluster-wide pod list.

    Told from the pods that the DNAT rules target, or hostNetwork pods with our addresses: when
    they all sit on one node, that node is this one. None when the list names at most one node.
    """
    if view.node_name:
        return view.node_name
    pods = live_pods(view)
    if len({p.node for p in pods if p.node}) <= 1:
        return None
    targets = {r.target_ip for r in view.rules}
    local = set(view.local_addresses) - {"127.0.0.1", "::1"}
    seen = {p.node for p in pods if p.node and set(p.ips) & (local if p.host_network else targets)}
    return seen.pop() if len(seen) == 1 else None


def local_pods(view: NodeView) -> List[PodInfo]:
    """The live pods that run on this node.

    The node name decides when it is known (or told by `this_node`); otherwise a pod network pod is local when its IP is
    routed straight out of one of our interfaces (no gateway), a hostNetwork pod when its IPs are
    ours. With neither (captured data), every pod counts.
    """
    pods = live_pods(view)
    node = this_node(view)
    if node and any(p.node for p in pods):
        return [p for p in pods if p.node in (None, node)]
    if not view.routes and not view.local_addresses:
        return pods
    local = set(view.local_addresses)
    out = []
    for p in pods:
        if p.host_network:
            if not p.ips or set(p.ips) & local or not local:
                out.append(p)
        elif not p.ips or any(_onlink(view, ip) is not False for ip in p.ips):
            out.append(p)
    return out


def pod_index(pods: Iterable[PodInfo]):
    from bpftrace_hostport.pods.index import PodIndex
    return PodIndex(pods)


# --------------------------------------------------------------------------- mappings


def _norm_cid(cid: Optional[str]) -> Optional[str]:
    if not cid:
        return None
    return cid.split("://", 1)[-1]


def rule_rank(view: NodeView) -> Callable[[HostPortRule], Tuple[int, int, int]]:
    """Sort key: the order in which the kernel meets the rules (the first DNAT that matches wins)."""
    order = {id(r): i for i, r in enumerate(view.rules)}
    sources: Dict[str, int] = {}
    for r in view.rules:
        sources.setdefault(r.source, len(sources))

    def rank(r: HostPortRule) -> Tuple[int, int, int]:
        jump = 10 ** 6
        for nat in sorted(view.nat, key=lambda n: n.source != r.source):
            if nat.family != r.family:
                continue
            for i, (target, proto, ports) in enumerate(nat.dnat_jumps):
                if target == r.chain and proto in (None, r.proto) and (ports is None or r.host_port in ports):
                    jump = i
                    break
            if jump < 10 ** 6:
                break
        if jump == 10 ** 6 and r.chain and r.chain.endswith("/hostip_hostports"):
            jump = -1   # portmap nftables: hostports_all jumps to hostip_hostports first
        return (sources.get(r.source, 99), jump, order.get(id(r), 10 ** 6))
    return rank


def _host_ip_key(host_ip: Optional[str]) -> Optional[str]:
    """None for "any local address" (unset, 0.0.0.0, ::), else the address."""
    if not host_ip or host_ip in ("0.0.0.0", "::"):
        return None
    return host_ip


def _overlap(a: Optional[str], b: Optional[str]) -> bool:
    a, b = _host_ip_key(a), _host_ip_key(b)
    return a is None or b is None or a == b


def rule_conflicts(view: NodeView) -> Dict[int, Tuple[str, int]]:
    """Rules that compete for one (family, proto, hostIP, hostPort) with another target:
    id(rule) -> ("wins" | "shadowed", its place in the order the kernel meets them, from 1).
    The first rule that matches takes every new connection; the others never see one."""
    rank = rule_rank(view)
    groups: Dict[Tuple[int, str, int], List[HostPortRule]] = {}
    for r in view.rules:
        groups.setdefault((r.family, r.proto, r.host_port), []).append(r)
    out: Dict[int, Tuple[str, int]] = {}
    for rules in groups.values():
        if len({(r.target_ip, r.target_port) for r in rules}) < 2:
            continue
        ordered = sorted(rules, key=rank)
        for i, r in enumerate(ordered):
            before = [b for b in ordered[:i] if _overlap(b.host_ip, r.host_ip)
                      and (b.target_ip, b.target_port) != (r.target_ip, r.target_port)]
            if before:
                out[id(r)] = ("shadowed", i + 1)
                for b in before:
                    if id(b) not in out:
                        out[id(b)] = ("wins", ordered.index(b) + 1)
    return out


def mappings(view: NodeView) -> List[dict]:
    """Every DNAT rule joined with the pod it reaches: the readable `iptables -t nat -nvL | grep DNAT`.

    One dict per rule, in rule order: host_port, proto, host_ip, target (ip:port), target_ip,
    target_port, namespace, pod, pod_phase, container_port, port_name, container, chain,
    container_id, packets, bytes, source, family, conflict. Pod fields are None when no pod has the
    target IP; conflict is None, or "wins" / "shadowed" when rules to different targets compete for
    one hostPort (see rule_conflicts).
    """
    conflicts = rule_conflicts(view)
    live = live_pods(view)
    index = pod_index(live)
    stale_index = pod_index([p for p in view.pods if p not in live])
    by_cid: Dict[str, PodInfo] = {}
    for p in view.pods:
        for cid in p.container_ids:
            n = _norm_cid(cid)
            if n:
                by_cid[n] = p
    out = []
    for r in view.rules:
        found = index.lookup(r.proto, r.target_ip, r.target_port) or \
            stale_index.lookup(r.proto, r.target_ip, r.target_port)
        pod: Optional[PodInfo] = found[0] if found else None
        cp: Optional[ContainerPort] = found[1] if found else None
        if pod is None and _norm_cid(r.container_id) in by_cid:
            pod = by_cid[_norm_cid(r.container_id)]
            cp = next((c for c in pod.ports if c.container_port == r.target_port
                       and c.protocol == r.proto), None)
        target = f"[{r.target_ip}]:{r.target_port}" if r.family == 6 else f"{r.target_ip}:{r.target_port}"
        out.append({
            "host_port": r.host_port, "proto": r.proto, "host_ip": r.host_ip, "target": target,
            "target_ip": r.target_ip, "target_port": r.target_port,
            "namespace": pod.namespace if pod else None, "pod": pod.name if pod else None,
            "pod_phase": pod.phase if pod else None,
            "container_port": cp.container_port if cp else (r.target_port if pod else None),
            "port_name": cp.name if cp else None, "container": cp.container if cp else None,
            "chain": r.chain, "container_id": r.container_id, "packets": r.packets, "bytes": r.bytes,
            "source": r.source, "family": r.family,
            "conflict": conflicts[id(r)][0] if id(r) in conflicts else None,
        })
    return out


# --------------------------------------------------------------------------- gathering


def _run(netns: Optional[str], argv: Sequence[str], notes: List[str], what: str) -> Optional[str]:
    if shutil.which(argv[0]) is None:
        notes.append(f"{argv[0]} not found; skipped {what}.")
        return None
    try:
        p = subprocess.run(netns_mod.command_prefix(netns) + list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        notes.append(f"{argv[0]} did not answer within {_TIMEOUT_S} s; skipped {what}.")
        return None
    except OSError as e:
        notes.append(f"{argv[0]} could not be run ({e.strerror or e}); skipped {what}.")
        return None
    if p.returncode != 0:
        why = next((ln.strip() for ln in p.stderr.splitlines() if ln.strip()), f"exit status {p.returncode}")
        notes.append(f"{argv[0]} failed ({why}); skipped {what}.")
        return None
    return p.stdout


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _conntrack_netlink(netns: Optional[str]) -> List[CtEntry]:
    from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket

    def tup(t):
        ip = t.get_attr("CTA_TUPLE_IP") if t is not None else None
        pr = t.get_attr("CTA_TUPLE_PROTO") if t is not None else None
        if ip is None or pr is None:
            return None
        v6 = ip.get_attr("CTA_IP_V6_SRC") is not None
        src = ip.get_attr("CTA_IP_V6_SRC") if v6 else ip.get_attr("CTA_IP_V4_SRC")
        dst = ip.get_attr("CTA_IP_V6_DST") if v6 else ip.get_attr("CTA_IP_V4_DST")
        return (src, dst, pr.get_attr("CTA_PROTO_NUM"), pr.get_attr("CTA_PROTO_SRC_PORT") or 0,
                pr.get_attr("CTA_PROTO_DST_PORT") or 0, 6 if v6 else 4)

    async def dump(only_dnat: bool):
        with netns_mod.entered(netns):
            sock = AsyncNFCTSocket(nfgen_family=socket.AF_UNSPEC)
            await sock.setup_endpoint()      # the socket is created here, inside the namespace
        msgs = []
        try:
            # Linux >= 5.15 filters on status in the kernel (a node may hold 100k+ entries);
            # older kernels ignore the filter and we filter below anyway.
            kw = {"status": _IPS_DST_NAT, "status_mask": _IPS_DST_NAT} if only_dnat else {}
            async for m in await sock.dump(**kw):
                msgs.append(m)
        finally:
            sock.close()
        return msgs

    try:
        messages = asyncio.run(dump(True))
    except PermissionError:
        raise
    except Exception:  # noqa: BLE001 - a kernel that rejects the filter: dump everything
        messages = asyncio.run(dump(False))

    out: List[CtEntry] = []
    for m in messages:
        status = m.get_attr("CTA_STATUS") or 0
        o, r = tup(m.get_attr("CTA_TUPLE_ORIG")), tup(m.get_attr("CTA_TUPLE_REPLY"))
        if not o or not r or not status & _IPS_DST_NAT:
            continue
        proto = _PROTO_BY_NUM.get(o[2])
        if proto is None:
            continue
        state = None
        pi = m.get_attr("CTA_PROTOINFO")
        tcp = pi.get_attr("CTA_PROTOINFO_TCP") if pi is not None else None
        if tcp is not None:
            state = _TCP_STATES.get(tcp.get_attr("CTA_PROTOINFO_TCP_STATE"))
        names = _status_names(status)
        if not status & 0x2:
            names = names + ("UNREPLIED",)
        out.append(CtEntry(proto=proto, orig_src=o[0], orig_dst=o[1], orig_sport=o[3], orig_dport=o[4],
                           reply_src=r[0], reply_dst=r[1], reply_sport=r[3], reply_dport=r[4],
                           family=o[5], status=names, timeout=m.get_attr("CTA_TIMEOUT"), state=state))
    return out


def _listening(text: Optional[str], proto: str, v6: bool) -> List[Tuple[str, str, int]]:
    out = []
    for line in (text or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 4:
            continue
        if proto == "TCP" and f[3] != "0A":
            continue
        addr_hex, _, port_hex = f[1].partition(":")
        try:
            port = int(port_hex, 16)
            raw = bytes.fromhex(addr_hex)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = str(ipaddress.IPv6Address(raw))
            else:
                addr = str(ipaddress.IPv4Address(raw[::-1]))
        except ValueError:
            continue
        out.append((proto, addr, port))
    return out


def _sysctl_keys(ifaces: Iterable[str]) -> List[str]:
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
            "net.ipv4.conf.all.route_localnet", "net.ipv4.conf.default.route_localnet",
            "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"]
    for ifname in ifaces:
        keys.append(f"net.ipv4.conf.{ifname}.route_localnet")
    return keys


def _in_netns(netns: Optional[str], view: NodeView, route_ips: List[str]) -> Dict[int, set]:
    """Everything read through setns: sysctls, links, routes, addresses, sockets.

    Returns the legacy (x_tables) tables that exist, by family, from /proc/net/ip*_tables_names.
    """
    from pyroute2 import IPRoute
    with netns_mod.entered(netns):
        ipr = IPRoute()
        try:
            ifnames: Dict[int, str] = {}
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                ifnames[link["index"]] = name
                view.interfaces.append(name)
                info = link.get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
                    view.bridges.append(name)
            addrs = ["127.0.0.1", "::1"]
            for msg in ipr.get_addr():
                a = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if a and a not in addrs:
                    addrs.append(a)
                if a and msg.get("index") in ifnames:
                    view.address_ifaces.setdefault(a, ifnames[msg["index"]])
            view.local_addresses = addrs
            types = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
            for ip in route_ips[:_ROUTE_LOOKUPS_MAX]:
                try:
                    msg = ipr.route("get", dst=ip)[0]
                except Exception:   # noqa: BLE001 - unreachable, bad address: no route known
                    view.routes[ip] = {"ifname": None, "gateway": None, "type": "unreachable"}
                    continue
                view.routes[ip] = {"ifname": ifnames.get(msg.get_attr("RTA_OIF")),
                                   "gateway": msg.get_attr("RTA_GATEWAY"),
                                   "type": types.get(msg["type"], str(msg["type"]))}
            if len(route_ips) > _ROUTE_LOOKUPS_MAX:
                view.notes.append(f"Looked up routes for the first {_ROUTE_LOOKUPS_MAX} of "
                                  f"{len(route_ips)} pod IPs only.")
        finally:
            ipr.close()
        ifaces = list(dict.fromkeys(view.bridges + [r["ifname"] for r in view.routes.values()
                                                    if r.get("ifname")]))
        for key in _sysctl_keys(ifaces):
            value = _read("/proc/sys/" + (_conf_path(key) if ".conf." in key else key.replace(".", "/")))
            if value is not None:
                view.sysctls[key] = value.strip()
        sockets = []
        read_any = False
        for fname, proto, v6 in (("tcp", "TCP", False), ("tcp6", "TCP", True),
                                 ("udp", "UDP", False), ("udp6", "UDP", True)):
            text = _read(f"{_PROC_NET}/{fname}")
            read_any = read_any or text is not None
            sockets += _listening(text, proto, v6)
        view.listening = sorted(set(sockets))
        view.sockets_read = read_any
        return {4: set((_read(f"{_PROC_NET}/ip_tables_names") or "").split()),
                6: set((_read(f"{_PROC_NET}/ip6_tables_names") or "").split())}


# /proc/net is /proc/self/net: the namespace of the process's main thread. This code may run in
# a thread that entered another namespace (the agent's check loop), so read the thread's own.
_PROC_NET = "/proc/thread-self/net"


def _conf_path(key: str) -> str:
    """net.ipv4.conf.<if>.route_localnet -> net/ipv4/conf/<if>/route_localnet (if may hold dots)."""
    head, rest = key.split(".conf.", 1)
    ifname, _, leaf = rest.rpartition(".")
    return f"{head.replace('.', '/')}/conf/{ifname.replace('/', '.')}/{leaf}"


def gather(netns: Optional[str] = None, resolver_or_index: Any = None, *, node_name: Optional[str] = None,
           pods_known: Optional[bool] = None, notes: Sequence[str] = (),
           conntrack: bool = True) -> NodeView:
    """Reads the node (inside network namespace `netns`, None = the current one) into a NodeView.

    `resolver_or_index` is a pods.sources Resolver, a PodIndex, a list of PodInfo, or None (no pod
    metadata: then `pods_known` is False and the checks that need pods say so). `node_name` picks
    this node's pods out of a cluster-wide list. `notes` are carried into the view (e.g. the pod
    sources that were skipped). Needs root for the rules, conntrack and any namespace but our own.
    """
    from bpftrace_hostport.node.rules import read_node_rules
    if netns is not None and os.geteuid() != 0:
        raise UserError("Entering another network namespace needs root: run it with sudo.")
    if netns is not None and "/" not in netns:
        netns_mod.require(netns)
    pod_list, known = _pods_of(resolver_or_index)
    pod_list = _drop_synthetic_duplicates(pod_list)
    view = NodeView(netns=netns, node_name=node_name, pods=pod_list,
                    pods_known=known if pods_known is None else pods_known, notes=list(notes))
    view.rules, rule_notes = read_node_rules(netns)
    view.notes += rule_notes
    # read_node_rules runs five tools and notes each one it had to skip.
    view.rules_read = bool(view.rules) or len([n for n in rule_notes if "skipped" in n]) < 5

    if conntrack:
        _read_conntrack(netns, view)

    ips = [r.target_ip for r in view.rules]
    for p in pod_list:
        if not p.host_network:
            ips += list(p.ips)
    # Where DNATed conntrack entries point: a dead pod's IP still routed onto the pod network is
    # how a stale entry is told from a DNAT to another node (a NodePort endpoint).
    ips += [e.reply_src for e in view.conntrack]
    try:
        legacy = _in_netns(netns, view, list(dict.fromkeys(ips)))
    except PermissionError:
        raise UserError("Reading a network namespace needs root: run it with sudo.") from None

    # nat plumbing and filter tables. Legacy tables only when they already exist: asking
    # iptables-legacy-save for a missing table would create it.
    for fam, nft_tool, legacy_tool in ((4, "iptables-nft-save", "iptables-legacy-save"),
                                       (6, "ip6tables-nft-save", "ip6tables-legacy-save")):
        v = "IPv6 " if fam == 6 else ""
        for table in ("nat", "filter"):
            runs = [(nft_tool, "iptables-nft")]
            if table in legacy[fam]:
                runs.append((legacy_tool, "iptables-legacy"))
            for tool, source in runs:
                text = _run(netns, [tool, "-t", table], view.notes, f"the {v}{table} table of {source}")
                if not text or not text.strip():
                    continue
                if table == "nat":
                    view.nat.append(nat_summary(text, source, fam))
                else:
                    view.filters.append(filter_table(text, source, fam))
    text = _run(netns, ["nft", "-j", "list", "ruleset"], view.notes, "nftables forward chains")
    if text:
        view.nft_forward = nft_forward_chains(text)
    return view


def _read_conntrack(netns: Optional[str], view: NodeView) -> None:
    try:
        view.conntrack = _conntrack_netlink(netns)
        view.conntrack_read = True
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any netlink trouble: try the conntrack tool
        text = _run(netns, ["conntrack", "-L", "-o", "extended"], view.notes, "conntrack entries")
        if text is not None:
            view.conntrack = parse_conntrack_text(text)
            view.conntrack_read = True
            view.notes.append(f"Read conntrack with the conntrack tool (netlink: {e}).")
