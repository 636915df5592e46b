"""NAT plumbing: do the hostPort chains get traffic, and is what needs masquerade masqueraded?

hostport-chain-not-hooked, hairpin-no-masquerade, bridge-nf-call-iptables-off, mark-masq-missing
(portmap's externalSetMarkChain without kube-proxy's masquerade), hostport-catches-clusterip
(kube-ipvs0), hostport-catches-transit (the nftables portmap's prerouting jump),
mixed-iptables-backends.
"""
from __future__ import annotations

from typing import List

from bpftrace_hostport.node.checks.common import px, ticks, tool
from bpftrace_hostport.node.findings import Finding, finding
from bpftrace_hostport.node.nodeview import NodeView


def _hooks(view: NodeView) -> List[Finding]:
    p = px(view)
    out = []
    for nat in view.nat:
        if not any(t.startswith("CNI-DN-") for t, _, _ in nat.dnat_jumps):
            continue
        t = tool(nat.source, nat.family)
        missing = [c for c in ("PREROUTING", "OUTPUT") if c not in nat.hooked_from]
        if not missing:
            continue
        sev = "error" if "PREROUTING" in missing else "warning"
        who = "clients from other hosts" if "PREROUTING" in missing else "the node itself"
        cmds = [f"{p}{t} -t nat -A {c} -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT" for c in missing]
        out.append(finding(
            "hostport-chain-not-hooked",
            f"CNI-HOSTPORT-DNAT ({nat.source}, IPv{nat.family}) is not jumped to from {' and '.join(missing)}, "
            f"so its hostPort rules never apply to {who}.",
            [f"jumps to CNI-HOSTPORT-DNAT from: {', '.join(nat.hooked_from) or 'nowhere'}"],
            severity=sev, s="s" if len(missing) > 1 else "", commands=ticks(cmds)))
    return out


def _hairpin(view: NodeView) -> List[Finding]:
    """portmap (iptables) masquerades hairpin traffic: pod -> nodeIP:hostPort -> a pod on the same bridge.

    Without it a pod calling its *own* hostPort always fails (the packet comes back with its own
    address as source, a martian); a call to *another* pod on the bridge still works while
    bridge-nf-call-iptables=1, because br_netfilter un-DNATs the bridged reply.
    """
    p = px(view)
    out = []
    for nat in view.nat:
        if not any(t.startswith("CNI-DN-") for t, _, _ in nat.dnat_jumps):
            continue
        if nat.external_mark_chains:
            continue          # portmap marks through another chain: mark-masq-missing judges that
        pod_sources = [s for s in nat.setmark_sources if not s.startswith(("127.", "::1"))]
        t = tool(nat.source, nat.family)
        pieces = [
            ("jumps from the CNI-DN-* chains to CNI-HOSTPORT-SETMARK for the pod subnet", bool(pod_sources), None),
            ("a MARK rule in CNI-HOSTPORT-SETMARK", nat.setmark_marks,
             f"{t} -t nat -A CNI-HOSTPORT-SETMARK -j MARK --set-xmark 0x2000/0x2000"),
            ("a MASQUERADE rule in CNI-HOSTPORT-MASQ", nat.masq_rule,
             f"{t} -t nat -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"),
            ("a jump from POSTROUTING to CNI-HOSTPORT-MASQ", nat.postrouting_to_masq,
             f"{t} -t nat -A POSTROUTING -j CNI-HOSTPORT-MASQ"),
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
            cmds = [f"{p}{cmd}" for _, cmd in missing if cmd]
            restorable = cmds and len(cmds) == len(missing)
            out.append(finding(
                "hairpin-no-masquerade",
                f"portmap's hairpin masquerade ({fam}) is incomplete, so a pod calling nodeIP:hostPort of "
                f"itself gets no answer (its own address comes back as the source); {others}.",
                ev, variant="restore" if restorable else "recreate", commands=ticks(cmds)))
        elif bnf == "0":
            out.append(finding(
                "bridge-nf-call-iptables-off",
                f"portmap runs without snat ({fam}) and {bnf_key} is 0: a pod calling nodeIP:hostPort of another "
                "pod on the same bridge gets the reply bridged straight from that pod, past conntrack, so it is "
                "never un-DNATed and the caller drops it (and a pod calling its own hostPort always fails).",
                ev, px=p, key=bnf_key))
        else:
            extra = f" (and `modprobe br_netfilter`, `{p}sysctl -w {bnf_key}=1`)" if bnf is None else ""
            out.append(finding(
                "hairpin-no-masquerade",
                f"portmap runs without snat ({fam}): a pod calling nodeIP:hostPort of itself gets no answer; "
                f"{others}.",
                ev, severity="warning" if bnf is None else "info", variant="snat-off", extra=extra))
    return out


def run(view: NodeView) -> List[Finding]:
    return _hooks(view) + _hairpin(view)
