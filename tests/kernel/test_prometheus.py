"""A real Prometheus (Debian's 2.42) scrapes the agent on a lab with traffic of every kind, loads
the shipped rules and answers every dashboard query.

The lab's pods: web (hostPort 8000), down (hostPort 8100, its server stopped: nothing listens, a
reset from the pod) and a hostNetwork pod on 9000; in the lab node's own FORWARD chain a DROP for
IPv6 traffic to the pods' port 80. So: answered flows on 8000/IPv4, refused ones on 8100, drops
and unanswered flows on 8000/IPv6, misses on 9000 (a hostNetwork pod's: expected). Prometheus
listens on 127.0.0.1 on a free port with a data directory of its own and scrapes the agent's
127.0.0.1 port (the agent's process stays in the root namespace; only its netfilter links are in
the lab's); it is stopped and its directory removed afterwards. Nothing in the root namespace's
firewall, routes or sysctls changes.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bpftrace_hostport.lab import build as lab
from tests.conftest import require_kernel
from tests.kernel.helpers import AgentRun, free_port, stop_process, unique
from tests.unit.test_deploy import DEPLOY, load_docs, panel_exprs

RATE_WINDOW = "30s"           # $__rate_interval on a 1 s scrape


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {why}")
    pytest.skip(why)


class Prometheus:
    """A Prometheus server of its own: 127.0.0.1, a free port, a temporary data directory."""

    def __init__(self, target_port: int, rules: dict):
        binary = shutil.which("prometheus")
        if binary is None:
            _unavailable("the prometheus server is missing: apt-get install prometheus (scripts/test.sh does)")
        self.dir = Path(tempfile.mkdtemp(prefix="bhp-prometheus-"))
        (self.dir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(self.dir / "rules.yaml")],
            "scrape_configs": [{"job_name": "bpftrace-hostport",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen([binary, f"--config.file={self.dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.dir / "log").read_text()
            time.sleep(0.1)

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def close(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _value(result: list, **labels) -> float:
    return sum(float(r["value"][1]) for r in result if all(r["metric"].get(k) == v for k, v in labels.items()))


PODS = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: lab}
spec:
  containers:
  - {name: web, image: nginx, ports: [{name: http, containerPort: 80, hostPort: 8000, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: down, namespace: lab}
spec:
  containers:
  - {name: web, image: nginx, ports: [{name: http, containerPort: 80, hostPort: 8100, protocol: TCP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet-web, namespace: lab}
spec:
  hostNetwork: true
  containers:
  - {name: web, image: nginx, ports: [{name: http, containerPort: 9000, hostPort: 9000, protocol: TCP}]}
"""


@pytest.fixture(scope="module")
def scraped():
    """The lab, the agent, Prometheus scraping it, after the traffic: (prometheus, lab state, sent)."""
    require_kernel()
    name = unique("prom")
    lab.down(name)
    (rule,) = load_docs("prometheusrule.yaml")
    prom = None
    try:
        st = lab.up(name=name, manifest_text=PODS)
        down = next(p for p in st.pods if p.name == "down")
        lab._kill(down.server_pid)                 # the pod stays, its rules stay, nothing listens
        subprocess.run(["ip", "netns", "exec", st.node_netns, "ip6tables", "-I", "FORWARD", "-p", "tcp",
                        "--dport", "80", "-j", "DROP"], check=True)
        with AgentRun(name, "--timeout", "1", "--check-interval", "2") as agent:
            prom = Prometheus(agent.port, {"groups": rule["spec"]["groups"]})
            prom.wait_ready()
            # a scrape of the known mappings at 0 first: the traffic is then an increase
            deadline = time.monotonic() + 20
            while not prom.query('bpftrace_hostport_flows_total{host_port="8000"}'):
                assert time.monotonic() < deadline, "Prometheus never scraped the agent"
                time.sleep(0.3)
            sent = {"answered": lab.traffic(name, to=8000, count=20),
                    "refused": lab.traffic(name, to=8100, count=5),
                    "dropped": lab.traffic(name, to=8000, count=3, family=6, timeout=0.5),
                    "missed": lab.traffic(name, to=9000, count=4)}
            deadline = time.monotonic() + 30
            while True:       # until the scrapes hold every flow, its outcome and a finding
                got = (_value(prom.query("bpftrace_hostport_flows_total")),
                       _value(prom.query("bpftrace_hostport_unanswered_flows_total")),
                       len(prom.query("bpftrace_hostport_check_findings > 0")))
                if got[0] >= 28 and got[1] >= 3 and got[2] or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(3)     # a few more scrapes and rule evaluations on top
            yield prom, st, sent, agent
    finally:
        if prom is not None:
            prom.close()
        lab.down(name)


def test_the_lab_traffic_is_what_the_panels_need(scraped):
    prom, st, sent, _ = scraped
    assert sent["answered"]["answered"] == 20 and sent["missed"]["answered"] == 4
    assert sent["refused"]["answered"] == 0 and sent["dropped"]["answered"] == 0
    assert _value(prom.query("bpftrace_hostport_answered_flows_total"), host_port="8000") == 20
    assert _value(prom.query("bpftrace_hostport_refused_flows_total"), host_port="8100", refusal="reset") == 5
    assert _value(prom.query("bpftrace_hostport_unanswered_flows_total"), host_port="8000") == 3
    assert _value(prom.query("bpftrace_hostport_drops_total"), host_port="8000") >= 3
    assert _value(prom.query("bpftrace_hostport_misses_total"), host_port="9000", pod="hostnet-web") == 4


def test_every_dashboard_query_returns_series(scraped):
    prom, st, _, _ = scraped
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    empty = []
    for expr in panel_exprs(dash):
        q = expr.replace('"$node"', '".*"').replace("$__rate_interval", RATE_WINDOW)
        if not prom.query(q):
            empty.append(expr)
    assert not empty, f"dashboard queries without series: {empty}"
    var = next(v for v in dash["templating"]["list"] if v["name"] == "node")
    assert var["query"]["query"] == "label_values(bpftrace_hostport_up, node)"
    assert st.node_name in prom.api("label/node/values", **{"match[]": "bpftrace_hostport_up"})


def test_the_shipped_rules_evaluate_on_real_data(scraped):
    prom, st, _, _ = scraped
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    (rule,) = load_docs("prometheusrule.yaml")
    shipped = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == set(shipped)
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules

    def firing_now(name):            # the condition as it stands (before `for` has passed)
        return prom.query(shipped[name]["expr"])
    refused = firing_now("HostPortRefused")
    assert [(r["metric"]["host_port"], r["metric"]["pod"]) for r in refused] == [("8100", "down")]
    assert float(refused[0]["value"][1]) >= 5           # the first burst counts
    dropped = firing_now("HostPortDrops")
    six = next(p for p in st.pods if p.name == "web").ips[1]
    assert {(r["metric"]["host_port"], r["metric"]["pod_ip"], r["metric"]["reason"]) for r in dropped} == {
        ("8000", six, "NETFILTER_DROP")}
    unanswered = firing_now("HostPortUnanswered")
    assert {(r["metric"]["host_port"], r["metric"]["pod_ip"]) for r in unanswered} == {("8000", six)}
    # a hostNetwork pod's misses are expected: silent; the agent is up
    for silent in ("HostPortMisses", "HostPortNotTranslated", "HostPortAgentDown", "HostPortLostEvents"):
        assert firing_now(silent) == [], silent
    # the rules' own state: conditions met, waiting for `for`
    pending = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "pending"}
    assert {"HostPortRefused", "HostPortDrops", "HostPortUnanswered"} <= pending
