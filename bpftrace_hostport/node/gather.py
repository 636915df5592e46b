"""What a node looks like to a hostPort packet, gathered once as plain data.

`gather(netns, resolver_or_index)` (this module) reads, inside the node's network namespace (None: the current one):

* the netfilter state that concerns hostPorts, each tool run once (node/read.py): the nat
  chains the hostPort DNAT rules live in and the plumbing around them (the order in which
  CNI-HOSTPORT-DNAT / KUBE-HOSTPORTS jump to the per-pod chains, whether PREROUTING / OUTPUT
  reach them, portmap's hairpin pieces, KUBE-MARK-MASQ), the FORWARD and INPUT chains of the
  filter tables, both iptables backends (legacy only where its tables already exist), both
  families, and the native nftables tables (portmap's cni_hostport, firewalld's, ...);
* the conntrack entries of the hostPorts, DNATed or not, filtered in the kernel (pyroute2's
  ctnetlink dump, opened inside the namespace; `conntrack -L` when that fails), and the table's
  fill and statistics;
* the sysctls that decide whether DNATed packets can move at all (ip_forward, IPv6 forwarding,
  route_localnet per interface, bridge-nf-call-iptables when br_netfilter is loaded);
* links, addresses, the routes to pod IPs, and listening sockets.

Nothing here changes the node: no legacy table is ever instantiated (`iptables-legacy-save -t X`
would create table X), no sysctl is written. Every source that cannot be read is skipped and
named in `notes`. The text is parsed by node/parse.py (pure, tested on captured text); the view and what is
joined from it (pods, mappings, conflicts) is node/nodeview.py.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from bpftrace_hostport import netns as netns_mod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.node.nodeview import NodeView, drop_synthetic_duplicates, local_pods, pod_label, pods_of
from bpftrace_hostport.node.parse import filter_table, nat_summary, parse_conntrack_text


_TIMEOUT_S = 30


_ROUTE_LOOKUPS_MAX = 5000

# Interfaces whose addresses are not the node's own for hostPort purposes: kube-proxy's IPVS
# mode binds every ClusterIP to kube-ipvs0.
_SERVICE_LINKS = ("kube-ipvs0",)


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


def _inodes(text: Optional[str], proto: str, v6: bool) -> Dict[Tuple[str, str, int], int]:
    """(proto, addr, port) -> socket inode of the listening sockets in a /proc/net/{tcp,udp}[6] text."""
    out: Dict[Tuple[str, str, int], int] = {}
    for line in (text or "").splitlines()[1:]:
        got = _listening("header\n" + line, proto, v6)
        f = line.split()
        if got and len(f) > 9 and f[9].isdigit():
            out[got[0]] = int(f[9])
    return out


def _ipvs(text: Optional[str]) -> List[Tuple[str, str, int]]:
    """Virtual services of /proc/net/ip_vs: `TCP  0A600001:01BB rr` (IPv6: `[addr]:port` in hex)."""
    out = []
    for line in (text or "").splitlines():
        f = line.split()
        if len(f) < 2 or f[0] not in ("TCP", "UDP", "SCTP"):
            continue
        addr_hex, _, port_hex = f[1].rpartition(":")
        try:
            port = int(port_hex, 16)
            if addr_hex.startswith("["):
                addr = str(ipaddress.IPv6Address(bytes.fromhex(addr_hex.strip("[]").replace(":", ""))))
            else:
                addr = str(ipaddress.IPv4Address(int(addr_hex, 16)))
        except ValueError:
            continue
        out.append((f[0], addr, port))
    return out


def _sockets_here() -> List[Tuple[str, str, int]]:
    socks = []
    for fname, proto, v6 in (("tcp", "TCP", False), ("tcp6", "TCP", True), ("udp", "UDP", False), ("udp6", "UDP", True)):
        socks += _listening(_read(f"{_PROC_NET}/{fname}"), proto, v6)
    return sorted(set(socks))


_NETNS_SCAN_MAX = 500          # namespaces entered to find the pods' (a node runs fewer pods than that)


def _pod_namespaces(view: NodeView, pods) -> None:
    """Finds each hostPort pod's own network namespace by its IP and reads its listening sockets:
    the named namespaces first (/var/run/netns: containerd's and CRI-O's cni-*, the lab's), then
    the namespaces of the node's processes (a pod's pause process). Enters each in turn."""
    from pyroute2.iproute import IPRoute
    pods = [p for p in pods if not p.host_network and p.host_ports and p.ips and p.phase in (None, "Running")]
    wanted = {ip for p in pods for ip in p.ips}
    if not wanted:
        return
    try:
        here = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return
    seen = {here}
    candidates: List[Tuple[str, str]] = []                # (path, how a user enters it)
    if os.path.isdir(netns_mod.NETNS_RUN_DIR):
        for name in sorted(os.listdir(netns_mod.NETNS_RUN_DIR)):
            candidates.append((os.path.join(netns_mod.NETNS_RUN_DIR, name), f"ip netns exec {name} "))

    def processes():
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                yield (f"/proc/{pid}/ns/net", f"nsenter --net=/proc/{pid}/ns/net -- ")

    def visit(path: str, how: str) -> None:
        try:
            ino = os.stat(path).st_ino
        except OSError:
            return
        if ino in seen:
            return
        seen.add(ino)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            from pyroute2 import netns as pr_netns
            pr_netns.setns(fd, flags=0)
            ipr = IPRoute()
            try:
                addrs = {m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS") for m in ipr.get_addr()}
            finally:
                ipr.close()
            hits = addrs & wanted
            if hits:
                socks = _sockets_here()
                for ip in hits:
                    view.pod_sockets[ip] = (how, socks)
        except OSError:
            pass
        finally:
            os.close(fd)

    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        from pyroute2 import netns as pr_netns
        n = 0
        for source in (candidates, processes()):
            for path, how in source:
                if not wanted - set(view.pod_sockets) or n >= _NETNS_SCAN_MAX:
                    break
                n += 1
                visit(path, how)
    finally:
        pr_netns.setns(saved, flags=0)
        os.close(saved)
    for p in pods:
        if not any(ip in view.pod_sockets for ip in p.ips):
            view.pod_netns_missing.append(p.ips[0])
            view.notes.append(f"The network namespace of pod {pod_label(p.namespace, p.name)} ({p.ips[0]}) could not "
                              "be found (no named namespace and no process of this node holds that address), so "
                              "whether anything listens on its containerPorts was not checked.")


def _owners(view: NodeView, keys: Iterable[Tuple[str, str, int]]) -> None:
    """Which process holds each of these listening sockets (by socket inode, /proc/*/fd)."""
    inodes: Dict[int, Tuple[str, str, int]] = {}
    for fname, proto, v6 in (("tcp", "TCP", False), ("tcp6", "TCP", True), ("udp", "UDP", False), ("udp6", "UDP", True)):
        for key, ino in _inodes(_read(f"{_PROC_NET}/{fname}"), proto, v6).items():
            if key in keys:
                inodes[ino] = key
    if not inodes:
        return
    want = {f"socket:[{i}]": i for i in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in want:
                comm = (_read(f"/proc/{pid}/comm") or "?").strip()
                view.socket_owners[inodes[want[link]]] = f"pid {pid} ({comm})"
        if len(view.socket_owners) == len(inodes):
            return


def _sysctl_keys(ifaces: Iterable[str]) -> List[str]:
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
            "net.ipv4.conf.all.route_localnet", "net.ipv4.conf.default.route_localnet",
            "net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
            "net.netfilter.nf_conntrack_count", "net.netfilter.nf_conntrack_max"]
    for ifname in ifaces:
        keys.append(f"net.ipv4.conf.{ifname}.route_localnet")
    return keys


def _links_and_sockets(view: NodeView) -> Dict[int, str]:
    """Links, addresses and listening sockets of the namespace the thread is in."""
    from pyroute2.iproute import IPRoute
    ipr = IPRoute()
    try:
        ifnames: Dict[int, str] = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            ifnames[link["index"]] = name
            view.interfaces.append(name)
            mtu = link.get_attr("IFLA_MTU")
            if isinstance(mtu, int):
                view.mtus[name] = mtu
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
    finally:
        ipr.close()
    sockets = []
    read_any = False
    for fname, proto, v6 in (("tcp", "TCP", False), ("tcp6", "TCP", True),
                             ("udp", "UDP", False), ("udp6", "UDP", True)):
        text = _read(f"{_PROC_NET}/{fname}")
        read_any = read_any or text is not None
        sockets += _listening(text, proto, v6)
    view.listening = sorted(set(sockets))
    view.sockets_read = read_any
    ipvs = _read(f"{_PROC_NET}/ip_vs")
    view.ipvs_read = ipvs is not None
    view.ipvs_services = _ipvs(ipvs)
    # nf_conntrack_max can be set only in the host's own namespace (0444 in any other)
    try:
        view.netns_is_host = bool(os.stat("/proc/sys/net/netfilter/nf_conntrack_max").st_mode & 0o200)
    except OSError:
        view.netns_is_host = None
    return ifnames


def _routes_and_sysctls(view: NodeView, route_ips: List[str]) -> None:
    from pyroute2.iproute import IPRoute
    ipr = IPRoute()
    try:
        ifnames = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
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
    # route_localnet of the bridges, of the links pods are routed through, and of every link
    # holding an address (a link facing the network exposes 127.0.0.1 with it on).
    ifaces = list(dict.fromkeys(view.bridges + [r["ifname"] for r in view.routes.values() if r.get("ifname")]
                                + [i for a, i in view.address_ifaces.items()
                                   if i != "lo" and i not in _SERVICE_LINKS]))
    for key in _sysctl_keys(ifaces):
        value = _read("/proc/sys/" + (_conf_path(key) if ".conf." in key else key.replace(".", "/")))
        if value is not None:
            view.sysctls[key] = value.strip()


# /proc/net is /proc/self/net: the namespace of the process's main thread. This code may run in
# a thread that entered another namespace (the agent's check loop), so read the thread's own.
_PROC_NET = "/proc/thread-self/net"


def _conf_path(key: str) -> str:
    """net.ipv4.conf.<if>.route_localnet -> net/ipv4/conf/<if>/route_localnet (if may hold dots)."""
    head, rest = key.split(".conf.", 1)
    ifname, _, leaf = rest.rpartition(".")
    return f"{head.replace('.', '/')}/conf/{ifname.replace('/', '.')}/{leaf}"


def _node_addresses(view: NodeView) -> List[str]:
    """The node's own addresses a client can call a hostPort on (no loopback, link-local or
    Service address): where stale DNAT entries of ports no rule names any more are looked for."""
    out = []
    for a in view.local_addresses:
        if a in ("127.0.0.1", "::1") or view.address_ifaces.get(a) in _SERVICE_LINKS:
            continue
        try:
            if ipaddress.ip_address(a).is_link_local:
                continue
        except ValueError:
            continue
        out.append(a)
    return out


def gather(netns: Optional[str] = None, resolver_or_index: Any = None, *, node_name: Optional[str] = None,
           pods_known: Optional[bool] = None, notes: Sequence[str] = (),
           conntrack: bool = True, forward: bool = True, target_args: Sequence[str] = ()) -> NodeView:
    """Reads the node (inside network namespace `netns`, None = the current one) into a NodeView.

    `resolver_or_index` is a pods.sources Resolver, a PodIndex, a list of PodInfo, or None (no pod
    metadata: then `pods_known` is False and the checks that need pods say so). `node_name` picks
    this node's pods out of a cluster-wide list. `notes` are carried into the view (e.g. the pod
    sources that were skipped). `forward=False` leaves the filter tables out (`rules` needs only
    the nat side), `conntrack=False` the conntrack table. `target_args` is how the command was
    pointed at this node (`--lab NAME`), for the commands a finding prints. Needs root for the
    rules, conntrack and any namespace but our own.
    """
    from bpftrace_hostport.node.read import CACHE, read_conntrack
    from bpftrace_hostport.node.rules import rules_of
    if netns is not None and os.geteuid() != 0:
        raise UserError("Entering another network namespace needs root: run it with sudo.")
    if netns is not None and "/" not in netns:
        netns_mod.require(netns)
    pod_list, known = pods_of(resolver_or_index)
    pod_list = drop_synthetic_duplicates(pod_list)
    view = NodeView(netns=netns, node_name=node_name, pods=pod_list,
                    pods_known=known if pods_known is None else pods_known, notes=list(notes),
                    hostname=socket.gethostname().lower() if netns is None else None,
                    target_args=list(target_args))
    nf = CACHE.get(netns, ("nat", "filter") if forward else ("nat",), max_age=0)
    view.rules = rules_of(nf)
    view.notes += nf.notes
    view.rules_read = nf.sources_read > 0
    view.legacy_tables = {f: sorted(t) for f, t in nf.legacy_tables.items()}
    for source, fam, text in nf.nat:
        view.nat.append(nat_summary(text, source, fam))
    for source, fam, text in nf.filter:
        view.filters.append(filter_table(text, source, fam))
    view.nft_items = list(nf.nft_items)
    try:
        with netns_mod.entered(netns):
            _links_and_sockets(view)
            if conntrack:
                _read_conntrack(netns, view, read_conntrack)
            ips = [r.target_ip for r in view.rules]
            for p in pod_list:
                if not p.host_network:
                    ips += list(p.ips)
            # Where DNATed conntrack entries point: a dead pod's IP still routed onto the pod network is
            # how a stale entry is told from a DNAT to another node (a NodePort endpoint).
            ips += [e.reply_src for e in view.conntrack if e.dnat]
            _routes_and_sysctls(view, list(dict.fromkeys(ips)))
            if conntrack:
                _conntrack_fill(netns, view)
            if forward and view.pods_known:
                _pod_namespaces(view, local_pods(view))
            # Node sockets on a hostPort that a DNAT rule takes: whose are they?
            rule_ports = {(r.proto, r.host_port) for r in view.rules}
            shadowed = [s for s in view.listening if (s[0], s[2]) in rule_ports]
            if shadowed and forward:
                _owners(view, set(shadowed))
    except PermissionError:
        raise UserError("Reading a network namespace needs root: run it with sudo.") from None
    return view


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _conntrack_fill(netns: Optional[str], view: NodeView) -> None:
    """A table at 90% of its limit or more: a sample of its entries says who fills it."""
    try:
        count = int(view.sysctls.get("net.netfilter.nf_conntrack_count", "0"))
        limit = int(view.sysctls.get("net.netfilter.nf_conntrack_max", "0"))
    except ValueError:
        return
    if limit and count >= 0.9 * limit:
        from bpftrace_hostport.node.read import sample_conntrack
        try:
            view.conntrack_sample = sample_conntrack(None)
        except OSError as e:
            view.notes.append(f"The full conntrack table could not be sampled ({e.strerror or e}).")


def _ports_of_interest(view: NodeView) -> List[Tuple[str, int, int]]:
    """(proto, hostPort, family) of every rule and declaration: one conntrack dump each. A
    declaration counts for the families of its pod's addresses (a hostNetwork pod: the node's)."""
    ports = {(r.proto, r.host_port, r.family) for r in view.rules}
    for p in view.pods:
        fams = {_family(ip) for ip in p.ips} or {4}
        for cp in p.host_ports:
            for fam in fams:
                ports.add((cp.protocol, cp.host_port, fam))
    return sorted(ports)


def _read_conntrack(netns: Optional[str], view: NodeView, read_conntrack) -> None:
    ports = _ports_of_interest(view)
    addresses = _node_addresses(view)
    try:
        got = read_conntrack(None, ports, addresses)      # the thread is in the namespace already
        view.conntrack = got.entries
        view.conntrack_stats = got.stats
        view.conntrack_read = True
        if not got.filtered_in_kernel:
            view.notes.append("This kernel does not filter conntrack dumps (Linux < 5.9): every entry was "
                              "read and the hostPorts' kept.")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any netlink trouble: try the conntrack tool
        entries = []
        ok = False
        for proto, port, fam in ports:
            text = _run(None, ["conntrack", "-L", "-o", "extended", "-p", proto.lower(), "--orig-port-dst",
                               str(port)] + (["-f", "ipv6"] if fam == 6 else []), view.notes, "conntrack entries")
            if text is not None:
                ok = True
                entries += parse_conntrack_text(text)
        for addr in addresses:
            text = _run(None, ["conntrack", "-L", "-o", "extended", "-p", "udp", "--orig-dst", addr,
                               "--dst-nat"] + (["-f", "ipv6"] if ":" in addr else []),
                        view.notes, "conntrack entries")
            if text is not None:
                ok = True
                entries += [x for x in parse_conntrack_text(text) if x.dnat]
        if ok or not ports:
            seen = set()
            view.conntrack = [x for x in entries if not (x in seen or seen.add(x))]
            view.conntrack_read = True
            view.notes.append(f"Read conntrack with the conntrack tool (netlink: {e}).")
