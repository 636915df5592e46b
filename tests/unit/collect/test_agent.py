"""The agent's log lines: each names its mapping, a mapping's events come at most once per
interval with everything since, nothing is held back at the end, every line is JSON with
--log-json, and the stop line's lost_events is the metrics'."""
import io
import json

import pytest

from bpftrace_hostport.collect import logline
from bpftrace_hostport.collect.agent import AgentOptions, AgentSink


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def json_lines():
    logline.use_json(True)
    yield
    logline.use_json(False)


def mapping(refused=0, drops=None, unanswered=0, misses=0, flows=10):
    return {"proto": "tcp", "family": 4, "host_port": 8000, "pod_ip": "10.0.1.2", "pod_port": 80,
            "pod_namespace": "web", "pod_name": "nginx-0", "port_name": "http", "flows": flows,
            "answered": flows - refused - unanswered, "refused": refused,
            "refusals": {"reset": refused} if refused else {}, "refused_by": {"pod": refused} if refused else {},
            "unanswered": unanswered, "drops": drops or {}, "misses": misses}


def hostnet_port(misses):
    return {"proto": "tcp", "family": 4, "host_port": 9000, "pod_ip": None, "pod_port": None,
            "pod_namespace": "kube-system", "pod_name": "ingress", "port_name": None, "flows": 0,
            "answered": 0, "refused": 0, "refusals": {}, "unanswered": 0, "drops": {}, "misses": misses}


def lines(err):
    return [json.loads(ln) for ln in err.getvalue().splitlines()]


class Metrics:
    lost = 0

    def set_ready(self, ready):
        pass


def test_events_name_the_mapping_and_come_once_per_interval(json_lines):
    err, clock, metrics = io.StringIO(), Clock(), Metrics()
    a = AgentSink(AgentOptions(check_interval=60), None, None, metrics, err=err, clock=clock)
    a.tick({"mappings": [mapping(refused=3, drops={"NETFILTER_DROP": 2}), hostnet_port(5)], "lost_events": 0})
    got = {ln["event"]: ln for ln in lines(err)}
    assert set(got) == {"new_refused", "new_drops", "new_misses"}
    r = got["new_refused"]
    assert (r["host_port"], r["pod"], r["pod_ip"], r["count"], r["refusals"], r["refused_by"], r["level"]) == \
        (8000, "web/nginx-0", "10.0.1.2", 3, {"reset": 3}, {"pod": 3}, "warning")
    assert got["new_drops"]["reasons"] == {"NETFILTER_DROP": 2} and got["new_drops"]["pod"] == "web/nginx-0"
    m = got["new_misses"]
    assert (m["host_port"], m["owner"], m["expected"], m["level"], m["count"]) == (9000, "kube-system/ingress",
                                                                                 True, "info", 5)
    err.truncate(0), err.seek(0)
    clock.now += 30                                   # within the interval: held back
    a.tick({"mappings": [mapping(refused=7), hostnet_port(5)], "lost_events": 0})
    assert err.getvalue() == ""
    clock.now += 31
    a.tick({"mappings": [mapping(refused=9), hostnet_port(5)], "lost_events": 0})
    (r,) = lines(err)
    assert (r["event"], r["count"], r["total"]) == ("new_refused", 6, 9)
    err.truncate(0), err.seek(0)
    clock.now += 1
    metrics.lost = 4                                  # what the metrics exported, closed first
    a.close({"mappings": [mapping(refused=10, unanswered=2)], "lost_events": 4, "flows": 12})
    out = lines(err)
    assert [(ln["event"], ln.get("count")) for ln in out] == [("new_refused", 1), ("new_unanswered", 2),
                                                              ("new_lost", 4), ("stopped", None)]
    assert out[-1]["lost_events"] == 4 and out[-1]["flows"] == 12
    assert "flow table" in out[2]["cause"]


def test_plain_lines_without_log_json():
    err = io.StringIO()
    a = AgentSink(AgentOptions(), None, None, None, err=err)
    a.tick({"mappings": [hostnet_port(2)], "lost_events": 0})
    assert err.getvalue() == ("new_misses: count=2, total=2, proto=tcp, host_port=9000, "
                              "owner=kube-system/ingress, expected=True\n")


def test_logline_json_and_python_logging(json_lines, capsys):
    import logging
    logline.note("nat rules not read: iptables-save failed")
    logline.emit("tracing", "Tracing hostPort DNAT in this network namespace ...", backend="netfilter")
    logging.getLogger("bpftrace_hostport.pods.sources").warning("Kubernetes pod watch failed (%s); retrying", "x")
    out = [json.loads(ln) for ln in capsys.readouterr().err.splitlines()]
    assert [o["event"] for o in out] == ["note", "tracing", "log"]
    assert out[0]["message"] == "nat rules not read: iptables-save failed"
    assert out[2]["level"] == "warning" and out[2]["message"] == "Kubernetes pod watch failed (x); retrying"
