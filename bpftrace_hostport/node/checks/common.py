"""Small helpers the check families share: labels, addresses, rule texts, tool names."""
from __future__ import annotations

import ipaddress
from typing import List, Optional, Set

from bpftrace_hostport.model import HostPortRule, PodInfo
from bpftrace_hostport.netns import command_prefix_text
from bpftrace_hostport.node.nodeview import NodeView, live_pods, pod_label


def label(p: PodInfo) -> str:
    return pod_label(p.namespace, p.name)


def hp(port: int, proto: str) -> str:
    return f"{port}/{proto}"


def addr_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def family(ip: Optional[str]) -> Optional[int]:
    try:
        return ipaddress.ip_address(ip).version if ip else None
    except ValueError:
        return None


def rule_text(r: HostPortRule) -> str:
    where = f"{r.host_ip}:" if r.host_ip and r.family == 4 else (f"[{r.host_ip}]:" if r.host_ip else "")
    counters = f", {r.packets} packets" if r.packets is not None else ""
    return (f"{r.source} {r.chain or '?'}: {where}{r.host_port}/{r.proto} -> "
            f"{addr_port(r.target_ip, r.target_port)}{counters}")


def tool(source: str, fam: int, save: bool = False) -> str:
    """iptables-nft, ip6tables-legacy-save, ... for a rule source and family."""
    base = "ip6tables" if fam == 6 else "iptables"
    kind = "legacy" if source == "iptables-legacy" else "nft"
    return f"{base}-{kind}{'-save' if save else ''}"


def px(view: NodeView) -> str:
    """What goes before a command the user pastes: the node's namespace, if it is not ours."""
    return command_prefix_text(view.netns)


def sh(prefix: str, command: str) -> str:
    """A pipeline as one command, wrapped for the namespace when there is one."""
    return f"{prefix}sh -c '{command}'" if prefix else command


def ticks(commands: List[str]) -> str:
    """Commands in backticks, joined as a sentence: `a` and `b`."""
    quoted = [f"`{c}`" for c in commands]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def live_ips(view: NodeView) -> Set[str]:
    return {ip for p in live_pods(view) if not p.host_network for ip in p.ips}


def iface_of(view: NodeView, ip: str) -> Optional[str]:
    r = view.routes.get(ip) or {}
    return r.get("ifname")


def remote_targets(view: NodeView, fam: int) -> List[HostPortRule]:
    """The rules of family `fam` whose target is not the node itself (a pod, to be forwarded to)."""
    local = set(view.local_addresses)
    return [r for r in view.rules if r.family == fam and r.target_ip not in local]


def dnat_of(view: NodeView, pkt, hook: str = "prerouting") -> Optional[str]:
    """Where the node's nat rules DNAT this packet at PREROUTING (or OUTPUT): the first DNAT rule
    it may meet in any iptables backend of its family or any nftables nat chain on that hook, as
    text ("iptables-nft CNI-DN-x: -A ..."); None when none would translate it."""
    from bpftrace_hostport.node.evaluate import ipt_chains, ipt_nat, nft_chains, nft_nat, nft_rule_text
    for nat in view.nat:
        if nat.family != pkt.family:
            continue
        rule = ipt_nat(ipt_chains(nat.lines), hook.upper(), pkt)
        if rule is not None:
            return f"{nat.source} {rule.chain}: {rule.text}"
    chains = nft_chains(view.nft_items)
    fams = ("ip6", "inet") if pkt.family == 6 else ("ip", "inet")
    for base in chains.values():
        if base.hook == hook and base.type == "nat" and base.family in fams:
            got = nft_nat(chains, base.key, pkt)
            if got is not None:
                return f"nftables {base.family} {base.table} {got[0].name}: {nft_rule_text(got[1])}"
    return None
