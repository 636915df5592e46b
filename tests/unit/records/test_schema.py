"""The declared schema is the one every writer uses and the README shows."""
from pathlib import Path

from bpftrace_hostport.records.batch import FlowBatch
from bpftrace_hostport.records.schema import RECORDS, field_names, markdown_table

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


def test_readme_tables_are_the_declared_schema():
    for kind in RECORDS:
        assert markdown_table(kind) in README, f"README's {kind} table differs from records/schema.py"


def test_flow_records_carry_exactly_the_declared_fields():
    rec = {"type": "flow", "ts": "2026-01-01T00:00:00.000000Z", "proto": "udp", "family": 4,
           "client_ip": "10.0.0.9", "client_port": 5, "node_ip": "10.0.0.1", "host_port": 53,
           "pod_ip": "10.0.1.2", "pod_port": 53, "hook": "output", "answered": False}
    out = FlowBatch.from_records([rec]).to_records()[0]
    assert list(out) == field_names("flow")


def test_header_and_summary_fields(tmp_path):
    from bpftrace_hostport.collect.session import TraceOptions, capture_header

    class B:
        name = "netfilter"
        measures = {"latency": True, "packets": True, "misses": True, "drops": True}
    h = capture_header(TraceOptions(), B(), 0)
    assert list(h) == field_names("capture")
    # what shapes the capture, nothing else: no kubeconfig, token or anonymization key
    assert set(h["options"]) == {"host_ports", "protos", "clients", "timeout_s"}
