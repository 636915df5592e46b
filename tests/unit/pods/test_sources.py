"""Pod sources and the Resolver (bpftrace_hostport.pods.sources).

No cluster and no network beyond 127.0.0.1: the Kubernetes API is a small http.server in a
thread, the CRI runtime a grpc server on a unix socket answering with replies captured from a
real containerd, the nat rules are faked.
"""
from __future__ import annotations

import copy
import json
import os
import queue
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client as k8s_client

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
from bpftrace_hostport.pods import sources
from bpftrace_hostport.pods.sources import (CNIStateSource, CRISource, FileSource, KubeSource,
                                            Resolver, SourceUnavailable, resolve_sources)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pods" / "sources"
PODS_FIXTURES = FIXTURES.parent

WEB_SANDBOX = "5b2f0c6e9d1a4c3e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e"   # CNI state fixtures
CRIO_SANDBOX = "9d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa998877665544"
OLD_FORMAT_ID = "77aa88bb99cc00dd11ee22ff33aa44bb55cc66dd77ee88ff99aa00bb11cc22dd"


def wait_for(pred, timeout=3.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def names_of(pods):
    return {p.name for p in pods}


def by_name(pods):
    return {p.name: p for p in pods}


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No real kubeconfig, service account, CRI socket or nat rules leak into a test."""
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "NODE_NAME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(sources, "KUBECONFIG_FALLBACKS", ())
    monkeypatch.setattr(sources, "INCLUSTER_TOKEN", str(tmp_path / "no-token"))
    monkeypatch.setattr(sources, "DEFAULT_IPAM_DIRS", (str(tmp_path / "no-ipam"),))
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    from bpftrace_hostport.pods import cri
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT", raising=False)
    monkeypatch.setattr(cri, "DEFAULT_ENDPOINTS", (f"unix://{tmp_path / 'no-runtime.sock'}",))



# --------------------------------------------------------------------------- fake API server

def api_pods():
    return json.loads((FIXTURES / "api-pods.json").read_text())["items"]


class FakeAPI:
    """Answers GET /api/v1/pods (list, or watch=true as a chunked stream of events)."""

    def __init__(self, pods, port=0):
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.rv = 200
        self.requests = []
        self.events: "queue.Queue" = queue.Queue()
        self.closed = threading.Event()
        self.watch_generation = 0
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                with api.lock:
                    api.requests.append((u.path, q))
                if u.path != "/api/v1/pods":
                    body = b'{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}'
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                selector = q.get("fieldSelector", [""])[0]
                node = selector.split("=", 1)[1] if selector.startswith("spec.nodeName=") else None
                if q.get("watch", [""])[0] in ("true", "1"):
                    self.stream(node)
                    return
                with api.lock:
                    items = [p for p in api.pods.values()
                             if node is None or p["spec"].get("nodeName") == node]
                    doc = {"kind": "PodList", "apiVersion": "v1",
                           "metadata": {"resourceVersion": str(api.rv)}, "items": items}
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def stream(self, node):
                with api.lock:
                    api.watch_generation += 1
                    mine = api.watch_generation
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                try:
                    while not api.closed.is_set() and mine == api.watch_generation:
                        try:
                            event = api.events.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        if event is None:
                            break
                        data = (event + "\n").encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

        ThreadingHTTPServer.allow_reuse_address = True      # a restarted server takes its port back
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def api_client(self):
        cfg = k8s_client.Configuration(host=self.url)
        return k8s_client.ApiClient(cfg)

    def push(self, kind, obj):
        self.events.put(json.dumps({"type": kind, "object": obj}))

    def end_stream(self):
        self.events.put(None)

    def _requests(self, watch):
        with self.lock:
            return [q for path, q in self.requests
                    if path == "/api/v1/pods" and (q.get("watch", [""])[0] in ("true", "1")) == watch]

    def lists(self):
        return self._requests(False)

    def watches(self):
        return self._requests(True)

    def close(self):
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    pods = [p for p in api_pods() if p["metadata"]["name"] != "late-0"]
    server = FakeAPI(pods)
    yield server
    server.close()


def kubeconfig_for(tmp_path, url) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
users:
- name: fake
  user:
    token: not-a-secret
""")
    return str(path)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pod_named(name):
    return copy.deepcopy(next(p for p in api_pods() if p["metadata"]["name"] == name))


# --------------------------------------------------------------------------- KubeSource

def test_kube_lists_only_this_nodes_pods(api):
    src = KubeSource(node_name="node1", api_client=api.api_client(), request_timeout=2)
    src.refresh()
    assert names_of(src.pods()) == {"web-0", "node-exporter-9qzlm", "dns-0"}   # web-1 is on node2
    assert api.lists()[0]["fieldSelector"] == ["spec.nodeName=node1"]
    web = by_name(src.pods())["web-0"]
    assert web.namespace == "shop" and web.ips == ("10.244.1.7",) and web.node == "node1"
    assert web.ports == (ContainerPort("main", 80, "TCP", "http", 8080),)
    assert web.start_time == "2024-06-10T06:13:20Z"
    assert by_name(src.pods())["node-exporter-9qzlm"].host_network


def test_kube_watch_applies_events_and_keeps_deleted_pods_for_the_grace(api):
    src = KubeSource(node_name="node1", api_client=api.api_client(), grace_seconds=0.5,
                     request_timeout=2, retry_seconds=0.05)
    resolver = Resolver([src], auto_refresh=None)
    src.start()
    try:
        wait_for(lambda: len(api.watches()) == 1, what="the first watch")
        watch = api.watches()[0]
        assert watch["fieldSelector"] == ["spec.nodeName=node1"]
        assert watch["resourceVersion"] == ["200"]              # from the list
        assert names_of(src.pods()) == {"web-0", "node-exporter-9qzlm", "dns-0"}

        added = pod_named("web-0")
        added["metadata"].update(name="web-2", uid="66666666-6666-4666-8666-666666666666",
                                 resourceVersion="201")
        added["status"].update(podIP="10.244.1.20", podIPs=[{"ip": "10.244.1.20"}])
        api.push("ADDED", added)
        wait_for(lambda: "web-2" in names_of(src.pods()), what="ADDED")

        modified = pod_named("web-0")
        modified["metadata"]["resourceVersion"] = "202"
        modified["spec"]["containers"][0]["ports"][0].update(name="www", hostPort=8081)
        api.push("MODIFIED", modified)
        wait_for(lambda: by_name(src.pods())["web-0"].ports[0].host_port == 8081, what="MODIFIED")
        resolver.refresh()
        assert resolver.names("TCP", "10.244.1.7", 80) == ("shop", "web-0", "www")
        assert ("tcp", 8081) in resolver.host_ports()

        deleted = pod_named("dns-0")
        deleted["metadata"]["resourceVersion"] = "203"
        api.push("DELETED", deleted)
        wait_for(lambda: src._rv == "203", what="DELETED")
        resolver.refresh()
        assert resolver.names("UDP", "10.244.1.9", 53) == ("kube-system", "dns-0", "dns")  # in grace
        wait_for(lambda: "dns-0" not in names_of(src.pods()), timeout=2, what="the grace to end")
        resolver.refresh()
        assert resolver.names("UDP", "10.244.1.9", 53) is None
        assert len(api.lists()) == 1                            # events alone, no re-list
    finally:
        src.stop()


def test_kube_relists_on_410_gone_and_on_stream_end(api):
    src = KubeSource(node_name="node1", api_client=api.api_client(), grace_seconds=0.2,
                     request_timeout=2, retry_seconds=0.05)
    src.start()
    try:
        wait_for(lambda: len(api.watches()) == 1, what="the first watch")
        with api.lock:                       # changes the watch never reports
            api.pods["late-0"] = pod_named("late-0")
            del api.pods["dns-0"]
            api.rv = 300
        api.push("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "too old resource version: 200 (300)", "reason": "Expired",
                           "code": 410})
        wait_for(lambda: len(api.watches()) == 2, what="the watch after 410")
        assert len(api.lists()) == 2
        assert api.watches()[1]["resourceVersion"] == ["300"]
        assert "late-0" in names_of(src.pods())
        wait_for(lambda: "dns-0" not in names_of(src.pods()), timeout=2, what="dns-0 to go")

        api.end_stream()                      # the server closes the watch: list again
        wait_for(lambda: len(api.watches()) == 3, what="the watch after the stream ended")
        assert len(api.lists()) == 3
        assert all(q["fieldSelector"] == ["spec.nodeName=node1"] for q in api.lists() + api.watches())
    finally:
        src.stop()


def test_kube_unreachable_is_a_plain_sentence():
    port = closed_port()
    cfg = k8s_client.Configuration(host=f"http://127.0.0.1:{port}")
    cfg.retries = 0
    src = KubeSource(node_name="node1", api_client=k8s_client.ApiClient(cfg), request_timeout=1)
    with pytest.raises(SourceUnavailable) as err:
        src.refresh()
    assert err.value.note.startswith(f"Kubernetes API not reachable at http://127.0.0.1:{port} (")
    assert err.value.note.endswith(": skipped.")
    assert src.pods() == []                  # pods() never raises


def test_kube_node_name_defaults(monkeypatch):
    monkeypatch.setenv("NODE_NAME", "worker-7")
    assert KubeSource(api_client=object()).node == "worker-7"
    monkeypatch.delenv("NODE_NAME")
    monkeypatch.setattr(sources.socket, "gethostname", lambda: "Worker-8")
    src = KubeSource(api_client=object())
    assert src.node == "worker-8" and src.node_guessed
    assert src.field_selector == "spec.nodeName=worker-8"
    assert KubeSource(node_name="n", api_client=object()).node == "n"


def test_kubeconfig_candidates_order(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("t")
    monkeypatch.setattr(sources, "INCLUSTER_TOKEN", str(token))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    home_cfg = Path(os.environ["HOME"]) / ".kube" / "config"
    home_cfg.parent.mkdir()
    home_cfg.write_text("{}")
    env_cfg = tmp_path / "env.yaml"
    env_cfg.write_text("{}")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing.yaml'}{os.pathsep}{env_cfg}")
    got = [path for _, path in sources._kubeconfig_candidates(None)]
    assert got == [os.environ["KUBECONFIG"], str(home_cfg), None]
    with pytest.raises(UserError, match="does not exist"):
        sources._kubeconfig_candidates(str(tmp_path / "nope.yaml"))


# --------------------------------------------------------------------------- CRISource

CONTAINERD = FIXTURES / "cri" / "containerd-1.6.20"     # captured (cri/capture.py)
CRIO = FIXTURES / "cri" / "crio-handwritten"
DNS_SANDBOX = "898717cba2ba2f584ad125d59f43e7c86435b3f56910e159a80e7e23781a31b2"
NODEEXP_SANDBOX = "8d39dc36bbd182ce1fade27380778236dfc9112bc89efbd3b7f7639ceffd73f8"
NOTREADY_SANDBOX = "d4c8f6d0ae5e761b72557891f60ae5623ded1c1d1e3945a98d72784cc0389358"


class FakeCRI:
    """A CRI v1 RuntimeService on a unix socket (a real grpc server in threads) answering with the
    replies in `data` (protojson files, as cri/capture.py writes them; read again on every call,
    so a test can change them). `calls` logs (method, argument)."""

    def __init__(self, tmp_path, data, name="cri.sock"):
        from concurrent import futures

        import grpc
        from cri_api.v1 import api_pb2 as pb
        from cri_api.v1 import api_pb2_grpc
        from google.protobuf import json_format

        self.data, self.calls = Path(data), []
        fake = self

        def load(fname, cls):
            return json_format.Parse((fake.data / fname).read_text(), cls())

        class Servicer(api_pb2_grpc.RuntimeServiceServicer):
            def Version(self, request, context):
                fake.calls.append(("Version", None))
                return load("version.json", pb.VersionResponse)

            def ListPodSandbox(self, request, context):
                fake.calls.append(("ListPodSandbox", None))
                return load("list_pod_sandbox.json", pb.ListPodSandboxResponse)

            def ListContainers(self, request, context):
                fake.calls.append(("ListContainers", None))
                return load("list_containers.json", pb.ListContainersResponse)

            def PodSandboxStatus(self, request, context):
                fake.calls.append(("PodSandboxStatus", request.pod_sandbox_id))
                fname = f"pod_sandbox_status-{request.pod_sandbox_id}.json"
                if not (fake.data / fname).exists():
                    context.abort(grpc.StatusCode.NOT_FOUND, f"an error occurred when try to find "
                                  f"sandbox {request.pod_sandbox_id!r}: not found")
                return load(fname, pb.PodSandboxStatusResponse)

        self.sock = tmp_path / name
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"unix://{self.sock}")
        self.server.start()

    @property
    def endpoint(self):
        return f"unix://{self.sock}"

    def close(self):
        self.server.stop(0)

    def statuses(self):
        return [a for m, a in self.calls if m == "PodSandboxStatus"]


@pytest.fixture
def fake_cri(tmp_path):
    servers = []

    def start(data=CONTAINERD, name="cri.sock"):
        servers.append(FakeCRI(tmp_path, data, name))
        return servers[-1]
    yield start
    for srv in servers:
        srv.close()


def test_cri_containerd_sandboxes(fake_cri):
    cri_ = fake_cri()
    src = CRISource(cri_.endpoint)
    src.refresh()
    pods = by_name(src.pods())
    assert set(pods) == {"dns", "node-exporter"}                # the NOTREADY sandbox is skipped
    dns = pods["dns"]
    assert (dns.namespace, dns.uid) == ("kube-system", "38aa3e89-9a3b-125d-dccc-d5691f0fcb56")
    assert dns.ips == ("10.210.1.3", "fd00:210:1::3")
    assert not dns.host_network and dns.phase == "Running"
    assert dns.start_time == "2026-12-08T01:19:49Z"             # createdAt: ns since the epoch
    assert dns.container_ids[0] == DNS_SANDBOX and len(dns.container_ids) == 3
    # names from the kubelet's container annotation (the lab writes it as the kubelet does)
    assert set(dns.ports) == {
        ContainerPort("coredns", 53, "UDP", "dns", 5353),
        ContainerPort("coredns", 53, "TCP", "dns-tcp", 5353, "10.64.0.1"),
        ContainerPort("exporter", 9153, "TCP", "metrics"),
    }
    ne = pods["node-exporter"]
    assert ne.host_network and ne.ips == ()                     # NamespaceMode NODE
    assert ne.ports == (ContainerPort("exporter", 9100, "TCP", "metrics", 9100),)
    assert [m for m, _ in cri_.calls[:3]] == ["Version", "ListPodSandbox", "ListContainers"]
    assert sorted(cri_.statuses()) == sorted([DNS_SANDBOX, NODEEXP_SANDBOX])
    src.refresh()                                               # a sandbox is asked once
    assert len(cri_.statuses()) == 2
    src.stop()


def test_cri_without_container_names_uses_sandbox_mappings(fake_cri, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(CONTAINERD, data)
    (data / "list_containers.json").write_text("{}")
    src = CRISource(fake_cri(data).endpoint)
    dns = by_name(src.pods())["dns"]
    # containerd's info.config.port_mappings: protocol 1 = UDP, TCP (0) left out, the hostIP kept
    assert set(dns.ports) == {ContainerPort("", 53, "UDP", None, 5353),
                              ContainerPort("", 53, "TCP", None, 5353, "10.64.0.1")}


def test_cri_crio_port_mappings_annotation(fake_cri):
    src = CRISource(fake_cri(CRIO).endpoint)
    (pod,) = src.pods()
    assert (pod.namespace, pod.name, pod.ips) == ("default", "echo-5f7b9c-lm2np", ("10.85.0.12",))
    assert pod.ports == (ContainerPort("", 8443, "TCP", None, 9443), ContainerPort("", 53, "UDP", None, 9053))
    assert pod.container_ids == (CRIO_SANDBOX,)


def test_cri_removed_sandbox_lingers_for_the_grace(fake_cri, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(CONTAINERD, data)
    src = CRISource(fake_cri(data).endpoint, grace_seconds=0.3, interval=0.05)
    src.start()
    try:
        wait_for(lambda: "dns" in names_of(src.pods()), what="the first poll")
        listing = json.loads((data / "list_pod_sandbox.json").read_text())
        listing["items"] = [i for i in listing["items"] if i["id"] != DNS_SANDBOX]
        (data / "list_pod_sandbox.json").write_text(json.dumps(listing))
        time.sleep(0.15)
        assert "dns" in names_of(src.pods())
        wait_for(lambda: "dns" not in names_of(src.pods()), what="the grace to end")
        assert "node-exporter" in names_of(src.pods())
    finally:
        src.stop()


def test_cri_endpoint_order_and_failures(fake_cri, tmp_path, monkeypatch):
    from bpftrace_hostport.pods import cri
    missing = tmp_path / "missing.sock"
    monkeypatch.setattr(cri, "DEFAULT_ENDPOINTS", (f"unix://{missing}",))
    with pytest.raises(SourceUnavailable) as err:
        CRISource().refresh()
    assert err.value.note == f"No container runtime socket found ({missing}): skipped."
    with pytest.raises(UserError, match=r"No container runtime socket found .*; pass --cri-endpoint "
                                        r"unix:///PATH or set CONTAINER_RUNTIME_ENDPOINT\.$"):
        resolve_sources([], "cri")
    # An explicit endpoint whose socket is not there, and a socket nothing answers on.
    with pytest.raises(SourceUnavailable, match=f"no socket at {missing}"):
        CRISource(str(missing)).refresh()
    dead = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dead))                     # bound, never listening: connection refused
    try:
        with pytest.raises(SourceUnavailable, match=rf"did not answer over CRI \(unix://{dead}: UNAVAILABLE"):
            CRISource(f"unix://{dead}", timeout=2).refresh()
        assert CRISource(f"unix://{dead}", timeout=2).pods() == []
    finally:
        sock.close()
    # $CONTAINER_RUNTIME_ENDPOINT, then the usual sockets, the first that exists and answers.
    live = fake_cri()
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", live.endpoint)
    src = CRISource()
    assert names_of(src.pods()) == {"dns", "node-exporter"} and src.endpoint == live.endpoint
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT")
    monkeypatch.setattr(cri, "DEFAULT_ENDPOINTS", (f"unix://{missing}", live.endpoint))
    assert names_of(CRISource().pods()) == {"dns", "node-exporter"}


def test_cri_runtime_going_away_and_coming_back(fake_cri, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(CONTAINERD, data)
    first = fake_cri(data, "ctd.sock")
    src = CRISource(first.endpoint, timeout=2)
    src.refresh()
    first.close()
    with pytest.raises(SourceUnavailable, match="stopped answering"):
        src.refresh()
    assert names_of(src.pods()) == {"dns", "node-exporter"}      # the last view stays
    fake_cri(data, "ctd.sock")                                   # restarted on the same socket
    src.refresh()
    assert names_of(src.pods()) == {"dns", "node-exporter"}


# --------------------------------------------------------------------------- CNIStateSource

@pytest.fixture
def ipam(tmp_path):
    root = tmp_path / "networks"
    shutil.copytree(FIXTURES / "cni" / "networks", root)
    v6 = root / "podnet6"
    v6.mkdir()
    (v6 / "fd00:10:244:1::7").write_bytes(WEB_SANDBOX.encode() + b"\r\neth0")
    return root


def fake_rules(found, notes=()):
    """A rule reader for CNIStateSource(read_rules=...), and the namespaces it was asked for."""
    seen = []

    def read_node_rules(netns=None):
        seen.append(netns)
        return list(found), list(notes)
    return read_node_rules, seen


RULES = [
    HostPortRule("TCP", 8080, "10.244.1.7", 80, chain="CNI-DN-5b2f0c6e9d1a4c3e8f7a6",
                 container_id=WEB_SANDBOX),
    HostPortRule("UDP", 5353, "10.244.1.7", 53, host_ip="192.168.56.11",
                 chain="CNI-DN-5b2f0c6e9d1a4c3e8f7a6", container_id=WEB_SANDBOX),
    HostPortRule("TCP", 8080, "fd00:10:244:1::7", 80, chain="CNI-DN-5b2f0c6e9d1a4c3e8f7a6",
                 container_id=WEB_SANDBOX, family=6),
    HostPortRule("TCP", 9000, "10.244.1.30", 9000, chain="CNI-DN-0123456789abcdef01234",
                 container_id="0123456789abcdef" * 4),                 # IPAM other than host-local
    HostPortRule("TCP", 7000, "10.244.1.8", 7070, chain="KUBE-HP-ABCDEF", source="crio"),  # no id
]


def test_cni_state_joins_host_local_and_portmap(monkeypatch, ipam):
    reader, seen = fake_rules(RULES)
    src = CNIStateSource(netns="node1", ipam_dirs=[str(ipam)], read_rules=reader)
    pods = by_name(src.pods())
    assert seen == ["node1"]
    assert set(pods) == {"cni-5b2f0c6e9d1a", "cni-77aa88bb99cc", "cni-0123456789ab"}
    web = pods["cni-5b2f0c6e9d1a"]
    assert web.namespace == "" and web.uid is None and not web.host_network
    assert set(web.ips) == {"10.244.1.7", "fd00:10:244:1::7"}
    assert set(web.ports) == {ContainerPort("", 80, "TCP", None, 8080),
                              ContainerPort("", 53, "UDP", None, 5353, "192.168.56.11")}
    assert web.container_ids == (WEB_SANDBOX,)
    old = pods["cni-77aa88bb99cc"]                           # id-only file, rule matched by IP
    assert old.ips == ("10.244.1.8",) and old.ports == (ContainerPort("", 7070, "TCP", None, 7000),)
    assert old.container_ids == (OLD_FORMAT_ID,)
    assert pods["cni-0123456789ab"].ips == ("10.244.1.30",)

    resolver = Resolver([src])
    assert resolver.names("TCP", "10.244.1.7", 80) == ("", "cni-5b2f0c6e9d1a", None)
    assert resolver.names("TCP", "fd00:10:244:1::7", 80) == ("", "cni-5b2f0c6e9d1a", None)
    assert resolver.names("TCP", "10.244.1.99", 80) is None
    assert resolver.host_ports() == {("tcp", 8080), ("udp", 5353), ("tcp", 9000), ("tcp", 7000)}


def test_cni_state_accepts_a_network_dir_and_nothing(monkeypatch, ipam, tmp_path):
    pods = CNIStateSource(ipam_dirs=[str(ipam / "cbr0")], read_rules=fake_rules([])[0]).pods()
    assert names_of(pods) == {"cni-5b2f0c6e9d1a", "cni-77aa88bb99cc"}
    assert CNIStateSource(ipam_dirs=[str(tmp_path / "absent")]).pods() == []


# --------------------------------------------------------------------------- resolve_sources

def test_resolve_rejects_unknown_choice_and_file_without_files():
    with pytest.raises(UserError, match="not a pod source; use one of auto, file, kube, cri, cni, none"):
        resolve_sources([], "etcd")
    with pytest.raises(UserError, match="needs at least one pod list file"):
        resolve_sources([], "file")


def test_resolve_file_and_none():
    path = str(PODS_FIXTURES / "kubectl-pods.json")
    srcs, notes = resolve_sources([path], "file")
    assert [s.name for s in srcs] == ["file"] and notes == []
    assert srcs[0].pods()
    srcs, notes = resolve_sources([path], "none")
    assert [s.name for s in srcs] == ["file"] and notes == []
    assert resolve_sources([], "none") == ([], [])


def test_resolve_auto_falls_back_to_cni_and_says_why(monkeypatch):
    srcs, notes = resolve_sources([], "auto", read_rules=fake_rules([])[0])
    assert [s.name for s in srcs] == ["cni"]
    assert notes[0].startswith("No Kubernetes configuration found (no --kubeconfig, KUBECONFIG, ")
    assert notes[0].endswith(": skipped.")
    assert notes[1].startswith("No container runtime socket found (") and notes[1].endswith(": skipped.")
    assert notes[2].startswith("No CNI host-local allocations under ")
    assert len(notes) == 3


def test_resolve_auto_uses_kube_from_kubeconfig_env(api, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", kubeconfig_for(tmp_path, api.url))
    srcs, notes = resolve_sources([str(PODS_FIXTURES / "kubectl-pods.json")], "auto", node_name="node1")
    assert [s.name for s in srcs] == ["file", "kube"] and notes == []
    assert names_of(srcs[1].pods()) == {"web-0", "node-exporter-9qzlm", "dns-0"}
    assert api.lists()[0]["fieldSelector"] == ["spec.nodeName=node1"]


def test_resolve_auto_skips_unreachable_api_then_uses_cri(tmp_path, monkeypatch, fake_cri):
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", fake_cri().endpoint)
    srcs, notes = resolve_sources([], "auto", kubeconfig=kubeconfig_for(tmp_path, url),
                                  node_name="node1")
    assert [s.name for s in srcs] == ["cri"]
    assert len(notes) == 1
    assert notes[0].startswith(f"Kubernetes API not reachable at {url} (")
    assert notes[0].endswith("): skipped.")


def test_resolve_explicit_kube_failures_are_user_errors(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(UserError, match=rf"^Kubernetes API not reachable at {url} .*; check the kubeconfig"):
        resolve_sources([], "kube", kubeconfig=kubeconfig_for(tmp_path, url), node_name="node1")
    with pytest.raises(UserError, match="No Kubernetes configuration found"):
        resolve_sources([], "kube", node_name="node1")
    with pytest.raises(UserError, match="does not exist; pass an existing file with --kubeconfig"):
        resolve_sources([], "auto", kubeconfig=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    with pytest.raises(UserError, match="could not be loaded"):
        resolve_sources([], "kube", kubeconfig=str(bad))


def test_resolve_explicit_kube_and_cri_work(api, tmp_path, monkeypatch, fake_cri):
    srcs, notes = resolve_sources([], "kube", kubeconfig=kubeconfig_for(tmp_path, api.url),
                                  node_name="node1")
    assert [s.name for s in srcs] == ["kube"] and notes == []
    srcs, notes = resolve_sources([], "cri", cri_endpoint=fake_cri().endpoint)
    assert [s.name for s in srcs] == ["cri"] and len(srcs[0].pods()) == 2


def test_resolve_guessed_node_without_pods_says_so(api, tmp_path, monkeypatch):
    monkeypatch.setattr(sources.socket, "gethostname", lambda: "laptop")
    srcs, notes = resolve_sources([], "kube", kubeconfig=kubeconfig_for(tmp_path, api.url))
    assert [s.name for s in srcs] == ["kube"]
    assert notes == ["The Kubernetes API lists no pods on node laptop (this host's name); "
                     "set NODE_NAME if the node is registered under another name."]


# --------------------------------------------------------------------------- Resolver

class StaticSource:
    def __init__(self, pods, name="static"):
        self.name = name
        self.view = list(pods)
        self.started = self.stopped = 0

    def pods(self):
        return list(self.view)

    def start(self):
        self.started += 1

    def stop(self):
        self.stopped += 1


WEB = PodInfo("shop", "web-0", uid="u-web", ips=("10.244.1.7",), phase="Running",
              ports=(ContainerPort("main", 80, "TCP", "http", 8080),))
HOSTNET = PodInfo("monitoring", "node-exporter", uid="u-ne", ips=("192.168.56.11",), host_network=True,
                  ports=(ContainerPort("ne", 9100, "TCP", "metrics", 9100),))


def test_resolver_names_pod_network_host_network_and_unknown():
    r = Resolver([StaticSource([WEB, HOSTNET])])
    assert r.names("TCP", "10.244.1.7", 80) == ("shop", "web-0", "http")
    assert r.names("tcp", "10.244.1.7", 81) == ("shop", "web-0", None)
    assert r.lookup("TCP", "10.244.1.7", 80) == (WEB, WEB.ports[0])
    assert r.names("TCP", "192.168.56.11", 9100) is None          # never pinned by IP
    assert r.host_network_owner("TCP", 9100) == HOSTNET
    assert r.host_network_owner("UDP", 9100) is None
    assert r.names("TCP", "10.99.0.1", 80) is None
    assert r.host_ports() == {("tcp", 8080), ("tcp", 9100)}
    assert r.pods() == [WEB, HOSTNET]


def test_resolver_merges_sources_and_follows_them():
    kube = StaticSource([WEB, HOSTNET], "kube")
    same_from_file = PodInfo("monitoring", "node-exporter", uid=None, ips=("192.168.56.11",),
                             host_network=True, ports=HOSTNET.ports)
    files = StaticSource([same_from_file], "file")
    r = Resolver([files, kube], auto_refresh=None)
    assert len(r.pods()) == 2                                      # the duplicate kept once
    assert r.host_network_owner("TCP", 9100) is same_from_file     # first source wins, still unique

    moved = PodInfo("shop", "web-0", uid="u-web2", ips=("10.244.1.8",), ports=WEB.ports)
    kube.view = [moved]
    assert r.names("TCP", "10.244.1.8", 80) is None               # no auto refresh
    r.refresh()
    assert r.names("TCP", "10.244.1.8", 80) == ("shop", "web-0", "http")
    assert r.names("TCP", "10.244.1.7", 80) is None

    r.extend([WEB])                                                # fixed extra pods survive refreshes
    r.refresh()
    assert r.names("TCP", "10.244.1.7", 80) == ("shop", "web-0", "http")

    with r:
        assert kube.started == files.started == 1
    assert kube.stopped == files.stopped == 1


def test_resolver_refreshes_by_itself():
    src = StaticSource([])
    r = Resolver([src], auto_refresh=0.05)
    src.view = [WEB]
    time.sleep(0.06)
    assert r.names("TCP", "10.244.1.7", 80) == ("shop", "web-0", "http")


def test_resolver_prefers_live_pods_over_lingering_ones(api):
    """A deleted pod whose IP was recycled loses to the live pod holding it now."""
    src = KubeSource(node_name="node1", api_client=api.api_client(), grace_seconds=5,
                     request_timeout=2, retry_seconds=0.05)
    src.start()
    try:
        wait_for(lambda: len(api.watches()) == 1, what="the first watch")
        gone = pod_named("dns-0")
        api.push("DELETED", gone)
        new = pod_named("dns-0")
        new["metadata"].update(name="dns-1", uid="77777777-7777-4777-8777-777777777777")
        api.push("ADDED", new)
        wait_for(lambda: "dns-1" in names_of(src.pods()), what="ADDED")
        r = Resolver([src])
        assert r.names("UDP", "10.244.1.9", 53) == ("kube-system", "dns-1", "dns")
        assert "dns-0" in names_of(r.pods())
    finally:
        src.stop()


def test_file_source_reads_once():
    fs = FileSource([str(PODS_FIXTURES / "kubectl-pods.json")])
    first = fs.pods()
    assert first and fs.pods() == first
    fs.start()
    fs.stop()
    with pytest.raises(UserError):
        FileSource([str(PODS_FIXTURES / "bad-not-json.json")]).pods()
