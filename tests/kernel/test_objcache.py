"""The compile cache on a real kernel: a first start compiles and stores the programs, the next
one loads them without bcc, and both trace the same traffic the same way.

Each test has its own empty cache directory (BPFTRACE_HOSTPORT_CACHE_DIR), so nothing here
depends on what /var/cache holds.
"""
import json
import os
import subprocess

import pytest

from bpftrace_hostport.ebpf import objcache
from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import tracing, unique


@pytest.fixture(scope="module")
def clab():
    require_kernel()
    name = unique("oc")
    lab.down(name)
    st = lab.up(name=name)
    try:
        yield st
    finally:
        lab.down(name)


def entries(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".json"))


def flow_facts(t):
    keep = ("proto", "family", "client_ip", "host_port", "node_ip", "pod_ip", "pod_port", "hook",
            "answered", "drop_reason", "pod_name", "masqueraded")
    return sorted(tuple(f[k] for k in keep) for f in t.flows if f["host_port"] == 8000)


def traced_run(st, env):
    """One trace: three answered requests, then one the node's FORWARD policy drops."""
    ns = st.node_netns
    with tracing("--lab", st.name, "--timeout", "1", env=env) as t:
        res = lab.traffic(st.name, to=8000, count=3)
        subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "DROP"], check=True)
        try:
            lab.traffic(st.name, to=8000, count=1, timeout=0.5)
        finally:
            subprocess.run(["ip", "netns", "exec", ns, "iptables", "-P", "FORWARD", "ACCEPT"], check=True)
    assert res["answered"] == 3
    assert t.returncode == 0, t.stderr
    return t


def test_first_start_compiles_and_stores_the_second_loads_from_the_cache(clab, tmp_path):
    d = tmp_path / "cache"
    env = dict(os.environ, BPFTRACE_HOSTPORT_CACHE_DIR=str(d))
    first = traced_run(clab, env)
    assert "from the compile cache" not in first.stderr
    assert "drops via skb:kfree_skb" in first.stderr
    assert (d.stat().st_mode & 0o777) == 0o700
    stored = entries(d)
    assert len(stored) == 1
    mtime = os.stat(d / stored[0]).st_mtime_ns

    second = traced_run(clab, env)
    assert "drops via skb:kfree_skb; eBPF programs from the compile cache" in second.stderr
    assert entries(d) == stored                      # a hit writes no new entry
    assert os.stat(d / stored[0]).st_mtime_ns >= mtime

    a, b = flow_facts(first), flow_facts(second)
    assert a == b
    assert len(a) == 4
    answered = [f for f in first.flows if f["host_port"] == 8000 and f["answered"]]
    dropped = [f for f in first.flows if f["host_port"] == 8000 and not f["answered"]]
    assert len(answered) == 3
    assert [f["drop_reason"] for f in dropped] == ["NETFILTER_DROP"]      # the drop, via the tracepoint
    for t in (first, second):
        s = t.summary
        assert s["lost_events"] == 0 and s["kernel"]["flows_created"] == 4


def test_cache_off_compiles_every_time(clab, tmp_path):
    env = dict(os.environ, BPFTRACE_HOSTPORT_CACHE_DIR="off")
    with tracing("--lab", clab.name, "--timeout", "1", env=env) as t:
        lab.traffic(clab.name, to=8000, count=1)
    assert "from the compile cache" not in t.stderr
    assert len([f for f in t.flows if f["host_port"] == 8000]) == 1


# -- in this process: Probe itself, with the compile child forbidden on a hit ----------------------
def probe(monkeypatch, d, forbid_child=False):
    from bpftrace_hostport.collect.netfilter import probe as probe_mod
    monkeypatch.setenv(objcache.ENV, str(d))
    if forbid_child:
        def no_child(*a, **k):
            raise AssertionError("a compile child ran on a cache hit")
        monkeypatch.setattr(probe_mod.subprocess, "Popen", no_child)
    return probe_mod.Probe(probe_mod.ProbeOptions())


def test_hit_runs_no_compile_child_and_imports_no_bcc(monkeypatch, tmp_path):
    require_kernel()
    with probe(monkeypatch, tmp_path) as p:
        assert (p.cache, p.loaded_from_cache) == ("miss", False)
        miss_fds = len(p.fds)
    monkeypatch.delitem(__import__("sys").modules, "bcc", raising=False)
    with probe(monkeypatch, tmp_path, forbid_child=True) as p:
        assert (p.cache, p.loaded_from_cache) == ("hit", True)
        assert len(p.fds) == miss_fds
        assert "bcc" not in __import__("sys").modules
        # the maps work as after a compile
        p.configure()
        assert p.read_stats()["flows_created"] == 0
        assert p.maps["events"].type == 27 and p.drops_enabled


def test_entry_the_kernel_refuses_is_replaced_by_a_compile(monkeypatch, tmp_path):
    require_kernel()
    with probe(monkeypatch, tmp_path):
        pass
    (name,) = entries(tmp_path)
    path = tmp_path / name
    e = json.loads(path.read_text())
    e["progs"][0]["insns"] = "lQAAAAAAAAA="       # a lone `exit` without r0 set: the verifier refuses it
    e["digest"] = objcache._digest(e)
    path.write_text(json.dumps(e))
    with probe(monkeypatch, tmp_path) as p:
        assert (p.cache, p.loaded_from_cache) == ("miss", False)
    assert json.loads(path.read_text())["digest"] != e["digest"]         # rewritten by the compile
    with probe(monkeypatch, tmp_path, forbid_child=True) as p:
        assert p.loaded_from_cache


def test_truncated_entry_is_a_miss_and_replaced(monkeypatch, tmp_path):
    require_kernel()
    with probe(monkeypatch, tmp_path):
        pass
    (name,) = entries(tmp_path)
    raw = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(raw[:1000])
    with probe(monkeypatch, tmp_path) as p:
        assert not p.loaded_from_cache
    assert (tmp_path / name).read_bytes() == raw
    with probe(monkeypatch, tmp_path, forbid_child=True) as p:
        assert p.loaded_from_cache


def test_untrusted_dir_is_ignored(monkeypatch, tmp_path):
    require_kernel()
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with probe(monkeypatch, d) as p:
        assert (p.cache, p.loaded_from_cache) == ("off", False)
    assert entries(d) == []
