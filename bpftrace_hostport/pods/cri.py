"""The CRI v1 RuntimeService over gRPC: the one module that talks to a container runtime's socket.

The kubelet's own API to containerd and CRI-O (k8s.io/cri-api, `runtime.v1`), with the stubs of
PyPI's `container-runtime-interface-api` (module `cri_api.v1`, generated from the upstream
api.proto). Replies are handed on as dicts in protojson's shape (camelCase names, enums by name,
int64 as strings), the shape `crictl -o json` prints, so the parsers in pods/sources.py read
either.

Where a pod's port mappings are: CRI v1 has no field for them in any status. They are in the
PodSandboxConfig the kubelet sent, which the runtimes give back in PodSandboxStatus's verbose
`info` (key "info", a JSON document): containerd (1.6 to 2.x) as `config.port_mappings`, CRI-O as
the `io.kubernetes.cri-o.PortMappings` annotation of `runtimeSpec`. Container ports with their
names are in the container's `io.kubernetes.container.ports` annotation, which the kubelet writes
and ListContainers returns.

The endpoint: --cri-endpoint, else $CONTAINER_RUNTIME_ENDPOINT (crictl's variable), else the
first of the usual sockets that exists.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

#: The runtimes' usual sockets, in the order crictl tries them (cri-tools' defaultRuntimeEndpoints).
DEFAULT_ENDPOINTS = (
    "unix:///run/containerd/containerd.sock",
    "unix:///run/crio/crio.sock",
    "unix:///var/run/cri-dockerd.sock",
)
ENDPOINT_ENV = "CONTAINER_RUNTIME_ENDPOINT"


class CRIError(Exception):
    """A CRI call failed. `code` is the gRPC status name (UNAVAILABLE, NOT_FOUND, ...)."""

    def __init__(self, method: str, code: str, details: str):
        super().__init__(f"{method}: {code} ({details})")
        self.method = method
        self.code = code
        self.details = details


class CRIMissing(Exception):
    """The gRPC client libraries are not installed."""


def socket_path(endpoint: str) -> Optional[str]:
    """The file of a unix endpoint ('unix:///run/x.sock' or '/run/x.sock'); None for tcp."""
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://"):]
    if endpoint.startswith("/"):
        return endpoint
    return None


def normalize(endpoint: str) -> str:
    """An endpoint as gRPC wants it: unix:///path for a bare path."""
    endpoint = endpoint.strip()
    return "unix://" + endpoint if endpoint.startswith("/") else endpoint


def endpoints(explicit: Optional[str] = None) -> Tuple[List[str], str]:
    """The endpoints to try and where they came from (for messages)."""
    if explicit:
        return [normalize(explicit)], "--cri-endpoint"
    env = os.environ.get(ENDPOINT_ENV, "").strip()
    if env:
        return [normalize(env)], ENDPOINT_ENV
    present = [e for e in DEFAULT_ENDPOINTS if os.path.exists(socket_path(e) or "")]
    return present, "the usual sockets"


def _modules():
    try:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc
        from google.protobuf import json_format
    except ImportError as e:
        raise CRIMissing(str(e)) from None
    return grpc, api_pb2, api_pb2_grpc, json_format


class RuntimeClient:
    """A CRI v1 RuntimeService client on one endpoint; every call has a deadline."""

    def __init__(self, endpoint: str, timeout: float = 10.0):
        self.grpc, self.pb, pb_grpc, self.json_format = _modules()
        self.endpoint = normalize(endpoint)
        self.timeout = float(timeout)
        # No proxy for a unix socket (grpc would honour $http_proxy for tcp endpoints).
        self.channel = self.grpc.insecure_channel(self.endpoint, options=[("grpc.enable_http_proxy", 0)])
        self.stub = pb_grpc.RuntimeServiceStub(self.channel)

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, method: str, request, timeout: Optional[float] = None):
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except self.grpc.RpcError as e:
            code = e.code().name if callable(getattr(e, "code", None)) and e.code() else "UNKNOWN"
            details = (e.details() if callable(getattr(e, "details", None)) else "") or ""
            raise CRIError(method, code, details.strip().splitlines()[0] if details.strip() else "") from None

    def to_dict(self, message) -> Dict[str, Any]:
        # Fields at their zero value are printed too: SANDBOX_READY, CONTAINER_CREATED, the POD
        # namespace mode and TCP are all 0, and protojson would leave them out.
        try:
            return self.json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
        except TypeError:                      # protobuf < 5.26 names it differently
            return self.json_format.MessageToDict(message, including_default_value_fields=True)

    def message(self, name: str, data: Dict[str, Any]):
        """A request message from a protojson-shaped dict (camelCase or snake_case keys)."""
        return self.json_format.ParseDict(data, getattr(self.pb, name)())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RuntimeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------
    def version(self) -> Dict[str, Any]:
        return self.to_dict(self._call("Version", self.pb.VersionRequest()))

    def list_sandboxes(self) -> List[Dict[str, Any]]:
        return self.to_dict(self._call("ListPodSandbox", self.pb.ListPodSandboxRequest())).get("items", [])

    def sandbox_status(self, sandbox_id: str, verbose: bool = True) -> Dict[str, Any]:
        """{"status": PodSandboxStatus, "info": the runtime's verbose info, parsed} as
        `crictl inspectp -o json` prints it."""
        import json
        resp = self._call("PodSandboxStatus", self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                              verbose=verbose))
        out: Dict[str, Any] = {"status": self.to_dict(resp.status)}
        for key, value in resp.info.items():
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            if key == "info":
                out["info"] = parsed
            else:
                out.setdefault("extra", {})[key] = parsed
        return out

    def list_containers(self) -> List[Dict[str, Any]]:
        return self.to_dict(self._call("ListContainers", self.pb.ListContainersRequest())).get("containers", [])

    def container_status(self, container_id: str, verbose: bool = False) -> Dict[str, Any]:
        import json
        resp = self._call("ContainerStatus", self.pb.ContainerStatusRequest(container_id=container_id,
                                                                            verbose=verbose))
        out: Dict[str, Any] = {"status": self.to_dict(resp.status)}
        if "info" in resp.info:
            try:
                out["info"] = json.loads(resp.info["info"])
            except ValueError:
                out["info"] = resp.info["info"]
        return out

    # -- acting (the lab is the kubelet) -------------------------------------------------------
    def run_sandbox(self, config: Dict[str, Any], timeout: float = 60.0) -> str:
        req = self.pb.RunPodSandboxRequest(config=self.message("PodSandboxConfig", config))
        return self._call("RunPodSandbox", req, timeout).pod_sandbox_id

    def create_container(self, sandbox_id: str, config: Dict[str, Any], sandbox_config: Dict[str, Any],
                         timeout: float = 60.0) -> str:
        req = self.pb.CreateContainerRequest(pod_sandbox_id=sandbox_id,
                                             config=self.message("ContainerConfig", config),
                                             sandbox_config=self.message("PodSandboxConfig", sandbox_config))
        return self._call("CreateContainer", req, timeout).container_id

    def start_container(self, container_id: str, timeout: float = 60.0) -> None:
        self._call("StartContainer", self.pb.StartContainerRequest(container_id=container_id), timeout)

    def stop_container(self, container_id: str, grace: int = 0, timeout: float = 60.0) -> None:
        self._call("StopContainer", self.pb.StopContainerRequest(container_id=container_id, timeout=grace),
                   timeout)

    def stop_sandbox(self, sandbox_id: str, timeout: float = 60.0) -> None:
        self._call("StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout)

    def remove_sandbox(self, sandbox_id: str, timeout: float = 60.0) -> None:
        self._call("RemovePodSandbox", self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout)
