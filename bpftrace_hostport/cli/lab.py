"""`lab`: a Kubernetes-like node in network namespaces, built with the real CNI plugins."""
from __future__ import annotations

import json
import os
import sys

import click

from bpftrace_hostport.cli.options import Fail, user_errors
from bpftrace_hostport.lab import PORTMAP_BACKENDS, SCENARIOS

@click.group()
def lab():
    """A Kubernetes-like node in network namespaces, built with the real CNI plugins."""


@lab.command("up")
@click.argument("manifests", nargs=-1, type=click.Path())
@click.option("--name", default="lab", show_default=True, help="Lab name (several labs can run side by side).")
@click.option("--scenario", type=click.Choice(SCENARIOS), default="basic", show_default=True)
@click.option("--clients", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--no-ipv6", is_flag=True, help="IPv4 only.")
@click.option("--runtime", type=click.Choice(["direct", "containerd"]), default="direct", show_default=True,
              help="Who makes the pods: the CNI plugins run by hand (direct), or a containerd of the "
                   "lab's own through CRI.")
@click.option("--portmap", type=click.Choice(PORTMAP_BACKENDS), default="iptables", show_default=True,
              help="The portmap plugin's backend (nftables: fetches a plugins build that has it, once).")
@click.option("--services", type=click.IntRange(0, 100_000), default=None,
              help="kube-proxy Services to generate (--scenario kube-proxy; default 2000).")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def lab_up(manifests, name, scenario, clients, no_ipv6, runtime, portmap, services, as_json):
    """Build a lab node with a pod per replica of MANIFESTS (default: nginx-hostport).

    \b
    Examples:
      sudo bpftrace-hostport lab up
      sudo bpftrace-hostport lab up my-daemonset.yaml --name ds --scenario hostnetwork
      sudo bpftrace-hostport lab up --runtime containerd --name ctd
      sudo bpftrace-hostport lab up --portmap nftables --scenario refused
      sudo bpftrace-hostport lab up --scenario kube-proxy --services 10000
    """
    from bpftrace_hostport.lab import build as labmod
    notes: list = []
    st = labmod.up(manifests, name=name, scenario=scenario, clients=clients, ipv6=not no_ipv6, notes=notes,
                   runtime=runtime, portmap=portmap, services=services)
    for n in notes:
        click.echo(f"warning: {n}", err=True)
    s = st.summary()
    click.echo(json.dumps(s, indent=2) if as_json else _lab_text(s))


def _lab_text(s: dict) -> str:
    lines = [f"lab {s['name']} ({s['scenario']}, portmap {s.get('portmap', 'iptables')}): node {s['node']} in netns {s['node_netns']}, "
             f"IP {s['node_ip']}" + (f" / {s['node_ip6']}" if s.get("node_ip6") else ""),
             f"  pod list: {s['pods_file']}"]
    if s.get("cri_endpoint"):
        lines.append(f"  runtime: containerd, CRI endpoint {s['cri_endpoint']}")
    for c in s["clients"]:
        lines.append(f"  client {c['netns']}: {c['ip']}" + (f" / {c['ip6']}" if c.get("ip6") else ""))
    for p in s["pods"]:
        state = "" if p.get("alive", True) else " (deleted)"
        hn = " hostNetwork" if p["host_network"] else ""
        lines.append(f"  pod {p['namespace']}/{p['name']}{hn}{state}: {', '.join(p['ips']) or '-'}")
        for m in p["mappings"]:
            lines.append(f"    {m['host_port']}/{m['protocol'].lower()} -> {m['container_port']}"
                         f"{' (' + m['name'] + ')' if m.get('name') else ''}")
    return "\n".join(lines)


@lab.command("down")
@click.option("--name", default="lab", show_default=True)
@click.option("--all", "all_labs", is_flag=True, help="Every lab on this machine.")
@user_errors
def lab_down(name, all_labs):
    """Remove a lab: CNI DEL, servers, namespaces (idempotent; also after a crash).

    \b
    Example:
      sudo bpftrace-hostport lab down --name demo
    """
    from bpftrace_hostport.lab import build as labmod
    if os.geteuid() != 0:
        raise Fail("The lab needs root: run it with sudo.")
    names = labmod.list_labs() if all_labs else [name]
    for n in names:
        removed = labmod.down(n)
        click.echo(f"lab {n}: removed {len(removed)} namespaces")


@lab.command("status")
@click.option("--name", default=None, help="One lab (default: list them all).")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def lab_status(name, as_json):
    """Show the labs that are up (a line each: scenario, runtime, node, pods), or one lab in detail.

    \b
    Examples:
      bpftrace-hostport lab status
      bpftrace-hostport lab status --name demo
    """
    from bpftrace_hostport.lab import build as labmod
    if name is None:
        names = labmod.list_labs()
        if as_json:
            click.echo(json.dumps(names))
        elif not names:
            click.echo("no lab is up")
        else:
            click.echo(_labs_table([_lab_row(labmod, n) for n in names]), nl=False)
        return
    s = labmod.status(name)
    click.echo(json.dumps(s, indent=2) if as_json else _lab_text(s) +
               f"\n  namespaces present: {len(s['namespaces_present'])}, servers running: {len(s['servers_running'])}")


def _lab_row(labmod, name: str) -> list:
    """A lab as a row of `lab status`: what it is, where its node is, how many pods run."""
    try:
        s = labmod.status(name)
    except labmod.LabError:
        return [name, "-", "-", "-", "-", f"left over: remove it with `bpftrace-hostport lab down --name {name}`"]
    except (TypeError, ValueError, KeyError):         # a state file this version does not know
        return [name, "-", "-", "-", "-", "made by another version of bpftrace-hostport"]
    pods = [p for p in s["pods"] if p.get("alive", True)]
    runtime = s.get("runtime") or "direct"
    state = "up" if s["complete"] else f"incomplete: `bpftrace-hostport lab down --name {name}` removes it"
    serving = f" ({len(s['servers_running'])} serving)" if runtime == "direct" else ""
    return [name, s["scenario"], runtime, s["node_ip"] + (f" {s['node_ip6']}" if s.get("node_ip6") else ""),
            f"{len(pods)}{serving}", state]


def _labs_table(rows: list) -> str:
    from bpftrace_hostport.analysis.render import render_table, terminal_width
    return render_table(("LAB", "SCENARIO", "RUNTIME", "NODE", "PODS", "STATE"), rows, terminal_width(),
                        record="lab")


@lab.command("traffic")
@click.option("--name", default="lab", show_default=True)
@click.option("--to", "to", type=click.IntRange(1, 65535), help="hostPort (default: the first mapping).")
@click.option("--proto", type=click.Choice(["tcp", "udp"]))
@click.option("--count", type=click.IntRange(1, 1_000_000), default=10, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0), default=0, help="Requests per second (0: as fast as possible).")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--from", "source", type=click.Choice(["client", "node", "pod"]), default="client", show_default=True)
@click.option("--target", type=click.Choice(["node", "localhost"]), default=None,
              help="Address to call: the node's IP, or localhost (only --from node).")
@click.option("--ipv6", is_flag=True, help="Use the node's IPv6 address.")
@click.option("--source-port", type=click.IntRange(1, 65535), help="Fixed client source port.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def lab_traffic(name, to, proto, count, rate, concurrency, source, target, ipv6, source_port, as_json):
    """Send real requests through a hostPort and count the answers.

    \b
    Examples:
      sudo bpftrace-hostport lab traffic --count 100 --concurrency 8
      sudo bpftrace-hostport lab traffic --to 5353 --proto udp --from node
    """
    from bpftrace_hostport.lab import build as labmod
    if os.geteuid() != 0:
        raise Fail("Sending lab traffic enters the lab's network namespaces: run it with sudo.")
    res = labmod.traffic(name, to=to, count=count, rate=rate, concurrency=concurrency, source=source,
                         proto=proto, family=6 if ipv6 else 4, target=target, source_port=source_port)
    if as_json:
        click.echo(json.dumps(res))
    else:
        pods = ", ".join(f"{k}: {v}" for k, v in res["by_pod"].items()) or "-"
        click.echo(f"{res['from']} -> {res['to']}: sent {res['sent']}, answered {res['answered']}, "
                   f"failed {res['failed']} in {res['elapsed_s']} s; answered by {pods}")
    if res["answered"] == 0:
        raise Fail(f"None of the {res['sent']} requests to {res['to']} was answered: see "
                   f"`bpftrace-hostport check --lab {name}`.")


@lab.command("demo")
@click.option("--name", default="demo", show_default=True)
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
@user_errors
def lab_demo(name, keep):
    """Up, trace, traffic, summary, down: the whole story in under a minute.

    \b
    Example:
      sudo bpftrace-hostport lab demo
    """
    from bpftrace_hostport.lab import build as labmod
    from bpftrace_hostport.lab.demo import run_demo
    if name in labmod.list_labs():
        raise Fail(f"A lab named {name!r} is up (perhaps a demo that was killed): the demo will not "
                   f"take it over. Remove it with `bpftrace-hostport lab down --name {name}` or "
                   "pick another --name.")
    sys.exit(run_demo(name, keep))




COMMANDS = [lab]
