"""deploy/prometheusrule.yaml on a real Prometheus: `promtool check rules` and `promtool test rules`
(Debian's prometheus 2.42, which scripts/test.sh installs) for every alert, firing and not firing,
with the exact summary, description and runbook each renders.

The cases are the conditions an operator meets: a hostNetwork pod's port gets misses by design
(silent), refused flows (fires), unanswered flows, drops, a stale conntrack entry (the check's
finding, with the finding's own severity), other error and warning findings (info ones stay
silent), lost flows, an agent that is down or gone, and a new mapping's first burst, which a
plain increase() would not see (the series appears already holding its count).
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.unit.test_deploy import load_docs, unavailable

NODE = "n1"
WEB = dict(node=NODE, proto="tcp", host_port="8000", pod_ip="10.0.1.2", pod_port="80", namespace="web",
           pod="nginx-0")
DNS = dict(node=NODE, proto="udp", host_port="5353", pod_ip="10.0.1.9", pod_port="53", namespace="", pod="")
RUNBOOK = ("kubectl -n bpftrace-hostport exec $(kubectl -n bpftrace-hostport get pods -l "
           f"app.kubernetes.io/name=bpftrace-hostport --field-selector spec.nodeName={NODE} -o name) -- "
           "bpftrace-hostport check")


def series(name: str, values: str, **labels) -> dict:
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"bpftrace_hostport_{name}{{{text}}}", "values": values}


def mapping_series(labels: dict, port_name: str = "http", **values) -> list:
    """A mapping's series (name -> values); refused_<kind> for the refusal label."""
    out = []
    for key, v in values.items():
        if key.startswith("refused_"):
            out.append(series("refused_flows_total", v, **labels, port_name=port_name, refusal=key[8:].replace("_", "-")))
        elif key.startswith("drops_"):
            out.append(series("drops_total", v, **labels, port_name=port_name, reason=key[6:]))
        else:                      # flows, answered, unanswered
            name = "flows_total" if key == "flows" else f"{key}_flows_total"
            out.append(series(name, v, **labels, port_name=port_name))
    return out


def present(labels: dict) -> dict:
    """An alert's labels: Prometheus has no empty label (an empty value is no label)."""
    return {k: v for k, v in labels.items() if v != ""}


def refused(value: str, labels=WEB, pod="pod web/nginx-0") -> dict:
    return {"exp_labels": present({**labels, "severity": "error"}),
            "exp_annotations": {
                "summary": f"hostPort {labels['proto']}/{labels['host_port']} on {NODE} refuses connections",
                "description": (f"{value} flows to hostPort {labels['proto']}/{labels['host_port']} on node {NODE}, "
                                f"DNATed to {labels['pod_ip']}:{labels['pod_port']} ({pod}), were refused in the "
                                "last 10 minutes, at least as many as were answered. `check` on the node says who "
                                "refused: pod-not-listening (nothing listens on the containerPort), forward-drop "
                                "(a REJECT rule on the node), leaked-hostport-rule or stale-conntrack (no pod has "
                                "that address any more)."),
                "runbook": RUNBOOK}}


def not_translated(value: str, port="8000") -> dict:
    return {"exp_labels": {"node": NODE, "proto": "tcp", "host_port": port, "severity": "error"},
            "exp_annotations": {
                "summary": f"hostPort tcp/{port} on {NODE} is declared but not translated",
                "description": (f"{value} connections to hostPort tcp/{port} on node {NODE} got no DNAT in the "
                                "last 10 minutes, although a pod there declares the port. `check` on the node "
                                "finds hostport-no-rule, hostport-chain-not-hooked or hostport-one-family."),
                "runbook": RUNBOOK}}


CASES = [
    {   # a hostNetwork pod's port: misses by design, owner named: silent; its neighbours healthy
        "name": "expected hostNetwork misses",
        "input_series": [series("misses_total", "0+5x30", node=NODE, proto="tcp", host_port="9000",
                                namespace="kube-system", pod="ingress"),
                         *mapping_series(WEB, flows="0+10x30", answered="0+10x30", refused_reset="0x30",
                                         unanswered="0x30")],
        "alerts": {"HostPortMisses": [], "HostPortNotTranslated": [], "HostPortRefused": [],
                   "HostPortUnanswered": []},
        "at": "15m",
    },
    {   # nothing listens on the containerPort: every flow gets a reset
        "name": "refused flows",
        "input_series": mapping_series(WEB, flows="0+10x30", answered="0x30", refused_reset="0+10x30",
                                       unanswered="0x30"),
        "alerts": {"HostPortRefused": [refused("100")], "HostPortUnanswered": []},
        "at": "10m",
    },
    {   # a few resets among many answers (a rolling restart): not an alert
        "name": "refused flows among answers",
        "input_series": mapping_series(WEB, flows="0+30x30", answered="0+20x30", refused_reset="0+10x30"),
        "alerts": {"HostPortRefused": []},
        "at": "10m",
    },
    {   # still pending before `for` has passed
        "name": "refused flows, not yet for 5 minutes",
        "input_series": mapping_series(WEB, answered="0x30", refused_reset="0x5 0+10x25"),
        "alerts": {"HostPortRefused": []},
        "at": "9m",
    },
    {   # a new mapping's first burst: its series appear already holding 200 refusals (a mapping
        # the agent could not know before); increase() alone reads 0 there
        "name": "a new mapping's first burst",
        "input_series": mapping_series(DNS, port_name="dns", flows="_x3 200x27", answered="_x3 0x27",
                                       refused_port_unreachable="_x3 200x27"),
        "alerts": {"HostPortRefused": [refused("200", DNS, "no known pod")]},
        "at": "8m",
    },
    {   # a known mapping exported at 0 before its first burst
        "name": "a known mapping's first burst",
        "input_series": mapping_series(WEB, flows="0x2 200x27", answered="0x30", refused_reset="0x2 200x27"),
        "alerts": {"HostPortRefused": [refused("200")]},
        "at": "8m",
    },
    {   # nothing back, not even a refusal
        "name": "unanswered flows",
        "input_series": mapping_series(WEB, flows="0+3x30", answered="0x30", unanswered="0+3x30"),
        "alerts": {"HostPortUnanswered": [{
            "exp_labels": {**WEB, "severity": "error"},
            "exp_annotations": {
                "summary": f"hostPort tcp/8000 on {NODE} does not answer",
                "description": (f"30 flows to hostPort tcp/8000 on node {NODE}, DNATed to 10.0.1.2:80 (pod "
                                "web/nginx-0), got nothing back in the last 10 minutes, and none was answered: "
                                "not even a refusal (a firewall dropping silently, a pod that does not reply, a "
                                "route that goes nowhere). `check` on the node looks for forward-drop, "
                                "ip-forward-off, stale-conntrack and leaked-hostport-rule."),
                "runbook": RUNBOOK}}],
            "HostPortRefused": []},
        "at": "10m",
    },
    {   # some flows unanswered while others are answered: the tool's warning, left to the dashboard
        "name": "unanswered flows among answers",
        "input_series": mapping_series(WEB, flows="0+4x30", answered="0+1x30", unanswered="0+3x30"),
        "alerts": {"HostPortUnanswered": []},
        "at": "10m",
    },
    {   # packets dropped after DNAT (a FORWARD DROP)
        "name": "drops",
        "input_series": mapping_series(WEB, drops_NETFILTER_DROP="0+4x30"),
        "alerts": {"HostPortDrops": [{
            "exp_labels": {**WEB, "reason": "NETFILTER_DROP", "severity": "error"},
            "exp_annotations": {
                "summary": f"Packets to hostPort tcp/8000 on {NODE} are dropped after DNAT",
                "description": (f"40 packets DNATed through hostPort tcp/8000 on node {NODE} to 10.0.1.2:80 were "
                                "dropped in the last 10 minutes (kernel drop reason NETFILTER_DROP). `check` on "
                                "the node points at the rule: forward-drop, ip-forward-off or "
                                "ipv6-forwarding-off."),
                "runbook": RUNBOOK}}]},
        "at": "10m",
    },
    {   # drops long ago: the counter stands still
        "name": "old drops",
        "input_series": mapping_series(WEB, drops_NETFILTER_DROP="7x30"),
        "alerts": {"HostPortDrops": []},
        "at": "20m",
    },
    {   # a declared hostPort whose DNAT rule is missing; and a port no pod is known to own
        "name": "misses",
        "input_series": [series("misses_total", "0+2x30", node=NODE, proto="tcp", host_port="8000", namespace="", pod=""),
                         *mapping_series(WEB, flows="0x30"),
                         series("misses_total", "0+1x30", node=NODE, proto="tcp", host_port="7000", namespace="", pod="")],
        "alerts": {"HostPortNotTranslated": [not_translated("20")],
                   "HostPortMisses": [{
                       "exp_labels": {"node": NODE, "proto": "tcp", "host_port": "7000", "severity": "warning"},
                       "exp_annotations": {
                           "summary": f"hostPort tcp/7000 on {NODE} is not translated",
                           "description": (f"10 connections to hostPort tcp/7000 on node {NODE} got no DNAT in the "
                                           "last 10 minutes, and no pod is known to own the port. `check` on the "
                                           "node names the cause: hostport-no-rule, hostport-chain-not-hooked, or "
                                           "a node process behind node-socket-shadowed."),
                           "runbook": RUNBOOK}}]},
        "at": "10m",
    },
    {   # the case: 5 misses on a declared port whose miss series was exported at 0 before
        "name": "a first burst of misses",
        "input_series": [series("misses_total", "0x2 5x28", node=NODE, proto="tcp", host_port="8000", namespace="", pod=""),
                         *mapping_series(WEB, flows="0x30")],
        "alerts": {"HostPortNotTranslated": [not_translated("5")]},
        "at": "8m",
    },
    {   # the check's stale-conntrack finding, with the finding's own severity
        "name": "stale conntrack",
        "input_series": [series("check_findings", "1x30", node=NODE, code="stale-conntrack", severity="error"),
                         series("check_findings", "0x30", node="n2", code="stale-conntrack", severity="warning")],
        "alerts": {"HostPortStaleConntrack": [{
            "exp_labels": {"node": NODE, "code": "stale-conntrack", "severity": "error"},
            "exp_annotations": {
                "summary": f"Stale conntrack entries for a hostPort on {NODE}",
                "description": (f"The agent's check on node {NODE} finds 1 stale-conntrack finding(s): conntrack "
                                "entries for a hostPort that still DNAT to a pod IP that is gone, so their clients "
                                "never reach the current pod. `check` prints the `conntrack -D` that deletes "
                                "exactly those entries and no healthy one."),
                "runbook": RUNBOOK}}],
            "HostPortCheckFinding": []},
        "at": "10m",
    },
    {   # the entries were deleted: the finding went to 0
        "name": "stale conntrack cleared",
        "input_series": [series("check_findings", "1x3 0x27", node=NODE, code="stale-conntrack", severity="error")],
        "alerts": {"HostPortStaleConntrack": []},
        "at": "15m",
    },
    {   # other findings: an error alerts with its severity, info stays silent
        "name": "check findings",
        "input_series": [series("check_findings", "2x30", node=NODE, code="forward-drop", severity="error"),
                         series("check_findings", "1x30", node=NODE, code="hostnetwork-hostport", severity="info")],
        "alerts": {"HostPortCheckFinding": [{
            "exp_labels": {"node": NODE, "code": "forward-drop", "severity": "error"},
            "exp_annotations": {
                "summary": f"bpftrace-hostport check finds forward-drop on {NODE}",
                "description": (f"The agent's check on node {NODE} reports forward-drop (error, 2 time(s)) for "
                                "10 minutes. `check` on the node prints the evidence and the fix."),
                "runbook": RUNBOOK}}]},
        "at": "15m",
    },
    {   # flows the full flow table could not track
        "name": "lost events",
        "input_series": [series("lost_events_total", "0x10 3x20", node=NODE)],
        "alerts": {"HostPortLostEvents": [{
            "exp_labels": {"node": NODE, "severity": "warning"},
            "exp_annotations": {
                "summary": f"bpftrace-hostport could not track every flow on {NODE}",
                "description": (f"The agent on node {NODE} could not track 3 flows in the last 10 minutes: its "
                                "flow table was full. Those flows are counted, but their outcomes and latency are "
                                "not. Raise the agent's --flow-table."),
                "runbook": ("kubectl -n bpftrace-hostport logs $(kubectl -n bpftrace-hostport get pods -l "
                            f"app.kubernetes.io/name=bpftrace-hostport --field-selector spec.nodeName={NODE} "
                            "-o name) | grep new_lost")}}]},
        "at": "12m",
    },
    {   # no loss since the agent started
        "name": "no lost events",
        "input_series": [series("lost_events_total", "0x30", node=NODE)],
        "alerts": {"HostPortLostEvents": []},
        "at": "12m",
    },
    {   # detached (up 0) on one node, reporting on another
        "name": "agent detached",
        "input_series": [series("up", "1x4 0x26", node=NODE), series("up", "1x30", node="n2")],
        "alerts": {"HostPortAgentDown": [{
            "exp_labels": {"node": NODE, "severity": "warning"},
            "exp_annotations": {
                "summary": f"bpftrace-hostport is not tracing on {NODE}",
                "description": (f"The hostPort tracer has not been attached for 5 minutes (node {NODE}). The agent "
                                "pod's log on that node says why (the kernel's or the compiler's refusal)."),
                "runbook": ("kubectl -n bpftrace-hostport logs $(kubectl -n bpftrace-hostport get pods -l "
                            f"app.kubernetes.io/name=bpftrace-hostport --field-selector spec.nodeName={NODE} "
                            "-o name)")}}]},
        "at": "12m",
    },
    {   # no agent reports at all
        "name": "no agent at all",
        "input_series": [series("flows_total", "0x30", **WEB, port_name="http")],
        "alerts": {"HostPortAgentDown": [{
            "exp_labels": {"severity": "warning"},
            "exp_annotations": {
                "summary": "bpftrace-hostport is not tracing on any node",
                "description": ("The hostPort tracer has not been attached for 5 minutes (no agent reports at "
                                "all). The agent pod's log on that node says why (the kernel's or the compiler's "
                                "refusal)."),
                "runbook": "kubectl -n bpftrace-hostport logs -l app.kubernetes.io/name=bpftrace-hostport"}}]},
        "at": "10m",
    },
    {   # every agent attached
        "name": "agents up",
        "input_series": [series("up", "1x30", node=NODE)],
        "alerts": {"HostPortAgentDown": []},
        "at": "20m",
    },
]


@pytest.fixture(scope="module")
def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        unavailable("promtool is missing: apt-get install prometheus (scripts/test.sh installs it).")
    return tool


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> str:
    """The PrometheusRule's spec.groups as a plain rules file."""
    (rule,) = load_docs("prometheusrule.yaml")
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return str(path)


def alert_names() -> set:
    (rule,) = load_docs("prometheusrule.yaml")
    return {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_checks_the_rules(promtool, rules_file):
    res = subprocess.run([promtool, "check", "rules", rules_file], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    firing = {name for c in CASES for name, exp in c["alerts"].items() if exp}
    silent = {name for c in CASES for name, exp in c["alerts"].items() if not exp}
    assert firing == alert_names() and silent == alert_names()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_promtool_alert_case(promtool, rules_file, tmp_path, case):
    test = {"rule_files": [rules_file], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": case["input_series"],
                       "alert_rule_test": [{"eval_time": case["at"], "alertname": name, "exp_alerts": exp}
                                           for name, exp in case["alerts"].items()]}]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    res = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
