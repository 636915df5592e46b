"""The HTML report as a browser lays it out: headless Chromium (Debian's) at 1280 px.

Chromium loads a copy of the report with a small script added that writes, into the title,
how wide the page is and where each table and chart ends; --dump-dom prints the page after
the script ran. Nothing may end past 1280 px and the page must not scroll sideways. A
screenshot is kept in the test's tmp_path as an artefact. With CI=true a missing Chromium is a
failure, not a skip (scripts/test.sh installs it).
"""
import json
import os
import re
import shutil
import signal
import subprocess

import pytest

from bpftrace_hostport.analysis.report_render import render
from tests.unit.analysis.test_report import FLOWS_A, FLOWS_B, MISSES_A, SUMMARY_A, SUMMARY_B, WEB, Cap, header

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]
MEASURE = ("<script>document.title=JSON.stringify({scroll:document.documentElement.scrollWidth,"
           "client:document.documentElement.clientWidth,"
           "ends:[...document.querySelectorAll('table,img,p,h2')].map(e=>Math.ceil(e.getBoundingClientRect().right))"
           "})</script></body>")


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and Chromium is missing: apt-get install chromium (scripts/test.sh does)")
        pytest.skip("chromium is not installed")
    return CHROMIUM


def run_chromium(binary, tmp_path, *args, timeout=90):
    """Chromium in its own process group and profile, both gone afterwards whatever happens."""
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    p = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)        # its zygote and renderers too
        except ProcessLookupError:
            pass
        p.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def report_with_long_names(tmp_path):
    """Two nodes, IPv4 and IPv6, names as long as Deployments make them, drops and misses."""
    long = dict(WEB, pod_namespace="payments-production",
                pod_name="checkout-frontend-deployment-7d9f4c6b8-x2k4q")
    flows = [dict(f, **long) for f in FLOWS_A]
    summary = dict(SUMMARY_A, mappings=[dict(m, **long) if m["pod_ip"] else m for m in SUMMARY_A["mappings"]])
    return (Cap(tmp_path).file("node-a.jsonl", header("ip-10-0-12-34.eu-west-1.compute.internal", "netfilter"),
                               flows, MISSES_A, summary)
            .file("node-b.jsonl", header("node-b", "conntrack", measures=False), FLOWS_B, (), SUMMARY_B)).report()


def test_html_report_fits_1280_px_in_chromium(chromium, tmp_path):
    page = render(report_with_long_names(tmp_path), "html")
    path = tmp_path / "report.html"
    path.write_text(page)
    probe = tmp_path / "measure.html"
    probe.write_text(page.replace("</body>", MEASURE))
    dom = run_chromium(chromium, tmp_path, "--window-size=1280,2000", "--dump-dom", probe.as_uri())
    m = re.search(r"<title>(\{.*?\})</title>", dom)
    assert m, dom[:500]
    got = json.loads(m.group(1))
    assert got["scroll"] <= got["client"], got             # nothing makes the page scroll sideways
    assert max(got["ends"]) <= 1280, got
    assert len(got["ends"]) >= 10
    shot = tmp_path / "report-1280.png"                     # the artefact: look at it
    run_chromium(chromium, tmp_path, "--window-size=1280,6000", f"--screenshot={shot}", path.as_uri())
    from PIL import Image
    assert Image.open(shot).size[0] == 1280
