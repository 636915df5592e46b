"""The one roll-up (analysis/rollup.py) and its bounded summaries (analysis/dist.py): figures
computed by hand, the rule that combines the kernel's counts with the records, and every way a
capture can be incomplete."""
from __future__ import annotations

import numpy as np
import pytest

from bpftrace_hostport.analysis import dist
from bpftrace_hostport.analysis.rollup import LIVE, Rollup
from bpftrace_hostport.analysis.summary import summary_record
from bpftrace_hostport.records.batch import ADDR, FlowBatch, pack_addr
from tests.samples import flow

T0 = "2026-01-01T00:00:0{}.000000Z"


def batch(*recs) -> FlowBatch:
    return FlowBatch.from_records(list(recs))


def only(fig):
    assert len(fig.mappings) == 1, fig.mappings
    return fig.mappings[0]


def refused(**kw):
    base = dict(answered=False, outcome="refused", refusal="reset", refused_by="pod",
                latency_us=None, refusal_us=40.0)
    base.update(kw)
    return flow(**base)


# ------------------------------------------------------------------------------ summaries

def test_dist_is_exact_while_small_and_within_its_bound_beyond():
    d = dist.Dist()
    d.add(np.array([1000.0, 2000.0, 4000.0]))
    assert d.is_exact and d.quantiles([0.5, 0.9, 0.99]) == pytest.approx([2000.0, 3600.0, 3960.0])
    big = np.random.default_rng(1).lognormal(5, 1.5, dist.EXACT_MAX + 1000)
    d = dist.Dist()
    for part in np.array_split(big, 7):
        d.add(part)
    assert not d.is_exact and len(d) == len(big)
    got = np.array(d.quantiles([0.5, 0.9, 0.99]))
    want = np.quantile(big, [0.5, 0.9, 0.99])
    assert (np.abs(got / want - 1) <= dist.REL_ERROR + 1e-3).all()
    assert d.quantiles([1.0]) == [big.max()]


def test_dists_merge_into_the_same_percentiles():
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(4, 1, 1000), rng.lognormal(6, 1, 500)
    one, two, both = dist.Dist(), dist.Dist(), dist.Dist()
    one.add(a)
    two.add(b)
    both.add(np.concatenate([a, b]))
    one.merge(two)
    assert one.quantiles([0.5, 0.99]) == pytest.approx(both.quantiles([0.5, 0.99]))


def test_top_counts_are_exact_while_they_fit_and_bounded_beyond():
    def addrs(ips):
        return np.array([np.void(pack_addr(ip)) for ip in ips], ADDR), np.full(len(ips), 4, np.uint8)
    t = dist.TopCounts(cap=4)
    ips = [f"10.0.0.{i % 10}" for i in range(1000)] + ["10.0.0.1"] * 500
    a, f = addrs(ips)
    t.add(a, f)
    top = t.top(1)[0]
    assert top[2] <= 600 <= top[2] + t.error        # 10.0.0.1: 600 flows, within the bound
    assert t.error <= t.total / (t.cap + 1)
    exact = dist.TopCounts(cap=100)
    exact.add(a, f)
    assert exact.error == 0 and exact.top(1)[0][2] == 600


def test_grid_coarsens_along_the_ladder_and_rebins_exactly():
    g = dist.Grid()
    g.cover(10 * dist.NS, 20 * dist.NS)
    old = g.shape()
    counts = np.ones((1, old[2]), np.int64)
    g.cover(0, 100_000 * dist.NS)               # about a day: coarser steps
    assert g.step % old[1] == 0 and g.n <= dist.MAX_BUCKETS
    assert dist.rebin(counts, old, g.shape()).sum() == counts.sum()


# ------------------------------------------------------------------------------ the rule

def test_outcomes_latency_and_refusals_per_mapping():
    r = Rollup()
    r.add_flows(batch(flow(latency_us=100.0), flow(latency_us=300.0), refused(),
                      refused(refusal="port-unreachable", icmp_type=3, icmp_code=3),
                      flow(answered=False, latency_us=None), flow(outcome="pending", answered=False)))
    m = only(r.figures())
    assert (m["flows"], m["answered"], m["refused"], m["unanswered"], m["pending"]) == (6, 2, 2, 1, 1)
    assert m["refusals"] == {"port-unreachable": 1, "reset": 1} and m["refused_by"] == {"pod": 2}
    assert m["latency_us"]["p50"] == 200.0 and m["refusal_us"]["max"] == 40.0
    assert m["source_of_counts"] == "kernel"     # the live session: whole by definition


def test_kernel_counts_are_used_only_for_a_whole_run():
    summary = {"type": "summary", "duration_s": 10.0, "lost_events": 1, "mappings": [dict(
        proto="tcp", family=4, host_port=8000, pod_ip="10.22.0.5", pod_port=80, flows=5,
        packets=50, bytes=5000, drops={"NETFILTER_DROP": 3}, answered=2)]}

    def fig(whole: bool):
        r = Rollup()
        s = r.session(("n", "run"))
        s.files = {0: "a"} if whole else {1: "b"}
        s.summary, s.last_index = (summary, 0) if whole else (None, None)
        r.add_flows(batch(flow(), flow()), ("n", "run"))
        return only(r.figures())
    m = fig(True)
    assert (m["flows"], m["packets"], m["bytes"], m["drops"]) == (5, 50, 5000, {"NETFILTER_DROP": 3})
    m = fig(False)              # file 2 of a run whose summary file was not given
    assert (m["flows"], m["packets"], m["bytes"], m["drops"]) == (2, None, None, None)
    assert m["source_of_counts"] == "records"


def test_row_filters_make_every_count_the_records():
    summary = {"type": "summary", "duration_s": 10.0, "mappings": [dict(
        proto="tcp", family=4, host_port=8000, pod_ip="10.22.0.5", pod_port=80, flows=9, packets=90,
        bytes=900, drops={})]}
    r = Rollup()
    s = r.session(("n", "run"))
    s.files, s.summary, s.last_index = {0: "a"}, summary, 0
    r.add_flows(batch(flow()), ("n", "run"))
    m = only(r.figures(rows_filtered=True))
    assert (m["flows"], m["packets"]) == (1, None)


def test_counters_only_adds_the_kernels_outcomes():
    """Metrics alone: the kernel decides answered and refused flows itself, no record is made."""
    r = Rollup()
    r.add_flows(batch(flow(answered=False, latency_us=None)))          # unanswered: a record
    kernel = {"answered_in_kernel_only": True, "mappings": [dict(
        proto="tcp", family=4, host_port=8000, pod_ip="10.22.0.5", pod_port=80, flows=10,
        packets=40, bytes=4000, answered=7, refusals={"reset": 2}, drops={})]}
    m = only(r.figures(kernel=kernel))
    assert (m["flows"], m["answered"], m["refused"], m["unanswered"], m["in_flight"]) == (10, 7, 2, 1, 0)
    assert m["refusals"] == {"reset": 2}


def test_misses_only_row_names_the_owner_and_counts_once_per_port():
    r = Rollup()
    r.add_flows(batch(flow(family=6, client_ip="fd00::a", node_ip="fd00::1", pod_ip="fd00::5")))
    r.add_misses([{"proto": "tcp", "family": 4, "client_ip": "10.0.0.9", "host_port": 9000,
                   "count": 3, "ts": T0.format(2)},
                  {"proto": "tcp", "family": 6, "client_ip": "fd00::9", "host_port": 9000,
                   "count": 2, "ts": T0.format(3)}])
    fig = r.figures(owner=lambda proto, port: ("monitoring", "node-exporter", "metrics"))
    row = next(m for m in fig.mappings if m["pod_ip"] is None)
    assert (row["misses"], row["family"], row["pod_name"]) == (5, None, "node-exporter")
    assert row["top_clients"] == [["10.0.0.9", 3], ["fd00::9", 2]]
    assert fig.totals["misses"] == 5


def test_nodes_have_their_own_spans_and_rates():
    from bpftrace_hostport.records.batch import iso_to_ns
    t0 = iso_to_ns(flow()["ts"]) - dist.NS
    r = Rollup()
    for node, n, secs in (("a", 55, 10), ("b", 10, 100)):
        s = r.session((node, "run"))
        s.started_ns, s.ended_ns = t0, t0 + secs * dist.NS
        s.files = {0: node}
        r.add_flows(FlowBatch.concat([batch(flow())] * n), (node, "run"))
    fig = r.figures()
    rates = {m["node"]: m["flows_per_s"] for m in fig.mappings}
    assert rates == {"a": 5.5, "b": 0.1}
    assert fig.totals["flows_per_s"] == 5.6


def test_the_live_summary_record_is_the_figures():
    r = Rollup(series=False, clients=False)
    r.add_flows(batch(flow(latency_us=100.0), refused()))
    s = summary_record(r.figures(), 2.0, 0)
    m = s["mappings"][0]
    assert s["flows"] == 2 and (m["answered"], m["refused"], m["refusals"]) == (1, 1, {"reset": 1})
    assert "node" not in m and "series" not in m
