"""Workload manifests -> the pods Kubernetes would create (bpftrace_hostport.pods.manifests)."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest

import bpftrace_hostport
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import ContainerPort
from bpftrace_hostport.pods.manifests import PodPlan, load_manifests, parse_manifests, template_hash

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pods" / "manifests"
SHIPPED = Path(bpftrace_hostport.__file__).resolve().parent / "lab" / "data" / "nginx-hostport.yaml"
A = "[bcdfghjklmnpqrstvwxz2456789]"
HASH = "[4-9bcdf]{10}"          # a pod-template-hash is safe-encoded decimal digits


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def load(name: str):
    return load_manifests([fixture(name)])


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and not re.search(r"\.\s+[A-Z]", message)


# --------------------------------------------------------------------------- the shipped example

def test_shipped_nginx_hostport_gives_one_deployment_pod():
    plans = load_manifests([str(SHIPPED)])
    assert len(plans) == 1
    plan = plans[0]
    assert plan.namespace == "cjweichen"
    m = re.fullmatch(rf"nginx-hostport-({HASH})-({A}{{5}})", plan.name)
    assert m, plan.name
    assert plan.workload == "Deployment/nginx-hostport"
    assert plan.host_network is False
    assert plan.containers == ("nginx",)
    assert plan.labels == {"k8s-app": "nginx-hostport", "qcloud-app": "nginx-hostport",
                           "pod-template-hash": m.group(1)}
    assert plan.ports == (
        ContainerPort(container="nginx", container_port=80, protocol="TCP", name="http", host_port=8000),
        ContainerPort(container="nginx", container_port=443, protocol="TCP", name="https", host_port=44300),
    )
    assert [(p.name, p.container_port, p.host_port) for p in plan.host_ports] == [("http", 80, 8000),
                                                                               ("https", 443, 44300)]


def test_names_are_deterministic():
    first = load_manifests([str(SHIPPED)])
    again = parse_manifests(SHIPPED.read_text(), origin="again")
    assert first == again
    assert hash(first[0]) == hash(again[0])       # frozen and hashable despite the labels dict


def test_template_hash_follows_the_template():
    text = SHIPPED.read_text()
    before = parse_manifests(text)[0]
    after = parse_manifests(text.replace("image: nginx", "image: nginx:1.25"))[0]
    h1 = before.name.split("-")[-2]
    h2 = after.name.split("-")[-2]
    assert h1 != h2
    assert len(h1) == len(h2) == 10
    assert before.labels["pod-template-hash"] == h1
    assert template_hash({"a": 1}) == template_hash({"a": 1})
    # replicas are not part of the template: scaling keeps the hash
    scaled = parse_manifests(text.replace("replicas: 1", "replicas: 3"))
    assert {p.name.split("-")[-2] for p in scaled} == {h1}
    assert scaled[0] == before and len({p.name for p in scaled}) == 3


# --------------------------------------------------------------------------- every kind

def test_pod():
    [plan] = load("pod.yaml")
    assert (plan.namespace, plan.name, plan.workload) == ("lab", "echo", "Pod/echo")
    assert plan.containers == ("echo", "sidecar")
    assert plan.labels == {"app": "echo"}
    assert plan.ports == (
        ContainerPort("echo", 8080, "TCP", "http", 18080, "192.168.56.11"),
        ContainerPort("echo", 8081, "UDP", "udp", 18081, None),
        ContainerPort("echo", 9090, "TCP", None, None, None),
    )
    assert len(plan.host_ports) == 2


def test_pod_generate_name():
    [plan] = load("generate-name.yaml")
    assert re.fullmatch(rf"debug-{A}{{5}}", plan.name)
    assert plan.namespace == "default"


def test_replicaset():
    plans = load("replicaset.yaml")
    assert len(plans) == 3
    assert len({p.name for p in plans}) == 3
    for p in plans:
        assert re.fullmatch(rf"frontend-{A}{{5}}", p.name)
        assert p.namespace == "default" and p.workload == "ReplicaSet/frontend"
        assert p.ports == (ContainerPort("php-redis", 80, "TCP", None, 8080, None),)
        assert p.labels == {"tier": "frontend"}


def test_statefulset():
    plans = load("statefulset.yaml")
    assert [p.name for p in plans] == ["web-0", "web-1"]
    assert all(p.namespace == "db" and p.workload == "StatefulSet/web" for p in plans)
    assert plans[1].labels["statefulset.kubernetes.io/pod-name"] == "web-1"
    assert plans[1].labels["app"] == "web"


def test_statefulset_ordinals_start():
    text = (FIXTURES / "statefulset.yaml").read_text().replace("  replicas: 2\n", "  replicas: 2\n  ordinals:\n    start: 5\n")
    assert [p.name for p in parse_manifests(text)] == ["web-5", "web-6"]


def test_daemonset_hostnetwork_defaults_hostport():
    [plan] = load("daemonset-hostnetwork.yaml")
    assert re.fullmatch(rf"node-exporter-{A}{{5}}", plan.name)
    assert plan.host_network is True
    # the API server sets hostPort = containerPort for hostNetwork pods
    assert [(p.container_port, p.host_port) for p in plan.ports] == [(9100, 9100), (9101, 9101)]


def test_jobs():
    plans = load("job.yaml")
    by_job = {}
    for p in plans:
        by_job.setdefault(p.workload, []).append(p)
    load_pods = by_job["Job/load"]
    assert len(load_pods) == 2                             # parallelism 2 of 5 completions
    assert all(re.fullmatch(rf"load-{A}{{5}}", p.name) for p in load_pods)
    assert load_pods[0].ports == (ContainerPort("client", 5000, "SCTP", None, 15000, None),)
    assert load_pods[0].labels["job-name"] == "load"
    indexed = by_job["Job/indexed"]
    assert [re.fullmatch(rf"indexed-(\d)-{A}{{5}}", p.name).group(1) for p in indexed] == ["0", "1", "2"]
    assert len(by_job["Job/few"]) == 1                    # min(parallelism 4, completions 1)


def test_job_parallelism_defaults_to_one():
    text = (FIXTURES / "job.yaml").read_text().split("---")[0].replace("  parallelism: 2\n", "").replace("  completions: 5\n", "")
    assert len(parse_manifests(text)) == 1


def test_multi_document_skips_other_kinds():
    plans = load("multi.yaml")
    assert [p.workload for p in plans] == ["Deployment/api", "Deployment/api", "ReplicationController/legacy"]
    assert all(re.fullmatch(rf"api-{HASH}-{A}{{5}}", p.name) for p in plans[:2])
    assert plans[0].name != plans[1].name
    assert re.fullmatch(rf"legacy-{A}{{5}}", plans[2].name)
    assert plans[2].ports == (ContainerPort("legacy", 80, "TCP", None, None, None),)   # replicas: 0 gives none


def test_json_list():
    [plan] = load("list.json")
    assert plan.namespace == "kube-dns" and plan.workload == "Deployment/dns"
    assert [(p.protocol, p.container_port, p.host_port, p.name) for p in plan.ports] == [
        ("UDP", 53, 5353, "dns"), ("TCP", 53, 5353, "dns-tcp")]


def test_yaml_list_and_defaults():
    text = """
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
  spec:
    template:
      spec:
        containers:
        - name: c
          image: x
          ports:
          - containerPort: 80
            hostPort: 0
"""
    [plan] = parse_manifests(text)
    assert plan.namespace == "default"
    assert plan.labels == {"pod-template-hash": plan.name.split("-")[1]}
    # protocol defaults to TCP; hostPort 0 means "none" to Kubernetes
    assert plan.ports == (ContainerPort("c", 80, "TCP", None, None, None),)


def test_long_names_are_truncated_like_kubernetes():
    name = "a" * 60
    text = f"""
apiVersion: apps/v1
kind: ReplicaSet
metadata: {{name: {name}}}
spec:
  template:
    spec:
      containers: [{{name: c, image: x}}]
"""
    [plan] = parse_manifests(text)
    assert len(plan.name) == 63 and plan.name.startswith("a" * 58)


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(SHIPPED.read_text()))
    [plan] = load_manifests(["-"])
    assert plan.workload == "Deployment/nginx-hostport"


def test_several_files_in_order(tmp_path):
    plans = load_manifests([fixture("pod.yaml"), fixture("statefulset.yaml"), str(SHIPPED)])
    assert [p.workload for p in plans] == ["Pod/echo", "StatefulSet/web", "StatefulSet/web", "Deployment/nginx-hostport"]


def test_podplan_fields():
    plan = PodPlan(namespace="ns", name="p", workload="Pod/p", labels={"a": "b"}, host_network=False,
                   containers=("c",), ports=())
    assert plan.host_ports == ()


# --------------------------------------------------------------------------- errors

ERRORS = [
    ("bad-syntax.yaml", ["bad-syntax.yaml", "not valid YAML", "line 9"]),
    ("bad-syntax.json", ["bad-syntax.json", "not valid JSON", "line 5"]),
    ("bad-not-mapping.yaml", ["document 2", "not a mapping"]),
    ("bad-no-kind.yaml", ["document 1", "no kind"]),
    ("bad-no-containers.yaml", ['Deployment "default/empty"', "no containers"]),
    ("bad-container-port-range.yaml", ['Pod "default/big"', 'port "http"', "containerPort 70000", "1-65535"]),
    ("bad-host-port-range.yaml", ['DaemonSet "kube-system/neg"', "hostPort -1", "1-65535"]),
    ("bad-port-not-int.yaml", ['Pod "default/quoted"', 'containerPort "80"', "not an integer", "without quotes"]),
    ("bad-protocol.yaml", ['Pod "default/http-proto"', '"HTTP"', "TCP, UDP or SCTP"]),
    ("bad-protocol-case.yaml", ['"udp"', 'write it as "UDP"']),
    ("bad-hostnetwork-mismatch.yaml", ['Deployment "default/hostnet"', "hostNetwork", "hostPort 8080",
                                       "containerPort 80", "Kubernetes rejects", "set hostPort to 80"]),
    ("bad-duplicate-names.yaml", ['pod "default/web-0"', 'StatefulSet "default/web"', "document 1", "document 2"]),
    ("bad-duplicate-object.yaml", ['Pod "default/twice"', "declared twice", "document 1"]),
    ("bad-duplicate-hostport.yaml", ['Pod "default/clash"', "hostPort 8080/TCP twice"]),
    ("no-workload.yaml", ["no-workload.yaml", "contains no workload"]),
]


@pytest.mark.parametrize("name,expected", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, expected):
    with pytest.raises(UserError) as err:
        load(name)
    message = str(err.value)
    assert name in message
    for part in expected:
        assert part in message, message
    assert one_sentence(message), message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=r"nope\.yaml does not exist"):
        load_manifests([str(missing)])


def test_directory_is_not_a_manifest(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_manifests([str(tmp_path)])


def test_no_paths():
    with pytest.raises(UserError, match="No manifest"):
        load_manifests([])


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(UserError, match="contains no workload"):
        load_manifests([str(empty)])


def test_same_file_twice_is_a_duplicate(tmp_path):
    copy = tmp_path / "copy.yaml"
    shutil.copy(SHIPPED, copy)
    with pytest.raises(UserError) as err:
        load_manifests([str(SHIPPED), str(copy)])
    assert "declared twice" in str(err.value) and "copy.yaml" in str(err.value)
    with pytest.raises(UserError, match="declared twice"):
        load_manifests([str(SHIPPED), str(SHIPPED)])


def _pod(ports_yaml: str, extra_spec: str = "") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
{extra_spec}  containers:
  - name: c
    image: x
    ports:
{ports_yaml}"""


@pytest.mark.parametrize("ports,expected", [
    ("    - containerPort: 0\n", "containerPort 0, which is outside 1-65535"),
    ("    - containerPort: 80\n      hostPort: 65536\n", "hostPort 65536, which is outside 1-65535"),
    ("    - containerPort: 80.5\n", "not an integer"),
    ("    - containerPort: true\n", "not an integer"),
    ("    - containerPort: 80\n      hostPort: '8080'\n", 'hostPort "8080", which is not an integer'),
    ("    - hostPort: 8080\n", "has no containerPort"),
    ("    - containerPort: 80\n      protocol: ICMP\n", '"ICMP"'),
    ("    - containerPort: 80\n      name: http\n    - containerPort: 81\n      name: http\n", 'port name "http" twice'),
    ("    - containerPort: 80\n      name: HTTP_PORT\n", "invalid name"),
    ("    - containerPort: 80\n      hostPort: 80\n      hostIP: not-an-ip\n", "not an IP address"),
    ("    - 80\n", "not a mapping"),
])
def test_port_errors(ports, expected):
    with pytest.raises(UserError) as err:
        parse_manifests(_pod(ports), origin="inline.yaml")
    message = str(err.value)
    assert expected in message and message.startswith("inline.yaml document 1: Pod \"default/p\""), message
    assert one_sentence(message), message


def test_hostnetwork_equal_hostport_is_fine():
    [plan] = parse_manifests(_pod("    - containerPort: 53\n      hostPort: 53\n      protocol: UDP\n",
                                  "  hostNetwork: true\n"))
    assert plan.host_network and plan.ports[0].host_port == 53


def test_same_hostport_different_protocol_or_ip_is_fine():
    [plan] = parse_manifests(_pod("    - containerPort: 53\n      hostPort: 53\n      protocol: UDP\n"
                                  "    - containerPort: 53\n      hostPort: 53\n"
                                  "    - containerPort: 54\n      hostPort: 53\n      hostIP: 127.0.0.1\n"))
    assert len(plan.host_ports) == 3


@pytest.mark.parametrize("text,expected", [
    ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\nspec: {containers: [{name: c}]}\n", "has no metadata.name"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: Upper}\nspec: {containers: [{name: c}]}\n", 'invalid name "Upper"'),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Bad_NS}\nspec: {containers: [{name: c}]}\n", "namespace"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "has no spec"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n", "has no containers in spec.containers"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{image: x}]}\n", "without a name"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}, {name: c}]}\n", 'two containers named "c"'),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {v: 1}}\nspec: {containers: [{name: c}]}\n", "quote the value"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: yes-please, containers: [{name: c}]}\n", "true or false"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n", "has no spec.template"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: -1, template: {spec: {containers: [{name: c}]}}}\n",
     "spec.replicas -1"),
    ("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: d}\nspec: {replicas: two, template: {spec: {containers: [{name: c}]}}}\n",
     'spec.replicas "two"'),
    ("apiVersion: v1\nkind: List\nitems: {a: 1}\n", "items is not a list"),
    ("- a\n- b\n", "document 1 is a list, not a mapping"),
    ("just a string\n", 'document 1 is "just a string", not a mapping'),
    ('{"kind": "Pod",\n "metadata": {"name": "p"}\n', "not valid JSON (line 3"),
])
def test_object_errors(text, expected):
    with pytest.raises(UserError) as err:
        parse_manifests(text, origin="inline.yaml")
    message = str(err.value)
    assert expected in message and message.startswith("inline.yaml"), message
    assert one_sentence(message), message


def test_json_stream_of_objects():
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": [{"name": "c"}]}}
    other = json.loads(json.dumps(doc))
    other["metadata"]["name"] = "b"
    plans = parse_manifests(json.dumps(doc, indent=2) + "\n" + json.dumps(other))
    assert [p.name for p in plans] == ["a", "b"]


CRONJOB = """
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: ops}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          containers:
          - name: probe
            image: busybox
            ports: [{containerPort: 8080, hostPort: 18080}]
"""


def test_a_cronjob_runs_its_job_template_once():
    (plan,) = parse_manifests(CRONJOB, "<cron>")
    assert plan.workload == "Job/nightly-lab" and plan.namespace == "ops"
    assert plan.name.startswith("nightly-lab-") and plan.host_ports[0].host_port == 18080


WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: nginx
        ports: [{containerPort: 80, hostPort: 8000}]
"""


def test_scheduling_notes_say_what_a_scheduler_would():
    from bpftrace_hostport.pods.manifests import scheduling_notes
    (note,) = scheduling_notes(parse_manifests(WEB, "<web>"))
    assert note.startswith("3 pods claim hostPort 8000/TCP (default/web-") and "Pending" in note
    assert scheduling_notes(parse_manifests(WEB.replace("replicas: 3", "replicas: 1"), "<web>")) == []
    (none,) = scheduling_notes(parse_manifests(WEB.replace(", hostPort: 8000", ""), "<web>"))
    assert none.startswith("None of the pods declares a hostPort")
