"""Offline commands, on a capture from any machine: summary, report, export."""
from __future__ import annotations

import json
from typing import List

import click

from bpftrace_hostport.cli.options import load_pods, user_errors

@click.command()
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
    from bpftrace_hostport.analysis.aggregate import name_mappings, summarize
    from bpftrace_hostport.analysis.render import render_summary
    from bpftrace_hostport.records.jsonl import read_jsonl
    notes: List[str] = []
    flows, misses, recorded = read_jsonl(capture, notes)
    index = load_pods(pod_files)
    if recorded is not None:
        # The kernel's figures as recorded: pod names are filled in, numbers never recomputed.
        s = name_mappings(recorded, index.names)
    else:
        notes.append(f"{capture} has no summary record (the tracer did not end cleanly): "
                     "the figures below are recomputed from its flow records and may be incomplete.")
        s = summarize(flows, misses, None, None, _span(flows), 0, pod_names=index.names)
    for n in notes:
        click.echo(f"note: {n}", err=True)
    click.echo(json.dumps(s) if as_json else render_summary(s))


def _span(flows) -> float:
    from datetime import datetime
    ts = sorted(datetime.fromisoformat(f["ts"].replace("Z", "+00:00")) for f in flows if f.get("ts"))
    return (ts[-1] - ts[0]).total_seconds() if len(ts) > 1 else 0.0


COMMANDS = [summary]
