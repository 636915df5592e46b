"""The lab's named scenarios (`lab up --scenario NAME`): each builds one way hostPort breaks on a
real node (shared/FIELD.md), for `check`'s kernel tests, the trainer and the bench.

The first ones (basic ... localhost) are built by lab/build.py itself; the ones declared here
add pods (`pods`), change the portmap plugin's config (`portmap`), and act before the pods'
CNI ADD (`before`) or after the lab is up (`after`). Everything they do happens inside the
lab's own namespaces (the node's, a client's, a pod's), never in the root namespace.
"""
from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

#: Scenarios lab/build.py builds itself.
BUILT_IN = ("basic", "hostnetwork", "conflict", "stale-udp", "blackhole", "forward-drop", "hairpin", "localhost")

UDP_STREAM_PORT = 40054            # the pinned UDP client's fixed source port (udp-pinned)
DAEMON_PORT = 10248                # kubelet's healthz port: a node daemon bound to 127.0.0.1 (route-localnet)
CLUSTER_IPS = ("10.96.0.1", "10.96.0.10")   # on kube-ipvs0 (ipvs)
KUBE_MARK = "0x4000"               # kube-proxy's masquerade mark


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    pods: str = ""                                   # extra manifests (YAML), added to the lab's
    portmap: Dict[str, object] = field(default_factory=dict)   # merged into the portmap plugin's config
    backend: Optional[str] = None                    # the portmap backend it needs ("nftables")
    ipv6: bool = False                               # needs the lab's IPv6
    before: Optional[Callable] = None                # (state) after the node, before the pods' CNI ADD
    after: Optional[Callable] = None                 # (state) once every pod is up


_DNS = """
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: lab}
spec:
  containers:
  - name: dns
    image: coredns
    ports: [{name: dns, containerPort: 53, hostPort: 5353, protocol: UDP}]
"""

_CALLER = """
apiVersion: v1
kind: Pod
metadata: {name: caller, namespace: lab}
spec:
  containers:
  - name: curl
    image: curl
"""

_TRANSIT_TARGET = """
apiVersion: v1
kind: Pod
metadata: {name: transit-target, namespace: lab}
spec:
  containers:
  - name: web
    image: nginx
    ports: [{name: web, containerPort: 8000, protocol: TCP}]
"""


def _b():
    from bpftrace_hostport.lab import build
    return build


def _node(st, *cmd, check=True, input=None, timeout=120):
    b = _b()
    return b._run(b._nsexec(st.node_netns, *cmd), check=check, input=input, timeout=timeout)


def _start(st, ns, args, log):
    return _b()._start_process(st, ns, args, log, ready=True)


# --------------------------------------------------------------------------- kube-proxy


def _hash(s: str) -> str:
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]


def kube_proxy_rules(services: int, node_ip: str, cluster_cidr: str = "10.244.0.0/16") -> Tuple[str, str]:
    """(nat, filter) iptables-restore text in the shapes kube-proxy's iptables mode writes
    (pkg/proxy/iptables): `services` Services with two endpoints each on other nodes, every tenth
    one also a NodePort; KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-NODEPORTS, and the filter side
    (KUBE-FORWARD, KUBE-FIREWALL with the martian drop, KUBE-SERVICES for Services without
    endpoints). About 11 nat lines per Service."""
    chains = ["KUBE-MARK-MASQ", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-SERVICES", "KUBE-PROXY-CANARY"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {KUBE_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {KUBE_MARK}/{KUBE_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {KUBE_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        '-j MASQUERADE --random-fully',
    ]
    portals, nodeports, no_endpoints = [], [], []
    for i in range(services):
        ns, name = f"team{i % 50}", f"svc{i}"
        port = 80 + i % 5
        cip = f"10.96.{1 + i // 250}.{1 + i % 250}"
        svc = "KUBE-SVC-" + _hash(f"{ns}/{name}:http")
        c = f"{ns}/{name}:http"
        chains.append(svc)
        portals.append(f'-A KUBE-SERVICES -d {cip}/32 -p tcp -m comment --comment "{c} cluster IP" '
                       f"-m tcp --dport {port} -j {svc}")
        rules.append(f'-A {svc} ! -s {cluster_cidr} -d {cip}/32 -p tcp -m comment --comment "{c} cluster IP" '
                     f"-m tcp --dport {port} -j KUBE-MARK-MASQ")
        if i % 10 == 9:
            ext = "KUBE-EXT-" + _hash(f"{ns}/{name}:http")
            chains.append(ext)
            nodeports.append(f'-A KUBE-NODEPORTS -p tcp -m comment --comment "{c}" -m tcp '
                             f"--dport {30000 + i % 2700} -j {ext}")
            rules.append(f'-A {ext} -m comment --comment "masquerade traffic for {c} external destinations" '
                         "-j KUBE-MARK-MASQ")
            rules.append(f"-A {ext} -j {svc}")
        if i % 997 == 996:
            no_endpoints.append((cip, port, c))
        for e in range(2):
            n = 2 * i + e
            ep = f"10.{245 + n // 62500 % 8}.{n // 250 % 250}.{2 + n % 250}"
            sep = "KUBE-SEP-" + _hash(f"{ns}/{name}:http/{e}")
            chains.append(sep)
            prob = " -m statistic --mode random --probability 0.50000000000" if e == 0 else ""
            rules.append(f'-A {svc} -m comment --comment "{c} -> {ep}:8080"{prob} -j {sep}')
            rules.append(f'-A {sep} -s {ep}/32 -m comment --comment "{c}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p tcp -m comment --comment "{c}" -m tcp -j DNAT --to-destination {ep}:8080')
    rules += portals
    rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                 'last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    rules += nodeports
    nat = "*nat\n" + "".join(f":{c} - [0:0]\n" for c in chains) + "\n".join(rules) + "\nCOMMIT\n"
    fchains = ["KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL", "KUBE-FORWARD", "KUBE-KUBELET-CANARY", "KUBE-NODEPORTS",
               "KUBE-PROXY-CANARY", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES"]
    frules = [
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        "-A INPUT -j KUBE-FIREWALL",
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally visible service portals" '
        "-j KUBE-EXTERNAL-SERVICES",
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A OUTPUT -j KUBE-FIREWALL",
        '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" '
        "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {KUBE_MARK}/{KUBE_MARK} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
    ] + [f'-A KUBE-SERVICES -d {cip}/32 -p tcp -m comment --comment "{c} has no endpoints" -m tcp --dport {port} '
         "-j REJECT --reject-with icmp-port-unreachable" for cip, port, c in no_endpoints]
    filt = "*filter\n" + "".join(f":{c} - [0:0]\n" for c in fchains) + "\n".join(frules) + "\nCOMMIT\n"
    return nat, filt


def conntrack_filler(count: int, node_ip: str, seed: int = 0) -> str:
    """`conntrack -R` lines: `count` entries that have nothing to do with hostPorts, as a busy node
    holds them: pods talking to ClusterIPs (DNATed to endpoints elsewhere) and, one in fifty, UDP
    NodePort traffic to the node's address DNATed to a remote endpoint."""
    out = []
    for i in range(count):
        a, b = divmod(i + seed, 250)
        src = f"10.244.{a % 250}.{b + 2}"
        sport = 10000 + (i * 7) % 50000
        if i % 50 == 49:
            out.append(f"-I -p udp -s 198.51.100.{1 + i % 250} -d {node_ip} --sport {sport} "
                       f"--dport {30000 + i % 2700} -t 3600 -u SEEN_REPLY "
                       f"--dst-nat 10.247.{i % 250}.{2 + i % 200}:53")
        else:
            out.append(f"-I -p tcp -s {src} -d 10.96.{1 + i % 40}.{1 + i % 250} --sport {sport} "
                       f"--dport {80 + i % 5} --state ESTABLISHED -t 3600 -u SEEN_REPLY,ASSURED "
                       f"--dst-nat 10.245.{i % 250}.{2 + i % 250}:8080")
    return "\n".join(out) + "\n"


def load_conntrack(st, lines: str, name: str, check: bool = True):
    path = st.dir / f"{name}.conntrack"
    path.write_text(lines)
    return _node(st, "conntrack", "-R", str(path), timeout=600, check=check)


def _kube_proxy_before(st) -> None:
    nat, filt = kube_proxy_rules(st.services, st.node_ip)
    _node(st, "iptables-nft-restore", input=nat + filt, timeout=900)


def _kube_proxy_after(st) -> None:
    n = min(50_000, 5 * st.services) if st.conntrack_entries is None else st.conntrack_entries
    if n:
        load_conntrack(st, conntrack_filler(n, st.node_ip), "filler")


# --------------------------------------------------------------------------- the other scenarios


def _jump_line(st, table: str, chain: str, target: str, family: int = 4) -> str:
    tool = "ip6tables-nft-save" if family == 6 else "iptables-nft-save"
    text = _node(st, tool, "-t", table).stdout
    return next(ln for ln in text.splitlines() if ln.startswith(f"-A {chain} ") and f"-j {target}" in ln)


def _udp_pinned(st) -> None:
    """plugins#123-style: a UDP client starts while the PREROUTING jump to CNI-HOSTPORT-DNAT is
    missing (a firewall reload flushed it), so its first datagram makes a conntrack entry to the
    node itself; the jump comes back, but the client keeps sending and keeps that entry."""
    import shlex
    line = _jump_line(st, "nat", "PREROUTING", "CNI-HOSTPORT-DNAT")
    _node(st, "iptables-nft", "-t", "nat", "-D", *shlex.split(line)[1:])
    args = ["bpftrace_hostport.lab.traffic", "--host", st.node_ip, "--port", "5353", "--proto", "udp",
            "--source-port", str(UDP_STREAM_PORT), "--count", "36000", "--rate", "10",
            "--timeout", "0.2", "--max-seconds", "3600", "--ready-after", "1"]
    _start(st, st.clients[0]["netns"], args, "udp-pinned-client.log")
    time.sleep(0.5)
    _node(st, "iptables-nft", "-t", "nat", "-A", *shlex.split(line)[1:])


def _one_family(st) -> None:
    """A dual-stack pod whose IPv6 hostPort rules are gone (an old portmap, a lost ip6tables restore)."""
    import shlex
    text = _node(st, "ip6tables-nft-save", "-t", "nat").stdout
    chains = set()
    for ln in text.splitlines():
        if ln.startswith("-A CNI-HOSTPORT-DNAT ") and "-j CNI-DN-" in ln:
            _node(st, "ip6tables-nft", "-t", "nat", "-D", *shlex.split(ln)[1:])
            chains.add(ln.split("-j ")[1].split()[0])
    for c in chains:
        _node(st, "ip6tables-nft", "-t", "nat", "-F", c)
        _node(st, "ip6tables-nft", "-t", "nat", "-X", c)


def _ipvs(st) -> None:
    """kube-proxy's IPVS mode: ClusterIPs bound to kube-ipvs0 (a dummy link there; this kernel has
    no dummy links, so a veth whose peer stays unused). IPVS itself is not in this kernel either,
    so a node socket on 10.96.0.10:8000 stands in for the Service of that port."""
    _node(st, "ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kube-ipvs0-peer")
    for ip in CLUSTER_IPS:
        _node(st, "ip", "addr", "add", f"{ip}/32", "dev", "kube-ipvs0")
    _start(st, st.node_netns, ["bpftrace_hostport.lab.servers", "--pod", "default/web-service",
                               "--bind", CLUSTER_IPS[1], "--tcp", "8000"], "ipvs-service.log")


def _conntrack_full(st) -> None:
    """The node's conntrack table filled to nf_conntrack_max by one noisy client (10.B.0.99):
    ASSURED entries, which early_drop cannot evict, so new connections are dropped."""
    def read(key):
        return int(_node(st, "cat", f"/proc/sys/net/netfilter/{key}").stdout.strip())
    room = read("nf_conntrack_max") - read("nf_conntrack_count")
    noisy = f"10.{st.subnet}.0.99"
    lines = [f"-I -p tcp -s {noisy} -d 10.{st.subnet}.{2 + i // 60000}.{1 + i // 240 % 250} "
             f"--sport {1024 + i % 240} --dport {443 + i // 60000} --state ESTABLISHED -t 3600 "
             "-u SEEN_REPLY,ASSURED" for i in range(max(0, room))]
    # The last ones may find the table full already (the lab's own traffic took a slot): fine.
    p = load_conntrack(st, "\n".join(lines) + "\n", "full", check=False)
    if p.returncode != 0 and read("nf_conntrack_count") < read("nf_conntrack_max") - 16:
        raise _b().LabError(f"Filling the node's conntrack table failed: {(p.stderr or p.stdout).strip()[:200]}")


def _route_localnet(st) -> None:
    """route_localnet=1 for every interface (as kube-proxy sets it for NodePorts on localhost),
    no martian drop rule, and a node daemon on 127.0.0.1 (kubelet's healthz port). The first
    client routes 127.0.0.1 to the node, as a host on the LAN can."""
    _node(st, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
    _start(st, st.node_netns, ["bpftrace_hostport.lab.servers", "--pod", "node/kubelet", "--bind", "127.0.0.1",
                               "--tcp", str(DAEMON_PORT)], "daemon.log")
    b = _b()
    c = st.clients[0]["netns"]
    # The client's own local table goes behind a rule that sends 127.0.0.1 to the node.
    for cmd in (("sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"),
                ("ip", "route", "add", "127.0.0.1/32", "via", st.node_ip, "dev", "eth0", "table", "100"),
                ("ip", "rule", "add", "pref", "100", "lookup", "local"),
                ("ip", "rule", "del", "pref", "0"),
                ("ip", "rule", "add", "pref", "10", "to", "127.0.0.1/32", "lookup", "100")):
        b._run(b._nsexec(c, *cmd))


# firewalld's nftables backend (firewalld >= 2.3, StrictForwardPorts=yes), typed from its
# sources (src/firewall/core/nftables.py): DNATed traffic is accepted only for firewalld's own
# forward ports, everything else DNATed meets the reject of filter_FORWARD_dnat.
FIREWALLD_TABLE = """table inet firewalld {
	chain filter_FORWARD {
		type filter hook forward priority filter + 10; policy accept;
		ct state { established, related } accept
		ct status dnat jump filter_FORWARD_dnat
		ct state { invalid } drop
		iifname "lo" accept
		jump filter_FORWARD_ZONES
		reject with icmpx admin-prohibited
	}
	chain filter_FORWARD_dnat {
		reject with icmpx admin-prohibited
	}
	chain filter_FORWARD_ZONES {
		goto filter_FWD_public
	}
	chain filter_FWD_public {
		jump filter_FWD_public_allow
	}
	chain filter_FWD_public_allow {
	}
}
"""


def _firewalld(st) -> None:
    _node(st, "nft", "-f", "-", input=FIREWALLD_TABLE)


def _mark_masq_before(st) -> None:
    """kube-proxy's KUBE-MARK-MASQ as kubelet used to create it, without its KUBE-POSTROUTING
    (kube-proxy in nftables or IPVS mode, KEP-3178): portmap marks, nothing masquerades."""
    for fam in (("iptables-nft",), ("ip6tables-nft",)) if st.ipv6 else (("iptables-nft",),):
        _node(st, fam[0], "-t", "nat", "-N", "KUBE-MARK-MASQ")
        _node(st, fam[0], "-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", KUBE_MARK)


def _node_daemon(st) -> None:
    """A process of the node (not a pod) listening on TCP 8000, the hostPort of nginx-hostport."""
    _start(st, st.node_netns, ["bpftrace_hostport.lab.servers", "--pod", "node/daemon", "--tcp", "8000"],
           "daemon.log")


# portmap's nftables prerouting chain as plugins 1.6.1 - 1.8.x wrote it (plugins#1209): no
# `fib daddr type local` before the jump to the hostPort rules.
def _nft_transit(st) -> None:
    for fam in ("ip", "ip6") if st.ipv6 else ("ip",):
        _node(st, "nft", "flush", "chain", fam, "cni_hostport", "prerouting")
        _node(st, "nft", "add", "rule", fam, "cni_hostport", "prerouting", "jump", "hostip_hostports")
        _node(st, "nft", "add", "rule", fam, "cni_hostport", "prerouting", "jump", "hostports")


def _refused(st) -> None:
    """The pods stay, their hostPort rules stay, their servers stop: TCP 8000 / 44300 get a reset
    from the pod, UDP 5353 an ICMP port unreachable."""
    for pod in st.pods:
        if pod.server_pid and not pod.host_network:
            _b()._kill(pod.server_pid)
            pod.server_pid = None
    st.save()


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("kube-proxy", "thousands of kube-proxy Services (iptables mode; --services N, default 2000) "
             "and unrelated conntrack entries: nothing wrong, a big node",
             before=_kube_proxy_before, after=_kube_proxy_after),
    Scenario("udp-pinned", "a UDP client of hostPort 5353 started while the PREROUTING jump was missing: "
             "its conntrack entry keeps it on the node", pods=_DNS, after=_udp_pinned),
    Scenario("one-family", "a dual-stack pod whose IPv6 hostPort rules are gone", ipv6=True, after=_one_family),
    Scenario("ipvs", "kube-ipvs0 with ClusterIPs; a Service on 10.96.0.10:8000 (a node socket stands in for "
             "IPVS) is caught by hostPort 8000", pods=_CALLER, after=_ipvs),
    Scenario("conntrack-full", "the conntrack table filled to nf_conntrack_max by one client",
             after=_conntrack_full),
    Scenario("route-localnet", "route_localnet=1 on every interface and no martian drop rule: a node daemon on "
             "127.0.0.1 is reachable from the LAN", after=_route_localnet),
    Scenario("firewalld", "firewalld's nftables forward chain (StrictForwardPorts=yes) rejects DNATed traffic",
             after=_firewalld),
    Scenario("mark-masq", "portmap with externalSetMarkChain KUBE-MARK-MASQ, and no kube-proxy to masquerade "
             "the mark", portmap={"externalSetMarkChain": "KUBE-MARK-MASQ"}, pods=_CALLER,
             before=_mark_masq_before),
    Scenario("node-daemon", "a process of the node listens on TCP 8000, which a DNAT rule takes first",
             after=_node_daemon),
    Scenario("nft-transit", "the nftables portmap of plugins 1.6.1 - 1.8.x: its prerouting jump catches "
             "traffic to other hosts (a pod listening on 8000 is unreachable through the node)",
             backend="nftables", pods=_TRANSIT_TARGET, after=_nft_transit),
    Scenario("refused", "hostPort pods whose servers are stopped: TCP gets a reset, UDP an ICMP port unreachable",
             pods=_DNS, after=_refused),
]}

NAMES = BUILT_IN + tuple(SCENARIOS)


def get(name: str) -> Optional[Scenario]:
    return SCENARIOS.get(name)
