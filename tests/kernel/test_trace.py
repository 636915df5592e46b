"""The tracer on a real lab: real eBPF programs, real portmap rules, real packets.

One lab (module scope) with the nginx-hostport Deployment, a UDP pod and a hostNetwork pod,
dual-stack, built once for each kind of lab (tests/kernel/conftest.py: the direct CNI runtime and
containerd through CRI). Each test starts `trace` as a user would, sends traffic with `lab traffic`,
stops the tracer with SIGTERM and checks its JSON records against what was sent.
"""
import concurrent.futures
import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import cli, tracing, unique

MANIFEST = (lab.DEFAULT_MANIFEST.read_text() + """
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: kube-system}
spec:
  containers:
  - name: coredns
    image: coredns
    ports: [{name: dns, containerPort: 53, hostPort: 5353, protocol: UDP}]
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
""")


def root_link_names():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def tlab(lab_kind):
    require_kernel()
    name = unique("tr")
    lab.down(name)
    before = root_link_names()
    st = lab.up(name=name, manifest_text=MANIFEST, **lab_kind.up_kwargs())
    try:
        yield st
    finally:
        lab.down(name)
        # Nothing of the lab may be visible in the root namespace, before or after: no link,
        # and not one connection of its traffic in the root namespace's conntrack table.
        assert root_link_names() <= before, "the lab left a link in the root namespace"
        ct = subprocess.run(["conntrack", "-L"], capture_output=True, text=True).stdout
        assert f"10.{st.subnet}." not in ct and f"fd00:{st.subnet}:" not in ct


def nginx(st):
    return next(p for p in st.pods if p.name.startswith("nginx-hostport"))


def test_client_request_yields_one_flow_with_true_tuple(tlab):
    pod = nginx(tlab)
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=8000, count=1, source_port=41234)
    assert res["answered"] == 1
    assert t.returncode == 0, t.stderr
    assert "Tracing hostPort DNAT" in t.stderr
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 1, t.flows
    f = flows[0]
    assert f["proto"] == "tcp" and f["family"] == 4
    assert f["client_ip"] == tlab.clients[0]["ip"] and f["client_port"] == 41234
    assert f["node_ip"] == tlab.node_ip and f["host_port"] == 8000
    assert f["pod_ip"] == pod.ips[0] and f["pod_port"] == 80
    assert f["hook"] == "prerouting"
    assert f["answered"] is True and 0 < f["latency_us"] < 1_000_000
    assert f["masqueraded"] is False and f["snat_ip"] is None
    assert (f["pod_namespace"], f["pod_name"], f["port_name"]) == ("cjweichen", pod.name, "http")
    assert f["packets"] >= 2 and f["bytes"] > 0
    s = t.summary
    assert s["lost_events"] == 0
    m = [m for m in s["mappings"] if m["host_port"] == 8000]
    assert len(m) == 1 and m[0]["flows"] == 1 and m[0]["answered"] == 1
    assert m[0]["pod_name"] == pod.name and m[0]["latency_us"]["p50"] is not None


def test_summary_counts_equal_requests_sent(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        a = lab.traffic(tlab.name, to=8000, count=120, concurrency=8)
        b = lab.traffic(tlab.name, to=44300, count=30, concurrency=3)
    assert a["answered"] == 120 and b["answered"] == 30
    s = t.summary
    by_port = {m["host_port"]: m for m in s["mappings"] if m["family"] == 4}
    assert by_port[8000]["flows"] == 120 and by_port[8000]["answered"] == 120
    assert by_port[44300]["flows"] == 30 and by_port[44300]["port_name"] == "https"
    assert len([f for f in t.flows if f["host_port"] == 8000]) == 120
    assert s["lost_events"] == 0 and s["kernel"]["flows_created"] == 150


def test_node_local_client_is_dnat_in_output(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=8000, count=2, source="node")
    assert res["answered"] == 2
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 2
    assert all(f["hook"] == "output" and f["answered"] for f in flows)
    assert all(f["client_ip"] == tlab.node_ip for f in flows)


def test_localhost_is_masqueraded(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=8000, count=2, source="node", target="localhost")
    assert res["answered"] == 2
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 2
    gw = str(next(ipaddress.ip_network(tlab.pod_cidr).hosts()))   # the cni0 bridge address
    for f in flows:
        assert f["hook"] == "output" and f["client_ip"] == "127.0.0.1" and f["node_ip"] == "127.0.0.1"
        assert f["masqueraded"] is True and f["snat_ip"] == gw, f


def test_hairpin_from_a_pod_is_masqueraded(tlab):
    pod = nginx(tlab)
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=8000, count=2, source="pod")
    assert res["answered"] == 2
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 2 and all(f["masqueraded"] and f["hook"] == "prerouting" for f in flows)
    assert all(f["pod_ip"] == pod.ips[0] for f in flows)


def test_udp(tlab):
    dns = next(p for p in tlab.pods if p.name == "dns")
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=5353, proto="udp", count=5)
    assert res["answered"] == 5
    flows = [f for f in t.flows if f["host_port"] == 5353]
    assert len(flows) == 5
    assert all(f["proto"] == "udp" and f["answered"] and f["pod_ip"] == dns.ips[0] and f["pod_port"] == 53
               and f["pod_name"] == "dns" and f["port_name"] == "dns" for f in flows)


def test_ipv6(tlab):
    pod = nginx(tlab)
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=8000, count=3, family=6)
    assert res["answered"] == 3
    flows = [f for f in t.flows if f["family"] == 6]
    assert len(flows) == 3
    assert all(f["node_ip"] == tlab.node_ip6 and f["pod_ip"] == pod.ips[1] and f["answered"] for f in flows)
    m = [m for m in t.summary["mappings"] if m["family"] == 6]
    assert m and m[0]["flows"] == 3


def test_hostnetwork_port_counts_misses_not_flows(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        res = lab.traffic(tlab.name, to=9100, count=4)
    assert res["answered"] == 4          # the hostNetwork pod's own socket answers
    assert not [f for f in t.flows if f["host_port"] == 9100]
    assert sum(m["count"] for m in t.misses if m["host_port"] == 9100) == 4
    rows = [m for m in t.summary["mappings"] if m["host_port"] == 9100]
    assert rows and rows[0]["misses"] == 4 and rows[0]["pod_ip"] is None
    assert (rows[0]["pod_namespace"], rows[0]["pod_name"], rows[0]["port_name"]) == ("monitoring", "node-exporter", "metrics")


def test_host_port_filter_and_client_filter(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1", "--host-port", "44300") as t:
        lab.traffic(tlab.name, to=8000, count=3)
        lab.traffic(tlab.name, to=44300, count=2)
    assert {f["host_port"] for f in t.flows} == {44300} and len(t.flows) == 2
    with tracing("--lab", tlab.name, "--timeout", "1", "--client", "192.0.2.0/24") as t:
        lab.traffic(tlab.name, to=8000, count=3)
    assert t.flows == []


def test_forward_drop_is_attributed_with_reason(tlab):
    ns = tlab.node_netns
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "DROP"], check=True)
    try:
        with tracing("--lab", tlab.name, "--timeout", "1") as t:
            res = lab.traffic(tlab.name, to=8000, count=2, timeout=1.0)
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "ACCEPT"], check=True)
    assert res["answered"] == 0
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 2
    assert all(not f["answered"] and f["latency_us"] is None and f["drop_reason"] == "NETFILTER_DROP"
               for f in flows), flows
    m = [m for m in t.summary["mappings"] if m["host_port"] == 8000 and m["family"] == 4][0]
    assert m["drops"].get("NETFILTER_DROP", 0) >= 2 and m["answered"] == 0


def test_a_reply_after_the_timeout_neither_starts_a_flow_nor_goes_uncounted(tlab):
    """The pod's SYN-ACK is held back (dropped in the pod) past --timeout: the flow is reported
    unanswered at the timeout, and the client's retransmitted SYN, the late SYN-ACK and the rest
    of the connection add to the mapping's counters without starting a second (midstream) flow."""
    pod = nginx(tlab)
    hold = ["ip", "netns", "exec", pod.netns, "iptables", "-{}", "OUTPUT", "-p", "tcp", "--sport", "80",
            "-j", "DROP"]
    subprocess.run([a.format("A") for a in hold], check=True)
    try:
        with tracing("--lab", tlab.name, "--timeout", "1") as t:
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                fut = ex.submit(lab.traffic, tlab.name, to=8000, count=1, timeout=8.0, source_port=41555)
                time.sleep(2.5)             # claimed after 1 s; the client retransmits its SYN at 1 s, 3 s
                subprocess.run([a.format("D") for a in hold], check=True)
                res = fut.result()
            time.sleep(1.5)
    finally:
        subprocess.run([a.format("D") for a in hold], check=False, capture_output=True)
    assert res["answered"] == 1, res
    mine = [f for f in t.flows if f["client_port"] == 41555]
    assert len(mine) == 1, mine
    assert not mine[0]["answered"] and not mine[0]["midstream"], mine
    m = [m for m in t.summary["mappings"] if m["host_port"] == 8000 and m["family"] == 4][0]
    assert m["flows"] == 1 and m["packets"] > mine[0]["packets"] + 3, (m, mine)


def test_an_address_the_node_gains_while_tracing_is_watched(tlab):
    """The node's addresses are re-read when the kernel announces a change (not dumped every
    second): a hostPort reached through an address added after the start is traced."""
    ns, client = tlab.node_netns, tlab.clients[0]["netns"]
    links = json.loads(subprocess.run(["ip", "-n", ns, "-j", "addr"], capture_output=True, text=True,
                                      check=True).stdout)
    dev, plen = next((ln["ifname"], a["prefixlen"]) for ln in links for a in ln.get("addr_info", [])
                     if a.get("local") == tlab.node_ip)
    new_ip = str(ipaddress.ip_interface(f"{tlab.node_ip}/{plen}").network.network_address + 77)
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{new_ip}/{plen}", "dev", dev], check=True)
        try:
            time.sleep(1.5)                   # the next once-a-second turn sees the change
            got = subprocess.run(
                ["ip", "netns", "exec", client, sys.executable, "-c",
                 "import socket,sys; s=socket.create_connection((sys.argv[1], 8000), 3); "
                 "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(len(s.recv(100)))", new_ip],
                capture_output=True, text=True, timeout=10)
        finally:
            subprocess.run(["ip", "-n", ns, "addr", "del", f"{new_ip}/{plen}", "dev", dev], check=False)
    assert got.returncode == 0 and int(got.stdout) > 0, got.stderr
    mine = [f for f in t.flows if f["node_ip"] == new_ip]
    assert len(mine) == 1 and mine[0]["answered"] and mine[0]["host_port"] == 8000, t.flows


def test_conntrack_backend_sees_the_same_translation(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1", "--backend", "conntrack") as t:
        lab.traffic(tlab.name, to=8000, count=3)
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 3 and all(f["answered"] and f["latency_us"] is None for f in flows)
    assert t.summary["backend"] == "conntrack"


def test_bad_input_is_one_sentence_exit_2(tlab, tmp_path):
    p = cli("trace", "--netns", "no-such-ns-here", "--duration", "1", check=False)
    assert p.returncode == 2 and "No network namespace named 'no-such-ns-here'" in p.stderr
    assert "Traceback" not in p.stderr
    bad = tmp_path / "pods.json"
    bad.write_text("{not json")
    p = cli("trace", "--lab", tlab.name, "--pods", str(bad), "--duration", "1", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli("trace", "--host-port", "70000", "--duration", "1", check=False)
    assert p.returncode == 2 and "out of range" in p.stderr


def test_not_root_is_a_plain_sentence():
    require_kernel()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        os.sys.executable, "-m", "bpftrace_hostport", "trace", "--duration", "1"],
                       capture_output=True, text=True, env=env, cwd="/")
    assert p.returncode == 2, p.stderr
    assert "needs root" in p.stderr and "Traceback" not in p.stderr


def test_capture_survives_kill_9(tlab, tmp_path):
    import signal
    import time
    ready = tmp_path / "ready"
    out = open(tmp_path / "cap.jsonl", "w")
    proc = subprocess.Popen([os.sys.executable, "-m", "bpftrace_hostport", "trace", "--lab", tlab.name,
                             "--format", "json", "--ready-file", str(ready)], stdout=out, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert lab.traffic(tlab.name, to=8000, count=5)["answered"] == 5
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out.close()
    lines = (tmp_path / "cap.jsonl").read_text().splitlines()
    assert len([json.loads(x) for x in lines if '"flow"' in x]) == 5
    p = cli("summary", str(tmp_path / "cap.jsonl"), "--json")
    s = json.loads(p.stdout)
    assert [m["flows"] for m in s["mappings"] if m["host_port"] == 8000] == [5]


def test_reused_client_port_is_a_new_flow_each_time(tlab):
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        for _ in range(3):
            assert lab.traffic(tlab.name, to=8000, count=1, source_port=42424)["answered"] == 1
    flows = [f for f in t.flows if f["client_port"] == 42424]
    assert len(flows) == 3 and all(f["answered"] for f in flows)
    assert t.summary["lost_events"] == 0


def test_a_recycled_conntrack_entry_is_its_new_flow_not_the_old_one(tlab):
    """The kernel remembers reported flows by the address of their conntrack entry. Flushing the
    node's conntrack table frees the entries, and the next connection's entry usually takes the
    same memory (the slab gives back what was freed last): a TCP flow to 8000 and a UDP flow to
    5353 in turn, the table flushed after each, must each be its own answered flow with its own
    pod, never counted into the previous one's mapping."""
    dns, pod = next(p for p in tlab.pods if p.name == "dns"), nginx(tlab)
    flush = ["ip", "netns", "exec", tlab.node_netns, "conntrack", "-F"]
    rounds = 8
    with tracing("--lab", tlab.name, "--timeout", "1") as t:
        for _ in range(rounds):
            assert lab.traffic(tlab.name, to=8000, count=1)["answered"] == 1
            subprocess.run(flush, check=True, capture_output=True)
            assert lab.traffic(tlab.name, to=5353, proto="udp", count=1)["answered"] == 1
            subprocess.run(flush, check=True, capture_output=True)
    tcp = [f for f in t.flows if f["host_port"] == 8000 and f["family"] == 4]
    udp = [f for f in t.flows if f["host_port"] == 5353]
    assert len(tcp) == len(udp) == rounds, t.flows
    assert all(f["answered"] and not f["midstream"] and f["pod_ip"] == pod.ips[0] for f in tcp), tcp
    assert all(f["answered"] and not f["midstream"] and f["pod_ip"] == dns.ips[0] for f in udp), udp
    m = {x["host_port"]: x for x in t.summary["mappings"] if x["family"] == 4}
    assert m[8000]["flows"] == m[5353]["flows"] == rounds, m
    # A UDP exchange is two packets; the mapping has them all, and nothing of the TCP flows.
    assert m[5353]["packets"] == 2 * rounds, m[5353]
    assert t.summary["lost_events"] == 0 and t.summary["kernel"]["reply_without_flow"] == 0


def test_stale_udp_flow_goes_to_the_dead_pod_unanswered(lab_kind):
    require_kernel()
    name = unique("stl")
    lab.down(name)
    st = lab.up(name=name, scenario="stale-udp", ipv6=False, **lab_kind.up_kwargs())
    try:
        dead = next(p for p in st.pods if p.name == "dns-v1")
        with tracing("--lab", name, "--timeout", "1") as t:
            res = lab.traffic(name, to=5353, proto="udp", count=2, timeout=0.3)   # fresh ports: new pod
            time.sleep(2.5)      # the scenario's own client keeps streaming from a fixed port
        assert res["answered"] == 2
        stale = [f for f in t.flows if f["client_port"] == lab.STALE_UDP_SOURCE_PORT]
        assert len(stale) == 1, t.flows
        f = stale[0]
        assert f["pod_ip"] == dead.ips[0] and not f["answered"] and f["packets"] >= 3 and f["midstream"]
        fresh = [f for f in t.flows if f["client_port"] != lab.STALE_UDP_SOURCE_PORT]
        assert len(fresh) == 2 and all(x["answered"] and x["pod_name"] == "dns-v2" for x in fresh)
        assert f["pod_name"] is None       # no live pod has that IP any more
    finally:
        lab.down(name)


def test_run_inside_ip_netns_exec_with_drops(tlab):
    """`ip netns exec NODE bpftrace-hostport trace` (a fresh /sys without tracefs) works too."""
    ns = tlab.node_netns
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "DROP"], check=True)
    try:
        with tracing("--pods", str(tlab.pods_file), "--timeout", "1",
                     prefix=("ip", "netns", "exec", ns)) as t:
            lab.traffic(tlab.name, to=8000, count=1, timeout=0.5)
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "ACCEPT"], check=True)
    assert "drops via skb:kfree_skb" in t.stderr
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 1 and flows[0]["drop_reason"] == "NETFILTER_DROP"
    assert flows[0]["pod_name"].startswith("nginx-hostport-")


def dnat_hits(netns: str, host_port: int) -> int:
    """Packets the node's IPv4 DNAT rules for host_port translated: the first packet of each new
    connection (the nat table sees no other), as the kernel counted them. The nftables portmap's
    rules carry no counters: there a counter of the test's own counts the SYNs that got DNATed
    to the hostPort (count_dnat_syns)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "iptables-save", "-c", "-t", "nat"],
                         capture_output=True, text=True, check=True).stdout
    hits = 0
    for line in out.splitlines():
        if line.startswith("[") and " -j DNAT" in line and f"--dport {host_port} " in line:
            hits += int(line[1:line.index(":")])
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "ip", "bhptest"],
                         capture_output=True, text=True).stdout
    if out:
        for item in json.loads(out)["nftables"]:
            for e in item.get("rule", {}).get("expr", []):
                if "counter" in e:
                    hits += e["counter"]["packets"]
    return hits


def count_dnat_syns(netns: str, pod_port: int) -> None:
    """A counter of the connections DNATed to pod_port, in a table of the test's own in the lab's
    node, for a portmap whose rules count nothing: priority -98 (after DNAT, beside the tracer's
    -99), each conntrack entry counted once (its first packet; the mark keeps the rest out), as
    the nat table's rules count them."""
    nft = ["ip", "netns", "exec", netns, "nft"]
    subprocess.run(nft + ["add", "table", "ip", "bhptest"], check=True)
    subprocess.run(nft + ["add chain ip bhptest pre { type filter hook prerouting priority -98; }"], check=True)
    subprocess.run(nft + [f"add rule ip bhptest pre ct status dnat tcp dport {pod_port} ct state new "
                          "ct mark != 0x4242 counter ct mark set 0x4242"], check=True)


def test_flow_table_overflow_is_counted_as_lost_never_silent(tlab):
    ns = tlab.node_netns
    if tlab.portmap == "nftables":
        count_dnat_syns(ns, 80)
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "DROP"], check=True)
    try:
        with tracing("--lab", tlab.name, "--timeout", "30", "--flow-table", "1024") as t:
            before = dnat_hits(ns, 8000)
            res = lab.traffic(tlab.name, to=8000, count=1500, concurrency=300, timeout=0.5)
            syns = dnat_hits(ns, 8000) - before
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "ACCEPT"], check=True)
        if tlab.portmap == "nftables":
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "bhptest"], check=True)
    assert res["sent"] == 1500 and res["answered"] == 0
    s = t.summary
    flows = [f for f in t.flows if f["host_port"] == 8000]
    created, refused = s["kernel"]["flows_created"], s["kernel"]["flow_insert_errors"]
    # Under load a client may give up (0.5 s, before any retransmission) before its SYN leaves,
    # so the count is the kernel's: every SYN the DNAT rules translated is a new flow, in the
    # table or refused by it (full: 1024 unanswered flows in flight), or a retry of a flow in
    # the table (a client port reused by a later connection while the first is unanswered).
    retries = s["kernel"]["flow_retries"]
    assert syns > 1024 and created + refused + retries == syns, (s["kernel"], syns, res)
    assert created <= 1024 and refused > 0, s["kernel"]
    assert s["lost_events"] >= refused, s["kernel"]
    assert len(flows) + s["lost_events"] == created + refused, (len(flows), s["kernel"])   # reported or counted lost


def test_a_service_dnat_is_not_a_hostport_flow(tlab):
    """A DNAT to a pod from an address that is not the node's (a Service ClusterIP, as kube-proxy
    writes it) is not a hostPort flow: not reported, not counted, while a hostPort request in
    the same session is."""
    ns, pod = tlab.node_netns, nginx(tlab)
    pod_ip = next(ip for ip in pod.ips if ":" not in ip)
    rule = ["-d", "10.96.0.10/32", "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", f"{pod_ip}:80"]
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-I", "PREROUTING", *rule], check=True)
    try:
        with tracing("--lab", tlab.name, "--timeout", "1") as t:
            p = subprocess.run(["ip", "netns", "exec", tlab.clients[0]["netns"], sys.executable, "-m",
                                "bpftrace_hostport.lab.traffic", "--host", "10.96.0.10", "--port", "80",
                                "--proto", "tcp", "--count", "3", "--timeout", "2"],
                               capture_output=True, text=True, check=True)
            assert lab.traffic(tlab.name, to=8000, count=1)["answered"] == 1
        hits = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"],
                              capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-D", "PREROUTING", *rule], check=True)
    assert json.loads(p.stdout.strip().splitlines()[-1])["answered"] == 3      # the Service answered
    assert any("10.96.0.10" in line and int(line.split()[0]) >= 3 for line in hits.splitlines()[2:]), hits
    assert [f["host_port"] for f in t.flows] == [8000], t.flows
    assert t.summary["kernel"]["flows_created"] == 1 and t.summary["kernel"]["flow_retries"] == 0


def test_pod_names_from_the_kubernetes_api(tlab, tmp_path):
    """trace and rules name pods from a (fake, local) API server: list + watch, this node only."""
    from tests.unit.pods.test_sources import FakeAPI, kubeconfig_for
    items = json.loads(tlab.pods_file.read_text())["items"]
    other = json.loads(json.dumps(items[0]))
    other["metadata"]["name"] = "elsewhere"
    other["spec"]["nodeName"] = "another-node"
    api = FakeAPI(items + [other])
    try:
        kc = kubeconfig_for(tmp_path, api.url)
        pod = nginx(tlab)
        with tracing("--netns", tlab.node_netns, "--pods-from", "kube", "--kubeconfig", kc,
                     "--node-name", tlab.node_name, "--timeout", "1") as t:
            assert lab.traffic(tlab.name, to=8000, count=2)["answered"] == 2
        flows = [f for f in t.flows if f["host_port"] == 8000]
        assert len(flows) == 2 and all(f["pod_name"] == pod.name and f["port_name"] == "http" for f in flows)
        assert all(q["fieldSelector"] == [f"spec.nodeName={tlab.node_name}"] for q in api.lists())
        p = cli("rules", "--netns", tlab.node_netns, "--pods-from", "kube", "--json",
                check=False, env=dict(os.environ, KUBECONFIG=kc, NODE_NAME=tlab.node_name))
        assert p.returncode == 0, p.stderr
        rows = [r for r in json.loads(p.stdout) if r["host_port"] == 8000 and r["family"] == 4]
        assert rows and rows[0]["pod"] == pod.name and rows[0]["port_name"] == "http"
    finally:
        api.close()
