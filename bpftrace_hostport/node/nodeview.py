"""The node as a hostPort packet sees it (NodeView, plain data), and what is joined from it:
the live pods of this node, which rule wins among conflicts, the mappings with their pods.

node/gather.py fills a NodeView from the live node; node/parse.py parses the tools' text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.node.parse import CtEntry, FilterTable, NatSummary

LIVE_PHASES = (None, "Running", "Pending")


# --------------------------------------------------------------------------- records


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
    conntrack_stats: Dict[str, int] = field(default_factory=dict)   # `conntrack -S` summed over CPUs
    sysctls: Dict[str, str] = field(default_factory=dict)    # "net.ipv4.ip_forward" -> "1"; absent = no such file
    nat: List[NatSummary] = field(default_factory=list)
    filters: List[FilterTable] = field(default_factory=list)
    # Items of `nft -j list table ...` for the native nftables tables (not iptables-nft's own):
    # portmap's cni_hostport, CRI-O's crio-hostports, firewalld's, hand-written ones.
    nft_items: List[Any] = field(default_factory=list)
    local_addresses: List[str] = field(default_factory=list)
    address_ifaces: Dict[str, str] = field(default_factory=dict)              # local address -> its link
    bridges: List[str] = field(default_factory=list)
    mtus: Dict[str, int] = field(default_factory=dict)                         # link -> MTU
    legacy_tables: Dict[int, List[str]] = field(default_factory=dict)          # family -> x_tables present
    interfaces: List[str] = field(default_factory=list)                       # every link's name
    routes: Dict[str, Dict[str, Optional[str]]] = field(default_factory=dict)  # ip -> {ifname, gateway, type}
    listening: List[Tuple[str, str, int]] = field(default_factory=list)        # (proto, addr, port)
    socket_owners: Dict[Tuple[str, str, int], str] = field(default_factory=dict)  # -> "pid N (comm)", where looked up
    # The pods' own network namespaces, found by their IPs: pod IP -> (how to enter it, its
    # listening sockets). A pod IP missing here: its namespace was not found (pod_netns_missing).
    pod_sockets: Dict[str, Tuple[str, List[Tuple[str, str, int]]]] = field(default_factory=dict)
    pod_netns_missing: List[str] = field(default_factory=list)
    ipvs_services: List[Tuple[str, str, int]] = field(default_factory=list)    # /proc/net/ip_vs virtual services
    ipvs_read: bool = False
    netns_is_host: Optional[bool] = None     # the node's namespace is the host's own (nf_conntrack_max writable)
    conntrack_sample: List[CtEntry] = field(default_factory=list)   # entries of a full table, sampled
    sockets_read: bool = False
    notes: List[str] = field(default_factory=list)
    hostname: Optional[str] = None           # this host's name (the node's name, unless told otherwise)
    target_args: List[str] = field(default_factory=list)   # how `check` was pointed at this node (--lab X)

    def to_dict(self) -> dict:
        return asdict(self)

    def nft_handles(self, family: str, table: str, chain: str, target_ip: str) -> List[int]:
        """Handles of the rules of one nftables chain that DNAT to `target_ip`."""
        out = []
        for item in self.nft_items:
            r = item.get("rule") if isinstance(item, dict) else None
            if not isinstance(r, dict) or (r.get("family"), r.get("table"), r.get("chain")) != (family, table, chain):
                continue
            for e in r.get("expr") or []:
                if isinstance(e, dict) and isinstance(e.get("dnat"), dict) and e["dnat"].get("addr") == target_ip \
                        and isinstance(r.get("handle"), int):
                    out.append(r["handle"])
        return out


# --------------------------------------------------------------------------- pods


def pods_of(source: Any) -> Tuple[List[PodInfo], bool]:
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


def drop_synthetic_duplicates(pods: List[PodInfo]) -> List[PodInfo]:
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


def host_ip_key(host_ip: Optional[str]) -> Optional[str]:
    """None for "any local address" (unset, 0.0.0.0, ::), else the address."""
    if not host_ip or host_ip in ("0.0.0.0", "::"):
        return None
    return host_ip


def overlap(a: Optional[str], b: Optional[str]) -> bool:
    a, b = host_ip_key(a), host_ip_key(b)
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
            before = [b for b in ordered[:i] if overlap(b.host_ip, r.host_ip)
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
