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
            "lets the 127.0.0.1-sourced packets out to the pod and CNI-HOSTPORT-MASQ rewrites their source. "
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


def run(view: NodeView) -> List[Finding]:
    return _localhost(view)
