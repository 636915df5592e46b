"""MetricsSink: batches and ticks in, the real HTTP endpoint scraped and parsed."""
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from bpftrace_hostport.errors import UserError
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from bpftrace_hostport.records import outcome as oc
from bpftrace_hostport.records.batch import FlowBatch, pack_addr
from bpftrace_hostport.collect.metrics import EXPORTED_METRICS, MetricsSink, parse_listen

NETFILTER = {"type": "capture", "backend": "netfilter",
             "measures": {"latency": True, "packets": True, "misses": True, "drops": True}}
CONNTRACK = {"type": "capture", "backend": "conntrack",
             "measures": {"latency": False, "packets": False, "misses": False, "drops": False}}
WEB = ("web", "nginx-0", "http")
NAN = float("nan")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def batch(rows, pods=(WEB,)):
    """rows: (proto, host_port, pod_ip, pod_port, answered, midstream, latency_us, pod index)."""
    b = FlowBatch.empty(len(rows))
    for i, (proto, hp, ip, pp, ans, mid, lat, pod) in enumerate(rows):
        b["proto"][i], b["host_port"][i], b["pod_port"][i] = proto, hp, pp
        b["family"][i] = 6 if ":" in ip else 4
        b["pod_addr"][i] = np.void(pack_addr(ip))
        b["answered"][i], b["midstream"][i], b["latency_us"][i], b["pod"][i] = ans, mid, lat, pod
        b["outcome"][i] = oc.ANSWERED if ans else oc.UNANSWERED
    b.pods = list(pods)
    return b


def mapping(host_port=8080, pod_ip="10.0.1.2", pod_port=80, proto="tcp", flows=0, packets=0,
            nbytes=0, drops=None, names=WEB, answered=0, unanswered=0, refusals=None):
    return {"proto": proto, "family": 4, "host_port": host_port, "pod_ip": pod_ip,
            "pod_port": pod_port, "pod_namespace": names[0], "pod_name": names[1],
            "port_name": names[2], "flows": flows, "packets": packets, "bytes": nbytes,
            "drops": drops or {}, "answered": answered, "unanswered": unanswered,
            "refused": sum((refusals or {}).values()), "refusals": refusals or {}}


def summary(*mappings, lost=0):
    return {"type": "summary", "lost_events": lost, "mappings": list(mappings)}


@pytest.fixture
def sinks():
    started = []

    def make(header=NETFILTER, **kw):
        s = MetricsSink("node-a", "127.0.0.1:0", **kw)
        s.start(header)
        started.append(s)
        return s
    yield make
    for s in started:
        s.close(None)


def get(sink, path="/metrics", accept=None):
    host, port = sink.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def scrape(sink):
    """{sample name: [(labels, value)]} from the text exposition."""
    out = {}
    for fam in text_string_to_metric_families(get(sink)[2]):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name, **labels):
    found = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


A_ROWS = [(6, 8080, "10.0.1.2", 80, True, False, 10.0, 0),       # exactly on the 10 µs bound
          (6, 8080, "10.0.1.2", 80, True, False, 30.0, 0),
          (6, 8080, "10.0.1.2", 80, True, False, 2e6, 0),
          (6, 8080, "10.0.1.2", 80, True, True, 100.0, 0),        # midstream: answered, not timed
          (6, 8080, "10.0.1.2", 80, False, False, NAN, -1)]
B_ROWS = [(17, 5353, "fd00:1::2", 53, False, False, NAN, -1)] * 2


def test_counts_are_the_summarys_and_the_histogram_the_records(sinks):
    s = sinks()
    s.flows(batch(A_ROWS + B_ROWS))
    s.tick(summary(mapping(flows=7, packets=40, nbytes=3000, drops={"NETFILTER_DROP": 2}, answered=4,
                           unanswered=1, refusals={"reset": 2}),
                   mapping(5353, "fd00:1::2", 53, "udp", flows=2, unanswered=2, names=(None, None, None)),
                   lost=3))
    m = scrape(s)
    a = dict(node="node-a", proto="tcp", host_port="8080", pod_ip="10.0.1.2", pod_port="80",
             namespace="web", pod="nginx-0", port_name="http")
    b = dict(proto="udp", host_port="5353", pod_ip="fd00:1::2", pod_port="53", namespace="", pod="")
    assert value(m, "bpftrace_hostport_flows_total", **a) == 7          # the kernel's total
    assert value(m, "bpftrace_hostport_flows_total", **b) == 2
    assert value(m, "bpftrace_hostport_answered_flows_total", **a) == 4
    assert value(m, "bpftrace_hostport_answered_flows_total", **b) == 0
    assert value(m, "bpftrace_hostport_refused_flows_total", refusal="reset", **a) == 2
    assert value(m, "bpftrace_hostport_unanswered_flows_total", **a) == 1
    assert value(m, "bpftrace_hostport_unanswered_flows_total", **b) == 2
    assert value(m, "bpftrace_hostport_packets_total", **a) == 40
    assert value(m, "bpftrace_hostport_bytes_total", **a) == 3000
    assert value(m, "bpftrace_hostport_drops_total", reason="NETFILTER_DROP", **a) == 2
    assert value(m, "bpftrace_hostport_lost_events_total", node="node-a") == 3
    assert value(m, "bpftrace_hostport_latency_seconds_count", **a) == 3
    assert value(m, "bpftrace_hostport_latency_seconds_sum", **a) == pytest.approx(2.00004)
    buckets = {lab["le"]: v for lab, v in m["bpftrace_hostport_latency_seconds_bucket"]
               if lab["pod_ip"] == "10.0.1.2"}
    assert len(buckets) == 20
    assert (buckets["1e-05"], buckets["2.5e-05"], buckets["5e-05"], buckets["1.0"],
            buckets["2.5"], buckets["+Inf"]) == (1, 1, 2, 2, 3, 3)
    assert value(m, "bpftrace_hostport_latency_seconds_count", **b) == 0


def test_the_metrics_are_the_roll_ups_figures(sinks):
    """Batches through the session's roll-up and its summary record, as the session ticks the
    sinks: every count the metrics export is the summary's, outcome by outcome."""
    from bpftrace_hostport.analysis.rollup import Rollup
    from bpftrace_hostport.analysis.summary import summary_record
    from bpftrace_hostport.records import outcome as oc
    b = batch(A_ROWS + B_ROWS)
    b["outcome"][b["answered"]] = oc.ANSWERED
    b["outcome"][1], b["refusal"][1], b["refused_by"][1] = oc.REFUSED, 1, 1      # a reset from the pod
    b["answered"][1], b["latency_us"][1] = False, NAN
    b["outcome"][5], b["refusal"][5] = oc.REFUSED, oc.REFUSALS.index("port-unreachable")
    r = Rollup(series=False, clients=False)
    r.add_flows(b)
    summ = summary_record(r.figures(latency=False), 1.0, 0)
    s = sinks()
    s.flows(b)
    s.tick(summ)
    m = scrape(s)
    for mp in summ["mappings"]:
        labels = dict(proto=mp["proto"], host_port=str(mp["host_port"]), pod_ip=mp["pod_ip"])
        assert value(m, "bpftrace_hostport_flows_total", **labels) == mp["flows"]
        assert value(m, "bpftrace_hostport_answered_flows_total", **labels) == mp["answered"]
        assert value(m, "bpftrace_hostport_unanswered_flows_total", **labels) == mp["unanswered"]
        for kind, n in mp["refusals"].items():
            assert value(m, "bpftrace_hostport_refused_flows_total", refusal=kind, **labels) == n
    assert sum(v for _, v in m["bpftrace_hostport_refused_flows_total"]) == 2
    assert value(m, "bpftrace_hostport_answered_flows_total", proto="tcp") == 3     # the reset is no answer
    assert value(m, "bpftrace_hostport_latency_seconds_count", proto="tcp") == 2


def test_kernel_totals_never_go_down(sinks):
    s = sinks()
    s.tick(summary(mapping(flows=7, packets=40, drops={"X": 3}, answered=6), lost=5))
    s.tick(summary(mapping(flows=5, packets=10, drops={"X": 1}, answered=2), lost=2))   # e.g. a map re-created
    m = scrape(s)
    assert value(m, "bpftrace_hostport_flows_total") == 7
    assert value(m, "bpftrace_hostport_answered_flows_total") == 6
    assert value(m, "bpftrace_hostport_packets_total") == 40
    assert value(m, "bpftrace_hostport_drops_total", reason="X") == 3
    assert value(m, "bpftrace_hostport_lost_events_total") == 5
    s.tick(summary(mapping(flows=10, answered=9)))
    assert value(scrape(s), "bpftrace_hostport_flows_total") == 10


def _kernel(answered, hist, lat_sum_s, without_records):
    m = dict(mapping(flows=answered + 1), answered=answered, latency_hist=hist,
             latency_sum_s=lat_sum_s)
    return {"mappings": [m], "answered_in_kernel_only": without_records}


def test_kernel_latency_without_flow_records_adds_to_the_records(sinks):
    """Without flow records the kernel's histogram counts flows no record carries (only
    timed-out flows come as records): the two add up."""
    s = sinks()
    hist = [0] * 20
    hist[2], hist[19] = 5, 1                       # 5 flows <= 50 µs, 1 over 10 s
    s.flows(batch([A_ROWS[1], A_ROWS[4]]))        # records: one answered (30 µs), one not
    s.kernel_counters(_kernel(6, hist, 12.5, True))
    s.tick(summary(mapping(flows=8, answered=7)))  # the roll-up added the kernel's answered flows
    m = scrape(s)
    assert value(m, "bpftrace_hostport_answered_flows_total") == 7
    assert value(m, "bpftrace_hostport_latency_seconds_count") == 7
    assert value(m, "bpftrace_hostport_latency_seconds_sum") == pytest.approx(12.50003)
    buckets = {lab["le"]: v for lab, v in m["bpftrace_hostport_latency_seconds_bucket"]}
    assert (buckets["2.5e-05"], buckets["5e-05"], buckets["10.0"], buckets["+Inf"]) == (0, 6, 6, 7)


def test_kernel_latency_with_flow_records_is_not_counted_twice(sinks):
    """With flow records the kernel counts the same flows the records carry: the larger wins."""
    s = sinks()
    s.flows(batch(A_ROWS))                        # 4 answered, 3 timed
    hist = [0] * 20
    hist[0], hist[2], hist[16] = 1, 1, 1
    s.kernel_counters(_kernel(4, hist, 2.00004, False))
    s.tick(summary(mapping(flows=5, answered=4)))
    m = scrape(s)
    assert value(m, "bpftrace_hostport_answered_flows_total") == 4
    assert value(m, "bpftrace_hostport_latency_seconds_count") == 3
    s.kernel_counters(_kernel(9, [2 * v for v in hist], 4.0, False))   # ahead of the records
    m = scrape(s)
    assert value(m, "bpftrace_hostport_latency_seconds_count") == 6


def test_conntrack_has_no_packets_latency_or_drops(sinks):
    s = sinks(CONNTRACK)
    s.flows(batch([r[:6] + (NAN, r[7]) for r in A_ROWS]))
    s.tick(summary({**mapping(flows=5, answered=4), "packets": None, "bytes": None}))
    m = scrape(s)
    assert value(m, "bpftrace_hostport_flows_total", pod="nginx-0") == 5
    assert value(m, "bpftrace_hostport_answered_flows_total", pod="nginx-0") == 4
    text = get(s)[2]
    for absent in ("packets_total", "bytes_total", "latency_seconds", "drops_total"):
        assert "bpftrace_hostport_" + absent not in text


def test_misses_with_owner_labels(sinks):
    s = sinks()
    s.misses([{"type": "miss", "proto": "tcp", "family": 4, "host_port": 9000, "count": 2},
              {"type": "miss", "proto": "tcp", "family": 6, "host_port": 9000, "count": 3},
              {"type": "miss", "proto": "udp", "family": 4, "host_port": 53, "count": 1,
               "pod_namespace": "kube-system", "pod_name": "dns-host"}])
    m = scrape(s)
    assert value(m, "bpftrace_hostport_misses_total", proto="tcp", host_port="9000",
                 namespace="", pod="") == 5
    assert value(m, "bpftrace_hostport_misses_total", node="node-a", proto="udp", host_port="53",
                 namespace="kube-system", pod="dns-host") == 1


def test_findings_go_to_zero_then_away_after_grace(sinks):
    clock = Clock()
    s = sinks(grace_s=60, clock=clock)
    s.set_findings([{"code": "HP001", "severity": "error"}, {"code": "HP001", "severity": "error"},
                    {"code": "HP002", "severity": "warning"}])
    m = scrape(s)
    assert value(m, "bpftrace_hostport_check_findings", code="HP001", severity="error") == 2
    assert value(m, "bpftrace_hostport_check_findings", code="HP002", severity="warning") == 1
    clock.now += 30
    s.set_findings([{"code": "HP002", "severity": "warning"}])
    assert value(scrape(s), "bpftrace_hostport_check_findings", code="HP001") == 0
    clock.now += 31
    s.tick(summary())
    m = scrape(s)
    assert [lab["code"] for lab, _ in m["bpftrace_hostport_check_findings"]] == ["HP002"]


def test_idle_series_retired_after_grace_and_revived_continuing(sinks):
    clock = Clock()
    s = sinks(grace_s=60, clock=clock)
    s.flows(batch(A_ROWS))
    s.tick(summary(mapping(flows=5, answered=4)))
    clock.now += 59
    s.tick(summary(mapping(flows=5, answered=4)))      # the summary repeating itself is not a sign of life
    assert "bpftrace_hostport_flows_total" in scrape(s)
    clock.now += 2
    s.tick(summary(mapping(flows=5, answered=4)))
    assert "bpftrace_hostport_flows_total" not in scrape(s)
    s.tick(summary(mapping(flows=6, answered=4)))      # the mapping is back: counters continue
    m = scrape(s)
    assert value(m, "bpftrace_hostport_flows_total") == 6
    assert value(m, "bpftrace_hostport_answered_flows_total") == 4


def test_series_cap_counts_overflow(sinks):
    s = sinks(max_series=2)
    s.tick(summary(mapping(8001, flows=2), mapping(8002, flows=2), mapping(8003, flows=3)))
    s.tick(summary(mapping(8001, flows=2), mapping(8002, flows=2), mapping(8003, flows=4),
                   mapping(8004, flows=9)))
    m = scrape(s)
    assert sorted(lab["host_port"] for lab, _ in m["bpftrace_hostport_flows_total"]) == ["8001", "8002"]
    assert value(m, "bpftrace_hostport_series_overflow_total", node="node-a") == 13


def test_large_batch_is_grouped(sinks):
    s = sinks()
    n = 200_000
    rng = np.random.default_rng(1)
    hp = rng.integers(8000, 8010, n)
    lat = rng.uniform(1, 2e7, n)
    ans = rng.random(n) < 0.7
    b = FlowBatch.empty(n)
    b["proto"][:], b["family"][:], b["host_port"][:], b["pod_port"][:] = 6, 4, hp, 80
    b["pod_addr"][:] = np.void(pack_addr("10.0.1.2"))
    b["answered"][:], b["latency_us"][:] = ans, np.where(ans, lat, np.nan)
    s.flows(b)
    m = scrape(s)
    assert sum(v for _, v in m["bpftrace_hostport_latency_seconds_count"]) == int(ans.sum())
    port = int(hp[0])
    expect = int(np.count_nonzero(ans & (hp == port) & (lat <= 1e3)))
    assert value(m, "bpftrace_hostport_latency_seconds_bucket", host_port=str(port), le="0.001") == expect


def test_healthz_up_and_404(sinks):
    s = sinks()
    assert get(s, "/healthz")[::2] == (200, "ok\n")      # started: the backend is attached
    assert value(scrape(s), "bpftrace_hostport_up", node="node-a") == 1
    s.set_ready(False)
    assert get(s, "/healthz")[0] == 503
    assert value(scrape(s), "bpftrace_hostport_up", node="node-a") == 0
    s.set_ready(True)
    assert get(s, "/healthz")[::2] == (200, "ok\n")
    assert value(scrape(s), "bpftrace_hostport_up") == 1
    assert get(s, "/nope")[0] == 404


def test_openmetrics_negotiated(sinks):
    s = sinks()
    s.tick(summary(mapping(flows=1)))
    status, ctype, body = get(s, accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(body)}
    assert {"bpftrace_hostport_flows", "bpftrace_hostport_latency_seconds"} <= names
    assert get(s)[1].startswith("text/plain")


def test_exported_metrics_lists_every_name(sinks):
    s = sinks()
    s.flows(batch(A_ROWS))
    s.misses([{"proto": "tcp", "family": 4, "host_port": 9000, "count": 1}])
    s.set_findings([{"code": "HP001", "severity": "error"}])
    s.tick(summary(mapping(flows=5, drops={"X": 1})))
    exposed = {f.name + ("_total" if f.type == "counter" else "")
               for f in text_string_to_metric_families(get(s)[2])}
    assert exposed == set(EXPORTED_METRICS)


def test_listen_addresses():
    assert parse_listen("9469") == ("127.0.0.1", 9469)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:9469") == ("::1", 9469)
    assert parse_listen("localhost:1") == ("localhost", 1)
    for bad in ("", ":9469", "x:y", "70000", "::1:9469", "[zz]:1", "1.2.3.4:"):
        with pytest.raises(ValueError, match=r"^Bad metrics listen address .*\.$"):
            MetricsSink("n", bad)


def test_default_bind_is_loopback():
    s = MetricsSink("n", "0")
    s.start(NETFILTER)
    try:
        assert s.address[0] == "127.0.0.1" and s.address[1] > 0
        assert get(s, "/healthz")[0] == 200
    finally:
        s.close(None)
    with pytest.raises(OSError):
        socket.create_connection(s.listen[:1] + (s.address[1],), timeout=1).close()


def test_ipv6_loopback():
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    s = MetricsSink("n", "[::1]:0")
    s.start(NETFILTER)
    try:
        host, port = s.address
        with urllib.request.urlopen(f"http://[{host}]:{port}/metrics", timeout=5) as r:
            assert r.status == 200
    finally:
        s.close(None)


def test_port_in_use():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        s = MetricsSink("n", str(port))
        with pytest.raises(UserError) as e:
            s.start(NETFILTER)
    assert str(e.value) == (f"Cannot listen on 127.0.0.1:{port}: address in use; "
                            "choose another --metrics port.")


def test_close_does_a_final_tick_and_stops(sinks):
    s = sinks()
    s.close(summary(mapping(flows=4)))
    assert s.server is None
    flows = [smp.value for fam in s.collect() for smp in fam.samples
             if smp.name == "bpftrace_hostport_flows_total"]
    assert flows == [4]


def test_the_server_sleeps_between_scrapes_and_stops_at_once(sinks):
    """No timer in the serving thread (serve_forever's poll_interval woke it ten times a
    second): between scrapes it does not wake; close() ends it without waiting."""
    import time

    def wakeups(tid):
        with open(f"/proc/self/task/{tid}/status") as f:
            return int(next(ln for ln in f if ln.startswith("voluntary_ctxt_switches")).split()[1])

    s = sinks()
    assert get(s, "/healthz")[0] == 200
    tid = s.thread.native_id
    before = wakeups(tid)
    time.sleep(0.6)
    assert wakeups(tid) - before <= 1
    assert get(s, "/healthz")[0] == 200
    t0 = time.monotonic()
    s.close(None)
    assert time.monotonic() - t0 < 1 and s.server is None


def _snapshots():
    import dataclasses
    from bpftrace_hostport.model import ContainerPort, HostPortRule, PodInfo
    pods = [PodInfo("web", "nginx-0", ips=("10.0.1.2", "fd00:1::2"),
                    ports=(ContainerPort("c", 80, "TCP", "http", 8080), ContainerPort("c", 9090, "TCP", "metrics"))),
            PodInfo("kube-system", "ingress", ips=("192.168.1.5",), host_network=True, node="node-a",
                    ports=(ContainerPort("c", 443, "TCP", "https", 443),)),
            PodInfo("web", "nginx-1", ips=("10.0.2.2",), node="node-b",          # another node's
                    ports=(ContainerPort("c", 80, "TCP", "http", 8080),))]
    rules = [HostPortRule("UDP", 5353, "10.0.1.9", 53), HostPortRule("TCP", 8080, "10.0.1.2", 80)]
    return [dataclasses.asdict(p) for p in pods], [dataclasses.asdict(r) for r in rules]


def test_known_mappings_are_exported_at_zero_before_traffic(sinks):
    """A new mapping's first burst must be a difference between two samples for rate() and
    increase(): the pods' and the rules' mappings are there at 0 before any flow."""
    s = sinks()
    pods, rules = _snapshots()
    s.snapshot("pods", pods)
    s.snapshot("rules", rules)
    m = scrape(s)
    web = dict(proto="tcp", host_port="8080", pod_port="80", namespace="web", pod="nginx-0", port_name="http")
    for ip in ("10.0.1.2", "fd00:1::2"):
        for name in ("flows_total", "answered_flows_total", "unanswered_flows_total",
                     "latency_seconds_count", "packets_total"):
            assert value(m, "bpftrace_hostport_" + name, pod_ip=ip, **web) == 0, name
        assert value(m, "bpftrace_hostport_refused_flows_total", pod_ip=ip, refusal="reset", **web) == 0
    dns = dict(proto="udp", host_port="5353", pod_ip="10.0.1.9", pod_port="53", namespace="", pod="")
    assert value(m, "bpftrace_hostport_flows_total", **dns) == 0
    assert value(m, "bpftrace_hostport_refused_flows_total", refusal="port-unreachable", **dns) == 0
    assert len(m["bpftrace_hostport_flows_total"]) == 3            # no series for a hostNetwork pod
    assert value(m, "bpftrace_hostport_misses_total", proto="tcp", host_port="8080", namespace="", pod="") == 0
    assert value(m, "bpftrace_hostport_misses_total", proto="udp", host_port="5353", namespace="", pod="") == 0
    assert value(m, "bpftrace_hostport_misses_total", proto="tcp", host_port="443",
                 namespace="kube-system", pod="ingress") == 0
    s.tick(summary(mapping(flows=200, answered=150, refusals={"reset": 50})))
    m = scrape(s)
    assert value(m, "bpftrace_hostport_flows_total", pod_ip="10.0.1.2", **web) == 200
    assert value(m, "bpftrace_hostport_refused_flows_total", pod_ip="10.0.1.2", refusal="reset", **web) == 50


def test_known_mappings_stay_until_their_pod_and_rule_are_gone(sinks):
    clock = Clock()
    s = sinks(grace_s=60, clock=clock)
    pods, rules = _snapshots()
    s.snapshot("pods", pods)
    s.snapshot("rules", rules)
    clock.now += 3600
    s.tick(summary())
    m = scrape(s)
    assert len(m["bpftrace_hostport_flows_total"]) == 3 and len(m["bpftrace_hostport_misses_total"]) == 3
    s.snapshot("pods", pods[1:])                   # nginx-0 deleted; its rule for 8080 is still there
    clock.now += 61
    s.tick(summary())
    m = scrape(s)
    assert sorted(lab["pod_ip"] for lab, _ in m["bpftrace_hostport_flows_total"]) == ["10.0.1.2", "10.0.1.9"]
    s.snapshot("rules", rules[:1])                 # and its rule removed
    clock.now += 61
    s.tick(summary())
    m = scrape(s)
    assert [lab["pod_ip"] for lab, _ in m["bpftrace_hostport_flows_total"]] == ["10.0.1.9"]
    assert {(lab["host_port"], lab["pod"]) for lab, _ in m["bpftrace_hostport_misses_total"]} == {
        ("5353", ""), ("443", "ingress")}


def test_listen_socket_is_served_and_refused_when_taken():
    from bpftrace_hostport.collect.preflight import listen_socket
    sock = listen_socket("127.0.0.1:0")
    port = sock.getsockname()[1]
    with pytest.raises(UserError, match=rf"^Cannot listen on 127.0.0.1:{port}: address in use; choose another --metrics port\.$"):
        listen_socket(f"127.0.0.1:{port}")
    s = MetricsSink("n", f"127.0.0.1:{port}", sock=sock)
    s.start(NETFILTER)
    try:
        assert s.address == ("127.0.0.1", port) and get(s, "/healthz")[0] == 200
    finally:
        s.close(None)
    with pytest.raises(UserError, match=r"^Bad metrics listen address 'x:y'"):
        listen_socket("x:y")
    unused = MetricsSink("n", "127.0.0.1:0", sock=listen_socket("127.0.0.1:0"))
    unused.close(None)                             # a sink never started closes the socket it was given
    assert unused.sock is None
