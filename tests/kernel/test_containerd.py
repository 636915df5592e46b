"""A containerd lab against the real containerd: `--pods-from cri` names the pods from the runtime
itself, the lab's pod list says what the runtime says, containerd's CNI conventions are the real
ones, and `lab down` cleans up after containerd itself was killed.

The runtime-independent checks (trace, rules, check, scenarios) run on both runtimes through the
`lab_kind` fixture (tests/kernel/conftest.py); this file holds what only a containerd lab has.
"""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from bpftrace_hostport.lab import build as lab
from bpftrace_hostport.lab import containerd
from tests.conftest import require_kernel
from tests.kernel.helpers import cli, tracing, unique
from tests.kernel.test_lab import assert_gone, assert_no_runtime_left

MANIFEST = lab.DEFAULT_MANIFEST.read_text() + """
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: kube-system}
spec:
  containers:
  - name: coredns
    image: coredns
    ports: [{name: dns, containerPort: 53, hostPort: 5353, protocol: UDP}]
  - name: exporter
    image: exporter
    ports: [{name: metrics, containerPort: 9153, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: node-exporter, namespace: monitoring}
spec:
  hostNetwork: true
  containers:
  - name: exporter
    image: node-exporter
    ports: [{name: metrics, containerPort: 9100, hostPort: 9100, protocol: TCP}]
"""


@pytest.fixture(scope="module")
def clab(containerd_kind):
    require_kernel()
    name = unique("ctd")
    lab.down(name)
    before = [d for d in containerd.SHARED_DIRS if os.path.exists(d)]
    st = lab.up(name=name, manifest_text=MANIFEST, **containerd_kind.up_kwargs())
    try:
        yield st
    finally:
        lab.down(name)
        assert_gone(st)
        assert_no_runtime_left(name)
        # containerd 1.6's shim sockets and libcni's cache live outside the lab: the directories
        # a lab created go with the last containerd lab.
        if not any(containerd.ctd_dir(d).exists() for d in lab.STATE_ROOT.iterdir() if d.is_dir()):
            assert [d for d in containerd.SHARED_DIRS if d not in before and os.path.exists(d)] == []


def cri_args(st):
    """Pods from the runtime only: the node's namespace, not --lab (which adds the pod list)."""
    return ["--netns", st.node_netns, "--pods-from", "cri", "--cri-endpoint", containerd.endpoint(st.dir)]


def test_trace_names_pods_from_the_runtime(clab):
    nginx = next(p for p in clab.pods if p.name.startswith("nginx-hostport-"))
    with tracing(*cri_args(clab), "--timeout", "1") as t:
        assert lab.traffic(clab.name, to=8000, count=3)["answered"] == 3
        assert lab.traffic(clab.name, to=5353, proto="udp", count=2)["answered"] == 2
        assert lab.traffic(clab.name, to=9100, count=2)["answered"] == 2
    assert t.returncode == 0, t.stderr
    tcp = [f for f in t.flows if f["host_port"] == 8000]
    assert len(tcp) == 3 and all((f["pod_namespace"], f["pod_name"], f["port_name"], f["pod_ip"]) ==
                                 ("cjweichen", nginx.name, "http", nginx.ips[0]) for f in tcp), tcp
    udp = [f for f in t.flows if f["host_port"] == 5353]
    assert len(udp) == 2 and all((f["pod_name"], f["port_name"]) == ("dns", "dns") for f in udp), udp
    # The hostNetwork sandbox (NamespaceMode NODE) owns the misses on its port.
    row = next(m for m in t.summary["mappings"] if m["host_port"] == 9100)
    assert row["misses"] == 2 and (row["pod_namespace"], row["pod_name"]) == ("monitoring", "node-exporter")


def test_rules_and_check_name_pods_from_the_runtime(clab):
    p = cli("rules", *cri_args(clab), "--json")
    rows = json.loads(p.stdout)
    pods = {(r["host_port"], r["family"]): (r["namespace"], r["pod"], r["port_name"]) for r in rows
            if r.get("family")}
    nginx = next(p.name for p in clab.pods if p.name.startswith("nginx-hostport-"))
    assert pods[(8000, 4)] == pods[(8000, 6)] == ("cjweichen", nginx, "http")
    assert pods[(44300, 4)] == ("cjweichen", nginx, "https")
    assert pods[(5353, 4)] == ("kube-system", "dns", "dns")
    p = cli("check", *cri_args(clab), "--json", check=False)
    found = json.loads(p.stdout)
    assert p.returncode == 0 and [f["code"] for f in found] == ["hostnetwork-hostport"], found
    assert "monitoring/node-exporter" in found[0]["message"]


def test_the_pod_list_says_what_the_runtime_says(clab):
    with containerd.client(clab.dir) as c:
        sandboxes = {s["metadata"]["name"]: s for s in c.list_sandboxes()}
        containers = c.list_containers()
        statuses = {n: c.sandbox_status(s["id"])["status"] for n, s in sandboxes.items()}
    items = {i["metadata"]["name"]: i for i in json.loads(clab.pods_file.read_text())["items"]}
    assert set(items) == set(sandboxes)
    for name, item in items.items():
        sb = sandboxes[name]
        assert item["metadata"]["uid"] == sb["metadata"]["uid"]
        ids = sorted(cs["containerID"] for cs in item["status"]["containerStatuses"])
        assert ids == sorted(f"containerd://{c['id']}" for c in containers if c["podSandboxId"] == sb["id"])
        net = statuses[name].get("network") or {}
        runtime_ips = [ip for ip in [net.get("ip")] + [a["ip"] for a in net.get("additionalIps", [])] if ip]
        if item["spec"]["hostNetwork"]:
            assert statuses[name]["linux"]["namespaces"]["options"]["network"] == "NODE"
            assert [i["ip"] for i in item["status"]["podIPs"]] == [clab.node_ip, clab.node_ip6]
        else:
            assert [i["ip"] for i in item["status"]["podIPs"]] == runtime_ips and len(runtime_ips) == 2


def test_containerd_runs_cni_with_its_own_conventions(clab):
    rules = subprocess.run(["ip", "netns", "exec", clab.node_netns, "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    for pod in clab.pods:
        if pod.host_network:
            assert pod.netns is None
            continue
        # A named namespace per pod (/var/run/netns/cni-<uuid>) and the sandbox id in the rules.
        assert pod.netns.startswith("cni-") and os.path.exists(os.path.join(lab.NETNS_DIR, pod.netns))
        assert f'id: \\"{pod.container_id}\\"' in rules or f'id: "{pod.container_id}"' in rules, rules
    conf = json.loads((containerd.ctd_dir(clab.dir) / "net.d" / "10-bhp.conflist").read_text())
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "portmap"]
    status = cli("lab", "status", "--name", clab.name).stdout
    assert f"CRI endpoint {containerd.endpoint(clab.dir)}" in status


def test_down_after_containerd_was_killed(containerd_kind):
    """containerd killed -9 with its pods up (a crash): `lab down` starts it again, so it finds its
    sandboxes and shims, removes them through CRI, and stops it; nothing is left."""
    require_kernel()
    name = unique("ctk")
    lab.down(name)
    st = lab.up(name=name, ipv6=False, **containerd_kind.up_kwargs())
    pid = json.loads((containerd.ctd_dir(st.dir) / "runtime.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert lab.traffic(name, count=2)["answered"] == 2     # the pods run on without containerd
    pod = st.pods[0]
    cli("lab", "down", "--name", name)
    assert_gone(st)
    assert_no_runtime_left(name)
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert pod.container_id not in rules                   # nothing ever in the root namespace


def test_missing_runtime_is_one_sentence(tmp_path):
    require_kernel()
    for tool in ("ip", "iptables"):                        # what the direct lab needs, and no more:
        os.symlink(shutil.which(tool), tmp_path / tool)   # no containerd, runc or ctr on the PATH
    env = dict(os.environ, PATH=str(tmp_path))
    p = subprocess.run([os.sys.executable, "-m", "bpftrace_hostport", "lab", "up", "--runtime", "containerd",
                        "--name", unique("ctm")], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "apt-get install containerd runc" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_stopped_servers_refuse_while_the_sandbox_and_its_rules_stay(containerd_kind):
    """lab/containerd.stop_servers (what a scenario with a pod whose servers are down uses): TCP is
    reset (ECONNREFUSED), UDP unanswered, the hostPort rules and the pod's namespace stay."""
    require_kernel()
    name = unique("cts")
    lab.down(name)
    st = lab.up(name=name, manifest_text=MANIFEST, ipv6=False, **containerd_kind.up_kwargs())
    try:
        for pod in st.pods:
            if not pod.host_network:
                containerd.stop_servers(st.dir, pod)
        tcp = lab.traffic(name, to=8000, count=2, timeout=1)
        assert tcp["answered"] == 0 and tcp["failed"] == 2 and all("Errno 111" in e for e in tcp["errors"]), tcp
        assert lab.traffic(name, to=5353, proto="udp", count=1, timeout=0.5)["answered"] == 0
        rules = subprocess.run(["ip", "netns", "exec", st.node_netns, "iptables-save", "-t", "nat"],
                               capture_output=True, text=True, check=True).stdout
        assert "--dport 8000" in rules and "--dport 5353" in rules
        assert all(os.path.exists(os.path.join(lab.NETNS_DIR, p.netns)) for p in st.pods if p.netns)
    finally:
        lab.down(name)
    assert_gone(st)
