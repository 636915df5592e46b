"""Where the pods come from: pod list files, the Kubernetes API, the CRI runtime, or CNI state.

Every source gives the same thing, a list of `PodInfo`, through one small interface:

* ``FileSource``     pod lists written by ``kubectl get pods -o json|yaml`` (static).
* ``KubeSource``     the API server, only this node's pods (``spec.nodeName=<node>``), kept current
                     by a list + watch in a daemon thread; a deleted pod stays resolvable for a short
                     grace period so flows that arrive late still get its name.
* ``CRISource``      the node's container runtime over CRI's gRPC API (containerd or CRI-O), polled.
* ``CNIStateSource`` last resort without any API: host-local's IP allocation files joined with
                     portmap's nat rules by container id; pods get synthetic names ``cni-<id12>``.

`resolve_sources` picks them (``--pods-from auto|file|kube|cri|cni|none``) and says in plain
sentences which ones it skipped and why. `Resolver` is what the tracer asks: the `PodIndex`
contract (``names``, ``lookup``, ``host_ports``, ``host_network_owner``, ``extend``) over the
union of all sources, rebuilt from their current views at most once a second.

The CRI replies, as pods/cri.py hands them on (protojson dicts, the shape `crictl -o json`
prints; checked against the CRI API in k8s.io/cri-api, containerd's internal/cri SandboxInfo and
CRI-O's server/sandbox_status.go, and captured from a real containerd 1.6 in
tests/fixtures/pods/sources/cri/):

* ListPodSandbox: ``[{"id", "metadata": {"name", "uid", "namespace", "attempt"}, "state":
  "SANDBOX_READY"|"SANDBOX_NOTREADY", "createdAt": "<ns since the epoch>", ...}]``.
* PodSandboxStatus (verbose), as ``{"status": <PodSandboxStatus: network.ip,
  network.additionalIps[].ip, linux.namespaces.options.network "NODE" (POD, the default, is
  left out)>, "info": <the runtime's verbose info "info", parsed>}``. containerd's info holds
  ``config``, the PodSandboxConfig as Go's encoding/json writes it: snake_case, zero values
  omitted, enums as numbers: ``port_mappings: [{"protocol": 1, "container_port": 53,
  "host_port": 5353, "host_ip": "..."}]`` (protocol 0 = TCP is omitted),
  ``linux.security_context.namespace_options.network`` 2 = NODE. CRI-O's info has no config; its
  ``runtimeSpec.annotations["io.kubernetes.cri-o.PortMappings"]`` is a JSON list of
  ``{"HostPort", "ContainerPort", "Protocol": "TCP", "HostIP"}``.
* ListContainers: ``[{"id", "podSandboxId", "metadata": {"name"}, "annotations":
  {"io.kubernetes.container.ports": "<JSON list of v1.ContainerPort>"}}]``; the kubelet writes
  that annotation (kuberuntime labels.go), which gives container and port names the sandbox
  config lacks.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Set, Tuple

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.pods.index import Names, PodIndex
from bpftrace_hostport.pods.podlist import pod_from_k8s, read_pod_list

#: Reads a node's hostPort DNAT rules: netns -> (rules, notes). node/rules.read_node_rules,
#: handed in by the caller (pods sit below node in the layering).
RuleReader = Callable[[Optional[str]], Tuple[List[HostPortRule], List[str]]]


__all__ = [
    "PodSource", "SourceUnavailable", "FileSource", "KubeSource", "CRISource", "CNIStateSource",
    "resolve_sources", "Resolver", "PODS_FROM",
]

log = logging.getLogger(__name__)

PODS_FROM = ("auto", "file", "kube", "cri", "cni", "none")

# Kubeconfig files tried after --kubeconfig, $KUBECONFIG, ~/.kube/config and the in-cluster
# service account: an admin's (kubeadm control plane), the kubelet's own credentials (the node
# authorizer lets a kubelet list and watch pods) and k3s's.
KUBECONFIG_FALLBACKS = (
    "/etc/kubernetes/admin.conf",
    "/etc/kubernetes/kubelet.conf",
    "/etc/rancher/k3s/k3s.yaml",
)
INCLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
DEFAULT_IPAM_DIRS = ("/var/lib/cni/networks",)

_PROTOCOL_BY_NUMBER = {0: "TCP", 1: "UDP", 2: "SCTP"}
_CRIO_PORTS_ANNOTATION = "io.kubernetes.cri-o.PortMappings"
_KUBELET_PORTS_ANNOTATION = "io.kubernetes.container.ports"
_KUBELET_CONTAINER_NAME_LABEL = "io.kubernetes.container.name"


class SourceUnavailable(Exception):
    """A source cannot deliver pods. `what` says what failed, `fix` how to fix it (both plain)."""

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what = what
        self.fix = fix

    @property
    def note(self) -> str:
        return f"{self.what}: skipped."

    def user_error(self) -> UserError:
        return UserError(f"{self.what}; {self.fix}.")


class PodSource(Protocol):
    name: str

    def pods(self) -> List[PodInfo]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


# --------------------------------------------------------------------------- helpers

def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _iso_utc(value: Any) -> Optional[str]:
    """'2024-06-10T08:13:20.123456789+02:00' / '...+00:00' / '...Z' -> '2024-06-10T06:13:20Z'."""
    if not isinstance(value, str) or not value:
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?$", value.strip())
    if not m:
        return value
    base, tz = m.group(1), m.group(2)
    try:
        when = _dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return value
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        when -= sign * _dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return when.isoformat() + "Z"


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _dedup_ports(ports: Iterable[ContainerPort]) -> Tuple[ContainerPort, ...]:
    out: List[ContainerPort] = []
    for p in ports:
        if p not in out:
            out.append(p)
    return tuple(out)


class _PodTable:
    """Live pods by key, plus recently removed ones that stay visible for `grace` seconds."""

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic):
        self.grace = max(0.0, float(grace))
        self.clock = clock
        self.live: Dict[str, PodInfo] = {}
        self.gone: Dict[str, Tuple[PodInfo, float]] = {}
        self.lock = threading.Lock()

    def put(self, key: str, pod: PodInfo) -> None:
        with self.lock:
            self.live[key] = pod
            self.gone.pop(key, None)

    def remove(self, key: str, pod: Optional[PodInfo] = None) -> None:
        with self.lock:
            old = self.live.pop(key, None)
            last = pod or old
            if last is not None and self.grace > 0:
                self.gone[key] = (last, self.clock() + self.grace)

    def replace(self, pods: Dict[str, PodInfo]) -> None:
        """A full new view: keys that vanished linger like deleted pods."""
        with self.lock:
            deadline = self.clock() + self.grace
            for key, old in self.live.items():
                if key not in pods and self.grace > 0:
                    self.gone[key] = (old, deadline)
            for key in pods:
                self.gone.pop(key, None)
            self.live = dict(pods)

    def snapshot(self) -> List[PodInfo]:
        """Live pods first, then lingering ones: on a tie (recycled IP) PodIndex keeps the first."""
        with self.lock:
            now = self.clock()
            for key in [k for k, (_, until) in self.gone.items() if until <= now]:
                del self.gone[key]
            return list(self.live.values()) + [p for p, _ in self.gone.values()]


class _LazySource:
    """pods() of a source with a _PodTable: the first use without start() loads once."""

    def pods(self) -> List[PodInfo]:
        if not self._loaded and not self._tried:
            try:
                self.refresh()
            except SourceUnavailable as e:
                self.last_error = e.what
                log.warning("%s", e.note)
        return self._table.snapshot()


class _PollingSource(_LazySource):
    """A source refreshed by `refresh()` every `interval` seconds in a daemon thread once started."""

    name = "?"

    def __init__(self, interval: float, grace_seconds: float):
        self.interval = max(0.05, float(interval))
        self._table = _PodTable(grace_seconds)
        self._loaded = False
        self._tried = False
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.last_error: Optional[str] = None

    def _load(self) -> Dict[str, PodInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def refresh(self) -> None:
        """Read the current state now. Raises SourceUnavailable when it cannot."""
        self._tried = True
        pods = self._load()
        self._table.replace(pods)
        self._loaded = True
        self.last_error = None


    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"pods-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except SourceUnavailable as e:
                if self.last_error != e.what:
                    log.warning("%s", e.note)
                self.last_error = e.what
            except Exception as e:  # never let the thread die
                self.last_error = str(e)
                log.exception("pod source %s failed", self.name)
            self._stop.wait(self.interval)


# --------------------------------------------------------------------------- files

class FileSource:
    """Pods from `kubectl get pods -o json|yaml` files, read again whenever one changes
    (e.g. rewritten by a cron job), so pods that come and go get their names. A file that
    turns bad while tracing keeps the last good list, with one warning."""

    name = "file"

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        self._pods: Optional[List[PodInfo]] = None
        self._stamps: Optional[tuple] = None

    def _mtimes(self) -> tuple:
        out = []
        for path in self.paths:
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def refresh(self) -> None:
        stamps = self._mtimes()
        pods: List[PodInfo] = []
        for path in self.paths:
            pods.extend(read_pod_list(path))      # UserError for a bad file: the user's to fix
        self._pods, self._stamps = pods, stamps

    def pods(self) -> List[PodInfo]:
        if self._pods is None:
            self.refresh()
        elif self._mtimes() != self._stamps:
            try:
                self.refresh()
            except UserError as e:
                self._stamps = self._mtimes()    # warn once per change, keep the last good list
                log.warning("pod list not reloaded, keeping the previous one: %s", e)
        return list(self._pods or [])

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FileSource({self.paths!r})"


# --------------------------------------------------------------------------- Kubernetes API

def _kubeconfig_candidates(kubeconfig: Optional[str]) -> List[Tuple[str, Optional[str]]]:
    """[(label, path or None for in-cluster)] in the order kubectl / client-go would use them."""
    if kubeconfig:
        path = os.path.expanduser(kubeconfig)
        if not os.path.exists(path):
            raise UserError(f"Kubeconfig {kubeconfig} does not exist; pass an existing file with "
                            "--kubeconfig or leave it out.")
        return [(f"kubeconfig {kubeconfig}", path)]
    out: List[Tuple[str, Optional[str]]] = []
    env = os.environ.get("KUBECONFIG", "")
    if env.strip():
        existing = [p for p in env.split(os.pathsep) if p and os.path.exists(os.path.expanduser(p))]
        if existing:
            out.append((f"kubeconfig {env} (KUBECONFIG)", env))
    home = os.path.expanduser("~/.kube/config")
    if os.path.exists(home):
        out.append((f"kubeconfig {home}", home))
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(INCLUSTER_TOKEN):
        out.append(("the in-cluster service account", None))
    for path in KUBECONFIG_FALLBACKS:
        if os.path.exists(path):
            out.append((f"kubeconfig {path}", path))
    return out


def _build_api_client(kubeconfig: Optional[str], label: str):
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig is None:
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                    persist_config=False)
    except Exception as e:  # ConfigException, yaml errors, missing cert files...
        raise SourceUnavailable(f"Kubernetes client configuration from {label} could not be loaded "
                                f"({_first_line(str(e)) or type(e).__name__})",
                                "fix that file or pass another one with --kubeconfig") from None
    cfg.retries = 1            # fail fast: the watch loop retries on its own
    return client.ApiClient(cfg)


def _api_error_reason(e: Exception) -> str:
    status = getattr(e, "status", None)
    if status:
        reason = getattr(e, "reason", None) or ""
        return f"HTTP {status} {reason}".strip()
    # urllib3 wraps the interesting bit: MaxRetryError(reason=NewConnectionError(...))
    inner = getattr(e, "reason", None)
    text = str(inner or e)
    m = re.search(r"certificate verify failed: (.+?)\.?\s*(?:\(_ssl\.c:\d+\)|$)", text)
    if m:
        return f"TLS certificate verify failed: {m.group(1)}"
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip().rstrip(".").lower()
    if "timed out" in text.lower():
        return "timed out"
    text = _first_line(text)
    if len(text) > 160:
        text = text[:160].rsplit(" ", 1)[0] + " ..."
    return text or type(e).__name__


class KubeSource(_LazySource):
    """This node's pods from the Kubernetes API, listed once and then watched in a daemon thread."""

    name = "kube"

    def __init__(self, node_name: Optional[str] = None, kubeconfig: Optional[str] = None,
                 grace_seconds: float = 5.0, api_client=None, *, request_timeout: float = 5.0,
                 watch_seconds: int = 300, retry_seconds: float = 1.0):
        env_node = os.environ.get("NODE_NAME", "").strip()
        self.node_guessed = not node_name and not env_node
        self.node = node_name or env_node or socket.gethostname().strip().lower()
        self.field_selector = f"spec.nodeName={self.node}"
        self.kubeconfig = kubeconfig
        self.request_timeout = float(request_timeout)
        self.watch_seconds = int(watch_seconds)
        self.retry_seconds = float(retry_seconds)
        self._api_client = api_client
        self._table = _PodTable(grace_seconds)
        self._rv: Optional[str] = None
        self._loaded = False
        self._tried = False
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._watch = None
        self.last_error: Optional[str] = None
        self.lists = 0                       # how many full lists were made (for status / tests)

    # ------------------------------------------------------------------ connection
    @property
    def host(self) -> str:
        api = self._api_client
        return getattr(getattr(api, "configuration", None), "host", None) or "(unknown host)"

    def connect(self) -> None:
        """Build the API client from the first configuration found. Raises SourceUnavailable."""
        if self._api_client is not None:
            return
        candidates = _kubeconfig_candidates(self.kubeconfig)
        if not candidates:
            looked = ["--kubeconfig", "KUBECONFIG", "~/.kube/config", "in-cluster service account",
                      *KUBECONFIG_FALLBACKS]
            raise SourceUnavailable(
                f"No Kubernetes configuration found (no {', '.join(looked[:-1])} or {looked[-1]})",
                "pass --kubeconfig FILE or run inside the cluster")
        label, path = candidates[0]
        self._api_client = _build_api_client(path, label)

    def _v1(self):
        from kubernetes import client
        self.connect()
        return client.CoreV1Api(self._api_client)

    def _convert(self, obj: Any) -> Optional[PodInfo]:
        data = obj if isinstance(obj, dict) else self._api_client.sanitize_for_serialization(obj)
        try:
            pod = pod_from_k8s(data)
        except UserError as e:
            log.warning("ignoring a pod the API returned: %s", e)
            return None
        if pod.start_time:
            pod = replace(pod, start_time=_iso_utc(pod.start_time))
        return pod

    @staticmethod
    def _key(pod: PodInfo) -> str:
        return pod.uid or f"{pod.namespace}/{pod.name}"

    # ------------------------------------------------------------------ list
    def refresh(self) -> None:
        """List this node's pods now (replaces the view). Raises SourceUnavailable."""
        self._tried = True
        v1 = self._v1()
        try:
            result = v1.list_pod_for_all_namespaces(
                field_selector=self.field_selector,
                _request_timeout=(self.request_timeout, max(self.request_timeout, 10.0)))
        except Exception as e:
            status = getattr(e, "status", None)
            if status in (401, 403):
                raise SourceUnavailable(
                    f"Kubernetes API at {self.host} refused to list the pods of node {self.node} "
                    f"({_api_error_reason(e)})",
                    "use credentials that may get, list and watch pods") from None
            raise SourceUnavailable(f"Kubernetes API not reachable at {self.host} ({_api_error_reason(e)})",
                                    "check the kubeconfig and that the API server is up") from None
        pods: Dict[str, PodInfo] = {}
        for item in result.items or []:
            pod = self._convert(item)
            if pod is not None:
                pods[self._key(pod)] = pod
        meta = result.metadata
        self._rv = getattr(meta, "resource_version", None) or None
        self._table.replace(pods)
        self._loaded = True
        self.lists += 1
        self.last_error = None


    # ------------------------------------------------------------------ watch
    def _apply(self, event: dict) -> None:
        kind = event.get("type")
        raw = event.get("raw_object")
        if isinstance(raw, dict):
            rv = (raw.get("metadata") or {}).get("resourceVersion")
            if rv:
                self._rv = str(rv)
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return                                   # BOOKMARK: only the resourceVersion counts
        pod = self._convert(event.get("object"))
        if pod is None:
            return
        if kind == "DELETED":
            self._table.remove(self._key(pod), pod)
        else:
            self._table.put(self._key(pod), pod)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pods-kube", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            try:
                w.stop()
            except Exception:
                pass
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout=2.0)

    def _run(self) -> None:
        from kubernetes import watch

        need_list = not self._loaded or self._rv is None
        delay = self.retry_seconds
        expired_in_a_row = 0
        while not self._stop.is_set():
            try:
                if need_list:
                    self.refresh()
                    need_list = False
                w = watch.Watch()
                self._watch = w
                kwargs = dict(field_selector=self.field_selector, timeout_seconds=self.watch_seconds,
                              allow_watch_bookmarks=True,
                              _request_timeout=(self.request_timeout, self.watch_seconds + 30))
                if self._rv:
                    kwargs["resource_version"] = self._rv
                for event in w.stream(self._v1().list_pod_for_all_namespaces, **kwargs):
                    if self._stop.is_set():
                        break
                    self._apply(event)
                    expired_in_a_row = 0
                need_list = True                     # stream ended (timeout or server): re-list
                delay = self.retry_seconds
            except SourceUnavailable as e:
                if self.last_error != e.what:
                    log.warning("%s", e.note)
                self.last_error = e.what
                need_list = True
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
            except Exception as e:
                need_list = True
                if getattr(e, "status", None) == 410 and expired_in_a_row == 0:
                    expired_in_a_row += 1          # resourceVersion expired: re-list right away
                    log.info("pod watch expired (410 Gone); listing again")
                    continue
                expired_in_a_row = 0
                if not self._stop.is_set():
                    self.last_error = f"watch failed ({_api_error_reason(e)})"
                    log.warning("Kubernetes pod watch failed (%s); retrying", _api_error_reason(e))
                    self._stop.wait(delay)
                    delay = min(delay * 2, 30.0)
            finally:
                self._watch = None

    def __repr__(self) -> str:
        return f"KubeSource(node={self.node!r}, host={self.host!r})"


# --------------------------------------------------------------------------- CRI (gRPC)

def _proto(value: Any) -> Optional[str]:
    if value is None or value == "":
        return "TCP"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return _PROTOCOL_BY_NUMBER.get(value)
    text = str(value).upper()
    return text if text in protomod.K8S else None


def _port_number(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if 1 <= n <= 65535 else None


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _created(value: Any) -> Optional[str]:
    """createdAt: nanoseconds since the epoch (CRI, protojson int64 as a string) or ISO text."""
    if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).isdigit():
        when = _dt.datetime.fromtimestamp(int(value) / 1e9, tz=_dt.timezone.utc)
        return when.replace(tzinfo=None, microsecond=0).isoformat() + "Z"
    return _iso_utc(value)


def sandbox_port_mappings(info: dict) -> List[ContainerPort]:
    """Port mappings from a sandbox's verbose info: containerd's config or CRI-O's annotation."""
    # (mapping list, its key names: container port, protocol, host port, host IP)
    mappings = _get(info, "config", "port_mappings")
    if isinstance(mappings, list):
        keys = ("container_port", "protocol", "host_port", "host_ip")
    else:
        mappings = _maybe_json(_get(info, "runtimeSpec", "annotations", _CRIO_PORTS_ANNOTATION))
        keys = ("ContainerPort", "Protocol", "HostPort", "HostIP")
    ports: List[ContainerPort] = []
    for m in mappings if isinstance(mappings, list) else []:
        if not isinstance(m, dict):
            continue
        cport, proto = _port_number(m.get(keys[0])), _proto(m.get(keys[1]))
        if cport is None or proto is None:
            continue
        ports.append(ContainerPort(container="", container_port=cport, protocol=proto,
                                   host_port=_port_number(m.get(keys[2])),
                                   host_ip=m.get(keys[3]) or None))
    return ports


def container_ports(container: dict) -> List[ContainerPort]:
    """The kubelet's io.kubernetes.container.ports annotation of one ListContainers container."""
    annotations = container.get("annotations") or {}
    raw = _maybe_json(annotations.get(_KUBELET_PORTS_ANNOTATION))
    if not isinstance(raw, list):
        return []
    cname = (_get(container, "metadata", "name") or (container.get("labels") or {}).get(
        _KUBELET_CONTAINER_NAME_LABEL) or "")
    out = []
    for p in raw:
        if not isinstance(p, dict):
            continue
        cport, proto = _port_number(p.get("containerPort")), _proto(p.get("protocol"))
        if cport is None or proto is None:
            continue
        out.append(ContainerPort(container=str(cname), container_port=cport, protocol=proto,
                                 name=p.get("name") or None, host_port=_port_number(p.get("hostPort")),
                                 host_ip=p.get("hostIP") or None))
    return out


def pod_from_sandbox(inspect: dict, item: Optional[dict] = None,
                     containers: Sequence[dict] = ()) -> Optional[PodInfo]:
    """One PodSandboxStatus document (+ its ListPodSandbox item and containers) -> PodInfo."""
    if isinstance(inspect, list):
        inspect = inspect[0] if inspect else {}
    status = inspect.get("status") or {}
    info = _maybe_json(inspect.get("info")) or {}
    if not isinstance(info, dict):
        info = {}
    item = item or {}
    meta = status.get("metadata") or item.get("metadata") or {}
    name = meta.get("name")
    if not name:
        return None
    sid = status.get("id") or item.get("id") or ""
    ips: List[str] = []
    net = status.get("network") or {}
    for ip in [net.get("ip")] + [a.get("ip") if isinstance(a, dict) else a
                                 for a in (net.get("additionalIps") or [])]:
        if ip and ip not in ips:
            ips.append(str(ip))
    network_mode = _get(status, "linux", "namespaces", "options", "network")
    if network_mode is None:
        network_mode = _get(info, "config", "linux", "security_context", "namespace_options", "network")
    host_network = network_mode in ("NODE", 2)

    named: List[ContainerPort] = []
    cids: List[str] = []
    for c in containers:
        named.extend(container_ports(c))
        if c.get("id"):
            cids.append(str(c["id"]))
    ports = list(named)
    for m in sandbox_port_mappings(info):
        if not any(p.container_port == m.container_port and p.protocol == m.protocol and
                   (p.host_port or None) == (m.host_port or None) for p in named):
            ports.append(m)
    state = status.get("state") or item.get("state")
    return PodInfo(
        namespace=str(meta.get("namespace") or "default"),
        name=str(name),
        uid=meta.get("uid") or None,
        ips=tuple(ips),
        host_network=host_network,
        ports=_dedup_ports(ports),
        phase="Running" if state == "SANDBOX_READY" else "NotReady",
        start_time=_created(status.get("createdAt")),
        container_ids=tuple([sid] if sid else []) + tuple(c for c in cids if c != sid),
    )


class CRISource(_PollingSource):
    """Pod sandboxes of the node's CRI runtime over gRPC (pods/cri.py), polled every `interval` s.

    ListPodSandbox and ListContainers each poll; PodSandboxStatus (verbose: its info holds the port
    mappings) once per sandbox, since a sandbox's config never changes; a sandbox that is not ready
    when first seen is not asked (its network is gone). Pods whose sandbox disappears stay
    resolvable for `grace_seconds`. The endpoint: `endpoint`, else $CONTAINER_RUNTIME_ENDPOINT,
    else the first usual socket that exists and answers.
    """

    name = "cri"

    def __init__(self, endpoint: Optional[str] = None, *, interval: float = 2.0, timeout: float = 10.0,
                 grace_seconds: float = 5.0):
        super().__init__(interval, grace_seconds)
        self.endpoint_arg = endpoint
        self.timeout = float(timeout)
        self.endpoint: Optional[str] = None
        self._client = None
        self._inspected: Dict[str, dict] = {}

    def _connect(self):
        from bpftrace_hostport.pods import cri
        if self._client is not None:
            return self._client
        candidates, origin = cri.endpoints(self.endpoint_arg)
        if not candidates:
            raise SourceUnavailable(
                f"No container runtime socket found ({', '.join(cri.socket_path(e) or e for e in cri.DEFAULT_ENDPOINTS)})",
                f"pass --cri-endpoint unix:///PATH or set {cri.ENDPOINT_ENV}")
        failures = []
        for ep in candidates:
            path = cri.socket_path(ep)
            if path is not None and not os.path.exists(path):
                failures.append(f"no socket at {path}")
                continue
            try:
                client = cri.RuntimeClient(ep, timeout=self.timeout)
            except cri.CRIMissing:
                raise SourceUnavailable("The CRI client (Python grpcio and container-runtime-interface-api) "
                                        "is not installed",
                                        "pip install container-runtime-interface-api grpcio") from None
            try:
                client.version()
            except cri.CRIError as e:
                client.close()
                failures.append(f"{ep}: {e.code}" + (f", {e.details}" if e.details else ""))
                continue
            self._client, self.endpoint = client, ep
            return client
        raise SourceUnavailable(f"The container runtime did not answer over CRI ({'; '.join(failures)})",
                                f"check that it runs, or pass its socket with --cri-endpoint (from {origin})")

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def _load(self) -> Dict[str, PodInfo]:
        from bpftrace_hostport.pods import cri
        client = self._connect()
        try:
            items = [i for i in client.list_sandboxes() if isinstance(i, dict) and i.get("id")]
        except cri.CRIError as e:
            self._drop()                       # connect again next time: the runtime may restart
            raise SourceUnavailable(f"The container runtime at {self.endpoint} stopped answering "
                                    f"({e.code})", "check the container runtime") from None
        try:
            containers = [c for c in client.list_containers() if isinstance(c, dict)]
        except cri.CRIError as e:              # only names are lost
            log.debug("ListContainers failed: %s", e)
            containers = []
        by_sandbox: Dict[str, List[dict]] = {}
        for c in containers:
            by_sandbox.setdefault(str(c.get("podSandboxId") or ""), []).append(c)

        present = {str(i["id"]) for i in items}
        for sid in list(self._inspected):
            if sid not in present:
                del self._inspected[sid]
        pods: Dict[str, PodInfo] = {}
        for item in items:
            sid = str(item["id"])
            doc = self._inspected.get(sid)
            if doc is None:
                if item.get("state") != "SANDBOX_READY":
                    continue
                try:
                    doc = client.sandbox_status(sid, verbose=True)
                except cri.CRIError as e:      # e.g. removed in between
                    log.debug("PodSandboxStatus %s failed: %s", sid, e)
                    continue
                self._inspected[sid] = doc
            pod = pod_from_sandbox(doc, item, by_sandbox.get(sid, ()))
            if pod is not None:
                pods[sid] = pod
        return pods

    def stop(self) -> None:
        super().stop()
        self._drop()

    def __repr__(self) -> str:
        return f"CRISource({self.endpoint or self.endpoint_arg!r})"


# --------------------------------------------------------------------------- CNI state

def read_host_local(dirs: Sequence[str]) -> Dict[str, List[str]]:
    """container id -> IPs from host-local's files `<dir>/<network>/<ip>` (or `<dir>/<ip>`).

    Each file holds "<container id>\\r\\n<ifname>" (plugins >= 0.7) or just the id (older).
    """
    out: Dict[str, List[str]] = {}

    def scan(directory: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for fname in names:
            path = os.path.join(directory, fname)
            if not _valid_ip(fname) or not os.path.isfile(path):
                continue
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            cid = lines[0].strip() if lines else ""
            if cid and fname not in out.setdefault(cid, []):
                out[cid].append(fname)

    for d in dirs:
        scan(d)
        try:
            subdirs = sorted(os.listdir(d))
        except OSError:
            continue
        for sub in subdirs:
            path = os.path.join(d, sub)
            if os.path.isdir(path):
                scan(path)
    return out


def _rule_port(rule: HostPortRule) -> ContainerPort:
    return ContainerPort(container="", container_port=rule.target_port, protocol=rule.proto,
                         host_port=rule.host_port, host_ip=rule.host_ip)


class CNIStateSource(_PollingSource):
    """Pods pieced together from CNI state alone: host-local IPs + portmap rules, by container id.

    Names are synthetic: namespace "" and name "cni-<first 12 characters of the container id>".
    Rules without a container id (CRI-O, Docker) are attached to the pod whose IP they target.
    """

    name = "cni"

    def __init__(self, netns: Optional[str] = None, ipam_dirs: Optional[List[str]] = None, *,
                 read_rules: Optional[RuleReader] = None, interval: float = 5.0,
                 grace_seconds: float = 5.0):
        super().__init__(interval, grace_seconds)
        self.netns = netns
        # The node's DNAT rules come from node/rules.py, a layer above this one: the caller
        # (the CLI) hands its reader in. Without one, only host-local allocations are used.
        self.read_rules = read_rules
        self.ipam_dirs = list(ipam_dirs) if ipam_dirs is not None else list(DEFAULT_IPAM_DIRS)
        self.rule_notes: List[str] = []

    def _load(self) -> Dict[str, PodInfo]:
        allocations = read_host_local(self.ipam_dirs)
        try:
            found, notes = self.read_rules(self.netns) if self.read_rules else ([], [])
        except UserError:
            raise
        except Exception as e:
            found, notes = [], [f"The nat rules could not be read ({e})."]
        self.rule_notes = list(notes)

        ids: List[str] = list(allocations)
        for r in found:
            if r.container_id and r.container_id not in allocations and r.container_id not in ids:
                ids.append(r.container_id)
        ips: Dict[str, List[str]] = {cid: list(allocations.get(cid, [])) for cid in ids}
        ports: Dict[str, List[ContainerPort]] = {cid: [] for cid in ids}
        owner_of_ip = {ip: cid for cid, addrs in allocations.items() for ip in addrs}
        for r in found:
            cid = r.container_id or owner_of_ip.get(r.target_ip)
            if not cid:
                continue
            ports[cid].append(_rule_port(r))
            if r.target_ip and r.target_ip not in ips[cid]:
                ips[cid].append(r.target_ip)
        pods: Dict[str, PodInfo] = {}
        for cid in ids:
            pods[cid] = PodInfo(namespace="", name=f"cni-{cid[:12]}", ips=tuple(ips[cid]),
                                ports=_dedup_ports(ports[cid]), container_ids=(cid,))
        return pods

    def __repr__(self) -> str:
        return f"CNIStateSource(netns={self.netns!r}, ipam_dirs={self.ipam_dirs!r})"


# --------------------------------------------------------------------------- choosing sources

def resolve_sources(pods_files: List[str], pods_from: str = "auto", netns: Optional[str] = None,
                    node_name: Optional[str] = None, kubeconfig: Optional[str] = None,
                    read_rules: Optional[RuleReader] = None,
                    cri_endpoint: Optional[str] = None) -> Tuple[List[PodSource], List[str]]:
    """The pod sources to use and notes (one plain sentence each) on the ones skipped.

    auto: the pod list files if any, plus the first live source that works: the Kubernetes API
    (a kubeconfig or in-cluster account is found and the API answers), else the CRI runtime
    (a CRI socket answers), else CNI state. An explicitly chosen source that does not work
    is a UserError; so is an unknown choice. "file" uses only the files (at least one needed),
    "none" no live source (files given are still read).
    """
    choice = (pods_from or "auto").strip().lower()
    if choice not in PODS_FROM:
        raise UserError(f"--pods-from {pods_from!r} is not a pod source; use one of "
                        f"{', '.join(PODS_FROM)}.")
    sources: List[PodSource] = []
    notes: List[str] = []
    files = [str(p) for p in (pods_files or [])]
    if files:
        fs = FileSource(files)
        fs.refresh()                                 # a bad file is a UserError right away
        sources.append(fs)
    if choice == "file":
        if not files:
            raise UserError("--pods-from file needs at least one pod list file; pass one with "
                            "--pods FILE or use --pods-from auto.")
        return sources, notes
    if choice == "none":
        return sources, notes

    def kube() -> KubeSource:
        src = KubeSource(node_name=node_name, kubeconfig=kubeconfig)
        src.refresh()
        if src.node_guessed and not src.pods():
            notes.append(f"The Kubernetes API lists no pods on node {src.node} (this host's name); "
                         "set NODE_NAME if the node is registered under another name.")
        return src

    def cri() -> CRISource:
        src = CRISource(cri_endpoint)
        src.refresh()
        return src

    def cni() -> CNIStateSource:
        src = CNIStateSource(netns=netns, read_rules=read_rules)
        src.refresh()
        if not src.pods():
            dirs = ", ".join(src.ipam_dirs)
            notes.append(f"No CNI host-local allocations under {dirs} and no portmap rules with a "
                         "container id were found yet; pods will show up as cni-<id> once they exist.")
        return src

    makers = {"kube": kube, "cri": cri, "cni": cni}
    if choice != "auto":
        try:
            sources.append(makers[choice]())
        except SourceUnavailable as e:
            raise e.user_error() from None
        return sources, notes

    for which in ("kube", "cri"):
        try:
            sources.append(makers[which]())
            return sources, notes
        except SourceUnavailable as e:
            notes.append(e.note)
    sources.append(cni())
    return sources, notes


# --------------------------------------------------------------------------- resolver

class Resolver:
    """The PodIndex contract over the union of several sources, refreshed from their views.

    `refresh()` rebuilds the index (cheap: sources keep their own state up to date); lookups also
    refresh by themselves when the index is older than `auto_refresh` seconds (None: never).
    Pods seen in several sources are kept once (the first source wins; same namespace/name and
    uid, or either uid unknown). A hostNetwork pod is never pinned by IP (PodIndex rule).
    """

    def __init__(self, sources: Sequence[PodSource], auto_refresh: Optional[float] = 1.0):
        self.sources: List[PodSource] = list(sources)
        self.auto_refresh = auto_refresh
        self._extra: List[PodInfo] = []
        self._index = PodIndex()
        self._stamp = 0.0
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        merged: List[PodInfo] = []
        seen: Dict[Tuple[str, str], List[Optional[str]]] = {}
        for src in self.sources:
            try:
                pods = src.pods()
            except UserError:
                raise
            except Exception:
                log.exception("pod source %s failed", getattr(src, "name", src))
                continue
            for p in pods:
                uids = seen.setdefault((p.namespace, p.name), [])
                if uids and (p.uid is None or None in uids or p.uid in uids):
                    continue
                uids.append(p.uid)
                merged.append(p)
        index = PodIndex(merged + self._extra)
        with self._lock:
            self._index = index
            self._stamp = time.monotonic()

    def _current(self) -> PodIndex:
        if self.auto_refresh is not None and time.monotonic() - self._stamp >= self.auto_refresh:
            self.refresh()
        return self._index

    def lookup(self, proto: str, ip: str, port: int) -> Optional[Tuple[PodInfo, Optional[ContainerPort]]]:
        return self._current().lookup(proto, ip, port)

    def names(self, proto: str, ip: str, port: int) -> Optional[Names]:
        return self._current().names(proto, ip, port)

    def host_ports(self) -> Set[Tuple[str, int]]:
        return self._current().host_ports()

    def host_network_owner(self, proto: str, host_port: int) -> Optional[PodInfo]:
        return self._current().host_network_owner(proto, host_port)

    def pods(self) -> List[PodInfo]:
        return list(self._current().pods)

    def extend(self, pods: Iterable[PodInfo]) -> None:
        """Add fixed pods (kept across refreshes), as PodIndex.extend."""
        pods = list(pods)
        self._extra.extend(pods)
        with self._lock:
            self._index.extend(pods)

    def start(self) -> None:
        for src in self.sources:
            src.start()

    def stop(self) -> None:
        for src in reversed(self.sources):
            try:
                src.stop()
            except Exception:
                log.exception("stopping pod source %s failed", getattr(src, "name", src))

    def __enter__(self) -> "Resolver":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
