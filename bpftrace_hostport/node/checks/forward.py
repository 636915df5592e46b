"""The forward path: can what DNAT sends to a pod (and the pod's reply) be forwarded at all?

ip-forward-off, ipv6-forwarding-off (the sysctls), forward-drop (the iptables FORWARD chain of
either backend, and nftables' own forward-hook chains, walked by node/evaluate.py).
"""
from __future__ import annotations

from typing import Dict, List, Set, Tuple

from bpftrace_hostport.node.checks.common import addr_port, hp, iface_of, px, remote_targets, rule_text, ticks, tool
from bpftrace_hostport.node.evaluate import Packet, Verdict, ipt_chains, ipt_verdict, nft_chains, nft_verdict
from bpftrace_hostport.node.findings import Finding, finding, fix_text
from bpftrace_hostport.node.nodeview import NodeView


def _forwarding(view: NodeView) -> List[Finding]:
    out = []
    for fam, key, code in ((4, "net.ipv4.ip_forward", "ip-forward-off"),
                           (6, "net.ipv6.conf.all.forwarding", "ipv6-forwarding-off")):
        rules = remote_targets(view, fam)
        if not rules or view.sysctls.get(key) != "0":
            continue
        ports = ", ".join(sorted({hp(r.host_port, r.proto) for r in rules}))
        out.append(finding(
            code,
            f"{key} is 0, so packets DNATed to pods are never forwarded: clients from other hosts get no "
            f"answer on hostPorts {ports} (only the node itself can reach them).",
            [f"{key} = 0"] + [rule_text(r) for r in rules[:5]], px=px(view), key=key))
    return out


def _packets(view: NodeView, fam: int):
    """(what, rule, the request or reply packet, the pod's interface) for each distinct target."""
    seen: Set[Tuple[str, str, int]] = set()
    for r in remote_targets(view, fam):
        key = (r.proto, r.target_ip, r.target_port)
        if key in seen:
            continue
        seen.add(key)
        oif = iface_of(view, r.target_ip)
        yield ("new connections to", r, oif,
               Packet(r.proto, dst=r.target_ip, oif=oif, dport=r.target_port, states=("NEW", "DNAT"),
                      orig_dport=r.host_port, family=fam))
        yield ("replies from", r, oif,
               Packet(r.proto, src=r.target_ip, iif=oif, sport=r.target_port, states=("ESTABLISHED", "DNAT"),
                      orig_dport=r.host_port, family=fam))


def _line(what: str, r, oif, v: Verdict) -> str:
    how = "rejected" if v.verdict == "reject" else "dropped"
    return (f"{what} {addr_port(r.target_ip, r.target_port)} (hostPort {hp(r.host_port, r.proto)}"
            f"{', via ' + oif if oif else ''}): {how} by `{v.rule}`")


def _iptables(view: NodeView) -> List[Finding]:
    p = px(view)
    out = []
    for table in view.filters:
        chains = ipt_chains(table.rules)
        bad: List[str] = []
        rules_dropping: List[str] = []            # the rule texts that decide, in order
        policy_ifaces: List[str] = []
        policy_ips: List[str] = []
        policy_hit = False
        for what, r, oif, pkt in _packets(view, table.family):
            v = ipt_verdict(chains, table.policies, pkt)
            if v.verdict == "accept":
                continue
            bad.append(_line(what, r, oif, v))
            if v.by_policy:
                policy_hit = True
                if oif and oif not in policy_ifaces:
                    policy_ifaces.append(oif)
                if not oif and r.target_ip not in policy_ips:
                    policy_ips.append(r.target_ip)
            elif v.rule and v.rule not in rules_dropping:
                rules_dropping.append(v.rule)
        if not bad:
            continue
        t = tool(table.source, table.family)
        fixes = []
        if rules_dropping:
            fixes.append(fix_text("forward-drop", "rule", commands=ticks(
                [f"{p}{t} -D {rule[3:]}" for rule in rules_dropping if rule.startswith("-A ")])))
        if policy_hit:
            cmds = [c for i in policy_ifaces for c in (f"{p}{t} -I FORWARD -o {i} -j ACCEPT",
                                                       f"{p}{t} -I FORWARD -i {i} -j ACCEPT")]
            cmds += [c for ip in policy_ips[:3] for c in (f"{p}{t} -I FORWARD -d {ip} -j ACCEPT",
                                                          f"{p}{t} -I FORWARD -s {ip} -j ACCEPT")]
            fixes.append(fix_text("forward-drop", "policy", commands=ticks(cmds)))
        policy = table.policies.get("FORWARD", "ACCEPT")
        fam = "IPv6" if table.family == 6 else "IPv4"
        cause = (f" (by rule{'s' if len(rules_dropping) > 1 else ''} "
                 + ", ".join(f"`{x}`" for x in rules_dropping) + ")") if rules_dropping else ""
        out.append(finding(
            "forward-drop",
            f"The {fam} FORWARD chain ({table.source}, policy {policy}) drops what DNAT sends to pods"
            f"{cause}: hostPort clients from other hosts never reach them.",
            [f"-P FORWARD {policy}"] + bad[:8] + (["... and more"] if len(bad) > 8 else []),
            variant=None, fix=" ".join(fixes)))
    return out


_FIREWALLD_NOTE = (" firewalld writes its table anew on every reload: to keep DNATed traffic passing, set "
                   "StrictForwardPorts=no in /etc/firewalld/firewalld.conf (its default before 2.3) and run "
                   "`firewall-cmd --reload`.")


def _nftables(view: NodeView) -> List[Finding]:
    p = px(view)
    chains = nft_chains(view.nft_items)
    out = []
    for base in chains.values():
        if base.hook != "forward" or (base.type or "filter") != "filter":
            continue
        fams = {"ip": (4,), "ip6": (6,), "inet": (4, 6)}.get(base.family, ())
        bad: List[str] = []
        deciding: Dict[Tuple[str, int], Verdict] = {}       # (chain, handle) -> verdict
        ifaces: List[str] = []
        by_policy = False
        rules = []
        for fam in fams:
            for what, r, oif, pkt in _packets(view, fam):
                v = nft_verdict(chains, base, pkt)
                if v.verdict == "accept":
                    continue
                rules.append(r)
                bad.append(_line(what, r, oif, v))
                if oif and oif not in ifaces:
                    ifaces.append(oif)
                if v.by_policy:
                    by_policy = True
                elif v.handle is not None:
                    deciding.setdefault((v.chain, v.handle), v)
        if not bad:
            continue
        ifaces = ifaces or ["cni0"]
        where = f"{base.family} {base.table} {base.name}"
        fixes = []
        if deciding:
            cmds = []
            for (chain, handle) in deciding:
                for i in ifaces:
                    cmds += [f'{p}nft insert rule {base.family} {base.table} {chain} handle {handle} '
                             f'oifname "{i}" ct status dnat accept',
                             f'{p}nft insert rule {base.family} {base.table} {chain} handle {handle} '
                             f'iifname "{i}" ct status dnat accept']
            fixes.append(fix_text("forward-drop", "nft-rule", commands=ticks(cmds),
                                  owner=_FIREWALLD_NOTE if base.table == "firewalld" else ""))
        if by_policy:
            cmds = [c for i in ifaces for c in (f'{p}nft add rule {where} oifname "{i}" accept',
                                                f'{p}nft add rule {where} iifname "{i}" accept')]
            fixes.append(fix_text("forward-drop", "nft-policy", commands=ticks(cmds)))
        cause = "; ".join(f"`{v.rule}` (handle {v.handle} in chain {v.chain})" for v in deciding.values())
        how = "rejects" if any(v.verdict == "reject" for v in deciding.values()) else "drops"
        message = (f"The nftables chain {where} (forward hook, policy {base.policy}) {how} what DNAT sends "
                   f"to pods" + (f", by {cause}" if cause else ": nothing accepts it before the policy drops it")
                   + ": hostPort clients from other hosts never reach them.")
        out.append(finding(
            "forward-drop", message,
            [f"policy {base.policy}"] + bad[:8] + (["... and more"] if len(bad) > 8 else [])
            + [rule_text(r) for r in rules[:3]],
            variant=None, fix=" ".join(fixes)))
    return out


def run(view: NodeView) -> List[Finding]:
    return _forwarding(view) + _iptables(view) + _nftables(view)
