"""Unit tests for analysis/aggregate.py and analysis/render.py (no kernel, no cluster)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.analysis.aggregate import summarize
from bpftrace_hostport.analysis.render import render_summary
from bpftrace_hostport.records.reader import flow_records, load, miss_records


def flow(**kw):
    rec = {
        "type": "flow", "ts": "2024-05-01T12:00:00.000000Z", "proto": "tcp", "family": 4,
        "client_ip": "192.168.1.10", "client_port": 40000, "node_ip": "192.168.1.2",
        "host_port": 8000, "pod_ip": "10.22.0.5", "pod_port": 80, "hook": "prerouting",
        "answered": True, "latency_us": 100.0, "masqueraded": False, "snat_ip": None,
        "packets": 4, "bytes": 400, "pod_namespace": None, "pod_name": None,
        "port_name": None, "drop_reason": None,
    }
    rec.update(kw)
    return rec


def miss(**kw):
    rec = {"type": "miss", "ts": "2024-05-01T12:00:01Z", "proto": "tcp", "family": 4,
           "client_ip": "192.168.1.10", "node_ip": "192.168.1.2", "host_port": 8000, "count": 1}
    rec.update(kw)
    return rec


def counter(**kw):
    rec = {"proto": "tcp", "family": 4, "host_port": 8000, "pod_ip": "10.22.0.5",
           "pod_port": 80, "flows": 0, "packets": 0, "bytes": 0}
    rec.update(kw)
    return rec


def drop(**kw):
    rec = {"proto": "tcp", "family": 4, "host_port": 8000, "pod_ip": "10.22.0.5",
           "pod_port": 80, "reason": "NETFILTER_DROP", "count": 1}
    rec.update(kw)
    return rec


def only(summary):
    assert len(summary["mappings"]) == 1
    return summary["mappings"][0]


def assert_plain(value):
    """Only plain JSON types all the way down (no numpy scalars, no NaN)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), (value, type(value))
        if type(value) is float:
            assert value == value


# ----------------------------------------------------------------------------- summarize

def test_empty_input():
    s = summarize([], [], None, None, 5.0, 0)
    assert s == {"type": "summary", "duration_s": 5.0, "lost_events": 0, "flows": 0, "mappings": []}
    assert summarize([], [], [], [], 0, 0)["mappings"] == []


def test_percentiles_on_known_latencies():
    lat = [float(x) for x in range(100, 1100, 100)]   # 100 .. 1000 us
    s = summarize([flow(latency_us=v) for v in lat], [], None, None, 10, 0)
    m = only(s)
    expected = {q: round(float(np.percentile(lat, p)), 1)
                for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
    assert m["latency_us"] == {**expected, "max": 1000.0}
    assert m["latency_us"] == {"p50": 550.0, "p90": 910.0, "p99": 991.0, "max": 1000.0}
    assert m["flows"] == 10 and m["answered"] == 10
    assert m["flows_per_s"] == 1.0


def test_latency_rounded_to_one_decimal():
    m = only(summarize([flow(latency_us=10.04), flow(latency_us=10.07)], [], None, None, 1, 0))
    assert m["latency_us"]["max"] == 10.1
    assert m["latency_us"]["p50"] == 10.1   # 10.055 -> 10.1


def test_answered_unanswered_mix():
    flows = [flow(latency_us=200.0), flow(latency_us=400.0),
             flow(answered=False, latency_us=None), flow(answered=False, latency_us=None)]
    m = only(summarize(flows, [], None, None, 4, 0))
    assert m["flows"] == 4
    assert m["answered"] == 2
    assert m["latency_us"] == {"p50": 300.0, "p90": 380.0, "p99": 398.0, "max": 400.0}
    assert m["flows_per_s"] == 1.0


def test_no_answered_flow_gives_null_latency():
    m = only(summarize([flow(answered=False, latency_us=None)], [], None, None, 1, 0))
    assert m["answered"] == 0
    assert m["latency_us"] == {"p50": None, "p90": None, "p99": None, "max": None}


def test_packets_bytes_from_flow_records_without_counters():
    flows = [flow(packets=3, bytes=300), flow(packets=5, bytes=700)]
    m = only(summarize(flows, [], None, None, 1, 0))
    assert (m["flows"], m["packets"], m["bytes"]) == (2, 8, 1000)


def test_counters_override_flow_record_totals():
    flows = [flow(packets=3, bytes=300), flow(packets=5, bytes=700)]
    counters = [counter(flows=5, packets=120, bytes=64000)]
    m = only(summarize(flows, [], counters, None, 1, 0))
    assert (m["flows"], m["packets"], m["bytes"]) == (5, 120, 64000)
    assert m["answered"] == 2                      # answered still from flow records


def test_counter_flows_never_below_flow_record_count():
    flows = [flow(), flow(), flow()]
    m = only(summarize(flows, [], [counter(flows=1, packets=9, bytes=90)], None, 1, 0))
    assert m["flows"] == 3
    assert m["packets"] == 9


def test_counters_only_for_other_key_leave_flow_totals_alone():
    flows = [flow(packets=3, bytes=300)]
    counters = [counter(pod_ip="10.22.0.9", flows=2, packets=10, bytes=1000)]
    s = summarize(flows, [], counters, None, 2, 0)
    assert [m["pod_ip"] for m in s["mappings"]] == ["10.22.0.5", "10.22.0.9"]
    a, b = s["mappings"]
    assert (a["flows"], a["packets"], a["bytes"]) == (1, 3, 300)
    assert (b["flows"], b["packets"], b["bytes"], b["answered"]) == (2, 10, 1000, 0)
    assert s["flows"] == 3


def test_misses_attached_to_every_mapping_of_that_port_any_family():
    flows = [flow(), flow(family=6, pod_ip="fd00:10:22::5", client_ip="fd00::1")]
    misses = [miss(count=2), miss(count=3, family=6), miss(host_port=9000, proto="udp", count=1),
              miss(proto="udp", count=7)]   # udp/8000 is not tcp/8000
    s = summarize(flows, misses, None, None, 1, 0)
    by = {(m["proto"], m["host_port"], m["pod_ip"]): m for m in s["mappings"]}
    assert by[("tcp", 8000, "10.22.0.5")]["misses"] == 5
    assert by[("tcp", 8000, "fd00:10:22::5")]["misses"] == 5
    assert by[("udp", 8000, None)]["misses"] == 7
    assert by[("udp", 9000, None)]["misses"] == 1


def test_misses_only_row_for_host_network_port():
    s = summarize([flow()], [miss(host_port=9090, count=4), miss(host_port=9090, count=2)],
                  None, None, 2, 0)
    assert [(m["proto"], m["host_port"]) for m in s["mappings"]] == [("tcp", 8000), ("tcp", 9090)]
    row = s["mappings"][1]
    assert row["pod_ip"] is None and row["pod_port"] is None
    assert row["family"] == 4
    assert row["flows"] == 0 and row["answered"] == 0 and row["misses"] == 6
    assert row["packets"] == 0 and row["bytes"] == 0 and row["drops"] == {}
    assert row["latency_us"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert s["mappings"][0]["misses"] == 0
    assert s["flows"] == 1


def test_misses_only_row_mixed_families_has_no_family():
    row = only(summarize([], [miss(count=1), miss(family=6, count=1)], None, None, 1, 0))
    assert row["family"] is None and row["misses"] == 2


def test_drops_counted_from_flow_records():
    flows = [flow(), flow(answered=False, latency_us=None, drop_reason="NETFILTER_DROP"),
             flow(answered=False, latency_us=None, drop_reason="NETFILTER_DROP"),
             flow(answered=False, latency_us=None, drop_reason="NO_SOCKET")]
    m = only(summarize(flows, [], None, None, 1, 0))
    assert m["drops"] == {"NETFILTER_DROP": 2, "NO_SOCKET": 1}


def test_drops_list_replaces_flow_record_reasons():
    flows = [flow(answered=False, latency_us=None, drop_reason="NETFILTER_DROP")]
    drops = [drop(count=3), drop(count=2), drop(reason="TCP_INVALID_SEQUENCE", count=1),
             drop(pod_ip="10.22.0.7", count=4)]
    s = summarize(flows, [], None, drops, 1, 0)
    by = {m["pod_ip"]: m for m in s["mappings"]}
    assert by["10.22.0.5"]["drops"] == {"NETFILTER_DROP": 5, "TCP_INVALID_SEQUENCE": 1}
    assert by["10.22.0.7"]["drops"] == {"NETFILTER_DROP": 4}    # drop-only key gets a row
    assert by["10.22.0.7"]["flows"] == 0
    # An empty drops list means "the kernel saw none": flow-record reasons are not used.
    assert only(summarize(flows, [], None, [], 1, 0))["drops"] == {}


def test_pod_names_from_flow_records_first_non_null():
    flows = [flow(), flow(pod_namespace="web", pod_name="nginx-1", port_name=None),
             flow(pod_namespace="other", pod_name="x", port_name="http")]
    m = only(summarize(flows, [], None, None, 1, 0))
    assert (m["pod_namespace"], m["pod_name"], m["port_name"]) == ("web", "nginx-1", "http")


def test_pod_names_callback():
    calls = []

    def lookup(proto, pod_ip, pod_port):
        calls.append((proto, pod_ip, pod_port))
        if pod_ip == "10.22.0.5":
            return ("web", "nginx-1", "http")
        return None

    flows = [flow(), flow(pod_ip="10.22.0.6")]
    s = summarize(flows, [miss(host_port=9090)], None, None, 1, 0, pod_names=lookup)
    by = {m["pod_ip"]: m for m in s["mappings"]}
    assert (by["10.22.0.5"]["pod_namespace"], by["10.22.0.5"]["pod_name"],
            by["10.22.0.5"]["port_name"]) == ("web", "nginx-1", "http")
    assert by["10.22.0.6"]["pod_name"] is None
    assert by[None]["pod_name"] is None
    # Called once per mapping with a pod side; never for the misses-only row.
    assert sorted(calls) == [("tcp", "10.22.0.5", 80), ("tcp", "10.22.0.6", 80)]


def test_pod_names_callback_not_needed_when_records_have_names():
    def lookup(*args):
        raise AssertionError("should not be called")

    flows = [flow(pod_namespace="web", pod_name="nginx-1", port_name="http")]
    m = only(summarize(flows, [], None, None, 1, 0, pod_names=lookup))
    assert m["pod_name"] == "nginx-1"


def test_pod_names_callback_fills_only_missing_fields():
    flows = [flow(pod_namespace="web", pod_name="nginx-1")]
    m = only(summarize(flows, [], None, None, 1, 0,
                       pod_names=lambda *a: ("ignored", "ignored", "http")))
    assert (m["pod_namespace"], m["pod_name"], m["port_name"]) == ("web", "nginx-1", "http")


def test_ipv6_mapping():
    flows = [flow(family=6, client_ip="fd00::10", node_ip="fd00::2", pod_ip="fd00:10:22::5",
                  latency_us=50.0),
             flow(family=6, client_ip="fd00::11", node_ip="fd00::2", pod_ip="fd00:10:22::5",
                  latency_us=150.0)]
    counters = [counter(family=6, pod_ip="fd00:10:22::5", flows=2, packets=20, bytes=2000)]
    s = summarize(flows + [flow()], [], counters, None, 2, 0)
    assert [(m["family"], m["pod_ip"]) for m in s["mappings"]] == [(4, "10.22.0.5"),
                                                                   (6, "fd00:10:22::5")]
    m6 = s["mappings"][1]
    assert (m6["flows"], m6["packets"], m6["bytes"]) == (2, 20, 2000)
    assert m6["latency_us"]["p50"] == 100.0
    # The IPv4 mapping has no counter row: its totals come from its flow record.
    assert s["mappings"][0]["packets"] == 4


def test_group_key_and_sort_order():
    flows = [flow(proto="udp", host_port=53, pod_ip="10.22.0.3", pod_port=53),
             flow(host_port=8000, pod_ip="10.22.0.10"),
             flow(host_port=8000, pod_ip="10.22.0.9"),
             flow(host_port=443, pod_ip="10.22.0.9", pod_port=8443),
             flow(host_port=8000, pod_ip="10.22.0.9", pod_port=8080),
             flow(proto="sctp", host_port=3868, pod_ip="10.22.0.4", pod_port=3868)]
    s = summarize(flows, [], None, None, 1, 0)
    keys = [(m["proto"], m["host_port"], m["pod_ip"], m["pod_port"]) for m in s["mappings"]]
    assert keys == [("sctp", 3868, "10.22.0.4", 3868),
                    ("tcp", 443, "10.22.0.9", 8443),
                    ("tcp", 8000, "10.22.0.9", 80),
                    ("tcp", 8000, "10.22.0.9", 8080),
                    ("tcp", 8000, "10.22.0.10", 80),
                    ("udp", 53, "10.22.0.3", 53)]
    assert s["flows"] == 6


def test_mapping_fields_and_header():
    s = summarize([flow()], [], None, None, 2.34567, 7)
    assert s["type"] == "summary"
    assert s["duration_s"] == 2.346
    assert s["lost_events"] == 7
    assert list(only(s)) == ["proto", "family", "host_port", "pod_ip", "pod_port",
                             "pod_namespace", "pod_name", "port_name", "flows", "answered",
                             "packets", "bytes", "misses", "drops", "latency_us", "flows_per_s"]


def test_zero_duration_has_no_rate():
    assert only(summarize([flow()], [], None, None, 0, 0))["flows_per_s"] is None


def test_output_is_plain_json():
    flows = [flow(latency_us=float(i)) for i in range(1, 8)]
    flows += [flow(answered=False, latency_us=None, drop_reason="NETFILTER_DROP"),
              flow(family=6, pod_ip="fd00::5", pod_name="p", pod_namespace="n")]
    s = summarize(flows, [miss(count=3), miss(host_port=9999, count=2)],
                  [counter(flows=10, packets=100, bytes=10000)],
                  [drop(count=2)], 3.0, 1, pod_names=lambda *a: None)
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s
    assert_plain(s)


def test_numpy_input_values_come_out_plain():
    flows = [flow(latency_us=np.float64(10.0), packets=np.int64(2), bytes=np.int64(20),
                  host_port=np.int64(8000), pod_port=np.int32(80), family=np.int64(4))]
    s = summarize(flows, [], [counter(flows=np.int64(1), packets=np.int64(3), bytes=np.int64(30))],
                  None, np.float64(1.0), np.int64(0))
    json.dumps(s, allow_nan=False)
    assert_plain(s)
    assert only(s)["packets"] == 3


# ----------------------------------------------------------------------------- render_summary

def test_render_table_cells():
    flows = [flow(latency_us=1000.0, pod_namespace="web", pod_name="nginx-1", port_name="http"),
             flow(latency_us=3000.0),
             flow(answered=False, latency_us=None, drop_reason="NETFILTER_DROP")]
    counters = [counter(flows=3, packets=10, bytes=1229)]
    s = summarize(flows, [miss(count=2)], counters, None, 1.5, 0)
    text = render_summary(s, width=None)
    for cell in ("MAPPING", "POD", "FLOWS", "ANSWERED", "P50 ms", "P90 ms", "P99 ms", "MAX ms", "MISSES",
                 "DROPS", "PACKETS", "BYTES", "AVG flows/s",
                 "tcp :8000 -> 10.22.0.5:80", "web/nginx-1 (http)",
                 "2.00", "2.80", "2.98", "3.00",       # ms, 2 decimals
                 "NETFILTER_DROP:1", "1.2 KiB", "2.00"):
        assert cell in text, cell
    row = next(line for line in text.splitlines() if line.startswith("tcp :8000"))
    assert row.split()[6:9] == ["3", "2", "2.00"]   # FLOWS, ANSWERED, P50
    assert text.splitlines()[0] == "3 flows over 1.5 s, 0 lost events"
    assert "lost" not in "\n".join(text.splitlines()[1:])
    assert "got no DNAT" not in text
    # the drop is a hint, with the check command to run
    assert "1 packet dropped after DNAT (NETFILTER_DROP 1)" in text
    assert text.rstrip().endswith("sudo bpftrace-hostport check")


def test_render_unknown_pod_and_no_latency():
    s = summarize([flow(answered=False, latency_us=None, bytes=512)], [], None, None, 1, 0)
    row = next(line for line in render_summary(s, None).splitlines() if line.startswith("tcp :8000"))
    cells = row.split()
    assert cells[4] == "-"                       # POD
    assert cells[7:11] == ["-", "-", "-", "-"]   # P50 P90 P99 MAX
    assert "512 B" in row


def test_render_ipv6_mapping():
    s = summarize([flow(family=6, pod_ip="fd00:10:22::5", pod_port=8080)], [], None, None, 1, 0)
    assert "tcp :8000 -> [fd00:10:22::5]:8080" in render_summary(s, width=160)


def test_render_lost_events_warning():
    s = summarize([flow()], [], None, None, 10, 42)
    lines = render_summary(s, None).splitlines()
    assert lines[0] == "1 flow over 10 s, 42 lost events"
    assert "42 events were lost" in lines[1] and "--flow-table" in lines[1] and "ring buffer" in lines[1]
    assert render_summary(summarize([flow()], [], None, None, 10, 1), None).splitlines()[:2] == [
        "1 flow over 10 s, 1 lost event",
        "Warning: 1 event was lost, so flow counts and latencies are incomplete; rerun with a bigger "
        "--flow-table and a bigger ring buffer to reduce losses."]


def test_render_misses_note_for_port_without_mapping():
    s = summarize([flow()], [miss(count=1), miss(host_port=8080, count=3), miss(host_port=8080, count=2)],
                  None, None, 1, 0)
    text = render_summary(s, None, check_hint="sudo bpftrace-hostport check --lab demo")
    assert ("hostPort 8080/tcp: 5 connections got no DNAT and no pod is known to own the port: a pod whose "
            "DNAT rule is missing, or a process on the node that is no pod.") in text
    assert "hostPort 8000/tcp" not in text          # 8000 has a mapping: no note
    row = next(line for line in text.splitlines() if line.startswith("tcp :8080"))
    assert "no DNAT" in row
    assert text.splitlines()[-2:] == ["For the diagnosis and the exact fix, run on the node:",
                                      "  sudo bpftrace-hostport check --lab demo"]


def test_render_names_the_hostnetwork_owner_and_a_declared_port_without_rule():
    from bpftrace_hostport.model import ContainerPort, PodInfo
    s = summarize([flow()], [miss(host_port=9000, count=2), miss(host_port=9090, count=1)], None, None, 1, 0)
    owner = next(m for m in s["mappings"] if m["host_port"] == 9000)
    owner.update(pod_namespace="lab", pod_name="hostnet-web", port_name="http")
    pods = [PodInfo("lab", "web-extra", ips=("10.22.0.9",), phase="Running",
                    ports=(ContainerPort("web", 8080, host_port=9090),)),
            PodInfo("web", "nginx-1", ips=("10.22.0.5",), phase="Running")]
    text = render_summary(s, None, pods=pods)
    row = next(line for line in text.splitlines() if line.startswith("tcp :9000"))
    assert "hostNetwork lab/hostnet-web (http)" in row
    assert "hostPort 9000/tcp: 2 connections got no DNAT: hostNetwork pod lab/hostnet-web (http) owns" in text
    assert ("hostPort 9090/tcp: 1 connection got no DNAT, although pod lab/web-extra declares this hostPort: "
            "its DNAT rule is missing (check: hostport-no-rule).") in text


def test_render_flags_flows_to_an_ip_no_live_pod_has():
    from bpftrace_hostport.model import PodInfo
    flows = [flow(proto="udp", host_port=5353, pod_ip="10.22.0.3", pod_port=53, answered=False, latency_us=None),
             flow(proto="udp", host_port=5353, pod_ip="10.22.0.4", pod_port=53, pod_namespace="lab",
                  pod_name="dns-v2")]
    s = summarize(flows, [], None, None, 1, 0)
    text = render_summary(s, None)           # no pod list: an unnamed target among named ones
    assert "hostPort 5353/udp -> 10.22.0.3:53: 1 flow (none answered) went to an IP no live pod has" in text
    assert "10.22.0.4:53: 1 flow" not in text
    # With the pods, the pod list decides.
    text = render_summary(s, None, pods=[PodInfo("lab", "dns-v2", ips=("10.22.0.4",), phase="Running")])
    assert "-> 10.22.0.3:53: 1 flow (none answered)" in text and "-> 10.22.0.4:53: 1 flow" not in text
    text = render_summary(s, None, pods=[PodInfo("lab", "dns-v1", ips=("10.22.0.3",), phase="Running"),
                                         PodInfo("lab", "dns-v2", ips=("10.22.0.4",), phase="Running")])
    assert "no live pod" not in text and "bpftrace-hostport check" not in text


def test_render_empty_summary():
    text = render_summary(summarize([], [], None, None, 0, 0))
    assert text.splitlines()[0] == "0 flows over 0 s, 0 lost events"
    assert "MAPPING" not in text


def test_render_human_bytes():
    from bpftrace_hostport.analysis.render import human_bytes
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1229) == "1.2 KiB"
    assert human_bytes(5 * 1024 ** 2) == "5.0 MiB"
    assert human_bytes(3 * 1024 ** 3) == "3.0 GiB"


def test_render_fits_width_and_keeps_all_columns():
    flows = [flow(pod_namespace="kube-system", pod_name="nginx-hostport-7d4b9c5f8-x2x9z",
                  port_name="http", drop_reason="NETFILTER_DROP")]
    s = summarize(flows, [], None, None, 1, 0)
    for width in (40, 80, 100, 120, 160):
        text = render_summary(s, width=width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert "AVG" in text and "flows/s" in text and "1.00" in text and "…" not in text
        # the pod's name may wrap after a dash, never lose a character
        for piece in ("kube-system/", "nginx-", "hostport-", "7d4b9c5f8-x2x9z", "(http)", "NETFILTER_DROP:1"):
            assert piece in text, (width, piece)


def test_render_width_defaults_to_the_terminal(monkeypatch):
    flows = [flow(pod_namespace="kube-system", pod_name="nginx-hostport-7d4b9c5f8-x2x9z", port_name="http")]
    s = summarize(flows, [], None, None, 1, 0)
    monkeypatch.setenv("COLUMNS", "200")
    wide = render_summary(s)
    assert wide == render_summary(s, 200) and "-[ mapping 1 ]" not in wide
    monkeypatch.setenv("COLUMNS", "80")
    assert render_summary(s) == render_summary(s, 80) and "-[ mapping 1 ]" in render_summary(s)
    monkeypatch.delenv("COLUMNS")
    assert render_summary(s) == render_summary(s, None)         # not a terminal: no limit


def test_render_accepts_json_roundtrip():
    s = summarize([flow()], [miss(host_port=9000)], None, None, 1, 1)
    assert render_summary(json.loads(json.dumps(s))) == render_summary(s)


# ------------------------------------------------------- captures read back (records/reader.py)

def _write(tmp_path, lines):
    p = tmp_path / "trace.jsonl"
    p.write_text("".join(line + "\n" for line in lines))
    return p


def _flows(cap):
    return list(flow_records(cap.flows))


def test_capture_read_back_keeps_records_and_the_last_summary(tmp_path):
    s1, s2 = (summarize([flow()], [], None, None, n, 0) for n in (1, 2))
    p = _write(tmp_path, [json.dumps(flow()), "", json.dumps(miss()), json.dumps(s1), json.dumps(s2)])
    cap = load([str(p)])
    assert _flows(cap) == [dict(flow(), midstream=False)]
    assert len(cap.misses) == 1 and cap.summaries[-1]["duration_s"] == 2


def test_capture_without_summary_is_marked_truncated(tmp_path):
    cap = load([str(_write(tmp_path, [json.dumps(flow())]))])
    assert cap.summaries == [] and cap.truncated and cap.notes


def test_bad_line_names_file_and_line(tmp_path):
    p = _write(tmp_path, [json.dumps(flow()), "", "Attaching 3 probes..."])
    with pytest.raises(UserError) as err:
        load([str(p)])
    assert str(p) in str(err.value) and "line 3" in str(err.value)
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        load([str(_write(tmp_path, [json.dumps(flow()), "[1, 2]"]))])


def test_missing_capture_names_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl"):
        load([str(tmp_path / "nope.jsonl")])


def test_read_then_summarize_roundtrip(tmp_path):
    recs = [flow(latency_us=100.0), flow(latency_us=300.0), miss(host_port=9000, count=2)]
    p = _write(tmp_path, [json.dumps(r) for r in recs])
    cap = load([str(p)])
    s = summarize(_flows(cap), list(miss_records(cap.misses)), None, None, 2, 0)
    p.write_text(p.read_text() + json.dumps(s) + "\n")
    got = {k: v for k, v in load([str(p)]).summaries[-1].items() if k not in ("node", "source")}
    assert got == s



def test_flow_aggregate_gives_the_same_summary_as_the_records():
    from bpftrace_hostport.analysis.aggregate import FlowAggregate
    import random
    rnd = random.Random(7)
    recs = []
    for i in range(500):
        answered = rnd.random() > 0.2
        recs.append({"type": "flow", "proto": "tcp", "family": 4, "host_port": 8000 + i % 3,
                     "pod_ip": f"10.0.1.{i % 3}", "pod_port": 80, "answered": answered,
                     "latency_us": round(rnd.uniform(10, 5000), 1) if answered else None,
                     "packets": 2, "bytes": 120, "pod_namespace": "ns" if i > 5 else None,
                     "pod_name": f"p{i % 3}", "port_name": "http",
                     "drop_reason": None if answered else "NETFILTER_DROP"})
    agg = FlowAggregate()
    for r in recs:
        agg.add(r)
    assert len(agg) == 500
    a = summarize(recs, [], None, None, 10.0, 0)
    b = summarize(agg, [], None, None, 10.0, 0)
    assert a == b


def test_latency_store_switches_to_a_histogram_within_one_percent():
    from bpftrace_hostport.analysis import aggregate as ag
    rnd = np.random.default_rng(3)
    values = rnd.lognormal(mean=5, sigma=1.2, size=ag.EXACT_LATENCIES + 50_000)
    store = ag.LatencyStore()
    for chunk in np.array_split(values, 40):
        store.add(chunk)
    assert store.hist is not None and len(store) == len(values) and store.max == values.max()
    for got, want in zip(store.percentiles([50, 90, 99]), np.percentile(values, [50, 90, 99])):
        assert abs(got - want) / want < 0.012
    small = ag.LatencyStore()
    small.add(np.array([100.0, 200.0, 300.0]))
    assert small.hist is None and small.percentiles([50]) == [200.0]
