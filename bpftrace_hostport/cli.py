"""The command line: a thin click layer over the library. Errors become one sentence, exit 2."""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from typing import List, Sequence, Tuple

import click

from . import __version__
from .cliutil import Fail, lab_target, user_errors
from .errors import UserError


def _host_ports(values: Sequence[str], protos: Sequence[str]) -> List[Tuple[str, int]]:
    out = []
    for v in values:
        port_s, _, proto = v.partition("/")
        try:
            port = int(port_s)
        except ValueError:
            raise Fail(f"--host-port {v!r} is not a port number (e.g. 8000 or 5353/udp).") from None
        if not 1 <= port <= 65535:
            raise Fail(f"--host-port {v!r} is out of range 1-65535.")
        if proto and proto.lower() not in ("tcp", "udp", "sctp"):
            raise Fail(f"--host-port {v!r}: the protocol must be tcp, udp or sctp.")
        for p in ([proto.lower()] if proto else (list(protos) or ["tcp", "udp", "sctp"])):
            out.append((p, port))
    return out


def _cidrs(values: Sequence[str]) -> List[str]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except ValueError:
            raise Fail(f"--client {v!r} is not an address or CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32).") from None
    return out


def _load_pods(files: Sequence[str]):
    from .pods.index import PodIndex
    from .pods.podlist import read_pod_list
    index = PodIndex()
    for f in files:
        index.extend(read_pod_list(f))
    return index


def pod_options(fn):
    """--pods / --pods-from / --kubeconfig / --node-name: where pod metadata comes from."""
    fn = click.option("--node-name", metavar="NAME", help="This node's name in the API (default: $NODE_NAME or the host name).")(fn)
    fn = click.option("--kubeconfig", type=click.Path(), help="Kubeconfig for --pods-from kube (default: $KUBECONFIG, ~/.kube/config, in-cluster).")(fn)
    fn = click.option("--pods-from", type=click.Choice(["auto", "file", "kube", "cri", "cni", "none"]), default=None,
                      help="Pod metadata source. auto (default): --pods files, else the Kubernetes API, crictl, "
                           "or CNI state, the first that answers; with --lab: the lab's pod list.")(fn)
    fn = click.option("--pods", "pod_files", multiple=True, type=click.Path(), metavar="FILE",
                      help="Pod list (kubectl get pods -o json, a Pod or PodList; YAML or JSON) naming pods and ports (repeatable).")(fn)
    return fn


def _resolver(pod_files, pods_from, netns, node_name, kubeconfig):
    """A started Resolver over the chosen sources; notes about skipped sources go to stderr."""
    from .pods.sources import Resolver, resolve_sources
    if pods_from is None:
        pods_from = "file" if pod_files else "auto"
    sources, notes = resolve_sources(list(pod_files), pods_from=pods_from, netns=netns,
                                     node_name=node_name, kubeconfig=kubeconfig)
    for n in notes:
        click.echo(f"note: {n}", err=True)
    resolver = Resolver(sources)
    resolver.start()
    return resolver


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bpftrace-hostport")
def cli():
    """Watch Kubernetes hostPort DNAT translations in the kernel with eBPF.

    \b
    Examples:
      bpftrace-hostport lab demo                      # build a lab node, trace it, summarize
      bpftrace-hostport trace --pods pods.json        # live, on a real node
      bpftrace-hostport trace --lab demo --format json --duration 30 > capture.jsonl
      bpftrace-hostport summary capture.jsonl
    """


# -- trace ---------------------------------------------------------------------------------
@cli.command()
@click.option("--netns", metavar="NAME", help="Named network namespace of the node (default: the current one).")
@click.option("--lab", "lab_name", metavar="NAME", help="Trace a lab's node: its namespace and pod list.")
@click.option("--duration", type=click.FloatRange(min=0.1), metavar="S", help="Stop after S seconds (default: Ctrl-C / SIGTERM).")
@click.option("--host-port", "host_ports", multiple=True, metavar="PORT[/PROTO]",
              help="Watch only these hostPorts (repeatable). Default: the ports of --pods and of the node's nat rules; "
                   "with none known, every DNAT to a local address.")
@click.option("--proto", "protos", multiple=True, type=click.Choice(["tcp", "udp", "sctp"]), help="Only these protocols (repeatable).")
@click.option("--client", "clients", multiple=True, metavar="CIDR", help="Only clients in CIDR (repeatable).")
@pod_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None,
              help="table: live view (default on a terminal); json: one object per line (default otherwise).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="S",
              help="Report a flow as unanswered after S seconds without a reply.")
@click.option("--flow-table", type=click.IntRange(1024, 1 << 22), default=65536, show_default=True,
              help="Entries in the in-kernel flow table (LRU).")
@click.option("--ringbuf-kb", type=click.IntRange(16, 1 << 20), default=4096, show_default=True,
              help="Ring buffer size for answered-flow records, KiB (rounded to a power of two).")
@click.option("--no-drops", is_flag=True, help="Do not attach skb:kfree_skb (drop attribution).")
@click.option("--no-rules", is_flag=True, help="Do not read the node's nat rules for ports to watch.")
@click.option("--backend", type=click.Choice(["auto", "netfilter", "conntrack"]), default="auto", show_default=True,
              help="netfilter: eBPF on the netfilter link (Linux >= 6.4); conntrack: conntrack events only.")
@click.option("--ready-file", type=click.Path(), help="Write this file once the probes are attached.")
@click.option("--print-program", is_flag=True, hidden=True, help="Print the eBPF program and its -D constants.")
@user_errors
def trace(netns, lab_name, duration, host_ports, protos, clients, pod_files, pods_from, kubeconfig, node_name,
          fmt, timeout, flow_table, ringbuf_kb, no_drops, no_rules, backend, ready_file, print_program):
    """Trace hostPort translations live: client -> nodeIP:hostPort became podIP:containerPort.

    \b
    Examples:
      sudo bpftrace-hostport trace --pods pods.json
      sudo bpftrace-hostport trace --lab demo --duration 10 --format json
      sudo bpftrace-hostport trace --netns node1 --host-port 5353/udp --client 10.0.0.0/8
    """
    pod_files = list(pod_files)
    if lab_name:
        netns, pods_file, _ = lab_target(lab_name, netns)
        pod_files.append(pods_file)
    from .netns import require
    require(netns)
    index = _resolver(pod_files, pods_from, netns, node_name, kubeconfig)
    try:
        _trace(index, netns, duration, host_ports, protos, clients, fmt, timeout, flow_table, ringbuf_kb,
               no_drops, no_rules, backend, ready_file, print_program)
    finally:
        index.stop()


def _trace(index, netns, duration, host_ports, protos, clients, fmt, timeout, flow_table, ringbuf_kb,
           no_drops, no_rules, backend, ready_file, print_program):
    from .trace import TraceOptions, run_trace
    if fmt is None:
        fmt = "table" if sys.stdout.isatty() else "json"
    pages = 1
    while pages * 4 < ringbuf_kb:
        pages *= 2
    opts = TraceOptions(netns=netns, duration=duration, host_ports=_host_ports(host_ports, protos),
                        protos=list(protos), client_cidrs=_cidrs(clients), timeout=timeout, fmt=fmt,
                        ready_file=ready_file, flow_table_size=flow_table, ringbuf_pages=pages,
                        drops=not no_drops, use_rules=not no_rules, debug_print_program=print_program)
    if backend == "conntrack":
        from .ctbackend import run_conntrack_trace
        run_conntrack_trace(opts, index)
        return
    try:
        run_trace(opts, index)
    except UserError as e:
        if backend == "auto" and getattr(e, "fallback", False):
            click.echo(f"warning: {e} Falling back to conntrack events (no latency, misses or drops).", err=True)
            from .ctbackend import run_conntrack_trace
            run_conntrack_trace(opts, index)
            return
        raise


# -- summary -------------------------------------------------------------------------------
@cli.command()
@click.argument("capture", type=click.Path())
@click.option("--pods", "pod_files", multiple=True, type=click.Path(), help="Pod list to name pods the capture did not.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary record as JSON.")
@user_errors
def summary(capture, pod_files, as_json):
    """Summarize a capture written by `trace --format json` (offline, on any machine).

    \b
    Example:
      bpftrace-hostport summary capture.jsonl
    """
    from .summary import read_jsonl, render_summary, summarize
    notes: List[str] = []
    flows, misses, recorded = read_jsonl(capture, notes)
    for n in notes:
        click.echo(f"note: {n}", err=True)
    index = _load_pods(pod_files)
    if recorded is not None and not pod_files:
        s = recorded
    else:
        duration = recorded["duration_s"] if recorded else _span(flows)
        lost = recorded["lost_events"] if recorded else 0
        s = summarize(flows, misses, None, None, duration, lost, pod_names=index.names)
    click.echo(json.dumps(s) if as_json else render_summary(s))


def _span(flows) -> float:
    from datetime import datetime
    ts = sorted(datetime.fromisoformat(f["ts"].replace("Z", "+00:00")) for f in flows if f.get("ts"))
    return (ts[-1] - ts[0]).total_seconds() if len(ts) > 1 else 0.0


# -- lab -----------------------------------------------------------------------------------
@cli.group()
def lab():
    """A Kubernetes-like node in network namespaces, built with the real CNI plugins."""


@lab.command("up")
@click.argument("manifests", nargs=-1, type=click.Path())
@click.option("--name", default="lab", show_default=True, help="Lab name (several labs can run side by side).")
@click.option("--scenario", type=click.Choice(["basic", "hostnetwork", "conflict", "stale-udp", "forward-drop",
                                                "hairpin", "localhost"]), default="basic", show_default=True)
@click.option("--clients", type=click.IntRange(1, 8), default=1, show_default=True)
@click.option("--no-ipv6", is_flag=True, help="IPv4 only.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def lab_up(manifests, name, scenario, clients, no_ipv6, as_json):
    """Build a lab node with a pod per replica of MANIFESTS (default: nginx-hostport).

    \b
    Examples:
      sudo bpftrace-hostport lab up
      sudo bpftrace-hostport lab up my-daemonset.yaml --name ds --scenario hostnetwork
    """
    from . import lab as labmod
    st = labmod.up(manifests, name=name, scenario=scenario, clients=clients, ipv6=not no_ipv6)
    s = st.summary()
    click.echo(json.dumps(s, indent=2) if as_json else _lab_text(s))


def _lab_text(s: dict) -> str:
    lines = [f"lab {s['name']} ({s['scenario']}): node {s['node']} in netns {s['node_netns']}, "
             f"IP {s['node_ip']}" + (f" / {s['node_ip6']}" if s.get("node_ip6") else ""),
             f"  pod list: {s['pods_file']}"]
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
    from . import lab as labmod
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
    """Show the labs that are up, or one lab in detail.

    \b
    Example:
      bpftrace-hostport lab status --name demo
    """
    from . import lab as labmod
    if name is None:
        names = labmod.list_labs()
        if as_json:
            click.echo(json.dumps(names))
        else:
            click.echo("\n".join(names) if names else "no lab is up")
        return
    s = labmod.status(name)
    click.echo(json.dumps(s, indent=2) if as_json else _lab_text(s) +
               f"\n  namespaces present: {len(s['namespaces_present'])}, servers running: {len(s['servers_running'])}")


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
    from . import lab as labmod
    res = labmod.traffic(name, to=to, count=count, rate=rate, concurrency=concurrency, source=source,
                         proto=proto, family=6 if ipv6 else 4, target=target, source_port=source_port)
    if as_json:
        click.echo(json.dumps(res))
    else:
        pods = ", ".join(f"{k}: {v}" for k, v in res["by_pod"].items()) or "-"
        click.echo(f"{res['from']} -> {res['to']}: sent {res['sent']}, answered {res['answered']}, "
                   f"failed {res['failed']} in {res['elapsed_s']} s; answered by {pods}")


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
    from .demo import run_demo
    sys.exit(run_demo(name, keep))


def _register_node_commands():
    from .cli_node import check_cmd, rules_cmd
    cli.add_command(rules_cmd)
    cli.add_command(check_cmd)


_register_node_commands()


def main(argv=None):
    cli.main(args=argv, prog_name="bpftrace-hostport")


if __name__ == "__main__":
    main()
