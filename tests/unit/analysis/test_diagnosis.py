"""The live view's and the review's findings (analysis/diagnosis.py) point at `check` codes that
exist, and tell what is expected from what is wrong."""
from bpftrace_hostport.analysis.diagnosis import diagnose
from bpftrace_hostport.node.findings import codes


def m(**kw):
    base = dict(proto="tcp", family=4, host_port=8000, pod_ip="10.0.1.2", pod_port=80,
                pod_namespace="shop", pod_name="web", port_name="http", flows=10, answered=10,
                refused=0, refusals={}, refused_by={}, unanswered=0, misses=0, drops={})
    base.update(kw)
    return base


CASES = [
    m(answered=0, refused=10, refusals={"reset": 10}, refused_by={"pod": 10}),
    m(answered=0, refused=10, refusals={"admin-prohibited": 10}, refused_by={"node": 10}),
    m(answered=0, refused=10, refusals={"host-unreachable": 10}, refused_by={"node": 10}),
    m(proto="udp", answered=0, refused=10, refusals={"host-unreachable": 10}, refused_by={"node": 10}),
    m(answered=2, unanswered=8, drops={"NETFILTER_DROP": 8}),
    m(pod_ip=None, pod_port=None, flows=0, answered=0, misses=5, pod_name="hostnet"),
    m(pod_ip=None, pod_port=None, flows=0, answered=0, misses=5, pod_name=None, pod_namespace=None),
    m(pod_name=None, pod_namespace=None),
]


def test_every_code_a_finding_points_at_is_a_check_code():
    found = [f for c in CASES for f in diagnose([c, m()])]
    assert found and {f.code for f in found if f.code} <= set(codes())


def test_refused_by_the_pod_says_nothing_listens_and_names_the_pod():
    f = diagnose([CASES[0]])[0]
    assert f.severity == "error" and f.code == "pod-not-listening"
    assert "shop/web" in f.text and "nothing listens on the containerPort" in f.text


def test_a_hostnetwork_pods_misses_are_expected_not_wrong():
    f = diagnose([CASES[5]])[0]
    assert f.severity == "expected" and not f.problem and f.code == "hostnetwork-hostport"


def test_a_healthy_mapping_says_nothing():
    assert diagnose([m()]) == []
