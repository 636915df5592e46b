"""`check` and `rules` against real labs: each scenario's problem is found, and where the finding
gives a fix, running that exact fix makes the traffic work and the finding go away.

Needs root, the CNI plugins, ip, iptables and conntrack (not bcc: nothing here loads eBPF).
Skips without them, unless CI=true: then it fails. IPv4-only labs keep the file well under 60 s.
"""
import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from bpftrace_hostport.lab import build as lab
from bpftrace_hostport.cli.node import check_cmd, rules_cmd

pytestmark = pytest.mark.kernel

PREFIX = f"ck{os.getpid() % 10000}"
_n = itertools.count()


def _require():
    reason = None
    if os.geteuid() != 0:
        reason = "lab tests need root"
    else:
        cni = os.environ.get("CNI_PATH", "/usr/lib/cni")
        missing = [p for p in ("bridge", "host-local", "portmap") if not os.access(os.path.join(cni, p), os.X_OK)]
        missing += [t for t in ("ip", "iptables", "conntrack") if not shutil.which(t)]
        if missing:
            reason = f"missing {', '.join(missing)}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the lab tests cannot run: {reason}")
        pytest.skip(reason)


def _our_namespaces(name=PREFIX):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"bhp-{name}")]


@contextlib.contextmanager
def lab_up(scenario, kind):
    _require()
    name = f"{PREFIX}{next(_n)}"
    try:
        st = lab.up(name=name, scenario=scenario, ipv6=False, **kind.up_kwargs())
        yield name, st
    finally:
        lab.down(name)
        assert _our_namespaces(name + "-") == [], "lab.down left namespaces behind"


def pod_processes(pod):
    """The processes in a pod's network namespace (its server; with containerd also the pause)."""
    out = subprocess.run(["ip", "netns", "pids", pod.netns], capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


def run(cmd, *args):
    res = CliRunner().invoke(cmd, list(args))
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def check(name):
    res = run(check_cmd, "--lab", name, "--json")
    assert res.exit_code in (0, 1), res.output
    found = json.loads(res.stdout)
    assert res.exit_code == (1 if any(f["severity"] == "error" for f in found) else 0)
    return res.exit_code, found


def codes(found, severity=None):
    return [f["code"] for f in found if severity is None or f["severity"] == severity]


def one(found, code):
    got = [f for f in found if f["code"] == code]
    assert len(got) == 1, found
    return got[0]


def fix_commands(finding):
    return [shlex.split(c) for c in re.findall(r"`([^`]+)`", finding["fix"])]


def test_basic_lab_is_healthy_and_rules_name_the_pod_and_its_port(lab_kind):
    with lab_up("basic", lab_kind) as (name, st):
        rc, found = check(name)
        assert (rc, found) == (0, [])
        table = run(rules_cmd, "--lab", name)
        assert table.exit_code == 0, table.output
        assert "cjweichen/nginx-hostport-" in table.stdout and "80 (http)" in table.stdout
        assert "443 (https)" in table.stdout and "8000" in table.stdout
        rows = json.loads(run(rules_cmd, "--lab", name, "--json").stdout)
        assert {(r["host_port"], r["port_name"], r["target_ip"]) for r in rows} == \
            {(8000, "http", st.pods[0].ips[0]), (44300, "https", st.pods[0].ips[0])}


def test_hostnetwork_lab_reports_the_hostnetwork_pod_that_really_serves_its_port(lab_kind):
    with lab_up("hostnetwork", lab_kind) as (name, st):
        res = lab.traffic(name, to=9000, count=2)
        assert res["answered"] == 2 and list(res["by_pod"]) == ["lab/hostnet-web"]
        rc, found = check(name)
        f = one(found, "hostnetwork-hostport")
        assert f["severity"] == "info" and "lab/hostnet-web" in f["message"]
        assert any("listening: tcp" in e and ":9000" in e for e in f["evidence"])
        assert rc == 0 and codes(found, "error") == [] and codes(found, "warning") == []


def test_conflict_lab_names_the_pod_that_really_answers(lab_kind):
    with lab_up("conflict", lab_kind) as (name, st):
        rc, found = check(name)
        f = one(found, "hostport-conflict")
        assert rc == 1 and "8000/TCP" in f["message"] and "-rival" in f["message"]
        winner = re.search(r"new connections go to (\S+) \(", f["message"]).group(1)
        res = lab.traffic(name, to=8000, count=5)
        assert res["answered"] == 5 and list(res["by_pod"]) == [winner]


def test_leaked_rule_of_a_pod_gone_without_cni_del_is_found_and_its_fix_works(tmp_path, lab_kind):
    from bpftrace_hostport.pods.podlist import read_pod_list, write_pod_list
    with lab_up("conflict", lab_kind) as (name, st):
        winner = st.pods[0]                 # the first CNI ADD: its chain is jumped first
        rival = st.pods[-1]
        assert rival.name.endswith("-rival")
        # The pod dies without a CNI DEL (a node crash, a runtime bug): its rules stay.
        for pid in pod_processes(winner):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", winner.netns], check=True)
        pods = tmp_path / "pods.json"
        write_pod_list([p for p in read_pod_list(str(st.pods_file)) if p.name != winner.name], str(pods))
        args = ["--netns", st.node_netns, "--pods", str(pods), "--pods-from", "file", "--node", st.node_name,
                "--json"]
        res = run(check_cmd, *args)
        found = json.loads(res.stdout)
        leak = one(found, "leaked-hostport-rule")
        assert res.exit_code == 1 and winner.ips[0] in leak["message"]
        assert f"new connections go to unknown pod {winner.ips[0]}" in one(found, "hostport-conflict")["message"]
        assert lab.traffic(name, to=8000, count=1, timeout=0.5)["answered"] == 0
        for cmd in fix_commands(leak):
            subprocess.run(cmd, check=True, capture_output=True)
        res = run(check_cmd, *args)
        assert (res.exit_code, json.loads(res.stdout)) == (0, [])
        res = lab.traffic(name, to=8000, count=3, timeout=2)
        assert res["answered"] == 3 and list(res["by_pod"]) == [f"{rival.namespace}/{rival.name}"]


def test_stale_udp_lab_names_the_deleted_pods_ip_and_its_fix_works(monkeypatch, lab_kind):
    from bpftrace_hostport.node import gather as gather_mod, read as read_mod
    from bpftrace_hostport.node.check import findings
    from bpftrace_hostport.pods.podlist import read_pod_list
    with lab_up("stale-udp", lab_kind) as (name, st):
        dead = next(p for p in st.pods if p.name == "dns-v1" and not p.alive).ips[0]
        new = next(p for p in st.pods if p.name == "dns-v2").ips[0]
        rc, found = check(name)
        f = one(found, "stale-conntrack")
        assert rc == 1 and f["severity"] == "error" and dead in f["message"]
        # The same answer when ctnetlink cannot be used and `conntrack -L` is parsed instead.
        with monkeypatch.context() as m:
            m.setattr(read_mod, "read_conntrack", lambda *a, **k: (_ for _ in ()).throw(OSError("no netlink")))
            view = gather_mod.gather(st.node_netns, read_pod_list(str(st.pods_file)), node_name=st.node_name)
        assert any("conntrack tool" in n for n in view.notes)
        (g,) = [x for x in findings(view) if x.code == "stale-conntrack"]
        assert (g.message, g.fix) == (f["message"], f["fix"])
        (cmd,) = fix_commands(f)
        assert cmd == ["ip", "netns", "exec", st.node_netns, "conntrack", "-D", "-p", "udp", "--orig-dst",
                       st.node_ip, "--dport", "5353", "--reply-src", dead]
        subprocess.run(cmd, check=True, capture_output=True)
        time.sleep(0.5)       # the client sends 10 datagrams a second: its next one meets dns-v2's rule
        rc, found = check(name)
        assert "stale-conntrack" not in codes(found) and rc == 0, found
        from bpftrace_hostport.node.gather import gather
        view = gather(st.node_netns, None)
        assert any(e.orig_dport == 5353 and e.reply_src == new for e in view.conntrack)


def test_forward_drop_lab_is_an_error_and_its_fix_works(lab_kind):
    with lab_up("forward-drop", lab_kind) as (name, st):
        assert lab.traffic(name, count=1, timeout=0.5)["answered"] == 0
        rc, found = check(name)
        f = one(found, "forward-drop")
        assert rc == 1 and "policy DROP" in f["message"]
        for cmd in fix_commands(f):
            subprocess.run(cmd, check=True, capture_output=True)
        assert lab.traffic(name, count=3, timeout=2)["answered"] == 3
        assert check(name) == (0, [])


def test_localhost_lab_gives_at_most_info(lab_kind):
    with lab_up("localhost", lab_kind) as (name, st):
        res = lab.traffic(name, source="node", count=2)
        assert res["answered"] == 2 and res["to"].startswith("127.0.0.1:")
        rc, found = check(name)
        assert rc == 0 and set(f["severity"] for f in found) <= {"info"}
        f = one(found, "localhost-hostport")
        assert "::1" in f["message"] and any("route_localnet = 1" in e for e in f["evidence"])
        # Take route_localnet away: localhost calls fail, check says why, and its fix brings them back.
        subprocess.run(["ip", "netns", "exec", st.node_netns, "sysctl", "-qw",
                        "net.ipv4.conf.cni0.route_localnet=0"], check=True)
        assert lab.traffic(name, source="node", count=1, timeout=0.5)["answered"] == 0
        rc, found = check(name)
        f = one(found, "localhost-route-localnet-off")
        assert rc == 0 and f["severity"] == "warning"
        for cmd in fix_commands(f):
            subprocess.run(cmd, check=True, capture_output=True)
        assert lab.traffic(name, source="node", count=2)["answered"] == 2


def _call_own_hostport(st, pod, timeout):
    """The pod calls nodeIP:hostPort that leads back to itself (hairpin to self)."""
    p = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-m", "bpftrace_hostport.lab.traffic",
                        "--host", st.node_ip, "--port", "8000", "--proto", "tcp", "--count", "1",
                        "--timeout", str(timeout)], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])["answered"]


def test_hairpin_lab_is_healthy_while_a_pod_calls_the_hostport(lab_kind):
    with lab_up("hairpin", lab_kind) as (name, st):
        res = lab.traffic(name, source="pod", count=3)
        assert res["answered"] == 3
        assert check(name) == (0, [])
        # Without portmap's masquerade a pod calling its own hostPort gets no answer: check warns,
        # and the commands of its fix restore the call.
        web = next(p for p in st.pods if any(m.get("host_port") == 8000 for m in p.ports))
        assert _call_own_hostport(st, web, 2) == 1
        if lab_kind.portmap == "iptables":
            _nsexec(st, "iptables-nft", "-t", "nat", "-F", "CNI-HOSTPORT-MASQ")
        else:
            # the pod's own masquerade rule goes, the localhost one stays (a lost rule, not snat off)
            _nft_delete(st, "masquerading", f"ip saddr {web.ips[0]} ip daddr {web.ips[0]} masquerade")
        assert _call_own_hostport(st, web, 0.5) == 0
        rc, found = check(name)
        f = one(found, "hairpin-no-masquerade")
        assert rc == 0 and f["severity"] == "warning"
        for cmd in fix_commands(f):
            subprocess.run(cmd, check=True, capture_output=True)
        assert _call_own_hostport(st, web, 2) == 1
        assert check(name) == (0, [])


def test_no_lab_namespace_is_left_behind():
    _require()
    assert _our_namespaces() == []


def _nsexec(st, *cmd):
    return subprocess.run(["ip", "netns", "exec", st.node_netns, *cmd], capture_output=True, text=True, check=True)


def _nft_delete(st, chain, text):
    """Deletes the rules of portmap's nftables chain that contain TEXT; returns how many."""
    listing = _nsexec(st, "nft", "-a", "list", "chain", "ip", "cni_hostport", chain).stdout
    handles = [ln.rsplit("# handle ", 1)[1].strip() for ln in listing.splitlines()
               if text in ln and "# handle " in ln]
    for h in handles:
        _nsexec(st, "nft", "delete", "rule", "ip", "cni_hostport", chain, "handle", h)
    return len(handles)


def test_forwarding_off_is_found_and_traffic_fails(lab_kind):
    with lab_up("basic", lab_kind) as (name, st):
        _nsexec(st, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        assert lab.traffic(name, to=8000, count=1, timeout=0.5)["answered"] == 0
        rc, found = check(name)
        assert rc == 1 and "ip-forward-off" in codes(found, "error")
        _nsexec(st, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        assert lab.traffic(name, to=8000, count=1)["answered"] == 1
        assert "ip-forward-off" not in codes(check(name)[1])


def test_prerouting_jump_missing_is_found(lab_kind):
    with lab_up("basic", lab_kind) as (name, st):
        if lab_kind.portmap == "iptables":
            rules = _nsexec(st, "iptables-save", "-t", "nat").stdout
            jump = next(ln for ln in rules.splitlines()
                        if ln.startswith("-A PREROUTING") and "CNI-HOSTPORT-DNAT" in ln)
            _nsexec(st, "iptables", "-t", "nat", "-D", *shlex.split(jump)[1:])
        else:
            assert _nft_delete(st, "prerouting", "jump hostports_all") == 1
        assert lab.traffic(name, to=8000, count=1, timeout=0.5)["answered"] == 0
        rc, found = check(name)
        assert rc == 1 and "hostport-chain-not-hooked" in codes(found, "error")


def test_declared_hostport_without_rule_is_found(lab_kind):
    with lab_up("basic", lab_kind) as (name, st):
        # The pod's DNAT chain vanishes (a runtime that lost its portmap state): its jump goes too.
        if lab_kind.portmap == "iptables":
            rules = _nsexec(st, "iptables-save", "-t", "nat").stdout
            jumps = [ln for ln in rules.splitlines() if ln.startswith("-A CNI-HOSTPORT-DNAT") and "-j CNI-DN-" in ln]
            assert jumps
            for ln in jumps:
                _nsexec(st, "iptables", "-t", "nat", "-D", *shlex.split(ln)[1:])
            for chain in {shlex.split(ln)[shlex.split(ln).index("-j") + 1] for ln in jumps}:
                _nsexec(st, "iptables", "-t", "nat", "-F", chain)
                _nsexec(st, "iptables", "-t", "nat", "-X", chain)
        else:
            # the nftables portmap keeps one table: the pod's rules are its dnat rules, by comment
            assert _nft_delete(st, "hostports", " dnat to ") >= 1
        assert lab.traffic(name, to=8000, count=1, timeout=0.5)["answered"] == 0
        rc, found = check(name)
        assert rc == 1 and "hostport-no-rule" in codes(found, "error")
