"""The incident report: figures computed by hand on a crafted capture, filters, comparison,
and every format (table widths, markdown, csv, self-contained html with charts)."""
import base64
import csv
import io
import json
import re
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from bpftrace_hostport.analysis.plots import charts
from bpftrace_hostport.analysis.report import (Filters, build_report, compare_reports,
                                               default_bucket_s, group_quantiles, parse_time)
from bpftrace_hostport.analysis.report_render import render
from bpftrace_hostport.records.capture import Capture

T0 = "2024-05-01T12:00:00Z"
WEB = dict(pod_namespace="shop", pod_name="web-7d9f4c6b8-x2k4q", port_name="http")
DNS = dict(pod_namespace="dns", pod_name="resolver-0", port_name="dns")


def ts(seconds):
    return pd.Timestamp(T0) + pd.Timedelta(seconds=seconds)


def flow(t, client, pod_ip="10.244.1.5", family=4, proto="tcp", host_port=8080, pod_port=80,
         answered=True, latency=None, midstream=False, masq=False, packets=1, nbytes=100,
         drop=None, node="node-a", source="a.jsonl", names=WEB):
    return dict(ts=ts(t), proto=proto, family=family, client_ip=client, client_port=40000,
                node_ip="192.168.1.1", host_port=host_port, pod_ip=pod_ip, pod_port=pod_port,
                hook="prerouting", answered=answered, latency_us=latency, midstream=midstream,
                masqueraded=masq, snat_ip="10.244.1.1" if masq else None, packets=packets,
                bytes=nbytes, drop_reason=drop, node=node, source=source, **names)


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
    dict(ts=ts(15), proto="tcp", family=4, client_ip="192.168.1.20", node_ip="192.168.1.1",
         host_port=8080, hook="prerouting", count=2, node="node-a", source="a.jsonl"),
    dict(ts=ts(50), proto="tcp", family=4, client_ip="192.168.1.30", node_ip="192.168.1.1",
         host_port=9090, hook="prerouting", count=3, node="node-a", source="a.jsonl"),
]


def kmap(proto, family, host_port, pod_ip, pod_port, flows, packets, nbytes, misses, drops, names):
    return dict(proto=proto, family=family, host_port=host_port, pod_ip=pod_ip, pod_port=pod_port,
                flows=flows, answered=0, packets=packets, bytes=nbytes, misses=misses, drops=drops,
                latency_us={}, flows_per_s=None, **names)


NONAMES = dict(pod_namespace=None, pod_name=None, port_name=None)
SUMMARY_A = dict(type="summary", duration_s=60.0, lost_events=2, flows=8, backend="netfilter",
                 node="node-a", source="a.jsonl", mappings=[
                     kmap("tcp", 4, 8080, "10.244.1.5", 80, 7, 50, 5000, 2, {"NETFILTER_DROP": 3}, WEB),
                     kmap("tcp", 6, 8080, "fd00::5", 80, 1, 2, 200, 2, {}, WEB),
                     kmap("tcp", None, 9090, None, None, 0, 0, 0, 3, {},
                          dict(pod_namespace="monitoring", pod_name="node-exporter", port_name=None))])
SUMMARY_B = dict(type="summary", duration_s=60.0, lost_events=0, flows=2, backend="conntrack",
                 node="node-b", source="b.jsonl", mappings=[
                     kmap("udp", 4, 5353, "10.244.2.7", 53, 2, 0, 0, 0, {}, DNS)])


def header(node, source, backend, measures=True, schema=2):
    h = dict(type="capture", schema=schema, tool="bpftrace-hostport 0.2", backend=backend,
             node=node, kernel="6.8.0", netns=None, started=T0, options={}, source=source)
    if schema >= 2:
        h["measures"] = dict.fromkeys(("latency", "packets", "misses", "drops"), measures)
    return h


def frame(rows, int_cols=("pod_port", "packets", "bytes")):
    df = pd.DataFrame(rows)
    for c in int_cols:
        if c in df:
            df[c] = df[c].astype("Int64")
    return df


def capture(flows=FLOWS_A, misses=MISSES_A, summaries=(SUMMARY_A,), headers=None, **kw):
    headers = [header("node-a", "a.jsonl", "netfilter")] if headers is None else headers
    return Capture(flows=frame(flows), misses=frame(misses), summaries=list(summaries),
                   headers=headers, **kw)


def two_nodes():
    return capture(FLOWS_A + FLOWS_B, MISSES_A, (SUMMARY_A, SUMMARY_B),
                   [header("node-a", "a.jsonl", "netfilter"),
                    header("node-b", "b.jsonl", "conntrack", measures=False)])


def mapping(report, host_port, family=4, node=None):
    return next(m for m in report["mappings"] if m["host_port"] == host_port
                and m["family"] == family and (node is None or m.get("node") == node))


# ------------------------------------------------------------------------- kernel figures

def test_kernel_counts_are_authoritative_and_rows_give_the_rest():
    r = build_report(capture())
    m = mapping(r, 8080)
    # the kernel's: flows, packets, bytes, drops, misses
    assert (m["flows"], m["packets"], m["bytes"]) == (7, 50, 5000)
    assert m["drops"] == {"NETFILTER_DROP": 3} and m["misses"] == 2
    assert m["source_of_counts"] == "kernel"
    # the rows': answered (midstream counts), latency (midstream excluded), clients, masquerading
    assert m["answered"] == 4 and m["answered_share"] == round(4 / 7, 4)
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
    assert m["flows_per_s"] == round(7 / 60, 3)
    json.dumps(r, allow_nan=False)


def test_misses_only_row_for_a_hostport_without_dnat():
    m = mapping(build_report(capture()), 9090, family=None)
    assert m["pod_ip"] is None and m["pod_port"] is None
    assert (m["flows"], m["misses"], m["answered_share"]) == (0, 3, None)
    assert m["pod_name"] == "node-exporter"           # the hostNetwork owner, from the summary
    assert m["top_clients"] == [["192.168.1.30", 3]]  # who missed


def test_group_quantiles_are_numpy_linear():
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 5, 1000)
    values = rng.lognormal(7, 1, 1000)
    q = group_quantiles(ids, values, 6)
    for g in range(5):
        expect = np.percentile(values[ids == g], [50, 90, 99, 100], method="linear")
        assert np.allclose(q[g, [50, 90, 99, 100]], expect)
    assert np.isnan(q[5]).all()                       # a group without values


def test_rate_series_and_default_bucket():
    m = mapping(build_report(capture(), bucket_s=10), 8080)
    assert [t for t, _ in m["rate_series"]] == [f"2024-05-01T12:00:{s:02d}Z" for s in range(0, 60, 10)]
    assert [v for _, v in m["rate_series"]] == [0.1] * 5 + [0.0]
    assert len(mapping(build_report(capture()), 8080)["rate_series"]) == 60     # 60 s -> 1 s
    assert [default_bucket_s(s) for s in (0, 60, 301, 3600, 7200, 86400)] == [1, 1, 10, 60, 300, 1800]


# ------------------------------------------------------------------------------- unknowns

def test_conntrack_backend_figures_are_unknown_not_zero():
    r = build_report(two_nodes())
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
def test_schema1_header_takes_the_backend_from_the_summary(backend, measured):
    cap = capture(summaries=[dict(SUMMARY_A, backend=backend)],
                  headers=[header("node-a", "a.jsonl", None, schema=1)])
    r = build_report(cap)
    assert r["measures"] == dict.fromkeys(("latency", "packets", "misses", "drops"), measured)
    assert (mapping(r, 8080)["packets"] is None) is not measured


# -------------------------------------------------------------------------------- filters

def test_a_filter_counts_from_the_records_and_says_so():
    r = build_report(capture(), Filters(host_ports=[8080]))
    m = mapping(r, 8080)
    assert (m["flows"], m["packets"], m["bytes"]) == (5, 24, 2360)
    assert m["drops"] == {"NETFILTER_DROP": 1} and m["misses"] == 2
    assert m["source_of_counts"] == "records" and r["totals"]["source_of_counts"] == "records"
    assert all(x["host_port"] == 8080 for x in r["mappings"])
    assert any("filter is active" in n for n in r["notes"])
    assert r["filters"]["host_ports"] == [8080]


def test_time_filter_is_half_open_and_clips_the_span():
    f = Filters(since=datetime(2024, 5, 1, 12, 0, 15),          # naive: UTC
                until=parse_time("2024-05-01T12:00:35Z", datetime.now()))
    r = build_report(capture(), f)
    m = mapping(r, 8080)
    assert m["flows"] == 2 and m["misses"] == 2       # flows at 20 s and 30 s; the miss at 15 s
    assert r["span"]["start"] == "2024-05-01T12:00:15Z" and r["span"]["end"] == "2024-05-01T12:00:35Z"
    assert r["filters"]["since"] == "2024-05-01T12:00:15Z"


@pytest.mark.parametrize("clients, expect", [
    (["192.168.1.10/32"], {(8080, 4): 3}),
    (["fd00::/64"], {(8080, 6): 1}),
    (["192.168.0.0/16", "fd00::100"], {(8080, 4): 5, (8080, 6): 1, (5353, 4): 2, (9090, 4): 0}),
])
def test_client_filter_v4_and_v6(clients, expect):
    r = build_report(two_nodes(), Filters(clients=clients))
    assert {(m["host_port"], m["family"]): m["flows"] for m in r["mappings"]} == expect


def test_client_filter_latency_from_the_kept_rows():
    m = mapping(build_report(capture(), Filters(clients=["192.168.1.10"])), 8080)
    assert m["latency_us"]["p50"] == 1500.0 and m["top_clients"] == [["192.168.1.10", 3]]


@pytest.mark.parametrize("filters, expect", [
    (Filters(pods=["shop/web-7d9f4c6b8-x2k4q"]), {(8080, 4): (5, 2), (8080, 6): (1, 2)}),
    (Filters(namespaces=["dns"]), {(5353, 4): (2, None)}),
    (Filters(namespaces=["monitoring"]), {(9090, 4): (0, 3)}),
])
def test_pod_and_namespace_filters(filters, expect):
    r = build_report(two_nodes(), filters)
    assert {(m["host_port"], m["family"]): (m["flows"], m["misses"]) for m in r["mappings"]} == expect


def test_pod_names_never_change_a_number():
    named = build_report(capture())
    # the same capture, names on one row only, and none in the summary
    rows = [dict(f, **NONAMES) if i else f for i, f in enumerate(FLOWS_A)]
    summary = dict(SUMMARY_A, mappings=[dict(m, **NONAMES) for m in SUMMARY_A["mappings"]])
    partly = build_report(capture(flows=rows, summaries=[summary]))
    strip = lambda r: [{k: v for k, v in m.items() if k not in NONAMES} for m in r["mappings"]]
    assert strip(named) == strip(partly) and named["totals"] == partly["totals"]
    assert mapping(partly, 8080)["pod_name"] == "web-7d9f4c6b8-x2k4q"
    # filtering by that pod finds rows without a name through their mapping
    by_pod = build_report(capture(flows=rows), Filters(pods=["shop/web-7d9f4c6b8-x2k4q"]))
    assert mapping(by_pod, 8080)["flows"] == 5


def test_bad_filters_say_why():
    with pytest.raises(ValueError, match="CIDR"):
        build_report(capture(), Filters(clients=["10.0.0.0/33"]))
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        build_report(capture(), Filters(pods=["web"]))


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

def truncated():
    return capture(summaries=(), truncated=True,
                   notes=["a.jsonl ends in a cut line 9 (the capture was interrupted); it was skipped."])


def test_truncated_capture_counts_from_records_and_says_so():
    r = build_report(truncated())
    assert r["truncated"] is True and r["lost_events"] is None
    assert r["notes"][0].startswith("a.jsonl ends in a cut line")
    assert any("No summary record" in n for n in r["notes"])
    m = mapping(r, 8080)
    assert (m["flows"], m["packets"], m["drops"]) == (5, 24, {"NETFILTER_DROP": 1})
    assert m["source_of_counts"] == "records"
    assert mapping(r, 9090)["misses"] == 3            # misses-only row from the miss rows
    for fmt in ("table", "markdown", "html"):
        text = render(r, fmt, 100)
        lines = re.sub("<[^>]+>", "\n", text.split("<body>")[-1]).splitlines()
        first = [line for line in lines if line.strip() and "incident report" not in line][0]
        assert "truncated" in first, fmt      # the first sentence after the title


def test_compare_reports():
    kernel = SUMMARY_A["mappings"]
    after_summary = dict(SUMMARY_A, mappings=[dict(kernel[0], flows=9)] + kernel[1:])
    before = build_report(capture())
    after = build_report(capture(summaries=[after_summary]))
    c = compare_reports(before, after)
    m = next(x for x in c["mappings"] if x["host_port"] == 8080 and x["family"] == 4)
    assert m["status"] == "both" and m["flows"] == {"before": 7, "after": 9, "delta": 2}
    assert m["p50_us"] == {"before": 2000.0, "after": 2000.0, "delta": 0.0}
    assert c["totals"]["flows"]["delta"] == 2
    gone = compare_reports(build_report(two_nodes()), before)
    dns = next(x for x in gone["mappings"] if x["host_port"] == 5353)
    assert dns["status"] == "gone" and dns["flows"] == {"before": 2, "after": None, "delta": None}
    for fmt in ("table", "markdown", "json", "csv", "html"):
        assert render(c, fmt, 100)
    text = render(c, "table", None)           # no width limit: one line per mapping
    assert "7 -> 9 (+2)" in text and "57.1% -> 44.4% (-12.7pp)" in text


# ------------------------------------------------------------------------------ rendering

def test_json_and_csv():
    r = build_report(two_nodes())
    assert json.loads(render(r, "json")) == r
    rows = list(csv.DictReader(io.StringIO(render(r, "csv"))))
    assert len(rows) == len(r["mappings"])
    a = next(x for x in rows if x["host_port"] == "8080" and x["family"] == "4")
    assert (a["drops"], a["p50_us"], a["node"]) == ("NETFILTER_DROP:3", "2000.0", "node-a")
    b = next(x for x in rows if x["host_port"] == "5353")
    assert b["packets"] == "" and b["drops"] == ""   # unknown is empty, not 0


def test_markdown_is_pasteable():
    md = render(build_report(two_nodes()), "markdown")
    assert md.startswith("# hostPort incident report\n")
    for section in ("## Mappings", "## Drops", "## Top clients", "## Notes"):
        assert section in md
    assert "| node-a | tcp :8080 -> [fd00::5]:80 |" in md
    assert "times are UTC" in md


VALUES = ["shop/web-7d9f4c6b8-x2k4q", "dns/resolver-0", "monitoring/node-exporter",
          "10.244.1.5:80", "[fd00::5]:80", "10.244.2.7:53", "NETFILTER_DROP", "192.168.1.10",
          "fd00::100"]


@pytest.mark.parametrize("width", [80, 100, 160])
def test_table_fits_the_width_and_never_cuts_a_value(width):
    text = render(build_report(two_nodes()), "table", width)
    assert max(len(line) for line in text.splitlines()) <= width
    for value in VALUES:
        assert value in text, value
    assert "times are UTC" in text and "P50 ms" in text and "RATE /s" in text
    assert re.search(r"\b1 flow\b", text) and re.search(r"\b2 flows\b", text)
    assert not re.search(r"\b1 flows\b", text) and "n/a" in text


def test_narrow_table_turns_into_records():
    long_name = dict(WEB, pod_name="checkout-frontend-with-a-rather-long-name-7d9f4c6b8-x2k4q")
    rows = [dict(f, **long_name) for f in FLOWS_A]
    text = render(build_report(capture(flows=rows, summaries=())), "table", 80)
    assert "-[ mapping 1 ]" in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    pod = "shop/checkout-frontend-with-a-rather-long-name-7d9f4c6b8-x2k4q"
    assert any(line.startswith("POD") and pod in line for line in lines)       # whole, one line
    assert any(re.match(r"MAPPING +tcp :8080 -> \[fd00::5\]:80$", line) for line in lines)
    assert "1 flow" in text and "3 flows" in text


def test_unlimited_width_is_one_line_per_row():
    text = render(build_report(capture()), "table", None)
    row = next(line for line in text.splitlines() if "10.244.1.5:80" in line and "NETFILTER_DROP:3" in line)
    assert "shop/web-7d9f4c6b8-x2k4q (http)" in row


def test_html_is_self_contained_with_charts():
    page = render(build_report(two_nodes()), "html")
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


def test_charts_say_when_a_figure_is_not_measured():
    only_b = capture(FLOWS_B, [], (SUMMARY_B,), [header("node-b", "b.jsonl", "conntrack", measures=False)])
    out = charts(build_report(only_b))
    assert len(out) == 4 and all(png.startswith(b"\x89PNG") for _, png in out)


def test_empty_capture_renders():
    r = build_report(Capture(flows=pd.DataFrame(), misses=pd.DataFrame()))
    assert r["mappings"] == [] and r["totals"]["flows"] == 0 and r["span"]["start"] is None
    for fmt in ("table", "json", "csv", "markdown", "html"):
        assert render(r, fmt, 80)
    with pytest.raises(ValueError, match="Unknown format"):
        render(r, "yaml")


def test_a_hundred_thousand_flows_stay_fast():
    import time
    n = 100_000
    rng = np.random.default_rng(3)
    base = frame(FLOWS_A[:1] * n)
    base["client_ip"] = [f"10.1.{i % 200}.{i % 250}" for i in range(n)]
    base["latency_us"] = rng.lognormal(7, 1, n)
    base["ts"] = pd.Timestamp(T0) + pd.to_timedelta(rng.integers(0, 3600, n), unit="s")
    started = time.perf_counter()
    r = build_report(Capture(flows=base, misses=frame(MISSES_A), summaries=[], headers=[]))
    assert time.perf_counter() - started < 2.0
    assert r["mappings"][0]["flows"] == n


def test_trouble_points_to_check_with_the_command():
    notes = build_report(capture())["notes"]
    assert any(n.endswith("run on the node: sudo bpftrace-hostport check") or
               "sudo bpftrace-hostport check" in n for n in notes)
    healthy = [f for f in FLOWS_A if f["answered"] and f["host_port"] == 8080]
    quiet = build_report(capture(flows=healthy, misses=[], summaries=()))
    assert not any("bpftrace-hostport check" in n for n in quiet["notes"])
