"""`rules` and `check`: the node's hostPort mappings with their pods, and what is wrong with them.

Both read the node once (node/gather.py); `rules` leaves out what only `check` needs (the filter
tables, the pods' namespaces).
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Sequence, Tuple

import click

from bpftrace_hostport.cli.options import lab_target, pod_options, pods_from_default, user_errors
from bpftrace_hostport.errors import UserError

def _pod_source(pod_files: Sequence[str], pods_from: str, netns: Optional[str],
                node_name: Optional[str], kubeconfig: Optional[str] = None) -> Tuple[Any, bool, List[str]]:
    """(pods object for node/gather.py's gather, pods_known, notes). "none" asks no live source."""
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
              pods_from: Optional[str], node_name: Optional[str], kubeconfig: Optional[str] = None,
              forward: bool = True):
    """Gathers the node's rules, pods and conntrack (for rules and check; `forward=False`: without
    the filter tables, which only check needs)."""
    from bpftrace_hostport.node.gather import gather
    pod_files = list(pod_files)
    pods_from = pods_from_default(pods_from, pod_files)
    target = ["--lab", lab_name] if lab_name else (["--netns", netns] if netns else [])
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
    view = gather(netns, pods, node_name=node_name, pods_known=known, notes=notes, forward=forward,
                  target_args=target)
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


def _width() -> Optional[int]:
    from bpftrace_hostport.analysis.render import terminal_width
    return terminal_width()


def check_hint(lab_name: Optional[str] = None, netns: Optional[str] = None, pod_files: Sequence[str] = (),
               pods_from: Optional[str] = None) -> str:
    """The `check` command line for the same node and pods as a trace (for the summary's notes)."""
    import shlex
    args = ["sudo", "bpftrace-hostport", "check"]
    if lab_name:
        args += ["--lab", lab_name]
    elif netns:
        args += ["--netns", netns]
    for f in pod_files:
        args += ["--pods", f]
    if pods_from and pods_from not in ("auto", "file"):
        args += ["--pods-from", pods_from]
    return " ".join(shlex.quote(a) for a in args)


def _hostport_cell(m: dict) -> str:
    hp = f"{m['host_port']}/{m['proto'].lower()}"
    if m.get("host_ip") and m["host_ip"] not in ("0.0.0.0", "::"):
        hp = f"[{m['host_ip']}]:{hp}" if ":" in m["host_ip"] else f"{m['host_ip']}:{hp}"
    return hp + (f" ({m['conflict']})" if m.get("conflict") else "")


def _rules_rows(view, rows: List[dict]) -> List[List[Any]]:
    from bpftrace_hostport.node.nodeview import pod_label
    out = []
    for m in rows:
        pod = pod_label(m["namespace"], m["pod"]) if m["pod"] else ("?" if view.pods_known else "-")
        name = f" ({m['port_name']})" if m.get("port_name") else ""
        if m["source"] == "hostNetwork":
            socks = m.get("listening")
            target: Any = ([f"node socket {s}{name}" for s in socks] if socks else
                           [f"nothing listens on {m['container_port']}" if socks is not None
                            else f"node port {m['container_port']}{name}"])
            rule = "none: hostNetwork, no DNAT"
            packets = "-"
        else:
            target = m["target"] + name
            rule = f"{m['chain'] or '-'} ({m['source']})"
            packets = "-" if m["packets"] is None else str(m["packets"])
        out.append([_hostport_cell(m), pod, target, rule, packets])
    return out


def _host_network_rows(view) -> List[dict]:
    """The hostNetwork pods' declared hostPorts, as rows beside the DNAT rules (no rule: their
    own socket on the node serves the port, unless a DNAT rule for it takes it first)."""
    from bpftrace_hostport.node.nodeview import local_pods
    dnat = {(r.proto, r.host_port) for r in view.rules}
    out = []
    for p in local_pods(view):
        if not p.host_network:
            continue
        for cp in p.host_ports:
            socks = None
            if view.sockets_read and cp.protocol in ("TCP", "UDP"):
                socks = [f"{s[0].lower()} {'[' + s[1] + ']' if ':' in s[1] else s[1]}:{s[2]}"
                         for s in view.listening if s[0] == cp.protocol and s[2] == cp.container_port]
            out.append({
                "host_port": cp.host_port, "proto": cp.protocol, "host_ip": cp.host_ip, "target": None,
                "target_ip": None, "target_port": cp.container_port, "namespace": p.namespace, "pod": p.name,
                "pod_phase": p.phase, "container_port": cp.container_port, "port_name": cp.name,
                "container": cp.container, "chain": None, "container_id": None, "packets": None,
                "bytes": None, "source": "hostNetwork", "family": None,
                "conflict": "shadowed" if (cp.protocol, cp.host_port) in dnat else None,
                "listening": socks,
            })
    return out


def _who_serves(view, rows: List[dict], asked: List[Tuple[int, List[str], bool]], hint: str) -> List[str]:
    """Sentences for each asked hostPort (port, protocols, protocol given): who gets its new
    connections. Without a protocol, the protocols that nothing serves are summed up in one line."""
    out: List[str] = []
    for port, protos, explicit in asked:
        served = [p for p in protos if any(m["proto"].lower() == p and m["host_port"] == port for m in rows)
                  or any(s[0].lower() == p and s[2] == port for s in view.listening)]
        if not explicit and not served:
            out.append(f"hostPort {port}: no DNAT rule, no hostNetwork pod and no listening socket on this node "
                       f"for {', '.join(protos)}: nothing serves it.")
            continue
        out += _who_serves_one(view, rows, [(p, port) for p in (protos if explicit else served)], hint)
    return out


def _who_serves_one(view, rows: List[dict], ports: List[Tuple[str, int]], hint: str) -> List[str]:
    from bpftrace_hostport.node.nodeview import pod_label
    out = []
    for proto, port in ports:
        mine = [m for m in rows if m["proto"].lower() == proto and m["host_port"] == port]
        hp = f"hostPort {port}/{proto}"
        dnat = [m for m in mine if m["source"] != "hostNetwork"]
        hostnet = [m for m in mine if m["source"] == "hostNetwork"]
        socks = [s for s in view.listening if s[0].lower() == proto and s[2] == port]
        if dnat:
            fams = sorted({m["family"] for m in dnat})
            for fam in fams:
                cand = [m for m in dnat if m["family"] == fam]
                win = next((m for m in cand if m.get("conflict") == "wins"), cand[0])
                who = pod_label(win["namespace"], win["pod"]) if win["pod"] else "a pod no pod list names"
                extra = ""
                if any(m.get("conflict") == "shadowed" for m in cand):
                    extra = (f"; {len(cand) - 1} other rule{'s' if len(cand) > 2 else ''} for it never "
                             f"match{'' if len(cand) > 2 else 'es'}")
                out.append(f"{hp} (IPv{fam}): new connections go to {who} at {win['target']} by "
                           f"{win['chain'] or 'a rule'} ({win['source']}), the first rule that matches{extra}.")
            for m in hostnet:
                out.append(f"{hp}: hostNetwork pod {pod_label(m['namespace'], m['pod'])} declares it too, but "
                           "DNAT happens first, so its socket never sees new connections.")
        elif hostnet:
            for m in hostnet:
                where = (f" with its socket {', '.join(m['listening'])}" if m.get("listening") else
                         f", but nothing listens on port {m['container_port']}" if m.get("listening") is not None
                         else "")
                out.append(f"{hp}: no DNAT; hostNetwork pod {pod_label(m['namespace'], m['pod'])} serves it on "
                           f"the node{where}.")
        elif socks:
            listen = ", ".join(f"{s[0].lower()} {'[' + s[1] + ']' if ':' in s[1] else s[1]}:{s[2]}" for s in socks)
            out.append(f"{hp}: no DNAT rule and no pod declares it; a process of the node listens ({listen}) "
                       "and gets its connections.")
        else:
            out.append(f"{hp}: no DNAT rule, no hostNetwork pod and no listening socket on this node: "
                       "nothing serves it.")
        stale = [e for e in view.conntrack if e.proto.lower() == proto and e.orig_dport == port
                 and e.reply_src != e.orig_dst
                 and e.reply_src not in {m["target_ip"] for m in dnat}]
        if stale and proto in ("udp", "sctp"):
            ips = ", ".join(sorted({e.reply_src for e in stale}))
            out.append(f"{hp}: {len(stale)} conntrack entr{'y' if len(stale) == 1 else 'ies'} still "
                       f"DNAT{'s' if len(stale) == 1 else ''} it to {ips}, which no current rule targets: "
                       f"to tell whether {'it is' if len(stale) == 1 else 'they are'} stale and get the command "
                       f"that deletes {'it' if len(stale) == 1 else 'them'}, run:")
            out.append("$ " + hint)
    return out


@click.command("rules")
@_common
@click.option("--host-port", "host_port_args", multiple=True, metavar="PORT[/PROTO]",
              help="Only this hostPort (repeatable), and say who serves it.")
@user_errors
def rules_cmd(netns, lab_name, pod_files, pods_from, kubeconfig, node_name, as_json, host_port_args):
    """Show the node's hostPort mappings: hostPort -> namespace/pod:containerPort (port name).

    The readable answer to `iptables -t nat -nvL | grep DNAT`: every DNAT rule of portmap
    (iptables or nftables), CRI-O and Docker, joined with the pod that owns its target IP, and
    the hostNetwork pods with the socket that serves their port. Where rules to different pods
    compete for one hostPort, the one that takes new connections is marked (wins) and the
    others (shadowed). --host-port answers "who serves this port?".

    \b
    Examples:
      sudo bpftrace-hostport rules --pods pods.json
      sudo bpftrace-hostport rules --lab demo --host-port 8000
      sudo bpftrace-hostport rules --netns node1 --pods-from none --json
    """
    from bpftrace_hostport.analysis.render import render_table, paragraph
    from bpftrace_hostport.cli.options import host_ports
    from bpftrace_hostport.node.nodeview import mappings
    asked = []
    for v in host_port_args:
        got = host_ports([v], ())                       # validates: a bad value is exit 2
        port, explicit = got[0][1], "/" in v
        protos = [p for p, _ in got]
        old = next((a for a in asked if a[0] == port), None)
        if old is None:
            asked.append((port, protos, explicit))
        else:
            asked[asked.index(old)] = (port, list(dict.fromkeys(old[1] + protos)), old[2] and explicit)
    view = node_view(netns, lab_name, pod_files, pods_from, node_name, kubeconfig, forward=False)
    rows = mappings(view)
    hostnet = _host_network_rows(view)
    shadowing = {(h["proto"], h["host_port"]) for h in hostnet if h["conflict"]}
    for m in rows:
        if m["conflict"] is None and (m["proto"], m["host_port"]) in shadowing:
            m["conflict"] = "wins"
    for m in rows:
        m.setdefault("listening", None)          # the socket of a hostNetwork row; None for a rule
    order = {"wins": 0, None: 1, "shadowed": 2}
    rows = sorted(rows + hostnet, key=lambda m: (m["host_port"], m["proto"], m["source"] == "hostNetwork",
                                                 order[m["conflict"]]))
    if asked:
        wanted = {(p, port) for port, protos, _ in asked for p in protos}
        rows = [m for m in rows if (m["proto"].lower(), m["host_port"]) in wanted]
    _notes(view.notes)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = _width()
    if rows:
        click.echo(render_table(("HOSTPORT", "POD", "TARGET", "RULE", "PACKETS"), _rules_rows(view, rows), width,
                               right={4}, floors={1: 16, 2: 14}, keep={0}, record="mapping"), nl=False)
    elif not asked:
        click.echo("No hostPort DNAT rules and no hostNetwork pod with a hostPort on this node.")
    if asked:
        if rows:
            click.echo("")
        hint = check_hint(lab_name, netns, pod_files, pods_from)
        for line in _who_serves(view, rows, asked, hint):
            # "$ command": a command line, never wrapped, so that it can be copied
            click.echo("  " + line[2:] if line.startswith("$ ") else "\n".join(paragraph(line, width, "", "  ")))
    if not view.pods_known:
        click.echo("(no pod list: pass --pods FILE or --pods-from kube to name the pods)", err=True)


def render_findings(found, width: Optional[int]) -> str:
    """Findings as a table that fits `width` (records when it cannot), the fix commands below it,
    one per line, copyable (and pasteable into a shell: the labels are comments)."""
    import re
    from bpftrace_hostport.analysis.render import plural, render_table
    rows, commands = [], []
    for f in found:
        fix = f.fix or "-"

        def ref(match):
            commands.append((f.code, match.group(1)))
            return f"[{len(commands)}]"
        fix = re.sub(r"`([^`]+)`", ref, fix)
        rows.append([f.severity, f.code, f.message, list(f.evidence) or "-", fix])
    text = render_table(("SEVERITY", "CODE", "FINDING", "EVIDENCE", "FIX"), rows, width,
                        floors={2: 28, 3: 28, 4: 20}, keep={0, 1}, record="finding")
    counts = [plural(sum(1 for f in found if f.severity == s), s) for s in ("error", "warning")
              if any(f.severity == s for f in found)]
    info = sum(1 for f in found if f.severity == "info")
    if info:
        counts.append(f"{info} info")
    text += f"\n{plural(len(found), 'finding')}: {', '.join(counts)}.\n"
    if commands:
        text += "\nFix commands ([N] in FIX), one per line:\n"
        for i, (code, cmd) in enumerate(commands, 1):
            text += f"# [{i}] {code}\n{cmd}\n"
    return text


@click.command("check")
@_common
@user_errors
def check_cmd(netns, lab_name, pod_files, pods_from, kubeconfig, node_name, as_json):
    """Check why a hostPort may not work on this node; exit 1 when something is broken.

    Looks at the DNAT rules (iptables, both backends, and nftables), the pods and what listens in
    their namespaces, conntrack (the hostPorts' entries and the table's fill), forwarding and
    route_localnet, the FORWARD and INPUT chains, nftables' forward chains and portmap's
    masquerade. Each finding has a stable code (README lists them all), its evidence and a fix
    with the node's real values. Exit status: 0 no error (warnings and info may remain), 1 at
    least one error, 2 bad input.

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
        from bpftrace_hostport.analysis.render import plural
        click.echo(f"No problems found ({plural(len(view.rules), 'hostPort rule')}, {plural(len(view.pods), 'pod')}, "
                   f"{plural(len(view.conntrack), 'conntrack entry', 'conntrack entries')} of hostPorts checked).")
    else:
        click.echo(render_findings(found, _width()), nl=False)
    if has_errors(found):
        click.get_current_context().exit(1)


COMMANDS = [rules_cmd, check_cmd]
