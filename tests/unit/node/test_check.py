"""check.findings on captured lab data (tests/fixtures/check) and hand-made variants: one test per finding."""
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from bpftrace_hostport.node import check
from bpftrace_hostport.cli import node as cli_node
from bpftrace_hostport.node import gather as gather_mod
from bpftrace_hostport.node import nodeview
from bpftrace_hostport.node.check import CODES, findings
from bpftrace_hostport.node.nodeview import NodeView
from bpftrace_hostport.node.parse import filter_table, nat_summary, parse_conntrack_text, parse_sysctl_text
from bpftrace_hostport.pods.podlist import read_pod_list
from bpftrace_hostport.node.rules import parse_iptables_save

FX = Path(__file__).resolve().parents[2] / "fixtures" / "check"
RULES_FX = FX.parent / "rules"


def lab_view(scenario, *, nat=None, filt=None, conntrack=None, sysctl=None, pods=None, pods_known=True,
             nft=None, netns=True, listening=None):
    """A NodeView from a lab capture, with any of its inputs swapped for another fixture file."""
    d = FX / f"lab-{scenario}"
    node = json.loads((d / "node.json").read_text())
    nat_text = Path(nat or d / "nat.rules").read_text()
    view = NodeView(
        netns=node["netns"] if netns else None, node_name=node["node_name"],
        rules=parse_iptables_save(nat_text, 4, "iptables-nft"),
        pods=read_pod_list(str(pods or d / "pods.json")) if pods_known else [], pods_known=pods_known,
        conntrack=parse_conntrack_text(Path(conntrack or d / "conntrack.txt").read_text()), conntrack_read=True,
        sysctls=parse_sysctl_text(Path(sysctl or d / "sysctl.txt").read_text()),
        nat=[nat_summary(nat_text, "iptables-nft", 4)],
        filters=[filter_table(Path(filt or d / "filter.rules").read_text(), "iptables-nft", 4)],
        nft_items=json.loads(Path(nft).read_text())["nftables"] if nft else [],
        local_addresses=node["local_addresses"], bridges=node["bridges"], routes=node["routes"],
        listening=[tuple(x) for x in (node["listening"] if listening is None else listening)],
        sockets_read=True)
    return view


def codes(found):
    return [f.code for f in found]


def only(found, code):
    got = [f for f in found if f.code == code]
    assert len(got) == 1, [f.to_dict() for f in found]
    return got[0]


def ticked(fix):
    """The `commands` quoted in a fix sentence."""
    return re.findall(r"`([^`]+)`", fix)


# --------------------------------------------------------------------------- healthy


@pytest.mark.parametrize("scenario", ["basic", "forward-drop", "stale-udp", "conflict"])
def test_healthy_parts_of_every_capture_give_nothing_unexpected(scenario):
    expected = {"basic": set(), "forward-drop": {"forward-drop"}, "stale-udp": {"stale-conntrack"},
                "conflict": {"hostport-conflict"}}[scenario]
    assert set(codes(findings(lab_view(scenario)))) == expected


def test_healthy_lab_gives_no_finding_at_all():
    assert findings(lab_view("basic")) == []


def test_healthy_portmap_dual_stack_with_host_ips_gives_no_finding():
    v4 = (RULES_FX / "portmap_nft_counters.txt").read_text()
    v6 = (RULES_FX / "portmap_nft_v6_counters.txt").read_text()
    view = NodeView(
        node_name="fx-node",
        rules=parse_iptables_save(v4, 4, "iptables-nft") + parse_iptables_save(v6, 6, "iptables-nft"),
        pods=read_pod_list(str(FX / "hand" / "pods-portmap-ab.json")), pods_known=True,
        sysctls={"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                 "net.ipv4.conf.cni0.route_localnet": "1", "net.bridge.bridge-nf-call-iptables": "1"},
        nat=[nat_summary(v4, "iptables-nft", 4), nat_summary(v6, "iptables-nft", 6)],
        filters=[filter_table(":FORWARD ACCEPT [0:0]\n", "iptables-nft", 4)],
        bridges=["cni0"], conntrack_read=True)
    assert findings(view) == []


# --------------------------------------------------------------------------- hostNetwork


def test_hostnetwork_pod_with_hostport_is_info_with_its_listening_socket():
    found = findings(lab_view("hostnetwork"))
    f = only(found, "hostnetwork-hostport")
    assert f.severity == "info"
    assert "lab/hostnet-web" in f.message and "9000/TCP" in f.message
    assert any("listening: tcp [::]:9000" in e for e in f.evidence)
    assert codes(found) == ["hostnetwork-hostport"]


def test_hostnetwork_pod_nobody_listening_is_a_warning():
    f = only(findings(lab_view("hostnetwork", listening=[])), "hostnetwork-hostport")
    assert f.severity == "warning"
    assert "no TCP socket listens on port 9000" in " ".join(f.evidence)
    assert "ss -lnp" in f.fix and f.fix.count("ip netns exec bhp-") == 1


def test_hostnetwork_hostport_not_equal_to_container_port_is_a_warning():
    f = only(findings(lab_view("hostnetwork", pods=FX / "hand" / "pods-hostnet-mismatch.json")),
             "hostnetwork-hostport")
    assert f.severity == "warning"
    assert "9001/TCP" in f.message
    assert "set hostPort equal to containerPort (9000)" in f.fix


def test_two_hostnetwork_pods_on_one_port_conflict():
    found = findings(lab_view("hostnetwork", pods=FX / "hand" / "pods-hostnet-twins.json"))
    f = only(found, "hostport-conflict")
    assert f.severity == "error"
    assert "lab/hostnet-web" in f.message and "lab/hostnet-web-2" in f.message
    assert "only one process can bind" in f.message


# --------------------------------------------------------------------------- rules vs pods


def test_declared_hostport_without_rule_is_an_error_for_local_running_pods_only():
    found = findings(lab_view("basic", pods=FX / "hand" / "pods-missing-rule.json"))
    f = only(found, "hostport-no-rule")
    assert f.severity == "error"
    assert "lab/web-extra" in f.message and "9090/TCP" in f.message and "10.86.1.9:8080" in f.message
    assert "no DNAT rule for 9090/TCP" in " ".join(f.evidence)
    assert "kubectl -n lab delete pod web-extra" in f.fix
    # web-elsewhere runs on another node, web-pending has no IP yet: neither is reported.
    assert "web-elsewhere" not in json.dumps([x.to_dict() for x in found])
    assert "web-pending" not in json.dumps([x.to_dict() for x in found])


def test_rule_to_an_ip_no_live_pod_has_is_a_leak_with_an_exact_fix():
    found = findings(lab_view("stale-udp", pods=FX / "hand" / "pods-leaked.json"))
    f = only(found, "leaked-hostport-rule")
    assert f.severity == "error"
    assert "10.93.1.4" in f.message and "5353/UDP" in f.message
    udp_chain = next(r.chain for r in parse_iptables_save((FX / "lab-stale-udp" / "nat.rules").read_text())
                     if r.proto == "UDP")
    (cmd,) = ticked(f.fix)
    assert cmd.startswith("ip netns exec bhp-ckfx")
    assert f"iptables-nft-save -t nat | grep -v -e {udp_chain} | iptables-nft-restore" in cmd


def test_without_pod_metadata_leaks_are_not_judged_and_it_says_so():
    found = findings(lab_view("stale-udp", pods_known=False))
    f = only(found, "no-pod-metadata")
    assert f.severity == "info"
    assert "leaked-hostport-rule" not in codes(found)
    assert "--pods" in f.fix
    # The stale entry is still found: the rules alone say 5353/UDP now goes elsewhere.
    assert "stale-conntrack" in codes(found)


def test_two_pods_one_hostport_names_the_first_in_cni_hostport_dnat_order():
    view = lab_view("conflict")
    f = only(findings(view), "hostport-conflict")
    assert f.severity == "error"
    original = "cjweichen/nginx-hostport-6f9b9886b4-dndhf"
    rival = original + "-rival"
    # iptables-nft-save lists the rival's CNI-DN chain first; CNI-HOSTPORT-DNAT jumps to the original's first.
    assert view.rules[0].target_ip != view.rules[1].target_ip
    first_listed = next(m for m in nodeview.mappings(view) if m["host_port"] == 8000)
    assert f"{first_listed['namespace']}/{first_listed['pod']}" == rival
    assert f"new connections go to {original} (" in f.message
    assert "first in CNI-HOSTPORT-DNAT order" in f.message
    assert f.evidence[0].startswith("1. ") and f"({original})" in f.evidence[0]
    assert f"kubectl -n cjweichen delete pod {rival.split('/')[1]}" in f.fix


def test_pod_claiming_a_taken_hostport_without_rule_conflicts_and_misses_its_rule():
    found = findings(lab_view("basic", pods=FX / "hand" / "pods-conflict-no-rule.json"))
    c = only(found, "hostport-conflict")
    assert "lab/rival" in c.message and "new connections go to cjweichen/" in c.message
    assert any("lab/rival declares 8000/TCP but has no rule" in e for e in c.evidence)
    n = only(found, "hostport-no-rule")
    assert "lab/rival" in n.message and "reach another pod" in n.message


# --------------------------------------------------------------------------- conntrack


def test_stale_udp_conntrack_entry_names_the_dead_ip_and_the_exact_delete():
    view = lab_view("stale-udp")
    f = only(findings(view), "stale-conntrack")
    assert f.severity == "error"
    assert "10.93.1.3" in f.message and "no live pod has it" in f.message
    assert any("now go to 10.93.1.4:53 (lab/dns-v2)" in e for e in f.evidence)
    (cmd,) = ticked(f.fix)
    assert cmd == (f"ip netns exec {view.netns} conntrack -D -p udp --orig-dst 10.93.0.1 --dport 5353 "
                   "--reply-src 10.93.1.3")


def test_stale_conntrack_fix_has_no_netns_prefix_on_the_current_namespace():
    f = only(findings(lab_view("stale-udp", netns=False)), "stale-conntrack")
    assert ticked(f.fix) == ["conntrack -D -p udp --orig-dst 10.93.0.1 --dport 5353 --reply-src 10.93.1.3"]


def blackhole_view(declared=False, listening=(("UDP", "0.0.0.0", 5353),)):
    """lab-stale-udp after containernetworking/plugins#1190: dns-v2 and its rule are gone too, and a
    hostNetwork pod dns-node listens on UDP 5353 of the node (declaring the port or not)."""
    from bpftrace_hostport.model import ContainerPort, PodInfo
    view = lab_view("stale-udp")
    view.rules = [r for r in view.rules if r.host_port != 5353]
    ports = (ContainerPort("dns", 5353, "UDP", "dns", 5353),) if declared else ()
    view.pods = [p for p in view.pods if p.name != "dns-v2"] + [
        PodInfo("lab", "dns-node", node=view.node_name, ips=("10.93.0.1",), host_network=True, phase="Running",
                ports=ports)]
    view.listening = list(listening)
    view.routes["10.93.1.3"] = {"ifname": "cni0", "gateway": None, "type": "unicast"}
    view.address_ifaces = {"10.93.0.1": "lan0", "10.93.1.1": "cni0"}
    return view


def test_stale_entry_without_rule_or_declaration_is_a_blackhole_when_a_node_socket_listens():
    view = blackhole_view()
    f = only(findings(view), "stale-conntrack")
    assert f.severity == "error"
    assert f.message.startswith("1 UDP conntrack entry for hostPort 10.93.0.1:5353 still DNATs to 10.93.1.3 "
                                "(no live pod has it), although no nat rule for port 5353 exists any more: "
                                "a blackhole.")
    assert "udp 0.0.0.0:5353" in f.message
    assert "no rule for 5353/UDP exists any more" in f.evidence
    assert any("no pod declares port 5353" in e for e in f.evidence)
    assert any(e.startswith("route to 10.93.1.3: unicast via cni0") for e in f.evidence)
    (cmd,) = ticked(f.fix)
    assert cmd == (f"ip netns exec {view.netns} conntrack -D -p udp --orig-dst 10.93.0.1 --dport 5353 "
                   "--reply-src 10.93.1.3")


def test_blackhole_names_the_hostnetwork_pod_that_declares_the_port():
    found = findings(blackhole_view(declared=True))
    f = only(found, "stale-conntrack")
    assert f.severity == "error" and "blackhole" in f.message
    assert any("(hostNetwork pod lab/dns-node)" in e for e in f.evidence)
    assert "hostnetwork-hostport" in codes(found)


def test_stale_entry_to_a_dead_pod_with_nothing_serving_the_port_is_a_warning():
    f = only(findings(blackhole_view(listening=())), "stale-conntrack")
    assert f.severity == "warning" and "nothing serves port 5353" in f.message
    assert ticked(f.fix)[0].endswith("--reply-src 10.93.1.3")


@pytest.mark.parametrize("route", [
    {"ifname": "lan0", "gateway": None, "type": "unicast"},          # another host on the node's LAN
    {"ifname": "eth0", "gateway": "10.93.0.254", "type": "unicast"},  # behind a router: another node
    {"ifname": None, "gateway": None, "type": "unreachable"},
])
def test_dnat_to_an_address_off_the_pod_network_is_no_stale_entry(route):
    view = blackhole_view()
    view.routes["10.93.1.3"] = route
    assert "stale-conntrack" not in codes(findings(view))


def test_blackhole_check_needs_the_pods_and_spares_live_pods_and_node_ports():
    view = blackhole_view()
    view.pods_known, view.pods = False, []
    assert "stale-conntrack" not in codes(findings(view))
    from bpftrace_hostport.model import PodInfo
    view = blackhole_view()
    view.pods.append(PodInfo("lab", "other", node=view.node_name, ips=("10.93.1.3",), phase="Running"))
    assert "stale-conntrack" not in codes(findings(view))
    # kube-proxy's NodePorts DNAT local addresses too: their range is left to kube-proxy.
    from dataclasses import replace
    view = blackhole_view()
    view.conntrack = [replace(e, orig_dport=30053) for e in view.conntrack]
    view.listening = []
    assert "stale-conntrack" in codes(findings(view))
    view.nat = [replace(view.nat[0], chains=view.nat[0].chains + ("KUBE-NODEPORTS",))]
    assert "stale-conntrack" not in codes(findings(view))


def test_tcp_entries_to_live_pods_are_fine():
    view = lab_view("basic")
    assert len(view.conntrack) == 2
    assert "stale-conntrack" not in codes(findings(view))


# --------------------------------------------------------------------------- forwarding


def test_ip_forward_off_is_an_error_with_the_sysctl_fix():
    view = lab_view("basic", sysctl=FX / "hand" / "sysctl-forward-off.txt")
    f = only(findings(view), "ip-forward-off")
    assert f.severity == "error"
    assert ticked(f.fix) == [f"ip netns exec {view.netns} sysctl -w net.ipv4.ip_forward=1"]


def test_forward_policy_drop_without_accepting_rule_is_an_error():
    view = lab_view("forward-drop")
    f = only(findings(view), "forward-drop")
    assert f.severity == "error"
    assert "policy DROP" in f.message
    ev = " ".join(f.evidence)
    assert "new connections to 10." in ev and "replies from" in ev and "-P FORWARD DROP" in ev
    cmds = ticked(f.fix)
    assert f"ip netns exec {view.netns} iptables-nft -I FORWARD -o cni0 -j ACCEPT" in cmds
    assert f"ip netns exec {view.netns} iptables-nft -I FORWARD -i cni0 -j ACCEPT" in cmds


def test_forward_policy_drop_with_accepting_rules_is_fine():
    view = lab_view("forward-drop", filt=FX / "hand" / "filter-drop-accepting.rules")
    assert findings(view) == []


def test_forward_accepting_only_established_drops_new_connections():
    f = only(findings(lab_view("basic", filt=FX / "hand" / "filter-drop-established-only.rules")), "forward-drop")
    ev = " ".join(f.evidence)
    assert "new connections to 10.86.1.2:80" in ev
    assert "replies from" not in ev


def test_forward_drop_rule_in_a_user_chain_is_found_for_its_port_only():
    f = only(findings(lab_view("basic", filt=FX / "hand" / "filter-user-chain-drop.rules")), "forward-drop")
    ev = " ".join(f.evidence)
    assert "10.86.1.2:80 (hostPort 8000/TCP, via cni0): dropped by `-A USER-BLOCK -o cni0 -p tcp -m tcp --dport 80 -j DROP`" in ev
    assert ":443" not in ev


def test_nftables_forward_chain_with_drop_policy_and_no_accept():
    view = lab_view("basic", nft=FX / "hand" / "nft-forward-drop.json")
    f = only(findings(view), "forward-drop")
    assert "inet filter forward" in f.message
    assert f'ip netns exec {view.netns} nft add rule inet filter forward oifname "cni0" accept' in ticked(f.fix)
    assert findings(lab_view("basic", nft=FX / "hand" / "nft-forward-drop-accepting.json")) == []


def test_cni_hostport_dnat_not_hooked_from_prerouting():
    view = lab_view("basic", nat=FX / "hand" / "nat-unhooked.rules")
    f = only(findings(view), "hostport-chain-not-hooked")
    assert f.severity == "error" and "PREROUTING" in f.message
    assert ticked(f.fix) == [f"ip netns exec {view.netns} iptables-nft -t nat -A PREROUTING -m addrtype "
                             "--dst-type LOCAL -j CNI-HOSTPORT-DNAT"]


# --------------------------------------------------------------------------- localhost


def test_localhost_hostport_that_works_is_info_and_mentions_ipv6():
    found = findings(lab_view("localhost"))
    f = only(found, "localhost-hostport")
    assert f.severity == "info"
    assert "127.0.0.1:8000/TCP" in f.message and "[::1]" in f.message
    assert "net.ipv4.conf.cni0.route_localnet = 1" in f.evidence
    assert all(x.severity == "info" for x in found)


def test_route_localnet_off_on_the_bridge_is_a_warning_when_portmap_expects_it():
    view = lab_view("localhost", sysctl=FX / "hand" / "sysctl-localnet-off.txt")
    f = only(findings(view), "localhost-route-localnet-off")
    assert f.severity == "warning"
    assert "net.ipv4.conf.cni0.route_localnet = 0" in f.evidence
    assert ticked(f.fix) == [f"ip netns exec {view.netns} sysctl -w net.ipv4.conf.cni0.route_localnet=1"]
    assert "::1" in f.message


def test_route_localnet_off_without_portmap_snat_or_traffic_is_info():
    view = lab_view("basic", nat=FX / "hand" / "nat-no-snat.rules", sysctl=FX / "hand" / "sysctl-localnet-off.txt")
    f = only(findings(view), "localhost-route-localnet-off")
    assert f.severity == "info"


def test_ipv6_localhost_hostport_is_a_warning():
    v6 = (RULES_FX / "portmap_nft_v6_counters.txt").read_text()
    view = NodeView(rules=parse_iptables_save(v6, 6, "iptables-nft"), nat=[nat_summary(v6, "iptables-nft", 6)],
                    conntrack=parse_conntrack_text((FX / "hand" / "conntrack-ipv6-localhost.txt").read_text()),
                    conntrack_read=True, sysctls={"net.ipv6.conf.all.forwarding": "1",
                                                  "net.bridge.bridge-nf-call-ip6tables": "1"})
    found = findings(view)
    f = only(found, "localhost-ipv6")
    assert f.severity == "warning" and "[::1]:8000/TCP" in f.message
    assert "127.0.0.1" in f.fix


# --------------------------------------------------------------------------- hairpin


def test_missing_hostport_masquerade_rule_is_a_hairpin_warning_with_the_missing_command():
    view = lab_view("basic", nat=FX / "hand" / "nat-no-masquerade.rules")
    f = only(findings(view), "hairpin-no-masquerade")
    assert f.severity == "warning"
    assert "lacks a MASQUERADE rule in CNI-HOSTPORT-MASQ" in " ".join(f.evidence)
    assert ticked(f.fix) == [f"ip netns exec {view.netns} iptables-nft -t nat -A CNI-HOSTPORT-MASQ -m mark "
                             "--mark 0x2000/0x2000 -j MASQUERADE"]


def test_no_snat_and_bridge_nf_call_iptables_off():
    view = lab_view("basic", nat=FX / "hand" / "nat-no-snat.rules", sysctl=FX / "hand" / "sysctl-brnf-off.txt")
    f = only(findings(view), "bridge-nf-call-iptables-off")
    assert f.severity == "warning"
    assert f"ip netns exec {view.netns} sysctl -w net.bridge.bridge-nf-call-iptables=1" in ticked(f.fix)


def test_no_snat_without_br_netfilter_is_a_hairpin_warning_and_with_it_info():
    view = lab_view("basic", nat=FX / "hand" / "nat-no-snat.rules", sysctl=FX / "hand" / "sysctl-no-br-netfilter.txt")
    found = findings(view)
    f = only(found, "hairpin-no-masquerade")
    assert f.severity == "warning" and "br_netfilter is not loaded" in " ".join(f.evidence)
    assert "bridge-nf-call-iptables-off" not in codes(found)
    on = only(findings(lab_view("basic", nat=FX / "hand" / "nat-no-snat.rules")), "hairpin-no-masquerade")
    assert on.severity == "info"


def test_bridge_nf_off_alone_does_not_matter_while_portmap_masquerades():
    assert findings(lab_view("basic", sysctl=FX / "hand" / "sysctl-brnf-off.txt")) == []


# --------------------------------------------------------------------------- the records


def test_every_code_is_documented_and_findings_serialize():
    views = [lab_view(s) for s in ("conflict", "stale-udp", "forward-drop", "localhost", "hostnetwork")]
    views.append(lab_view("basic", nat=FX / "hand" / "nat-no-masquerade.rules",
                          sysctl=FX / "hand" / "sysctl-forward-off.txt"))
    for view in views:
        found = findings(view)
        assert found
        sev = [f.severity for f in found]
        assert sev == sorted(sev, key=check.SEVERITIES.index)      # errors first
        for f in found:
            assert f.code in CODES and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", f.code)
            assert f.severity in check.SEVERITIES and f.message and f.fix
            json.dumps(f.to_dict())
    assert check.has_errors(findings(views[0])) and not check.has_errors(findings(lab_view("basic")))


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def fake_gather(monkeypatch):
    """cli_node's gather returns a fixture view; the pod source is whatever the CLI resolved."""
    box = {}

    def fake(netns, pods, *, node_name=None, pods_known=None, notes=(), **kw):
        box.update(netns=netns, pods=pods, node_name=node_name, pods_known=pods_known)
        return box["view"]
    monkeypatch.setattr(gather_mod, "gather", fake)
    return box


def test_check_command_exit_codes_and_json(fake_gather):
    runner = CliRunner()
    fake_gather["view"] = lab_view("stale-udp")
    res = runner.invoke(cli_node.check_cmd, ["--json", "--pods-from", "none"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    assert [d["code"] for d in data] == ["stale-conntrack"]
    assert set(data[0]) == {"severity", "code", "message", "evidence", "fix"}
    fake_gather["view"] = lab_view("basic")
    res = runner.invoke(cli_node.check_cmd, ["--pods-from", "none"])
    assert res.exit_code == 0 and "No problems found" in res.stdout
    fake_gather["view"] = lab_view("localhost")
    res = runner.invoke(cli_node.check_cmd, ["--pods-from", "none"])
    assert res.exit_code == 0 and "localhost-hostport" in res.stdout and "SEVERITY" in res.stdout


def test_rules_command_table_and_json(fake_gather, tmp_path):
    runner = CliRunner()
    fake_gather["view"] = lab_view("basic")
    res = runner.invoke(cli_node.rules_cmd, ["--pods", str(FX / "lab-basic" / "pods.json"), "--pods-from", "file"])
    assert res.exit_code == 0, res.output
    assert "cjweichen/nginx-hostport-6f9b9886b4-dndhf" in res.stdout and "80 (http)" in res.stdout
    assert fake_gather["pods_known"] is True
    res = runner.invoke(cli_node.rules_cmd, ["--json", "--pods-from", "none"])
    rows = json.loads(res.stdout)
    assert {(r["host_port"], r["port_name"]) for r in rows} == {(8000, "http"), (44300, "https")}
    assert fake_gather["pods"] is None and fake_gather["pods_known"] is False


def test_commands_turn_bad_input_into_exit_2(fake_gather, tmp_path):
    runner = CliRunner()
    fake_gather["view"] = lab_view("basic")
    bad = tmp_path / "pods.json"
    bad.write_text("{not json")
    for cmd in (cli_node.rules_cmd, cli_node.check_cmd):
        res = runner.invoke(cmd, ["--pods", str(bad), "--pods-from", "file"])
        assert res.exit_code == 2 and "Error:" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli_node.check_cmd, ["--lab", "no-such-lab-xyz"])
    assert res.exit_code == 2 and "lab up" in res.output
    res = runner.invoke(cli_node.check_cmd, ["--pods-from", "bogus"])
    assert res.exit_code == 2


def test_commands_fit_the_main_group():
    import click

    from bpftrace_hostport.cli import cli
    assert cli_node.rules_cmd.name == "rules" and cli_node.check_cmd.name == "check"
    group = click.Group("bpftrace-hostport", commands={**cli.commands, "rules": cli_node.rules_cmd,
                                                       "check": cli_node.check_cmd})
    res = CliRunner().invoke(group, ["check", "--help"])
    assert res.exit_code == 0 and "--pods-from" in res.output and "Examples" in res.output


def test_a_daemonset_twin_on_another_node_is_no_conflict_in_a_cluster_wide_list():
    from dataclasses import replace
    view = lab_view("basic")
    pod = view.pods[0]
    twin = replace(pod, name=pod.name + "-other", node="other-node", ips=("10.250.3.4",))
    view.pods.append(twin)
    view.node_name = None              # told from the pod the rules target
    assert nodeview.this_node(view) == pod.node
    assert findings(view) == []


def test_missing_rule_on_an_ebpf_datapath_is_only_info():
    view = lab_view("basic", pods=FX / "hand" / "pods-missing-rule.json")
    view.interfaces = ["lo", "eth0", "cilium_host", "cilium_net"]
    f = only(findings(view), "hostport-no-rule")
    assert f.severity == "info" and any("cilium_host" in e for e in f.evidence)


def test_dual_stack_rules_of_one_unknown_pod_are_no_conflict():
    v4 = (RULES_FX / "portmap_nft_counters.txt").read_text()
    v6 = (RULES_FX / "portmap_nft_v6_counters.txt").read_text()
    view = NodeView(rules=parse_iptables_save(v4, 4, "iptables-nft") + parse_iptables_save(v6, 6, "iptables-nft"),
                    nat=[nat_summary(v4, "iptables-nft", 4), nat_summary(v6, "iptables-nft", 6)],
                    sysctls={"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                             "net.bridge.bridge-nf-call-iptables": "1"})
    assert codes(findings(view)) == ["no-pod-metadata"]
