"""localhost: hostPorts called on 127.0.0.1 / ::1 from the node, and 127.0.0.1 reached from the
network.

localhost-route-localnet-off, localhost-hostport, localhost-ipv6, route-localnet-exposed.
"""
from __future__ import annotations

from typing import List

from bpftrace_hostport.model import HostPortRule
from bpftrace_hostport.node.checks.common import addr_port, iface_of, px, ticks
from bpftrace_hostport.node.findings import Finding, finding
from bpftrace_hostport.node.nodeview import NodeView, host_ip_key


def _localhost_rules(view: NodeView) -> List[HostPortRule]:
    out = []
    for r in view.rules:
        if r.family != 4:
            continue
        key = host_ip_key(r.host_ip)
        if key is None or key.startswith("127."):
            out.append(r)
    return out


def _call(proto: str, host: str, port: int) -> str:
    """A command that calls host:port the way a client would."""
    if proto == "TCP":
        return f"curl http://{addr_port(host, port)}/"
    return f"nc -u -w 1 {host} {port}"


def _localhost(view: NodeView) -> List[Finding]:
    p = px(view)
    out = []
    ports = {(r.proto, r.host_port) for r in view.rules}
    seen4 = [e for e in view.conntrack if e.family == 4 and e.orig_dst.startswith("127.")
             and (e.proto, e.orig_dport) in ports and e.dnat]
    seen6 = [e for e in view.conntrack if e.family == 6 and e.orig_dst == "::1"
             and (e.proto, e.orig_dport) in ports and e.dnat]
    rules = _localhost_rules(view)
    expected = any(s.startswith("127.") for n in view.nat if n.family == 4 for s in n.setmark_sources)
    all_rl = view.sysctls.get("net.ipv4.conf.all.route_localnet")
    ifaces = []
    for r in rules:
        i = iface_of(view, r.target_ip)
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
    hps = ", ".join(sorted({str(r.host_port) + "/" + r.proto for r in rules}))
    if rules and off:
        sev = "warning" if (expected or seen4) else "info"
        ev = values + (["portmap marks 127.0.0.1 for masquerade (snat on), so it expects route_localnet=1"]
                       if expected else [])
        ev += [f"conntrack: {e.proto.lower()} {addr_port(e.orig_src, e.orig_sport)} -> "
               f"{addr_port(e.orig_dst, e.orig_dport)}" for e in seen4[:3]]
        out.append(finding(
            "localhost-route-localnet-off",
            f"Connections from the node to 127.0.0.1 on hostPorts {hps} cannot reach the pods: route_localnet is 0 "
            f"on {', '.join(off)}, so after DNAT the kernel refuses to send a 127.0.0.1-sourced packet out of it "
            "([::1] can never work: IPv6 has no route_localnet).",
            ev, severity=sev,
            commands=" and ".join(f"`{p}sysctl -w net.ipv4.conf.{i}.route_localnet=1`" for i in off)))
    elif seen4:
        eps = sorted({addr_port(e.orig_dst, e.orig_dport) + "/" + e.proto for e in seen4})
        out.append(finding(
            "localhost-hostport",
            f"The node reaches hostPorts on localhost ({', '.join(eps)}): OUTPUT DNATs them, route_localnet=1 "
            "lets the 127.0.0.1-sourced packets out to the pod and portmap's masquerade rewrites their source. "
            "The same call on [::1] cannot work: IPv6 has no route_localnet.",
            values + [f"conntrack: {e.proto.lower()} {addr_port(e.orig_src, e.orig_sport)} -> "
                      f"{addr_port(e.orig_dst, e.orig_dport)} DNAT to {addr_port(e.reply_src, e.reply_sport)}"
                      for e in seen4[:3]]))
    if seen6:
        eps = sorted({addr_port(e.orig_dst, e.orig_dport) + "/" + e.proto for e in seen6})
        calls = []
        six = [a for a in view.local_addresses if ":" in a and a != "::1" and not a.startswith("fe80")]
        for proto, port in sorted({(e.proto, e.orig_dport) for e in seen6}):
            calls.append(f"{p}{_call(proto, '127.0.0.1', port)}")
            if six:
                calls.append(f"{p}{_call(proto, six[0], port)}")
        out.append(finding(
            "localhost-ipv6",
            f"The node calls hostPorts on ::1 ({', '.join(eps)}): DNAT sends them to a pod, but a packet from ::1 "
            "may never leave the host, so these connections fail.",
            [f"conntrack: {e.proto.lower()} {addr_port(e.orig_src, e.orig_sport)} -> "
             f"{addr_port(e.orig_dst, e.orig_dport)} DNAT to {addr_port(e.reply_src, e.reply_sport)}"
             + (f" [{','.join(e.status)}]" if e.status else "") for e in seen6[:3]],
            commands="for example " + ticks(calls)))
    return out


def _facing(view: NodeView) -> List[str]:
    """Interfaces facing the network: they hold one of the node's addresses and carry no pod."""
    pod_ifaces = {r.get("ifname") for r in view.routes.values()}
    return sorted({i for a, i in view.address_ifaces.items()
                   if i not in ("lo", "kube-ipvs0") and i not in pod_ifaces and not a.startswith(("127.", "fe80"))
                   and ":" not in a})


def _dropped_from(view: NodeView, iface: str) -> bool:
    """A packet from the network to 127.0.0.1 arriving on `iface` is surely dropped by INPUT."""
    from bpftrace_hostport.node.evaluate import Packet, ipt_chains, ipt_verdict, nft_chains, nft_verdict
    pkt = Packet("TCP", src="192.0.2.1", dst="127.0.0.1", iif=iface, dport=1, states=("NEW",), family=4)
    for table in view.filters:
        if table.family == 4 and ipt_verdict(ipt_chains(table.rules), table.policies, pkt, "INPUT").verdict != "accept":
            return True
    chains = nft_chains(view.nft_items)
    for base in chains.values():
        if base.hook == "input" and base.family in ("ip", "inet") and (base.type or "filter") == "filter":
            if nft_verdict(chains, base, pkt).verdict != "accept":
                return True
    return False


def _exposed(view: NodeView) -> List[Finding]:
    all_rl = view.sysctls.get("net.ipv4.conf.all.route_localnet")
    on = [i for i in _facing(view)
          if all_rl == "1" or view.sysctls.get(f"net.ipv4.conf.{i}.route_localnet") == "1"]
    on = [i for i in on if not _dropped_from(view, i)]
    if not on or not view.filters:
        return []
    p = px(view)
    local = [s for s in view.listening if s[1] == "127.0.0.1"]
    ev = [f"net.ipv4.conf.all.route_localnet = {all_rl}"] + \
         [f"net.ipv4.conf.{i}.route_localnet = {view.sysctls.get(f'net.ipv4.conf.{i}.route_localnet')}" for i in on]
    ev.append("no rule in INPUT drops packets to 127.0.0.0/8 from other sources (kube-proxy's KUBE-FIREWALL does)")
    ev += [f"reachable that way: {s[0].lower()} {addr_port(s[1], s[2])}" for s in local[:5]]
    t = "iptables-nft" if any(f.source == "iptables-nft" for f in view.filters) else "iptables-legacy"
    cmds = [f"{p}{t} -I INPUT ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            "-j DROP"]
    keep = [b for b in view.bridges if b not in on and b != "kube-ipvs0"]
    if all_rl == "1":
        off = f"`{p}sysctl -w net.ipv4.conf.all.route_localnet=0`" + (
            ", keeping it on the pods' bridge for 127.0.0.1:hostPort: "
            + " and ".join(f"`{p}sysctl -w net.ipv4.conf.{b}.route_localnet=1`" for b in keep) if keep else "")
    else:
        off = " and ".join(f"`{p}sysctl -w net.ipv4.conf.{i}.route_localnet=0`" for i in on)
    return [finding(
        "route-localnet-exposed",
        f"route_localnet is on for {', '.join(on)}, which face{'s' if len(on) == 1 else ''} the network, "
        "and nothing drops packets to "
        f"127.0.0.0/8 that come from elsewhere: a host on that network can reach "
        + (f"the node's 127.0.0.1 services ({', '.join(f'{s[0].lower()} {s[2]}' for s in local[:5])})"
           if local else "any service of the node bound to 127.0.0.1") + ".",
        ev, commands=ticks(cmds), off=off)]


def run(view: NodeView) -> List[Finding]:
    return _localhost(view) + _exposed(view)
