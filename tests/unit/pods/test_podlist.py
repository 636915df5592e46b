"""Pod lists as kubectl writes them (bpftrace_hostport.pods.podlist)."""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import stat
import uuid
from pathlib import Path

import pytest
from kubernetes.client import ApiClient, V1Pod, V1PodList

import bpftrace_hostport
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import ContainerPort, PodInfo
from bpftrace_hostport.pods.manifests import load_manifests
from bpftrace_hostport.pods.podlist import (plan_to_pod, pod_from_k8s, pod_to_k8s, read_pod_list,
                                            write_pod_list)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pods"
SHIPPED = Path(bpftrace_hostport.__file__).resolve().parent / "lab" / "data" / "nginx-hostport.yaml"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


@pytest.fixture(scope="module")
def kubectl_pods():
    return read_pod_list(fixture("kubectl-pods.json"))


def k8s_deserialize(obj, klass="V1Pod"):
    """What the official client makes of `obj` when the API server returns it."""
    return ApiClient().deserialize(json.dumps(obj), klass, "application/json")


def normalize_times(obj):
    """The client writes datetimes back as +00:00; the API writes Z."""
    if isinstance(obj, dict):
        return {k: normalize_times(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize_times(v) for v in obj]
    if isinstance(obj, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", obj):
        return obj.replace("+00:00", "Z")
    return obj


# --------------------------------------------------------------------------- reading kubectl output

def test_read_kubectl_json(kubectl_pods):
    web, nginx, exporter, resolver = kubectl_pods

    assert web == PodInfo(
        namespace="default", name="web-7c5ddbdf54-2xqzv", uid="5b1f0f0e-2c8b-4b7a-9a3e-1d7c2f4e6a01",
        node="worker-1", ips=("10.244.1.12",), host_network=False,
        ports=(ContainerPort("web", 8080, "TCP", "http", None, None),),
        phase="Running", start_time="2024-05-14T08:21:37Z")
    assert web.host_ports == ()
    assert web.container_ids == ("3f9c2d1e8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c3b2a1908f7e6d",)

    assert nginx.namespace == "cjweichen"
    assert [(p.name, p.container_port, p.host_port) for p in nginx.host_ports] == [("http", 80, 8000),
                                                                                ("https", 443, 44300)]

    assert exporter.host_network is True
    assert exporter.ips == ("192.168.56.11",)
    assert exporter.ports == (ContainerPort("node-exporter", 9100, "TCP", "metrics", 9100, None),)

    assert resolver.ips == ("10.244.1.14", "fd00:10:244:1::e")
    assert [(p.protocol, p.container_port, p.host_port) for p in resolver.ports] == [("UDP", 53, 5353),
                                                                                  ("TCP", 53, 5353)]


def test_yaml_variant_is_the_same(kubectl_pods):
    pods = read_pod_list(fixture("kubectl-pods.yaml"))
    assert pods == kubectl_pods
    assert [p.container_ids for p in pods] == [p.container_ids for p in kubectl_pods]


def test_api_podlist_items_without_kind(kubectl_pods):
    assert read_pod_list(fixture("api-podlist.json")) == kubectl_pods[:2]


def test_single_pod_yaml_with_unquoted_timestamps(kubectl_pods):
    [pod] = read_pod_list(fixture("pod-hostnetwork.yaml"))
    assert pod == kubectl_pods[2]
    assert pod.start_time == "2024-05-14T08:21:37Z"        # a string, not a datetime


def test_stdin(monkeypatch, kubectl_pods):
    monkeypatch.setattr("sys.stdin", io.StringIO((FIXTURES / "kubectl-pods.json").read_text()))
    assert read_pod_list("-") == kubectl_pods


def test_fixtures_are_what_the_official_client_accepts():
    text = (FIXTURES / "kubectl-pods.json").read_text()
    podlist = ApiClient().deserialize(text, "V1PodList", "application/json")
    assert isinstance(podlist, V1PodList) and len(podlist.items) == 4
    assert [ip.ip for ip in podlist.items[3].status.pod_ips] == ["10.244.1.14", "fd00:10:244:1::e"]


def test_mixed_list_keeps_the_pods(tmp_path, kubectl_pods):
    doc = json.loads((FIXTURES / "kubectl-pods.json").read_text())
    doc["items"].insert(1, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(doc))
    assert read_pod_list(str(path)) == kubectl_pods


def test_empty_list(tmp_path):
    path = tmp_path / "none.json"
    write_pod_list([], str(path))
    assert read_pod_list(str(path)) == []


# --------------------------------------------------------------------------- pod_from_k8s details

def test_pod_from_k8s_fallbacks():
    pod = pod_from_k8s({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 0}]}]},
        "status": {"podIP": "10.0.0.7", "phase": "Pending",
                   "containerStatuses": [{"name": "c", "containerID": "cri-o://abc"},
                                         {"name": "d", "containerID": "docker://def"},
                                         {"name": "e"}]},
    })
    assert pod.namespace == "default"
    assert pod.ips == ("10.0.0.7",)
    assert pod.uid is None and pod.node is None and pod.start_time is None
    assert pod.ports == (ContainerPort("c", 80, "TCP", None, None, None),)
    assert pod.phase == "Pending"
    assert pod.container_ids == ("abc", "def")


def test_pod_from_k8s_datetime_start_time():
    pod = pod_from_k8s({"metadata": {"name": "p"},
                        "status": {"startTime": dt.datetime(2024, 5, 14, 8, 21, 37, tzinfo=dt.timezone.utc)}})
    assert pod.start_time == "2024-05-14T08:21:37Z"


@pytest.mark.parametrize("obj,expected", [
    ({"metadata": {}}, "no metadata.name"),
    ({"spec": {}}, "no metadata.name"),
    ([], "not a mapping"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": "80"}]}]}},
     "containerPort '80'"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 70000}]}]}},
     "hostPort 70000"),
    ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "tcp"}]}]}},
     "TCP, UDP or SCTP"),
])
def test_pod_from_k8s_errors(obj, expected):
    with pytest.raises(UserError) as err:
        pod_from_k8s(obj)
    assert expected in str(err.value)


# --------------------------------------------------------------------------- pod_to_k8s

def test_round_trip(kubectl_pods):
    for pod in kubectl_pods:
        back = pod_from_k8s(pod_to_k8s(pod))
        assert back == pod
        assert back.container_ids == pod.container_ids


def test_round_trip_edge_cases():
    bare = PodInfo(namespace="ns", name="bare")
    assert pod_from_k8s(pod_to_k8s(bare)) == bare
    ids = PodInfo(namespace="ns", name="ids", ports=(ContainerPort("a", 1),), container_ids=("x", "y", "z"))
    d = pod_to_k8s(ids)
    assert [c["name"] for c in d["spec"]["containers"]] == ["a", "container-1", "container-2"]
    assert pod_from_k8s(d).container_ids == ("x", "y", "z")
    bound = PodInfo(namespace="ns", name="bound", ips=("10.1.1.1",),
                    ports=(ContainerPort("a", 80, "TCP", "http", 8080, "192.168.1.5"),))
    assert pod_from_k8s(pod_to_k8s(bound)) == bound


def test_pod_to_k8s_shape(kubectl_pods):
    d = pod_to_k8s(kubectl_pods[2])                 # the hostNetwork pod
    assert d["apiVersion"] == "v1" and d["kind"] == "Pod"
    assert d["metadata"] == {"name": "node-exporter-8wz5k", "namespace": "monitoring",
                             "uid": "2f3e4d5c-6b7a-4897-a6b5-c4d3e2f1a0b9"}
    assert d["spec"]["nodeName"] == "worker-1" and d["spec"]["hostNetwork"] is True
    assert d["spec"]["containers"] == [{"name": "node-exporter", "ports": [
        {"containerPort": 9100, "hostPort": 9100, "name": "metrics", "protocol": "TCP"}]}]
    assert d["status"]["phase"] == "Running"
    assert d["status"]["podIP"] == d["status"]["hostIP"] == "192.168.56.11"
    assert d["status"]["podIPs"] == [{"ip": "192.168.56.11"}]
    assert d["status"]["startTime"] == "2024-05-14T08:21:37Z"
    assert d["status"]["containerStatuses"][0]["containerID"] == (
        "containerd://0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0")


def test_pod_to_k8s_is_a_valid_v1_pod(kubectl_pods):
    plans = load_manifests([str(SHIPPED), fixture("manifests/pod.yaml")])
    planned = [plan_to_pod(p, ("10.244.1.20", "fd00:10:244:1::14"), "worker-2", start_time="2024-06-01T12:00:00Z")
               for p in plans]
    for pod in list(kubectl_pods) + planned + [PodInfo(namespace="ns", name="bare")]:
        d = pod_to_k8s(pod)
        v1 = k8s_deserialize(d)
        assert isinstance(v1, V1Pod)
        # every key we wrote is a field the client knows: nothing was dropped on the way
        assert normalize_times(ApiClient().sanitize_for_serialization(v1)) == d
        assert v1.metadata.name == pod.name and v1.metadata.namespace == pod.namespace
        assert [ip.ip for ip in (v1.status.pod_ips or [])] == list(pod.ips)
        ports = [(c.name, p.container_port, p.host_port, p.protocol)
                 for c in v1.spec.containers for p in (c.ports or [])]
        assert ports == [(p.container, p.container_port, p.host_port, p.protocol) for p in pod.ports]
        if pod.start_time:
            assert v1.status.start_time == dt.datetime.fromisoformat(pod.start_time.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- writing

def test_write_then_read(tmp_path, kubectl_pods):
    path = tmp_path / "pods.json"
    write_pod_list(kubectl_pods, str(path))
    text = path.read_text()
    doc = json.loads(text)
    assert list(doc) == ["apiVersion", "items", "kind", "metadata"]      # as kubectl prints it
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"
    assert doc["metadata"] == {"resourceVersion": ""}
    assert text.startswith('{\n    "apiVersion": "v1",\n') and text.endswith("}\n")
    assert read_pod_list(str(path)) == kubectl_pods
    assert [p.container_ids for p in read_pod_list(str(path))] == [p.container_ids for p in kubectl_pods]
    assert isinstance(k8s_deserialize(doc, "V1PodList"), V1PodList)
    assert sorted(os.listdir(tmp_path)) == ["pods.json"]                  # no temporary file left


def test_write_replaces_atomically(tmp_path, kubectl_pods, monkeypatch):
    path = tmp_path / "pods.json"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    write_pod_list(kubectl_pods[:1], str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640                   # mode kept
    assert len(read_pod_list(str(path))) == 1

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken_replace)
    before = path.read_text()
    with pytest.raises(UserError, match="No space left on device"):
        write_pod_list(kubectl_pods, str(path))
    assert path.read_text() == before                                     # old content intact
    assert sorted(os.listdir(tmp_path)) == ["pods.json"]


def test_write_new_file_mode(tmp_path):
    path = tmp_path / "new.json"
    write_pod_list([PodInfo(namespace="ns", name="p")], str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(UserError) as err:
        write_pod_list([], str(tmp_path / "missing" / "pods.json"))
    assert "pods.json" in str(err.value) and str(err.value).endswith(".")


def test_write_to_stdout(capsys, kubectl_pods):
    write_pod_list(kubectl_pods[:1], "-")
    assert json.loads(capsys.readouterr().out)["items"][0]["metadata"]["name"] == "web-7c5ddbdf54-2xqzv"


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,expected", [
    ("bad-not-json.json", ["bad-not-json.json", "not valid JSON", "line 6"]),
    ("bad-service-list.json", ["bad-service-list.json", "not a pod list", "Service", "kubectl get pods -o json"]),
    ("bad-item-without-name.yaml", ["bad-item-without-name.yaml", "item 2", "no metadata.name"]),
    ("bad-deployment.yaml", ["bad-deployment.yaml", "not a pod list", "Deployment"]),
])
def test_read_errors(name, expected):
    with pytest.raises(UserError) as err:
        read_pod_list(fixture(name))
    message = str(err.value)
    for part in expected:
        assert part in message, message
    assert message.endswith(".") and "\n" not in message


def test_read_missing_and_empty(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_pod_list(str(tmp_path / "nope.json"))
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_pod_list(str(empty))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="not a pod list"):
        read_pod_list(str(listy))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("items:\n  - a\n b: c\n")
    with pytest.raises(UserError, match=r"not valid YAML or JSON \(line 3"):
        read_pod_list(str(bad_yaml))


# --------------------------------------------------------------------------- plans

def test_plan_to_pod():
    [plan] = load_manifests([str(SHIPPED)])
    pod = plan_to_pod(plan, ("10.244.1.13",), "worker-1")
    assert pod.namespace == "cjweichen" and pod.name == plan.name
    assert pod.node == "worker-1" and pod.ips == ("10.244.1.13",)
    assert pod.phase == "Running" and pod.start_time is None
    assert pod.host_network is False and pod.ports == plan.ports
    assert uuid.UUID(pod.uid)
    assert plan_to_pod(plan, ("10.244.1.13",), "worker-1") == pod       # reproducible uid
    assert plan_to_pod(plan, ("10.244.1.13",), "worker-1", uid="u", phase="Pending",
                       start_time="2024-01-01T00:00:00Z").uid == "u"


def test_plan_to_pod_hostnetwork():
    [plan] = load_manifests([fixture("manifests/daemonset-hostnetwork.yaml")])
    pod = plan_to_pod(plan, ("192.168.56.12",), "worker-2")
    assert pod.host_network and pod.ips == ("192.168.56.12",)
    d = pod_to_k8s(pod)
    assert d["status"]["hostIP"] == "192.168.56.12"
    assert pod_from_k8s(d) == pod
