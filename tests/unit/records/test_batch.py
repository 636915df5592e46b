"""FlowBatch: columns in, the documented records out, and the Arrow batch in the recording's schema."""
import numpy as np

from bpftrace_hostport.records.batch import FlowBatch, iso_to_ns, ns_to_iso, pack_addr
from bpftrace_hostport.records.schema import field_names
from tests import samples


def flow(**kw):
    """The shared sample flow, with the values these tests check."""
    return samples.flow(**{"ts": "2026-01-01T00:00:01.000123Z", "latency_us": 120.5, "bytes": 300,
                           "pod_namespace": "web", "pod_name": "nginx-0", **kw})


SAMPLES = [
    flow(),
    flow(family=6, proto="udp", client_ip="fd00::a", node_ip="fd00::1", pod_ip="fd00:1::2",
         pod_port=53, answered=False, latency_us=None, masqueraded=True, snat_ip="fd00:1::1",
         pod_namespace=None, pod_name=None, port_name=None, drop_reason="NETFILTER_DROP"),
    flow(hook="output", midstream=True, latency_us=None, packets=None, bytes=None, port_name=None),
]


def test_records_round_trip_in_schema_order():
    out = FlowBatch.from_records(SAMPLES).to_records()
    assert out == SAMPLES
    assert all(list(r) == field_names("flow") for r in out)


def test_concat_reindexes_pods_and_drop_reasons():
    a = FlowBatch.from_records(SAMPLES[:2])
    b = FlowBatch.from_records([flow(pod_name="other", drop_reason="OTHER"), SAMPLES[1]])
    both = FlowBatch.concat([a, b])
    assert both.to_records() == a.to_records() + b.to_records()


def test_arrow_batch_matches_the_recording_schema():
    import pyarrow as pa
    from bpftrace_hostport.records.schema import recording_schema
    rb = pa.record_batch(FlowBatch.from_records(SAMPLES).to_arrow())     # nanoarrow -> pyarrow
    rb.validate(full=True)
    assert rb.schema.equals(recording_schema(), check_metadata=True)
    d = rb.to_pydict()
    assert d["record"] == ["flow"] * 3
    assert d["client_addr"][1] == pack_addr("fd00::a")
    assert d["latency_us"] == [120.5, None, None]
    assert d["packets"] == [4, 4, None]
    assert d["pod_name"] == ["nginx-0", None, "nginx-0"] and d["port_name"] == ["http", None, None]
    assert d["drop_reason"] == [None, "NETFILTER_DROP", None]


def test_time_conversions():
    ns = iso_to_ns("2026-01-01T00:00:01.000123Z")
    assert ns == 1767225601000123000 and ns_to_iso(ns) == "2026-01-01T00:00:01.000123Z"


def test_select_and_empty():
    b = FlowBatch.from_records(SAMPLES)
    assert len(b.select(np.array([True, False, True]))) == 2
    assert FlowBatch.empty().to_records() == [] and len(FlowBatch.concat([])) == 0


def test_group_rows_matches_exact_grouping(monkeypatch):
    from bpftrace_hostport.records import batch as bm
    rng = np.random.default_rng(1)
    addrs = np.array([np.void(pack_addr(f"10.0.0.{i}")) for i in rng.integers(0, 5, 500)])
    ports = rng.integers(0, 3, 500).astype(np.uint16)
    first, inv = bm.group_rows(addrs, ports)
    assert len(first) == len({(a.tobytes(), p) for a, p in zip(addrs, ports)})
    assert all(addrs[first[g]] == a and ports[first[g]] == p for a, p, g in zip(addrs, ports, inv))
    monkeypatch.setattr(bm, "_MIX", np.uint64(0))          # every hash collides: the exact path
    first2, inv2 = bm.group_rows(addrs, ports)
    assert len(first2) == len(first)
    assert all(addrs[first2[g]] == a and ports[first2[g]] == p for a, p, g in zip(addrs, ports, inv2))


def test_protocol_spellings_come_from_one_table():
    from bpftrace_hostport import proto
    assert [proto.k8s(v) for v in ("tcp", "UDP", "6", 17, " sctp ", "icmp", "99", True, None)] == \
        ["TCP", "UDP", "TCP", "UDP", "SCTP", None, None, None, None]
    assert proto.name(6) == "tcp" and proto.number("udp") == 17 and proto.name(99) == "99"


def test_empty_batches_share_no_state_that_can_change():
    a, b = FlowBatch.empty(), FlowBatch.empty()
    a.cols["pod"] = np.zeros(3, np.int32)
    a.pods.append(("ns", "name", None))
    assert len(b) == 0 and len(b["pod"]) == 0 and b.pods == []
    assert len(FlowBatch.empty()["pod"]) == 0
