"""Offline commands, on a capture from any machine: summary, report, export."""
from __future__ import annotations

import json
import os
import sys

import click

from bpftrace_hostport.cli.options import Fail, load_pods, user_errors

@click.command()
@click.argument("capture", type=click.Path())
@click.option("--pods", "pod_files", multiple=True, type=click.Path(), help="Pod list to name pods the capture did not.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary record as JSON.")
@user_errors
def summary(capture, pod_files, as_json):
    """The summary table of a capture (a recording or JSON lines), on any machine.

    The figures are the kernel's, as the capture's summary record holds them; --pods only
    names pods the capture did not. `report` says more.

    \b
    Example:
      bpftrace-hostport summary capture.jsonl
    """
    from bpftrace_hostport.analysis.aggregate import name_mappings, summarize
    from bpftrace_hostport.analysis.render import render_summary
    from bpftrace_hostport.records.reader import flow_records, miss_records
    index = load_pods(pod_files)           # a bad --pods file is said before the capture is read
    cap = _load([capture])
    if cap.summaries:
        # The kernel's figures as recorded: pod names are filled in, numbers never recomputed.
        recorded = {k: v for k, v in cap.summaries[-1].items() if k not in ("node", "source")}
        s = name_mappings(recorded, index.names)
    else:
        click.echo(f"note: {capture} has no summary record: the figures below are recomputed from "
                   "its flow records and may be incomplete.", err=True)
        ts = cap.flows["ts"]
        span = (ts.max() - ts.min()).total_seconds() if len(ts) > 1 else 0.0
        s = summarize(list(flow_records(cap.flows)), list(miss_records(cap.misses)), None, None,
                      span, 0, pod_names=index.names)
    click.echo(json.dumps(s) if as_json else render_summary(s))


# -- report --------------------------------------------------------------------------------
def report_filters(fn):
    """--since/--until/--pod/--namespace/--host-port/--client: what a report covers."""
    for deco in reversed([
        click.option("--since", metavar="TIME", help="Only flows from TIME (ISO 8601, UTC unless it says; or 15m, 2h, 1d ago)."),
        click.option("--until", metavar="TIME", help="Only flows before TIME (same forms as --since)."),
        click.option("--pod", "pods", multiple=True, metavar="NS/NAME", help="Only this pod (repeatable)."),
        click.option("--namespace", "namespaces", multiple=True, metavar="NS", help="Only pods of this namespace (repeatable)."),
        click.option("--host-port", "host_ports", multiple=True, type=click.IntRange(1, 65535), metavar="PORT",
                     help="Only this hostPort (repeatable)."),
        click.option("--client", "clients", multiple=True, metavar="CIDR", help="Only clients in CIDR (repeatable)."),
    ]):
        fn = deco(fn)
    return fn


def _filters(since, until, pods, namespaces, host_ports, clients):
    from datetime import datetime, timezone
    from bpftrace_hostport.analysis.report import Filters, parse_time
    now = datetime.now(timezone.utc)
    try:
        f = Filters(since=parse_time(since, now) if since else None,
                    until=parse_time(until, now) if until else None, pods=list(pods),
                    namespaces=list(namespaces), host_ports=list(host_ports), clients=list(clients))
        f.networks()
    except ValueError as e:
        raise Fail(str(e)) from None
    return f


def _load(paths):
    from bpftrace_hostport.records.reader import load
    cap = load(list(paths))
    for n in cap.notes:
        click.echo(f"note: {n}", err=True)
    return cap


def _emit(text, out):
    if out is None:
        click.echo(text, nl=not str(text).endswith("\n"))
        return
    try:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise Fail(f"Cannot write {out}: {e.strerror}; choose another path with -o.") from None
    click.echo(f"wrote {out}", err=True)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(allow_dash=True))
@report_filters
@click.option("--compare", nargs=2, type=click.Path(), metavar="BEFORE AFTER",
              help="Compare two captures per mapping: before -> after.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown", "html"]),
              default="table", show_default=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--top", type=click.IntRange(1, 100), default=5, show_default=True, help="Top clients per mapping.")
@user_errors
def report(paths, since, until, pods, namespaces, host_ports, clients, compare, fmt, out, top):
    """The incident write-up of one or more captures (recordings or JSON lines), on any machine.

    Per mapping: flows, answered share, misses, drops by reason, latency percentiles, flows
    over time, top clients, masqueraded share; totals, lost events, and what the capture does
    not know. Several files (several nodes) are reported together, per node; - reads stdin.

    \b
    Examples:
      bpftrace-hostport report incident.arrow
      bpftrace-hostport report node-*.arrow --since 2h --namespace web --format markdown
      bpftrace-hostport report incident.arrow --format html -o incident.html
      bpftrace-hostport report --compare before.arrow after.arrow
    """
    from bpftrace_hostport.analysis.report import build_report, compare_reports
    from bpftrace_hostport.analysis.report_render import render
    f = _filters(since, until, pods, namespaces, host_ports, clients)
    if compare:
        if paths:
            raise Fail("--compare takes the two captures itself; give no other path.")
        before, after = (build_report(_load([p]), f, top=top) for p in compare)
        result = compare_reports(before, after)
    else:
        if not paths:
            raise Fail("Give at least one capture file (or - for standard input).")
        result = build_report(_load(paths), f, top=top)
    if fmt == "html" and out is None and sys.stdout.isatty():
        raise Fail("HTML goes to a file: add -o report.html.")
    _emit(render(result, fmt), out)


# -- export --------------------------------------------------------------------------------
@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("--to", "to", type=click.Choice(["parquet", "csv", "jsonl", "pcapng", "recording"]), required=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True, help="The file to write.")
@user_errors
def export(paths, to, out):
    """Convert captures: one row per flow to Parquet or CSV, JSON lines, pcapng for Wireshark,
    or a JSON-lines capture to a recording.

    \b
    Examples:
      bpftrace-hostport export incident.arrow --to parquet -o flows.parquet
      bpftrace-hostport export incident.arrow --to pcapng -o flows.pcapng   # wireshark flows.pcapng
      bpftrace-hostport export old-capture.jsonl --to recording -o capture.arrow
    """
    from bpftrace_hostport.analysis.export import export_capture
    if os.path.exists(out) and any(os.path.exists(p) and os.path.samefile(p, out) for p in paths if p != "-"):
        raise Fail(f"{out} is also an input: choose another -o.")
    n = export_capture(_load(paths), to, out)
    click.echo(f"wrote {n} flows to {out}", err=True)


COMMANDS = [summary, report, export]
