"""The incident report: figures computed by hand on crafted captures (JSON lines written here,
read back through the streaming reader and the one roll-up), filters, comparison, and every
format (table widths, markdown, csv, self-contained html with charts)."""
import base64
import csv
import io
import json
import re
from datetime import datetime, timezone

import numpy as np
import orjson
import pytest

from bpftrace_hostport.analysis.plots import charts
from bpftrace_hostport.analysis.report import (Filters, build_report, compare_reports,
                                               default_bucket_s, parse_time)
from bpftrace_hostport.analysis.report_render import render
from bpftrace_hostport.analysis.review import read
from bpftrace_hostport.records.batch import iso_to_ns, ns_to_iso
from bpftrace_hostport.records.stream import open_captures
from tests.samples import outcomes

T0 = "2024-05-01T12:00:00Z"
WEB = dict(pod_namespace="shop", pod_name="web-7d9f4c6b8-x2k4q", port_name="http")
DNS = dict(pod_namespace="dns", pod_name="resolver-0", port_name="dns")


def ts(seconds):
    return ns_to_iso(iso_to_ns(T0) + int(seconds * 1e9))


def flow(t, client, pod_ip="10.244.1.5", family=4, proto="tcp", host_port=8080, pod_port=80,
         answered=True, latency=None, midstream=False, masq=False, packets=1, nbytes=100,
         drop=None, node="node-a", source="a.jsonl", names=WEB):
    return outcomes(dict(type="flow", ts=ts(t), proto=proto, family=family, client_ip=client,
                         client_port=40000, node_ip="192.168.1.1", host_port=host_port, pod_ip=pod_ip,
                         pod_port=pod_port, hook="prerouting", answered=answered, latency_us=latency,
                         midstream=midstream, masqueraded=masq, snat_ip="10.244.1.1" if masq else None,
                         packets=packets, bytes=nbytes, drop_reason=drop, node=node, source=source,
                         **names))


# node-a, tcp/8080 -> 10.244.1.5:80 (v4) and [fd00::5]:80 (v6, same pod): answered latencies
# 1000, 2000, 4000 us (p50 2000, p90 3600, p99 3960), one drop, one midstream flow (no latency)
FLOWS_A = [
    flow(0, "192.168.1.10", latency=1000.0, packets=10, nbytes=1000),
    flow(10, "192.168.1.10", latency=2000.0, packets=6, nbytes=600),
    flow(20, "192.168.1.11", latency=4000.0, masq=True, packets=4, nbytes=400),
    flow(30, "192.168.1.12", answered=False, packets=1, nbytes=60, drop="NETFILTER_DROP"),
    flow(40, "192.168.1.10", midstream=True, packets=3, nbytes=300),
    flow(5, "fd00::100", pod_ip="fd00::5", family=6, latency=500.0, packets=2, nbytes=200),
]
# node-b, conntrack backend: no latency, no packets
FLOWS_B = [flow(t, "192.168.2.20", proto="udp", host_port=5353, pod_ip="10.244.2.7", pod_port=53,
                packets=None, nbytes=None, node="node-b", source="b.jsonl", names=DNS)
           for t in (1, 2)]
MISSES_A = [
    dict(type="miss", ts=ts(15), proto="tcp", family=4, client_ip="192.168.1.20", node_ip="192.168.1.1",
         host_port=8080, hook="prerouting", count=2),
    dict(type="miss", ts=ts(50), proto="tcp", family=4, client_ip="192.168.1.30", node_ip="192.168.1.1",
         host_port=9090, hook="prerouting", count=3),
]


def kmap(proto, family, host_port, pod_ip, pod_port, flows, packets, nbytes, misses, drops, names):
    return dict(proto=proto, family=family, host_port=host_port, pod_ip=pod_ip, pod_port=pod_port,
                flows=flows, answered=0, packets=packets, bytes=nbytes, misses=misses, drops=drops,
                latency_us={}, flows_per_s=None, **names)


NONAMES = dict(pod_namespace=None, pod_name=None, port_name=None)
SUMMARY_A = dict(type="summary", duration_s=60.0, lost_events=2, flows=8, backend="netfilter", mappings=[
    kmap("tcp", 4, 8080, "10.244.1.5", 80, 7, 50, 5000, 2, {"NETFILTER_DROP": 3}, WEB),
    kmap("tcp", 6, 8080, "fd00::5", 80, 1, 2, 200, 2, {}, WEB),
    kmap("tcp", None, 9090, None, None, 0, 0, 0, 3, {},
         dict(pod_namespace="monitoring", pod_name="node-exporter", port_name=None))])
SUMMARY_B = dict(type="summary", duration_s=60.0, lost_events=0, flows=2, backend="conntrack", mappings=[
    kmap("udp", 4, 5353, "10.244.2.7", 53, 2, None, None, None, {}, DNS)])


def header(node, backend, measures=True, schema=4, session=None):
    h = dict(type="capture", schema=schema, tool="bpftrace-hostport 0.2", backend=backend,
             node=node, kernel="6.8.0", netns=None, started=T0, options={})
    if session:
        h["session"] = session
    if schema >= 2:
        h["measures"] = dict.fromkeys(("latency", "packets", "misses", "drops"), measures)
    return h


class Cap:
    """Captures written as JSON-lines files, read back as a user's `report` reads them."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.paths = []

    def file(self, name, header_, flows=(), misses=(), summary=None, cut=False):
        recs = ([header_] if header_ else []) + [
            {k: v for k, v in f.items() if k not in ("node", "source")} for f in flows] + list(misses) + (
            [summary] if summary else [])
        data = b"".join(orjson.dumps(r) + b"\n" for r in recs)
        if cut:
            data += b'{"type": "flow", "ts": "2024-'
        path = self.dir / name
        path.write_bytes(data)
        self.paths.append(str(path))
        return self

    def review(self, filters=None):
        return read(open_captures(self.paths), filters)

    def report(self, filters=None, **kw):
        return build_report(self.review(filters), **kw)


def capture(tmp_path, flows=FLOWS_A, misses=MISSES_A, summary=SUMMARY_A, header_=None, cut=False):
    return Cap(tmp_path).file("a.jsonl", header("node-a", "netfilter") if header_ is None else header_,
                              flows, misses, summary, cut)


def two_nodes(tmp_path):
    return (Cap(tmp_path).file("a.jsonl", header("node-a", "netfilter"), FLOWS_A, MISSES_A, SUMMARY_A)
            .file("b.jsonl", header("node-b", "conntrack", measures=False), FLOWS_B, (), SUMMARY_B))


def mapping(report, host_port, family=4, node=None):
    return next(m for m in report["mappings"] if m["host_port"] == host_port
                and m["family"] == family and (node is None or m.get("node") == node))


# ------------------------------------------------------------------------- kernel figures

def test_kernel_counts_are_authoritative_and_rows_give_the_rest(tmp_path):
    r = capture(tmp_path).report()
    m = mapping(r, 8080)
    # a whole run (its summary in the file): the kernel's flows, packets, bytes and packet drops
    assert (m["flows"], m["packets"], m["bytes"]) == (7, 50, 5000)
    assert m["drops"] == {"NETFILTER_DROP": 3} and m["misses"] == 2
    assert m["source_of_counts"] == "kernel"
    # the rows': outcomes (midstream counts), latency (midstream excluded), clients, masquerading
    assert (m["answered"], m["unanswered"], m["refused"], m["in_flight"]) == (4, 1, 0, 2)
    assert m["answered_share"] == round(4 / 7, 4) and m["dropped_flows"] == {"NETFILTER_DROP": 1}
    assert m["latency_us"] == {"p50": 2000.0, "p90": 3600.0, "p99": 3960.0, "max": 4000.0}
    assert m["top_clients"] == [["192.168.1.10", 3], ["192.168.1.11", 1], ["192.168.1.12", 1]]
    assert m["masqueraded_share"] == 0.2
    assert (m["pod_namespace"], m["pod_name"], m["port_name"]) == ("shop", "web-7d9f4c6b8-x2k4q", "http")
    assert "node" not in m and r["nodes"] == ["node-a"] and "per_node" not in r
    t = r["totals"]
    # misses of hostPort 8080 sit on its v4 and v6 mappings but count once: 2 + 3 (9090)
    assert (t["flows"], t["answered"], t["misses"], t["drops_total"], t["packets"]) == (8, 5, 5, 3, 52)
    assert t["latency_us"] == {"p50": 1500.0, "p90": 3400.0, "p99": 3940.0, "max": 4000.0}
    assert r["lost_events"] == 2 and t["source_of_counts"] == "kernel" and t["midstream"] == 1
    assert r["span"] == {"start": T0, "end": "2024-05-01T12:01:00Z", "duration_s": 60.0}
    assert m["flows_per_s"] == round(7 / 60, 3) and r["latency_method"] == "exact"
    json.dumps(r, allow_nan=False)


def test_misses_only_row_for_a_hostport_without_dnat(tmp_path):
    m = mapping(capture(tmp_path).report(), 9090)
    assert m["pod_ip"] is None and m["pod_port"] is None
    assert (m["flows"], m["misses"], m["answered_share"]) == (0, 3, None)
    assert m["pod_name"] == "node-exporter"           # the hostNetwork owner, from the summary
    assert m["top_clients"] == [["192.168.1.30", 3]]  # who missed


def test_rate_series_and_default_bucket(tmp_path):
    m = mapping(capture(tmp_path).report(bucket_s=10), 8080)
    assert [t for t, _ in m["rate_series"]] == [f"2024-05-01T12:00:{s:02d}Z" for s in range(0, 60, 10)] + [
        "2024-05-01T12:01:00Z"]
    assert [v for _, v in m["rate_series"]] == [0.1] * 5 + [0.0, 0.0]
    assert m["outcome_series"]["unanswered"][3] == 1
    assert len(mapping(capture(tmp_path).report(), 8080)["rate_series"]) == 61     # 60 s -> 1 s
    assert [default_bucket_s(s) for s in (0, 60, 301, 3600, 7200, 86400)] == [1, 1, 10, 60, 300, 1800]


def test_a_bucket_that_is_no_multiple_of_the_grid_says_so(tmp_path):
    with pytest.raises(ValueError, match="give a multiple of 1 s"):
        capture(tmp_path).report(bucket_s=2.5)


# ------------------------------------------------------------------------------- unknowns

def test_conntrack_backend_figures_are_unknown_not_zero(tmp_path):
    r = two_nodes(tmp_path).report()
    b = mapping(r, 5353, node="node-b")
    assert b["flows"] == 2 and b["answered"] == 2
    assert b["packets"] is None and b["bytes"] is None and b["misses"] is None and b["drops"] is None
    assert b["latency_us"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert r["measures"] == {"latency": False, "packets": False, "misses": False, "drops": False}
    assert r["totals"]["packets"] is None and r["totals"]["misses"] is None
    assert any("conntrack" in n and "node-b" in n for n in r["notes"])
    nodes = {n["node"]: n for n in r["per_node"]}
    assert nodes["node-a"]["packets"] == 52 and nodes["node-b"]["packets"] is None
    assert nodes["node-a"]["measures"]["latency"] and not nodes["node-b"]["measures"]["latency"]
    assert mapping(r, 8080, node="node-a")["packets"] == 50      # node-a measures it


@pytest.mark.parametrize("backend, measured", [("conntrack", False), ("netfilter", True)])
def test_schema1_header_takes_the_backend_from_the_summary(tmp_path, backend, measured):
    r = capture(tmp_path, summary=dict(SUMMARY_A, backend=backend), header_=False).report()
    assert r["measures"] == dict.fromkeys(("latency", "packets", "misses", "drops"), measured)
    assert (mapping(r, 8080)["packets"] is None) is not measured


# -------------------------------------------------------------------------------- filters

def test_a_hostport_filter_keeps_whole_mappings_with_their_kernel_counts(tmp_path):
    r = capture(tmp_path).report(Filters(host_ports=[8080]))
    m = mapping(r, 8080)
    assert (m["flows"], m["packets"], m["bytes"]) == (7, 50, 5000)
    assert m["drops"] == {"NETFILTER_DROP": 3} and m["misses"] == 2
    assert m["source_of_counts"] == "kernel"
    assert all(x["host_port"] == 8080 for x in r["mappings"])
    assert any("whole mappings are shown" in n for n in r["notes"])
    assert r["filters"]["host_ports"] == [8080]


def test_time_filter_is_half_open_counts_from_the_records_and_clips_the_span(tmp_path):
    f = Filters(since=datetime(2024, 5, 1, 12, 0, 15),          # naive: UTC
                until=parse_time("2024-05-01T12:00:35Z", datetime.now()))
    r = capture(tmp_path).report(f)
    m = mapping(r, 8080)
    assert m["flows"] == 2 and m["misses"] == 2       # flows at 20 s and 30 s; the miss at 15 s
    assert (m["packets"], m["drops"], m["source_of_counts"]) == (None, None, "records")
    assert any("time or client filter is active" in n for n in r["notes"])
    assert r["span"]["start"] == "2024-05-01T12:00:15Z" and r["span"]["end"] == "2024-05-01T12:00:35Z"
    assert r["filters"]["since"] == "2024-05-01T12:00:15Z"


@pytest.mark.parametrize("clients, expect", [
    (["192.168.1.10/32"], {(8080, 4): 3}),
    (["fd00::/64"], {(8080, 6): 1}),
    (["192.168.0.0/16", "fd00::100"], {(8080, 4): 5, (8080, 6): 1, (5353, 4): 2, (9090, 4): 0}),
])
def test_client_filter_v4_and_v6(tmp_path, clients, expect):
    r = two_nodes(tmp_path).report(Filters(clients=clients))
    assert {(m["host_port"], m["family"]): m["flows"] for m in r["mappings"]} == expect


def test_client_filter_latency_from_the_kept_rows(tmp_path):
    m = mapping(capture(tmp_path).report(Filters(clients=["192.168.1.10"])), 8080)
    assert m["latency_us"]["p50"] == 1500.0 and m["top_clients"] == [["192.168.1.10", 3]]


@pytest.mark.parametrize("filters, expect", [
    (Filters(pods=["shop/web-7d9f4c6b8-x2k4q"]), {(8080, 4): (7, 2), (8080, 6): (1, 2)}),
    (Filters(namespaces=["dns"]), {(5353, 4): (2, None)}),
    (Filters(namespaces=["monitoring"]), {(9090, 4): (0, 3)}),
])
def test_pod_and_namespace_filters(tmp_path, filters, expect):
    r = two_nodes(tmp_path).report(filters)
    assert {(m["host_port"], m["family"]): (m["flows"], m["misses"]) for m in r["mappings"]} == expect


def test_pod_names_never_change_a_number(tmp_path):
    named = capture(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None).report()
    # the same capture, names on one row only, and none in the summary
    rows = [dict(f, **NONAMES) if i else f for i, f in enumerate(FLOWS_A)]
    summary = dict(SUMMARY_A, mappings=[dict(m, **NONAMES) for m in SUMMARY_A["mappings"]])
    (tmp_path / "b").mkdir()
    partly = capture(tmp_path / "b", flows=rows, summary=summary).report()
    strip = lambda r: [{k: v for k, v in m.items() if k not in NONAMES} for m in r["mappings"]]  # noqa: E731
    assert strip(named) == strip(partly) and named["totals"] == partly["totals"]
    assert mapping(partly, 8080)["pod_name"] == "web-7d9f4c6b8-x2k4q"
    # filtering by that pod finds rows without a name through their mapping
    (tmp_path / "c").mkdir()
    by_pod = capture(tmp_path / "c", flows=rows).report(Filters(pods=["shop/web-7d9f4c6b8-x2k4q"]))
    assert mapping(by_pod, 8080)["flows"] == 7


def test_bad_filters_say_why(tmp_path):
    with pytest.raises(ValueError, match="CIDR"):
        capture(tmp_path).report(Filters(clients=["10.0.0.0/33"]))
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        capture(tmp_path).report(Filters(pods=["web"]))


@pytest.mark.parametrize("text, expect", [
    ("15m", datetime(2024, 5, 1, 11, 45, tzinfo=timezone.utc)),
    ("2h", datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)),
    ("90s", datetime(2024, 5, 1, 11, 58, 30, tzinfo=timezone.utc)),
    ("1d", datetime(2024, 4, 30, 12, 0, tzinfo=timezone.utc)),
    ("2024-05-01T10:00:00", datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)),
    ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)),
    ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)),
])
def test_parse_time(text, expect):
    assert parse_time(text, datetime(2024, 5, 1, 12, 0)) == expect


@pytest.mark.parametrize("text", ["yesterday", "15 minutes", "-5m", ""])
def test_parse_time_refuses_with_a_sentence(text):
    with pytest.raises(ValueError, match="is not a time"):
        parse_time(text, datetime(2024, 5, 1, 12, 0))


# ---------------------------------------------------------------------- truncated, compare

def test_truncated_capture_counts_from_records_and_says_so(tmp_path):
    r = capture(tmp_path, summary=None, cut=True).report()
    assert r["truncated"] is True and r["lost_events"] is None
    assert r["notes"][0].startswith(str(tmp_path / "a.jsonl") + " ends in a cut line")
    assert any("has no summary record" in n for n in r["notes"])
    m = mapping(r, 8080)
    assert (m["flows"], m["packets"], m["drops"]) == (5, None, None)
    assert m["dropped_flows"] == {"NETFILTER_DROP": 1} and m["source_of_counts"] == "records"
    assert mapping(r, 9090)["misses"] == 3            # misses-only row from the miss rows
    for fmt in ("table", "markdown", "html"):
        text = render(r, fmt, 100)
        lines = re.sub("<[^>]+>", "\n", text.split("<body>")[-1]).splitlines()
        first = [line for line in lines if line.strip() and "incident report" not in line][0]
        assert "truncated" in first, fmt      # the first sentence after the title


def test_compare_reports(tmp_path):
    kernel = SUMMARY_A["mappings"]
    after_summary = dict(SUMMARY_A, mappings=[dict(kernel[0], flows=9)] + kernel[1:])
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    before = capture(tmp_path).report()
    after = capture(tmp_path / "b", summary=after_summary).report()
    c = compare_reports(before, after)
    m = next(x for x in c["mappings"] if x["host_port"] == 8080 and x["family"] == 4)
    assert m["status"] == "both" and m["flows"] == {"before": 7, "after": 9, "delta": 2}
    assert m["p50_us"] == {"before": 2000.0, "after": 2000.0, "delta": 0.0}
    assert c["totals"]["flows"]["delta"] == 2
    gone = compare_reports(two_nodes(tmp_path / "c").report(), before)
    dns = next(x for x in gone["mappings"] if x["host_port"] == 5353)
    assert dns["status"] == "gone" and dns["flows"] == {"before": 2, "after": None, "delta": None}
    for fmt in ("table", "markdown", "json", "csv", "html"):
        assert render(c, fmt, 100)
    text = render(c, "table", None)           # no width limit: one line per mapping
    assert "7 -> 9 (+2)" in text and "57.1% -> 44.4% (-12.7pp)" in text


# ------------------------------------------------------------------------------ rendering

def test_json_and_csv(tmp_path):
    r = two_nodes(tmp_path).report()
    assert json.loads(render(r, "json")) == r
    rows = list(csv.DictReader(io.StringIO(render(r, "csv"))))
    assert len(rows) == len(r["mappings"])
    a = next(x for x in rows if x["host_port"] == "8080" and x["family"] == "4")
    assert (a["drops"], a["p50_us"], a["node"]) == ("NETFILTER_DROP:3", "2000.0", "node-a")
    b = next(x for x in rows if x["host_port"] == "5353")
    assert b["packets"] == "" and b["drops"] == ""   # unknown is empty, not 0


def test_markdown_is_pasteable(tmp_path):
    md = render(two_nodes(tmp_path).report(), "markdown")
    assert md.startswith("# hostPort incident report\n")
    for section in ("## Mappings", "## Drops", "## Top clients", "## Notes"):
        assert section in md
    assert "| node-a | tcp :8080 -> [fd00::5]:80 |" in md
    assert "times are UTC" in md


VALUES = ["shop/web-7d9f4c6b8-x2k4q", "dns/resolver-0", "monitoring/node-exporter",
          "10.244.1.5:80", "[fd00::5]:80", "10.244.2.7:53", "NETFILTER_DROP", "192.168.1.10",
          "fd00::100"]


@pytest.mark.parametrize("width", [80, 100, 160])
def test_table_fits_the_width_and_never_cuts_a_value(tmp_path, width):
    text = render(two_nodes(tmp_path).report(), "table", width)
    assert max(len(line) for line in text.splitlines()) <= width
    for value in VALUES:
        assert value in text, value
    assert "times are UTC" in text and "P50 ms" in text and "flows/s" in text
    assert re.search(r"\b1 flow\b", text) and re.search(r"\b2 flows\b", text)
    assert not re.search(r"\b1 flows\b", text) and "n/a" in text


def test_narrow_table_keeps_values_whole_then_turns_into_records(tmp_path):
    long_name = dict(WEB, pod_name="checkout-frontend-with-a-rather-long-name-7d9f4c6b8-x2k4q")
    rows = [dict(f, **long_name) for f in FLOWS_A]
    report = capture(tmp_path, flows=rows, summary=None).report()
    pod = "shop/checkout-frontend-with-a-rather-long-name-7d9f4c6b8-x2k4q"
    # at 80 columns the grid holds the numbers, the mapping in full on the line under its row
    text = render(report, "table", 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "-[ mapping 1 ]" not in text
    assert any(line.strip().startswith("-> [fd00::5]:80") for line in lines)   # wrapped at spaces only
    section = text.split("\nMappings\n")[1].split("\nDrops")[0].splitlines()
    assert sum(pod in line for line in section) == 2
    # at 40 no grid fits: a block per mapping, every value whole on one line
    text = render(report, "table", 40)
    lines = text.splitlines()
    assert "-[ mapping 1 ]" in text
    # only a word longer than the width (the pod, the file's path) stands out, whole
    assert max(len(line) for line in lines if "checkout-frontend" not in line and str(tmp_path) not in line) <= 40
    assert any(line.strip() == pod for line in lines)
    assert any(re.match(r"MAPPING +tcp :8080 -> \[fd00::5\]:80$", line) for line in lines)
    assert "1 flow" in text and "3 flows" in text


def test_unlimited_width_is_one_line_per_row(tmp_path):
    text = render(capture(tmp_path).report(), "table", None)
    row = next(line for line in text.splitlines() if "10.244.1.5:80" in line and "NETFILTER_DROP:3" in line)
    assert "shop/web-7d9f4c6b8-x2k4q (http)" in row


def test_html_is_self_contained_with_charts(tmp_path):
    page = render(two_nodes(tmp_path).report(), "html")
    for bad in ("http://", "https://", 'src="//', 'href="//', "@import", "url("):
        assert bad not in page
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) >= 4
    from PIL import Image
    for data in pngs:
        raw = base64.b64decode(data)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(raw)).size[0] > 100
    assert "<table>" in page and "shop/web-7d9f4c6b8-x2k4q" in page and "<style>" in page


def test_charts_say_when_a_figure_is_not_measured(tmp_path):
    only_b = Cap(tmp_path).file("b.jsonl", header("node-b", "conntrack", measures=False), FLOWS_B, (), SUMMARY_B)
    out = charts(only_b.report())
    assert len(out) == 6 and all(png.startswith(b"\x89PNG") for _, png in out)


def test_a_capture_with_only_its_header_renders(tmp_path):
    r = capture(tmp_path, flows=(), misses=(), summary=None).report()
    assert r["mappings"] == [] and r["totals"]["flows"] == 0
    for fmt in ("table", "json", "csv", "markdown", "html"):
        assert render(r, fmt, 80)
    with pytest.raises(ValueError, match="Unknown format"):
        render(r, "yaml")


def test_a_hundred_thousand_flows_are_counted_exactly(tmp_path):
    n = 100_000
    rng = np.random.default_rng(3)
    lat = rng.lognormal(7, 1, n)
    secs = rng.integers(0, 3600, n)
    rows = [dict(FLOWS_A[0], client_ip=f"10.1.{i % 200}.{i % 250}", latency_us=float(lat[i]),
                 ts=ts(int(secs[i]))) for i in range(n)]
    r = capture(tmp_path, flows=rows, misses=MISSES_A, summary=None).report()
    m = r["mappings"][0]
    assert m["flows"] == n and m["latency_exact"] is False
    assert m["latency_us"]["p50"] == pytest.approx(float(np.quantile(lat, 0.5)), rel=0.006)
    assert any("within 0.54 %" in x for x in r["notes"])


def test_trouble_points_to_check_with_the_command(tmp_path):
    notes = capture(tmp_path).report()["notes"]
    assert any("sudo bpftrace-hostport check" in n for n in notes)
    healthy = [f for f in FLOWS_A if f["answered"] and f["host_port"] == 8080 and not f["drop_reason"]]
    (tmp_path / "q").mkdir()
    quiet = capture(tmp_path / "q", flows=healthy, misses=[], summary=None).report()
    assert not any("bpftrace-hostport check" in n for n in quiet["notes"])
