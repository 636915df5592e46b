"""The findings of issue 20 against their real lab scenarios (lab/scenarios.py): each scenario
shows its symptom with real traffic, `check` finds exactly its finding, running the printed fix
makes the traffic work (or, for an exposure, stop) and the finding go away. A lab with 2,000
kube-proxy Services is healthy, and reading it never touches kube-proxy's per-Service chains.

Needs root, the CNI plugins, ip, iptables, nft and conntrack (not bcc). The nftables portmap
scenarios fetch its plugins build once (lab/plugins.py): with CI=true a fetch that fails is a
failure, not a skip.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from bpftrace_hostport.lab import build as lab
from bpftrace_hostport.lab import scenarios
from tests.kernel.test_check_lab import _our_namespaces, _require, check, codes, fix_commands, one

pytestmark = pytest.mark.kernel

PREFIX = f"cf{os.getpid() % 10000}"
_n = iter(range(1000))


def _need_nft_plugins():
    from bpftrace_hostport.errors import UserError
    from bpftrace_hostport.lab.plugins import nftables_plugins
    try:
        nftables_plugins()
    except UserError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the nftables portmap cannot be had: {e}")
        pytest.skip(str(e))


class Lab:
    def __init__(self, scenario, **kw):
        _require()
        if kw.get("portmap") == "nftables" or (scenarios.get(scenario) and scenarios.get(scenario).backend):
            _need_nft_plugins()
        self.name = f"{PREFIX}{next(_n)}"
        kw.setdefault("ipv6", False)
        self.st = lab.up(name=self.name, scenario=scenario, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        lab.down(self.name)
        assert _our_namespaces(self.name + "-") == [], "lab.down left namespaces behind"

    def node(self, *cmd, check=True):
        return subprocess.run(["ip", "netns", "exec", self.st.node_netns, *cmd], capture_output=True, text=True,
                              check=check)

    def call(self, ns, host, port, proto="tcp", timeout=1.0, count=1, source_port=None):
        """The lab's traffic generator from namespace `ns`: {"answered": n, "by_pod": {...}, ...}."""
        args = ["--host", host, "--port", str(port), "--proto", proto, "--count", str(count),
                "--timeout", str(timeout)] + (["--source-port", str(source_port)] if source_port else [])
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bpftrace_hostport.lab.traffic", *args],
                           capture_output=True, text=True, timeout=60, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def pod(self, name):
        return next(p for p in self.st.pods if p.name == name)


def run_fix(finding, skip=("firewall-cmd",)):
    ran = []
    for cmd in fix_commands(finding):
        if cmd[0] in skip:
            continue              # a host's own tool, not in the lab (firewalld is not installed here)
        subprocess.run(cmd, check=True, capture_output=True)
        ran.append(cmd)
    assert ran, finding
    return ran


def test_udp_pinned_to_the_node_is_found_and_its_delete_lets_the_client_reach_the_pod():
    with Lab("udp-pinned") as t:
        dns = t.pod("dns").ips[0]
        ct = t.node("conntrack", "-L", "-p", "udp", "--orig-port-src", str(scenarios.UDP_STREAM_PORT)).stdout
        assert f"src={t.st.node_ip} dst={t.st.clients[0]['ip']} sport=5353" in ct    # no DNAT: to the node
        rc, found = check(t.name)
        f = one(found, "conntrack-pinned-to-node")
        assert rc == 1 and codes(found) == ["conntrack-pinned-to-node"]
        run_fix(f)
        import time
        time.sleep(0.5)          # the client sends 10 datagrams a second: its next one meets the DNAT rule
        ct = t.node("conntrack", "-L", "-p", "udp", "--orig-port-src", str(scenarios.UDP_STREAM_PORT)).stdout
        assert f"src={dns} " in ct
        assert check(t.name) == (0, [])


def test_dual_stack_pod_with_one_family_rule_gets_its_ipv6_mapping_back():
    with Lab("one-family", ipv6=True) as t:
        assert lab.traffic(t.name, count=1, family=6, timeout=0.5)["answered"] == 0
        assert lab.traffic(t.name, count=1)["answered"] == 1
        rc, found = check(t.name)
        assert rc == 1 and codes(found) == ["hostport-one-family", "hostport-one-family"]
        for f in found:
            run_fix(f)
        for port in (8000, 44300):
            res = lab.traffic(t.name, to=port, count=2, family=6)
            assert res["answered"] == 2 and list(res["by_pod"]) == [t.st.pods[0].namespace + "/" + t.st.pods[0].name]
        assert check(t.name) == (0, [])


def test_clusterip_on_kube_ipvs0_is_freed_from_the_hostport_rule():
    with Lab("ipvs") as t:
        caller = t.pod("caller").netns
        res = t.call(caller, scenarios.CLUSTER_IPS[1], 8000)
        assert res["answered"] == 1 and list(res["by_pod"]) != ["default/web-service"]   # hijacked
        rc, found = check(t.name)
        f = one(found, "hostport-catches-clusterip")
        assert rc == 1 and codes(found) == ["hostport-catches-clusterip"]
        run_fix(f)
        res = t.call(caller, scenarios.CLUSTER_IPS[1], 8000, count=2)
        assert list(res["by_pod"]) == ["default/web-service"] and res["answered"] == 2
        assert lab.traffic(t.name, count=2)["answered"] == 2        # the hostPort itself still works
        assert check(t.name) == (0, [])


def test_full_conntrack_table_drops_new_connections_until_its_filler_is_deleted():
    with Lab("conntrack-full") as t:
        assert lab.traffic(t.name, count=1, timeout=0.5)["answered"] == 0
        rc, found = check(t.name)
        f = one(found, "conntrack-table-full")
        assert rc == 1 and f["severity"] == "error" and codes(found) == ["conntrack-table-full"]
        (delete, raise_limit) = fix_commands(f)
        # The limit is the host's own (read-only in the lab's namespace): printed, never run here.
        limit = int(t.node("cat", "/proc/sys/net/netfilter/nf_conntrack_max").stdout)
        assert raise_limit == ["sysctl", "-w", f"net.netfilter.nf_conntrack_max={2 * limit}"]
        subprocess.run(delete, check=True, capture_output=True, timeout=120)
        assert lab.traffic(t.name, count=2)["answered"] == 2
        assert check(t.name) == (0, [])


def test_route_localnet_exposure_is_closed_by_either_fix():
    with Lab("route-localnet") as t:
        client = t.st.clients[0]["netns"]
        res = t.call(client, "127.0.0.1", scenarios.DAEMON_PORT)
        assert res["answered"] == 1 and list(res["by_pod"]) == ["node/kubelet"]      # reached from the LAN
        rc, found = check(t.name)
        f = one(found, "route-localnet-exposed")
        assert rc == 0 and f["severity"] == "warning" and codes(found) == ["route-localnet-exposed"]
        drop, *sysctls = fix_commands(f)
        subprocess.run(drop, check=True, capture_output=True)
        assert t.call(client, "127.0.0.1", scenarios.DAEMON_PORT, timeout=0.5)["answered"] == 0
        assert lab.traffic(t.name, source="node", target="localhost", count=1)["answered"] == 1
        assert "route-localnet-exposed" not in codes(check(t.name)[1])
        # the other fix: no drop rule, route_localnet off where it is not needed
        rule = shlex.join(drop[4:]).replace("-I INPUT", "-D INPUT", 1)
        t.node(*shlex.split(rule))
        assert one(check(t.name)[1], "route-localnet-exposed")
        for cmd in sysctls:
            subprocess.run(cmd, check=True, capture_output=True)
        assert t.call(client, "127.0.0.1", scenarios.DAEMON_PORT, timeout=0.5)["answered"] == 0
        assert lab.traffic(t.name, source="node", target="localhost", count=1)["answered"] == 1
        assert "route-localnet-exposed" not in codes(check(t.name)[1])


def test_firewalld_forward_reject_is_pointed_at_and_passed():
    with Lab("firewalld") as t:
        res = lab.traffic(t.name, count=1, timeout=0.5)
        assert res["answered"] == 0
        rc, found = check(t.name)
        f = one(found, "forward-drop")
        assert rc == 1 and "inet firewalld" in f["message"] and "reject" in f["message"]
        run_fix(f)
        assert lab.traffic(t.name, count=3)["answered"] == 3
        assert check(t.name) == (0, [])


def _own_hostport(t, pod, timeout):
    return t.call(pod.netns, t.st.node_ip, 8000, timeout=timeout)["answered"]


def test_mark_masq_missing_is_found_and_its_masquerade_brings_hairpin_back():
    with Lab("mark-masq") as t:
        web = next(p for p in t.st.pods if any(m.get("host_port") == 8000 for m in p.ports))
        assert _own_hostport(t, web, 0.5) == 0
        rc, found = check(t.name)
        f = one(found, "mark-masq-missing")
        assert rc == 0 and codes(found) == ["mark-masq-missing"]      # not "hairpin ... snat off"
        run_fix(f)
        assert _own_hostport(t, web, 2) == 1
        assert lab.traffic(t.name, source="node", target="localhost", count=1)["answered"] == 1
        assert "mark-masq-missing" not in codes(check(t.name)[1])


def test_node_daemon_shadowed_by_a_dnat_rule_gets_its_port_back():
    with Lab("node-daemon") as t:
        res = lab.traffic(t.name, count=1)
        assert list(res["by_pod"]) != ["node/daemon"]
        rc, found = check(t.name)
        f = one(found, "node-socket-shadowed")
        assert rc == 0 and codes(found) == ["node-socket-shadowed"] and "(python)" in f["message"]
        run_fix(f)
        res = lab.traffic(t.name, count=2)
        assert res["answered"] == 2 and list(res["by_pod"]) == ["node/daemon"]
        assert check(t.name) == (0, [])


def test_nft_portmap_transit_jump_is_found_and_replaced():
    with Lab("nft-transit") as t:
        target = t.pod("transit-target").ips[0]
        client = t.st.clients[0]["netns"]
        res = t.call(client, target, 8000)
        assert res["answered"] == 1 and list(res["by_pod"]) != ["lab/transit-target"]   # hijacked
        rc, found = check(t.name)
        f = one(found, "hostport-catches-transit")
        assert rc == 1 and codes(found) == ["hostport-catches-transit"]
        run_fix(f)
        res = t.call(client, target, 8000, count=2)
        assert res["answered"] == 2 and list(res["by_pod"]) == ["lab/transit-target"]
        assert lab.traffic(t.name, count=2)["answered"] == 2
        assert check(t.name) == (0, [])


def test_refused_hostports_are_read_in_the_pods_namespaces():
    with Lab("refused") as t:
        tcp = lab.traffic(t.name, count=1, timeout=0.5)
        udp = lab.traffic(t.name, to=5353, proto="udp", count=1, timeout=0.5)
        assert tcp["answered"] == 0 and any("111" in e for e in tcp["errors"])        # ECONNREFUSED: a reset
        assert udp["answered"] == 0 and any("refused" in e.lower() for e in udp["errors"])   # port unreachable
        rc, found = check(t.name)
        assert rc == 1 and codes(found) == ["pod-not-listening", "pod-not-listening"]
        for f in found:
            ss = [c for c in fix_commands(f) if "ss" in c]
            out = subprocess.run(ss[0], capture_output=True, text=True, check=True).stdout
            port = re.search(r"listen on port (\d+)", f["fix"]).group(1)
            assert f":{port} " not in out
        # the servers come back (the container restarted): nothing left to report
        for pod in t.st.live_pods():
            if not pod.host_network:
                pod.server_pid = lab._start_process(t.st, pod.netns, lab._server_args(pod), "restart.log", ready=True)
        assert lab.traffic(t.name, count=1)["answered"] == 1
        assert lab.traffic(t.name, to=5353, proto="udp", count=1)["answered"] == 1
        assert check(t.name) == (0, [])


def test_a_pod_namespace_that_cannot_be_found_is_said_plainly(tmp_path):
    from click.testing import CliRunner
    from bpftrace_hostport.cli.node import check_cmd
    from bpftrace_hostport.pods.podlist import read_pod_list, write_pod_list
    with Lab("basic") as t:
        pods = read_pod_list(str(t.st.pods_file))
        moved = [p.__class__(**{**p.__dict__, "ips": ("10.254.254.9",)}) for p in pods]
        f = tmp_path / "pods.json"
        write_pod_list(moved, str(f))
        res = CliRunner().invoke(check_cmd, ["--netns", t.st.node_netns, "--pods", str(f), "--pods-from", "file",
                                             "--node", t.st.node_name, "--json"])
        assert "could not be found" in res.stderr and "pod-not-listening" not in res.stdout


def test_a_node_with_thousands_of_kube_proxy_services_is_healthy_and_read_by_its_hostport_chains():
    from bpftrace_hostport.node.read import read_netfilter
    with Lab("kube-proxy", services=2000, conntrack_entries=10000) as t:
        assert lab.traffic(t.name, count=2)["answered"] == 2
        assert check(t.name) == (0, [])
        nf = read_netfilter(t.st.node_netns)
        (nat,) = [x for s, fam, x in nf.nat if fam == 4]
        assert "KUBE-SVC-" not in nat and "KUBE-SEP-" not in nat and "CNI-HOSTPORT-DNAT" in nat
        assert len(nat.splitlines()) < 60            # of about 22,000 nat lines in the table
        assert nf.legacy_tables[4] == set()          # reading made no legacy table


def test_nftables_portmap_lab_is_read_like_the_iptables_one():
    from click.testing import CliRunner
    from bpftrace_hostport.cli.node import rules_cmd
    with Lab("basic", portmap="nftables", ipv6=True) as t:
        for fam in (4, 6):
            assert lab.traffic(t.name, count=1, family=fam)["answered"] == 1
        tables = t.node("nft", "list", "tables").stdout
        assert "table ip cni_hostport" in tables and "table ip6 cni_hostport" in tables
        assert check(t.name) == (0, [])
        rows = json.loads(CliRunner().invoke(rules_cmd, ["--lab", t.name, "--json"]).stdout)
        web = t.st.pods[0]
        assert {(r["host_port"], r["family"], r["target_ip"], r["pod"], r["source"], r["chain"]) for r in rows} == {
            (hp, fam, ip, web.name, "nftables", "cni_hostport/hostports")
            for hp in (8000, 44300) for fam, ip in ((4, web.ips[0]), (6, web.ips[1]))}
        # the nftables table's prerouting jump gone: found, and the printed rule restores it
        t.node("nft", "flush", "chain", "ip", "cni_hostport", "prerouting")
        assert lab.traffic(t.name, count=1, timeout=0.5)["answered"] == 0
        rc, found = check(t.name)
        f = one(found, "hostport-chain-not-hooked")
        assert rc == 1 and "cni_hostport" in f["message"]
        run_fix(f)
        assert lab.traffic(t.name, count=2)["answered"] == 2
        assert check(t.name) == (0, [])
        # the pod's hairpin masquerade gone: a pod calling its own hostPort fails until it is back
        rules = json.loads(t.node("nft", "-j", "-a", "list", "chain", "ip", "cni_hostport", "masquerading").stdout)
        handle = next(i["rule"]["handle"] for i in rules["nftables"] if "rule" in i
                      and "127.0.0.1" not in json.dumps(i["rule"]))
        t.node("nft", "delete", "rule", "ip", "cni_hostport", "masquerading", "handle", str(handle))
        assert _own_hostport(t, web, 0.5) == 0
        rc, found = check(t.name)
        f = one(found, "hairpin-no-masquerade")
        assert rc == 0 and f["severity"] == "warning"
        run_fix(f)
        assert _own_hostport(t, web, 2) == 1
        assert check(t.name) == (0, [])


def test_no_namespace_is_left_behind():
    _require()
    assert _our_namespaces(PREFIX) == []
