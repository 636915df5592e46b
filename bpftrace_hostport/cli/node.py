"""`rules` and `check`: the node's hostPort mappings with their pods, and what is wrong with them.


"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

import click

from bpftrace_hostport.cli.options import lab_target, pod_options, pods_from_default, user_errors
from bpftrace_hostport.errors import UserError

def _pod_source(pod_files: Sequence[str], pods_from: str, netns: Optional[str],
                node_name: Optional[str], kubeconfig: Optional[str] = None) -> Tuple[Any, bool, List[str]]:
    """(pods object for nodeview.gather, pods_known, notes). "none" asks no live source."""
    from bpftrace_hostport.pods.sources import Resolver, resolve_sources
    sources, notes = resolve_sources(list(pod_files), pods_from=pods_from, netns=netns,
                                     node_name=node_name, kubeconfig=kubeconfig)
    if not sources:
        return None, False, list(notes)
    # CNI state names pods after the very rules being checked (and keeps the IPs of pods whose
    # DEL never ran), so it names pods but cannot tell a live pod from a leaked rule.
    known = any(getattr(s, "name", None) != "cni" for s in sources)
    if not known:
        notes.append("Only CNI state was found for pod names (cni-<id>); it cannot tell leaked "
                     "rules from live ones: pass --pods FILE or a kubeconfig for that.")
    return Resolver(sources, auto_refresh=None), known, list(notes)


def node_view(netns: Optional[str], lab_name: Optional[str], pod_files: Sequence[str],
              pods_from: Optional[str], node_name: Optional[str], kubeconfig: Optional[str] = None):
    """Gathers the node's rules, pods and conntrack (for rules, check and the agent)."""
    from bpftrace_hostport.node.nodeview import gather
    pod_files = list(pod_files)
    pods_from = pods_from_default(pods_from, pod_files)
    if lab_name:
        netns, pods_file, lab_node = lab_target(lab_name, netns)
        node_name = node_name or lab_node
        if pods_from != "none":
            pod_files.append(pods_file)
        if pods_from == "auto":
            pods_from = "file"     # the host's API server, runtime or CNI state know nothing of a lab
    if netns is not None and os.geteuid() != 0:
        raise UserError(f"Reading network namespace {netns} needs root: run it with sudo.")
    pods, known, notes = _pod_source(pod_files, pods_from, netns, node_name, kubeconfig)
    view = gather(netns, pods, node_name=node_name, pods_known=known, notes=notes)
    if not view.rules_read:
        if os.geteuid() != 0:
            raise UserError("Reading the node's nat rules and conntrack needs root: run it with sudo.")
        _notes(view.notes)
        raise UserError("No nat rules could be read by iptables-nft-save, iptables-legacy-save or nft; "
                        "install iptables or nftables (the notes above say why each one failed).")
    return view


def _notes(notes: Sequence[str]) -> None:
    for n in notes:
        click.echo(f"note: {n}", err=True)


def _common(fn):
    for deco in reversed([
        click.option("--netns", metavar="NAME", help="Named network namespace of the node (default: the current one)."),
        click.option("--lab", "lab_name", metavar="NAME", help="A lab's node: its namespace and pod list."),
        pod_options,
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    ]):
        fn = deco(fn)
    return fn


def _console():
    from rich.console import Console
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


@click.command("rules")
@_common
@user_errors
def rules_cmd(netns, lab_name, pod_files, pods_from, kubeconfig, node_name, as_json):
    """Show the node's hostPort mappings: hostPort -> namespace/pod:containerPort (port name).

    The readable answer to `iptables -t nat -nvL | grep DNAT`: every DNAT rule of portmap
    (iptables or nftables), CRI-O and Docker, joined with the pod that owns its target IP.

    \b
    Examples:
      sudo bpftrace-hostport rules --pods pods.json
      sudo bpftrace-hostport rules --lab demo
      sudo bpftrace-hostport rules --netns node1 --pods-from none --json
    """
    from bpftrace_hostport.node.nodeview import mappings, pod_label
    view = node_view(netns, lab_name, pod_files, pods_from, node_name, kubeconfig)
    rows = mappings(view)
    _notes(view.notes)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No hostPort DNAT rules on this node.")
        return
    from rich.table import Table
    from rich.text import Text
    t = Table(box=None, header_style="bold")
    for col in ("HOSTPORT", "PROTO", "HOST IP", "POD", "PORT", "TARGET", "CHAIN", "PACKETS", "SOURCE"):
        t.add_column(col, justify="right" if col in ("HOSTPORT", "PACKETS") else "left")
    for m in rows:
        pod = pod_label(m["namespace"], m["pod"]) if m["pod"] else ("?" if view.pods_known else "-")
        port = "-"
        if m["container_port"] is not None:
            port = str(m["container_port"]) + (f" ({m['port_name']})" if m["port_name"] else "")
        cells = (str(m["host_port"]), m["proto"], m["host_ip"] or "*", pod, port, m["target"],
                 m["chain"] or "-", "-" if m["packets"] is None else str(m["packets"]), m["source"])
        t.add_row(*(Text(c) for c in cells))   # Text: "[fd00::2]:80" is not markup
    _console().print(t)
    if not view.pods_known:
        click.echo("(no pod list: pass --pods FILE or --pods-from kube to name the pods)", err=True)


_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@click.command("check")
@_common
@user_errors
def check_cmd(netns, lab_name, pod_files, pods_from, kubeconfig, node_name, as_json):
    """Check why a hostPort may not work on this node; exit 1 when something is broken.

    Looks at the DNAT rules, the pods, conntrack, forwarding sysctls, the FORWARD chain,
    route_localnet and portmap's hairpin chains. Each finding has a stable code, its evidence
    and a fix. Exit status: 0 no error (warnings and info may remain), 1 at least one error,
    2 bad input.

    \b
    Examples:
      sudo bpftrace-hostport check --pods pods.json
      sudo bpftrace-hostport check --lab demo
      sudo bpftrace-hostport check --netns node1 --pods-from kube --json | jq '.[].code'
    """
    from bpftrace_hostport.node.check import findings, has_errors
    view = node_view(netns, lab_name, pod_files, pods_from, node_name, kubeconfig)
    found = findings(view)
    _notes(view.notes)
    if as_json:
        click.echo(json.dumps([f.to_dict() for f in found], indent=2))
    elif not found:
        click.echo(f"No problems found ({len(view.rules)} hostPort rules, {len(view.pods)} pods, "
                   f"{len(view.conntrack)} DNAT conntrack entries checked).")
    else:
        from rich.table import Table
        from rich.text import Text
        t = Table(box=None, header_style="bold", show_lines=True)
        t.add_column("SEVERITY")
        t.add_column("CODE")
        t.add_column("MESSAGE", ratio=3)
        t.add_column("EVIDENCE", ratio=3)
        t.add_column("FIX", ratio=3)
        for f in found:
            t.add_row(Text(f.severity, style=_STYLE.get(f.severity, "")), f.code, Text(f.message),
                      Text("\n".join(f.evidence)), Text(f.fix or "-"))
        _console().print(t)
    if has_errors(found):
        click.get_current_context().exit(1)


COMMANDS = [rules_cmd, check_cmd]
