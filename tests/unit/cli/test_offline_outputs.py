"""summary, report and export as a user meets them: the width they fit, what they write and with
which mode, what an anonymized output holds, unknown against none, and a user who is not root.

The non-root tests run the real command as `nobody` (setpriv) and need root to do so; with
CI=true they fail rather than skip.
"""
import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import orjson
import pytest
from click.testing import CliRunner

from bpftrace_hostport.cli import cli
from tests.unit.analysis.test_report import FLOWS_A, FLOWS_B, MISSES_A, SUMMARY_A, SUMMARY_B, header, ts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CLIENTS = ["192.168.1.10", "192.168.1.11", "192.168.1.12", "fd00::100", "192.168.1.20", "192.168.1.30",
           "192.168.2.20"]


def jsonl(path, recs):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return str(path)


def clean(recs):
    return [{k: v for k, v in r.items() if k not in ("node", "source")} for r in recs]


@pytest.fixture
def capture(tmp_path):
    return jsonl(tmp_path / "a.jsonl", [header("node-a", "netfilter")] + clean(FLOWS_A) + MISSES_A + [SUMMARY_A])


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env or {})


def test_a_killed_json_capture_is_rated_over_the_time_it_ran(tmp_path):
    """20 flows in the last 10 ms of a capture started 10 s earlier and killed (no summary):
    2 flows/s, not 2,000 over the flows' own span."""
    flows = [dict(FLOWS_A[0], ts=ts(10 + i / 2000)) for i in range(20)]
    path = jsonl(tmp_path / "killed.jsonl", [header("node-a", "netfilter")] + clean(flows))
    res = run("summary", path, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    (m,) = s["mappings"]
    assert s["duration_s"] == pytest.approx(10.0095, abs=0.01)
    assert m["flows_per_s"] == pytest.approx(2.0, rel=0.01)


def test_report_fits_columns_on_a_pipe_and_has_no_limit_without_it(capture):
    res = run("report", capture, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert max(len(ln) for ln in res.stdout.splitlines()) <= 80
    wide = run("report", capture)
    assert max(len(ln) for ln in wide.stdout.splitlines()) > 100      # a pipe: one line per row


def test_csv_booleans_are_true_false_and_unknown_is_empty(capture, tmp_path):
    out = tmp_path / "flows.csv"
    assert run("export", capture, "--to", "csv", "-o", str(out)).exit_code == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["answered"] for r in rows} <= {"true", "false"} and {r["midstream"] for r in rows} <= {"true", "false"}
    assert "True" not in out.read_text() and "False" not in out.read_text()
    res = run("report", capture, "--format", "csv")
    assert "True" not in res.stdout and "False" not in res.stdout


def test_html_without_o_is_refused_with_the_fix(capture):
    res = run("report", capture, "--format", "html")
    assert res.exit_code == 2 and "HTML goes to a file: add -o report.html." in res.output
    assert "<html" not in res.output


@pytest.mark.parametrize("args,name", [
    (["report", "--format", "html"], "r.html"), (["report", "--format", "json"], "r.json"),
    (["report", "--format", "csv"], "r.csv"), (["report", "--format", "markdown"], "r.md"),
    (["export", "--to", "csv"], "f.csv"), (["export", "--to", "parquet"], "f.parquet"),
    (["export", "--to", "pcapng"], "f.pcapng"), (["export", "--to", "jsonl"], "f.jsonl"),
    (["export", "--to", "recording"], "f.arrow")])
def test_every_file_holding_client_addresses_is_0600(capture, tmp_path, args, name):
    out = tmp_path / name
    old = os.umask(0o022)
    try:
        res = run(args[0], capture, *args[1:], "-o", str(out))
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_report_and_export_anonymize_an_existing_capture(capture, tmp_path):
    key = tmp_path / "key"
    key.write_text("a secret of more than sixteen bytes\n")
    outputs = []
    for fmt in ("table", "json", "csv", "markdown"):
        res = run("report", capture, "--format", fmt, "--anonymize-key-file", str(key),
                  "--client", "192.168.1.0/24", env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        outputs.append(res.stdout)
    res = run("report", capture, "--format", "html", "-o", str(tmp_path / "r.html"),
              "--anonymize-key-file", str(key))
    assert res.exit_code == 0, res.output
    outputs.append((tmp_path / "r.html").read_text())
    for to in ("csv", "jsonl", "pcapng", "parquet", "recording"):
        out = tmp_path / f"x.{to}"
        assert run("export", capture, "--to", to, "-o", str(out), "--anonymize-key-file", str(key)).exit_code == 0
        outputs.append(out.read_bytes().decode("latin-1"))
    import ipaddress
    packed = [ipaddress.ip_address(c).packed.decode("latin-1") for c in CLIENTS]
    for text in outputs:
        for c in CLIENTS:
            assert c not in text.replace("192.168.1.0/24", ""), c
        for p in packed:
            assert p not in text
    # the same key, the same pseudonyms: the report and the export agree
    table = json.loads(outputs[1])
    flows = [json.loads(ln) for ln in (tmp_path / "x.jsonl").read_text().splitlines()]
    top = {ip for m in table["mappings"] for ip, _ in m["top_clients"]}
    assert top <= {f.get("client_ip") for f in flows}
    assert table["filters"]["clients"] != ["192.168.1.0/24"]


def test_unknown_is_n_a_never_a_dash_in_summary(tmp_path):
    path = jsonl(tmp_path / "b.jsonl", [header("node-b", "conntrack", measures=False)] + clean(FLOWS_B) + [SUMMARY_B])
    res = run("summary", path, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.stdout.splitlines() if "5353" in ln and "resolver" in ln)
    cells = row.split()
    assert "-" not in cells and cells.count("n/a") >= 7, row


# -- a user who is not root --------------------------------------------------------------------

def as_nobody(*args, home="/nonexistent"):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: these tests run commands as nobody and need root and setpriv")
        pytest.skip("needs root and setpriv to run a command as nobody")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "PYTHONPATH": REPO, "LANG": "C.UTF-8"}
    return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           sys.executable, "-m", "bpftrace_hostport", *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd="/")


@pytest.fixture
def shared(tmp_path_factory):
    """A directory nobody can enter, holding a capture only root can read."""
    import tempfile
    d = tempfile.mkdtemp(prefix="bhp-nobody-")
    os.chmod(d, 0o777)
    src = [header("node-a", "netfilter")] + clean(FLOWS_A) + MISSES_A + [SUMMARY_A]
    path = os.path.join(d, "incident.jsonl")
    with open(path, "wb") as f:
        f.write(b"".join(orjson.dumps(r) + b"\n" for r in src))
    os.chmod(path, 0o600)
    yield d, path
    shutil.rmtree(d, ignore_errors=True)


def test_a_root_only_recording_tells_a_user_whose_it_is_and_what_to_run(shared):
    _, path = shared
    for cmd in (["report", path], ["summary", path], ["export", path, "--to", "csv", "-o", "/tmp/x.csv"]):
        p = as_nobody(*cmd)
        assert p.returncode == 2, (cmd, p.stderr)
        assert "belongs to root; run the command with sudo" in p.stderr, p.stderr
        assert "is not readable" not in p.stderr and "Traceback" not in p.stderr


def test_html_report_for_a_user_without_a_home_prints_no_matplotlib_warning(shared):
    d, path = shared
    os.chmod(path, 0o644)
    out = os.path.join(d, "r.html")
    p = as_nobody("report", path, "--format", "html", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "atplotlib" not in p.stderr and "MPLCONFIGDIR" not in p.stderr, p.stderr
    assert p.stderr.strip() == f"wrote {out}"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    leftovers = [n for n in os.listdir(tempfile_dir()) if n.startswith("bpftrace-hostport-mpl-")
                 and os.stat(os.path.join(tempfile_dir(), n)).st_uid == 65534]
    assert leftovers == []                  # its private matplotlib directory went at exit


def tempfile_dir():
    import tempfile
    return tempfile.gettempdir()
