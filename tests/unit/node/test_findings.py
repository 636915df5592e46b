"""The findings registry, and each finding on the real capture of its lab scenario
(tests/fixtures/check/lab-<scenario>/, capture_scenarios.py): found there with fixes that name the
real values, and nowhere else (not on a healthy lab, not on one with 2,000 kube-proxy Services)."""
import re
import shlex
import sys
from pathlib import Path

import pytest

from bpftrace_hostport.node import findings as registry
from bpftrace_hostport.node.check import CODES, findings
from bpftrace_hostport.node.evaluate import (Packet, ipt_chains, ipt_nat, ipt_verdict, nft_chains, nft_nat,
                                             nft_verdict)

sys.path.insert(0, str(Path(__file__).parent))
from scenario_views import scenario_view  # noqa: E402

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()

EXPECTED = {
    "udp-pinned": ["conntrack-pinned-to-node"],
    "one-family": ["hostport-one-family", "hostport-one-family"],
    "ipvs": ["hostport-catches-clusterip"],
    "conntrack-full": ["conntrack-table-full"],
    "route-localnet": ["route-localnet-exposed"],
    "firewalld": ["forward-drop"],
    "mark-masq": ["mark-masq-missing"],
    "node-daemon": ["node-socket-shadowed"],
    "nft-transit": ["hostport-catches-transit"],
    "refused": ["pod-not-listening", "pod-not-listening"],
    "kube-proxy": [],
    "nft-basic": [],
}


def ticked(fix):
    return re.findall(r"`([^`]+)`", fix or "")


def one(view, code):
    got = [f for f in findings(view) if f.code == code]
    assert len(got) == 1, [f.to_dict() for f in findings(view)]
    return got[0]


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_each_scenario_shows_exactly_its_findings(scenario):
    assert [f.code for f in findings(scenario_view(scenario))] == EXPECTED[scenario]


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_fix_commands_name_real_values_and_the_node(scenario):
    view = scenario_view(scenario)
    for f in findings(view):
        assert f.code in registry.REGISTRY and f.severity in registry.REGISTRY[f.code].severities
        for cmd in ticked(f.fix):
            words = shlex.split(cmd)
            assert not re.search(r"<[A-Za-z]+>|\bNODE\b|\bPORT\b|\{|\}", cmd.replace("'{ ", "").replace(" ; }'", "")), cmd
            if f.code == "pod-not-listening" and "ss" in words:
                assert words[:3] == ["ip", "netns", "exec"] and words[3].startswith(view.netns[:-4]), cmd
            elif words[0] not in ("kubectl", "firewall-cmd", "sysctl") or "ip netns exec" in cmd:
                assert words[:4] == ["ip", "netns", "exec", view.netns], cmd


def test_pinned_udp_entry_and_the_delete_that_frees_it():
    view = scenario_view("udp-pinned")
    f = one(view, "conntrack-pinned-to-node")
    node_ip = next(a for a, i in view.address_ifaces.items() if i == "lan0" and ":" not in a)
    pod_ip = next(p.ips[0] for p in view.pods if p.name == "dns")
    assert f"{node_ip}:5353" in f.message and f"{pod_ip}:53" in f.message
    assert any("(no DNAT)" in e and ":40054 ->" in e for e in f.evidence)
    assert ticked(f.fix) == [f"ip netns exec {view.netns} conntrack -D -p udp --orig-dst {node_ip} --dport 5353 "
                             f"--reply-src {node_ip}"]


def test_one_family_rule_gets_the_exact_ip6tables_mapping():
    view = scenario_view("one-family")
    fs = [f for f in findings(view) if f.code == "hostport-one-family"]
    pod = view.pods[0]
    v6 = next(ip for ip in pod.ips if ":" in ip)
    assert {tuple(ticked(f.fix)) for f in fs} == {
        (f"ip netns exec {view.netns} ip6tables-nft -t nat -A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport {hp} -j DNAT "
         f"--to-destination [{v6}]:{cp}",) for hp, cp in ((8000, 80), (44300, 443))}


def test_clusterip_on_kube_ipvs0_caught_by_the_hostport_rule():
    view = scenario_view("ipvs")
    f = one(view, "hostport-catches-clusterip")
    assert "10.96.0.10:8000" in f.message and f.severity == "error"
    assert ticked(f.fix) == [f"ip netns exec {view.netns} iptables-nft -t nat -I CNI-HOSTPORT-DNAT -d 10.96.0.10/32 "
                             "-p tcp --dport 8000 -j RETURN"]
    # With the RETURN in place the connection is no longer translated: the finding is gone.
    view.nat[0] = view.nat[0].__class__(**{**view.nat[0].__dict__, "lines": (
        "-A CNI-HOSTPORT-DNAT -d 10.96.0.10/32 -p tcp -m tcp --dport 8000 -j RETURN",) + view.nat[0].lines})
    assert [x.code for x in findings(view)] == []


def test_full_conntrack_table_names_the_client_that_fills_it():
    view = scenario_view("conntrack-full")
    f = one(view, "conntrack-table-full")
    limit = int(view.sysctls["net.netfilter.nf_conntrack_max"])
    noisy = next(e.orig_src for e in view.conntrack_sample)
    assert f.severity == "error" and str(limit) in f.message
    assert ticked(f.fix) == [f"ip netns exec {view.netns} conntrack -D -s {noisy}",
                             f"sysctl -w net.netfilter.nf_conntrack_max={2 * limit}"]
    assert "read-only" in f.fix          # a lab's namespace: the limit is the host's
    view.sysctls["net.netfilter.nf_conntrack_count"] = str(limit // 2)
    assert findings(view) == []


def test_route_localnet_facing_the_lan_without_the_martian_drop():
    view = scenario_view("route-localnet")
    f = one(view, "route-localnet-exposed")
    assert "lan0" in f.message and "tcp 10248" in f.message
    drop = ticked(f.fix)[0]
    assert drop == (f"ip netns exec {view.netns} iptables-nft -I INPUT ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack "
                    "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
    # kube-proxy's KUBE-FIREWALL rule protects the same node
    t = view.filters[0]
    view.filters[0] = t.__class__(source=t.source, family=t.family, policies=t.policies, rules=t.rules + (
        "-A INPUT -j KUBE-FIREWALL", '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment '
        '"block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP'))
    assert findings(view) == []


def test_firewalld_reject_is_pointed_at_by_its_handle():
    view = scenario_view("firewalld")
    f = one(view, "forward-drop")
    handle = re.search(r"handle (\d+) in chain filter_FORWARD_dnat", f.message).group(1)
    cmds = [c for c in ticked(f.fix) if not c.startswith("firewall-cmd")]
    assert cmds == [f'ip netns exec {view.netns} nft insert rule inet firewalld filter_FORWARD_dnat handle {handle} '
                    f'{d}ifname "cni0" ct status dnat accept' for d in ("o", "i")]
    assert "StrictForwardPorts=no" in f.fix and "reject with icmpx admin-prohibited" in f.message


def test_forward_drop_points_at_the_dropping_rule_not_a_blanket_accept():
    from tests.unit.node.test_check import FX, lab_view
    view = lab_view("basic", filt=FX / "hand" / "filter-user-chain-drop.rules")
    f = one(view, "forward-drop")
    assert ticked(f.fix) == [f"ip netns exec {view.netns} iptables-nft -D USER-BLOCK -o cni0 -p tcp -m tcp --dport 80 "
                             "-j DROP"]
    assert "-j ACCEPT" not in f.fix
    # the policy alone: then, and only then, the accepting rules
    f = one(lab_view("forward-drop"), "forward-drop")
    assert all(c.endswith("-j ACCEPT") for c in ticked(f.fix))


def test_mark_masq_missing_is_no_longer_called_snat_off():
    view = scenario_view("mark-masq")
    f = one(view, "mark-masq-missing")
    assert "KUBE-MARK-MASQ" in f.message and "hairpin-no-masquerade" not in [x.code for x in findings(view)]
    assert ticked(f.fix) == [f"ip netns exec {view.netns} iptables-nft -t nat -I POSTROUTING 1 -m mark --mark "
                             "0x4000/0x4000 -j MASQUERADE"]


def test_node_daemon_shadowed_names_its_process():
    view = scenario_view("node-daemon")
    f = one(view, "node-socket-shadowed")
    assert re.search(r"pid \d+ \(python\)", f.message) and "[::]:8000" in f.message
    assert ticked(f.fix) == [f"ip netns exec {view.netns} iptables-nft -t nat -I CNI-HOSTPORT-DNAT -p tcp --dport "
                             "8000 -j RETURN"]


def test_nft_portmap_transit_jump_is_replaced_by_handle():
    view = scenario_view("nft-transit")
    f = one(view, "hostport-catches-transit")
    handles = re.findall(r"\(handle (\d+)\)", " ".join(f.evidence))
    assert len(handles) == 2
    assert ticked(f.fix) == [f"ip netns exec {view.netns} nft replace rule ip cni_hostport prerouting handle {h} "
                             f"fib daddr type local jump {t}" for h, t in zip(handles, ("hostip_hostports", "hostports"))]


def test_refused_pods_are_read_in_their_own_namespace():
    view = scenario_view("refused")
    fs = {f.message.split()[1]: f for f in findings(view) if f.code == "pod-not-listening"}
    assert set(fs) == {"cjweichen/nginx-hostport-6f9b9886b4-dndhf", "lab/dns"}
    web = fs["cjweichen/nginx-hostport-6f9b9886b4-dndhf"]
    assert "reset" in " ".join(web.evidence) and "8000/TCP, 44300/TCP" in web.message
    assert "ICMP port unreachable" in " ".join(fs["lab/dns"].evidence)
    how = web.evidence[0].split("`")[1]
    assert ticked(web.fix) == ["kubectl -n cjweichen logs nginx-hostport-6f9b9886b4-dndhf -c nginx", f"{how} ss -tlnp"]
    # the pod's namespace not found: no finding (and gather says so in a note)
    view.pod_sockets = {}
    assert findings(view) == []


def test_no_pod_metadata_fix_writes_the_pod_list_somewhere():
    view = scenario_view("kube-proxy")
    view.pods, view.pods_known = [], False
    f = one(view, "no-pod-metadata")
    cmds = ticked(f.fix)
    assert cmds[0] == f"kubectl get pods -A -o json --field-selector spec.nodeName={view.node_name} > " \
                      f"pods-{view.node_name}.json"
    assert cmds[1] == f"sudo bpftrace-hostport check --lab {view.node_name[4:]} --pods pods-{view.node_name}.json"


def test_localhost_ipv6_fix_calls_the_real_port():
    from tests.unit.node.test_check import FX, RULES_FX
    from bpftrace_hostport.node.nodeview import NodeView
    from bpftrace_hostport.node.parse import nat_summary, parse_conntrack_text
    from bpftrace_hostport.node.rules import parse_iptables_save
    v6 = (RULES_FX / "portmap_nft_v6_counters.txt").read_text()
    view = NodeView(rules=parse_iptables_save(v6, 6, "iptables-nft"), nat=[nat_summary(v6, "iptables-nft", 6)],
                    conntrack=parse_conntrack_text((FX / "hand" / "conntrack-ipv6-localhost.txt").read_text()),
                    conntrack_read=True, sysctls={"net.ipv6.conf.all.forwarding": "1"})
    f = one(view, "localhost-ipv6")
    assert ticked(f.fix) == ["curl http://127.0.0.1:8000/"]


# --------------------------------------------------------------------------- the registry


def test_registry_codes_are_unique_kebab_case_and_complete():
    codes = registry.codes()
    assert len(codes) == len(set(codes)) and set(codes) == set(CODES)
    for spec in registry.REGISTRY.values():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", spec.code)
        assert spec.severities and set(spec.severities) <= set(registry.SEVERITIES)
        assert spec.family in registry.FAMILIES and spec.title and spec.explanation
        assert "default" in spec.fixes or len(spec.fixes) > 1


def test_readme_findings_table_is_the_registry():
    assert registry.markdown_table() in README, "README's findings table differs from node/findings.py"


def test_a_code_outside_the_registry_is_refused():
    with pytest.raises(KeyError):
        registry.finding("no-rule", "x")
    with pytest.raises(ValueError):
        registry.finding("ip-forward-off", "x", severity="info", px="", key="k")


# --------------------------------------------------------------------------- the evaluator


def test_ipt_nat_walk_stops_at_a_certain_return_and_follows_marks():
    chains = ipt_chains([
        "-A PREROUTING -m addrtype --dst-type LOCAL -j HP",
        "-A HP -d 10.96.0.10/32 -p tcp -m tcp --dport 8000 -j RETURN",
        "-A HP -p tcp -m tcp --dport 8000 -j DNAT --to-destination 10.0.1.2:80",
        "-A POSTROUTING -s 10.0.1.2/32 -j BR",
        "-A BR -d 10.0.1.0/24 -j ACCEPT",
        "-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE",
    ])
    to = lambda dst, local=True: Packet("TCP", dst=dst, dport=8000, dst_local=local)  # noqa: E731
    assert ipt_nat(chains, "PREROUTING", to("10.96.0.10")) is None
    assert ipt_nat(chains, "PREROUTING", to("192.0.2.1")).target == "DNAT"
    assert ipt_nat(chains, "PREROUTING", to("192.0.2.1", local=False)) is None
    assert ipt_nat(chains, "PREROUTING", to("192.0.2.1", local=None)).target == "DNAT"   # may: counts
    hairpin = Packet("TCP", src="10.0.1.2", dst="10.0.1.2", dport=80, mark=0x4000)
    assert ipt_nat(chains, "POSTROUTING", hairpin, targets=("MASQUERADE",)) is None     # ACCEPTed first
    other = Packet("TCP", src="10.0.1.9", dst="10.0.1.2", dport=80, mark=0x4000)
    assert ipt_nat(chains, "POSTROUTING", other, targets=("MASQUERADE",)).target == "MASQUERADE"
    assert ipt_nat(chains, "POSTROUTING", Packet("TCP", src="10.0.1.9", mark=0), targets=("MASQUERADE",)) is None


def test_ipt_verdict_uncertain_drops_are_not_reported():
    chains = ipt_chains(["-A FORWARD -m set --match-set BLOCK src -j DROP", "-A FORWARD -o cni0 -j ACCEPT"])
    v = ipt_verdict(chains, {"FORWARD": "DROP"}, Packet("TCP", dst="10.0.1.2", oif="cni0"))
    assert (v.verdict, v.by_policy, v.rule) == ("accept", False, "-A FORWARD -o cni0 -j ACCEPT")
    v = ipt_verdict(chains, {"FORWARD": "DROP"}, Packet("TCP", dst="10.0.1.2", oif="eth1"))
    assert (v.verdict, v.by_policy) == ("drop", True)


def test_nft_evaluator_ct_status_fib_and_reject():
    rules = [
        {"chain": {"family": "inet", "table": "t", "name": "fwd", "type": "filter", "hook": "forward", "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "fwd", "handle": 3, "expr": [
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": None}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "fwd", "handle": 4, "expr": [
            {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"jump": {"target": "d"}}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "d", "handle": 7, "expr": [
            {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}},
        {"chain": {"family": "ip", "table": "n", "name": "pre", "type": "nat", "hook": "prerouting", "policy": "accept"}},
        {"rule": {"family": "ip", "table": "n", "chain": "pre", "handle": 9, "expr": [
            {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
            {"jump": {"target": "hp"}}]}},
        {"rule": {"family": "ip", "table": "n", "chain": "hp", "handle": 10, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8000}},
            {"dnat": {"addr": "10.0.1.2", "port": 80}}]}},
    ]
    chains = nft_chains(rules)
    fwd = chains[("inet", "t", "fwd")]
    v = nft_verdict(chains, fwd, Packet("TCP", dst="10.0.1.2", dport=80, states=("NEW", "DNAT")))
    assert (v.verdict, v.handle, v.chain, v.rule) == ("reject", 7, "d", "reject with icmpx admin-prohibited")
    assert nft_verdict(chains, fwd, Packet("TCP", src="10.0.1.2", states=("ESTABLISHED", "DNAT"))).verdict == "accept"
    pre = ("ip", "n", "pre")
    assert nft_nat(chains, pre, Packet("TCP", dst="192.0.2.1", dport=8000, dst_local=True))[1].handle == 10
    assert nft_nat(chains, pre, Packet("TCP", dst="198.51.100.7", dport=8000, dst_local=False)) is None


# --------------------------------------------------------------------------- ctnetlink, decoded


def test_ctnetlink_entry_decodes_a_message_built_as_the_kernel_does():
    import socket
    import struct
    from bpftrace_hostport.node import ctnetlink as ct

    def tup(src, dst, proto, sport, dport):
        ip = ct._attr(ct._CTA_IP_V4_SRC, socket.inet_aton(src)) + ct._attr(ct._CTA_IP_V4_DST, socket.inet_aton(dst))
        l4 = (ct._attr(ct._CTA_PROTO_NUM, bytes([proto])) + ct._attr(ct._CTA_PROTO_SRC_PORT, struct.pack(">H", sport))
              + ct._attr(ct._CTA_PROTO_DST_PORT, struct.pack(">H", dport)))
        return ct._attr(ct._CTA_TUPLE_IP, ip, True) + ct._attr(ct._CTA_TUPLE_PROTO, l4, True)
    msg = (ct._attr(ct._CTA_TUPLE_ORIG, tup("10.0.0.9", "10.0.0.1", 17, 40054, 5353), True)
           + ct._attr(ct._CTA_TUPLE_REPLY, tup("10.0.1.3", "10.0.0.9", 17, 53, 40054), True)
           + ct._attr(ct._CTA_STATUS, struct.pack(">I", 0x20 | 0x8 | 0x2)) + ct._attr(ct._CTA_TIMEOUT, struct.pack(">I", 29)))
    e = ct._entry(msg, 0, len(msg))
    assert (e.proto, e.orig_src, e.orig_dport, e.reply_src, e.reply_sport, e.timeout) == \
        ("UDP", "10.0.0.9", 5353, "10.0.1.3", 53, 29)
    assert e.dnat and "DST_NAT" in e.status and "UNREPLIED" not in e.status
    assert ct._entry(msg[:8], 0, 8) is None


def test_nft_portmap_hairpin_masquerade_missing_or_off():
    import json

    def without(view, keep_localhost):
        view.nft_items = [i for i in view.nft_items if not (
            i.get("rule", {}).get("chain") == "masquerading"
            and (not keep_localhost or "127.0.0.1" not in json.dumps(i)))]
        return view
    view = without(scenario_view("nft-basic"), keep_localhost=True)
    f = one(view, "hairpin-no-masquerade")
    pod = view.pods[0].ips[0]
    assert f.severity == "warning" and ticked(f.fix) == [
        f"ip netns exec {view.netns} nft add rule ip cni_hostport masquerading ip saddr {pod} ip daddr {pod} masquerade"]
    f = one(without(scenario_view("nft-basic"), keep_localhost=False), "hairpin-no-masquerade")
    assert f.severity == "info" and "snat" in f.message
