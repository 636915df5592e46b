"""Pod lists as `kubectl get pods -o json` (or `-o yaml`) writes them.

`read_pod_list` / `write_pod_list` move `PodInfo`s in and out of files that look like
the real thing: a v1 `List` of v1 `Pod`s, camelCase keys, keys sorted and indented by
four spaces as kubectl prints them. `pod_to_k8s` output deserializes with the official
kubernetes client (`V1Pod`) and `pod_from_k8s(pod_to_k8s(p)) == p`.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import ContainerPort, PodInfo
from bpftrace_hostport.pods.manifests import PROTOCOLS, PodPlan, _describe, load_documents, read_source

__all__ = ["pod_from_k8s", "pod_to_k8s", "read_pod_list", "write_pod_list", "plan_to_pod"]

_HINT = "pass the output of kubectl get pods -o json (or -o yaml)"
_DEFAULT_RUNTIME = "containerd"


# --------------------------------------------------------------------------- dict -> PodInfo

def _timestamp(value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):         # e.g. a dict built by hand or by a YAML loader
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return value.replace(microsecond=0).isoformat() + "Z"
    return str(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A value in a message: its repr (newlines and the like escaped), cut short."""
    try:
        text = repr(value)
    except ValueError:                      # an int of more than 4300 digits
        return "a very long number"
    return text if len(text) <= 40 else text[:37] + "..."


def _get(obj: dict, key: str, want: type, where: str, path: str) -> Any:
    """obj[key] when it is a `want` (str, list, dict, bool), None when absent, null or empty."""
    value = obj.get(key)
    if value is None or value == "" or value == [] or value == {}:
        return None
    if not isinstance(value, want):
        what = {str: "a string", list: "a list", dict: "a mapping", bool: "true or false"}[want]
        raise UserError(f"{where} has {path} {_shown(value)}, which is not {what}; {_HINT}.")
    return value


def _kind_name(kind: Any) -> str:
    return kind if isinstance(kind, str) and kind.isprintable() and len(kind) <= 40 else _describe(kind)


def _ip(value: Any, where: str, path: str) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise UserError(f"{where} has {path} {_shown(value)}, which is not an IP address; {_HINT}.") from None


def _pod(obj: Any, where: str) -> PodInfo:
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a mapping; {_HINT}.")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise UserError(f"{where} has no metadata.name; give every pod a name or {_HINT}.")
    namespace = _get(meta, "namespace", str, where, "metadata.namespace") or "default"
    where = f"{where} (pod {_describe(f'{namespace}/{name}')})"
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise UserError(f"{where} has a spec or status that is not a mapping; {_HINT}.")

    ports: List[ContainerPort] = []
    for container in _get(spec, "containers", list, where, "spec.containers") or []:
        if not isinstance(container, dict):
            raise UserError(f"{where} has a container that is not a mapping; {_HINT}.")
        cname = _get(container, "name", str, where, "container name") or ""
        at = f"{where} container {_describe(cname)}"
        for port in _get(container, "ports", list, at, "ports") or []:
            if not isinstance(port, dict):
                raise UserError(f"{at} has a port that is not a mapping; {_HINT}.")
            container_port = port.get("containerPort")
            host_port = port.get("hostPort") or None
            if not _int(container_port) or not 1 <= container_port <= 65535:
                raise UserError(f"{at} has containerPort {_shown(container_port)}, "
                                f"which is not a port number from 1 to 65535; fix the port or {_HINT}.")
            if host_port is not None and (not _int(host_port) or not 1 <= host_port <= 65535):
                raise UserError(f"{at} has hostPort {_shown(host_port)}, "
                                f"which is not a port number from 1 to 65535; fix the port or {_HINT}.")
            protocol = port.get("protocol") or "TCP"
            if protocol not in PROTOCOLS:
                raise UserError(f"{at} has protocol {_shown(protocol)}; use TCP, UDP or SCTP.")
            host_ip = _get(port, "hostIP", str, at, "hostIP")
            ports.append(ContainerPort(container=cname, container_port=container_port, protocol=protocol,
                                       name=_get(port, "name", str, at, "port name"), host_port=host_port,
                                       host_ip=_ip(host_ip, at, "hostIP") if host_ip else None))

    ips: List[str] = []
    for entry in _get(status, "podIPs", list, where, "status.podIPs") or []:
        ip = entry.get("ip") if isinstance(entry, dict) else entry
        ip = _ip(ip, where, "status.podIPs") if ip else None
        if ip and ip not in ips:
            ips.append(ip)
    pod_ip = _get(status, "podIP", str, where, "status.podIP")
    if not ips and pod_ip:
        ips.append(_ip(pod_ip, where, "status.podIP"))

    container_ids = []
    for cs in _get(status, "containerStatuses", list, where, "status.containerStatuses") or []:
        cid = _get(cs, "containerID", str, where, "containerID") if isinstance(cs, dict) else None
        if cid:
            container_ids.append(cid.split("://", 1)[-1])

    start = status.get("startTime")
    if not isinstance(start, _dt.datetime):     # a YAML loader may have made it one
        start = _get(status, "startTime", str, where, "status.startTime")
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=_get(meta, "uid", str, where, "metadata.uid"),
        node=_get(spec, "nodeName", str, where, "spec.nodeName"),
        ips=tuple(ips),
        host_network=bool(_get(spec, "hostNetwork", bool, where, "spec.hostNetwork")),
        ports=tuple(ports),
        phase=_get(status, "phase", str, where, "status.phase"),
        start_time=_timestamp(start),
        container_ids=tuple(container_ids),
    )


def pod_from_k8s(obj: dict) -> PodInfo:
    """A v1 Pod as the API returns it (camelCase dict) -> PodInfo."""
    return _pod(obj, "the pod")


# --------------------------------------------------------------------------- PodInfo -> dict

def pod_to_k8s(pod: PodInfo) -> dict:
    """A minimal but valid v1 Pod dict; pod_from_k8s(pod_to_k8s(p)) == p."""
    names: List[str] = []
    by_container: Dict[str, List[Dict[str, Any]]] = {}
    for p in pod.ports:
        if p.container not in by_container:
            names.append(p.container)
            by_container[p.container] = []
        port: Dict[str, Any] = {"containerPort": p.container_port, "protocol": p.protocol}
        if p.name:
            port["name"] = p.name
        if p.host_port:
            port["hostPort"] = p.host_port
        if p.host_ip:
            port["hostIP"] = p.host_ip
        by_container[p.container].append(port)
    # Every pod has at least one container, and one per container id we know of.
    while len(names) < max(1, len(pod.container_ids)):
        filler = f"container-{len(names)}"
        names.append(filler if filler not in by_container else f"{filler}-{len(names)}")
    containers = []
    for cname in names:
        c: Dict[str, Any] = {"name": cname}
        if by_container.get(cname):
            c["ports"] = by_container[cname]
        containers.append(c)

    metadata: Dict[str, Any] = {"name": pod.name, "namespace": pod.namespace}
    if pod.uid:
        metadata["uid"] = pod.uid
    spec: Dict[str, Any] = {"containers": containers, "hostNetwork": bool(pod.host_network)}
    if pod.node:
        spec["nodeName"] = pod.node

    status: Dict[str, Any] = {}
    if pod.phase:
        status["phase"] = pod.phase
    if pod.ips:
        status["podIP"] = pod.ips[0]
        status["podIPs"] = [{"ip": ip} for ip in pod.ips]
        if pod.host_network:                      # a hostNetwork pod's IPs are its node's
            status["hostIP"] = pod.ips[0]
            status["hostIPs"] = [{"ip": ip} for ip in pod.ips]
    if pod.start_time:
        status["startTime"] = pod.start_time
    if pod.container_ids:
        running = pod.phase == "Running"
        statuses = []
        for cname, cid in zip(names, pod.container_ids):
            cs: Dict[str, Any] = {
                "name": cname,
                "containerID": cid if "://" in cid else f"{_DEFAULT_RUNTIME}://{cid}",
                "image": "",
                "imageID": "",
                "ready": running,
                "started": running,
                "restartCount": 0,
            }
            if running and pod.start_time:
                cs["state"] = {"running": {"startedAt": pod.start_time}}
            statuses.append(cs)
        status["containerStatuses"] = statuses

    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


# --------------------------------------------------------------------------- files

def read_pod_list(path: str) -> List[PodInfo]:
    """Pods from a kubectl List / PodList (JSON or YAML), a single Pod, or "-" for stdin."""
    text, origin = read_source(path)
    docs = load_documents(text, origin)
    if not docs:
        raise UserError(f"{origin} is empty; {_HINT}.")
    pods: List[PodInfo] = []
    for n, doc in enumerate(docs, 1):
        label = f"{origin} document {n}" if len(docs) > 1 else origin
        if not isinstance(doc, dict):
            raise UserError(f"{label} is not a pod list but a {type(doc).__name__}; {_HINT}.")
        kind = doc.get("kind")
        if kind in ("List", "PodList") or (kind is None and "items" in doc):
            items = doc.get("items")
            if items is None:
                items = []
            if not isinstance(items, list):
                raise UserError(f"{label} has items that is not a list; {_HINT}.")
            other_kinds = set()
            found = 0
            for i, item in enumerate(items, 1):
                item_kind = item.get("kind") if isinstance(item, dict) else None
                if item_kind not in (None, "Pod"):
                    other_kinds.add(_kind_name(item_kind))
                    continue                      # kubectl get pods,svc: keep the pods
                pods.append(_pod(item, f"{label} item {i}"))
                found += 1
            if items and not found:
                raise UserError(f"{label} is not a pod list (it holds {', '.join(sorted(other_kinds))} objects); {_HINT}.")
        elif kind == "Pod":
            pods.append(_pod(doc, label))
        else:
            what = f"a {_kind_name(kind)}" if kind else "an object without a kind"
            raise UserError(f"{label} is not a pod list but {what}; {_HINT}.")
    return pods


def write_pod_list(pods: Sequence[PodInfo], path: str) -> None:
    """Write pods as `kubectl get pods -o json` would, atomically (temporary file + rename)."""
    doc = {"apiVersion": "v1", "kind": "List", "items": [pod_to_k8s(p) for p in pods],
           "metadata": {"resourceVersion": ""}}
    text = json.dumps(doc, indent=4, sort_keys=True, ensure_ascii=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"Cannot write {path} ({e.strerror or e}); check that its directory exists and is writable.") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------- plans

def plan_to_pod(plan: PodPlan, ips: Tuple[str, ...], node: str, uid: Optional[str] = None,
                phase: str = "Running", start_time: Optional[str] = None) -> PodInfo:
    """The PodInfo for a planned pod once it runs on `node` with `ips`.

    Without a uid one is derived from namespace, name and node (uuid5) so runs are reproducible.
    For a hostNetwork plan pass the node's IPs, as the API reports them.
    """
    if isinstance(ips, str):
        ips = (ips,)
    for ip in ips:
        ipaddress.ip_address(ip)                 # ValueError: a caller's bug, not a user's
    if uid is None:
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bpftrace-hostport:pod/{plan.namespace}/{plan.name}@{node}"))
    return PodInfo(namespace=plan.namespace, name=plan.name, uid=uid, node=node, ips=tuple(ips),
                   host_network=plan.host_network, ports=plan.ports, phase=phase, start_time=start_time)
