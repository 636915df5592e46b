"""conntrack: entries that send a hostPort's traffic somewhere else than its rules do, and the
table itself.

stale-conntrack (UDP/SCTP entries still DNATed to a pod that is gone), conntrack-pinned-to-node
(UDP entries to a hostPort made without DNAT), conntrack-table-full.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from bpftrace_hostport.model import HostPortRule, PodInfo
from bpftrace_hostport.node.checks.common import addr_port, hp, label, live_ips, px
from bpftrace_hostport.node.findings import Finding, finding
from bpftrace_hostport.node.nodeview import NodeView, live_pods
from bpftrace_hostport.node.parse import CtEntry


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


class _Context:
    """What the conntrack checks look entries up in: the rules, declarations and pods."""

    def __init__(self, view: NodeView, pods: List[PodInfo]):
        self.px = px(view)
        self.targets: Dict[Tuple[int, str, int], List[HostPortRule]] = {}
        for r in view.rules:
            self.targets.setdefault((r.family, r.proto, r.host_port), []).append(r)
        self.declaring: Dict[Tuple[str, int], List[PodInfo]] = {}
        for p in pods:
            for cp in p.host_ports:
                self.declaring.setdefault((cp.protocol, cp.host_port), []).append(p)
        self.live = live_ips(view)
        self.by_pod = {ip: p for p in live_pods(view) for ip in p.ips}


def _stale_groups(view: NodeView, ctx: _Context) -> Dict[Tuple[int, str, str, int, str], List[CtEntry]]:
    """The stale UDP/SCTP entries, grouped by (family, proto, hostPort address, port, dead IP)."""
    local = set(view.local_addresses)
    kube_proxy = any("KUBE-NODEPORTS" in n.chains for n in view.nat)
    groups: Dict[Tuple[int, str, str, int, str], List[CtEntry]] = {}
    for e in view.conntrack:
        if e.proto not in ("UDP", "SCTP") or not e.dnat:
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


def _entry_lines(entries: List[CtEntry]) -> List[str]:
    ev = [f"{e.proto.lower()} {addr_port(e.orig_src, e.orig_sport)} -> {addr_port(e.orig_dst, e.orig_dport)}"
          + (f" DNAT to {addr_port(e.reply_src, e.reply_sport)}" if e.dnat else " (no DNAT)")
          + (f", {e.timeout} s left" if e.timeout is not None else "")
          + (f" [{','.join(e.status)}]" if e.status else "") for e in entries[:5]]
    if len(entries) > 5:
        ev.append(f"... and {len(entries) - 5} more")
    return ev


def _stale_finding(view: NodeView, ctx: _Context, key: tuple, entries: List[CtEntry]) -> Finding:
    fam, proto, dst, port, dead = key
    now = ctx.targets.get((fam, proto, port), [])
    where = "; ".join(f"{addr_port(r.target_ip, r.target_port)}"
                      + (f" ({label(ctx.by_pod[r.target_ip])})" if r.target_ip in ctx.by_pod else "") for r in now)
    holder = ctx.by_pod.get(dead)
    whose = (f"now pod {label(holder)} has it, not the hostPort's pod" if holder else "no live pod has it")
    n = len(entries)
    ev = _entry_lines(entries)
    ev.append(f"rules for {hp(port, proto)} now go to {where}" if now else
              f"no rule for {hp(port, proto)} exists any more")
    owners = ctx.declaring.get((proto, port), [])
    host_owners = [p for p in owners if p.host_network]
    socks = [s for s in view.listening if s[0] == proto and s[2] == port and s[1] in ("0.0.0.0", "::", dst)]
    severity = "error"
    entry = f"{n} {proto} conntrack {'entry' if n == 1 else 'entries'} for hostPort {addr_port(dst, port)} " \
            f"still DNAT{'s' if n == 1 else ''} to {dead} ({whose})"
    if now:
        message = (f"{entry}: a client that keeps sending keeps its entry alive and never reaches the "
                   "current pod.")
    elif socks:
        who = (f"hostNetwork pod {', '.join(label(p) for p in host_owners)}" if host_owners else
               f"no pod declares port {port}: a hostNetwork pod that lists no ports, or a process of the node")
        listen = ", ".join(f"{s[0].lower()} {addr_port(s[1], s[2])}" for s in socks)
        ev.append(f"listening on the node: {listen} ({who})")
        message = (f"{entry}, although no nat rule for port {port} exists any more: a blackhole. A {proto} "
                   f"socket on the node now serves port {port} ({listen}), but this client's datagrams "
                   "still go to the dead pod and never reach it, for as long as the client keeps sending.")
    elif owners:
        message = (f"{entry}, and no nat rule for the port exists: {', '.join(label(p) for p in owners)} "
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
    return finding(
        "stale-conntrack", message, ev, severity=severity, px=ctx.px, them="it" if n == 1 else "them",
        fam="-f ipv6 " if fam == 6 else "", proto=proto.lower(), dst=dst, port=port, dead=dead,
        after=" (the client's next datagram then reaches the node's socket)" if (socks and not now) else "")


def _stale(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    """UDP/SCTP entries DNATed to an IP that no current rule for their hostPort targets.

    With rules for the port: an entry to any other IP is stale (the pod was replaced). Without
    any rule: an entry to an IP that no live pod has is stale whoever declares the port (nobody,
    a hostNetwork pod, a pod that lost its rule), when that IP is on this node's pod network; if a
    local socket now listens on the port, the entry is a blackhole: the client's datagrams go to
    the dead pod and never to that socket (containernetworking/plugins#1190).
    """
    if not view.conntrack_read:
        return []
    ctx = _Context(view, pods)
    return [_stale_finding(view, ctx, key, entries) for key, entries in _stale_groups(view, ctx).items()]


def _pinned(view: NodeView) -> List[Finding]:
    """UDP/SCTP entries to nodeIP:hostPort that were never DNATed, while a DNAT rule for it exists."""
    if not view.conntrack_read:
        return []
    p = px(view)
    local = set(view.local_addresses)
    groups: Dict[Tuple[int, str, str, int], List[CtEntry]] = {}
    for e in view.conntrack:
        if e.proto not in ("UDP", "SCTP") or e.dnat or (local and e.orig_dst not in local):
            continue
        rules = [r for r in view.rules if (r.family, r.proto, r.host_port) == (e.family, e.proto, e.orig_dport)
                 and (r.host_ip in (None, "0.0.0.0", "::") or r.host_ip == e.orig_dst)]
        if rules:
            groups.setdefault((e.family, e.proto, e.orig_dst, e.orig_dport), []).append(e)
    out = []
    for (fam, proto, dst, port), entries in groups.items():
        n = len(entries)
        targets = sorted({addr_port(r.target_ip, r.target_port) for r in view.rules
                          if (r.family, r.proto, r.host_port) == (fam, proto, port)})
        socks = [s for s in view.listening if s[0] == proto and s[2] == port and s[1] in ("0.0.0.0", "::", dst)]
        where = (f"the node's own socket ({', '.join(f'{s[0].lower()} {addr_port(s[1], s[2])}' for s in socks)})"
                 if socks else "the node itself, where nothing listens on it")
        out.append(finding(
            "conntrack-pinned-to-node",
            f"{n} {proto} conntrack {'entry' if n == 1 else 'entries'} for hostPort {addr_port(dst, port)} "
            f"{'was' if n == 1 else 'were'} made without DNAT (while the rule or its jump was missing): a client "
            f"that keeps sending keeps {'its entry' if n == 1 else 'them'} alive and reaches {where}, never the "
            f"pod at {', '.join(targets)} that the rule now names.",
            _entry_lines(entries) + [f"DNAT rules for {hp(port, proto)} now: {', '.join(targets)}"],
            px=p, them="it" if n == 1 else "them", fam="-f ipv6 " if fam == 6 else "", proto=proto.lower(),
            dst=dst, port=port))
    return out


def _table_full(view: NodeView) -> List[Finding]:
    """nf_conntrack_count near nf_conntrack_max (count per namespace, limit host-wide)."""
    try:
        count = int(view.sysctls.get("net.netfilter.nf_conntrack_count", ""))
        limit = int(view.sysctls.get("net.netfilter.nf_conntrack_max", ""))
    except ValueError:
        return []
    if not limit or count < 0.9 * limit:
        return []
    st = view.conntrack_stats
    dropped = st.get("drop", 0) + st.get("early_drop", 0)
    severity = "error" if count >= 0.98 * limit or dropped else "warning"
    ev = [f"net.netfilter.nf_conntrack_count = {count} of net.netfilter.nf_conntrack_max = {limit} "
          f"({100 * count // limit}%)"]
    if st:
        ev.append("conntrack -S: " + ", ".join(f"{k} {st.get(k, 0)}" for k in ("drop", "early_drop", "insert_failed",
                                                                              "invalid")))
    relief = ""
    sample = view.conntrack_sample
    if sample:
        by_src: Dict[str, int] = {}
        for e in sample:
            by_src[e.orig_src] = by_src.get(e.orig_src, 0) + 1
        top, n = max(by_src.items(), key=lambda kv: kv[1])
        ev.append(f"of {len(sample)} entries sampled, {n} are from {top}" +
                  (f"; next: {', '.join(f'{a} ({k})' for a, k in sorted(by_src.items(), key=lambda kv: -kv[1])[1:3])}"
                   if len(by_src) > 1 else ""))
        if n >= len(sample) // 2:
            fam = "-f ipv6 " if ":" in top else ""
            relief = (f"delete the entries of {top}, which holds most of them (`{px(view)}conntrack -D {fam}-s {top}`: "
                      "its connections lose their conntrack state, NATed ones break); and ")
    host = view.netns_is_host
    note = ("" if host else "; in this network namespace it is read-only: set it on the host" if host is False else "")
    return [finding(
        "conntrack-table-full",
        f"The conntrack table holds {count} entries, {'at' if count >= limit else 'near'} its limit of {limit}: "
        + ("new connections are dropped (hostPort clients among them), " if severity == "error" else
           "new connections will soon be dropped, ")
        + (f"{dropped} so far." if dropped else "none counted as dropped yet."),
        ev, severity=severity, relief=relief, new_max=2 * limit, global_note=note)]


def run(view: NodeView, pods: List[PodInfo]) -> List[Finding]:
    return _stale(view, pods) + _pinned(view) + _table_full(view)
