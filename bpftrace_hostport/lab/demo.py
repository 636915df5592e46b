"""`lab demo`: the README's main job. Build a lab, trace it, send traffic, summarize, clean up.

The tracer runs as its own process (`trace --lab NAME --format json --ready-file`), exactly
as a user would run it, and is stopped with SIGTERM: what the demo shows is what the command
does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import click

from bpftrace_hostport.addr import endpoint as _ep
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.lab import build as labmod
from bpftrace_hostport.lab.harness import TraceRun
from bpftrace_hostport.analysis.render import render_summary, terminal_width, wrap


def _step(i: int, n: int, text: str) -> None:
    lead = f"[{i}/{n}] "
    lines = wrap(lead + text, terminal_width(), " " * 6)
    click.echo(click.style(lead, bold=True) + lines[0][len(lead):])
    for line in lines[1:]:
        click.echo(line)


def _say(text: str) -> None:
    """A detail line under a step, indented and wrapped to the terminal."""
    click.echo("\n".join(wrap("      " + text, terminal_width(), " " * 8)))


def run_demo(name: str = "demo", keep: bool = False) -> int:
    steps = 7
    t0 = time.monotonic()
    if os.geteuid() != 0:
        raise labmod.LabError("The demo builds network namespaces and loads eBPF: run it with sudo.")
    labmod.down(name)    # a previous demo that was killed leaves nothing in the way
    _step(1, steps, "building a lab node: network namespaces, Debian's CNI plugins "
                    "(bridge, host-local, portmap), the nginx-hostport Deployment's pod, "
                    "and a hostNetwork pod with hostPort 9000")
    st = labmod.up(name=name, scenario="hostnetwork")
    pod = st.pods[0]
    _say(f"node {st.node_ip} (netns {st.node_netns}); pod {pod.namespace}/{pod.name} "
         f"at {', '.join(pod.ips)}; hostPorts 8000->80 (http), 44300->443 (https)")
    try:
        _step(2, steps, "attaching the tracer to the node's netfilter hooks "
                        "(PRE_ROUTING and LOCAL_OUT, just after DNAT)")
        with tempfile.TemporaryDirectory() as tmp:
            run = TraceRun(["--lab", name, "--format", "json", "--timeout", "1"], workdir=tmp)
            try:
                run.start()
            except UserError as e:
                raise labmod.LabError(str(e)) from None
            with run:
                _step(3, steps, "sending real requests through the hostPorts")
                runs = [
                    ("client -> node:8000", dict(to=8000, count=40, concurrency=4)),
                    ("client -> node:44300", dict(to=44300, count=10)),
                    ("node itself -> node:8000 (DNAT in OUTPUT)", dict(to=8000, count=5, source="node")),
                    ("client -> [node IPv6]:8000", dict(to=8000, count=5, family=6)),
                    ("client -> node:9000 (hostNetwork pod: no DNAT, counted as misses)", dict(to=9000, count=5)),
                ]
                for label, kw in runs:
                    r = labmod.traffic(name, **kw)
                    _say(f"{label}: sent {r['sent']}, answered {r['answered']}, failed {r['failed']}")
                time.sleep(0.3)
                _step(4, steps, "detaching the tracer (SIGTERM) and collecting its records")
            records = run.records()
        flows = [r for r in records if r["type"] == "flow"]
        summary = next((r for r in records if r["type"] == "summary"), None)
        _step(5, steps, f"{len(flows)} flows traced; a few of them (times UTC):")
        shown = flows[:3] + [f for f in flows if f["hook"] == "output"][:1] + \
            [f for f in flows if f["family"] == 6][:1]
        for f in shown:
            lat = f"{f['latency_us'] / 1000:.2f} ms" if f["latency_us"] is not None else "unanswered"
            masq = f", masqueraded to {f['snat_ip']}" if f["masqueraded"] else ""
            _say(f"{f['ts'][11:23]} {_ep(f['client_ip'], f['client_port'])} -> {_ep(f['node_ip'], f['host_port'])} "
                 f"became {_ep(f['pod_ip'], f['pod_port'])} ({f['pod_namespace']}/{f['pod_name']}, port "
                 f"{f['port_name']}) via {f['hook']}, answered in {lat}{masq}")
        _step(6, steps, "summary per hostPort mapping:")
        if summary:
            from bpftrace_hostport.pods.podlist import read_pod_list
            click.echo(render_summary(summary, check_hint=f"sudo bpftrace-hostport check --lab {name}",
                                      pods=read_pod_list(str(st.pods_file))))
        _step(7, steps, f"what `bpftrace-hostport check --lab {name}` says about this node:")
        env = dict(os.environ)
        width = terminal_width()
        if width:
            env["COLUMNS"] = str(width)     # check's tables fit the demo's terminal, not a pipe's
        check = subprocess.run([sys.executable, "-m", "bpftrace_hostport", "check", "--lab", name],
                               capture_output=True, text=True, timeout=120, env=env)
        click.echo(check.stdout.rstrip() or check.stderr.rstrip())
    finally:                      # the tracer is stopped by its `with`, whatever happened
        if not keep:
            labmod.down(name)
            click.echo(f"lab {name} removed; demo took {time.monotonic() - t0:.1f} s")
        else:
            click.echo(f"lab {name} left up: `bpftrace-hostport lab down --name {name}` removes it")
    return 0
