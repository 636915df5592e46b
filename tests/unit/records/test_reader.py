"""The reader: JSON-lines captures (schema 1 and 2), detection, refusals, several files, stdin."""
import io

import orjson
import pandas as pd
import pyarrow as pa
import pytest

from bpftrace_hostport.records.batch import FlowBatch
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records.reader import detect, iter_flow_batches, load
from bpftrace_hostport.records.schema import SCHEMA_VERSION, recording_schema

from tests.samples import outcomes

from .test_recording import HEADER, MISS, SAMPLE, SUMMARY, records, write

# A capture as the tracer wrote it before headers existed (schema 1): no header line, flows
# without `midstream`, misses without `hook`, a summary without `backend`.
OLD_FLOW = {"type": "flow", "ts": "2024-05-01T12:00:00.000000Z", "proto": "tcp", "family": 4,
            "client_ip": "192.168.1.10", "client_port": 40000, "node_ip": "192.168.1.2",
            "host_port": 8000, "pod_ip": "10.22.0.5", "pod_port": 80, "hook": "prerouting",
            "answered": True, "latency_us": 100.0, "masqueraded": False, "snat_ip": None,
            "packets": 4, "bytes": 400, "pod_namespace": None, "pod_name": None,
            "port_name": None, "drop_reason": None}
OLD_MISS = {"type": "miss", "ts": "2024-05-01T12:00:01Z", "proto": "tcp", "family": 4,
            "client_ip": "192.168.1.10", "node_ip": "192.168.1.2", "host_port": 8000, "count": 1}
OLD_SUMMARY = {"type": "summary", "duration_s": 10.0, "lost_events": 0, "flows": 1, "mappings": [
    {"proto": "tcp", "family": 4, "host_port": 8000, "pod_ip": "10.22.0.5", "pod_port": 80,
     "pod_namespace": None, "pod_name": None, "port_name": None, "flows": 1, "answered": 1,
     "packets": 4, "bytes": 400, "misses": 1, "drops": {},
     "latency_us": {"p50": 100.0, "p90": 100.0, "p99": 100.0, "max": 100.0}, "flows_per_s": 0.1}]}


def lines(*recs) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


def jsonl(tmp_path, data: bytes, name="cap.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_schema_1_capture_reads_with_a_synthesized_header(tmp_path):
    path = jsonl(tmp_path, lines(OLD_FLOW, OLD_MISS, OLD_SUMMARY))
    cap = load([path])
    assert (cap.notes, cap.truncated) == ([], False)
    assert records(cap.flows) == [outcomes(dict(OLD_FLOW, midstream=False))]
    assert records(cap.misses, "miss")[0]["hook"] == "prerouting"
    assert cap.headers == [{"type": "capture", "schema": 1, "tool": None, "session": None, "backend": "netfilter",
                            "node": None, "kernel": None, "netns": None, "started": None,
                            "options": {}, "measures": dict.fromkeys(
                                ("latency", "packets", "misses", "drops"), True), "source": path}]
    assert cap.summaries[0]["mappings"] == OLD_SUMMARY["mappings"] and cap.summaries[0]["node"] == ""
    assert detect(path) == "jsonl"


def test_schema_1_conntrack_summary_names_the_backend(tmp_path):
    cap = load([jsonl(tmp_path, lines(OLD_FLOW, dict(OLD_SUMMARY, backend="conntrack")))])
    assert cap.headers[0]["backend"] == "conntrack" and not any(cap.headers[0]["measures"].values())


def test_json_lines_and_recording_give_the_same_frames(tmp_path):
    write(tmp_path / "rec.arrow", [FlowBatch.from_records(SAMPLE)])
    path = jsonl(tmp_path, lines(HEADER, *SAMPLE, MISS, SUMMARY))
    a, b = load([str(tmp_path / "rec.arrow")]), load([path])
    cols = [c for c in a.flows.columns if c != "source"]
    pd.testing.assert_frame_equal(a.flows[cols], b.flows[cols])
    mcols = [c for c in a.misses.columns if c != "source"]
    pd.testing.assert_frame_equal(a.misses[mcols], b.misses[mcols])
    assert b.headers[0]["node"] == "node-a" and set(b.flows["node"]) == {"node-a"}
    with pytest.raises(UserError, match="line 2: field ts should be an ISO 8601 time"):
        list(iter_flow_batches(jsonl(tmp_path, lines(HEADER, dict(SAMPLE[0], ts="soon")), "bad.jsonl")))
    batches = list(iter_flow_batches(path))
    assert sum(x.num_rows for x in batches) == len(SAMPLE)
    assert batches[0].schema.equals(recording_schema(), check_metadata=False)


@pytest.mark.parametrize("change, message", [
    ({"host_port": "8000"}, "line 2: field host_port should be an integer, not \"8000\""),
    ({"answered": 1}, "line 2: field answered should be true or false, not 1"),
    ({"latency_us": "fast"}, "line 2: field latency_us should be a number or null, not \"fast\""),
    ({"client_ip": None}, "line 2: field client_ip should be a string, not null"),
    ({"proto": "icmp"}, "line 2: field proto should be one of tcp, udp, sctp, not \"icmp\""),
    ({"ts": "yesterday"}, "line 2: field ts should be an ISO 8601 time with its zone (years 1678 to 2261), such as 2026-01-01T00:00:00Z, not \"yesterday\""),
    ({"family": True}, "line 2: field family should be an integer, not true"),
])
def test_bad_field_is_one_sentence_with_its_line(tmp_path, change, message):
    path = jsonl(tmp_path, lines(OLD_FLOW, dict(OLD_FLOW, **change), OLD_SUMMARY))
    with pytest.raises(UserError) as e:
        load([path])
    assert str(e.value) == f"{path} {message}; give the tracer's JSON-lines output or fix that line."


def test_missing_field_and_bad_summary_are_named(tmp_path):
    rec = dict(OLD_FLOW)
    del rec["pod_ip"]
    with pytest.raises(UserError, match=r"line 1: field pod_ip is missing"):
        load([jsonl(tmp_path, lines(rec))])
    bad = dict(OLD_SUMMARY, mappings=[dict(OLD_SUMMARY["mappings"][0], flows="1")])
    with pytest.raises(UserError, match=r"line 2, mappings\[0\]: field flows should be an integer"):
        load([jsonl(tmp_path, lines(OLD_FLOW, bad))])
    with pytest.raises(UserError, match=r"line 1: field schema should be an integer"):
        load([jsonl(tmp_path, lines(dict(HEADER, schema="2")))])


def test_integer_too_large_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="line 1: field packets should be an integer of 0 or more, not "
                                        "18446744073709551615"):
        load([jsonl(tmp_path, lines(dict(OLD_FLOW, packets=2**64 - 1)))])


def test_schema_2_requires_what_schema_1_may_lack(tmp_path):
    rec = dict(OLD_FLOW)
    del rec["hook"]
    assert len(load([jsonl(tmp_path, lines(rec))]).flows) == 1
    with pytest.raises(UserError, match="line 2: field hook is missing"):
        load([jsonl(tmp_path, lines(HEADER, rec))])


def test_cut_last_line_is_skipped_with_a_note(tmp_path):
    data = lines(OLD_FLOW, OLD_FLOW, OLD_SUMMARY)
    path = jsonl(tmp_path, data[:len(lines(OLD_FLOW)) * 2 + 30])
    cap = load([path])
    assert len(cap.flows) == 2 and cap.truncated
    assert cap.notes == [f"{path} ends in a cut line 3 (the capture was interrupted); it was skipped."]


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    path = jsonl(tmp_path, lines(OLD_FLOW) + b"{not json\n" + lines(OLD_SUMMARY))
    with pytest.raises(UserError, match=r"line 2 is not JSON"):
        load([path])
    with pytest.raises(UserError, match=r"line 2 is not a JSON object"):
        load([jsonl(tmp_path, lines(OLD_FLOW) + b"[1, 2]\n")])


def test_capture_without_summary_is_truncated(tmp_path):
    path = jsonl(tmp_path, lines(HEADER, SAMPLE[0]))
    cap = load([path])
    assert cap.truncated and cap.notes == [f"{path} has no summary record (the tracer was stopped "
                                           "before it finished); figures come from its flow records."]


def test_neither_format_is_refused(tmp_path):
    path = jsonl(tmp_path, b"PK\x03\x04 a zip file", "x.zip")
    with pytest.raises(UserError, match="is neither a recording nor a JSON-lines capture"):
        load([path])
    with pytest.raises(UserError, match="does not exist"):
        load([str(tmp_path / "nothing.arrow")])
    with pytest.raises(UserError, match="holds no .arrow, .jsonl or .parquet files"):
        (tmp_path / "empty").mkdir()
        load([str(tmp_path / "empty")])


def stream(path, metadata):
    schema = recording_schema().with_metadata(metadata)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema):
        pass


def test_foreign_or_newer_streams_are_refused(tmp_path):
    stream(tmp_path / "a.arrow", {"format": "something else", "schema": "2"})
    with pytest.raises(UserError, match="is an Arrow stream but not a bpftrace-hostport recording"):
        load([str(tmp_path / "a.arrow")])
    stream(tmp_path / "b.arrow", {"format": "bpftrace-hostport-recording", "schema": str(SCHEMA_VERSION + 1)})
    with pytest.raises(UserError, match=f"recording schema {SCHEMA_VERSION + 1}; this one reads up to"):
        load([str(tmp_path / "b.arrow")])
    with pytest.raises(UserError, match="newer bpftrace-hostport"):
        load([jsonl(tmp_path, lines(dict(HEADER, schema=SCHEMA_VERSION + 1)))])


def test_several_files_and_stdin(tmp_path):
    write(tmp_path / "rec.arrow", [FlowBatch.from_records(SAMPLE)])
    other = jsonl(tmp_path, lines(dict(HEADER, node="node-b"), SAMPLE[0], OLD_SUMMARY))
    cap = load([str(tmp_path / "rec.arrow"), other])
    assert list(cap.flows["node"]) == ["node-a"] * len(SAMPLE) + ["node-b"]
    assert list(cap.flows["source"]) == [str(tmp_path / "rec.arrow")] * len(SAMPLE) + [other]
    assert [s["node"] for s in cap.summaries] == ["node-a", "node-b"] and cap.flows.index.is_unique
    for data in ((tmp_path / "rec.arrow").read_bytes(), (tmp_path / "cap.jsonl").read_bytes()):
        piped = load(["-"], stdin=io.BytesIO(data))
        assert not piped.truncated and set(piped.flows["source"]) == {"<stdin>"}


def test_an_empty_file_is_refused_not_read_as_an_empty_capture(tmp_path):
    path = jsonl(tmp_path, b"", "rec.arrow")
    with pytest.raises(UserError, match=r"rec.arrow is empty \(the tracer wrote nothing\)"):
        load([path])
