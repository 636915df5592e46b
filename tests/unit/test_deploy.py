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
    "bpftrace_hostport_refused_flows_total",
    "bpftrace_hostport_unanswered_flows_total",
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


def test_expected_metrics_are_the_agents():
    from bpftrace_hostport.collect.metrics import EXPORTED_METRICS
    assert EXPECTED_METRICS == set(EXPORTED_METRICS)


def finding_codes() -> Set[str]:
    """Every code `check` can report (the registry, node/findings.py)."""
    from bpftrace_hostport.node.findings import codes
    return set(codes())


# Words of the alerts' and the dashboard's text that look like finding codes but are not.
NOT_CODES = {"bpftrace-hostport", "field-selector", "app.kubernetes.io/name", "kube-proxy",
             "node-agent", "anonymize-key", "flow-table", "check-interval", "log-json"}
CODE_LIKE = re.compile(r"(?<![\w./-])[a-z][a-z0-9]*(?:-[a-z0-9]+)+(?![\w/-])")


def named_codes(text: str) -> Set[str]:
    """The kebab-case words of a text that are not known non-codes: what it names as findings."""
    return {w for w in CODE_LIKE.findall(text) if w not in NOT_CODES}


def test_named_codes_helper():
    assert named_codes("`check` finds pod-not-listening, forward-drop (a REJECT) or no-rule; "
                       "see bpftrace-hostport --flow-table") == {"pod-not-listening", "forward-drop", "no-rule"}


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
    assert kinds == {"Namespace", "PriorityClass", "DaemonSet", "ServiceAccount", "ClusterRole",
                     "ClusterRoleBinding"}
    for n in K8S_MANIFESTS:
        for d in load_docs(n):
            if d["kind"] not in ("Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"):
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
    # (a regex, not tomllib: the package still supports Python 3.9)
    version = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    # exactly what scripts/build-image.sh builds (an unqualified name would be looked up on docker.io)
    built = re.search(r'(?m)^IMAGE=\$\{IMAGE:-([^}]+)\}$', (ROOT / "scripts" / "build-image.sh").read_text()).group(1)
    assert agent["image"] == built.replace("$version", version) == f"localhost/bpftrace-hostport:{version}"
    assert "command" not in agent, "the image's ENTRYPOINT is bpftrace-hostport agent"
    # no recording by default (client addresses on every node); the opt-in is documented beside
    assert "--record-dir" not in agent["args"]
    text = (DEPLOY / "daemonset.yaml").read_text()
    for opt_in in ("#   - --record-dir", "#   - --anonymize-key-file", "# - name: records"):
        assert opt_in in text, opt_in
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
    # tracefs is optional (the tool runs without drop attribution): kubelet checks nothing
    assert volumes[mounts["/sys/kernel/tracing"]["name"]]["hostPath"] == {"path": "/sys/kernel/tracing"}
    for path in ("/sys/kernel/btf", "/lib/modules", "/usr/src"):
        assert volumes[mounts[path]["name"]]["hostPath"]["type"] == "Directory", path
    assert "/var/lib/bpftrace-hostport" not in mounts        # the recording is off by default
    assert "/sys/fs/bpf" not in mounts
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]     # the root filesystem is read-only


def test_priority_class(daemonset):
    pc = the("daemonset.yaml", "PriorityClass")
    assert daemonset["spec"]["template"]["spec"]["priorityClassName"] == pc["metadata"]["name"]
    # above ordinary workloads, below system-cluster-critical and system-node-critical
    assert 0 < pc["value"] < 2000000000 and pc.get("globalDefault") is False


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


REQUIRED_ALERTS = {"HostPortRefused", "HostPortUnanswered", "HostPortDrops", "HostPortNotTranslated",
                   "HostPortMisses", "HostPortStaleConntrack", "HostPortCheckFinding",
                   "HostPortLostEvents", "HostPortAgentDown"}
SEVERITIES = {"error", "warning"}          # the tool's own words; info and expected never alert


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
                if "bpftrace_hostport_check_findings" in rule["expr"]:
                    # a finding keeps its own severity: the gauge's label, never overridden
                    assert "severity" not in rule.get("labels", {}), rule["alert"]
                    assert re.search(r"by \(node, code, severity\)", rule["expr"]), rule["alert"]
                else:
                    assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]
                assert "bpftrace-hostport" in rule["annotations"]["runbook"], rule["alert"]
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

    # a window counts a series that is new in it with its whole value (a first burst)
    for name in ("HostPortRefused", "HostPortUnanswered", "HostPortDrops", "HostPortNotTranslated",
                 "HostPortMisses", "HostPortLostEvents"):
        e = squash(alert_rules[name]["expr"])
        for m in set(METRIC_RE.findall(alert_rules[name]["expr"])) - {"bpftrace_hostport_flows_total"}:
            sel = m + ('{pod=""}' if "misses" in m else "")
            assert f"({sel}unless{sel}offset10m)orincrease({sel}[10m])" in e, (name, m)
    # a hostNetwork pod's misses (owner labels set) never alert
    for name in ("HostPortNotTranslated", "HostPortMisses"):
        assert 'bpftrace_hostport_misses_total{pod=""}' in alert_rules[name]["expr"]
    # the check's own runbook, exact, for the alert's node
    for name, rule in alert_rules.items():
        if name not in ("HostPortLostEvents", "HostPortAgentDown"):
            assert rule["annotations"]["runbook"].endswith("-o name) -- bpftrace-hostport check"), name
            assert "spec.nodeName={{ $labels.node }}" in rule["annotations"]["runbook"], name
    stale = alert_rules["HostPortStaleConntrack"]
    assert 'code="stale-conntrack"' in stale["expr"] and "conntrack -D" not in stale["annotations"]["runbook"]
    assert 'code!="stale-conntrack"' in alert_rules["HostPortCheckFinding"]["expr"]
    assert 'severity=~"error|warning"' in alert_rules["HostPortCheckFinding"]["expr"]
    down = squash(alert_rules["HostPortAgentDown"]["expr"])
    assert "bpftrace_hostport_up==0" in down and "absent(bpftrace_hostport_up)" in down
    # rates are never humanized as "83.33m/s": counts over the window, printed whole
    for name, rule in alert_rules.items():
        text = " ".join(rule["annotations"].values())
        assert "humanize }}/s" not in text and "humanize}}/s" not in text, name
        if "$value" in text:
            assert '$value | printf "%.0f"' in text, name


def test_alerts_name_only_existing_finding_codes(alert_rules):
    named = set()
    for rule in alert_rules.values():
        named |= named_codes(" ".join(rule["annotations"].values()))
        named |= set(re.findall(r'code!?="([^"]+)"', rule["expr"]))
    assert named, "the alerts name no finding code"
    assert named <= finding_codes(), f"not codes of the registry: {sorted(named - finding_codes())}"


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


MAPPING = "node, proto, host_port, pod_ip, pod_port, namespace, pod"


def panels_by_title(dash: dict) -> Dict[str, dict]:
    return {p["title"]: p for p in all_panels(dash) if p["type"] != "row"}


def test_dashboard_panels_per_node_and_per_mapping(dashboard):
    """Outcomes, latency quantiles, misses and drops, each per node and per mapping."""
    panels = panels_by_title(dashboard)
    exprs = {title: [t["expr"] for t in p["targets"]] for title, p in panels.items()}

    def by(title, labels):
        return all(f"by ({labels})" in e or f"by (le, {labels})" in e for e in exprs[title])
    assert by("Outcomes per node (flows/s)", "node")
    assert {m for e in exprs["Outcomes per node (flows/s)"] for m in METRIC_RE.findall(e)} == {
        "bpftrace_hostport_answered_flows_total", "bpftrace_hostport_refused_flows_total",
        "bpftrace_hostport_unanswered_flows_total"}
    for title in ("Flows/s per mapping", "Answered share per mapping", "Unanswered flows/s per mapping",
                  "Answer latency per mapping (p50, p90, p99)", "Bytes/s per mapping", "Packets/s per mapping"):
        assert by(title, MAPPING), title
    assert by("Refused flows/s per mapping, by refusal", MAPPING + ", refusal")
    assert by("Drops/s per mapping, by reason", MAPPING + ", reason")
    assert by("Drops/s per node, by reason", "node, reason")
    assert by("Misses/s per node", "node")
    assert by("Misses/s per hostPort", "node, proto, host_port, namespace, pod")     # the owner
    for title, labels in (("Answer latency per node (p50, p90, p99)", "node"),
                          ("Answer latency per mapping (p50, p90, p99)", MAPPING)):
        qs = [e for e in exprs[title]]
        assert [e.split(",", 1)[0] for e in qs] == [f"histogram_quantile({q}" for q in ("0.5", "0.9", "0.99")]
        assert all(f"sum by (le, {labels}) (rate(bpftrace_hostport_latency_seconds_bucket{{" in e for e in qs)
    table = panels["Check findings"]
    assert table["type"] == "table" and "bpftrace_hostport_check_findings" in table["targets"][0]["expr"]


def test_dashboard_units(dashboard):
    """Each panel in the unit of what it shows: flows and connections per second are not packets."""
    units = {title: p["fieldConfig"]["defaults"].get("unit") for title, p in panels_by_title(dashboard).items()}
    for title, unit in units.items():
        metrics = {m for p in [panels_by_title(dashboard)[title]] for t in p["targets"]
                   for m in METRIC_RE.findall(t["expr"])}
        if "histogram_quantile" in str(panels_by_title(dashboard)[title]["targets"]):
            assert unit == "s", title
        elif "share" in title.lower():
            assert unit == "percentunit", title
        elif metrics == {"bpftrace_hostport_misses_total"}:
            assert unit == "suffix: conn/s", title
        elif metrics <= {"bpftrace_hostport_drops_total", "bpftrace_hostport_packets_total"}:
            assert unit == "pps", title
        elif metrics == {"bpftrace_hostport_bytes_total"}:
            assert unit == "Bps", title
        elif "rate(" in str(panels_by_title(dashboard)[title]["targets"]):
            assert unit == "suffix: flows/s", title
        else:
            assert unit == "none", title
        assert unit is not None, title


def test_dashboard_names_only_existing_finding_codes(dashboard):
    text = " ".join(p.get("description", "") + " " + p["title"] for p in all_panels(dashboard))
    named = named_codes(text)
    assert named and named <= finding_codes(), sorted(named - finding_codes())


# Keys Grafana's own export writes that the dashboard schema does not model: `__inputs` and
# `__requires` (the import's data source prompt and requirements) and a query variable's
# `definition` (the query as the editor shows it). Any other key the round trip drops is a typo.
NOT_IN_SCHEMA = {("__inputs",), ("__requires",), ("templating", "list", "*", "definition")}


def _sdk():
    try:
        from grafana_foundation_sdk.cog import plugins
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models.dashboard import Dashboard
    except ImportError:
        unavailable("grafana-foundation-sdk is not installed: `.venv/bin/python -m pip install "
                    "grafana-foundation-sdk` (it is in the package's [test] extra).")
    plugins.register_default_plugins()
    return Dashboard, JSONEncoder


def dropped_keys(dash: dict) -> List[str]:
    """What a round trip through grafana-foundation-sdk (Dashboard.from_json, then its JSON
    encoder) loses or changes: the keys the schema does not know."""
    Dashboard, JSONEncoder = _sdk()
    out = json.loads(json.dumps(Dashboard.from_json(json.loads(json.dumps(dash))), cls=JSONEncoder))
    lost: List[str] = []

    def known_gap(path):
        return any(len(path) == len(p) and all(x in ("*", y) for x, y in zip(p, path)) for p in NOT_IN_SCHEMA)

    def walk(a, b, path):
        if isinstance(a, dict):
            for k, v in a.items():
                if known_gap(path + (k,)):
                    continue
                if not isinstance(b, dict) or k not in b:
                    lost.append("/".join(map(str, path + (k,))))
                else:
                    walk(v, b[k], path + (k,))
        elif isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                lost.append("/".join(map(str, path)))
                return
            for x, y in zip(a, b):
                walk(x, y, path + ("*",))
        elif a != b:
            lost.append("/".join(map(str, path)) + f" ({a!r} became {b!r})")
    walk(dash, out, ())
    return lost


def test_dashboard_round_trips_through_the_grafana_schema(dashboard):
    assert dropped_keys(dashboard) == []


def test_the_round_trip_catches_typos(dashboard):
    bad = json.loads(json.dumps(dashboard))
    bad["panels"][1]["gridPoss"] = bad["panels"][1].pop("gridPos")
    bad["panels"][2]["fieldConfig"]["defaults"]["unitt"] = "s"
    bad["panels"][3]["targets"][0]["legendFromat"] = "x"
    assert dropped_keys(bad) == ["panels/*/gridPoss", "panels/*/fieldConfig/defaults/unitt",
                                 "panels/*/targets/*/legendFromat"]


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
