"""Why a hostPort does not work: findings from a NodeView, each with its evidence and its fix.

`findings(view)` is pure (no I/O), so every check runs on captured data in the unit tests.
Severities: "error" (hostPort traffic is lost or goes to the wrong place), "warning" (it breaks
for some clients or soon will), "info" (worth knowing, nothing broken). A healthy node gives no
finding at all. Codes are stable kebab-case ids (`CODES` names them all):

hostnetwork-hostport         a hostNetwork pod declares a hostPort: no DNAT, its own socket serves it
hostport-no-rule             a running pod's declared hostPort has no DNAT rule
leaked-hostport-rule         a DNAT rule points at an IP no live pod has (its CNI DEL never ran)
no-pod-metadata              no pod list: leaked rules cannot be told from live ones
hostport-conflict            two rules / pods claim one (proto, hostIP, hostPort); says who wins
stale-conntrack              UDP/SCTP conntrack entries still DNAT to an old pod IP (a blackhole when a
                             node socket now listens on the port)
ip-forward-off               net.ipv4.ip_forward=0: DNATed packets are never forwarded to pods
ipv6-forwarding-off          the same for IPv6 (net.ipv6.conf.all.forwarding=0)
forward-drop                 the FORWARD chain drops what DNAT sends to pods (or their replies)
hostport-chain-not-hooked    CNI-HOSTPORT-DNAT is not reached from PREROUTING / OUTPUT
localhost-route-localnet-off 127.0.0.1:hostPort cannot work: route_localnet=0 on the pods' bridge
localhost-hostport           the node calls hostPorts on 127.0.0.1 (works; ::1 never can)
localhost-ipv6               the node calls [::1]:hostPort, which cannot work
hairpin-no-masquerade        pods calling a hostPort on their own node get no masquerade
bridge-nf-call-iptables-off  hairpin replies bypass conntrack (br_netfilter off, no masquerade)
"""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.netns import command_prefix_text
from bpftrace_hostport.node.nodeview import (NodeView, host_ip_key, is_synthetic, live_pods, local_pods,
                                             mappings, overlap, pod_label, rule_rank)
from bpftrace_hostport.node.parse import CtEntry, FilterTable
from bpftrace_hostport.node.rules import IptRule, parse_rule_line

__all__ = ["Finding", "findings", "CODES", "SEVERITIES", "has_errors"]

SEVERITIES = ("error", "warning", "info")

CODES = {
    "hostnetwork-hostport": "a hostNetwork pod declares a hostPort (no DNAT; its own socket serves it)",
    "hostport-no-rule": "a running pod's declared hostPort has no DNAT rule",
    "leaked-hostport-rule": "a DNAT rule points at an IP no live pod has",
    "no-pod-metadata": "no pod list, so leaked rules cannot be judged",
    "hostport-conflict": "two rules or pods claim one (proto, hostIP, hostPort)",
    "stale-conntrack": "conntrack entries DNAT a hostPort to an IP that is no longer its pod",
    "ip-forward-off": "net.ipv4.ip_forward is 0",
    "ipv6-forwarding-off": "net.ipv6.conf.all.forwarding is 0",
    "forward-drop": "the FORWARD chain drops DNATed pod traffic",
    "hostport-chain-not-hooked": "CNI-HOSTPORT-DNAT is not reached from PREROUTING or OUTPUT",
    "localhost-route-localnet-off": "127.0.0.1:hostPort needs route_localnet=1 on the pods' bridge",
    "localhost-hostport": "the node reaches hostPorts on 127.0.0.1; ::1 cannot work",
    "localhost-ipv6": "the node calls [::1]:hostPort, which cannot work",
    "hairpin-no-masquerade": "pods calling a hostPort on their own node are not masqueraded",
    "bridge-nf-call-iptables-off": "hairpin replies are bridged past conntrack",
}


@dataclass
class Finding:
    severity: str                   # "error" | "warning" | "info"
    code: str                       # stable kebab-case id, see CODES
    message: str                    # what is wrong, in one or two sentences
    evidence: List[str] = field(default_factory=list)
    fix: Optional[str] = None       # one sentence, exact commands where possible

    def to_dict(self) -> dict:
        return asdict(self)


def has_errors(found: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in found)


# --------------------------------------------------------------------------- helpers


def _label(p: PodInfo) -> str:
    return pod_label(p.namespace, p.name)


def _hp(port: int, proto: str) -> str:
    return f"{port}/{proto}"


def _addr_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _family(ip: Optional[str]) -> Optional[int]:
    try:
        return ipaddress.ip_address(ip).version if ip else None
    except ValueError:
        return None


def _rule_text(r: HostPortRule) -> str:
    where = f"{r.host_ip}:" if r.host_ip and r.family == 4 else (f"[{r.host_ip}]:" if r.host_ip else "")
    counters = f", {r.packets} packets" if r.packets is not None else ""
    return (f"{r.source} {r.chain or '?'}: {where}{r.host_port}/{r.proto} -> "
            f"{_addr_port(r.target_ip, r.target_port)}{counters}")


def _tool(source: str, family: int, save: bool = False) -> str:
    base = "ip6tables" if family == 6 else "iptables"
    kind = "legacy" if source == "iptables-legacy" else "nft"
    return f"{base}-{kind}{'-save' if save else ''}"


def _sh(px: str, command: str) -> str:
    """A pipeline as one command, wrapped for the namespace when there is one."""
    return f"{px}sh -c '{command}'" if px else command


_rank_fn = rule_rank


def _live_ips(view: NodeView) -> Set[str]:
    return {ip for p in live_pods(view) if not p.host_network for ip in p.ips}


def _iface_of(view: NodeView, ip: str) -> Optional[str]:
    r = view.routes.get(ip) or {}
    return r.get("ifname")


# --------------------------------------------------------------------------- checks


def _check_hostnetwork(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    out = []
    px = command_prefix_text(view.netns)
    for pod in pods:
        if not pod.host_network or not pod.host_ports:
            continue
        evidence = [f"pod {_label(pod)}: hostNetwork, IPs {', '.join(pod.ips) or '-'}"]
        severity = "info"
        fixes = []
        for cp in pod.host_ports:
            line = f"{_hp(cp.host_port, cp.protocol)} -> containerPort {cp.container_port}" + \
                   (f" ({cp.name})" if cp.name else "")
            if cp.host_port != cp.container_port:
                severity = "warning"
                line += ": differs; with hostNetwork the process listens on the containerPort, " \
                        "so nothing answers on the hostPort"
                fixes.append(f"set hostPort equal to containerPort ({cp.container_port}) in the pod spec")
            elif view.sockets_read and cp.protocol in ("TCP", "UDP"):
                socks = [s for s in view.listening if s[0] == cp.protocol and s[2] == cp.container_port]
                if socks:
                    line += "; listening: " + ", ".join(f"{s[0].lower()} {_addr_port(s[1], s[2])}" for s in socks)
                else:
                    severity = "warning"
                    line += f"; no {cp.protocol} socket listens on port {cp.container_port} in the node's namespace"
                    fixes.append(f"check that the container runs and listens on port {cp.container_port} "
                                 f"(`{px}ss -lnp 'sport = :{cp.container_port}'`)")
            shadow = [r for r in view.rules if r.proto == cp.protocol and r.host_port == cp.host_port]
            if shadow:
                line += "; a DNAT rule takes this port first (see hostport-conflict)"
            evidence.append(line)
        ports = ", ".join(_hp(cp.host_port, cp.protocol) for cp in pod.host_ports)
        out.append(Finding(
            severity, "hostnetwork-hostport",
            f"Pod {_label(pod)} uses hostNetwork, so its hostPort {ports} gets no DNAT rule: "
            f"clients reach the pod's own socket on the node directly.",
            evidence,
            ("To fix: " + "; ".join(fixes) + ".") if fixes else
            "Nothing to fix: with hostNetwork the hostPort only reserves the port for the scheduler."))
    return out


def _rule_serves(r: HostPortRule, pod: PodInfo, cp: ContainerPort) -> bool:
    return (r.proto == cp.protocol and r.host_port == cp.host_port and r.target_ip in pod.ips
            and r.target_port == cp.container_port)


# Datapaths that serve hostPorts in eBPF, without any nat rule this tool can read.
_EBPF_LINKS = ("cilium_host", "cilium_net", "bpfnatin", "bpfnatout")


def _ebpf_datapath(view: NodeView) -> Optional[str]:
    found = [i for i in view.interfaces if i in _EBPF_LINKS]
    return found[0] if found else None


def _check_missing_rules(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    if not view.rules_read:
        return []
    ebpf = _ebpf_datapath(view)
    out = []
    for pod in pods:
        if pod.host_network or not pod.ips or pod.phase not in (None, "Running"):
            continue
        for cp in pod.host_ports:
            ips = list(pod.ips)
            fam = _family(host_ip_key(cp.host_ip))
            if fam:
                ips = [ip for ip in ips if _family(ip) == fam]
            if not ips:
                continue
            if any(_rule_serves(r, pod, cp) for r in view.rules):
                continue
            others = [r for r in view.rules if r.proto == cp.protocol and r.host_port == cp.host_port]
            evidence = [f"pod {_label(pod)} ({', '.join(pod.ips)}) declares hostPort "
                        f"{_hp(cp.host_port, cp.protocol)} -> {cp.container_port}"
                        + (f" ({cp.name})" if cp.name else "")
                        + (f" on hostIP {cp.host_ip}" if cp.host_ip else "")]
            if others:
                evidence += ["rule for this port goes elsewhere: " + _rule_text(r) for r in others]
            else:
                evidence.append(f"no DNAT rule for {_hp(cp.host_port, cp.protocol)} in any nat table")
            if ebpf and not others:
                evidence.append(f"interface {ebpf} exists: an eBPF datapath (Cilium, Calico eBPF) may serve "
                                "hostPorts without nat rules, which this check cannot see")
            out.append(Finding(
                "info" if ebpf and not others else "error", "hostport-no-rule",
                f"Pod {_label(pod)} declares hostPort {_hp(cp.host_port, cp.protocol)}, but no DNAT rule "
                f"sends it to {_addr_port(ips[0], cp.container_port)}: clients of that port "
                + ("reach another pod." if others else "get no answer (or whatever listens on the node)."),
                evidence,
                f"Recreate the pod so its runtime runs the CNI ADD again (`kubectl -n {pod.namespace} delete pod "
                f"{pod.name}`), and check that the CNI config chains the portmap plugin with "
                f"\"capabilities\": {{\"portMappings\": true}}."))
    return out


def _leak_fix(view: NodeView, rules: List[HostPortRule]) -> str:
    px = command_prefix_text(view.netns)
    r = rules[0]
    if r.source in ("iptables-nft", "iptables-legacy") and r.chain and r.chain.startswith("CNI-DN-"):
        save, restore = _tool(r.source, r.family, save=True), _tool(r.source, r.family) + "-restore"
        pipeline = f"{save} -t nat | grep -v -e {r.chain} | {restore}"
        return (f"Remove the leftover chain and its jumps (what the missing CNI DEL would have done): "
                f"`{_sh(px, pipeline)}`.")
    if r.source == "nftables" and r.chain and "/" in r.chain:
        table, chain = r.chain.split("/", 1)
        fam = "ip6" if r.family == 6 else "ip"
        return (f"Delete its rules from the portmap table: find their handles with "
                f"`{px}nft -a list chain {fam} {table} {chain} | grep {r.container_id or r.target_ip}` "
                f"and run `{px}nft delete rule {fam} {table} {chain} handle <N>` for each.")
    if r.source == "crio":
        return "Restart CRI-O (`systemctl restart crio`) so it re-syncs its hostport rules with its sandboxes."
    if r.source == "docker":
        return "Restart Docker (`systemctl restart docker`) so it rebuilds its DOCKER chain from running containers."
    return f"Delete the DNAT rules to {r.target_ip} from chain {r.chain}."


def _check_leaked(view: NodeView) -> List[Finding]:
    if not view.rules:
        return []
    if not view.pods_known:
        return [Finding(
            "info", "no-pod-metadata",
            f"No pod list was available, so the {len(view.rules)} DNAT rules cannot be matched to pods: "
            "leaked rules (of pods that are gone) and missing rules cannot be judged.",
            [_rule_text(r) for r in view.rules[:10]],
            "Pass the pods: `--pods pods.json` (from `kubectl get pods -A -o json "
            "--field-selector spec.nodeName=NODE`) or `--pods-from kube`.")]
    live = _live_ips(view)
    local = set(view.local_addresses)
    by_chain: Dict[Tuple[str, Optional[str], str], List[HostPortRule]] = {}
    for r in view.rules:
        if r.target_ip in live or r.target_ip in local:
            continue
        by_chain.setdefault((r.source, r.chain, r.target_ip), []).append(r)
    out = []
    for (source, chain, ip), rules in by_chain.items():
        ports = ", ".join(f"{_hp(r.host_port, r.proto)} -> {_addr_port(r.target_ip, r.target_port)}" for r in rules)
        finished = [p for p in view.pods if ip in p.ips and p.phase not in (None, "Running", "Pending")]
        ev = [_rule_text(r) for r in rules]
        if rules[0].container_id:
            ev.append(f"container id (rule comment): {rules[0].container_id}")
        ev.append(f"pod IPs known: {len(live)}; none is {ip}" +
                  (f" (pod {_label(finished[0])} had it and is {finished[0].phase})" if finished else ""))
        out.append(Finding(
            "error", "leaked-hostport-rule",
            f"DNAT chain {chain} ({ports}) points at {ip}, which no live pod has: a leftover of a pod "
            "whose CNI DEL never ran. It still takes the hostPort, so traffic goes nowhere.",
            ev, _leak_fix(view, rules)))
    return out


def _check_conflicts(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    rank = _rank_fn(view)
    maps = mappings(view)
    # Who a rule sends to: its pod, else one name per container (the v4 and v6 rules of one pod
    # have different targets but one container id / per-pod chain).
    who: Dict[int, str] = {}
    unknown: Dict[str, str] = {}
    for r, m in zip(view.rules, maps):
        if m["pod"]:
            who[id(r)] = pod_label(m["namespace"], m["pod"])
            continue
        per_pod_chain = r.chain if r.chain and r.chain.startswith(("CNI-DN-", "KUBE-HP-")) else None
        key = r.container_id or per_pod_chain or r.target_ip
        who[id(r)] = unknown.setdefault(key, f"unknown pod {r.target_ip}")
    # Claims per (proto, hostPort): rules (via the pod they reach) and declarations of local pods.
    claims: Dict[Tuple[str, int], List[Tuple[str, Optional[str], Optional[HostPortRule], Optional[PodInfo]]]] = {}
    for r in view.rules:
        claims.setdefault((r.proto, r.host_port), []).append((who[id(r)], r.host_ip, r, None))
    for pod in pods:
        for cp in pod.host_ports:
            claims.setdefault((cp.protocol, cp.host_port), []).append((_label(pod), cp.host_ip, None, pod))
    out = []
    for (proto, port), cl in sorted(claims.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        owners: Dict[str, List[Optional[str]]] = {}
        for owner, host_ip, _, _ in cl:
            owners.setdefault(owner, []).append(host_ip)
        if len(owners) < 2:
            continue
        names = list(owners)
        clash = any(overlap(a, b) for i, x in enumerate(names) for y in names[i + 1:]
                    for a in owners[x] for b in owners[y])
        if not clash:
            continue
        rules = sorted([c[2] for c in cl if c[2] is not None], key=rank)
        first_rule = {}
        for i, r in enumerate(rules):
            first_rule.setdefault(who[id(r)], i)
        names.sort(key=lambda n: first_rule.get(n, len(rules)))
        host_net = [c[3] for c in cl if c[3] is not None and c[3].host_network]
        evidence = []
        for i, r in enumerate(rules, 1):
            evidence.append(f"{i}. {_rule_text(r)} ({who[id(r)]})")
        for pod in {id(c[3]): c[3] for c in cl if c[3] is not None}.values():
            if pod.host_network:
                evidence.append(f"pod {_label(pod)} declares {_hp(port, proto)} with hostNetwork: "
                                "its own socket on the node")
            elif _label(pod) not in first_rule:
                evidence.append(f"pod {_label(pod)} declares {_hp(port, proto)} but has no rule")
        if rules:
            winner = who[id(rules[0])]
            losers = [n for n in names if n != winner]
            first = "CNI-HOSTPORT-DNAT" if (rules[0].chain or "").startswith("CNI-DN-") else "rule"
            how = (f"new connections go to {winner} ({_addr_port(rules[0].target_ip, rules[0].target_port)}), "
                   f"the first in {first} order")
            if host_net:
                how += "; DNAT happens before local delivery, so a hostNetwork pod's socket never sees them"
        else:
            winner, losers = names[0], names[1:]
            how = "only one process can bind the port on the node; the other fails to start"
        loser_pods = [p for p in pods if _label(p) in losers]
        if loser_pods:
            lp = loser_pods[0]
            how_delete = (f"`crictl rmp -f {lp.name[4:]}` (its sandbox)" if is_synthetic(lp)
                          else f"`kubectl -n {lp.namespace} delete pod {lp.name}`")
            fix = (f"Give {_label(lp)} another hostPort or delete it ({how_delete}); two pods with one "
                   "hostPort only land on a node when something bypasses the scheduler (static pods, spec.nodeName).")
        else:
            fix = "Remove the rules that point at no live pod (see leaked-hostport-rule)."
        out.append(Finding(
            "error", "hostport-conflict",
            f"hostPort {_hp(port, proto)} is claimed by {len(names)} pods: {', '.join(names)}; {how}.",
            evidence, fix))
    return out


def _pod_network(view: NodeView, ip: str, called: str) -> bool:
    """Whether `ip` is on this node's pod network: routed straight out of a link (no gateway)
    that is not the one carrying the address the client called (that is the LAN: another node),
    or into a blackhole route (Calico's route for the node's own block). Unknown routes (captured
    data) count as the pod network."""
    r = view.routes.get(ip)
    if not r:
        return True
    if r.get("type") == "blackhole":
        return True
    if r.get("type") not in (None, "unicast") or r.get("gateway") or not r.get("ifname"):
        return False
    return r["ifname"] != view.address_ifaces.get(called)


_NODEPORT_RANGE = range(30000, 32768)


def _check_stale_conntrack(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    """UDP/SCTP entries DNATed to an IP that no current rule for their hostPort targets.

    With rules for the port: an entry to any other IP is stale (the pod was replaced). Without
    any rule: an entry to an IP that no live pod has is stale whoever declares the port (nobody,
    a hostNetwork pod, a pod that lost its rule), when that IP is on this node's pod network; if a
    local socket now listens on the port, the entry is a blackhole: the client's datagrams go to
    the dead pod and never to that socket (containernetworking/plugins#1190).
    """
    if not view.conntrack_read:
        return []
    ctx = _StaleContext(view, pods)
    return [_stale_finding(view, ctx, key, entries) for key, entries in _stale_groups(view, ctx).items()]


class _StaleContext:
    """What the stale-conntrack check looks entries up in: the rules, declarations and pods."""

    def __init__(self, view: NodeView, pods: List[PodInfo]):
        self.px = command_prefix_text(view.netns)
        self.targets: Dict[Tuple[int, str, int], List[HostPortRule]] = {}
        for r in view.rules:
            self.targets.setdefault((r.family, r.proto, r.host_port), []).append(r)
        self.declaring: Dict[Tuple[str, int], List[PodInfo]] = {}
        for p in pods:
            for cp in p.host_ports:
                self.declaring.setdefault((cp.protocol, cp.host_port), []).append(p)
        self.live = _live_ips(view)
        self.by_pod = {ip: p for p in live_pods(view) for ip in p.ips}


def _stale_groups(view: NodeView, ctx: "_StaleContext") -> Dict[Tuple[int, str, str, int, str], List[CtEntry]]:
    """The stale UDP/SCTP entries, grouped by (family, proto, hostPort address, port, dead IP)."""
    local = set(view.local_addresses)
    kube_proxy = any("KUBE-NODEPORTS" in n.chains for n in view.nat)
    groups: Dict[Tuple[int, str, str, int, str], List[CtEntry]] = {}
    for e in view.conntrack:
        if e.proto not in ("UDP", "SCTP") or e.reply_src == e.orig_dst:
            continue
        if local and e.orig_dst not in local:
            continue            # not a hostPort DNAT (a Service IP, ...)
        if e.reply_src in local:
            continue
        now = ctx.targets.get((e.family, e.proto, e.orig_dport), [])
        if now:
            stale = e.reply_src not in {r.target_ip for r in now}
        elif not view.pods_known or e.reply_src in ctx.live:
            stale = False       # no pod list: a dead pod cannot be told; a live one: not stale
        elif (e.proto, e.orig_dport) in ctx.declaring:
            stale = True
        else:
            # Nobody declares the port and no rule exists: stale when the entry still points into
            # this node's pod network (not at another node: a NodePort endpoint, say).
            stale = _pod_network(view, e.reply_src, e.orig_dst) and not (
                kube_proxy and e.orig_dport in _NODEPORT_RANGE)
        if stale:
            groups.setdefault((e.family, e.proto, e.orig_dst, e.orig_dport, e.reply_src), []).append(e)
    return groups


def _stale_finding(view: NodeView, ctx: "_StaleContext", key: tuple, entries: List[CtEntry]) -> Finding:
    fam, proto, dst, port, dead = key
    targets, declaring, by_pod, px = ctx.targets, ctx.declaring, ctx.by_pod, ctx.px
    now = targets.get((fam, proto, port), [])
    where = "; ".join(f"{_addr_port(r.target_ip, r.target_port)}"
                      + (f" ({_label(by_pod[r.target_ip])})" if r.target_ip in by_pod else "") for r in now)
    holder = by_pod.get(dead)
    whose = (f"now pod {_label(holder)} has it, not the hostPort's pod" if holder else "no live pod has it")
    n = len(entries)
    ev = [f"{e.proto.lower()} {_addr_port(e.orig_src, e.orig_sport)} -> {_addr_port(e.orig_dst, e.orig_dport)}"
          f" DNAT to {_addr_port(e.reply_src, e.reply_sport)}"
          + (f", {e.timeout} s left" if e.timeout is not None else "")
          + (f" [{','.join(e.status)}]" if e.status else "") for e in entries[:5]]
    if n > 5:
        ev.append(f"... and {n - 5} more")
    ev.append(f"rules for {_hp(port, proto)} now go to {where}" if now else
              f"no rule for {_hp(port, proto)} exists any more")
    owners = declaring.get((proto, port), [])
    host_owners = [p for p in owners if p.host_network]
    socks = [s for s in view.listening if s[0] == proto and s[2] == port and s[1] in ("0.0.0.0", "::", dst)]
    severity = "error"
    entry = f"{n} {proto} conntrack {'entry' if n == 1 else 'entries'} for hostPort {_addr_port(dst, port)} " \
            f"still DNAT{'s' if n == 1 else ''} to {dead} ({whose})"
    if now:
        message = (f"{entry}: a client that keeps sending keeps its entry alive and never reaches the "
                   "current pod.")
    elif socks:
        who = (f"hostNetwork pod {', '.join(_label(p) for p in host_owners)}" if host_owners else
               f"no pod declares port {port}: a hostNetwork pod that lists no ports, or a process of the node")
        listen = ", ".join(f"{s[0].lower()} {_addr_port(s[1], s[2])}" for s in socks)
        ev.append(f"listening on the node: {listen} ({who})")
        message = (f"{entry}, although no nat rule for port {port} exists any more: a blackhole. A {proto} "
                   f"socket on the node now serves port {port} ({listen}), but this client's datagrams "
                   "still go to the dead pod and never reach it, for as long as the client keeps sending.")
    elif owners:
        message = (f"{entry}, and no nat rule for the port exists: {', '.join(_label(p) for p in owners)} "
                   "declares it but never gets these datagrams while the client keeps sending.")
    else:
        severity = "warning"
        message = (f"{entry}, and nothing serves port {port} any more (no rule, no pod, no socket): the "
                   "client's datagrams still go to the dead pod instead of being refused, for as long as it "
                   "keeps sending.")
    if not now and view.routes.get(dead):
        r = view.routes[dead]
        ev.append(f"route to {dead}: {r.get('type') or 'unicast'} via {r.get('ifname') or '-'} "
                  "(this node's pod network), and no pod has that IP")
    fam_opt = "-f ipv6 " if fam == 6 else ""
    return Finding(
        severity, "stale-conntrack", message, ev,
        f"Delete {'it' if n == 1 else 'them'}: `{px}conntrack -D {fam_opt}-p {proto.lower()} --orig-dst {dst} "
        f"--dport {port} --reply-src {dead}`"
        + (" (the client's next datagram then reaches the node's socket)." if (socks and not now) else "."))


def _remote_targets(view: NodeView, family: int) -> List[HostPortRule]:
    local = set(view.local_addresses)
    return [r for r in view.rules if r.family == family and r.target_ip not in local]


def _check_forwarding(view: NodeView) -> List[Finding]:
    px = command_prefix_text(view.netns)
    out = []
    for fam, key, code in ((4, "net.ipv4.ip_forward", "ip-forward-off"),
                           (6, "net.ipv6.conf.all.forwarding", "ipv6-forwarding-off")):
        rules = _remote_targets(view, fam)
        if not rules or view.sysctls.get(key) != "0":
            continue
        ports = ", ".join(sorted({_hp(r.host_port, r.proto) for r in rules}))
        out.append(Finding(
            "error", code,
            f"{key} is 0, so packets DNATed to pods are never forwarded: clients from other hosts get no "
            f"answer on hostPorts {ports} (only the node itself can reach them).",
            [f"{key} = 0"] + [_rule_text(r) for r in rules[:5]],
            f"Turn forwarding on: `{px}sysctl -w {key}=1` (and persist it in /etc/sysctl.d/)."))
    return out


# -- FORWARD chain evaluation ---------------------------------------------------------------


@dataclass
class _Pkt:
    proto: str
    src: Optional[str] = None
    dst: Optional[str] = None
    iif: Optional[str] = None
    oif: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    states: Tuple[str, ...] = ()


def _in_net(ip: Optional[str], value: str) -> Optional[bool]:
    if ip is None:
        return None
    try:
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(v, strict=False) for v in value.split(","))
    except ValueError:
        return None


def _iface_match(name: Optional[str], value: str) -> Optional[bool]:
    if name is None:
        return None
    return name.startswith(value[:-1]) if value.endswith("+") else name == value


def _port_in(port: Optional[int], value: str) -> Optional[bool]:
    if port is None:
        return None
    for part in value.split(","):
        lo, _, hi = part.partition(":")
        if lo.isdigit() and (hi.isdigit() or not hi):
            if int(lo) <= port <= int(hi or lo):
                return True
        else:
            return None
    return False


def _match(rule: IptRule, pkt: _Pkt) -> Optional[bool]:
    """True / False when the rule surely matches or not, None when it depends on what we do not know."""
    result: Optional[bool] = True
    for neg, opt, values in rule.args:
        if opt in ("-j", "--jump", "-g", "--goto"):
            break
        v = values[0] if values else ""
        m: Optional[bool]
        if opt in ("-m", "--match", "--comment"):
            continue
        if opt in ("-p", "--protocol"):
            m = True if v.lower() in ("all", "0") else protomod.k8s(v) == pkt.proto
        elif opt in ("-d", "--destination"):
            m = _in_net(pkt.dst, v)
        elif opt in ("-s", "--source"):
            m = _in_net(pkt.src, v)
        elif opt in ("-o", "--out-interface"):
            m = _iface_match(pkt.oif, v)
        elif opt in ("-i", "--in-interface"):
            m = _iface_match(pkt.iif, v)
        elif opt in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            m = _port_in(pkt.dport, v)
        elif opt in ("--sport", "--source-port", "--sports", "--source-ports"):
            m = _port_in(pkt.sport, v)
        elif opt in ("--ctstate", "--state"):
            m = bool(set(v.split(",")) & set(pkt.states))
        else:
            m = None
        if m is not None and neg:
            m = not m
        if m is False:
            return False
        if m is None:
            result = None
    return result


def _evaluate(chains: Dict[str, List[IptRule]], chain: str, pkt: _Pkt,
              depth: int = 0) -> Tuple[Optional[str], Optional[IptRule]]:
    """("accept" | "drop" | "return" | None, rule). A rule that may match and accepts counts as
    accepting: only a sure drop is reported."""
    if depth > 16:
        return None, None
    for rule in chains.get(chain, []):
        m = _match(rule, pkt)
        if m is False:
            continue
        t = rule.target
        if t == "ACCEPT":
            return "accept", rule
        if t in ("DROP", "REJECT"):
            if m:
                return "drop", rule
            continue
        if t == "RETURN":
            if m:
                return "return", rule
            continue
        if t in chains:
            verdict, why = _evaluate(chains, t, pkt, depth + 1)
            if verdict == "accept" or (verdict == "drop" and m):
                return verdict, why
    return None, None


def _verdict(table: FilterTable, pkt: _Pkt) -> Tuple[str, Optional[str]]:
    chains: Dict[str, List[IptRule]] = {}
    for line in table.rules:
        r = parse_rule_line(line)
        if r is not None:
            chains.setdefault(r.chain, []).append(r)
    verdict, rule = _evaluate(chains, "FORWARD", pkt)
    if verdict in (None, "return"):
        policy = table.policies.get("FORWARD", "ACCEPT")
        return ("drop" if policy == "DROP" else "accept"), f"-P FORWARD {policy}"
    return verdict, rule.text if rule else None


def _check_forward(view: NodeView) -> List[Finding]:
    px = command_prefix_text(view.netns)
    out = []
    for table in view.filters:
        rules = _remote_targets(view, table.family)
        if not rules:
            continue
        seen: Set[Tuple[str, str, int]] = set()
        bad: List[str] = []
        reasons: List[str] = []
        ifaces: List[str] = []
        for r in rules:
            key = (r.proto, r.target_ip, r.target_port)
            if key in seen:
                continue
            seen.add(key)
            oif = _iface_of(view, r.target_ip)
            req = _Pkt(r.proto, dst=r.target_ip, oif=oif, dport=r.target_port, states=("NEW", "DNAT"))
            rep = _Pkt(r.proto, src=r.target_ip, iif=oif, sport=r.target_port, states=("ESTABLISHED", "DNAT"))
            for what, pkt, out_ in (("new connections to", req, True), ("replies from", rep, False)):
                verdict, why = _verdict(table, pkt)
                if verdict == "drop":
                    bad.append(f"{what} {_addr_port(r.target_ip, r.target_port)} (hostPort "
                               f"{_hp(r.host_port, r.proto)}{', via ' + oif if oif else ''}): dropped by `{why}`")
                    if why and why not in reasons:
                        reasons.append(why)
                    if oif and oif not in ifaces:
                        ifaces.append(oif)
        if not bad:
            continue
        tool = _tool(table.source, table.family)
        if ifaces:
            cmds = " and ".join(f"`{px}{tool} -I FORWARD -o {i} -j ACCEPT` and `{px}{tool} -I FORWARD -i {i} -j ACCEPT`"
                                for i in ifaces)
        else:
            nets = sorted({r.target_ip for r in rules})
            cmds = " and ".join(f"`{px}{tool} -I FORWARD -d {ip} -j ACCEPT` and `{px}{tool} -I FORWARD -s {ip} -j ACCEPT`"
                                for ip in nets[:3])
        policy = table.policies.get("FORWARD", "ACCEPT")
        fam = "IPv6" if table.family == 6 else "IPv4"
        out.append(Finding(
            "error", "forward-drop",
            f"The {fam} FORWARD chain ({table.source}, policy {policy}) drops what DNAT sends to pods: "
            f"hostPort clients from other hosts never reach them.",
            [f"-P FORWARD {policy}"] + bad[:8] + (["... and more"] if len(bad) > 8 else []),
            f"Accept pod traffic in FORWARD: {cmds} (a CNI firewall plugin or your firewall config should add these)."))
    for chain in view.nft_forward:
        fams = {"ip": (4,), "ip6": (6,), "inet": (4, 6)}.get(chain.family, ())
        rules = [r for f in fams for r in _remote_targets(view, f)]
        if not rules or chain.policy != "drop":
            continue
        if any(v == "accept" or v.startswith(("jump", "goto")) for v in chain.verdicts):
            continue
        ifaces = sorted({i for i in (_iface_of(view, r.target_ip) for r in rules) if i}) or ["cni0"]
        cmds = " and ".join(f"`{px}nft add rule {chain.family} {chain.table} {chain.chain} oifname \"{i}\" accept` and "
                            f"`{px}nft add rule {chain.family} {chain.table} {chain.chain} iifname \"{i}\" accept`"
                            for i in ifaces)
        out.append(Finding(
            "error", "forward-drop",
            f"The nftables chain {chain.family} {chain.table} {chain.chain} (forward hook, policy drop) accepts "
            "nothing, so what DNAT sends to pods is dropped.",
            [f"policy drop; rule verdicts: {', '.join(chain.verdicts) or 'none'}"]
            + [_rule_text(r) for r in rules[:5]],
            f"Accept pod traffic: {cmds}."))
    return out


def _check_hooks(view: NodeView) -> List[Finding]:
    px = command_prefix_text(view.netns)
    out = []
    for nat in view.nat:
        if not any(t.startswith("CNI-DN-") for t, _, _ in nat.dnat_jumps):
            continue
        tool = _tool(nat.source, nat.family)
        missing = [c for c in ("PREROUTING", "OUTPUT") if c not in nat.hooked_from]
        if not missing:
            continue
        sev = "error" if "PREROUTING" in missing else "warning"
        who = "clients from other hosts" if "PREROUTING" in missing else "the node itself"
        cmds = " and ".join(f"`{px}{tool} -t nat -A {c} -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT`"
                            for c in missing)
        out.append(Finding(
            sev, "hostport-chain-not-hooked",
            f"CNI-HOSTPORT-DNAT ({nat.source}, IPv{nat.family}) is not jumped to from {' and '.join(missing)}, "
            f"so its hostPort rules never apply to {who}.",
            [f"jumps to CNI-HOSTPORT-DNAT from: {', '.join(nat.hooked_from) or 'nowhere'}"],
            f"Add the entry jump{'s' if len(missing) > 1 else ''}: {cmds}."))
    return out


def _localhost_rules(view: NodeView) -> List[HostPortRule]:
    out = []
    for r in view.rules:
        if r.family != 4:
            continue
        key = host_ip_key(r.host_ip)
        if key is None or key.startswith("127."):
            out.append(r)
    return out


def _check_localhost(view: NodeView) -> List[Finding]:
    px = command_prefix_text(view.netns)
    out = []
    ports = {(r.proto, r.host_port) for r in view.rules}
    seen4 = [e for e in view.conntrack if e.family == 4 and e.orig_dst.startswith("127.")
             and (e.proto, e.orig_dport) in ports and e.reply_src != e.orig_dst]
    seen6 = [e for e in view.conntrack if e.family == 6 and e.orig_dst == "::1"
             and (e.proto, e.orig_dport) in ports and e.reply_src != e.orig_dst]
    rules = _localhost_rules(view)
    expected = any(s.startswith("127.") for n in view.nat if n.family == 4 for s in n.setmark_sources)
    all_rl = view.sysctls.get("net.ipv4.conf.all.route_localnet")
    ifaces = []
    for r in rules:
        i = _iface_of(view, r.target_ip)
        if i and i not in ifaces:
            ifaces.append(i)
    if not ifaces and not view.routes:
        ifaces = [b for b in view.bridges if f"net.ipv4.conf.{b}.route_localnet" in view.sysctls]
    off = []
    values = [f"net.ipv4.conf.all.route_localnet = {all_rl}"] if all_rl is not None else []
    for i in ifaces:
        v = view.sysctls.get(f"net.ipv4.conf.{i}.route_localnet")
        if v is None:
            continue
        values.append(f"net.ipv4.conf.{i}.route_localnet = {v}")
        if v != "1" and all_rl != "1":
            off.append(i)
    hp = ", ".join(sorted({str(r.host_port) + "/" + r.proto for r in rules}))
    if rules and off:
        sev = "warning" if (expected or seen4) else "info"
        ev = values + (["portmap marks 127.0.0.1 for masquerade (snat on), so it expects route_localnet=1"]
                       if expected else [])
        ev += [f"conntrack: {e.proto.lower()} {_addr_port(e.orig_src, e.orig_sport)} -> "
               f"{_addr_port(e.orig_dst, e.orig_dport)}" for e in seen4[:3]]
        out.append(Finding(
            sev, "localhost-route-localnet-off",
            f"Connections from the node to 127.0.0.1 on hostPorts {hp} cannot reach the pods: route_localnet is 0 "
            f"on {', '.join(off)}, so after DNAT the kernel refuses to send a 127.0.0.1-sourced packet out of it "
            "([::1] can never work: IPv6 has no route_localnet).",
            ev,
            "Allow it: " + " and ".join(f"`{px}sysctl -w net.ipv4.conf.{i}.route_localnet=1`" for i in off)
            + " (portmap sets it when snat is on), or call the node's IP instead of 127.0.0.1."))
    elif seen4:
        eps = sorted({_addr_port(e.orig_dst, e.orig_dport) + "/" + e.proto for e in seen4})
        out.append(Finding(
            "info", "localhost-hostport",
            f"The node reaches hostPorts on localhost ({', '.join(eps)}): OUTPUT DNATs them, route_localnet=1 "
            "lets the 127.0.0.1-sourced packets out to the pod and CNI-HOSTPORT-MASQ rewrites their source. "
            "The same call on [::1] cannot work: IPv6 has no route_localnet.",
            values + [f"conntrack: {e.proto.lower()} {_addr_port(e.orig_src, e.orig_sport)} -> "
                      f"{_addr_port(e.orig_dst, e.orig_dport)} DNAT to {_addr_port(e.reply_src, e.reply_sport)}"
                      for e in seen4[:3]],
            "Nothing to fix; from the node use 127.0.0.1 or the node's IP for hostPorts, never ::1."))
    if seen6:
        eps = sorted({_addr_port(e.orig_dst, e.orig_dport) + "/" + e.proto for e in seen6})
        out.append(Finding(
            "warning", "localhost-ipv6",
            f"The node calls hostPorts on ::1 ({', '.join(eps)}): DNAT sends them to a pod, but a packet from ::1 "
            "may never leave the host, so these connections fail.",
            [f"conntrack: {e.proto.lower()} {_addr_port(e.orig_src, e.orig_sport)} -> "
             f"{_addr_port(e.orig_dst, e.orig_dport)} DNAT to {_addr_port(e.reply_src, e.reply_sport)}"
             + (f" [{','.join(e.status)}]" if e.status else "") for e in seen6[:3]],
            "Call 127.0.0.1 or the node's IPv6 address instead of ::1 (e.g. `curl http://127.0.0.1:PORT`)."))
    return out


def _check_hairpin(view: NodeView) -> List[Finding]:
    """portmap (iptables) masquerades hairpin traffic: pod -> nodeIP:hostPort -> a pod on the same bridge.

    Without it a pod calling its *own* hostPort always fails (the packet comes back with its own
    address as source, a martian); a call to *another* pod on the bridge still works while
    bridge-nf-call-iptables=1, because br_netfilter un-DNATs the bridged reply.
    """
    px = command_prefix_text(view.netns)
    out = []
    for nat in view.nat:
        if not any(t.startswith("CNI-DN-") for t, _, _ in nat.dnat_jumps):
            continue
        pod_sources = [s for s in nat.setmark_sources if not s.startswith(("127.", "::1"))]
        tool = _tool(nat.source, nat.family)
        pieces = [
            ("jumps from the CNI-DN-* chains to CNI-HOSTPORT-SETMARK for the pod subnet", bool(pod_sources), None),
            ("a MARK rule in CNI-HOSTPORT-SETMARK", nat.setmark_marks,
             f"{tool} -t nat -A CNI-HOSTPORT-SETMARK -j MARK --set-xmark 0x2000/0x2000"),
            ("a MASQUERADE rule in CNI-HOSTPORT-MASQ", nat.masq_rule,
             f"{tool} -t nat -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"),
            ("a jump from POSTROUTING to CNI-HOSTPORT-MASQ", nat.postrouting_to_masq,
             f"{tool} -t nat -A POSTROUTING -j CNI-HOSTPORT-MASQ"),
        ]
        missing = [(what, cmd) for what, ok, cmd in pieces if not ok]
        if not missing:
            continue
        bnf_key = "net.bridge.bridge-nf-call-ip6tables" if nat.family == 6 else "net.bridge.bridge-nf-call-iptables"
        bnf = view.sysctls.get(bnf_key)
        snat_expected = len(missing) < len(pieces)
        fam = f"IPv{nat.family}"
        ev = [f"{nat.source} {fam} nat table lacks {what}" for what, _ in missing]
        ev.append(f"{bnf_key} = {bnf}" if bnf is not None else "br_netfilter is not loaded (no net.bridge sysctls)")
        others = ("calls to other pods on the bridge still work because br_netfilter un-DNATs their bridged "
                  "replies" if bnf == "1" else
                  "so does a call to another pod on the bridge: its reply is bridged straight back from that "
                  "pod's IP and never un-DNATed")
        if snat_expected:
            cmds = [f"`{px}{cmd}`" for _, cmd in missing if cmd]
            fix = "Re-create the pods so portmap's CNI ADD rebuilds its chains"
            if cmds and len(cmds) == len(missing):
                fix = "Restore the missing pieces: " + " and ".join(cmds) + " (or re-create the pods)"
            out.append(Finding(
                "warning", "hairpin-no-masquerade",
                f"portmap's hairpin masquerade ({fam}) is incomplete, so a pod calling nodeIP:hostPort of "
                f"itself gets no answer (its own address comes back as the source); {others}.",
                ev, fix + "."))
        elif bnf == "0":
            out.append(Finding(
                "warning", "bridge-nf-call-iptables-off",
                f"portmap runs without snat ({fam}) and {bnf_key} is 0: a pod calling nodeIP:hostPort of another "
                "pod on the same bridge gets the reply bridged straight from that pod, past conntrack, so it is "
                "never un-DNATed and the caller drops it (and a pod calling its own hostPort always fails).",
                ev,
                f"Turn it on: `{px}sysctl -w {bnf_key}=1`, or set \"snat\": true in the portmap plugin's config."))
        else:
            out.append(Finding(
                "warning" if bnf is None else "info", "hairpin-no-masquerade",
                f"portmap runs without snat ({fam}): a pod calling nodeIP:hostPort of itself gets no answer; "
                f"{others}.",
                ev,
                "Set \"snat\": true in the portmap plugin's config if pods call hostPorts on their own node"
                + (f" (and `modprobe br_netfilter`, `{px}sysctl -w {bnf_key}=1`)." if bnf is None else ".")))
    return out


_ORDER = {s: i for i, s in enumerate(SEVERITIES)}


def findings(view: NodeView) -> List[Finding]:
    """Every problem the view shows, errors first. A healthy node gives an empty list."""
    pods = local_pods(view)
    out: List[Finding] = []
    out += _check_forwarding(view)
    out += _check_forward(view)
    out += _check_hooks(view)
    out += _check_conflicts(view, pods)
    out += _check_missing_rules(view, pods)
    out += _check_leaked(view)
    out += _check_stale_conntrack(view, pods)
    out += _check_hostnetwork(view, pods)
    out += _check_localhost(view)
    out += _check_hairpin(view)
    return sorted(out, key=lambda f: _ORDER.get(f.severity, 9))
