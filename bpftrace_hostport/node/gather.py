"""What a node looks like to a hostPort packet, gathered once as plain data.

`gather(netns, resolver_or_index)` (this module) reads, inside the node's network namespace (None: the current one):

* the hostPort DNAT mappings (`rules.read_node_rules`) and, from the nat tables, the facts around
  them that the mappings alone do not show: the order in which CNI-HOSTPORT-DNAT / KUBE-HOSTPORTS
  jump to the per-pod chains (the first match wins), whether PREROUTING / OUTPUT reach those
  chains, and whether portmap's hairpin pieces (CNI-HOSTPORT-SETMARK / -MASQ) are all there;
* the conntrack entries that were DNATed (pyroute2's ctnetlink dump, opened inside the namespace;
  `conntrack -L -o extended` when that fails);
* the sysctls that decide whether DNATed packets can move at all (ip_forward, IPv6 forwarding,
  route_localnet on the bridge and on "all", bridge-nf-call-iptables when br_netfilter is loaded);
* the filter tables' FORWARD chains (iptables-nft, ip6tables-nft, the legacy ones only when
  /proc/net/ip_tables_names already lists filter, nftables' own forward base chains);
* the routes to pod IPs, local addresses and listening sockets.

Nothing here changes the node: no legacy table is ever instantiated (`iptables-legacy-save -t X`
would create table X), no sysctl is written. Every source that cannot be read is skipped and
named in `notes`. The text is parsed by node/parse.py (pure, tested on captured text); the view and what is
joined from it (pods, mappings, conflicts) is node/nodeview.py.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import subprocess
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from bpftrace_hostport import netns as netns_mod, proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.node.nodeview import NodeView, drop_synthetic_duplicates, pods_of
from bpftrace_hostport.node.parse import (IPS_DST_NAT, TCP_STATES, CtEntry, filter_table, nat_summary,
                                          nft_forward_chains, parse_conntrack_text, status_names)


_TIMEOUT_S = 30


_ROUTE_LOOKUPS_MAX = 5000


def _run(netns: Optional[str], argv: Sequence[str], notes: List[str], what: str) -> Optional[str]:
    if shutil.which(argv[0]) is None:
        notes.append(f"{argv[0]} not found; skipped {what}.")
        return None
    try:
        p = subprocess.run(netns_mod.command_prefix(netns) + list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        notes.append(f"{argv[0]} did not answer within {_TIMEOUT_S} s; skipped {what}.")
        return None
    except OSError as e:
        notes.append(f"{argv[0]} could not be run ({e.strerror or e}); skipped {what}.")
        return None
    if p.returncode != 0:
        why = next((ln.strip() for ln in p.stderr.splitlines() if ln.strip()), f"exit status {p.returncode}")
        notes.append(f"{argv[0]} failed ({why}); skipped {what}.")
        return None
    return p.stdout


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _conntrack_netlink(netns: Optional[str]) -> List[CtEntry]:
    from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket

    def tup(t):
        ip = t.get_attr("CTA_TUPLE_IP") if t is not None else None
        pr = t.get_attr("CTA_TUPLE_PROTO") if t is not None else None
        if ip is None or pr is None:
            return None
        v6 = ip.get_attr("CTA_IP_V6_SRC") is not None
        src = ip.get_attr("CTA_IP_V6_SRC") if v6 else ip.get_attr("CTA_IP_V4_SRC")
        dst = ip.get_attr("CTA_IP_V6_DST") if v6 else ip.get_attr("CTA_IP_V4_DST")
        return (src, dst, pr.get_attr("CTA_PROTO_NUM"), pr.get_attr("CTA_PROTO_SRC_PORT") or 0,
                pr.get_attr("CTA_PROTO_DST_PORT") or 0, 6 if v6 else 4)

    async def dump(only_dnat: bool):
        with netns_mod.entered(netns):
            sock = AsyncNFCTSocket(nfgen_family=socket.AF_UNSPEC)
            await sock.setup_endpoint()      # the socket is created here, inside the namespace
        msgs = []
        try:
            # Linux >= 5.15 filters on status in the kernel (a node may hold 100k+ entries);
            # older kernels ignore the filter and we filter below anyway.
            kw = {"status": IPS_DST_NAT, "status_mask": IPS_DST_NAT} if only_dnat else {}
            async for m in await sock.dump(**kw):
                msgs.append(m)
        finally:
            sock.close()
        return msgs

    try:
        messages = asyncio.run(dump(True))
    except PermissionError:
        raise
    except Exception:  # noqa: BLE001 - a kernel that rejects the filter: dump everything
        messages = asyncio.run(dump(False))

    out: List[CtEntry] = []
    for m in messages:
        status = m.get_attr("CTA_STATUS") or 0
        o, r = tup(m.get_attr("CTA_TUPLE_ORIG")), tup(m.get_attr("CTA_TUPLE_REPLY"))
        if not o or not r or not status & IPS_DST_NAT:
            continue
        proto = protomod.k8s(o[2])
        if proto is None:
            continue
        state = None
        pi = m.get_attr("CTA_PROTOINFO")
        tcp = pi.get_attr("CTA_PROTOINFO_TCP") if pi is not None else None
        if tcp is not None:
            state = TCP_STATES.get(tcp.get_attr("CTA_PROTOINFO_TCP_STATE"))
        names = status_names(status)
        if not status & 0x2:
            names = names + ("UNREPLIED",)
        out.append(CtEntry(proto=proto, orig_src=o[0], orig_dst=o[1], orig_sport=o[3], orig_dport=o[4],
                           reply_src=r[0], reply_dst=r[1], reply_sport=r[3], reply_dport=r[4],
                           family=o[5], status=names, timeout=m.get_attr("CTA_TIMEOUT"), state=state))
    return out


def _listening(text: Optional[str], proto: str, v6: bool) -> List[Tuple[str, str, int]]:
    out = []
    for line in (text or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 4:
            continue
        if proto == "TCP" and f[3] != "0A":
            continue
        addr_hex, _, port_hex = f[1].partition(":")
        try:
            port = int(port_hex, 16)
            raw = bytes.fromhex(addr_hex)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = str(ipaddress.IPv6Address(raw))
            else:
                addr = str(ipaddress.IPv4Address(raw[::-1]))
        except ValueError:
            continue
        out.append((proto, addr, port))
    return out


def _sysctl_keys(ifaces: Iterable[str]) -> List[str]:
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
            "net.ipv4.conf.all.route_localnet", "net.ipv4.conf.default.route_localnet",
            "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"]
    for ifname in ifaces:
        keys.append(f"net.ipv4.conf.{ifname}.route_localnet")
    return keys


def _in_netns(netns: Optional[str], view: NodeView, route_ips: List[str]) -> Dict[int, set]:
    """Everything read through setns: sysctls, links, routes, addresses, sockets.

    Returns the legacy (x_tables) tables that exist, by family, from /proc/net/ip*_tables_names.
    """
    from pyroute2.iproute import IPRoute
    with netns_mod.entered(netns):
        ipr = IPRoute()
        try:
            ifnames: Dict[int, str] = {}
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                ifnames[link["index"]] = name
                view.interfaces.append(name)
                info = link.get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
                    view.bridges.append(name)
            addrs = ["127.0.0.1", "::1"]
            for msg in ipr.get_addr():
                a = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if a and a not in addrs:
                    addrs.append(a)
                if a and msg.get("index") in ifnames:
                    view.address_ifaces.setdefault(a, ifnames[msg["index"]])
            view.local_addresses = addrs
            types = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
            for ip in route_ips[:_ROUTE_LOOKUPS_MAX]:
                try:
                    msg = ipr.route("get", dst=ip)[0]
                except Exception:   # noqa: BLE001 - unreachable, bad address: no route known
                    view.routes[ip] = {"ifname": None, "gateway": None, "type": "unreachable"}
                    continue
                view.routes[ip] = {"ifname": ifnames.get(msg.get_attr("RTA_OIF")),
                                   "gateway": msg.get_attr("RTA_GATEWAY"),
                                   "type": types.get(msg["type"], str(msg["type"]))}
            if len(route_ips) > _ROUTE_LOOKUPS_MAX:
                view.notes.append(f"Looked up routes for the first {_ROUTE_LOOKUPS_MAX} of "
                                  f"{len(route_ips)} pod IPs only.")
        finally:
            ipr.close()
        ifaces = list(dict.fromkeys(view.bridges + [r["ifname"] for r in view.routes.values()
                                                    if r.get("ifname")]))
        for key in _sysctl_keys(ifaces):
            value = _read("/proc/sys/" + (_conf_path(key) if ".conf." in key else key.replace(".", "/")))
            if value is not None:
                view.sysctls[key] = value.strip()
        sockets = []
        read_any = False
        for fname, proto, v6 in (("tcp", "TCP", False), ("tcp6", "TCP", True),
                                 ("udp", "UDP", False), ("udp6", "UDP", True)):
            text = _read(f"{_PROC_NET}/{fname}")
            read_any = read_any or text is not None
            sockets += _listening(text, proto, v6)
        view.listening = sorted(set(sockets))
        view.sockets_read = read_any
        return {4: set((_read(f"{_PROC_NET}/ip_tables_names") or "").split()),
                6: set((_read(f"{_PROC_NET}/ip6_tables_names") or "").split())}


# /proc/net is /proc/self/net: the namespace of the process's main thread. This code may run in
# a thread that entered another namespace (the agent's check loop), so read the thread's own.
_PROC_NET = "/proc/thread-self/net"


def _conf_path(key: str) -> str:
    """net.ipv4.conf.<if>.route_localnet -> net/ipv4/conf/<if>/route_localnet (if may hold dots)."""
    head, rest = key.split(".conf.", 1)
    ifname, _, leaf = rest.rpartition(".")
    return f"{head.replace('.', '/')}/conf/{ifname.replace('/', '.')}/{leaf}"


def gather(netns: Optional[str] = None, resolver_or_index: Any = None, *, node_name: Optional[str] = None,
           pods_known: Optional[bool] = None, notes: Sequence[str] = (),
           conntrack: bool = True) -> NodeView:
    """Reads the node (inside network namespace `netns`, None = the current one) into a NodeView.

    `resolver_or_index` is a pods.sources Resolver, a PodIndex, a list of PodInfo, or None (no pod
    metadata: then `pods_known` is False and the checks that need pods say so). `node_name` picks
    this node's pods out of a cluster-wide list. `notes` are carried into the view (e.g. the pod
    sources that were skipped). Needs root for the rules, conntrack and any namespace but our own.
    """
    from bpftrace_hostport.node.rules import read_node_rules
    if netns is not None and os.geteuid() != 0:
        raise UserError("Entering another network namespace needs root: run it with sudo.")
    if netns is not None and "/" not in netns:
        netns_mod.require(netns)
    pod_list, known = pods_of(resolver_or_index)
    pod_list = drop_synthetic_duplicates(pod_list)
    view = NodeView(netns=netns, node_name=node_name, pods=pod_list,
                    pods_known=known if pods_known is None else pods_known, notes=list(notes))
    view.rules, rule_notes = read_node_rules(netns)
    view.notes += rule_notes
    # read_node_rules runs five tools and notes each one it had to skip.
    view.rules_read = bool(view.rules) or len([n for n in rule_notes if "skipped" in n]) < 5

    if conntrack:
        _read_conntrack(netns, view)

    ips = [r.target_ip for r in view.rules]
    for p in pod_list:
        if not p.host_network:
            ips += list(p.ips)
    # Where DNATed conntrack entries point: a dead pod's IP still routed onto the pod network is
    # how a stale entry is told from a DNAT to another node (a NodePort endpoint).
    ips += [e.reply_src for e in view.conntrack]
    try:
        legacy = _in_netns(netns, view, list(dict.fromkeys(ips)))
    except PermissionError:
        raise UserError("Reading a network namespace needs root: run it with sudo.") from None

    # nat plumbing and filter tables. Legacy tables only when they already exist: asking
    # iptables-legacy-save for a missing table would create it.
    for fam, nft_tool, legacy_tool in ((4, "iptables-nft-save", "iptables-legacy-save"),
                                       (6, "ip6tables-nft-save", "ip6tables-legacy-save")):
        v = "IPv6 " if fam == 6 else ""
        for table in ("nat", "filter"):
            runs = [(nft_tool, "iptables-nft")]
            if table in legacy[fam]:
                runs.append((legacy_tool, "iptables-legacy"))
            for tool, source in runs:
                text = _run(netns, [tool, "-t", table], view.notes, f"the {v}{table} table of {source}")
                if not text or not text.strip():
                    continue
                if table == "nat":
                    view.nat.append(nat_summary(text, source, fam))
                else:
                    view.filters.append(filter_table(text, source, fam))
    text = _run(netns, ["nft", "-j", "list", "ruleset"], view.notes, "nftables forward chains")
    if text:
        view.nft_forward = nft_forward_chains(text)
    return view


def _read_conntrack(netns: Optional[str], view: NodeView) -> None:
    try:
        view.conntrack = _conntrack_netlink(netns)
        view.conntrack_read = True
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any netlink trouble: try the conntrack tool
        text = _run(netns, ["conntrack", "-L", "-o", "extended"], view.notes, "conntrack entries")
        if text is not None:
            view.conntrack = parse_conntrack_text(text)
            view.conntrack_read = True
            view.notes.append(f"Read conntrack with the conntrack tool (netlink: {e}).")
