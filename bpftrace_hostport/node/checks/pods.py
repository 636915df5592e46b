"""Pods and ports: does each declared hostPort have its rule, does each rule have its pod, and is
anything listening where the traffic goes?

hostnetwork-hostport, hostport-no-rule, hostport-one-family, leaked-hostport-rule,
no-pod-metadata, hostport-conflict, pod-not-listening, node-socket-shadowed.
"""
from __future__ import annotations

import shlex
from typing import Dict, List, Optional, Tuple

from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.node.checks.common import (addr_port, family, hp, label, live_ips, px, rule_text, sh,
                                                  ticks, tool)
from bpftrace_hostport.node.findings import Finding, finding
from bpftrace_hostport.node.nodeview import (NodeView, host_ip_key, is_synthetic, mappings, overlap, pod_label,
                                             rule_rank)


def _hostnetwork(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    out = []
    p = px(view)
    for pod in pods:
        if not pod.host_network or not pod.host_ports:
            continue
        evidence = [f"pod {label(pod)}: hostNetwork, IPs {', '.join(pod.ips) or '-'}"]
        severity = "info"
        fixes = []
        for cp in pod.host_ports:
            line = f"{hp(cp.host_port, cp.protocol)} -> containerPort {cp.container_port}" + \
                   (f" ({cp.name})" if cp.name else "")
            if cp.host_port != cp.container_port:
                severity = "warning"
                line += ": differs; with hostNetwork the process listens on the containerPort, " \
                        "so nothing answers on the hostPort"
                fixes.append(f"set hostPort equal to containerPort ({cp.container_port}) in the pod spec")
            elif view.sockets_read and cp.protocol in ("TCP", "UDP"):
                socks = [s for s in view.listening if s[0] == cp.protocol and s[2] == cp.container_port]
                if socks:
                    line += "; listening: " + ", ".join(f"{s[0].lower()} {addr_port(s[1], s[2])}" for s in socks)
                else:
                    severity = "warning"
                    line += f"; no {cp.protocol} socket listens on port {cp.container_port} in the node's namespace"
                    fixes.append(f"check that the container runs and listens on port {cp.container_port} "
                                 f"(`{p}ss -lnp 'sport = :{cp.container_port}'`)")
            shadow = [r for r in view.rules if r.proto == cp.protocol and r.host_port == cp.host_port]
            if shadow:
                line += "; a DNAT rule takes this port first (see hostport-conflict)"
            evidence.append(line)
        ports = ", ".join(hp(cp.host_port, cp.protocol) for cp in pod.host_ports)
        out.append(finding(
            "hostnetwork-hostport",
            f"Pod {label(pod)} uses hostNetwork, so its hostPort {ports} gets no DNAT rule: "
            f"clients reach the pod's own socket on the node directly.",
            evidence, severity=severity, variant="fix" if fixes else "default", fixes="; ".join(fixes)))
    return out


def _rule_serves(r: HostPortRule, pod: PodInfo, cp: ContainerPort) -> bool:
    return (r.proto == cp.protocol and r.host_port == cp.host_port and r.target_ip in pod.ips
            and r.target_port == cp.container_port)


# Datapaths that serve hostPorts in eBPF, without any nat rule this tool can read.
_EBPF_LINKS = ("cilium_host", "cilium_net", "bpfnatin", "bpfnatout")


def _ebpf_datapath(view: NodeView) -> Optional[str]:
    found = [i for i in view.interfaces if i in _EBPF_LINKS]
    return found[0] if found else None


def _missing_rules(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    if not view.rules_read:
        return []
    ebpf = _ebpf_datapath(view)
    out = []
    for pod in pods:
        if pod.host_network or not pod.ips or pod.phase not in (None, "Running"):
            continue
        for cp in pod.host_ports:
            ips = list(pod.ips)
            fam = family(host_ip_key(cp.host_ip))
            if fam:
                ips = [ip for ip in ips if family(ip) == fam]
            if not ips:
                continue
            if any(_rule_serves(r, pod, cp) for r in view.rules):
                continue
            others = [r for r in view.rules if r.proto == cp.protocol and r.host_port == cp.host_port]
            evidence = [f"pod {label(pod)} ({', '.join(pod.ips)}) declares hostPort "
                        f"{hp(cp.host_port, cp.protocol)} -> {cp.container_port}"
                        + (f" ({cp.name})" if cp.name else "")
                        + (f" on hostIP {cp.host_ip}" if cp.host_ip else "")]
            if others:
                evidence += ["rule for this port goes elsewhere: " + rule_text(r) for r in others]
            else:
                evidence.append(f"no DNAT rule for {hp(cp.host_port, cp.protocol)} in any nat table")
            if ebpf and not others:
                evidence.append(f"interface {ebpf} exists: an eBPF datapath (Cilium, Calico eBPF) may serve "
                                "hostPorts without nat rules, which this check cannot see")
            out.append(finding(
                "hostport-no-rule",
                f"Pod {label(pod)} declares hostPort {hp(cp.host_port, cp.protocol)}, but no DNAT rule "
                f"sends it to {addr_port(ips[0], cp.container_port)}: clients of that port "
                + ("reach another pod." if others else "get no answer (or whatever listens on the node)."),
                evidence, severity="info" if ebpf and not others else "error",
                namespace=pod.namespace, name=pod.name))
    return out


def _leak_fix(view: NodeView, rules: List[HostPortRule]) -> Tuple[str, dict]:
    p = px(view)
    r = rules[0]
    if r.source in ("iptables-nft", "iptables-legacy") and r.chain and r.chain.startswith("CNI-DN-"):
        save, restore = tool(r.source, r.family, save=True), tool(r.source, r.family) + "-restore"
        pipeline = f"{save} -t nat | grep -v -e {r.chain} | {restore}"
        return "iptables", {"command": sh(p, pipeline)}
    if r.source == "nftables" and r.chain and "/" in r.chain:
        table, chain = r.chain.split("/", 1)
        fam = "ip6" if r.family == 6 else "ip"
        handles = view.nft_handles(fam, table, chain, r.target_ip)
        if handles:
            return "nftables", {"commands": ticks([f"{p}nft delete rule {fam} {table} {chain} handle {h}"
                                                   for h in handles])}
        return "default", {"ip": r.target_ip, "chain": f"{fam} {table} {chain}"}
    if r.source in ("crio", "docker"):
        return r.source, {}
    return "default", {"ip": r.target_ip, "chain": r.chain}


def _no_pod_metadata(view: NodeView) -> Finding:
    node = view.node_name or view.hostname
    file = f"pods-{node}.json" if node else "pods.json"
    rerun = " ".join(shlex.quote(a) for a in (["sudo", "bpftrace-hostport", "check"] + list(view.target_args)))
    note = ("" if view.node_name else
            f" {node} is this host's name, which kubelet uses as the node's name unless it runs with "
            "--hostname-override (`kubectl get nodes -o wide` lists the names)." if node else
            " The node's name could not be told here: `kubectl get nodes -o wide` lists them.")
    return finding(
        "no-pod-metadata",
        f"No pod list was available, so the {len(view.rules)} DNAT rules cannot be matched to pods: "
        "leaked rules (of pods that are gone) and missing rules cannot be judged.",
        [rule_text(r) for r in view.rules[:10]],
        node=node or "NODE", file=file, rerun=rerun, node_note=note)


def _leaked(view: NodeView) -> List[Finding]:
    if not view.rules:
        return []
    if not view.pods_known:
        return [_no_pod_metadata(view)]
    live = live_ips(view)
    local = set(view.local_addresses)
    by_chain: Dict[Tuple[str, Optional[str], str], List[HostPortRule]] = {}
    for r in view.rules:
        if r.target_ip in live or r.target_ip in local:
            continue
        by_chain.setdefault((r.source, r.chain, r.target_ip), []).append(r)
    out = []
    for (source, chain, ip), rules in by_chain.items():
        ports = ", ".join(f"{hp(r.host_port, r.proto)} -> {addr_port(r.target_ip, r.target_port)}" for r in rules)
        finished = [p for p in view.pods if ip in p.ips and p.phase not in (None, "Running", "Pending")]
        ev = [rule_text(r) for r in rules]
        if rules[0].container_id:
            ev.append(f"container id (rule comment): {rules[0].container_id}")
        ev.append(f"pod IPs known: {len(live)}; none is {ip}" +
                  (f" (pod {label(finished[0])} had it and is {finished[0].phase})" if finished else ""))
        variant, values = _leak_fix(view, rules)
        out.append(finding(
            "leaked-hostport-rule",
            f"DNAT chain {chain} ({ports}) points at {ip}, which no live pod has: a leftover of a pod "
            "whose CNI DEL never ran. It still takes the hostPort, so traffic goes nowhere.",
            ev, variant=variant, **values))
    return out


def _conflicts(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    rank = rule_rank(view)
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
            claims.setdefault((cp.protocol, cp.host_port), []).append((label(pod), cp.host_ip, None, pod))
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
            evidence.append(f"{i}. {rule_text(r)} ({who[id(r)]})")
        for pod in {id(c[3]): c[3] for c in cl if c[3] is not None}.values():
            if pod.host_network:
                evidence.append(f"pod {label(pod)} declares {hp(port, proto)} with hostNetwork: "
                                "its own socket on the node")
            elif label(pod) not in first_rule:
                evidence.append(f"pod {label(pod)} declares {hp(port, proto)} but has no rule")
        if rules:
            winner = who[id(rules[0])]
            losers = [n for n in names if n != winner]
            first = "CNI-HOSTPORT-DNAT" if (rules[0].chain or "").startswith("CNI-DN-") else "rule"
            how = (f"new connections go to {winner} ({addr_port(rules[0].target_ip, rules[0].target_port)}), "
                   f"the first in {first} order")
            if host_net:
                how += "; DNAT happens before local delivery, so a hostNetwork pod's socket never sees them"
        else:
            winner, losers = names[0], names[1:]
            how = "only one process can bind the port on the node; the other fails to start"
        loser_pods = [p for p in pods if label(p) in losers]
        values: dict = {}
        variant = "default"
        if loser_pods:
            lp = loser_pods[0]
            how_delete = (f"`crictl rmp -f {lp.name[4:]}` (its sandbox)" if is_synthetic(lp)
                          else f"`kubectl -n {lp.namespace} delete pod {lp.name}`")
            variant, values = "pod", {"pod": label(lp), "how_delete": how_delete}
        out.append(finding(
            "hostport-conflict",
            f"hostPort {hp(port, proto)} is claimed by {len(names)} pods: {', '.join(names)}; {how}.",
            evidence, variant=variant, **values))
    return out




# --------------------------------------------------------------------------- dual-stack


def _one_family(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    """A pod with IPv4 and IPv6 addresses whose hostPort is DNATed for one family only."""
    if not view.rules_read:
        return []
    p = px(view)
    out = []
    for pod in pods:
        if pod.host_network or pod.phase not in (None, "Running"):
            continue
        fams = {family(ip) for ip in pod.ips}
        if fams != {4, 6}:
            continue
        for cp in pod.host_ports:
            if host_ip_key(cp.host_ip):
                continue                        # a hostIP names one family
            serving = [r for r in view.rules if _rule_serves(r, pod, cp)]
            have = {r.family for r in serving}
            if not serving or have == {4, 6}:
                continue
            miss = ({4, 6} - have).pop()
            ip = next(i for i in pod.ips if family(i) == miss)
            like = serving[0]
            cmds = _add_mapping(view, p, like, miss, ip, cp)
            fam = f"IPv{miss}"
            out.append(finding(
                "hostport-one-family",
                f"Pod {label(pod)} has {', '.join(pod.ips)}, but its hostPort {hp(cp.host_port, cp.protocol)} is "
                f"DNATed for IPv{like.family} only: {fam} clients of the port get no answer (or reach whatever "
                "listens on the node).",
                [rule_text(r) for r in serving] + [f"no {fam} DNAT rule for {hp(cp.host_port, cp.protocol)} "
                                                   f"-> {addr_port(ip, cp.container_port)}"],
                fam=fam, commands=ticks(cmds)))
    return out


def _add_mapping(view: NodeView, p: str, like: HostPortRule, fam: int, ip: str, cp: ContainerPort) -> List[str]:
    """Commands that add one hostPort mapping for family `fam`, in the backend of rule `like`."""
    proto = cp.protocol.lower()
    if like.source == "nftables":
        nf = "ip6" if fam == 6 else "ip"
        cmds = []
        if not any(isinstance(i, dict) and isinstance(i.get("table"), dict) and i["table"].get("family") == nf
                   and i["table"].get("name") == "cni_hostport" for i in view.nft_items):
            cmds += [f"{p}nft add table {nf} cni_hostport",
                     f"{p}nft add chain {nf} cni_hostport hostports",
                     f"{p}nft add chain {nf} cni_hostport prerouting '{{ type nat hook prerouting priority -100 ; }}'",
                     f"{p}nft add rule {nf} cni_hostport prerouting fib daddr type local jump hostports",
                     f"{p}nft add chain {nf} cni_hostport output '{{ type nat hook output priority -100 ; }}'",
                     f"{p}nft add rule {nf} cni_hostport output fib daddr type local jump hostports"]
        return cmds + [f"{p}nft add rule {nf} cni_hostport hostports {proto} dport {cp.host_port} "
                       f"dnat to {addr_port(ip, cp.container_port)}"]
    source = like.source if like.source in ("iptables-nft", "iptables-legacy") else "iptables-nft"
    t = tool(source, fam)
    nat = next((n for n in view.nat if n.family == fam and n.source == source), None)
    cmds = []
    if nat is None or "CNI-HOSTPORT-DNAT" not in nat.chains:
        cmds.append(f"{p}{t} -t nat -N CNI-HOSTPORT-DNAT")
    for hook in ("PREROUTING", "OUTPUT"):
        if nat is None or hook not in nat.hooked_from:
            cmds.append(f"{p}{t} -t nat -A {hook} -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT")
    return cmds + [f"{p}{t} -t nat -A CNI-HOSTPORT-DNAT -p {proto} -m {proto} --dport {cp.host_port} -j DNAT "
                   f"--to-destination {addr_port(ip, cp.container_port)}"]


# --------------------------------------------------------------------------- listening


def _covers(addr: str, ip: str) -> bool:
    """A socket bound to `addr` takes connections to `ip` (a dual-stack "::" takes IPv4 too)."""
    return addr in (ip, "0.0.0.0", "::") and not (addr == "0.0.0.0" and ":" in ip)


def _not_listening(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    """A hostPort whose rule is there and whose pod has no socket on the containerPort."""
    out = []
    for pod in pods:
        if pod.host_network or pod.phase not in (None, "Running"):
            continue
        found = [(ip, view.pod_sockets[ip]) for ip in pod.ips if ip in view.pod_sockets]
        if not found:
            continue
        ip, (how, socks) = found[0]
        missing = []
        for cp in pod.host_ports:
            if cp.protocol not in ("TCP", "UDP"):
                continue
            if not any(_rule_serves(r, pod, cp) for r in view.rules):
                continue                        # no rule: hostport-no-rule says so
            mine = [s for s in socks if s[0] == cp.protocol and s[2] == cp.container_port]
            if any(_covers(s[1], a) for s in mine for a in pod.ips):
                continue
            missing.append((cp, mine))
        if not missing:
            continue
        ev = [f"pod {label(pod)}: network namespace found by its address {ip} (`{how.strip()}`)"]
        for cp, mine in missing:
            what = ("a TCP client gets a reset" if cp.protocol == "TCP" else
                    "a UDP client gets an ICMP port unreachable")
            ev.append(f"hostPort {hp(cp.host_port, cp.protocol)} -> containerPort {cp.container_port}"
                      + (f" ({cp.name})" if cp.name else "") + ": "
                      + (f"only {', '.join(addr_port(s[1], s[2]) for s in mine)} listens, not the pod's address"
                         if mine else f"no {cp.protocol} socket on port {cp.container_port}") + f": {what}")
        cp = missing[0][0]
        ports = ", ".join(hp(c.host_port, c.protocol) for c, _ in missing)
        ssopt = "".join(sorted({"t" if c.protocol == "TCP" else "u" for c, _ in missing}))
        out.append(finding(
            "pod-not-listening",
            f"Pod {label(pod)} has nothing listening behind hostPort {ports}: the DNAT rule sends clients to "
            f"the pod, which refuses them.",
            ev, namespace=pod.namespace, name=pod.name,
            port=" and ".join(str(p) for p in dict.fromkeys(c.container_port for c, _ in missing)),
            container=f" -c {cp.container}" if cp.container else "", nsx=how, ssopt=ssopt))
    return out


# --------------------------------------------------------------------------- node sockets


def _shadowed(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    """A node socket (no hostNetwork pod's) on a port that a DNAT rule takes first."""
    p = px(view)
    declared = {(cp.protocol, cp.host_port) for pod in pods if pod.host_network for cp in pod.host_ports}
    local = set(view.local_addresses)
    out = []
    seen = set()
    maps = {id(r): m for r, m in zip(view.rules, mappings(view))}
    for s in view.listening:
        proto, addr, port = s
        if view.address_ifaces.get(addr) == "kube-ipvs0":
            continue                    # a Service's address: hostport-catches-clusterip
        if addr in ("127.0.0.1", "::1") or (proto, port) in declared or (addr not in ("0.0.0.0", "::") and addr not in local):
            continue
        rules = [r for r in view.rules if r.proto == proto and r.host_port == port
                 and (host_ip_key(r.host_ip) is None or addr in ("0.0.0.0", "::") or r.host_ip == addr)
                 and r.target_ip not in local]
        if not rules or (proto, port) in seen:
            continue
        # Does a connection from another host to that socket really meet a DNAT (no RETURN before it)?
        from bpftrace_hostport.node.checks.common import dnat_of
        from bpftrace_hostport.node.evaluate import Packet
        node_addrs = [a for a in view.local_addresses if a not in ("127.0.0.1", "::1")
                      and view.address_ifaces.get(a) != "kube-ipvs0" and not a.startswith("fe80")]
        # "::" takes IPv4 as well unless the socket is IPv6-only, which /proc does not tell
        calls = ([addr] if addr not in ("0.0.0.0", "::") else
                 [a for a in node_addrs if ":" not in a] + ([a for a in node_addrs if ":" in a] if addr == "::" else []))
        via = called = None
        for called in calls:
            via = dnat_of(view, Packet(proto, dst=called, dport=port, states=("NEW",), family=family(called),
                                       dst_local=True))
            if via:
                break
        if via is None:
            continue
        seen.add((proto, port))
        r = rules[0]
        m = maps.get(id(r)) or {}
        pod = f"{m['namespace']}/{m['pod']}" if m.get("pod") else f"the pod at {r.target_ip}"
        owner = view.socket_owners.get(s)
        if r.source == "nftables":
            fam = "ip6" if r.family == 6 else "ip"
            command = f"{p}nft insert rule {fam} cni_hostport hostports_all {proto.lower()} dport {port} return"
        else:
            chain = {"crio": "KUBE-HOSTPORTS", "docker": "DOCKER"}.get(r.source, "CNI-HOSTPORT-DNAT")
            t = tool(r.source if r.source in ("iptables-nft", "iptables-legacy") else "iptables-nft", r.family)
            command = f"{p}{t} -t nat -I {chain} -p {proto.lower()} --dport {port} -j RETURN"
        out.append(finding(
            "node-socket-shadowed",
            f"A process of the node listens on {proto} {addr_port(addr, port)}"
            + (f" ({owner})" if owner else "") + f", but the DNAT rule for hostPort {port}/{proto} sends every "
            f"new connection from other hosts to {pod}: the node's daemon never sees them.",
            [f"listening in the node's namespace: {proto.lower()} {addr_port(addr, port)}"
             + (f", {owner}" if owner else ""), f"a connection to {addr_port(called, port)} meets `{via}`"]
            + [rule_text(x) for x in rules[:3]],
            port=f"{port}/{proto}", pod=pod, command=command))
    return out


def run(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    return (_conflicts(view, pods) + _missing_rules(view, pods) + _one_family(view, pods) + _leaked(view)
            + _hostnetwork(view, pods) + _not_listening(view, pods) + _shadowed(view, pods))
