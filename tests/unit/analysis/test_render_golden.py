"""Golden renderings of the summary, `rules` and `check` tables at 80, 100 and 160 columns.

Each rendering must equal its file in tests/fixtures/golden/ (regenerate them with
UPDATE_GOLDEN=1 after a deliberate change, and read the diff), keep every line within the width
(the copyable fix commands excepted: one command, one line), cut no value (every piece of every
value is there, wrapped only after a space or one of / - . : , _ = @) and print no ellipsis.
"""
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from bpftrace_hostport.analysis.render import BREAKS, render_live, render_summary, wrap
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
    """The unbreakable pieces of a value: split at spaces and after the break characters."""
    return [p for word in str(value).split() for p in re.split(f"(?<=[{re.escape(BREAKS)}])", word) if p]


def assert_fits(text, width, commands=()):
    for line in text.splitlines():
        if line in commands:
            continue            # a fix command is one line, whatever its length: it is copied
        assert len(line) <= width, (width, line)
    assert "…" not in text


def assert_uncut(text, values):
    for v in values:
        for p in pieces(v):
            assert p in text, (v, p)


def summary():
    return json.loads((GOLDEN / "summary.json").read_text())


def summary_values(s):
    out = []
    for m in s["mappings"]:
        out += [m["pod_ip"] or "", m["pod_name"] or "", m["pod_namespace"] or "", m["port_name"] or "",
                str(m["flows"]), str(m["answered"])]
        out += [f"{r}:{n}" for r, n in m["drops"].items()]
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_summary_golden(width):
    s = summary()
    text = render_summary(s, width, check_hint=HINT, pods=PODS)
    golden(f"summary-{width}.txt", text)
    assert_fits(text, width, commands=["  " + HINT])
    assert_uncut(text, summary_values(s))
    assert "[fd00:140:1::2]:80" in text.replace("\n", "") or "[fd00:140:1::" in text
    for note in ("hostNetwork pod lab/hostnet-web (http) owns the port",
                 "although pod lab/web-extra declares this hostPort",
                 "went to an IP no live pod has", "4 packets dropped after DNAT (NETFILTER_DROP 4)"):
        assert note in " ".join(text.split()), note
    assert text.splitlines()[-1] == "  " + HINT


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


@pytest.mark.parametrize("width,height", [(80, 24), (100, 30), (160, 40)])
def test_live_frame_fits_the_terminal(width, height):
    s = summary()
    events = ["12:00:00.%03d tcp 10.140.0.10:%d -> 10.140.0.1:8000 => 10.140.1.2:80 "
              "cjweichen/nginx-hostport-6f9b9886b4-dndhf (http) [prerouting] 0.05 ms" % (i, 40000 + i)
              for i in range(10)]
    events.insert(5, "12:00:00.005 MISS tcp 10.140.0.10 -> 10.140.0.1:9000: 5 connections not DNATed, "
                     "hostNetwork pod lab/hostnet-web")
    current = {("tcp", 4, 8000, "10.140.1.2", 80): 12.5}
    frame = render_live(s, width, height, events, current=current, check_hint=HINT, pods=PODS)
    golden(f"live-{width}x{height}.txt", frame + "\n")
    lines = frame.splitlines()
    assert len(lines) <= height - 1
    assert_fits(frame, width)
    assert "now 12.50 flows/s" in " ".join(frame.split())
    assert "MISS tcp" in frame and "latest events (times UTC):" in frame


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


def test_wrap_breaks_at_spaces_then_after_separators_and_never_loses_a_character():
    text = "cjweichen/nginx-hostport-6f9b9886b4-dndhf (http) net.ipv4.conf.all.route_localnet = 1"
    for width in range(8, 40):
        lines = wrap(text, width, "  ")
        assert all(len(ln) <= width for ln in lines)
        assert "".join(ln.strip() for ln in lines).replace(" ", "") == text.replace(" ", "")
    assert wrap(text, 20) == ["cjweichen/nginx-", "hostport-6f9b9886b4-", "dndhf (http)", "net.ipv4.conf.all.",
                              "route_localnet = 1"]
    assert wrap("abcdefghijkl", 5) == ["abcde", "fghij", "kl"]     # no break character: cut, not lost
