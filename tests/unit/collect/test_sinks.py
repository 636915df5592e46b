"""The text outputs of a trace and their pre-flight checks: what a flow line says of its
outcome, the live view's last screen (events, then the summary), its page keys, `--format
none`'s one line, and the output paths refused before anything is loaded."""
import io
import os

import pytest

from bpftrace_hostport.collect import preflight
from bpftrace_hostport.collect.sinks import EndLineSink, LiveSink, NEXT_KEYS, PREV_KEYS, flow_line
from bpftrace_hostport.errors import UserError

FLOW = dict(type="flow", ts="2026-12-08T03:08:20.343000Z", proto="tcp", family=6, client_ip="fd00:167::a",
            client_port=39402, node_ip="fd00:167::1", host_port=8000, pod_ip="fd00:167:1::2", pod_port=80,
            hook="prerouting", answered=False, outcome="refused", refusal="reset", refused_by="pod",
            latency_us=None, refusal_us=12.0, masqueraded=False, snat_ip=None, drop_reason=None,
            pod_namespace="shop", pod_name="web", port_name="http")
SUMMARY = {"type": "summary", "duration_s": 3.0, "lost_events": 0, "flows": 1, "mappings": [
    {"proto": "tcp", "family": 6, "host_port": 8000, "pod_ip": "fd00:167:1::2", "pod_port": 80,
     "pod_namespace": "shop", "pod_name": "web", "port_name": "http", "flows": 1, "answered": 0, "refused": 1,
     "refusals": {"reset": 1}, "refused_by": {"pod": 1}, "unanswered": 0, "pending": 0, "in_flight": 0,
     "packets": 2, "bytes": 120, "misses": 0, "drops": {}, "dropped_flows": {},
     "latency_us": {"p50": None, "p90": None, "p99": None, "max": None}, "flows_per_s": 0.33}]}


def test_a_flow_line_says_what_came_back():
    assert flow_line(FLOW).endswith("[prerouting] REFUSED reset by pod 0.01 ms")
    assert "[fd00:167::a]:39402 -> [fd00:167::1]:8000 => [fd00:167:1::2]:80" in flow_line(FLOW)
    assert flow_line(dict(FLOW, outcome="unanswered", refusal=None, refused_by=None)).endswith("UNANSWERED")
    assert flow_line(dict(FLOW, outcome="answered", latency_us=70.0)).endswith(" 0.07 ms")
    assert flow_line(dict(FLOW, outcome=None, answered=True, latency_us=None)).endswith(" answered")


def test_after_ctrl_c_the_live_view_leaves_the_events_then_the_summary_last():
    out = io.StringIO()
    sink = LiveSink(out, check_hint="sudo bpftrace-hostport check --lab x", keys_from=io.StringIO())
    sink.start({"measures": {}})
    sink.recent_flows.append((FLOW["ts"], flow_line(FLOW)))
    sink.tick(SUMMARY)
    sink.close(SUMMARY)
    text = out.getvalue()
    events, head = text.rindex("latest events (times UTC):"), text.rindex("1 flow over 3 s, 0 lost flows")
    assert events < head
    assert text.rstrip("\n").splitlines()[-1] == "  sudo bpftrace-hostport check --lab x"
    assert sink.keys is None                  # no terminal to read keys from: pages turn by themselves


def test_page_keys_turn_the_page_both_ways():
    sink = LiveSink(io.StringIO(), keys_from=io.StringIO())
    sink.pages = 3
    drawn = []
    sink._draw = lambda: drawn.append(sink.page)
    for key in NEXT_KEYS[:2] + PREV_KEYS[:1] + (b"x",):
        sink._key(key)
    assert drawn == [1, 2, 1]


def test_format_none_ends_with_one_line(tmp_path, capsys):
    class Writer:
        paths = [str(tmp_path / "r.arrow"), str(tmp_path / "r.1.arrow")]
        directory = None

    for p in Writer.paths:
        open(p, "wb").write(b"x" * 600)

    class Rec:
        writer = Writer()
    err = io.StringIO()
    EndLineSink(Rec(), err=err).close(dict(SUMMARY, flows=12, lost_events=1))
    assert err.getvalue() == (f"12 flows, 1 lost flow; recording: 2 files, {Writer.paths[0]}, {Writer.paths[1]} "
                              "(1.2 KiB).\n")
    err = io.StringIO()
    EndLineSink(None, "127.0.0.1:9469", err=err).close(dict(SUMMARY, flows=1))
    assert err.getvalue() == "1 flow, 0 lost flows; metrics were served on 127.0.0.1:9469.\n"


def test_output_paths_are_refused_before_anything_is_loaded(tmp_path):
    with pytest.raises(UserError, match="the directory /nonexistent/dir does not exist; give a path"):
        preflight.record_path("/nonexistent/dir/x.arrow")
    (tmp_path / "fifo").mkdir()
    preflight.record_path(str(tmp_path / "fifo"))                 # a directory: files go in it
    preflight.record_path(str(tmp_path / "new.arrow"))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UserError, match="is not a regular file"):
        preflight.record_path(str(tmp_path / "pipe"))
    with pytest.raises(UserError, match="ready file"):
        preflight.ready_file("/nonexistent/ready")
    with pytest.raises(UserError, match="--print-program shows the real --client networks"):
        preflight.outputs(record=None, ready=None, anonymized=True, print_program=True)
    assert os.listdir(tmp_path / "fifo") == []                    # the probe file is gone again
