"""Offline commands, on a capture from any machine: summary, report, export."""
from __future__ import annotations

import json
import os
import sys

import click

from bpftrace_hostport.cli.options import Fail, load_pods, user_errors
from bpftrace_hostport.nopandas import keep_pandas_out


def streaming(fn):
    """The review streams numpy and Arrow columns: pandas stays out (30 MB and 0.2 s less)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with keep_pandas_out():
            return fn(*a, **kw)
    return wrapper

#: A capture argument: click only says "is not readable"; records/stream.opener says whose the
#: file is and what to run instead, so click does not look (readable=False).
CAPTURE = click.Path(allow_dash=True, readable=False)

@click.command()
@click.argument("capture", nargs=-1, required=True, type=CAPTURE)
@click.option("--pods", "pod_files", multiple=True, type=click.Path(), help="Pod list to name pods the capture did not.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary record as JSON.")
@user_errors
@streaming
def summary(capture, pod_files, as_json):
    """The summary table of a capture (a recording, its rotated files, or JSON lines), on any machine.

    The same figures as the live trace's summary and as `report`: the kernel's counts where the
    capture holds a whole run, else the flow records' (a note says which); --pods only names
    pods the capture did not. `report` says more.

    \b
    Examples:
      bpftrace-hostport summary capture.jsonl
      bpftrace-hostport summary /var/lib/bpftrace-hostport/     # every file of a rotated run
    """
    from bpftrace_hostport.analysis.render import render_summary
    from bpftrace_hostport.analysis.review import coverage_notes, read
    from bpftrace_hostport.analysis.summary import summary_record
    index = load_pods(pod_files)           # a bad --pods file is said before the capture is read
    review = read(_open(capture), series=False, clients=False)
    for n in review.notes + coverage_notes(review):
        click.echo(f"note: {n}", err=True)
    fig = review.rollup.figures(pod_names=index.names)
    if len(fig.nodes) > 1:
        click.echo("note: these files come from several nodes: `report` shows them per node.", err=True)
    dur = sum(n["duration_s"] for n in fig.nodes.values())
    lost = [n["lost_events"] for n in fig.nodes.values()]
    s = summary_record(fig, dur, None if any(v is None for v in lost) else sum(lost))
    if any(v is None for v in lost):
        s["lost_events"] = None
    if as_json:
        click.echo(json.dumps(s))
        return
    pods = _snapshot_pods(review)
    # what the capture's backend does not measure reads n/a, never 0 or "-"
    measures = {k: all(n["measures"].get(k, True) for n in fig.nodes.values())
                for k in ("latency", "packets", "misses", "drops")}
    click.echo(render_summary(s, pods=pods, measures=measures), nl=False)


def _snapshot_pods(review):
    """The pods as the capture's last snapshot has them (for the notes), or None."""
    for node in review.snapshots:
        got = review.latest(node, "pods")
        if got is not None:
            return got
    return None


def _open(paths):
    from bpftrace_hostport.records.stream import open_captures
    return open_captures(list(paths))


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


def _review(paths, filters, **kw):
    from bpftrace_hostport.analysis.review import read
    review = read(_open(paths), filters, **kw)
    for n in review.notes:
        click.echo(f"note: {n}", err=True)
    return review


def _emit(text, out):
    if out is None:
        click.echo(text, nl=not str(text).endswith("\n"))
        return
    from bpftrace_hostport.files import private_file
    with private_file(out, binary=False) as f:        # a report names clients: 0600
        f.write(text)
    click.echo(f"wrote {out}", err=True)


@click.command()
@click.argument("paths", nargs=-1, type=CAPTURE)
@report_filters
@click.option("--compare", nargs=2, type=click.Path(readable=False), metavar="BEFORE AFTER",
              help="Compare two captures per mapping: before -> after.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown", "html"]),
              default="table", show_default=True)
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--top", type=click.IntRange(1, 100), default=5, show_default=True, help="Top clients per mapping.")
@click.option("--anonymize-key-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Replace client addresses by keyed pseudonyms (Crypto-PAn) in the report, as "
                   "trace --anonymize-key-file does.")
@user_errors
@streaming
def report(paths, since, until, pods, namespaces, host_ports, clients, compare, fmt, out, top,
           anonymize_key_file):
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
      bpftrace-hostport report incident.arrow --anonymize-key-file key --format markdown   # to share
    """
    from bpftrace_hostport.analysis.report import anonymized, build_report, compare_reports
    from bpftrace_hostport.analysis.report_render import render
    f = _filters(since, until, pods, namespaces, host_ports, clients)
    if fmt == "html" and out is None:
        raise Fail("HTML goes to a file: add -o report.html.")
    key = _key(anonymize_key_file)
    anon = (lambda r: anonymized(r, key)) if key is not None else (lambda r: r)
    if compare:
        if paths:
            raise Fail("--compare takes the two captures itself; give no other path.")
        before, after = (anon(build_report(_review([p], f), top=top)) for p in compare)
        result = compare_reports(before, after)
    else:
        if not paths:
            raise Fail("Give at least one capture file (or - for standard input).")
        try:
            result = anon(build_report(_review(paths, f), top=top))
        except ValueError as e:
            raise Fail(str(e)) from None
    _emit(render(result, fmt), out)


def _key(key_file):
    if not key_file:
        return None
    from bpftrace_hostport.cli.trace import _anonymize_key
    return _anonymize_key(False, key_file)


# -- export --------------------------------------------------------------------------------
@click.command()
@click.argument("paths", nargs=-1, required=True, type=CAPTURE)
@click.option("--to", "to", type=click.Choice(["parquet", "csv", "jsonl", "pcapng", "recording"]), required=True)
@click.option("-o", "--output", "out", type=click.Path(), required=True,
              help="The file to write (with --partition: the dataset's directory).")
@click.option("--partition", is_flag=True,
              help="Parquet only: write a hive-partitioned dataset (node=/date=) into the -o directory.")
@report_filters
@click.option("--anonymize-key-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Replace client addresses by keyed pseudonyms (Crypto-PAn) in what is written.")
@user_errors
@streaming
def export(paths, to, out, partition, since, until, pods, namespaces, host_ports, clients,
           anonymize_key_file):
    """Convert captures: one row per flow to Parquet (a file or a hive-partitioned dataset) or
    CSV, JSON lines, pcapng for Wireshark, or a JSON-lines capture to a recording.

    \b
    Examples:
      bpftrace-hostport export incident.arrow --to parquet -o flows.parquet
      bpftrace-hostport export node-*/ --to parquet --partition -o fleet/   # DuckDB, Spark, Trino
      bpftrace-hostport export incident.arrow --to pcapng -o flows.pcapng   # wireshark flows.pcapng
      bpftrace-hostport export old-capture.jsonl --to recording -o capture.arrow
    """
    from bpftrace_hostport.analysis.export import export_captures
    if any(p != "-" and os.path.exists(p) and os.path.exists(out) and os.path.samefile(p, out) for p in paths):
        raise Fail(f"{out} is also an input: choose another -o.")
    if partition and os.path.exists(out) and not os.path.isdir(out):
        raise Fail(f"{out} is a file: --partition writes a directory; give a new or empty directory.")
    if not partition and os.path.isdir(out):
        raise Fail(f"{out} is a directory: give a file name with -o, or add --partition (Parquet).")
    key = _key(anonymize_key_file)
    f = _filters(since, until, pods, namespaces, host_ports, clients)
    n = export_captures(_open(paths), to, out, partition=partition, filters=f, anonymize_key=key)
    click.echo(f"wrote {n} flows to {out}", err=True)


COMMANDS = [summary, report, export]
