"""deploy/: the fleet manifests, the alerts, the dashboard and the image recipe.

The Kubernetes objects are validated offline against the API schemas that kubernetes-validate
ships, strictly (no unknown fields), for the oldest and a current supported Kubernetes. The
prometheus-operator objects (PodMonitor, PrometheusRule) are CRDs that it has no schema for, so
they are checked structurally here. Every metric name used by the alerts and the dashboard must be
one the agent exports (EXPECTED_METRICS).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_MANIFESTS = ("daemonset.yaml", "rbac.yaml")
K8S_VERSIONS = ("1.28", "1.33")
NAMESPACE = "bpftrace-hostport"

# The metrics the agent exports, by type. An integration test of the agent compares this set
# against its real /metrics exposition; keep the two in step when a metric is added or renamed.
EXPECTED_COUNTERS = {
    "bpftrace_hostport_flows_total",
    "bpftrace_hostport_answered_flows_total",
    "bpftrace_hostport_packets_total",
    "bpftrace_hostport_bytes_total",
    "bpftrace_hostport_misses_total",
    "bpftrace_hostport_drops_total",
    "bpftrace_hostport_lost_events_total",
    "bpftrace_hostport_series_overflow_total",
}
EXPECTED_GAUGES = {"bpftrace_hostport_check_findings", "bpftrace_hostport_up"}
EXPECTED_HISTOGRAMS = {"bpftrace_hostport_latency_seconds"}
EXPECTED_METRICS = EXPECTED_COUNTERS | EXPECTED_GAUGES | EXPECTED_HISTOGRAMS
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

METRIC_RE = re.compile(r"bpftrace_hostport_[a-z_]+")


def unavailable(message: str) -> None:
    """A check that cannot run here: a failure in CI (CI=true), a visible skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# --------------------------------------------------------------------------- loading

class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys; a manifest with one is a mistake."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_docs(name: str) -> List[dict]:
    text = (DEPLOY / name).read_text()
    return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]


def the(name: str, kind: str) -> dict:
    found = [d for d in load_docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def daemonset() -> dict:
    return the("daemonset.yaml", "DaemonSet")


@pytest.fixture(scope="module")
def agent(daemonset) -> dict:
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flag(container: dict, name: str) -> str:
    args = container["args"]
    assert name in args, f"{name} missing from the agent's args {args}"
    return args[args.index(name) + 1]


def metrics_port(container: dict) -> int:
    return int(flag(container, "--metrics").rsplit(":", 1)[1])


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


# --------------------------------------------------------------------------- PromQL names

_FUNCTIONS_AND_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                           "group_left", "group_right", "inf", "nan"}


def promql_metric_names(expr: str) -> Set[str]:
    """Every metric an expression names, whatever its prefix: identifiers that are not functions,
    aggregations, keywords, label names (inside {...} or a by/on/... list) or durations."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)   # strings
    s = re.sub(r"\{[^{}]*\}", " ", s)                                              # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)                                            # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(word)
    return names


def base_metric(name: str) -> str:
    """bpftrace_hostport_latency_seconds_bucket -> bpftrace_hostport_latency_seconds (histograms only)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in EXPECTED_HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def test_promql_metric_names_helper():
    expr = ('sum by (node, pod) (rate(bpftrace_hostport_flows_total{node=~"$node", code="x y"}[5m])) / '
            'on (node) group_left(pod) max_over_time(up[1h] offset 5m) > bool 0 or absent(foo:bar)')
    assert promql_metric_names(expr) == {"bpftrace_hostport_flows_total", "up", "foo:bar"}
    assert base_metric("bpftrace_hostport_latency_seconds_bucket") == "bpftrace_hostport_latency_seconds"
    assert base_metric("bpftrace_hostport_flows_total_count") == "bpftrace_hostport_flows_total_count"


# --------------------------------------------------------------------------- Kubernetes schemas

def _validator():
    try:
        from kubernetes_validate import utils as kv
    except ImportError:
        unavailable("kubernetes-validate is not installed: `.venv/bin/python -m pip install "
                    "kubernetes-validate` (it is in the package's [test] extra).")
    return kv


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", K8S_MANIFESTS)
def test_manifests_pass_strict_schema_validation(name, version):
    kv = _validator()
    supported = {kv.major_minor(v) for v in kv.all_versions()}
    if version not in supported:
        unavailable(f"kubernetes-validate {getattr(kv, '__version__', '')} ships no schemas for "
                    f"Kubernetes {version} (it has {sorted(supported)}); upgrade it.")
    docs = load_docs(name)
    assert docs, f"{name} is empty"
    for doc in docs:
        what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            used = kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{what} fails Kubernetes {version} (strict) at "
                        f"{'.'.join(str(p) for p in e.path)}: {e.message}")
        except kv.SchemaNotFoundError as e:      # the CLI only warns about this; here it is an error
            pytest.fail(f"{what}: {e.message}")
        except kv.VersionNotSupportedError as e:
            unavailable(f"{what}: {e.message}")
        # validated against that release's own schema, not an older fallback
        assert used == version, f"{what} was validated against {used}, not {version}"


def test_the_cli_agrees_offline():
    """The command a person would run, from the venv, against the same files and versions."""
    _validator()
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for v in K8S_VERSIONS:
        cmd += ["-k", v]
    cmd += [str(DEPLOY / n) for n in K8S_MANIFESTS]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")   # prove: no network
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "WARN" not in out and "ERROR" not in out, out


def test_every_kubernetes_kind_is_covered():
    kinds = {d["kind"] for n in K8S_MANIFESTS for d in load_docs(n)}
    assert kinds == {"Namespace", "DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for n in K8S_MANIFESTS:
        for d in load_docs(n):
            if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                assert d["metadata"]["namespace"] == NAMESPACE, f"{n}: {d['kind']}"
    ns = the("daemonset.yaml", "Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    # hostNetwork, hostPath and added capabilities are only admitted under "privileged"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# --------------------------------------------------------------------------- RBAC

def test_cluster_role_grants_only_read_on_pods():
    role = the("rbac.yaml", "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert "aggregationRule" not in role


def test_binding_ties_the_role_to_the_daemonsets_service_account(daemonset):
    role = the("rbac.yaml", "ClusterRole")
    sa = the("rbac.yaml", "ServiceAccount")
    binding = the("rbac.yaml", "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert daemonset["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    # nothing else in the repository's manifests grants more
    roles = [d for n in K8S_MANIFESTS for d in load_docs(n) if d["kind"] in ("Role", "ClusterRole")]
    assert roles == [role]


# --------------------------------------------------------------------------- the DaemonSet

def test_probes_use_healthz_on_the_metrics_port(agent):
    port = metrics_port(agent)
    assert port == 9469
    assert flag(agent, "--metrics") == "0.0.0.0:9469"
    assert {p["name"]: p["containerPort"] for p in agent["ports"]}.get("metrics") == port
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = agent[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert resolve_port(agent, get["port"]) == port, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe


def test_pod_runs_in_the_host_network_on_every_node(daemonset):
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not spec.get("hostPID", False)
    assert {"operator": "Exists"} in spec["tolerations"]
    update = daemonset["spec"]["updateStrategy"]
    assert update == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}


def test_agent_flags_and_node_name(agent):
    assert agent["image"] == "bpftrace-hostport:0.2.0"
    # no registry host in the reference: the operator pushes it to their own
    assert "/" not in agent["image"]
    # (a regex, not tomllib: the package still supports Python 3.9)
    version = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert agent["image"].rsplit(":", 1)[1] == version, "bump the image tag with the package version"
    assert "command" not in agent, "the image's ENTRYPOINT is bpftrace-hostport agent"
    assert flag(agent, "--record-dir") == "/var/lib/bpftrace-hostport"
    assert flag(agent, "--max-size") == "256MiB"
    assert flag(agent, "--max-files") == "8"
    assert flag(agent, "--check-interval") == "60"
    assert "--log-json" in agent["args"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_least_privilege_security_context(agent):
    sc = agent["securityContext"]
    assert sc.get("privileged") is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYSLOG"}
    assert "SYS_ADMIN" not in sc["capabilities"]["add"]


def test_host_mounts(daemonset, agent):
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    read_only = {"/sys/kernel/btf", "/sys/kernel/tracing", "/lib/modules", "/usr/src"}
    for path in read_only:
        m = mounts[path]
        assert m.get("readOnly") is True, path
        assert volumes[m["name"]]["hostPath"]["path"] == path, path
    rec = mounts[flag(agent, "--record-dir")]
    assert not rec.get("readOnly", False)
    assert volumes[rec["name"]]["hostPath"] == {"path": "/var/lib/bpftrace-hostport", "type": "DirectoryOrCreate"}
    assert "/sys/fs/bpf" not in mounts
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]     # the root filesystem is read-only


def test_resources_and_scrape_annotations(daemonset, agent):
    res = agent["resources"]
    assert res["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert res["limits"] == {"memory": "256Mi"}
    ann = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port(agent)),
                   "prometheus.io/path": "/metrics"}


# --------------------------------------------------------------------------- prometheus-operator CRDs

def test_podmonitor_structure(daemonset, agent):
    docs = load_docs("podmonitor.yaml")
    assert len(docs) == 1
    pm = docs[0]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert pm["metadata"]["name"] and pm["metadata"]["namespace"] == NAMESPACE
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"}
    spec = pm["spec"]
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = spec["podMetricsEndpoints"]
    assert resolve_port(agent, ep["port"]) == metrics_port(agent)
    assert ep["path"] == "/metrics"
    assert ep["honorLabels"] is True       # the exported namespace/pod name the traced pod
    assert re.fullmatch(r"\d+[smh]", ep["interval"])


REQUIRED_ALERTS = {"HostPortNotAnswering", "HostPortMisses", "HostPortStaleConntrack",
                   "HostPortLostEvents", "HostPortAgentDown"}


@pytest.fixture(scope="module")
def alert_rules() -> Dict[str, dict]:
    docs = load_docs("prometheusrule.yaml")
    assert len(docs) == 1
    pr = docs[0]
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule"
    assert pr["metadata"]["name"] and pr["metadata"]["namespace"] == NAMESPACE
    assert set(pr) == {"apiVersion", "kind", "metadata", "spec"}
    rules = {}
    for group in pr["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert ("alert" in rule) != ("record" in rule)
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
            if "alert" in rule:
                assert rule["alert"] not in rules, f"duplicate alert {rule['alert']}"
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]
                rules[rule["alert"]] = rule
    return rules


def test_required_alerts_exist(alert_rules):
    assert set(alert_rules) == REQUIRED_ALERTS


def test_alerts_name_only_exported_metrics(alert_rules):
    for name, rule in alert_rules.items():
        used = promql_metric_names(rule["expr"])
        assert used, name
        assert used <= EXPECTED_METRICS, f"{name} uses unknown metrics {sorted(used - EXPECTED_METRICS)}"
        # and the prefix scan agrees (no bpftrace_hostport_* name hidden where the parser skips)
        assert {base_metric(m) for m in METRIC_RE.findall(rule["expr"])} <= EXPECTED_METRICS, name


def test_alert_conditions(alert_rules):
    def squash(s):
        return re.sub(r"\s+", "", s)

    na = alert_rules["HostPortNotAnswering"]
    assert {"bpftrace_hostport_answered_flows_total", "bpftrace_hostport_flows_total"} <= promql_metric_names(na["expr"])
    assert ">0" in squash(na["expr"]) and na["for"] == "10m"
    miss = alert_rules["HostPortMisses"]
    assert "rate(bpftrace_hostport_misses_total[" in squash(miss["expr"]) and squash(miss["expr"]).endswith(">0")
    assert miss["for"] == "10m"
    stale = alert_rules["HostPortStaleConntrack"]
    assert squash(stale["expr"]) == 'bpftrace_hostport_check_findings{code="stale-conntrack"}>0'
    assert stale["for"] == "5m"
    lost = alert_rules["HostPortLostEvents"]
    assert squash(lost["expr"]).startswith("increase(bpftrace_hostport_lost_events_total[")
    down = squash(alert_rules["HostPortAgentDown"]["expr"])
    assert "bpftrace_hostport_up==0" in down and "absent(bpftrace_hostport_up)" in down


# --------------------------------------------------------------------------- Grafana

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def all_panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def panel_exprs(dash: dict) -> List[str]:
    return [t["expr"] for p in all_panels(dash) for t in p.get("targets", []) if "expr" in t]


def test_dashboard_is_importable(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(dashboard):
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_dashboard_node_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    node = variables["node"]
    query = node["query"]["query"] if isinstance(node["query"], dict) else node["query"]
    assert query == "label_values(bpftrace_hostport_up, node)"
    assert node["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for expr in panel_exprs(dashboard):
        assert 'node=~"$node"' in expr, expr


def test_dashboard_names_only_exported_metrics(dashboard):
    exprs = panel_exprs(dashboard)
    assert exprs
    for expr in exprs:
        found = METRIC_RE.findall(expr)
        assert found, expr
        unknown = {base_metric(m) for m in found} - EXPECTED_METRICS
        assert not unknown, f"unknown metrics {sorted(unknown)} in {expr}"
        assert promql_metric_names(expr) <= {m for m in found}, expr    # nothing but our metrics
    # a histogram is only read through its series, never by its bare name
    for expr in exprs:
        for m in METRIC_RE.findall(expr):
            assert m not in EXPECTED_HISTOGRAMS, expr


def test_dashboard_panels(dashboard):
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard))
    for word in ("flows/s per mapping", "answered share", "latency", "misses", "drops/s by reason",
                 "check findings", "lost events", "per node"):
        assert word in titles, word
    exprs = panel_exprs(dashboard)
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    for q in ("0.5", "0.9", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") and "bpftrace_hostport_latency_seconds_bucket" in e
                   and "by (le)" in e for e in quantiles), q
    assert any("sum by (reason)" in e and "bpftrace_hostport_drops_total" in e for e in exprs)
    table = [p for p in all_panels(dashboard) if p["type"] == "table"]
    assert table and "bpftrace_hostport_check_findings" in table[0]["targets"][0]["expr"]


# --------------------------------------------------------------------------- image recipe

def test_containerfile_uses_the_base_build_arg():
    lines = [ln.strip() for ln in (DEPLOY / "Containerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0] == "ARG BASE=debian:bookworm-slim"
    assert instructions[1] == "FROM ${BASE}"
    assert sum(ln.startswith("FROM ") for ln in instructions) == 1
    text = "\n".join(lines)
    for pkg in ("python3", "python3-bpfcc", "python3-venv", "iproute2", "iptables", "nftables",
                "conntrack", "ca-certificates"):
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", text), pkg
    assert "--no-install-recommends" in text
    assert "venv --system-site-packages" in text
    assert "COPY dist/*.whl" in text
    assert instructions[-1] == 'ENTRYPOINT ["bpftrace-hostport", "agent"]'


def test_build_script_never_makes_a_bridge_network():
    script = ROOT / "scripts" / "build-image.sh"
    assert os.access(script, os.X_OK)
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    code = "\n".join(ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#"))
    assert "network create" not in code and "bridge" not in code
    # every podman command that starts a container passes --network host
    joined = code.replace("\\\n", " ")
    for m in re.finditer(r"podman\s+(build|run|create)\b[^\n]*", joined):
        assert "--network host" in m.group(0), m.group(0)
    assert re.search(r"podman\s+build\b", joined)
    assert "--build-arg \"BASE=$BASE_IMAGE\"" in joined
    assert "mmdebstrap --variant=minbase" in joined
    assert re.search(r"pip wheel --quiet --no-deps -w \"\$stage/dist\" \.", joined)
