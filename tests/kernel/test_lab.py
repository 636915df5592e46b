"""The lab: every scenario comes up with the real CNI plugins, answers, and goes down clean, on
every kind of lab (tests/kernel/conftest.py: the direct CNI runtime and containerd through CRI)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import cli, unique


def netns_with_prefix(prefix):
    names = os.listdir(lab.NETNS_DIR) if os.path.isdir(lab.NETNS_DIR) else []
    return [n for n in names if n.startswith(prefix)]


def assert_gone(st):
    assert netns_with_prefix(f"bhp-{st.name}-") == []
    assert not [p.netns for p in st.pods if p.netns and os.path.exists(os.path.join(lab.NETNS_DIR, p.netns))]
    for pid in [p.server_pid for p in st.pods if p.server_pid] + st.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (lab.STATE_ROOT / st.name).exists()        # state, pod list and IPAM allocations


def nat_rules(st, portmap="iptables"):
    """The portmap plugin's rules on the lab node, as its backend lists them."""
    cmd = (["iptables-save", "-t", "nat"] if portmap == "iptables"
           else ["nft", "list", "table", "ip", "cni_hostport"])
    return subprocess.run(["ip", "netns", "exec", st.node_netns, *cmd],
                          capture_output=True, text=True, check=True).stdout


def dnats_to(rules, port, portmap):
    """How many of the rules DNAT TCP or UDP port PORT."""
    if portmap == "iptables":
        return len(re.findall(rf"--dport {port} -j DNAT", rules))
    return len(re.findall(rf"(?:tcp|udp) dport {port} dnat (?:ip )?to ", rules))


EXPECT = {
    # scenario: (traffic kwargs, expected answered, expected answering pod prefix)
    "basic": (dict(to=8000, count=3), 3, "cjweichen/nginx-hostport-"),
    "hostnetwork": (dict(to=9000, count=3), 3, "lab/hostnet-web"),
    "conflict": (dict(to=8000, count=4), 4, "cjweichen/nginx-hostport-"),   # the first chain wins
    "forward-drop": (dict(to=8000, count=2, timeout=0.5), 0, None),
    "hairpin": (dict(to=8000, count=3, source="pod"), 3, "cjweichen/nginx-hostport-"),
    "localhost": (dict(to=8000, count=3, source="node", target="localhost"), 3, "cjweichen/nginx-hostport-"),
    "stale-udp": (dict(to=5353, proto="udp", count=3, source_port=lab.STALE_UDP_SOURCE_PORT, timeout=0.5), 0, None),
}


@pytest.mark.parametrize("scenario", sorted(EXPECT))
def test_scenario_up_answers_down(scenario, lab_kind):
    require_kernel()
    name = unique("s" + scenario[:3])
    lab.down(name)
    st = lab.up(name=name, scenario=scenario, ipv6=False, **lab_kind.up_kwargs())
    try:
        assert st.complete
        rules = nat_rules(st, lab_kind.portmap)
        if lab_kind.portmap == "iptables":
            assert ":CNI-HOSTPORT-DNAT" in rules and "-A CNI-HOSTPORT-DNAT" in rules
            assert "-j CNI-DN-" in rules and "--to-destination" in rules
        else:
            assert "chain hostports {" in rules and "chain prerouting {" in rules
            assert "fib daddr type local jump hostports_all" in rules
        first = {"stale-udp": 5353, "hostnetwork": 8000}.get(scenario, 8000)
        assert dnats_to(rules, first, lab_kind.portmap) >= 1
        pods = json.loads(st.pods_file.read_text())
        assert pods["kind"] == "List" and pods["items"]
        assert all(i["spec"]["nodeName"] == st.node_name for i in pods["items"])
        kwargs, answered, who = EXPECT[scenario]
        res = lab.traffic(name, **kwargs)
        assert res["answered"] == answered, res
        if who:
            assert all(k.startswith(who) for k in res["by_pod"]), res
        if scenario == "conflict":
            assert dnats_to(rules, 8000, lab_kind.portmap) == 2
        if scenario == "stale-udp":
            # a fresh source port gets the new pod; the long-lived stream is stuck on the dead IP
            fresh = lab.traffic(name, to=5353, proto="udp", count=2)
            assert fresh["answered"] == 2 and list(fresh["by_pod"]) == ["lab/dns-v2"]
            dead = next(p for p in st.pods if p.name == "dns-v1")
            ct = subprocess.run(["ip", "netns", "exec", st.node_netns, "conntrack", "-L", "-p", "udp",
                                 "--orig-port-src", str(lab.STALE_UDP_SOURCE_PORT)],
                                capture_output=True, text=True).stdout
            assert f"src={dead.ips[0]}" in ct
        if scenario == "hostnetwork":
            hn = next(p for p in st.pods if p.host_network)
            assert hn.netns is None and st.node_ip in hn.ips
            assert dnats_to(rules, 9000, lab_kind.portmap) == 0     # no DNAT for hostNetwork
        status = lab.status(name)
        # The direct runtime's pod namespaces are the lab's own; containerd's (cni-*) are its.
        gone = 1 if scenario == "stale-udp" and lab_kind.runtime == "direct" else 0
        assert len(status["namespaces_present"]) == len(st.namespaces) - gone
        assert sorted(status["servers_running"]) == sorted(
            p.name for p in st.pods if p.alive and p.server_pid), status
    finally:
        lab.down(name)
    assert_gone(st)


def _a_pod_is_being_made(name, kind):
    if kind.runtime == "direct":
        return [n for n in netns_with_prefix(f"bhp-{name}-") if "-p" in n[len(name) + 9:]]
    try:                                    # containerd: the sandbox of the first pod is recorded
        state = json.loads((lab.STATE_ROOT / name / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(p.get("container_id") for p in state.get("pods", []))


def test_down_is_idempotent_and_cleans_after_kill_9(lab_kind):
    require_kernel()
    name = unique("kill")
    lab.down(name)
    proc = subprocess.Popen([sys.executable, "-m", "bpftrace_hostport", "lab", "up", "--name", name,
                             "--runtime", lab_kind.runtime],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _a_pod_is_being_made(name, lab_kind):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)            # let it start a pod server, then die mid-build
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert netns_with_prefix(f"bhp-{name}-")
    state = json.loads((lab.STATE_ROOT / name / "state.json").read_text())
    pids = state["pids"] + [p["server_pid"] for p in state["pods"] if p.get("server_pid")]
    pod_netns = [p["netns"] for p in state["pods"] if p.get("netns")]
    cli("lab", "down", "--name", name)
    assert netns_with_prefix(f"bhp-{name}-") == []
    assert [ns for ns in pod_netns if os.path.exists(os.path.join(lab.NETNS_DIR, ns))] == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert_no_runtime_left(name)
    cli("lab", "down", "--name", name)          # again: nothing to do, still fine
    assert not (lab.STATE_ROOT / name).exists()


def assert_no_runtime_left(name):
    """No process names the lab's directory (containerd, its shims) and nothing is mounted in it."""
    lab_dir = str(lab.STATE_ROOT / name)
    procs = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if lab_dir.encode() + b"/" in f.read():
                        procs.append(int(d))
            except OSError:
                pass
    assert procs == []
    with open("/proc/self/mountinfo") as f:
        assert [ln for ln in f if f" {lab_dir}/" in ln] == []


def test_bad_input_leaves_nothing(tmp_path):
    require_kernel()
    name = unique("bad")
    cases = {
        "notyaml.yaml": "kind: Pod\n  metadata: [\n",
        "nocontainers.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n",
        "range.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - name: a\n    image: a\n    ports: [{containerPort: 80, hostPort: 70000}]\n",
        "proto.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - name: a\n    image: a\n    ports: [{containerPort: 80, hostPort: 8000, protocol: ICMP}]\n",
    }
    for fname, text in cases.items():
        f = tmp_path / fname
        f.write_text(text)
        p = cli("lab", "up", str(f), "--name", name, check=False)
        assert p.returncode == 2, (fname, p.stderr)
        assert p.stderr.startswith("Error: ") and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert netns_with_prefix(f"bhp-{name}-") == []
        assert not (lab.STATE_ROOT / name).exists()
    p = cli("lab", "up", str(tmp_path / "missing.yaml"), "--name", name, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_name_clash_and_missing_plugins(tmp_path):
    require_kernel()
    name = unique("clash")
    lab.down(name)
    st = lab.up(name=name, ipv6=False)
    try:
        p = cli("lab", "up", "--name", name, check=False)
        assert p.returncode == 2 and "already up" in p.stderr
        env = dict(os.environ, CNI_PATH=str(tmp_path))
        p = cli("lab", "up", "--name", name + "x", check=False, env=env)
        assert p.returncode == 2 and "CNI plugins" in p.stderr and "containernetworking-plugins" in p.stderr
    finally:
        lab.down(name)
    assert_gone(st)


def test_labs_side_by_side_and_status():
    require_kernel()
    a, b = unique("sa"), unique("sb")
    sa = lab.up(name=a, ipv6=False)
    try:
        sb = lab.up(name=b, ipv6=False)
        try:
            assert sa.subnet != sb.subnet and sa.node_netns != sb.node_netns
            assert {a, b} <= set(lab.list_labs())
            p = cli("lab", "status", "--name", a, "--json")
            assert json.loads(p.stdout)["node_netns"] == sa.node_netns
            assert lab.traffic(a, count=2)["answered"] == 2 and lab.traffic(b, count=2)["answered"] == 2
        finally:
            lab.down(b)
    finally:
        lab.down(a)
    assert_gone(sa)


def test_demo_end_to_end():
    require_kernel()
    name = unique("demo")
    p = cli("lab", "demo", "--name", name, timeout=180)
    out = p.stdout
    assert "[1/7]" in out and "[7/7]" in out and "hostnetwork-hostport" in out
    assert "became" in out and "cjweichen/nginx-hostport-" in out
    assert "tcp :8000" in out and "lost flow" in out
    assert netns_with_prefix(f"bhp-{name}-") == []


def test_vagrantfile_validates():
    vagrant = shutil.which("vagrant")
    if not vagrant:
        pytest.skip("vagrant is not installed (Debian's `vagrant` package)")
    root = os.path.join(os.path.dirname(__file__), "..", "..", "vagrant")
    # No hypervisor here: validate the configuration itself, provider blocks ignored.
    env = dict(os.environ, VAGRANT_DEFAULT_PROVIDER="docker")
    p = subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=root, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
