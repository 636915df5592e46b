"""`trace` and `agent`: live hostPort translations to the terminal, JSON lines, a recording
and Prometheus metrics, all fed by one session (collect/session.py)."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import click

from bpftrace_hostport.cli.options import (Fail, cidrs, host_ports, lab_target, parse_size,
                                           pod_options, resolver, user_errors)
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.nopandas import keep_pandas_out


def filter_options(fn):
    """What to trace: --host-port, --proto, --client."""
    for deco in reversed([
        click.option("--host-port", "host_ports", multiple=True, metavar="PORT[/PROTO]",
                     help="Watch only these hostPorts (repeatable). Default: the ports of the pods and of "
                          "the node's nat rules; with none known, every DNAT to a local address."),
        click.option("--proto", "protos", multiple=True, type=click.Choice(["tcp", "udp", "sctp"]),
                     help="Only these protocols (repeatable)."),
        click.option("--client", "clients", multiple=True, metavar="CIDR", help="Only clients in CIDR (repeatable)."),
    ]):
        fn = deco(fn)
    return fn


def kernel_options(fn):
    """How to trace: sizes, timeout, backend."""
    for deco in reversed([
        click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="S",
                     help="Report a flow as unanswered after S seconds without a reply."),
        click.option("--flow-table", type=click.IntRange(1024, 1 << 22), default=65536, show_default=True,
                     help="Flows in flight the kernel can hold (started, not yet reported; more are "
                          "refused and counted as lost), and reported connections it remembers (LRU)."),
        click.option("--ringbuf-kb", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
                     help="Ring buffer size for answered-flow records, KiB (rounded to a power of two)."),
        click.option("--no-drops", is_flag=True, help="Do not attach skb:kfree_skb (drop attribution)."),
        click.option("--no-rules", is_flag=True, help="Do not read the node's nat rules for ports to watch."),
        click.option("--backend", type=click.Choice(["auto", "netfilter", "conntrack"]), default="auto",
                     show_default=True,
                     help="netfilter: eBPF on the netfilter link (Linux >= 6.4); conntrack: conntrack events only."),
        click.option("--ready-file", type=click.Path(), help="Write this file once the probes are attached."),
        click.option("--print-program", is_flag=True, hidden=True, help="Print the eBPF program and its -D constants."),
    ]):
        fn = deco(fn)
    return fn


def record_options(fn):
    """The recording: --max-size, --max-files, --anonymize (the path option is the command's own)."""
    for deco in reversed([
        click.option("--max-size", metavar="SIZE", help="Rotate the recording at SIZE (e.g. 256MiB)."),
        click.option("--max-files", type=click.IntRange(1, 100000), metavar="N",
                     help="Keep at most N recording files (oldest removed)."),
        click.option("--anonymize", is_flag=True,
                     help="Replace client addresses by keyed prefix-preserving pseudonyms (Crypto-PAn)."),
        click.option("--anonymize-key-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Key for --anonymize (default: a random key per run, never written anywhere)."),
        click.option("--metrics", metavar="[ADDR:]PORT",
                     help="Serve Prometheus metrics and /healthz here (default address 127.0.0.1)."),
    ]):
        fn = deco(fn)
    return fn


@click.command()
@click.option("--netns", metavar="NAME", help="Named network namespace of the node (default: the current one).")
@click.option("--lab", "lab_name", metavar="NAME", help="Trace a lab's node: its namespace and pod list.")
@click.option("--duration", type=click.FloatRange(min=0.1), metavar="S", help="Stop after S seconds (default: Ctrl-C / SIGTERM).")
@filter_options
@pod_options
@click.option("--format", "fmt", type=click.Choice(["table", "json", "none"]), default=None,
              help="table: live view (default on a terminal); json: one object per line (default otherwise); "
                   "none: no per-flow output (with --record or --metrics).")
@click.option("--record", "record_path", type=click.Path(), metavar="PATH",
              help="Also write a recording (Arrow IPC stream, crash-safe) to PATH, or into PATH if it is a directory.")
@record_options
@kernel_options
@user_errors
def trace(netns, lab_name, duration, host_ports, protos, clients, pod_files, pods_from, kubeconfig, node_name,
          fmt, record_path, max_size, max_files, anonymize, anonymize_key_file, metrics, **kernel):
    """Trace hostPort translations live: client -> nodeIP:hostPort became podIP:containerPort.

    \b
    Examples:
      sudo bpftrace-hostport trace --pods pods.json
      sudo bpftrace-hostport trace --lab demo --duration 10 --format json
      sudo bpftrace-hostport trace --record /var/tmp/incident.arrow --format none
      sudo bpftrace-hostport trace --netns node1 --host-port 5353/udp --client 10.0.0.0/8
    """
    if fmt is None:
        fmt = "table" if sys.stdout.isatty() else "json"
    target = Target(netns, lab_name, list(pod_files), pods_from, kubeconfig, node_name)
    with _stopped_early():
        run(target, Want(duration, host_ports, protos, clients, **kernel),
            dict(fmt=fmt, record_path=record_path, max_size=max_size, max_files=max_files,
                 anonymize=anonymize, anonymize_key_file=anonymize_key_file, metrics=metrics))


@click.command()
@click.option("--netns", metavar="NAME", help="Named network namespace of the node (default: the current one).")
@click.option("--lab", "lab_name", metavar="NAME", help="Run on a lab's node (demos, tests).")
@pod_options
@filter_options
@click.option("--record-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep a rotating recording in DIR (bounded by --max-size and --max-files).")
@record_options
@click.option("--check-interval", type=click.FloatRange(min=1), default=60.0, show_default=True, metavar="S",
              help="Run `check` every S seconds and export its findings as metrics.")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line on stderr.")
@kernel_options
@user_errors
def agent(netns, lab_name, pod_files, pods_from, kubeconfig, node_name, host_ports, protos, clients, record_dir, max_size,
          max_files, anonymize, anonymize_key_file, metrics, check_interval, log_json, **kernel):
    """Run on a node until stopped: metrics, check findings, an optional rotating recording.

    What the DaemonSet in deploy/ runs. Pods come from the Kubernetes API (node-scoped watch).

    \b
    Example:
      sudo bpftrace-hostport agent --metrics 0.0.0.0:9469 --record-dir /var/lib/bpftrace-hostport \\
          --max-size 256MiB --max-files 8
    """
    from bpftrace_hostport.collect import logline
    from bpftrace_hostport.collect.agent import AgentOptions
    logline.use_json(log_json)           # every line on stderr from here on, the error too
    try:
        if record_dir and os.geteuid() == 0:
            os.makedirs(record_dir, mode=0o700, exist_ok=True)
        target = Target(netns, lab_name, list(pod_files), pods_from, kubeconfig, node_name)
        with _stopped_early():
            run(target, Want(None, host_ports, protos, clients, **kernel),
                dict(fmt="none", record_path=record_dir, max_size=max_size or ("256MiB" if record_dir else None),
                     max_files=max_files or (8 if record_dir else None), anonymize=anonymize,
                     anonymize_key_file=anonymize_key_file, metrics=metrics or "9469",
                     agent=AgentOptions(check_interval=check_interval, log_json=log_json)))
    except (UserError, click.ClickException) as e:
        if not log_json:
            raise
        logline.emit("error", e.format_message() if isinstance(e, click.ClickException) else str(e),
                     level="error")
        sys.exit(2)


@dataclass
class Target:
    """Which node a trace looks at, and where its pods' names come from (the pod options)."""
    netns: Optional[str]
    lab_name: Optional[str]
    pod_files: List[str]
    pods_from: Optional[str]
    kubeconfig: Optional[str]
    node_name: Optional[str]


@dataclass
class Want:
    """What to trace and how (the filter and kernel option families)."""
    duration: Optional[float]
    host_ports: Sequence[str]
    protos: Sequence[str]
    clients: Sequence[str]
    timeout: float
    flow_table: int
    ringbuf_kb: int
    no_drops: bool
    no_rules: bool
    backend: str
    ready_file: Optional[str]
    print_program: bool


@contextlib.contextmanager
def _stopped_early():
    """Ctrl-C before run() set its handlers (while the command line is parsed): a plain note and
    exit 0, not click's "Aborted!" and exit 1."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("note: stopped before tracing started: nothing was traced.", err=True)


def run(target: Target, want: Want, out: dict) -> None:
    """A trace: the options checked and made typed (collect/options.TraceOptions,
    collect/outputs.Outputs), every pre-flight check (collect/preflight.py), the programs
    loaded, the pods resolved, the session run. From the first moment Ctrl-C and SIGTERM only
    ask the trace to stop (collect/options.Stop): whenever they come it ends cleanly, exit 0."""
    import signal
    from bpftrace_hostport.cli import EARLY_STOP
    from bpftrace_hostport.collect.options import Stop
    stop = Stop()
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if EARLY_STOP:                 # a signal while the command was imported
        stop()
    try:
        _run(target, want, out, stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _run(target: Target, want: Want, out: dict, stop) -> None:
    from bpftrace_hostport.collect import preflight
    from bpftrace_hostport.collect.options import TraceOptions
    from bpftrace_hostport.collect.outputs import Outputs
    from bpftrace_hostport.netns import require
    if os.geteuid() != 0:        # before asking any pod source: the first thing to say
        raise Fail("Tracing needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): run it with sudo.")
    t = target
    pod_files = list(t.pod_files)
    netns, node_name = t.netns, t.node_name
    if t.lab_name:
        netns, pods_file, lab_node = lab_target(t.lab_name, netns)
        pod_files.append(pods_file)
        node_name = node_name or lab_node
    require(netns)
    pages = 1
    while pages * 4 < want.ringbuf_kb:
        pages *= 2
    opts = TraceOptions(netns=netns, duration=want.duration, host_ports=host_ports(want.host_ports, want.protos),
                        protos=list(want.protos), client_cidrs=cidrs(want.clients), timeout=want.timeout,
                        ready_file=want.ready_file, flow_table_size=want.flow_table, ringbuf_pages=pages,
                        drops=not want.no_drops, use_rules=not want.no_rules,
                        debug_print_program=want.print_program, node_name=node_name)
    if out["fmt"] == "none" and not (out["record_path"] or out["metrics"]):
        raise Fail("--format none writes nothing: add --record PATH or --metrics PORT.")
    from bpftrace_hostport.cli.node import check_hint
    # --lab already names the lab's pod list: the suggested command stays short
    outputs = Outputs(fmt=out["fmt"], check_hint=check_hint(t.lab_name, netns, t.pod_files, t.pods_from),
                      record_path=out["record_path"],
                      max_size=parse_size(out["max_size"]) if out["max_size"] else None,
                      max_files=out["max_files"],
                      anonymize_key=_anonymize_key(out["anonymize"], out["anonymize_key_file"]),
                      metrics=out["metrics"], agent=out.get("agent"))
    preflight.outputs(record=outputs.record_path, ready=want.ready_file,
                      anonymized=outputs.anonymize_key is not None, print_program=want.print_program)
    backend = _preflight(want.backend, opts, outputs)
    try:
        with keep_pandas_out():
            backend, probe = _load_first(backend, opts)
            try:
                if stop.flag:
                    click.echo("note: stopped before tracing started: nothing was traced.", err=True)
                    return
                index = resolver(pod_files, t.pods_from, netns, node_name, t.kubeconfig)
                try:
                    _run_backend(backend, opts, index, outputs, probe, stop)
                finally:
                    index.stop()
            finally:
                if probe is not None:
                    probe.close()    # already closed when a session ran; not when the pods failed
    finally:
        if outputs.metrics_socket is not None:
            outputs.metrics_socket.close()     # the sink's own once it served; else unused


def _preflight(backend: str, opts, outputs) -> str:
    """The pre-flight checks (collect/preflight.py), before anything is loaded: the metrics port
    is bound and held for the sink; the netfilter priority is tried with a program that lets
    everything through. -> the backend to load (auto falls back, saying so, on a kernel without
    netfilter BPF links)."""
    from bpftrace_hostport.collect import preflight
    outputs.metrics_socket = preflight.metrics_listener(outputs.metrics)
    if backend == "conntrack":
        return backend
    try:
        preflight.netfilter_priority(opts.netns)
    except UserError as e:
        if backend != "auto" or not getattr(e, "fallback", False):
            if outputs.metrics_socket is not None:
                outputs.metrics_socket.close()
            raise
        _falling_back(e)
        return "conntrack"
    return backend


def _anonymize_key(anonymize: bool, key_file: Optional[str]) -> Optional[bytes]:
    if key_file:
        try:
            with open(key_file, "rb") as f:
                key = f.read()
        except OSError as e:
            raise Fail(f"Cannot read the anonymization key {key_file}: {e.strerror}; check the path.") from None
        if len(key.strip()) < 16:
            raise Fail(f"The anonymization key in {key_file} is shorter than 16 bytes; use a longer secret.")
        return key.strip()
    if anonymize:
        from bpftrace_hostport.records.anonymize import new_key
        return new_key()
    return None


def _load_first(backend: str, opts):
    """The netfilter backend's eBPF programs, loaded before the pod sources, rules and sinks are
    imported and read, so that a compile child runs beside a small tracer (outputs.load_probe).
    -> (the backend to run, the loaded probe or None)."""
    if backend == "conntrack":
        return backend, None
    from bpftrace_hostport.collect.outputs import load_probe
    try:
        return backend, load_probe(opts)
    except UserError as e:
        if backend != "auto" or not getattr(e, "fallback", False):
            raise
        _falling_back(e)
        return "conntrack", None


def _run_backend(backend: str, opts, index, outputs, probe=None, stop=None) -> None:
    from bpftrace_hostport.collect.outputs import run_session
    if backend != "auto":
        run_session(backend, opts, index, outputs, probe, stop=stop)
        return
    try:
        run_session("netfilter", opts, index, outputs, probe, stop=stop)
    except UserError as e:
        if not getattr(e, "fallback", False):
            raise
        _falling_back(e)
        run_session("conntrack", opts, index, outputs, stop=stop)


def _falling_back(e: UserError) -> None:
    from bpftrace_hostport.collect import logline
    logline.warning(f"{e} Falling back to conntrack events (no latency, misses or drops).",
                    backend="conntrack")


COMMANDS = [trace, agent]
