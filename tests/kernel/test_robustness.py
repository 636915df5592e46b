"""Faults while tracing: signals, kill -9, a deleted namespace, pods that change, a full disk.

Each test looks at the kernel's own view where it matters (`bpftool link show`): a tracer,
however it ends, leaves no netfilter link behind.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from bpftrace_hostport.lab.harness import TraceRun
from tests.kernel.helpers import tracing, unique

PY = sys.executable


def link_ids() -> set:
    """Every BPF link on the machine, as the kernel lists them."""
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True).stdout
    return {link["id"] for link in json.loads(out or "[]")}


def tracer_links(pid: int) -> set:
    """The netfilter links a tracer process holds (from its descriptors' fdinfo), so that other
    tracers on the machine (a bench, another test) do not count."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = open(f"/proc/{pid}/fdinfo/{fd}").read()
        except OSError:
            continue
        if "link_type:\tnetfilter" in info:
            ids.add(int(info.split("link_id:", 1)[1].split()[0]))
    return ids


@pytest.fixture(scope="module")
def rlab():
    require_kernel()
    name = unique("rob")
    lab.down(name)
    st = lab.up(name=name, scenario="basic")
    try:
        yield st
    finally:
        lab.down(name)


def _start(args, tmp):
    """A started trace (lab/harness.py) writing into tmp/out and tmp/err."""
    return TraceRun(args, workdir=str(tmp)).start()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_detach_flush_and_summarize(rlab, sig, tmp_path):
    from bpftrace_hostport.records.reader import load
    rec = str(tmp_path / "rec.arrow")
    run = _start(["--lab", rlab.name, "--format", "json", "--record", rec], tmp_path)
    links = tracer_links(run.pid)
    assert len(links) == 2 * 2 and links <= link_ids()    # PRE_ROUTING, LOCAL_OUT; IPv4, IPv6
    lab.traffic(rlab.name, to=8000, count=6)
    assert run.stop(sig) == 0
    assert not links & link_ids(), "a netfilter link outlived the tracer"
    lines = [json.loads(x) for x in open(tmp_path / "out") if x.strip()]
    assert lines[0]["type"] == "capture" and lines[-1]["type"] == "summary"
    assert len([r for r in lines if r["type"] == "flow"]) == 6
    cap = load([rec])
    assert not cap.truncated and len(cap.flows) == 6 and cap.summaries


def test_kill_9_leaves_no_hook_and_the_next_run_starts_cleanly(rlab, tmp_path):
    from bpftrace_hostport.records.reader import load
    rec = str(tmp_path / "rec.arrow")
    run = _start(["--lab", rlab.name, "--format", "none", "--record", rec], tmp_path)
    links = tracer_links(run.pid)
    lab.traffic(rlab.name, to=8000, count=5)
    time.sleep(1.5)                      # more than a second: what it saw is in the file
    run.stop(signal.SIGKILL)
    assert links and not links & link_ids(), "kill -9 left a netfilter link behind"
    cap = load([rec])
    assert cap.truncated and len(cap.flows) == 5
    assert any("end marker" in n or "torn" in n for n in cap.notes), cap.notes
    with tracing("--lab", rlab.name, "--timeout", "1") as t:
        lab.traffic(rlab.name, to=8000, count=3)
    assert t.returncode == 0 and len(t.flows) == 3


def test_pods_renamed_while_tracing_are_named_anew(rlab, tmp_path):
    pods = tmp_path / "pods.json"
    shutil.copy(rlab.pods_file, pods)
    nginx = next(p for p in rlab.pods if p.name.startswith("nginx-hostport"))
    with tracing("--netns", rlab.node_netns, "--pods", str(pods), "--timeout", "1") as t:
        lab.traffic(rlab.name, to=8000, count=2)
        time.sleep(0.3)
        pods.write_text(pods.read_text().replace(nginx.name, "nginx-replacement-0"))
        time.sleep(1.5)                  # the resolver refreshes once a second
        lab.traffic(rlab.name, to=8000, count=2)
    names = [f["pod_name"] for f in t.flows if f["host_port"] == 8000]
    assert names[:2] == [nginx.name] * 2 and names[2:] == ["nginx-replacement-0"] * 2, names


def test_deleted_namespace_ends_tracing_with_the_summary(tmp_path):
    require_kernel()
    name = unique("del")
    lab.down(name)
    st = lab.up(name=name, scenario="basic")
    try:
        run = _start(["--lab", name, "--format", "json"], tmp_path)
        links = tracer_links(run.pid)
        lab.traffic(name, to=8000, count=3)
        time.sleep(0.3)
        subprocess.run(["ip", "netns", "del", st.node_netns], check=True)
        rc = run.proc.wait(30)
    finally:
        lab.down(name)
    err = open(tmp_path / "err").read()
    lines = [json.loads(x) for x in open(tmp_path / "out") if x.strip()]
    assert rc == 0 and "was deleted: tracing ended" in err, err
    assert lines[-1]["type"] == "summary" and lines[-1]["flows"] == 3
    assert links and not links & link_ids()


def test_full_disk_ends_with_a_clear_message_and_a_readable_recording(rlab, tmp_path):
    """A 256 KiB tmpfs in a private mount namespace (the root namespace's mounts are untouched)."""
    from bpftrace_hostport.records.reader import load
    out = tmp_path / "out"
    out.mkdir()
    ready = tmp_path / "ready"
    script = (f"mkdir -p /mnt/bhp && mount -t tmpfs -o size=256k none /mnt/bhp && "
              f"{PY} -m bpftrace_hostport trace --lab {rlab.name} --format none --timeout 1 "
              f"--record /mnt/bhp/rec.arrow --ready-file {ready} 2>{tmp_path}/err; "
              f"echo $? > {out}/rc; cp /mnt/bhp/rec.arrow {out}/")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "err").read()
        time.sleep(0.05)
    sent = 0
    while proc.poll() is None and sent < 20000:
        sent += lab.traffic(rlab.name, to=8000, count=500, concurrency=8)["sent"]
    if proc.poll() is None:
        os.kill(int(ready.read_text()), signal.SIGTERM)
    proc.wait(60)
    err = open(tmp_path / "err").read()
    assert (out / "rc").read_text().strip() == "2", err
    assert "full" in err and "Traceback" not in err, err
    cap = load([str(out / "rec.arrow")])
    assert len(cap.flows) > 0 and cap.truncated


def _cli(*args, user=None):
    pre = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"] if user else []
    return subprocess.run([*pre, PY, "-m", "bpftrace_hostport", *args], capture_output=True, text=True,
                          timeout=120, cwd=os.getcwd(), env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_lab_commands_refuse_and_fail_plainly(rlab):
    p = _cli("lab", "demo", "--name", rlab.name)
    assert p.returncode == 2 and "is up" in p.stderr and rlab.name in lab.list_labs(), p.stderr
    p = _cli("lab", "traffic", "--name", rlab.name, "--count", "1", user=65534)
    assert p.returncode == 2 and "sudo" in p.stderr and "Traceback" not in p.stderr, p.stderr
    name = unique("fwd")
    lab.down(name)
    lab.up(name=name, scenario="forward-drop", ipv6=False)
    try:
        p = _cli("lab", "traffic", "--name", name, "--to", "8000", "--count", "2")
    finally:
        lab.down(name)
    assert p.returncode != 0 and "answered 0" in p.stdout and "check --lab" in p.stderr, (p.stdout, p.stderr)


def test_kubernetes_api_going_away_and_coming_back(rlab, tmp_path):
    """The tracer keeps tracing (with the names it had) while the API server is down, and takes
    the pods it lists once it is back."""
    from tests.unit.pods.test_sources import FakeAPI, kubeconfig_for
    items = json.loads(rlab.pods_file.read_text())["items"]
    nginx = next(p for p in rlab.pods if p.name.startswith("nginx-hostport"))
    api = FakeAPI(items)
    port = api.port
    kc = kubeconfig_for(tmp_path, api.url)
    with tracing("--netns", rlab.node_netns, "--pods-from", "kube", "--kubeconfig", kc,
                 "--node-name", rlab.node_name, "--timeout", "1") as t:
        lab.traffic(rlab.name, to=8000, count=1)
        api.close()
        time.sleep(1.5)
        lab.traffic(rlab.name, to=8000, count=1)          # API down: the last names still hold
        renamed = json.loads(json.dumps(items).replace(nginx.name, "nginx-after-restart"))
        api = FakeAPI(renamed, port=port)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not api.lists():
                time.sleep(0.2)
            time.sleep(1.5)
            lab.traffic(rlab.name, to=8000, count=1)
        finally:
            api.close()
    names = [f["pod_name"] for f in t.flows if f["host_port"] == 8000]
    assert t.returncode == 0, t.stderr
    assert names == [nginx.name, nginx.name, "nginx-after-restart"], (names, t.stderr)


@pytest.mark.parametrize("args", [
    ("trace", "--duration", "1"), ("agent",), ("rules",), ("check",), ("lab", "up", "--name", "np"),
    ("lab", "traffic", "--name", "np"), ("lab", "demo", "--name", "npdemo"),
])
def test_every_privileged_command_refuses_plainly_without_root(args):
    require_kernel()
    p = _cli(*args, user=65534)
    assert p.returncode == 2, (args, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and ("sudo" in lines[0] or "root" in lines[0]), lines


def test_portmap_rules_flushed_and_restored_while_tracing(rlab):
    """Rules gone: the hostPort is not DNATed (misses); rules back: flows again, same tracer."""
    ns = ["ip", "netns", "exec", rlab.node_netns]
    saved = subprocess.run([*ns, "iptables-save", "-t", "nat"], capture_output=True, text=True,
                           check=True).stdout
    with tracing("--lab", rlab.name, "--timeout", "1", "--host-port", "8000") as t:
        lab.traffic(rlab.name, to=8000, count=2)
        subprocess.run([*ns, "iptables", "-t", "nat", "-F", "CNI-HOSTPORT-DNAT"], check=True)
        subprocess.run([*ns, "conntrack", "-F"], capture_output=True)
        lab.traffic(rlab.name, to=8000, count=3, timeout=0.5)
        subprocess.run([*ns, "iptables-restore", "-T", "nat"], input=saved, text=True, check=True)
        time.sleep(0.2)
        lab.traffic(rlab.name, to=8000, count=2)
    flows = [f for f in t.flows if f["host_port"] == 8000]
    assert len(flows) == 4 and all(f["answered"] for f in flows), flows
    assert sum(m["count"] for m in t.misses if m["host_port"] == 8000) == 3


def test_tracefs_unavailable_traces_without_drops(rlab, tmp_path):
    """tracefs hidden and not mountable (a private mount namespace; no `mount` on PATH)."""
    out = tmp_path / "out.jsonl"
    ready = tmp_path / "ready"
    script = (f"mount -t tmpfs -o ro none /sys/kernel/tracing && PATH=/nonexistent "
              f"{PY} -m bpftrace_hostport trace --lab {rlab.name} --format json --no-rules "
              f"--timeout 1 --ready-file {ready} > {out} 2> {tmp_path}/err")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "err").read()
        time.sleep(0.05)
    lab.traffic(rlab.name, to=8000, count=3)
    os.kill(int(ready.read_text()), signal.SIGTERM)
    assert proc.wait(30) == 0
    err = open(tmp_path / "err").read()
    flows = [r for r in map(json.loads, open(out)) if r["type"] == "flow"]
    assert "tracefs is not available" in err and len(flows) == 3, err
