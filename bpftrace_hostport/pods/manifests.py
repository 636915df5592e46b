"""Turn workload manifests into the pods Kubernetes would create for them.

`parse_manifests` reads multi-document YAML (or JSON, or a `kind: List`), keeps the
workload kinds (Pod, Deployment, ReplicaSet, ReplicationController, StatefulSet,
DaemonSet, Job), checks what the API server would check about their container ports,
and expands each into `PodPlan`s, one per pod the controller would start.

Pod names follow Kubernetes' patterns but the random parts are derived from hashes,
so the same manifest always yields the same names:

* Deployment  -> <name>-<pod-template-hash>-<suffix>; the 10-character hash is FNV-32a
  of the pod template encoded the way the Deployment controller does it, the suffix
  is 5 characters of Kubernetes' alphabet taken from a hash of kind/namespace/name/index;
* ReplicaSet, ReplicationController, DaemonSet, Job -> <name>-<suffix>
  (an Indexed Job gives <name>-<index>-<suffix>, as the Job controller does);
* StatefulSet -> <name>-<ordinal> (from spec.ordinals.start, default 0);
* Pod         -> metadata.name, or metadata.generateName plus a suffix.

Every problem is a `UserError` whose message names the file, the document and the object.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Sequence, Set, Tuple

import yaml

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.files import read_text
from bpftrace_hostport.model import ContainerPort

__all__ = ["PodPlan", "load_manifests", "parse_manifests", "WORKLOAD_KINDS"]

WORKLOAD_KINDS = ("Pod", "Deployment", "ReplicaSet", "ReplicationController",
                  "StatefulSet", "DaemonSet", "Job")
PROTOCOLS = protomod.K8S
MAX_PODS = 1000                         # replicas / parallelism of one workload: a node runs ~110 pods

# k8s.io/apimachinery/pkg/util/rand: no vowels, no look-alikes (0/o, 1/l, 3/e).
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATED_PREFIX = 63 - 5          # names.SimpleNameGenerator truncates the base to this
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


@dataclass(frozen=True)
class PodPlan:
    namespace: str                       # metadata.namespace or "default"
    name: str                            # the pod name Kubernetes would give (see module docstring)
    workload: str                        # "Deployment/nginx-hostport", "Pod/foo"
    labels: Dict[str, str] = field(default_factory=dict, hash=False)
    host_network: bool = False
    containers: Tuple[str, ...] = ()
    ports: Tuple[ContainerPort, ...] = ()   # every declared container port, in declaration order

    @property
    def host_ports(self) -> Tuple[ContainerPort, ...]:
        return tuple(p for p in self.ports if p.host_port)


# --------------------------------------------------------------------------- reading

def read_source(path: str) -> Tuple[str, str]:
    """Return (text, origin) for a file path, or for standard input when path is "-"."""
    if path == "-":
        try:
            return sys.stdin.read(), "<stdin>"
        except UnicodeDecodeError:
            raise UserError("Standard input is not UTF-8 text; pipe a YAML or JSON file instead.") from None
    return read_text(path, "a YAML or JSON file", encoding="utf-8-sig"), path


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader that leaves timestamps as strings, as the Kubernetes API does."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _json_documents(text: str) -> List[Any]:
    """One or more concatenated JSON values (kubectl may print several objects in a row)."""
    decoder = json.JSONDecoder()
    docs, pos, end = [], 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return docs
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)


def load_documents(text: str, origin: str) -> List[Any]:
    """Parse JSON or multi-document YAML; empty documents are dropped.

    Text that starts with '{' or '[' is JSON and nothing else, as kubectl decides it;
    a syntax error becomes a UserError that names the origin and the line.
    """
    text = text.lstrip("\ufeff")
    too_big = UserError(f"{origin} holds a value that cannot be read (a number too long, nesting too deep "
                        f"or a bad !!int or !!float); fix that value and try again.")
    if text.lstrip()[:1] in ("{", "["):
        try:
            return _json_documents(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{origin} is not valid JSON (line {e.lineno}: {e.msg}); "
                            f"fix the syntax and try again.") from None
        except (ValueError, RecursionError):      # > 4300 digits (int() refuses them), deep nesting
            raise too_big from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except (ValueError, RecursionError):          # !!float 'x', a 5000-digit number, deep nesting
        raise too_big from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or getattr(e, "context", None) or "syntax error"
        problem = " ".join(str(problem).split()).rstrip(".")
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"{origin} is not valid YAML or JSON ({where}{problem}); "
                        f"fix the syntax and try again.") from None
    if "*" in text and _expanded_size(docs, 2 * len(text) + 1000) > 2 * len(text) + 1000:
        # Aliases of aliases ("billion laughs"): kubectl refuses them too (excessive aliasing).
        raise UserError(f"{origin} uses YAML aliases that expand to far more than the file holds; "
                        f"write the objects out in full.")
    return docs


def _expanded_size(docs: List[Any], limit: int) -> int:
    """How many values `docs` hold with every alias expanded, counting no further than `limit`."""
    count, stack = 0, list(docs)
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
    return count


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        return _quoted(value)
    if value is None:
        return "empty"
    try:
        text = repr(value)
    except ValueError:                      # an int of more than 4300 digits
        return "a very long number"
    return text if len(text) <= 40 else f"{text[:37]}..."


def _quoted(text: str) -> str:
    """A user's string in a message: quoted, on one line (newlines and the like escaped), short."""
    short = text if len(text) <= 40 else text[:37] + "..."
    return '"' + "".join(c if c.isprintable() else repr(c)[1:-1] for c in short) + '"'


def _objects(docs: List[Any], origin: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yield (label, object) for every object, with `kind: List` items flattened."""

    def walk(obj: Any, label: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        if not isinstance(obj, dict):
            raise UserError(f"{origin} {label} is {_describe(obj)}, not a mapping; "
                            f"each document must be a Kubernetes object with apiVersion, kind and metadata.")
        kind = obj.get("kind")
        if not isinstance(kind, str) or not kind:
            raise UserError(f"{origin} {label} has no kind; "
                            f"add a kind such as Deployment or Pod to each document.")
        if kind == "List" or (kind.endswith("List") and "items" in obj):
            items = obj.get("items") or []
            if not isinstance(items, list):
                raise UserError(f"{origin} {label} is a {_quoted(kind)} whose items is not a list; "
                                f"put the objects in a list under items.")
            for i, item in enumerate(items, 1):
                yield from walk(item, f"{label} item {i}")
            return
        yield label, obj

    for n, doc in enumerate(docs, 1):
        yield from walk(doc, f"document {n}")


# --------------------------------------------------------------------------- naming

def _suffix(key: str, length: int = 5) -> str:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:length])


def _fnv32a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def template_hash(template: Any) -> str:
    """pod-template-hash: FNV-32a of the template, its decimal digits safe-encoded (10 chars).

    Kubernetes hashes its own dump of the Go struct, so the value differs from a real
    cluster's, but it has the same shape and changes whenever the template changes.
    """
    data = json.dumps(template, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return "".join(_ALPHABET[ord(c) % len(_ALPHABET)] for c in f"{_fnv32a(data):010d}")


def _generated(base: str, key: str, taken: Set[str]) -> str:
    """base + 5-char suffix as names.SimpleNameGenerator does, deterministic and unique in `taken`."""
    base = base[:_MAX_GENERATED_PREFIX]
    attempt = 0
    while True:
        name = base + _suffix(key if attempt == 0 else f"{key}#{attempt}")
        if name not in taken:
            taken.add(name)
            return name
        attempt += 1


# --------------------------------------------------------------------------- validation

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Ctx:
    """Where we are, for error messages: '<file> document 2: Deployment "ns/name"'."""

    def __init__(self, origin: str, label: str, kind: str, namespace: str = "", name: str = ""):
        self.origin, self.label, self.kind = origin, label, kind
        self.namespace, self.name = namespace, name

    @property
    def obj(self) -> str:
        if self.name:
            return f'{self.kind} "{self.namespace}/{self.name}"'
        return f"the {self.kind}"

    def fail(self, problem: str, fix: str) -> UserError:
        return UserError(f"{self.origin} {self.label}: {self.obj} {problem}; {fix}.")


def _mapping(value: Any, path: str, ctx: _Ctx, required: bool = True) -> Dict[str, Any]:
    if value is None and not required:
        return {}
    if value is None:
        raise ctx.fail(f"has no {path}", f"add {path} to it")
    if not isinstance(value, dict):
        raise ctx.fail(f"has {path} that is {_describe(value)}, not a mapping", f"make {path} a mapping")
    return value


def _labels(value: Any, path: str, ctx: _Ctx) -> Dict[str, str]:
    labels = _mapping(value, path, ctx, required=False)
    for key, val in labels.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise ctx.fail(f'has label {_describe(key)} with value {_describe(val)} in {path}, and Kubernetes only accepts strings',
                           'quote the value, for example "1" or "true"')
    return dict(labels)


def _metadata(obj: Dict[str, Any], ctx: _Ctx, allow_generate: bool = False) -> Tuple[str, str, bool]:
    """Return (namespace, name, generated) and fill ctx."""
    meta = _mapping(obj.get("metadata"), "metadata", ctx)
    namespace = meta.get("namespace")
    if namespace is None or namespace == "":
        namespace = "default"
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
        raise ctx.fail(f"has metadata.namespace {_describe(namespace)}, which is not a valid namespace name",
                       "use lower-case letters, digits and '-' (at most 63 characters)")
    ctx.namespace = namespace
    name = meta.get("name")
    generated = False
    if (name is None or name == "") and allow_generate and meta.get("generateName"):
        name, generated = meta.get("generateName"), True
    if name is None or name == "":
        raise ctx.fail("has no metadata.name", "give it a name")
    if not isinstance(name, str):
        raise ctx.fail(f"has metadata.name {_describe(name)}", "give it a name made of lower-case letters, digits, '-' and '.'")
    check = name.rstrip("-") if generated else name
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(check):
        raise ctx.fail(f'has the invalid name {_quoted(name)}',
                       "use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit")
    ctx.name = name
    return namespace, name, generated


def _count(spec: Dict[str, Any], key: str, ctx: _Ctx, default: int = 1, path: str = "spec") -> int:
    value = spec.get(key)
    if value is None:
        return default
    if not _is_int(value) or value < 0:
        raise ctx.fail(f"has {path}.{key} {_describe(value)}", f"set {path}.{key} to a whole number of 0 or more")
    if key in ("replicas", "parallelism") and value > MAX_PODS:
        raise ctx.fail(f"has {path}.{key} {_describe(value)}, more pods than one lab node runs",
                       f"set {path}.{key} to {MAX_PODS} or fewer")
    if value > 2 ** 31 - 1:
        raise ctx.fail(f"has {path}.{key} {_describe(value)}, beyond what Kubernetes accepts (a 32-bit integer)",
                       f"set {path}.{key} to {2 ** 31 - 1} or less")
    return value


def _port_number(value: Any, field_name: str, where: str, ctx: _Ctx) -> int:
    if value is None:
        raise ctx.fail(f"{where} has an empty {field_name}", "use a port number from 1 to 65535")
    if not _is_int(value):
        fix = ("write it as a number without quotes" if isinstance(value, str) and value.strip().isdigit()
               else "use a port number from 1 to 65535")
        raise ctx.fail(f"{where} has {field_name} {_describe(value)}, which is not an integer", fix)
    if not 1 <= value <= 65535:
        raise ctx.fail(f"{where} has {field_name} {value}, which is outside 1-65535", "use a port number from 1 to 65535")
    return value


def _containers(pod_spec: Dict[str, Any], spec_path: str, ctx: _Ctx) -> Tuple[bool, Tuple[str, ...], Tuple[ContainerPort, ...]]:
    host_network = pod_spec.get("hostNetwork")
    if host_network is None:
        host_network = False
    if not isinstance(host_network, bool):
        raise ctx.fail(f"has {spec_path}.hostNetwork {_describe(host_network)}", "set it to true or false")

    containers = pod_spec.get("containers")
    if not containers:
        raise ctx.fail(f"has no containers in {spec_path}.containers", "add at least one container with a name and an image")
    if not isinstance(containers, list):
        raise ctx.fail(f"has {spec_path}.containers that is {_describe(containers)}, not a list",
                       "list the containers under containers with a leading '-'")

    names: List[str] = []
    ports: List[ContainerPort] = []
    seen = _PortsSeen()
    for i, container in enumerate(containers, 1):
        if not isinstance(container, dict):
            raise ctx.fail(f"has container {i} that is {_describe(container)}, not a mapping", "give each container a name and an image")
        cname = container.get("name")
        if not isinstance(cname, str) or not cname:
            raise ctx.fail(f"has container {i} without a name", "give every container a name")
        if len(cname) > 63 or not _DNS_LABEL.fullmatch(cname):
            raise ctx.fail(f'has a container with the invalid name {_quoted(cname)}',
                           "use lower-case letters, digits and '-' (at most 63 characters)")
        if cname in names:
            raise ctx.fail(f'has two containers named "{cname}"', "give each container its own name")
        names.append(cname)

        declared = container.get("ports")
        if declared is None:
            continue
        if not isinstance(declared, list):
            raise ctx.fail(f'container "{cname}" has ports that is {_describe(declared)}, not a list',
                           "list the ports under ports with a leading '-'")
        ports += [_port(port, j, cname, host_network, seen, ctx) for j, port in enumerate(declared, 1)]
    return host_network, tuple(names), tuple(ports)


class _PortsSeen:
    """Port names and host bindings already declared in the pod (each may appear once)."""

    def __init__(self):
        self.names: Set[str] = set()
        self.bindings: Set[Tuple[str, str, int]] = set()


def _port(port: Any, j: int, cname: str, host_network: bool, seen: "_PortsSeen",
          ctx: _Ctx) -> ContainerPort:
    """One entry of a container's ports, checked as the API server would."""
    where = f'container "{cname}" port {j}'
    if not isinstance(port, dict):
        raise ctx.fail(f"{where} is {_describe(port)}, not a mapping", "give each port a containerPort")
    pname = port.get("name")
    if pname is not None and pname != "":
        if not isinstance(pname, str) or len(pname) > 15 or not _IANA_SVC_NAME.fullmatch(pname) \
                or "--" in pname or not re.search(r"[a-z]", pname):
            raise ctx.fail(f"{where} has the invalid name {_describe(pname)}",
                           "use at most 15 lower-case letters, digits and '-', with at least one letter")
        where = f'container "{cname}" port "{pname}"'
        if pname in seen.names:
            raise ctx.fail(f'declares the port name "{pname}" twice', "give each port in the pod its own name")
        seen.names.add(pname)
    else:
        pname = None
    if "containerPort" not in port:
        raise ctx.fail(f"{where} has no containerPort", "add the port number the container listens on")
    container_port = _port_number(port.get("containerPort"), "containerPort", where, ctx)

    host_port = port.get("hostPort")
    if host_port == 0 and _is_int(host_port):   # 0 means "no hostPort" to Kubernetes
        host_port = None
    if host_port is not None:
        host_port = _port_number(host_port, "hostPort", where, ctx)

    protocol = port.get("protocol")
    if protocol is None or protocol == "":
        protocol = "TCP"
    if protocol not in PROTOCOLS:
        if isinstance(protocol, str) and protocol.upper() in PROTOCOLS:
            raise ctx.fail(f'{where} has protocol "{protocol}", and Kubernetes only accepts upper case',
                           f'write it as "{protocol.upper()}"')
        raise ctx.fail(f"{where} has protocol {_describe(protocol)}, which Kubernetes does not support",
                       "use TCP, UDP or SCTP")

    host_ip = port.get("hostIP")
    if host_ip == "":
        host_ip = None
    if host_ip is not None:
        try:
            host_ip = str(ipaddress.ip_address(host_ip))
        except ValueError:
            raise ctx.fail(f"{where} has hostIP {_describe(host_ip)}, which is not an IP address",
                           "use an IPv4 or IPv6 address or remove hostIP") from None

    if host_network:
        if host_port is None:           # the API server defaults it (SetDefaults_Pod)
            host_port = container_port
        elif host_port != container_port:
            raise ctx.fail(f"{where} has hostPort {host_port} but containerPort {container_port}, "
                           f"and Kubernetes rejects a hostNetwork pod whose hostPort differs from its containerPort",
                           f"set hostPort to {container_port} or remove it")
    if host_port is not None:
        key = (host_ip or "", protocol, host_port)
        if key in seen.bindings:
            ip = f" on {host_ip}" if host_ip else ""
            raise ctx.fail(f"declares hostPort {host_port}/{protocol}{ip} twice, which Kubernetes rejects",
                           "give each port its own hostPort")
        seen.bindings.add(key)
    return ContainerPort(container=cname, container_port=container_port, protocol=protocol,
                         name=pname, host_port=host_port, host_ip=host_ip)


# --------------------------------------------------------------------------- expansion

@dataclass(frozen=True)
class _Planned:
    plan: PodPlan
    where: str             # '<file> document 2'
    obj: str               # 'Deployment "ns/name"'
    key: Tuple[str, str, str]
    source: object         # identity of the manifest object that produced it


def _expand(obj: Dict[str, Any], kind: str, origin: str, label: str, source: object) -> List[_Planned]:
    ctx = _Ctx(origin, label, kind)
    namespace, name, generated = _metadata(obj, ctx, allow_generate=(kind == "Pod"))
    spec = _mapping(obj.get("spec"), "spec", ctx)
    workload = f"{kind}/{name}"

    if kind == "Pod":
        pod_spec, spec_path = spec, "spec"
        labels = _labels(obj["metadata"].get("labels"), "metadata.labels", ctx)
        template: Dict[str, Any] = {}
    else:
        template = _mapping(spec.get("template"), "spec.template", ctx)
        pod_spec = _mapping(template.get("spec"), "spec.template.spec", ctx)
        spec_path = "spec.template.spec"
        template_meta = _mapping(template.get("metadata"), "spec.template.metadata", ctx, required=False)
        labels = _labels(template_meta.get("labels"), "spec.template.metadata.labels", ctx)
    host_network, containers, ports = _containers(pod_spec, spec_path, ctx)

    names: List[Tuple[str, Dict[str, str]]] = []   # (pod name, extra labels)
    taken: Set[str] = set()

    def key(i: Any) -> str:
        return f"{kind}/{namespace}/{name}/{i}"

    if kind == "Pod":
        names.append((_generated(name, key(0), taken) if generated else name, {}))
    elif kind == "Deployment":
        try:
            h = template_hash(template)
        except (ValueError, TypeError):     # a key that is not a string, an int of > 4300 digits
            raise ctx.fail("has a spec.template that cannot be written as JSON (a key that is not a string, "
                           "or a number too long)", "quote such keys and values") from None
        for i in range(_count(spec, "replicas", ctx)):
            names.append((_generated(f"{name}-{h}-", key(i), taken), {"pod-template-hash": h}))
    elif kind in ("ReplicaSet", "ReplicationController"):
        for i in range(_count(spec, "replicas", ctx)):
            names.append((_generated(f"{name}-", key(i), taken), {}))
    elif kind == "DaemonSet":                       # one node: one pod
        names.append((_generated(f"{name}-", key(0), taken), {}))
    elif kind == "StatefulSet":
        ordinals = _mapping(spec.get("ordinals"), "spec.ordinals", ctx, required=False)
        start = _count(ordinals, "start", ctx, default=0, path="spec.ordinals") if ordinals else 0
        for i in range(start, start + _count(spec, "replicas", ctx)):
            pod = f"{name}-{i}"
            names.append((pod, {"statefulset.kubernetes.io/pod-name": pod, "apps.kubernetes.io/pod-index": str(i)}))
    elif kind == "Job":
        parallelism = _count(spec, "parallelism", ctx)
        completions = spec.get("completions")
        if completions is not None:
            parallelism = min(parallelism, _count(spec, "completions", ctx))
        indexed = spec.get("completionMode") == "Indexed"
        job_labels = {"job-name": name, "batch.kubernetes.io/job-name": name}
        for i in range(parallelism):
            extra = dict(job_labels)
            if indexed:
                extra["batch.kubernetes.io/job-completion-index"] = str(i)
            names.append((_generated(f"{name}-{i}-" if indexed else f"{name}-", key(i), taken), extra))
    else:  # pragma: no cover - WORKLOAD_KINDS is exhaustive above
        raise AssertionError(kind)

    return [_Planned(PodPlan(namespace=namespace, name=pod_name, workload=workload, labels={**labels, **extra},
                             host_network=host_network, containers=containers, ports=ports),
                     f"{origin} {label}", ctx.obj, (kind, namespace, name), source)
            for pod_name, extra in names]


def _parse(text: str, origin: str) -> List[_Planned]:
    planned: List[_Planned] = []
    seen_workload = False
    for label, obj in _objects(load_documents(text, origin), origin):
        kind = obj["kind"]
        if kind == "CronJob":
            obj, kind = _job_of_cronjob(obj, origin, label), "Job"
        if kind not in WORKLOAD_KINDS:
            continue                      # Service, ConfigMap, ...: not ours
        seen_workload = True
        planned.extend(_expand(obj, kind, origin, label, object()))
    if not seen_workload:
        raise UserError(f"{origin} contains no workload; give it at least one Pod, Deployment, ReplicaSet, "
                        f"StatefulSet, DaemonSet, Job or CronJob.")
    return planned


def _job_of_cronjob(obj: Dict[str, Any], origin: str, label: str) -> Dict[str, Any]:
    """The Job a CronJob runs (its spec.jobTemplate), as `kubectl create job --from=cronjob/NAME`
    would make it: the lab runs it once, now, named <cronjob>-lab."""
    ctx = _Ctx(origin, label, "CronJob")
    meta = _mapping(obj.get("metadata"), "metadata", ctx)
    template = _mapping(_mapping(obj.get("spec"), "spec", ctx).get("jobTemplate"), "spec.jobTemplate", ctx)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ctx.fail("has no metadata.name", "give the CronJob a name")
    job_meta = {"name": f"{name}-lab"[:63].rstrip("-"),
                **({"namespace": meta["namespace"]} if "namespace" in meta else {})}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta,
            "spec": _mapping(template.get("spec"), "spec.jobTemplate.spec", ctx)}


def scheduling_notes(plans: Sequence[PodPlan]) -> List[str]:
    """What a scheduler would say about these pods on one node, one sentence each: no hostPort at
    all (nothing for the tracer to see), and pods that claim the same hostPort (a real node
    runs only one of them; the others stay Pending)."""
    if not any(p.host_ports for p in plans):
        return ["None of the pods declares a hostPort: the lab builds, but there is no hostPort "
                "traffic to trace; add hostPort to a container port."]
    claims: Dict[Tuple[str, str, int], List[PodPlan]] = {}
    for p in plans:
        for cp in p.host_ports:
            claims.setdefault((cp.host_ip or "", cp.protocol, cp.host_port), []).append(p)
    notes = []
    for (ip, proto, port), pods in sorted(claims.items()):
        if len(pods) > 1:
            who = ", ".join(f"{p.namespace}/{p.name}" for p in pods)
            notes.append(f"{len(pods)} pods claim hostPort {port}/{proto}{' on ' + ip if ip else ''} ({who}): "
                         "a real node runs only one of them and the scheduler leaves the others Pending; "
                         "the lab starts them all, as a conflict.")
    return notes


def _check_unique(planned: List[_Planned]) -> None:
    objects: Dict[Tuple[str, str, str], _Planned] = {}
    pods: Dict[Tuple[str, str], _Planned] = {}
    for item in planned:
        first = objects.setdefault(item.key, item)
        if first.source is not item.source:
            raise UserError(f"{item.where}: {item.obj} is declared twice (also in {first.where}); "
                            f"remove or rename one of them.")
    for item in planned:
        first = pods.setdefault((item.plan.namespace, item.plan.name), item)
        if first.source is not item.source:
            raise UserError(f'{item.where}: {item.obj} would create pod "{item.plan.namespace}/{item.plan.name}", '
                            f"which {first.obj} in {first.where} already creates; rename one of them.")


def parse_manifests(text: str, origin: str = "<text>") -> List[PodPlan]:
    """The pods Kubernetes would create for the workloads in `text` (YAML or JSON)."""
    planned = _parse(text, origin)
    _check_unique(planned)
    return [p.plan for p in planned]


def load_manifests(paths: List[str]) -> List[PodPlan]:
    """parse_manifests over files ("-" = stdin); pod names must be unique across all of them."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("No manifest was given; pass at least one YAML or JSON file, or - for standard input.")
    planned: List[_Planned] = []
    for path in paths:
        text, origin = read_source(path)
        planned.extend(_parse(text, origin))
    _check_unique(planned)
    return [p.plan for p in planned]
