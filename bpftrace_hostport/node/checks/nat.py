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




# --------------------------------------------------------------------------- portmap's nftables table


def _fib_local(rule) -> bool:
    """The rule matches `fib daddr type local` (or `fib daddr . iif type local`)."""
    for e in rule.expr:
        m = e.get("match") if isinstance(e, dict) else None
        if isinstance(m, dict) and isinstance(m.get("left"), dict) and isinstance(m["left"].get("fib"), dict):
            fib = m["left"]["fib"]
            if fib.get("result") == "type" and "daddr" in (fib.get("flags") or []) and m.get("op", "==") == "==" \
                    and m.get("right") in ("local", ["local"], {"set": ["local"]}):
                return True
    return False


def _jump_target(rule):
    for e in rule.expr:
        if isinstance(e, dict):
            for k in ("jump", "goto"):
                if isinstance(e.get(k), dict):
                    return e[k].get("target")
    return None


_NFT_HOSTPORT_CHAINS = ("hostports_all", "hostports", "hostip_hostports")


def _nft_portmap(view: NodeView) -> List[Finding]:
    """portmap's nftables table: hooked from prerouting and output, only for local destinations,
    and masquerading its hairpin and localhost traffic."""
    from bpftrace_hostport.node.evaluate import nft_chains, nft_rule_text
    p = px(view)
    chains = nft_chains(view.nft_items)
    out = []
    for fam, v in (("ip", 4), ("ip6", 6)):
        rules = [r for r in view.rules if r.source == "nftables" and r.family == v
                 and (r.chain or "").startswith("cni_hostport/")]
        if not rules:
            continue
        table = [c for c in chains.values() if c.family == fam and c.table == "cni_hostport"]
        entry = "hostports_all" if any(c.name == "hostports_all" for c in table) else "hostports"
        for hook, sev in (("prerouting", "error"), ("output", "warning")):
            bases = [c for c in table if c.hook == hook and c.type == "nat"]
            jumps = [(c, r) for c in bases for r in c.rules if _jump_target(r) in _NFT_HOSTPORT_CHAINS]
            if not jumps:
                base = bases[0].name if bases else hook
                cmds = ([f"{p}nft add chain {fam} cni_hostport {hook} '{{ type nat hook {hook} priority -100 ; }}'"]
                        if not bases else [])
                cmds.append(f"{p}nft add rule {fam} cni_hostport {base} fib daddr type local jump {entry}")
                who = "clients from other hosts" if hook == "prerouting" else "the node itself"
                out.append(finding(
                    "hostport-chain-not-hooked",
                    f"portmap's nftables table {fam} cni_hostport has no {hook} chain jumping to its hostPort "
                    f"rules, so they never apply to {who}.",
                    [f"{fam} cni_hostport chains: {', '.join(sorted(c.name for c in table)) or 'none'}"]
                    + [rule_text_nft(r) for r in rules[:3]],
                    severity=sev, s="", commands=ticks(cmds)))
                continue
            if hook == "output":
                out += _nft_hairpin(view, fam, v, rules, table, chains)
                continue
            open_jumps = [(c, r) for c, r in jumps if not _fib_local(r)]
            if open_jumps:
                cmds = [f"{p}nft replace rule {fam} cni_hostport {c.name} handle {r.handle} fib daddr type local "
                        f"jump {_jump_target(r)}" for c, r in open_jumps if r.handle is not None]
                ports = ", ".join(f"{p_}/{q}" for p_, q in sorted({(x.host_port, x.proto) for x in rules}))
                out.append(finding(
                    "hostport-catches-transit",
                    f"portmap's nftables prerouting chain ({fam} cni_hostport) jumps to its hostPort rules without "
                    f"`fib daddr type local`: every packet the node forwards to port {ports} (a pod calling another "
                    "host, traffic routed through the node) is DNATed to the hostPort's pod.",
                    [f"{fam} cni_hostport {c.name}: `{nft_rule_text(r)}` (handle {r.handle})" for c, r in open_jumps]
                    + [rule_text_nft(x) for x in rules[:3]],
                    commands=ticks(cmds)))
    return out


def _nft_hairpin(view: NodeView, fam: str, v: int, rules, table, chains) -> List[Finding]:
    """portmap's nftables masquerading chain: `ip saddr POD ip daddr POD masquerade` per pod (a pod
    calling its own hostPort), and `ip saddr 127.0.0.1 ...` for localhost calls (IPv4)."""
    from bpftrace_hostport.node.evaluate import Packet, nft_nat
    bases = [c for c in table if c.hook == "postrouting" and c.type == "nat"]
    targets = sorted({r.target_ip for r in rules})
    unmasked = [t for t in targets if not any(nft_nat(chains, b.key, Packet(
        "TCP", src=t, dst=t, family=v), actions=("masquerade", "snat")) for b in bases)]
    if not unmasked:
        return []
    p = px(view)
    ev = [f"{fam} cni_hostport: no masquerade for a hairpin packet {t} -> {t}" for t in unmasked]
    if not any(r.expr for b in bases for r in b.rules):
        # portmap with "snat": false writes no masquerading rule at all
        return [finding(
            "hairpin-no-masquerade",
            f"portmap's nftables table ({fam} cni_hostport) masquerades no hairpin traffic (snat off): a pod "
            "calling nodeIP:hostPort of itself gets no answer.",
            ev, severity="info", variant="snat-off", extra="")]
    base = bases[0].name if bases else "masquerading"
    cmds = [f"{p}nft add rule {fam} cni_hostport {base} {fam} saddr {t} {fam} daddr {t} masquerade" for t in unmasked]
    return [finding(
        "hairpin-no-masquerade",
        f"portmap's nftables hairpin masquerade ({fam} cni_hostport) misses {', '.join(unmasked)}: those pods "
        "calling nodeIP:hostPort of themselves get no answer.",
        ev, variant="restore", commands=ticks(cmds))]


def rule_text_nft(r) -> str:
    from bpftrace_hostport.node.checks.common import rule_text
    return rule_text(r)


# --------------------------------------------------------------------------- KUBE-MARK-MASQ


def _mark_masq(view: NodeView) -> List[Finding]:
    """portmap's externalSetMarkChain: its CNI-DN-* chains jump to KUBE-MARK-MASQ (or another chain)
    for the hairpin and localhost marks, and leave the masquerade to whoever set that chain up.
    Walks POSTROUTING with a marked hairpin packet of each pod: does it meet a MASQUERADE?"""
    from bpftrace_hostport.node.evaluate import Packet, ipt_chains, ipt_nat
    p = px(view)
    out = []
    for nat in view.nat:
        chains = ipt_chains(nat.lines)
        targets = [r for r in view.rules if r.family == nat.family and r.source == nat.source
                   and (r.chain or "").startswith("CNI-DN-")]
        for chain in nat.external_mark_chains:
            marks = [m for c, m in nat.marks_set if c == chain]
            t = tool(nat.source, nat.family)
            missing, cmds = [], []
            mark = marks[0] if marks else "0x4000"
            if not marks:
                missing.append(f"{chain} sets no mark")
                cmds.append(f"{p}{t} -t nat -A {chain} -j MARK --or-mark {mark}")
            try:
                value = int(mark, 0)
            except ValueError:
                value = 0x4000
            unmasked = [r for r in targets if ipt_nat(chains, "POSTROUTING", Packet(
                r.proto, src=r.target_ip, dst=r.target_ip, dport=r.target_port, states=("NEW", "DNAT"),
                family=r.family, mark=value), targets=("MASQUERADE", "SNAT")) is None]
            if unmasked:
                missing.append(f"a hairpin packet marked {mark} meets no MASQUERADE in POSTROUTING (to "
                               + ", ".join(sorted({r.target_ip for r in unmasked})) + ")")
                # First in POSTROUTING: the bridge plugin's per-pod chains ACCEPT pod-to-pod traffic
                # (no masquerade) before anything appended could see it.
                cmds.append(f"{p}{t} -t nat -I POSTROUTING 1 -m mark --mark {mark}/{mark} -j MASQUERADE")
            if not missing:
                continue
            kube = "KUBE-POSTROUTING" in nat.chains
            fam = f"IPv{nat.family}"
            ev = [f"{nat.source} {fam}: the CNI-DN-* chains jump to {chain} for their hairpin and localhost marks"]
            ev += [f"{nat.source} {fam}: {m}" for m in missing]
            ev.append("KUBE-POSTROUTING exists but does not masquerade that mark first" if kube else
                      "no KUBE-POSTROUTING chain: kube-proxy does not run in iptables mode here")
            out.append(finding(
                "mark-masq-missing",
                f"portmap ({fam}, {nat.source}) marks hairpin and localhost hostPort traffic through {chain} "
                f"(externalSetMarkChain), but nothing masquerades that mark: a pod calling nodeIP:hostPort "
                f"of itself and calls to 127.0.0.1:hostPort from the node get no answer.",
                ev, commands=ticks(cmds)))
    return out


# --------------------------------------------------------------------------- kube-ipvs0


def _clusterip(view: NodeView) -> List[Finding]:
    """kube-proxy's IPVS mode binds every ClusterIP to kube-ipvs0, so `--dst-type LOCAL` (and
    `fib daddr type local`) matches them: a hostPort rule without hostIP catches ClusterIP:port."""
    cips = sorted(a for a, i in view.address_ifaces.items() if i == "kube-ipvs0")
    if not cips:
        return []
    p = px(view)
    services = {(pr, a, port) for pr, a, port in view.ipvs_services if a in cips}
    services |= {(pr, a, port) for pr, a, port in view.listening if a in cips}
    out = []
    from bpftrace_hostport.node.nodeview import mappings
    maps = {id(r): m for r, m in zip(view.rules, mappings(view))}
    seen = set()
    for r in view.rules:
        if r.host_ip not in (None, "0.0.0.0", "::"):
            continue
        key = (r.family, r.proto, r.host_port)
        if key in seen:
            continue
        seen.add(key)
        fam_cips = [a for a in cips if (":" in a) == (r.family == 6)]
        hits = sorted(a for pr, a, port in services if pr == r.proto and port == r.host_port and a in fam_cips)
        # ... and that the nat rules really translate (a RETURN for it may already be in place)
        from bpftrace_hostport.node.checks.common import dnat_of
        from bpftrace_hostport.node.evaluate import Packet
        via = {a: dnat_of(view, Packet(r.proto, dst=a, dport=r.host_port, states=("NEW",), family=r.family,
                                       dst_local=True)) for a in hits}
        hits = [a for a in hits if via[a]]
        if not hits:
            continue        # no Service on that port (or no IPVS to serve one: ip_vs not loaded)
        targets = hits
        m = maps.get(id(r)) or {}
        pod = f"{m['namespace']}/{m['pod']}" if m.get("pod") else f"the pod at {r.target_ip}"
        node_ip = next((a for a, i in view.address_ifaces.items()
                        if i not in ("kube-ipvs0", "lo") and (":" in a) == (r.family == 6)
                        and not a.startswith("fe80")), "its address")
        if r.source == "nftables":
            fam = "ip6" if r.family == 6 else "ip"
            cmds = [f"{p}nft insert rule {fam} cni_hostport hostports_all {fam} daddr {a} "
                    f"{r.proto.lower()} dport {r.host_port} return" for a in targets[:5]]
        else:
            t = tool(r.source, r.family)
            chain = {"crio": "KUBE-HOSTPORTS", "docker": "DOCKER"}.get(r.source, "CNI-HOSTPORT-DNAT")
            plen = 128 if r.family == 6 else 32
            cmds = [f"{p}{t} -t nat -I {chain} -d {a}/{plen} -p {r.proto.lower()} --dport {r.host_port} -j RETURN"
                    for a in targets[:5]]
        more = len(targets) - 5
        ev = [f"kube-ipvs0 holds {len(cips)} ClusterIP{'s' if len(cips) != 1 else ''}: {', '.join(cips[:5])}"
              + (" ..." if len(cips) > 5 else "")]
        ev += [f"a Service listens on {a}:{r.host_port}/{r.proto}; a connection to it meets `{via[a]}`"
               for a in hits[:5]]
        ev.append(f"the rule for hostPort {r.host_port}/{r.proto} has no hostIP: it takes every local destination")
        out.append(finding(
            "hostport-catches-clusterip",
            f"hostPort {r.host_port}/{r.proto} of {pod} also catches connections to "
            + f"the Service at {', '.join(f'{a}:{r.host_port}' for a in hits)}"
            + ": kube-ipvs0 makes ClusterIPs local addresses, and the hostPort rule matches every local "
            "destination, so those connections reach the hostPort's pod instead of the Service.",
            ev, commands=ticks(cmds) + (f" (and the same for the {more} other ClusterIPs)" if more > 0 else ""),
            pod=pod, node_ip=node_ip))
    return out


def run(view: NodeView) -> List[Finding]:
    return _hooks(view) + _nft_portmap(view) + _hairpin(view) + _mark_masq(view) + _clusterip(view)
