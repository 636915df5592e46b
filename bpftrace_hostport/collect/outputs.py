"""Choosing a backend and the sinks for a session, from the command line's outputs.

Imports nothing heavy itself: load_probe runs before the session's modules are imported.
"""
from __future__ import annotations

import dataclasses
import sys


def load_probe(opts):
    """The netfilter backend's eBPF programs, loaded (collect/netfilter/probe.py) before anything
    else a session needs, for a Probe that is not attached yet.

    A cold start compiles them in a child process (bcc and LLVM: about 130 MB for about a second).
    Loaded first, that child runs beside a tracer that holds little more than the interpreter
    and click (about 19 MB), not beside the pod sources, the rules and the sinks (numpy,
    pyroute2, ...: another 10 MB) that are imported afterwards. What to watch is given later
    (NetfilterBackend): it takes effect only when the probe attaches."""
    from bpftrace_hostport.collect.netfilter.probe import Probe, probe_options
    return Probe(probe_options(opts))


def make_backend(name: str, opts, watch, probe=None):
    if name == "conntrack":
        from bpftrace_hostport.collect.conntrack import ConntrackBackend
        return ConntrackBackend(opts, watch)
    from bpftrace_hostport.collect.netfilter.backend import NetfilterBackend
    return NetfilterBackend(opts, watch, probe)


def make_sinks(outputs: dict, opts, index) -> list:
    from bpftrace_hostport.collect import sinks
    out, metrics = [], None
    if outputs["fmt"] != "none":
        out.append(sinks.output_sink(outputs["fmt"], sys.stdout, outputs.get("check_hint"),
                                     getattr(index, "pods", None)))
    if outputs.get("record_path"):
        out.append(sinks.RecordingSink(outputs["record_path"], outputs.get("max_size"),
                                       outputs.get("max_files"), outputs.get("anonymize_key")))
    if outputs.get("metrics"):
        from bpftrace_hostport.collect.metrics import MetricsSink
        from bpftrace_hostport.collect.session import node_name
        try:
            metrics = MetricsSink(node_name(opts), outputs["metrics"])
        except ValueError as e:
            from bpftrace_hostport.errors import UserError
            raise UserError(str(e)) from None
        out.append(metrics)
    if outputs.get("agent") is not None:
        from bpftrace_hostport.collect.agent import AgentSink
        out.append(AgentSink(outputs["agent"], opts, index, metrics))
    return out


def needs_flow_records(outputs: dict) -> bool:
    """Only metrics (and the agent's log) need no record per flow: the kernel counts answered
    flows and their latency per mapping, and the ring buffer stays unused."""
    return outputs["fmt"] != "none" or bool(outputs.get("record_path"))


def run_session(backend_name: str, opts, index, outputs: dict, probe=None) -> dict:
    """probe: the netfilter backend's, from load_probe (None: the backend loads its own)."""
    from bpftrace_hostport.collect.session import Session, watch_list
    opts = dataclasses.replace(opts, flow_records=needs_flow_records(outputs))
    watch, notes = watch_list(opts, index)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    backend = make_backend(backend_name, opts, watch, probe)
    return Session(opts, index, backend, make_sinks(outputs, opts, index), watch).run()
