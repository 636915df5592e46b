"""nodeview's pure parts: nat / filter / conntrack / sysctl / nft parsing, the pod join, local pods."""
import json
from pathlib import Path

from bpftrace_hostport.node import gather as gather_mod
from bpftrace_hostport.node import nodeview as nv
from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.node.nodeview import NodeView, mappings
from bpftrace_hostport.node.evaluate import nft_chains
from bpftrace_hostport.node.parse import (filter_table, nat_summary, parse_conntrack_text,
                                          parse_rule_line, parse_sysctl_text)
from bpftrace_hostport.pods.index import PodIndex
from bpftrace_hostport.pods.podlist import read_pod_list
from bpftrace_hostport.node.rules import parse_iptables_save

FX = Path(__file__).resolve().parents[2] / "fixtures" / "check"
RULES_FX = FX.parent / "rules"


def text(*parts):
    return (FX.joinpath(*parts) if parts[0] != "rules" else RULES_FX.joinpath(*parts[1:])).read_text()


# --------------------------------------------------------------------------- nat


def test_nat_summary_of_a_lab_conflict_keeps_cni_hostport_dnat_order():
    t = text("lab-conflict", "nat.rules")
    s = nat_summary(t, "iptables-nft", 4)
    assert [p for _, p, _ in s.dnat_jumps] == ["TCP", "TCP"]
    assert s.dnat_jumps[0][2] == (8000, 44300) and s.dnat_jumps[1][2] == (8000,)
    # The save lists chains sorted; the first jump goes to the chain listed second.
    dn_chains = [c for c in s.chains if c.startswith("CNI-DN-")]
    assert s.dnat_jumps[0][0] == dn_chains[1]
    assert s.hooked_from == ("PREROUTING", "OUTPUT")
    assert s.setmark_marks and s.masq_rule and s.postrouting_to_masq
    assert "127.0.0.1/32" in s.setmark_sources and any(x.endswith(".1.0/24") for x in s.setmark_sources)


def test_nat_summary_of_real_portmap_fixtures():
    s = nat_summary(text("rules", "portmap_nft_counters.txt"), "iptables-nft", 4)
    # pod A's chain is jumped first although iptables-nft-save lists pod B's chain first
    a, b = "CNI-DN-a96e14b5f70d2340446f3", "CNI-DN-4e04db555a440e0f3b610"
    assert s.dnat_jumps == ((a, "TCP", (8000,)), (a, "UDP", (5353,)), (b, "TCP", (8443, 8444)))
    assert s.chains.index(b) < s.chains.index(a)
    s6 = nat_summary(text("rules", "portmap_nft_v6_counters.txt"), "iptables-nft", 6)
    assert s6.family == 6 and "fd00:77::/64" in s6.setmark_sources and "127.0.0.1/32" not in s6.setmark_sources
    legacy = nat_summary(text("rules", "portmap_legacy_counters.txt"), "iptables-legacy", 4)
    assert legacy.source == "iptables-legacy" and len(legacy.dnat_jumps) == 1


def test_nat_summary_reads_crio_kube_hostports_jumps():
    s = nat_summary(text("rules", "crio_nft_counters.txt"))
    assert s.dnat_jumps and all(t.startswith("KUBE-HP-") for t, _, _ in s.dnat_jumps)
    assert s.hooked_from == ()          # CRI-O hooks KUBE-HOSTPORTS, not CNI-HOSTPORT-DNAT


def test_nat_summary_of_missing_pieces():
    s = nat_summary(text("hand", "nat-no-snat.rules"))
    assert not (s.setmark_sources or s.setmark_marks or s.masq_rule or s.postrouting_to_masq)
    assert nat_summary(text("hand", "nat-unhooked.rules")).hooked_from == ("OUTPUT",)


def test_parse_rule_line_keeps_negation_quotes_and_counters():
    r = parse_rule_line('[3:180] -A CNI-x ! -d 224.0.0.0/4 -m comment --comment "name: \\"n\\" id: \\"-x\\"" -j MASQUERADE')
    assert r.chain == "CNI-x" and r.target == "MASQUERADE"
    assert r.option("-d") == (True, ["224.0.0.0/4"])
    assert r.option("--comment") == (False, ['name: "n" id: "-x"'])
    assert r.value("-d") is None and r.packets == 3 and r.text.startswith("-A CNI-x ! -d")
    assert parse_rule_line(":CHAIN - [0:0]") is None
    assert parse_rule_line("-I FORWARD 1 -j ACCEPT").target == "ACCEPT"


# --------------------------------------------------------------------------- filter, nft


def test_filter_table_policies_and_rules():
    f = filter_table(text("hand", "filter-drop-accepting.rules"), "iptables-nft", 4)
    assert f.policies == {"INPUT": "ACCEPT", "FORWARD": "DROP", "OUTPUT": "ACCEPT"}
    assert len(f.rules) == 6 and f.rules[0].startswith("-A FORWARD")
    # `iptables -S` spelling, and a whole save where only *filter counts
    s = filter_table("-P INPUT ACCEPT\n-P FORWARD DROP\n-N X\n-A FORWARD -j X\n")
    assert s.policies["FORWARD"] == "DROP" and s.rules == ("-A FORWARD -j X",)
    docker = filter_table(text("rules", "docker_nft_counters.txt"))
    assert docker.policies["FORWARD"] == "ACCEPT" and all("DNAT" not in r for r in docker.rules)


def test_nft_chains_reads_base_chains_and_their_rules():
    items = json.loads(text("hand", "nft-forward-drop.json"))["nftables"]
    (c,) = [c for c in nft_chains(items).values() if c.hook == "forward"]
    assert (c.family, c.table, c.name, c.policy) == ("inet", "filter", "forward", "drop")
    assert [e for r in c.rules for e in r.expr if "accept" in e] == []
    items = json.loads(text("hand", "nft-forward-drop-accepting.json"))["nftables"]
    (acc,) = [c for c in nft_chains(items).values() if c.hook == "forward"]
    assert all(r.handle is not None for r in acc.rules)
    assert sum(1 for r in acc.rules for e in r.expr if "accept" in e) == 2
    chains = nft_chains(json.loads(text("rules", "portmap_nftables.json"))["nftables"])
    assert {c.hook for c in chains.values()} == {None, "prerouting", "output", "postrouting"}


# --------------------------------------------------------------------------- conntrack, sysctl


def test_parse_conntrack_text_keeps_every_entry_and_tells_dnat():
    entries = parse_conntrack_text(text("lab-basic", "conntrack.txt"))
    assert len(entries) == 2 and all(e.dnat for e in entries)
    e = entries[0]
    assert (e.proto, e.orig_dst, e.orig_dport, e.reply_sport, e.state, e.timeout, e.family) == \
        ("TCP", "10.86.0.1", 8000, 80, "TIME_WAIT", 119, 4)
    assert e.reply_src == "10.86.1.2" and "ASSURED" in e.status
    # multicast entries without ports and without DNAT are dropped
    assert all(x.orig_dport for x in parse_conntrack_text(text("lab-stale-udp", "conntrack.txt")))
    # plain `conntrack -L` (no "ipv4 2" prefix) and an entry that was not DNATed
    plain = ("udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=53 src=10.0.0.2 dst=10.0.0.1 sport=53 dport=1 mark=0 use=1\n"
             "udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=5353 [UNREPLIED] src=10.9.0.5 dst=10.0.0.1 sport=53 dport=1 mark=0 use=1\n")
    plain_entry, only = parse_conntrack_text(plain)
    assert not plain_entry.dnat and only.dnat
    assert only.reply_src == "10.9.0.5" and only.status == ("UNREPLIED",) and only.timeout == 29


def test_parse_sysctl_text():
    s = parse_sysctl_text(text("lab-basic", "sysctl.txt"))
    assert s["net.ipv4.ip_forward"] == "1" and s["net.ipv4.conf.cni0.route_localnet"] == "1"
    assert "net.bridge.bridge-nf-call-iptables" not in parse_sysctl_text(text("hand", "sysctl-no-br-netfilter.txt"))


def test_sysctl_conf_path_keeps_dots_in_interface_names():
    assert gather_mod._conf_path("net.ipv4.conf.eth0.100.route_localnet") == "net/ipv4/conf/eth0.100/route_localnet"
    assert gather_mod._conf_path("net.ipv6.conf.all.forwarding") == "net/ipv6/conf/all/forwarding"


def test_listening_sockets_from_proc_net():
    tcp6 = ("  sl  local_address                         remote_address                        st\n"
            "   0: 00000000000000000000000000000000:2328 00000000000000000000000000000000:0000 0A 0\n"
            "   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:A000 01 0\n")
    assert gather_mod._listening(tcp6, "TCP", True) == [("TCP", "::", 9000)]
    tcp = "  sl  local_address rem_address   st\n   0: 0100007F:1F90 00000000:0000 0A 0\n"
    assert gather_mod._listening(tcp, "TCP", False) == [("TCP", "127.0.0.1", 8080)]


# --------------------------------------------------------------------------- pods


def _basic_view(**kw):
    node = json.loads(text("lab-basic", "node.json"))
    return NodeView(node_name=node["node_name"],
                    rules=parse_iptables_save(text("lab-basic", "nat.rules"), 4, "iptables-nft"),
                    pods=read_pod_list(str(FX / "lab-basic" / "pods.json")), pods_known=True,
                    routes=node["routes"], local_addresses=node["local_addresses"], **kw)


def test_mappings_join_rules_with_pods_and_port_names():
    rows = mappings(_basic_view())
    assert [(r["host_port"], r["proto"], r["namespace"], r["pod"], r["container_port"], r["port_name"],
             r["target"], r["source"]) for r in rows] == [
        (8000, "TCP", "cjweichen", "nginx-hostport-6f9b9886b4-dndhf", 80, "http", "10.86.1.2:80", "iptables-nft"),
        (44300, "TCP", "cjweichen", "nginx-hostport-6f9b9886b4-dndhf", 443, "https", "10.86.1.2:443", "iptables-nft")]
    assert rows[0]["chain"].startswith("CNI-DN-") and len(rows[0]["container_id"]) == 64
    assert rows[0]["packets"] == 2 and rows[0]["host_ip"] is None and rows[0]["family"] == 4
    json.dumps(rows)


def test_mappings_of_both_conflicting_pods_and_of_unknown_targets():
    node = json.loads(text("lab-conflict", "node.json"))
    view = NodeView(rules=parse_iptables_save(text("lab-conflict", "nat.rules")),
                    pods=read_pod_list(str(FX / "lab-conflict" / "pods.json")), routes=node["routes"])
    pods = {r["pod"] for r in mappings(view) if r["host_port"] == 8000}
    assert pods == {"nginx-hostport-6f9b9886b4-dndhf", "nginx-hostport-6f9b9886b4-dndhf-rival"}
    bare = mappings(NodeView(rules=view.rules))
    assert all(r["pod"] is None and r["port_name"] is None and r["container_port"] is None for r in bare)


def test_mappings_fall_back_to_the_container_id_and_dual_stack_targets():
    v6 = parse_iptables_save(text("rules", "portmap_nft_v6_counters.txt"), 6, "iptables-nft")
    cid = v6[0].container_id
    pod = PodInfo("ns", "by-id", ports=(ContainerPort("c", v6[0].target_port, v6[0].proto, "p", v6[0].host_port),),
                  container_ids=(f"containerd://{cid}",))
    row = mappings(NodeView(rules=v6[:1], pods=[pod]))[0]
    assert (row["pod"], row["port_name"]) == ("by-id", "p")
    assert row["target"].startswith("[fd00:77::")


def test_local_pods_by_node_name_then_by_route():
    far = PodInfo("x", "far", node="elsewhere", ips=("10.1.2.3",), phase="Running")
    near = PodInfo("x", "near", node="me", ips=("10.9.0.2",), phase="Running")
    done = PodInfo("x", "done", node="me", ips=("10.9.0.3",), phase="Succeeded")
    v = NodeView(node_name="me", pods=[far, near, done])
    assert [p.name for p in nv.local_pods(v)] == ["near"]
    v = NodeView(pods=[far, near], routes={"10.1.2.3": {"ifname": "eth0", "gateway": "192.0.2.1", "type": "unicast"},
                                           "10.9.0.2": {"ifname": "cni0", "gateway": None, "type": "unicast"}},
                 local_addresses=["127.0.0.1"])
    assert [p.name for p in nv.local_pods(v)] == ["near"]
    assert [p.name for p in nv.local_pods(NodeView(pods=[far, near]))] == ["far", "near"]


def test_pods_of_accepts_a_resolver_an_index_a_list_or_nothing():
    p = PodInfo("a", "b", ips=("10.0.0.1",))

    class FakeResolver:
        refreshed = False

        def refresh(self):
            self.refreshed = True

        def pods(self):
            return [p]
    r = FakeResolver()
    assert nv.pods_of(r) == ([p], True) and r.refreshed
    assert nv.pods_of(PodIndex([p])) == ([p], True)
    assert nv.pods_of([p]) == ([p], True)
    assert nv.pods_of(None) == ([], False)


def test_cni_state_pods_standing_for_known_pods_are_dropped():
    real = PodInfo("ns", "web", ips=("10.0.0.2",))
    twin = PodInfo("", "cni-0123456789ab", ips=("10.0.0.2",))
    alone = PodInfo("", "cni-ba9876543210", ips=("10.0.0.3",))
    assert nv.drop_synthetic_duplicates([twin, real, alone]) == [real, alone]
    assert nv.is_synthetic(alone) and not nv.is_synthetic(real)
    assert nv.pod_label("", "cni-x") == "cni-x" and nv.pod_label("a", "b") == "a/b"


def test_netns_prefix_text():
    from bpftrace_hostport.netns import command_prefix_text
    assert command_prefix_text(None) == ""
    assert command_prefix_text("node1") == "ip netns exec node1 "
    assert command_prefix_text("/proc/1/ns/net") == "nsenter --net=/proc/1/ns/net -- "


def test_view_is_plain_data():
    view = _basic_view(conntrack=parse_conntrack_text(text("lab-basic", "conntrack.txt")),
                       nat=[nat_summary(text("lab-basic", "nat.rules"))])
    d = view.to_dict()
    json.dumps(d)
    assert d["rules"][0]["host_port"] == 8000 and d["conntrack"][0]["orig_dport"] == 8000
    assert isinstance(view.rules[0], HostPortRule)


def test_this_node_is_told_from_the_pods_the_rules_target():
    rules = parse_iptables_save(text("lab-basic", "nat.rules"))
    here = PodInfo("x", "here", node="n1", ips=(rules[0].target_ip,), phase="Running")
    there = PodInfo("x", "there", node="n2", ips=("10.200.0.7",), phase="Running")
    assert nv.this_node(NodeView(rules=rules, pods=[here, there])) == "n1"
    assert nv.this_node(NodeView(rules=rules, pods=[there])) is None          # one node only: not needed
    assert nv.this_node(NodeView(rules=[], pods=[here, there])) is None       # nothing to tell it by
    hn = PodInfo("x", "agent", node="n2", ips=("192.0.2.5",), host_network=True, phase="Running")
    assert nv.this_node(NodeView(pods=[here, hn], local_addresses=["127.0.0.1", "192.0.2.5"])) == "n2"
    assert nv.this_node(NodeView(node_name="given", pods=[here, there])) == "given"
