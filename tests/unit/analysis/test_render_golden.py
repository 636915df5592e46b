"""Golden renderings of the summary, the live view, the report's tables, `rules` and `check` at
80, 100 and 160 columns.

Each rendering must equal its file in tests/fixtures/golden/ (regenerate them with
UPDATE_GOLDEN=1 after a deliberate change, and read the diff), keep every line within the width
(the copyable fix commands excepted: one command, one line), never break inside a value (every
word of every value, an address with its port, a pod name, a code, is whole on one line: text
wraps at spaces only) and print no ellipsis.
"""
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from bpftrace_hostport.analysis.render import render_live, render_summary, words, wrap
from bpftrace_hostport.cli import node as cli_node
from bpftrace_hostport.model import ContainerPort, PodInfo
from bpftrace_hostport.node import gather as gather_mod
from bpftrace_hostport.node.check import findings
from tests.unit.node.test_check import blackhole_view, lab_view

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden"
WIDTHS = (80, 100, 160)
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
HINT = "sudo bpftrace-hostport check --lab demo"
PODS = [PodInfo("cjweichen", "nginx-hostport-6f9b9886b4-dndhf", ips=("10.140.1.2", "fd00:140:1::2"),
                phase="Running", ports=(ContainerPort("nginx", 80, "TCP", "http", 8000),
                                        ContainerPort("nginx", 443, "TCP", "https", 44300))),
        PodInfo("lab", "web-extra", ips=("10.140.1.9",), phase="Running",
                ports=(ContainerPort("web", 8080, "TCP", "web", 9090),)),
        PodInfo("lab", "hostnet-web", ips=("10.140.0.1",), host_network=True, phase="Running",
                ports=(ContainerPort("web", 9000, "TCP", "http", 9000),))]


def golden(name, text):
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed: run with UPDATE_GOLDEN=1 and read the diff"


def pieces(value):
    """The unbreakable pieces of a value: its words (text wraps at spaces only)."""
    return str(value).split()


def assert_fits(text, width, commands=()):
    for line in text.splitlines():
        if line in commands:
            continue            # a fix command is one line, whatever its length: it is copied
        assert len(line) <= width, (width, line)
    assert "…" not in text


def assert_uncut(text, values):
    """Every word of every value is whole on some line: none was split across two."""
    lines = text.splitlines()
    for v in values:
        for p in pieces(v):
            assert any(p in line for line in lines), (v, p)


def summary(name="summary.json"):
    return json.loads((GOLDEN / name).read_text())


def summary_values(s):
    out = []
    for m in s["mappings"]:
        out += [m["pod_ip"] or "", m["pod_name"] or "", m["pod_namespace"] or "", m["port_name"] or "",
                str(m["flows"]), str(m["answered"]), str(m["host_port"])]
        out += list(m["drops"])
        if m["pod_ip"]:
            out.append(f"[{m['pod_ip']}]:{m['pod_port']}" if ":" in m["pod_ip"] else f"{m['pod_ip']}:{m['pod_port']}")
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_summary_golden(width):
    s = summary()
    text = render_summary(s, width, check_hint=HINT, pods=PODS)
    golden(f"summary-{width}.txt", text)
    assert_fits(text, width, commands=["  " + HINT])
    assert_uncut(text, summary_values(s))
    assert "[fd00:140:1::2]:80" in text
    flat = " ".join(text.split())
    for note in ("expected: hostPort 9000/tcp", "hostNetwork pod lab/hostnet-web (http) owns the port",
                 "although pod lab/web-extra declares this hostPort",
                 "went to an IP no live pod has", "4 packets dropped after DNAT (NETFILTER_DROP 4)"):
        assert note in flat, note
    assert text.splitlines()[-1] == "  " + HINT
    # every mapping in a grid row (no block per mapping), its figures on the lines under it
    assert "-[ mapping" not in text
    assert sum(1 for ln in text.splitlines() if ln.startswith(("tcp", "udp", "8000/", "9000/", "9090/",
                                                                "44300/", "5353/"))) == len(s["mappings"])


@pytest.mark.parametrize("width", WIDTHS)
def test_summary_of_refused_flows_golden(width):
    s = summary("summary-refused.json")
    text = render_summary(s, width, check_hint=HINT)
    golden(f"summary-refused-{width}.txt", text)
    assert_fits(text, width, commands=["  " + HINT])
    assert_uncut(text, summary_values(s))
    flat = " ".join(text.split())
    assert "refused: reset 8 by the pod" in flat and "refused: port-unreachable 2 by the pod" in flat
    assert "8 flows of 12 refused (a TCP reset 8, sent by the pod): nothing listens on the containerPort" in flat


def test_unknown_is_na_and_none_is_a_dash_or_zero():
    """n/a: not measured (the conntrack backend's latency, packets, misses, drops); "-" only where
    there is nothing to show (no answered flow has a latency); 0 for a count of none."""
    s = summary("summary-refused.json")
    conntrack = dict(s, mappings=[dict(m, packets=None, bytes=None, misses=None, drops=None)
                                  for m in s["mappings"][:1]])
    text = render_summary(conntrack, None, measures={"latency": False, "packets": False, "misses": False,
                                                     "drops": False})
    row = next(ln for ln in text.splitlines() if ln.startswith("tcp :8000"))
    cells = row.split()
    assert cells[-12:-4] == ["n/a"] * 4 + ["n/a", "n/a", "n/a", "n/a"][:4] or "n/a" in row
    assert row.count("n/a") >= 7 and " - " not in row
    text = render_summary(s, None)
    v6 = next(ln for ln in text.splitlines() if "[fd00:173:1::2]:80" in ln)
    assert " - " in v6 and "n/a" not in v6          # refused only: no latency to show, all measured


def test_summary_on_a_pipe_has_no_width_limit():
    s = summary()
    text = render_summary(s, None, check_hint=HINT, pods=PODS)
    golden("summary-none.txt", text)
    lines = text.splitlines()
    assert lines[0] == "64 flows over 12.437 s, 1 lost flow"
    # one line per mapping, every value whole
    assert sum(1 for ln in lines if ln.startswith(("tcp :", "udp :"))) == len(s["mappings"])
    assert any("cjweichen/nginx-hostport-6f9b9886b4-dndhf (http)" in ln and "[fd00:140:1::2]:80" in ln
               for ln in lines)


EVENTS = ["12:00:00.%03d tcp 10.140.0.10:%d -> 10.140.0.1:8000 => 10.140.1.2:80 "
          "cjweichen/nginx-hostport-6f9b9886b4-dndhf (http) [prerouting] 0.05 ms" % (i, 40000 + i)
          for i in range(10)]
EVENTS.insert(5, "12:00:00.005 MISS tcp 10.140.0.10 -> 10.140.0.1:9000: 5 connections not DNATed, "
                 "hostNetwork pod lab/hostnet-web")


@pytest.mark.parametrize("width,height", [(80, 24), (100, 30), (160, 40)])
def test_live_frame_fits_the_terminal(width, height):
    s = summary()
    current = {("tcp", 4, 8000, "10.140.1.2", 80): 12.5}
    frames = []
    for page in range(3):
        f = render_live(s, width, height, EVENTS, current=current, check_hint=HINT, pods=PODS, page=page)
        frames.append(f)
        lines = f.text.splitlines()
        assert len(lines) <= height - 1
        assert_fits(f.text, width)
        assert "now 12.50 flows/s" in " ".join(f.text.split())
        assert "MISS tcp" in f.text and "latest events (times UTC):" in f.text
        # the problem named while tracing, one line each, the most severe first
        assert lines[1].startswith("error: 8000/tcp -> [fd00:140:1::2]:80: 4 packets dropped (NETFILTER_DROP 4)")
        assert "  " + HINT in lines
    golden(f"live-{width}x{height}.txt", frames[0].text + "\n")
    # every mapping is on some page; when they do not all fit, the pages say so and how to turn them
    shown = "\n".join(f.text for f in frames[:frames[0].pages])
    assert_uncut(shown, summary_values(s))
    if frames[0].pages > 1:
        assert f"page 1/{frames[0].pages}; n: next page, p: previous" in " ".join(frames[0].text.split())
        golden(f"live-{width}x{height}-page2.txt", frames[1].text + "\n")
    assert frames[0].pages == (2 if height == 24 else 1)


def test_live_frame_of_refused_flows_names_the_problem_in_one_line():
    s = summary("summary-refused.json")
    f = render_live(s, 80, 24, [], current={}, check_hint=HINT)
    golden("live-refused-80x24.txt", f.text + "\n")
    lines = f.text.splitlines()
    assert lines[1] == "error: 8000/tcp -> 10.173.1.2:80: 8 of 12 refused (reset, by the pod)"
    assert lines[2] == "error: 8000/tcp -> [fd00:173:1::2]:80: 4 of 4 refused (reset, by the pod)"
    assert any(ln.startswith("expected: 9000/tcp: 8 connections not DNATed, served by hostNetwork pod")
               for ln in lines)
    assert all(len(ln) <= 80 for ln in lines)
    header = next(ln for ln in lines if ln.startswith("HOSTPORT"))
    for col in ("FLOWS", "ANSWERED", "REFUSED", "NO ANSWER"):
        assert col in header or col in " ".join(lines)
    # no pager when every mapping fits
    assert f.pages == 1 and "page 1/" not in f.text


def test_live_frame_never_prints_a_command_it_would_have_to_cut():
    s = summary("summary-refused.json")
    long = "sudo bpftrace-hostport check --netns " + "n" * 60
    f = render_live(s, 80, 24, [], current={}, check_hint=long)
    assert long not in f.text and "the check command is in the summary at Ctrl-C" in f.text
    assert all(len(ln) <= 80 for ln in f.text.splitlines())


def fake_view(monkeypatch, view):
    monkeypatch.setattr(gather_mod, "gather", lambda *a, **k: view)


def invoke(cmd, args, width):
    res = CliRunner().invoke(cmd, ["--pods-from", "none", *args], env={"COLUMNS": str(width)})
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("scenario,args", [("conflict", []), ("hostnetwork", ["--host-port", "9000"]),
                                           ("stale-udp", ["--host-port", "5353/udp"])])
def test_rules_golden(monkeypatch, scenario, args, width):
    view = lab_view(scenario)
    fake_view(monkeypatch, view)
    res = invoke(cli_node.rules_cmd, args, width)
    assert res.exit_code == 0, res.output
    golden(f"rules-{scenario}-{width}.txt", res.stdout)
    assert_fits(res.stdout, width, commands=["  sudo bpftrace-hostport check --pods-from none"])
    rows = json.loads(invoke(cli_node.rules_cmd, ["--json", *args], width).stdout)
    assert rows
    assert_uncut(res.stdout, [r["target"] or "" for r in rows] + [r["pod"] or "" for r in rows]
                 + [r["chain"] or "" for r in rows] + [r["port_name"] or "" for r in rows])


def test_rules_mark_the_winner_and_list_hostnetwork_pods(monkeypatch):
    fake_view(monkeypatch, lab_view("conflict"))
    rows = json.loads(invoke(cli_node.rules_cmd, ["--json", "--host-port", "8000/tcp"], 160).stdout)
    assert [(r["pod"].endswith("-rival"), r["conflict"]) for r in rows] == [(False, "wins"), (True, "shadowed")]
    text = invoke(cli_node.rules_cmd, ["--host-port", "8000/tcp"], 160).stdout
    assert "new connections go to cjweichen/nginx-hostport-6f9b9886b4-dndhf at 10.150.1.2:80" in text
    assert "matches; 1 other rule for it never matches." in " ".join(text.split())
    fake_view(monkeypatch, lab_view("hostnetwork"))
    rows = json.loads(invoke(cli_node.rules_cmd, ["--json"], 160).stdout)
    (host,) = [r for r in rows if r["source"] == "hostNetwork"]
    assert (host["pod"], host["host_port"], host["listening"]) == ("hostnet-web", 9000, ["tcp [::]:9000"])
    res = invoke(cli_node.rules_cmd, ["--host-port", "1234/udp"], 80)
    assert "hostPort 1234/udp: no DNAT rule, no hostNetwork pod and no listening socket" in res.stdout


CHECKS = {"conflict": lambda: lab_view("conflict"), "forward-drop": lambda: lab_view("forward-drop"),
          "blackhole": lambda: blackhole_view(declared=True)}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("scenario", sorted(CHECKS))
def test_check_golden(monkeypatch, scenario, width):
    view = CHECKS[scenario]()
    fake_view(monkeypatch, view)
    res = invoke(cli_node.check_cmd, [], width)
    assert res.exit_code == 1, res.output
    golden(f"check-{scenario}-{width}.txt", res.stdout)
    found = findings(CHECKS[scenario]())
    commands = [c for f in found for c in re.findall(r"`([^`]+)`", f.fix or "")]
    assert commands
    lines = res.stdout.splitlines()
    # every fix command below the table, whole, on a line of its own, after its "# [N] code" line
    for i, cmd in enumerate(commands, 1):
        assert cmd in lines
        assert lines[lines.index(cmd) - 1].startswith(f"# [{i}] ")
        assert f"[{i}]" in res.stdout.split("Fix commands")[0]
    assert_fits(res.stdout, width, commands=commands)
    assert_uncut(res.stdout.split("Fix commands")[0],
                 [f.code for f in found] + [f.message for f in found] + [e for f in found for e in f.evidence])
    for f in found:                      # codes are never broken
        assert f.code in res.stdout


def test_wrap_breaks_at_spaces_only_and_never_loses_a_character():
    text = "cjweichen/nginx-hostport-6f9b9886b4-dndhf (http) [fd00:140:1::2]:80 route_localnet = 1"
    for width in range(8, 60):
        lines = wrap(text, width, "  ")
        assert " ".join(ln.strip() for ln in lines) == text
        for ln in lines:     # a line is longer than the width only when it is one word that is
            assert len(ln) <= width or len(ln.split()) == 1
    assert wrap(text, 20) == ["cjweichen/nginx-hostport-6f9b9886b4-dndhf", "(http)", "[fd00:140:1::2]:80",
                              "route_localnet = 1"]
    assert wrap("abcdefghijkl", 5) == ["abcdefghijkl"]      # never cut, even when it cannot fit


def test_a_backticked_command_is_one_word():
    text = "run `sudo bpftrace-hostport check --lab demo --pods /run/x/pods.json` on the node"
    assert words(text)[1] == "`sudo bpftrace-hostport check --lab demo --pods /run/x/pods.json`"
    lines = wrap(text, 30)
    assert "`sudo bpftrace-hostport check --lab demo --pods /run/x/pods.json`" in lines


REPORT_WIDTHS = WIDTHS


def short_paths(report, tmp_path):
    """The report with its files named as a user's would be (not pytest's long tmp paths), so the
    goldens show how the names wrap."""
    fix = lambda f: str(f).replace(str(tmp_path), "/captures")          # noqa: E731
    report = dict(report, files=[fix(f) for f in report["files"]])
    if report.get("per_node"):
        report["per_node"] = [dict(n, files=[fix(f) for f in n["files"]]) for n in report["per_node"]]
    return report


@pytest.mark.parametrize("width", REPORT_WIDTHS)
def test_report_tables_golden(tmp_path, width):
    from bpftrace_hostport.analysis.report_render import render
    from tests.unit.analysis.test_report import two_nodes
    r = short_paths(two_nodes(tmp_path).report(), tmp_path)
    text = render(r, "table", width)
    golden(f"report-{width}.txt", text)
    assert_fits(text, width, commands=["    sudo bpftrace-hostport check"])
    values = ["shop/web-7d9f4c6b8-x2k4q", "dns/resolver-0", "monitoring/node-exporter", "10.244.1.5:80",
              "[fd00::5]:80", "10.244.2.7:53", "NETFILTER_DROP", "192.168.1.10", "fd00::100"]
    assert_uncut(text, values)
    for title in ("Findings", "Mappings", "Per node", "Drops", "Top clients", "Notes:"):
        assert any(ln.startswith(title) for ln in text.splitlines()), title


@pytest.mark.parametrize("width", REPORT_WIDTHS)
def test_comparison_tables_golden(tmp_path, width):
    from bpftrace_hostport.analysis.report import compare_reports
    from bpftrace_hostport.analysis.report_render import render
    from tests.unit.analysis.test_report import FLOWS_A, capture
    before = capture(tmp_path).report()
    (tmp_path / "after").mkdir()
    after = capture(tmp_path / "after", flows=FLOWS_A[:3], summary=None).report()
    text = render(compare_reports(short_paths(before, tmp_path), short_paths(after, tmp_path)), "table", width)
    golden(f"compare-{width}.txt", text)
    assert_fits(text, width)
    assert_uncut(text, ["shop/web-7d9f4c6b8-x2k4q", "10.244.1.5:80", "[fd00::5]:80"])
