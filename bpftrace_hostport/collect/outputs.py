"""Choosing a backend and the sinks for a session, from the command line's outputs.

Imports nothing heavy itself: load_probe runs before the session's modules are imported.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple


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


@dataclass
class Outputs:
    """What a trace writes, as the command line asked for it."""
    fmt: str = "none"                              # table | json | none
    check_hint: Optional[str] = None               # the `check` command its notes suggest
    record_path: Optional[str] = None              # --record / --record-dir
    max_size: Optional[int] = None
    max_files: Optional[int] = None
    anonymize_key: Optional[bytes] = None
    metrics: Optional[str] = None                  # [ADDR:]PORT
    metrics_socket: Any = None                     # listening already (collect/preflight.py)
    agent: Any = None                              # collect/agent.AgentOptions


@dataclass(frozen=True)
class SinkEntry:
    """One output: when the command line wants it, and how it is made. What it needs from the
    kernel is declared by its Sink class (`needs`): "records" (a record per flow) or "counters"
    (the kernel's per-mapping counters; flows nobody answered still come as records)."""
    name: str
    wanted: Callable[[Outputs], bool]
    make: Callable[[Outputs, Any, Any, Dict[str, Any]], Any]


def _format_sink(o: Outputs, opts, index, made):
    from bpftrace_hostport.collect import sinks
    return sinks.output_sink(o.fmt, sys.stdout, o.check_hint, getattr(index, "pods", None))


def _recording_sink(o: Outputs, opts, index, made):
    from bpftrace_hostport.collect.sinks import RecordingSink
    # no key: the session replaces the clients before any sink sees them (--anonymize)
    return RecordingSink(o.record_path, o.max_size, o.max_files)


def _end_line_sink(o: Outputs, opts, index, made):
    from bpftrace_hostport.collect.sinks import EndLineSink
    return EndLineSink(made.get("recording"), o.metrics)


def _metrics_sink(o: Outputs, opts, index, made):
    from bpftrace_hostport.collect.metrics import MetricsSink
    from bpftrace_hostport.collect.session import node_name
    from bpftrace_hostport.errors import UserError
    try:
        return MetricsSink(node_name(opts), o.metrics, sock=o.metrics_socket)
    except ValueError as e:
        raise UserError(str(e)) from None


def _agent_sink(o: Outputs, opts, index, made):
    from bpftrace_hostport.collect.agent import AgentSink
    return AgentSink(o.agent, opts, index, made.get("metrics"))


#: Every output a session can have, in the order the sinks are made and called. Adding an
#: output is a Sink subclass with its `needs` and one entry here.
SINKS: Tuple[SinkEntry, ...] = (
    SinkEntry("format", lambda o: o.fmt != "none", _format_sink),
    SinkEntry("recording", lambda o: bool(o.record_path), _recording_sink),
    SinkEntry("metrics", lambda o: bool(o.metrics), _metrics_sink),
    SinkEntry("agent", lambda o: o.agent is not None, _agent_sink),
    # --format none prints nothing per flow: one line at the end says what was seen and where
    # the recording is (the agent logs its own "stopped" line instead)
    SinkEntry("end-line", lambda o: o.fmt == "none" and o.agent is None, _end_line_sink),
)
NEEDS = ("records", "counters")


def make_sinks(outputs: Outputs, opts, index) -> list:
    made: Dict[str, Any] = {}
    for entry in SINKS:
        if entry.wanted(outputs):
            sink = entry.make(outputs, opts, index, made)
            if getattr(type(sink), "needs", None) not in NEEDS:
                raise TypeError(f"sink {type(sink).__name__} does not declare what it needs "
                                f"(needs = one of {NEEDS})")
            made[entry.name] = sink
    return list(made.values())


def flow_records(sinks: list) -> bool:
    """Whether the kernel must send a record per flow: some sink needs them. Without one, no
    record is made per answered or refused flow at all (the kernel counts them)."""
    return any(type(s).needs == "records" for s in sinks)


def run_session(backend_name: str, opts, index, outputs: Outputs, probe=None, stop=None) -> dict:
    """probe: the netfilter backend's, from load_probe (None: the backend loads its own);
    stop: the trace's collect/options.Stop (signals seen before the session started count)."""
    from bpftrace_hostport.collect.session import Session, watch_list
    sinks = make_sinks(outputs, opts, index)
    opts = dataclasses.replace(opts, flow_records=flow_records(sinks))
    watch, notes = watch_list(opts, index)
    from bpftrace_hostport.collect import logline
    for n in notes:
        logline.note(n)
    backend = make_backend(backend_name, opts, watch, probe)
    return Session(opts, index, backend, sinks, watch, stop=stop, anonymize_key=outputs.anonymize_key).run()
