"""Two tracers on one node: the agent and an on-call `trace` at once, each seeing every flow.

Netfilter refuses a BPF hook at a priority another hook of the same family and hook already has;
the second tracer takes the next free one after DNAT and says who holds the first. A priority
held by something that is not a tracer (an nftables chain) is said to be that. The pre-flight
checks refuse a busy metrics port before anything is loaded.
"""
import json
import os
import re
import socket
import subprocess
import time

import pytest

from bpftrace_hostport.ebpf import nflink
from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import AgentRun, cli, tracing, unique
from tests.kernel.test_metrics_agent import scrape, total, wait_for


@pytest.fixture(scope="module")
def lab_name():
    require_kernel()
    name = unique("two")
    lab.down(name)
    lab.up(name=name)
    yield name
    lab.down(name)


def _holders(*pids):
    return [h for h in nflink.link_holders() if h.pid in pids]


def test_an_agent_and_a_trace_side_by_side_each_see_every_flow(lab_name):
    with AgentRun(lab_name, "--timeout", "1", "--check-interval", "3600") as agent, \
            tracing("--lab", lab_name, "--timeout", "1") as t:
        sent4 = lab.traffic(lab_name, to=8000, count=20)
        sent6 = lab.traffic(lab_name, to=8000, count=10, family=6)
        s = wait_for(lambda: (lambda x: x if total(x, "bpftrace_hostport_flows_total", host_port="8000") >= 30
                              else None)(scrape(agent.port)))
        held = {}
        for h in _holders(agent.proc.pid, t.proc.pid):
            held.setdefault(h.pid, []).append(h.priority)
    log = agent.logged
    assert agent.proc.returncode == 0 and t.returncode == 0, log
    assert sent4["answered"] == 20 and sent6["answered"] == 10
    # the agent (first) at -99, the trace at -98; each with its own four links
    assert held == {agent.proc.pid: [-99] * 4, t.proc.pid: [-98] * 4}
    assert _holders(agent.proc.pid, t.proc.pid) == []          # both detached
    # each sees every flow
    assert len(t.flows) == 30 and all(f["outcome"] == "answered" for f in t.flows)
    assert total(s, "bpftrace_hostport_flows_total", host_port="8000") == 30
    assert total(s, "bpftrace_hostport_answered_flows_total", host_port="8000") == 30
    # the trace says where it went and why, naming the agent; never an old kernel, no fallback
    banner = next(ln for ln in t.stderr.splitlines() if ln.startswith("Tracing hostPort DNAT"))
    assert (f"at netfilter priority -98, since bpftrace-hostport pid {agent.proc.pid} (agent --lab {lab_name}) "
            "is attached at priority -99") in banner, t.stderr
    assert "netfilter backend" in banner and "Linux >= 6.4" not in t.stderr and "Falling back" not in t.stderr
    # every line of the agent's log is JSON; its stop line agrees with the metrics
    events = [json.loads(ln) for ln in log.splitlines()]
    assert events[0]["event"] == "started" and events[-1]["event"] == "stopped"
    assert any(e["event"] == "tracing" and e["backend"] == "netfilter" for e in events)
    assert events[-1]["flows"] == 30
    assert events[-1]["lost_events"] == total(s, "bpftrace_hostport_lost_events_total") == 0


def test_a_priority_held_by_an_nftables_chain_is_said_to_be_one(lab_name):
    st = lab.LabState.load(lab_name)
    table = unique("bhpprio")
    nft = ["ip", "netns", "exec", st.node_netns, "nft"]
    subprocess.run(nft + ["add", "table", "ip", table], check=True)
    try:
        subprocess.run(nft + ["add chain ip " + table + " pre { type filter hook prerouting priority -99; }"],
                       check=True)
        with tracing("--lab", lab_name, "--timeout", "1") as t:
            lab.traffic(lab_name, to=8000, count=5)
            time.sleep(1.5)
    finally:
        subprocess.run(nft + ["delete", "table", "ip", table], check=True)
    assert t.returncode == 0 and len(t.flows) == 5, t.stderr
    assert ("at netfilter priority -98, since a netfilter hook that is not BPF (an nftables chain or a "
            "kernel module) uses priority -99") in t.stderr


def test_a_busy_metrics_port_is_refused_before_anything_is_loaded(lab_name):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        p = cli("trace", "--lab", lab_name, "--metrics", str(port), "--format", "none", "--duration", "5",
                check=False, env=dict(os.environ, BPFTRACE_HOSTPORT_CACHE_DIR="off"))
        took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == (f"Error: Cannot listen on 127.0.0.1:{port}: address in use; "
                                "choose another --metrics port.")
    assert took < 5            # no compile (the cache is off) and no attach happened first
    # with --log-json the error is one JSON line too
    p = cli("agent", "--lab", lab_name, "--metrics", "x:y", "--log-json", check=False)
    (line,) = p.stderr.strip().splitlines()
    err = json.loads(line)
    assert p.returncode == 2 and err["event"] == "error" and re.match(r"Bad metrics listen address 'x:y'", err["message"])
