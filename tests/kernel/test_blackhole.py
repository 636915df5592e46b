"""The stale-conntrack blackhole of containernetworking/plugins#1190 on a real lab.

A UDP client streams to nodeIP:5353 while its pod (dns-v1, hostPort 5353) is deleted and a
hostNetwork server (dns-node) takes port 5353 on the node. CNI DEL removed the rules, not the
client's conntrack entry, which keeps DNATing to the dead pod's IP: new clients reach the node's
socket, this one never does. `check` must find it although no pod declares the port any more
and no rule exists, say that it is a blackhole, and give the exact `conntrack -D` that ends it.

Needs root, the CNI plugins, ip, iptables and conntrack (bcc only for the trace test). Skips
without them, unless CI=true: then it fails.
"""
import contextlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner

from bpftrace_hostport.cli.node import check_cmd, rules_cmd
from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import cli, tracing
from tests.kernel.test_check_lab import _our_namespaces, _require

pytestmark = pytest.mark.kernel

PREFIX = f"bh{os.getpid() % 10000}"
_n = itertools.count()


@contextlib.contextmanager
def blackhole_lab():
    _require()
    name = f"{PREFIX}{next(_n)}"
    try:
        st = lab.up(name=name, scenario="blackhole", ipv6=False)
        yield name, st
    finally:
        lab.down(name)
        assert _our_namespaces(name + "-") == [], "lab.down left namespaces behind"


def run(cmd, *args, env=None):
    res = CliRunner().invoke(cmd, list(args), env=env)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def stale(found):
    got = [f for f in found if f["code"] == "stale-conntrack"]
    assert len(got) == 1, found
    return got[0]


def dead_ip(st):
    return next(p for p in st.pods if p.name == "dns-v1" and not p.alive).ips[0]


def conntrack_of_client(st):
    p = subprocess.run(["ip", "netns", "exec", st.node_netns, "conntrack", "-L", "-p", "udp",
                        "--orig-port-src", str(lab.STALE_UDP_SOURCE_PORT)],
                       capture_output=True, text=True, check=True)
    return [ln for ln in p.stdout.splitlines() if "dport=5353" in ln]


def udp_request(st, count=3):
    """A new client (another source port): its datagrams are not DNATed and reach dns-node."""
    p = subprocess.run(["ip", "netns", "exec", st.clients[0]["netns"], sys.executable, "-m",
                        "bpftrace_hostport.lab.traffic", "--host", st.node_ip, "--port", "5353", "--proto",
                        "udp", "--count", str(count), "--timeout", "1"],
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_check_finds_the_blackhole_and_its_fix_ends_it():
    with blackhole_lab() as (name, st):
        dead = dead_ip(st)
        # The story holds: the client's entry still goes to the dead pod, a new client is served
        # by the node's socket, and no pod declares 5353 nor does any rule exist for it.
        (entry,) = conntrack_of_client(st)
        assert f"src={dead} " in entry
        res = udp_request(st)
        assert res["answered"] == 3 and list(res["by_pod"]) == ["lab/dns-node"]
        pods = json.loads(open(st.pods_file).read())["items"]
        assert not any(p.get("hostPort") == 5353 for pod in pods for c in pod["spec"]["containers"]
                       for p in c.get("ports", []))
        rules = json.loads(run(rules_cmd, "--lab", name, "--json").stdout)
        assert not any(r["host_port"] == 5353 for r in rules)

        res = run(check_cmd, "--lab", name, "--json")
        assert res.exit_code == 1, res.output
        f = stale(json.loads(res.stdout))
        assert f["severity"] == "error"
        assert dead in f["message"] and "blackhole" in f["message"]
        assert "udp 0.0.0.0:5353" in f["message"]
        assert any("listening on the node: udp 0.0.0.0:5353" in e and "no pod declares port 5353" in e
                   for e in f["evidence"])
        assert any(f"DNAT to {dead}:53" in e for e in f["evidence"])
        (cmd,) = [shlex.split(c) for c in re.findall(r"`([^`]+)`", f["fix"])]
        assert cmd == ["ip", "netns", "exec", st.node_netns, "conntrack", "-D", "-p", "udp", "--orig-dst",
                       st.node_ip, "--dport", "5353", "--reply-src", dead]

        # The table says the same, fits 80 columns, and prints the fix as one copyable line.
        res = run(check_cmd, "--lab", name, env={"COLUMNS": "80"})
        lines = res.stdout.splitlines()
        assert " ".join(cmd) in lines
        assert all(len(ln) <= 80 for ln in lines if ln != " ".join(cmd))
        assert "blackhole" in res.stdout and "…" not in res.stdout

        # `rules --host-port` answers who serves 5353 and points at the stale entry.
        res = run(rules_cmd, "--lab", name, "--host-port", "5353/udp", env={"COLUMNS": "100"})
        assert res.exit_code == 0, res.output
        text = " ".join(res.stdout.split())
        assert "no DNAT rule and no pod declares it; a process of the node listens (udp 0.0.0.0:5353" in text
        assert f"1 conntrack entry still DNATs it to {dead}" in text
        assert f"  sudo bpftrace-hostport check --lab {name}" in res.stdout.splitlines()

        # The exact fix ends it: the client's next datagram is not DNATed and reaches the node.
        subprocess.run(cmd, check=True, capture_output=True)
        deadline = time.monotonic() + 5
        while True:
            entries = conntrack_of_client(st)
            if entries and all(f"src={st.node_ip} dst={st.clients[0]['ip']} sport=5353" in e and
                               "UNREPLIED" not in e for e in entries):
                break
            assert time.monotonic() < deadline, entries
            time.sleep(0.2)
        res = run(check_cmd, "--lab", name, "--json")
        assert "stale-conntrack" not in [f["code"] for f in json.loads(res.stdout)]
        assert res.exit_code == 0, res.output


def test_a_hostnetwork_pod_declaring_the_port_is_named_as_the_socket_left_out(tmp_path):
    """The #1190 report itself: the pod moved to hostNetwork and still declares hostPort 5353."""
    from bpftrace_hostport.model import ContainerPort
    from bpftrace_hostport.pods.podlist import read_pod_list, write_pod_list
    with blackhole_lab() as (name, st):
        dead = dead_ip(st)
        pods = [replace(p, ports=(ContainerPort("dns", 5353, "UDP", "dns", 5353),)) if p.name == "dns-node" else p
                for p in read_pod_list(str(st.pods_file))]
        path = tmp_path / "pods.json"
        write_pod_list(pods, str(path))
        res = run(check_cmd, "--netns", st.node_netns, "--pods", str(path), "--pods-from", "file",
                  "--node", st.node_name, "--json")
        found = json.loads(res.stdout)
        f = stale(found)
        assert res.exit_code == 1 and dead in f["message"] and "blackhole" in f["message"]
        assert any("(hostNetwork pod lab/dns-node)" in e for e in f["evidence"])
        host = [x for x in found if x["code"] == "hostnetwork-hostport"]
        assert host and "lab/dns-node" in host[0]["message"]


def test_trace_summary_flags_the_flow_no_live_pod_answers(tmp_path):
    """The tracer sees the client's datagrams go to the dead IP; the summary says so and points
    to `check`."""
    require_kernel()
    from bpftrace_hostport.analysis.render import render_summary
    from bpftrace_hostport.pods.podlist import read_pod_list
    with blackhole_lab() as (name, st):
        dead = dead_ip(st)
        # 5353 is no pod's hostPort and has no rule any more: watch it by name.
        with tracing("--lab", name, "--timeout", "1", "--host-port", "8000/tcp", "--host-port", "5353/udp") as t:
            assert lab.traffic(name, to=8000, count=3)["answered"] == 3
            time.sleep(2.5)
        rows = [m for m in t.summary["mappings"] if m["host_port"] == 5353]
        assert rows and {m["pod_ip"] for m in rows} == {dead}
        assert rows[0]["flows"] >= 1 and rows[0]["answered"] == 0 and rows[0]["pod_name"] is None
        text = render_summary(t.summary, 100, check_hint=f"sudo bpftrace-hostport check --lab {name}",
                              pods=read_pod_list(str(st.pods_file)))
        flat = " ".join(text.split())
        assert f"hostPort 5353/udp -> {dead}:53:" in flat and "went to an IP no live pod has" in flat
        assert f"  sudo bpftrace-hostport check --lab {name}" in text.splitlines()
        assert all(len(ln) <= 100 for ln in text.splitlines())
        # The offline summary of the capture says it too (the other mapping is named: this one is not).
        capture = tmp_path / "capture.jsonl"
        capture.write_text("".join(json.dumps(r) + "\n" for r in t.records))
        p = cli("summary", str(capture), env=dict(os.environ, COLUMNS="80"))
        flat = " ".join(p.stdout.split())
        assert "went to an IP no live pod has" in flat and "sudo bpftrace-hostport check" in flat
        assert all(len(ln) <= 80 for ln in p.stdout.splitlines())
