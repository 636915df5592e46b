"""Shared pieces of the command line: the error boundary and the option families.

Each family is declared once and carries the same names on every command (pwru's habit):
the pod options on trace, rules and check; the filters on trace and report.
"""
from __future__ import annotations

import functools
import ipaddress
import os
from typing import List, Optional, Sequence, Tuple

import click

from bpftrace_hostport.errors import UserError


class Fail(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Library errors (UserError) become `Error: <sentence>` and exit 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            raise Fail(str(e)) from None
    return wrapper


def lab_target(lab_name: str, netns: Optional[str]) -> Tuple[str, str, str]:
    """`--lab NAME`: the lab node's (network namespace, pod list file, node name)."""
    from bpftrace_hostport.lab.build import LabState
    st = LabState.load(lab_name)
    if netns and netns != st.node_netns:
        raise Fail("--lab and --netns name different namespaces; give one of them.")
    if st.runtime == "containerd":       # --pods-from cri asks the lab's own containerd
        from bpftrace_hostport.lab.containerd import endpoint
        from bpftrace_hostport.pods.cri import ENDPOINT_ENV
        os.environ.setdefault(ENDPOINT_ENV, endpoint(st.dir))
    return st.node_netns, str(st.pods_file), st.node_name


PODS_FROM = ("auto", "file", "kube", "cri", "cni", "none")


def _cri_endpoint(ctx, param, value):
    # Handed on as crictl's own variable, which pods/cri.py reads: the commands' signatures stay.
    if value:
        from bpftrace_hostport.pods.cri import ENDPOINT_ENV
        os.environ[ENDPOINT_ENV] = value
    return value


def pod_options(fn):
    """--pods / --pods-from / --cri-endpoint / --kubeconfig / --node-name: where pod metadata comes from."""
    for deco in reversed([
        click.option("--pods", "pod_files", multiple=True, type=click.Path(), metavar="FILE",
                     help="Pod list (kubectl get pods -o json, a Pod or PodList; YAML or JSON) naming "
                          "pods and ports (repeatable)."),
        click.option("--pods-from", type=click.Choice(PODS_FROM), default=None,
                     help="Pod metadata source. auto (default): --pods files, else the Kubernetes API, "
                          "the CRI runtime, or CNI state, the first that answers; with --lab: the lab's "
                          "pod list."),
        click.option("--cri-endpoint", metavar="ENDPOINT", expose_value=False, callback=_cri_endpoint,
                     help="CRI socket for --pods-from cri (default: $CONTAINER_RUNTIME_ENDPOINT, "
                          "/run/containerd/containerd.sock, /run/crio/crio.sock; a containerd lab's own)."),
        click.option("--kubeconfig", type=click.Path(),
                     help="Kubeconfig for --pods-from kube (default: $KUBECONFIG, ~/.kube/config, in-cluster)."),
        click.option("--node-name", "--node", "node_name", metavar="NAME",
                     help="This node's name (default: $NODE_NAME, a lab's node, or the host name)."),
    ]):
        fn = deco(fn)
    return fn


def pods_from_default(pods_from: Optional[str], pod_files: Sequence[str]) -> str:
    return pods_from or ("file" if pod_files else "auto")


def host_ports(values: Sequence[str], protos: Sequence[str]) -> List[Tuple[str, int]]:
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


def cidrs(values: Sequence[str]) -> List[str]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except ValueError:
            raise Fail(f"--client {v!r} is not an address or CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32).") from None
    return out


def load_pods(files: Sequence[str]):
    from bpftrace_hostport.pods.index import PodIndex
    from bpftrace_hostport.pods.podlist import read_pod_list
    index = PodIndex()
    for f in files:
        index.extend(read_pod_list(f))
    return index


def resolver(pod_files, pods_from, netns, node_name, kubeconfig):
    """A started Resolver over the chosen sources; notes about skipped sources go to stderr."""
    from bpftrace_hostport.node.rules import read_node_rules
    from bpftrace_hostport.pods.sources import Resolver, resolve_sources
    pods_from = pods_from_default(pods_from, pod_files)
    sources, notes = resolve_sources(list(pod_files), pods_from=pods_from, netns=netns,
                                     node_name=node_name, kubeconfig=kubeconfig,
                                     read_rules=read_node_rules)
    from bpftrace_hostport.collect import logline
    for n in notes:
        logline.note(n)
    resolver = Resolver(sources)
    resolver.start()
    return resolver


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456; a plain number is bytes."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise Fail(f"{text!r} is not a size; write e.g. 64MiB, 1GiB or 500000000.")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 64 * 1024:
        raise Fail(f"{text!r} is too small for a recording file; use at least 64KiB.")
    return size
